//! Runs across replicas: the shared registry (`aw:{runs}:target` and `aw:{runs}:expiry`, bounded
//! by `resolve.registry_ttl` and `resolve.registry_capacity`, announced on `aw:registered`), each
//! run's last activity (`aw:runseen:{run}`), and the claim that lets one replica report a stall.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use super::keys::{REGISTERED, RUN_EXPIRY, RUN_TARGETS, run_seen_key};
use super::{PER_REPORT_CALL, RedisBroker, evalsha};
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

/// What became of a registration in the shared registry.
pub enum Registration {
    /// Registered now, or the same registration again (it lives on from now).
    Done,
    /// The run is registered to another channel: that registration.
    Taken(RunTarget),
    /// The registry holds `resolve.registry_capacity` live registrations.
    Full,
}

impl RedisBroker {
    /// Records a run's target in the shared registry and tells every replica. A run registered
    /// to another channel is left as it is (its target is returned), and a new run is refused
    /// while the registry is full; both decided in one script, so two replicas cannot both win.
    pub async fn register(
        &self,
        run_id: &str,
        target: &RunTarget,
    ) -> Result<Registration, BrokerError> {
        let channel = target
            .channel()
            .map(|c| c.as_str().to_string())
            .unwrap_or_default();
        let value = serde_json::json!({
            "thread_id": target.thread_id,
            "user_id": target.user_id,
            "channel": channel,
        })
        .to_string();
        let mut conn = self.conn();
        let (status, existing): (u8, String) = self
            .scripts
            .register
            .key(RUN_TARGETS)
            .key(RUN_EXPIRY)
            .arg(run_id)
            .arg(&value)
            .arg(&channel)
            .arg(now_ms())
            .arg(self.registry_ttl.as_millis() as u64)
            .arg(self.registry_capacity)
            .invoke_async(&mut conn)
            .await?;
        match status {
            0 => {
                return Ok(parse_target(&existing).map_or(Registration::Full, Registration::Taken));
            }
            2 => return Ok(Registration::Full),
            _ => {}
        }
        let () = redis::cmd(self.publish_command())
            .arg(REGISTERED)
            .arg(format!("{run_id}\n{value}"))
            .query_async(&mut conn)
            .await?;
        Ok(Registration::Done)
    }

    /// The registered target of a run, if any replica registered it within the TTL.
    pub async fn registered(&self, run_id: &str) -> Result<Option<RunTarget>, BrokerError> {
        let (value, until): (Option<String>, Option<f64>) = redis::pipe()
            .hget(RUN_TARGETS, run_id)
            .zscore(RUN_EXPIRY, run_id)
            .query_async(&mut self.conn())
            .await?;
        // An expired registration stays until a later registration removes it.
        if until.is_none_or(|until| until <= now_ms() as f64) {
            return Ok(None);
        }
        Ok(value.as_deref().and_then(parse_target))
    }

    /// Records what this replica last saw of `runs` (last publish ms, and whether it ended), for
    /// other replicas' watchdogs: a script call per [`PER_REPORT_CALL`] runs (of one slot on a
    /// Cluster), all in one round trip (one per slot on a Cluster).
    pub(crate) async fn runs_seen(
        &self,
        runs: &HashMap<String, (u64, bool)>,
    ) -> Result<(), BrokerError> {
        let ttl = self.run_seen_ttl.as_millis().max(1) as u64;
        let runs: Vec<(String, String)> = (runs.iter())
            .map(|(run_id, (ms, ended))| {
                let value = match ended {
                    true => format!("end:{ms}"),
                    false => ms.to_string(),
                };
                (run_seen_key(run_id), value)
            })
            .collect();
        // One key per run: on a Cluster they are in many slots.
        let groups = self
            .backend
            .script_calls(runs.iter().map(|(key, _)| key.as_str()), PER_REPORT_CALL);
        let calls = || {
            (groups.iter())
                .map(|group| {
                    let keys: Vec<&str> = group.iter().map(|&i| runs[i].0.as_str()).collect();
                    let bytes = group.iter().map(|&i| runs[i].1.len()).sum::<usize>() + 20;
                    let mut call = evalsha(&self.scripts.seen, &keys, 1 + group.len(), bytes);
                    call.arg(ttl);
                    for &i in group {
                        call.arg(&runs[i].1);
                    }
                    call
                })
                .collect()
        };
        let replies = self.call_each(&self.scripts.seen, calls).await;
        match replies.into_iter().find_map(Result::err) {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
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
