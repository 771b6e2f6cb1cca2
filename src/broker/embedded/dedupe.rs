//! Event-id dedupe of the embedded broker: an `event_id` seen within `ingest.dedupe_window` makes a
//! producer's retry a duplicate (bounded by `ingest.dedupe_capacity`). The Redis broker dedupes
//! inside its publish script instead.
//!
//! The ids are spread over shards, each with its own lock and its share of the capacity, so that
//! publishes on different threads do not wait for one lock; the shard is chosen by a keyed hash,
//! so a producer cannot aim its ids at one shard to push another's out early.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Shards at most (fewer when the capacity is smaller, so that each holds at least one id).
const SHARDS: usize = 16;

/// Remembers `event_id`s for the dedupe window, bounded in count.
pub struct Dedupe {
    window: Duration,
    /// Each shard's bound: the capacity spread evenly, so the whole stays within it.
    per_shard: usize,
    shards: Box<[Mutex<Seen>]>,
    keys: RandomState,
}

/// One shard: its ids, and the same ids in the order they were first seen (one allocation each).
#[derive(Default)]
struct Seen {
    ids: HashMap<Arc<str>, Instant>,
    order: VecDeque<(Arc<str>, Instant)>,
}

impl Dedupe {
    pub fn new(window: Duration, capacity: usize) -> Self {
        let shards = SHARDS.min(capacity).max(1);
        Self {
            window,
            per_shard: (capacity / shards).max(1),
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            keys: RandomState::new(),
        }
    }

    fn shard(&self, event_id: &str) -> MutexGuard<'_, Seen> {
        let at = self.keys.hash_one(event_id) as usize % self.shards.len();
        self.shards[at].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `true` the first time an id is seen within the window.
    pub fn first_time(&self, event_id: &str) -> bool {
        let now = Instant::now();
        let mut seen = self.shard(event_id);
        if let Some(at) = seen.ids.get(event_id)
            && now.saturating_duration_since(*at) <= self.window
        {
            return false;
        }
        let id: Arc<str> = event_id.into();
        seen.ids.insert(Arc::clone(&id), now);
        seen.order.push_back((id, now));
        while seen.ids.len() > self.per_shard {
            Self::forget_oldest(&mut seen);
        }
        true
    }

    /// Forgets one id (its event was lost, so a retry must go through).
    pub fn forget(&self, event_id: &str) {
        self.shard(event_id).ids.remove(event_id);
    }

    /// Forgets ids older than the window.
    pub fn expire(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            let mut seen = shard.lock().unwrap_or_else(|e| e.into_inner());
            while seen
                .order
                .front()
                .is_some_and(|(_, at)| now.saturating_duration_since(*at) > self.window)
            {
                Self::forget_oldest(&mut seen);
            }
        }
    }

    fn forget_oldest(seen: &mut Seen) {
        if let Some((id, at)) = seen.order.pop_front()
            && seen.ids.get(&id) == Some(&at)
        {
            seen.ids.remove(&id);
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
