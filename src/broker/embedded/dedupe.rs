//! Event-id dedupe of the embedded broker: an `event_id` seen within `ingest.dedupe_window` makes a
//! producer's retry a duplicate (bounded by `ingest.dedupe_capacity`). The Redis broker dedupes
//! inside its publish script instead.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Remembers `event_id`s for the dedupe window, bounded in count.
pub struct Dedupe {
    window: Duration,
    capacity: usize,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    ids: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

impl Dedupe {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self {
            window,
            capacity,
            seen: Mutex::default(),
        }
    }

    /// `true` the first time an id is seen within the window.
    pub fn first_time(&self, event_id: &str) -> bool {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = seen.ids.get(event_id)
            && now.saturating_duration_since(*at) <= self.window
        {
            return false;
        }
        seen.ids.insert(event_id.to_string(), now);
        seen.order.push_back((event_id.to_string(), now));
        while seen.ids.len() > self.capacity {
            Self::forget_oldest(&mut seen);
        }
        true
    }

    /// Forgets one id (its event was lost, so a retry must go through).
    pub fn forget(&self, event_id: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ids
            .remove(event_id);
    }

    /// Forgets ids older than the window.
    pub fn expire(&self) {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        while seen
            .order
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) > self.window)
        {
            Self::forget_oldest(&mut seen);
        }
    }

    fn forget_oldest(seen: &mut Seen) {
        if let Some((id, at)) = seen.order.pop_front()
            && seen.ids.get(&id) == Some(&at)
        {
            seen.ids.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedupe_forgets_after_the_window() {
        let dedupe = Dedupe::new(Duration::from_secs(60), 2);
        assert!(dedupe.first_time("a"));
        assert!(!dedupe.first_time("a"));
        assert!(dedupe.first_time("b"));
        assert!(dedupe.first_time("c"));
        assert!(dedupe.first_time("a"), "capacity pushed the oldest out");
    }
}
