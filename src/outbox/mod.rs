//! The durable outbox: every device-to-cloud message (all but `status`) is
//! recorded here before it is sent, and removed only once the Link says it
//! was delivered: the hub confirmed storing it, or the broker acknowledged
//! it with `confirm = "broker"` (DESIGN: Delivery promises). This module doc is the
//! design document. The module owns the on-disk queue under
//! `<state_dir>/outbox` and the files beside it; it must not know about
//! MQTT, packet ids or payload contents (payloads are opaque bytes built by
//! the caller).
//!
//! # Layout
//!
//! * `mod.rs`: this document, the public types, [`OutboxHandle`].
//! * `open.rs`: opening, the state_dir lock, recovery (move a corrupt
//!   database aside, salvage and replay it), the check against the ledger,
//!   where seqs resume, the epoch, reopening after a disk fault.
//! * `writer.rs`: the writer thread: seqs, group commit, the bound,
//!   removals, riding out a disk fault.
//! * `credit.rs`: [`Credits`], the bound on records a producer has on the
//!   way to the writer (backpressure onto the producer's thread).
//! * `fault.rs`: the disk fault's rules (shed, keep, back-off), sans-IO.
//! * `reader.rs`: [`OutboxReader`]: merged, seq-ordered replay reads, and
//!   the reader thread.
//! * `ledger.rs`: the ledger file beside sled (layout and I/O).
//! * `lock.rs`: `outbox.lock`, and telling when sled has let go of `db`.
//! * `salvage.rs`: reading what is readable from a database moved aside.
//! * `panics.rs`: catching sled's panics (and telling the agent's panic hook).
//! * `record.rs`: the byte layouts (record, meta value, floor file, legacy
//!   close summary).
//! * `store.rs`: the storage traits (the database, the files beside it),
//!   the sled implementation (records in chunks) and [`MemStore`] (tests
//!   and benches).
//! * `chunk.rs`: the byte layouts of a chunk and of its removed bitmap.
//! * `index.rs`: the in-memory index of the chunks, and what a flush writes.
//!
//! # Invariants
//!
//! 1. **Seqs never repeat within an epoch.** A seq is assigned by the writer,
//!    from 1, strictly increasing for the life of the state_dir, even across
//!    crashes, disk faults and a corrupt database being moved aside. Every
//!    seq ever assigned is below the reservation `R` in `seq.floor`, because
//!    `R` is raised (durably, by [`FLOOR_STEP`]) before a seq `>= R` is
//!    handed out; during a disk fault, when `R` cannot be written, the
//!    ledger's `handed_out` records the seqs handed out instead (they are
//!    never sent before the fault ends, and the floor is raised then, before
//!    anything is committed). If `seq.floor` is lost, a new epoch starts
//!    (see Epoch), so `(epoch, seq)` never repeats.
//! 2. **Every assigned seq is accounted for:** it is stored until acked, or
//!    it is counted in `dropped` (the bound, a record too large, undecodable,
//!    a heartbeat shed during a disk fault, lost from a damaged database, kept
//!    in memory when the process stopped during a disk fault, ...). The
//!    ledger, fdatasync'ed with every commit, is what lets open count records
//!    that a damaged database lost (see Open and recovery), after a crash as
//!    much as after a clean close. Not counted: records appended but never
//!    committed before a crash or power cut (their appends never resolved
//!    `Ok`; in `batch` mode that is at most `flush_interval` of records).
//! 3. **Removal only by:** an ack, the `max_bytes` bound, the record being
//!    undecodable, or, during a disk fault, the retain limit. Reading never
//!    removes.
//! 4. **Durable before acknowledged.** `append` resolves `Ok(seq)` only after
//!    a commit covering the record: sled's flush, then `fdatasync` of sled's
//!    `db` file (and `fsync` of new blob files), then the ledger written and
//!    `fdatasync`'ed (see Write path: sled's own flush is not an fsync).
//!    `durable_seq` is the highest seq assigned before the last successful
//!    commit.
//! 5. **One writer.** All mutations happen on the writer thread, in the order
//!    the messages were sent. Reads run on the reader thread (or the
//!    caller's, for [`OutboxReader::read`]) and never fsync; sled may write
//!    on a read (see `reader.rs`), which is why the Link reads through
//!    [`OutboxReader::read_async`].
//! 6. **No read skips ahead.** A read returns no seq above `written_seq` (the
//!    last seq the writer finished with), so resuming from the last returned
//!    seq + 1 never passes over a record still being written. A read that
//!    cannot be served (the database is being reopened) is an error, never an
//!    empty result.
//! 7. **Bounded.** After every append, `bytes <= max_bytes` (oldest heartbeat
//!    dropped first, then oldest event), except during a disk fault, when
//!    nothing can be removed from disk and what is kept in memory has its own
//!    limit (min(`max_bytes`, 4 MiB)); the bound applies again as soon as
//!    the fault ends. `bytes` is logical: Σ (8 + value length); sled's files
//!    are larger (log, page overhead).
//! 8. **No panics on bad data.** A value that does not decode is a typed
//!    [`RecordError`]; a ledger slot that does not check out is ignored;
//!    sled corruption at open, including a panic inside sled while opening
//!    or scanning (sled 0.34.7 panics on some damaged files), moves the
//!    database aside. The agent's exit-on-panic hook asks
//!    [`panic_is_caught`] and lets such a panic unwind to the outbox.
//! 9. **A full disk is survived.** sled's I/O error is sticky; the writer
//!    reopens the database with back-off once the disk has room again,
//!    without a restart; meanwhile heartbeats are shed and events kept in
//!    memory, and `dropped` keeps counting (the ledger is rewritten in place,
//!    which works on a full disk).
//! 10. **Closed means let go.** When [`OutboxHandle::shutdown`] returns,
//!     nothing in this process holds the state_dir: the writer has made its
//!     last commit, taken the database out of the readers' reach (waiting
//!     for reads in progress; later reads fail with
//!     [`OutboxError::Closed`]), closed it and waited until sled let go of
//!     its files, and `outbox.lock` is unlocked. So the state_dir can be
//!     opened again at once, by this process or another. Two things would
//!     otherwise keep a lock held after the close, for an unbounded moment:
//!     sled's thread pool, which finishes log writes and truncations after
//!     the last `Db` handle is gone, and a process forked meanwhile by any
//!     thread (it holds copies of our descriptors, and with them the flocks,
//!     until it execs); see `lock.rs`. The same holds when the writer closes
//!     the database to reopen it after a disk fault.
//!
//! # On-disk format
//!
//! ```text
//! <state_dir>/
//!   outbox.lock              empty; flock'd while an outbox is open on this state_dir,
//!                            unlocked explicitly (LOCK_UN) when it closes
//!   seq.floor                17 bytes: 0x02, then R and the epoch, each u64 big-endian;
//!                            every seq ever assigned in this epoch is < R. Replaced
//!                            atomically: seq.floor.tmp, fsync, rename, fsync the
//!                            directory. A 9-byte version-1 file (0x01, then R) is read
//!                            as epoch 0 and rewritten as version 2 at the next raise.
//!   outbox.ledger            256 bytes: two 128-byte slots, rewritten in place and
//!                            fdatasync'ed after every commit (layout in ledger.rs):
//!                            commit number, next_seq, depth, bytes, live_from,
//!                            dropped, unsaved, handed_out, clean flag, checksum.
//!   outbox.closed            legacy (builds before the ledger): 33 bytes, 0x01, then
//!                            next_seq, depth, bytes, dropped at a clean close. Checked
//!                            like a ledger at the first open, then removed.
//!   outbox/                  sled 0.34 database (conf, db, blobs/, snap.*)
//!     tree "chunks.heartbeats"  key: chunk key, u64 big-endian (8 bytes)   value: chunk:
//!     tree "chunks.events"         up to 256 records of the class (~6 KiB of values),
//!                                  each (seq, length, record value), CRC-32 (chunk.rs);
//!                                  the key is the seq of its first record when created
//!     tree "chunks.removed"  key: class byte, chunk key   value: which of the chunk's
//!                            records were removed since it was written, and the
//!                            chunk's CRC (chunk.rs); see store.rs for the rules
//!     tree "heartbeats"      builds before chunks: key seq (8 bytes), value record;
//!     tree "events"          moved into chunks at the first open, then empty
//!     tree "meta"            key: "next_seq"  value: 0x01, u64 BE: the seq the next append gets
//!                            key: "dropped"   value: 0x01, u64 BE: records dropped, ever
//!                            key: "clean"     value: 0x01, u64 BE: 1 = last run closed cleanly
//!                            key: "commit"    value: 0x01, u64 BE: the commit number; the
//!                                             ledger names the commit it describes
//!                            key: "saved/<name>"  value: 0x01, then the owner's bytes: a
//!                                             saved value (see Saved values); "saved/relays"
//!                                             is the Relay's (agent/saved_relays.rs)
//!   outbox.corrupt-<unix secs>[-n]/   a database that could not be used, kept for inspection
//!
//! record value (at most 1 MiB):
//!   +------+----------------------------------------------------------------+
//!   | 0x01 | bincode 2.0.1, config::standard() (little-endian, varints):    |
//!   |      |   seq u64 | ts_ms u64 | class u8 (0 heartbeat, 1 event)        |
//!   |      |   | qos u8 (1, 2) | retain bool | topic str | payload [u8]       |
//!   +------+----------------------------------------------------------------+
//!   decoding checks: version byte, size limit, no trailing bytes, body seq ==
//!   the seq it is stored under, body class == tree, qos is 1 or 2.
//! ```
//!
//! Heartbeats and events live in separate trees so the bound can find the
//! oldest heartbeat without scanning; keys are big-endian so tree order is
//! seq order; reads merge the two classes by seq. Records are grouped into
//! chunks so that a commit costs sled one op per chunk, not per record; the
//! store keeps a compact index of them in memory (`store.rs`, `index.rs`).
//!
//! # Write path
//!
//! [`OutboxHandle::append`] sends the [`Draft`] to the writer thread over a
//! channel (at call time, not at first poll: call order is seq order) and
//! returns a future on a oneshot. The writer takes one message, then drains
//! everything queued (up to 4096) into a *group*. For each append it raises
//! `R` if needed, assigns the seq, calls `draft.payload(seq)`, encodes,
//! inserts it (into the store's chunk of its class) and applies the bound. Then it *commits*:
//!
//! * `durability = "always"`: one commit for the whole group, then every
//!   waiter is resolved;
//! * `durability = "batch"`: one commit once `flush_interval` has passed
//!   since the first uncommitted change (the writer waits on its channel
//!   with that deadline), then waiters resolve.
//!
//! A commit writes the meta values (`next_seq`, `dropped`, `commit` + 1,
//! `clean`), calls sled's `Db::flush` (each log write of our vendored sled
//! ends in `fdatasync`; upstream's ends in `sync_file_range`, which flushes
//! neither the file's metadata nor the device's write cache:
//! `vendor/sled/PATCHED.md`, patch 4), `fsync`s blob files sled wrote
//! since the last commit (upstream never syncs them,
//! `pagecache/blob_io.rs:65-95`), announces the group, then writes and
//! `fdatasync`s the ledger. The test
//! `always_mode_fdatasyncs_the_database_and_the_ledger_for_every_group`
//! runs 10 awaited `always` appends under `strace -f -y` and finds 10
//! `fdatasync`s of `outbox/db` and 10 of `outbox.ledger`.
//!
//! *Urgent appends.* [`OutboxHandle::append_urgent`] (a record a command
//! waits on) makes the writer commit at the end of its group in `batch`
//! mode too; whatever else is in the group rides along, and the
//! `flush_interval` timer goes on for groups without one.
//!
//! [`OutboxHandle::flush`] and [`OutboxHandle::shutdown`] force a commit.
//! After each successful commit that moves `durable_seq`, the `on_durable`
//! callback runs on the writer thread, before the waiters are resolved.
//!
//! [`OutboxHandle::record`] appends without a reply (a button edge): the
//! writer logs a failure itself, and nothing per record waits on a oneshot.
//! The writer's channel has no bound; a producer that can outrun it (the
//! GPIO backends' edges) takes a [`Credit`] from its [`Credits`] on its own
//! thread first and sends it with the draft ([`Draft::credit`]): the writer
//! gives it back once the record is stored, kept or dropped, so at most
//! [`CREDITS`] of that producer's records wait in memory and the rest wait
//! at their source.
//!
//! # Fresh records
//!
//! The writer keeps the [`Record`]s it stored since the last commit (moved,
//! not copied: they are the records it encoded), up to
//! [`FRESH_MAX_RECORDS`] and [`FRESH_MAX_BYTES`]. A callback installed with
//! [`OutboxHandle::set_on_durable_with_records`] gets them with the new
//! `durable_seq`, as a [`Fresh`] batch that is *complete* for its range:
//! every record stored with `from <= seq <= upto`, the ones the bound
//! removed before the commit left out, exactly what a read of that range
//! would return. So the Link publishes new records without reading them back
//! (no reader-thread round trip, no decoding); a batch that hit the bound
//! ends at its last record, and the Link reads the rest. After a disk fault,
//! and at the first commit after open, there is no batch (what the commit
//! covers is then decided by a reopen or by the database): the Link reads.
//!
//! When its channel is empty, what it stored or removed is committed (the
//! commit is where chunks are encoded and handed to sled) and a burst is
//! over or has run long (`trim.rs`: every 20,000 records, or 500 ms
//! without a message after at least 1,000), the writer calls glibc's
//! `malloc_trim`, so the agent's memory does not stay at the burst's peak
//! (`memtrim.rs`).
//!
//! # Saved values
//!
//! An owner may keep one small value per name in the database beside the
//! records ([`Saved`]: the Relay keeps its saved relay state there), so that
//! the value and the record it belongs to are made durable by the same
//! commit: [`OutboxHandle::append_urgent`] carries the value with the
//! record (written just before the record, in the same group),
//! [`OutboxHandle::save`] sends it alone (durable at the end of the group in
//! `always` mode or when urgent, else with the next commit).
//! [`OutboxReader::saved`] reads it back. The writer keeps each value
//! written since the last commit in memory, writes it again after a reopen
//! (a disk fault), and loses it, logged, only if the process stops while the
//! disk still cannot be written. A database moved aside as corrupt keeps its
//! saved values: salvage reads them with the records, and open writes them
//! into the fresh database.
//!
//! # Disk faults
//!
//! Any failed write, removal or commit starts a *disk fault* (one ERROR line,
//! `OUTBOX DISK FAULT`): sled keeps the first I/O error of its log and
//! returns it from every later write (`pagecache/iobuf.rs:1184-1195`), so
//! only a new `Db` can write again. During the fault:
//!
//! * every waiter hears at once that its record is not durable: appends
//!   stored but not committed, and new events, get
//!   [`OutboxError::KeptInMemory`] (the record is kept and written later; a
//!   caller holding its mailbox on an append is never stuck); new heartbeats
//!   get [`OutboxError::Shed`] and are counted as dropped;
//! * the writer keeps in memory every record written since the last commit
//!   and every new event (up to min(`max_bytes`, 4 MiB); over that, the
//!   oldest kept heartbeat goes first, then the oldest kept event, counted),
//!   and every removal (acks keep coming while the Link delivers what the
//!   old database can still read);
//! * the ledger is rewritten (in place: no new blocks) with `dropped`,
//!   `unsaved` (records only in memory) and `handed_out`;
//! * once the state_dir's filesystem has 1 MiB free (`statvfs`; sled needs
//!   room for a new 512 KiB segment to open), the writer closes the database
//!   (readers wait on a lock meanwhile, and see the new database afterwards),
//!   opens it again, counts what it lost against the ledger, redoes the
//!   removals, writes back what it kept, raises the floor if needed, commits
//!   and applies the bound: one WARN line (`the disk can be written again`).
//!   Free space is checked every max(`flush_interval`, 100 ms); a failed
//!   reopen backs off from that interval, doubling to 30 s (readers wait at
//!   most 5 s, and a read still running then postpones the reopen); an
//!   [`OutboxHandle::flush`] tries at once.
//!
//! A shutdown during a fault tries one last reopen; what it still cannot
//! write is counted as dropped (ERROR line). A crash during a fault loses
//! what was kept in memory; the next open counts it from the ledger's
//! `unsaved`.
//!
//! # Read path
//!
//! [`OutboxReader::read_async`] queues the read to the outbox reader thread
//! (`fieldlink-outbox-read`, one per open, reads in call order; it runs
//! only while there are reads and ends after 2 s without one) and returns
//! a future; [`OutboxReader::read`] does the same read on the caller's
//! thread (tests, benches). A read takes the database's read lock, reads both
//! classes (the chunks it needs, or records not yet flushed, from the
//! store's memory), merges by seq, decodes. A record that does not decode is skipped
//! and logged, and its seq is sent to the writer, which removes it and counts
//! it as dropped.
//!
//! # Ack path
//!
//! [`OutboxHandle::ack`] sends seqs to the writer, which removes them (a seq
//! already gone is a no-op). Removals are not committed on their own: they
//! ride on the next commit, at most `flush_interval` later. An ack lost to a
//! power cut means a resend, which `(device, epoch, seq)` deduplicates.
//!
//! # Open and recovery
//!
//! [`open`] creates the state_dir, takes `outbox.lock` (held: "is another
//! fieldlink agent running ...?", nothing is moved), opens sled with
//! `flush_every_ms(None)` (we own every fsync) and an 8 MiB cache, reads the
//! meta values, the floor and the ledger, reads every chunk into the index
//! (moving an earlier build's per-record trees into chunks), counts both
//! classes for depth and bytes, and decodes the head record of each class.
//! sled `Corruption`/`Unsupported`/`ReportableBug` or a panic (while opening
//! or scanning), a chunk that does not check out (`store.rs`), an
//! undecodable meta value or head record, or a database that
//! has lost its meta values although `seq.floor` or the ledger shows it was
//! used: the directory is renamed to `outbox.corrupt-<secs>`, an ERROR line
//! (`OUTBOX CORRUPT`) is logged, and a fresh database is opened.
//!
//! *Salvage.* sled then opens the database moved aside once more (its panic
//! caught) and reads the chunks of both classes (and the per-record trees of
//! an earlier build) up to the first error; a chunk that does not check
//! out counts its records as undecodable. Records that
//! decode and were not acked (seq >= the ledger's `live_from`) are replayed
//! into the fresh database, in their original order, under new outbox seqs
//! from `next_seq` on (so after every seq of the old database: the outbox
//! key and the record's `seq` are the new one), with their payload bytes
//! unchanged: the `seq` (and epoch) inside each payload, which the hub uses
//! to identify a message, stays the original. So a replayed message is
//! deduplicated by the hub if it got there before, and on the wire it is
//! sent before anything recorded after the open; a hub ordering by the
//! payload's seq sees it in its original place. (A database that has to be
//! moved aside while the writer reopens it after a disk fault is salvaged the
//! same way; its replayed records then come after the ones kept in memory.)
//!
//! *The ledger check.* The ledger names the commit it describes, and every
//! commit also writes that number into the database (`commit` meta value),
//! synced before the ledger. A database whose `commit` is below the ledger's
//! went back to an older state: sled opens a `db` file that lost its tail
//! (truncated, overwritten, after a crash or not) that way, without an
//! error, and a deleted `outbox/` opens as an empty one. Then the records
//! missing are the ledger's `depth` minus the records found with seq >=
//! `live_from` (for a database moved aside: minus those salvaged); they are
//! logged at ERROR (`N records lost from a damaged outbox`) and counted in
//! `dropped`, which the next heartbeat reports. This is exact when acks came
//! in seq order (as the Link sends them) and a lower bound otherwise (a
//! record acked out of order that the older state still holds is found, not
//! missed; it is sent again and deduplicated). Records the ledger's
//! `unsaved` says were only in memory during a disk fault, minus any found
//! with seq >= its `next_seq`, are counted too. Without a ledger (a new
//! state_dir, or an unreadable one: ERROR line) nothing can be checked; a
//! database moved aside then counts only its undecodable records, and says
//! when it could not be read in full. `dropped` never goes below the larger
//! of the database's and the ledger's.
//!
//! *Where seqs resume:* `max(meta next_seq, highest stored key + 1, the
//! ledger's next_seq and handed_out)`, and at `R` too unless the previous run
//! closed cleanly (its final commit set `clean`) and the database is neither
//! behind the ledger nor replaced. So after a crash, damage or a move-aside,
//! seqs jump to `R` and can never repeat one that was handed out but not yet
//! durable; after a clean shutdown they continue without a gap. Open then
//! commits what it decided: `clean` cleared (a crash from now on resumes at
//! the floor), the counts, a new ledger entry; a legacy `outbox.closed` is
//! removed after it was checked.
//!
//! # Epoch
//!
//! The epoch names the numbering the seqs belong to: the hub identifies a
//! message by `(device, epoch, seq)`. It is stored with `R` in `seq.floor`
//! and fixed for the life of the state_dir. A new state_dir, or one whose
//! `seq.floor` is missing or unreadable, gets a new epoch: the current unix
//! time in milliseconds (a random one if the clock says before 2020, as a Pi
//! without a real-time clock may before NTP), written at open; a WARN line
//! says so unless it is a first start. Without it, a lost floor would let
//! seqs restart below ones the hub already has, and the hub would discard
//! new messages as duplicates. A version-1 floor (before epochs) is epoch 0,
//! so existing deployments keep their identity. [`OutboxHandle::epoch`] and
//! [`OpenReport::epoch`] expose it.

mod chunk;
mod credit;
mod fault;
mod fresh;
mod index;
mod ledger;
mod ledger_sync;
mod lock;
mod open;
mod panics;
mod reader;
mod record;
mod salvage;
mod store;
mod trim;
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

pub use credit::{CREDITS, Credit, Credits};
pub use fresh::{FRESH_MAX_BYTES, FRESH_MAX_RECORDS, Fresh};
pub use ledger::LedgerError;
pub use open::{open, open_in_memory};
pub use panics::is_caught_here as panic_is_caught;
pub use reader::OutboxReader;
pub use record::{FORMAT_VERSION, MAX_RECORD_BYTES, RecordError};
pub use store::{MemStore, StoreError};
pub use writer::FLOOR_STEP;

use crate::proto::Qos;
use writer::{Msg, OnDurable};

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
    /// The producer's place on the way to the writer, if it took one
    /// ([`Credits`]): given back once the writer has stored, kept or
    /// dropped the record.
    pub credit: Option<Credit>,
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

/// A value the outbox keeps for its owner beside the records (the Relay's
/// saved state, see the module doc: Saved values). The outbox never looks
/// inside `bytes`; their format is the owner's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Which value: one per name, a later save replaces it.
    pub name: String,
    pub bytes: Vec<u8>,
}

impl Saved {
    /// Its key in the meta tree.
    pub(crate) fn meta_key(&self) -> String {
        saved_key(&self.name)
    }

    /// Its value in the meta tree: the version byte, then the owner's bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + self.bytes.len());
        v.push(SAVED_VERSION);
        v.extend_from_slice(&self.bytes);
        v
    }
}

/// The version byte of a saved value in the meta tree.
const SAVED_VERSION: u8 = 0x01;

fn saved_key(name: &str) -> String {
    format!("saved/{name}")
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
    /// The seq the next append gets: one above the last seq the writer has
    /// finished with, so `durable_seq + 1 == next_seq` means every record
    /// appended so far is durable.
    pub next_seq: u64,
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
    #[error("cannot start an outbox thread (the writer, or the reader for replay reads): {0}")]
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
        self.send_append(draft, false, Vec::new())
    }

    /// Like [`OutboxHandle::append`], for a record someone is waiting on (a
    /// command's confirmation): the writer commits at the end of its group
    /// even in `batch` mode, instead of waiting for `flush_interval`; what
    /// else is in the group (telemetry) rides along. `saved` (often none)
    /// is written just before the record, in the same group, so one commit
    /// makes them all durable (see the module doc: Saved values).
    pub fn append_urgent(
        &self,
        draft: Draft,
        saved: Vec<Saved>,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send + 'static {
        self.send_append(draft, true, saved)
    }

    fn send_append(
        &self,
        draft: Draft,
        urgent: bool,
        saved: Vec<Saved>,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.inner.send(Msg::Append { draft, reply: Some(reply), urgent, saved });
        async move {
            sent?;
            rx.await.map_err(|_| OutboxError::Closed)?
        }
    }

    /// Records `draft` without waiting for it: nothing resolves when it is
    /// durable, and a failure (the record dropped, or kept in memory during
    /// a disk fault) is logged by the writer. For producers that would only
    /// log the outcome anyway (a button edge): no oneshot, no future to poll
    /// per record. Seqs follow call order as with [`OutboxHandle::append`];
    /// fails at once only when the outbox is shut down.
    pub fn record(&self, draft: Draft) -> Result<(), OutboxError> {
        self.inner.send(Msg::Append { draft, reply: None, urgent: false, saved: Vec::new() })
    }

    /// Keeps `saved` in the outbox's database (each replacing the value of
    /// its name, all in the same commit); resolves once it is durable: at
    /// the end of the writer's group in `always` mode or when `urgent`, else
    /// with the next commit (at most `flush_interval` later). Ordered with appends: a save sent after an
    /// append is never durable without it.
    pub fn save(
        &self,
        saved: Vec<Saved>,
        urgent: bool,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.inner.send(Msg::Save { saved, urgent, reply });
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
            next_seq: s.written_seq.load(Ordering::Acquire).saturating_add(1),
        }
    }

    /// Installs the callback the writer calls (on its own thread, so keep it
    /// short) with the new `durable_seq` after each fsync that moved it,
    /// before the appends it covers resolve.
    pub fn set_on_durable(&self, f: Box<dyn Fn(u64) + Send>) {
        if let Err(e) = self.inner.send(Msg::OnDurable(OnDurable::Seq(f))) {
            tracing::debug!(error = %e, "outbox: on_durable set after shutdown ignored");
        }
    }

    /// Like [`OutboxHandle::set_on_durable`], and the callback also gets the
    /// records the commit made durable, when the writer still has them
    /// (see the module doc: Fresh records): whoever publishes them needs no
    /// read of the database for them. Replaces a callback set before.
    pub fn set_on_durable_with_records(&self, f: Box<dyn Fn(u64, Option<Fresh>) + Send>) {
        if let Err(e) = self.inner.send(Msg::OnDurable(OnDurable::WithRecords(f))) {
            tracing::debug!(error = %e, "outbox: on_durable set after shutdown ignored");
        }
    }

    /// Flushes and stops the writer thread, waiting for it (one fsync), and
    /// closes the database: when this returns, nothing in this process holds
    /// the state_dir any more (invariant 10), so it can be opened again at
    /// once. Later appends, flushes and reads fail with
    /// [`OutboxError::Closed`]. Safe to call more than once and from several
    /// clones (the first call waits; called from `on_durable`, it cannot
    /// wait for its own thread and returns at once).
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
