//! What the Redis broker may cost Redis, each test on its own real `redis-server`: subscribing
//! creates no key, the run registry is bounded in time and size, a full Redis refuses a publish
//! whole (503, counted) instead of growing past `maxmemory`, and the pub/sub subscriptions follow
//! the watched channels.

use std::time::Duration;

use hyper::StatusCode;
use redis::AsyncCommands;
use serde_json::{Value, json};

use agentwire::broker::Broker;
use agentwire::config::Config;
use agentwire::protocol::ChannelName;

use crate::support::{Gateway, Redis, event, eventually, http, wait_ready};

/// A gateway in this process on `redis`, ready to serve.
async fn on_redis(redis: &Redis, configure: impl FnOnce(&mut Config)) -> Gateway {
    let url = redis.url();
    let gateway = Gateway::start_with(|c| {
        c.broker.redis_url = Some(url);
        configure(c);
    })
    .await;
    wait_ready(gateway.internal, StatusCode::OK).await;
    gateway
}

/// The keys of channels (`aw:{thread:…}:…`, `aw:{user:…}:…`) in Redis now.
async fn channel_keys(redis: &Redis) -> Vec<String> {
    let mut conn = redis.conn().await;
    let mut keys: Vec<String> = conn.keys("aw:{thread:*").await.unwrap();
    keys.extend(conn.keys::<_, Vec<String>>("aw:{user:*").await.unwrap());
    keys
}

/// How many clients of `redis` are subscribed to the `:live` channel of `thread`.
async fn live_subscribers(redis: &Redis, thread: &str) -> u64 {
    let live = format!("aw:{{thread:{thread}}}:live");
    let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&live)
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    counts[0].1
}

fn thinking(thread: &str, payload: Value) -> Value {
    let mut event = event("agent_thinking", &format!("run_{thread}"), thread);
    event["payload"] = payload;
    event
}

#[tokio::test]
async fn subscribing_to_threads_nobody_published_to_creates_no_key_in_redis() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut client = gateway.client("u_fresh").await;
    assert_eq!(client.user_channel["epoch"], "", "{}", client.user_channel);
    for n in 0..20 {
        let thread = format!("t_fresh_{n}");
        let since = (n % 2 == 1).then(|| json!({"epoch": "0123456789abcdef", "seq": 3}));
        let subscribed = client.subscribe(&thread, since).await;
        // No epoch yet: there is nothing to resume in, and nothing was written to say so.
        assert_eq!(
            (&subscribed["epoch"], &subscribed["seq"]),
            (&json!(""), &json!(0))
        );
    }
    let (status, _) = gateway.get("/v1/channels/thread:t_fresh_0").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a watched channel is known while watched"
    );
    assert_eq!(channel_keys(&redis).await, Vec::<String>::new());

    // The first event gives the channel its epoch; a subscriber that saw none of it gets it live,
    // without a new `subscribed` frame, and can resume in that epoch.
    let answer = gateway
        .publish(&[thinking("t_fresh_3", json!({"n": 1}))])
        .await;
    let epoch = answer["results"][0]["epoch"].as_str().unwrap().to_string();
    assert_eq!(epoch.len(), 16, "{answer}");
    let first = client.recv().await;
    assert_eq!(
        (&first["type"], &first["seq"], &first["epoch"]),
        (&json!("agent_thinking"), &json!(1), &json!(epoch)),
        "{first}"
    );
    drop(client);
    gateway
        .publish(&[thinking("t_fresh_3", json!({"n": 2}))])
        .await;
    let mut again = gateway.client("u_fresh").await;
    let resumed = again
        .subscribe("t_fresh_3", Some(json!({"epoch": epoch, "seq": 1})))
        .await;
    assert_eq!(
        (
            &resumed["recovered"],
            &resumed["replayed"],
            &resumed["epoch"]
        ),
        (&json!(true), &json!(1), &json!(epoch)),
        "{resumed}"
    );
    assert_eq!(again.recv().await["seq"], 2);
    let keys = channel_keys(&redis).await;
    assert!(
        keys.iter().all(|k| k.starts_with("aw:{thread:t_fresh_3}:")),
        "only the published channel has keys: {keys:?}"
    );
}

#[tokio::test]
async fn the_shared_run_registry_is_bounded_by_capacity_and_expires_with_its_ttl() {
    let redis = Redis::start().await;
    let budget = |c: &mut Config| {
        c.resolve.registry_capacity = 3;
        c.resolve.registry_ttl = Duration::from_millis(1500);
    };
    let register =
        |run: &str, thread: &str| json!({"run_id": run, "thread_id": thread}).to_string();
    let a = on_redis(&redis, budget).await;
    for n in 0..3 {
        let (status, body) = a
            .post(
                "/v1/runs",
                &register(&format!("run_{n}"), &format!("t_{n}")),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // A replica that started later has heard none of them: the shared registry itself is full.
    let b = on_redis(&redis, budget).await;
    let (status, body) = b.post("/v1/runs", &register("run_3", "t_3")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("registry_full")),
        "{body}"
    );
    assert_eq!(
        b.metric("agentwire_runs_refused_total{reason=\"full\"}")
            .await,
        1.0
    );
    // Nothing was pushed out: run_0 still cannot be registered elsewhere.
    assert_eq!(b.post("/v1/runs", &register("run_0", "t_x")).await.0, 409);
    let mut conn = redis.conn().await;
    let held: u64 = conn.hlen("aw:{runs}:target").await.unwrap();
    assert_eq!(held, 3);
    let per_run: Vec<String> = conn.keys("aw:run:*").await.unwrap();
    assert!(per_run.is_empty(), "no key per run: {per_run:?}");

    // Past the TTL the registrations are gone: new ones are taken and the old ones removed.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let (status, body) = b.post("/v1/runs", &register("run_3", "t_3")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let held: u64 = conn.hlen("aw:{runs}:target").await.unwrap();
    let indexed: u64 = conn.zcard("aw:{runs}:expiry").await.unwrap();
    assert_eq!((held, indexed), (1, 1));
}

#[tokio::test]
async fn a_full_redis_refuses_a_publish_whole_with_503_and_stays_near_maxmemory() {
    const MAXMEMORY: u64 = 4 * 1024 * 1024;
    let redis = Redis::start_with(&[
        "--maxmemory",
        &MAXMEMORY.to_string(),
        "--maxmemory-policy",
        "noeviction",
    ])
    .await;
    let gateway = on_redis(&redis, |_| {}).await;
    let filler = "x".repeat(16 * 1024);
    let internal = gateway.internal;
    let post = |n: usize| {
        let event = thinking(&format!("t_full_{n}"), json!({"filler": filler, "n": n}));
        async move {
            let body = event.to_string();
            http(
                internal,
                "POST",
                "/v1/events",
                Some(("application/json", &body)),
            )
            .await
        }
    };
    // Fill Redis through the gateway until it refuses.
    let mut refused = None;
    for n in 0..2000 {
        let (status, text) = post(n).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(text);
            break;
        }
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    let text = refused.expect("Redis never refused a publish");
    assert!(
        text.contains(r#""status":"unavailable""#) && text.contains("(oom)"),
        "{text}"
    );
    // Refused again and again: nothing more is written.
    for n in 2000..2050 {
        assert_eq!(post(n).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(
        gateway
            .metric("agentwire_broker_refused_total{reason=\"oom\"}")
            .await,
        51.0
    );
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // One event past the limit at most (the check is at each script's start), never far past it.
    assert!(
        used < MAXMEMORY + 256 * 1024,
        "used_memory {used} with maxmemory {MAXMEMORY}"
    );
    // Reading still works: a subscriber gets what Redis holds.
    let mut client = gateway.client("u_full").await;
    let subscribed = client.subscribe("t_full_0", Some(json!({"seq": 0}))).await;
    assert_eq!(subscribed["replayed"], 1, "{subscribed}");
}

#[tokio::test]
async fn many_clients_leaving_at_once_leave_no_pub_sub_subscription_behind() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut clients = Vec::new();
    for c in 0..8 {
        let mut client = gateway.client(&format!("u_churn_{c}")).await;
        for n in 0..60 {
            client.subscribe(&format!("t_churn_{c}_{n}"), None).await;
        }
        clients.push(client);
    }
    assert_eq!(live_subscribers(&redis, "t_churn_7_59").await, 1);
    drop(clients);
    eventually("every pub/sub subscription is gone", async || {
        let live: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("aw:{thread:*}:live")
            .query_async(&mut redis.conn().await)
            .await
            .unwrap();
        match live.is_empty() {
            true => Ok(()),
            false => Err(format!("{live:?}")),
        }
    })
    .await;
    // An event on one of them nobody watches is not counted as offered to anyone.
    let answer = gateway.publish(&[thinking("t_churn_3_3", json!({}))]).await;
    assert_eq!(answer["results"][0]["seq"], 1, "{answer}");
    let offered: u64 = redis
        .conn()
        .await
        .scard("aw:{thread:t_churn_3_3}:offered")
        .await
        .unwrap();
    assert_eq!(offered, 0);
}

#[tokio::test]
async fn reconciliation_drops_a_stale_subscription_and_restores_a_missing_one() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |c| {
        c.broker.redis_reconcile_interval = Duration::from_millis(300);
    })
    .await;
    let inner = gateway.inner.clone().unwrap();
    let Broker::Redis(broker) = &*inner.broker else {
        panic!("a Redis gateway");
    };
    let mut client = gateway.client("u_rec").await;
    client.subscribe("t_watched", None).await;

    // What a lost unsubscribe leaves: subscribed to a channel nobody here watches.
    broker
        .stray_subscription(&ChannelName::thread("t_stale"), true)
        .await;
    assert_eq!(live_subscribers(&redis, "t_stale").await, 1);
    // And the opposite: a watched channel the connection is not subscribed to.
    broker
        .stray_subscription(&ChannelName::thread("t_watched"), false)
        .await;
    assert_eq!(live_subscribers(&redis, "t_watched").await, 0);
    gateway
        .publish(&[thinking("t_watched", json!({"n": 1}))])
        .await;

    eventually("reconciliation fixed both", async || {
        let live = (
            live_subscribers(&redis, "t_stale").await,
            live_subscribers(&redis, "t_watched").await,
        );
        match live {
            (0, 1) => Ok(()),
            other => Err(format!("subscribers (t_stale, t_watched): {other:?}")),
        }
    })
    .await;
    // What was published while it was not subscribed is read from the stream.
    let missed = client.recv().await;
    assert_eq!(
        (&missed["seq"], &missed["payload"]["n"]),
        (&json!(1), &json!(1))
    );
    gateway
        .publish(&[thinking("t_watched", json!({"n": 2}))])
        .await;
    assert_eq!(client.recv().await["seq"], 2);
    let exposition = gateway.metrics().await;
    crate::support::assert_lines(
        &exposition,
        &[
            "agentwire_redis_subscriptions_reconciled_total{action=\"unsubscribed\"} 1",
            "agentwire_redis_subscriptions_reconciled_total{action=\"subscribed\"} 1",
        ],
    );
}
