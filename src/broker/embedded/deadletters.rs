//! The embedded broker's dead letters: kept in this process, packed, bounded by
//! `deadletter.capacity` and `deadletter.max_bytes` (the oldest go first, counted), with the run
//! ids already counted as unresolved.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::config::DeadletterConfig;
use crate::deadletter::{Entry, LetterId, Page};
use crate::protocol::packed::PackedEvent;

pub struct DeadLetters {
    config: DeadletterConfig,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Run ids already counted in `agentwire_unresolved_run_ids_total`, with when.
    counted: HashMap<String, SystemTime>,
}

impl Inner {
    /// Drops the oldest letters past either bound; returns how many.
    fn bound(&mut self, config: &DeadletterConfig) -> u64 {
        let mut dropped = 0;
        while self.entries.len() > config.capacity || self.bytes > config.max_bytes {
            let Some(entry) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= entry.event.weight();
            dropped += 1;
        }
        dropped
    }
}

/// A run id counted as unresolved is not counted again within this time.
const COUNT_ONCE_WITHIN: Duration = Duration::from_secs(3600);

impl DeadLetters {
    pub fn new(config: DeadletterConfig) -> Self {
        Self {
            config,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps an event; returns how many older letters it pushed out.
    pub fn push(&self, run_id: &str, event: PackedEvent, reason: &'static str) -> u64 {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.bytes += event.weight();
        inner.entries.push_back(Entry {
            id: LetterId::Local(id),
            origin: None,
            run_id: run_id.to_string(),
            reason: reason.to_string(),
            lost_at: SystemTime::now(),
            event,
        });
        inner.bound(&self.config)
    }

    /// Up to `limit` letters after the one with id `after`, oldest first. Only the page is copied
    /// under the lock; it is turned into JSON after.
    pub fn page(&self, after: Option<u64>, limit: usize) -> Page {
        let (entries, more, total) = {
            let inner = self.lock();
            let start = after.map_or(0, |after| {
                inner
                    .entries
                    .partition_point(|entry| matches!(entry.id, LetterId::Local(id) if id <= after))
            });
            let entries: Vec<Entry> = inner
                .entries
                .iter()
                .skip(start)
                .take(limit)
                .cloned()
                .collect();
            let total = inner.entries.len();
            (entries, start + limit < total, total)
        };
        Page {
            total,
            next: more.then(|| entries.last().map(|e| e.id.clone())).flatten(),
            events: entries.iter().map(Entry::report).collect(),
        }
    }

    /// Takes every entry out for a redrive; what is not rescued goes back with [`Self::restore`].
    pub fn take(&self) -> Vec<Entry> {
        let mut inner = self.lock();
        inner.bytes = 0;
        inner.entries.drain(..).collect()
    }

    /// Puts entries back in front of any that arrived meanwhile, keeping their order; returns how
    /// many letters the bounds then pushed out.
    pub fn restore(&self, entries: Vec<Entry>) -> u64 {
        let mut inner = self.lock();
        for entry in entries.into_iter().rev() {
            inner.bytes += entry.event.weight();
            inner.entries.push_front(entry);
        }
        inner.bound(&self.config)
    }

    /// `true` the first time (within an hour) a run id is dead-lettered.
    pub fn first_unresolved(&self, run_id: &str) -> bool {
        let now = SystemTime::now();
        let mut inner = self.lock();
        if inner.counted.len() >= self.config.capacity {
            inner
                .counted
                .retain(|_, at| now.duration_since(*at).unwrap_or_default() < COUNT_ONCE_WITHIN);
            if inner.counted.len() >= self.config.capacity {
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
