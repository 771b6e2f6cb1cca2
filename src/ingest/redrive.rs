//! Redrive: resolution run again on every dead letter, rescued events published, the rest kept.

use serde::Serialize;

use super::{emit, resolve};
use crate::broker::{BrokerError, Outcome};
use crate::protocol::ChannelName;
use crate::protocol::event::Event;
use crate::{Gateway, telemetry};

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
        let outcome = match entry.event.unpack() {
            // A letter that cannot be read back stays for the operator to see.
            None => Err(None),
            Some(event) => match resolve(gateway, &event).await {
                Ok(Some(channel)) => redrive_one(gateway, &entry, &event, channel).await,
                Ok(None) => Err(None),
                Err(error) => Err(Some(error)),
            },
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
    gateway.broker.restore_dead_letters(kept, &gateway.metrics);
    Ok(report)
}

/// Publishes one resolved dead letter. `Ok(None)`: another replica's redrive took it first.
async fn redrive_one(
    gateway: &Gateway,
    entry: &crate::deadletter::Entry,
    event: &Event,
    channel: ChannelName,
) -> Result<Option<(ChannelName, Outcome)>, Option<BrokerError>> {
    if !gateway.broker.take_dead_letter(entry).await.map_err(Some)? {
        return Ok(None);
    }
    if let Some(event_id) = event.dedupe_id()
        && !gateway.broker.first_time(&event_id)
    {
        gateway.metrics.events_duplicate.inc();
        return Ok(Some((channel, Outcome::Duplicate)));
    }
    // Its first id makes a second publish a duplicate (a publish whose answer was lost, then a
    // redrive of the letter put back).
    let span = telemetry::ingest_span(event);
    match emit(gateway, &channel, event, entry.origin.as_deref(), &span).await {
        Ok(outcome) => Ok(Some((channel, outcome))),
        Err(error) => {
            gateway
                .broker
                .put_back_dead_letter(entry.clone(), &gateway.metrics);
            Err(Some(error))
        }
    }
}
