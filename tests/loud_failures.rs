//! Black-box: a refused connect is explained at warn in the agent's log, once
//! per back-off step, against a real mosquitto that wants a password or
//! speaks TLS with a certificate the agent does not trust (issue #7, item
//! 6). Each test starts its own mosquitto on 127.0.0.1 with its own conf
//! (the shared helper has no auth or TLS) and skips with a reason when
//! mosquitto or mosquitto_passwd is missing.

mod common;

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Agent, DEADLINE, free_port, mosquitto_path, wait_until};

/// A mosquitto started from a conf of ours; killed on drop.
struct Broker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skip_or_panic(why: &str) {
    if std::env::var("FIELDLINK_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
        panic!("{why} (FIELDLINK_REQUIRE_MOSQUITTO=1)");
    }
    eprintln!("skipping: {why}");
}

/// Starts mosquitto with `conf(dir, port)` plus logging; `None` (after saying
/// why) when it is not installed.
fn broker(conf: impl FnOnce(&Path, u16) -> String) -> Option<Broker> {
    let Some(bin) = mosquitto_path() else {
        skip_or_panic("mosquitto is not installed");
        return None;
    };
    let dir = tempfile::Builder::new().prefix("fieldlink-loud-").tempdir().expect("temp dir");
    let port = free_port();
    let mut text = conf(dir.path(), port);
    text += &format!("log_dest file {}/mosquitto.log\n", dir.path().display());
    // Run as root, mosquitto drops to the `mosquitto` user, which cannot
    // read our temp dir (as in tests/common).
    if nix_is_root() {
        text += "user root\n";
    }
    let conf_path = dir.path().join("mosquitto.conf");
    fs::write(&conf_path, text).expect("write mosquitto.conf");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto");
    let mut b = Broker { child, port, _dir: dir };
    wait_until(Duration::from_secs(30), "mosquitto to accept connections", || {
        if let Ok(Some(status)) = b.child.try_wait() {
            panic!("mosquitto exited with {status}");
        }
        TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
    Some(b)
}

fn nix_is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

/// The agent's WARN lines that contain `text` (the level may be wrapped in
/// colour codes).
fn warn_lines(agent: &Agent, text: &str) -> Vec<String> {
    agent.log().lines().filter(|l| l.contains("WARN") && l.contains(text)).map(str::to_string).collect()
}

#[test]
fn a_wrong_password_is_explained_at_warn_once_per_back_off_step() {
    if Command::new("mosquitto_passwd").arg("-h").output().is_err() {
        return skip_or_panic("mosquitto_passwd is not installed");
    }
    let Some(b) = broker(|dir, port| {
        let passwd = dir.join("passwd");
        let ok = Command::new("mosquitto_passwd")
            .args(["-b", "-c"])
            .arg(&passwd)
            .args(["pi", "right-password"])
            .status()
            .expect("run mosquitto_passwd");
        assert!(ok.success(), "mosquitto_passwd failed");
        format!("listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n", passwd.display())
    }) else {
        return;
    };
    let mut agent = Agent::builder("loud-pw", b.port).reconnect("100ms", "400ms").build();
    let pass = agent.dir().join("password");
    fs::write(&pass, "wrong-password\n").expect("write password");
    fs::set_permissions(&pass, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    agent.rewrite_config(|t| {
        t.replacen("[mqtt]\n", &format!("[mqtt]\nusername = \"pi\"\npassword_file = '{}'\n", pass.display()), 1)
    });
    agent.start();
    let expected = "mqtt: the broker refused the login for user 'pi' (";
    let lines = wait_until(DEADLINE, "two warn lines explaining the refused login", || {
        let lines = warn_lines(&agent, expected);
        (lines.len() >= 2).then_some(lines)
    });
    // mosquitto 2 answers a bad password with NotAuthorized (MQTT 3.1.1 code 5).
    assert!(
        lines[0].contains("user 'pi' (not authorized") || lines[0].contains("(bad username or password)"),
        "{lines:?}"
    );
    assert!(!agent.log().contains("wrong-password"), "the password must never be logged");
    // The password file is 0644: the agent says so at start.
    assert!(
        !warn_lines(&agent, &format!("config: mqtt.password_file '{}' is readable by group or others", pass.display()))
            .is_empty(),
        "{}",
        agent.log()
    );
    agent.sigterm();
    agent.wait();
}

#[test]
fn an_untrusted_broker_certificate_is_explained_at_warn_naming_the_ca_file() {
    let Some(b) = broker(|dir, port| {
        for f in ["ca.pem", "server.pem", "server.key"] {
            fs::copy(fixture(f), dir.join(f)).expect("copy tls fixture");
        }
        let d = dir.display();
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n"
        )
    }) else {
        return;
    };
    let mut agent = Agent::builder("loud-tls", b.port).reconnect("100ms", "400ms").build();
    let ca = fixture("other-ca.pem");
    let port = b.port;
    agent.rewrite_config(|t| {
        t.replacen(&format!("url = \"mqtt://127.0.0.1:{port}\""), &format!("url = \"mqtts://localhost:{port}\""), 1)
            .replacen("[mqtt]\n", &format!("[mqtt]\nca_file = '{}'\n", ca.display()), 1)
    });
    agent.start();
    let expected = format!(
        "mqtt: TLS: the broker's certificate is not trusted by mqtt.ca_file '{}' (UnknownIssuer)",
        ca.display()
    );
    wait_until(DEADLINE, "two warn lines explaining the untrusted certificate", || {
        (warn_lines(&agent, &expected).len() >= 2).then_some(())
    });
    agent.sigterm();
    agent.wait();
}

#[test]
fn check_config_refuses_garbage_tls_files_and_warns_about_an_open_password_file() {
    use std::os::unix::fs::PermissionsExt;
    let agent = Agent::builder("loud-check", 1883).build();
    let garbage = agent.dir().join("ca.pem");
    fs::write(&garbage, "not a certificate\n").expect("write");
    let with_ca = |ca: &Path| {
        agent.rewrite_config(|t| {
            let t = t.replacen("url = \"mqtt://", "url = \"mqtts://", 1);
            let t = t.lines().filter(|l| !l.starts_with("ca_file")).collect::<Vec<_>>().join("\n");
            t.replacen("[mqtt]\n", &format!("[mqtt]\nca_file = '{}'\n", ca.display()), 1)
        })
    };
    with_ca(&garbage);
    let out = agent.cli(&["check-config", "-c", &agent.config_path().display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("mqtt.ca_file: '{}' holds no certificate", garbage.display())), "{stderr}");

    with_ca(&fixture("ca.pem"));
    let pass = agent.dir().join("password");
    fs::write(&pass, "pw\n").expect("write");
    fs::set_permissions(&pass, fs::Permissions::from_mode(0o644)).expect("chmod");
    agent.rewrite_config(|t| {
        t.replacen("[mqtt]\n", &format!("[mqtt]\nusername = \"pi\"\npassword_file = '{}'\n", pass.display()), 1)
    });
    let out = agent.cli(&["check-config", "-c", &agent.config_path().display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("warning: mqtt.password_file '{}' is readable by group or others", pass.display()))
            && stderr.contains("chmod 600"),
        "{stderr}"
    );
}
