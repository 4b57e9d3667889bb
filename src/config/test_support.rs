//! Helpers shared by the agent's and the hub's config tests: turning a parse
//! result into its problems, and temp files for password and TLS keys. Test
//! code only.

use std::fmt::Debug;
use std::io::Write as _;
use std::path::Path;

use super::ConfigError;

/// The problems of an invalid config; panics if it parsed.
pub fn problems<T: Debug>(result: Result<T, ConfigError>) -> Vec<String> {
    match result {
        Err(ConfigError::Invalid(problems)) => problems,
        Err(other) => panic!("expected problems, got {other:?}"),
        Ok(config) => panic!("expected problems, got {config:?}"),
    }
}

/// The one problem of an invalid config.
pub fn one_problem<T: Debug>(result: Result<T, ConfigError>) -> String {
    let mut found = problems(result);
    assert_eq!(found.len(), 1, "expected one problem, got {found:#?}");
    found.remove(0)
}

pub fn temp_file(content: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(content).expect("write temp file");
    file
}

/// A temp copy (mode 0600) of a test TLS file in `tests/fixtures/tls/`
/// (`ca.pem`, `client.pem`, `client.key`, `server.key`, ...).
pub fn tls_file(name: &str) -> tempfile::NamedTempFile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name);
    temp_file(&std::fs::read(&path).expect("tls fixture"))
}

/// A path as a TOML literal string.
pub fn toml_path(path: &Path) -> String {
    format!("'{}'", path.display())
}
