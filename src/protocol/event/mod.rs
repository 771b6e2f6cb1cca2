//! Producer events: decoded from JSON once, validated field by field, so that a
//! refusal always names the field and the reason.

mod read;
mod scan;

use std::borrow::Cow;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeSeed;
use serde_json::{Map, Value};

use super::agui::{AguiEvent, PAYLOAD_KEY};
use super::channel::{ChannelKind, ChannelName, check_id};
use read::{Fields, ObjectSeed, Own, Text, scan_payload};

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
    /// Every type, in declaration order: `kind as usize` is a type's place here.
    pub const ALL: [Self; 7] = [
        Self::AgentStarted,
        Self::AgentThinking,
        Self::ToolExecuting,
        Self::ToolCompleted,
        Self::AgentCompleted,
        Self::AgentError,
        Self::Custom,
    ];

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
    pub payload: Payload,
    /// The id of the producer key that posted it (not on the wire): its `event_id`s are its own,
    /// so one producer's id never makes another's event a duplicate.
    pub producer: Option<Arc<str>>,
}

impl Event {
    /// What dedupe remembers: the `event_id`, scoped by the producer key that sent it.
    pub fn dedupe_id(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(dedupe_id(
            self.producer.as_deref(),
            self.event_id.as_deref()?,
        ))
    }

    /// The event's fields to write: as its producer sent it (`None`), or in a frame of `channel`,
    /// where the channel and the thread it names (not the producer's `thread_id`) are written.
    pub fn wire<'a>(&'a self, channel: Option<&'a ChannelName>) -> Wire<'a> {
        let thread_id = match channel {
            None => self.thread_id.as_deref(),
            Some(channel) => match channel.kind() {
                ChannelKind::Thread => Some(channel.id()),
                ChannelKind::User => None,
            },
        };
        Wire {
            kind: self.kind.as_str(),
            channel: channel.map(ChannelName::as_str),
            thread_id,
            user_id: self.user_id.as_deref(),
            run_id: self.run_id.as_deref(),
            event_id: self.event_id.as_deref(),
            ts: self.ts.as_deref(),
            traceparent: self.traceparent.as_deref(),
            payload: self.payload.json(),
        }
    }

    /// The event as a producer would have sent it.
    pub fn to_text(&self) -> String {
        // Written from strings and JSON text: UTF-8.
        String::from_utf8(self.wire(None).to_vec()).unwrap_or_default()
    }
}

/// An event's fields as they are written ([`Event::wire`]), in this order, the absent ones left
/// out: `type`, `channel`, `thread_id`, `user_id`, `run_id`, `event_id`, `ts`, `traceparent`,
/// `payload`.
pub struct Wire<'a> {
    kind: &'static str,
    channel: Option<&'a str>,
    thread_id: Option<&'a str>,
    user_id: Option<&'a str>,
    run_id: Option<&'a str>,
    event_id: Option<&'a str>,
    ts: Option<&'a str>,
    traceparent: Option<&'a str>,
    payload: &'a str,
}

impl Wire<'_> {
    /// Its JSON text, in a buffer of its size.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.written_len());
        self.write(&mut out);
        out
    }

    /// The bytes [`Self::write`] writes, unless a text needs escaping.
    pub fn written_len(&self) -> usize {
        let texts: usize = (self.texts().iter())
            .filter_map(|(key, text)| Some(key.len() + (*text)?.len() + 2))
            .sum();
        // `{"type":"` and `"`, `,"payload":` and `}`.
        texts + self.kind.len() + self.payload.len() + 22
    }

    /// Appends its JSON text to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        // The type is one of a closed set of names: nothing to escape.
        out.extend_from_slice(b"{\"type\":\"");
        out.extend_from_slice(self.kind.as_bytes());
        out.push(b'"');
        for (key, text) in self.texts() {
            if let Some(text) = text {
                out.extend_from_slice(key);
                super::json::write_str(out, text);
            }
        }
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(self.payload.as_bytes());
        out.push(b'}');
    }

    fn texts(&self) -> [(&'static [u8], Option<&str>); 7] {
        [
            (b",\"channel\":", self.channel),
            (b",\"thread_id\":", self.thread_id),
            (b",\"user_id\":", self.user_id),
            (b",\"run_id\":", self.run_id),
            (b",\"event_id\":", self.event_id),
            (b",\"ts\":", self.ts),
            (b",\"traceparent\":", self.traceparent),
        ]
    }
}

/// An event's payload: the JSON object as the producer sent it, kept as its text (the gateway
/// forwards it and never changes it, so it is not parsed into a tree), with the parts the gateway
/// itself reads.
#[derive(Debug, Clone)]
pub struct Payload {
    /// JSON text: an object.
    json: Box<str>,
    /// A tool event's `tool_call_id` (an id, checked), which the watchdog follows.
    tool_call_id: Option<String>,
    /// The AG-UI event a native event was made from (`payload.agui`), which the watchdog and a
    /// strict stream hold to AG-UI's ordering rules.
    agui: Option<Map<String, Value>>,
}

impl Default for Payload {
    fn default() -> Self {
        Self {
            json: "{}".into(),
            tool_call_id: None,
            agui: None,
        }
    }
}

impl Payload {
    /// The payload made of an object the gateway built (an AG-UI event's, a stall notice).
    pub fn from_map(mut map: Map<String, Value>) -> Self {
        // An object of strings and values always serialises.
        let json = serde_json::to_string(&map)
            .unwrap_or_else(|_| "{}".to_string())
            .into();
        let tool_call_id = map
            .get("tool_call_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        let agui = match map.remove(PAYLOAD_KEY) {
            Some(Value::Object(agui)) => Some(agui),
            _ => None,
        };
        Self {
            json,
            tool_call_id,
            agui,
        }
    }

    /// The payload's JSON text, as the producer sent it.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// A tool event's `tool_call_id`.
    pub fn tool_call_id(&self) -> Option<&str> {
        self.tool_call_id.as_deref()
    }

    /// The AG-UI event this event was made from (`payload.agui`), if it was.
    pub fn agui(&self) -> Option<&Map<String, Value>> {
        self.agui.as_ref()
    }

    /// The payload as a tree, for tests to look into.
    #[cfg(test)]
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.json).unwrap_or_default()
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

/// Decodes and validates one event from its JSON text, in one pass that builds no tree: the
/// gateway's fields are read as strings and the payload is kept as its text (an AG-UI event,
/// checked against AG-UI's schema, is read as a tree: [`from_value`]).
pub fn parse(raw: &str, max_bytes: usize) -> Result<Event, Refusal> {
    let fields = read_fields(raw, max_bytes)?;
    if let Text::Str(kind) = &fields.kind
        && AguiEvent::is_type(kind)
    {
        return from_value(decode(raw, max_bytes)?);
    }
    validate(fields)
}

/// The run a stream's events belong to, filled in where an event leaves it out.
pub struct InRun<'a> {
    pub run_id: &'a str,
    /// Filled in once known (the stream named it, or its run's start did).
    pub thread_id: Option<&'a str>,
}

/// [`parse`] for a native event of a stream bound to `run`: its `run_id` and `thread_id` are
/// filled in when it leaves them out (`null` counts as left out); a `run_id` naming another run
/// is refused, and so is an AG-UI event (AG-UI has its own stream).
pub fn parse_in_run(raw: &str, max_bytes: usize, run: InRun<'_>) -> Result<Event, Refusal> {
    let mut fields = read_fields(raw, max_bytes)?;
    if let Text::Str(kind) = &fields.kind
        && AguiEvent::is_type(kind)
    {
        return Err(Refusal::invalid(
            "type",
            "this stream takes native events only; AG-UI events go to /v1/runs/{run_id}/agui",
        ));
    }
    match &fields.own.run_id {
        Text::Absent | Text::Null => {
            fields.own.run_id = Text::Str(Cow::Owned(run.run_id.to_string()));
        }
        Text::Str(run_id) if run_id.as_ref() == run.run_id => {}
        _ => {
            return Err(Refusal::invalid(
                "run_id",
                "differs from the run this stream is bound to",
            ));
        }
    }
    if let (Text::Absent | Text::Null, Some(thread_id)) = (&fields.own.thread_id, run.thread_id) {
        fields.own.thread_id = Text::Str(Cow::Owned(thread_id.to_string()));
    }
    validate(fields)
}

/// An event's fields read in one pass: within `max_bytes`, JSON, no key twice, an object.
fn read_fields(raw: &str, max_bytes: usize) -> Result<Fields<'_>, Refusal> {
    if raw.len() > max_bytes {
        return Err(too_large(raw.len(), max_bytes));
    }
    // Nearly every event is taken by the one pass over its bytes; serde_json reads the others,
    // and its error names what is wrong.
    scan::fields(raw).map_or_else(|| read_by_serde(raw), Ok)
}

/// [`read_fields`] through serde_json.
fn read_by_serde(raw: &str) -> Result<Fields<'_>, Refusal> {
    let read: Option<Fields<'_>> = super::json::read(raw, |deserializer, checked| {
        ObjectSeed::new(checked).deserialize(deserializer)
    })
    .map_err(json_refusal)?;
    read.ok_or_else(not_an_object)
}

/// The refusal of an event of `bytes` over `max_bytes`.
pub fn too_large(bytes: usize, max_bytes: usize) -> Refusal {
    Refusal {
        code: RefusalCode::TooLarge,
        field: None,
        reason: format!("event is {bytes} bytes, the limit is {max_bytes}"),
    }
}

/// Decodes one event's JSON text into a tree, not yet validated: within `max_bytes`, JSON, no key
/// twice in an object. A caller that adds fields (a stream bound to one run) validates with
/// [`from_value`].
pub fn decode(raw: &str, max_bytes: usize) -> Result<Value, Refusal> {
    if raw.len() > max_bytes {
        return Err(too_large(raw.len(), max_bytes));
    }
    super::json::parse(raw).map_err(json_refusal)
}

fn json_refusal(error: super::json::JsonError) -> Refusal {
    match error {
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
    }
}

fn not_an_object() -> Refusal {
    Refusal {
        code: RefusalCode::InvalidField,
        field: None,
        reason: "an event must be a JSON object".into(),
    }
}

/// Validates one already decoded event.
pub fn from_value(value: Value) -> Result<Event, Refusal> {
    let Value::Object(mut fields) = value else {
        return Err(not_an_object());
    };
    if let Some(Value::String(kind)) = fields.get("type")
        && AguiEvent::is_type(kind)
    {
        return from_agui(fields);
    }
    let read = Fields {
        kind: Text::of(fields.remove("type")),
        own: Own::take(&mut fields),
        // A tree of strings and values always serialises.
        payload: fields.remove("payload").map(|payload| {
            Cow::Owned(serde_json::to_string(&payload).unwrap_or_else(|_| "null".into()))
        }),
        scanned: None,
    };
    validate(read)
}

/// The rules of a native event, on its fields as read.
fn validate(fields: Fields<'_>) -> Result<Event, Refusal> {
    let kind_text = match &fields.kind {
        Text::Str(text) => text,
        Text::Absent | Text::Null => return Err(Refusal::missing("type", "required")),
        Text::Other => return Err(Refusal::invalid("type", "must be a string")),
    };
    let kind = EventType::parse(kind_text).ok_or_else(|| {
        Refusal::invalid(
            "type",
            format!("unknown type `{}`: expected agent_started, agent_thinking, tool_executing, tool_completed, agent_completed, agent_error, custom or an AG-UI type", super::excerpt(kind_text)),
        )
    })?;
    let gateway = Gateway::of(fields.own)?;
    let (run_id, thread_id, user_id) = (&gateway.run_id, &gateway.thread_id, &gateway.user_id);
    let scanned = match (fields.scanned, &fields.payload) {
        (Some(scanned), _) => scanned,
        (None, None) => None,
        (None, Some(raw)) => scan_payload(raw)?,
    };
    let (tool_call_id, name) = match &scanned {
        Some(scanned) => (&scanned.tool_call_id, &scanned.name),
        None => (&Text::Absent, &Text::Absent),
    };

    if kind == EventType::Custom {
        match name {
            Text::Str(name) if !name.is_empty() => {}
            Text::Absent => {
                return Err(Refusal::missing(
                    "payload.name",
                    "required for custom events",
                ));
            }
            _ => {
                return Err(Refusal::invalid(
                    "payload.name",
                    "must be a non-empty string",
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
    let mut tool_call = None;
    if kind.is_tool() {
        // The watchdog keeps open tool calls by this id and shows them, so it is held to the
        // same rules as every other id.
        match tool_call_id {
            Text::Str(id) => {
                check_id(id)
                    .map_err(|e| Refusal::invalid("payload.tool_call_id", e.to_string()))?;
                tool_call = Some(id.to_string());
            }
            Text::Absent => {
                return Err(Refusal::missing(
                    "payload.tool_call_id",
                    format!("required for {}", kind.as_str()),
                ));
            }
            _ => {
                return Err(Refusal::invalid("payload.tool_call_id", "must be a string"));
            }
        }
    }
    // Read before the payload's text moves: what was scanned borrows it.
    let (object, agui) = (
        scanned.is_some(),
        scanned.is_some_and(|scanned| scanned.agui),
    );
    let payload = match fields.payload.filter(|_| object) {
        Some(raw) => {
            // Rare (a native event carrying an AG-UI event): that object is read again as a tree.
            let agui = match agui.then(|| super::json::parse(&raw)) {
                Some(Ok(mut tree)) => match tree.get_mut(PAYLOAD_KEY).map(Value::take) {
                    Some(Value::Object(agui)) => Some(agui),
                    _ => None,
                },
                _ => None,
            };
            Payload {
                json: raw.into(),
                tool_call_id: tool_call,
                agui,
            }
        }
        // A `null` payload is kept as `{}`, as is a missing one.
        None => Payload {
            tool_call_id: tool_call,
            ..Payload::default()
        },
    };
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
    /// The rules of the gateway's own fields: ids, and strings.
    fn of(own: Own<'_>) -> Result<Self, Refusal> {
        Ok(Self {
            run_id: own.run_id.id("run_id")?,
            thread_id: own.thread_id.id("thread_id")?,
            user_id: own.user_id.id("user_id")?,
            event_id: own.event_id.id("event_id")?,
            ts: own.ts.string("ts")?,
            traceparent: own.traceparent.string("traceparent")?,
        })
    }

    fn into_event(self, kind: EventType, payload: Payload) -> Event {
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
    let mut gateway = Gateway::of(Own::take(&mut fields))?;
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
    let kind = event.kind.native();
    Ok(gateway.into_event(kind, Payload::from_map(event.into_payload())))
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

    #[test]
    fn every_type_is_at_its_place_in_all() {
        for (place, kind) in EventType::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, place);
            assert_eq!(EventType::parse(kind.as_str()), Some(kind));
        }
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

    /// The one-pass read takes and refuses the same events as the tree read, the same way.
    #[test]
    fn reading_in_one_pass_agrees_with_the_tree() {
        let corpus = [
            r#"{"type":"agent_thinking","run_id":"r1","payload":{"a":[1,{"b":null}],"c":"\u00e9"}}"#,
            r#"{ "type" : "agent_thinking" , "run_id" : "r1" , "payload" : { "x" : 18446744073709551616 } }"#,
            r#"{"type":"agent_thinking","run_id":"r1","payload":null}"#,
            r#"{"type":"agent_thinking","run_id":"r1","payload" :  null }"#,
            r#"{"type":"agent_thinking","run_id":"r1","payload":"text"}"#,
            r#"{"type":"agent_thinking","run_id":"r1","payload":{"a":1,"a":2}}"#,
            r#"{"type":"agent_thinking","run_id":"r1","payload":{"x":{"k":1,"k":2}}}"#,
            r#"{"type":"agent_thinking","run_id":"r1","other":{"k":1,"k":2}}"#,
            r#"{"type":"agent_thinking","run_id":"r1","run_id":"r2"}"#,
            r#"{"typ\u0065":"agent_thinking","run_id":"r1"}"#,
            r#"{"type":"agent_thinking","run_id":"r1","ts":5}"#,
            r#"{"type":"agent_thinking","run_id":"r1","traceparent":null,"user_id":null}"#,
            r#"{"type":"agent_thinking","run_id":"r1","payload":{"s":"\ud800"}}"#,
            r#"{"type":"agent_thinking","run_id":"r1","payload":{"n":1e400}}"#,
            r#"{"type":"tool_executing","run_id":"r1","payload":{"tool_call_id":"c1"}}"#,
            r#"{"type":"tool_executing","run_id":"r1","payload":{"tool_c\u0061ll_id":"c1"}}"#,
            r#"{"type":"tool_completed","run_id":"r1","payload":{"tool_call_id":["c1"]}}"#,
            r#"{"type":"custom","user_id":"u1","payload":{"name":""}}"#,
            r#"{"type":"custom","user_id":"u1","payload":{"name":{"x":1}}}"#,
            r#"{"type":"agent_thinking","run_id":"r1","payload":{"agui":{"type":"TEXT_MESSAGE_START","messageId":"m1"}}}"#,
            r#"{"type":"TEXT_MESSAGE_CONTENT","run_id":"r1","messageId":"m1","delta":"hi"}"#,
            r#"{"type":"TOOL_CALL_START","run_id":"r1","toolCallId":"c1","toolCallName":"t"}"#,
            r#"[{"type":"agent_thinking"}]"#,
            r#"[{"a":1,"a":2}]"#,
            "7",
            "{",
        ];
        for raw in corpus {
            let fast = parse(raw, 4096);
            let tree = decode(raw, 4096).and_then(from_value);
            match (fast, tree) {
                (Ok(fast), Ok(tree)) => {
                    let value =
                        |event: &Event| serde_json::from_str::<Value>(&event.to_text()).unwrap();
                    assert_eq!(value(&fast), value(&tree), "{raw}");
                    assert_eq!(fast.payload.tool_call_id(), tree.payload.tool_call_id());
                    assert_eq!(fast.payload.agui(), tree.payload.agui(), "{raw}");
                }
                (Err(fast), Err(tree)) => {
                    assert_eq!((fast.code, fast.field), (tree.code, tree.field), "{raw}")
                }
                (fast, tree) => panic!("{raw}: {fast:?} against {tree:?}"),
            }
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
