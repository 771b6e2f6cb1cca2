//! The run watchdog: a run that goes quiet is ended for the UI; out-of-order lifecycles are
//! delivered as sent and counted; what it keeps and what it makes is bounded whatever producers send.

use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::{Value, json};

use crate::support::{Gateway, assert_lines, event};

#[tokio::test]
async fn a_run_that_goes_quiet_after_a_tool_call_is_ended_as_stalled() {
    let gateway =
        Gateway::start_with(|c| c.watchdog.run_idle_timeout = Duration::from_millis(300)).await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_1", None).await;
    gateway
        .publish(&[
            event("agent_started", "run_s", "t_1"),
            event("tool_executing", "run_s", "t_1"),
        ])
        .await;
    client.events(2).await;

    let stalled = client.recv().await;
    assert_eq!(
        (stalled["type"].as_str(), stalled["seq"].as_u64()),
        (Some("agent_error"), Some(3))
    );
    assert_eq!(stalled["run_id"], "run_s");
    assert_eq!(stalled["payload"]["reason"], "stalled");
    assert_eq!(stalled["payload"]["open_tools"], 1);
    assert_eq!(stalled["payload"]["open_tool_ids"], json!(["call_1"]));

    let (status, run) = gateway.get("/v1/runs/run_s").await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["state"], "stalled");
    assert_eq!(run["open_tools"], 1);
    assert_eq!(run["open_tool_ids"], json!(["call_1"]));
    assert_eq!(run["thread_id"], "t_1");
    assert_eq!(
        run["counts"],
        json!({"agent_started": 1, "tool_executing": 1})
    );
    assert!(run["seconds_since_last_event"].as_f64().unwrap() >= 0.3);

    // A late event is still delivered, and counted.
    gateway
        .publish(&[event("tool_completed", "run_s", "t_1")])
        .await;
    assert_eq!(client.recv().await["type"], "tool_completed");
    client.silent_for(Duration::from_millis(500)).await;
    let metrics = gateway.metrics().await;
    assert_lines(
        &metrics,
        &[
            "agentwire_runs_stalled_total 1",
            "agentwire_runs_completed_total{outcome=\"stalled\"} 1",
            "agentwire_runs_active 0",
            "agentwire_events_generated_total 1",
            "agentwire_lifecycle_violations_total{kind=\"event_after_stall\"} 1",
        ],
    );
    let ledger = gateway.channel("thread:t_1").await;
    assert_eq!(ledger["emitted"], 4);
}

#[tokio::test]
async fn the_stall_notice_can_be_switched_off() {
    let gateway = Gateway::start_with(|c| {
        c.watchdog.run_idle_timeout = Duration::from_millis(100);
        c.watchdog.stalled_event = false;
    })
    .await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_1", None).await;
    gateway
        .publish(&[event("agent_started", "run_q", "t_1")])
        .await;
    client.recv().await;
    client.silent_for(Duration::from_millis(500)).await;
    assert_eq!(gateway.metric("agentwire_runs_stalled_total").await, 1.0);
}

#[tokio::test]
async fn each_lifecycle_violation_is_counted_once_and_delivered() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_v", None).await;
    let tool = |kind: &str, id: &str| json!({"type": kind, "run_id": "run_v", "thread_id": "t_v", "payload": {"tool_call_id": id}});
    let crafted = [
        event("agent_thinking", "run_v", "t_v"), // event_before_start
        event("agent_started", "run_v", "t_v"),
        event("agent_started", "run_v", "t_v"), // duplicate_start
        tool("tool_completed", "call_x"),       // tool_completed_without_executing
        tool("tool_executing", "call_y"),
        event("agent_completed", "run_v", "t_v"), // ended_with_open_tools
        event("agent_thinking", "run_v", "t_v"),  // event_after_end
    ];
    gateway.publish(&crafted).await;
    let delivered: Vec<_> = client
        .events(7)
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    let sent: Vec<_> = crafted
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(delivered, sent, "delivered as sent");

    let metrics = gateway.metrics().await;
    for kind in [
        "event_before_start",
        "duplicate_start",
        "tool_completed_without_executing",
        "ended_with_open_tools",
        "event_after_end",
    ] {
        let line = format!("agentwire_lifecycle_violations_total{{kind=\"{kind}\"}} 1");
        assert!(
            metrics.lines().any(|l| l == line),
            "missing `{line}` in:\n{metrics}"
        );
    }
    crate::support::assert_lines(
        &metrics,
        &["agentwire_runs_completed_total{outcome=\"completed\"} 1"],
    );
    crate::support::assert_lines(&metrics, &["agentwire_run_duration_seconds_count 1"]);
    let (_, run) = gateway.get("/v1/runs/run_v").await;
    assert_eq!(run["state"], "completed");
    assert_eq!(run["violations"]["duplicate_start"], 1);
    assert_eq!(gateway.get("/v1/runs/run_nobody").await.0, 404);
}

/// A tool event of `run_id` on `t_big`.
fn tool(kind: &str, run_id: &str, tool_call_id: &str) -> Value {
    json!({"type": kind, "run_id": run_id, "thread_id": "t_big", "payload": {"tool_call_id": tool_call_id}})
}

#[tokio::test]
async fn a_stall_notice_of_a_run_with_many_long_open_tools_fits_and_is_received() {
    let max_event_bytes = agentwire::config::MIN_EVENT_BYTES;
    let gateway = Gateway::start_with(|c| {
        c.watchdog.run_idle_timeout = Duration::from_millis(300);
        c.ingest.max_event_bytes = max_event_bytes;
        // A queue that holds a few events of the limit, not the whole list of open tools.
        c.session.queue_bytes = 4 * max_event_bytes;
    })
    .await;
    // The longest ids, of characters JSON escapes to two bytes each: every shown id costs ~512.
    let id = |n: usize| format!("{n:03}{}", "\"".repeat(253));
    let mut events = vec![event("agent_started", "run_big", "t_big")];
    events.extend((0..300).map(|n| tool("tool_executing", "run_big", &id(n))));
    gateway.publish(&events).await;

    // Subscribed after the tools, so that only the stall notice is delivered.
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_big", None).await;
    let mut stalled = client.recv().await;
    assert_eq!(stalled["type"], "agent_error", "{stalled}");
    assert_eq!(stalled["payload"]["reason"], "stalled");
    assert_eq!(stalled["payload"]["open_tools"], 256, "capped per run");
    let shown = stalled["payload"]["open_tool_ids"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        (1..=4).contains(&shown.len()),
        "a few ids, as many as fit: {}",
        shown.len()
    );
    for (n, shown) in shown.iter().enumerate() {
        assert_eq!(shown.as_str(), Some(id(n).as_str()));
    }
    // The event as a producer would have sent it fits the producer's limit.
    let object = stalled.as_object_mut().unwrap();
    for position in ["seq", "channel", "thread_id", "epoch"] {
        object.remove(position);
    }
    let size = stalled.to_string().len();
    assert!(size <= max_event_bytes, "{size} bytes");
    client.barrier().await;

    let (_, run) = gateway.get("/v1/runs/run_big").await;
    assert_eq!(run["state"], "stalled");
    assert_eq!(run["open_tools"], 256);
    assert_eq!(run["open_tool_ids"].as_array().unwrap().len(), 4);
    let metrics = gateway.metrics().await;
    assert_lines(
        &metrics,
        &[
            "agentwire_runs_stalled_total 1",
            "agentwire_events_generated_total 1",
            "agentwire_slow_consumer_closes_total{close=\"sent\"} 0",
            "agentwire_slow_consumer_closes_total{close=\"not_sent\"} 0",
        ],
    );
}

#[tokio::test]
async fn an_over_long_tool_call_id_is_refused_counted_and_not_delivered() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_big", None).await;
    let (status, body) = gateway
        .post(
            "/v1/events",
            &json!([
                event("agent_started", "run_long", "t_big"),
                tool("tool_executing", "run_long", &"c".repeat(257)),
                tool("tool_executing", "run_long", &"c".repeat(256)),
            ])
            .to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::MULTI_STATUS, "{body}");
    assert_eq!(
        body["results"][1],
        json!({"status": "error", "code": "invalid_field", "field": "payload.tool_call_id",
               "reason": "must be at most 256 bytes"})
    );
    assert_eq!(
        body["results"][2]["status"], "accepted",
        "256 bytes is an id"
    );
    let delivered: Vec<Value> = client.events(2).await;
    assert_eq!(delivered[1]["payload"]["tool_call_id"], "c".repeat(256));
    client.silent_for(Duration::from_millis(300)).await;
    assert_eq!(
        gateway
            .metric("agentwire_events_rejected_total{reason=\"invalid_field\"}")
            .await,
        1.0
    );
    let (_, run) = gateway.get("/v1/runs/run_long").await;
    assert_eq!(
        run["counts"],
        json!({"agent_started": 1, "tool_executing": 1})
    );
    assert_eq!(gateway.channel("thread:t_big").await["emitted"], 2);
}

#[tokio::test]
async fn a_flood_of_runs_evicts_counted_and_fast_and_evicted_runs_never_stall() {
    let max_runs = 500;
    let idle = Duration::from_secs(2);
    let gateway = Gateway::start_with(|c| {
        c.watchdog.max_runs = max_runs;
        c.watchdog.run_idle_timeout = idle;
    })
    .await;
    let flood = 5000;
    let events: Vec<Value> = (0..flood)
        .map(|n| event("agent_started", &format!("run_{n}"), "t_flood"))
        .collect();
    let started = Instant::now();
    gateway.publish(&events).await;
    let took = started.elapsed();
    // Also keeps every run open while it is counted below.
    assert!(took < idle / 2, "{flood} runs took {took:?}");

    let followed = gateway.metric("agentwire_runs_active").await as usize;
    let evicted = gateway.metric("agentwire_runs_evicted_total").await as usize;
    // Each of the 16 shards holds max_runs / 16, rounded up.
    assert!(followed <= max_runs.div_ceil(16) * 16, "{followed}");
    assert_eq!(
        followed + evicted,
        flood,
        "every run followed or evicted, counted"
    );
    assert_eq!(
        gateway.get(&format!("/v1/runs/run_{}", flood - 1)).await.0,
        StatusCode::OK,
        "the newest run is followed"
    );

    // Only the followed runs stall: an evicted one never gets a gateway-made notice.
    tokio::time::sleep(idle).await;
    for _ in 0..100 {
        if gateway.metric("agentwire_runs_active").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = gateway.metrics().await;
    assert_lines(
        &metrics,
        &[
            "agentwire_runs_active 0",
            &format!("agentwire_runs_stalled_total {followed}"),
            &format!("agentwire_events_generated_total {followed}"),
        ],
    );
}
