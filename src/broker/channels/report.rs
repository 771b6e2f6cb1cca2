//! What the channel store reports: one channel's ledger, the balanced totals behind `/metrics`, and
//! the channels with the most pending and lost events.

use std::time::Instant;

use super::Channels;
use super::channel::Channel;
use crate::ledger::{ChannelReport, ChannelSummary, LostReport, Ranked, Totals};
use crate::protocol::ChannelName;

impl Channels {
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
}
