//! Producer ingest: splits a `POST /v1/events` body into items, validates each, drops retries by
//! `event_id`, resolves, and publishes. Every item gets its own answer, in order; an invalid item
//! never stops the valid ones beside it.
//!
//! Accounting before the channel stage:
//! `ingested + generated + redriven = emitted + pending_resolution + lost{unresolved} + duplicates`,
//! where `generated` counts the gateway's own events (a stalled run's `agent_error`, the events that
//! close a run whose stream ended while it was open: [`accept_generated`]) and `redriven`
//! the dead letters a redrive emitted (see `deadletter`). An item answered `unavailable` (Redis
//! could not take it, the producer sends it again) is not counted in `ingested`; an item the broker
//! failed on by our fault (`BrokerError::Internal`: a script error, a reply we cannot read) is
//! counted in `ingested` and in `lost{internal}`, so the identity reads
//! `… = emitted + pending_resolution + lost{unresolved} + lost{internal} + duplicates` (the channel
//! ledgers never count `internal` themselves today). Redis mode: events a dead replica held are
//! adopted by another ([`adopt_held`]), which counts each `ingested` again (the dead one's counts
//! went with it).

pub mod agui_proxy;
mod batch;
mod body;
mod redrive;
mod registration;
pub mod run_stream;
mod stalls;
mod upward;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use body::{BodyError, Items, split};
pub use redrive::{RedriveOutcome, Redriven, redrive};
pub use registration::{
    RegisterError, RunRefusal, dead_letter_held, expire_pending, register, resume_releases,
};
pub use stalls::{Untold, report_stalls};
pub use upward::consume;

use crate::Gateway;
use crate::broker::{self, BrokerError, Outcome, Published};
use crate::metrics::{self, Label};
use crate::protocol::ChannelName;
use crate::protocol::event::{self, Event, EventType, Refusal};
use crate::protocol::packed::{Journaled, PackedEvent};
use crate::protocol::run::RunTarget;
use crate::resolve::{Held, NotBehind, NotHeld, PendingFull};
use crate::telemetry::{self, Throttle};
use registration::{dead_letter, lost_unresolved, release};
use tracing::{Instrument, Span};

/// The answer for one item.
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ItemResult {
    Accepted {
        channel: ChannelName,
        seq: u64,
        epoch: Arc<str>,
    },
    PendingResolution,
    Duplicate,
    /// Valid, but it could not wait for its run (the pending set was full): dead-lettered.
    Unresolved {
        reason: &'static str,
    },
    /// Not taken: the broker (Redis) is unavailable. The producer retries (with its `event_id`).
    Unavailable {
        reason: String,
    },
    Error(Refusal),
    /// Not taken, by our fault (a broker script error, a reply we cannot read): answered
    /// `{"status": "error", "code": "internal"}` and counted `lost{internal}`. A retry would fail
    /// the same way until an operator fixes the cause, so the producer should not retry it.
    #[serde(rename = "error")]
    Internal {
        code: &'static str,
        reason: String,
    },
}

impl ItemResult {
    /// Whether the item was taken in (accepted, held or recognised as a retry).
    pub fn is_ok(&self) -> bool {
        matches!(
            self,
            Self::Accepted { .. } | Self::PendingResolution | Self::Duplicate
        )
    }
}

/// Validates and accepts every item, in order. `producer` is the id of the key that posted them
/// (`None` without producer keys): it scopes their `event_id`s. A body of one object that is not
/// JSON at all is refused whole, as [`split`] refuses any other.
pub async fn ingest(
    gateway: &Gateway,
    items: Items<'_>,
    producer: Option<&Arc<str>>,
) -> Result<Vec<ItemResult>, BodyError> {
    // A single object's body, checked only if its event is refused.
    let (items, whole) = match &items {
        Items::One { item, body } => (std::slice::from_ref(item), Some(*body)),
        Items::Many(items) => (items.as_slice(), None),
    };
    let mut results = Vec::with_capacity(items.len());
    let mut batch = batch::Batch::with_capacity(items.len());
    for raw in items {
        let mut event = match event::parse(raw, gateway.config.ingest.max_event_bytes) {
            Ok(event) => event,
            Err(refusal) => {
                if let Some(body) = whole {
                    body::check(body)?;
                }
                count_refusal(gateway, &refusal);
                publish_kept(gateway, &mut batch, &mut results).await;
                results.push(ItemResult::Error(refusal));
                continue;
            }
        };
        event.producer = producer.cloned();
        // The ordering rules (strict mode only) read the watchdog, which a kept event reaches
        // once published.
        if gateway.config.agui.strict {
            publish_kept(gateway, &mut batch, &mut results).await;
        }
        if let Err(refusal) = strictly_ordered(gateway, &event) {
            results.push(ItemResult::Error(refusal));
            continue;
        }
        if let Some(event) = batch.keep(gateway, event, None) {
            publish_kept(gateway, &mut batch, &mut results).await;
            // Boxed: its registration and resolution would size every request's future.
            results.push(Box::pin(accept_each(gateway, event)).await);
        }
    }
    publish_kept(gateway, &mut batch, &mut results).await;
    Ok(results)
}

/// Publishes what `batch` kept and appends each event's answer to `results`.
async fn publish_kept(gateway: &Gateway, batch: &mut batch::Batch, results: &mut Vec<ItemResult>) {
    for (kept, outcome) in batch.publish(gateway).await {
        results.push(answer(gateway, kept, outcome));
    }
}

/// The answer for an event the batch published.
fn answer(
    gateway: &Gateway,
    kept: batch::Kept,
    outcome: Result<Outcome, BrokerError>,
) -> ItemResult {
    match outcome {
        Ok(Outcome::Published(published)) => ItemResult::Accepted {
            channel: kept.channel,
            seq: published.seq,
            epoch: published.epoch,
        },
        Ok(Outcome::Duplicate) => ItemResult::Duplicate,
        Err(error) => failed(gateway, error, &gateway.metrics.events_ingested),
    }
}

/// With `agui.strict`, an AG-UI event that breaks AG-UI's ordering rules where its run stands
/// (as the watchdog follows it) is refused `out_of_order`, counted as that violation and as a
/// refused event. Without it the event is published and the watchdog counts the violation.
fn strictly_ordered(gateway: &Gateway, event: &Event) -> Result<(), Refusal> {
    if !gateway.config.agui.strict {
        return Ok(());
    }
    let (Some(run_id), Some(fields)) = (event.run_id.as_deref(), event.payload.agui()) else {
        return Ok(());
    };
    let Err(violation) = gateway.watchdog.agui_order(run_id, fields) else {
        return Ok(());
    };
    metrics::count(&gateway.metrics.lifecycle_violations, violation);
    let refusal = Refusal {
        code: event::RefusalCode::OutOfOrder,
        field: Some("type".into()),
        reason: format!(
            "{} breaks AG-UI's ordering rules here ({})",
            fields
                .get("type")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default(),
            violation.as_str()
        ),
    };
    count_refusal(gateway, &refusal);
    Err(refusal)
}

/// The one place a refused event is counted and logged.
fn count_refusal(gateway: &Gateway, refusal: &Refusal) {
    gateway
        .metrics
        .events_rejected
        .with_label_values(&[refusal.code.as_str()])
        .inc();
    tracing::debug!(field = refusal.field.as_deref(), reason = %refusal.reason, "Refused an event.");
}

/// Accepts one valid event: dedupe, register (for `agent_started` with a thread), resolve, publish.
/// An event that needs nothing but its publish (nearly every event of a run's stream) is published
/// as a batch of one, the path of `POST /v1/events`; the others take [`accept_each`].
pub async fn accept(gateway: &Gateway, event: Event) -> ItemResult {
    let mut batch = batch::Batch::with_capacity(1);
    let Some(event) = batch.keep(gateway, event, None) else {
        return match batch.publish(gateway).await.next() {
            Some((kept, outcome)) => answer(gateway, kept, outcome),
            None => unreachable!("a kept event is published"),
        };
    };
    Box::pin(accept_each(gateway, event)).await
}

/// [`accept`]'s whole path, for an event that [`batch::Batch::keep`] gave back: a run's start, an
/// event behind its run's release, a retry, an event without a thread.
async fn accept_each(gateway: &Gateway, event: Event) -> ItemResult {
    let ingested = &gateway.metrics.events_ingested;
    accept_kept(gateway, event, None, true, ingested).await
}

/// [`accept`] for an event the gateway made itself (the close of a run whose stream ended while
/// it was open): counted `generated`, not `ingested`, since no producer sent it.
pub async fn accept_generated(gateway: &Gateway, event: Event) -> ItemResult {
    let generated = &gateway.metrics.events_generated;
    accept_kept(gateway, event, None, true, generated).await
}

/// [`accept`], for an event that may already be in a journal of held events (`journal`: adopted
/// from a replica presumed dead). `answered`: a producer waits for the answer and sends again what
/// is answered `unavailable`, so such an event leaves the journal; an adopted one stays for the
/// caller to dead-letter. `taken` counts it once it is taken (`ingested` or `generated`).
async fn accept_kept(
    gateway: &Gateway,
    event: Event,
    journal: Option<Journaled>,
    answered: bool,
    taken: &prometheus::IntCounter,
) -> ItemResult {
    let span = telemetry::ingest_span(&event);
    let accepted = accept_in(gateway, event, journal, answered, &span);
    match accepted.instrument(span.clone()).await {
        Ok(result) => {
            taken.inc();
            result
        }
        Err(error) => failed(gateway, error, taken),
    }
}

/// The answer for an event the broker could not take, counted: `taken` (`ingested` or
/// `generated`) only when it is lost by our fault (a retry is not taken twice).
fn failed(gateway: &Gateway, error: BrokerError, taken: &prometheus::IntCounter) -> ItemResult {
    gateway.metrics.broker_errors.inc();
    match &error {
        BrokerError::Internal(_) => {
            taken.inc();
            lost_internal(gateway, &error);
            return ItemResult::Internal {
                code: "internal",
                reason: error.to_string(),
            };
        }
        BrokerError::Refused(reason, _) => refused(gateway, *reason, &error),
        BrokerError::Unavailable(_) => {}
    }
    ItemResult::Unavailable {
        reason: error.to_string(),
    }
}

/// Redis mode, on each housekeeping tick: marks this replica alive and takes in the events that
/// replicas presumed dead (silent for `broker.claim_idle`) held for their run, as if they had been
/// posted here, in their order: counted `ingested` here, published if their run is registered,
/// held otherwise (and dead-lettered after `resolve.grace`).
pub async fn adopt_held(gateway: &Gateway) {
    let adopted = match gateway.broker.adopt_held().await {
        Ok(adopted) => adopted,
        Err(error) => {
            tracing::debug!(%error, "Cannot look for the held events of stopped replicas.");
            return;
        }
    };
    if adopted.is_empty() {
        return;
    }
    tracing::warn!(
        events = adopted.len(),
        "Adopted events that a replica which stopped answering held for their run."
    );
    for packed in adopted {
        let run_id = packed.run_id.as_deref().unwrap_or_default().to_string();
        let Some(event) = packed.unpack() else {
            continue;
        };
        let ingested = &gateway.metrics.events_ingested;
        match accept_kept(gateway, event, packed.journal.clone(), false, ingested).await {
            // Nobody sends it again: held here (counted `ingested` here), for its registration or
            // a paused release to publish once Redis takes it.
            ItemResult::Unavailable { .. } => {
                gateway.metrics.events_ingested.inc();
                hold_adopted(gateway, run_id, packed);
            }
            // Refused or lost by our fault (counted): a retry would end the same way.
            ItemResult::Error(_) | ItemResult::Internal { .. } => {
                gateway.broker.settle_held(packed.journal.as_ref());
            }
            // Published, a duplicate, held here or dead-lettered: the journal follows.
            _ => {}
        }
    }
}

/// An adopted event the broker could not take yet stays held here, as if this replica had taken
/// it: late, not lost. Only with no room for it (or at shutdown) is it dead-lettered.
fn hold_adopted(gateway: &Gateway, run_id: String, packed: PackedEvent) {
    let why = match packed.unpack() {
        Some(event) => match gateway
            .resolver
            .hold_unpublished(event, packed.journal.clone())
        {
            Ok(()) => return,
            Err(NotHeld::Closed { .. }) => registration::SHUTDOWN,
            Err(NotHeld::Full { .. } | NotHeld::Registered { .. }) => {
                "no room to hold it after adoption"
            }
        },
        None => "held event could not be read back",
    };
    dead_letter(
        gateway,
        Held {
            run_id,
            events: vec![packed],
        },
        why,
    );
}

/// An event taken for ingest that the broker failed on by our fault: it is lost (nothing of it
/// was emitted), counted `lost{internal}` and logged at most once per interval, since a broken
/// script or key fails every event that reaches it.
pub(super) fn lost_internal(gateway: &Gateway, error: &BrokerError) {
    static INTERNAL: Throttle = Throttle::every(Duration::from_secs(10));
    gateway.metrics.lose_internal();
    if let Some(held_back) = INTERNAL.allow() {
        tracing::error!(held_back, %error, "Event lost: the broker failed on it by our fault; the producer is answered 500 `internal` (see docs/runbooks.md, AgentwireDeliveryErrorBudgetBurn).");
    }
}

/// A write the broker refused (Redis at `maxmemory`): counted by reason and logged at most once
/// per interval, since a full Redis refuses every producer until it has room again.
fn refused(gateway: &Gateway, reason: broker::Refusal, error: &BrokerError) {
    static REFUSED: Throttle = Throttle::every(Duration::from_secs(10));
    metrics::count(&gateway.metrics.broker_refused, reason);
    if let Some(held_back) = REFUSED.allow() {
        tracing::warn!(reason = reason.as_str(), held_back, %error, "The broker refused an event; producers get 503 until Redis has room (see docs/redis.md).");
    }
}

async fn accept_in(
    gateway: &Gateway,
    event: Event,
    journal: Option<Journaled>,
    answered: bool,
    span: &Span,
) -> Result<ItemResult, BrokerError> {
    if let Some(event_id) = event.dedupe_id()
        && !gateway.broker.first_time(&event_id)
    {
        gateway.metrics.events_duplicate.inc();
        return Ok(ItemResult::Duplicate);
    }
    match register_start(gateway, &event).await {
        // A full registry refuses the registration (counted), not the event: it names its thread.
        Ok(()) | Err(RegisterError::Full) => {}
        Err(RegisterError::Conflict) => {
            if let Some(event_id) = event.dedupe_id() {
                gateway.broker.forget(&event_id);
            }
            let refusal = Refusal::run_conflict();
            count_refusal(gateway, &refusal);
            return Ok(ItemResult::Error(refusal));
        }
        Err(RegisterError::Broker(error)) => return Err(error),
    }
    if let Some(channel) = resolve(gateway, &event).await? {
        // Earlier events of its run are being released; it goes behind them (kept in the journal
        // meanwhile, like them).
        let releasing =
            (event.run_id.as_deref()).is_some_and(|run| gateway.resolver.is_waiting(run));
        if !releasing {
            return published(gateway, &channel, &event, journal, answered, span).await;
        }
        let (journal, journaled_here) = match journal {
            Some(journal) => (Some(journal), false),
            None => {
                let journal = (gateway.broker)
                    .journal_held(&PackedEvent::pack(&event))
                    .await?;
                (journal, true)
            }
        };
        return match gateway.resolver.hold_behind(event, journal.clone()) {
            Ok(()) => Ok(ItemResult::PendingResolution),
            Err(NotBehind::Free(event)) => {
                published(gateway, &channel, &event, journal, answered, span).await
            }
            // Not taken: out of the journal, and its event_id free for the producer's retry.
            Err(NotBehind::Full { event, full }) => {
                if journaled_here {
                    gateway.broker.settle_held(journal.as_ref());
                }
                if let Some(event_id) = event.dedupe_id() {
                    gateway.broker.forget(&event_id);
                }
                metrics::count(&gateway.metrics.pending_refused, full);
                Err(BrokerError::Unavailable(
                    "its run's release waits for Redis and holds its share of the pending set"
                        .into(),
                ))
            }
        };
    }
    let run_id = event.run_id.clone();
    // Redis mode: kept where another replica can adopt it before it is answered
    // `pending_resolution` (an event without a run is not held at all).
    let journal = match journal {
        Some(journal) => Some(journal),
        None if run_id.is_some() => {
            gateway
                .broker
                .journal_held(&PackedEvent::pack(&event))
                .await?
        }
        None => None,
    };
    match gateway.resolver.hold(event, journal.clone()) {
        Ok(()) => {
            // Redis mode: a registration on another replica may have come between the two. The
            // event is held either way: a failed check must not make the producer send it twice.
            if let Some(run_id) = run_id {
                match gateway.broker.registered(&run_id).await {
                    Ok(Some(target)) => {
                        release(gateway, &run_id, target).await;
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::debug!(%error, run_id, "Held; the registry could not be asked again.")
                    }
                }
            }
            Ok(ItemResult::PendingResolution)
        }
        // Its run was registered between resolve and hold.
        Err(NotHeld::Registered { event, channel }) => {
            published(gateway, &channel, &event, journal, answered, span).await
        }
        // The gateway is stopping and the held events were dead-lettered: this one too.
        Err(NotHeld::Closed { event }) => {
            let run_id = event.run_id.clone().unwrap_or_default();
            dead_letter(
                gateway,
                Held {
                    run_id,
                    events: vec![kept(&event, journal)],
                },
                registration::SHUTDOWN,
            );
            Ok(ItemResult::Unresolved { reason: "shutdown" })
        }
        Err(NotHeld::Full { event, full }) => {
            metrics::count(&gateway.metrics.pending_refused, full);
            let run_id = event.run_id.clone().unwrap_or_default();
            let (why, reason) = match full {
                PendingFull::Set => ("pending set full", "pending_full"),
                PendingFull::RunShare => (
                    "the run's share of the pending set is full",
                    "run_share_full",
                ),
                PendingFull::ProducerShare => (
                    "the producer's share of the pending set is full",
                    "producer_share_full",
                ),
            };
            dead_letter(
                gateway,
                Held {
                    run_id,
                    events: vec![kept(&event, journal)],
                },
                why,
            );
            Ok(ItemResult::Unresolved { reason })
        }
    }
}

/// The event packed as it was kept, so that its dead letter takes it out of the journal.
fn kept(event: &Event, journal: Option<Journaled>) -> PackedEvent {
    let mut packed = PackedEvent::pack(event);
    packed.journal = journal;
    packed
}

/// Publishes an event that may be in the journal: with its first journal entry id as a dedupe
/// id (a replica presumed dead may publish it too), then out of the journal, unless it was adopted
/// and Redis could not take it (the caller dead-letters it, nobody sends it again).
async fn published(
    gateway: &Gateway,
    channel: &ChannelName,
    event: &Event,
    journal: Option<Journaled>,
    answered: bool,
    span: &Span,
) -> Result<ItemResult, BrokerError> {
    let origin = journal.as_ref().map(|journal| held_entry(&journal.origin));
    let result = accepted(gateway, channel, event, origin.as_deref(), span).await;
    if answered
        || !matches!(
            result,
            Err(BrokerError::Unavailable(_) | BrokerError::Refused(..))
        )
    {
        gateway.broker.settle_held(journal.as_ref());
    }
    result
}

/// The dedupe id a held event is published with: its first journal entry id, marked apart from
/// the ingest stream's entry ids.
pub(crate) fn held_entry(origin: &str) -> String {
    format!("held:{origin}")
}

async fn accepted(
    gateway: &Gateway,
    channel: &ChannelName,
    event: &Event,
    entry: Option<&str>,
    span: &Span,
) -> Result<ItemResult, BrokerError> {
    Ok(match emit(gateway, channel, event, entry, span).await? {
        Outcome::Published(published) => ItemResult::Accepted {
            channel: channel.clone(),
            seq: published.seq,
            epoch: published.epoch,
        },
        Outcome::Duplicate => ItemResult::Duplicate,
    })
}

/// An `agent_started` that names its thread registers its run, so that later events carrying only
/// the run id find the thread.
pub(crate) async fn register_start(gateway: &Gateway, event: &Event) -> Result<(), RegisterError> {
    if event.kind == EventType::AgentStarted
        && let (Some(run_id), Some(thread_id)) = (&event.run_id, &event.thread_id)
    {
        let target = RunTarget {
            thread_id: Some(thread_id.clone()),
            user_id: event.user_id.clone(),
        };
        register(gateway, run_id, target).await?;
    }
    Ok(())
}

/// The channel of `event`: the broker's shared run registry (Redis mode) is asked first.
pub(crate) async fn resolve(
    gateway: &Gateway,
    event: &Event,
) -> Result<Option<ChannelName>, BrokerError> {
    if event.thread_id.is_none()
        && let Some(run_id) = &event.run_id
        && let Some(channel) = gateway
            .broker
            .registered(run_id)
            .await?
            .and_then(|t| t.channel())
    {
        return Ok(Some(channel));
    }
    Ok(gateway.resolver.resolve(event))
}

/// Publishes an event into its channel and lets the watchdog follow its run.
pub async fn emit(
    gateway: &Gateway,
    channel: &ChannelName,
    event: &Event,
    entry: Option<&str>,
    span: &Span,
) -> Result<Outcome, BrokerError> {
    let started = Instant::now();
    let outcome = gateway
        .broker
        .publish(channel, event, entry, |seq| {
            telemetry::published(span, event, channel, seq)
        })
        .await?;
    match &outcome {
        Outcome::Published(published) => emitted(gateway, channel, event, published, started),
        Outcome::Duplicate => gateway.metrics.events_duplicate.inc(),
    }
    Ok(outcome)
}

/// What follows every publish: the broker latency, the watchdog, the debug line.
fn emitted(
    gateway: &Gateway,
    channel: &ChannelName,
    event: &Event,
    published: &Published,
    started: Instant,
) {
    gateway
        .metrics
        .broker_latency
        .observe(started.elapsed().as_secs_f64());
    gateway.watchdog.observe(event, channel, &gateway.metrics);
    tracing::debug!(%channel, seq = published.seq, run_id = event.run_id.as_deref(), kind = event.kind.as_str(), "Emitted.");
}
