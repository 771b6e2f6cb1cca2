//! The AG-UI event schema (the `@ag-ui/core` 1.0 event list): every type's fields, which are
//! required, and their JSON shape. Objects are open (AG-UI's schemas are loose), so fields not
//! listed are kept as they are; nested structures (messages, JSON patches, outcomes) are checked
//! for their outer shape only.

use serde_json::{Map, Value};

use super::super::channel::check_id;
use super::super::event::Refusal;

#[derive(Clone, Copy)]
pub(super) enum Shape {
    Str,
    /// A string the gateway follows (run, thread, message, tool call ids): an id by the gateway's
    /// rules, 1 to 256 bytes without control characters.
    Id,
    Int,
    Bool,
    Object,
    Array,
    /// Any JSON value but `null`.
    NotNull,
    /// Any JSON value, `null` included (present when required).
    Any,
    StrOrArray,
    OneOf(&'static [&'static str]),
}

pub(super) struct Field {
    pub name: &'static str,
    pub shape: Shape,
    pub required: bool,
}

const fn req(name: &'static str, shape: Shape) -> Field {
    Field {
        name,
        shape,
        required: true,
    }
}

const fn opt(name: &'static str, shape: Shape) -> Field {
    Field {
        name,
        shape,
        required: false,
    }
}

use Shape::*;

/// Fields every event may carry.
const BASE: &[Field] = &[
    opt("timestamp", Int),
    opt("rawEvent", NotNull),
    opt("metadata", Object),
];

const TEXT_ROLES: &[&str] = &["developer", "system", "assistant", "user"];

/// Every AG-UI event type with its own fields (besides [`BASE`]).
pub(super) const TYPES: &[(&str, &[Field])] = &[
    (
        "TEXT_MESSAGE_START",
        &[
            req("messageId", Id),
            opt("role", OneOf(TEXT_ROLES)),
            opt("name", Str),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "TEXT_MESSAGE_CONTENT",
        &[
            req("messageId", Id),
            req("delta", Str),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "TEXT_MESSAGE_END",
        &[req("messageId", Id), opt("subagentRunId", Str)],
    ),
    (
        "TEXT_MESSAGE_CHUNK",
        &[
            opt("messageId", Id),
            opt("role", OneOf(TEXT_ROLES)),
            opt("delta", Str),
            opt("name", Str),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "TOOL_CALL_START",
        &[
            req("toolCallId", Id),
            req("toolCallName", Str),
            opt("parentMessageId", Str),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "TOOL_CALL_ARGS",
        &[
            req("toolCallId", Id),
            req("delta", Str),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "TOOL_CALL_END",
        &[req("toolCallId", Id), opt("subagentRunId", Str)],
    ),
    (
        "TOOL_CALL_CHUNK",
        &[
            opt("toolCallId", Id),
            opt("toolCallName", Str),
            opt("parentMessageId", Str),
            opt("delta", Str),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "TOOL_CALL_RESULT",
        &[
            req("messageId", Str),
            req("toolCallId", Id),
            req("content", StrOrArray),
            opt("role", OneOf(&["tool"])),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "STATE_SNAPSHOT",
        &[req("snapshot", Any), opt("subagentRunId", Str)],
    ),
    (
        "STATE_DELTA",
        &[req("delta", Array), opt("subagentRunId", Str)],
    ),
    ("MESSAGES_SNAPSHOT", &[req("messages", Array)]),
    (
        "ACTIVITY_SNAPSHOT",
        &[
            req("messageId", Str),
            req("activityType", Str),
            req("content", Object),
            opt("replace", Bool),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "ACTIVITY_DELTA",
        &[
            req("messageId", Str),
            req("activityType", Str),
            req("patch", Array),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "RAW",
        &[
            req("event", Any),
            opt("source", Str),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "CUSTOM",
        &[
            req("name", Str),
            req("value", Any),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "RUN_STARTED",
        &[
            req("threadId", Id),
            req("runId", Id),
            opt("protocolVersion", Str),
            opt("parentRunId", Str),
            opt("input", Object),
        ],
    ),
    (
        "RUN_FINISHED",
        &[
            req("threadId", Id),
            req("runId", Id),
            opt("result", NotNull),
            opt("outcome", Object),
            opt("usage", Array),
        ],
    ),
    (
        "RUN_ERROR",
        &[req("message", Str), opt("code", Str), opt("usage", Array)],
    ),
    (
        "STEP_STARTED",
        &[req("stepName", Id), opt("subagentRunId", Str)],
    ),
    (
        "STEP_FINISHED",
        &[req("stepName", Id), opt("subagentRunId", Str)],
    ),
    (
        "REASONING_START",
        &[req("messageId", Id), opt("subagentRunId", Str)],
    ),
    (
        "REASONING_MESSAGE_START",
        &[
            req("messageId", Id),
            req("role", OneOf(&["reasoning"])),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "REASONING_MESSAGE_CONTENT",
        &[
            req("messageId", Id),
            req("delta", Str),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "REASONING_MESSAGE_END",
        &[req("messageId", Id), opt("subagentRunId", Str)],
    ),
    (
        "REASONING_MESSAGE_CHUNK",
        &[
            opt("messageId", Id),
            opt("delta", Str),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "REASONING_END",
        &[req("messageId", Id), opt("subagentRunId", Str)],
    ),
    (
        "REASONING_ENCRYPTED_VALUE",
        &[
            req("subtype", OneOf(&["tool-call", "message"])),
            req("entityId", Str),
            req("encryptedValue", Str),
            opt("subagentRunId", Str),
        ],
    ),
    (
        "SUBAGENT_STARTED",
        &[
            req("subagentRunId", Str),
            req("name", Str),
            opt("description", Str),
            opt("parentSubagentRunId", Str),
            opt("parentToolCallId", Str),
            opt("parentMessageId", Str),
        ],
    ),
    (
        "SUBAGENT_FINISHED",
        &[
            req("subagentRunId", Str),
            opt("result", NotNull),
            opt("outcome", Object),
        ],
    ),
    (
        "SUBAGENT_ERROR",
        &[
            req("subagentRunId", Str),
            req("message", Str),
            opt("code", Str),
        ],
    ),
];

/// The canonical name of an AG-UI type, if `text` is one.
pub(super) fn find(text: &str) -> Option<(&'static str, &'static [Field])> {
    TYPES.iter().find(|(name, _)| *name == text).copied()
}

/// Checks `fields` (the event object without `type`) against `own` and [`BASE`].
pub(super) fn check(own: &[Field], fields: &Map<String, Value>) -> Result<(), Refusal> {
    for field in BASE.iter().chain(own) {
        match fields.get(field.name) {
            None if field.required => {
                return Err(Refusal::missing(field.name, "required by AG-UI"));
            }
            None => {}
            // AG-UI's optional fields may not be null (its schema says `.optional()`, not
            // `.nullable()`), except where any value is allowed.
            Some(value) => check_shape(field, value)?,
        }
    }
    Ok(())
}

fn check_shape(field: &Field, value: &Value) -> Result<(), Refusal> {
    let fits = match (field.shape, value) {
        (Any, _) => true,
        (NotNull, value) => !value.is_null(),
        (Str, Value::String(_)) => true,
        (Id, Value::String(id)) => {
            return check_id(id).map_err(|e| Refusal::invalid(field.name, e.to_string()));
        }
        (Int, Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Bool, Value::Bool(_)) => true,
        (Object, Value::Object(_)) => true,
        (Array | StrOrArray, Value::Array(_)) => true,
        (StrOrArray, Value::String(_)) => true,
        (OneOf(allowed), Value::String(text)) => {
            if allowed.contains(&text.as_str()) {
                true
            } else {
                return Err(Refusal::invalid(
                    field.name,
                    format!("must be one of {}", allowed.join(", ")),
                ));
            }
        }
        _ => false,
    };
    if fits {
        Ok(())
    } else {
        Err(Refusal::invalid(field.name, shape_name(field.shape)))
    }
}

fn shape_name(shape: Shape) -> &'static str {
    match shape {
        Str | Id | OneOf(_) => "must be a string",
        Int => "must be an integer",
        Bool => "must be a boolean",
        Object => "must be an object",
        Array => "must be an array",
        StrOrArray => "must be a string or an array",
        NotNull | Any => "must not be null",
    }
}
