//! The relays' last states in `<state_dir>/relays.json`, for
//! `power_on_state = "last"` and for recognising a command delivered twice
//! (same `id`). Owns that file's format and durable writes; it never touches
//! a pin.
//!
//! ```text
//! {"pump":{"state":"on","command_id":"abc"}}
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::proto::RelayState;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRelay {
    pub state: RelayState,
    pub command_id: Option<String>,
}

#[derive(Debug)]
pub struct SavedRelays {
    path: PathBuf,
    relays: BTreeMap<String, SavedRelay>,
}

impl SavedRelays {
    /// Loads `<state_dir>/relays.json`; a missing file is empty, an unreadable
    /// one is reported and treated as empty (the relays then follow
    /// `power_on_state` fallbacks rather than refusing to start).
    pub fn load(state_dir: &Path) -> SavedRelays {
        let path = state_dir.join("relays.json");
        let relays = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!("{}: unreadable ({e}); relay states start from power_on_state", path.display());
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                tracing::error!("{}: {e}; relay states start from power_on_state", path.display());
                BTreeMap::new()
            }
        };
        SavedRelays { path, relays }
    }

    pub fn get(&self, name: &str) -> Option<&SavedRelay> {
        self.relays.get(name)
    }

    /// Records and fsyncs a relay's state.
    pub fn save(&mut self, name: &str, relay: SavedRelay) -> std::io::Result<()> {
        if self.relays.get(name) == Some(&relay) {
            return Ok(());
        }
        self.relays.insert(name.to_string(), relay);
        let bytes = serde_json::to_vec(&self.relays).map_err(std::io::Error::other)?;
        fsutil::write_atomic(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_states_survive_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = SavedRelays::load(dir.path());
        assert_eq!(s.get("pump"), None);
        s.save("pump", SavedRelay { state: RelayState::On, command_id: Some("c1".into()) }).expect("save");
        let again = SavedRelays::load(dir.path());
        assert_eq!(again.get("pump"), Some(&SavedRelay { state: RelayState::On, command_id: Some("c1".into()) }));
    }

    #[test]
    fn a_corrupt_file_is_treated_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("relays.json"), b"{garbage").expect("write");
        assert_eq!(SavedRelays::load(dir.path()).get("pump"), None);
    }
}
