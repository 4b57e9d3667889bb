//! The Relay actor: owns the relay output pins, applies commands, and records
//! every state change as a retained `relay/<name>/state` message (DESIGN:
//! Topics and payloads, Command rules). It never publishes directly, and it
//! knows nothing of MQTT beyond the packet id and flags a [`RelayCommand`]
//! carries.
//!
//! # Commands
//!
//! Every [`RelayCommand`] ends with its `done` fired (the Link may then
//! acknowledge it) in exactly one of these ways, in the order checked (the
//! rules themselves are the sans-IO `command_gate`):
//!
//! 1. **Redelivery** (DUP set, same packet id and the same topic and payload
//!    as a command handled on this session): `done` at once; nothing
//!    switches and nothing is recorded.
//! 2. **Refused** (bad payload, unknown relay, a topic that names no relay
//!    such as `P/D/relay//set`, expired, too large): an `error` message is
//!    recorded (urgent, like every record a command waits on); `done` once
//!    it is durable.
//! 3. **Already applied** (its `id` is among the 256 most recently applied
//!    ids, all relays): nothing switches. If the relay still shows that
//!    command (its `command_id` is that id: nothing newer happened to it),
//!    its current state is recorded again and `done` fires once that is
//!    durable, so a lost confirmation is repeated; otherwise `done` fires at
//!    once and nothing is recorded (a confirmation naming an old command
//!    would misreport what set the relay).
//! 4. **Held** (a plain command, no `id`, that arrived as backlog: queued by
//!    the broker while the agent was offline): `done` at once, so the
//!    broker's in-flight window keeps moving. It replaces any plain command
//!    held for the same relay, which is logged as superseded and never
//!    applied. On [`CaughtUp`] (or a [`LinkUp`] without a session: nothing
//!    more can be queued) the held commands are applied, cause `command`.
//!    Trade-off: a held command is acknowledged before it is applied, so a
//!    crash in that short window loses that one stale plain command. 300
//!    queued plain toggles switch the relay at most once.
//! 5. **Applied**: the pin is switched; the `state` message is recorded
//!    together with the saved relay state (the relay states, the command's
//!    id and its packet id: `saved_relays`), which the outbox writes just
//!    before the record in the same group commit; `done` once that one
//!    commit made both durable. The record is urgent: in `batch` mode the
//!    outbox commits at once instead of waiting for `flush_interval`. Any command
//!    applied to a relay discards the plain command held for it (the applied
//!    one is newer; a backlog command with an `id` is applied at once).
//!    If the pin cannot be switched, an `error` with code `gpio_failed` is
//!    recorded, `done` fires once it is durable (so later acknowledgements
//!    are never held back), and then the actor fails and its supervisor
//!    restarts it.
//!
//! Commands are handled strictly one at a time, in arrival order: the actor
//! waits (holding its mailbox) until a command's record is durable.
//!
//! The applied ids and the session's packet ids are forgotten as follows:
//! ids beyond the newest 256; packet ids when [`LinkUp`] says the broker
//! kept no session (written at once), and a packet id's entry when a command
//! with DUP clear arrives on it. An applied command's id and packet id are
//! written before its `done`; the packet ids of refused, duplicate and held
//! commands (nothing switched) are written with the next write, so after a
//! crash such a redelivery may produce its `error` again, never a second
//! switch.
//!
//! # Reconnect states
//!
//! On [`LinkUp`] with `session_present = false` (the broker kept nothing of
//! ours; its retained states may be gone too) each relay records its current
//! state with cause `reconnect`, unless its previous `reconnect` record is
//! still waiting (not yet durable, or still in the outbox: looked up with
//! [`OutboxReader::read_async`] while this actor's mailbox waits). A reconnect storm adds at
//! most one such record per relay. A [`LinkUp`] that resumes the session
//! records nothing: the broker still holds the retained states.
//!
//! # Pins
//!
//! * Pins are acquired once and kept in the actor struct, which survives
//!   supervisor restarts; acquiring never changes the level, and the pins are
//!   never reset on drop, so neither a restart of this actor nor of the
//!   process flips a relay.
//! * `power_on_state` is applied on the first start only; `failsafe_after`
//!   switches to `failsafe_state` when the link has been down that long.
//!
//! # Saved state
//!
//! The saved relay state lives in the outbox's database (`saved_relays`).
//! A command's snapshot rides on its record (one commit). Changes without a
//! command (power-on, failsafe, held commands applied, the session's packet
//! ids forgotten on a lost session) are saved on their own, ordered with the
//! records that follow, and durable with the next commit (at once for a lost
//! session, as before #8).
//!
//! It runs on the agent's one actor thread with the Link: the saved state is
//! read from sled once, when the actor is created (at start-up); every other
//! outbox read goes through the outbox's reader.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use actix::prelude::*;
use futures_util::FutureExt;
use tokio::sync::oneshot;

use super::command_gate::{self, Arrival, CommandGate, Verdict};
use super::recorder::Recorder;
use super::saved_relays::{SavedRelay, SavedRelays};
use super::status::RelayStatus;
use super::supervisor::{self, SupervisedActor, Supervision};
use crate::config::{PowerOnState, RelayConfig};
use crate::gpio::{Gpio, Level, OutputPin, OutputSpec};
use crate::outbox::{OutboxError, OutboxReader, Saved};
use crate::proto::{self, Body, Cause, ErrorCode, Qos, Refusal, RelayState, RelayStateBody, Topics};

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

/// A relay's newest `reconnect` record (see the module doc).
#[derive(Debug, Default)]
struct ReconnectRecord {
    /// Appended, not yet durable.
    in_flight: u32,
    /// The seq of the newest one that became durable.
    seq: Option<u64>,
}

struct Unit {
    cfg: RelayConfig,
    pin: Option<Box<dyn OutputPin>>,
    state: RelayState,
    cause: Cause,
    command_id: Option<String>,
    failsafe: Option<SpawnHandle>,
    reconnect: ReconnectRecord,
}

/// The outcome of a command, once its record is durable.
type Record = std::pin::Pin<Box<dyn Future<Output = Result<u64, OutboxError>>>>;

pub struct Relay {
    units: Vec<Unit>,
    gpio: Arc<dyn Gpio>,
    recorder: Recorder,
    reader: OutboxReader,
    topics: Topics,
    saved: SavedRelays,
    gate: CommandGate,
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
        reader: OutboxReader,
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
                reconnect: ReconnectRecord::default(),
            })
            .collect();
        let saved = SavedRelays::load(&reader, state_dir);
        let gate = CommandGate::restore(saved.command_ids(), saved.session());
        Relay { units, gpio, recorder, reader, topics, saved, gate, sup, link_up: false, powered_on: false }
    }

    fn index(&self, relay: &str) -> Option<usize> {
        self.units.iter().position(|u| u.cfg.name == relay)
    }

    /// Drives unit `i` to `state` (if it is not there already) and remembers
    /// why, in memory: [`Relay::snapshot`] takes it for the outbox.
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
        self.saved.set(&name, SavedRelay { state, command_id: command_id.clone() });
        self.sup.board().relay(&name, RelayStatus { state, cause, command_id });
        Ok(())
    }

    /// The relay states and what changed in the command gate's memory, as
    /// the values to save in the outbox; empty if nothing changed since the
    /// last snapshot.
    fn snapshot(&mut self) -> Vec<Saved> {
        self.saved.record(self.gate.take_changes());
        self.saved.snapshot()
    }

    /// Saves what changed without a command's record to carry it (see the
    /// module doc: Saved state). A failure is logged, not fatal: the pin is
    /// the truth, and the gate still remembers in memory.
    fn save_in_background(&mut self, ctx: &mut Context<Self>, urgent: bool) {
        let saved = self.snapshot();
        if saved.is_empty() {
            return;
        }
        let save = self.recorder.outbox().save(saved, urgent);
        ctx.spawn(save.into_actor(self).map(|res, act, _| match res {
            Ok(()) => act.saved.migrated(),
            Err(e) => tracing::error!(
                "the relays' saved state is not durable ({e}): after a restart power_on_state = \"last\" may not \
                 restore the relays, and a command delivered again may be applied again"
            ),
        }));
    }

    /// Records unit `i`'s current state; resolves when durable.
    fn record_state(&self, i: usize) -> impl Future<Output = Result<u64, OutboxError>> + 'static {
        let (topic, qos, body) = self.state_message(i);
        self.recorder.record(topic, qos, true, SystemTime::now(), body)
    }

    /// Records unit `i`'s current state for a command waiting on it: urgent,
    /// with `saved` in the same commit; resolves when both are durable.
    fn record_command_state(
        &self,
        i: usize,
        saved: Vec<Saved>,
    ) -> impl Future<Output = Result<u64, OutboxError>> + 'static {
        let (topic, qos, body) = self.state_message(i);
        self.recorder.record_urgent(topic, qos, true, SystemTime::now(), body, saved)
    }

    fn state_message(&self, i: usize) -> (String, Qos, Body) {
        let u = &self.units[i];
        let body = Body::RelayState(RelayStateBody {
            relay: u.cfg.name.clone(),
            state: u.state,
            cause: u.cause,
            command_id: u.command_id.clone(),
        });
        (self.topics.relay_state(&u.cfg.name), u.cfg.qos, body)
    }

    /// Records an `error` message for a command on `topic` (urgent: the
    /// command waits on it); resolves when durable.
    fn record_error(&self, topic: &str, refusal: Refusal) -> impl Future<Output = Result<u64, OutboxError>> + 'static {
        self.recorder.record_urgent(
            self.topics.error(),
            Qos::AtLeastOnce,
            false,
            SystemTime::now(),
            Body::Error(refusal.into_body(topic)),
            Vec::new(),
        )
    }

    fn record_in_background(&self, i: usize, ctx: &mut Context<Self>) {
        ctx.spawn(self.record_state(i).into_actor(self).map(|res, _, _| {
            if let Err(e) = res {
                tracing::error!("relay state not recorded: {e}");
            }
        }));
    }

    /// Waits (holding the mailbox, so commands are handled strictly in
    /// order) until `record` is durable, then runs `on_durable` and fires
    /// `done`; then fails the actor if `fail` says so.
    fn finish(
        &mut self,
        ctx: &mut Context<Self>,
        record: Record,
        done: oneshot::Sender<()>,
        topic: String,
        on_durable: impl FnOnce(&mut Relay) + 'static,
        fail: Option<String>,
    ) {
        ctx.wait(record.into_actor(self).map(move |res, act, ctx| {
            match res {
                Ok(_) => {
                    on_durable(act);
                    // An error only means the Link dropped the connection
                    // the command came on; the broker delivers it again.
                    let _ = done.send(());
                }
                Err(e) => tracing::error!(
                    "command on '{topic}' not recorded ({e}); it stays unacknowledged and the broker will deliver it again"
                ),
            }
            if let Some(e) = fail {
                supervisor::fail(act, ctx, e);
            }
        }));
    }

    /// The pin of unit `i` could not be switched for a command on `topic`:
    /// the `error` message to record.
    fn gpio_failed(&self, i: usize, target: RelayState, error: &str, command_id: Option<String>) -> Refusal {
        let name = &self.units[i].cfg.name;
        tracing::error!(relay = %name, "could not switch to {}: {error}", target.as_str());
        Refusal {
            code: ErrorCode::GpioFailed,
            message: format!("relay '{name}' could not be switched {}: {error}", target.as_str()),
            command_id,
        }
    }

    /// Applies the held backlog commands (the backlog is over).
    fn apply_held(&mut self, ctx: &mut Context<Self>, why: &str) {
        let held = self.gate.take_held();
        if held.is_empty() {
            return;
        }
        let mut failure = None;
        for h in held {
            let Some(i) = self.index(&h.relay) else { continue };
            let target = h.action.apply(self.units[i].state);
            tracing::info!(relay = %h.relay, "{why}: applying the last queued plain command '{}'", h.action.as_str());
            match self.switch(i, target, Cause::Command, None) {
                Ok(()) => self.record_in_background(i, ctx),
                Err(e) => {
                    // Recorded when called: the future only reports durability.
                    let record = self.record_error(&h.topic, self.gpio_failed(i, target, &e, None));
                    ctx.spawn(record.into_actor(self).map(|res, _, _| {
                        if let Err(e) = res {
                            tracing::error!("gpio_failed error not recorded: {e}");
                        }
                    }));
                    failure.get_or_insert(e);
                }
            }
        }
        self.save_in_background(ctx, false);
        if let Some(e) = failure {
            supervisor::fail(self, ctx, e);
        }
    }

    /// Records each relay's state with cause `reconnect`, unless its
    /// previous `reconnect` record is still waiting to be delivered (not yet
    /// durable, or still in the outbox). The outbox lookups run on the
    /// outbox's reader (a sled read may touch the disk), and this actor's
    /// mailbox waits for them, so no command slips in between.
    fn record_reconnects(&mut self, ctx: &mut Context<Self>) {
        let mut lookups = Vec::new();
        for (i, u) in self.units.iter().enumerate() {
            if u.reconnect.in_flight == 0
                && let Some(seq) = u.reconnect.seq
            {
                lookups.push(self.reader.read_async(seq, seq, 1).map(move |res| (i, seq, res)));
            }
        }
        if lookups.is_empty() {
            let stored = vec![false; self.units.len()];
            return self.record_reconnects_unless(&stored, ctx);
        }
        let found = futures_util::future::join_all(lookups);
        ctx.wait(found.into_actor(self).map(|found, act, ctx| {
            let mut stored = vec![false; act.units.len()];
            for (i, seq, res) in found {
                stored[i] = match res {
                    Ok(records) => !records.is_empty(),
                    Err(e) => {
                        tracing::warn!(
                            relay = %act.units[i].cfg.name,
                            "cannot tell whether the previous reconnect state (seq {seq}) is still in the outbox ({e}); recording a new one"
                        );
                        false
                    }
                };
            }
            act.record_reconnects_unless(&stored, ctx);
        }));
    }

    /// [`Relay::record_reconnects`] once it knows which previous records
    /// are still `stored`.
    fn record_reconnects_unless(&mut self, stored: &[bool], ctx: &mut Context<Self>) {
        for (i, &stored) in stored.iter().enumerate() {
            if self.units[i].reconnect.in_flight > 0 || stored {
                tracing::debug!(relay = %self.units[i].cfg.name, "previous reconnect state still waiting in the outbox; none added");
            } else {
                self.record_reconnect(i, ctx);
            }
        }
    }

    fn record_reconnect(&mut self, i: usize, ctx: &mut Context<Self>) {
        let u = &mut self.units[i];
        u.cause = Cause::Reconnect;
        u.reconnect.in_flight += 1;
        self.sup
            .board()
            .relay(&u.cfg.name, RelayStatus { state: u.state, cause: u.cause, command_id: u.command_id.clone() });
        ctx.spawn(self.record_state(i).into_actor(self).map(move |res, act, _| {
            let r = &mut act.units[i].reconnect;
            r.in_flight = r.in_flight.saturating_sub(1);
            match res {
                Ok(seq) => r.seq = Some(r.seq.map_or(seq, |s| s.max(seq))),
                Err(e) => tracing::error!("relay state not recorded: {e}"),
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
            Ok(()) => {
                self.save_in_background(ctx, false);
                self.record_in_background(i, ctx);
            }
            Err(e) => supervisor::fail(self, ctx, e),
        }
    }
}

supervisor::supervised_actor!(Relay);

impl Supervised for Relay {
    fn restarting(&mut self, _: &mut Context<Self>) {
        for u in &mut self.units {
            // Timers and record futures died with the old context. A
            // reconnect record whose outcome is unknown no longer holds back
            // the next one (at worst one extra record).
            u.failsafe = None;
            u.reconnect = ReconnectRecord::default();
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
            let saved = self.saved.get(&self.units[i].cfg.name).cloned();
            let u = &mut self.units[i];
            if u.pin.is_none() {
                // Claimed driving the power-on state from the first instant
                // (no glitch). Only the first start gets here: the pins are
                // kept across restarts of this actor.
                let desired = power_on(u.cfg.power_on_state, saved.as_ref().map(|s| s.state));
                let spec = OutputSpec {
                    chip: u.cfg.chip.clone(),
                    pin: u.cfg.pin,
                    initial: relay_level(desired, u.cfg.active_low),
                    active_low: u.cfg.active_low,
                };
                u.pin = Some(self.gpio.output(&spec).map_err(|e| format!("relay '{}': {e}", u.cfg.name))?);
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
            self.save_in_background(ctx, false);
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
        for u in &mut self.units {
            if let Some(h) = u.failsafe.take() {
                ctx.cancel_future(h);
            }
        }
        if msg.session_present {
            return;
        }
        if self.gate.session_lost() {
            self.save_in_background(ctx, true);
        }
        self.apply_held(ctx, "the broker kept no session, so nothing more is queued");
        self.record_reconnects(ctx);
    }
}

impl Handler<CaughtUp> for Relay {
    type Result = ();

    fn handle(&mut self, _: CaughtUp, ctx: &mut Context<Self>) {
        self.apply_held(ctx, "the commands queued while offline are all delivered");
    }
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
        let RelayCommand { topic, relay, payload, pkid, dup, backlog, done } = msg;
        tracing::debug!(topic = %topic, pkid, dup, backlog, "command");
        let fingerprint = command_gate::fingerprint(&topic, &payload);
        let arrival = Arrival { topic: &topic, pkid, dup, backlog, fingerprint };
        if self.gate.redelivered(&arrival) {
            tracing::info!(topic = %topic, pkid, "command delivered again on the same session; already handled, not applied again");
            // An error only means the Link dropped that connection.
            let _ = done.send(());
            return;
        }
        let index = relay.as_deref().and_then(|r| self.index(r));
        let checked = match relay.as_deref() {
            None => Err(proto::refuse_topic_without_relay(&topic, &payload)),
            Some(r) => proto::parse_command(r, index.is_some(), &payload, SystemTime::now()),
        };
        let (cmd, i) = match (checked, index) {
            (Ok(cmd), Some(i)) => (cmd, i),
            (Ok(cmd), None) => {
                // parse_command refuses unknown relays; kept total all the same.
                let refusal = Refusal {
                    code: ErrorCode::UnknownRelay,
                    message: format!("relay '{}' is not configured", cmd.relay),
                    command_id: cmd.id,
                };
                return self.refuse(ctx, topic, refusal, done, pkid, fingerprint);
            }
            (Err(refusal), _) => return self.refuse(ctx, topic, refusal, done, pkid, fingerprint),
        };
        match self.gate.admit(&arrival, &cmd) {
            Verdict::AlreadyApplied => {
                let u = &self.units[i];
                if u.command_id == cmd.id {
                    tracing::info!(relay = %u.cfg.name, id = ?cmd.id, "command delivered again; already applied: recording the relay's state again");
                    let saved = self.snapshot();
                    let record = Box::pin(self.record_command_state(i, saved));
                    self.finish(ctx, record, done, topic, |act| act.saved.migrated(), None);
                } else {
                    tracing::info!(relay = %u.cfg.name, id = ?cmd.id, "command delivered again; already applied and since superseded: acknowledged, nothing recorded");
                    // An error only means the Link dropped that connection.
                    let _ = done.send(());
                }
            }
            Verdict::Held { superseded } => {
                if let Some(old) = superseded {
                    tracing::info!(relay = %cmd.relay, "queued plain command '{}' superseded by a later one; not applied", old.action.as_str());
                }
                tracing::debug!(relay = %cmd.relay, "queued plain command '{}' held until the backlog is delivered", cmd.action.as_str());
                // An error only means the Link dropped that connection.
                let _ = done.send(());
            }
            Verdict::Apply => {
                let target = cmd.action.apply(self.units[i].state);
                match self.switch(i, target, Cause::Command, cmd.id.clone()) {
                    Ok(()) => {
                        if let Some(old) = self.gate.applied(&cmd, pkid, fingerprint) {
                            tracing::info!(relay = %cmd.relay, "queued plain command '{}' superseded by a newer command; not applied", old.action.as_str());
                        }
                        let saved = self.snapshot();
                        let record = Box::pin(self.record_command_state(i, saved));
                        self.finish(ctx, record, done, topic, |act| act.saved.migrated(), None);
                    }
                    Err(e) => {
                        let refusal = self.gpio_failed(i, target, &e, cmd.id);
                        let record = Box::pin(self.record_error(&topic, refusal));
                        self.finish(ctx, record, done, topic, move |act| act.gate.handled(pkid, fingerprint), Some(e));
                    }
                }
            }
        }
    }
}

impl Relay {
    /// Records a refused command's `error`; `done` once it is durable.
    fn refuse(
        &mut self,
        ctx: &mut Context<Self>,
        topic: String,
        refusal: Refusal,
        done: oneshot::Sender<()>,
        pkid: u16,
        fingerprint: u64,
    ) {
        tracing::warn!(topic = %topic, code = ?refusal.code, "command refused: {}", refusal.message);
        let record = Box::pin(self.record_error(&topic, refusal));
        self.finish(ctx, record, done, topic, move |act| act.gate.handled(pkid, fingerprint), None);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::agent::status::StatusBoard;
    use crate::config::{Durability, OutboxConfig, SupervisorConfig};
    use crate::gpio::{EdgeSink, GpioError, InputPin, InputSpec};
    use crate::outbox::{MemStore, OutboxHandle};

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

    // -----------------------------------------------------------------------
    // The actor, with a fake pin, an in-memory outbox and a fake `done`.

    const PUMP_SET: &str = "fl/pi/relay/pump/set";

    /// The pump's pin: its level, how often it changed, and whether `set` fails.
    #[derive(Default)]
    struct Board {
        high: bool,
        switches: u32,
        fail: bool,
    }

    #[derive(Clone, Default)]
    struct FakeGpio(Arc<Mutex<Board>>);

    impl FakeGpio {
        fn board(&self) -> std::sync::MutexGuard<'_, Board> {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }

    impl Gpio for FakeGpio {
        fn input(&self, spec: &InputSpec, _: EdgeSink) -> Result<Box<dyn InputPin>, GpioError> {
            Err(GpioError::NoSuchPin(spec.pin))
        }

        fn output(&self, spec: &OutputSpec) -> Result<Box<dyn OutputPin>, GpioError> {
            // Claiming drives the initial level (a switch if it differs).
            let mut b = self.board();
            if b.high != spec.initial.is_high() {
                b.switches += 1;
                b.high = spec.initial.is_high();
            }
            drop(b);
            Ok(Box::new(self.clone()))
        }
    }

    impl OutputPin for FakeGpio {
        fn level(&self) -> Result<Level, GpioError> {
            Ok(Level::from_bit(self.board().high))
        }

        fn set(&mut self, level: Level) -> Result<(), GpioError> {
            let mut b = self.board();
            if b.fail {
                return Err(GpioError::Failed { pin: 27, reason: "the line went away".into() });
            }
            if b.high != level.is_high() {
                b.switches += 1;
                b.high = level.is_high();
            }
            Ok(())
        }
    }

    /// What survives a run: the state_dir and the outbox's database.
    struct Disk {
        dir: tempfile::TempDir,
        store: Mutex<MemStore>,
    }

    impl Disk {
        fn new() -> Disk {
            Disk { dir: tempfile::tempdir().expect("tempdir"), store: Mutex::new(MemStore::new()) }
        }

        fn store(&self) -> MemStore {
            self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
        }

        /// A power cut (or `kill -9`) now: the next run finds only what the
        /// outbox had committed.
        fn crash(&self) {
            let crashed = self.store().crashed();
            *self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = crashed;
        }
    }

    /// One run of the agent's Relay over `disk`.
    struct Run {
        relay: Addr<Relay>,
        outbox: OutboxHandle,
        reader: OutboxReader,
    }

    fn start(disk: &Disk, gpio: &FakeGpio) -> Run {
        start_with(disk, gpio, Durability::Always, Duration::ZERO)
    }

    fn start_with(disk: &Disk, gpio: &FakeGpio, durability: Durability, flush_interval: Duration) -> Run {
        let cfg = OutboxConfig { max_bytes: 1 << 20, durability, flush_interval };
        let (outbox, reader, _) = crate::outbox::open_in_memory(&disk.store(), &cfg).expect("in-memory outbox");
        let pump = RelayConfig {
            name: "pump".into(),
            chip: None,
            pin: 27,
            active_low: false,
            power_on_state: PowerOnState::Last,
            failsafe_after: None,
            failsafe_state: RelayState::Off,
            qos: Qos::AtLeastOnce,
        };
        let sup_cfg = SupervisorConfig {
            max_restarts: 100,
            window: Duration::from_secs(60),
            backoff_max: Duration::from_millis(10),
        };
        let sup = Supervision::new("relay", Arc::new(StatusBoard::new("pi")), &sup_cfg);
        let (dir, gpio, recorder, r) = (
            disk.dir.path().to_path_buf(),
            Arc::new(gpio.clone()),
            Recorder::new("pi", 7, outbox.clone()),
            reader.clone(),
        );
        let relay =
            Supervisor::start(move |_| Relay::new(vec![pump], &dir, gpio, recorder, r, Topics::new("fl", "pi"), sup));
        Run { relay, outbox, reader }
    }

    /// Answered once the Relay has handled every message before it.
    #[derive(Message)]
    #[rtype(result = "()")]
    struct Settled;

    impl Handler<Settled> for Relay {
        type Result = ();
        fn handle(&mut self, _: Settled, _: &mut Context<Self>) {}
    }

    /// Runs `test` inside an actix system, as the agent's actors run.
    fn in_system<F: Future<Output = ()>>(test: impl FnOnce() -> F) {
        System::new().block_on(async move { test().await });
    }

    impl Run {
        /// Delivers a command; true once the Relay fired `done`.
        async fn deliver(&self, topic: &str, payload: &str, pkid: u16, dup: bool, backlog: bool) -> bool {
            let (done, rx) = oneshot::channel();
            let relay = Topics::new("fl", "pi").relay_of_set_topic(topic).map(str::to_string);
            self.relay.do_send(RelayCommand {
                topic: topic.into(),
                relay,
                payload: payload.as_bytes().to_vec(),
                pkid,
                dup,
                backlog,
                done,
            });
            // A generous deadline, not a timing assertion: `false` means
            // `done` was dropped or never came.
            matches!(tokio::time::timeout(Duration::from_secs(30), rx).await, Ok(Ok(())))
        }

        /// Returns once the actor has run `init` (messages wait for it):
        /// the pins are claimed and the start-up records appended.
        async fn started(&self) {
            // The link is down already; this only arms failsafes (none here).
            self.tell(LinkDown).await;
        }

        async fn pump(&self, payload: &str, pkid: u16, dup: bool) -> bool {
            self.deliver(PUMP_SET, payload, pkid, dup, false).await
        }

        /// Sends `msg` and returns once the Relay is done with it, including
        /// what it holds its mailbox for (the reconnect lookups).
        async fn tell<M>(&self, msg: M)
        where
            M: Message<Result = ()> + Send + 'static,
            Relay: Handler<M>,
        {
            self.relay.send(msg).await.expect("the relay is running");
            self.settled().await;
        }

        async fn settled(&self) {
            self.relay.send(Settled).await.expect("the relay is running");
        }

        /// Every record in the outbox: (topic, payload), in seq order.
        fn records(&self) -> Vec<(String, Value)> {
            self.reader
                .read(1, u64::MAX, 100_000)
                .expect("read the outbox")
                .into_iter()
                .map(|r| (r.topic, serde_json::from_slice(&r.payload).expect("a JSON payload")))
                .collect()
        }

        fn states(&self, cause: &str) -> Vec<Value> {
            self.records()
                .into_iter()
                .filter(|(t, v)| t == "fl/pi/relay/pump/state" && v["cause"] == cause)
                .map(|(_, v)| v)
                .collect()
        }

        fn errors(&self) -> Vec<Value> {
            self.records().into_iter().filter(|(t, _)| t == "fl/pi/error").map(|(_, v)| v).collect()
        }

        /// Acknowledges every record, as a broker would once delivered.
        async fn deliver_all(&self) {
            let seqs = self.reader.read(1, u64::MAX, 100_000).expect("read").iter().map(|r| r.seq).collect();
            self.outbox.ack(seqs);
            // Acks and flushes are handled in order by the writer.
            self.outbox.flush().await.expect("flush");
        }
    }

    #[test]
    fn a_redelivered_plain_toggle_switches_the_relay_once() {
        let dir = Disk::new();
        let gpio = FakeGpio::default();
        in_system(|| async {
            let run = start(&dir, &gpio);
            assert!(run.pump("toggle", 1, false).await, "the toggle is done with");
            // Its PUBACK was lost; the broker sends it again with DUP set.
            assert!(run.pump("toggle", 1, true).await, "the redelivery is done with");
            assert_eq!(gpio.board().switches, 1, "one toggle, one switch");
            assert!(gpio.board().high, "the pump is on");
            assert_eq!(run.states("command").len(), 1, "one state message for one toggle");
        });
    }

    #[test]
    fn commands_with_ids_are_not_applied_again_after_a_restart_even_on_a_new_session() {
        let dir = Disk::new();
        let gpio = FakeGpio::default();
        in_system(|| async {
            let run = start(&dir, &gpio);
            assert!(run.pump(r#"{"state":"on","id":"A"}"#, 1, false).await);
            assert!(run.pump(r#"{"state":"off","id":"B"}"#, 2, false).await);
        });
        assert_eq!(gpio.board().switches, 2);
        dir.crash();
        in_system(|| async {
            // The agent restarted; the broker still has the session and
            // redelivers both (their PUBACKs never went out).
            let run = start(&dir, &gpio);
            run.tell(LinkUp { session_present: true }).await;
            assert!(run.pump(r#"{"state":"on","id":"A"}"#, 1, true).await);
            assert!(run.pump(r#"{"state":"off","id":"B"}"#, 2, true).await);
            // Then the broker loses the session and someone publishes both
            // again: new packet ids, DUP clear. The ids still count.
            run.tell(LinkUp { session_present: false }).await;
            assert!(run.pump(r#"{"state":"on","id":"A"}"#, 1, false).await);
            assert!(run.pump(r#"{"state":"off","id":"B"}"#, 2, false).await);
        });
        assert_eq!(gpio.board().switches, 2, "A and B each switched the pump once, no re-switching");
        assert!(!gpio.board().high, "B (off) is the last command applied");
    }

    #[test]
    fn a_command_delivered_again_is_confirmed_again_only_while_nothing_newer_set_the_relay() {
        let dir = Disk::new();
        let gpio = FakeGpio::default();
        in_system(|| async {
            let run = start(&dir, &gpio);
            assert!(run.pump(r#"{"state":"on","id":"A"}"#, 1, false).await);
            assert!(run.pump(r#"{"state":"on","id":"A"}"#, 2, false).await);
            assert!(run.pump(r#"{"state":"off","id":"B"}"#, 3, false).await);
            assert!(run.pump(r#"{"state":"on","id":"A"}"#, 4, false).await);
            let ids: Vec<Value> = run.states("command").iter().map(|v| v["command_id"].clone()).collect();
            assert_eq!(ids, ["A", "A", "B"], "A confirmed twice while current, not after B");
        });
        assert_eq!(gpio.board().switches, 2);
    }

    #[test]
    fn three_hundred_queued_plain_toggles_switch_the_relay_once_the_backlog_is_delivered() {
        let dir = Disk::new();
        let gpio = FakeGpio::default();
        in_system(|| async {
            let run = start(&dir, &gpio);
            run.tell(LinkUp { session_present: true }).await;
            for pkid in 1..=300 {
                assert!(run.deliver(PUMP_SET, "toggle", pkid, false, true).await, "toggle #{pkid} is acknowledged");
            }
            assert_eq!(gpio.board().switches, 0, "nothing is applied before the backlog is over");
            run.tell(CaughtUp).await;
            assert_eq!(gpio.board().switches, 1, "the last queued toggle is applied, once");
            run.tell(CaughtUp).await;
            assert_eq!(gpio.board().switches, 1, "a held command is applied once");
            // The held command's record is appended in the background (the
            // writer thread may not have taken it yet when `tell` returns);
            // `flush` resolves once everything appended before it is durable.
            run.outbox.flush().await.expect("flush the outbox");
            let commanded = run.states("command");
            assert_eq!(commanded.len(), 1, "{commanded:?}");
            assert_eq!(commanded[0]["state"], "on");
        });
    }

    #[test]
    fn a_queued_command_with_an_id_is_applied_at_once_and_supersedes_the_held_plain_one() {
        let dir = Disk::new();
        let gpio = FakeGpio::default();
        in_system(|| async {
            let run = start(&dir, &gpio);
            run.tell(LinkUp { session_present: true }).await;
            assert!(run.deliver(PUMP_SET, "on", 1, false, true).await);
            assert!(run.deliver(PUMP_SET, r#"{"state":"off","id":"J"}"#, 2, false, true).await);
            assert_eq!(gpio.board().switches, 0, "J found the pump off already");
            run.tell(CaughtUp).await;
            assert!(!gpio.board().high, "the held 'on' is older than J and never applied");
            assert_eq!(gpio.board().switches, 0);
        });
    }

    #[test]
    fn held_commands_are_applied_when_the_broker_reports_no_session() {
        let dir = Disk::new();
        let gpio = FakeGpio::default();
        in_system(|| async {
            let run = start(&dir, &gpio);
            run.tell(LinkUp { session_present: true }).await;
            assert!(run.deliver(PUMP_SET, "on", 1, false, true).await);
            // The link dropped before the backlog ended, and the broker lost
            // the session: nothing more can be queued.
            run.tell(LinkDown).await;
            run.tell(LinkUp { session_present: false }).await;
            assert!(gpio.board().high, "the held command is applied");
        });
    }

    #[test]
    fn a_failed_switch_records_gpio_failed_and_is_still_done_with() {
        let dir = Disk::new();
        let gpio = FakeGpio::default();
        in_system(|| async {
            let run = start(&dir, &gpio);
            gpio.board().fail = true;
            assert!(run.pump(r#"{"state":"on","id":"F"}"#, 1, false).await, "done fires although the pin failed");
            let errors = run.errors();
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0]["code"], "gpio_failed");
            assert_eq!(errors[0]["command_id"], "F");
            assert_eq!(errors[0]["topic"], PUMP_SET);
            assert!(errors[0]["message"].as_str().is_some_and(|m| m.contains("pump")), "{}", errors[0]);
            // The supervisor restarts the actor; the pin works again.
            gpio.board().fail = false;
            assert!(run.pump(r#"{"state":"on","id":"G"}"#, 2, false).await);
            assert!(gpio.board().high, "the next command is applied");
        });
    }

    #[test]
    fn a_topic_that_names_no_relay_gets_an_unknown_relay_error() {
        let dir = Disk::new();
        let gpio = FakeGpio::default();
        in_system(|| async {
            let run = start(&dir, &gpio);
            assert!(run.deliver("fl/pi/relay//set", r#"{"state":"on","id":"E"}"#, 1, false, false).await);
            let errors = run.errors();
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0]["code"], "unknown_relay");
            assert_eq!(errors[0]["command_id"], "E");
            assert!(errors[0]["message"].as_str().is_some_and(|m| m.contains("'fl/pi/relay//set'")), "{}", errors[0]);
            // Redelivered: acknowledged, no second error.
            assert!(run.deliver("fl/pi/relay//set", r#"{"state":"on","id":"E"}"#, 1, true, false).await);
            assert_eq!(run.errors().len(), 1);
            assert_eq!(gpio.board().switches, 0);
        });
    }

    #[test]
    fn a_reconnect_storm_adds_at_most_one_reconnect_state_per_relay() {
        let dir = Disk::new();
        let gpio = FakeGpio::default();
        in_system(|| async {
            let run = start(&dir, &gpio);
            for _ in 0..50 {
                run.tell(LinkUp { session_present: false }).await;
                run.tell(LinkDown).await;
            }
            run.outbox.flush().await.expect("flush");
            run.tell(LinkUp { session_present: false }).await;
            run.outbox.flush().await.expect("flush");
            assert_eq!(run.states("reconnect").len(), 1, "one reconnect state waits in the outbox");
            // A resumed session records none.
            run.tell(LinkUp { session_present: true }).await;
            // Once it was delivered, the next lost session records again.
            run.deliver_all().await;
            run.tell(LinkUp { session_present: false }).await;
            run.outbox.flush().await.expect("flush");
            let reconnects = run.states("reconnect");
            assert_eq!(reconnects.len(), 1, "the first was acknowledged; one new: {reconnects:?}");
            assert_eq!(reconnects[0]["epoch"], 7, "the recorder's epoch is in every payload");
        });
    }

    /// Counts the outbox commits (MemStore flushes) one command costs, once
    /// everything before it is durable.
    async fn commits_for_one_command(run: &Run, store: &MemStore, id: &str, pkid: u16) -> u64 {
        run.started().await;
        run.outbox.flush().await.expect("flush what start-up recorded");
        let before = store.flush_count();
        assert!(run.pump(&format!(r#"{{"state":"on","id":"{id}"}}"#), pkid, false).await, "confirmed");
        store.flush_count() - before
    }

    #[test]
    fn a_command_is_made_durable_with_its_saved_state_in_one_commit_in_both_modes() {
        for (durability, interval) in
            [(Durability::Always, Duration::ZERO), (Durability::Batch, Duration::from_secs(3600))]
        {
            let dir = Disk::new();
            let gpio = FakeGpio::default();
            let store = dir.store();
            in_system(|| async {
                let run = start_with(&dir, &gpio, durability, interval);
                assert_eq!(commits_for_one_command(&run, &store, "A", 1).await, 1, "{durability:?}: one commit");
                // An id already applied is confirmed again, also in one commit.
                assert!(run.pump(r#"{"state":"off","id":"B"}"#, 2, false).await);
                assert_eq!(commits_for_one_command(&run, &store, "C", 3).await, 1, "{durability:?}: one commit");
            });
            // Power cut right after the last confirmation: the state message
            // and the saved state are both there.
            dir.crash();
            // The power cut reset the pin.
            gpio.board().high = false;
            in_system(|| async {
                let run = start_with(&dir, &gpio, durability, interval);
                let confirmed = run.states("command");
                assert!(confirmed.iter().any(|v| v["command_id"] == "C"), "{durability:?}: {confirmed:?}");
                // A redelivery of C on the same session is recognised (the
                // packet id was saved with it): nothing switches.
                run.tell(LinkUp { session_present: true }).await;
                let switches = gpio.board().switches;
                assert!(run.pump(r#"{"state":"on","id":"C"}"#, 3, true).await);
                assert_eq!(gpio.board().switches, switches, "{durability:?}: C not applied again");
                assert!(gpio.board().high, "{durability:?}: power_on_state = last restored C (on)");
            });
        }
    }

    #[test]
    fn in_batch_mode_a_command_is_confirmed_without_waiting_for_the_flush_interval() {
        let dir = Disk::new();
        let gpio = FakeGpio::default();
        in_system(|| async {
            // An hour: `pump` gives up after 30 s, so only a commit forced
            // by the command can confirm it.
            let run = start_with(&dir, &gpio, Durability::Batch, Duration::from_secs(3600));
            assert!(run.pump(r#"{"state":"on","id":"A"}"#, 1, false).await, "confirmed before flush_interval");
            assert!(
                run.deliver("fl/pi/relay/nope/set", r#"{"state":"on","id":"E"}"#, 2, false, false).await,
                "refused, and that is confirmed too"
            );
            assert!(gpio.board().high);
        });
        dir.crash();
        in_system(|| async {
            let run = start_with(&dir, &gpio, Durability::Batch, Duration::from_secs(3600));
            assert!(run.states("command").iter().any(|v| v["command_id"] == "A"), "the confirmation was durable");
            assert!(run.errors().iter().any(|v| v["command_id"] == "E"), "the refusal was durable");
        });
    }

    #[test]
    fn relay_states_saved_by_a_build_before_8_are_restored_and_then_kept_in_the_outbox() {
        let dir = Disk::new();
        let legacy = dir.dir.path().join(super::super::saved_relays::LEGACY_FILE);
        std::fs::write(
            &legacy,
            br#"{"version":2,"relays":{"pump":{"state":"on","command_id":"old"}},"command_ids":["old"],"session":[]}"#,
        )
        .expect("write relays.json");
        let gpio = FakeGpio::default();
        in_system(|| async {
            let run = start(&dir, &gpio);
            run.started().await;
            run.outbox.flush().await.expect("flush");
            assert!(gpio.board().high, "power_on_state = last restored the pump from relays.json");
            // The id applied by the old build still counts.
            assert!(run.pump(r#"{"state":"off","id":"old"}"#, 1, false).await);
            assert!(gpio.board().high, "'old' was applied before; not again");
        });
        assert!(!legacy.exists(), "relays.json was renamed once its content was durable in the outbox");
        dir.crash();
        // The power cut reset the pin.
        gpio.board().high = false;
        in_system(|| async {
            let run = start(&dir, &gpio);
            run.started().await;
            assert!(gpio.board().high, "restored from the outbox, without relays.json");
            assert!(run.pump(r#"{"state":"off","id":"old"}"#, 2, false).await);
            assert!(gpio.board().high, "the old build's id still counts");
        });
    }
}
