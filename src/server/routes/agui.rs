//! AG-UI's two doors. Internal: `POST /v1/runs/{run_id}/agui`, a producer's AG-UI stream bound to
//! one run (SSE or NDJSON), answered with a summary when its body ends. Public:
//! `POST /agui/{agent}`, a browser's `RunAgentInput` (what `HttpAgent` sends), admitted like `/ws`
//! (origin, protected mode, draining), authorised like a thread subscription, and forwarded to the
//! configured agent by a detached run ([`crate::ingest::agui_proxy`]). Every refusal is JSON,
//! counted, and neither forwards nor creates anything.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::body::{self, BodyRefusal};
use super::upgrade::{MAX_BEARER_BYTES, admit};
use super::{Body, broker_unavailable, error, json_response, media_type, percent_decode};
use crate::Gateway;
use crate::auth::{Refusal, ThreadAccess};
use crate::ingest::agui_proxy::{self, ProxiedRun};
use crate::ingest::agui_stream::{self, Bound, Format};
use crate::metrics::{self, Label};
use crate::protocol::agui::RunAgentInput;
use crate::protocol::channel::check_id;

/// Why an AG-UI stream or agent run was refused, counted in `agentwire_agui_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AguiRefusal {
    /// `agui.max_streams` streams are being read (503).
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

impl Label for AguiRefusal {
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

fn refused(gateway: &Gateway, reason: AguiRefusal, response: Response<Body>) -> Response<Body> {
    metrics::count(&gateway.metrics.agui_refused, reason);
    tracing::debug!(reason = reason.as_str(), "Refused an AG-UI request.");
    response
}

/// The raw run id of `/v1/runs/{run_id}/agui`.
pub(super) fn run_in(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/runs/")?
        .strip_suffix("/agui")
        .filter(|run| !run.contains('/'))
}

/// The raw agent name of `/agui/{agent}`.
pub(super) fn agent_in(path: &str) -> Option<&str> {
    path.strip_prefix("/agui/")
        .filter(|agent| !agent.contains('/'))
}

/// The stream's place in `agui.max_streams`; a refusal is answered by [`busy`].
fn place(gateway: &Gateway) -> Result<tokio::sync::OwnedSemaphorePermit, AguiRefusal> {
    if gateway.shutdown.is_draining() {
        return Err(AguiRefusal::Draining);
    }
    gateway
        .limits
        .agui_stream()
        .ok_or(AguiRefusal::TooManyStreams)
}

/// 503 (with `Retry-After` when retrying here may work), counted.
fn busy(gateway: &Gateway, reason: AguiRefusal) -> Response<Body> {
    let answer = match reason {
        AguiRefusal::Draining => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this replica is shutting down; use another",
            None,
        ),
        _ => {
            let mut answer = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                "this replica reads agui.max_streams AG-UI streams; retry later or on another replica",
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
    refused(gateway, AguiRefusal::InvalidTarget, answer)
}

/// `POST /v1/runs/{run_id}/agui`: reads the body as it arrives, each event taken in at once;
/// answered with the stream's summary when the body ends (or falls silent, or the gateway stops).
pub(super) async fn stream(
    gateway: &Arc<Gateway>,
    raw_run: &str,
    request: Request<Incoming>,
    producer: Option<&str>,
) -> Response<Body> {
    if !gateway.broker.is_up() {
        return broker_unavailable(gateway, "Redis is unavailable; nothing was accepted");
    }
    let format = match media_type(&request).as_deref() {
        Some("text/event-stream") => Format::Sse,
        Some("application/x-ndjson") => Format::Ndjson,
        _ => {
            let answer = error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Content-Type must be text/event-stream or application/x-ndjson",
                Some("content-type"),
            );
            return refused(gateway, AguiRefusal::MediaType, answer);
        }
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
    let line = gateway.config.ingest.max_event_bytes + 16;
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
        producer: producer.map(str::to_string),
        opened_by_gateway: false,
    };
    let body = request.into_body().into_data_stream();
    match agui_stream::detached(Arc::clone(gateway), bound, format, body, (place, budget)).await {
        Some(summary) => json_response(StatusCode::OK, &summary),
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the stream's task ended without a summary",
            None,
        ),
    }
}

/// `POST /agui/{agent}` (and its CORS preflight) on the public door.
pub(super) async fn proxy(
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    raw_agent: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    if let Err(refusal) = admit(&gateway, peer, &request) {
        metrics::count(&gateway.metrics.upgrades_refused, refusal);
        tracing::debug!(%peer, reason = refusal.as_str(), "Refused an AG-UI run.");
        return refusal.response();
    }
    // `admit` let the origin in: a page of it may read the answer, whatever it is.
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut response = match *request.method() {
        Method::OPTIONS => preflight(origin.is_some()),
        _ => run(&gateway, raw_agent, request).await,
    };
    if let Some(origin) = origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// The CORS preflight of `HttpAgent`: a JSON POST with `Authorization`.
fn preflight(cors: bool) -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
    if cors {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type, Accept"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    response
}

async fn run(
    gateway: &Arc<Gateway>,
    raw_agent: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    let agent = match percent_decode(raw_agent) {
        Some(agent) if gateway.config.agui.agents.contains_key(&agent) => agent,
        _ => {
            let answer = error(
                StatusCode::NOT_FOUND,
                "unknown_agent",
                "no agent of this name is configured (agui.agents)",
                Some("agent"),
            );
            return refused(gateway, AguiRefusal::UnknownAgent, answer);
        }
    };
    if media_type(&request).as_deref() != Some("application/json") {
        let answer = error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
            Some("content-type"),
        );
        return refused(gateway, AguiRefusal::MediaType, answer);
    }
    let bearer = super::bearer(&request).map(str::to_string);
    if bearer
        .as_ref()
        .is_some_and(|token| token.len() > MAX_BEARER_BYTES)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_token",
            "the token is larger than 8192 bytes",
            Some("authorization"),
        );
    }
    let limit = gateway.config.agui.max_input_bytes;
    let held = match body::read(gateway, request, limit, "agui.max_input_bytes").await {
        Ok(held) => held,
        Err(refusal) => return refused(gateway, AguiRefusal::Body, refusal.response),
    };
    let input = match RunAgentInput::check(&held.bytes) {
        Ok(input) => input,
        Err(refusal) => {
            let mut body = json!({"error": refusal.code.as_str(), "message": refusal.reason});
            if let Some(field) = &refusal.field {
                body["field"] = field.as_str().into();
            }
            let answer = json_response(StatusCode::BAD_REQUEST, &body);
            return refused(gateway, AguiRefusal::InvalidInput, answer);
        }
    };
    if let Err(answer) = authorise(gateway, bearer.as_deref(), &input.thread_id).await {
        return answer;
    }
    let place = match place(gateway) {
        Ok(place) => place,
        Err(reason) => return busy(gateway, reason),
    };
    let channel = format!("thread:{}", input.thread_id);
    let run = ProxiedRun {
        agent,
        thread_id: input.thread_id.clone(),
        run_id: input.run_id.clone(),
        input: held.bytes.clone(),
    };
    agui_proxy::start(gateway, run, place);
    json_response(
        StatusCode::ACCEPTED,
        &json!({"thread_id": input.thread_id, "run_id": input.run_id, "channel": channel}),
    )
}

/// Who may start a run on the thread, with browser authentication: `Authorization: Bearer` with a
/// connection token whose `threads` allow it (or a subscription token for it, or the subscribe
/// webhook's yes), as for a `/ws` subscription. Without browser authentication anyone admitted
/// may, as on `/ws`.
async fn authorise(
    gateway: &Gateway,
    bearer: Option<&str>,
    thread_id: &str,
) -> Result<(), Response<Body>> {
    let Some(verifier) = &gateway.verifier else {
        return Ok(());
    };
    let Some(token) = bearer else {
        return Err(unauthorised(gateway, Refusal::Missing));
    };
    let identity = verifier
        .connection(token, None)
        .await
        .map_err(|refusal| unauthorised(gateway, refusal))?;
    let access = ThreadAccess {
        verifier,
        webhook: gateway.subscribe_webhook.as_ref(),
        metrics: &gateway.metrics,
    };
    access
        .may_read(Some(&identity), &identity.user_id, thread_id, Some(token))
        .await
        .map_err(|refusal| unauthorised(gateway, refusal))
}

/// Counted like `/ws`'s refusals; 403 when the token is good but does not allow the thread, 401
/// (with `WWW-Authenticate`) otherwise.
fn unauthorised(gateway: &Gateway, refusal: Refusal) -> Response<Body> {
    metrics::count(&gateway.metrics.auth_refused, refusal);
    tracing::debug!(reason = refusal.as_str(), "Refused an AG-UI run.");
    if refusal == Refusal::Thread {
        return error(StatusCode::FORBIDDEN, "forbidden", refusal.message(), None);
    }
    let message = match refusal {
        Refusal::Missing => "this endpoint needs Authorization: Bearer <token>",
        _ => refusal.message(),
    };
    let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized", message, None);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}
