//! The Relay actor: owns the relay output pins, applies commands, and records
//! every state change as a retained `relay/<name>/state` message (DESIGN:
//! Topics and payloads, Command rules).
//!
//! * A command is acknowledged to the broker only after the pin switched and
//!   its `state` (or `error`) message is durable in the outbox; a crash in
//!   between means the broker delivers it again. A redelivered command with
//!   the same `id` is not applied twice.
//! * Pins are acquired once and kept in the actor struct, which survives
//!   supervisor restarts; acquiring never changes the level, and the pins are
//!   never reset on drop, so neither a restart of this actor nor of the
//!   process flips a relay.
//! * `power_on_state` is applied on the first start only; `failsafe_after`
//!   switches to `failsafe_state` when the link has been down that long.
//!
//! It runs on its own arbiter: `relays.json` is fsynced on every change. It
//! never publishes directly.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::recorder::Recorder;
use super::saved_relays::{SavedRelay, SavedRelays};
use super::status::RelayStatus;
use super::supervisor::{self, SupervisedActor, Supervision};
use crate::config::{PowerOnState, RelayConfig};
use crate::gpio::{Gpio, Level, OutputPin};
use crate::proto::{self, Body, Cause, Qos, RelayState, RelayStateBody, Topics};

/// A command as received on a topic under `relay/+/set`. The Link knows
/// nothing of relays or payloads; the Relay knows nothing of MQTT.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RelayCommand {
    /// The topic it came on (quoted in `error` messages).
    pub topic: String,
    /// The relay the topic names; `None` when it names none
    /// (`P/D/relay//set`): refused with an `error` message like any other.
    pub relay: Option<String>,
    pub payload: Vec<u8>,
    /// The MQTT packet id and DUP flag it arrived with: a broker redelivers
    /// an unacknowledged command with the same packet id and DUP set.
    pub pkid: u16,
    pub dup: bool,
    /// It arrived on a resumed session before the Link's sync echo: the
    /// broker queued it while the agent was offline (see [`CaughtUp`]).
    pub backlog: bool,
    /// Fired once the command is done with (applied and its `state` durable,
    /// refused with its `error` durable, held or superseded as backlog, or a
    /// duplicate): the Link may acknowledge it. Dropped unfired only when
    /// nothing could be recorded; the Link then leaves it unacknowledged (the
    /// broker delivers it again on a later session) and still acknowledges
    /// the commands after it.
    pub done: oneshot::Sender<()>,
}

/// The Link connected. `session_present = false`: the broker kept nothing
/// of ours, so no command can be redelivered.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkUp {
    pub session_present: bool,
}

/// The Link's sync echo arrived (or catch-up was given up): every command
/// queued while offline has been delivered; apply what was held back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CaughtUp;

/// The Link lost its connection: arm the failsafe timers.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LinkDown;

pub fn relay_level(state: RelayState, active_low: bool) -> Level {
    Level::from_bit((state == RelayState::On) != active_low)
}

pub fn relay_state(level: Level, active_low: bool) -> RelayState {
    if level.is_high() != active_low { RelayState::On } else { RelayState::Off }
}

/// The state a relay takes at power-on.
pub fn power_on(cfg: PowerOnState, saved: Option<RelayState>) -> RelayState {
    match cfg {
        PowerOnState::On => RelayState::On,
        PowerOnState::Off => RelayState::Off,
        // Nothing saved yet (first boot): off is the safe choice.
        PowerOnState::Last => saved.unwrap_or(RelayState::Off),
    }
}

struct Unit {
    cfg: RelayConfig,
    pin: Option<Box<dyn OutputPin>>,
    state: RelayState,
    cause: Cause,
    command_id: Option<String>,
    failsafe: Option<SpawnHandle>,
}

pub struct Relay {
    units: Vec<Unit>,
    gpio: Arc<dyn Gpio>,
    recorder: Recorder,
    topics: Topics,
    saved: SavedRelays,
    sup: Supervision,
    link_up: bool,
    powered_on: bool,
}

impl Relay {
    pub fn new(
        relays: Vec<RelayConfig>,
        state_dir: &Path,
        gpio: Arc<dyn Gpio>,
        recorder: Recorder,
        topics: Topics,
        sup: Supervision,
    ) -> Relay {
        let units = relays
            .into_iter()
            .map(|cfg| Unit {
                cfg,
                pin: None,
                state: RelayState::Off,
                cause: Cause::Startup,
                command_id: None,
                failsafe: None,
            })
            .collect();
        Relay {
            units,
            gpio,
            recorder,
            topics,
            saved: SavedRelays::load(state_dir),
            sup,
            link_up: false,
            powered_on: false,
        }
    }

    /// Drives unit `i` to `state` (if it is not there already) and remembers
    /// why. Saving the state is best effort: the pin is the truth.
    fn switch(&mut self, i: usize, state: RelayState, cause: Cause, command_id: Option<String>) -> Result<(), String> {
        let unit = &mut self.units[i];
        let pin = unit.pin.as_mut().ok_or_else(|| format!("relay '{}': pin not acquired", unit.cfg.name))?;
        let level = relay_level(state, unit.cfg.active_low);
        if pin.level().map_err(|e| format!("relay '{}': {e}", unit.cfg.name))? != level {
            pin.set(level).map_err(|e| format!("relay '{}': {e}", unit.cfg.name))?;
            tracing::info!(relay = %unit.cfg.name, state = state.as_str(), ?cause, "switched");
        }
        unit.state = state;
        unit.cause = cause;
        unit.command_id = command_id.clone();
        let name = unit.cfg.name.clone();
        if let Err(e) = self.saved.save(&name, SavedRelay { state, command_id: command_id.clone() }) {
            tracing::error!("relay '{name}': state not saved ({e}); power_on_state = \"last\" may not restore it");
        }
        self.sup.board().relay(&name, RelayStatus { state, cause, command_id });
        Ok(())
    }

    /// Records unit `i`'s current state; resolves when durable.
    fn record_state(&self, i: usize) -> impl Future<Output = Result<u64, crate::outbox::OutboxError>> + 'static {
        let u = &self.units[i];
        self.recorder.record(
            self.topics.relay_state(&u.cfg.name),
            u.cfg.qos,
            true,
            SystemTime::now(),
            Body::RelayState(RelayStateBody {
                relay: u.cfg.name.clone(),
                state: u.state,
                cause: u.cause,
                command_id: u.command_id.clone(),
            }),
        )
    }

    fn record_in_background(&self, i: usize, ctx: &mut Context<Self>) {
        ctx.spawn(self.record_state(i).into_actor(self).map(|res, _, _| {
            if let Err(e) = res {
                tracing::error!("relay state not recorded: {e}");
            }
        }));
    }

    fn arm_failsafes(&mut self, ctx: &mut Context<Self>) {
        for i in 0..self.units.len() {
            let Some(after) = self.units[i].cfg.failsafe_after else {
                continue;
            };
            if let Some(h) = self.units[i].failsafe.take() {
                ctx.cancel_future(h);
            }
            let handle = ctx.run_later(after, move |act, ctx| act.failsafe(i, ctx));
            self.units[i].failsafe = Some(handle);
        }
    }

    fn failsafe(&mut self, i: usize, ctx: &mut Context<Self>) {
        self.units[i].failsafe = None;
        if self.link_up {
            return;
        }
        let state = self.units[i].cfg.failsafe_state;
        tracing::warn!(relay = %self.units[i].cfg.name, "link down for failsafe_after: switching to failsafe state {}", state.as_str());
        match self.switch(i, state, Cause::Failsafe, None) {
            Ok(()) => self.record_in_background(i, ctx),
            Err(e) => supervisor::fail(self, ctx, e),
        }
    }
}

impl Actor for Relay {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        supervisor::start_after_backoff(self, ctx);
    }
}

impl Supervised for Relay {
    fn restarting(&mut self, _: &mut Context<Self>) {
        for u in &mut self.units {
            // Timers died with the old context.
            u.failsafe = None;
        }
        self.sup.restarting();
    }
}

impl SupervisedActor for Relay {
    fn supervision(&mut self) -> &mut Supervision {
        &mut self.sup
    }

    fn init(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        for i in 0..self.units.len() {
            let u = &mut self.units[i];
            if u.pin.is_none() {
                u.pin = Some(self.gpio.output(u.cfg.pin).map_err(|e| format!("relay '{}': {e}", u.cfg.name))?);
            }
            let pin = u.pin.as_ref().ok_or_else(|| format!("relay '{}': pin not acquired", u.cfg.name))?;
            let current =
                relay_state(pin.level().map_err(|e| format!("relay '{}': {e}", u.cfg.name))?, u.cfg.active_low);
            if self.powered_on {
                // A restart of this actor: the pin is the truth.
                u.state = current;
                continue;
            }
            let saved = self.saved.get(&u.cfg.name).cloned();
            let desired = power_on(u.cfg.power_on_state, saved.as_ref().map(|s| s.state));
            let command_id = saved.filter(|s| s.state == desired).and_then(|s| s.command_id);
            self.switch(i, desired, Cause::Startup, command_id)?;
        }
        if !self.powered_on {
            self.powered_on = true;
            for i in 0..self.units.len() {
                self.record_in_background(i, ctx);
            }
        }
        if !self.link_up {
            self.arm_failsafes(ctx);
        }
        Ok(())
    }
}

impl Handler<LinkUp> for Relay {
    type Result = ();

    fn handle(&mut self, msg: LinkUp, ctx: &mut Context<Self>) {
        tracing::debug!(session_present = msg.session_present, "link up");
        self.link_up = true;
        for i in 0..self.units.len() {
            if let Some(h) = self.units[i].failsafe.take() {
                ctx.cancel_future(h);
            }
            let u = &mut self.units[i];
            u.cause = Cause::Reconnect;
            self.sup
                .board()
                .relay(&u.cfg.name, RelayStatus { state: u.state, cause: u.cause, command_id: u.command_id.clone() });
            self.record_in_background(i, ctx);
        }
    }
}

impl Handler<CaughtUp> for Relay {
    type Result = ();

    fn handle(&mut self, _: CaughtUp, _: &mut Context<Self>) {}
}

impl Handler<LinkDown> for Relay {
    type Result = ();

    fn handle(&mut self, _: LinkDown, ctx: &mut Context<Self>) {
        self.link_up = false;
        self.arm_failsafes(ctx);
    }
}

impl Handler<RelayCommand> for Relay {
    type Result = ();

    fn handle(&mut self, msg: RelayCommand, ctx: &mut Context<Self>) {
        let topic = msg.topic.clone();
        tracing::debug!(topic = %topic, pkid = msg.pkid, dup = msg.dup, backlog = msg.backlog, "command");
        let relay = msg.relay.clone().unwrap_or_default();
        let index = self.units.iter().position(|u| u.cfg.name == relay);
        let record = match proto::parse_command(&relay, index.is_some(), &msg.payload, SystemTime::now()) {
            Err(refusal) => {
                tracing::warn!(topic = %topic, code = ?refusal.code, "command refused: {}", refusal.message);
                let fut = self.recorder.record(
                    self.topics.error(),
                    Qos::AtLeastOnce,
                    false,
                    SystemTime::now(),
                    Body::Error(refusal.into_body(&topic)),
                );
                Box::pin(fut) as std::pin::Pin<Box<dyn Future<Output = _>>>
            }
            Ok(cmd) => {
                let Some(i) = index else {
                    return;
                };
                let u = &self.units[i];
                // `command_id` is the last applied command's id (kept through
                // reconnects and restarts, in relays.json).
                let redelivered = cmd.id.is_some() && u.command_id == cmd.id;
                if redelivered {
                    tracing::info!(relay = %u.cfg.name, id = ?cmd.id, "command delivered again; already applied");
                } else {
                    let target = cmd.action.apply(u.state);
                    if let Err(e) = self.switch(i, target, Cause::Command, cmd.id.clone()) {
                        // Not acknowledged: the broker delivers it again
                        // after the next reconnect.
                        supervisor::fail(self, ctx, e);
                        return;
                    }
                }
                Box::pin(self.record_state(i))
            }
        };
        let done = msg.done;
        // Wait (holding the mailbox) so commands are applied and acknowledged
        // strictly in order.
        ctx.wait(record.into_actor(self).map(move |res, _, _| match res {
            Ok(_) => {
                // The Link may have dropped the connection it came on.
                let _ = done.send(());
            }
            Err(e) => tracing::error!(
                "command on '{topic}' not recorded ({e}); it stays unacknowledged and the broker will deliver it again"
            ),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_low_relays_are_on_when_their_pin_is_low() {
        assert_eq!(relay_level(RelayState::On, true), Level::Low);
        assert_eq!(relay_level(RelayState::On, false), Level::High);
        assert_eq!(relay_state(Level::Low, true), RelayState::On);
        assert_eq!(relay_state(Level::Low, false), RelayState::Off);
    }

    #[test]
    fn power_on_last_restores_the_saved_state_and_defaults_to_off() {
        assert_eq!(power_on(PowerOnState::Last, Some(RelayState::On)), RelayState::On);
        assert_eq!(power_on(PowerOnState::Last, None), RelayState::Off);
        assert_eq!(power_on(PowerOnState::On, Some(RelayState::Off)), RelayState::On);
        assert_eq!(power_on(PowerOnState::Off, Some(RelayState::On)), RelayState::Off);
    }
}
