//! A value that is expensive to compute (a walk of every channel, a read of the Redis index),
//! computed by one caller at a time and shared with every caller that finds it fresh enough.
//!
//! Freshness is measured from when a computation *started* to when a caller *asked*: a caller that
//! waited for someone else's computation takes its result if it started no more than `max_age`
//! before the caller asked, so with `max_age` 0 every caller still sees a state read after it
//! arrived, and concurrent callers share that one read.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One computed value and when its computation started.
pub struct Computed<T> {
    pub value: Arc<T>,
    pub at: Instant,
}

impl<T> Clone for Computed<T> {
    fn clone(&self) -> Self {
        Self {
            value: Arc::clone(&self.value),
            at: self.at,
        }
    }
}

pub struct SingleFlight<T> {
    /// The last value. A leaf lock, held only to clone or replace an `Arc`.
    latest: Mutex<Option<Computed<T>>>,
    /// Held by the one caller computing; the others wait here, then look at `latest` again.
    flight: tokio::sync::Mutex<()>,
}

impl<T> Default for SingleFlight<T> {
    fn default() -> Self {
        Self {
            latest: Mutex::new(None),
            flight: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T> SingleFlight<T> {
    /// The last value if it is fresh for a caller that asked at `asked`, otherwise the value of
    /// `compute`, run by this caller unless another caller's run ends fresh enough meanwhile. A
    /// failed computation is not kept: the next caller tries again.
    pub async fn get<E, F, Fut>(&self, max_age: Duration, compute: F) -> Result<Computed<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let asked = Instant::now();
        if let Some(fresh) = self.fresh(asked, max_age) {
            return Ok(fresh);
        }
        // If this caller gives up (its request is dropped) while computing, the guard goes with
        // it and the next waiter computes.
        let _flight = self.flight.lock().await;
        if let Some(fresh) = self.fresh(asked, max_age) {
            return Ok(fresh);
        }
        let at = Instant::now();
        let taken = Computed {
            value: Arc::new(compute().await?),
            at,
        };
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(taken.clone());
        Ok(taken)
    }

    fn fresh(&self, asked: Instant, max_age: Duration) -> Option<Computed<T>> {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        latest
            .as_ref()
            .filter(|taken| asked.saturating_duration_since(taken.at) <= max_age)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_computation() {
        let flight = SingleFlight::<usize>::default();
        let runs = AtomicUsize::new(0);
        let callers = (0..16).map(|_| {
            flight.get(Duration::ZERO, || async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, ()>(runs.fetch_add(1, Ordering::SeqCst))
            })
        });
        for result in futures_util::future::join_all(callers).await {
            assert!(result.is_ok());
        }
        // The first caller computes; the others asked after it started, so with a max age of 0
        // its result is too old for them: one of them computes again and the rest, who asked
        // before that second computation started, share it.
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_value_is_reused_within_max_age_and_failures_are_not_kept() {
        let flight = SingleFlight::<u32>::default();
        let first = flight.get(Duration::from_secs(60), || async { Ok::<_, ()>(1) });
        assert_eq!(*first.await.unwrap().value, 1);
        let reused = flight.get(Duration::from_secs(60), || async { Ok::<_, ()>(2) });
        assert_eq!(*reused.await.unwrap().value, 1);
        let failed = flight.get(Duration::ZERO, || async { Err::<u32, _>("down") });
        assert!(failed.await.is_err());
        let recomputed = flight.get(Duration::ZERO, || async { Ok::<_, ()>(3) });
        assert_eq!(*recomputed.await.unwrap().value, 3);
    }
}
