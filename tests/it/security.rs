//! Who may come in through which door: the public door serves browsers only (`/ws`, `/healthz`),
//! a page of a foreign origin cannot open `/ws`, and without browser authentication only loopback
//! peers may connect. Each refusal is checked for what it did not do.

use std::net::{IpAddr, SocketAddr};

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::support::{Gateway, assert_lines, event, http, http_with};

/// Opens `/ws` with an `Origin` header; the HTTP status the upgrade got.
async fn upgrade_status(addr: SocketAddr, origin: Option<&str>) -> u16 {
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_str(origin).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test]
async fn the_public_door_serves_only_ws_and_healthz() {
    let gateway = Gateway::start().await;
    let public = gateway.addr;
    assert_eq!(http(public, "GET", "/healthz", None).await.0, 200);
    let (status, body) = http(public, "GET", "/ws", None).await;
    assert_eq!(status, 400, "a plain GET on /ws is not an upgrade: {body}");

    let sneaked = event("agent_completed", "run_x", "t_door").to_string();
    let (status, body) = http(
        public,
        "POST",
        "/v1/events",
        Some(("application/json", &sneaked)),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    for path in ["/metrics", "/readyz", "/v1/ledger", "/v1/deadletter"] {
        let (status, body) = http(public, "GET", path, None).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    // Nothing was taken in through the public door.
    let (status, _) = gateway.get("/v1/channels/thread:t_door").await;
    assert_eq!(status, 404);
    assert_lines(
        &gateway.metrics().await,
        &["agentwire_events_ingested_total 0"],
    );

    // And the internal door does not upgrade.
    assert_eq!(http(gateway.internal, "GET", "/ws", None).await.0, 404);
}

#[tokio::test]
async fn a_page_of_another_origin_cannot_open_ws() {
    let gateway = Gateway::start_with(|c| {
        c.auth.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let evil = upgrade_status(gateway.addr, Some("https://evil.example")).await;
    assert_eq!(evil, 403);
    let metrics = gateway.metrics().await;
    assert_lines(
        &metrics,
        &[
            "agentwire_upgrades_refused_total{reason=\"origin\"} 1",
            "agentwire_connections_opened_total 0",
        ],
    );

    let own = format!("http://{}", gateway.addr);
    assert_eq!(upgrade_status(gateway.addr, Some(&own)).await, 101);
    let listed = upgrade_status(gateway.addr, Some("https://app.example.com")).await;
    assert_eq!(listed, 101);
    assert_eq!(
        upgrade_status(gateway.addr, None).await,
        101,
        "not a browser page"
    );
}

/// This machine's address on its network (no packet is sent).
fn outward_ip() -> IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.connect("192.0.2.250:9").unwrap();
    let ip = socket.local_addr().unwrap().ip();
    assert!(
        !ip.is_loopback() && !ip.is_unspecified(),
        "this test needs a network interface besides loopback"
    );
    ip
}

#[tokio::test]
async fn without_browser_authentication_only_loopback_peers_may_connect() {
    let gateway = Gateway::start_on("0.0.0.0:0", |_| {}).await;
    let from_network = SocketAddr::new(outward_ip(), gateway.addr.port());
    assert_eq!(upgrade_status(from_network, None).await, 403);
    assert_lines(
        &gateway.metrics().await,
        &[
            "agentwire_upgrades_refused_total{reason=\"not_loopback\"} 1",
            "agentwire_connections_opened_total 0",
        ],
    );
    let local = SocketAddr::from(([127, 0, 0, 1], gateway.addr.port()));
    assert_eq!(upgrade_status(local, None).await, 101);

    let open = Gateway::start_on("0.0.0.0:0", |c| c.auth.insecure = true).await;
    let from_network = SocketAddr::new(outward_ip(), open.addr.port());
    assert_eq!(upgrade_status(from_network, None).await, 101);

    // With browser authentication the door is open to every peer: the token decides.
    let authenticated = Gateway::start_on("0.0.0.0:0", |c| {
        c.auth.jwt_secret = Some("a-test-secret-of-at-least-32-bytes!!".into());
    })
    .await;
    let from_network = SocketAddr::new(outward_ip(), authenticated.addr.port());
    assert_eq!(upgrade_status(from_network, None).await, 101);
}

#[tokio::test]
async fn the_internal_door_asks_producers_and_operators_for_their_own_keys() {
    const PRODUCER: &str = "producer-key-000000001";
    const OPERATOR: &str = "operator-key-000000001";
    let gateway = Gateway::start_with(|c| {
        c.auth.producer_keys = vec!["producer-key-old-000001".into(), PRODUCER.into()];
        c.auth.operator_keys = vec![OPERATOR.into()];
    })
    .await;
    let bearer = |key: &str| format!("Bearer {key}");
    let post = |key: Option<String>| {
        let internal = gateway.internal;
        async move {
            let body = event("agent_started", "run_k", "t_keys").to_string();
            let auth: Vec<(&str, &str)> = key
                .as_deref()
                .map(|k| vec![("authorization", k)])
                .unwrap_or_default();
            http_with(
                internal,
                "POST",
                "/v1/events",
                &auth,
                Some(("application/json", &body)),
            )
            .await
        }
    };
    assert_eq!(post(None).await.0, 401);
    assert_eq!(post(Some(bearer("guessed-key-0000000"))).await.0, 401);
    assert_eq!(post(Some(bearer(OPERATOR))).await.0, 403);
    // Nothing was taken in.
    let operator = [("authorization", bearer(OPERATOR))];
    let as_operator: Vec<(&str, &str)> = operator.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _) = http_with(
        gateway.internal,
        "GET",
        "/v1/channels/thread:t_keys",
        &as_operator,
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(post(Some(bearer(PRODUCER))).await.0, 200);

    let (status, _) = http(gateway.internal, "GET", "/v1/ledger", None).await;
    assert_eq!(status, 401);
    let as_producer = [("authorization", bearer(PRODUCER))];
    let as_producer: Vec<(&str, &str)> =
        as_producer.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _) = http_with(gateway.internal, "GET", "/v1/ledger", &as_producer, None).await;
    assert_eq!(status, 403);
    let (status, body) = http_with(gateway.internal, "GET", "/v1/ledger", &as_operator, None).await;
    assert_eq!(status, 200, "{body}");
    // Probes and scrapes need no key.
    assert_eq!(http(gateway.internal, "GET", "/readyz", None).await.0, 200);
    let (status, metrics) = http(gateway.internal, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert_lines(
        &metrics,
        &[
            "agentwire_api_refused_total{reason=\"missing\"} 2",
            "agentwire_api_refused_total{reason=\"invalid\"} 1",
            "agentwire_api_refused_total{reason=\"wrong_role\"} 2",
            "agentwire_events_ingested_total 1",
        ],
    );
}

/// A web page can POST text/plain or a form to any address without a CORS preflight; only the
/// JSON types are taken, so a page cannot post into a gateway on the visitor's machine.
#[tokio::test]
async fn only_json_bodies_are_taken() {
    let gateway = Gateway::start().await;
    let body = event("agent_started", "run_m", "t_media").to_string();
    for media in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        // Not a JSON type that starts like one.
        "application/jsonp",
    ] {
        let (status, answer) =
            http(gateway.internal, "POST", "/v1/events", Some((media, &body))).await;
        assert_eq!(status, 415, "{media}: {answer}");
        let (status, _) = http(
            gateway.internal,
            "POST",
            "/v1/runs",
            Some((media, r#"{"run_id":"run_m","thread_id":"t_evil"}"#)),
        )
        .await;
        assert_eq!(status, 415, "{media}");
    }
    let (status, _) = http(gateway.internal, "POST", "/v1/events", None).await;
    assert_eq!(status, 415, "no Content-Type");
    assert_eq!(gateway.get("/v1/channels/thread:t_media").await.0, 404);
    assert_lines(
        &gateway.metrics().await,
        &[
            "agentwire_events_rejected_total{reason=\"media_type\"} 5",
            "agentwire_events_ingested_total 0",
        ],
    );
    // The type's case and its parameters do not matter.
    for media in ["application/json; charset=utf-8", "Application/JSON"] {
        let (status, answer) =
            http(gateway.internal, "POST", "/v1/events", Some((media, &body))).await;
        assert_eq!(status, 200, "{media}: {answer}");
    }
}

#[tokio::test]
async fn a_registered_run_cannot_be_re_pointed() {
    let gateway = Gateway::start().await;
    let register = |thread: &str| {
        serde_json::json!({"run_id": "run_bob", "thread_id": thread, "user_id": "u_bob"})
            .to_string()
    };
    let (status, _) = gateway.post("/v1/runs", &register("t_bob")).await;
    assert_eq!(status, 200);
    let (status, body) = gateway.post("/v1/runs", &register("t_attacker")).await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (409, Some("run_conflict")),
        "{body}"
    );
    // The same registration again is fine.
    assert_eq!(gateway.post("/v1/runs", &register("t_bob")).await.0, 200);
    // An agent_started naming another thread cannot move it either: that item is refused.
    let (status, body) = gateway
        .post(
            "/v1/events",
            &event("agent_started", "run_bob", "t_attacker").to_string(),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["results"][0]["code"], "run_conflict", "{body}");

    let mut bob = gateway.client("u_bob").await;
    bob.subscribe("t_bob", None).await;
    gateway
        .publish(&[
            serde_json::json!({"type": "agent_thinking", "run_id": "run_bob", "payload": {}}),
        ])
        .await;
    assert_eq!(bob.events(1).await[0]["channel"], "thread:t_bob");
    assert_eq!(gateway.get("/v1/channels/thread:t_attacker").await.0, 404);
    assert_lines(
        &gateway.metrics().await,
        &[
            "agentwire_runs_refused_total{reason=\"conflict\"} 2",
            "agentwire_events_rejected_total{reason=\"run_conflict\"} 1",
        ],
    );
}

/// A refused event's `event_id` is not remembered: its corrected retry is taken, not answered
/// `duplicate` (and dropped).
#[tokio::test]
async fn an_event_refused_for_a_run_conflict_can_be_sent_again_corrected() {
    let gateway = Gateway::start().await;
    let register = serde_json::json!({"run_id": "run_fix", "thread_id": "t_fix"}).to_string();
    assert_eq!(gateway.post("/v1/runs", &register).await.0, 200);
    let mut viewer = gateway.client("u_fix").await;
    viewer.subscribe("t_fix", None).await;
    let started = |thread: &str| {
        let mut started = event("agent_started", "run_fix", thread);
        started["event_id"] = "run_fix:0".into();
        started.to_string()
    };
    let (status, body) = gateway.post("/v1/events", &started("t_wrong")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["results"][0]["code"], "run_conflict", "{body}");
    let (status, body) = gateway.post("/v1/events", &started("t_fix")).await;
    assert_eq!(
        (status.as_u16(), &body["results"][0]["status"]),
        (200, &serde_json::json!("accepted")),
        "{body}"
    );
    assert_eq!(viewer.events(1).await[0]["type"], "agent_started");
    assert_eq!(
        gateway.metric("agentwire_events_duplicate_total").await,
        0.0
    );
}

/// One producer's `event_id` never makes another producer's event a duplicate.
#[tokio::test]
async fn event_ids_are_scoped_by_producer_key() {
    const ALICE: &str = "producer-key-alice-01";
    const MALLORY: &str = "producer-key-mallory-01";
    let gateway = Gateway::start_with(|c| {
        c.auth.producer_keys = vec![ALICE.into(), MALLORY.into()];
    })
    .await;
    let post = |key: &'static str, thread: &'static str| {
        let internal = gateway.internal;
        async move {
            let mut event = event("agent_thinking", "run_d", thread);
            event["event_id"] = "run_7f3a:5".into();
            let bearer = format!("Bearer {key}");
            let (_, text) = http_with(
                internal,
                "POST",
                "/v1/events",
                &[("authorization", &bearer)],
                Some(("application/json", &event.to_string())),
            )
            .await;
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["results"][0]["status"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(post(MALLORY, "t_victim").await, "accepted");
    assert_eq!(
        post(ALICE, "t_victim").await,
        "accepted",
        "not Mallory's duplicate"
    );
    assert_eq!(
        post(ALICE, "t_victim").await,
        "duplicate",
        "Alice's own retry"
    );
}

/// An error quotes at most a short excerpt of what the client sent.
#[tokio::test]
async fn errors_do_not_echo_client_input() {
    let gateway = Gateway::start().await;
    let long = "x".repeat(20_000);
    let mut client = gateway.client("u_echo").await;
    client.send(serde_json::json!({"type": long.clone()})).await;
    let error = client.recv().await;
    assert_eq!(error["code"], "unknown_type", "{error}");
    assert!(error["message"].as_str().unwrap().len() < 200, "{error}");
    let (_, body) = gateway
        .post(
            "/v1/events",
            &serde_json::json!({"type": long, "run_id": "r"}).to_string(),
        )
        .await;
    let reason = body["results"][0]["reason"].as_str().unwrap();
    assert!(reason.len() < 300, "{reason}");
}

/// A key given twice could mean one thing to the gateway and another to a backend or a browser:
/// such JSON is refused, for events, run registrations and client frames.
#[tokio::test]
async fn json_with_a_key_twice_is_refused() {
    let gateway = Gateway::start().await;
    let twice = r#"{"type":"agent_thinking","run_id":"r_d","thread_id":"t_one","thread_id":"t_two","payload":{}}"#;
    let (status, body) = gateway.post("/v1/events", twice).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["results"][0]["code"], "invalid_json", "{body}");
    for thread in ["t_one", "t_two"] {
        assert_eq!(
            gateway
                .get(&format!("/v1/channels/thread:{thread}"))
                .await
                .0,
            404
        );
    }
    let (status, body) = gateway
        .post(
            "/v1/runs",
            r#"{"run_id":"r_d","thread_id":"t_one","thread_id":"t_two"}"#,
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (400, Some("invalid_json"))
    );
    let mut client = gateway.client("u_dup").await;
    client
        .send_raw(tokio_tungstenite::tungstenite::Message::text(
            r#"{"type":"subscribe","thread_id":"t_one","thread_id":"t_two"}"#,
        ))
        .await;
    assert_eq!(client.recv().await["code"], "invalid_json");
}

/// DNS rebinding: a page whose own name now resolves to 127.0.0.1 reaches the gateway from a
/// loopback peer but sends its name as Host; protected mode and a keyless internal door refuse it.
#[tokio::test]
async fn a_page_rebound_to_localhost_is_refused() {
    let gateway = Gateway::start().await;
    let mut request = format!("ws://{}/ws", gateway.addr)
        .into_client_request()
        .unwrap();
    let rebound = format!("evil.example:{}", gateway.addr.port());
    request
        .headers_mut()
        .insert("host", HeaderValue::from_str(&rebound).unwrap());
    request.headers_mut().insert(
        "origin",
        HeaderValue::from_str(&format!("http://{rebound}")).unwrap(),
    );
    let status = match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        other => panic!("{other:?}"),
    };
    assert_eq!(status, 403);
    let host = format!("evil.example:{}", gateway.internal.port());
    let (status, _) = http_with(
        gateway.internal,
        "GET",
        "/v1/deadletter",
        &[("host", &host)],
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = http_with(
        gateway.internal,
        "POST",
        "/v1/deadletter/redrive",
        &[("content-type", "text/plain")],
        None,
    )
    .await;
    assert_eq!(status, 415);
}

#[tokio::test]
async fn a_standard_run_id_and_a_full_registry_refuse_registration() {
    let gateway = Gateway::start_with(|c| c.resolve.registry_capacity = 2).await;
    let register = |run: &str, thread: &str| {
        serde_json::json!({"run_id": run, "thread_id": thread}).to_string()
    };
    let (status, _) = gateway
        .post("/v1/runs", &register("thread_t42_run_1", "t_other"))
        .await;
    assert_eq!(status, 409, "a standard run id names its own thread");
    assert_eq!(
        gateway.post("/v1/runs", &register("run_a", "t_a")).await.0,
        200
    );
    assert_eq!(
        gateway.post("/v1/runs", &register("run_b", "t_b")).await.0,
        200
    );
    let (status, body) = gateway.post("/v1/runs", &register("run_c", "t_c")).await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (503, Some("registry_full"))
    );
    // run_a was not pushed out, so it still cannot be registered elsewhere.
    assert_eq!(
        gateway.post("/v1/runs", &register("run_a", "t_x")).await.0,
        409
    );
    assert_lines(
        &gateway.metrics().await,
        &[
            "agentwire_runs_refused_total{reason=\"conflict\"} 2",
            "agentwire_runs_refused_total{reason=\"full\"} 1",
        ],
    );
}
