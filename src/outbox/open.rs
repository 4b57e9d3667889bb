//! Opening the outbox. Owns taking the state_dir lock (its rules are in
//! `lock.rs`), recovery (a corrupt database is moved aside, salvaged and
//! replaced by a fresh one), the check against the ledger (records the
//! database lost are counted as dropped), where seqs resume, the epoch, the
//! depth/bytes scan, reopening the database after a disk fault, and starting
//! the writer and reader threads.
//!
//! Everything here runs before the writer starts; once it runs, only the
//! writer mutates. Open replays salvaged records itself (the writer is not
//! running yet), under new seqs from `next_seq` on, like appends.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::ledger::{Ledger, LedgerError};
use super::ledger_sync::LedgerSync;
use super::lock::StateDirLock;
use super::reader::ReadThread;
use super::record::{self, CloseSummary, Floor};
use super::salvage::{self, Salvage};
use super::store::{self, MemStore, Side, SidePaths, SledSide, SledStore, Store, StoreError, StoreSlot};
use super::trim::TrimRule;
use super::writer::{FLOOR_STEP, Reopen, Reopened, Writer};
use super::{Class, HandleInner, OpenReport, OutboxError, OutboxHandle, OutboxReader, Shared, panics};
use crate::config::OutboxConfig;

/// The sled database, under the state_dir.
const DB_DIR: &str = "outbox";
/// The seq reservation and epoch file, under the state_dir.
const FLOOR_FILE: &str = "seq.floor";
/// The ledger, under the state_dir.
const LEDGER_FILE: &str = "outbox.ledger";
/// The close summary of builds before the ledger: read once, then removed.
const CLOSED_FILE: &str = "outbox.closed";

/// A reopen after a disk fault is tried only with at least this much free
/// space on the state_dir's filesystem: sled needs room for a new log
/// segment (512 KiB) to open (measured: a 3 MiB tmpfs with 256 KiB free
/// refused the reopen with ENOSPC, with 1 MiB free it worked).
const REOPEN_ROOM_BYTES: u64 = 1 << 20;

/// What the open scan found and decided.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub next_seq: u64,
    /// The reservation `R` on disk (0: none; the first append writes one).
    pub floor: u64,
    pub epoch: u64,
    pub new_epoch: bool,
    pub depth: u64,
    pub bytes: u64,
    pub dropped: u64,
    /// The commit number of the open's commit.
    pub commit: u64,
    /// The newest ledger entry on disk after the open.
    pub ledger: Ledger,
    /// Whether the open's commit (meta values, fsync, ledger) succeeded.
    pub committed: bool,
    /// Records counted as lost by this open.
    pub lost: u64,
    /// Records salvaged from a database moved aside and replayed.
    pub replayed: u64,
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

/// A database moved aside: where it went and what could be read from it.
pub(crate) struct Replacing {
    pub aside: PathBuf,
    pub salvage: Salvage,
}

fn side_paths(state_dir: &Path) -> SidePaths {
    SidePaths {
        floor: state_dir.join(FLOOR_FILE),
        ledger: state_dir.join(LEDGER_FILE),
        close_summary: state_dir.join(CLOSED_FILE),
    }
}

/// Opens (or creates) the outbox at `<state_dir>/outbox` and starts its
/// writer and reader threads. A corrupt database (including one that makes
/// sled panic) is moved aside (see [`OpenReport::moved_aside`]), what can be
/// read from it is replayed, and the agent carries on with a fresh one.
pub fn open(state_dir: &Path, cfg: &OutboxConfig) -> Result<(OutboxHandle, OutboxReader, OpenReport), OutboxError> {
    fs::create_dir_all(state_dir).map_err(|source| OutboxError::Io {
        what: "cannot create state_dir",
        path: state_dir.to_path_buf(),
        source,
    })?;
    let lock = StateDirLock::take(state_dir)?;
    let dir = state_dir.join(DB_DIR);
    let existed = dir.exists();
    let side: Arc<dyn Side> = Arc::new(SledSide::new(side_paths(state_dir)));

    let first =
        open_sled(&dir, &lock).map_err(Failure::from).and_then(|s| guarded_load(Arc::new(s), &*side, existed, None));
    let (store, loaded, moved_aside) = match first {
        Ok((s, loaded)) => (s, loaded, None),
        Err(Failure::Store(e)) => return Err(store_error(state_dir, &dir, e)),
        Err(Failure::Corrupt(reason)) => {
            // The failed store is closed by now; renaming works regardless
            // of files sled's threads may still hold open.
            let aside = move_aside(state_dir, &dir).map_err(|source| OutboxError::Io {
                what: "cannot move the corrupt outbox aside to",
                path: state_dir.join(format!("{DB_DIR}.corrupt-*")),
                source,
            })?;
            report_moved_aside(&dir, &aside, &reason);
            let salvage = salvage_aside(&aside);
            let fresh = open_sled(&dir, &lock).map_err(|e| store_error(state_dir, &dir, e))?;
            let replacing = Replacing { aside: aside.clone(), salvage };
            let (s, loaded) = guarded_load(Arc::new(fresh), &*side, false, Some(replacing)).map_err(|f| match f {
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
        epoch = loaded.epoch,
        "outbox opened"
    );
    let reopen = Box::new(SledReopen { state_dir: state_dir.to_path_buf(), dir, lock });
    start(store, side, reopen, loaded, cfg, moved_aside)
}

/// Opens an outbox over a [`MemStore`] (tests and benches). Reopening after
/// [`OutboxHandle::shutdown`] with the same store, or with
/// [`MemStore::crashed`], behaves like reopening a state_dir.
pub fn open_in_memory(
    store: &MemStore,
    cfg: &OutboxConfig,
) -> Result<(OutboxHandle, OutboxReader, OpenReport), OutboxError> {
    let dir = PathBuf::from("<memory>");
    let side: Arc<dyn Side> = Arc::new(store.clone());
    let (s, loaded) = guarded_load(Arc::new(store.clone()), &*side, false, None).map_err(|f| match f {
        Failure::Corrupt(reason) => OutboxError::Corrupt { dir: dir.clone(), reason },
        Failure::Store(source) => OutboxError::Open { dir: dir.clone(), source },
    })?;
    start(s, side, Box::new(MemReopen(store.clone())), loaded, cfg, None)
}

/// [`load`] under [`panics::catch`]: a panic from sled while scanning is
/// corruption too. A store that failed to load is closed (also under
/// `catch`: dropping a damaged `Db` flushes it).
fn guarded_load(
    s: Arc<dyn Store>,
    side: &dyn Side,
    existed: bool,
    replacing: Option<Replacing>,
) -> Result<(Arc<dyn Store>, Loaded), Failure> {
    let failure = match panics::catch(|| load(&*s, side, existed, replacing)) {
        Ok(Ok(loaded)) => return Ok((s, loaded)),
        Ok(Err(f)) => f,
        Err(panic) => Failure::Corrupt(format!("sled panicked while reading the database: {panic}")),
    };
    if let Err(panic) = panics::catch(move || drop(s)) {
        tracing::warn!(%panic, "outbox: sled panicked while closing a damaged database");
    }
    Err(failure)
}

fn report_moved_aside(dir: &Path, aside: &Path, reason: &str) {
    tracing::error!(
        outbox = %dir.display(),
        moved_to = %aside.display(),
        %reason,
        "OUTBOX CORRUPT: moved it aside and started a fresh outbox; what can still be read from it is \
         replayed into the fresh one, the rest is counted as dropped (inspect or delete '{}')",
        aside.display()
    );
}

/// Salvages a database moved aside, with one log line on what came of it.
fn salvage_aside(aside: &Path) -> Salvage {
    let s = salvage::salvage(aside);
    match &s.unreadable {
        None => tracing::warn!(
            from = %aside.display(),
            records = s.records.len(),
            undecodable = s.undecodable,
            "outbox: read the records of the outbox moved aside"
        ),
        Some(reason) => tracing::error!(
            from = %aside.display(),
            records = s.records.len(),
            undecodable = s.undecodable,
            %reason,
            "outbox: the outbox moved aside cannot be read in full"
        ),
    }
    s
}

/// How long to wait for sled's own file lock once we hold `outbox.lock`.
const SLED_LOCK_WAIT: Duration = Duration::from_secs(2);
const SLED_LOCK_RETRY: Duration = Duration::from_millis(10);

/// Opens sled, waiting briefly for its file lock. Closing a database in
/// this process already waits until sled has let go of its files (see
/// `store.rs`, `DbFile`), and we hold `outbox.lock`, so no other agent can
/// hold sled's lock: the wait only covers a close that gave up waiting
/// (it says so at WARN) and a foreign process holding sled's `db` without
/// `outbox.lock`. Every 10 ms for up to 2 s, then the lock error stands.
fn open_sled(dir: &Path, lock: &Arc<StateDirLock>) -> Result<SledStore, StoreError> {
    let give_up = Instant::now() + SLED_LOCK_WAIT;
    loop {
        match SledStore::open(dir, lock.clone()) {
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

/// Renames `dir` to `<state_dir>/outbox.corrupt-<unix secs>` (with `-2`,
/// `-3`, ... if taken).
fn move_aside(state_dir: &Path, dir: &Path) -> io::Result<PathBuf> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let base = format!("{DB_DIR}.corrupt-{secs}");
    let mut aside = state_dir.join(&base);
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = state_dir.join(format!("{base}-{n}"));
    }
    fs::rename(dir, &aside)?;
    Ok(aside)
}

/// A new epoch: the current unix time in milliseconds. A clock before 2020
/// (a Raspberry Pi has no real-time clock: before NTP it may start near 1970
/// after every boot, so two such epochs could be equal) gives a random
/// epoch instead. Never 0, which is the epoch of a version-1 floor.
fn fresh_epoch() -> u64 {
    const Y2020_MS: u64 = 1_577_836_800_000;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    if now >= Y2020_MS {
        return now;
    }
    match getrandom::u64() {
        Ok(r) => (r >> 1).max(1),
        Err(e) => {
            tracing::warn!(error = %e, "outbox: no randomness for a new epoch; using the (implausible) clock");
            now.max(1)
        }
    }
}

/// What the previous run left as the truth to check the database against:
/// the ledger, or the close summary of a build before the ledger.
#[derive(Debug, Clone, Copy)]
struct Expect {
    /// The commit the ledger describes (none for a legacy summary).
    commit: Option<u64>,
    next_seq: u64,
    depth: u64,
    bytes: u64,
    live_from: u64,
    dropped: u64,
    unsaved: u64,
    /// Every seq below this may have been handed out.
    handed_out: u64,
}

impl From<Ledger> for Expect {
    fn from(l: Ledger) -> Expect {
        Expect {
            commit: Some(l.commit),
            next_seq: l.next_seq,
            depth: l.depth,
            bytes: l.bytes,
            live_from: l.live_from,
            dropped: l.dropped,
            unsaved: l.unsaved,
            handed_out: l.handed_out,
        }
    }
}

impl From<CloseSummary> for Expect {
    fn from(s: CloseSummary) -> Expect {
        Expect {
            commit: None,
            next_seq: s.next_seq,
            depth: s.depth,
            bytes: s.bytes,
            live_from: 0,
            dropped: s.dropped,
            unsaved: 0,
            handed_out: s.next_seq,
        }
    }
}

/// Reads the meta values, the floor and the ledger, scans both trees,
/// checks their head records, counts what the database lost against the
/// ledger, replays what was salvaged from a database moved aside, decides
/// where seqs resume and the epoch, and commits the result (clearing the
/// `clean` marker, writing the ledger, removing a legacy close summary).
///
/// `existed`: the database existed before this open, so it must have meta
/// values if a floor or ledger exists. `replacing`: this is the fresh
/// database replacing one moved aside.
pub(crate) fn load(
    store: &dyn Store,
    side: &dyn Side,
    existed: bool,
    replacing: Option<Replacing>,
) -> Result<Loaded, Failure> {
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
    let meta_commit = meta_u64(store::META_COMMIT)?.unwrap_or(0);

    let (floor, floor_lost) = match side.floor() {
        Ok(f) => (f, false),
        Err(e @ StoreError::BadFloor { .. }) => {
            tracing::error!(error = %e, "outbox: ignoring an unreadable seq floor");
            (None, true)
        }
        Err(e) => return Err(Failure::Store(e)),
    };
    let (ledger, ledger_lost) = match side.ledger() {
        Ok(l) => (l, false),
        Err(StoreError::Ledger(e @ LedgerError::NoValidSlot { .. })) => {
            tracing::error!(
                error = %e,
                "outbox: ignoring an unreadable ledger; cannot check whether the database lost records"
            );
            (None, true)
        }
        Err(e) => return Err(Failure::Store(e)),
    };
    // Left by a clean close of a build before the ledger.
    let (summary, summary_found) = match side.close_summary() {
        Ok(s) => (s, s.is_some()),
        Err(e @ StoreError::BadCloseSummary { .. }) => {
            tracing::error!(error = %e, "outbox: ignoring an unreadable legacy close summary");
            (None, true)
        }
        Err(e) => return Err(Failure::Store(e)),
    };
    let first_start = !existed
        && replacing.is_none()
        && floor.is_none()
        && !floor_lost
        && ledger.is_none()
        && !ledger_lost
        && !summary_found;
    // Used before: a ledger exists only after a commit (which writes the
    // meta values), and a version-1 floor (epoch 0) only after an append by
    // a build before the ledger. (A version-2 floor alone is written at the
    // first open, before its commit, which a full disk may have failed.)
    let used_before = ledger.is_some() || ledger_lost || floor.is_some_and(|f| f.epoch == 0);
    if existed && meta_next.is_none() && used_before {
        return Err(Failure::Corrupt(
            "the database has no meta values although the ledger (or seq.floor) shows it was used before \
             (sled could not read its log)"
                .to_string(),
        ));
    }
    let expect: Option<Expect> = ledger.map(Expect::from).or(summary.map(Expect::from));
    let live_from = expect.map_or(0, |e| e.live_from);
    let after_from = expect.map_or(u64::MAX, |e| e.next_seq);

    let mut next_seq = meta_next.unwrap_or(1).max(1);
    let (mut depth, mut bytes, mut bad_keys, mut live, mut after) = (0, 0, 0, 0, 0);
    let mut first_seq: Option<u64> = None;
    for class in [Class::Heartbeat, Class::Event] {
        let scan = store.scan(class, live_from, after_from)?;
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
        live += scan.live;
        after += scan.after;
        first_seq = first_seq.into_iter().chain(scan.first_seq).min();
        if let Some(last) = scan.last_seq {
            next_seq = next_seq.max(last.saturating_add(1));
        }
        if let Some((seq, value)) = store.first(class)?
            && let Err(e) = record::decode(seq, class, &value)
        {
            return Err(Failure::Corrupt(format!("the oldest {class:?} record (seq {seq}) does not decode: {e}")));
        }
    }

    // Is the database behind what the previous run made durable?
    let rolled_back = match (&replacing, expect) {
        (_, None) => false,
        (Some(_), Some(_)) => true,
        (None, Some(e)) => match e.commit {
            Some(commit) => meta_commit < commit,
            // A legacy summary: nothing can have changed since that clean close.
            None => depth < e.depth || next_seq < e.next_seq || meta_dropped < e.dropped,
        },
    };
    let (present, present_after) = match &replacing {
        Some(r) => (r.salvage.count_from(live_from), r.salvage.count_from(after_from)),
        None => (live, after),
    };
    let mut lost = 0;
    if let Some(e) = expect {
        if rolled_back {
            lost = e.depth.saturating_sub(present);
            report_loss(e, lost, present, next_seq, replacing.is_some());
        }
        let unsaved_lost = e.unsaved.saturating_sub(present_after);
        if unsaved_lost > 0 {
            tracing::error!(
                lost = unsaved_lost,
                "OUTBOX: {unsaved_lost} records kept in memory during a disk fault were lost: the agent stopped \
                 before the disk could be written again (counted as dropped)"
            );
            lost += unsaved_lost;
        }
    }
    if let Some(r) = &replacing {
        next_seq = next_seq.max(r.salvage.records.last().map_or(0, |rec| rec.seq.saturating_add(1)));
        if expect.is_none() {
            // Nothing says how many there were: what did not decode is all we can count.
            lost += r.salvage.undecodable;
            if let Some(reason) = &r.salvage.unreadable {
                tracing::error!(
                    %reason,
                    found = r.salvage.records.len(),
                    "OUTBOX DAMAGED: the outbox moved aside could not be read in full and there is no ledger to \
                     count its records: an unknown number of records were lost"
                );
            }
        }
    }
    let mut dropped = meta_dropped.max(expect.map_or(0, |e| e.dropped)).saturating_add(bad_keys).saturating_add(lost);
    if let Some(e) = expect {
        next_seq = next_seq.max(e.next_seq).max(e.handed_out);
    }
    // After a crash or damage, seqs handed out but never made durable may
    // be anywhere below the floor: resume at it.
    if !clean || rolled_back || replacing.is_some() {
        next_seq = next_seq.max(floor.map_or(0, |f| f.r));
    }

    let new_epoch = floor.is_none();
    let epoch = match floor {
        Some(f) => f.epoch,
        None => {
            let e = fresh_epoch();
            if first_start {
                tracing::info!(epoch = e, "outbox: a new state_dir; starting epoch {e}");
            } else {
                tracing::warn!(
                    epoch = e,
                    next_seq,
                    "outbox: seq.floor is missing or unreadable: starting a new epoch {e}, so that seqs from now \
                     on cannot be mistaken for ones sent before"
                );
            }
            e
        }
    };
    let mut floor_r = floor.map_or(0, |f| f.r);

    // Replay what was salvaged (records already acked stay behind), and the
    // saved values (the relays' power-on state) as they were.
    let mut replayed = 0;
    if let Some(r) = replacing {
        for (key, value) in &r.salvage.saved {
            if let Err(e) = store.set_meta(key, value) {
                tracing::error!(error = %e, key = %key, "outbox: cannot restore a salvaged saved value");
            }
        }
        let records: Vec<_> = r.salvage.records.into_iter().filter(|rec| rec.seq >= live_from).collect();
        let n = records.len() as u64;
        if n > 0 && next_seq.saturating_add(n) >= floor_r {
            let r_new = next_seq.saturating_add(n).saturating_add(FLOOR_STEP);
            match side.set_floor(&Floor { r: r_new, epoch }) {
                Ok(()) => floor_r = r_new,
                Err(e) => tracing::warn!(error = %e, "outbox: cannot raise the seq floor before replaying"),
            }
        }
        for rec in records {
            let seq = next_seq;
            let (class, value) = match salvage::rekey(rec, seq) {
                Ok(cv) => cv,
                Err(e) => {
                    tracing::error!(error = %e, "outbox: a salvaged record cannot be encoded again; dropped");
                    dropped += 1;
                    continue;
                }
            };
            if let Err(e) = store.insert(class, seq, &value) {
                tracing::error!(error = %e, "outbox: cannot replay a salvaged record; dropped");
                dropped += 1;
                continue;
            }
            next_seq += 1;
            depth += 1;
            bytes += store::stored_size(value.len());
            first_seq = first_seq.or(Some(seq));
            replayed += 1;
        }
        if replayed > 0 {
            tracing::warn!(
                replayed,
                from = %r.aside.display(),
                "outbox: replayed {replayed} records from the outbox moved aside; they get new outbox seqs and \
                 are sent before anything recorded from now on, and their payloads keep their original seq"
            );
        }
    }
    if new_epoch {
        let f = Floor { r: floor_r.max(next_seq), epoch };
        match side.set_floor(&f) {
            Ok(()) => floor_r = f.r,
            // The writer writes it with the first append.
            Err(e) => {
                tracing::warn!(error = %e, "outbox: cannot write the new epoch yet");
                floor_r = 0;
            }
        }
    }

    // Commit what open decided: the clean marker is spent (a crash from
    // now on must resume at the floor), the counts and the ledger are new.
    let commit = meta_commit.max(ledger.map_or(0, |l| l.commit)).saturating_add(1);
    let previous = ledger.unwrap_or_default();
    let new_ledger = Ledger {
        write_no: previous.write_no + 1,
        commit,
        next_seq,
        depth,
        bytes,
        live_from: first_seq.unwrap_or(next_seq),
        dropped,
        unsaved: 0,
        handed_out: next_seq,
        clean: false,
    };
    let committed = [
        (store::META_CLEAN, 0),
        (store::META_NEXT_SEQ, next_seq),
        (store::META_DROPPED, dropped),
        (store::META_COMMIT, commit),
    ]
    .into_iter()
    .try_for_each(|(key, v)| store.set_meta(key, &record::encode_u64(v)))
    .and_then(|()| store.flush())
    .and_then(|()| side.set_ledger(&new_ledger));
    if let Err(e) = &committed {
        // Carry on (a full disk must not stop the agent); the writer
        // commits again (and rides out the fault).
        tracing::warn!(error = %e, "outbox: cannot commit at open");
    }
    // The legacy summary is spent (its losses are counted above).
    if summary_found && let Err(e) = side.remove_close_summary() {
        tracing::error!(error = %e, "outbox: cannot remove the legacy close summary");
    }
    Ok(Loaded {
        next_seq,
        floor: floor_r,
        epoch,
        new_epoch,
        depth,
        bytes,
        dropped,
        commit,
        ledger: if committed.is_ok() { new_ledger } else { previous },
        committed: committed.is_ok(),
        lost,
        replayed,
    })
}

/// Logs a database found behind what the previous run made durable.
fn report_loss(e: Expect, lost: u64, present: u64, next_seq: u64, replacing: bool) {
    if lost > 0 {
        tracing::error!(
            lost,
            expected = e.depth,
            found = present,
            lost_bytes_at_most = e.bytes,
            expected_next_seq = e.next_seq,
            next_seq,
            "OUTBOX DAMAGED: {lost} records lost from a damaged outbox (counted as dropped; they will not be sent)"
        );
    } else if !replacing {
        tracing::error!(
            expected = e.depth,
            found = present,
            expected_next_seq = e.next_seq,
            next_seq,
            "OUTBOX DAMAGED: the outbox went back to an older state; its files were damaged (no records are \
             missing by count; some may be sent again)"
        );
    }
}

/// Reopens the sled database in place after a disk fault.
struct SledReopen {
    state_dir: PathBuf,
    dir: PathBuf,
    lock: Arc<StateDirLock>,
}

impl Reopen for SledReopen {
    // The casts are no-ops on 64-bit Linux, not on a 32-bit Pi OS (u32 there).
    #[allow(clippy::unnecessary_cast)]
    fn has_room(&self) -> bool {
        match nix::sys::statvfs::statvfs(&self.state_dir) {
            Ok(s) => (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64) >= REOPEN_ROOM_BYTES,
            // Cannot tell: try the reopen (it fails cheaply).
            Err(_) => true,
        }
    }

    fn reopen(&self) -> Result<Reopened, StoreError> {
        match open_sled(&self.dir, &self.lock) {
            Ok(s) => Ok(Reopened { store: Arc::new(s), moved_aside: None, salvage: Salvage::default() }),
            Err(e) if e.is_corruption() => {
                let aside = move_aside(&self.state_dir, &self.dir).map_err(|source| StoreError::Io {
                    what: "cannot move the corrupt outbox aside from",
                    path: self.dir.clone(),
                    source,
                })?;
                report_moved_aside(&self.dir, &aside, &e.to_string());
                let salvage = salvage_aside(&aside);
                let fresh = open_sled(&self.dir, &self.lock)?;
                Ok(Reopened { store: Arc::new(fresh), moved_aside: Some(aside), salvage })
            }
            Err(e) => Err(e),
        }
    }
}

/// "Reopens" a [`MemStore`]: forgets what was not flushed, as sled does.
struct MemReopen(MemStore);

impl Reopen for MemReopen {
    fn has_room(&self) -> bool {
        self.0.has_room()
    }

    fn reopen(&self) -> Result<Reopened, StoreError> {
        self.0.reopen()?;
        Ok(Reopened { store: Arc::new(self.0.clone()), moved_aside: None, salvage: Salvage::default() })
    }
}

/// Starts the reader and writer threads over a loaded store.
pub(crate) fn start(
    store: Arc<dyn Store>,
    side: Arc<dyn Side>,
    reopen: Box<dyn Reopen>,
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
        fault: AtomicBool::new(false),
        epoch: loaded.epoch,
    });
    let read_thread = ReadThread::start().map_err(OutboxError::Spawn)?;
    let slot = StoreSlot::new(store.clone());
    let (tx, rx) = mpsc::channel();
    let writer = Writer {
        store: Some(store),
        slot: slot.clone(),
        ledger_sync: LedgerSync::new(side.clone()),
        side,
        reopen,
        shared: shared.clone(),
        cfg: cfg.clone(),
        next_seq: loaded.next_seq,
        floor: loaded.floor,
        epoch: loaded.epoch,
        commit: loaded.commit,
        ledger: loaded.ledger,
        dirty_since: (!loaded.committed).then(Instant::now),
        unsaved: Default::default(),
        unsaved_bytes: 0,
        removed: Vec::new(),
        fault: None,
        ledger_dirty: false,
        append_waiters: Vec::new(),
        flush_waiters: Vec::new(),
        save_waiters: Vec::new(),
        urgent: false,
        saves: Default::default(),
        held_replies: Vec::new(),
        on_durable: None,
        fresh: Default::default(),
        trim: TrimRule::default(),
        unwaited: false,
    };
    // The writer logs to whatever subscriber its opener logs to (the
    // global one in the agent; a test's own one in tests).
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    let thread = thread::Builder::new()
        .name("fieldlink-outbox".to_string())
        .spawn(move || tracing::dispatcher::with_default(&dispatch, || writer.run(rx)))
        .map_err(OutboxError::Spawn)?;
    let inner = Arc::new(HandleInner { tx, shared: shared.clone(), thread: Mutex::new(Some(thread)) });
    let reader = OutboxReader { slot, shared, writer: Arc::downgrade(&inner), thread: read_thread };
    let report = OpenReport {
        moved_aside,
        depth: loaded.depth,
        next_seq: loaded.next_seq,
        epoch: loaded.epoch,
        new_epoch: loaded.new_epoch,
        lost: loaded.lost,
        replayed: loaded.replayed,
    };
    Ok((OutboxHandle { inner }, reader, report))
}
