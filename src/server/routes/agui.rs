//! AG-UI's public door: `POST /agui/{agent}`, a browser's `RunAgentInput` (what `HttpAgent`
//! sends), admitted like `/ws` (origin, protected mode, draining), authorised like a thread
//! subscription, and forwarded to the configured agent by a detached run
//! ([`crate::ingest::agui_proxy`]). Every refusal is JSON, counted, and neither forwards nor
//! creates anything.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use crate::shutdown::Signal;

use super::body;
use super::cors;
use super::events::authorise;
use super::run_stream::{StreamRefusal, busy, place, refused};
use super::upgrade::connection_slot;
use super::{
    Body, broker_error, error, json_response, media_type_is, percent_decode, unsupported_media_type,
};
use crate::Gateway;
use crate::ingest::agui_proxy::{self, ProxiedRun};
use crate::protocol::ChannelName;
use crate::protocol::agui::RunAgentInput;
use crate::protocol::client::Since;
use crate::protocol::server;
use crate::session::sse;

/// The raw agent name of `/agui/{agent}`.
pub(super) fn agent_in(path: &str) -> Option<&str> {
    path.strip_prefix("/agui/")
        .filter(|agent| !agent.contains('/'))
}

/// `POST /agui/{agent}` (and its CORS preflight) on the public door.
pub(super) async fn proxy(
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    raw_agent: &str,
    cut: Arc<Signal>,
    request: Request<Incoming>,
) -> Response<Body> {
    cors::admitted(&gateway, peer, request, &ALLOWED, async |request| {
        run(&gateway, peer, raw_agent, cut, request).await
    })
    .await
}

/// What a page may send cross-origin: `HttpAgent`: a JSON POST with `Authorization`.
const ALLOWED: cors::Allowed = cors::Allowed {
    method: "POST",
    headers: "Authorization, Content-Type, Accept",
};

async fn run(
    gateway: &Arc<Gateway>,
    peer: SocketAddr,
    raw_agent: &str,
    cut: Arc<Signal>,
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
            return refused(gateway, StreamRefusal::UnknownAgent, answer);
        }
    };
    if !media_type_is(&request, "application/json") {
        let answer = unsupported_media_type("application/json");
        return refused(gateway, StreamRefusal::MediaType, answer);
    }
    let bearer = super::bearer(&request).map(str::to_string);
    // The connection budgets, like any stream of the public door: held while the answer streams.
    let slot = match connection_slot(gateway, peer, &request) {
        Ok(slot) => slot,
        Err(refused) => return refused.response(),
    };
    let limit = gateway.config.agui.max_input_bytes;
    let held = match body::read(gateway, request, limit, "agui.max_input_bytes").await {
        Ok(held) => held,
        Err(refusal) => return refused(gateway, StreamRefusal::Body, refusal.response),
    };
    let input = match RunAgentInput::check(&held.bytes) {
        Ok(input) => input,
        Err(refusal) => {
            let mut body = json!({"error": refusal.code.as_str(), "message": refusal.reason});
            if let Some(field) = &refusal.field {
                body["field"] = field.as_str().into();
            }
            let answer = json_response(StatusCode::BAD_REQUEST, &body);
            return refused(gateway, StreamRefusal::InvalidInput, answer);
        }
    };
    // Authorised like a reader of the thread (the event streams' rule, with the bearer only).
    let expires = match authorise(gateway, bearer.as_deref(), None, &input.thread_id).await {
        Ok(expires) => expires,
        Err(answer) => return answer,
    };
    let place = match place(gateway) {
        Ok(place) => place,
        Err(reason) => return busy(gateway, reason),
    };
    // The answer starts after what the thread holds now, so it begins with this run; it is
    // subscribed before the agent is asked, so nothing of the run can be missed.
    let since = match gateway
        .broker
        .report(&ChannelName::thread(&input.thread_id))
        .await
    {
        Ok(Some(report)) if !report.epoch.is_empty() => Since {
            epoch: Some(report.epoch),
            seq: report.last_seq,
        },
        Ok(_) => Since {
            epoch: None,
            seq: 0,
        },
        Err(failure) => return broker_error(gateway, &failure),
    };
    let stream = sse::Request {
        thread_id: input.thread_id.clone(),
        since: Some(since),
        format: server::Format::AgUi,
        expires,
        cut,
        delivers: true,
    };
    let events = match sse::open(Arc::clone(gateway), stream, slot).await {
        Ok(events) => events,
        Err(failure) => return broker_error(gateway, &failure),
    };
    let run = ProxiedRun {
        agent,
        thread_id: input.thread_id,
        run_id: input.run_id.clone(),
        // A copy of its own: a body that came in one piece is a slice of the connection's read
        // buffer, which the run would otherwise keep whole for as long as it lasts.
        input: bytes::Bytes::copy_from_slice(&held.bytes),
    };
    agui_proxy::start(gateway, run, place);
    let mut response = Response::new(Either::Right(
        UntilRunEnds::new(events, &input.run_id).boxed_unsync(),
    ));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // The stream's task cuts its connection when it ends, which may be after this answer ended
    // with the run: the connection is not reused for another request.
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The thread's AG-UI event stream, ended right after this run's end (RUN_FINISHED naming it, or a
/// RUN_ERROR after its RUN_STARTED): what `HttpAgent` reads from the agent itself, whose
/// `runAgent` resolves when the response ends. The stream is the SSE endpoint's, which writes
/// whole SSE events per chunk; a chunk is cut after the event that ends the run.
pub(super) struct UntilRunEnds<B> {
    inner: B,
    run_id: String,
    started: bool,
    done: bool,
    /// The end of a line a chunk ended in the middle of (bounded: a longer line is not looked at).
    partial: Vec<u8>,
}

/// A line longer than this is not read for the run's end (no AG-UI event the gateway stores is).
const MAX_LINE: usize = 4 * 1024 * 1024;

impl<B> UntilRunEnds<B> {
    pub(super) fn new(inner: B, run_id: &str) -> Self {
        Self {
            inner,
            run_id: run_id.to_string(),
            started: false,
            done: false,
            partial: Vec::new(),
        }
    }

    /// Reads `chunk`'s lines; `Some(n)` when the run's end is in it, `n` the bytes up to the end of
    /// that SSE event.
    fn scan(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut start = 0;
        let mut ends_at = None;
        while let Some(at) = memchr::memchr(b'\n', &chunk[start..]) {
            let end = start + at;
            let line: std::borrow::Cow<'_, [u8]> = if self.partial.is_empty() {
                chunk[start..end].into()
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(&chunk[start..end]);
                whole.into()
            };
            start = end + 1;
            if ends_at.is_some() {
                // The blank line that ends the terminal event.
                if line.iter().all(|b| *b == b'\r') {
                    return Some(start);
                }
                continue;
            }
            if let Some(data) = line.strip_prefix(b"data:") {
                ends_at = self.ends_run(data).then_some(start);
            }
        }
        if self.partial.len() + (chunk.len() - start) <= MAX_LINE {
            self.partial.extend_from_slice(&chunk[start..]);
        } else {
            self.partial.clear();
        }
        ends_at.map(|_| chunk.len())
    }

    fn ends_run(&mut self, data: &[u8]) -> bool {
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(data) else {
            return false;
        };
        let ours = event.get("runId").and_then(serde_json::Value::as_str) == Some(&self.run_id);
        match event.get("type").and_then(serde_json::Value::as_str) {
            Some("RUN_STARTED") if ours => {
                self.started = true;
                false
            }
            Some("RUN_FINISHED") => ours,
            Some("RUN_ERROR") => self.started,
            _ => false,
        }
    }
}

impl<B> hyper::body::Body for UntilRunEnds<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        let frame = match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let Some(chunk) = frame.data_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        match self.scan(chunk) {
            Some(end) => {
                self.done = true;
                let chunk = chunk.slice(..end);
                Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
            }
            None => Poll::Ready(Some(Ok(frame))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_ends_after_the_runs_end() {
        let mut until = UntilRunEnds::new((), "r1");
        let chunk = b"retry: 1000\n\nid: e:1\ndata: {\"type\":\"RUN_FINISHED\",\"threadId\":\"t\",\"runId\":\"r0\"}\n\n";
        assert_eq!(until.scan(chunk), None, "another run's end");
        let chunk = b"id: e:2\ndata: {\"type\":\"RUN_STARTED\",\"threadId\":\"t\",\"runId\":\"r1\"}\n\nid: e:3\ndata: {\"type\":\"TEXT_MESSAGE_CHUNK\",";
        assert_eq!(until.scan(chunk), None);
        assert!(until.started);
        let rest = b"\"delta\":\"x\"}\n\nid: e:4\ndata: {\"type\":\"RUN_ERROR\",\"message\":\"m\"}\n\nid: e:5\ndata: {}\n\n";
        let end = until.scan(rest).unwrap();
        assert!(
            rest[..end].ends_with(b"\"m\"}\n\n"),
            "{:?}",
            String::from_utf8_lossy(&rest[..end])
        );
        let mut until = UntilRunEnds::new((), "r1");
        let chunk = b"id: e:9\r\ndata: {\"type\":\"RUN_FINISHED\",\"threadId\":\"t\",\"runId\":\"r1\"}\r\n\r\n: hb\n";
        let end = until.scan(chunk).unwrap();
        assert_eq!(&chunk[end..], b": hb\n");
    }
}
