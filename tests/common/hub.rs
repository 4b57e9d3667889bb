//! The hub side of the shared harness: the real `fieldlink hub` binary as a
//! child process, and what tests feed it and read back from it, all on
//! 127.0.0.1.
//!
//! * [`Hub`] (configured with [`HubBuilder`]): a `hub.toml` in its own temp
//!   dir (`state_dir` inside), an external [`Mosquitto`] by default or the
//!   embedded broker on a free port, a unique `client_id`, an optional
//!   `shared_group`, SQLite in the temp dir by default or any database url,
//!   the web side on a free port. `start` returns once the web port answers,
//!   the token file is read and the hub is subscribed; `sigterm`, `kill9`,
//!   `restart`. Its log is printed when a test fails.
//! * The embedded broker lets nobody in without credentials:
//!   [`Hub::provision`] runs the real `fieldlink hub device add` (which
//!   signals a running hub to reload) and returns the password;
//!   [`Hub::fake_agent`] and [`Hub::watcher`] connect as a provisioned device
//!   or as the hub's own user ([`Hub::broker_user`]) when the hub embeds the
//!   broker, anonymously on the test mosquitto.
//! * HTTP: [`Hub::get`], [`Hub::post`] with the token, [`Hub::request`] with
//!   no token or a wrong one ([`Auth`]), paging through events
//!   ([`Hub::all_events`]), and [`SseReader`] for `GET /api/stream`.
//! * [`TestDb`]: a fresh MariaDB (127.0.0.1:3306, root, no password) or
//!   PostgreSQL (127.0.0.1:5432, postgres, trust) database, dropped at the
//!   end. Where no server answers it is `None` after printing
//!   "skipping: ...", or a failure with `FIELDLINK_REQUIRE_DATABASES=1`.
//!   [`query_i64`] reads one number from any database url (SQLite too).
//! * [`FakeAgent`]: publishes agent-format messages over MQTT QoS 1 straight
//!   to the broker, duplicates included on purpose: what a real agent's
//!   wire may carry after reconnects, without waiting for one.
//!
//! Like the rest of the harness, every wait polls against a generous
//! deadline and nothing asserts on how long something took.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use sqlx::{AnyConnection, AssertSqlSafe, Connection, Executor, Row};
use tempfile::TempDir;

use super::{
    DEADLINE, Mosquitto, POLL, Watcher, fieldlink, fieldlink_bin, free_port, send_signal, tail, topic, unique,
    wait_until,
};

/// The most events one API page may hold (the hub's `MAX_LIMIT`).
pub const PAGE: usize = 1000;

/// How long one HTTP request may take before the test gives up on it.
const HTTP_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Hub

/// Which broker a hub talks to.
#[derive(Debug, Clone)]
enum Broker {
    /// A test mosquitto: its port, and its log (`log_type all`), which shows
    /// when the hub's subscription is in place.
    External { port: u16, log: PathBuf },
    /// `[broker] embedded = true` on this port: it lives and dies with the
    /// hub, and keeps nothing across a restart (see `src/broker/mod.rs`).
    Embedded { port: u16 },
}

/// How to configure a [`Hub`]; every knob has the harness default.
#[derive(Debug, Clone)]
pub struct HubBuilder {
    broker: Broker,
    client_id: String,
    shared_group: Option<String>,
    database_url: Option<String>,
    heartbeat_retention: String,
    batch_wait: String,
    command_ttl: String,
    command_wait: String,
    web_extra: Vec<String>,
    /// The embedded broker's mqtts listener port (test certificates).
    tls_port: Option<u16>,
}

impl HubBuilder {
    /// One more line in `[web]` (e.g. `metrics_listen = "127.0.0.1:9187"`).
    pub fn web_extra(mut self, line: &str) -> Self {
        self.web_extra.push(line.to_string());
        self
    }

    /// An `mqtts` listener for the embedded broker on a free port, with the
    /// test server certificate of `tests/fixtures/tls` (`localhost`,
    /// 127.0.0.1, signed by `ca.pem`).
    pub fn tls(mut self) -> Self {
        assert!(matches!(self.broker, Broker::Embedded { .. }), "TLS listeners are the embedded broker's");
        self.tls_port = Some(free_port());
        self
    }

    /// `[broker] shared_group` (external broker only).
    pub fn shared_group(mut self, group: &str) -> Self {
        self.shared_group = Some(group.to_string());
        self
    }

    /// `[database] url` (default: a SQLite file in the hub's temp dir).
    pub fn database(mut self, url: &str) -> Self {
        self.database_url = Some(url.to_string());
        self
    }

    /// `[database] heartbeat_retention` (default "30d"; at least "1m").
    pub fn heartbeat_retention(mut self, d: &str) -> Self {
        self.heartbeat_retention = d.to_string();
        self
    }

    /// `[database] batch_wait` (default "50ms").
    pub fn batch_wait(mut self, d: &str) -> Self {
        self.batch_wait = d.to_string();
        self
    }

    /// `[web] command_ttl` (default "30s").
    pub fn command_ttl(mut self, d: &str) -> Self {
        self.command_ttl = d.to_string();
        self
    }

    /// `[web] command_wait` (default "5s").
    pub fn command_wait(mut self, d: &str) -> Self {
        self.command_wait = d.to_string();
        self
    }

    fn render(&self, state_dir: &Path, database_url: &str, web_port: u16) -> String {
        let broker = match &self.broker {
            Broker::External { port, .. } => format!("embedded = false\nurl = \"mqtt://127.0.0.1:{port}\""),
            Broker::Embedded { port } => format!("embedded = true\nlisten = \"127.0.0.1:{port}\""),
        };
        let group = self.shared_group.as_ref().map(|g| format!("shared_group = \"{g}\"")).unwrap_or_default();
        let tls = self
            .tls_port
            .map(|port| {
                let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
                format!(
                    "tls_listen = \"127.0.0.1:{port}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
                    fixtures.join("server.pem").display(),
                    fixtures.join("server.key").display()
                )
            })
            .unwrap_or_default();
        format!(
            r#"# written by tests/common/hub.rs
state_dir = "{state_dir}"
topic_prefix = "fieldlink"

[broker]
{broker}
client_id = "{client_id}"
{group}
{tls}
keep_alive = "5s"
reconnect_min = "100ms"
reconnect_max = "1s"

[database]
url = "{database_url}"
heartbeat_retention = "{retention}"
batch_wait = "{batch_wait}"

[web]
listen = "127.0.0.1:{web_port}"
command_ttl = "{ttl}"
command_wait = "{wait}"
{web_extra}
"#,
            state_dir = state_dir.display(),
            client_id = self.client_id,
            retention = self.heartbeat_retention,
            batch_wait = self.batch_wait,
            ttl = self.command_ttl,
            wait = self.command_wait,
            web_extra = self.web_extra.join("\n"),
        )
    }

    /// Writes the config into a fresh temp dir without starting anything.
    pub fn build(self) -> Hub {
        let dir = tempfile::Builder::new().prefix("fieldlink-hub-").tempdir().expect("create a temp dir");
        let state_dir = dir.path().join("state");
        let database_url =
            self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", state_dir.join("hub.db").display()));
        let web_port = free_port();
        let cfg_path = dir.path().join("hub.toml");
        fs::write(&cfg_path, self.render(&state_dir, &database_url, web_port)).expect("write hub.toml");
        Hub {
            log_path: dir.path().join("hub.log"),
            token_file: state_dir.join("hub.token"),
            dir,
            cfg_path,
            web_port,
            client_id: self.client_id,
            tls_port: self.tls_port,
            database_url,
            broker: self.broker,
            child: None,
            starts: 0,
            token: String::new(),
            http: http_agent(Some(HTTP_DEADLINE)),
            probe_password: None,
        }
    }

    /// Builds and starts the hub; see [`Hub::start`].
    pub fn start(self) -> Hub {
        let mut hub = self.build();
        hub.start();
        hub
    }
}

/// Which token a request presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <the hub's token>`
    Token,
    /// No `Authorization` header at all.
    Missing,
    /// `Authorization: Bearer <a well-formed token that is not the hub's>`
    Wrong,
}

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// The `Location` header, if any.
    pub location: Option<String>,
    /// The body parsed as JSON, or the text as a JSON string when it is not
    /// JSON.
    pub body: Value,
}

fn http_agent(timeout: Option<Duration>) -> ureq::Agent {
    // No pooled connections: after a 401 to a POST whose body it did not
    // read, actix-web closes the connection (it cannot be reused with the
    // body unread), and a pooled one could be handed to the next request
    // before the close is seen ("io: Peer disconnected", CI run of
    // 2026-11-30 14:50 in `hub_api`). A test request costs one loopback
    // connect more.
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_idle_connections_per_host(0)
        .timeout_global(timeout)
        .build()
        .into()
}

/// One `fieldlink hub` child process and its files.
pub struct Hub {
    dir: TempDir,
    cfg_path: PathBuf,
    log_path: PathBuf,
    token_file: PathBuf,
    web_port: u16,
    client_id: String,
    tls_port: Option<u16>,
    database_url: String,
    broker: Broker,
    child: Option<Child>,
    starts: u32,
    token: String,
    http: ureq::Agent,
    /// The embedded broker's probe device's password, once provisioned.
    probe_password: Option<String>,
}

impl Hub {
    /// A hub on the test mosquitto `broker` (`embedded = false`).
    pub fn builder(broker: &Mosquitto) -> HubBuilder {
        HubBuilder::new(Broker::External { port: broker.port(), log: broker.log_path() })
    }

    /// A hub running its own embedded broker on a free port.
    pub fn builder_embedded() -> HubBuilder {
        HubBuilder::new(Broker::Embedded { port: free_port() })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.cfg_path
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The database url in the config (for [`query_i64`]).
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The port of the broker the hub (and its agents) use.
    pub fn broker_port(&self) -> u16 {
        match &self.broker {
            Broker::External { port, .. } | Broker::Embedded { port } => *port,
        }
    }

    /// The embedded broker's mqtts port (see [`HubBuilder::tls`]).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    pub fn web_port(&self) -> u16 {
        self.web_port
    }

    /// The API token, as read from the token file.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the hub printed, across restarts.
    pub fn log(&self) -> String {
        fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Prints the last lines of the hub's log to stderr.
    pub fn print_log(&self) {
        eprintln!("---- hub {} log (last 200 lines) ----\n{}", self.client_id, tail(&self.log_path, 200));
    }

    /// Spawns `fieldlink hub -c <cfg>` and returns once it serves HTTP, its
    /// token file is read, and its subscription is in place: with a test
    /// mosquitto, the broker logged a new SUBACK to the hub's client id;
    /// with the embedded broker, a probe message published to it shows up
    /// in the API (device `probe-<client_id>`).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the hub is already running");
        if matches!(self.broker, Broker::Embedded { .. }) && self.probe_password.is_none() {
            // Before the hub runs: it reads the password file when it starts.
            self.probe_password = Some(self.provision(&self.probe_device()));
        }
        let subacks_before = self.subacks();
        self.starts += 1;
        let mut log = fs::OpenOptions::new().create(true).append(true).open(&self.log_path).expect("open hub.log");
        writeln!(log, "==== fieldlink hub, start #{} ====", self.starts).expect("write hub.log");
        let err = log.try_clone().expect("clone the log file handle");
        let child = Command::new(fieldlink_bin())
            .arg("hub")
            .arg("-c")
            .arg(&self.cfg_path)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("FIELDLINK_HUB_MQTT_PASSWORD")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", fieldlink_bin()));
        self.child = Some(child);

        let (port, token_file) = (self.web_port, self.token_file.clone());
        self.token = wait_until(DEADLINE, "the hub's web port to answer and its token file to exist", || {
            self.assert_running("while starting");
            TcpStream::connect(("127.0.0.1", port)).ok()?;
            let token = fs::read_to_string(&token_file).ok()?.trim().to_string();
            (!token.is_empty()).then_some(token)
        });
        match self.broker.clone() {
            Broker::External { log, .. } => {
                let what = format!("mosquitto to acknowledge the subscription of hub '{}'", self.client_id);
                wait_until(DEADLINE, &what, || {
                    self.assert_running("while subscribing");
                    (subacks_in(&log, &self.client_id) > subacks_before).then_some(())
                });
            }
            Broker::Embedded { port } => self.probe(port),
        }
    }

    /// How many SUBACKs a test mosquitto sent to this hub so far.
    fn subacks(&self) -> usize {
        match &self.broker {
            Broker::External { log, .. } => subacks_in(log, &self.client_id),
            Broker::Embedded { .. } => 0,
        }
    }

    fn probe_device(&self) -> String {
        format!("probe-{}", self.client_id)
    }

    /// Publishes button messages for a probe device until one is stored.
    fn probe(&mut self, broker_port: u16) {
        let device = self.probe_device();
        let password = self.probe_password.clone().expect("the probe device is provisioned before the hub starts");
        let mut fake = FakeAgent::connect_as(broker_port, &device, &password);
        let mut seq = u64::from(self.starts) * 1_000_000;
        let start = Instant::now();
        loop {
            self.assert_running("while probing its broker");
            seq += 1;
            fake.button(seq);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if self
                    .events(&device, &format!("limit=1&before_seq={}", seq + 1))
                    .first()
                    .is_some_and(|e| e["seq"] == seq)
                {
                    return;
                }
                thread::sleep(POLL);
            }
            assert!(start.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for the hub to store a probe");
        }
    }

    /// Panics (with the log) if the hub has exited.
    fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            self.child = None;
            panic!("the hub exited with {status} {when}");
        }
    }

    /// `fieldlink hub device <args> -c <this hub's config>`: the real CLI,
    /// which signals a running hub to reload. Panics unless it succeeds.
    pub fn device_cli(&self, args: &[&str]) -> String {
        let config = self.cfg_path.display().to_string();
        let mut all = vec!["hub", "device"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-c", &config]);
        let out = fieldlink(&all);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "fieldlink {all:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    /// Provisions `device` with `fieldlink hub device add` and returns the
    /// password it printed once (client id = user name = device id).
    pub fn provision(&self, device: &str) -> String {
        let out = self.device_cli(&["add", device]);
        assert!(out.contains(&format!("username = \"{device}\"")), "{out}");
        out.lines()
            .skip_while(|l| !l.contains("shown only now"))
            .nth(2)
            .map(|l| l.trim().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| panic!("no password in the output of `device add {device}`:\n{out}"))
    }

    /// The embedded broker's own user of the hub (its `client_id`) and its
    /// password (`state_dir/broker-hub.pass`, written on the first start);
    /// `None` with an external broker.
    pub fn broker_user(&self) -> Option<(String, String)> {
        match self.broker {
            Broker::External { .. } => None,
            Broker::Embedded { .. } => {
                let path = self.dir.path().join("state").join("broker-hub.pass");
                let password = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                Some((self.client_id.clone(), password.trim().to_string()))
            }
        }
    }

    /// A [`FakeAgent`] for `device` on this hub's broker: with the embedded
    /// broker provisioned first and connected as the device; with mosquitto
    /// anonymous (the test mosquitto has no auth).
    pub fn fake_agent(&self, device: &str) -> FakeAgent {
        match self.broker {
            Broker::External { port, .. } => FakeAgent::connect(port, device),
            Broker::Embedded { port } => FakeAgent::connect_as(port, device, &self.provision(device)),
        }
    }

    /// A [`Watcher`] of `fieldlink/<device>/#` on this hub's broker (as
    /// the hub's own user with the embedded broker).
    pub fn watcher(&self, device: &str) -> Watcher {
        let port = self.broker_port();
        match self.broker_user() {
            None => Watcher::for_device(port, device),
            Some((user, password)) => {
                Watcher::connect_as_with_id(port, &format!("watcher-{device}"), &user, &password, &topic(device, "#"))
            }
        }
    }

    /// SIGTERM, and the exit status once it is gone.
    pub fn sigterm(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the hub is not running");
        send_signal(child.id(), Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("poll the hub") {
                return status;
            }
            if start.elapsed() > DEADLINE {
                // Gone either way after this; the panic says what mattered.
                let _ = child.kill();
                let _ = child.wait();
                panic!("the hub did not exit within {DEADLINE:?} of SIGTERM");
            }
            thread::sleep(POLL);
        }
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // It may have died already; wait() below reaps it either way.
            let _ = child.kill();
            child.wait().expect("wait for the hub");
        }
    }

    /// SIGTERM (if running; the exit must be clean) and start again with
    /// the same config: same client id, database, token and port.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            let status = self.sigterm();
            assert_eq!(status.code(), Some(0), "the hub's exit on SIGTERM");
        }
        self.start();
    }

    /// `http://127.0.0.1:<web port><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.web_port)
    }

    fn bearer(&self, auth: Auth) -> Option<String> {
        match auth {
            Auth::Token => Some(format!("Bearer {}", self.token)),
            Auth::Missing => None,
            // As long as a real token and of the same alphabet: only its
            // value is wrong.
            Auth::Wrong => Some(format!("Bearer {}", "0".repeat(self.token.len().max(64)))),
        }
    }

    /// `GET` or `POST` (with a JSON body) `path`, presenting `auth`.
    pub fn request(&self, method: &str, path: &str, auth: Auth, body: Option<&Value>) -> Reply {
        let url = self.url(path);
        let result = match method {
            "GET" => {
                let mut req = self.http.get(&url);
                if let Some(b) = self.bearer(auth) {
                    req = req.header("Authorization", b);
                }
                req.call()
            }
            "POST" => {
                let mut req = self.http.post(&url);
                if let Some(b) = self.bearer(auth) {
                    req = req.header("Authorization", b);
                }
                req.header("Content-Type", "application/json")
                    .send(body.map(Value::to_string).unwrap_or_default().into_bytes())
            }
            other => panic!("the harness speaks GET and POST, not {other}"),
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        let location = response.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = response.body_mut().read_to_string().unwrap_or_else(|e| panic!("{method} {url}: body: {e}"));
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, location, body }
    }

    /// `GET path` with the token: (status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self.request("GET", path, Auth::Token, None);
        (r.status, r.body)
    }

    /// `POST path` with the token and a JSON body: (status, JSON body).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.request("POST", path, Auth::Token, Some(body));
        (r.status, r.body)
    }

    /// `GET /api/devices`; panics unless 200.
    pub fn devices(&self) -> Vec<Value> {
        let (status, body) = self.get("/api/devices");
        assert_eq!(status, 200, "GET /api/devices: {body}");
        body.as_array().unwrap_or_else(|| panic!("GET /api/devices is not a list: {body}")).clone()
    }

    /// This device's entry in `GET /api/devices`, if it has one.
    pub fn device(&self, device: &str) -> Option<Value> {
        self.devices().into_iter().find(|d| d["device"] == device)
    }

    /// Polls `GET /api/devices` until `device` is there and `pred` holds for
    /// its entry; returns the entry.
    pub fn wait_device(&self, device: &str, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
        let mut last = None;
        let found = wait_until_or(DEADLINE, || {
            let d = self.device(device);
            let ok = d.as_ref().is_some_and(&pred);
            last = d.clone();
            if ok { d } else { None }
        });
        found.unwrap_or_else(|| {
            panic!("timed out after {DEADLINE:?} waiting for device '{device}' to show {what}; last entry: {last:?}")
        })
    }

    /// `GET /api/devices/<device>/events?<query>`; panics unless 200.
    pub fn events(&self, device: &str, query: &str) -> Vec<Value> {
        let path = format!("/api/devices/{device}/events?{query}");
        let (status, body) = self.get(&path);
        assert_eq!(status, 200, "GET {path}: {body}");
        body.as_array().unwrap_or_else(|| panic!("GET {path} is not a list: {body}")).clone()
    }

    /// Every event of `device` (of one `kind`, if given), newest first,
    /// paging through with `before_epoch` and `before_seq`.
    pub fn all_events(&self, device: &str, kind: Option<&str>) -> Vec<Value> {
        self.all_events_paged(device, kind, PAGE)
    }

    /// [`Hub::all_events`] with pages of `page` events: each next page asks
    /// for the events before the oldest `(epoch, seq)` of the page before.
    pub fn all_events_paged(&self, device: &str, kind: Option<&str>, page: usize) -> Vec<Value> {
        let mut all: Vec<Value> = Vec::new();
        let mut before: Option<(u64, u64)> = None;
        loop {
            let mut query = format!("limit={page}");
            if let Some(k) = kind {
                query.push_str(&format!("&kind={k}"));
            }
            if let Some((e, s)) = before {
                query.push_str(&format!("&before_epoch={e}&before_seq={s}"));
            }
            let events = self.events(device, &query);
            assert!(events.len() <= page, "limit={page} returned {} events", events.len());
            let full = events.len() == page;
            if let Some(first) = events.first() {
                let id = event_identity(first);
                assert!(before.is_none_or(|b| id < b), "before {before:?} returned (epoch, seq) {id:?}");
            }
            if let Some(last) = events.last() {
                before = Some(event_identity(last));
            }
            all.extend(events);
            if !full {
                return all;
            }
        }
    }

    /// Polls [`Hub::all_events`] until `pred` holds; returns those events.
    pub fn wait_events(
        &self,
        device: &str,
        kind: Option<&str>,
        pred: impl Fn(&[Value]) -> bool,
        what: &str,
    ) -> Vec<Value> {
        let mut last = Vec::new();
        let found = wait_until_or(DEADLINE, || {
            let events = self.all_events(device, kind);
            if pred(&events) {
                return Some(events);
            }
            last = events;
            None
        });
        found.unwrap_or_else(|| {
            let shown: Vec<String> = last.iter().take(20).map(Value::to_string).collect();
            panic!(
                "timed out after {DEADLINE:?} waiting for {what} (device '{device}', kind {kind:?}); \
                 {} events, newest: {shown:#?}",
                last.len()
            )
        })
    }

    /// Opens `GET /api/stream` with the token.
    pub fn stream(&self) -> SseReader {
        let url = self.url("/api/stream");
        let response = http_agent(None)
            .get(&url)
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(response.status().as_u16(), 200, "GET /api/stream");
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(content_type.starts_with("text/event-stream"), "GET /api/stream content type: {content_type:?}");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let reader = BufReader::new(response.into_body().into_reader());
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if let Some(data) = line.strip_prefix("data:")
                    && tx.send(data.trim().to_string()).is_err()
                {
                    break;
                }
            }
        });
        SseReader { rx, seen: Vec::new() }
    }

    /// The `stored` and `duplicates` counts of every `collector stopped`
    /// line in the log (one per clean stop).
    pub fn collector_counts(&self) -> Vec<(u64, u64)> {
        self.log()
            .lines()
            .map(strip_ansi)
            .filter(|l| l.contains("collector stopped"))
            .map(|l| {
                let field = |name: &str| {
                    field_value(&l, name).unwrap_or_else(|| panic!("no {name}= in the hub's log line: {l}"))
                };
                (field("stored"), field("duplicates"))
            })
            .collect()
    }
}

impl HubBuilder {
    fn new(broker: Broker) -> HubBuilder {
        HubBuilder {
            broker,
            client_id: format!("hub-{}-{}", std::process::id(), unique()),
            shared_group: None,
            database_url: None,
            heartbeat_retention: "30d".into(),
            batch_wait: "50ms".into(),
            command_ttl: "30s".into(),
            command_wait: "5s".into(),
            web_extra: Vec::new(),
            tls_port: None,
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() || std::env::var_os("FIELDLINK_TEST_LOG").is_some() {
            self.print_log();
        }
    }
}

/// Polls `f` until it returns `Some` or `deadline` passes (then `None`).
fn wait_until_or<T>(deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// How many `Sending SUBACK to <client_id>` lines a mosquitto log holds.
fn subacks_in(log: &Path, client_id: &str) -> usize {
    let line = format!("Sending SUBACK to {client_id}");
    let text = fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    text.lines().filter(|l| l.trim_end().ends_with(&line)).count()
}

/// A log line without terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..=~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The number after ` <name>=` in a log line.
fn field_value(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    let digits: String = line[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The `seq` of an API event.
pub fn event_seq(event: &Value) -> u64 {
    event["seq"].as_u64().unwrap_or_else(|| panic!("no u64 seq in event {event}"))
}

/// The `(epoch, seq)` of an API event: its identity.
pub fn event_identity(event: &Value) -> (u64, u64) {
    let epoch = event["epoch"].as_u64().unwrap_or_else(|| panic!("no u64 epoch in event {event}"));
    (epoch, event_seq(event))
}

/// The seqs of API events, in the order given.
pub fn event_seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(event_seq).collect()
}

/// Asserts that `events` (newest first, as the API lists them) hold each
/// seq of `expected` exactly once and nothing else.
pub fn assert_each_seq_once(events: &[Value], expected: std::ops::RangeInclusive<u64>, what: &str) {
    let seqs = event_seqs(events);
    for pair in seqs.windows(2) {
        assert!(pair[0] > pair[1], "{what}: events not newest first: seq {} before seq {}", pair[0], pair[1]);
    }
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    let want: Vec<u64> = expected.clone().collect();
    if sorted != want {
        let have: std::collections::BTreeSet<u64> = sorted.iter().copied().collect();
        let missing: Vec<u64> = expected.clone().filter(|s| !have.contains(s)).take(20).collect();
        let extra: Vec<u64> = sorted.iter().copied().filter(|s| !expected.contains(s)).take(20).collect();
        let mut repeated: Vec<u64> = sorted.windows(2).filter(|p| p[0] == p[1]).map(|p| p[0]).collect();
        repeated.dedup();
        panic!(
            "{what}: expected each seq of {expected:?} exactly once; got {} events; \
             missing (first 20): {missing:?}; repeated: {repeated:?}; unexpected (first 20): {extra:?}",
            seqs.len()
        );
    }
}

// ---------------------------------------------------------------------------
// Live stream

/// The `data:` lines of an open `GET /api/stream`, read on a thread of
/// their own.
pub struct SseReader {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl SseReader {
    /// Waits for a `data:` JSON that `pred` accepts and returns it; panics
    /// with what arrived at the deadline or when the stream ends.
    pub fn wait_for(&mut self, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match self.rx.recv_timeout(left) {
                Ok(data) => {
                    let value: Value = serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("a data: line of /api/stream is not JSON ({e}): {data}"));
                    self.seen.push(data);
                    if pred(&value) {
                        return value;
                    }
                }
                Err(e) => panic!(
                    "no {what} on /api/stream ({}) after {:?}; data lines seen:\n{}",
                    match e {
                        mpsc::RecvTimeoutError::Timeout => "deadline",
                        mpsc::RecvTimeoutError::Disconnected => "the stream ended",
                    },
                    start.elapsed(),
                    self.seen.join("\n")
                ),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Databases

/// A database server on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// 127.0.0.1:3306, user root, no password.
    MariaDb,
    /// 127.0.0.1:5432, user postgres, trust.
    Postgres,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::MariaDb => "MariaDB",
            Server::Postgres => "PostgreSQL",
        }
    }

    fn address(self) -> &'static str {
        match self {
            Server::MariaDb => "127.0.0.1:3306",
            Server::Postgres => "127.0.0.1:5432",
        }
    }

    /// A database to run CREATE / DROP DATABASE from.
    fn admin_url(self) -> &'static str {
        match self {
            Server::MariaDb => "mysql://root@127.0.0.1:3306/mysql",
            Server::Postgres => "postgres://postgres@127.0.0.1:5432/postgres",
        }
    }
}

/// Runs a future to completion on a runtime of its own (the tests are
/// synchronous; sqlx is not).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime").block_on(f)
}

/// How long a server may take to answer before it counts as absent. Not an
/// assertion: a server that is slower only means the test is skipped.
const REACH: Duration = Duration::from_secs(5);

/// A fresh database on a local server, dropped when this goes out of scope.
/// Drop the hubs that use it first.
pub struct TestDb {
    server: Server,
    name: String,
    url: String,
}

impl TestDb {
    /// Creates `fieldlink_test_<random>`; `None` (after printing why) when
    /// the server cannot be reached, unless `FIELDLINK_REQUIRE_DATABASES=1`.
    pub fn create(server: Server) -> Option<TestDb> {
        sqlx::any::install_default_drivers();
        let name = format!("fieldlink_test_{}_{}_{:08x}", std::process::id(), unique(), fastrand::u32(..));
        let create = match server {
            Server::MariaDb => format!("CREATE DATABASE {name} CHARACTER SET utf8mb4"),
            Server::Postgres => format!("CREATE DATABASE {name}"),
        };
        let created: Result<(), String> = block_on(async {
            let mut admin = tokio::time::timeout(REACH, AnyConnection::connect(server.admin_url()))
                .await
                .map_err(|_| format!("no answer within {REACH:?}"))?
                .map_err(|e| e.to_string())?;
            admin.execute(AssertSqlSafe(create)).await.map_err(|e| format!("CREATE DATABASE failed: {e}"))?;
            // Done with it; the server ends the session either way.
            let _ = admin.close().await;
            Ok(())
        });
        if let Err(why) = created {
            let (what, at) = (server.name(), server.address());
            if std::env::var("FIELDLINK_REQUIRE_DATABASES").as_deref() == Ok("1") {
                panic!("no {what} at {at} ({why}), and FIELDLINK_REQUIRE_DATABASES=1 requires it");
            }
            eprintln!("skipping: no {what} at {at} ({why})");
            return None;
        }
        let base = server.admin_url().rsplit_once('/').map(|(b, _)| b).expect("admin urls have a path");
        Some(TestDb { server, url: format!("{base}/{name}"), name })
    }

    /// The `[database] url` for a hub.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let sql = match self.server {
            Server::MariaDb => format!("DROP DATABASE IF EXISTS {}", self.name),
            Server::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        };
        let dropped: Result<(), String> = block_on(async {
            let mut admin = AnyConnection::connect(self.server.admin_url()).await.map_err(|e| e.to_string())?;
            admin.execute(AssertSqlSafe(sql)).await.map_err(|e| e.to_string())?;
            // As above.
            let _ = admin.close().await;
            Ok(())
        });
        if let Err(e) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// The first column of the first row of `sql` (an integer, e.g. a COUNT)
/// in the database at `url` (sqlite://, mysql:// or postgres://).
pub fn query_i64(url: &str, sql: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let sql = sql.to_string();
    block_on(async {
        let mut conn = AnyConnection::connect(url).await.unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        let row = conn.fetch_one(AssertSqlSafe(sql.clone())).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let n: i64 = row.try_get(0).unwrap_or_else(|e| panic!("{sql}: not an integer: {e}"));
        // Done; the connection goes away with the runtime either way.
        let _ = conn.close().await;
        n
    })
}

/// A write lock on a SQLite database: another connection in `BEGIN
/// IMMEDIATE`, so the hub's commits wait (its `busy_timeout`, then its
/// retries) until [`DbLock::release`] or drop. Held on a thread of its own.
pub struct DbLock {
    release: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DbLock {
    /// Returns once the lock is held.
    pub fn sqlite(url: &str) -> DbLock {
        sqlx::any::install_default_drivers();
        let url = url.to_string();
        let (locked_tx, locked_rx) = mpsc::channel::<Result<(), String>>();
        let (release, release_rx) = mpsc::channel::<()>();
        let thread = thread::spawn(move || {
            block_on(async {
                let mut conn = match AnyConnection::connect(&url).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = locked_tx.send(Err(format!("connect to {url}: {e}")));
                        return;
                    }
                };
                if let Err(e) = conn.execute("BEGIN IMMEDIATE").await {
                    let _ = locked_tx.send(Err(format!("BEGIN IMMEDIATE: {e}")));
                    return;
                }
                let _ = locked_tx.send(Ok(()));
                // Nothing else runs on this runtime: blocking here is fine.
                let _ = release_rx.recv();
                if let Err(e) = conn.execute("ROLLBACK").await {
                    eprintln!("DbLock: ROLLBACK: {e}");
                }
                let _ = conn.close().await;
            })
        });
        match locked_rx.recv_timeout(DEADLINE) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("could not lock the database: {e}"),
            Err(e) => panic!("the database lock was not taken within {DEADLINE:?}: {e}"),
        }
        DbLock { release: Some(release), thread: Some(thread) }
    }

    /// Rolls the lock's transaction back and closes its connection.
    pub fn release(&mut self) {
        drop(self.release.take());
        if let Some(t) = self.thread.take() {
            t.join().expect("the lock thread panicked");
        }
    }
}

impl Drop for DbLock {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Fake agent

#[derive(Default)]
struct FakeShared {
    connacks: AtomicUsize,
    acks: AtomicUsize,
    stop: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// An MQTT client straight to the broker that publishes what an agent
/// would (QoS 1), with whatever seqs, timestamps and repetitions a test
/// asks for. Payloads depend only on (device, seq, ts), so a repeated seq
/// is a byte-for-byte duplicate, as on the wire.
pub struct FakeAgent {
    device: String,
    client: Client,
    shared: Arc<FakeShared>,
    published: usize,
    /// The `ts` of seq 0; seq `s` happened `s` milliseconds later.
    time_base: SystemTime,
    /// The `epoch` its payloads carry; `None`: none (an agent from before
    /// epochs, which the hub counts as epoch 0).
    epoch: Option<u64>,
}

impl FakeAgent {
    /// Connects (clean session, client id `fake-<device>`) and returns once
    /// the broker accepted the connection.
    pub fn connect(broker_port: u16, device: &str) -> FakeAgent {
        FakeAgent::connect_with(broker_port, device, None)
    }

    /// [`FakeAgent::connect`] as the provisioned device `device` (client id
    /// = user name = device id), as the embedded broker requires.
    pub fn connect_as(broker_port: u16, device: &str, password: &str) -> FakeAgent {
        FakeAgent::connect_with(broker_port, device, Some(password))
    }

    fn connect_with(broker_port: u16, device: &str, password: Option<&str>) -> FakeAgent {
        let client_id = if password.is_some() { device.to_string() } else { format!("fake-{device}") };
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", broker_port);
        opts.set_keep_alive(Duration::from_secs(5)).set_clean_session(true);
        if let Some(password) = password {
            opts.set_credentials(device, password);
        }
        let (client, mut conn) = Client::new(opts, 100);
        let shared = Arc::new(FakeShared::default());
        let sh = Arc::clone(&shared);
        thread::spawn(move || {
            for event in conn.iter() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        sh.connacks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        sh.acks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        *sh.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        // The next poll reconnects; don't spin meanwhile.
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        let fake = FakeAgent {
            device: device.to_string(),
            client,
            shared,
            published: 0,
            time_base: SystemTime::now() - Duration::from_secs(3600),
            epoch: None,
        };
        wait_until(DEADLINE, &format!("fake agent '{device}' to connect ({:?})", fake.last_error()), || {
            (fake.shared.connacks.load(Ordering::SeqCst) > 0).then_some(())
        });
        fake
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Publishes `payload` on `topic` at QoS 1 (not retained); see
    /// [`FakeAgent::wait_acked`].
    pub fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).expect("queue a publish");
        self.published += 1;
    }

    /// From now on its payloads carry this `epoch`, as an agent's do after
    /// its seq counter was lost and restarted.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = Some(epoch);
    }

    /// The envelope of a message: device, epoch (if set), seq, ts.
    fn envelope(&self, seq: u64, ts: SystemTime) -> serde_json::Map<String, Value> {
        let mut env = serde_json::Map::new();
        env.insert("device".into(), json!(self.device));
        if let Some(e) = self.epoch {
            env.insert("epoch".into(), json!(e));
        }
        env.insert("seq".into(), json!(seq));
        env.insert("ts".into(), json!(rfc3339(ts)));
        env
    }

    /// The envelope with `body`'s fields after it, as JSON text.
    fn payload(&self, seq: u64, ts: SystemTime, body: Value) -> String {
        let mut env = self.envelope(seq, ts);
        if let Value::Object(fields) = body {
            env.extend(fields);
        }
        Value::Object(env).to_string()
    }

    /// The button message with this seq (door, pressed on odd seqs and
    /// released on even ones), timestamped `seq` ms after the fake's time base.
    pub fn button(&mut self, seq: u64) {
        let ts = self.time_base + Duration::from_millis(seq);
        self.button_at(seq, ts);
    }

    /// A retained-style relay state message of relay `pump` (published not
    /// retained: the hub does not care), cause `command`.
    pub fn pump_state(&mut self, seq: u64, state: &str) {
        let ts = self.time_base + Duration::from_millis(seq);
        let body = json!({"relay": "pump", "state": state, "cause": "command", "command_id": null});
        let payload = self.payload(seq, ts, body);
        self.publish(&topic(&self.device, "relay/pump/state"), payload);
    }

    /// Each of `seqs`, in order; a seq listed twice is published twice.
    pub fn buttons(&mut self, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            self.button(seq);
        }
    }

    /// A button message with an explicit `ts`.
    pub fn button_at(&mut self, seq: u64, ts: SystemTime) {
        let state = if seq % 2 == 1 { "pressed" } else { "released" };
        let payload = self.payload(seq, ts, json!({"button": "door", "state": state}));
        let t = topic(&self.device, "button/door");
        self.publish(&t, payload);
    }

    /// A heartbeat message (every field DESIGN lists) with this `ts`.
    pub fn heartbeat(&mut self, seq: u64, ts: SystemTime) {
        let body = json!({
            "uptime_s": 100 + seq, "cpu_percent": 12.5, "load_1m": 0.25,
            "mem_used_bytes": 100_000_000u64, "mem_total_bytes": 1_000_000_000u64,
            "disk_free_bytes": 5_000_000_000u64, "disk_total_bytes": 16_000_000_000u64,
            "temp_c": 48.2, "outbox": {"depth": 0, "bytes": 0, "dropped": 0},
            "link": {"connects": 1, "disconnects": 0}, "version": super::VERSION,
        });
        let payload = self.payload(seq, ts, body);
        let t = topic(&self.device, "heartbeat");
        self.publish(&t, payload);
    }

    /// Waits until the broker acknowledged everything published so far.
    pub fn wait_acked(&self) {
        let want = self.published;
        let what = format!("the broker to acknowledge {want} publishes of fake agent '{}'", self.device);
        wait_until(DEADLINE, &what, || (self.shared.acks.load(Ordering::SeqCst) >= want).then_some(()));
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The event thread exits on its next event; a full channel or a dead
        // connection only delays that.
        let _ = self.client.try_disconnect();
    }
}

/// `seqs` in order, with every `every`-th seq published twice in a row.
pub fn with_duplicates(seqs: std::ops::RangeInclusive<u64>, every: u64) -> Vec<u64> {
    seqs.flat_map(|s| if s % every == 0 { vec![s, s] } else { vec![s] }).collect()
}

/// RFC 3339 UTC with milliseconds, as agents write `ts`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A device id unique to this test process.
pub fn unique_device(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), unique())
}
