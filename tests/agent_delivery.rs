//! Delivery promises (DESIGN: Delivery promises), black-box: events recorded
//! while the link is down (at QoS 1 and 2, and more of them than fit in the
//! inflight window), across a `kill -9` of the agent, and across a broker
//! restart that lost every session all arrive, in `seq` order, each `seq`
//! naming one record, and the outbox empties once they are acknowledged. The
//! wire may repeat a record; the checks dedupe by `seq` and look at first
//! occurrences.

mod common;

use common::{
    DEADLINE, Msg, Rig, assert_press_release_pairs, assert_seqs_not_reused, assert_strictly_increasing, button_events,
    first_occurrences, records, seq,
};

/// Press/release pairs per test: 20 button messages.
const N: usize = 10;

/// Waits until `n` pairs of door events (after dedupe) are among `msgs`
/// from `mark` on, and returns those messages.
fn wait_for_pairs(rig: &Rig, mark: usize, n: usize) -> Vec<Msg> {
    let device = rig.device().to_string();
    rig.watcher.wait_for_since(
        mark,
        |m| button_events(m, &device, "door").len() >= 2 * n,
        DEADLINE,
        &format!("{} door events", 2 * n),
    )
}

/// The checks every delivery test makes on what arrived after the outage.
fn assert_delivered_in_order(rig: &Rig, msgs: &[Msg], n: usize) {
    let events = button_events(msgs, rig.device(), "door");
    assert_press_release_pairs(&events, rig.device(), "door", n);
    let recs = records(msgs);
    assert_seqs_not_reused(&recs);
    assert_strictly_increasing(&first_occurrences(&recs), "first occurrences of every record");
}

#[test]
fn events_recorded_while_the_link_is_down_arrive_in_order_after_it_heals() {
    let Some(mut rig) = Rig::new("dl-heal", false, |b| b) else { return };
    rig.start_online();
    rig.cut();
    let mark = rig.watcher.len();
    rig.agent.click(N);
    rig.proxy.heal();
    let msgs = wait_for_pairs(&rig, mark, N);
    assert_delivered_in_order(&rig, &msgs, N);
}

#[test]
fn events_recorded_before_a_kill_9_in_always_mode_arrive_in_order_after_a_restart() {
    let Some(mut rig) = Rig::new("dl-kill", false, |b| b.durability("always")) else { return };
    rig.start_online();
    rig.cut();
    let before_outage = rig.watcher.messages();
    let mark = before_outage.len();
    rig.agent.click(N);
    // In `always` mode a record counts once it is durable; the dump says
    // when all of them are in the outbox.
    rig.agent.wait_status(
        |s| {
            s["buttons"]["door"]["presses"] == N as u64
                && s["outbox"]["depth"].as_u64().is_some_and(|d| d >= 2 * N as u64)
        },
        "every press recorded in the outbox",
    );
    rig.agent.kill9();
    rig.agent.start();
    rig.proxy.heal();
    let msgs = wait_for_pairs(&rig, mark, N);
    assert_delivered_in_order(&rig, &msgs, N);

    // Seqs keep counting after the restart: a new event gets a seq above
    // everything recorded before the kill, and no seq names two records.
    let max_before_kill = records(&before_outage)
        .iter()
        .map(|(_, v)| seq(v))
        .chain(button_events(&msgs, rig.device(), "door").iter().map(seq))
        .max()
        .expect("records arrived");
    let mark2 = rig.watcher.len();
    rig.agent.click(1);
    let device = rig.device().to_string();
    let after = rig.watcher.wait_for_since(
        mark2,
        |m| button_events(m, &device, "door").iter().any(|v| v["state"] == "released" && seq(v) > max_before_kill),
        DEADLINE,
        "a new press/release after the restart",
    );
    let new_events: Vec<_> =
        button_events(&after, &device, "door").into_iter().filter(|v| seq(v) > max_before_kill).collect();
    assert_press_release_pairs(&new_events, &device, "door", 1);
    let all = records(&rig.watcher.messages());
    assert_seqs_not_reused(&all);
    assert_strictly_increasing(&first_occurrences(&all), "first occurrences over the whole test");
}

#[test]
fn events_recorded_while_the_broker_restarts_without_persistence_arrive_in_order() {
    let Some(mut rig) = Rig::new("dl-broker", false, |b| b) else { return };
    rig.start_online();
    rig.cut();
    let mark = rig.watcher.len();
    rig.agent.click(N);
    let subscribed = rig.watcher.subacks();
    rig.broker.restart();
    // The broker forgot every session; the watcher subscribes again before
    // the agent can reach the broker.
    rig.watcher.wait_subscribed_after(subscribed);
    rig.proxy.heal();
    let msgs = wait_for_pairs(&rig, mark, N);
    assert_delivered_in_order(&rig, &msgs, N);
    // The agent subscribed again too, although its session is gone.
    let state = rig.command_confirmed("pump", "on", "after-broker-restart");
    assert_eq!(state["state"], "on");
    assert_eq!(state["cause"], "command");
}

#[test]
fn qos_2_events_recorded_while_the_link_is_down_arrive_once_each_in_order_and_the_outbox_drains() {
    let Some(mut rig) = Rig::new("dl-qos2", false, |b| b.door_qos(2)) else { return };
    rig.start_online();
    rig.cut();
    let mark = rig.watcher.len();
    rig.agent.click(N);
    rig.proxy.heal();
    let msgs = wait_for_pairs(&rig, mark, N);
    assert_delivered_in_order(&rig, &msgs, N);
    // Removed from the outbox only on PUBCOMP.
    rig.agent.wait_outbox_drained();

    // The agent really published them at QoS 2: mosquitto logs every
    // PUBLISH it receives with its QoS (`q2`).
    let from_agent = format!("Received PUBLISH from {} ", rig.agent.client_id());
    let door = format!("'{}'", rig.topic("button/door"));
    let log = rig.broker.log();
    let at_qos: Vec<&str> = log.lines().filter(|l| l.contains(&from_agent) && l.contains(&door)).collect();
    assert!(at_qos.len() >= 2 * N, "the broker logged {} door publishes from the agent:\n{log}", at_qos.len());
    for line in &at_qos {
        assert!(line.contains(" q2,"), "a door event was not published at QoS 2: {line}");
    }
}

/// `[mqtt] max_inflight` of the window test, and the door edges it records
/// while the link is down: many times the window.
const WINDOW: usize = 4;
const WINDOW_EDGES: usize = 100;

#[test]
fn a_replay_many_times_larger_than_the_inflight_window_arrives_in_order_and_the_outbox_drains() {
    let Some(mut rig) =
        Rig::new("dl-window", false, |b| b.mqtt_line(&format!("max_inflight = {WINDOW}")).door_debounce("0ms"))
    else {
        return;
    };
    rig.start_online();
    rig.cut();
    let mark = rig.watcher.len();
    rig.agent.edges(WINDOW_EDGES);
    let pairs = WINDOW_EDGES / 2;
    rig.agent.wait_status(
        |s| {
            s["buttons"]["door"]["presses"] == pairs as u64
                && s["outbox"]["depth"].as_u64().is_some_and(|d| d >= WINDOW_EDGES as u64)
        },
        "every door edge recorded in the outbox while the link is down",
    );
    rig.proxy.heal();
    let msgs = wait_for_pairs(&rig, mark, pairs);
    assert_delivered_in_order(&rig, &msgs, pairs);
    rig.agent.wait_outbox_drained();
}
