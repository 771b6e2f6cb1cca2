//! An event kept while it waits (the pending set) or after it was given up (a dead letter): its
//! JSON text, a few bytes per field instead of a parsed tree (a body of `[{},{},…]` parses to about
//! 24 times its size), and the fields a list or a dedupe needs. Unpacked when it is published.

use std::sync::Arc;

use serde_json::value::RawValue;

use super::event::{self, Event, EventType};

/// Bookkeeping around one kept event besides its text (the struct, its allocations' headers).
const OVERHEAD: usize = 96;

#[derive(Debug, Clone)]
pub struct PackedEvent {
    json: Box<str>,
    pub kind: EventType,
    pub run_id: Option<Box<str>>,
    pub event_id: Option<Box<str>>,
    /// The producer key that posted it (not in the JSON, as on the wire).
    pub producer: Option<Arc<str>>,
    /// Redis mode: where it is kept durably while it waits for its run, so that another replica
    /// can adopt it if this one dies (`None` once published, and in embedded mode).
    pub journal: Option<Journaled>,
}

/// A held event's entry in its replica's journal (Redis mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journaled {
    /// The entry id in the journal of the replica holding it now.
    pub id: Box<str>,
    /// The id of its first journal entry, kept when another replica adopts it: published with it
    /// as its dedupe id, so an event published by a replica presumed dead and again by the one
    /// that adopted it is sequenced once.
    pub origin: Box<str>,
}

impl PackedEvent {
    pub fn pack(event: &Event) -> Self {
        Self {
            json: event.to_text().into(),
            kind: event.kind,
            run_id: event.run_id.as_deref().map(Into::into),
            event_id: event.event_id.as_deref().map(Into::into),
            producer: event.producer.clone(),
            journal: None,
        }
    }

    /// A kept event read back from its JSON text (a shared dead letter); `None` if it is not a
    /// valid event.
    pub fn from_json(json: &str) -> Option<Self> {
        event::parse(json, usize::MAX)
            .ok()
            .map(|event| Self::pack(&event))
    }

    /// The event again, to publish; `None` only if the text was not made by [`Self::pack`].
    pub fn unpack(&self) -> Option<Event> {
        let mut event = event::parse(&self.json, usize::MAX).ok()?;
        event.producer = self.producer.clone();
        Some(event)
    }

    /// The event as the producer sent it (without the producer key).
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The same, to embed in a JSON answer as it is.
    pub fn raw_json(&self) -> Box<RawValue> {
        RawValue::from_string(self.json.to_string()).unwrap_or_default()
    }

    /// What dedupe remembers (see [`Event::dedupe_id`]).
    pub fn dedupe_id(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(event::dedupe_id(
            self.producer.as_deref(),
            self.event_id.as_deref()?,
        ))
    }

    /// What keeping it costs, in bytes (approximate, for the byte budgets). The producer's id is
    /// its key's, shared.
    pub fn weight(&self) -> usize {
        let text = |field: &Option<Box<str>>| field.as_ref().map_or(0, |s| s.len());
        OVERHEAD + self.json.len() + text(&self.run_id) + text(&self.event_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packed_event_is_its_text_and_unpacks_to_the_same_event() {
        let text = format!(
            r#"{{"type":"agent_thinking","run_id":"r1","event_id":"e1","payload":{{"x":[{}]}}}}"#,
            vec!["{}"; 1000].join(",")
        );
        let mut event = event::parse(&text, usize::MAX).unwrap();
        event.producer = Some("p1".into());
        let packed = PackedEvent::pack(&event);
        assert!(packed.weight() < text.len() + 200, "{}", packed.weight());
        let back = packed.unpack().unwrap();
        assert_eq!(back.to_text(), event.to_text());
        assert_eq!(back.producer.as_deref(), Some("p1"));
        assert_eq!(packed.dedupe_id().as_deref(), Some("p1:e1"));
        assert_eq!(packed.raw_json().get(), packed.json());
    }
}
