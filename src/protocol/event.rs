//! Producer events: decoded from JSON once, validated field by field, so that a
//! refusal always names the field and the reason.

use serde::Serialize;
use serde_json::{Map, Value};

use super::agui::AguiEvent;
use super::channel::{IdError, check_id};

/// The closed set of event types. The five lifecycle types are what a UI relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    AgentStarted,
    AgentThinking,
    ToolExecuting,
    ToolCompleted,
    AgentCompleted,
    AgentError,
    Custom,
}

impl EventType {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "agent_started" => Self::AgentStarted,
            "agent_thinking" => Self::AgentThinking,
            "tool_executing" => Self::ToolExecuting,
            "tool_completed" => Self::ToolCompleted,
            "agent_completed" => Self::AgentCompleted,
            "agent_error" => Self::AgentError,
            "custom" => Self::Custom,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentStarted => "agent_started",
            Self::AgentThinking => "agent_thinking",
            Self::ToolExecuting => "tool_executing",
            Self::ToolCompleted => "tool_completed",
            Self::AgentCompleted => "agent_completed",
            Self::AgentError => "agent_error",
            Self::Custom => "custom",
        }
    }

    fn is_tool(self) -> bool {
        matches!(self, Self::ToolExecuting | Self::ToolCompleted)
    }
}

/// A valid producer event.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventType,
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
    pub user_id: Option<String>,
    pub event_id: Option<String>,
    pub ts: Option<String>,
    pub traceparent: Option<String>,
    pub payload: Map<String, Value>,
    /// The id of the producer key that posted it (not on the wire): its `event_id`s are its own,
    /// so one producer's id never makes another's event a duplicate.
    pub producer: Option<String>,
}

impl Event {
    /// What dedupe remembers: the `event_id`, scoped by the producer key that sent it.
    pub fn dedupe_id(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(dedupe_id(
            self.producer.as_deref(),
            self.event_id.as_deref()?,
        ))
    }

    /// The event as a producer would have sent it.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("type".into(), self.kind.as_str().into());
        let optional = [
            ("run_id", &self.run_id),
            ("thread_id", &self.thread_id),
            ("user_id", &self.user_id),
            ("event_id", &self.event_id),
            ("ts", &self.ts),
            ("traceparent", &self.traceparent),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                object.insert(name.into(), value.clone().into());
            }
        }
        object.insert("payload".into(), Value::Object(self.payload.clone()));
        Value::Object(object)
    }
}

/// What dedupe remembers of an event: its `event_id`, scoped by the producer key that sent it.
pub fn dedupe_id<'a>(producer: Option<&str>, event_id: &'a str) -> std::borrow::Cow<'a, str> {
    match producer {
        Some(producer) => format!("{producer}:{event_id}").into(),
        None => event_id.into(),
    }
}

/// Why an event was refused: the field at fault (dotted path) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub code: RefusalCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    InvalidJson,
    TooLarge,
    MissingField,
    InvalidField,
    /// An `agent_started` whose run is registered to another thread or user.
    RunConflict,
    /// An AG-UI event that breaks AG-UI's ordering rules, refused by a strict stream.
    OutOfOrder,
}

impl RefusalCode {
    pub const ALL: [RefusalCode; 6] = [
        Self::InvalidJson,
        Self::TooLarge,
        Self::MissingField,
        Self::InvalidField,
        Self::RunConflict,
        Self::OutOfOrder,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::TooLarge => "too_large",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::RunConflict => "run_conflict",
            Self::OutOfOrder => "out_of_order",
        }
    }
}

impl Refusal {
    /// The run is registered to another thread or user: a registration is never re-pointed.
    pub fn run_conflict() -> Self {
        Self {
            code: RefusalCode::RunConflict,
            field: Some("run_id".into()),
            reason: "this run is registered to another thread or user".into(),
        }
    }

    pub(super) fn missing(field: &str, reason: impl Into<String>) -> Self {
        Self {
            code: RefusalCode::MissingField,
            field: Some(field.into()),
            reason: reason.into(),
        }
    }

    pub(super) fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self {
            code: RefusalCode::InvalidField,
            field: Some(field.into()),
            reason: reason.into(),
        }
    }
}

/// Decodes and validates one event from its JSON text.
pub fn parse(raw: &str, max_bytes: usize) -> Result<Event, Refusal> {
    from_value(decode(raw, max_bytes)?)
}

/// The refusal of an event of `bytes` over `max_bytes`.
pub fn too_large(bytes: usize, max_bytes: usize) -> Refusal {
    Refusal {
        code: RefusalCode::TooLarge,
        field: None,
        reason: format!("event is {bytes} bytes, the limit is {max_bytes}"),
    }
}

/// Decodes one event's JSON text, not yet validated: within `max_bytes`, JSON, no key twice in an
/// object. A caller that adds fields (a stream bound to one run) validates with [`from_value`].
pub fn decode(raw: &str, max_bytes: usize) -> Result<Value, Refusal> {
    if raw.len() > max_bytes {
        return Err(too_large(raw.len(), max_bytes));
    }
    super::json::parse(raw).map_err(|error| match error {
        super::json::JsonError::Invalid(e) => Refusal {
            code: RefusalCode::InvalidJson,
            field: None,
            reason: e.to_string(),
        },
        super::json::JsonError::DuplicateKey(key) => Refusal {
            code: RefusalCode::InvalidJson,
            reason: format!("the key `{key}` appears twice in one object"),
            field: Some(key),
        },
    })
}

/// Validates one already decoded event.
pub fn from_value(value: Value) -> Result<Event, Refusal> {
    let Value::Object(mut fields) = value else {
        return Err(Refusal {
            code: RefusalCode::InvalidField,
            field: None,
            reason: "an event must be a JSON object".into(),
        });
    };
    if let Some(Value::String(kind)) = fields.get("type")
        && AguiEvent::is_type(kind)
    {
        return from_agui(fields);
    }
    let kind_text = required_string(&mut fields, "type")?;
    let kind = EventType::parse(&kind_text).ok_or_else(|| {
        Refusal::invalid(
            "type",
            format!("unknown type `{}`: expected agent_started, agent_thinking, tool_executing, tool_completed, agent_completed, agent_error, custom or an AG-UI type", super::excerpt(&kind_text)),
        )
    })?;
    let gateway = Gateway::take(&mut fields)?;
    let (run_id, thread_id, user_id) = (&gateway.run_id, &gateway.thread_id, &gateway.user_id);
    let payload = match fields.remove("payload") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(payload)) => payload,
        Some(_) => return Err(Refusal::invalid("payload", "must be an object")),
    };

    if kind == EventType::Custom {
        match payload.get("name") {
            Some(Value::String(name)) if !name.is_empty() => {}
            Some(_) => {
                return Err(Refusal::invalid(
                    "payload.name",
                    "must be a non-empty string",
                ));
            }
            None => {
                return Err(Refusal::missing(
                    "payload.name",
                    "required for custom events",
                ));
            }
        }
        if run_id.is_none() && thread_id.is_none() && user_id.is_none() {
            return Err(Refusal::missing(
                "thread_id",
                "a custom event needs thread_id, user_id or run_id",
            ));
        }
    } else if run_id.is_none() {
        return Err(Refusal::missing(
            "run_id",
            format!("required for {}", kind.as_str()),
        ));
    }
    if kind.is_tool() {
        // The watchdog keeps open tool calls by this id and shows them, so it is held to the
        // same rules as every other id.
        match payload.get("tool_call_id") {
            Some(Value::String(id)) => {
                check_id(id).map_err(|e| Refusal::invalid("payload.tool_call_id", e.to_string()))?
            }
            Some(_) => {
                return Err(Refusal::invalid("payload.tool_call_id", "must be a string"));
            }
            None => {
                return Err(Refusal::missing(
                    "payload.tool_call_id",
                    format!("required for {}", kind.as_str()),
                ));
            }
        }
    }
    Ok(gateway.into_event(kind, payload))
}

/// The gateway's own fields of an event, beside its type and payload.
struct Gateway {
    run_id: Option<String>,
    thread_id: Option<String>,
    user_id: Option<String>,
    event_id: Option<String>,
    ts: Option<String>,
    traceparent: Option<String>,
}

impl Gateway {
    fn take(fields: &mut Map<String, Value>) -> Result<Self, Refusal> {
        Ok(Self {
            run_id: optional_id(fields, "run_id")?,
            thread_id: optional_id(fields, "thread_id")?,
            user_id: optional_id(fields, "user_id")?,
            event_id: optional_id(fields, "event_id")?,
            ts: optional_string(fields, "ts")?,
            traceparent: optional_string(fields, "traceparent")?,
        })
    }

    fn into_event(self, kind: EventType, payload: Map<String, Value>) -> Event {
        Event {
            kind,
            run_id: self.run_id,
            thread_id: self.thread_id,
            user_id: self.user_id,
            event_id: self.event_id,
            ts: self.ts,
            traceparent: self.traceparent,
            payload,
            producer: None,
        }
    }
}

/// An AG-UI event with the gateway's fields beside its own (`run_id`, `thread_id`, …, which
/// AG-UI's open objects allow): validated against AG-UI's schema and kept in its native form.
/// RUN_STARTED and RUN_FINISHED name their run and thread themselves; the gateway's fields, when
/// also given, must agree.
fn from_agui(mut fields: Map<String, Value>) -> Result<Event, Refusal> {
    let mut gateway = Gateway::take(&mut fields)?;
    let event = AguiEvent::from_fields(fields)?;
    for (own, ours, name) in [
        ("runId", &mut gateway.run_id, "run_id"),
        ("threadId", &mut gateway.thread_id, "thread_id"),
    ] {
        match (event.str(own), ours.as_deref()) {
            (Some(theirs), Some(ours)) if theirs != ours => {
                return Err(Refusal::invalid(
                    name,
                    format!("must equal the event's {own}"),
                ));
            }
            (Some(theirs), None) => *ours = Some(theirs.to_string()),
            _ => {}
        }
    }
    if gateway.run_id.is_none() {
        return Err(Refusal::missing(
            "run_id",
            format!("required for {}", event.type_name()),
        ));
    }
    Ok(gateway.into_event(event.kind.native(), event.into_payload()))
}

fn optional_string(fields: &mut Map<String, Value>, name: &str) -> Result<Option<String>, Refusal> {
    match fields.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(Refusal::invalid(name, "must be a string")),
    }
}

fn required_string(fields: &mut Map<String, Value>, name: &str) -> Result<String, Refusal> {
    optional_string(fields, name)?.ok_or_else(|| Refusal::missing(name, "required"))
}

fn optional_id(fields: &mut Map<String, Value>, name: &str) -> Result<Option<String>, Refusal> {
    let Some(id) = optional_string(fields, name)? else {
        return Ok(None);
    };
    check_id(&id).map_err(|e: IdError| Refusal::invalid(name, e.to_string()))?;
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Result<EventType, (&str, RefusalCode)>) {
        let got = parse(raw, 1024)
            .map(|e| e.kind)
            .map_err(|r| (r.field.unwrap_or_default(), r.code));
        let expected = expected.map_err(|(field, code)| (field.to_string(), code));
        assert_eq!(got, expected, "{raw}");
    }

    /// Every id of an event, `payload.tool_call_id` included, has the one length limit.
    #[test]
    fn every_id_has_the_same_length_limit() {
        use super::super::channel::MAX_ID_LEN;
        let longest = "i".repeat(MAX_ID_LEN);
        let over = "i".repeat(MAX_ID_LEN + 1);
        let event = |field: &str, id: &str| {
            let mut event = serde_json::json!({
                "type": "tool_executing", "run_id": "r1", "thread_id": "t1", "user_id": "u1",
                "event_id": "e1", "payload": {"tool_call_id": "c1"}
            });
            match field.strip_prefix("payload.") {
                Some(inner) => event["payload"][inner] = id.into(),
                None => event[field] = id.into(),
            }
            event.to_string()
        };
        for field in [
            "run_id",
            "thread_id",
            "user_id",
            "event_id",
            "payload.tool_call_id",
        ] {
            assert!(parse(&event(field, &longest), 4096).is_ok(), "{field}");
            let refusal = parse(&event(field, &over), 4096).unwrap_err();
            assert_eq!(refusal.code, RefusalCode::InvalidField, "{field}");
            assert_eq!(refusal.field.as_deref(), Some(field));
            assert_eq!(
                refusal.reason,
                format!("must be at most {MAX_ID_LEN} bytes"),
                "{field}"
            );
        }
    }

    #[test]
    fn validates_producer_events() {
        use RefusalCode::*;
        check(
            r#"{"type":"agent_started","run_id":"r1","thread_id":"t1"}"#,
            Ok(EventType::AgentStarted),
        );
        check(
            r#"{"type":"agent_thinking","run_id":"r1"}"#,
            Ok(EventType::AgentThinking),
        );
        check(
            r#"{"type":"agent_thinking","thread_id":"t1"}"#,
            Err(("run_id", MissingField)),
        );
        check(
            r#"{"type":"agent_dreaming","run_id":"r1"}"#,
            Err(("type", InvalidField)),
        );
        check(r#"{"run_id":"r1"}"#, Err(("type", MissingField)));
        check(
            r#"{"type":"tool_executing","run_id":"r1","payload":{}}"#,
            Err(("payload.tool_call_id", MissingField)),
        );
        check(
            r#"{"type":"tool_completed","run_id":"r1","payload":{"tool_call_id":"c1"}}"#,
            Ok(EventType::ToolCompleted),
        );
        check(
            r#"{"type":"tool_executing","run_id":"r1","payload":{"tool_call_id":""}}"#,
            Err(("payload.tool_call_id", InvalidField)),
        );
        check(
            r#"{"type":"tool_executing","run_id":"r1","payload":{"tool_call_id":7}}"#,
            Err(("payload.tool_call_id", InvalidField)),
        );
        check(
            r#"{"type":"tool_completed","run_id":"r1","payload":{"tool_call_id":"a\u0000b"}}"#,
            Err(("payload.tool_call_id", InvalidField)),
        );
        check(
            r#"{"type":"agent_thinking","run_id":"r1","payload":[1]}"#,
            Err(("payload", InvalidField)),
        );
        check(
            r#"{"type":"agent_thinking","run_id":5}"#,
            Err(("run_id", InvalidField)),
        );
        check(
            r#"{"type":"agent_thinking","run_id":""}"#,
            Err(("run_id", InvalidField)),
        );
        check(
            r#"{"type":"custom","thread_id":"t1","payload":{"name":"x"}}"#,
            Ok(EventType::Custom),
        );
        check(
            r#"{"type":"custom","thread_id":"t1"}"#,
            Err(("payload.name", MissingField)),
        );
        check(
            r#"{"type":"custom","payload":{"name":"x"}}"#,
            Err(("thread_id", MissingField)),
        );
        check(r#"{"type":"#, Err(("", InvalidJson)));
        check(
            &format!(
                r#"{{"type":"agent_thinking","run_id":"r1","payload":{{"t":"{}"}}}}"#,
                "x".repeat(2000)
            ),
            Err(("", TooLarge)),
        );
        check("[1]", Err(("", InvalidField)));
    }
}
