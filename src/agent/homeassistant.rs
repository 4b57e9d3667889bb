//! Home Assistant MQTT discovery (DESIGN: Home Assistant discovery): the
//! retained config messages that make a device's buttons, relays, sensors
//! and heartbeat fields appear in Home Assistant by themselves, and the
//! empty retained messages that remove the ones the config no longer has.
//!
//! Sans-IO: it builds topics and payloads from a plain [`Inputs`] and plans
//! what to publish against the set of topics published before
//! ([`Published`], kept in `state_dir`); the Link publishes. It must not
//! touch the network, read the agent's config file, or send anything
//! through the outbox (discovery is state, not history).
//!
//! The payloads follow Home Assistant's documented MQTT discovery schema
//! (<https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery>, and
//! the `binary_sensor.mqtt`, `switch.mqtt` and `sensor.mqtt` pages): one
//! `device` block shared by every entity, availability from `P/D/status`
//! (`online` / `offline`, the agent's retained status and last will), and
//! `unique_id`s that never change for the same device and input.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::fsutil;
use crate::proto::Topics;

/// The file in `state_dir` that remembers which config topics were
/// published, so that a removed input can be removed from Home Assistant.
pub const PUBLISHED_FILE: &str = "homeassistant.json";

/// Home Assistant's default discovery prefix.
pub const DEFAULT_PREFIX: &str = "homeassistant";

/// The payload Home Assistant publishes (retained) on `<prefix>/status`
/// when it starts: every device is expected to publish its configs again.
pub const BIRTH: &[u8] = b"online";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot write '{path}': {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// What discovery describes: the device and its inputs, as configured.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The discovery prefix (`[homeassistant] prefix`).
    pub prefix: &'a str,
    /// The device's own topics.
    pub topics: &'a Topics,
    pub version: &'a str,
    pub buttons: Vec<&'a str>,
    pub relays: Vec<&'a str>,
    /// `[[sensor]]` entries: name and unit (empty for none).
    pub sensors: Vec<(&'a str, &'a str)>,
}

/// One retained discovery message. An empty payload removes the entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The heartbeat fields that become sensors: object id, name, JSON path in
/// the heartbeat, unit, device class, state class, and whether it is a
/// diagnostic entity.
struct HeartbeatField {
    object: &'static str,
    name: &'static str,
    path: &'static str,
    unit: Option<&'static str>,
    device_class: Option<&'static str>,
    diagnostic: bool,
}

const HEARTBEAT_FIELDS: &[HeartbeatField] = &[
    HeartbeatField {
        object: "cpu",
        name: "CPU",
        path: "cpu_percent",
        unit: Some("%"),
        device_class: None,
        diagnostic: false,
    },
    HeartbeatField {
        object: "memory_used",
        name: "Memory used",
        path: "mem_used_bytes",
        unit: Some("B"),
        device_class: Some("data_size"),
        diagnostic: false,
    },
    HeartbeatField {
        object: "disk_free",
        name: "Disk free",
        path: "disk_free_bytes",
        unit: Some("B"),
        device_class: Some("data_size"),
        diagnostic: false,
    },
    HeartbeatField {
        object: "temperature",
        name: "Temperature",
        path: "temp_c",
        unit: Some("°C"),
        device_class: Some("temperature"),
        diagnostic: false,
    },
    HeartbeatField {
        object: "uptime",
        name: "Uptime",
        path: "uptime_s",
        unit: Some("s"),
        device_class: Some("duration"),
        diagnostic: true,
    },
    HeartbeatField {
        object: "outbox_depth",
        name: "Outbox depth",
        path: "outbox.depth",
        unit: None,
        device_class: None,
        diagnostic: true,
    },
];

/// `fieldlink_<device>`: the device's identifier in Home Assistant's device
/// registry and the stem of every `unique_id`.
fn node_id(topics: &Topics) -> String {
    format!("fieldlink_{}", topics.device())
}

/// `<prefix>/<component>/<device>/<object>/config`: the device id alone is
/// the node level, so that a broker ACL can grant each device its own
/// discovery topics with a `%u` pattern (mosquitto allows a substitution
/// only as a whole topic level).
fn config_topic(inputs: &Inputs<'_>, component: &str, object: &str) -> String {
    format!("{}/{component}/{}/{object}/config", inputs.prefix, inputs.topics.device())
}

/// The fields every entity of the device shares: availability, the device
/// block, the origin, and a `unique_id` built from the node id.
fn common(inputs: &Inputs<'_>, object: &str, name: &str) -> Map<String, Value> {
    let node = node_id(inputs.topics);
    let device = json!({
        "identifiers": [node],
        "name": inputs.topics.device(),
        "manufacturer": "fieldlink",
        "model": "fieldlink agent",
        "sw_version": inputs.version,
    });
    let mut m = Map::new();
    m.insert("name".into(), json!(name));
    m.insert("unique_id".into(), json!(format!("{node}_{object}")));
    m.insert("availability_topic".into(), json!(inputs.topics.status()));
    m.insert("payload_available".into(), json!("online"));
    m.insert("payload_not_available".into(), json!("offline"));
    m.insert("device".into(), device);
    m.insert("origin".into(), json!({"name": "fieldlink", "sw_version": inputs.version}));
    m
}

fn message(topic: String, fields: Map<String, Value>) -> Message {
    Message { topic, payload: Value::Object(fields).to_string().into_bytes() }
}

/// The config messages for everything `inputs` describes, in a stable order.
pub fn configs(inputs: &Inputs<'_>) -> Vec<Message> {
    let mut out = Vec::new();
    for &button in &inputs.buttons {
        let object = format!("button_{button}");
        let mut m = common(inputs, &object, button);
        m.insert("state_topic".into(), json!(inputs.topics.button(button)));
        m.insert("value_template".into(), json!("{{ value_json.state }}"));
        m.insert("payload_on".into(), json!("pressed"));
        m.insert("payload_off".into(), json!("released"));
        m.insert("qos".into(), json!(1));
        out.push(message(config_topic(inputs, "binary_sensor", &object), m));
    }
    for &relay in &inputs.relays {
        let object = format!("relay_{relay}");
        let mut m = common(inputs, &object, relay);
        m.insert("command_topic".into(), json!(inputs.topics.relay_set(relay)));
        m.insert("payload_on".into(), json!("on"));
        m.insert("payload_off".into(), json!("off"));
        m.insert("state_topic".into(), json!(inputs.topics.relay_state(relay)));
        m.insert("value_template".into(), json!("{{ value_json.state }}"));
        m.insert("state_on".into(), json!("on"));
        m.insert("state_off".into(), json!("off"));
        m.insert("optimistic".into(), json!(false));
        m.insert("retain".into(), json!(false));
        m.insert("qos".into(), json!(1));
        out.push(message(config_topic(inputs, "switch", &object), m));
    }
    for &(sensor, unit) in &inputs.sensors {
        let object = format!("sensor_{sensor}");
        let mut m = common(inputs, &object, sensor);
        m.insert("state_topic".into(), json!(inputs.topics.sensor(sensor)));
        m.insert("value_template".into(), json!("{{ value_json.value }}"));
        if !unit.is_empty() {
            m.insert("unit_of_measurement".into(), json!(unit));
        }
        m.insert("state_class".into(), json!("measurement"));
        m.insert("qos".into(), json!(1));
        out.push(message(config_topic(inputs, "sensor", &object), m));
    }
    for field in HEARTBEAT_FIELDS {
        let mut m = common(inputs, field.object, field.name);
        m.insert("state_topic".into(), json!(inputs.topics.heartbeat()));
        m.insert("value_template".into(), json!(format!("{{{{ value_json.{} }}}}", field.path)));
        if let Some(unit) = field.unit {
            m.insert("unit_of_measurement".into(), json!(unit));
        }
        if let Some(class) = field.device_class {
            m.insert("device_class".into(), json!(class));
        }
        m.insert("state_class".into(), json!("measurement"));
        if field.diagnostic {
            m.insert("entity_category".into(), json!("diagnostic"));
        }
        m.insert("qos".into(), json!(1));
        out.push(message(config_topic(inputs, "sensor", field.object), m));
    }
    out
}

/// The topics published before, as kept in [`PUBLISHED_FILE`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub topics: BTreeSet<String>,
}

impl Published {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(PUBLISHED_FILE)
    }

    /// What was published before; nothing when the file is missing or
    /// unreadable (then a removed input stays in Home Assistant until the
    /// user deletes it there, and the agent says so in its log).
    pub fn load(state_dir: &Path) -> Published {
        let path = Published::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: not a list of Home Assistant config topics ({e}); \
                     entities removed from the config before now stay in Home Assistant",
                    path.display()
                );
                Published::default()
            }),
            Err(_) => Published::default(),
        }
    }

    /// Remembers what was just published, atomically.
    pub fn save(&self, state_dir: &Path) -> Result<(), DiscoveryError> {
        let path = Published::path(state_dir);
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        fsutil::write_atomic(&path, &bytes).map_err(|source| DiscoveryError::Write { path, source })
    }
}

/// What to publish on a connect or a Home Assistant birth message, and
/// what to remember afterwards.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Configs (retained), then removals (retained, empty payload).
    pub messages: Vec<Message>,
    /// The topics to save in [`PUBLISHED_FILE`] once `messages` are all
    /// acknowledged.
    pub published: Published,
}

/// Plans a round of discovery: every current config, and an empty retained
/// message for each topic published before that the config no longer has.
/// With discovery switched off (`current` empty) it removes everything it
/// published before.
pub fn plan(before: &Published, current: Vec<Message>) -> Plan {
    let now: BTreeSet<String> = current.iter().map(|m| m.topic.clone()).collect();
    let mut messages = current;
    for gone in before.topics.difference(&now) {
        messages.push(Message { topic: gone.clone(), payload: Vec::new() });
    }
    Plan { messages, published: Published { topics: now } }
}

/// A planned round, as the Link carries it: what to publish on every
/// connect and Home Assistant birth, and what to remember once a broker
/// has acknowledged all of it.
#[derive(Debug, Clone)]
pub struct Round {
    /// `Some(prefix)` when discovery is on: the Link subscribes to the
    /// birth topic under it.
    pub birth_prefix: Option<String>,
    pub plan: Plan,
    pub state_dir: PathBuf,
}

impl Round {
    /// Reads what was published before from `state_dir` and plans this
    /// process's round; `None` when there is nothing to publish (discovery
    /// off and nothing published before).
    pub fn prepare(enabled: bool, state_dir: &Path, inputs: &Inputs<'_>) -> Option<Round> {
        let before = Published::load(state_dir);
        let current = if enabled { configs(inputs) } else { Vec::new() };
        let plan = plan(&before, current);
        if plan.messages.is_empty() {
            return None;
        }
        Some(Round {
            birth_prefix: enabled.then(|| inputs.prefix.to_string()),
            plan,
            state_dir: state_dir.to_path_buf(),
        })
    }
}

/// Whether an incoming message is Home Assistant's birth message.
pub fn is_birth(prefix: &str, topic: &str, payload: &[u8]) -> bool {
    topic.strip_prefix(prefix) == Some("/status") && payload.eq_ignore_ascii_case(BIRTH)
}

/// The topic Home Assistant announces its (re)start on.
pub fn birth_topic(prefix: &str) -> String {
    format!("{prefix}/status")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::new("fieldlink", "pi-1")
    }

    fn inputs(t: &Topics) -> Inputs<'_> {
        Inputs {
            prefix: DEFAULT_PREFIX,
            topics: t,
            version: "1.2.3",
            buttons: vec!["door"],
            relays: vec!["pump"],
            sensors: vec![("soil", "%")],
        }
    }

    fn by_topic(all: &[Message], topic: &str) -> Value {
        let m = all.iter().find(|m| m.topic == topic).unwrap_or_else(|| panic!("no config on {topic}"));
        serde_json::from_slice(&m.payload).expect("JSON")
    }

    /// The fields Home Assistant needs on every entity of one device.
    fn assert_common(v: &Value, unique_id: &str) {
        assert_eq!(v["unique_id"], unique_id);
        assert_eq!(v["availability_topic"], "fieldlink/pi-1/status");
        assert_eq!(v["payload_available"], "online");
        assert_eq!(v["payload_not_available"], "offline");
        assert_eq!(v["device"]["identifiers"], json!(["fieldlink_pi-1"]));
        assert_eq!(v["device"]["name"], "pi-1");
        assert_eq!(v["device"]["manufacturer"], "fieldlink");
        assert_eq!(v["device"]["sw_version"], "1.2.3");
        assert_eq!(v["origin"]["name"], "fieldlink");
    }

    #[test]
    fn a_button_is_a_binary_sensor_reading_the_state_field_of_its_messages() {
        let t = topics();
        let all = configs(&inputs(&t));
        let v = by_topic(&all, "homeassistant/binary_sensor/pi-1/button_door/config");
        assert_common(&v, "fieldlink_pi-1_button_door");
        assert_eq!(v["name"], "door");
        assert_eq!(v["state_topic"], "fieldlink/pi-1/button/door");
        assert_eq!(v["value_template"], "{{ value_json.state }}");
        assert_eq!((v["payload_on"].as_str(), v["payload_off"].as_str()), (Some("pressed"), Some("released")));
    }

    #[test]
    fn a_relay_is_a_switch_commanded_on_its_set_topic_with_state_from_its_retained_json() {
        let t = topics();
        let all = configs(&inputs(&t));
        let v = by_topic(&all, "homeassistant/switch/pi-1/relay_pump/config");
        assert_common(&v, "fieldlink_pi-1_relay_pump");
        assert_eq!(v["command_topic"], "fieldlink/pi-1/relay/pump/set");
        // The agent takes plain `on` / `off` as a command.
        assert_eq!((v["payload_on"].as_str(), v["payload_off"].as_str()), (Some("on"), Some("off")));
        assert_eq!(v["state_topic"], "fieldlink/pi-1/relay/pump/state");
        assert_eq!(v["value_template"], "{{ value_json.state }}");
        assert_eq!((v["state_on"].as_str(), v["state_off"].as_str()), (Some("on"), Some("off")));
        assert_eq!(v["optimistic"], false, "the switch waits for the confirmed state");
        assert_eq!(v["retain"], false, "a command must never be retained at the broker");
    }

    #[test]
    fn heartbeat_fields_are_sensors_with_units_and_device_classes() {
        let t = topics();
        let all = configs(&inputs(&t));
        let cpu = by_topic(&all, "homeassistant/sensor/pi-1/cpu/config");
        assert_common(&cpu, "fieldlink_pi-1_cpu");
        assert_eq!(cpu["state_topic"], "fieldlink/pi-1/heartbeat");
        assert_eq!(cpu["value_template"], "{{ value_json.cpu_percent }}");
        assert_eq!(cpu["unit_of_measurement"], "%");
        assert_eq!(cpu["state_class"], "measurement");
        let temp = by_topic(&all, "homeassistant/sensor/pi-1/temperature/config");
        assert_eq!(
            (temp["device_class"].as_str(), temp["unit_of_measurement"].as_str()),
            (Some("temperature"), Some("°C"))
        );
        let disk = by_topic(&all, "homeassistant/sensor/pi-1/disk_free/config");
        assert_eq!(
            (disk["device_class"].as_str(), disk["unit_of_measurement"].as_str()),
            (Some("data_size"), Some("B"))
        );
        let mem = by_topic(&all, "homeassistant/sensor/pi-1/memory_used/config");
        assert_eq!(mem["value_template"], "{{ value_json.mem_used_bytes }}");
        let uptime = by_topic(&all, "homeassistant/sensor/pi-1/uptime/config");
        assert_eq!(
            (uptime["device_class"].as_str(), uptime["entity_category"].as_str()),
            (Some("duration"), Some("diagnostic"))
        );
        let depth = by_topic(&all, "homeassistant/sensor/pi-1/outbox_depth/config");
        assert_eq!(depth["value_template"], "{{ value_json.outbox.depth }}");
        assert_eq!(depth["entity_category"], "diagnostic");
    }

    #[test]
    fn a_sensor_reads_the_value_field_with_its_configured_unit() {
        let t = topics();
        let all = configs(&inputs(&t));
        let v = by_topic(&all, "homeassistant/sensor/pi-1/sensor_soil/config");
        assert_common(&v, "fieldlink_pi-1_sensor_soil");
        assert_eq!(v["state_topic"], "fieldlink/pi-1/sensor/soil");
        assert_eq!(v["value_template"], "{{ value_json.value }}");
        assert_eq!(v["unit_of_measurement"], "%");
    }

    #[test]
    fn every_entity_has_its_own_unique_id_and_topic() {
        let t = topics();
        let all = configs(&inputs(&t));
        let ids: BTreeSet<String> = all
            .iter()
            .map(|m| serde_json::from_slice::<Value>(&m.payload).expect("JSON")["unique_id"].to_string())
            .collect();
        let topics: BTreeSet<&str> = all.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(ids.len(), all.len());
        assert_eq!(topics.len(), all.len());
        // 1 button + 1 relay + 1 sensor + the heartbeat's fields.
        assert_eq!(all.len(), 3 + HEARTBEAT_FIELDS.len());
    }

    #[test]
    fn an_input_gone_from_the_config_is_removed_with_an_empty_retained_config() {
        let t = topics();
        let before = plan(&Published::default(), configs(&inputs(&t))).published;
        let mut fewer = inputs(&t);
        fewer.relays.clear();
        let p = plan(&before, configs(&fewer));
        let removed: Vec<&Message> = p.messages.iter().filter(|m| m.payload.is_empty()).collect();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].topic, "homeassistant/switch/pi-1/relay_pump/config");
        assert!(!p.published.topics.contains(&removed[0].topic), "a removed topic is forgotten");
        // Nothing is removed twice.
        let again = plan(&p.published, configs(&fewer));
        assert!(again.messages.iter().all(|m| !m.payload.is_empty()));
    }

    #[test]
    fn switching_discovery_off_removes_everything_published_before() {
        let t = topics();
        let before = plan(&Published::default(), configs(&inputs(&t))).published;
        let p = plan(&before, Vec::new());
        assert_eq!(p.messages.len(), before.topics.len());
        assert!(p.messages.iter().all(|m| m.payload.is_empty()));
        assert!(p.published.topics.is_empty());
    }

    #[test]
    fn what_was_published_survives_a_restart_and_a_damaged_file_means_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = topics();
        let p = plan(&Published::default(), configs(&inputs(&t)));
        p.published.save(dir.path()).expect("saves");
        assert_eq!(Published::load(dir.path()), p.published);
        std::fs::write(dir.path().join(PUBLISHED_FILE), b"{not json").expect("writes");
        assert_eq!(Published::load(dir.path()), Published::default());
    }

    #[test]
    fn only_home_assistants_online_on_its_status_topic_is_a_birth() {
        assert!(is_birth("homeassistant", "homeassistant/status", b"online"));
        assert!(!is_birth("homeassistant", "homeassistant/status", b"offline"));
        assert!(!is_birth("homeassistant", "homeassistant/statusx", b"online"));
        assert!(!is_birth("ha", "homeassistant/status", b"online"));
        assert_eq!(birth_topic("ha"), "ha/status");
    }
}
