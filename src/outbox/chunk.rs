//! The byte layouts of a *chunk* (up to [`CHUNK_MAX_RECORDS`] records or
//! [`CHUNK_MAX_BYTES`] of values of one class, stored as one sled value) and of a chunk's *removed* value (which
//! of its records were removed since it was written). Owns encoding,
//! decoding and checking them; nothing else.
//!
//! It must not touch sled or decide what a bad value means: the store
//! (`store.rs`) treats a chunk that does not check out at open as corruption
//! (the database is moved aside and salvaged), and a removed value that does
//! not check out as absent (its records come back: at-least-once).
//!
//! ```text
//! chunk value (integers big-endian):
//!   0     u8   0xC1 (chunk format version 1)
//!   1     u32  n: records in the chunk (>= 1)
//!   5     n x { u64 seq | u32 len | len bytes: the record value (record.rs) }
//!              seqs strictly ascending
//!   end-4 u32  CRC-32 (IEEE, crc32fast) of every byte before it
//!
//! removed value:
//!   0     u8   0xD1 (removed format version 1)
//!   1     u32  CRC-32 of the chunk value it describes (a stale one, left by a
//!              crash between rewriting a chunk and deleting its old removed
//!              value, does not match and is ignored)
//!   5     u32  n: records in that chunk
//!   9     ceil(n / 8) bytes: bit i (byte i / 8, bit i % 8) set = record i removed
//!   end-4 u32  CRC-32 of every byte before it
//! ```

/// The version byte of a chunk value.
pub(crate) const CHUNK_VERSION: u8 = 0xC1;
/// The version byte of a removed value.
pub(crate) const REMOVED_VERSION: u8 = 0xD1;
/// A chunk takes no more records than this...
pub(crate) const CHUNK_MAX_RECORDS: usize = 256;
/// ... and no more once its values reach this many bytes. A sled leaf holds
/// up to 17 keys before it splits (`node.rs`, `should_split`), and a leaf
/// whose serialized size is over a quarter of a segment (128 KiB,
/// `pagecache/logger.rs:168-173`) is written as a blob file, which sled's
/// cache counts by the size of its pointer, not of the page (`log_size`,
/// `pagecache/mod.rs:488`), so never evicts: 64 KiB chunks kept a whole
/// 100,000-record backlog in memory (`benches/sled_floor.rs`). 17 chunks
/// of 6 KiB (plus the record that crossed the mark) stay under that.
pub(crate) const CHUNK_MAX_BYTES: usize = 6 << 10;

const CHUNK_HEADER: usize = 5;
const ENTRY_HEADER: usize = 12;
const CRC: usize = 4;
const REMOVED_HEADER: usize = 9;

/// Why a chunk or removed value does not check out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("{0} bytes is too short")]
    TooShort(usize),
    #[error("unknown version byte {0:#04x}")]
    Version(u8),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("entry {index} runs past the end of the value")]
    Truncated { index: usize },
    #[error("{0} bytes left after the last entry")]
    Trailing(usize),
    #[error("seq {seq} does not follow seq {prev}")]
    Order { prev: u64, seq: u64 },
    #[error("an empty chunk")]
    Empty,
    #[error("the bitmap has {got} bytes for {n} records")]
    Bitmap { n: u32, got: usize },
}

/// Encodes records (seq ascending) as a chunk value; returns it and its CRC.
pub(crate) fn encode<'a>(records: impl ExactSizeIterator<Item = (u64, &'a [u8])>) -> (Vec<u8>, u32) {
    let mut out = Vec::with_capacity(CHUNK_HEADER + CRC);
    out.push(CHUNK_VERSION);
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for (seq, value) in records {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    (out, crc)
}

/// A chunk value that checked out: its records, read in place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Chunk<'a> {
    n: u32,
    body: &'a [u8],
    crc: u32,
}

impl<'a> Chunk<'a> {
    /// Checks the version, the checksum and the entries (in bounds, seqs
    /// strictly ascending, nothing left over).
    pub(crate) fn decode(value: &'a [u8]) -> Result<Chunk<'a>, ChunkError> {
        Chunk::decode_checked(value, true)
    }

    /// [`Chunk::decode`], skipping the checksum of a value that passed it
    /// before (and has not left memory since).
    pub(crate) fn decode_checked(value: &'a [u8], check_crc: bool) -> Result<Chunk<'a>, ChunkError> {
        if value.len() < CHUNK_HEADER + CRC {
            return Err(ChunkError::TooShort(value.len()));
        }
        if value[0] != CHUNK_VERSION {
            return Err(ChunkError::Version(value[0]));
        }
        let crc = match check_crc {
            true => check(value)?,
            false => u32::from_be_bytes(be4(&value[value.len() - CRC..])),
        };
        let n = u32::from_be_bytes(be4(&value[1..5]));
        let chunk = Chunk { n, body: &value[CHUNK_HEADER..value.len() - CRC], crc };
        if n == 0 {
            return Err(ChunkError::Empty);
        }
        let mut prev: Option<u64> = None;
        let mut rest = chunk.body;
        for index in 0..n as usize {
            let (seq, _, tail) = entry(rest).ok_or(ChunkError::Truncated { index })?;
            if let Some(p) = prev
                && seq <= p
            {
                return Err(ChunkError::Order { prev: p, seq });
            }
            prev = Some(seq);
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(ChunkError::Trailing(rest.len()));
        }
        Ok(chunk)
    }

    /// How many records a damaged chunk claims to hold (its count field), if
    /// the header is there: what salvage counts as undecodable.
    pub(crate) fn claimed_len(value: &[u8]) -> Option<u32> {
        (value.len() >= CHUNK_HEADER && value[0] == CHUNK_VERSION).then(|| u32::from_be_bytes(be4(&value[1..5])))
    }

    pub(crate) fn len(&self) -> usize {
        self.n as usize
    }

    /// The CRC-32 stored in (and checked against) the value.
    pub(crate) fn crc(&self) -> u32 {
        self.crc
    }

    /// `(seq, value)` of every record, in seq order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        let mut rest = self.body;
        std::iter::from_fn(move || {
            let (seq, value, tail) = entry(rest)?;
            rest = tail;
            Some((seq, value))
        })
    }
}

/// Encodes a removed value for a chunk of `n` records whose CRC is `chunk_crc`.
pub(crate) fn encode_removed(chunk_crc: u32, n: u32, removed: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(REMOVED_HEADER + (n as usize).div_ceil(8) + CRC);
    out.push(REMOVED_VERSION);
    out.extend_from_slice(&chunk_crc.to_be_bytes());
    out.extend_from_slice(&n.to_be_bytes());
    let mut byte = 0u8;
    for i in 0..n as usize {
        if removed(i) {
            byte |= 1 << (i % 8);
        }
        if i % 8 == 7 || i + 1 == n as usize {
            out.push(byte);
            byte = 0;
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// A removed value that checked out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Removed<'a> {
    pub chunk_crc: u32,
    pub n: u32,
    bits: &'a [u8],
}

impl<'a> Removed<'a> {
    pub(crate) fn decode(value: &'a [u8]) -> Result<Removed<'a>, ChunkError> {
        if value.len() < REMOVED_HEADER + CRC {
            return Err(ChunkError::TooShort(value.len()));
        }
        if value[0] != REMOVED_VERSION {
            return Err(ChunkError::Version(value[0]));
        }
        check(value)?;
        let chunk_crc = u32::from_be_bytes(be4(&value[1..5]));
        let n = u32::from_be_bytes(be4(&value[5..9]));
        let bits = &value[REMOVED_HEADER..value.len() - CRC];
        if bits.len() != (n as usize).div_ceil(8) {
            return Err(ChunkError::Bitmap { n, got: bits.len() });
        }
        Ok(Removed { chunk_crc, n, bits })
    }

    /// Whether record `i` of the chunk was removed.
    pub(crate) fn is_removed(&self, i: usize) -> bool {
        self.bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }
}

/// Checks the trailing CRC-32 of `value`; returns it.
fn check(value: &[u8]) -> Result<u32, ChunkError> {
    let (data, tail) = value.split_at(value.len() - CRC);
    let stored = u32::from_be_bytes(be4(tail));
    let computed = crc32fast::hash(data);
    if stored != computed {
        return Err(ChunkError::Checksum { stored, computed });
    }
    Ok(stored)
}

/// One entry off the front of a chunk body: seq, value, the rest.
fn entry(body: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    let header = body.get(..ENTRY_HEADER)?;
    let seq = u64::from_be_bytes(header[..8].try_into().ok()?);
    let len = u32::from_be_bytes(be4(&header[8..12])) as usize;
    let rest = &body[ENTRY_HEADER..];
    let value = rest.get(..len)?;
    Some((seq, value, &rest[len..]))
}

/// Four bytes as an array (the callers slice exactly four).
fn be4(b: &[u8]) -> [u8; 4] {
    let mut out = [0u8; 4];
    out.copy_from_slice(&b[..4]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_reads_back_its_records_in_order() {
        let records: Vec<(u64, Vec<u8>)> = vec![(3, b"abc".to_vec()), (7, Vec::new()), (9, vec![0xff; 300])];
        let (value, crc) = encode(records.iter().map(|(s, v)| (*s, v.as_slice())));
        let chunk = Chunk::decode(&value).expect("decode");
        assert_eq!((chunk.len(), chunk.crc()), (3, crc));
        let back: Vec<(u64, Vec<u8>)> = chunk.iter().map(|(s, v)| (s, v.to_vec())).collect();
        assert_eq!(back, records);
        assert_eq!(Chunk::claimed_len(&value), Some(3));
    }

    #[test]
    fn a_chunk_with_any_byte_flipped_does_not_check_out() {
        let (value, _) = encode([(1u64, b"hello".as_slice()), (2, b"world")].into_iter());
        for i in 0..value.len() {
            let mut bad = value.clone();
            bad[i] ^= 0x10;
            assert!(Chunk::decode(&bad).is_err(), "byte {i} flipped");
        }
        assert!(Chunk::decode(&value[..value.len() - 1]).is_err(), "truncated");
        assert_eq!(Chunk::decode(b"").err(), Some(ChunkError::TooShort(0)));
    }

    #[test]
    fn a_chunk_with_seqs_out_of_order_does_not_check_out() {
        let (value, _) = encode([(5u64, b"a".as_slice()), (5, b"b")].into_iter());
        assert_eq!(Chunk::decode(&value).err(), Some(ChunkError::Order { prev: 5, seq: 5 }));
    }

    #[test]
    fn a_removed_value_names_its_chunk_and_its_removed_records() {
        let value = encode_removed(0xdead_beef, 10, |i| i == 0 || i == 9);
        let r = Removed::decode(&value).expect("decode");
        assert_eq!((r.chunk_crc, r.n), (0xdead_beef, 10));
        let bits: Vec<usize> = (0..10).filter(|&i| r.is_removed(i)).collect();
        assert_eq!(bits, vec![0, 9]);
        let mut bad = value.clone();
        bad[9] ^= 2;
        assert!(matches!(Removed::decode(&bad), Err(ChunkError::Checksum { .. })));
    }
}
