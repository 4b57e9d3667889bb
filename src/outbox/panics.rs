//! Catching sled's panics. sled 0.34.7 panics on some damaged files instead
//! of returning `Corruption` (e.g. `serialization.rs:662 tried to serialize
//! Uninitialized`, reached from `Config::open` through
//! `pagecache/snapshot.rs:365 advance_snapshot`). Owns [`catch`], which runs
//! a sled call under `catch_unwind` and marks the thread while it does, and
//! [`is_caught_here`], which the agent's exit-on-panic hook asks before it
//! ends the process (a caught panic must not exit: the outbox moves the
//! database aside instead).
//!
//! It must only wrap calls whose panic the caller turns into "the data is
//! damaged" (open, the first full scan, reading a database moved aside); a
//! panic anywhere else keeps the agent's exit-on-panic rule.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};

thread_local! {
    /// How many [`catch`] calls are running on this thread.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

/// Whether a panic on this thread right now would be caught by `catch`:
/// the panic hook must then let it unwind instead of ending the process.
pub fn is_caught_here() -> bool {
    CATCHING.with(|c| c.get() > 0)
}

/// Decrements the thread's counter when dropped, also while unwinding.
struct Marker;

impl Marker {
    fn enter() -> Marker {
        CATCHING.with(|c| c.set(c.get() + 1));
        Marker
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        CATCHING.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

/// Runs `f`; a panic inside it becomes `Err(message)`.
pub(crate) fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let marker = Marker::enter();
    let result = catch_unwind(AssertUnwindSafe(f));
    drop(marker);
    result.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_catch_is_an_error_and_the_thread_is_marked_only_meanwhile() {
        assert!(!is_caught_here());
        let seen_inside = catch(is_caught_here).expect("no panic");
        assert!(seen_inside);
        let err = catch(|| -> u8 { panic!("tried to serialize Uninitialized") }).expect_err("panicked");
        assert_eq!(err, "tried to serialize Uninitialized");
        assert!(!is_caught_here(), "the mark is gone after an unwind");
        let nested = catch(|| catch(|| -> u8 { panic!("{}", 42) }).map(|_| is_caught_here()));
        assert!(matches!(nested, Ok(Err(ref m)) if m == "42"), "{nested:?}");
        assert!(!is_caught_here());
    }
}
