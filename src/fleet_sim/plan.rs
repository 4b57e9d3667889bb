//! What a simulated fleet sends, and when; sans-IO (no network, no clock:
//! callers pass instants and times in). It owns the device ids, each
//! device's offset inside the send period (so sends spread evenly instead of
//! bursting), the message mix (90 % button, 5 % heartbeat, 5 % relay state)
//! and the topic and payload of every message, built with [`crate::proto`]
//! exactly as an agent builds them. It never opens a connection.

use std::time::{Duration, SystemTime};

use crate::proto::{self, Body, ButtonBody, ButtonState, Cause, HeartbeatBody, RelayState, RelayStateBody, Topics};

/// Out of every [`MIX_CYCLE`] messages of a device, one is a heartbeat and
/// one a relay state; the rest are button edges (90 / 5 / 5 %).
pub const MIX_CYCLE: u64 = 20;

/// The button and relay names the simulated devices use.
pub const BUTTON: &str = "door";
pub const RELAY: &str = "pump";

/// The kind of one simulated message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Button,
    Heartbeat,
    Relay,
}

/// The fleet's shape: who sends, how often, for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Device ids are `<id_prefix>-<n>`, n from 1, zero-padded to the width of `devices`.
    pub id_prefix: String,
    pub devices: usize,
    /// Messages per second per device.
    pub rate: f64,
    /// How long each device sends.
    pub duration: Duration,
}

impl Plan {
    /// The interval between two messages of one device.
    pub fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate)
    }

    /// Messages each device sends: `rate × duration`, at least 1.
    pub fn per_device(&self) -> u64 {
        // Rounded to the nearest message; rate and duration are validated
        // finite and positive by the caller, so the cast cannot wrap.
        ((self.rate * self.duration.as_secs_f64()).round() as u64).max(1)
    }

    /// Every device id, in order.
    pub fn device_ids(&self) -> Vec<String> {
        let width = self.devices.to_string().len();
        (1..=self.devices).map(|n| format!("{}-{n:0width$}", self.id_prefix)).collect()
    }

    /// Device `index`'s first send, after the common start: the devices are
    /// spread evenly over one period, so a fleet at 1 msg/s sends about
    /// `devices` messages in every second and never all at one instant.
    pub fn offset(&self, index: usize) -> Duration {
        self.period().mul_f64(index as f64 / self.devices.max(1) as f64)
    }

    /// When device `index` sends its message number `k` (from 0), after the
    /// common start.
    pub fn send_at(&self, index: usize, k: u64) -> Duration {
        self.offset(index) + self.period().mul_f64(k as f64)
    }
}

/// The kind of a device's message with sequence number `seq` (from 1): the
/// mix cycles every [`MIX_CYCLE`] messages, and devices are phase-shifted by
/// `index` so that heartbeats of the fleet do not all fall in one second.
pub fn kind(index: usize, seq: u64) -> MessageKind {
    match (seq + index as u64) % MIX_CYCLE {
        0 => MessageKind::Heartbeat,
        10 => MessageKind::Relay,
        _ => MessageKind::Button,
    }
}

/// One message as it goes on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub kind: MessageKind,
}

/// Builds device `device` (number `index`)'s message `seq` of epoch `epoch`,
/// stamped `now`: the agent's envelope and body, on the agent's topic.
pub fn message(topic_prefix: &str, device: &str, index: usize, epoch: u64, seq: u64, now: SystemTime) -> Message {
    let topics = Topics::new(topic_prefix, device);
    let kind = kind(index, seq);
    // Alternate pressed/released and on/off so the stored history looks like
    // a real device's.
    let even = seq.is_multiple_of(2);
    let (topic, body) = match kind {
        MessageKind::Button => (
            topics.button(BUTTON),
            Body::Button(ButtonBody {
                button: BUTTON.to_string(),
                state: if even { ButtonState::Released } else { ButtonState::Pressed },
            }),
        ),
        MessageKind::Heartbeat => (
            topics.heartbeat(),
            Body::Heartbeat(HeartbeatBody { uptime_s: seq, version: crate::VERSION.to_string(), ..Default::default() }),
        ),
        MessageKind::Relay => (
            topics.relay_state(RELAY),
            Body::RelayState(RelayStateBody {
                relay: RELAY.to_string(),
                state: if even { RelayState::Off } else { RelayState::On },
                cause: Cause::Command,
                command_id: None,
            }),
        ),
    };
    Message { topic, payload: proto::render(device, epoch, seq, now, &body), kind }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timefmt;

    fn plan(devices: usize, rate: f64, secs: u64) -> Plan {
        Plan { id_prefix: "sim".into(), devices, rate, duration: Duration::from_secs(secs) }
    }

    #[test]
    fn device_ids_are_numbered_from_one_and_padded_so_they_sort() {
        assert_eq!(plan(3, 1.0, 1).device_ids(), ["sim-1", "sim-2", "sim-3"]);
        let ids = plan(1000, 1.0, 1).device_ids();
        assert_eq!((ids[0].as_str(), ids[999].as_str()), ("sim-0001", "sim-1000"));
    }

    #[test]
    fn a_device_sends_rate_times_duration_messages() {
        assert_eq!(plan(1, 1.0, 600).per_device(), 600);
        assert_eq!(plan(1, 2.5, 10).per_device(), 25);
        assert_eq!(plan(1, 0.1, 5).per_device(), 1, "at least one message");
    }

    #[test]
    fn sends_are_spread_evenly_over_one_period_and_never_all_at_once() {
        let p = plan(4, 1.0, 10);
        let firsts: Vec<Duration> = (0..4).map(|i| p.send_at(i, 0)).collect();
        assert_eq!(firsts, [0, 250, 500, 750].map(Duration::from_millis));
        assert_eq!(p.send_at(1, 3), Duration::from_millis(3250));
        // 1,000 devices at 1 msg/s: one send per millisecond in every second.
        let p = plan(1000, 1.0, 10);
        let mut per_ms: Vec<u128> = (0..1000).map(|i| p.send_at(i, 5).as_millis()).collect();
        per_ms.dedup();
        assert_eq!(per_ms.len(), 1000);
    }

    #[test]
    fn the_mix_is_ninety_percent_buttons_five_heartbeats_five_relay_states() {
        let kinds: Vec<MessageKind> = (0..50).flat_map(|i| (1..=200).map(move |s| kind(i, s))).collect();
        let count = |k| kinds.iter().filter(|&&x| x == k).count();
        assert_eq!(kinds.len(), 10_000);
        assert_eq!(
            (count(MessageKind::Button), count(MessageKind::Heartbeat), count(MessageKind::Relay)),
            (9000, 500, 500)
        );
    }

    #[test]
    fn messages_speak_the_agents_wire_contract() {
        let now = timefmt::from_millis(1_763_719_200_123);
        for seq in 1..=MIX_CYCLE {
            let m = message("fieldlink", "sim-07", 6, 42, seq, now);
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
            assert_eq!(
                (v["device"].as_str(), v["epoch"].as_u64(), v["seq"].as_u64()),
                (Some("sim-07"), Some(42), Some(seq))
            );
            assert_eq!(v["ts"], "2025-11-21T10:00:00.123Z");
            assert_eq!(proto::identity(&m.payload), Some((42, seq)));
            match m.kind {
                MessageKind::Button => {
                    assert_eq!(m.topic, "fieldlink/sim-07/button/door");
                    assert_eq!(v["button"], "door");
                }
                MessageKind::Heartbeat => {
                    assert_eq!(m.topic, "fieldlink/sim-07/heartbeat");
                    assert_eq!(v["version"], crate::VERSION);
                }
                MessageKind::Relay => {
                    assert_eq!(m.topic, "fieldlink/sim-07/relay/pump/state");
                    assert!(v["state"] == "on" || v["state"] == "off");
                }
            }
        }
    }

    #[test]
    fn the_hub_accepts_every_simulated_message() {
        let now = timefmt::from_millis(1_763_719_200_123);
        for seq in 1..=MIX_CYCLE {
            let m = message("fieldlink", "sim-1", 0, 7, seq, now);
            let parsed = crate::hub::ingest::parse("fieldlink", &m.topic, &m.payload, "2025-11-21T10:00:01.000Z")
                .expect("the hub parses it");
            assert!(parsed.nulled.is_empty(), "no field of the wrong type: {:?}", parsed.nulled);
        }
    }
}
