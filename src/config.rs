//! The agent's config file (`config/agent.toml`): typed structs, loading and
//! validation. Owns turning TOML text into an [`AgentConfig`] or a list of
//! every problem found, each naming the key and quoting the bad value. It must
//! not start anything, open sockets, or touch `state_dir`.
//!
//! IMPLEMENTATION PENDING (helper): `AgentConfig::load`, `AgentConfig::parse`.

use std::path::PathBuf;
use std::time::Duration;

use crate::proto::{Qos, RelayState};

/// A validated agent config.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `[A-Za-z0-9_-]{1,64}`; part of every topic.
    pub device_id: String,
    /// Outbox, pid file, status dump, relay state, sim socket. Relative paths
    /// are relative to the working directory.
    pub state_dir: PathBuf,
    pub mqtt: MqttConfig,
    pub outbox: OutboxConfig,
    pub gpio: GpioConfig,
    pub buttons: Vec<ButtonConfig>,
    pub relays: Vec<RelayConfig>,
    pub heartbeat: HeartbeatConfig,
    pub supervisor: SupervisorConfig,
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `mqtts://`
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub url: BrokerUrl,
    pub client_id: String,
    pub topic_prefix: String,
    pub keep_alive: Duration,
    pub clean_session: bool,
    pub username: Option<String>,
    /// From `password_file` or env `FIELDLINK_MQTT_PASSWORD`.
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Publishes in flight before waiting for acks (rumqttc's inflight).
    pub max_inflight: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync before a record counts.
    Always,
    /// group commit every `flush_interval`.
    Batch,
}

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub max_bytes: u64,
    pub durability: Durability,
    pub flush_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpioBackend {
    Rppal,
    Sim,
}

#[derive(Debug, Clone)]
pub struct GpioConfig {
    pub backend: GpioBackend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pull {
    Up,
    Down,
    None,
}

#[derive(Debug, Clone)]
pub struct ButtonConfig {
    pub name: String,
    pub pin: u8,
    pub pull: Pull,
    pub active_low: bool,
    pub debounce: Duration,
    pub qos: Qos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOnState {
    Off,
    On,
    Last,
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub name: String,
    pub pin: u8,
    pub active_low: bool,
    pub power_on_state: PowerOnState,
    pub failsafe_after: Option<Duration>,
    pub failsafe_state: RelayState,
    pub qos: Qos,
}

#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    pub interval: Duration,
    pub qos: Qos,
}

/// `[supervisor]`: how failed actors are restarted.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// More restarts than this within `window` ends the process (exit 1).
    pub max_restarts: u32,
    pub window: Duration,
    /// Back-off doubles from 100 ms up to this.
    pub backoff_max: Duration,
}
