//! The hub's embedded broker as README tells people to deploy it, black-box
//! (DESIGN: Hub, "Embedded broker"; issue #7 items 1, 2 and 6): a real
//! `fieldlink hub` process with `[broker] embedded = true`, devices
//! provisioned with the real `fieldlink hub device add|remove`, real
//! `fieldlink agent` processes, all on 127.0.0.1.
//!
//! * `device remove X` while the hub runs closes X's connection (the CLI
//!   sends the hub SIGHUP; it rereads the password file) and X cannot log in
//!   again; `device add Y` lets Y in at once. The hub process is the same
//!   one throughout: nothing needs a restart.
//! * An agent reaches the hub over the `mqtts` listener with the CA that
//!   signed the hub's certificate and its button presses are stored; an
//!   agent that trusts another CA is refused, and says so at warn, naming
//!   its `ca_file`, once per back-off step.
//!
//! The library-level checks of the same broker (ACL, limits, odd client
//! ids, sessions) are in `tests/broker.rs`. Nothing here needs mosquitto or
//! a database server.

mod common;

use std::path::{Path, PathBuf};

use common::hub::{Hub, unique_device};
use common::{Agent, DEADLINE, serial, wait_until};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

/// The lines of `log` at WARN that contain `text`.
fn warn_lines(log: &str, text: &str) -> Vec<String> {
    log.lines().filter(|l| l.contains("WARN") && l.contains(text)).map(str::to_string).collect()
}

/// Presses the agent's door button once and waits until the hub stored the
/// press (a button event of the device with state "pressed").
fn a_press_is_stored(hub: &Hub, agent: &Agent) {
    agent.click(1);
    hub.wait_events(
        agent.device(),
        Some("button"),
        |events| events.iter().any(|e| e["payload"]["state"] == "pressed"),
        &format!("a press of {} stored by the hub", agent.device()),
    );
}

#[test]
fn a_device_removed_with_the_cli_is_disconnected_for_good_and_one_added_connects_without_a_hub_restart() {
    let _serial = serial();
    let mut hub = Hub::builder_embedded().start();
    let hub_pid = hub.pid();
    let builder = Agent::builder("revoked", hub.broker_port());
    let x = builder.device().to_string();
    let x_password = hub.provision(&x);
    let mut agent = builder.credentials(&x_password).reconnect("100ms", "400ms").build();
    agent.start();
    a_press_is_stored(&hub, &agent);

    let out = hub.device_cli(&["remove", &x]);
    assert!(out.contains("was sent SIGHUP"), "device remove signals the running hub: {out}");
    // The hub closed X's connection ...
    wait_until(DEADLINE, "the hub to log that it closed the removed device's connection", || {
        let log = hub.log();
        let line = warn_lines(&log, "device credentials revoked: connection closed");
        line.iter().any(|l| l.contains(&x)).then_some(())
    });
    // ... and the agent, reconnecting, is refused and says why.
    let refused = format!("mqtt: the broker refused the login for user '{x}' (");
    wait_until(DEADLINE, "the removed agent to log its refused logins at warn", || {
        (warn_lines(&agent.log(), &refused).len() >= 2).then_some(())
    });
    let answer = common::connack(hub.broker_port(), &x, &x_password);
    assert!(answer.is_err(), "the removed device's old password must not log in again: {answer:?}");
    assert!(!hub.device_cli(&["list"]).lines().any(|l| l.trim() == x), "removed from the list");
    agent.sigterm();
    agent.wait();

    // A device added while the hub runs connects at once and delivers.
    let y = unique_device("added");
    let mut fake = hub.fake_agent(&y);
    fake.button(1);
    fake.wait_acked();
    hub.wait_events(&y, None, |e| !e.is_empty(), "the added device's message stored by the hub");
    assert_eq!(hub.pid(), hub_pid, "the same hub process throughout");
    assert_eq!(hub.sigterm().code(), Some(0), "the hub's exit on SIGTERM");
}

#[test]
fn an_agent_delivers_over_the_hubs_mqtts_listener_and_one_trusting_another_ca_is_refused_at_warn() {
    let _serial = serial();
    let hub = Hub::builder_embedded().tls().start();
    let tls_port = hub.tls_port().expect("an mqtts listener");
    let over_tls = |name: &str, ca: &str| {
        let builder = Agent::builder(name, tls_port);
        let password = hub.provision(builder.device());
        let agent = builder.credentials(&password).reconnect("100ms", "400ms").build();
        let ca = fixture(ca);
        agent.rewrite_config(|t| {
            t.replacen(
                &format!("url = \"mqtt://127.0.0.1:{tls_port}\""),
                &format!("url = \"mqtts://localhost:{tls_port}\"\nca_file = '{}'", ca.display()),
                1,
            )
        });
        (agent, ca)
    };

    let (mut trusted, _) = over_tls("tls-ok", "ca.pem");
    trusted.start();
    a_press_is_stored(&hub, &trusted);
    assert!(warn_lines(&trusted.log(), "mqtt:").is_empty(), "no refusal: {}", trusted.log());

    let (mut untrusting, ca) = over_tls("tls-other-ca", "other-ca.pem");
    untrusting.start();
    let expected = format!(
        "mqtt: TLS: the broker's certificate is not trusted by mqtt.ca_file '{}' (UnknownIssuer)",
        ca.display()
    );
    wait_until(DEADLINE, "two warn lines explaining the untrusted certificate", || {
        (warn_lines(&untrusting.log(), &expected).len() >= 2).then_some(())
    });
    assert!(hub.all_events(untrusting.device(), None).is_empty(), "nothing of the refused agent was stored");
    for agent in [&mut trusted, &mut untrusting] {
        agent.sigterm();
        agent.wait();
    }
}
