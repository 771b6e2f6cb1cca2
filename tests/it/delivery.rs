//! Events reach the right clients, in order, and the ledger says so.

use std::time::Duration;

use serde_json::json;

use crate::support::{Client, Gateway, assert_lines, event, full_run};

#[tokio::test]
async fn five_lifecycle_events_arrive_in_order_and_balance() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    let subscribed = client.subscribe("t_42", None).await;
    assert_eq!(subscribed["seq"], 0);

    let answer = gateway.publish(&full_run("run_7f3a", "t_42")).await;
    assert_eq!(answer["accepted"], 5);
    assert_eq!(
        answer["results"][4],
        json!({"status": "accepted", "channel": "thread:t_42", "seq": 5, "epoch": subscribed["epoch"]})
    );

    let events = client.events(5).await;
    let kinds: Vec<_> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "agent_started",
            "agent_thinking",
            "tool_executing",
            "tool_completed",
            "agent_completed"
        ]
    );
    for (n, event) in events.iter().enumerate() {
        assert_eq!(event["seq"], n as u64 + 1);
        assert_eq!(event["thread_id"], "t_42");
        assert_eq!(event["run_id"], "run_7f3a");
        assert_eq!(event["epoch"], subscribed["epoch"]);
    }

    client
        .send(json!({"type": "ack", "thread_id": "t_42", "seq": 5}))
        .await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(
        client.recv().await["type"],
        "pong",
        "the ack has no answer; the pong follows it"
    );

    let ledger = gateway.channel("thread:t_42").await;
    assert_eq!(
        (ledger["emitted"].as_u64(), ledger["delivered"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(
        (ledger["pending"].as_u64(), ledger["lost_total"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(ledger["acked"], 5);

    let metrics = gateway.metrics().await;
    assert_lines(
        &metrics,
        &[
            "agentwire_events_emitted_total 5",
            "agentwire_events_delivered_total 5",
            "agentwire_events_acked_total 5",
            "agentwire_events_pending 0",
            "agentwire_events_lost_total{reason=\"expired_subscribed\"} 0",
            "agentwire_connections 1",
            "agentwire_subscriptions 2",
        ],
    );
    crate::support::assert_lines(
        &metrics,
        &["agentwire_live_delivery_latency_seconds_count 5"],
    );
}

/// Events nobody watched, replayed to a user who comes back, are replay age, not delivery latency:
/// only events queued to a socket when they were published are live.
#[tokio::test]
async fn replays_are_measured_apart_from_live_deliveries() {
    let gateway = Gateway::start().await;
    gateway
        .publish(&[
            event("agent_thinking", "r", "t_1"),
            event("agent_thinking", "r", "t_1"),
        ])
        .await;
    let mut client = gateway.client("u_1").await;
    let subscribed = client.subscribe("t_1", Some(json!({"seq": 0}))).await;
    assert_eq!(subscribed["replayed"], 2);
    client.recv().await;
    client.recv().await;
    gateway
        .publish(&[event("agent_thinking", "r", "t_1")])
        .await;
    assert_eq!(client.recv().await["seq"], 3);
    client.barrier().await;
    let metrics = gateway.metrics().await;
    assert_lines(
        &metrics,
        &[
            "agentwire_replay_age_seconds_count 2",
            "agentwire_live_delivery_latency_seconds_count 1",
            "agentwire_events_delivered_total 3",
        ],
    );
}

#[tokio::test]
async fn two_hundred_users_each_get_only_their_own_thread() {
    let gateway = Gateway::start().await;
    let mut clients = Vec::new();
    for n in 0..200 {
        let mut client = gateway.client(&format!("u_{n}")).await;
        client.subscribe(&format!("t_{n}"), None).await;
        clients.push(client);
    }
    // Interleaved: round r carries the r-th event of every user's run, all in one request.
    for kind in ["agent_started", "agent_thinking", "agent_completed"] {
        let round: Vec<_> = (0..200)
            .map(|n| event(kind, &format!("run_{n}"), &format!("t_{n}")))
            .collect();
        gateway.publish(&round).await;
    }
    for (n, client) in clients.iter_mut().enumerate() {
        for (seq, event) in client.events(3).await.iter().enumerate() {
            assert_eq!(event["thread_id"], format!("t_{n}"));
            assert_eq!(event["run_id"], format!("run_{n}"));
            assert_eq!(event["seq"], seq as u64 + 1);
        }
        client.silent_for(Duration::from_millis(5)).await;
    }
    clients[0].silent_for(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn an_event_with_only_a_user_reaches_every_connection_of_that_user() {
    let gateway = Gateway::start().await;
    let mut first = gateway.client("u_9").await;
    let mut second = gateway.client("u_9").await;
    let mut other = gateway.client("u_10").await;
    assert_eq!(first.user_channel["channel"], "user:u_9");

    gateway
        .publish(&[
            json!({"type": "custom", "user_id": "u_9", "payload": {"name": "credits", "left": 3}}),
        ])
        .await;
    for client in [&mut first, &mut second] {
        let event = client.recv().await;
        assert_eq!(
            (event["type"].as_str(), event["channel"].as_str()),
            (Some("custom"), Some("user:u_9"))
        );
        assert_eq!(event["payload"]["left"], 3);
        assert_eq!(event["seq"], 1);
        client.barrier().await;
    }
    other.silent_for(Duration::from_millis(200)).await;
    let ledger = gateway.channel("user:u_9").await;
    assert_eq!(
        (
            ledger["emitted"].as_u64(),
            ledger["delivered"].as_u64(),
            ledger["subscribers"].as_u64()
        ),
        (Some(1), Some(1), Some(2))
    );
}

#[tokio::test]
async fn ndjson_and_retries_with_the_same_event_id() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_1", None).await;
    let line =
        json!({"type": "agent_thinking", "run_id": "r1", "thread_id": "t_1", "event_id": "ev-1"})
            .to_string();
    let (status, body) = gateway.post_ndjson(&format!("{line}\n{line}\n")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status"], "accepted");
    assert_eq!(body["results"][1]["status"], "duplicate");
    assert_eq!(client.recv().await["event_id"], "ev-1");
    client.silent_for(Duration::from_millis(200)).await;
    let metrics = gateway.metrics().await;
    crate::support::assert_lines(&metrics, &["agentwire_events_duplicate_total 1"]);
    crate::support::assert_lines(&metrics, &["agentwire_events_ingested_total 2"]);
}

#[tokio::test]
async fn unsubscribe_stops_the_thread_and_quiet_connections_get_heartbeats() {
    let gateway = Gateway::start_with(|c| {
        c.session.heartbeat = Duration::from_millis(100);
        c.session.client_timeout = Duration::from_secs(30);
    })
    .await;
    let mut client = gateway.client("u_1").await;
    assert_eq!(client.welcome["heartbeat_ms"], 100);
    client.subscribe("t_1", None).await;
    client
        .send(json!({"type": "unsubscribe", "thread_id": "t_1"}))
        .await;
    assert_eq!(
        client.recv().await,
        json!({"type": "unsubscribed", "thread_id": "t_1"})
    );
    gateway
        .publish(&[event("agent_thinking", "r1", "t_1")])
        .await;

    // The next text frame is a heartbeat, not the event.
    let mut ws = client.into_inner();
    use futures_util::StreamExt;
    let frame = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) = ws.next().await {
                return text.to_string();
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(frame, r#"{"type":"heartbeat"}"#);
    let ledger = gateway.channel("thread:t_1").await;
    assert_eq!(
        (ledger["pending"].as_u64(), ledger["subscribers"].as_u64()),
        (Some(1), Some(0))
    );
}

/// A browser tab only listens: it answers pings but sends nothing of its own. On a thread busy enough
/// that the connection is never quiet for `heartbeat`, the gateway must still ping it, or
/// `client_timeout` cuts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_only_client_on_a_busy_thread_outlives_the_client_timeout() {
    let gateway = Gateway::start_with(|c| {
        c.session.heartbeat = Duration::from_millis(200);
        c.session.client_timeout = Duration::from_secs(1);
    })
    .await;
    let mut listener = gateway.client("u_listen").await;
    listener.subscribe("t_busy", None).await;
    // From here on the client only reads (tungstenite answers pings while it reads).
    const EVENTS: u64 = 30;
    let publish = async {
        for _ in 0..EVENTS {
            gateway
                .publish(&[event("agent_thinking", "r_busy", "t_busy")])
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (_, events) = tokio::join!(publish, listener.events(EVENTS as usize));
    let seqs: Vec<_> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=EVENTS).collect::<Vec<_>>(),
        "every event, 3 s long"
    );
    listener.barrier().await;
    crate::support::assert_lines(
        &gateway.metrics().await,
        &["agentwire_connections_closed_total{reason=\"client_timeout\"} 0"],
    );
}

#[tokio::test]
async fn a_second_client_on_the_same_thread_gets_the_same_bytes() {
    let gateway = Gateway::start().await;
    let mut a = gateway.client("u_a").await;
    let mut b = Client::hello(gateway.addr, "u_b").await;
    a.subscribe("t_shared", None).await;
    b.subscribe("t_shared", None).await;
    gateway.publish(&full_run("run_s", "t_shared")).await;
    assert_eq!(a.events(5).await, b.events(5).await);
    a.barrier().await;
    b.barrier().await;
    let metrics = gateway.metrics().await;
    crate::support::assert_lines(&metrics, &["agentwire_fanout_frames_sent_total 10"]);
    crate::support::assert_lines(&metrics, &["agentwire_events_delivered_total 5"]);
}

#[tokio::test]
async fn a_thousand_events_in_one_post_all_arrive_without_waiting_for_a_heartbeat() {
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_burst", None).await;
    let burst: Vec<_> = (0..1000)
        .map(|_| event("agent_thinking", "r", "t_burst"))
        .collect();
    gateway.publish(&burst).await;
    let seqs: Vec<u64> = client
        .events(1000)
        .await
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
}
