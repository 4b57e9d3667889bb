//! A simple adaptive threadpool that returns a oneshot future.
//!
//! fieldlink patch: threads on demand, none while idle. Upstream started 7
//! "immortal" threads at the first task and kept them for the life of the
//! process, each waking every second (`recv_timeout(1 s)` in a loop) to see
//! whether to exit, which immortal threads never do: 7 threads and 7
//! wake-ups a second in an agent that otherwise sleeps between heartbeats.
//! Here a task is handed to a thread that is waiting for work if there is
//! one for it, else a new thread is started; a thread that has found no
//! work for `IDLE_EXIT` ends. As upstream, a task that waits for another
//! task never deadlocks the pool: a queued task never waits for a busy
//! thread, it gets a new one (up to `MAX_THREADS`).

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    thread,
    time::Duration,
};

use parking_lot::{Condvar, Mutex};

use crate::{debug_delay, warn, Error, Lazy, OneShot, Result};

// This is lower for CI reasons.
#[cfg(windows)]
const MAX_THREADS: usize = 16;

#[cfg(not(windows))]
const MAX_THREADS: usize = 128;

/// How long a thread waits for work before it ends.
const IDLE_EXIT: Duration = Duration::from_secs(2);

type Work = Box<dyn FnOnce() + Send + 'static>;

struct State {
    queue: VecDeque<Work>,
    /// Threads waiting on `Pool::cv` (or woken and not yet back at the
    /// queue): each looks at the queue before it does anything else.
    idle: usize,
    /// Threads started and not yet ended.
    total: usize,
    spawns: usize,
}

struct Pool {
    cv: Condvar,
    mu: Mutex<State>,
}

static POOL: Lazy<Pool, fn() -> Pool> = Lazy::new(init_pool);
static BROKEN: AtomicBool = AtomicBool::new(false);

fn init_pool() -> Pool {
    Pool {
        cv: Condvar::new(),
        mu: Mutex::new(State {
            queue: VecDeque::new(),
            idle: 0,
            total: 0,
            spawns: 0,
        }),
    }
}

fn perform_work() {
    let mut state = POOL.mu.lock();
    loop {
        debug_delay();
        if let Some(task) = state.queue.pop_front() {
            drop(state);
            let res =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(task));
            state = POOL.mu.lock();
            if res.is_err() {
                state.total -= 1;
                drop(state);
                // IO thread panicked, shut down the system
                log::error!(
                    "IO thread unexpectedly terminated.
                    please report this error at the sled github repo. {:?}",
                    res
                );
                BROKEN.store(true, Relaxed);
                return;
            }
            continue;
        }
        state.idle += 1;
        let timed_out = POOL.cv.wait_for(&mut state, IDLE_EXIT).timed_out();
        state.idle -= 1;
        // Woken or not, a queued task is taken before this thread may end.
        if timed_out && state.queue.is_empty() {
            state.total -= 1;
            return;
        }
    }
}

/// Starts a thread for the queue; `state.total` already counts it.
fn spawn_new_thread(spawn_id: usize) -> std::io::Result<()> {
    thread::Builder::new()
        .name(format!("sled-io-{}", spawn_id))
        .spawn(perform_work)
        .map(drop)
}

/// Spawn a function on the threadpool.
pub fn spawn<F, R>(work: F) -> Result<OneShot<R>>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static + Sized,
{
    if BROKEN.load(Relaxed) {
        return Err(Error::ReportableBug(
            "IO thread unexpectedly panicked. please report \
            this bug on the sled github repo."
                .to_string(),
        ));
    }

    let (promise_filler, promise) = OneShot::pair();
    let task = move || {
        let result = (work)();
        promise_filler.fill(result);
    };

    let mut state = POOL.mu.lock();
    state.queue.push_back(Box::new(task));

    // Every waiting thread looks at the queue when it wakes, so as long as
    // there are as many of them as queued tasks, one more is not needed.
    if state.idle >= state.queue.len() || state.total >= MAX_THREADS {
        drop(state);
        POOL.cv.notify_one();
        return Ok(promise);
    }

    state.total += 1;
    state.spawns += 1;
    let spawn_id = state.spawns;
    drop(state);

    if let Err(e) = spawn_new_thread(spawn_id) {
        static E: AtomicBool = AtomicBool::new(false);

        let mut state = POOL.mu.lock();
        state.total -= 1;
        if !E.swap(true, Relaxed) {
            // only execute this once
            warn!(
                "Failed to dynamically increase the threadpool size: {:?}.",
                e,
            )
        }
        // No thread at all would ever run the queue: run it here, as sled
        // does on platforms without threads.
        if state.total == 0 {
            let queued: Vec<Work> = state.queue.drain(..).collect();
            drop(state);
            for task in queued {
                (task)();
            }
        }
    }

    Ok(promise)
}
