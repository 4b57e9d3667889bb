//! Browser sessions (DESIGN: "HTTP API", sign-in): the random ids the
//! `fieldlink_session` cookie holds, kept in the hub's memory with their
//! expiry (idle and absolute), and revoked on logout. Owns only the table
//! and its clock arithmetic (sans-IO: every call takes `now`); it must not
//! touch HTTP or the token. A hub restart signs everyone out.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A session unused for this long is gone.
pub const IDLE: Duration = Duration::from_secs(12 * 60 * 60);
/// A session is gone this long after sign-in, used or not.
pub const ABSOLUTE: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// The most sessions kept; signing in past it drops the least recently used.
pub const MAX_SESSIONS: usize = 10_000;

/// 32 random bytes from the operating system, as lowercase hex: a session
/// id or a login-link nonce.
pub fn random_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    created: Instant,
    last_used: Instant,
}

/// The hub's sessions. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Sessions {
    table: Mutex<HashMap<String, Entry>>,
    idle: Duration,
    absolute: Duration,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(IDLE, ABSOLUTE)
    }
}

impl Sessions {
    pub fn new(idle: Duration, absolute: Duration) -> Sessions {
        Sessions { table: Mutex::new(HashMap::new()), idle, absolute }
    }

    fn live(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.last_used) < self.idle
            && now.saturating_duration_since(e.created) < self.absolute
    }

    /// Starts a session and returns its id.
    pub fn create(&self, now: Instant) -> Result<String, getrandom::Error> {
        let id = random_id()?;
        // A panic elsewhere cannot leave the map half-updated: every change
        // is one insert or remove, so a poisoned lock is still usable.
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.retain(|_, e| self.live(e, now));
        if table.len() >= MAX_SESSIONS
            && let Some(oldest) = table.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone())
        {
            table.remove(&oldest);
        }
        table.insert(id.clone(), Entry { created: now, last_used: now });
        Ok(id)
    }

    /// Whether `id` is a live session; using it resets its idle clock.
    pub fn check(&self, id: &str, now: Instant) -> bool {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        match table.get_mut(id) {
            Some(e) if self.live(e, now) => {
                e.last_used = now;
                true
            }
            Some(_) => {
                table.remove(id);
                false
            }
            None => false,
        }
    }

    /// Ends the session `id` (logout); whether it was there.
    pub fn revoke(&self, id: &str) -> bool {
        self.table.lock().unwrap_or_else(PoisonError::into_inner).remove(id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn a_new_session_is_valid_until_it_is_revoked() {
        let s = Sessions::default();
        let t = Instant::now();
        let id = s.create(t).expect("random");
        assert_eq!(id.len(), 64);
        assert!(s.check(&id, t));
        assert!(!s.check("not-a-session", t));
        assert!(s.revoke(&id));
        assert!(!s.check(&id, t), "a revoked session stops working");
        assert!(!s.revoke(&id));
    }

    #[test]
    fn a_session_expires_when_idle_and_after_its_absolute_lifetime() {
        let s = Sessions::new(12 * H, 7 * 24 * H);
        let t = Instant::now();
        let idle = s.create(t).expect("random");
        assert!(s.check(&idle, t + 11 * H));
        assert!(s.check(&idle, t + 22 * H), "use resets the idle clock");
        assert!(!s.check(&idle, t + 35 * H), "12 h unused: gone");

        let busy = s.create(t).expect("random");
        let mut now = t;
        while now < t + 7 * 24 * H - H {
            assert!(s.check(&busy, now));
            now += H;
        }
        assert!(!s.check(&busy, t + 7 * 24 * H), "7 days after sign-in: gone, however busy");
    }

    #[test]
    fn two_sessions_have_different_ids() {
        let s = Sessions::default();
        let t = Instant::now();
        assert_ne!(s.create(t).expect("random"), s.create(t).expect("random"));
    }
}
