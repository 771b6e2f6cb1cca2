//! An event as AG-UI clients receive it: rendered from its native frame the first time an AG-UI
//! client needs it, then kept beside the native bytes and shared like them, so each event is
//! serialised once per format, not once per client.

use bytes::Bytes;
use serde_json::Value;

use crate::protocol::agui;
use crate::protocol::server;

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
