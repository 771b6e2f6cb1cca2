//! Redis mode: events held for an unregistered run survive the replica that answered
//! `pending_resolution` being killed: another replica adopts them from the shared journal and
//! releases them in order on registration, or dead-letters them (counted) when none comes.

use std::time::Duration;

use hyper::StatusCode;
use serde_json::{Value, json};

use crate::support::{
    Client, Gateway, Process, Redis, RedisCluster, eventually, metric_value, wait_ready,
};

/// A gateway process on `redis` with a short claim time, ready to serve.
async fn replica(redis: &Redis) -> Process {
    let url = redis.url();
    let process = Process::start(&[
        ("AGENTWIRE_BROKER__REDIS_URL", url.as_str()),
        ("AGENTWIRE_BROKER__CLAIM_IDLE", "2s"),
        ("AGENTWIRE_RESOLVE__GRACE", "1s"),
    ])
    .await;
    wait_ready(process.internal, StatusCode::OK).await;
    process
}

fn unregistered(run_id: &str, n: usize) -> Value {
    json!({
        "type": "agent_thinking",
        "run_id": run_id,
        "event_id": format!("{run_id}-{n}"),
        "payload": {"n": n},
    })
}

/// Posts `count` events of `run_id` to `gateway`, every one answered `pending_resolution`.
async fn hold(gateway: &Gateway, run_id: &str, count: usize) {
    let events: Vec<Value> = (1..=count).map(|n| unregistered(run_id, n)).collect();
    let answer = gateway.publish(&events).await;
    for n in 0..count {
        assert_eq!(
            answer["results"][n]["status"], "pending_resolution",
            "{answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_held_by_a_killed_replica_are_released_by_another_in_order() {
    let redis = Redis::start().await;
    let doomed = replica(&redis).await;
    let survivor = replica(&redis).await;
    hold(&Gateway::at(&doomed), "r_orphan", 20).await;
    doomed.signal("KILL");

    let survivor_api = Gateway::at(&survivor);
    let mut client = Client::hello(survivor.addr, "u1").await;
    client.subscribe("t_orphan", None).await;
    let (status, registered) = survivor_api
        .post(
            "/v1/runs",
            &json!({"run_id": "r_orphan", "thread_id": "t_orphan"}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{registered}");
    // Within `broker.claim_idle` (2 s) and a housekeeping tick or two.
    let events = client.events(20).await;
    let ns: Vec<u64> = events
        .iter()
        .map(|e| e["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ns,
        (1..=20).collect::<Vec<_>>(),
        "every held event, in order"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    client.silent_for(Duration::from_millis(500)).await;
    // The survivor took them in: its own accounting balances.
    assert_eq!(
        survivor_api.metric("agentwire_events_ingested_total").await,
        20.0
    );
    assert_eq!(
        survivor_api.metric("agentwire_events_emitted_total").await,
        20.0
    );
    journals_empty(&redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_held_by_a_killed_replica_whose_run_never_registers_are_dead_lettered() {
    let redis = Redis::start().await;
    let doomed = replica(&redis).await;
    let survivor = replica(&redis).await;
    hold(&Gateway::at(&doomed), "r_nowhere", 3).await;
    doomed.signal("KILL");

    let survivor = Gateway::at(&survivor);
    let letters = eventually("three dead letters", async || {
        let (_, letters) = survivor.get("/v1/deadletter").await;
        match letters["count"] == 3 {
            true => Ok(letters),
            false => Err(letters.to_string()),
        }
    })
    .await;
    let ns: Vec<&Value> = (0..3)
        .map(|i| &letters["events"][i]["event"]["payload"]["n"])
        .collect();
    assert_eq!(ns, [&json!(1), &json!(2), &json!(3)], "{letters}");
    assert_eq!(letters["events"][0]["run_id"], "r_nowhere", "{letters}");
    assert_eq!(
        survivor
            .metric("agentwire_events_lost_total{reason=\"unresolved\"}")
            .await,
        3.0
    );
    assert_eq!(
        survivor.metric("agentwire_events_ingested_total").await,
        3.0
    );
    journals_empty(&redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_events_released_on_their_own_replica_leave_the_journal() {
    let redis = Redis::start().await;
    let only = replica(&redis).await;
    let gateway = Gateway::at(&only);
    let mut client = Client::hello(only.addr, "u1").await;
    client.subscribe("t_here", None).await;
    hold(&gateway, "r_here", 5).await;
    let (status, registered) = gateway
        .post(
            "/v1/runs",
            &json!({"run_id": "r_here", "thread_id": "t_here"}).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{registered}");
    let ns: Vec<u64> = client
        .events(5)
        .await
        .iter()
        .map(|e| e["payload"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, [1, 2, 3, 4, 5]);
    journals_empty(&redis).await;
}

/// Waits until no journal of held events keeps an entry (settled ones leave it).
async fn journals_empty(redis: &Redis) {
    let mut conn = redis.conn().await;
    eventually("every journal is empty", async || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("aw:{held}:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut left = 0;
        for key in keys.iter().filter(|k| !k.ends_with(":alive")) {
            let len: usize = redis::cmd("XLEN")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            left += len;
        }
        match left {
            0 => Ok(()),
            _ => Err(format!("{left} entries left in {keys:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopted_events_redis_cannot_take_yet_wait_and_arrive_in_order() {
    // A Redis Cluster, so that the run's channel has a master of its own: the registry and the
    // journals answer while that master holds every write.
    let cluster = RedisCluster::start(3, 0).await;
    let (thread, paused) = cluster.thread_apart_from_the_registry("t_adopt").await;
    let url = cluster.url();
    let env = [
        ("AGENTWIRE_BROKER__REDIS_URL", url.as_str()),
        ("AGENTWIRE_BROKER__CLAIM_IDLE", "2s"),
        ("AGENTWIRE_RESOLVE__GRACE", "1s"),
    ];
    let doomed = Process::start(&env).await;
    wait_ready(doomed.internal, StatusCode::OK).await;
    let survivor = Process::start(&env).await;
    wait_ready(survivor.internal, StatusCode::OK).await;
    let mut client = Client::hello(survivor.addr, "u1").await;
    client.subscribe(&thread, None).await;
    hold(&Gateway::at(&doomed), "r_adopt", 3).await;
    doomed.signal("KILL");

    // The run registers; then its channel's master holds writes while the survivor adopts.
    let survivor_api = Gateway::at(&survivor);
    let register = json!({"run_id": "r_adopt", "thread_id": thread}).to_string();
    let (status, text) = survivor_api.post("/v1/runs", &register).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    cluster.hold_writes(paused).await;
    // All three taken in, none published: the first waits for Redis, the others behind it.
    eventually("the survivor holds what it adopted", async || {
        let metrics = survivor_api.metrics().await;
        let held = metric_value(&metrics, "agentwire_events_pending_resolution");
        let ingested = metric_value(&metrics, "agentwire_events_ingested_total");
        match (ingested, held) {
            (3.0, 3.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    cluster.take_writes(paused).await;

    let events = client.events(3).await;
    let shown: Vec<(Value, Value)> = events
        .iter()
        .map(|e| (e["seq"].clone(), e["payload"]["n"].clone()))
        .collect();
    assert_eq!(
        shown,
        [
            (json!(1), json!(1)),
            (json!(2), json!(2)),
            (json!(3), json!(3))
        ],
        "late, in order, once"
    );
    client.silent_for(Duration::from_millis(500)).await;
    assert_eq!(survivor_api.get("/v1/deadletter").await.1["count"], 0);
    assert_eq!(
        survivor_api
            .metric("agentwire_events_lost_total{reason=\"unresolved\"}")
            .await,
        0.0
    );
}
