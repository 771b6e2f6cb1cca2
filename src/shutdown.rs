//! Shutdown's shared state: the draining flag (readiness, new upgrades), the [`Signal`] that tells
//! sessions, event streams, run streams and HTTP connections to close, and the trackers that wait
//! for them.

use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};

use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

/// The three parts of shutdown: the draining flag, the signal that tells sessions to close with
/// 1012 (and HTTP connections to close once their request is answered), and the tracker that
/// waits for the sessions; and the tracker of the AG-UI streams being read, which the same signal
/// tells to close their runs.
#[derive(Default)]
pub struct Shutdown {
    draining: AtomicBool,
    pub close: Signal,
    pub tracker: TaskTracker,
    pub run_streams: TaskTracker,
}

impl Shutdown {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// A flag raised once, awaited by every connection. A session polls its wait on every event it
/// writes (a `select!` polls each branch), so after the first poll a wait only reads the flag:
/// it takes no lock shared with the other connections (a `CancellationToken` locks its node and
/// its `Notify` on every poll).
#[derive(Default)]
pub struct Signal {
    raised: AtomicBool,
    notify: Notify,
}

impl Signal {
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Completes once the signal is raised.
    pub async fn raised(&self) {
        // Created before the flag is read: a raise in between completes it (`notify_waiters`).
        let mut notified = pin!(self.notify.notified());
        let mut registered: Option<Waker> = None;
        std::future::poll_fn(|cx| {
            if self.is_raised() {
                return Poll::Ready(());
            }
            // The waiter is registered with this task's waker once; polled again from the same
            // task there is nothing to update.
            if registered
                .as_ref()
                .is_some_and(|waker| waker.will_wake(cx.waker()))
            {
                return Poll::Pending;
            }
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            registered = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Wake};

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes::default());
        (Arc::clone(&wakes), Waker::from(wakes))
    }

    #[test]
    fn a_wait_polled_many_times_is_woken_once_when_raised() {
        let signal = Signal::default();
        let (wakes, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut raised = pin!(signal.raised());
        for _ in 0..3 {
            assert!(raised.as_mut().poll(&mut cx).is_pending());
        }
        signal.raise();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(raised.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn a_wait_polled_from_another_task_wakes_that_one() {
        let signal = Signal::default();
        let (first, first_waker) = waker();
        let (second, second_waker) = waker();
        let mut raised = pin!(signal.raised());
        assert!(
            raised
                .as_mut()
                .poll(&mut Context::from_waker(&first_waker))
                .is_pending()
        );
        assert!(
            raised
                .as_mut()
                .poll(&mut Context::from_waker(&second_waker))
                .is_pending()
        );
        signal.raise();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wait_begun_after_the_raise_completes_at_once() {
        let signal = Signal::default();
        signal.raise();
        let (_, waker) = waker();
        assert!(
            pin!(signal.raised())
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
        );
    }
}
