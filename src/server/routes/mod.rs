//! The HTTP surface: `/ws`, `/v1/threads/{thread_id}/events`, `/agui/{agent}`, `/v1/events`,
//! `/v1/runs`, `/v1/runs/{run_id}/events`, `/v1/runs/{run_id}/agui`, `/v1/channels/{channel}`, `/v1/threads/{thread_id}/tail`,
//! `/inspect`, `/healthz`, `/readyz`, `/metrics`.
//! Every error is JSON: `{"error": code, "message": …, "field": …}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::Door;
use crate::Gateway;
use crate::auth::{ApiRefusal, Role};
use crate::broker::BrokerError;
use crate::metrics::{self, Label};
use crate::shutdown::Signal;

mod agui;
mod body;
mod cors;
mod events;
mod health;
mod inspect;
mod operator;
mod producers;
mod run_stream;
mod upgrade;

pub use body::BodyRefusal;
use health::{metrics, ready};
use operator::{channel, dead_letters, ledger, redrive, run};
use producers::{events, runs};
pub use run_stream::StreamRefusal;
pub use upgrade::Refused as UpgradeRefused;
use upgrade::upgrade;

/// Every answer's body: whole (`full`, not boxed: most answers are one event's) or, for an event
/// stream, the stream's chunks.
type Body = Either<Full<Bytes>, UnsyncBoxBody<Bytes, Infallible>>;

/// A whole body.
fn full(bytes: Bytes) -> Body {
    Either::Left(Full::new(bytes))
}

/// Answers one request that came through `door` from `peer`. The public door knows only `/ws`,
/// the event streams and `/healthz`; everything else is on the internal door. Cancelling `cut`
/// closes the request's connection (an event stream that ended does).
pub async fn handle(
    gateway: Arc<Gateway>,
    door: Door,
    peer: SocketAddr,
    cut: Arc<Signal>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // The request moves into its route, which reads the path beside it: a clone of the URI
    // shares the bytes hyper read it from, where a copy of the path would allocate.
    let uri = request.uri().clone();
    let method = request.method().clone();
    let response = match door {
        Door::Public => public(gateway, peer, uri.path(), &method, cut, request).await,
        Door::Internal => internal(gateway, peer, uri.path(), &method, cut, request).await,
    };
    Ok(response)
}

async fn public(
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    path: &str,
    method: &Method,
    cut: Arc<Signal>,
    request: Request<Incoming>,
) -> Response<Body> {
    if let Some(thread) = events::thread_in(path)
        && matches!(method, &Method::GET | &Method::OPTIONS)
    {
        return Box::pin(events::events(gateway, peer, thread, cut, request)).await;
    }
    if let Some(agent) = agui::agent_in(path)
        && matches!(method, &Method::POST | &Method::OPTIONS)
    {
        return Box::pin(agui::proxy(gateway, peer, agent, cut, request)).await;
    }
    match (path, method) {
        ("/ws", &Method::GET) => upgrade(gateway, peer, request),
        ("/healthz", &Method::GET) => json_response(StatusCode::OK, &json!({"status": "ok"})),
        _ => not_routed(path, method, Door::Public),
    }
}

async fn internal(
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    path: &str,
    method: &Method,
    cut: Arc<Signal>,
    request: Request<Incoming>,
) -> Response<Body> {
    // The producer and operator API needs a key of its role; probes and scrapes need none.
    let role = match (path, method) {
        ("/v1/events" | "/v1/runs", &Method::POST) => Some(Role::Producer),
        (p, &Method::POST) if run_stream::run_in(p).is_some() => Some(Role::Producer),
        (p, _) if p.starts_with("/v1/") => Some(Role::Operator),
        _ => None,
    };
    // Held until the answer is built: the address's place among its requests in flight.
    let _slot = match role {
        Some(_) => match gateway.limits.request(client_ip(&gateway, peer, &request)) {
            Some(slot) => Some(slot),
            None => return too_many_requests(&gateway),
        },
        None => None,
    };
    let mut producer = None;
    // Without keys the API trusts whoever reaches it, which must then be this machine, asking for a
    // loopback name (a web page rebound to 127.0.0.1 sends its own name as Host).
    if role.is_some()
        && gateway.api_keys.open()
        && !gateway.config.auth.insecure
        && !request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_loopback_host)
    {
        return api_refused(&gateway, ApiRefusal::Missing);
    }
    if let Some(role) = role {
        match gateway.api_keys.admit(role, bearer(&request)) {
            Ok(key) => producer = key,
            Err(refusal) => return api_refused(&gateway, refusal),
        }
    }

    // Every route but the hot one is boxed: a request's future is as large as its largest route's
    // and is moved whole (into hyper's connection, then along the awaits), so without the boxes
    // each `POST /v1/events` would copy kilobytes it never uses.
    match (path, method) {
        ("/v1/events", &Method::POST) => events(&gateway, request, producer.as_ref()).await,
        ("/v1/runs", &Method::POST) => Box::pin(runs(&gateway, request)).await,
        (p, &Method::POST) if let Some(target) = run_stream::run_in(p) => {
            Box::pin(run_stream::stream(
                &gateway,
                target,
                request,
                producer.as_ref(),
            ))
            .await
        }
        ("/v1/runs", &Method::GET) => inspect::runs(&gateway, request.uri().query()),
        (p, &Method::GET) if p.starts_with("/v1/runs/") => run(&gateway, &p["/v1/runs/".len()..]),
        (p, &Method::GET) if inspect::tail_in(p).is_some() => {
            let thread = inspect::tail_in(p).unwrap_or_default();
            Box::pin(inspect::tail(&gateway, peer, thread, cut, &request)).await
        }
        ("/v1/deadletter", &Method::GET) => {
            Box::pin(dead_letters(&gateway, request.uri().query())).await
        }
        // JSON only, like every POST: a page cannot send it without a CORS preflight.
        ("/v1/deadletter/redrive", &Method::POST)
            if !media_type_is(&request, "application/json") =>
        {
            unsupported_media_type("application/json")
        }
        ("/v1/deadletter/redrive", &Method::POST) => Box::pin(redrive(&gateway)).await,
        ("/v1/ledger", &Method::GET) => Box::pin(ledger(&gateway, request.uri().query())).await,
        (p, &Method::GET) if p.starts_with("/v1/channels/") => {
            Box::pin(channel(&gateway, &p["/v1/channels/".len()..])).await
        }
        ("/healthz", &Method::GET) => json_response(StatusCode::OK, &json!({"status": "ok"})),
        ("/readyz", &Method::GET) => ready(&gateway),
        // The page holds no data: it asks for the operator key and sends it on its fetches.
        ("/inspect", &Method::GET) => inspect::page(),
        ("/metrics", &Method::GET) => Box::pin(metrics(&gateway)).await,
        _ => not_routed(path, method, Door::Internal),
    }
}

/// The client's address, for the per-address budgets (see `trusted_proxies`).
fn client_ip(gateway: &Gateway, peer: SocketAddr, request: &Request<Incoming>) -> std::net::IpAddr {
    const FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");
    // Read only from a trusted proxy: every other request would pay for the lookup.
    let forwarded = || {
        let value = request.headers().get(FORWARDED_FOR)?;
        value.to_str().ok()
    };
    crate::limits::client_ip(peer.ip(), forwarded, &gateway.config.trusted_proxies)
}

/// The key or token sent as `Authorization: Bearer`.
fn bearer(request: &Request<Incoming>) -> Option<&str> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The answer to a request whose `Content-Type` is not one of `allowed`: 415, naming the header.
fn unsupported_media_type(allowed: &str) -> Response<Body> {
    error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        &format!("Content-Type must be {allowed}"),
        Some("content-type"),
    )
}

/// Whether the request's media type (without its parameters, in any case) is `expected`. Only the
/// JSON types are taken: a browser may send `text/plain` or a form to any address without asking
/// first (no CORS preflight), so a web page could otherwise post into a gateway on the visitor's
/// localhost. Compared as bytes: it is read on every POST.
fn media_type_is(request: &Request<Incoming>, expected: &str) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| {
            let value = value.as_bytes();
            // A plain loop: the value is a few bytes, shorter than a vectorised search's set-up.
            let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
            value[..end]
                .trim_ascii()
                .eq_ignore_ascii_case(expected.as_bytes())
        })
}

/// Whether a `Host` header names this machine: `localhost`, `127.0.0.1` or `[::1]`, any port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => match host.bytes().rposition(|b| b == b':') {
            Some(colon) => &host[..colon],
            None => host,
        },
    };
    // The usual names first: parsing an address costs more than the rest of a one-event POST's
    // routing.
    name == "127.0.0.1"
        || name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// 401 (no or an unknown key) or 403 (a key of the other role), counted.
fn api_refused(gateway: &Gateway, refusal: ApiRefusal) -> Response<Body> {
    metrics::count(&gateway.metrics.api_refused, refusal);
    tracing::debug!(reason = refusal.as_str(), "Refused an API request.");
    match refusal {
        ApiRefusal::WrongRole => error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this key may not use this endpoint (producer keys post; operator keys read and redrive)",
            None,
        ),
        ApiRefusal::Missing | ApiRefusal::Invalid => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this endpoint needs Authorization: Bearer <key> with a key of auth.producer_keys or auth.operator_keys",
                None,
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// Why an API request was refused before its key was read, counted in
/// `agentwire_api_refused_total{reason}` beside the key refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestRefusal {
    /// The client's address has `ingest.max_requests_per_ip` requests in flight (429).
    TooManyRequests,
}

impl Label for RequestRefusal {
    const ALL: &'static [Self] = &[Self::TooManyRequests];

    fn as_str(self) -> &'static str {
        match self {
            Self::TooManyRequests => "too_many_requests",
        }
    }
}

fn too_many_requests(gateway: &Gateway) -> Response<Body> {
    metrics::count(
        &gateway.metrics.api_refused,
        RequestRefusal::TooManyRequests,
    );
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_requests",
        "this address has ingest.max_requests_per_ip requests in flight; wait for their answers",
        None,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// 405 with `Allow` for a known path of this door, 404 otherwise (the public door does not reveal
/// the internal routes).
fn not_routed(path: &str, method: &Method, door: Door) -> Response<Body> {
    let allow = match (door, path) {
        (Door::Public, "/ws" | "/healthz") => Some("GET"),
        (Door::Public, p) if events::thread_in(p).is_some() => Some("GET, OPTIONS"),
        (Door::Public, p) if agui::agent_in(p).is_some() => Some("POST, OPTIONS"),
        (Door::Public, _) => None,
        (Door::Internal, "/healthz" | "/readyz" | "/metrics" | "/inspect") => Some("GET"),
        (Door::Internal, "/v1/runs") => Some("GET, POST"),
        (Door::Internal, "/v1/events" | "/v1/deadletter/redrive") => Some("POST"),
        (Door::Internal, "/v1/deadletter" | "/v1/ledger") => Some("GET"),
        (Door::Internal, p) if run_stream::run_in(p).is_some() => Some("POST"),
        (Door::Internal, p)
            if p.starts_with("/v1/channels/")
                || p.starts_with("/v1/runs/")
                || inspect::tail_in(p).is_some() =>
        {
            Some("GET")
        }
        (Door::Internal, _) => None,
    };
    match allow {
        Some(allow) => {
            let mut response = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("{method} is not allowed on {path}; use {allow}"),
                None,
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            response
        }
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route for {path}"),
            None,
        ),
    }
}

/// 503 with `Retry-After` while the broker cannot keep what it would accept.
/// A broker error, by whose fault: Redis unavailable (503, retry) or ours (500).
fn broker_error(gateway: &Gateway, failure: &BrokerError) -> Response<Body> {
    match failure {
        BrokerError::Unavailable(_) | BrokerError::Refused(..) => {
            broker_unavailable(gateway, &failure.to_string())
        }
        BrokerError::Internal(_) => {
            gateway.metrics.broker_errors.inc();
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &failure.to_string(),
                None,
            )
        }
    }
}

fn broker_unavailable(gateway: &Gateway, message: &str) -> Response<Body> {
    gateway.metrics.broker_errors.inc();
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
        message,
        None,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    // Most answers are one item's: a buffer of that size is not grown while it is written.
    let mut body = Vec::with_capacity(256);
    let written = serde_json::to_writer(&mut body, value).map(|()| body);
    json_written(status, written)
}

/// An answer whose JSON was written into a buffer, or failed to be.
fn json_written(status: StatusCode, written: serde_json::Result<Vec<u8>>) -> Response<Body> {
    // Never an empty body with the intended status: a failure is ours, and says so.
    let (status, body) = match written {
        Ok(body) => (status, body),
        Err(error) => {
            tracing::error!(%error, "Cannot serialise an answer.");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                br#"{"error":"internal","message":"the answer could not be serialised"}"#.to_vec(),
            )
        }
    };
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: &str, message: &str, field: Option<&str>) -> Response<Body> {
    let mut body = json!({"error": code, "message": message});
    if let Some(field) = field {
        body["field"] = field.into();
    }
    json_response(status, &body)
}

/// Decodes `%XX` escapes in a path segment; `None` if they do not form UTF-8.
fn percent_decode(raw: &str) -> Option<String> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn a_loopback_host_is_this_machine_by_name_or_address_with_any_port() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:8081",
            "localhost",
            "LocalHost:80",
            "127.0.0.2:80",
            "[::1]",
            "[::1]:8081",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "127.0.0.1.evil.example:80",
            "localhost.evil.example",
            "10.0.0.1:80",
            "[::2]:80",
            "::1",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
