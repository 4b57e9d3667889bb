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
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures_util::FutureExt;

use super::*;
use crate::config::{Durability, OutboxConfig};

fn cfg(durability: Durability) -> OutboxConfig {
    no_callsite_is_ever_off();
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
        credit: None,
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
    let floor = || super::store::Side::floor(&store).expect("floor");
    let at_open = floor().expect("a new state_dir writes its epoch (with the floor) at open");
    assert_eq!(at_open.r, 1, "nothing assigned yet");
    assert_eq!(append(&h, Class::Event), 1);
    let raised = floor().expect("a floor was written");
    assert!(raised.r > 1);
    assert_eq!(raised.epoch, at_open.epoch);
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
    assert_eq!(h.stats().next_seq, 101, "stats say a hundred records are not durable yet");
    for f in pending.iter_mut() {
        assert!(f.as_mut().now_or_never().is_none(), "resolved before any flush");
    }

    wait(h.flush()).expect("flush");
    assert_eq!(store.flush_count(), base + 1, "one fsync for the whole batch");
    assert_eq!(h.stats().durable_seq, 100);
    assert_eq!(h.stats().next_seq, h.stats().durable_seq + 1, "and now that all are");
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
fn a_record_nobody_waits_on_is_committed_at_the_end_of_its_group_in_always_mode() {
    let store = MemStore::new();
    // The commit deadline is far away: only the end of the group commits.
    let always = OutboxConfig { flush_interval: Duration::from_secs(3600), ..cfg(Durability::Always) };
    let (h, _r, _) = open_in_memory(&store, &always).expect("open");
    let (tx, rx) = std::sync::mpsc::channel();
    h.set_on_durable(Box::new(move |seq| tx.send(seq).expect("send")));
    h.record(draft(Class::Event)).expect("recorded");
    // No flush, no waiter: `always` still commits the group.
    let durable = rx.recv_timeout(Duration::from_secs(30)).expect("a commit");
    assert_eq!(durable, 1);
    assert_eq!(h.stats().durable_seq, 1);
    h.shutdown();
}

#[test]
fn a_commit_hands_over_its_records_complete_for_their_range() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    h.set_on_durable_with_records(Box::new(move |seq, fresh| {
        let f = fresh.map(|f| (f.from, f.upto, seqs(&f.records)));
        sink.lock().expect("lock").push((seq, f));
    }));
    // The first commit after open hands over nothing (what it covers was
    // decided by the database); later ones hand over what they made durable.
    append(&h, Class::Event);
    append(&h, Class::Heartbeat);
    let (a, b) = (h.append(draft(Class::Event)), h.append(draft(Class::Event)));
    assert_eq!((wait(a).expect("durable"), wait(b).expect("durable")), (3, 4));
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen[0], (1, None));
    assert_eq!(seen[1], (2, Some((2, 2, vec![2]))));
    let rest: Vec<u64> = seen[2..].iter().flat_map(|(_, f)| f.clone().expect("a batch").2).collect();
    assert_eq!(rest, vec![3, 4], "every record once, in seq order");
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
    assert!(matches!(r.read(0, u64::MAX, 10), Err(OutboxError::Closed)), "the database is closed");
    assert_eq!(store.crashed().scan_len(), 1, "and the record is still in it");
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
    super::store::tests::overwrite_record(&dir.path().join("outbox"), Class::Event, 1, b"\x02from a future version");
    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    assert!(report.moved_aside.is_some());
    assert_eq!((report.depth, report.replayed, report.lost), (1, 1, 1), "seq 2 is replayed, seq 1 is counted");
    assert!(report.next_seq > 2);
    close(h, r);
}

#[test]
fn a_database_written_before_chunks_opens_and_drains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db_dir = dir.path().join("outbox");
    let records: Vec<Record> = (1..=300u64)
        .map(|seq| {
            let class = if seq % 4 == 0 { Class::Heartbeat } else { Class::Event };
            Record {
                seq,
                ts_ms: 1_763_719_200_000 + seq,
                class,
                qos: Qos::AtLeastOnce,
                retain: false,
                topic: draft(class).topic,
                payload: payload_for(seq, 10),
            }
        })
        .collect();
    let raw: Vec<(Class, u64, Vec<u8>)> =
        records.iter().map(|r| (r.class, r.seq, record::encode(r).expect("encode"))).collect();
    // One key per record, as every build before chunks wrote them.
    super::store::tests::write_like_an_earlier_build(&db_dir, &raw);
    {
        let db = sled::open(&db_dir).expect("raw open");
        let meta = db.open_tree("meta").expect("tree");
        let _old = meta.insert(super::store::META_NEXT_SEQ, record::encode_u64(301).as_slice()).expect("insert");
        let _bytes = db.flush().expect("flush");
    }
    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    assert!(report.moved_aside.is_none());
    assert_eq!((report.depth, report.lost), (300, 0));
    let got = all(&r);
    assert_eq!(seqs(&got), (1..=300).collect::<Vec<_>>());
    assert!(got.iter().zip(&records).all(|(a, b)| a.payload == b.payload && a.class == b.class));
    h.ack(seqs(&got));
    wait(h.flush()).expect("flush");
    close(h, r);
    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open again");
    assert_eq!((report.depth, report.lost, report.moved_aside.is_none()), (0, 0, true), "drained");
    assert!(all(&r).is_empty());
    assert!(append(&h, Class::Event) > 300);
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
        [Class::Heartbeat, Class::Event].into_iter().map(|c| self.scan(c, 0, 0).expect("scan").records).sum()
    }

    /// The owner's bytes of a saved value, as the meta tree holds them.
    fn meta_saved(&self, name: &str) -> Option<Vec<u8>> {
        use super::store::Store;
        let v = self.meta(&super::saved_key(name)).expect("meta")?;
        assert_eq!(v.first(), Some(&super::SAVED_VERSION), "version byte");
        Some(v[1..].to_vec())
    }
}

/// The seq an append reported, also when it was kept in memory or shed
/// during a disk fault.
fn seq_of(result: &Result<u64, OutboxError>) -> Option<u64> {
    match result {
        Ok(seq) => Some(*seq),
        Err(OutboxError::KeptInMemory { seq, .. } | OutboxError::Shed { seq, .. }) => Some(*seq),
        Err(_) => None,
    }
}

/// Random append / ack / flush / shutdown-reopen / crash-reopen steps, and a
/// disk that fills up and frees again, against the real queue logic (over a
/// [`MemStore`]) and a plain model side by side.
#[test]
fn the_outbox_matches_a_plain_model_over_random_steps() {
    for seed in 0..40 {
        run_model(seed);
    }
}

/// The model's view of the outbox.
#[derive(Default)]
struct Model {
    /// seq -> (class, stored size)
    live: BTreeMap<u64, (Class, u64)>,
    /// Acked since the last commit: a crash brings them back.
    unflushed_acks: BTreeMap<u64, (Class, u64)>,
    /// Kept in memory during a disk fault (not on disk yet).
    volatile: BTreeMap<u64, (Class, u64)>,
    dropped: u64,
    /// The disk is full (and the writer has noticed).
    fault: bool,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.live.values().map(|v| v.1).sum()
    }

    /// The `max_bytes` bound: the oldest heartbeat first, then the oldest.
    fn bound(&mut self, max: u64) {
        while self.bytes() > max {
            let victim = self
                .live
                .iter()
                .find(|(_, v)| v.0 == Class::Heartbeat)
                .or_else(|| self.live.iter().next())
                .map(|(k, _)| *k)
                .expect("over the bound means not empty");
            let _gone = self.live.remove(&victim);
            self.dropped += 1;
        }
    }

    /// During a fault, what is kept in memory has its own limit.
    fn retain(&mut self, limit: u64) {
        while self.volatile.values().map(|v| v.1).sum::<u64>() > limit {
            let victim = *self.volatile.keys().next().expect("over the limit means not empty");
            let _gone = self.volatile.remove(&victim);
            let _gone = self.live.remove(&victim);
            self.dropped += 1;
        }
    }

    /// A power cut or an exit while the disk fails: what was only in memory
    /// is gone (and counted), acks not committed come back.
    fn lose_memory(&mut self) {
        for seq in std::mem::take(&mut self.volatile).into_keys() {
            let _gone = self.live.remove(&seq);
            self.dropped += 1;
        }
        self.live.append(&mut self.unflushed_acks);
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
    let mut m = Model::default();
    let mut last_seq = 0u64;
    // The seq the writer hands out next: last_seq + 1, or R after a crash.
    let mut next_seq = 1u64;

    for step in 0..300 {
        let ctx = format!("seed {seed} step {step}");
        // Acks are fire and forget: the queue is only comparable after a
        // step that waited on the writer.
        let mut synced = true;
        let roll = rng.u32(0..100);
        // To debug a failing seed: FIELDLINK_TRACE_MODEL=1 prints every step.
        if std::env::var_os("FIELDLINK_TRACE_MODEL").is_some() {
            let keys = |m: &BTreeMap<u64, (Class, u64)>| m.keys().copied().collect::<Vec<_>>();
            eprintln!(
                "{ctx}: roll {roll} fault {} live {:?} volatile {:?} unflushed {:?} dropped {}",
                m.fault,
                keys(&m.live),
                keys(&m.volatile),
                keys(&m.unflushed_acks),
                m.dropped
            );
        }
        match roll {
            0..55 => {
                let class = if rng.bool() { Class::Heartbeat } else { Class::Event };
                let pad = rng.usize(0..120);
                let result = wait(h.append(draft_padded(class, pad)));
                let seq = seq_of(&result).unwrap_or_else(|| panic!("{ctx}: {result:?}"));
                assert!(seq > last_seq, "{ctx}: seq {seq} after {last_seq}");
                assert_eq!(seq, next_seq, "{ctx}");
                last_seq = seq;
                next_seq = seq + 1;
                let size = record_size(seq, class, pad);
                match (m.fault, class, &result) {
                    (false, _, Ok(_)) => {
                        // The commit for this append covered every earlier ack.
                        m.unflushed_acks.clear();
                        let _new = m.live.insert(seq, (class, size));
                        m.bound(config.max_bytes);
                    }
                    (true, Class::Heartbeat, Err(OutboxError::Shed { .. })) => m.dropped += 1,
                    (true, Class::Event, Err(OutboxError::KeptInMemory { .. })) => {
                        let _new = m.live.insert(seq, (class, size));
                        let _new = m.volatile.insert(seq, (class, size));
                        m.retain(config.max_bytes);
                    }
                    other => panic!("{ctx}: fault {}, {other:?}", m.fault),
                }
            }
            55..72 => {
                let mut acks: Vec<u64> = m.live.keys().copied().filter(|_| rng.u32(0..3) == 0).collect();
                acks.push(rng.u64(0..=last_seq + 2));
                for seq in &acks {
                    if let Some(v) = m.live.remove(seq)
                        && m.volatile.remove(seq).is_none()
                    {
                        let _new = m.unflushed_acks.insert(*seq, v);
                    }
                }
                h.ack(acks);
                synced = false;
            }
            72..80 => {
                let flushed = wait(h.flush());
                assert_eq!(flushed.is_ok(), !m.fault, "{ctx}: {flushed:?}");
                if !m.fault {
                    m.unflushed_acks.clear();
                }
            }
            80..86 => {
                // Shut down, and open again. During a fault whose disk is
                // still full, what was kept in memory is lost and counted,
                // and acks since the last commit come back.
                let result = if m.fault { wait(h.flush()).err() } else { None };
                assert!(result.is_some() == m.fault, "{ctx}");
                h.shutdown();
                drop(r);
                if m.fault {
                    m.lose_memory();
                } else {
                    m.unflushed_acks.clear();
                }
                let (h2, r2, report) = open_in_memory(&store, &config).expect("reopen");
                if m.fault {
                    assert!(report.next_seq > last_seq, "{ctx}: seqs must not repeat");
                    next_seq = report.next_seq;
                } else {
                    assert_eq!(report.next_seq, next_seq, "{ctx}: a clean reopen continues without a gap");
                }
                (h, r) = (h2, r2);
            }
            86..92 => {
                // Cut the power: only what the last commit covered survives
                // (nothing else commits: the interval is an hour and appends
                // are what trigger commits), and the disk is fine afterwards.
                if m.fault {
                    // Let the writer take in every ack first, so the ledger
                    // knows what is kept in memory.
                    assert!(wait(h.flush()).is_err(), "{ctx}");
                }
                let crashed = store.crashed();
                h.shutdown();
                drop(r);
                m.lose_memory();
                m.fault = false;
                store = crashed;
                let (h2, r2, report) = open_in_memory(&store, &config).expect("reopen after crash");
                assert!(report.next_seq > last_seq, "{ctx}: seqs must not repeat after a crash");
                next_seq = report.next_seq;
                (h, r) = (h2, r2);
            }
            92..96 if !m.fault => {
                // The disk fills up; the next write (an event) notices.
                wait(h.flush()).expect("flush");
                m.unflushed_acks.clear();
                store.set_fail_writes(true);
                let pad = rng.usize(0..120);
                let result = wait(h.append(draft_padded(Class::Event, pad)));
                let Err(OutboxError::KeptInMemory { seq, .. }) = result else {
                    panic!("{ctx}: the first write on a full disk: {result:?}")
                };
                assert_eq!(seq, next_seq, "{ctx}");
                last_seq = seq;
                next_seq = seq + 1;
                let size = record_size(seq, Class::Event, pad);
                let _new = m.live.insert(seq, (Class::Event, size));
                let _new = m.volatile.insert(seq, (Class::Event, size));
                m.retain(config.max_bytes);
                m.fault = true;
            }
            _ => {
                // The disk has room again; a flush makes the writer reopen
                // at once and write back what it kept.
                store.set_fail_writes(false);
                wait(h.flush()).unwrap_or_else(|e| panic!("{ctx}: recovery: {e}"));
                m.fault = false;
                m.volatile.clear();
                m.unflushed_acks.clear();
                m.bound(config.max_bytes);
            }
        }
        if synced && !m.fault {
            let got: Vec<(u64, Class)> = all(&r).iter().map(|x| (x.seq, x.class)).collect();
            let want: Vec<(u64, Class)> = m.live.iter().map(|(k, v)| (*k, v.0)).collect();
            assert_eq!(got, want, "{ctx}");
            let stats = h.stats();
            assert_eq!(stats.depth, m.live.len() as u64, "{ctx}");
            assert_eq!(stats.bytes, m.bytes(), "{ctx}");
            assert_eq!(stats.dropped, m.dropped, "{ctx}");
            assert!(!h.disk_fault(), "{ctx}");
        }
        if synced && m.fault {
            assert_eq!(h.stats().dropped, m.dropped, "{ctx}");
        }
    }
    h.shutdown();
}

// ---------------------------------------------------------------------------
// Log capture.

/// Collects log lines from the current thread and from the outbox threads
/// started while it is installed (they inherit the dispatcher).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Tests run in parallel, some capturing logs with their own thread-local
/// subscriber and some with none. tracing caches, per log statement, whether
/// any subscriber wants it; a statement first reached on a thread with no
/// subscriber, at the moment another test installs one, can be cached as
/// wanted by nobody, and the capturing test then misses the line. A global
/// subscriber that wants everything "sometimes" (and records nothing) keeps
/// every statement asking the current thread's subscriber.
fn no_callsite_is_ever_off() {
    struct Sometimes;
    impl tracing::Subscriber for Sometimes {
        fn register_callsite(&self, _: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
            tracing::subscriber::Interest::sometimes()
        }
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            false
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {}
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another test module may have set one first; then that one decides.
        let _already_set = tracing::subscriber::set_global_default(Sometimes);
    });
}

impl Logs {
    /// Installs a subscriber for this thread until the guard is dropped.
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        no_callsite_is_ever_off();
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }

    /// How many lines at `level` (e.g. "ERROR") contain `what`.
    fn count(&self, level: &str, what: &str) -> usize {
        count_lines(&self.text(), level, what)
    }
}

/// How many lines of `logs` at `level` (e.g. "ERROR") contain `what`.
fn count_lines(logs: &str, level: &str, what: &str) -> usize {
    logs.lines().filter(|l| l.contains(level) && l.contains(what)).count()
}

/// The log lines emitted while `f` runs (on this thread and by the outbox
/// threads it starts), and `f`'s result.
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    let (logs, guard) = Logs::capture();
    let out = f();
    drop(guard);
    (out, logs.text())
}

// ---------------------------------------------------------------------------
// The ledger: records a damaged database lost are counted and logged.

fn ledger_path(state: &Path) -> PathBuf {
    state.join("outbox.ledger")
}

/// Cuts the sled `db` file to `len` bytes, as a damaged disk or a careless
/// copy would.
fn truncate_db(state: &Path, len: u64) {
    let db = state.join("outbox").join("db");
    assert!(fs::metadata(&db).expect("db file").len() > len, "the db file is already shorter than {len} bytes");
    fs::OpenOptions::new().write(true).open(&db).expect("open db").set_len(len).expect("truncate");
}

/// Copies a directory tree (the files as they are on disk right now).
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            let _bytes = fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn records_lost_from_sled_after_a_clean_close_are_counted_as_dropped_and_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    let before: Vec<u64> = (0..41).map(|_| append(&h, Class::Event)).collect();
    let closed_next = before.last().expect("appended") + 1;
    close(h, r);
    assert!(ledger_path(dir.path()).exists(), "every commit writes the ledger");
    truncate_db(dir.path(), 3000);

    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("reopen"));
    assert_eq!(report.moved_aside, None, "sled opened the damaged file without an error");
    let after = report.depth;
    assert!(after < 41, "the truncation made sled recover an older state ({after} of 41 records)");
    let lost = 41 - after;
    assert_eq!((report.lost, h.stats().dropped), (lost, lost), "every record missing is counted");
    assert_eq!(all(&r).len() as u64, after);
    let line = format!("{lost} records lost from a damaged outbox");
    assert_eq!(count_lines(&logs, "ERROR", &line), 1, "one loud line: {logs}");
    assert!(report.next_seq > closed_next, "next_seq {} could repeat a seq handed out", report.next_seq);
    assert!(report.next_seq >= FLOOR_STEP, "resumes at the floor");
    assert_eq!(append(&h, Class::Event), report.next_seq);
    close(h, r);

    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("reopen again"));
    assert_eq!(h.stats().dropped, lost, "the drops are persisted, and counted once");
    assert_eq!((report.depth, report.lost), (after + 1, 0));
    assert!(!logs.contains("OUTBOX DAMAGED"), "{logs}");
    close(h, r);
}

#[test]
fn records_lost_to_damage_after_a_crash_are_counted_as_dropped() {
    let live = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(live.path(), &cfg(Durability::Always)).expect("open");
    let stored: Vec<u64> =
        (0..300).map(|_| append(&h, if rng_is_heartbeat() { Class::Heartbeat } else { Class::Event })).collect();
    h.ack(stored[..100].to_vec());
    wait(h.flush()).expect("flush");
    // A power cut now: the files as they are on disk, with the outbox open.
    let crashed = tempfile::tempdir().expect("tempdir");
    copy_dir(live.path(), crashed.path());
    close(h, r);
    let _lock = fs::remove_file(crashed.path().join("outbox.lock"));
    truncate_db(crashed.path(), fs::metadata(crashed.path().join("outbox/db")).expect("db").len() / 2);

    let ((h, r, report), logs) = with_logs(|| open(crashed.path(), &cfg(Durability::Always)).expect("open"));
    let found: Vec<u64> = seqs(&all(&r)).into_iter().filter(|s| *s > stored[99]).collect();
    let missing = 200 - found.len() as u64;
    assert!(missing > 0, "half the db file is gone: some records are missing");
    assert_eq!(report.lost, missing, "exactly the missing ones are counted (acks were in order)");
    assert_eq!(h.stats().dropped, missing);
    assert_eq!(count_lines(&logs, "ERROR", &format!("{missing} records lost from a damaged outbox")), 1, "{logs}");
    close(h, r);
}

/// Every seventh record is a heartbeat.
fn rng_is_heartbeat() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed).is_multiple_of(7)
}

#[test]
fn a_database_rolled_back_behind_its_last_commit_counts_the_loss_and_never_repeats_seqs() {
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
    // A record too large to encode: refused and counted, so `dropped` is 1.
    assert!(wait(h.append(draft_padded(Class::Event, MAX_RECORD_BYTES))).is_err());
    let stats = h.stats();
    assert_eq!((stats.depth, stats.dropped), (10, 1));
    h.shutdown();

    // The database goes back to `older`: 5 records, dropped 0, next_seq 6
    // and `clean` set, which alone would resume seqs at 6.
    let damaged = store.rolled_back_to(&older);
    let ((h, r, report), logs) = with_logs(|| open_in_memory(&damaged, &cfg(Durability::Always)).expect("open"));
    assert_eq!(report.depth, 5);
    assert_eq!(h.stats().dropped, 1 + 5, "the ledger's drops, plus the 5 records lost");
    assert!(logs.contains("5 records lost from a damaged outbox"), "{logs}");
    assert_eq!(seqs(&all(&r)), vec![1, 2, 3, 4, 5]);
    assert_eq!(report.next_seq, FLOOR_STEP + 1, "at least max(the ledger's next_seq 12, the floor)");
    assert_eq!(append(&h, Class::Event), FLOOR_STEP + 1);
    h.shutdown();
}

#[test]
fn a_clean_close_followed_by_an_undamaged_reopen_counts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    let stored: Vec<u64> = (0..41).map(|_| append(&h, Class::Event)).collect();
    h.ack(stored[..10].to_vec());
    wait(h.flush()).expect("flush");
    let before = h.stats();
    close(h, r);

    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("reopen"));
    assert_eq!((report.depth, report.next_seq, report.lost, report.moved_aside.clone()), (31, 42, 0, None));
    let stats = h.stats();
    assert_eq!((stats.depth, stats.bytes, stats.dropped), (before.depth, before.bytes, 0));
    assert!(!logs.contains("OUTBOX DAMAGED") && !logs.contains("ERROR"), "{logs}");
    assert_eq!(append(&h, Class::Event), 42, "no gap after a clean close");
    close(h, r);
}

#[test]
fn a_crash_without_damage_counts_nothing_and_resumes_at_the_floor() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    append(&h, Class::Event);
    h.shutdown();
    let (h, _r, _) = open_in_memory(&store, &batch_never()).expect("reopen");
    assert_eq!(append_flushed(&h), 2);
    // Appended, not committed: lost by the crash, but never durable either.
    let _pending = h.append(draft(Class::Event));
    let crashed = store.crashed();
    h.shutdown();

    let ((h, r, report), logs) = with_logs(|| open_in_memory(&crashed, &batch_never()).expect("reopen after crash"));
    assert_eq!(report.next_seq, FLOOR_STEP + 1, "a crash resumes at the floor");
    assert_eq!((report.depth, report.lost, h.stats().dropped), (2, 0, 0));
    assert_eq!(seqs(&all(&r)), vec![1, 2]);
    assert!(!logs.contains("OUTBOX DAMAGED"), "{logs}");
    h.shutdown();
}

#[test]
fn deleting_the_database_directory_counts_every_record_it_held_and_keeps_the_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, first) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    let stored: Vec<u64> = (0..30).map(|_| append(&h, Class::Event)).collect();
    close(h, r);
    fs::remove_dir_all(dir.path().join("outbox")).expect("rm -r outbox");

    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("open"));
    assert_eq!((report.depth, report.lost, h.stats().dropped), (0, 30, 30));
    assert!(logs.contains("30 records lost from a damaged outbox"), "{logs}");
    assert_eq!((report.epoch, report.new_epoch), (first.epoch, false), "seq.floor survived: same epoch");
    assert!(append(&h, Class::Event) > *stored.last().expect("stored"), "seqs never repeat");
    close(h, r);
}

#[test]
fn a_legacy_close_summary_is_checked_once_and_removed() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    for _ in 0..3 {
        append(&h, Class::Event);
    }
    h.shutdown();
    let older = store.crashed();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("reopen");
    for _ in 0..4 {
        append(&h, Class::Event);
    }
    h.shutdown();
    // As a build before the ledger left it: a close summary, no ledger;
    // then the database went back to `older`.
    store.forget_ledger();
    store.put_close_summary(record::CloseSummary { next_seq: 8, depth: 7, bytes: 0, dropped: 0 });
    let damaged = store.rolled_back_to(&older);
    let ((h, _r, report), logs) = with_logs(|| open_in_memory(&damaged, &cfg(Durability::Always)).expect("open"));
    assert_eq!((report.depth, report.lost, h.stats().dropped), (3, 4, 4));
    assert!(logs.contains("4 records lost from a damaged outbox"), "{logs}");
    assert_eq!(super::store::Side::close_summary(&damaged).expect("summary"), None, "removed at open");
    h.shutdown();
}

#[test]
fn a_database_moved_aside_is_salvaged_and_its_records_replayed_with_their_original_payloads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    let stored: Vec<u64> = (0..6).map(|i| append(&h, if i == 2 { Class::Heartbeat } else { Class::Event })).collect();
    h.ack(vec![stored[0]]);
    wait(h.save(vec![relays(b"pump=on")], true)).expect("save");
    wait(h.flush()).expect("flush");
    close(h, r);
    // The oldest live event no longer decodes: the database is moved aside.
    super::store::tests::overwrite_record(
        &dir.path().join("outbox"),
        Class::Event,
        stored[1],
        b"\x02from a future version",
    );

    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("open"));
    assert!(report.moved_aside.is_some(), "{logs}");
    assert_eq!((report.replayed, report.lost), (4, 1), "4 readable live records replayed, the bad one counted");
    assert_eq!(h.stats().dropped, 1);
    let got = all(&r);
    let original: Vec<u64> = got
        .iter()
        .map(|rec| {
            let v: serde_json::Value = serde_json::from_slice(&rec.payload).expect("payload");
            v["seq"].as_u64().expect("seq in the payload")
        })
        .collect();
    assert_eq!(original, stored[2..].to_vec(), "original payloads (and their seqs), in their original order");
    assert_eq!(got[0].class, Class::Heartbeat);
    assert!(got.iter().all(|rec| rec.seq >= FLOOR_STEP), "new outbox seqs, above every old one");
    assert_eq!(count_lines(&logs, "ERROR", "OUTBOX CORRUPT"), 1, "{logs}");
    assert!(logs.contains("1 records lost from a damaged outbox"), "{logs}");
    let next = append(&h, Class::Event);
    assert!(next > got.last().expect("replayed").seq, "new records come after the replayed ones");
    assert_eq!(
        r.saved("relays").expect("read").as_deref(),
        Some(b"pump=on".as_slice()),
        "the relays' saved state survives the move aside"
    );
    close(h, r);
}

#[test]
fn an_unreadable_database_moved_aside_counts_its_records_as_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, first) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    for _ in 0..3 {
        append(&h, Class::Event);
    }
    close(h, r);
    garbage_over_files(&dir.path().join("outbox"), None);

    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("open"));
    assert!(report.moved_aside.is_some(), "{logs}");
    assert_eq!((report.replayed, report.lost, h.stats().dropped), (0, 3, 3));
    assert_eq!(report.epoch, first.epoch);
    assert!(logs.contains("3 records lost from a damaged outbox"), "{logs}");
    close(h, r);
}

/// Random byte damage to a real sled `db` file, many times over: open never
/// panics (sled does, e.g. `serialization.rs:662`, and it is caught), it
/// either opens or moves the database aside, and a record that is gone is
/// counted: the records still there plus `dropped` cover every record that
/// was live.
#[test]
fn random_damage_to_the_sled_db_file_never_panics_and_never_loses_records_silently() {
    let template = tempfile::tempdir().expect("tempdir");
    let live: Vec<u64> = {
        let (h, r, _) = open(template.path(), &cfg(Durability::Batch)).expect("open");
        let pending: Vec<_> = (0..3000)
            .map(|i| h.append(draft_padded(if i % 5 == 0 { Class::Heartbeat } else { Class::Event }, 150)))
            .collect();
        wait(h.flush()).expect("flush");
        let stored: Vec<u64> = pending.into_iter().map(|f| wait(f).expect("append")).collect();
        // Acked in order, as the Link does.
        h.ack(stored[..1000].to_vec());
        wait(h.flush()).expect("flush");
        close(h, r);
        stored[1000..].to_vec()
    };
    let (mut opened, mut aside, mut counted) = (0, 0, 0);
    for seed in 0..64u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(template.path(), dir.path());
        let db = dir.path().join("outbox/db");
        let mut bytes = fs::read(&db).expect("read");
        let mut rng = fastrand::Rng::with_seed(seed);
        for _ in 0..3 {
            let at = rng.usize(0..bytes.len() - 32);
            rng.fill(&mut bytes[at..at + 32]);
        }
        fs::write(&db, &bytes).expect("write");

        let (h, r, report) = open(dir.path(), &cfg(Durability::Always))
            .unwrap_or_else(|e| panic!("seed {seed}: open must recover, not fail: {e}"));
        if report.moved_aside.is_some() {
            aside += 1;
        } else {
            opened += 1;
        }
        let got = r.read(0, u64::MAX, usize::MAX).unwrap_or_else(|e| panic!("seed {seed}: read: {e}"));
        let found: std::collections::BTreeSet<u64> = got
            .iter()
            .filter_map(|rec| serde_json::from_slice::<serde_json::Value>(&rec.payload).ok()?["seq"].as_u64())
            .filter(|s| live.binary_search(s).is_ok())
            .collect();
        let dropped = h.stats().dropped;
        assert!(
            found.len() as u64 + dropped >= live.len() as u64,
            "seed {seed}: {} of {} live records found and {dropped} dropped (moved aside: {:?})",
            found.len(),
            live.len(),
            report.moved_aside
        );
        if (found.len() as u64) < live.len() as u64 {
            counted += 1;
        }
        assert!(seq_of(&wait(h.append(draft(Class::Event)))).is_some(), "seed {seed}: the outbox works");
        close(h, r);
    }
    println!("random damage: {opened} opened in place, {aside} moved aside, {counted} with counted losses");
    assert!(aside > 0 && opened > 0, "both outcomes were exercised: {opened} opened, {aside} moved aside");
}

// ---------------------------------------------------------------------------
// Disk faults: sled's I/O error is sticky; the writer reopens the database.

#[test]
fn a_full_disk_keeps_events_in_memory_sheds_heartbeats_and_recovers_without_a_restart() {
    let (logs, _guard) = Logs::capture();
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    assert_eq!(append(&h, Class::Event), 1);
    store.set_fail_writes(true);

    let kept = wait(h.append(draft(Class::Event)));
    assert!(matches!(kept, Err(OutboxError::KeptInMemory { seq: 2, .. })), "{kept:?}");
    assert!(kept.as_ref().err().is_some_and(|e| e.to_string().contains("kept in memory")));
    let shed = wait(h.append(draft(Class::Heartbeat)));
    assert!(matches!(shed, Err(OutboxError::Shed { seq: 3, .. })), "{shed:?}");
    assert!(h.disk_fault());
    assert_eq!(h.stats().dropped, 1, "the shed heartbeat");
    assert!(wait(h.flush()).is_err(), "nothing can be made durable while the disk is full");
    assert_eq!(h.stats().durable_seq, 1);
    assert_eq!(logs.count("ERROR", "OUTBOX DISK FAULT"), 1, "one loud line: {}", logs.text());

    store.set_fail_writes(false);
    wait(h.flush()).expect("the flush reopens the database and writes back what was kept");
    assert!(!h.disk_fault());
    assert_eq!(store.reopen_count(), 1);
    assert_eq!(seqs(&all(&r)), vec![1, 2], "the event kept in memory is on disk now");
    assert_eq!(h.stats().durable_seq, 3);
    assert_eq!(append(&h, Class::Event), 4, "appends are durable again");
    assert_eq!(logs.count("WARN", "the disk can be written again"), 1, "{}", logs.text());
    h.shutdown();
    drop(r);

    let (h, r, report) = open_in_memory(&store, &cfg(Durability::Always)).expect("reopen");
    assert_eq!(h.stats().dropped, 1, "the drop count survives the reopen and the restart");
    assert_eq!((report.lost, seqs(&all(&r))), (0, vec![1, 2, 4]));
    h.shutdown();
}

#[test]
fn without_a_flush_the_writer_reopens_on_its_own_with_back_off() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    store.set_fail_writes(true);
    assert!(matches!(wait(h.append(draft(Class::Event))), Err(OutboxError::KeptInMemory { seq: 1, .. })));
    store.set_fail_writes(false);
    // The first reopen is due after max(flush_interval, 100 ms); poll.
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.disk_fault() {
        assert!(Instant::now() < deadline, "the writer never reopened the database");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(seqs(&all(&r)), vec![1]);
    assert_eq!(store.crashed().scan_len(), 1, "and it is durable");
    h.shutdown();
}

#[test]
fn acks_during_a_disk_fault_are_applied_after_the_reopen() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    let stored: Vec<u64> = (0..3).map(|_| append(&h, Class::Event)).collect();
    store.set_fail_writes(true);
    let kept = seq_of(&wait(h.append(draft(Class::Event)))).expect("kept");
    h.ack(vec![stored[0], stored[1], kept]);
    assert!(wait(h.flush()).is_err());
    store.set_fail_writes(false);
    wait(h.flush()).expect("recovered");
    assert_eq!(seqs(&all(&r)), vec![stored[2]]);
    assert_eq!(h.stats().depth, 1);
    h.shutdown();
}

#[test]
fn records_are_confirmed_once_sled_has_them_and_a_failed_ledger_write_behind_them_loses_and_revives_nothing() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    let announced = Arc::new(Mutex::new(Vec::new()));
    let sink = announced.clone();
    h.set_on_durable(Box::new(move |seq| sink.lock().expect("lock").push(seq)));
    let stored: Vec<u64> = (0..2).map(|_| append(&h, Class::Event)).collect();
    // Their ledger entries may still be on the ledger's thread (a group
    // that held two messages sends them there): `flush` waits for them.
    wait(h.flush()).expect("flushed");
    store.set_fail_ledger(true);
    // sled has it on disk: the Link may publish it and its appender hears
    // "durable"; the ledger entry behind it (urgent: written on the
    // ledger's thread) fails, and the next group finds out.
    let third = wait(h.append_urgent(draft(Class::Event), Vec::new()));
    let third = third.expect("durable in the database");
    assert_eq!(*announced.lock().expect("lock"), vec![stored[0], stored[1], third]);
    assert_eq!(store.crashed().scan_len(), 3, "a power cut now keeps all three");
    // The broker acknowledged the third before the disk recovered.
    h.ack(vec![third]);
    assert!(wait(h.flush()).is_err(), "still in the fault");
    store.set_fail_ledger(false);
    wait(h.flush()).expect("recovered");
    assert_eq!(seqs(&all(&r)), stored, "the acked record is not written back");
    assert_eq!(store.crashed().scan_len(), 2);
    let stats = h.stats();
    assert_eq!((stats.depth, stats.dropped), (2, 0));
    h.shutdown();
}

#[test]
fn a_crash_during_a_disk_fault_counts_the_events_kept_in_memory_as_dropped() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    append(&h, Class::Event);
    store.set_fail_writes(true);
    for _ in 0..2 {
        assert!(matches!(wait(h.append(draft(Class::Event))), Err(OutboxError::KeptInMemory { .. })));
    }
    assert!(matches!(wait(h.append(draft(Class::Heartbeat))), Err(OutboxError::Shed { .. })));
    let crashed = store.crashed();
    h.shutdown();

    let ((h, r, report), logs) = with_logs(|| open_in_memory(&crashed, &cfg(Durability::Always)).expect("open"));
    assert_eq!((report.lost, h.stats().dropped), (2, 1 + 2), "the shed heartbeat, and the 2 kept events");
    assert!(logs.contains("2 records kept in memory during a disk fault were lost"), "{logs}");
    assert_eq!(seqs(&all(&r)), vec![1]);
    h.shutdown();
}

#[test]
fn shutting_down_during_a_disk_fault_counts_what_it_could_not_write() {
    let store = MemStore::new();
    let (h, _r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    store.set_fail_writes(true);
    assert!(matches!(wait(h.append(draft(Class::Event))), Err(OutboxError::KeptInMemory { .. })));
    let (_, logs) = with_logs(|| h.shutdown());
    let _ = logs; // the writer thread logs to the subscriber it was started with
    store.set_fail_writes(false);
    let (h, _r, report) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    assert_eq!((report.depth, h.stats().dropped), (0, 1));
    h.shutdown();
}

#[test]
fn over_the_retain_limit_during_a_fault_the_oldest_kept_records_are_dropped() {
    let store = MemStore::new();
    let probe = cfg(Durability::Always);
    let (h, _r, _) = open_in_memory(&store, &probe).expect("open");
    let first = append(&h, Class::Event);
    let size = h.stats().bytes;
    h.ack(vec![first]);
    h.shutdown();

    let small = OutboxConfig { max_bytes: 3 * size, ..probe };
    let (h, r, _) = open_in_memory(&store, &small).expect("reopen");
    store.set_fail_writes(true);
    let kept: Vec<u64> = (0..5).map(|_| seq_of(&wait(h.append(draft(Class::Event)))).expect("seq")).collect();
    assert_eq!(h.stats().dropped, 2, "only 3 records fit in the limit");
    store.set_fail_writes(false);
    wait(h.flush()).expect("recovered");
    assert_eq!(seqs(&all(&r)), kept[2..].to_vec(), "the newest 3 survive");
    h.shutdown();
}

/// Unmounts a tmpfs when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "4m"), or says why it cannot.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount refused: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Best effort: a failed unmount leaves a small tmpfs behind, nothing worse.
        let _status = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// A real sled on a real full disk (a 4 MiB tmpfs filled up), then space
/// freed: the writer reopens the database without a restart, every event is
/// on disk afterwards and nothing was dropped but shed heartbeats.
#[test]
fn a_real_full_disk_is_recovered_once_space_returns() {
    let fs = match Tmpfs::mount("4m") {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED a_real_full_disk_is_recovered_once_space_returns: {why}");
            return;
        }
    };
    let state = fs.path().join("state");
    let (h, r, _) = open(&state, &cfg(Durability::Always)).expect("open");
    // Leave about 100 KiB free.
    let filler = fs.path().join("filler");
    let free = nix::sys::statvfs::statvfs(fs.path()).expect("statvfs");
    let avail = free.blocks_available() as u64 * free.fragment_size() as u64;
    fs::write(&filler, vec![0u8; avail.saturating_sub(100 << 10) as usize]).expect("filler");

    let mut events = Vec::new();
    let mut shed = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !h.disk_fault() {
        assert!(Instant::now() < deadline, "the disk never filled up");
        let result = wait(h.append(draft_padded(Class::Event, 400)));
        events.push(seq_of(&result).unwrap_or_else(|| panic!("{result:?}")));
    }
    // A few more while it is full: kept in memory, heartbeats shed.
    for _ in 0..5 {
        events.push(seq_of(&wait(h.append(draft_padded(Class::Event, 400)))).expect("seq"));
        assert!(matches!(wait(h.append(draft(Class::Heartbeat))), Err(OutboxError::Shed { .. })));
        shed += 1;
    }
    fs::remove_file(&filler).expect("free the space");
    while wait(h.flush()).is_err() {
        assert!(Instant::now() < deadline, "the outbox never recovered");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(!h.disk_fault());
    assert_eq!(seqs(&all(&r)), events, "every event is stored, none lost");
    assert_eq!(h.stats().dropped, shed);
    assert!(append(&h, Class::Event) > *events.last().expect("events"));
    close(h, r);
    let (h, r, report) = open(&state, &cfg(Durability::Always)).expect("reopen");
    assert_eq!((report.lost, h.stats().dropped, all(&r).len()), (0, shed, events.len() + 1));
    close(h, r);
}

// ---------------------------------------------------------------------------
// The epoch.

#[test]
fn a_new_state_dir_gets_an_epoch_that_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("open"));
    let now_ms = std::time::SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64;
    assert!(report.new_epoch);
    assert!(report.epoch <= now_ms && report.epoch > now_ms - 60_000, "unix ms at open: {}", report.epoch);
    assert_eq!(h.epoch(), report.epoch);
    assert!(!logs.contains("WARN"), "a first start is no warning: {logs}");
    append(&h, Class::Event);
    close(h, r);
    let (h, r, again) = open(dir.path(), &cfg(Durability::Always)).expect("reopen");
    assert_eq!((again.epoch, again.new_epoch), (report.epoch, false));
    close(h, r);
}

#[test]
fn a_version_1_floor_keeps_epoch_0_so_an_existing_deployment_keeps_its_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    append(&h, Class::Event);
    close(h, r);
    // What a build before epochs wrote: 0x01, then R.
    fs::write(dir.path().join("seq.floor"), record::encode_u64(FLOOR_STEP + 1)).expect("v1 floor");
    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    assert_eq!((report.epoch, report.new_epoch, h.epoch()), (0, false, 0));
    assert_eq!(append(&h, Class::Event), 2);
    close(h, r);
}

#[test]
fn a_lost_floor_starts_a_new_epoch_logged_at_warn_and_seqs_still_do_not_restart() {
    for damage in ["delete", "garbage"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (h, r, first) = open(dir.path(), &cfg(Durability::Always)).expect("open");
        let last = (0..3).map(|_| append(&h, Class::Event)).max().expect("appended");
        close(h, r);
        let floor = dir.path().join("seq.floor");
        match damage {
            "delete" => fs::remove_file(&floor).expect("rm"),
            _ => fs::write(&floor, b"garbage").expect("garbage"),
        }
        // A new epoch is the clock in ms: make sure it moved.
        thread::sleep(Duration::from_millis(2));
        let ((h, r, report), logs) = with_logs(|| open(dir.path(), &cfg(Durability::Always)).expect("open"));
        assert!(report.new_epoch, "{damage}");
        assert_ne!(report.epoch, first.epoch, "{damage}");
        assert_eq!(count_lines(&logs, "WARN", "starting a new epoch"), 1, "{damage}: {logs}");
        assert!(report.next_seq > last, "{damage}: the ledger still knows where seqs were");
        close(h, r);
        let (h, r, again) = open(dir.path(), &cfg(Durability::Always)).expect("reopen");
        assert_eq!((again.epoch, again.new_epoch), (report.epoch, false), "{damage}: the new epoch is kept");
        close(h, r);
    }
}

// ---------------------------------------------------------------------------
// The reader thread.

#[test]
fn read_async_reads_on_the_outbox_reader_thread_not_the_callers() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    append(&h, Class::Event);
    // Hold the database as a reopen would: a read must wait for it, and
    // only the reader thread may be the one waiting.
    let slot = r.slot.clone();
    let held = slot.write();
    let mut pending = Box::pin(r.read_async(0, u64::MAX, 10));
    assert!(pending.as_mut().now_or_never().is_none(), "the caller's thread did not block on the read");
    drop(held);
    assert_eq!(seqs(&wait(pending).expect("read")), vec![1]);
    h.shutdown();
}

#[test]
fn a_read_while_the_database_is_closed_for_a_reopen_fails_instead_of_returning_nothing() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    append(&h, Class::Event);
    let saved = r.slot.write().take();
    assert!(matches!(r.read(0, u64::MAX, 10), Err(OutboxError::Unavailable)));
    assert!(matches!(wait(r.read_async(0, u64::MAX, 10)), Err(OutboxError::Unavailable)));
    assert_eq!(r.oldest_ts_ms(), None);
    *r.slot.write() = saved;
    assert_eq!(seqs(&all(&r)), vec![1]);
    h.shutdown();
}

// ---------------------------------------------------------------------------
// Closing lets go (invariant 10): a reopen right after a shutdown is never
// locked out by this process.

/// Whether anything still holds sled's flock on `<state>/outbox/db` (sled's
/// threads, or a forked child's copy of its descriptor).
fn sled_db_is_locked(state: &Path) -> bool {
    let db = fs::File::open(state.join("outbox").join("db")).expect("open the db file");
    match db.try_lock() {
        Ok(()) => {
            db.unlock().expect("unlock");
            false
        }
        Err(fs::TryLockError::WouldBlock) => true,
        Err(fs::TryLockError::Error(e)) => panic!("cannot probe the db file's lock: {e}"),
    }
}

#[test]
fn a_reader_kept_after_shutdown_does_not_keep_the_state_dir_locked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (h, r, _) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    let seq = append(&h, Class::Event);
    // The Link's reader, and a read queued on the reader thread, outlive
    // the shutdown.
    let queued = r.read_async(0, u64::MAX, 10);
    h.shutdown();
    assert!(!sled_db_is_locked(dir.path()), "sled let go of its files before shutdown returned");
    let (h2, r2, report) = open(dir.path(), &cfg(Durability::Always)).expect("reopen while the old reader lives");
    assert_eq!((report.depth, report.lost), (1, 0));
    assert_eq!(seqs(&all(&r2)), vec![seq]);
    assert!(matches!(r.read(0, u64::MAX, 10), Err(OutboxError::Closed)), "the old reader reads nothing");
    let queued = wait(queued);
    assert!(matches!(&queued, Ok(records) if seqs(records) == vec![seq]) || matches!(queued, Err(OutboxError::Closed)));
    close(h2, r2);
    drop((h, r));
}

/// What made `a_lost_floor_starts_a_new_epoch...` fail now and then under
/// `cargo test --lib`: other tests spawn processes (`mount`, `strace`), and
/// a child forked while the outbox closes holds copies of its descriptors,
/// and with them the flocks on `outbox.lock` and sled's `db`, until it
/// execs. Here another thread spawns processes all the time while the
/// outbox is closed and reopened; every reopen must work at once, and after
/// every close sled's file must be free.
#[test]
fn reopening_right_after_shutdown_works_while_another_thread_spawns_processes() {
    const CYCLES: usize = 60;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spawner = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut spawned = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = std::process::Command::new("true").status() {
                    return Err(format!("cannot spawn `true`: {e}"));
                }
                spawned += 1;
            }
            Ok(spawned)
        })
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    let mut last = 0;
    for cycle in 0..CYCLES {
        match open(dir.path(), &cfg(Durability::Always)) {
            Ok((h, r, _)) => {
                let seq = append(&h, Class::Event);
                assert!(seq > last, "seqs increase across reopens");
                last = seq;
                close(h, r);
                if sled_db_is_locked(dir.path()) {
                    failures.push(format!("cycle {cycle}: sled's db file still locked after close"));
                }
            }
            Err(e) => failures.push(format!("cycle {cycle}: {e}")),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let spawned = spawner.join().expect("spawner thread");
    let spawned = match spawned {
        Ok(n) => n,
        Err(why) => {
            println!("SKIPPED reopening_right_after_shutdown_works_while_another_thread_spawns_processes: {why}");
            return;
        }
    };
    println!("{CYCLES} close/reopen cycles while {spawned} processes were spawned");
    assert!(failures.is_empty(), "{} of {CYCLES} reopens failed: {failures:#?}", failures.len());
    let (h, r, report) = open(dir.path(), &cfg(Durability::Always)).expect("open");
    assert_eq!(report.depth, CYCLES as u64, "every record survived the cycles");
    close(h, r);
}

// ---------------------------------------------------------------------------
// `always` is an fsync: checked with strace.

/// Env var that turns the child test below into a workload.
const STRACE_CHILD_DIR: &str = "FIELDLINK_OUTBOX_STRACE_DIR";
const STRACE_APPENDS: usize = 10;

/// The workload the strace test traces: 10 `always` appends, each awaited
/// (so each is its own group commit). Does nothing unless run by that test.
#[test]
#[ignore = "run by always_mode_fdatasyncs_the_database_for_every_group_and_the_ledger_behind_it under strace"]
fn strace_child_appends_in_always_mode() {
    let Some(dir) = std::env::var_os(STRACE_CHILD_DIR) else { return };
    let (h, r, _) = open(Path::new(&dir), &cfg(Durability::Always)).expect("open");
    append(&h, Class::Event); // writes the floor: not counted
    // An append is answered once sled has it; its ledger entry is written
    // after that. Flushing waits for it, so the floor's entry is not
    // counted in the window (CI stop 14 counted 11 for 10 without this).
    wait(h.flush()).expect("flush");
    println!("STRACE-MARK-BEGIN");
    for _ in 0..STRACE_APPENDS {
        append(&h, Class::Event);
    }
    wait(h.flush()).expect("flush");
    println!("STRACE-MARK-END");
    close(h, r);
}

#[test]
fn always_mode_fdatasyncs_the_database_for_every_group_and_the_ledger_behind_it() {
    let Some(strace) = ["/usr/bin/strace", "/bin/strace"].into_iter().map(Path::new).find(|p| p.exists()) else {
        println!(
            "SKIPPED always_mode_fdatasyncs_the_database_for_every_group_and_the_ledger_behind_it: strace is not installed"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let trace = dir.path().join("trace");
    let state = dir.path().join("state");
    let out = std::process::Command::new(strace)
        .args(["-f", "-y", "-e", "trace=fsync,fdatasync,sync_file_range,write", "-o"])
        .arg(&trace)
        .arg(std::env::current_exe().expect("test binary"))
        .args(["--exact", "outbox::tests::strace_child_appends_in_always_mode", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(STRACE_CHILD_DIR, &state)
        .output()
        .expect("run strace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && (stderr.contains("ptrace") || stderr.contains("Operation not permitted")) {
        println!(
            "SKIPPED always_mode_fdatasyncs_the_database_for_every_group_and_the_ledger_behind_it: {}",
            stderr.trim()
        );
        return;
    }
    assert!(out.status.success(), "the traced workload failed: {stderr}");
    let text = fs::read_to_string(&trace).expect("trace");
    // Only the timed appends: between the two marks the workload printed.
    let begin = text.find("STRACE-MARK-BEGIN").expect("begin mark in the trace");
    let end = text.find("STRACE-MARK-END").expect("end mark in the trace");
    let window = &text[begin..end];
    let count = |call: &str, file: &str| {
        // A call another thread interrupts is printed `<unfinished ...>`,
        // its result on a later line without the file: count the call.
        window
            .lines()
            .filter(|l| {
                l.contains(&format!("{call}("))
                    && l.contains(file)
                    && (l.contains("= 0") || l.contains("<unfinished ...>"))
            })
            .count()
    };
    let db = count("fdatasync", "/outbox/db>");
    let ledger = count("fdatasync", "/outbox.ledger>");
    let sfr = count("sync_file_range", "/outbox/db>");
    println!(
        "{STRACE_APPENDS} always appends: {db} fdatasync of outbox/db, {ledger} of outbox.ledger, {sfr} sync_file_range"
    );
    assert!(db >= STRACE_APPENDS, "one fdatasync of the sled db file per group: {db}\n{window}");
    // The ledger is written behind the commits on its own thread
    // (`ledger_sync.rs`): entries that wait while one is written are
    // coalesced, so there may be fewer, never none.
    assert!((1..=db).contains(&ledger), "the ledger keeps up with the groups: {ledger} for {db}\n{window}");
    assert_eq!(sfr, 0, "sled's log writes end in fdatasync, not sync_file_range (vendor/sled/PATCHED.md, patch 4)");
}

// ---------------------------------------------------------------------------
// Urgent appends and saved values (#8)

/// Waits for `f` with a generous deadline that is still far short of
/// `batch_never`'s hour: `None` there means it waited for `flush_interval`.
fn within_30s<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), f).await })
        .expect("not left waiting for flush_interval")
}

fn relays(bytes: &[u8]) -> Saved {
    Saved { name: "relays".into(), bytes: bytes.to_vec() }
}

#[test]
fn an_urgent_append_in_batch_mode_is_committed_at_once_with_the_telemetry_before_it() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &batch_never()).expect("open");
    wait(h.flush()).expect("flush the open");
    let flushes = store.flush_count();
    // Telemetry waits for flush_interval (an hour here) ...
    let telemetry = h.append(draft(Class::Heartbeat));
    // ... until a command's record needs the commit: a deadline of 30 s is
    // generous for a commit and far short of the hour.
    let seq = within_30s(h.append_urgent(draft(Class::Event), Vec::new())).expect("durable");
    assert_eq!(wait(telemetry).expect("rode along"), seq - 1);
    assert_eq!(store.flush_count() - flushes, 1, "one commit for both");
    assert_eq!(store.crashed().scan_len(), 2, "both durable");
    drop(r);
    h.shutdown();
}

#[test]
fn a_saved_value_is_durable_in_the_same_commit_as_the_record_it_rides_on() {
    for config in [cfg(Durability::Always), batch_never()] {
        let store = MemStore::new();
        let (h, r, _) = open_in_memory(&store, &config).expect("open");
        wait(h.flush()).expect("flush the open");
        let flushes = store.flush_count();
        wait(h.append_urgent(draft(Class::Event), vec![relays(b"v1")])).expect("durable");
        assert_eq!(store.flush_count() - flushes, 1, "{:?}: one commit", config.durability);
        assert_eq!(r.saved("relays").expect("read"), Some(b"v1".to_vec()));
        // A power cut now keeps both.
        let crashed = store.crashed();
        let (h2, r2, _) = open_in_memory(&crashed, &config).expect("reopen after the crash");
        assert_eq!(r2.saved("relays").expect("read"), Some(b"v1".to_vec()), "{:?}", config.durability);
        assert_eq!(all(&r2).len(), 1, "{:?}", config.durability);
        assert_eq!(r2.saved("other").expect("read"), None);
        h2.shutdown();
        drop(r);
        h.shutdown();
    }
}

#[test]
fn in_batch_mode_a_save_is_durable_with_the_next_commit_or_at_once_when_urgent() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &batch_never()).expect("open");
    wait(h.flush()).expect("flush the open");
    let lazy = h.save(vec![relays(b"lazy")], false);
    wait(h.flush()).expect("a flush commits it");
    wait(lazy).expect("durable with that commit");
    assert_eq!(store.crashed().meta_saved("relays"), Some(b"lazy".to_vec()));
    within_30s(h.save(vec![relays(b"now")], true)).expect("durable");
    assert_eq!(store.crashed().meta_saved("relays"), Some(b"now".to_vec()));
    drop(r);
    h.shutdown();
}

#[test]
fn a_saved_value_written_during_a_disk_fault_is_written_after_the_reopen() {
    let store = MemStore::new();
    let (h, r, _) = open_in_memory(&store, &cfg(Durability::Always)).expect("open");
    wait(h.append_urgent(draft(Class::Event), vec![relays(b"before")])).expect("durable");
    store.set_fail_writes(true);
    let kept = wait(h.append_urgent(draft(Class::Event), vec![relays(b"during")]));
    assert!(matches!(kept, Err(OutboxError::KeptInMemory { .. })), "{kept:?}");
    assert_eq!(store.crashed().meta_saved("relays"), Some(b"before".to_vec()), "not durable yet");
    store.set_fail_writes(false);
    wait(h.flush()).expect("the flush reopens and writes back what was kept");
    assert_eq!(store.crashed().meta_saved("relays"), Some(b"during".to_vec()));
    assert_eq!(r.saved("relays").expect("read"), Some(b"during".to_vec()));
    h.shutdown();
}
