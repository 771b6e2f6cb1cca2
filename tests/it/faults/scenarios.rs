//! The scenarios: each starts three replicas on one Redis (one for the idle scenario), runs the
//! workload through one fault and checks the row.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use super::cluster::Cluster;
use super::tally::Row;
use super::workload::{Load, Workload};
use super::{Scale, scale};
use crate::support::{Client, RedisCluster, eventually, metric_value};

/// Every replica: no per-address caps (every client is 127.0.0.1) and short drains.
const REPLICA_ENV: &[(&str, &str)] = &[
    ("AGENTWIRE_SESSION__MAX_CONNECTIONS_PER_IP", "0"),
    ("AGENTWIRE_INGEST__MAX_REQUESTS_PER_IP", "0"),
    ("AGENTWIRE_SHUTDOWN__DRAIN_DELAY", "200ms"),
    ("AGENTWIRE_SHUTDOWN__CLOSE_WINDOW", "500ms"),
];

/// How long clients get, once the producer stops, to show every accepted event.
const SETTLE: Duration = Duration::from_secs(10);

async fn cluster(extra_env: &[(&str, &str)], redis_args: &[&str]) -> Cluster {
    let env: Vec<(&str, &str)> = REPLICA_ENV.iter().chain(extra_env).copied().collect();
    Cluster::start(3, redis_args, &env).await
}

/// Runs the workload on `cluster`: `scale.before`, then `fault`, then `scale.after`; the row.
async fn run<R>(
    name: &'static str,
    cluster: &mut Cluster<R>,
    load: Load,
    fault: impl AsyncFnOnce(&mut Cluster<R>),
) -> Row {
    let scale = scale();
    let workload = Workload::start(&cluster.doors, load).await;
    tokio::time::sleep(scale.before).await;
    fault(cluster).await;
    tokio::time::sleep(scale.after).await;
    let (produced, seen) = workload.finish(SETTLE).await;
    let ledger = cluster.ledger().await;
    let row = Row::new(name, &produced, &seen, &ledger);
    row.check();
    cluster_figures_are_the_ledgers(cluster).await;
    row
}

/// Every replica, restarted or not, exports the cluster's pending and balance as the shared
/// ledger has them (a per-replica sum would not survive a restart).
async fn cluster_figures_are_the_ledgers<R>(cluster: &Cluster<R>) {
    for internal in cluster.doors.internals() {
        // Another scenario's side load may still publish: compare reads taken close together.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let before = cluster.ledger().await;
            let (_, text) = crate::support::http(internal, "GET", "/metrics", None).await;
            let after = cluster.ledger().await;
            let exported = (
                metric_value(&text, "agentwire_cluster_events_pending"),
                metric_value(&text, "agentwire_cluster_ledger_unbalanced_channels"),
            );
            let pending = |l: &serde_json::Value| l["channels"]["pending"].as_f64().unwrap_or(-1.0);
            if before["channels"]["pending"] == after["channels"]["pending"]
                && exported == (pending(&after), 0.0)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster figures on {internal}: {exported:?}, ledger {}",
                after["channels"]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// On each replica that lived through the scenario, every ingested event is in exactly one
/// bucket: `ingested + generated + redriven = emitted + pending_resolution + lost{unresolved} +
/// lost{internal} + duplicates`.
async fn ingest_balances<R>(cluster: &Cluster<R>) {
    for internal in cluster.doors.internals() {
        let (_, text) = crate::support::http(internal, "GET", "/metrics", None).await;
        let m = |series: &str| metric_value(&text, series);
        let taken = m("agentwire_events_ingested_total")
            + m("agentwire_events_generated_total")
            + m("agentwire_events_redriven_total");
        let placed = m("agentwire_events_emitted_total")
            + m("agentwire_events_pending_resolution")
            + m("agentwire_events_lost_total{reason=\"unresolved\"}")
            + m("agentwire_events_lost_total{reason=\"internal\"}")
            + m("agentwire_events_duplicate_total");
        assert_eq!(taken, placed, "ingest accounting on {internal}");
    }
}

#[tokio::test]
async fn faults_rolling_sigterm_under_load() {
    let mut cluster = cluster(&[], &[]).await;
    let Scale { load, .. } = scale();
    run("rolling SIGTERM", &mut cluster, load, async |cluster| {
        for _ in 0..3 {
            cluster.add_replica().await;
            let (code, took) = cluster.terminate_oldest().await;
            assert_eq!(code, Some(0), "a replica stopped by SIGTERM exits 0");
            assert!(took < Duration::from_secs(5), "drained in {took:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn faults_sigkill_of_a_replica() {
    let mut cluster = cluster(&[], &[]).await;
    let Scale { load, .. } = scale();
    run(
        "SIGKILL of a replica",
        &mut cluster,
        load,
        async |cluster| {
            cluster.kill_oldest();
            cluster.add_replica().await;
        },
    )
    .await;
}

#[tokio::test]
async fn faults_redis_restarted_empty() {
    let mut cluster = cluster(&[], &[]).await;
    let Scale { load, .. } = scale();
    run(
        "Redis restarted empty",
        &mut cluster,
        load,
        async |cluster| {
            cluster.redis.restart().await;
        },
    )
    .await;
    ingest_balances(&cluster).await;
}

#[tokio::test]
async fn faults_redis_paused_longer_than_the_health_check() {
    let mut cluster = cluster(&[], &[]).await;
    let Scale { load, .. } = scale();
    run("Redis paused 3 s", &mut cluster, load, async |cluster| {
        let mut conn = cluster.redis.conn().await;
        let () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(3000)
            .arg("ALL")
            .query_async(&mut conn)
            .await
            .expect("CLIENT PAUSE");
        tokio::time::sleep(Duration::from_secs(3)).await;
    })
    .await;
    ingest_balances(&cluster).await;
}

#[tokio::test]
async fn faults_concurrent_producer_retries() {
    let mut cluster = cluster(&[], &[]).await;
    let Scale { mut load, .. } = scale();
    load.concurrent_retries = true;
    run(
        "every event posted to 3 replicas at once",
        &mut cluster,
        load,
        async |_| {},
    )
    .await;
    ingest_balances(&cluster).await;
}

#[tokio::test]
async fn faults_idle_connections_then_sigterm() {
    let Scale {
        idle_connections, ..
    } = scale();
    let mut cluster = Cluster::start(1, &[], REPLICA_ENV).await;
    let (public, _) = cluster.doors.pick().expect("a replica");
    // Each connection is read from its hello on, as a browser does. Left unread while the others
    // connect (tens of seconds), a connection holds pings (one each `session.heartbeat`) ahead of
    // its close frame; read late, each ping makes the client library write a pong, and one written
    // after the gateway let the socket go (a second after its close frame) fails with a broken
    // pipe, which the library returns instead of the close frame it already holds (1006).
    let mut reads = Vec::with_capacity(idle_connections);
    for c in 0..idle_connections {
        let mut ws = Client::hello(public, &format!("idle{c}"))
            .await
            .into_inner();
        reads.push(tokio::spawn(async move {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => {
                        return frame.map_or(1005, |f| u16::from(f.code));
                    }
                    Some(Ok(_)) => {}
                    _ => return 1006,
                }
            }
        }));
    }
    let started = Instant::now();
    let closes = tokio::spawn(async move {
        let mut codes = std::collections::BTreeMap::<u16, usize>::new();
        for code in futures_util::future::join_all(reads).await {
            *codes.entry(code.expect("a reader")).or_default() += 1;
        }
        codes
    });
    let (code, took) = cluster.terminate_oldest().await;
    let codes = closes.await.expect("closes");
    let got_1012 = codes.get(&1012).copied().unwrap_or(0);
    super::tally::report(&format!(
        "| {idle_connections} idle connections, then SIGTERM | – | {idle_connections} closes 1012 | {got_1012} | 0 | – | {} | – | – | – | – | exit {} in {:.2} |",
        idle_connections - got_1012,
        code.map_or_else(|| "by a signal".to_string(), |c| c.to_string()),
        took.as_secs_f64()
    ));
    assert_eq!(code, Some(0));
    assert_eq!(
        codes.into_iter().collect::<Vec<_>>(),
        vec![(1012, idle_connections)]
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn faults_redis_failover_from_an_older_snapshot() {
    let dir = std::env::temp_dir().join(format!(
        "agentwire-faults-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let dir_arg = dir.to_string_lossy().into_owned();
    // One replica, as in the report that found a silent loss here: nothing else resyncs it.
    let env: Vec<(&str, &str)> = REPLICA_ENV.to_vec();
    let mut cluster =
        Cluster::start(1, &["--dir", &dir_arg, "--dbfilename", "faults.rdb"], &env).await;
    let Scale { load, after, .. } = scale();
    run(
        "Redis failover from an older snapshot",
        &mut cluster,
        load,
        async |cluster| {
            // The snapshot a failover comes back with, then writes it will not have.
            let mut conn = cluster.redis.conn().await;
            let () = redis::cmd("SAVE")
                .query_async(&mut conn)
                .await
                .expect("SAVE");
            tokio::time::sleep(after / 2).await;
            cluster.redis.stop();
            tokio::time::sleep(Duration::from_secs(5)).await;
            cluster.redis.restart().await;
        },
    )
    .await;
    ingest_balances(&cluster).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn faults_listen_only_clients_on_busy_threads() {
    // Browsers answer pings and never send their own: with events every ~66 ms per thread,
    // liveness must not depend on the connection being idle.
    let mut cluster = cluster(
        &[
            ("AGENTWIRE_SESSION__HEARTBEAT", "200ms"),
            ("AGENTWIRE_SESSION__CLIENT_TIMEOUT", "1s"),
        ],
        &[],
    )
    .await;
    let Scale { load, .. } = scale();
    let row = run(
        "listen-only clients on busy threads, client_timeout 1 s",
        &mut cluster,
        load,
        async |_| tokio::time::sleep(Duration::from_millis(1500)).await,
    )
    .await;
    assert!(row.closes.is_empty(), "no client was cut: {:?}", row.closes);
}

#[tokio::test]
async fn faults_slow_and_stalled_readers_beside_normal_ones() {
    let mut cluster = cluster(&[("AGENTWIRE_SESSION__WRITE_TIMEOUT", "500ms")], &[]).await;
    let Scale { mut load, .. } = scale();
    // A quarter of the clients take 20 ms over each frame: slower, still keeping up.
    load.slow_readers = load.clients / 4;
    // Stalled readers on a flooded thread (big events, so their socket buffers fill fast):
    // subscribed, then never read again.
    let flood = "fault_flood";
    let mut stalled = Vec::new();
    for (i, (public, _)) in (0..3).filter_map(|_| cluster.doors.pick()).enumerate() {
        let ws = Client::connect_small_buffer(public).await;
        let mut client = Client::hello_on(ws, &format!("stalled{i}"), None).await;
        client.subscribe(flood, None).await;
        stalled.push(client);
    }
    let (_, internal) = cluster.doors.pick().expect("a replica");
    let stop = tokio_util::sync::CancellationToken::new();
    let flooding = tokio::spawn({
        let stop = stop.clone();
        async move {
            let text = "x".repeat(32 * 1024);
            let mut posted = 0u64;
            while !stop.is_cancelled() {
                let event = serde_json::json!([{"type": "agent_thinking", "run_id": "run_flood",
                    "thread_id": flood, "payload": {"text": text}}]);
                if let Ok((hyper::StatusCode::OK, _)) =
                    super::wire::request(internal, "POST", "/v1/events", Some(event.to_string()))
                        .await
                {
                    posted += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            posted
        }
    });
    run(
        "slow and stalled readers beside normal ones",
        &mut cluster,
        load,
        async |_| tokio::time::sleep(Duration::from_secs(2)).await,
    )
    .await;
    stop.cancel();
    let posted = flooding.await.expect("flood");
    assert!(posted > 0);
    // Each stalled reader was cut, and counted as a slow consumer.
    let mut slow = 0.0;
    for internal in cluster.doors.internals() {
        let (_, text) = crate::support::http(internal, "GET", "/metrics", None).await;
        slow += metric_value(
            &text,
            "agentwire_connections_closed_total{reason=\"slow_consumer\"}",
        );
    }
    assert_eq!(
        slow,
        stalled.len() as f64,
        "stalled readers counted as slow consumers"
    );
}

#[tokio::test]
async fn faults_sigkill_of_a_replica_holding_events_for_an_unregistered_run() {
    let mut cluster = cluster(
        &[
            ("AGENTWIRE_BROKER__CLAIM_IDLE", "2s"),
            ("AGENTWIRE_RESOLVE__GRACE", "1s"),
        ],
        &[],
    )
    .await;
    let Scale { load, .. } = scale();
    run(
        "SIGKILL of a replica holding events for an unregistered run",
        &mut cluster,
        load,
        async |cluster| {
            // 20 events for a run nobody registered yet, answered `pending_resolution` by the
            // replica about to die.
            let (_, doomed) = cluster.oldest();
            let events: Vec<serde_json::Value> = (1..=20)
                .map(|n| {
                    serde_json::json!({"type": "agent_thinking", "run_id": "run_fault_held",
                        "event_id": format!("held-{n}"), "payload": {"n": n}})
                })
                .collect();
            let (status, answer) = super::wire::request(
                doomed,
                "POST",
                "/v1/events",
                Some(serde_json::Value::from(events).to_string()),
            )
            .await
            .expect("an answer");
            assert_eq!(status, hyper::StatusCode::OK, "{answer}");
            assert_eq!(answer["pending_resolution"], 20, "{answer}");
            cluster.kill_oldest();
            cluster.add_replica().await;
            // The run registers on a survivor: a client there gets all 20, in order.
            let (public, internal) = cluster.doors.pick().expect("a replica");
            let mut client = Client::hello(public, "held_viewer").await;
            client.subscribe("fault_held", None).await;
            let register =
                serde_json::json!({"run_id": "run_fault_held", "thread_id": "fault_held"});
            let (status, answer) =
                super::wire::request(internal, "POST", "/v1/runs", Some(register.to_string()))
                    .await
                    .expect("an answer");
            assert_eq!(status, hyper::StatusCode::OK, "{answer}");
            let ns: Vec<u64> = client
                .events(20)
                .await
                .iter()
                .map(|e| e["payload"]["n"].as_u64().unwrap_or(0))
                .collect();
            assert_eq!(ns, (1..=20).collect::<Vec<_>>());
        },
    )
    .await;
}

#[tokio::test]
async fn faults_redis_cluster_master_failover() {
    // Three masters with a replica each; the master of one thread's slot is killed mid-stream
    // and its replica promoted. Redis Cluster refuses every slot until then (full coverage), the
    // promoted replica may lack the last writes (a new epoch, announced), and the pub/sub
    // subscriptions move to it.
    let redis = RedisCluster::start(3, 1).await;
    let url = redis.url();
    let mut cluster = Cluster::on(redis, &url, 3, REPLICA_ENV).await;
    let Scale { load, .. } = scale();
    run(
        "Redis Cluster: a master killed, its replica promoted",
        &mut cluster,
        load,
        async |cluster| {
            let key = "aw:{thread:fault_t0}:log";
            let master = cluster.redis.master_of(key).await;
            cluster.redis.kill(master);
            eventually("a replica takes the slot over", async || {
                match cluster.redis.master_of(key).await {
                    port if port == master => Err(format!("still {port}")),
                    _ => Ok(()),
                }
            })
            .await;
            cluster.redis.wait_ok(3).await;
        },
    )
    .await;
    ingest_balances(&cluster).await;
}
