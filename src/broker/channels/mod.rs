//! The embedded broker: every channel lives in this process's memory. Channels are spread over
//! shards so that looking one up takes no global lock; each channel has its own small lock, held
//! only for sequencing, appending to history and queueing to subscribers (never for I/O).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub(crate) use channel::new_epoch;
use channel::{Channel, ChannelState, Trimmed};
use history::HistoryBytes;

use super::{AckError, Published};
use crate::config::HistoryConfig;
use crate::fanout::{Outbox, Outgoing, StoredEvent};
use crate::hashed::{Hashed, KeyHasher};
use crate::ledger::Counts;
use crate::protocol::client::Since;
use crate::protocol::event::Event;
use crate::protocol::server::{self, Subscribed};
use crate::protocol::{ChannelKind, ChannelName};
use crate::telemetry::Throttle;

mod channel;
mod history;
mod mirror;
mod report;

const SHARDS: usize = 32;

pub struct Channels {
    shards: Box<[Mutex<Shard>]>,
    names: KeyHasher,
    history: HistoryConfig,
    /// What every channel's history weighs together (`history.max_bytes`).
    bytes: Arc<HistoryBytes>,
}

#[derive(Default)]
struct Shard {
    /// Each channel with the hash of its name.
    channels: hashbrown::HashTable<(u64, Arc<Channel>)>,
    /// Counts of channels removed by [`Channels::sweep`], so totals never go down.
    retired: Counts,
}

impl Shard {
    fn channels(&self) -> impl Iterator<Item = &Arc<Channel>> {
        self.channels.iter().map(|(_, channel)| channel)
    }
}

/// The locked shard of one channel name, hashed once for the shard and its table.
struct Slot<'a> {
    shard: MutexGuard<'a, Shard>,
    name: Hashed<'a>,
}

impl Slot<'_> {
    fn get(&self) -> Option<&Arc<Channel>> {
        let name = self.name;
        (self.shard.channels)
            .find(name.hash, named(name))
            .map(|(_, channel)| channel)
    }

    fn get_or_insert_with(&mut self, make: impl FnOnce() -> Channel) -> &Arc<Channel> {
        let hash = self.name.hash;
        &(self.entry().or_insert_with(|| (hash, Arc::new(make()))))
            .into_mut()
            .1
    }

    /// Puts `channel` in the place of the channel of this name, if there is one.
    fn insert(&mut self, channel: Arc<Channel>) {
        let hash = self.name.hash;
        self.entry().insert((hash, channel));
    }

    fn remove(&mut self) -> Option<Arc<Channel>> {
        let name = self.name;
        let found = (self.shard.channels)
            .find_entry(name.hash, named(name))
            .ok()?;
        Some(found.remove().0.1)
    }

    fn entry(&mut self) -> hashbrown::hash_table::Entry<'_, (u64, Arc<Channel>)> {
        let name = self.name;
        (self.shard.channels).entry(name.hash, named(name), |(hash, _)| *hash)
    }
}

/// Whether a shard's entry is the channel of `name`.
fn named(name: Hashed<'_>) -> impl Fn(&(u64, Arc<Channel>)) -> bool + '_ {
    move |(_, channel)| channel.name.as_str() == name.key
}

impl Channels {
    pub fn new(history: HistoryConfig) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        Self {
            shards,
            names: KeyHasher::default(),
            history,
            bytes: Arc::default(),
        }
    }

    /// The bytes all history holds, and how many events `history.max_bytes` evicted so far.
    pub fn history_usage(&self) -> (usize, u64) {
        (self.bytes.used(), self.bytes.evicted())
    }

    /// Past `history.max_bytes`, drops the oldest events of the least recently active channels
    /// until history is back under 90 % of it (so the scan runs once per tenth of the budget, not
    /// per event). Called with no lock held; one caller evicts at a time.
    fn keep_within_budget(&self) {
        let budget = self.history.max_bytes;
        if self.bytes.used() <= budget || !self.bytes.start_evicting() {
            return;
        }
        let target = budget / 10 * 9;
        let mut candidates: Vec<(Instant, Arc<Channel>)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for channel in shard.channels() {
                let state = channel.lock();
                if !state.history.is_empty() {
                    candidates.push((state.last_activity, Arc::clone(channel)));
                }
            }
        }
        candidates.sort_by_key(|(last_activity, _)| *last_activity);
        let (mut evicted, mut channels) = (0, 0);
        let mut lost = Vec::new();
        for (_, channel) in candidates {
            if self.bytes.used() <= target {
                break;
            }
            let mut state = channel.lock();
            let mut trimmed = Trimmed::default();
            let before = state.history.len();
            while self.bytes.used() > target && !state.history.is_empty() {
                channel.drop_oldest(&mut state, &mut trimmed);
            }
            evicted += (before - state.history.len()) as u64;
            channels += 1;
            drop(state);
            lost.push((channel.name.clone(), trimmed));
        }
        self.bytes.count_evicted(evicted);
        self.bytes.done_evicting();
        for (name, trimmed) in lost {
            trimmed.log(&name);
        }
        static FULL: Throttle = Throttle::every(Duration::from_secs(10));
        if let Some(held_back) = FULL.allow() {
            tracing::warn!(
                evicted,
                channels,
                budget,
                held_back,
                "History reached history.max_bytes: evicted the oldest events of the least recently active channels."
            );
        }
    }

    /// The shard of a channel, locked, by its name's text.
    fn slot<'a>(&'a self, name: &'a str) -> Slot<'a> {
        let name = self.names.hash(name);
        let shard = self.shards[name.shard(SHARDS)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Slot { shard, name }
    }

    fn channel(&self, name: &ChannelName) -> Arc<Channel> {
        let mut slot = self.slot(name.as_str());
        Arc::clone(slot.get_or_insert_with(|| Channel::new(name.clone(), &self.bytes)))
    }

    fn existing(&self, name: &str) -> Option<Arc<Channel>> {
        self.slot(name).get().cloned()
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
        let body = server::Unsequenced::new(event, name);
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
                body.into_frame(seq, &channel.epoch),
                Instant::now(),
                produced_at,
                trace(seq),
            );
            channel.ledger.emitted();
            state.history.push_back(Arc::clone(&stored));
            state.last_activity = stored.emitted_at;
            let trimmed = channel.trim(&mut state, &self.history, stored.emitted_at);
            if !state.subscribers.is_empty() {
                stored.offer();
                state.subscribers.fan_out(&stored);
            }
            drop(state);
            trimmed.log(name);
            self.keep_within_budget();
            return Published {
                seq,
                epoch: Arc::clone(&channel.epoch),
            };
        }
    }

    /// Joins `outbox` to `channel`: under the channel lock it queues the `subscribed` frame and the
    /// replay, then registers for live events, so nothing falls between them and nothing comes twice.
    /// `None` when the connection is already subscribed.
    /// Subscribes `outbox` from `since`. With `run_context` (AG-UI subscribers), a subscription
    /// without `since` starts at the open run's first event, one that cannot resume at the start
    /// of the latest run, and the earlier events of the run open where the replay starts go ahead
    /// of it as [`Outgoing::Context`].
    pub fn subscribe(
        &self,
        name: &ChannelName,
        since: Option<&Since>,
        outbox: &Arc<Outbox>,
        run_context: bool,
    ) -> Option<Subscribed> {
        self.with_channel(name, |channel, state| {
            if state.subscribers.contains(outbox) {
                return None;
            }
            let first_retained = state.history.front().map_or(state.last_seq + 1, |e| e.seq);
            let (mut from, recovered, missed) = match since {
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
            let mut context = Vec::new();
            if run_context {
                let next = state.last_seq + 1;
                match (since, run_start(&state.history, next)) {
                    (None, (Some(start), true)) => from = start,
                    (Some(_), (Some(start), _)) if !recovered => from = start,
                    _ => {}
                }
                if let (Some(start), true) = run_start(&state.history, from)
                    && start < from
                {
                    context = state
                        .history
                        .iter()
                        .filter(|e| e.seq >= start && e.seq < from)
                        .cloned()
                        .collect();
                }
            }
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
            if !context.is_empty() {
                outbox.push(Outgoing::Context(context));
            }
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
        let mut slot = self.slot(name.as_str());
        let Some(channel) = slot.get().cloned() else {
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
            slot.remove();
        }
        removed
    }

    /// A cumulative ack: the client has shown everything up to `seq`.
    pub fn ack(&self, name: &ChannelName, seq: u64, outbox: &Arc<Outbox>) -> Result<u64, AckError> {
        let channel = self
            .existing(name.as_str())
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

    /// Expires history by age and removes channels that have been empty and unwatched for
    /// `history.max_age` (a later resume there sees a new epoch: `recovered: false`).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut channels = 0;
        let mut dropped = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let mut retired = Counts::default();
            shard.channels.retain(|(_, channel)| {
                let mut state = channel.lock();
                let trimmed = channel.trim(&mut state, &self.history, now);
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

/// The first seq (its `agent_started`) of the latest run that began before seq `before`, and
/// whether that run was still open at `before` (no `agent_completed` or `agent_error` between).
fn run_start(
    history: &std::collections::VecDeque<Arc<StoredEvent>>,
    before: u64,
) -> (Option<u64>, bool) {
    let mut open = true;
    for event in history.iter().rev().skip_while(|e| e.seq >= before) {
        match server::frame_type(&event.frame) {
            Some("agent_started") => return (Some(event.seq), open),
            Some("agent_completed" | "agent_error") => open = false,
            _ => {}
        }
    }
    (None, false)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
    fn an_epoch_is_sixteen_hex_digits_of_a_random_number() {
        let epochs: Vec<String> = (0..64).map(|_| new_epoch()).collect();
        for epoch in &epochs {
            assert_eq!(epoch.len(), 16, "{epoch}");
            assert!(u64::from_str_radix(epoch, 16).is_ok(), "{epoch}");
            assert_eq!(epoch, &epoch.to_ascii_lowercase());
        }
        // Every digit place takes more than one value: no digit is written from a fixed part.
        for place in 0..16 {
            let digits: std::collections::HashSet<u8> =
                epochs.iter().map(|epoch| epoch.as_bytes()[place]).collect();
            assert!(digits.len() > 1, "place {place}: {epochs:?}");
        }
    }

    #[test]
    fn trims_by_count_and_counts_what_was_never_seen() {
        let broker = Channels::new(HistoryConfig {
            max_events: 2,
            max_age: Duration::from_secs(60),
            ..HistoryConfig::default()
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
