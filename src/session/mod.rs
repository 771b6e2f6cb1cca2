//! One WebSocket connection: the hello, subscriptions, acks and the client's frames. The socket
//! is split: this task reads, [`writer`] owns the write half and everything queued for it. The
//! session ends when either side ends; then its subscriptions are removed.

mod read;
mod writer;

use std::sync::Arc;

use fastwebsockets::{WebSocket, WebSocketRead};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{BufWriter, ReadHalf};
use tracing::Instrument;

use crate::Gateway;
use crate::fanout::{Outbox, Outgoing};
use crate::protocol::ChannelName;
use crate::protocol::client::{self, ClientFrame, Since};
use crate::protocol::server::{self, ErrorCode, close};
use read::Message;

type Socket = TokioIo<Upgraded>;

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

impl Ended {
    pub fn as_str(self) -> &'static str {
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

/// Serves one upgraded connection until it ends.
pub async fn serve(gateway: Arc<Gateway>, ws: WebSocket<Socket>, connection_id: String) {
    let span = tracing::info_span!("connection", %connection_id);
    async move {
        gateway.metrics.connections.inc();
        gateway.metrics.connections_opened.inc();
        let (mut read, write) = ws.split(|socket| {
            let (read, write) = tokio::io::split(socket);
            (read, BufWriter::new(write))
        });
        let config = &gateway.config.session;
        let (outbox, queue) = Outbox::new(config.queue_events, config.queue_bytes);
        let mut writer = tokio::spawn(
            writer::run(
                Arc::clone(&gateway),
                write,
                queue,
                Arc::clone(&outbox),
                connection_id.clone(),
            )
            .in_current_span(),
        );
        let mut session = Session {
            gateway: Arc::clone(&gateway),
            connection_id,
            outbox,
            channels: Vec::new(),
        };
        let ended = tokio::select! {
            ended = session.read(&mut read) => {
                if ended == Ended::ClientGone {
                    // Nobody to write to: stop the writer where it stands.
                    writer.abort();
                    ended
                } else {
                    // The reader queued its close frame; the writer sends it and stops.
                    match (&mut writer).await {
                        Ok(writer::End::Stopped) | Err(_) => ended,
                        Ok(writer::End::Ended(by_writer)) => by_writer,
                    }
                }
            }
            writer_end = &mut writer => match writer_end {
                Ok(writer::End::Ended(ended)) => ended,
                Ok(writer::End::Stopped) | Err(_) => Ended::WriteFailed,
            },
        };
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
}

impl Session {
    /// Reads until the connection should end; queues the close frame it ends with.
    async fn read(&mut self, socket: &mut WebSocketRead<ReadHalf<Socket>>) -> Ended {
        let config = self.gateway.config.session.clone();
        read::configure(socket, config.max_frame_bytes);
        let mut reader = read::Reader::new(config.max_frame_bytes);

        // The hello phase: one frame, within hello_timeout.
        let first = tokio::time::timeout(config.hello_timeout, reader.next(socket)).await;
        match first {
            Err(_) => {
                return self.close(close::HELLO_MISSING, "hello_timeout", Ended::HelloTimeout);
            }
            Ok(Message::Text(text)) => match client::decode(&text) {
                Ok(ClientFrame::Hello { user_id, since }) => self.hello(&user_id, since),
                _ => {
                    self.error(
                        ErrorCode::HelloRequired,
                        "the first frame must be {\"type\":\"hello\",\"user_id\":…}",
                    );
                    return self.close(close::HELLO_MISSING, "hello_required", Ended::HelloMissing);
                }
            },
            Ok(Message::Binary) => {
                self.error(
                    ErrorCode::HelloRequired,
                    "the first frame must be a text hello frame",
                );
                return self.close(close::HELLO_MISSING, "hello_required", Ended::HelloMissing);
            }
            Ok(other) => match self.control(other) {
                Some(ended) => return ended,
                None => {
                    return self.close(close::HELLO_MISSING, "hello_required", Ended::HelloMissing);
                }
            },
        }

        loop {
            let message = match tokio::time::timeout(config.client_timeout, reader.next(socket))
                .await
            {
                Ok(message) => message,
                Err(_) => {
                    return self.close(close::GOING_AWAY, "client_timeout", Ended::ClientTimeout);
                }
            };
            match message {
                Message::Text(text) => self.frame(&text),
                Message::Binary => self.error(
                    ErrorCode::BinaryNotSupported,
                    "frames are JSON text; binary frames are not read",
                ),
                other => {
                    if let Some(ended) = self.control(other) {
                        return ended;
                    }
                }
            }
        }
    }

    /// Ping, pong, close and read failures; `Some` when the connection ends.
    fn control(&mut self, message: Message) -> Option<Ended> {
        match message {
            Message::Ping(payload) => {
                self.outbox.push(Outgoing::Pong(payload));
                None
            }
            Message::Pong => None,
            Message::Close => Some(self.close(close::NORMAL, "", Ended::ClientClosed)),
            Message::TooLarge => {
                Some(self.close(close::TOO_LARGE, "frame_too_large", Ended::TooLarge))
            }
            Message::Invalid => Some(self.close(1002, "protocol_error", Ended::ProtocolError)),
            Message::Gone => Some(Ended::ClientGone),
            Message::Text(_) | Message::Binary => None,
        }
    }

    fn close(&self, code: u16, reason: &'static str, ended: Ended) -> Ended {
        self.outbox.push(Outgoing::Close(code, reason));
        ended
    }

    fn hello(&mut self, user_id: &str, since: Option<Since>) {
        let heartbeat_ms = self.gateway.config.session.heartbeat.as_millis() as u64;
        self.outbox.push(Outgoing::Frame(server::welcome(
            &self.connection_id,
            user_id,
            heartbeat_ms,
        )));
        tracing::debug!(user_id, "Hello.");
        self.join(ChannelName::user(user_id), since);
    }

    fn frame(&mut self, text: &str) {
        match client::decode(text) {
            Ok(ClientFrame::Hello { .. }) => self.error(ErrorCode::AlreadyHello, "hello was already accepted on this connection"),
            Ok(ClientFrame::Subscribe { thread_id, since }) => {
                let thread_count = self.channels.len().saturating_sub(1);
                if thread_count >= self.gateway.config.session.max_subscriptions {
                    return self.error(ErrorCode::TooManySubscriptions, "session.max_subscriptions reached");
                }
                self.join(ChannelName::thread(&thread_id), since);
            }
            Ok(ClientFrame::Unsubscribe { thread_id }) => {
                let channel = ChannelName::thread(&thread_id);
                if self.gateway.broker.unsubscribe(&channel, &self.outbox) {
                    self.channels.retain(|c| c != &channel);
                    self.gateway.metrics.subscriptions.dec();
                    self.outbox.push(Outgoing::Frame(server::unsubscribed(&thread_id)));
                } else {
                    self.error(ErrorCode::NotSubscribed, &format!("not subscribed to {channel}"));
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
            Ok(ClientFrame::Upstream { kind }) => self.error(
                ErrorCode::UpstreamNotConfigured,
                &format!("{kind} messages need an upstream (the Redis broker or a webhook); none is configured"),
            ),
            Err(error) => self.error(error.code, &error.message),
        }
    }

    fn join(&mut self, channel: ChannelName, since: Option<Since>) {
        match self
            .gateway
            .broker
            .subscribe(&channel, since.as_ref(), &self.outbox)
        {
            Some(report) => {
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
            None => self.error(
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
