//! The outbox's file locks. Owns `<state_dir>/outbox.lock` ([`StateDirLock`]:
//! taking it, and letting go of it so that nothing in this process keeps it
//! held after the outbox closed) and [`wait_until_unlocked`], which tells
//! when sled has let go of the flock on its own `db` file. It must not know
//! about sled's API or the queue: it sees files and flocks only.
//!
//! # Why letting go takes care
//!
//! A flock belongs to an *open file description*, not to a descriptor, and
//! is released by an explicit `LOCK_UN` through any descriptor of it, or
//! when the last descriptor of it is closed (flock(2)). A process forked by
//! any thread of ours (`std::process::Command` forks, then the child execs)
//! holds a copy of every descriptor we have open until its `exec` closes
//! them: they are all close-on-exec, but fork and exec are two steps, and a
//! child on a loaded machine can take milliseconds between them. Closing our
//! descriptor in that window leaves the lock held by the child's copy, so a
//! reopen of the same state_dir in this process failed with "locked" (seen
//! in `cargo test --lib`, whose other tests spawn `mount` and `strace`: a
//! loop of close and reopen while another thread spawned `true` failed 46
//! of 300 reopens). Hence [`StateDirLock`] unlocks explicitly before it
//! closes, which releases the lock for the child's copy as well.
//!
//! sled takes a flock on its `db` file too and never unlocks it explicitly;
//! its thread pool also finishes log writes and file truncations with that
//! file after the last `Db` handle is gone (`pagecache/iobuf.rs:1183`,
//! `pagecache/segment.rs:1098` in sled 0.34.7: neither is awaited on drop).
//! [`wait_until_unlocked`] probes the flock through a descriptor of our own
//! until it can take it, which is when neither sled's threads nor a forked
//! child's copy hold the file any more (see `store.rs`, `DbFile`).

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::OutboxError;

/// The lock file, under the state_dir.
pub(crate) const LOCK_FILE: &str = "outbox.lock";

/// How often [`wait_until_unlocked`] tries the lock.
const PROBE_EVERY: Duration = Duration::from_millis(2);

/// `<state_dir>/outbox.lock`, flock'd while an outbox is open on the
/// state_dir (a second agent, or a second open in this process, is refused).
/// Shared by the database and the writer's reopen; unlocked when the last
/// holder drops it.
#[derive(Debug)]
pub(crate) struct StateDirLock {
    file: File,
    path: PathBuf,
}

impl StateDirLock {
    /// Takes the lock, or fails with [`OutboxError::Locked`] if it is held
    /// (by another process, or by an outbox still open in this one).
    pub(crate) fn take(state_dir: &Path) -> Result<Arc<StateDirLock>, OutboxError> {
        let path = state_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| OutboxError::Io { what: "cannot open lock file", path: path.clone(), source })?;
        match file.try_lock() {
            Ok(()) => Ok(Arc::new(StateDirLock { file, path })),
            Err(TryLockError::WouldBlock) => Err(OutboxError::Locked { state_dir: state_dir.to_path_buf() }),
            Err(TryLockError::Error(source)) => Err(OutboxError::Io { what: "cannot lock", path, source }),
        }
    }
}

impl Drop for StateDirLock {
    fn drop(&mut self) {
        // Explicitly, not by closing: a forked child's copy of the
        // descriptor would keep the lock otherwise (see the module doc).
        if let Err(e) = self.file.unlock() {
            tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "outbox: cannot unlock the state_dir lock; it is released when the file is closed"
            );
        }
    }
}

/// Waits until `file`'s flock can be taken through `file` (a descriptor of
/// its own, not sharing a description with whoever else locked the file),
/// then releases it again at once. `Ok(true)`: nothing else holds the lock
/// now; `Ok(false)`: it was still held after `patience`.
pub(crate) fn wait_until_unlocked(file: &File, patience: Duration) -> io::Result<bool> {
    let give_up = Instant::now() + patience;
    loop {
        match file.try_lock() {
            Ok(()) => {
                // Explicitly, so that a child forked just now cannot keep it.
                file.unlock()?;
                return Ok(true);
            }
            Err(TryLockError::WouldBlock) if Instant::now() < give_up => thread::sleep(PROBE_EVERY),
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forked child shares the lock's open file description until it
    /// execs; a duplicate descriptor (`try_clone` is `dup`) is the same
    /// thing without a child process.
    #[test]
    fn a_released_state_dir_lock_is_free_at_once_even_while_a_forked_copy_of_its_descriptor_lives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = StateDirLock::take(dir.path()).expect("take");
        assert!(
            matches!(StateDirLock::take(dir.path()), Err(OutboxError::Locked { .. })),
            "held while the first is alive"
        );
        let forked_copy = lock.file.try_clone().expect("dup");
        drop(lock);
        let again = StateDirLock::take(dir.path());
        assert!(again.is_ok(), "the state_dir is still locked after the lock was dropped: {again:?}");
        drop(forked_copy);
    }

    #[test]
    fn waiting_for_a_lock_held_elsewhere_ends_when_it_is_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let holder = File::create(&path).expect("create");
        let probe = File::open(&path).expect("open");
        holder.lock().expect("lock");
        assert!(!wait_until_unlocked(&probe, Duration::ZERO).expect("probe"), "held");
        let release = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            drop(holder);
        });
        assert!(wait_until_unlocked(&probe, Duration::from_secs(60)).expect("probe"), "released");
        release.join().expect("join");
        // The probe let go of it too.
        File::open(&path).expect("open").try_lock().expect("free after the probe");
    }
}
