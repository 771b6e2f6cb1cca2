//! The Redis broker on a real Redis Cluster (three masters started by the test, `redis-cli
//! --cluster create`): replicas share channels that live on different shards, live messages
//! travel by sharded pub/sub, and what spans channels (the ledger view, the registry, the dead
//! letters) works across slots. A graceful failover moves the subscriptions with the slot; the
//! failover of a killed master is in the fault suite.

use std::time::Duration;

use hyper::StatusCode;
use serde_json::{Value, json};

use crate::replicas::{ledger_until, thinking};
use crate::support::{Client, Gateway, RedisCluster, eventually, wait_ready};

/// A gateway in this process on `cluster`, ready to serve.
async fn on_cluster(cluster: &RedisCluster) -> Gateway {
    let url = cluster.url();
    let gateway = Gateway::start_with(|c| {
        c.broker.redis_url = Some(url);
        c.resolve.grace = Duration::from_millis(300);
    })
    .await;
    wait_ready(gateway.internal, StatusCode::OK).await;
    gateway
}

/// One thread per master: channels whose slots three different masters serve.
async fn a_thread_per_master(cluster: &RedisCluster) -> Vec<(String, u16)> {
    let mut picked: Vec<(String, u16)> = Vec::new();
    for i in 0.. {
        let thread = format!("c{i}");
        let master = cluster
            .master_of(&format!("aw:{{thread:{thread}}}:log"))
            .await;
        if picked.iter().all(|(_, m)| *m != master) {
            picked.push((thread, master));
        }
        if picked.len() == 3 {
            return picked;
        }
    }
    unreachable!()
}

#[tokio::test]
async fn two_replicas_on_a_cluster_share_channels_of_every_shard() {
    let cluster = RedisCluster::start(3, 0).await;
    let threads = a_thread_per_master(&cluster).await;
    let (a, b) = (on_cluster(&cluster).await, on_cluster(&cluster).await);

    // Viewers on b; events posted on a.
    let mut viewers = Vec::new();
    for (thread, _) in &threads {
        let mut viewer = Client::hello(b.addr, &format!("v_{thread}")).await;
        viewer.subscribe(thread, None).await;
        viewers.push(viewer);
    }
    for n in 1..=10 {
        for (thread, _) in &threads {
            let answer = a.publish(&[thinking(thread, n)]).await;
            assert_eq!(answer["results"][0]["seq"], n, "{answer}");
        }
    }
    let mut epochs = Vec::new();
    for (viewer, (thread, _)) in viewers.iter_mut().zip(&threads) {
        let events = viewer.events(10).await;
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>(), "{thread}");
        epochs.push(events[0]["epoch"].as_str().unwrap().to_string());
    }

    // The live channels are sharded: each is a shard channel of the master that owns its
    // slot, and a plain channel nowhere (nothing is broadcast to every node).
    for (thread, master) in &threads {
        let live = format!("aw:{{thread:{thread}}}:live");
        let shard: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .query_async(&mut cluster.node(*master).await)
            .await
            .unwrap();
        assert!(shard.contains(&live), "{live} on {master}: {shard:?}");
        for port in cluster.running() {
            let plain: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .query_async(&mut cluster.node(port).await)
                .await
                .unwrap();
            assert!(plain.is_empty(), "plain pub/sub on {port}: {plain:?}");
        }
    }

    // Every channel's ledger balances, read on either replica; the cluster view reads every
    // shard.
    for (thread, _) in &threads {
        let channel = format!("thread:{thread}");
        let ledger = ledger_until(&a, &channel, |l| l["delivered"] == 10).await;
        assert_eq!(
            (&ledger["emitted"], &ledger["pending"], &ledger["balanced"]),
            (&json!(10), &json!(0), &json!(true)),
            "{ledger}"
        );
    }
    let view = eventually("the cluster ledger counts every shard", async || {
        let (_, view) = b.get("/v1/ledger").await;
        match view["channels"]["delivered"] == 30 {
            true => Ok(view),
            false => Err(view.to_string()),
        }
    })
    .await;
    assert_eq!(view["channels"]["balanced"], true, "{view}");

    // Resume on the other replica, from the last position seen.
    drop(viewers);
    let (thread, _) = &threads[1];
    for n in 11..=15 {
        a.publish(&[thinking(thread, n)]).await;
    }
    let mut back = Client::hello(a.addr, "back").await;
    let subscribed = back
        .subscribe(thread, Some(json!({"epoch": epochs[1], "seq": 10})))
        .await;
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
    let seqs: Vec<u64> = back
        .events(5)
        .await
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (11..=15).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_request_across_shards_is_answered_shard_by_shard_when_one_master_stops_answering() {
    let cluster = RedisCluster::start(3, 0).await;
    let threads = a_thread_per_master(&cluster).await;
    let gateway = on_cluster(&cluster).await;
    let mut viewers = Vec::new();
    for (thread, _) in &threads {
        let mut viewer = Client::hello(gateway.addr, &format!("v_{thread}")).await;
        viewer.subscribe(thread, None).await;
        viewers.push(viewer);
    }

    // Every master has the publish script (a first event each): a call only waits for its node.
    let firsts: Vec<Value> = threads.iter().map(|(t, _)| thinking(t, 1)).collect();
    gateway.publish(&firsts).await;
    for viewer in &mut viewers {
        assert_eq!(viewer.recv().await["seq"], 1);
    }

    // The second thread's master takes no writes (until told to): the request's call to it is
    // held past the gateway's wait (3 s), while the other masters answer at once.
    let paused = threads[1].1;
    cluster.hold_writes(paused).await;
    let events: Vec<Value> = threads.iter().map(|(t, _)| thinking(t, 2)).collect();
    let (status, answer) = gateway
        .post("/v1/events", &Value::from(events.clone()).to_string())
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    let results = &answer["results"];
    for i in [0, 2] {
        assert_eq!(
            (&results[i]["status"], &results[i]["seq"]),
            (&json!("accepted"), &json!(2)),
            "the other shards' events were sequenced and say so: {answer}"
        );
    }
    assert_eq!(results[1]["status"], "unavailable", "{answer}");
    for i in [0, 2] {
        let event = viewers[i].recv().await;
        assert_eq!(
            (&event["type"], &event["seq"]),
            (&json!("agent_thinking"), &json!(2)),
            "{event}"
        );
    }

    // The paused master runs the call it held once it takes writes again (the gateway could not
    // know): the producer's retry with the same event_ids is answered duplicate there, and nothing
    // is shown twice. Meanwhile the health ping, held behind that call, took the gateway down:
    // the retry waits for it to come back.
    cluster.take_writes(paused).await;
    let body = Value::from(events).to_string();
    let again = eventually(
        "the retry is taken once the master answers",
        async || match gateway.post("/v1/events", &body).await {
            (StatusCode::OK, again) => Ok(again),
            (_, again) => Err(again.to_string()),
        },
    )
    .await;
    for i in [0, 2] {
        assert_eq!(again["results"][i]["status"], "duplicate", "{again}");
    }
    // `accepted` if the held call never ran (its connection was dropped while it waited).
    let status = &again["results"][1]["status"];
    assert!(status == "accepted" || status == "duplicate", "{again}");
    let event = viewers[1].recv().await;
    assert_eq!(
        (&event["type"], &event["seq"]),
        (&json!("agent_thinking"), &json!(2)),
        "{event}"
    );
    for viewer in &mut viewers {
        viewer.silent_for(Duration::from_millis(300)).await;
    }
    for (thread, _) in &threads {
        let channel = format!("thread:{thread}");
        let ledger = ledger_until(&gateway, &channel, |l| l["delivered"] == 2).await;
        assert_eq!(
            (&ledger["emitted"], &ledger["balanced"]),
            (&json!(2), &json!(true)),
            "{ledger}"
        );
    }
}

#[tokio::test]
async fn a_stalled_runs_agent_error_held_up_by_its_master_reaches_the_channel_once() {
    let cluster = RedisCluster::start(3, 0).await;
    let url = cluster.url();
    let gateway = Gateway::start_with(|c| {
        c.broker.redis_url = Some(url);
        c.watchdog.run_idle_timeout = Duration::from_secs(1);
    })
    .await;
    wait_ready(gateway.internal, StatusCode::OK).await;
    // The run's keys (its stall claim) on another master than its channel's.
    let channel_master = cluster.master_of("aw:{thread:t_held}:log").await;
    let mut run = 0;
    while cluster
        .master_of(&format!("aw:stalled:{{run_h{run}}}"))
        .await
        == channel_master
    {
        run += 1;
    }
    let run_id = format!("run_h{run}");
    let mut client = Client::hello(gateway.addr, "u_held").await;
    client.subscribe("t_held", None).await;
    let started =
        json!({"type": "agent_started", "run_id": run_id, "thread_id": "t_held", "payload": {}});
    gateway.publish(&[started]).await;
    assert_eq!(client.recv().await["type"], "agent_started");

    // The channel's master takes no writes: the stall is claimed (elsewhere) and counted, and
    // its agent_error waits.
    cluster.hold_writes(channel_master).await;
    eventually("the run counted stalled", async || {
        match gateway.metric("agentwire_runs_stalled_total").await {
            1.0 => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    client.silent_for(Duration::from_secs(4)).await;
    assert_eq!(
        gateway.metric("agentwire_events_generated_total").await,
        0.0
    );

    // Writes again: the held call runs or the retry publishes it; either way it is shown once.
    cluster.take_writes(channel_master).await;
    let told = client.recv().await;
    assert_eq!(
        (&told["type"], &told["payload"]["reason"], &told["seq"]),
        (&json!("agent_error"), &json!("stalled"), &json!(2)),
        "{told}"
    );
    eventually("the agent_error counted once", async || {
        match gateway.metric("agentwire_events_generated_total").await {
            1.0 => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    client.silent_for(Duration::from_secs(2)).await;
    assert_eq!(
        gateway.metric("agentwire_events_generated_total").await,
        1.0
    );
}

#[tokio::test]
async fn registrations_dead_letters_and_the_ingest_stream_span_the_shards() {
    let cluster = RedisCluster::start(3, 0).await;
    let (a, b) = (on_cluster(&cluster).await, on_cluster(&cluster).await);

    // A run registered on a is resolved on b, whatever slots its keys are in.
    let mut viewer = Client::hello(b.addr, "reg").await;
    viewer.subscribe("t_reg", None).await;
    let register = json!({"run_id": "run_reg", "thread_id": "t_reg"}).to_string();
    assert_eq!(a.post("/v1/runs", &register).await.0, StatusCode::OK);
    let only_run = json!([{"type": "agent_thinking", "run_id": "run_reg", "payload": {}}]);
    let (status, answer) = b.post("/v1/events", &only_run.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(viewer.events(1).await[0]["run_id"], "run_reg");

    // An event a producer adds to the ingest stream, on the master that owns it, is read by a
    // replica through the consumer group and reaches the viewer.
    let event = json!({"type": "agent_thinking", "run_id": "run_reg", "thread_id": "t_reg",
        "event_id": "from-the-stream", "payload": {"n": 2}});
    let _: String = redis::cmd("XADD")
        .arg("aw:ingest")
        .arg("*")
        .arg("event")
        .arg(event.to_string())
        .query_async(&mut cluster.node(cluster.master_of("aw:ingest").await).await)
        .await
        .unwrap();
    assert_eq!(viewer.events(1).await[0]["payload"]["n"], 2);

    // Events of runs nobody registers become dead letters, visible on every replica.
    let lost: Vec<Value> = (0..4)
        .map(|i| json!({"type": "agent_thinking", "run_id": format!("run_lost{i}"), "payload": {"n": i}}))
        .collect();
    let (status, answer) = a.post("/v1/events", &Value::from(lost).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("four dead letters", async || {
        let (_, letters) = b.get("/v1/deadletter").await;
        match letters["count"] == 4 {
            true => Ok(()),
            false => Err(letters.to_string()),
        }
    })
    .await;
    assert_eq!(
        a.metric("agentwire_unresolved_run_ids_total").await,
        4.0,
        "each run counted once"
    );
}

#[tokio::test]
async fn a_graceful_failover_moves_the_subscriptions_with_the_slot() {
    let cluster = RedisCluster::start(3, 1).await;
    let (a, b) = (on_cluster(&cluster).await, on_cluster(&cluster).await);
    let key = "aw:{thread:t_moved}:log";
    let master = cluster.master_of(key).await;
    let mut viewer = Client::hello(b.addr, "moved").await;
    viewer.subscribe("t_moved", None).await;
    a.publish(&[thinking("t_moved", 1)]).await;
    assert_eq!(viewer.events(1).await[0]["seq"], 1);

    // The replica takes over with the master's consent: the old master ends its shard
    // subscriptions (a sunsubscribe), and the gateway subscribes where the slot went.
    let replica = cluster.replica_of(master).await;
    let () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query_async(&mut cluster.node(replica).await)
        .await
        .unwrap();
    eventually("the replica serves the slot", async || {
        match cluster.master_of(key).await {
            port if port == replica => Ok(()),
            port => Err(format!("still {port}")),
        }
    })
    .await;
    for n in 2..=5 {
        let body = Value::from(vec![thinking("t_moved", n)]).to_string();
        eventually("the event is accepted", async || {
            match a.post("/v1/events", &body).await {
                (StatusCode::OK, _) => Ok(()),
                (status, answer) => Err(format!("{status}: {answer}")),
            }
        })
        .await;
    }
    // Another Redis process now: a new epoch, announced, then every event after the first.
    let mut shown = Vec::new();
    while !shown.contains(&5) {
        let frame = match tokio::time::timeout(Duration::from_secs(4), viewer.recv()).await {
            Ok(frame) => frame,
            // Where each node holds the gateway's shard subscriptions, to tell why.
            Err(_) => {
                let mut nodes = String::new();
                for port in cluster.running() {
                    let mut conn = cluster.node(port).await;
                    let shard: Vec<String> = redis::cmd("PUBSUB")
                        .arg("SHARDCHANNELS")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    let role: String = redis::cmd("INFO")
                        .arg("replication")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    let role = role.lines().nth(1).unwrap_or_default();
                    nodes += &format!("{port} {role} {shard:?}\n");
                }
                panic!(
                    "no event after the failover of {master} to {replica}; shown {shown:?}\n{nodes}"
                );
            }
        };
        if frame["type"] == "subscribed" {
            assert_eq!(frame["recovered"], false, "{frame}");
        } else if let Some(n) = frame["payload"]["n"].as_u64() {
            shown.push(n);
        }
    }
    for n in 2..=5 {
        assert!(shown.contains(&n), "{n} in {shown:?}");
    }
}

/// The ids of the pub/sub clients every node serves.
async fn pubsub_clients(cluster: &RedisCluster) -> Vec<String> {
    let mut ids = Vec::new();
    for port in cluster.running() {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut cluster.node(port).await)
            .await
            .unwrap();
        ids.extend(
            list.lines()
                .filter_map(|l| l.split(' ').next())
                .map(str::to_string),
        );
    }
    ids.sort();
    ids
}

#[tokio::test]
async fn watching_and_leaving_a_channel_again_and_again_keeps_the_pubsub_connection() {
    let cluster = RedisCluster::start(3, 0).await;
    let gateway = on_cluster(&cluster).await;
    let mut viewer = Client::hello(gateway.addr, "churn").await;
    viewer.barrier().await;
    let before = pubsub_clients(&cluster).await;
    // Each unsubscription's confirmation comes back as a push, like the one a node sends when
    // its slot moves: only the latter may remake the connection.
    for _ in 0..20 {
        viewer.subscribe("t_churn", None).await;
        viewer
            .send(json!({"type": "unsubscribe", "thread_id": "t_churn"}))
            .await;
        assert_eq!(viewer.recv().await["type"], "unsubscribed");
    }
    viewer.subscribe("t_churn", None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway.publish(&[thinking("t_churn", 1)]).await;
    assert_eq!(viewer.events(1).await[0]["payload"]["n"], 1);
    assert_eq!(
        pubsub_clients(&cluster).await,
        before,
        "the same connections"
    );
}

/// `CLUSTER MYID` of the node on `port`.
async fn node_id(cluster: &RedisCluster, port: u16) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut cluster.node(port).await)
        .await
        .unwrap()
}

/// Moves `slot` from the master on `from` to the master on `to` as `redis-cli --cluster reshard`
/// does: importing and migrating, the keys a few at a time with a pause between (so that commands
/// meet `ASK` and `TRYAGAIN` while it goes on), then the slot given to its new owner everywhere.
async fn move_slot(cluster: &RedisCluster, slot: i64, from: u16, to: u16) {
    let (from_id, to_id) = (node_id(cluster, from).await, node_id(cluster, to).await);
    let setslot = async |port: u16, args: &[&str]| {
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(args)
            .query_async(&mut cluster.node(port).await)
            .await
            .unwrap();
    };
    setslot(to, &["IMPORTING", &from_id]).await;
    setslot(from, &["MIGRATING", &to_id]).await;
    let mut source = cluster.node(from).await;
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(1)
            .query_async(&mut source)
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        let () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut source)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for port in cluster.running() {
        setslot(port, &["NODE", &to_id]).await;
    }
}

#[tokio::test]
async fn a_slot_moved_to_another_master_under_load_loses_nothing_and_says_so_once() {
    const EVENTS: usize = 150;
    let cluster = RedisCluster::start(3, 0).await;
    let (a, b) = (on_cluster(&cluster).await, on_cluster(&cluster).await);
    let thread = "t_resharded";
    let key = format!("aw:{{thread:{thread}}}:log");
    let from = cluster.master_of(&key).await;
    let to = cluster
        .running()
        .into_iter()
        .find(|port| *port != from)
        .unwrap();
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&key)
        .query_async(&mut cluster.node(from).await)
        .await
        .unwrap();
    let mut viewer = Client::hello(b.addr, "resharded").await;
    viewer.subscribe(thread, None).await;

    // A producer that posts an event every few milliseconds and sends again what is not taken
    // (503 while Redis answers TRYAGAIN), as producers are told to.
    let producer = {
        let a = a.internal;
        tokio::spawn(async move {
            let mut retried = 0;
            for n in 1..=EVENTS {
                let body = Value::from(vec![thinking(thread, n)]).to_string();
                loop {
                    let (status, answer) = crate::support::http(
                        a,
                        "POST",
                        "/v1/events",
                        Some(("application/json", &body)),
                    )
                    .await;
                    match status {
                        StatusCode::OK => break,
                        StatusCode::SERVICE_UNAVAILABLE => retried += 1,
                        status => panic!("event {n}: {status} {answer}"),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            retried
        })
    };
    let mut shown = Vec::new();
    while shown.len() < 30 {
        let frame = viewer.recv().await;
        shown.push(frame["payload"]["n"].as_u64().unwrap());
    }
    let before = viewer.recv().await;
    shown.push(before["payload"]["n"].as_u64().unwrap());
    let epoch = before["epoch"].clone();
    move_slot(&cluster, slot, from, to).await;
    assert_eq!(cluster.master_of(&key).await, to);
    let retried = tokio::time::timeout(Duration::from_secs(60), producer)
        .await
        .expect("the producer ends")
        .unwrap();
    eprintln!("{retried} POSTs were answered 503 while the slot moved");

    // The channel's keys now live in another Redis process, which cannot tell a migration from a
    // failover (docs/redis.md): the next publish starts a new epoch, and the viewer is told once
    // (`recovered: false`) and given the whole history again, as a client then shows it. Nothing
    // is missing, nothing is there twice.
    let mut resets = 0;
    while shown.last() != Some(&(EVENTS as u64)) {
        let frame = tokio::time::timeout(Duration::from_secs(8), viewer.recv())
            .await
            .unwrap_or_else(|_| panic!("after the slot moved, shown {shown:?}"));
        if frame["type"] == "subscribed" {
            assert_eq!(
                (&frame["recovered"], frame["epoch"] != epoch),
                (&json!(false), true),
                "{frame}"
            );
            resets += 1;
            shown.clear();
            continue;
        }
        shown.push(frame["payload"]["n"].as_u64().unwrap());
    }
    let expected: Vec<u64> = (1..=EVENTS as u64).collect();
    assert_eq!(
        (resets, shown),
        (1, expected),
        "{retried} POSTs were answered 503"
    );
    let ledger = ledger_until(&a, &format!("thread:{thread}"), |l| {
        l["delivered"] == EVENTS && l["pending"] == 0
    })
    .await;
    assert_eq!(
        (
            &ledger["emitted"],
            &ledger["lost_total"],
            &ledger["balanced"]
        ),
        (&json!(EVENTS), &json!(0), &json!(true)),
        "{ledger}"
    );
}

/// `rediss+cluster://`: every node speaks only TLS (clients, the cluster bus, replication); the
/// gateway verifies each node it is sent to with `broker.redis_ca_file`, and channels of every
/// shard work as on a plain Cluster.
#[tokio::test]
async fn a_cluster_over_tls_with_a_configured_ca() {
    let certificates = crate::support::Certificates::make();
    let ca = certificates.ca.clone();
    let cluster = RedisCluster::start_tls(3, certificates).await;
    let threads = a_thread_per_master(&cluster).await;
    let url = cluster.url();
    assert!(url.starts_with("rediss+cluster://"), "{url}");
    let gateway = Gateway::start_with(|c| {
        c.broker.redis_url = Some(url.clone());
        c.broker.redis_ca_file = Some(ca.clone());
    })
    .await;
    wait_ready(gateway.internal, StatusCode::OK).await;
    let mut viewers = Vec::new();
    for (thread, _) in &threads {
        viewers.push(gateway.viewer(&format!("v_{thread}"), thread).await);
    }
    for (thread, _) in &threads {
        gateway.publish(&[thinking(thread, 1)]).await;
    }
    for (viewer, (thread, _)) in viewers.iter_mut().zip(&threads) {
        let frame = viewer.recv().await;
        assert_eq!(frame["channel"], format!("thread:{thread}"), "{frame}");
    }

    // Without the CA, no node is trusted: not ready, nothing taken in.
    let untrusting = Gateway::start_with(|c| c.broker.redis_url = Some(url)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = crate::support::http(untrusting.internal, "GET", "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_redis_cannot_take_yet_goes_on_once_it_can_and_nothing_is_called_lost() {
    // The run's channel on a master of its own: the registry (`{runs}`) and the journal of held
    // events (`{held}`) answer while that master holds every write.
    let cluster = RedisCluster::start(3, 0).await;
    let (thread, paused) = cluster.thread_apart_from_the_registry("t_late").await;
    let url = cluster.url();
    let gateway = Gateway::start_with(|c| {
        c.broker.redis_url = Some(url);
        c.resolve.grace = Duration::from_secs(60);
    })
    .await;
    wait_ready(gateway.internal, StatusCode::OK).await;
    let mut viewer = Client::hello(gateway.addr, "v").await;
    viewer.subscribe(&thread, None).await;
    let early =
        |n: u64| json!({"type": "agent_thinking", "run_id": "run_late", "payload": {"n": n}});
    let answer = gateway.publish(&[early(1)]).await;
    assert_eq!(answer["results"][0]["status"], "pending_resolution");

    // The run registers while its channel's master takes no writes: the release cannot publish.
    cluster.hold_writes(paused).await;
    let register = json!({"run_id": "run_late", "thread_id": thread}).to_string();
    let (status, text) = gateway.post("/v1/runs", &register).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // A later event of the run waits behind the held one rather than overtake it.
    let answer = gateway.publish(&[early(2)]).await;
    assert_eq!(
        answer["results"][0]["status"], "pending_resolution",
        "{answer}"
    );
    viewer.silent_for(Duration::from_millis(300)).await;

    cluster.take_writes(paused).await;
    // Both arrive, in order, once: the call held by the pause ran when it ended, and the resumed
    // release's publish of it is answered duplicate.
    let shown: Vec<Value> = viewer.events(2).await;
    assert_eq!(
        shown
            .iter()
            .map(|e| (e["seq"].clone(), e["payload"]["n"].clone()))
            .collect::<Vec<_>>(),
        vec![(json!(1), json!(1)), (json!(2), json!(2))]
    );
    viewer.silent_for(Duration::from_millis(300)).await;
    let channel = format!("thread:{thread}");
    let ledger = ledger_until(&gateway, &channel, |l| l["delivered"] == 2).await;
    assert_eq!(ledger["emitted"], 2, "{ledger}");
    // Late, not lost: no dead letter, nothing counted lost, nothing left held.
    assert_eq!(gateway.get("/v1/deadletter").await.1["count"], 0);
    for series in [
        "agentwire_events_lost_total{reason=\"unresolved\"}",
        "agentwire_events_lost_total{reason=\"internal\"}",
        "agentwire_events_pending_resolution",
    ] {
        assert_eq!(gateway.metric(series).await, 0.0, "{series}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_entries_published_beside_one_a_master_held_up_are_acknowledged() {
    // Two threads on two masters, neither the one that holds the ingest stream; one of them
    // takes no writes while a read of the stream carries an entry for each.
    let cluster = RedisCluster::start(3, 0).await;
    let stream_master = cluster.master_of("aw:ingest").await;
    let threads: Vec<(String, u16)> = a_thread_per_master(&cluster)
        .await
        .into_iter()
        .filter(|(_, master)| *master != stream_master)
        .collect();
    let [(held_up, paused), (beside, _)] = &threads[..] else {
        panic!("two masters besides the stream's: {threads:?}");
    };
    let gateway = on_cluster(&cluster).await;
    let mut viewer = Client::hello(gateway.addr, "v").await;
    viewer.subscribe(beside, None).await;
    // A first event each, so both masters have the publish script.
    gateway
        .publish(&[thinking(held_up, 1), thinking(beside, 1)])
        .await;
    assert_eq!(viewer.recv().await["seq"], 1);

    cluster.hold_writes(*paused).await;
    // Added in one transaction, so that one read of the stream carries both.
    let mut stream = cluster.node(stream_master).await;
    let mut both = redis::pipe();
    both.atomic();
    for event in [thinking(held_up, 2), thinking(beside, 2)] {
        both.cmd("XADD")
            .arg("aw:ingest")
            .arg("*")
            .arg("event")
            .arg(event.to_string());
    }
    let _: Vec<String> = both.query_async(&mut stream).await.unwrap();
    assert_eq!(
        viewer.recv().await["seq"],
        2,
        "published beside the held-up one"
    );
    // Acknowledged although the entry before it is not: only the held-up one stays pending.
    let pending_until = async |stream: &mut redis::aio::MultiplexedConnection, want: usize| {
        eventually(&format!("{want} ingest entries pending"), async || {
            let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
                .arg("aw:ingest")
                .arg("agentwire")
                .query_async(stream)
                .await
                .unwrap();
            match pending.count() {
                count if count == want => Ok(()),
                other => Err(other.to_string()),
            }
        })
        .await
    };
    pending_until(&mut stream, 1).await;
    cluster.take_writes(*paused).await;
    pending_until(&mut stream, 0).await;
    viewer.silent_for(Duration::from_millis(300)).await;
}
