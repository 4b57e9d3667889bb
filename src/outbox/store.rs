//! Storage behind a trait, so the queue logic (writer, reader, open) is the
//! same code over the real disk and over memory. Owns the [`Store`] trait, the
//! sled implementation ([`SledStore`]: three trees, and the `seq.floor` and
//! `outbox.closed` files beside them)
//! and the in-memory one ([`MemStore`]: used by unit tests and benches, with
//! a flush counter, simulated crashes and fault injection).
//!
//! A store moves bytes and nothing else: it never decodes a record value,
//! never decides what to drop, and never flushes on its own (sled is opened
//! with `flush_every_ms(None)`; the writer owns every fsync).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::Class;
use super::record::{self, CloseSummary, RecordError};
use crate::fsutil;

/// sled's page cache. The default (1 GiB) is far too much for a Pi; the queue
/// is written once and read roughly once, so a small cache costs little.
const SLED_CACHE_BYTES: u64 = 8 << 20;

/// Meta keys (values are [`record::encode_u64`]).
pub(crate) const META_NEXT_SEQ: &str = "next_seq";
pub(crate) const META_DROPPED: &str = "dropped";
pub(crate) const META_CLEAN: &str = "clean";

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("{what} '{}': {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("'{}' is not a seq floor file: {source}", path.display())]
    BadFloor { path: PathBuf, source: RecordError },
    #[error("'{}' is not an outbox close summary: {source}", path.display())]
    BadCloseSummary { path: PathBuf, source: RecordError },
    #[error("sled panicked while opening the database: {0}")]
    Panicked(String),
    /// A failure injected into a [`MemStore`].
    #[error("{0}")]
    Injected(&'static str),
}

impl StoreError {
    /// Whether this error means the data is damaged (move it aside) rather
    /// than that the disk or the system is unwell right now.
    pub(crate) fn is_corruption(&self) -> bool {
        matches!(
            self,
            StoreError::Sled(
                sled::Error::Corruption { .. } | sled::Error::Unsupported(_) | sled::Error::ReportableBug(_)
            ) | StoreError::Panicked(_)
        )
    }

    /// Whether this is sled refusing to open a database another process holds.
    pub(crate) fn is_lock_held(&self) -> bool {
        match self {
            StoreError::Sled(sled::Error::Io(e)) => e.to_string().contains("could not acquire lock"),
            _ => false,
        }
    }
}

/// Counts found by [`Store::scan`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scan {
    pub records: u64,
    /// Σ (8 + value length): the logical size the bound applies to.
    pub bytes: u64,
    pub last_seq: Option<u64>,
    /// Keys that are not 8 bytes long; `scan` removes them.
    pub bad_keys: u64,
}

/// The size a stored record counts for in `Stats::bytes`.
pub(crate) fn stored_size(value_len: usize) -> u64 {
    8 + value_len as u64
}

/// What the queue needs from storage. All methods take `&self`: the writer
/// thread mutates, readers read from their own threads.
pub(crate) trait Store: Send + Sync + 'static {
    fn insert(&self, class: Class, seq: u64, value: &[u8]) -> Result<(), StoreError>;
    /// Removes `seq` from whichever tree holds it: its class and stored size,
    /// or `None` if it is not there.
    fn remove(&self, seq: u64) -> Result<Option<(Class, u64)>, StoreError>;
    /// The oldest entry of a tree.
    fn first(&self, class: Class) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Up to `limit` entries with `from <= seq <= upto`, in seq order.
    fn range(&self, class: Class, from: u64, upto: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Counts a tree and removes keys that are not 8 bytes long.
    fn scan(&self, class: Class) -> Result<Scan, StoreError>;
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Makes every change so far durable (fsync).
    fn flush(&self) -> Result<(), StoreError>;
    /// The seq reservation `R`, if one was ever written.
    fn floor(&self) -> Result<Option<u64>, StoreError>;
    /// Durably replaces `R` (atomic: a crash leaves the old or the new value).
    fn set_floor(&self, r: u64) -> Result<(), StoreError>;
    /// What the last clean close recorded outside the database, if anything.
    fn close_summary(&self) -> Result<Option<CloseSummary>, StoreError>;
    /// Durably replaces the close summary (atomic, like the floor).
    fn set_close_summary(&self, summary: &CloseSummary) -> Result<(), StoreError>;
    /// Durably removes the close summary; absent is fine.
    fn remove_close_summary(&self) -> Result<(), StoreError>;
}

// ---------------------------------------------------------------------------
// sled

/// Where a [`SledStore`] keeps the files beside the database.
pub(crate) struct SidePaths {
    /// `<state_dir>/seq.floor`.
    pub floor: PathBuf,
    /// `<state_dir>/outbox.closed`.
    pub close_summary: PathBuf,
}

/// The outbox on disk: a sled database plus the `seq.floor` and
/// `outbox.closed` files beside it.
pub(crate) struct SledStore {
    db: sled::Db,
    heartbeats: sled::Tree,
    events: sled::Tree,
    meta: sled::Tree,
    side: SidePaths,
    /// The `outbox.lock` flock; held as long as the database is open.
    _lock: Arc<File>,
}

impl SledStore {
    /// Opens (or creates) the database in `dir`. A panic inside sled is
    /// caught and reported as [`StoreError::Panicked`] (treated as
    /// corruption) so that a damaged file cannot take the agent down.
    pub(crate) fn open(dir: &Path, side: SidePaths, lock: Arc<File>) -> Result<SledStore, StoreError> {
        let config = sled::Config::new().path(dir).cache_capacity(SLED_CACHE_BYTES).flush_every_ms(None);
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let db = config.open()?;
            let heartbeats = db.open_tree("heartbeats")?;
            let events = db.open_tree("events")?;
            let meta = db.open_tree("meta")?;
            Ok::<_, sled::Error>((db, heartbeats, events, meta))
        }));
        let (db, heartbeats, events, meta) = match opened {
            Ok(result) => result?,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".to_string());
                return Err(StoreError::Panicked(msg));
            }
        };
        Ok(SledStore { db, heartbeats, events, meta, side, _lock: lock })
    }

    fn tree(&self, class: Class) -> &sled::Tree {
        match class {
            Class::Heartbeat => &self.heartbeats,
            Class::Event => &self.events,
        }
    }
}

impl Store for SledStore {
    fn insert(&self, class: Class, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        // The old value is None: seqs are never reused.
        let _old = self.tree(class).insert(record::key(seq), value)?;
        Ok(())
    }

    fn remove(&self, seq: u64) -> Result<Option<(Class, u64)>, StoreError> {
        for class in [Class::Event, Class::Heartbeat] {
            if let Some(old) = self.tree(class).remove(record::key(seq))? {
                return Ok(Some((class, stored_size(old.len()))));
            }
        }
        Ok(None)
    }

    fn first(&self, class: Class) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        for entry in self.tree(class).iter() {
            let (k, v) = entry?;
            if let Some(seq) = record::seq_of_key(&k) {
                return Ok(Some((seq, v.to_vec())));
            }
        }
        Ok(None)
    }

    fn range(&self, class: Class, from: u64, upto: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        if from > upto || limit == 0 {
            return Ok(out);
        }
        for entry in self.tree(class).range(record::key(from)..=record::key(upto)) {
            let (k, v) = entry?;
            // Only 8-byte keys are ours; `scan` removed any other at open.
            if let Some(seq) = record::seq_of_key(&k) {
                out.push((seq, v.to_vec()));
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn scan(&self, class: Class) -> Result<Scan, StoreError> {
        let tree = self.tree(class);
        let mut scan = Scan::default();
        let mut bad = Vec::new();
        for entry in tree.iter() {
            let (k, v) = entry?;
            match record::seq_of_key(&k) {
                Some(seq) => {
                    scan.records += 1;
                    scan.bytes += stored_size(v.len());
                    scan.last_seq = Some(seq);
                }
                None => bad.push(k),
            }
        }
        for k in bad {
            // The value is garbage by definition; only the removal matters.
            let _garbage = tree.remove(k)?;
            scan.bad_keys += 1;
        }
        Ok(scan)
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        // The previous value is superseded; nothing to do with it.
        let _previous = self.meta.insert(key, value)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Flushing the Db flushes the shared log, so every tree.
        let _bytes_written = self.db.flush()?;
        Ok(())
    }

    fn floor(&self) -> Result<Option<u64>, StoreError> {
        let path = &self.side.floor;
        read_if_exists(path, "cannot read seq floor")?
            .map(|bytes| {
                record::decode_u64(&bytes).map_err(|source| StoreError::BadFloor { path: path.clone(), source })
            })
            .transpose()
    }

    fn set_floor(&self, r: u64) -> Result<(), StoreError> {
        write_atomically(&self.side.floor, &record::encode_u64(r))
    }

    fn close_summary(&self) -> Result<Option<CloseSummary>, StoreError> {
        let path = &self.side.close_summary;
        read_if_exists(path, "cannot read outbox close summary")?
            .map(|bytes| {
                record::decode_close_summary(&bytes)
                    .map_err(|source| StoreError::BadCloseSummary { path: path.clone(), source })
            })
            .transpose()
    }

    fn set_close_summary(&self, summary: &CloseSummary) -> Result<(), StoreError> {
        write_atomically(&self.side.close_summary, &record::encode_close_summary(summary))
    }

    fn remove_close_summary(&self) -> Result<(), StoreError> {
        remove_durably(&self.side.close_summary)
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}

/// The content of `path`, or `None` if there is no such file.
fn read_if_exists(path: &Path, what: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io_err(what, path)(source)),
    }
}

/// Replaces `path` with `bytes` durably ([`fsutil::write_atomic`]).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    fsutil::write_atomic(path, bytes).map_err(io_err("cannot write atomically", path))
}

/// Removes `path` (absent is fine) and fsyncs the directory, so the removal
/// survives a power cut.
fn remove_durably(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => fsync_parent(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(io_err("cannot remove", path)(source)),
    }
}

/// Makes a rename or removal in `path`'s directory durable.
fn fsync_parent(path: &Path) -> Result<(), StoreError> {
    fsutil::sync_parent(path).map_err(io_err("cannot fsync the directory of", path))
}

// ---------------------------------------------------------------------------
// memory

/// An in-memory [`Store`] for tests and benches. It keeps two copies of the
/// data: what has been written and what has been flushed, so a test can
/// simulate a power cut ([`MemStore::crashed`]) and count fsyncs
/// ([`MemStore::flush_count`]). Clones share the same data; open an outbox
/// over it with [`super::open_in_memory`].
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
    #[cfg(test)]
    gate: Arc<Mutex<Option<Arc<tests::FlushGate>>>>,
}

#[derive(Default)]
struct MemInner {
    written: MemState,
    durable: MemState,
    flushes: u64,
    fail_writes: bool,
}

#[derive(Clone, Default)]
struct MemState {
    trees: [BTreeMap<u64, Vec<u8>>; 2],
    meta: BTreeMap<String, Vec<u8>>,
    /// The floor and the close summary are separate files, written (and
    /// removed) durably at once.
    floor: Option<u64>,
    close_summary: Option<CloseSummary>,
}

fn idx(class: Class) -> usize {
    match class {
        Class::Heartbeat => 0,
        Class::Event => 1,
    }
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// How many times the outbox has flushed this store.
    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }

    /// A new store holding only what had been flushed: the state a power cut
    /// at this instant would leave behind.
    pub fn crashed(&self) -> MemStore {
        let durable = self.lock().durable.clone();
        let store = MemStore::new();
        {
            let mut inner = store.lock();
            inner.written = durable.clone();
            inner.durable = durable;
        }
        store
    }

    /// Makes every later write and flush fail, as a full disk would (until
    /// called again with `false`).
    pub fn set_fail_writes(&self, fail: bool) {
        self.lock().fail_writes = fail;
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        // A panic while holding the lock leaves plain maps behind, still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn writable(&self) -> Result<MutexGuard<'_, MemInner>, StoreError> {
        let inner = self.lock();
        if inner.fail_writes {
            return Err(StoreError::Injected("no space left on device (injected)"));
        }
        Ok(inner)
    }
}

impl Store for MemStore {
    fn insert(&self, class: Class, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        // The old value is None: seqs are never reused.
        let _old = self.writable()?.written.trees[idx(class)].insert(seq, value.to_vec());
        Ok(())
    }

    fn remove(&self, seq: u64) -> Result<Option<(Class, u64)>, StoreError> {
        let mut inner = self.lock();
        for class in [Class::Event, Class::Heartbeat] {
            if let Some(old) = inner.written.trees[idx(class)].remove(&seq) {
                return Ok(Some((class, stored_size(old.len()))));
            }
        }
        Ok(None)
    }

    fn first(&self, class: Class) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self.lock().written.trees[idx(class)].first_key_value().map(|(k, v)| (*k, v.clone())))
    }

    fn range(&self, class: Class, from: u64, upto: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if from > upto {
            return Ok(Vec::new());
        }
        let inner = self.lock();
        Ok(inner.written.trees[idx(class)].range(from..=upto).take(limit).map(|(k, v)| (*k, v.clone())).collect())
    }

    fn scan(&self, class: Class) -> Result<Scan, StoreError> {
        let inner = self.lock();
        let tree = &inner.written.trees[idx(class)];
        Ok(Scan {
            records: tree.len() as u64,
            bytes: tree.values().map(|v| stored_size(v.len())).sum(),
            last_seq: tree.last_key_value().map(|(k, _)| *k),
            bad_keys: 0,
        })
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().written.meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        // The previous value is superseded; nothing to do with it.
        let _previous = self.writable()?.written.meta.insert(key.to_string(), value.to_vec());
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        #[cfg(test)]
        {
            let gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if let Some(gate) = gate {
                gate.pass();
            }
        }
        let mut inner = self.writable()?;
        inner.durable = inner.written.clone();
        inner.flushes += 1;
        Ok(())
    }

    fn floor(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.lock().written.floor)
    }

    fn set_floor(&self, r: u64) -> Result<(), StoreError> {
        let mut inner = self.writable()?;
        inner.written.floor = Some(r);
        inner.durable.floor = Some(r);
        Ok(())
    }

    fn close_summary(&self) -> Result<Option<CloseSummary>, StoreError> {
        Ok(self.lock().written.close_summary)
    }

    fn set_close_summary(&self, summary: &CloseSummary) -> Result<(), StoreError> {
        let mut inner = self.writable()?;
        inner.written.close_summary = Some(*summary);
        inner.durable.close_summary = Some(*summary);
        Ok(())
    }

    fn remove_close_summary(&self) -> Result<(), StoreError> {
        let mut inner = self.writable()?;
        inner.written.close_summary = None;
        inner.durable.close_summary = None;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Condvar;

    use super::*;

    /// Holds the writer inside `flush` until released, so a test can queue
    /// work behind a flush in progress without relying on timing.
    #[derive(Default)]
    pub(crate) struct FlushGate {
        state: Mutex<(bool, bool)>, // (entered, released)
        cv: Condvar,
    }

    impl FlushGate {
        pub(crate) fn pass(&self) {
            let mut s = self.state.lock().expect("gate lock");
            s.0 = true;
            self.cv.notify_all();
            while !s.1 {
                s = self.cv.wait(s).expect("gate lock");
            }
        }

        /// Blocks until the writer is inside `flush`.
        pub(crate) fn wait_entered(&self) {
            let mut s = self.state.lock().expect("gate lock");
            while !s.0 {
                s = self.cv.wait(s).expect("gate lock");
            }
        }

        pub(crate) fn release(&self) {
            self.state.lock().expect("gate lock").1 = true;
            self.cv.notify_all();
        }
    }

    impl MemStore {
        /// The next flush blocks until the returned gate is released.
        pub(crate) fn gate_next_flush(&self) -> Arc<FlushGate> {
            let gate = Arc::new(FlushGate::default());
            *self.gate.lock().expect("gate lock") = Some(gate.clone());
            gate
        }

        /// Lets every later flush through.
        pub(crate) fn ungate(&self) {
            *self.gate.lock().expect("gate lock") = None;
        }

        /// A new store whose database is what `older` had flushed while the
        /// files beside it (floor, close summary) are this store's: a
        /// database that went back to an older state, as sled does when its
        /// `db` file lost its tail.
        pub(crate) fn rolled_back_to(&self, older: &MemStore) -> MemStore {
            let mut state = older.lock().durable.clone();
            {
                let inner = self.lock();
                state.floor = inner.durable.floor;
                state.close_summary = inner.durable.close_summary;
            }
            let store = MemStore::new();
            {
                let mut inner = store.lock();
                inner.written = state.clone();
                inner.durable = state;
            }
            store
        }

        /// Overwrites a stored value in place, as bit rot would.
        pub(crate) fn corrupt(&self, class: Class, seq: u64, value: &[u8]) {
            let mut inner = self.lock();
            inner.written.trees[idx(class)].insert(seq, value.to_vec());
        }
    }

    fn scratch_lock(dir: &Path) -> Arc<File> {
        Arc::new(File::create(dir.join("test.lock")).expect("lock file"))
    }

    fn scratch_store(dir: &Path) -> SledStore {
        let side = SidePaths { floor: dir.join("seq.floor"), close_summary: dir.join("outbox.closed") };
        SledStore::open(&dir.join("outbox"), side, scratch_lock(dir)).expect("open")
    }

    #[test]
    fn the_sled_store_keeps_classes_apart_and_ranges_in_seq_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = scratch_store(dir.path());
        for seq in [3u64, 1, 256, 2] {
            let class = if seq % 2 == 0 { Class::Heartbeat } else { Class::Event };
            store.insert(class, seq, &[seq as u8; 3]).expect("insert");
        }
        let ev: Vec<u64> = store.range(Class::Event, 0, u64::MAX, 10).expect("range").iter().map(|e| e.0).collect();
        let hb: Vec<u64> = store.range(Class::Heartbeat, 0, u64::MAX, 10).expect("range").iter().map(|e| e.0).collect();
        assert_eq!(ev, vec![1, 3]);
        assert_eq!(hb, vec![2, 256]);
        assert_eq!(store.range(Class::Heartbeat, 3, 300, 1).expect("range")[0].0, 256);
        assert_eq!(store.first(Class::Heartbeat).expect("first").map(|e| e.0), Some(2));
        assert_eq!(store.remove(256).expect("remove"), Some((Class::Heartbeat, 11)));
        assert_eq!(store.remove(256).expect("remove"), None);
        let scan = store.scan(Class::Event).expect("scan");
        assert_eq!(scan, Scan { records: 2, bytes: 22, last_seq: Some(3), bad_keys: 0 });
    }

    #[test]
    fn the_sled_store_drops_keys_it_never_writes_when_scanning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = scratch_store(dir.path());
        store.insert(Class::Event, 5, b"x").expect("insert");
        let _old = store.events.insert(b"odd", b"y".as_slice()).expect("insert");
        let scan = store.scan(Class::Event).expect("scan");
        assert_eq!((scan.records, scan.bad_keys, scan.last_seq), (1, 1, Some(5)));
        assert_eq!(store.scan(Class::Event).expect("scan").bad_keys, 0);
    }

    #[test]
    fn the_floor_file_is_written_atomically_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let floor = dir.path().join("seq.floor");
        let store = scratch_store(dir.path());
        assert_eq!(store.floor().expect("floor"), None);
        store.set_floor(2_000_001).expect("set floor");
        assert_eq!(store.floor().expect("floor"), Some(2_000_001));
        assert_eq!(fs::read(&floor).expect("read").len(), 9);
        assert!(!dir.path().join("seq.floor.tmp").exists());
        fs::write(&floor, b"garbage").expect("write");
        assert!(matches!(store.floor(), Err(StoreError::BadFloor { .. })));
    }

    #[test]
    fn the_close_summary_file_is_written_atomically_read_back_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outbox.closed");
        let store = scratch_store(dir.path());
        assert_eq!(store.close_summary().expect("read"), None);
        store.remove_close_summary().expect("removing an absent summary is fine");
        let summary = CloseSummary { next_seq: 42, depth: 41, bytes: 2_460, dropped: 3 };
        store.set_close_summary(&summary).expect("write");
        assert_eq!(store.close_summary().expect("read"), Some(summary));
        assert_eq!(fs::read(&path).expect("read").len(), 33);
        assert!(!dir.path().join("outbox.closed.tmp").exists());
        store.remove_close_summary().expect("remove");
        assert!(!path.exists());
        assert_eq!(store.close_summary().expect("read"), None);
        fs::write(&path, b"garbage").expect("write");
        assert!(matches!(store.close_summary(), Err(StoreError::BadCloseSummary { .. })));
    }

    #[test]
    fn a_mem_store_crash_keeps_only_what_was_flushed() {
        let store = MemStore::new();
        store.insert(Class::Event, 1, b"a").expect("insert");
        store.flush().expect("flush");
        store.insert(Class::Event, 2, b"b").expect("insert");
        store.set_floor(7).expect("floor");
        let after = store.crashed();
        assert_eq!(after.scan(Class::Event).expect("scan").last_seq, Some(1));
        assert_eq!(after.floor().expect("floor"), Some(7));
        assert_eq!(store.flush_count(), 1);
    }
}
