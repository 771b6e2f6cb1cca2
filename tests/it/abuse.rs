//! The abuse suite: each attack of a hostile client or producer, at a small scale, against a gateway
//! with small budgets. Every test checks what the attack did not get (no state held past the budget,
//! nothing delivered for it) and that a legitimate client beside the attacker still gets its events,
//! with every refusal counted.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::support::{Client, Gateway, assert_lines, event, http};

/// Opens `/ws` by hand and returns the stream right after the handshake, to send raw frames.
async fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// Reads an HTTP response head, byte by byte so nothing after it is consumed.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(Duration::from_secs(10), stream.read_u8())
            .await
            .expect("a response in time")
            .unwrap();
        head.push(byte);
    }
    String::from_utf8(head).unwrap()
}

/// The header of a masked client text frame claiming `length` bytes (mask 0, so bytes go as they are).
fn frame_header(length: u16) -> Vec<u8> {
    let mut header = vec![0x81, 0x80 | 126];
    header.extend_from_slice(&length.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    header
}

/// Reads until the server's close frame and returns its code; `None` if the stream ends first.
async fn close_code(stream: &mut TcpStream) -> Option<u16> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("a close in time")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        bytes.extend_from_slice(&buf[..n]);
        // Server frames are unmasked; walk them to the close frame.
        let mut at = 0;
        while at + 2 <= bytes.len() {
            let (opcode, len) = (bytes[at] & 0x0F, usize::from(bytes[at + 1] & 0x7F));
            let (len, header) = match len {
                126 if at + 4 <= bytes.len() => (
                    usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])),
                    4,
                ),
                126 | 127 => break,
                n => (n, 2),
            };
            if at + header + len > bytes.len() {
                break;
            }
            if opcode == 0x8 {
                let payload = &bytes[at + header..at + header + len];
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
            at += header + len;
        }
    }
}

/// A legitimate client subscribed to `thread`, and a check that it still gets a fresh run.
async fn bystander(gateway: &Gateway, thread: &str) -> Client {
    let mut client = Client::hello(gateway.addr, "u_bystander").await;
    client.subscribe(thread, None).await;
    client
}

async fn still_served(gateway: &Gateway, client: &mut Client, thread: &str, run: &str) {
    gateway
        .publish(&[event("agent_started", run, thread)])
        .await;
    let got = client.recv().await;
    assert_eq!(got["run_id"], run, "{got}");
}

async fn upgrade_status(addr: SocketAddr, forwarded_for: Option<&str>) -> u16 {
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(forwarded) = forwarded_for {
        request
            .headers_mut()
            .insert("x-forwarded-for", HeaderValue::from_str(forwarded).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, response)) => {
            // Held open for the rest of the test.
            std::mem::forget(ws);
            response.status().as_u16()
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test]
async fn one_address_cannot_hold_more_connections_than_its_share() {
    let gateway = Gateway::start_with(|c| c.session.max_connections_per_ip = 3).await;
    let mut first = bystander(&gateway, "t_share").await;
    assert_eq!(upgrade_status(gateway.addr, None).await, 101);
    assert_eq!(upgrade_status(gateway.addr, None).await, 101);
    assert_eq!(upgrade_status(gateway.addr, None).await, 503);
    assert_lines(
        &gateway.metrics().await,
        &[
            "agentwire_upgrades_refused_total{reason=\"connections_per_ip\"} 1",
            "agentwire_connections 3",
        ],
    );
    still_served(&gateway, &mut first, "t_share", "run_share").await;
    // A connection that ends gives its place back.
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upgrade_status(gateway.addr, None).await, 101);
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_share() {
    let gateway = Gateway::start_with(|c| {
        c.session.max_connections_per_ip = 1;
        c.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    assert_eq!(
        upgrade_status(gateway.addr, Some("198.51.100.1")).await,
        101
    );
    assert_eq!(
        upgrade_status(gateway.addr, Some("198.51.100.2")).await,
        101
    );
    assert_eq!(
        upgrade_status(gateway.addr, Some("6.6.6.6, 198.51.100.1")).await,
        503,
        "what the client wrote left of the proxy's entry does not count"
    );
}

#[tokio::test]
async fn the_process_holds_at_most_max_connections() {
    let gateway = Gateway::start_with(|c| c.session.max_connections = 2).await;
    let mut first = bystander(&gateway, "t_global").await;
    assert_eq!(upgrade_status(gateway.addr, None).await, 101);
    assert_eq!(upgrade_status(gateway.addr, None).await, 503);
    assert_lines(
        &gateway.metrics().await,
        &["agentwire_upgrades_refused_total{reason=\"connections\"} 1"],
    );
    still_served(&gateway, &mut first, "t_global", "run_global").await;
}

#[tokio::test]
async fn before_hello_a_message_is_small() {
    let gateway = Gateway::start().await;
    let mut stream = raw_ws(gateway.addr).await;
    stream.write_all(&frame_header(5000)).await.unwrap();
    assert_eq!(close_code(&mut stream).await, Some(1009));
    assert_lines(
        &gateway.metrics().await,
        &["agentwire_connections_closed_total{reason=\"too_large\"} 1"],
    );
}

#[tokio::test]
async fn a_trickled_frame_is_cut_at_the_frame_timeout() {
    let gateway = Gateway::start_with(|c| c.session.frame_timeout = Duration::from_secs(1)).await;
    let mut client = bystander(&gateway, "t_trickle").await;
    let mut stream = raw_ws(gateway.addr).await;
    stream.write_all(&frame_header(3000)).await.unwrap();
    let started = std::time::Instant::now();
    // One byte every 200 ms keeps the socket busy, which used to defeat `client_timeout`.
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if stream.write_all(b" ").await.is_err() {
                return;
            }
            if started.elapsed() > Duration::from_secs(5) {
                return;
            }
        }
    };
    trickle.await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut after the timeout"
    );
    assert_lines(
        &gateway.metrics().await,
        &["agentwire_connections_closed_total{reason=\"frame_timeout\"} 1"],
    );
    still_served(&gateway, &mut client, "t_trickle", "run_trickle").await;
}

#[tokio::test]
async fn a_flood_of_messages_is_rate_limited() {
    let gateway = Gateway::start_with(|c| {
        c.session.message_rate = 5;
        c.session.message_burst = 5;
    })
    .await;
    let mut client = bystander(&gateway, "t_flood").await;
    let mut flooder = Client::hello(gateway.addr, "u_flood").await;
    for _ in 0..20 {
        flooder.send(json!({"type": "ping"})).await;
    }
    let (frames, code) = flooder.until_closed().await;
    assert!(
        frames.iter().any(|f| f["code"] == "rate_limited"),
        "a rate_limited error frame before the close: {frames:?}"
    );
    assert!(frames.iter().filter(|f| f["type"] == "pong").count() <= 5);
    assert_eq!(code, 4029);
    assert_lines(
        &gateway.metrics().await,
        &["agentwire_connections_closed_total{reason=\"rate_limited\"} 1"],
    );
    still_served(&gateway, &mut client, "t_flood", "run_flood").await;
}

/// Sends a request head with `Content-Length: length` and returns the stream, for a body sent by hand.
async fn start_post(addr: SocketAddr, length: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// A kept-alive connection whose next request's headers trickle is closed 30 s after its previous
/// answer (the header read timeout, on the connection's one timer, `server/header_timer.rs`), however
/// often a byte arrives.
#[tokio::test]
async fn headers_that_trickle_are_cut_at_the_header_timeout() {
    let gateway = Gateway::start().await;
    let mut stream = TcpStream::connect(gateway.internal).await.unwrap();
    let first = format!("GET /readyz HTTP/1.1\r\nHost: {}\r\n\r\n", gateway.internal);
    stream.write_all(first.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let answered = std::time::Instant::now();
    let length: usize = (head.lines())
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .and_then(|length| length.trim().parse().ok())
        .expect("a content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    stream
        .write_all(b"POST /v1/events HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let closed = loop {
        tokio::select! {
            read = stream.read(&mut buf) => break read.unwrap_or(0),
            () = tokio::time::sleep(Duration::from_secs(3)) => {
                assert!(answered.elapsed() < Duration::from_secs(45), "still open");
                if stream.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    break 0;
                }
            }
        }
    };
    assert_eq!(closed, 0, "no answer, the connection closed");
    let after = answered.elapsed();
    assert!(
        (Duration::from_secs(29)..Duration::from_secs(40)).contains(&after),
        "closed {after:?} after the previous answer"
    );
}

#[tokio::test]
async fn a_trickling_body_is_cut_with_408() {
    let gateway = Gateway::start_with(|c| c.ingest.min_upload_rate = 1000).await;
    let body = json!([event("agent_started", "run_slow", "t_slow")]).to_string();
    let mut stream = start_post(gateway.internal, body.len() + 10_000).await;
    let started = std::time::Instant::now();
    stream.write_all(body.as_bytes()).await.unwrap();
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_lines(
        &gateway.metrics().await,
        &[
            "agentwire_events_rejected_total{reason=\"too_slow_body\"} 1",
            "agentwire_events_ingested_total 0",
        ],
    );
}

#[tokio::test]
async fn bodies_in_flight_share_one_byte_budget() {
    let gateway = Gateway::start_with(|c| {
        c.ingest.max_request_bytes = 20_000;
        c.ingest.max_event_bytes = 20_000;
        c.ingest.max_inflight_bytes = 30_000;
    })
    .await;
    let mut client = bystander(&gateway, "t_budget").await;
    // One producer holds 20,000 bytes of the 30,000 by declaring them and sending slowly.
    let mut holder = start_post(gateway.internal, 20_000).await;
    holder.write_all(b"[").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let big = json!([event("agent_started", "run_big", "t_budget")]).to_string();
    let padded = format!("{big:<15000}");
    let (status, text) = http(
        gateway.internal,
        "POST",
        "/v1/events",
        Some(("application/json", &padded)),
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("ingest_busy"), "{text}");
    client.silent_for(Duration::from_millis(300)).await;
    // A small one still fits beside the holder.
    still_served(&gateway, &mut client, "t_budget", "run_small").await;
    drop(holder);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, text) = http(
        gateway.internal,
        "POST",
        "/v1/events",
        Some(("application/json", &padded)),
    )
    .await;
    assert_eq!(status, 200, "the budget came back: {text}");
    assert_lines(
        &gateway.metrics().await,
        &["agentwire_events_rejected_total{reason=\"ingest_busy\"} 1"],
    );
}

#[tokio::test]
async fn one_address_has_a_bounded_number_of_requests_in_flight() {
    let gateway = Gateway::start_with(|c| c.ingest.max_requests_per_ip = 1).await;
    let mut holder = start_post(gateway.internal, 100).await;
    holder.write_all(b"[").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, text) = http(gateway.internal, "GET", "/v1/ledger", None).await;
    assert_eq!(status, 429, "{text}");
    assert_eq!(
        http(gateway.internal, "GET", "/metrics", None).await.0,
        200,
        "probes are not capped"
    );
    drop(holder);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        http(gateway.internal, "GET", "/v1/ledger", None).await.0,
        200
    );
    assert_lines(
        &gateway.metrics().await,
        &["agentwire_api_refused_total{reason=\"too_many_requests\"} 1"],
    );
}

/// An event of about `bytes` bytes.
fn heavy(run: &str, thread: &str, bytes: usize) -> serde_json::Value {
    let mut event = event("agent_thinking", run, thread);
    event["payload"] = json!({"text": "x".repeat(bytes)});
    event
}

#[tokio::test]
async fn one_channels_history_holds_at_most_its_bytes() {
    let gateway = Gateway::start_with(|c| {
        c.ingest.max_event_bytes = 60_000;
        c.history.max_bytes_per_channel = 200_000;
    })
    .await;
    for n in 0..10 {
        gateway
            .publish(&[heavy(&format!("run_h{n}"), "t_heavy", 50_000)])
            .await;
    }
    let metrics = gateway.metrics().await;
    let held = crate::support::metric_value(&metrics, "agentwire_history_bytes");
    assert!(held <= 200_000.0, "history holds {held} bytes");
    let channel = gateway.channel("thread:t_heavy").await;
    assert_eq!(channel["retained"], 3, "{channel}");
    assert_eq!(channel["lost"]["expired_unseen"], 7, "{channel}");
    assert_eq!(channel["balanced"], true, "{channel}");
}

#[tokio::test]
async fn all_history_holds_at_most_max_bytes_and_the_least_recently_active_go_first() {
    let gateway = Gateway::start_with(|c| {
        c.ingest.max_event_bytes = 60_000;
        c.history.max_bytes_per_channel = 300_000;
        c.history.max_bytes = 1_000_000;
    })
    .await;
    let mut client = bystander(&gateway, "t_watched").await;
    // An attacker fills history across many threads: 5 MB into a 1 MB budget.
    for n in 0..100 {
        gateway
            .publish(&[heavy(
                &format!("run_a{n}"),
                &format!("t_attack{}", n % 20),
                50_000,
            )])
            .await;
    }
    let metrics = gateway.metrics().await;
    let held = crate::support::metric_value(&metrics, "agentwire_history_bytes");
    assert!(held <= 1_000_000.0, "history holds {held} bytes");
    let evicted = crate::support::metric_value(&metrics, "agentwire_history_evicted_total");
    assert!(evicted >= 80.0, "evicted {evicted}");
    // The first threads were the least recently active: their history is gone, the last ones kept.
    assert_eq!(gateway.channel("thread:t_attack0").await["retained"], 0);
    assert!(gateway.channel("thread:t_attack19").await["retained"].as_u64() > Some(0));
    let (_, ledger) = gateway.get("/v1/ledger").await;
    assert_eq!(ledger["channels"]["balanced"], true, "{ledger}");
    // The client watching its own thread still gets its events, live.
    still_served(&gateway, &mut client, "t_watched", "run_watched").await;
}

const ALICE: &str = "producer-key-alice-0001";
const MALLORY: &str = "producer-key-mallory-01";
const OPERATOR: &str = "operator-key-abuse-00001";

/// Posts `events` with a producer key; the answer's item statuses.
async fn post_as(gateway: &Gateway, key: &str, events: &[serde_json::Value]) -> Vec<String> {
    let bearer = format!("Bearer {key}");
    let (_, text) = crate::support::http_with(
        gateway.internal,
        "POST",
        "/v1/events",
        &[("authorization", &bearer)],
        Some((
            "application/json",
            &serde_json::Value::from(events.to_vec()).to_string(),
        )),
    )
    .await;
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    body["results"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .map(|r| {
            let status = r["status"].as_str().unwrap_or_default();
            match r["reason"].as_str() {
                Some(reason) => format!("{status}:{reason}"),
                None => status.to_string(),
            }
        })
        .collect()
}

async fn operator_get(gateway: &Gateway, path: &str) -> serde_json::Value {
    let bearer = format!("Bearer {OPERATOR}");
    let (status, text) = crate::support::http_with(
        gateway.internal,
        "GET",
        path,
        &[("authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// An event for a run nobody registered, `bytes` large and shaped to parse into many objects.
fn unknown_run(run: &str, bytes: usize) -> serde_json::Value {
    let mut event = json!({"type": "agent_thinking", "run_id": run});
    event["payload"] = json!({"x": serde_json::from_str::<serde_json::Value>(
        &format!("[{}]", vec!["{}"; bytes / 3].join(","))
    ).unwrap()});
    event
}

#[tokio::test]
async fn one_producers_flood_of_unknown_runs_cannot_push_anothers_early_events_out() {
    let gateway = Gateway::start_with(|c| {
        c.auth.producer_keys = vec![ALICE.into(), MALLORY.into()];
        c.auth.operator_keys = vec![OPERATOR.into()];
        c.resolve.max_pending = 100;
        c.resolve.grace = Duration::from_secs(30);
    })
    .await;
    let mut client = bystander(&gateway, "t_alice").await;
    // Mallory floods: 100 events for runs that never register, in one request.
    let flood: Vec<_> = (0..100)
        .map(|n| unknown_run(&format!("run_m{n}"), 30))
        .collect();
    let statuses = post_as(&gateway, MALLORY, &flood).await;
    let held = statuses
        .iter()
        .filter(|s| *s == "pending_resolution")
        .count();
    assert_eq!(held, 50, "Mallory holds its share, no more: {statuses:?}");
    assert!(statuses.contains(&"unresolved:producer_share_full".to_string()));
    // Alice's early event still waits for its run, and is delivered when the run registers.
    let early = json!({"type": "agent_thinking", "run_id": "run_alice", "payload": {"n": 1}});
    assert_eq!(
        post_as(&gateway, ALICE, &[early]).await,
        ["pending_resolution"]
    );
    let register = json!({"run_id": "run_alice", "thread_id": "t_alice"}).to_string();
    let bearer = format!("Bearer {ALICE}");
    let (status, text) = crate::support::http_with(
        gateway.internal,
        "POST",
        "/v1/runs",
        &[("authorization", &bearer)],
        Some(("application/json", &register)),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let got = client.recv().await;
    assert_eq!(
        (&got["run_id"], &got["payload"]["n"]),
        (&json!("run_alice"), &json!(1))
    );
    assert_lines(
        &gateway.metrics().await,
        &[
            "agentwire_pending_refused_total{reason=\"producer_share\"} 50",
            "agentwire_events_pending_resolution 50",
        ],
    );
}

#[tokio::test]
async fn held_and_dead_letters_weigh_what_was_sent_and_stay_within_their_bytes() {
    let gateway = Gateway::start_with(|c| {
        c.auth.operator_keys = vec![OPERATOR.into()];
        c.auth.producer_keys = vec![MALLORY.into()];
        c.ingest.max_event_bytes = 60_000;
        c.resolve.max_pending_bytes = 1_000_000;
        c.resolve.run_share_percent = 100;
        c.resolve.producer_share_percent = 100;
        c.resolve.grace = Duration::from_secs(2);
        c.deadletter.max_bytes = 600_000;
    })
    .await;
    // 40 events of 55 KB that parse into 18,000 objects each: 2.2 MB into a 1 MB pending set.
    for n in 0..40 {
        let statuses = post_as(
            &gateway,
            MALLORY,
            &[unknown_run(&format!("run_u{n}"), 55_000)],
        )
        .await;
        assert_ne!(statuses[0], "error", "{statuses:?}");
    }
    let metrics = gateway.metrics().await;
    let pending =
        crate::support::metric_value(&metrics, "agentwire_events_pending_resolution_bytes");
    assert!(pending <= 1_000_000.0, "pending weighs {pending}");
    let held = crate::support::metric_value(&metrics, "agentwire_events_pending_resolution");
    let weight = pending / held;
    assert!(
        (55_000.0..57_000.0).contains(&weight),
        "each is kept as its text (55 KB), not its parsed tree: {weight}"
    );
    assert!(
        crate::support::metric_value(&metrics, "agentwire_pending_refused_total{reason=\"full\"}")
            > 0.0
    );
    // After the grace they are letters, within deadletter.max_bytes; the oldest were dropped.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let metrics = gateway.metrics().await;
    let kept = crate::support::metric_value(&metrics, "agentwire_deadletter_events");
    assert!(kept <= 11.0, "600 KB hold 10 letters of 55 KB: {kept}");
    let dropped = crate::support::metric_value(&metrics, "agentwire_deadletters_dropped_total");
    assert_eq!(
        kept + dropped,
        40.0,
        "every letter is kept or counted dropped"
    );
    assert_lines(
        &metrics,
        &["agentwire_events_lost_total{reason=\"unresolved\"} 40"],
    );
}

#[tokio::test]
async fn dead_letters_are_listed_page_by_page() {
    let gateway = Gateway::start_with(|c| {
        c.auth.operator_keys = vec![OPERATOR.into()];
        c.auth.producer_keys = vec![MALLORY.into()];
        c.resolve.grace = Duration::from_millis(200);
        c.resolve.run_share_percent = 100;
        c.resolve.producer_share_percent = 100;
    })
    .await;
    let events: Vec<_> = (0..250)
        .map(|n| unknown_run(&format!("run_p{n}"), 10))
        .collect();
    post_as(&gateway, MALLORY, &events).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut seen = Vec::new();
    let mut path = "/v1/deadletter".to_string();
    loop {
        let page = operator_get(&gateway, &path).await;
        assert_eq!(page["count"], 250);
        let events = page["events"].as_array().unwrap();
        assert!(events.len() <= 100);
        seen.extend(
            events
                .iter()
                .map(|e| e["run_id"].as_str().unwrap().to_string()),
        );
        match page["next"].as_u64() {
            Some(next) => path = format!("/v1/deadletter?after={next}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 250);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 250, "every letter once");
    let small = operator_get(&gateway, "/v1/deadletter?limit=7").await;
    assert_eq!(small["events"].as_array().unwrap().len(), 7);
    let bearer = format!("Bearer {OPERATOR}");
    let (status, text) = crate::support::http_with(
        gateway.internal,
        "GET",
        "/v1/deadletter?limit=100000",
        &[("authorization", &bearer)],
        None,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("\"field\":\"limit\""), "{text}");
}

/// `agentwire bench abuse` cannot rot: every attack runs at a tiny scale against a gateway with
/// small budgets, the legitimate client beside the attacker gets every one of its events, and the
/// budgets the attacks reach say so in the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_abuse_bench_runs_every_attack_and_the_legitimate_client_gets_everything() {
    let gateway = Gateway::start_with(|c| {
        c.session.max_connections_per_ip = 50;
        c.ingest.max_requests_per_ip = 4;
        c.resolve.grace = Duration::from_millis(300);
    })
    .await;
    let (url, api) = (
        format!("http://{}", gateway.addr),
        format!("http://{}", gateway.internal),
    );
    let result = crate::support::bench(&[
        "bench",
        "--url",
        &url,
        "--api-url",
        &api,
        "--sources",
        "4",
        "abuse",
        "--scale",
        "0.02",
    ])
    .await;
    let attacks = result["attacks"].as_array().unwrap();
    let names: Vec<&str> = attacks.iter().filter_map(|a| a["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "history",
            "unknown-run",
            "open-tools",
            "connections",
            "slow-bodies",
            "run-flood",
            "ledger-loop"
        ]
    );
    for attack in attacks {
        assert_eq!(attack["legit"]["missing"], 0, "{attack}");
        assert!(attack["legit"]["sent"].as_u64() > Some(0), "{attack}");
        assert!(
            attack["server_rss_after_mib"].as_f64() > Some(0.0),
            "{attack}"
        );
    }
    let refused = |name: &str, series: &str| {
        attacks.iter().find(|a| a["name"] == name).unwrap()["refusals"][series]
            .as_f64()
            .unwrap_or(0.0)
    };
    // 160 connections from one address against a share of 50.
    assert_eq!(
        refused(
            "connections",
            "agentwire_upgrades_refused_total{reason=\"connections_per_ip\"}"
        ),
        110.0
    );
    assert!(
        refused(
            "slow-bodies",
            "agentwire_api_refused_total{reason=\"too_many_requests\"}"
        ) > 0.0
    );
    assert_eq!(
        refused(
            "unknown-run",
            "agentwire_events_lost_total{reason=\"unresolved\"}"
        ),
        40.0
    );
    let unknown = &attacks[1]["attack"]["deadletter"];
    assert_eq!(unknown["status"], 200, "{unknown}");
}
