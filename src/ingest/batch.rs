//! The events of one request that need nothing but their publish, gathered and published
//! together: in Redis mode one script call per channel, the channels' calls at once, instead of a
//! round trip per event. An event qualifies when its channel is its thread's, it registers no
//! run, no earlier event of its run is being released and it is no retry; any other item ends
//! the batch (it is published first), so every channel sees the request's events in their order.

use std::time::Instant;

use tracing::Span;

use super::{ItemResult, emitted, failed};
use crate::Gateway;
use crate::broker::Outcome;
use crate::protocol::ChannelName;
use crate::protocol::event::{Event, EventType};
use crate::telemetry;

#[derive(Default)]
pub(super) struct Batch {
    events: Vec<(ChannelName, Event)>,
}

impl Batch {
    /// Keeps `event` for the next [`Self::publish`] when it needs nothing else; gives it back
    /// when it does.
    pub(super) fn keep(&mut self, gateway: &Gateway, event: Event) -> Option<Event> {
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
        self.events.push((ChannelName::thread(thread), event));
        None
    }

    /// Publishes what is kept and appends each event's answer to `results`, in order. Each is
    /// counted `ingested` as [`super::accept`] counts it.
    pub(super) async fn publish(&mut self, gateway: &Gateway, results: &mut Vec<ItemResult>) {
        if self.events.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.events);
        let spans: Vec<Span> = (events.iter())
            .map(|(_, event)| telemetry::ingest_span(event))
            .collect();
        let started = Instant::now();
        let pairs: Vec<(&ChannelName, &Event)> = (events.iter())
            .map(|(channel, event)| (channel, event))
            .collect();
        let outcomes = gateway
            .broker
            .publish_all(&pairs, |i, seq| {
                telemetry::published(&spans[i], &events[i].1, &events[i].0, seq)
            })
            .await;
        let ingested = &gateway.metrics.events_ingested;
        for (((channel, event), span), outcome) in events.iter().zip(&spans).zip(outcomes) {
            let _entered = span.enter();
            results.push(match outcome {
                Ok(Outcome::Published(published)) => {
                    ingested.inc();
                    emitted(gateway, channel, event, &published, started);
                    ItemResult::Accepted {
                        channel: channel.to_string(),
                        seq: published.seq,
                        epoch: published.epoch.to_string(),
                    }
                }
                Ok(Outcome::Duplicate) => {
                    ingested.inc();
                    gateway.metrics.events_duplicate.inc();
                    ItemResult::Duplicate
                }
                Err(error) => failed(gateway, error, ingested),
            });
        }
    }
}
