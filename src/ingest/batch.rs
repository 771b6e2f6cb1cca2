//! The events of one request (or one read of the ingest stream; or one event of a run's stream,
//! alone) that need nothing but their publish, gathered and published together: in Redis mode one
//! script call per channel, the channels' calls at once, instead of a round trip per event. An
//! event qualifies when its channel is its thread's, it registers no run, no earlier event of its
//! run is being released and it is no retry the embedded dedupe saw; any other item ends the batch
//! (it is published first), so every channel sees the events in their order.

use std::time::Instant;

use tracing::Span;

use super::emitted;
use crate::Gateway;
use crate::broker::{BrokerError, Outcome, ToPublish};
use crate::protocol::ChannelName;
use crate::protocol::event::{Event, EventType};
use crate::telemetry;

/// An event kept for the batch's publish.
pub(super) struct Kept {
    pub channel: ChannelName,
    pub event: Event,
    /// The ingest stream entry id it came from.
    pub entry: Option<String>,
    span: Span,
}

impl ToPublish for Kept {
    fn channel(&self) -> &ChannelName {
        &self.channel
    }

    fn event(&self) -> &Event {
        &self.event
    }

    fn entry(&self) -> Option<&str> {
        self.entry.as_deref()
    }
}

pub(super) struct Batch {
    kept: Vec<Kept>,
}

impl Batch {
    /// A batch for up to `events` events, its room taken once (a batch of one would otherwise
    /// allocate room for four).
    pub(super) fn with_capacity(events: usize) -> Self {
        Self {
            kept: Vec::with_capacity(events),
        }
    }

    /// Keeps `event` for the next [`Self::publish`] when it needs nothing else; gives it back
    /// when it does.
    pub(super) fn keep(
        &mut self,
        gateway: &Gateway,
        event: Event,
        entry: Option<&str>,
    ) -> Option<Event> {
        let Some(thread) = event.thread_id.as_deref() else {
            return Some(event);
        };
        let registers = event.kind == EventType::AgentStarted && event.run_id.is_some();
        let behind = (event.run_id.as_deref()).is_some_and(|run| gateway.resolver.is_waiting(run));
        if registers || behind {
            return Some(event);
        }
        // Last: a first sighting is recorded.
        if let Some(event_id) = event.dedupe_id()
            && !gateway.broker.first_time(&event_id)
        {
            return Some(event);
        }
        self.kept.push(Kept {
            channel: ChannelName::thread(thread),
            span: telemetry::ingest_span(&event),
            event,
            entry: entry.map(str::to_string),
        });
        None
    }

    /// Publishes what is kept: each event with its outcome, in order. A published event goes on
    /// to the watchdog; a published one and a duplicate are counted `ingested` (and a duplicate
    /// as one), as [`super::accept`] counts them; an error is the caller's to answer and count.
    pub(super) async fn publish(
        &mut self,
        gateway: &Gateway,
    ) -> impl Iterator<Item = (Kept, Result<Outcome, BrokerError>)> {
        let kept = std::mem::take(&mut self.kept);
        if kept.is_empty() {
            return kept.into_iter().zip(Vec::new());
        }
        let started = Instant::now();
        let outcomes = (gateway.broker)
            .publish_all(&kept, |i, seq| {
                let kept = &kept[i];
                telemetry::published(&kept.span, &kept.event, &kept.channel, seq)
            })
            .await;
        let ingested = &gateway.metrics.events_ingested;
        for (kept, outcome) in kept.iter().zip(&outcomes) {
            let _entered = kept.span.enter();
            match outcome {
                Ok(Outcome::Published(published)) => {
                    ingested.inc();
                    emitted(gateway, &kept.channel, &kept.event, published, started);
                }
                Ok(Outcome::Duplicate) => {
                    ingested.inc();
                    gateway.metrics.events_duplicate.inc();
                }
                Err(_) => {}
            }
        }
        kept.into_iter().zip(outcomes)
    }
}
