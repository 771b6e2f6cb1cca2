//! The Redis broker: channels, their ledger, the run registry and event-id dedupe live in Redis,
//! so that any replica can take any client or producer and none keeps state that matters.
//!
//! Keys carry the channel as hash tag (`aw:{thread:t_42}:…`), so Redis Cluster can shard by
//! channel and every script touches one slot:
//!
//! - `:log` stream, entry id `<seq>-0`, fields `b` (frame body), `t` (publish ms), `p` (producer ms);
//! - `:meta` hash: `epoch`, `last_seq`, `trimmed` (the last seq trimmed from `:log`), `run` (the
//!   Redis `run_id` that wrote the epoch), `emitted`,
//!   `pending`, `delivered`, `acked`, `acked_seq`, `lost_expired_unseen`, `lost_expired_subscribed`;
//! - `:delivered` and `:offered` sets of retained seqs; `:seen` sorted set of dedupe ids;
//! - `:live` pub/sub channel carrying each new entry to the replicas that watch the channel (on a
//!   Redis Cluster a shard channel of the same slot, see `conn.rs`).
//!
//! This replica mirrors the channels its clients watch into a [`Channels`] (see [`live`]),
//! which does the local fan-out and replay exactly as in embedded mode.

mod conn;
mod deadletters;
mod error;
mod held;
mod ingest_stream;
mod keys;
mod ledger;
pub mod live;
mod mirror;
mod publish;
mod pubsub;
mod registry;
pub mod reports;
mod ui_events;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::broker::views::Views;
use conn::{Backend, Conn, Healing};
use ledger::Counters;
use mirror::Attachment;
use redis::{Cmd, ErrorKind, RedisError, RedisResult, Script, ServerErrorKind, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Broker, Channels, Upward};
use crate::config::{BrokerConfig, Config};
use crate::fanout::Delivered;
use crate::metrics::Metrics;
use crate::protocol::ChannelName;

pub use live::Reconciled;
pub use registry::Registration;
pub use reports::Report;

/// Pub/sub subscribe and unsubscribe requests waiting for the pub/sub task (a full queue makes
/// the sender wait).
const LIVE_QUEUE: usize = 4096;
/// Delivery and ack reports waiting to be written to Redis; past this a report is dropped
/// (counted in `agentwire_broker_errors_total`) and the event stays pending in the ledger.
const REPORT_QUEUE: usize = 65_536;

struct Scripts {
    publish: Script,
    snapshot: Script,
    renew: Script,
    deliver: Script,
    ack: Script,
    seen: Script,
    sweep: Script,
    unindex: Script,
    register: Script,
    adopt: Script,
}

/// `script` with the `trim` function of `trim.lua` after its first line: the shebang that
/// declares its flags must stay the first line.
fn with_trim(script: &str) -> String {
    let (shebang, body) = script.split_once('\n').unwrap_or((script, ""));
    format!("{shebang}\n{}\n{body}", include_str!("trim.lua"))
}

impl Scripts {
    /// Every script declares its flags (Redis 7: `#!lua flags=…`): without them Redis checks
    /// `maxmemory` only at a script's first memory-growing write, and not at all after any write
    /// before it, so a full Redis could take a publish half-way and go far past `maxmemory`.
    fn new() -> Self {
        Self {
            publish: Script::new(&with_trim(include_str!("publish.lua"))),
            snapshot: Script::new(include_str!("snapshot.lua")),
            renew: Script::new(include_str!("renew.lua")),
            deliver: Script::new(include_str!("deliver.lua")),
            ack: Script::new(include_str!("ack.lua")),
            seen: Script::new(include_str!("seen.lua")),
            sweep: Script::new(&with_trim(include_str!("sweep.lua"))),
            unindex: Script::new(include_str!("unindex.lua")),
            register: Script::new(include_str!("register.lua")),
            adopt: Script::new(include_str!("adopt.lua")),
        }
    }
}

pub struct RedisBroker {
    pub(crate) backend: Backend,
    /// The command connection shared by every caller.
    pub(crate) conn: Healing,
    scripts: Scripts,
    pub(crate) mirror: Channels,
    history: crate::config::HistoryConfig,
    dedupe_window: Duration,
    dedupe_capacity: usize,
    registry_ttl: Duration,
    /// `resolve.registry_capacity`: live registrations the shared registry holds at most.
    registry_capacity: usize,
    /// `broker.*`: the ingest stream and its group, the HLink stream and its length bound.
    config: BrokerConfig,
    /// `ingest.max_event_bytes`, for events read from the ingest stream.
    max_event_bytes: usize,
    attachments: Mutex<HashMap<ChannelName, Attachment>>,
    pub(crate) live: mpsc::Sender<live::Command>,
    pub(crate) live_commands: Mutex<Option<mpsc::Receiver<live::Command>>>,
    pub(crate) reports: mpsc::Sender<Report>,
    /// First deliveries, reported by the mirror's stored events (see [`Feed`]).
    deliveries: mpsc::Sender<Delivered>,
    pub(crate) report_queue: Mutex<Option<(mpsc::Receiver<Report>, mpsc::Receiver<Delivered>)>>,
    /// Last PING answered (set by the health task).
    up: AtomicBool,
    /// Set at the first answer of Redis since start, never cleared: `/readyz` follows it.
    answered_once: AtomicBool,
    /// Counts pub/sub (re)connections, so an attach can tell one happened while it read.
    pub(crate) generation: AtomicU64,
    /// How long a run's shared activity is kept: its idle timeout twice, at least `watchdog.retain`.
    run_seen_ttl: Duration,
    /// `deadletter.capacity`, and the length of [`DEADLETTERS`] as the last sweep read it.
    deadletter_capacity: usize,
    deadletter_count: AtomicU64,
    counters: Counters,
    pub(in crate::broker) views: Views,
    /// This replica's name in the journal of held events (`held.rs`): unique per process.
    replica: String,
    /// When this replica last marked itself alive there (ms; 0 before the first time).
    last_beat: AtomicU64,
}

impl RedisBroker {
    pub fn new(config: &Config, url: &str) -> anyhow::Result<Self> {
        crate::outbound::install_tls_provider();
        // Checked at load: a readable PEM certificate.
        let ca = match &config.broker.redis_ca_file {
            Some(path) => Some(std::fs::read(path)?),
            None => None,
        };
        let backend = Backend::new(url, ca)?;
        let conn = Healing::new(&backend, Duration::from_secs(2), 1)?;
        let (live, live_commands) = mpsc::channel(LIVE_QUEUE);
        let (reports, report_queue) = mpsc::channel(REPORT_QUEUE);
        let (deliveries, delivery_queue) = mpsc::channel(REPORT_QUEUE);
        Ok(Self {
            backend,
            conn,
            scripts: Scripts::new(),
            mirror: Channels::new(config.history.clone()),
            history: config.history.clone(),
            dedupe_window: config.ingest.dedupe_window,
            dedupe_capacity: config.ingest.dedupe_capacity,
            registry_ttl: config.resolve.registry_ttl,
            registry_capacity: config.resolve.registry_capacity,
            config: config.broker.clone(),
            max_event_bytes: config.ingest.max_event_bytes,
            attachments: Mutex::default(),
            live,
            live_commands: Mutex::new(Some(live_commands)),
            reports,
            deliveries,
            report_queue: Mutex::new(Some((report_queue, delivery_queue))),
            up: AtomicBool::new(false),
            answered_once: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            run_seen_ttl: (config.watchdog.run_idle_timeout * 2).max(config.watchdog.retain),
            deadletter_capacity: config.deadletter.capacity,
            deadletter_count: AtomicU64::new(0),
            counters: Counters::default(),
            views: Views::new(config.ledger.snapshot_interval),
            replica: format!(
                "{}-{:08x}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "agentwire".into()),
                rand::random::<u32>()
            ),
            last_beat: AtomicU64::new(0),
        })
    }

    pub(crate) fn conn(&self) -> Conn {
        self.conn.get()
    }

    /// `PUBLISH` on one server; `SPUBLISH` on a Cluster, so a message goes only to the shard
    /// that owns its channel's slot instead of to every node.
    pub(super) fn publish_command(&self) -> &'static str {
        if self.backend.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether Redis has answered at least once since start: readiness (an outage later does not
    /// make the replica unready, see docs/decisions.md).
    pub fn has_answered(&self) -> bool {
        self.answered_once.load(Ordering::Acquire)
    }

    pub(crate) fn set_up(&self, up: bool) {
        if up {
            self.answered_once.store(true, Ordering::Release);
        }
        self.up.store(up, Ordering::Release);
    }

    /// Sends `calls` (of `script`, made by [`evalsha`]) in one round trip (one per slot on a
    /// Cluster) and returns each call's own result ([`Conn::each_reply`]). A server without the
    /// script (restarted, or a replica just promoted: the script cache is not replicated) answers
    /// `NOSCRIPT` to its calls: the script is loaded and those calls alone sent again, as the redis
    /// crate does for one call.
    async fn call_each(
        &self,
        script: &Script,
        calls: impl Fn() -> Vec<Cmd>,
    ) -> Vec<RedisResult<Value>> {
        let mut conn = self.conn();
        let mut replies = conn.each_reply(calls()).await;
        let refused =
            |reply: &RedisResult<Value>| matches!(reply, Err(error) if is_noscript(error));
        if !replies.iter().any(refused) {
            return replies;
        }
        let lacking: Vec<bool> = replies.iter().map(refused).collect();
        // On a Cluster the script goes to every node, and one that does not answer fails the
        // load although the others took it: the calls are sent again either way, and a call still
        // refused for the script gets the load's error.
        let loaded = script.prepare_invoke().load_async(&mut conn).await;
        let calls = calls().into_iter().zip(&lacking);
        let again = calls.filter(|(_, lacking)| **lacking).map(|(call, _)| call);
        let again = conn.each_reply(again.collect()).await;
        let refused = replies
            .iter_mut()
            .zip(&lacking)
            .filter(|(_, lacking)| **lacking);
        for ((reply, _), answer) in refused.zip(again) {
            *reply = match (answer, &loaded) {
                (Err(error), Err(load)) if is_noscript(&error) => Err(load.clone()),
                (answer, _) => answer,
            };
        }
        replies
    }
}

fn is_noscript(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Channels (or runs) one script call of the reports takes at most: a script blocks Redis while it
/// runs.
const PER_REPORT_CALL: usize = 100;

/// A call of `script` with `keys`, as one command of a pipeline: `EVALSHA`, so the keys come after
/// the hash and their count (where [`conn::Conn::each`] finds them). Room is made for `args`
/// further arguments of `bytes` in all, so that adding them does not grow the command again and
/// again.
fn evalsha(script: &Script, keys: &[&str], args: usize, bytes: usize) -> Cmd {
    let hash = script.get_hash();
    let room = keys.iter().map(|key| key.len()).sum::<usize>() + hash.len() + 16 + bytes;
    let mut call = Cmd::with_capacity(3 + keys.len() + args, room);
    call.arg("EVALSHA").arg(hash).arg(keys.len()).arg(keys);
    call
}

/// Starts the Redis broker's tasks on `tracker` (health, pub/sub, delivery reports, the ingest
/// stream reader); they end with `stop`, which comes after the sessions ended, so their last
/// deliveries are recorded. Returns the channels on which registrations and ingest stream
/// entries come up to ingest.
pub fn start(
    broker: &Arc<Broker>,
    tracker: &TaskTracker,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) -> Upward {
    let (announce, announcements) = mpsc::channel(live::ANNOUNCE_QUEUE);
    let (entries, stream) = mpsc::channel(ingest_stream::QUEUE);
    let Broker::Redis(redis) = &**broker else {
        return Upward {
            announcements,
            stream,
        };
    };
    let with = |broker: &Arc<Broker>| Arc::clone(broker);
    let (b, m, s) = (with(broker), Arc::clone(&metrics), stop.clone());
    tracker.spawn(async move {
        if let Broker::Redis(redis) = &*b {
            live::health(redis, &m, s).await;
        }
    });
    if let Some(commands) = take(&redis.live_commands) {
        let (b, m, s) = (with(broker), Arc::clone(&metrics), stop.clone());
        tracker.spawn(async move {
            if let Broker::Redis(redis) = &*b {
                live::run(redis, commands, announce, &m, s).await;
            }
        });
    }
    if let Some((queue, deliveries)) = take(&redis.report_queue) {
        let (b, m, s) = (with(broker), Arc::clone(&metrics), stop.clone());
        tracker.spawn(async move {
            if let Broker::Redis(redis) = &*b {
                reports::run(redis, queue, deliveries, &m, s).await;
            }
        });
    }
    let b = with(broker);
    tracker.spawn(async move {
        if let Broker::Redis(redis) = &*b {
            ingest_stream::run(redis, entries, &metrics, stop).await;
        }
    });
    Upward {
        announcements,
        stream,
    }
}

/// Takes a task's receiver out of its slot (once, at start).
fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}
