//! AG-UI, the event vocabulary of the AG-UI protocol (`@ag-ui/core` 1.0), in and out: an AG-UI
//! event a producer sends is validated against AG-UI's schema ([`schema`]) and kept in its native
//! form (the mapped native type, the AG-UI event itself under `payload.agui`); [`render`] turns
//! any stored event back into AG-UI for AG-UI clients; [`Sequence`] follows AG-UI's ordering rules
//! for one run (violations, the prelude a resuming client needs, the events that close a dead run);
//! [`RunAgentInput`] is what a client sends to start a run.

mod input;
mod render;
mod schema;
mod sequence;

use serde_json::{Map, Value};

pub use input::RunAgentInput;
pub use render::render;
pub use sequence::{OrderViolation, Sequence};

use super::event::{EventType, Refusal};

/// The `payload` key under which a native event carries the AG-UI event it was made from.
pub const PAYLOAD_KEY: &str = "agui";

/// The AG-UI types the gateway follows; every other type is activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    RunStarted,
    RunFinished,
    RunError,
    TextStart,
    TextContent,
    TextEnd,
    TextChunk,
    ToolStart,
    ToolArgs,
    ToolEnd,
    ToolChunk,
    ToolResult,
    StepStarted,
    StepFinished,
    ReasoningMessageStart,
    ReasoningMessageContent,
    ReasoningMessageEnd,
    ReasoningMessageChunk,
    Other,
}

impl Kind {
    pub(super) fn of(name: &str) -> Self {
        match name {
            "RUN_STARTED" => Self::RunStarted,
            "RUN_FINISHED" => Self::RunFinished,
            "RUN_ERROR" => Self::RunError,
            "TEXT_MESSAGE_START" => Self::TextStart,
            "TEXT_MESSAGE_CONTENT" => Self::TextContent,
            "TEXT_MESSAGE_END" => Self::TextEnd,
            "TEXT_MESSAGE_CHUNK" => Self::TextChunk,
            "TOOL_CALL_START" => Self::ToolStart,
            "TOOL_CALL_ARGS" => Self::ToolArgs,
            "TOOL_CALL_END" => Self::ToolEnd,
            "TOOL_CALL_CHUNK" => Self::ToolChunk,
            "TOOL_CALL_RESULT" => Self::ToolResult,
            "STEP_STARTED" => Self::StepStarted,
            "STEP_FINISHED" => Self::StepFinished,
            "REASONING_MESSAGE_START" => Self::ReasoningMessageStart,
            "REASONING_MESSAGE_CONTENT" => Self::ReasoningMessageContent,
            "REASONING_MESSAGE_END" => Self::ReasoningMessageEnd,
            "REASONING_MESSAGE_CHUNK" => Self::ReasoningMessageChunk,
            _ => Self::Other,
        }
    }

    /// The native type an event of this kind is kept as: the run lifecycle the watchdog
    /// follows, thinking for streamed text, `custom` for the rest.
    pub fn native(self) -> EventType {
        match self {
            Self::RunStarted => EventType::AgentStarted,
            Self::RunFinished => EventType::AgentCompleted,
            Self::RunError => EventType::AgentError,
            Self::ToolStart => EventType::ToolExecuting,
            Self::ToolResult => EventType::ToolCompleted,
            Self::TextContent
            | Self::TextChunk
            | Self::ReasoningMessageContent
            | Self::ReasoningMessageChunk => EventType::AgentThinking,
            _ => EventType::Custom,
        }
    }
}

/// One valid AG-UI event: its fields as the producer sent them, `type` included.
#[derive(Debug, Clone, PartialEq)]
pub struct AguiEvent {
    pub kind: Kind,
    pub fields: Map<String, Value>,
}

impl AguiEvent {
    /// Whether `text` names an AG-UI event type (they are UPPER_SNAKE, the native ones are not).
    pub fn is_type(text: &str) -> bool {
        schema::find(text).is_some()
    }

    /// Validates an AG-UI event object against AG-UI's schema.
    pub fn from_fields(fields: Map<String, Value>) -> Result<Self, Refusal> {
        let name = match fields.get("type") {
            Some(Value::String(name)) => name,
            Some(_) => return Err(Refusal::invalid("type", "must be a string")),
            None => return Err(Refusal::missing("type", "required")),
        };
        let Some((name, own)) = schema::find(name) else {
            return Err(Refusal::invalid(
                "type",
                format!("unknown AG-UI type `{}`", super::excerpt(name.as_str())),
            ));
        };
        schema::check(own, &fields)?;
        Ok(Self {
            kind: Kind::of(name),
            fields,
        })
    }

    /// The AG-UI type name.
    pub fn type_name(&self) -> &str {
        self.str("type").unwrap_or_default()
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }

    /// The native payload this event is kept under: the event itself, and for tool events the
    /// `tool_call_id` the watchdog follows.
    pub fn into_payload(self) -> Map<String, Value> {
        let mut payload = Map::new();
        if matches!(self.kind, Kind::ToolStart | Kind::ToolResult)
            && let Some(id) = self.str("toolCallId")
        {
            payload.insert("tool_call_id".into(), id.into());
        }
        if self.kind.native() == EventType::Custom {
            payload.insert("name".into(), "ag-ui".into());
        }
        payload.insert(PAYLOAD_KEY.into(), Value::Object(self.fields));
        payload
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::protocol::event::{self, RefusalCode};

    fn agui(value: Value) -> AguiEvent {
        match value {
            Value::Object(fields) => AguiEvent::from_fields(fields).unwrap(),
            _ => unreachable!(),
        }
    }

    fn refusal(value: Value) -> (String, RefusalCode) {
        let refusal = event::from_value(value).unwrap_err();
        (refusal.field.unwrap_or_default(), refusal.code)
    }

    #[test]
    fn ag_ui_events_are_checked_against_the_schema() {
        use RefusalCode::*;
        let ok = |value: Value| event::from_value(value).unwrap();
        let started = ok(json!({"type": "RUN_STARTED", "threadId": "t1", "runId": "r1"}));
        assert_eq!(started.kind, EventType::AgentStarted);
        assert_eq!(started.run_id.as_deref(), Some("r1"));
        assert_eq!(started.thread_id.as_deref(), Some("t1"));
        assert_eq!(started.payload.value()["agui"]["threadId"], "t1");
        let tool = ok(
            json!({"type": "TOOL_CALL_START", "run_id": "r1", "toolCallId": "c1", "toolCallName": "search"}),
        );
        assert_eq!(tool.kind, EventType::ToolExecuting);
        assert_eq!(tool.payload.value()["tool_call_id"], "c1");
        assert!(
            tool.payload.value()["agui"].get("run_id").is_none(),
            "the gateway's fields are not AG-UI's"
        );
        let delta = ok(
            json!({"type": "TEXT_MESSAGE_CONTENT", "run_id": "r1", "messageId": "m1", "delta": "hi", "extra": 1}),
        );
        assert_eq!(delta.kind, EventType::AgentThinking);
        assert_eq!(
            delta.payload.value()["agui"]["extra"],
            1,
            "AG-UI objects are open"
        );
        let state = ok(json!({"type": "STATE_DELTA", "run_id": "r1", "delta": []}));
        assert_eq!(
            (state.kind, state.payload.value()["name"].clone()),
            (EventType::Custom, json!("ag-ui"))
        );

        assert_eq!(
            refusal(json!({"type": "RUN_STARTED", "runId": "r1"})),
            ("threadId".into(), MissingField)
        );
        assert_eq!(
            refusal(
                json!({"type": "RUN_STARTED", "threadId": "t1", "runId": "r1", "run_id": "r2"})
            ),
            ("run_id".into(), InvalidField)
        );
        assert_eq!(
            refusal(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "x"})),
            ("run_id".into(), MissingField)
        );
        assert_eq!(
            refusal(
                json!({"type": "TEXT_MESSAGE_CONTENT", "run_id": "r1", "messageId": "m1", "delta": 5})
            ),
            ("delta".into(), InvalidField)
        );
        assert_eq!(
            refusal(
                json!({"type": "TEXT_MESSAGE_START", "run_id": "r1", "messageId": "m1", "role": "tool"})
            ),
            ("role".into(), InvalidField)
        );
        assert_eq!(
            refusal(
                json!({"type": "TOOL_CALL_START", "run_id": "r1", "toolCallId": "", "toolCallName": "x"})
            ),
            ("toolCallId".into(), InvalidField)
        );
        assert_eq!(
            refusal(json!({"type": "STATE_DELTA", "run_id": "r1", "delta": {}})),
            ("delta".into(), InvalidField)
        );
        assert_eq!(
            refusal(json!({"type": "CUSTOM", "run_id": "r1", "name": "x"})),
            ("value".into(), MissingField)
        );
        assert_eq!(
            refusal(json!({"type": "RUN_ERROR", "run_id": "r1", "message": "x", "timestamp": 1.5})),
            ("timestamp".into(), InvalidField)
        );
        assert_eq!(
            refusal(json!({"type": "RUN_ERROR", "run_id": "r1", "message": "x", "metadata": null})),
            ("metadata".into(), InvalidField)
        );
    }

    #[test]
    fn the_sequence_follows_verify_events_rules() {
        use OrderViolation::*;
        let mut run = Sequence::default();
        let step = |run: &mut Sequence, value: Value| run.apply(&agui(value));
        assert_eq!(
            step(
                &mut run,
                json!({"type": "TEXT_MESSAGE_START", "messageId": "m0"})
            ),
            Err(BeforeRunStarted)
        );
        let mut run = Sequence::default();
        assert_eq!(
            step(
                &mut run,
                json!({"type": "RUN_STARTED", "threadId": "t", "runId": "r"})
            ),
            Ok(())
        );
        assert_eq!(
            step(
                &mut run,
                json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "x"})
            ),
            Err(NotStarted)
        );
        assert_eq!(
            step(
                &mut run,
                json!({"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"})
            ),
            Ok(())
        );
        assert_eq!(
            step(
                &mut run,
                json!({"type": "TEXT_MESSAGE_START", "messageId": "m1"})
            ),
            Err(StartedTwice)
        );
        assert_eq!(
            step(
                &mut run,
                json!({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "search", "parentMessageId": "m1"})
            ),
            Ok(())
        );
        assert_eq!(
            step(
                &mut run,
                json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": "{"})
            ),
            Ok(())
        );
        assert_eq!(
            run.prelude(),
            vec![
                json!({"type": "RUN_STARTED", "threadId": "t", "runId": "r"}),
                json!({"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"}),
                json!({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "search", "parentMessageId": "m1"}),
            ]
        );
        let closing: Vec<String> = run
            .close("agent_gone", "the agent's stream ended")
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            closing,
            [
                "TEXT_MESSAGE_END",
                "TOOL_CALL_END",
                "TOOL_CALL_RESULT",
                "RUN_ERROR"
            ]
        );
        assert_eq!(
            step(
                &mut run,
                json!({"type": "RUN_FINISHED", "threadId": "t", "runId": "r"})
            ),
            Err(FinishedWhileOpen)
        );
        assert!(run.prelude().is_empty() && run.close("x", "y").is_empty());
        assert_eq!(
            step(&mut run, json!({"type": "STEP_STARTED", "stepName": "s"})),
            Err(BeforeRunStarted)
        );
        assert_eq!(
            step(
                &mut run,
                json!({"type": "RUN_STARTED", "threadId": "t", "runId": "r2"})
            ),
            Ok(())
        );
        assert_eq!(
            step(
                &mut run,
                json!({"type": "RUN_STARTED", "threadId": "t", "runId": "r2"})
            ),
            Err(RunStartedTwice)
        );
        // Chunks open a message that the next non-chunk event closes, as the client's transform does.
        assert_eq!(
            step(
                &mut run,
                json!({"type": "TEXT_MESSAGE_CHUNK", "messageId": "m2", "delta": "a"})
            ),
            Ok(())
        );
        assert_eq!(
            step(
                &mut run,
                json!({"type": "TEXT_MESSAGE_CHUNK", "delta": "b"})
            ),
            Ok(())
        );
        assert_eq!(
            step(&mut run, json!({"type": "RUN_ERROR", "message": "boom"})),
            Ok(())
        );
        assert_eq!(
            step(&mut run, json!({"type": "STEP_STARTED", "stepName": "s"})),
            Err(AfterRunError)
        );
    }

    #[test]
    fn native_events_render_as_ag_ui() {
        let frame = |value: Value| render(&value);
        assert_eq!(
            frame(
                json!({"seq": 3, "type": "tool_executing", "run_id": "r", "thread_id": "t", "payload": {"tool_call_id": "c", "tool_name": "search", "input": {"q": 1}}})
            ),
            vec![
                json!({"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "search"}),
                json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c", "delta": "{\"q\":1}"}),
                json!({"type": "TOOL_CALL_END", "toolCallId": "c"}),
            ]
        );
        assert_eq!(
            frame(
                json!({"seq": 4, "type": "agent_error", "run_id": "r", "payload": {"reason": "stalled", "message": "quiet"}})
            ),
            vec![json!({"type": "RUN_ERROR", "message": "quiet", "code": "stalled"})]
        );
        let original = json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "hi"});
        assert_eq!(
            frame(
                json!({"seq": 5, "type": "agent_thinking", "run_id": "r", "payload": {"agui": original}})
            ),
            vec![original]
        );
    }
}
