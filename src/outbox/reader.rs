//! The read path: replay reads for the Link. Owns merging the two class
//! trees into one seq-ordered stream, capping reads at what the writer has
//! finished writing, reporting records that do not decode, and the outbox
//! reader thread that runs [`OutboxReader::read_async`]. It must not mutate
//! the store or fsync: a corrupt record is handed to the writer for removal
//! (and counted there), and skipped here.
//!
//! # Why reads get their own thread
//!
//! A sled read is not a pure read (sled 0.34.7): a page that is not cached is
//! read from disk (`pagecache/mod.rs:1715`, `PageCache::get` pulls it); and
//! on the way down the tree a reader helps finish splits and merges and
//! splits or merges nodes itself (`tree.rs:1602-1770`, `view_for_key`), which
//! reserves log space (`pagecache/logger.rs:120`) and may write a blob file
//! synchronously (`pagecache/iobuf.rs:545`) or spin until a sealed log
//! buffer is written (`pagecache/logger.rs:241`). Sealed buffers are written
//! and `fdatasync`ed on sled's own thread pool (`iobuf.rs:1180-1190`),
//! and only `flush` waits for an fsync, which readers never call. So a read
//! can block on the disk and can write, but never fsyncs; the Link's thread
//! must do neither, hence [`OutboxReader::read_async`].

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread;
use std::time::Duration;

use super::record;
use super::store::{Store, StoreSlot};
use super::writer::Msg;
use super::{Class, HandleInner, OutboxError, Record, Shared};

/// A read queued for the reader thread.
type Job = Box<dyn FnOnce() + Send>;

/// How long the reader thread waits for another read before it ends.
const IDLE_EXIT: Duration = Duration::from_secs(2);

/// The outbox reader thread, shared by every clone of one [`OutboxReader`].
/// It runs only while there are reads: started by the first read queued
/// when it is not running, it runs the queue in order and ends after
/// [`IDLE_EXIT`] without one (issue #8: an idle agent keeps no thread that
/// nothing needs). It holds nothing between jobs, so it never keeps the
/// database open on its own.
pub(crate) struct ReadThread {
    queue: Mutex<ReadQueue>,
    wake: Condvar,
    /// The subscriber the thread logs to: the one current at open.
    dispatch: tracing::Dispatch,
}

struct ReadQueue {
    jobs: VecDeque<Job>,
    /// The thread exists (it runs the queue, or waits for it to grow).
    running: bool,
}

impl ReadThread {
    /// Prepares the thread (named `fieldlink-outbox-read`); it starts with
    /// the first read.
    pub(crate) fn start() -> std::io::Result<Arc<ReadThread>> {
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        Ok(Arc::new(ReadThread {
            queue: Mutex::new(ReadQueue { jobs: VecDeque::new(), running: false }),
            wake: Condvar::new(),
            dispatch,
        }))
    }

    fn run(self: &Arc<Self>, job: Job) -> Result<(), OutboxError> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.jobs.push_back(job);
        if q.running {
            // Busy (it takes the job next) or waiting (this wakes it).
            self.wake.notify_one();
            return Ok(());
        }
        let this = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name("fieldlink-outbox-read".to_string())
            .spawn(move || tracing::dispatcher::with_default(&this.dispatch.clone(), || this.work()));
        match spawned {
            Ok(_) => {
                q.running = true;
                Ok(())
            }
            Err(e) => {
                // Nobody else takes jobs while none runs: this one is ours.
                q.jobs.pop_back();
                Err(OutboxError::Spawn(e))
            }
        }
    }

    /// The thread: runs queued reads in order until none came for
    /// [`IDLE_EXIT`].
    fn work(&self) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(job) = q.jobs.pop_front() {
                drop(q);
                job();
                q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let (guard, waited) = self.wake.wait_timeout(q, IDLE_EXIT).unwrap_or_else(PoisonError::into_inner);
            q = guard;
            if waited.timed_out() && q.jobs.is_empty() {
                q.running = false;
                return;
            }
        }
    }
}

/// Reads records from the store. Cheap to clone; `Send + Sync`.
///
/// A reader holds the database only while a read runs: when the writer
/// stops ([`super::OutboxHandle::shutdown`]) it closes the database, waiting
/// for reads in progress, and later reads fail with [`OutboxError::Closed`].
/// So a reader (or a read queued on the reader thread) never keeps the
/// state_dir locked after a shutdown.
#[derive(Clone)]
pub struct OutboxReader {
    pub(crate) slot: Arc<StoreSlot>,
    pub(crate) shared: Arc<Shared>,
    /// To hand corrupt records to the writer. Weak, so that a reader alone
    /// does not keep the writer thread alive.
    pub(crate) writer: Weak<HandleInner>,
    pub(crate) thread: Arc<ReadThread>,
}

impl OutboxReader {
    /// Up to `limit` records with `from <= seq <= upto`, both classes merged,
    /// in seq order, read on the caller's thread (tests, benches, tools; the
    /// Link uses [`OutboxReader::read_async`]). Records that do not decode
    /// are skipped, logged and handed to the writer, which removes them and
    /// counts them as dropped.
    ///
    /// `upto` is capped at the last seq the writer has finished writing, so a
    /// read never returns a seq while a smaller one is still on its way in:
    /// resuming from the last returned seq + 1 skips nothing. To send only
    /// durable records, pass `upto = stats().durable_seq`.
    ///
    /// While the writer reopens the database after a disk fault this waits;
    /// while the reopen has not succeeded it fails with
    /// [`OutboxError::Unavailable`] (never an empty result, which would mean
    /// "nothing stored up to `upto`"). After the shutdown it fails with
    /// [`OutboxError::Closed`].
    pub fn read(&self, from: u64, upto: u64, limit: usize) -> Result<Vec<Record>, OutboxError> {
        let guard = self.slot.read();
        let Some(store) = guard.as_ref() else {
            // Shut down: the writer closed the database for good.
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(OutboxError::Closed);
            }
            return Err(OutboxError::Unavailable);
        };
        let upto = upto.min(self.shared.written_seq.load(Ordering::Acquire));
        let mut out = Vec::new();
        let mut cursor = from;
        while out.len() < limit && cursor <= upto {
            let want = limit - out.len();
            let heartbeats = store.range(Class::Heartbeat, cursor, upto, want).map_err(OutboxError::Read)?;
            let events = store.range(Class::Event, cursor, upto, want).map_err(OutboxError::Read)?;
            // Each class returned everything in range and all of it fits: this
            // pass reaches the end.
            let complete = heartbeats.len() + events.len() <= want && heartbeats.len() < want && events.len() < want;
            let merged = merge(heartbeats, events);
            let Some(&(last, _, _)) = merged.get(want.min(merged.len()).saturating_sub(1)) else {
                break;
            };
            for (seq, class, value) in merged.into_iter().take(want) {
                match record::decode(seq, class, &value) {
                    Ok(r) => out.push(r),
                    Err(e) => self.report_corrupt(seq, class, &e),
                }
            }
            if complete || last == u64::MAX {
                break;
            }
            cursor = last + 1;
        }
        Ok(out)
    }

    /// The value last saved under `name` ([`super::OutboxHandle::save`],
    /// [`super::OutboxHandle::append_urgent`]) that this database holds, on
    /// the caller's thread (the Relay reads it once, when it is created).
    /// Includes a value written but not yet committed, as reads of records
    /// do not; after a restart only what was committed (or what sled
    /// recovered of a commit a crash interrupted) is there.
    pub fn saved(&self, name: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        let guard = self.slot.read();
        let Some(store) = guard.as_ref() else {
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(OutboxError::Closed);
            }
            return Err(OutboxError::Unavailable);
        };
        let Some(value) = store.meta(&super::saved_key(name)).map_err(OutboxError::Read)? else {
            return Ok(None);
        };
        match value.split_first() {
            Some((&super::SAVED_VERSION, bytes)) => Ok(Some(bytes.to_vec())),
            _ => Err(OutboxError::Corrupt {
                dir: PathBuf::from("<outbox meta>"),
                reason: format!(
                    "saved value '{name}' starts with {:?}, not the version byte {}",
                    value.first(),
                    super::SAVED_VERSION
                ),
            }),
        }
    }

    /// [`OutboxReader::read`] on the outbox reader thread, never on the
    /// caller's (see the module doc: a sled read can block on the disk and
    /// write). Reads run one at a time, in call order. Resolves with what
    /// `read` returns; the future needs no runtime to be created.
    pub fn read_async(
        &self,
        from: u64,
        upto: u64,
        limit: usize,
    ) -> impl std::future::Future<Output = Result<Vec<Record>, OutboxError>> + Send + 'static {
        let reader = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self.thread.run(Box::new(move || {
            // The caller may have stopped waiting; nothing to do then.
            let _gone = tx.send(reader.read(from, upto, limit));
        }));
        async move {
            queued?;
            rx.await.unwrap_or(Err(OutboxError::Closed))
        }
    }

    /// The `ts_ms` of the oldest stored record, if any. Called from the
    /// status dump on an actor's thread, so it does not wait for a reopen in
    /// progress (`None` then).
    pub fn oldest_ts_ms(&self) -> Option<u64> {
        let guard = self.slot.try_read()?;
        let store: &dyn Store = guard.as_deref()?;
        [Class::Heartbeat, Class::Event]
            .into_iter()
            .filter_map(|class| match store.first(class) {
                Ok(Some((seq, value))) => match record::decode(seq, class, &value) {
                    Ok(r) => Some(r.ts_ms),
                    Err(e) => {
                        self.report_corrupt(seq, class, &e);
                        None
                    }
                },
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox: cannot read the oldest record");
                    None
                }
            })
            .min()
    }

    fn report_corrupt(&self, seq: u64, class: Class, error: &record::RecordError) {
        tracing::warn!(seq, ?class, %error, "outbox: skipping a record that does not decode");
        let sent = match self.writer.upgrade() {
            Some(writer) => writer.send(Msg::DropCorrupt { seq, reason: error.to_string() }),
            None => Err(OutboxError::Closed),
        };
        if sent.is_err() {
            // No writer to remove it: later reads skip it again, and the
            // next outbox opened on this state_dir removes it when read.
            tracing::debug!(seq, "outbox: writer stopped; the corrupt record stays for now");
        }
    }
}

/// Merges two seq-ordered runs into one.
fn merge(a: Vec<(u64, Vec<u8>)>, b: Vec<(u64, Vec<u8>)>) -> Vec<(u64, Class, Vec<u8>)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut a = a.into_iter().peekable();
    let mut b = b.into_iter().peekable();
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.0 < y.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let next = if take_a {
            a.next().map(|(s, v)| (s, Class::Heartbeat, v))
        } else {
            b.next().map(|(s, v)| (s, Class::Event, v))
        };
        out.extend(next);
    }
    out
}
