//! Fresh records: what the writer stored since its last commit, kept as
//! [`Record`]s so that the commit can hand them to whoever publishes them
//! (the Link) without a read of the database (module doc: Fresh records).
//! Owns the buffer, its bound and the rule that makes a handed-out batch
//! *complete* for its seq range; it must not touch storage or decide what is
//! durable (the writer calls [`FreshBuf::take`] only after a successful
//! commit).

use super::Record;

/// The most records one batch carries; beyond it the rest of the commit is
/// read from the database as before.
pub const FRESH_MAX_RECORDS: usize = 4096;

/// The most bytes (topics and payloads) one batch carries.
pub const FRESH_MAX_BYTES: usize = 1 << 20;

/// Records a commit made durable, in seq order: every record stored with
/// `from <= seq <= upto`, none missing (seqs dropped before they were stored,
/// or removed by the bound before the commit, are not records). A reader of
/// the database would have returned exactly these for that range.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub from: u64,
    pub upto: u64,
    pub records: Vec<Record>,
}

/// The writer's buffer of records stored since the last commit.
#[derive(Debug, Default)]
pub(crate) struct FreshBuf {
    /// Whether anyone takes batches (the Link installs a callback); if not,
    /// nothing is kept.
    pub wanted: bool,
    /// The first seq of the range the buffer covers; `None` while it covers
    /// nothing reliably (before the first commit, after a disk fault).
    from: Option<u64>,
    records: Vec<Record>,
    bytes: usize,
    /// The bound was hit: the buffer covers `from..` up to its last record
    /// only.
    full: bool,
}

impl FreshBuf {
    /// A record was stored under `seq` (seqs come in increasing order).
    pub(crate) fn stored(&mut self, record: Record) {
        if !self.wanted || self.from.is_none() || self.full {
            return;
        }
        let size = record.topic.len() + record.payload.len();
        if self.records.len() >= FRESH_MAX_RECORDS || self.bytes + size > FRESH_MAX_BYTES {
            self.full = true;
            return;
        }
        self.bytes += size;
        self.records.push(record);
    }

    /// `seq` left the database before the commit (the bound): a batch must
    /// not carry it.
    pub(crate) fn removed(&mut self, seq: u64) {
        if let Ok(at) = self.records.binary_search_by_key(&seq, |r| r.seq) {
            let r = self.records.remove(at);
            self.bytes -= r.topic.len() + r.payload.len();
        }
    }

    /// Something went wrong with the database (a disk fault): the buffer no
    /// longer tells what the next commit covers.
    pub(crate) fn forget(&mut self) {
        self.from = None;
        self.records = Vec::new();
        self.bytes = 0;
        self.full = false;
    }

    /// After a successful commit covering every seq below `next_seq`: the
    /// batch (if the buffer covered its range reliably), and a new range
    /// from `next_seq`.
    pub(crate) fn take(&mut self, next_seq: u64) -> Option<Fresh> {
        let from = self.from.replace(next_seq);
        let records = std::mem::take(&mut self.records);
        let full = std::mem::replace(&mut self.full, false);
        self.bytes = 0;
        if !self.wanted {
            return None;
        }
        let from = from?;
        let upto = match (full, records.last()) {
            // Complete up to the last record kept; the rest is read.
            (true, Some(last)) => last.seq,
            (true, None) => return None,
            (false, _) => next_seq.checked_sub(1)?,
        };
        (upto >= from).then_some(Fresh { from, upto, records })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Class;
    use crate::proto::Qos;

    fn rec(seq: u64, payload_len: usize) -> Record {
        Record {
            seq,
            ts_ms: 0,
            class: Class::Event,
            qos: Qos::AtLeastOnce,
            retain: false,
            topic: "t".into(),
            payload: vec![b'x'; payload_len],
        }
    }

    fn seqs(f: &Fresh) -> Vec<u64> {
        f.records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn a_batch_covers_every_seq_since_the_last_commit_and_leaves_out_removed_ones() {
        let mut b = FreshBuf { wanted: true, ..FreshBuf::default() };
        assert!(b.take(5).is_none(), "nothing is known before the first commit");
        for s in 5..=8 {
            b.stored(rec(s, 10));
        }
        b.removed(6);
        // seq 9 was dropped before it was stored: no record, still covered.
        let f = b.take(10).expect("a batch");
        assert_eq!((f.from, f.upto, seqs(&f)), (5, 9, vec![5, 7, 8]));
        assert!(b.take(10).is_none(), "a commit that covers no new seq hands out nothing");
    }

    #[test]
    fn a_full_buffer_covers_only_up_to_its_last_record() {
        let mut b = FreshBuf { wanted: true, ..FreshBuf::default() };
        let _ = b.take(1);
        b.stored(rec(1, FRESH_MAX_BYTES - 10));
        b.stored(rec(2, 100));
        b.stored(rec(3, 1));
        let f = b.take(4).expect("a batch");
        assert_eq!((f.from, f.upto, seqs(&f)), (1, 1, vec![1]), "2 and 3 are left to a read");
        b.stored(rec(4, 1));
        let f = b.take(5).expect("the next batch starts afresh");
        assert_eq!((f.from, f.upto, seqs(&f)), (4, 4, vec![4]));
    }

    #[test]
    fn after_a_disk_fault_the_next_commit_hands_out_nothing() {
        let mut b = FreshBuf { wanted: true, ..FreshBuf::default() };
        let _ = b.take(1);
        b.stored(rec(1, 1));
        b.forget();
        b.stored(rec(2, 1));
        assert!(b.take(3).is_none());
        b.stored(rec(3, 1));
        assert_eq!(b.take(4).map(|f| seqs(&f)), Some(vec![3]));
    }

    #[test]
    fn nothing_is_kept_when_nobody_takes_batches() {
        let mut b = FreshBuf::default();
        let _ = b.take(1);
        b.stored(rec(1, 1));
        assert!(b.records.is_empty());
        assert!(b.take(2).is_none());
    }
}
