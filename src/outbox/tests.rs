//! Behaviour tests of the outbox as a whole: the real sled store in a temp
//! dir for reopen, corruption and locking; the in-memory store where fsyncs
//! are counted or crashes simulated. No assertion depends on timing.

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, UNIX_EPOCH};

use futures_util::FutureExt;

use super::*;
use crate::config::{Durability, OutboxConfig};

fn cfg(durability: Durability) -> OutboxConfig {
    OutboxConfig { max_bytes: 64 << 20, durability, flush_interval: Duration::from_millis(5) }
}

/// A batch config that never flushes on its own during a test.
fn batch_never() -> OutboxConfig {
    OutboxConfig { flush_interval: Duration::from_secs(3600), ..cfg(Durability::Batch) }
}

fn wait<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(f)
}

fn payload_for(seq: u64, pad: usize) -> Vec<u8> {
    let mut p = format!("{{\"seq\":{seq}}}").into_bytes();
    p.resize(p.len() + pad, b' ');
    p
}

fn draft_padded(class: Class, pad: usize) -> Draft {
    Draft {
        topic: match class {
            Class::Heartbeat => "fieldlink/pi/heartbeat".to_string(),
            Class::Event => "fieldlink/pi/button/door".to_string(),
        },
        qos: Qos::AtLeastOnce,
        retain: false,
        class,
        ts: UNIX_EPOCH + Duration::from_millis(1_763_719_200_000),
        payload: Box::new(move |seq| payload_for(seq, pad)),
    }
}

fn draft(class: Class) -> Draft {
    draft_padded(class, 0)
}

fn append(h: &OutboxHandle, class: Class) -> u64 {
    wait(h.append(draft(class))).expect("append")
}

fn seqs(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

fn all(r: &OutboxReader) -> Vec<Record> {
    r.read(0, u64::MAX, usize::MAX).expect("read")
}

/// Shuts down and drops everything, so the database is closed.
fn close(h: OutboxHandle, r: OutboxReader) {
    h.shutdown();
    drop(h);
    drop(r);
}

fn garbage_over_files(dir: &Path, only: Option<&str>) {
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            garbage_over_files(&path, only);
            continue;
        }
        if only.is_some_and(|name| path.file_name().is_none_or(|f| f != name)) {
            continue;
        }
        let len = fs::metadata(&path).expect("metadata").len().max(64);
        let garbage: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
        fs::write(&path, garbage).expect("write garbage");
    }
}

fn corrupt_dirs(state: &Path) -> Vec<PathBuf> {
    fs::read_dir(state)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("outbox.corrupt-")))
        .collect()
}

#[test]
fn seqs_start_at_one_and_strictly_increase_across_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    assert_eq!((report.next_seq, report.depth, report.moved_aside.clone()), (1, 0, None));
    assert_eq!(append(&h, Class::Event), 1);
    assert_eq!(append(&h, Class::Heartbeat), 2);
    assert_eq!(append(&h, Class::Event), 3);
    close(h, r);

    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("reopen");
    assert_eq!(report.next_seq, 4, "a clean shutdown resumes without a gap");
    assert_eq!(append(&h, Class::Event), 4);
    close(h, r);
}

#[test]
fn seqs_strictly_increase_across_reopen_after_acking_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Batch)).expect("open");
    let done: Vec<u64> = (0..5).map(|_| append(&h, Class::Event)).collect();
    h.ack(done);
    wait(h.flush()).expect("flush");
    assert_eq!(h.stats().depth, 0);
    close(h, r);

    let (h, r, report) = open(dir.path(), &cfg(Durability::Batch)).expect("reopen");
    assert_eq!(report.depth, 0);
    assert_eq!(report.next_seq, 6);
    assert_eq!(append(&h, Class::Event), 6);
    close(h, r);
}

#[test]
fn seqs_jump_to_the_floor_after_a_crash_and_never_repeat() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &batch_never()).expect("open");
    assert_eq!(append_flushed(&h), 1);
    // Appended but never flushed: seq 2 may have been handed out, then lost.
    let pending = h.append(draft(Class::Event));
    let crashed = store.crashed();
    drop(pending);
    h.shutdown();

    let (h2, r2, report) = open_in_memory(&crashed, &batch_never()).expect("reopen");
    assert!(report.next_seq > 2, "next_seq {} could repeat a lost seq", report.next_seq);
    assert_eq!(report.next_seq, FLOOR_STEP + 1, "resumes at the reservation R");
    assert_eq!(seqs(&all(&r2)), vec![1]);
    assert_eq!(append_flushed(&h2), FLOOR_STEP + 1);
    h2.shutdown();
}

fn append_flushed(h: &OutboxHandle) -> u64 {
    let f = h.append(draft(Class::Event));
    wait(h.flush()).expect("flush");
    wait(f).expect("append")
}

#[test]
fn the_floor_is_raised_before_a_seq_reaches_it() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    assert_eq!(super::store::Store::floor(&store).expect("floor"), None);
    assert_eq!(append(&h, Class::Event), 1);
    let r = super::store::Store::floor(&store).expect("floor").expect("a floor was written");
    assert!(r > 1);
    h.shutdown();
}

#[test]
fn records_survive_reopen_until_acked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    let a = append(&h, Class::Event);
    let b = append(&h, Class::Heartbeat);
    let c = append(&h, Class::Event);
    close(h, r);

    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("reopen");
    assert_eq!(report.depth, 3);
    let stats = h.stats();
    assert_eq!(stats.depth, 3);
    assert!(stats.bytes > 3 * 8);
    let got = all(&r);
    assert_eq!(seqs(&got), vec![a, b, c]);
    assert_eq!(got[1].class, Class::Heartbeat);
    assert_eq!(got[1].payload, payload_for(b, 0));
    assert_eq!(got[0].ts_ms, 1_763_719_200_000);
    assert_eq!(got[0].topic, "fieldlink/pi/button/door");
    assert_eq!(r.oldest_ts_ms(), Some(1_763_719_200_000));

    h.ack(vec![b]);
    wait(h.flush()).expect("flush");
    close(h, r);

    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("reopen again");
    assert_eq!(report.depth, 2);
    assert_eq!(seqs(&all(&r)), vec![a, c]);
    close(h, r);
}

#[test]
fn ack_removes_and_acking_twice_or_unknown_seqs_is_a_no_op() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    let s: Vec<u64> = (0..4).map(|_| append(&h, Class::Event)).collect();
    let before = h.stats();
    h.ack(vec![s[0], s[2]]);
    h.ack(vec![s[0], 999, 0]);
    h.ack(vec![]);
    wait(h.flush()).expect("flush");
    assert_eq!(seqs(&all(&r)), vec![s[1], s[3]]);
    let after = h.stats();
    assert_eq!(after.depth, 2);
    assert_eq!(after.bytes, before.bytes / 2, "equal-sized records");
    assert_eq!(after.dropped, 0);
    h.shutdown();
}

#[test]
fn the_bound_drops_oldest_heartbeats_first_then_events_and_counts_drops() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    // Measure one record to size the bound in records.
    let first = append(&h, Class::Event);
    let size = h.stats().bytes;
    h.ack(vec![first]);
    h.shutdown();

    let bound = OutboxConfig { max_bytes: 4 * size, ..cfg(Durability::Always) };
    let (h, r2, _) = open_in_memory(&store, &bound).expect("reopen");
    drop(r);
    let e1 = append(&h, Class::Event);
    let h1 = append(&h, Class::Heartbeat);
    let e2 = append(&h, Class::Event);
    let h2 = append(&h, Class::Heartbeat);
    assert_eq!(h.stats().dropped, 0);
    let e3 = append(&h, Class::Event);
    assert_eq!(seqs(&all(&r2)), vec![e1, e2, h2, e3], "oldest heartbeat dropped first");
    let e4 = append(&h, Class::Event);
    assert_eq!(seqs(&all(&r2)), vec![e1, e2, e3, e4], "then the remaining heartbeat");
    let e5 = append(&h, Class::Event);
    assert_eq!(seqs(&all(&r2)), vec![e2, e3, e4, e5], "then the oldest event");
    let stats = h.stats();
    assert_eq!((stats.depth, stats.bytes, stats.dropped), (4, 4 * size, 3));
    assert!(h1 < h2);
    h.shutdown();

    let (h, _r, _) = open_in_memory(&store, &bound).expect("reopen");
    assert_eq!(h.stats().dropped, 3, "drops are persisted");
    h.shutdown();
}

#[test]
fn a_max_bytes_lowered_since_the_last_run_is_applied_at_open() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    append(&h, Class::Heartbeat);
    append(&h, Class::Event);
    let before = h.stats().bytes;
    append(&h, Class::Event);
    let size = h.stats().bytes - before;
    h.shutdown();

    let smaller = OutboxConfig { max_bytes: size, ..cfg(Durability::Always) };
    let (h, r, _) = open_in_memory(&store, &smaller).expect("reopen");
    wait(h.flush()).expect("flush");
    assert_eq!(seqs(&all(&r)), vec![3]);
    assert_eq!(h.stats().dropped, 2);
    h.shutdown();
}

#[test]
fn a_record_larger_than_max_bytes_is_refused_and_counted() {
    let store = MemStore::new();
    let small = OutboxConfig { max_bytes: 100, ..cfg(Durability::Always) };
    let (h, r, _) = open_in_memory(&store, &small).expect("open");
    let err = wait(h.append(draft_padded(Class::Event, 200))).expect_err("too large");
    assert!(matches!(err, OutboxError::TooLarge { seq: 1, .. }), "{err}");
    assert_eq!(h.stats().dropped, 1);
    assert_eq!(append(&h, Class::Event), 2);
    assert_eq!(seqs(&all(&r)), vec![2]);
    h.shutdown();
}

#[test]
fn batch_mode_resolves_appends_only_after_a_flush_and_groups_them() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &batch_never()).expect("open");
    let base = store.flush_count();
    let mut pending: Vec<Pin<Box<_>>> = (0..100).map(|_| Box::pin(h.append(draft(Class::Event)))).collect();
    // Wait (without a time limit) until the writer has stored all of them.
    while h.stats().depth < 100 {
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(store.flush_count(), base, "no fsync per message");
    assert_eq!(h.stats().durable_seq, 0);
    for f in pending.iter_mut() {
        assert!(f.as_mut().now_or_never().is_none(), "resolved before any flush");
    }

    wait(h.flush()).expect("flush");
    assert_eq!(store.flush_count(), base + 1, "one fsync for the whole batch");
    assert_eq!(h.stats().durable_seq, 100);
    let got: Vec<u64> = pending.into_iter().map(|f| wait(f).expect("append")).collect();
    assert_eq!(got, (1..=100).collect::<Vec<u64>>());

    // Nothing pending: a flush needs no fsync.
    wait(h.flush()).expect("flush");
    assert_eq!(store.flush_count(), base + 1);
    h.shutdown();
}

#[test]
fn batch_mode_flushes_on_its_own_after_the_interval() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Batch)).expect("open");
    let base = store.flush_count();
    let seqs: Vec<u64> = (0..3).map(|_| append(&h, Class::Heartbeat)).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert!(store.flush_count() > base);
    assert_eq!(store.crashed().scan_len(), 3, "resolved appends are durable");
    h.shutdown();
}

#[test]
fn always_mode_groups_appends_queued_behind_a_flush_into_one_fsync() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    let base = store.flush_count();
    let gate = store.gate_next_flush();
    let first = h.append(draft(Class::Event));
    gate.wait_entered();
    let rest: Vec<_> = (0..50).map(|_| h.append(draft(Class::Event))).collect();
    store.ungate();
    gate.release();
    assert_eq!(wait(first).expect("append"), 1);
    for (i, f) in rest.into_iter().enumerate() {
        assert_eq!(wait(f).expect("append"), i as u64 + 2);
    }
    assert_eq!(store.flush_count(), base + 2, "51 appends, 2 fsyncs");
    h.shutdown();
}

#[test]
fn on_durable_gets_the_new_watermark_after_each_flush() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    h.set_on_durable(Box::new(move |seq| sink.lock().expect("lock").push(seq)));
    append(&h, Class::Event);
    append(&h, Class::Heartbeat);
    assert_eq!(*seen.lock().expect("lock"), vec![1, 2]);
    assert_eq!(h.stats().durable_seq, 2);
    h.shutdown();
}

#[test]
fn read_merges_classes_in_seq_order_and_honours_from_upto_and_limit() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    let classes = [Class::Event, Class::Heartbeat, Class::Heartbeat, Class::Event, Class::Heartbeat, Class::Event];
    for c in classes {
        append(&h, c);
    }
    let got = all(&r);
    assert_eq!(seqs(&got), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(got.iter().map(|r| r.class).collect::<Vec<_>>(), classes);
    assert_eq!(seqs(&r.read(2, 5, 100).expect("read")), vec![2, 3, 4, 5]);
    assert_eq!(seqs(&r.read(2, 5, 3).expect("read")), vec![2, 3, 4]);
    assert_eq!(seqs(&r.read(4, u64::MAX, 1).expect("read")), vec![4]);
    assert_eq!(seqs(&r.read(5, 4, 10).expect("read")), Vec::<u64>::new());
    assert_eq!(seqs(&r.read(7, 100, 10).expect("read")), Vec::<u64>::new());
    assert_eq!(seqs(&r.read(0, 100, 0).expect("read")), Vec::<u64>::new());
    h.ack(vec![3]);
    wait(h.flush()).expect("flush");
    assert_eq!(seqs(&r.read(2, 5, 3).expect("read")), vec![2, 4, 5]);
    h.shutdown();
}

#[test]
fn read_skips_an_undecodable_record_and_the_writer_removes_and_counts_it() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    for c in [Class::Event, Class::Heartbeat, Class::Event, Class::Event] {
        append(&h, c);
    }
    store.corrupt(Class::Heartbeat, 2, b"\x09not a record");
    store.corrupt(Class::Event, 3, b"");
    assert_eq!(seqs(&r.read(0, u64::MAX, 3).expect("read")), vec![1, 4], "skipped, still filling the limit");
    wait(h.flush()).expect("flush");
    let stats = h.stats();
    assert_eq!((stats.depth, stats.dropped), (2, 2));
    assert_eq!(seqs(&all(&r)), vec![1, 4]);
    h.shutdown();
}

#[test]
fn a_full_disk_drops_the_record_fails_its_waiter_and_the_writer_keeps_running() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    assert_eq!(append(&h, Class::Event), 1);
    store.set_fail_writes(true);
    let err = wait(h.append(draft(Class::Event))).expect_err("disk full");
    assert!(matches!(err, OutboxError::Insert { seq: 2, .. }), "{err}");
    assert_eq!(h.stats().dropped, 1);
    assert!(wait(h.flush()).is_err(), "flush reports the failed fsync");
    store.set_fail_writes(false);
    assert_eq!(append(&h, Class::Event), 3);
    assert_eq!(seqs(&all(&r)), vec![1, 3]);
    h.shutdown();
}

#[test]
fn shutdown_flushes_and_later_appends_fail_with_a_clear_error() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &batch_never()).expect("open");
    let pending = h.append(draft(Class::Event));
    let other = h.clone();
    h.shutdown();
    assert_eq!(wait(pending).expect("flushed by shutdown"), 1);
    assert_eq!(store.crashed().scan_len(), 1);
    let err = wait(other.append(draft(Class::Event))).expect_err("closed");
    assert!(matches!(err, OutboxError::Closed));
    assert!(err.to_string().contains("shut down"), "{err}");
    assert!(matches!(wait(other.flush()), Err(OutboxError::Closed)));
    other.ack(vec![1]);
    other.shutdown();
    assert_eq!(seqs(&all(&r)), vec![1], "reads still work after shutdown");
}

#[test]
fn a_corrupt_dir_is_moved_aside_and_a_fresh_one_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    for _ in 0..3 {
        append(&h, Class::Event);
    }
    close(h, r);
    garbage_over_files(&dir.path().join("outbox"), None);

    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open after corruption");
    let aside = report.moved_aside.clone().expect("moved aside");
    assert!(aside.is_dir());
    assert!(aside.file_name().is_some_and(|n| n.to_string_lossy().starts_with("outbox.corrupt-")));
    assert_eq!(corrupt_dirs(dir.path()), vec![aside]);
    assert_eq!(report.depth, 0);
    assert!(report.next_seq > 3, "seqs never repeat, even after a move-aside");
    let seq = append(&h, Class::Event);
    assert_eq!(seq, report.next_seq);
    assert_eq!(seqs(&all(&r)), vec![seq]);
    close(h, r);

    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open fresh again");
    assert_eq!((report.moved_aside, report.depth, report.next_seq), (None, 1, seq + 1));
    close(h, r);
}

#[test]
fn a_data_file_sled_silently_reads_as_empty_is_moved_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    append(&h, Class::Event);
    close(h, r);
    // sled opens a garbage `db` file as an empty database, without an error.
    garbage_over_files(&dir.path().join("outbox"), Some("db"));

    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open after corruption");
    assert!(report.moved_aside.is_some());
    assert!(report.next_seq > 1);
    close(h, r);
}

#[test]
fn an_undecodable_head_record_moves_the_dir_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    append(&h, Class::Event);
    append(&h, Class::Event);
    close(h, r);
    {
        let db = sled::open(dir.path().join("outbox")).expect("raw open");
        let events = db.open_tree("events").expect("tree");
        let _old = events.insert(1u64.to_be_bytes(), b"\x02from a future version".as_slice()).expect("insert");
        let _bytes = db.flush().expect("flush");
    }
    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    assert!(report.moved_aside.is_some());
    assert_eq!(report.depth, 0);
    assert!(report.next_seq > 2);
    close(h, r);
}

#[test]
fn a_second_open_of_the_same_dir_fails_with_the_hint_and_moves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    append(&h, Class::Event);
    let err = open(dir.path(), &cfg(Durability::Always)).err().expect("second open must fail");
    assert!(matches!(err, OutboxError::Locked { .. }), "{err}");
    let msg = err.to_string();
    let hint = format!("is another fieldlink agent running with state_dir '{}'?", dir.path().display());
    assert!(msg.contains(&hint), "{msg}");
    assert!(corrupt_dirs(dir.path()).is_empty());
    assert_eq!(seqs(&all(&r)), vec![1], "the first outbox is untouched");
    close(h, r);
    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open after close");
    assert_eq!(report.depth, 1);
    close(h, r);
}

#[test]
fn append_futures_need_no_runtime_to_be_created_and_are_send() {
    fn assert_send<T: Send + 'static>(_: &T) {}
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    let f = h.append(draft(Class::Event));
    assert_send(&f);
    let g = h.flush();
    assert_send(&g);
    let reader = r.clone();
    let from_thread = thread::spawn(move || reader.read(0, u64::MAX, 10).map(|v| v.len()));
    assert_eq!(wait(f).expect("append"), 1);
    wait(g).expect("flush");
    assert!(from_thread.join().expect("join").expect("read") <= 1);
    h.shutdown();
}

impl MemStore {
    fn scan_len(&self) -> u64 {
        use super::store::Store;
        [Class::Heartbeat, Class::Event].into_iter().map(|c| self.scan(c).expect("scan").records).sum()
    }
}

/// Random append / ack / flush / shutdown-reopen / crash-reopen steps against
/// the real queue logic (over a [`MemStore`]) and a plain model side by side.
#[test]
fn the_outbox_matches_a_plain_model_over_random_steps() {
    for seed in 0..20 {
        run_model(seed);
    }
}

fn run_model(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let record_size = |seq: u64, class: Class, pad: usize| -> u64 {
        let r = Record {
            seq,
            ts_ms: 1_763_719_200_000,
            class,
            qos: Qos::AtLeastOnce,
            retain: false,
            topic: draft(class).topic,
            payload: payload_for(seq, pad),
        };
        8 + record::encode(&r).expect("encode").len() as u64
    };
    let config =
        OutboxConfig { max_bytes: 2_000, flush_interval: Duration::from_secs(3600), ..cfg(Durability::Always) };

    let mut store = MemStore::new();
    let (mut h, mut r, _) = open_in_memory(&store, &config).expect("open");
    // seq -> (class, stored size)
    let mut model: BTreeMap<u64, (Class, u64)> = BTreeMap::new();
    // Acked since the last fsync: a crash brings them back.
    let mut unflushed_acks: BTreeMap<u64, (Class, u64)> = BTreeMap::new();
    let mut dropped = 0u64;
    let mut last_seq = 0u64;
    // The seq the writer hands out next: last_seq + 1, or R after a crash.
    let mut next_seq = 1u64;

    for step in 0..300 {
        let ctx = format!("seed {seed} step {step}");
        // Acks are fire and forget: the queue is only comparable after a
        // step that waited on the writer.
        let mut synced = true;
        match rng.u32(0..100) {
            0..55 => {
                let class = if rng.bool() { Class::Heartbeat } else { Class::Event };
                let pad = rng.usize(0..120);
                let seq = wait(h.append(draft_padded(class, pad))).expect("append");
                assert!(seq > last_seq, "{ctx}: seq {seq} after {last_seq}");
                assert_eq!(seq, next_seq, "{ctx}");
                last_seq = seq;
                next_seq = seq + 1;
                // The fsync for this append covered every earlier ack.
                unflushed_acks.clear();
                let _new = model.insert(seq, (class, record_size(seq, class, pad)));
                while model.values().map(|v| v.1).sum::<u64>() > config.max_bytes {
                    let victim = model
                        .iter()
                        .find(|(_, v)| v.0 == Class::Heartbeat)
                        .or_else(|| model.iter().next())
                        .map(|(k, _)| *k)
                        .expect("over the bound means not empty");
                    let _gone = model.remove(&victim);
                    dropped += 1;
                }
            }
            55..75 => {
                let mut acks: Vec<u64> = model.keys().copied().filter(|_| rng.u32(0..3) == 0).collect();
                acks.push(rng.u64(0..=last_seq + 2));
                for seq in &acks {
                    if let Some(v) = model.remove(seq) {
                        let _new = unflushed_acks.insert(*seq, v);
                    }
                }
                h.ack(acks);
                synced = false;
            }
            75..85 => {
                wait(h.flush()).expect("flush");
                unflushed_acks.clear();
            }
            85..93 => {
                h.shutdown();
                drop(r);
                unflushed_acks.clear();
                let (h2, r2, report) = open_in_memory(&store, &config).expect("reopen");
                assert_eq!(report.next_seq, next_seq, "{ctx}: a clean reopen continues without a gap");
                (h, r) = (h2, r2);
            }
            _ => {
                // Cut the power: only what the last fsync covered survives,
                // so acks since then come back (nothing else flushes: the
                // interval is an hour and appends are what trigger fsyncs).
                let crashed = store.crashed();
                h.shutdown();
                drop(r);
                model.append(&mut unflushed_acks);
                store = crashed;
                let (h2, r2, report) = open_in_memory(&store, &config).expect("reopen after crash");
                assert!(report.next_seq > last_seq, "{ctx}: seqs must not repeat after a crash");
                next_seq = report.next_seq;
                (h, r) = (h2, r2);
            }
        }
        if synced {
            let got: Vec<(u64, Class)> = all(&r).iter().map(|x| (x.seq, x.class)).collect();
            let want: Vec<(u64, Class)> = model.iter().map(|(k, v)| (*k, v.0)).collect();
            assert_eq!(got, want, "{ctx}");
            let stats = h.stats();
            assert_eq!(stats.depth, model.len() as u64, "{ctx}");
            assert_eq!(stats.bytes, model.values().map(|v| v.1).sum::<u64>(), "{ctx}");
            assert_eq!(stats.dropped, dropped, "{ctx}");
        }
    }
    h.shutdown();
}

// ---------------------------------------------------------------------------
// The close summary (`outbox.closed`): records a damaged database lost since
// a clean close are counted.

/// The log lines emitted on this thread while `f` runs (open logs on the
/// caller's thread), and `f`'s result.
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink(Arc::new(Mutex::new(Vec::new())));
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let logs = String::from_utf8_lossy(&sink.0.lock().expect("log lock")).into_owned();
    (out, logs)
}

fn close_summary_path(state: &Path) -> PathBuf {
    state.join("outbox.closed")
}

/// Cuts the sled `db` file to `len` bytes, as a damaged disk or a careless
/// copy would.
fn truncate_db(state: &Path, len: u64) {
    let db = state.join("outbox").join("db");
    assert!(fs::metadata(&db).expect("db file").len() > len, "the db file is already shorter than {len} bytes");
    fs::OpenOptions::new().write(true).open(&db).expect("open db").set_len(len).expect("truncate");
}

/// 41 records, closed cleanly, then the `db` file cut to 3000 bytes: sled
/// opens it without an error, in an older state with fewer records.
fn closed_cleanly_then_truncated(state: &Path, keep_summary: bool) -> (u64, u64) {
    let (h, r, _) = open(state, &cfg(Durability::Always)).expect("open");
    let stored: Vec<u64> = (0..41).map(|_| append(&h, Class::Event)).collect();
    let next_seq = stored.last().expect("appended") + 1;
    close(h, r);
    assert!(close_summary_path(state).exists(), "a clean close writes the close summary");
    if !keep_summary {
        fs::remove_file(close_summary_path(state)).expect("remove summary");
    }
    truncate_db(state, 3000);
    (stored.len() as u64, next_seq)
}

#[test]
fn records_lost_from_sled_after_a_clean_close_are_counted_as_dropped_and_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (before, closed_next) = closed_cleanly_then_truncated(dir.path(), true);

    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("reopen"));
    assert_eq!(report.moved_aside, None, "sled opened the damaged file without an error");
    let after = report.depth;
    assert!(after < before, "the truncation made sled recover an older state ({after} of {before} records)");
    let lost = before - after;
    assert!(lost > 0);
    assert_eq!(h.stats().dropped, lost, "every record missing since the clean close is counted");
    assert_eq!(all(&r).len() as u64, after);
    let line = format!("the outbox lost {lost} records since it was closed cleanly; its files were damaged");
    assert!(logs.contains(&line) && logs.contains("ERROR"), "{logs}");
    assert_eq!(logs.matches("OUTBOX DAMAGED").count(), 1, "one loud line: {logs}");
    assert!(
        report.next_seq > closed_next,
        "next_seq {} could repeat a seq handed out before the close",
        report.next_seq
    );
    assert!(report.next_seq >= FLOOR_STEP, "resumes at the floor");
    assert_eq!(append(&h, Class::Event), report.next_seq);
    assert!(!close_summary_path(dir.path()).exists(), "the summary is spent at open");
    close(h, r);

    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("reopen again"));
    assert_eq!(h.stats().dropped, lost, "the drops are persisted, and counted once");
    assert_eq!(report.depth, after + 1);
    assert!(!logs.contains("OUTBOX DAMAGED"), "{logs}");
    close(h, r);
}

#[test]
fn a_database_rolled_back_behind_its_clean_close_counts_the_loss_and_never_repeats_seqs() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    for _ in 0..5 {
        append(&h, Class::Event);
    }
    h.shutdown();
    // The database as this clean close left it: `clean` set, next_seq 6.
    let older = store.crashed();

    let (h, _r, report) = open_in_memory(&store, &cfg(Durability::Always)).expect("reopen");
    assert_eq!(report.next_seq, 6);
    for _ in 0..5 {
        append(&h, Class::Event);
    }
    // A record too large to encode: refused and counted, so the close
    // summary's `dropped` is 1.
    assert!(wait(h.append(draft_padded(Class::Event, MAX_RECORD_BYTES))).is_err());
    let stats = h.stats();
    assert_eq!((stats.depth, stats.dropped), (10, 1));
    h.shutdown();

    // The database goes back to `older`: 5 records, dropped 0, next_seq 6
    // and `clean` set, which alone would resume seqs at 6.
    let damaged = store.rolled_back_to(&older);
    let ((h, r, report), logs) = with_logs(|| open_in_memory(&damaged, &cfg(Durability::Always)).expect("open"));
    assert_eq!(report.depth, 5);
    assert_eq!(h.stats().dropped, 1 + 5, "the summary's drops, plus the 5 records lost");
    assert!(logs.contains("the outbox lost 5 records since it was closed cleanly; its files were damaged"), "{logs}");
    assert_eq!(seqs(&all(&r)), vec![1, 2, 3, 4, 5]);
    assert_eq!(report.next_seq, FLOOR_STEP + 1, "at least max(closed next_seq 12, the floor)");
    assert_eq!(append(&h, Class::Event), FLOOR_STEP + 1);
    h.shutdown();
}

#[test]
fn a_clean_close_followed_by_an_undamaged_reopen_counts_nothing_and_removes_the_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    let stored: Vec<u64> = (0..41).map(|_| append(&h, Class::Event)).collect();
    h.ack(stored[..10].to_vec());
    wait(h.flush()).expect("flush");
    let before = h.stats();
    assert!(!close_summary_path(dir.path()).exists(), "no summary while the outbox is open");
    close(h, r);
    assert!(close_summary_path(dir.path()).exists());

    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("reopen"));
    assert!(!close_summary_path(dir.path()).exists(), "the summary is spent at open");
    assert_eq!((report.depth, report.next_seq, report.moved_aside.clone()), (31, 42, None));
    let stats = h.stats();
    assert_eq!((stats.depth, stats.bytes, stats.dropped), (before.depth, before.bytes, 0));
    assert!(!logs.contains("OUTBOX DAMAGED") && !logs.contains("ERROR"), "{logs}");
    assert_eq!(append(&h, Class::Event), 42, "no gap after a clean close");
    close(h, r);
}

#[test]
fn a_crash_leaves_no_summary_and_reopens_as_before() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    append(&h, Class::Event);
    h.shutdown();
    let (h, _r, _) = open_in_memory(&store, &batch_never()).expect("reopen");
    assert_eq!(super::store::Store::close_summary(&store).expect("summary"), None, "removed at open");
    assert_eq!(append_flushed(&h), 2);
    let crashed = store.crashed();
    h.shutdown();

    let ((h, r, report), logs) = with_logs(|| open_in_memory(&crashed, &batch_never()).expect("reopen after crash"));
    assert_eq!(report.next_seq, FLOOR_STEP + 1, "a crash resumes at the floor, as before");
    assert_eq!((report.depth, h.stats().dropped), (2, 0));
    assert_eq!(seqs(&all(&r)), vec![1, 2]);
    assert!(!logs.contains("OUTBOX DAMAGED"), "{logs}");
    h.shutdown();
}

#[test]
fn without_a_summary_a_truncated_database_opens_as_before() {
    // The last run could not leave a summary (it crashed, or writing it
    // failed): nothing to compare with, so the loss goes unnoticed as it
    // did before the summary existed.
    let dir = tempfile::tempdir().expect("tempdir");
    let (before, _) = closed_cleanly_then_truncated(dir.path(), false);
    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("reopen"));
    assert_eq!(report.moved_aside, None);
    assert!(report.depth < before);
    assert_eq!(h.stats().dropped, 0);
    assert!(report.next_seq > before, "seqs still never repeat: they jump to the floor");
    assert!(!logs.contains("OUTBOX DAMAGED"), "{logs}");
    close(h, r);
}

