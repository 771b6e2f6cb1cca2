//! The Redis broker: channels, their ledger, the run registry and event-id dedupe live in Redis,
//! so that any replica can take any client or producer and none keeps state that matters.
//!
//! Keys carry the channel as hash tag (`aw:{thread:t_42}:…`), so Redis Cluster can shard by
//! channel and every script touches one slot:
//!
//! - `:log` stream, entry id `<seq>-0`, fields `b` (frame body), `t` (publish ms), `p` (producer ms);
//! - `:meta` hash: `epoch`, `last_seq`, `emitted`, `pending`, `delivered`, `acked`, `acked_seq`,
//!   `lost_expired_unseen`, `lost_expired_subscribed`;
//! - `:delivered` and `:offered` sets of retained seqs; `:seen` sorted set of dedupe ids;
//! - `:live` pub/sub channel carrying each new entry to the replicas that watch the channel.
//!
//! This replica mirrors the channels its clients watch into a [`MemoryBroker`] (see [`live`]),
//! which does the local fan-out and replay exactly as in embedded mode.

mod error;
mod ingest_stream;
pub mod live;
pub mod reports;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};
use tokio::sync::{OnceCell, mpsc};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    AckError, Activity, Broker, BrokerError, HandOff, HandOffError, MemoryBroker, Outcome,
    Published, Sequenced, Snapshot, Upward, now_ms,
};
use crate::config::{BrokerConfig, Config};
use crate::fanout::{Delivered, Feed, Outbox};
use crate::ledger::{
    ChannelReport, ChannelSummary, Counts, LostReason, LostReport, Ranked, Totals,
};
use crate::metrics::Metrics;
use crate::protocol::ChannelName;
use crate::protocol::client::Since;
use crate::protocol::event::{Event, EventType};
use crate::protocol::run::RunTarget;
use crate::protocol::server::{self, Subscribed};

pub use reports::Report;

/// Pub/sub channel on which a registration is announced to every replica.
pub const REGISTERED: &str = "aw:registered";
/// Sorted set of channels by last publish (ms), for the age sweep and `GET /v1/ledger`.
const CHANNELS: &str = "aw:channels";
/// The shared dead letters: fields `run_id`, `reason`, `lost_ms`, `event` (the event as sent).
pub const DEADLETTERS: &str = "aw:deadletters";
/// Pub/sub subscribe and unsubscribe requests waiting for the pub/sub task.
const LIVE_QUEUE: usize = 4096;
/// Delivery and ack reports waiting to be written to Redis; past this a report is dropped
/// (counted in `agentwire_broker_errors_total`) and the event stays pending in the ledger.
const REPORT_QUEUE: usize = 65_536;
/// Channels `GET /v1/ledger` reads at most.
const LEDGER_SCAN: isize = 10_000;

/// The keys of one channel.
pub struct Keys {
    pub log: String,
    pub meta: String,
    pub seen: String,
    pub delivered: String,
    pub offered: String,
    pub live: String,
}

impl Keys {
    pub fn of(name: &ChannelName) -> Self {
        let tag = format!("aw:{{{}}}", name.as_str());
        Self {
            log: format!("{tag}:log"),
            meta: format!("{tag}:meta"),
            seen: format!("{tag}:seen"),
            delivered: format!("{tag}:delivered"),
            offered: format!("{tag}:offered"),
            live: format!("{tag}:live"),
        }
    }

    /// The channel a `:live` pub/sub name belongs to.
    pub fn channel_of_live(live: &str) -> Option<ChannelName> {
        ChannelName::parse(live.strip_prefix("aw:{")?.strip_suffix("}:live")?)
    }
}

/// A stream entry as read: id and fields.
type Entry = (String, HashMap<String, Bytes>);

fn run_key(run_id: &str) -> String {
    format!("aw:run:{{{run_id}}}")
}

fn run_seen_key(run_id: &str) -> String {
    format!("aw:runseen:{{{run_id}}}")
}

struct Scripts {
    publish: Script,
    snapshot: Script,
    deliver: Script,
    ack: Script,
    sweep: Script,
    unindex: Script,
}

impl Scripts {
    fn new() -> Self {
        let trim = include_str!("trim.lua");
        Self {
            publish: Script::new(&format!("{trim}\n{}", include_str!("publish.lua"))),
            snapshot: Script::new(include_str!("snapshot.lua")),
            deliver: Script::new(include_str!("deliver.lua")),
            ack: Script::new(include_str!("ack.lua")),
            sweep: Script::new(&format!("{trim}\n{}", include_str!("sweep.lua"))),
            unindex: Script::new(include_str!("unindex.lua")),
        }
    }
}

/// What this replica did, for `/metrics` (summed over replicas by the dashboards).
#[derive(Default)]
struct Counters {
    emitted: AtomicU64,
    delivered: AtomicU64,
    acked: AtomicU64,
    lost: [AtomicU64; 4],
}

/// A channel this replica mirrors: how many local subscriptions hold it, and its first load.
struct Attachment {
    users: usize,
    ready: Arc<OnceCell<()>>,
}

pub struct RedisBroker {
    pub(crate) client: redis::Client,
    conn: ConnectionManager,
    scripts: Scripts,
    pub(crate) mirror: MemoryBroker,
    history: crate::config::HistoryConfig,
    dedupe_window: Duration,
    dedupe_capacity: usize,
    registry_ttl: Duration,
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
    /// Counts pub/sub (re)connections, so an attach can tell one happened while it read.
    pub(crate) generation: AtomicU64,
    /// How long a run's shared activity is kept: its idle timeout twice, at least `watchdog.retain`.
    run_seen_ttl: Duration,
    /// `deadletter.capacity`, and the length of [`DEADLETTERS`] as the last sweep read it.
    deadletter_capacity: usize,
    deadletter_count: AtomicU64,
    counters: Counters,
}

impl RedisBroker {
    pub fn new(config: &Config, url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        // Fail fast while Redis is away: callers answer 503 instead of hanging.
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager)?;
        let (live, live_commands) = mpsc::channel(LIVE_QUEUE);
        let (reports, report_queue) = mpsc::channel(REPORT_QUEUE);
        let (deliveries, delivery_queue) = mpsc::channel(REPORT_QUEUE);
        Ok(Self {
            client,
            conn,
            scripts: Scripts::new(),
            mirror: MemoryBroker::new(config.history.clone()),
            history: config.history.clone(),
            dedupe_window: config.ingest.dedupe_window,
            dedupe_capacity: config.ingest.dedupe_capacity,
            registry_ttl: config.resolve.registry_ttl,
            config: config.broker.clone(),
            max_event_bytes: config.ingest.max_event_bytes,
            attachments: Mutex::default(),
            live,
            live_commands: Mutex::new(Some(live_commands)),
            reports,
            deliveries,
            report_queue: Mutex::new(Some((report_queue, delivery_queue))),
            up: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            run_seen_ttl: (config.watchdog.run_idle_timeout * 2).max(config.watchdog.retain),
            deadletter_capacity: config.deadletter.capacity,
            deadletter_count: AtomicU64::new(0),
            counters: Counters::default(),
        })
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
    }

    fn attachments(&self) -> MutexGuard<'_, HashMap<ChannelName, Attachment>> {
        self.attachments.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channels this replica mirrors now.
    pub(crate) fn attached(&self) -> Vec<ChannelName> {
        self.attachments().keys().cloned().collect()
    }

    pub async fn publish(
        &self,
        name: &ChannelName,
        event: &Event,
        entry: Option<&str>,
    ) -> Result<Outcome, BrokerError> {
        if !self.is_up() {
            return Err(BrokerError::Unavailable("Redis is not answering".into()));
        }
        let keys = Keys::of(name);
        let now = now_ms();
        let produced = event
            .ts
            .as_deref()
            .filter(|ts| ts.ends_with('Z'))
            .and_then(|ts| humantime::parse_rfc3339_weak(ts).ok())
            .and_then(|at| at.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_millis().to_string())
            .unwrap_or_default();
        let body = server::event_body(event, name);
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(&keys.log)
            .key(&keys.meta)
            .key(&keys.seen)
            .key(&keys.delivered)
            .key(&keys.offered)
            .arg(body)
            .arg(now)
            .arg(produced)
            .arg(self.history.max_events)
            .arg(now.saturating_sub(self.history.max_age.as_millis() as u64))
            .arg(now.saturating_sub(self.dedupe_window.as_millis() as u64))
            .arg(new_epoch())
            .arg(&keys.live)
            .arg(self.dedupe_capacity.max(1));
        if let Some(event_id) = &event.event_id {
            invocation.arg(format!("e:{event_id}"));
        }
        if let Some(entry) = entry {
            invocation.arg(format!("x:{entry}"));
        }
        let mut conn = self.conn();
        let (status, epoch, seq, unseen, subscribed): (u8, String, u64, u64, u64) =
            invocation.invoke_async(&mut conn).await?;
        if status == 0 {
            return Ok(Outcome::Duplicate);
        }
        self.counters.emitted.fetch_add(1, Ordering::Relaxed);
        self.count_lost(name, unseen, subscribed);
        // The channel index and the run's activity are not in the script: they span channels
        // (Redis Cluster slots). One report, batched by the report task.
        let ended = matches!(
            event.kind,
            EventType::AgentCompleted | EventType::AgentError
        );
        let _ = self.reports.try_send(Report::Published {
            channel: name.clone(),
            ms: now,
            run: event.run_id.clone().map(|run_id| (run_id, ended)),
        });
        Ok(Outcome::Published(Published {
            seq,
            epoch: epoch.into(),
        }))
    }

    fn count_lost(&self, name: &ChannelName, unseen: u64, subscribed: u64) {
        self.counters.lost[LostReason::ExpiredUnseen as usize].fetch_add(unseen, Ordering::Relaxed);
        self.counters.lost[LostReason::ExpiredSubscribed as usize]
            .fetch_add(subscribed, Ordering::Relaxed);
        if subscribed > 0 {
            tracing::warn!(channel = %name, lost = subscribed, reason = "expired_subscribed", "Events left history undelivered while someone was subscribed.");
        }
    }

    /// Subscribes a local connection: the first one here attaches the channel (pub/sub first,
    /// then the stream, merged by seq), later ones join the mirror at once.
    pub async fn subscribe(
        &self,
        name: &ChannelName,
        since: Option<&Since>,
        outbox: &Arc<Outbox>,
    ) -> Result<Option<Subscribed>, BrokerError> {
        let ready = {
            let mut attachments = self.attachments();
            let attachment = attachments
                .entry(name.clone())
                .or_insert_with(|| Attachment {
                    users: 0,
                    ready: Arc::default(),
                });
            attachment.users += 1;
            Arc::clone(&attachment.ready)
        };
        if let Err(error) = ready.get_or_try_init(|| self.attach(name)).await {
            self.release(name);
            return Err(error);
        }
        let subscribed = self.mirror.subscribe(name, since, outbox);
        if subscribed.is_none() {
            self.release(name);
        }
        Ok(subscribed)
    }

    async fn attach(&self, name: &ChannelName) -> Result<(), BrokerError> {
        let feed = Arc::new(Feed {
            channel: name.clone(),
            epoch: "".into(),
            deliveries: self.deliveries.clone(),
        });
        self.mirror.prepare(name, &feed);
        let (confirmed, reply) = tokio::sync::oneshot::channel();
        self.live
            .send(live::Command::Subscribe(name.clone(), confirmed))
            .await
            .map_err(|_| BrokerError::Unavailable("the pub/sub task stopped".into()))?;
        reply
            .await
            .map_err(|_| BrokerError::Unavailable("the pub/sub task stopped".into()))??;
        let generation = self.generation.load(Ordering::Acquire);
        let snapshot = self.snapshot(name, 1).await?;
        self.mirror.merge(name, snapshot);
        // The pub/sub link was made again while the stream was read: the reconnect skipped this
        // channel (still loading), so read what was published meanwhile.
        if self.generation.load(Ordering::Acquire) != generation {
            self.resync(name).await?;
        }
        Ok(())
    }

    /// One local subscription fewer; the last one detaches the channel.
    fn release(&self, name: &ChannelName) {
        let mut attachments = self.attachments();
        let Some(attachment) = attachments.get_mut(name) else {
            return;
        };
        attachment.users -= 1;
        if attachment.users == 0 {
            attachments.remove(name);
            self.mirror.detach(name);
            // Queued behind any earlier subscribe, so the order on the pub/sub connection holds.
            // A full queue leaves a stale subscription, whose messages the mirror ignores.
            let _ = self.live.try_send(live::Command::Unsubscribe(name.clone()));
        }
    }

    pub fn unsubscribe(&self, name: &ChannelName, outbox: &Arc<Outbox>) -> bool {
        let removed = self.mirror.unsubscribe(name, outbox);
        if removed {
            self.release(name);
        }
        removed
    }

    pub fn ack(&self, name: &ChannelName, seq: u64, outbox: &Arc<Outbox>) -> Result<u64, AckError> {
        let newly = self.mirror.ack(name, seq, outbox)?;
        if newly > 0
            && let Some((epoch, _)) = self.mirror.position(name)
        {
            let _ = self
                .reports
                .try_send(Report::Acked(name.clone(), epoch, seq));
        }
        Ok(newly)
    }

    /// The channel's epoch, last seq and entries from `from` on, read atomically.
    pub(crate) async fn snapshot(
        &self,
        name: &ChannelName,
        from: u64,
    ) -> Result<Snapshot, BrokerError> {
        let keys = Keys::of(name);
        let (seen_epoch, seen_last) = self
            .mirror
            .position(name)
            .unwrap_or_else(|| (Arc::from(""), 0));
        let mut conn = self.conn();
        let (epoch, last_seq, entries): (String, u64, Vec<Entry>) = self
            .scripts
            .snapshot
            .key(&keys.log)
            .key(&keys.meta)
            .arg(from)
            .arg(new_epoch())
            .arg(self.history.max_age.as_millis() as u64)
            .arg(&*seen_epoch)
            .arg(seen_last)
            .invoke_async(&mut conn)
            .await?;
        let events = entries
            .into_iter()
            .filter_map(|(id, fields)| sequenced(&id, &fields))
            .collect();
        Ok(Snapshot {
            epoch: epoch.into(),
            last_seq,
            events,
        })
    }

    /// Records first deliveries of one channel; returns how many were new cluster-wide.
    pub(crate) async fn delivered(
        &self,
        name: &ChannelName,
        epoch: &str,
        seqs: &[u64],
    ) -> Result<u64, BrokerError> {
        let keys = Keys::of(name);
        let mut invocation = self.scripts.deliver.prepare_invoke();
        invocation
            .key(&keys.log)
            .key(&keys.meta)
            .key(&keys.delivered)
            .arg(epoch);
        for seq in seqs {
            invocation.arg(seq);
        }
        let count: u64 = invocation.invoke_async(&mut self.conn()).await?;
        self.counters.delivered.fetch_add(count, Ordering::Relaxed);
        Ok(count)
    }

    /// Moves channels' last-publish times forward in the index.
    pub(crate) async fn index(
        &self,
        published: &HashMap<ChannelName, u64>,
    ) -> Result<(), BrokerError> {
        let mut command = redis::cmd("ZADD");
        command.arg(CHANNELS).arg("GT");
        for (channel, ms) in published {
            command.arg(ms).arg(channel.as_str());
        }
        let () = command.query_async(&mut self.conn()).await?;
        Ok(())
    }

    pub(crate) async fn acked(
        &self,
        name: &ChannelName,
        epoch: &str,
        seq: u64,
    ) -> Result<(), BrokerError> {
        let count: u64 = self
            .scripts
            .ack
            .key(Keys::of(name).meta)
            .arg(epoch)
            .arg(seq)
            .invoke_async(&mut self.conn())
            .await?;
        self.counters.acked.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    pub async fn report(&self, name: &ChannelName) -> Result<Option<ChannelReport>, BrokerError> {
        let keys = Keys::of(name);
        let mut conn = self.conn();
        let (meta, retained, first): (HashMap<String, String>, usize, Vec<(String, Value)>) =
            redis::pipe()
                .hgetall(&keys.meta)
                .xlen(&keys.log)
                .cmd("XRANGE")
                .arg(&keys.log)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await?;
        if !meta.contains_key("epoch") {
            return Ok(None);
        }
        let counts = counts_of(&meta);
        let field = |key: &str| meta.get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(Some(ChannelReport {
            channel: name.to_string(),
            epoch: meta.get("epoch").cloned().unwrap_or_default(),
            last_seq: field("last_seq"),
            first_retained_seq: first.first().and_then(|(id, _)| seq_of(id)),
            retained,
            subscribers: self.mirror.report(name).map_or(0, |r| r.subscribers),
            emitted: counts.emitted,
            delivered: counts.delivered,
            acked: counts.acked,
            pending: counts.pending,
            oldest_pending_age_seconds: None,
            lost: LostReport::from_counts(&counts),
            lost_total: counts.lost_total(),
            balanced: counts.balanced(),
        }))
    }

    /// What this replica did: emitted by its ingest, delivered by its sockets, lost by its trims.
    /// Its pending is the signed rest; summed over replicas it is the cluster's.
    /// The oldest-pending ages are of the channels mirrored here.
    pub fn totals(&self) -> Totals {
        let mirror = self.mirror.totals();
        let c = &self.counters;
        let lost = std::array::from_fn(|i| c.lost[i].load(Ordering::Relaxed));
        let emitted = c.emitted.load(Ordering::Relaxed);
        let delivered = c.delivered.load(Ordering::Relaxed);
        Totals {
            emitted,
            delivered,
            acked: c.acked.load(Ordering::Relaxed),
            pending: emitted as i64 - delivered as i64 - lost.iter().sum::<u64>() as i64,
            lost,
            oldest_pending_age: mirror.oldest_pending_age,
            oldest_offered_pending_age: mirror.oldest_offered_pending_age,
            channels: mirror.channels,
        }
    }

    /// The cluster-wide ledger over the channels in the index (at most [`LEDGER_SCAN`]).
    pub async fn ledger(&self, top: usize) -> Result<(Totals, Ranked), BrokerError> {
        let mut conn = self.conn();
        let names: Vec<String> = conn.zrevrange(CHANNELS, 0, LEDGER_SCAN - 1).await?;
        let mut pipe = redis::pipe();
        for name in &names {
            if let Some(channel) = ChannelName::parse(name) {
                pipe.hgetall(Keys::of(&channel).meta);
            }
        }
        let metas: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        let mut totals = Totals::default();
        let mut all = Vec::new();
        for (name, meta) in names.iter().zip(&metas) {
            let counts = counts_of(meta);
            totals.add(&counts);
            totals.channels += 1;
            if counts.pending > 0 || counts.lost_total() > 0 {
                all.push(ChannelSummary {
                    channel: name.clone(),
                    pending: counts.pending,
                    oldest_pending_age_seconds: None,
                    lost_total: counts.lost_total(),
                    lost: LostReport::from_counts(&counts),
                    subscribers: 0,
                });
            }
        }
        Ok((totals, Ranked::from_summaries(all, top)))
    }

    /// Trims channels idle for `history.max_age` (their entries are all that old) and retires
    /// the empty ones. Every replica may run it: the script is idempotent.
    pub async fn sweep(&self) {
        if !self.is_up() {
            return;
        }
        let now = now_ms();
        let min_t = now.saturating_sub(self.history.max_age.as_millis() as u64);
        let mut conn = self.conn();
        if let Ok(count) = conn.xlen::<_, u64>(DEADLETTERS).await {
            self.deadletter_count.store(count, Ordering::Relaxed);
        }
        let idle: Vec<String> = match conn
            .zrangebyscore_limit(CHANNELS, "-inf", min_t, 0, 200)
            .await
        {
            Ok(idle) => idle,
            Err(error) => {
                tracing::debug!(%error, "Sweep could not read the channel index.");
                return;
            }
        };
        for raw in idle {
            let Some(name) = ChannelName::parse(&raw) else {
                let _: Result<(), _> = conn.zrem(CHANNELS, &raw).await;
                continue;
            };
            let keys = Keys::of(&name);
            let swept: Result<(u64, u64, u8), _> = self
                .scripts
                .sweep
                .key(&keys.log)
                .key(&keys.meta)
                .key(&keys.delivered)
                .key(&keys.offered)
                .key(&keys.seen)
                .arg(self.history.max_events)
                .arg(min_t)
                .arg(self.history.max_age.as_millis() as u64)
                .invoke_async(&mut conn)
                .await;
            match swept {
                Ok((unseen, subscribed, empty)) => {
                    self.count_lost(&name, unseen, subscribed);
                    if empty == 1 {
                        // Only if no publish touched the channel since it was read as idle.
                        let _: Result<u8, _> = self
                            .scripts
                            .unindex
                            .key(CHANNELS)
                            .arg(&raw)
                            .arg(min_t)
                            .invoke_async(&mut conn)
                            .await;
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, channel = %name, "Sweep failed.");
                    return;
                }
            }
        }
    }

    /// Records a run's target in the shared registry and tells every replica.
    pub async fn register(&self, run_id: &str, target: &RunTarget) -> Result<(), BrokerError> {
        let value = serde_json::json!({"thread_id": target.thread_id, "user_id": target.user_id})
            .to_string();
        let mut conn = self.conn();
        let () = redis::pipe()
            .set_options(
                run_key(run_id),
                &value,
                redis::SetOptions::default()
                    .with_expiration(redis::SetExpiry::PX(self.registry_ttl.as_millis() as u64)),
            )
            .ignore()
            .publish(REGISTERED, format!("{run_id}\n{value}"))
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The registered target of a run, if any replica registered it within the TTL.
    pub async fn registered(&self, run_id: &str) -> Result<Option<RunTarget>, BrokerError> {
        let value: Option<String> = self.conn().get(run_key(run_id)).await?;
        Ok(value.as_deref().and_then(parse_target))
    }

    /// A dead letter as it is stored.
    pub fn letter(
        run_id: &str,
        reason: &str,
        event: &Event,
        origin: Option<&str>,
    ) -> reports::DeadLetter {
        reports::DeadLetter {
            run_id: run_id.to_string(),
            reason: reason.to_string(),
            lost_ms: now_ms(),
            event: event.to_json().to_string(),
            origin: origin.map(str::to_string),
        }
    }

    /// Queues a dead letter for the shared stream (written by the report task, retried while Redis
    /// is away). A full queue drops it: logged with the event and counted as a broker error.
    pub fn keep_dead_letter(&self, letter: reports::DeadLetter, metrics: &Metrics) {
        if let Err(full) = self.reports.try_send(Report::DeadLetter(letter)) {
            metrics.broker_errors.inc();
            if let Report::DeadLetter(letter) = full.into_inner() {
                tracing::error!(target: "agentwire::deadletter", run_id = %letter.run_id, event = %letter.event, "Dead letter not kept: the report queue is full.");
            }
        }
    }

    /// Writes dead letters, and counts each run id in `agentwire_unresolved_run_ids_total` once an
    /// hour across replicas (`aw:unresolved:{run}`, set only by the first).
    pub(crate) async fn store_dead_letters(
        &self,
        letters: &[reports::DeadLetter],
        metrics: &Metrics,
    ) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        for letter in letters {
            let command = pipe
                .cmd("XADD")
                .arg(DEADLETTERS)
                .arg("MAXLEN")
                .arg(self.deadletter_capacity)
                .arg("*")
                .arg("run_id")
                .arg(&letter.run_id)
                .arg("reason")
                .arg(&letter.reason)
                .arg("lost_ms")
                .arg(letter.lost_ms)
                .arg("event")
                .arg(&letter.event);
            if let Some(origin) = &letter.origin {
                command.arg("origin").arg(origin);
            }
            command.ignore();
        }
        let mut runs: Vec<&str> = letters.iter().map(|l| l.run_id.as_str()).collect();
        runs.sort_unstable();
        runs.dedup();
        for run_id in &runs {
            pipe.set_options(
                format!("aw:unresolved:{{{run_id}}}"),
                1,
                redis::SetOptions::default()
                    .conditional_set(redis::ExistenceCheck::NX)
                    .with_expiration(redis::SetExpiry::PX(3_600_000)),
            );
        }
        let first: Vec<Option<String>> = pipe.query_async(&mut self.conn()).await?;
        let new_runs = first.iter().filter(|set| set.is_some()).count();
        metrics.unresolved_run_ids.inc_by(new_runs as u64);
        Ok(())
    }

    /// The shared dead letters, oldest first (at most `deadletter.capacity`).
    pub async fn dead_letters(&self) -> Result<Vec<crate::deadletter::Entry>, BrokerError> {
        let entries: Vec<Entry> = redis::cmd("XRANGE")
            .arg(DEADLETTERS)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(self.deadletter_capacity)
            .query_async(&mut self.conn())
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(id, fields)| {
                let text = |key| field(&fields, key).map(str::to_string);
                let lost_ms: u64 = field(&fields, "lost_ms")?.parse().ok()?;
                Some(crate::deadletter::Entry {
                    origin: Some(text("origin").unwrap_or_else(|| id.clone())),
                    id: crate::deadletter::LetterId::Stream(id),
                    run_id: text("run_id")?,
                    reason: text("reason")?,
                    lost_at: std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(lost_ms),
                    event: crate::protocol::event::parse(field(&fields, "event")?, usize::MAX)
                        .ok()?,
                })
            })
            .collect())
    }

    /// The newest malformed ingest entries set aside in `<ingest_stream>:dead` (at most 100),
    /// newest first: `{id, entry, reason, event}`.
    pub async fn malformed(&self) -> Result<Vec<serde_json::Value>, BrokerError> {
        let entries: Vec<Entry> = redis::cmd("XREVRANGE")
            .arg(format!("{}:dead", self.config.ingest_stream))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(100)
            .query_async(&mut self.conn())
            .await?;
        Ok(entries
            .into_iter()
            .map(|(id, fields)| {
                let text = |key| field(&fields, key);
                serde_json::json!({"id": id, "entry": text("entry"), "reason": text("reason"), "event": text("event")})
            })
            .collect())
    }

    /// Removes one shared dead letter; `true` only for the replica that removed it (a redrive on
    /// two replicas at once publishes it once).
    pub async fn take_dead_letter(&self, id: &str) -> Result<bool, BrokerError> {
        let removed: u64 = self.conn().xdel(DEADLETTERS, &[id]).await?;
        Ok(removed == 1)
    }

    /// The number of shared dead letters as of the last sweep.
    pub fn dead_letter_count(&self) -> usize {
        self.deadletter_count.load(Ordering::Relaxed) as usize
    }

    /// Appends an HLink message to the `ui_events` stream, under a new entry id.
    pub async fn append_ui_event(
        &self,
        message: &crate::protocol::upstream::Outbound,
        metrics: &Metrics,
    ) -> Result<HandOff, HandOffError> {
        let appended = self.xadd_ui_event(message).await;
        let outcome = if appended.is_ok() {
            "delivered"
        } else {
            "failed"
        };
        metrics
            .upstream_messages
            .with_label_values(&[outcome])
            .inc();
        Ok(HandOff::Appended(appended?))
    }

    async fn xadd_ui_event(
        &self,
        message: &crate::protocol::upstream::Outbound,
    ) -> Result<String, BrokerError> {
        let json = serde_json::to_string(message).unwrap_or_default();
        let id: String = redis::cmd("XADD")
            .arg(&self.config.ui_events_stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.config.ui_events_max_len)
            .arg("*")
            .arg("type")
            .arg(message.kind)
            .arg("user_id")
            .arg(&message.user_id)
            .arg("connection_id")
            .arg(&message.connection_id)
            .arg("message")
            .arg(json)
            .query_async(&mut self.conn())
            .await?;
        Ok(id)
    }

    pub(crate) async fn runs_seen(
        &self,
        runs: &HashMap<String, (u64, bool)>,
    ) -> Result<(), BrokerError> {
        let ttl = self.run_seen_ttl.as_millis().max(1) as u64;
        let mut pipe = redis::pipe();
        for (run_id, (ms, ended)) in runs {
            let value = if *ended {
                format!("end:{ms}")
            } else {
                ms.to_string()
            };
            pipe.set_options(
                run_seen_key(run_id),
                value,
                redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl)),
            )
            .ignore();
        }
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// What the replicas last saw of a run; `None` when nothing is recorded.
    pub async fn run_activity(&self, run_id: &str) -> Result<Option<Activity>, BrokerError> {
        let value: Option<String> = self.conn().get(run_seen_key(run_id)).await?;
        Ok(value.and_then(|value| {
            if value.starts_with("end:") {
                return Some(Activity::Ended);
            }
            let ms: u64 = value.parse().ok()?;
            Some(Activity::Seen(Duration::from_millis(
                now_ms().saturating_sub(ms),
            )))
        }))
    }

    /// Claims the report of a stalled run for this replica: `true` for exactly one replica.
    pub async fn claim_stall(&self, run_id: &str, retain: Duration) -> Result<bool, BrokerError> {
        let claimed: Option<String> = self
            .conn()
            .set_options(
                format!("aw:stalled:{{{run_id}}}"),
                1,
                redis::SetOptions::default()
                    .conditional_set(redis::ExistenceCheck::NX)
                    .with_expiration(redis::SetExpiry::PX(retain.as_millis().max(1) as u64)),
            )
            .await?;
        Ok(claimed.is_some())
    }

    /// Applies one live pub/sub message to the mirror; `false` when the stream must be read.
    pub(crate) fn apply_live(&self, name: &ChannelName, payload: &[u8]) -> bool {
        let Some((epoch, event)) = parse_live(payload) else {
            tracing::warn!(channel = %name, "Ignored a malformed live message.");
            return true;
        };
        self.mirror.apply(name, &epoch, event)
    }

    /// Brings the mirror of `name` up to the stream (after a gap, a new epoch or a reconnect).
    pub(crate) async fn resync(&self, name: &ChannelName) -> Result<(), BrokerError> {
        let from = self.mirror.position(name).map_or(1, |(_, last)| last + 1);
        let mut snapshot = self.snapshot(name, from).await?;
        if self
            .mirror
            .position(name)
            .is_some_and(|(epoch, _)| epoch != snapshot.epoch)
        {
            snapshot = self.snapshot(name, 1).await?;
        }
        self.mirror.merge(name, snapshot);
        Ok(())
    }
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
        let (b, s) = (with(broker), stop.clone());
        tracker.spawn(async move {
            if let Broker::Redis(redis) = &*b {
                live::run(redis, commands, announce, s).await;
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

/// A registration as stored in the registry and announced on [`REGISTERED`].
pub fn parse_target(value: &str) -> Option<RunTarget> {
    let value: serde_json::Value = serde_json::from_str(value).ok()?;
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
    Some(RunTarget {
        thread_id: text("thread_id"),
        user_id: text("user_id"),
    })
}

/// `epoch \n seq \n emitted_ms \n produced_ms \n body`, as the publish script sends it.
fn parse_live(payload: &[u8]) -> Option<(Arc<str>, Sequenced)> {
    let mut parts = payload.splitn(5, |b| *b == b'\n');
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    let number = |raw: &[u8]| std::str::from_utf8(raw).ok()?.parse::<u64>().ok();
    let seq = number(parts.next()?)?;
    let emitted_ms = number(parts.next()?)?;
    let produced_ms = number(parts.next()?);
    let body = Bytes::copy_from_slice(parts.next()?);
    Some((
        epoch.into(),
        Sequenced {
            seq,
            body,
            emitted_ms,
            produced_ms,
        },
    ))
}

fn seq_of(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// One field of a stream entry, as text.
fn field<'a>(fields: &'a HashMap<String, Bytes>, key: &str) -> Option<&'a str> {
    std::str::from_utf8(fields.get(key)?).ok()
}

fn sequenced(id: &str, fields: &HashMap<String, Bytes>) -> Option<Sequenced> {
    let number = |key: &str| field(fields, key)?.parse::<u64>().ok();
    Some(Sequenced {
        seq: seq_of(id)?,
        body: fields.get("b")?.clone(),
        emitted_ms: number("t")?,
        produced_ms: number("p"),
    })
}

fn counts_of(meta: &HashMap<String, String>) -> Counts {
    let field = |key: &str| meta.get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut lost = [0; 4];
    lost[LostReason::ExpiredUnseen as usize] = field("lost_expired_unseen");
    lost[LostReason::ExpiredSubscribed as usize] = field("lost_expired_subscribed");
    Counts {
        emitted: field("emitted"),
        delivered: field("delivered"),
        acked: field("acked"),
        pending: field("pending"),
        lost,
    }
}

fn new_epoch() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}
