//! Frames a client sends on `/ws`, decoded once into a closed enum.

use std::borrow::Cow;

use super::json::JsonError;
use super::scan::Members;
use serde_json::{Map, Value};

use super::channel::{ChannelName, check_id};
use super::server::{ErrorCode, Format};

/// A resume position: the last `(epoch, seq)` the client saw. `seq: 0` asks for all retained
/// history, whatever the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub epoch: Option<String>,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// The first frame. With browser authentication `token` is required and names the user
    /// (`user_id`, if given, must agree); without it `user_id` is required.
    Hello {
        user_id: Option<String>,
        token: Option<String>,
        since: Option<Since>,
        /// `protocol`: `"agentwire"` (the default) or `"ag-ui"`.
        format: Format,
    },
    /// `token` is a subscription token for this thread (when the connection's token does not
    /// already allow it).
    Subscribe {
        thread_id: String,
        since: Option<Since>,
        token: Option<String>,
    },
    Unsubscribe {
        thread_id: String,
    },
    Ack {
        channel: ChannelName,
        seq: u64,
    },
    Ping,
    /// A new connection token before the current one expires.
    Refresh {
        token: String,
    },
    /// An HLink message (browser → agent): validated and passed upstream.
    Upstream(Box<UpstreamMessage>),
}

/// An HLink message from a browser to the agent backends.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamMessage {
    pub kind: &'static str,
    /// The client's own id for this message, echoed in `websocket_ack`.
    pub id: Option<String>,
    pub sender: Sender,
    pub recipient: Recipient,
    pub payload: Map<String, Value>,
    pub timestamp: Option<String>,
    pub metadata: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Sender {
    pub agent_id: String,
    pub role: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Recipient {
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
}

/// HLink message types a client may send upstream.
pub const UPSTREAM_TYPES: [&str; 5] = [
    "user_message",
    "narrative.text",
    "expert.response",
    "visual.asset",
    "system.status",
];

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn field(field: &str, reason: &str) -> Self {
        Self::new(ErrorCode::InvalidFrame, format!("`{field}` {reason}"))
    }
}

/// A frame's text as a [`ClientFrame`], or why not. The text is read in one pass
/// ([`super::scan`]) without building a `serde_json::Value`: a frame is small and an ack arrives
/// for every few events a client shows.
pub fn decode(text: &str) -> Result<ClientFrame, FrameError> {
    let fields = Fields::of(text).ok_or_else(|| not_read(text))?;
    let kind = match fields.get("type") {
        Some(raw) => raw
            .string()
            .ok_or_else(|| FrameError::field("type", "must be a string"))?,
        None => return Err(FrameError::field("type", "is required")),
    };
    match kind.as_ref() {
        "hello" => Ok(ClientFrame::Hello {
            user_id: optional(&fields, "user_id", id)?,
            token: optional(&fields, "token", token)?,
            since: since(&fields)?,
            format: match fields.given("protocol") {
                None => Format::Native,
                Some(raw) => match raw.string().as_deref() {
                    Some("agentwire") => Format::Native,
                    Some("ag-ui") => Format::AgUi,
                    _ => {
                        return Err(FrameError::field(
                            "protocol",
                            "must be \"agentwire\" or \"ag-ui\"",
                        ));
                    }
                },
            },
        }),
        "subscribe" => Ok(ClientFrame::Subscribe {
            thread_id: id(&fields, "thread_id")?,
            since: since(&fields)?,
            token: optional(&fields, "token", token)?,
        }),
        "unsubscribe" => Ok(ClientFrame::Unsubscribe {
            thread_id: id(&fields, "thread_id")?,
        }),
        "ack" => {
            let channel = match (fields.get("thread_id"), fields.get("channel")) {
                (Some(_), _) => ChannelName::thread(&id(&fields, "thread_id")?),
                (None, Some(raw)) => {
                    let name = raw
                        .string()
                        .ok_or_else(|| FrameError::field("channel", "must be a string"))?;
                    ChannelName::parse(&name).ok_or_else(|| {
                        FrameError::field("channel", "must be thread:<id> or user:<id>")
                    })?
                }
                (None, None) => return Err(FrameError::field("thread_id", "is required")),
            };
            Ok(ClientFrame::Ack {
                channel,
                seq: seq(&fields)?,
            })
        }
        "ping" => Ok(ClientFrame::Ping),
        "refresh" => Ok(ClientFrame::Refresh {
            token: token(&fields, "token")?,
        }),
        other => match UPSTREAM_TYPES.iter().find(|t| **t == other) {
            Some(kind) => upstream(kind, &fields).map(|m| ClientFrame::Upstream(Box::new(m))),
            None => Err(FrameError::new(
                ErrorCode::UnknownType,
                format!("unknown frame type `{}`", super::excerpt(other)),
            )),
        },
    }
}

/// Why a text the one-pass read did not take is no frame, as serde_json's read of it says.
fn not_read(text: &str) -> FrameError {
    match super::json::parse(text) {
        Err(JsonError::Invalid(e)) => {
            FrameError::new(ErrorCode::InvalidJson, format!("not JSON: {e}"))
        }
        Err(repeated @ JsonError::DuplicateKey(_)) => {
            FrameError::new(ErrorCode::InvalidJson, repeated.to_string())
        }
        Ok(Value::Object(_)) => FrameError::new(
            ErrorCode::InvalidFrame,
            "a frame must not nest objects or arrays more than 64 deep",
        ),
        Ok(_) => FrameError::new(ErrorCode::InvalidFrame, "a frame must be a JSON object"),
    }
}

/// A JSON object's members, each value as its checked text (no key twice anywhere in it).
struct Fields<'a>(Members<'a>);

impl<'a> Fields<'a> {
    fn of(text: &'a str) -> Option<Self> {
        super::scan::members(text).map(Self)
    }

    fn get(&self, name: &str) -> Option<Raw<'a>> {
        (self.0.iter())
            .find(|(key, _)| key == name)
            .map(|(_, raw)| Raw(raw))
    }

    /// An optional member: absent and `null` alike are `None`.
    fn given(&self, name: &str) -> Option<Raw<'a>> {
        self.get(name).filter(|raw| raw.0 != "null")
    }
}

/// One member's value as its checked JSON text.
#[derive(Clone, Copy)]
struct Raw<'a>(&'a str);

impl<'a> Raw<'a> {
    fn string(self) -> Option<Cow<'a, str>> {
        self.0
            .starts_with('"')
            .then(|| super::scan::string(self.0))
            .flatten()
    }

    /// A non-negative integer that fits a `u64` (not `1.0`, not `1e2`), as serde_json's `as_u64`.
    fn u64(self) -> Option<u64> {
        self.0.parse().ok()
    }

    fn object(self) -> Option<Fields<'a>> {
        self.0
            .starts_with('{')
            .then(|| Fields::of(self.0))
            .flatten()
    }

    /// An object kept whole, to be passed on.
    fn map(self) -> Option<Map<String, Value>> {
        self.0
            .starts_with('{')
            .then(|| serde_json::from_str(self.0).ok())
            .flatten()
    }
}

/// Whether a frame that failed to decode was meant as an HLink message (for counting).
pub fn is_upstream_frame(text: &str) -> bool {
    UPSTREAM_TYPES
        .iter()
        .any(|kind| text.contains(&format!("\"{kind}\"")))
}

fn upstream(kind: &'static str, fields: &Fields<'_>) -> Result<UpstreamMessage, FrameError> {
    let object = |name: &str| match fields.get(name) {
        Some(raw) => raw
            .object()
            .ok_or_else(|| FrameError::field(name, "must be an object")),
        None => Err(FrameError::field(name, "is required")),
    };
    let map = |name: &str| match fields.get(name) {
        Some(raw) => raw
            .map()
            .ok_or_else(|| FrameError::field(name, "must be an object")),
        None => Err(FrameError::field(name, "is required")),
    };
    let text = |object: &Fields<'_>, path: &str, key: &str| match object.get(key) {
        Some(raw) => match raw.string() {
            Some(text) if !text.is_empty() => Ok(text.into_owned()),
            _ => Err(FrameError::field(path, "must be a non-empty string")),
        },
        None => Err(FrameError::field(path, "is required")),
    };
    let sender = object("sender")?;
    let recipient = object("recipient")?;
    let optional_text = |name: &str| {
        (fields.given(name))
            .map(|raw| {
                (raw.string().map(Cow::into_owned))
                    .ok_or_else(|| FrameError::field(name, "must be a string"))
            })
            .transpose()
    };
    Ok(UpstreamMessage {
        kind,
        id: optional_text("id")?,
        sender: Sender {
            agent_id: text(&sender, "sender.agent_id", "agent_id")?,
            role: text(&sender, "sender.role", "role")?,
        },
        recipient: Recipient {
            target: text(&recipient, "recipient.target", "target")?,
            agent_id: (recipient.given("agent_id"))
                .map(|_| text(&recipient, "recipient.agent_id", "agent_id"))
                .transpose()?,
        },
        payload: map("payload")?,
        timestamp: optional_text("timestamp")?,
        metadata: (fields.given("metadata"))
            .map(|raw| {
                raw.map()
                    .ok_or_else(|| FrameError::field("metadata", "must be an object"))
            })
            .transpose()?,
    })
}

/// A field that may be absent (or null); when present it must pass `read`.
fn optional(
    fields: &Fields<'_>,
    name: &str,
    read: fn(&Fields<'_>, &str) -> Result<String, FrameError>,
) -> Result<Option<String>, FrameError> {
    fields.given(name).map(|_| read(fields, name)).transpose()
}

/// Tokens are compact JWTs; no real one is near this size.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

fn token(fields: &Fields<'_>, name: &str) -> Result<String, FrameError> {
    let Some(raw) = fields.get(name) else {
        return Err(FrameError::field(name, "is required"));
    };
    match raw.string() {
        Some(token) if token.is_empty() || token.len() > MAX_TOKEN_BYTES => Err(FrameError::field(
            name,
            "must be a token of 1 to 8192 bytes",
        )),
        Some(token) => Ok(token.into_owned()),
        None => Err(FrameError::field(name, "must be a string")),
    }
}

fn id(fields: &Fields<'_>, name: &str) -> Result<String, FrameError> {
    let Some(raw) = fields.get(name) else {
        return Err(FrameError::field(name, "is required"));
    };
    match raw.string() {
        Some(id) => {
            check_id(&id).map_err(|e| FrameError::field(name, &e.to_string()))?;
            Ok(id.into_owned())
        }
        None => Err(FrameError::field(name, "must be a string")),
    }
}

fn seq(fields: &Fields<'_>) -> Result<u64, FrameError> {
    match fields.get("seq") {
        Some(raw) => raw
            .u64()
            .ok_or_else(|| FrameError::field("seq", "must be a non-negative integer")),
        None => Err(FrameError::field("seq", "is required")),
    }
}

fn since(fields: &Fields<'_>) -> Result<Option<Since>, FrameError> {
    let since = match fields.given("since") {
        None => return Ok(None),
        Some(raw) => raw
            .object()
            .ok_or_else(|| FrameError::field("since", "must be an object {epoch, seq}"))?,
    };
    let seq = match since.get("seq") {
        Some(raw) => raw
            .u64()
            .ok_or_else(|| FrameError::field("since.seq", "must be a non-negative integer"))?,
        None => return Err(FrameError::field("since.seq", "is required")),
    };
    let epoch = (since.given("epoch"))
        .map(|raw| {
            (raw.string().map(Cow::into_owned))
                .ok_or_else(|| FrameError::field("since.epoch", "must be a string"))
        })
        .transpose()?;
    if epoch.is_none() && seq > 0 {
        return Err(FrameError::field(
            "since.epoch",
            "is required when since.seq > 0",
        ));
    }
    Ok(Some(Since { epoch, seq }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream_field_error(text: &str) -> String {
        match decode(text) {
            Err(error) => error.message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn validates_hlink_messages() {
        let valid = r#"{"type":"user_message","id":"m1","sender":{"agent_id":"browser","role":"user"},
            "recipient":{"target":"agent","agent_id":"planner"},"payload":{"text":"hi"},"metadata":{"k":1}}"#;
        let Ok(ClientFrame::Upstream(message)) = decode(valid) else {
            panic!("valid")
        };
        assert_eq!(
            (message.kind, message.id.as_deref()),
            ("user_message", Some("m1"))
        );
        assert_eq!(message.recipient.agent_id.as_deref(), Some("planner"));
        for (text, field) in [
            (
                r#"{"type":"user_message","recipient":{"target":"a"},"payload":{}}"#,
                "`sender`",
            ),
            (
                r#"{"type":"user_message","sender":{"role":"user"},"recipient":{"target":"a"},"payload":{}}"#,
                "`sender.agent_id`",
            ),
            (
                r#"{"type":"user_message","sender":{"agent_id":"b","role":""},"recipient":{"target":"a"},"payload":{}}"#,
                "`sender.role`",
            ),
            (
                r#"{"type":"narrative.text","sender":{"agent_id":"b","role":"u"},"recipient":{},"payload":{}}"#,
                "`recipient.target`",
            ),
            (
                r#"{"type":"visual.asset","sender":{"agent_id":"b","role":"u"},"recipient":{"target":"a"},"payload":[]}"#,
                "`payload`",
            ),
            (
                r#"{"type":"system.status","sender":{"agent_id":"b","role":"u"},"recipient":{"target":"a"},"payload":{},"metadata":3}"#,
                "`metadata`",
            ),
        ] {
            assert!(
                upstream_field_error(text).starts_with(field),
                "{text}: {}",
                upstream_field_error(text)
            );
        }
    }

    fn check(text: &str, expected: Result<ClientFrame, ErrorCode>) {
        assert_eq!(decode(text).map_err(|e| e.code), expected, "{text}");
    }

    #[test]
    fn decodes_client_frames() {
        check(
            r#"{"type":"hello","user_id":"u1"}"#,
            Ok(ClientFrame::Hello {
                user_id: Some("u1".into()),
                token: None,
                since: None,
                format: Format::Native,
            }),
        );
        check(
            r#"{"type":"subscribe","thread_id":"t1","since":{"epoch":"e","seq":4}}"#,
            Ok(ClientFrame::Subscribe {
                thread_id: "t1".into(),
                since: Some(Since {
                    epoch: Some("e".into()),
                    seq: 4,
                }),
                token: None,
            }),
        );
        check(
            r#"{"type":"subscribe","thread_id":"t1","since":{"seq":0}}"#,
            Ok(ClientFrame::Subscribe {
                thread_id: "t1".into(),
                since: Some(Since {
                    epoch: None,
                    seq: 0,
                }),
                token: None,
            }),
        );
        check(
            r#"{"type":"subscribe","thread_id":"t1","since":{"seq":3}}"#,
            Err(ErrorCode::InvalidFrame),
        );
        check(r#"{"type":"subscribe"}"#, Err(ErrorCode::InvalidFrame));
        check(
            r#"{"type":"ack","thread_id":"t1","seq":3}"#,
            Ok(ClientFrame::Ack {
                channel: ChannelName::thread("t1"),
                seq: 3,
            }),
        );
        check(
            r#"{"type":"ack","channel":"user:u1","seq":3}"#,
            Ok(ClientFrame::Ack {
                channel: ChannelName::user("u1"),
                seq: 3,
            }),
        );
        check(
            r#"{"type":"ack","thread_id":"t1","seq":-1}"#,
            Err(ErrorCode::InvalidFrame),
        );
        check(r#"{"type":"ping"}"#, Ok(ClientFrame::Ping));
        check(r#"{"type":"user_message"}"#, Err(ErrorCode::InvalidFrame));
        check(r#"{"type":"dance"}"#, Err(ErrorCode::UnknownType));
        check(r#"{"user_id":"u1"}"#, Err(ErrorCode::InvalidFrame));
        check("hello", Err(ErrorCode::InvalidJson));
        check("[]", Err(ErrorCode::InvalidFrame));
    }

    /// The one-pass read takes what serde_json takes and refuses the rest as serde_json would.
    #[test]
    fn reads_frames_as_serde_json_would() {
        let ack = |thread: &str, seq: u64| {
            Ok(ClientFrame::Ack {
                channel: ChannelName::thread(thread),
                seq,
            })
        };
        check(
            r#" {"seq":3, "thread_id" : "t1","type":"ack"} "#,
            ack("t1", 3),
        );
        check(
            r#"{"type":"a\u0063k","thread_id":"t\u0031","seq":3}"#,
            ack("t1", 3),
        );
        check(
            r#"{"type":"ack","thread_id":"t1","seq":3,"x":[1,{"y":null}]}"#,
            ack("t1", 3),
        );
        check(
            r#"{"type":"ack","thread_id":"t1","seq":18446744073709551615}"#,
            ack("t1", u64::MAX),
        );
        for seq in ["1.0", "1e2", "-0", "18446744073709551616", "\"3\"", "null"] {
            let text = format!(r#"{{"type":"ack","thread_id":"t1","seq":{seq}}}"#);
            check(&text, Err(ErrorCode::InvalidFrame));
        }
        // A key twice, at any depth, even in a member the gateway does not read.
        for text in [
            r#"{"type":"ack","type":"ack","thread_id":"t1","seq":3}"#,
            r#"{"type":"ack","thread_id":"t1","seq":3,"x":{"a":1,"a":2}}"#,
            r#"{"type":"hello","user_id":"u","since":{"seq":0,"seq":0}}"#,
        ] {
            assert_eq!(
                decode(text).map_err(|e| (e.code, e.message.contains("twice"))),
                Err((ErrorCode::InvalidJson, true)),
                "{text}"
            );
        }
        for text in [
            r#"{"type":"ack","thread_id":"t1","seq":3"#,
            r#"{"type":"ack","thread_id":"t1\x","seq":3}"#,
            r#"{"type":"ack","thread_id":"t1","seq":01}"#,
            r#"{"type":"ack","thread_id":"t1","seq":1e400}"#,
            "{\"type\":\"ack\",\"thread_id\":\"t\u{1}\",\"seq\":3}",
        ] {
            check(text, Err(ErrorCode::InvalidJson));
        }
        let deep = format!(
            r#"{{"type":"ping","x":{}{}}}"#,
            "[".repeat(70),
            "]".repeat(70)
        );
        check(&deep, Err(ErrorCode::InvalidFrame));
        check(r#""ack""#, Err(ErrorCode::InvalidFrame));
        check(r#"{"type":7}"#, Err(ErrorCode::InvalidFrame));
        // `null` is an optional member left out, and no required one.
        check(
            r#"{"type":"hello","user_id":"u1","token":null,"since":null,"protocol":null}"#,
            Ok(ClientFrame::Hello {
                user_id: Some("u1".into()),
                token: None,
                since: None,
                format: Format::Native,
            }),
        );
        check(
            r#"{"type":"subscribe","thread_id":"t1","since":{"seq":0,"epoch":null}}"#,
            Ok(ClientFrame::Subscribe {
                thread_id: "t1".into(),
                since: Some(Since {
                    epoch: None,
                    seq: 0,
                }),
                token: None,
            }),
        );
        check(r#"{"type":null}"#, Err(ErrorCode::InvalidFrame));
        check(
            r#"{"type":"unsubscribe","thread_id":null}"#,
            Err(ErrorCode::InvalidFrame),
        );
    }
}
