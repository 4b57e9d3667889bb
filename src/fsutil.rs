//! Small durable-file helpers shared by every state file (status dump, the
//! outbox's side files, the API token; the sim board's latched outputs,
//! overwritten in place without fsync). Owns "write to a temp file, fsync,
//! rename, fsync the directory", the same without the fsyncs (the status
//! dump) and the unsynced in-place overwrite; it knows nothing about what
//! the bytes mean.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Makes a rename, link or removal in `path`'s directory durable.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

/// Replaces `path` with `bytes` so that a reader (or a power cut) sees either
/// the old content or the new, never a torn file. The temporary file is
/// `<path>.tmp`; a failed write removes it again, so that on a full disk it
/// does not keep the few blocks it got.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, 0o666, true)
}

/// [`write_atomic`] without its two fsyncs: a reader sees the old content
/// or the new, never a torn file, but a power cut may leave the old one (or,
/// on a filesystem without ext4's `auto_da_alloc`, an empty one). For
/// snapshots nothing rests on (the status dump), so that whoever waits for
/// them does not wait for the disk (issue #8: `fieldlink status`).
pub fn replace_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, 0o666, false)
}

/// [`write_atomic`] for a secret: the file is mode 0600 from its first byte
/// (also when it replaces a file with looser permissions).
pub fn write_atomic_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, 0o600, true)
}

/// Overwrites `path` in place with `bytes`, without any fsync, creating it
/// if missing: one `pwrite` at offset 0 into the file's existing blocks, no
/// temporary file, no rename, no truncation. When `bytes` is shorter than
/// the file, the rest is overwritten with ASCII spaces, so the content must
/// tolerate trailing whitespace (JSON does). For state whose loss on
/// power-off is the real thing being simulated (the sim board's latched
/// outputs), never for anything a promise rests on.
///
/// Why not temp file + rename (what this replaced, issue #8): on ext4 every
/// rename allocated a new inode and data block, which the next journal
/// commit had to write first (`data=ordered`), and the next journal commit
/// is the outbox's `fdatasync` on a command's critical path. An overwrite of
/// an already allocated block adds nothing to that commit but the inode's
/// times.
///
/// A crash or `kill -9` of the process loses nothing and never tears the
/// file while it fits one page (the kernel copies a one-page `pwrite` whole
/// before it looks at a fatal signal: `mm/filemap.c`,
/// `generic_perform_write`); a power cut or kernel crash may leave the old
/// content or, unlike a rename, a torn one.
pub fn overwrite_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new().write(true).create(true).truncate(false).open(path)?;
    let old_len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    if bytes.len() >= old_len {
        return file.write_all_at(bytes, 0);
    }
    let mut padded = Vec::with_capacity(old_len);
    padded.extend_from_slice(bytes);
    padded.resize(old_len, b' ');
    file.write_all_at(&padded, 0)
}

fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).and_then(|mut f| {
            // A stale temp file keeps its old mode through `open`: tighten it
            // before the secret goes in.
            if mode & 0o077 == 0 {
                f.set_permissions(fs::Permissions::from_mode(mode))?;
            }
            f.write_all(bytes)?;
            if sync { f.sync_all() } else { Ok(()) }
        });
    if let Err(e) = written {
        // Best effort: it may not even exist, and the write's error is the one to report.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, path)?;
    // The rename is durable only once the directory entry is.
    if sync { sync_parent(path) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_whole_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.json");
        write_atomic(&p, b"first, longer content").expect("write");
        write_atomic(&p, b"second").expect("write");
        assert_eq!(fs::read(&p).expect("read"), b"second");
        let names: Vec<_> = fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn an_in_place_overwrite_keeps_the_same_file_and_reads_back_as_the_new_content() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.json");
        overwrite_unsynced(&p, br#"{"a": "first, longer content"}"#).expect("create");
        let inode = fs::metadata(&p).expect("stat").ino();
        overwrite_unsynced(&p, br#"{"a": 2}"#).expect("overwrite");
        let text = fs::read_to_string(&p).expect("read");
        assert_eq!(text.trim_end(), r#"{"a": 2}"#, "only trailing spaces remain of the old content");
        let v: serde_json::Value = serde_json::from_str(&text).expect("still valid JSON");
        assert_eq!(v["a"], 2);
        assert_eq!(fs::metadata(&p).expect("stat").ino(), inode, "the same file, not a replacement");
        let names: Vec<_> = fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 1, "no temp file: {names:?}");
    }

    #[test]
    fn a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.json");
        write_atomic(&p, b"old").expect("write");
        // /dev/full fails every write with ENOSPC, like a full disk.
        let full = Path::new("/dev/full");
        if !full.exists() {
            eprintln!("skipped: no /dev/full");
            return;
        }
        std::os::unix::fs::symlink(full, dir.path().join("x.json.tmp")).expect("symlink");
        let e = write_atomic(&p, b"new").expect_err("a full disk");
        assert_eq!(e.raw_os_error(), Some(28), "{e}");
        assert_eq!(fs::read(&p).expect("read"), b"old");
        assert!(!dir.path().join("x.json.tmp").exists(), "the temp file is gone");
    }

    #[test]
    fn a_private_write_is_mode_0600_even_over_a_looser_file_and_temp_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("secret");
        for f in [p.clone(), dir.path().join("secret.tmp")] {
            fs::write(&f, b"old").expect("write");
            fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        write_atomic_private(&p, b"new").expect("write");
        assert_eq!(fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&p).expect("read"), b"new");
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("x.json")), Path::new("."));
        assert_eq!(parent_dir(Path::new("state/x.json")), Path::new("state"));
    }
}
