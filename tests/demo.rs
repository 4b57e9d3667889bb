//! `fieldlink demo`, black-box (DESIGN: Command line; issue 3): run in a
//! temporary working directory with `--dir <tmp>/demo`, it prints the
//! dashboard URL as a one-time login link and the broker address (the link signs in once and
//! opens the dashboard; the address is a broker carrying the device's
//! traffic, to the hub's user whose password file the line names), its API shows the simulated device `demo-pi` online with its
//! relay and heartbeat and then its button events (the demo presses the
//! button every few seconds), and SIGINT (Ctrl-C) stops it with exit code 0,
//! taking its agent child process with it.
//!
//! Needs nothing installed: the demo runs its own embedded broker.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{DEADLINE, Watcher, exit_code, fieldlink_bin, serial, wait_until};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// A running `fieldlink demo`. Dropped while still running (a failed test),
/// it is interrupted, then killed, and so is its agent.
struct Demo {
    dir: tempfile::TempDir,
    child: Option<Child>,
    agent_pid: Option<i32>,
}

impl Demo {
    fn start() -> Demo {
        let dir = tempfile::Builder::new().prefix("fieldlink-demo-").tempdir().expect("create a temp dir");
        let out = fs::File::create(dir.path().join("demo.out")).expect("create demo.out");
        let err = fs::File::create(dir.path().join("demo.err")).expect("create demo.err");
        let child = Command::new(fieldlink_bin())
            .args(["demo", "--dir"])
            .arg(dir.path().join("demo"))
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} demo: {e}", fieldlink_bin()));
        Demo { dir, child: Some(child), agent_pid: None }
    }

    fn demo_dir(&self) -> PathBuf {
        self.dir.path().join("demo")
    }

    fn stdout(&self) -> String {
        fs::read_to_string(self.dir.path().join("demo.out")).unwrap_or_default()
    }

    fn print_output(&self) {
        let read = |p: &Path| fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        eprintln!("---- demo stdout ----\n{}", self.stdout());
        eprintln!("---- demo stderr ----\n{}", read(&self.dir.path().join("demo.err")));
        eprintln!("---- demo agent log ----\n{}", read(&self.demo_dir().join("agent.log")));
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            self.child = None;
            panic!("the demo exited with {status} while the test expected it to run");
        }
    }

    /// SIGINT (what Ctrl-C sends) and the exit code, once it is gone.
    fn interrupt(&mut self) -> i32 {
        let mut child = self.child.take().expect("the demo is running");
        signal(i32::try_from(child.id()).expect("pids fit in i32"), Signal::SIGINT);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("poll the demo") {
                return exit_code(status);
            }
            if start.elapsed() > DEADLINE {
                // Gone either way after this; the panic says what mattered.
                let _ = child.kill();
                let _ = child.wait();
                panic!("the demo did not exit within {DEADLINE:?} of SIGINT");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if thread::panicking() {
            self.print_output();
        }
        if let Some(mut child) = self.child.take() {
            // Ask first, so that the demo stops its agent itself.
            signal(i32::try_from(child.id()).expect("pids fit in i32"), Signal::SIGINT);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) && child.try_wait().ok().flatten().is_none() {
                thread::sleep(Duration::from_millis(50));
            }
            // Already gone is fine; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.agent_pid.filter(|&pid| alive(pid)) {
            signal(pid, Signal::SIGKILL);
        }
    }
}

fn signal(pid: i32, sig: Signal) {
    // It may have exited a moment ago; whoever waits next sees that.
    let _ = kill(Pid::from_raw(pid), sig);
}

/// Whether a process with this pid exists and has not exited (a zombie,
/// exited but not yet reaped, does not count).
fn alive(pid: i32) -> bool {
    if matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH)) {
        return false;
    }
    // /proc/<pid>/stat: "pid (comm) S ...", the state after the last ')'.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X"))
}

/// The text after `label` on the first line holding it, up to whitespace.
fn printed(stdout: &str, label: &str) -> Option<String> {
    let line = stdout.lines().find(|l| l.contains(label))?;
    let rest = line[line.find(label)? + label.len()..].trim();
    rest.split_whitespace().next().map(str::to_string)
}

/// `GET <base>/<path>` with the token: (status, JSON body).
fn get(agent: &ureq::Agent, base: &str, token: &str, path: &str) -> (u16, Value) {
    let url = format!("{base}{path}");
    let mut response = agent
        .get(&url)
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let body = response.body_mut().read_json().unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"));
    (status, body)
}

#[test]
fn the_demo_serves_the_dashboard_shows_the_sim_device_and_its_button_events_and_exits_cleanly_on_sigint() {
    let _serial = serial();
    let mut demo = Demo::start();
    let (dashboard, broker) = wait_until(DEADLINE, "the demo to print the dashboard and broker addresses", || {
        demo.assert_running();
        let out = demo.stdout();
        Some((printed(&out, "dashboard:")?, printed(&out, "broker:")?))
    });
    // A one-time login link, never the token (it would stay in the
    // browser's history); the token is in the demo's token file.
    let dashboard = dashboard.split_whitespace().next().unwrap_or_default().to_string();
    let (base, nonce) = dashboard
        .split_once("/login/once/")
        .unwrap_or_else(|| panic!("the dashboard URL is a one-time login link: {dashboard}"));
    assert!(base.starts_with("http://127.0.0.1:"), "the dashboard is on loopback: {dashboard}");
    let token = fs::read_to_string(demo.demo_dir().join("hub.token")).expect("the demo's token file");
    let token = token.trim();
    assert!(token.len() >= 32 && !nonce.contains(token), "a real token, not in the link: {nonce:?}");
    assert!(broker.starts_with("mqtt://127.0.0.1:"), "the broker address: {broker}");

    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    // The printed URL signs in: a redirect to the dashboard with the
    // cookie, which then opens the dashboard page.
    let login = http.get(&dashboard).call().unwrap_or_else(|e| panic!("GET {dashboard}: {e}"));
    assert!(login.status().is_redirection(), "GET {dashboard}: {}", login.status());
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("GET {dashboard} sets no cookie: {:?}", login.headers()))
        .to_string();
    let mut page = http.get(format!("{base}/")).header("Cookie", &cookie).call().expect("GET / with the cookie");
    assert_eq!(page.status().as_u16(), 200, "the dashboard with the cookie");
    let html = page.body_mut().read_to_string().expect("the dashboard's HTML");
    assert!(html.to_ascii_lowercase().contains("<html"), "the dashboard is an HTML page: {html:.200}");
    let (status, _) = get(&http, base, "not-the-token-not-the-token-not-the-token", "/api/devices");
    assert_eq!(status, 401, "the API needs the demo's token");
    let replay = http.get(&dashboard).call().unwrap_or_else(|e| panic!("GET {dashboard} again: {e}"));
    assert_eq!(replay.status().as_u16(), 401, "the login link works once");

    // The printed broker address is a working MQTT broker carrying the
    // device's traffic.
    let port: u16 = broker
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in the broker address {broker}"));
    // It needs credentials; the line names the hub's user and its password file.
    let line = demo.stdout().lines().find(|l| l.contains("broker:")).unwrap_or_default().to_string();
    let user = line
        .split_once("(user ")
        .and_then(|(_, r)| r.split_once(','))
        .map(|(u, _)| u.to_string())
        .unwrap_or_else(|| panic!("no user in the broker line: {line}"));
    let pass_file = line
        .split_once("password in ")
        .map(|(_, r)| r.trim_end().trim_end_matches(')').to_string())
        .unwrap_or_else(|| panic!("no password file in the broker line: {line}"));
    let password = fs::read_to_string(&pass_file).unwrap_or_else(|e| panic!("read {pass_file}: {e}"));
    let client_id = format!("demo-test-{}", std::process::id());
    let watcher = Watcher::connect_as_with_id(port, &client_id, &user, password.trim(), "fieldlink/demo-pi/#");
    watcher.wait_for(
        |m| m.iter().any(|m| m.topic == "fieldlink/demo-pi/status" && m.payload == b"online"),
        DEADLINE,
        "demo-pi's 'online' status on the printed broker",
    );

    wait_until(DEADLINE, "the API to show demo-pi online with its relay 'pump' and a heartbeat", || {
        demo.assert_running();
        let (status, body) = get(&http, base, token, "/api/devices");
        assert_eq!(status, 200, "GET /api/devices: {body}");
        let listed = body.as_array()?.iter().any(|d| {
            d["device"] == "demo-pi"
                && d["online"] == true
                && d["relays"]["pump"].as_str().is_some()
                && d["heartbeat"]["device"] == "demo-pi"
        });
        listed.then_some(())
    });

    let events = wait_until(DEADLINE, "button events of demo-pi (pressed every few seconds)", || {
        demo.assert_running();
        let (status, body) = get(&http, base, token, "/api/devices/demo-pi/events?kind=button");
        assert_eq!(status, 200, "GET events: {body}");
        let events = body.as_array()?.clone();
        events.iter().any(|e| e["payload"]["state"] == "pressed").then_some(events)
    });
    assert!(events.iter().all(|e| e["kind"] == "button" && e["name"] == "door"), "{events:#?}");

    let pid_file = demo.demo_dir().join("agent").join("agent.pid");
    let agent_pid: i32 = fs::read_to_string(&pid_file)
        .unwrap_or_else(|e| panic!("read {}: {e}", pid_file.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} holds no pid: {e}", pid_file.display()));
    demo.agent_pid = Some(agent_pid);
    assert!(alive(agent_pid), "the demo agent (pid {agent_pid}) runs while the demo does");

    assert_eq!(demo.interrupt(), 0, "the demo's exit code on SIGINT");
    wait_until(DEADLINE, &format!("the demo agent (pid {agent_pid}) to be gone"), || (!alive(agent_pid)).then_some(()));
    assert!(demo.stdout().contains("stopped"), "the demo says it stopped:\n{}", demo.stdout());
}
