//! Credits: a bound on the records a producer thread has handed towards the
//! writer and the writer has not stored yet, so that a burst (100,000 button
//! edges streamed into the sim socket, or a chattering input) waits at its
//! source instead of queueing without limit in the channels between the
//! GPIO backend, the Button actor and the writer (issue #8: 100,000 queued
//! edges held about 40 MB there). Owns the count and the waiting; it knows
//! nothing about records, and it must never drop or refuse anything: a
//! producer that finds no credit waits for one.
//!
//! A [`Credit`] is taken on the producer's own thread (a GPIO backend's
//! edge reader, never an actor's: taking one may block) and travels with
//! the record ([`super::Draft::credit`]); the writer drops it once the
//! record is stored, kept through a disk fault, or dropped and counted.
//! Dropping it anywhere else on the way (a stale edge, an actor that
//! stopped, a mailbox dropped at shutdown) gives it back too, so credits
//! cannot leak.
//!
//! Producers belong to a *generation* (the Button's acquisition of its
//! pins). Once the consumer moves to a later one ([`Credits::serve_only`],
//! before it drops the old pins, whose drop may join their thread), a
//! producer of an older generation never waits again: its edges are stale
//! anyway, and the consumer's thread, busy joining it, could not take the
//! queued ones that would give its credits back.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// How many records may be on their way to the writer at once, per
/// [`Credits`]. Small against a backlog (a queued edge costs a few hundred
/// bytes in the channels), large enough that the writer's groups stay big.
pub const CREDITS: usize = 1024;

#[derive(Debug, Default)]
struct Count {
    /// Credits out now.
    out: usize,
    /// Producers waiting for one.
    waiting: usize,
    /// Only producers of this generation wait (see [`Credits::serve_only`]).
    current: u64,
}

/// A pool of credits shared by the producers of one source.
#[derive(Debug)]
pub struct Credits {
    limit: usize,
    count: Mutex<Count>,
    returned: Condvar,
}

/// One record's place on the way to the writer; given back on drop.
#[derive(Debug)]
pub struct Credit {
    pool: Arc<Credits>,
}

impl Credits {
    /// A pool of `limit` credits (at least one).
    pub fn new(limit: usize) -> Arc<Credits> {
        Arc::new(Credits { limit: limit.max(1), count: Mutex::new(Count::default()), returned: Condvar::new() })
    }

    fn count(&self) -> MutexGuard<'_, Count> {
        // The count is a plain integer pair, valid whatever a panicking holder did.
        self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a credit for a producer of `generation`, waiting (blocking this
    /// thread) while all are out, unless the consumer has moved past that
    /// generation.
    pub fn take(self: &Arc<Self>, generation: u64) -> Credit {
        let mut count = self.count();
        if count.out >= self.limit && count.current == generation {
            count.waiting += 1;
            count = self
                .returned
                .wait_while(count, |c| c.out >= self.limit && c.current == generation)
                .unwrap_or_else(PoisonError::into_inner);
            count.waiting -= 1;
        }
        count.out += 1;
        Credit { pool: Arc::clone(self) }
    }

    /// From now on only producers of `generation` wait for a credit; those
    /// of other generations waiting now go on at once (over the limit), and
    /// never wait again. For a consumer about to drop the old producers (and
    /// join their threads), or going away (`u64::MAX`: nobody waits).
    pub fn serve_only(&self, generation: u64) {
        self.count().current = generation;
        self.returned.notify_all();
    }

    /// How many credits are out now (tests check that all came back).
    pub fn out(&self) -> usize {
        self.count().out
    }

    fn give_back(&self) {
        let mut count = self.count();
        count.out -= 1;
        // A waiting producer is woken once half the credits are back, not
        // for each one: one wake-up per half pool instead of one per record.
        if count.waiting > 0 && count.out <= self.limit / 2 {
            drop(count);
            self.returned.notify_all();
        }
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        self.pool.give_back();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread;

    use super::*;

    #[test]
    fn a_producer_waits_for_a_credit_and_gets_one_when_records_are_stored() {
        let pool = Credits::new(4);
        let (tx, rx) = mpsc::channel();
        let producer = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                for i in 0..100u32 {
                    let credit = pool.take(0);
                    if tx.send((i, credit)).is_err() {
                        return;
                    }
                }
            })
        };
        let mut got = Vec::new();
        while let Ok((i, credit)) = rx.recv() {
            // Never more than the limit on the way at once.
            assert!(pool.out() <= 4, "{} credits out", pool.out());
            got.push(i);
            drop(credit);
        }
        producer.join().expect("the producer finished");
        assert_eq!(got, (0..100).collect::<Vec<_>>(), "every record arrived, in order");
        assert_eq!(pool.out(), 0, "every credit came back");
    }

    #[test]
    fn a_producer_of_an_old_generation_stops_waiting_so_its_thread_can_be_joined() {
        let pool = Credits::new(1);
        let held = pool.take(0);
        let producer = {
            let pool = Arc::clone(&pool);
            // Waits: the one credit is out.
            thread::spawn(move || {
                drop(pool.take(0));
                // And never waits again, with the credit still out.
                drop(pool.take(0));
            })
        };
        pool.serve_only(1);
        producer.join().expect("the old producer was let go");
        drop(held);
        assert_eq!(pool.out(), 0);
    }

    #[test]
    fn a_credit_dropped_on_the_way_comes_back() {
        let pool = Credits::new(1);
        drop(pool.take(0));
        let again = pool.take(0);
        assert_eq!(pool.out(), 1);
        drop(again);
        assert_eq!(pool.out(), 0);
    }
}
