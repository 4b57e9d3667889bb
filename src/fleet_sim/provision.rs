//! Credentials for the simulated devices (`fleet-sim --provision <hub.toml>
//! --password-file F`): one password shared by the simulated devices, kept
//! in `F` (created with a random password, mode 0600, when missing), and
//! each device added to the hub's `<state_dir>/mosquitto.passwd` through the
//! same code as `fieldlink hub device add` ([`Provisioning::ensure`]), with
//! one reload of the broker. It never touches the database or the broker
//! itself.

use std::path::{Path, PathBuf};

use crate::config::{HubConfig, Secret};
use crate::hub::devices::{DevicesError, Provisioning};
use crate::hub::token::{self, TokenError};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    Config(String),
    #[error("cannot {what} the password file '{path}': {source}")]
    PasswordFile { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the password file '{0}' is empty")]
    EmptyPassword(PathBuf),
    #[error(
        "{0} (a device of that id has another password: pick another --id-prefix, or remove it with `fieldlink hub \
         device remove`)"
    )]
    Devices(#[from] DevicesError),
    #[error("cannot create the password file: {0}")]
    Create(#[from] TokenError),
}

/// Reads the password from `path` (its first line).
pub fn read_password(path: &Path) -> Result<Secret, ProvisionError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProvisionError::PasswordFile {
        what: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(ProvisionError::EmptyPassword(path.to_path_buf()));
    }
    Ok(Secret(line.to_string()))
}

/// The password in `path`, or a new random one written there when the file
/// does not exist: created as the hub creates its own secrets (0600, synced,
/// linked into place; [`token::load_or_create`]).
pub fn password_or_create(path: &Path) -> Result<Secret, ProvisionError> {
    if path.exists() {
        return read_password(path);
    }
    let (password, _created) = token::load_or_create(path)?;
    Ok(Secret(password))
}

/// Provisions `ids` with `password` on the hub configured by `hub_config`;
/// returns one line saying what was done.
pub fn provision(hub_config: &Path, ids: &[String], password: &Secret) -> Result<String, ProvisionError> {
    let cfg = HubConfig::load(hub_config).map_err(|e| ProvisionError::Config(e.to_string()))?;
    let p = Provisioning::from_config(&cfg);
    let (added, reload) = p.ensure(ids, &password.0)?;
    Ok(format!("{added} simulated device(s) added to {}; {}", p.passwd_path().display(), reload.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_password_file_is_created_private_and_then_reused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sim.pass");
        let first = password_or_create(&path).expect("created");
        assert_eq!(std::fs::metadata(&path).expect("exists").permissions().mode() & 0o777, 0o600);
        assert_eq!(password_or_create(&path).expect("read back"), first);
        std::fs::write(&path, "\n").expect("write");
        assert!(matches!(read_password(&path), Err(ProvisionError::EmptyPassword(_))));
    }
}
