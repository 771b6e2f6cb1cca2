//! The connection writer: owns the socket's write half and drains the connection's bounded
//! queue, several frames per flush. It marks events delivered only after the flush, closes with
//! 4008 when fan-out found the queue full, with 1012 on shutdown, and sends a `heartbeat` frame
//! and a WebSocket ping when the connection has been quiet for `session.heartbeat`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketWrite};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc::Receiver;
use tokio::time::{MissedTickBehavior, timeout};

use super::Ended;
use crate::Gateway;
use crate::broker::StoredEvent;
use crate::fanout::{Outbox, Outgoing};
use crate::protocol::server::{self, close};

/// Frames written per flush at most, so a long queue still yields to shutdown and overflow.
const BATCH: usize = 64;

pub enum End {
    /// The writer ended the connection for this reason.
    Ended(Ended),
    /// The session's own close frame was written (or the session is gone); the reader's reason stands.
    Stopped,
}

pub async fn run<S: AsyncWrite + Unpin>(
    gateway: Arc<Gateway>,
    mut socket: WebSocketWrite<S>,
    mut queue: Receiver<Outgoing>,
    outbox: Arc<Outbox>,
    connection_id: String,
) -> End {
    let config = &gateway.config.session;
    let shutdown = gateway.shutdown.sessions.clone();
    // On shutdown, each connection closes at its own random moment within the close window.
    let window = gateway.config.shutdown.close_window;
    let close_time = async move {
        shutdown.cancelled().await;
        let jitter = window.mul_f64(rand::random::<f64>());
        tokio::time::sleep(jitter).await;
    };
    tokio::pin!(close_time);
    let mut heartbeat = tokio::time::interval(config.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut last_write = Instant::now();
    let mut written: Vec<Arc<StoredEvent>> = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = outbox.overflow().cancelled() => {
                return finish(&mut socket, close::SLOW_CONSUMER, "slow_consumer", Ended::SlowConsumer, config.write_timeout).await;
            }
            _ = &mut close_time => {
                return finish(&mut socket, close::RESTARTING, "restarting", Ended::Shutdown, config.write_timeout).await;
            }
            item = queue.recv() => match item {
                Some(item) => item,
                None => return End::Stopped,
            },
            _ = heartbeat.tick() => {
                if last_write.elapsed() >= config.heartbeat {
                    let beat = async {
                        write_text(&mut socket, &server::heartbeat()).await?;
                        socket.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b""))).await?;
                        socket.flush().await
                    };
                    if !matches!(timeout(config.write_timeout, beat).await, Ok(Ok(()))) {
                        return End::Ended(Ended::WriteFailed);
                    }
                    last_write = Instant::now();
                }
                continue;
            }
        };
        let batch = write_batch(&mut socket, first, &mut queue, &outbox, &mut written);
        match timeout(config.write_timeout, batch).await {
            Ok(Ok(Batch::Open)) => {}
            Ok(Ok(Batch::Closed)) => return End::Stopped,
            Ok(Err(_)) | Err(_) if outbox.overflow().is_cancelled() => {
                return End::Ended(Ended::SlowConsumer);
            }
            Ok(Err(_)) | Err(_) => return End::Ended(Ended::WriteFailed),
        }
        gateway
            .metrics
            .fanout_frames_sent
            .inc_by(written.len() as u64);
        for event in written.drain(..) {
            event.delivered(&gateway.metrics);
            if let Some(trace) = &event.trace {
                crate::telemetry::delivered(trace, event.seq, &connection_id);
            }
        }
        last_write = Instant::now();
    }
}

enum Batch {
    Open,
    Closed,
}

/// Writes `first` and whatever else is queued (up to [`BATCH`]), then flushes once.
async fn write_batch<S: AsyncWrite + Unpin>(
    socket: &mut WebSocketWrite<S>,
    first: Outgoing,
    queue: &mut Receiver<Outgoing>,
    outbox: &Outbox,
    written: &mut Vec<Arc<StoredEvent>>,
) -> Result<Batch, WebSocketError> {
    let mut next = Some(first);
    let mut count = 0;
    while let Some(item) = next {
        match item {
            Outgoing::Event(event) => {
                outbox.taken(event.frame.len());
                write_text(socket, &event.frame).await?;
                written.push(event);
            }
            Outgoing::Replay(events) => {
                for event in events {
                    write_text(socket, &event.frame).await?;
                    written.push(event);
                }
            }
            Outgoing::Frame(bytes) => write_text(socket, &bytes).await?,
            Outgoing::Pong(payload) => {
                socket
                    .write_frame(Frame::pong(Payload::Borrowed(&payload)))
                    .await?
            }
            Outgoing::Close(code, reason) => {
                socket
                    .write_frame(Frame::close(code, reason.as_bytes()))
                    .await?;
                socket.flush().await?;
                return Ok(Batch::Closed);
            }
        }
        count += 1;
        if count >= BATCH || outbox.overflow().is_cancelled() {
            break;
        }
        next = queue.try_recv().ok();
    }
    socket.flush().await?;
    Ok(Batch::Open)
}

async fn write_text<S: AsyncWrite + Unpin>(
    socket: &mut WebSocketWrite<S>,
    bytes: &[u8],
) -> Result<(), WebSocketError> {
    socket
        .write_frame(Frame::text(Payload::Borrowed(bytes)))
        .await
}

/// Sends a close frame (if the socket takes it in time) and ends.
async fn finish<S: AsyncWrite + Unpin>(
    socket: &mut WebSocketWrite<S>,
    code: u16,
    reason: &'static str,
    ended: Ended,
    limit: Duration,
) -> End {
    let close = async {
        socket
            .write_frame(Frame::close(code, reason.as_bytes()))
            .await?;
        socket.flush().await
    };
    if !matches!(timeout(limit, close).await, Ok(Ok(()))) {
        tracing::debug!(code, "The close frame could not be written in time.");
    }
    End::Ended(ended)
}
