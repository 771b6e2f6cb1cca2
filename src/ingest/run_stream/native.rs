//! The native protocol's rules for a stream bound to one run (`POST /v1/runs/{run_id}/events`):
//! native events only, each read in one pass like an item of `POST /v1/events`; a run the stream
//! took events of and never ended (`agent_completed`, `agent_error`) is closed with an
//! `agent_error` of the gateway's.

use serde_json::json;

use super::{Bound, CloseReason, Rules};
use crate::Gateway;
use crate::metrics::Label;
use crate::protocol::event::{self, Event, EventType, InRun, Refusal};

/// Where the run stands, as far as this stream took it.
#[derive(Default)]
pub struct Native {
    state: State,
    /// Whether the last checked event ends the run.
    ends: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing of the run taken yet.
    #[default]
    Idle,
    /// Events taken, no end yet.
    Open,
    /// `agent_completed` or `agent_error` taken: later events do not open it again.
    Ended,
}

impl Rules for Native {
    const PROTOCOL: &'static str = "native";

    fn event(&self, gateway: &Gateway, bound: &Bound, raw: &str) -> Result<Event, Refusal> {
        let run = InRun {
            run_id: &bound.run_id,
            thread_id: bound.thread_id.as_deref(),
        };
        event::parse_in_run(raw, gateway.config.ingest.max_event_bytes, run)
    }

    fn check(&mut self, _gateway: &Gateway, event: &Event) -> Result<(), Refusal> {
        self.ends = matches!(
            event.kind,
            EventType::AgentCompleted | EventType::AgentError
        );
        Ok(())
    }

    fn settle(&mut self, taken: bool) {
        self.state = match (taken, self.state, self.ends) {
            (false, state, _) | (true, state @ State::Ended, _) => state,
            (true, _, true) => State::Ended,
            (true, _, false) => State::Open,
        };
    }

    /// One `agent_error` shaped like the watchdog's stall notice (`payload.reason`, `message`,
    /// the run's open tool calls as the watchdog follows them, `source`). At most
    /// `SHOWN_TOOL_IDS` ids of 256 bytes each: it fits `config::MIN_EVENT_BYTES`.
    fn close(
        &self,
        gateway: &Gateway,
        bound: &Bound,
        _started: bool,
        reason: CloseReason,
        message: &str,
    ) -> Vec<Result<Event, Refusal>> {
        if self.state != State::Open {
            return Vec::new();
        }
        let (open_tools, open_tool_ids) = gateway
            .watchdog
            .report(&bound.run_id)
            .map_or((0, Vec::new()), |run| (run.open_tools, run.open_tool_ids));
        let error = json!({
            "type": "agent_error",
            "payload": {
                "reason": reason.as_str(),
                "message": message,
                "open_tools": open_tools,
                "open_tool_ids": open_tool_ids,
                "source": "agentwire",
            },
        })
        .to_string();
        vec![self.event(gateway, bound, &error)]
    }

    fn violations(&self) -> Option<usize> {
        None
    }
}
