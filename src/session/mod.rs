//! One WebSocket connection, served by one task: it reads and parses the client's frames (hello,
//! subscribe, ack…), and writes whatever fan-out queued in its [`Outbox`], every queued frame in one
//! syscall. The connection holds no buffer while idle. It ends on the client's close, a protocol
//! error, a full queue (4008), a missing hello (4001), silence (1001) or shutdown (1012); then its
//! subscriptions are removed.

mod frame;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use crate::Gateway;
use crate::broker::{HandOff, HandOffError};
use crate::fanout::{Outbox, Outgoing, StoredEvent};
use crate::metrics::Label;
use crate::protocol::ChannelName;
use crate::protocol::client::{self, ClientFrame, Since, UpstreamMessage};
use crate::protocol::server::{self, ErrorCode, close};
use crate::protocol::upstream::Outbound;
use crate::upstream::Refused;
use frame::{FrameError, Raw};

/// Bytes written per flush at most: a busy or replaying connection still reads, notices shutdown
/// and marks deliveries between flushes, and its write buffer stays small.
const FLUSH_BYTES: usize = 64 * 1024;
/// After its close frame, how long a connection waits for the client to close its side, so the
/// kernel does not answer unread bytes with a reset that would hide the close code.
const LINGER: Duration = Duration::from_secs(1);

/// Why a connection ended, as counted in `agentwire_connections_closed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    ClientClosed,
    /// The TCP connection ended without a close frame.
    ClientGone,
    HelloTimeout,
    HelloMissing,
    ClientTimeout,
    TooLarge,
    ProtocolError,
    SlowConsumer,
    Shutdown,
    WriteFailed,
}

impl crate::metrics::Label for Ended {
    const ALL: &'static [Self] = &[
        Self::ClientClosed,
        Self::ClientGone,
        Self::HelloTimeout,
        Self::HelloMissing,
        Self::ClientTimeout,
        Self::TooLarge,
        Self::ProtocolError,
        Self::SlowConsumer,
        Self::Shutdown,
        Self::WriteFailed,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::ClientGone => "client_gone",
            Self::HelloTimeout => "hello_timeout",
            Self::HelloMissing => "hello_missing",
            Self::ClientTimeout => "client_timeout",
            Self::TooLarge => "too_large",
            Self::ProtocolError => "protocol_error",
            Self::SlowConsumer => "slow_consumer",
            Self::Shutdown => "shutdown",
            Self::WriteFailed => "write_failed",
        }
    }
}

/// One message from the client, reassembled from its frames.
#[derive(Debug)]
enum Message {
    Text(String),
    Binary,
    Ping(Bytes),
    Pong,
    /// The client's close, with the code to echo.
    Close(u16),
}

/// Serves one upgraded connection until it ends. `read` holds bytes the client sent right after
/// its handshake, before the upgrade completed.
pub async fn serve(gateway: Arc<Gateway>, stream: TcpStream, read: Bytes, connection_id: String) {
    let span = tracing::info_span!("connection", %connection_id);
    async move {
        gateway.metrics.connections.inc();
        gateway.metrics.connections_opened.inc();
        let config = &gateway.config.session;
        let outbox = Outbox::new(config.queue_events, config.queue_bytes);
        // `read` shares hyper's whole read buffer: copy what the client sent, then let it go.
        let inbox = BytesMut::from(&read[..]);
        drop(read);
        let mut session = Session {
            gateway: Arc::clone(&gateway),
            connection_id,
            outbox,
            channels: Vec::new(),
            user_id: None,
            stream,
            inbox,
            partial: None,
            out: Vec::new(),
            replay: VecDeque::new(),
            written: Vec::new(),
            closing: None,
            closed_cleanly: false,
        };
        let ended = session.run().await;
        session.outbox.close();
        session.leave_all();
        if ended == Ended::SlowConsumer {
            gateway.metrics.slow_consumer_closes.inc();
            tracing::info!(
                reason = ended.as_str(),
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
        session.linger().await;
    }
    .instrument(span)
    .await
}

struct Session {
    gateway: Arc<Gateway>,
    connection_id: String,
    outbox: Arc<Outbox>,
    /// The user channel (first, once hello is done) and the subscribed threads.
    channels: Vec<ChannelName>,
    /// Set by the hello.
    user_id: Option<String>,
    stream: TcpStream,
    /// Bytes read and not yet parsed; empty (and unallocated) on an idle connection.
    inbox: BytesMut,
    /// A fragmented message being assembled: whether it is text, and its bytes so far.
    partial: Option<(bool, Vec<u8>)>,
    /// Frames encoded for the next write.
    out: Vec<u8>,
    /// The rest of a replay that did not fit in one flush; written before anything queued after it.
    replay: VecDeque<Arc<StoredEvent>>,
    /// Events in the current flush, marked delivered once it is written.
    written: Vec<Arc<StoredEvent>>,
    /// The close frame the session decided on; written after what is queued.
    closing: Option<(u16, &'static str)>,
    /// The close frame was written and our side shut down.
    closed_cleanly: bool,
}

impl Session {
    async fn run(&mut self) -> Ended {
        let config = self.gateway.config.session.clone();
        let limit = config.write_timeout;
        let started = Instant::now();
        let (mut last_read, mut last_write) = (started, started);
        // On shutdown, each connection closes at its own random moment within the close window.
        let shutdown = self.gateway.shutdown.sessions.clone();
        let window = self.gateway.config.shutdown.close_window;
        let close_time = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(window.mul_f64(rand::random::<f64>())).await;
        };
        tokio::pin!(close_time);
        loop {
            let ended = self.read_messages(config.max_frame_bytes).await;
            if self.outbox.is_overflowed() {
                return self
                    .close_now(
                        close::SLOW_CONSUMER,
                        "slow_consumer",
                        Ended::SlowConsumer,
                        limit,
                    )
                    .await;
            }
            if let Some(ended) = ended {
                return self.finish(ended, limit).await;
            }
            if self.has_output() {
                match self.flush(limit).await {
                    Ok(()) => last_write = Instant::now(),
                    Err(ended) => return ended,
                }
            }
            let more = self.has_output();
            if !more {
                self.release_buffers();
            }
            let deadline = if self.user_id.is_some() {
                (last_write + config.heartbeat).min(last_read + config.client_timeout)
            } else {
                started + config.hello_timeout
            };
            tokio::select! {
                biased;
                _ = &mut close_time => {
                    return self.close_now(close::RESTARTING, "restarting", Ended::Shutdown, limit).await;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    if self.user_id.is_none() {
                        return self.close_now(close::HELLO_MISSING, "hello_timeout", Ended::HelloTimeout, limit).await;
                    }
                    if now >= last_read + config.client_timeout {
                        return self.close_now(close::GOING_AWAY, "client_timeout", Ended::ClientTimeout, limit).await;
                    }
                    if now >= last_write + config.heartbeat {
                        let mut beat = Vec::with_capacity(32);
                        frame::encode(&mut beat, frame::TEXT, &server::heartbeat());
                        frame::encode(&mut beat, frame::PING, b"");
                        if !matches!(timeout(limit, self.stream.write_all(&beat)).await, Ok(Ok(()))) {
                            return Ended::WriteFailed;
                        }
                        last_write = now;
                    }
                }
                readable = self.stream.readable() => {
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
                // More is queued than one flush takes: go round again at once.
                _ = std::future::ready(()), if more => {}
                _ = self.outbox.ready(), if !more => {}
            }
        }
    }

    fn has_output(&self) -> bool {
        !self.replay.is_empty() || !self.outbox.is_empty()
    }

    /// An idle connection keeps no buffer.
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
        if self.inbox.is_empty() && self.inbox.capacity() > 0 {
            self.inbox = BytesMut::new();
        }
    }

    /// Parses and handles every complete message in the read buffer. `Some` when the connection
    /// must end (with the close frame in `closing`).
    async fn read_messages(&mut self, max_bytes: usize) -> Option<Ended> {
        loop {
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
            let message = match self.assemble(raw, max_bytes) {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(ended) => return Some(ended),
            };
            // Boxed: answering a message may await Redis (subscribe, HLink), and that state inline
            // would grow every connection's task for its whole life, not just while it answers.
            if let Some(ended) = Box::pin(self.handle(message)).await {
                return Some(ended);
            }
        }
    }

    /// Reassembles fragmented messages within the size limit.
    fn assemble(&mut self, raw: Raw, max_bytes: usize) -> Result<Option<Message>, Ended> {
        let finish = |text: bool, bytes: Vec<u8>| {
            if !text {
                return Ok(Message::Binary);
            }
            String::from_utf8(bytes).map(Message::Text).map_err(|_| ())
        };
        let message = match raw.opcode {
            frame::TEXT | frame::BINARY => {
                if self.partial.is_some() {
                    return Err(self.close(1002, "protocol_error", Ended::ProtocolError));
                }
                let text = raw.opcode == frame::TEXT;
                if !raw.fin {
                    self.partial = Some((text, raw.payload.to_vec()));
                    return Ok(None);
                }
                finish(text, raw.payload.to_vec())
            }
            frame::CONTINUATION => {
                let Some((text, mut bytes)) = self.partial.take() else {
                    return Err(self.close(1002, "protocol_error", Ended::ProtocolError));
                };
                bytes.extend_from_slice(&raw.payload);
                if bytes.len() > max_bytes {
                    return Err(self.close(close::TOO_LARGE, "frame_too_large", Ended::TooLarge));
                }
                if !raw.fin {
                    self.partial = Some((text, bytes));
                    return Ok(None);
                }
                finish(text, bytes)
            }
            // Copied: a shared slice would pin the whole read buffer while the pong waits.
            frame::PING => Ok(Message::Ping(Bytes::copy_from_slice(&raw.payload))),
            frame::PONG => Ok(Message::Pong),
            _ => frame::close_code(&raw.payload)
                .map(Message::Close)
                .map_err(|_| ()),
        };
        match message {
            Ok(message) => Ok(Some(message)),
            Err(()) => Err(self.close(1002, "protocol_error", Ended::ProtocolError)),
        }
    }

    /// Answers one message; `Some` when the connection ends.
    async fn handle(&mut self, message: Message) -> Option<Ended> {
        match message {
            Message::Text(text) if self.user_id.is_some() => self.frame(&text).await,
            Message::Text(text) => match client::decode(&text) {
                Ok(ClientFrame::Hello { user_id, since }) => self.hello(&user_id, since).await,
                _ => {
                    self.error(
                        ErrorCode::HelloRequired,
                        "the first frame must be {\"type\":\"hello\",\"user_id\":…}",
                    );
                    return Some(self.close(
                        close::HELLO_MISSING,
                        "hello_required",
                        Ended::HelloMissing,
                    ));
                }
            },
            Message::Binary if self.user_id.is_some() => self.error(
                ErrorCode::BinaryNotSupported,
                "frames are JSON text; binary frames are not read",
            ),
            Message::Binary => {
                self.error(
                    ErrorCode::HelloRequired,
                    "the first frame must be a text hello frame",
                );
                return Some(self.close(
                    close::HELLO_MISSING,
                    "hello_required",
                    Ended::HelloMissing,
                ));
            }
            Message::Ping(payload) => {
                self.outbox.push(Outgoing::Pong(payload));
            }
            Message::Pong => {}
            Message::Close(code) => {
                // The browser discards anything after its close: nothing more is written or counted.
                self.outbox.close();
                self.replay.clear();
                return Some(self.close(code, "", Ended::ClientClosed));
            }
        }
        None
    }

    /// Decides the close frame; it is written after what is queued (see [`Self::finish`]).
    fn close(&mut self, code: u16, reason: &'static str, ended: Ended) -> Ended {
        self.closing.get_or_insert((code, reason));
        ended
    }

    /// Writes what is queued (one flush at most), then the close frame, and ends.
    async fn finish(&mut self, ended: Ended, limit: Duration) -> Ended {
        if self.has_output()
            && let Err(by_writer) = self.flush(limit).await
        {
            return by_writer;
        }
        let (code, reason) = self.closing.unwrap_or((close::NORMAL, ""));
        self.close_now(code, reason, ended, limit).await
    }

    /// Writes a close frame ahead of anything queued, lets the client close its side, and ends.
    async fn close_now(
        &mut self,
        code: u16,
        reason: &'static str,
        ended: Ended,
        limit: Duration,
    ) -> Ended {
        self.outbox.close();
        let mut out = Vec::with_capacity(32);
        frame::encode_close(&mut out, code, reason);
        let closed = async {
            self.stream.write_all(&out).await?;
            self.stream.shutdown().await
        };
        if !matches!(timeout(limit, closed).await, Ok(Ok(()))) {
            tracing::debug!(code, "The close frame could not be written in time.");
            return ended;
        }
        self.closed_cleanly = true;
        ended
    }

    /// After a close frame: read until the client closes too (or briefly), so unread bytes do not
    /// make the kernel answer with a reset that would hide the close code.
    async fn linger(&mut self) {
        if !self.closed_cleanly {
            return;
        }
        let mut sink = [0u8; 512];
        let _ = timeout(LINGER, async {
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    /// Encodes queued frames (a replay first) up to [`FLUSH_BYTES`] and writes them with one
    /// write; the events in it are marked delivered once it is written.
    async fn flush(&mut self, limit: Duration) -> Result<(), Ended> {
        while self.out.len() < FLUSH_BYTES {
            if let Some(event) = self.replay.pop_front() {
                frame::encode(&mut self.out, frame::TEXT, &event.frame);
                self.written.push(event);
                continue;
            }
            match self.outbox.pop() {
                Some(Outgoing::Event(event)) => {
                    frame::encode(&mut self.out, frame::TEXT, &event.frame);
                    self.written.push(event);
                }
                Some(Outgoing::Replay(events)) => self.replay.extend(events),
                Some(Outgoing::Frame(bytes)) => frame::encode(&mut self.out, frame::TEXT, &bytes),
                Some(Outgoing::Pong(payload)) => {
                    frame::encode(&mut self.out, frame::PONG, &payload)
                }
                None => break,
            }
        }
        let wrote = timeout(limit, self.stream.write_all(&self.out)).await;
        self.out.clear();
        if !matches!(wrote, Ok(Ok(()))) {
            self.written.clear();
            return Err(if self.outbox.is_overflowed() {
                Ended::SlowConsumer
            } else {
                Ended::WriteFailed
            });
        }
        let metrics = &self.gateway.metrics;
        metrics.fanout_frames_sent.inc_by(self.written.len() as u64);
        for event in self.written.drain(..) {
            event.delivered(metrics);
            if let Some(trace) = &event.trace {
                crate::telemetry::delivered(trace, event.seq, &self.connection_id);
            }
        }
        Ok(())
    }

    async fn hello(&mut self, user_id: &str, since: Option<Since>) {
        self.user_id = Some(user_id.to_string());
        let heartbeat_ms = self.gateway.config.session.heartbeat.as_millis() as u64;
        self.outbox.push(Outgoing::Frame(server::welcome(
            &self.connection_id,
            user_id,
            heartbeat_ms,
        )));
        tracing::debug!(user_id, "Hello.");
        self.join(ChannelName::user(user_id), since).await;
    }

    async fn frame(&mut self, text: &str) {
        match client::decode(text) {
            Ok(ClientFrame::Hello { .. }) => self.error(
                ErrorCode::AlreadyHello,
                "hello was already accepted on this connection",
            ),
            Ok(ClientFrame::Subscribe { thread_id, since }) => {
                let thread_count = self.channels.len().saturating_sub(1);
                if thread_count >= self.gateway.config.session.max_subscriptions {
                    return self.error(
                        ErrorCode::TooManySubscriptions,
                        "session.max_subscriptions reached",
                    );
                }
                self.join(ChannelName::thread(&thread_id), since).await;
            }
            Ok(ClientFrame::Unsubscribe { thread_id }) => {
                let channel = ChannelName::thread(&thread_id);
                if self.gateway.broker.unsubscribe(&channel, &self.outbox) {
                    self.channels.retain(|c| c != &channel);
                    self.gateway.metrics.subscriptions.dec();
                    self.outbox
                        .push(Outgoing::Frame(server::unsubscribed(&thread_id)));
                } else {
                    self.error(
                        ErrorCode::NotSubscribed,
                        &format!("not subscribed to {channel}"),
                    );
                }
            }
            Ok(ClientFrame::Ack { channel, seq }) => {
                if let Err(error) = self.gateway.broker.ack(&channel, seq, &self.outbox) {
                    self.error(ErrorCode::InvalidAck, &error.to_string());
                }
            }
            Ok(ClientFrame::Ping) => {
                self.outbox.push(Outgoing::Frame(server::pong()));
            }
            Ok(ClientFrame::Upstream(message)) => self.upstream(*message).await,
            Err(error) => {
                if client::is_upstream_frame(text) {
                    self.gateway
                        .metrics
                        .upstream_messages
                        .with_label_values(&["invalid"])
                        .inc();
                }
                self.error(error.code, &error.message)
            }
        }
    }

    /// Passes an HLink message to the agent backends (the broker decides where: the webhook
    /// queue, or the `ui_events` stream whose entry id the ack carries); the client gets
    /// `websocket_ack` or an error.
    async fn upstream(&mut self, message: UpstreamMessage) {
        let client_id = message.id.clone();
        let user_id = self.user_id.clone().unwrap_or_default();
        let outbound = Outbound::new(message, &user_id, &self.connection_id);
        let message_id = outbound.message_id.clone();
        match self
            .gateway
            .broker
            .hand_off(outbound, &self.gateway.metrics)
            .await
        {
            Ok(handed) => {
                let entry_id = match &handed {
                    HandOff::Queued => None,
                    HandOff::Appended(entry_id) => Some(entry_id.as_str()),
                };
                self.outbox.push(Outgoing::Frame(server::websocket_ack(
                    &message_id,
                    client_id.as_deref(),
                    entry_id,
                )));
            }
            Err(HandOffError::Refused(Refused::NotConfigured)) => self.error(
                ErrorCode::UpstreamNotConfigured,
                "HLink messages need an upstream (upstream.webhook_url); none is configured",
            ),
            Err(HandOffError::Refused(Refused::Busy)) => {
                self.error(ErrorCode::UpstreamBusy, &Refused::Busy.to_string())
            }
            Err(HandOffError::Broker(error)) => {
                self.error(ErrorCode::BrokerUnavailable, &error.to_string())
            }
        }
    }

    async fn join(&mut self, channel: ChannelName, since: Option<Since>) {
        match self
            .gateway
            .broker
            .subscribe(&channel, since.as_ref(), &self.outbox)
            .await
        {
            Err(error) => self.error(
                ErrorCode::BrokerUnavailable,
                &format!("cannot subscribe to {channel}: {error}"),
            ),
            Ok(Some(report)) => {
                self.gateway.metrics.subscriptions.inc();
                if since.is_some() {
                    let outcome = if report.recovered {
                        "recovered"
                    } else {
                        "not_recovered"
                    };
                    self.gateway
                        .metrics
                        .resumes
                        .with_label_values(&[outcome])
                        .inc();
                    tracing::debug!(%channel, outcome, replayed = report.replayed, missed = report.missed, "Resumed.");
                }
                self.channels.push(channel);
            }
            Ok(None) => self.error(
                ErrorCode::AlreadySubscribed,
                &format!("already subscribed to {channel}"),
            ),
        }
    }

    /// The one place an error frame is sent and counted.
    fn error(&self, code: ErrorCode, message: &str) {
        self.gateway
            .metrics
            .client_errors
            .with_label_values(&[code.as_str()])
            .inc();
        tracing::debug!(code = code.as_str(), message, "Sent an error frame.");
        self.outbox
            .push(Outgoing::Frame(server::error(code, message)));
    }

    fn leave_all(&mut self) {
        for channel in self.channels.drain(..) {
            if self.gateway.broker.unsubscribe(&channel, &self.outbox) {
                self.gateway.metrics.subscriptions.dec();
            }
        }
    }
}
