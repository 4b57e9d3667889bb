//! Home Assistant discovery, black-box (DESIGN: Home Assistant discovery;
//! issue 9 item 1): the real agent binary (sim GPIO) with
//! `[homeassistant] discovery = true` on a test mosquitto, and MQTT
//! subscribers in the place of Home Assistant, all on 127.0.0.1.
//!
//! * A subscriber that arrives after the agent connected gets every config
//!   as a retained message: what Home Assistant sees when it starts later.
//! * Home Assistant's birth message (`homeassistant/status` = `online`)
//!   makes the agent publish its configs again.
//! * A relay taken out of the config, and then discovery switched off,
//!   leave empty retained configs: the entities disappear.
//!
//! The payload fields themselves are checked against Home Assistant's
//! schema in `src/agent/homeassistant.rs`.

mod common;

use std::time::Duration;

use common::{DEADLINE, Rig, Watcher};
use serde_json::Value;

const DISCOVERY: &str = "[homeassistant]\ndiscovery = true\n";

fn config_topic(device: &str, component: &str, object: &str) -> String {
    format!("homeassistant/{component}/{device}/{object}/config")
}

/// A fresh subscriber to the device's discovery topics: the retained
/// configs it is handed, by topic, once `expected` of them arrived.
fn retained_configs(rig: &Rig, expected: usize) -> Vec<(String, Vec<u8>)> {
    let filter = format!("homeassistant/+/{}/+/config", rig.device());
    let ha = Watcher::connect(rig.broker.port(), &format!("ha-{}", common::unique()), &filter);
    let msgs = ha.wait_for(|m| m.len() >= expected, DEADLINE, "the retained discovery configs");
    assert!(msgs.iter().all(|m| m.retain), "every config is retained");
    msgs.into_iter().map(|m| (m.topic, m.payload)).collect()
}

fn payload_of(configs: &[(String, Vec<u8>)], topic: &str) -> Option<Value> {
    configs.iter().rev().find(|(t, _)| t == topic).map(|(_, p)| serde_json::from_slice(p).expect("a JSON config"))
}

/// The number of configs the test agent announces: door, pump and the six
/// heartbeat fields.
const ANNOUNCED: usize = 8;

#[test]
fn home_assistant_starting_after_the_agent_finds_the_device_in_retained_configs() {
    let Some(mut rig) = Rig::new("ha-find", false, |b| b.extra_toml(DISCOVERY)) else { return };
    rig.start_online();
    let configs = retained_configs(&rig, ANNOUNCED);
    let device = rig.device();

    let door = payload_of(&configs, &config_topic(device, "binary_sensor", "button_door")).expect("the door");
    assert_eq!(door["state_topic"], rig.topic("button/door"));
    assert_eq!(door["availability_topic"], rig.topic("status"));
    let pump = payload_of(&configs, &config_topic(device, "switch", "relay_pump")).expect("the pump");
    assert_eq!(pump["command_topic"], rig.topic("relay/pump/set"));
    assert_eq!(pump["state_topic"], rig.topic("relay/pump/state"));
    assert_eq!(pump["device"]["identifiers"][0], format!("fieldlink_{device}"));
    let cpu = payload_of(&configs, &config_topic(device, "sensor", "cpu")).expect("the CPU sensor");
    assert_eq!(cpu["state_topic"], rig.topic("heartbeat"));
}

#[test]
fn home_assistants_birth_message_makes_the_agent_announce_itself_again() {
    let Some(mut rig) = Rig::new("ha-birth", false, |b| b.extra_toml(DISCOVERY)) else { return };
    rig.start_online();
    let filter = format!("homeassistant/+/{}/+/config", rig.device());
    let ha = Watcher::connect(rig.broker.port(), &format!("ha-{}", common::unique()), &filter);
    ha.wait_for(|m| m.len() >= ANNOUNCED, DEADLINE, "the retained configs");
    let mark = ha.len();

    ha.publish("homeassistant/status", "online", 1, false);
    let again = ha.wait_for(|m| m.len() >= mark + ANNOUNCED, DEADLINE, "the configs published again after the birth");
    let pump = config_topic(rig.device(), "switch", "relay_pump");
    assert!(again[mark..].iter().any(|m| m.topic == pump && !m.payload.is_empty()));

    // `offline` is not a birth.
    let mark = ha.len();
    ha.publish("homeassistant/status", "offline", 1, false);
    ha.publish(&rig.topic("relay/pump/set"), "on", 1, false);
    rig.watcher.wait_for(
        |m| common::relay_states(m, rig.device(), "pump").iter().any(|s| s["state"] == "on"),
        DEADLINE,
        "the pump to switch (the agent handled what came after `offline`)",
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ha.len(), mark, "nothing was announced for `offline`");
}

#[test]
fn a_relay_taken_out_of_the_config_and_then_discovery_switched_off_disappear_from_home_assistant() {
    let Some(mut rig) = Rig::new("ha-remove", false, |b| b.extra_toml(DISCOVERY)) else { return };
    rig.start_online();
    retained_configs(&rig, ANNOUNCED);
    let pump = config_topic(rig.device(), "switch", "relay_pump");
    let door = config_topic(rig.device(), "binary_sensor", "button_door");

    // The relay is taken out of the config; the agent restarts.
    rig.agent.sigterm();
    rig.agent.wait();
    rig.agent.rewrite_config(|text| {
        let start = text.find("[[relay]]").expect("a relay block");
        let end = start + text[start..].find("[heartbeat]").expect("the heartbeat after it");
        format!("{}{}", &text[..start], &text[end..])
    });
    rig.start_online();
    common::wait_until(DEADLINE, "the pump's config to be removed", || {
        rig.broker.retained(&pump).is_none().then_some(())
    });
    assert!(rig.broker.retained(&door).is_some(), "the door stays announced");

    // Discovery switched off: everything announced before is removed.
    rig.agent.sigterm();
    rig.agent.wait();
    rig.agent.rewrite_config(|text| text.replace("discovery = true", "discovery = false"));
    rig.start_online();
    common::wait_until(DEADLINE, "the door's config to be removed", || {
        rig.broker.retained(&door).is_none().then_some(())
    });
}
