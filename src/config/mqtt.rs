//! The keys of an MQTT client connection, shared by the agent's `[mqtt]` and
//! the hub's `[broker]`: the broker url, client id, topic prefix, keep-alive,
//! user name and password, TLS files and reconnect back-off. Owns their rules
//! and wording; each reader here reads one key (or a pair that is checked
//! together) from the section's `Reader`, so each config decides the order
//! and which keys apply. Messages name the keys of the section they are in
//! (`mqtt.username`, `broker.username`).
//!
//! The password is a [`Secret`]: it is read from `password_file` (or the
//! environment) and never appears in a message or in `Debug` output; a url
//! with credentials in it is refused without being quoted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::pem;
use super::reader::{Checked, NONZERO, Problems, Reader, Reported, check_readable, quote, secs, show_duration};

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `mqtts://`
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The client's TLS files, each checked readable.
pub(super) struct TlsFiles {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

pub(super) const DEFAULT_TOPIC_PREFIX: &str = "fieldlink";
pub(super) const MQTT_PORT: u16 = 1883;
const MQTTS_PORT: u16 = 8883;
const CLIENT_ID_MAX_CHARS: usize = 128;

/// `url`, when present: `mqtt[s]://host[:port]`.
pub(super) fn url_opt(r: &mut Reader<'_>, p: &mut Problems) -> Checked<Option<BrokerUrl>> {
    let Some(url) = r.str_opt("url", p)? else { return Ok(None) };
    let section = r.place.label();
    parse_url(url, &section).map(Some).map_err(|why| r.problem("url", p, why))
}

/// `client_id`: 1..=128 characters.
pub(super) fn client_id(r: &mut Reader<'_>, default: String, p: &mut Problems) -> Checked<String> {
    let Some(id) = r.str_opt("client_id", p)? else { return Ok(default) };
    let chars = id.chars().count();
    if id.chars().any(char::is_control) {
        Err(r.problem("client_id", p, format!("{} holds a control character (NUL, newline, ...)", quote(id))))
    } else if (1..=CLIENT_ID_MAX_CHARS).contains(&chars) {
        if let Some(odd) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.:".contains(*c))) {
            // Legal MQTT, but brokers have mishandled such ids (rumqttd 0.20
            // died of a '/', issue #7), and a provisioned device's client id
            // is its device id.
            p.warn(format!(
                "warning: {} {} contains '{odd}'; use letters, digits and -_.: (some brokers mishandle others)",
                r.place.path("client_id"),
                quote(id)
            ));
        }
        Ok(id.to_string())
    } else {
        Err(r.problem(
            "client_id",
            p,
            format!("{} has {chars} characters (expected 1..={CLIENT_ID_MAX_CHARS})", quote(id)),
        ))
    }
}

/// `topic_prefix`: usable as the start of a topic and of a subscription.
pub(super) fn topic_prefix(r: &mut Reader<'_>, p: &mut Problems) -> Checked<String> {
    let prefix = r.str_opt("topic_prefix", p)?.unwrap_or(DEFAULT_TOPIC_PREFIX);
    match topic_prefix_problem(prefix) {
        None => Ok(prefix.to_string()),
        Some(why) => Err(r.problem("topic_prefix", p, why)),
    }
}

/// `keep_alive`: 1s..=65535s (MQTT's 16-bit seconds), default 30s.
pub(super) fn keep_alive(r: &mut Reader<'_>, p: &mut Problems) -> Checked<Duration> {
    r.duration_in("keep_alive", secs(30), secs(1)..=secs(65_535), p)
}

/// `username`: optional, not empty.
pub(super) fn username(r: &mut Reader<'_>, p: &mut Problems) -> Checked<Option<String>> {
    match r.str_opt("username", p)? {
        Some("") => Err(r.problem("username", p, "'' is empty (remove the key for no user name)".to_string())),
        name => Ok(name.map(str::to_string)),
    }
}

/// `password_file`, or the environment variable `env` (its name, and its
/// value as read by the caller) when no file is given. A password without
/// a user name is a problem: MQTT cannot send one.
pub(super) fn password(
    r: &mut Reader<'_>,
    username: &Checked<Option<String>>,
    env: (&str, Option<String>),
    p: &mut Problems,
) -> Checked<Option<Secret>> {
    let (env_name, env_password) = env;
    let password = match r.path_opt("password_file", p)? {
        Some(path) => {
            let password = read_password(&path).map_err(|why| r.problem("password_file", p, why))?;
            if let Some(mode) = pem::too_open(&path) {
                p.warn(pem::too_open_warning(&r.place.path("password_file"), &path, mode));
            }
            Some(password)
        }
        None => {
            if let (Ok(None), Some(_)) = (username, &env_password) {
                return Err(p.report(format!(
                    "env {env_name} is set but {} is not (mqtt sends no password without a user name)",
                    r.place.path("username")
                )));
            }
            return Ok(env_password.map(Secret));
        }
    };
    if let Ok(None) = username {
        let why =
            format!("is set but {} is not (mqtt sends no password without a user name)", r.place.path("username"));
        return Err(r.problem("password_file", p, why));
    }
    Ok(password)
}

/// `ca_file`, `cert_file` and `key_file`. With `url` known: mqtts:// needs
/// a CA, and mqtt:// takes none of them. A client certificate needs both
/// of its files.
pub(super) fn tls_files(r: &mut Reader<'_>, url: Option<&BrokerUrl>, p: &mut Problems) -> Checked<TlsFiles> {
    let ca_file = r.path_opt("ca_file", p).and_then(|f| check_readable(r, "ca_file", f, p));
    let cert_file = r.path_opt("cert_file", p).and_then(|f| check_readable(r, "cert_file", f, p));
    let key_file = r.path_opt("key_file", p).and_then(|f| check_readable(r, "key_file", f, p));
    let mut checked = Ok(());
    if let Some(url) = url {
        if url.tls {
            if matches!(ca_file, Ok(None)) {
                let why =
                    format!("mqtts:// needs a CA certificate to check the broker; set {}", r.place.path("ca_file"));
                checked = Err(r.problem("ca_file", p, why));
            }
        } else {
            for (key, file) in [("ca_file", &ca_file), ("cert_file", &cert_file), ("key_file", &key_file)] {
                if let Ok(Some(_)) = file {
                    let why =
                        format!("is set but {} is mqtt:// (no tls); use mqtts:// or remove it", r.place.path("url"));
                    checked = Err(r.problem(key, p, why));
                }
            }
        }
    }
    match (&cert_file, &key_file) {
        (Ok(Some(_)), Ok(None)) => {
            let why = format!("is set without {} (a client certificate needs both)", r.place.path("key_file"));
            checked = Err(r.problem("cert_file", p, why));
        }
        (Ok(None), Ok(Some(_))) => {
            let why = format!("is set without {} (a client certificate needs both)", r.place.path("cert_file"));
            checked = Err(r.problem("key_file", p, why));
        }
        _ => {}
    }
    checked?;
    let (ca_file, cert_file, key_file) = (ca_file?, cert_file?, key_file?);
    check_contents(r, (ca_file.as_deref(), cert_file.as_deref(), key_file.as_deref()), p)?;
    Ok(TlsFiles { ca_file, cert_file, key_file })
}

/// The TLS files parse as what they should hold (see `pem.rs`), and a
/// readable-by-others `key_file` is a warning.
fn check_contents(
    r: &mut Reader<'_>,
    (ca_file, cert_file, key_file): (Option<&Path>, Option<&Path>, Option<&Path>),
    p: &mut Problems,
) -> Checked<()> {
    let mut checked = Ok(());
    if let Some(ca) = ca_file
        && let Err(why) = pem::certificates(ca)
    {
        checked = Err(r.problem("ca_file", p, why));
    }
    let certs = cert_file.map(|c| pem::certificates(c).map_err(|why| r.problem("cert_file", p, why)));
    let key = key_file.map(|k| pem::private_key(k).map_err(|why| r.problem("key_file", p, why)));
    if let Some(k) = key_file
        && let Some(mode) = pem::too_open(k)
    {
        p.warn(pem::too_open_warning(&r.place.path("key_file"), k, mode));
    }
    match (certs, key) {
        (Some(Ok(certs)), Some(Ok(key))) => {
            if let Err(why) = pem::matching_pair(certs, key) {
                let cert = r.place.path("cert_file");
                let shown = key_file.map(|k| k.display().to_string()).unwrap_or_default();
                let cert_shown = cert_file.map(|c| c.display().to_string()).unwrap_or_default();
                let why = format!("'{shown}' does not belong to {cert} '{cert_shown}' ({why})");
                checked = Err(r.problem("key_file", p, why));
            }
        }
        (certs, key) => {
            if matches!(certs, Some(Err(_))) || matches!(key, Some(Err(_))) {
                checked = Err(Reported);
            }
        }
    }
    checked
}

/// `reconnect_min` and `reconnect_max`: more than zero, min <= max.
pub(super) fn reconnect(r: &mut Reader<'_>, default_max: Duration, p: &mut Problems) -> Checked<(Duration, Duration)> {
    let min = r.duration_in("reconnect_min", secs(1), NONZERO..=Duration::MAX, p);
    let max = r.duration_in("reconnect_max", default_max, NONZERO..=Duration::MAX, p);
    let (min, max) = (min?, max?);
    if min > max {
        let why =
            format!("'{}' is more than {} '{}'", show_duration(min), r.place.path("reconnect_max"), show_duration(max));
        return Err(r.problem("reconnect_min", p, why));
    }
    Ok((min, max))
}

fn topic_prefix_problem(prefix: &str) -> Option<String> {
    let why = if prefix.is_empty() {
        "is empty"
    } else if prefix.contains(['+', '#']) {
        "contains an mqtt wildcard ('+' or '#')"
    } else if prefix.starts_with('/') || prefix.ends_with('/') {
        "starts or ends with '/'"
    } else if prefix.starts_with('$') {
        "starts with '$' (reserved for broker topics)"
    } else if prefix.contains('\0') {
        "contains a nul character"
    } else {
        return None;
    };
    Some(format!("{} {why} (expected e.g. 'fieldlink' or 'acme/site1')", quote(prefix)))
}

/// A broker url given on a command line (`fieldlink fleet-sim --broker`):
/// `mqtt[s]://host[:port]`, or a bare `host:port` taken as `mqtt://`.
pub fn parse_broker_arg(url: &str) -> Result<BrokerUrl, String> {
    if url.contains("://") {
        parse_url(url, "the command line")
    } else {
        parse_url(&format!("mqtt://{url}"), "the command line")
    }
}

/// `mqtt[s]://host[:port]`. Returns the message tail on failure; `section`
/// names the keys to use instead of credentials. The url is never quoted
/// when it holds credentials.
pub(super) fn parse_url(url: &str, section: &str) -> Result<BrokerUrl, String> {
    const EXPECTED: &str = "expected mqtt://host[:port] or mqtts://host[:port]";
    let Some((scheme, rest)) = url.split_once("://") else {
        if url.contains('@') {
            return Err(format!("has credentials in it or is not a broker url ({EXPECTED})"));
        }
        return Err(format!("{} is not a broker url ({EXPECTED})", quote(url)));
    };
    if rest.contains('@') {
        return Err(format!("has credentials in it; use {section}.username and {section}.password_file instead"));
    }
    let (tls, default_port) = match scheme {
        "mqtt" => (false, MQTT_PORT),
        "mqtts" => (true, MQTTS_PORT),
        _ => {
            return Err(format!("{} has scheme '{}' ({EXPECTED})", quote(url), scheme.escape_debug()));
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(format!("{} has a path or query ({EXPECTED})", quote(url)));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err(format!("{} has an unclosed '[' ({EXPECTED})", quote(url)));
        };
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("{} has junk after ']' ({EXPECTED})", quote(url))),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err(format!(
                    "{} has an ipv6 address without brackets (expected e.g. mqtt://[::1]:1883)",
                    quote(url)
                ));
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{} has no host ({EXPECTED})", quote(url)));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{} has a space or control character in its host ({EXPECTED})", quote(url)));
    }
    let port = match port {
        None => default_port,
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => {
                return Err(format!("{} has port '{}' (expected 1..=65535)", quote(url), port.escape_debug()));
            }
        },
    };
    Ok(BrokerUrl { tls, host: host.to_string(), port })
}

/// Reads the password file. The message on failure names the file, never
/// its content.
fn read_password(path: &Path) -> Result<Secret, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read '{}': {}", path.display(), super::reader::describe_io(&e)))?;
    let Ok(text) = String::from_utf8(bytes) else {
        return Err(format!("'{}' is not utf-8 text", path.display()));
    };
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(format!("'{}' is empty (expected the password on its first line)", path.display()));
    }
    Ok(Secret(password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_argument_may_leave_out_the_scheme() {
        let b = parse_broker_arg("127.0.0.1:1884").expect("host:port");
        assert_eq!((b.tls, b.host.as_str(), b.port), (false, "127.0.0.1", 1884));
        let b = parse_broker_arg("mqtts://hub.example").expect("url");
        assert_eq!((b.tls, b.host.as_str(), b.port), (true, "hub.example", MQTTS_PORT));
        assert!(parse_broker_arg("mqtt://u:pw@hub.example").is_err(), "no credentials in the url");
    }
}
