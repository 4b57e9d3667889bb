//! The supervisor's decision rule, sans-IO: given the failures so far, restart
//! after how long, or escalate? DESIGN (Supervision): back-off doubling from
//! 100 ms, capped; more than `max_restarts` within `window` means the fault is
//! not transient and the process must exit with code 1 so systemd restarts it.
//! It never sleeps, stops actors or reads the clock; callers pass `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::SupervisorConfig;

/// The first restart's delay.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start the actor again after this delay.
    Restart(Duration),
    /// Too many restarts in the window: end the process (exit 1).
    Escalate { restarts_in_window: usize },
}

#[derive(Debug, Clone)]
pub struct RestartPolicy {
    max_restarts: u32,
    window: Duration,
    backoff_max: Duration,
    recent: VecDeque<Instant>,
    total: u64,
}

impl RestartPolicy {
    pub fn new(cfg: &SupervisorConfig) -> RestartPolicy {
        RestartPolicy {
            max_restarts: cfg.max_restarts,
            window: cfg.window,
            backoff_max: cfg.backoff_max.max(FIRST_BACKOFF),
            recent: VecDeque::new(),
            total: 0,
        }
    }

    /// Records a failure at `now` and decides. The delay doubles with each
    /// restart inside the window, so a fault that stops recurring for a
    /// window's length starts again from 100 ms.
    pub fn on_failure(&mut self, now: Instant) -> Decision {
        while let Some(&first) = self.recent.front() {
            if now.duration_since(first) > self.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.push_back(now);
        self.total += 1;
        let n = self.recent.len();
        if n > self.max_restarts as usize {
            return Decision::Escalate { restarts_in_window: n };
        }
        let exp = u32::try_from(n.saturating_sub(1)).unwrap_or(u32::MAX).min(20);
        Decision::Restart((FIRST_BACKOFF * 2u32.pow(exp)).min(self.backoff_max))
    }

    /// Restarts since the process started.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u32, window_s: u64, cap_ms: u64) -> RestartPolicy {
        RestartPolicy::new(&SupervisorConfig {
            max_restarts: max,
            window: Duration::from_secs(window_s),
            backoff_max: Duration::from_millis(cap_ms),
        })
    }

    #[test]
    fn restarts_back_off_doubling_from_100ms_up_to_the_cap() {
        let mut p = policy(10, 60, 500);
        let t = Instant::now();
        let got: Vec<_> = (0..5).map(|i| p.on_failure(t + Duration::from_millis(i))).collect();
        let ms = |n| Decision::Restart(Duration::from_millis(n));
        assert_eq!(got, vec![ms(100), ms(200), ms(400), ms(500), ms(500)]);
    }

    #[test]
    fn more_restarts_than_the_limit_within_the_window_escalates() {
        let mut p = policy(3, 60, 30_000);
        let t = Instant::now();
        for i in 0..3 {
            assert!(matches!(p.on_failure(t + Duration::from_secs(i)), Decision::Restart(_)));
        }
        assert_eq!(p.on_failure(t + Duration::from_secs(3)), Decision::Escalate { restarts_in_window: 4 });
    }

    #[test]
    fn failures_older_than_the_window_are_forgotten() {
        let mut p = policy(2, 10, 30_000);
        let t = Instant::now();
        p.on_failure(t);
        p.on_failure(t + Duration::from_secs(1));
        let later = t + Duration::from_secs(30);
        assert_eq!(p.on_failure(later), Decision::Restart(FIRST_BACKOFF));
        assert_eq!(p.total(), 3);
    }
}
