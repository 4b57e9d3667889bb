//! What the Relay keeps across restarts: each relay's last state (for
//! `power_on_state = "last"`) and what makes a command take effect at most
//! once (the `command_gate`'s applied ids and the current session's packet
//! ids). Owns that value's format and where it lives; it never touches a
//! pin and decides nothing.
//!
//! # Where it lives (since #8)
//!
//! In the outbox's database, as the saved value `relays` (outbox module doc:
//! Saved values). [`SavedRelays::snapshot`] hands the Relay the value to
//! write, and the Relay passes it to the outbox with the record it belongs
//! to (`Recorder::record_urgent`), so a command's `state` message and the
//! saved state and ids are durable in one commit. Before #8 it was the file
//! `<state_dir>/relays.json` (write, fsync, rename, fsync the directory on
//! every command).
//!
//! *Migration.* When the outbox holds no `relays` value and
//! `<state_dir>/relays.json` exists, that file is read (version 1 or 2), its
//! content is saved into the outbox with the first save, and once that is
//! durable the file is renamed to `relays.json.migrated` (kept for a
//! downgrade by hand; never read again).
//!
//! ```text
//! version 2 (written since #6; the saved value's bytes since #8):
//! {"version":2,
//!  "relays":{"pump":{"state":"on","command_id":"abc"}},
//!  "command_ids":["c1","abc"],                         oldest first, at most 256
//!  "session":[{"pkid":7,"fingerprint":1234567890}]}    packet ids of this MQTT session
//!
//! version 1 (read from a relays.json, never written): the "relays" map alone
//! {"pump":{"state":"on","command_id":"abc"}}
//! ```
//!
//! Everything is one value, written whole, so a relay's state and the
//! command that set it are never persisted apart. Changes accumulate in
//! memory until [`SavedRelays::snapshot`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::command_gate::SessionEntry;
use crate::outbox::{OutboxReader, Saved};
use crate::proto::RelayState;

/// The version this build writes.
const VERSION: u32 = 2;

/// The name of the saved value in the outbox.
pub const SAVED_NAME: &str = "relays";

/// The file of builds before #8, read once for the migration.
pub const LEGACY_FILE: &str = "relays.json";

/// What [`LEGACY_FILE`] is renamed to once its content is durable in the outbox.
pub const MIGRATED_FILE: &str = "relays.json.migrated";

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
    file: FileV2,
    /// The bytes last handed out or read: a snapshot with nothing new is `None`.
    written: Vec<u8>,
    /// A `relays.json` this was loaded from, to rename once saved.
    legacy: Option<PathBuf>,
}

impl SavedRelays {
    /// Loads the saved value from the outbox, or, when it holds none, from
    /// `<state_dir>/relays.json` (the migration, see the module doc). Missing
    /// is empty; unreadable is reported and treated as empty (the relays then
    /// follow `power_on_state` fallbacks rather than refusing to start).
    pub fn load(reader: &OutboxReader, state_dir: &Path) -> SavedRelays {
        match reader.saved(SAVED_NAME) {
            Ok(Some(bytes)) => {
                let (file, written) = parse(&bytes, "the relays' saved state in the outbox");
                SavedRelays { file, written, legacy: None }
            }
            Ok(None) => Self::load_legacy(state_dir),
            Err(e) => {
                tracing::error!(
                    "cannot read the relays' saved state from the outbox ({e}); relay states start from power_on_state"
                );
                SavedRelays { file: empty(), written: Vec::new(), legacy: None }
            }
        }
    }

    /// Reads `<state_dir>/relays.json` (builds before #8), if there is one.
    fn load_legacy(state_dir: &Path) -> SavedRelays {
        let path = state_dir.join(LEGACY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let (file, _) = parse(&bytes, &path.display().to_string());
                tracing::info!("{}: read; it moves into the outbox with the first save", path.display());
                // `written` stays empty: the first snapshot saves it all.
                SavedRelays { file, written: Vec::new(), legacy: Some(path) }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                SavedRelays { file: empty(), written: Vec::new(), legacy: None }
            }
            Err(e) => {
                tracing::error!("{}: {e}; relay states start from power_on_state", path.display());
                SavedRelays { file: empty(), written: Vec::new(), legacy: None }
            }
        }
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

    /// Sets a relay's state (in memory until [`SavedRelays::snapshot`]).
    pub fn set(&mut self, name: &str, relay: SavedRelay) {
        self.file.relays.insert(name.to_string(), relay);
    }

    /// Sets what the command gate remembers (in memory until
    /// [`SavedRelays::snapshot`]).
    pub fn set_gate(&mut self, command_ids: Vec<String>, session: Vec<SessionEntry>) {
        self.file.command_ids = command_ids;
        self.file.session = session;
    }

    /// The value to save, unless nothing changed since the last snapshot (or
    /// the load). The caller hands it to the outbox; it counts as written
    /// from here on (the outbox keeps it through a disk fault and writes it
    /// again after the reopen).
    pub fn snapshot(&mut self) -> Option<Saved> {
        self.file.version = VERSION;
        let bytes = match serde_json::to_vec(&self.file) {
            Ok(b) => b,
            Err(e) => {
                // Plain strings and numbers: serde_json cannot fail on them.
                tracing::error!("cannot encode the relays' saved state: {e}");
                return None;
            }
        };
        if bytes == self.written {
            return None;
        }
        self.written = bytes.clone();
        Some(Saved { name: SAVED_NAME, bytes })
    }

    /// The legacy `relays.json` this was loaded from, if its content has
    /// not been saved into the outbox yet.
    #[cfg(test)]
    pub fn legacy_file(&self) -> Option<&Path> {
        self.legacy.as_deref()
    }

    /// A snapshot holding everything from the legacy file is durable in the
    /// outbox: rename the file to `relays.json.migrated`, never to be read
    /// again. A failed rename is logged; the file is then read again only
    /// if the outbox lost its value.
    pub fn migrated(&mut self) {
        let Some(path) = self.legacy.take() else { return };
        let to = path.with_file_name(MIGRATED_FILE);
        match std::fs::rename(&path, &to) {
            Ok(()) => tracing::info!("{}: moved into the outbox; renamed to {}", path.display(), to.display()),
            Err(e) => tracing::warn!("{}: moved into the outbox, but cannot rename it: {e}", path.display()),
        }
    }
}

fn empty() -> FileV2 {
    FileV2 { version: VERSION, ..FileV2::default() }
}

/// Parses either layout; what cannot be used is logged (naming `what`) and
/// read as empty. Returns the content and the bytes, if they are the
/// current version as is.
fn parse(bytes: &[u8], what: &str) -> (FileV2, Vec<u8>) {
    match serde_json::from_slice::<OnDisk>(bytes) {
        Ok(OnDisk::V2(file)) if file.version == VERSION => (file, bytes.to_vec()),
        Ok(OnDisk::V2(file)) => {
            tracing::error!(
                "{what}: version {} is not one this fieldlink reads ({VERSION}); relay states start from power_on_state",
                file.version
            );
            (empty(), Vec::new())
        }
        Ok(OnDisk::V1(relays)) => (FileV2 { relays, ..empty() }, Vec::new()),
        Err(e) => {
            tracing::error!("{what}: unreadable ({e}); relay states start from power_on_state");
            (empty(), Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{Durability, OutboxConfig};
    use crate::outbox::{MemStore, OutboxHandle, open_in_memory};

    fn on(id: &str) -> SavedRelay {
        SavedRelay { state: RelayState::On, command_id: Some(id.into()) }
    }

    fn open(store: &MemStore) -> (OutboxHandle, OutboxReader) {
        let cfg = OutboxConfig { max_bytes: 1 << 20, durability: Durability::Always, flush_interval: Duration::ZERO };
        let (h, r, _) = open_in_memory(store, &cfg).expect("in-memory outbox");
        (h, r)
    }

    fn save(h: &OutboxHandle, saved: Saved) {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        rt.block_on(h.save(saved, false)).expect("saved");
    }

    #[test]
    fn saved_states_and_the_command_memory_survive_a_crash_once_saved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MemStore::new();
        let (h, r) = open(&store);
        let mut s = SavedRelays::load(&r, dir.path());
        assert_eq!(s.get("pump"), None);
        s.set("pump", on("c1"));
        s.set_gate(vec!["c0".into(), "c1".into()], vec![SessionEntry { pkid: 7, fingerprint: u64::MAX }]);
        save(&h, s.snapshot().expect("something changed"));
        // A power cut now: only what was flushed survives.
        let (_h, r) = open(&store.crashed());
        let again = SavedRelays::load(&r, dir.path());
        assert_eq!(again.get("pump"), Some(&on("c1")));
        assert_eq!(again.command_ids(), ["c0".to_string(), "c1".to_string()]);
        assert_eq!(again.session(), [SessionEntry { pkid: 7, fingerprint: u64::MAX }]);
    }

    #[test]
    fn a_snapshot_with_nothing_new_is_not_saved_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_h, r) = open(&MemStore::new());
        let mut s = SavedRelays::load(&r, dir.path());
        s.set("pump", on("c1"));
        assert!(s.snapshot().is_some());
        assert!(s.snapshot().is_none(), "unchanged");
        s.set("pump", on("c2"));
        assert!(s.snapshot().is_some());
    }

    #[test]
    fn a_relays_json_from_before_8_moves_into_the_outbox_and_is_renamed_once_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(LEGACY_FILE);
        std::fs::write(
            &path,
            br#"{"version":2,"relays":{"pump":{"state":"on","command_id":"abc"}},"command_ids":["abc"],"session":[]}"#,
        )
        .expect("write");
        let store = MemStore::new();
        let (h, r) = open(&store);
        let mut s = SavedRelays::load(&r, dir.path());
        assert_eq!(s.get("pump"), Some(&on("abc")));
        assert_eq!(s.command_ids(), ["abc".to_string()]);
        assert_eq!(s.legacy_file(), Some(path.as_path()));
        save(&h, s.snapshot().expect("the migration saves even without a change"));
        s.migrated();
        assert!(!path.exists(), "renamed");
        assert!(dir.path().join(MIGRATED_FILE).exists(), "kept under its new name");
        // From now on the outbox is the truth, also after a power cut.
        let (_h, r) = open(&store.crashed());
        let again = SavedRelays::load(&r, dir.path());
        assert_eq!(again.get("pump"), Some(&on("abc")));
        assert_eq!(again.command_ids(), ["abc".to_string()]);
        assert_eq!(again.legacy_file(), None);
    }

    #[test]
    fn a_version_1_file_is_read_and_saved_as_version_2() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(LEGACY_FILE),
            br#"{"pump":{"state":"on","command_id":"abc"},"version":{"state":"off","command_id":null}}"#,
        )
        .expect("write");
        let (_h, r) = open(&MemStore::new());
        let mut s = SavedRelays::load(&r, dir.path());
        assert_eq!(s.get("pump"), Some(&on("abc")));
        assert_eq!(s.get("version"), Some(&SavedRelay { state: RelayState::Off, command_id: None }));
        assert!(s.command_ids().is_empty());
        let saved = s.snapshot().expect("saved");
        let text = String::from_utf8(saved.bytes).expect("JSON");
        assert!(text.starts_with(r#"{"version":2,"#), "{text}");
    }

    #[test]
    fn the_outbox_value_wins_over_a_leftover_relays_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MemStore::new();
        let (h, r) = open(&store);
        let mut s = SavedRelays::load(&r, dir.path());
        s.set("pump", on("new"));
        save(&h, s.snapshot().expect("saved"));
        std::fs::write(dir.path().join(LEGACY_FILE), br#"{"pump":{"state":"off","command_id":"old"}}"#).expect("write");
        let again = SavedRelays::load(&r, dir.path());
        assert_eq!(again.get("pump"), Some(&on("new")));
        assert_eq!(again.legacy_file(), None);
    }

    #[test]
    fn a_corrupt_file_is_treated_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LEGACY_FILE), b"{garbage").expect("write");
        let (_h, r) = open(&MemStore::new());
        assert_eq!(SavedRelays::load(&r, dir.path()).get("pump"), None);
    }

    #[test]
    fn a_file_from_a_newer_version_is_not_misread() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(LEGACY_FILE),
            br#"{"version":3,"relays":{"pump":{"state":"on","command_id":null}}}"#,
        )
        .expect("write");
        let (_h, r) = open(&MemStore::new());
        assert_eq!(SavedRelays::load(&r, dir.path()).get("pump"), None);
    }
}
