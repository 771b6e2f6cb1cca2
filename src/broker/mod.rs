//! Sequence and store: the broker gives each accepted event the next `seq` of its channel, keeps
//! a bounded history for replay, and hands the event to fan-out.
//!
//! Two implementations, chosen once at start ([`Broker::new`]): the [`Embedded`] broker, and the
//! [`RedisBroker`], which sequences and stores in Redis and mirrors the channels this replica's
//! clients watch into a `Channels` for local fan-out and replay. Every decision that depends
//! on the mode is one `match` here; nothing outside `broker/` names a mode.

mod channels;
mod embedded;
mod error;
pub mod redis;
mod sequenced;
mod single_flight;
mod upward;
mod views;

pub use error::{BrokerError, Refusal};
pub use sequenced::{Sequenced, Snapshot, now_ms};
pub use single_flight::Computed;
pub use upward::{Announcement, StreamEvent, StreamEvents, Taken, Upward};
pub use views::View;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::deadletter::{Entry, Page};
use crate::ledger::LostReason;
use crate::metrics::Metrics;
use crate::protocol::run::RunTarget;
use crate::protocol::upstream::Outbound;
use crate::upstream::Refused;

pub use self::redis::{Reconciled, RedisBroker, Registration};
pub use channels::Channels;
pub use embedded::Embedded;

use crate::fanout::Outbox;
use crate::ledger::{ChannelReport, LedgerView, Totals};
use crate::protocol::ChannelName;
use crate::protocol::client::Since;
use crate::protocol::event::Event;
use crate::protocol::packed::{Journaled, PackedEvent};
use crate::protocol::server::Subscribed;

/// One event of a [`Broker::publish_all`], as its caller keeps it (no list is built to hand them
/// over).
pub trait ToPublish {
    fn channel(&self) -> &ChannelName;
    fn event(&self) -> &Event;
    /// The ingest stream entry it came from.
    fn entry(&self) -> Option<&str>;
}

/// The broker this gateway runs, chosen once from `broker.redis_url`. A Redis that is down never
/// turns into the memory broker.
pub enum Broker {
    Memory(Box<Embedded>),
    Redis(Box<RedisBroker>),
}

/// What a publish did.
#[derive(Debug, Clone)]
pub enum Outcome {
    Published(Published),
    /// The event's `event_id` (or ingest entry id) was already sequenced in this channel.
    Duplicate,
}

/// What the replicas together last saw of a run.
#[derive(Debug, Clone, Copy)]
pub enum Activity {
    /// Its last event was this long ago.
    Seen(Duration),
    /// It ended (`agent_completed` or `agent_error`) through some replica.
    Ended,
}

/// Where an HLink message went.
#[derive(Debug)]
pub enum HandOff {
    /// Queued for the webhook.
    Queued,
    /// Appended to the `ui_events` stream under this entry id.
    Appended(String),
}

#[derive(Debug, thiserror::Error)]
pub enum HandOffError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// `GET /v1/deadletter`: a page of letters, and in Redis mode the malformed ingest entries set
/// aside.
pub struct DeadLetterList {
    pub page: Page,
    pub malformed: Option<Vec<serde_json::Value>>,
}

impl Broker {
    /// Chooses the broker, once. Redis is connected lazily: a Redis that is down at start shows
    /// as not ready until it answers.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(match &config.broker.redis_url {
            Some(url) => Self::Redis(Box::new(RedisBroker::new(config, url)?)),
            None => Self::Memory(Box::new(Embedded::new(config)?)),
        })
    }

    /// Starts the broker's own tasks on `tracker`; they end with `stop`. In Redis mode returns
    /// the channels on which registrations and ingest stream entries come up to ingest.
    pub fn start(
        self: &Arc<Self>,
        tracker: &TaskTracker,
        stop: CancellationToken,
        metrics: Arc<Metrics>,
    ) -> Option<Upward> {
        crate::metrics::export::<View>(&metrics.ledger_snapshots);
        match &**self {
            Self::Memory(memory) => {
                memory.start(tracker, stop, metrics);
                None
            }
            Self::Redis(_) => Some(self::redis::start(self, tracker, stop, metrics)),
        }
    }

    pub fn is_up(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(redis) => redis.is_up(),
        }
    }

    /// Whether the broker has answered at least once since start (a latch: `/readyz`). Through a
    /// later outage it stays true while [`Broker::is_up`] is false.
    pub fn has_answered(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(redis) => redis.has_answered(),
        }
    }

    /// Whether dead letters outlive this process: Redis keeps them in the shared stream, the
    /// embedded broker's go with the process.
    pub fn letters_outlive_the_process(&self) -> bool {
        matches!(self, Self::Redis(_))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }

    /// `false` when `event_id` was seen within the dedupe window. The embedded broker dedupes
    /// here, before resolution; Redis dedupes inside its publish script, so this is always `true`.
    pub fn first_time(&self, event_id: &str) -> bool {
        match self {
            Self::Memory(memory) => memory.first_time(event_id),
            Self::Redis(_) => true,
        }
    }

    /// Forgets a sighting [`Self::first_time`] recorded for an event then refused, so that the
    /// producer's corrected retry is not taken for a duplicate.
    pub fn forget(&self, event_id: &str) {
        if let Self::Memory(memory) = self {
            memory.forget(event_id);
        }
    }

    /// Sequences and stores `event` in `channel`. In Redis mode its `event_id` and `entry` make a
    /// second publish a duplicate: `entry` names where the event came from (the ingest stream
    /// entry id, or `stalled:<run_id>` for a stalled run's `agent_error`).
    pub async fn publish(
        &self,
        name: &ChannelName,
        event: &Event,
        entry: Option<&str>,
        trace: impl Fn(u64) -> Option<Box<crate::telemetry::TraceInfo>>,
    ) -> Result<Outcome, BrokerError> {
        match self {
            Self::Memory(memory) => Ok(Outcome::Published(
                memory.channels.publish(name, event, trace),
            )),
            Self::Redis(redis) => match redis.publish(name, &[(event, entry)]).await {
                (_, Some(error)) => Err(error),
                (mut outcomes, None) => outcomes.pop().ok_or_else(|| {
                    BrokerError::Internal("the publish script answered nothing".into())
                }),
            },
        }
    }

    /// Sequences the events of one request (or one read of the ingest stream, with each entry
    /// id), each into its channel, in their order there: in Redis mode one script call per
    /// channel, the channels' calls sent at once so that they share their round trips. One result
    /// per event, in the order given; `trace` is [`Self::publish`]'s for the event at that index.
    pub async fn publish_all(
        &self,
        events: &[impl ToPublish],
        trace: impl Fn(usize, u64) -> Option<Box<crate::telemetry::TraceInfo>>,
    ) -> Vec<Result<Outcome, BrokerError>> {
        match self {
            Self::Memory(memory) => (events.iter().enumerate())
                .map(|(i, item)| {
                    let trace = |seq| trace(i, seq);
                    Ok(Outcome::Published(memory.channels.publish(
                        item.channel(),
                        item.event(),
                        trace,
                    )))
                })
                .collect(),
            // Boxed: its round trips' state would otherwise size every request's future in
            // embedded mode too, where the publish is a call.
            Self::Redis(redis) => Box::pin(redis.publish_all(events)).await,
        }
    }

    pub async fn subscribe(
        &self,
        name: &ChannelName,
        since: Option<&Since>,
        outbox: &Arc<Outbox>,
        run_context: bool,
    ) -> Result<Option<Subscribed>, BrokerError> {
        match self {
            Self::Memory(memory) => Ok(memory.channels.subscribe(name, since, outbox, run_context)),
            Self::Redis(redis) => redis.subscribe(name, since, outbox, run_context).await,
        }
    }

    pub async fn unsubscribe(&self, name: &ChannelName, outbox: &Arc<Outbox>) -> bool {
        match self {
            Self::Memory(memory) => memory.channels.unsubscribe(name, outbox),
            Self::Redis(redis) => redis.unsubscribe(name, outbox).await,
        }
    }

    pub fn ack(
        &self,
        name: &ChannelName,
        seq: u64,
        outbox: &Arc<Outbox>,
        metrics: &Metrics,
    ) -> Result<u64, AckError> {
        match self {
            Self::Memory(memory) => memory.channels.ack(name, seq, outbox),
            Self::Redis(redis) => redis.ack(name, seq, outbox, metrics),
        }
    }

    pub async fn report(&self, name: &ChannelName) -> Result<Option<ChannelReport>, BrokerError> {
        match self {
            Self::Memory(memory) => Ok(memory.channels.report(name)),
            Self::Redis(redis) => redis.report(name).await,
        }
    }

    /// What `/metrics` exports, and when its computation started: the whole ledger (memory), or
    /// what this replica did (Redis). A snapshot at most `ledger.snapshot_interval` old.
    pub async fn totals(&self, metrics: &Metrics) -> (Totals, Instant) {
        match self {
            Self::Memory(memory) => {
                let view = memory
                    .views
                    .ledger(metrics, || memory.channels.view())
                    .await
                    .unwrap_or_else(|never| match never {});
                (view.value.totals, view.at)
            }
            Self::Redis(redis) => {
                let totals = redis.views.replica(metrics, || redis.totals()).await;
                (*totals.value, totals.at)
            }
        }
    }

    /// The `GET /v1/ledger` view: every channel (Redis mode: across replicas, at most a fixed
    /// number of channels), at most `ledger.snapshot_interval` old.
    pub async fn ledger(&self, metrics: &Metrics) -> Result<Computed<LedgerView>, BrokerError> {
        match self {
            Self::Memory(memory) => Ok(memory
                .views
                .ledger(metrics, || memory.channels.view())
                .await
                .unwrap_or_else(|never| match never {})),
            Self::Redis(redis) => redis.views.ledger(metrics, || redis.read_ledger()).await,
        }
    }

    /// Expires history past its age and idle channels (and, embedded, old dedupe ids).
    pub async fn sweep(&self) {
        match self {
            Self::Memory(memory) => memory.sweep(),
            Self::Redis(redis) => redis.sweep().await,
        }
    }

    /// Records where a run's events go: in Redis mode in the shared registry, announced to every
    /// replica; `Some` is the registration already there for another channel (nothing changed).
    /// The embedded broker has no registry beyond the resolver's.
    pub async fn register(
        &self,
        run_id: &str,
        target: &RunTarget,
    ) -> Result<Registration, BrokerError> {
        match self {
            Self::Memory(_) => Ok(Registration::Done),
            Self::Redis(redis) => redis.register(run_id, target).await,
        }
    }

    /// The shared registration of a run (Redis mode); the embedded broker has none.
    pub async fn registered(&self, run_id: &str) -> Result<Option<RunTarget>, BrokerError> {
        match self {
            Self::Memory(_) => Ok(None),
            Self::Redis(redis) => redis.registered(run_id).await,
        }
    }

    /// Keeps an event that is about to be held for its run where another replica can adopt it if
    /// this one dies (Redis: this replica's journal), before the producer is answered
    /// `pending_resolution`. The embedded broker keeps nothing beyond the process: `None`.
    pub async fn journal_held(
        &self,
        event: &PackedEvent,
    ) -> Result<Option<Journaled>, BrokerError> {
        match self {
            Self::Memory(_) => Ok(None),
            Self::Redis(redis) => redis.journal(event).await.map(Some),
        }
    }

    /// A held event was published or dead-lettered: it leaves the journal (Redis, queued after
    /// the dead letters queued before it).
    pub fn settle_held(&self, journaled: Option<&Journaled>) {
        if let (Self::Redis(redis), Some(journaled)) = (self, journaled) {
            redis.settle(journaled);
        }
    }

    /// Marks this replica alive and takes over the held events of replicas that stopped doing so
    /// for `broker.claim_idle` (Redis); the embedded broker has no other replica.
    pub async fn adopt_held(&self) -> Result<Vec<PackedEvent>, BrokerError> {
        match self {
            Self::Memory(_) => Ok(Vec::new()),
            Self::Redis(redis) => redis.adopt().await,
        }
    }

    /// What every replica saw of a run; the embedded broker knows nothing beyond its watchdog.
    pub async fn run_activity(&self, run_id: &str) -> Result<Option<Activity>, BrokerError> {
        match self {
            Self::Memory(_) => Ok(None),
            Self::Redis(redis) => redis.run_activity(run_id).await,
        }
    }

    /// Claims the report of a stalled run: `true` for exactly one replica.
    pub async fn claim_stall(&self, run_id: &str, retain: Duration) -> Result<bool, BrokerError> {
        match self {
            Self::Memory(_) => Ok(true),
            Self::Redis(redis) => redis.claim_stall(run_id, retain).await,
        }
    }

    /// Keeps an event already counted lost (`lost`: `Unresolved`, or `Internal` for one the broker
    /// failed by our fault) as a dead letter; an unresolved one's run id counts once in
    /// `agentwire_unresolved_run_ids_total`. In Redis mode the letter goes through the report
    /// task; a full queue drops it with an `ERROR` log and a broker error count.
    pub fn keep_dead_letter(
        &self,
        run_id: &str,
        event: PackedEvent,
        (why, lost): (&'static str, LostReason),
        metrics: &Metrics,
    ) {
        let unresolved = lost == LostReason::Unresolved;
        match self {
            Self::Memory(memory) => {
                memory.keep_dead_letter(run_id, event, why, unresolved, metrics)
            }
            Self::Redis(redis) => redis.keep_dead_letter(
                RedisBroker::letter(run_id, why, event.json(), None, unresolved),
                metrics,
            ),
        }
    }

    /// Keeps a dead letter before the caller acknowledges where the event came from (the ingest
    /// stream), so a replica that dies in between leaves the entry rather than losing the letter.
    pub async fn keep_dead_letter_now(
        &self,
        run_id: &str,
        event: PackedEvent,
        (why, lost): (&'static str, LostReason),
        metrics: &Metrics,
    ) -> Result<(), BrokerError> {
        let unresolved = lost == LostReason::Unresolved;
        match self {
            Self::Memory(memory) => {
                memory.keep_dead_letter(run_id, event, why, unresolved, metrics);
                Ok(())
            }
            Self::Redis(redis) => {
                let letter = RedisBroker::letter(run_id, why, event.json(), None, unresolved);
                let mut letters = vec![letter];
                redis.store_dead_letters(&mut letters, metrics).await
            }
        }
    }

    /// The dead letters a redrive goes through. The embedded broker takes them out (what is not
    /// rescued goes back with [`Self::restore_dead_letters`]); Redis reads the shared ones, and
    /// each rescued letter is removed by [`Self::take_dead_letter`].
    pub async fn redrive_letters(&self) -> Result<Vec<Entry>, BrokerError> {
        match self {
            Self::Memory(memory) => Ok(memory.take_dead_letters()),
            Self::Redis(redis) => redis.dead_letters().await,
        }
    }

    /// Removes a letter a redrive is about to publish: `false` when another replica took it.
    pub async fn take_dead_letter(&self, entry: &Entry) -> Result<bool, BrokerError> {
        match (self, &entry.id) {
            (Self::Redis(redis), crate::deadletter::LetterId::Stream(id)) => {
                redis.take_dead_letter(id).await
            }
            _ => Ok(true),
        }
    }

    /// Puts back a letter whose redrive publish failed (Redis: it was removed before the publish).
    /// The embedded broker took every letter out for the redrive; the caller keeps this one with
    /// those it did not rescue, and [`Self::restore_dead_letters`] puts them all back.
    pub fn put_back_dead_letter(&self, entry: Entry, metrics: &Metrics) {
        match self {
            Self::Memory(_) => {}
            Self::Redis(redis) => {
                let origin = entry.origin.as_deref();
                let letter = RedisBroker::letter(
                    &entry.run_id,
                    &entry.reason,
                    entry.event.json(),
                    origin,
                    false,
                );
                redis.keep_dead_letter(letter, metrics);
            }
        }
    }

    /// Ends a redrive: the letters it did not rescue stay (embedded: they go back in order).
    pub fn restore_dead_letters(&self, kept: Vec<Entry>, metrics: &Metrics) {
        match self {
            Self::Memory(memory) => memory.restore_dead_letters(kept, metrics),
            Self::Redis(_) => {}
        }
    }

    /// `GET /v1/deadletter`: up to `limit` letters after the id `after` (a number, or in Redis
    /// mode a stream entry id), oldest first.
    pub async fn list_dead_letters(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterList, BrokerError> {
        match self {
            Self::Memory(memory) => Ok(DeadLetterList {
                page: memory.dead_letter_page(after.and_then(|a| a.parse().ok()), limit),
                malformed: None,
            }),
            Self::Redis(redis) => {
                let page = redis.dead_letter_page(after, limit).await?;
                let malformed = redis.malformed().await?;
                Ok(DeadLetterList {
                    page,
                    malformed: Some(malformed),
                })
            }
        }
    }

    /// The bytes this replica's channel history holds, and the events `history.max_bytes` evicted.
    pub fn history_usage(&self) -> (usize, u64) {
        match self {
            Self::Memory(memory) => memory.channels.history_usage(),
            Self::Redis(redis) => redis.mirror.history_usage(),
        }
    }

    /// Dead letters kept: this process's, or the shared stream's (every replica shows the same).
    pub fn dead_letter_count(&self) -> usize {
        match self {
            Self::Memory(memory) => memory.dead_letter_count(),
            Self::Redis(redis) => redis.dead_letter_count(),
        }
    }

    /// Hands an HLink message to the agent backends: the webhook queue (embedded) or the
    /// `ui_events` stream (Redis). Counted in `agentwire_upstream_messages_total`.
    pub async fn hand_off(
        &self,
        message: Outbound,
        metrics: &Metrics,
    ) -> Result<HandOff, HandOffError> {
        match self {
            Self::Memory(memory) => memory.hand_off(message, metrics),
            Self::Redis(redis) => redis.append_ui_event(&message, metrics).await,
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
