//! The timer an HTTP connection enforces its header read timeout with: one tokio timer per
//! connection, not one per request.
//!
//! hyper asks its timer for a new sleep each time it starts reading a request's headers and drops
//! it when they are in. hyper-util's `TokioTimer` makes each one a tokio timer of its own, put into
//! the runtime's timer wheel when first polled and taken out when dropped: with kept-alive
//! producers that is twice per request, about 740 instructions of a one-event POST. Here the
//! sleeps of one connection share one tokio timer, armed at the earliest deadline still wanted; it
//! is moved on only when it fires before the deadline of the sleep that polls it (an earlier
//! request's), at most once per timeout period. A sleep that is polled after its deadline is
//! ready, as before, so a client that sends its headers too slowly is still cut at the same moment.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// One connection's timer (hyper's `Timer`), handed to hyper's builder.
#[derive(Default)]
pub struct HeaderTimer {
    shared: Arc<Mutex<Option<Armed>>>,
}

/// The connection's tokio timer, and the waker it was last polled with.
struct Armed {
    timer: Pin<Box<tokio::time::Sleep>>,
    /// `None` until polled, and after the timer is moved.
    waker: Option<Waker>,
}

impl hyper::rt::Timer for HeaderTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeaderSleep {
            deadline: deadline.into(),
            shared: Arc::clone(&self.shared),
        })
    }

    /// Tokio's clock, so that tests that pause time pause this one too.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// One request's wait for its headers, on its connection's shared timer.
struct HeaderSleep {
    deadline: tokio::time::Instant,
    shared: Arc<Mutex<Option<Armed>>>,
}

impl hyper::rt::Sleep for HeaderSleep {}

impl Future for HeaderSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        // Only the connection's task polls its sleeps: the lock is never contended.
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let armed = shared.get_or_insert_with(|| Armed {
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            waker: None,
        });
        if armed.timer.deadline() > deadline {
            armed.timer.as_mut().reset(deadline);
            armed.waker = None;
        }
        // Set no later than this deadline, not fired, and waking this task: nothing to do, which
        // is the case of nearly every request's wait.
        if !armed.timer.is_elapsed()
            && (armed.waker.as_ref()).is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        while armed.timer.as_mut().poll(cx).is_ready() {
            if armed.timer.deadline() >= deadline {
                return Poll::Ready(());
            }
            // It fired for an earlier request: wait on for this one.
            armed.timer.as_mut().reset(deadline);
        }
        armed.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use hyper::rt::Timer;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_sleep_ends_at_its_own_deadline_on_one_timer() {
        let timer = HeaderTimer::default();
        let started = tokio::time::Instant::now();
        // The first request's sleep arms the timer for 30 s; its headers come after 10 s.
        let mut first = timer.sleep(Duration::from_secs(30));
        assert!(futures_util::poll!(first.as_mut()).is_pending());
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(first);
        // The next request's sleep outlives the timer's first firing and ends at its own deadline.
        timer.sleep(Duration::from_secs(30)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(40));
        // An earlier deadline than the armed one moves the timer back.
        let mut late = timer.sleep(Duration::from_secs(60));
        assert!(futures_util::poll!(late.as_mut()).is_pending());
        let early = timer.sleep(Duration::from_secs(5));
        let at = tokio::time::Instant::now();
        early.await;
        assert_eq!(at.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_polled_after_its_deadline_is_ready() {
        let timer = HeaderTimer::default();
        let mut sleep = timer.sleep(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(futures_util::poll!(sleep.as_mut()).is_ready());
    }
}
