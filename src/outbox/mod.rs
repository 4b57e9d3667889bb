//! The durable outbox: every device-to-cloud message (all but `status`) is
//! recorded here before it is sent, and removed only once the broker has
//! acknowledged it (DESIGN: Delivery promises). This module doc is the
//! design document. The module owns the on-disk queue under
//! `<state_dir>/outbox`; it must not know about MQTT, packet ids or payload
//! contents (payloads are opaque bytes built by the caller).
//!
//! # Layout
//!
//! * `mod.rs`: this document, the public types, [`OutboxHandle`].
//! * `open.rs`: opening, the state_dir lock, recovery (move a corrupt
//!   database aside), the check against the last clean close, where seqs
//!   resume.
//! * `writer.rs`: the writer thread: seqs, group commit, the bound, removals.
//! * `reader.rs`: [`OutboxReader`]: merged, seq-ordered replay reads.
//! * `record.rs`: the byte layouts (record, meta value, floor file, close
//!   summary).
//! * `store.rs`: the storage trait, its sled implementation and
//!   [`MemStore`] (tests and benches).
//!
//! # Invariants
//!
//! 1. **Seqs never repeat.** A seq is assigned by the writer, from 1, strictly
//!    increasing for the life of the state_dir, even across crashes and a
//!    corrupt database being moved aside. Every seq ever assigned is below
//!    the reservation `R` in `seq.floor`, because `R` is raised (durably, by
//!    [`FLOOR_STEP`]) before a seq `>= R` is handed out.
//! 2. **Every assigned seq is accounted for:** it is stored until acked, or it
//!    is counted in `dropped` (bound, failed insert, undecodable, lost from a
//!    damaged database, ...). sled opens a `db` file that lost its tail as an
//!    older state, without an error; after a clean close, `outbox.closed`
//!    (outside sled) tells the next open how many records there were, so the
//!    missing ones are logged and counted (see Open and recovery). After a
//!    crash there is no such file and no such check.
//! 3. **Removal only by:** an ack, the `max_bytes` bound, or the record being
//!    undecodable. Reading never removes.
//! 4. **Durable before acknowledged.** `append` resolves `Ok(seq)` only after
//!    an fsync covering the record; `durable_seq` is the highest seq assigned
//!    before the last successful fsync.
//! 5. **One writer.** All mutations happen on the writer thread, in the order
//!    the messages were sent. Readers read on their own thread and never
//!    write or fsync.
//! 6. **No read skips ahead.** A read returns no seq above `written_seq` (the
//!    last seq the writer finished with), so resuming from the last returned
//!    seq + 1 never passes over a record still being written.
//! 7. **Bounded.** After every append, `bytes <= max_bytes` (oldest heartbeat
//!    dropped first, then oldest event). `bytes` is logical: Σ (8 + value
//!    length); sled's files are larger (log, page overhead).
//! 8. **No panics on bad data.** A value that does not decode is a typed
//!    [`RecordError`]; sled corruption at open moves the database aside.
//!
//! # On-disk format
//!
//! ```text
//! <state_dir>/
//!   outbox.lock              empty; flock'd while an outbox is open on this state_dir
//!   seq.floor                9 bytes: 0x01, then R as u64 big-endian; every seq ever
//!                            assigned is < R. Replaced atomically: seq.floor.tmp,
//!                            fsync, rename, fsync the directory.
//!   outbox.closed            33 bytes: 0x01, then next_seq, depth, bytes, dropped, each
//!                            u64 big-endian: the outbox at its last clean close. Written
//!                            after the final fsync that set `clean` (atomically, like
//!                            seq.floor: outbox.closed.tmp, ...); removed (and the
//!                            directory fsynced) at open, after the meta values; absent
//!                            while an outbox is open and after a crash.
//!   outbox/                  sled 0.34 database (conf, db, blobs/, snap.*)
//!     tree "heartbeats"      key: seq, u64 big-endian (8 bytes)   value: record
//!     tree "events"          key: seq, u64 big-endian (8 bytes)   value: record
//!     tree "meta"            key: "next_seq"  value: 0x01, u64 BE: the seq the next append gets
//!                            key: "dropped"   value: 0x01, u64 BE: records dropped, ever
//!                            key: "clean"     value: 0x01, u64 BE: 1 = last run closed cleanly
//!   outbox.corrupt-<unix secs>[-n]/   a database that could not be used, kept for inspection
//!
//! record value (at most 1 MiB):
//!   +------+----------------------------------------------------------------+
//!   | 0x01 | bincode 2.0.1, config::standard() (little-endian, varints):    |
//!   |      |   seq u64 | ts_ms u64 | class u8 (0 heartbeat, 1 event)        |
//!   |      |   | qos u8 (1, 2) | retain bool | topic str | payload [u8]       |
//!   +------+----------------------------------------------------------------+
//!   decoding checks: version byte, size limit, no trailing bytes, body seq ==
//!   key, body class == tree, qos is 1 or 2.
//! ```
//!
//! Heartbeats and events live in separate trees so the bound can find the
//! oldest heartbeat without scanning; keys are big-endian so tree order is
//! seq order; reads merge the two trees by seq.
//!
//! # Write path
//!
//! [`OutboxHandle::append`] sends the [`Draft`] to the writer thread over a
//! channel (at call time, not at first poll: call order is seq order) and
//! returns a future on a oneshot. The writer takes one message, then drains
//! everything queued (up to 4096) into a *group*. For each append it raises
//! `R` if needed, assigns the seq, calls `draft.payload(seq)`, encodes,
//! inserts into the class tree and applies the bound. After the group it
//! writes the meta values, then:
//!
//! * `durability = "always"`: one fsync for the whole group, then every
//!   waiter is resolved;
//! * `durability = "batch"`: no fsync per message; the fsync happens once
//!   `flush_interval` has passed since the first unflushed change (the
//!   writer waits on its channel with that deadline), then waiters resolve.
//!
//! [`OutboxHandle::flush`] and [`OutboxHandle::shutdown`] force an fsync.
//! After each successful fsync that moves `durable_seq`, the `on_durable`
//! callback runs on the writer thread, before the waiters are resolved.
//!
//! Failures: a failed insert (disk full) drops that record (counted) and
//! fails its waiter; a failed fsync fails the group's waiters and is retried
//! after max(`flush_interval`, 100 ms), doubling per consecutive failure up
//! to 30 s (their records stay stored and become durable with a later
//! fsync). The writer never stops on a storage error.
//!
//! # Read path
//!
//! [`OutboxReader::read`] reads both trees directly with sled on the caller's
//! thread (no fsync, no channel), merges by seq, decodes. A record that does
//! not decode is skipped and logged, and its seq is sent to the writer,
//! which removes it and counts it as dropped.
//!
//! # Ack path
//!
//! [`OutboxHandle::ack`] sends seqs to the writer, which removes them (a seq
//! already gone is a no-op). Removals are not fsynced on their own: they
//! ride on the next fsync, at most `flush_interval` later. An ack lost to a
//! power cut means a resend, which `(device, seq)` deduplicates.
//!
//! # Open and recovery
//!
//! [`open`] creates the state_dir, takes `outbox.lock` (held: "is another
//! fieldlink agent running ...?", nothing is moved), opens sled with
//! `flush_every_ms(None)` (we own every fsync) and an 8 MiB cache, reads the
//! meta values, scans both trees for depth and bytes, and decodes the head
//! record of each tree. sled `Corruption`/`Unsupported`/`ReportableBug` (or a
//! panic), an undecodable meta value or head record, or a database that has
//! lost its meta values although `seq.floor` shows it was used: the
//! directory is renamed to `outbox.corrupt-<secs>`, an error is logged, and a
//! fresh database is opened.
//!
//! Then, if `outbox.closed` exists (the previous run closed cleanly and
//! nothing has run since), open compares the database with it. Nothing can
//! have changed in between, so a database *behind* it (fewer records, a lower
//! next seq or a lower `dropped`) is one sled silently opened in an older
//! state because its files were damaged (e.g. a truncated `db` file, or an
//! `outbox/` deleted by hand): one error line says how many records were
//! lost, they are added to `dropped` (which also never goes below the
//! summary's), and seqs resume at least at `max(closed next_seq, R)`. Lost
//! means missing by count, `closed depth - depth`: a lower bound when the
//! older state still holds records that were acked before the close (those
//! are sent again). A database moved aside is not counted (its records are
//! kept, and its error line was logged). An unreadable `outbox.closed` is
//! logged and ignored. An undamaged database matches the summary and nothing
//! changes.
//!
//! Seqs resume at `max(meta next_seq, highest stored key + 1)`; and at `R`
//! too unless the previous run closed cleanly (its final fsync succeeded and
//! set `clean`). So after a crash or a move-aside, seqs jump to `R` and can
//! never repeat one that was handed out but not yet durable; after a clean
//! shutdown they continue without a gap. `clean` is cleared (and fsynced) at
//! every open, before any seq is assigned, and then `outbox.closed` is
//! removed, so that a crash later in this run is never compared with this
//! close. (A crash between that fsync and the removal would count a loss
//! found at this open once more at the next; a failed removal is logged.)

mod fault;
mod ledger;
mod open;
mod panics;
mod reader;
mod record;
mod salvage;
mod store;
mod writer;

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::SystemTime;

use tokio::sync::oneshot;

pub use ledger::LedgerError;
pub use open::{open, open_in_memory};
pub use panics::is_caught_here as panic_is_caught;
pub use reader::OutboxReader;
pub use record::{FORMAT_VERSION, MAX_RECORD_BYTES, RecordError};
pub use store::{MemStore, StoreError};
pub use writer::FLOOR_STEP;

use crate::proto::Qos;
use writer::Msg;

/// Which tree a record lives in; the bound drops heartbeats first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Heartbeat,
    Event,
}

/// Builds the payload once the seq is known (called on the writer thread).
pub type PayloadFn = Box<dyn FnOnce(u64) -> Vec<u8> + Send>;

/// A message to record; the writer turns it into a [`Record`].
pub struct Draft {
    pub topic: String,
    pub qos: Qos,
    pub retain: bool,
    pub class: Class,
    /// When it happened (not when it is sent).
    pub ts: SystemTime,
    pub payload: PayloadFn,
}

impl fmt::Debug for Draft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Draft")
            .field("topic", &self.topic)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("class", &self.class)
            .field("ts", &self.ts)
            .finish_non_exhaustive()
    }
}

/// A stored message.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub ts_ms: u64,
    pub class: Class,
    pub qos: Qos,
    pub retain: bool,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Counters for the heartbeat and the status dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records stored (not yet acked).
    pub depth: u64,
    /// Their logical size: Σ (8 + value length).
    pub bytes: u64,
    /// Records dropped since the state_dir was created.
    pub dropped: u64,
    /// Highest seq that is durable (0 = none yet).
    pub durable_seq: u64,
}

/// What [`open`] found.
#[derive(Debug, Clone)]
pub struct OpenReport {
    /// Where a corrupt database was moved to, if it was.
    pub moved_aside: Option<PathBuf>,
    pub depth: u64,
    /// The seq the next append gets.
    pub next_seq: u64,
    /// The epoch of this state_dir's seqs (see the module doc: Epoch).
    pub epoch: u64,
    /// Whether this open started the epoch (a new state_dir, or a lost or
    /// unreadable `seq.floor`).
    pub new_epoch: bool,
    /// Records this open found missing (damage, a crash during a disk
    /// fault) and counted in `dropped`.
    pub lost: u64,
    /// Records read from a database moved aside and replayed.
    pub replayed: u64,
}

/// Everything that can go wrong in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "cannot open the outbox in '{}': it is locked (is another fieldlink agent running with state_dir '{}'?)",
        state_dir.display(), state_dir.display()
    )]
    Locked { state_dir: PathBuf },
    #[error("{what} '{}': {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("cannot open the outbox in '{}': {source}", dir.display())]
    Open { dir: PathBuf, source: StoreError },
    #[error("the outbox in '{}' is corrupt: {reason}", dir.display())]
    Corrupt { dir: PathBuf, reason: String },
    #[error("cannot start the outbox writer thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("the outbox is shut down; it accepts no more records")]
    Closed,
    #[error("record {seq} dropped: its payload builder panicked")]
    PayloadPanicked { seq: u64 },
    #[error("record {seq} dropped: cannot encode it: {source}")]
    Encode { seq: u64, source: RecordError },
    #[error("record {seq} dropped: its {size} bytes exceed outbox.max_bytes ({max})")]
    TooLarge { seq: u64, size: u64, max: u64 },
    #[error("record {seq} dropped: cannot store it: {source}")]
    Insert { seq: u64, source: Arc<StoreError> },
    #[error("the outbox could not be made durable (fsync failed): {0}")]
    Flush(#[source] Arc<StoreError>),
    #[error("cannot read the outbox: {0}")]
    Read(#[source] StoreError),
    #[error("the outbox database is being reopened after a disk fault; try again later")]
    Unavailable,
    #[error(
        "record {seq} is not durable yet: the outbox cannot write to its disk ({cause}); it is kept in memory and \
         written when the disk recovers"
    )]
    KeptInMemory { seq: u64, cause: String },
    #[error("heartbeat {seq} dropped: the outbox cannot write to its disk ({cause}); heartbeats are shed meanwhile")]
    Shed { seq: u64, cause: String },
}

/// Counters shared by the writer (the only one that changes them, except
/// `closed`), the handles and the readers.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub depth: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
    pub durable_seq: AtomicU64,
    /// Every seq up to this one is stored, acked or dropped (see invariant 6).
    pub written_seq: AtomicU64,
    /// Set by `shutdown` and when the writer exits; appends then fail.
    pub closed: AtomicBool,
    /// Set while the writer rides out a disk fault.
    pub fault: AtomicBool,
    /// The epoch of this open's seqs.
    pub epoch: u64,
}

/// What every handle clone shares: the writer's channel and thread.
pub(crate) struct HandleInner {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl HandleInner {
    /// Sends to the writer; fails with [`OutboxError::Closed`] once shut down.
    pub(crate) fn send(&self, msg: Msg) -> Result<(), OutboxError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(OutboxError::Closed);
        }
        self.tx.send(msg).map_err(|_| OutboxError::Closed)
    }
}

/// Appends, acks and flushes; cheap to clone. When the last clone is dropped
/// the writer flushes and stops on its own (without being waited for).
#[derive(Clone)]
pub struct OutboxHandle {
    inner: Arc<HandleInner>,
}

impl OutboxHandle {
    /// Records `draft` and resolves with its seq once the record is durable.
    /// The draft is handed to the writer when this is called, so seqs follow
    /// call order; the future needs no runtime to be created.
    pub fn append(&self, draft: Draft) -> impl Future<Output = Result<u64, OutboxError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.inner.send(Msg::Append { draft, reply });
        async move {
            sent?;
            rx.await.map_err(|_| OutboxError::Closed)?
        }
    }

    /// Removes delivered records (fire and forget; seqs already gone are a no-op).
    pub fn ack(&self, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        if let Err(e) = self.inner.send(Msg::Ack(seqs)) {
            // The records stay stored and are resent after the next open;
            // the hub deduplicates them.
            tracing::debug!(error = %e, "outbox: ack after shutdown ignored");
        }
    }

    /// Resolves once everything appended before this call is durable.
    pub fn flush(&self) -> impl Future<Output = Result<(), OutboxError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.inner.send(Msg::Flush(reply));
        async move {
            sent?;
            rx.await.map_err(|_| OutboxError::Closed)?
        }
    }

    /// The epoch of the seqs this outbox hands out: a message is identified
    /// by (device, epoch, seq). Fixed for the life of the state_dir unless
    /// its `seq.floor` is lost (see the module doc: Epoch).
    pub fn epoch(&self) -> u64 {
        self.inner.shared.epoch
    }

    /// Whether the outbox is riding out a disk fault right now (heartbeats
    /// shed, events kept in memory).
    pub fn disk_fault(&self) -> bool {
        self.inner.shared.fault.load(Ordering::Acquire)
    }

    /// Current counters (atomics; no call to the writer).
    pub fn stats(&self) -> Stats {
        let s = &self.inner.shared;
        Stats {
            depth: s.depth.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            durable_seq: s.durable_seq.load(Ordering::Acquire),
        }
    }

    /// Installs the callback the writer calls (on its own thread, so keep it
    /// short) with the new `durable_seq` after each fsync that moved it,
    /// before the appends it covers resolve.
    pub fn set_on_durable(&self, f: Box<dyn Fn(u64) + Send>) {
        if let Err(e) = self.inner.send(Msg::OnDurable(f)) {
            tracing::debug!(error = %e, "outbox: on_durable set after shutdown ignored");
        }
    }

    /// Flushes and stops the writer thread, waiting for it (one fsync).
    /// Later appends and flushes fail with [`OutboxError::Closed`]. Safe to
    /// call more than once and from several clones.
    pub fn shutdown(&self) {
        // Whether or not the writer still listens, it must not get more work.
        if let Err(e) = self.inner.send(Msg::Shutdown) {
            tracing::debug!(error = %e, "outbox: already shut down");
        }
        self.inner.shared.closed.store(true, Ordering::Release);
        let thread = self.inner.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(thread) = thread else { return };
        if thread.thread().id() == thread::current().id() {
            // Called from on_durable: the writer stops after this group;
            // joining ourselves would deadlock.
            return;
        }
        if thread.join().is_err() {
            tracing::error!("outbox: the writer thread panicked");
        }
    }
}
