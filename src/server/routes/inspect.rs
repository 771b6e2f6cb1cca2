//! The live inspector (`GET /inspect` on the internal door) and the two operator endpoints made
//! for it: `GET /v1/runs` (runs by state, the most recent ones) and `GET /v1/threads/{thread_id}/tail`
//! (one thread's events as Server-Sent Events, the public door's stream machinery behind an
//! operator key).
//!
//! The page is static: it holds no data and is served without a key. It asks the operator for
//! the key, keeps it in `sessionStorage` and sends it as a bearer on its fetches to `/v1/*`, which
//! check it as for any client (`docs/security.md`). Its script and style are inline in one file,
//! so the Content-Security-Policy allows exactly them by hash and nothing else: no other script,
//! no connection but to this origin, no frame, no form target.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use base64::Engine;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use sha2::{Digest, Sha256};

use super::{Body, error, events, full, json_response, percent_decode};
use crate::Gateway;
use crate::protocol::channel::check_id;
use crate::protocol::server::Format;
use crate::session::sse::{self, parse_position};
use crate::shutdown::Signal;

/// The page: HTML, CSS and script in one file, no build step.
const PAGE: &str = include_str!("inspect.html");

/// Its policy, computed once: the page's own inline script and style, by SHA-256.
static POLICY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes(PAGE, "<script>", "</script>"),
        hashes(PAGE, "<style>", "</style>"),
    )
});

/// The CSP source of every block between `open` and `close` (`'sha256-…'` each).
fn hashes(page: &str, open: &str, close: &str) -> String {
    let mut sources = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find(open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(close) else { break };
        let digest = Sha256::digest(&body.as_bytes()[..end]);
        sources.push(format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ));
        rest = &body[end..];
    }
    // No block: allow none rather than an empty (and invalid) source list.
    if sources.is_empty() {
        return "'none'".into();
    }
    sources.join(" ")
}

/// `GET /inspect`: the page, never cached, under its policy.
pub(super) fn page() -> Response<Body> {
    let mut response = Response::new(full(bytes::Bytes::from_static(PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if let Ok(policy) = HeaderValue::from_str(&POLICY) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    response
}

/// How many runs `GET /v1/runs` lists without `?limit=`.
const RUNS_DEFAULT: usize = 20;

/// `GET /v1/runs?limit=N`: the watchdog's runs counted by state and the `N` most recently active
/// (default 20, at most [`crate::watchdog::MAX_LISTED`]).
pub(super) fn runs(gateway: &Gateway, query: Option<&str>) -> Response<Body> {
    let max = crate::watchdog::MAX_LISTED;
    let mut limit = RUNS_DEFAULT;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if key == "limit" {
            match value.parse::<usize>() {
                Ok(n) if n <= max => limit = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        &format!("limit must be a number from 0 to {max}"),
                        Some("limit"),
                    );
                }
            }
        }
    }
    json_response(StatusCode::OK, &gateway.watchdog.list(limit))
}

const TAIL_PREFIX: &str = "/v1/threads/";
const TAIL_SUFFIX: &str = "/tail";

/// The raw (still percent-encoded) thread id of a tail path.
pub(super) fn tail_in(path: &str) -> Option<&str> {
    path.strip_prefix(TAIL_PREFIX)?.strip_suffix(TAIL_SUFFIX)
}

/// `GET /v1/threads/{thread_id}/tail?since=<epoch>:<seq>|0`: the thread's events in the native
/// format, as the public door's stream writes them (the same task and budgets), without counting as a
/// delivery. Without `since`, only what is published from now on.
pub(super) async fn tail(
    gateway: &Arc<Gateway>,
    peer: SocketAddr,
    raw_thread: &str,
    cut: Arc<Signal>,
    request: &Request<Incoming>,
) -> Response<Body> {
    let Some(thread_id) = percent_decode(raw_thread).filter(|id| check_id(id).is_ok()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_thread_id",
            "a thread id is 1 to 256 printable bytes",
            Some("thread_id"),
        );
    };
    let since = url::form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "since")
        .map(|(_, value)| parse_position(&value));
    let since = match since {
        None => None,
        Some(Some(since)) => Some(since),
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_since",
                "since must be <epoch>:<seq> or 0",
                Some("since"),
            );
        }
    };
    let stream = sse::Request {
        thread_id,
        since,
        format: Format::Native,
        // The operator key does not expire; the stream ends with the client or the gateway.
        expires: None,
        cut,
        // An operator watching is not a viewer: what the tail shows stays pending until a viewer
        // gets it, so the ledger keeps saying what users saw.
        delivers: false,
    };
    events::serve(gateway, peer, request, stream).await
}
