//! The shared dead letters (`aw:deadletters`) and the malformed ingest entries set aside.

use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::AsyncCommands;
use tokio::sync::mpsc::error::TrySendError;

use super::keys::{DEADLETTERS, Entry, field};
use super::reports::Report;
use super::{RedisBroker, reports};
use crate::broker::{BrokerError, now_ms};
use crate::deadletter::Page;
use crate::fanout::{DroppedReport, dropped_report};
use crate::metrics::Metrics;
use crate::protocol::packed::PackedEvent;
use crate::telemetry::Throttle;

impl RedisBroker {
    /// A dead letter as it is stored.
    pub fn letter(
        run_id: &str,
        reason: &str,
        event_json: &str,
        origin: Option<&str>,
        unresolved: bool,
    ) -> reports::DeadLetter {
        reports::DeadLetter {
            run_id: run_id.to_string(),
            reason: reason.to_string(),
            lost_ms: now_ms(),
            event: event_json.to_string(),
            origin: origin.map(str::to_string),
            unresolved,
        }
    }

    /// Queues a dead letter for the shared stream (written by the report task, retried while Redis
    /// is away). A full queue drops it: counted, and logged with the event at most once per
    /// interval (the event is already counted lost `unresolved`).
    pub fn keep_dead_letter(&self, letter: reports::DeadLetter, metrics: &Metrics) {
        if let Err(refused) = self.reports.try_send(Report::DeadLetter(letter)) {
            dropped_report(metrics, DroppedReport::DeadLetter);
            let why = match &refused {
                TrySendError::Full(_) => "the report queue is full",
                TrySendError::Closed(_) => "the report task has stopped (shutdown)",
            };
            static NOT_KEPT: Throttle = Throttle::every(Duration::from_secs(10));
            if let Report::DeadLetter(letter) = refused.into_inner()
                && let Some(held_back) = NOT_KEPT.allow()
            {
                tracing::error!(target: "agentwire::deadletter", run_id = %letter.run_id, event = %letter.event, why, held_back, "Dead letter not kept.");
            }
        }
    }

    /// Writes dead letters, trims the stream to `deadletter.capacity` (what the trim removes is
    /// counted in `agentwire_deadletters_dropped_total`), and counts the run id of each unresolved
    /// letter in `agentwire_unresolved_run_ids_total` once an hour across replicas (`aw:unresolved:{run}`,
    /// set only by the first). The letters stored leave `letters`; on an error those left are for
    /// a retry.
    pub(crate) async fn store_dead_letters(
        &self,
        letters: &mut Vec<reports::DeadLetter>,
        metrics: &Metrics,
    ) -> Result<(), BrokerError> {
        let mut commands = Vec::with_capacity(letters.len() * 2);
        for letter in letters.iter() {
            let mut add = redis::cmd("XADD");
            add.arg(DEADLETTERS)
                .arg("*")
                .arg("run_id")
                .arg(&letter.run_id)
                .arg("reason")
                .arg(&letter.reason)
                .arg("lost_ms")
                .arg(letter.lost_ms)
                .arg("event")
                .arg(&letter.event);
            if let Some(origin) = &letter.origin {
                add.arg("origin").arg(origin);
            }
            commands.push(add);
        }
        // Apart from the adds, because `XTRIM` says how many it removed (`XADD … MAXLEN` does
        // not): the oldest letters pushed out are counted, as the embedded broker counts them.
        let mut trim = redis::cmd("XTRIM");
        trim.arg(DEADLETTERS)
            .arg("MAXLEN")
            .arg(self.deadletter_capacity);
        commands.push(trim);
        let mut runs: Vec<&str> = (letters.iter())
            .filter(|l| l.unresolved)
            .map(|l| l.run_id.as_str())
            .collect();
        runs.sort_unstable();
        runs.dedup();
        for run_id in &runs {
            let mut claim = redis::cmd("SET");
            claim
                .arg(format!("aw:unresolved:{{{run_id}}}"))
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(3_600_000);
            commands.push(claim);
        }
        // One pipeline on one server; on a Cluster the claims are in many slots, each its own
        // pipeline that may fail alone (`Conn::each_reply`).
        let mut replies = self.conn().each_reply(commands).await.into_iter();
        let mut failed = None;
        let mut stored = Vec::with_capacity(letters.len());
        for reply in replies.by_ref().take(letters.len()) {
            match reply {
                Ok(_) => stored.push(true),
                Err(error) => {
                    failed = Some(error);
                    stored.push(false);
                }
            }
        }
        match replies.next() {
            Some(Ok(redis::Value::Int(trimmed))) => {
                metrics.deadletters_dropped.inc_by(trimmed.max(0) as u64);
            }
            // A trim that did not run leaves the stream longer for a while; the next one counts.
            // Counted here only when the letters went in (the caller counts a failed round).
            _ if failed.is_none() => metrics.broker_errors.inc(),
            _ => {}
        }
        let mut new_runs = 0;
        for claim in replies {
            match claim {
                Ok(redis::Value::Nil) => {}
                Ok(_) => new_runs += 1,
                // The run's letters are kept; only this count misses it.
                Err(error) => {
                    metrics.broker_errors.inc();
                    tracing::debug!(%error, "Cannot count an unresolved run id.");
                }
            }
        }
        metrics.unresolved_run_ids.inc_by(new_runs);
        // A letter stored is not sent again (it would be kept twice).
        let mut stored = stored.into_iter();
        letters.retain(|_| !stored.next().unwrap_or(false));
        match failed {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    }

    /// The shared dead letters, oldest first (at most `deadletter.capacity`).
    pub async fn dead_letters(&self) -> Result<Vec<crate::deadletter::Entry>, BrokerError> {
        self.read_dead_letters("-", self.deadletter_capacity).await
    }

    /// Up to `limit` shared dead letters after the entry `after`, oldest first.
    pub async fn dead_letter_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, BrokerError> {
        let start = after.map_or_else(|| "-".to_string(), |id| format!("({id}"));
        // The page and the count in one transaction, so they agree. One more than asked says
        // whether there is a next page.
        let (entries, total): (Vec<Entry>, usize) = redis::pipe()
            .atomic()
            .cmd("XRANGE")
            .arg(DEADLETTERS)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(limit + 1)
            .cmd("XLEN")
            .arg(DEADLETTERS)
            .query_async(&mut self.conn())
            .await?;
        let mut entries = letters(entries);
        let more = entries.len() > limit;
        entries.truncate(limit);
        Ok(Page {
            total,
            next: more.then(|| entries.last().map(|e| e.id.clone())).flatten(),
            events: entries
                .iter()
                .map(crate::deadletter::Entry::report)
                .collect(),
        })
    }

    async fn read_dead_letters(
        &self,
        start: &str,
        count: usize,
    ) -> Result<Vec<crate::deadletter::Entry>, BrokerError> {
        let entries: Vec<Entry> = redis::cmd("XRANGE")
            .arg(DEADLETTERS)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await?;
        Ok(letters(entries))
    }

    /// The newest malformed ingest entries set aside in `<ingest_stream>:dead` (at most 100),
    /// newest first: `{id, entry, reason, event}`.
    pub async fn malformed(&self) -> Result<Vec<serde_json::Value>, BrokerError> {
        let entries: Vec<Entry> = redis::cmd("XREVRANGE")
            .arg(format!("{}:dead", self.config.ingest_stream))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(100)
            .query_async(&mut self.conn())
            .await?;
        Ok(entries
            .into_iter()
            .map(|(id, fields)| {
                let text = |key| field(&fields, key);
                serde_json::json!({"id": id, "entry": text("entry"), "reason": text("reason"), "event": text("event")})
            })
            .collect())
    }

    /// Removes one shared dead letter; `true` only for the replica that removed it (a redrive on
    /// two replicas at once publishes it once).
    pub async fn take_dead_letter(&self, id: &str) -> Result<bool, BrokerError> {
        let removed: u64 = self.conn().xdel(DEADLETTERS, &[id]).await?;
        Ok(removed == 1)
    }

    /// The number of shared dead letters as of the last sweep.
    pub fn dead_letter_count(&self) -> usize {
        self.deadletter_count.load(Ordering::Relaxed) as usize
    }
}

/// Dead letters from their stream entries (an entry that is not one is skipped).
fn letters(entries: Vec<Entry>) -> Vec<crate::deadletter::Entry> {
    entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let text = |key| field(&fields, key).map(str::to_string);
            let lost_ms: u64 = field(&fields, "lost_ms")?.parse().ok()?;
            Some(crate::deadletter::Entry {
                origin: Some(text("origin").unwrap_or_else(|| id.clone())),
                id: crate::deadletter::LetterId::Stream(id),
                run_id: text("run_id")?,
                reason: text("reason")?,
                lost_at: std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(lost_ms),
                event: PackedEvent::from_json(field(&fields, "event")?)?,
            })
        })
        .collect()
}
