//! Streams bound to one run: a producer's `POST /v1/runs/{run_id}/events` (native events) or
//! `POST /v1/runs/{run_id}/agui` body (AG-UI events), SSE or NDJSON, or an AG-UI agent's answer
//! read by the proxy ([`super::agui_proxy`]). Each event is taken in as it arrives, through the
//! same per-item path as `POST /v1/events` ([`super::accept`]), after its run (and thread, once
//! known) is filled in and its protocol's [`Rules`] let it in. When the stream ends while the run
//! is open (end of body, silence for `ingest.stream_idle_timeout`, a broken connection, an agent
//! that cannot be reached, shutdown), the events that close it ([`Rules::close`]) are published
//! the same way, so that no viewer waits for a run nobody is producing any more.
//!
//! A stream is bounded in memory: one line (one event) at most `ingest.max_event_bytes` is held;
//! a longer one is skipped as it arrives and refused as `too_large`, and the stream goes on.

pub mod agui;
mod lines;
pub mod native;

use std::fmt::Display;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{ItemResult, accept, accept_generated, count_refusal};
use crate::Gateway;
use crate::metrics::{self, Label};
use crate::protocol::event::{Event, EventType, Refusal};
use lines::{Lines, SseEvent};

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
    /// otherwise the run's start (`agent_started`, RUN_STARTED) names it.
    pub thread_id: Option<String>,
    /// The producer key that posted the stream (scopes its `event_id`s).
    pub producer: Option<Arc<str>>,
    /// The gateway started this run itself (the AG-UI proxy, on a browser's request): if the
    /// agent fails before its RUN_STARTED, the gateway starts the run for its viewers and closes it.
    pub opened_by_gateway: bool,
}

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// The body ended.
    End,
    /// Nothing arrived for `ingest.stream_idle_timeout`.
    IdleTimeout,
    /// The connection broke (the producer or the agent went away mid-body).
    Broken,
    /// The proxy could not reach the agent, or it answered with an error status.
    Unreachable,
    /// The gateway is shutting down.
    Shutdown,
}

/// Why the gateway closed an open run: the `code` of its RUN_ERROR (AG-UI) or the `reason` of
/// its `agent_error` (native), counted in `agentwire_runs_closed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The stream ended (or broke) with its run open.
    AgentStreamEnded,
    /// The stream was silent for `ingest.stream_idle_timeout`.
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

    /// What the closing event says to the run's viewers.
    fn message(self, gateway: &Gateway) -> String {
        match self {
            Self::AgentStreamEnded => {
                "the agent's stream ended before the run finished; the gateway ended the run".into()
            }
            Self::AgentStalled => format!(
                "the agent sent nothing for {} s; the gateway ended the run",
                gateway.config.ingest.stream_idle_timeout.as_secs()
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

/// What a protocol decides about a stream bound to one run: which items are its events, which
/// may be taken where the run stands, and what closes the run when the stream ends with it open.
pub trait Rules: Send {
    /// The protocol's name in logs.
    const PROTOCOL: &'static str;

    /// One item's JSON text as a valid event of the bound run (its run, and its thread when
    /// `bound` knows it, filled in), or why not.
    fn event(&self, gateway: &Gateway, bound: &Bound, raw: &str) -> Result<Event, Refusal>;

    /// Whether `event` may be taken in where the run stands; where it would move the run is kept
    /// until [`Rules::settle`].
    fn check(&mut self, gateway: &Gateway, event: &Event) -> Result<(), Refusal>;

    /// The last checked event was taken in (published or held), or not.
    fn settle(&mut self, taken: bool);

    /// The events that close the run for its viewers (none when it is not open), each already an
    /// event of the bound run. `started`: an `agent_started` of the run was taken from the stream.
    fn close(
        &self,
        gateway: &Gateway,
        bound: &Bound,
        started: bool,
        reason: CloseReason,
        message: &str,
    ) -> Vec<Result<Event, Refusal>>;

    /// Events that broke the protocol's ordering rules, where it has rules a stream follows.
    fn violations(&self) -> Option<usize>;
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
    /// AG-UI streams: events that broke AG-UI's ordering rules (refused as `out_of_order` when
    /// `agui.strict`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub violations: Option<usize>,
    pub ended: Ending,
    /// The reason the gateway closed the run with, if it was still open.
    pub closed: Option<&'static str>,
}

/// One run's stream as it is read: its protocol's rules and the tally.
pub struct RunStream<'g, R> {
    gateway: &'g Gateway,
    bound: Bound,
    rules: R,
    /// An `agent_started` (RUN_STARTED) of this run was taken in.
    started: bool,
    summary: Summary,
}

impl<'g, R: Rules> RunStream<'g, R> {
    pub fn new(gateway: &'g Gateway, bound: Bound, rules: R) -> Self {
        let summary = Summary {
            run_id: bound.run_id.clone(),
            thread_id: bound.thread_id.clone(),
            accepted: 0,
            pending_resolution: 0,
            duplicates: 0,
            failed: 0,
            errors: Vec::new(),
            violations: None,
            ended: Ending::End,
            closed: None,
        };
        Self {
            gateway,
            bound,
            rules,
            started: false,
            summary,
        }
    }

    /// Takes in one event's JSON text, which started on `line`.
    async fn item(&mut self, raw: &str, line: usize) {
        let result = match self.rules.event(self.gateway, &self.bound, raw) {
            Ok(mut event) => {
                event.producer.clone_from(&self.bound.producer);
                self.take(event).await
            }
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

    /// Checks the event against the run's rules, then takes it in; the run moves on only if it
    /// was published or held (a duplicate was followed the first time).
    async fn take(&mut self, event: Event) -> Result<ItemResult, Refusal> {
        self.rules.check(self.gateway, &event)?;
        let started = event.kind == EventType::AgentStarted;
        // Kept only from the run's start, which is what names its thread to the stream.
        let thread_id = if started {
            event.thread_id.clone()
        } else {
            None
        };
        let result = accept(self.gateway, event).await;
        let taken = matches!(
            result,
            ItemResult::Accepted { .. } | ItemResult::PendingResolution
        );
        self.rules.settle(taken);
        if taken && started {
            self.started = true;
            if self.bound.thread_id.is_none() {
                self.summary.thread_id.clone_from(&thread_id);
                self.bound.thread_id = thread_id;
            }
        }
        Ok(result)
    }

    /// Ends the stream: a run still open is closed for its viewers with the events of
    /// [`Rules::close`], published like the producer's own.
    pub async fn end(mut self, ending: Ending) -> Summary {
        self.summary.ended = ending;
        self.summary.violations = self.rules.violations();
        let reason = CloseReason::of(ending);
        let message = reason.message(self.gateway);
        let events = self
            .rules
            .close(self.gateway, &self.bound, self.started, reason, &message);
        if events.is_empty() {
            return self.summary;
        }
        metrics::count(&self.gateway.metrics.runs_closed, reason);
        tracing::info!(
            run_id = %self.bound.run_id,
            thread_id = self.bound.thread_id.as_deref(),
            protocol = R::PROTOCOL,
            reason = reason.as_str(),
            "Closed a run whose stream ended while it was open."
        );
        for event in events {
            let result = match event {
                Ok(mut event) => {
                    event.producer.clone_from(&self.bound.producer);
                    accept_generated(self.gateway, event).await
                }
                Err(refusal) => ItemResult::Error(refusal),
            };
            if !result.is_ok() {
                tracing::warn!(run_id = %self.bound.run_id, ?result, "A closing event of a run was not taken in.");
            }
        }
        self.summary.closed = Some(reason.as_str());
        self.summary
    }
}

/// Reads `body` to its end (or its silence, or shutdown) in `format`, taking in each event as it
/// arrives, and ends the stream. One place in `ingest.max_streams` is the caller's to hold.
pub async fn read<R: Rules, E: Display>(
    gateway: &Gateway,
    mut stream: RunStream<'_, R>,
    format: Format,
    mut body: impl Stream<Item = Result<Bytes, E>> + Unpin,
) -> Summary {
    gateway.metrics.run_streams.inc();
    let _open = Open(&gateway.metrics.run_streams);
    let max = gateway.config.ingest.max_event_bytes;
    let idle = gateway.config.ingest.stream_idle_timeout;
    let mut lines = Lines::new(match format {
        Format::Sse => max + SSE_LINE_SLACK,
        Format::Ndjson => max,
    });
    let mut sse = SseEvent::default();
    // Made once for the whole stream: a token stream sends a chunk every few milliseconds, and
    // neither the cancellation's waiter nor the timer needs to be set again for each. The timer
    // is moved on only when it fires early (something arrived since it was set).
    let cancelled = gateway.shutdown.close.raised();
    tokio::pin!(cancelled);
    let mut last = Instant::now();
    let silence = tokio::time::sleep_until(last + idle);
    tokio::pin!(silence);
    let ending = loop {
        let next = tokio::select! {
            biased;
            () = &mut cancelled => break Ending::Shutdown,
            next = body.next() => next,
            () = &mut silence => {
                if last.elapsed() >= idle {
                    break Ending::IdleTimeout;
                }
                silence.as_mut().reset(last + idle);
                continue;
            }
        };
        last = Instant::now();
        match next {
            None => break Ending::End,
            Some(Err(error)) => {
                tracing::debug!(run_id = %stream.bound.run_id, %error, "A stream bound to a run broke.");
                break Ending::Broken;
            }
            Some(Ok(chunk)) => {
                let mut rest = &chunk[..];
                while let Some(line) = lines.next(&mut rest) {
                    lines::take(&mut stream, format, &mut sse, line, max).await;
                }
            }
        }
    };
    if ending == Ending::End
        && let Some(line) = lines.finish()
    {
        lines::take(&mut stream, format, &mut sse, line, max).await;
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

/// Reads a stream in a task of its own, owned by `Shutdown::run_streams` (drained at shutdown):
/// the run is closed for its viewers even when the request carrying it is dropped mid-way. `held`
/// (its place in `ingest.max_streams`, its share of the body budget) is kept until the stream
/// ends. `None` only if the task panicked.
pub async fn detached<R, S, E, H>(
    gateway: Arc<Gateway>,
    bound: Bound,
    rules: R,
    format: Format,
    body: S,
    held: H,
) -> Option<Summary>
where
    R: Rules + 'static,
    S: Stream<Item = Result<Bytes, E>> + Unpin + Send + 'static,
    E: Display + Send + 'static,
    H: Send + 'static,
{
    let (answer, summary) = oneshot::channel();
    let tracker = gateway.shutdown.run_streams.clone();
    tracker.spawn(async move {
        let _held = held;
        let stream = RunStream::new(&gateway, bound, rules);
        // The producer may be gone: its summary then has nobody to go to.
        let _ = answer.send(read(&gateway, stream, format, body).await);
    });
    summary.await.ok()
}
