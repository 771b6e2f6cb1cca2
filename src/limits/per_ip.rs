//! How many of something each client address holds, with a cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts per address; an address's entry exists only while it holds something. Taken on a
/// connection's or request's start and end only, never per event.
pub struct PerIp {
    /// 0: no cap.
    limit: usize,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One unit held by an address; given back when dropped.
pub struct PerIpSlot {
    ip: IpAddr,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIp {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            held: Arc::default(),
        }
    }

    /// One more unit for `ip`; `None` when it already holds `limit`.
    pub fn acquire(&self, ip: IpAddr) -> Option<PerIpSlot> {
        let ip = ip.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(ip).or_default();
        if self.limit != 0 && *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(PerIpSlot {
            ip,
            held: Arc::clone(&self.held),
        })
    }

    /// Addresses holding anything (for tests and diagnostics).
    pub fn addresses(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_address_and_forgets_it_when_it_holds_nothing() {
        let per_ip = PerIp::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let first = per_ip.acquire(a).unwrap();
        let _second = per_ip.acquire(a).unwrap();
        assert!(per_ip.acquire(a).is_none());
        assert!(per_ip.acquire(b).is_some());
        drop(first);
        let _third = per_ip.acquire(a).unwrap();
        drop(_third);
        drop(_second);
        assert_eq!(per_ip.addresses(), 0);
        assert!(PerIp::new(0).acquire(a).is_some(), "0 means no cap");
    }
}
