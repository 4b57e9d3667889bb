//! What the hub subscribes to and how a received MQTT message becomes an
//! [`Update`]; sans-IO (no broker, no database), unit-tested. The one place
//! on the cloud side that parses device topics and payloads.

use serde_json::Value;

use super::model::{Kind, Message, Update};

/// The one topic filter the collector subscribes to (QoS 1), optionally
/// through a shared subscription `$share/<group>/...` so several hubs split
/// the work. One filter, not one per message kind: rumqttd 0.20 keys a
/// shared group by its name alone, so a second filter in the same group
/// never gets its messages (see `broker.rs`). It also matches the commands
/// the hub publishes, which [`parse`] answers with [`IngestError::Command`].
pub fn filter(prefix: &str, shared_group: Option<&str>) -> String {
    match shared_group {
        Some(g) => format!("$share/{g}/{prefix}/+/#"),
        None => format!("{prefix}/+/#"),
    }
}

/// Why a message could not be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// A relay command (`P/D/relay/<r>/set`): cloud-to-device, not stored.
    #[error("'{0}' is a command, not a device message")]
    Command(String),
    #[error("topic '{0}' is not a fieldlink device topic")]
    Topic(String),
    #[error("status payload '{0}' is not online or offline")]
    Status(String),
    #[error("payload on '{topic}' is not a fieldlink message: {reason}")]
    Payload { topic: String, reason: String },
}

/// Parses one received message. `received_at` (RFC 3339) stamps status
/// changes, which carry no time of their own.
pub fn parse(prefix: &str, topic: &str, payload: &[u8], received_at: &str) -> Result<Update, IngestError> {
    let bad_topic = || IngestError::Topic(topic.to_string());
    let rest = topic.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')).ok_or_else(bad_topic)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (device, kind, name) = match parts.as_slice() {
        [d, "status"] => {
            let online = match payload {
                b"online" => true,
                b"offline" => false,
                other => return Err(IngestError::Status(String::from_utf8_lossy(other).chars().take(40).collect())),
            };
            return Ok(Update::Status { device: d.to_string(), online, at: received_at.to_string() });
        }
        [d, "button", n] => (*d, Kind::Button, Some(*n)),
        [d, "relay", n, "state"] => (*d, Kind::Relay, Some(*n)),
        [d, "heartbeat"] => (*d, Kind::Heartbeat, None),
        [d, "error"] => (*d, Kind::Error, None),
        [_, "relay", _, "set"] => return Err(IngestError::Command(topic.to_string())),
        _ => return Err(bad_topic()),
    };
    if device.is_empty() || name.is_some_and(str::is_empty) {
        return Err(bad_topic());
    }
    let bad = |reason: &str| IngestError::Payload { topic: topic.to_string(), reason: reason.to_string() };
    let value: Value = serde_json::from_slice(payload).map_err(|e| bad(&format!("not JSON ({e})")))?;
    if value.get("device").and_then(Value::as_str) != Some(device) {
        return Err(bad("its \"device\" does not match the topic"));
    }
    let seq = value.get("seq").and_then(Value::as_u64).ok_or_else(|| bad("no unsigned \"seq\""))?;
    // An agent from before epochs sends none: epoch 0 (DESIGN: Topics and payloads).
    let epoch = match value.get("epoch") {
        None => 0,
        Some(e) => e.as_u64().ok_or_else(|| bad("its \"epoch\" is not an unsigned integer"))?,
    };
    let ts = value.get("ts").and_then(Value::as_str).ok_or_else(|| bad("no \"ts\""))?;
    if crate::timefmt::parse_rfc3339(ts).is_none() {
        return Err(bad("\"ts\" is not an RFC 3339 timestamp"));
    }
    Ok(Update::Message(Message {
        device: device.to_string(),
        epoch,
        seq,
        ts: ts.to_string(),
        kind,
        name: name.map(str::to_string),
        payload: value,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: &str = "2026-11-21T10:00:00.000Z";

    #[test]
    fn one_filter_covers_every_device_topic_and_can_be_shared() {
        assert_eq!(filter("fl", None), "fl/+/#");
        assert_eq!(filter("fl", Some("hubs")), "$share/hubs/fl/+/#");
    }

    #[test]
    fn a_button_message_keeps_its_identity_and_payload() {
        let p = br#"{"device":"pi","seq":7,"ts":"2026-11-21T10:00:00.123Z","button":"door","state":"pressed"}"#;
        let Update::Message(m) = parse("fl", "fl/pi/button/door", p, AT).expect("valid") else { panic!("a message") };
        assert_eq!((m.device.as_str(), m.seq, m.kind, m.name.as_deref()), ("pi", 7, Kind::Button, Some("door")));
        assert_eq!(m.ts, "2026-11-21T10:00:00.123Z");
        assert_eq!(m.payload["state"], "pressed");
    }

    #[test]
    fn the_epoch_is_part_of_the_identity_and_defaults_to_zero() {
        let p = br#"{"device":"pi","epoch":1795255200000,"seq":1,"ts":"2026-11-21T10:00:00.000Z","uptime_s":1}"#;
        let Update::Message(m) = parse("fl", "fl/pi/heartbeat", p, AT).expect("valid") else { panic!("a message") };
        assert_eq!((m.epoch, m.seq), (1_795_255_200_000, 1));
        let old = br#"{"device":"pi","seq":9,"ts":"2026-11-21T10:00:00.000Z","uptime_s":1}"#;
        let Update::Message(m) = parse("fl", "fl/pi/heartbeat", old, AT).expect("valid") else { panic!("a message") };
        assert_eq!((m.epoch, m.seq), (0, 9), "a payload without epoch is epoch 0");
        let bad = br#"{"device":"pi","epoch":-1,"seq":9,"ts":"2026-11-21T10:00:00.000Z"}"#;
        assert!(matches!(parse("fl", "fl/pi/heartbeat", bad, AT), Err(IngestError::Payload { .. })));
    }

    #[test]
    fn status_messages_become_online_changes() {
        assert_eq!(
            parse("fl", "fl/pi/status", b"offline", AT),
            Ok(Update::Status { device: "pi".into(), online: false, at: AT.into() })
        );
        assert!(matches!(parse("fl", "fl/pi/status", b"maybe", AT), Err(IngestError::Status(_))));
    }

    #[test]
    fn relay_states_and_errors_keep_the_command_they_answer() {
        let p = br#"{"device":"pi","seq":9,"ts":"2026-11-21T10:00:00.000Z","relay":"pump","state":"on","cause":"command","command_id":"c1"}"#;
        let Update::Message(m) = parse("fl", "fl/pi/relay/pump/state", p, AT).expect("valid") else { panic!() };
        assert_eq!(m.payload["command_id"], "c1");
        let p = br#"{"device":"pi","seq":10,"ts":"2026-11-21T10:00:00.000Z","code":"expired","message":"m","topic":"t","command_id":"c2"}"#;
        let Update::Message(m) = parse("fl", "fl/pi/error", p, AT).expect("valid") else { panic!() };
        assert_eq!((m.kind, &m.payload["command_id"]), (Kind::Error, &serde_json::json!("c2")));
    }

    #[test]
    fn foreign_topics_and_broken_payloads_are_refused() {
        assert!(matches!(parse("fl", "other/pi/heartbeat", b"{}", AT), Err(IngestError::Topic(_))));
        assert!(matches!(parse("fl", "fl/pi/relay/pump/set", b"on", AT), Err(IngestError::Command(_))));
        assert!(matches!(parse("fl", "fl/pi/relay/pump/other", b"{}", AT), Err(IngestError::Topic(_))));
        let no_seq = br#"{"device":"pi","ts":"2026-11-21T10:00:00.000Z"}"#;
        assert!(matches!(parse("fl", "fl/pi/heartbeat", no_seq, AT), Err(IngestError::Payload { .. })));
        let wrong_device = br#"{"device":"pj","seq":1,"ts":"2026-11-21T10:00:00.000Z"}"#;
        assert!(matches!(parse("fl", "fl/pi/heartbeat", wrong_device, AT), Err(IngestError::Payload { .. })));
        assert!(matches!(parse("fl", "fl/pi/heartbeat", b"not json", AT), Err(IngestError::Payload { .. })));
    }
}
