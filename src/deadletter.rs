//! Dead letters: valid events that found no channel within `resolve.grace`, kept (bounded) with
//! the reason and time so an operator can see them and, once the missing runs are registered,
//! redrive them. This is the embedded broker's store; in Redis mode dead letters live in the
//! shared `aw:deadletters` stream (see `broker::redis`), and only the once-per-run counting is here.
//!
//! Accounting: `agentwire_events_lost_total{reason="unresolved"}` counts every event that was ever
//! dead-lettered and never goes down; a redrive that resolves a dead letter counts it in
//! `agentwire_events_redriven_total` and emits it (or, when its `event_id` was accepted meanwhile,
//! drops it and counts it as a duplicate too). Events lost unresolved right now are therefore
//! `lost{unresolved} - redriven`, and
//! `ingested + generated + redriven = emitted + pending_resolution + lost{unresolved} + duplicates`
//! holds at all times (a redriven event is in `emitted` and in `lost{unresolved}` once each).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;

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

/// A dead letter's id: a counter in this process, or the entry id of the shared Redis stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum LetterId {
    Local(u64),
    Stream(String),
}

/// One dead-lettered event.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: LetterId,
    /// Redis mode: the id that makes a second publish of this letter a duplicate (its first stream
    /// id, kept when a failed redrive puts it back).
    pub origin: Option<String>,
    pub run_id: String,
    pub reason: String,
    pub lost_at: SystemTime,
    pub event: Event,
}

impl Entry {
    pub fn report(&self) -> EntryReport {
        EntryReport {
            id: self.id.clone(),
            run_id: self.run_id.clone(),
            kind: self.event.kind.as_str(),
            event_id: self.event.event_id.clone(),
            reason: self.reason.clone(),
            lost_at: humantime::format_rfc3339_millis(self.lost_at).to_string(),
            event: self.event.to_json(),
        }
    }
}

/// An entry as `GET /v1/deadletter` lists it.
#[derive(Debug, Serialize)]
pub struct EntryReport {
    pub id: LetterId,
    pub run_id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub event_id: Option<String>,
    pub reason: String,
    pub lost_at: String,
    pub event: serde_json::Value,
}

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

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
