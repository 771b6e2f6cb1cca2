//! The session's writing side: what is queued is encoded into one buffer and written in one
//! syscall per flush (64 KiB at most), deliveries are marked once written, and the close frame goes
//! last, followed by a short linger for the client's close.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::ended::Ended;
use super::{FLUSH_BYTES, LINGER, Session, frame};
use crate::fanout::Outgoing;
use crate::metrics::DeliveryPath;
use crate::protocol::server::close;

impl Session {
    pub(super) fn has_output(&self) -> bool {
        !self.replay.is_empty() || !self.outbox.is_empty()
    }

    /// An idle connection keeps no buffer.
    pub(super) fn release_buffers(&mut self) {
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

    /// Encodes queued frames (a replay first) up to [`FLUSH_BYTES`] and writes them with one
    /// write; the events in it are marked delivered once it is written.
    pub(super) async fn flush(&mut self, limit: Duration) -> Result<(), Ended> {
        while self.out.len() < FLUSH_BYTES {
            if let Some(event) = self.replay.pop_front() {
                frame::encode(&mut self.out, frame::TEXT, &event.frame);
                self.written.push((event, DeliveryPath::Replay));
                continue;
            }
            match self.outbox.pop() {
                Some(Outgoing::Event(event)) => {
                    frame::encode(&mut self.out, frame::TEXT, &event.frame);
                    self.written.push((event, DeliveryPath::Live));
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
        for (event, path) in self.written.drain(..) {
            event.delivered(metrics, path);
            if let Some(trace) = &event.trace {
                crate::telemetry::delivered(trace, event.seq, &self.connection_id);
            }
        }
        Ok(())
    }

    /// Decides the close frame; it is written after what is queued (see [`Self::finish`]).
    pub(super) fn close(&mut self, code: u16, reason: &'static str, ended: Ended) -> Ended {
        self.closing.get_or_insert((code, reason));
        ended
    }

    /// Writes what is queued (one flush at most), then the close frame, and ends.
    pub(super) async fn finish(&mut self, ended: Ended, limit: Duration) -> Ended {
        if self.has_output()
            && let Err(by_writer) = self.flush(limit).await
        {
            return by_writer;
        }
        let (code, reason) = self.closing.unwrap_or((close::NORMAL, ""));
        self.close_now(code, reason, ended, limit).await
    }

    /// Writes a close frame ahead of anything queued, lets the client close its side, and ends.
    pub(super) async fn close_now(
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
    pub(super) async fn linger(&mut self) {
        if !self.closed_cleanly {
            return;
        }
        let mut sink = [0u8; 512];
        let _ = timeout(LINGER, async {
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}
