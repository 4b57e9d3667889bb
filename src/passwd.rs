//! MQTT credentials in mosquitto's password file format, shared by device
//! provisioning (`hub::devices`, which writes the file) and the embedded
//! broker (`broker`, which checks CONNECTs against it). Owns the file format,
//! the PBKDF2-SHA512 hash and fresh random passwords. It must not decide who
//! may do what (that is the broker's policy) nor signal any process.
//!
//! # The format
//!
//! One line per user, `user:$7$<iterations>$<base64 salt>$<base64 hash>`:
//! PBKDF2-HMAC-SHA512 with a 12-byte salt and a 64-byte hash, 101 iterations
//! (mosquitto 2's `mosquitto_passwd` default; see mosquitto
//! `apps/mosquitto_passwd/mosquitto_passwd.c` `PW_DEFAULT_ITERATIONS` and
//! `src/password_mosq.c` `pw__hash`). Checked against a line made by
//! `mosquitto_passwd -b` 2.0.11 (unit test) and against a real broker
//! (tests/hub_devices.rs).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::pbkdf2;

use crate::fsutil;

/// mosquitto 2's default PBKDF2 iteration count.
pub const ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;
/// Characters in a fresh password.
pub const PASSWORD_LEN: usize = 32;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    #[error("{path}: line {line} is not 'user:$7$iterations$salt$hash'")]
    BadLine { path: PathBuf, line: usize },
    #[error("cannot {what} '{path}': {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// A password line's hash part, `$7$...`, for `password` with `salt`.
pub fn hash(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut out = [0u8; HASH_LEN];
    let rounds = std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA512, rounds, salt, password.as_bytes(), &mut out);
    format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(out))
}

/// Whether `password` matches a `$7$` hash (as mosquitto checks it; the
/// comparison is constant-time, `ring::pbkdf2::verify`).
pub fn verify(hashed: &str, password: &[u8]) -> bool {
    let parts: Vec<&str> = hashed.split('$').collect();
    let ["", "7", iterations, salt, expected] = parts.as_slice() else {
        return false;
    };
    let (Ok(iterations), Ok(salt), Ok(expected)) = (iterations.parse::<u32>(), B64.decode(salt), B64.decode(expected))
    else {
        return false;
    };
    let Some(rounds) = std::num::NonZeroU32::new(iterations) else {
        return false;
    };
    pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA512, rounds, &salt, password, &expected).is_ok()
}

fn random_bytes(buf: &mut [u8]) -> Result<(), PasswdError> {
    getrandom::fill(buf).map_err(|e| PasswdError::Random(e.to_string()))
}

/// A fresh random password: [`PASSWORD_LEN`] characters of `[A-Za-z0-9]`
/// (190 bits).
pub fn new_password() -> Result<String, PasswdError> {
    let mut out = String::with_capacity(PASSWORD_LEN);
    while out.len() < PASSWORD_LEN {
        let mut buf = [0u8; 64];
        random_bytes(&mut buf)?;
        // Rejection sampling: 248 = 4 * 62, so every character is equally likely.
        for b in buf.into_iter().filter(|b| *b < 248) {
            if out.len() < PASSWORD_LEN {
                out.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
            }
        }
    }
    Ok(out)
}

/// The hash of `password` with a fresh random salt.
pub fn new_hash(password: &str) -> Result<String, PasswdError> {
    let mut salt = [0u8; SALT_LEN];
    random_bytes(&mut salt)?;
    Ok(hash(password, &salt, ITERATIONS))
}

/// The users of one password file, in file order.
pub struct Passwd {
    pub path: PathBuf,
    /// `(user, "$7$..." hash)`.
    pub users: Vec<(String, String)>,
}

impl Passwd {
    /// Reads `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<Passwd, PasswdError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(PasswdError::Io { what: "read", path: path.to_path_buf(), source }),
        };
        let mut users = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hashed)) = line.split_once(':').filter(|(u, h)| !u.is_empty() && h.starts_with('$')) else {
                return Err(PasswdError::BadLine { path: path.to_path_buf(), line: i + 1 });
            };
            users.push((user.to_string(), hashed.to_string()));
        }
        Ok(Passwd { path: path.to_path_buf(), users })
    }

    pub fn find(&self, user: &str) -> Option<usize> {
        self.users.iter().position(|(u, _)| u == user)
    }

    /// Writes the file atomically, mode 0600.
    pub fn save(&self) -> Result<(), PasswdError> {
        let text: String = self.users.iter().map(|(u, h)| format!("{u}:{h}\n")).collect();
        fsutil::write_atomic_private(&self.path, text.as_bytes()).map_err(|source| PasswdError::Io {
            what: "write",
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with `mosquitto_passwd -b pw.txt dev-a secret123` (mosquitto 2.0.11).
    const FROM_MOSQUITTO: &str = "$7$101$jgI4rMNPLKoYTKwH$0eJ3mzg4KDtdOZeVk88cFA8Z267+k25meHeL3xEI5ZwHsUaQUhHbHuqmFenCydGnCufpSYoM9MaiF9gODnmeoQ==";

    #[test]
    fn a_line_made_by_mosquitto_passwd_verifies_and_our_hash_reproduces_it() {
        assert!(verify(FROM_MOSQUITTO, b"secret123"));
        assert!(!verify(FROM_MOSQUITTO, b"secret124"));
        let salt = B64.decode("jgI4rMNPLKoYTKwH").expect("salt");
        assert_eq!(hash("secret123", &salt, 101), FROM_MOSQUITTO);
    }

    #[test]
    fn passwords_are_long_random_and_never_repeat() {
        let (a, b) = (new_password().expect("random"), new_password().expect("random"));
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn garbage_hashes_never_verify() {
        for bad in ["", "$7$", "$7$0$AAAA$AAAA", "$6$101$jgI4rMNPLKoYTKwH$AAAA", "plain"] {
            assert!(!verify(bad, b""), "{bad}");
            assert!(!verify(bad, b"secret123"), "{bad}");
        }
    }
}
