//! A channel's history and what it weighs: the events kept for replay, their bytes, and the
//! store-wide count of history bytes they are part of (`history.max_bytes`).

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::fanout::StoredEvent;

/// What one event weighs in history besides its frame: the stored event, its `Arc` and its slot
/// (measured size, rounded up: 160), and the room before a frame made where its body was written
/// that its seq and epoch left unused (`protocol::server::Unsequenced`: at most 19 bytes).
const OVERHEAD: usize = 160 + 19;

/// The bytes every channel's history in one store holds, and the events the store-wide budget
/// evicted.
#[derive(Debug, Default)]
pub struct HistoryBytes {
    used: AtomicUsize,
    evicted: AtomicU64,
    /// One thread evicts at a time; the others go on.
    evicting: AtomicBool,
}

impl HistoryBytes {
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    pub(super) fn count_evicted(&self, events: u64) {
        self.evicted.fetch_add(events, Ordering::Relaxed);
    }

    /// `true` for the one caller that may evict now; it calls [`Self::done_evicting`] after.
    pub(super) fn start_evicting(&self) -> bool {
        !self.evicting.swap(true, Ordering::Acquire)
    }

    pub(super) fn done_evicting(&self) {
        self.evicting.store(false, Ordering::Release);
    }
}

/// A channel's events kept for replay, oldest first, with their weight. Read through `Deref`;
/// changed only through [`Self::push_back`] and [`Self::pop_front`], which keep both counts.
#[derive(Debug)]
pub(super) struct History {
    events: VecDeque<Arc<StoredEvent>>,
    /// When the oldest event was emitted, kept here: the trim after every publish asks, and the
    /// oldest event is the one least likely to be in the caches.
    oldest_at: Option<Instant>,
    bytes: usize,
    store: Arc<HistoryBytes>,
}

fn weight(event: &StoredEvent) -> usize {
    event.frame.len() + OVERHEAD
}

impl History {
    pub(super) fn new(store: Arc<HistoryBytes>) -> Self {
        Self {
            events: VecDeque::new(),
            oldest_at: None,
            bytes: 0,
            store,
        }
    }

    pub(super) fn push_back(&mut self, event: Arc<StoredEvent>) {
        let weight = weight(&event);
        self.bytes += weight;
        self.store.used.fetch_add(weight, Ordering::Relaxed);
        self.oldest_at.get_or_insert(event.emitted_at);
        self.events.push_back(event);
    }

    pub(super) fn pop_front(&mut self) -> Option<Arc<StoredEvent>> {
        let event = self.events.pop_front()?;
        self.oldest_at = self.events.front().map(|next| next.emitted_at);
        let weight = weight(&event);
        self.bytes -= weight;
        self.store.used.fetch_sub(weight, Ordering::Relaxed);
        Some(event)
    }

    /// When its oldest event was emitted (`None` when it is empty).
    pub(super) fn oldest_at(&self) -> Option<Instant> {
        self.oldest_at
    }

    /// What this channel's history weighs.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Deref for History {
    type Target = VecDeque<Arc<StoredEvent>>;

    fn deref(&self) -> &Self::Target {
        &self.events
    }
}

/// A retired channel's history leaves the store's count with it.
impl Drop for History {
    fn drop(&mut self) {
        self.store.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}
