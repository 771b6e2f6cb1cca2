//! `GET /v1/threads/{thread_id}/events`: a thread's events as Server-Sent Events, on the public
//! door. The route checks what `/ws` checks before a connection exists (origin, protected mode,
//! draining, the connection budgets), the thread id, the format, the resume position and the
//! credential, answers CORS for allowed origins (with the `OPTIONS` preflight), and hands the rest
//! to the stream's task ([`crate::session::sse`]). Every refusal is JSON, counted, and creates no
//! channel state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use super::cors;
use super::upgrade::{MAX_BEARER_BYTES, NotAdmitted, Refused, connection_slot};
use super::{Body, broker_error, error, percent_decode};
use crate::Gateway;
use crate::auth::{Refusal, ThreadAccess};
use crate::metrics::{Label, count};
use crate::protocol::channel::check_id;
use crate::protocol::server::Format;
use crate::session::sse::{self, parse_position};
use crate::shutdown::Signal;

const PREFIX: &str = "/v1/threads/";
const SUFFIX: &str = "/events";

/// The raw (still percent-encoded) thread id of an event-stream path.
pub(super) fn thread_in(path: &str) -> Option<&str> {
    path.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)
}

pub(super) async fn events(
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    raw_thread: &str,
    cut: Arc<Signal>,
    request: Request<Incoming>,
) -> Response<Body> {
    cors::admitted(&gateway, peer, request, &ALLOWED, async |request| {
        open(&gateway, peer, raw_thread, cut, &request).await
    })
    .await
}

/// What a page may send cross-origin: a fetch-based client: it may send `Authorization` and `Last-Event-ID`.
const ALLOWED: cors::Allowed = cors::Allowed {
    method: "GET",
    headers: "Authorization, Last-Event-ID, Accept, Cache-Control",
};

/// What the query says; unknown parameters are ignored (a client may add a cache buster).
#[derive(Default)]
struct Query {
    format: Option<String>,
    since: Option<String>,
    token: Option<String>,
}

impl Query {
    /// The known parameters; one given twice is refused with its name.
    fn parse(query: Option<&str>) -> Result<Self, &'static str> {
        let mut parsed = Self::default();
        for (name, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let (slot, field) = match &*name {
                "format" => (&mut parsed.format, "format"),
                "since" => (&mut parsed.since, "since"),
                "token" => (&mut parsed.token, "token"),
                _ => continue,
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(field);
            }
        }
        Ok(parsed)
    }
}

async fn open(
    gateway: &Arc<Gateway>,
    peer: SocketAddr,
    raw_thread: &str,
    cut: Arc<Signal>,
    request: &Request<Incoming>,
) -> Response<Body> {
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    if accept.is_some_and(|accept| !accept.contains("text/event-stream") && !accept.contains("*/*"))
    {
        count(&gateway.metrics.upgrades_refused, Refused::InvalidRequest);
        return error(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "this endpoint answers text/event-stream",
            Some("accept"),
        );
    }
    let thread_id = match percent_decode(raw_thread) {
        Some(thread_id) => thread_id,
        None => return invalid(gateway, "thread_id", "is not UTF-8 once decoded"),
    };
    if let Err(reason) = check_id(&thread_id) {
        return invalid(gateway, "thread_id", &reason.to_string());
    }
    let query = match Query::parse(request.uri().query()) {
        Ok(query) => query,
        Err(field) => return invalid(gateway, field, "is given more than once"),
    };
    let format = match query.format.as_deref().map(Format::parse) {
        None => Format::Native,
        Some(Some(format)) => format,
        Some(None) => return invalid(gateway, "format", "must be native or agui"),
    };
    // EventSource reconnects to the same URL, `since` included, and adds `Last-Event-ID`: the
    // header is the newer position.
    let last_event_id = match request.headers().get("last-event-id") {
        Some(value) => match value.to_str() {
            Ok(value) => Some(value),
            Err(_) => return invalid(gateway, "last-event-id", "must be <epoch>:<seq> or 0"),
        },
        None => None,
    };
    let since = match (last_event_id, query.since.as_deref()) {
        (Some(value), _) => match parse_position(value) {
            Some(since) => Some(since),
            None => return invalid(gateway, "last-event-id", "must be <epoch>:<seq> or 0"),
        },
        (None, Some(value)) => match parse_position(value) {
            Some(since) => Some(since),
            None => return invalid(gateway, "since", "must be <epoch>:<seq> or 0"),
        },
        (None, None) => None,
    };
    let bearer = super::bearer(request);
    let expires = match authorise(gateway, bearer, query.token.as_deref(), &thread_id).await {
        Ok(expires) => expires,
        Err(response) => return response,
    };
    let stream = sse::Request {
        thread_id,
        since,
        format,
        expires,
        cut,
        delivers: true,
    };
    serve(gateway, peer, request, stream).await
}

/// Opens a checked stream, within the connection budgets, as the response: the public door's
/// event streams and the internal door's operator tail (`GET /v1/threads/{thread_id}/tail`).
pub(super) async fn serve(
    gateway: &Arc<Gateway>,
    peer: SocketAddr,
    request: &Request<Incoming>,
    stream: sse::Request,
) -> Response<Body> {
    // The public door's `admit` checked it already; the operator tail has no other check.
    if gateway.shutdown.is_draining() {
        return NotAdmitted::Draining.response();
    }
    let slot = match connection_slot(gateway, peer, request) {
        Ok(slot) => slot,
        Err(refused) => return refused.response(),
    };
    match sse::open(Arc::clone(gateway), stream, slot).await {
        Ok(body) => {
            let mut response = Response::new(Either::Right(body.boxed_unsync()));
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            // nginx buffers responses unless told not to; a buffered stream is no stream.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            response
        }
        Err(failure) => broker_error(gateway, &failure),
    }
}

/// Who may read the thread, with browser authentication: `Authorization: Bearer` (a connection
/// token whose `threads` allow it, a subscription token for it, or the subscribe webhook's yes),
/// or `?token=`, which must be a subscription token for this thread (a connection token in a URL
/// would end up in access logs). `Ok` with when the credential expires; without browser
/// authentication anyone admitted may read, as on `/ws`.
pub(super) async fn authorise(
    gateway: &Gateway,
    bearer: Option<&str>,
    query_token: Option<&str>,
    thread_id: &str,
) -> Result<Option<SystemTime>, Response<Body>> {
    let Some(verifier) = &gateway.verifier else {
        return Ok(None);
    };
    for (token, field) in [(bearer, "authorization"), (query_token, "token")] {
        if token.is_some_and(|token| token.len() > MAX_BEARER_BYTES) {
            count(&gateway.metrics.upgrades_refused, Refused::InvalidRequest);
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_token",
                "the token is larger than 8192 bytes",
                Some(field),
            ));
        }
    }
    let identity = match (bearer, query_token) {
        (Some(_), Some(_)) => {
            count(&gateway.metrics.upgrades_refused, Refused::InvalidRequest);
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "send one credential: Authorization: Bearer or ?token=, not both",
                Some("token"),
            ));
        }
        (None, None) => return Err(refused(gateway, Refusal::Missing)),
        (Some(token), None) => {
            let identity = verifier
                .connection(token, None)
                .await
                .map_err(|refusal| refused(gateway, refusal))?;
            let access = ThreadAccess {
                verifier,
                webhook: gateway.subscribe_webhook.as_ref(),
                metrics: &gateway.metrics,
            };
            // The bearer may itself be a subscription token for this thread.
            access
                .may_read(Some(&identity), &identity.user_id, thread_id, Some(token))
                .await
                .map_err(|refusal| refused(gateway, refusal))?;
            identity
        }
        (None, Some(token)) => verifier
            .subscription_identity(token, thread_id)
            .await
            .map_err(|refusal| refused(gateway, refusal))?,
    };
    Ok(Some(identity.expires))
}

/// A refused credential: counted like `/ws`'s refusals; 403 when the credential is good but does
/// not allow this thread, 401 (with `WWW-Authenticate`) otherwise.
fn refused(gateway: &Gateway, refusal: Refusal) -> Response<Body> {
    count(&gateway.metrics.auth_refused, refusal);
    tracing::debug!(reason = refusal.as_str(), "Refused an event stream.");
    if refusal == Refusal::Thread {
        return error(StatusCode::FORBIDDEN, "forbidden", refusal.message(), None);
    }
    let (message, field) = match refusal {
        Refusal::Missing => (
            "this stream needs Authorization: Bearer <token>, or ?token=<subscription token> for this thread",
            None,
        ),
        Refusal::QueryConnectionToken => (refusal.message(), Some("token")),
        _ => (refusal.message(), None),
    };
    let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized", message, field);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// A malformed request: 400 naming the field, counted.
fn invalid(gateway: &Gateway, field: &str, reason: &str) -> Response<Body> {
    count(&gateway.metrics.upgrades_refused, Refused::InvalidRequest);
    error(
        StatusCode::BAD_REQUEST,
        &format!("invalid_{}", field.replace('-', "_")),
        &format!("{field} {reason}"),
        Some(field),
    )
}
