//! The embedded broker (no Redis): channels in this process, `event_id` dedupe before resolution,
//! dead letters in a bounded log, and HLink messages queued for the webhook. Nothing is shared
//! with another process, so run registration, run activity and stall claims are local no-ops.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod deadletters;
mod dedupe;

use super::views::Views;
use super::{Channels, HandOff, HandOffError};
use crate::config::Config;
use crate::deadletter::{Entry, Page};
use crate::metrics::Metrics;
use crate::protocol::packed::PackedEvent;
use crate::protocol::upstream::Outbound;
use crate::telemetry::Throttle;
use crate::upstream::Upstream;
use deadletters::DeadLetters;
use dedupe::Dedupe;

pub struct Embedded {
    pub(super) channels: Channels,
    dedupe: Dedupe,
    deadletters: DeadLetters,
    upstream: Upstream,
    pub(super) views: Views,
}

impl Embedded {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            channels: Channels::new(config.history.clone()),
            dedupe: Dedupe::new(config.ingest.dedupe_window, config.ingest.dedupe_capacity),
            deadletters: DeadLetters::new(config.deadletter.clone()),
            upstream: Upstream::new(config.upstream.clone(), config.tls_ca_file.as_deref())?,
            views: Views::new(config.ledger.snapshot_interval),
        })
    }

    /// The webhook worker, when a webhook is configured.
    pub fn start(&self, tracker: &TaskTracker, stop: CancellationToken, metrics: Arc<Metrics>) {
        if let Some(worker) = self.upstream.worker(metrics, stop) {
            tracker.spawn(worker);
        }
    }

    pub fn first_time(&self, event_id: &str) -> bool {
        self.dedupe.first_time(event_id)
    }

    pub fn forget(&self, event_id: &str) {
        self.dedupe.forget(event_id);
    }

    pub fn keep_dead_letter(
        &self,
        run_id: &str,
        event: PackedEvent,
        why: &'static str,
        unresolved: bool,
        metrics: &Metrics,
    ) {
        // A producer's retry of this event must not be taken for a duplicate.
        if let Some(event_id) = event.dedupe_id() {
            self.forget(&event_id);
        }
        let dropped = self.deadletters.push(run_id, event, why);
        dropped_letters(dropped, metrics);
        if unresolved && self.deadletters.first_unresolved(run_id) {
            metrics.unresolved_run_ids.inc();
        }
    }

    pub fn take_dead_letters(&self) -> Vec<Entry> {
        self.deadletters.take()
    }

    pub fn restore_dead_letters(&self, kept: Vec<Entry>, metrics: &Metrics) {
        dropped_letters(self.deadletters.restore(kept), metrics);
    }

    pub fn dead_letter_page(&self, after: Option<u64>, limit: usize) -> Page {
        self.deadletters.page(after, limit)
    }

    pub fn dead_letter_count(&self) -> usize {
        self.deadletters.len()
    }

    pub fn hand_off(&self, message: Outbound, metrics: &Metrics) -> Result<HandOff, HandOffError> {
        self.upstream.send(message, metrics)?;
        Ok(HandOff::Queued)
    }

    pub fn sweep(&self) {
        self.channels.sweep();
        self.dedupe.expire();
    }
}

/// Letters the bounds pushed out: counted, and logged at most once per interval.
fn dropped_letters(dropped: u64, metrics: &Metrics) {
    if dropped == 0 {
        return;
    }
    metrics.deadletters_dropped.inc_by(dropped);
    static DROPPED: Throttle = Throttle::every(Duration::from_secs(10));
    if let Some(held_back) = DROPPED.allow() {
        tracing::warn!(
            dropped,
            held_back,
            "Dead letters are full (deadletter.capacity or deadletter.max_bytes): the oldest were dropped."
        );
    }
}
