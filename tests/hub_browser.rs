//! Owns the real-browser end-to-end test of the hub dashboard (issue 3): a
//! mosquitto, a `fieldlink hub` on it (SQLite in a temp dir), a real agent
//! with simulated GPIO, and Debian's headless Chromium driven by
//! `tests/browser/dashboard.mjs` (playwright-core). The browser signs in,
//! sees the device online, switches the relay `pump` on and sees the
//! agent's confirmation; the test then checks the relay pin itself and
//! keeps the screenshots under `target/test-artifacts/`.
//!
//! CSRF (issue 7): before the click, a page the script serves on another
//! port of 127.0.0.1 POSTs a `text/plain` form and a `no-cors` fetch with
//! the session cookie to the relay endpoint; the script sees both refused
//! (403) and the relay still off, and this test sees on the broker that the
//! only command the hub ever published is the dashboard's. At the end the
//! script logs out (a POST from app.js) and sees the old cookie refused.
//!
//! It skips (passes, after saying why) when `node`, `/usr/bin/chromium` or
//! `tests/browser/node_modules/playwright-core` is missing, unless
//! `FIELDLINK_REQUIRE_BROWSER=1` (set by `.ci/run`) makes that a failure.
//! Mosquitto is required the same way through `FIELDLINK_REQUIRE_MOSQUITTO`.
//!
//! Sensors (issue 9): the agent reads a `file` sensor `tank` from a temp
//! dir; the script waits for its chart and newest value on the card.
//!
//! The dashboard's history (issue 9 item 7): seven more devices (fake
//! agents publishing a status and a heartbeat) make a fleet of eight, so
//! the script checks the fleet table (search, sort) and opens the agent's
//! card from it; then the link timeline, lateness, the range switch, the
//! command history (who asked) and the error log (a command for a relay
//! the agent lacks). The phone screenshot is 375×812 and must not scroll
//! sideways.
//!
//! The hub is the shared fixture of `tests/common/hub.rs` (on the test
//! mosquitto, SQLite in its temp dir); the agent is the harness's [`Rig`].

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::hub::{FakeAgent, Hub, unique_device};
use common::{DEADLINE, PUMP_PIN, Rig, Watcher, run_with_deadline, topic};

/// The browser the script drives (Debian's package `chromium`).
const CHROMIUM: &str = "/usr/bin/chromium";

/// The most the whole browser script may take: it has a dozen steps of at
/// most 30 s each. Only a hung script comes near this.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(420);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------
// What the browser test needs, and skipping without it

/// `node` on the PATH, if any.
fn node_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join("node")).find(|p| p.is_file())
}

/// The node binary, or `None` (after saying so) when something the browser
/// test needs is missing. With `FIELDLINK_REQUIRE_BROWSER=1` that is a
/// failure instead, so CI cannot pass by skipping.
fn require_browser() -> Option<PathBuf> {
    let node = node_path();
    let mut missing = Vec::new();
    if node.is_none() {
        missing.push("node (not on PATH)".to_string());
    }
    if !Path::new(CHROMIUM).is_file() {
        missing.push(CHROMIUM.to_string());
    }
    let playwright = manifest_dir().join("tests/browser/node_modules/playwright-core");
    if !playwright.is_dir() {
        missing.push(playwright.display().to_string());
    }
    if missing.is_empty() {
        return node;
    }
    let reason = format!(
        "{} (run .ci/run or `npm ci --prefix tests/browser` and `apt-get install chromium`)",
        missing.join(", ")
    );
    if std::env::var("FIELDLINK_REQUIRE_BROWSER").as_deref() == Ok("1") {
        panic!("missing: {reason} (FIELDLINK_REQUIRE_BROWSER=1)");
    }
    eprintln!("skipping: {reason}");
    None
}

// ---------------------------------------------------------------------------
// Artifacts

/// `target/test-artifacts/`, created if need be.
fn artifacts_dir() -> PathBuf {
    let dir = manifest_dir().join("target").join("test-artifacts");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// The screenshot names this test keeps, by the script's suffix.
const SHOTS: [&str; 3] = ["desktop", "phone", "failure"];

fn artifact(suffix: &str) -> PathBuf {
    artifacts_dir().join(format!("hub-dashboard-{suffix}.png"))
}

/// Removes the screenshots of an earlier run, so none is mistaken for this
/// run's.
fn clear_screenshots() {
    for suffix in SHOTS {
        let path = artifact(suffix);
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            panic!("remove {}: {e}", path.display());
        }
    }
}

/// Copies the screenshots the script wrote (`<base>-<suffix>.png`) that
/// exist into `target/test-artifacts/hub-dashboard-<suffix>.png`; returns
/// the copies' paths.
fn keep_screenshots(base: &Path) -> Vec<PathBuf> {
    let mut kept = Vec::new();
    for suffix in SHOTS {
        let from = PathBuf::from(format!("{}-{suffix}.png", base.display()));
        if !from.is_file() {
            continue;
        }
        let to = artifact(suffix);
        fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
        kept.push(to);
    }
    kept
}

// ---------------------------------------------------------------------------
// The test

#[test]
fn a_browser_signs_in_sees_the_agent_online_and_switches_its_relay_on_with_the_agents_confirmation() {
    let Some(node) = require_browser() else { return };
    let sensor_dir = tempfile::tempdir().expect("create a temp dir");
    let sensor_file = sensor_dir.path().join("temp1_input");
    fs::write(&sensor_file, "21500\n").expect("write the sensor file");
    let sensor = format!(
        "[[sensor]]\nname = \"tank\"\nkind = \"file\"\npath = \"{}\"\nscale = 0.001\nunit = \"°C\"\ninterval = \"1s\"\n",
        sensor_file.display()
    );
    let Some(mut rig) = Rig::new("browser", false, |b| b.heartbeat_interval("1s").extra_toml(&sensor)) else { return };
    // Declared after the rig, so it stops before the agent and the broker.
    let hub = Hub::builder(&rig.broker).start();
    rig.start_online();
    let device = rig.device().to_string();

    // The hub has the device online with a heartbeat (for the charts) and
    // the relay's startup state before the browser looks.
    hub.wait_device(
        &device,
        |d| d["online"] == true && d["heartbeat"].is_object() && d["relays"]["pump"] == "off",
        "online with a heartbeat and relay 'pump' off",
    );
    hub.wait_device(&device, |d| d["sensors"]["tank"]["value"] == 21.5, "sensor 'tank' at 21.5");
    // A few button events for the log.
    rig.agent.click(2);
    hub.wait_events(&device, Some("button"), |e| e.len() >= 4, "four door events");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "0", "the pump is off before the browser switches it");

    // Seven more devices: a fleet of eight, half of the others offline.
    let fleet: Vec<FakeAgent> = (1..=7)
        .map(|i| {
            let mut fake = FakeAgent::connect(rig.broker.port(), &unique_device(&format!("fleet{i}")));
            let status = if i % 2 == 1 { "online" } else { "offline" };
            fake.publish(&topic(fake.device(), "status"), status);
            fake.heartbeat(1, std::time::SystemTime::now());
            fake.wait_acked();
            fake
        })
        .collect();
    for fake in &fleet {
        hub.wait_device(fake.device(), |d| d["heartbeat"].is_object(), "a fleet device with its heartbeat");
    }

    // Every command the hub publishes to the agent, from here on.
    let commands = Watcher::connect(rig.broker.port(), "browser-commands", &topic(&device, "relay/+/set"));

    clear_screenshots();
    let shots = tempfile::Builder::new().prefix("fieldlink-shots-").tempdir().expect("create a temp dir");
    let base = shots.path().join("dashboard");
    let mut cmd = Command::new(&node);
    cmd.arg(manifest_dir().join("tests/browser/dashboard.mjs"))
        .arg("--url")
        .arg(hub.url(""))
        .arg("--token")
        .arg(hub.token())
        .arg("--device")
        .arg(&device)
        .arg("--screenshot")
        .arg(&base)
        .arg("--fleet")
        .arg((fleet.len() + 1).to_string())
        .current_dir(manifest_dir());
    let out = run_with_deadline(cmd, SCRIPT_DEADLINE);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("---- dashboard.mjs stdout ----\n{stdout}");
    if !stderr.trim().is_empty() {
        println!("---- dashboard.mjs stderr ----\n{stderr}");
    }

    let kept = keep_screenshots(&base);
    for path in &kept {
        println!("screenshot kept: {}", path.display());
    }
    assert!(out.status.success(), "dashboard.mjs failed with {} (its output is above)", out.status);
    for suffix in ["desktop", "phone"] {
        assert!(
            kept.iter().any(|p| p.to_string_lossy().ends_with(&format!("-{suffix}.png"))),
            "dashboard.mjs passed but wrote no {suffix} screenshot"
        );
    }

    // The page said confirmed; the pin says so too.
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "1", "the agent switched the pump's pin on");
    hub.wait_device(&device, |d| d["relays"]["pump"] == "on", "relay 'pump' on");

    // The cross-origin POSTs published nothing: one command went to the
    // agent, and one relay state answers a command.
    let msgs = commands.wait_for(|m| m.len() >= 2, DEADLINE, "the dashboard's commands on the broker");
    assert_eq!(msgs.len(), 2, "only the dashboard's click and its unknown-relay command were sent: {msgs:?}");
    assert_eq!(msgs[0].json().map(|c| c["state"].clone()), Some("on".into()), "{msgs:?}");
    assert!(msgs[0].topic.ends_with("/relay/pump/set") && msgs[1].topic.ends_with("/relay/nosuch/set"), "{msgs:?}");
    let states = hub.all_events(&device, Some("relay"));
    let answered = states.iter().filter(|e| e["payload"]["command_id"].is_string()).count();
    assert_eq!(answered, 1, "one relay state answers a command: {states:#?}");
    assert!(hub.log().contains("web: refused POST"), "the refused POSTs are logged:\n{}", hub.log());
}
