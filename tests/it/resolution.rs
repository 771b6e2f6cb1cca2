//! The "proof of broken flow": events that carry only a run_id find their thread through the run
//! registry, wait for a late registration, or are counted lost; never a channel named after a run.

use std::time::Duration;

use serde_json::json;

use crate::support::{Gateway, assert_lines};

fn orphan(kind: &str) -> serde_json::Value {
    json!({"type": kind, "run_id": "run_xyz789", "payload": {}})
}

#[tokio::test]
async fn a_registered_run_id_reaches_its_thread() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("thread_abc123", None).await;
    let (status, body) = gateway
        .post(
            "/v1/runs",
            &json!({"run_id": "run_xyz789", "thread_id": "thread_abc123", "user_id": "u_1"})
                .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channel"], "thread:thread_abc123");

    let answer = gateway.publish(&[orphan("agent_thinking")]).await;
    assert_eq!(answer["results"][0]["channel"], "thread:thread_abc123");
    let event = client.recv().await;
    assert_eq!(
        (event["thread_id"].as_str(), event["run_id"].as_str()),
        (Some("thread_abc123"), Some("run_xyz789"))
    );
    let (status, _) = gateway.get("/v1/channels/thread:run_xyz789").await;
    assert_eq!(status, 404, "a run_id is never a channel");
}

#[tokio::test]
async fn agent_started_with_a_thread_registers_the_run() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_9", None).await;
    gateway
        .publish(&[
            json!({"type": "agent_started", "run_id": "run_q", "thread_id": "t_9"}),
            orphan("agent_thinking"),
        ])
        .await;
    gateway
        .publish(&[json!({"type": "agent_completed", "run_id": "run_q"})])
        .await;
    let kinds: Vec<_> = client
        .events(2)
        .await
        .into_iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(kinds, ["agent_started", "agent_completed"]);
}

#[tokio::test]
async fn a_late_registration_rescues_held_events_in_order() {
    let gateway = Gateway::start_with(|c| c.resolve.grace = Duration::from_secs(30)).await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("thread_abc123", None).await;
    let answer = gateway.publish(&[orphan("agent_thinking"), json!({"type": "tool_executing", "run_id": "run_xyz789", "payload": {"tool_call_id": "c1"}})]).await;
    assert_eq!(answer["pending_resolution"], 2);
    assert_eq!(
        gateway.metric("agentwire_events_pending_resolution").await,
        2.0
    );
    client.silent_for(Duration::from_millis(100)).await;

    let (_, body) = gateway
        .post(
            "/v1/runs",
            &json!({"run_id": "run_xyz789", "thread_id": "thread_abc123"}).to_string(),
        )
        .await;
    assert_eq!(body["released"], 2);
    let events = client.events(2).await;
    assert_eq!(
        (events[0]["type"].as_str(), events[0]["seq"].as_u64()),
        (Some("agent_thinking"), Some(1))
    );
    assert_eq!(
        (events[1]["type"].as_str(), events[1]["seq"].as_u64()),
        (Some("tool_executing"), Some(2))
    );
    assert_eq!(
        gateway.metric("agentwire_events_pending_resolution").await,
        0.0
    );
    assert_eq!(
        gateway
            .metric("agentwire_events_lost_total{reason=\"unresolved\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn an_unregistered_run_is_dead_lettered_and_counted() {
    let gateway = Gateway::start_with(|c| c.resolve.grace = Duration::from_millis(200)).await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("thread_abc123", None).await;
    gateway
        .publish(&[orphan("agent_thinking"), orphan("agent_completed")])
        .await;

    let mut lost = 0.0;
    for _ in 0..100 {
        lost = gateway
            .metric("agentwire_events_lost_total{reason=\"unresolved\"}")
            .await;
        if lost == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lost, 2.0);
    let metrics = gateway.metrics().await;
    assert_lines(
        &metrics,
        &[
            "agentwire_unresolved_run_ids_total 1",
            "agentwire_events_pending_resolution 0",
            "agentwire_events_ingested_total 2",
            "agentwire_events_emitted_total 0",
        ],
    );
    // A registration after the grace period finds nothing left to release.
    let (_, body) = gateway
        .post(
            "/v1/runs",
            &json!({"run_id": "run_xyz789", "thread_id": "thread_abc123"}).to_string(),
        )
        .await;
    assert_eq!(body["released"], 0);
    client.silent_for(Duration::from_millis(100)).await;
    let (status, _) = gateway.get("/v1/channels/thread:run_xyz789").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_standard_run_id_names_its_thread() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_42", None).await;
    gateway
        .publish(&[json!({"type": "agent_thinking", "run_id": "thread_t_42_run_abc"})])
        .await;
    assert_eq!(client.recv().await["thread_id"], "t_42");
}
