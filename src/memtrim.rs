//! The agent's heap after a burst (a backlog recorded or drained): owns the
//! two things fieldlink does about glibc's allocator, the agent's start
//! under `glibc.malloc.tcache_max=64` and the `malloc_trim` the outbox
//! writer calls after a burst. It must not be called often (a trim walks
//! every arena), and it does nothing where the C library is not glibc.
//!
//! Why the thread cache holds only small chunks (issue #8, BENCHMARKS.md
//! "session 6"): after a 100,000-record backlog drained, the agent's live
//! heap was 0.7 MB above idle (heaptrack) but its RSS 6–8 MiB above, even
//! right after a `malloc_trim(0)`. glibc's per-thread cache (tcache: up to
//! 7 free chunks of each size up to 1,032 bytes, per thread) keeps its
//! chunks marked in use, so the free memory around them neither coalesces
//! nor goes back to the system: each one pins a page in the middle of a
//! mostly free arena (gdb `malloc_info`: one arena of 19 MB held 0.8 MB
//! live in 774 pieces). With the cache limited to chunks of at most 64
//! bytes, the RSS after a drain fell from 12.6–14.3 MiB to 9.8–11.4 (idle
//! 5.8), as much as with the cache off, and the CPU per message stayed
//! that of the full cache (the cache off cost 2–6 % more, and more in
//! replay). glibc reads tunables only when a process starts, so the agent
//! re-executes itself once with the tunable set (`execve` keeps the pid,
//! which systemd and the pid file rely on); a `GLIBC_TUNABLES` that already
//! sets the cache's size or count is the user's choice and is left alone.

use std::ffi::{OsStr, OsString};

/// The environment variable glibc reads its tunables from at start.
pub const TUNABLES: &str = "GLIBC_TUNABLES";

/// The tunable that keeps only chunks of at most 64 bytes in glibc's
/// per-thread cache.
pub const SMALL_THREAD_CACHE: &str = "glibc.malloc.tcache_max=64";

/// The tunables that size the thread cache: with either in
/// `GLIBC_TUNABLES`, it is left as it is.
const THREAD_CACHE_TUNABLES: [&str; 2] = ["glibc.malloc.tcache_max=", "glibc.malloc.tcache_count="];

/// Why the agent runs with glibc's full thread cache after all.
#[derive(Debug, thiserror::Error)]
pub enum MemtrimError {
    /// `execve` of the agent's own binary failed; it goes on as started.
    #[error("cannot restart {} with {SMALL_THREAD_CACHE} (it runs with glibc's full thread cache): {source}", exe.display())]
    Reexec {
        exe: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The `GLIBC_TUNABLES` value to restart with, given the current one;
/// `None` when it already sizes the thread cache (set by the user, or by
/// this restart), so there is nothing to do.
pub fn tunables_with_small_thread_cache(current: Option<&OsStr>) -> Option<OsString> {
    match current {
        None => Some(OsString::from(SMALL_THREAD_CACHE)),
        Some(v) if v.is_empty() => Some(OsString::from(SMALL_THREAD_CACHE)),
        Some(v)
            if v.to_string_lossy().split(':').any(|t| THREAD_CACHE_TUNABLES.iter().any(|name| t.starts_with(name))) =>
        {
            None
        }
        Some(v) => {
            let mut out = v.to_os_string();
            out.push(":");
            out.push(SMALL_THREAD_CACHE);
            Some(out)
        }
    }
}

/// Replaces this process with itself, same arguments, under
/// [`SMALL_THREAD_CACHE`], unless `GLIBC_TUNABLES` already sizes the thread
/// cache. Returns only when there was nothing to do (`Ok`) or the `execve`
/// failed (the process goes on as it is). Call it first thing, before any
/// thread starts: `execve` ends every other thread.
pub fn restart_with_small_thread_cache() -> Result<(), MemtrimError> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;

        let Some(tunables) = tunables_with_small_thread_cache(std::env::var_os(TUNABLES).as_deref()) else {
            return Ok(());
        };
        // The binary's own path, not `/proc/self/exe`: the kernel names the
        // process after the file it executes, and `ps`, `top` and `pgrep
        // fieldlink` would show "exe".
        let exe = std::env::current_exe().unwrap_or_else(|_| std::path::PathBuf::from("/proc/self/exe"));
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_else(|| OsString::from("fieldlink"));
        let source = std::process::Command::new(&exe).arg0(argv0).args(args).env(TUNABLES, tunables).exec();
        Err(MemtrimError::Reexec { exe, source })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    Ok(())
}

/// Returns free memory of every malloc arena to the system (glibc's
/// `malloc_trim(0)`: trims each arena's top and `madvise`s away whole free
/// pages inside it, `malloc/malloc.c` `mtrim`). A no-op on other C libraries.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a plain size and touches only the
        // allocator's own state, under its own locks; it is safe to call
        // from any thread at any time.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(released, "malloc_trim after a burst");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_tunables_the_agent_restarts_with_a_small_thread_cache() {
        assert_eq!(tunables_with_small_thread_cache(None), Some(OsString::from(SMALL_THREAD_CACHE)));
        assert_eq!(tunables_with_small_thread_cache(Some(OsStr::new(""))), Some(OsString::from(SMALL_THREAD_CACHE)));
    }

    #[test]
    fn other_tunables_the_user_set_are_kept_beside_it() {
        assert_eq!(
            tunables_with_small_thread_cache(Some(OsStr::new("glibc.malloc.arena_max=2"))),
            Some(OsString::from("glibc.malloc.arena_max=2:glibc.malloc.tcache_max=64"))
        );
    }

    #[test]
    fn a_thread_cache_sized_by_the_user_or_the_restart_is_left_alone() {
        for set in [
            "glibc.malloc.tcache_count=7",
            "glibc.malloc.tcache_max=1032",
            "glibc.malloc.arena_max=2:glibc.malloc.tcache_max=64",
            "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=2",
        ] {
            assert_eq!(tunables_with_small_thread_cache(Some(OsStr::new(set))), None, "{set}");
        }
        // A name that only ends like one is another tunable.
        assert!(tunables_with_small_thread_cache(Some(OsStr::new("x.glibc.malloc.tcache_max=3"))).is_some());
    }
}
