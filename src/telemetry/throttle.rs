//! Repeated warnings of one kind logged at most once per interval, with how many were held back,
//! so that an attacker (or an incident) repeating one event cannot flood the logs.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One kind of warning, usually a `static` beside the line that logs it:
///
/// ```ignore
/// static FULL: Throttle = Throttle::every(Duration::from_secs(10));
/// if let Some(held_back) = FULL.allow() {
///     tracing::warn!(held_back, "…");
/// }
/// ```
pub struct Throttle {
    interval_ms: u64,
    /// Milliseconds since the process's first throttled line at which this kind was last logged
    /// (`u64::MAX`: never).
    last_ms: AtomicU64,
    held_back: AtomicU64,
}

impl Throttle {
    pub const fn every(interval: Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as u64,
            last_ms: AtomicU64::new(u64::MAX),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence is to be logged, `n` being how many were held back since the
    /// last line; `None` (counted) otherwise.
    pub fn allow(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == u64::MAX || now.saturating_sub(last) >= self.interval_ms;
        if due
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held_back.swap(0, Ordering::Relaxed));
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_once_per_interval_and_counts_the_rest() {
        let throttle = Throttle::every(Duration::from_millis(50));
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.allow(), Some(2));
        assert_eq!(throttle.allow(), None);
    }
}
