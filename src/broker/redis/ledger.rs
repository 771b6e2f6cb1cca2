//! The shared ledger: deliveries and acks recorded by script (batched by the report task), the
//! channel index, the per-channel and cluster-wide reads behind `GET /v1/channels` and
//! `GET /v1/ledger` (served from a snapshot, see `broker/views.rs`), this replica's own counts for
//! `/metrics`, and the age sweep.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use redis::{AsyncCommands, Cmd, FromRedisValue, Script, Value};

use super::keys::{CHANNELS, DEADLETTERS, Keys, key, seq_of};
use super::{PER_REPORT_CALL, RedisBroker, evalsha};
use crate::broker::{BrokerError, now_ms};
use crate::ledger::{
    ChannelReport, ChannelSummary, Counts, LedgerView, LostReason, LostReport, MAX_TOP, Ranked,
    Summaries, Totals,
};
use crate::protocol::ChannelName;

/// Channels one recomputation of `GET /v1/ledger` reads at most: it costs at most this many
/// `HGETALL`s and one `ZREVRANGE`, once per `ledger.snapshot_interval` whatever the callers.
pub(super) const LEDGER_SCAN: usize = 10_000;

/// `HGETALL`s sent in one pipeline.
const LEDGER_BATCH: usize = 500;

/// What this replica did, for `/metrics` (summed over replicas by the dashboards).
#[derive(Default)]
pub(super) struct Counters {
    pub(super) emitted: AtomicU64,
    pub(super) delivered: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) lost: [AtomicU64; 4],
}

pub(super) fn counts_of(meta: &HashMap<String, String>) -> Counts {
    let field = |key: &str| meta.get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut lost = [0; 4];
    lost[LostReason::ExpiredUnseen as usize] = field("lost_expired_unseen");
    lost[LostReason::ExpiredSubscribed as usize] = field("lost_expired_subscribed");
    Counts {
        emitted: field("emitted"),
        delivered: field("delivered"),
        acked: field("acked"),
        pending: field("pending"),
        lost,
    }
}

/// A channel in one of its epochs: what a delivery or an ack is counted against.
pub(crate) type ChannelEpoch = (ChannelName, Arc<str>);

impl RedisBroker {
    /// Records first deliveries, per channel and epoch: a script call per [`PER_REPORT_CALL`] channels
    /// (of one slot on a Cluster), all in one round trip (one per slot on a Cluster); returns how
    /// many were new cluster-wide. Safe to send again: a seq counts once.
    pub(crate) async fn delivered(
        &self,
        deliveries: &[(ChannelEpoch, Vec<u64>)],
    ) -> Result<u64, BrokerError> {
        let keys: Vec<Keys> = (deliveries.iter())
            .map(|((name, _), _)| Keys::of(name))
            .collect();
        let groups = self
            .backend
            .script_calls(keys.iter().map(Keys::meta), PER_REPORT_CALL);
        let calls = || {
            (groups.iter())
                .map(|group| {
                    let names: Vec<&str> = (group.iter())
                        .flat_map(|&i| [keys[i].log(), keys[i].meta(), keys[i].delivered()])
                        .collect();
                    let (args, bytes) = group.iter().fold((0, 0), |(args, bytes), &i| {
                        let ((_, epoch), seqs) = &deliveries[i];
                        (
                            args + 2 + seqs.len(),
                            bytes + epoch.len() + 20 * (1 + seqs.len()),
                        )
                    });
                    let mut call = evalsha(&self.scripts.deliver, &names, args, bytes);
                    for &i in group {
                        let ((_, epoch), seqs) = &deliveries[i];
                        call.arg(&**epoch).arg(seqs.len()).arg(seqs);
                    }
                    call
                })
                .collect()
        };
        self.invoke_each(&self.scripts.deliver, calls, &self.counters.delivered)
            .await
    }

    /// Sends `calls` (of `script`, made by [`evalsha`]) with [`Self::call_each`], adds the counts
    /// they return to `counter` and returns their sum. An error fails the whole after the counts
    /// that did come are added, so a retry (which counts only what is new) leaves `counter` exact.
    async fn invoke_each(
        &self,
        script: &Script,
        calls: impl Fn() -> Vec<Cmd>,
        counter: &AtomicU64,
    ) -> Result<u64, BrokerError> {
        let (mut sum, mut failed) = (0, None);
        for reply in self.call_each(script, calls).await {
            match reply.and_then(|reply| u64::from_redis_value(reply).map_err(Into::into)) {
                Ok(count) => sum += count,
                Err(error) => failed = Some(error),
            }
        }
        counter.fetch_add(sum, Ordering::Relaxed);
        match failed {
            Some(error) => Err(error.into()),
            None => Ok(sum),
        }
    }

    /// Moves channels' last-publish times forward in the index.
    pub(crate) async fn index(
        &self,
        published: &HashMap<ChannelName, u64>,
    ) -> Result<(), BrokerError> {
        let mut command = redis::cmd("ZADD");
        command.arg(CHANNELS).arg("GT");
        for (channel, ms) in published {
            command.arg(ms).arg(channel.as_str());
        }
        let () = command.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Records cumulative acks, per channel and epoch, in calls as [`Self::delivered`] makes
    /// them. Safe to send again: an ack only moves forward.
    pub(crate) async fn acked(&self, acks: &[(ChannelEpoch, u64)]) -> Result<(), BrokerError> {
        let keys: Vec<String> = (acks.iter())
            .map(|((name, _), _)| key(name, "meta"))
            .collect();
        let groups = self
            .backend
            .script_calls(keys.iter().map(String::as_str), PER_REPORT_CALL);
        let calls = || {
            (groups.iter())
                .map(|group| {
                    let names: Vec<&str> = group.iter().map(|&i| keys[i].as_str()).collect();
                    let mut call =
                        evalsha(&self.scripts.ack, &names, 2 * group.len(), 40 * group.len());
                    for &i in group {
                        let ((_, epoch), seq) = &acks[i];
                        call.arg(&**epoch).arg(seq);
                    }
                    call
                })
                .collect()
        };
        self.invoke_each(&self.scripts.ack, calls, &self.counters.acked)
            .await?;
        Ok(())
    }

    pub async fn report(&self, name: &ChannelName) -> Result<Option<ChannelReport>, BrokerError> {
        let keys = Keys::of(name);
        let mut conn = self.conn();
        let (meta, retained, first): (HashMap<String, String>, usize, Vec<(String, Value)>) =
            redis::pipe()
                .hgetall(keys.meta())
                .xlen(keys.log())
                .cmd("XRANGE")
                .arg(keys.log())
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await?;
        let mirrored = self.mirror.report(name);
        // A channel nobody published to has no keys; it exists while someone here watches it.
        if !meta.contains_key("epoch") && mirrored.is_none() {
            return Ok(None);
        }
        let counts = counts_of(&meta);
        let field = |key: &str| meta.get(key).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(Some(ChannelReport {
            channel: name.to_string(),
            epoch: meta.get("epoch").cloned().unwrap_or_default(),
            last_seq: field("last_seq"),
            first_retained_seq: first.first().and_then(|(id, _)| seq_of(id)),
            retained,
            subscribers: mirrored.map_or(0, |r| r.subscribers),
            emitted: counts.emitted,
            delivered: counts.delivered,
            acked: counts.acked,
            pending: counts.pending,
            oldest_pending_age_seconds: None,
            lost: LostReport::from_counts(&counts),
            lost_total: counts.lost_total(),
            balanced: counts.balanced(),
        }))
    }

    /// What this replica did: emitted by its ingest, delivered by its sockets, lost by its trims.
    /// Its pending is the signed rest; summed over replicas it is the cluster's.
    /// The oldest-pending ages are of the channels mirrored here (one pass over them).
    pub(crate) async fn totals(&self) -> Totals {
        let (mirror, _) = self.mirror.summarize(false).await;
        let c = &self.counters;
        let lost = std::array::from_fn(|i| c.lost[i].load(Ordering::Relaxed));
        let emitted = c.emitted.load(Ordering::Relaxed);
        let delivered = c.delivered.load(Ordering::Relaxed);
        Totals {
            emitted,
            delivered,
            acked: c.acked.load(Ordering::Relaxed),
            pending: emitted as i64 - delivered as i64 - lost.iter().sum::<u64>() as i64,
            lost,
            oldest_pending_age: mirror.oldest_pending_age,
            oldest_offered_pending_age: mirror.oldest_offered_pending_age,
            channels: mirror.channels,
            // A replica's share has no channels of its own to balance: the cluster's figure is
            // `read_ledger`'s.
            unbalanced: 0,
        }
    }

    /// The cluster-wide ledger over the most recently published channels of the index, at most
    /// [`LEDGER_SCAN`] of them: one `ZREVRANGE` and one `HGETALL` per channel, sent in pipelines
    /// of [`LEDGER_BATCH`] so that publishes on the shared connection are not queued behind all
    /// of them at once.
    pub(crate) async fn read_ledger(&self) -> Result<LedgerView, BrokerError> {
        let as_of = SystemTime::now();
        let mut conn = self.conn();
        // One more than the cap, to tell whether the cap was reached.
        let mut names: Vec<String> = conn.zrevrange(CHANNELS, 0, LEDGER_SCAN as isize).await?;
        let limit_reached = names.len() > LEDGER_SCAN;
        names.truncate(LEDGER_SCAN);
        let channels: Vec<ChannelName> =
            names.iter().filter_map(|n| ChannelName::parse(n)).collect();
        let mut totals = Totals::default();
        let mut all = Summaries::default();
        for batch in channels.chunks(LEDGER_BATCH) {
            let reads = batch
                .iter()
                .map(|channel| {
                    let mut read = redis::cmd("HGETALL");
                    read.arg(key(channel, "meta"));
                    read
                })
                .collect();
            let metas: Vec<HashMap<String, String>> = conn.each(reads).await?;
            for (channel, meta) in batch.iter().zip(&metas) {
                let counts = counts_of(meta);
                totals.add_channel(&counts);
                if all.wants(&counts) {
                    all.add(ChannelSummary::new(channel.to_string(), &counts, None, 0));
                }
            }
        }
        Ok(LedgerView {
            totals,
            ranked: Ranked::from_summaries(all, MAX_TOP),
            as_of,
            channel_limit: Some(LEDGER_SCAN as u64),
            limit_reached,
        })
    }

    /// Trims channels idle for `history.max_age` (their entries are all that old) and retires
    /// the empty ones. Every replica may run it: the script is idempotent.
    pub async fn sweep(&self) {
        if !self.is_up() {
            return;
        }
        let now = now_ms();
        let min_t = now.saturating_sub(self.history.max_age.as_millis() as u64);
        let mut conn = self.conn();
        if let Ok(count) = conn.xlen::<_, u64>(DEADLETTERS).await {
            self.deadletter_count.store(count, Ordering::Relaxed);
        }
        let idle: Vec<String> = match conn
            .zrangebyscore_limit(CHANNELS, "-inf", min_t, 0, 200)
            .await
        {
            Ok(idle) => idle,
            Err(error) => {
                tracing::debug!(%error, "Sweep could not read the channel index.");
                return;
            }
        };
        for raw in idle {
            let Some(name) = ChannelName::parse(&raw) else {
                let _: Result<(), _> = conn.zrem(CHANNELS, &raw).await;
                continue;
            };
            let keys = Keys::of(&name);
            let swept: Result<(u64, u64, u8), _> = self
                .scripts
                .sweep
                .key(keys.log())
                .key(keys.meta())
                .key(keys.delivered())
                .key(keys.offered())
                .key(keys.seen())
                .arg(self.history.max_events)
                .arg(min_t)
                .arg(self.history.max_age.as_millis() as u64)
                .invoke_async(&mut conn)
                .await;
            match swept {
                Ok((unseen, subscribed, empty)) => {
                    self.count_lost(&name, unseen, subscribed);
                    if empty == 1 {
                        // Only if no publish touched the channel since it was read as idle.
                        let _: Result<u8, _> = self
                            .scripts
                            .unindex
                            .key(CHANNELS)
                            .arg(&raw)
                            .arg(min_t)
                            .invoke_async(&mut conn)
                            .await;
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, channel = %name, "Sweep failed.");
                    return;
                }
            }
        }
    }
}
