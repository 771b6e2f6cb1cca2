//! Publishing into a channel: one script sequences the event, appends it to `:log`, updates the
//! `:meta` ledger, dedupes by `event_id` and ingest entry id, trims, and `PUBLISH`es it to `:live`.

use std::sync::atomic::Ordering;

use super::RedisBroker;
use super::keys::Keys;
use super::reports::Report;
use crate::broker::{BrokerError, Outcome, Published, now_ms};
use crate::ledger::LostReason;
use crate::protocol::ChannelName;
use crate::protocol::event::{Event, EventType};
use crate::protocol::server;

pub(super) fn new_epoch() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}

impl RedisBroker {
    pub async fn publish(
        &self,
        name: &ChannelName,
        event: &Event,
        entry: Option<&str>,
    ) -> Result<Outcome, BrokerError> {
        if !self.is_up() {
            return Err(BrokerError::Unavailable("Redis is not answering".into()));
        }
        let keys = Keys::of(name);
        let now = now_ms();
        let produced = event
            .ts
            .as_deref()
            .filter(|ts| ts.ends_with('Z'))
            .and_then(|ts| humantime::parse_rfc3339_weak(ts).ok())
            .and_then(|at| at.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_millis().to_string())
            .unwrap_or_default();
        let body = server::event_body(event, name);
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(&keys.log)
            .key(&keys.meta)
            .key(&keys.seen)
            .key(&keys.delivered)
            .key(&keys.offered)
            .arg(body)
            .arg(now)
            .arg(produced)
            .arg(self.history.max_events)
            .arg(now.saturating_sub(self.history.max_age.as_millis() as u64))
            .arg(now.saturating_sub(self.dedupe_window.as_millis() as u64))
            .arg(new_epoch())
            .arg(&keys.live)
            .arg(self.dedupe_capacity.max(1))
            .arg(self.publish_command());
        if let Some(event_id) = event.dedupe_id() {
            invocation.arg(format!("e:{event_id}"));
        }
        if let Some(entry) = entry {
            invocation.arg(format!("x:{entry}"));
        }
        let mut conn = self.conn();
        let (status, epoch, seq, unseen, subscribed): (u8, String, u64, u64, u64) =
            invocation.invoke_async(&mut conn).await?;
        if status == 0 {
            return Ok(Outcome::Duplicate);
        }
        self.counters.emitted.fetch_add(1, Ordering::Relaxed);
        self.count_lost(name, unseen, subscribed);
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
        Ok(Outcome::Published(Published {
            seq,
            epoch: epoch.into(),
        }))
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
