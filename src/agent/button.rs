//! The Button actor: watches the configured input pins and records a
//! `button/<name>` message on each debounced edge, and on nothing else
//! (DESIGN: Topics and payloads). Owns the input pins while it runs; a read
//! failure is an actor failure (restart with back-off). It never publishes
//! directly and never blocks: edges arrive from the GPIO backend's thread as
//! messages.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use super::recorder::Recorder;
use super::supervisor::{self, SupervisedActor, Supervision};
use crate::config::ButtonConfig;
use crate::gpio::{Edge, Gpio, GpioError, InputPin, InputSpec, Level};
use crate::proto::{Body, ButtonBody, ButtonState, Topics};

/// A debounced edge, or a failure, from the backend.
#[derive(Message)]
#[rtype(result = "()")]
struct PinEvent {
    /// Which acquisition of the pins sent it; events from pins dropped by a
    /// restart are stale and ignored.
    generation: u64,
    /// Which button (index into the config): pins on different chips may
    /// share a number.
    index: usize,
    event: Result<Edge, GpioError>,
}

/// What a level means for a button.
pub fn button_state(level: Level, active_low: bool) -> ButtonState {
    if level.is_high() != active_low { ButtonState::Pressed } else { ButtonState::Released }
}

pub struct Button {
    buttons: Vec<ButtonConfig>,
    gpio: Arc<dyn Gpio>,
    recorder: Recorder,
    topics: Topics,
    sup: Supervision,
    /// Held while running; dropped (and re-acquired) on restart.
    pins: Vec<Box<dyn InputPin>>,
    /// Last recorded state, by button index.
    states: HashMap<usize, ButtonState>,
    generation: u64,
}

impl Button {
    pub fn new(
        buttons: Vec<ButtonConfig>,
        gpio: Arc<dyn Gpio>,
        recorder: Recorder,
        topics: Topics,
        sup: Supervision,
    ) -> Button {
        Button { buttons, gpio, recorder, topics, sup, pins: Vec::new(), states: HashMap::new(), generation: 0 }
    }

    fn on_edge(&mut self, index: usize, edge: Edge) {
        let Some(cfg) = self.buttons.get(index) else {
            return;
        };
        let state = button_state(edge.level, cfg.active_low);
        if self.states.insert(index, state) == Some(state) {
            return;
        }
        self.sup.board().button(&cfg.name, state);
        tracing::info!(button = %cfg.name, ?state, "edge");
        // Not awaited: a future per edge, polled by this actor's context
        // (actix polls every spawned future on each wake-up), cost more
        // than the edge itself under a burst (#8). The outbox logs a
        // record it could not store.
        let recorded = self.recorder.record_now(
            self.topics.button(&cfg.name),
            cfg.qos,
            false,
            edge.at,
            Body::Button(ButtonBody { button: cfg.name.clone(), state }),
        );
        if let Err(e) = recorded {
            tracing::error!("button event not recorded: {e}");
        }
    }
}

supervisor::supervised_actor!(Button);

impl Supervised for Button {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.pins.clear();
        self.sup.restarting();
    }
}

impl SupervisedActor for Button {
    fn supervision(&mut self) -> &mut Supervision {
        &mut self.sup
    }

    fn init(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        self.pins.clear();
        self.generation += 1;
        let generation = self.generation;
        for (index, cfg) in self.buttons.iter().enumerate() {
            let addr = ctx.address();
            let spec = InputSpec {
                chip: cfg.chip.clone(),
                pin: cfg.pin,
                pull: cfg.pull,
                debounce: cfg.debounce,
                active_low: cfg.active_low,
            };
            let pin = self
                .gpio
                .input(&spec, Box::new(move |event| addr.do_send(PinEvent { generation, index, event })))
                .map_err(|e| format!("button '{}': {e}", cfg.name))?;
            let level = pin.level().map_err(|e| format!("button '{}': {e}", cfg.name))?;
            let state = button_state(level, cfg.active_low);
            // After a restart an edge may have been missed while the pin was
            // failing; the current level is the truth, but it is not an edge.
            self.states.insert(index, state);
            self.sup.board().button_initial(&cfg.name, state);
            self.pins.push(pin);
        }
        Ok(())
    }
}

impl Handler<PinEvent> for Button {
    type Result = ();

    fn handle(&mut self, msg: PinEvent, ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        match msg.event {
            Ok(edge) => self.on_edge(msg.index, edge),
            Err(e) => supervisor::fail(self, ctx, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_active_low_button_is_pressed_when_its_pin_is_low() {
        assert_eq!(button_state(Level::Low, true), ButtonState::Pressed);
        assert_eq!(button_state(Level::High, true), ButtonState::Released);
        assert_eq!(button_state(Level::High, false), ButtonState::Pressed);
        assert_eq!(button_state(Level::Low, false), ButtonState::Released);
    }
}
