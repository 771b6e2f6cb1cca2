//! Runs across replicas: the shared registry (`aw:run:{run}`, announced on `aw:registered`), each
//! run's last activity (`aw:runseen:{run}`), and the claim that lets one replica report a stall.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use super::RedisBroker;
use super::keys::{REGISTERED, run_key, run_seen_key};
use crate::broker::{Activity, BrokerError, now_ms};
use crate::protocol::run::RunTarget;

/// A registration as stored in the registry and announced on [`REGISTERED`].
pub fn parse_target(value: &str) -> Option<RunTarget> {
    let value: serde_json::Value = serde_json::from_str(value).ok()?;
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
    Some(RunTarget {
        thread_id: text("thread_id"),
        user_id: text("user_id"),
    })
}

impl RedisBroker {
    /// Records a run's target in the shared registry and tells every replica.
    /// Records a run's target in the shared registry and tells every replica. A run registered
    /// to another channel is left as it is: its target is returned instead (`SET NX GET`, one
    /// step, so two replicas cannot both win).
    pub async fn register(
        &self,
        run_id: &str,
        target: &RunTarget,
    ) -> Result<Option<RunTarget>, BrokerError> {
        let value = serde_json::json!({"thread_id": target.thread_id, "user_id": target.user_id})
            .to_string();
        let ttl = self.registry_ttl.as_millis() as u64;
        let mut conn = self.conn();
        let existing: Option<String> = conn
            .set_options(
                run_key(run_id),
                &value,
                redis::SetOptions::default()
                    .conditional_set(redis::ExistenceCheck::NX)
                    .get(true)
                    .with_expiration(redis::SetExpiry::PX(ttl)),
            )
            .await?;
        if let Some(existing) = existing.as_deref().and_then(parse_target)
            && existing.channel() != target.channel()
        {
            return Ok(Some(existing));
        }
        let mut pipe = redis::pipe();
        if existing.is_some() {
            // The same registration again: it lives on from now.
            pipe.pexpire(run_key(run_id), ttl as i64).ignore();
        }
        let () = pipe
            .publish(REGISTERED, format!("{run_id}\n{value}"))
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(None)
    }

    /// The registered target of a run, if any replica registered it within the TTL.
    pub async fn registered(&self, run_id: &str) -> Result<Option<RunTarget>, BrokerError> {
        let value: Option<String> = self.conn().get(run_key(run_id)).await?;
        Ok(value.as_deref().and_then(parse_target))
    }

    pub(crate) async fn runs_seen(
        &self,
        runs: &HashMap<String, (u64, bool)>,
    ) -> Result<(), BrokerError> {
        let ttl = self.run_seen_ttl.as_millis().max(1) as u64;
        let mut pipe = redis::pipe();
        for (run_id, (ms, ended)) in runs {
            let value = if *ended {
                format!("end:{ms}")
            } else {
                ms.to_string()
            };
            pipe.set_options(
                run_seen_key(run_id),
                value,
                redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl)),
            )
            .ignore();
        }
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// What the replicas last saw of a run; `None` when nothing is recorded.
    pub async fn run_activity(&self, run_id: &str) -> Result<Option<Activity>, BrokerError> {
        let value: Option<String> = self.conn().get(run_seen_key(run_id)).await?;
        Ok(value.and_then(|value| {
            if value.starts_with("end:") {
                return Some(Activity::Ended);
            }
            let ms: u64 = value.parse().ok()?;
            Some(Activity::Seen(Duration::from_millis(
                now_ms().saturating_sub(ms),
            )))
        }))
    }

    /// Claims the report of a stalled run for this replica: `true` for exactly one replica.
    pub async fn claim_stall(&self, run_id: &str, retain: Duration) -> Result<bool, BrokerError> {
        let claimed: Option<String> = self
            .conn()
            .set_options(
                format!("aw:stalled:{{{run_id}}}"),
                1,
                redis::SetOptions::default()
                    .conditional_set(redis::ExistenceCheck::NX)
                    .with_expiration(redis::SetExpiry::PX(retain.as_millis().max(1) as u64)),
            )
            .await?;
        Ok(claimed.is_some())
    }
}
