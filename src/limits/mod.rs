//! Admission budgets that are not a queue's own: how many WebSocket connections the process and
//! each client address may hold, how many requests one address may have in flight on the internal
//! door, how many request-body bytes may be held at once, and how many AG-UI streams may be read
//! at once. Each is checked before the resource
//! is taken; the caller answers a refusal and counts it.

mod bucket;
mod client_ip;
mod per_ip;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use bucket::TokenBucket;
pub use client_ip::client_ip;
pub use per_ip::{PerIp, PerIpSlot};

use per_ip::Full;

use crate::config::Config;

/// The gateway's admission budgets, built once from the configuration.
pub struct Limits {
    connections: PerIp,
    requests: PerIp,
    body_bytes: Arc<BodyBytes>,
    run_streams: Arc<Semaphore>,
}

/// Request-body bytes held at once (`ingest.max_inflight_bytes`). A counter, not a semaphore:
/// nothing waits for room (a full budget refuses at once), and a semaphore's release takes a lock
/// on every request.
struct BodyBytes {
    held: AtomicUsize,
    limit: usize,
}

/// Body bytes held in `ingest.max_inflight_bytes`; given back when dropped.
pub struct HeldBytes {
    budget: Arc<BodyBytes>,
    bytes: usize,
}

impl HeldBytes {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A WebSocket connection's place in both connection budgets; given back when dropped.
pub type ConnectionSlot = PerIpSlot;

/// Which connection budget is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionsFull {
    /// `session.max_connections`.
    Global,
    /// `session.max_connections_per_ip`.
    PerIp,
}

impl Limits {
    pub fn new(config: &Config) -> Self {
        Self {
            connections: PerIp::new(
                config.session.max_connections_per_ip,
                config.session.max_connections,
            ),
            requests: PerIp::new(config.ingest.max_requests_per_ip, usize::MAX),
            body_bytes: Arc::new(BodyBytes {
                held: AtomicUsize::new(0),
                limit: config.ingest.max_inflight_bytes,
            }),
            run_streams: Arc::new(Semaphore::new(config.ingest.max_streams)),
        }
    }

    /// A place for one more WebSocket connection from `ip`, or which budget is full.
    pub fn connection(&self, ip: IpAddr) -> Result<ConnectionSlot, ConnectionsFull> {
        self.connections.acquire(ip).map_err(|full| match full {
            Full::Total => ConnectionsFull::Global,
            Full::Address => ConnectionsFull::PerIp,
        })
    }

    /// A place for one more request from `ip` on the internal door (`ingest.max_requests_per_ip`).
    pub fn request(&self, ip: IpAddr) -> Option<PerIpSlot> {
        self.requests.acquire(ip).ok()
    }

    /// A place for one more stream bound to one run (`ingest.max_streams`), held while it is read.
    pub fn run_stream(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.run_streams).try_acquire_owned().ok()
    }

    /// `bytes` more of request body held (`ingest.max_inflight_bytes`), added to `held`; `false`
    /// when the budget has no room for them.
    pub fn hold_body_bytes(&self, held: &mut Option<HeldBytes>, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let budget = &self.body_bytes;
        let room = |now: usize| {
            now.checked_add(bytes)
                .filter(|&after| after <= budget.limit)
        };
        if (budget.held)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, room)
            .is_err()
        {
            return false;
        }
        match held {
            Some(held) => held.bytes += bytes,
            None => {
                *held = Some(HeldBytes {
                    budget: Arc::clone(budget),
                    bytes,
                });
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_bytes_are_held_up_to_the_budget_and_given_back_when_dropped() {
        let mut config = Config::default();
        config.ingest.max_inflight_bytes = 100;
        let limits = Limits::new(&config);
        let (mut first, mut second) = (None, None);
        assert!(limits.hold_body_bytes(&mut first, 60));
        assert!(!limits.hold_body_bytes(&mut second, 41), "past the budget");
        assert!(second.is_none(), "a refusal holds nothing");
        assert!(
            limits.hold_body_bytes(&mut first, 40),
            "added to what is held"
        );
        assert_eq!(first.as_ref().map(HeldBytes::bytes), Some(100));
        assert!(!limits.hold_body_bytes(&mut second, 1));
        drop(first);
        assert!(
            limits.hold_body_bytes(&mut second, 100),
            "all of it given back"
        );
    }
}
