//! A token bucket per environment, so one busy preview cannot starve the others.

use std::sync::Mutex;
use std::time::Instant;

/// Allows `rate` requests per second on average, in bursts of up to `rate`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl RateLimiter {
    /// A full bucket allowing `rate` requests per second; `rate == 0` allows everything.
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate);
        Self { rate, state: Mutex::new(Bucket { tokens: rate, refilled: Instant::now() }) }
    }

    /// Takes one token if there is one.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let mut bucket = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.rate);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_is_capped_and_tokens_come_back_with_time() {
        let limiter = RateLimiter::new(10);
        let start = Instant::now();
        let allowed = (0..25).filter(|_| limiter.allow_at(start)).count();
        assert_eq!(allowed, 10);
        assert!(!limiter.allow_at(start + Duration::from_millis(50)), "half a token is not a token");
        assert!(limiter.allow_at(start + Duration::from_millis(100)));
        let later = start + Duration::from_secs(60);
        assert_eq!((0..25).filter(|_| limiter.allow_at(later)).count(), 10, "refill stops at the burst size");
    }

    #[test]
    fn zero_means_unlimited() {
        let limiter = RateLimiter::new(0);
        assert!((0..10_000).all(|_| limiter.allow()));
    }
}
