//! Redis mode's operations on the channel store, which mirrors the channels this replica's
//! clients watch: a channel is prepared (loading), live events are applied in seq order, a stream
//! read is merged, and the last local subscriber detaches it.

use std::sync::Arc;

use super::Channels;
use super::channel::Channel;
use crate::broker::{Sequenced, Snapshot};
use crate::fanout::{Feed, Outgoing, StoredEvent};
use crate::protocol::server::{self, Subscribed};
use crate::protocol::{ChannelKind, ChannelName};

impl Channels {
    /// Redis mode: starts mirroring a channel. Until [`Self::merge`] loads its history, live
    /// events are kept aside, so none falls between the pub/sub subscription and the history read.
    pub fn prepare(&self, name: &ChannelName, feed: &Arc<Feed>) {
        self.slot(name.as_str()).get_or_insert_with(|| {
            let channel =
                Channel::with_epoch(name.clone(), "".into(), Some(Arc::clone(feed)), &self.bytes);
            channel.lock().loading = Some(Vec::new());
            channel
        });
    }

    /// Redis mode: a live event from pub/sub. `false` when the mirror must read the stream again
    /// (a gap in seqs, or a new epoch) before it can go on.
    /// `name` is the channel's name as text, as pub/sub gave it.
    pub fn apply(&self, name: &str, epoch: &str, event: Sequenced) -> bool {
        let Some(channel) = self.existing(name) else {
            return true;
        };
        let mut state = channel.lock();
        if let Some(early) = &mut state.loading {
            early.push((epoch.into(), event));
            return true;
        }
        if epoch != &*channel.epoch {
            return false;
        }
        if event.seq <= state.last_seq {
            return true;
        }
        if event.seq > state.last_seq + 1 {
            return false;
        }
        channel.append(&mut state, &event, &self.history);
        drop(state);
        self.keep_within_budget();
        true
    }

    /// Redis mode: where the mirror of `name` stands (epoch, last seq), to read the stream from.
    pub fn position(&self, name: &ChannelName) -> Option<(Arc<str>, u64)> {
        let channel = self.existing(name.as_str())?;
        let state = channel.lock();
        (state.loading.is_none()).then(|| (Arc::clone(&channel.epoch), state.last_seq))
    }

    /// Redis mode: brings the mirror up to `snapshot` (read from the stream). On a first load it
    /// takes the history and the live events kept aside; on a new epoch (Redis lost the channel)
    /// every local subscriber is told with a `subscribed` frame, `recovered: false`, and gets the
    /// new epoch's history; otherwise it appends what the mirror missed. A channel without an
    /// epoch yet (nothing was published to it) takes its first epoch without a `subscribed` frame.
    pub fn merge(&self, name: &ChannelName, snapshot: Snapshot) {
        let mut slot = self.slot(name.as_str());
        let Some(channel) = slot.get().cloned() else {
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
            drop(state);
            drop(slot);
            self.keep_within_budget();
            return;
        }
        let renewed = state.loading.is_none();
        // A channel loaded before anything was published to it has no epoch yet: the first one
        // is its continuation, not a loss. Its subscribers saw nothing, so the events of the new
        // epoch reach them as live events, without a new `subscribed` frame.
        let adopted = renewed && channel.epoch.is_empty() && state.last_seq == 0;
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
            &self.bytes,
        ));
        let mut fresh_state = fresh.lock();
        fresh_state.last_seq = snapshot
            .events
            .first()
            .map_or(snapshot.last_seq, |first| first.seq - 1);
        let outboxes = state.subscribers.take_all();
        if adopted {
            for outbox in &outboxes {
                fresh_state.subscribers.add(outbox);
            }
        }
        for event in &snapshot.events {
            fresh.append(&mut fresh_state, event, &self.history);
        }
        for (epoch, event) in early {
            if epoch == fresh.epoch && event.seq == fresh_state.last_seq + 1 {
                fresh.append(&mut fresh_state, &event, &self.history);
            }
        }
        fresh_state.last_seq = fresh_state.last_seq.max(snapshot.last_seq);
        if renewed && !adopted {
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
        if !adopted {
            for outbox in &outboxes {
                fresh_state.subscribers.add(outbox);
            }
        }
        drop(fresh_state);
        state.retired = true;
        drop(state);
        slot.insert(fresh);
        drop(slot);
        self.keep_within_budget();
    }

    /// Redis mode: stops mirroring a channel nobody here watches any more.
    pub fn detach(&self, name: &ChannelName) {
        if let Some(channel) = self.slot(name.as_str()).remove() {
            channel.lock().retired = true;
        }
    }
}
