//! The hub's config file (`config/hub.toml`): typed structs, loading and
//! validation, read with the same key reader as the agent's config, so the
//! same rules hold: unknown keys are errors, every problem is reported at
//! once, each message names the key and quotes the bad value. It must not
//! start anything, open sockets, or touch `state_dir`.
//!
//! The files it reads besides the config are `broker.password_file` (the
//! secret, never echoed) and the TLS files (opened to check they are
//! readable), and only for an external broker. A password in
//! `database.url` is allowed (sqlx takes it there) but never printed:
//! [`DatabaseUrl`] hides it in `Debug`, `Display` and every message.
//!
//! The defaults make an empty file a working hub: embedded broker on
//! 127.0.0.1:1883, SQLite at `<state_dir>/hub.db`, dashboard on
//! 127.0.0.1:8080 with its token in `<state_dir>/hub.token`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::Table;

use super::ConfigError;
use super::mqtt::{self, BrokerUrl, Secret};
use super::pem;
use super::reader::{Checked, NAME_HINT, Place, Problems, Reader, is_name, millis, parse_with, quote, read_file, secs};

/// The environment variable holding the password for an external broker
/// when `broker.password_file` is not set.
pub const PASSWORD_ENV: &str = "FIELDLINK_HUB_MQTT_PASSWORD";

/// A validated hub config.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The SQLite file and the token file, unless they are set elsewhere.
    /// Relative paths are relative to the working directory.
    pub state_dir: PathBuf,
    /// Topics are `<topic_prefix>/<device>/...`, as in the agents' configs.
    pub topic_prefix: String,
    pub broker: BrokerConfig,
    pub database: DatabaseConfig,
    pub web: WebConfig,
    /// Valid but unwise settings, one line each (see `AgentConfig::warnings`).
    pub warnings: Vec<String>,
}

/// Which broker the hub uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerMode {
    /// `embedded = true`: run a broker in-process, listening here (port 0:
    /// any free port).
    Embedded { listen: SocketAddr },
    /// `embedded = false`: mosquitto / EMQX at `url`.
    External { url: BrokerUrl },
}

/// `[broker]`: the broker, and the hub's own MQTT client of it.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub mode: BrokerMode,
    /// The hub's client id; hubs sharing a broker need distinct ones.
    pub client_id: String,
    /// `[A-Za-z0-9_-]{1,64}`: subscribe through `$share/<group>/...` so
    /// that hubs in one group split the messages between them.
    pub shared_group: Option<String>,
    /// External broker only; `None` with the embedded one.
    pub username: Option<String>,
    /// From `password_file` or env `FIELDLINK_HUB_MQTT_PASSWORD`; external
    /// broker only (the environment is ignored with the embedded one).
    pub password: Option<Secret>,
    /// TLS (mqtts:// only): the CA that signed the broker's certificate.
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS: the client certificate and its key (both or neither).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub keep_alive: Duration,
    /// Reconnect back-off: doubles with jitter from `reconnect_min` up to
    /// `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// A mosquitto managed by the hub (`fieldlink hub device ...`): the pid
    /// file it writes (`pid_file` in mosquitto.conf); a device change sends
    /// SIGHUP to that pid so mosquitto rereads its password and ACL files.
    pub mosquitto_pid_file: Option<PathBuf>,
    /// Embedded broker only: its `mqtts` listener (`tls_listen`,
    /// `tls_cert_file`, `tls_key_file`, all three or none).
    pub tls_listener: Option<TlsListen>,
}

/// The embedded broker's `mqtts` listener; the PEM files were parsed and
/// the key matches the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListen {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `[database]`: where messages are stored, and how they are written.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: DatabaseUrl,
    /// Heartbeats older than this are pruned.
    pub heartbeat_retention: Duration,
    /// The most messages written (and then acknowledged) in one transaction.
    pub batch_max: usize,
    /// How long the collector waits for more messages to fill a batch
    /// before it commits what it has.
    pub batch_wait: Duration,
}

/// `[web]`: the dashboard and the REST API.
#[derive(Debug, Clone)]
pub struct WebConfig {
    pub listen: SocketAddr,
    /// Holds the API token; created (mode 0600) on first start.
    pub token_file: PathBuf,
    /// The `expires_at` of a published command is now + this.
    pub command_ttl: Duration,
    /// How long `POST .../relays/{r}` waits for the agent's confirmation
    /// before it answers `202 pending`.
    pub command_wait: Duration,
    /// Where `GET /metrics` is also served, without authentication (for a
    /// Prometheus on the same host or a trusted network); `None`: only on
    /// `listen`, with the API token.
    pub metrics_listen: Option<SocketAddr>,
}

/// The database's kind, from the url's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    /// `sqlite://path`
    Sqlite,
    /// `mysql://` (MySQL and MariaDB)
    MySql,
    /// `postgres://` or `postgresql://`
    Postgres,
}

/// `database.url`, checked: one of sqlx's sqlite://, mysql://, postgres://
/// or postgresql:// urls. It may hold a password, so `Debug` and `Display`
/// show it with the password replaced by `***`; only [`DatabaseUrl::expose`]
/// gives the whole text, for sqlx.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    kind: DatabaseKind,
    url: String,
}

/// Why a text is not a [`DatabaseUrl`]: a lowercase message that quotes the
/// url with its password hidden.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DatabaseUrlError(String);

// ---------------------------------------------------------------------------
// Defaults and limits (DESIGN: Hub).

const DEFAULT_STATE_DIR: &str = "state";
const DEFAULT_CLIENT_ID: &str = "fieldlink-hub";
const DEFAULT_BROKER_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), mqtt::MQTT_PORT);
const DEFAULT_WEB_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
const DATABASE_FILE: &str = "hub.db";
const TOKEN_FILE: &str = "hub.token";
const DAY: u64 = 86_400;
const BATCH_MAX_LIMIT: i64 = 10_000;
/// The `[broker]` keys that only an external broker takes.
const EXTERNAL_ONLY: [&str; 5] = ["username", "password_file", "ca_file", "cert_file", "key_file"];
/// The `[broker]` keys that only the embedded broker takes.
const EMBEDDED_TLS: [&str; 3] = ["tls_listen", "tls_cert_file", "tls_key_file"];

impl HubConfig {
    /// Reads and validates the config file at `path`. Relative paths inside it
    /// are relative to the working directory, not to the file.
    pub fn load(path: &Path) -> Result<HubConfig, ConfigError> {
        HubConfig::parse(&read_file(path)?)
    }

    /// Validates config text; the empty text gives every default. For an
    /// external broker, reads `broker.password_file` (or the
    /// `FIELDLINK_HUB_MQTT_PASSWORD` environment variable when no file is
    /// given) and checks that the TLS files are readable; starts nothing.
    pub fn parse(text: &str) -> Result<HubConfig, ConfigError> {
        let env_password = std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty());
        parse_with_env(text, env_password)
    }
}

impl BrokerConfig {
    /// The embedded broker's address, or `None` for an external broker.
    pub fn embedded(&self) -> Option<SocketAddr> {
        match &self.mode {
            BrokerMode::Embedded { listen } => Some(*listen),
            BrokerMode::External { .. } => None,
        }
    }

    /// Where the hub's own client connects: the external broker's url, or
    /// the embedded broker's `listen` address, with an unspecified address
    /// (`0.0.0.0`, `::`) replaced by loopback. With `listen` port 0, the
    /// caller substitutes the port the broker bound.
    pub fn client_url(&self) -> BrokerUrl {
        match &self.mode {
            BrokerMode::External { url } => url.clone(),
            BrokerMode::Embedded { listen } => {
                let ip = match listen.ip() {
                    IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                    ip => ip,
                };
                BrokerUrl { tls: false, host: ip.to_string(), port: listen.port() }
            }
        }
    }
}

impl DatabaseUrl {
    /// The url of the SQLite file at `path`.
    pub fn sqlite(path: &Path) -> DatabaseUrl {
        DatabaseUrl { kind: DatabaseKind::Sqlite, url: format!("sqlite://{}", path.display()) }
    }

    pub fn kind(&self) -> DatabaseKind {
        self.kind
    }

    /// The whole url, password included, for sqlx. Never log it; log the
    /// url itself (`Display`), which hides the password.
    pub fn expose(&self) -> &str {
        &self.url
    }

    /// SQLite: the database file (without `?options`), e.g. to create its
    /// directory; `None` for the other kinds.
    pub fn sqlite_path(&self) -> Option<&Path> {
        let rest = self.url.strip_prefix("sqlite://").filter(|_| self.kind == DatabaseKind::Sqlite)?;
        Some(Path::new(rest.split('?').next().unwrap_or(rest)))
    }
}

impl FromStr for DatabaseUrl {
    type Err = DatabaseUrlError;

    fn from_str(url: &str) -> Result<DatabaseUrl, DatabaseUrlError> {
        const EXPECTED: &str =
            "expected sqlite://path, mysql://user:password@host/db or postgres://user:password@host/db";
        let shown = quote(&redact(url));
        let fail = |why: String| Err(DatabaseUrlError(why));
        if url.is_empty() {
            return fail(format!("'' is empty ({EXPECTED})"));
        }
        let Some((scheme, rest)) = url.split_once("://").filter(|(scheme, _)| !scheme.contains('@')) else {
            return fail(format!("{shown} is not a database url ({EXPECTED})"));
        };
        let kind = match scheme {
            "sqlite" => DatabaseKind::Sqlite,
            "mysql" => DatabaseKind::MySql,
            "postgres" | "postgresql" => DatabaseKind::Postgres,
            _ => {
                return fail(format!(
                    "{shown} has scheme '{}' (expected sqlite://, mysql://, postgres:// or postgresql://)",
                    scheme.escape_debug()
                ));
            }
        };
        if kind == DatabaseKind::Sqlite {
            if rest.split('?').next().unwrap_or_default().is_empty() {
                return fail(format!("{shown} has no file path (expected e.g. sqlite://state/hub.db)"));
            }
        } else {
            let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, after)| after);
            let path = host_and_path.split('?').next().unwrap_or_default();
            if path.split_once('/').is_none_or(|(_, database)| database.is_empty()) {
                return fail(format!(
                    "{shown} has no database name (expected e.g. {scheme}://user:password@host/fieldlink)"
                ));
            }
        }
        Ok(DatabaseUrl { kind, url: url.to_string() })
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DatabaseUrl").field(&redact(&self.url)).finish()
    }
}

/// A url with its password hidden: `mysql://user:***@host/db`. Anything
/// that might be a password is hidden: the whole user part when it looks
/// odd, and a query that mentions a password.
fn redact(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) if !scheme.contains('@') => (Some(scheme), rest),
        _ => (None, url),
    };
    let (user, after) = match rest.rsplit_once('@') {
        None => (String::new(), rest),
        Some((userinfo, after)) => {
            let user = match userinfo.split_once(':') {
                _ if scheme.is_none() || userinfo.contains(['/', '?', '=', '#']) => "***@".to_string(),
                Some((name, _)) => format!("{name}:***@"),
                None => format!("{userinfo}@"),
            };
            (user, after)
        }
    };
    let after = match after.split_once('?') {
        Some((path, query)) if query.to_ascii_lowercase().contains("pass") => format!("{path}?***"),
        _ => after.to_string(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{user}{after}"),
        None => format!("{user}{after}"),
    }
}

/// [`HubConfig::parse`] with the environment's password passed in, so tests
/// need not mutate the process environment.
fn parse_with_env(text: &str, env_password: Option<String>) -> Result<HubConfig, ConfigError> {
    parse_with(text, |root, p| hub_config(root, env_password, p))
}

// ---------------------------------------------------------------------------
// Sections.

fn hub_config(root: &Table, env_password: Option<String>, p: &mut Problems) -> Checked<HubConfig> {
    let mut r = Reader::new(root, Place::Root);
    let state_dir = r.path_or("state_dir", PathBuf::from(DEFAULT_STATE_DIR), "a directory path", p);
    let topic_prefix = mqtt::topic_prefix(&mut r, p);
    // A bad state_dir has been reported already; the defaults under it are
    // only needed when the whole config is valid.
    let dir = state_dir.as_ref().map_or(Path::new(DEFAULT_STATE_DIR), PathBuf::as_path);
    let broker = r.section("broker", p).and_then(|t| broker_config(&t, env_password, p));
    let database = r.section("database", p).and_then(|t| database_config(&t, dir, p));
    let web = r.section("web", p).and_then(|t| web_config(&t, dir, p));
    r.finish(p);
    Ok(HubConfig {
        state_dir: state_dir?,
        topic_prefix: topic_prefix?,
        broker: broker?,
        database: database?,
        web: web?,
        warnings: p.warnings(),
    })
}

fn broker_config(t: &Table, env_password: Option<String>, p: &mut Problems) -> Checked<BrokerConfig> {
    let mut r = Reader::new(t, Place::Section("broker"));
    let embedded = r.bool_or("embedded", true, p);
    let mode = match embedded {
        Ok(true) => {
            let listen = r.socket_addr_or("listen", DEFAULT_BROKER_LISTEN, p);
            r.refuse("url", "is set but broker.embedded is true (set embedded = false to use an external broker)", p);
            listen.map(|listen| BrokerMode::Embedded { listen })
        }
        Ok(false) => {
            r.refuse("listen", "is set but broker.embedded is false (the hub runs no broker; remove it)", p);
            match mqtt::url_opt(&mut r, p) {
                Ok(Some(url)) => Ok(BrokerMode::External { url }),
                Ok(None) => Err(r.missing("url", "mqtt://host[:port] or mqtts://host[:port] when embedded = false", p)),
                Err(e) => Err(e),
            }
        }
        // Which keys apply is unknown; take them as read, the problem with
        // `embedded` has been reported.
        Err(e) => {
            for key in ["listen", "url"].into_iter().chain(EXTERNAL_ONLY).chain(EMBEDDED_TLS) {
                r.value(key);
            }
            Err(e)
        }
    };
    let client_id = mqtt::client_id(&mut r, DEFAULT_CLIENT_ID.to_string(), p);
    let shared_group = match r.str_opt("shared_group", p) {
        Ok(Some(group)) if is_name(group) && matches!(embedded, Ok(true)) => {
            // The embedded broker is built without rmqtt's shared
            // subscriptions: `$share/...` would silently match nothing
            // (see broker/mod.rs).
            Err(r.problem(
                "shared_group",
                p,
                format!(
                    "{} needs an external broker (embedded = false, e.g. mosquitto): the embedded broker does not serve shared subscriptions",
                    quote(group)
                ),
            ))
        }
        Ok(Some(group)) if is_name(group) => Ok(Some(group.to_string())),
        Ok(Some(group)) => Err(r.problem(
            "shared_group",
            p,
            format!("{} is not a valid group name (expected {NAME_HINT})", quote(group)),
        )),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    let no_tls = || mqtt::TlsFiles { ca_file: None, cert_file: None, key_file: None };
    let (username, password, tls) = match embedded {
        Ok(false) => {
            let url = match &mode {
                Ok(BrokerMode::External { url }) => Some(url),
                _ => None,
            };
            let username = mqtt::username(&mut r, p);
            let password = mqtt::password(&mut r, &username, (PASSWORD_ENV, env_password), p);
            let tls = mqtt::tls_files(&mut r, url, p);
            (username, password, tls)
        }
        Ok(true) => {
            for key in EXTERNAL_ONLY {
                r.refuse(key, "is set but broker.embedded is true (it is for an external broker's url)", p);
            }
            (Ok(None), Ok(None), Ok(no_tls()))
        }
        Err(e) => (Err(e), Err(e), Err(e)),
    };
    let tls_listener = match embedded {
        Ok(true) => embedded_tls(&mut r, p),
        Ok(false) => {
            for key in EMBEDDED_TLS {
                r.refuse(
                    key,
                    "is set but broker.embedded is false (it is for the embedded broker's mqtts listener)",
                    p,
                );
            }
            Ok(None)
        }
        Err(e) => Err(e),
    };
    let keep_alive = mqtt::keep_alive(&mut r, p);
    let reconnect = mqtt::reconnect(&mut r, secs(30), p);
    let mosquitto_pid_file = r.path_opt("mosquitto_pid_file", p);
    r.finish(p);

    let tls = tls?;
    let (reconnect_min, reconnect_max) = reconnect?;
    Ok(BrokerConfig {
        mode: mode?,
        client_id: client_id?,
        shared_group: shared_group?,
        username: username?,
        password: password?,
        ca_file: tls.ca_file,
        cert_file: tls.cert_file,
        key_file: tls.key_file,
        keep_alive: keep_alive?,
        reconnect_min,
        reconnect_max,
        mosquitto_pid_file: mosquitto_pid_file?,
        tls_listener: tls_listener?,
    })
}

/// `tls_listen`, `tls_cert_file` and `tls_key_file`: all or none; the
/// certificate chain and the key are parsed, and must belong together.
fn embedded_tls(r: &mut Reader, p: &mut Problems) -> Checked<Option<TlsListen>> {
    let listen =
        if r.has("tls_listen") { r.socket_addr_or("tls_listen", DEFAULT_BROKER_LISTEN, p).map(Some) } else { Ok(None) };
    let cert = r.path_opt("tls_cert_file", p);
    let key = r.path_opt("tls_key_file", p);
    let (listen, cert, key) = (listen?, cert?, key?);
    match (listen, cert, key) {
        (None, None, None) => Ok(None),
        (Some(listen), Some(cert_file), Some(key_file)) => {
            let certs = pem::certificates(&cert_file).map_err(|why| r.problem("tls_cert_file", p, why));
            let key = pem::private_key(&key_file).map_err(|why| r.problem("tls_key_file", p, why));
            if let Some(mode) = pem::too_open(&key_file) {
                p.warn(pem::too_open_warning(&r.place.path("tls_key_file"), &key_file, mode));
            }
            let (certs, key) = (certs?, key?);
            pem::matching_pair(certs, key)
                .map_err(|why| r.problem("tls_key_file", p, format!("does not belong to tls_cert_file ({why})")))?;
            Ok(Some(TlsListen { listen, cert_file, key_file }))
        }
        (listen, cert, key) => {
            let missing: Vec<&str> =
                [("tls_listen", listen.is_none()), ("tls_cert_file", cert.is_none()), ("tls_key_file", key.is_none())]
                    .into_iter()
                    .filter_map(|(k, absent)| absent.then_some(k))
                    .collect();
            Err(r.missing(missing[0], "tls_listen, tls_cert_file and tls_key_file go together (all three or none)", p))
        }
    }
}

fn database_config(t: &Table, state_dir: &Path, p: &mut Problems) -> Checked<DatabaseConfig> {
    let mut r = Reader::new(t, Place::Section("database"));
    let url = match r.str_opt("url", p) {
        Ok(Some(text)) => text.parse().map_err(|e: DatabaseUrlError| r.problem("url", p, e.0)),
        Ok(None) => Ok(DatabaseUrl::sqlite(&state_dir.join(DATABASE_FILE))),
        Err(e) => Err(e),
    };
    let heartbeat_retention = r.duration_in("heartbeat_retention", secs(30 * DAY), secs(60)..=secs(3650 * DAY), p);
    let batch_max = r.int_in("batch_max", 500, 1..=BATCH_MAX_LIMIT, p);
    let batch_wait = r.duration_in("batch_wait", millis(50), Duration::ZERO..=secs(10), p);
    r.finish(p);
    Ok(DatabaseConfig {
        url: url?,
        heartbeat_retention: heartbeat_retention?,
        batch_max: batch_max?,
        batch_wait: batch_wait?,
    })
}

fn web_config(t: &Table, state_dir: &Path, p: &mut Problems) -> Checked<WebConfig> {
    let mut r = Reader::new(t, Place::Section("web"));
    let listen = r.socket_addr_or("listen", DEFAULT_WEB_LISTEN, p);
    let token_file = r.path_or("token_file", state_dir.join(TOKEN_FILE), "a file path", p);
    let command_ttl = r.duration_in("command_ttl", secs(30), secs(1)..=secs(DAY), p);
    let command_wait = r.duration_in("command_wait", secs(5), Duration::ZERO..=secs(60), p);
    let metrics_listen = if r.has("metrics_listen") {
        r.socket_addr_or("metrics_listen", DEFAULT_WEB_LISTEN, p).map(Some)
    } else {
        Ok(None)
    };
    r.finish(p);
    Ok(WebConfig {
        listen: listen?,
        token_file: token_file?,
        command_ttl: command_ttl?,
        command_wait: command_wait?,
        metrics_listen: metrics_listen?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support;

    const EXAMPLE: &str = include_str!("../../config/hub.toml");

    fn parse(text: &str) -> Result<HubConfig, ConfigError> {
        parse_with_env(text, None)
    }

    fn problems(text: &str) -> Vec<String> {
        test_support::problems(parse(text))
    }

    fn problem(text: &str) -> String {
        test_support::one_problem(parse(text))
    }

    fn external(rest: &str) -> String {
        format!("[broker]\nembedded = false\nurl = \"mqtt://broker.example\"\n{rest}")
    }

    use test_support::{temp_file, tls_file, toml_path};

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("socket address")
    }

    fn db(url: &str) -> Result<DatabaseUrl, String> {
        url.parse::<DatabaseUrl>().map_err(|e| e.to_string())
    }

    #[test]
    fn the_example_file_parses_cleanly() {
        let c = parse(EXAMPLE).expect("config/hub.toml is valid");
        assert_eq!(c.state_dir, PathBuf::from("state"));
        assert_eq!(c.broker.mode, BrokerMode::Embedded { listen: addr("127.0.0.1:1883") });
        assert_eq!(c.database.url.expose(), "sqlite://state/hub.db");
        assert_eq!(c.web.listen, addr("127.0.0.1:8080"));
        assert_eq!(c.web.token_file, PathBuf::from("state/hub.token"));
    }

    #[test]
    fn the_example_file_shows_every_key() {
        let keys = [
            "state_dir",
            "topic_prefix",
            "embedded",
            "listen",
            "url",
            "client_id",
            "shared_group",
            "username",
            "password_file",
            "ca_file",
            "cert_file",
            "key_file",
            "keep_alive",
            "reconnect_min",
            "reconnect_max",
            "heartbeat_retention",
            "batch_max",
            "batch_wait",
            "token_file",
            "command_ttl",
            "command_wait",
        ];
        for key in keys {
            assert!(
                EXAMPLE.lines().any(|l| l.trim_start().trim_start_matches("# ").starts_with(&format!("{key} ="))),
                "config/hub.toml does not show '{key}'"
            );
        }
    }

    #[test]
    fn the_example_file_shows_the_defaults() {
        let example = parse(EXAMPLE).expect("valid");
        let defaults = parse("").expect("valid");
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn an_empty_file_gets_every_default() {
        let c = parse("").expect("the empty config is valid");
        assert_eq!(c.state_dir, PathBuf::from("state"));
        assert_eq!(c.topic_prefix, "fieldlink");
        let b = &c.broker;
        assert_eq!(b.mode, BrokerMode::Embedded { listen: addr("127.0.0.1:1883") });
        assert_eq!(b.embedded(), Some(addr("127.0.0.1:1883")));
        assert_eq!(b.client_id, "fieldlink-hub");
        assert_eq!(b.shared_group, None);
        assert_eq!((&b.username, &b.password), (&None, &None));
        assert_eq!((&b.ca_file, &b.cert_file, &b.key_file), (&None, &None, &None));
        assert_eq!(b.keep_alive, secs(30));
        assert_eq!((b.reconnect_min, b.reconnect_max), (secs(1), secs(30)));
        let d = &c.database;
        assert_eq!(d.url.kind(), DatabaseKind::Sqlite);
        assert_eq!(d.url.expose(), "sqlite://state/hub.db");
        assert_eq!(d.url.sqlite_path(), Some(Path::new("state/hub.db")));
        assert_eq!(d.heartbeat_retention, secs(30 * DAY));
        assert_eq!(d.batch_max, 500);
        assert_eq!(d.batch_wait, millis(50));
        let w = &c.web;
        assert_eq!(w.listen, addr("127.0.0.1:8080"));
        assert_eq!(w.token_file, PathBuf::from("state/hub.token"));
        assert_eq!(w.command_ttl, secs(30));
        assert_eq!(w.command_wait, secs(5));
    }

    #[test]
    fn the_database_and_the_token_file_follow_state_dir() {
        let c = parse("state_dir = \"/var/lib/fieldlink\"").expect("valid");
        assert_eq!(c.database.url.expose(), "sqlite:///var/lib/fieldlink/hub.db");
        assert_eq!(c.database.url.sqlite_path(), Some(Path::new("/var/lib/fieldlink/hub.db")));
        assert_eq!(c.web.token_file, PathBuf::from("/var/lib/fieldlink/hub.token"));
    }

    #[test]
    fn every_key_can_be_set() {
        let key = tls_file("client.key");
        let cert = tls_file("client.pem");
        let ca = tls_file("ca.pem");
        let pass = temp_file(b"hub-pass\n");
        let c = parse(&format!(
            r#"
state_dir = "/srv/hub"
topic_prefix = "acme/site1"
[broker]
embedded = false
url = "mqtts://broker.example"
client_id = "hub-2"
shared_group = "hubs"
username = "hub"
password_file = {}
ca_file = {}
cert_file = {}
key_file = {}
keep_alive = "1m"
reconnect_min = "500ms"
reconnect_max = "2m"
[database]
url = "postgres://hub:pw@db.example/fieldlink"
heartbeat_retention = "7d"
batch_max = 10000
batch_wait = "0s"
[web]
listen = "[::]:80"
token_file = "/etc/fieldlink/hub.token"
command_ttl = "1d"
command_wait = "0s"
"#,
            toml_path(pass.path()),
            toml_path(ca.path()),
            toml_path(cert.path()),
            toml_path(key.path()),
        ))
        .expect("valid");
        assert_eq!(c.state_dir, PathBuf::from("/srv/hub"));
        assert_eq!(c.topic_prefix, "acme/site1");
        let b = &c.broker;
        let url = BrokerUrl { tls: true, host: "broker.example".into(), port: 8883 };
        assert_eq!(b.mode, BrokerMode::External { url: url.clone() });
        assert_eq!((b.embedded(), b.client_url()), (None, url));
        assert_eq!((b.client_id.as_str(), b.shared_group.as_deref()), ("hub-2", Some("hubs")));
        assert_eq!((b.username.as_deref(), &b.password), (Some("hub"), &Some(Secret("hub-pass".into()))));
        assert_eq!(b.ca_file.as_deref(), Some(ca.path()));
        assert_eq!((b.cert_file.as_deref(), b.key_file.as_deref()), (Some(cert.path()), Some(key.path())));
        assert_eq!((b.keep_alive, b.reconnect_min, b.reconnect_max), (secs(60), millis(500), secs(120)));
        let d = &c.database;
        assert_eq!((d.url.kind(), d.url.expose()), (DatabaseKind::Postgres, "postgres://hub:pw@db.example/fieldlink"));
        assert_eq!(d.url.sqlite_path(), None);
        assert_eq!((d.heartbeat_retention, d.batch_max, d.batch_wait), (secs(7 * DAY), 10_000, Duration::ZERO));
        let w = &c.web;
        assert_eq!((w.listen, w.token_file.as_path()), (addr("[::]:80"), Path::new("/etc/fieldlink/hub.token")));
        assert_eq!((w.command_ttl, w.command_wait), (secs(DAY), Duration::ZERO));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let found = problems(
            r#"
colour = "red"
topic_prefix = "a/#"
[broker]
listen = "localhost:1883"
shared_group = "two words"
[database]
url = "mariadb://hub:pw@db/fieldlink"
batch_max = 0
[web]
command_wait = "soon"
"#,
        );
        assert_eq!(
            found,
            [
                "topic_prefix: 'a/#' contains an mqtt wildcard ('+' or '#') (expected e.g. 'fieldlink' or 'acme/site1')",
                "broker.listen: 'localhost:1883' is not an address (expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080; not a host name)",
                "broker.shared_group: 'two words' is not a valid group name (expected [A-Za-z0-9_-]{1,64})",
                "database.url: 'mariadb://hub:***@db/fieldlink' has scheme 'mariadb' (expected sqlite://, mysql://, postgres:// or postgresql://)",
                "database.batch_max: 0 is out of range (expected 1..=10000)",
                "web.command_wait: 'soon' is not a duration (e.g. 30s, 5m)",
                "unknown key 'colour'",
            ]
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let found = problems("[broker]\nport = 1\n[database]\npool = 5\n[web]\ncors = true\n[mqtt]\n");
        assert_eq!(
            found,
            [
                "unknown key 'broker.port'",
                "unknown key 'database.pool'",
                "unknown key 'web.cors'",
                "unknown key 'mqtt'"
            ]
        );
    }

    #[test]
    fn wrong_types_name_the_key_the_value_and_what_was_expected() {
        let found = problems(
            "state_dir = 1\n[broker]\nembedded = \"yes\"\n[database]\nbatch_max = \"500\"\n[web]\nlisten = 8080\nweb = 1\n",
        );
        assert_eq!(
            found,
            [
                "state_dir: 1 is an integer, expected a string",
                "broker.embedded: 'yes' is a string, expected true or false",
                "database.batch_max: '500' is a string, expected an integer",
                "web.listen: 8080 is an integer, expected an ip:port string",
                "unknown key 'web.web'",
            ]
        );
        assert_eq!(problem("broker = \"embedded\""), "broker: 'embedded' is a string, expected a [broker] table");
    }

    #[test]
    fn a_bad_embedded_value_does_not_make_the_other_broker_keys_unknown() {
        let text =
            "[broker]\nembedded = 1\nlisten = \"127.0.0.1:1\"\nurl = \"mqtt://h\"\nusername = \"u\"\nca_file = \"x\"";
        assert_eq!(problem(text), "broker.embedded: 1 is an integer, expected true or false");
    }

    #[test]
    fn an_external_broker_needs_a_url() {
        assert_eq!(
            problem("[broker]\nembedded = false"),
            "missing key 'broker.url' (expected mqtt://host[:port] or mqtts://host[:port] when embedded = false)"
        );
        let c = parse("[broker]\nembedded = false\nurl = \"mqtt://10.0.0.5:1999\"").expect("valid");
        assert_eq!(c.broker.client_url(), BrokerUrl { tls: false, host: "10.0.0.5".into(), port: 1999 });
    }

    #[test]
    fn the_embedded_broker_refuses_the_keys_of_an_external_one() {
        let ca = temp_file(b"ca");
        let found = problems(&format!(
            "[broker]\nurl = \"mqtt://h\"\nusername = \"u\"\npassword_file = {0}\nca_file = {0}\ncert_file = {0}\nkey_file = {0}",
            toml_path(ca.path())
        ));
        assert_eq!(
            found,
            [
                "broker.url: is set but broker.embedded is true (set embedded = false to use an external broker)",
                "broker.username: is set but broker.embedded is true (it is for an external broker's url)",
                "broker.password_file: is set but broker.embedded is true (it is for an external broker's url)",
                "broker.ca_file: is set but broker.embedded is true (it is for an external broker's url)",
                "broker.cert_file: is set but broker.embedded is true (it is for an external broker's url)",
                "broker.key_file: is set but broker.embedded is true (it is for an external broker's url)",
            ]
        );
    }

    #[test]
    fn listen_is_only_for_the_embedded_broker() {
        assert_eq!(
            problem(&external("listen = \"0.0.0.0:1883\"")),
            "broker.listen: is set but broker.embedded is false (the hub runs no broker; remove it)"
        );
    }

    #[test]
    fn listen_addresses_are_ip_and_port() {
        let c = parse("[broker]\nlisten = \"0.0.0.0:0\"\n[web]\nlisten = \"[::1]:9000\"").expect("valid");
        assert_eq!(c.broker.embedded(), Some(addr("0.0.0.0:0")));
        assert_eq!(c.web.listen, addr("[::1]:9000"));
        for bad in ["localhost:8080", "127.0.0.1", ":8080", "127.0.0.1:99999", "::1:8080"] {
            assert_eq!(
                problem(&format!("[web]\nlisten = \"{bad}\"")),
                format!(
                    "web.listen: '{bad}' is not an address (expected ip:port, e.g. 127.0.0.1:8080 or [::]:8080; not a host name)"
                )
            );
        }
    }

    #[test]
    fn the_client_connects_to_the_embedded_broker_over_loopback() {
        let url = |listen: &str| parse(&format!("[broker]\nlisten = \"{listen}\"")).expect("valid").broker.client_url();
        assert_eq!(url("0.0.0.0:1883"), BrokerUrl { tls: false, host: "127.0.0.1".into(), port: 1883 });
        assert_eq!(url("[::]:1884"), BrokerUrl { tls: false, host: "::1".into(), port: 1884 });
        assert_eq!(url("192.168.1.2:1885"), BrokerUrl { tls: false, host: "192.168.1.2".into(), port: 1885 });
    }

    #[test]
    fn bad_broker_urls_are_errors_like_the_agents() {
        assert_eq!(
            problem("[broker]\nembedded = false\nurl = \"tcp://h:1883\""),
            "broker.url: 'tcp://h:1883' has scheme 'tcp' (expected mqtt://host[:port] or mqtts://host[:port])"
        );
        let p = problem("[broker]\nembedded = false\nurl = \"mqtt://hub:hunter2@h\"");
        assert_eq!(p, "broker.url: has credentials in it; use broker.username and broker.password_file instead");
    }

    #[test]
    fn topic_prefix_follows_the_agents_rules() {
        assert_eq!(
            problem("topic_prefix = \"$SYS\""),
            "topic_prefix: '$SYS' starts with '$' (reserved for broker topics) (expected e.g. 'fieldlink' or 'acme/site1')"
        );
        assert!(problem("topic_prefix = \"a/\"").contains("starts or ends with '/'"));
        assert_eq!(parse("topic_prefix = \"acme/site1\"").expect("valid").topic_prefix, "acme/site1");
    }

    #[test]
    fn shared_group_and_client_id_are_checked() {
        assert_eq!(
            problem(&format!("[broker]\nshared_group = \"{}\"", "g".repeat(65))),
            format!(
                "broker.shared_group: '{}' is not a valid group name (expected [A-Za-z0-9_-]{{1,64}})",
                "g".repeat(65)
            )
        );
        assert_eq!(
            problem("[broker]\nshared_group = \"a/b\""),
            "broker.shared_group: 'a/b' is not a valid group name (expected [A-Za-z0-9_-]{1,64})"
        );
        assert_eq!(problem("[broker]\nclient_id = \"\""), "broker.client_id: '' has 0 characters (expected 1..=128)");
    }

    #[test]
    fn empty_paths_are_errors() {
        assert_eq!(problem("state_dir = \"\""), "state_dir: '' is empty (expected a directory path)");
        assert_eq!(problem("[web]\ntoken_file = \"\""), "web.token_file: '' is empty (expected a file path)");
    }

    #[test]
    fn duration_bounds_are_enforced() {
        let p = |section: &str, key: &str, value: &str| problem(&format!("[{section}]\n{key} = \"{value}\""));
        assert_eq!(p("broker", "keep_alive", "0s"), "broker.keep_alive: '0s' is less than 1s");
        assert_eq!(p("broker", "reconnect_max", "0s"), "broker.reconnect_max: '0s' must be more than 0");
        assert_eq!(p("database", "heartbeat_retention", "59s"), "database.heartbeat_retention: '59s' is less than 60s");
        assert_eq!(
            p("database", "heartbeat_retention", "3651d"),
            "database.heartbeat_retention: '3651d' is more than 3650d"
        );
        assert_eq!(p("database", "batch_wait", "11s"), "database.batch_wait: '11s' is more than 10s");
        assert_eq!(p("web", "command_ttl", "500ms"), "web.command_ttl: '500ms' is less than 1s");
        assert_eq!(p("web", "command_ttl", "2d"), "web.command_ttl: '2d' is more than 1d");
        assert_eq!(p("web", "command_wait", "61s"), "web.command_wait: '61s' is more than 60s");
    }

    #[test]
    fn reconnect_min_must_not_exceed_reconnect_max() {
        assert_eq!(
            problem("[broker]\nreconnect_min = \"1m\""),
            "broker.reconnect_min: '60s' is more than broker.reconnect_max '30s'"
        );
    }

    #[test]
    fn batch_max_is_bounded() {
        assert_eq!(
            problem("[database]\nbatch_max = 10001"),
            "database.batch_max: 10001 is out of range (expected 1..=10000)"
        );
        assert_eq!(
            problem("[database]\nbatch_max = -1"),
            "database.batch_max: -1 is out of range (expected 1..=10000)"
        );
        assert_eq!(parse("[database]\nbatch_max = 1").expect("valid").database.batch_max, 1);
    }

    #[test]
    fn database_urls_of_every_kind_are_accepted() {
        let kind = |url: &str| db(url).map(|u| u.kind());
        assert_eq!(kind("sqlite://hub.db"), Ok(DatabaseKind::Sqlite));
        assert_eq!(kind("sqlite:///var/lib/fieldlink/hub.db?mode=rwc"), Ok(DatabaseKind::Sqlite));
        assert_eq!(kind("mysql://hub:pw@127.0.0.1:3306/fieldlink"), Ok(DatabaseKind::MySql));
        assert_eq!(kind("postgres://hub@localhost/fieldlink"), Ok(DatabaseKind::Postgres));
        assert_eq!(kind("postgresql:///fieldlink?host=/run/postgresql"), Ok(DatabaseKind::Postgres));
        assert_eq!(db("sqlite://state/hub.db?mode=rwc").expect("valid").sqlite_path(), Some(Path::new("state/hub.db")));
        let c = parse("[database]\nurl = \"mysql://hub:pw@db/fieldlink\"").expect("valid");
        assert_eq!(c.database.url.expose(), "mysql://hub:pw@db/fieldlink");
    }

    #[test]
    fn bad_database_urls_are_errors() {
        assert_eq!(
            db(""),
            Err("'' is empty (expected sqlite://path, mysql://user:password@host/db or postgres://user:password@host/db)"
                .into())
        );
        assert_eq!(
            db("state/hub.db"),
            Err("'state/hub.db' is not a database url (expected sqlite://path, mysql://user:password@host/db or postgres://user:password@host/db)".into())
        );
        assert_eq!(db("sqlite://"), Err("'sqlite://' has no file path (expected e.g. sqlite://state/hub.db)".into()));
        assert_eq!(
            db("mysql://hub:pw@db"),
            Err("'mysql://hub:***@db' has no database name (expected e.g. mysql://user:password@host/fieldlink)".into())
        );
        assert_eq!(
            db("postgres://db/"),
            Err("'postgres://db/' has no database name (expected e.g. postgres://user:password@host/fieldlink)".into())
        );
        assert_eq!(
            problem("[database]\nurl = \"redis://h/0\""),
            "database.url: 'redis://h/0' has scheme 'redis' (expected sqlite://, mysql://, postgres:// or postgresql://)"
        );
    }

    #[test]
    fn database_passwords_never_appear_in_messages_or_debug_output() {
        const SECRET: &str = "hunter2-very-secret";
        for url in [
            format!("mysql://hub:{SECRET}@db"),
            format!("mariadb://hub:{SECRET}@db/fieldlink"),
            format!("hub:{SECRET}@db/fieldlink"),
            format!("postgres://hub:{SECRET}/x@db"),
            format!("postgres://db?password={SECRET}"),
            format!("hub:{SECRET}@x://db"),
        ] {
            let message = problem(&format!("[database]\nurl = \"{url}\""));
            assert!(!message.contains(SECRET), "{message}");
            assert!(message.starts_with("database.url: '"), "{message}");
        }
        let c = parse(&format!("[database]\nurl = \"postgres://hub:{SECRET}@db/fieldlink?sslmode=require\""))
            .expect("valid");
        let url = &c.database.url;
        assert_eq!(url.to_string(), "postgres://hub:***@db/fieldlink?sslmode=require");
        assert_eq!(format!("{url:?}"), "DatabaseUrl(\"postgres://hub:***@db/fieldlink?sslmode=require\")");
        let debug = format!("{c:?} {c:#?}");
        assert!(!debug.contains(SECRET), "{debug}");
        assert_eq!(
            db(&format!("postgres://db/x?user=a&password={SECRET}")).expect("valid").to_string(),
            "postgres://db/x?***"
        );
    }

    #[test]
    fn the_password_comes_from_its_file_or_the_environment() {
        let file = temp_file(b"from-file\r\n");
        let text = external(&format!("username = \"hub\"\npassword_file = {}", toml_path(file.path())));
        let c = parse_with_env(&text, Some("from-env".into())).expect("valid");
        assert_eq!(c.broker.password, Some(Secret("from-file".into())), "the file wins over the environment");
        let c = parse_with_env(&external("username = \"hub\""), Some("from-env".into())).expect("valid");
        assert_eq!(c.broker.password, Some(Secret("from-env".into())));
    }

    #[test]
    fn the_environment_password_is_ignored_with_the_embedded_broker() {
        let c = parse_with_env("", Some("from-env".into())).expect("valid");
        assert_eq!(c.broker.password, None);
    }

    #[test]
    fn a_password_needs_a_username() {
        let file = temp_file(b"pw");
        assert_eq!(
            problem(&external(&format!("password_file = {}", toml_path(file.path())))),
            "broker.password_file: is set but broker.username is not (mqtt sends no password without a user name)"
        );
        let err = parse_with_env(&external(""), Some("pw".into())).expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "env FIELDLINK_HUB_MQTT_PASSWORD is set but broker.username is not (mqtt sends no password without a user name)"
        );
        assert_eq!(
            problem(&external("username = \"hub\"\npassword_file = \"/nonexistent/pass\"")),
            "broker.password_file: cannot read '/nonexistent/pass': no such file"
        );
    }

    #[test]
    fn tls_files_follow_the_url_scheme() {
        assert_eq!(
            problem("[broker]\nembedded = false\nurl = \"mqtts://h\""),
            "broker.ca_file: mqtts:// needs a CA certificate to check the broker; set broker.ca_file"
        );
        let ca = temp_file(b"ca");
        assert_eq!(
            problem(&external(&format!("ca_file = {}", toml_path(ca.path())))),
            "broker.ca_file: is set but broker.url is mqtt:// (no tls); use mqtts:// or remove it"
        );
        assert_eq!(
            problem(&format!(
                "[broker]\nembedded = false\nurl = \"mqtts://h\"\nca_file = {0}\ncert_file = {0}",
                toml_path(ca.path())
            )),
            "broker.cert_file: is set without broker.key_file (a client certificate needs both)"
        );
        assert_eq!(
            problem("[broker]\nembedded = false\nurl = \"mqtts://h\"\nca_file = \"/nonexistent/ca.pem\""),
            "broker.ca_file: cannot read '/nonexistent/ca.pem': no such file"
        );
    }

    #[test]
    fn secrets_never_appear_in_debug_or_error_output() {
        const SECRET: &str = "hunter2-very-secret";
        let file = temp_file(format!("{SECRET}\n").as_bytes());
        let text = external(&format!("username = \"hub\"\npassword_file = {}", toml_path(file.path())));
        let c = parse(&text).expect("valid");
        assert_eq!(c.broker.password.as_ref().map(|s| s.0.as_str()), Some(SECRET));
        let debug = format!("{c:?} {c:#?}");
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(debug.contains("Secret(<redacted>)"));

        let err = parse(&format!("{text}\nkeep_alive = \"x\"\n[database]\nurl = \"mysql://u:{SECRET}@h\""))
            .expect_err("invalid");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(SECRET), "{shown}");
        }
        let err = parse_with_env(&external("keep_alive = \"x\""), Some(SECRET.into())).expect_err("invalid");
        assert!(!format!("{err} {err:?}").contains(SECRET));
    }

    #[test]
    fn load_reads_the_example_file_and_quotes_a_missing_path() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hub.toml");
        assert!(HubConfig::load(&path).is_ok());
        let err = HubConfig::load(Path::new("/nonexistent/hub.toml")).expect_err("missing");
        assert_eq!(err.to_string(), "config file '/nonexistent/hub.toml' does not exist");
    }

    #[test]
    fn toml_syntax_errors_are_one_problem_with_the_line() {
        let p = problem("state_dir = \"x\"\n[web\n");
        assert!(p.starts_with("line 2: invalid toml: "), "{p}");
    }

    #[test]
    fn a_shared_group_needs_an_external_broker() {
        let e = HubConfig::parse("[broker]\nshared_group = \"hubs\"").expect_err("embedded + shared_group");
        assert!(e.to_string().contains("broker.shared_group: 'hubs' needs an external broker"), "{e}");
        let ok =
            HubConfig::parse("[broker]\nembedded = false\nurl = \"mqtt://127.0.0.1:1883\"\nshared_group = \"hubs\"");
        assert_eq!(ok.expect("external broker").broker.shared_group.as_deref(), Some("hubs"));
    }
}
