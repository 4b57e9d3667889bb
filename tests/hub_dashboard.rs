//! The dashboard's history API, black-box (issue 9 item 7; DESIGN: HTTP
//! API): a real `fieldlink hub` and a real agent (simulated GPIO) on one
//! test mosquitto, the agent behind the harness proxy so a test can cut its
//! link.
//!
//! * `GET /api/devices/{d}/history`: an outage appears (from the stored
//!   status changes) after the link is cut and restored; button presses
//!   made during the cut arrive late (commit time − `ts` > 0); every range
//!   returns at most 300 buckets per series; a bad range is a 400 that
//!   names it.
//! * `GET /api/devices/{d}/commands`: a confirmed command and an expired
//!   one (rejected by the agent as expired once it was back), newest first,
//!   each with who asked (`api token`, the client address) and when it was
//!   answered.
//!
//! Needs mosquitto (skips without it unless `FIELDLINK_REQUIRE_MOSQUITTO=1`).

mod common;

use common::hub::Hub;
use common::{Rig, wait_until};
use serde_json::{Value, json};

fn history(hub: &Hub, device: &str, range: &str) -> Value {
    let (status, body) = hub.get(&format!("/api/devices/{device}/history?range={range}"));
    assert_eq!(status, 200, "history {range}: {body}");
    body
}

fn list(v: &Value) -> &Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("expected a list, got {v}"))
}

#[test]
fn a_cut_link_shows_as_an_outage_with_late_replayed_presses_and_commands_say_who_asked_and_how_they_ended() {
    let Some(mut rig) = Rig::new("dashboard", false, |b| b.heartbeat_interval("1s")) else { return };
    let hub = Hub::builder(&rig.broker).command_ttl("1s").start();
    rig.start_online();
    let device = rig.device().to_string();
    hub.wait_device(&device, |d| d["online"] == true && d["heartbeat"].is_object(), "online with a heartbeat");

    // The link goes down; the broker publishes the agent's will.
    rig.cut();
    hub.wait_device(&device, |d| d["online"] == false, "offline (its last will)");
    // Pressed while cut off: the presses wait in the agent's outbox.
    rig.agent.click(2);
    // A command nobody can answer expires (ttl 1s).
    let (status, body) = hub.post(&format!("/api/devices/{device}/relays/pump?wait=60s"), &json!({"state": "on"}));
    assert_eq!((status, body["status"].as_str()), (409, Some("rejected")), "{body}");

    rig.proxy.heal();
    hub.wait_device(&device, |d| d["online"] == true, "online again");
    hub.wait_events(&device, Some("button"), |e| e.len() >= 4, "the four presses made during the cut");
    // The queued command reaches the agent, which refuses it as expired:
    // it is subscribed again, so the command below reaches it.
    hub.wait_events(
        &device,
        Some("error"),
        |e| e.iter().any(|v| v["payload"]["code"] == "expired"),
        "the agent's refusal of the expired command",
    );
    let (status, body) = hub.post(&format!("/api/devices/{device}/relays/pump?wait=60s"), &json!({"state": "on"}));
    assert_eq!(status, 200, "{body}");

    // The outage, ended, and the presses' lateness.
    let h = wait_until(common::DEADLINE, "the history to show an ended outage", || {
        let h = history(&hub, &device, "1h");
        list(&h["outages"]).iter().any(|o| o["to"].is_string()).then_some(h)
    });
    let outage = list(&h["outages"]).iter().find(|o| o["to"].is_string()).expect("found above").clone();
    assert!(outage["from"].as_str() < outage["to"].as_str(), "{outage}");
    let changes: Vec<&Value> = list(&h["status"]).iter().map(|s| &s["online"]).collect();
    assert!(changes.windows(2).any(|w| w[0] == false && w[1] == true), "offline then online: {h:#}");
    let late = &h["lateness"];
    assert!(late["messages"].as_u64() >= Some(4), "{late}");
    assert!(late["max_ms"].as_u64() > Some(0), "presses made during the cut arrived late: {late}");

    // Every range is bounded, whatever the message rate.
    for (range, bucket_s) in [("1h", 12.0), ("24h", 288.0), ("7d", 2016.0)] {
        let h = history(&hub, &device, range);
        assert_eq!(h["bucket_s"].as_f64(), Some(bucket_s), "{range}");
        let cpu = list(&h["heartbeat"]["cpu"]);
        assert!(!cpu.is_empty() && cpu.len() <= 300, "{range}: {} buckets", cpu.len());
        let n: u64 = cpu.iter().filter_map(|b| b["n"].as_u64()).sum();
        assert!(n >= 2, "{range}: the heartbeats are in the buckets ({n})");
        assert!(cpu.iter().all(|b| b["min"].as_f64() <= b["avg"].as_f64() && b["avg"].as_f64() <= b["max"].as_f64()));
    }
    let (status, body) = hub.get(&format!("/api/devices/{device}/history?range=1y"));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "range: '1y' is not a range (expected 1h, 24h or 7d)");

    // The command history, newest first.
    let (status, body) = hub.get(&format!("/api/devices/{device}/commands?limit=10"));
    assert_eq!(status, 200, "{body}");
    let commands = list(&body);
    let statuses: Vec<&str> = commands.iter().filter_map(|c| c["status"].as_str()).collect();
    // The hub expired the first one; the agent's refusal when it came back
    // (code `expired`) then made it rejected, as the store's rules say.
    assert_eq!(statuses, ["confirmed", "rejected"], "{body:#}");
    assert!(commands[1]["error"].as_str().is_some_and(|e| e.starts_with("expired:")), "{body:#}");
    for c in commands {
        assert_eq!(c["requested_by"], "api token", "{c}");
        assert_eq!(c["client"], "127.0.0.1", "{c}");
        assert!(c["answered_at"].as_str() >= c["requested_at"].as_str(), "answered after it was asked: {c}");
    }
    let (status, body) = hub.get(&format!("/api/devices/{device}/commands?limit=1"));
    assert_eq!((status, list(&body).len()), (200, 1), "{body}");
}
