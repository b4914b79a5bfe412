//! Capped exponential backoff with full jitter, for reconnects.
//!
//! Delay for attempt `n` (from 0) is uniform in `[0, min(cap, base · 2ⁿ))` — "full jitter" as
//! described in the AWS architecture blog — so a fleet restarted at once spreads its reconnects
//! over the whole window instead of arriving in waves. The caller supplies the randomness, so
//! the schedule is deterministic under test.

use std::time::Duration;

/// Reconnect backoff state for one dialer.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base` and never exceeding `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay: `min(cap, base · 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, given `unit` uniform in `[0, 1)`; advances the attempt counter.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let d = self.ceiling().mul_f64(unit);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Attempts made since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Call after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delay_never_exceeds_cap_nor_exponential_ceiling(
            base_ms in 1u64..10_000,
            cap_ms in 1u64..600_000,
            units in proptest::collection::vec(0.0f64..1.0, 1..80),
        ) {
            let base = Duration::from_millis(base_ms);
            let cap = Duration::from_millis(cap_ms);
            let mut b = Backoff::new(base, cap);
            for (n, u) in units.into_iter().enumerate() {
                let ceiling = b.ceiling();
                let d = b.next_delay(u);
                prop_assert!(d <= ceiling);
                prop_assert!(d <= cap.max(base));
                let exp = base.saturating_mul(1u32.checked_shl(n.min(31) as u32).unwrap_or(u32::MAX));
                prop_assert!(d <= exp);
            }
        }
    }

    #[test]
    fn ceiling_doubles_until_cap_and_reset_restarts() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<_> = (0..6)
            .map(|_| {
                let c = b.ceiling();
                b.next_delay(0.5);
                c.as_millis()
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_spans_the_window() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
        assert_eq!(b.next_delay(0.999), Duration::from_millis(999));
        assert_eq!(b.next_delay(f64::NAN), Duration::ZERO);
    }
}
