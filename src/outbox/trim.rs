//! When the outbox writer hands freed heap back to the system
//! (`crate::memtrim::trim`): the rule alone, sans-IO, with the clock passed
//! in. It counts records and decides; it must not call the allocator, read
//! the clock or know about sled.
//!
//! A burst (a backlog recorded while the link is down, or replayed and
//! removed) leaves most of its peak free inside glibc's heap. The writer
//! trims during a long burst every [`TRIM_AFTER`] records, and once a
//! burst of at least [`TRIM_TAIL`] records is over: committed, and no
//! message for [`TRIM_QUIET`]. A heartbeat's trickle reaches `TRIM_TAIL`
//! only after hours, so an idle agent does not wake for it.

use std::time::{Duration, Instant};

/// Records stored or removed between two trims at most.
pub(crate) const TRIM_AFTER: u64 = 20_000;

/// Records stored or removed since the last trim that are enough for one
/// more once the writer is quiet.
pub(crate) const TRIM_TAIL: u64 = 1_000;

/// How long the writer waits without a message after a burst before it
/// trims: the end of a backlog recorded or drained, not a pause inside it.
pub(crate) const TRIM_QUIET: Duration = Duration::from_millis(500);

/// The writer's count of records since the last trim, and the trim it has
/// planned.
#[derive(Debug, Default)]
pub(crate) struct TrimRule {
    churn: u64,
    at: Option<Instant>,
}

impl TrimRule {
    /// A record was stored or removed.
    pub(crate) fn touched(&mut self) {
        self.churn += 1;
    }

    /// A message reached the writer: the burst goes on, a planned trim
    /// waits for its end.
    pub(crate) fn message(&mut self) {
        self.at = None;
    }

    /// When the writer should wake for a planned trim, if it gets no message.
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        self.at
    }

    /// The writer has nothing queued. `committed`: nothing stored waits for
    /// a commit (trimming before it left that commit's peak in the heap).
    /// `true`: trim now (the count starts again).
    pub(crate) fn idle(&mut self, now: Instant, committed: bool) -> bool {
        if !committed {
            // The commit's deadline wakes the writer; this runs again then.
            self.at = None;
            return false;
        }
        let quiet = match self.at {
            Some(at) => at <= now,
            None => {
                if self.churn >= TRIM_TAIL {
                    self.at = Some(now + TRIM_QUIET);
                }
                false
            }
        };
        if self.churn >= TRIM_AFTER || (quiet && self.churn >= TRIM_TAIL) {
            self.churn = 0;
            self.at = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touched(rule: &mut TrimRule, n: u64) {
        for _ in 0..n {
            rule.touched();
        }
    }

    #[test]
    fn a_burst_is_trimmed_once_it_is_committed_and_quiet_not_before() {
        let t0 = Instant::now();
        let mut rule = TrimRule::default();
        touched(&mut rule, 5_000);
        assert!(!rule.idle(t0, false), "not before the commit");
        assert_eq!(rule.wake_at(), None, "the commit's deadline wakes the writer, not a trim");
        assert!(!rule.idle(t0, true), "committed, but not quiet yet");
        assert_eq!(rule.wake_at(), Some(t0 + TRIM_QUIET));
        assert!(!rule.idle(t0 + TRIM_QUIET / 2, true));
        assert!(rule.idle(t0 + TRIM_QUIET, true), "quiet since the commit");
        assert_eq!(rule.wake_at(), None);
        assert!(!rule.idle(t0 + TRIM_QUIET * 10, true), "nothing since: no second trim");
    }

    #[test]
    fn a_message_inside_the_quiet_time_puts_the_trim_off_until_the_burst_ends() {
        let t0 = Instant::now();
        let mut rule = TrimRule::default();
        touched(&mut rule, 2_000);
        assert!(!rule.idle(t0, true));
        rule.message();
        touched(&mut rule, 10);
        assert_eq!(rule.wake_at(), None);
        let t1 = t0 + TRIM_QUIET;
        assert!(!rule.idle(t1, true), "the quiet time starts again after the last message");
        assert!(rule.idle(t1 + TRIM_QUIET, true));
    }

    #[test]
    fn a_long_burst_is_trimmed_every_twenty_thousand_records_without_waiting() {
        let t0 = Instant::now();
        let mut rule = TrimRule::default();
        touched(&mut rule, TRIM_AFTER);
        assert!(rule.idle(t0, true));
        touched(&mut rule, TRIM_AFTER - 1);
        assert!(!rule.idle(t0, true));
    }

    #[test]
    fn a_heartbeat_trickle_plans_no_trim_and_no_wake_up() {
        let t0 = Instant::now();
        let mut rule = TrimRule::default();
        for beat in 0..(TRIM_TAIL - 1) / 2 {
            touched(&mut rule, 2); // stored, then removed once acknowledged
            rule.message();
            assert!(!rule.idle(t0 + Duration::from_secs(30 * beat), true));
            assert_eq!(rule.wake_at(), None, "beat {beat}");
        }
    }
}
