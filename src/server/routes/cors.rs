//! CORS for the public door's browser endpoints other than `/ws` (the event streams and the AG-UI
//! proxy): an origin `upgrade::admit` let in may read the answer, and its preflight is answered.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::Body;
use super::upgrade::admit;
use crate::Gateway;

/// One such endpoint's request: admitted like `/ws` (origin, protected mode, draining; refusals are
/// counted there), its preflight answered, and the admitted origin allowed to read whatever answer
/// `serve` gives.
pub(super) async fn admitted(
    gateway: &Gateway,
    peer: SocketAddr,
    request: Request<Incoming>,
    allowed: &Allowed,
    serve: impl AsyncFnOnce(Request<Incoming>) -> Response<Body>,
) -> Response<Body> {
    if let Err(refusal) = admit(gateway, peer, &request) {
        return refusal.response();
    }
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut response = match *request.method() {
        Method::OPTIONS => preflight(allowed, origin.is_some()),
        _ => serve(request).await,
    };
    allow_origin(&mut response, origin);
    response
}

/// What one endpoint allows a cross-origin page to send.
pub(super) struct Allowed {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The request headers a page may set.
    pub headers: &'static str,
}

/// The answer to an `OPTIONS` preflight; `cors`: the request came from a page (it has an `Origin`).
fn preflight(allowed: &Allowed, cors: bool) -> Response<Body> {
    let mut response = Response::new(super::full(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    let allow = match allowed.method {
        "GET" => "GET, OPTIONS",
        _ => "POST, OPTIONS",
    };
    headers.insert(header::ALLOW, HeaderValue::from_static(allow));
    if cors {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(allowed.method),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(allowed.headers),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    response
}

/// Lets the admitted `origin` read `response`, whatever it is.
fn allow_origin(response: &mut Response<Body>, origin: Option<HeaderValue>) {
    if let Some(origin) = origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}
