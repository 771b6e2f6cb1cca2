//! One client connection, served by one task: a Server-Sent Events stream of one thread
//! ([`sse`]), or a WebSocket (the rest of this module). A WebSocket session reads and parses the
//! client's frames (hello, subscribe, ack…), and writes whatever fan-out queued in its [`Outbox`],
//! every queued frame in one syscall. The connection holds no buffer while idle (a busy one keeps
//! small ones between its events until its timer finds it quiet, at most a heartbeat). It ends on the
//! client's close, a protocol error, a client that stops reading (a full queue or a timed-out
//! write: 4008), a missing hello (4001), silence (1001) or shutdown (1012); then its subscriptions
//! are removed.
//!
//! Liveness: the server pings every `session.heartbeat` whatever it writes (a listen-only browser
//! proves it is there only by answering pings), and any frame from the client, a pong included,
//! resets `session.client_timeout`. One timer per session covers all of it.

mod answer;
mod ended;
mod frame;
mod message;
pub mod sse;
mod write;

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use crate::Gateway;
use crate::auth::Identity;
use crate::fanout::{Outbox, Outgoing, StoredEvent};
use crate::limits::TokenBucket;
use crate::metrics::{DeliveryPath, Label};
use crate::protocol::ChannelName;
use crate::protocol::server::{self, ErrorCode, Format, close};

pub use answer::Resume;
pub use ended::{CloseSent, Ended};
use frame::FrameError;
use message::{AssemblyError, Reassembly};

/// Bytes written per flush at most: a busy or replaying connection still reads, notices shutdown
/// and marks deliveries between flushes, and its write buffer stays small.
const FLUSH_BYTES: usize = 64 * 1024;
/// After its close frame, how long a connection waits for the client to close its side, so the
/// kernel does not answer unread bytes with a reset that would hide the close code.
const LINGER: Duration = Duration::from_secs(1);

/// Serves one upgraded connection until it ends. `read` holds bytes the client sent right after
/// its handshake, before the upgrade completed; `bearer` is a token sent with the upgrade
/// (`Authorization: Bearer`), used when `hello` carries none.
///
/// The session is built before the task's future, which then holds it once: arguments moved into
/// an `async` body keep their own slots beside it for the connection's whole life.
pub fn serve(
    gateway: Arc<Gateway>,
    stream: TcpStream,
    read: Bytes,
    connection_id: ConnectionId,
    bearer: Option<String>,
) -> impl Future<Output = ()> {
    let span = tracing::info_span!("connection", %connection_id);
    gateway.metrics.connections.inc();
    gateway.metrics.connections_opened.inc();
    let config = &gateway.config.session;
    let outbox = Outbox::new(config.queue_events, config.queue_bytes);
    // `read` shares hyper's whole read buffer: copy what the client sent, then let it go.
    let inbox = BytesMut::from(&read[..]);
    drop(read);
    let session = Session {
        bucket: TokenBucket::new(config.message_burst, clock_ms()),
        gateway,
        connection_id,
        outbox,
        channels: Vec::new(),
        user_id: None,
        identity: None,
        bearer,
        token_clock: None,
        stream,
        inbox,
        reassembly: Reassembly::default(),
        out: Vec::new(),
        replay: VecDeque::new(),
        written: Vec::new(),
        closing: None,
        close_sent: false,
        partial_since: None,
        format: Format::Native,
    };
    session.serve().instrument(span)
}

/// When a connection closes at shutdown: each at its own random moment within
/// `shutdown.close_window` (on the connection's own timer), so that thousands of clients do not
/// reconnect in the same millisecond.
fn closing_moment(gateway: &Gateway) -> Instant {
    let window = gateway.config.shutdown.close_window;
    Instant::now() + window.mul_f64(rand::random::<f64>())
}

/// A connection's id, random, shown as 16 hex digits (in `welcome`, logs and traces). Kept as
/// its number: as text it would be one more allocation held by every connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionId(u64);

impl ConnectionId {
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Milliseconds of the process's clock, wrapping, for the connections' message rate.
fn clock_ms() -> u32 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u32
}

/// When a connection's token runs out: `token_expiring` is sent at `warn_at`, and without a
/// `refresh` the connection closes with 4004 at `expires_at` (the token's `exp` plus the leeway).
struct TokenClock {
    warn_at: Instant,
    expires_at: Instant,
    warned: bool,
}

impl TokenClock {
    fn new(expires: std::time::SystemTime, leeway: Duration) -> Self {
        let now = Instant::now();
        let system_now = std::time::SystemTime::now();
        let left = expires.duration_since(system_now).unwrap_or_default();
        // The token ends at exp plus the leeway, once: a token accepted within the leeway after
        // its exp does not get the leeway again. (At most a year: a far `exp` is not a far close.)
        let year = Duration::from_secs(365 * 24 * 3600);
        let until_close = expires
            .checked_add(leeway)
            .unwrap_or(expires)
            .duration_since(system_now)
            .unwrap_or_default()
            .min(year);
        let expires_at = now + until_close;
        // A minute ahead, or half the token's remaining life when it is shorter.
        let warn_at = now
            + left
                .min(year)
                .saturating_sub(Duration::from_secs(60).min(left / 2));
        Self {
            warn_at,
            expires_at,
            warned: false,
        }
    }

    fn next(&self) -> Instant {
        if self.warned {
            self.expires_at
        } else {
            self.warn_at
        }
    }
}

struct Session {
    gateway: Arc<Gateway>,
    connection_id: ConnectionId,
    outbox: Arc<Outbox>,
    /// The user channel (first, once hello is done) and the subscribed threads.
    channels: Vec<ChannelName>,
    /// Set by the hello.
    user_id: Option<String>,
    /// What the connection's token says, with browser authentication, and when it runs out.
    identity: Option<Box<Identity>>,
    /// The token sent with the upgrade, until `hello` uses it.
    bearer: Option<String>,
    token_clock: Option<TokenClock>,
    stream: TcpStream,
    /// Bytes read and not yet parsed; empty (and unallocated) on an idle connection.
    inbox: BytesMut,
    /// A fragmented message being assembled.
    reassembly: Reassembly,
    /// Frames encoded for the next write.
    out: Vec<u8>,
    /// The rest of a replay that did not fit in one flush; written before anything queued after it.
    replay: VecDeque<Arc<StoredEvent>>,
    /// Events in the current flush, marked delivered once it is written, each with how it was
    /// queued (live or replay).
    written: Vec<(Arc<StoredEvent>, DeliveryPath)>,
    /// The close frame the session decided on; written after what is queued.
    closing: Option<(u16, &'static str)>,
    /// The close frame was written to the socket (and our side shut down).
    close_sent: bool,
    /// The client's message rate (`session.message_rate`, `session.message_burst`).
    bucket: TokenBucket,
    /// Since when a begun frame or fragmented message waits for its end (`session.frame_timeout`).
    partial_since: Option<Instant>,
    /// Native frames or AG-UI (chosen by `hello.protocol`).
    format: Format,
}

impl Session {
    /// Not `async fn serve(mut self)`: that would keep the session twice in the future (the
    /// argument and its `mut` binding); the block below holds the one it captured.
    #[expect(
        clippy::manual_async_fn,
        reason = "`async fn` with `mut self` holds the session twice"
    )]
    fn serve(mut self) -> impl Future<Output = ()> {
        async move { self.serve_to_end().await }
    }

    async fn serve_to_end(&mut self) {
        let gateway = Arc::clone(&self.gateway);
        let ended = self.run().await;
        self.outbox.close();
        // Boxed: the unsubscribe may wait on the Redis broker's queue, and that state inline would
        // grow every connection's task for its whole life, not just while it leaves.
        Box::pin(self.leave_all()).await;
        if ended == Ended::SlowConsumer {
            let close = match self.close_sent {
                true => CloseSent::Sent,
                false => CloseSent::NotSent,
            };
            crate::metrics::count(&gateway.metrics.slow_consumer_closes, close);
            tracing::info!(
                reason = ended.as_str(),
                close = close.as_str(),
                "Closed a slow consumer (4008); it can resume from history."
            );
        } else {
            tracing::debug!(reason = ended.as_str(), "Connection ended.");
        }
        gateway
            .metrics
            .connections_closed
            .with_label_values(&[ended.as_str()])
            .inc();
        gateway.metrics.connections.dec();
        // Boxed for the same reason: it runs once, after everything else.
        Box::pin(self.linger()).await;
    }

    async fn run(&mut self) -> Ended {
        // A clone of the handle, not of the configuration: the task holds it for its whole life.
        let gateway = Arc::clone(&self.gateway);
        let config = &gateway.config.session;
        let limit = config.write_timeout;
        let started = Instant::now();
        // `last_write`: the last data the client's application sees (pings are invisible to it);
        // `last_ping`: the last WebSocket ping, due every heartbeat whatever was written.
        let (mut last_read, mut last_write, mut last_ping) = (started, started, started);
        // The last write that held an event: events close together keep the buffers (`BUSY`).
        let mut last_event: Option<Instant> = None;
        // The ends of a connection (`finish`, `close_now`) are boxed where they are awaited: they
        // run once, and inline they would size the task for its whole life.
        // The session's one timer. It is moved earlier when a deadline comes closer, never later:
        // a deadline pushed back by traffic lets it fire early, find nothing due and be set again,
        // at most once a heartbeat, instead of being reset for every event.
        let timer = tokio::time::sleep_until(started + config.hello_timeout);
        tokio::pin!(timer);
        // At shutdown the connection closes at its `closing_moment`.
        let shutdown = gateway.shutdown.close.raised();
        tokio::pin!(shutdown);
        let mut closing_at: Option<Instant> = None;
        // Whether the deadlines are to be looked at again. What brings one closer (a message read,
        // the timer firing, shutdown) comes through a wake other than the queue's; after a wake by
        // the queue alone they only moved later, and the timer (never moved later) stands.
        let mut rearm = true;
        loop {
            let ended = self.read_messages().await;
            self.partial_since = match !self.inbox.is_empty() || self.reassembly.in_progress() {
                true => Some(self.partial_since.unwrap_or_else(Instant::now)),
                false => None,
            };
            if self.outbox.is_overflowed() {
                return Box::pin(self.close_now(
                    close::SLOW_CONSUMER,
                    "slow_consumer",
                    Ended::SlowConsumer,
                    limit,
                ))
                .await;
            }
            if let Some(ended) = ended {
                return Box::pin(self.finish(ended, limit)).await;
            }
            let flushed = match self.flush(limit).await {
                Ok(flushed) => flushed,
                Err(ended) => return ended,
            };
            let mut busy = false;
            if flushed.wrote {
                let now = Instant::now();
                busy = flushed.events && last_event.is_some_and(|at| now - at < write::BUSY);
                if flushed.events {
                    last_event = Some(now);
                }
                last_write = now;
            }
            let more = flushed.more;
            match (more, busy) {
                (true, _) => {}
                (false, true) => self.trim_buffers(),
                (false, false) => self.release_buffers(),
            }
            if rearm || timer.is_elapsed() {
                let deadline = if self.user_id.is_some() {
                    let deadline = (last_write.min(last_ping) + config.heartbeat)
                        .min(last_read + config.client_timeout);
                    self.token_clock
                        .as_ref()
                        .map_or(deadline, |clock| deadline.min(clock.next()))
                } else {
                    started + config.hello_timeout
                };
                let deadline = self
                    .partial_since
                    .map_or(deadline, |since| deadline.min(since + config.frame_timeout));
                let deadline = closing_at.map_or(deadline, |at| deadline.min(at));
                if timer.is_elapsed() || deadline < timer.deadline() {
                    timer.as_mut().reset(deadline);
                }
            }
            let woke = {
                let queued = self.outbox.ready();
                tokio::pin!(queued);
                let stream = &self.stream;
                let mut first = true;
                std::future::poll_fn(|cx| {
                    // Woken again, by an event queued nearly always: the other waits were set on
                    // this wait's first poll, just before, and the next wait's first poll (after
                    // this event's flush) looks at each of them, so none waits longer than one
                    // flush. That saves polling three waits for every event delivered.
                    let again = !std::mem::replace(&mut first, false);
                    if again && !more && queued.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Queued);
                    }
                    if closing_at.is_none() && shutdown.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Shutdown);
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Timer);
                    }
                    // The socket's one reader slot, not a waiter list: no registration to undo.
                    if let Poll::Ready(readable) = stream.poll_read_ready(cx) {
                        return Poll::Ready(Woke::Readable(readable));
                    }
                    // More is queued than one flush takes: go round again at once.
                    if more || queued.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woke::Queued);
                    }
                    Poll::Pending
                })
                .await
            };
            rearm = !matches!(woke, Woke::Queued);
            match woke {
                Woke::Shutdown => {
                    closing_at = Some(closing_moment(&gateway));
                }
                Woke::Timer => {
                    // The timer may fire early (see above): every check compares with now.
                    let now = Instant::now();
                    // It fires at least once a heartbeat: what a busy connection kept goes back
                    // once it is quiet.
                    if !self.has_output() {
                        self.release_buffers();
                    }
                    if closing_at.is_some_and(|at| now >= at) {
                        return Box::pin(self.close_now(
                            close::RESTARTING,
                            "restarting",
                            Ended::Shutdown,
                            limit,
                        ))
                        .await;
                    }
                    if self
                        .partial_since
                        .is_some_and(|since| now >= since + config.frame_timeout)
                    {
                        return Box::pin(self.close_now(
                            close::POLICY,
                            "frame_timeout",
                            Ended::FrameTimeout,
                            limit,
                        ))
                        .await;
                    }
                    if self.user_id.is_none() {
                        if now >= started + config.hello_timeout {
                            return Box::pin(self.close_now(
                                close::HELLO_MISSING,
                                "hello_timeout",
                                Ended::HelloTimeout,
                                limit,
                            ))
                            .await;
                        }
                        continue;
                    }
                    if let Some(clock) = &mut self.token_clock {
                        if now >= clock.expires_at {
                            return Box::pin(self.close_now(
                                close::TOKEN_EXPIRED,
                                "token_expired",
                                Ended::TokenExpired,
                                limit,
                            ))
                            .await;
                        }
                        if !clock.warned && now >= clock.warn_at {
                            clock.warned = true;
                            let left = clock.expires_at.saturating_duration_since(now);
                            self.outbox.push(Outgoing::Frame(server::token_expiring(
                                left.as_millis() as u64,
                            )));
                        }
                    }
                    if now >= last_read + config.client_timeout {
                        return Box::pin(self.close_now(
                            close::GOING_AWAY,
                            "client_timeout",
                            Ended::ClientTimeout,
                            limit,
                        ))
                        .await;
                    }
                    // The heartbeat frame keeps a quiet stream alive for proxies and lets the page
                    // see the connection; the ping goes out every heartbeat, busy or not, so a
                    // client that only listens can prove it is there by answering it.
                    let quiet = now >= last_write + config.heartbeat;
                    if quiet || now >= last_ping + config.heartbeat {
                        if quiet {
                            frame::encode(&mut self.out, frame::TEXT, &server::heartbeat());
                        }
                        frame::encode(&mut self.out, frame::PING, b"");
                        if let Err(ended) = self.write_out(limit).await {
                            return ended;
                        }
                        if quiet {
                            last_write = now;
                        }
                        last_ping = now;
                    }
                }
                Woke::Readable(readable) => {
                    if readable.is_err() {
                        return Ended::ClientGone;
                    }
                    if self.inbox.capacity() - self.inbox.len() < 512 {
                        self.inbox.reserve(4096);
                    }
                    match self.stream.try_read_buf(&mut self.inbox) {
                        Ok(0) => return Ended::ClientGone,
                        Ok(_) => last_read = Instant::now(),
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return Ended::ClientGone,
                    }
                }
                Woke::Queued => {}
            }
        }
    }

    /// Parses and handles every complete message in the read buffer. `Some` when the connection
    /// must end (with the close frame in `closing`).
    async fn read_messages(&mut self) -> Option<Ended> {
        loop {
            // Until hello is accepted the peer is nobody: its frames get the small limit.
            let config = &self.gateway.config.session;
            let max_bytes = match self.user_id {
                Some(_) => config.max_frame_bytes,
                None => config.max_hello_bytes,
            };
            let raw = match frame::parse(&mut self.inbox, max_bytes) {
                Ok(Some(raw)) => raw,
                Ok(None) => return None,
                Err(FrameError::TooLarge) => {
                    return Some(self.close(close::TOO_LARGE, "frame_too_large", Ended::TooLarge));
                }
                Err(FrameError::Protocol) => {
                    return Some(self.close(1002, "protocol_error", Ended::ProtocolError));
                }
            };
            if !self
                .bucket
                .take(config.message_rate, config.message_burst, clock_ms())
            {
                self.error(
                    ErrorCode::RateLimited,
                    "more messages than session.message_rate allows; reconnect later",
                );
                return Some(self.close(close::RATE_LIMITED, "rate_limited", Ended::RateLimited));
            }
            let message = match self.reassembly.push(raw, max_bytes) {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(AssemblyError::TooLarge) => {
                    return Some(self.close(close::TOO_LARGE, "frame_too_large", Ended::TooLarge));
                }
                Err(AssemblyError::Protocol) => {
                    return Some(self.close(1002, "protocol_error", Ended::ProtocolError));
                }
                Err(AssemblyError::InvalidUtf8) => {
                    return Some(self.close(
                        close::INVALID_DATA,
                        "invalid_utf8",
                        Ended::InvalidUtf8,
                    ));
                }
            };
            // Boxed: answering a message may await Redis (subscribe, HLink), and that state inline
            // would grow every connection's task for its whole life, not just while it answers.
            if let Some(ended) = Box::pin(self.handle(message)).await {
                return Some(ended);
            }
        }
    }
}

/// What ended a session's wait.
enum Woke {
    Shutdown,
    Timer,
    Readable(std::io::Result<()>),
    Queued,
}

/// Marks the events of a write that the client's socket (or SSE response) took as delivered:
/// the first write of each is its delivery in the ledger.
fn delivered(
    gateway: &Gateway,
    written: &mut Vec<(Arc<StoredEvent>, DeliveryPath)>,
    connection_id: ConnectionId,
) {
    let metrics = &gateway.metrics;
    metrics.fanout_frames_sent.inc_by(written.len() as u64);
    for (event, path) in written.drain(..) {
        event.delivered(metrics, path);
        if let Some(trace) = &event.trace {
            crate::telemetry::delivered(trace, event.seq, connection_id);
        }
    }
}
