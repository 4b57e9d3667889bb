//! Salvage: reading what is still readable from a database that was moved
//! aside as corrupt, so that its records can be replayed into the fresh
//! outbox instead of being silently left behind. Owns opening the aside
//! directory with sled (once, under [`panics::catch`]), walking the chunks
//! of both classes (and the one-record-per-key trees of builds before
//! chunks) and the saved values until the first error, and decoding what it
//! finds. A chunk that does not check out counts its records (as its header
//! claims them, at most [`CHUNK_MAX_RECORDS`]) as undecodable; records a
//! removed value that checks out says were removed are not salvaged (one
//! that does not check out is ignored: its records come back, at least
//! once).
//!
//! It must not write to the fresh outbox or assign seqs (open and the writer
//! replay what it returns), and it must never fail: an unreadable database
//! is a [`Salvage`] with `unreadable` set, which the caller counts.
//!
//! sled may write to the aside directory while opening it (log recovery,
//! a snapshot); it is kept for inspection only, so that is acceptable.

use std::collections::HashMap;
use std::path::Path;

use super::chunk::{CHUNK_MAX_RECORDS, Chunk, Removed};
use super::panics;
use super::record;
use super::store::removed_key_parts;
use super::{Class, Record};

/// What could be read from a database moved aside.
#[derive(Debug, Default)]
pub(crate) struct Salvage {
    /// Every record that decoded, in seq order (the seqs of the old database).
    pub records: Vec<Record>,
    /// Why the database (or part of it) could not be read, if it could not.
    pub unreadable: Option<String>,
    /// Entries that were found but did not decode.
    pub undecodable: u64,
    /// Saved values (`saved/<name>` in the meta tree, e.g. the relays'
    /// power-on state) that could be read, key and raw value.
    pub saved: Vec<(String, Vec<u8>)>,
}

impl Salvage {
    /// Records with a seq at or above `from`.
    pub(crate) fn count_from(&self, from: u64) -> u64 {
        self.records.iter().filter(|r| r.seq >= from).count() as u64
    }
}

/// The sled page cache used for the one read of an aside database.
const SALVAGE_CACHE_BYTES: u64 = 4 << 20;

/// Reads every record that can be read from the sled database in `dir`.
pub(crate) fn salvage(dir: &Path) -> Salvage {
    let config = sled::Config::new().path(dir).cache_capacity(SALVAGE_CACHE_BYTES).flush_every_ms(None);
    let opened = panics::catch(move || config.open());
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return unreadable(format!("sled cannot open it: {e}")),
        Err(panic) => return unreadable(format!("sled panicked while opening it: {panic}")),
    };
    let mut out = Salvage::default();
    let walked = panics::catch(|| {
        let has = |name: &str| db.tree_names().iter().any(|n| n.as_ref() == name.as_bytes());
        let removed = if has("chunks.removed") { removed_values(&db, &mut out) } else { HashMap::new() };
        for (name, class) in [("chunks.heartbeats", Class::Heartbeat), ("chunks.events", Class::Event)] {
            if has(name) {
                walk_chunks(&db, name, class, &removed, &mut out);
            }
        }
        for (name, class) in [("heartbeats", Class::Heartbeat), ("events", Class::Event)] {
            match has(name) {
                true => walk(&db, name, class, &mut out),
                false => continue,
            }
        }
        if db.tree_names().iter().any(|n| n.as_ref() == b"meta") {
            saved_values(&db, &mut out);
        }
    });
    if let Err(panic) = walked {
        out.unreadable = Some(format!("sled panicked while reading it: {panic}"));
    }
    // Dropping a damaged Db flushes it; a panic there changes nothing read.
    if let Err(panic) = panics::catch(move || drop(db)) {
        tracing::warn!(dir = %dir.display(), %panic, "outbox: sled panicked while closing a salvaged database");
    }
    out.records.sort_by_key(|r| r.seq);
    out.records.dedup_by_key(|r| r.seq);
    out
}

/// A salvaged record under its new outbox seq, encoded: its class and value.
/// The payload bytes stay as they were (so the seq inside stays the original).
pub(crate) fn rekey(mut rec: Record, seq: u64) -> Result<(Class, Vec<u8>), record::RecordError> {
    rec.seq = seq;
    Ok((rec.class, record::encode(&rec)?))
}

fn unreadable(reason: String) -> Salvage {
    Salvage { unreadable: Some(reason), ..Salvage::default() }
}

/// Reads the saved values of the meta tree until its end or its first
/// error; an unreadable one is simply not salvaged (its owner falls back to
/// its default, as on a fresh outbox).
fn saved_values(db: &sled::Db, out: &mut Salvage) {
    let Ok(meta) = db.open_tree("meta") else { return };
    for entry in meta.scan_prefix(b"saved/") {
        let Ok((k, v)) = entry else { return };
        if let Ok(key) = std::str::from_utf8(&k) {
            out.saved.push((key.to_string(), v.to_vec()));
        }
    }
}

/// The removed values that can be read, by (class, chunk key).
fn removed_values(db: &sled::Db, out: &mut Salvage) -> HashMap<(Class, u64), Vec<u8>> {
    let mut found = HashMap::new();
    let tree = match db.open_tree("chunks.removed") {
        Ok(t) => t,
        Err(e) => {
            out.unreadable = Some(format!("tree 'chunks.removed': {e}"));
            return found;
        }
    };
    for entry in tree.iter() {
        let Ok((k, v)) = entry else { break };
        if let Some(id) = removed_key_parts(&k) {
            let _dup = found.insert(id, v.to_vec());
        }
    }
    found
}

/// Calls `each` with every key and value of tree `name`, in order, until
/// the tree's end or its first error (recorded in `out.unreadable`).
fn each_entry(db: &sled::Db, name: &str, out: &mut Salvage, mut each: impl FnMut(&mut Salvage, &[u8], &[u8])) {
    let tree = match db.open_tree(name) {
        Ok(t) => t,
        Err(e) => {
            out.unreadable = Some(format!("tree '{name}': {e}"));
            return;
        }
    };
    for entry in tree.iter() {
        match entry {
            Ok((k, v)) => each(out, &k, &v),
            Err(e) => {
                out.unreadable = Some(format!("tree '{name}' after {} records: {e}", out.records.len()));
                return;
            }
        }
    }
}

/// Reads the chunks of one class until the tree's end or its first error.
fn walk_chunks(db: &sled::Db, name: &str, class: Class, removed: &HashMap<(Class, u64), Vec<u8>>, out: &mut Salvage) {
    each_entry(db, name, out, |out, k, v| {
        let (key, chunk) = match (record::seq_of_key(k), Chunk::decode(v)) {
            (Some(key), Ok(chunk)) => (key, chunk),
            (_, Err(_)) => {
                let claimed = Chunk::claimed_len(v).map_or(1, |n| (n as usize).clamp(1, CHUNK_MAX_RECORDS));
                out.undecodable += claimed as u64;
                return;
            }
            (None, Ok(_)) => {
                out.undecodable += 1;
                return;
            }
        };
        let gone = removed
            .get(&(class, key))
            .and_then(|v| Removed::decode(v).ok())
            .filter(|r| r.chunk_crc == chunk.crc() && r.n as usize == chunk.len());
        for (i, (seq, value)) in chunk.iter().enumerate() {
            if gone.is_some_and(|r| r.is_removed(i)) {
                continue;
            }
            match record::decode(seq, class, value) {
                Ok(r) => out.records.push(r),
                Err(_) => out.undecodable += 1,
            }
        }
    });
}

/// Reads one tree of a build before chunks (one record per key) until its
/// end or its first error.
fn walk(db: &sled::Db, name: &str, class: Class, out: &mut Salvage) {
    each_entry(db, name, out, |out, k, v| match record::seq_of_key(k).map(|seq| record::decode(seq, class, v)) {
        Some(Ok(r)) => out.records.push(r),
        _ => out.undecodable += 1,
    });
}
