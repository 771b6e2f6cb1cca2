//! Admission budgets that are not a queue's own: how many WebSocket connections the process and
//! each client address may hold, how many requests one address may have in flight on the internal
//! door, and how many request-body bytes may be held at once. Each is checked before the resource
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

use crate::config::Config;

/// The gateway's admission budgets, built once from the configuration.
pub struct Limits {
    connections: Arc<Semaphore>,
    connections_per_ip: PerIp,
    requests_per_ip: PerIp,
    body_bytes: Arc<Semaphore>,
}

/// A WebSocket connection's place in both connection budgets; given back when dropped.
pub struct ConnectionSlot {
    _global: OwnedSemaphorePermit,
    _per_ip: PerIpSlot,
}

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
            connections: Arc::new(Semaphore::new(config.session.max_connections)),
            connections_per_ip: PerIp::new(config.session.max_connections_per_ip),
            requests_per_ip: PerIp::new(config.ingest.max_requests_per_ip),
            body_bytes: Arc::new(Semaphore::new(config.ingest.max_inflight_bytes)),
        }
    }

    /// A place for one more WebSocket connection from `ip`, or which budget is full.
    pub fn connection(&self, ip: IpAddr) -> Result<ConnectionSlot, ConnectionsFull> {
        let global = Arc::clone(&self.connections)
            .try_acquire_owned()
            .map_err(|_| ConnectionsFull::Global)?;
        let per_ip = self
            .connections_per_ip
            .acquire(ip)
            .ok_or(ConnectionsFull::PerIp)?;
        Ok(ConnectionSlot {
            _global: global,
            _per_ip: per_ip,
        })
    }

    /// A place for one more request from `ip` on the internal door (`ingest.max_requests_per_ip`).
    pub fn request(&self, ip: IpAddr) -> Option<PerIpSlot> {
        self.requests_per_ip.acquire(ip)
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
