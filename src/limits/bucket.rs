//! A token bucket: a sustained rate with a burst, in eight bytes (one per connection).

/// Tokens left and when it was last filled, in milliseconds of a clock the caller keeps (only
/// differences count, so the clock may wrap). The rate and the burst are the caller's
/// configuration, passed on each take, so the bucket holds nothing else.
pub struct TokenBucket {
    tokens: f32,
    last_ms: u32,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn new(burst: u32, now_ms: u32) -> Self {
        Self {
            tokens: burst as f32,
            last_ms: now_ms,
        }
    }

    /// Takes one token at `now_ms`, `rate` tokens a second coming back up to `burst`; `false` when
    /// none is left.
    pub fn take(&mut self, rate: u32, burst: u32, now_ms: u32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.last_ms);
        self.last_ms = now_ms;
        let earned = elapsed as f32 / 1000.0 * rate as f32;
        self.tokens = (self.tokens + earned).min(burst as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(3, 1_000);
        assert!((0..3).all(|_| bucket.take(10, 3, 1_000)));
        assert!(!bucket.take(10, 3, 1_000));
        assert!(bucket.take(10, 3, 1_100), "100 ms at 10/s is one more");
        assert!(!bucket.take(10, 3, 1_100));
        let mut wrapped = TokenBucket::new(1, u32::MAX - 50);
        assert!(wrapped.take(10, 1, u32::MAX - 50));
        assert!(wrapped.take(10, 1, 60), "the clock wrapped; 111 ms passed");
    }
}
