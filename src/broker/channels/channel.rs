//! One channel: its epoch, ledger and locked state (last seq, history, subscribers), storing and
//! trimming events under that lock.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::history::{History, HistoryBytes};
use crate::broker::Sequenced;
use crate::config::HistoryConfig;
use crate::fanout::{Feed, StoredEvent, Subscribers};
use crate::ledger::{ChannelLedger, EventState, LostReason};
use crate::protocol::ChannelName;
use crate::protocol::server;

pub(super) struct Channel {
    pub(super) name: ChannelName,
    pub(super) epoch: Arc<str>,
    pub(super) ledger: Arc<ChannelLedger>,
    /// Redis mode: where this replica's deliveries are reported.
    pub(super) feed: Option<Arc<Feed>>,
    pub(super) state: Mutex<ChannelState>,
}

pub(super) struct ChannelState {
    pub(super) last_seq: u64,
    pub(super) acked_seq: u64,
    pub(super) history: History,
    pub(super) subscribers: Subscribers,
    pub(super) last_activity: Instant,
    /// Set when the sweep removed the channel; a caller holding it looks it up again.
    pub(super) retired: bool,
    /// Redis mode: the channel's history is being read; live events wait here until it is.
    pub(super) loading: Option<Vec<(Arc<str>, Sequenced)>>,
}

impl Channel {
    pub(super) fn new(name: ChannelName, bytes: &Arc<HistoryBytes>) -> Self {
        Self::with_epoch(name, new_epoch().into(), None, bytes)
    }

    pub(super) fn with_epoch(
        name: ChannelName,
        epoch: Arc<str>,
        feed: Option<Arc<Feed>>,
        bytes: &Arc<HistoryBytes>,
    ) -> Self {
        Self {
            name,
            epoch,
            ledger: Arc::default(),
            feed,
            state: Mutex::new(ChannelState {
                last_seq: 0,
                acked_seq: 0,
                history: History::new(Arc::clone(bytes)),
                subscribers: Subscribers::default(),
                last_activity: Instant::now(),
                retired: false,
                loading: None,
            }),
        }
    }

    pub(super) fn store(
        &self,
        seq: u64,
        frame: bytes::Bytes,
        emitted_at: Instant,
        produced_at: Option<std::time::SystemTime>,
        trace: Option<Box<crate::telemetry::TraceInfo>>,
    ) -> Arc<StoredEvent> {
        Arc::new(StoredEvent {
            seq,
            frame,
            emitted_at,
            produced_at,
            trace,
            state: EventState::default(),
            ledger: Arc::clone(&self.ledger),
            feed: self.feed.clone(),
            offered: Default::default(),
            agui: Default::default(),
        })
    }

    /// Appends an event sequenced in Redis: history, trim, fan-out (the mirror's publish).
    pub(super) fn append(
        &self,
        state: &mut ChannelState,
        event: &Sequenced,
        history: &HistoryConfig,
    ) {
        let stored = self.store(
            event.seq,
            server::event_frame(&event.body, event.seq, &self.epoch),
            event.emitted_at(),
            event.produced_at(),
            None,
        );
        self.ledger.emitted();
        state.last_seq = event.seq;
        state.history.push_back(Arc::clone(&stored));
        let now = Instant::now();
        state.last_activity = now;
        self.trim(state, history, now).log(&self.name);
        if !state.subscribers.is_empty() {
            stored.offer();
            state.subscribers.fan_out(&stored);
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, ChannelState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops history entries past the count or byte limit or older than `max_age`; undelivered
    /// ones are lost, `expired_subscribed` if they had been queued to a subscriber, else
    /// `expired_unseen`. Returns what was lost, to be logged once the locks are released.
    pub(super) fn trim(
        &self,
        state: &mut ChannelState,
        history: &HistoryConfig,
        now: Instant,
    ) -> Trimmed {
        let mut trimmed = Trimmed::default();
        while let Some(oldest_at) = state.history.oldest_at() {
            let too_many = state.history.len() > history.max_events;
            let too_heavy = state.history.bytes() > history.max_bytes_per_channel;
            let too_old = now.saturating_duration_since(oldest_at) > history.max_age;
            if !too_many && !too_heavy && !too_old {
                break;
            }
            self.drop_oldest(state, &mut trimmed);
        }
        trimmed
    }

    /// Drops the oldest history entry, counting it lost if it was never delivered.
    pub(super) fn drop_oldest(&self, state: &mut ChannelState, trimmed: &mut Trimmed) {
        let Some(front) = state.history.pop_front() else {
            return;
        };
        let reason = if front.was_offered() {
            LostReason::ExpiredSubscribed
        } else {
            LostReason::ExpiredUnseen
        };
        if front.state.lose(&self.ledger, reason) {
            match reason {
                LostReason::ExpiredSubscribed => trimmed.subscribed += 1,
                _ => trimmed.unseen += 1,
            }
            trimmed.last_seq = front.seq;
        }
    }

    /// The oldest event queued to a subscriber and still not written to any socket: a stuck
    /// delivery, unlike an unwatched thread's pending events.
    pub(super) fn oldest_offered_pending_age(
        state: &ChannelState,
        now: Instant,
    ) -> Option<Duration> {
        state
            .history
            .iter()
            .find(|event| event.state.is_pending() && event.was_offered())
            .map(|event| now.saturating_duration_since(event.emitted_at))
    }

    pub(super) fn oldest_pending_age(state: &ChannelState, now: Instant) -> Option<Duration> {
        state
            .history
            .iter()
            .find(|event| event.state.is_pending())
            .map(|event| now.saturating_duration_since(event.emitted_at))
    }
}

/// Undelivered events a trim dropped.
#[derive(Debug, Default)]
pub(super) struct Trimmed {
    pub(super) unseen: u64,
    pub(super) subscribed: u64,
    pub(super) last_seq: u64,
}

impl Trimmed {
    pub(super) fn log(&self, channel: &ChannelName) {
        if self.subscribed > 0 {
            tracing::warn!(%channel, lost = self.subscribed, up_to_seq = self.last_seq, reason = "expired_subscribed", "Events left history undelivered while queued to a subscriber.");
        }
        if self.unseen > 0 {
            tracing::debug!(%channel, lost = self.unseen, up_to_seq = self.last_seq, reason = "expired_unseen", "Events left history with nobody watching.");
        }
    }
}

/// A random epoch: 16 lower-case hex digits. Made for every publish call in Redis mode, so written
/// digit by digit rather than through `format!`'s machinery (about a thousand instructions).
pub(crate) fn new_epoch() -> String {
    let n: u64 = rand::random();
    (0..16)
        .rev()
        .map(|digit| char::from(b"0123456789abcdef"[(n >> (4 * digit) & 0xf) as usize]))
        .collect()
}
