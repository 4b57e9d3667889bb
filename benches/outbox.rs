//! Benchmarks of the outbox's write, replay and ack paths and of the Link's
//! [`Delivery`] state, timed with `std::time::Instant` (no bench
//! framework). Run with `cargo bench --bench outbox`; the printed table is
//! the one recorded in `BENCHMARKS.md`.
//!
//! What it measures, each scenario run 5 times (setup untimed, fresh outbox
//! where the scenario consumes it), reporting the median and the spread:
//!
//! * appends on sled in a temp dir under cargo's target dir, in `always`
//!   mode issued concurrently (group commit), in `always` mode awaited one
//!   at a time (one fsync per record, the worst case), and in `batch` mode
//!   (`flush_interval` 100 ms, so that row includes waiting for the timer);
//! * the same append workloads on [`MemStore`]: the queue logic and the
//!   writer thread without a disk (but `MemStore::flush` copies the whole
//!   store, so its one-at-a-time rows grow with the store's size);
//! * replay: 20,000 stored records read 32 at a time as the Link does, with
//!   and without acking each one, on the caller's thread and through
//!   `read_async` (the outbox reader thread), and acks alone;
//! * [`Delivery`] bookkeeping for 1,000,000 QoS 1 records, window 32: read
//!   result in, publish out, write confirmed, PUBACK in, remove out (the
//!   records are built in the timed part too).
//!
//! Append rows start after one untimed append (which writes the seq floor)
//! and show `commits`: the group commits (sled flush, `fdatasync` of the
//! `db` file, ledger write and `fdatasync`; MemStore: flushes) that made
//! appends durable during the timed part, counted by the `on_durable`
//! callback.
//!
//! What it must not be used for: predicting throughput on a Raspberry Pi, or
//! comparing with numbers from another machine. fsync cost depends entirely
//! on the disk (an SD card is far slower than the cached virtual disk that
//! `BENCHMARKS.md` was measured on), reads here hit warm caches, and a shared
//! VM gives noisy timings. Use it to compare changes to this crate on one
//! machine, run after run.

use std::collections::VecDeque;
use std::future::Future;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fieldlink::agent::{Action, Delivery};
use fieldlink::config::{Confirm, Durability, OutboxConfig};
use fieldlink::outbox::{self, Class, Draft, MemStore, OutboxHandle, OutboxReader};
use fieldlink::proto::{self, Body, ButtonBody, ButtonState, Qos};
use tempfile::TempDir;

/// Runs per scenario; the table shows their median.
const RUNS: usize = 5;
/// Appends per run when they are issued together.
const CONCURRENT_APPENDS: u64 = 10_000;
/// Appends per run when each is awaited before the next (one fsync each).
const SERIAL_APPENDS: u64 = 1_000;
/// Records in the outbox for the replay scenarios.
const REPLAY_RECORDS: u64 = 20_000;
/// Records per read, as the Link's window.
const WINDOW: usize = 32;
/// Records through the Delivery state per run.
const INFLIGHT_RECORDS: u64 = 1_000_000;

const DEVICE: &str = "greenhouse-north-pi-017";
/// Chosen so that a rendered button payload is about 200 bytes.
const BUTTON: &str = "door-sensor-east-wing-loading-bay-with-a-long-descriptive-name-for-the-dashboard-0123456789";

fn main() {
    let payload_len = button_payload(12_345).len();
    println!("fieldlink outbox benchmarks: {RUNS} runs per row, median shown; payload {payload_len} bytes");
    println!();
    println!("| name | n | total (median) | per op | ops/s | total min .. max | commits |");
    println!("|---|---:|---:|---:|---:|---:|---:|");

    let always = cfg(Durability::Always);
    let batch = cfg(Durability::Batch);

    report("sled always: append x n, then await all", CONCURRENT_APPENDS, || {
        let (dir, h, r) = open_sled(&always);
        let t = append_concurrent(&h, CONCURRENT_APPENDS);
        close(h, r, dir);
        t
    });
    report("sled always: append + await, one at a time", SERIAL_APPENDS, || {
        let (dir, h, r) = open_sled(&always);
        let t = append_serial(&h, SERIAL_APPENDS);
        close(h, r, dir);
        t
    });
    report("sled batch 100ms: append x n, then await all", CONCURRENT_APPENDS, || {
        let (dir, h, r) = open_sled(&batch);
        let t = append_concurrent(&h, CONCURRENT_APPENDS);
        close(h, r, dir);
        t
    });

    // One outbox for the read-only replay: reading never removes.
    {
        let (dir, h, r) = open_sled(&batch);
        fill(&h, REPLAY_RECORDS);
        report("sled replay: read 32 at a time (no acks)", REPLAY_RECORDS, || {
            let start = Instant::now();
            let n = replay(&h, &r, false);
            let t = start.elapsed();
            assert_eq!(n, REPLAY_RECORDS, "the replay read every record");
            t
        });
        report("sled replay: read_async 32 at a time (reader thread)", REPLAY_RECORDS, || {
            let start = Instant::now();
            let n = replay_async(&h, &r);
            let t = start.elapsed();
            assert_eq!(n, REPLAY_RECORDS, "the replay read every record");
            t
        });
        close(h, r, dir);
    }
    report("sled replay: read 32 + ack each, then flush", REPLAY_RECORDS, || {
        let (dir, h, r) = open_sled(&batch);
        fill(&h, REPLAY_RECORDS);
        let start = Instant::now();
        let n = replay(&h, &r, true);
        block_on(h.flush()).expect("flush");
        let t = start.elapsed();
        assert_eq!(n, REPLAY_RECORDS, "the replay read every record");
        assert_eq!(h.stats().depth, 0, "every record was acked");
        close(h, r, dir);
        t
    });
    report("sled ack: ack each seq, then flush", REPLAY_RECORDS, || {
        let (dir, h, r) = open_sled(&batch);
        let last = fill(&h, REPLAY_RECORDS);
        let start = Instant::now();
        for seq in last + 1 - REPLAY_RECORDS..=last {
            h.ack(vec![seq]);
        }
        block_on(h.flush()).expect("flush");
        let t = start.elapsed();
        assert_eq!(h.stats().depth, 0, "every record was acked");
        close(h, r, dir);
        t
    });

    report("mem always: append x n, then await all", CONCURRENT_APPENDS, || {
        let (h, r) = open_mem(&always);
        let t = append_concurrent(&h, CONCURRENT_APPENDS);
        close_mem(h, r);
        t
    });
    // MemStore::flush copies the whole store (to simulate a crash), so a
    // flush per record costs O(records stored): two sizes show the growth.
    for n in [SERIAL_APPENDS / 10, SERIAL_APPENDS] {
        report("mem always: append + await, one at a time", n, || {
            let (h, r) = open_mem(&always);
            let t = append_serial(&h, n);
            close_mem(h, r);
            t
        });
    }
    report("mem batch 100ms: append x n, then await all", CONCURRENT_APPENDS, || {
        let (h, r) = open_mem(&batch);
        let t = append_concurrent(&h, CONCURRENT_APPENDS);
        close_mem(h, r);
        t
    });

    report("delivery: read + publish + write + puback + remove, window 32", INFLIGHT_RECORDS, || {
        let start = Instant::now();
        let acked = delivery_round_trips(INFLIGHT_RECORDS, WINDOW);
        let t = start.elapsed();
        assert_eq!(acked, INFLIGHT_RECORDS, "every record came back acked");
        t
    });
}

/// One run of a scenario: the time of its measured part and, for appends,
/// how many commits (fsyncs that made appends durable) happened in it.
struct Run {
    time: Duration,
    commits: Option<u64>,
}

impl From<Duration> for Run {
    fn from(time: Duration) -> Run {
        Run { time, commits: None }
    }
}

/// Runs `run` [`RUNS`] times and prints one table row: the median time, and
/// the commits of the run that took the median time.
fn report<R: Into<Run>>(name: &str, n: u64, mut run: impl FnMut() -> R) {
    let mut runs: Vec<Run> = (0..RUNS).map(|_| run().into()).collect();
    runs.sort_by_key(|r| r.time);
    let median = &runs[RUNS / 2];
    let per_op = median.time / u32::try_from(n).expect("n fits in u32");
    let ops = n as f64 / median.time.as_secs_f64();
    let commits = median.commits.map_or_else(|| "-".to_string(), |c| c.to_string());
    println!(
        "| {name} | {n} | {} | {} | {} | {} .. {} | {commits} |",
        fmt_duration(median.time),
        fmt_duration(per_op),
        fmt_rate(ops),
        fmt_duration(runs[0].time),
        fmt_duration(runs[RUNS - 1].time),
    );
}

fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

fn fmt_rate(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2} M", per_s / 1e6)
    } else if per_s >= 1e3 {
        format!("{:.1} k", per_s / 1e3)
    } else {
        format!("{per_s:.0}")
    }
}

fn cfg(durability: Durability) -> OutboxConfig {
    OutboxConfig { max_bytes: 64 << 20, durability, flush_interval: Duration::from_millis(100) }
}

/// Awaits `f` on a fresh current-thread runtime (the outbox's futures are
/// oneshot receivers; they need no reactor).
fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime builds").block_on(f)
}

/// A button message as the agent renders it, about 200 bytes, with the
/// epoch of a state_dir created at that time (unix ms, 13 digits).
fn button_payload(seq: u64) -> Vec<u8> {
    let body = Body::Button(ButtonBody { button: BUTTON.to_string(), state: ButtonState::Pressed });
    proto::render(DEVICE, 1_795_255_200_000, seq, UNIX_EPOCH + Duration::from_millis(1_795_255_200_000), &body)
}

fn draft() -> Draft {
    Draft {
        topic: format!("fieldlink/{DEVICE}/button/door"),
        qos: Qos::AtLeastOnce,
        retain: false,
        class: Class::Event,
        ts: UNIX_EPOCH + Duration::from_millis(1_795_255_200_000),
        payload: Box::new(button_payload),
        credit: None,
    }
}

/// A fresh sled outbox in a temp dir under cargo's target dir, so that it is
/// on the disk the crate is built on (not a tmpfs `/tmp`).
fn open_sled(cfg: &OutboxConfig) -> (TempDir, OutboxHandle, OutboxReader) {
    let dir = tempfile::Builder::new()
        .prefix("fieldlink-bench-")
        .tempdir_in(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .expect("a temp dir under the target dir");
    let (h, r, _report) = outbox::open(dir.path(), cfg).expect("open the outbox");
    (dir, h, r)
}

fn open_mem(cfg: &OutboxConfig) -> (OutboxHandle, OutboxReader) {
    let (h, r, _report) = outbox::open_in_memory(&MemStore::new(), cfg).expect("open the in-memory outbox");
    (h, r)
}

/// Shuts the outbox down (one fsync) and closes the database before the temp
/// dir is removed.
fn close(h: OutboxHandle, r: OutboxReader, dir: TempDir) {
    close_mem(h, r);
    // shutdown waited for sled to let go of its files; a leftover temp dir
    // under target/ would be harmless anyway.
    if let Err(e) = dir.close() {
        eprintln!("warning: cannot remove a bench temp dir: {e}");
    }
}

fn close_mem(h: OutboxHandle, r: OutboxReader) {
    h.shutdown();
    drop(h);
    drop(r);
}

/// Makes the first append of a fresh outbox (which also writes the seq
/// floor, a one-off cost per `FLOOR_STEP` seqs) untimed, then counts the
/// commits from here on.
fn warm_up(h: &OutboxHandle) -> Arc<AtomicU64> {
    block_on(h.append(draft())).expect("warm-up append");
    let commits = Arc::new(AtomicU64::new(0));
    let counter = commits.clone();
    h.set_on_durable(Box::new(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
    }));
    commits
}

/// Issues `n` appends at once, then awaits them all: the writer groups what
/// is queued, so one fsync covers many records.
fn append_concurrent(h: &OutboxHandle, n: u64) -> Run {
    let commits = warm_up(h);
    let start = Instant::now();
    let pending: Vec<_> = (0..n).map(|_| h.append(draft())).collect();
    block_on(async {
        for p in pending {
            black_box(p.await.expect("append"));
        }
    });
    Run { time: start.elapsed(), commits: Some(commits.load(Ordering::Relaxed)) }
}

/// Awaits each append before issuing the next: in `always` mode, one fsync
/// per record.
fn append_serial(h: &OutboxHandle, n: u64) -> Run {
    let commits = warm_up(h);
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime builds");
    let start = Instant::now();
    for _ in 0..n {
        black_box(rt.block_on(h.append(draft())).expect("append"));
    }
    Run { time: start.elapsed(), commits: Some(commits.load(Ordering::Relaxed)) }
}

/// Appends `n` records and waits until they are durable (untimed setup);
/// returns the last seq.
fn fill(h: &OutboxHandle, n: u64) -> u64 {
    let pending: Vec<_> = (0..n).map(|_| h.append(draft())).collect();
    block_on(async {
        let mut last = 0;
        for p in pending {
            last = p.await.expect("append");
        }
        h.flush().await.expect("flush");
        last
    })
}

/// Reads every durable record [`WINDOW`] at a time from the start, as the
/// Link does during replay, acking each one (as its PUBACK would) if `ack`.
/// Returns how many records were read.
fn replay(h: &OutboxHandle, r: &OutboxReader, ack: bool) -> u64 {
    let upto = h.stats().durable_seq;
    let mut cursor = 0;
    let mut read = 0;
    loop {
        let records = r.read(cursor, upto, WINDOW).expect("read");
        let Some(last) = records.last() else { break };
        cursor = last.seq + 1;
        read += records.len() as u64;
        for record in records {
            if ack {
                h.ack(vec![record.seq]);
            }
            black_box(record);
        }
    }
    read
}

/// [`replay`] without acks, through [`OutboxReader::read_async`] as the Link
/// reads: each read runs on the outbox reader thread and the caller awaits it.
fn replay_async(h: &OutboxHandle, r: &OutboxReader) -> u64 {
    let upto = h.stats().durable_seq;
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime builds");
    let mut cursor = 0;
    let mut read = 0;
    loop {
        let records = rt.block_on(r.read_async(cursor, upto, WINDOW)).expect("read");
        let Some(last) = records.last() else { break };
        cursor = last.seq + 1;
        read += records.len() as u64;
        black_box(records);
    }
    read
}

/// Feeds the Delivery state what the Link sees for `n` QoS 1 records in
/// steady state: read results, each publish written under the packet id
/// rumqttc gives it, and once `window` are in flight the oldest acked.
/// Returns how many records it said to remove.
fn delivery_round_trips(n: u64, window: usize) -> u64 {
    use rumqttc::{Event, Outgoing, Packet, PubAck};
    let window_u16 = u16::try_from(window).expect("a small window");
    // Broker mode: the removals this counts come from the PUBACKs fed here.
    let mut d = Delivery::new(window_u16, Confirm::Broker);
    let cycle = d.rumqttc_inflight();
    let mut counter: u16 = 0;
    let payload = vec![b'x'; 200];
    d.connecting();
    let mut todo: VecDeque<Action> = d.connected(false, vec![]).actions.into();
    todo.extend(d.durable(n));
    let mut in_flight: VecDeque<u16> = VecDeque::with_capacity(window);
    let mut removed = 0;
    while let Some(action) = todo.pop_front() {
        match action {
            Action::Read { token, from, upto, limit } => {
                let first = from.max(1);
                let last = upto.min(first + limit as u64 - 1);
                let records = (first..=last)
                    .map(|seq| outbox::Record {
                        seq,
                        ts_ms: seq,
                        class: Class::Event,
                        qos: Qos::AtLeastOnce,
                        retain: false,
                        topic: "fieldlink/d/button/b".to_string(),
                        payload: payload.clone(),
                    })
                    .collect();
                todo.extend(d.records(token, records));
            }
            Action::Submit(_) => {
                // rumqttc's next_pkid: 1..=cycle, wrapping.
                counter = if counter + 1 >= cycle { 0 } else { counter + 1 };
                let pkid = if counter == 0 { cycle } else { counter };
                todo.extend(d.event(&Event::Outgoing(Outgoing::Publish(pkid))));
                in_flight.push_back(pkid);
                if in_flight.len() == window {
                    let oldest = in_flight.pop_front().expect("the window is full");
                    todo.extend(d.event(&Event::Incoming(Packet::PubAck(PubAck::new(oldest)))));
                }
            }
            Action::Remove(seq) => {
                black_box(seq);
                removed += 1;
            }
            other => panic!("unexpected action {other:?}"),
        }
        if todo.is_empty() {
            while let Some(pkid) = in_flight.pop_front() {
                todo.extend(d.event(&Event::Incoming(Packet::PubAck(PubAck::new(pkid)))));
            }
        }
    }
    assert_eq!(d.in_flight(), 0, "nothing is left in flight");
    removed
}
