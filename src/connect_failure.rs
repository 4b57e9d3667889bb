//! Why an MQTT connect failed, in words a user understands, for the agent's
//! Link and the hub's collector: the broker refused the login, TLS does not
//! trust the broker's certificate, the broker refused our client
//! certificate, or the network failed. Owns classifying a rumqttc
//! `ConnectionError` as a refusal or a network failure, the one line that
//! explains it, and the level that line is logged at (every refusal at warn,
//! once per attempt; a network failure at warn the first time and at info
//! after that). Sans-IO apart from the `tracing` call: it never connects,
//! sleeps or reads a file.
//!
//! TLS handshake failures do not arrive as rumqttc's own TLS variants:
//! tokio-rustls wraps the `rustls::Error` in an `io::Error`
//! (`InvalidData`), and rumqttc passes it on as `TlsError::Io` during the
//! handshake (`rumqttc-0.25.1/src/tls.rs:177`) or as a plain
//! `ConnectionError::Io` when the broker's alert arrives while the CONNACK
//! is read (TLS 1.3 reports a refused client certificate only then). Both
//! are unwrapped here.

use std::path::Path;

use rumqttc::{ConnectReturnCode, ConnectionError, StateError, TlsError};
use rustls::{AlertDescription, CertificateError};

/// What the messages need to know about the client that failed.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// The config section the keys are in: `mqtt` (agent) or `broker` (hub).
    pub section: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    /// `None` when the caller does not know the path; the key is named then.
    pub ca_file: Option<&'a Path>,
    pub cert_file: Option<&'a Path>,
}

/// The broker, or TLS, answered and said no: retrying at once will not
/// help. Anything else is the network (refused or reset TCP, a time-out, an
/// unanswered ping) and may heal.
pub fn is_refusal(e: &ConnectionError) -> bool {
    match e {
        ConnectionError::ConnectionRefused(_) | ConnectionError::NotConnAck(_) | ConnectionError::RequestsDone => true,
        ConnectionError::Tls(TlsError::Io(_)) => rustls_error(e).is_some(),
        ConnectionError::Tls(_) => true,
        _ => rustls_error(e).is_some(),
    }
}

/// The error in one line: for a refusal, what the broker or TLS said and what
/// to check; for a network failure, rumqttc's own text.
pub fn explain(e: &ConnectionError, peer: &Peer<'_>) -> String {
    if let Some(tls) = rustls_error(e) {
        return explain_tls(tls, peer);
    }
    let key = |k: &str| format!("{}.{k}", peer.section);
    match e {
        ConnectionError::ConnectionRefused(code) => explain_connack(*code, peer),
        ConnectionError::Tls(TlsError::NoValidCertInChain) => {
            format!("TLS: {} holds no usable certificate", file(peer.ca_file, &key("ca_file")))
        }
        ConnectionError::Tls(TlsError::NoValidClientCertInChain) => {
            format!("TLS: {} holds no usable certificate", file(peer.cert_file, &key("cert_file")))
        }
        ConnectionError::Tls(TlsError::NoValidKeyInChain) => {
            format!("TLS: {} holds no usable private key", key("key_file"))
        }
        ConnectionError::Tls(TlsError::DNSName(_) | TlsError::Addr(_)) => {
            format!("TLS: host '{}' is not a name or address TLS can check a certificate against", peer.host)
        }
        ConnectionError::Tls(other) => format!("TLS: {other}"),
        ConnectionError::NotConnAck(packet) => {
            format!(
                "the broker at {}:{} answered the connect with {packet:?} instead of a CONNACK",
                peer.host, peer.port
            )
        }
        other => other.to_string(),
    }
}

/// Logs a failed connect attempt: a refusal at warn every time (the caller's
/// back-off paces the attempts, so that is once per back-off step), a
/// network failure at warn on the first of a run of failures (`attempt` 1)
/// and at info after that.
pub fn log(e: &ConnectionError, peer: &Peer<'_>, attempt: u64) {
    log_line(is_refusal(e), &explain(e, peer), peer, attempt);
}

/// [`log`] for a client that has only its `MqttOptions` at hand (the hub's
/// collector): the files are named by their key, not their path.
pub fn log_for_options(e: &ConnectionError, options: &rumqttc::MqttOptions, section: &str, attempt: u64) {
    let (host, port) = options.broker_address();
    let client_id = options.client_id();
    let login = options.credentials();
    let peer = Peer {
        section,
        host: &host,
        port,
        client_id: &client_id,
        username: login.as_ref().map(|l| l.username.as_str()),
        ca_file: None,
        cert_file: None,
    };
    log(e, &peer, attempt);
}

/// [`log`] for a caller that explained the error already.
pub fn log_line(refusal: bool, reason: &str, peer: &Peer<'_>, attempt: u64) {
    if refusal {
        tracing::warn!(attempt, "mqtt: {reason}; retrying with back-off");
    } else if attempt <= 1 {
        tracing::warn!("mqtt: cannot connect to {}:{}: {reason}; retrying with back-off", peer.host, peer.port);
    } else {
        tracing::info!(attempt, "mqtt: still cannot connect to {}:{}: {reason}", peer.host, peer.port);
    }
}

fn explain_connack(code: ConnectReturnCode, peer: &Peer<'_>) -> String {
    let creds = format!("{0}.username and {0}.password_file", peer.section);
    match (code, peer.username) {
        (ConnectReturnCode::BadUserNamePassword, Some(user)) => {
            format!("the broker refused the login for user '{user}' (bad username or password)")
        }
        (ConnectReturnCode::NotAuthorized, Some(user)) => {
            format!(
                "the broker refused the login for user '{user}' (not authorized: wrong password, or the user may not connect)"
            )
        }
        (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized, None) => {
            format!("the broker refused a login without a user name ({code:?}); set {creds}")
        }
        (ConnectReturnCode::BadClientId, _) => {
            format!("the broker refused client id '{}' (identifier rejected)", peer.client_id)
        }
        (ConnectReturnCode::ServiceUnavailable, _) => "the broker refused the connection (service unavailable)".into(),
        (ConnectReturnCode::RefusedProtocolVersion, _) => "the broker does not accept MQTT 3.1.1".into(),
        (ConnectReturnCode::Success, _) => "the broker answered the connect with success and then failed".into(),
    }
}

fn explain_tls(e: &rustls::Error, peer: &Peer<'_>) -> String {
    let ca = file(peer.ca_file, &format!("{}.ca_file", peer.section));
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                format!("TLS: the broker's certificate is not trusted by {ca} (UnknownIssuer)")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "TLS: the broker's certificate is not valid for host '{}' (NotValidForName); \
                 use a host name the certificate lists in {}.url",
                peer.host, peer.section
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "TLS: the broker's certificate has expired (or this machine's clock is wrong)".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "TLS: the broker's certificate is not valid yet (or this machine's clock is wrong)".into()
            }
            other => format!("TLS: the broker's certificate was rejected ({other:?}); check {ca}"),
        },
        rustls::Error::AlertReceived(alert) => {
            let cert = file(peer.cert_file, &format!("{}.cert_file", peer.section));
            match alert {
                AlertDescription::CertificateRequired => format!(
                    "TLS: the broker requires a client certificate; set {0}.cert_file and {0}.key_file",
                    peer.section
                ),
                AlertDescription::HandshakeFailure if peer.cert_file.is_none() => format!(
                    "TLS: the broker refused the handshake (HandshakeFailure); it may require a client \
                     certificate ({0}.cert_file and {0}.key_file)",
                    peer.section
                ),
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::DecryptError
                | AlertDescription::AccessDenied => {
                    format!("TLS: the broker refused our client certificate {cert} ({alert:?})")
                }
                other => format!("TLS: the broker ended the handshake ({other:?})"),
            }
        }
        other => format!("TLS: {other}"),
    }
}

/// `mqtt.ca_file '/etc/ca.pem'`, or just the key when the path is unknown.
fn file(path: Option<&Path>, key: &str) -> String {
    match path {
        Some(p) => format!("{key} '{}'", p.display()),
        None => key.to_string(),
    }
}

/// The `rustls::Error` inside an I/O error, wherever rumqttc put it.
fn rustls_error(e: &ConnectionError) -> Option<&rustls::Error> {
    let io = match e {
        ConnectionError::Tls(TlsError::Io(io)) | ConnectionError::Io(io) => io,
        ConnectionError::MqttState(StateError::Io(io)) => io,
        ConnectionError::Tls(TlsError::TLS(tls)) => return Some(tls),
        _ => return None,
    };
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn peer() -> Peer<'static> {
        Peer {
            section: "mqtt",
            host: "broker.example",
            port: 8883,
            client_id: "pi-1",
            username: Some("pi"),
            ca_file: Some(Path::new("/etc/fieldlink/ca.pem")),
            cert_file: None,
        }
    }

    fn wrapped(tls: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, tls)
    }

    #[test]
    fn a_wrong_password_names_the_user_and_says_so() {
        let e = ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword);
        assert!(is_refusal(&e));
        assert_eq!(explain(&e, &peer()), "the broker refused the login for user 'pi' (bad username or password)");
        let e = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        assert!(explain(&e, &peer()).starts_with("the broker refused the login for user 'pi' (not authorized"));
    }

    #[test]
    fn a_refused_anonymous_login_says_which_keys_to_set() {
        let e = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        let p = Peer { section: "broker", username: None, ..peer() };
        assert_eq!(
            explain(&e, &p),
            "the broker refused a login without a user name (NotAuthorized); set broker.username and broker.password_file"
        );
    }

    #[test]
    fn an_untrusted_broker_certificate_names_the_ca_file_during_the_handshake() {
        let e = ConnectionError::Tls(TlsError::Io(wrapped(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ))));
        assert!(is_refusal(&e), "a TLS refusal is not a network failure: no probing");
        assert_eq!(
            explain(&e, &peer()),
            "TLS: the broker's certificate is not trusted by mqtt.ca_file '/etc/fieldlink/ca.pem' (UnknownIssuer)"
        );
    }

    #[test]
    fn a_certificate_for_another_host_names_the_host() {
        let e = ConnectionError::Tls(TlsError::Io(wrapped(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        ))));
        let text = explain(&e, &peer());
        assert!(text.starts_with("TLS: the broker's certificate is not valid for host 'broker.example'"), "{text}");
    }

    #[test]
    fn a_refused_client_certificate_after_the_handshake_is_a_refusal_naming_the_file() {
        // TLS 1.3: the alert arrives while the CONNACK is read.
        let e = ConnectionError::Io(wrapped(rustls::Error::AlertReceived(AlertDescription::UnknownCA)));
        let p = Peer { cert_file: Some(Path::new("/etc/fieldlink/pi.crt")), ..peer() };
        assert!(is_refusal(&e));
        assert_eq!(
            explain(&e, &p),
            "TLS: the broker refused our client certificate mqtt.cert_file '/etc/fieldlink/pi.crt' (UnknownCA)"
        );
        let e = ConnectionError::Io(wrapped(rustls::Error::AlertReceived(AlertDescription::CertificateRequired)));
        assert!(explain(&e, &peer()).contains("requires a client certificate"));
    }

    #[test]
    fn a_network_failure_is_not_a_refusal_and_keeps_its_text() {
        let e = ConnectionError::Io(io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused"));
        assert!(!is_refusal(&e));
        assert_eq!(explain(&e, &peer()), "I/O: connection refused");
        assert!(!is_refusal(&ConnectionError::Tls(TlsError::Io(io::Error::other("reset")))));
        assert!(!is_refusal(&ConnectionError::NetworkTimeout));
    }
}
