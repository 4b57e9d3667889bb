//! When records that wait for the hub's confirmation are sent again, and
//! when to say that no hub confirms anything (DESIGN: Delivery promises,
//! `outbox.confirm = "hub"`). Sans-IO: the Link passes `now` in and
//! performs what it is told; which records go again is the delivery
//! state's business ([`super::delivery::Delivery::resend_unconfirmed`]). It
//! must never touch a socket, the outbox or a real clock.
//!
//! # Rules
//!
//! * The time-out starts at `confirm_timeout` and is armed when a record
//!   starts waiting and none was waiting. When it runs out the Link resends
//!   (the delivery state picks the records that waited a whole time-out)
//!   and it is armed again, doubled, up to [`MAX_CONFIRM_TIMEOUT`], while
//!   records still wait. A confirmation that removes anything resets it to
//!   `confirm_timeout` (for the next arming; it does not push the current
//!   deadline out, so a record the hub lost is sent again even while the
//!   hub confirms others).
//! * When the broker has acknowledged records for [`WARN_AFTER`] and no
//!   confirmation has ever come, one warning: this is probably a plain
//!   broker (`outbox.confirm = "broker"` is then the setting).

use std::time::{Duration, Instant};

pub use crate::config::MAX_CONFIRM_TIMEOUT;

/// How long records may wait, with no confirmation ever, before the
/// warning that no fieldlink hub confirms.
pub const WARN_AFTER: Duration = Duration::from_secs(120);

/// What a [`ConfirmClock::tick`] says to do now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tick {
    /// Send unconfirmed records again (the time-out ran out).
    pub resend: bool,
    /// Log, once, that no hub has confirmed anything in [`WARN_AFTER`].
    pub warn: bool,
}

/// See the module doc.
#[derive(Debug)]
pub struct ConfirmClock {
    base: Duration,
    current: Duration,
    deadline: Option<Instant>,
    /// Since when records have waited with no confirmation ever.
    waiting_since: Option<Instant>,
    confirmed_ever: bool,
    warned: bool,
}

impl ConfirmClock {
    /// `timeout`: `outbox.confirm_timeout`.
    pub fn new(timeout: Duration) -> ConfirmClock {
        let base = timeout.min(MAX_CONFIRM_TIMEOUT);
        ConfirmClock { base, current: base, deadline: None, waiting_since: None, confirmed_ever: false, warned: false }
    }

    /// When the Link should next call [`ConfirmClock::tick`]: the time-out's
    /// deadline or the moment to warn, whichever comes first; `None` while
    /// neither is armed (nothing waits, and no warning can be due), so an
    /// agent whose records are all confirmed has no timer at all.
    pub fn next_wake(&self) -> Option<Instant> {
        let warn =
            (!self.warned && !self.confirmed_ever).then_some(self.waiting_since).flatten().map(|w| w + WARN_AFTER);
        match (self.deadline, warn) {
            (Some(d), Some(w)) => Some(d.min(w)),
            (d, w) => d.or(w),
        }
    }

    /// The time-out the next arming uses.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// After anything that may have changed what waits: `unconfirmed`
    /// records wait now; `progress` when a confirmation removed some.
    pub fn update(&mut self, now: Instant, unconfirmed: usize, progress: bool) {
        if progress {
            self.current = self.base;
            self.confirmed_ever = true;
            self.waiting_since = None;
        }
        if unconfirmed == 0 {
            self.deadline = None;
            return;
        }
        if self.deadline.is_none() {
            self.deadline = Some(now + self.current);
        }
        if !self.confirmed_ever && self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
    }

    /// Called at [`ConfirmClock::next_wake`] (calling it at any other time
    /// is harmless: nothing is due then).
    pub fn tick(&mut self, now: Instant) -> Tick {
        let mut t = Tick::default();
        if self.deadline.is_some_and(|d| d <= now) {
            t.resend = true;
            self.current = (self.current * 2).min(MAX_CONFIRM_TIMEOUT.max(self.base));
            self.deadline = Some(now + self.current);
        }
        if !self.warned && !self.confirmed_ever && self.waiting_since.is_some_and(|w| now >= w + WARN_AFTER) {
            self.warned = true;
            t.warn = true;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_time_out_doubles_while_nothing_is_confirmed_and_progress_resets_it() {
        let t0 = Instant::now();
        let mut c = ConfirmClock::new(s(30));
        c.update(t0, 3, false);
        assert!(!c.tick(t0 + s(29)).resend);
        assert!(c.tick(t0 + s(30)).resend, "30 s after the first record started waiting");
        assert!(!c.tick(t0 + s(89)).resend, "then 60 s");
        assert!(c.tick(t0 + s(90)).resend);
        assert_eq!(c.current(), s(120));
        c.update(t0 + s(100), 1, true);
        assert_eq!(c.current(), s(30), "a confirmation resets the doubling");
        assert!(c.tick(t0 + s(210)).resend, "but keeps the deadline that was armed");
        assert!(!c.tick(t0 + s(269)).resend);
        assert!(c.tick(t0 + s(270)).resend, "and doubles from 30 s again");
    }

    #[test]
    fn the_time_out_is_capped_at_ten_minutes() {
        let t0 = Instant::now();
        let mut c = ConfirmClock::new(s(30));
        c.update(t0, 1, false);
        let mut now = t0;
        for _ in 0..20 {
            now += c.current();
            assert!(c.tick(now).resend);
        }
        assert_eq!(c.current(), MAX_CONFIRM_TIMEOUT);
    }

    #[test]
    fn nothing_waiting_disarms_it() {
        let t0 = Instant::now();
        let mut c = ConfirmClock::new(s(1));
        c.update(t0, 2, false);
        c.update(t0, 0, true);
        assert!(!c.tick(t0 + s(100)).resend);
        c.update(t0 + s(100), 1, false);
        assert!(!c.tick(t0 + s(100)).resend);
        assert!(c.tick(t0 + s(101)).resend);
    }

    #[test]
    fn no_confirmation_for_two_minutes_warns_once_and_never_after_a_confirmation() {
        let t0 = Instant::now();
        let mut c = ConfirmClock::new(s(30));
        c.update(t0, 1, false);
        assert!(!c.tick(t0 + s(119)).warn);
        assert!(c.tick(t0 + s(120)).warn);
        assert!(!c.tick(t0 + s(500)).warn, "once");

        let mut hub = ConfirmClock::new(s(30));
        hub.update(t0, 1, false);
        hub.update(t0 + s(1), 1, true);
        assert!(!hub.tick(t0 + s(600)).warn, "a hub answered once: it exists");
    }

    #[test]
    fn the_clock_asks_to_be_woken_only_when_something_is_due() {
        let t0 = Instant::now();
        let mut c = ConfirmClock::new(s(30));
        assert_eq!(c.next_wake(), None, "nothing waits: no timer");
        c.update(t0, 1, false);
        assert_eq!(c.next_wake(), Some(t0 + s(30)), "the time-out first");
        let mut now = t0;
        while let Some(at) = c.next_wake() {
            now = at;
            let t = c.tick(now);
            assert!(t.resend || t.warn, "every wake finds something due at {:?}", now - t0);
            if t.warn {
                break;
            }
        }
        assert_eq!(now, t0 + s(120), "the warning is due 2 min after records began to wait");
        c.update(now, 0, true);
        assert_eq!(c.next_wake(), None, "all confirmed: no timer, and no warning can be due");
    }

    #[test]
    fn with_nothing_waiting_the_warning_alone_still_wakes_the_clock() {
        let t0 = Instant::now();
        let mut c = ConfirmClock::new(s(30));
        c.update(t0, 1, false);
        c.update(t0 + s(1), 0, false);
        assert_eq!(c.next_wake(), Some(t0 + WARN_AFTER));
        assert!(c.tick(t0 + WARN_AFTER).warn);
        assert_eq!(c.next_wake(), None);
    }
}
