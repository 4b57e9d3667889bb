//! Remote control, black-box (DESIGN: Topics and payloads, command rules):
//! commands reach the relay even when sent while the agent was offline,
//! refused commands change nothing and produce exactly one `error` message
//! each (a topic naming no relay and a failed pin included), and a relay
//! with `power_on_state = "last"` comes back as it was after a restart
//! without a glitch on its pin.
//!
//! At most once (#6): commands whose PUBACKs were lost are delivered again
//! by the broker after a reconnect (with DUP set) and are not applied again,
//! JSON commands with ids and plain toggles alike; 300 plain toggles queued
//! while the agent was offline switch the relay at most once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::proxy::{Rule, packet};
use common::{
    Agent, DEADLINE, Dir, Mosquitto, PUMP_PIN, Proxy, Rig, Verdict, Watcher, check_envelope, errors, has_status,
    records, relay_states, require_mosquitto, rfc3339_from_now, seq, serial, topic, wait_until,
};
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

// ---------------------------------------------------------------------------
// At most once (DESIGN: Command rules, #6)

/// Counts what the PUBACK filter saw (see [`puback_filter`]).
#[derive(Default)]
struct FilterCounts {
    /// Lose the agent's PUBACKs while set.
    drop_pubacks: AtomicBool,
    /// Lose the agent's PUBLISH packets (its records never reach the broker) while set.
    drop_publishes: AtomicBool,
    /// PUBACKs from the agent that were dropped / forwarded.
    dropped: AtomicUsize,
    forwarded: AtomicUsize,
    /// PUBLISH packets from the broker with the DUP flag set.
    redelivered: AtomicUsize,
}

/// A packet rule for the harness's [`Proxy`] that loses the agent's PUBACKs
/// on purpose while told to (so the broker must deliver those commands
/// again), and counts the broker's redeliveries (PUBLISH with DUP set).
fn puback_filter(counts: Arc<FilterCounts>) -> Rule {
    Box::new(move |dir, frame| {
        let kind = packet::kind(frame);
        if dir == Dir::ToBroker && kind == packet::PUBACK {
            if counts.drop_pubacks.load(Ordering::SeqCst) {
                counts.dropped.fetch_add(1, Ordering::SeqCst);
                return Verdict::Drop;
            }
            counts.forwarded.fetch_add(1, Ordering::SeqCst);
        }
        if dir == Dir::ToBroker && kind == packet::PUBLISH && counts.drop_publishes.load(Ordering::SeqCst) {
            return Verdict::Drop;
        }
        if dir == Dir::ToClient && kind == packet::PUBLISH && frame[0] & 0x08 != 0 {
            counts.redelivered.fetch_add(1, Ordering::SeqCst);
        }
        Verdict::Forward
    })
}

/// Broker, filter, watcher and agent (fields drop in this order: agent
/// first, broker last, then the serial lock).
struct FilterRig {
    agent: Agent,
    watcher: Watcher,
    filter: Proxy,
    counts: Arc<FilterCounts>,
    _broker: Mosquitto,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl FilterRig {
    fn new(name: &str) -> Option<FilterRig> {
        let serial = serial();
        let broker = require_mosquitto(false)?;
        let filter = Proxy::start(broker.port());
        let counts = Arc::new(FilterCounts::default());
        filter.set_rule(Some(puback_filter(Arc::clone(&counts))));
        let agent = Agent::builder(name, filter.port()).build();
        let watcher = Watcher::for_device(broker.port(), agent.device());
        let mut rig = FilterRig { agent, watcher, filter, counts, _broker: broker, _serial: serial };
        let mark = rig.watcher.len();
        rig.agent.start();
        let device = rig.agent.device().to_string();
        rig.watcher.wait_for_since(mark, |m| has_status(m, &device, b"online"), DEADLINE, "the agent to be online");
        rig.confirmed(
            &json!({"state": "off", "id": "warm-up", "expires_at": rfc3339_from_now(300)}).to_string(),
            "warm-up",
        );
        Some(rig)
    }

    fn set_topic(&self) -> String {
        topic(self.agent.device(), "relay/pump/set")
    }

    /// Publishes a command and waits for the pump state naming `id`.
    fn confirmed(&self, body: &str, id: &str) -> Value {
        let mark = self.watcher.len();
        self.watcher.publish(&self.set_topic(), body, 1, false);
        let device = self.agent.device().to_string();
        let is_it = |v: &Value| v["command_id"] == id;
        let msgs = self.watcher.wait_for_since(
            mark,
            |m| relay_states(m, &device, "pump").iter().any(is_it),
            DEADLINE,
            &format!("the pump to confirm command '{id}'"),
        );
        relay_states(&msgs, &device, "pump").into_iter().find(is_it).expect("the wait above found it")
    }

    fn pump_changes(&self) -> u64 {
        self.agent.sim(&["changes", PUMP_PIN]).parse().expect("a count of changes")
    }

    /// Publishes `commands` while the agent's PUBACKs are lost, waits until
    /// the agent applied them all (`applied` holds on the pump states since)
    /// and acknowledged them (lost); then cuts the link and heals it, so the
    /// broker delivers them again on the resumed session; returns once the
    /// agent has acknowledged every redelivery.
    fn redeliver(&self, commands: &[&str], applied: impl Fn(&[Value]) -> bool) {
        let mark = self.watcher.len();
        let dropped = self.counts.dropped.load(Ordering::SeqCst);
        self.counts.drop_pubacks.store(true, Ordering::SeqCst);
        for c in commands {
            self.watcher.publish(&self.set_topic(), *c, 1, false);
        }
        let device = self.agent.device().to_string();
        self.watcher.wait_for_since(
            mark,
            |m| applied(&relay_states(m, &device, "pump")),
            DEADLINE,
            "the agent to apply the commands",
        );
        let n = commands.len();
        wait_until(DEADLINE, &format!("the agent to acknowledge {n} commands (PUBACKs lost)"), || {
            (self.counts.dropped.load(Ordering::SeqCst) >= dropped + n).then_some(())
        });
        let redelivered = self.counts.redelivered.load(Ordering::SeqCst);
        let forwarded = self.counts.forwarded.load(Ordering::SeqCst);
        self.filter.cut();
        self.counts.drop_pubacks.store(false, Ordering::SeqCst);
        self.filter.heal();
        wait_until(DEADLINE, &format!("the broker to deliver the {n} commands again, with DUP set"), || {
            (self.counts.redelivered.load(Ordering::SeqCst) >= redelivered + n).then_some(())
        });
        wait_until(DEADLINE, &format!("the agent to acknowledge the {n} redeliveries"), || {
            (self.counts.forwarded.load(Ordering::SeqCst) >= forwarded + n).then_some(())
        });
    }
}

#[test]
fn two_unacknowledged_commands_with_ids_redelivered_after_a_reconnect_are_each_applied_once() {
    let Some(rig) = FilterRig::new("cmd-redeliver-ids") else { return };
    let changes = rig.pump_changes();
    let a = json!({"state": "on", "id": "A", "expires_at": rfc3339_from_now(300)}).to_string();
    let b = json!({"state": "off", "id": "B", "expires_at": rfc3339_from_now(300)}).to_string();
    rig.redeliver(&[&a, &b], |states| {
        states.iter().any(|v| v["command_id"] == "A") && states.iter().any(|v| v["command_id"] == "B")
    });
    assert_eq!(rig.pump_changes(), changes + 2, "A switched the pump on and B off, once each: no re-switching");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "0", "B (off) was the last command");
    // Still obeying; and what it recorded in between was sent in order.
    let c = rig.confirmed(&json!({"state": "on", "id": "C", "expires_at": rfc3339_from_now(300)}).to_string(), "C");
    assert_eq!(c["state"], "on");
    assert_eq!(c["epoch"].as_u64().map(|_| ()), Some(()), "payloads carry an epoch: {c}");
    assert_eq!(rig.pump_changes(), changes + 3);
}

#[test]
fn a_kill_9_between_recording_commands_and_acknowledging_them_neither_applies_them_twice_nor_loses_their_states() {
    let Some(mut rig) = FilterRig::new("cmd-kill9") else { return };
    let changes = rig.pump_changes();
    // The agent's records and PUBACKs go nowhere: what it recorded stays in
    // its outbox, and the broker still holds both commands as unacknowledged.
    rig.counts.drop_publishes.store(true, Ordering::SeqCst);
    rig.counts.drop_pubacks.store(true, Ordering::SeqCst);
    let dropped = rig.counts.dropped.load(Ordering::SeqCst);
    let k = json!({"state": "off", "id": "K", "expires_at": rfc3339_from_now(300)}).to_string();
    rig.watcher.publish(&rig.set_topic(), "toggle", 1, false);
    rig.watcher.publish(&rig.set_topic(), k.as_bytes(), 1, false);
    // A PUBACK leaves only once the command's state (and the saved relay
    // state) is durable: both are recorded now, neither acknowledged.
    wait_until(DEADLINE, "the agent to acknowledge both commands (PUBACKs lost)", || {
        (rig.counts.dropped.load(Ordering::SeqCst) >= dropped + 2).then_some(())
    });
    assert_eq!(rig.pump_changes(), changes + 2, "the toggle switched the pump on, K off");
    rig.agent.kill9();

    let mark = rig.watcher.len();
    let redelivered = rig.counts.redelivered.load(Ordering::SeqCst);
    let forwarded = rig.counts.forwarded.load(Ordering::SeqCst);
    rig.counts.drop_publishes.store(false, Ordering::SeqCst);
    rig.counts.drop_pubacks.store(false, Ordering::SeqCst);
    rig.agent.start();
    wait_until(DEADLINE, "the broker to deliver both commands again, with DUP set", || {
        (rig.counts.redelivered.load(Ordering::SeqCst) >= redelivered + 2).then_some(())
    });
    wait_until(DEADLINE, "the restarted agent to acknowledge both redeliveries", || {
        (rig.counts.forwarded.load(Ordering::SeqCst) >= forwarded + 2).then_some(())
    });
    let device = rig.agent.device().to_string();
    let msgs = rig.watcher.wait_for_since(
        mark,
        |m| {
            let states = relay_states(m, &device, "pump");
            states.iter().any(|v| v["command_id"] == "K" && v["cause"] == "command")
                && states.iter().any(|v| v["state"] == "on" && v["cause"] == "command")
        },
        DEADLINE,
        "the states recorded before the kill -9 (the toggle's and K's) to arrive from the outbox",
    );
    assert_eq!(rig.pump_changes(), changes + 2, "neither command was applied again after the restart");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "0", "K (off) is the last command applied");
    let commanded: Vec<Value> =
        relay_states(&msgs, &device, "pump").into_iter().filter(|v| v["cause"] == "command").collect();
    assert_eq!(commanded.len(), 2, "one state per command, none for the redeliveries: {commanded:?}");
}

#[test]
fn a_plain_toggle_redelivered_with_dup_after_a_reconnect_is_applied_once() {
    let Some(rig) = FilterRig::new("cmd-redeliver-toggle") else { return };
    let changes = rig.pump_changes();
    let newest = records(&rig.watcher.messages()).iter().map(|(_, v)| seq(v)).max().unwrap_or(0);
    rig.redeliver(&["toggle"], |states| states.iter().any(|v| v["cause"] == "command" && seq(v) > newest));
    assert_eq!(rig.pump_changes(), changes + 1, "one toggle, one switch");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "1", "toggled from off to on, and not back");
    // A new toggle is a new command (the broker reuses no packet id with DUP
    // clear for a redelivery).
    let mark = rig.watcher.len();
    rig.watcher.publish(&rig.set_topic(), "toggle", 1, false);
    let device = rig.agent.device().to_string();
    rig.watcher.wait_for_since(
        mark,
        |m| relay_states(m, &device, "pump").iter().any(|v| v["state"] == "off" && v["cause"] == "command"),
        DEADLINE,
        "a new toggle to switch the pump off",
    );
    assert_eq!(rig.pump_changes(), changes + 2);
}

#[test]
fn three_hundred_plain_toggles_queued_while_the_agent_is_offline_switch_the_relay_at_most_once() {
    let Some(mut rig) = Rig::new("cmd-backlog", false, |b| b) else { return };
    rig.start_online();
    rig.command_confirmed("pump", "off", "warm-up");
    let changes: u64 = rig.agent.sim(&["changes", PUMP_PIN]).parse().expect("a count");
    rig.cut();
    let topic = rig.topic("relay/pump/set");
    for _ in 0..300 {
        rig.watcher.publish(&topic, "toggle", 1, false);
    }
    let mark = rig.watcher.len();
    rig.proxy.heal();
    // Sent after the 300, so handled after them: once it is confirmed, so
    // is everything before it. "off" with the pump off switches nothing;
    // with an odd number of toggles applied it would switch.
    let device = rig.device().to_string();
    rig.watcher.wait_for_since(
        mark,
        |m| relay_states(m, &device, "pump").iter().any(|v| v["cause"] == "command"),
        DEADLINE,
        "the queued toggles to be applied after the heal",
    );
    let sentinel = rig.command_confirmed("pump", "on", "after-backlog");
    assert_eq!(sentinel["state"], "on");
    let msgs = rig.watcher.messages()[mark..].to_vec();
    let by_toggles: Vec<Value> = relay_states(&msgs, &device, "pump")
        .into_iter()
        .filter(|v| v["cause"] == "command" && v["command_id"].is_null())
        .collect();
    assert_eq!(by_toggles.len(), 1, "300 queued toggles are applied as one: {by_toggles:#?}");
    assert_eq!(by_toggles[0]["state"], "on");
    let after: u64 = rig.agent.sim(&["changes", PUMP_PIN]).parse().expect("a count");
    assert_eq!(after, changes + 1, "the pump switched once (the sentinel found it on already)");
}

#[test]
fn a_command_on_a_topic_that_names_no_relay_gets_an_unknown_relay_error() {
    let Some(mut rig) = Rig::new("cmd-no-relay", false, |b| b) else { return };
    rig.start_online();
    rig.command_confirmed("pump", "off", "warm-up");
    let mark = rig.watcher.len();
    let topic = rig.topic("relay//set");
    rig.watcher.publish(&topic, r#"{"state":"on","id":"nameless"}"#, 1, false);
    let device = rig.device().to_string();
    let msgs = rig.watcher.wait_for_since(
        mark,
        |m| errors(m, &device).iter().any(|v| v["command_id"] == "nameless"),
        DEADLINE,
        "an error for the command on relay//set",
    );
    let err = errors(&msgs, &device).into_iter().find(|v| v["command_id"] == "nameless").expect("found above");
    check_envelope(&err, &device);
    assert_eq!(err["code"], "unknown_relay", "{err}");
    assert_eq!(err["topic"], topic.as_str(), "{err}");
    let message = err["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("'{topic}'")) && message.contains("names no relay"), "{err}");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "0", "nothing switched");
}

#[test]
fn a_command_whose_pin_fails_gets_a_gpio_failed_error_and_does_not_hold_back_later_commands() {
    let Some(mut rig) = Rig::new("cmd-gpio-failed", false, |b| b) else { return };
    rig.start_online();
    rig.command_confirmed("pump", "off", "warm-up");
    assert_eq!(rig.agent.sim(&["fault", PUMP_PIN, "on"]), "ok");
    let mark = rig.watcher.len();
    let body = json!({"state": "on", "id": "broken", "expires_at": rfc3339_from_now(300)}).to_string();
    rig.watcher.publish(&rig.topic("relay/pump/set"), body, 1, false);
    let device = rig.device().to_string();
    let msgs = rig.watcher.wait_for_since(
        mark,
        |m| errors(m, &device).iter().any(|v| v["command_id"] == "broken"),
        DEADLINE,
        "a gpio_failed error for the command whose pin failed",
    );
    let err = errors(&msgs, &device).into_iter().find(|v| v["command_id"] == "broken").expect("found above");
    assert_eq!(err["code"], "gpio_failed", "{err}");
    assert!(err["message"].as_str().is_some_and(|m| m.contains("pump")), "{err}");
    assert_eq!(rig.agent.sim(&["fault", PUMP_PIN, "off"]), "ok");
    // The relay actor restarts; the next command goes through.
    let next = rig.command_confirmed("pump", "on", "after-fault");
    assert_eq!(next["state"], "on");
    assert_eq!(rig.agent.sim(&["get", PUMP_PIN]), "1");
}
