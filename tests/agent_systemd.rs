//! `Type=notify`, black-box (DESIGN: systemd): the real agent binary (sim
//! GPIO) started with `NOTIFY_SOCKET` pointing at a real Unix datagram
//! socket this test binds, as systemd would. What systemd hears: `READY=1`
//! first, `WATCHDOG=1` while healthy when `WATCHDOG_USEC` is set (and never
//! without it), `STATUS=` with the link state and outbox depth, and
//! `STOPPING=1` at SIGTERM. The withheld watchdog of a wedged Link is shown
//! with a real blocked arbiter in `src/agent/systemd.rs`'s tests.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use common::{Agent, DEADLINE, Rig, exit_code, free_port, wait_until};

/// systemd's end of the notification socket.
struct Systemd {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: UnixDatagram,
    heard: Vec<String>,
}

impl Systemd {
    fn listen() -> Systemd {
        let dir = tempfile::Builder::new().prefix("fieldlink-notify-").tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
        Systemd { _dir: dir, path, socket, heard: Vec::new() }
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }

    /// Reads datagrams until one that arrives from now on satisfies
    /// `pred`; returns it.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = self.heard.len();
        self.wait_from(start, what, pred)
    }

    /// Like [`Systemd::wait_for`], but a datagram heard already counts.
    fn wait_heard(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_from(0, what, pred)
    }

    fn wait_from(&mut self, start: usize, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut buf = [0u8; 4096];
        wait_until(DEADLINE, what, || {
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            self.heard[start..].iter().find(|m| pred(m)).cloned()
        })
    }
}

#[test]
fn systemd_hears_ready_then_watchdogs_the_link_state_and_stopping_at_sigterm() {
    let Some(mut rig) = Rig::new("sd-ready", false, |b| b) else { return };
    let mut systemd = Systemd::listen();
    let mark = rig.watcher.len();
    rig.agent.spawn_with_env(&[("NOTIFY_SOCKET", systemd.path()), ("WATCHDOG_USEC", "2000000")]);

    let ready = systemd.wait_for("READY=1", |m| m.contains("READY=1"));
    assert_eq!(systemd.heard[0], ready, "READY=1 comes before anything else: {:?}", systemd.heard);
    assert!(ready.contains("\nSTATUS=link "), "READY carries the first status: {ready:?}");

    systemd.wait_for("a WATCHDOG=1 while the agent is healthy", |m| m == "WATCHDOG=1");
    rig.wait_online_since(mark);
    // The link may be up before READY=1, which then carries that status.
    let status = systemd.wait_heard("a STATUS= saying the link is up", |m| m.contains("STATUS=link up; outbox "));
    assert!(status.ends_with(" records") || status.ends_with(" record"), "{status}");
    let watchdogs = systemd.heard.iter().filter(|m| *m == "WATCHDOG=1").count();
    let more = systemd.wait_for("another WATCHDOG=1", |m| m == "WATCHDOG=1");
    assert_eq!(more, "WATCHDOG=1");
    assert!(systemd.heard.iter().filter(|m| *m == "WATCHDOG=1").count() > watchdogs);

    rig.agent.sigterm();
    let stopping = systemd.wait_for("STOPPING=1 at SIGTERM", |m| m.starts_with("STOPPING=1"));
    assert!(stopping.contains("STATUS=stopping"), "{stopping}");
    assert_eq!(exit_code(rig.agent.wait()), 0);
}

#[test]
fn an_agent_without_a_broker_is_ready_says_the_link_is_down_and_has_no_watchdog_timer_without_watchdog_usec() {
    // Nothing listens on this port: the Pi has no network.
    let mut agent = Agent::builder("sd-offline", free_port()).build();
    let mut systemd = Systemd::listen();
    agent.spawn_with_env(&[("NOTIFY_SOCKET", systemd.path())]);

    let ready = systemd.wait_for("READY=1 with no broker", |m| m.starts_with("READY=1\n"));
    assert!(ready.contains("outbox "), "{ready}");
    // The first failed attempt may come before READY=1, which then carries
    // that status.
    let down = systemd.wait_heard("a STATUS= saying the link is down and why", |m| m.contains("STATUS=link down ("));
    assert!(down.contains("; outbox "), "{down}");

    agent.sigterm();
    systemd.wait_for("STOPPING=1 at SIGTERM", |m| m.starts_with("STOPPING=1"));
    assert_eq!(exit_code(agent.wait()), 0);
    assert!(
        !systemd.heard.iter().any(|m| m.contains("WATCHDOG=1")),
        "no WATCHDOG_USEC, no watchdog: {:?}",
        systemd.heard
    );
}
