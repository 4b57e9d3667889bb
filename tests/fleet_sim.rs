//! `fieldlink fleet-sim` against a real hub (black-box: the real binary, a
//! test mosquitto or the hub's embedded broker, the hub's SQLite database):
//! a small fleet's every message is stored exactly once, and the sim's own
//! report says so (sent = acked = stored, 0 lost, 0 duplicates). Nothing
//! here asserts how fast anything was: speed is `benches/fleet.py`'s.

mod common;

use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::Duration;

use common::hub::{Hub, Server, TestDb, query_i64};
use common::{fieldlink_bin, require_mosquitto, run_with_deadline, serial, unique};

const DEVICES: u64 = 20;
/// 2 msg/s for 3 s: 6 messages per device, 120 in all.
const PER_DEVICE: u64 = 6;

fn fleet_sim(args: &[&str]) -> Output {
    let mut cmd = Command::new(fieldlink_bin());
    cmd.arg("fleet-sim").args(args).env("RUST_LOG", "info");
    run_with_deadline(cmd, Duration::from_secs(180))
}

/// A short fleet (`DEVICES` devices, 2 msg/s each for 3 s) against `broker`,
/// checked against the hub's database, with `extra` arguments.
fn short_fleet(broker: &str, prefix: &str, hub: &Hub, extra: &[&str]) -> Output {
    let devices = DEVICES.to_string();
    let mut args = vec![
        "--broker",
        broker,
        "--devices",
        &devices,
        "--rate",
        "2",
        "--duration",
        "3s",
        "--id-prefix",
        prefix,
        "--verify-db",
        hub.database_url(),
    ];
    args.extend_from_slice(extra);
    fleet_sim(&args)
}

/// The `name  value` lines of the sim's report.
fn report(out: &Output) -> HashMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_every_message_stored_once(out: &Output, hub: &Hub, prefix: &str) {
    let total = DEVICES * PER_DEVICE;
    assert_eq!(out.status.code(), Some(0), "fleet-sim exits 0 when nothing was lost\n{}", show(out));
    let r = report(out);
    for (figure, want) in [("sent", total), ("acked", total), ("stored", total), ("lost", 0), ("duplicates", 0)] {
        assert_eq!(r.get(figure).map(String::as_str), Some(want.to_string().as_str()), "{figure}\n{}", show(out));
    }
    let epoch = r.get("epoch").expect("the report names its epoch");
    let db = hub.database_url();
    let rows =
        query_i64(db, &format!("SELECT COUNT(*) FROM messages WHERE device LIKE '{prefix}-%' AND epoch = {epoch}"));
    let distinct = query_i64(
        db,
        &format!(
            "SELECT COUNT(*) FROM (SELECT DISTINCT device, seq FROM messages WHERE device LIKE '{prefix}-%' AND epoch = \
             {epoch}) AS d"
        ),
    );
    assert_eq!((rows, distinct), (total as i64, total as i64), "rows and distinct (device, seq) in the hub's database");
    let devices = query_i64(db, &format!("SELECT COUNT(DISTINCT device) FROM messages WHERE device LIKE '{prefix}-%'"));
    assert_eq!(devices, DEVICES as i64, "every simulated device has rows");
    let kinds = query_i64(
        db,
        &format!("SELECT COUNT(DISTINCT kind) FROM messages WHERE device LIKE '{prefix}-%' AND epoch = {epoch}"),
    );
    assert_eq!(kinds, 3, "buttons, heartbeats and relay states were all sent and stored");
}

#[test]
fn twenty_simulated_devices_through_mosquitto_have_every_message_stored_exactly_once() {
    let _serial = serial();
    let Some(broker) = require_mosquitto(false) else { return };
    fleet_through_mosquitto(&broker, Hub::builder(&broker).start());
}

#[test]
fn the_sim_reads_back_a_mariadb_hub() {
    let _serial = serial();
    let Some(broker) = require_mosquitto(false) else { return };
    let Some(db) = TestDb::create(Server::MariaDb) else { return };
    fleet_through_mosquitto(&broker, Hub::builder(&broker).database(db.url()).start());
}

#[test]
fn the_sim_reads_back_a_postgresql_hub() {
    let _serial = serial();
    let Some(broker) = require_mosquitto(false) else { return };
    let Some(db) = TestDb::create(Server::Postgres) else { return };
    fleet_through_mosquitto(&broker, Hub::builder(&broker).database(db.url()).start());
}

fn fleet_through_mosquitto(broker: &common::Mosquitto, mut hub: Hub) {
    let prefix = format!("fleet{}", unique());
    let url = format!("mqtt://127.0.0.1:{}", broker.port());
    let out = short_fleet(&url, &prefix, &hub, &[]);
    assert_every_message_stored_once(&out, &hub, &prefix);
    assert_eq!(hub.sigterm().code(), Some(0), "the hub's exit on SIGTERM");
}

#[test]
fn provisioned_simulated_devices_log_in_to_the_embedded_broker_and_are_all_stored() {
    let _serial = serial();
    let mut hub = Hub::builder_embedded().start();
    let prefix = format!("fleet{}", unique());
    let password_file = hub.dir().join("sim.pass");
    let url = format!("mqtt://127.0.0.1:{}", hub.broker_port());
    let hub_toml = hub.config_path().display().to_string();
    let password_file = password_file.display().to_string();
    let out = short_fleet(&url, &prefix, &hub, &["--provision", &hub_toml, "--password-file", &password_file]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("{DEVICES} simulated device(s) added")),
        "{}",
        show(&out)
    );
    assert_every_message_stored_once(&out, &hub, &prefix);
    assert_eq!(hub.sigterm().code(), Some(0), "the hub's exit on SIGTERM");
}

#[test]
fn a_fleet_without_credentials_on_the_embedded_broker_is_refused_with_a_reason() {
    let _serial = serial();
    let mut hub = Hub::builder_embedded().start();
    let url = format!("mqtt://127.0.0.1:{}", hub.broker_port());
    let out = fleet_sim(&["--broker", &url, "--devices", "2", "--duration", "1s", "--connect-timeout", "20s"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not connect") || err.contains("devices connected"), "{}", show(&out));
    assert_eq!(hub.sigterm().code(), Some(0), "the hub's exit on SIGTERM");
}

#[test]
fn a_fleet_over_tls_to_the_embedded_broker_has_every_message_stored() {
    let _serial = serial();
    let mut hub = Hub::builder_embedded().tls().start();
    let prefix = format!("fleet{}", unique());
    let tls_port = hub.tls_port().expect("an mqtts listener");
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls/ca.pem");
    let password_file = hub.dir().join("sim.pass");
    let (url, ca) = (format!("mqtts://localhost:{tls_port}"), ca.display().to_string());
    let (hub_toml, password_file) = (hub.config_path().display().to_string(), password_file.display().to_string());
    let out = short_fleet(
        &url,
        &prefix,
        &hub,
        &["--ca-file", &ca, "--provision", &hub_toml, "--password-file", &password_file],
    );
    assert_every_message_stored_once(&out, &hub, &prefix);
    assert_eq!(hub.sigterm().code(), Some(0), "the hub's exit on SIGTERM");
}
