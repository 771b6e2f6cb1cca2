//! Deliveries, acks and channel-index updates travel to Redis through one task per replica: a
//! session never awaits Redis, the reports of a batch become one script call per hundred
//! channels (per slot on a Cluster), and a publish does not pay a second round trip for the index.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::RedisBroker;
use super::ledger::ChannelEpoch;
use crate::fanout::Delivered;
use crate::metrics::Metrics;
use crate::protocol::ChannelName;

/// How long a batch of reports waits for more once its first report arrived.
const LINGER: Duration = Duration::from_millis(100);

/// One thing a session reports.
#[derive(Debug)]
pub enum Report {
    /// A client's cumulative ack, with the epoch it was for.
    Acked(ChannelName, Arc<str>, u64),
    /// A publish at this wall-clock millisecond: for the channel index (`aw:channels`) and, when
    /// the event has a run, for the run's shared activity (`ended` for its last event).
    Published {
        channel: ChannelName,
        ms: u64,
        run: Option<(String, bool)>,
    },
    /// An unresolved event for the shared dead letters.
    DeadLetter(DeadLetter),
    /// A held event published or dead-lettered: its journal entry goes (after the letters).
    Settled(Box<str>),
}

/// A dead letter on its way to `aw:deadletters`.
#[derive(Debug)]
pub struct DeadLetter {
    pub run_id: String,
    pub reason: String,
    pub lost_ms: u64,
    /// The event as the producer sent it (JSON).
    pub event: String,
    /// The letter's first stream id, when a failed redrive puts it back.
    pub origin: Option<String>,
    /// Its run found no channel: the run id counts in `agentwire_unresolved_run_ids_total` (not
    /// for an event lost by our fault, nor a letter a failed redrive puts back).
    pub unresolved: bool,
}

/// Batches reports into Redis until `stop`, then writes what is still queued once. While Redis is
/// away a batch is retried, so a delivery made during an outage is still counted once it returns.
/// `stop` comes after the sessions ended, so the deliveries of the close window are recorded too.
pub async fn run(
    broker: &RedisBroker,
    mut queue: mpsc::Receiver<Report>,
    mut deliveries: mpsc::Receiver<Delivered>,
    metrics: &Metrics,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(1024);
    let mut firsts = Vec::with_capacity(1024);
    // Emptied by each batch and kept with their room for the next.
    let mut acked: HashMap<ChannelEpoch, u64> = HashMap::new();
    let mut published: HashMap<ChannelName, u64> = HashMap::new();
    let mut runs: HashMap<String, (u64, bool)> = HashMap::new();
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            received = queue.recv_many(&mut batch, 4096) => {
                if received == 0 {
                    return;
                }
                false
            }
            received = deliveries.recv_many(&mut firsts, 4096) => {
                if received == 0 {
                    return;
                }
                false
            }
        };
        if stopping {
            queue.close();
            deliveries.close();
            while queue.recv_many(&mut batch, 4096).await > 0 {}
            while deliveries.recv_many(&mut firsts, 4096).await > 0 {}
        } else {
            // Reports wait a moment for more of their kind: many channels' deliveries become one
            // script call instead of one per event.
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(LINGER) => {}
            }
            // Whatever else is waiting joins this batch.
            while batch.len() < 4096
                && let Ok(report) = queue.try_recv()
            {
                batch.push(report);
            }
            while firsts.len() < 4096
                && let Ok(delivered) = deliveries.try_recv()
            {
                firsts.push(delivered);
            }
        }
        let mut letters = Vec::new();
        let mut settled = Vec::new();
        // A feed is one channel in one epoch: its deliveries go together, in the order they came,
        // found by the feed's address rather than by hashing its channel and epoch per delivery.
        firsts.sort_by_key(|first| Arc::as_ptr(&first.feed));
        let by_feed: Vec<(ChannelEpoch, Vec<u64>)> = (firsts
            .chunk_by(|a, b| Arc::ptr_eq(&a.feed, &b.feed)))
        .map(|same| {
            let feed = &same[0].feed;
            let seqs = same.iter().map(|first| first.seq).collect();
            ((feed.channel.clone(), Arc::clone(&feed.epoch)), seqs)
        })
        .collect();
        firsts.clear();
        for report in batch.drain(..) {
            match report {
                Report::Acked(channel, epoch, seq) => {
                    let top = acked.entry((channel, epoch)).or_default();
                    *top = (*top).max(seq);
                }
                Report::Published { channel, ms, run } => {
                    let last = published.entry(channel).or_default();
                    *last = (*last).max(ms);
                    if let Some((run_id, ended)) = run {
                        let seen = runs.entry(run_id).or_default();
                        *seen = (seen.0.max(ms), seen.1 || ended);
                    }
                }
                Report::DeadLetter(letter) => letters.push(letter),
                Report::Settled(id) => settled.push(id),
            }
        }
        // Every channel's deliveries, then acks, in one round trip each (per slot on a Cluster).
        while !by_feed.is_empty()
            && let Err(error) = broker.delivered(&by_feed).await
        {
            metrics.broker_errors.inc();
            tracing::debug!(%error, channels = by_feed.len(), "Cannot record deliveries yet; retrying.");
            if stopping || retry_later(&stop).await {
                break;
            }
        }
        let acks: Vec<_> = acked.drain().collect();
        while !acks.is_empty()
            && let Err(error) = broker.acked(&acks).await
        {
            metrics.broker_errors.inc();
            tracing::debug!(%error, channels = acks.len(), "Cannot record acks yet; retrying.");
            if stopping || retry_later(&stop).await {
                break;
            }
        }
        while !letters.is_empty()
            && let Err(error) = broker.store_dead_letters(&mut letters, metrics).await
        {
            metrics.broker_errors.inc();
            tracing::warn!(%error, letters = letters.len(), "Cannot store dead letters in Redis yet; retrying.");
            if stopping || retry_later(&stop).await {
                for letter in &letters {
                    tracing::error!(target: "agentwire::deadletter", run_id = %letter.run_id, event = %letter.event, "Dead letter not stored: Redis is unavailable at shutdown.");
                }
                break;
            }
        }
        // After the letters: a held event leaves the journal only once its letter is kept (at
        // shutdown, with letters left unstored, the journal keeps them all for another replica).
        while letters.is_empty()
            && !settled.is_empty()
            && let Err(error) = broker.settled(&settled).await
        {
            metrics.broker_errors.inc();
            tracing::debug!(%error, "Cannot take settled events out of the journal yet; retrying.");
            if stopping || retry_later(&stop).await {
                break;
            }
        }
        // Run activity only keeps other replicas' watchdogs from a false stall: one attempt.
        if !runs.is_empty()
            && let Err(error) = broker.runs_seen(&runs).await
        {
            metrics.broker_errors.inc();
            tracing::debug!(%error, "Cannot record run activity.");
        }
        runs.clear();
        // The index only steers the age sweep: one attempt, no retry.
        if !published.is_empty()
            && let Err(error) = broker.index(&published).await
        {
            metrics.broker_errors.inc();
            tracing::debug!(%error, "Cannot update the channel index.");
        }
        published.clear();
        if stopping {
            return;
        }
    }
}

/// Waits before a retry; `true` when the gateway is stopping instead.
async fn retry_later(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(Duration::from_millis(500)) => false,
    }
}
