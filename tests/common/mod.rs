//! The shared harness of the black-box tests: it runs the real `fieldlink`
//! binary as a child process against a real mosquitto, all on 127.0.0.1.
//!
//! * [`Mosquitto`]: a broker on a free port with its own conf, log and
//!   persistence directory; `stop` (SIGTERM: it saves its db), `kill`
//!   (SIGKILL), `restart` on the same port. Tests skip (or, with
//!   `FIELDLINK_REQUIRE_MOSQUITTO=1`, fail) when mosquitto is not installed:
//!   see [`require_mosquitto`].
//! * [`Proxy`] (`proxy.rs`): a TCP proxy in front of the broker. The agent
//!   connects through it, so `cut` takes its link down (every connection
//!   closed, new ones closed at once) without touching the broker; `heal`
//!   restores it. It also adds latency, flaps, blackholes, and drops or
//!   severs on chosen MQTT packets.
//! * [`wire::Wire`] (`wire.rs`): a raw MQTT 3.1.1 connection that sends
//!   exactly the packets a test chooses (QoS 2 ids, DUP, PUBREL).
//! * [`SimSocket`] (`sim.rs`): one open connection to an agent's simulated
//!   GPIO socket, for bursts of edges faster than `fieldlink sim` runs.
//! * [`Watcher`]: an MQTT client connected directly to the broker, subscribed
//!   at QoS 1 to `fieldlink/<device>/#`, recording every message it gets. It
//!   survives broker restarts (it re-subscribes after every ConnAck).
//! * [`Agent`]: one agent with its own temp dir (config, `state_dir`, log),
//!   simulated GPIO, a button `door` on pin 17 and a relay `pump` on pin 27.
//!   Its log is printed when a test fails.
//! * [`Rig`]: broker + proxy + watcher + agent for one test, torn down in that
//!   order's reverse.
//! * [`hub`]: the hub side (a `fieldlink hub` child process, its HTTP API,
//!   test databases on MariaDB/PostgreSQL, and a fake agent publisher).
//! * Payload helpers: [`records`], [`first_occurrences`],
//!   [`assert_strictly_increasing`], [`assert_seqs_not_reused`],
//!   [`button_events`], [`check_envelope`].
//!
//! Set `FIELDLINK_TEST_LOG=1` to see every agent's log, not only a failed
//! test's (with `--nocapture`).
//!
//! Every wait polls against a generous deadline and panics with what it was
//! waiting for and what it saw; nothing asserts on how long something took.

#![allow(dead_code)]

pub mod hub;
pub mod proxy;
pub mod sim;
pub mod tmpfs;
pub mod wire;

#[allow(unused_imports)]
pub use proxy::{Dir, Proxy, Verdict};
pub use sim::SimSocket;

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rumqttc::{Client, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tempfile::TempDir;

/// How long a wait for something that should happen soon may take before the
/// test gives up. Generous: CI machines are slow and share two cores.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How long a client command (`fieldlink status`, `fieldlink sim`) may run.
const CLI_DEADLINE: Duration = Duration::from_secs(30);

/// How often waits poll.
const POLL: Duration = Duration::from_millis(50);

/// Pause after each simulated button edge: many times the 10 ms debounce the
/// harness configures, so two edges are never merged into one.
const EDGE_PACE: Duration = Duration::from_millis(100);

/// The pins of the harness config.
pub const DOOR_PIN: &str = "17";
pub const PUMP_PIN: &str = "27";

/// The crate version, as heartbeats and the status dump report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The binary under test.
pub fn fieldlink_bin() -> &'static str {
    env!("CARGO_BIN_EXE_fieldlink")
}

/// Serializes the tests of one test binary that start brokers and agents, so
/// the suite stays light on a two-core machine. A test that panicked poisons
/// the lock; the next one carries on regardless.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub fn wait_until<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        thread::sleep(POLL);
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("a bound listener has an address").port()
}

/// `fieldlink/<device>/<rest>`.
pub fn topic(device: &str, rest: &str) -> String {
    format!("fieldlink/{device}/{rest}")
}

/// The broker's answer to a CONNECT as `user` (client id = user name, as
/// for a provisioned device): `Ok` when accepted, else the refusal.
pub fn connack(port: u16, user: &str, password: &str) -> Result<(), String> {
    let mut opts = MqttOptions::new(user, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5)).set_credentials(user, password);
    let (_client, mut conn) = Client::new(opts, 10);
    for event in conn.iter() {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(a))) if a.code == ConnectReturnCode::Success => return Ok(()),
            Ok(Event::Incoming(Packet::ConnAck(a))) => return Err(format!("{:?}", a.code)),
            Err(e) => return Err(e.to_string()),
            Ok(_) => {}
        }
    }
    Err("no answer".into())
}

/// A unique suffix for device and client ids within this process.
pub fn unique() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn is_root() -> bool {
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// The last `n` lines of a file, for failure reports.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn send_signal(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"));
    // The child may have exited on its own a moment ago; a failed signal then
    // shows up in whatever the test waits for next.
    let _ = kill(pid, signal);
}

/// An exit status as a number: the code, or 128 + signal like a shell.
pub fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs a command to completion, killing it if it outlives `deadline`.
pub fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // The receiver waits for this; if it gave up, nobody needs the result.
        let _ = tx.send(child.wait_with_output());
    });
    let result = match rx.recv_timeout(deadline) {
        Ok(r) => r,
        Err(_) => {
            send_signal(pid, Signal::SIGKILL);
            let out = rx.recv().expect("the waiting thread reports once the child is killed");
            panic!("{cmd:?} did not finish within {deadline:?}; output so far: {out:?}");
        }
    };
    result.unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"))
}

/// `fieldlink <args>`, run to completion (no broker needed).
pub fn fieldlink(args: &[&str]) -> Output {
    let mut cmd = Command::new(fieldlink_bin());
    cmd.args(args).env("RUST_LOG", "debug").env_remove("FIELDLINK_MQTT_PASSWORD");
    run_with_deadline(cmd, CLI_DEADLINE)
}

// ---------------------------------------------------------------------------
// Mosquitto

/// Where mosquitto is installed, or `None`.
pub fn mosquitto_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Debian installs the broker in /usr/sbin, which a non-root PATH lacks.
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("mosquitto"))
        .find(|p| p.is_file())
}

/// Starts a broker, or returns `None` (after saying so) when mosquitto is
/// not installed. With `FIELDLINK_REQUIRE_MOSQUITTO=1` a missing mosquitto is
/// a failure instead, so CI cannot pass by skipping everything.
pub fn require_mosquitto(persistence: bool) -> Option<Mosquitto> {
    match mosquitto_path() {
        Some(bin) => Some(Mosquitto::start(bin, persistence)),
        None if std::env::var("FIELDLINK_REQUIRE_MOSQUITTO").as_deref() == Ok("1") => {
            panic!("mosquitto is not installed (FIELDLINK_REQUIRE_MOSQUITTO=1)")
        }
        None => {
            eprintln!("skipping: mosquitto is not installed");
            None
        }
    }
}

/// A mosquitto broker on 127.0.0.1 with its conf, log and db in a temp dir.
pub struct Mosquitto {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    /// Writes the conf and starts the broker; returns once its port accepts.
    pub fn start(bin: PathBuf, persistence: bool) -> Mosquitto {
        Mosquitto::start_with(bin, persistence, "allow_anonymous true\n")
    }

    /// [`Mosquitto::start`] with `auth` (e.g. `allow_anonymous false`,
    /// `password_file ...`, `acl_file ...`) in the conf instead of
    /// `allow_anonymous true`.
    pub fn start_with(bin: PathBuf, persistence: bool, auth: &str) -> Mosquitto {
        let dir = tempfile::Builder::new().prefix("fieldlink-mosquitto-").tempdir().expect("create a temp dir");
        let port = free_port();
        let d = dir.path().display();
        let mut conf = format!(
            "listener {port} 127.0.0.1\n\
             {auth}\
             persistence {persistence}\n\
             persistence_location {d}/\n\
             log_dest file {d}/mosquitto.log\n\
             log_type all\n\
             max_queued_messages 100000\n"
        );
        if is_root() {
            // Run as root, mosquitto drops to the `mosquitto` user, which
            // cannot write into our temp dir.
            conf.push_str("user root\n");
        }
        fs::write(dir.path().join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        let mut broker = Mosquitto { bin, dir, port, child: None };
        broker.spawn();
        broker
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running broker's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    /// The broker's log so far (`log_type all`: every packet it received).
    pub fn log(&self) -> String {
        fs::read(self.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "mosquitto is already running");
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.stderr"))
            .expect("open mosquitto.stderr");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
        let port = self.port;
        let (log, stderr) = (self.log_path(), self.dir.path().join("mosquitto.stderr"));
        let child = self.child.as_mut().expect("spawned just above");
        wait_until(Duration::from_secs(30), "mosquitto to accept connections", || {
            if let Some(status) = child.try_wait().ok().flatten() {
                panic!(
                    "mosquitto exited with {status} before accepting connections on port {port}:\n{}\n{}",
                    tail(&log, 30),
                    tail(&stderr, 30)
                );
            }
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
    }

    /// SIGTERM and wait: a persistent broker saves its db on the way out.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), Signal::SIGTERM);
            child.wait().expect("wait for mosquitto");
        }
    }

    /// SIGKILL and wait: nothing is saved.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // It may have exited already; wait() below reaps it either way.
            let _ = child.kill();
            child.wait().expect("wait for mosquitto");
        }
    }

    /// Stops the broker (if running) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The retained message on `topic` as a fresh subscriber sees it, or
    /// `None` when there is none.
    pub fn retained(&self, topic: &str) -> Option<Vec<u8>> {
        let mut opts =
            MqttOptions::new(format!("retained-probe-{}-{}", std::process::id(), unique()), "127.0.0.1", self.port);
        opts.set_keep_alive(Duration::from_secs(5)).set_clean_session(true);
        let (client, mut conn) = Client::new(opts, 10);
        let start = Instant::now();
        let mut subscribed_at: Option<Instant> = None;
        let mut found = None;
        while start.elapsed() < Duration::from_secs(30) {
            if subscribed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
                break;
            }
            match conn.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    client.try_subscribe(topic, QoS::AtLeastOnce).expect("queue a subscribe");
                }
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subscribed_at = Some(Instant::now()),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.retain && p.topic == topic => {
                    found = Some(p.payload.to_vec());
                    break;
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => thread::sleep(Duration::from_millis(100)),
            }
        }
        // Best effort: the probe is gone either way once `conn` drops.
        let _ = client.try_disconnect();
        found
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("---- mosquitto log (last 60 lines) ----\n{}", tail(&self.log_path(), 60));
        }
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// Watcher

/// One message a [`Watcher`] received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.payload).ok()
    }
}

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.text();
        let short: String = text.chars().take(300).collect();
        write!(f, "{}{} {}", self.topic, if self.retain { " (retained)" } else { "" }, short)
    }
}

/// Renders messages one per line for failure reports.
pub fn show(msgs: &[Msg]) -> String {
    msgs.iter().enumerate().map(|(i, m)| format!("  #{i} {m}\n")).collect()
}

#[derive(Default)]
struct WatchShared {
    msgs: Mutex<Vec<Msg>>,
    connected: AtomicBool,
    connacks: AtomicUsize,
    subacks: AtomicUsize,
    acks: AtomicUsize,
    stop: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// An MQTT client straight to the broker (persistent session, own client id)
/// that records everything published under one filter.
pub struct Watcher {
    client: Client,
    shared: Arc<WatchShared>,
    filter: String,
}

impl Watcher {
    /// Watches `fieldlink/<device>/#` on the broker at `port`.
    pub fn for_device(port: u16, device: &str) -> Watcher {
        Watcher::connect(port, &format!("watcher-{device}"), &topic(device, "#"))
    }

    /// Connects, subscribes at QoS 1 to `filter`, and returns once the first
    /// subscription is acknowledged.
    pub fn connect(port: u16, client_id: &str, filter: &str) -> Watcher {
        Watcher::connect_with(port, client_id, filter, None)
    }

    /// [`Watcher::connect`] as an MQTT user (client id = user name).
    pub fn connect_as(port: u16, user: &str, password: &str, filter: &str) -> Watcher {
        Watcher::connect_with(port, user, filter, Some((user, password)))
    }

    /// [`Watcher::connect`] as an MQTT user with a client id of its own
    /// (the embedded broker's hub user may use any id but a device's).
    pub fn connect_as_with_id(port: u16, client_id: &str, user: &str, password: &str, filter: &str) -> Watcher {
        Watcher::connect_with(port, client_id, filter, Some((user, password)))
    }

    fn connect_with(port: u16, client_id: &str, filter: &str, credentials: Option<(&str, &str)>) -> Watcher {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5)).set_clean_session(false);
        if let Some((user, password)) = credentials {
            opts.set_credentials(user, password);
        }
        let (client, mut conn) = Client::new(opts, 1000);
        let shared = Arc::new(WatchShared::default());
        let (sh, cl, fl) = (Arc::clone(&shared), client.clone(), filter.to_string());
        thread::spawn(move || {
            for event in conn.iter() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        sh.connected.store(true, Ordering::SeqCst);
                        sh.connacks.fetch_add(1, Ordering::SeqCst);
                        // Whether or not the broker kept our session (a
                        // restart without persistence loses it), subscribe.
                        if let Err(e) = cl.try_subscribe(fl.clone(), QoS::AtLeastOnce) {
                            *sh.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("subscribe: {e}"));
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        sh.subacks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let msg = Msg { topic: p.topic.clone(), payload: p.payload.to_vec(), retain: p.retain };
                        sh.msgs.lock().unwrap_or_else(|p| p.into_inner()).push(msg);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => {
                        sh.acks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        sh.connected.store(false, Ordering::SeqCst);
                        *sh.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        // The next poll reconnects; don't spin while the broker is down.
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        let watcher = Watcher { client, shared, filter: filter.to_string() };
        watcher.wait_subscribed_after(0);
        watcher
    }

    pub fn filter(&self) -> &str {
        &self.filter
    }

    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    /// How many subscriptions the broker acknowledged so far (one per connect).
    pub fn subacks(&self) -> usize {
        self.shared.subacks.load(Ordering::SeqCst)
    }

    pub fn connacks(&self) -> usize {
        self.shared.connacks.load(Ordering::SeqCst)
    }

    /// Waits until more than `n` subscriptions have been acknowledged: after
    /// a broker restart, pass the count from before it.
    pub fn wait_subscribed_after(&self, n: usize) {
        wait_until(
            DEADLINE,
            &format!("watcher '{}' to (re)subscribe (last error: {:?})", self.filter, self.last_error()),
            || (self.subacks() > n).then_some(()),
        );
    }

    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Everything received so far, in arrival order.
    pub fn messages(&self) -> Vec<Msg> {
        self.shared.msgs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many messages have arrived: a mark for [`Watcher::wait_for_since`].
    pub fn len(&self) -> usize {
        self.shared.msgs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Polls until `pred` holds for everything received so far and returns
    /// it; panics with `what` and the messages seen at the deadline.
    pub fn wait_for(&self, pred: impl Fn(&[Msg]) -> bool, deadline: Duration, what: &str) -> Vec<Msg> {
        self.wait_for_since(0, pred, deadline, what)
    }

    /// Like [`Watcher::wait_for`] over the messages from index `mark` on.
    pub fn wait_for_since(
        &self,
        mark: usize,
        pred: impl Fn(&[Msg]) -> bool,
        deadline: Duration,
        what: &str,
    ) -> Vec<Msg> {
        let start = Instant::now();
        loop {
            let msgs = self.messages();
            let since = &msgs[mark.min(msgs.len())..];
            if pred(since) {
                return since.to_vec();
            }
            if start.elapsed() > deadline {
                panic!(
                    "timed out after {deadline:?} waiting for {what}\nwatcher connected: {}, last error: {:?}\nmessages since #{mark}:\n{}",
                    self.connected(),
                    self.last_error(),
                    show(since)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Publishes and, for QoS 1 and 2, waits until the broker acknowledged it.
    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: u8, retain: bool) {
        let qos = match qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let before = self.shared.acks.load(Ordering::SeqCst);
        self.client.publish(topic, qos, retain, payload).expect("queue a publish");
        if qos != QoS::AtMostOnce {
            wait_until(DEADLINE, &format!("the broker to acknowledge a publish on {topic}"), || {
                (self.shared.acks.load(Ordering::SeqCst) > before).then_some(())
            });
        }
    }

    /// Publishes every payload on `topic` at QoS 1, all queued at once, and
    /// waits until the broker acknowledged them all (faster than one
    /// [`Watcher::publish`] after the other).
    pub fn publish_all(&self, topic: &str, payloads: impl IntoIterator<Item = Vec<u8>>) {
        let before = self.shared.acks.load(Ordering::SeqCst);
        let mut n = 0;
        for payload in payloads {
            self.client.publish(topic, QoS::AtLeastOnce, false, payload).expect("queue a publish");
            n += 1;
        }
        wait_until(DEADLINE, &format!("the broker to acknowledge {n} publishes on {topic}"), || {
            (self.shared.acks.load(Ordering::SeqCst) >= before + n).then_some(())
        });
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // The event thread exits on its next event; a full channel or a dead
        // connection only delays that.
        let _ = self.client.try_disconnect();
    }
}

// ---------------------------------------------------------------------------
// Payload helpers

/// The `seq` of a record payload.
pub fn seq(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap_or_else(|| panic!("no u64 seq in {v}"))
}

/// A record's identity and order, `(epoch, seq)` (DESIGN: Topics and
/// payloads); a payload without `epoch` counts as epoch 0.
pub fn identity(v: &Value) -> (u64, u64) {
    (v["epoch"].as_u64().unwrap_or(0), seq(v))
}

/// Every outbox record (JSON with a `seq`) among `msgs`, in arrival order,
/// with its topic; duplicates included.
pub fn records(msgs: &[Msg]) -> Vec<(String, Value)> {
    msgs.iter().filter_map(|m| m.json().filter(|v| v.get("seq").is_some()).map(|v| (m.topic.clone(), v))).collect()
}

/// Drops every record whose `seq` was seen before: the first occurrences, in
/// arrival order.
pub fn first_occurrences(recs: &[(String, Value)]) -> Vec<(String, Value)> {
    let mut seen = std::collections::HashSet::new();
    recs.iter().filter(|(_, v)| seen.insert(identity(v))).cloned().collect()
}

/// Asserts that the records are in strictly increasing `(epoch, seq)`
/// order as given.
pub fn assert_strictly_increasing(recs: &[(String, Value)], what: &str) {
    for pair in recs.windows(2) {
        assert!(
            identity(&pair[0].1) < identity(&pair[1].1),
            "{what}: (epoch, seq) {:?} arrived before {:?} but is not smaller:\n  {} {}\n  {} {}",
            identity(&pair[0].1),
            identity(&pair[1].1),
            pair[0].0,
            pair[0].1,
            pair[1].0,
            pair[1].1
        );
    }
}

/// Asserts that every occurrence of a seq carries the same payload: a seq
/// never names two different records.
pub fn assert_seqs_not_reused(recs: &[(String, Value)]) {
    let mut by_seq: std::collections::HashMap<u64, &(String, Value)> = std::collections::HashMap::new();
    for rec in recs {
        if let Some(first) = by_seq.insert(seq(&rec.1), rec) {
            assert_eq!(first, rec, "seq {} names two different records", seq(&rec.1));
        }
    }
}

/// The distinct (first-occurrence) messages of one button, in arrival order.
pub fn button_events(msgs: &[Msg], device: &str, button: &str) -> Vec<Value> {
    let t = topic(device, &format!("button/{button}"));
    first_occurrences(&records(msgs)).into_iter().filter(|(tp, _)| *tp == t).map(|(_, v)| v).collect()
}

/// The distinct relay state messages of one relay, in arrival order.
pub fn relay_states(msgs: &[Msg], device: &str, relay: &str) -> Vec<Value> {
    let t = topic(device, &format!("relay/{relay}/state"));
    first_occurrences(&records(msgs)).into_iter().filter(|(tp, _)| *tp == t).map(|(_, v)| v).collect()
}

/// The distinct error messages, in arrival order.
pub fn errors(msgs: &[Msg], device: &str) -> Vec<Value> {
    let t = topic(device, "error");
    first_occurrences(&records(msgs)).into_iter().filter(|(tp, _)| *tp == t).map(|(_, v)| v).collect()
}

/// Whether `msgs` holds a `status` message with this payload.
pub fn has_status(msgs: &[Msg], device: &str, payload: &[u8]) -> bool {
    let t = topic(device, "status");
    msgs.iter().any(|m| m.topic == t && m.payload == payload)
}

/// Checks the envelope every device-to-cloud record carries: `device`, a u64
/// `seq`, and `ts` in RFC 3339 UTC with milliseconds.
pub fn check_envelope(v: &Value, device: &str) {
    assert_eq!(v["device"], device, "device of {v}");
    assert!(v["seq"].is_u64(), "seq of {v} is not a u64");
    let ts = v["ts"].as_str().unwrap_or_else(|| panic!("ts of {v} is not a string"));
    let millis = ts.strip_suffix('Z').and_then(|s| s.rsplit_once('.')).map(|(_, frac)| frac);
    assert!(
        millis.is_some_and(|f| f.len() == 3 && f.chars().all(|c| c.is_ascii_digit())),
        "ts '{ts}' is not RFC 3339 UTC with milliseconds"
    );
    assert!(humantime::parse_rfc3339(ts).is_ok(), "ts '{ts}' does not parse as RFC 3339");
}

/// Asserts that `events` are exactly `n` press/release pairs of `button`:
/// alternating pressed/released starting with pressed, seqs strictly
/// increasing.
pub fn assert_press_release_pairs(events: &[Value], device: &str, button: &str, n: usize) {
    let states: Vec<&str> = events.iter().map(|v| v["state"].as_str().unwrap_or("?")).collect();
    assert_eq!(events.len(), 2 * n, "expected {n} press/release pairs, got states {states:?}");
    for (i, v) in events.iter().enumerate() {
        check_envelope(v, device);
        assert_eq!(v["button"], button, "button of {v}");
        let want = if i % 2 == 0 { "pressed" } else { "released" };
        assert_eq!(v["state"], want, "event #{i} should be {want}; states in arrival order: {states:?}");
    }
    for pair in events.windows(2) {
        assert!(seq(&pair[0]) < seq(&pair[1]), "button seqs out of order: {} then {}", pair[0], pair[1]);
    }
}

/// An RFC 3339 timestamp `offset` away from now (negative: in the past).
pub fn rfc3339_from_now(offset_secs: i64) -> String {
    let now = std::time::SystemTime::now();
    let t = if offset_secs >= 0 {
        now + Duration::from_secs(offset_secs.unsigned_abs())
    } else {
        now - Duration::from_secs(offset_secs.unsigned_abs())
    };
    humantime::format_rfc3339_millis(t).to_string()
}

// ---------------------------------------------------------------------------
// Agent

/// How to configure an [`Agent`]; every knob has the harness default.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    device: String,
    broker_port: u16,
    durability: String,
    flush_interval: String,
    power_on_state: String,
    heartbeat_interval: String,
    max_restarts: u32,
    window: String,
    backoff_max: String,
    mqtt_extra: Vec<String>,
    outbox_extra: Vec<String>,
    door_debounce: String,
    door_qos: u8,
    pump_extra: Vec<String>,
    extra: String,
    keep_alive: String,
    reconnect_min: String,
    reconnect_max: String,
    confirm: String,
    confirm_timeout: String,
    /// MQTT password of a provisioned device (see [`AgentBuilder::credentials`]).
    password: Option<String>,
}

impl AgentBuilder {
    /// `[outbox] confirm`: "broker" (the harness default: most agent tests
    /// talk to a plain mosquitto with no hub) or "hub" (the product default),
    /// and `confirm_timeout` (default "1s").
    pub fn confirm(mut self, mode: &str, timeout: &str) -> Self {
        self.confirm = mode.to_string();
        self.confirm_timeout = timeout.to_string();
        self
    }

    /// The device id the agent will have.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Connects as a provisioned device: client id and user name = the
    /// device id, `password` in a mode-0600 file beside the config (what
    /// `fieldlink hub device add` tells an operator to write).
    pub fn credentials(mut self, password: &str) -> Self {
        self.password = Some(password.to_string());
        self
    }

    /// `durability`: "always" or "batch" (default).
    pub fn durability(mut self, d: &str) -> Self {
        self.durability = d.to_string();
        self
    }

    /// Batch mode's `flush_interval` (default "100ms").
    pub fn flush_interval(mut self, d: &str) -> Self {
        self.flush_interval = d.to_string();
        self
    }

    /// The pump's `power_on_state`: "off" (default), "on" or "last".
    pub fn power_on_state(mut self, s: &str) -> Self {
        self.power_on_state = s.to_string();
        self
    }

    /// `[heartbeat] interval` (default "1h", so heartbeats don't clutter).
    pub fn heartbeat_interval(mut self, d: &str) -> Self {
        self.heartbeat_interval = d.to_string();
        self
    }

    /// `[supervisor]` (defaults: 100 restarts per "60s", back-off up to "500ms").
    pub fn supervisor(mut self, max_restarts: u32, window: &str, backoff_max: &str) -> Self {
        self.max_restarts = max_restarts;
        self.window = window.to_string();
        self.backoff_max = backoff_max.to_string();
        self
    }

    /// `[mqtt] keep_alive` (default "5s").
    pub fn keep_alive(mut self, d: &str) -> Self {
        self.keep_alive = d.to_string();
        self
    }

    /// `[mqtt] reconnect_min` and `reconnect_max` (defaults "100ms", "1s").
    pub fn reconnect(mut self, min: &str, max: &str) -> Self {
        self.reconnect_min = min.to_string();
        self.reconnect_max = max.to_string();
        self
    }

    /// A line added to `[mqtt]`, e.g. `username = "pi"`.
    pub fn mqtt_line(mut self, line: &str) -> Self {
        self.mqtt_extra.push(line.to_string());
        self
    }

    /// A line added to `[outbox]`, e.g. `max_bytes = 65536`.
    pub fn outbox_line(mut self, line: &str) -> Self {
        self.outbox_extra.push(line.to_string());
        self
    }

    /// The door button's `debounce` (default "10ms"; "0ms": every `sim set`
    /// that changes the level is an edge at once, however fast they come).
    pub fn door_debounce(mut self, d: &str) -> Self {
        self.door_debounce = d.to_string();
        self
    }

    /// The door button's `qos` (default 1).
    pub fn door_qos(mut self, qos: u8) -> Self {
        self.door_qos = qos;
        self
    }

    /// A line added to the pump's `[[relay]]`, e.g. `failsafe_after = "1s"`.
    pub fn pump_line(mut self, line: &str) -> Self {
        self.pump_extra.push(line.to_string());
        self
    }

    /// TOML appended at the end of the file; start it with a table header.
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// The config file text for `state_dir`.
    pub fn render(&self, state_dir: &Path) -> String {
        format!(
            r#"# written by tests/common/mod.rs
device_id = "{device}"
state_dir = "{state_dir}"

[mqtt]
url = "mqtt://127.0.0.1:{port}"
keep_alive = "{keep_alive}"
reconnect_min = "{reconnect_min}"
reconnect_max = "{reconnect_max}"
{mqtt_extra}

[outbox]
durability = "{durability}"
flush_interval = "{flush}"
confirm = "{confirm}"
confirm_timeout = "{confirm_timeout}"
{outbox_extra}

[gpio]
backend = "sim"

[[button]]
name = "door"
pin = 17
pull = "up"
active_low = true
debounce = "{door_debounce}"
qos = {door_qos}

[[relay]]
name = "pump"
pin = 27
active_low = false
power_on_state = "{pos}"
qos = 1
{pump_extra}

[heartbeat]
interval = "{hb}"
qos = 1

[supervisor]
max_restarts = {max_restarts}
window = "{window}"
backoff_max = "{backoff_max}"

{extra}"#,
            device = self.device,
            state_dir = state_dir.display(),
            port = self.broker_port,
            mqtt_extra = self.mqtt_extra.join("\n"),
            outbox_extra = self.outbox_extra.join("\n"),
            door_debounce = self.door_debounce,
            door_qos = self.door_qos,
            pump_extra = self.pump_extra.join("\n"),
            durability = self.durability,
            flush = self.flush_interval,
            pos = self.power_on_state,
            hb = self.heartbeat_interval,
            max_restarts = self.max_restarts,
            window = self.window,
            backoff_max = self.backoff_max,
            extra = self.extra,
            keep_alive = self.keep_alive,
            reconnect_min = self.reconnect_min,
            reconnect_max = self.reconnect_max,
            confirm = self.confirm,
            confirm_timeout = self.confirm_timeout,
        )
    }

    /// Writes the config into a fresh temp dir. The agent is not started and
    /// `state_dir` is not created: that is the agent's job.
    pub fn build(self) -> Agent {
        let dir = tempfile::Builder::new().prefix("fieldlink-agent-").tempdir().expect("create a temp dir");
        let state_dir = dir.path().join("state");
        let cfg_path = dir.path().join("agent.toml");
        let mut b = self;
        // The agent's client id: its default, or the device id when it
        // connects as a provisioned device.
        let mut client_id = format!("fieldlink-{}", b.device);
        if let Some(password) = b.password.take() {
            use std::os::unix::fs::PermissionsExt;
            let pass = dir.path().join("mqtt.pass");
            fs::write(&pass, format!("{password}\n")).expect("write mqtt.pass");
            fs::set_permissions(&pass, fs::Permissions::from_mode(0o600)).expect("chmod mqtt.pass");
            let device = &b.device;
            b.mqtt_extra.push(format!(
                "client_id = \"{device}\"\nusername = \"{device}\"\npassword_file = \"{}\"",
                pass.display()
            ));
            client_id = device.clone();
        }
        fs::write(&cfg_path, b.render(&state_dir)).expect("write agent.toml");
        Agent {
            client_id,
            log_path: dir.path().join("agent.log"),
            dir,
            device: b.device,
            cfg_path,
            state_dir,
            child: None,
            starts: 0,
        }
    }
}

/// One `fieldlink agent` child process and its files.
pub struct Agent {
    dir: TempDir,
    device: String,
    client_id: String,
    cfg_path: PathBuf,
    state_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Agent {
    /// A config for a device named after `name` (made unique), talking to the
    /// broker (or proxy) on `broker_port`.
    pub fn builder(name: &str, broker_port: u16) -> AgentBuilder {
        AgentBuilder {
            device: format!("{name}-{}-{}", std::process::id(), unique()),
            broker_port,
            durability: "batch".into(),
            flush_interval: "100ms".into(),
            power_on_state: "off".into(),
            heartbeat_interval: "1h".into(),
            max_restarts: 100,
            window: "60s".into(),
            backoff_max: "500ms".into(),
            mqtt_extra: Vec::new(),
            outbox_extra: Vec::new(),
            door_debounce: "10ms".into(),
            door_qos: 1,
            pump_extra: Vec::new(),
            extra: String::new(),
            keep_alive: "5s".into(),
            reconnect_min: "100ms".into(),
            reconnect_max: "1s".into(),
            confirm: "broker".into(),
            confirm_timeout: "1s".into(),
            password: None,
        }
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// The agent's MQTT client id: the default `fieldlink-<device_id>`,
    /// or the device id with [`AgentBuilder::credentials`].
    pub fn client_id(&self) -> String {
        self.client_id.clone()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.cfg_path
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Replaces the config file with `edit` applied to its text (for tests
    /// of bad configs).
    pub fn rewrite_config(&self, edit: impl FnOnce(&str) -> String) {
        let text = fs::read_to_string(&self.cfg_path).expect("read agent.toml");
        fs::write(&self.cfg_path, edit(&text)).expect("write agent.toml");
    }

    /// Everything the agent printed, across restarts.
    pub fn log(&self) -> String {
        fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The pid of the running child, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Spawns `fieldlink agent -c <cfg>` without waiting for anything.
    pub fn spawn(&mut self) {
        self.spawn_with_env(&[]);
    }

    /// [`Agent::spawn`] with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn spawn_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "the agent is already running");
        self.starts += 1;
        let mut log = fs::OpenOptions::new().create(true).append(true).open(&self.log_path).expect("open agent.log");
        writeln!(log, "==== fieldlink agent, start #{} ====", self.starts).expect("write agent.log");
        let err = log.try_clone().expect("clone the log file handle");
        let child = Command::new(fieldlink_bin())
            .arg("agent")
            .arg("-c")
            .arg(&self.cfg_path)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "debug")
            .env_remove("FIELDLINK_MQTT_PASSWORD")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", fieldlink_bin()));
        self.child = Some(child);
    }

    /// Spawns the agent and returns once its simulated GPIO answers.
    pub fn start(&mut self) {
        self.spawn();
        let sock = self.state_dir.join("sim.sock");
        wait_until(DEADLINE, "the agent's sim socket to answer `get 17`", || {
            self.assert_running("while starting");
            if !sock.exists() {
                return None;
            }
            // A socket left by a killed agent exists but does not answer.
            let out = self.cli(&["sim", "-c", &self.cfg_path.to_string_lossy(), "get", DOOR_PIN]);
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (out.status.success() && (text == "0" || text == "1")).then_some(())
        });
    }

    fn assert_running(&mut self, when: &str) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            self.child = None;
            panic!("the agent exited with {status} {when}");
        }
    }

    fn signal(&self, signal: Signal) {
        let pid = self.pid().expect("the agent is not running");
        send_signal(pid, signal);
    }

    pub fn sigterm(&self) {
        self.signal(Signal::SIGTERM);
    }

    pub fn sigusr1(&self) {
        self.signal(Signal::SIGUSR1);
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // It may have died already; wait() below reaps it either way.
            let _ = child.kill();
            child.wait().expect("wait for the agent");
        }
    }

    /// Waits for the agent to exit (after a signal); panics at the deadline.
    pub fn wait(&mut self) -> ExitStatus {
        let status = self.exit_status_within(DEADLINE);
        status.unwrap_or_else(|| panic!("the agent did not exit within {DEADLINE:?}"))
    }

    /// The exit status if the agent exits before `deadline`, else `None`
    /// (and it keeps running).
    pub fn exit_status_within(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut().expect("the agent is not running");
        loop {
            if let Some(status) = child.try_wait().expect("poll the agent") {
                self.child = None;
                return Some(status);
            }
            if start.elapsed() > deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// The exit code (128 + signal if killed) if the agent exits before
    /// `deadline`.
    pub fn exit_code_within(&mut self, deadline: Duration) -> Option<i32> {
        self.exit_status_within(deadline).map(exit_code)
    }

    /// `fieldlink <args>` with the test's environment, run to completion.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(fieldlink_bin());
        cmd.args(args).current_dir(self.dir.path()).env("RUST_LOG", "warn").env_remove("FIELDLINK_MQTT_PASSWORD");
        run_with_deadline(cmd, CLI_DEADLINE)
    }

    /// `fieldlink status -c <cfg>`, parsed; `Err` says why not.
    pub fn try_status(&self) -> Result<Value, String> {
        let out = self.cli(&["status", "-c", &self.cfg_path.to_string_lossy()]);
        if !out.status.success() {
            return Err(format!("fieldlink status: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("fieldlink status printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// The status dump; panics if there is none.
    pub fn status(&self) -> Value {
        self.try_status().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Polls the status dump until `pred` holds, and returns it.
    pub fn wait_status(&self, pred: impl Fn(&Value) -> bool, what: &str) -> Value {
        let start = Instant::now();
        loop {
            let last = match self.try_status() {
                Ok(v) if pred(&v) => return v,
                Ok(v) => v.to_string(),
                Err(e) => e,
            };
            if start.elapsed() > DEADLINE {
                panic!("timed out after {DEADLINE:?} waiting for the status dump to show {what}; last: {last}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the status dump shows an empty outbox (depth 0): every
    /// record, retained relay states included, was acknowledged. Returns
    /// that dump.
    pub fn wait_outbox_drained(&self) -> Value {
        self.wait_status(|s| s["outbox"]["depth"] == 0, "an empty outbox (outbox.depth 0)")
    }

    /// `fieldlink sim -c <cfg> <args>`, raw.
    pub fn try_sim(&self, args: &[&str]) -> Output {
        let cfg = self.cfg_path.to_string_lossy().into_owned();
        let mut full = vec!["sim", "-c", &cfg];
        full.extend_from_slice(args);
        self.cli(&full)
    }

    /// `fieldlink sim -c <cfg> <args>`: its stdout, trimmed; panics on failure.
    pub fn sim(&self, args: &[&str]) -> String {
        let out = self.try_sim(args);
        assert!(
            out.status.success(),
            "fieldlink sim {args:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Presses the door button (pull-up, active-low: drives pin 17 low).
    pub fn press(&self) {
        assert_eq!(self.sim(&["set", DOOR_PIN, "0"]), "ok", "sim set 17 0");
        thread::sleep(EDGE_PACE);
    }

    /// Releases the door button (pin 17 back high).
    pub fn release(&self) {
        assert_eq!(self.sim(&["set", DOOR_PIN, "1"]), "ok", "sim set 17 1");
        thread::sleep(EDGE_PACE);
    }

    /// `n` press/release pairs.
    pub fn click(&self, n: usize) {
        for _ in 0..n {
            self.press();
            self.release();
        }
    }

    /// `n` edges of the door as fast as `fieldlink sim` runs: alternately
    /// `set 17 0` (press) and `set 17 1` (release), starting with a press.
    /// Only for a door configured with `door_debounce("0ms")`, where every
    /// level change is an edge at once and none can be merged.
    pub fn edges(&self, n: usize) {
        for i in 0..n {
            let level = if i % 2 == 0 { "0" } else { "1" };
            assert_eq!(self.sim(&["set", DOOR_PIN, level]), "ok", "sim set 17 {level} (edge #{i})");
        }
    }

    /// A persistent connection to the agent's sim socket (the agent must be
    /// running), for bursts of edges.
    pub fn sim_socket(&self) -> SimSocket {
        SimSocket::connect(&self.state_dir)
    }

    /// Prints the last lines of the agent's log to stderr.
    pub fn print_log(&self) {
        eprintln!("---- agent {} log (last 300 lines) ----\n{}", self.device, tail(&self.log_path, 300));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() || std::env::var_os("FIELDLINK_TEST_LOG").is_some() {
            self.print_log();
        }
    }
}

// ---------------------------------------------------------------------------
// Rig

/// Everything one agent test needs. Fields drop in order: agent first,
/// broker last, then the serial lock.
pub struct Rig {
    pub agent: Agent,
    pub watcher: Watcher,
    pub proxy: Proxy,
    pub broker: Mosquitto,
    _serial: MutexGuard<'static, ()>,
}

impl Rig {
    /// Broker (with or without persistence), proxy, watcher and a configured
    /// agent (not started), or `None` when mosquitto is not installed.
    pub fn new(name: &str, persistence: bool, configure: impl FnOnce(AgentBuilder) -> AgentBuilder) -> Option<Rig> {
        let serial = serial();
        let broker = require_mosquitto(persistence)?;
        let proxy = Proxy::start(broker.port());
        let agent = configure(Agent::builder(name, proxy.port())).build();
        let watcher = Watcher::for_device(broker.port(), agent.device());
        Some(Rig { agent, watcher, proxy, broker, _serial: serial })
    }

    pub fn device(&self) -> &str {
        self.agent.device()
    }

    /// `fieldlink/<device>/<rest>`.
    pub fn topic(&self, rest: &str) -> String {
        topic(self.agent.device(), rest)
    }

    /// Waits for `online` on the status topic among messages from `mark` on.
    pub fn wait_online_since(&self, mark: usize) {
        let device = self.device().to_string();
        self.watcher.wait_for_since(
            mark,
            |m| has_status(m, &device, b"online"),
            DEADLINE,
            "the agent to publish 'online'",
        );
    }

    /// Starts the agent and waits until it is online.
    pub fn start_online(&mut self) {
        let mark = self.watcher.len();
        self.agent.start();
        self.wait_online_since(mark);
    }

    /// Sends a command and waits for the relay state message that confirms
    /// it: proof that the agent is connected and subscribed. Returns that
    /// state message.
    pub fn command_confirmed(&self, relay: &str, state: &str, id: &str) -> Value {
        let mark = self.watcher.len();
        let body = serde_json::json!({"state": state, "id": id, "expires_at": rfc3339_from_now(300)}).to_string();
        self.watcher.publish(&self.topic(&format!("relay/{relay}/set")), body, 1, false);
        let device = self.device().to_string();
        let msgs = self.watcher.wait_for_since(
            mark,
            |m| relay_states(m, &device, relay).iter().any(|v| v["command_id"] == id),
            DEADLINE,
            &format!("relay '{relay}' to confirm command '{id}'"),
        );
        relay_states(&msgs, &device, relay)
            .into_iter()
            .find(|v| v["command_id"] == id)
            .expect("the wait above found it")
    }

    /// Takes the link down and waits until the outage is visible: the
    /// broker published the agent's `offline` will, or the agent's status
    /// dump says it is disconnected.
    pub fn cut(&self) {
        let mark = self.watcher.len();
        self.proxy.cut();
        let device = self.device().to_string();
        wait_until(DEADLINE, "the agent to be seen offline after the link was cut", || {
            if has_status(&self.watcher.messages()[mark..], &device, b"offline") {
                return Some(());
            }
            let status = self.agent.try_status().ok()?;
            (status["link"]["connected"] == false).then_some(())
        });
    }
}
