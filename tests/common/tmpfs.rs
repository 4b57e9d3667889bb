//! A small tmpfs for disk-full tests (root only), and filling it up. Owns
//! nothing else; a test that cannot mount one prints why and takes its
//! fallback, it never fails for want of root.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for one test; lazily unmounted on drop.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"4m"`) on `path`, creating it.
    /// `FIELDLINK_NO_TMPFS=1` refuses, to exercise a test's fallback.
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        if std::env::var("FIELDLINK_NO_TMPFS").as_deref() == Ok("1") {
            return Err("FIELDLINK_NO_TMPFS=1".to_string());
        }
        std::fs::create_dir_all(path).map_err(|e| format!("create {}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs refused: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs { path: path.to_path_buf() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the agent may still hold files; a failure leaves a tmpfs
        // behind, nothing worse.
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the file system holding `ballast` until a write fails; returns how
/// many bytes it took.
pub fn fill(ballast: &Path) -> u64 {
    let mut f = std::fs::File::create(ballast).unwrap_or_else(|e| panic!("create {}: {e}", ballast.display()));
    let mut written = 0u64;
    for chunk in [64 * 1024, 4096, 512, 1] {
        let block = vec![0xa5u8; chunk];
        while f.write_all(&block).is_ok() {
            written += chunk as u64;
        }
    }
    // Whatever sits in the buffer fails the same way; the disk is full.
    let _ = f.sync_all();
    written
}
