//! The ledger's write behind a commit: after sled has made a group commit
//! durable, the writer hands the ledger entry that describes it to a
//! thread of its own, which writes and fdatasyncs it while the writer goes
//! on with the next group. Owns that thread (started when an entry comes,
//! gone after [`IDLE`] without one), coalescing (only the newest entry
//! waiting is written: an older one says less), the first failure (kept
//! until the writer takes it) and waiting until the file is up to date.
//!
//! Why: a command's confirmation needs its record durable, which is sled's
//! one fdatasync; the ledger's fdatasync only lets a later open tell a
//! database that went back to an older state from an up-to-date one. Done
//! on the writer's thread it made back-to-back commands wait for it (about
//! 0.36 ms each on the session 4 VM, issue #8). On disk, the ledger is
//! never ahead of the database (an entry is handed over only once sled
//! has it) and at most the entries still waiting here behind it, which
//! `open` takes as up to date (`rolled_back` is `meta_commit <
//! ledger.commit`).
//!
//! It must not decide what an entry says (the writer does) nor what a
//! failure means (the writer enters a disk fault when it takes one), and it
//! must never write an entry out of order: the writer writes the file
//! itself only after [`LedgerSync::drain`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::ledger::Ledger;
use super::store::{Side, StoreError};

/// How long the thread waits for the next entry before it ends: long
/// enough for commands back to back, short enough that an idle agent has
/// no extra thread (a lone heartbeat's commit writes its ledger entry on
/// the writer's thread and starts none: `Writer::commit_and_resolve`).
pub(crate) const IDLE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    /// The newest entry not yet taken by the thread.
    waiting: Option<Ledger>,
    /// The thread is writing an entry now.
    writing: bool,
    /// A thread is alive (waiting or writing).
    running: bool,
    /// The first failure not yet taken by the writer.
    failed: Option<StoreError>,
}

struct Inner {
    side: Arc<dyn Side>,
    state: Mutex<State>,
    /// Signals a new entry to the thread and a finished write to `drain`.
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned state is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The thread: write what waits, newest first, until nothing has come
    /// for [`IDLE`].
    fn run(&self) {
        let mut st = self.lock();
        loop {
            match st.waiting.take() {
                Some(entry) => {
                    st.writing = true;
                    drop(st);
                    let written = self.side.set_ledger(&entry);
                    st = self.lock();
                    st.writing = false;
                    if let Err(e) = written
                        && st.failed.is_none()
                    {
                        st.failed = Some(e);
                    }
                    self.changed.notify_all();
                }
                None => {
                    let (next, timeout) = self.changed.wait_timeout(st, IDLE).unwrap_or_else(PoisonError::into_inner);
                    st = next;
                    if timeout.timed_out() && st.waiting.is_none() {
                        st.running = false;
                        self.changed.notify_all();
                        return;
                    }
                }
            }
        }
    }
}

/// Writes ledger entries behind the writer (see the module doc).
pub(crate) struct LedgerSync {
    inner: Arc<Inner>,
}

impl LedgerSync {
    pub(crate) fn new(side: Arc<dyn Side>) -> LedgerSync {
        LedgerSync { inner: Arc::new(Inner { side, state: Mutex::new(State::default()), changed: Condvar::new() }) }
    }

    /// Hands `entry` over to be written and fdatasync'ed; replaces an
    /// older one still waiting. If no thread can be started, writes it here.
    pub(crate) fn submit(&self, entry: Ledger) {
        let mut st = self.inner.lock();
        st.waiting = Some(entry);
        if st.running {
            self.inner.changed.notify_all();
            return;
        }
        let inner = self.inner.clone();
        match std::thread::Builder::new().name("outbox-ledger".into()).spawn(move || inner.run()) {
            Ok(_detached) => st.running = true,
            Err(e) => {
                tracing::debug!(error = %e, "outbox: cannot start the ledger thread; writing the ledger inline");
                let entry = st.waiting.take();
                drop(st);
                if let Some(entry) = entry
                    && let Err(e) = self.inner.side.set_ledger(&entry)
                {
                    let mut st = self.inner.lock();
                    st.failed.get_or_insert(e);
                }
            }
        }
    }

    /// Whether the thread is up (an entry came less than [`IDLE`] ago).
    pub(crate) fn running(&self) -> bool {
        self.inner.lock().running
    }

    /// The first failure since the last call, if any.
    pub(crate) fn take_failure(&self) -> Option<StoreError> {
        self.inner.lock().failed.take()
    }

    /// Waits until every entry handed over is written (or failed); then the
    /// caller may write the file itself. Returns the first failure not yet
    /// taken.
    pub(crate) fn drain(&self) -> Option<StoreError> {
        let mut st = self.inner.lock();
        while st.running && (st.waiting.is_some() || st.writing) {
            st = self.inner.changed.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.failed.take()
    }
}

impl Drop for LedgerSync {
    /// The last entry handed over reaches the file before the outbox is gone.
    fn drop(&mut self) {
        if let Some(e) = self.drain() {
            tracing::warn!(error = %e, "outbox: the last ledger write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::store::MemStore;

    fn entry(write_no: u64) -> Ledger {
        Ledger { write_no, commit: write_no, next_seq: write_no + 1, ..Ledger::default() }
    }

    #[test]
    fn the_newest_entry_handed_over_is_on_file_after_a_drain() {
        let side = Arc::new(MemStore::new());
        let sync = LedgerSync::new(side.clone());
        for n in 1..=50 {
            sync.submit(entry(n));
        }
        assert!(sync.drain().is_none());
        assert_eq!(side.ledger().expect("reads").map(|l| l.write_no), Some(50));
    }

    #[test]
    fn a_failed_ledger_write_reaches_the_writer_once() {
        let side = Arc::new(MemStore::new());
        side.set_fail_ledger(true);
        let sync = LedgerSync::new(side.clone());
        sync.submit(entry(1));
        assert!(sync.drain().is_some(), "the failure is reported");
        assert!(sync.take_failure().is_none(), "and only once");
        side.set_fail_ledger(false);
        sync.submit(entry(2));
        assert!(sync.drain().is_none());
        assert_eq!(side.ledger().expect("reads").map(|l| l.write_no), Some(2));
    }

    #[test]
    fn the_thread_ends_when_no_entry_comes_and_a_new_one_starts_for_the_next() {
        let side = Arc::new(MemStore::new());
        let sync = LedgerSync::new(side.clone());
        sync.submit(entry(1));
        assert!(sync.drain().is_none());
        // Wait (no deadline asserted) until the thread has ended by itself.
        while sync.inner.lock().running {
            std::thread::sleep(IDLE / 4);
        }
        sync.submit(entry(2));
        assert!(sync.inner.lock().running || side.ledger().expect("reads").map(|l| l.write_no) == Some(2));
        assert!(sync.drain().is_none());
        assert_eq!(side.ledger().expect("reads").map(|l| l.write_no), Some(2));
    }

    #[test]
    fn dropping_it_writes_what_was_handed_over() {
        let side = Arc::new(MemStore::new());
        let sync = LedgerSync::new(side.clone());
        sync.submit(entry(7));
        drop(sync);
        assert_eq!(side.ledger().expect("reads").map(|l| l.write_no), Some(7));
    }
}
