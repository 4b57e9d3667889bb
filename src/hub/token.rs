//! The API token (DESIGN: Hub, `[web] token_file`): every page and API call
//! presents it. Owns the token file and comparing a presented token.
//!
//! The file holds the token on one line. On first start it does not exist
//! and is created with 32 random bytes from the operating system as 64
//! lowercase hex characters, mode 0600, atomically: the token is written to
//! a temporary file (mode 0600 from the start) in the same directory,
//! synced, and then linked into place, so a reader or a power cut never
//! sees a partial file, and of two hubs starting at once on one state
//! directory the second reads the first one's token instead of replacing
//! it. A file that exists is used as it is, after two checks: no access for
//! group or others (like ssh with a private key), and a token of at least
//! 32 characters of `[A-Za-z0-9_-]` (so a hand-written one may be used).
//! The token never appears in an error.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::describe_io;

/// The fewest characters a token may have.
pub const MIN_CHARS: usize = 32;
/// Random bytes in a generated token (twice as many hex characters).
const RANDOM_BYTES: usize = 32;
/// Permission bits that give group or others any access.
const OPEN_BITS: u32 = 0o077;

/// Why the token could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A file system call failed; `action` says which (`read`, `create`, ...).
    #[error("cannot {action} token file '{}': {}", path.display(), describe_io(source))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file gives group or others access to the token.
    #[error(
        "token file '{}' is open to other users (mode {mode:04o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
    /// The file does not hold a usable token; `why` never quotes it.
    #[error(
        "token file '{}' {why} (expected at least {MIN_CHARS} characters of [A-Za-z0-9_-]; delete the file to get a new token)",
        path.display()
    )]
    Invalid { path: PathBuf, why: String },
    /// The operating system's random number generator failed.
    #[error("cannot generate a token for '{}': the system's random number generator failed: {source}", path.display())]
    Random { path: PathBuf, source: getrandom::Error },
}

/// Reads the token from `path`, or creates the file with a new token if it
/// does not exist (creating its directory too). Returns the token and
/// whether it was created now, so that the caller prints a new token once.
pub fn load_or_create(path: &Path) -> Result<(String, bool), TokenError> {
    match load(path) {
        Err(TokenError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => create(path),
        loaded => loaded.map(|token| (token, false)),
    }
}

/// Whether `presented` is the `expected` token, in time that depends on the
/// lengths only, never on where the first difference is. An empty expected
/// token matches nothing.
pub fn matches(expected: &str, presented: &str) -> bool {
    let (a, b) = (expected.as_bytes(), presented.as_bytes());
    if a.is_empty() || a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

/// Reads and checks an existing token file. The mode is checked on the
/// opened file, so it is the mode of the file that is read.
fn load(path: &Path) -> Result<String, TokenError> {
    let io_error = |action| move |source| TokenError::Io { action, path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io_error("read"))?;
    let meta = file.metadata().map_err(io_error("read"))?;
    if meta.is_dir() {
        return Err(TokenError::Invalid { path: path.to_path_buf(), why: "is a directory".to_string() });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & OPEN_BITS != 0 {
        return Err(TokenError::TooOpen { path: path.to_path_buf(), mode });
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_error("read"))?;
    let invalid = |why: String| TokenError::Invalid { path: path.to_path_buf(), why };
    let text = String::from_utf8(bytes).map_err(|_| invalid("is not utf-8 text".to_string()))?;
    let token = text.trim();
    if !token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(invalid("holds a character outside [A-Za-z0-9_-]".to_string()));
    }
    if token.len() < MIN_CHARS {
        return Err(invalid(format!("holds a token of only {} characters", token.len())));
    }
    Ok(token.to_string())
}

/// Creates the token file: temporary file (0600), sync, link into place,
/// sync the directory. If another process created the file in the meantime,
/// its token is the one returned (not created).
fn create(path: &Path) -> Result<(String, bool), TokenError> {
    let io_error = |action| move |source| TokenError::Io { action, path: path.to_path_buf(), source };
    let dir = crate::fsutil::parent_dir(path);
    fs::create_dir_all(dir).map_err(io_error("create the directory of"))?;
    let token = generate(path)?;

    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = write_private(&tmp, &token);
    let placed = written.and_then(|()| match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        // A file system without hard links: fall back to a rename, which
        // would replace a file created meanwhile, but is still atomic.
        Err(_) => fs::rename(&tmp, path).map(|()| true),
    });
    // The temporary file is gone after a rename, and only litter otherwise;
    // failing to remove it changes nothing about the token.
    let _ = fs::remove_file(&tmp);
    match placed.map_err(io_error("create"))? {
        true => {
            // The new name is durable only once the directory entry is.
            crate::fsutil::sync_parent(path).map_err(io_error("sync the directory of"))?;
            Ok((token, true))
        }
        false => load(path).map(|token| (token, false)),
    }
}

/// Writes `token` and a newline to `tmp` with mode 0600, replacing a stale
/// temporary file of the same name, and syncs it.
fn write_private(tmp: &Path, token: &str) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(tmp)?;
    // `mode` applies only to a new file (and under the umask): make sure.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()
}

/// 32 random bytes from the operating system, as lowercase hex.
fn generate(path: &Path) -> Result<String, TokenError> {
    let mut bytes = [0u8; RANDOM_BYTES];
    getrandom::fill(&mut bytes).map_err(|source| TokenError::Random { path: path.to_path_buf(), source })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).expect("token file exists").permissions().mode() & 0o7777
    }

    fn write_with_mode(path: &Path, content: &str, mode: u32) {
        fs::write(path, content).expect("write token file");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn a_missing_file_is_created_with_mode_0600_and_a_random_hex_token() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state/sub/hub.token");
        let (token, created) = load_or_create(&path).expect("created");
        assert!(created);
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{token}");
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(fs::read_to_string(&path).expect("read"), format!("{token}\n"));
        let names: Vec<_> =
            fs::read_dir(path.parent().expect("parent")).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, ["hub.token"], "no temporary file is left behind");
    }

    #[test]
    fn the_token_is_reused_on_the_second_call() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hub.token");
        let (first, created) = load_or_create(&path).expect("created");
        assert!(created);
        let (second, created) = load_or_create(&path).expect("loaded");
        assert!(!created);
        assert_eq!(first, second);
    }

    #[test]
    fn two_new_files_get_different_tokens() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (a, _) = load_or_create(&dir.path().join("a.token")).expect("created");
        let (b, _) = load_or_create(&dir.path().join("b.token")).expect("created");
        assert_ne!(a, b);
    }

    #[test]
    fn a_hand_written_token_is_used_trimmed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hub.token");
        let token = "Hand_written-token_0123456789abcdef";
        write_with_mode(&path, &format!("  {token}\r\n"), 0o600);
        assert_eq!(load_or_create(&path).expect("loaded"), (token.to_string(), false));
    }

    #[test]
    fn a_file_open_to_group_or_others_is_refused_with_the_chmod_to_run() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hub.token");
        for mode in [0o644, 0o640, 0o604, 0o620] {
            write_with_mode(&path, &"a".repeat(64), mode);
            let err = load_or_create(&path).expect_err("too open");
            assert!(matches!(err, TokenError::TooOpen { .. }), "{err:?}");
            assert_eq!(
                err.to_string(),
                format!(
                    "token file '{}' is open to other users (mode {mode:04o}); run `chmod 600 {}`",
                    path.display(),
                    path.display()
                )
            );
        }
        write_with_mode(&path, &"a".repeat(64), 0o400);
        assert!(load_or_create(&path).is_ok(), "read-only for the owner is fine");
    }

    #[test]
    fn a_too_short_token_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hub.token");
        let short = "s3cret-but-short";
        write_with_mode(&path, &format!("{short}\n"), 0o600);
        let err = load_or_create(&path).expect_err("too short");
        assert!(matches!(err, TokenError::Invalid { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.starts_with(&format!("token file '{}' holds a token of only 16 characters", path.display())));
        assert!(message.contains("at least 32 characters"), "{message}");
        assert!(!message.contains(short), "{message}");

        write_with_mode(&path, "\n", 0o600);
        assert!(load_or_create(&path).expect_err("empty").to_string().contains("only 0 characters"));
    }

    #[test]
    fn a_token_with_other_characters_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hub.token");
        write_with_mode(&path, &format!("{} {}", "a".repeat(32), "b".repeat(32)), 0o600);
        let err = load_or_create(&path).expect_err("a space inside");
        assert!(err.to_string().contains("holds a character outside [A-Za-z0-9_-]"), "{err}");
    }

    #[test]
    fn a_directory_in_the_way_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("hub.token");
        fs::create_dir(&path).expect("mkdir");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod");
        let err = load_or_create(&path).expect_err("a directory");
        assert!(err.to_string().starts_with(&format!("token file '{}' is a directory", path.display())), "{err}");
    }

    #[test]
    fn an_unwritable_directory_is_an_io_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blocker = dir.path().join("not-a-dir");
        fs::write(&blocker, "").expect("write");
        let path = blocker.join("hub.token");
        let err = load_or_create(&path).expect_err("parent is a file");
        assert!(matches!(err, TokenError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(&format!("token file '{}'", path.display())), "{err}");
    }

    #[test]
    fn matches_compares_whole_tokens() {
        let token = "0123456789abcdef0123456789abcdef";
        assert!(matches(token, token));
        assert!(!matches(token, "0123456789abcdef0123456789abcdeF"));
        assert!(!matches(token, "1123456789abcdef0123456789abcdef"));
        assert!(!matches(token, &token[..31]));
        assert!(!matches(token, &format!("{token}0")));
        assert!(!matches(token, ""));
        assert!(!matches("", ""), "an empty expected token matches nothing");
    }
}
