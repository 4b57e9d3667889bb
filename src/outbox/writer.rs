//! The writer thread: the one place that mutates the outbox. Owns seq
//! assignment and the seq floor, group commit and fsync, the `max_bytes`
//! bound, ack and corrupt-record removals, the meta values, and resolving the
//! waiters of `append` and `flush`.
//!
//! It must never stop because of a storage error: a failed insert is a
//! dropped record and an error for its waiter, a failed flush is an error for
//! the waiters of that group and a retry one `flush_interval` later. It must
//! not block on anything but its channel and the disk.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::record::{self, CloseSummary};
use super::store::{self, Store, StoreError};
use super::{Class, Draft, OutboxError, Record, Shared};
use crate::config::{Durability, OutboxConfig};
use crate::timefmt;

/// How far the seq floor is raised at a time: one floor write per this many
/// appends.
pub const FLOOR_STEP: u64 = 1_000_000;

/// The most messages taken into one group, so that a flood of appends cannot
/// hold the first waiter of a group back for long.
const MAX_GROUP: usize = 4096;

/// Retry back-off after a failed fsync: from max(flush_interval, this)...
const MIN_FLUSH_RETRY: Duration = Duration::from_millis(100);
/// ... doubling up to this.
const MAX_FLUSH_RETRY: Duration = Duration::from_secs(30);

/// What the handles and readers ask of the writer.
pub(crate) enum Msg {
    Append {
        draft: Draft,
        reply: oneshot::Sender<Result<u64, OutboxError>>,
    },
    Ack(Vec<u64>),
    /// A reader found a record it cannot decode.
    DropCorrupt {
        seq: u64,
        reason: String,
    },
    Flush(oneshot::Sender<Result<(), OutboxError>>),
    OnDurable(Box<dyn Fn(u64) + Send>),
    Shutdown,
}

/// The writer's state; [`Writer::run`] consumes it on its own thread.
pub(crate) struct Writer {
    pub store: Arc<dyn Store>,
    pub shared: Arc<Shared>,
    pub cfg: OutboxConfig,
    /// The seq the next append gets.
    pub next_seq: u64,
    /// The reservation `R`: no seq >= `floor` is assigned before `floor` is raised.
    pub floor: u64,
    /// Meta values not yet written to the store.
    pub meta_dirty: bool,
    /// Mutations not yet flushed, and when the first of them happened.
    pub dirty_since: Option<Instant>,
    /// Consecutive failed fsyncs, and when to try again (see `flush`).
    pub flush_failures: u32,
    pub retry_at: Option<Instant>,
    pub append_waiters: Vec<(u64, oneshot::Sender<Result<u64, OutboxError>>)>,
    pub flush_waiters: Vec<oneshot::Sender<Result<(), OutboxError>>>,
    pub on_durable: Option<Box<dyn Fn(u64) + Send>>,
}

impl Writer {
    /// The writer loop: take one message, drain what is queued behind it,
    /// apply the group, then flush if the group needs it. Returns when
    /// shut down or when every handle is gone, after a final flush.
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        // max_bytes may have shrunk since the last run.
        self.enforce_bound();
        let mut stop = false;
        while !stop {
            let first = match self.deadline() {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            match first {
                Ok(msg) => {
                    stop = self.handle(msg);
                    let mut taken = 1;
                    while !stop && taken < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(msg) => stop = self.handle(msg),
                            Err(_) => break,
                        }
                        taken += 1;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            self.write_meta();
            if stop || self.flush_due() {
                self.flush();
            }
        }
        self.close();
    }

    /// Applies one message; `true` means stop after this group.
    fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Append { draft, reply } => self.append(draft, reply),
            Msg::Ack(seqs) => {
                for seq in seqs {
                    self.remove(seq, "ack");
                }
            }
            Msg::DropCorrupt { seq, reason } => {
                if self.remove(seq, "corrupt") {
                    self.count_dropped();
                    tracing::error!(seq, %reason, "outbox: removed a record that does not decode; counted as dropped");
                }
            }
            Msg::Flush(reply) => self.flush_waiters.push(reply),
            Msg::OnDurable(f) => self.on_durable = Some(f),
            Msg::Shutdown => return true,
        }
        false
    }

    fn append(&mut self, draft: Draft, reply: oneshot::Sender<Result<u64, OutboxError>>) {
        let result = self.try_append(draft);
        // Every seq assigned so far is now stored or dropped: readers may see it.
        self.shared.written_seq.store(self.next_seq - 1, Ordering::Release);
        match result {
            Ok(seq) => self.append_waiters.push((seq, reply)),
            Err(e) => {
                self.count_dropped();
                // The appender may have given up waiting; the drop is counted either way.
                let _gone = reply.send(Err(e));
            }
        }
    }

    /// Assigns a seq, builds and stores the record, applies the bound.
    fn try_append(&mut self, draft: Draft) -> Result<u64, OutboxError> {
        if self.next_seq >= self.floor {
            let r = self.next_seq.max(self.floor).saturating_add(FLOOR_STEP);
            self.store.set_floor(r).map_err(|e| {
                tracing::error!(error = %e, "outbox: cannot raise the seq floor; record dropped");
                OutboxError::Floor(Arc::new(e))
            })?;
            self.floor = r;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.meta_dirty = true;
        self.mark_dirty();
        // From here on `seq` is spent: every outcome below stores it or counts a drop.

        let Draft { topic, qos, retain, class, ts, payload } = draft;
        let payload = catch_unwind(AssertUnwindSafe(move || payload(seq))).map_err(|_| {
            tracing::error!(seq, %topic, "outbox: the payload builder panicked; record dropped");
            OutboxError::PayloadPanicked { seq }
        })?;
        let record = Record { seq, ts_ms: timefmt::to_millis(ts), class, qos, retain, topic, payload };
        let value = record::encode(&record).map_err(|source| OutboxError::Encode { seq, source })?;
        let size = store::stored_size(value.len());
        if size > self.cfg.max_bytes {
            return Err(OutboxError::TooLarge { seq, size, max: self.cfg.max_bytes });
        }
        self.store.insert(class, seq, &value).map_err(|e| {
            tracing::error!(seq, error = %e, "outbox: insert failed (disk full?); record dropped");
            OutboxError::Insert { seq, source: Arc::new(e) }
        })?;
        self.shared.depth.fetch_add(1, Ordering::Relaxed);
        self.shared.bytes.fetch_add(size, Ordering::Relaxed);
        self.enforce_bound();
        Ok(seq)
    }

    /// While over `max_bytes`: drop the oldest heartbeat, else the oldest event.
    fn enforce_bound(&mut self) {
        while self.shared.bytes.load(Ordering::Relaxed) > self.cfg.max_bytes {
            let oldest = match self.store.first(Class::Heartbeat) {
                Ok(Some(hb)) => Ok(Some(hb)),
                Ok(None) => self.store.first(Class::Event),
                Err(e) => Err(e),
            };
            let seq = match oldest {
                Ok(Some((seq, _))) => seq,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "outbox: cannot find the oldest record to drop");
                    break;
                }
            };
            if !self.remove(seq, "bound") {
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

    /// Removes `seq` if it is stored; `true` if it was. Absent seqs (already
    /// acked or dropped) are a no-op.
    fn remove(&mut self, seq: u64, why: &'static str) -> bool {
        match self.store.remove(seq) {
            Ok(Some((_class, size))) => {
                self.shared.depth.fetch_sub(1, Ordering::Relaxed);
                self.shared.bytes.fetch_sub(size, Ordering::Relaxed);
                self.mark_dirty();
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(seq, why, error = %e, "outbox: cannot remove a record");
                false
            }
        }
    }

    fn count_dropped(&mut self) {
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        self.meta_dirty = true;
        self.mark_dirty();
    }

    fn mark_dirty(&mut self) {
        if self.dirty_since.is_none() {
            self.dirty_since = Some(Instant::now());
        }
    }

    /// When the pending mutations must be flushed at the latest.
    fn deadline(&self) -> Option<Instant> {
        self.retry_at.or_else(|| self.dirty_since.map(|t| t + self.cfg.flush_interval))
    }

    fn flush_due(&self) -> bool {
        !self.flush_waiters.is_empty()
            || (self.cfg.durability == Durability::Always && !self.append_waiters.is_empty())
            || self.deadline().is_some_and(|at| at <= Instant::now())
    }

    fn write_meta(&mut self) {
        if !self.meta_dirty {
            return;
        }
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        let result = self
            .store
            .set_meta(store::META_NEXT_SEQ, &record::encode_u64(self.next_seq))
            .and_then(|()| self.store.set_meta(store::META_DROPPED, &record::encode_u64(dropped)));
        match result {
            Ok(()) => self.meta_dirty = false,
            // Kept dirty: retried with the next group. The seq floor still
            // protects seq uniqueness meanwhile.
            Err(e) => tracing::warn!(error = %e, "outbox: cannot write meta values"),
        }
    }

    /// Flushes if anything is pending, then resolves every waiter.
    fn flush(&mut self) {
        if self.dirty_since.is_none() {
            self.resolve(Ok(()));
            return;
        }
        match self.store.flush() {
            Ok(()) => {
                if self.flush_failures > 0 {
                    tracing::info!(failures = self.flush_failures, "outbox: flush works again");
                }
                self.flush_failures = 0;
                self.retry_at = None;
                self.dirty_since = if self.meta_dirty { Some(Instant::now()) } else { None };
                let durable = self.next_seq - 1;
                let before = self.shared.durable_seq.swap(durable, Ordering::AcqRel);
                // Before the waiters: whoever sees an append resolve can rely
                // on on_durable having seen its seq.
                if durable > before
                    && let Some(f) = &self.on_durable
                    && catch_unwind(AssertUnwindSafe(|| f(durable))).is_err()
                {
                    tracing::error!(durable, "outbox: the on_durable callback panicked");
                }
                self.resolve(Ok(()));
            }
            Err(e) => {
                // Back-off: max(flush_interval, 100 ms), doubling per
                // consecutive failure, capped at 30 s. Appends in `always`
                // mode still try at once, so their waiters hear promptly.
                let base = self.cfg.flush_interval.max(MIN_FLUSH_RETRY);
                let retry_in = base.saturating_mul(1 << self.flush_failures.min(16)).min(MAX_FLUSH_RETRY);
                self.flush_failures = self.flush_failures.saturating_add(1);
                self.retry_at = Some(Instant::now() + retry_in);
                tracing::error!(
                    error = %e,
                    failures = self.flush_failures,
                    ?retry_in,
                    "outbox: flush (fsync) failed; waiters get an error, retrying"
                );
                self.resolve(Err(Arc::new(e)));
            }
        }
    }

    fn resolve(&mut self, result: Result<(), Arc<StoreError>>) {
        for (seq, reply) in self.append_waiters.drain(..) {
            let r = match &result {
                Ok(()) => Ok(seq),
                Err(e) => Err(OutboxError::Flush(e.clone())),
            };
            // The appender may have given up waiting; the record is stored regardless.
            let _gone = reply.send(r);
        }
        for reply in self.flush_waiters.drain(..) {
            let r = result.clone().map_err(OutboxError::Flush);
            // The caller may have given up waiting.
            let _gone = reply.send(r);
        }
    }

    /// After the final flush: mark the shutdown clean, so the next open can
    /// trust `next_seq` instead of jumping to the floor; then write the close
    /// summary outside the database, so the next open can tell whether the
    /// database lost records since.
    fn close(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        if self.dirty_since.is_some() || self.meta_dirty {
            tracing::warn!("outbox: closing with unflushed changes; the next open starts seqs at the floor");
            return;
        }
        let marked = self.store.set_meta(store::META_CLEAN, &record::encode_u64(1)).and_then(|()| self.store.flush());
        if let Err(e) = marked {
            tracing::warn!(error = %e, "outbox: cannot mark the shutdown clean");
            return;
        }
        let summary = CloseSummary {
            next_seq: self.next_seq,
            depth: self.shared.depth.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
        };
        match self.store.set_close_summary(&summary) {
            Ok(()) => tracing::debug!(next_seq = self.next_seq, depth = summary.depth, "outbox: closed cleanly"),
            Err(e) => tracing::warn!(
                error = %e,
                "outbox: closed cleanly but cannot write the close summary; \
                 the next open cannot check whether records were lost meanwhile"
            ),
        }
    }
}
