//! Late registrations: a run registered here or announced by another replica releases the events
//! held for it, in arrival order (a release Redis cannot take yet is paused and resumed on the
//! housekeeping tick); runs that waited past `resolve.grace` are dead-lettered.

use std::time::{Duration, Instant};

use super::{emit, held_entry};
use crate::broker::{BrokerError, Registration};
use crate::ledger::LostReason;
use crate::metrics::{Label, count};
use crate::protocol::ChannelName;
use crate::protocol::packed::PackedEvent;
use crate::protocol::run::RunTarget;
use crate::resolve::{Held, Unregistrable};
use crate::telemetry::Throttle;
use crate::{Gateway, telemetry};

/// Why a run was not registered, counted in `agentwire_runs_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunRefusal {
    /// Registered to another thread or user, or a standard run id naming another thread.
    Conflict,
    /// The registry holds `resolve.registry_capacity` live registrations.
    Full,
}

impl Label for RunRefusal {
    const ALL: &'static [Self] = &[Self::Conflict, Self::Full];

    fn as_str(self) -> &'static str {
        match self {
            Self::Conflict => "conflict",
            Self::Full => "full",
        }
    }
}

/// Why a run was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// It is registered to another thread or user within `resolve.registry_ttl`.
    #[error("this run is registered to another thread or user")]
    Conflict,
    /// The registry is full of live registrations.
    #[error("the run registry is full (resolve.registry_capacity)")]
    Full,
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Registers a run (in Redis mode in the shared registry, announced to every replica) and
/// publishes, in arrival order, the events that were waiting for it here. A registration is never
/// re-pointed: a run registered to another channel is refused (and counted), so nobody can move
/// another producer's run into their own thread.
pub async fn register(
    gateway: &Gateway,
    run_id: &str,
    target: RunTarget,
) -> Result<usize, RegisterError> {
    let refused = match gateway.resolver.admit(run_id, &target) {
        Err(Unregistrable::Full) => Some(RunRefusal::Full),
        Err(Unregistrable::Conflict) => Some(RunRefusal::Conflict),
        Ok(()) => match gateway.broker.register(run_id, &target).await? {
            Registration::Done => None,
            Registration::Taken(_) => Some(RunRefusal::Conflict),
            Registration::Full => Some(RunRefusal::Full),
        },
    };
    if let Some(refusal) = refused {
        count(&gateway.metrics.runs_refused, refusal);
        return Err(match refusal {
            RunRefusal::Conflict => {
                static CONFLICT: Throttle = Throttle::every(Duration::from_secs(10));
                if let Some(held_back) = CONFLICT.allow() {
                    tracing::info!(run_id, held_back, "Refused to re-point a registered run.");
                }
                RegisterError::Conflict
            }
            RunRefusal::Full => {
                static FULL: Throttle = Throttle::every(Duration::from_secs(10));
                if let Some(held_back) = FULL.allow() {
                    tracing::warn!(
                        run_id,
                        held_back,
                        "Refused a registration: the run registry is full (resolve.registry_capacity)."
                    );
                }
                RegisterError::Full
            }
        });
    }
    gateway.metrics.runs_registered.inc();
    Ok(release(gateway, run_id, target).await)
}

/// Records the run here and publishes the events held for it. They are published with the
/// resolver's lock released (a publish may await Redis); events of the run that arrive meanwhile
/// are held behind them and published by this loop, in order. Each leaves the pending set only
/// once it is published, so a release that shutdown cuts (its task dropped, or still awaiting a
/// paused Redis) leaves the rest to `dead_letter_held`, counted.
pub(super) async fn release(gateway: &Gateway, run_id: &str, target: RunTarget) -> usize {
    let channel = target.channel();
    if !gateway.resolver.begin_release(run_id, target) {
        return 0;
    }
    let Some(channel) = channel else {
        return 0;
    };
    publish_released(gateway, run_id, channel, None).await
}

/// On each housekeeping tick while the broker answers: resumes the releases that stopped on an
/// event Redis could not take, from that event on; at once, a bounded number of runs and of
/// events each a tick (what is left waits for the next tick), since each may wait for Redis and
/// the tick also marks this replica alive.
pub async fn resume_releases(gateway: &Gateway) {
    if !gateway.broker.is_up() {
        return;
    }
    let paused = gateway.resolver.take_paused(LAST_LOOKUPS);
    let resumed = paused.into_iter().map(|(run_id, channel)| async move {
        publish_released(gateway, &run_id, channel, Some(RESUMED_PER_TICK)).await;
    });
    futures_util::future::join_all(resumed).await;
}

/// Events a resumed release publishes per tick, at most.
const RESUMED_PER_TICK: usize = 100;

/// Publishes the held events of a run being released, in order, until none is left (or `most`
/// are published: the release is paused, to go on at the next tick). An event the broker cannot
/// take now (Redis away, or full) pauses the release there, for [`resume_releases`]: the run has
/// its channel, so the event is not lost, only late, and the events behind it wait. So does a
/// release whose task is dropped midway. One the broker failed on by our fault is dead-lettered
/// and counted `lost{internal}` (a retry would fail the same way).
async fn publish_released(
    gateway: &Gateway,
    run_id: &str,
    channel: ChannelName,
    most: Option<usize>,
) -> usize {
    let mut unfinished = Unfinished {
        gateway,
        run_id,
        channel: Some(channel.clone()),
    };
    let mut released = 0;
    while let Some(packed) = gateway.resolver.next_released(run_id) {
        if most.is_some_and(|most| released >= most) {
            // Paused by `unfinished` as it drops: the rest goes on at the next tick.
            return released;
        }
        let failed = match packed.unpack() {
            Some(event) => {
                let span = telemetry::ingest_span(&event);
                // Its first journal entry id makes a second publish (by a replica that adopted
                // it while this one did not answer, or a resumed release after a call that ran
                // unanswered) a duplicate.
                let origin = packed.journal.as_ref().map(|j| held_entry(&j.origin));
                match emit(gateway, &channel, &event, origin.as_deref(), &span).await {
                    Ok(_) => None,
                    Err(error @ BrokerError::Internal(_)) => Some(Failed::Internal(error)),
                    Err(error) => {
                        gateway.metrics.broker_errors.inc();
                        static PAUSED: Throttle = Throttle::every(Duration::from_secs(10));
                        if let Some(held_back) = PAUSED.allow() {
                            tracing::warn!(%error, run_id, held_back, "A released event could not be published yet; its run's release goes on once Redis takes it.");
                        }
                        return released;
                    }
                }
            }
            None => Some(Failed::Unreadable),
        };
        released += 1;
        // `false`: the shutdown took it meanwhile, already dead-lettered and counted.
        if gateway.resolver.released(run_id) {
            match failed {
                // Counted lost{internal}; its letter is kept for a redrive once fixed.
                Some(Failed::Internal(error)) => {
                    gateway.metrics.broker_errors.inc();
                    super::lost_internal(gateway, &error);
                    let why = ("the broker failed it at release", LostReason::Internal);
                    keep_letter(gateway, run_id, packed, why);
                }
                Some(Failed::Unreadable) => dead_letter(
                    gateway,
                    Held {
                        run_id: run_id.to_string(),
                        events: vec![packed],
                    },
                    "held event could not be read back",
                ),
                None => gateway.broker.settle_held(packed.journal.as_ref()),
            }
        }
    }
    // Ended: nothing left to pause.
    unfinished.channel = None;
    if released > 0 {
        tracing::info!(run_id, released, "Late registration delivered held events.");
    }
    released
}

/// Why a released event was not published, and will not be.
enum Failed {
    Internal(BrokerError),
    Unreadable,
}

/// A release under way: dropped before it ended (paused by Redis, cut by its budget, or its task
/// dropped), it is paused, so [`resume_releases`] takes it up; else its run would stay releasing
/// with nobody publishing, and every later event of the run would wait behind it for good.
struct Unfinished<'a> {
    gateway: &'a Gateway,
    run_id: &'a str,
    /// `None` once the release ended.
    channel: Option<ChannelName>,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            // `false` at shutdown: what it held was taken and dead-lettered.
            self.gateway.resolver.pause_release(self.run_id, channel);
        }
    }
}

/// Moves the runs that waited past the grace period to the dead-letter log. In Redis mode each is
/// first looked up in the shared registry once more: a registration whose announcement this
/// replica missed (a pub/sub outage and a failed lookup after it) releases its events instead.
pub async fn expire_pending(gateway: &Gateway) {
    let now = Instant::now();
    if gateway.broker.is_up() {
        // At once, and a bounded number a tick: a flood of unknown runs must not hold up the
        // housekeeping (past the bound they are dead-lettered without asking, as before).
        let mut expiring = gateway.resolver.expiring(now);
        expiring.truncate(LAST_LOOKUPS);
        let lookups = expiring
            .iter()
            .map(|run_id| gateway.broker.registered(run_id));
        let found = futures_util::future::join_all(lookups).await;
        for (run_id, found) in expiring.iter().zip(found) {
            match found {
                Ok(Some(target)) => {
                    tracing::info!(
                        run_id,
                        "Held events found their run's registration at the end of resolve.grace."
                    );
                    release(gateway, run_id, target).await;
                }
                Ok(None) => {}
                Err(error) => {
                    gateway.metrics.broker_errors.inc();
                    tracing::debug!(%error, run_id, "Cannot look up a run at the end of its grace.");
                }
            }
        }
    }
    let expired = gateway.resolver.expire(now);
    if expired.is_empty() {
        return;
    }
    for held in expired {
        dead_letter(gateway, held, "no channel within resolve.grace");
    }
}

/// Runs past `resolve.grace` looked up in the shared registry per tick, at most; paused releases
/// resumed per tick, at most.
const LAST_LOOKUPS: usize = 64;

/// Why an event still held for its run when the gateway stopped was dead-lettered.
pub const SHUTDOWN: &str = "shutdown: still waiting for its run when the gateway stopped";

/// At shutdown, once ingest has stopped: every event still held for its run (waiting for a
/// registration, or in a release that has not published it, which the bound may have cut) is
/// dead-lettered and counted lost `unresolved`, so none leaves uncounted. The resolver is closed
/// after: an event that still reaches it is dead-lettered at once. Redis keeps the letters in the shared stream (written
/// now); the embedded broker's go with the process, and the log says how many. Returns how many.
pub async fn dead_letter_held(gateway: &Gateway) -> usize {
    let held = gateway.resolver.take_all();
    // Counted first, all of them: writing the letters to Redis may be cut by the shutdown bound.
    let mut events = 0;
    for held in &held {
        for event in &held.events {
            events += 1;
            lost_unresolved(gateway, &held.run_id, event, SHUTDOWN);
        }
    }
    if events == 0 {
        return 0;
    }
    if gateway.broker.letters_outlive_the_process() {
        tracing::warn!(
            events,
            "Shutdown: events still waiting for their run are dead-lettered (counted lost unresolved, kept in the shared dead-letter stream for redrive)."
        );
    } else {
        tracing::warn!(
            events,
            "Shutdown: events still waiting for their run were dead-lettered and counted lost unresolved; the embedded broker's dead letters are gone with the process."
        );
    }
    for held in held {
        for event in held.events {
            let journal = event.journal.clone();
            let kept = gateway
                .broker
                .keep_dead_letter_now(
                    &held.run_id,
                    event,
                    (SHUTDOWN, LostReason::Unresolved),
                    &gateway.metrics,
                )
                .await;
            match kept {
                // Out of the journal once its letter is kept.
                Ok(()) => gateway.broker.settle_held(journal.as_ref()),
                // Left in the journal, the event's only copy: another replica adopts it (it stays
                // counted lost here, even if that replica then publishes it).
                Err(error) => {
                    static UNKEPT: Throttle = Throttle::every(Duration::from_secs(10));
                    if let Some(held_back) = UNKEPT.allow() {
                        tracing::warn!(%error, run_id = held.run_id.as_str(), held_back, "A held event's dead letter could not be written at shutdown; it stays in the journal for another replica to adopt, counted lost here.");
                    }
                }
            }
        }
    }
    events
}

/// Logs and counts one event lost unresolved.
pub(super) fn lost_unresolved(gateway: &Gateway, run_id: &str, event: &PackedEvent, why: &str) {
    // One line per interval: a flood of unknown runs must not flood the logs. Every letter is
    // listed by `GET /v1/deadletter`.
    static LOST: Throttle = Throttle::every(Duration::from_secs(10));
    if let Some(held_back) = LOST.allow() {
        tracing::warn!(
            target: "agentwire::deadletter",
            run_id,
            kind = event.kind.as_str(),
            event_id = event.event_id.as_deref(),
            why,
            held_back,
            "Event lost: its run_id resolves to no channel (held_back more since the last line)."
        );
    }
    gateway
        .metrics
        .events_lost
        .with_label_values(&[LostReason::Unresolved.as_str()])
        .inc();
}

/// The one place an unresolved event is logged, counted and kept; a held event leaves the
/// journal after its letter (both queued, in this order).
pub(super) fn dead_letter(gateway: &Gateway, held: Held, why: &'static str) {
    for event in held.events {
        lost_unresolved(gateway, &held.run_id, &event, why);
        keep_letter(gateway, &held.run_id, event, (why, LostReason::Unresolved));
    }
}

/// Keeps an event counted lost as a dead letter; a held event leaves the journal after it.
fn keep_letter(
    gateway: &Gateway,
    run_id: &str,
    event: PackedEvent,
    why: (&'static str, LostReason),
) {
    let journal = event.journal.clone();
    gateway
        .broker
        .keep_dead_letter(run_id, event, why, &gateway.metrics);
    gateway.broker.settle_held(journal.as_ref());
}
