//! Giving freed heap memory back to the system after a burst (a drained
//! outbox backlog). Owns the one call into glibc's `malloc_trim`; it must not
//! be called often (it walks every arena) and does nothing where the C
//! library is not glibc.

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
        tracing::debug!(released, "malloc_trim after a drained backlog");
    }
}
