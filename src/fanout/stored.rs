//! An event as every subscriber and the history share it: its frame bytes, serialised once, and
//! its place in the channel's ledger, which the first socket write moves to delivered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::ledger::{ChannelLedger, EventState};
use crate::metrics::{DeliveryPath, Metrics};
use crate::protocol::ChannelName;
use crate::protocol::server::Format;

/// Redis mode: where one channel's first deliveries on this replica are reported (batched into
/// Redis by the broker's report task, so a session never awaits Redis).
#[derive(Debug)]
pub struct Feed {
    pub channel: ChannelName,
    pub epoch: Arc<str>,
    pub deliveries: mpsc::Sender<Delivered>,
}

/// The first write of `seq` to a socket on this replica.
#[derive(Debug)]
pub struct Delivered {
    pub feed: Arc<Feed>,
    pub seq: u64,
}

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
    pub(crate) state: EventState,
    pub(crate) ledger: Arc<ChannelLedger>,
    pub(crate) feed: Option<Arc<Feed>>,
    /// Set once the event was queued to a subscriber (live or replay).
    pub(crate) offered: AtomicBool,
    /// Its AG-UI form, made when the first AG-UI client needs it (boxed: a pointer's worth for
    /// the events no AG-UI client reads).
    pub(crate) agui: OnceLock<Box<super::AguiFrames>>,
}

impl StoredEvent {
    /// The bytes a client of `format` receives on `/ws`.
    pub fn frame_in(&self, format: Format) -> &[u8] {
        match format {
            Format::Native => &self.frame,
            Format::AgUi => &self.agui().frame,
        }
    }

    /// The event as AG-UI clients receive it (rendered once, then shared).
    pub fn agui(&self) -> &super::AguiFrames {
        self.agui
            .get_or_init(|| Box::new(super::AguiFrames::render(&self.frame, self.seq)))
    }

    pub(crate) fn offer(&self) {
        self.offered.store(true, Ordering::Relaxed);
    }

    pub(crate) fn was_offered(&self) -> bool {
        self.offered.load(Ordering::Relaxed)
    }

    /// Records a socket write of this event; the first one counts as the delivery, and its time
    /// since emit is observed as live latency or replay age by `path`.
    pub fn delivered(&self, metrics: &Metrics, path: DeliveryPath) {
        if self.state.deliver(&self.ledger) {
            if let Some(feed) = &self.feed
                && feed
                    .deliveries
                    .try_send(Delivered {
                        feed: Arc::clone(feed),
                        seq: self.seq,
                    })
                    .is_err()
            {
                super::dropped_report(metrics, super::DroppedReport::Delivered);
            }
            metrics.observe_delivery(path, self.emitted_at.elapsed());
            if let Some(age) = self
                .produced_at
                .and_then(|at| SystemTime::now().duration_since(at).ok())
            {
                metrics.event_age.observe(age.as_secs_f64());
            }
        }
    }
}
