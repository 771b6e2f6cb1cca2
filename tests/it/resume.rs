//! Reconnecting with `since` gets exactly what was missed, or says honestly that it cannot.

use std::time::Duration;

use serde_json::json;

use crate::support::{Client, Gateway, event, full_run};

#[tokio::test]
async fn a_reconnect_gets_exactly_the_missed_events() {
    let gateway = Gateway::start().await;
    let run = full_run("run_1", "t_1");
    let mut client = gateway.client("u_1").await;
    let subscribed = client.subscribe("t_1", None).await;
    gateway.publish(&run[..2]).await;
    let seen = client.events(2).await;
    drop(client);

    gateway.publish(&run[2..]).await;
    let mut client = gateway.client("u_1").await;
    let since = json!({"epoch": subscribed["epoch"], "seq": seen[1]["seq"]});
    let resumed = client.subscribe("t_1", Some(since)).await;
    assert_eq!(
        (
            resumed["recovered"].as_bool(),
            resumed["replayed"].as_u64(),
            resumed["missed"].as_u64()
        ),
        (Some(true), Some(3), Some(0))
    );
    let replayed = client.events(3).await;
    let kinds: Vec<_> = replayed
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["seq"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("tool_executing", 3),
            ("tool_completed", 4),
            ("agent_completed", 5)
        ]
    );

    // Live events follow the replay with no gap and no duplicate.
    gateway
        .publish(&[event("agent_thinking", "run_2", "t_1")])
        .await;
    assert_eq!(client.recv().await["seq"], 6);
    client.silent_for(Duration::from_millis(100)).await;
    assert_eq!(
        gateway
            .metric("agentwire_resumes_total{outcome=\"recovered\"}")
            .await,
        1.0
    );
    let ledger = gateway.channel("thread:t_1").await;
    assert_eq!(
        (
            ledger["emitted"].as_u64(),
            ledger["delivered"].as_u64(),
            ledger["pending"].as_u64()
        ),
        (Some(6), Some(6), Some(0))
    );
}

#[tokio::test]
async fn events_published_during_a_replay_follow_it_without_gap_or_duplicate() {
    let gateway = Gateway::start().await;
    let batch: Vec<_> = (0..300)
        .map(|n| event("agent_thinking", &format!("run_{n}"), "t_busy"))
        .collect();
    gateway.publish(&batch).await;
    let mut client = gateway.client("u_1").await;
    let publisher = {
        let batch = batch.clone();
        let addr = gateway.internal;
        tokio::spawn(async move {
            for chunk in batch.chunks(30) {
                let body = serde_json::Value::from(chunk.to_vec()).to_string();
                crate::support::http(
                    addr,
                    "POST",
                    "/v1/events",
                    Some(("application/json", &body)),
                )
                .await;
            }
        })
    };
    client.subscribe("t_busy", Some(json!({"seq": 0}))).await;
    let events = client.events(600).await;
    publisher.await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=600).collect::<Vec<_>>());
}

#[tokio::test]
async fn events_emitted_while_nobody_watches_are_pending_until_a_resume() {
    let gateway = Gateway::start().await;
    gateway.publish(&full_run("run_1", "t_1")).await;
    let ledger = gateway.channel("thread:t_1").await;
    assert_eq!(
        (
            ledger["emitted"].as_u64(),
            ledger["delivered"].as_u64(),
            ledger["pending"].as_u64()
        ),
        (Some(5), Some(0), Some(5))
    );
    assert!(ledger["oldest_pending_age_seconds"].as_f64().is_some());
    assert_eq!(gateway.metric("agentwire_events_pending").await, 5.0);

    let mut client = gateway.client("u_1").await;
    let subscribed = client.subscribe("t_1", Some(json!({"seq": 0}))).await;
    assert_eq!(
        (
            subscribed["recovered"].as_bool(),
            subscribed["replayed"].as_u64()
        ),
        (Some(true), Some(5))
    );
    client.events(5).await;
    client.send(json!({"type": "ping"})).await;
    client.recv().await;
    let ledger = gateway.channel("thread:t_1").await;
    assert_eq!(
        (ledger["delivered"].as_u64(), ledger["pending"].as_u64()),
        (Some(5), Some(0))
    );
}

#[tokio::test]
async fn a_resume_beyond_history_says_recovered_false_and_is_counted() {
    let gateway = Gateway::start_with(|c| c.history.max_events = 3).await;
    let mut client = gateway.client("u_1").await;
    let subscribed = client.subscribe("t_1", None).await;
    gateway.publish(&[event("agent_started", "r", "t_1")]).await;
    client.events(1).await;
    drop(client);
    gateway.wait_unwatched("thread:t_1").await;
    let more: Vec<_> = (0..5)
        .map(|_| event("agent_thinking", "r", "t_1"))
        .collect();
    gateway.publish(&more).await;

    let mut client = gateway.client("u_1").await;
    let resumed = client
        .subscribe("t_1", Some(json!({"epoch": subscribed["epoch"], "seq": 1})))
        .await;
    assert_eq!(resumed["recovered"], false);
    assert_eq!(resumed["missed"], 2, "seqs 2 and 3 left history unseen");
    assert_eq!(resumed["replayed"], 3);
    let seqs: Vec<_> = client
        .events(3)
        .await
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [4, 5, 6]);

    // A stale epoch is never taken for a position in the current store.
    let mut other = gateway.client("u_2").await;
    let stale = other
        .subscribe("t_1", Some(json!({"epoch": "not-this-one", "seq": 5})))
        .await;
    assert_eq!(stale["recovered"], false);

    assert_eq!(
        gateway
            .metric("agentwire_resumes_total{outcome=\"not_recovered\"}")
            .await,
        2.0
    );
    let ledger = gateway.channel("thread:t_1").await;
    assert_eq!(ledger["lost"]["expired_unseen"], 2);
}

#[tokio::test]
async fn hello_since_resumes_the_user_channel() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_7").await;
    let epoch = client.user_channel["epoch"].clone();
    let note =
        |n: u64| json!({"type": "custom", "user_id": "u_7", "payload": {"name": "note", "n": n}});
    gateway.publish(&[note(1)]).await;
    client.recv().await;
    drop(client);
    gateway.publish(&[note(2), note(3)]).await;
    let client = Client::hello_on(
        Client::connect(gateway.addr).await,
        "u_7",
        Some(json!({"epoch": epoch, "seq": 1})),
    )
    .await;
    assert_eq!(
        (
            client.user_channel["recovered"].as_bool(),
            client.user_channel["replayed"].as_u64()
        ),
        (Some(true), Some(2))
    );
    let mut client = client;
    let ns: Vec<_> = client
        .events(2)
        .await
        .iter()
        .map(|e| e["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, [2, 3]);
}

#[tokio::test]
async fn events_trimmed_before_anyone_saw_them_are_unseen_even_with_a_live_subscriber() {
    let gateway = Gateway::start_with(|c| c.history.max_events = 2).await;
    gateway
        .publish(&[
            event("agent_thinking", "r", "t_1"),
            event("agent_thinking", "r", "t_1"),
        ])
        .await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_1", None).await;
    gateway
        .publish(&[
            event("agent_thinking", "r", "t_1"),
            event("agent_thinking", "r", "t_1"),
        ])
        .await;
    client.events(2).await;
    client.barrier().await;
    let ledger = gateway.channel("thread:t_1").await;
    assert_eq!(
        (
            ledger["lost"]["expired_unseen"].as_u64(),
            ledger["lost"]["expired_subscribed"].as_u64()
        ),
        (Some(2), Some(0))
    );
    assert_eq!(ledger["delivered"], 2);
}

#[tokio::test]
async fn a_thread_subscribed_and_left_without_events_is_not_kept() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_fresh", None).await;
    assert_eq!(gateway.get("/v1/channels/thread:t_fresh").await.0, 200);
    client
        .send(json!({"type": "unsubscribe", "thread_id": "t_fresh"}))
        .await;
    client.recv().await;
    assert_eq!(gateway.get("/v1/channels/thread:t_fresh").await.0, 404);
}
