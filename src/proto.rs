//! Topics and payloads of the wire contract (DESIGN: Topics and payloads).
//! The one place that builds or parses them. Sans-IO: it never touches the
//! network, the disk or a clock; callers pass `now` in.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::timefmt;

/// MQTT QoS levels fieldlink allows for its own messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Qos {
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl Qos {
    pub fn from_level(level: u8) -> Option<Qos> {
        match level {
            1 => Some(Qos::AtLeastOnce),
            2 => Some(Qos::ExactlyOnce),
            _ => None,
        }
    }

    pub fn level(self) -> u8 {
        self as u8
    }
}

/// A relay's logical state (after `active_low` is applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayState {
    On,
    Off,
}

impl RelayState {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayState::On => "on",
            RelayState::Off => "off",
        }
    }

    pub fn toggled(self) -> RelayState {
        match self {
            RelayState::On => RelayState::Off,
            RelayState::Off => RelayState::On,
        }
    }
}

/// A button's logical state (after `active_low` is applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ButtonState {
    Pressed,
    Released,
}

/// Why a relay state message was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    Startup,
    Command,
    Failsafe,
    Reconnect,
}

/// Topic builder for one device.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
    device: String,
}

impl Topics {
    pub fn new(prefix: &str, device: &str) -> Topics {
        Topics { prefix: prefix.to_string(), device: device.to_string() }
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    fn base(&self) -> String {
        format!("{}/{}", self.prefix, self.device)
    }

    pub fn status(&self) -> String {
        format!("{}/status", self.base())
    }

    pub fn button(&self, name: &str) -> String {
        format!("{}/button/{name}", self.base())
    }

    pub fn relay_state(&self, name: &str) -> String {
        format!("{}/relay/{name}/state", self.base())
    }

    /// One relay's command topic (what Home Assistant's switch publishes to).
    pub fn relay_set(&self, name: &str) -> String {
        format!("{}/relay/{name}/set", self.base())
    }

    /// A `[[sensor]]`'s readings.
    pub fn sensor(&self, name: &str) -> String {
        format!("{}/sensor/{name}", self.base())
    }

    /// The filter the agent subscribes to: every relay, known or not, so that
    /// a command for an unknown relay gets its `unknown_relay` error.
    pub fn relay_set_filter(&self) -> String {
        format!("{}/relay/+/set", self.base())
    }

    pub fn heartbeat(&self) -> String {
        format!("{}/heartbeat", self.base())
    }

    pub fn error(&self) -> String {
        format!("{}/error", self.base())
    }

    /// The catch-up topic: the agent publishes a nonce here after each
    /// connect and receives it back on its own subscription.
    pub fn sync(&self) -> String {
        format!("{}/sync", self.base())
    }

    /// Where the hub confirms which messages it stored (`P/D/ack`, QoS 1,
    /// not retained; payload [`StoredAck`]).
    pub fn ack(&self) -> String {
        format!("{}/ack", self.base())
    }

    /// Whether `topic` matches the command filter `P/D/relay/+/set` (an
    /// empty level matches `+`, so `P/D/relay//set` does).
    pub fn is_relay_set_topic(&self, topic: &str) -> bool {
        topic
            .strip_prefix(&self.prefix)
            .and_then(|t| t.strip_prefix('/'))
            .and_then(|t| t.strip_prefix(&self.device))
            .and_then(|t| t.strip_prefix("/relay/"))
            .and_then(|t| t.strip_suffix("/set"))
            .is_some_and(|name| !name.contains('/'))
    }

    /// The relay name in a `P/D/relay/<name>/set` topic, or `None` for any
    /// other topic.
    pub fn relay_of_set_topic<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let rest = rest.strip_prefix(&self.device)?.strip_prefix("/relay/")?;
        let name = rest.strip_suffix("/set")?;
        (!name.is_empty() && !name.contains('/')).then_some(name)
    }
}

/// `status` payloads (plain text, retained).
pub const ONLINE: &[u8] = b"online";
pub const OFFLINE: &[u8] = b"offline";

/// The device-to-cloud message bodies that go through the outbox. The
/// envelope (`device`, `epoch`, `seq`, `ts`) is added by [`render`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Body {
    Button(ButtonBody),
    RelayState(RelayStateBody),
    Heartbeat(HeartbeatBody),
    Sensor(SensorBody),
    Error(ErrorBody),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ButtonBody {
    pub button: String,
    pub state: ButtonState,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelayStateBody {
    pub relay: String,
    pub state: RelayState,
    pub cause: Cause,
    pub command_id: Option<String>,
}

/// One sensor reading (`P/D/sensor/<name>`). `value` is always finite: a
/// reading that is not a finite number is a failure (an `error` message
/// with code `sensor_failed`), never a value. `unit` is null when the
/// config names none.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SensorBody {
    pub sensor: String,
    pub value: f64,
    pub unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct HeartbeatBody {
    pub uptime_s: u64,
    pub cpu_percent: f32,
    pub load_1m: f64,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    pub temp_c: Option<f32>,
    pub outbox: OutboxCounters,
    pub link: LinkCounters,
    pub version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct OutboxCounters {
    pub depth: u64,
    pub bytes: u64,
    pub dropped: u64,
    /// Records the broker acknowledged that wait for the hub's confirmation.
    pub unconfirmed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct LinkCounters {
    pub connects: u64,
    pub disconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    pub topic: String,
    pub command_id: Option<String>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    device: &'a str,
    epoch: u64,
    seq: u64,
    ts: String,
    #[serde(flatten)]
    body: &'a Body,
}

/// The JSON payload of an outbox record:
/// `{"device","epoch","seq","ts",...body}`. `(device, epoch, seq)` is the
/// message's identity (DESIGN: Topics and payloads): `epoch` names the
/// state_dir's seq counter, so seqs that restart after a lost `seq.floor`
/// are still new messages.
pub fn render(device: &str, epoch: u64, seq: u64, ts: SystemTime, body: &Body) -> Vec<u8> {
    let env = Envelope { device, epoch, seq, ts: timefmt::rfc3339_millis(ts), body };
    // Serializing plain structs of strings and numbers into a Vec cannot fail;
    // an empty object would still be a well-formed, recognisable payload.
    serde_json::to_vec(&env).unwrap_or_else(|_| b"{}".to_vec())
}

/// The identity of an outbox message, `(epoch, seq)`, read from its JSON
/// payload (the device is the topic's); `None` when the payload is not a
/// JSON object with an unsigned `seq`. A payload without `epoch` is epoch 0
/// (an agent from before epochs), as the hub reads it.
pub fn identity(payload: &[u8]) -> Option<(u64, u64)> {
    #[derive(Deserialize)]
    struct Id {
        #[serde(default)]
        epoch: u64,
        seq: u64,
    }
    let id: Id = serde_json::from_slice(payload).ok()?;
    Some((id.epoch, id.seq))
}

/// The most seq ranges one [`StoredAck`] holds; more are split over several
/// acks (the payload stays far below any broker's size limit).
pub const MAX_ACK_RANGES: usize = 4096;

/// The hub's confirmation on `P/D/ack` (DESIGN: Delivery promises): after a
/// commit, the seqs of device D's epoch `epoch` that the hub has stored,
/// including duplicates of ones it already had and messages it set aside,
/// so that the agent may remove them from its outbox. Ranges are inclusive,
/// ascending and disjoint: `{"epoch":E,"seqs":[[first,last],...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredAck {
    pub epoch: u64,
    pub seqs: Vec<(u64, u64)>,
}

/// Why a `P/D/ack` payload was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("not an ack ({0}); expected {{\"epoch\":E,\"seqs\":[[first,last],...]}}")]
    Json(String),
    #[error("range [{0},{1}] ends before it starts")]
    Backwards(u64, u64),
}

impl StoredAck {
    /// Acks for `seqs` (any order, duplicates allowed) of one epoch: sorted
    /// and merged into ranges, at most [`MAX_ACK_RANGES`] ranges per ack.
    pub fn for_seqs(epoch: u64, seqs: impl IntoIterator<Item = u64>) -> Vec<StoredAck> {
        let mut all: Vec<u64> = seqs.into_iter().collect();
        all.sort_unstable();
        all.dedup();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for s in all {
            match ranges.last_mut() {
                Some((_, last)) if last.checked_add(1) == Some(s) => *last = s,
                _ => ranges.push((s, s)),
            }
        }
        ranges.chunks(MAX_ACK_RANGES).map(|c| StoredAck { epoch, seqs: c.to_vec() }).collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        // A struct of integers always serializes.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    pub fn decode(payload: &[u8]) -> Result<StoredAck, AckError> {
        let ack: StoredAck = serde_json::from_slice(payload).map_err(|e| AckError::Json(e.to_string()))?;
        if let Some(&(a, b)) = ack.seqs.iter().find(|(a, b)| a > b) {
            return Err(AckError::Backwards(a, b));
        }
        Ok(ack)
    }

    /// Whether `seq` is in one of the ranges.
    pub fn contains(&self, seq: u64) -> bool {
        self.seqs.iter().any(|&(a, b)| a <= seq && seq <= b)
    }

    /// How many seqs the ranges name.
    pub fn count(&self) -> u64 {
        self.seqs.iter().map(|&(a, b)| b - a + 1).sum()
    }
}

/// Why a relay command was refused; the `code` of an error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadPayload,
    UnknownRelay,
    Expired,
    TooLarge,
    /// The command was valid but the relay's pin could not be switched.
    GpioFailed,
    /// A sensor could not be read (sent when it starts failing, not on
    /// every failed reading).
    SensorFailed,
}

/// The largest command payload accepted; larger ones are `too_large`.
pub const MAX_COMMAND_BYTES: usize = 1024;

/// The largest `id` a JSON command may carry.
pub const MAX_COMMAND_ID_CHARS: usize = 64;

/// What a command asks the relay to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Set(RelayState),
    Toggle,
}

impl Action {
    /// The command word: `on`, `off` or `toggle`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Set(s) => s.as_str(),
            Action::Toggle => "toggle",
        }
    }

    /// The state the relay ends up in, from the state it is in.
    pub fn apply(self, current: RelayState) -> RelayState {
        match self {
            Action::Set(s) => s,
            Action::Toggle => current.toggled(),
        }
    }
}

/// A command that passed every check and may be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub relay: String,
    pub action: Action,
    pub id: Option<String>,
}

/// A refused command: what the `error` message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    /// The command's `id` when it could be read, so the hub can match it.
    pub command_id: Option<String>,
}

impl Refusal {
    fn new(code: ErrorCode, message: String, command_id: Option<String>) -> Refusal {
        Refusal { code, message, command_id }
    }

    pub fn into_body(self, topic: &str) -> ErrorBody {
        ErrorBody { code: self.code, message: self.message, topic: topic.to_string(), command_id: self.command_id }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonCommand {
    state: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
}

fn parse_action(word: &str) -> Option<Action> {
    match word.trim().to_ascii_lowercase().as_str() {
        "on" => Some(Action::Set(RelayState::On)),
        "off" => Some(Action::Set(RelayState::Off)),
        "toggle" => Some(Action::Toggle),
        _ => None,
    }
}

/// Shortens untrusted text for an error message.
fn quote(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let mut out: String = s.chars().take(40).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

/// Parses and checks a command received on `relay/<relay>/set`.
///
/// `known` says whether the relay exists. Checks run in this order: size,
/// payload, relay, expiry, so that the error names the first thing wrong and
/// carries the command id whenever the payload could be read.
pub fn parse_command(relay: &str, known: bool, payload: &[u8], now: SystemTime) -> Result<Command, Refusal> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("command is {} bytes; the limit is {MAX_COMMAND_BYTES}", payload.len()),
            None,
        ));
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| Refusal::new(ErrorCode::BadPayload, "command is not utf-8 text".to_string(), None))?;
    let trimmed = text.trim();
    let (action, id, expires_at) = if trimmed.starts_with('{') {
        let cmd: JsonCommand = serde_json::from_str(trimmed).map_err(|e| {
            Refusal::new(
                ErrorCode::BadPayload,
                format!("command '{}' is not valid: {e}; expected {{\"state\":\"on\"|\"off\"|\"toggle\",\"id\",\"expires_at\"}}", quote(payload)),
                command_id_hint(trimmed),
            )
        })?;
        if let Some(id) = &cmd.id
            && (id.is_empty() || id.chars().count() > MAX_COMMAND_ID_CHARS)
        {
            return Err(Refusal::new(
                ErrorCode::BadPayload,
                format!("command id '{}' must be 1 to {MAX_COMMAND_ID_CHARS} characters", quote(id.as_bytes())),
                None,
            ));
        }
        let action = parse_action(&cmd.state).ok_or_else(|| {
            Refusal::new(
                ErrorCode::BadPayload,
                format!("state '{}' is not one of on, off, toggle", quote(cmd.state.as_bytes())),
                cmd.id.clone(),
            )
        })?;
        let expires_at = match &cmd.expires_at {
            None => None,
            Some(s) => Some(timefmt::parse_rfc3339(s).ok_or_else(|| {
                Refusal::new(
                    ErrorCode::BadPayload,
                    format!("expires_at '{}' is not an RFC 3339 timestamp", quote(s.as_bytes())),
                    cmd.id.clone(),
                )
            })?),
        };
        (action, cmd.id, expires_at)
    } else {
        let action = parse_action(trimmed).ok_or_else(|| {
            Refusal::new(
                ErrorCode::BadPayload,
                format!("command '{}' is not one of on, off, toggle or a JSON object", quote(payload)),
                None,
            )
        })?;
        (action, None, None)
    };
    if !known {
        return Err(Refusal::new(
            ErrorCode::UnknownRelay,
            format!("relay '{}' is not configured", quote(relay.as_bytes())),
            id,
        ));
    }
    if let Some(deadline) = expires_at
        && deadline <= now
    {
        return Err(Refusal::new(
            ErrorCode::Expired,
            format!(
                "command expired at {}; it is now {}",
                timefmt::rfc3339_millis(deadline),
                timefmt::rfc3339_millis(now)
            ),
            id,
        ));
    }
    Ok(Command { relay: relay.to_string(), action, id })
}

/// Refuses a command whose topic matches the command filter but names no
/// relay (`P/D/relay//set`): `unknown_relay`, quoting the topic, with the
/// command's `id` when the payload has a readable one.
pub fn refuse_topic_without_relay(topic: &str, payload: &[u8]) -> Refusal {
    let id = std::str::from_utf8(payload).ok().filter(|_| payload.len() <= MAX_COMMAND_BYTES).and_then(command_id_hint);
    Refusal::new(
        ErrorCode::UnknownRelay,
        // The topic matched our own filter, so its length is bounded by the
        // configured prefix and device id: quoted whole.
        format!("topic '{topic}' names no relay; expected <prefix>/<device>/relay/<name>/set"),
        id,
    )
}

/// Best effort: the `id` of a JSON command that failed to parse as a whole
/// (say `state` had the wrong type), so the refusal can still name it.
fn command_id_hint(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let id = v.get("id")?.as_str()?;
    (!id.is_empty() && id.chars().count() <= MAX_COMMAND_ID_CHARS).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn now() -> SystemTime {
        timefmt::from_millis(1_763_719_200_000)
    }

    fn refused(payload: &[u8]) -> Refusal {
        parse_command("pump", true, payload, now()).expect_err("should be refused")
    }

    #[test]
    fn plain_commands_are_accepted_in_any_case() {
        for (p, a) in [
            (&b"on"[..], Action::Set(RelayState::On)),
            (b"OFF", Action::Set(RelayState::Off)),
            (b" Toggle\n", Action::Toggle),
        ] {
            let c = parse_command("pump", true, p, now()).expect("valid");
            assert_eq!(c.action, a);
            assert_eq!(c.id, None);
        }
    }

    #[test]
    fn json_commands_carry_their_id() {
        let c = parse_command("pump", true, br#"{"state":"on","id":"abc","expires_at":"2025-11-21T10:00:30Z"}"#, now())
            .expect("valid");
        assert_eq!(c, Command { relay: "pump".into(), action: Action::Set(RelayState::On), id: Some("abc".into()) });
    }

    #[test]
    fn a_command_past_its_expiry_is_refused_as_expired() {
        let r = refused(br#"{"state":"on","id":"old","expires_at":"2025-11-21T09:59:59Z"}"#);
        assert_eq!(r.code, ErrorCode::Expired);
        assert_eq!(r.command_id.as_deref(), Some("old"));
    }

    #[test]
    fn wrong_types_and_unknown_words_are_bad_payloads() {
        assert_eq!(refused(br#"{"state":1,"id":"x"}"#).code, ErrorCode::BadPayload);
        assert_eq!(refused(br#"{"state":1,"id":"x"}"#).command_id.as_deref(), Some("x"));
        assert_eq!(refused(b"maybe").code, ErrorCode::BadPayload);
        assert_eq!(refused(br#"{"state":"up"}"#).code, ErrorCode::BadPayload);
        assert_eq!(refused(br#"{"state":"on","expires_at":"soon"}"#).code, ErrorCode::BadPayload);
        assert_eq!(refused(br#"{"state":"on","colour":"red"}"#).code, ErrorCode::BadPayload);
        assert_eq!(refused(&[0xff, 0xfe]).code, ErrorCode::BadPayload);
        assert_eq!(refused(b"{not json").code, ErrorCode::BadPayload);
    }

    #[test]
    fn ids_longer_than_64_characters_are_refused() {
        let long = "x".repeat(65);
        let r = refused(format!(r#"{{"state":"on","id":"{long}"}}"#).as_bytes());
        assert_eq!(r.code, ErrorCode::BadPayload);
    }

    #[test]
    fn oversized_commands_are_refused_before_parsing() {
        let big = vec![b' '; MAX_COMMAND_BYTES + 1];
        assert_eq!(refused(&big).code, ErrorCode::TooLarge);
    }

    #[test]
    fn an_unknown_relay_is_refused_with_the_command_id() {
        let r = parse_command("nope", false, br#"{"state":"on","id":"q"}"#, now()).expect_err("unknown");
        assert_eq!(r.code, ErrorCode::UnknownRelay);
        assert_eq!(r.command_id.as_deref(), Some("q"));
    }

    #[test]
    fn toggle_flips_the_current_state() {
        assert_eq!(Action::Toggle.apply(RelayState::On), RelayState::Off);
        assert_eq!(Action::Set(RelayState::On).apply(RelayState::On), RelayState::On);
    }

    #[test]
    fn set_topics_name_their_relay_and_nothing_else_matches() {
        let t = Topics::new("fieldlink", "pi-1");
        assert_eq!(t.relay_of_set_topic("fieldlink/pi-1/relay/pump/set"), Some("pump"));
        assert_eq!(t.relay_of_set_topic("fieldlink/pi-1/relay/pump/state"), None);
        assert_eq!(t.relay_of_set_topic("fieldlink/pi-2/relay/pump/set"), None);
        assert_eq!(t.relay_of_set_topic("fieldlink/pi-1/relay//set"), None);
        assert_eq!(t.relay_set_filter(), "fieldlink/pi-1/relay/+/set");
    }

    #[test]
    fn the_envelope_names_device_then_epoch_then_seq() {
        let body = Body::Button(ButtonBody { button: "door".into(), state: ButtonState::Released });
        let text = String::from_utf8(render("pi-1", 3, 9, now(), &body)).expect("utf-8");
        assert!(text.starts_with(r#"{"device":"pi-1","epoch":3,"seq":9,"ts":"#), "{text}");
    }

    #[test]
    fn a_topic_that_names_no_relay_is_refused_as_unknown_relay_quoting_the_topic() {
        let r = refuse_topic_without_relay("fieldlink/pi-1/relay//set", br#"{"state":"on","id":"c7"}"#);
        assert_eq!(r.code, ErrorCode::UnknownRelay);
        assert!(r.message.contains("'fieldlink/pi-1/relay//set'"), "{}", r.message);
        assert!(r.message.contains("names no relay"), "{}", r.message);
        assert_eq!(r.command_id.as_deref(), Some("c7"));
        assert_eq!(refuse_topic_without_relay("fieldlink/pi-1/relay//set", b"toggle").command_id, None);
    }

    #[test]
    fn a_sensor_reading_carries_its_name_value_and_unit() {
        let body = Body::Sensor(SensorBody { sensor: "tank".into(), value: 21.5, unit: Some("°C".into()) });
        let v: serde_json::Value = serde_json::from_slice(&render("pi-1", 3, 9, now(), &body)).expect("json");
        assert_eq!(
            (v["sensor"].as_str(), v["value"].as_f64(), v["unit"].as_str()),
            (Some("tank"), Some(21.5), Some("°C"))
        );
        assert_eq!(v["seq"], 9);
        let body = Body::Sensor(SensorBody { sensor: "load".into(), value: 2.0, unit: None });
        let v: serde_json::Value = serde_json::from_slice(&render("pi-1", 3, 10, now(), &body)).expect("json");
        assert!(v["unit"].is_null());
        assert_eq!(Topics::new("fieldlink", "pi-1").sensor("tank"), "fieldlink/pi-1/sensor/tank");
        assert_eq!(serde_json::to_value(ErrorCode::SensorFailed).expect("json"), "sensor_failed");
    }

    #[test]
    fn gpio_failed_is_spelled_in_snake_case() {
        assert_eq!(serde_json::to_value(ErrorCode::GpioFailed).expect("json"), "gpio_failed");
    }

    #[test]
    fn rendered_payloads_carry_the_envelope_and_the_body() {
        let body = Body::Button(ButtonBody { button: "door".into(), state: ButtonState::Pressed });
        let bytes = render("pi-1", 1_763_700_000_000, 7, now() + Duration::from_millis(5), &body);
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["device"], "pi-1");
        assert_eq!(v["epoch"], 1_763_700_000_000_u64);
        assert_eq!(v["seq"], 7);
        assert_eq!(v["ts"], "2025-11-21T10:00:00.005Z");
        assert_eq!(v["button"], "door");
        assert_eq!(v["state"], "pressed");
    }

    #[test]
    fn relay_state_payloads_have_a_null_command_id_when_none() {
        let body = Body::RelayState(RelayStateBody {
            relay: "pump".into(),
            state: RelayState::On,
            cause: Cause::Startup,
            command_id: None,
        });
        let v: serde_json::Value = serde_json::from_slice(&render("d", 0, 1, now(), &body)).expect("json");
        assert!(v["command_id"].is_null());
        assert_eq!(v["cause"], "startup");
    }

    #[test]
    fn an_ack_merges_seqs_into_ranges_and_survives_the_wire() {
        let acks = StoredAck::for_seqs(7, [5, 3, 4, 9, 4, 10, 1]);
        assert_eq!(acks, vec![StoredAck { epoch: 7, seqs: vec![(1, 1), (3, 5), (9, 10)] }]);
        let wire = acks[0].encode();
        assert_eq!(String::from_utf8_lossy(&wire), r#"{"epoch":7,"seqs":[[1,1],[3,5],[9,10]]}"#);
        let back = StoredAck::decode(&wire).expect("decodes");
        assert_eq!(back, acks[0]);
        assert!(back.contains(4) && back.contains(10) && !back.contains(2) && !back.contains(11));
        assert_eq!(back.count(), 6);
    }

    #[test]
    fn an_ack_with_too_many_ranges_is_split() {
        let acks = StoredAck::for_seqs(1, (0..(MAX_ACK_RANGES as u64 + 1)).map(|i| i * 2));
        assert_eq!(acks.len(), 2);
        assert_eq!(acks[0].seqs.len(), MAX_ACK_RANGES);
        assert_eq!(acks[1].seqs, vec![(MAX_ACK_RANGES as u64 * 2, MAX_ACK_RANGES as u64 * 2)]);
    }

    #[test]
    fn a_malformed_ack_is_an_error_not_a_confirmation() {
        assert!(matches!(StoredAck::decode(b"{\"epoch\":1,\"seqs\":[[5,4]]}"), Err(AckError::Backwards(5, 4))));
        assert!(matches!(StoredAck::decode(b"{\"epoch\":1}"), Err(AckError::Json(_))));
        assert!(matches!(StoredAck::decode(b"{\"epoch\":-1,\"seqs\":[]}"), Err(AckError::Json(_))));
        assert!(matches!(StoredAck::decode(b"ok"), Err(AckError::Json(_))));
    }

    #[test]
    fn a_rendered_payload_names_its_identity_and_an_old_one_is_epoch_zero() {
        let body = Body::Button(ButtonBody { button: "door".into(), state: ButtonState::Pressed });
        assert_eq!(identity(&render("pi-1", 42, 7, now(), &body)), Some((42, 7)));
        assert_eq!(identity(br#"{"device":"d","seq":3,"ts":"x"}"#), Some((0, 3)));
        assert_eq!(identity(b"online"), None);
        assert_eq!(identity(br#"{"seq":-3}"#), None);
    }
}
