//! Frames a client sends on `/ws`, decoded once into a closed enum.

use super::json::JsonError;
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

pub fn decode(text: &str) -> Result<ClientFrame, FrameError> {
    let value = super::json::parse(text).map_err(|error| match error {
        JsonError::Invalid(e) => FrameError::new(ErrorCode::InvalidJson, format!("not JSON: {e}")),
        repeated @ JsonError::DuplicateKey(_) => {
            FrameError::new(ErrorCode::InvalidJson, repeated.to_string())
        }
    })?;
    let Value::Object(fields) = value else {
        return Err(FrameError::new(
            ErrorCode::InvalidFrame,
            "a frame must be a JSON object",
        ));
    };
    let kind = match fields.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(FrameError::field("type", "must be a string")),
        None => return Err(FrameError::field("type", "is required")),
    };
    match kind {
        "hello" => Ok(ClientFrame::Hello {
            user_id: optional(&fields, "user_id", id)?,
            token: optional(&fields, "token", token)?,
            since: since(&fields)?,
            format: match fields.get("protocol") {
                None | Some(Value::Null) => Format::Native,
                Some(Value::String(name)) if name == "agentwire" => Format::Native,
                Some(Value::String(name)) if name == "ag-ui" => Format::AgUi,
                Some(_) => {
                    return Err(FrameError::field(
                        "protocol",
                        "must be \"agentwire\" or \"ag-ui\"",
                    ));
                }
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
                (None, Some(Value::String(name))) => ChannelName::parse(name).ok_or_else(|| {
                    FrameError::field("channel", "must be thread:<id> or user:<id>")
                })?,
                (None, Some(_)) => return Err(FrameError::field("channel", "must be a string")),
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

/// Whether a frame that failed to decode was meant as an HLink message (for counting).
pub fn is_upstream_frame(text: &str) -> bool {
    UPSTREAM_TYPES
        .iter()
        .any(|kind| text.contains(&format!("\"{kind}\"")))
}

fn upstream(
    kind: &'static str,
    fields: &Map<String, Value>,
) -> Result<UpstreamMessage, FrameError> {
    let object = |name: &str| match fields.get(name) {
        Some(Value::Object(object)) => Ok(object),
        Some(_) => Err(FrameError::field(name, "must be an object")),
        None => Err(FrameError::field(name, "is required")),
    };
    let text = |object: &Map<String, Value>, path: &str, key: &str| match object.get(key) {
        Some(Value::String(text)) if !text.is_empty() => Ok(text.clone()),
        Some(_) => Err(FrameError::field(path, "must be a non-empty string")),
        None => Err(FrameError::field(path, "is required")),
    };
    let sender = object("sender")?;
    let recipient = object("recipient")?;
    let optional_text = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(FrameError::field(name, "must be a string")),
    };
    Ok(UpstreamMessage {
        kind,
        id: optional_text("id")?,
        sender: Sender {
            agent_id: text(sender, "sender.agent_id", "agent_id")?,
            role: text(sender, "sender.role", "role")?,
        },
        recipient: Recipient {
            target: text(recipient, "recipient.target", "target")?,
            agent_id: match recipient.get("agent_id") {
                None | Some(Value::Null) => None,
                Some(_) => Some(text(recipient, "recipient.agent_id", "agent_id")?),
            },
        },
        payload: object("payload")?.clone(),
        timestamp: optional_text("timestamp")?,
        metadata: match fields.get("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(metadata)) => Some(metadata.clone()),
            Some(_) => return Err(FrameError::field("metadata", "must be an object")),
        },
    })
}

/// A field that may be absent (or null); when present it must pass `read`.
fn optional(
    fields: &Map<String, Value>,
    name: &str,
    read: fn(&Map<String, Value>, &str) -> Result<String, FrameError>,
) -> Result<Option<String>, FrameError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => read(fields, name).map(Some),
    }
}

/// Tokens are compact JWTs; no real one is near this size.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

fn token(fields: &Map<String, Value>, name: &str) -> Result<String, FrameError> {
    match fields.get(name) {
        Some(Value::String(token)) if token.is_empty() || token.len() > MAX_TOKEN_BYTES => Err(
            FrameError::field(name, "must be a token of 1 to 8192 bytes"),
        ),
        Some(Value::String(token)) => Ok(token.clone()),
        Some(_) => Err(FrameError::field(name, "must be a string")),
        None => Err(FrameError::field(name, "is required")),
    }
}

fn id(fields: &Map<String, Value>, name: &str) -> Result<String, FrameError> {
    match fields.get(name) {
        Some(Value::String(id)) => {
            check_id(id).map_err(|e| FrameError::field(name, &e.to_string()))?;
            Ok(id.clone())
        }
        Some(_) => Err(FrameError::field(name, "must be a string")),
        None => Err(FrameError::field(name, "is required")),
    }
}

fn seq(fields: &Map<String, Value>) -> Result<u64, FrameError> {
    match fields.get("seq") {
        Some(value) => value
            .as_u64()
            .ok_or_else(|| FrameError::field("seq", "must be a non-negative integer")),
        None => Err(FrameError::field("seq", "is required")),
    }
}

fn since(fields: &Map<String, Value>) -> Result<Option<Since>, FrameError> {
    let since = match fields.get("since") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(since)) => since,
        Some(_) => return Err(FrameError::field("since", "must be an object {epoch, seq}")),
    };
    let seq = match since.get("seq") {
        Some(value) => value
            .as_u64()
            .ok_or_else(|| FrameError::field("since.seq", "must be a non-negative integer"))?,
        None => return Err(FrameError::field("since.seq", "is required")),
    };
    let epoch = match since.get("epoch") {
        None | Some(Value::Null) => None,
        Some(Value::String(epoch)) => Some(epoch.clone()),
        Some(_) => return Err(FrameError::field("since.epoch", "must be a string")),
    };
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
}
