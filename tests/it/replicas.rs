//! The Redis broker: several gateway processes on one real `redis-server`, each test with its own
//! server on a free port. Replicas share channels, seqs, the ledger and the ingest stream; Redis
//! going away is visible and survivable.

use std::collections::BTreeSet;
use std::time::Duration;

use hyper::StatusCode;
use redis::AsyncCommands;
use serde_json::{Value, json};

use agentwire::config::Config;

use crate::support::{
    Client, Gateway, Process, Redis, SilencingProxy, WAIT, event, eventually, http, metric_value,
    wait_ready,
};

/// A gateway process on `redis`, ready to serve.
async fn replica(redis: &Redis, extra: &[(&str, &str)]) -> Process {
    let url = redis.url();
    let mut env = vec![("AGENTWIRE_BROKER__REDIS_URL", url.as_str())];
    env.extend_from_slice(extra);
    let process = Process::start(&env).await;
    wait_ready(process.internal, StatusCode::OK).await;
    process
}

/// A gateway in this process on `redis`, ready to serve.
pub(crate) async fn on_redis(redis: &Redis, configure: impl FnOnce(&mut Config)) -> Gateway {
    let url = redis.url();
    let gateway = Gateway::start_with(|c| {
        c.broker.redis_url = Some(url);
        configure(c);
    })
    .await;
    wait_ready(gateway.internal, StatusCode::OK).await;
    gateway
}

pub(crate) fn thinking(thread: &str, n: usize) -> Value {
    let mut event = event("agent_thinking", &format!("run_{thread}"), thread);
    event["payload"]["n"] = n.into();
    event["event_id"] = format!("{thread}-{n}").into();
    event
}

/// Waits until the channel's ledger, read on `gateway`, satisfies `done`.
pub(crate) async fn ledger_until(
    gateway: &Gateway,
    channel: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    eventually("the ledger settles", async || {
        let ledger = gateway.channel(channel).await;
        match done(&ledger) {
            true => Ok(ledger),
            false => Err(ledger.to_string()),
        }
    })
    .await
}

#[tokio::test]
async fn three_replicas_deliver_what_any_of_them_accepted_in_order_and_once() {
    let redis = Redis::start().await;
    let replicas = [
        replica(&redis, &[]).await,
        replica(&redis, &[]).await,
        replica(&redis, &[]).await,
    ];
    let mut clients = Vec::new();
    for (i, replica) in replicas.iter().enumerate() {
        let mut client = Client::hello(replica.addr, &format!("u{i}")).await;
        client.subscribe("t_multi", None).await;
        clients.push(client);
    }
    for n in 1..=30 {
        let gateway = Gateway::at(&replicas[n % 3]);
        let answer = gateway.publish(&[thinking("t_multi", n)]).await;
        assert_eq!(answer["results"][0]["seq"], n, "{answer}");
    }
    for client in &mut clients {
        let events = client.events(30).await;
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
        let ns: Vec<u64> = events
            .iter()
            .map(|e| e["payload"]["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, (1..=30).collect::<Vec<_>>());
        client.silent_for(Duration::from_millis(300)).await;
    }
    let mut seen = Vec::new();
    for replica in &replicas {
        let ledger = ledger_until(&Gateway::at(replica), "thread:t_multi", |l| {
            l["delivered"] == 30
        })
        .await;
        assert_eq!(
            (
                &ledger["emitted"],
                &ledger["pending"],
                &ledger["lost_total"]
            ),
            (&json!(30), &json!(0), &json!(0)),
            "{ledger}"
        );
        assert_eq!(ledger["balanced"], true);
        seen.push((ledger["epoch"].clone(), ledger["last_seq"].clone()));
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    // Each replica exports what it did; summed, they are the cluster's figures.
    let mut sums = [0.0; 3];
    for replica in &replicas {
        let gateway = Gateway::at(replica);
        let exposition = gateway.metrics().await;
        for (sum, series) in sums.iter_mut().zip([
            "agentwire_events_emitted_total",
            "agentwire_events_delivered_total",
            "agentwire_events_pending",
        ]) {
            *sum += crate::support::metric_value(&exposition, series);
        }
    }
    assert_eq!(sums, [30.0, 30.0, 0.0]);
}

#[tokio::test]
async fn two_replicas_publishing_to_one_thread_at_once_get_seqs_without_gap_or_duplicate() {
    let redis = Redis::start().await;
    let replicas = [replica(&redis, &[]).await, replica(&redis, &[]).await];
    let mut requests = Vec::new();
    for batch in 0..20 {
        let gateway = Gateway::at(&replicas[batch % 2]);
        let items: Vec<Value> = (0..10)
            .map(|i| thinking("t_race", batch * 10 + i))
            .collect();
        requests.push(tokio::spawn(async move { gateway.publish(&items).await }));
    }
    let mut seqs = Vec::new();
    for request in requests {
        let answer = request.await.unwrap();
        for result in answer["results"].as_array().unwrap() {
            assert_eq!(result["status"], "accepted", "{answer}");
            seqs.push(result["seq"].as_u64().unwrap());
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

/// One request's events, interleaved over two threads with a run's start, a retry of an event
/// of the same request and an invalid item between them: published per channel together (one
/// script call per channel in Redis mode, docs/redis.md), yet answered item by item in order, the
/// retry not published twice and nothing else lost or reordered. The embedded gateway answers
/// the same.
async fn one_request_over_two_threads(gateway: &Gateway) {
    let mut viewer = gateway.viewer("u1", "t_a").await;
    viewer.subscribe("t_b", None).await;
    let mut started = event("agent_started", "run_b", "t_b");
    started["event_id"] = "t_b-0".into();
    let items = Value::from(vec![
        thinking("t_a", 1),
        thinking("t_b", 1),
        thinking("t_a", 2),
        thinking("t_a", 1),
        started,
        thinking("t_b", 2),
        json!({"type": "agent_thinking", "thread_id": "t_a", "payload": "not an object"}),
        thinking("t_a", 3),
        thinking("t_b", 3),
    ]);
    let (status, answer) = gateway.post("/v1/events", &items.to_string()).await;
    assert_eq!(status, StatusCode::MULTI_STATUS, "{answer}");
    let answers: Vec<(String, Value)> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|result| {
            let status = result["status"].as_str().unwrap().to_string();
            (status, result["seq"].clone())
        })
        .collect();
    let accepted = |seq: u64| ("accepted".to_string(), Value::from(seq));
    let other = |status: &str| (status.to_string(), Value::Null);
    assert_eq!(
        answers,
        [
            accepted(1),
            accepted(1),
            accepted(2),
            other("duplicate"),
            accepted(2),
            accepted(3),
            other("error"),
            accepted(3),
            accepted(4),
        ],
        "{answer}"
    );
    let received: Vec<(String, u64)> = viewer
        .events(7)
        .await
        .iter()
        .map(|frame| {
            let channel = frame["channel"].as_str().unwrap().to_string();
            (channel, frame["seq"].as_u64().unwrap())
        })
        .collect();
    let of = |channel: &str| -> Vec<u64> {
        (received.iter())
            .filter(|(name, _)| name == channel)
            .map(|(_, seq)| *seq)
            .collect()
    };
    assert_eq!(of("thread:t_a"), [1, 2, 3], "{received:?}");
    assert_eq!(of("thread:t_b"), [1, 2, 3, 4], "{received:?}");
    viewer.silent_for(Duration::from_millis(300)).await;
    for (channel, emitted) in [("thread:t_a", 3), ("thread:t_b", 4)] {
        let ledger = ledger_until(gateway, channel, |ledger| ledger["pending"] == 0).await;
        assert_eq!(ledger["emitted"], emitted, "{ledger}");
        assert_eq!(ledger["delivered"], emitted, "{ledger}");
    }
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(&metrics, "agentwire_events_ingested_total"),
        8.0
    );
    assert_eq!(
        metric_value(&metrics, "agentwire_events_duplicate_total"),
        1.0
    );
}

#[tokio::test]
async fn one_request_is_published_per_channel_and_answered_item_by_item_in_order() {
    let redis = Redis::start().await;
    one_request_over_two_threads(&on_redis(&redis, |_| {}).await).await;
    one_request_over_two_threads(&Gateway::start().await).await;
}

#[tokio::test]
async fn a_client_resumes_on_another_replica_with_exactly_what_it_missed() {
    let redis = Redis::start().await;
    let a = replica(&redis, &[]).await;
    let b = replica(&redis, &[]).await;
    let c = replica(&redis, &[]).await;
    let mut client = Client::hello(a.addr, "u1").await;
    client.subscribe("t_resume", None).await;
    Gateway::at(&a)
        .publish(&(1..=5).map(|n| thinking("t_resume", n)).collect::<Vec<_>>())
        .await;
    let seen = client.events(5).await;
    let epoch = seen[4]["epoch"].clone();
    assert_eq!(seen[4]["seq"], 5);
    drop(client);
    Gateway::at(&c)
        .publish(&(6..=9).map(|n| thinking("t_resume", n)).collect::<Vec<_>>())
        .await;
    let mut client = Client::hello(b.addr, "u1").await;
    let subscribed = client
        .subscribe("t_resume", Some(json!({"epoch": epoch, "seq": 5})))
        .await;
    assert_eq!(
        (
            &subscribed["recovered"],
            &subscribed["replayed"],
            &subscribed["epoch"]
        ),
        (&json!(true), &json!(4), &epoch),
        "{subscribed}"
    );
    let missed = client.events(4).await;
    let seqs: Vec<u64> = missed.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![6, 7, 8, 9]);
    Gateway::at(&a).publish(&[thinking("t_resume", 10)]).await;
    assert_eq!(client.events(1).await[0]["seq"], 10);
    client.silent_for(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn ingest_stream_entries_are_published_once_when_a_replica_is_killed_midway() {
    let redis = Redis::start().await;
    let settings = [
        ("AGENTWIRE_BROKER__CLAIM_IDLE", "2s"),
        ("AGENTWIRE_RESOLVE__GRACE", "500ms"),
        ("AGENTWIRE_HISTORY__MAX_EVENTS", "5000"),
    ];
    // A replica that died before this test's replicas started: it read 50 entries and never
    // acknowledged them, so only XAUTOCLAIM can bring them back.
    let mut conn = redis.conn().await;
    let () = conn
        .xgroup_create_mkstream("aw:ingest", "agentwire", "0")
        .await
        .unwrap();
    let add = |from: usize, to: usize| {
        let mut pipe = redis::pipe();
        for n in from..=to {
            pipe.xadd(
                "aw:ingest",
                "*",
                &[("event", thinking("t_stream", n).to_string())],
            )
            .ignore();
        }
        pipe
    };
    let () = add(1, 50).query_async(&mut conn).await.unwrap();
    let taken: redis::streams::StreamReadReply = conn
        .xread_options(
            &["aw:ingest"],
            &[">"],
            &redis::streams::StreamReadOptions::default()
                .group("agentwire", "dead-replica")
                .count(50),
        )
        .await
        .unwrap();
    assert_eq!(taken.keys[0].ids.len(), 50);

    let doomed = replica(&redis, &settings).await;
    let survivor = replica(&redis, &settings).await;
    let mut client = Client::hello(survivor.addr, "u1").await;
    client.subscribe("t_stream", None).await;
    let mut doomed = Some(doomed);
    for chunk in 0..19 {
        let from = 51 + chunk * 50;
        let () = add(from, from + 49).query_async(&mut conn).await.unwrap();
        if chunk == 9 {
            // Mid-way: whatever it had read and not acknowledged is claimed by the survivor.
            doomed.take().unwrap().signal("KILL");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let events = client.events(1000).await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
    let ns: BTreeSet<u64> = events
        .iter()
        .map(|e| e["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns.len(), 1000, "every entry exactly once");
    client.silent_for(Duration::from_millis(500)).await;
    let ledger = ledger_until(&Gateway::at(&survivor), "thread:t_stream", |l| {
        l["delivered"] == 1000
    })
    .await;
    assert_eq!(
        (
            &ledger["emitted"],
            &ledger["pending"],
            &ledger["lost_total"]
        ),
        (&json!(1000), &json!(0), &json!(0)),
        "{ledger}"
    );
    // Every entry is acknowledged (the killed replica's after a claim), and acknowledged entries
    // do not pile up in the stream.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let pending: redis::streams::StreamPendingReply =
            conn.xpending("aw:ingest", "agentwire").await.unwrap();
        let len: usize = conn.xlen("aw:ingest").await.unwrap();
        if pending.count() == 0 && len == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} pending, {len} entries left",
            pending.count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One read of the ingest stream over two threads, with a malformed entry and two entries of a run
/// nobody registered yet between them: the threads' entries are published together, in order;
/// the run's wait, in order, until its registration, and come after it.
#[tokio::test]
async fn one_read_of_the_ingest_stream_is_published_per_channel_and_a_waiting_run_keeps_its_order()
{
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut viewer = gateway.viewer("u1", "t_a").await;
    viewer.subscribe("t_b", None).await;
    viewer.subscribe("t_w", None).await;
    let waiting = |n: usize| {
        let mut event = json!({"type": "agent_thinking", "run_id": "r_wait", "payload": {"n": n}});
        event["event_id"] = format!("w-{n}").into();
        event
    };
    let entries = [
        thinking("t_a", 1),
        waiting(1),
        thinking("t_b", 1),
        json!({"type": "agent_thinking"}),
        waiting(2),
        thinking("t_a", 2),
        thinking("t_b", 2),
    ];
    let mut pipe = redis::pipe();
    pipe.atomic();
    for entry in &entries {
        pipe.xadd("aw:ingest", "*", &[("event", entry.to_string())])
            .ignore();
    }
    let mut conn = redis.conn().await;
    let () = pipe.query_async(&mut conn).await.unwrap();
    let received: Vec<(String, u64, u64)> = viewer
        .events(4)
        .await
        .iter()
        .map(|frame| {
            let channel = frame["channel"].as_str().unwrap().to_string();
            let n = frame["payload"]["n"].as_u64().unwrap();
            (channel, frame["seq"].as_u64().unwrap(), n)
        })
        .collect();
    let of = |channel: &str| -> Vec<(u64, u64)> {
        (received.iter())
            .filter(|(name, _, _)| name == channel)
            .map(|(_, seq, n)| (*seq, *n))
            .collect()
    };
    assert_eq!(of("thread:t_a"), [(1, 1), (2, 2)], "{received:?}");
    assert_eq!(of("thread:t_b"), [(1, 1), (2, 2)], "{received:?}");
    viewer.silent_for(Duration::from_millis(300)).await;
    let mut started = event("agent_started", "r_wait", "t_w");
    started["payload"]["n"] = 0.into();
    gateway.publish(&[started]).await;
    let run: Vec<(u64, u64)> = viewer
        .events(3)
        .await
        .iter()
        .map(|frame| {
            assert_eq!(frame["channel"], "thread:t_w", "{frame}");
            let n = frame["payload"]["n"].as_u64().unwrap();
            (frame["seq"].as_u64().unwrap(), n)
        })
        .collect();
    assert_eq!(run, [(1, 0), (2, 1), (3, 2)]);
    viewer.silent_for(Duration::from_millis(300)).await;
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(&metrics, "agentwire_events_ingested_total"),
        7.0
    );
    let pending: redis::streams::StreamPendingReply =
        conn.xpending("aw:ingest", "agentwire").await.unwrap();
    assert_eq!(pending.count(), 0, "every entry acknowledged");
}

/// A delivery counts only for an entry the stream still holds: after `meta.trimmed` and up to
/// `last_seq`. A channel trimmed before `trimmed` was kept learns it from its first entry.
#[tokio::test]
async fn deliveries_count_only_what_the_stream_holds_also_on_a_channel_trimmed_before_trimmed_was_kept()
 {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |c| c.history.max_events = 2).await;
    gateway
        .publish(&[
            thinking("t_trim", 1),
            thinking("t_trim", 2),
            thinking("t_trim", 3),
        ])
        .await;
    let mut conn = redis.conn().await;
    let meta = "aw:{thread:t_trim}:meta";
    let trimmed: Option<String> = conn.hget(meta, "trimmed").await.unwrap();
    assert_eq!(trimmed.as_deref(), Some("1"));
    let () = conn.hdel(meta, "trimmed").await.unwrap();
    let mut viewer = gateway.client("u1").await;
    viewer.subscribe("t_trim", Some(json!({"seq": 0}))).await;
    let seqs: Vec<u64> = (viewer.events(2).await.iter())
        .map(|frame| frame["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3]);
    let ledger = ledger_until(&gateway, "thread:t_trim", |l| l["delivered"] == 2).await;
    assert_eq!(ledger["emitted"], 3, "{ledger}");
    assert_eq!(ledger["pending"], 0, "{ledger}");
    assert_eq!(ledger["lost"]["expired_unseen"], 1, "{ledger}");
    assert_eq!(ledger["balanced"], true, "{ledger}");
    let trimmed: Option<String> = conn.hget(meta, "trimmed").await.unwrap();
    assert_eq!(trimmed.as_deref(), Some("1"));
    // A report for a seq the stream does not hold (trimmed, or past `last_seq`) counts nothing.
    let delivered: u64 = redis::cmd("EVAL")
        .arg(include_str!("../../src/broker/redis/deliver.lua"))
        .arg(3)
        .arg("aw:{thread:t_trim}:log")
        .arg(meta)
        .arg("aw:{thread:t_trim}:delivered")
        .arg(ledger["epoch"].as_str().unwrap())
        .arg(1)
        .arg(4)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(delivered, 0);
}

#[tokio::test]
async fn a_malformed_ingest_entry_is_set_aside_with_its_reason_and_does_not_block() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut client = gateway.client("u1").await;
    client.subscribe("t_bad", None).await;
    let mut conn = redis.conn().await;
    let _: String = conn
        .xadd(
            "aw:ingest",
            "*",
            &[("event", r#"{"type":"agent_thinking"}"#)],
        )
        .await
        .unwrap();
    let _: String = conn
        .xadd("aw:ingest", "*", &[("other", "x")])
        .await
        .unwrap();
    let _: String = conn
        .xadd(
            "aw:ingest",
            "*",
            &[("event", thinking("t_bad", 1).to_string())],
        )
        .await
        .unwrap();
    assert_eq!(client.events(1).await[0]["payload"]["n"], 1);
    let dead: redis::streams::StreamRangeReply = conn.xrange_all("aw:ingest:dead").await.unwrap();
    let reasons: Vec<String> = dead
        .ids
        .iter()
        .map(|entry| entry.get::<String>("reason").unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("run_id"), "{reasons:?}");
    assert!(reasons[1].contains("`event`"), "{reasons:?}");
    // The operator sees them beside the dead letters, newest first.
    let (_, letters) = gateway.get("/v1/deadletter").await;
    assert_eq!(
        letters["malformed"].as_array().unwrap().len(),
        2,
        "{letters}"
    );
    assert_eq!(letters["malformed"][1]["reason"], reasons[0].as_str());
}

#[tokio::test]
async fn redis_going_away_is_visible_survivable_and_honest_about_lost_history() {
    let mut redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut client = gateway.client("u1").await;
    let first = client.subscribe("t_outage", None).await;
    gateway
        .publish(&(1..=3).map(|n| thinking("t_outage", n)).collect::<Vec<_>>())
        .await;
    assert_eq!(client.events(3).await[2]["seq"], 3);

    redis.stop();
    // Readiness stays on through the outage (Redis answered once since start): the Service
    // keeps its endpoints, ingest answers 503 and agentwire_broker_up is the signal.
    let mut down = false;
    for _ in 0..200 {
        if gateway.metric("agentwire_broker_up").await == 0.0 {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(down, "agentwire_broker_up turns 0 while Redis is away");
    let (status, text) = http(gateway.internal, "GET", "/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.contains("\"broker_up\":false"), "{text}");
    let (status, text) = http(
        gateway.internal,
        "POST",
        "/v1/events",
        Some(("application/json", &thinking("t_outage", 4).to_string())),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("broker_unavailable"), "{text}");
    client.barrier().await;

    redis.restart().await;
    for _ in 0..200 {
        if gateway.metric("agentwire_broker_up").await == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gateway.metric("agentwire_broker_up").await, 1.0);
    let (status, text) = http(gateway.internal, "GET", "/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(text.contains("\"broker_up\":true"), "{text}");
    // Redis kept nothing: the thread starts over in a new epoch, and the client is told so. Its
    // user channel never had an event, so it had no epoch to lose and is not renewed.
    let renewed = client.recv().await;
    assert_eq!(renewed["channel"], "thread:t_outage", "{renewed}");
    assert_eq!(client.user_channel["epoch"], "", "{}", client.user_channel);
    assert_eq!(
        (&renewed["type"], &renewed["recovered"]),
        (&json!("subscribed"), &json!(false)),
        "{renewed}"
    );
    assert_ne!(renewed["epoch"], first["epoch"]);
    let answer = gateway.publish(&[thinking("t_outage", 5)]).await;
    assert_eq!(answer["results"][0]["seq"], 1, "{answer}");
    let event = client.events(1).await.remove(0);
    assert_eq!(
        (&event["seq"], &event["epoch"]),
        (&json!(1), &renewed["epoch"])
    );
}

#[tokio::test]
async fn a_redis_connection_gone_silent_is_replaced_and_nothing_is_lost_or_shown_twice() {
    // Between the gateway and Redis, a proxy that can make its connections go silent, as a NAT
    // or load balancer that forgot them: no error, no close, no answer. The redis crate repairs
    // lost connections, not silent ones.
    let redis = Redis::start().await;
    let proxy = SilencingProxy::start(redis.port).await;
    let url = format!("redis://127.0.0.1:{}/", proxy.port);
    let gateway = Gateway::start_with(|c| c.broker.redis_url = Some(url)).await;
    wait_ready(gateway.internal, StatusCode::OK).await;
    let mut client = gateway.client("u1").await;
    client.subscribe("t_silent", None).await;
    gateway.publish(&[thinking("t_silent", 1)]).await;
    assert_eq!(client.events(1).await[0]["seq"], 1);

    proxy.silence();
    // Redis still answers a fresh connection: ingest comes back by itself, the producer
    // retrying as it would after a 503.
    let retried = thinking("t_silent", 2).to_string();
    eventually("ingest accepts again", async || {
        let (status, text) = http(
            gateway.internal,
            "POST",
            "/v1/events",
            Some(("application/json", &retried)),
        )
        .await;
        match (status, text.contains("\"accepted\"")) {
            (StatusCode::OK, true) => Ok(()),
            _ => Err(format!("{status} {text}")),
        }
    })
    .await;
    assert!(
        gateway
            .metric("agentwire_redis_connections_replaced_total")
            .await
            >= 1.0
    );
    gateway.publish(&[thinking("t_silent", 3)]).await;
    // The viewer's pub/sub link went silent too; it is made again and reads the stream.
    let shown = client.events(2).await;
    assert_eq!(
        shown
            .iter()
            .map(|e| (e["seq"].clone(), e["payload"]["n"].clone()))
            .collect::<Vec<_>>(),
        vec![(json!(2), json!(2)), (json!(3), json!(3))]
    );
    // Nothing shown twice, nothing lost.
    client.barrier().await;
    let ledger = ledger_until(&gateway, "thread:t_silent", |l| l["delivered"] == 3).await;
    assert_eq!(
        (&ledger["emitted"], &ledger["lost_total"]),
        (&json!(3), &json!(0)),
        "{ledger}"
    );
}

#[tokio::test]
async fn a_gateway_whose_redis_is_down_at_start_is_not_ready_and_refuses_ingest() {
    let mut redis = Redis::start().await;
    let url = redis.url();
    redis.stop();
    let gateway = Gateway::start_with(|c| c.broker.redis_url = Some(url)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, text) = http(gateway.internal, "GET", "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("\"broker\":\"redis\""), "{text}");
    assert!(text.contains("\"status\":\"broker_unavailable\""), "{text}");
    let (status, _) = gateway
        .post("/v1/events", &thinking("t1", 1).to_string())
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    // The first answer makes it ready.
    redis.restart().await;
    wait_ready(gateway.internal, StatusCode::OK).await;
}

#[tokio::test]
async fn hlink_messages_land_in_ui_events_with_the_sender_and_bad_ones_name_the_field() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut client = gateway.client("u_hlink").await;
    client
        .send(json!({"type": "user_message", "id": "m-1",
                     "sender": {"agent_id": "browser", "role": "user"},
                     "recipient": {"target": "agent", "agent_id": "planner"},
                     "payload": {"text": "hi"}}))
        .await;
    let ack = client.recv().await;
    assert_eq!(ack["type"], "websocket_ack", "{ack}");
    let entry_id = ack["entry_id"].as_str().unwrap().to_string();
    let mut conn = redis.conn().await;
    let stream: redis::streams::StreamRangeReply = conn.xrange_all("ui_events").await.unwrap();
    assert_eq!(stream.ids.len(), 1);
    let entry = &stream.ids[0];
    assert_eq!(entry.id, entry_id);
    assert_eq!(entry.get::<String>("user_id").unwrap(), "u_hlink");
    assert_eq!(entry.get::<String>("type").unwrap(), "user_message");
    let message: Value = serde_json::from_str(&entry.get::<String>("message").unwrap()).unwrap();
    assert_eq!(message["payload"]["text"], "hi");
    assert_eq!(message["message_id"], ack["message_id"]);
    assert!(message["connection_id"].is_string());

    for (frame, field) in [
        (
            json!({"type": "user_message", "recipient": {"target": "agent"}, "payload": {}}),
            "sender",
        ),
        (
            json!({"type": "user_message", "sender": {"agent_id": "b", "role": "user"}, "payload": {}}),
            "recipient",
        ),
        (
            json!({"type": "user_message", "sender": {"agent_id": "b", "role": "user"}, "recipient": {"target": "agent"}}),
            "payload",
        ),
        (
            json!({"type": "expert.response", "sender": {"role": "user"}, "recipient": {"target": "agent"}, "payload": {}}),
            "sender.agent_id",
        ),
    ] {
        client.send(frame.clone()).await;
        let error = client.recv().await;
        assert_eq!(error["type"], "error", "{frame} → {error}");
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "{frame} → {error}"
        );
    }
    let stream: redis::streams::StreamRangeReply = conn.xrange_all("ui_events").await.unwrap();
    assert_eq!(stream.ids.len(), 1, "invalid messages are not appended");
}

#[tokio::test]
async fn a_registration_on_one_replica_releases_events_held_on_another() {
    let redis = Redis::start().await;
    let holding = on_redis(&redis, |_| {}).await;
    let registering = on_redis(&redis, |_| {}).await;
    let mut client = registering.client("u1").await;
    client.subscribe("t_late", None).await;
    let answer = holding
        .publish(&[json!({"type": "agent_thinking", "run_id": "r_late", "payload": {"n": 1}})])
        .await;
    assert_eq!(
        answer["results"][0]["status"], "pending_resolution",
        "{answer}"
    );
    let (status, registered) = registering
        .post(
            "/v1/runs",
            &json!({"run_id": "r_late", "thread_id": "t_late"}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{registered}");
    let event = client.events(1).await.remove(0);
    assert_eq!(
        (&event["seq"], &event["run_id"], &event["payload"]["n"]),
        (&json!(1), &json!("r_late"), &json!(1)),
        "{event}"
    );
    // Later events of the run find the thread through the shared registry on any replica.
    let answer = holding
        .publish(&[json!({"type": "agent_thinking", "run_id": "r_late", "payload": {"n": 2}})])
        .await;
    assert_eq!(answer["results"][0]["channel"], "thread:t_late", "{answer}");
    assert_eq!(client.events(1).await[0]["payload"]["n"], 2);
}

#[tokio::test]
async fn a_run_stalled_on_two_replicas_is_reported_to_its_channel_once() {
    let redis = Redis::start().await;
    let quick = |c: &mut Config| {
        c.watchdog.run_idle_timeout = Duration::from_secs(1);
    };
    let a = on_redis(&redis, quick).await;
    let b = on_redis(&redis, quick).await;
    let mut client = a.client("u1").await;
    client.subscribe("t_stall", None).await;
    // Both replicas follow the run: each saw one of its events.
    a.publish(&[event("agent_started", "run_stall", "t_stall")])
        .await;
    b.publish(&[event("agent_thinking", "run_stall", "t_stall")])
        .await;
    let events = client.events(3).await;
    assert_eq!(events[2]["type"], "agent_error", "{events:?}");
    assert_eq!(events[2]["payload"]["reason"], "stalled");
    client.silent_for(Duration::from_millis(1500)).await;
    let stalls = a.metric("agentwire_runs_stalled_total").await
        + b.metric("agentwire_runs_stalled_total").await;
    assert_eq!(stalls, 1.0, "counted once across the replicas");
    assert_eq!(
        a.metric("agentwire_runs_active").await + b.metric("agentwire_runs_active").await,
        0.0
    );
}

#[tokio::test]
async fn a_stalled_runs_agent_error_that_fails_by_our_fault_is_given_up_and_counted() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |c| {
        c.watchdog.run_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let mut client = gateway.client("u1").await;
    client.subscribe("t_untold", None).await;
    gateway
        .publish(&[event("agent_started", "run_untold", "t_untold")])
        .await;
    assert_eq!(client.events(1).await[0]["type"], "agent_started");
    let errors = gateway.metric("agentwire_broker_errors_total").await;
    // The channel's stream key holds a string: the publish script fails (WRONGTYPE) while the
    // stall's claim, another key, succeeds. A retry would fail alike (and take a seq each time).
    let mut conn = redis.conn().await;
    let _: () = conn.del("aw:{thread:t_untold}:log").await.unwrap();
    let _: () = conn
        .set("aw:{thread:t_untold}:log", "not a stream")
        .await
        .unwrap();
    eventually(
        "the run counted stalled, its agent_error given up",
        async || {
            let stalled = gateway.metric("agentwire_runs_stalled_total").await;
            let given_up = gateway.metric("agentwire_broker_errors_total").await - errors;
            match (stalled, given_up >= 1.0) {
                (1.0, true) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let _: () = conn.del("aw:{thread:t_untold}:log").await.unwrap();
    client.silent_for(Duration::from_millis(1500)).await;
    assert_eq!(
        gateway.metric("agentwire_events_generated_total").await,
        0.0
    );
}

#[tokio::test]
async fn held_events_whose_registration_was_never_announced_here_find_it_at_the_end_of_the_grace() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |c| {
        c.resolve.grace = Duration::from_secs(2);
    })
    .await;
    let mut client = gateway.client("u1").await;
    client.subscribe("t_quiet", None).await;
    let mut conn = redis.conn().await;
    let answer = gateway
        .publish(&[json!({"type": "agent_thinking", "run_id": "run_quiet", "payload": {}})])
        .await;
    assert_eq!(answer["results"][0]["status"], "pending_resolution");
    // Registered in the shared registry without the announcement (as if this replica's pub/sub
    // connection was away, and its lookup after reconnecting failed).
    let _: () = conn
        .hset(
            "aw:{runs}:target",
            "run_quiet",
            json!({"thread_id": "t_quiet"}).to_string(),
        )
        .await
        .unwrap();
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 60_000;
    let _: () = conn
        .zadd("aw:{runs}:expiry", "run_quiet", until)
        .await
        .unwrap();
    let event = client.recv().await;
    assert_eq!(
        (&event["run_id"], &event["seq"]),
        (&json!("run_quiet"), &json!(1)),
        "{event}"
    );
    assert_eq!(
        gateway
            .metric("agentwire_events_lost_total{reason=\"unresolved\"}")
            .await,
        0.0
    );
    assert_eq!(gateway.get("/v1/deadletter").await.1["count"], 0);
}

/// The `redis` bench scenario cannot rot: small, two in-process replicas, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_bench_scenario_completes_with_nothing_lost() {
    let redis = Redis::start().await;
    let a = on_redis(&redis, |_| {}).await;
    let b = on_redis(&redis, |_| {}).await;
    let url = |addr| format!("http://{addr}");
    let (url_a, url_b) = (url(a.addr), url(b.addr));
    let (api_a, api_b) = (url(a.internal), url(b.internal));
    let result = crate::support::bench(&[
        "bench",
        "--url",
        &url_a,
        "--api-url",
        &api_a,
        "--sources",
        "4",
        "redis",
        "--second-url",
        &url_b,
        "--second-api-url",
        &api_b,
        "--connections",
        "100",
        "--threads",
        "10",
        "--events",
        "500",
        "--rate",
        "1000",
        "--max-time",
        "30s",
    ])
    .await;
    assert_eq!(
        (&result["scenario"], &result["replicas"]),
        (&json!("redis"), &json!(2))
    );
}

#[tokio::test]
async fn a_failover_that_lost_the_latest_writes_starts_a_new_epoch_instead_of_reusing_seqs() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut client = gateway.client("u1").await;
    let first = client.subscribe("t_failover", None).await;
    gateway
        .publish(
            &(1..=5)
                .map(|n| thinking("t_failover", n))
                .collect::<Vec<_>>(),
        )
        .await;
    assert_eq!(client.events(5).await[4]["seq"], 5);
    // What a promoted replica that missed the last three writes looks like, then the lost link.
    let mut conn = redis.conn().await;
    let () = redis::pipe()
        .hset("aw:{thread:t_failover}:meta", "last_seq", 2)
        .ignore()
        .xdel("aw:{thread:t_failover}:log", &["3-0", "4-0", "5-0"])
        .ignore()
        .cmd("XSETID")
        .arg("aw:{thread:t_failover}:log")
        .arg("2-0")
        .ignore()
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let renewed = client.recv().await;
    assert_eq!(
        (&renewed["type"], &renewed["channel"], &renewed["recovered"]),
        (
            &json!("subscribed"),
            &json!("thread:t_failover"),
            &json!(false)
        ),
        "{renewed}"
    );
    assert_ne!(renewed["epoch"], first["epoch"]);
    assert_eq!(renewed["replayed"], 2, "{renewed}");
    let replayed = client.events(2).await;
    assert_eq!(
        replayed
            .iter()
            .map(|e| e["seq"].clone())
            .collect::<Vec<_>>(),
        vec![json!(1), json!(2)]
    );
    let answer = gateway.publish(&[thinking("t_failover", 6)]).await;
    assert_eq!(answer["results"][0]["seq"], 3, "{answer}");
    assert_eq!(answer["results"][0]["epoch"], renewed["epoch"], "{answer}");
    let event = client.events(1).await.remove(0);
    assert_eq!(
        (&event["seq"], &event["epoch"]),
        (&json!(3), &renewed["epoch"])
    );
}

#[tokio::test]
async fn history_past_its_age_leaves_redis_and_is_counted_lost_unseen() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |c| {
        c.history.max_age = Duration::from_millis(400);
    })
    .await;
    gateway
        .publish(&(1..=3).map(|n| thinking("t_aged", n)).collect::<Vec<_>>())
        .await;
    let ledger = ledger_until(&gateway, "thread:t_aged", |l| l["retained"] == 0).await;
    assert_eq!(
        (
            &ledger["emitted"],
            &ledger["pending"],
            &ledger["lost"]["expired_unseen"]
        ),
        (&json!(3), &json!(0), &json!(3)),
        "{ledger}"
    );
    assert_eq!(ledger["balanced"], true);
    assert_eq!(
        gateway
            .metric("agentwire_events_lost_total{reason=\"expired_unseen\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn dead_letters_are_shared_and_a_redrive_on_any_replica_delivers_them_once() {
    let redis = Redis::start().await;
    let quick = |c: &mut Config| {
        c.resolve.grace = Duration::from_millis(200);
    };
    let a = on_redis(&redis, quick).await;
    let b = on_redis(&redis, quick).await;
    let answer = a
        .publish(&[json!({"type": "agent_thinking", "run_id": "r_lost", "payload": {"n": 1}})])
        .await;
    assert_eq!(answer["results"][0]["status"], "pending_resolution");
    // Dead-lettered on A, listed on B.
    let deadline = std::time::Instant::now() + WAIT;
    let letters = loop {
        let (_, letters) = b.get("/v1/deadletter").await;
        if letters["count"] == 1 {
            break letters;
        }
        assert!(std::time::Instant::now() < deadline, "{letters}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letters["events"][0]["run_id"], "r_lost", "{letters}");
    assert!(letters["events"][0]["id"].is_string(), "{letters}");

    let mut client = b.client("u1").await;
    client.subscribe("t_found", None).await;
    b.post(
        "/v1/runs",
        &json!({"run_id": "r_lost", "thread_id": "t_found"}).to_string(),
    )
    .await;
    let (redriven_a, redriven_b) = tokio::join!(
        a.post("/v1/deadletter/redrive", ""),
        b.post("/v1/deadletter/redrive", "")
    );
    let delivered = [&redriven_a.1, &redriven_b.1]
        .iter()
        .map(|r| r["delivered"].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(delivered, 1, "{redriven_a:?} {redriven_b:?}");
    let event = client.events(1).await.remove(0);
    assert_eq!(
        (&event["run_id"], &event["seq"]),
        (&json!("r_lost"), &json!(1))
    );
    client.silent_for(Duration::from_millis(300)).await;
    assert_eq!(a.get("/v1/deadletter").await.1["count"], 0);
}

#[tokio::test]
async fn dead_letters_past_the_capacity_are_trimmed_oldest_first_and_counted() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |c| {
        c.resolve.grace = Duration::from_millis(200);
        c.deadletter.capacity = 3;
    })
    .await;
    // One at a time, so the letters are written in this order (one expiry's are in any order).
    for n in 1..=5 {
        let lost = json!({"type": "agent_thinking", "run_id": format!("r_gone{n}"), "payload": {}});
        let answer = gateway.publish(&[lost]).await;
        assert_eq!(answer["results"][0]["status"], "pending_resolution");
        eventually("the letter written", async || {
            let (_, letters) = gateway.get("/v1/deadletter").await;
            let runs = letters["events"].as_array().cloned().unwrap_or_default();
            match runs.iter().any(|l| l["run_id"] == format!("r_gone{n}")) {
                true => Ok(()),
                false => Err(letters.to_string()),
            }
        })
        .await;
    }
    let letters = eventually("five letters written, three kept", async || {
        let dropped = gateway.metric("agentwire_deadletters_dropped_total").await;
        let (_, letters) = gateway.get("/v1/deadletter").await;
        match (dropped, &letters["count"]) {
            (2.0, count) if count == 3 => Ok(letters),
            _ => Err(format!("dropped {dropped}: {letters}")),
        }
    })
    .await;
    let runs: Vec<&str> = (letters["events"].as_array().unwrap().iter())
        .map(|letter| letter["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(runs, ["r_gone3", "r_gone4", "r_gone5"], "{letters}");
}

#[tokio::test]
async fn a_run_that_goes_on_or_ends_through_another_replica_is_not_called_stalled() {
    let redis = Redis::start().await;
    let quick = |c: &mut Config| {
        c.watchdog.run_idle_timeout = Duration::from_secs(1);
    };
    let a = on_redis(&redis, quick).await;
    let b = on_redis(&redis, quick).await;
    let mut client = a.client("u1").await;
    client.subscribe("t_busy", None).await;
    // A sees only the start; the run goes on through B for two and a half times the idle timeout.
    a.publish(&[event("agent_started", "run_busy", "t_busy")])
        .await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.publish(&[event("agent_thinking", "run_busy", "t_busy")])
            .await;
    }
    b.publish(&[event("agent_completed", "run_busy", "t_busy")])
        .await;
    let kinds: Vec<Value> = client
        .events(10)
        .await
        .iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(kinds[0], "agent_started");
    assert_eq!(kinds[9], "agent_completed", "{kinds:?}");
    assert!(!kinds.contains(&json!("agent_error")), "{kinds:?}");
    client.silent_for(Duration::from_millis(2000)).await;
    assert_eq!(a.metric("agentwire_runs_stalled_total").await, 0.0);
    assert_eq!(a.metric("agentwire_runs_active").await, 0.0);
}

#[tokio::test]
async fn an_ingest_entry_whose_run_never_registers_becomes_a_shared_dead_letter() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |c| {
        c.resolve.grace = Duration::from_millis(300);
    })
    .await;
    let mut conn = redis.conn().await;
    let unresolved = json!({"type": "agent_thinking", "run_id": "r_nowhere", "payload": {}});
    let _: String = conn
        .xadd("aw:ingest", "*", &[("event", unresolved.to_string())])
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let letters = loop {
        let (_, letters) = gateway.get("/v1/deadletter").await;
        if letters["count"] == 1 {
            break letters;
        }
        assert!(std::time::Instant::now() < deadline, "{letters}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letters["events"][0]["run_id"], "r_nowhere", "{letters}");
    assert_eq!(
        letters["events"][0]["reason"],
        "no channel within resolve.grace"
    );
    assert_eq!(
        gateway.metric("agentwire_unresolved_run_ids_total").await,
        1.0
    );
    assert_eq!(
        gateway
            .metric("agentwire_events_lost_total{reason=\"unresolved\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_registered_on_one_replica_cannot_be_re_pointed_on_another() {
    let redis = Redis::start().await;
    let a = on_redis(&redis, |_| {}).await;
    let b = on_redis(&redis, |_| {}).await;
    let register = |thread: &str| json!({"run_id": "run_x", "thread_id": thread}).to_string();
    assert_eq!(a.post("/v1/runs", &register("t_owner")).await.0, 200);
    let (status, body) = b.post("/v1/runs", &register("t_thief")).await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (409, Some("run_conflict")),
        "{body}"
    );
    assert_eq!(
        b.post("/v1/runs", &register("t_owner")).await.0,
        200,
        "the same registration"
    );
    assert_eq!(
        b.metric("agentwire_runs_refused_total{reason=\"conflict\"}")
            .await,
        1.0,
        "counted where it was refused"
    );
}

/// `rediss://`: the gateway talks TLS to Redis, verifying the server with `broker.redis_ca_file`;
/// without that CA the server's certificate is not trusted and the gateway stays not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_configured_ca() {
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let certificates = crate::support::Certificates::make();
    let (ca, cert, key) = (&certificates.ca, &certificates.cert, &certificates.key);
    let port = crate::support::free_port();
    let _redis = Stop(
        std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("rediss://localhost:{port}/");
    let gateway = Gateway::start_with(|c| {
        c.broker.redis_url = Some(url.clone());
        c.broker.redis_ca_file = Some(ca.clone());
    })
    .await;
    wait_ready(gateway.internal, StatusCode::OK).await;
    let mut client = gateway.client("u_tls").await;
    client.subscribe("t_tls", None).await;
    gateway.publish(&[thinking("t_tls", 1)]).await;
    assert_eq!(client.events(1).await[0]["channel"], "thread:t_tls");

    let untrusting = Gateway::start_with(|c| c.broker.redis_url = Some(url)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = http(untrusting.internal, "GET", "/readyz", None).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a server it cannot verify"
    );
}

#[tokio::test]
async fn a_publish_that_fails_by_our_fault_is_answered_internal_and_counted_lost() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |c| {
        c.ledger.snapshot_interval = Duration::from_millis(10)
    })
    .await;
    // The channel's stream key holds a string: XADD inside publish.lua fails with WRONGTYPE, an
    // error that is ours (Internal), not Redis being away.
    let mut conn = redis.conn().await;
    let _: () = conn
        .set("aw:{thread:t_bad}:log", "not a stream")
        .await
        .unwrap();

    let body = Value::Array(vec![thinking("t_ok", 1), thinking("t_bad", 1)]).to_string();
    let (status, answer) = gateway.post("/v1/events", &body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    assert_eq!(answer["results"][0]["status"], "accepted", "{answer}");
    assert_eq!(answer["results"][1]["status"], "error", "{answer}");
    assert_eq!(answer["results"][1]["code"], "internal", "{answer}");
    assert_eq!(answer["failed"], 1, "{answer}");
    // Redis is up: readiness and ingest elsewhere are untouched.
    assert_eq!(http(gateway.internal, "GET", "/readyz", None).await.0, 200);

    let metrics = gateway.metrics().await;
    let value = |series: &str| crate::support::metric_value(&metrics, series);
    assert_eq!(
        value("agentwire_events_lost_total{reason=\"internal\"}"),
        1.0
    );
    // ingested + generated + redriven = emitted + pending_resolution + lost{unresolved}
    //   + lost{internal} + duplicates
    assert_eq!(value("agentwire_events_ingested_total"), 2.0);
    assert_eq!(value("agentwire_events_emitted_total"), 1.0);
    assert_eq!(
        value("agentwire_events_ingested_total"),
        value("agentwire_events_emitted_total")
            + value("agentwire_events_pending_resolution")
            + value("agentwire_events_lost_total{reason=\"unresolved\"}")
            + value("agentwire_events_lost_total{reason=\"internal\"}")
            + value("agentwire_events_duplicate_total")
    );
    // The channel ledgers balance without it: it never had a seq.
    assert_eq!(
        value("agentwire_events_emitted_total"),
        value("agentwire_events_delivered_total")
            + value("agentwire_events_pending")
            + value("agentwire_events_lost_total{reason=\"expired_unseen\"}")
            + value("agentwire_events_lost_total{reason=\"expired_subscribed\"}")
    );
}

#[tokio::test]
async fn every_replica_exports_the_clusters_balance_and_an_unbalanced_channel_shows_on_all() {
    let redis = Redis::start().await;
    let fast = |c: &mut Config| c.ledger.snapshot_interval = Duration::from_millis(50);
    let a = on_redis(&redis, fast).await;
    let b = on_redis(&redis, fast).await;
    let mut client = b.client("u1").await;
    client.subscribe("t_bal", None).await;
    a.publish(&[thinking("t_bal", 1), thinking("t_bal", 2)])
        .await;
    client.events(2).await;
    // Another channel nobody watches keeps its events pending.
    a.publish(&[thinking("t_away", 1)]).await;
    ledger_until(&a, "thread:t_bal", |l| l["delivered"] == 2).await;

    // Both replicas show the same cluster figures, whoever emitted or delivered.
    cluster_figures_until(&a, (1.0, 0.0)).await;
    cluster_figures_until(&b, (1.0, 0.0)).await;

    // A counting bug in the shared ledger (here: an emitted count nothing accounts for) shows on
    // every replica, once: the cluster's figure, not a replica's share of it.
    let mut conn = redis.conn().await;
    let () = conn
        .hincr("aw:{thread:t_bal}:meta", "emitted", 1)
        .await
        .expect("corrupt the ledger");
    cluster_figures_until(&a, (1.0, 1.0)).await;
    cluster_figures_until(&b, (1.0, 1.0)).await;
    let (_, ledger) = b.get("/v1/ledger").await;
    assert_eq!(ledger["channels"]["unbalanced"], 1, "{ledger}");
    assert_eq!(ledger["channels"]["balanced"], false, "{ledger}");
}

/// Waits until `gateway`'s `/metrics` shows (cluster pending, unbalanced channels) = `want`.
async fn cluster_figures_until(gateway: &Gateway, want: (f64, f64)) {
    eventually("the cluster figures", async || {
        let exposition = gateway.metrics().await;
        let got = (
            metric_value(&exposition, "agentwire_cluster_events_pending"),
            metric_value(&exposition, "agentwire_cluster_ledger_unbalanced_channels"),
        );
        match got == want {
            true => Ok(()),
            false => Err(format!("{got:?}, not {want:?}")),
        }
    })
    .await;
}

/// An ingest stream entry the broker fails on by our fault (its channel's stream key holds a
/// string, so publish.lua fails with WRONGTYPE) would fail the same way forever: it is
/// dead-lettered, counted `lost{internal}` once and acknowledged, and the entries around it are
/// delivered.
#[tokio::test]
async fn an_ingest_entry_that_fails_by_our_fault_is_dead_lettered_counted_once_and_acked() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut client = gateway.client("u1").await;
    client.subscribe("t_fine", None).await;
    let mut conn = redis.conn().await;
    let _: () = conn
        .set("aw:{thread:t_broken}:log", "not a stream")
        .await
        .unwrap();
    for event in [
        thinking("t_fine", 1),
        thinking("t_broken", 1),
        thinking("t_fine", 2),
    ] {
        let _: String = conn
            .xadd("aw:ingest", "*", &[("event", event.to_string())])
            .await
            .unwrap();
    }
    let delivered: Vec<Value> = client
        .events(2)
        .await
        .iter()
        .map(|e| e["payload"]["n"].clone())
        .collect();
    assert_eq!(delivered, [json!(1), json!(2)]);

    let deadline = std::time::Instant::now() + WAIT;
    let letters = loop {
        let (_, letters) = gateway.get("/v1/deadletter").await;
        if letters["count"] == 1 {
            break letters;
        }
        assert!(std::time::Instant::now() < deadline, "{letters}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letters["events"][0]["run_id"], "run_t_broken", "{letters}");
    assert!(
        letters["events"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("internal"),
        "{letters}"
    );
    // Acknowledged: nothing pending in the group, and past a retry pass (every second) it is
    // still counted once.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let pending: redis::streams::StreamPendingReply =
        conn.xpending("aw:ingest", "agentwire").await.unwrap();
    assert_eq!(pending.count(), 0, "the entry is acknowledged");
    let metrics = gateway.metrics().await;
    let value = |series: &str| crate::support::metric_value(&metrics, series);
    assert_eq!(
        value("agentwire_events_lost_total{reason=\"internal\"}"),
        1.0
    );
    // Its run had a channel: not counted among the runs that found none.
    assert_eq!(value("agentwire_unresolved_run_ids_total"), 0.0);
    assert_eq!(value("agentwire_events_ingested_total"), 3.0);
    assert_eq!(
        value("agentwire_events_ingested_total"),
        value("agentwire_events_emitted_total")
            + value("agentwire_events_pending_resolution")
            + value("agentwire_events_lost_total{reason=\"unresolved\"}")
            + value("agentwire_events_lost_total{reason=\"internal\"}")
            + value("agentwire_events_duplicate_total")
    );
}

/// A new epoch's acks count even when an ack reached the old epoch past what the Redis process
/// holds (a failover lost writes that a client had already acked).
#[tokio::test]
async fn acks_in_a_new_epoch_count_whatever_the_old_epoch_acked() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut client = gateway.client("u1").await;
    client.subscribe("t_ack", None).await;
    gateway
        .publish(&[
            thinking("t_ack", 1),
            thinking("t_ack", 2),
            thinking("t_ack", 3),
        ])
        .await;
    client.events(3).await;
    client
        .send(json!({"type": "ack", "thread_id": "t_ack", "seq": 3}))
        .await;
    ledger_until(&gateway, "thread:t_ack", |l| l["acked"] == 3).await;

    // As after a failover: the channel was last written by another Redis process, and an ack
    // for a seq this process never held (10) reached the old epoch.
    let mut conn = redis.conn().await;
    let () = conn
        .hset_multiple(
            "aw:{thread:t_ack}:meta",
            &[("run", "0"), ("acked_seq", "10")],
        )
        .await
        .unwrap();
    gateway.publish(&[thinking("t_ack", 4)]).await;
    // The new epoch is announced (`recovered: false`) and what Redis holds replayed in it.
    let subscribed = client.recv().await;
    assert_eq!(subscribed["recovered"], false, "{subscribed}");
    let replayed = client.events(4).await;
    assert_eq!(replayed[3]["seq"], 4, "{replayed:?}");
    client
        .send(json!({"type": "ack", "thread_id": "t_ack", "seq": 4}))
        .await;
    ledger_until(&gateway, "thread:t_ack", |l| l["acked"] == 4).await;
}

/// Redis forgot its scripts (`SCRIPT FLUSH`: as after a restart, or on a replica just promoted,
/// whose script cache was never replicated). The next batch of delivery reports is answered
/// `NOSCRIPT`; the script is loaded and the batch sent again, and every delivery is counted once,
/// in Redis's ledger and in the replica's own counter.
#[tokio::test]
async fn delivery_reports_survive_redis_forgetting_its_scripts_and_count_each_delivery_once() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut client = Client::hello(gateway.addr, "u_flush").await;
    client.subscribe("t_flush", None).await;
    gateway.publish(&[thinking("t_flush", 1)]).await;
    client.events(1).await;
    ledger_until(&gateway, "thread:t_flush", |l| l["delivered"] == 1).await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    gateway
        .publish(&(2..=3).map(|n| thinking("t_flush", n)).collect::<Vec<_>>())
        .await;
    client.events(2).await;
    let ledger = ledger_until(&gateway, "thread:t_flush", |l| l["delivered"] == 3).await;
    assert_eq!(
        (&ledger["pending"], &ledger["balanced"]),
        (&json!(0), &json!(true)),
        "{ledger}"
    );
    assert_eq!(
        gateway.metric("agentwire_events_delivered_total").await,
        3.0
    );
}
