//! A Redis that comes back without its latest writes (killed, reloaded from an older RDB file):
//! no seq is used twice in one epoch, and a subscriber gets every event or is told, with a
//! `subscribed` frame (`recovered: false`, a new epoch), that its history was reset. Whatever the
//! outage, so whatever the order in which the health ping and the pub/sub reconnect notice it.
//! And a mirror that could not read its stream after a reconnect reads it again by itself.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{Value, json};

use crate::replicas::{ledger_until, on_redis, thinking};
use crate::support::{Client, Gateway, Redis, WAIT};

const THREAD: &str = "t_reload";

/// The (epoch, seq) each event got, by its number.
type Answers = HashMap<u64, (String, u64)>;

/// Posts event `n` once; the producer's answer.
async fn post(gateway: &Gateway, n: usize) -> (StatusCode, Value) {
    gateway
        .post(
            "/v1/events",
            &Value::from(vec![thinking(THREAD, n)]).to_string(),
        )
        .await
}

fn accepted(answers: &mut Answers, n: usize, body: &Value) {
    let result = &body["results"][0];
    assert_eq!(result["status"], "accepted", "e{n}: {body}");
    let position = (
        result["epoch"].as_str().unwrap().to_string(),
        result["seq"].as_u64().unwrap(),
    );
    if let Some((m, _)) = answers.iter().find(|(_, p)| **p == position) {
        panic!("e{n} was answered {position:?}, which e{m} already had: a seq reused in one epoch");
    }
    answers.insert(n as u64, position);
}

async fn publish(gateway: &Gateway, answers: &mut Answers, n: usize) {
    let (status, body) = post(gateway, n).await;
    assert_eq!(status, StatusCode::OK, "e{n}: {body}");
    accepted(answers, n, &body);
}

/// What the client saw: it checks every frame as it comes and returns once it has event `until`.
struct Watch {
    epoch: String,
    /// The last seq of this epoch, `None` right after a `subscribed` frame (its replay starts
    /// wherever the history does).
    last: Option<u64>,
    /// (epoch, seq) → event number, for every event received.
    positions: HashMap<(String, u64), u64>,
    received: BTreeSet<u64>,
    resets: usize,
}

impl Watch {
    async fn until(&mut self, client: &mut Client, until: u64) {
        while !self.received.contains(&until) {
            let frame = client.recv().await;
            if frame["type"] == "subscribed" {
                assert_eq!(frame["recovered"], json!(false), "{frame}");
                let epoch = frame["epoch"].as_str().unwrap().to_string();
                assert_ne!(epoch, self.epoch, "a reset keeps its epoch: {frame}");
                self.epoch = epoch;
                self.last = None;
                self.resets += 1;
                continue;
            }
            let n = frame["payload"]["n"]
                .as_u64()
                .unwrap_or_else(|| panic!("an event: {frame}"));
            let epoch = frame["epoch"].as_str().unwrap().to_string();
            let seq = frame["seq"].as_u64().unwrap();
            assert_eq!(
                epoch, self.epoch,
                "e{n} came in another epoch without a `subscribed` frame: {frame}"
            );
            if let Some(last) = self.last {
                assert_eq!(seq, last + 1, "e{n} after seq {last}: {frame}");
            }
            if let Some(m) = self.positions.insert((epoch, seq), n)
                && m != n
            {
                panic!("e{n} came as seq {seq} of an epoch in which e{m} had it: {frame}");
            }
            self.last = Some(seq);
            self.received.insert(n);
        }
    }
}

/// The reproduction of issue #14: a client subscribed throughout; e1–e5, `SAVE`, e6 and e7
/// (delivered), Redis killed and started again on its RDB file after `outage`, then e8–e10 as
/// soon as ingest takes them. With `elsewhere` the producer posts to a second replica, which
/// mirrors nothing and so cannot know which seqs the first one delivered.
async fn reload_that_lost_the_latest_writes(outage: Duration, elsewhere: bool) {
    let mut redis = Redis::start_persistent().await;
    let watching = on_redis(&redis, |_| {}).await;
    let other = match elsewhere {
        true => Some(on_redis(&redis, |_| {}).await),
        false => None,
    };
    let gateway = other.as_ref().unwrap_or(&watching);
    let mut client = watching.client("u1").await;
    let first = client.subscribe(THREAD, None).await;
    let mut answers = Answers::new();
    let mut watch = Watch {
        epoch: first["epoch"].as_str().unwrap().to_string(),
        last: Some(0),
        positions: HashMap::new(),
        received: BTreeSet::new(),
        resets: 0,
    };
    for n in 1..=5 {
        publish(gateway, &mut answers, n).await;
    }
    // The first event gave the channel its epoch: the client follows it without a frame.
    watch.epoch = answers[&1].0.clone();
    watch.until(&mut client, 5).await;
    // The RDB file holds e1–e5 as delivered.
    ledger_until(gateway, &format!("thread:{THREAD}"), |l| {
        l["delivered"] == 5
    })
    .await;
    redis.save().await;
    for n in 6..=7 {
        publish(gateway, &mut answers, n).await;
    }
    watch.until(&mut client, 7).await;
    assert_eq!(watch.resets, 0);

    redis.reload(outage).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = post(gateway, 8).await;
        if status == StatusCode::OK {
            accepted(&mut answers, 8, &body);
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "e8: {body}");
        assert!(
            std::time::Instant::now() < deadline,
            "ingest never came back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 9..=10 {
        publish(gateway, &mut answers, n).await;
    }

    watch.until(&mut client, 10).await;
    for n in 8..=10 {
        assert!(
            watch.received.contains(&n),
            "e{n} never reached the client (answered {:?}); it saw {:?}",
            answers[&n],
            watch.received
        );
        let (epoch, seq) = &answers[&n];
        assert_eq!(
            watch.positions.get(&(epoch.clone(), *seq)),
            Some(&n),
            "e{n} was answered {epoch}/{seq}"
        );
    }
    // The reload lost e6 and e7, so the channel starts a new epoch once; a second would be a
    // needless reset.
    assert!(watch.resets <= 1, "{} resets", watch.resets);
    client.barrier().await;
    client.silent_for(Duration::from_millis(500)).await;
    // Every event Redis still holds was delivered: none pending, none called unseen.
    let ledger = ledger_until(gateway, &format!("thread:{THREAD}"), |l| l["pending"] == 0).await;
    assert_eq!(ledger["lost"]["expired_unseen"], 0, "{ledger}");
    assert_eq!(ledger["lost"]["expired_subscribed"], 0, "{ledger}");
}

// The outages end just after one of the pub/sub link's reconnect attempts (100 ms doubling to 2 s:
// at about 0.1, 0.3, 0.7, 1.5, 3.1, 5.1 s), so ingest is back on the health ping a second or more
// before the link is: the order in which seqs were reused.

#[tokio::test]
async fn a_reload_after_a_short_outage_never_reuses_a_seq() {
    reload_that_lost_the_latest_writes(Duration::from_millis(1700), false).await;
}

#[tokio::test]
async fn a_reload_after_a_three_second_outage_never_reuses_a_seq() {
    reload_that_lost_the_latest_writes(Duration::from_millis(3400), false).await;
}

#[tokio::test]
async fn a_reload_after_a_five_second_outage_never_reuses_a_seq() {
    reload_that_lost_the_latest_writes(Duration::from_millis(5300), false).await;
}

#[tokio::test]
async fn a_reload_never_reuses_a_seq_on_a_replica_that_mirrors_nothing() {
    reload_that_lost_the_latest_writes(Duration::from_millis(1700), true).await;
}

#[tokio::test]
async fn a_stream_read_that_failed_after_a_reconnect_is_retried_without_a_live_message() {
    let redis = Redis::start().await;
    let gateway = on_redis(&redis, |_| {}).await;
    let mut client = gateway.client("u1").await;
    let first = client.subscribe("t_retry", None).await;
    assert_eq!(first["epoch"], "");
    gateway
        .publish(&[thinking("t_retry", 1), thinking("t_retry", 2)])
        .await;
    let events = client.events(2).await;
    // The channel's meta cannot be read (wrong type) when the pub/sub link comes back.
    let meta = "aw:{thread:t_retry}:meta";
    let mut conn = redis.conn().await;
    let () = redis::pipe()
        .rename(meta, "aside")
        .ignore()
        .set(meta, "not a hash")
        .ignore()
        .cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    // Long enough for the reconnect (100 ms) and its failed read.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Readable again, in another epoch: the mirror learns it from a retried read, as nothing
    // is published.
    let () = redis::pipe()
        .del(meta)
        .ignore()
        .rename("aside", meta)
        .ignore()
        .hset(meta, "epoch", "0000000000000042")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let renewed = client.recv().await;
    assert_eq!(
        (&renewed["type"], &renewed["recovered"], &renewed["epoch"]),
        (
            &json!("subscribed"),
            &json!(false),
            &json!("0000000000000042")
        ),
        "{renewed} after {events:?}"
    );
}
