//! Frames the gateway sends on `/ws`. Control frames are small and built per use; an event frame
//! is serialised once per event ([`Unsequenced`] outside the channel lock, its seq and epoch
//! written before it inside the lock; [`event_body`] and [`event_frame`] where the body crosses
//! Redis) and its bytes are shared by every subscriber.

use bytes::{Buf, Bytes};
use serde::Serialize;
use serde_json::json;

use super::channel::ChannelName;
use super::event::Event;

/// Machine-readable codes of `{"type":"error"}` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidFrame,
    UnknownType,
    BinaryNotSupported,
    HelloRequired,
    AlreadyHello,
    AlreadySubscribed,
    NotSubscribed,
    TooManySubscriptions,
    InvalidAck,
    UpstreamNotConfigured,
    UpstreamBusy,
    BrokerUnavailable,
    /// `hello`'s token was missing or refused (the connection then closes with 4003).
    Unauthorized,
    /// A subscription the connection's token does not allow.
    Forbidden,
    /// More messages than `session.message_rate` allows (the connection then closes with 4029).
    RateLimited,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 16] = [
        Self::RateLimited,
        Self::Unauthorized,
        Self::Forbidden,
        Self::UpstreamBusy,
        Self::BrokerUnavailable,
        Self::InvalidJson,
        Self::InvalidFrame,
        Self::UnknownType,
        Self::BinaryNotSupported,
        Self::HelloRequired,
        Self::AlreadyHello,
        Self::AlreadySubscribed,
        Self::NotSubscribed,
        Self::TooManySubscriptions,
        Self::InvalidAck,
        Self::UpstreamNotConfigured,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidFrame => "invalid_frame",
            Self::UnknownType => "unknown_type",
            Self::BinaryNotSupported => "binary_not_supported",
            Self::HelloRequired => "hello_required",
            Self::AlreadyHello => "already_hello",
            Self::AlreadySubscribed => "already_subscribed",
            Self::NotSubscribed => "not_subscribed",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::InvalidAck => "invalid_ack",
            Self::UpstreamNotConfigured => "upstream_not_configured",
            Self::UpstreamBusy => "upstream_busy",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// WebSocket close codes the gateway uses.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    /// A text message that is not UTF-8 (RFC 6455 §7.4.1).
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_LARGE: u16 = 1009;
    pub const RESTARTING: u16 = 1012;
    pub const HELLO_MISSING: u16 = 4001;
    /// `hello`'s token was missing or refused.
    pub const UNAUTHORIZED: u16 = 4003;
    /// The connection's token expired without a `refresh`.
    pub const TOKEN_EXPIRED: u16 = 4004;
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The client sent more messages than `session.message_rate` allows.
    pub const RATE_LIMITED: u16 = 4029;
}

/// `{"type":…,"channel":…,…}`: everything but the seq and the epoch, which the broker adds (in
/// Redis mode the epoch is known only once the event is sequenced).
pub fn event_body(event: &Event, channel: &ChannelName) -> Vec<u8> {
    event.wire(Some(channel)).to_vec()
}

/// The frame a subscriber receives: `{"seq":N,"epoch":E,` followed by the body without its `{`.
pub fn event_frame(body: &[u8], seq: u64, epoch: &str) -> Bytes {
    let mut digits = itoa::Buffer::new();
    let prefix = prefix(digits.format(seq), epoch);
    let rest = body.get(1..).unwrap_or_default();
    // Exactly its size: a buffer with room to spare becomes `Bytes` through a second allocation.
    let mut frame =
        Vec::with_capacity(prefix.iter().map(|part| part.len()).sum::<usize>() + rest.len());
    for part in prefix {
        frame.extend_from_slice(part);
    }
    frame.extend_from_slice(rest);
    Bytes::from(frame)
}

/// `{"seq":N,"epoch":"E",` in its parts.
fn prefix<'a>(digits: &'a str, epoch: &'a str) -> [&'a [u8]; 5] {
    // Epochs are hex digits: nothing to escape.
    [
        b"{\"seq\":",
        digits.as_bytes(),
        b",\"epoch\":\"",
        epoch.as_bytes(),
        b"\",",
    ]
}

/// An event's body written after room for its seq and epoch, so that its frame is made where it
/// lies ([`Self::into_frame`]) instead of copied: the embedded broker serialises it before the
/// channel lock and learns the seq inside it.
pub struct Unsequenced(Vec<u8>);

/// `{"seq":` with the longest seq, `,"epoch":"` with an epoch of 16 digits and `",`, less the
/// body's `{` the last of them takes the place of. A frame keeps what its prefix leaves unused
/// (19 bytes at most), which history weighs with it.
const ROOM: usize = 7 + 20 + 10 + 16 + 2 - 1;

impl Unsequenced {
    pub fn new(event: &Event, channel: &ChannelName) -> Self {
        let wire = event.wire(Some(channel));
        let mut text = Vec::with_capacity(ROOM + wire.written_len());
        text.resize(ROOM, b' ');
        wire.write(&mut text);
        Self(text)
    }

    /// The frame [`event_frame`] makes, made in this buffer: not copied, and shared as it is
    /// when the body took the size foreseen (no text needed escaping).
    pub fn into_frame(self, seq: u64, epoch: &str) -> Bytes {
        let mut digits = itoa::Buffer::new();
        let prefix = prefix(digits.format(seq), epoch);
        let len: usize = prefix.iter().map(|part| part.len()).sum();
        let Some(start) = (ROOM + 1).checked_sub(len) else {
            // An epoch longer than foreseen leaves no room: a copy.
            return event_frame(&self.0[ROOM..], seq, epoch);
        };
        let mut text = self.0;
        let mut at = start;
        for part in prefix {
            text[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let mut frame = Bytes::from(text);
        frame.advance(start);
        frame
    }
}

/// How a client receives events: the native frames, or AG-UI (`hello.protocol = "ag-ui"` on
/// `/ws`, `format=agui` on the SSE endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Native,
    AgUi,
}

impl Format {
    /// The format the SSE endpoint's `format` parameter names: `native` or `agui`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "native" => Some(Self::Native),
            "agui" => Some(Self::AgUi),
            _ => None,
        }
    }
}

/// An AG-UI client's frame on `/ws`: the AG-UI events of one event with the gateway's cursor
/// beside them (not in AG-UI's `metadata`, which AG-UI merges into messages). A `prelude` frame
/// carries what a client joining mid-run must see first; its `seq` is the position it precedes,
/// and it is not an event of the channel.
pub fn agui_frame(
    channel: &str,
    epoch: &str,
    seq: u64,
    events: &[serde_json::Value],
    prelude: bool,
) -> Bytes {
    let mut frame =
        json!({"type": "agui", "channel": channel, "epoch": epoch, "seq": seq, "events": events});
    if prelude {
        frame["prelude"] = true.into();
    }
    self::frame(frame)
}

/// The `type` of an event frame made by [`event_frame`], read without parsing it: the body
/// starts with its type, and the seq and epoch before it cannot contain a quote.
pub fn frame_type(frame: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"type\":\"";
    let at = frame.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = frame.get(at..)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// The epoch an [`event_frame`] carries, read back from its fixed prefix (`{"seq":N,"epoch":"E",`)
/// without parsing the event: an event stream's `id:` line names the epoch of every event.
pub fn event_frame_epoch(frame: &[u8]) -> Option<&str> {
    let rest = frame.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = rest.get(digits..)?.strip_prefix(b",\"epoch\":\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(rest.get(..end)?).ok()
}

pub fn welcome(connection_id: &str, user_id: &str, heartbeat_ms: u64) -> Bytes {
    frame(
        json!({"type": "welcome", "connection_id": connection_id, "user_id": user_id, "heartbeat_ms": heartbeat_ms}),
    )
}

/// What a subscription found when it was made.
#[derive(Debug, Clone, Serialize)]
pub struct Subscribed {
    pub channel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    pub epoch: String,
    /// The channel's last seq at the moment of subscribing.
    pub seq: u64,
    pub recovered: bool,
    pub replayed: usize,
    /// Events that the client asked for but history no longer holds, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed: Option<u64>,
}

pub fn subscribed(report: &Subscribed) -> Bytes {
    let mut value = serde_json::to_value(report).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert("type".into(), "subscribed".into());
    }
    frame(value)
}

pub fn unsubscribed(thread_id: &str) -> Bytes {
    frame(json!({"type": "unsubscribed", "thread_id": thread_id}))
}

pub fn error(code: ErrorCode, message: &str) -> Bytes {
    frame(json!({"type": "error", "code": code.as_str(), "message": message}))
}

/// The answer to an HLink message: queued for the agent backends under `message_id`.
/// `entry_id` is the `ui_events` stream entry the message went to (Redis mode).
pub fn websocket_ack(message_id: &str, client_id: Option<&str>, entry_id: Option<&str>) -> Bytes {
    let mut ack = json!({"type": "websocket_ack", "message_id": message_id, "id": client_id, "status": "queued"});
    if let Some(entry_id) = entry_id {
        ack["entry_id"] = entry_id.into();
    }
    frame(ack)
}

pub fn pong() -> Bytes {
    Bytes::from_static(br#"{"type":"pong"}"#)
}

/// The connection's token expires in `expires_in_ms`: send `refresh` with a new one.
pub fn token_expiring(expires_in_ms: u64) -> Bytes {
    frame(json!({"type": "token_expiring", "expires_in_ms": expires_in_ms}))
}

/// A `refresh` was accepted: the connection now lives until the new token expires.
pub fn refreshed(expires_in_ms: u64) -> Bytes {
    frame(json!({"type": "refreshed", "expires_in_ms": expires_in_ms}))
}

pub fn heartbeat() -> Bytes {
    Bytes::from_static(br#"{"type":"heartbeat"}"#)
}

fn frame(value: serde_json::Value) -> Bytes {
    Bytes::from(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::event;

    #[test]
    fn an_event_frame_gives_its_epoch_back() {
        let frame = event_frame(br#"{"type":"custom","payload":{}}"#, 42, "0123abcd");
        assert_eq!(event_frame_epoch(&frame), Some("0123abcd"));
        assert_eq!(event_frame_epoch(br#"{"type":"subscribed"}"#), None);
        assert_eq!(event_frame_epoch(br#"{"seq":1,"epoch":"e"#), None);
    }

    #[test]
    fn event_frame_is_the_flattened_event_with_its_position() {
        let event = event::parse(
            r#"{"type":"tool_executing","run_id":"r1","thread_id":"t_42","payload":{"tool_call_id":"c1"}}"#,
            1024,
        )
        .unwrap();
        let channel = ChannelName::thread("t_42");
        let body = event_body(&event, &channel);
        let frame: serde_json::Value =
            serde_json::from_slice(&event_frame(&body, 42, "e1")).unwrap();
        assert_eq!(
            frame,
            json!({"type": "tool_executing", "channel": "thread:t_42", "thread_id": "t_42", "seq": 42,
                   "epoch": "e1", "run_id": "r1", "payload": {"tool_call_id": "c1"}})
        );
        // Made in place, the same bytes, whatever the lengths of seq and epoch.
        for (seq, epoch) in [
            (1, "0123456789abcdef"),
            (u64::MAX, "0123456789abcdef"),
            (42, "e1"),
            (u64::MAX, "an epoch longer than the room kept for one"),
        ] {
            let in_place = Unsequenced::new(&event, &channel).into_frame(seq, epoch);
            assert_eq!(in_place, event_frame(&body, seq, epoch));
        }
    }
}
