//! The disk fault: what the writer remembers while the outbox cannot write
//! (sled's I/O error is sticky, so a full disk fails every later write until
//! the database is reopened). Owns the reopen back-off, what is shed and
//! what is kept while the fault lasts, and the log lines for entering and
//! leaving it. Sans-IO: it never touches the store; the writer asks it what
//! to do and does it.
//!
//! Rules while the disk fails:
//! * a new heartbeat is shed (dropped and counted) at once: heartbeats go
//!   before events;
//! * a new event is kept in memory, with every record written since the last
//!   commit, and written when the database is reopened; if what is kept
//!   grows past [`Fault::retain_limit`], the oldest kept heartbeat is
//!   dropped first, then the oldest kept event;
//! * whether the disk has room is checked every max(`flush_interval`,
//!   100 ms); a reopen is tried once it seems to, with back-off from that
//!   interval, doubling up to 30 s after each failed reopen, and at once
//!   when someone asks for a flush.

use std::time::{Duration, Instant};

use super::Class;

/// Reopen back-off: from max(flush_interval, this) ...
pub(crate) const MIN_RETRY: Duration = Duration::from_millis(100);
/// ... doubling up to this.
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(30);
/// At most this many bytes of records are kept in memory while the disk
/// fails (and never more than `max_bytes`).
pub(crate) const MAX_RETAINED_BYTES: u64 = 4 << 20;

/// A disk fault in progress.
#[derive(Debug)]
pub(crate) struct Fault {
    pub since: Instant,
    /// The error that started it.
    pub cause: String,
    /// Failed reopen attempts so far.
    pub attempts: u32,
    pub next_try: Instant,
    base: Duration,
    /// Heartbeats shed and kept records dropped during this fault.
    pub shed: u64,
    /// Events kept in memory during this fault (new appends only).
    pub kept: u64,
}

impl Fault {
    /// A fault starting now; the first reopen is tried after `base`
    /// (max(flush_interval, [`MIN_RETRY`])).
    pub(crate) fn new(now: Instant, cause: String, flush_interval: Duration) -> Fault {
        let base = flush_interval.max(MIN_RETRY);
        Fault { since: now, cause, attempts: 0, next_try: now + base, base, shed: 0, kept: 0 }
    }

    /// Whether a reopen is due.
    pub(crate) fn due(&self, now: Instant) -> bool {
        now >= self.next_try
    }

    /// Records a failed reopen and schedules the next: base × 2^attempts,
    /// capped at [`MAX_RETRY`]. Returns the wait.
    pub(crate) fn failed(&mut self, now: Instant) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        let wait = self.base.saturating_mul(1 << self.attempts.min(16)).min(MAX_RETRY);
        self.next_try = now + wait;
        wait
    }

    /// The disk has no room yet: look again after the base interval (a
    /// `statvfs` is cheap; only failed reopens back off).
    pub(crate) fn no_room_yet(&mut self, now: Instant) {
        self.next_try = now + self.base;
    }

    /// What a new record of `class` becomes while the disk fails.
    pub(crate) fn admit(&mut self, class: Class) -> Admit {
        match class {
            Class::Heartbeat => {
                self.shed += 1;
                Admit::Shed
            }
            Class::Event => {
                self.kept += 1;
                Admit::Keep
            }
        }
    }
}

/// See [`Fault::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Drop it and count it.
    Shed,
    /// Keep it in memory until the database can be written again.
    Keep,
}

/// How many bytes of records the writer keeps in memory during a fault.
pub(crate) fn retain_limit(max_bytes: u64) -> u64 {
    max_bytes.min(MAX_RETAINED_BYTES)
}

/// Which kept record to drop when over [`retain_limit`]: the oldest
/// heartbeat, else the oldest event. `kept` is in seq order.
pub(crate) fn victim<'a>(mut kept: impl Iterator<Item = (u64, Class)> + Clone + 'a) -> Option<u64> {
    kept.clone().find(|(_, c)| *c == Class::Heartbeat).or_else(|| kept.next()).map(|(seq, _)| seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_tries_back_off_from_the_base_doubling_up_to_thirty_seconds() {
        let t0 = Instant::now();
        let mut f = Fault::new(t0, "disk full".into(), Duration::from_millis(5));
        assert!(!f.due(t0));
        assert!(f.due(t0 + MIN_RETRY));
        let waits: Vec<Duration> = (0..12).map(|_| f.failed(t0)).collect();
        assert_eq!(waits[0], Duration::from_millis(200));
        assert_eq!(waits[1], Duration::from_millis(400));
        assert_eq!(*waits.last().expect("waits"), MAX_RETRY);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        let mut slow = Fault::new(t0, "x".into(), Duration::from_secs(1));
        assert_eq!(slow.next_try, t0 + Duration::from_secs(1), "a long flush_interval is the base");
        let _wait = slow.failed(t0);
        slow.no_room_yet(t0);
        assert_eq!(slow.next_try, t0 + Duration::from_secs(1), "waiting for room does not back off");
    }

    #[test]
    fn heartbeats_are_shed_and_events_kept_while_the_disk_fails() {
        let mut f = Fault::new(Instant::now(), "disk full".into(), Duration::ZERO);
        assert_eq!(f.admit(Class::Heartbeat), Admit::Shed);
        assert_eq!(f.admit(Class::Event), Admit::Keep);
        assert_eq!((f.shed, f.kept), (1, 1));
    }

    #[test]
    fn over_the_retain_limit_the_oldest_kept_heartbeat_goes_first_then_the_oldest_event() {
        let kept = [(3, Class::Event), (4, Class::Heartbeat), (5, Class::Heartbeat)];
        assert_eq!(victim(kept.iter().copied()), Some(4));
        let events = [(3, Class::Event), (6, Class::Event)];
        assert_eq!(victim(events.iter().copied()), Some(3));
        assert_eq!(victim(std::iter::empty()), None);
        assert_eq!(retain_limit(64 << 20), MAX_RETAINED_BYTES);
        assert_eq!(retain_limit(65_536), 65_536);
    }
}
