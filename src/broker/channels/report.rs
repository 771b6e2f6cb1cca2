//! What the channel store reports: one channel's ledger, and one pass over every channel for the
//! balanced totals behind `/metrics` and `GET /v1/ledger` and the lines its rankings are made of.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::Channels;
use super::channel::Channel;
use crate::ledger::{ChannelReport, LedgerView, LostReport, MAX_TOP, Ranked, Summaries, Totals};
use crate::protocol::ChannelName;

/// Channels read between two yields of [`Channels::summarize`].
const YIELD_EVERY: usize = 1024;

impl Channels {
    /// The ledger of one channel, `None` if the broker holds no such channel.
    pub fn report(&self, name: &ChannelName) -> Option<ChannelReport> {
        let channel = self.existing(name.as_str())?;
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

    /// The ledger view of every channel, at one pass (see [`Self::summarize`]).
    pub async fn view(&self) -> Result<LedgerView, Infallible> {
        let as_of = SystemTime::now();
        let (totals, all) = self.summarize(true).await;
        Ok(LedgerView {
            totals,
            ranked: Ranked::from_summaries(all, MAX_TOP),
            as_of,
            channel_limit: None,
            limit_reached: false,
        })
    }

    /// One pass over every channel: the sum of their ledgers (each channel's snapshot balances,
    /// so the sum does too) and, with `summaries`, a line for each channel with pending or lost
    /// events and for the busiest channels ([`Summaries`]). Each shard's lock is held only to copy its list of channels, each channel's only
    /// to read its oldest pending age and subscribers, and the pass yields to other tasks between
    /// shards and every [`YIELD_EVERY`] channels, so publishes go on while it runs.
    pub async fn summarize(&self, summaries: bool) -> (Totals, Summaries) {
        let now = Instant::now();
        let mut totals = Totals::default();
        let mut all = Summaries::default();
        let mut copied: Vec<Arc<Channel>> = Vec::new();
        for shard in self.shards.iter() {
            {
                let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                // A channel retired after this copy is counted through the copy, not `retired`
                // (both are read under this lock): once either way.
                totals.add(&shard.retired);
                copied.extend(shard.channels().cloned());
            }
            for (n, channel) in copied.drain(..).enumerate() {
                if n > 0 && n % YIELD_EVERY == 0 {
                    tokio::task::yield_now().await;
                }
                let counts = channel.ledger.snapshot();
                totals.add_channel(&counts);
                // A channel with nothing pending or lost has no pending age: it is read only when
                // it is among the busiest.
                let wanted = match summaries {
                    true => all.wants(&counts),
                    false => counts.pending > 0 || counts.lost_total() > 0,
                };
                if !wanted {
                    continue;
                }
                let state = channel.lock();
                let oldest = Channel::oldest_pending_age(&state, now);
                if let Some(age) = oldest {
                    totals.oldest_pending_age = totals.oldest_pending_age.max(age);
                }
                if let Some(age) = Channel::oldest_offered_pending_age(&state, now) {
                    totals.oldest_offered_pending_age = totals.oldest_offered_pending_age.max(age);
                }
                if summaries {
                    all.add(crate::ledger::ChannelSummary::new(
                        channel.name.to_string(),
                        &counts,
                        oldest.map(|a| a.as_secs_f64()),
                        state.subscribers.len(),
                    ));
                }
            }
            tokio::task::yield_now().await;
        }
        (totals, all)
    }
}
