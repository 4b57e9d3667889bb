//! Opening the outbox. Owns the state_dir lock, recovery (a corrupt database
//! is moved aside and replaced by a fresh one), where seqs resume, the
//! depth/bytes scan, the check against the last clean close (records the
//! database lost since are counted as dropped), and starting the writer
//! thread. It must not assign seqs or append: once the writer runs, only the
//! writer mutates.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::record;
use super::store::{self, MemStore, SidePaths, SledStore, Store, StoreError};
use super::writer::Writer;
use super::{Class, HandleInner, OpenReport, OutboxError, OutboxHandle, OutboxReader, Shared};
use crate::config::OutboxConfig;

/// The sled database, under the state_dir.
const DB_DIR: &str = "outbox";
/// The seq reservation file, under the state_dir.
const FLOOR_FILE: &str = "seq.floor";
/// The flock that keeps a second agent off the same state_dir.
const LOCK_FILE: &str = "outbox.lock";
/// The close summary, under the state_dir: written at a clean close, removed at open.
const CLOSED_FILE: &str = "outbox.closed";

/// What the open scan found.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub next_seq: u64,
    pub floor: u64,
    pub depth: u64,
    pub bytes: u64,
    pub dropped: u64,
    /// Whether the meta values written at open reached the disk.
    pub meta_persisted: bool,
}

/// Why a store could not be loaded.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The data is damaged: move it aside.
    Corrupt(String),
    /// Storage said no; [`StoreError::is_corruption`] decides what it means.
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        if e.is_corruption() { Failure::Corrupt(e.to_string()) } else { Failure::Store(e) }
    }
}

/// Opens (or creates) the outbox at `<state_dir>/outbox` and starts its
/// writer thread. A corrupt database is moved aside (see
/// [`OpenReport::moved_aside`]) and the agent carries on with a fresh one.
pub fn open(state_dir: &Path, cfg: &OutboxConfig) -> Result<(OutboxHandle, OutboxReader, OpenReport), OutboxError> {
    fs::create_dir_all(state_dir).map_err(|source| OutboxError::Io {
        what: "cannot create state_dir",
        path: state_dir.to_path_buf(),
        source,
    })?;
    let lock = lock_state_dir(state_dir)?;
    let dir = state_dir.join(DB_DIR);
    let existed = dir.exists();

    let first = open_sled(state_dir, &dir, &lock).map_err(Failure::from).and_then(|s| {
        let s: Arc<dyn Store> = Arc::new(s);
        load(&*s, existed, false).map(|loaded| (s, loaded))
    });
    let (store, loaded, moved_aside) = match first {
        Ok((s, loaded)) => (s, loaded, None),
        Err(Failure::Store(e)) => return Err(store_error(state_dir, &dir, e)),
        Err(Failure::Corrupt(reason)) => {
            // The failed store is dropped by now, so sled no longer holds the files.
            let aside = move_aside(state_dir, &dir)?;
            tracing::error!(
                outbox = %dir.display(),
                moved_to = %aside.display(),
                %reason,
                "OUTBOX CORRUPT: moved it aside and started a fresh, empty outbox; \
                 records in the old one will not be sent (inspect or delete '{}')",
                aside.display()
            );
            let s: Arc<dyn Store> =
                Arc::new(open_sled(state_dir, &dir, &lock).map_err(|e| store_error(state_dir, &dir, e))?);
            let loaded = load(&*s, false, true).map_err(|f| match f {
                Failure::Corrupt(reason) => OutboxError::Corrupt { dir: dir.clone(), reason },
                Failure::Store(e) => store_error(state_dir, &dir, e),
            })?;
            (s, loaded, Some(aside))
        }
    };
    tracing::info!(
        outbox = %dir.display(),
        depth = loaded.depth,
        bytes = loaded.bytes,
        dropped = loaded.dropped,
        next_seq = loaded.next_seq,
        "outbox opened"
    );
    start(store, loaded, cfg, moved_aside)
}

/// Opens an outbox over a [`MemStore`] (tests and benches). Reopening after
/// [`OutboxHandle::shutdown`] with the same store, or with
/// [`MemStore::crashed`], behaves like reopening a state_dir.
pub fn open_in_memory(
    store: &MemStore,
    cfg: &OutboxConfig,
) -> Result<(OutboxHandle, OutboxReader, OpenReport), OutboxError> {
    let dir = PathBuf::from("<memory>");
    let s: Arc<dyn Store> = Arc::new(store.clone());
    let loaded = load(&*s, false, false).map_err(|f| match f {
        Failure::Corrupt(reason) => OutboxError::Corrupt { dir: dir.clone(), reason },
        Failure::Store(source) => OutboxError::Open { dir: dir.clone(), source },
    })?;
    start(s, loaded, cfg, None)
}

/// How long to wait for sled's own file lock once we hold `outbox.lock`.
const SLED_LOCK_WAIT: Duration = Duration::from_secs(2);
const SLED_LOCK_RETRY: Duration = Duration::from_millis(10);

/// Opens sled, waiting briefly for its file lock. sled finishes log writes
/// and truncations on its own thread pool (`pagecache/iobuf.rs`,
/// `pagecache/segment.rs` in 0.34.7), and those tasks keep the database file,
/// and so its flock, open for a moment after the last `Db` is dropped. We
/// hold `outbox.lock`, so no other agent can be holding sled's lock; a
/// reopen in the same process just has to wait. Back-off: every 10 ms, for
/// up to 2 s, then the lock error stands.
fn open_sled(state_dir: &Path, dir: &Path, lock: &Arc<File>) -> Result<SledStore, StoreError> {
    let give_up = Instant::now() + SLED_LOCK_WAIT;
    loop {
        let side = SidePaths { floor: state_dir.join(FLOOR_FILE), close_summary: state_dir.join(CLOSED_FILE) };
        match SledStore::open(dir, side, lock.clone()) {
            Err(e) if e.is_lock_held() && Instant::now() < give_up => thread::sleep(SLED_LOCK_RETRY),
            other => return other,
        }
    }
}

fn store_error(state_dir: &Path, dir: &Path, e: StoreError) -> OutboxError {
    if e.is_lock_held() {
        OutboxError::Locked { state_dir: state_dir.to_path_buf() }
    } else {
        OutboxError::Open { dir: dir.to_path_buf(), source: e }
    }
}

/// Takes `<state_dir>/outbox.lock` (flock, released when the last store
/// clone is dropped or the process dies).
fn lock_state_dir(state_dir: &Path) -> Result<Arc<File>, OutboxError> {
    let path = state_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| OutboxError::Io { what: "cannot open lock file", path: path.clone(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(Arc::new(file)),
        Err(TryLockError::WouldBlock) => Err(OutboxError::Locked { state_dir: state_dir.to_path_buf() }),
        Err(TryLockError::Error(source)) => Err(OutboxError::Io { what: "cannot lock", path, source }),
    }
}

/// Renames `dir` to `<state_dir>/outbox.corrupt-<unix secs>` (with `-2`,
/// `-3`, ... if taken).
fn move_aside(state_dir: &Path, dir: &Path) -> Result<PathBuf, OutboxError> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let base = format!("{DB_DIR}.corrupt-{secs}");
    let mut aside = state_dir.join(&base);
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = state_dir.join(format!("{base}-{n}"));
    }
    fs::rename(dir, &aside).map_err(|source| OutboxError::Io {
        what: "cannot move the corrupt outbox aside to",
        path: aside.clone(),
        source,
    })?;
    Ok(aside)
}

/// Reads the meta values and the floor, scans both trees, checks their head
/// records, checks what it found against the close summary, decides where
/// seqs resume, clears the `clean` marker and removes the close summary.
///
/// `expect_meta`: the database existed before this open, so it must have
/// meta values if `seq.floor` exists. `moved_aside`: this is the fresh
/// database replacing a corrupt one.
pub(crate) fn load(store: &dyn Store, expect_meta: bool, moved_aside: bool) -> Result<Loaded, Failure> {
    let meta_u64 = |key: &str| -> Result<Option<u64>, Failure> {
        match store.meta(key)? {
            None => Ok(None),
            Some(v) => record::decode_u64(&v)
                .map(Some)
                .map_err(|e| Failure::Corrupt(format!("meta value '{key}' does not decode: {e}"))),
        }
    };
    let meta_next = meta_u64(store::META_NEXT_SEQ)?;
    let meta_dropped = meta_u64(store::META_DROPPED)?.unwrap_or(0);
    let clean = meta_u64(store::META_CLEAN)? == Some(1);
    let floor = match store.floor() {
        Ok(r) => r,
        Err(e @ StoreError::BadFloor { .. }) => {
            tracing::error!(error = %e, "outbox: ignoring an unreadable seq floor; seqs resume from the database");
            None
        }
        Err(e) => return Err(Failure::Store(e)),
    };
    // Present only if the last run closed cleanly (and could write it).
    let (summary, summary_found) = match store.close_summary() {
        Ok(s) => (s, s.is_some()),
        Err(e @ StoreError::BadCloseSummary { .. }) => {
            tracing::error!(
                error = %e,
                "outbox: ignoring an unreadable close summary; cannot check whether records were lost \
                 since the last clean close"
            );
            (None, true)
        }
        Err(e) => return Err(Failure::Store(e)),
    };
    if expect_meta && meta_next.is_none() && floor.is_some() {
        return Err(Failure::Corrupt(
            "the database has no meta values although seq.floor shows it was used before \
             (sled could not read its log)"
                .to_string(),
        ));
    }

    let mut next_seq = meta_next.unwrap_or(1).max(1);
    let (mut depth, mut bytes, mut bad_keys) = (0, 0, 0);
    for class in [Class::Heartbeat, Class::Event] {
        let scan = store.scan(class)?;
        if scan.bad_keys > 0 {
            tracing::error!(
                ?class,
                removed = scan.bad_keys,
                "outbox: removed entries with malformed keys; counted as dropped"
            );
            bad_keys += scan.bad_keys;
        }
        depth += scan.records;
        bytes += scan.bytes;
        if let Some(last) = scan.last_seq {
            next_seq = next_seq.max(last.saturating_add(1));
        }
        if let Some((seq, value)) = store.first(class)?
            && let Err(e) = record::decode(seq, class, &value)
        {
            return Err(Failure::Corrupt(format!("the oldest {class:?} record (seq {seq}) does not decode: {e}")));
        }
    }
    let mut dropped = meta_dropped + bad_keys;
    if let Some(closed) = summary
        && is_behind(&closed, next_seq, depth, meta_dropped)
    {
        // A fresh database replacing a corrupt one was reported above, and
        // the old records are kept aside, not lost: only a database that sled
        // opened as if nothing had happened is counted.
        if !moved_aside {
            let lost = report_loss(&closed, next_seq, depth, bytes);
            // What the database dropped after its older state is in the
            // summary; malformed keys found by this scan come on top.
            dropped = meta_dropped.max(closed.dropped).saturating_add(bad_keys).saturating_add(lost);
        }
        // Its meta values may predate seqs handed out before the close.
        next_seq = next_seq.max(closed.next_seq).max(floor.unwrap_or(0));
    }
    if !clean || moved_aside {
        next_seq = next_seq.max(floor.unwrap_or(0));
    }

    // The clean marker is spent: a crash from now on must resume at the floor.
    let cleared = store
        .set_meta(store::META_CLEAN, &record::encode_u64(0))
        .and_then(|()| store.set_meta(store::META_NEXT_SEQ, &record::encode_u64(next_seq)))
        .and_then(|()| store.set_meta(store::META_DROPPED, &record::encode_u64(dropped)))
        .and_then(|()| store.flush());
    if let Err(e) = &cleared {
        // Carry on (a full disk must not stop the agent); the writer retries
        // the meta values and the fsync.
        tracing::warn!(error = %e, "outbox: cannot persist meta values at open");
    }
    // The close summary is spent too (after the losses it showed are counted
    // above): a crash from now on must not be compared with the last close.
    if summary_found && let Err(e) = store.remove_close_summary() {
        tracing::error!(
            error = %e,
            "outbox: cannot remove the close summary; if this run crashes, the next open may count \
             records acked meanwhile as lost"
        );
    }
    Ok(Loaded { next_seq, floor: floor.unwrap_or(0), depth, bytes, dropped, meta_persisted: cleared.is_ok() })
}

/// Whether the database is behind what it held at the last clean close
/// (nothing can have changed since): fewer records, a lower `next_seq` or a
/// lower `dropped`. It then went back to an older state, as sled does when
/// its `db` file lost its tail.
fn is_behind(closed: &record::CloseSummary, next_seq: u64, depth: u64, dropped: u64) -> bool {
    depth < closed.depth || next_seq < closed.next_seq || dropped < closed.dropped
}

/// Logs a database found behind its close summary (one error line) and
/// returns how many records it lost: those missing by count.
fn report_loss(closed: &record::CloseSummary, next_seq: u64, depth: u64, bytes: u64) -> u64 {
    let lost = closed.depth.saturating_sub(depth);
    if lost > 0 {
        tracing::error!(
            lost,
            lost_bytes = closed.bytes.saturating_sub(bytes),
            closed_depth = closed.depth,
            depth,
            closed_next_seq = closed.next_seq,
            next_seq,
            "OUTBOX DAMAGED: the outbox lost {lost} records since it was closed cleanly; its files were damaged \
             (counted as dropped; they will not be sent)"
        );
    } else {
        tracing::error!(
            closed_depth = closed.depth,
            depth,
            closed_next_seq = closed.next_seq,
            next_seq,
            "OUTBOX DAMAGED: the outbox went back to an older state since it was closed cleanly; its files \
             were damaged (no records are missing by count; some may be sent again)"
        );
    }
    lost
}

/// Starts the writer thread over a loaded store.
pub(crate) fn start(
    store: Arc<dyn Store>,
    loaded: Loaded,
    cfg: &OutboxConfig,
    moved_aside: Option<PathBuf>,
) -> Result<(OutboxHandle, OutboxReader, OpenReport), OutboxError> {
    let last = loaded.next_seq - 1;
    let shared = Arc::new(Shared {
        depth: AtomicU64::new(loaded.depth),
        bytes: AtomicU64::new(loaded.bytes),
        dropped: AtomicU64::new(loaded.dropped),
        durable_seq: AtomicU64::new(last),
        written_seq: AtomicU64::new(last),
        closed: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::channel();
    let writer = Writer {
        store: store.clone(),
        shared: shared.clone(),
        cfg: cfg.clone(),
        next_seq: loaded.next_seq,
        floor: loaded.floor,
        meta_dirty: !loaded.meta_persisted,
        dirty_since: (!loaded.meta_persisted).then(Instant::now),
        flush_failures: 0,
        retry_at: None,
        append_waiters: Vec::new(),
        flush_waiters: Vec::new(),
        on_durable: None,
    };
    let thread = thread::Builder::new()
        .name("fieldlink-outbox".to_string())
        .spawn(move || writer.run(rx))
        .map_err(OutboxError::Spawn)?;
    let inner = Arc::new(HandleInner { tx, shared: shared.clone(), thread: Mutex::new(Some(thread)) });
    let reader = OutboxReader { store, shared, writer: Arc::downgrade(&inner) };
    let report = OpenReport { moved_aside, depth: loaded.depth, next_seq: loaded.next_seq };
    Ok((OutboxHandle { inner }, reader, report))
}
