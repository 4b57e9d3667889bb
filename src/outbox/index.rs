//! The in-memory index of one class's chunks (`chunk.rs`): which seqs each
//! chunk holds, their sizes, which were removed, and which chunks have
//! changes not yet written. Owns the rules of grouping records into chunks
//! (what an insert extends, when a chunk is full) and of what a flush must
//! write: it turns the changes since the last flush into a list of
//! [`Write`]s, one per changed chunk.
//!
//! Sans-IO: it must not touch sled. The store (`store.rs`) applies the
//! writes, reads chunk values for it ([`NeedLoad`]) and serves reads.
//!
//! Compact by design (this index is what the agent holds for a backlog in
//! place of sled's per-record pages): per chunk a map slot, and per record
//! 8 bytes (seq offset from the chunk key, value length) and a bit. Record
//! values are held only while not written ([`ChunkState::data`]), and for
//! the last chunk of the class while it is small, so the next commit's
//! records extend it instead of starting a chunk of their own.
//!
//! Invariants (per class): a chunk's key is the seq its first record had
//! when the chunk was created; every seq in a chunk is `>= key` and `<` the
//! next chunk's key, so the chunk holding a seq is the one with the greatest
//! key `<=` it. A chunk whose values are not in memory is exactly what is on
//! disk under its key (same records, same order).

use std::collections::BTreeMap;

use super::chunk::{self, CHUNK_MAX_BYTES, CHUNK_MAX_RECORDS, Chunk, Removed};
use super::store::Scan;

/// The last chunk of a class keeps its values in memory after a flush while
/// they are under this size, so that the next commit extends it (rewriting
/// it whole) instead of writing a chunk of its own: a slow trickle of
/// records (a heartbeat a minute) still ends up in chunks of ~30 records,
/// and a rewrite costs at most this many bytes.
pub(crate) const TAIL_KEEP_BYTES: usize = 4 << 10;

/// One chunk, as the index knows it.
#[derive(Debug, Default)]
pub(crate) struct ChunkState {
    /// `(seq - key, value length)` of every record, in seq order.
    entries: Vec<(u32, u32)>,
    /// Bit i set: record i was removed. Empty while nothing was.
    removed: Vec<u64>,
    /// Records not removed.
    live: u32,
    /// The values of every record, concatenated in order, while held in
    /// memory (not written yet, or the small last chunk).
    data: Option<Vec<u8>>,
    /// Changed since written (or never written): the whole chunk is written
    /// at the next flush.
    dirty: bool,
    /// The CRC of the chunk value on disk, if there is one.
    disk_crc: Option<u32>,
    /// Records removed (or restored) since the removed value was written.
    removals_unflushed: bool,
    /// A removed value is on disk for this chunk.
    removed_on_disk: bool,
}

impl ChunkState {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_removed(&self, i: usize) -> bool {
        self.removed.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set_removed(&mut self, i: usize, removed: bool) {
        if self.removed.len() <= i / 64 {
            if !removed {
                return;
            }
            self.removed.resize(self.entries.len().div_ceil(64), 0);
        }
        if removed {
            self.removed[i / 64] |= 1 << (i % 64);
        } else {
            self.removed[i / 64] &= !(1 << (i % 64));
        }
    }

    /// The seq of record `i` of the chunk under `key`.
    pub(crate) fn seq(&self, key: u64, i: usize) -> u64 {
        key + u64::from(self.entries[i].0)
    }

    /// The value length of record `i`.
    pub(crate) fn value_len(&self, i: usize) -> usize {
        self.entries[i].1 as usize
    }

    /// The values held in memory, if they are.
    pub(crate) fn data(&self) -> Option<&[u8]> {
        self.data.as_deref()
    }

    fn last_delta(&self) -> Option<u32> {
        self.entries.last().map(|e| e.0)
    }

    fn find(&self, key: u64, seq: u64) -> Option<usize> {
        let delta = u32::try_from(seq.checked_sub(key)?).ok()?;
        self.entries.binary_search_by_key(&delta, |e| e.0).ok()
    }

    fn full(&self) -> bool {
        self.entries.len() >= CHUNK_MAX_RECORDS || self.data.as_ref().is_some_and(|d| d.len() >= CHUNK_MAX_BYTES)
    }

    fn offset(&self, i: usize) -> usize {
        self.entries[..i].iter().map(|e| e.1 as usize).sum()
    }

    /// Replaces, in the values held in memory, record `i`'s value.
    fn replace(&mut self, i: usize, value: &[u8]) {
        let off = self.offset(i);
        let old = self.entries[i].1 as usize;
        if let Some(data) = &mut self.data {
            let _old_bytes: Vec<u8> = data.splice(off..off + old, value.iter().copied()).collect();
        }
        self.entries[i].1 = value.len() as u32;
        self.dirty = true;
    }

    /// Inserts a record at position `i` (values held in memory).
    fn insert_at(&mut self, i: usize, delta: u32, value: &[u8]) {
        if i == self.entries.len() {
            if let Some(data) = &mut self.data {
                data.extend_from_slice(value);
            }
        } else {
            let off = self.offset(i);
            if let Some(data) = &mut self.data {
                let _none: Vec<u8> = data.splice(off..off, value.iter().copied()).collect();
            }
        }
        self.entries.insert(i, (delta, value.len() as u32));
        // Shift the removed bits above i up by one (an append has none above).
        if !self.removed.is_empty() && i + 1 < self.entries.len() {
            let removed: Vec<bool> = (0..self.entries.len() - 1).map(|j| self.is_removed(j)).collect();
            self.removed = vec![0; self.entries.len().div_ceil(64)];
            for (j, r) in removed.into_iter().enumerate() {
                let at = if j >= i { j + 1 } else { j };
                self.set_removed(at, r);
            }
        }
        self.live += 1;
        self.dirty = true;
    }

    /// Drops removed records from a chunk whose values are in memory.
    fn compact(&mut self) {
        if self.removed.is_empty() {
            return;
        }
        let Some(data) = self.data.take() else { return };
        let mut kept = Vec::with_capacity(self.live as usize);
        let mut bytes = Vec::with_capacity(data.len());
        let mut off = 0;
        for (i, &(delta, len)) in self.entries.iter().enumerate() {
            let end = off + len as usize;
            if !self.is_removed(i) {
                kept.push((delta, len));
                bytes.extend_from_slice(&data[off..end]);
            }
            off = end;
        }
        self.entries = kept;
        self.removed = Vec::new();
        self.data = Some(bytes);
    }

    /// The chunk value for the values held in memory.
    fn encode(&self, key: u64) -> Option<(Vec<u8>, u32)> {
        let data = self.data.as_deref()?;
        let mut off = 0;
        let records = self.entries.iter().map(|&(delta, len)| {
            let value = &data[off..off + len as usize];
            off += len as usize;
            (key + u64::from(delta), value)
        });
        Some(chunk::encode(records.collect::<Vec<_>>().into_iter()))
    }
}

/// What a flush writes, in order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Write {
    /// The chunk value under its key (new or rewritten whole).
    Chunk {
        key: u64,
        value: Vec<u8>,
    },
    /// The chunk's removed value.
    Removed {
        key: u64,
        value: Vec<u8>,
    },
    DeleteChunk {
        key: u64,
    },
    DeleteRemoved {
        key: u64,
    },
}

/// An insert needs the values of the chunk under `key` in memory first
/// (it falls inside that chunk, or rewrites one of its records): read the
/// chunk and [`ClassIndex::attach`] it, then insert again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NeedLoad(pub u64);

/// Why a chunk read at open cannot be indexed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("chunk {key}: seq {seq} is below its key")]
    BelowKey { key: u64, seq: u64 },
    #[error("chunk {key}: seq {seq} is more than 2^32 above its key")]
    Span { key: u64, seq: u64 },
    #[error("chunk {key} overlaps the chunk before it (which ends at seq {prev_last})")]
    Overlap { key: u64, prev_last: u64 },
}

/// The chunks of one class.
#[derive(Debug, Default)]
pub(crate) struct ClassIndex {
    chunks: BTreeMap<u64, ChunkState>,
}

impl ClassIndex {
    /// The chunk holding `seq` (if any) and the record's position in it.
    fn locate(&self, seq: u64) -> Option<(u64, usize)> {
        let (&key, c) = self.chunks.range(..=seq).next_back()?;
        Some((key, c.find(key, seq)?))
    }

    /// Stores a record. Storing a seq that is already stored again is
    /// idempotent (the writer writes records kept through a disk fault
    /// again after a reopen; they may be on disk already).
    pub(crate) fn insert(&mut self, seq: u64, value: &[u8]) -> Result<(), NeedLoad> {
        if let Some((key, i)) = self.locate(seq) {
            let c = self.chunks.get_mut(&key).ok_or(NeedLoad(key))?;
            if c.is_removed(i) {
                c.set_removed(i, false);
                c.live += 1;
                c.removals_unflushed = true;
            }
            let same = match c.data() {
                Some(_) => c.value_of(i) == Some(value),
                None => c.value_len(i) == value.len(),
            };
            if !same {
                if c.data.is_none() {
                    return Err(NeedLoad(key));
                }
                c.replace(i, value);
            }
            return Ok(());
        }
        if let Some((&key, c)) = self.chunks.range_mut(..=seq).next_back() {
            let inside = c.last_delta().is_some_and(|last| key + u64::from(last) > seq);
            if inside {
                // Falls between two records of this chunk.
                if c.data.is_none() {
                    return Err(NeedLoad(key));
                }
                let delta = (seq - key) as u32;
                let i = c.entries.partition_point(|e| e.0 < delta);
                c.insert_at(i, delta, value);
                return Ok(());
            }
            let fits = u32::try_from(seq - key).ok();
            if let (Some(delta), Some(_), false) = (fits, &c.data, c.full()) {
                c.insert_at(c.entries.len(), delta, value);
                return Ok(());
            }
            // A written chunk keeps its values only to be extended.
            if !c.dirty {
                c.data = None;
            }
        }
        let _new = self.chunks.insert(
            seq,
            ChunkState {
                entries: vec![(0, value.len() as u32)],
                live: 1,
                data: Some(value.to_vec()),
                dirty: true,
                ..ChunkState::default()
            },
        );
        Ok(())
    }

    /// Gives the chunk under `key` its values, read from disk. False if the
    /// chunk read is not the one indexed (then nothing changes).
    pub(crate) fn attach(&mut self, key: u64, disk: &Chunk<'_>) -> bool {
        let Some(c) = self.chunks.get_mut(&key) else { return false };
        if c.data.is_some() {
            return true;
        }
        if disk.len() != c.entries.len() || Some(disk.crc()) != c.disk_crc {
            return false;
        }
        let mut data = Vec::new();
        for (i, (seq, value)) in disk.iter().enumerate() {
            if key + u64::from(c.entries[i].0) != seq || value.len() != c.entries[i].1 as usize {
                return false;
            }
            data.extend_from_slice(value);
        }
        c.data = Some(data);
        true
    }

    /// Removes a record: its value length, or `None` if it is not stored.
    pub(crate) fn remove(&mut self, seq: u64) -> Option<usize> {
        let (key, i) = self.locate(seq)?;
        let c = self.chunks.get_mut(&key)?;
        if c.is_removed(i) {
            return None;
        }
        c.set_removed(i, true);
        c.live -= 1;
        c.removals_unflushed = true;
        Some(c.value_len(i))
    }

    /// The oldest stored record: its chunk's key and its position there.
    pub(crate) fn first(&self) -> Option<(u64, usize)> {
        self.chunks
            .iter()
            .find(|(_, c)| c.live > 0)
            .and_then(|(&key, c)| (0..c.len()).find(|&i| !c.is_removed(i)).map(|i| (key, i)))
    }

    /// The chunks that may hold seqs in `from..=upto`, in seq order.
    pub(crate) fn overlapping(&self, from: u64, upto: u64) -> impl Iterator<Item = (u64, &ChunkState)> {
        let before = self.chunks.range(..=from).next_back();
        let after = match from.checked_add(1) {
            Some(start) if start <= upto => Some(self.chunks.range(start..=upto)),
            _ => None,
        };
        before.into_iter().chain(after.into_iter().flatten()).filter(|(_, c)| c.live > 0).map(|(k, c)| (*k, c))
    }

    pub(crate) fn get(&self, key: u64) -> Option<&ChunkState> {
        self.chunks.get(&key)
    }

    /// Counts the stored records, as [`Scan`] reports them (`live`: seq at
    /// or above `live_from`; `after`: at or above `after_from`; `bad_keys`
    /// is the store's).
    pub(crate) fn counts(&self, live_from: u64, after_from: u64) -> Scan {
        let mut n = Scan::default();
        for (&key, c) in &self.chunks {
            for i in (0..c.len()).filter(|&i| !c.is_removed(i)) {
                let seq = c.seq(key, i);
                n.records += 1;
                n.bytes += super::store::stored_size(c.value_len(i));
                n.first_seq.get_or_insert(seq);
                n.last_seq = Some(seq);
                n.live += u64::from(seq >= live_from);
                n.after += u64::from(seq >= after_from);
            }
        }
        n
    }

    /// Indexes a chunk read from disk at open. Chunks come in key order.
    pub(crate) fn add_from_disk(&mut self, key: u64, disk: &Chunk<'_>) -> Result<(), IndexError> {
        if let Some((&prev_key, prev)) = self.chunks.iter().next_back()
            && let Some(last) = prev.last_delta()
            && prev_key + u64::from(last) >= key
        {
            return Err(IndexError::Overlap { key, prev_last: prev_key + u64::from(last) });
        }
        let mut entries = Vec::with_capacity(disk.len());
        for (seq, value) in disk.iter() {
            let delta = seq.checked_sub(key).ok_or(IndexError::BelowKey { key, seq })?;
            let delta = u32::try_from(delta).map_err(|_| IndexError::Span { key, seq })?;
            entries.push((delta, value.len() as u32));
        }
        let live = entries.len() as u32;
        let c = ChunkState { entries, live, disk_crc: Some(disk.crc()), ..ChunkState::default() };
        let _none = self.chunks.insert(key, c);
        Ok(())
    }

    /// Applies a removed value read at open. False if it is stale (its chunk
    /// is gone or was rewritten since): the caller deletes it.
    pub(crate) fn apply_removed(&mut self, key: u64, removed: &Removed<'_>) -> bool {
        let Some(c) = self.chunks.get_mut(&key) else { return false };
        if c.disk_crc != Some(removed.chunk_crc) || removed.n as usize != c.len() {
            return false;
        }
        for i in 0..c.len() {
            if removed.is_removed(i) && !c.is_removed(i) {
                c.set_removed(i, true);
                c.live -= 1;
            }
        }
        c.removed_on_disk = true;
        // A chunk left with nothing is deleted at the next flush.
        c.removals_unflushed |= c.live == 0;
        true
    }

    /// Everything a flush must write since the last one, in order, and the
    /// index as it is once they are written: per changed chunk one write of
    /// the chunk (new or changed: removed records dropped), or of its
    /// removed value (records removed from a chunk on disk), or the deletion
    /// of both (nothing left in it).
    pub(crate) fn take_writes(&mut self, out: &mut Vec<Write>) {
        let tail = self.chunks.keys().next_back().copied();
        let mut emptied = Vec::new();
        for (&key, c) in &mut self.chunks {
            if c.live == 0 {
                if c.disk_crc.is_some() {
                    out.push(Write::DeleteChunk { key });
                }
                if c.removed_on_disk {
                    out.push(Write::DeleteRemoved { key });
                }
                emptied.push(key);
            } else if c.dirty {
                c.compact();
                if c.removed_on_disk {
                    out.push(Write::DeleteRemoved { key });
                }
                if let Some((value, crc)) = c.encode(key) {
                    out.push(Write::Chunk { key, value });
                    c.disk_crc = Some(crc);
                }
                c.dirty = false;
                c.removals_unflushed = false;
                c.removed_on_disk = false;
                let keep = Some(key) == tail && !c.full() && c.data.as_ref().is_some_and(|d| d.len() < TAIL_KEEP_BYTES);
                if !keep {
                    c.data = None;
                }
            } else if c.removals_unflushed {
                if let Some(crc) = c.disk_crc {
                    let value = chunk::encode_removed(crc, c.len() as u32, |i| c.is_removed(i));
                    out.push(Write::Removed { key, value });
                    c.removed_on_disk = true;
                }
                c.removals_unflushed = false;
            }
        }
        for key in emptied {
            let _gone = self.chunks.remove(&key);
        }
    }

    /// Chunks indexed (for tests and the memory figure).
    #[cfg(test)]
    pub(crate) fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

impl ChunkState {
    /// `(position, seq, value)` of every record, removed or not, when the
    /// values are held in memory.
    pub(crate) fn iter_held(&self, key: u64) -> impl Iterator<Item = (usize, u64, &[u8])> {
        let data = self.data.as_deref().unwrap_or_default();
        let mut off = 0;
        self.entries.iter().enumerate().map(move |(i, &(delta, len))| {
            let value = data.get(off..off + len as usize).unwrap_or_default();
            off += len as usize;
            (i, key + u64::from(delta), value)
        })
    }

    /// Record `i`'s value, when the values are held in memory.
    pub(crate) fn value_of(&self, i: usize) -> Option<&[u8]> {
        let data = self.data.as_deref()?;
        let off = self.offset(i);
        data.get(off..off + self.entries[i].1 as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flushed(ix: &mut ClassIndex) -> Vec<Write> {
        let mut out = Vec::new();
        ix.take_writes(&mut out);
        out
    }

    #[test]
    fn records_of_one_flush_become_one_chunk_write() {
        let mut ix = ClassIndex::default();
        for seq in 1..=10 {
            ix.insert(seq, &[seq as u8; 20]).expect("insert");
        }
        let writes = flushed(&mut ix);
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(matches!(&writes[0], Write::Chunk { key: 1, .. }));
        assert_eq!(ix.counts(0, 0).records, 10);
        assert!(flushed(&mut ix).is_empty(), "nothing changed since");
    }

    #[test]
    fn a_full_chunk_starts_the_next_and_a_small_tail_is_extended() {
        let mut ix = ClassIndex::default();
        for seq in 1..=(CHUNK_MAX_RECORDS as u64 + 1) {
            ix.insert(seq, b"x").expect("insert");
        }
        assert_eq!(ix.chunk_count(), 2);
        let _ = flushed(&mut ix);
        ix.insert(CHUNK_MAX_RECORDS as u64 + 2, b"y").expect("insert");
        assert_eq!(ix.chunk_count(), 2, "the small last chunk was extended");
        let writes = flushed(&mut ix);
        assert!(matches!(writes.as_slice(), [Write::Chunk { key, .. }] if *key == CHUNK_MAX_RECORDS as u64 + 1));
    }

    #[test]
    fn removals_write_a_removed_value_and_an_emptied_chunk_is_deleted() {
        let mut ix = ClassIndex::default();
        // Four of them fit a chunk, and are too many to keep in memory.
        let big = vec![7u8; TAIL_KEEP_BYTES / 3];
        for seq in 1..=4 {
            ix.insert(seq, &big).expect("insert");
        }
        let _ = flushed(&mut ix);
        // Too big to keep in memory: the next record starts a chunk.
        ix.insert(5, b"next").expect("insert");
        assert_eq!(ix.chunk_count(), 2);
        let _ = flushed(&mut ix);
        assert_eq!(ix.remove(2), Some(big.len()));
        assert_eq!(ix.remove(2), None);
        let writes = flushed(&mut ix);
        assert!(matches!(writes.as_slice(), [Write::Removed { key: 1, .. }]), "{writes:?}");
        for seq in [1, 3, 4] {
            assert_eq!(ix.remove(seq), Some(big.len()));
        }
        let writes = flushed(&mut ix);
        assert_eq!(writes, vec![Write::DeleteChunk { key: 1 }, Write::DeleteRemoved { key: 1 }]);
        assert_eq!(ix.first(), Some((5, 0)));
    }

    #[test]
    fn an_insert_inside_a_written_chunk_needs_its_values_first() {
        let mut ix = ClassIndex::default();
        let big = vec![1u8; TAIL_KEEP_BYTES];
        for seq in [10, 20] {
            ix.insert(seq, &big).expect("insert");
        }
        let mut writes = flushed(&mut ix);
        ix.insert(30, b"a chunk of its own").expect("insert");
        let _ = flushed(&mut ix);
        assert_eq!(ix.insert(15, b"w"), Err(NeedLoad(10)));
        let Some(Write::Chunk { value, .. }) = writes.pop() else { panic!("a chunk write") };
        assert!(ix.attach(10, &Chunk::decode(&value).expect("decode")));
        ix.insert(15, b"w").expect("insert");
        ix.insert(10, &big).expect("the same bytes again: nothing to do");
        let seqs: Vec<u64> = (0..3).map(|i| ix.get(10).expect("chunk").seq(10, i)).collect();
        assert_eq!(seqs, vec![10, 15, 20]);
        assert_eq!(ix.counts(0, 0).records, 4);
    }
}
