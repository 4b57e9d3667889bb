//! The agent's life, black-box: supervision of a failing actor and its
//! escalation (DESIGN: Supervision), the status dump and its secrets (Status
//! dump), a clean SIGTERM, `check-config` and bad configs (Command line, Agent
//! config), and the heartbeat's fields (Topics and payloads).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

use common::tmpfs::{Tmpfs, fill};
use common::{
    Agent, DEADLINE, DOOR_PIN, Rig, VERSION, assert_press_release_pairs, assert_strictly_increasing, button_events,
    check_envelope, first_occurrences, has_status, records, seq,
};
use serde_json::Value;

#[test]
fn a_failing_button_actor_is_restarted_and_publishes_again_once_the_fault_clears() {
    let Some(mut rig) = Rig::new("life-fault", false, |b| b) else { return };
    rig.start_online();
    assert_eq!(rig.agent.sim(&["fault", DOOR_PIN, "on"]), "ok");
    rig.agent.wait_status(
        |s| s["actors"]["button"]["restarts"].as_u64().is_some_and(|n| n >= 1),
        "the button actor restarted after the fault",
    );
    assert_eq!(rig.agent.sim(&["fault", DOOR_PIN, "off"]), "ok");
    let status = rig.agent.wait_status(
        |s| s["actors"]["button"]["running"] == true,
        "the button actor running again once the fault cleared",
    );
    assert!(status["actors"]["button"]["restarts"].as_u64().is_some_and(|n| n >= 1), "restarts are counted: {status}");

    let newest = records(&rig.watcher.messages()).iter().map(|(_, v)| seq(v)).max().unwrap_or(0);
    let mark = rig.watcher.len();
    rig.agent.click(1);
    let device = rig.device().to_string();
    let msgs = rig.watcher.wait_for_since(
        mark,
        |m| button_events(m, &device, "door").iter().filter(|v| seq(v) > newest).count() >= 2,
        DEADLINE,
        "a press and a release after the actor recovered",
    );
    let events: Vec<Value> = button_events(&msgs, &device, "door").into_iter().filter(|v| seq(v) > newest).collect();
    assert_press_release_pairs(&events, &device, "door", 1);
}

#[test]
fn a_fault_that_keeps_coming_back_makes_the_agent_exit_with_code_1() {
    let Some(mut rig) = Rig::new("life-storm", false, |b| b.supervisor(3, "60s", "200ms")) else { return };
    rig.start_online();
    assert_eq!(rig.agent.sim(&["fault", DOOR_PIN, "on"]), "ok");
    // The broken pin reports its failure again on every change, so keep
    // moving it until the supervisor gives up.
    let mut level = "0";
    let mut code = None;
    for _ in 0..120 {
        code = rig.agent.exit_code_within(Duration::from_millis(500));
        if code.is_some() {
            break;
        }
        // The agent may be on its way out: a refused or failed `set` is fine.
        let _ = rig.agent.try_sim(&["set", DOOR_PIN, level]);
        level = if level == "0" { "1" } else { "0" };
    }
    assert_eq!(code, Some(1), "more than max_restarts restarts within the window ends the process with code 1");
}

#[test]
fn the_status_dump_reports_link_outbox_relays_buttons_and_actors_and_never_the_password() {
    let secrets = tempfile::tempdir().expect("create a temp dir");
    let secret = "s3cret-fieldlink-Pa55word-4711";
    let pass_file = secrets.path().join("mqtt.pass");
    std::fs::write(&pass_file, format!("{secret}\n")).expect("write the password file");
    std::fs::set_permissions(&pass_file, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    let Some(mut rig) = Rig::new("life-status", false, |b| {
        b.mqtt_line(r#"username = "pi""#).mqtt_line(&format!(r#"password_file = "{}""#, pass_file.display()))
    }) else {
        return;
    };
    rig.start_online();

    // SIGUSR1 itself makes the agent write the dump.
    rig.agent.sigusr1();
    let status_json = rig.agent.state_dir().join("status.json");
    let pid = rig.agent.pid().expect("running");
    common::wait_until(DEADLINE, "status.json after SIGUSR1", || {
        let v: Value = serde_json::from_slice(&std::fs::read(&status_json).ok()?).ok()?;
        (v["pid"] == pid).then_some(())
    });

    rig.agent.click(2);
    let s = rig.agent.wait_status(
        |s| s["buttons"]["door"]["presses"] == 2 && s["buttons"]["door"]["state"] == "released",
        "two presses of the door button",
    );
    assert_eq!(s["device"], rig.device());
    assert_eq!(s["version"], VERSION);
    assert_eq!(s["pid"], pid, "pid is the agent's own");
    assert!(s["uptime_s"].is_u64(), "uptime_s: {s}");
    assert_eq!(s["link"]["connected"], true, "link: {s}");
    assert!(s["link"]["connects"].as_u64().is_some_and(|n| n >= 1), "link.connects: {s}");
    for key in ["depth", "bytes", "dropped", "durable_seq", "next_seq"] {
        assert!(s["outbox"][key].is_u64(), "outbox.{key}: {s}");
    }
    assert!(s["outbox"].get("oldest_ts").is_some(), "outbox.oldest_ts (null when empty): {s}");
    assert!(s["outbox"]["durable_seq"].as_u64() < s["outbox"]["next_seq"].as_u64(), "durable below next: {s}");
    assert_eq!(s["outbox"]["disk_fault"], false, "outbox.disk_fault: {s}");
    assert_eq!(s["relays"]["pump"]["state"], "off", "relays.pump: {s}");
    for actor in ["button", "relay", "heartbeat", "link"] {
        let a = &s["actors"][actor];
        assert_eq!(a["running"], true, "actors.{actor}.running: {s}");
        assert!(a["restarts"].is_u64(), "actors.{actor}.restarts: {s}");
        assert!(a.get("last_error").is_some(), "actors.{actor}.last_error: {s}");
    }

    let dumped = std::fs::read_to_string(&status_json).expect("status.json exists after a dump");
    serde_json::from_str::<Value>(&dumped).expect("status.json is JSON");
    assert!(!dumped.contains(secret), "the password appears in status.json");
    let log = rig.agent.log();
    assert!(!log.contains(secret), "the password appears in the agent's log");
}

/// DESIGN: Command line (`src/memtrim.rs`): glibc's
/// per-thread cache kept the free memory of a drained backlog from going
/// back to the system, so the agent restarts itself once with it limited
/// to chunks of at most 64 bytes.
#[test]
fn the_agent_runs_with_a_small_glibc_thread_cache_under_the_pid_it_was_started_with() {
    if !cfg!(target_env = "gnu") {
        println!("SKIPPED the_agent_runs_with_a_small_glibc_thread_cache…: not a glibc build");
        return;
    }
    // With tunables of its own, what /proc shows of the agent's variable is
    // what glibc's parser left of it in place (glibc 2.36 kept only the
    // first one here, though `ld.so --list-tunables` showed both in
    // effect); the merge itself is unit-tested in `memtrim.rs`.
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        println!("SKIPPED the_agent_runs_with_a_small_glibc_thread_cache…: GLIBC_TUNABLES is set for the tests");
        return;
    }
    let Some(mut rig) = Rig::new("life-malloc", false, |b| b) else { return };
    rig.start_online();
    let pid = rig.agent.pid().expect("running");
    let s = rig.agent.wait_status(|s| s["pid"] == pid, "a status dump");
    assert_eq!(s["pid"], pid, "the restart keeps the pid systemd and the pid file know");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("read the agent's environment");
    let tunables: Vec<String> = environ
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"GLIBC_TUNABLES="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert!(
        tunables.len() == 1 && tunables[0].split(':').any(|t| t == "glibc.malloc.tcache_max=64"),
        "the agent's GLIBC_TUNABLES: {tunables:?}"
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("read the agent's command line");
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
    assert_eq!(args.get(1).copied(), Some(&b"agent"[..]), "the same arguments after the restart: {args:?}");
    assert!(args.len() >= 3, "the config path is still there: {args:?}");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("read the agent's name");
    assert_eq!(comm.trim_end(), "fieldlink", "ps, top and pgrep still see the binary's name");
}

#[test]
fn sigterm_publishes_a_retained_offline_status_and_exits_zero() {
    let Some(mut rig) = Rig::new("life-term", false, |b| b) else { return };
    rig.start_online();
    let mark = rig.watcher.len();
    rig.agent.sigterm();
    assert_eq!(rig.agent.wait().code(), Some(0), "SIGTERM is a clean exit");

    let device = rig.device().to_string();
    rig.watcher.wait_for_since(mark, |m| has_status(m, &device, b"offline"), DEADLINE, "'offline' after SIGTERM");
    let status_topic = rig.topic("status");
    assert_eq!(rig.broker.retained(&status_topic).as_deref(), Some(&b"offline"[..]), "offline is retained");
    // Published by the agent itself, not only by the broker as its will:
    // mosquitto logs every PUBLISH it receives, with the payload's size.
    let from_agent = format!("Received PUBLISH from {} ", rig.agent.client_id());
    let log = rig.broker.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&from_agent) && l.contains(&format!("'{status_topic}'")) && l.contains("(7 bytes)")),
        "the agent did not publish 'offline' itself; broker log:\n{log}"
    );
}

#[test]
fn records_made_just_before_sigterm_in_batch_mode_are_delivered_after_a_restart() {
    // A long flush interval: the records are surely not yet flushed by the
    // timer when SIGTERM arrives, so only the shutdown flush can save them.
    let Some(mut rig) = Rig::new("life-flush", false, |b| b.durability("batch").flush_interval("5s")) else { return };
    rig.start_online();
    rig.cut();
    let mark = rig.watcher.len();
    let n = 5;
    rig.agent.click(n);
    rig.agent.sigterm();
    assert_eq!(rig.agent.wait().code(), Some(0), "SIGTERM is a clean exit");
    rig.agent.start();
    rig.proxy.heal();

    let device = rig.device().to_string();
    let msgs = rig.watcher.wait_for_since(
        mark,
        |m| button_events(m, &device, "door").len() >= 2 * n,
        DEADLINE,
        "every press made before SIGTERM",
    );
    assert_press_release_pairs(&button_events(&msgs, &device, "door"), &device, "door", n);
    assert_strictly_increasing(&first_occurrences(&records(&msgs)), "first occurrences after the restart");
}

#[test]
fn heartbeats_carry_every_field_the_design_names() {
    let Some(mut rig) = Rig::new("life-heartbeat", false, |b| b.heartbeat_interval("1s")) else { return };
    rig.start_online();
    let device = rig.device().to_string();
    let heartbeat = rig.topic("heartbeat");
    let msgs = rig.watcher.wait_for(
        |m| first_occurrences(&records(m)).iter().filter(|(t, _)| *t == heartbeat).count() >= 2,
        DEADLINE,
        "two heartbeats",
    );
    let beats: Vec<_> = first_occurrences(&records(&msgs)).into_iter().filter(|(t, _)| *t == heartbeat).collect();
    assert_strictly_increasing(&beats, "heartbeats");
    let hb = &beats[beats.len() - 1].1;
    check_envelope(hb, &device);
    for key in ["uptime_s", "mem_used_bytes", "disk_free_bytes"] {
        assert!(hb[key].is_u64(), "{key} is a count: {hb}");
    }
    for key in ["mem_total_bytes", "disk_total_bytes"] {
        assert!(hb[key].as_u64().is_some_and(|n| n > 0), "{key} is positive: {hb}");
    }
    for key in ["cpu_percent", "load_1m"] {
        assert!(hb[key].is_number(), "{key} is a number: {hb}");
    }
    assert!(hb["temp_c"].is_number() || hb["temp_c"].is_null(), "temp_c is a number or null: {hb}");
    for key in ["depth", "bytes", "dropped"] {
        assert!(hb["outbox"][key].is_u64(), "outbox.{key}: {hb}");
    }
    assert!(hb["link"]["connects"].as_u64().is_some_and(|n| n >= 1), "link.connects: {hb}");
    assert!(hb["link"]["disconnects"].is_u64(), "link.disconnects: {hb}");
    assert_eq!(hb["version"], VERSION);
}

/// The harness config with four problems: an unknown key, a bad duration, a
/// pin that is not a GPIO pin, and a pin used twice.
fn broken(config: &str) -> String {
    let mut text = config
        .replacen("\n[mqtt]\n", "\ncolour = \"red\"\n\n[mqtt]\n", 1)
        .replacen("reconnect_min = \"100ms\"", "reconnect_min = \"soon\"", 1)
        .replacen("pin = 27", "pin = 99", 1);
    text.push_str("\n[[relay]]\nname = \"fan\"\npin = 17\nactive_low = false\npower_on_state = \"off\"\nqos = 1\n");
    text
}

#[test]
fn check_config_names_every_problem_of_a_bad_config_on_its_own_line_and_exits_2() {
    let agent = Agent::builder("cc-bad", 1).build();
    agent.rewrite_config(broken);
    let out = common::fieldlink(&["check-config", "-c", &agent.config_path().to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    let line_of = |what: &str, pred: &dyn Fn(&str) -> bool| {
        lines
            .iter()
            .position(|l| pred(l))
            .unwrap_or_else(|| panic!("no line of stderr names {what}; stderr:\n{stderr}"))
    };
    let found = [
        line_of("the unknown key 'colour', quoted", &|l| l.contains("'colour'")),
        line_of("the bad duration 'soon', quoted", &|l| l.contains("'soon'")),
        line_of("pin 99", &|l| l.contains("pin 99")),
        line_of("pin 17 used twice", &|l| l.contains("17") && (l.contains("fan") || l.contains("door"))),
    ];
    let mut distinct = found.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), found.len(), "each problem gets its own line; stderr:\n{stderr}");
}

#[test]
fn check_config_exits_2_for_a_missing_file() {
    let dir = tempfile::tempdir().expect("create a temp dir");
    let missing = dir.path().join("no-such-agent.toml");
    let out = common::fieldlink(&["check-config", "-c", &missing.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr:\n{stderr}");
    assert!(stderr.contains("no-such-agent.toml"), "the error names the file; stderr:\n{stderr}");
}

#[test]
fn check_config_accepts_the_harness_config_and_exits_0() {
    let agent = Agent::builder("cc-good", 1).build();
    let out = common::fieldlink(&["check-config", "-c", &agent.config_path().to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(!agent.state_dir().exists(), "check-config starts nothing and creates no state_dir");
}

#[test]
fn the_agent_refuses_a_bad_config_with_exit_2_and_creates_nothing_in_its_state_dir() {
    let mut agent = Agent::builder("cc-agent", 1).build();
    agent.rewrite_config(broken);
    agent.spawn();
    assert_eq!(agent.exit_code_within(DEADLINE), Some(2), "a bad config is exit 2; log:\n{}", agent.log());
    let created: Vec<_> =
        std::fs::read_dir(agent.state_dir()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(created.is_empty(), "nothing may be started with a bad config, yet state_dir holds {created:?}");
}

/// `fieldlink status` sends SIGUSR1 to the pid in `agent.pid`, so the agent
/// must handle SIGUSR1 from the moment that file exists (its default action
/// kills the process). The signal handlers are installed before the pid
/// file and the sim socket exist (#6); this sends SIGUSR1 in a tight loop
/// from the moment the pid file appears until the agent is online, over
/// several starts, and the agent must survive every one and answer.
#[test]
fn sigusr1_in_a_tight_loop_from_the_moment_the_pid_file_exists_never_kills_the_agent() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let Some(mut rig) = Rig::new("life-usr1", false, |b| b) else { return };
    let pid_file = rig.agent.state_dir().join("agent.pid");
    for start in 1..=3 {
        let mark = rig.watcher.len();
        rig.agent.spawn();
        let pid = rig.agent.pid().expect("just spawned");
        let target = Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"));
        let device = rig.device().to_string();
        let began = std::time::Instant::now();
        let mut sent = 0u64;
        loop {
            if pid_file.exists() {
                // Fails only once the process is gone, which the check below reports.
                let _ = kill(target, Signal::SIGUSR1);
                sent += 1;
            }
            if sent > 0 && has_status(&rig.watcher.messages()[mark..], &device, b"online") {
                break;
            }
            if let Some(code) = rig.agent.exit_code_within(Duration::ZERO) {
                panic!("start #{start}: the agent died with code {code} after {sent} SIGUSR1s");
            }
            assert!(began.elapsed() < DEADLINE, "start #{start}: the agent did not come online");
        }
        let status = rig.agent.status();
        assert_eq!(status["pid"], pid, "start #{start}: the agent answers `fieldlink status` after {sent} SIGUSR1s");
        rig.agent.sigterm();
        assert_eq!(rig.agent.wait().code(), Some(0), "start #{start}: SIGTERM is a clean exit");
    }
}

/// `fieldlink status`, run to completion.
fn status_cli(agent: &Agent) -> Output {
    agent.cli(&["status", "-c", &agent.config_path().to_string_lossy()])
}

fn dumped_at(json: &[u8]) -> Value {
    serde_json::from_slice::<Value>(json).map(|v| v["dumped_at"].clone()).unwrap_or(Value::Null)
}

/// A full disk under `state_dir` must not cost the user the status: the
/// agent cannot write `status.json`, so `fieldlink status` gets the dump
/// over the status socket, prints it (exit 0) and warns on stderr that the
/// file could not be written and why; the agent logs the summary at warn
/// with the reason. Once space is back, the file is written again. Where no
/// tmpfs can be mounted (not root), `status.json.tmp` is pointed at
/// `/dev/full`, which fails writes the same way (without the disk fault).
#[test]
fn fieldlink_status_prints_the_dump_and_says_why_while_status_json_cannot_be_written_on_a_full_disk() {
    let mut agent = Agent::builder("life-full", 1).build();
    let status_json = agent.state_dir().join("status.json");
    let tmpfs = match Tmpfs::mount(agent.state_dir(), "4m") {
        Ok(t) => Some(t),
        Err(why) => {
            eprintln!("no tmpfs ({why}): status.json.tmp -> /dev/full instead of a full disk");
            None
        }
    };
    agent.start();
    let before = agent.status();
    let ballast = agent.state_dir().join("ballast");
    if tmpfs.is_some() {
        fill(&ballast);
        // Records made now cannot be written: the outbox rides out a disk fault.
        common::wait_until(DEADLINE, "the status dump to show outbox.disk_fault", || {
            agent.press();
            agent.release();
            agent.try_status().ok().filter(|s| s["outbox"]["disk_fault"] == true)
        });
    } else {
        std::os::unix::fs::symlink("/dev/full", agent.state_dir().join("status.json.tmp")).expect("symlink");
    }

    let out = status_cli(&agent);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fieldlink status fails: {}: {stderr}", out.status);
    let now: Value = serde_json::from_slice(&out.stdout).expect("fieldlink status prints the dump as JSON");
    assert_eq!(now["pid"], agent.pid().expect("running"), "the running agent's dump");
    assert_ne!(now["dumped_at"], before["dumped_at"], "a fresh dump");
    assert!(
        stderr.contains("status.json") && stderr.contains("No space left on device"),
        "stderr names the file and why it could not be written: {stderr}"
    );
    let on_disk = std::fs::read(&status_json).expect("status.json from before the disk filled");
    assert_eq!(dumped_at(&on_disk), before["dumped_at"], "status.json is the old dump");
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("outbox depth")
            && l.contains("NOT written")
            && l.contains("No space left on device")),
        "no warn line with the summary and the reason; log:\n{log}"
    );

    if tmpfs.is_some() {
        std::fs::remove_file(&ballast).expect("free the space");
        agent.wait_status(|s| s["outbox"]["disk_fault"] == false, "the disk fault to end once space is back");
    }
    let out = status_cli(&agent);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{}: {stderr}", out.status);
    let on_disk = std::fs::read(&status_json).expect("status.json");
    assert_eq!(dumped_at(&on_disk), dumped_at(&out.stdout), "status.json is written again, with what was printed");
    agent.kill9();
    drop(tmpfs);
}

/// An agent that could not bind its status socket (or an older one) still
/// answers `fieldlink status`: SIGUSR1 and a fresh `status.json`.
#[test]
fn fieldlink_status_falls_back_to_sigusr1_when_the_agent_has_no_status_socket() {
    let mut agent = Agent::builder("life-nosock", 1).build();
    agent.start();
    std::fs::remove_file(agent.state_dir().join("status.sock")).expect("the agent binds status.sock");
    let out = status_cli(&agent);
    assert!(out.status.success(), "{}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["pid"], agent.pid().expect("running"));
    let on_disk = std::fs::read(agent.state_dir().join("status.json")).expect("status.json");
    assert_eq!(dumped_at(&on_disk), v["dumped_at"], "the dump printed is the one SIGUSR1 wrote");
    agent.kill9();
}
