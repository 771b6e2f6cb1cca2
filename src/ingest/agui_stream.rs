//! AG-UI event streams bound to one run: a producer's `POST /v1/runs/{run_id}/agui` body (SSE or
//! NDJSON) or an agent's answer read by the proxy ([`super::agui_proxy`]). Each event is taken in
//! as it arrives, through the same per-item path as `POST /v1/events` ([`super::accept`]), after
//! its run (and thread, once known) is filled in and AG-UI's ordering rules are checked against
//! the run's [`Sequence`]. When the stream ends while the run is open (end of body, silence for
//! `agui.stream_idle_timeout`, a broken connection, an agent that cannot be reached, shutdown),
//! the events of [`Sequence::close`] are published the same way, so that no viewer waits for a
//! run nobody is producing any more.
//!
//! A stream is bounded in memory: one line (one event) at most `ingest.max_event_bytes` is held;
//! a longer one is skipped as it arrives and refused as `too_large`, and the stream goes on.

use std::fmt::Display;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

use super::{ItemResult, accept, count_refusal};
use crate::Gateway;
use crate::metrics::{self, Label};
use crate::protocol::agui::{AguiEvent, Sequence};
use crate::protocol::event::{self, Event, Refusal, RefusalCode};

/// How many item errors a summary lists (with their line); `failed` counts them all.
const MAX_ERRORS: usize = 10;

/// What an SSE line may hold beyond its event's JSON: the field name (`data: `).
pub const SSE_LINE_SLACK: usize = 16;

/// How a stream's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Server-Sent Events: an event's JSON on its `data:` lines, events apart by a blank line;
    /// comments and the other fields (`event:`, `id:`, `retry:`) are ignored.
    Sse,
    /// One event's JSON per line.
    Ndjson,
}

/// The run a stream feeds.
#[derive(Debug, Clone)]
pub struct Bound {
    pub run_id: String,
    /// The thread, when known before the stream says it (`?thread_id=`, a `RunAgentInput`);
    /// otherwise RUN_STARTED's `threadId` names it.
    pub thread_id: Option<String>,
    /// The producer key that posted the stream (scopes its `event_id`s).
    pub producer: Option<String>,
    /// The gateway started this run itself (the proxy, on a browser's request): if the agent
    /// fails before its RUN_STARTED, the gateway starts the run for its viewers and closes it.
    pub opened_by_gateway: bool,
}

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The body ended.
    End,
    /// Nothing arrived for `agui.stream_idle_timeout`.
    IdleTimeout,
    /// The connection broke (the producer or the agent went away mid-body).
    Broken,
    /// The proxy could not reach the agent, or it answered with an error status.
    Unreachable,
    /// The gateway is shutting down.
    Shutdown,
}

/// Why the gateway closed an open run: the `code` of its RUN_ERROR, counted in
/// `agentwire_agui_runs_closed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The stream ended (or broke) without RUN_FINISHED or RUN_ERROR.
    AgentStreamEnded,
    /// The stream was silent for `agui.stream_idle_timeout`.
    AgentStalled,
    /// The proxy could not reach the agent, or the agent answered with an error status.
    AgentUnreachable,
    /// The gateway shut down while the run streamed.
    GatewayShutdown,
}

impl Label for CloseReason {
    const ALL: &'static [Self] = &[
        Self::AgentStreamEnded,
        Self::AgentStalled,
        Self::AgentUnreachable,
        Self::GatewayShutdown,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::AgentStreamEnded => "agent_stream_ended",
            Self::AgentStalled => "agent_stalled",
            Self::AgentUnreachable => "agent_unreachable",
            Self::GatewayShutdown => "gateway_shutdown",
        }
    }
}

impl CloseReason {
    fn of(ending: Ending) -> Self {
        match ending {
            Ending::End | Ending::Broken => Self::AgentStreamEnded,
            Ending::IdleTimeout => Self::AgentStalled,
            Ending::Unreachable => Self::AgentUnreachable,
            Ending::Shutdown => Self::GatewayShutdown,
        }
    }

    /// The RUN_ERROR's `message` (and the error tool results' content).
    fn message(self, gateway: &Gateway) -> String {
        match self {
            Self::AgentStreamEnded => {
                "the agent's stream ended before the run finished; the gateway ended the run".into()
            }
            Self::AgentStalled => format!(
                "the agent sent nothing for {} s; the gateway ended the run",
                gateway.config.agui.stream_idle_timeout.as_secs()
            ),
            Self::AgentUnreachable => {
                "the gateway could not reach the agent; the gateway ended the run".into()
            }
            Self::GatewayShutdown => {
                "the gateway shut down while the run streamed; the gateway ended the run".into()
            }
        }
    }
}

/// An item refused or not taken, with the line it started on.
#[derive(Debug, Serialize)]
pub struct LineError {
    pub line: usize,
    #[serde(flatten)]
    pub item: ItemResult,
}

/// What a stream did, answered to its producer when the body ends.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub run_id: String,
    pub thread_id: Option<String>,
    pub accepted: usize,
    pub pending_resolution: usize,
    pub duplicates: usize,
    /// Items refused or not taken (the first [`MAX_ERRORS`] are in `errors`).
    pub failed: usize,
    pub errors: Vec<LineError>,
    /// Events that broke AG-UI's ordering rules (refused as `out_of_order` when `agui.strict`).
    pub violations: usize,
    pub ended: Ending,
    /// The `code` of the RUN_ERROR the gateway closed the run with, if it was still open.
    pub closed: Option<&'static str>,
}

/// One run's stream as it is read: the run's place in AG-UI's ordering rules and the tally.
pub struct RunStream<'g> {
    gateway: &'g Gateway,
    bound: Bound,
    sequence: Sequence,
    /// A RUN_STARTED of this run was taken in.
    started: bool,
    summary: Summary,
}

impl<'g> RunStream<'g> {
    pub fn new(gateway: &'g Gateway, bound: Bound) -> Self {
        let summary = Summary {
            run_id: bound.run_id.clone(),
            thread_id: bound.thread_id.clone(),
            accepted: 0,
            pending_resolution: 0,
            duplicates: 0,
            failed: 0,
            errors: Vec::new(),
            violations: 0,
            ended: Ending::End,
            closed: None,
        };
        Self {
            gateway,
            bound,
            sequence: Sequence::default(),
            started: false,
            summary,
        }
    }

    /// Takes in one event's JSON text, which started on `line`.
    pub async fn item(&mut self, raw: &str, line: usize) {
        let max = self.gateway.config.ingest.max_event_bytes;
        let result = match event::decode(raw, max).and_then(|value| self.bound_event(value)) {
            Ok(event) => self.ordered(event).await,
            Err(refusal) => Err(refusal),
        };
        let result = result.unwrap_or_else(|refusal| {
            count_refusal(self.gateway, &refusal);
            ItemResult::Error(refusal)
        });
        self.tally(result, line);
    }

    /// An item refused before it could be read (a line over the limit, not UTF-8): counted.
    fn refuse(&mut self, refusal: Refusal, line: usize) {
        count_refusal(self.gateway, &refusal);
        self.tally(ItemResult::Error(refusal), line);
    }

    fn tally(&mut self, result: ItemResult, line: usize) {
        match &result {
            ItemResult::Accepted { .. } => self.summary.accepted += 1,
            ItemResult::PendingResolution => self.summary.pending_resolution += 1,
            ItemResult::Duplicate => self.summary.duplicates += 1,
            _ => {
                self.summary.failed += 1;
                if self.summary.errors.len() < MAX_ERRORS {
                    self.summary.errors.push(LineError { line, item: result });
                }
            }
        }
    }

    /// The event with its run (from the path) and its thread (once known) filled in, validated
    /// like any producer's event. Only AG-UI events are taken: the stream is an AG-UI stream.
    fn bound_event(&self, value: Value) -> Result<Event, Refusal> {
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
                fields.insert("run_id".into(), self.bound.run_id.clone().into());
            }
            Some(Value::String(run_id)) if *run_id == self.bound.run_id => {}
            Some(_) => {
                return Err(invalid(
                    Some("run_id"),
                    "differs from the run this stream is bound to",
                ));
            }
        }
        if let Some(thread_id) = &self.bound.thread_id
            && !fields.contains_key("thread_id")
        {
            fields.insert("thread_id".into(), thread_id.clone().into());
        }
        let mut event = event::from_value(Value::Object(fields))?;
        event.producer = self.bound.producer.clone();
        Ok(event)
    }

    /// Checks the event against the run's ordering rules, then takes it in; the run's place
    /// moves on only if it was published or held (a duplicate was followed the first time). A
    /// violation is counted in
    /// `agentwire_lifecycle_violations_total` once: by the watchdog when the event is published
    /// (it judges AG-UI runs by the same rules), here when `agui.strict` refuses it.
    async fn ordered(&mut self, event: Event) -> Result<ItemResult, Refusal> {
        let mut next = self.sequence.clone();
        // `bound_event` took AG-UI events only, each kept with its fields under `payload.agui`.
        if let Some(fields) = event.payload.agui()
            && let Err(violation) = next.apply_fields(fields)
        {
            self.summary.violations += 1;
            if self.gateway.config.agui.strict {
                metrics::count(&self.gateway.metrics.lifecycle_violations, violation);
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
        let started = event.kind == event::EventType::AgentStarted;
        let thread_id = event.thread_id.clone();
        let result = accept(self.gateway, event, None).await;
        if matches!(
            result,
            ItemResult::Accepted { .. } | ItemResult::PendingResolution
        ) {
            self.sequence = next;
            if started {
                self.started = true;
                if self.bound.thread_id.is_none() {
                    self.summary.thread_id.clone_from(&thread_id);
                    self.bound.thread_id = thread_id;
                }
            }
        }
        Ok(result)
    }

    /// Ends the stream: a run still open is closed for its viewers with the events of
    /// [`Sequence::close`], published like the producer's own; a run the gateway opened and the
    /// agent never started is started first, so its viewers see it begin and fail.
    pub async fn end(mut self, ending: Ending) -> Summary {
        self.summary.ended = ending;
        let reason = CloseReason::of(ending);
        let message = reason.message(self.gateway);
        let mut events = Vec::new();
        if self.bound.opened_by_gateway && !self.started && !self.sequence.is_running() {
            if let Some(thread_id) = &self.bound.thread_id {
                let start = serde_json::json!({
                    "type": "RUN_STARTED", "threadId": thread_id, "runId": self.bound.run_id
                });
                let mut opened = Sequence::default();
                if let Ok(event) = self.bound_event(start.clone())
                    && let Some(fields) = event.payload.agui()
                    && opened.apply_fields(fields).is_ok()
                {
                    events.push(start);
                    events.extend(opened.close(reason.as_str(), &message));
                }
            }
        } else {
            events = self.sequence.close(reason.as_str(), &message);
        }
        if events.is_empty() {
            return self.summary;
        }
        metrics::count(&self.gateway.metrics.agui_runs_closed, reason);
        tracing::info!(
            run_id = %self.bound.run_id,
            thread_id = self.bound.thread_id.as_deref(),
            reason = reason.as_str(),
            "Closed an AG-UI run whose stream ended while it was open."
        );
        for value in events {
            let result = match self.bound_event(value) {
                Ok(event) => accept(self.gateway, event, None).await,
                Err(refusal) => ItemResult::Error(refusal),
            };
            if !result.is_ok() {
                tracing::warn!(run_id = %self.bound.run_id, ?result, "A closing event of an AG-UI run was not taken in.");
            }
        }
        self.summary.closed = Some(reason.as_str());
        self.summary
    }
}

fn invalid(field: Option<&str>, reason: &str) -> Refusal {
    Refusal {
        code: RefusalCode::InvalidField,
        field: field.map(str::to_string),
        reason: reason.into(),
    }
}

/// Reads `body` to its end (or its silence, or shutdown) in `format`, taking in each event as it
/// arrives, and ends the stream. One place in `agui.max_streams` is the caller's to hold.
pub async fn read<E: Display>(
    gateway: &Gateway,
    mut stream: RunStream<'_>,
    format: Format,
    mut body: impl Stream<Item = Result<Bytes, E>> + Unpin,
) -> Summary {
    gateway.metrics.agui_streams.inc();
    let _open = Open(&gateway.metrics.agui_streams);
    let max = gateway.config.ingest.max_event_bytes;
    let idle = gateway.config.agui.stream_idle_timeout;
    let mut lines = Lines::new(match format {
        Format::Sse => max + SSE_LINE_SLACK,
        Format::Ndjson => max,
    });
    let mut sse = SseEvent::default();
    let mut ready = Vec::new();
    let ending = loop {
        let next = tokio::select! {
            biased;
            () = gateway.shutdown.sessions.cancelled() => break Ending::Shutdown,
            next = tokio::time::timeout(idle, body.next()) => next,
        };
        match next {
            Err(_) => break Ending::IdleTimeout,
            Ok(None) => {
                lines.finish(&mut ready);
                break Ending::End;
            }
            Ok(Some(Err(error))) => {
                tracing::debug!(run_id = %stream.bound.run_id, %error, "An AG-UI stream broke.");
                break Ending::Broken;
            }
            Ok(Some(Ok(chunk))) => lines.push(&chunk, &mut ready),
        }
        for line in ready.drain(..) {
            take(&mut stream, format, &mut sse, line, max).await;
        }
    };
    for line in ready.drain(..) {
        take(&mut stream, format, &mut sse, line, max).await;
    }
    // An SSE event the body ended in the middle of (no blank line after it) is still taken.
    if ending == Ending::End {
        sse.dispatch(&mut stream, max).await;
    }
    stream.end(ending).await
}

/// Decrements the open-streams gauge when dropped, so a stream cut at any await leaves it right.
struct Open<'a>(&'a prometheus::IntGauge);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One line of the body, numbered from 1.
enum Line {
    Text(String, usize),
    /// Longer than the limit: skipped as it arrived.
    TooLong(usize, usize),
    NotUtf8(usize),
}

/// Splits chunks into lines (`\n`, a `\r` before it dropped), holding at most `max` bytes of one.
struct Lines {
    max: usize,
    held: Vec<u8>,
    /// Bytes of the current line when it is longer than `max` (nothing of it is held).
    skipped: usize,
    number: usize,
}

impl Lines {
    fn new(max: usize) -> Self {
        Self {
            max,
            held: Vec::new(),
            skipped: 0,
            number: 0,
        }
    }

    fn push(&mut self, mut chunk: &[u8], out: &mut Vec<Line>) {
        while !chunk.is_empty() {
            let (part, rest, ended) = match chunk.iter().position(|b| *b == b'\n') {
                Some(at) => (&chunk[..at], &chunk[at + 1..], true),
                None => (chunk, &[][..], false),
            };
            if self.skipped > 0 || self.held.len() + part.len() > self.max {
                self.skipped += self.held.len() + part.len();
                self.held = Vec::new();
            } else {
                self.held.extend_from_slice(part);
            }
            if ended {
                self.line(out);
            }
            chunk = rest;
        }
    }

    fn finish(&mut self, out: &mut Vec<Line>) {
        if self.skipped > 0 || !self.held.is_empty() {
            self.line(out);
        }
    }

    fn line(&mut self, out: &mut Vec<Line>) {
        self.number += 1;
        let held = std::mem::take(&mut self.held);
        let line = if self.skipped > 0 {
            Line::TooLong(self.skipped, self.number)
        } else {
            let mut held = held;
            if held.last() == Some(&b'\r') {
                held.pop();
            }
            match String::from_utf8(held) {
                Ok(text) => Line::Text(text, self.number),
                Err(_) => Line::NotUtf8(self.number),
            }
        };
        self.skipped = 0;
        out.push(line);
    }
}

/// The SSE event being read: its `data:` lines joined.
#[derive(Default)]
struct SseEvent {
    data: String,
    /// The line its first `data:` was on.
    first: usize,
    /// Its data went over the limit (nothing more of it is held).
    too_large: Option<usize>,
}

impl SseEvent {
    fn data(&mut self, value: &str, line: usize, max: usize) {
        if self.data.is_empty() && self.too_large.is_none() {
            self.first = line;
        }
        let size = self.data.len() + value.len() + 1;
        if let Some(bytes) = &mut self.too_large {
            *bytes += value.len() + 1;
        } else if size > max {
            self.too_large = Some(size);
            self.data = String::new();
        } else {
            if !self.data.is_empty() {
                self.data.push('\n');
            }
            self.data.push_str(value);
        }
    }

    fn overflow(&mut self, bytes: usize, line: usize) {
        if self.data.is_empty() && self.too_large.is_none() {
            self.first = line;
        }
        let total = self.too_large.unwrap_or(self.data.len()) + bytes;
        self.too_large = Some(total);
        self.data = String::new();
    }

    async fn dispatch(&mut self, stream: &mut RunStream<'_>, max: usize) {
        let event = std::mem::take(self);
        match event.too_large {
            Some(bytes) => stream.refuse(event::too_large(bytes, max), event.first),
            None if event.data.is_empty() => {}
            None => stream.item(&event.data, event.first).await,
        }
    }
}

async fn take(
    stream: &mut RunStream<'_>,
    format: Format,
    sse: &mut SseEvent,
    line: Line,
    max: usize,
) {
    match (format, line) {
        (Format::Ndjson, Line::Text(text, number)) => {
            let text = text.trim();
            if !text.is_empty() {
                stream.item(text, number).await;
            }
        }
        (Format::Ndjson, Line::TooLong(bytes, number)) => {
            stream.refuse(event::too_large(bytes, max), number);
        }
        (_, Line::NotUtf8(number)) => stream.refuse(
            Refusal {
                code: RefusalCode::InvalidJson,
                field: None,
                reason: "the line is not UTF-8".into(),
            },
            number,
        ),
        // A line over the limit belongs to the event being read, which it makes too large.
        (Format::Sse, Line::TooLong(bytes, number)) => sse.overflow(bytes, number),
        (Format::Sse, Line::Text(text, number)) => {
            if text.is_empty() {
                return sse.dispatch(stream, max).await;
            }
            if text.starts_with(':') {
                return;
            }
            let (field, value) = text.split_once(':').unwrap_or((text.as_str(), ""));
            if field == "data" {
                sse.data(value.strip_prefix(' ').unwrap_or(value), number, max);
            }
        }
    }
}

/// Reads a stream in a task of its own, owned by `Shutdown::agui_streams` (drained at shutdown):
/// the run is closed for its viewers even when the request carrying it is dropped mid-way. `held`
/// (its place in `agui.max_streams`, its share of the body budget) is kept until the stream ends.
/// `None` only if the task panicked.
pub async fn detached<S, E, H>(
    gateway: Arc<Gateway>,
    bound: Bound,
    format: Format,
    body: S,
    held: H,
) -> Option<Summary>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin + Send + 'static,
    E: Display + Send + 'static,
    H: Send + 'static,
{
    let (answer, summary) = oneshot::channel();
    let tracker = gateway.shutdown.agui_streams.clone();
    tracker.spawn(async move {
        let _held = held;
        let stream = RunStream::new(&gateway, bound);
        // The producer may be gone: its summary then has nobody to go to.
        let _ = answer.send(read(&gateway, stream, format, body).await);
    });
    summary.await.ok()
}
