//! The embedded broker's dead letters: kept in this process, bounded by `deadletter.capacity`
//! (the oldest go first), with the run ids already counted as unresolved.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::deadletter::{Entry, EntryReport, LetterId};
use crate::protocol::event::Event;

pub struct DeadLetters {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    entries: VecDeque<Entry>,
    /// Run ids already counted in `agentwire_unresolved_run_ids_total`, with when.
    counted: HashMap<String, SystemTime>,
}

/// A run id counted as unresolved is not counted again within this time.
const COUNT_ONCE_WITHIN: Duration = Duration::from_secs(3600);

impl DeadLetters {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps an event; returns how many are kept now. The oldest go when full.
    pub fn push(&self, run_id: &str, event: Event, reason: &'static str) -> usize {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.entries.push_back(Entry {
            id: LetterId::Local(id),
            origin: None,
            run_id: run_id.to_string(),
            reason: reason.to_string(),
            lost_at: SystemTime::now(),
            event,
        });
        while inner.entries.len() > self.capacity {
            inner.entries.pop_front();
        }
        inner.entries.len()
    }

    pub fn list(&self) -> Vec<EntryReport> {
        self.lock().entries.iter().map(Entry::report).collect()
    }

    /// Takes every entry out for a redrive; what is not rescued goes back with [`Self::restore`].
    pub fn take(&self) -> Vec<Entry> {
        self.lock().entries.drain(..).collect()
    }

    /// Puts entries back in front of any that arrived meanwhile, keeping their order.
    pub fn restore(&self, entries: Vec<Entry>) -> usize {
        let mut inner = self.lock();
        for entry in entries.into_iter().rev() {
            inner.entries.push_front(entry);
        }
        while inner.entries.len() > self.capacity {
            inner.entries.pop_front();
        }
        inner.entries.len()
    }

    /// `true` the first time (within an hour) a run id is dead-lettered.
    pub fn first_unresolved(&self, run_id: &str) -> bool {
        let now = SystemTime::now();
        let mut inner = self.lock();
        if inner.counted.len() >= self.capacity {
            inner
                .counted
                .retain(|_, at| now.duration_since(*at).unwrap_or_default() < COUNT_ONCE_WITHIN);
            if inner.counted.len() >= self.capacity {
                inner.counted.clear();
            }
        }
        match inner.counted.get(run_id) {
            Some(at) if now.duration_since(*at).unwrap_or_default() < COUNT_ONCE_WITHIN => false,
            _ => {
                inner.counted.insert(run_id.to_string(), now);
                true
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }
}
