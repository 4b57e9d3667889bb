//! Software debounce, sans-IO: for a cdev line whose kernel refused a
//! `debounce_period` (uAPI v1, or a driver that rejects it). Owns the rule
//! "report a level only once it has been stable for `period`, and only when
//! it differs from the last one reported"; it reads no clock and no line
//! (the caller passes raw edges with their time and asks at the deadline).

use std::time::{Duration, Instant};

use super::Level;

#[derive(Debug, Clone)]
pub struct Debouncer {
    period: Duration,
    reported: Level,
    /// The newest raw level and when it was seen.
    pending: Option<(Level, Instant)>,
}

impl Debouncer {
    /// `reported` is the level the caller already knows (read at claim time).
    pub fn new(period: Duration, reported: Level) -> Debouncer {
        Debouncer { period, reported, pending: None }
    }

    /// A raw edge: the line is at `level` since `at`.
    pub fn raw(&mut self, level: Level, at: Instant) {
        self.pending = Some((level, at));
    }

    /// When to call [`Debouncer::poll`] next (`None`: wait for an edge).
    pub fn deadline(&self) -> Option<Instant> {
        self.pending.map(|(_, at)| at + self.period)
    }

    /// The debounced level, if one became due by `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Level> {
        let (level, at) = self.pending?;
        if now.saturating_duration_since(at) < self.period {
            return None;
        }
        self.pending = None;
        if level == self.reported {
            return None;
        }
        self.reported = level;
        Some(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_millis(50);

    #[test]
    fn a_level_held_for_the_period_is_reported_once() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(P, Level::High);
        d.raw(Level::Low, t0);
        assert_eq!(d.poll(t0 + Duration::from_millis(49)), None);
        assert_eq!(d.deadline(), Some(t0 + P));
        assert_eq!(d.poll(t0 + P), Some(Level::Low));
        assert_eq!(d.poll(t0 + 2 * P), None);
        assert_eq!(d.deadline(), None);
    }

    #[test]
    fn bounces_that_end_where_they_started_report_nothing() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(P, Level::High);
        for i in 0..10u32 {
            let level = if i % 2 == 0 { Level::Low } else { Level::High };
            d.raw(level, t0 + Duration::from_millis(u64::from(i) * 3));
        }
        assert_eq!(d.poll(t0 + Duration::from_secs(1)), None, "ended High, as it began");
    }

    /// Model test: random raw edges against a plain rule computed from the
    /// whole trace (a level is reported when it was held at least `P` and
    /// differs from the previous report).
    #[test]
    fn random_bounces_report_exactly_the_levels_held_for_the_period() {
        for round in 0..200u64 {
            let mut rng = fastrand::Rng::with_seed(round);
            let t0 = Instant::now();
            let mut trace = Vec::new();
            let mut t = Duration::ZERO;
            for _ in 0..rng.usize(1..40) {
                t += Duration::from_millis(rng.u64(1..120));
                trace.push((if rng.bool() { Level::High } else { Level::Low }, t0 + t));
            }
            let end = t0 + t + 2 * P;

            // The real debouncer, polled at each deadline before the next edge.
            let mut d = Debouncer::new(P, Level::High);
            let mut got = Vec::new();
            for &(level, at) in &trace {
                if let Some(due) = d.deadline()
                    && due <= at
                {
                    got.extend(d.poll(due));
                }
                d.raw(level, at);
            }
            if let Some(due) = d.deadline() {
                got.extend(d.poll(due.max(end)));
            }

            // The model.
            let mut want = Vec::new();
            let mut reported = Level::High;
            for (i, &(level, at)) in trace.iter().enumerate() {
                let until = trace.get(i + 1).map_or(end, |&(_, next)| next);
                if until.saturating_duration_since(at) >= P && level != reported {
                    reported = level;
                    want.push(level);
                }
            }
            assert_eq!(got, want, "round {round}: {trace:?}");
        }
    }
}
