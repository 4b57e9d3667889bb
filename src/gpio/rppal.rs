//! The Raspberry Pi backend: [`Gpio`] on real pins through rppal 0.22.1.
//!
//! It owns the translation between our trait and rppal, and nothing else: no
//! debounce logic of its own (the kernel debounces, through the GPIO character
//! device v2), no persistence, no retries. It must never reset or drive a
//! relay pin on its own: an output is acquired without changing its level and
//! left as it is on drop, so a restarted agent never flips a relay.
//!
//! It compiles anywhere rppal does (Linux), but only runs on a Pi: elsewhere
//! [`RppalGpio::new`] fails with a hint to use `gpio.backend = "sim"`.
//!
//! Source references are to `rppal-0.22.1/src/gpio/`.

use std::time::SystemTime;

use rppal::gpio as hw;

use super::{Edge, EdgeSink, Gpio, GpioError, InputPin, InputSpec, Level, MAX_PIN, OutputPin, OutputSpec, Pull};

/// GPIO on a Raspberry Pi.
#[derive(Debug)]
pub struct RppalGpio {
    gpio: hw::Gpio,
}

impl RppalGpio {
    /// Opens the GPIO peripheral.
    ///
    /// Off a Pi rppal cannot identify the board and returns `UnknownModel`
    /// (`gpio.rs:423`); that becomes an error saying to use the simulator.
    pub fn new() -> Result<RppalGpio, GpioError> {
        match hw::Gpio::new() {
            Ok(gpio) => Ok(RppalGpio { gpio }),
            Err(hw::Error::UnknownModel) => Err(GpioError::Backend(
                "this machine is not a raspberry pi that rppal recognises (unknown model); \
                 set gpio.backend = \"sim\" to run without hardware"
                    .to_string(),
            )),
            Err(hw::Error::PermissionDenied(path)) => {
                Err(GpioError::Backend(format!("permission denied opening '{path}': is the user in the 'gpio' group?")))
            }
            Err(e) => Err(GpioError::Backend(format!("cannot open the gpio peripheral: {e}"))),
        }
    }

    /// Takes `pin` from rppal, mapping its errors to ours.
    /// The BCM range (0..=27) is this backend's to check.
    fn take(&self, pin: u32) -> Result<hw::Pin, GpioError> {
        let bcm = u8::try_from(pin).ok().filter(|&p| p <= MAX_PIN).ok_or(GpioError::NoSuchPin(pin))?;
        self.gpio.get(bcm).map_err(|e| pin_error(pin, e))
    }
}

/// Maps an rppal error about `pin` to ours.
fn pin_error(pin: u32, e: hw::Error) -> GpioError {
    match e {
        hw::Error::PinUsed(_) => GpioError::PinInUse(pin),
        hw::Error::PinNotAvailable(_) => GpioError::NoSuchPin(pin),
        other => GpioError::Failed { pin, reason: other.to_string().to_lowercase() },
    }
}

fn level_of(level: hw::Level) -> Level {
    match level {
        hw::Level::Low => Level::Low,
        hw::Level::High => Level::High,
    }
}

/// The level after an edge; `None` for triggers an event never carries.
fn edge_level(trigger: hw::Trigger) -> Option<Level> {
    match trigger {
        hw::Trigger::RisingEdge => Some(Level::High),
        hw::Trigger::FallingEdge => Some(Level::Low),
        hw::Trigger::Disabled | hw::Trigger::Both => None,
    }
}

impl Gpio for RppalGpio {
    fn input(&self, spec: &InputSpec, sink: EdgeSink) -> Result<Box<dyn InputPin>, GpioError> {
        let pin = spec.pin;
        let taken = self.take(pin)?;
        let mut input = match spec.pull {
            Pull::Up => taken.into_input_pullup(),
            Pull::Down => taken.into_input_pulldown(),
            Pull::None => taken.into_input(),
        };
        // On drop rppal would turn the pull resistor off (`pin.rs:208-227`),
        // letting the line float until the pin is claimed again after an
        // actor restart, which can fake an edge. Keep the pull on.
        input.set_reset_on_drop(false);

        // Debounce happens in the kernel (GPIO cdev v2); `None` disables it.
        let debounce = (!spec.debounce.is_zero()).then_some(spec.debounce);
        // The callback runs on rppal's interrupt thread (`pin.rs:538-558`);
        // with `Trigger::Both` each event is a RisingEdge or a FallingEdge
        // (`gpio.rs:347-354`).
        let on_event = move |event: hw::Event| {
            let Some(level) = edge_level(event.trigger) else {
                tracing::warn!(pin, trigger = %event.trigger, "gpio: unexpected interrupt trigger");
                return;
            };
            sink(Ok(Edge { pin, level, at: SystemTime::now() }));
        };
        input.set_async_interrupt(hw::Trigger::Both, debounce, on_event).map_err(|e| pin_error(pin, e))?;

        // Dropping the rppal pin clears the interrupt, so it lives in the box.
        Ok(Box::new(RppalInput { input }))
    }

    fn output(&self, spec: &OutputSpec) -> Result<Box<dyn OutputPin>, GpioError> {
        // `into_output_low`/`_high` "changes the logic level ... and then
        // sets the mode to Output" (`pin.rs:348-364`): the pin drives the
        // desired level from its first instant as an output, so acquiring
        // never glitches the relay. If the pin is already an output (left so
        // by a previous run) the mode is not even written (`pin.rs:615-623`).
        let taken = self.take(spec.pin)?;
        let mut output = match spec.initial {
            Level::High => taken.into_output_high(),
            Level::Low => taken.into_output_low(),
        };
        // `reset_on_drop` defaults to true (`pin.rs:628`): on drop the pin
        // would return to its previous mode, usually Input, with pulls off
        // (`pin.rs:208-227`), and the relay line would float. Keep driving it.
        output.set_reset_on_drop(false);
        Ok(Box::new(RppalOutput { output }))
    }
}

/// A claimed input pin; holding it keeps the interrupt armed.
struct RppalInput {
    input: hw::InputPin,
}

impl InputPin for RppalInput {
    fn level(&self) -> Result<Level, GpioError> {
        Ok(level_of(self.input.read()))
    }
}

/// A claimed output pin.
struct RppalOutput {
    output: hw::OutputPin,
}

impl OutputPin for RppalOutput {
    fn level(&self) -> Result<Level, GpioError> {
        // `is_set_high` reads the pin's level register (`pin.rs:660-662`).
        Ok(Level::from_bit(self.output.is_set_high()))
    }

    fn set(&mut self, level: Level) -> Result<(), GpioError> {
        // A register write: it cannot fail once the pin is claimed.
        match level {
            Level::High => self.output.set_high(),
            Level::Low => self.output.set_low(),
        }
        Ok(())
    }
}
