//! AG-UI's ordering rules for one run, as the official client's `verifyEvents` applies them after
//! `transformChunks`: RUN_STARTED first; a message, tool call or step is started before its
//! content and end, and not started twice; no RUN_FINISHED while one is open; nothing after
//! RUN_ERROR but a new RUN_STARTED; RUN_ERROR at any time. A [`Sequence`] follows one run's events and says which rule
//! an event broke, what a client joining at this point must be sent first ([`Sequence::prelude`]),
//! and what closes the run for a client when its agent is gone ([`Sequence::close`]).

use serde_json::{Map, Value, json};

use super::{AguiEvent, Kind};

/// An event's kind and fields, borrowed.
struct Fields<'a> {
    kind: Kind,
    fields: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn str(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(Value::as_str)
    }
}

/// How many open messages, tool calls and steps one run keeps; past it they are not followed
/// (their ends then count as `not_started`).
pub const MAX_OPEN: usize = 64;

/// An AG-UI ordering rule an event broke, counted in
/// `agentwire_lifecycle_violations_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderViolation {
    /// An event of a run before its RUN_STARTED (or after its RUN_FINISHED).
    BeforeRunStarted,
    /// RUN_STARTED while the run is running.
    RunStartedTwice,
    /// An event after RUN_ERROR.
    AfterRunError,
    /// A message, tool call or step started while already open.
    StartedTwice,
    /// Content, args or an end for a message, tool call or step that is not open.
    NotStarted,
    /// RUN_FINISHED while a message, tool call or step is open.
    FinishedWhileOpen,
}

impl OrderViolation {
    pub const ALL: &'static [Self] = &[
        Self::BeforeRunStarted,
        Self::RunStartedTwice,
        Self::AfterRunError,
        Self::StartedTwice,
        Self::NotStarted,
        Self::FinishedWhileOpen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BeforeRunStarted => "agui_before_run_started",
            Self::RunStartedTwice => "agui_run_started_twice",
            Self::AfterRunError => "agui_after_run_error",
            Self::StartedTwice => "agui_started_twice",
            Self::NotStarted => "agui_not_started",
            Self::FinishedWhileOpen => "agui_finished_while_open",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    #[default]
    Idle,
    Running,
    Finished,
    Errored,
}

#[derive(Debug, Clone, PartialEq)]
struct OpenMessage {
    id: String,
    role: String,
    /// Opened by a TEXT_MESSAGE_CHUNK: the client's chunk transform closes it at the next
    /// event that is not a chunk.
    chunked: bool,
    reasoning: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct OpenTool {
    id: String,
    name: String,
    parent: Option<String>,
    /// Its arguments are still streaming (no TOOL_CALL_END yet).
    args_open: bool,
    chunked: bool,
}

/// One run's place in AG-UI's ordering rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sequence {
    phase: Phase,
    thread_id: String,
    run_id: String,
    messages: Vec<OpenMessage>,
    /// Tool calls without a TOOL_CALL_RESULT yet.
    tools: Vec<OpenTool>,
    steps: Vec<String>,
}

impl Sequence {
    /// Whether a run is open (started, neither finished nor errored).
    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Follows `event`; an event that breaks a rule is still followed as far as it can be, so one
    /// violation is counted once and not again for every event after it.
    pub fn apply(&mut self, event: &AguiEvent) -> Result<(), OrderViolation> {
        self.apply_fields(&event.fields)
    }

    /// [`Self::apply`] for a valid AG-UI event's fields (as a native event carries them under
    /// `payload.agui`).
    pub fn apply_fields(&mut self, event: &Map<String, Value>) -> Result<(), OrderViolation> {
        let event = Fields {
            kind: Kind::of(
                event
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            ),
            fields: event,
        };
        if !matches!(
            event.kind,
            Kind::TextChunk | Kind::ToolChunk | Kind::ReasoningMessageChunk
        ) {
            self.close_chunks();
        }
        let before = match (self.phase, event.kind) {
            (Phase::Running, Kind::RunStarted) => Err(OrderViolation::RunStartedTwice),
            (_, Kind::RunStarted) => Ok(()),
            // RUN_ERROR may end anything, even a finished run or a stream that never started.
            (Phase::Idle | Phase::Finished, Kind::RunError) => Ok(()),
            (Phase::Errored, _) => Err(OrderViolation::AfterRunError),
            (Phase::Idle | Phase::Finished, _) => Err(OrderViolation::BeforeRunStarted),
            (Phase::Running, _) => Ok(()),
        };
        let id = |name: &str| event.str(name).unwrap_or_default().to_string();
        let outcome = match event.kind {
            Kind::RunStarted => {
                *self = Self {
                    phase: Phase::Running,
                    thread_id: id("threadId"),
                    run_id: id("runId"),
                    ..Self::default()
                };
                Ok(())
            }
            Kind::RunFinished => {
                let open = self.messages.is_empty()
                    && self.steps.is_empty()
                    && self.tools.iter().all(|t| !t.args_open);
                self.phase = Phase::Finished;
                self.clear();
                if open {
                    Ok(())
                } else {
                    Err(OrderViolation::FinishedWhileOpen)
                }
            }
            Kind::RunError => {
                self.phase = Phase::Errored;
                self.clear();
                Ok(())
            }
            Kind::TextStart | Kind::ReasoningMessageStart => {
                let message = OpenMessage {
                    id: id("messageId"),
                    role: event.str("role").unwrap_or("assistant").to_string(),
                    chunked: false,
                    reasoning: event.kind == Kind::ReasoningMessageStart,
                };
                self.open_message(message)
            }
            Kind::TextContent | Kind::ReasoningMessageContent => {
                self.message_open(&id("messageId"))
            }
            Kind::TextEnd | Kind::ReasoningMessageEnd => {
                let before = self.messages.len();
                let message_id = id("messageId");
                self.messages.retain(|m| m.id != message_id);
                if self.messages.len() < before {
                    Ok(())
                } else {
                    Err(OrderViolation::NotStarted)
                }
            }
            Kind::TextChunk | Kind::ReasoningMessageChunk => {
                let reasoning = event.kind == Kind::ReasoningMessageChunk;
                match event.str("messageId") {
                    Some(message_id)
                        if !self
                            .messages
                            .iter()
                            .any(|m| m.chunked && m.id == message_id) =>
                    {
                        self.messages
                            .retain(|m| !(m.chunked && m.reasoning == reasoning));
                        self.open_message(OpenMessage {
                            id: message_id.to_string(),
                            role: event.str("role").unwrap_or("assistant").to_string(),
                            chunked: true,
                            reasoning,
                        })
                    }
                    Some(_) => Ok(()),
                    None if self
                        .messages
                        .iter()
                        .any(|m| m.chunked && m.reasoning == reasoning) =>
                    {
                        Ok(())
                    }
                    None => Err(OrderViolation::NotStarted),
                }
            }
            Kind::ToolStart => self.open_tool(OpenTool {
                id: id("toolCallId"),
                name: id("toolCallName"),
                parent: event.str("parentMessageId").map(str::to_string),
                args_open: true,
                chunked: false,
            }),
            Kind::ToolArgs => match self.tools.iter().find(|t| t.id == id("toolCallId")) {
                Some(tool) if tool.args_open => Ok(()),
                _ => Err(OrderViolation::NotStarted),
            },
            Kind::ToolEnd => match self.tools.iter_mut().find(|t| t.id == id("toolCallId")) {
                Some(tool) if tool.args_open => {
                    tool.args_open = false;
                    Ok(())
                }
                _ => Err(OrderViolation::NotStarted),
            },
            Kind::ToolChunk => match event.str("toolCallId") {
                Some(tool_call_id)
                    if !self
                        .tools
                        .iter()
                        .any(|t| t.chunked && t.args_open && t.id == tool_call_id) =>
                {
                    self.open_tool(OpenTool {
                        id: tool_call_id.to_string(),
                        name: id("toolCallName"),
                        parent: event.str("parentMessageId").map(str::to_string),
                        args_open: true,
                        chunked: true,
                    })
                }
                Some(_) => Ok(()),
                None if self.tools.iter().any(|t| t.chunked && t.args_open) => Ok(()),
                None => Err(OrderViolation::NotStarted),
            },
            Kind::ToolResult => {
                // A result may answer a call of an earlier run (a frontend tool), so an unknown
                // id is not a violation; a known one is no longer open.
                let tool_call_id = id("toolCallId");
                self.tools.retain(|t| t.id != tool_call_id);
                Ok(())
            }
            Kind::StepStarted => {
                let name = id("stepName");
                if self.steps.contains(&name) {
                    Err(OrderViolation::StartedTwice)
                } else {
                    if self.steps.len() < MAX_OPEN {
                        self.steps.push(name);
                    }
                    Ok(())
                }
            }
            Kind::StepFinished => {
                let name = id("stepName");
                let before = self.steps.len();
                self.steps.retain(|s| *s != name);
                if self.steps.len() < before {
                    Ok(())
                } else {
                    Err(OrderViolation::NotStarted)
                }
            }
            Kind::Other => Ok(()),
        };
        before.and(outcome)
    }

    fn clear(&mut self) {
        self.messages.clear();
        self.tools.clear();
        self.steps.clear();
    }

    /// What the client's chunk transform does at an event that is not a chunk.
    fn close_chunks(&mut self) {
        self.messages.retain(|m| !m.chunked);
        for tool in &mut self.tools {
            if tool.chunked {
                tool.args_open = false;
            }
        }
    }

    fn open_message(&mut self, message: OpenMessage) -> Result<(), OrderViolation> {
        if self.messages.iter().any(|m| m.id == message.id) {
            return Err(OrderViolation::StartedTwice);
        }
        if self.messages.len() < MAX_OPEN {
            self.messages.push(message);
        }
        Ok(())
    }

    fn message_open(&self, id: &str) -> Result<(), OrderViolation> {
        if self.messages.iter().any(|m| m.id == id) {
            Ok(())
        } else {
            Err(OrderViolation::NotStarted)
        }
    }

    fn open_tool(&mut self, tool: OpenTool) -> Result<(), OrderViolation> {
        if self.tools.iter().any(|t| t.id == tool.id) {
            return Err(OrderViolation::StartedTwice);
        }
        if self.tools.len() < MAX_OPEN {
            self.tools.push(tool);
        }
        Ok(())
    }

    /// What a client that starts reading at this point must be sent first so that the events
    /// after it pass AG-UI's verification: RUN_STARTED and a start for every message, tool call
    /// (whose arguments are still streaming) and step still open. Empty when no run is open.
    pub fn prelude(&self) -> Vec<Value> {
        if self.phase != Phase::Running {
            return Vec::new();
        }
        let mut events = vec![json!({
            "type": "RUN_STARTED", "threadId": self.thread_id, "runId": self.run_id
        })];
        for step in &self.steps {
            events.push(json!({"type": "STEP_STARTED", "stepName": step}));
        }
        for message in &self.messages {
            events.push(match (message.reasoning, message.chunked) {
                (false, false) => json!({"type": "TEXT_MESSAGE_START", "messageId": message.id, "role": message.role}),
                (false, true) => json!({"type": "TEXT_MESSAGE_CHUNK", "messageId": message.id, "role": message.role}),
                (true, false) => json!({"type": "REASONING_MESSAGE_START", "messageId": message.id, "role": "reasoning"}),
                (true, true) => json!({"type": "REASONING_MESSAGE_CHUNK", "messageId": message.id}),
            });
        }
        for tool in self.tools.iter().filter(|t| t.args_open) {
            let kind = if tool.chunked {
                "TOOL_CALL_CHUNK"
            } else {
                "TOOL_CALL_START"
            };
            let mut start = json!({"type": kind, "toolCallId": tool.id, "toolCallName": tool.name});
            if let Some(parent) = &tool.parent {
                start["parentMessageId"] = parent.as_str().into();
            }
            events.push(start);
        }
        events
    }

    /// The events that end the open run for its viewers when its agent is gone: an end for
    /// every open message, tool call and step, an error result for every tool call without
    /// one, then RUN_ERROR with `code` and `message`. Empty when no run is open.
    pub fn close(&self, code: &str, message: &str) -> Vec<Value> {
        if self.phase != Phase::Running {
            return Vec::new();
        }
        let mut events = Vec::new();
        for open in self.messages.iter().filter(|m| !m.chunked) {
            let kind = if open.reasoning {
                "REASONING_MESSAGE_END"
            } else {
                "TEXT_MESSAGE_END"
            };
            events.push(json!({"type": kind, "messageId": open.id}));
        }
        for tool in &self.tools {
            if tool.args_open && !tool.chunked {
                events.push(json!({"type": "TOOL_CALL_END", "toolCallId": tool.id}));
            }
            events.push(json!({
                "type": "TOOL_CALL_RESULT", "messageId": format!("{}-result", tool.id),
                "toolCallId": tool.id, "role": "tool",
                "content": format!("error: {message}"),
            }));
        }
        for step in &self.steps {
            events.push(json!({"type": "STEP_FINISHED", "stepName": step}));
        }
        events.push(json!({"type": "RUN_ERROR", "code": code, "message": message}));
        events
    }
}
