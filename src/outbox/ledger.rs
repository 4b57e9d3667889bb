//! The ledger: a small file beside sled, `<state_dir>/outbox.ledger`,
//! rewritten and fdatasync'ed after every group commit (as vector's disk
//! buffer keeps `ledger.rs` beside its data files). It says what the last
//! successful commit made durable, so that the next open can tell a database
//! that went back to an older state (sled opens a damaged `db` file that way,
//! without an error) from one that is up to date, and count the records that
//! should be there but are not. Owns the ledger's byte layout, picking the
//! newest valid slot, and the file I/O (create, write in place, fdatasync).
//!
//! It must not decide what a mismatch means (`open.rs` does) and must never
//! panic on a damaged file: a slot that does not check out is ignored.
//!
//! ```text
//! outbox.ledger: 256 bytes, two slots of 128 bytes; write n goes to slot n % 2,
//! so a torn write leaves the other slot intact. A slot (integers big-endian):
//!   0    u8   version 0x01
//!   1    u8   flags: bit 0 = written by a clean close
//!   2    6 bytes zero
//!   8    u64  write_no: which write this is; the valid slot with the higher one wins
//!   16   u64  commit: the value of the "commit" meta key that the same fsync made durable
//!   24   u64  next_seq: the seq the next append gets
//!   32   u64  depth: records stored (not acked, not dropped)
//!   40   u64  bytes: their logical size
//!   48   u64  live_from: every seq below it is acked or dropped
//!   56   u64  dropped: records dropped, ever
//!   64   u64  unsaved: records accepted but held in memory (the disk failed)
//!   72   u64  handed_out: the seq the next append gets, as of this write (during a disk
//!             fault seqs are handed out without a commit; they must not repeat either)
//!   80   40 bytes zero
//!   120  u64  checksum: FNV-1a 64 of bytes 0..120
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::fsutil;

/// The version byte of a ledger slot.
pub const LEDGER_VERSION: u8 = 1;
const SLOT: usize = 128;
const FILE_LEN: u64 = 2 * SLOT as u64;
const CHECKSUMMED: usize = 120;
const FLAG_CLEAN: u8 = 1;

/// One ledger entry: the outbox as of a commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ledger {
    pub write_no: u64,
    pub commit: u64,
    pub next_seq: u64,
    pub depth: u64,
    pub bytes: u64,
    pub live_from: u64,
    pub dropped: u64,
    pub unsaved: u64,
    pub handed_out: u64,
    pub clean: bool,
}

/// Why the ledger file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{what} '{}': {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("'{}' holds no valid ledger entry ({len} bytes, both slots fail their checks)", path.display())]
    NoValidSlot { path: PathBuf, len: usize },
}

/// FNV-1a, 64 bit: enough to tell a torn or overwritten slot from a good one.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Encodes one slot.
pub(crate) fn encode(l: &Ledger) -> [u8; SLOT] {
    let mut out = [0u8; SLOT];
    out[0] = LEDGER_VERSION;
    out[1] = if l.clean { FLAG_CLEAN } else { 0 };
    let words = [l.write_no, l.commit, l.next_seq, l.depth, l.bytes, l.live_from, l.dropped, l.unsaved, l.handed_out];
    for (i, w) in words.iter().enumerate() {
        out[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_be_bytes());
    }
    let sum = fnv1a(&out[..CHECKSUMMED]);
    out[CHECKSUMMED..].copy_from_slice(&sum.to_be_bytes());
    out
}

/// Decodes one slot; `None` unless version, checksum and flags check out.
pub(crate) fn decode(slot: &[u8]) -> Option<Ledger> {
    if slot.len() != SLOT || slot[0] != LEDGER_VERSION || slot[1] & !FLAG_CLEAN != 0 {
        return None;
    }
    let word = |at: usize| -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&slot[at..at + 8]);
        u64::from_be_bytes(b)
    };
    if word(CHECKSUMMED) != fnv1a(&slot[..CHECKSUMMED]) {
        return None;
    }
    Some(Ledger {
        write_no: word(8),
        commit: word(16),
        next_seq: word(24),
        depth: word(32),
        bytes: word(40),
        live_from: word(48),
        dropped: word(56),
        unsaved: word(64),
        handed_out: word(72),
        clean: slot[1] & FLAG_CLEAN != 0,
    })
}

/// The newest valid entry of a whole ledger file's content.
pub(crate) fn newest(content: &[u8]) -> Option<Ledger> {
    content.chunks(SLOT).take(2).filter_map(decode).max_by_key(|l| l.write_no)
}

/// The ledger file, kept open between writes.
pub(crate) struct LedgerFile {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl LedgerFile {
    pub(crate) fn new(path: PathBuf) -> LedgerFile {
        LedgerFile { path, file: Mutex::new(None) }
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> LedgerError + '_ {
        move |source| LedgerError::Io { what, path: self.path.clone(), source }
    }

    /// The newest valid entry, `Ok(None)` if there is no ledger file yet.
    pub(crate) fn read(&self) -> Result<Option<Ledger>, LedgerError> {
        let content = match std::fs::read(&self.path) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io("cannot read the outbox ledger")(e)),
        };
        match newest(&content) {
            Some(l) => Ok(Some(l)),
            None => Err(LedgerError::NoValidSlot { path: self.path.clone(), len: content.len() }),
        }
    }

    /// Writes `l` into its slot and fdatasyncs the file. The file is
    /// created (full length, fsynced, directory fsynced) on first use, so
    /// later writes change no metadata and need no new blocks: they work on
    /// a full disk too.
    pub(crate) fn write(&self, l: &Ledger) -> Result<(), LedgerError> {
        let mut guard = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(self.open_or_create()?);
        }
        let Some(file) = guard.as_ref() else {
            return Err(self.io("cannot open the outbox ledger")(io::Error::other("not open")));
        };
        let offset = (l.write_no % 2) * SLOT as u64;
        let written = file.write_all_at(&encode(l), offset).and_then(|()| file.sync_data());
        if let Err(e) = written {
            // Reopened on the next write, in case the handle itself went bad.
            *guard = None;
            return Err(self.io("cannot write the outbox ledger")(e));
        }
        Ok(())
    }

    fn open_or_create(&self) -> Result<File, LedgerError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(self.io("cannot open the outbox ledger"))?;
        let len = file.metadata().map_err(self.io("cannot stat the outbox ledger"))?.len();
        if len < FILE_LEN {
            // Allocate the whole file now (zeros where there is no slot yet).
            let zeros = vec![0u8; (FILE_LEN - len) as usize];
            file.write_all_at(&zeros, len)
                .and_then(|()| file.sync_all())
                .map_err(self.io("cannot create the outbox ledger"))?;
            fsutil::sync_parent(&self.path).map_err(self.io("cannot fsync the directory of"))?;
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(write_no: u64) -> Ledger {
        Ledger {
            write_no,
            commit: 7,
            next_seq: 1_000_042,
            depth: 41,
            bytes: 9_000,
            live_from: 999_990,
            dropped: 3,
            unsaved: 2,
            handed_out: 1_000_044,
            clean: true,
        }
    }

    #[test]
    fn a_ledger_slot_round_trips_and_a_flipped_byte_fails_its_checksum() {
        let l = sample(5);
        let bytes = encode(&l);
        assert_eq!(decode(&bytes), Some(l));
        for at in [0, 1, 9, 60, 119, 127] {
            let mut bad = bytes;
            bad[at] ^= 0x10;
            assert_eq!(decode(&bad), None, "byte {at} flipped");
        }
        assert_eq!(decode(&bytes[..64]), None);
        assert_eq!(decode(&[0u8; SLOT]), None, "an unwritten slot");
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_newest_slot_falls_back_to_the_other() {
        let mut file = [0u8; 2 * SLOT];
        file[..SLOT].copy_from_slice(&encode(&sample(4)));
        file[SLOT..].copy_from_slice(&encode(&sample(5)));
        assert_eq!(newest(&file).map(|l| l.write_no), Some(5));
        file[SLOT + 30] ^= 1;
        assert_eq!(newest(&file).map(|l| l.write_no), Some(4));
        assert_eq!(newest(&file[..10]), None);
    }

    #[test]
    fn the_ledger_file_is_written_in_place_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outbox.ledger");
        let f = LedgerFile::new(path.clone());
        assert_eq!(f.read().expect("read"), None);
        for n in 1..=3 {
            f.write(&sample(n)).expect("write");
        }
        assert_eq!(f.read().expect("read").map(|l| l.write_no), Some(3));
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), FILE_LEN);
        std::fs::write(&path, b"garbage").expect("write");
        assert!(matches!(LedgerFile::new(path).read(), Err(LedgerError::NoValidSlot { .. })));
    }
}
