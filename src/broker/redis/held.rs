//! The journal of held events: an event that waits for its run is kept in this replica's memory
//! (the resolver's pending set, which decides order and budgets) and, before the producer is
//! answered `pending_resolution`, appended to this replica's journal in Redis
//! (`aw:{held}:<replica>`, fields `run`, `event`, `producer`, `origin`). It leaves the journal once
//! it is published or dead-lettered. Every replica beats in `aw:{held}:alive` (replica → until when
//! it counts as alive, ms); a replica whose beat is older than `broker.claim_idle` is presumed dead,
//! and the first replica to notice moves its journal into its own (`adopt.lua`, one slot) and holds
//! those events as if they had been posted to it.

use std::sync::atomic::Ordering;

use super::RedisBroker;
use super::reports::Report;
use crate::broker::{BrokerError, now_ms};
use crate::protocol::packed::{Journaled, PackedEvent};

/// Every replica's heartbeat: replica name → the ms until which it counts as alive.
const ALIVE: &str = "aw:{held}:alive";
/// Events moved out of a dead replica's journal per script call.
const BATCH: usize = 500;
/// Events adopted per call at most (the rest on the next tick), so a tick stays short.
const PER_CALL: usize = 2_000;
/// Dead replicas looked at per call.
const REPLICAS: isize = 8;

/// The journal of one replica.
fn journal(replica: &str) -> String {
    format!("aw:{{held}}:{replica}")
}

impl RedisBroker {
    /// Until when this replica counts as alive if it beats now.
    fn alive_until(&self) -> u64 {
        now_ms() + self.config.claim_idle.as_millis() as u64
    }

    /// Appends a held event to this replica's journal (and beats, so a replica that dies before
    /// its first housekeeping tick is found). The producer is answered only after this.
    pub async fn journal(&self, event: &PackedEvent) -> Result<Journaled, BrokerError> {
        if !self.is_up() {
            return Err(BrokerError::Unavailable("Redis is not answering".into()));
        }
        let key = journal(&self.replica);
        let mut add = redis::cmd("XADD");
        add.arg(&key)
            .arg("*")
            .arg("run")
            .arg(event.run_id.as_deref().unwrap_or_default())
            .arg("event")
            .arg(event.json());
        if let Some(producer) = &event.producer {
            add.arg("producer").arg(producer.as_ref());
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(add)
            .cmd("ZADD")
            .arg(ALIVE)
            .arg("GT")
            .arg(self.alive_until())
            .arg(&self.replica)
            .ignore();
        let (id,): (String,) = pipe.query_async(&mut self.conn()).await?;
        Ok(Journaled {
            origin: id.clone().into(),
            id: id.into(),
        })
    }

    /// Takes a held event out of the journal once it is published or dead-lettered: through the
    /// report queue, after the dead letters queued before it (retried while Redis is away). A
    /// full queue leaves the entry, logged: it is adopted after this replica stops and published
    /// again, which its `origin` makes a duplicate, or dead-lettered again.
    pub fn settle(&self, journaled: &Journaled) {
        if self
            .reports
            .try_send(Report::Settled(journaled.id.clone()))
            .is_err()
        {
            static UNSETTLED: crate::telemetry::Throttle =
                crate::telemetry::Throttle::every(std::time::Duration::from_secs(10));
            if let Some(held_back) = UNSETTLED.allow() {
                tracing::warn!(id = %journaled.id, held_back, "A held event stays in the journal: the report queue is full or closed.");
            }
        }
    }

    /// Removes settled entries from this replica's journal.
    pub(super) async fn settled(&self, ids: &[Box<str>]) -> Result<(), BrokerError> {
        let mut del = redis::cmd("XDEL");
        del.arg(journal(&self.replica));
        for id in ids {
            del.arg(id.as_ref());
        }
        let _: usize = del.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Beats, then moves the held events of replicas presumed dead (no beat for
    /// `broker.claim_idle`) into this replica's journal and returns them, oldest first per dead
    /// replica, to be held here. At most [`PER_CALL`] per call.
    pub async fn adopt(&self) -> Result<Vec<PackedEvent>, BrokerError> {
        if !self.is_up() {
            return Err(BrokerError::Unavailable("Redis is not answering".into()));
        }
        let mut conn = self.conn();
        let now = now_ms();
        let () = redis::cmd("ZADD")
            .arg(ALIVE)
            .arg("GT")
            .arg(self.alive_until())
            .arg(&self.replica)
            .query_async(&mut conn)
            .await?;
        // After a Redis outage (or at start) every replica's mark is stale: adopt only once this
        // one has marked itself recently, so the others have had a tick to mark themselves too.
        let previous = self.last_beat.swap(now, Ordering::Relaxed);
        if now.saturating_sub(previous) > self.config.claim_idle.as_millis() as u64 / 2 {
            return Ok(Vec::new());
        }
        let dead: Vec<String> = redis::cmd("ZRANGE")
            .arg(ALIVE)
            .arg("-inf")
            .arg(format!("({now}"))
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(REPLICAS)
            .query_async(&mut conn)
            .await?;
        let mut adopted = Vec::new();
        if let Err(error) = self.adopt_from(&dead, now, &mut adopted).await {
            // What earlier calls moved is in this replica's journal now: it is held here all the
            // same (a later tick goes on).
            if adopted.is_empty() {
                return Err(error);
            }
            tracing::debug!(%error, adopted = adopted.len(), "Adoption stopped early; the events moved so far are held here.");
        }
        Ok(adopted)
    }

    /// Moves the journals of the `dead` replicas into this one's, adding what it moved to
    /// `adopted` as it goes (so an error keeps what was moved before it).
    async fn adopt_from(
        &self,
        dead: &[String],
        now: u64,
        adopted: &mut Vec<PackedEvent>,
    ) -> Result<(), BrokerError> {
        let mut conn = self.conn();
        let mine = journal(&self.replica);
        for replica in dead.iter().filter(|r| **r != self.replica) {
            while adopted.len() < PER_CALL {
                let moved: Vec<Vec<String>> = self
                    .scripts
                    .adopt
                    .key(ALIVE)
                    .key(journal(replica))
                    .key(&mine)
                    .arg(replica)
                    .arg(now)
                    .arg(BATCH)
                    .arg(self.alive_until())
                    .arg(&self.replica)
                    .invoke_async(&mut conn)
                    .await?;
                let last = moved.len() < BATCH;
                for entry in moved {
                    let id = entry.first().cloned().unwrap_or_default();
                    match adopted_event(entry) {
                        Some(event) => adopted.push(event),
                        // Not made by `journal` (someone wrote to the key): nothing to hold.
                        // Not `?`: the entries after it were moved too and must be held.
                        None => {
                            tracing::warn!(replica, id, "An unreadable journal entry was dropped.");
                            if let Err(error) = self.settled(&[id.into()]).await {
                                tracing::debug!(%error, "The unreadable entry stays in the journal.");
                            }
                        }
                    }
                }
                if last {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// One event `adopt.lua` moved: `[id, run, event, origin, producer?]`.
fn adopted_event(entry: Vec<String>) -> Option<PackedEvent> {
    let mut fields = entry.into_iter();
    let (id, _run, json, origin) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let mut event = PackedEvent::from_json(&json)?;
    event.producer = fields.next().map(Into::into);
    event.journal = Some(Journaled {
        id: id.into(),
        origin: origin.into(),
    });
    Some(event)
}
