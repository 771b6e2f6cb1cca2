//! The session's writing side: what is queued is encoded into one buffer and written in one
//! syscall per flush (64 KiB at most), deliveries are marked once written (a stalled write's
//! frames once its close frame went out after them), and the close frame goes last, followed by a
//! short linger for the client's close.
//!
//! A write that does not finish within `session.write_timeout` means the client stopped reading
//! (its receive window is full): the session ends as a slow consumer. Its close frame (4008) then
//! goes after the rest of the frame the stalled write had begun, with one more write timeout to
//! get into the socket; if the socket does not take it, the connection is reset rather than left
//! to the kernel with megabytes the client will never read.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

use super::ended::Ended;
use super::{FLUSH_BYTES, LINGER, Session, frame};

/// A connection whose events come at most this far apart keeps its small buffers between them;
/// one that gets an event now and then, or only control frames, frees them after each write.
pub(super) const BUSY: Duration = Duration::from_secs(1);
/// The write buffer kept between events until the connection goes quiet: a few frames' worth.
const KEEP_BYTES: usize = 4096;
/// Written-and-not-yet-marked slots kept the same way.
const KEEP_FRAMES: usize = 16;
use crate::fanout::Outgoing;
use crate::metrics::DeliveryPath;
use crate::protocol::server::{self, close};

impl Session {
    pub(super) fn has_output(&self) -> bool {
        !self.replay.is_empty() || !self.outbox.is_empty()
    }

    /// After a flush of events that came close after the last one ([`BUSY`]) and left nothing
    /// queued: buffers past the size one event needs are freed at once, small ones are kept for
    /// the next event until the connection goes quiet ([`Self::release_buffers`]), so a connection
    /// that receives an event every few milliseconds does not allocate and free them for each.
    pub(super) fn trim_buffers(&mut self) {
        if self.out.capacity() > KEEP_BYTES {
            self.out = Vec::new();
        }
        if self.written.capacity() > KEEP_FRAMES {
            self.written = Vec::new();
        }
        if self.replay.capacity() > 0 {
            self.replay = VecDeque::new();
        }
        if self.inbox.is_empty() && self.inbox.capacity() > 0 {
            self.inbox = BytesMut::new();
        }
    }

    /// A quiet connection (its timer found nothing queued) keeps no buffer.
    pub(super) fn release_buffers(&mut self) {
        self.trim_buffers();
        if self.out.capacity() > 0 {
            self.out = Vec::new();
        }
        if self.written.capacity() > 0 {
            self.written = Vec::new();
        }
        self.outbox.release();
    }

    /// Encodes queued frames (a replay first) up to [`FLUSH_BYTES`] and writes them with one
    /// write; the events in it are marked delivered once it is written. Takes the queue's lock
    /// once per item: the last item says the queue is empty, so nothing is taken to find out.
    pub(super) async fn flush(&mut self, limit: Duration) -> Result<Flushed, Ended> {
        // Whether the outbox may hold more; known once an item says it was the last.
        let mut queued = true;
        while self.out.len() < FLUSH_BYTES {
            if let Some(event) = self.replay.pop_front() {
                frame::encode(&mut self.out, frame::TEXT, event.frame_in(self.format));
                self.written.push((event, DeliveryPath::Replay));
                continue;
            }
            if !queued {
                break;
            }
            let Some((item, more)) = self.outbox.pop() else {
                queued = false;
                break;
            };
            queued = more;
            match item {
                Outgoing::Event(event) => {
                    frame::encode(&mut self.out, frame::TEXT, event.frame_in(self.format));
                    self.written.push((event, DeliveryPath::Live));
                }
                Outgoing::Replay(events) => self.replay.extend(events),
                Outgoing::Context(events) => {
                    if let Some(prelude) = agui_prelude(&events) {
                        frame::encode(&mut self.out, frame::TEXT, &prelude);
                    }
                }
                Outgoing::Frame(bytes) => frame::encode(&mut self.out, frame::TEXT, &bytes),
                Outgoing::Pong(payload) => frame::encode(&mut self.out, frame::PONG, &payload),
            }
        }
        let flushed = Flushed {
            wrote: !self.out.is_empty(),
            events: !self.written.is_empty(),
            more: queued || !self.replay.is_empty(),
        };
        if !flushed.wrote {
            return Ok(flushed);
        }
        if let Err(ended) = self.write_out(limit).await {
            // A slow consumer's close frame went out after the whole of this write, so the
            // socket took every frame in it, ahead of the close. Without it (a socket error, or
            // a reset because the close did not fit) what the socket took may never arrive.
            if self.close_sent {
                super::delivered(&self.gateway, &mut self.written, self.connection_id);
            } else {
                self.written.clear();
            }
            return Err(ended);
        }
        super::delivered(&self.gateway, &mut self.written, self.connection_id);
        Ok(flushed)
    }

    /// Decides the close frame; it is written after what is queued (see [`Self::finish`]).
    pub(super) fn close(&mut self, code: u16, reason: &'static str, ended: Ended) -> Ended {
        self.closing.get_or_insert((code, reason));
        ended
    }

    /// Writes what is queued (one flush at most), then the close frame, and ends.
    pub(super) async fn finish(&mut self, ended: Ended, limit: Duration) -> Ended {
        if let Err(by_writer) = self.flush(limit).await {
            return by_writer;
        }
        let (code, reason) = self.closing.unwrap_or((close::NORMAL, ""));
        self.close_now(code, reason, ended, limit).await
    }

    /// Writes `out` (the frames encoded for this write) within `limit`. A write that times out
    /// ends the session as a slow consumer, after trying to close it with 4008; a socket error
    /// ends it as `write_failed`.
    pub(super) async fn write_out(&mut self, limit: Duration) -> Result<(), Ended> {
        match self.write_within(limit).await {
            Ok(()) => Ok(()),
            Err(Unwritten::Failed) => Err(Ended::WriteFailed),
            // Boxed: it runs once, and inline it would size every connection's task.
            Err(Unwritten::TimedOut) => Err(Box::pin(self.close_now(
                close::SLOW_CONSUMER,
                "slow_consumer",
                Ended::SlowConsumer,
                limit,
            ))
            .await),
        }
    }

    /// Writes all of `out` within `limit`. On a timeout, `out` keeps what was not written: the
    /// rest of a frame the client has the beginning of must go before any other frame.
    async fn write_within(&mut self, limit: Duration) -> Result<(), Unwritten> {
        let mut written = 0;
        // Nearly every write fits in the socket's buffer at once: the timer is armed only for
        // one that has to wait (arming and cancelling it was a fifth of a delivery's work).
        while written < self.out.len() {
            match self.stream.try_write(&self.out[written..]) {
                Ok(n) if n > 0 => written += n,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                _ => {
                    self.out.clear();
                    return Err(Unwritten::Failed);
                }
            }
        }
        if written == self.out.len() {
            self.out.clear();
            return Ok(());
        }
        let (stream, out) = (&mut self.stream, &self.out);
        let wrote = timeout(limit, async {
            while written < out.len() {
                match stream.write(&out[written..]).await {
                    Ok(0) => return Err(()),
                    Ok(n) => written += n,
                    Err(_) => return Err(()),
                }
            }
            Ok(())
        })
        .await;
        match wrote {
            Ok(Ok(())) => {
                self.out.clear();
                Ok(())
            }
            Ok(Err(())) => {
                self.out.clear();
                Err(Unwritten::Failed)
            }
            Err(_) => {
                self.out.drain(..written);
                Err(Unwritten::TimedOut)
            }
        }
    }

    /// Writes a close frame ahead of anything queued (after the rest of a frame a timed-out write
    /// began), lets the client close its side, and ends. A close the socket does not take within
    /// `limit` resets the connection.
    pub(super) async fn close_now(
        &mut self,
        code: u16,
        reason: &'static str,
        ended: Ended,
        limit: Duration,
    ) -> Ended {
        self.outbox.close();
        frame::encode_close(&mut self.out, code, reason);
        if self.write_within(limit).await.is_err() {
            tracing::debug!(code, "The close frame could not be written in time.");
            // Unsent bytes would otherwise stay queued in the kernel, retried for minutes, for a
            // client that does not read: a reset frees them now (the client sees 1006).
            let _ = self.stream.set_zero_linger();
            return ended;
        }
        self.close_sent = true;
        // Our FIN follows the close frame; the client answers with its own close.
        let _ = timeout(limit, self.stream.shutdown()).await;
        ended
    }

    /// After a close frame: read until the client closes too (or briefly), so unread bytes do not
    /// make the kernel answer with a reset that would hide the close code.
    pub(super) async fn linger(&mut self) {
        if !self.close_sent {
            return;
        }
        let mut sink = [0u8; 512];
        let _ = timeout(LINGER, async {
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// What a flush did.
#[derive(Debug, Clone, Copy)]
pub(super) struct Flushed {
    /// Something was written.
    pub wrote: bool,
    /// What was written held an event (not only control frames).
    pub events: bool,
    /// More is queued than one flush takes (or may be: the last item taken did not say).
    pub more: bool,
}

/// Why a write did not finish.
enum Unwritten {
    /// The socket refused it with an error.
    Failed,
    /// The socket did not take it within the write timeout: the client is not reading.
    TimedOut,
}

/// The `prelude` frame an AG-UI client joining at the end of `context` gets first (see
/// [`crate::fanout::prelude`]). Not an event of the channel: neither sequenced nor counted.
fn agui_prelude(context: &[std::sync::Arc<crate::fanout::StoredEvent>]) -> Option<bytes::Bytes> {
    let last = context.last()?;
    let prelude = crate::fanout::prelude(context);
    if prelude.is_empty() {
        return None;
    }
    let frames = last.agui();
    Some(server::agui_frame(
        &frames.channel,
        &frames.epoch,
        last.seq,
        &prelude,
        true,
    ))
}
