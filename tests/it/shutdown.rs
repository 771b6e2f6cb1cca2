//! Shutdown drains in the order events flow and counts what it cannot finish: events still held
//! for their run are dead-lettered (lost `unresolved`), and HLink messages already acknowledged to
//! their clients are POSTed to the webhook within a deadline, the rest counted `dropped_shutdown`.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use hyper::StatusCode;

use crate::support::{Gateway, Redis, binary, event, free_port, metric_value, wait_ready};

/// Two events for a run nobody registers (held), around three with their thread and one retry.
fn traffic() -> Vec<Value> {
    let started = json!({"type": "agent_started", "event_id": "e-1", "run_id": "run_a",
                         "thread_id": "t_shutdown", "payload": {}});
    let orphan = |n: u32| json!({"type": "agent_thinking", "run_id": "run_never_registered", "payload": {"n": n}});
    vec![
        started.clone(),
        event("agent_thinking", "run_a", "t_shutdown"),
        orphan(1),
        started,
        event("agent_completed", "run_a", "t_shutdown"),
        orphan(2),
    ]
}

#[tokio::test]
async fn events_held_for_their_run_are_dead_lettered_and_counted_at_shutdown() {
    let mut gateway = Gateway::start_with(|c| c.resolve.grace = Duration::from_secs(20)).await;
    gateway.publish(&traffic()).await;
    assert_eq!(
        gateway.metric("agentwire_events_pending_resolution").await,
        2.0
    );

    let stopped = gateway.shut_down().await;
    let counted = &stopped.metrics;
    let ingested = counted.events_ingested.get();
    let duplicates = counted.events_duplicate.get();
    let lost = counted.events_lost.with_label_values(&["unresolved"]).get();
    let (totals, _) = stopped.broker.totals(counted).await;
    let pending = stopped.resolver.pending_count() as u64;
    assert_eq!(
        (ingested, totals.emitted, pending, lost, duplicates),
        (6, 3, 0, 2, 1),
        "held events are dead-lettered, not left behind"
    );
    assert_eq!(ingested, totals.emitted + pending + lost + duplicates);
    assert_eq!(stopped.broker.dead_letter_count(), 2);
    let letters = stopped.broker.list_dead_letters(None, 10).await.unwrap();
    let page = serde_json::to_value(&letters.page).unwrap();
    assert!(
        page.to_string().contains("shutdown"),
        "the letters say why: {page}"
    );
}

/// The gateway as its own process, JSON logs on a pipe, SIGTERM: the held events are counted in
/// the log (the embedded broker's letters go with the process) and the books balance.
#[tokio::test]
async fn after_sigterm_the_log_accounts_for_every_held_event() {
    let (port, internal_port) = (free_port(), free_port());
    let child = binary()
        .env_clear()
        .env("AGENTWIRE_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "AGENTWIRE_INTERNAL_LISTEN",
            format!("127.0.0.1:{internal_port}"),
        )
        .env("AGENTWIRE_LEDGER__SNAPSHOT_INTERVAL", "0s")
        .env("AGENTWIRE_LOG_FORMAT", "json")
        .env("AGENTWIRE_RESOLVE__GRACE", "20s")
        .env("AGENTWIRE_SHUTDOWN__DRAIN_DELAY", "0s")
        .env("AGENTWIRE_SHUTDOWN__CLOSE_WINDOW", "0s")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let internal: std::net::SocketAddr = format!("127.0.0.1:{internal_port}").parse().unwrap();
    crate::support::wait_listening(internal).await;
    let body = Value::from(traffic()).to_string();
    let (status, _) = crate::support::http(
        internal,
        "POST",
        "/v1/events",
        Some(("application/json", &body)),
    )
    .await;
    assert_eq!(status, 200);
    let exposition = crate::support::http(internal, "GET", "/metrics", None)
        .await
        .1;
    let value = |series: &str| metric_value(&exposition, series) as u64;
    let (ingested, emitted, duplicates, lost_before, pending) = (
        value("agentwire_events_ingested_total"),
        value("agentwire_events_emitted_total"),
        value("agentwire_events_duplicate_total"),
        value("agentwire_events_lost_total{reason=\"unresolved\"}"),
        value("agentwire_events_pending_resolution"),
    );
    assert_eq!((ingested, pending), (6, 2));

    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Shutdown: events still waiting for their run"))
        })
        .unwrap_or_else(|| panic!("no shutdown dead-letter line in:\n{stderr}"));
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .contains("gone with the process"),
        "{line}"
    );
    let dead_lettered = line["events"].as_u64().unwrap();
    assert_eq!(dead_lettered, 2, "{line}");
    assert_eq!(
        ingested,
        emitted + (lost_before + dead_lettered) + duplicates,
        "0 uncounted across the shutdown"
    );
}

/// A webhook that takes `delay` to answer each request; records the bodies it answered.
async fn slow_webhook(delay: Duration) -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hlink", listener.local_addr().unwrap());
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let bodies = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let bodies = Arc::clone(&bodies);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let bodies = Arc::clone(&bodies);
                    async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        tokio::time::sleep(delay).await;
                        bodies
                            .lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).unwrap());
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, received)
}

#[tokio::test]
async fn queued_hlink_messages_drain_to_a_slow_webhook_and_the_rest_are_counted() {
    const SENT: u64 = 10;
    let (url, received) = slow_webhook(Duration::from_millis(250)).await;
    let mut gateway = Gateway::start_with(|c| c.upstream.webhook_url = Some(url)).await;
    let mut client = gateway.client("u_hlink").await;
    for n in 0..SENT {
        client
            .send(json!({"type": "user_message", "id": format!("m-{n}"),
                         "sender": {"agent_id": "browser", "role": "user"},
                         "recipient": {"target": "agent"}, "payload": {"n": n}}))
            .await;
    }
    for _ in 0..SENT {
        assert_eq!(client.recv().await["type"], "websocket_ack");
    }
    drop(client);

    let stopped = gateway.shut_down().await;
    let outcome = |label: &str| {
        stopped
            .metrics
            .upstream_messages
            .with_label_values(&[label])
            .get()
    };
    let (delivered, dropped) = (outcome("delivered"), outcome("dropped_shutdown"));
    let answered = received.lock().unwrap().len() as u64;
    assert_eq!(
        delivered + dropped + outcome("failed"),
        SENT,
        "every acknowledged message is delivered or counted (delivered {delivered}, dropped {dropped})"
    );
    assert!(
        dropped > 0,
        "a 250 ms webhook cannot take 10 within the 1 s drain"
    );
    assert!(
        delivered >= 2,
        "the queue drains to the webhook during shutdown: {delivered}"
    );
    assert!(
        answered >= delivered,
        "{answered} answered, {delivered} counted"
    );
}

/// Redis mode: a registration announced by another replica releases the events held here, and
/// Redis stops taking writes (`CLIENT PAUSE … WRITE`, sent in the same write as the announcement,
/// so it applies before the first publish): the release waits on its first publish when the
/// shutdown's bounds pass. Every held event must still be counted, dead-lettered by
/// `dead_letter_held` (the one being published included), none left in a release's hands.
#[tokio::test]
async fn a_release_cut_at_shutdown_leaves_no_held_event_uncounted() {
    const HELD: u64 = 20;
    let redis = Redis::start().await;
    let url = redis.url();
    let mut gateway = Gateway::start_with(|c| {
        c.broker.redis_url = Some(url);
        c.resolve.grace = Duration::from_secs(60);
    })
    .await;
    wait_ready(gateway.internal, StatusCode::OK).await;
    let held: Vec<Value> = (0..HELD)
        .map(|n| json!({"type": "agent_thinking", "run_id": "run_cut", "payload": {"n": n}}))
        .collect();
    gateway.publish(&held).await;
    assert_eq!(
        gateway.metric("agentwire_events_pending_resolution").await,
        HELD as f64
    );

    let target = json!({"thread_id": "t_cut", "user_id": null, "channel": "thread:t_cut"});
    let () = redis::pipe()
        .cmd("PUBLISH")
        .arg("aw:registered")
        .arg(format!("run_cut\n{target}"))
        .ignore()
        .cmd("CLIENT")
        .arg("PAUSE")
        .arg(30_000)
        .arg("WRITE")
        .ignore()
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    // The release has begun, and waits on Redis.
    let resolver = &gateway.inner.as_ref().unwrap().resolver;
    let deadline = std::time::Instant::now() + crate::support::WAIT;
    while !resolver.is_waiting("run_cut") {
        assert!(std::time::Instant::now() < deadline, "no release began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(resolver.is_waiting("run_cut"), "the release is under way");

    let stopped = gateway.shut_down().await;
    let counted = &stopped.metrics;
    let ingested = counted.events_ingested.get();
    let duplicates = counted.events_duplicate.get();
    let lost = counted.events_lost.with_label_values(&["unresolved"]).get();
    let internal = counted.events_lost.with_label_values(&["internal"]).get();
    let pending = stopped.resolver.pending_count() as u64;
    let emitted = stopped.broker.totals(counted).await.0.emitted;
    assert_eq!(ingested, HELD);
    assert_eq!(
        ingested,
        emitted + pending + lost + internal + duplicates,
        "0 uncounted: emitted {emitted}, pending {pending}, lost {lost}, internal {internal}, duplicates {duplicates}"
    );
    assert_eq!(pending, 0);
}
