//! AG-UI's rules for a stream bound to one run (`POST /v1/runs/{run_id}/agui`, the proxy's agent
//! answers): AG-UI events only, checked against the run's [`Sequence`] (refused `out_of_order`
//! with `agui.strict`), and a run left open closed with [`Sequence::close`]'s events.

use serde_json::{Value, json};

use super::{Bound, CloseReason, Rules};
use crate::Gateway;
use crate::metrics::{self, Label};
use crate::protocol::agui::{AguiEvent, Sequence};
use crate::protocol::event::{self, Event, Refusal, RefusalCode};

/// The run's place in AG-UI's ordering rules.
#[derive(Default)]
pub struct Agui {
    sequence: Sequence,
    /// Where the last checked event would move the run, kept if it is taken.
    next: Option<Sequence>,
    violations: usize,
}

impl Rules for Agui {
    const PROTOCOL: &'static str = "agui";

    fn event(&self, gateway: &Gateway, bound: &Bound, raw: &str) -> Result<Event, Refusal> {
        let value = event::decode(raw, gateway.config.ingest.max_event_bytes)?;
        bound_event(bound, value)
    }

    /// A violation is counted in `agentwire_lifecycle_violations_total` once: by the watchdog
    /// when the event is published (it judges AG-UI runs by the same rules), here when
    /// `agui.strict` refuses it.
    fn check(&mut self, gateway: &Gateway, event: &Event) -> Result<(), Refusal> {
        let mut next = self.sequence.clone();
        // `event` took AG-UI events only, each kept with its fields under `payload.agui`.
        if let Some(fields) = event.payload.agui()
            && let Err(violation) = next.apply_fields(fields)
        {
            self.violations += 1;
            if gateway.config.agui.strict {
                metrics::count(&gateway.metrics.lifecycle_violations, violation);
                let kind = fields
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                return Err(Refusal {
                    code: RefusalCode::OutOfOrder,
                    field: Some("type".into()),
                    reason: format!(
                        "{kind} breaks AG-UI's ordering rules here ({})",
                        violation.as_str()
                    ),
                });
            }
        }
        self.next = Some(next);
        Ok(())
    }

    fn settle(&mut self, taken: bool) {
        if let Some(next) = self.next.take()
            && taken
        {
            self.sequence = next;
        }
    }

    /// A run the gateway opened and the agent never started is started first, so its viewers
    /// see it begin and fail.
    fn close(
        &self,
        _gateway: &Gateway,
        bound: &Bound,
        started: bool,
        reason: CloseReason,
        message: &str,
    ) -> Vec<Result<Event, Refusal>> {
        let mut events = Vec::new();
        if bound.opened_by_gateway && !started && !self.sequence.is_running() {
            if let Some(thread_id) = &bound.thread_id {
                let start = json!({
                    "type": "RUN_STARTED", "threadId": thread_id, "runId": bound.run_id
                });
                let mut opened = Sequence::default();
                if let Ok(event) = bound_event(bound, start.clone())
                    && let Some(fields) = event.payload.agui()
                    && opened.apply_fields(fields).is_ok()
                {
                    events.push(start);
                    events.extend(opened.close(reason.as_str(), message));
                }
            }
        } else {
            events = self.sequence.close(reason.as_str(), message);
        }
        events
            .into_iter()
            .map(|value| bound_event(bound, value))
            .collect()
    }

    fn violations(&self) -> Option<usize> {
        Some(self.violations)
    }
}

/// The event with its run (from the path) and its thread (once known) filled in, validated
/// like any producer's event. Only AG-UI events are taken: the stream is an AG-UI stream.
fn bound_event(bound: &Bound, value: Value) -> Result<Event, Refusal> {
    let Value::Object(mut fields) = value else {
        return Err(invalid(None, "an event must be a JSON object"));
    };
    match fields.get("type") {
        Some(Value::String(kind)) if AguiEvent::is_type(kind) => {}
        None => {
            return Err(Refusal {
                code: RefusalCode::MissingField,
                field: Some("type".into()),
                reason: "required: an AG-UI event type".into(),
            });
        }
        Some(_) => {
            return Err(invalid(
                Some("type"),
                "this stream takes AG-UI events only (RUN_STARTED, TEXT_MESSAGE_CONTENT, …)",
            ));
        }
    }
    match fields.get("run_id") {
        None => {
            fields.insert("run_id".into(), bound.run_id.clone().into());
        }
        Some(Value::String(run_id)) if *run_id == bound.run_id => {}
        Some(_) => {
            return Err(invalid(
                Some("run_id"),
                "differs from the run this stream is bound to",
            ));
        }
    }
    if let Some(thread_id) = &bound.thread_id
        && !fields.contains_key("thread_id")
    {
        fields.insert("thread_id".into(), thread_id.clone().into());
    }
    event::from_value(Value::Object(fields))
}

fn invalid(field: Option<&str>, reason: &str) -> Refusal {
    Refusal {
        code: RefusalCode::InvalidField,
        field: field.map(str::to_string),
        reason: reason.into(),
    }
}
