//! The writer thread: the one place that mutates the outbox. Owns seq
//! assignment and the seq floor, group commit (sled flush, fdatasync, the
//! ledger), the `max_bytes` bound, ack and corrupt-record removals, the meta
//! values, resolving the waiters of `append` and `flush`, and riding out a
//! disk fault: reopening the database with back-off and writing again what
//! the fault kept in memory (see `fault.rs` for the rules).
//!
//! It must never stop because of a storage error: a failed write or commit
//! starts a disk fault (sled's error is sticky, so only a reopen clears it),
//! during which heartbeats are shed, events are kept in memory and every
//! waiter hears at once that its record is not durable. It must not block on
//! anything but its channel and the disk.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use tokio::sync::oneshot;

use super::fault::{self, Admit, Fault};
use super::fresh::{Fresh, FreshBuf};
use super::ledger::Ledger;
use super::ledger_sync::LedgerSync;
use super::record::{self, Floor};
use super::salvage::Salvage;
use super::store::{self, Side, Store, StoreError, StoreSlot};
use super::trim::TrimRule;
use super::{Class, Draft, OutboxError, Record, Saved, Shared};
use crate::config::{Durability, OutboxConfig};
use crate::timefmt;

/// How far the seq floor is raised at a time: one floor write per this many
/// appends.
pub const FLOOR_STEP: u64 = 1_000_000;

/// The most messages taken into one group, so that a flood of appends cannot
/// hold the first waiter of a group back for long.
const MAX_GROUP: usize = 4096;

/// The capacity `removed` may keep once it is cleared (see
/// [`clear_keeping_little`]).
const REMOVED_KEEP: usize = 1024;

/// How long a reopen waits for reads of the old database to finish.
const READS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

type AppendReply = oneshot::Sender<Result<u64, OutboxError>>;
type FlushReply = oneshot::Sender<Result<(), OutboxError>>;

/// Who hears about commits: the new `durable_seq`, with the fresh records
/// (see `fresh.rs`) if it takes them.
pub(crate) enum OnDurable {
    Seq(Box<dyn Fn(u64) + Send>),
    WithRecords(Box<dyn Fn(u64, Option<Fresh>) + Send>),
}

/// What the handles and readers ask of the writer.
pub(crate) enum Msg {
    Append {
        draft: Draft,
        /// `None`: nobody waits; a failure is logged here.
        reply: Option<AppendReply>,
        /// Commit at the end of this group, even in `batch` mode.
        urgent: bool,
        /// Written just before the record, so it is durable in the same commit.
        saved: Vec<Saved>,
    },
    /// An owner's value on its own; the reply comes once it is durable.
    Save {
        saved: Vec<Saved>,
        urgent: bool,
        reply: FlushReply,
    },
    Ack(Vec<u64>),
    /// A reader found a record it cannot decode.
    DropCorrupt {
        seq: u64,
        reason: String,
    },
    Flush(FlushReply),
    OnDurable(OnDurable),
    Shutdown,
}

/// How the writer gets a usable database back after a fault.
pub(crate) trait Reopen: Send {
    /// Whether the disk seems to have room again (no writes; cheap).
    fn has_room(&self) -> bool;
    /// Opens the database again. The caller has dropped every handle to the
    /// old one. A database found corrupt is moved aside and salvaged.
    fn reopen(&self) -> Result<Reopened, StoreError>;
}

/// A database opened again after a fault.
pub(crate) struct Reopened {
    pub store: Arc<dyn Store>,
    /// Where the old database went, if it had to be moved aside.
    pub moved_aside: Option<PathBuf>,
    /// What could be read from it then.
    pub salvage: Salvage,
}

/// What became of one append.
enum Outcome {
    /// Stored; the reply waits for the commit.
    Stored(u64),
    /// Shed or kept in memory during a disk fault: replied to at the end of
    /// the group, once the ledger says so.
    Held(OutboxError),
    /// Dropped (and counted) before it was stored.
    Dropped(OutboxError),
}

/// How a removal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    Removed,
    Absent,
    /// The database cannot be written now; removed after the reopen.
    Deferred,
}

/// The writer's state; [`Writer::run`] consumes it on its own thread.
pub(crate) struct Writer {
    /// The database; `None` while a reopen has not succeeded.
    pub store: Option<Arc<dyn Store>>,
    /// Where readers find the database.
    pub slot: Arc<StoreSlot>,
    pub side: Arc<dyn Side>,
    /// Writes the ledger behind each commit (the same `side`).
    pub ledger_sync: LedgerSync,
    pub reopen: Box<dyn Reopen>,
    pub shared: Arc<Shared>,
    pub cfg: OutboxConfig,
    /// The seq the next append gets.
    pub next_seq: u64,
    /// The reservation `R`: no seq >= `floor` is assigned before `floor` is raised.
    pub floor: u64,
    pub epoch: u64,
    /// The last commit number handed to the database's "commit" meta value.
    pub commit: u64,
    /// The last ledger entry written.
    pub ledger: Ledger,
    /// Mutations not yet committed, and when the first of them happened.
    pub dirty_since: Option<Instant>,
    /// Records stored (or kept in memory) since the last commit, with their
    /// values: written again after a reopen, which keeps only committed data.
    pub unsaved: BTreeMap<u64, (Class, Vec<u8>)>,
    /// Σ stored size of `unsaved`.
    pub unsaved_bytes: u64,
    /// Seqs removed since the last commit or while the disk fails: removed
    /// again after a reopen.
    pub removed: Vec<u64>,
    pub fault: Option<Fault>,
    /// The ledger's `dropped`/`unsaved` changed during a fault.
    pub ledger_dirty: bool,
    pub append_waiters: Vec<(u64, AppendReply)>,
    pub flush_waiters: Vec<FlushReply>,
    /// Waiters of [`Msg::Save`]: answered like flushes, but in `batch` mode
    /// they wait for `flush_interval` unless urgent.
    pub save_waiters: Vec<FlushReply>,
    /// An urgent append or save is in this group: commit at its end.
    pub urgent: bool,
    /// Saved values written since the last commit (or kept through a disk
    /// fault), by meta key: written again after a reopen.
    pub saves: BTreeMap<String, Vec<u8>>,
    pub held_replies: Vec<(AppendReply, OutboxError)>,
    pub on_durable: Option<OnDurable>,
    /// Records stored since the last commit, for `on_durable`.
    pub fresh: FreshBuf,
    /// Records stored or removed since the allocator last gave memory
    /// back, and when it does next (see `Writer::give_back_memory`).
    pub trim: TrimRule,
    /// A record nobody waits on ([`super::OutboxHandle::record`]) was
    /// stored since the last commit: in `always` mode the group still
    /// ends with a commit.
    pub unwaited: bool,
}

impl Writer {
    /// The writer loop: take one message, drain what is queued behind it,
    /// apply the group, then commit if the group needs it (or, during a
    /// disk fault, try to reopen when due). Returns when shut down or when
    /// every handle is gone, after a final commit.
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        // max_bytes may have shrunk since the last run.
        self.enforce_bound();
        let mut stop = false;
        while !stop {
            let first = match self.wake_at() {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            let mut idle = false;
            // Messages in this group (0 when woken by a deadline).
            let mut taken = 0;
            match first {
                Ok(msg) => {
                    self.trim.message();
                    stop = self.handle(msg);
                    taken = 1;
                    while !stop && taken < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(msg) => stop = self.handle(msg),
                            Err(_) => {
                                idle = true;
                                break;
                            }
                        }
                        taken += 1;
                    }
                }
                Err(RecvTimeoutError::Timeout) => idle = true,
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            self.end_group(stop, taken);
            if idle && !stop {
                self.give_back_memory();
            }
        }
        self.close();
        self.let_go();
    }

    /// Applies one message; `true` means stop after this group.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Append { draft, reply, urgent, saved } => {
                self.urgent |= urgent;
                for saved in saved {
                    self.save(saved);
                }
                self.append(draft, reply);
            }
            Msg::Save { saved, urgent, reply } => {
                self.urgent |= urgent;
                for saved in saved {
                    self.save(saved);
                }
                self.save_waiters.push(reply);
            }
            Msg::Ack(seqs) => {
                for seq in seqs {
                    self.remove(seq, "ack");
                }
            }
            Msg::DropCorrupt { seq, reason } => {
                if self.remove(seq, "corrupt") != Removal::Absent {
                    self.count_dropped();
                    tracing::error!(seq, %reason, "outbox: removed a record that does not decode; counted as dropped");
                }
            }
            Msg::Flush(reply) => self.flush_waiters.push(reply),
            Msg::OnDurable(f) => {
                self.fresh.wanted = matches!(f, OnDurable::WithRecords(_));
                self.on_durable = Some(f);
            }
            Msg::Shutdown => return true,
        }
        false
    }

    /// After a group: commit if due, or during a fault try to recover if
    /// due (at once when someone waits on a flush); then answer whoever
    /// cannot be answered with "durable". `taken`: the messages in the
    /// group (0 when woken by a deadline).
    fn end_group(&mut self, stop: bool, taken: usize) {
        if self.fault.is_none() && (stop || self.flush_due()) {
            self.commit_and_resolve(taken);
        }
        if let Some(f) = &self.fault
            && (stop || !self.flush_waiters.is_empty() || self.urgent || f.due(Instant::now()))
        {
            self.try_recover();
        }
        if let Some(f) = &self.fault {
            let cause = f.cause.clone();
            // The ledger first: whoever hears back can rely on it.
            self.write_fault_ledger();
            self.resolve(Err(Arc::new(StoreError::Fault(cause))));
        }
        for (reply, e) in self.held_replies.drain(..) {
            // The appender may have given up waiting; the outcome stands.
            let _gone = reply.send(Err(e));
        }
        // Whoever asked for it has been answered: durable, or not (fault).
        self.urgent = false;
    }

    /// Writes an owner's value into the meta tree before whatever append
    /// carries it: one thread writes both, so the value's log entry has the
    /// lower LSN, and sled 0.34.7 recovers its log in LSN order up to the
    /// first tear (`pagecache/iterator.rs:23-200`, contiguity of the tail at
    /// 386-450). So a crash before the commit can leave the value without
    /// the record, never the record without the value. Kept until the next
    /// commit, to be written again after a reopen; during a disk fault only
    /// kept.
    fn save(&mut self, saved: Saved) {
        let key = saved.meta_key();
        let value = saved.encode();
        self.mark_dirty();
        if self.fault.is_none()
            && let Err(e) = self.store().and_then(|s| s.set_meta(&key, &value))
        {
            self.enter_fault(&e);
        }
        self.saves.insert(key, value);
    }

    fn append(&mut self, draft: Draft, reply: Option<AppendReply>) {
        let outcome = self.try_append(draft);
        // Every seq assigned so far is now stored, kept or dropped: readers may see it.
        self.shared.written_seq.store(self.next_seq - 1, Ordering::Release);
        let Some(reply) = reply else {
            // Nobody waits (`OutboxHandle::record`): a stored record needs
            // no answer, a failure is said here.
            match outcome {
                Outcome::Stored(_) => self.unwaited = true,
                Outcome::Held(e) => tracing::warn!("outbox: {e}"),
                Outcome::Dropped(e) => {
                    self.count_dropped();
                    tracing::error!("outbox: {e}");
                }
            }
            return;
        };
        match outcome {
            Outcome::Stored(seq) => self.append_waiters.push((seq, reply)),
            Outcome::Held(e) => self.held_replies.push((reply, e)),
            Outcome::Dropped(e) => {
                self.count_dropped();
                // The appender may have given up waiting; the drop is counted either way.
                let _gone = reply.send(Err(e));
            }
        }
    }

    /// Assigns a seq, builds and stores the record, applies the bound.
    fn try_append(&mut self, draft: Draft) -> Outcome {
        if self.fault.is_none()
            && let Err(e) = self.reserve(1)
        {
            // Most likely the disk is full. The seq is still handed out: a
            // record is only sent once committed, and the recovery raises
            // the floor before it commits (see `reconcile`), so a crash
            // before that can only repeat seqs that never left memory.
            self.enter_fault(&e);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.mark_dirty();
        // From here on `seq` is spent: every outcome below stores it, keeps it or counts a drop.

        // `_credit` is given back when this returns: the record is stored,
        // kept or dropped by then.
        let Draft { topic, qos, retain, class, ts, payload, credit: _credit } = draft;
        let payload = match catch_unwind(AssertUnwindSafe(move || payload(seq))) {
            Ok(p) => p,
            Err(_) => {
                tracing::error!(seq, %topic, "outbox: the payload builder panicked; record dropped");
                return Outcome::Dropped(OutboxError::PayloadPanicked { seq });
            }
        };
        let record = Record { seq, ts_ms: timefmt::to_millis(ts), class, qos, retain, topic, payload };
        let value = match record::encode(&record) {
            Ok(v) => v,
            Err(source) => return Outcome::Dropped(OutboxError::Encode { seq, source }),
        };
        let size = store::stored_size(value.len());
        if size > self.cfg.max_bytes {
            return Outcome::Dropped(OutboxError::TooLarge { seq, size, max: self.cfg.max_bytes });
        }
        if self.fault.is_some() {
            return self.admit_during_fault(seq, class, value);
        }
        match self.store().and_then(|s| s.insert(class, seq, &value)) {
            Ok(()) => {
                self.track_unsaved(seq, class, value);
                self.fresh.stored(record);
                self.trim.touched();
                self.shared.depth.fetch_add(1, Ordering::Relaxed);
                self.shared.bytes.fetch_add(size, Ordering::Relaxed);
                self.enforce_bound();
                Outcome::Stored(seq)
            }
            Err(e) if e.needs_reopen() => {
                self.enter_fault(&e);
                self.admit_during_fault(seq, class, value)
            }
            Err(e) => {
                tracing::error!(seq, error = %e, "outbox: insert failed; record dropped");
                Outcome::Dropped(OutboxError::Insert { seq, source: Arc::new(e) })
            }
        }
    }

    /// Makes sure the next `n` seqs are below the floor, raising it (durably)
    /// if needed.
    fn reserve(&mut self, n: u64) -> Result<(), StoreError> {
        let last = self.next_seq.saturating_add(n - 1);
        if last < self.floor {
            return Ok(());
        }
        let r = last.max(self.floor).saturating_add(FLOOR_STEP);
        self.side.set_floor(&Floor { r, epoch: self.epoch })?;
        self.floor = r;
        Ok(())
    }

    /// A new record while the disk fails: shed a heartbeat, keep an event.
    fn admit_during_fault(&mut self, seq: u64, class: Class, value: Vec<u8>) -> Outcome {
        let Some(f) = self.fault.as_mut() else {
            return Outcome::Dropped(OutboxError::Closed);
        };
        let cause = f.cause.clone();
        // The ledger records the seq handed out, so it never repeats.
        self.ledger_dirty = true;
        match f.admit(class) {
            Admit::Shed => {
                self.count_dropped();
                Outcome::Held(OutboxError::Shed { seq, cause })
            }
            Admit::Keep => {
                let size = store::stored_size(value.len());
                self.track_unsaved(seq, class, value);
                self.shared.depth.fetch_add(1, Ordering::Relaxed);
                self.shared.bytes.fetch_add(size, Ordering::Relaxed);
                self.ledger_dirty = true;
                self.enforce_retention();
                Outcome::Held(OutboxError::KeptInMemory { seq, cause })
            }
        }
    }

    fn track_unsaved(&mut self, seq: u64, class: Class, value: Vec<u8>) {
        self.unsaved_bytes += store::stored_size(value.len());
        if let Some((_, old)) = self.unsaved.insert(seq, (class, value)) {
            self.unsaved_bytes -= store::stored_size(old.len());
        }
    }

    fn untrack_unsaved(&mut self, seq: u64) -> Option<u64> {
        let (_, value) = self.unsaved.remove(&seq)?;
        let size = store::stored_size(value.len());
        self.unsaved_bytes -= size;
        Some(size)
    }

    /// While over `max_bytes`: drop the oldest heartbeat, else the oldest
    /// event. Not during a fault (nothing can be removed then; what is kept
    /// in memory has its own limit, see [`Writer::enforce_retention`]).
    fn enforce_bound(&mut self) {
        while self.fault.is_none() && self.shared.bytes.load(Ordering::Relaxed) > self.cfg.max_bytes {
            let oldest = self.store().and_then(|s| match s.first(Class::Heartbeat)? {
                Some(hb) => Ok(Some(hb)),
                None => s.first(Class::Event),
            });
            let seq = match oldest {
                Ok(Some((seq, _))) => seq,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "outbox: cannot find the oldest record to drop");
                    break;
                }
            };
            if self.remove(seq, "bound") == Removal::Absent {
                break;
            }
            self.count_dropped();
            tracing::warn!(
                seq,
                dropped = self.shared.dropped.load(Ordering::Relaxed),
                max_bytes = self.cfg.max_bytes,
                "outbox: over max_bytes, dropped the oldest record"
            );
        }
    }

    /// During a fault: while what is kept in memory is over the retain
    /// limit, drop the oldest kept heartbeat, else the oldest kept event.
    fn enforce_retention(&mut self) {
        let limit = fault::retain_limit(self.cfg.max_bytes);
        while self.unsaved_bytes > limit {
            let Some(seq) = fault::victim(self.unsaved.iter().map(|(s, (c, _))| (*s, *c))) else {
                break;
            };
            if let Some(size) = self.untrack_unsaved(seq) {
                self.shared.depth.fetch_sub(1, Ordering::Relaxed);
                self.shared.bytes.fetch_sub(size, Ordering::Relaxed);
            }
            self.count_dropped();
            if let Some(f) = self.fault.as_mut() {
                f.shed += 1;
            }
            tracing::warn!(
                seq,
                limit,
                "outbox: the disk still fails and too much is kept in memory; dropped the oldest"
            );
        }
    }

    /// Removes `seq` wherever it is. Absent seqs (already acked or dropped)
    /// are a no-op.
    fn remove(&mut self, seq: u64, why: &'static str) -> Removal {
        if self.fault.is_some() {
            if let Some(size) = self.untrack_unsaved(seq) {
                self.shared.depth.fetch_sub(1, Ordering::Relaxed);
                self.shared.bytes.fetch_sub(size, Ordering::Relaxed);
                self.ledger_dirty = true;
            }
            // It may be in the database too, which cannot be written now.
            self.removed.push(seq);
            return Removal::Deferred;
        }
        match self.store().and_then(|s| s.remove(seq)) {
            Ok(Some((_class, size))) => {
                self.shared.depth.fetch_sub(1, Ordering::Relaxed);
                self.shared.bytes.fetch_sub(size, Ordering::Relaxed);
                if self.untrack_unsaved(seq).is_some() {
                    // Not committed yet (the bound): no batch may carry it.
                    self.fresh.removed(seq);
                }
                self.trim.touched();
                self.removed.push(seq);
                self.mark_dirty();
                Removal::Removed
            }
            Ok(None) => Removal::Absent,
            Err(e) if e.needs_reopen() => {
                self.enter_fault(&e);
                self.remove(seq, why)
            }
            Err(e) => {
                tracing::warn!(seq, why, error = %e, "outbox: cannot remove a record");
                Removal::Absent
            }
        }
    }

    fn count_dropped(&mut self) {
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        self.ledger_dirty = true;
        self.mark_dirty();
    }

    fn mark_dirty(&mut self) {
        if self.dirty_since.is_none() {
            self.dirty_since = Some(Instant::now());
        }
    }

    fn store(&self) -> Result<Arc<dyn Store>, StoreError> {
        self.store.clone().ok_or(StoreError::NotOpen)
    }

    /// When the writer must wake up at the latest: the next reopen try
    /// during a fault, else the commit deadline of pending mutations.
    fn deadline(&self) -> Option<Instant> {
        match &self.fault {
            Some(f) => Some(f.next_try),
            None => self.dirty_since.map(|t| t + self.cfg.flush_interval),
        }
    }

    /// When the writer wakes without a message: the commit or reopen
    /// deadline, or a trim once quiet.
    fn wake_at(&self) -> Option<Instant> {
        match (self.deadline(), self.trim.wake_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn flush_due(&self) -> bool {
        !self.flush_waiters.is_empty()
            || self.urgent
            || (self.cfg.durability == Durability::Always
                && (self.unwaited || !self.append_waiters.is_empty() || !self.save_waiters.is_empty()))
            || self.deadline().is_some_and(|at| at <= Instant::now())
    }

    /// Commits if anything is pending, then resolves every waiter; a failed
    /// commit, or a failed ledger write of an earlier one, starts a fault.
    /// `taken`: the messages in the group that led to it.
    fn commit_and_resolve(&mut self, taken: usize) {
        if let Some(e) = self.ledger_sync.take_failure() {
            self.enter_fault(&e);
            return;
        }
        if self.dirty_since.is_none() {
            // Nothing to commit; whoever asked for a flush still hears back
            // only once the ledger entries handed over are on file.
            if !self.flush_waiters.is_empty()
                && let Some(e) = self.ledger_sync.drain()
            {
                self.enter_fault(&e);
                return;
            }
            self.resolve(Ok(()));
            return;
        }
        // The Link hears of the records, and appenders and savers are
        // answered, as soon as sled has them on disk; the ledger entry
        // that describes the commit is written and fdatasync'ed behind it
        // (`ledger_sync.rs`), so neither a command's round trip nor the
        // next group waits for that second fdatasync (about 0.36 ms on the
        // session 4 VM, issue #8). On disk the ledger is never ahead of the
        // database and may be behind it, which `open` takes as up to date
        // (`rolled_back` is `meta_commit < ledger.commit`). If the ledger
        // write fails, the next group starts a fault; the records are
        // durable in sled all the same. Whoever asked for a flush waits for
        // the ledger too: after `flush`, the files say the same.
        let committed = self.commit_store(false).map(|(store, dropped)| {
            self.announce_durable();
            self.resolve_durable(&Ok(()));
            self.ledger_entry(&*store, dropped, false)
        });
        // Behind the commit when someone waits for the next one: a command
        // (urgent), or commits coming back to back (the group held more
        // than one message, or the ledger thread is still up). A lone
        // heartbeat's commit writes it here and starts no thread.
        let behind = self.urgent || taken > 1 || self.ledger_sync.running();
        let written = committed.and_then(|entry| {
            if self.flush_waiters.is_empty() && behind {
                self.ledger_sync.submit(entry);
            } else {
                self.write_ledger_now(&entry)?;
            }
            self.ledger_written(entry);
            Ok(())
        });
        match written {
            Ok(()) => self.resolve(Ok(())),
            Err(e) => self.enter_fault(&e),
        }
    }

    /// One group commit: the meta values, sled's flush, fdatasync of the
    /// `db` file and new blobs (`Store::flush`), then the ledger, written
    /// and fdatasync'ed here (after whatever `ledger_sync` still had).
    fn commit(&mut self, clean: bool) -> Result<(), StoreError> {
        let (store, dropped) = self.commit_store(clean)?;
        let entry = self.ledger_entry(&*store, dropped, clean);
        self.write_ledger_now(&entry)?;
        self.ledger_written(entry);
        Ok(())
    }

    /// The first half of a commit: the meta values and sled's flush (the
    /// `db` file and new blobs fdatasync'ed). After it the group's records
    /// are durable. Returns the store and the `dropped` count it recorded.
    fn commit_store(&mut self, clean: bool) -> Result<(Arc<dyn Store>, u64), StoreError> {
        let store = self.store()?;
        self.commit += 1;
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        for (key, v) in [
            (store::META_NEXT_SEQ, self.next_seq),
            (store::META_DROPPED, dropped),
            (store::META_COMMIT, self.commit),
            (store::META_CLEAN, u64::from(clean)),
        ] {
            store.set_meta(key, &record::encode_u64(v))?;
        }
        store.flush()?;
        Ok((store, dropped))
    }

    /// The ledger entry that describes the commit just made.
    fn ledger_entry(&self, store: &dyn Store, dropped: u64, clean: bool) -> Ledger {
        Ledger {
            write_no: self.ledger.write_no + 1,
            commit: self.commit,
            next_seq: self.next_seq,
            depth: self.shared.depth.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            live_from: self.live_from(store),
            dropped,
            unsaved: 0,
            handed_out: self.next_seq,
            clean,
        }
    }

    /// Writes `entry` and fdatasyncs it on this thread, once every entry
    /// handed to `ledger_sync` is on file (so none overtakes it).
    fn write_ledger_now(&self, entry: &Ledger) -> Result<(), StoreError> {
        if let Some(e) = self.ledger_sync.drain() {
            return Err(e);
        }
        self.side.set_ledger(entry)
    }

    /// The second half of a commit, once its ledger entry is written or
    /// handed over: the group's bookkeeping cleared.
    fn ledger_written(&mut self, entry: Ledger) {
        self.ledger = entry;
        self.unsaved.clear();
        self.unsaved_bytes = 0;
        self.saves.clear();
        clear_keeping_little(&mut self.removed, REMOVED_KEEP);
        self.dirty_since = None;
        self.ledger_dirty = false;
        self.unwaited = false;
    }

    /// Every seq below this is acked or dropped: the lowest stored seq, or
    /// `next_seq` when nothing is stored (0 if that cannot be read: a lower
    /// bound only makes a later loss count smaller, never larger).
    fn live_from(&self, store: &dyn Store) -> u64 {
        let mut low = self.next_seq;
        for class in [Class::Heartbeat, Class::Event] {
            match store.first(class) {
                Ok(Some((seq, _))) => low = low.min(seq),
                Ok(None) => {}
                Err(_) => return 0,
            }
        }
        low
    }

    /// After a successful commit: move `durable_seq`, tell `on_durable`,
    /// resolve every waiter.
    fn committed(&mut self) {
        self.announce_durable();
        self.resolve(Ok(()));
    }

    /// Once sled has the group on disk: move `durable_seq` and tell
    /// `on_durable` (with the fresh records), before any waiter is answered.
    fn announce_durable(&mut self) {
        let durable = self.next_seq - 1;
        let before = self.shared.durable_seq.swap(durable, Ordering::AcqRel);
        let fresh = self.fresh.take(self.next_seq);
        // Before the waiters: whoever sees an append resolve can rely on
        // on_durable having seen its seq.
        if durable > before
            && let Some(f) = &self.on_durable
            && catch_unwind(AssertUnwindSafe(|| match f {
                OnDurable::Seq(f) => f(durable),
                OnDurable::WithRecords(f) => f(durable, fresh),
            }))
            .is_err()
        {
            tracing::error!(durable, "outbox: the on_durable callback panicked");
        }
    }

    /// When the writer has nothing queued and `trim.rs`'s rule says a burst
    /// is over (or has run long), asks glibc's allocator to return its free
    /// memory to the system. A burst (a backlog recorded,
    /// or replayed and removed) leaves most of its peak free inside the
    /// heap: glibc trims an arena's top only past `M_TRIM_THRESHOLD` and
    /// never below a chunk still in use, and sled's node copies interleave
    /// with long-lived values; `malloc_trim` walks every arena and releases
    /// whole free pages inside them too (glibc `malloc/malloc.c`, `mtrim`,
    /// `madvise(MADV_DONTNEED)`). Measured (issue #8): 100,000 records
    /// queued, 71 MB RSS before a `malloc_trim(0)`, 25.5 MB after; the
    /// agent used to keep the peak for good. Not more often: it walks the
    /// heaps. Not before the commit of what was stored: with records in
    /// chunks (`store.rs`) the commit is where a group's records are encoded
    /// and handed to sled, so trimming before it (in `batch` mode, the end of
    /// a burst comes `flush_interval` before its commit) left that commit's
    /// peak in the heap: 100,000 records queued, 31.9 MiB of RSS instead of
    /// 20.3 (BENCHMARKS.md, "records in chunks").
    fn give_back_memory(&mut self) {
        let committed = self.dirty_since.is_none() || self.fault.is_some();
        if self.trim.idle(Instant::now(), committed) {
            crate::memtrim::trim();
        }
    }

    /// Answers every waiter. On failure the appended records are kept (in
    /// `unsaved`) and written again after the reopen.
    fn resolve(&mut self, result: Result<(), Arc<StoreError>>) {
        self.resolve_durable(&result);
        for reply in self.flush_waiters.drain(..) {
            let r = result.clone().map_err(OutboxError::Flush);
            // The caller may have given up waiting.
            let _gone = reply.send(r);
        }
    }

    /// Answers the appenders and savers (not who asked for a flush: see
    /// `commit_and_resolve`).
    fn resolve_durable(&mut self, result: &Result<(), Arc<StoreError>>) {
        for (seq, reply) in self.append_waiters.drain(..) {
            let r = match result {
                Ok(()) => Ok(seq),
                Err(e) => Err(OutboxError::KeptInMemory { seq, cause: e.to_string() }),
            };
            // The appender may have given up waiting; the record is stored regardless.
            let _gone = reply.send(r);
        }
        for reply in self.save_waiters.drain(..) {
            let r = result.clone().map_err(OutboxError::Flush);
            // The caller may have given up waiting.
            let _gone = reply.send(r);
        }
    }

    /// A write or commit failed: start a fault (one error line), or, during
    /// one, schedule the next reopen. Waiters hear about it at the end of
    /// the group.
    fn enter_fault(&mut self, e: &StoreError) {
        let now = Instant::now();
        match self.fault.as_mut() {
            Some(f) => {
                let wait = f.failed(now);
                tracing::warn!(error = %e, attempts = f.attempts, ?wait, "outbox: the disk still cannot be written");
            }
            None => {
                tracing::error!(
                    error = %e,
                    retain_limit = fault::retain_limit(self.cfg.max_bytes),
                    "OUTBOX DISK FAULT: cannot write the outbox; heartbeats are shed and new events are kept in \
                     memory until it can write again (the database is reopened with back-off)"
                );
                self.fault = Some(Fault::new(now, e.to_string(), self.cfg.flush_interval));
                self.shared.fault.store(true, Ordering::Release);
                // What the next commit covers is decided by the reopen: the
                // Link reads it from the database.
                self.fresh.forget();
                self.ledger_dirty = true;
            }
        }
    }

    /// During a fault: the ledger keeps the last commit's view and records
    /// `dropped`, how many records only live in memory, and the seqs handed
    /// out meanwhile (the ledger file is rewritten in place, which works on
    /// a full disk).
    fn write_fault_ledger(&mut self) {
        if !self.ledger_dirty {
            return;
        }
        // Nothing handed over earlier may overwrite this entry.
        if let Some(e) = self.ledger_sync.drain() {
            tracing::warn!(error = %e, "outbox: the ledger write behind the last commit failed");
        }
        let ledger = Ledger {
            write_no: self.ledger.write_no + 1,
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            unsaved: self.unsaved.len() as u64,
            handed_out: self.next_seq,
            clean: false,
            ..self.ledger
        };
        match self.side.set_ledger(&ledger) {
            Ok(()) => {
                self.ledger = ledger;
                self.ledger_dirty = false;
            }
            Err(e) => tracing::warn!(error = %e, "outbox: cannot write the ledger during a disk fault"),
        }
    }

    /// During a fault: if the disk seems to have room, close the database,
    /// open it again and write back what was kept; leave the fault if that
    /// and a commit succeed.
    fn try_recover(&mut self) {
        let now = Instant::now();
        if !self.reopen.has_room() {
            if let Some(f) = self.fault.as_mut() {
                f.no_room_yet(now);
                tracing::debug!("outbox: the disk is still full; not reopening yet");
            }
            return;
        }
        let reopened = {
            // Readers wait on this lock; none holds the old database now.
            let Some(mut slot) = self.slot.write_within(READS_PATIENCE) else {
                self.enter_fault(&StoreError::Fault("a read of the old database did not finish".into()));
                return;
            };
            *slot = None;
            self.store = None;
            let r = self.reopen.reopen();
            if let Ok(r) = &r {
                *slot = Some(r.store.clone());
                self.store = Some(r.store.clone());
            }
            r
        };
        let result = reopened.and_then(|r| self.reconcile(r));
        match result {
            Ok(()) => {
                let f = self.fault.take();
                self.shared.fault.store(false, Ordering::Release);
                if let Some(f) = f {
                    tracing::warn!(
                        after = ?f.since.elapsed(),
                        attempts = f.attempts + 1,
                        kept = f.kept,
                        shed = f.shed,
                        "outbox: the disk can be written again; reopened the outbox, the events kept in memory \
                         are on disk now"
                    );
                }
                // Over the bound after writing back what was kept: drop, commit again.
                self.enforce_bound();
                if self.dirty_since.is_some()
                    && let Err(e) = self.commit(false)
                {
                    self.enter_fault(&e);
                    return;
                }
                self.committed();
            }
            Err(e) => self.enter_fault(&e),
        }
    }

    /// After a reopen: count what the database lost against the last ledger
    /// entry, redo the removals and writes since the last commit, replay
    /// what was salvaged from a database moved aside, recount, commit.
    fn reconcile(&mut self, r: Reopened) -> Result<(), StoreError> {
        let store = r.store;
        let last = self.ledger;
        let disk_commit = store.meta(store::META_COMMIT)?.and_then(|v| record::decode_u64(&v).ok()).unwrap_or(0);
        self.commit = self.commit.max(disk_commit);
        let present = match &r.moved_aside {
            Some(_) => r.salvage.count_from(last.live_from),
            None => {
                let mut live = 0;
                for class in [Class::Heartbeat, Class::Event] {
                    live += store.scan(class, last.live_from, u64::MAX)?.live;
                }
                live
            }
        };
        if r.moved_aside.is_some() || disk_commit < last.commit {
            let lost = last.depth.saturating_sub(present);
            // Counted once: a later reopen (if this one fails further on)
            // and the next open compare with what is left.
            self.ledger.depth = self.ledger.depth.min(present);
            self.ledger_dirty = true;
            if lost > 0 {
                self.shared.dropped.fetch_add(lost, Ordering::Relaxed);
                tracing::error!(
                    lost,
                    "OUTBOX DAMAGED: {lost} records lost from a damaged outbox (found when reopening it after a \
                     disk fault; counted as dropped)"
                );
            }
        }
        for seq in self.removed.clone() {
            let _gone_or_absent = store.remove(seq)?;
        }
        // Seqs handed out while the floor could not be raised: raise it first.
        self.reserve(1)?;
        for (key, value) in &self.saves {
            store.set_meta(key, value)?;
        }
        for (seq, (class, value)) in &self.unsaved {
            store.insert(*class, *seq, value)?;
        }
        if let Some(aside) = &r.moved_aside {
            let records: Vec<Record> = r.salvage.records.into_iter().filter(|rec| rec.seq >= last.live_from).collect();
            let n = records.len() as u64;
            if n > 0 {
                self.reserve(n)?;
                for rec in records {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let value = super::salvage::rekey(rec, seq).map_err(StoreError::Replay)?;
                    store.insert(value.0, seq, &value.1)?;
                    self.track_unsaved(seq, value.0, value.1);
                }
                self.shared.written_seq.store(self.next_seq - 1, Ordering::Release);
                tracing::warn!(
                    replayed = n,
                    from = %aside.display(),
                    "outbox: replayed the records salvaged from the outbox moved aside (new outbox seqs; their \
                     payloads keep their original seq)"
                );
            }
        }
        let (mut depth, mut bytes) = (0, 0);
        for class in [Class::Heartbeat, Class::Event] {
            let scan = store.scan(class, 0, u64::MAX)?;
            depth += scan.records;
            bytes += scan.bytes;
        }
        self.shared.depth.store(depth, Ordering::Relaxed);
        self.shared.bytes.store(bytes, Ordering::Relaxed);
        self.mark_dirty();
        self.commit(false)
    }

    /// After the last commit: takes the database out of the readers' reach
    /// (waiting for reads in progress) and drops the writer's handle, so
    /// that it closes here, on the writer thread, before `shutdown`'s join
    /// returns. Closing waits until sled has let go of its files (see
    /// `store.rs`, `DbFile`); the state_dir lock goes when the writer's
    /// reopen is dropped, right after. So once `shutdown` returns, nothing in
    /// this process holds the state_dir (module doc, invariant 10).
    fn let_go(&mut self) {
        match self.slot.write_within(READS_PATIENCE) {
            Some(mut slot) => *slot = None,
            None => tracing::warn!(
                patience = ?READS_PATIENCE,
                "outbox: a read of the database did not finish at shutdown; the database closes when the last \
                 reader is dropped"
            ),
        }
        self.store = None;
    }

    /// After the final commit: mark the shutdown clean (a commit with
    /// `clean` set, in the database and in the ledger), so the next open can
    /// trust `next_seq` instead of jumping to the floor. During a fault that
    /// a last reopen cannot end, what is kept in memory is lost: counted.
    fn close(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        // The last group (`end_group` with `stop`) tried a last reopen.
        if self.fault.is_some() {
            let kept = self.unsaved.len() as u64;
            if kept > 0 {
                self.shared.dropped.fetch_add(kept, Ordering::Relaxed);
                tracing::error!(
                    lost = kept,
                    "outbox: shutting down while the disk still cannot be written: {kept} records kept in memory \
                     are lost (counted as dropped)"
                );
            }
            self.unsaved.clear();
            self.unsaved_bytes = 0;
            if !self.saves.is_empty() {
                tracing::error!(
                    saved = ?self.saves.keys().collect::<Vec<_>>(),
                    "outbox: shutting down while the disk still cannot be written: saved values kept in memory are lost"
                );
                self.saves.clear();
            }
            self.ledger_dirty = true;
            self.write_fault_ledger();
            return;
        }
        if self.dirty_since.is_some() {
            tracing::warn!("outbox: closing with uncommitted changes; the next open starts seqs at the floor");
            return;
        }
        match self.commit(true) {
            Ok(()) => tracing::debug!(next_seq = self.next_seq, "outbox: closed cleanly"),
            Err(e) => tracing::warn!(error = %e, "outbox: cannot mark the shutdown clean"),
        }
    }
}

/// Empties `v` and, if a burst grew it past `keep`, gives the rest of its
/// capacity back: `Vec::clear` keeps it for good. `removed` holds every seq
/// acked between two commits; a 100,000-record replay (`benches/replay.py
/// --memory`) grew it to 32,768 seqs, and heaptrack found its 256 KiB still
/// allocated in the writer's heap after the drain.
fn clear_keeping_little<T>(v: &mut Vec<T>, keep: usize) {
    v.clear();
    if v.capacity() > keep {
        v.shrink_to(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cleared_list_gives_back_what_a_burst_grew() {
        let mut removed: Vec<u64> = (0..100_000).collect();
        clear_keeping_little(&mut removed, REMOVED_KEEP);
        assert!(removed.is_empty());
        assert!(removed.capacity() <= REMOVED_KEEP, "kept {} seqs of capacity", removed.capacity());
    }

    #[test]
    fn a_cleared_small_list_keeps_its_capacity() {
        let mut removed: Vec<u64> = Vec::with_capacity(64);
        removed.extend(0..64);
        clear_keeping_little(&mut removed, REMOVED_KEEP);
        assert!(removed.is_empty());
        assert!(removed.capacity() >= 64);
    }
}
