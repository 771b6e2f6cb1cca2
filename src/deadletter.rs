//! Dead letters: valid events that found no channel within `resolve.grace`, kept (bounded) with
//! the reason and time so an operator can see them and, once the missing runs are registered,
//! redrive them. This is what a letter is; the broker keeps them (the embedded broker in this
//! process, the Redis broker in the shared `aw:deadletters` stream).
//!
//! Accounting: `agentwire_events_lost_total{reason="unresolved"}` counts every event that was ever
//! dead-lettered and never goes down; a redrive that resolves a dead letter counts it in
//! `agentwire_events_redriven_total` and emits it (or, when its `event_id` was accepted meanwhile,
//! drops it and counts it as a duplicate too). Events lost unresolved right now are therefore
//! `lost{unresolved} - redriven`, and
//! `ingested + generated + redriven = emitted + pending_resolution + lost{unresolved} + duplicates`
//! holds at all times (a redriven event is in `emitted` and in `lost{unresolved}` once each).

use std::time::SystemTime;

use serde::Serialize;

use crate::protocol::packed::PackedEvent;

/// A dead letter's id: a counter in this process, or the entry id of the shared Redis stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum LetterId {
    Local(u64),
    Stream(String),
}

/// One dead-lettered event.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: LetterId,
    /// Redis mode: the id that makes a second publish of this letter a duplicate (its first stream
    /// id, kept when a failed redrive puts it back).
    pub origin: Option<String>,
    pub run_id: String,
    pub reason: String,
    pub lost_at: SystemTime,
    /// Kept as its JSON text: a letter weighs what the producer sent.
    pub event: PackedEvent,
}

impl Entry {
    pub fn report(&self) -> EntryReport {
        EntryReport {
            id: self.id.clone(),
            run_id: self.run_id.clone(),
            kind: self.event.kind.as_str(),
            event_id: self.event.event_id.as_deref().map(str::to_string),
            reason: self.reason.clone(),
            lost_at: humantime::format_rfc3339_millis(self.lost_at).to_string(),
            event: self.event.raw_json(),
        }
    }
}

/// An entry as `GET /v1/deadletter` lists it.
#[derive(Debug, Serialize)]
pub struct EntryReport {
    pub id: LetterId,
    pub run_id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub event_id: Option<String>,
    pub reason: String,
    pub lost_at: String,
    pub event: Box<serde_json::value::RawValue>,
}

/// One page of `GET /v1/deadletter`: at most the asked number of letters after a given id,
/// and the id to ask the next page after (`None` on the last page).
#[derive(Debug, Serialize)]
pub struct Page {
    /// Letters kept in all.
    pub total: usize,
    pub events: Vec<EntryReport>,
    pub next: Option<LetterId>,
}

/// Letters per page when the request does not say, and at most.
pub const PAGE_DEFAULT: usize = 100;
pub const PAGE_MAX: usize = 100;
