//! How many of something each client address holds, and all addresses together, with caps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts per address and in total; an address's entry exists only while it holds something.
/// Taken on a connection's or request's start and end only, never per event.
pub struct PerIp {
    /// Per address; 0: no cap.
    limit: usize,
    /// All addresses together.
    total_limit: usize,
    held: Arc<Mutex<Held>>,
}

#[derive(Default)]
struct Held {
    by_ip: HashMap<IpAddr, usize>,
    total: usize,
}

/// Which cap refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    Address,
}

/// One unit held by an address; given back when dropped.
pub struct PerIpSlot {
    held: Arc<Mutex<Held>>,
    ip: IpAddr,
}

impl PerIp {
    pub fn new(limit: usize, total_limit: usize) -> Self {
        Self {
            limit,
            total_limit,
            held: Arc::default(),
        }
    }

    /// One more unit for `ip`, or which cap is reached.
    pub fn acquire(&self, ip: IpAddr) -> Result<PerIpSlot, Full> {
        let ip = ip.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.total >= self.total_limit {
            return Err(Full::Total);
        }
        let count = held.by_ip.entry(ip).or_default();
        if self.limit != 0 && *count >= self.limit {
            return Err(Full::Address);
        }
        *count += 1;
        held.total += 1;
        Ok(PerIpSlot {
            held: Arc::clone(&self.held),
            ip,
        })
    }

    /// Addresses holding anything (for tests and diagnostics).
    pub fn addresses(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_ip
            .len()
    }
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.total -= 1;
        if let Some(count) = held.by_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.by_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_address_and_all_together_and_forgets_an_address_that_holds_nothing() {
        let per_ip = PerIp::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let first = per_ip.acquire(a).unwrap();
        let second = per_ip.acquire(a).unwrap();
        assert_eq!(per_ip.acquire(a).err(), Some(Full::Address));
        let third = per_ip.acquire(b).unwrap();
        assert_eq!(per_ip.acquire(b).err(), Some(Full::Total));
        drop(first);
        let fourth = per_ip.acquire(a).unwrap();
        drop((second, third, fourth));
        assert_eq!(per_ip.addresses(), 0);
        assert!(
            PerIp::new(0, usize::MAX).acquire(a).is_ok(),
            "0 means no cap"
        );
    }
}
