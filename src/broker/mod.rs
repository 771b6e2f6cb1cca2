//! Sequence and store: the broker gives each accepted event the next `seq` of its channel, keeps
//! a bounded history for replay, and hands the event to fan-out.
//!
//! Two implementations, chosen once at start ([`Broker`]): the embedded [`MemoryBroker`], and the
//! [`RedisBroker`], which sequences and stores in Redis and mirrors the channels this replica's
//! clients watch into a `MemoryBroker` for local fan-out and replay.

mod memory;
pub mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use crate::ledger::{ChannelLedger, EventState};
use crate::metrics::Metrics;

pub use memory::{ChannelSummary, MemoryBroker, Ranked};
pub use redis::RedisBroker;

use crate::fanout::Outbox;
use crate::ledger::{ChannelReport, Totals};
use crate::protocol::ChannelName;
use crate::protocol::client::Since;
use crate::protocol::event::Event;
use crate::protocol::server::Subscribed;

/// The broker this gateway runs, chosen once from `broker.redis_url`. A Redis that is down never
/// turns into the memory broker.
pub enum Broker {
    Memory(MemoryBroker),
    Redis(Box<RedisBroker>),
}

/// Why a broker operation could not be done; the caller answers 503 or an error frame.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker (Redis) is unavailable: {0}")]
    Unavailable(String),
}

impl From<::redis::RedisError> for BrokerError {
    fn from(error: ::redis::RedisError) -> Self {
        Self::Unavailable(error.to_string())
    }
}

/// What a publish did.
#[derive(Debug, Clone)]
pub enum Outcome {
    Published(Published),
    /// The event's `event_id` (or ingest entry id) was already sequenced in this channel.
    Duplicate,
}

impl Broker {
    pub fn is_up(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(redis) => redis.is_up(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }

    /// Sequences and stores `event` in `channel`. In Redis mode its `event_id` and the ingest
    /// stream `entry` id it came from make a second publish a duplicate (the memory broker's
    /// dedupe runs before resolution).
    pub async fn publish(
        &self,
        name: &ChannelName,
        event: &Event,
        entry: Option<&str>,
        trace: impl Fn(u64) -> Option<Box<crate::telemetry::TraceInfo>>,
    ) -> Result<Outcome, BrokerError> {
        match self {
            Self::Memory(memory) => Ok(Outcome::Published(memory.publish(name, event, trace))),
            Self::Redis(redis) => redis.publish(name, event, entry).await,
        }
    }

    pub async fn subscribe(
        &self,
        name: &ChannelName,
        since: Option<&Since>,
        outbox: &Arc<Outbox>,
    ) -> Result<Option<Subscribed>, BrokerError> {
        match self {
            Self::Memory(memory) => Ok(memory.subscribe(name, since, outbox)),
            Self::Redis(redis) => redis.subscribe(name, since, outbox).await,
        }
    }

    pub fn unsubscribe(&self, name: &ChannelName, outbox: &Arc<Outbox>) -> bool {
        match self {
            Self::Memory(memory) => memory.unsubscribe(name, outbox),
            Self::Redis(redis) => redis.unsubscribe(name, outbox),
        }
    }

    pub fn ack(&self, name: &ChannelName, seq: u64, outbox: &Arc<Outbox>) -> Result<u64, AckError> {
        match self {
            Self::Memory(memory) => memory.ack(name, seq, outbox),
            Self::Redis(redis) => redis.ack(name, seq, outbox),
        }
    }

    pub async fn report(&self, name: &ChannelName) -> Result<Option<ChannelReport>, BrokerError> {
        match self {
            Self::Memory(memory) => Ok(memory.report(name)),
            Self::Redis(redis) => redis.report(name).await,
        }
    }

    /// What `/metrics` exports: the whole ledger (memory), or what this replica did (Redis).
    pub fn totals(&self) -> Totals {
        match self {
            Self::Memory(memory) => memory.totals(),
            Self::Redis(redis) => redis.totals(),
        }
    }

    /// The `GET /v1/ledger` view: every channel, across replicas in Redis mode.
    pub async fn ledger(&self, top: usize) -> Result<(Totals, Ranked), BrokerError> {
        match self {
            Self::Memory(memory) => Ok((memory.totals(), memory.ranked(top))),
            Self::Redis(redis) => redis.ledger(top).await,
        }
    }

    pub async fn sweep(&self) {
        match self {
            Self::Memory(memory) => memory.sweep(),
            Self::Redis(redis) => redis.sweep().await,
        }
    }
}

/// Redis mode: where one channel's first deliveries on this replica are reported (batched into
/// Redis by a background task, so a session never awaits Redis).
#[derive(Debug)]
pub struct Feed {
    pub channel: ChannelName,
    pub epoch: Arc<str>,
    pub reports: tokio::sync::mpsc::Sender<redis::Report>,
}

/// An event sequenced in Redis, as a replica reads it from the stream or pub/sub.
#[derive(Debug, Clone)]
pub struct Sequenced {
    pub seq: u64,
    /// The frame body without seq and epoch ([`crate::protocol::server::event_body`]).
    pub body: Bytes,
    /// Wall-clock milliseconds of the publish.
    pub emitted_ms: u64,
    /// The producer's `ts` in milliseconds, when it was an RFC 3339 UTC time.
    pub produced_ms: Option<u64>,
}

impl Sequenced {
    /// The publish moment on this process's monotonic clock, for the delivery latency.
    pub fn emitted_at(&self) -> Instant {
        let ago = now_ms().saturating_sub(self.emitted_ms);
        Instant::now()
            .checked_sub(std::time::Duration::from_millis(ago))
            .unwrap_or_else(Instant::now)
    }

    pub fn produced_at(&self) -> Option<SystemTime> {
        self.produced_ms
            .map(|ms| SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms))
    }
}

/// A channel's stream read at one moment: its epoch, last seq and entries from some seq on.
#[derive(Debug)]
pub struct Snapshot {
    pub epoch: Arc<str>,
    pub last_seq: u64,
    pub events: Vec<Sequenced>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An event in a channel's history: its frame bytes (shared by every subscriber) and its place
/// in the ledger.
#[derive(Debug)]
pub struct StoredEvent {
    pub seq: u64,
    pub frame: Bytes,
    pub emitted_at: Instant,
    /// The producer's `ts`, when it is an RFC 3339 UTC time.
    pub produced_at: Option<SystemTime>,
    /// Present only when traces are exported.
    pub trace: Option<Box<crate::telemetry::TraceInfo>>,
    state: EventState,
    ledger: Arc<ChannelLedger>,
    feed: Option<Arc<Feed>>,
    /// Set once the event was queued to a subscriber (live or replay).
    offered: AtomicBool,
}

impl StoredEvent {
    fn offer(&self) {
        self.offered.store(true, Ordering::Relaxed);
    }

    fn was_offered(&self) -> bool {
        self.offered.load(Ordering::Relaxed)
    }

    /// Records a socket write of this event; the first one counts as the delivery.
    pub fn delivered(&self, metrics: &Metrics) {
        if self.state.deliver(&self.ledger) {
            if let Some(feed) = &self.feed
                && feed
                    .reports
                    .try_send(redis::Report::Delivered(Arc::clone(feed), self.seq))
                    .is_err()
            {
                metrics.broker_errors.inc();
            }
            metrics.observe_delivery(self.emitted_at.elapsed());
            if let Some(age) = self
                .produced_at
                .and_then(|at| SystemTime::now().duration_since(at).ok())
            {
                metrics.event_age.observe(age.as_secs_f64());
            }
        }
    }
}

/// Where a published event landed.
#[derive(Debug, Clone)]
pub struct Published {
    pub seq: u64,
    pub epoch: Arc<str>,
}

/// Why an ack was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("not subscribed to {0}")]
    NotSubscribed(String),
    #[error("seq {seq} is beyond the channel's last seq {last}")]
    BeyondLast { seq: u64, last: u64 },
}
