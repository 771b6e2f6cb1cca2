//! Fan-out: hands one event's shared bytes to every local subscriber of its channel without
//! waiting on any of them. Each connection has an [`Outbox`], a queue bounded in frames and bytes;
//! a push that does not fit marks the connection as a slow consumer, and its writer closes it
//! with 4008. Nothing here ever awaits a socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use crate::broker::StoredEvent;

/// What a connection writer is asked to write.
#[derive(Debug)]
pub enum Outgoing {
    /// A live event; its bytes are shared with every other subscriber.
    Event(Arc<StoredEvent>),
    /// Retained history for a new subscription, written in order before anything queued after it.
    Replay(Vec<Arc<StoredEvent>>),
    /// A control frame (welcome, subscribed, error, pong…).
    Frame(Bytes),
    /// A WebSocket pong answering the client's ping.
    Pong(Bytes),
    /// Close the connection with this code and reason, then stop.
    Close(u16, &'static str),
}

/// The bounded queue in front of one connection's writer.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    overflow: CancellationToken,
}

impl Outbox {
    pub fn new(max_events: usize, max_bytes: usize) -> (Arc<Self>, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(max_events);
        let outbox = Self {
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            overflow: CancellationToken::new(),
        };
        (Arc::new(outbox), rx)
    }

    /// Queues a live event. `false` when it did not fit (the connection is now a slow consumer)
    /// or the connection is gone.
    pub fn push_event(&self, event: &Arc<StoredEvent>) -> bool {
        if self.overflow.is_cancelled() {
            return false;
        }
        let len = event.frame.len();
        if self.queued_bytes.fetch_add(len, Ordering::AcqRel) + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.overflow.cancel();
            return false;
        }
        match self.tx.try_send(Outgoing::Event(Arc::clone(event))) {
            Ok(()) => true,
            Err(error) => {
                self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                if matches!(error, TrySendError::Full(_)) {
                    self.overflow.cancel();
                }
                false
            }
        }
    }

    /// Queues anything but a live event. Control frames share the bound on frames, not bytes:
    /// they are small, and a replay is bounded by the channel's history.
    pub fn push(&self, item: Outgoing) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.overflow.cancel();
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// The writer reports bytes of live events it has taken off the queue.
    pub fn taken(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Cancelled when a push did not fit.
    pub fn overflow(&self) -> &CancellationToken {
        &self.overflow
    }
}

/// The local subscribers of one channel.
#[derive(Debug, Default)]
pub struct Subscribers {
    outboxes: Vec<Arc<Outbox>>,
}

impl Subscribers {
    pub fn fan_out(&self, event: &Arc<StoredEvent>) {
        for outbox in &self.outboxes {
            outbox.push_event(event);
        }
    }

    pub fn add(&mut self, outbox: &Arc<Outbox>) {
        self.outboxes.push(Arc::clone(outbox));
    }

    /// Removes one connection; `true` if it was subscribed.
    pub fn remove(&mut self, outbox: &Arc<Outbox>) -> bool {
        let before = self.outboxes.len();
        self.outboxes.retain(|o| !Arc::ptr_eq(o, outbox));
        self.outboxes.len() != before
    }

    pub fn contains(&self, outbox: &Arc<Outbox>) -> bool {
        self.outboxes.iter().any(|o| Arc::ptr_eq(o, outbox))
    }

    pub fn len(&self) -> usize {
        self.outboxes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outboxes.is_empty()
    }
}
