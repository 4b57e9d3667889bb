//! What the Relay keeps across restarts: each relay's last state (for
//! `power_on_state = "last"`) and what makes a command take effect at most
//! once (the `command_gate`'s applied ids and the current session's packet
//! ids). Owns those values' format and where they live; it never touches a
//! pin and decides nothing.
//!
//! # Where it lives (since #8)
//!
//! In the outbox's database, as saved values (outbox module doc: Saved
//! values). [`SavedRelays::snapshot`] hands the Relay the values to write,
//! and the Relay passes them to the outbox with the record they belong to
//! (`Recorder::record_urgent`), so a command's `state` message, the relay's
//! saved state and the gate's memory of the command are durable in one
//! commit. Before #8 it was the file `<state_dir>/relays.json` (write,
//! fsync, rename, fsync the directory on every command).
//!
//! *Migration.* When the outbox holds no `relays` value and
//! `<state_dir>/relays.json` exists, that file is read (version 1 or 2), its
//! content is saved into the outbox with the first save, and once that is
//! durable the file is renamed to `relays.json.migrated` (kept for a
//! downgrade by hand; never read again). A version 2 value in the outbox
//! is rewritten as version 3 with the first save.
//!
//! ```text
//! version 3 (written since the second part of #8): several saved values
//!   relays                 {"version":3,"relays":{"pump":{"state":"on","command_id":"abc"}},
//!                           "session_epoch":4}
//!   relays.id.<k>          {"n":517,"id":"abc"}           applied id number n, in slot k = n % 256
//!   relays.session.<k>     {"n":9001,"epoch":4,"pkid":7,"fingerprint":1234567890}
//!                                                         handled on packet id 7 (fingerprint null:
//!                                                         forgotten), in slot k = n % 256
//! A session entry counts only if its epoch is the value's session_epoch
//! (raised when the broker reports no session). Loading sorts each ring
//! by n: the ids are the newest 256, oldest first; the session is replayed
//! in order.
//!
//! version 2 (#6 to the first part of #8; read, never written): one value
//! {"version":2,
//!  "relays":{"pump":{"state":"on","command_id":"abc"}},
//!  "command_ids":["c1","abc"],                         oldest first, at most 256
//!  "session":[{"pkid":7,"fingerprint":1234567890}]}    packet ids of this MQTT session
//!
//! version 1 (read from a relays.json, never written): the "relays" map alone
//! {"pump":{"state":"on","command_id":"abc"}}
//! ```
//!
//! Version 2 wrote everything as one value per command: the whole gate
//! memory, whose session part grows with every command of a session (up to
//! one entry per packet id, 65,535), so a long session wrote megabytes per
//! command (issue #8, measured: p50 command latency 1.06 ms after 300
//! commands, 2.4 ms after 3,000). Version 3 writes what changed: the
//! relays value (a few dozen bytes) and one ring slot per change. The
//! session ring keeps the newest [`SESSION_SLOTS`] entries: a restart
//! recognises a redelivery on any of the last 256 packet ids handled, far
//! more than a broker keeps in flight towards one client (mosquitto's
//! `max_inflight_messages` is 20 by default; DESIGN: Command rules).
//!
//! A relay's state and the gate change that came with its command are
//! handed out together and written in one commit. Changes accumulate in
//! memory until [`SavedRelays::snapshot`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::command_gate::{GateChange, REMEMBERED_IDS, SessionEntry};
use crate::outbox::{OutboxReader, Saved};
use crate::proto::RelayState;

/// The version this build writes.
const VERSION: u32 = 3;

/// The name of the saved value in the outbox.
pub const SAVED_NAME: &str = "relays";

/// Slots of the applied-id ring: as many as the gate remembers.
pub const ID_SLOTS: u64 = REMEMBERED_IDS as u64;

/// Slots of the session ring (see the module doc).
pub const SESSION_SLOTS: u64 = 256;

/// The file of builds before #8, read once for the migration.
pub const LEGACY_FILE: &str = "relays.json";

/// What [`LEGACY_FILE`] is renamed to once its content is durable in the outbox.
pub const MIGRATED_FILE: &str = "relays.json.migrated";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRelay {
    pub state: RelayState,
    pub command_id: Option<String>,
}

/// The `relays` value, version 3.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV3 {
    version: u32,
    relays: BTreeMap<String, SavedRelay>,
    session_epoch: u64,
}

/// Version 2: everything in one value.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV2 {
    version: u32,
    relays: BTreeMap<String, SavedRelay>,
    #[serde(default)]
    command_ids: Vec<String>,
    #[serde(default)]
    session: Vec<SessionEntry>,
}

/// Any layout; the newest is tried first. A version-1 file whose relay is
/// named "version" still reads as version 1: its value is an object, not a
/// number.
#[derive(Deserialize)]
#[serde(untagged)]
enum OnDisk {
    V3(FileV3),
    V2(FileV2),
    V1(BTreeMap<String, SavedRelay>),
}

/// A slot of the applied-id ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdSlot {
    n: u64,
    id: String,
}

/// A slot of the session ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionSlot {
    n: u64,
    epoch: u64,
    pkid: u16,
    fingerprint: Option<u64>,
}

fn id_slot_name(n: u64) -> String {
    format!("{SAVED_NAME}.id.{}", n % ID_SLOTS)
}

fn session_slot_name(n: u64) -> String {
    format!("{SAVED_NAME}.session.{}", n % SESSION_SLOTS)
}

/// The saved state as loaded, then as kept up to date by a [`SavedRelays`].
#[derive(Debug, Default)]
struct Loaded {
    relays: BTreeMap<String, SavedRelay>,
    session_epoch: u64,
    /// What the gate remembered at load (for `CommandGate::restore`).
    ids: Vec<String>,
    session: Vec<SessionEntry>,
    /// The number the next ring write of each kind gets.
    next_id: u64,
    next_session: u64,
    /// The `relays` bytes last handed out, or read if they are the current
    /// version as is.
    written: Vec<u8>,
    /// The gate memory came from version 2: write it into the rings.
    migrate_gate: bool,
}

#[derive(Debug)]
pub struct SavedRelays {
    /// What is saved (or will be with the next snapshot).
    m: Loaded,
    /// Ring slots to hand out with the next snapshot, in order.
    pending: Vec<Saved>,
    /// A `relays.json` this was loaded from, to rename once saved.
    legacy: Option<PathBuf>,
}

impl SavedRelays {
    /// Loads the saved values from the outbox, or, when it holds none, from
    /// `<state_dir>/relays.json` (the migration, see the module doc). Missing
    /// is empty; unreadable is reported and treated as empty (the relays then
    /// follow `power_on_state` fallbacks rather than refusing to start).
    pub fn load(reader: &OutboxReader, state_dir: &Path) -> SavedRelays {
        match reader.saved(SAVED_NAME) {
            Ok(Some(bytes)) => {
                Self::from_loaded(parse(&bytes, "the relays' saved state in the outbox", Some(reader)), None)
            }
            Ok(None) => Self::load_legacy(state_dir),
            Err(e) => {
                tracing::error!(
                    "cannot read the relays' saved state from the outbox ({e}); relay states start from power_on_state"
                );
                Self::from_loaded(Loaded::default(), None)
            }
        }
    }

    /// Reads `<state_dir>/relays.json` (builds before #8), if there is one.
    fn load_legacy(state_dir: &Path) -> SavedRelays {
        let path = state_dir.join(LEGACY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mut loaded = parse(&bytes, &path.display().to_string(), None);
                tracing::info!("{}: read; it moves into the outbox with the first save", path.display());
                // The first snapshot saves it all.
                loaded.written.clear();
                Self::from_loaded(loaded, Some(path))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::from_loaded(Loaded::default(), None),
            Err(e) => {
                tracing::error!("{}: {e}; relay states start from power_on_state", path.display());
                Self::from_loaded(Loaded::default(), None)
            }
        }
    }

    fn from_loaded(m: Loaded, legacy: Option<PathBuf>) -> SavedRelays {
        let migrate = m.migrate_gate;
        let mut s = SavedRelays { m, pending: Vec::new(), legacy };
        if migrate {
            let ids = s.m.ids.iter().cloned().map(GateChange::Applied);
            let session =
                s.m.session.iter().map(|e| GateChange::Session { pkid: e.pkid, fingerprint: Some(e.fingerprint) });
            let changes: Vec<GateChange> = ids.chain(session).collect();
            s.record(changes);
        }
        s
    }

    pub fn get(&self, name: &str) -> Option<&SavedRelay> {
        self.m.relays.get(name)
    }

    /// The applied command ids at load, oldest first.
    pub fn command_ids(&self) -> &[String] {
        &self.m.ids
    }

    /// The packet ids of the current MQTT session at load.
    pub fn session(&self) -> &[SessionEntry] {
        &self.m.session
    }

    /// Sets a relay's state (in memory until [`SavedRelays::snapshot`]).
    pub fn set(&mut self, name: &str, relay: SavedRelay) {
        self.m.relays.insert(name.to_string(), relay);
    }

    /// Takes the gate's changes (in memory until [`SavedRelays::snapshot`]).
    pub fn record(&mut self, changes: Vec<GateChange>) {
        for change in changes {
            match change {
                GateChange::Applied(id) => {
                    let n = self.m.next_id;
                    self.m.next_id += 1;
                    self.pending.extend(slot(id_slot_name(n), &IdSlot { n, id }));
                }
                GateChange::Session { pkid, fingerprint } => {
                    let n = self.m.next_session;
                    self.m.next_session += 1;
                    let entry = SessionSlot { n, epoch: self.m.session_epoch, pkid, fingerprint };
                    self.pending.extend(slot(session_slot_name(n), &entry));
                }
                GateChange::SessionLost => self.m.session_epoch += 1,
            }
        }
    }

    /// The values to save (none if nothing changed since the last snapshot
    /// or the load). The caller hands them to the outbox in one save or
    /// append; they count as written from here on (the outbox keeps them
    /// through a disk fault and writes them again after the reopen).
    pub fn snapshot(&mut self) -> Vec<Saved> {
        let file = FileV3 { version: VERSION, relays: self.m.relays.clone(), session_epoch: self.m.session_epoch };
        let mut out = Vec::with_capacity(1 + self.pending.len());
        match serde_json::to_vec(&file) {
            Ok(bytes) if bytes != self.m.written => {
                self.m.written = bytes.clone();
                out.push(Saved { name: SAVED_NAME.to_string(), bytes });
            }
            Ok(_unchanged) => {}
            // Plain strings and numbers: serde_json cannot fail on them.
            Err(e) => tracing::error!("cannot encode the relays' saved state: {e}"),
        }
        out.append(&mut self.pending);
        out
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

/// A ring slot as a saved value.
fn slot(name: String, value: &impl Serialize) -> Option<Saved> {
    match serde_json::to_vec(value) {
        Ok(bytes) => Some(Saved { name, bytes }),
        Err(e) => {
            // Plain numbers and strings: serde_json cannot fail on them.
            tracing::error!("cannot encode the relays' saved value '{name}': {e}");
            None
        }
    }
}

/// Parses any layout; what cannot be used is logged (naming `what`) and
/// read as empty. Version 3 reads its rings from `reader`.
fn parse(bytes: &[u8], what: &str, reader: Option<&OutboxReader>) -> Loaded {
    match serde_json::from_slice::<OnDisk>(bytes) {
        Ok(OnDisk::V3(file)) if file.version == VERSION => {
            let mut l = Loaded { relays: file.relays, session_epoch: file.session_epoch, ..Loaded::default() };
            if let Some(reader) = reader {
                read_rings(reader, &mut l);
            }
            l.written = bytes.to_vec();
            l
        }
        Ok(OnDisk::V2(file)) if file.version == 2 => Loaded {
            relays: file.relays,
            ids: file.command_ids,
            session: file.session,
            migrate_gate: true,
            ..Loaded::default()
        },
        Ok(OnDisk::V3(FileV3 { version, .. }) | OnDisk::V2(FileV2 { version, .. })) => {
            tracing::error!(
                "{what}: version {version} is not one this fieldlink reads ({VERSION}); relay states start from \
                 power_on_state"
            );
            Loaded::default()
        }
        Ok(OnDisk::V1(relays)) => Loaded { relays, ..Loaded::default() },
        Err(e) => {
            tracing::error!("{what}: unreadable ({e}); relay states start from power_on_state");
            Loaded::default()
        }
    }
}

/// Reads both rings into `l`: the newest ids (oldest first), the session
/// replayed in order, and the next numbers. A slot that cannot be read is
/// logged and skipped: it costs the memory of one command, not the rest.
fn read_rings(reader: &OutboxReader, l: &mut Loaded) {
    let mut ids: Vec<IdSlot> = (0..ID_SLOTS).filter_map(|k| read_slot(reader, &id_slot_name(k))).collect();
    ids.sort_by_key(|s| s.n);
    l.next_id = ids.last().map_or(0, |s| s.n + 1);
    l.ids = ids.into_iter().map(|s| s.id).collect();
    let mut session: Vec<SessionSlot> =
        (0..SESSION_SLOTS).filter_map(|k| read_slot(reader, &session_slot_name(k))).collect();
    session.sort_by_key(|s| s.n);
    l.next_session = session.last().map_or(0, |s| s.n + 1);
    let mut live: BTreeMap<u16, (u64, u64)> = BTreeMap::new();
    for s in session.into_iter().filter(|s| s.epoch == l.session_epoch) {
        match s.fingerprint {
            Some(fingerprint) => live.insert(s.pkid, (s.n, fingerprint)),
            None => live.remove(&s.pkid),
        };
    }
    let mut entries: Vec<(u64, SessionEntry)> =
        live.into_iter().map(|(pkid, (n, fingerprint))| (n, SessionEntry { pkid, fingerprint })).collect();
    entries.sort_by_key(|(n, _)| *n);
    l.session = entries.into_iter().map(|(_, e)| e).collect();
}

fn read_slot<T: for<'de> Deserialize<'de>>(reader: &OutboxReader, name: &str) -> Option<T> {
    match reader.saved(name) {
        Ok(Some(bytes)) => match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!("the relays' saved value '{name}' is unreadable ({e}); skipped");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::error!("cannot read the relays' saved value '{name}' ({e}); skipped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::agent::command_gate::CommandGate;
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

    fn save(h: &OutboxHandle, saved: Vec<Saved>) {
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
        s.record(vec![
            GateChange::Applied("c0".into()),
            GateChange::Applied("c1".into()),
            GateChange::Session { pkid: 7, fingerprint: Some(u64::MAX) },
        ]);
        save(&h, s.snapshot());
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
        assert!(!s.snapshot().is_empty());
        assert!(s.snapshot().is_empty(), "unchanged");
        s.set("pump", on("c2"));
        assert_eq!(s.snapshot().len(), 1, "the relays value alone");
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
        let saved = s.snapshot();
        assert_eq!(
            saved.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["relays", "relays.id.0"],
            "the migration saves even without a change, the gate's memory into its ring"
        );
        save(&h, saved);
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
    fn a_version_1_file_is_read_and_saved_as_version_3() {
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
        let saved = s.snapshot();
        let text = String::from_utf8(saved[0].bytes.clone()).expect("JSON");
        assert!(text.starts_with(r#"{"version":3,"#), "{text}");
    }

    #[test]
    fn the_outbox_value_wins_over_a_leftover_relays_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MemStore::new();
        let (h, r) = open(&store);
        let mut s = SavedRelays::load(&r, dir.path());
        s.set("pump", on("new"));
        save(&h, s.snapshot());
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
            br#"{"version":4,"relays":{"pump":{"state":"on","command_id":null}},"session_epoch":0}"#,
        )
        .expect("write");
        let (_h, r) = open(&MemStore::new());
        assert_eq!(SavedRelays::load(&r, dir.path()).get("pump"), None);
    }

    /// Runs `changes` through a gate-shaped sequence and saves each step
    /// the way the Relay does: one snapshot per command.
    fn save_each(h: &OutboxHandle, s: &mut SavedRelays, changes: Vec<GateChange>) {
        for c in changes {
            s.record(vec![c]);
            save(h, s.snapshot());
        }
    }

    #[test]
    fn what_a_command_saves_stays_small_however_long_the_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (h, r) = open(&MemStore::new());
        let mut s = SavedRelays::load(&r, dir.path());
        let mut gate = CommandGate::default();
        let mut sizes = Vec::new();
        for n in 0..2_000u64 {
            let cmd = crate::proto::Command {
                relay: "pump".into(),
                action: crate::proto::Action::Set(RelayState::On),
                id: Some(format!("cmd-{n:05}")),
            };
            let pkid = (n % 60_000) as u16 + 1;
            let _ = gate.applied(&cmd, pkid, n);
            s.set("pump", on(&format!("cmd-{n:05}")));
            s.record(gate.take_changes());
            let saved = s.snapshot();
            sizes.push(saved.iter().map(|v| v.name.len() + v.bytes.len()).sum::<usize>());
            save(&h, saved);
        }
        // Commands 1,000 and 1,999 print their numbers with as many digits;
        // version 2 saved 1,000 more session entries for the second.
        let (first, last) = (sizes[1_000], sizes[1_999]);
        assert!(last <= first, "a command's save does not grow with the session: {first} then {last} bytes");
        assert!(last < 300, "a command saves a few hundred bytes at most: {last}");
        // And after a restart the gate still knows the newest ids and packet ids.
        let again = SavedRelays::load(&r, dir.path());
        assert_eq!(again.command_ids().len(), REMEMBERED_IDS);
        assert_eq!(again.command_ids().last().map(String::as_str), Some("cmd-01999"));
        assert_eq!(again.command_ids().first().map(String::as_str), Some("cmd-01744"));
        assert_eq!(again.session().len(), SESSION_SLOTS as usize);
        assert_eq!(again.session().last(), Some(&SessionEntry { pkid: 2_000, fingerprint: 1_999 }));
    }

    #[test]
    fn a_lost_session_and_a_forgotten_packet_id_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (h, r) = open(&MemStore::new());
        let mut s = SavedRelays::load(&r, dir.path());
        save_each(
            &h,
            &mut s,
            vec![
                GateChange::Session { pkid: 1, fingerprint: Some(11) },
                GateChange::SessionLost,
                GateChange::Session { pkid: 2, fingerprint: Some(22) },
                GateChange::Session { pkid: 3, fingerprint: Some(33) },
                GateChange::Session { pkid: 2, fingerprint: None },
            ],
        );
        let again = SavedRelays::load(&r, dir.path());
        assert_eq!(again.session(), [SessionEntry { pkid: 3, fingerprint: 33 }]);
    }

    #[test]
    fn a_version_2_value_in_the_outbox_is_rewritten_as_version_3_with_its_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MemStore::new();
        let (h, r) = open(&store);
        let v2 = br#"{"version":2,"relays":{"pump":{"state":"on","command_id":"b"}},"command_ids":["a","b"],"session":[{"pkid":9,"fingerprint":99}]}"#;
        save(&h, vec![Saved { name: SAVED_NAME.into(), bytes: v2.to_vec() }]);
        let mut s = SavedRelays::load(&r, dir.path());
        assert_eq!(s.command_ids(), ["a".to_string(), "b".to_string()]);
        save(&h, s.snapshot());
        let (_h, r) = open(&store.crashed());
        let again = SavedRelays::load(&r, dir.path());
        assert_eq!(again.get("pump"), Some(&on("b")));
        assert_eq!(again.command_ids(), ["a".to_string(), "b".to_string()]);
        assert_eq!(again.session(), [SessionEntry { pkid: 9, fingerprint: 99 }]);
        let text = String::from_utf8(r.saved(SAVED_NAME).expect("reads").expect("there")).expect("JSON");
        assert!(text.starts_with(r#"{"version":3,"#), "{text}");
    }

    #[test]
    fn an_unreadable_ring_slot_costs_only_its_own_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (h, r) = open(&MemStore::new());
        let mut s = SavedRelays::load(&r, dir.path());
        save_each(&h, &mut s, vec![GateChange::Applied("a".into()), GateChange::Applied("b".into())]);
        save(&h, vec![Saved { name: id_slot_name(0), bytes: b"{garbage".to_vec() }]);
        let again = SavedRelays::load(&r, dir.path());
        assert_eq!(again.command_ids(), ["b".to_string()]);
    }
}
