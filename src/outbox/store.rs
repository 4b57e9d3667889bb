//! Storage behind traits, so the queue logic (writer, reader, open) is the
//! same code over the real disk and over memory. Owns the [`Store`] trait
//! (the database), the [`Side`] trait (the files beside it, which outlive a
//! reopen of the database), [`StoreSlot`] (how the writer swaps the database
//! under the readers), the sled implementations ([`SledStore`]: records in
//! chunks; [`SledSide`]: `seq.floor`, `outbox.ledger`, the legacy
//! `outbox.closed`) and the in-memory one ([`MemStore`]: used by unit tests
//! and benches, with a flush counter, simulated crashes and fault injection
//! that is sticky like sled's).
//!
//! A store moves bytes and nothing else: it never decodes a record value,
//! never decides what to drop, and never flushes on its own (sled is opened
//! with `flush_every_ms(None)`; the writer owns every fsync).
//!
//! # Records in chunks
//!
//! The [`Store`] trait is per record, by seq; [`SledStore`] keeps records
//! grouped on disk, so that a commit costs sled one op per *chunk* instead
//! of one per record (sled's per-record `insert`/`remove` was ~38 % of the
//! agent's CPU per message, and its pages for a 100,000-record backlog kept
//! 7–8 MiB after the drain; issue #8):
//!
//! ```text
//! tree "chunks.heartbeats"  key: chunk key, u64 BE (8 bytes)   value: chunk (chunk.rs)
//! tree "chunks.events"      key: chunk key, u64 BE (8 bytes)   value: chunk (chunk.rs)
//! tree "chunks.removed"     key: class (0 heartbeat, 1 event), then the chunk key (9 bytes)
//!                           value: removed bitmap of that chunk (chunk.rs)
//! tree "meta"               unchanged (mod.rs)
//! tree "heartbeats", "events"  builds before chunks: one 8-byte seq key per record;
//!                           moved into chunks at open, then empty
//! ```
//!
//! A chunk's key is the seq its first record had when the chunk was
//! created; it holds up to 256 records of one class, about 6 KiB of values
//! (one larger record alone: see `chunk.rs` for why so small), seqs ascending, each below the next chunk's
//! key. In memory the store keeps an index (`index.rs`): per chunk its key,
//! per record its seq offset and value length and a removed bit; the values
//! of records not yet flushed; and the last chunk read per class.
//!
//! * `insert` only adds to the index and to a chunk held in memory (the last
//!   one of the class, or a new one): reads see it at once (the reader caps
//!   them at `written_seq`). The same seq again is idempotent.
//! * `remove` sets the record's bit in the index.
//! * `flush` writes, per chunk changed since the last flush, one sled op: the
//!   whole chunk (new, or extended: the last chunk of a class is kept in
//!   memory while under 4 KiB, so a trickle of records still groups), or
//!   its removed bitmap (records removed from a chunk on disk), or the
//!   deletion of the chunk and its bitmap (nothing left in it). Then
//!   `Db::flush` and the blob fsyncs below. Between flushes sled is not
//!   touched, so a crash leaves exactly what the last flush made durable:
//!   an insert not flushed is gone (its appender never heard `Ok`), a
//!   removal not flushed comes back (at least once, as before).
//! * A removed bitmap names the CRC of the chunk it describes: one left
//!   behind by a crash between rewriting a chunk and deleting its old
//!   bitmap no longer matches and is ignored (its records come back).
//! * Open reads every chunk and bitmap to build the index (what `scan`
//!   counts). A chunk that fails its checksum, does not decode or overlaps
//!   another is corruption ([`StoreError::BadChunk`]): open moves the
//!   database aside and salvage reads what it can (`salvage.rs`). A key
//!   that is not 8 bytes is removed and reported once by `scan`
//!   (`bad_keys`, counted as dropped). A bitmap that fails its checksum is
//!   ignored. Records of an earlier build's per-record trees are moved into
//!   chunks: chunks written and made durable first, the old trees cleared
//!   after, so a crash in between finds every record at least once.
//! * A chunk that stops checking out after open (read for a replay) yields
//!   its records with empty values: the reader reports them as undecodable
//!   and the writer removes them and counts them as dropped.
//!
//! The reader and the writer share the index behind one mutex; a read holds
//! it while it fetches a chunk from sled (microseconds: the chunk is in
//! sled's cache or one page read away), a flush while it hands sled the
//! changed chunks, but not across `Db::flush`'s wait on the disk.
//!
//! # What `flush` makes durable
//!
//! Upstream sled 0.34.7 writes its log with `pwrite` and then
//! `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` (`write_to_log`): that
//! pushes the pages to the device but flushes neither the file's metadata (its
//! size, for a log that grew) nor the device's write cache, so a power cut can
//! still lose what `Db::flush` reported as durable. Our vendored copy calls
//! `fdatasync` there instead (`vendor/sled/PATCHED.md`, patch 4), so a log
//! write is durable when sled marks it stable, and `Db::flush` returns only
//! once everything written before it is stable: one wait on the disk per
//! commit, where upstream's sync plus our own fdatasync of `db` were two.
//! Large pages go to `blobs/<lsn>` files, written with no sync at all
//! (`pagecache/blob_io.rs:65-95`). So [`SledStore::flush`] is `Db::flush`,
//! then `fsync` of every blob file not synced before (and of `blobs/`). Only
//! then does a record count as durable.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use super::Class;
use super::chunk::{self, Chunk, Removed};
use super::index::{ClassIndex, NeedLoad, Write};
use super::ledger::{Ledger, LedgerError, LedgerFile};
use super::lock::{self, StateDirLock};
use super::panics;
use super::record::{self, CloseSummary, Floor, RecordError};
use crate::fsutil;

/// sled's page cache. The default (1 GiB) is far too much for a Pi; the queue
/// is written once and read roughly once, so a small cache costs little:
/// replaying 10,000 and 200,000 queued records cost about the same CPU per
/// record with 256 KiB as with 8 MiB (BENCHMARKS.md, issue #8), and every
/// MiB not cached is a MiB the agent does not hold with a backlog.
const SLED_CACHE_BYTES: u64 = 1 << 20;

/// Meta keys (values are [`record::encode_u64`]).
pub(crate) const META_NEXT_SEQ: &str = "next_seq";
pub(crate) const META_DROPPED: &str = "dropped";
pub(crate) const META_CLEAN: &str = "clean";
/// Counts commits (fsyncs); the ledger names the one it describes.
pub(crate) const META_COMMIT: &str = "commit";

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
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("sled panicked: {0}")]
    Panicked(String),
    #[error("the outbox database is not open (it is being reopened after a disk fault)")]
    NotOpen,
    #[error("the outbox cannot write to its disk: {0}")]
    Fault(String),
    #[error("cannot encode a replayed record: {0}")]
    Replay(RecordError),
    /// A chunk value that does not check out, or does not fit the others.
    #[error("chunk {key} of the {class:?} records is damaged: {reason}")]
    BadChunk { class: Class, key: u64, reason: String },
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
                | StoreError::BadChunk { .. }
        )
    }

    /// Whether this is sled refusing to open a database another process holds.
    pub(crate) fn is_lock_held(&self) -> bool {
        match self {
            StoreError::Sled(sled::Error::Io(e)) => e.to_string().contains("could not acquire lock"),
            _ => false,
        }
    }

    /// Whether the database is unusable for writing until it is reopened.
    /// sled keeps the first I/O error of its log in `Config::global_error`
    /// and returns it from every later write and flush
    /// (`pagecache/iobuf.rs:1184-1195`, `config.rs:730-765`); only a new
    /// `Db` clears it (`pagecache/mod.rs:583`). A failed `fdatasync` of the
    /// log (patch 4 in `vendor/sled/PATCHED.md`) is such an error, rightly:
    /// after it, the kernel may have dropped the dirty pages, so what sled
    /// believes is on disk is not.
    pub(crate) fn needs_reopen(&self) -> bool {
        matches!(self, StoreError::Sled(_) | StoreError::Injected(_) | StoreError::NotOpen)
    }
}

/// Counts found by [`Store::scan`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scan {
    pub records: u64,
    /// Σ (8 + value length): the logical size the bound applies to.
    pub bytes: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records with a seq at or above the scan's `live_from`.
    pub live: u64,
    /// Records with a seq at or above the scan's `after_from`.
    pub after: u64,
    /// Keys that are not 8 bytes long; `scan` removes them.
    pub bad_keys: u64,
}

/// The size a stored record counts for in `Stats::bytes`.
pub(crate) fn stored_size(value_len: usize) -> u64 {
    8 + value_len as u64
}

/// What the queue needs from storage. All methods take `&self`: the writer
/// thread mutates, the reader thread reads.
pub(crate) trait Store: Send + Sync + 'static {
    fn insert(&self, class: Class, seq: u64, value: &[u8]) -> Result<(), StoreError>;
    /// Removes `seq` from whichever tree holds it: its class and stored size,
    /// or `None` if it is not there.
    fn remove(&self, seq: u64) -> Result<Option<(Class, u64)>, StoreError>;
    /// The oldest entry of a tree.
    fn first(&self, class: Class) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Up to `limit` entries with `from <= seq <= upto`, in seq order.
    fn range(&self, class: Class, from: u64, upto: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// Counts a tree (and, in `live` and `after`, its records with seq >=
    /// `live_from` and >= `after_from`) and removes keys that are not 8
    /// bytes long.
    fn scan(&self, class: Class, live_from: u64, after_from: u64) -> Result<Scan, StoreError>;
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Makes every change so far durable (see the module doc).
    fn flush(&self) -> Result<(), StoreError>;
}

/// The files beside the database: `seq.floor`, `outbox.ledger` and the
/// legacy `outbox.closed`. They outlive the database handle (the writer
/// keeps writing the ledger while it reopens the database after a fault).
pub(crate) trait Side: Send + Sync + 'static {
    /// The seq reservation and epoch, if a floor was ever written.
    fn floor(&self) -> Result<Option<Floor>, StoreError>;
    /// Durably replaces the floor (atomic: a crash leaves the old or the new value).
    fn set_floor(&self, floor: &Floor) -> Result<(), StoreError>;
    /// The newest valid ledger entry, if there is a ledger.
    fn ledger(&self) -> Result<Option<Ledger>, StoreError>;
    /// Writes a ledger entry and fdatasyncs it. Works on a full disk.
    fn set_ledger(&self, ledger: &Ledger) -> Result<(), StoreError>;
    /// What a clean close of a build before the ledger recorded, if anything.
    fn close_summary(&self) -> Result<Option<CloseSummary>, StoreError>;
    /// Durably removes the legacy close summary; absent is fine.
    fn remove_close_summary(&self) -> Result<(), StoreError>;
}

/// The store in use, shared by the writer (the only one that replaces it:
/// after a disk fault it closes the database and opens it again) and the
/// readers, which hold the read lock for the length of a read, so a reopen
/// happens between reads. Empty while a reopen has not succeeded yet.
pub(crate) struct StoreSlot(RwLock<Option<Arc<dyn Store>>>);

impl StoreSlot {
    pub(crate) fn new(store: Arc<dyn Store>) -> Arc<StoreSlot> {
        Arc::new(StoreSlot(RwLock::new(Some(store))))
    }

    /// Waits for a reopen in progress. A poisoned lock still holds a usable
    /// `Option` (the writer never panics while holding it).
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Option<Arc<dyn Store>>> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Like [`StoreSlot::read`], but `None` instead of waiting.
    pub(crate) fn try_read(&self) -> Option<RwLockReadGuard<'_, Option<Arc<dyn Store>>>> {
        match self.0.try_read() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    #[cfg(test)]
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Option<Arc<dyn Store>>> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The write lock, waiting at most `patience` for reads in progress (a
    /// read stuck inside a failing sled must not stop the writer for good).
    /// Polls every 5 ms.
    pub(crate) fn write_within(
        &self,
        patience: std::time::Duration,
    ) -> Option<RwLockWriteGuard<'_, Option<Arc<dyn Store>>>> {
        let give_up = std::time::Instant::now() + patience;
        loop {
            match self.0.try_write() {
                Ok(g) => return Some(g),
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) if std::time::Instant::now() < give_up => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(TryLockError::WouldBlock) => return None,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// sled

/// Where a [`SledStore`] keeps the files beside the database.
#[derive(Debug, Clone)]
pub(crate) struct SidePaths {
    /// `<state_dir>/seq.floor`.
    pub floor: PathBuf,
    /// `<state_dir>/outbox.ledger`.
    pub ledger: PathBuf,
    /// `<state_dir>/outbox.closed` (legacy, read and removed only).
    pub close_summary: PathBuf,
}

/// The outbox on disk: a sled database plus the files beside it.
///
/// Dropping the last handle closes it and returns only once sled has let go
/// of its files (see [`DbFile`]). The fields drop in declaration order, which
/// that relies on: sled's handles first, then `db_file` (which waits for
/// sled), then `_lock`.
pub(crate) struct SledStore {
    db: sled::Db,
    /// The chunks of each class (by [`class_idx`]).
    chunks: [sled::Tree; 2],
    /// The chunks' removed values.
    removed: sled::Tree,
    /// The trees of builds before chunks (one record per key), emptied into
    /// chunks at open.
    legacy: [sled::Tree; 2],
    meta: sled::Tree,
    /// What is stored where, and what the next flush writes.
    index: Mutex<Indexes>,
    blobs_dir: PathBuf,
    /// Blob files already fsynced (by name).
    synced_blobs: Mutex<HashSet<std::ffi::OsString>>,
    /// sled's log file, waited on when dropped.
    /// After every sled handle above.
    db_file: DbFile,
    /// The `outbox.lock` flock; held as long as the database is open. Last.
    _lock: Arc<StateDirLock>,
}

/// sled's log file, `<dir>/db`, through a descriptor of our own: to wait,
/// when the store is dropped, until sled has let go of the file.
///
/// sled holds a flock on `db` while anything of it still has the file open,
/// and that outlives the last `Db` handle: its thread pool finishes log
/// writes and truncations on its own (`pagecache/iobuf.rs:1183`,
/// `pagecache/segment.rs:1098`, not awaited on drop), and a process forked
/// meanwhile by another thread holds a copy of sled's descriptor until it
/// execs. A new `Db` on the same directory cannot open until then (sled's
/// `try_lock`, `config.rs:579-606`), and a stale truncation must not run
/// against it. So dropping a [`SledStore`] waits, here, until the flock can
/// be taken through this descriptor: then nothing else holds the file.
struct DbFile {
    file: File,
    path: PathBuf,
}

/// How long dropping a [`SledStore`] waits for sled to let go of its file
/// before it warns and returns anyway (the next open waits again).
const SLED_LET_GO_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

impl Drop for DbFile {
    fn drop(&mut self) {
        let started = std::time::Instant::now();
        match lock::wait_until_unlocked(&self.file, SLED_LET_GO_PATIENCE) {
            Ok(true) => tracing::trace!(waited = ?started.elapsed(), "outbox: sled let go of its database file"),
            Ok(false) => tracing::warn!(
                path = %self.path.display(),
                waited = ?started.elapsed(),
                "outbox: sled still holds its database file after it was closed; a reopen waits for it"
            ),
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "outbox: cannot tell whether sled let go of its database file"
            ),
        }
    }
}

/// The files beside a sled database, by path.
pub(crate) struct SledSide {
    paths: SidePaths,
    ledger: LedgerFile,
}

impl SledSide {
    pub(crate) fn new(paths: SidePaths) -> SledSide {
        let ledger = LedgerFile::new(paths.ledger.clone());
        SledSide { paths, ledger }
    }
}

impl SledStore {
    /// Opens (or creates) the database in `dir`. A panic inside sled is
    /// caught and reported as [`StoreError::Panicked`] (treated as
    /// corruption) so that a damaged file cannot take the agent down.
    pub(crate) fn open(dir: &Path, lock: Arc<StateDirLock>) -> Result<SledStore, StoreError> {
        let config = sled::Config::new().path(dir).cache_capacity(SLED_CACHE_BYTES).flush_every_ms(None);
        let opened = panics::catch(move || {
            let db = config.open()?;
            let chunks = [db.open_tree(TREE_CHUNKS[0])?, db.open_tree(TREE_CHUNKS[1])?];
            let removed = db.open_tree(TREE_REMOVED)?;
            let legacy = [db.open_tree(TREE_LEGACY[0])?, db.open_tree(TREE_LEGACY[1])?];
            let meta = db.open_tree("meta")?;
            Ok::<_, sled::Error>((db, chunks, removed, legacy, meta))
        });
        let (db, chunks, removed, legacy, meta) = opened.map_err(StoreError::Panicked)??;
        let db_path = dir.join("db");
        let db_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&db_path)
            .map_err(io_err("cannot open the outbox database file", &db_path))?;
        let store = SledStore {
            db,
            chunks,
            removed,
            legacy,
            meta,
            index: Mutex::new(Indexes::default()),
            blobs_dir: dir.join("blobs"),
            synced_blobs: Mutex::new(HashSet::new()),
            db_file: DbFile { file: db_file, path: db_path },
            _lock: lock,
        };
        // sled never fsyncs the directories it creates files in. (On an
        // error, `store` is dropped like any other: it waits for sled.)
        fsutil::sync_parent(&store.db_file.path)
            .and_then(|()| fsutil::sync_parent(dir))
            .map_err(io_err("cannot fsync the directory of", dir))?;
        // Reading every chunk walks sled's pages: a damaged file may panic.
        panics::catch(|| store.load_index()).map_err(StoreError::Panicked)??;
        Ok(store)
    }

    fn lock_index(&self) -> MutexGuard<'_, Indexes> {
        // The index is plain data; a panic while holding it (sled's, caught
        // by the caller) leaves it as usable as the database behind it.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Builds the index from the chunks and removed values on disk, then
    /// moves the records of an earlier build's trees into chunks.
    fn load_index(&self) -> Result<(), StoreError> {
        let mut ix = self.lock_index();
        for class in [Class::Heartbeat, Class::Event] {
            let c = class_idx(class);
            let tree = &self.chunks[c];
            let mut bad = Vec::new();
            for entry in tree.iter() {
                let (k, v) = entry?;
                let Some(key) = record::seq_of_key(&k) else {
                    bad.push(k);
                    continue;
                };
                let bad_chunk = |reason: String| StoreError::BadChunk { class, key, reason };
                let chunk = Chunk::decode(&v).map_err(|e| bad_chunk(e.to_string()))?;
                ix.classes[c].add_from_disk(key, &chunk).map_err(|e| bad_chunk(e.to_string()))?;
            }
            for k in bad {
                // The value is garbage by definition; only the removal matters.
                let _garbage = tree.remove(k)?;
                ix.bad_keys[c] += 1;
            }
        }
        let mut stale = Vec::new();
        for entry in self.removed.iter() {
            let (k, v) = entry?;
            let applied = match (removed_key_parts(&k), Removed::decode(&v)) {
                (Some((class, key)), Ok(r)) => ix.classes[class_idx(class)].apply_removed(key, &r),
                (_, Err(e)) => {
                    tracing::warn!(error = %e, "outbox: ignoring a damaged removed value; its records may be sent again");
                    false
                }
                (None, Ok(_)) => false,
            };
            if !applied {
                stale.push(k);
            }
        }
        for k in stale {
            // Left by a crash between a chunk's rewrite and this removal.
            let _stale = self.removed.remove(k)?;
        }
        self.migrate_legacy(&mut ix)
    }

    /// Moves the records of an earlier build's trees (one record per 8-byte
    /// key) into chunks: the chunks are written and made durable first, and
    /// only then are the old trees cleared (made durable too), so a crash
    /// in between leaves every record in one place or both; a record found
    /// in both is stored once (an insert of a stored seq is idempotent).
    fn migrate_legacy(&self, ix: &mut Indexes) -> Result<(), StoreError> {
        let mut moved = 0u64;
        for class in [Class::Heartbeat, Class::Event] {
            let c = class_idx(class);
            let tree = &self.legacy[c];
            let mut bad = Vec::new();
            let mut since_write = 0;
            for entry in tree.iter() {
                let (k, v) = entry?;
                let Some(seq) = record::seq_of_key(&k) else {
                    bad.push(k);
                    continue;
                };
                self.insert_indexed(ix, class, seq, &v)?;
                moved += 1;
                since_write += 1;
                // Keep what waits in memory to a few chunks.
                if since_write >= 4 * chunk::CHUNK_MAX_RECORDS {
                    self.write_changes(ix)?;
                    since_write = 0;
                }
            }
            for k in bad {
                let _garbage = tree.remove(k)?;
                ix.bad_keys[c] += 1;
            }
        }
        if moved == 0 {
            return Ok(());
        }
        self.write_changes(ix)?;
        let _bytes = self.db.flush()?;
        self.sync_new_blobs()?;
        for tree in &self.legacy {
            tree.clear()?;
        }
        let _bytes = self.db.flush()?;
        tracing::info!(records = moved, "outbox: moved the records of an earlier build's layout into chunks");
        Ok(())
    }

    /// [`ClassIndex::insert`], reading the chunk it needs from disk.
    fn insert_indexed(&self, ix: &mut Indexes, class: Class, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        let c = class_idx(class);
        let NeedLoad(key) = match ix.classes[c].insert(seq, value) {
            Ok(()) => return Ok(()),
            Err(need) => need,
        };
        let bad_chunk = |reason: String| StoreError::BadChunk { class, key, reason };
        let stored =
            self.chunks[c].get(record::key(key))?.ok_or_else(|| bad_chunk("indexed but not on disk".to_string()))?;
        let chunk = Chunk::decode(&stored).map_err(|e| bad_chunk(e.to_string()))?;
        if !ix.classes[c].attach(key, &chunk) {
            return Err(bad_chunk("the chunk on disk is not the one indexed".to_string()));
        }
        ix.classes[c].insert(seq, value).map_err(|_| bad_chunk("still not in memory after reading it".to_string()))
    }

    /// Writes what changed since the last flush into sled (not durable yet:
    /// [`Store::flush`] then flushes the Db): one op per changed chunk.
    fn write_changes(&self, ix: &mut Indexes) -> Result<(), StoreError> {
        let mut writes = Vec::new();
        for class in [Class::Heartbeat, Class::Event] {
            let c = class_idx(class);
            writes.clear();
            ix.classes[c].take_writes(&mut writes);
            for w in writes.drain(..) {
                match w {
                    Write::Chunk { key, value } => {
                        ix.forget_cached(c, key);
                        let _old = self.chunks[c].insert(record::key(key), value)?;
                    }
                    Write::DeleteChunk { key } => {
                        ix.forget_cached(c, key);
                        let _old = self.chunks[c].remove(record::key(key))?;
                    }
                    Write::Removed { key, value } => {
                        let _old = self.removed.insert(removed_key(class, key), value)?;
                    }
                    Write::DeleteRemoved { key } => {
                        let _old = self.removed.remove(removed_key(class, key))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The value of the chunk under `key`, checked (and kept: the next read
    /// is likely in the same chunk). `None` if it is missing or does not
    /// check out (logged): a database damaged after it was opened.
    fn disk_chunk(&self, ix: &mut Indexes, class: Class, key: u64) -> Result<Option<sled::IVec>, StoreError> {
        let c = class_idx(class);
        if let Some((k, v)) = &ix.cached[c]
            && *k == key
        {
            return Ok(Some(v.clone()));
        }
        let Some(value) = self.chunks[c].get(record::key(key))? else {
            tracing::error!(?class, key, "outbox: an indexed chunk is missing from the database");
            return Ok(None);
        };
        if let Err(e) = Chunk::decode(&value) {
            tracing::error!(?class, key, error = %e, "outbox: a chunk no longer checks out; its records are dropped");
            return Ok(None);
        }
        ix.cached[c] = Some((key, value.clone()));
        Ok(Some(value))
    }

    /// Up to `limit` stored records of `class` with `from <= seq <= upto`.
    /// Records of a chunk that cannot be read come back with an empty
    /// value, which does not decode: the reader reports them, and the
    /// writer removes them and counts them as dropped.
    fn read_range(
        &self,
        ix: &mut Indexes,
        class: Class,
        from: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let c = class_idx(class);
        let mut out = Vec::new();
        let keys: Vec<u64> = ix.classes[c].overlapping(from, upto).map(|(k, _)| k).collect();
        for key in keys {
            let disk = match ix.classes[c].get(key).is_some_and(|s| s.data().is_none()) {
                true => self.disk_chunk(ix, class, key)?,
                false => None,
            };
            let Some(state) = ix.classes[c].get(key) else { continue };
            let wanted = |i: usize| {
                let seq = state.seq(key, i);
                (from..=upto).contains(&seq) && !state.is_removed(i)
            };
            match (state.data(), &disk) {
                (Some(_), _) => {
                    for (_, seq, value) in state.iter_held(key).filter(|&(i, _, _)| wanted(i)) {
                        out.push((seq, value.to_vec()));
                        if out.len() == limit {
                            return Ok(out);
                        }
                    }
                }
                (None, Some(value)) => {
                    let chunk = Chunk::decode_checked(value, false).ok();
                    let mut records = chunk.iter().flat_map(|c| c.iter());
                    for i in 0..state.len() {
                        let record = records.next();
                        if !wanted(i) {
                            continue;
                        }
                        let seq = state.seq(key, i);
                        let value = record.filter(|(s, _)| *s == seq).map(|(_, v)| v.to_vec()).unwrap_or_default();
                        out.push((seq, value));
                        if out.len() == limit {
                            return Ok(out);
                        }
                    }
                }
                (None, None) => {
                    for i in (0..state.len()).filter(|&i| wanted(i)) {
                        out.push((state.seq(key, i), Vec::new()));
                        if out.len() == limit {
                            return Ok(out);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// fsyncs blob files written since the last call (sled writes them
    /// without any sync), then the blob directory if there were any.
    fn sync_new_blobs(&self) -> Result<(), StoreError> {
        let entries = match fs::read_dir(&self.blobs_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(io_err("cannot list", &self.blobs_dir)(source)),
        };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut present = HashSet::new();
        let mut any_new = false;
        for entry in entries {
            let entry = entry.map_err(io_err("cannot list", &self.blobs_dir))?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match File::open(entry.path()).and_then(|f| f.sync_all()) {
                    Ok(()) => any_new = true,
                    // sled removed it meanwhile (blob GC).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(io_err("cannot fsync blob", &entry.path())(source)),
                }
            }
            present.insert(name);
        }
        *synced = present;
        if any_new {
            File::open(&self.blobs_dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync", &self.blobs_dir))?;
        }
        Ok(())
    }
}

impl Store for SledStore {
    fn insert(&self, class: Class, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        // Into the index (and a chunk held in memory) only: the next flush
        // writes it. The same bytes again (a record kept in memory through
        // a disk fault, written again after a reopen) change nothing.
        let mut ix = self.lock_index();
        self.insert_indexed(&mut ix, class, seq, value)
    }

    fn remove(&self, seq: u64) -> Result<Option<(Class, u64)>, StoreError> {
        let mut ix = self.lock_index();
        for class in [Class::Event, Class::Heartbeat] {
            if let Some(len) = ix.classes[class_idx(class)].remove(seq) {
                return Ok(Some((class, stored_size(len))));
            }
        }
        Ok(None)
    }

    fn first(&self, class: Class) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let mut ix = self.lock_index();
        let Some((key, i)) = ix.classes[class_idx(class)].first() else { return Ok(None) };
        let Some(state) = ix.classes[class_idx(class)].get(key) else { return Ok(None) };
        let seq = state.seq(key, i);
        Ok(self.read_range(&mut ix, class, seq, seq, 1)?.into_iter().next())
    }

    fn range(&self, class: Class, from: u64, upto: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if from > upto || limit == 0 {
            return Ok(Vec::new());
        }
        let mut ix = self.lock_index();
        self.read_range(&mut ix, class, from, upto, limit)
    }

    fn scan(&self, class: Class, live_from: u64, after_from: u64) -> Result<Scan, StoreError> {
        let mut ix = self.lock_index();
        let c = class_idx(class);
        // Malformed keys were removed when the index was built; reported once.
        let bad_keys = std::mem::take(&mut ix.bad_keys[c]);
        Ok(Scan { bad_keys, ..ix.classes[c].counts(live_from, after_from) })
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
        // One sled op per changed chunk, then the Db's flush. The index
        // lock is not held across the fsync, so reads go on meanwhile.
        {
            let mut ix = self.lock_index();
            self.write_changes(&mut ix)?;
        }
        // Flushing the Db flushes the shared log, so every tree, and each
        // log write ends with fdatasync (patched sled, see the module doc).
        // A failed fdatasync there is sled's global error: this and every
        // later write fail until the writer reopens the database.
        let _bytes_written = self.db.flush()?;
        self.sync_new_blobs()
    }
}

/// The trees holding the chunks, by [`class_idx`].
const TREE_CHUNKS: [&str; 2] = ["chunks.heartbeats", "chunks.events"];
/// The tree holding the chunks' removed values.
const TREE_REMOVED: &str = "chunks.removed";
/// The per-record trees of builds before chunks, by [`class_idx`].
const TREE_LEGACY: [&str; 2] = ["heartbeats", "events"];

/// The index of a [`SledStore`], behind its lock.
#[derive(Default)]
struct Indexes {
    classes: [ClassIndex; 2],
    /// The last chunk read from disk per class, checked: a replay reads a
    /// chunk in several calls, and the writer's bound and commit ask for
    /// the oldest record again and again.
    cached: [Option<(u64, sled::IVec)>; 2],
    /// Malformed keys removed while building the index, until `scan` reports them.
    bad_keys: [u64; 2],
}

impl Indexes {
    fn forget_cached(&mut self, c: usize, key: u64) {
        if self.cached[c].as_ref().is_some_and(|(k, _)| *k == key) {
            self.cached[c] = None;
        }
    }
}

/// The key of a chunk's removed value: the class (0 heartbeat, 1 event),
/// then the chunk's key.
fn removed_key(class: Class, key: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = class_idx(class) as u8;
    out[1..].copy_from_slice(&record::key(key));
    out
}

/// The class and chunk key of a removed value's key.
pub(crate) fn removed_key_parts(k: &[u8]) -> Option<(Class, u64)> {
    let (&c, key) = k.split_first()?;
    let class = match c {
        0 => Class::Heartbeat,
        1 => Class::Event,
        _ => return None,
    };
    Some((class, record::seq_of_key(key)?))
}

pub(crate) fn class_idx(class: Class) -> usize {
    idx(class)
}

impl Side for SledSide {
    fn floor(&self) -> Result<Option<Floor>, StoreError> {
        let path = &self.paths.floor;
        read_if_exists(path, "cannot read seq floor")?
            .map(|bytes| {
                record::decode_floor(&bytes).map_err(|source| StoreError::BadFloor { path: path.clone(), source })
            })
            .transpose()
    }

    fn set_floor(&self, floor: &Floor) -> Result<(), StoreError> {
        write_atomically(&self.paths.floor, &record::encode_floor(floor))
    }

    fn ledger(&self) -> Result<Option<Ledger>, StoreError> {
        Ok(self.ledger.read()?)
    }

    fn set_ledger(&self, ledger: &Ledger) -> Result<(), StoreError> {
        Ok(self.ledger.write(ledger)?)
    }

    fn close_summary(&self) -> Result<Option<CloseSummary>, StoreError> {
        let path = &self.paths.close_summary;
        read_if_exists(path, "cannot read outbox close summary")?
            .map(|bytes| {
                record::decode_close_summary(&bytes)
                    .map_err(|source| StoreError::BadCloseSummary { path: path.clone(), source })
            })
            .transpose()
    }

    fn remove_close_summary(&self) -> Result<(), StoreError> {
        remove_durably(&self.paths.close_summary)
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
///
/// [`MemStore::set_fail_writes`] simulates a full disk the way sled reacts
/// to one: the first failed write or flush makes every later one fail too,
/// until the outbox reopens the store (which, as with sled, keeps only what
/// had been flushed). The ledger is a preallocated file rewritten in place,
/// so its writes keep working on a full disk.
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
    reopens: u64,
    fail_writes: bool,
    /// The ledger cannot be written (an I/O error on its in-place write).
    fail_ledger: bool,
    /// A write failed: every write fails until [`MemStore::reopen`].
    sticky: bool,
}

#[derive(Clone, Default)]
struct MemState {
    trees: [BTreeMap<u64, Vec<u8>>; 2],
    meta: BTreeMap<String, Vec<u8>>,
    /// The floor, the ledger and the close summary are separate files,
    /// written (and removed) durably at once.
    floor: Option<Floor>,
    ledger: Option<Ledger>,
    close_summary: Option<CloseSummary>,
}

fn idx(class: Class) -> usize {
    match class {
        Class::Heartbeat => 0,
        Class::Event => 1,
    }
}

const DISK_FULL: StoreError = StoreError::Injected("no space left on device (injected)");

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// How many times the outbox has flushed this store.
    pub fn flush_count(&self) -> u64 {
        self.lock().flushes
    }

    /// How many times the outbox has reopened this store after a fault.
    pub fn reopen_count(&self) -> u64 {
        self.lock().reopens
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
    /// called again with `false`; the store then works again once the
    /// outbox has reopened it, as sled does).
    pub fn set_fail_writes(&self, fail: bool) {
        self.lock().fail_writes = fail;
    }

    /// Makes every later ledger write fail, as an I/O error would (the
    /// ledger is rewritten in place, so a full disk alone does not fail it),
    /// until called again with `false`.
    pub fn set_fail_ledger(&self, fail: bool) {
        self.lock().fail_ledger = fail;
    }

    /// Whether the simulated disk has room (no injected failure).
    pub(crate) fn has_room(&self) -> bool {
        !self.lock().fail_writes
    }

    /// What reopening the database does: forget everything not flushed and
    /// clear the sticky error. Fails while the disk is still full.
    pub(crate) fn reopen(&self) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.fail_writes {
            return Err(DISK_FULL);
        }
        inner.written = inner.durable.clone();
        inner.sticky = false;
        inner.reopens += 1;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, MemInner> {
        // A panic while holding the lock leaves plain maps behind, still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The database, for a write: fails (and stays failed) like sled.
    fn db_writable(&self) -> Result<MutexGuard<'_, MemInner>, StoreError> {
        let mut inner = self.lock();
        if inner.fail_writes || inner.sticky {
            inner.sticky = true;
            return Err(DISK_FULL);
        }
        Ok(inner)
    }

    /// A file beside the database (floor, close summary): fails while the
    /// disk is full, and only then.
    fn file_writable(&self) -> Result<MutexGuard<'_, MemInner>, StoreError> {
        let inner = self.lock();
        if inner.fail_writes {
            return Err(DISK_FULL);
        }
        Ok(inner)
    }
}

impl Store for MemStore {
    fn insert(&self, class: Class, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        let _old = self.db_writable()?.written.trees[idx(class)].insert(seq, value.to_vec());
        Ok(())
    }

    fn remove(&self, seq: u64) -> Result<Option<(Class, u64)>, StoreError> {
        let mut inner = self.db_writable()?;
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

    fn scan(&self, class: Class, live_from: u64, after_from: u64) -> Result<Scan, StoreError> {
        let inner = self.lock();
        let tree = &inner.written.trees[idx(class)];
        Ok(Scan {
            records: tree.len() as u64,
            bytes: tree.values().map(|v| stored_size(v.len())).sum(),
            first_seq: tree.first_key_value().map(|(k, _)| *k),
            last_seq: tree.last_key_value().map(|(k, _)| *k),
            live: tree.range(live_from..).count() as u64,
            after: tree.range(after_from..).count() as u64,
            bad_keys: 0,
        })
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().written.meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        // The previous value is superseded; nothing to do with it.
        let _previous = self.db_writable()?.written.meta.insert(key.to_string(), value.to_vec());
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
        let mut inner = self.db_writable()?;
        inner.durable.trees = inner.written.trees.clone();
        inner.durable.meta = inner.written.meta.clone();
        inner.flushes += 1;
        Ok(())
    }
}

impl Side for MemStore {
    fn floor(&self) -> Result<Option<Floor>, StoreError> {
        Ok(self.lock().written.floor)
    }

    fn set_floor(&self, floor: &Floor) -> Result<(), StoreError> {
        let mut inner = self.file_writable()?;
        inner.written.floor = Some(*floor);
        inner.durable.floor = Some(*floor);
        Ok(())
    }

    fn ledger(&self) -> Result<Option<Ledger>, StoreError> {
        Ok(self.lock().written.ledger)
    }

    fn set_ledger(&self, ledger: &Ledger) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.fail_ledger {
            return Err(StoreError::Injected("input/output error writing the ledger (injected)"));
        }
        inner.written.ledger = Some(*ledger);
        inner.durable.ledger = Some(*ledger);
        Ok(())
    }

    fn close_summary(&self) -> Result<Option<CloseSummary>, StoreError> {
        Ok(self.lock().written.close_summary)
    }

    fn remove_close_summary(&self) -> Result<(), StoreError> {
        let mut inner = self.file_writable()?;
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
        /// files beside it (floor, ledger, close summary) are this store's: a
        /// database that went back to an older state, as sled does when its
        /// `db` file lost its tail.
        pub(crate) fn rolled_back_to(&self, older: &MemStore) -> MemStore {
            let mut state = older.lock().durable.clone();
            {
                let inner = self.lock();
                state.floor = inner.durable.floor;
                state.ledger = inner.durable.ledger;
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

        /// Writes a legacy close summary, as a build before the ledger did at
        /// a clean close.
        pub(crate) fn put_close_summary(&self, summary: CloseSummary) {
            let mut inner = self.lock();
            inner.written.close_summary = Some(summary);
            inner.durable.close_summary = Some(summary);
        }

        /// Removes the ledger, as a build before the ledger would have left
        /// the state_dir.
        pub(crate) fn forget_ledger(&self) {
            let mut inner = self.lock();
            inner.written.ledger = None;
            inner.durable.ledger = None;
        }

        /// Overwrites a stored value in place, as bit rot would.
        pub(crate) fn corrupt(&self, class: Class, seq: u64, value: &[u8]) {
            let mut inner = self.lock();
            inner.written.trees[idx(class)].insert(seq, value.to_vec());
        }
    }

    fn scratch_lock(dir: &Path) -> Arc<StateDirLock> {
        StateDirLock::take(dir).expect("lock")
    }

    fn scratch_store(dir: &Path) -> SledStore {
        SledStore::open(&dir.join("outbox"), scratch_lock(dir)).expect("open")
    }

    fn scratch_side(dir: &Path) -> SledSide {
        SledSide::new(SidePaths {
            floor: dir.join("seq.floor"),
            ledger: dir.join("outbox.ledger"),
            close_summary: dir.join("outbox.closed"),
        })
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
        let scan = store.scan(Class::Event, 2, 4).expect("scan");
        let want =
            Scan { records: 2, bytes: 22, first_seq: Some(1), last_seq: Some(3), live: 1, after: 0, bad_keys: 0 };
        assert_eq!(scan, want);
    }

    #[test]
    fn the_sled_store_drops_keys_it_never_writes_when_it_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = scratch_store(dir.path());
        store.insert(Class::Event, 5, b"x").expect("insert");
        store.flush().expect("flush");
        let _old = store.chunks[1].insert(b"odd", b"y".as_slice()).expect("insert");
        let _old = store.legacy[0].insert(b"odder", b"z".as_slice()).expect("insert");
        store.flush().expect("flush");
        drop(store);
        let store = scratch_store(dir.path());
        let scan = store.scan(Class::Event, 0, 0).expect("scan");
        assert_eq!((scan.records, scan.bad_keys, scan.last_seq), (1, 1, Some(5)));
        assert_eq!(store.scan(Class::Event, 0, 0).expect("scan").bad_keys, 0, "reported once");
        assert_eq!(store.scan(Class::Heartbeat, 0, 0).expect("scan").bad_keys, 1);
    }

    #[test]
    fn a_flush_writes_one_sled_value_per_chunk_not_one_per_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = scratch_store(dir.path());
        for seq in 1..=1_000u64 {
            store.insert(Class::Event, seq, &[seq as u8; 40]).expect("insert");
        }
        store.flush().expect("flush");
        let chunks = store.chunks[1].len();
        let per_chunk = chunk::CHUNK_MAX_RECORDS.min(chunk::CHUNK_MAX_BYTES.div_ceil(40));
        assert!(per_chunk < 300, "300 removals empty the first chunk");
        assert_eq!(chunks, 1_000usize.div_ceil(per_chunk), "full chunks");
        for seq in 1..=300u64 {
            assert_eq!(store.remove(seq).expect("remove"), Some((Class::Event, 48)));
        }
        store.flush().expect("flush");
        assert_eq!(store.chunks[1].len(), chunks - 1, "the emptied chunk is deleted");
        assert_eq!(store.removed.len(), 1, "the chunk half removed has a removed value");
        drop(store);
        let store = scratch_store(dir.path());
        let scan = store.scan(Class::Event, 0, 0).expect("scan");
        assert_eq!((scan.records, scan.first_seq, scan.last_seq, scan.bytes), (700, Some(301), Some(1_000), 700 * 48));
        let got = store.range(Class::Event, 299, 310, 5).expect("range");
        assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), vec![301, 302, 303, 304, 305]);
        assert_eq!(got[0].1, vec![301u64 as u8; 40]);
    }

    #[test]
    fn a_chunk_that_fails_its_checksum_stops_the_open_as_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = scratch_store(dir.path());
        store.insert(Class::Heartbeat, 1, b"beat").expect("insert");
        store.flush().expect("flush");
        let mut value = store.chunks[0].get(record::key(1)).expect("get").expect("the chunk").to_vec();
        value[20] ^= 1;
        let _old = store.chunks[0].insert(record::key(1), value).expect("insert");
        store.db.flush().expect("flush");
        drop(store);
        let err = SledStore::open(&dir.path().join("outbox"), scratch_lock(dir.path())).err().expect("open must fail");
        assert!(err.is_corruption(), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    /// Rewrites the value of record `seq` inside its chunk of a closed
    /// database (keeping the chunk's removed value in step), as a record
    /// written by a different build, or damaged before it was chunked, would
    /// look.
    pub(crate) fn overwrite_record(db_dir: &Path, class: Class, seq: u64, value: &[u8]) {
        let db = sled::open(db_dir).expect("raw open");
        let c = class_idx(class);
        let chunks = db.open_tree(TREE_CHUNKS[c]).expect("tree");
        let removed = db.open_tree(TREE_REMOVED).expect("tree");
        let (k, v) = chunks.range(..=record::key(seq)).next_back().expect("a chunk").expect("read");
        let old = Chunk::decode(&v).expect("decode");
        let records: Vec<(u64, Vec<u8>)> =
            old.iter().map(|(s, v)| (s, if s == seq { value.to_vec() } else { v.to_vec() })).collect();
        assert!(records.iter().any(|r| r.0 == seq), "seq {seq} is in the chunk");
        let (new, crc) = chunk::encode(records.iter().map(|(s, v)| (*s, v.as_slice())));
        let key = record::seq_of_key(&k).expect("key");
        if let Some(r) = removed.get(removed_key(class, key)).expect("get") {
            let r = Removed::decode(&r).expect("removed");
            let value = chunk::encode_removed(crc, r.n, |i| r.is_removed(i));
            let _old = removed.insert(removed_key(class, key), value).expect("insert");
        }
        let _old = chunks.insert(k, new).expect("insert");
        let _bytes = db.flush().expect("flush");
    }

    /// Writes records the way builds before chunks did: one 8-byte key per
    /// record in the class's tree (the old `SledStore::insert`).
    pub(crate) fn write_like_an_earlier_build(db_dir: &Path, records: &[(Class, u64, Vec<u8>)]) {
        let db = sled::open(db_dir).expect("raw open");
        for (class, seq, value) in records {
            let tree = db.open_tree(TREE_LEGACY[class_idx(*class)]).expect("tree");
            let _old = tree.insert(record::key(*seq), value.as_slice()).expect("insert");
        }
        let _bytes = db.flush().expect("flush");
    }

    #[test]
    fn records_of_an_earlier_build_are_moved_into_chunks_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_dir = dir.path().join("outbox");
        let records: Vec<(Class, u64, Vec<u8>)> = (1..=600u64)
            .map(|seq| (if seq % 3 == 0 { Class::Heartbeat } else { Class::Event }, seq, vec![seq as u8; 10]))
            .collect();
        write_like_an_earlier_build(&db_dir, &records);
        let store = scratch_store(dir.path());
        assert!(store.legacy.iter().all(|t| t.is_empty()), "the old trees are emptied");
        let events = store.range(Class::Event, 0, u64::MAX, 1_000).expect("range");
        let want: Vec<(u64, Vec<u8>)> =
            records.iter().filter(|r| r.0 == Class::Event).map(|r| (r.1, r.2.clone())).collect();
        assert_eq!(events, want);
        assert_eq!(store.scan(Class::Heartbeat, 0, 0).expect("scan").records, 200);
        // A crash after the chunks were durable but before the old trees
        // were cleared: the records are in both places, and stored once.
        drop(store);
        write_like_an_earlier_build(&db_dir, &records[..50]);
        let store = scratch_store(dir.path());
        let scan = |class| store.scan(class, 0, 0).expect("scan").records;
        assert_eq!((scan(Class::Event), scan(Class::Heartbeat)), (400, 200));
    }

    /// Random inserts, removals, flushes, crashes (a drop without a flush:
    /// nothing between flushes reaches sled) and reads against a plain
    /// model, on a real sled database.
    fn run_chunk_model(seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Some(scratch_store(dir.path()));
        let mut model: [BTreeMap<u64, Vec<u8>>; 2] = Default::default();
        let mut durable = model.clone();
        let mut next = 1u64;
        let value = |rng: &mut fastrand::Rng, seq: u64| -> Vec<u8> {
            let len = if rng.u8(..) == 0 { rng.usize(20_000..70_000) } else { rng.usize(0..300) };
            (0..len).map(|i| (seq as usize + i) as u8).collect()
        };
        let classes = [Class::Heartbeat, Class::Event];
        for step in 0..1_500 {
            let ctx = format!("seed {seed} step {step}");
            let s = store.as_ref().expect("open");
            let c = rng.usize(0..2);
            match rng.u32(0..100) {
                0..45 => {
                    let seq = next;
                    next += rng.u64(1..4);
                    let v = value(&mut rng, seq);
                    s.insert(classes[c], seq, &v).expect("insert");
                    let _new = model[c].insert(seq, v);
                }
                45..50 => {
                    // A seq skipped earlier (never stored), or one stored again.
                    let seq = rng.u64(1..next);
                    let stored = model.iter().position(|m| m.contains_key(&seq));
                    let class = stored.unwrap_or(c);
                    let v = model[class].get(&seq).cloned().unwrap_or_else(|| value(&mut rng, seq));
                    if stored.is_none() && model[1 - class].contains_key(&seq) {
                        continue;
                    }
                    s.insert(classes[class], seq, &v).expect("insert");
                    let _same = model[class].insert(seq, v);
                }
                50..80 => {
                    let seq = match model[c].keys().next() {
                        Some(&first) if rng.bool() => first,
                        _ => rng.u64(0..next),
                    };
                    let want = model
                        .iter_mut()
                        .zip(classes)
                        .find_map(|(m, class)| m.remove(&seq).map(|v| (class, stored_size(v.len()))));
                    assert_eq!(s.remove(seq).expect("remove"), want, "{ctx}: remove {seq}");
                }
                80..90 => {
                    s.flush().expect("flush");
                    durable = model.clone();
                }
                90..94 => {
                    drop(store.take());
                    store = Some(scratch_store(dir.path()));
                    model = durable.clone();
                }
                _ => {
                    let from = rng.u64(0..next + 1);
                    let upto = from + rng.u64(0..600);
                    let limit = rng.usize(1..300);
                    let got = s.range(classes[c], from, upto, limit).expect("range");
                    let want: Vec<(u64, Vec<u8>)> =
                        model[c].range(from..=upto).take(limit).map(|(k, v)| (*k, v.clone())).collect();
                    assert_eq!(got, want, "{ctx}: range {from}..={upto} limit {limit}");
                }
            }
            let s = store.as_ref().expect("open");
            let first = s.first(classes[c]).expect("first");
            assert_eq!(first, model[c].first_key_value().map(|(k, v)| (*k, v.clone())), "{ctx}: first");
        }
        let s = store.as_ref().expect("open");
        for (c, class) in classes.into_iter().enumerate() {
            let scan = s.scan(class, 0, next / 2).expect("scan");
            let m = &model[c];
            assert_eq!(scan.records, m.len() as u64, "seed {seed}");
            assert_eq!(scan.bytes, m.values().map(|v| stored_size(v.len())).sum::<u64>(), "seed {seed}");
            assert_eq!(scan.after, m.range(next / 2..).count() as u64, "seed {seed}");
            assert_eq!((scan.first_seq, scan.last_seq), (m.keys().next().copied(), m.keys().next_back().copied()));
        }
    }

    #[test]
    fn the_sled_chunk_store_matches_a_plain_model_over_random_steps() {
        for seed in 0..4 {
            run_chunk_model(seed);
        }
    }

    #[test]
    fn the_floor_file_is_written_atomically_with_its_epoch_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let floor = dir.path().join("seq.floor");
        let store = scratch_side(dir.path());
        assert_eq!(store.floor().expect("floor"), None);
        let f = Floor { r: 2_000_001, epoch: 1_763_719_200_123 };
        store.set_floor(&f).expect("set floor");
        assert_eq!(store.floor().expect("floor"), Some(f));
        assert_eq!(fs::read(&floor).expect("read").len(), 17);
        assert!(!dir.path().join("seq.floor.tmp").exists());
        fs::write(&floor, record::encode_u64(1_000_001)).expect("write a version-1 floor");
        assert_eq!(store.floor().expect("floor"), Some(Floor { r: 1_000_001, epoch: 0 }));
        fs::write(&floor, b"garbage").expect("write");
        assert!(matches!(store.floor(), Err(StoreError::BadFloor { .. })));
    }

    #[test]
    fn a_legacy_close_summary_file_is_read_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outbox.closed");
        let store = scratch_side(dir.path());
        assert_eq!(store.close_summary().expect("read"), None);
        store.remove_close_summary().expect("removing an absent summary is fine");
        let summary = CloseSummary { next_seq: 42, depth: 41, bytes: 2_460, dropped: 3 };
        fs::write(&path, record::encode_close_summary(&summary)).expect("write");
        assert_eq!(store.close_summary().expect("read"), Some(summary));
        store.remove_close_summary().expect("remove");
        assert!(!path.exists());
        assert_eq!(store.close_summary().expect("read"), None);
        fs::write(&path, b"garbage").expect("write");
        assert!(matches!(store.close_summary(), Err(StoreError::BadCloseSummary { .. })));
    }

    #[test]
    fn a_sled_flush_syncs_blob_files_sled_itself_never_syncs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = scratch_store(dir.path());
        // A page over sled's blob threshold (segment size / 4) goes to blobs/.
        store.insert(Class::Event, 1, &vec![7u8; 300 << 10]).expect("insert");
        store.flush().expect("flush");
        let blobs = store.synced_blobs.lock().expect("lock").len();
        assert!(blobs > 0, "the large page was written as a blob and fsynced");
        store.flush().expect("a second flush has nothing new to sync");
    }

    #[test]
    fn a_mem_store_crash_keeps_only_what_was_flushed() {
        let store = MemStore::new();
        store.insert(Class::Event, 1, b"a").expect("insert");
        store.flush().expect("flush");
        store.insert(Class::Event, 2, b"b").expect("insert");
        store.set_floor(&Floor { r: 7, epoch: 1 }).expect("floor");
        let after = store.crashed();
        assert_eq!(after.scan(Class::Event, 0, 0).expect("scan").last_seq, Some(1));
        assert_eq!(after.floor().expect("floor"), Some(Floor { r: 7, epoch: 1 }));
        assert_eq!(store.flush_count(), 1);
    }

    #[test]
    fn a_mem_store_fault_is_sticky_until_reopened_and_the_reopen_keeps_only_what_was_flushed() {
        let store = MemStore::new();
        store.insert(Class::Event, 1, b"a").expect("insert");
        store.flush().expect("flush");
        store.insert(Class::Event, 2, b"b").expect("insert");
        store.set_fail_writes(true);
        assert!(store.insert(Class::Event, 3, b"c").is_err());
        assert!(store.reopen().is_err(), "the disk is still full");
        store.set_ledger(&Ledger { write_no: 1, ..Ledger::default() }).expect("the ledger is written in place");
        store.set_fail_writes(false);
        assert!(store.insert(Class::Event, 3, b"c").is_err(), "sticky, as sled's global error");
        store.reopen().expect("reopen");
        assert_eq!(store.scan(Class::Event, 0, 0).expect("scan").records, 1, "seq 2 was never flushed");
        store.insert(Class::Event, 3, b"c").expect("works again");
        assert_eq!(store.reopen_count(), 1);
    }
}
