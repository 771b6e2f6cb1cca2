//! Native event streams bound to one run (`POST /v1/runs/{run_id}/events`), over real sockets:
//! each event published as it arrives with its run and thread filled in, refusals that stop
//! neither the stream nor the events beside them, and a run closed when its stream ends open.

use std::time::Duration;

use hyper::StatusCode;
use serde_json::{Value, json};

use crate::support::{Gateway, Streaming, assert_lines, http_with};

const NDJSON: &str = "application/x-ndjson";

fn types(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f["type"].as_str().unwrap_or("?"))
        .collect()
}

#[tokio::test]
async fn events_are_published_as_they_arrive_with_their_run_and_thread_filled_in() {
    let gateway = Gateway::start().await;
    let mut viewer = gateway.viewer("u1", "t_ns").await;
    let stream = Streaming::open(&gateway, "/v1/runs/r_ns/events?thread_id=t_ns", NDJSON).await;
    stream.line(json!({"type": "agent_started"})).await;
    let frame = viewer.recv().await;
    assert_eq!(
        (&frame["type"], &frame["run_id"], &frame["thread_id"]),
        (&json!("agent_started"), &json!("r_ns"), &json!("t_ns")),
        "{frame}"
    );
    // A token split across two chunks, with a pause between them; its payload as written.
    stream
        .send(r#"{"type":"agent_thinking","payload":{"delta":"Hel"#)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.send("lo\",  \"n\": 1.50}}\n").await;
    let frame = viewer.recv().await;
    assert_eq!(frame["type"], "agent_thinking", "{frame}");
    assert_eq!(frame["payload"], json!({"delta": "Hello", "n": 1.50}));
    stream
        .line(json!({"type": "agent_completed", "run_id": "r_ns", "payload": {}}))
        .await;
    assert_eq!(types(&viewer.events(1).await), ["agent_completed"]);
    let (status, summary) = stream.finish().await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(
        summary,
        json!({"run_id": "r_ns", "thread_id": "t_ns", "accepted": 3, "pending_resolution": 0,
               "duplicates": 0, "failed": 0, "errors": [], "ended": "end", "closed": null})
    );
    // A run that ended is not closed again.
    viewer.silent_for(Duration::from_millis(200)).await;
    assert_eq!(gateway.channel("thread:t_ns").await["emitted"], 3);
}

#[tokio::test]
async fn a_stream_that_ends_mid_run_closes_the_run_for_every_viewer() {
    let gateway = Gateway::start().await;
    let mut first = gateway.viewer("u1", "t_nx").await;
    let mut second = gateway.viewer("u2", "t_nx").await;
    // No `?thread_id=`: the run's start names its thread, which the closing event then carries.
    let stream = Streaming::open(&gateway, "/v1/runs/r_nx/events", NDJSON).await;
    stream
        .line(json!({"type": "agent_started", "thread_id": "t_nx"}))
        .await;
    stream
        .line(json!({"type": "tool_executing", "payload": {"tool_call_id": "c1"}}))
        .await;
    let (status, summary) = stream.finish().await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(
        (&summary["closed"], &summary["thread_id"]),
        (&json!("agent_stream_ended"), &json!("t_nx")),
        "{summary}"
    );
    for viewer in [&mut first, &mut second] {
        let frames = viewer.events(3).await;
        assert_eq!(
            types(&frames),
            ["agent_started", "tool_executing", "agent_error"]
        );
        let error = &frames[2];
        assert_eq!(
            (&error["run_id"], &error["thread_id"]),
            (&json!("r_nx"), &json!("t_nx"))
        );
        assert_eq!(error["payload"]["reason"], "agent_stream_ended", "{error}");
        assert_eq!(error["payload"]["source"], "agentwire");
        // The tool call the run left open is named, as in the watchdog's stall notice.
        assert_eq!(
            (
                &error["payload"]["open_tools"],
                &error["payload"]["open_tool_ids"]
            ),
            (&json!(1), &json!(["c1"])),
            "{error}"
        );
    }
    assert_lines(
        &gateway.metrics().await,
        &[
            r#"agentwire_runs_closed_total{reason="agent_stream_ended"} 1"#,
            "agentwire_run_streams 0",
            // The producer's two events; the close is the gateway's own.
            "agentwire_events_ingested_total 2",
            "agentwire_events_generated_total 1",
        ],
    );
    // The watchdog saw the run end: nothing is left running to stall later.
    let (status, runs) = http_with(gateway.internal, "GET", "/v1/runs", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    let runs: Value = serde_json::from_str(&runs).unwrap();
    assert_eq!(
        (&runs["counts"]["running"], &runs["runs"][0]["state"]),
        (&json!(0), &json!("errored")),
        "{runs}"
    );
    assert_eq!(gateway.channel("thread:t_nx").await["emitted"], 3);
}

#[tokio::test]
async fn a_silent_or_abandoned_stream_closes_its_run() {
    let gateway =
        Gateway::start_with(|c| c.ingest.stream_idle_timeout = Duration::from_millis(300)).await;
    let mut viewer = gateway.viewer("u1", "t_nq").await;
    let silent = Streaming::open(&gateway, "/v1/runs/r_nq/events?thread_id=t_nq", NDJSON).await;
    silent.line(json!({"type": "agent_started"})).await;
    let frames = viewer.events(2).await;
    assert_eq!(
        frames[1]["payload"]["reason"], "agent_stalled",
        "{}",
        frames[1]
    );
    let (status, summary) = silent.answer().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&summary["ended"], &summary["closed"]),
        (&json!("idle_timeout"), &json!("agent_stalled"))
    );

    let gone = Streaming::open(&gateway, "/v1/runs/r_ng/events?thread_id=t_nq", NDJSON).await;
    gone.line(json!({"type": "agent_started"})).await;
    assert_eq!(types(&viewer.events(1).await), ["agent_started"]);
    gone.connection.abort();
    let frame = viewer.recv().await;
    assert_eq!(
        (
            &frame["type"],
            &frame["run_id"],
            &frame["payload"]["reason"]
        ),
        (
            &json!("agent_error"),
            &json!("r_ng"),
            &json!("agent_stream_ended")
        ),
        "{frame}"
    );
}

#[tokio::test]
async fn refused_lines_are_answered_with_their_line_and_stop_nothing_beside_them() {
    let gateway = Gateway::start_with(|c| c.ingest.max_event_bytes = 1024).await;
    let mut viewer = gateway.viewer("u1", "t_nr").await;
    let stream = Streaming::open(&gateway, "/v1/runs/r_nr/events?thread_id=t_nr", NDJSON).await;
    stream.line(json!({"type": "agent_started"})).await;
    // Another run, an AG-UI event, too long, not JSON, a key twice, a tool without its id.
    stream
        .line(json!({"type": "agent_thinking", "run_id": "r_other"}))
        .await;
    stream
        .line(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "x"}))
        .await;
    let long = "x".repeat(4096);
    stream
        .line(json!({"type": "agent_thinking", "payload": {"delta": long}}))
        .await;
    stream.send("{not json\n").await;
    stream
        .send("{\"type\":\"agent_thinking\",\"run_id\":\"r_nr\",\"run_id\":\"r_nr\"}\n")
        .await;
    stream.line(json!({"type": "tool_executing"})).await;
    stream
        .line(json!({"type": "agent_thinking", "payload": {"delta": "ok"}}))
        .await;
    stream.line(json!({"type": "agent_completed"})).await;
    let (status, summary) = stream.finish().await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(
        (&summary["accepted"], &summary["failed"]),
        (&json!(3), &json!(6))
    );
    let refused: Vec<(u64, &str, &str)> = summary["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["code"].as_str().unwrap(),
                e["field"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [
            (2, "invalid_field", "run_id"),
            (3, "invalid_field", "type"),
            (4, "too_large", ""),
            (5, "invalid_json", ""),
            (6, "invalid_json", "run_id"),
            (7, "missing_field", "payload.tool_call_id"),
        ]
    );
    // Only the valid events reached the viewer, in order, and the run ended by itself.
    let frames = viewer.events(3).await;
    assert_eq!(
        types(&frames),
        ["agent_started", "agent_thinking", "agent_completed"]
    );
    assert_eq!(frames[1]["payload"]["delta"], "ok");
    viewer.silent_for(Duration::from_millis(200)).await;
    assert_eq!(
        gateway
            .metric(r#"agentwire_events_rejected_total{reason="too_large"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn sse_bodies_and_the_stream_budget() {
    let gateway = Gateway::start_with(|c| c.ingest.max_streams = 1).await;
    let mut viewer = gateway.viewer("u1", "t_nb").await;
    let stream = Streaming::open(
        &gateway,
        "/v1/runs/r_nb/events?thread_id=t_nb",
        "text/event-stream",
    )
    .await;
    stream
        .send(": a comment\nevent: x\ndata: {\"type\":\ndata: \"agent_started\"}\n\n")
        .await;
    assert_eq!(types(&viewer.events(1).await), ["agent_started"]);
    // The one place is taken, whichever protocol asks next; nothing of the refused body is read.
    for path in ["/v1/runs/r_nc/events", "/v1/runs/r_nc/agui"] {
        let (status, body) = http_with(
            gateway.internal,
            "POST",
            &format!("{path}?thread_id=t_nb"),
            &[],
            Some((NDJSON, "{\"type\":\"agent_started\"}\n")),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("too_many_streams"), "{body}");
    }
    let (status, body) = http_with(
        gateway.internal,
        "POST",
        "/v1/runs/r%20bad/events",
        &[],
        Some((NDJSON, "")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("\"field\":\"run_id\""), "{body}");
    stream.send("data: {\"type\":\"agent_completed\"}").await;
    // An event the body ends in the middle of (no blank line after it) is still taken.
    let (status, summary) = stream.finish().await;
    assert_eq!((status, &summary["accepted"]), (StatusCode::OK, &json!(2)));
    assert_eq!(types(&viewer.events(1).await), ["agent_completed"]);
    viewer.silent_for(Duration::from_millis(200)).await;
    assert_lines(
        &gateway.metrics().await,
        &[
            r#"agentwire_run_streams_refused_total{reason="too_many_streams"} 2"#,
            r#"agentwire_run_streams_refused_total{reason="invalid_target"} 1"#,
            r#"agentwire_runs_closed_total{reason="agent_stream_ended"} 0"#,
        ],
    );
    assert_eq!(gateway.channel("thread:t_nb").await["emitted"], 2);
}

#[tokio::test]
async fn a_stream_needs_a_producer_key_when_keys_are_set() {
    const PRODUCER: &str = "producer-key-000000001";
    let gateway = Gateway::start_with(|c| c.auth.producer_keys = vec![PRODUCER.into()]).await;
    let body = "{\"type\":\"agent_started\",\"thread_id\":\"t_nk\"}\n";
    let (status, answer) = http_with(
        gateway.internal,
        "POST",
        "/v1/runs/r_nk/events",
        &[],
        Some((NDJSON, body)),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    // Nothing of it was read or taken in; the refusal is counted.
    assert_lines(
        &gateway.metrics().await,
        &[
            r#"agentwire_api_refused_total{reason="missing"} 1"#,
            "agentwire_events_ingested_total 0",
            "agentwire_run_streams 0",
        ],
    );
    let bearer = format!("Bearer {PRODUCER}");
    let (status, answer) = http_with(
        gateway.internal,
        "POST",
        "/v1/runs/r_nk/events",
        &[("authorization", &bearer)],
        Some((NDJSON, body)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer.contains("\"accepted\":1"), "{answer}");
    // The producer's one event, and the gateway's close of its run: the refused stream left
    // nothing behind.
    assert_lines(
        &gateway.metrics().await,
        &[
            "agentwire_events_ingested_total 1",
            "agentwire_events_generated_total 1",
        ],
    );
}

#[tokio::test]
async fn redis_mode_a_stream_on_one_replica_is_seen_and_closed_on_another() {
    let redis = crate::support::Redis::start().await;
    let url = redis.url();
    let (a_url, b_url) = (url.clone(), url);
    let producer_side = Gateway::start_with(move |c| c.broker.redis_url = Some(a_url)).await;
    let viewer_side = Gateway::start_with(move |c| c.broker.redis_url = Some(b_url)).await;
    let mut remote = viewer_side.viewer("u1", "t_nredis").await;
    // No `?thread_id=`: the first token waits for its run, which the `agent_started` after it
    // registers (in Redis, for every replica); the held token is released first, as it came first.
    let stream = Streaming::open(&producer_side, "/v1/runs/r_nredis/events", NDJSON).await;
    stream
        .line(json!({"type": "agent_thinking", "payload": {"delta": "early"}}))
        .await;
    stream
        .line(json!({"type": "agent_started", "thread_id": "t_nredis"}))
        .await;
    assert_eq!(
        types(&remote.events(2).await),
        ["agent_thinking", "agent_started"]
    );
    // The producer goes away mid-run: the replica reading its stream closes the run, and the
    // viewer on the other replica sees it end.
    stream.connection.abort();
    let frame = remote.recv().await;
    assert_eq!(
        (
            &frame["type"],
            &frame["run_id"],
            &frame["payload"]["reason"]
        ),
        (
            &json!("agent_error"),
            &json!("r_nredis"),
            &json!("agent_stream_ended")
        ),
        "{frame}"
    );
    let ledger = crate::replicas::ledger_until(&viewer_side, "thread:t_nredis", |l| {
        l["delivered"] == 3 && l["pending"] == 0
    })
    .await;
    assert_eq!(ledger["balanced"], true, "{ledger}");
}
