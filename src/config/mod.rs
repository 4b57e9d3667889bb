//! The config files: the agent's (`config/agent.toml`, [`AgentConfig`], in
//! this file) and the hub's (`config/hub.toml`, [`HubConfig`], in [`hub`]).
//! Owns turning TOML text into a typed config or a list of every problem
//! found, each naming the key and quoting the bad value. It must not start
//! anything, open sockets, or touch `state_dir`.
//!
//! How it works: the text is parsed into a plain [`toml::Table`], then walked
//! section by section with the key reader of `reader.rs`, which remembers
//! which keys it consumed (the rest are `unknown key` problems) and records
//! every problem and carries on, so one run reports every problem in the
//! file. The MQTT client keys both configs share (`[mqtt]` here, `[broker]`
//! in the hub's) are read by `mqtt.rs`. The only files read besides the
//! config are the password file (the secret, never echoed) and the TLS files
//! (opened to check they are readable). Relative paths are relative to the
//! working directory, not to the config file.

pub mod homeassistant;
#[cfg(feature = "hub")]
pub mod hub;
mod mqtt;
mod pem;
mod reader;
mod sensor;
#[cfg(test)]
mod test_support;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Table;

#[cfg(feature = "hub")]
pub use self::hub::HubConfig;
use self::mqtt::MQTT_PORT;
pub use self::mqtt::{BrokerUrl, Secret, parse_broker_arg};
/// Also used for the hub's token file.
pub(crate) use self::reader::describe_io;
use self::reader::{
    Checked, NAME_HINT, NONZERO, Place, Problems, Reader, is_name, millis, parse_with, quote, read_file, secs,
};
pub use self::sensor::{DEFAULT_W1_DIR, MetricsConfig, SensorConfig, SensorSource};
use crate::proto::{Qos, RelayState};

/// The environment variable holding the MQTT password when `mqtt.password_file`
/// is not set.
pub const PASSWORD_ENV: &str = "FIELDLINK_MQTT_PASSWORD";

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file does not exist.
    #[error("config file '{}' does not exist", path.display())]
    Missing { path: PathBuf },
    /// The config file exists but cannot be read (permissions, not UTF-8, ...).
    #[error("cannot read config file '{}': {}", path.display(), describe_io(error))]
    Unreadable { path: PathBuf, error: io::Error },
    /// Every problem found in the file, one lowercase line each, grouped by
    /// section; the cross-checks (duplicate names, shared pins) come last.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

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
    /// `[outbox] confirm` and `confirm_timeout`.
    pub confirm: ConfirmConfig,
    pub gpio: GpioConfig,
    pub buttons: Vec<ButtonConfig>,
    pub relays: Vec<RelayConfig>,
    pub heartbeat: HeartbeatConfig,
    pub supervisor: SupervisorConfig,
    pub sensors: Vec<SensorConfig>,
    pub metrics: MetricsConfig,
    pub homeassistant: homeassistant::HomeAssistantConfig,
    /// What is valid but unwise (a password or key file others can read),
    /// one line each: `check-config` prints them on stderr and the agent
    /// logs them at warn when it starts.
    pub warnings: Vec<String>,
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

/// What lets a record leave the outbox (DESIGN: Delivery promises).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// The fieldlink hub's `P/D/ack` after it committed the record.
    Hub,
    /// The broker's PUBACK / PUBCOMP (a plain broker, no fieldlink hub).
    Broker,
}

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub max_bytes: u64,
    pub durability: Durability,
    pub flush_interval: Duration,
}

/// `[outbox] confirm` and `confirm_timeout`: the Link's business, not the
/// outbox's (which knows nothing of MQTT), so kept apart from [`OutboxConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfirmConfig {
    pub mode: Confirm,
    /// With `confirm = "hub"`: how long records the broker acknowledged
    /// wait for the hub before they are sent again (doubling while none
    /// comes, up to [`MAX_CONFIRM_TIMEOUT`]).
    pub timeout: Duration,
}

/// The most `confirm_timeout` grows to while no confirmation comes.
pub const MAX_CONFIRM_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpioBackend {
    Rppal,
    /// The Linux GPIO character device (`/dev/gpiochipN`): any board.
    Cdev,
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
    /// cdev only: `gpiochip0` (default) or a path.
    pub chip: Option<String>,
    /// BCM number (rppal, sim) or line offset on `chip` (cdev).
    pub pin: u32,
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
    /// cdev only: `gpiochip0` (default) or a path.
    pub chip: Option<String>,
    /// BCM number (rppal, sim) or line offset on `chip` (cdev).
    pub pin: u32,
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

// ---------------------------------------------------------------------------
// Defaults and limits (DESIGN: Agent config).

const DEFAULT_STATE_DIR: &str = "state";
const MIN_OUTBOX_BYTES: i64 = 65_536;
const DEFAULT_OUTBOX_BYTES: u64 = 64 * 1024 * 1024;

impl AgentConfig {
    /// Reads and validates the config file at `path`. Relative paths inside it
    /// are relative to the working directory, not to the file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(&read_file(path)?)
    }

    /// Validates config text. Reads `mqtt.password_file` (or the
    /// `FIELDLINK_MQTT_PASSWORD` environment variable when no file is given)
    /// and checks that the TLS files are readable; starts nothing.
    pub fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let env_password = std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty());
        parse_with_env(text, env_password)
    }
}

/// [`AgentConfig::parse`] with the environment's password passed in, so tests
/// need not mutate the process environment.
fn parse_with_env(text: &str, env_password: Option<String>) -> Result<AgentConfig, ConfigError> {
    parse_with(text, |root, p| agent_config(root, env_password, p))
}

// ---------------------------------------------------------------------------
// Sections.

fn agent_config(root: &Table, env_password: Option<String>, p: &mut Problems) -> Checked<AgentConfig> {
    let mut r = Reader::new(root, Place::Root);

    let device_id = match r.str_opt("device_id", p) {
        Ok(Some(id)) if is_name(id) => Ok(id.to_string()),
        Ok(Some(id)) => {
            Err(r.problem("device_id", p, format!("{} is not a valid device id (expected {NAME_HINT})", quote(id))))
        }
        Ok(None) => Err(r.missing("device_id", &format!("{NAME_HINT}, e.g. 'pi-garage'"), p)),
        Err(e) => Err(e),
    };
    let state_dir = r.path_or("state_dir", PathBuf::from(DEFAULT_STATE_DIR), "a directory path", p);

    let mqtt = r.section("mqtt", p).and_then(|t| mqtt_config(&t, device_id.as_deref().ok(), env_password, p));
    let outbox = r.section("outbox", p).and_then(|t| outbox_config(&t, p));
    let gpio = r.section("gpio", p).and_then(|t| gpio_config(&t, p));
    let buttons =
        r.entries("button", p).map(|ts| ts.iter().enumerate().map(|(i, t)| button_config(t, i, p)).collect::<Vec<_>>());
    let relays =
        r.entries("relay", p).map(|ts| ts.iter().enumerate().map(|(i, t)| relay_config(t, i, p)).collect::<Vec<_>>());
    let heartbeat = r.section("heartbeat", p).and_then(|t| heartbeat_config(&t, p));
    let supervisor = r.section("supervisor", p).and_then(|t| supervisor_config(&t, p));
    let sensors = r
        .entries("sensor", p)
        .map(|ts| ts.iter().enumerate().map(|(i, t)| sensor::sensor_config(t, i, p)).collect::<Vec<_>>());
    let metrics = r.section("metrics", p).and_then(|t| sensor::metrics_config(&t, p));
    let homeassistant = r.section("homeassistant", p).and_then(|t| homeassistant::homeassistant_config(&t, p));
    r.finish(p);

    let buttons = buttons?;
    let relays = relays?;
    check_names(&buttons, p);
    check_names(&relays, p);
    if let Ok(gpio) = &gpio {
        check_pin_ranges(gpio.backend, &relays, &buttons, p);
    }
    check_pins(&relays, &buttons, p);
    let sensors = sensors?;
    sensor::check_sensor_names(&sensors.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(), p);

    Ok(AgentConfig {
        device_id: device_id?,
        state_dir: state_dir?,
        mqtt: mqtt?,
        confirm: outbox.as_ref().map(|o| o.1).map_err(|e| *e)?,
        outbox: outbox?.0,
        gpio: gpio?,
        buttons: buttons.into_iter().map(|e| e.config).collect::<Checked<_>>()?,
        relays: relays.into_iter().map(|e| e.config).collect::<Checked<_>>()?,
        heartbeat: heartbeat?,
        supervisor: supervisor?,
        sensors: sensors.into_iter().map(|(_, c)| c).collect::<Checked<_>>()?,
        metrics: metrics?,
        homeassistant: homeassistant?,
        warnings: p.warnings(),
    })
}

fn mqtt_config(
    t: &Table,
    device_id: Option<&str>,
    env_password: Option<String>,
    p: &mut Problems,
) -> Checked<MqttConfig> {
    let mut r = Reader::new(t, Place::Section("mqtt"));
    let url = mqtt::url_opt(&mut r, p)
        .map(|url| url.unwrap_or_else(|| BrokerUrl { tls: false, host: "127.0.0.1".to_string(), port: MQTT_PORT }));
    // An invalid device_id has been reported already; the default is only
    // needed when the whole config is valid.
    let explicit_client_id = r.has("client_id");
    let client_id = mqtt::client_id(&mut r, format!("fieldlink-{}", device_id.unwrap_or_default()), p);
    let topic_prefix = mqtt::topic_prefix(&mut r, p);
    let keep_alive = mqtt::keep_alive(&mut r, p);
    let clean_session = r.bool_or("clean_session", false, p);
    let username = mqtt::username(&mut r, p);
    let password = mqtt::password(&mut r, &username, (PASSWORD_ENV, env_password), p);
    let tls = mqtt::tls_files(&mut r, url.as_ref().ok(), p);
    let reconnect = mqtt::reconnect(&mut r, secs(60), p);
    let max_inflight = r.int_in("max_inflight", 32, 1..=1000, p);
    r.finish(p);

    let tls = tls?;
    let (reconnect_min, reconnect_max) = reconnect?;
    // A fieldlink hub's broker (embedded, or mosquitto with
    // use_username_as_clientid) takes the user name as the client id: that
    // is the default when a user name is set.
    let client_id = match (client_id, &username) {
        (Ok(_), Ok(Some(user))) if !explicit_client_id => Ok(user.clone()),
        (Ok(id), Ok(Some(user))) if id != *user => {
            p.warn(format!(
                "warning: mqtt.client_id '{id}' is not the user name '{user}'; a fieldlink hub's broker (embedded, \
                 or mosquitto with use_username_as_clientid) takes the user name as the client id: leave client_id \
                 out or set it to \"{user}\""
            ));
            Ok(id)
        }
        (other, _) => other,
    };
    Ok(MqttConfig {
        url: url?,
        client_id: client_id?,
        topic_prefix: topic_prefix?,
        keep_alive: keep_alive?,
        clean_session: clean_session?,
        username: username?,
        password: password?,
        ca_file: tls.ca_file,
        cert_file: tls.cert_file,
        key_file: tls.key_file,
        reconnect_min,
        reconnect_max,
        max_inflight: max_inflight?,
    })
}

fn outbox_config(t: &Table, p: &mut Problems) -> Checked<(OutboxConfig, ConfirmConfig)> {
    let mut r = Reader::new(t, Place::Section("outbox"));
    let max_bytes = match r.int_opt("max_bytes", p) {
        Ok(Some(n)) if n >= MIN_OUTBOX_BYTES => Ok(n.unsigned_abs()),
        Ok(Some(n)) => {
            Err(r.problem("max_bytes", p, format!("{n} is too small (expected at least {MIN_OUTBOX_BYTES})")))
        }
        Ok(None) => Ok(DEFAULT_OUTBOX_BYTES),
        Err(e) => Err(e),
    };
    let durability =
        r.choice("durability", Durability::Batch, &[("always", Durability::Always), ("batch", Durability::Batch)], p);
    let flush_interval = r.duration_in("flush_interval", millis(100), NONZERO..=secs(10), p);
    let confirm = r.choice("confirm", Confirm::Hub, &[("hub", Confirm::Hub), ("broker", Confirm::Broker)], p);
    let confirm_timeout = r.duration_in("confirm_timeout", secs(30), millis(100)..=MAX_CONFIRM_TIMEOUT, p);
    r.finish(p);
    Ok((
        OutboxConfig { max_bytes: max_bytes?, durability: durability?, flush_interval: flush_interval? },
        ConfirmConfig { mode: confirm?, timeout: confirm_timeout? },
    ))
}

fn gpio_config(t: &Table, p: &mut Problems) -> Checked<GpioConfig> {
    let mut r = Reader::new(t, Place::Section("gpio"));
    let backend = r.choice(
        "backend",
        GpioBackend::Rppal,
        &[("rppal", GpioBackend::Rppal), ("cdev", GpioBackend::Cdev), ("sim", GpioBackend::Sim)],
        p,
    );
    r.finish(p);
    Ok(GpioConfig { backend: backend? })
}

fn heartbeat_config(t: &Table, p: &mut Problems) -> Checked<HeartbeatConfig> {
    let mut r = Reader::new(t, Place::Section("heartbeat"));
    let interval = r.duration_in("interval", secs(30), secs(1)..=Duration::MAX, p);
    let qos = r.qos(p);
    r.finish(p);
    Ok(HeartbeatConfig { interval: interval?, qos: qos? })
}

fn supervisor_config(t: &Table, p: &mut Problems) -> Checked<SupervisorConfig> {
    let mut r = Reader::new(t, Place::Section("supervisor"));
    let max_restarts = r.int_in("max_restarts", 5, 1..=i64::from(u32::MAX), p);
    let window = r.duration_in("window", secs(60), NONZERO..=Duration::MAX, p);
    let backoff_max = r.duration_in("backoff_max", secs(30), millis(100)..=Duration::MAX, p);
    r.finish(p);
    Ok(SupervisorConfig { max_restarts: max_restarts?, window: window?, backoff_max: backoff_max? })
}

/// A `[[button]]` or `[[relay]]` entry as read, with what the cross-checks
/// (names, pins) need even when other keys of the entry are bad.
struct Entry<T> {
    /// `button` or `relay`.
    kind: &'static str,
    /// `button 'door'`, or `button #2` when the name is missing or bad.
    label: String,
    /// 1-based position among entries of its kind.
    index: usize,
    name: Option<String>,
    /// `chip` as written (cdev), for the checks that need the backend.
    chip: Option<String>,
    pin: Option<u32>,
    config: Checked<T>,
}

/// Reads `name`, `chip` and `pin`, the keys every entry has, and relabels
/// the reader with the name once it is known to be good. The pin's range
/// belongs to the backend (`gpio::pin_range`) and is checked once the whole
/// file is read.
fn entry_head<'t>(
    r: &mut Reader<'t>,
    kind: &'static str,
    p: &mut Problems,
) -> (Checked<String>, Checked<Option<String>>, Checked<u32>) {
    let name = match r.str_opt("name", p) {
        Ok(Some(name)) if is_name(name) => Ok(name.to_string()),
        Ok(Some(name)) => {
            Err(r.problem("name", p, format!("{} is not a valid name (expected {NAME_HINT})", quote(name))))
        }
        Ok(None) => Err(r.missing("name", &format!("{NAME_HINT}, e.g. 'door'"), p)),
        Err(e) => Err(e),
    };
    if let Ok(name) = &name {
        r.place = Place::Entry { kind, label: quote(name) };
    }
    let chip = match r.str_opt("chip", p) {
        Ok(Some(chip)) if is_name(chip) || chip.starts_with('/') => Ok(Some(chip.to_string())),
        Ok(Some(chip)) => Err(r.problem(
            "chip",
            p,
            format!("{} is not a chip name or absolute path (e.g. 'gpiochip0', '/dev/gpiochip4')", quote(chip)),
        )),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    let pin = match r.int_opt("pin", p) {
        Ok(Some(pin)) => u32::try_from(pin).map_err(|_| r.problem("pin", p, format!("{pin} is not a GPIO pin number"))),
        Ok(None) => Err(r.missing("pin", "a GPIO pin number (BCM for rppal and sim, the line offset for cdev)", p)),
        Err(e) => Err(e),
    };
    (name, chip, pin)
}

fn button_config(t: &Table, i: usize, p: &mut Problems) -> Entry<ButtonConfig> {
    let mut r = Reader::new(t, Place::Entry { kind: "button", label: format!("#{}", i + 1) });
    let (name, chip, pin) = entry_head(&mut r, "button", p);
    let pull = r.choice("pull", Pull::Up, &[("up", Pull::Up), ("down", Pull::Down), ("none", Pull::None)], p);
    let active_low = r.bool_or("active_low", true, p);
    let debounce = r.duration_in("debounce", millis(50), Duration::ZERO..=secs(5), p);
    let qos = r.qos(p);
    let label = r.place.label();
    r.finish(p);
    let config = (|| {
        Ok(ButtonConfig {
            name: name.clone()?,
            chip: chip.clone()?,
            pin: pin?,
            pull: pull?,
            active_low: active_low?,
            debounce: debounce?,
            qos: qos?,
        })
    })();
    Entry { kind: "button", label, index: i + 1, name: name.ok(), chip: chip.ok().flatten(), pin: pin.ok(), config }
}

fn relay_config(t: &Table, i: usize, p: &mut Problems) -> Entry<RelayConfig> {
    let mut r = Reader::new(t, Place::Entry { kind: "relay", label: format!("#{}", i + 1) });
    let (name, chip, pin) = entry_head(&mut r, "relay", p);
    let active_low = r.bool_or("active_low", false, p);
    let power_on_state = r.choice(
        "power_on_state",
        PowerOnState::Off,
        &[("off", PowerOnState::Off), ("on", PowerOnState::On), ("last", PowerOnState::Last)],
        p,
    );
    let failsafe_after = if r.has("failsafe_after") {
        r.duration_in("failsafe_after", Duration::ZERO, NONZERO..=Duration::MAX, p).map(Some)
    } else {
        Ok(None)
    };
    let failsafe_state =
        r.choice("failsafe_state", RelayState::Off, &[("on", RelayState::On), ("off", RelayState::Off)], p);
    let qos = r.qos(p);
    let label = r.place.label();
    r.finish(p);
    let config = (|| {
        Ok(RelayConfig {
            name: name.clone()?,
            chip: chip.clone()?,
            pin: pin?,
            active_low: active_low?,
            power_on_state: power_on_state?,
            failsafe_after: failsafe_after?,
            failsafe_state: failsafe_state?,
            qos: qos?,
        })
    })();
    Entry { kind: "relay", label, index: i + 1, name: name.ok(), chip: chip.ok().flatten(), pin: pin.ok(), config }
}

/// Two entries of one kind with the same name.
fn check_names<T>(entries: &[Entry<T>], p: &mut Problems) {
    for (i, entry) in entries.iter().enumerate() {
        let Some(name) = &entry.name else { continue };
        if let Some(first) = entries[..i].iter().find(|e| e.name.as_ref() == Some(name)) {
            let kind = entry.kind;
            p.report(format!("{kind} #{}: name {} is also used by {kind} #{}", entry.index, quote(name), first.index));
        }
    }
}

/// Pins outside the backend's range (rppal and sim: BCM 0..=27; cdev checks
/// each line against its chip when it opens it), and `chip` set for a
/// backend that has no chips.
fn check_pin_ranges(
    backend: GpioBackend,
    relays: &[Entry<RelayConfig>],
    buttons: &[Entry<ButtonConfig>],
    p: &mut Problems,
) {
    let entries = relays
        .iter()
        .map(|e| (e.label.as_str(), e.chip.as_deref(), e.pin))
        .chain(buttons.iter().map(|e| (e.label.as_str(), e.chip.as_deref(), e.pin)));
    for (label, chip, pin) in entries {
        if let (Some(range), Some(pin)) = (crate::gpio::pin_range(backend), pin)
            && !range.contains(&pin)
        {
            p.report(format!("{label}: pin {pin} is not a GPIO pin ({}..={})", range.start(), range.end()));
        }
        if let Some(chip) = chip
            && backend != GpioBackend::Cdev
        {
            p.report(format!("{label}: chip {} is only used with gpio.backend = \"cdev\"", quote(chip)));
        }
    }
}

/// A pin (on one chip) used twice, across relays and buttons. Relays are
/// checked first, so a clash between a button and a relay is reported on the
/// button.
fn check_pins(relays: &[Entry<RelayConfig>], buttons: &[Entry<ButtonConfig>], p: &mut Problems) {
    let users: Vec<(&str, &str, u32)> = relays
        .iter()
        .map(|e| (e.label.as_str(), e.chip.as_deref(), e.pin))
        .chain(buttons.iter().map(|e| (e.label.as_str(), e.chip.as_deref(), e.pin)))
        .filter_map(|(label, chip, pin)| Some((label, chip.unwrap_or(crate::gpio::cdev::DEFAULT_CHIP), pin?)))
        .collect();
    for (i, &(label, chip, pin)) in users.iter().enumerate() {
        if let Some((first, _, _)) = users[..i].iter().find(|&&(_, c, other)| other == pin && c == chip) {
            p.report(format!("{label}: pin {pin} is also used by {first}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/agent.toml");

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        parse_with_env(text, None)
    }

    fn problems(text: &str) -> Vec<String> {
        test_support::problems(parse(text))
    }

    fn problem(text: &str) -> String {
        test_support::one_problem(parse(text))
    }

    fn with_device(rest: &str) -> String {
        format!("device_id = \"pi-garage\"\n{rest}")
    }

    use test_support::{temp_file as secret_file, tls_file, toml_path};

    #[test]
    fn the_example_file_parses_cleanly() {
        let c = parse(EXAMPLE).expect("config/agent.toml is valid");
        assert_eq!(c.device_id, "pi-garage");
        assert_eq!(c.state_dir, PathBuf::from("state"));
        assert_eq!(c.mqtt.url, BrokerUrl { tls: false, host: "127.0.0.1".into(), port: 1883 });
        assert_eq!(c.mqtt.client_id, "fieldlink-pi-garage");
        assert_eq!(c.gpio.backend, GpioBackend::Sim);
        assert_eq!(c.buttons.len(), 1);
        assert_eq!((c.buttons[0].name.as_str(), c.buttons[0].pin), ("door", 17));
        assert_eq!(c.relays.len(), 1);
        assert_eq!((c.relays[0].name.as_str(), c.relays[0].pin), ("pump", 27));
        assert_eq!(c.relays[0].power_on_state, PowerOnState::Last);
        assert_eq!(c.relays[0].failsafe_after, None);
        assert_eq!(c.heartbeat.interval, secs(30));
        assert!(c.mqtt.password.is_none());
    }

    #[test]
    fn the_example_file_shows_every_key() {
        let keys = [
            "device_id",
            "state_dir",
            "url",
            "client_id",
            "topic_prefix",
            "keep_alive",
            "clean_session",
            "username",
            "password_file",
            "ca_file",
            "cert_file",
            "key_file",
            "reconnect_min",
            "reconnect_max",
            "max_inflight",
            "max_bytes",
            "durability",
            "flush_interval",
            "backend",
            "name",
            "chip",
            "pin",
            "pull",
            "active_low",
            "debounce",
            "qos",
            "power_on_state",
            "failsafe_after",
            "failsafe_state",
            "interval",
            "max_restarts",
            "window",
            "backoff_max",
            "discovery",
            "prefix",
        ];
        for key in keys {
            assert!(
                EXAMPLE.lines().any(|l| l.trim_start().trim_start_matches("# ").starts_with(&format!("{key} ="))),
                "config/agent.toml does not show '{key}'"
            );
        }
    }

    #[test]
    fn a_minimal_config_gets_every_default() {
        let c = parse("device_id = \"d1\"").expect("minimal config is valid");
        assert_eq!(c.state_dir, PathBuf::from("state"));
        let m = &c.mqtt;
        assert_eq!(m.url, BrokerUrl { tls: false, host: "127.0.0.1".into(), port: 1883 });
        assert_eq!(m.client_id, "fieldlink-d1");
        assert_eq!(m.topic_prefix, "fieldlink");
        assert_eq!(m.keep_alive, secs(30));
        assert!(!m.clean_session);
        assert_eq!(m.username, None);
        assert_eq!(m.password, None);
        assert_eq!((&m.ca_file, &m.cert_file, &m.key_file), (&None, &None, &None));
        assert_eq!((m.reconnect_min, m.reconnect_max), (secs(1), secs(60)));
        assert_eq!(m.max_inflight, 32);
        assert_eq!(c.outbox.max_bytes, 67_108_864);
        assert_eq!(c.outbox.durability, Durability::Batch);
        assert_eq!(c.outbox.flush_interval, millis(100));
        assert_eq!(c.confirm, ConfirmConfig { mode: Confirm::Hub, timeout: secs(30) });
        assert_eq!(c.gpio.backend, GpioBackend::Rppal);
        assert!(c.buttons.is_empty() && c.relays.is_empty());
        assert_eq!(c.heartbeat.interval, secs(30));
        assert_eq!(c.heartbeat.qos, Qos::AtLeastOnce);
        assert_eq!(c.supervisor.max_restarts, 5);
        assert_eq!(c.supervisor.window, secs(60));
        assert_eq!(c.supervisor.backoff_max, secs(30));
    }

    #[test]
    fn buttons_and_relays_get_their_defaults() {
        let c = parse(&with_device("[[button]]\nname = \"b\"\npin = 4\n[[relay]]\nname = \"r\"\npin = 5\n"))
            .expect("valid");
        let b = &c.buttons[0];
        assert_eq!((b.pull, b.active_low, b.debounce, b.qos), (Pull::Up, true, millis(50), Qos::AtLeastOnce));
        let r = &c.relays[0];
        assert!(!r.active_low);
        assert_eq!(r.power_on_state, PowerOnState::Off);
        assert_eq!(r.failsafe_after, None);
        assert_eq!(r.failsafe_state, RelayState::Off);
        assert_eq!(r.qos, Qos::AtLeastOnce);
    }

    #[test]
    fn every_key_can_be_set() {
        let c = parse(
            r#"
device_id = "x"
state_dir = "/var/lib/fieldlink"
[mqtt]
url = "mqtt://broker.example"
client_id = "me"
topic_prefix = "acme/site1"
keep_alive = "1m"
clean_session = true
username = "pi"
reconnect_min = "500ms"
reconnect_max = "2m"
max_inflight = 1000
[outbox]
max_bytes = 65536
durability = "always"
flush_interval = "10s"
confirm = "broker"
confirm_timeout = "2m"
[gpio]
backend = "sim"
[[button]]
name = "a"
pin = 0
pull = "none"
active_low = false
debounce = "0s"
qos = 2
[[relay]]
name = "b"
pin = 27
active_low = true
power_on_state = "on"
failsafe_after = "10m"
failsafe_state = "on"
qos = 2
[heartbeat]
interval = "1s"
qos = 2
[supervisor]
max_restarts = 1
window = "5m"
backoff_max = "100ms"
"#,
        )
        .expect("valid");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/fieldlink"));
        assert_eq!(c.mqtt.url, BrokerUrl { tls: false, host: "broker.example".into(), port: 1883 });
        assert_eq!(c.mqtt.client_id, "me");
        assert_eq!(c.mqtt.topic_prefix, "acme/site1");
        assert_eq!(c.mqtt.keep_alive, secs(60));
        assert!(c.mqtt.clean_session);
        assert_eq!(c.mqtt.username.as_deref(), Some("pi"));
        assert_eq!((c.mqtt.reconnect_min, c.mqtt.reconnect_max), (millis(500), secs(120)));
        assert_eq!(c.mqtt.max_inflight, 1000);
        assert_eq!(c.outbox.max_bytes, 65_536);
        assert_eq!(c.outbox.durability, Durability::Always);
        assert_eq!(c.outbox.flush_interval, secs(10));
        assert_eq!(c.confirm, ConfirmConfig { mode: Confirm::Broker, timeout: secs(120) });
        let b = &c.buttons[0];
        assert_eq!(
            (b.pin, b.pull, b.active_low, b.debounce, b.qos),
            (0, Pull::None, false, Duration::ZERO, Qos::ExactlyOnce)
        );
        let r = &c.relays[0];
        assert_eq!((r.pin, r.active_low, r.power_on_state), (27, true, PowerOnState::On));
        assert_eq!((r.failsafe_after, r.failsafe_state, r.qos), (Some(secs(600)), RelayState::On, Qos::ExactlyOnce));
        assert_eq!((c.heartbeat.interval, c.heartbeat.qos), (secs(1), Qos::ExactlyOnce));
        assert_eq!(
            (c.supervisor.max_restarts, c.supervisor.window, c.supervisor.backoff_max),
            (1, secs(300), millis(100))
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let found = problems(
            r#"
device_id = "pi garage"
colour = "red"
[mqtt]
keep_alive = "3 parsecs"
max_inflight = 0
[outbox]
durability = "sometimes"
confirm = "cloud"
[[relay]]
name = "pump"
pin = 99
[heartbeat]
qos = 0
"#,
        );
        assert_eq!(
            found,
            [
                "device_id: 'pi garage' is not a valid device id (expected [A-Za-z0-9_-]{1,64})",
                "mqtt.keep_alive: '3 parsecs' is not a duration (e.g. 30s, 5m)",
                "mqtt.max_inflight: 0 is out of range (expected 1..=1000)",
                "outbox.durability: 'sometimes' is not 'always' or 'batch'",
                "outbox.confirm: 'cloud' is not 'hub' or 'broker'",
                "heartbeat.qos: 0 is not 1 or 2",
                "unknown key 'colour'",
                "relay 'pump': pin 99 is not a GPIO pin (0..=27)",
            ]
        );
    }

    #[test]
    fn the_multi_problem_error_prints_one_problem_per_line() {
        let err = parse("colour = 1\nsize = 2").expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "missing key 'device_id' (expected [A-Za-z0-9_-]{1,64}, e.g. 'pi-garage')\nunknown key 'colour'\nunknown key 'size'"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let found = problems(&with_device(
            "[mqtt]\ncolour = 1\n[gpio]\nchip = 0\n[[button]]\nname = \"door\"\npin = 17\nlevel = 1\n[[relay]]\npin = 5\nsize = 2\n[colours]\n",
        ));
        assert_eq!(
            found,
            [
                "unknown key 'mqtt.colour'",
                "unknown key 'gpio.chip'",
                "button 'door': unknown key 'level'",
                "relay #1: missing key 'name' (expected [A-Za-z0-9_-]{1,64}, e.g. 'door')",
                "relay #1: unknown key 'size'",
                "unknown key 'colours'",
            ]
        );
    }

    #[test]
    fn wrong_types_name_the_key_the_value_and_what_was_expected() {
        let found = problems(
            r#"
device_id = 7
[mqtt]
keep_alive = 30
clean_session = "no"
url = ["a"]
[[button]]
name = "door"
pin = "17"
debounce = 1.5
[heartbeat]
interval = { s = 1 }
"#,
        );
        assert_eq!(
            found,
            [
                "device_id: 7 is an integer, expected a string",
                "mqtt.url: the value is an array, expected a string",
                "mqtt.keep_alive: 30 is an integer, expected a duration string (e.g. 30s, 5m)",
                "mqtt.clean_session: 'no' is a string, expected true or false",
                "button 'door': pin '17' is a string, expected an integer",
                "button 'door': debounce 1.5 is a float, expected a duration string (e.g. 30s, 5m)",
                "heartbeat.interval: the value is a table, expected a duration string (e.g. 30s, 5m)",
            ]
        );
    }

    #[test]
    fn sections_and_entries_must_have_the_right_shape() {
        assert_eq!(problem(&with_device("mqtt = 5")), "mqtt: 5 is an integer, expected a [mqtt] table");
        assert_eq!(
            problem(&with_device("[button]\nname = \"door\"\npin = 17")),
            "button: the value is a table, expected [[button]] entries"
        );
        assert_eq!(
            problem(&with_device("relay = [1, 2]")),
            "relay: the value is an array of non-tables, expected [[relay]] entries"
        );
    }

    #[test]
    fn toml_syntax_errors_are_one_problem_with_the_line() {
        let p = problem("device_id = \"x\"\n\n[mqtt\nurl = 1\n");
        assert!(p.starts_with("line 3: invalid toml: "), "{p}");
        assert!(!p.contains('\n'), "{p}");
        let p = problem("device_id = \"x\"\ndevice_id = \"y\"\n");
        assert!(p.starts_with("line 2: invalid toml: duplicate key"), "{p}");
    }

    #[test]
    fn device_id_is_required_and_checked() {
        assert_eq!(problem(""), "missing key 'device_id' (expected [A-Za-z0-9_-]{1,64}, e.g. 'pi-garage')");
        assert_eq!(
            problem(&format!("device_id = \"{}\"", "a".repeat(65))),
            format!("device_id: '{}' is not a valid device id (expected [A-Za-z0-9_-]{{1,64}})", "a".repeat(65))
        );
        assert_eq!(
            problem("device_id = \"a/b\""),
            "device_id: 'a/b' is not a valid device id (expected [A-Za-z0-9_-]{1,64})"
        );
        assert!(parse(&format!("device_id = \"{}\"", "A_z-9".repeat(12))).is_ok());
    }

    #[test]
    fn broker_urls_default_their_port_by_scheme() {
        let url = |u: &str| mqtt::parse_url(u, "mqtt");
        assert_eq!(url("mqtt://h"), Ok(BrokerUrl { tls: false, host: "h".into(), port: 1883 }));
        assert_eq!(url("mqtts://h/"), Ok(BrokerUrl { tls: true, host: "h".into(), port: 8883 }));
        assert_eq!(url("mqtt://h:1999"), Ok(BrokerUrl { tls: false, host: "h".into(), port: 1999 }));
        assert_eq!(url("mqtt://[::1]:1884"), Ok(BrokerUrl { tls: false, host: "::1".into(), port: 1884 }));
        assert_eq!(url("mqtts://[fe80::1]"), Ok(BrokerUrl { tls: true, host: "fe80::1".into(), port: 8883 }));
    }

    #[test]
    fn bad_broker_urls_are_errors() {
        let p = |u: &str| problem(&with_device(&format!("[mqtt]\nurl = \"{u}\"")));
        assert_eq!(
            p("tcp://h:1883"),
            "mqtt.url: 'tcp://h:1883' has scheme 'tcp' (expected mqtt://host[:port] or mqtts://host[:port])"
        );
        assert_eq!(
            p("broker.example"),
            "mqtt.url: 'broker.example' is not a broker url (expected mqtt://host[:port] or mqtts://host[:port])"
        );
        assert_eq!(
            p("mqtt://"),
            "mqtt.url: 'mqtt://' has no host (expected mqtt://host[:port] or mqtts://host[:port])"
        );
        assert_eq!(
            p("mqtt://:1883"),
            "mqtt.url: 'mqtt://:1883' has no host (expected mqtt://host[:port] or mqtts://host[:port])"
        );
        assert_eq!(p("mqtt://h:0"), "mqtt.url: 'mqtt://h:0' has port '0' (expected 1..=65535)");
        assert_eq!(p("mqtt://h:99999"), "mqtt.url: 'mqtt://h:99999' has port '99999' (expected 1..=65535)");
        assert_eq!(
            p("mqtt://h/topic"),
            "mqtt.url: 'mqtt://h/topic' has a path or query (expected mqtt://host[:port] or mqtts://host[:port])"
        );
        assert!(p("mqtt://::1").contains("ipv6 address without brackets"));
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_echoing_them() {
        for url in ["mqtt://pi:hunter2@h", "tcp://pi:hunter2@h", "pi:hunter2@h"] {
            let p = problem(&with_device(&format!("[mqtt]\nurl = \"{url}\"")));
            assert!(p.starts_with("mqtt.url: has credentials"), "{p}");
            assert!(!p.contains("hunter2"), "{p}");
        }
    }

    #[test]
    fn mqtts_needs_a_ca_file_and_says_so() {
        assert_eq!(
            problem(&with_device("[mqtt]\nurl = \"mqtts://h\"\nca_file = \"\"")),
            "mqtt.ca_file: mqtts:// needs a CA certificate to check the broker; set mqtt.ca_file"
        );
        let ca = tls_file("ca.pem");
        let c = parse(&with_device(&format!("[mqtt]\nurl = \"mqtts://h\"\nca_file = {}", toml_path(ca.path()))))
            .expect("valid");
        assert_eq!(c.mqtt.ca_file.as_deref(), Some(ca.path()));
    }

    #[test]
    fn empty_tls_paths_mean_unset() {
        let c = parse(&with_device("[mqtt]\nca_file = \"\"\ncert_file = \"\"\nkey_file = \"\"")).expect("valid");
        assert_eq!((c.mqtt.ca_file, c.mqtt.cert_file, c.mqtt.key_file), (None, None, None));
    }

    #[test]
    fn cert_and_key_go_together() {
        let ca = tls_file("ca.pem");
        let cert = tls_file("client.pem");
        let base = format!("[mqtt]\nurl = \"mqtts://h\"\nca_file = {}\n", toml_path(ca.path()));
        assert_eq!(
            problem(&with_device(&format!("{base}cert_file = {}", toml_path(cert.path())))),
            "mqtt.cert_file: is set without mqtt.key_file (a client certificate needs both)"
        );
        assert_eq!(
            problem(&with_device(&format!("{base}key_file = {}", toml_path(cert.path())))),
            "mqtt.key_file: is set without mqtt.cert_file (a client certificate needs both)"
        );
        let key = tls_file("client.key");
        let c = parse(&with_device(&format!(
            "{base}cert_file = {}\nkey_file = {}",
            toml_path(cert.path()),
            toml_path(key.path())
        )))
        .expect("valid");
        assert_eq!(c.mqtt.key_file.as_deref(), Some(key.path()));
    }

    /// `[mqtt]` with mqtts:// and the given TLS files.
    fn tls_config(ca: &Path, pair: Option<(&Path, &Path)>) -> String {
        let mut text = format!("[mqtt]\nurl = \"mqtts://h\"\nca_file = {}\n", toml_path(ca));
        if let Some((cert, key)) = pair {
            text += &format!("cert_file = {}\nkey_file = {}\n", toml_path(cert), toml_path(key));
        }
        with_device(&text)
    }

    #[test]
    fn garbage_in_a_ca_file_is_a_problem_quoting_the_path_and_what_was_expected() {
        for garbage in [&b"not a certificate\n"[..], b"", b"-----BEGIN CERTIFICATE-----\nAAAA\n"] {
            let ca = secret_file(garbage);
            let p = problem(&tls_config(ca.path(), None));
            let shown = format!("mqtt.ca_file: '{}'", ca.path().display());
            assert!(p.starts_with(&shown), "{p}");
            assert!(p.contains("expected at least one PEM '-----BEGIN CERTIFICATE-----' block"), "{p}");
        }
        // A private key where the CA should be.
        let key = tls_file("client.key");
        let p = problem(&tls_config(key.path(), None));
        assert!(p.contains("holds no certificate"), "{p}");
    }

    #[test]
    fn a_pem_block_that_is_not_a_certificate_is_a_problem() {
        let ca = secret_file(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n");
        let p = problem(&tls_config(ca.path(), None));
        assert!(p.contains("1 of its 1 certificate(s) are not valid X.509"), "{p}");
    }

    #[test]
    fn garbage_in_a_client_certificate_or_key_is_a_problem_naming_the_key() {
        let ca = tls_file("ca.pem");
        let (cert, key) = (tls_file("client.pem"), tls_file("client.key"));
        let garbage = secret_file(b"garbage");
        let p = problem(&tls_config(ca.path(), Some((garbage.path(), key.path()))));
        assert!(p.starts_with(&format!("mqtt.cert_file: '{}' holds no certificate", garbage.path().display())), "{p}");
        let p = problem(&tls_config(ca.path(), Some((cert.path(), garbage.path()))));
        assert_eq!(
            p,
            format!(
                "mqtt.key_file: '{}' holds no private key (expected a PEM 'PRIVATE KEY', 'RSA PRIVATE KEY' or \
                 'EC PRIVATE KEY' block)",
                garbage.path().display()
            )
        );
        // A certificate where the key should be.
        let p = problem(&tls_config(ca.path(), Some((cert.path(), cert.path()))));
        assert!(p.starts_with("mqtt.key_file: ") && p.contains("holds no private key"), "{p}");
    }

    #[test]
    fn a_key_that_does_not_belong_to_the_certificate_is_a_problem() {
        let ca = tls_file("ca.pem");
        let (cert, other_key) = (tls_file("client.pem"), tls_file("server.key"));
        let p = problem(&tls_config(ca.path(), Some((cert.path(), other_key.path()))));
        let expected = format!(
            "mqtt.key_file: '{}' does not belong to mqtt.cert_file '{}'",
            other_key.path().display(),
            cert.path().display()
        );
        assert!(p.starts_with(&expected), "{p}");
    }

    #[test]
    fn valid_pem_files_pass_without_warnings() {
        let (ca, cert, key) = (tls_file("ca.pem"), tls_file("client.pem"), tls_file("client.key"));
        let c = parse(&tls_config(ca.path(), Some((cert.path(), key.path())))).expect("valid");
        assert_eq!(c.mqtt.cert_file.as_deref(), Some(cert.path()));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn a_password_or_key_file_others_can_read_is_a_warning_naming_the_file_and_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let open = |f: &tempfile::NamedTempFile, mode: u32| {
            std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        let (ca, cert, key) = (tls_file("ca.pem"), tls_file("client.pem"), tls_file("client.key"));
        let pass = secret_file(b"pw\n");
        open(&key, 0o644);
        open(&pass, 0o640);
        let text = format!(
            "{}username = \"pi\"\npassword_file = {}\n",
            tls_config(ca.path(), Some((cert.path(), key.path()))),
            toml_path(pass.path())
        );
        let c = parse(&text).expect("a warning is not a problem");
        assert_eq!(
            c.warnings,
            [
                format!(
                    "warning: mqtt.password_file '{0}' is readable by group or others (mode 0640); run chmod 600 '{0}' \
                     (and chown it to the user fieldlink runs as)",
                    pass.path().display()
                ),
                format!(
                    "warning: mqtt.key_file '{0}' is readable by group or others (mode 0644); run chmod 600 '{0}' \
                     (and chown it to the user fieldlink runs as)",
                    key.path().display()
                ),
            ]
        );
        open(&key, 0o600);
        open(&pass, 0o400);
        assert!(parse(&text).expect("valid").warnings.is_empty());
    }

    #[test]
    fn tls_files_with_plain_mqtt_are_errors() {
        let ca = secret_file(b"ca");
        assert_eq!(
            problem(&with_device(&format!("[mqtt]\nca_file = {}", toml_path(ca.path())))),
            "mqtt.ca_file: is set but mqtt.url is mqtt:// (no tls); use mqtts:// or remove it"
        );
    }

    #[test]
    fn unreadable_tls_files_are_errors_quoting_the_path() {
        assert_eq!(
            problem(&with_device("[mqtt]\nurl = \"mqtts://h\"\nca_file = \"/nonexistent/ca.pem\"")),
            "mqtt.ca_file: cannot read '/nonexistent/ca.pem': no such file"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(
            problem(&with_device(&format!("[mqtt]\nurl = \"mqtts://h\"\nca_file = {}", toml_path(dir.path())))),
            format!("mqtt.ca_file: cannot read '{}': is a directory", dir.path().display())
        );
    }

    #[test]
    fn topic_prefix_must_be_usable_in_a_topic() {
        let p = |prefix: &str| problem(&with_device(&format!("[mqtt]\ntopic_prefix = \"{prefix}\"")));
        assert_eq!(p(""), "mqtt.topic_prefix: '' is empty (expected e.g. 'fieldlink' or 'acme/site1')");
        assert!(p("a/+").contains("wildcard"));
        assert!(p("a/#").contains("wildcard"));
        assert!(p("/a").contains("starts or ends with '/'"));
        assert!(p("a/").contains("starts or ends with '/'"));
        assert!(p("$SYS").contains("reserved"));
    }

    #[test]
    fn client_id_defaults_from_device_id_and_is_bounded() {
        let c = parse("device_id = \"pi-7\"").expect("valid");
        assert_eq!(c.mqtt.client_id, "fieldlink-pi-7");
        assert_eq!(
            problem(&with_device("[mqtt]\nclient_id = \"\"")),
            "mqtt.client_id: '' has 0 characters (expected 1..=128)"
        );
        assert!(
            problem(&with_device(&format!("[mqtt]\nclient_id = \"{}\"", "x".repeat(129))))
                .contains("has 129 characters")
        );
        assert!(parse(&with_device(&format!("[mqtt]\nclient_id = \"{}\"", "é".repeat(128)))).is_ok());
    }

    #[test]
    fn an_odd_client_id_is_a_warning_and_a_control_character_an_error() {
        let c = parse(&with_device("[mqtt]\nclient_id = \"site/pi-7\"")).expect("valid MQTT");
        assert!(
            c.warnings.iter().any(|w| w.starts_with("warning: mqtt.client_id ") && w.contains("'/'")),
            "{:?}",
            c.warnings
        );
        assert!(problem(&with_device("[mqtt]\nclient_id = \"a\\u0000b\"")).contains("control character"));
        let plain = parse(&with_device("[mqtt]\nclient_id = \"fieldlink-pi.7:a_b\"")).expect("valid");
        assert!(plain.warnings.is_empty(), "{:?}", plain.warnings);
    }

    #[test]
    fn a_client_id_other_than_the_user_name_is_a_warning_naming_the_fix() {
        let c = parse(&with_device("[mqtt]\nusername = \"pi-7\"\nclient_id = \"fieldlink-pi-7\"")).expect("valid");
        assert!(c.warnings.iter().any(|w| w.contains("set it to \"pi-7\"")), "{:?}", c.warnings);
        let default = parse(&with_device("[mqtt]\nusername = \"pi-7\"")).expect("valid");
        assert_eq!(default.mqtt.client_id, "pi-7", "with a user name, the client id defaults to it");
        assert!(default.warnings.is_empty(), "{:?}", default.warnings);
        let same = parse(&with_device("[mqtt]\nusername = \"pi-7\"\nclient_id = \"pi-7\"")).expect("valid");
        assert!(same.warnings.is_empty(), "{:?}", same.warnings);
    }

    #[test]
    fn bad_durations_quote_the_value_and_say_what_was_expected() {
        assert_eq!(
            problem(&with_device("[mqtt]\nkeep_alive = \"3 parsecs\"")),
            "mqtt.keep_alive: '3 parsecs' is not a duration (e.g. 30s, 5m)"
        );
        assert_eq!(
            problem(&with_device("[[button]]\nname = \"door\"\npin = 17\ndebounce = \"30\"")),
            "button 'door': debounce '30' is not a duration (e.g. 30s, 5m)"
        );
    }

    #[test]
    fn duration_bounds_are_enforced() {
        let p =
            |section: &str, key: &str, value: &str| problem(&with_device(&format!("[{section}]\n{key} = \"{value}\"")));
        assert_eq!(p("mqtt", "keep_alive", "500ms"), "mqtt.keep_alive: '500ms' is less than 1s");
        assert_eq!(p("mqtt", "keep_alive", "65536s"), "mqtt.keep_alive: '65536s' is more than 65535s");
        assert_eq!(p("mqtt", "reconnect_min", "0s"), "mqtt.reconnect_min: '0s' must be more than 0");
        assert_eq!(p("outbox", "flush_interval", "0ms"), "outbox.flush_interval: '0ms' must be more than 0");
        assert_eq!(p("outbox", "flush_interval", "11s"), "outbox.flush_interval: '11s' is more than 10s");
        assert_eq!(p("heartbeat", "interval", "999ms"), "heartbeat.interval: '999ms' is less than 1s");
        assert_eq!(p("supervisor", "window", "0s"), "supervisor.window: '0s' must be more than 0");
        assert_eq!(p("supervisor", "backoff_max", "99ms"), "supervisor.backoff_max: '99ms' is less than 100ms");
        assert_eq!(
            problem(&with_device("[[button]]\nname = \"door\"\npin = 17\ndebounce = \"6s\"")),
            "button 'door': debounce '6s' is more than 5s"
        );
        assert_eq!(
            problem(&with_device("[[relay]]\nname = \"pump\"\npin = 27\nfailsafe_after = \"0s\"")),
            "relay 'pump': failsafe_after '0s' must be more than 0"
        );
    }

    #[test]
    fn reconnect_min_must_not_exceed_reconnect_max() {
        assert_eq!(
            problem(&with_device("[mqtt]\nreconnect_min = \"2m\"")),
            "mqtt.reconnect_min: '120s' is more than mqtt.reconnect_max '60s'"
        );
        assert!(parse(&with_device("[mqtt]\nreconnect_min = \"5s\"\nreconnect_max = \"5s\"")).is_ok());
    }

    #[test]
    fn integer_bounds_are_enforced() {
        assert_eq!(
            problem(&with_device("[outbox]\nmax_bytes = 65535")),
            "outbox.max_bytes: 65535 is too small (expected at least 65536)"
        );
        assert_eq!(
            problem(&with_device("[outbox]\nmax_bytes = -1")),
            "outbox.max_bytes: -1 is too small (expected at least 65536)"
        );
        assert_eq!(
            problem(&with_device("[mqtt]\nmax_inflight = 1001")),
            "mqtt.max_inflight: 1001 is out of range (expected 1..=1000)"
        );
        assert_eq!(
            problem(&with_device("[supervisor]\nmax_restarts = 0")),
            "supervisor.max_restarts: 0 is out of range (expected 1..=4294967295)"
        );
    }

    #[test]
    fn choices_list_what_is_allowed() {
        assert_eq!(
            problem(&with_device("[gpio]\nbackend = \"wiringpi\"")),
            "gpio.backend: 'wiringpi' is not 'rppal', 'cdev' or 'sim'"
        );
        assert_eq!(
            problem(&with_device("[[button]]\nname = \"door\"\npin = 17\npull = \"sideways\"")),
            "button 'door': pull 'sideways' is not 'up', 'down' or 'none'"
        );
        assert_eq!(
            problem(&with_device("[[relay]]\nname = \"pump\"\npin = 27\npower_on_state = \"Last\"")),
            "relay 'pump': power_on_state 'Last' is not 'off', 'on' or 'last'"
        );
        assert_eq!(
            problem(&with_device("[[relay]]\nname = \"pump\"\npin = 27\nfailsafe_state = \"toggle\"")),
            "relay 'pump': failsafe_state 'toggle' is not 'on' or 'off'"
        );
    }

    #[test]
    fn qos_must_be_1_or_2() {
        assert_eq!(
            problem(&with_device("[[button]]\nname = \"door\"\npin = 17\nqos = 0")),
            "button 'door': qos 0 is not 1 or 2"
        );
        assert_eq!(
            problem(&with_device("[[relay]]\nname = \"pump\"\npin = 27\nqos = 3")),
            "relay 'pump': qos 3 is not 1 or 2"
        );
        assert_eq!(problem(&with_device("[heartbeat]\nqos = 300")), "heartbeat.qos: 300 is not 1 or 2");
    }

    #[test]
    fn pins_must_be_gpio_pins() {
        assert_eq!(
            problem(&with_device("[[relay]]\nname = \"pump\"\npin = 99")),
            "relay 'pump': pin 99 is not a GPIO pin (0..=27)"
        );
        assert_eq!(
            problem(&with_device("[[button]]\nname = \"door\"\npin = -1")),
            "button 'door': pin -1 is not a GPIO pin number"
        );
        assert_eq!(
            problem(&with_device("[[button]]\nname = \"door\"")),
            "button 'door': missing key 'pin' (expected a GPIO pin number (BCM for rppal and sim, the line offset for cdev))"
        );
    }

    #[test]
    fn cdev_takes_any_line_offset_and_a_chip_per_entry() {
        let c = parse(&with_device(
            "[gpio]\nbackend = \"cdev\"\n[[button]]\nname = \"door\"\nchip = \"gpiochip1\"\npin = 269\n\
             [[relay]]\nname = \"pump\"\npin = 300\n",
        ))
        .expect("a Walnut Pi's line 269 is fine for cdev: its chip is checked when it is opened");
        assert_eq!(c.gpio.backend, GpioBackend::Cdev);
        assert_eq!((c.buttons[0].chip.as_deref(), c.buttons[0].pin), (Some("gpiochip1"), 269));
        assert_eq!((c.relays[0].chip.as_deref(), c.relays[0].pin), (None, 300));
    }

    #[test]
    fn the_same_offset_on_two_chips_is_two_pins() {
        let two_chips = with_device(
            "[gpio]\nbackend = \"cdev\"\n[[button]]\nname = \"door\"\nchip = \"gpiochip1\"\npin = 5\n\
             [[relay]]\nname = \"pump\"\npin = 5\n",
        );
        assert!(parse(&two_chips).is_ok());
        let one_chip = two_chips.replace("chip = \"gpiochip1\"", "chip = \"gpiochip0\"");
        assert_eq!(problem(&one_chip), "button 'door': pin 5 is also used by relay 'pump'");
    }

    #[test]
    fn chip_is_only_for_cdev_and_must_look_like_a_chip() {
        assert_eq!(
            problem(&with_device("[[button]]\nname = \"door\"\nchip = \"gpiochip0\"\npin = 17")),
            "button 'door': chip 'gpiochip0' is only used with gpio.backend = \"cdev\""
        );
        assert_eq!(
            problem(&with_device("[gpio]\nbackend = \"cdev\"\n[[button]]\nname = \"door\"\nchip = \"../x\"\npin = 17")),
            "button 'door': chip '../x' is not a chip name or absolute path (e.g. 'gpiochip0', '/dev/gpiochip4')"
        );
    }

    #[test]
    fn a_pin_used_twice_names_both_users() {
        let text = with_device(
            "[[button]]\nname = \"door\"\npin = 17\n[[relay]]\nname = \"pump\"\npin = 17\n\
             [[button]]\nname = \"gate\"\npin = 4\n[[button]]\nname = \"bell\"\npin = 4\n",
        );
        assert_eq!(
            problems(&text),
            [
                "button 'door': pin 17 is also used by relay 'pump'",
                "button 'bell': pin 4 is also used by button 'gate'"
            ]
        );
    }

    #[test]
    fn duplicate_names_are_errors() {
        let text = with_device(
            "[[button]]\nname = \"door\"\npin = 1\n[[button]]\nname = \"door\"\npin = 2\n\
             [[relay]]\nname = \"pump\"\npin = 3\n[[relay]]\nname = \"pump\"\npin = 4\n",
        );
        assert_eq!(
            problems(&text),
            ["button #2: name 'door' is also used by button #1", "relay #2: name 'pump' is also used by relay #1"]
        );
        // A button and a relay may share a name: their topics differ.
        assert!(parse(&with_device("[[button]]\nname = \"x\"\npin = 1\n[[relay]]\nname = \"x\"\npin = 2\n")).is_ok());
    }

    #[test]
    fn bad_names_are_errors() {
        assert_eq!(
            problem(&with_device("[[button]]\nname = \"front door\"\npin = 1")),
            "button #1: name 'front door' is not a valid name (expected [A-Za-z0-9_-]{1,64})"
        );
        assert_eq!(
            problem(&with_device("[[relay]]\nname = \"a/b\"\npin = 1")),
            "relay #1: name 'a/b' is not a valid name (expected [A-Za-z0-9_-]{1,64})"
        );
    }

    #[test]
    fn password_file_is_read_and_its_trailing_newline_trimmed() {
        let file = secret_file(b"s3cret pass\r\n");
        let c = parse(&with_device(&format!("[mqtt]\nusername = \"pi\"\npassword_file = {}", toml_path(file.path()))))
            .expect("valid");
        assert_eq!(c.mqtt.password, Some(Secret("s3cret pass".into())));
    }

    #[test]
    fn the_environment_password_is_used_when_no_password_file_is_given() {
        let text = with_device("[mqtt]\nusername = \"pi\"");
        let c = parse_with_env(&text, Some("from-env".into())).expect("valid");
        assert_eq!(c.mqtt.password, Some(Secret("from-env".into())));

        let file = secret_file(b"from-file\n");
        let text = with_device(&format!("[mqtt]\nusername = \"pi\"\npassword_file = {}", toml_path(file.path())));
        let c = parse_with_env(&text, Some("from-env".into())).expect("valid");
        assert_eq!(c.mqtt.password, Some(Secret("from-file".into())), "the file wins over the environment");
    }

    #[test]
    fn a_password_needs_a_username() {
        let file = secret_file(b"pw");
        assert_eq!(
            problem(&with_device(&format!("[mqtt]\npassword_file = {}", toml_path(file.path())))),
            "mqtt.password_file: is set but mqtt.username is not (mqtt sends no password without a user name)"
        );
        let err = parse_with_env(&with_device(""), Some("pw".into())).expect_err("invalid");
        assert_eq!(
            err.to_string(),
            "env FIELDLINK_MQTT_PASSWORD is set but mqtt.username is not (mqtt sends no password without a user name)"
        );
    }

    #[test]
    fn bad_password_files_are_errors_quoting_the_path() {
        assert_eq!(
            problem(&with_device("[mqtt]\nusername = \"pi\"\npassword_file = \"/nonexistent/mqtt.pass\"")),
            "mqtt.password_file: cannot read '/nonexistent/mqtt.pass': no such file"
        );
        let empty = secret_file(b"\n");
        assert_eq!(
            problem(&with_device(&format!("[mqtt]\nusername = \"pi\"\npassword_file = {}", toml_path(empty.path())))),
            format!(
                "mqtt.password_file: '{}' is empty (expected the password on its first line)",
                empty.path().display()
            )
        );
        let binary = secret_file(&[0xff, 0xfe, b'x']);
        assert_eq!(
            problem(&with_device(&format!("[mqtt]\nusername = \"pi\"\npassword_file = {}", toml_path(binary.path())))),
            format!("mqtt.password_file: '{}' is not utf-8 text", binary.path().display())
        );
    }

    #[test]
    fn secrets_never_appear_in_debug_or_error_output() {
        const SECRET: &str = "hunter2-very-secret";
        let file = secret_file(format!("{SECRET}\n").as_bytes());
        let c = parse(&with_device(&format!("[mqtt]\nusername = \"pi\"\npassword_file = {}", toml_path(file.path()))))
            .expect("valid");
        assert_eq!(c.mqtt.password.as_ref().map(|s| s.0.as_str()), Some(SECRET));
        let debug = format!("{c:?} {c:#?}");
        assert!(!debug.contains(SECRET), "{debug}");
        assert!(debug.contains("Secret(<redacted>)"));

        // A config that reads the secret and then fails elsewhere.
        let text = with_device(&format!(
            "[mqtt]\nusername = \"pi\"\npassword_file = {}\nkeep_alive = \"x\"\nurl = \"mqtt://pi:{SECRET}@h\"",
            toml_path(file.path())
        ));
        let err = parse(&text).expect_err("invalid");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(SECRET), "{shown}");
        }
        let err = parse_with_env(&with_device("[mqtt]\nkeep_alive = \"x\""), Some(SECRET.into())).expect_err("invalid");
        assert!(!err.to_string().contains(SECRET));
    }

    #[test]
    fn load_quotes_the_path_of_a_missing_file() {
        let err = AgentConfig::load(Path::new("/nonexistent/agent.toml")).expect_err("missing");
        assert!(matches!(err, ConfigError::Missing { .. }));
        assert_eq!(err.to_string(), "config file '/nonexistent/agent.toml' does not exist");
    }

    #[test]
    fn load_quotes_the_path_of_an_unreadable_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = AgentConfig::load(dir.path()).expect_err("a directory is not a config file");
        assert!(matches!(err, ConfigError::Unreadable { .. }), "{err:?}");
        assert_eq!(err.to_string(), format!("cannot read config file '{}': is a directory", dir.path().display()));
        let binary = secret_file(&[0xff, 0xfe]);
        let err = AgentConfig::load(binary.path()).expect_err("not utf-8");
        assert_eq!(err.to_string(), format!("cannot read config file '{}': not utf-8 text", binary.path().display()));
    }

    #[test]
    fn load_reads_the_example_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.toml");
        let c = AgentConfig::load(&path).expect("config/agent.toml loads");
        assert_eq!(c.device_id, "pi-garage");
    }

    #[test]
    fn sensors_of_each_kind_get_their_defaults() {
        let c = parse(&with_device(
            "[[sensor]]\nname = \"tank\"\nkind = \"ds18b20\"\nid = \"28-0316a2795bff\"\n\
             [[sensor]]\nname = \"soc\"\nkind = \"file\"\npath = \"/sys/class/hwmon/hwmon0/temp1_input\"\nscale = 0.001\n\
             [[sensor]]\nname = \"volts\"\nkind = \"command\"\ncommand = [\"vcgencmd\", \"measure_volts\"]\n\
             interval = \"10s\"\nmin_change = 0.05\npublish_every = 6\nunit = \"V\"\nqos = 2\n\
             [metrics]\ntextfile = \"/var/lib/node_exporter/textfile_collector/fieldlink.prom\"\n",
        ))
        .expect("valid");
        let [tank, soc, volts] = &c.sensors[..] else { panic!("three sensors: {:?}", c.sensors) };
        assert_eq!(
            tank.source,
            SensorSource::Ds18b20 { path: PathBuf::from("/sys/bus/w1/devices/28-0316a2795bff/w1_slave") }
        );
        assert_eq!(
            (tank.unit.as_deref(), tank.interval, tank.min_change, tank.publish_every),
            (Some("°C"), secs(60), 0.0, 10)
        );
        assert_eq!((soc.scale, soc.offset, soc.unit.as_deref()), (0.001, 0.0, None));
        assert_eq!(
            volts.source,
            SensorSource::Command { argv: vec!["vcgencmd".into(), "measure_volts".into()], timeout: secs(5) }
        );
        assert_eq!(
            (volts.interval, volts.min_change, volts.publish_every, volts.qos),
            (secs(10), 0.05, 6, Qos::ExactlyOnce)
        );
        assert_eq!(
            c.metrics.textfile.as_deref(),
            Some(Path::new("/var/lib/node_exporter/textfile_collector/fieldlink.prom"))
        );
        assert!(parse("device_id = \"d\"").expect("valid").metrics.textfile.is_none());
    }

    #[test]
    fn bad_sensors_are_named_and_say_what_was_expected() {
        let s = |rest: &str| problems(&with_device(&format!("[[sensor]]\nname = \"t\"\n{rest}")));
        assert_eq!(s("kind = \"dht22\""), ["sensor 't': kind 'dht22' is not 'ds18b20', 'file' or 'command'"]);
        assert_eq!(s(""), ["sensor 't': missing key 'kind' (expected 'ds18b20', 'file' or 'command')"]);
        assert_eq!(
            s("kind = \"file\"\npath = \"/x\"\ncommand = [\"ls\"]"),
            ["sensor 't': command is only for kind = 'command'"]
        );
        assert_eq!(
            s("kind = \"ds18b20\"\nid = \"../etc\""),
            ["sensor 't': id '../etc' is not a 1-Wire device id (expected e.g. '28-0316a2795bff')"]
        );
        assert_eq!(
            s("kind = \"command\"\ncommand = []"),
            ["sensor 't': command is an array, expected a non-empty array of strings, e.g. [\"sh\", \"-c\", \"...\"]"]
        );
        assert_eq!(
            s("kind = \"command\"\ncommand = [\"sh\", 1]"),
            [
                "sensor 't': command holds a non-string (expected a non-empty array of strings, e.g. [\"sh\", \"-c\", \"...\"])"
            ]
        );
        assert_eq!(
            s("kind = \"file\"\npath = \"/x\"\nmin_change = -1"),
            ["sensor 't': min_change -1 is negative (expected 0 or more)"]
        );
        assert_eq!(
            s("kind = \"file\"\npath = \"/x\"\ninterval = \"50ms\""),
            ["sensor 't': interval '50ms' is less than 100ms"]
        );
        assert_eq!(
            s("kind = \"file\"\npath = \"/x\"\nscale = \"x\""),
            ["sensor 't': scale 'x' is a string, expected a number"]
        );
        assert_eq!(
            problems(&with_device(
                "[[sensor]]\nname = \"t\"\nkind = \"file\"\npath = \"/a\"\n[[sensor]]\nname = \"t\"\nkind = \"file\"\npath = \"/b\"\n"
            )),
            ["sensor #2: name 't' is also used by sensor #1"]
        );
        assert_eq!(
            problem(&with_device("[metrics]\ntextfile = \"/tmp/fieldlink.txt\"")),
            "metrics.textfile: '/tmp/fieldlink.txt' does not end in .prom (node_exporter's textfile collector reads only *.prom)"
        );
    }

    #[test]
    fn long_values_are_cut_short_in_messages() {
        let p = problem(&with_device(&format!("[gpio]\nbackend = \"{}\"", "x".repeat(500))));
        assert!(p.len() < 200, "{p}");
        assert!(p.contains("...'"), "{p}");
    }
}
