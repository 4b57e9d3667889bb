//! The byte layouts of the outbox: a record value, a meta value, the
//! `seq.floor` file and the legacy `outbox.closed` file (all described in the
//! module doc of [`crate::outbox`]; the ledger's layout is in `ledger.rs`).
//! Owns encoding and decoding, and every check that a stored value is one we
//! wrote: version byte, size limit, no trailing bytes, known enum values,
//! key and body agree. It must not touch storage, threads or clocks; a value
//! that does not decode is a [`RecordError`], never a panic.

use serde::{Deserialize, Serialize};

use super::{Class, Record};
use crate::proto::Qos;

/// The version byte that starts every record value, meta value and the
/// `outbox.closed` file (and the `seq.floor` file of builds without epochs).
pub const FORMAT_VERSION: u8 = 1;

/// The version byte of the `seq.floor` file since it holds an epoch.
pub const FLOOR_VERSION: u8 = 2;

/// The largest record value (version byte included) the outbox writes or
/// reads. Decoding uses it as bincode's limit, so a corrupt length prefix
/// cannot make the reader allocate gigabytes.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// The bincode limit: the body after the version byte.
const MAX_BODY_BYTES: usize = MAX_RECORD_BYTES - 1;

/// Why a stored value is not one this build can use.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("empty value (expected a version byte)")]
    Empty,
    #[error(
        "unknown format version {found} (this build reads version {FORMAT_VERSION}, and {FLOOR_VERSION} for seq.floor)"
    )]
    UnknownVersion { found: u8 },
    #[error("body does not decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("body does not encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("{extra} unexpected bytes after the body")]
    TrailingBytes { extra: usize },
    #[error("record body says seq {found} but it is stored under seq {key}")]
    SeqMismatch { key: u64, found: u64 },
    #[error("record body says class {found:?} but it is stored among {stored:?} records")]
    ClassMismatch { stored: Class, found: Class },
    #[error("unknown {field} value {found}")]
    BadField { field: &'static str, found: u8 },
    #[error("record of {size} bytes is larger than the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("value of {found} bytes where {expected} were expected")]
    BadLength { found: usize, expected: usize },
}

/// The version-1 body, borrowed for encoding. Field order is the disk format:
/// do not reorder, add a version instead.
#[derive(Serialize)]
struct BodyV1Ref<'a> {
    seq: u64,
    ts_ms: u64,
    class: u8,
    qos: u8,
    retain: bool,
    topic: &'a str,
    #[serde(serialize_with = "bytes::serialize")]
    payload: &'a [u8],
}

/// The version-1 body, owned for decoding. Must mirror [`BodyV1Ref`].
#[derive(Deserialize)]
struct BodyV1 {
    seq: u64,
    ts_ms: u64,
    class: u8,
    qos: u8,
    retain: bool,
    topic: String,
    #[serde(deserialize_with = "bytes::deserialize")]
    payload: Vec<u8>,
}

/// The payload as one byte string instead of a sequence of `u8`s. The same
/// bytes in bincode (a varint length, then the bytes: bincode 2.0.1
/// `features/serde/ser.rs` `serialize_bytes` and `serialize_seq`, `u8`
/// written as one byte), so the disk format does not change; but bincode
/// copies them at once instead of going through serde once per byte, which
/// was 2 % of the agent's CPU while it published (issue #8, `perf`).
mod bytes {
    use serde::de::{Deserializer, Error, Visitor};
    use serde::ser::Serializer;
    use std::fmt;

    pub fn serialize<S: Serializer>(v: &&[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }
}

fn class_byte(class: Class) -> u8 {
    match class {
        Class::Heartbeat => 0,
        Class::Event => 1,
    }
}

fn class_from_byte(b: u8) -> Result<Class, RecordError> {
    match b {
        0 => Ok(Class::Heartbeat),
        1 => Ok(Class::Event),
        found => Err(RecordError::BadField { field: "class", found }),
    }
}

/// Encodes `record` as a stored value: version byte, then the bincode body.
pub fn encode(record: &Record) -> Result<Vec<u8>, RecordError> {
    let body = BodyV1Ref {
        seq: record.seq,
        ts_ms: record.ts_ms,
        class: class_byte(record.class),
        qos: record.qos.level(),
        retain: record.retain,
        topic: &record.topic,
        payload: &record.payload,
    };
    let mut out = Vec::with_capacity(32 + record.topic.len() + record.payload.len());
    out.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(&body, &mut out, bincode::config::standard())?;
    if out.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge { size: out.len(), max: MAX_RECORD_BYTES });
    }
    Ok(out)
}

/// Decodes a stored value found under key `key` in the `stored` tree.
pub fn decode(key: u64, stored: Class, value: &[u8]) -> Result<Record, RecordError> {
    let (&version, body) = value.split_first().ok_or(RecordError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(RecordError::UnknownVersion { found: version });
    }
    let config = bincode::config::standard().with_limit::<MAX_BODY_BYTES>();
    let (b, read): (BodyV1, usize) = bincode::serde::decode_from_slice(body, config)?;
    if read != body.len() {
        return Err(RecordError::TrailingBytes { extra: body.len() - read });
    }
    if b.seq != key {
        return Err(RecordError::SeqMismatch { key, found: b.seq });
    }
    let class = class_from_byte(b.class)?;
    if class != stored {
        return Err(RecordError::ClassMismatch { stored, found: class });
    }
    let qos = Qos::from_level(b.qos).ok_or(RecordError::BadField { field: "qos", found: b.qos })?;
    Ok(Record { seq: b.seq, ts_ms: b.ts_ms, class, qos, retain: b.retain, topic: b.topic, payload: b.payload })
}

/// Encodes a meta value or the `seq.floor` file: version byte, u64 big-endian.
pub fn encode_u64(v: u64) -> [u8; 9] {
    let mut out = [0u8; 9];
    out[0] = FORMAT_VERSION;
    out[1..].copy_from_slice(&v.to_be_bytes());
    out
}

/// The inverse of [`encode_u64`].
pub fn decode_u64(value: &[u8]) -> Result<u64, RecordError> {
    let [v] = decode_words::<1>(value, FORMAT_VERSION)?;
    Ok(v)
}

/// The `seq.floor` file: the seq reservation and the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Floor {
    /// Every seq ever assigned in this epoch is below `r`.
    pub r: u64,
    /// Which numbering the seqs belong to (see the module doc: Epoch).
    pub epoch: u64,
}

/// Encodes the `seq.floor` file: 0x02, then R and the epoch, u64 big-endian
/// (17 bytes).
pub(crate) fn encode_floor(f: &Floor) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[0] = FLOOR_VERSION;
    out[1..9].copy_from_slice(&f.r.to_be_bytes());
    out[9..].copy_from_slice(&f.epoch.to_be_bytes());
    out
}

/// The inverse of [`encode_floor`]; a version-1 file (0x01, then R: written
/// before epochs existed) reads as epoch 0, so an existing deployment keeps
/// its identity.
pub(crate) fn decode_floor(value: &[u8]) -> Result<Floor, RecordError> {
    match value.first() {
        Some(&FORMAT_VERSION) => decode_words::<1>(value, FORMAT_VERSION).map(|[r]| Floor { r, epoch: 0 }),
        _ => decode_words::<2>(value, FLOOR_VERSION).map(|[r, epoch]| Floor { r, epoch }),
    }
}

/// What the outbox held at its last clean close: the `outbox.closed` file,
/// written outside sled by builds before the ledger, so that the next open
/// could tell whether sled lost records since. This build only reads it
/// (once, the first open after an upgrade) and removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CloseSummary {
    /// The seq the next append would have got.
    pub next_seq: u64,
    /// Records stored.
    pub depth: u64,
    /// Their logical size.
    pub bytes: u64,
    /// Records dropped, ever.
    pub dropped: u64,
}

/// Encodes the `outbox.closed` file: version byte, then next_seq, depth,
/// bytes and dropped, each u64 big-endian (33 bytes).
#[cfg(test)]
pub(crate) fn encode_close_summary(s: &CloseSummary) -> Vec<u8> {
    let mut out = Vec::with_capacity(33);
    out.push(FORMAT_VERSION);
    for v in [s.next_seq, s.depth, s.bytes, s.dropped] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// The inverse of [`encode_close_summary`].
pub(crate) fn decode_close_summary(value: &[u8]) -> Result<CloseSummary, RecordError> {
    let [next_seq, depth, bytes, dropped] = decode_words::<4>(value, FORMAT_VERSION)?;
    Ok(CloseSummary { next_seq, depth, bytes, dropped })
}

/// The version byte `expected` followed by exactly `N` u64s, big-endian.
fn decode_words<const N: usize>(value: &[u8], expected: u8) -> Result<[u64; N], RecordError> {
    let (&version, rest) = value.split_first().ok_or(RecordError::Empty)?;
    if version != expected {
        return Err(RecordError::UnknownVersion { found: version });
    }
    if rest.len() != 8 * N {
        return Err(RecordError::BadLength { found: value.len(), expected: 1 + 8 * N });
    }
    let mut out = [0u64; N];
    for (word, chunk) in out.iter_mut().zip(rest.chunks_exact(8)) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        *word = u64::from_be_bytes(bytes);
    }
    Ok(out)
}

/// The tree key of `seq`: big-endian, so byte order is seq order.
pub fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The seq of a tree key, or `None` for a key the outbox never writes.
pub fn seq_of_key(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            seq: 42,
            ts_ms: 1_763_719_200_123,
            class: Class::Event,
            qos: Qos::ExactlyOnce,
            retain: true,
            topic: "fieldlink/pi-garage/relay/pump/state".to_string(),
            payload: br#"{"device":"pi-garage","seq":42}"#.to_vec(),
        }
    }

    /// The body as earlier builds wrote it: the payload through serde's
    /// default for `&[u8]` (a sequence of `u8`).
    #[derive(Serialize)]
    struct EarlierBodyV1<'a> {
        seq: u64,
        ts_ms: u64,
        class: u8,
        qos: u8,
        retain: bool,
        topic: &'a str,
        payload: &'a [u8],
    }

    fn earlier_encoding(r: &Record) -> Vec<u8> {
        let body = EarlierBodyV1 {
            seq: r.seq,
            ts_ms: r.ts_ms,
            class: class_byte(r.class),
            qos: r.qos.level(),
            retain: r.retain,
            topic: &r.topic,
            payload: &r.payload,
        };
        let mut out = vec![FORMAT_VERSION];
        bincode::serde::encode_into_std_write(&body, &mut out, bincode::config::standard()).expect("encode");
        out
    }

    #[test]
    fn records_keep_the_disk_format_of_earlier_builds() {
        // Payloads across bincode's varint length steps (< 251, u16, u32).
        for len in [0, 1, 250, 251, 300, 65_535, 65_536, 70_000] {
            let r = Record { payload: (0..len).map(|i| (i % 251) as u8).collect(), ..sample() };
            let earlier = earlier_encoding(&r);
            assert_eq!(encode(&r).expect("encode"), earlier, "payload of {len} bytes is written as before");
            let back = decode(r.seq, r.class, &earlier).expect("an earlier build's record decodes");
            assert!(same(&back, &r), "payload of {len} bytes reads back unchanged");
        }
    }

    fn same(a: &Record, b: &Record) -> bool {
        (a.seq, a.ts_ms, a.class, a.qos, a.retain, &a.topic, &a.payload)
            == (b.seq, b.ts_ms, b.class, b.qos, b.retain, &b.topic, &b.payload)
    }

    #[test]
    fn a_record_round_trips_through_the_codec() {
        let r = sample();
        let bytes = encode(&r).expect("encode");
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back = decode(42, Class::Event, &bytes).expect("decode");
        assert!(same(&r, &back), "{back:?}");

        let hb = Record { class: Class::Heartbeat, qos: Qos::AtLeastOnce, retain: false, payload: vec![], ..r };
        let back = decode(42, Class::Heartbeat, &encode(&hb).expect("encode")).expect("decode");
        assert!(same(&hb, &back), "{back:?}");
    }

    #[test]
    fn an_unknown_version_is_rejected() {
        let mut bytes = encode(&sample()).expect("encode");
        bytes[0] = 2;
        assert!(matches!(decode(42, Class::Event, &bytes), Err(RecordError::UnknownVersion { found: 2 })));
        assert!(matches!(decode(42, Class::Event, &[]), Err(RecordError::Empty)));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&sample()).expect("encode");
        bytes.push(0);
        assert!(matches!(decode(42, Class::Event, &bytes), Err(RecordError::TrailingBytes { extra: 1 })));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..512 {
            let mut v: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            // Half of the cases get past the version check.
            if len % 2 == 1 {
                v[0] = FORMAT_VERSION;
            }
            // Garbage may decode by chance; what matters is that it never panics.
            let _ignored = decode(7, Class::Event, &v);
        }
        // A huge length prefix hits the limit instead of allocating.
        let mut huge = vec![FORMAT_VERSION, 7, 1, 1, 1, 0];
        huge.extend_from_slice(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(decode(7, Class::Event, &huge).is_err());
    }

    #[test]
    fn a_body_under_the_wrong_key_or_class_or_with_a_bad_qos_is_rejected() {
        let bytes = encode(&sample()).expect("encode");
        assert!(matches!(decode(43, Class::Event, &bytes), Err(RecordError::SeqMismatch { key: 43, found: 42 })));
        assert!(matches!(decode(42, Class::Heartbeat, &bytes), Err(RecordError::ClassMismatch { .. })));

        let body = BodyV1Ref { seq: 1, ts_ms: 0, class: 1, qos: 0, retain: false, topic: "t", payload: &[] };
        let mut bad = vec![FORMAT_VERSION];
        bincode::serde::encode_into_std_write(&body, &mut bad, bincode::config::standard()).expect("encode");
        assert!(matches!(decode(1, Class::Event, &bad), Err(RecordError::BadField { field: "qos", found: 0 })));
    }

    #[test]
    fn an_oversized_record_is_refused_at_encode() {
        let r = Record { payload: vec![b'x'; MAX_RECORD_BYTES], ..sample() };
        assert!(matches!(encode(&r), Err(RecordError::TooLarge { .. })));
    }

    #[test]
    fn meta_values_round_trip_and_reject_garbage() {
        assert_eq!(decode_u64(&encode_u64(1_000_001)).expect("decode"), 1_000_001);
        assert!(matches!(decode_u64(&[2, 0, 0, 0, 0, 0, 0, 0, 1]), Err(RecordError::UnknownVersion { found: 2 })));
        assert!(matches!(decode_u64(&[1, 0, 0]), Err(RecordError::BadLength { .. })));
        assert!(matches!(decode_u64(&[]), Err(RecordError::Empty)));
    }

    #[test]
    fn a_close_summary_round_trips_and_rejects_garbage() {
        let s = CloseSummary { next_seq: 42, depth: 41, bytes: 2_460, dropped: u64::MAX };
        let bytes = encode_close_summary(&s);
        assert_eq!((bytes.len(), bytes[0]), (33, FORMAT_VERSION));
        assert_eq!(decode_close_summary(&bytes).expect("decode"), s);
        assert!(matches!(decode_close_summary(&bytes[..32]), Err(RecordError::BadLength { found: 32, expected: 33 })));
        assert!(matches!(decode_close_summary(&encode_u64(1)), Err(RecordError::BadLength { .. })));
        let mut future = bytes.clone();
        future[0] = 2;
        assert!(matches!(decode_close_summary(&future), Err(RecordError::UnknownVersion { found: 2 })));
        assert!(matches!(decode_close_summary(&[]), Err(RecordError::Empty)));
    }

    #[test]
    fn a_floor_round_trips_with_its_epoch_and_a_version_1_floor_reads_as_epoch_0() {
        let f = Floor { r: 2_000_001, epoch: 1_763_719_200_123 };
        let bytes = encode_floor(&f);
        assert_eq!((bytes.len(), bytes[0]), (17, FLOOR_VERSION));
        assert_eq!(decode_floor(&bytes).expect("decode"), f);
        let v1 = encode_u64(1_000_001);
        assert_eq!(decode_floor(&v1).expect("decode v1"), Floor { r: 1_000_001, epoch: 0 });
        assert!(matches!(decode_floor(&bytes[..9]), Err(RecordError::BadLength { .. })));
        assert!(matches!(decode_floor(&[3, 0]), Err(RecordError::UnknownVersion { found: 3 })));
        assert!(matches!(decode_floor(&[]), Err(RecordError::Empty)));
    }

    #[test]
    fn keys_sort_in_seq_order() {
        assert!(key(255) < key(256));
        assert_eq!(seq_of_key(&key(u64::MAX)), Some(u64::MAX));
        assert_eq!(seq_of_key(b"short"), None);
    }
}
