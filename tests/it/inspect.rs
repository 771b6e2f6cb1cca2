//! The live inspector over real sockets: `GET /inspect` (its policy, no external URL, no data
//! without a key), the operator endpoints it reads (`GET /v1/runs`, the ledger's `busiest`), the
//! redrive it posts, and the operator tail of one thread (`GET /v1/threads/{thread_id}/tail`).

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use hyper::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::sse::Stream;
use crate::support::{Gateway, WAIT, event, full_run, http_with};

const OPERATOR: &str = "operator-key-inspect-01";
const PRODUCER: &str = "producer-key-inspect-01";
const AS_OPERATOR: (&str, &str) = ("authorization", "Bearer operator-key-inspect-01");
const AS_PRODUCER: (&str, &str) = ("authorization", "Bearer producer-key-inspect-01");

async fn keyed(configure: impl FnOnce(&mut agentwire::config::Config)) -> Gateway {
    Gateway::start_with(|c| {
        c.auth.operator_keys = vec![OPERATOR.into()];
        c.auth.producer_keys = vec![PRODUCER.into()];
        configure(c);
    })
    .await
}

/// One request to the internal door, the answer's JSON (or its text as a string).
async fn call(
    internal: SocketAddr,
    method: &str,
    path: &str,
    key: Option<(&str, &str)>,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let headers: Vec<(&str, &str)> = key.into_iter().collect();
    let body = body.map(|b| ("application/json", b));
    let (status, text) = http_with(internal, method, path, &headers, body).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn publish(gateway: &Gateway, events: &[Value]) {
    let body = Value::from(events.to_vec()).to_string();
    let (status, answer) = call(
        gateway.internal,
        "POST",
        "/v1/events",
        Some(AS_PRODUCER),
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn the_page_is_served_under_its_policy_with_no_external_url_and_no_data() {
    let gateway = keyed(|_| {}).await;
    publish(&gateway, &full_run("run_secret", "t_secret")).await;

    // The page needs no key: it holds nothing until the operator gives one.
    let stream = tokio::net::TcpStream::connect(gateway.internal)
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get("/inspect")
        .header("host", gateway.internal.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let page = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-store");
    let policy = headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'none'",
        "base-uri 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
    // The inline script and style are allowed by their hash, and nothing else is.
    let hash = |open: &str, close: &str| {
        let start = page.find(open).unwrap() + open.len();
        let end = start + page[start..].find(close).unwrap();
        let digest = Sha256::digest(&page.as_bytes()[start..end]);
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    };
    assert!(policy.contains(&format!("script-src {}", hash("<script>", "</script>"))));
    assert!(policy.contains(&format!("style-src {}", hash("<style>", "</style>"))));
    assert!(!policy.contains("unsafe"), "{policy}");

    // Nothing from elsewhere: no absolute URL, no protocol-relative one, no loaded resource.
    for external in [
        "http:", "https:", "//cdn", "src=", "href=", "@import", "url(",
    ] {
        assert!(!page.contains(external), "{external} in the page");
    }
    assert!(!page.contains("run_secret") && !page.contains("t_secret"));
    for id in [
        "totals-emitted",
        "totals-delivered",
        "totals-pending",
        "totals-lost",
        "totals-balanced",
        "channels",
        "runs",
        "runs-running",
        "runs-stalled",
        "runs-ended",
        "deadletters",
        "deadletters-count",
        "redrive",
        "tail",
        "tail-thread",
        "key",
    ] {
        assert!(page.contains(&format!("id=\"{id}\"")), "#{id} in the page");
    }
    assert!(
        page.len() < 16 * 1024,
        "the page stays small: {}",
        page.len()
    );

    // Only GET.
    let (status, _) = call(gateway.internal, "POST", "/inspect", None, Some("{}")).await;
    assert_eq!(status, 405);
    // And only on the internal door.
    let (status, _) = call(gateway.addr, "GET", "/inspect", None, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn without_an_operator_key_every_endpoint_the_page_reads_answers_401() {
    let gateway = keyed(|_| {}).await;
    publish(&gateway, &full_run("run_k", "t_k")).await;
    let endpoints = [
        ("GET", "/v1/ledger?top=10"),
        ("GET", "/v1/runs?limit=20"),
        ("GET", "/v1/deadletter?limit=50"),
        ("GET", "/v1/threads/t_k/tail?since=0"),
        ("POST", "/v1/deadletter/redrive"),
    ];
    for (method, path) in endpoints {
        let body = (method == "POST").then_some("{}");
        for key in [None, Some(("authorization", "Bearer not-a-key-000000000"))] {
            let (status, answer) = call(gateway.internal, method, path, key, body).await;
            assert_eq!(status, 401, "{method} {path}: {answer}");
            assert!(!answer.to_string().contains("run_k"), "{answer}");
        }
        let (status, _) = call(gateway.internal, method, path, Some(AS_PRODUCER), body).await;
        assert_eq!(status, 403, "{method} {path} with a producer key");
    }
    for (method, path) in endpoints.iter().filter(|(_, p)| !p.contains("/tail")) {
        let body = (*method == "POST").then_some("{}");
        let (status, answer) = call(gateway.internal, method, path, Some(AS_OPERATOR), body).await;
        assert_eq!(status, 200, "{method} {path}: {answer}");
    }
}

#[tokio::test]
async fn runs_are_counted_by_state_and_the_most_recent_listed() {
    let gateway = keyed(|_| {}).await;
    publish(&gateway, &full_run("run_done", "t_runs")).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    publish(&gateway, &[event("agent_started", "run_open", "t_runs")]).await;

    let (status, list) = call(gateway.internal, "GET", "/v1/runs", Some(AS_OPERATOR), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list["counts"],
        json!({"unstarted": 0, "running": 1, "completed": 1, "errored": 0, "stalled": 0})
    );
    assert_eq!(list["followed"], 2);
    let ids: Vec<&str> = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["run_open", "run_done"], "most recently active first");
    assert_eq!(list["runs"][1]["state"], "completed");
    assert_eq!(list["runs"][1]["thread_id"], "t_runs");

    let (_, one) = call(
        gateway.internal,
        "GET",
        "/v1/runs?limit=1",
        Some(AS_OPERATOR),
        None,
    )
    .await;
    assert_eq!(one["runs"].as_array().unwrap().len(), 1);
    assert_eq!(one["runs"][0]["run_id"], "run_open");
    for bad in [
        "/v1/runs?limit=101",
        "/v1/runs?limit=-1",
        "/v1/runs?limit=x",
    ] {
        let (status, answer) = call(gateway.internal, "GET", bad, Some(AS_OPERATOR), None).await;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(answer["field"], "limit");
    }
    // The producers' `POST /v1/runs` is still theirs.
    let (status, _) = call(
        gateway.internal,
        "DELETE",
        "/v1/runs",
        Some(AS_OPERATOR),
        None,
    )
    .await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn the_ledger_names_the_busiest_channels_with_their_whole_line() {
    let gateway = keyed(|_| {}).await;
    let mut busy = full_run("run_busy", "t_busy");
    busy.extend(full_run("run_busy2", "t_busy"));
    publish(&gateway, &busy).await;
    // A channel with nothing pending or lost is listed too: busy is what it emitted.
    let mut viewer = gateway.client("u_quiet").await;
    viewer.subscribe("t_quiet", None).await;
    publish(&gateway, &full_run("run_quiet", "t_quiet")).await;
    viewer.events(5).await;
    for _ in 0..100 {
        let (_, channel) = call(
            gateway.internal,
            "GET",
            "/v1/channels/thread:t_quiet",
            Some(AS_OPERATOR),
            None,
        )
        .await;
        if channel["pending"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, ledger) = call(
        gateway.internal,
        "GET",
        "/v1/ledger?top=1",
        Some(AS_OPERATOR),
        None,
    )
    .await;
    assert_eq!(status, 200, "{ledger}");
    let busiest = ledger["busiest"].as_array().unwrap();
    assert_eq!(busiest.len(), 1, "top=1: {ledger}");
    let line = &busiest[0];
    assert_eq!(line["channel"], "thread:t_busy");
    assert_eq!(line["emitted"], 10);
    assert_eq!(
        (&line["delivered"], &line["pending"], &line["lost_total"]),
        (&json!(0), &json!(10), &json!(0)),
        "nobody subscribed: the events wait in history {line}"
    );
    assert_eq!(line["balanced"], true);
    let (_, all) = call(
        gateway.internal,
        "GET",
        "/v1/ledger",
        Some(AS_OPERATOR),
        None,
    )
    .await;
    let channels: Vec<&str> = all["busiest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["thread:t_busy", "thread:t_quiet"]);
    let quiet = &all["busiest"][1];
    assert_eq!(
        (&quiet["delivered"], &quiet["pending"]),
        (&json!(5), &json!(0))
    );
    assert!(
        all["top_pending"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["channel"] != "thread:t_quiet"),
        "{all}"
    );
}

#[tokio::test]
async fn the_page_s_redrive_delivers_a_dead_letter_once_its_run_is_known() {
    let gateway = keyed(|c| c.resolve.grace = Duration::from_millis(100)).await;
    publish(
        &gateway,
        &[json!({"type": "agent_thinking", "run_id": "run_late", "payload": {"n": 1}})],
    )
    .await;
    let mut count = json!(0);
    for _ in 0..200 {
        let (_, letters) = call(
            gateway.internal,
            "GET",
            "/v1/deadletter?limit=50",
            Some(AS_OPERATOR),
            None,
        )
        .await;
        count = letters["count"].clone();
        if count == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count, 1);
    let register = json!({"run_id": "run_late", "thread_id": "t_late"}).to_string();
    let (status, _) = call(
        gateway.internal,
        "POST",
        "/v1/runs",
        Some(AS_PRODUCER),
        Some(&register),
    )
    .await;
    assert_eq!(status, 200);
    // What the page sends: a JSON POST with the operator key.
    let (status, report) = call(
        gateway.internal,
        "POST",
        "/v1/deadletter/redrive",
        Some(AS_OPERATOR),
        Some("{}"),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["delivered"], 1, "{report}");
    let (_, letters) = call(
        gateway.internal,
        "GET",
        "/v1/deadletter",
        Some(AS_OPERATOR),
        None,
    )
    .await;
    assert_eq!(letters["count"], 0);
}

#[tokio::test]
async fn the_tail_streams_a_thread_s_history_and_live_events_to_an_operator() {
    let gateway = keyed(|_| {}).await;
    publish(&gateway, &[event("agent_started", "run_t", "t_tail")]).await;
    let mut tail = Stream::open(
        gateway.internal,
        "/v1/threads/t_tail/tail?since=0",
        &[AS_OPERATOR],
    )
    .await;
    let subscribed = tail.subscribed().await;
    assert_eq!(subscribed["channel"], "thread:t_tail");
    let first = tail.events(1).await;
    assert_eq!(first[0].json()["type"], "agent_started");
    assert_eq!(first[0].json()["seq"], 1);

    publish(
        &gateway,
        &[
            event("agent_thinking", "run_t", "t_tail"),
            event("agent_completed", "run_t", "t_tail"),
        ],
    )
    .await;
    let live = tail.events(2).await;
    let kinds: Vec<Value> = live.iter().map(|b| b.json()["type"].clone()).collect();
    assert_eq!(kinds, [json!("agent_thinking"), json!("agent_completed")]);
    assert_eq!(live[1].json()["seq"], 3);
    assert!(live[1].id.as_deref().unwrap().ends_with(":3"));

    // An operator watching is not a viewer: what the tail showed is still pending.
    let (_, channel) = call(
        gateway.internal,
        "GET",
        "/v1/channels/thread:t_tail",
        Some(AS_OPERATOR),
        None,
    )
    .await;
    assert_eq!(channel["delivered"], 0, "{channel}");
    assert_eq!(channel["pending"], 3, "{channel}");
    assert_eq!(channel["balanced"], true);

    for (path, field) in [
        ("/v1/threads/t_tail/tail?since=nope", "since"),
        ("/v1/threads/%FF/tail", "thread_id"),
    ] {
        let (status, answer) = call(gateway.internal, "GET", path, Some(AS_OPERATOR), None).await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert_eq!(answer["field"], field);
    }
    // Not on the public door.
    let (status, _) = call(gateway.addr, "GET", "/v1/threads/t_tail/tail", None, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn without_keys_the_loopback_host_rule_guards_the_new_endpoints() {
    let gateway = Gateway::start().await;
    let rebound = [("host", "inspector.attacker.example")];
    for path in ["/v1/runs", "/v1/threads/t_open/tail", "/v1/ledger"] {
        let (status, _) = http_with(gateway.internal, "GET", path, &rebound, None).await;
        assert_eq!(status, 401, "{path} asked for another name");
    }
    let (status, list) = gateway.get("/v1/runs").await;
    assert_eq!(status, 200, "{list}");
    // The page itself holds nothing: served whatever the name.
    let (status, _) = http_with(gateway.internal, "GET", "/inspect", &rebound, None).await;
    assert_eq!(status, 200);
}
