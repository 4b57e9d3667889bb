//! Storage confirmed end to end (issue #7 item 3; DESIGN: Delivery
//! promises): with `outbox.confirm = "hub"` a record leaves the agent's
//! outbox only once the hub has committed it and said so on `P/D/ack`,
//! whatever the broker does. Real `fieldlink agent` and `fieldlink hub`
//! binaries, a real mosquitto (without persistence) or the hub's embedded
//! broker, real `kill -9`, and a real SQLite write lock (another
//! connection in `BEGIN IMMEDIATE`) that holds the hub's commits back, all
//! on 127.0.0.1.
//!
//! * The hub with its embedded broker is `kill -9`ed while the broker has
//!   acknowledged every record and the hub has committed none: once the
//!   hub is back, every record is stored exactly once.
//! * mosquitto without persistence is `kill -9`ed in the same state (most
//!   records still queued at mosquitto for the hub's session, beyond its
//!   in-flight window): the same.
//! * `confirm = "broker"` against a plain mosquitto with no hub drains the
//!   outbox on the broker's acks alone.
//! * `confirm = "hub"` with no hub keeps the records (the status dump
//!   shows them unconfirmed) and delivers them once a hub appears.

mod common;

use serde_json::Value;

use common::hub::{DbLock, Hub, assert_each_seq_once};
use common::{Agent, DEADLINE, require_mosquitto, serial, wait_until};

/// Door edges per test: more than mosquitto's in-flight window towards the
/// hub (`max_inflight_messages`, 20), so most of them wait in mosquitto's
/// queue for the hub's session when it is killed.
const EDGES: u64 = 60;

/// The records an agent makes when it starts: the pump's `startup` state,
/// and its `reconnect` state once the broker says it has no session.
const STARTUP_RECORDS: u64 = 2;

fn n(v: &Value, path: &str) -> u64 {
    v.pointer(path).and_then(Value::as_u64).unwrap_or_else(|| panic!("no {path} in {v}"))
}

/// `EDGES` door edges, as fast as the sim socket takes them.
fn press(agent: &Agent) {
    let mut sim = agent.sim_socket();
    for _ in 0..EDGES {
        sim.door_edge();
    }
}

/// Waits until the agent's startup records are made and confirmed by the
/// hub (the outbox is empty again).
fn wait_startup_confirmed(agent: &Agent) {
    agent.wait_status(
        |s| s["outbox"]["next_seq"] == STARTUP_RECORDS + 1 && s["outbox"]["depth"] == 0,
        "the startup records confirmed by the hub",
    );
}

/// Waits until every record made so far is durable, sent and acknowledged
/// by the broker, and none of them confirmed: `outbox.depth` and
/// `outbox.unconfirmed` both `records`. Returns the dump.
fn wait_all_unconfirmed(agent: &Agent, records: u64) -> Value {
    agent.wait_status(
        |s| s["outbox"]["depth"] == records && s["outbox"]["unconfirmed"] == records && s["link"]["in_flight"] == 0,
        &format!("{records} records acknowledged by the broker and none confirmed by the hub"),
    )
}

/// The agent's outbox drains with nothing waiting for a confirmation, and
/// every record it made (seqs 1..=last, `at_least` of them or more: a lost
/// session adds a `reconnect` state) is stored exactly once.
fn assert_all_stored_once_and_drained(hub: &Hub, agent: &Agent, at_least: u64, what: &str) {
    let s = agent.wait_status(
        |s| s["outbox"]["depth"] == 0 && s["outbox"]["unconfirmed"] == 0 && s["link"]["in_flight"] == 0,
        "an empty outbox with nothing unconfirmed",
    );
    assert_eq!(n(&s, "/outbox/dropped"), 0, "{what}: nothing dropped");
    let last = n(&s, "/outbox/next_seq") - 1;
    assert!(last >= at_least, "{what}: {last} records made, expected at least {at_least}");
    let events = hub.wait_events(agent.device(), None, |e| e.len() as u64 >= last, &format!("{what}: {last} events"));
    assert_each_seq_once(&events, 1..=last, what);
}

#[test]
fn kill_9_of_the_hub_with_its_embedded_broker_while_the_database_is_locked_loses_nothing() {
    let _serial = serial();
    let mut hub = Hub::builder_embedded().start();
    let builder = Agent::builder("confirm-emb", hub.broker_port());
    let password = hub.provision(builder.device());
    let mut agent = builder.credentials(&password).confirm("hub", "1s").door_debounce("0ms").build();
    agent.start();
    // The startup records are confirmed: the hub answers.
    wait_startup_confirmed(&agent);

    let mut lock = DbLock::sqlite(hub.database_url());
    press(&agent);
    wait_all_unconfirmed(&agent, EDGES);

    // The broker acknowledged all of them; the hub committed none.
    hub.kill9();
    lock.release();
    hub.start();
    assert_all_stored_once_and_drained(&hub, &agent, STARTUP_RECORDS + EDGES, "hub kill -9 (embedded broker)");
}

#[test]
fn kill_9_of_mosquitto_without_persistence_while_the_database_is_locked_loses_nothing() {
    let _serial = serial();
    let Some(mut broker) = require_mosquitto(false) else { return };
    let hub = Hub::builder(&broker).start();
    let mut agent = Agent::builder("confirm-mosq", broker.port()).confirm("hub", "1s").door_debounce("0ms").build();
    agent.start();
    wait_startup_confirmed(&agent);

    let mut lock = DbLock::sqlite(hub.database_url());
    press(&agent);
    wait_all_unconfirmed(&agent, EDGES);

    // mosquitto acknowledged all of them and holds most in the hub's queue.
    broker.kill();
    broker.restart();
    lock.release();
    assert_all_stored_once_and_drained(&hub, &agent, STARTUP_RECORDS + EDGES, "mosquitto kill -9 (no persistence)");
    let log = agent.log();
    assert!(log.contains("replaying") || log.contains("sending"), "the agent said it sent records again:\n{log}");
}

#[test]
fn with_confirm_broker_a_plain_broker_with_no_hub_drains_the_outbox() {
    let _serial = serial();
    let Some(broker) = require_mosquitto(false) else { return };
    let mut agent = Agent::builder("confirm-plain", broker.port()).confirm("broker", "1s").door_debounce("0ms").build();
    agent.start();
    press(&agent);
    let s = agent.wait_status(
        |s| s["outbox"]["next_seq"] == STARTUP_RECORDS + EDGES + 1 && s["outbox"]["depth"] == 0,
        "every record made and the outbox empty",
    );
    assert_eq!(n(&s, "/outbox/unconfirmed"), 0);
    assert!(!agent.log().contains("no fieldlink hub has confirmed"), "no warning in broker mode");
}

#[test]
fn with_confirm_hub_and_no_hub_records_stay_unconfirmed_and_are_delivered_once_a_hub_appears() {
    let _serial = serial();
    let Some(broker) = require_mosquitto(false) else { return };
    let mut agent = Agent::builder("confirm-nohub", broker.port()).confirm("hub", "300ms").door_debounce("0ms").build();
    agent.start();
    press(&agent);
    let records = STARTUP_RECORDS + EDGES;
    wait_all_unconfirmed(&agent, records);
    // The time-out ran out and they went again, and are still kept.
    wait_until(DEADLINE, "the agent to send unconfirmed records again", || {
        agent.log().contains("were not confirmed by the hub").then_some(())
    });
    let s = agent.status();
    assert_eq!(n(&s, "/outbox/depth"), records, "nothing left the outbox without a hub: {s}");

    let hub = Hub::builder(&broker).start();
    assert_all_stored_once_and_drained(&hub, &agent, records, "a hub that appeared later");
}
