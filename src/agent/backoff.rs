//! Exponential back-off with optional jitter, used by the Link's reconnects
//! (rumqttc has none: without it a refused port spins at ~100,000 errors a
//! second, rumqtt issues #703 and #918) and by the supervisor's restarts.
//! Sans-IO: it computes delays; it never sleeps and never reads a clock. The
//! caller passes the random fraction in, so tests are exact.

use std::time::Duration;

/// Doubling delays from `min` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        Backoff { min, max, current: min }
    }

    /// The next delay, then doubles the base (capped at `max`).
    ///
    /// `jitter` in `0.0..=1.0` is the random fraction to take off the upper
    /// half of the delay ("equal jitter"): the delay lies in
    /// `base/2 ..= base`, so many agents cut off by the same outage do not
    /// reconnect in lock-step. Pass `0.0` for no jitter.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = jitter.clamp(0.0, 1.0);
        base.mul_f64(1.0 - jitter / 2.0)
    }

    /// After a success: start again from `min`.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delays_double_from_min_and_stop_at_max() {
        let mut b = Backoff::new(ms(100), ms(1000));
        let got: Vec<_> = (0..6).map(|_| b.next_delay(0.0)).collect();
        assert_eq!(got, vec![ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
    }

    #[test]
    fn jitter_shortens_a_delay_by_at_most_half() {
        let mut b = Backoff::new(ms(1000), ms(1000));
        assert_eq!(b.next_delay(1.0), ms(500));
        assert_eq!(b.next_delay(0.5), ms(750));
        assert_eq!(b.next_delay(7.0), ms(500), "out-of-range jitter is clamped");
    }

    #[test]
    fn reset_starts_again_from_min() {
        let mut b = Backoff::new(ms(10), ms(80));
        b.next_delay(0.0);
        b.next_delay(0.0);
        b.reset();
        assert_eq!(b.next_delay(0.0), ms(10));
    }
}
