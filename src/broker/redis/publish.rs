//! Publishing into a channel: one script call sequences events of one request for it, in order,
//! each deduped by `event_id` and ingest entry id, appended to `:log`, counted in the `:meta`
//! ledger and `PUBLISH`ed to `:live`; then the channel is trimmed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::RedisBroker;
use super::keys::Keys;
use super::reports::Report;
use crate::broker::{BrokerError, Outcome, Published, ToPublish, now_ms};
use crate::ledger::LostReason;
use crate::protocol::ChannelName;
use crate::protocol::event::{Event, EventType};
use crate::protocol::server;

pub(super) fn new_epoch() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}

/// Events sequenced into one channel by one script call: the script blocks Redis while it runs,
/// so a request's many events for one channel go in calls of at most this many, one after the
/// other (in order).
const PER_CALL: usize = 100;

impl RedisBroker {
    /// Sequences `events` into `name`, in their order: one script call per [`PER_CALL`] events.
    /// The outcomes of the events sequenced, in order, and the error that stopped the rest (none
    /// of them was sequenced). `entry` is the ingest stream entry id an event came from.
    pub async fn publish(
        &self,
        name: &ChannelName,
        events: &[(&Event, Option<&str>)],
    ) -> (Vec<Outcome>, Option<BrokerError>) {
        let mut outcomes = Vec::with_capacity(events.len());
        for chunk in events.chunks(PER_CALL) {
            match self.publish_call(name, chunk).await {
                Ok(sequenced) => outcomes.extend(sequenced),
                Err(error) => return (outcomes, Some(error)),
            }
        }
        (outcomes, None)
    }

    /// Sequences the events of one request or read, each into its channel: one [`Self::publish`]
    /// per channel, all at once, so that the channels' calls share their round trips (on a
    /// Cluster, go to their nodes in parallel). One result per event, in the order given.
    pub async fn publish_all(
        &self,
        events: &[impl ToPublish],
    ) -> Vec<Result<Outcome, BrokerError>> {
        let mut channels: Vec<(&ChannelName, Vec<usize>)> = Vec::new();
        let mut index: HashMap<&ChannelName, usize> = HashMap::new();
        for (i, item) in events.iter().enumerate() {
            let name = item.channel();
            let at = *index.entry(name).or_insert_with(|| {
                channels.push((name, Vec::new()));
                channels.len() - 1
            });
            channels[at].1.push(i);
        }
        let calls = channels.iter().map(|(name, indices)| {
            let batch: Vec<(&Event, Option<&str>)> = (indices.iter())
                .map(|&i| (events[i].event(), events[i].entry()))
                .collect();
            async move { self.publish(name, &batch).await }
        });
        let answers = futures_util::future::join_all(calls).await;
        let mut results: Vec<Option<Result<Outcome, BrokerError>>> =
            (0..events.len()).map(|_| None).collect();
        for ((_, indices), (outcomes, error)) in channels.iter().zip(answers) {
            let sequenced = outcomes.len();
            for (&i, outcome) in indices.iter().zip(outcomes) {
                results[i] = Some(Ok(outcome));
            }
            if let Some(error) = error {
                for &i in &indices[sequenced.min(indices.len())..] {
                    results[i] = Some(Err(error.clone()));
                }
            }
        }
        (results.into_iter())
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(BrokerError::Internal(
                        "an event got no publish answer".into(),
                    ))
                })
            })
            .collect()
    }

    async fn publish_call(
        &self,
        name: &ChannelName,
        events: &[(&Event, Option<&str>)],
    ) -> Result<Vec<Outcome>, BrokerError> {
        if !self.is_up() {
            return Err(BrokerError::Unavailable("Redis is not answering".into()));
        }
        let keys = Keys::of(name);
        let now = now_ms();
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(&keys.log)
            .key(&keys.meta)
            .key(&keys.seen)
            .key(&keys.delivered)
            .key(&keys.offered)
            .arg(now)
            .arg(self.history.max_events)
            .arg(now.saturating_sub(self.history.max_age.as_millis() as u64))
            .arg(now.saturating_sub(self.dedupe_window.as_millis() as u64))
            .arg(new_epoch())
            .arg(&keys.live)
            .arg(self.dedupe_capacity.max(1))
            .arg(self.publish_command());
        for (event, entry) in events {
            let produced = event
                .ts
                .as_deref()
                .filter(|ts| ts.ends_with('Z'))
                .and_then(|ts| humantime::parse_rfc3339_weak(ts).ok())
                .and_then(|at| at.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_millis().to_string())
                .unwrap_or_default();
            let dedupe_id = event.dedupe_id();
            invocation
                .arg(server::event_body(event, name))
                .arg(produced)
                .arg(usize::from(dedupe_id.is_some()) + usize::from(entry.is_some()));
            if let Some(event_id) = dedupe_id {
                invocation.arg(format!("e:{event_id}"));
            }
            if let Some(entry) = entry {
                invocation.arg(format!("x:{entry}"));
            }
        }
        let mut conn = self.conn();
        let (epoch, unseen, subscribed, seqs): (String, u64, u64, Vec<u64>) =
            invocation.invoke_async(&mut conn).await?;
        if seqs.len() != events.len() {
            return Err(BrokerError::Internal(format!(
                "the publish script answered {} seqs for {} events",
                seqs.len(),
                events.len()
            )));
        }
        self.count_lost(name, unseen, subscribed);
        let epoch: Arc<str> = epoch.into();
        let mut outcomes = Vec::with_capacity(events.len());
        for ((event, _), seq) in events.iter().zip(seqs) {
            if seq == 0 {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            self.counters.emitted.fetch_add(1, Ordering::Relaxed);
            // The channel index and the run's activity are not in the script: they span channels
            // (Redis Cluster slots). One report, batched by the report task.
            let ended = matches!(
                event.kind,
                EventType::AgentCompleted | EventType::AgentError
            );
            // Waits for room: a dropped one would let another replica call this run stalled. (The
            // queue closes only at shutdown, after ingest has stopped.)
            let _ = self
                .reports
                .send(Report::Published {
                    channel: name.clone(),
                    ms: now,
                    run: event.run_id.clone().map(|run_id| (run_id, ended)),
                })
                .await;
            outcomes.push(Outcome::Published(Published {
                seq,
                epoch: Arc::clone(&epoch),
            }));
        }
        Ok(outcomes)
    }

    pub(super) fn count_lost(&self, name: &ChannelName, unseen: u64, subscribed: u64) {
        self.counters.lost[LostReason::ExpiredUnseen as usize].fetch_add(unseen, Ordering::Relaxed);
        self.counters.lost[LostReason::ExpiredSubscribed as usize]
            .fetch_add(subscribed, Ordering::Relaxed);
        if subscribed > 0 {
            tracing::warn!(channel = %name, lost = subscribed, reason = "expired_subscribed", "Events left history undelivered while someone was subscribed.");
        }
    }
}
