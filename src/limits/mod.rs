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
    body_bytes: Arc<Semaphore>,
    run_streams: Arc<Semaphore>,
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
            body_bytes: Arc::new(Semaphore::new(config.ingest.max_inflight_bytes)),
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
    pub fn hold_body_bytes(&self, held: &mut Option<OwnedSemaphorePermit>, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let Ok(bytes) = u32::try_from(bytes) else {
            return false;
        };
        match Arc::clone(&self.body_bytes).try_acquire_many_owned(bytes) {
            Ok(permit) => {
                match held {
                    Some(held) => held.merge(permit),
                    None => *held = Some(permit),
                }
                true
            }
            Err(_) => false,
        }
    }
}
