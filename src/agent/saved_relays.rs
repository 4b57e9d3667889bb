//! What the Relay keeps across restarts, in `<state_dir>/relays.json`: each
//! relay's last state (for `power_on_state = "last"`) and what makes a
//! command take effect at most once (the `command_gate`'s applied ids and
//! the current session's packet ids). Owns that file's format and its
//! atomic, fsynced writes; it never touches a pin and decides nothing.
//!
//! ```text
//! version 2 (written since #6):
//! {"version":2,
//!  "relays":{"pump":{"state":"on","command_id":"abc"}},
//!  "command_ids":["c1","abc"],                         oldest first, at most 256
//!  "session":[{"pkid":7,"fingerprint":1234567890}]}    packet ids of this MQTT session
//!
//! version 1 (read, never written): the "relays" map alone
//! {"pump":{"state":"on","command_id":"abc"}}
//! ```
//!
//! Everything is written in one atomic write (`fsutil::write_atomic`: temp
//! file, fsync, rename, fsync the directory), so a relay's state and the
//! command that set it are never persisted apart. Changes accumulate in
//! memory until [`SavedRelays::commit`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::command_gate::SessionEntry;
use crate::fsutil;
use crate::proto::RelayState;

/// The version this build writes.
const VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRelay {
    pub state: RelayState,
    pub command_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV2 {
    version: u32,
    relays: BTreeMap<String, SavedRelay>,
    #[serde(default)]
    command_ids: Vec<String>,
    #[serde(default)]
    session: Vec<SessionEntry>,
}

/// Either layout; version 2 is tried first. A version-1 file whose relay is
/// named "version" still reads as version 1: its value is an object, not a
/// number.
#[derive(Deserialize)]
#[serde(untagged)]
enum OnDisk {
    V2(FileV2),
    V1(BTreeMap<String, SavedRelay>),
}

#[derive(Debug)]
pub struct SavedRelays {
    path: PathBuf,
    file: FileV2,
    /// The bytes last written or read: a commit with nothing new writes nothing.
    written: Vec<u8>,
}

impl SavedRelays {
    /// Loads `<state_dir>/relays.json`; a missing file is empty, an unreadable
    /// one is reported and treated as empty (the relays then follow
    /// `power_on_state` fallbacks rather than refusing to start).
    pub fn load(state_dir: &Path) -> SavedRelays {
        let path = state_dir.join("relays.json");
        let empty = FileV2 { version: VERSION, ..FileV2::default() };
        let (file, written) = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<OnDisk>(&bytes) {
                Ok(OnDisk::V2(file)) if file.version == VERSION => (file, bytes),
                Ok(OnDisk::V2(file)) => {
                    tracing::error!(
                        "{}: version {} is not one this fieldlink reads ({VERSION}); relay states start from power_on_state",
                        path.display(),
                        file.version
                    );
                    (empty, Vec::new())
                }
                Ok(OnDisk::V1(relays)) => (FileV2 { relays, ..empty }, bytes),
                Err(e) => {
                    tracing::error!("{}: unreadable ({e}); relay states start from power_on_state", path.display());
                    (empty, Vec::new())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (empty, Vec::new()),
            Err(e) => {
                tracing::error!("{}: {e}; relay states start from power_on_state", path.display());
                (empty, Vec::new())
            }
        };
        SavedRelays { path, file, written }
    }

    pub fn get(&self, name: &str) -> Option<&SavedRelay> {
        self.file.relays.get(name)
    }

    /// The applied command ids, oldest first.
    pub fn command_ids(&self) -> &[String] {
        &self.file.command_ids
    }

    /// The packet ids of the current MQTT session.
    pub fn session(&self) -> &[SessionEntry] {
        &self.file.session
    }

    /// Sets a relay's state (in memory until [`SavedRelays::commit`]).
    pub fn set(&mut self, name: &str, relay: SavedRelay) {
        self.file.relays.insert(name.to_string(), relay);
    }

    /// Sets what the command gate remembers (in memory until
    /// [`SavedRelays::commit`]).
    pub fn set_gate(&mut self, command_ids: Vec<String>, session: Vec<SessionEntry>) {
        self.file.command_ids = command_ids;
        self.file.session = session;
    }

    /// Writes everything and fsyncs, unless nothing changed since the last
    /// write (or the load).
    pub fn commit(&mut self) -> std::io::Result<()> {
        self.file.version = VERSION;
        let bytes = serde_json::to_vec(&self.file).map_err(std::io::Error::other)?;
        if bytes == self.written {
            return Ok(());
        }
        fsutil::write_atomic(&self.path, &bytes)?;
        self.written = bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(id: &str) -> SavedRelay {
        SavedRelay { state: RelayState::On, command_id: Some(id.into()) }
    }

    #[test]
    fn saved_states_and_the_command_memory_survive_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SavedRelays::load(dir.path());
        assert_eq!(s.get("pump"), None);
        s.set("pump", on("c1"));
        s.set_gate(vec!["c0".into(), "c1".into()], vec![SessionEntry { pkid: 7, fingerprint: u64::MAX }]);
        s.commit().expect("commit");
        let again = SavedRelays::load(dir.path());
        assert_eq!(again.get("pump"), Some(&on("c1")));
        assert_eq!(again.command_ids(), ["c0".to_string(), "c1".to_string()]);
        assert_eq!(again.session(), [SessionEntry { pkid: 7, fingerprint: u64::MAX }]);
    }

    #[test]
    fn nothing_is_written_until_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SavedRelays::load(dir.path());
        s.set("pump", on("c1"));
        assert_eq!(SavedRelays::load(dir.path()).get("pump"), None);
        s.commit().expect("commit");
        assert_eq!(SavedRelays::load(dir.path()).get("pump"), Some(&on("c1")));
    }

    #[test]
    fn a_file_from_before_version_2_is_read_and_rewritten_as_version_2() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relays.json");
        std::fs::write(
            &path,
            br#"{"pump":{"state":"on","command_id":"abc"},"version":{"state":"off","command_id":null}}"#,
        )
        .expect("write");
        let mut s = SavedRelays::load(dir.path());
        assert_eq!(s.get("pump"), Some(&on("abc")));
        assert_eq!(s.get("version"), Some(&SavedRelay { state: RelayState::Off, command_id: None }));
        assert!(s.command_ids().is_empty());
        s.set_gate(vec!["x".into()], Vec::new());
        s.commit().expect("commit");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with(r#"{"version":2,"#), "{text}");
        assert_eq!(SavedRelays::load(dir.path()).get("pump"), Some(&on("abc")));
    }

    #[test]
    fn a_corrupt_file_is_treated_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("relays.json"), b"{garbage").expect("write");
        assert_eq!(SavedRelays::load(dir.path()).get("pump"), None);
    }

    #[test]
    fn a_file_from_a_newer_version_is_not_misread() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("relays.json"),
            br#"{"version":3,"relays":{"pump":{"state":"on","command_id":null}}}"#,
        )
        .expect("write");
        assert_eq!(SavedRelays::load(dir.path()).get("pump"), None);
    }
}
