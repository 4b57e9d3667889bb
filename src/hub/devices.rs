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

use crate::config::hub::{BrokerMode, HubConfig};
use crate::fsutil;
use crate::passwd::{Passwd, PasswdError, new_hash, new_password, verify};

/// The password file, in `state_dir`.
pub const PASSWD_FILE: &str = "mosquitto.passwd";
/// The ACL file, in `state_dir`.
pub const ACL_FILE: &str = "mosquitto.acl";

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("device id '{0}' is not valid (expected [A-Za-z0-9_-]{{1,64}}, as the agent's device_id)")]
    BadId(String),
    #[error("device '{0}' exists already (remove it first to issue a new password)")]
    Exists(String),
    #[error("device '{0}' is not provisioned (see `fieldlink hub device list`)")]
    Unknown(String),
    #[error(
        "'{0}' is the hub's own user (broker.username, or broker.client_id with the embedded broker), not a device"
    )]
    HubUser(String),
    #[error(transparent)]
    Passwd(#[from] PasswdError),
    #[error("cannot {what} '{path}': {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
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

/// The hub config's part that provisioning needs.
pub struct Provisioning {
    pub state_dir: PathBuf,
    pub topic_prefix: String,
    pub hub_user: Option<String>,
    pub hub_password: Option<String>,
    pub pid_file: Option<PathBuf>,
    /// The broker url the agents should use, when the hub's config knows it.
    pub url: Option<String>,
    /// The hub runs the embedded broker: `pid_file` is the hub's own, and
    /// the hub's user is not in the password file (it has its own).
    pub embedded: bool,
}

impl Provisioning {
    pub fn from_config(cfg: &HubConfig) -> Provisioning {
        let url_text = |tls: bool, host: &str, port: u16| {
            let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
            format!("{}://{host}:{port}", if tls { "mqtts" } else { "mqtt" })
        };
        match &cfg.broker.mode {
            BrokerMode::External { url } => Provisioning {
                state_dir: cfg.state_dir.clone(),
                topic_prefix: cfg.topic_prefix.clone(),
                hub_user: cfg.broker.username.clone(),
                hub_password: cfg.broker.password.as_ref().map(|s| s.0.clone()),
                pid_file: cfg.broker.mosquitto_pid_file.clone(),
                url: Some(url_text(url.tls, &url.host, url.port)),
                embedded: false,
            },
            BrokerMode::Embedded { listen } => {
                // An unspecified or loopback address says nothing about the
                // name devices reach the hub by: leave the placeholder then.
                let (tls, addr) = match &cfg.broker.tls_listener {
                    Some(t) => (true, t.listen),
                    None => (false, *listen),
                };
                let known = !addr.ip().is_unspecified() && !addr.ip().is_loopback();
                Provisioning {
                    state_dir: cfg.state_dir.clone(),
                    topic_prefix: cfg.topic_prefix.clone(),
                    hub_user: Some(cfg.broker.client_id.clone()),
                    hub_password: None,
                    pid_file: Some(cfg.state_dir.join(super::PID_FILE)),
                    url: known.then(|| url_text(tls, &addr.ip().to_string(), addr.port())),
                    embedded: true,
                }
            }
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
                Some(i) if verify(&passwd.users[i].1, password.as_bytes()) => {}
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
        if self.embedded {
            return Ok(done);
        }
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
        let (password, reload) = self.create(id)?;
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

    /// Creates `id` with a new password; returns the password and what was
    /// done about reloading the broker.
    pub fn create(&self, id: &str) -> Result<(String, String), DevicesError> {
        self.check_id(id)?;
        let mut passwd = self.load()?;
        if passwd.find(id).is_some() {
            return Err(DevicesError::Exists(id.to_string()));
        }
        let password = new_password()?;
        passwd.users.push((id.to_string(), new_hash(&password)?));
        let reload = self.save(&passwd)?;
        Ok((password, reload))
    }

    /// Provisions every id in `ids` with the one `password` (what `fieldlink
    /// fleet-sim --provision` does for its simulated devices), in one write
    /// of the files and one reload: ids already provisioned with that
    /// password are left alone, and an id provisioned with another password
    /// is refused before anything is written. Returns how many were added
    /// and what was done about reloading the broker.
    pub fn ensure(&self, ids: &[String], password: &str) -> Result<(usize, String), DevicesError> {
        let mut passwd = self.load()?;
        let mut added = 0;
        for id in ids {
            self.check_id(id)?;
            match passwd.find(id) {
                Some(i) if verify(&passwd.users[i].1, password.as_bytes()) => {}
                Some(_) => return Err(DevicesError::Exists(id.clone())),
                None => {
                    passwd.users.push((id.clone(), new_hash(password)?));
                    added += 1;
                }
            }
        }
        if added == 0 {
            return Ok((0, String::from("every device was provisioned already")));
        }
        let reload = self.save(&passwd)?;
        Ok((added, reload))
    }

    /// Whether `id` is provisioned with `password`.
    pub fn verifies(&self, id: &str, password: &str) -> Result<bool, DevicesError> {
        let passwd = Passwd::load(&self.passwd_path())?;
        Ok(passwd.find(id).is_some_and(|i| verify(&passwd.users[i].1, password.as_bytes())))
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

    /// SIGHUP to mosquitto when its pid file is configured, or to the hub
    /// running the embedded broker; one line saying what happened.
    fn reload(&self) -> String {
        if self.embedded {
            let Some(pid_file) = &self.pid_file else {
                return String::new();
            };
            if !pid_file.exists() {
                return "the hub is not running: it reads the password file when it starts".to_string();
            }
            return match signal_pid_file(pid_file, "fieldlink") {
                Ok(pid) => format!(
                    "the hub (pid {pid}) was sent SIGHUP: its broker rereads the password file and disconnects removed devices"
                ),
                Err(why) => format!(
                    "WARNING: could not signal the hub ({why}): restart it (or `kill -HUP <pid>`) to apply the change"
                ),
            };
        }
        let manual = "reload mosquitto to apply it (e.g. `systemctl reload mosquitto` or `kill -HUP <pid>`); \
                      on reload mosquitto disconnects clients whose user was removed";
        let Some(pid_file) = &self.pid_file else {
            return format!("broker.mosquitto_pid_file is not set: {manual}");
        };
        match signal_pid_file(pid_file, "mosquitto") {
            Ok(pid) => format!(
                "mosquitto (pid {pid}) was sent SIGHUP: it rereads the password and ACL files and disconnects removed users"
            ),
            Err(why) => format!("WARNING: could not signal mosquitto ({why}): {manual}"),
        }
    }
}

/// Sends SIGHUP to the pid in `pid_file`, but only when that process is
/// `program` (its `/proc/<pid>/comm`): a pid file left by a killed process
/// may name an unrelated one by now, which SIGHUP would kill.
fn signal_pid_file(pid_file: &Path, program: &str) -> Result<i32, String> {
    let text = fs::read_to_string(pid_file).map_err(|e| format!("cannot read '{}': {e}", pid_file.display()))?;
    let pid: i32 =
        text.trim().parse().ok().filter(|p| *p > 1).ok_or_else(|| format!("'{}' holds no pid", pid_file.display()))?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_err(|_| format!("no process {pid} (a stale '{}')", pid_file.display()))?;
    if comm.trim() != program {
        return Err(format!(
            "process {pid} is '{}', not {program}: '{}' is stale, so it was not signalled",
            comm.trim(),
            pid_file.display()
        ));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
        .map_err(|e| format!("kill -HUP {pid}: {e}"))?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_pid_file_naming_another_program_is_not_signalled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("hub.pid");
        // This test process is not `fieldlink`: it must be left alone (a
        // SIGHUP would kill it).
        fs::write(&pid_file, format!("{}\n", std::process::id())).expect("write");
        let why = signal_pid_file(&pid_file, "fieldlink").expect_err("refused");
        assert!(why.contains("is stale"), "{why}");
        fs::write(&pid_file, "999999999\n").expect("write");
        let why = signal_pid_file(&pid_file, "fieldlink").expect_err("refused");
        assert!(why.contains("no process"), "{why}");
    }

    fn prov(dir: &Path) -> Provisioning {
        Provisioning {
            state_dir: dir.to_path_buf(),
            topic_prefix: "fl".into(),
            hub_user: Some("hub".into()),
            hub_password: Some("hub-secret".into()),
            pid_file: None,
            url: Some("mqtt://10.0.0.1:1883".into()),
            embedded: false,
        }
    }

    #[test]
    fn add_prints_the_password_once_and_list_shows_ids_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = prov(dir.path());
        let out = p.add("pi-b", None).expect("add");
        p.add("pi-a", Some("mqtts://hub.example:8883")).expect("add");
        let password = out.lines().skip_while(|l| !l.contains("shown only now")).nth(2).expect("password line").trim();
        assert_eq!(password.len(), crate::passwd::PASSWORD_LEN, "{out}");
        assert!(out.contains("username = \"pi-b\"") && out.contains("url = \"mqtt://10.0.0.1:1883\""), "{out}");
        let file = fs::read_to_string(p.passwd_path()).expect("passwd");
        assert!(!file.contains(password));
        let line = file.lines().find_map(|l| l.strip_prefix("pi-b:")).expect("pi-b line");
        assert!(verify(line, password.as_bytes()));
        let hub = file.lines().find_map(|l| l.strip_prefix("hub:")).expect("hub line");
        assert!(verify(hub, b"hub-secret"));
        assert_eq!(p.list().expect("list"), ["pi-a", "pi-b"]);
        use std::os::unix::fs::PermissionsExt;
        for f in [p.passwd_path(), p.acl_path()] {
            assert_eq!(fs::metadata(&f).expect("meta").permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn ensure_adds_missing_devices_once_and_refuses_one_with_another_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = prov(dir.path());
        let ids: Vec<String> = ["sim-1", "sim-2"].map(String::from).to_vec();
        assert_eq!(p.ensure(&ids, "pw-one").expect("added").0, 2);
        assert_eq!(p.ensure(&ids, "pw-one").expect("no change").0, 0);
        assert!(p.verifies("sim-2", "pw-one").expect("readable"));
        assert!(matches!(p.ensure(&ids, "pw-two"), Err(DevicesError::Exists(id)) if id == "sim-1"));
        assert_eq!(p.list().expect("list"), ["sim-1", "sim-2"]);
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
        assert!(verify(hub, b"new-secret"));
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
