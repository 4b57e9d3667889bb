//! Failed sign-ins (a wrong token on `/login`, a used or expired login
//! link), counted per client address over a window, so the web side can log
//! each one at warn with the address and its count, and answer it only
//! after a delay that grows with the count (guessing gets slow). Owns only
//! the counts (sans-IO: every call takes `now`); it must not sleep or log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Failures older than this are forgotten.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// The delay per recent failure of an address ...
pub const STEP: Duration = Duration::from_millis(250);
/// ... up to this much.
pub const MAX_DELAY: Duration = Duration::from_secs(2);
/// Addresses remembered at most (an attacker with many addresses must not
/// grow the table without bound).
const MAX_ADDRESSES: usize = 10_000;

#[derive(Debug, Default)]
pub struct LoginFailures {
    recent: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    total: AtomicU64,
}

/// What one failure adds up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Failures of this address within [`WINDOW`], this one included.
    pub recent: u32,
    /// Failures since the hub started, all addresses.
    pub total: u64,
    /// How long to wait before answering.
    pub delay: Duration,
}

impl LoginFailures {
    /// Counts a failure from `addr` (`None`: address unknown, counted as one
    /// shared address).
    pub fn record(&self, addr: Option<IpAddr>, now: Instant) -> Failure {
        let addr = addr.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() >= MAX_ADDRESSES {
            recent.retain(|_, (_, last)| now.saturating_duration_since(*last) < WINDOW);
            if recent.len() >= MAX_ADDRESSES {
                recent.clear();
            }
        }
        let entry = recent.entry(addr).or_insert((0, now));
        if now.saturating_duration_since(entry.1) >= WINDOW {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let delay = STEP.saturating_mul(entry.0).min(MAX_DELAY);
        Failure { recent: entry.0, total, delay }
    }

    /// Failures since the hub started.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_per_address_and_slow_down_up_to_a_cap() {
        let f = LoginFailures::default();
        let t = Instant::now();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        assert_eq!(f.record(a, t), Failure { recent: 1, total: 1, delay: STEP });
        assert_eq!(f.record(a, t), Failure { recent: 2, total: 2, delay: STEP * 2 });
        assert_eq!(f.record(b, t), Failure { recent: 1, total: 3, delay: STEP });
        for _ in 0..20 {
            f.record(a, t);
        }
        assert_eq!(f.record(a, t).delay, MAX_DELAY);
        assert_eq!(f.total(), 24);
    }

    #[test]
    fn an_address_is_forgiven_after_the_window() {
        let f = LoginFailures::default();
        let t = Instant::now();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        f.record(a, t);
        f.record(a, t);
        assert_eq!(f.record(a, t + WINDOW).recent, 1);
    }
}
