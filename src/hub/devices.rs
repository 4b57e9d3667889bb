//! Device provisioning for a hub-managed mosquitto (`fieldlink hub device
//! add|list|remove`). Owns the two files mosquitto reads from the hub's
//! `state_dir`: `mosquitto.passwd` (mosquitto_passwd format, PBKDF2-SHA512)
//! and `mosquitto.acl`, and the SIGHUP that makes mosquitto reread them. It
//! must not start or talk to a broker, touch the database, or ever write a
//! password anywhere but into the text `add` returns once.
//!
//! # The password file
//!
//! One line per user, `user:$7$<iterations>$<base64 salt>$<base64 hash>`:
//! PBKDF2-HMAC-SHA512 with a 12-byte salt and a 64-byte hash, 101 iterations
//! (mosquitto 2's `mosquitto_passwd` default; see mosquitto
//! `apps/mosquitto_passwd/mosquitto_passwd.c` `PW_DEFAULT_ITERATIONS` and
//! `src/password_mosq.c` `pw__hash`). Checked against a line made by
//! `mosquitto_passwd -b` 2.0.11 (unit test) and against a real broker
//! (tests/hub_devices.rs).
//!
//! # The ACL
//!
//! `pattern` lines with `%u` give every device exactly its own topics, so
//! the ACL names only the hub's user and never changes with the devices; a
//! removed device loses access because its password line is gone. Patterns
//! apply to every user; the hub's user gets `P/#` on top.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::pbkdf2;

use crate::config::hub::{BrokerMode, HubConfig};
use crate::fsutil;

/// The password file, in `state_dir`.
pub const PASSWD_FILE: &str = "mosquitto.passwd";
/// The ACL file, in `state_dir`.
pub const ACL_FILE: &str = "mosquitto.acl";
/// mosquitto 2's default PBKDF2 iteration count.
pub const ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;
const PASSWORD_LEN: usize = 32;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("device id '{0}' is not valid (expected [A-Za-z0-9_-]{{1,64}}, as the agent's device_id)")]
    BadId(String),
    #[error("device '{0}' exists already (remove it first to issue a new password)")]
    Exists(String),
    #[error("device '{0}' is not provisioned (see `fieldlink hub device list`)")]
    Unknown(String),
    #[error("'{0}' is the hub's own user (broker.username), not a device")]
    HubUser(String),
    #[error("{path}: line {line} is not 'user:$7$iterations$salt$hash'")]
    BadLine { path: PathBuf, line: usize },
    #[error("cannot {what} '{path}': {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

impl DevicesError {
    /// 2 for a bad request (usage), 1 for a runtime failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            DevicesError::BadId(_) | DevicesError::Exists(_) | DevicesError::Unknown(_) | DevicesError::HubUser(_) => 2,
            _ => 1,
        }
    }
}

/// A password line's hash part, `$7$...`, for `password` with `salt`.
pub fn hash(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut out = [0u8; HASH_LEN];
    let rounds = std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA512, rounds, salt, password.as_bytes(), &mut out);
    format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(out))
}

/// Whether `password` matches a `$7$` hash (as mosquitto checks it).
pub fn verify(hashed: &str, password: &str) -> bool {
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
    pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA512, rounds, &salt, password.as_bytes(), &expected).is_ok()
}

fn random_bytes(buf: &mut [u8]) -> Result<(), DevicesError> {
    getrandom::fill(buf).map_err(|e| DevicesError::Random(e.to_string()))
}

/// A fresh random password: 32 characters of `[A-Za-z0-9]` (190 bits).
fn new_password() -> Result<String, DevicesError> {
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

fn new_hash(password: &str) -> Result<String, DevicesError> {
    let mut salt = [0u8; SALT_LEN];
    random_bytes(&mut salt)?;
    Ok(hash(password, &salt, ITERATIONS))
}

/// The ACL for topic prefix `prefix` and the hub's user `hub_user`.
pub fn acl_text(prefix: &str, hub_user: Option<&str>) -> String {
    let mut s = String::from(
        "# Written by `fieldlink hub device ...`; edits are overwritten.\n\
         # Every device (its user name is its device id) gets its own topics only.\n",
    );
    let _ = writeln!(s, "pattern write {prefix}/%u/#");
    let _ = writeln!(s, "pattern read {prefix}/%u/relay/+/set");
    let _ = writeln!(s, "pattern readwrite {prefix}/%u/sync");
    let _ = writeln!(s, "pattern read {prefix}/%u/ack");
    // Home Assistant discovery (DESIGN: Home Assistant discovery), under
    // Home Assistant's default prefix.
    let ha = crate::agent::homeassistant::DEFAULT_PREFIX;
    let _ = writeln!(s, "pattern write {ha}/+/%u/+/config");
    let _ = writeln!(s, "pattern read {ha}/status");
    if let Some(user) = hub_user {
        let _ = writeln!(
            s,
            "\n# The hub reads everything, sends commands and confirms storage (P/+/ack).\nuser {user}\ntopic readwrite {prefix}/#"
        );
    }
    s
}

/// The provisioned users, in file order.
struct Passwd {
    path: PathBuf,
    users: Vec<(String, String)>,
}

impl Passwd {
    fn load(path: &Path) -> Result<Passwd, DevicesError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(DevicesError::Io { what: "read", path: path.to_path_buf(), source }),
        };
        let mut users = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hashed)) = line.split_once(':').filter(|(u, h)| !u.is_empty() && h.starts_with('$')) else {
                return Err(DevicesError::BadLine { path: path.to_path_buf(), line: i + 1 });
            };
            users.push((user.to_string(), hashed.to_string()));
        }
        Ok(Passwd { path: path.to_path_buf(), users })
    }

    fn find(&self, user: &str) -> Option<usize> {
        self.users.iter().position(|(u, _)| u == user)
    }

    fn save(&self) -> Result<(), DevicesError> {
        let text: String = self.users.iter().map(|(u, h)| format!("{u}:{h}\n")).collect();
        fsutil::write_atomic_private(&self.path, text.as_bytes()).map_err(|source| DevicesError::Io {
            what: "write",
            path: self.path.clone(),
            source,
        })
    }
}

/// The hub config's part that provisioning needs.
pub struct Provisioning {
    pub state_dir: PathBuf,
    pub topic_prefix: String,
    pub hub_user: Option<String>,
    pub hub_password: Option<String>,
    pub pid_file: Option<PathBuf>,
    /// The broker url the agents should use, when the hub's config knows it.
    pub url: Option<String>,
}

impl Provisioning {
    pub fn from_config(cfg: &HubConfig) -> Provisioning {
        let url = match &cfg.broker.mode {
            BrokerMode::External { url } => {
                let host = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() };
                Some(format!("{}://{host}:{}", if url.tls { "mqtts" } else { "mqtt" }, url.port))
            }
            BrokerMode::Embedded { .. } => None,
        };
        Provisioning {
            state_dir: cfg.state_dir.clone(),
            topic_prefix: cfg.topic_prefix.clone(),
            hub_user: cfg.broker.username.clone(),
            hub_password: cfg.broker.password.as_ref().map(|s| s.0.clone()),
            pid_file: cfg.broker.mosquitto_pid_file.clone(),
            url,
        }
    }

    pub fn passwd_path(&self) -> PathBuf {
        self.state_dir.join(PASSWD_FILE)
    }

    pub fn acl_path(&self) -> PathBuf {
        self.state_dir.join(ACL_FILE)
    }

    fn check_id(&self, id: &str) -> Result<(), DevicesError> {
        let valid =
            (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(DevicesError::BadId(id.escape_debug().to_string()));
        }
        if self.hub_user.as_deref() == Some(id) {
            return Err(DevicesError::HubUser(id.to_string()));
        }
        Ok(())
    }

    /// Loads the password file with the hub's user brought up to date.
    fn load(&self) -> Result<Passwd, DevicesError> {
        fs::create_dir_all(&self.state_dir).map_err(|source| DevicesError::Io {
            what: "create",
            path: self.state_dir.clone(),
            source,
        })?;
        let mut passwd = Passwd::load(&self.passwd_path())?;
        if let (Some(user), Some(password)) = (&self.hub_user, &self.hub_password) {
            match passwd.find(user) {
                Some(i) if verify(&passwd.users[i].1, password) => {}
                Some(i) => passwd.users[i].1 = new_hash(password)?,
                None => passwd.users.insert(0, (user.clone(), new_hash(password)?)),
            }
        }
        Ok(passwd)
    }

    fn save(&self, passwd: &Passwd) -> Result<String, DevicesError> {
        passwd.save()?;
        let acl = acl_text(&self.topic_prefix, self.hub_user.as_deref());
        let path = self.acl_path();
        fsutil::write_atomic_private(&path, acl.as_bytes()).map_err(|source| DevicesError::Io {
            what: "write",
            path,
            source,
        })?;
        let mut done = self.reload();
        match (&self.hub_user, &self.hub_password) {
            (None, _) => done.push_str(
                "\nWARNING: broker.username is not set: no user may read the devices' topics, so the hub cannot collect; \
                 set broker.username and broker.password_file in the hub config",
            ),
            (Some(user), None) => done.push_str(&format!(
                "\nWARNING: broker.username '{user}' has no password (broker.password_file or env FIELDLINK_HUB_MQTT_PASSWORD): \
                 its line in the password file was not created or updated"
            )),
            _ => {}
        }
        Ok(done)
    }

    /// The devices, sorted (ids only: passwords are never shown again).
    pub fn list(&self) -> Result<Vec<String>, DevicesError> {
        let passwd = Passwd::load(&self.passwd_path())?;
        let mut ids: Vec<String> =
            passwd.users.into_iter().map(|(u, _)| u).filter(|u| Some(u) != self.hub_user.as_ref()).collect();
        ids.sort();
        Ok(ids)
    }

    /// Creates `id` with a new password; returns the text to print once:
    /// the password, a ready-to-paste `[mqtt]` section and what was done
    /// about reloading mosquitto.
    pub fn add(&self, id: &str, url: Option<&str>) -> Result<String, DevicesError> {
        self.check_id(id)?;
        let mut passwd = self.load()?;
        if passwd.find(id).is_some() {
            return Err(DevicesError::Exists(id.to_string()));
        }
        let password = new_password()?;
        passwd.users.push((id.to_string(), new_hash(&password)?));
        let reload = self.save(&passwd)?;
        let url = url.or(self.url.as_deref()).unwrap_or("mqtts://hub.example:8883");
        let prefix = &self.topic_prefix;
        Ok(format!(
            "device '{id}' added to {passwd}\n\
             {reload}\n\
             \n\
             Its password is shown only now:\n\
             \n    {password}\n\n\
             On the device, store it readable by the agent's user only (here: root):\n\
             \n    sudo sh -c 'umask 077; echo {password} > /etc/fieldlink/mqtt.pass; chmod 600 /etc/fieldlink/mqtt.pass'\n\n\
             and use this in its agent.toml:\n\
             \n\
             device_id = \"{id}\"\n\
             \n\
             [mqtt]\n\
             url = \"{url}\"\n\
             client_id = \"{id}\"               # the broker binds the client id to the user name\n\
             topic_prefix = \"{prefix}\"\n\
             username = \"{id}\"\n\
             password_file = \"/etc/fieldlink/mqtt.pass\"\n\
             # ca_file = \"/etc/fieldlink/ca.pem\"  # with mqtts://: the CA that signed the broker's certificate\n",
            passwd = self.passwd_path().display(),
        ))
    }

    /// Removes `id`; returns what was done about reloading mosquitto.
    pub fn remove(&self, id: &str) -> Result<String, DevicesError> {
        self.check_id(id)?;
        let mut passwd = self.load()?;
        let Some(i) = passwd.find(id) else {
            return Err(DevicesError::Unknown(id.to_string()));
        };
        passwd.users.remove(i);
        let reload = self.save(&passwd)?;
        Ok(format!("device '{id}' removed from {}\n{reload}", self.passwd_path().display()))
    }

    /// Writes the files (hub user and ACL) without changing any device.
    pub fn sync(&self) -> Result<String, DevicesError> {
        let passwd = self.load()?;
        self.save(&passwd)
    }

    /// SIGHUP to mosquitto when its pid file is configured; one line saying
    /// what happened.
    fn reload(&self) -> String {
        let manual = "reload mosquitto to apply it (e.g. `systemctl reload mosquitto` or `kill -HUP <pid>`); \
                      on reload mosquitto disconnects clients whose user was removed";
        let Some(pid_file) = &self.pid_file else {
            return format!("broker.mosquitto_pid_file is not set: {manual}");
        };
        match signal_pid_file(pid_file) {
            Ok(pid) => format!(
                "mosquitto (pid {pid}) was sent SIGHUP: it rereads the password and ACL files and disconnects removed users"
            ),
            Err(why) => format!("WARNING: could not signal mosquitto ({why}): {manual}"),
        }
    }
}

fn signal_pid_file(pid_file: &Path) -> Result<i32, String> {
    let text = fs::read_to_string(pid_file).map_err(|e| format!("cannot read '{}': {e}", pid_file.display()))?;
    let pid: i32 =
        text.trim().parse().ok().filter(|p| *p > 1).ok_or_else(|| format!("'{}' holds no pid", pid_file.display()))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
        .map_err(|e| format!("kill -HUP {pid}: {e}"))?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made with `mosquitto_passwd -b pw.txt dev-a secret123` (mosquitto 2.0.11).
    const FROM_MOSQUITTO: &str = "$7$101$jgI4rMNPLKoYTKwH$0eJ3mzg4KDtdOZeVk88cFA8Z267+k25meHeL3xEI5ZwHsUaQUhHbHuqmFenCydGnCufpSYoM9MaiF9gODnmeoQ==";

    fn prov(dir: &Path) -> Provisioning {
        Provisioning {
            state_dir: dir.to_path_buf(),
            topic_prefix: "fl".into(),
            hub_user: Some("hub".into()),
            hub_password: Some("hub-secret".into()),
            pid_file: None,
            url: Some("mqtt://10.0.0.1:1883".into()),
        }
    }

    #[test]
    fn a_line_made_by_mosquitto_passwd_verifies_and_our_hash_reproduces_it() {
        assert!(verify(FROM_MOSQUITTO, "secret123"));
        assert!(!verify(FROM_MOSQUITTO, "secret124"));
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
    fn add_prints_the_password_once_and_list_shows_ids_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = prov(dir.path());
        let out = p.add("pi-b", None).expect("add");
        p.add("pi-a", Some("mqtts://hub.example:8883")).expect("add");
        let password = out.lines().skip_while(|l| !l.contains("shown only now")).nth(2).expect("password line").trim();
        assert_eq!(password.len(), PASSWORD_LEN, "{out}");
        assert!(out.contains("username = \"pi-b\"") && out.contains("url = \"mqtt://10.0.0.1:1883\""), "{out}");
        let file = fs::read_to_string(p.passwd_path()).expect("passwd");
        assert!(!file.contains(password));
        let line = file.lines().find_map(|l| l.strip_prefix("pi-b:")).expect("pi-b line");
        assert!(verify(line, password));
        let hub = file.lines().find_map(|l| l.strip_prefix("hub:")).expect("hub line");
        assert!(verify(hub, "hub-secret"));
        assert_eq!(p.list().expect("list"), ["pi-a", "pi-b"]);
        use std::os::unix::fs::PermissionsExt;
        for f in [p.passwd_path(), p.acl_path()] {
            assert_eq!(fs::metadata(&f).expect("meta").permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn a_device_cannot_be_added_twice_nor_removed_when_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = prov(dir.path());
        p.add("pi", None).expect("add");
        assert!(matches!(p.add("pi", None), Err(DevicesError::Exists(_))));
        p.remove("pi").expect("remove");
        assert!(matches!(p.remove("pi"), Err(DevicesError::Unknown(_))));
        assert!(p.list().expect("list").is_empty());
        assert!(matches!(p.add("hub", None), Err(DevicesError::HubUser(_))));
        for bad in ["", "a/b", "+", "#", "a b", &"x".repeat(65)] {
            assert!(matches!(p.add(bad, None), Err(DevicesError::BadId(_))), "{bad}");
        }
    }

    #[test]
    fn a_changed_hub_password_is_rehashed_and_other_lines_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = prov(dir.path());
        p.add("pi", None).expect("add");
        let before = fs::read_to_string(p.passwd_path()).expect("passwd");
        p.hub_password = Some("new-secret".into());
        p.sync().expect("sync");
        let after = fs::read_to_string(p.passwd_path()).expect("passwd");
        let hub = after.lines().find_map(|l| l.strip_prefix("hub:")).expect("hub line");
        assert!(verify(hub, "new-secret"));
        let pi = |t: &str| t.lines().find(|l| l.starts_with("pi:")).map(str::to_string);
        assert_eq!(pi(&before), pi(&after));
    }

    #[test]
    fn a_corrupt_password_file_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = prov(dir.path());
        fs::write(p.passwd_path(), "a:$7$1$x$y\nnonsense\n").expect("write");
        let err = p.add("pi", None).expect_err("corrupt");
        assert!(err.to_string().ends_with("line 2 is not 'user:$7$iterations$salt$hash'"), "{err}");
    }

    #[test]
    fn the_acl_gives_devices_their_own_topics_and_the_hub_everything() {
        let acl = acl_text("acme/site1", Some("hub"));
        for line in [
            "pattern write acme/site1/%u/#",
            "pattern read acme/site1/%u/relay/+/set",
            "pattern readwrite acme/site1/%u/sync",
            "pattern read acme/site1/%u/ack",
            "pattern write homeassistant/+/%u/+/config",
            "pattern read homeassistant/status",
            "user hub",
            "topic readwrite acme/site1/#",
        ] {
            assert!(acl.lines().any(|l| l == line), "{line} missing:\n{acl}");
        }
        let rules = |t: &str| -> Vec<String> {
            t.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(str::to_string).collect()
        };
        let shipped = include_str!("../../config/mosquitto.acl");
        assert_eq!(
            rules(shipped),
            rules(&acl_text("fieldlink", Some("hub"))),
            "config/mosquitto.acl is what the hub writes"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = prov(dir.path());
        p.hub_user = None;
        assert!(p.add("pi", None).expect("add").contains("WARNING: broker.username is not set"));
        assert!(!acl_text("fl", None).lines().any(|l| l.starts_with("user ")));
    }
}
