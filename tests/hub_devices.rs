//! Device provisioning against a real mosquitto (DESIGN: Hub, "Provisioning
//! for mosquitto"): `fieldlink hub device add` writes the password and ACL
//! files a mosquitto with the shipped policy reads, and SIGHUPs it through
//! `broker.mosquitto_pid_file`; a provisioned agent delivers, a wrong
//! password is refused, a device cannot touch another's topics nor read
//! `#`, and `device remove` locks the device out. Real binary, real
//! mosquitto on 127.0.0.1.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{Agent, DEADLINE, Mosquitto, Watcher, button_events, fieldlink, mosquitto_path, wait_until};
use rumqttc::{Client, ConnectReturnCode, Event, MqttOptions, Packet, QoS};

/// The shipped config's policy lines (not its paths, listeners or user).
fn shipped_policy() -> String {
    let conf = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mosquitto.conf"))
        .expect("read config/mosquitto.conf");
    let policy: Vec<&str> = conf
        .lines()
        .filter(|l| {
            ["allow_anonymous ", "use_username_as_clientid ", "message_size_limit ", "per_listener_settings "]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect();
    assert_eq!(policy.len(), 4, "config/mosquitto.conf lost a policy line: {policy:?}");
    policy.join("\n") + "\n"
}

/// A hub config dir whose state_dir holds the broker's files.
struct HubFiles {
    dir: tempfile::TempDir,
}

impl HubFiles {
    fn new() -> HubFiles {
        let dir = tempfile::Builder::new().prefix("fieldlink-devices-").tempdir().expect("tempdir");
        let state = dir.path().join("state");
        fs::create_dir(&state).expect("mkdir state");
        // mosquitto refuses to start without them; the first `add` fills them.
        fs::write(state.join("mosquitto.passwd"), "").expect("passwd");
        fs::write(state.join("mosquitto.acl"), "").expect("acl");
        fs::write(dir.path().join("hub.pass"), "hub-secret\n").expect("hub.pass");
        let d = dir.path().display();
        fs::write(
            dir.path().join("hub.toml"),
            format!(
                "state_dir = \"{d}/state\"\n[broker]\nembedded = false\nurl = \"mqtt://127.0.0.1:1883\"\n\
                 username = \"hub\"\npassword_file = \"{d}/hub.pass\"\nmosquitto_pid_file = \"{d}/mosquitto.pid\"\n"
            ),
        )
        .expect("hub.toml");
        HubFiles { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn start_broker(&self) -> Option<Mosquitto> {
        let bin = match mosquitto_path() {
            Some(bin) => bin,
            None => {
                // Same rule as common::require_mosquitto.
                assert_ne!(std::env::var("FIELDLINK_REQUIRE_MOSQUITTO").as_deref(), Ok("1"), "mosquitto is missing");
                eprintln!("skipping: mosquitto is not installed");
                return None;
            }
        };
        let auth = format!(
            "{}password_file {}\nacl_file {}\n",
            shipped_policy(),
            self.file("state/mosquitto.passwd"),
            self.file("state/mosquitto.acl")
        );
        let broker = Mosquitto::start_with(bin, false, &auth);
        fs::write(self.file("mosquitto.pid"), format!("{}\n", broker.pid().expect("running"))).expect("pid file");
        Some(broker)
    }

    /// `fieldlink hub device <args> -c hub.toml`: stdout, or a panic.
    fn device(&self, args: &[&str]) -> String {
        let config = self.file("hub.toml");
        let mut all = vec!["hub", "device"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-c", &config]);
        let out = fieldlink(&all);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{all:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    }

    /// `device add`; returns the password it printed.
    fn add(&self, id: &str) -> String {
        let out = self.device(&["add", id]);
        assert!(out.contains("was sent SIGHUP"), "{out}");
        assert!(out.contains(&format!("username = \"{id}\"")), "{out}");
        out.lines().skip_while(|l| !l.contains("shown only now")).nth(2).expect("a password line").trim().to_string()
    }
}

/// A client as `user` that publishes `publishes` at QoS 1 and returns
/// once the broker has acknowledged each (mosquitto acknowledges a publish
/// the ACL refuses, and drops it).
fn publish_as(port: u16, user: &str, password: &str, publishes: &[(&str, &str)]) {
    let mut opts = MqttOptions::new(user, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5)).set_credentials(user, password);
    let (client, mut conn) = Client::new(opts, 100);
    let mut acked = 0;
    for event in conn.iter() {
        match event.expect("the attacker's connection") {
            Event::Incoming(Packet::ConnAck(a)) => {
                assert_eq!(a.code, ConnectReturnCode::Success);
                for (topic, payload) in publishes {
                    client.publish(*topic, QoS::AtLeastOnce, false, payload.as_bytes()).expect("publish");
                }
            }
            Event::Incoming(Packet::PubAck(_)) => {
                acked += 1;
                if acked == publishes.len() {
                    return;
                }
            }
            _ => {}
        }
    }
    panic!("the attacker's connection ended before its publishes were acknowledged")
}

#[test]
fn a_provisioned_device_delivers_and_cannot_touch_another_devices_topics() {
    let hub = HubFiles::new();
    let Some(broker) = hub.start_broker() else { return };
    let port = broker.port();
    let mut agent = Agent::builder("prov-a", port).confirm("hub", "1s").build();
    let a = agent.device().to_string();
    let b = format!("prov-b-{}", std::process::id());
    let pw_a = hub.add(&a);
    let pw_b = hub.add(&b);
    let listed = hub.device(&["list"]);
    let mut expected = [a.as_str(), b.as_str()];
    expected.sort();
    assert_eq!(listed.lines().collect::<Vec<_>>(), expected, "list shows device ids only");
    assert!(
        !listed.contains(&pw_a)
            && !fs::read_to_string(hub.file("state/mosquitto.passwd")).expect("passwd").contains(&pw_a)
    );

    // The hub's user reads everything (once mosquitto has reloaded).
    let watcher = Watcher::connect_as(port, "hub", "hub-secret", "fieldlink/#");

    fs::write(agent.dir().join("mqtt.pass"), format!("{pw_a}\n")).expect("mqtt.pass");
    fs::set_permissions(agent.dir().join("mqtt.pass"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let pass = agent.dir().join("mqtt.pass").display().to_string();
    agent.rewrite_config(|t| {
        t.replacen("[mqtt]\n", &format!("[mqtt]\nusername = \"{a}\"\npassword_file = \"{pass}\"\n"), 1)
    });
    agent.start();
    agent.click(1);
    let msgs =
        watcher.wait_for(|m| button_events(m, &a, "door").len() >= 2, DEADLINE, "the provisioned agent's door events");
    let epoch = button_events(&msgs, &a, "door")[0]["epoch"].as_u64().expect("an epoch");
    let ack_topic = format!("fieldlink/{a}/ack");
    let ack = format!("{{\"epoch\":{epoch},\"seqs\":[[1,1000]]}}");

    assert!(common::connack(port, &a, "wrong-password").is_err(), "a wrong password is refused");
    assert!(common::connack(port, "nobody", &pw_a).is_err(), "an unknown user is refused");

    // B forges A's messages, then publishes a marker of its own.
    let forged = format!(
        "{{\"device\":\"{a}\",\"epoch\":0,\"seq\":999999,\"ts\":\"2026-01-01T00:00:00.000Z\",\"button\":\"door\",\"state\":\"pressed\"}}"
    );
    let (marker_topic, set_topic) = (format!("fieldlink/{b}/marker"), format!("fieldlink/{a}/relay/pump/set"));
    publish_as(
        port,
        &b,
        &pw_b,
        &[
            (&format!("fieldlink/{a}/button/door"), &forged),
            (&set_topic, "on"),
            (&ack_topic, &ack),
            (&marker_topic, "after the forgeries"),
        ],
    );
    let msgs = watcher.wait_for(
        |m| m.iter().any(|m| m.topic == marker_topic),
        DEADLINE,
        "B's own marker (published after its forgeries)",
    );
    let leaked: Vec<_> = msgs
        .iter()
        .filter(|m| {
            m.topic.starts_with(&format!("fieldlink/{a}/"))
                && (m.payload == forged.as_bytes() || m.topic == set_topic || m.topic == ack_topic)
        })
        .collect();
    assert!(leaked.is_empty(), "B's messages under A's prefix got through: {leaked:?}");

    // B subscribes to everything: it gets its own commands only, not A's.
    let spy = Watcher::connect_as(port, &b, &pw_b, "#");
    watcher.publish(&format!("fieldlink/{a}/relay/ghost/set"), "on", 1, false);
    watcher.publish(&format!("fieldlink/{a}/button/door"), "from the hub", 1, false);
    let own = format!("fieldlink/{b}/relay/marker/set");
    watcher.publish(&own, "marker", 1, false);
    let seen = spy.wait_for(|m| m.iter().any(|m| m.topic == own), DEADLINE, "B's own command");
    let foreign: Vec<_> = seen.iter().filter(|m| m.topic != own).collect();
    assert!(foreign.is_empty(), "B, subscribed to #, saw others' messages: {foreign:?}");
    assert_eq!(agent.sim(&["get", common::PUMP_PIN]), "0", "A's pump was not switched by B");

    // Only the hub confirms A's records: through the shipped ACL A reads
    // the hub's P/<a>/ack (and B's forged one never reached it).
    let before = agent.status();
    assert!(before["outbox"]["unconfirmed"].as_u64() > Some(0), "A's records wait for the hub: {before}");
    watcher.publish(&ack_topic, ack.as_str(), 1, false);
    agent.wait_status(|s| s["outbox"]["depth"] == 0, "A's outbox emptied by the hub's confirmation");
}

#[test]
fn a_removed_device_is_disconnected_and_cannot_connect_again() {
    let hub = HubFiles::new();
    let Some(broker) = hub.start_broker() else { return };
    let port = broker.port();
    let id = format!("prov-rm-{}", std::process::id());
    let password = hub.add(&id);
    let watcher = Watcher::connect_as(port, &id, &password, &format!("fieldlink/{id}/sync"));
    let connacks = watcher.connacks();

    let out = hub.device(&["remove", &id]);
    assert!(out.contains("was sent SIGHUP"), "{out}");
    assert!(hub.device(&["list"]).trim().is_empty());
    wait_until(DEADLINE, "the removed device's new connects to be refused", || {
        common::connack(port, &id, &password).is_err().then_some(())
    });
    // mosquitto re-checks connected clients on reload
    // (security_default.c, mosquitto_security_apply_default): the live
    // connection is dropped and its reconnects are refused.
    wait_until(DEADLINE, "the removed device's live connection to be dropped", || (!watcher.connected()).then_some(()));
    assert_eq!(watcher.connacks(), connacks, "the removed device got back in");
}
