//! What the hub subscribes to and how a received MQTT message becomes an
//! [`Update`]; sans-IO (no broker, no database), unit-tested. The one place
//! on the cloud side that parses device topics and payloads.
//!
//! What no database could store is refused here, before a batch: a topic or
//! a JSON string (key or value) holding NUL (PostgreSQL's TEXT and JSONB
//! refuse it, and a refused row would fail its whole batch), and a payload
//! over [`MAX_PAYLOAD`]. A known field of the wrong type (a heartbeat's
//! `"cpu_percent":"x"`, a relay's numeric `state`) is replaced by `null` and
//! named in [`Parsed::nulled`], so the dashboard only ever sees the types
//! DESIGN promises. A sensor reading whose `value` is not a number is
//! refused whole (set aside): a reading without its value means nothing.

use serde_json::Value;

use super::model::{Kind, Message, SetAside, Update};

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

/// The largest payload the hub stores. Larger ones are acknowledged and
/// refused (counted, logged): the collector's MQTT client accepts any
/// packet the protocol allows, so an oversized message can never break its
/// connection (see `collector.rs`); an operator caps the broker at this size
/// too (mosquitto: `message_size_limit 4194304`).
pub const MAX_PAYLOAD: usize = crate::mqtt_options::MAX_PACKET;

/// Fields whose JSON type DESIGN fixes, per message kind: `(path, type)`.
/// `temp_c` may be null; every other null is left as it is too.
const TYPED: &[(Kind, &[&str], Type)] = &[
    (Kind::Heartbeat, &["uptime_s"], Type::Number),
    (Kind::Heartbeat, &["cpu_percent"], Type::Number),
    (Kind::Heartbeat, &["load_1m"], Type::Number),
    (Kind::Heartbeat, &["mem_used_bytes"], Type::Number),
    (Kind::Heartbeat, &["mem_total_bytes"], Type::Number),
    (Kind::Heartbeat, &["disk_free_bytes"], Type::Number),
    (Kind::Heartbeat, &["disk_total_bytes"], Type::Number),
    (Kind::Heartbeat, &["temp_c"], Type::Number),
    (Kind::Heartbeat, &["outbox", "depth"], Type::Number),
    (Kind::Heartbeat, &["outbox", "bytes"], Type::Number),
    (Kind::Heartbeat, &["outbox", "dropped"], Type::Number),
    (Kind::Heartbeat, &["link", "connects"], Type::Number),
    (Kind::Heartbeat, &["link", "disconnects"], Type::Number),
    (Kind::Heartbeat, &["version"], Type::String),
    (Kind::Sensor, &["sensor"], Type::String),
    (Kind::Sensor, &["unit"], Type::String),
    (Kind::Button, &["button"], Type::String),
    (Kind::Button, &["state"], Type::String),
    (Kind::Relay, &["relay"], Type::String),
    (Kind::Relay, &["state"], Type::String),
    (Kind::Relay, &["cause"], Type::String),
    (Kind::Relay, &["command_id"], Type::String),
    (Kind::Error, &["code"], Type::String),
    (Kind::Error, &["message"], Type::String),
    (Kind::Error, &["topic"], Type::String),
    (Kind::Error, &["command_id"], Type::String),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Number,
    String,
}

/// A parsed update, and the fields [`parse`] replaced by `null` because
/// their type was wrong (dotted paths, e.g. `outbox.depth`).
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub update: Update,
    pub nulled: Vec<String>,
}

/// Why a message could not be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// A relay command (`P/D/relay/<r>/set`), the hub's own confirmation
    /// (`P/D/ack`) or an agent's catch-up nonce (`P/D/sync`): not a device
    /// message, not stored, not counted.
    #[error("'{0}' is a command, confirmation or sync topic, not a device message")]
    Command(String),
    #[error("topic '{0}' is not a fieldlink device topic")]
    Topic(String),
    #[error("status payload '{0}' is not online or offline")]
    Status(String),
    #[error("payload on '{topic}' is not a fieldlink message: {reason}")]
    Payload { topic: String, reason: String },
    /// A NUL in the topic (shown escaped): no database stores it.
    #[error("topic '{0}' holds a NUL character")]
    NulTopic(String),
    #[error("payload on '{topic}' is {bytes} bytes; at most {MAX_PAYLOAD}")]
    TooLarge { topic: String, bytes: usize },
}

/// Parses one received message. `received_at` (RFC 3339) stamps status
/// changes, which carry no time of their own.
pub fn parse(prefix: &str, topic: &str, payload: &[u8], received_at: &str) -> Result<Parsed, IngestError> {
    if topic.contains('\0') {
        return Err(IngestError::NulTopic(topic.escape_default().take(120).collect()));
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(IngestError::TooLarge { topic: topic.to_string(), bytes: payload.len() });
    }
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
            let update = Update::Status { device: d.to_string(), online, at: received_at.to_string() };
            return Ok(Parsed { update, nulled: Vec::new() });
        }
        [d, "button", n] => (*d, Kind::Button, Some(*n)),
        [d, "relay", n, "state"] => (*d, Kind::Relay, Some(*n)),
        [d, "heartbeat"] => (*d, Kind::Heartbeat, None),
        [d, "sensor", n] => (*d, Kind::Sensor, Some(*n)),
        [d, "error"] => (*d, Kind::Error, None),
        [_, "relay", _, "set"] | [_, "ack"] | [_, "sync"] => return Err(IngestError::Command(topic.to_string())),
        _ => return Err(bad_topic()),
    };
    if device.is_empty() || name.is_some_and(str::is_empty) {
        return Err(bad_topic());
    }
    let bad = |reason: &str| IngestError::Payload { topic: topic.to_string(), reason: reason.to_string() };
    let mut value: Value = serde_json::from_slice(payload).map_err(|e| bad(&format!("not JSON ({e})")))?;
    if holds_nul(&value) {
        return Err(bad("a string in it holds a NUL character (\\u0000), which databases refuse"));
    }
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
    let ts = ts.to_string();
    // JSON has no NaN or infinity, and serde_json refuses numbers beyond
    // f64 ("number out of range"), so a number here is finite.
    if kind == Kind::Sensor && !value.get("value").is_some_and(Value::is_number) {
        return Err(bad("its \"value\" is not a number"));
    }
    let nulled = null_mistyped(kind, &mut value);
    let update = Update::Message(Message {
        device: device.to_string(),
        epoch,
        seq,
        ts,
        kind,
        name: name.map(str::to_string),
        payload: value,
    });
    Ok(Parsed { update, nulled })
}

/// The kind a topic names, for metrics of refused messages: a message kind,
/// `status`, or `other`.
pub fn topic_kind(prefix: &str, topic: &str) -> &'static str {
    let parts: Vec<&str> = match topic.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) {
        Some(rest) => rest.split('/').collect(),
        None => return "other",
    };
    match parts.as_slice() {
        [_, "status"] => "status",
        [_, "button", _] => "button",
        [_, "relay", _, "state"] => "relay",
        [_, "heartbeat"] => "heartbeat",
        [_, "sensor", _] => "sensor",
        [_, "error"] => "error",
        _ => "other",
    }
}

/// The device and `(epoch, seq)` of a message that could not be stored
/// (refused at ingest), when its topic names a device under `prefix` and
/// its payload carries an identity: the hub confirms it all the same, or
/// the agent would send it again forever (DESIGN: Delivery promises).
pub fn identity(prefix: &str, topic: &str, payload: &[u8]) -> Option<(String, u64, u64)> {
    let device = topic.strip_prefix(prefix)?.strip_prefix('/')?.split('/').next()?;
    if device.is_empty() || device.contains('\0') || topic.contains('\0') {
        return None;
    }
    let (epoch, seq) = crate::proto::identity(payload)?;
    Some((device.to_string(), epoch, seq))
}

/// How much of a set-aside payload is kept, in characters.
pub const SET_ASIDE_PAYLOAD_CHARS: usize = 2048;
/// How much of a set-aside topic or reason is kept, in characters.
pub const SET_ASIDE_TEXT_CHARS: usize = 1024;

/// The record of a message the collector sets aside, in a form every
/// database accepts: text cut to a bound (the payload to
/// [`SET_ASIDE_PAYLOAD_CHARS`], topic and reason to
/// [`SET_ASIDE_TEXT_CHARS`]), invalid UTF-8 replaced, NUL written `\u0000`.
/// `device` is the topic's device segment under `prefix`, if any.
pub fn set_aside(prefix: &str, topic: &str, payload: &[u8], reason: &str, received_at: &str) -> SetAside {
    let device = topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.split('/').next())
        .filter(|d| !d.is_empty())
        .map(|d| bounded(d, crate::hub::store::MAX_NAME_CHARS));
    // At most 4 bytes a character: enough bytes for the characters kept.
    let head = &payload[..payload.len().min(SET_ASIDE_PAYLOAD_CHARS * 4)];
    SetAside {
        device,
        topic: bounded(topic, SET_ASIDE_TEXT_CHARS),
        reason: bounded(reason, SET_ASIDE_TEXT_CHARS),
        received_at: received_at.to_string(),
        payload: bounded(&String::from_utf8_lossy(head), SET_ASIDE_PAYLOAD_CHARS),
        payload_bytes: u64::try_from(payload.len()).unwrap_or(u64::MAX),
    }
}

/// `s` with each NUL written `\u0000`, cut to `max` characters.
fn bounded(s: &str, max: usize) -> String {
    s.replace('\0', "\\u0000").chars().take(max).collect()
}

/// True when any string or object key in `v` contains NUL.
fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Replaces each known field of `kind` whose type is wrong by `null`;
/// returns their dotted paths. Absent fields and nulls are left alone.
fn null_mistyped(kind: Kind, payload: &mut Value) -> Vec<String> {
    let mut nulled = Vec::new();
    for (k, path, want) in TYPED {
        if *k != kind {
            continue;
        }
        // A parent (`outbox`, `link`) that is there but not an object is
        // itself the wrong type.
        if let Some((_, parents)) = path.split_last()
            && !parents.is_empty()
        {
            let pointer = format!("/{}", parents.join("/"));
            if let Some(parent) = payload.pointer_mut(&pointer)
                && !parent.is_object()
                && !parent.is_null()
            {
                *parent = Value::Null;
                nulled.push(parents.join("."));
            }
        }
        let Some(field) = payload.pointer_mut(&format!("/{}", path.join("/"))) else { continue };
        let ok = match want {
            Type::Number => field.is_number() || field.is_null(),
            Type::String => field.is_string() || field.is_null(),
        };
        if !ok {
            *field = Value::Null;
            nulled.push(path.join("."));
        }
    }
    nulled
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: &str = "2026-11-21T10:00:00.000Z";

    #[test]
    fn a_set_aside_record_names_the_device_and_holds_no_nul_and_no_more_than_its_bound() {
        let mut payload = b"{\"code\":\"a\0b\"}".to_vec();
        payload.extend(vec![b'x'; 5 << 20]);
        let r = set_aside("fl", "fl/pi-1/error", &payload, "refused", AT);
        assert_eq!(r.device.as_deref(), Some("pi-1"));
        assert_eq!(r.payload_bytes, u64::try_from(payload.len()).expect("small"));
        assert!(r.payload.starts_with("{\"code\":\"a\\u0000b\"}xx"), "{}", &r.payload[..40]);
        assert!(!r.payload.contains('\0'));
        assert_eq!(r.payload.chars().count(), SET_ASIDE_PAYLOAD_CHARS);
        let r = set_aside("fl", "fl/a\0b/heartbeat", b"\xff\xfe", "nul topic", AT);
        assert_eq!(r.device.as_deref(), Some("a\\u0000b"));
        assert_eq!(r.topic, "fl/a\\u0000b/heartbeat");
        assert_eq!(r.payload, "\u{fffd}\u{fffd}", "invalid UTF-8 is replaced");
        assert_eq!(set_aside("fl", "other/x", b"", "r", AT).device, None);
        assert_eq!(set_aside("fl", "fl//x", b"", "r", AT).device, None);
    }

    #[test]
    fn one_filter_covers_every_device_topic_and_can_be_shared() {
        assert_eq!(filter("fl", None), "fl/+/#");
        assert_eq!(filter("fl", Some("hubs")), "$share/hubs/fl/+/#");
    }

    #[test]
    fn a_button_message_keeps_its_identity_and_payload() {
        let p = br#"{"device":"pi","seq":7,"ts":"2026-11-21T10:00:00.123Z","button":"door","state":"pressed"}"#;
        let Update::Message(m) = parse("fl", "fl/pi/button/door", p, AT).expect("valid").update else {
            panic!("a message")
        };
        assert_eq!((m.device.as_str(), m.seq, m.kind, m.name.as_deref()), ("pi", 7, Kind::Button, Some("door")));
        assert_eq!(m.ts, "2026-11-21T10:00:00.123Z");
        assert_eq!(m.payload["state"], "pressed");
    }

    #[test]
    fn the_epoch_is_part_of_the_identity_and_defaults_to_zero() {
        let p = br#"{"device":"pi","epoch":1795255200000,"seq":1,"ts":"2026-11-21T10:00:00.000Z","uptime_s":1}"#;
        let Update::Message(m) = parse("fl", "fl/pi/heartbeat", p, AT).expect("valid").update else {
            panic!("a message")
        };
        assert_eq!((m.epoch, m.seq), (1_795_255_200_000, 1));
        let old = br#"{"device":"pi","seq":9,"ts":"2026-11-21T10:00:00.000Z","uptime_s":1}"#;
        let Update::Message(m) = parse("fl", "fl/pi/heartbeat", old, AT).expect("valid").update else {
            panic!("a message")
        };
        assert_eq!((m.epoch, m.seq), (0, 9), "a payload without epoch is epoch 0");
        let bad = br#"{"device":"pi","epoch":-1,"seq":9,"ts":"2026-11-21T10:00:00.000Z"}"#;
        assert!(matches!(parse("fl", "fl/pi/heartbeat", bad, AT), Err(IngestError::Payload { .. })));
    }

    #[test]
    fn status_messages_become_online_changes() {
        assert_eq!(
            parse("fl", "fl/pi/status", b"offline", AT).map(|p| p.update),
            Ok(Update::Status { device: "pi".into(), online: false, at: AT.into() })
        );
        assert!(matches!(parse("fl", "fl/pi/status", b"maybe", AT), Err(IngestError::Status(_))));
    }

    #[test]
    fn relay_states_and_errors_keep_the_command_they_answer() {
        let p = br#"{"device":"pi","seq":9,"ts":"2026-11-21T10:00:00.000Z","relay":"pump","state":"on","cause":"command","command_id":"c1"}"#;
        let Update::Message(m) = parse("fl", "fl/pi/relay/pump/state", p, AT).expect("valid").update else { panic!() };
        assert_eq!(m.payload["command_id"], "c1");
        let p = br#"{"device":"pi","seq":10,"ts":"2026-11-21T10:00:00.000Z","code":"expired","message":"m","topic":"t","command_id":"c2"}"#;
        let Update::Message(m) = parse("fl", "fl/pi/error", p, AT).expect("valid").update else { panic!() };
        assert_eq!((m.kind, &m.payload["command_id"]), (Kind::Error, &serde_json::json!("c2")));
    }

    #[test]
    fn foreign_topics_and_broken_payloads_are_refused() {
        assert!(matches!(parse("fl", "other/pi/heartbeat", b"{}", AT), Err(IngestError::Topic(_))));
        assert!(matches!(parse("fl", "fl/pi/relay/pump/set", b"on", AT), Err(IngestError::Command(_))));
        assert!(matches!(parse("fl", "fl/pi/ack", br#"{"epoch":1,"seqs":[]}"#, AT), Err(IngestError::Command(_))));
        assert!(matches!(parse("fl", "fl/pi/sync", b"0123456789abcdef", AT), Err(IngestError::Command(_))));
        assert!(matches!(parse("fl", "fl/pi/relay/pump/other", b"{}", AT), Err(IngestError::Topic(_))));
        let no_seq = br#"{"device":"pi","ts":"2026-11-21T10:00:00.000Z"}"#;
        assert!(matches!(parse("fl", "fl/pi/heartbeat", no_seq, AT), Err(IngestError::Payload { .. })));
        let wrong_device = br#"{"device":"pj","seq":1,"ts":"2026-11-21T10:00:00.000Z"}"#;
        assert!(matches!(parse("fl", "fl/pi/heartbeat", wrong_device, AT), Err(IngestError::Payload { .. })));
        assert!(matches!(parse("fl", "fl/pi/heartbeat", b"not json", AT), Err(IngestError::Payload { .. })));
    }

    #[test]
    fn a_nul_anywhere_in_the_topic_or_a_json_string_is_refused_before_the_database() {
        let ok =
            r#"{"device":"pi","seq":1,"ts":"2026-11-21T10:00:00.000Z","code":"c","message":"m","command_id":"c1"}"#;
        assert!(parse("fl", "fl/pi/error", ok.as_bytes(), AT).is_ok());
        for field in ["code", "message", "command_id"] {
            let bad = ok.replace(&format!("\"{field}\":\""), &format!("\"{field}\":\"a\\u0000"));
            assert_ne!(bad, ok, "{field} was replaced");
            let e = parse("fl", "fl/pi/error", bad.as_bytes(), AT);
            assert!(matches!(e, Err(IngestError::Payload { .. })), "{field}: {e:?}");
        }
        let key = r#"{"device":"pi","seq":1,"ts":"2026-11-21T10:00:00.000Z","x\u0000":1}"#;
        assert!(matches!(parse("fl", "fl/pi/heartbeat", key.as_bytes(), AT), Err(IngestError::Payload { .. })));
        let e = parse("fl", "fl/pi\0/heartbeat", ok.as_bytes(), AT);
        assert!(matches!(&e, Err(IngestError::NulTopic(t)) if t == "fl/pi\\u{0}/heartbeat"), "{e:?}");
    }

    #[test]
    fn a_payload_over_the_limit_is_refused_by_size() {
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert!(matches!(
            parse("fl", "fl/pi/heartbeat", &big, AT),
            Err(IngestError::TooLarge { bytes, .. }) if bytes == MAX_PAYLOAD + 1
        ));
    }

    #[test]
    fn a_heartbeat_field_of_the_wrong_type_is_nulled_and_the_rest_kept() {
        let p = br#"{"device":"pi","seq":1,"ts":"2026-11-21T10:00:00.000Z","uptime_s":5,"cpu_percent":"x","temp_c":null,"outbox":{"depth":"deep","bytes":3},"link":7,"version":9}"#;
        let parsed = parse("fl", "fl/pi/heartbeat", p, AT).expect("stored, with nulls");
        assert_eq!(parsed.nulled, ["cpu_percent", "outbox.depth", "link", "version"]);
        let Update::Message(m) = parsed.update else { panic!("a message") };
        assert_eq!(m.payload["cpu_percent"], Value::Null);
        assert_eq!(m.payload["uptime_s"], 5, "a well-typed field is kept");
        assert_eq!(m.payload["temp_c"], Value::Null);
        assert_eq!(m.payload["outbox"]["bytes"], 3);
        assert_eq!(m.payload["outbox"]["depth"], Value::Null);
        assert_eq!(m.payload["link"], Value::Null);
    }

    #[test]
    fn a_sensor_reading_is_stored_under_its_name_and_one_without_a_number_is_refused() {
        let p = br#"{"device":"pi","seq":3,"ts":"2026-11-21T10:00:00.000Z","sensor":"tank","value":21.5,"unit":"C"}"#;
        let Update::Message(m) = parse("fl", "fl/pi/sensor/tank", p, AT).expect("valid").update else {
            panic!("a message")
        };
        assert_eq!((m.kind, m.name.as_deref(), m.payload["value"].as_f64()), (Kind::Sensor, Some("tank"), Some(21.5)));
        for value in [r#""21.5""#, "null", "true", "[1]", "{}"] {
            let p =
                format!(r#"{{"device":"pi","seq":3,"ts":"2026-11-21T10:00:00.000Z","sensor":"tank","value":{value}}}"#);
            let e = parse("fl", "fl/pi/sensor/tank", p.as_bytes(), AT);
            assert!(
                matches!(&e, Err(IngestError::Payload { reason, .. }) if reason.contains("\"value\" is not a number")),
                "{value}: {e:?}"
            );
        }
        let no_value = br#"{"device":"pi","seq":3,"ts":"2026-11-21T10:00:00.000Z","sensor":"tank"}"#;
        assert!(matches!(parse("fl", "fl/pi/sensor/tank", no_value, AT), Err(IngestError::Payload { .. })));
        // Beyond f64: serde_json refuses the whole payload.
        let huge = br#"{"device":"pi","seq":3,"ts":"2026-11-21T10:00:00.000Z","sensor":"tank","value":1e400}"#;
        assert!(matches!(parse("fl", "fl/pi/sensor/tank", huge, AT), Err(IngestError::Payload { .. })));
        let bad_unit = br#"{"device":"pi","seq":3,"ts":"2026-11-21T10:00:00.000Z","sensor":"tank","value":1,"unit":7}"#;
        assert_eq!(parse("fl", "fl/pi/sensor/tank", bad_unit, AT).expect("stored").nulled, ["unit"]);
        assert!(matches!(parse("fl", "fl/pi/sensor/", p, AT), Err(IngestError::Topic(_))));
    }

    #[test]
    fn a_relay_state_of_the_wrong_type_is_nulled() {
        let p =
            br#"{"device":"pi","seq":1,"ts":"2026-11-21T10:00:00.000Z","relay":"pump","state":1,"command_id":["c"]}"#;
        let parsed = parse("fl", "fl/pi/relay/pump/state", p, AT).expect("stored, with nulls");
        assert_eq!(parsed.nulled, ["state", "command_id"]);
    }

    #[test]
    fn a_refused_message_still_has_an_identity_to_confirm_when_its_topic_and_payload_name_one() {
        let nul = b"{\"device\":\"pi\",\"epoch\":4,\"seq\":9,\"ts\":\"x\",\"message\":\"a\\u0000b\"}";
        assert!(parse("fl", "fl/pi/error", nul, AT).is_err());
        assert_eq!(identity("fl", "fl/pi/error", nul), Some(("pi".to_string(), 4, 9)));
        assert_eq!(identity("fl", "other/pi/error", nul), None);
        assert_eq!(identity("fl", "fl/pi/error", b"not json"), None);
        assert_eq!(identity("fl", "fl/p\0i/error", nul), None);
    }
}
