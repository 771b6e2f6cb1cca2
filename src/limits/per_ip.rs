//! How many of something each client address holds, and all addresses together, with caps.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Shards of the per-address counts. A one-event `POST` takes and gives back a place per event, so
/// addresses are spread over locks of their own (by the address's last byte: a client that picks
/// its addresses can at worst put them all in one shard, which is one lock, as before sharding).
const SHARDS: usize = 16;

/// Counts per address and in total; an address's entry exists only while it holds something.
/// Taken at a connection's or a request's start and given back at its end.
pub struct PerIp {
    /// Per address; 0: no cap.
    limit: usize,
    /// All addresses together.
    total_limit: usize,
    held: Arc<Held>,
}

struct Held {
    by_ip: [Mutex<HashMap<IpAddr, usize>>; SHARDS],
    total: AtomicUsize,
}

impl Held {
    fn shard(&self, ip: IpAddr) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        let last = match ip {
            IpAddr::V4(ip) => ip.octets()[3],
            IpAddr::V6(ip) => ip.octets()[15],
        };
        self.by_ip[usize::from(last) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// Which cap refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Total,
    Address,
}

/// One unit held by an address; given back when dropped.
pub struct PerIpSlot {
    held: Arc<Held>,
    /// `None` without a per-address cap: only the total counts it.
    ip: Option<IpAddr>,
}

impl PerIp {
    pub fn new(limit: usize, total_limit: usize) -> Self {
        Self {
            limit,
            total_limit,
            held: Arc::new(Held {
                by_ip: std::array::from_fn(|_| Mutex::default()),
                total: AtomicUsize::new(0),
            }),
        }
    }

    /// One more unit for `ip`, or which cap is reached (the total first).
    pub fn acquire(&self, ip: IpAddr) -> Result<PerIpSlot, Full> {
        let ip = ip.to_canonical();
        let total = &self.held.total;
        let room = |held: usize| (held < self.total_limit).then_some(held + 1);
        if total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, room)
            .is_err()
        {
            return Err(Full::Total);
        }
        // Without a per-address cap nothing reads an address's count: only the total is kept
        // (a one-event POST would otherwise hash its address twice for nothing).
        if self.limit == 0 {
            return Ok(PerIpSlot {
                held: Arc::clone(&self.held),
                ip: None,
            });
        }
        let mut shard = self.held.shard(ip);
        let count = shard.entry(ip).or_default();
        if *count >= self.limit {
            drop(shard);
            total.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Address);
        }
        *count += 1;
        drop(shard);
        Ok(PerIpSlot {
            held: Arc::clone(&self.held),
            ip: Some(ip),
        })
    }

    /// Addresses holding anything (for tests and diagnostics).
    pub fn addresses(&self) -> usize {
        (self.held.by_ip.iter())
            .map(|shard| shard.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

impl Drop for PerIpSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut shard = self.held.shard(ip);
            // One lookup: an address that gives back its last unit is removed through its entry.
            if let Entry::Occupied(mut count) = shard.entry(ip) {
                *count.get_mut() -= 1;
                if *count.get() == 0 {
                    count.remove();
                }
            }
        }
        self.held.total.fetch_sub(1, Ordering::AcqRel);
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
        let uncapped = PerIp::new(0, 2);
        let held = [uncapped.acquire(a).unwrap(), uncapped.acquire(a).unwrap()];
        assert_eq!(
            uncapped.acquire(b).err(),
            Some(Full::Total),
            "0 means no cap per address"
        );
        assert_eq!(uncapped.addresses(), 0, "and no address is tracked");
        drop(held);
        assert!(uncapped.acquire(b).is_ok(), "the total was given back");
    }

    #[test]
    fn threads_taking_and_giving_back_never_pass_the_caps_and_leave_nothing_behind() {
        let per_ip = PerIp::new(2, 4);
        let held = AtomicUsize::new(0);
        let by_ip: [AtomicUsize; 3] = Default::default();
        let most = AtomicUsize::new(0);
        let most_by_ip = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                let (per_ip, held, by_ip) = (&per_ip, &held, &by_ip);
                let (most, most_by_ip) = (&most, &most_by_ip);
                scope.spawn(move || {
                    for n in 0..2_000u32 {
                        let which = (u32::from(t) + n) as usize % 3;
                        let ip = IpAddr::from([10, 0, 0, which as u8]);
                        if let Ok(slot) = per_ip.acquire(ip) {
                            most.fetch_max(
                                held.fetch_add(1, Ordering::AcqRel) + 1,
                                Ordering::AcqRel,
                            );
                            let mine = by_ip[which].fetch_add(1, Ordering::AcqRel) + 1;
                            most_by_ip.fetch_max(mine, Ordering::AcqRel);
                            std::thread::yield_now();
                            by_ip[which].fetch_sub(1, Ordering::AcqRel);
                            held.fetch_sub(1, Ordering::AcqRel);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert!(most.load(Ordering::Acquire) <= 4, "the total cap held");
        assert!(
            most_by_ip.load(Ordering::Acquire) <= 2,
            "each address's cap held"
        );
        assert_eq!(per_ip.addresses(), 0);
        let slots: Vec<_> = (0..4u8)
            .map(|n| per_ip.acquire(IpAddr::from([10, 0, 0, n])).unwrap())
            .collect();
        assert_eq!(
            per_ip.acquire(IpAddr::from([10, 0, 1, 1])).err(),
            Some(Full::Total),
            "every place was given back, and all of them can be taken again"
        );
        drop(slots);
    }
}
