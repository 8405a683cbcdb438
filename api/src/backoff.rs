//! The one backoff: exponential with jitter, for whatever retries a peer that may be away (the
//! agent reconnecting to the gateway, a registry login while the operator restarts).

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling from
/// `initial` up to `max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff from `initial` to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max: max.max(initial), attempt: 0 }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.initial.saturating_mul(2u32.saturating_pow(self.attempt.min(20))).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(random_fraction())
    }

    /// How many delays were taken since the start or the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the first delay, after an attempt that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A number in [0, 1) from the process's hash randomness (no RNG crate for one jitter).
fn random_fraction() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher
        .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_up_to_the_maximum() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100), "{delays:?}");
        assert!(delays[2] >= Duration::from_millis(200) && delays[2] <= Duration::from_millis(400), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)), "{delays:?}");
        assert!(delays[7] >= Duration::from_millis(500), "{delays:?}");
        assert_eq!(backoff.attempts(), 8);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
