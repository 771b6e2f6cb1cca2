//! Event-id dedupe of the embedded broker: an `event_id` seen within `ingest.dedupe_window` makes a
//! producer's retry a duplicate (bounded by `ingest.dedupe_capacity`). The Redis broker dedupes
//! inside its publish script instead.
//!
//! The ids are spread over shards, each with its own lock and its share of the capacity, so that
//! publishes on different threads do not wait for one lock; an id is hashed once, keyed, for its
//! shard and its place there (`crate::hashed`), so a producer cannot aim its ids at one shard to
//! push another's out early.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashbrown::{HashTable, hash_table};

use crate::hashed::{Hashed, KeyHasher};

/// Shards at most (fewer when the capacity is smaller, so that each holds at least one id).
const SHARDS: usize = 16;

/// Remembers `event_id`s for the dedupe window, bounded in count.
pub struct Dedupe {
    window: Duration,
    /// Each shard's bound: the capacity spread evenly, so the whole stays within it.
    per_shard: usize,
    shards: Box<[Mutex<Seen>]>,
    keys: KeyHasher,
}

/// One shard: its ids, and the same ids in the order they were first seen (one allocation each),
/// each with its hash and when it was seen.
#[derive(Default)]
struct Seen {
    ids: HashTable<Entry>,
    order: VecDeque<Entry>,
}

type Entry = (u64, Arc<str>, Instant);

impl Seen {
    /// Forgets `id` if it is the one seen at `at` (`None`: whenever it was seen).
    fn remove(&mut self, hash: u64, id: &str, at: Option<Instant>) {
        let same = |(_, seen, when): &Entry| **seen == *id && at.is_none_or(|at| *when == at);
        if let Ok(entry) = self.ids.find_entry(hash, same) {
            entry.remove();
        }
    }
}

impl Dedupe {
    pub fn new(window: Duration, capacity: usize) -> Self {
        let shards = SHARDS.min(capacity).max(1);
        Self {
            window,
            per_shard: (capacity / shards).max(1),
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            keys: KeyHasher::default(),
        }
    }

    /// The shard of an id, locked, and the id hashed once for the shard and its table.
    fn shard<'a>(&'a self, event_id: &'a str) -> (MutexGuard<'a, Seen>, Hashed<'a>) {
        let id = self.keys.hash(event_id);
        let seen = self.shards[id.shard(self.shards.len())]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (seen, id)
    }

    /// `true` the first time an id is seen within the window.
    pub fn first_time(&self, event_id: &str) -> bool {
        let now = Instant::now();
        let (mut seen, id) = self.shard(event_id);
        // One probe: seen within the window, seen before it (seen again now), or new. An id seen
        // again takes a new place in `order`; its old place no longer matches its time, so
        // reaching it forgets nothing.
        let entry = || -> Entry { (id.hash, id.key.into(), now) };
        let entry = match seen
            .ids
            .entry(id.hash, |(_, seen, _)| **seen == *id.key, |(h, ..)| *h)
        {
            hash_table::Entry::Occupied(found)
                if now.saturating_duration_since(found.get().2) <= self.window =>
            {
                return false;
            }
            hash_table::Entry::Occupied(mut found) => {
                *found.get_mut() = entry();
                found.get().clone()
            }
            hash_table::Entry::Vacant(place) => place.insert(entry()).get().clone(),
        };
        seen.order.push_back(entry);
        while seen.ids.len() > self.per_shard {
            Self::forget_oldest(&mut seen);
        }
        true
    }

    /// Forgets one id (its event was lost, so a retry must go through).
    pub fn forget(&self, event_id: &str) {
        let (mut seen, id) = self.shard(event_id);
        seen.remove(id.hash, id.key, None);
    }

    /// Forgets ids older than the window.
    pub fn expire(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            let mut seen = shard.lock().unwrap_or_else(|e| e.into_inner());
            while seen
                .order
                .front()
                .is_some_and(|(_, _, at)| now.saturating_duration_since(*at) > self.window)
            {
                Self::forget_oldest(&mut seen);
            }
        }
    }

    fn forget_oldest(seen: &mut Seen) {
        if let Some((hash, id, at)) = seen.order.pop_front() {
            seen.remove(hash, &id, Some(at));
        }
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap().ids.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_is_a_duplicate_and_capacity_pushes_the_oldest_out() {
        let dedupe = Dedupe::new(Duration::from_secs(60), 2);
        assert!(dedupe.first_time("a"));
        assert!(!dedupe.first_time("a"));
        // Two shards of one id: of the many ids after "a", some land on its shard.
        for n in 0..64 {
            dedupe.first_time(&format!("id-{n}"));
        }
        assert!(dedupe.first_time("a"), "capacity pushed the oldest out");
        assert!(dedupe.remembered() <= 2);
    }

    #[test]
    fn the_whole_stays_within_the_capacity() {
        for capacity in [1, 15, 16, 17, 1000] {
            let dedupe = Dedupe::new(Duration::from_secs(60), capacity);
            for n in 0..10 * capacity {
                assert!(dedupe.first_time(&format!("id-{n}")));
            }
            assert!(dedupe.remembered() <= capacity, "{capacity}");
            let last = format!("id-{}", 10 * capacity - 1);
            assert!(!dedupe.first_time(&last), "the newest id is remembered");
        }
    }

    #[test]
    fn forgotten_and_expired_ids_go_through_again() {
        let dedupe = Dedupe::new(Duration::from_millis(1), 100);
        assert!(dedupe.first_time("a"));
        dedupe.forget("a");
        assert!(dedupe.first_time("a"));
        std::thread::sleep(Duration::from_millis(5));
        dedupe.expire();
        assert_eq!(dedupe.remembered(), 0);
        assert!(dedupe.first_time("a"));
    }
}
