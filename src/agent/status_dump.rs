//! Taking a status dump (DESIGN: Status dump): gathers the outbox numbers,
//! renders the board ([`StatusBoard::dump`]), writes `<state_dir>/status.json`
//! atomically (without fsync: a dump is a snapshot, and `fieldlink status`
//! should not wait for the disk) and logs the one-line summary: at info when the file was
//! written, at warn with the reason when it was not (a full or read-only
//! disk), so a dump is never lost with its file. SIGUSR1 (`lifecycle`) and
//! the status socket (`status_socket`) both take dumps here, one at a time.
//!
//! It blocks (a sled read for `oldest_ts`, the file write), so it
//! must never run on an actor's thread. It decides nothing about what a dump
//! holds (that is `status`'s business) or how it reaches a client.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use super::recorder::Recorder;
use super::status::{OutboxView, StatusBoard};
use crate::fsutil;
use crate::outbox::OutboxReader;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("cannot render the status dump: {0}")]
    Render(#[from] serde_json::Error),
    #[error("cannot write '{}': {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// One dump, rendered.
#[derive(Debug)]
pub struct Dumped {
    /// The dump as `status.json` holds it (pretty JSON).
    pub json: Vec<u8>,
    /// Why `status.json` does not hold it, if it does not.
    pub unwritten: Option<DumpError>,
}

/// Takes dumps; share it with `Arc`.
pub struct StatusDump {
    board: Arc<StatusBoard>,
    recorder: Recorder,
    reader: OutboxReader,
    path: PathBuf,
    /// One dump at a time: two writers would share `status.json.tmp`.
    writing: Mutex<()>,
}

impl StatusDump {
    /// Dumps into `path` (`<state_dir>/status.json`).
    pub fn new(board: Arc<StatusBoard>, recorder: Recorder, reader: OutboxReader, path: PathBuf) -> StatusDump {
        StatusDump { board, recorder, reader, path, writing: Mutex::new(()) }
    }

    /// Renders the board now, writes `status.json` and logs the summary.
    /// Fails only if the dump cannot be rendered at all.
    pub fn take(&self) -> Result<Dumped, DumpError> {
        // The guard protects no data: a panic while writing leaves nothing
        // half-changed here (the file is replaced atomically or not at all).
        let _one_at_a_time = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let outbox = self.recorder.outbox();
        let view = OutboxView {
            stats: outbox.stats(),
            disk_fault: outbox.disk_fault(),
            oldest_ts_ms: self.reader.oldest_ts_ms(),
        };
        let dump = self.board.dump(view);
        let summary = dump.summary();
        let json =
            serde_json::to_vec_pretty(&dump).inspect_err(|e| tracing::error!("status dump not rendered: {e}"))?;
        let unwritten = match fsutil::replace_unsynced(&self.path, &json) {
            Ok(()) => {
                tracing::info!("{summary}; written to {}", self.path.display());
                None
            }
            Err(source) => {
                let e = DumpError::Write { path: self.path.clone(), source };
                // The summary goes to the log in full: the file may be the
                // only thing that cannot be written.
                tracing::warn!("{summary}; status dump NOT written: {e}");
                Some(e)
            }
        };
        Ok(Dumped { json, unwritten })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{Durability, OutboxConfig};
    use crate::outbox::{MemStore, open_in_memory};

    fn dumper(path: PathBuf) -> StatusDump {
        let cfg = OutboxConfig { max_bytes: 1 << 20, durability: Durability::Always, flush_interval: Duration::ZERO };
        let (outbox, reader, _) = open_in_memory(&MemStore::new(), &cfg).expect("in-memory outbox");
        StatusDump::new(Arc::new(StatusBoard::new("pi")), Recorder::new("pi", 0, outbox), reader, path)
    }

    #[test]
    fn a_dump_is_written_to_status_json_and_returned_with_the_same_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("status.json");
        let d = dumper(path.clone()).take().expect("rendered");
        assert!(d.unwritten.is_none(), "{:?}", d.unwritten);
        assert_eq!(std::fs::read(&path).expect("status.json"), d.json);
        let v: serde_json::Value = serde_json::from_slice(&d.json).expect("JSON");
        let (durable, next) = (v["outbox"]["durable_seq"].as_u64(), v["outbox"]["next_seq"].as_u64());
        assert_eq!(next, durable.map(|s| s + 1), "nothing recorded yet: everything is durable");
        assert_eq!(v["outbox"]["disk_fault"], false);
    }

    #[test]
    fn a_dump_that_cannot_be_written_is_still_returned_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("status.json");
        // The temporary file cannot be created where a directory stands.
        std::fs::create_dir(dir.path().join("status.json.tmp")).expect("mkdir");
        let d = dumper(path.clone()).take().expect("rendered");
        let why = d.unwritten.expect("the write failed").to_string();
        assert!(why.contains("status.json"), "{why}");
        assert!(!path.exists(), "nothing was written");
        let v: serde_json::Value = serde_json::from_slice(&d.json).expect("JSON");
        assert_eq!(v["device"], "pi");
    }
}
