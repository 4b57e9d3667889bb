//! GPIO behind a trait, so the agent runs the same on a Raspberry Pi, on any
//! Linux board and in CI. Owns the trait and its types; the backends live in
//! [`rppal`] (Raspberry Pi pins by BCM number), [`cdev`] (any board: lines of
//! `/dev/gpiochipN` by offset) and [`sim`] (an in-process board driven over a
//! Unix socket). Each backend owns the range of pin numbers it accepts
//! ([`pin_range`]). Levels here are
//! electrical (`High`/`Low`); `active_low` is applied by the actors, and
//! passed in the specs only so that cdev can set the kernel's line flag.
//! Nothing in this module knows about MQTT or the outbox.

pub mod cdev;
mod debounce;
pub mod rppal;
pub mod sim;

use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime};

pub use self::debounce::Debouncer;
pub use crate::config::{GpioBackend, Pull};

/// The highest BCM GPIO number on the 40-pin header (rppal and sim).
pub const MAX_PIN: u8 = 27;

/// The pin numbers a backend accepts, when it knows them without opening
/// the hardware: `0..=27` for rppal and the simulator. `None` for cdev,
/// which checks each offset against its chip's line count when it opens it.
pub fn pin_range(backend: GpioBackend) -> Option<RangeInclusive<u32>> {
    match backend {
        GpioBackend::Rppal | GpioBackend::Sim => Some(0..=u32::from(MAX_PIN)),
        GpioBackend::Cdev => None,
    }
}

/// An electrical level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Low,
    High,
}

impl Level {
    pub fn from_bit(bit: bool) -> Level {
        if bit { Level::High } else { Level::Low }
    }

    pub fn is_high(self) -> bool {
        self == Level::High
    }
}

/// How an input pin is set up.
#[derive(Debug, Clone)]
pub struct InputSpec {
    /// cdev only: the chip (`gpiochip0` or a path); `None` elsewhere.
    pub chip: Option<String>,
    /// BCM number (rppal, sim) or line offset (cdev).
    pub pin: u32,
    pub pull: Pull,
    /// Edges are reported only after the level has been stable this long.
    pub debounce: Duration,
    /// The line is active-low. Levels at this trait stay electrical (the
    /// actors apply `active_low`); a backend that can tell the kernel (cdev)
    /// sets the line's active-low flag and converts back.
    pub active_low: bool,
}

/// How an output pin is set up.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    /// cdev only: the chip (`gpiochip0` or a path); `None` elsewhere.
    pub chip: Option<String>,
    pub pin: u32,
    /// The electrical level it drives from the moment it is claimed.
    pub initial: Level,
    /// As [`InputSpec::active_low`].
    pub active_low: bool,
}

/// A debounced level change on an input pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub pin: u32,
    pub level: Level,
    /// When it happened (wall clock), for the message's `ts`.
    pub at: SystemTime,
}

/// Receives edges (or a read failure) from the backend's own thread, in the
/// order they happened: forward to an actor with `do_send`. It may block
/// that thread while the consumer is behind (the Button's sink waits for an
/// outbox credit): backends call it where waiting holds their source back
/// (the sim socket, the kernel's edge queue) and never with a lock the
/// agent's actors need.
pub type EdgeSink = Box<dyn Fn(Result<Edge, GpioError>) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum GpioError {
    #[error("pin {0} is not a GPIO pin (0..={MAX_PIN})")]
    NoSuchPin(u32),
    #[error("line {pin} is not on {chip} (it has {lines} lines, 0..={last})", last = lines.saturating_sub(1))]
    NoSuchLine { chip: String, pin: u32, lines: u32 },
    #[error("pin {0} is already in use")]
    PinInUse(u32),
    #[error("pin {pin}: {reason}")]
    Failed { pin: u32, reason: String },
    #[error("gpio: {0}")]
    Backend(String),
}

/// A GPIO controller.
pub trait Gpio: Send + Sync {
    /// Claims `spec.pin` as an input and reports debounced edges to `sink`
    /// until the returned pin is dropped.
    fn input(&self, spec: &InputSpec, sink: EdgeSink) -> Result<Box<dyn InputPin>, GpioError>;

    /// Claims `spec.pin` as an output driving `spec.initial` from the first
    /// instant (the level is set before the direction, or in the same
    /// request: no glitch), and never resets it on drop, so a restarted
    /// agent finds the relay as it left it.
    fn output(&self, spec: &OutputSpec) -> Result<Box<dyn OutputPin>, GpioError>;
}

pub trait InputPin: Send {
    fn level(&self) -> Result<Level, GpioError>;
}

pub trait OutputPin: Send {
    /// The level the pin drives now.
    fn level(&self) -> Result<Level, GpioError>;
    fn set(&mut self, level: Level) -> Result<(), GpioError>;
}
