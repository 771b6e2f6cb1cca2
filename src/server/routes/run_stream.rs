//! Streams bound to one run, on the internal door: `POST /v1/runs/{run_id}/events` (native
//! events) and `POST /v1/runs/{run_id}/agui` (AG-UI events), SSE or NDJSON, read by a detached
//! task ([`crate::ingest::run_stream`]) and answered with a summary when the body ends. The
//! refusals before anything is read, shared with the AG-UI proxy's, are counted in
//! `agentwire_run_streams_refused_total{reason}`.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::body::BodyRefusal;
use super::{
    Body, broker_unavailable, error, json_response, media_type_is, percent_decode,
    unsupported_media_type,
};
use crate::Gateway;
use crate::ingest::run_stream::agui::Agui;
use crate::ingest::run_stream::native::Native;
use crate::ingest::run_stream::{self, Bound, Format, Rules};
use crate::metrics::{self, Label};
use crate::protocol::channel::check_id;

/// Why a stream bound to one run or an AG-UI agent run was refused, counted in `agentwire_run_streams_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRefusal {
    /// `ingest.max_streams` streams are being read (503).
    TooManyStreams,
    /// The replica is shutting down (503).
    Draining,
    /// A body of the wrong `Content-Type` (415).
    MediaType,
    /// A run id, thread id or agent name that is not one (400).
    InvalidTarget,
    /// No agent of that name is configured (404).
    UnknownAgent,
    /// A `RunAgentInput` that is not one (400, naming the field).
    InvalidInput,
    /// A body that could not be read within its budgets (413, 408, 503, 400).
    Body,
}

impl Label for StreamRefusal {
    const ALL: &'static [Self] = &[
        Self::TooManyStreams,
        Self::Draining,
        Self::MediaType,
        Self::InvalidTarget,
        Self::UnknownAgent,
        Self::InvalidInput,
        Self::Body,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::TooManyStreams => "too_many_streams",
            Self::Draining => "draining",
            Self::MediaType => "media_type",
            Self::InvalidTarget => "invalid_target",
            Self::UnknownAgent => "unknown_agent",
            Self::InvalidInput => "invalid_input",
            Self::Body => "body",
        }
    }
}

pub(super) fn refused(
    gateway: &Gateway,
    reason: StreamRefusal,
    response: Response<Body>,
) -> Response<Body> {
    metrics::count(&gateway.metrics.run_streams_refused, reason);
    tracing::debug!(reason = reason.as_str(), "Refused an AG-UI request.");
    response
}

/// The protocol a stream speaks, by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// `/v1/runs/{run_id}/events`.
    Native,
    /// `/v1/runs/{run_id}/agui`.
    Agui,
}

/// The raw run id and protocol of `/v1/runs/{run_id}/events` or `/v1/runs/{run_id}/agui`.
pub(super) fn run_in(path: &str) -> Option<(&str, Protocol)> {
    let rest = path.strip_prefix("/v1/runs/")?;
    let (run, protocol) = if let Some(run) = rest.strip_suffix("/events") {
        (run, Protocol::Native)
    } else {
        (rest.strip_suffix("/agui")?, Protocol::Agui)
    };
    (!run.contains('/')).then_some((run, protocol))
}

/// The stream's place in `ingest.max_streams`; a refusal is answered by [`busy`].
pub(super) fn place(gateway: &Gateway) -> Result<tokio::sync::OwnedSemaphorePermit, StreamRefusal> {
    if gateway.shutdown.is_draining() {
        return Err(StreamRefusal::Draining);
    }
    gateway
        .limits
        .run_stream()
        .ok_or(StreamRefusal::TooManyStreams)
}

/// 503 (with `Retry-After` when retrying here may work), counted.
pub(super) fn busy(gateway: &Gateway, reason: StreamRefusal) -> Response<Body> {
    let answer = match reason {
        StreamRefusal::Draining => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this replica is shutting down; use another",
            None,
        ),
        _ => {
            let mut answer = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                "this replica reads ingest.max_streams streams; retry later or on another replica",
                None,
            );
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            answer
        }
    };
    refused(gateway, reason, answer)
}

fn invalid_target(gateway: &Gateway, field: &str, reason: &str) -> Response<Body> {
    let answer = error(
        StatusCode::BAD_REQUEST,
        &format!("invalid_{field}"),
        &format!("{field} {reason}"),
        Some(field),
    );
    refused(gateway, StreamRefusal::InvalidTarget, answer)
}

/// `POST /v1/runs/{run_id}/events|agui`: reads the body as it arrives, each event taken in at
/// once; answered with the stream's summary when the body ends (or falls silent, or the gateway
/// stops).
pub(super) async fn stream(
    gateway: &Arc<Gateway>,
    (raw_run, protocol): (&str, Protocol),
    request: Request<Incoming>,
    producer: Option<&Arc<str>>,
) -> Response<Body> {
    if !gateway.broker.is_up() {
        return broker_unavailable(gateway, "Redis is unavailable; nothing was accepted");
    }
    let format = if media_type_is(&request, "text/event-stream") {
        Format::Sse
    } else if media_type_is(&request, "application/x-ndjson") {
        Format::Ndjson
    } else {
        let answer = unsupported_media_type("text/event-stream or application/x-ndjson");
        return refused(gateway, StreamRefusal::MediaType, answer);
    };
    let run_id = match percent_decode(raw_run) {
        Some(run_id) => run_id,
        None => return invalid_target(gateway, "run_id", "is not UTF-8 once decoded"),
    };
    if let Err(reason) = check_id(&run_id) {
        return invalid_target(gateway, "run_id", &reason.to_string());
    }
    let mut thread_id = None;
    for (name, value) in url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
    {
        if name != "thread_id" {
            continue;
        }
        if thread_id.is_some() {
            return invalid_target(gateway, "thread_id", "is given more than once");
        }
        if let Err(reason) = check_id(&value) {
            return invalid_target(gateway, "thread_id", &reason.to_string());
        }
        thread_id = Some(value.into_owned());
    }
    let place = match place(gateway) {
        Ok(place) => place,
        Err(reason) => return busy(gateway, reason),
    };
    // What one stream holds of `ingest.max_inflight_bytes`: one line, however long it streams.
    let mut budget = None;
    let line = gateway.config.ingest.max_event_bytes + run_stream::SSE_LINE_SLACK;
    if !gateway.limits.hold_body_bytes(&mut budget, line) {
        let mut answer = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ingest_busy",
            "the gateway holds ingest.max_inflight_bytes of request bodies; retry",
            None,
        );
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        metrics::count(&gateway.metrics.events_rejected, BodyRefusal::IngestBusy);
        return answer;
    }
    let bound = Bound {
        run_id,
        thread_id,
        producer: producer.cloned(),
        opened_by_gateway: false,
    };
    let body = request.into_body().into_data_stream();
    let held = (place, budget);
    match protocol {
        Protocol::Native => read(gateway, bound, Native::default(), format, body, held).await,
        Protocol::Agui => read(gateway, bound, Agui::default(), format, body, held).await,
    }
}

async fn read<R: Rules + 'static>(
    gateway: &Arc<Gateway>,
    bound: Bound,
    rules: R,
    format: Format,
    body: http_body_util::BodyDataStream<Incoming>,
    held: impl Send + 'static,
) -> Response<Body> {
    match run_stream::detached(Arc::clone(gateway), bound, rules, format, body, held).await {
        Some(summary) => json_response(StatusCode::OK, &summary),
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the stream's task ended without a summary",
            None,
        ),
    }
}
