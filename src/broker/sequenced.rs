//! Events sequenced in Redis as a replica reads them (from the stream or pub/sub), and a channel's
//! stream read at one moment; the mirror merges them in seq order.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;

/// An event sequenced in Redis, as a replica reads it from the stream or pub/sub.
#[derive(Debug, Clone)]
pub struct Sequenced {
    pub seq: u64,
    /// The frame body without seq and epoch ([`crate::protocol::server::event_body`]).
    pub body: Bytes,
    /// Wall-clock milliseconds of the publish.
    pub emitted_ms: u64,
    /// The producer's `ts` in milliseconds, when it was an RFC 3339 UTC time.
    pub produced_ms: Option<u64>,
}

impl Sequenced {
    /// The publish moment on this process's monotonic clock, for the delivery latency.
    pub fn emitted_at(&self) -> Instant {
        let ago = now_ms().saturating_sub(self.emitted_ms);
        Instant::now()
            .checked_sub(std::time::Duration::from_millis(ago))
            .unwrap_or_else(Instant::now)
    }

    pub fn produced_at(&self) -> Option<SystemTime> {
        self.produced_ms
            .map(|ms| SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms))
    }
}

/// A channel's stream read at one moment: its epoch, last seq and entries from some seq on.
#[derive(Debug)]
pub struct Snapshot {
    pub epoch: Arc<str>,
    pub last_seq: u64,
    pub events: Vec<Sequenced>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
