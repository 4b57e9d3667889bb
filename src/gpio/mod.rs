//! GPIO behind a trait, so the agent runs the same on a Raspberry Pi and in CI.
//! Owns the trait and its types; the backends live in [`rppal`] (real pins)
//! and [`sim`] (an in-process board driven over a Unix socket). Levels here are
//! electrical (`High`/`Low`); `active_low` is applied by the actors, not here.
//! Nothing in this module knows about MQTT or the outbox.

pub mod rppal;
pub mod sim;

use std::time::{Duration, SystemTime};

pub use crate::config::Pull;

/// The highest BCM GPIO number on the 40-pin header.
pub const MAX_PIN: u8 = 27;

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
    pub pin: u8,
    pub pull: Pull,
    /// Edges are reported only after the level has been stable this long.
    pub debounce: Duration,
}

/// A debounced level change on an input pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub pin: u8,
    pub level: Level,
    /// When it happened (wall clock), for the message's `ts`.
    pub at: SystemTime,
}

/// Receives edges (or a read failure) from the backend's own thread. It must
/// not block: forward to an actor with `do_send`.
pub type EdgeSink = Box<dyn Fn(Result<Edge, GpioError>) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum GpioError {
    #[error("pin {0} is not a GPIO pin (0..={MAX_PIN})")]
    NoSuchPin(u8),
    #[error("pin {0} is already in use")]
    PinInUse(u8),
    #[error("pin {pin}: {reason}")]
    Failed { pin: u8, reason: String },
    #[error("gpio: {0}")]
    Backend(String),
}

/// A GPIO controller.
pub trait Gpio: Send + Sync {
    /// Claims `spec.pin` as an input and reports debounced edges to `sink`
    /// until the returned pin is dropped.
    fn input(&self, spec: &InputSpec, sink: EdgeSink) -> Result<Box<dyn InputPin>, GpioError>;

    /// Claims `pin` as an output **without changing its level** (no glitch),
    /// and never resets it on drop, so a restarted agent finds the relay as
    /// it left it.
    fn output(&self, pin: u8) -> Result<Box<dyn OutputPin>, GpioError>;
}

pub trait InputPin: Send {
    fn level(&self) -> Result<Level, GpioError>;
}

pub trait OutputPin: Send {
    /// The level the pin drives now.
    fn level(&self) -> Result<Level, GpioError>;
    fn set(&mut self, level: Level) -> Result<(), GpioError>;
}
