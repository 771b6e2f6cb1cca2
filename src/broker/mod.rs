//! Sequence and store: the broker gives each accepted event the next `seq` of its channel, keeps
//! a bounded history for replay, and hands the event to fan-out.
//!
//! Its interface is what [`MemoryBroker`] offers: `publish`, `subscribe`, `unsubscribe`, `ack`,
//! `report`, `totals` and `sweep`. The embedded in-memory broker is the one implementation today;
//! the Redis broker arrives as the second, and the interface becomes a trait with it (see
//! ARCHITECTURE.md).

mod memory;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use crate::ledger::{ChannelLedger, EventState};
use crate::metrics::Metrics;

pub use memory::{ChannelSummary, MemoryBroker, Ranked};

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
