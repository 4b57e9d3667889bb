//! Exponential back-off with optional jitter, used by the Link's reconnects
//! (rumqttc has none: without it a refused port spins at ~100,000 errors a
//! second, rumqtt issues #703 and #918) and by the hub's collector; and the
//! Link's reconnect rule around it ([`Reconnect`]). Sans-IO: it computes
//! delays; it never sleeps, connects or reads a clock. The caller passes the
//! random fraction in, so tests are exact.
//!
//! # The Link's reconnect rule
//!
//! * After a failed attempt or a lost connection, wait the back-off delay
//!   (doubling with jitter from `reconnect_min` to `reconnect_max`).
//! * The back-off resets only when a connection proved healthy: the broker
//!   answered something we sent on it (a SUBACK, PUBACK or PUBCOMP), not
//!   merely a ConnAck. A broker that accepts the connection and then drops
//!   it at once (e.g. on a resent PUBREL) is thus retried with growing
//!   delays, not once per `reconnect_min`.
//! * Heal quickly: while waiting after a *network* failure (I/O error,
//!   time-out, connection reset, unanswered ping), the Link probes the
//!   broker's address with a plain TCP connect every [`PROBE_EVERY`] (with
//!   jitter) and connects at once when a probe succeeds. After a long spell
//!   of flapping the back-off has grown to `reconnect_max`, yet the agent is
//!   back within about [`PROBE_EVERY`] of the link healing. A probe costs a
//!   TCP handshake, no TLS or MQTT. After a *refusal* there is no probing:
//!   the broker answered with a ConnAck error, TLS failed, or the broker
//!   accepted the connection and dropped it before answering anything we
//!   sent (it is reachable and does not want us); only the back-off paces
//!   those retries, so they cannot become a reconnect storm.

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

/// How often the Link probes the broker while it waits after a network
/// failure.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Why a connection attempt or a connection ended, as far as the wait before
/// the next one is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The network: refused or reset TCP, a time-out, an unanswered ping.
    Network,
    /// The broker (or TLS) answered and said no, or the Link dropped the
    /// connection itself: only the back-off paces the retries.
    Refused,
}

/// How to wait before the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Connect after this long at the latest.
    pub delay: Duration,
    /// Meanwhile probe the broker this often and connect at once when a
    /// probe succeeds; `None`: just wait.
    pub probe_every: Option<Duration>,
}

/// The Link's reconnect rule (see the module doc).
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Backoff,
}

impl Reconnect {
    pub fn new(min: Duration, max: Duration) -> Reconnect {
        Reconnect { backoff: Backoff::new(min, max) }
    }

    /// An attempt failed or a connection ended: how to wait for the next.
    pub fn failed(&mut self, failure: Failure, jitter: f64) -> Wait {
        let delay = self.backoff.next_delay(jitter);
        let probe_every = (failure == Failure::Network && delay > PROBE_EVERY).then_some(PROBE_EVERY);
        Wait { delay, probe_every }
    }

    /// The current connection proved healthy: start again from `min`.
    pub fn healthy(&mut self) {
        self.backoff.reset();
    }
}

/// The pause before the next probe: [`PROBE_EVERY`] shortened by up to a
/// quarter (`jitter` in `0.0..=1.0`), so agents cut off together do not probe
/// in lock-step.
pub fn probe_pause(every: Duration, jitter: f64) -> Duration {
    every.mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 4.0)
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

    #[test]
    fn a_long_wait_after_a_network_failure_probes_and_a_refusal_does_not() {
        let mut r = Reconnect::new(ms(1000), ms(60_000));
        let waits: Vec<_> = (0..4).map(|_| r.failed(Failure::Network, 0.0)).collect();
        assert_eq!(waits[0], Wait { delay: ms(1000), probe_every: None }, "a short wait is just waited");
        assert_eq!(waits[3], Wait { delay: ms(8000), probe_every: Some(PROBE_EVERY) });
        assert_eq!(r.failed(Failure::Refused, 0.0), Wait { delay: ms(16_000), probe_every: None });
    }

    #[test]
    fn only_a_healthy_connection_resets_the_reconnect_backoff() {
        let mut r = Reconnect::new(ms(100), ms(1000));
        r.failed(Failure::Refused, 0.0);
        assert_eq!(r.failed(Failure::Refused, 0.0).delay, ms(200), "a failure keeps doubling");
        r.healthy();
        assert_eq!(r.failed(Failure::Refused, 0.0).delay, ms(100));
    }

    #[test]
    fn probe_pauses_vary_by_at_most_a_quarter() {
        assert_eq!(probe_pause(ms(2000), 0.0), ms(2000));
        assert_eq!(probe_pause(ms(2000), 1.0), ms(1500));
    }
}
