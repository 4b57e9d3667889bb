//! Remote control, black-box (DESIGN: Topics and payloads, command rules):
//! commands reach the relay even when sent while the agent was offline,
//! refused commands change nothing and produce exactly one `error` message
//! each, and a relay with `power_on_state = "last"` comes back as it was
//! after a restart without a glitch on its pin.

mod common;

use common::{DEADLINE, PUMP_PIN, Rig, check_envelope, errors, records, relay_states, rfc3339_from_now, seq};
use serde_json::{Value, json};

/// Publishes `payload` to the pump's set topic and waits for the next state
/// message with cause `command`; returns it.
fn command_and_wait(rig: &Rig, payload: &[u8], what: &str) -> Value {
    let mark = rig.watcher.len();
    let newest = records(&rig.watcher.messages()).iter().map(|(_, v)| seq(v)).max().unwrap_or(0);
    rig.watcher.publish(&rig.topic("relay/pump/set"), payload, 1, false);
    let device = rig.device().to_string();
    let is_new_command_state = |v: &Value| v["cause"] == "command" && seq(v) > newest;
    let msgs = rig.watcher.wait_for_since(
        mark,
        |m| relay_states(m, &device, "pump").iter().any(is_new_command_state),
        DEADLINE,
        what,
    );
    relay_states(&msgs, &device, "pump").into_iter().find(is_new_command_state).expect("the wait above found it")
}

#[test]
fn a_command_sent_while_the_agent_is_offline_is_applied_after_the_link_heals() {
    let Some(mut rig) = Rig::new("cmd-offline", false, |b| b) else { return };
    rig.start_online();
    // Once a command went through, the broker holds the agent's persistent
    // session with its subscription.
    rig.command_confirmed("pump", "off", "warm-up");
    rig.cut();

    let mark = rig.watcher.len();
    let id = "while-offline";
    let body = json!({"state": "on", "id": id, "expires_at": rfc3339_from_now(300)}).to_string();
    rig.watcher.publish(&rig.topic("relay/pump/set"), body, 1, false);
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "0", "nothing can reach the agent while the link is down");
    rig.proxy.heal();

    let device = rig.device().to_string();
    let msgs = rig.watcher.wait_for_since(
        mark,
        |m| relay_states(m, &device, "pump").iter().any(|v| v["command_id"] == id),
        DEADLINE,
        "the queued command to be applied after the link healed",
    );
    let state = relay_states(&msgs, &device, "pump").into_iter().find(|v| v["command_id"] == id).expect("found above");
    check_envelope(&state, &device);
    assert_eq!(state["relay"], "pump");
    assert_eq!(state["state"], "on");
    assert_eq!(state["cause"], "command");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "1", "the pump's pin is driven high");
}

/// One refused command and the error it must produce.
struct Refused {
    what: &'static str,
    relay: &'static str,
    payload: Vec<u8>,
    code: &'static str,
    /// The command's id, which the error must carry; `None`: the command had
    /// none, and the error's `command_id` is null.
    id: Option<&'static str>,
}

impl Refused {
    fn topic(&self, rig: &Rig) -> String {
        rig.topic(&format!("relay/{}/set", self.relay))
    }

    /// Whether `v` is the error this command must produce.
    fn is_its_error(&self, v: &Value, topic: &str) -> bool {
        v["code"] == self.code && v["topic"] == topic && v["command_id"] == self.id.map_or(Value::Null, Value::from)
    }
}

#[test]
fn refused_commands_change_nothing_and_each_produce_exactly_one_error_message() {
    let Some(mut rig) = Rig::new("cmd-refused", false, |b| b) else { return };
    rig.start_online();
    rig.command_confirmed("pump", "off", "warm-up");
    let pin_before = rig.agent.sim(&["get", PUMP_PIN]);
    let start = rig.watcher.len();
    let device = rig.device().to_string();

    let oversized = format!(r#"{{"state":"on","pad":"{}"}}"#, "x".repeat(2048));
    let cases = [
        Refused {
            what: "an expired command",
            relay: "pump",
            payload: json!({"state": "on", "id": "c-expired", "expires_at": rfc3339_from_now(-60)})
                .to_string()
                .into_bytes(),
            code: "expired",
            id: Some("c-expired"),
        },
        Refused {
            what: "a malformed command",
            relay: "pump",
            payload: b"{not json".to_vec(),
            code: "bad_payload",
            id: None,
        },
        Refused {
            what: "an oversized command",
            relay: "pump",
            payload: oversized.into_bytes(),
            code: "too_large",
            id: None,
        },
        Refused {
            what: "a wrong-typed command",
            relay: "pump",
            payload: br#"{"state":1,"id":"c-wrong-type"}"#.to_vec(),
            code: "bad_payload",
            id: Some("c-wrong-type"),
        },
        Refused {
            what: "a command for an unknown relay",
            relay: "nope",
            payload: br#"{"state":"on","id":"c-unknown"}"#.to_vec(),
            code: "unknown_relay",
            id: Some("c-unknown"),
        },
    ];

    for case in &cases {
        let topic = case.topic(&rig);
        let matches = |v: &Value| case.is_its_error(v, &topic);
        let mark = rig.watcher.len();
        rig.watcher.publish(&topic, case.payload.clone(), 1, false);
        let msgs = rig.watcher.wait_for_since(
            mark,
            |m| errors(m, &device).iter().any(matches),
            DEADLINE,
            &format!("an error '{}' for {}", case.code, case.what),
        );
        let err = errors(&msgs, &device).into_iter().find(|v| matches(v)).expect("found above");
        check_envelope(&err, &device);
        assert!(err["message"].as_str().is_some_and(|s| !s.is_empty()), "the error says what was wrong: {err}");
        assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), pin_before, "{} changed the pump", case.what);
    }

    // Still running, still obeying.
    let good = rig.command_confirmed("pump", "on", "c-good");
    assert_eq!(good["state"], "on");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "1");

    // Everything recorded before the good command's state has arrived by now
    // (records are sent in seq order): count what the refusals produced.
    let msgs = rig.watcher.messages()[start..].to_vec();
    let errs = errors(&msgs, &device);
    for case in &cases {
        let topic = case.topic(&rig);
        let n = errs.iter().filter(|v| case.is_its_error(v, &topic)).count();
        assert_eq!(n, 1, "{} should produce exactly one error; errors: {errs:#?}", case.what);
    }
    assert_eq!(errs.len(), cases.len(), "one error per refused command, no more: {errs:#?}");
    let by_command: Vec<_> =
        relay_states(&msgs, &device, "pump").into_iter().filter(|v| v["cause"] == "command").collect();
    assert_eq!(by_command.len(), 1, "only the good command moved the relay: {by_command:#?}");
    assert_eq!(by_command[0]["command_id"], "c-good");
}

#[test]
fn a_relay_with_power_on_state_last_comes_back_on_after_a_restart_without_a_glitch() {
    let Some(mut rig) = Rig::new("cmd-last", false, |b| b.power_on_state("last")) else { return };
    rig.start_online();
    let on = rig.command_confirmed("pump", "on", "c-on");
    assert_eq!(on["state"], "on");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "1");
    // The sim socket goes away with the agent: count the pin's changes now.
    let changes = rig.agent.sim(&["changes", PUMP_PIN]);
    let newest = records(&rig.watcher.messages()).iter().map(|(_, v)| seq(v)).max().expect("records arrived");

    rig.agent.sigterm();
    assert_eq!(rig.agent.wait().code(), Some(0), "SIGTERM is a clean exit");
    let mark = rig.watcher.len();
    rig.agent.start();
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "1", "the pump is on again after the restart");
    assert_eq!(rig.agent.sim(&["changes", PUMP_PIN]), changes, "the pump's pin did not move during the restart");

    let device = rig.device().to_string();
    let msgs = rig.watcher.wait_for_since(
        mark,
        |m| relay_states(m, &device, "pump").iter().any(|v| seq(v) > newest),
        DEADLINE,
        "a pump state message from the restarted agent",
    );
    let first = relay_states(&msgs, &device, "pump").into_iter().find(|v| seq(v) > newest).expect("found above");
    check_envelope(&first, &device);
    assert_eq!(first["cause"], "startup", "the first state after a restart: {first}");
    assert_eq!(first["state"], "on", "the first state after a restart: {first}");
}

#[test]
fn plain_text_commands_in_any_case_switch_the_relay() {
    let Some(mut rig) = Rig::new("cmd-plain", false, |b| b) else { return };
    rig.start_online();
    rig.command_confirmed("pump", "off", "warm-up");

    let toggled = command_and_wait(&rig, b"TOGGLE", "the relay to confirm a plain TOGGLE");
    assert_eq!(toggled["state"], "on", "TOGGLE from off: {toggled}");
    assert_eq!(toggled["command_id"], Value::Null, "a plain command has no id: {toggled}");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "1");

    let off = command_and_wait(&rig, b"Off", "the relay to confirm a plain Off");
    assert_eq!(off["state"], "off", "Off: {off}");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "0");
}

#[test]
fn a_command_delivered_twice_with_the_same_id_is_applied_once() {
    let Some(mut rig) = Rig::new("cmd-twice", false, |b| b) else { return };
    rig.start_online();
    rig.command_confirmed("pump", "off", "warm-up");

    let body = json!({"state": "toggle", "id": "t-1", "expires_at": rfc3339_from_now(300)}).to_string();
    let first = command_and_wait(&rig, body.as_bytes(), "the relay to confirm the first toggle");
    assert_eq!(first["state"], "on", "the first delivery toggles: {first}");

    // The broker redelivers a command whose ack was lost; the same id again.
    let again = command_and_wait(&rig, body.as_bytes(), "the relay to answer the redelivered toggle");
    assert_eq!(again["state"], "on", "a redelivery must not toggle back: {again}");
    assert_eq!(again["command_id"], "t-1", "the answer names the command: {again}");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "1");

    let next = json!({"state": "toggle", "id": "t-2", "expires_at": rfc3339_from_now(300)}).to_string();
    let toggled = command_and_wait(&rig, next.as_bytes(), "the relay to confirm a new toggle");
    assert_eq!(toggled["state"], "off", "a new id toggles again: {toggled}");
}
