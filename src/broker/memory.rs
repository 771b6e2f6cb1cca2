//! The embedded broker: every channel lives in this process's memory. Channels are spread over
//! shards so that looking one up takes no global lock; each channel has its own small lock, held
//! only for sequencing, appending to history and queueing to subscribers (never for I/O).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;

use super::{AckError, Published, Sequenced, Snapshot};
use crate::config::HistoryConfig;
use crate::fanout::{Feed, Outbox, Outgoing, StoredEvent, Subscribers};
use crate::ledger::{
    ChannelLedger, ChannelReport, ChannelSummary, Counts, EventState, LostReason, LostReport,
    Ranked, Totals,
};
use crate::protocol::client::Since;
use crate::protocol::event::Event;
use crate::protocol::server::{self, Subscribed};
use crate::protocol::{ChannelKind, ChannelName};

const SHARDS: usize = 32;

pub struct MemoryBroker {
    shards: Box<[Mutex<Shard>]>,
    history: HistoryConfig,
}

#[derive(Default)]
struct Shard {
    channels: HashMap<ChannelName, Arc<Channel>>,
    /// Counts of channels removed by [`MemoryBroker::sweep`], so totals never go down.
    retired: Counts,
}

struct Channel {
    name: ChannelName,
    epoch: Arc<str>,
    ledger: Arc<ChannelLedger>,
    /// Redis mode: where this replica's deliveries are reported.
    feed: Option<Arc<Feed>>,
    state: Mutex<ChannelState>,
}

struct ChannelState {
    last_seq: u64,
    acked_seq: u64,
    history: VecDeque<Arc<StoredEvent>>,
    subscribers: Subscribers,
    last_activity: Instant,
    /// Set when the sweep removed the channel; a caller holding it looks it up again.
    retired: bool,
    /// Redis mode: the channel's history is being read; live events wait here until it is.
    loading: Option<Vec<(Arc<str>, Sequenced)>>,
}

impl Channel {
    fn new(name: ChannelName) -> Self {
        Self::with_epoch(name, new_epoch().into(), None)
    }

    fn with_epoch(name: ChannelName, epoch: Arc<str>, feed: Option<Arc<Feed>>) -> Self {
        Self {
            name,
            epoch,
            ledger: Arc::default(),
            feed,
            state: Mutex::new(ChannelState {
                last_seq: 0,
                acked_seq: 0,
                history: VecDeque::new(),
                subscribers: Subscribers::default(),
                last_activity: Instant::now(),
                retired: false,
                loading: None,
            }),
        }
    }

    fn store(
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
        })
    }

    /// Appends an event sequenced in Redis: history, trim, fan-out (the mirror's publish).
    fn append(&self, state: &mut ChannelState, event: &Sequenced, history: &HistoryConfig) {
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
        state.last_activity = Instant::now();
        self.trim(state, history.max_events, history.max_age, Instant::now())
            .log(&self.name);
        if !state.subscribers.is_empty() {
            stored.offer();
            state.subscribers.fan_out(&stored);
        }
    }

    fn lock(&self) -> MutexGuard<'_, ChannelState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops history entries past the count limit or older than `max_age`; undelivered ones are
    /// lost, `expired_subscribed` if they had been queued to a subscriber, else `expired_unseen`.
    /// Returns what was lost, to be logged once the locks are released.
    fn trim(
        &self,
        state: &mut ChannelState,
        max_events: usize,
        max_age: Duration,
        now: Instant,
    ) -> Trimmed {
        let mut trimmed = Trimmed::default();
        while let Some(front) = state.history.front() {
            let too_many = state.history.len() > max_events;
            let too_old = now.saturating_duration_since(front.emitted_at) > max_age;
            if !too_many && !too_old {
                break;
            }
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
            state.history.pop_front();
        }
        trimmed
    }

    /// The oldest event queued to a subscriber and still not written to any socket: a stuck
    /// delivery, unlike an unwatched thread's pending events.
    fn oldest_offered_pending_age(state: &ChannelState, now: Instant) -> Option<Duration> {
        state
            .history
            .iter()
            .find(|event| event.state.is_pending() && event.was_offered())
            .map(|event| now.saturating_duration_since(event.emitted_at))
    }

    fn oldest_pending_age(state: &ChannelState, now: Instant) -> Option<Duration> {
        state
            .history
            .iter()
            .find(|event| event.state.is_pending())
            .map(|event| now.saturating_duration_since(event.emitted_at))
    }
}

/// Undelivered events a trim dropped.
#[derive(Debug, Default)]
struct Trimmed {
    unseen: u64,
    subscribed: u64,
    last_seq: u64,
}

impl Trimmed {
    fn log(&self, channel: &ChannelName) {
        if self.subscribed > 0 {
            tracing::warn!(%channel, lost = self.subscribed, up_to_seq = self.last_seq, reason = "expired_subscribed", "Events left history undelivered while queued to a subscriber.");
        }
        if self.unseen > 0 {
            tracing::debug!(%channel, lost = self.unseen, up_to_seq = self.last_seq, reason = "expired_unseen", "Events left history with nobody watching.");
        }
    }
}

fn new_epoch() -> String {
    let value: u64 = rand::rng().random();
    format!("{value:016x}")
}

impl MemoryBroker {
    pub fn new(history: HistoryConfig) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        Self { shards, history }
    }

    fn shard(&self, name: &ChannelName) -> MutexGuard<'_, Shard> {
        let mut hasher = DefaultHasher::new();
        name.hash(&mut hasher);
        let index = (hasher.finish() as usize) % SHARDS;
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn channel(&self, name: &ChannelName) -> Arc<Channel> {
        let mut shard = self.shard(name);
        Arc::clone(
            shard
                .channels
                .entry(name.clone())
                .or_insert_with(|| Arc::new(Channel::new(name.clone()))),
        )
    }

    fn existing(&self, name: &ChannelName) -> Option<Arc<Channel>> {
        self.shard(name).channels.get(name).cloned()
    }

    /// Runs `f` on a live (not retired) channel's locked state, creating the channel if needed.
    fn with_channel<T>(
        &self,
        name: &ChannelName,
        mut f: impl FnMut(&Channel, &mut ChannelState) -> T,
    ) -> T {
        loop {
            let channel = self.channel(name);
            let mut state = channel.lock();
            if !state.retired {
                return f(&channel, &mut state);
            }
        }
    }

    /// Sequences `event` into `channel`, stores it and queues it to every local subscriber.
    /// `trace` is given the seq and returns what delivery spans continue (tracing on only).
    pub fn publish(
        &self,
        name: &ChannelName,
        event: &Event,
        trace: impl Fn(u64) -> Option<Box<crate::telemetry::TraceInfo>>,
    ) -> Published {
        let produced_at = event
            .ts
            .as_deref()
            .filter(|ts| ts.ends_with('Z'))
            .and_then(|ts| humantime::parse_rfc3339_weak(ts).ok());
        // Serialise before taking the channel lock: only the seq is written under it.
        let body = server::event_body(event, name);
        loop {
            let channel = self.channel(name);
            let mut state = channel.lock();
            if state.retired {
                continue;
            }
            state.last_seq += 1;
            let seq = state.last_seq;
            let stored = channel.store(
                seq,
                server::event_frame(&body, seq, &channel.epoch),
                Instant::now(),
                produced_at,
                trace(seq),
            );
            channel.ledger.emitted();
            state.history.push_back(Arc::clone(&stored));
            state.last_activity = stored.emitted_at;
            let trimmed = channel.trim(
                &mut state,
                self.history.max_events,
                self.history.max_age,
                stored.emitted_at,
            );
            if !state.subscribers.is_empty() {
                stored.offer();
                state.subscribers.fan_out(&stored);
            }
            drop(state);
            trimmed.log(name);
            return Published {
                seq,
                epoch: Arc::clone(&channel.epoch),
            };
        }
    }

    /// Joins `outbox` to `channel`: under the channel lock it queues the `subscribed` frame and the
    /// replay, then registers for live events, so nothing falls between them and nothing comes twice.
    /// `None` when the connection is already subscribed.
    pub fn subscribe(
        &self,
        name: &ChannelName,
        since: Option<&Since>,
        outbox: &Arc<Outbox>,
    ) -> Option<Subscribed> {
        self.with_channel(name, |channel, state| {
            if state.subscribers.contains(outbox) {
                return None;
            }
            let first_retained = state.history.front().map_or(state.last_seq + 1, |e| e.seq);
            let (from, recovered, missed) = match since {
                None => (state.last_seq + 1, true, None),
                Some(since) if since.seq == 0 => {
                    let missed = first_retained - 1;
                    (1, missed == 0, Some(missed))
                }
                Some(since)
                    if since.epoch.as_deref() != Some(&*channel.epoch)
                        || since.seq > state.last_seq =>
                {
                    (1, false, None)
                }
                Some(since) => {
                    let missed = first_retained.saturating_sub(since.seq + 1);
                    (since.seq + 1, missed == 0, Some(missed))
                }
            };
            let replay: Vec<Arc<StoredEvent>> = state
                .history
                .iter()
                .filter(|e| e.seq >= from)
                .inspect(|e| e.offer())
                .cloned()
                .collect();
            let report = Subscribed {
                channel: channel.name.to_string(),
                thread_id: match channel.name.kind() {
                    ChannelKind::Thread => Some(channel.name.id().to_string()),
                    ChannelKind::User => None,
                },
                epoch: channel.epoch.to_string(),
                seq: state.last_seq,
                recovered,
                replayed: replay.len(),
                missed,
            };
            outbox.push(Outgoing::Frame(server::subscribed(&report)));
            if !replay.is_empty() {
                outbox.push(Outgoing::Replay(replay));
            }
            state.subscribers.add(outbox);
            state.last_activity = Instant::now();
            Some(report)
        })
    }

    /// `true` if the connection was subscribed.
    pub fn unsubscribe(&self, name: &ChannelName, outbox: &Arc<Outbox>) -> bool {
        let mut shard = self.shard(name);
        let Some(channel) = shard.channels.get(name).cloned() else {
            return false;
        };
        let mut state = channel.lock();
        state.last_activity = Instant::now();
        let removed = state.subscribers.remove(outbox);
        // A channel that never had an event is not kept once nobody watches it, so subscribing
        // to fresh ids cannot grow the map. A mirrored channel (Redis mode) is detached by the
        // Redis broker instead, when its last local subscription ends.
        if channel.feed.is_none()
            && state.subscribers.is_empty()
            && state.history.is_empty()
            && channel.ledger.snapshot().emitted == 0
        {
            state.retired = true;
            drop(state);
            shard.channels.remove(name);
        }
        removed
    }

    /// A cumulative ack: the client has shown everything up to `seq`.
    pub fn ack(&self, name: &ChannelName, seq: u64, outbox: &Arc<Outbox>) -> Result<u64, AckError> {
        let channel = self
            .existing(name)
            .ok_or_else(|| AckError::NotSubscribed(name.to_string()))?;
        let mut state = channel.lock();
        if !state.subscribers.contains(outbox) {
            return Err(AckError::NotSubscribed(name.to_string()));
        }
        if seq > state.last_seq {
            return Err(AckError::BeyondLast {
                seq,
                last: state.last_seq,
            });
        }
        let newly = seq.saturating_sub(state.acked_seq);
        if newly > 0 {
            state.acked_seq = seq;
            channel.ledger.acked(newly);
        }
        Ok(newly)
    }

    /// The ledger of one channel, `None` if the broker holds no such channel.
    pub fn report(&self, name: &ChannelName) -> Option<ChannelReport> {
        let channel = self.existing(name)?;
        let state = channel.lock();
        let counts = channel.ledger.snapshot();
        Some(ChannelReport {
            channel: channel.name.to_string(),
            epoch: channel.epoch.to_string(),
            last_seq: state.last_seq,
            first_retained_seq: state.history.front().map(|e| e.seq),
            retained: state.history.len(),
            subscribers: state.subscribers.len(),
            emitted: counts.emitted,
            delivered: counts.delivered,
            acked: counts.acked,
            pending: counts.pending,
            oldest_pending_age_seconds: Channel::oldest_pending_age(&state, Instant::now())
                .map(|a| a.as_secs_f64()),
            lost: LostReport::from_counts(&counts),
            lost_total: counts.lost_total(),
            balanced: counts.balanced(),
        })
    }

    /// Sums every channel's ledger; each channel's snapshot balances, so the sum does too.
    pub fn totals(&self) -> Totals {
        let now = Instant::now();
        let mut totals = Totals::default();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            totals.add(&shard.retired);
            for channel in shard.channels.values() {
                let counts = channel.ledger.snapshot();
                totals.add(&counts);
                totals.channels += 1;
                if counts.pending > 0 {
                    let state = channel.lock();
                    if let Some(age) = Channel::oldest_pending_age(&state, now) {
                        totals.oldest_pending_age = totals.oldest_pending_age.max(age);
                    }
                    if let Some(age) = Channel::oldest_offered_pending_age(&state, now) {
                        totals.oldest_offered_pending_age =
                            totals.oldest_offered_pending_age.max(age);
                    }
                }
            }
        }
        totals
    }

    /// The `n` channels with the most pending events and the `n` with the most lost ones.
    pub fn ranked(&self, n: usize) -> Ranked {
        let now = Instant::now();
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for channel in shard.channels.values() {
                let counts = channel.ledger.snapshot();
                if counts.pending == 0 && counts.lost_total() == 0 {
                    continue;
                }
                let state = channel.lock();
                all.push(ChannelSummary {
                    channel: channel.name.to_string(),
                    pending: counts.pending,
                    oldest_pending_age_seconds: Channel::oldest_pending_age(&state, now)
                        .map(|a| a.as_secs_f64()),
                    lost_total: counts.lost_total(),
                    lost: LostReport::from_counts(&counts),
                    subscribers: state.subscribers.len(),
                });
            }
        }
        Ranked::from_summaries(all, n)
    }

    /// Redis mode: starts mirroring a channel. Until [`Self::merge`] loads its history, live
    /// events are kept aside, so none falls between the pub/sub subscription and the history read.
    pub fn prepare(&self, name: &ChannelName, feed: &Arc<Feed>) {
        let mut shard = self.shard(name);
        shard.channels.entry(name.clone()).or_insert_with(|| {
            let channel = Channel::with_epoch(name.clone(), "".into(), Some(Arc::clone(feed)));
            channel.lock().loading = Some(Vec::new());
            Arc::new(channel)
        });
    }

    /// Redis mode: a live event from pub/sub. `false` when the mirror must read the stream again
    /// (a gap in seqs, or a new epoch) before it can go on.
    pub fn apply(&self, name: &ChannelName, epoch: &Arc<str>, event: Sequenced) -> bool {
        let Some(channel) = self.existing(name) else {
            return true;
        };
        let mut state = channel.lock();
        if let Some(early) = &mut state.loading {
            early.push((Arc::clone(epoch), event));
            return true;
        }
        if *epoch != channel.epoch {
            return false;
        }
        if event.seq <= state.last_seq {
            return true;
        }
        if event.seq > state.last_seq + 1 {
            return false;
        }
        channel.append(&mut state, &event, &self.history);
        true
    }

    /// Redis mode: where the mirror of `name` stands (epoch, last seq), to read the stream from.
    pub fn position(&self, name: &ChannelName) -> Option<(Arc<str>, u64)> {
        let channel = self.existing(name)?;
        let state = channel.lock();
        (state.loading.is_none()).then(|| (Arc::clone(&channel.epoch), state.last_seq))
    }

    /// Redis mode: brings the mirror up to `snapshot` (read from the stream). On a first load it
    /// takes the history and the live events kept aside; on a new epoch (Redis lost the channel)
    /// every local subscriber is told with a `subscribed` frame, `recovered: false`, and gets the
    /// new epoch's history; otherwise it appends what the mirror missed.
    pub fn merge(&self, name: &ChannelName, snapshot: Snapshot) {
        let mut shard = self.shard(name);
        let Some(channel) = shard.channels.get(name).cloned() else {
            return;
        };
        let mut state = channel.lock();
        if snapshot.epoch == channel.epoch && state.loading.is_none() {
            let gap = snapshot
                .events
                .first()
                .is_some_and(|first| first.seq > state.last_seq + 1);
            if gap {
                tracing::warn!(channel = %name, after = state.last_seq, "Events left Redis history before this replica read them.");
            }
            for event in &snapshot.events {
                if event.seq > state.last_seq {
                    channel.append(&mut state, event, &self.history);
                }
            }
            return;
        }
        let renewed = state.loading.is_none();
        let early = state.loading.take().unwrap_or_default();
        let feed = channel.feed.as_ref().map(|feed| {
            Arc::new(Feed {
                channel: name.clone(),
                epoch: Arc::clone(&snapshot.epoch),
                deliveries: feed.deliveries.clone(),
            })
        });
        let fresh = Arc::new(Channel::with_epoch(
            name.clone(),
            Arc::clone(&snapshot.epoch),
            feed,
        ));
        let mut fresh_state = fresh.lock();
        fresh_state.last_seq = snapshot
            .events
            .first()
            .map_or(snapshot.last_seq, |first| first.seq - 1);
        let outboxes = state.subscribers.take_all();
        for event in &snapshot.events {
            fresh.append(&mut fresh_state, event, &self.history);
        }
        for (epoch, event) in early {
            if epoch == fresh.epoch && event.seq == fresh_state.last_seq + 1 {
                fresh.append(&mut fresh_state, &event, &self.history);
            }
        }
        fresh_state.last_seq = fresh_state.last_seq.max(snapshot.last_seq);
        if renewed {
            tracing::warn!(channel = %name, old_epoch = %channel.epoch, epoch = %fresh.epoch, "Redis lost this channel's history: a new epoch starts.");
            let replay: Vec<Arc<StoredEvent>> = fresh_state.history.iter().cloned().collect();
            for event in &replay {
                event.offer();
            }
            let report = Subscribed {
                channel: name.to_string(),
                thread_id: match name.kind() {
                    ChannelKind::Thread => Some(name.id().to_string()),
                    ChannelKind::User => None,
                },
                epoch: fresh.epoch.to_string(),
                seq: fresh_state.last_seq,
                recovered: false,
                replayed: replay.len(),
                missed: None,
            };
            let frame = server::subscribed(&report);
            for outbox in &outboxes {
                outbox.push(Outgoing::Frame(frame.clone()));
                if !replay.is_empty() {
                    outbox.push(Outgoing::Replay(replay.clone()));
                }
            }
        }
        for outbox in &outboxes {
            fresh_state.subscribers.add(outbox);
        }
        drop(fresh_state);
        state.retired = true;
        drop(state);
        shard.channels.insert(name.clone(), fresh);
    }

    /// Redis mode: stops mirroring a channel nobody here watches any more.
    pub fn detach(&self, name: &ChannelName) {
        let mut shard = self.shard(name);
        if let Some(channel) = shard.channels.remove(name) {
            channel.lock().retired = true;
        }
    }

    /// Expires history by age and removes channels that have been empty and unwatched for
    /// `history.max_age` (a later resume there sees a new epoch: `recovered: false`).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut channels = 0;
        let mut dropped = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let mut retired = Counts::default();
            shard.channels.retain(|_, channel| {
                let mut state = channel.lock();
                let trimmed = channel.trim(
                    &mut state,
                    self.history.max_events,
                    self.history.max_age,
                    now,
                );
                if trimmed.unseen + trimmed.subscribed > 0 {
                    dropped.push((channel.name.clone(), trimmed));
                }
                let idle = channel.feed.is_none()
                    && state.history.is_empty()
                    && state.subscribers.is_empty()
                    && now.saturating_duration_since(state.last_activity) > self.history.max_age;
                if idle {
                    state.retired = true;
                    retired.add(&channel.ledger.snapshot());
                }
                !idle
            });
            shard.retired.add(&retired);
            channels += shard.channels.len();
        }
        for (channel, trimmed) in dropped {
            trimmed.log(&channel);
        }
        tracing::trace!(channels, "Swept channels.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::event;

    fn thinking(run: &str) -> Event {
        event::parse(
            &format!(r#"{{"type":"agent_thinking","run_id":"{run}"}}"#),
            1024,
        )
        .unwrap()
    }

    #[test]
    fn trims_by_count_and_counts_what_was_never_seen() {
        let broker = MemoryBroker::new(HistoryConfig {
            max_events: 2,
            max_age: Duration::from_secs(60),
        });
        let channel = ChannelName::thread("t1");
        for n in 1..=5 {
            assert_eq!(broker.publish(&channel, &thinking("r1"), |_| None).seq, n);
        }
        let report = broker.report(&channel).unwrap();
        assert_eq!(
            (report.emitted, report.pending, report.lost.expired_unseen),
            (5, 2, 3)
        );
        assert_eq!(report.first_retained_seq, Some(4));
        assert!(report.balanced);
    }
}
