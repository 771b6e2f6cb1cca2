//! One Server-Sent Events stream of one thread (`GET /v1/threads/{thread_id}/events`), served by
//! one task on the sessions' tracker, with the WebSocket session's machinery: an [`Outbox`]
//! bounded by `session.queue_events` and `session.queue_bytes`, subscribed through the broker
//! (replay included, either broker), and a writer that marks an event delivered once the response
//! took it. The task owns what the stream holds (its subscription, its place in the connection
//! budgets) and gives it back when the stream ends: the client went away, it stopped reading (slow
//! consumer), its token expired, or the gateway shuts down.
//!
//! The response body is a channel of one chunk: the task hands a chunk (up to 64 KiB of events)
//! to hyper and waits until hyper took it before the next, so what the body holds is bounded and
//! "taken" is the write that counts as the delivery, as a socket write is for `/ws`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use crate::shutdown::Signal;
use bytes::Bytes;
use hyper::body::Frame;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use super::ended::{CloseSent, Ended};
use super::{FLUSH_BYTES, Resume, TokenClock, closing_moment};
use crate::Gateway;
use crate::broker::BrokerError;
use crate::fanout::{Outbox, Outgoing, StoredEvent};
use crate::limits::ConnectionSlot;
use crate::metrics::{DeliveryPath, Label, count};
use crate::protocol::ChannelName;
use crate::protocol::client::Since;
use crate::protocol::server::{Format, event_frame_epoch};

/// Renders one stored event as SSE: `id: <epoch>:<seq>` (what `Last-Event-ID` gives back on a
/// reconnect) and the event's data, then the blank line that ends it. A format may render one
/// stored event as several SSE events; each carries the id of the stored event it came from.
pub fn render_event(format: Format, event: &StoredEvent, out: &mut Vec<u8>) {
    match format {
        Format::Native => {
            id(out, event);
            // The frame is compact JSON from serde_json: no raw line break can end `data:` early.
            data(out, &event.frame);
        }
        Format::AgUi => {
            // One event may be several AG-UI events: only the last carries the id, so a client
            // cut between them resumes before the first and misses none.
            let events = &event.agui().events;
            for (i, agui) in events.iter().enumerate() {
                if i + 1 == events.len() {
                    id(out, event);
                }
                data(out, agui);
            }
        }
    }
}

fn id(out: &mut Vec<u8>, event: &StoredEvent) {
    // Every event frame is made by `event_frame`, which writes the epoch first.
    let epoch = event_frame_epoch(&event.frame).unwrap_or_default();
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(epoch.as_bytes());
    out.push(b':');
    out.extend_from_slice(itoa::Buffer::new().format(event.seq).as_bytes());
    out.push(b'\n');
}

/// Renders a control frame of the gateway (`subscribed`, `error`, `restart`). Native: a named
/// event (`event: <type>`), so an `EventSource` `onmessage` handler sees only events and the page
/// listens for the others by name. AG-UI: a comment (`: <type> <json>`), because AG-UI's HTTP
/// client reads every `data:` line as an AG-UI event whatever its name. Control frames carry no
/// `id:`: the client's resume position stays that of its last event.
pub fn render_control(format: Format, kind: &str, frame: &[u8], out: &mut Vec<u8>) {
    match format {
        Format::Native => {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(kind.as_bytes());
            out.push(b'\n');
            data(out, frame);
        }
        Format::AgUi => {
            out.extend_from_slice(b": ");
            out.extend_from_slice(kind.as_bytes());
            out.push(b' ');
            out.extend_from_slice(frame);
            out.extend_from_slice(b"\n\n");
        }
    }
}

/// What an AG-UI client resuming mid-run must see first (see [`crate::fanout::prelude`]), as
/// `data:` lines without an id: not events of the channel.
fn render_prelude(context: &[Arc<StoredEvent>], out: &mut Vec<u8>) {
    for event in crate::fanout::prelude(context) {
        data(out, event.to_string().as_bytes());
    }
}

fn data(out: &mut Vec<u8>, json: &[u8]) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

/// A resume position as an event stream takes it (`Last-Event-ID`, `since=`): `<epoch>:<seq>`,
/// the `id:` of the last event seen, or `0` for all retained history. `None` when malformed.
pub fn parse_position(value: &str) -> Option<Since> {
    if value == "0" {
        return Some(Since {
            epoch: None,
            seq: 0,
        });
    }
    let (epoch, seq) = value.split_once(':')?;
    let seq = seq.parse::<u64>().ok()?;
    // Epochs are hex digits; anything else is not an id this gateway wrote.
    if epoch.is_empty() || epoch.len() > 64 || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(Since {
        epoch: Some(epoch.to_string()),
        seq,
    })
}

/// What the route checked and decided before the stream opens.
pub struct Request {
    pub thread_id: String,
    pub since: Option<Since>,
    pub format: Format,
    /// When the credential that opened the stream stops being valid (with browser authentication).
    pub expires: Option<SystemTime>,
    /// Closes the stream's HTTP connection once the stream ended, so a client that stopped reading
    /// does not keep it (and its unread bytes) open.
    pub cut: Arc<Signal>,
    /// Whether what the stream writes counts as delivered: `false` for the operator's tail, which
    /// watches a thread without being one of its viewers (the ledger says what viewers got).
    pub delivers: bool,
}

/// The response body of an open stream: what the stream's task hands over, one chunk at a time.
pub struct Body(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// Subscribes a new stream to its thread and starts its task; the body is the response's. A
/// broker that cannot subscribe now is the caller's to answer (nothing was registered).
pub async fn open(
    gateway: Arc<Gateway>,
    request: Request,
    slot: ConnectionSlot,
) -> Result<Body, BrokerError> {
    let config = &gateway.config.session;
    let outbox = Outbox::new(config.queue_events, config.queue_bytes);
    let channel = ChannelName::thread(&request.thread_id);
    let Some(report) = gateway
        .broker
        .subscribe(
            &channel,
            request.since.as_ref(),
            &outbox,
            request.format == Format::AgUi,
        )
        .await?
    else {
        // A new outbox is subscribed nowhere: the broker cannot find it there already.
        return Err(BrokerError::Internal(
            "a new stream was already subscribed".into(),
        ));
    };
    gateway.metrics.subscriptions.inc();
    if request.since.is_some() {
        let outcome = match report.recovered {
            true => Resume::Recovered,
            false => Resume::NotRecovered,
        };
        count(&gateway.metrics.resumes, outcome);
    }
    let (body, chunks) = mpsc::channel(1);
    let connection_id = super::ConnectionId::random();
    let span = tracing::info_span!("sse", %connection_id, thread_id = %request.thread_id);
    let leeway = gateway.config.auth.jwt_leeway;
    let stream = Stream {
        expires_at: request
            .expires
            .map(|expires| TokenClock::new(expires, leeway).expires_at),
        gateway: Arc::clone(&gateway),
        connection_id,
        outbox,
        channel,
        format: request.format,
        delivers: request.delivers,
        body,
        out: Vec::new(),
        replay: VecDeque::new(),
        written: Vec::new(),
    };
    let cut = request.cut;
    gateway.shutdown.tracker.spawn(
        async move {
            // The stream's place in the connection budgets, held until it ends.
            let _slot = slot;
            stream.serve().await;
            cut.raise();
        }
        .instrument(span),
    );
    Ok(Body(chunks))
}

struct Stream {
    gateway: Arc<Gateway>,
    connection_id: super::ConnectionId,
    outbox: Arc<Outbox>,
    channel: ChannelName,
    format: Format,
    delivers: bool,
    /// Where chunks go to the response.
    body: mpsc::Sender<Bytes>,
    /// When the stream's credential expires (its `exp` plus `auth.jwt_leeway`).
    expires_at: Option<Instant>,
    /// The next chunk being rendered.
    out: Vec<u8>,
    /// The rest of a replay that did not fit in one chunk.
    replay: VecDeque<Arc<StoredEvent>>,
    /// Events in the chunk being handed over, marked delivered once the response took it.
    written: Vec<(Arc<StoredEvent>, DeliveryPath)>,
}

/// Why handing a chunk to the response did not work.
enum Untaken {
    /// The response is gone: the client closed the connection.
    Gone,
    /// The response did not take it within `session.write_timeout`: the client is not reading.
    TimedOut,
}

impl Stream {
    async fn serve(mut self) {
        let metrics = Arc::clone(&self.gateway.metrics);
        metrics.connections.inc();
        metrics.sse_streams.inc();
        metrics.connections_opened.inc();
        let ended = self.run().await;
        self.outbox.close();
        if self
            .gateway
            .broker
            .unsubscribe(&self.channel, &self.outbox)
            .await
        {
            metrics.subscriptions.dec();
        }
        tracing::debug!(reason = ended.as_str(), "Event stream ended.");
        metrics
            .connections_closed
            .with_label_values(&[ended.as_str()])
            .inc();
        metrics.sse_streams.dec();
        metrics.connections.dec();
    }

    async fn run(&mut self) -> Ended {
        let limit = self.gateway.config.session.write_timeout;
        let heartbeat = self.gateway.config.sse.heartbeat;
        // First the reconnection delay, so that even a stream cut at once tells EventSource when
        // to come back.
        self.out.extend_from_slice(b"retry: ");
        let retry_ms = self.gateway.config.sse.retry.as_millis() as u64;
        self.out
            .extend_from_slice(itoa::Buffer::new().format(retry_ms).as_bytes());
        self.out.extend_from_slice(b"\n\n");
        let mut last_write = Instant::now();
        let timer = tokio::time::sleep_until(last_write + heartbeat);
        tokio::pin!(timer);
        let gateway = Arc::clone(&self.gateway);
        let shutdown = gateway.shutdown.close.raised();
        tokio::pin!(shutdown);
        let mut closing_at: Option<Instant> = None;
        loop {
            if self.outbox.is_overflowed() {
                return self.slow_consumer(limit).await;
            }
            if !self.out.is_empty() || self.has_output() {
                match self.flush(limit).await {
                    Ok(()) => last_write = Instant::now(),
                    Err(Untaken::Gone) => return Ended::ClientGone,
                    Err(Untaken::TimedOut) => return self.slow_consumer(limit).await,
                }
            }
            let more = self.has_output();
            if !more {
                self.release_buffers();
            }
            let deadline = [self.expires_at, closing_at]
                .into_iter()
                .flatten()
                .fold(last_write + heartbeat, Instant::min);
            timer.as_mut().reset(deadline);
            tokio::select! {
                biased;
                () = &mut shutdown, if closing_at.is_none() => {
                    closing_at = Some(closing_moment(&gateway));
                }
                () = &mut timer => {
                    let now = Instant::now();
                    // A heartbeat after the last write: the small queue a stream keeps between
                    // events goes back (freeing it after every write took its lock once more).
                    if !self.has_output() {
                        self.outbox.release();
                    }
                    if closing_at.is_some_and(|at| now >= at) {
                        // EventSource reconnects by itself after `retry:`; the load balancer sends
                        // it to a replica that is not shutting down.
                        self.last(Control::Restart, limit).await;
                        return Ended::Shutdown;
                    }
                    if self.expires_at.is_some_and(|at| now >= at) {
                        self.last(Control::TokenExpired, limit).await;
                        return Ended::TokenExpired;
                    }
                    if now >= last_write + heartbeat {
                        self.out.extend_from_slice(b": heartbeat\n\n");
                    }
                }
                () = self.body.closed() => return Ended::ClientGone,
                // More is queued than one chunk takes: go round again at once.
                _ = std::future::ready(()), if more => {}
                _ = self.outbox.ready(), if !more => {}
            }
        }
    }

    fn has_output(&self) -> bool {
        !self.replay.is_empty() || !self.outbox.is_empty()
    }

    /// An idle stream keeps no buffer.
    fn release_buffers(&mut self) {
        if self.out.capacity() > 0 {
            self.out = Vec::new();
        }
        if self.written.capacity() > 0 {
            self.written = Vec::new();
        }
        if self.replay.capacity() > 0 {
            self.replay = VecDeque::new();
        }
    }

    /// Renders queued events (a replay first) up to [`FLUSH_BYTES`] into one chunk and hands it
    /// to the response; the events in it are delivered once the response took it.
    async fn flush(&mut self, limit: Duration) -> Result<(), Untaken> {
        while self.out.len() < FLUSH_BYTES {
            if let Some(event) = self.replay.pop_front() {
                render_event(self.format, &event, &mut self.out);
                self.written.push((event, DeliveryPath::Replay));
                continue;
            }
            match self.outbox.pop().map(|(item, _)| item) {
                Some(Outgoing::Event(event)) => {
                    render_event(self.format, &event, &mut self.out);
                    self.written.push((event, DeliveryPath::Live));
                }
                Some(Outgoing::Replay(events)) => self.replay.extend(events),
                Some(Outgoing::Context(context)) => render_prelude(&context, &mut self.out),
                Some(Outgoing::Frame(frame)) => {
                    // The broker's `subscribed` is the only control frame a stream is sent.
                    let kind = frame_type(&frame);
                    render_control(self.format, &kind, &frame, &mut self.out);
                }
                // Pongs answer a WebSocket client's pings; a stream has none.
                Some(Outgoing::Pong(_)) => {}
                None => break,
            }
        }
        if let Err(untaken) = self.hand_over(limit).await {
            self.written.clear();
            return Err(untaken);
        }
        if self.delivers {
            super::delivered(&self.gateway, &mut self.written, self.connection_id);
        } else {
            self.written.clear();
        }
        Ok(())
    }

    /// Hands `out` to the response and waits until the response took it, within `limit` each.
    async fn hand_over(&mut self, limit: Duration) -> Result<(), Untaken> {
        let chunk = Bytes::from(std::mem::take(&mut self.out));
        match timeout(limit, self.body.send(chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Untaken::Gone),
            Err(_) => return Err(Untaken::TimedOut),
        }
        // The body holds one chunk: room again means the response took it.
        match timeout(limit, self.body.reserve()).await {
            Ok(Ok(_permit)) => Ok(()),
            Ok(Err(_)) => Err(Untaken::Gone),
            Err(_) => Err(Untaken::TimedOut),
        }
    }

    /// Ends a stream whose client stopped reading: an `error` event with `slow_consumer` when the
    /// response takes it within `limit`, counted like a WebSocket's 4008.
    async fn slow_consumer(&mut self, limit: Duration) -> Ended {
        self.outbox.close();
        self.replay.clear();
        self.out.clear();
        render_control(
            self.format,
            "error",
            &Control::SlowConsumer.frame(),
            &mut self.out,
        );
        let chunk = Bytes::from(std::mem::take(&mut self.out));
        // A response that has not taken the last chunk will not take this one either.
        let sent = self.body.try_send(chunk).is_ok()
            && matches!(timeout(limit, self.body.reserve()).await, Ok(Ok(_)));
        let close = match sent {
            true => CloseSent::Sent,
            false => CloseSent::NotSent,
        };
        count(&self.gateway.metrics.slow_consumer_closes, close);
        tracing::info!(
            reason = Ended::SlowConsumer.as_str(),
            close = close.as_str(),
            "Ended a slow consumer's event stream; it can resume from history."
        );
        Ended::SlowConsumer
    }

    /// The last event of a stream that ends by the gateway's decision, after what is queued.
    async fn last(&mut self, control: Control, limit: Duration) {
        self.outbox.close();
        self.replay.clear();
        render_control(
            self.format,
            control.event(),
            &control.frame(),
            &mut self.out,
        );
        // Whether it arrives changes nothing: the stream ends either way, counted by its reason.
        let _ = self.hand_over(limit).await;
    }
}

/// The control events a stream ends with.
#[derive(Debug, Clone, Copy)]
enum Control {
    SlowConsumer,
    TokenExpired,
    Restart,
}

impl Control {
    fn event(self) -> &'static str {
        match self {
            Self::SlowConsumer | Self::TokenExpired => "error",
            Self::Restart => "restart",
        }
    }

    fn frame(self) -> Vec<u8> {
        let (code, message) = match self {
            Self::SlowConsumer => (
                "slow_consumer",
                "the client did not read its events in time; reconnect and resume with Last-Event-ID",
            ),
            Self::TokenExpired => (
                "token_expired",
                "the stream's token expired; reconnect with a fresh token and resume with Last-Event-ID",
            ),
            Self::Restart => (
                "restarting",
                "this replica is shutting down; reconnect and resume with Last-Event-ID",
            ),
        };
        serde_json::json!({"type": self.event(), "code": code, "message": message})
            .to_string()
            .into_bytes()
    }
}

/// The `type` of a control frame, which names its SSE event.
fn frame_type(frame: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: String,
    }
    serde_json::from_slice::<Typed>(frame)
        .map(|typed| typed.kind)
        .unwrap_or_else(|_| "control".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        assert_eq!(
            parse_position("0"),
            Some(Since {
                epoch: None,
                seq: 0
            })
        );
        assert_eq!(
            parse_position("0a1b:42"),
            Some(Since {
                epoch: Some("0a1b".into()),
                seq: 42
            })
        );
        for bad in ["", "42", ":42", "e:", "e:-1", "e:x", "e f:1", "e:1:2"] {
            assert_eq!(parse_position(bad), None, "{bad:?}");
        }
    }
}
