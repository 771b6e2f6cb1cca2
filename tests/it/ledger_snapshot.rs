//! Operator views are cheap: `GET /v1/ledger` (and the ledger series of `/metrics`) are served from a
//! snapshot recomputed at most once per `ledger.snapshot_interval`, one recomputation at a time,
//! while ingest and delivery go on; in Redis mode one recomputation is one bounded read.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::Value;

use crate::support::{Client, Gateway, Redis, event, metric_value, wait_ready};

const SNAPSHOTS: &str = "agentwire_ledger_snapshots_total{view=\"ledger\"}";

/// `n` concurrent `GET /v1/ledger`, each answered 200; their bodies.
async fn ledger_reads(gateway: &Gateway, n: usize) -> Vec<Value> {
    let reads = (0..n).map(|_| gateway.get("/v1/ledger?top=3"));
    futures_util::future::join_all(reads)
        .await
        .into_iter()
        .map(|(status, body)| {
            assert_eq!(status, StatusCode::OK, "{body}");
            body
        })
        .collect()
}

/// Publishes one event to `thread` and asserts that `client` (subscribed there) has it promptly.
async fn delivered_promptly(gateway: &Gateway, client: &mut Client, thread: &str, n: usize) {
    let started = Instant::now();
    gateway
        .publish(&[event("agent_thinking", &format!("run_{n}"), thread)])
        .await;
    let got = client.recv().await;
    assert_eq!(got["run_id"], format!("run_{n}"), "{got}");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(500), "delivery took {took:?}");
}

fn assert_balanced(metrics: &str) {
    let value = |series: &str| metric_value(metrics, series);
    let lost: f64 = ["expired_unseen", "expired_subscribed", "internal"]
        .iter()
        .map(|r| value(&format!("agentwire_events_lost_total{{reason=\"{r}\"}}")))
        .sum();
    assert_eq!(
        value("agentwire_events_emitted_total"),
        value("agentwire_events_delivered_total") + value("agentwire_events_pending") + lost,
        "{metrics}"
    );
}

#[tokio::test]
async fn concurrent_ledger_reads_share_one_snapshot_while_events_flow() {
    let gateway =
        Gateway::start_with(|c| c.ledger.snapshot_interval = Duration::from_secs(30)).await;
    for n in 0..20 {
        gateway
            .publish(&[event("agent_thinking", "run_seed", &format!("t_seed{n}"))])
            .await;
    }
    let mut client = Client::hello(gateway.addr, "u_watch").await;
    client.subscribe("t_live", None).await;

    let first = ledger_reads(&gateway, 1).await.remove(0);
    assert_eq!(first["channels"]["emitted"], 20, "{first}");
    assert_eq!(first["snapshot"]["limit_reached"], false);
    assert_eq!(first["snapshot"]["channel_limit"], Value::Null);
    let as_of = first["snapshot"]["as_of"].as_str().unwrap().to_string();
    let before = gateway.metric(SNAPSHOTS).await;
    assert!(before >= 1.0, "the first read computed a snapshot");

    // Operators poll hard while events keep flowing to a subscriber.
    for round in 0..5 {
        let (reads, ()) = tokio::join!(
            ledger_reads(&gateway, 40),
            delivered_promptly(&gateway, &mut client, "t_live", round)
        );
        for read in reads {
            assert_eq!(read["snapshot"]["as_of"], as_of.as_str(), "{read}");
            // The snapshot is of before these publishes: served, not recomputed.
            assert_eq!(read["channels"]["emitted"], 20, "{read}");
            assert_eq!(read["channels"]["balanced"], true, "{read}");
            assert!(read["snapshot"]["age_seconds"].as_f64().unwrap() < 30.0);
        }
    }
    let metrics = gateway.metrics().await;
    assert_eq!(metric_value(&metrics, SNAPSHOTS), before, "{metrics}");
    assert_balanced(&metrics);
}

#[tokio::test]
async fn a_stale_snapshot_is_recomputed_once_per_interval() {
    let interval = Duration::from_millis(300);
    let gateway = Gateway::start_with(|c| c.ledger.snapshot_interval = interval).await;
    gateway
        .publish(&[event("agent_thinking", "run_a", "t_a")])
        .await;
    let mut client = Client::hello(gateway.addr, "u_watch").await;
    client.subscribe("t_live", None).await;
    let before = gateway.metric(SNAPSHOTS).await;
    let started = Instant::now();
    let mut seen = std::collections::HashSet::new();
    let mut round = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let (reads, ()) = tokio::join!(
            ledger_reads(&gateway, 16),
            delivered_promptly(&gateway, &mut client, "t_live", round)
        );
        seen.extend(reads.iter().map(|r| r["snapshot"]["as_of"].to_string()));
        round += 1;
    }
    let elapsed = started.elapsed();
    let metrics = gateway.metrics().await;
    let recomputed = metric_value(&metrics, SNAPSHOTS) - before;
    // One per interval begun, the last scrape's included.
    let most = (elapsed.as_millis() / interval.as_millis()) as f64 + 2.0;
    assert!(
        recomputed <= most,
        "{recomputed} recomputations in {elapsed:?} ({round} rounds of 16 reads)"
    );
    assert!(seen.len() >= 2, "a stale snapshot is recomputed: {seen:?}");
    // The snapshot taken now includes every event published.
    tokio::time::sleep(interval).await;
    let fresh = ledger_reads(&gateway, 1).await.remove(0);
    assert_eq!(fresh["channels"]["emitted"], 1 + round as u64, "{fresh}");
    assert_balanced(&metrics);
}

/// `cmdstat_<name>` calls from `INFO commandstats`.
async fn command_calls(redis: &Redis) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn in_redis_mode_concurrent_ledger_reads_cost_one_bounded_read() {
    const CHANNELS: u64 = 50;
    let redis = Redis::start().await;
    let url = redis.url();
    let interval = Duration::from_secs(1);
    let gateway = Gateway::start_with(|c| {
        c.broker.redis_url = Some(url);
        c.ledger.snapshot_interval = interval;
    })
    .await;
    wait_ready(gateway.internal, StatusCode::OK).await;
    let events: Vec<Value> = (0..CHANNELS)
        .map(|n| event("agent_thinking", "run_r", &format!("t_r{n}")))
        .collect();
    gateway.publish(&events).await;
    // The channel index is written by the report task, batched: wait until a read sees all.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = ledger_reads(&gateway, 1).await.remove(0);
        if read["channels"]["count"] == CHANNELS {
            assert_eq!(read["channels"]["emitted"], CHANNELS, "{read}");
            assert_eq!(read["snapshot"]["channel_limit"], 10_000, "{read}");
            assert_eq!(read["snapshot"]["limit_reached"], false, "{read}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the index never held every channel: {read}"
        );
        tokio::time::sleep(interval).await;
    }

    // Stale now: the 20 concurrent reads make one recomputation between them.
    tokio::time::sleep(interval + Duration::from_millis(100)).await;
    let before = command_calls(&redis).await;
    let reads = ledger_reads(&gateway, 20).await;
    let after = command_calls(&redis).await;
    let grew = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
    assert_eq!(grew("zrevrange"), 1, "{before:?} → {after:?}");
    assert!(grew("hgetall") <= CHANNELS, "{before:?} → {after:?}");
    let as_of = &reads[0]["snapshot"]["as_of"];
    assert!(reads.iter().all(|r| &r["snapshot"]["as_of"] == as_of));
    // Everything the gateway sent meanwhile (its background work included) is far below the
    // 20 × (1 + CHANNELS) commands the reads cost without the snapshot.
    let total = |calls: &HashMap<String, u64>| calls.values().sum::<u64>();
    let sent = total(&after) - total(&before);
    assert!(
        sent < 2 * (CHANNELS + 1),
        "{sent} commands: {before:?} → {after:?}"
    );
}
