//! What comes up from the broker (Redis mode), each through a bounded channel and consumed by one
//! task that ingest owns: registrations announced by any replica release the events held here (each
//! release in a task of its own, at most [`RELEASES`] at once, so a slow one does not hold up the
//! pub/sub reader behind it), and ingest stream entries are taken a read at a time like the items
//! of a `POST /v1/events`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use super::batch::Batch;
use super::{RegisterError, emit, lost_unresolved, register_start, release, resolve};
use crate::broker::{Announcement, BrokerError, StreamEvent, StreamEvents, Taken, Upward, now_ms};
use crate::ledger::LostReason;
use crate::protocol::packed::PackedEvent;
use crate::telemetry::Throttle;
use crate::{Gateway, telemetry};

/// Releases running at once.
pub const RELEASES: usize = 64;

/// Starts the task that consumes `upward` on `tracker`; it ends when the broker's tasks have
/// ended (both channels closed), and the releases it started end on the same tracker.
pub fn consume(gateway: Arc<Gateway>, upward: Upward, tracker: &TaskTracker) {
    let Upward {
        mut announcements,
        mut stream,
    } = upward;
    let releases = tracker.clone();
    let room = Arc::new(Semaphore::new(RELEASES));
    tracker.spawn(async move {
        let (mut announcing, mut streaming) = (true, true);
        while announcing || streaming {
            tokio::select! {
                announcement = announcements.recv(), if announcing => match announcement {
                    Some(announcement) => {
                        let Ok(permit) = Arc::clone(&room).acquire_owned().await else {
                            break;
                        };
                        let gateway = Arc::clone(&gateway);
                        releases.spawn(async move {
                            announced(&gateway, announcement).await;
                            drop(permit);
                        });
                    }
                    None => announcing = false,
                },
                read = stream.recv(), if streaming => match read {
                    Some(StreamEvents { entries, reply }) => {
                        let _ = reply.send(take_read(&gateway, entries).await);
                    }
                    None => streaming = false,
                },
            }
        }
    });
}

async fn announced(gateway: &Gateway, announcement: Announcement) {
    match announcement {
        Announcement::Registered { run_id, target } => {
            release(gateway, &run_id, target).await;
        }
        // After a pub/sub reconnect: ask the shared registry about every run with held events.
        Announcement::Resync => {
            for run_id in gateway.resolver.held_runs() {
                if let Ok(Some(target)) = gateway.broker.registered(&run_id).await {
                    release(gateway, &run_id, target).await;
                }
            }
        }
    }
}

/// The entries of one read, in stream order: those that need nothing but their publish are
/// published together (`batch.rs`), any other is taken alone once those before it are published.
/// One answer per entry, up to the first error and the rest of the batch it was published in (the
/// reader leaves what follows for later).
async fn take_read(
    gateway: &Gateway,
    entries: Vec<StreamEvent>,
) -> Vec<Result<Taken, BrokerError>> {
    let mut answers = Vec::with_capacity(entries.len());
    let mut batch = Batch::with_capacity(entries.len());
    // Runs with an entry left for later in this read: their entries after it wait too.
    let mut later: HashSet<String> = HashSet::new();
    for StreamEvent {
        event,
        entry_id,
        added_ms,
    } in entries
    {
        if (event.run_id.as_ref()).is_some_and(|run_id| later.contains(run_id)) {
            if !publish_kept(gateway, &mut batch, &mut answers).await {
                return answers;
            }
            answers.push(Ok(Taken::Later));
            continue;
        }
        // A kept entry is answered once its batch is published.
        let Some(event) = batch.keep(gateway, event, Some(&entry_id)) else {
            continue;
        };
        if !publish_kept(gateway, &mut batch, &mut answers).await {
            return answers;
        }
        let run_id = event.run_id.clone();
        let taken = take(gateway, event, &entry_id, added_ms).await;
        if let (Ok(Taken::Later), Some(run_id)) = (&taken, run_id) {
            later.insert(run_id);
        }
        let failed = taken.is_err();
        answers.push(taken);
        if failed {
            return answers;
        }
    }
    publish_kept(gateway, &mut batch, &mut answers).await;
    answers
}

/// Publishes what `batch` kept and appends each entry's answer (an entry failed by our fault is
/// settled as [`take`] settles it); `false` when one is an error.
async fn publish_kept(
    gateway: &Gateway,
    batch: &mut Batch,
    answers: &mut Vec<Result<Taken, BrokerError>>,
) -> bool {
    let mut all_taken = true;
    for (kept, outcome) in batch.publish(gateway).await {
        let entry_id = kept.entry.as_deref().unwrap_or_default();
        let answer = match outcome {
            Ok(_) => Ok(Taken::Done),
            Err(error @ BrokerError::Internal(_)) => {
                lost_internal(gateway, &kept.event, entry_id, error).await
            }
            Err(error) => Err(error),
        };
        all_taken &= answer.is_ok();
        answers.push(answer);
    }
    all_taken
}

/// Why an ingest stream entry the broker failed on by our fault was dead-lettered.
const INTERNAL: &str = "internal: the broker failed on it by the gateway's fault";

/// One valid ingest stream entry, settled by [`take_entry`]. An entry that fails by our fault (a
/// script error, a reply of the wrong shape) would fail the same way on every retry: it is
/// dead-lettered (kept for a redrive once the cause is fixed), counted `lost{internal}` once and
/// acknowledged. An entry Redis could not take (unavailable, full) is left for later.
async fn take(
    gateway: &Gateway,
    event: crate::protocol::event::Event,
    entry_id: &str,
    added_ms: u64,
) -> Result<Taken, BrokerError> {
    match take_entry(gateway, &event, entry_id, added_ms).await {
        Err(error @ BrokerError::Internal(_)) => {
            lost_internal(gateway, &event, entry_id, error).await
        }
        taken => taken,
    }
}

/// An entry that failed by our fault: dead-lettered, then counted and acknowledged. If the
/// letter cannot be written because Redis is unavailable, the entry is left for later and counted
/// when it is settled, so it is counted once; if the letter fails by our fault too, it is
/// acknowledged anyway (counted, logged): retrying would never end.
async fn lost_internal(
    gateway: &Gateway,
    event: &crate::protocol::event::Event,
    entry_id: &str,
    error: BrokerError,
) -> Result<Taken, BrokerError> {
    let run_id = event.run_id.clone().unwrap_or_default();
    let kept = gateway
        .broker
        .keep_dead_letter_now(
            &run_id,
            PackedEvent::pack(event),
            (INTERNAL, LostReason::Internal),
            &gateway.metrics,
        )
        .await;
    let kept = match kept {
        Ok(()) => true,
        Err(BrokerError::Internal(_)) => false,
        Err(unavailable) => return Err(unavailable),
    };
    gateway.metrics.events_ingested.inc();
    gateway.metrics.lose_internal();
    static LOST: Throttle = Throttle::every(Duration::from_secs(10));
    if let Some(held_back) = LOST.allow() {
        tracing::warn!(
            target: "agentwire::deadletter",
            entry_id,
            run_id,
            %error,
            dead_lettered = kept,
            held_back,
            "Ingest entry lost: the broker failed on it by our fault; counted lost internal and acknowledged, not retried (see docs/redis.md)."
        );
    }
    Ok(Taken::Done)
}

/// One valid ingest stream entry: published (the entry id makes a second publish a duplicate),
/// left for later while its run is unregistered within `resolve.grace`, or dead-lettered after.
async fn take_entry(
    gateway: &Gateway,
    event: &crate::protocol::event::Event,
    entry_id: &str,
    added_ms: u64,
) -> Result<Taken, BrokerError> {
    // Held events of the run are being released here: keep the run's order.
    if let Some(run_id) = &event.run_id
        && gateway.resolver.is_waiting(run_id)
    {
        return Ok(Taken::Later);
    }
    match register_start(gateway, event).await {
        // A full registry refuses the registration (counted), not the event: it names its thread.
        Ok(()) | Err(RegisterError::Full) => {}
        // Taken (acknowledged) and counted, not published: the run stays where it is registered.
        Err(RegisterError::Conflict) => {
            let refusal = crate::protocol::event::Refusal::run_conflict();
            gateway
                .metrics
                .events_rejected
                .with_label_values(&[refusal.code.as_str()])
                .inc();
            tracing::warn!(
                entry_id,
                run_id = event.run_id.as_deref(),
                "Ingest entry refused: its run is registered to another thread or user."
            );
            return Ok(Taken::Done);
        }
        Err(RegisterError::Broker(error)) => return Err(error),
    }
    match resolve(gateway, event).await? {
        Some(channel) => {
            let span = telemetry::ingest_span(event);
            emit(gateway, &channel, event, Some(entry_id), &span).await?;
            gateway.metrics.events_ingested.inc();
            Ok(Taken::Done)
        }
        None if added_ms + gateway.config.resolve.grace.as_millis() as u64 > now_ms() => {
            Ok(Taken::Later)
        }
        None => {
            let run_id = event.run_id.clone().unwrap_or_default();
            let why = "no channel within resolve.grace";
            let packed = PackedEvent::pack(event);
            gateway
                .broker
                .keep_dead_letter_now(
                    &run_id,
                    packed.clone(),
                    (why, LostReason::Unresolved),
                    &gateway.metrics,
                )
                .await?;
            lost_unresolved(gateway, &run_id, &packed, why);
            gateway.metrics.events_ingested.inc();
            Ok(Taken::Done)
        }
    }
}
