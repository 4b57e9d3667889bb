//! What the TLS files and the password file must hold, checked the way the
//! MQTT client will use them: `ca_file` and `cert_file` at least one PEM
//! certificate that parses, `key_file` a PEM private key the TLS library
//! can sign with and that belongs to `cert_file`; and whether a secret file
//! is readable by group or others. Owns only those checks and their wording
//! (one line quoting the path and saying what was expected). It reads the
//! files it is given and nothing else; it must not open a connection.
//!
//! The checks mirror rumqttc's (`rumqttc-0.25.1/src/tls.rs:77-121`): its
//! root store keeps only certificates that parse and fails on none, and the
//! client key goes through `with_client_auth_cert`, which refuses a key
//! that does not match the certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const CERT_HINT: &str = "expected at least one PEM '-----BEGIN CERTIFICATE-----' block";
const KEY_HINT: &str = "expected a PEM 'PRIVATE KEY', 'RSA PRIVATE KEY' or 'EC PRIVATE KEY' block";

/// The certificates in a PEM file, each a parsable X.509 certificate.
pub(super) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("'{shown}' is not valid PEM ({}; {CERT_HINT})", describe_pem(&e)))?;
    if certs.is_empty() {
        return Err(format!("'{shown}' holds no certificate ({CERT_HINT})"));
    }
    let mut roots = rustls::RootCertStore::empty();
    let (_, unparsable) = roots.add_parsable_certificates(certs.iter().cloned());
    if unparsable > 0 {
        return Err(format!(
            "'{shown}': {unparsable} of its {} certificate(s) are not valid X.509 ({CERT_HINT})",
            certs.len()
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file, one the TLS library can sign with.
pub(super) fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let shown = path.display();
    let bytes = read(path)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => format!("'{shown}' holds no private key ({KEY_HINT})"),
        e => format!("'{shown}' is not valid PEM ({}; {KEY_HINT})", describe_pem(&e)),
    })?;
    provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("'{shown}' holds a private key that cannot be used for TLS ({e})"))?;
    Ok(key)
}

/// Whether `key` belongs to the first certificate of `certs`; the message
/// tail on failure.
pub(super) fn matching_pair(certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<(), String> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore::empty());
    builder.with_client_auth_cert(certs, key).map(|_| ()).map_err(|e| e.to_string())
}

/// `Some(mode)` when a secret file is readable or writable by group or
/// others (`mode & 0o077 != 0`).
pub(super) fn too_open(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// The warning for a secret file others can read: the file, its mode and the
/// fix.
pub(super) fn too_open_warning(key: &str, path: &Path, mode: u32) -> String {
    format!(
        "warning: {key} '{0}' is readable by group or others (mode {mode:04o}); \
         run chmod 600 '{0}' (and chown it to the user fieldlink runs as)",
        path.display()
    )
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read '{}': {}", path.display(), super::reader::describe_io(&e)))
}

fn describe_pem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line".to_string(),
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed".to_string(),
        pem::Error::Base64Decode(_) => "bad base64 inside a section".to_string(),
        other => other.to_string(),
    }
}
