//! An event as AG-UI clients receive it: rendered from its native frame the first time an AG-UI
//! client needs it, then kept beside the native bytes and shared like them, so each event is
//! serialised once per format, not once per client.

use bytes::Bytes;
use serde_json::Value;

use std::sync::Arc;

use super::StoredEvent;
use crate::protocol::agui::{self, Sequence};
use crate::protocol::server;

/// What an AG-UI client joining at the end of `context` (the earlier events of the run open
/// where its replay starts) must see first so that the rest passes AG-UI's verification:
/// RUN_STARTED and a start for everything still open. Empty when nothing is open.
pub fn prelude(context: &[Arc<StoredEvent>]) -> Vec<Value> {
    let mut sequence = Sequence::default();
    for event in context {
        for agui in event.agui().events.iter() {
            if let Ok(Value::Object(fields)) = serde_json::from_slice(agui) {
                // Violations were counted when the events came in.
                let _ = sequence.apply_fields(&fields);
            }
        }
    }
    sequence.prelude()
}

/// One event's AG-UI form.
#[derive(Debug)]
pub struct AguiFrames {
    /// Each AG-UI event, serialised (one native event may become several: a tool call's start,
    /// arguments and end).
    pub events: Box<[Bytes]>,
    /// The `/ws` frame: `{"type":"agui","channel":…,"epoch":…,"seq":…,"events":[…]}`.
    pub frame: Bytes,
    pub channel: Box<str>,
    pub epoch: Box<str>,
}

impl AguiFrames {
    pub(super) fn render(native: &[u8], seq: u64) -> Self {
        let frame: Value = serde_json::from_slice(native).unwrap_or_default();
        let text = |name: &str| frame.get(name).and_then(Value::as_str).unwrap_or_default();
        let (channel, epoch) = (text("channel"), text("epoch"));
        let events = agui::render(&frame);
        Self {
            frame: server::agui_frame(channel, epoch, seq, &events, false),
            events: events
                .iter()
                .map(|event| Bytes::from(event.to_string()))
                .collect(),
            channel: channel.into(),
            epoch: epoch.into(),
        }
    }
}
