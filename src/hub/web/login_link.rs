//! One-time login links (`GET /login/once/{nonce}`, printed by `fieldlink
//! demo`): a random nonce, valid once and for [`TTL`], exchanged for a
//! session. A link copied out of the browser's history is worthless. Owns
//! only the nonces and their expiry (sans-IO: every call takes `now`); it
//! must not create sessions or touch HTTP.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::session::random_id;

/// How long a login link stays valid.
pub const TTL: Duration = Duration::from_secs(10 * 60);
/// The most links outstanding; minting past it drops the oldest.
const MAX_LINKS: usize = 64;

#[derive(Debug, Default)]
pub struct LoginLinks {
    nonces: Mutex<HashMap<String, Instant>>,
}

impl LoginLinks {
    /// A new nonce, valid once until `now + TTL`.
    pub fn mint(&self, now: Instant) -> Result<String, getrandom::Error> {
        let nonce = random_id()?;
        let mut nonces = self.nonces.lock().unwrap_or_else(PoisonError::into_inner);
        nonces.retain(|_, expires| now < *expires);
        if nonces.len() >= MAX_LINKS
            && let Some(oldest) = nonces.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone())
        {
            nonces.remove(&oldest);
        }
        nonces.insert(nonce.clone(), now + TTL);
        Ok(nonce)
    }

    /// Whether `nonce` is a live link; it is used up either way.
    pub fn redeem(&self, nonce: &str, now: Instant) -> bool {
        let removed = self.nonces.lock().unwrap_or_else(PoisonError::into_inner).remove(nonce);
        removed.is_some_and(|expires| now < expires)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_works_once() {
        let links = LoginLinks::default();
        let t = Instant::now();
        let nonce = links.mint(t).expect("random");
        assert!(links.redeem(&nonce, t));
        assert!(!links.redeem(&nonce, t), "replayed from the history: refused");
        assert!(!links.redeem("guess", t));
    }

    #[test]
    fn a_link_expires() {
        let links = LoginLinks::default();
        let t = Instant::now();
        let nonce = links.mint(t).expect("random");
        assert!(!links.redeem(&nonce, t + TTL));
    }
}
