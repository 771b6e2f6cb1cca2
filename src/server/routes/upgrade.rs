//! `GET /ws`: the WebSocket upgrade. hyper and fastwebsockets do the handshake only; the session
//! takes the TCP stream back so that no library buffer stays per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Body, error};
use crate::Gateway;
use crate::limits::{ConnectionSlot, ConnectionsFull};
use crate::metrics::{self, Label};
use crate::telemetry::Throttle;

pub(super) fn upgrade(
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
) -> Response<Body> {
    if let Err(refused) = admit(&gateway, peer, &request) {
        return refused.response();
    }
    let slot = match connection_slot(&gateway, peer, &request) {
        Ok(slot) => slot,
        Err(refused) => return refused.response(),
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&request) {
        return error(
            StatusCode::BAD_REQUEST,
            "upgrade_required",
            "/ws expects a WebSocket upgrade",
            None,
        );
    }
    let (response, upgraded) = match fastwebsockets::upgrade::upgrade(&mut request) {
        Ok(pair) => pair,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_upgrade", &e.to_string(), None),
    };
    // A client that can set headers may send its token with the upgrade instead of in hello.
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
    let tracker = gateway.shutdown.tracker.clone();
    tracker.spawn(async move {
        let ws = match upgraded.await {
            Ok(ws) => ws,
            Err(error) => return tracing::debug!(%error, "WebSocket upgrade did not complete."),
        };
        // Take the TCP stream back from hyper: its upgraded wrapper keeps a read buffer per socket.
        let Ok(parts) = ws
            .into_inner()
            .into_inner()
            .downcast::<TokioIo<TcpStream>>()
        else {
            return tracing::error!("An upgraded connection is not a TCP stream; closing it.");
        };
        let connection_id = crate::session::ConnectionId::random();
        let session = crate::session::serve(
            gateway,
            parts.io.into_inner(),
            parts.read_buf,
            connection_id,
            bearer,
        );
        session.await;
        // The connection's place in the budgets, held until the session ends (dropped with the
        // task on the early returns). Not moved into a local: that would hold it twice.
        drop(slot);
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, super::full(bytes::Bytes::new()))
}

/// A token sent with the upgrade (or to an event stream) is at most this large, like `hello.token`.
pub(super) const MAX_BEARER_BYTES: usize = 8 * 1024;

/// Why an upgrade or an event stream was refused before any session state existed, counted in
/// `agentwire_upgrades_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The `Origin` is neither the gateway's own nor in `auth.allowed_origins`.
    Origin,
    /// Protected mode: a peer that is not loopback, and nothing authenticates browsers.
    NotLoopback,
    /// `session.max_connections` are open.
    Connections,
    /// The client's address holds `session.max_connections_per_ip`.
    ConnectionsPerIp,
    /// An event stream's request is malformed (400 naming the field, or 406).
    InvalidRequest,
}

impl Label for Refused {
    const ALL: &'static [Self] = &[
        Self::Origin,
        Self::NotLoopback,
        Self::Connections,
        Self::ConnectionsPerIp,
        Self::InvalidRequest,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Origin => "origin",
            Self::NotLoopback => "not_loopback",
            Self::Connections => "connections",
            Self::ConnectionsPerIp => "connections_per_ip",
            Self::InvalidRequest => "invalid_request",
        }
    }
}

impl Refused {
    pub(super) fn response(self) -> Response<Body> {
        match self {
            Self::Origin => error(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "this page's origin may not connect to this gateway (/ws, event streams); the gateway's operator lists allowed origins in auth.allowed_origins",
                None,
            ),
            Self::NotLoopback => error(
                StatusCode::FORBIDDEN,
                "protected_mode",
                "browser authentication is not configured, so only loopback clients may connect (/ws, event streams); configure it, or set auth.insecure = true for a trusted network",
                None,
            ),
            Self::Connections => busy(
                "too_many_connections",
                "this replica holds session.max_connections; retry later or on another replica",
            ),
            Self::ConnectionsPerIp => busy(
                "too_many_connections",
                "this address holds session.max_connections_per_ip connections; close some first",
            ),
            // The route answers with the field at fault; this is what is left without one.
            Self::InvalidRequest => error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request is malformed",
                None,
            ),
        }
    }
}

/// 503 with `Retry-After`.
fn busy(code: &str, message: &str) -> Response<Body> {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, code, message, None);
    response.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from_static("5"),
    );
    response
}

/// Why a connection was not admitted.
pub(super) enum NotAdmitted {
    /// Refused, and counted.
    Refused(Refused),
    /// The replica is shutting down: the client connects to another.
    Draining,
}

impl NotAdmitted {
    pub(super) fn response(self) -> Response<Body> {
        match self {
            Self::Refused(refused) => refused.response(),
            Self::Draining => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "this replica is shutting down; connect to another",
                None,
            ),
        }
    }
}

/// Who may open a connection (a WebSocket or an event stream): a browser page of an allowed
/// origin (a client without `Origin` is not a browser page), in protected mode only a loopback
/// peer, and nobody once the replica drains. A refusal is counted.
pub(super) fn admit(
    gateway: &Gateway,
    peer: SocketAddr,
    request: &Request<Incoming>,
) -> Result<(), NotAdmitted> {
    if let Err(refused) = allowed(gateway, peer, request) {
        metrics::count(&gateway.metrics.upgrades_refused, refused);
        tracing::debug!(%peer, reason = refused.as_str(), "Refused a connection.");
        return Err(NotAdmitted::Refused(refused));
    }
    if gateway.shutdown.is_draining() {
        return Err(NotAdmitted::Draining);
    }
    Ok(())
}

/// A place in the connection budgets (`session.max_connections`, per address
/// `session.max_connections_per_ip`), held until the connection ends; a full one is counted.
pub(super) fn connection_slot(
    gateway: &Gateway,
    peer: SocketAddr,
    request: &Request<Incoming>,
) -> Result<ConnectionSlot, Refused> {
    let client = super::client_ip(gateway, peer, request);
    gateway.limits.connection(client).map_err(|full| {
        let refused = match full {
            ConnectionsFull::Global => Refused::Connections,
            ConnectionsFull::PerIp => Refused::ConnectionsPerIp,
        };
        metrics::count(&gateway.metrics.upgrades_refused, refused);
        static FULL: Throttle = Throttle::every(Duration::from_secs(10));
        if let Some(held_back) = FULL.allow() {
            tracing::warn!(%client, reason = refused.as_str(), held_back, "Refused connections: a connection budget is full.");
        }
        refused
    })
}

fn allowed(
    gateway: &Gateway,
    peer: SocketAddr,
    request: &Request<Incoming>,
) -> Result<(), Refused> {
    let auth = &gateway.config.auth;
    let header = |name| request.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(origin) = request.headers().get(hyper::header::ORIGIN)
        && !origin
            .to_str()
            .is_ok_and(|origin| auth.allows_origin(origin, header(hyper::header::HOST)))
    {
        return Err(Refused::Origin);
    }
    // Protected mode: a loopback peer that asked for a loopback name. A page whose own name was
    // made to resolve to 127.0.0.1 (DNS rebinding) sends its name as Host, and is refused.
    let local = peer.ip().to_canonical().is_loopback()
        && header(hyper::header::HOST).is_some_and(super::is_loopback_host);
    if !(auth.authenticates_browsers() || auth.insecure || local) {
        return Err(Refused::NotLoopback);
    }
    Ok(())
}
