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
    wait_lines(
        &gateway,
        &[
            "agentwire_connections_closed_total{reason=\"slow_consumer\"} 1",
            "agentwire_slow_consumer_closes_total{close=\"sent\"} 1",
        ],
    )
    .await;

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

/// Waits until every line appears in `/metrics`: a session is counted once its close is done,
/// which may be just after the client saw it.
async fn wait_lines(gateway: &Gateway, lines: &[&str]) {
    for _ in 0..200 {
        let metrics = gateway.metrics().await;
        if lines.iter().all(|line| metrics.lines().any(|l| l == *line)) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    crate::support::assert_lines(&gateway.metrics().await, lines);
}

/// Publishes `batches` of 20 events of 30 kB on `thread`.
async fn publish_big(gateway: &Gateway, thread: &str, batches: u64) {
    let filler = "x".repeat(30_000);
    for batch in 0..batches {
        let events: Vec<_> = (0..20)
            .map(|n| json!({"type": "agent_thinking", "run_id": "run_stall", "thread_id": thread, "payload": {"n": batch * 20 + n, "text": filler}}))
            .collect();
        gateway.publish(&events).await;
    }
}

/// A client that stops reading while its queue still has room: the write times out, and the
/// gateway closes it as a slow consumer. Read again before the close's own write timeout ends,
/// it sees every frame that reached its socket, in order, then 4008; the client beside it gets
/// everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_gets_4008_when_it_reads_again() {
    const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
    let gateway = Gateway::start_with(|c| {
        c.session.write_timeout = WRITE_TIMEOUT;
        // Room for everything: the queue never overflows, only the socket write stalls.
        c.session.queue_events = 1024;
        c.session.queue_bytes = 16 * 1024 * 1024;
        c.history.max_bytes_per_channel = 32 * 1024 * 1024;
    })
    .await;
    const EVENTS: u64 = 100;
    let mut stalled = Client::hello_on(
        Client::connect_small_buffer(gateway.addr).await,
        "u_stalled",
        None,
    )
    .await;
    stalled.subscribe("t_stall", None).await;
    let mut healthy = gateway.client("u_ok").await;
    healthy.subscribe("t_stall", None).await;
    let reader = tokio::spawn(async move {
        let events = healthy.events(EVENTS as usize).await;
        let seqs: Vec<_> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        healthy.barrier().await;
        seqs
    });
    let published = tokio::time::Instant::now();
    publish_big(&gateway, "t_stall", EVENTS / 20).await;
    assert_eq!(
        reader.await.unwrap(),
        (1..=EVENTS).collect::<Vec<_>>(),
        "the healthy client got everything"
    );

    // The write that stalls begins just after the first publish and times out WRITE_TIMEOUT later;
    // the close then has WRITE_TIMEOUT more. Reading half-way through that second one leaves
    // WRITE_TIMEOUT / 2 of margin on either side.
    tokio::time::sleep_until(published + WRITE_TIMEOUT.mul_f64(1.5)).await;
    let mut last_seen = 0;
    let mut ws = stalled.into_inner();
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
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            other => panic!("expected frames then a close, got {other:?}"),
        }
    };
    assert_eq!(code, 4008);
    assert!(last_seen < EVENTS, "the write stalled before the end");
    // Every frame it read was counted as written to it, the stalled write's too: they went
    // ahead of the close frame.
    let sent = format!("agentwire_fanout_frames_sent_total {}", EVENTS + last_seen);
    wait_lines(
        &gateway,
        &[
            &sent,
            "agentwire_connections_closed_total{reason=\"slow_consumer\"} 1",
            "agentwire_connections_closed_total{reason=\"write_failed\"} 0",
            "agentwire_slow_consumer_closes_total{close=\"sent\"} 1",
            "agentwire_slow_consumer_closes_total{close=\"not_sent\"} 0",
        ],
    )
    .await;
}

/// A client that stops reading and never reads again: the close cannot be written either, so the
/// connection is cut (the client sees no close frame: 1006), and it is counted as a slow consumer
/// whose 4008 was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_again_is_cut_and_counted_as_a_slow_consumer() {
    let gateway = Gateway::start_with(|c| {
        c.session.write_timeout = std::time::Duration::from_millis(300);
        c.session.queue_events = 1024;
        c.session.queue_bytes = 16 * 1024 * 1024;
        c.history.max_bytes_per_channel = 32 * 1024 * 1024;
    })
    .await;
    let mut stalled = Client::hello_on(
        Client::connect_small_buffer(gateway.addr).await,
        "u_gone_quiet",
        None,
    )
    .await;
    stalled.subscribe("t_quiet", None).await;
    let mut healthy = gateway.client("u_ok").await;
    healthy.subscribe("t_quiet", None).await;
    publish_big(&gateway, "t_quiet", 5).await;
    assert_eq!(healthy.events(100).await.len(), 100);
    wait_lines(
        &gateway,
        &[
            "agentwire_connections_closed_total{reason=\"slow_consumer\"} 1",
            "agentwire_connections_closed_total{reason=\"write_failed\"} 0",
            "agentwire_slow_consumer_closes_total{close=\"sent\"} 0",
            "agentwire_slow_consumer_closes_total{close=\"not_sent\"} 1",
        ],
    )
    .await;

    // Reading now: whatever had reached the socket, then no close frame.
    let mut ws = stalled.into_inner();
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(crate::support::WAIT, ws.next())
            .await
            .expect("the end in time")
        {
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(frame))) => panic!("no close frame was sent: {frame:?}"),
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            Some(Err(_)) | None => break,
        }
    }
    healthy.barrier().await;
}
