//! The hub's data model: what the collector hands to the store, and what the
//! store hands to the API. Plain types shared by `collector`, `store`,
//! `commands` and `web`; no I/O here, and no SQL.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The kind of a device-to-cloud message, from its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Button,
    Relay,
    Heartbeat,
    Sensor,
    Error,
}

impl Kind {
    /// Every kind, in the order metrics list them.
    pub const ALL: [Kind; 5] = [Kind::Button, Kind::Relay, Kind::Heartbeat, Kind::Sensor, Kind::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Button => "button",
            Kind::Relay => "relay",
            Kind::Heartbeat => "heartbeat",
            Kind::Sensor => "sensor",
            Kind::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "button" => Some(Kind::Button),
            "relay" => Some(Kind::Relay),
            "heartbeat" => Some(Kind::Heartbeat),
            "sensor" => Some(Kind::Sensor),
            "error" => Some(Kind::Error),
            _ => None,
        }
    }
}

/// One message from a device, parsed from the wire (`(device, epoch, seq)`
/// is its identity; the wire may repeat it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub device: String,
    /// The identity of the device's seq counter (DESIGN: Topics and
    /// payloads); 0 for a payload without one (an agent from before epochs).
    /// "Newer" means a greater `(epoch, seq)`.
    pub epoch: u64,
    pub seq: u64,
    /// RFC 3339 UTC with milliseconds, from the payload: when it happened.
    pub ts: String,
    pub kind: Kind,
    /// Button, relay or sensor name; `None` for heartbeats and errors.
    pub name: Option<String>,
    /// The whole JSON payload as received.
    pub payload: Value,
}

/// What the collector stores, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Message(Message),
    /// `P/D/status`: `online` / `offline`. `at` is when the hub received it
    /// (RFC 3339 UTC, milliseconds).
    Status {
        device: String,
        online: bool,
        at: String,
    },
}

/// `GET /api/devices` entries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceView {
    pub device: String,
    pub online: bool,
    /// When the hub last heard from it (any message or status).
    pub last_seen: Option<String>,
    /// The payload of its newest heartbeat (greatest `(epoch, seq)`).
    pub heartbeat: Option<Value>,
    /// Relay name -> "on" | "off", from the newest state message per relay
    /// (greatest `(epoch, seq)`).
    pub relays: BTreeMap<String, String>,
    /// Sensor name -> its newest reading (greatest `(epoch, seq)`).
    pub sensors: BTreeMap<String, SensorView>,
    /// How many of its messages the collector set aside (never stored).
    pub set_aside: u64,
}

/// A sensor's newest reading, in `DeviceView::sensors`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SensorView {
    /// Always a finite number (the collector sets aside any other).
    pub value: f64,
    pub unit: Option<String>,
    /// When it was read (the message's `ts`).
    pub ts: String,
}

/// A message the collector set aside: refused at ingest or refused by the
/// database for its data. Text fields are bounded and hold no NUL
/// ([`crate::hub::ingest::set_aside`] makes them so).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetAside {
    /// The device its topic names, if it names one.
    pub device: Option<String>,
    pub topic: String,
    pub reason: String,
    pub received_at: String,
    /// A text copy of the payload, cut to a bound, NULs written `\u0000`.
    pub payload: String,
    /// The size of the payload as it arrived.
    pub payload_bytes: u64,
}

/// `GET /api/set-aside` entries, newest first: the stored row's id and its
/// fields, side by side in the JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetAsideView {
    pub id: i64,
    #[serde(flatten)]
    pub entry: SetAside,
}

/// `GET /api/devices/{d}/events` entries (newest first: greatest
/// `(epoch, seq)` first).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventView {
    pub epoch: u64,
    pub seq: u64,
    pub ts: String,
    pub kind: Kind,
    pub name: Option<String>,
    pub payload: Value,
}

/// Where a page of events ends: only events older than `(epoch, seq)`.
/// Without an epoch, the device's newest epoch (so `before_seq` alone pages
/// through the current life of the device and on into older ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Before {
    pub epoch: Option<u64>,
    pub seq: u64,
}

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    /// Published; no answer yet.
    Requested,
    /// The agent's `state` message with this `command_id` was stored.
    Confirmed,
    /// The agent's `error` message with this `command_id` was stored.
    Rejected,
    /// No answer before `expires_at`; the agent will refuse it if it comes.
    Expired,
}

impl CommandStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Requested => "requested",
            CommandStatus::Confirmed => "confirmed",
            CommandStatus::Rejected => "rejected",
            CommandStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<CommandStatus> {
        match s {
            "requested" => Some(CommandStatus::Requested),
            "confirmed" => Some(CommandStatus::Confirmed),
            "rejected" => Some(CommandStatus::Rejected),
            "expired" => Some(CommandStatus::Expired),
            _ => None,
        }
    }
}

/// A relay command the hub published, as tracked in the database.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandRow {
    pub command_id: String,
    pub device: String,
    pub relay: String,
    /// "on" | "off" | "toggle"
    pub requested: String,
    pub status: CommandStatus,
    pub requested_at: String,
    pub expires_at: String,
    pub confirmed_at: Option<String>,
    /// The relay state the agent confirmed.
    pub state: Option<String>,
    /// The agent's refusal (`code: message`) when rejected.
    pub error: Option<String>,
    /// Who asked: [`Origin::as_str`] ("api token" or "dashboard session");
    /// `None` for commands recorded before schema v5.
    pub requested_by: Option<String>,
    /// The requester's IP address, when the hub knew it.
    pub client: Option<String>,
    /// When it was confirmed (the state message's `ts`), rejected (the
    /// error's `ts`) or expired (the hub's clock when it noticed).
    pub answered_at: Option<String>,
}

/// How a command's requester signed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `Authorization: Bearer <token>`: a script or tool.
    ApiToken,
    /// The `fieldlink_session` cookie: someone at the dashboard.
    DashboardSession,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::ApiToken => "api token",
            Origin::DashboardSession => "dashboard session",
        }
    }
}

/// Who requested a command: how they signed in, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub origin: Origin,
    pub client: Option<String>,
}

/// A change of a device's online state, as `status_events` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusEvent {
    pub online: bool,
    /// When the hub received the status (RFC 3339 UTC, ms).
    pub at: String,
}

/// One message of a device over a time range, as the dashboard's history
/// reads it: the device's time (`ts`) and the hub's commit time.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeRow {
    pub ts_ms: u64,
    pub received_ms: u64,
    pub kind: Kind,
    pub name: Option<String>,
    /// Parsed only for heartbeats and sensor readings (the charted kinds).
    pub payload: Option<Value>,
}

/// What `GET /api/stream` sends (one SSE `data:` line of JSON each): every
/// stored message, and device online/offline changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum LiveEvent {
    /// A newly stored message (never a duplicate).
    Message(Message),
    Status {
        device: String,
        online: bool,
        at: String,
    },
    /// A command changed status (confirmed, rejected, expired).
    Command(CommandRow),
}
