//! Sensors and metrics end to end (DESIGN: Sensors, Metrics; issue 9 items
//! 3 and 6): the real `fieldlink agent` (simulated GPIO) with a `file`
//! sensor in a temp dir, a real mosquitto, the real `fieldlink hub`.
//!
//! * A reading written to the file reaches `GET /api/devices` (newest value
//!   per sensor) and `GET /api/devices/{d}/events?kind=sensor`.
//! * Removing the file makes the sensor fail: one `sensor_failed` error,
//!   however many readings fail, and the value comes back when the file does.
//! * `GET /metrics` needs the token on the web port, is open on
//!   `metrics_listen`, parses as the Prometheus text format, and its
//!   counters move with the traffic.
//! * The agent's node_exporter textfile is written after a heartbeat and
//!   parses too.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::hub::{Auth, Hub};
use common::{DEADLINE, Rig, free_port, wait_until};
use serde_json::Value;

/// A parsed exposition: `name{labels}` -> value. Panics on any line that is
/// neither a `# HELP`/`# TYPE` comment nor `name{labels} value`, and on a
/// sample whose metric has no `# TYPE` before it.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut typed = Vec::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split(' ');
            let name = words.next().expect("a metric name");
            let kind = words.next().expect("a metric type");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "type of {name}: {kind}");
            typed.push(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not 'name value': {line:?}"));
        let name = series.split('{').next().expect("a name");
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "labels in {line:?}");
        }
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(typed.iter().any(|t| t == name || t == base), "{name} has no # TYPE before it");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in {line:?}"));
        samples.insert(series.to_string(), value);
    }
    samples
}

fn metric(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples.get(series).unwrap_or_else(|| panic!("no {series} in {samples:?}"))
}

fn sensor_value(hub: &Hub, device: &str) -> Option<f64> {
    hub.device(device)?["sensors"]["tank"]["value"].as_f64()
}

fn sensor_failures(hub: &Hub, device: &str) -> usize {
    hub.events(device, "kind=error&limit=1000").iter().filter(|e| e["payload"]["code"] == "sensor_failed").count()
}

#[test]
fn a_file_sensor_reading_reaches_the_api_fails_once_and_shows_in_the_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("temp1_input");
    std::fs::write(&file, "21500\n").expect("write the sensor file");
    let textfile = dir.path().join("fieldlink.prom");
    let sensor = format!(
        "[[sensor]]\nname = \"tank\"\nkind = \"file\"\npath = \"{}\"\nscale = 0.001\nunit = \"°C\"\ninterval = \"200ms\"\n\
         [metrics]\ntextfile = \"{}\"\n",
        file.display(),
        textfile.display()
    );
    let Some(mut rig) = Rig::new("sensors", false, |b| b.heartbeat_interval("1s").extra_toml(&sensor)) else { return };
    let metrics_port = free_port();
    let hub = Hub::builder(&rig.broker).web_extra(&format!("metrics_listen = \"127.0.0.1:{metrics_port}\"")).start();
    rig.start_online();
    let device = rig.device().to_string();

    // A reading reaches the device list and the events.
    wait_until(DEADLINE, "the API to show tank = 21.5", || (sensor_value(&hub, &device) == Some(21.5)).then_some(()));
    let d = hub.device(&device).expect("listed");
    assert_eq!(d["sensors"]["tank"]["unit"], "°C");
    std::fs::write(&file, "23000\n").expect("write the sensor file");
    wait_until(DEADLINE, "the API to show tank = 23", || (sensor_value(&hub, &device) == Some(23.0)).then_some(()));
    let events = hub.events(&device, "kind=sensor&limit=1000");
    assert!(events.iter().all(|e| e["kind"] == "sensor" && e["name"] == "tank"), "{events:?}");
    let values: Vec<f64> = events.iter().filter_map(|e| e["payload"]["value"].as_f64()).collect();
    assert!(values.contains(&21.5) && values.contains(&23.0), "{values:?}");

    // The file goes away: one sensor_failed, however many readings fail;
    // it comes back: the value is published again.
    std::fs::remove_file(&file).expect("remove the sensor file");
    wait_until(DEADLINE, "a sensor_failed error", || (sensor_failures(&hub, &device) >= 1).then_some(()));
    // Readings go on failing every 200 ms; let a few more fail, seen from
    // the agent's side as more of its own heartbeats stored meanwhile.
    let beats = hub.events(&device, "kind=heartbeat&limit=1000").len();
    wait_until(DEADLINE, "two more heartbeats while the sensor fails", || {
        (hub.events(&device, "kind=heartbeat&limit=1000").len() >= beats + 2).then_some(())
    });
    std::fs::write(&file, "19250\n").expect("write the sensor file");
    wait_until(DEADLINE, "the API to show tank = 19.25", || (sensor_value(&hub, &device) == Some(19.25)).then_some(()));
    // Everything the agent recorded before the recovered reading is stored
    // before it (one outbox, in seq order), so the count is final.
    let failed: Vec<Value> = hub
        .events(&device, "kind=error&limit=1000")
        .into_iter()
        .filter(|e| e["payload"]["code"] == "sensor_failed")
        .collect();
    assert_eq!(failed.len(), 1, "one error per failure: {failed:?}");
    assert_eq!(failed[0]["payload"]["topic"], format!("fieldlink/{device}/sensor/tank"));
    assert!(failed[0]["payload"]["message"].as_str().unwrap_or("").contains("no such file"), "{failed:?}");

    // /metrics: token on the web port, open on metrics_listen.
    assert_eq!(hub.request("GET", "/metrics", Auth::Missing, None).status, 401);
    let (status, body) = hub.get("/metrics");
    assert_eq!(status, 200, "{body}");
    let m = parse_exposition(body.as_str().expect("text"));
    assert!(metric(&m, "fieldlink_hub_messages_stored_total{kind=\"sensor\"}") >= 3.0, "{m:?}");
    assert!(metric(&m, "fieldlink_hub_messages_stored_total{kind=\"error\"}") >= 1.0, "{m:?}");
    assert_eq!(metric(&m, "fieldlink_hub_devices_online"), 1.0);
    assert_eq!(metric(&m, "fieldlink_hub_database_up"), 1.0);
    let count = metric(&m, "fieldlink_hub_ingest_latency_seconds_count");
    assert!(count >= 3.0, "{m:?}");
    assert_eq!(metric(&m, "fieldlink_hub_ingest_latency_seconds_bucket{le=\"+Inf\"}"), count);
    let open = ureq::get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .call()
        .expect("metrics_listen answers without a token")
        .body_mut()
        .read_to_string()
        .expect("text");
    let later = parse_exposition(&open);
    assert!(
        metric(&later, "fieldlink_hub_messages_stored_total{kind=\"sensor\"}")
            >= metric(&m, "fieldlink_hub_messages_stored_total{kind=\"sensor\"}")
    );

    // The agent's textfile: written on each heartbeat, parseable, and it
    // counts the connect.
    let agent_metrics = wait_until(DEADLINE, "the agent's metrics textfile", || {
        let text = std::fs::read_to_string(&textfile).ok()?;
        let m = parse_exposition(&text);
        let dev = format!("device=\"{device}\"");
        (m.get(&format!("fieldlink_agent_link_connects_total{{{dev}}}")).copied() >= Some(1.0)).then_some(m)
    });
    let dev = format!("device=\"{device}\"");
    assert!(metric(&agent_metrics, &format!("fieldlink_agent_last_connect_timestamp_seconds{{{dev}}}")) > 1.7e9);
    assert_eq!(metric(&agent_metrics, &format!("fieldlink_agent_actor_restarts_total{{{dev},actor=\"sensor\"}}")), 0.0);
    assert!(agent_metrics.contains_key(&format!("fieldlink_agent_outbox_depth{{{dev}}}")));
    assert!(!Path::new(&format!("{}.tmp", textfile.display())).exists(), "no temporary file left");
}

#[test]
fn metrics_text_that_breaks_the_format_fails_the_parser() {
    // The parser above is the test's oracle: make sure it can say no.
    for bad in ["fieldlink_x 1", "# TYPE a counter\na{b=1 2", "# TYPE a counter\na one", "# TYPE a thing\na 1"] {
        assert!(std::panic::catch_unwind(|| parse_exposition(bad)).is_err(), "{bad:?} was accepted");
    }
}
