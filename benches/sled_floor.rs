//! sled 0.34's own memory with a backlog, without the agent around it: how
//! much of the agent's RSS with 100,000 records queued (issue #8: target
//! 16 MiB) and after they drained (target: back near idle) is the
//! database's alone. Owns nothing but this measurement; it asserts nothing
//! and must not be read as a prediction for a Raspberry Pi.
//!
//! What it does, in one process: opens the vendored sled in a temp dir under
//! cargo's target dir with the outbox's settings (`SledStore::open`: cache
//! `--cache` bytes, default 1 MiB as `SLED_CACHE_BYTES`; `flush_every_ms(None)`),
//! then `--cycles` times: inserts `--records` values of `--value` bytes (a
//! button record is about 180 bytes) under 8-byte big-endian seq keys, with
//! a `flush` every `--group` inserts (the writer's group commit), and reports
//! VmRSS, anonymous RSS and VmHWM; then removes them all in seq order (the
//! replay's acks), flushes, calls `malloc_trim(0)` as the writer does
//! (`memtrim.rs`), and reports again. The same after `open` of an empty
//! database (the floor every agent pays), and at the end after closing the
//! drained database and after opening it again.
//!
//! `--layout chunks` stores the records the way the outbox does since
//! records are chunked (`src/outbox/store.rs`): `--per-chunk` records (seq,
//! length, value; default 32, as 180-byte records fill the outbox's 6 KiB
//! chunks) per sled value under the first record's key; a chunk is deleted
//! once all its records are removed, and every flush that leaves a chunk
//! partly removed writes a small removed-bitmap value for it in a second
//! tree. `--layout records` (the default) is one key per record, as every
//! build before chunks stored them.
//!
//! Run: `cargo bench --no-default-features --features agent --bench sled_floor -- [--records 100000] [--cycles 3] [--layout chunks]`.

use std::time::Duration;

fn status_kib(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim_start_matches(':').split_whitespace().next()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn anon_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Anonymous:").and_then(|v| v.split_whitespace().next()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn report(what: &str) {
    // sled's on-demand I/O threads end 2 s after their last task
    // (vendor/sled/src/threadpool.rs); measure without them, as the agent's
    // "queued" and "after drain" figures are.
    std::thread::sleep(Duration::from_millis(2500));
    println!(
        "| {what} | {:.1} | {:.1} | {:.1} |",
        status_kib("VmRSS") as f64 / 1024.0,
        anon_kib() as f64 / 1024.0,
        status_kib("VmHWM") as f64 / 1024.0
    );
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.windows(2).find(|w| w[0] == name).and_then(|w| w[1].parse().ok()).unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let records = arg(&args, "--records", 100_000);
    let cycles = arg(&args, "--cycles", 3);
    let value_len = arg(&args, "--value", 180) as usize;
    let group = arg(&args, "--group", 1000).max(1);
    let cache = arg(&args, "--cache", 1 << 20);
    let chunked = args.windows(2).any(|w| w[0] == "--layout" && w[1] == "chunks");
    let per_chunk = if chunked { arg(&args, "--per-chunk", 32).max(1) } else { 1 };

    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, Into::into);
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::tempdir_in(&base)?;
    println!(
        "sled 0.34 (vendored) alone: {records} records of {value_len} bytes, {per_chunk} per sled value, flush every \
         {group}, cache {cache} bytes; load average {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("?")
    );
    println!();
    println!("| phase | VmRSS MiB | anonymous MiB | VmHWM MiB |");
    println!("|---|---:|---:|---:|");
    report("process started, no database");
    let db = sled::Config::new().path(dir.path()).cache_capacity(cache).flush_every_ms(None).open()?;
    let tree = db.open_tree(if chunked { "chunks.events" } else { "events" })?;
    let removed = db.open_tree("chunks.removed")?;
    db.flush()?;
    report("empty database open");
    let value = vec![b'x'; value_len];
    // One chunk's value: per record seq, length, value (the CRC is left out).
    let chunk_value: Vec<u8> =
        (0..per_chunk).flat_map(|_| [0u8; 12].into_iter().chain(value.iter().copied())).collect();
    let mut next = 1u64;
    for cycle in 1..=cycles {
        let first = next;
        for _ in 0..records {
            if !chunked {
                tree.insert(next.to_be_bytes(), value.as_slice())?;
            } else if (next - first).is_multiple_of(per_chunk) {
                tree.insert(next.to_be_bytes(), chunk_value.as_slice())?;
            }
            next += 1;
            if next.is_multiple_of(group) {
                db.flush()?;
            }
        }
        db.flush()?;
        fieldlink::memtrim::trim();
        report(&format!("cycle {cycle}: {records} queued"));
        for seq in first..next {
            let chunk_key = first + (seq - first) / per_chunk * per_chunk;
            if !chunked {
                tree.remove(seq.to_be_bytes())?;
            } else if (seq - first + 1).is_multiple_of(per_chunk) || seq + 1 == next {
                tree.remove(chunk_key.to_be_bytes())?;
                removed.remove(chunk_key.to_be_bytes())?;
            }
            if seq.is_multiple_of(group) {
                if chunked && !(seq - first + 1).is_multiple_of(per_chunk) {
                    removed.insert(chunk_key.to_be_bytes(), [0u8; 45].as_slice())?;
                }
                db.flush()?;
            }
        }
        db.flush()?;
        fieldlink::memtrim::trim();
        report(&format!("cycle {cycle}: after drain"));
    }
    // Whether closing the drained database gives its memory back, and what
    // opening it again (recovery reads the log) costs.
    drop(tree);
    drop(removed);
    drop(db);
    fieldlink::memtrim::trim();
    report("drained database closed");
    let db = sled::Config::new().path(dir.path()).cache_capacity(cache).flush_every_ms(None).open()?;
    let tree = db.open_tree(if chunked { "chunks.events" } else { "events" })?;
    fieldlink::memtrim::trim();
    report(&format!("drained database open again ({} records)", tree.len()));
    Ok(())
}
