//! Fan-out: hands one event's shared bytes to every local subscriber of its channel without
//! waiting on any of them. Each connection has an [`Outbox`], a queue bounded in frames and bytes;
//! a push that does not fit marks the connection as a slow consumer, and its writer closes it
//! with 4008. Nothing here ever awaits a socket.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use bytes::Bytes;

mod agui;
mod dropped;
mod stored;

pub use agui::{AguiFrames, prelude};
pub use dropped::{DroppedReport, dropped_report};
pub use stored::{Delivered, Feed, StoredEvent};

/// Slots of an emptied queue kept for the next event until the connection goes quiet.
const KEEP_ITEMS: usize = 16;

/// What a connection writer is asked to write.
#[derive(Debug)]
pub enum Outgoing {
    /// A live event; its bytes are shared with every other subscriber.
    Event(Arc<StoredEvent>),
    /// Retained history for a new subscription, written in order before anything queued after it.
    Replay(Vec<Arc<StoredEvent>>),
    /// Asked for by AG-UI subscribers: the earlier events of the run open at the start of the
    /// replay that follows, never written, read to tell the client what is open
    /// (`protocol::agui::Sequence::prelude`).
    Context(Vec<Arc<StoredEvent>>),
    /// A control frame (welcome, subscribed, error, pong…).
    Frame(Bytes),
    /// A WebSocket pong answering the client's ping.
    Pong(Bytes),
}

/// The bounded queue in front of one connection's writer. A plain deque under a small lock, so an
/// idle connection holds no queue memory at all (a channel library preallocates blocks): a deque
/// that empties is freed when it grew past [`KEEP_ITEMS`], and otherwise when its writer says the
/// connection went quiet ([`Outbox::release`]), so a busy one is not allocated for every event.
/// The writer's waker sits under the same lock: a push wakes it with the lock it takes anyway, and
/// the writer checks for work and registers in one lock ([`Outbox::ready`]).
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    max_events: usize,
    max_bytes: usize,
    overflow: AtomicBool,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Outgoing>,
    /// Bytes of live events waiting.
    bytes: usize,
    closed: bool,
    /// The writer waiting in [`Outbox::ready`], woken by the next push.
    writer: Option<Waker>,
}

impl Outbox {
    pub fn new(max_events: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::default(),
            max_events,
            max_bytes,
            overflow: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a live event. `false` when it did not fit (the connection is now a slow consumer)
    /// or the connection is gone.
    pub fn push_event(&self, event: &Arc<StoredEvent>) -> bool {
        let len = event.frame.len();
        let mut queue = self.lock();
        if queue.closed || self.overflow.load(Ordering::Acquire) {
            return false;
        }
        if queue.items.len() >= self.max_events || queue.bytes + len > self.max_bytes {
            self.overflow.store(true, Ordering::Release);
            wake(queue);
            return false;
        }
        queue.bytes += len;
        queue.items.push_back(Outgoing::Event(Arc::clone(event)));
        wake(queue);
        true
    }

    /// Queues anything but a live event. Control frames share the bound on frames, not bytes:
    /// they are small, and a replay is bounded by the channel's history.
    pub fn push(&self, item: Outgoing) -> bool {
        let mut queue = self.lock();
        if queue.closed {
            return false;
        }
        if queue.items.len() >= self.max_events {
            self.overflow.store(true, Ordering::Release);
            wake(queue);
            return false;
        }
        queue.items.push_back(item);
        wake(queue);
        true
    }

    /// Takes the oldest queued item, and whether more is queued behind it. An emptied queue gives
    /// its memory back.
    pub fn pop(&self) -> Option<(Outgoing, bool)> {
        let mut queue = self.lock();
        let item = queue.items.pop_front()?;
        if let Outgoing::Event(event) = &item {
            queue.bytes -= event.frame.len();
        }
        let more = !queue.items.is_empty();
        if !more && queue.items.capacity() > KEEP_ITEMS {
            queue.items = VecDeque::new();
        }
        Some((item, more))
    }

    /// The connection went quiet: an empty queue gives its memory back.
    pub fn release(&self) {
        let mut queue = self.lock();
        if queue.items.is_empty() && queue.items.capacity() > 0 {
            queue.items = VecDeque::new();
        }
    }

    /// Waits until something is queued or the queue overflowed (at once if it already is). One
    /// writer waits at a time: the latest to poll is the one woken.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| {
            let mut queue = self.lock();
            if !queue.items.is_empty() || self.overflow.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            match &mut queue.writer {
                Some(waker) => waker.clone_from(cx.waker()),
                writer => *writer = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Whether a push did not fit: the connection must be closed with 4008.
    pub fn is_overflowed(&self) -> bool {
        self.overflow.load(Ordering::Acquire)
    }

    /// The connection is ending: refuse and drop everything.
    pub fn close(&self) {
        let mut queue = self.lock();
        queue.closed = true;
        queue.items = VecDeque::new();
        queue.bytes = 0;
        queue.writer = None;
    }
}

/// Wakes the writer, if it waits, after letting go of the queue's lock.
fn wake(mut queue: MutexGuard<'_, Queue>) {
    let writer = queue.writer.take();
    drop(queue);
    if let Some(writer) = writer {
        writer.wake();
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

    /// Empties the list, handing back every connection in it.
    pub fn take_all(&mut self) -> Vec<Arc<Outbox>> {
        std::mem::take(&mut self.outboxes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(outbox: &Outbox) -> usize {
        outbox.lock().items.capacity()
    }

    #[test]
    fn an_emptied_queue_is_kept_small_until_its_connection_is_quiet() {
        let outbox = Outbox::new(1000, 1 << 20);
        outbox.push(Outgoing::Frame(Bytes::from_static(b"a")));
        assert!(outbox.pop().is_some());
        let kept = capacity(&outbox);
        assert!(kept > 0 && kept <= KEEP_ITEMS, "{kept}");
        outbox.release();
        assert_eq!(capacity(&outbox), 0);
    }

    #[test]
    fn an_emptied_queue_that_grew_is_freed_at_once() {
        let outbox = Outbox::new(1000, 1 << 20);
        for _ in 0..=KEEP_ITEMS {
            outbox.push(Outgoing::Frame(Bytes::from_static(b"a")));
        }
        while outbox.pop().is_some() {}
        assert_eq!(capacity(&outbox), 0);
    }

    #[test]
    fn the_last_item_says_nothing_is_queued_behind_it() {
        let outbox = Outbox::new(1000, 1 << 20);
        outbox.push(Outgoing::Frame(Bytes::from_static(b"a")));
        outbox.push(Outgoing::Frame(Bytes::from_static(b"b")));
        assert!(matches!(outbox.pop(), Some((_, true))));
        assert!(matches!(outbox.pop(), Some((_, false))));
        assert!(outbox.pop().is_none());
    }

    #[tokio::test]
    async fn a_waiting_writer_is_woken_by_a_push_and_sees_an_overflow() {
        let outbox = Outbox::new(1, 1 << 20);
        let wait = std::time::Duration::from_secs(5);
        let push = async {
            tokio::task::yield_now().await;
            outbox.push(Outgoing::Frame(Bytes::from_static(b"a")));
        };
        tokio::time::timeout(wait, async { tokio::join!(outbox.ready(), push) })
            .await
            .expect("the push woke the writer");
        // Still queued: ready at once, and a second push overflows.
        tokio::time::timeout(wait, outbox.ready()).await.unwrap();
        assert!(outbox.pop().is_some());
        let overflow = async {
            tokio::task::yield_now().await;
            outbox.push(Outgoing::Frame(Bytes::from_static(b"b")));
            outbox.push(Outgoing::Frame(Bytes::from_static(b"c")));
        };
        tokio::time::timeout(wait, async { tokio::join!(outbox.ready(), overflow) })
            .await
            .expect("the pushes woke the writer");
        assert!(outbox.is_overflowed());
    }

    #[test]
    fn a_queue_with_items_is_not_released() {
        let outbox = Outbox::new(1000, 1 << 20);
        outbox.push(Outgoing::Frame(Bytes::from_static(b"a")));
        outbox.release();
        assert!(outbox.pop().is_some());
    }
}
