//! Producer ingest: splits a `POST /v1/events` body into items, validates each, drops retries by
//! `event_id`, resolves, and publishes. Every item gets its own answer, in order; an invalid item
//! never stops the valid ones beside it.
//!
//! Accounting before the channel stage:
//! `ingested + generated + redriven = emitted + pending_resolution + lost{unresolved} + duplicates`,
//! where `generated` counts the gateway's own events (a stalled run's `agent_error`) and `redriven`
//! the dead letters a redrive emitted (see `deadletter`).

use std::time::Instant;

use serde::Serialize;
use serde_json::value::RawValue;

mod upward;

pub use upward::consume;

use crate::Gateway;
use crate::broker::{Activity, BrokerError, Outcome, Published};
use crate::ledger::LostReason;
use crate::protocol::ChannelName;
use crate::protocol::event::{self, Event, EventType, Refusal};
use crate::protocol::run::RunTarget;
use crate::resolve::{Held, NotHeld};
use crate::telemetry;
use tracing::{Instrument, Span};

/// The answer for one item.
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ItemResult {
    Accepted {
        channel: String,
        seq: u64,
        epoch: String,
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

/// Why a whole body was refused.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body is not UTF-8")]
    NotUtf8,
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body holds no events")]
    Empty,
}

/// Splits a body into the raw JSON text of each item.
pub fn split(body: &[u8], ndjson: bool) -> Result<Vec<&str>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|_| BodyError::NotUtf8)?;
    let items: Vec<&str> = if ndjson {
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect()
    } else if text.trim_start().starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|e| BodyError::NotJson(e.to_string()))?;
        items.into_iter().map(RawValue::get).collect()
    } else {
        let item: &RawValue =
            serde_json::from_str(text).map_err(|e| BodyError::NotJson(e.to_string()))?;
        vec![item.get()]
    };
    if items.is_empty() {
        return Err(BodyError::Empty);
    }
    Ok(items)
}

/// Validates and accepts every item, in order.
pub async fn ingest(gateway: &Gateway, items: &[&str]) -> Vec<ItemResult> {
    let mut results = Vec::with_capacity(items.len());
    for raw in items {
        results.push(match event::parse(raw, gateway.config.ingest.max_event_bytes) {
            Ok(event) => accept(gateway, event, None).await,
            Err(refusal) => {
                gateway.metrics.events_rejected.with_label_values(&[refusal.code.as_str()]).inc();
                tracing::debug!(field = refusal.field.as_deref(), reason = %refusal.reason, "Refused an event.");
                ItemResult::Error(refusal)
            }
        });
    }
    results
}

/// Accepts one valid event: dedupe, register (for `agent_started` with a thread), resolve, publish.
/// `entry` is the ingest stream entry id it came from, which makes a second publish a duplicate.
pub async fn accept(gateway: &Gateway, event: Event, entry: Option<&str>) -> ItemResult {
    gateway.metrics.events_ingested.inc();
    let span = telemetry::ingest_span(&event);
    let accepted = accept_in(gateway, event, entry, &span);
    match accepted.instrument(span.clone()).await {
        Ok(result) => result,
        Err(error) => {
            gateway.metrics.broker_errors.inc();
            ItemResult::Unavailable {
                reason: error.to_string(),
            }
        }
    }
}

async fn accept_in(
    gateway: &Gateway,
    event: Event,
    entry: Option<&str>,
    span: &Span,
) -> Result<ItemResult, BrokerError> {
    if let Some(event_id) = &event.event_id
        && !gateway.broker.first_time(event_id)
    {
        gateway.metrics.events_duplicate.inc();
        return Ok(ItemResult::Duplicate);
    }
    register_start(gateway, &event).await?;
    if let Some(channel) = resolve(gateway, &event).await? {
        // Earlier events of its run are being released; it goes behind them.
        let event = match gateway.resolver.hold_behind(event) {
            Ok(()) => return Ok(ItemResult::PendingResolution),
            Err(event) => *event,
        };
        return accepted(gateway, &channel, &event, entry, span).await;
    }
    let run_id = event.run_id.clone();
    match gateway.resolver.hold(event) {
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
        Err(NotHeld {
            event,
            channel: Some(channel),
        }) => accepted(gateway, &channel, &event, entry, span).await,
        Err(NotHeld {
            event,
            channel: None,
        }) => {
            let run_id = event.run_id.clone().unwrap_or_default();
            dead_letter(
                gateway,
                Held {
                    run_id,
                    events: vec![*event],
                },
                "pending set full",
            );
            Ok(ItemResult::Unresolved {
                reason: "pending_full",
            })
        }
    }
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
            channel: channel.to_string(),
            seq: published.seq,
            epoch: published.epoch.to_string(),
        },
        Outcome::Duplicate => ItemResult::Duplicate,
    })
}

/// An `agent_started` that names its thread registers its run, so that later events carrying only
/// the run id find the thread.
pub(crate) async fn register_start(gateway: &Gateway, event: &Event) -> Result<(), BrokerError> {
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

/// Tells the channels of newly stalled runs, with a gateway-made `agent_error`. In Redis mode a
/// run quiet here is first checked against what every replica saw of it (it may have gone on, or
/// ended, through another replica), and one replica wins the report, so its channel is told once.
pub async fn report_stalls(gateway: &Gateway) {
    for run_id in gateway.watchdog.sweep() {
        match gateway.broker.run_activity(&run_id).await {
            Ok(Some(Activity::Ended)) => {
                gateway.watchdog.ended_elsewhere(&run_id, &gateway.metrics);
                continue;
            }
            Ok(Some(Activity::Seen(ago))) if ago <= gateway.config.watchdog.run_idle_timeout => {
                gateway.watchdog.seen_elsewhere(&run_id, ago);
                continue;
            }
            Ok(_) => {}
            // Cannot tell: decide at a later sweep.
            Err(_) => continue,
        }
        // One replica counts and reports the stall; the others stop following the run.
        match gateway
            .broker
            .claim_stall(&run_id, gateway.config.watchdog.retain)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                gateway.watchdog.ended_elsewhere(&run_id, &gateway.metrics);
                continue;
            }
            Err(_) => continue,
        }
        let Some(stalled) = gateway.watchdog.stall(&run_id, &gateway.metrics) else {
            continue;
        };
        if !gateway.config.watchdog.stalled_event {
            continue;
        }
        // Published past the watchdog: the run is already ended as stalled.
        match gateway
            .broker
            .publish(&stalled.channel, &stalled.event(), None, |_| None)
            .await
        {
            Ok(_) => gateway.metrics.events_generated.inc(),
            Err(error) => {
                tracing::warn!(%error, run_id = %stalled.run_id, "Cannot tell a stalled run's channel: Redis is unavailable.");
            }
        }
    }
}

/// What a redrive did with one dead letter.
#[derive(Debug, Serialize)]
pub struct Redriven {
    pub id: crate::deadletter::LetterId,
    pub run_id: String,
    #[serde(flatten)]
    pub outcome: RedriveOutcome,
}

#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RedriveOutcome {
    /// Resolved now: emitted into `channel` at `seq`.
    Delivered { channel: String, seq: u64 },
    /// Resolved now, but its `event_id` was accepted meanwhile (a producer's retry): dropped.
    Duplicate,
    /// Still no channel: kept as a dead letter.
    Unresolved,
}

/// Runs resolution again on every dead letter; rescued events are emitted, the rest kept. A
/// letter is removed (in Redis mode by one replica only) before it is published, and put back if
/// the publish fails.
pub async fn redrive(gateway: &Gateway) -> Result<Vec<Redriven>, BrokerError> {
    let letters = gateway.broker.redrive_letters().await?;
    let mut kept = Vec::new();
    let mut report = Vec::new();
    for entry in letters {
        let outcome = match resolve(gateway, &entry.event).await {
            Ok(Some(channel)) => redrive_one(gateway, &entry, channel).await,
            Ok(None) => Err(None),
            Err(error) => Err(Some(error)),
        };
        let outcome = match outcome {
            Ok(None) => continue,
            Ok(Some((channel, Outcome::Published(published)))) => {
                tracing::info!(run_id = %entry.run_id, %channel, seq = published.seq, "Redrive delivered a dead letter.");
                RedriveOutcome::Delivered {
                    channel: channel.to_string(),
                    seq: published.seq,
                }
            }
            // Counted as redriven (it leaves the dead letters) and as a duplicate.
            Ok(Some((_, Outcome::Duplicate))) => RedriveOutcome::Duplicate,
            Err(error) => {
                if let Some(error) = error {
                    tracing::warn!(%error, run_id = %entry.run_id, "Redrive kept a dead letter: the broker is unavailable.");
                }
                report.push(Redriven {
                    id: entry.id.clone(),
                    run_id: entry.run_id.clone(),
                    outcome: RedriveOutcome::Unresolved,
                });
                kept.push(entry);
                continue;
            }
        };
        gateway.metrics.events_redriven.inc();
        report.push(Redriven {
            id: entry.id.clone(),
            run_id: entry.run_id.clone(),
            outcome,
        });
    }
    gateway.broker.restore_dead_letters(kept);
    Ok(report)
}

/// Publishes one resolved dead letter. `Ok(None)`: another replica's redrive took it first.
async fn redrive_one(
    gateway: &Gateway,
    entry: &crate::deadletter::Entry,
    channel: ChannelName,
) -> Result<Option<(ChannelName, Outcome)>, Option<BrokerError>> {
    if !gateway.broker.take_dead_letter(entry).await.map_err(Some)? {
        return Ok(None);
    }
    if let Some(event_id) = &entry.event.event_id
        && !gateway.broker.first_time(event_id)
    {
        gateway.metrics.events_duplicate.inc();
        return Ok(Some((channel, Outcome::Duplicate)));
    }
    // Its first id makes a second publish a duplicate (a publish whose answer was lost, then a
    // redrive of the letter put back).
    let span = telemetry::ingest_span(&entry.event);
    match emit(
        gateway,
        &channel,
        &entry.event,
        entry.origin.as_deref(),
        &span,
    )
    .await
    {
        Ok(outcome) => Ok(Some((channel, outcome))),
        Err(error) => {
            gateway
                .broker
                .put_back_dead_letter(entry.clone(), &gateway.metrics);
            Err(Some(error))
        }
    }
}

/// Registers a run (in Redis mode in the shared registry, announced to every replica) and
/// publishes, in arrival order, the events that were waiting for it here.
pub async fn register(
    gateway: &Gateway,
    run_id: &str,
    target: RunTarget,
) -> Result<usize, BrokerError> {
    gateway.metrics.runs_registered.inc();
    gateway.broker.register(run_id, &target).await?;
    Ok(release(gateway, run_id, target).await)
}

/// Records the run here and publishes the events held for it. They are published with the
/// resolver's lock released (a publish may await Redis); events of the run that arrive meanwhile
/// are held behind them and published by this loop, in order.
pub(crate) async fn release(gateway: &Gateway, run_id: &str, target: RunTarget) -> usize {
    let Some(channel) = target.channel() else {
        gateway.resolver.begin_release(run_id, target);
        return 0;
    };
    let mut held = gateway.resolver.begin_release(run_id, target);
    let mut released = 0;
    while !held.is_empty() {
        for event in held {
            released += 1;
            let span = telemetry::ingest_span(&event);
            if let Err(error) = emit(gateway, &channel, &event, None, &span).await {
                tracing::warn!(%error, run_id, "A released event could not be published.");
                dead_letter(
                    gateway,
                    Held {
                        run_id: run_id.to_string(),
                        events: vec![event],
                    },
                    "broker unavailable at release",
                );
            }
        }
        held = gateway.resolver.continue_release(run_id);
    }
    if released > 0 {
        tracing::info!(run_id, released, "Late registration delivered held events.");
    }
    released
}

/// Moves the runs that waited past the grace period to the dead-letter log.
pub fn expire_pending(gateway: &Gateway) {
    let expired = gateway.resolver.expire(Instant::now());
    if expired.is_empty() {
        return;
    }
    for held in expired {
        dead_letter(gateway, held, "no channel within resolve.grace");
    }
}

/// Logs and counts one event lost unresolved.
pub(crate) fn lost_unresolved(gateway: &Gateway, run_id: &str, event: &Event, why: &str) {
    tracing::warn!(
        target: "agentwire::deadletter",
        run_id,
        kind = event.kind.as_str(),
        event_id = event.event_id.as_deref(),
        why,
        "Event lost: its run_id resolves to no channel."
    );
    gateway
        .metrics
        .events_lost
        .with_label_values(&[LostReason::Unresolved.as_str()])
        .inc();
}

/// The one place an unresolved event is logged, counted and kept.
fn dead_letter(gateway: &Gateway, held: Held, why: &'static str) {
    for event in held.events {
        lost_unresolved(gateway, &held.run_id, &event, why);
        gateway
            .broker
            .keep_dead_letter(&held.run_id, event, why, &gateway.metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_bodies() {
        assert_eq!(split(br#"{"a":1}"#, false).unwrap(), vec![r#"{"a":1}"#]);
        assert_eq!(
            split(br#" [{"a":1}, 5]"#, false).unwrap(),
            vec![r#"{"a":1}"#, "5"]
        );
        assert_eq!(
            split(b"{\"a\":1}\n\n{\"b\":2}\nnope\n", true).unwrap(),
            vec![r#"{"a":1}"#, r#"{"b":2}"#, "nope"]
        );
        assert!(matches!(split(b"nope", false), Err(BodyError::NotJson(_))));
        assert!(matches!(split(b"[]", false), Err(BodyError::Empty)));
        assert!(matches!(split(b"\xff", false), Err(BodyError::NotUtf8)));
    }
}
