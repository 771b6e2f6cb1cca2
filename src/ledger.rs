//! The per-channel account of every event: emitted, delivered, acked, pending, lost by reason.
//!
//! Each stored event carries an [`EventState`] that leaves `pending` exactly once, either to
//! `delivered` (first socket write) or to `lost` (left history undelivered). Both moves and the
//! emit happen under the channel ledger's small lock, so every snapshot balances:
//! `emitted = delivered + pending + lost`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// Why an event will never be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// Left history while nobody was subscribed to its channel.
    ExpiredUnseen = 0,
    /// Left history undelivered while someone was subscribed: a real failure.
    ExpiredSubscribed = 1,
    /// Never found a channel (counted before the channel stage).
    Unresolved = 2,
    /// A bug: anything else.
    Internal = 3,
}

impl LostReason {
    pub const ALL: [LostReason; 4] = [
        Self::ExpiredUnseen,
        Self::ExpiredSubscribed,
        Self::Unresolved,
        Self::Internal,
    ];
    /// The reasons a channel's own ledger can hold.
    pub const CHANNEL: [LostReason; 3] =
        [Self::ExpiredUnseen, Self::ExpiredSubscribed, Self::Internal];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExpiredUnseen => "expired_unseen",
            Self::ExpiredSubscribed => "expired_subscribed",
            Self::Unresolved => "unresolved",
            Self::Internal => "internal",
        }
    }
}

/// Counts of one channel (or a sum of channels).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub emitted: u64,
    pub delivered: u64,
    pub acked: u64,
    pub pending: u64,
    pub lost: [u64; 4],
}

impl Counts {
    pub fn lost_total(&self) -> u64 {
        self.lost.iter().sum()
    }

    pub fn balanced(&self) -> bool {
        self.emitted == self.delivered + self.pending + self.lost_total()
    }

    pub fn add(&mut self, other: &Counts) {
        self.emitted += other.emitted;
        self.delivered += other.delivered;
        self.acked += other.acked;
        self.pending += other.pending;
        for (sum, value) in self.lost.iter_mut().zip(other.lost) {
            *sum += value;
        }
    }
}

/// Gateway-wide sums, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub emitted: u64,
    pub delivered: u64,
    pub acked: u64,
    /// Signed: in Redis mode a replica's share (`emitted − delivered − lost` of what it counted) is
    /// negative when it delivered events another replica emitted; the sum over replicas is exact.
    pub pending: i64,
    pub lost: [u64; 4],
    pub oldest_pending_age: Duration,
    /// Of the pending events that were queued to a subscriber.
    pub oldest_offered_pending_age: Duration,
    pub channels: u64,
    /// Channels whose own ledger did not balance in the snapshot: always 0 unless the
    /// accounting has a bug (unlike a sum, one channel's surplus cannot hide another's deficit).
    pub unbalanced: u64,
}

impl Totals {
    /// Adds one channel's ledger, counting it in `channels` and, if it does not balance, in
    /// `unbalanced`.
    pub fn add_channel(&mut self, counts: &Counts) {
        self.add(counts);
        self.channels += 1;
        if !counts.balanced() {
            self.unbalanced += 1;
        }
    }

    pub fn add(&mut self, counts: &Counts) {
        self.emitted += counts.emitted;
        self.delivered += counts.delivered;
        self.acked += counts.acked;
        self.pending += i64::try_from(counts.pending).unwrap_or(i64::MAX);
        for (sum, value) in self.lost.iter_mut().zip(counts.lost) {
            *sum += value;
        }
    }
}

/// The ledger of one channel.
#[derive(Debug, Default)]
pub struct ChannelLedger {
    counts: Mutex<Counts>,
}

impl ChannelLedger {
    pub fn snapshot(&self) -> Counts {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The critical sections are plain arithmetic; a poisoned lock still holds valid counts.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn emitted(&self) {
        let mut counts = self.lock();
        counts.emitted += 1;
        counts.pending += 1;
    }

    /// Counts newly acked events; returns how many.
    pub(crate) fn acked(&self, newly: u64) {
        self.lock().acked += newly;
    }
}

const PENDING: u8 = 0;
const DELIVERED: u8 = 1;
const LOST: u8 = 2;

/// Where one stored event stands: pending, then delivered or lost, once.
#[derive(Debug, Default)]
pub struct EventState(AtomicU8);

impl EventState {
    /// Records the first socket write. Returns `true` only the first time.
    pub fn deliver(&self, ledger: &ChannelLedger) -> bool {
        let mut counts = ledger.lock();
        if self
            .0
            .compare_exchange(PENDING, DELIVERED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        counts.pending -= 1;
        counts.delivered += 1;
        true
    }

    /// Records that the event left history undelivered. Returns `true` if it was pending.
    pub fn lose(&self, ledger: &ChannelLedger, reason: LostReason) -> bool {
        let mut counts = ledger.lock();
        if self
            .0
            .compare_exchange(PENDING, LOST, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        counts.pending -= 1;
        counts.lost[reason as usize] += 1;
        true
    }

    pub fn is_pending(&self) -> bool {
        self.0.load(Ordering::Acquire) == PENDING
    }
}

/// A channel's ledger as `GET /v1/channels/{channel}` shows it.
#[derive(Debug, Serialize)]
pub struct ChannelReport {
    pub channel: String,
    pub epoch: String,
    pub last_seq: u64,
    pub first_retained_seq: Option<u64>,
    pub retained: usize,
    pub subscribers: usize,
    pub emitted: u64,
    pub delivered: u64,
    pub acked: u64,
    pub pending: u64,
    pub oldest_pending_age_seconds: Option<f64>,
    pub lost: LostReport,
    pub lost_total: u64,
    pub balanced: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LostReport {
    pub expired_unseen: u64,
    pub expired_subscribed: u64,
    pub internal: u64,
}

impl LostReport {
    pub fn from_counts(counts: &Counts) -> Self {
        Self {
            expired_unseen: counts.lost[LostReason::ExpiredUnseen as usize],
            expired_subscribed: counts.lost[LostReason::ExpiredSubscribed as usize],
            internal: counts.lost[LostReason::Internal as usize],
        }
    }
}

/// One line of `GET /v1/ledger`'s top lists.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelSummary {
    pub channel: String,
    pub emitted: u64,
    pub delivered: u64,
    pub pending: u64,
    pub oldest_pending_age_seconds: Option<f64>,
    pub lost_total: u64,
    pub lost: LostReport,
    pub subscribers: usize,
    pub balanced: bool,
}

impl ChannelSummary {
    pub fn new(
        channel: String,
        counts: &Counts,
        oldest_pending_age_seconds: Option<f64>,
        subscribers: usize,
    ) -> Self {
        Self {
            channel,
            emitted: counts.emitted,
            delivered: counts.delivered,
            pending: counts.pending,
            oldest_pending_age_seconds,
            lost_total: counts.lost_total(),
            lost: LostReport::from_counts(counts),
            subscribers,
            balanced: counts.balanced(),
        }
    }
}

/// What one pass over the channels keeps for the rankings: a line for every channel with pending
/// or lost events, and the [`MAX_TOP`] busiest channels (most emitted) whatever their state, kept
/// in a min-heap while passing so that a pass over a million quiet channels holds 1000 lines.
#[derive(Debug, Default)]
pub struct Summaries {
    pub attention: Vec<ChannelSummary>,
    busiest: std::collections::BinaryHeap<std::cmp::Reverse<Busy>>,
}

/// A line ordered by how busy its channel is (ties: the name first in order ranks higher).
#[derive(Debug)]
struct Busy(ChannelSummary);

impl Ord for Busy {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .emitted
            .cmp(&other.0.emitted)
            .then_with(|| other.0.channel.cmp(&self.0.channel))
    }
}
impl PartialOrd for Busy {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Busy {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Busy {}

impl Summaries {
    /// Whether a channel with these counts makes a line: checked before the line is made, which
    /// may take the channel's lock.
    pub fn wants(&self, counts: &Counts) -> bool {
        Self::attention(counts.pending, counts.lost_total()) || self.busy_enough(counts.emitted)
    }

    /// A channel with pending or lost events is in the `top_pending` / `top_lost` candidates.
    fn attention(pending: u64, lost_total: u64) -> bool {
        pending > 0 || lost_total > 0
    }

    fn busy_enough(&self, emitted: u64) -> bool {
        emitted > 0
            && (self.busiest.len() < MAX_TOP
                || self
                    .busiest
                    .peek()
                    .is_some_and(|least| emitted > least.0.0.emitted))
    }

    /// Keeps the line where it ranks.
    pub fn add(&mut self, summary: ChannelSummary) {
        if self.busy_enough(summary.emitted) {
            let busy = summary.clone();
            self.busiest.push(std::cmp::Reverse(Busy(busy)));
            if self.busiest.len() > MAX_TOP {
                self.busiest.pop();
            }
        }
        if Self::attention(summary.pending, summary.lost_total) {
            self.attention.push(summary);
        }
    }
}

/// The longest top list `GET /v1/ledger?top=` shows; a snapshot keeps this many of each.
pub const MAX_TOP: usize = 1000;

#[derive(Debug, Default, serde::Serialize)]
pub struct Ranked {
    /// The channels that emitted the most events, with their whole ledger line.
    pub busiest: Vec<ChannelSummary>,
    pub top_pending: Vec<ChannelSummary>,
    pub top_lost: Vec<ChannelSummary>,
}

/// The whole ledger at one moment: what `GET /v1/ledger` shows and, in memory mode, the totals
/// `/metrics` exports. Computed at most once per `ledger.snapshot_interval` and shared.
#[derive(Debug)]
pub struct LedgerView {
    pub totals: Totals,
    /// The [`MAX_TOP`] worst channels of each list; a request shows its `top` of them.
    pub ranked: Ranked,
    /// Wall-clock time the computation started: what the view is "as of".
    pub as_of: SystemTime,
    /// Most channels one computation reads (Redis mode: the most recently published first);
    /// `None` when every channel is read.
    pub channel_limit: Option<u64>,
    /// More channels exist than the computation read: the totals and lists cover only those read.
    pub limit_reached: bool,
}

impl Ranked {
    /// The first `n` of each list.
    pub fn top(&self, n: usize) -> Self {
        let first = |list: &[ChannelSummary]| list.iter().take(n).cloned().collect();
        Self {
            busiest: first(&self.busiest),
            top_pending: first(&self.top_pending),
            top_lost: first(&self.top_lost),
        }
    }

    /// The `n` busiest channels, the `n` with the most pending events and the `n` with the most
    /// lost ones.
    pub fn from_summaries(summaries: Summaries, n: usize) -> Self {
        // Ascending in `Reverse` order is the busiest first.
        let mut busiest: Vec<ChannelSummary> = summaries
            .busiest
            .into_sorted_vec()
            .into_iter()
            .map(|busy| busy.0.0)
            .collect();
        busiest.truncate(n);
        let all = summaries.attention;
        let mut top_pending: Vec<_> = all.iter().filter(|c| c.pending > 0).cloned().collect();
        top_pending.sort_by(|a, b| {
            b.pending
                .cmp(&a.pending)
                .then_with(|| a.channel.cmp(&b.channel))
        });
        top_pending.truncate(n);
        let mut top_lost: Vec<_> = all.into_iter().filter(|c| c.lost_total > 0).collect();
        top_lost.sort_by(|a, b| {
            b.lost_total
                .cmp(&a.lost_total)
                .then_with(|| a.channel.cmp(&b.channel))
        });
        top_lost.truncate(n);
        Self {
            busiest,
            top_pending,
            top_lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_channels_surplus_does_not_hide_anothers_deficit() {
        let mut totals = Totals::default();
        let surplus = Counts {
            emitted: 3,
            delivered: 1,
            pending: 1,
            ..Counts::default()
        };
        let deficit = Counts {
            emitted: 1,
            delivered: 1,
            pending: 1,
            ..Counts::default()
        };
        totals.add_channel(&surplus);
        totals.add_channel(&deficit);
        assert_eq!(
            (totals.emitted, totals.delivered, totals.pending),
            (4, 2, 2),
            "the sums balance"
        );
        assert_eq!((totals.channels, totals.unbalanced), (2, 2));
    }

    #[test]
    fn an_event_leaves_pending_once() {
        let ledger = ChannelLedger::default();
        let first = EventState::default();
        let second = EventState::default();
        ledger.emitted();
        ledger.emitted();
        assert!(first.deliver(&ledger));
        assert!(!first.deliver(&ledger));
        assert!(!first.lose(&ledger, LostReason::ExpiredSubscribed));
        assert!(second.lose(&ledger, LostReason::ExpiredUnseen));
        assert!(!second.deliver(&ledger));
        let counts = ledger.snapshot();
        assert_eq!(
            (
                counts.emitted,
                counts.delivered,
                counts.pending,
                counts.lost_total()
            ),
            (2, 1, 0, 1)
        );
        assert!(counts.balanced());
    }
}
