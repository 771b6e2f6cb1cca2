//! A client that stops reading is closed with 4008; the others keep receiving; it resumes.

use serde_json::json;

use crate::support::{Client, Gateway, raw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_with_4008_and_resumes_everything() {
    let gateway = Gateway::start_with(|c| {
        // Room for a few 20-event batches, so the healthy client keeps up between requests.
        c.session.queue_events = 256;
        c.session.queue_bytes = 2 * 1024 * 1024;
        // History keeps all 18 MB, so the resume reaches back to where the client stopped.
        c.history.max_bytes_per_channel = 32 * 1024 * 1024;
    })
    .await;
    const EVENTS: u64 = 600;
    let filler = "x".repeat(30_000);

    let mut slow = Client::hello_on(
        Client::connect_small_buffer(gateway.addr).await,
        "u_slow",
        None,
    )
    .await;
    let subscribed = slow.subscribe("t_big", None).await;
    let mut healthy = gateway.client("u_ok").await;
    healthy.subscribe("t_big", None).await;
    let reader = tokio::spawn(async move {
        let events = healthy.events(EVENTS as usize).await;
        events
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>()
    });

    // The slow client reads nothing while 18 MB go out.
    for batch in 0..EVENTS / 20 {
        let events: Vec<_> = (0..20)
            .map(|n| json!({"type": "agent_thinking", "run_id": "run_big", "thread_id": "t_big", "payload": {"n": batch * 20 + n, "text": filler}}))
            .collect();
        gateway.publish(&events).await;
    }
    assert_eq!(
        reader.await.unwrap(),
        (1..=EVENTS).collect::<Vec<_>>(),
        "the healthy client got everything"
    );

    // Now it reads: what had reached its socket, then the close.
    let mut last_seen = 0;
    let mut ws = slow.into_inner();
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let code = loop {
        match tokio::time::timeout(crate::support::WAIT, ws.next())
            .await
            .expect("frames in time")
        {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                if let Some(seq) = frame["seq"].as_u64() {
                    assert_eq!(seq, last_seen + 1, "in order, no gap");
                    last_seen = seq;
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            other => panic!("expected frames then a close, got {other:?}"),
        }
    };
    assert_eq!(code, 4008);
    assert!(last_seen < EVENTS);
    assert_eq!(
        gateway.metric("agentwire_slow_consumer_closes_total").await,
        1.0
    );

    let mut back = raw(Client::connect(gateway.addr).await);
    back = Client::hello_on(back.into_inner(), "u_slow", None).await;
    let resumed = back
        .subscribe(
            "t_big",
            Some(json!({"epoch": subscribed["epoch"], "seq": last_seen})),
        )
        .await;
    assert_eq!(resumed["recovered"], true);
    let rest: Vec<_> = back
        .events((EVENTS - last_seen) as usize)
        .await
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(rest, (last_seen + 1..=EVENTS).collect::<Vec<_>>());
    back.barrier().await;
    let ledger = gateway.channel("thread:t_big").await;
    assert_eq!(
        (ledger["delivered"].as_u64(), ledger["lost_total"].as_u64()),
        (Some(EVENTS), Some(0))
    );
}

/// Pending events of a thread nobody watches are normal; events queued to a subscriber and never
/// written are a stuck delivery, and /metrics tells them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_delivery_is_told_apart_from_an_unwatched_thread() {
    let gateway = Gateway::start_with(|c| {
        c.session.queue_events = 64;
        c.session.queue_bytes = 1024 * 1024;
    })
    .await;
    let unwatched: Vec<_> = (0..3)
        .map(|_| json!({"type": "agent_thinking", "run_id": "r", "thread_id": "t_nobody"}))
        .collect();
    gateway.publish(&unwatched).await;
    let metrics = gateway.metrics().await;
    assert!(
        crate::support::metric_value(&metrics, "agentwire_events_pending_oldest_age_seconds") > 0.0
    );
    assert_eq!(
        crate::support::metric_value(
            &metrics,
            "agentwire_events_offered_undelivered_oldest_age_seconds"
        ),
        0.0
    );

    let mut stuck = Client::hello_on(
        Client::connect_small_buffer(gateway.addr).await,
        "u_stuck",
        None,
    )
    .await;
    stuck.subscribe("t_stuck", None).await;
    let filler = "x".repeat(30_000);
    for _ in 0..30 {
        let batch: Vec<_> = (0..20)
            .map(|_| json!({"type": "agent_thinking", "run_id": "r", "thread_id": "t_stuck", "payload": {"text": filler}}))
            .collect();
        gateway.publish(&batch).await;
    }
    assert!(
        gateway
            .metric("agentwire_events_offered_undelivered_oldest_age_seconds")
            .await
            > 0.0
    );
    let ledger = gateway.channel("thread:t_stuck").await;
    assert!(ledger["pending"].as_u64().unwrap() > 0, "{ledger}");
}
