//! The simulated board: [`Gpio`] without hardware, driven over a Unix socket.
//!
//! It owns the simulated pins (levels, modes, debounce, faults), the socket
//! server at `<state_dir>/sim.sock`, the file that latches outputs across
//! restarts, and the client [`request`] used by `fieldlink sim`. It must not
//! know about buttons, relays, `active_low` or MQTT: levels here are
//! electrical, and meaning is the actors' business.
//!
//! # Protocol
//!
//! One request per line, one answer line per request; a connection may carry
//! any number of requests.
//!
//! ```text
//! set <pin> <0|1>        -> ok           drive a pin from outside (a button, a probe)
//! get <pin>              -> 0 | 1        the pin's electrical level
//! fault <pin> <on|off>   -> ok           extension: break or mend the pin
//! changes <pin>          -> <decimal>    extension: how often the level changed
//! anything wrong         -> err <message quoting the bad input>
//! ```
//!
//! For example `err pin 99 is not a GPIO pin (0..=27)` or
//! `err unknown request 'blah'; expected set, get, fault, changes`.
//!
//! # The model
//!
//! * A pin is either in input mode (the default) or in output mode. Output
//!   mode is entered by [`Gpio::output`] and, as on a Pi whose pins are never
//!   reset on drop, is kept after the agent lets go of the pin and across
//!   restarts; claiming the pin as an input switches it back.
//! * An input's rest level comes from its pull (up: 1, down or none: 0), set
//!   when the pin is claimed unless a `set` is already driving the pin.
//! * `set` on an input changes its level. The sink gets an [`Edge`] once the
//!   level has stayed unchanged for the pin's debounce (at once if the
//!   debounce is zero), and only if it differs from the last level reported.
//!   `set` on an unclaimed input pin only stores the level. `set` on a pin in
//!   output mode is refused: `err pin 27 is an output driven by the agent`.
//! * `get` on an output reads back what the agent drives.
//! * [`Gpio::output`] never changes the level: a fresh pin starts low, a
//!   latched one keeps its level.
//! * `fault <pin> on`: [`InputPin::level`] and [`OutputPin::level`] /
//!   [`OutputPin::set`] of that pin fail with [`GpioError::Failed`]; an input's
//!   sink receives that error once when the fault is switched on and again on
//!   every `set` of the pin, and no edges. `get` and `set` still work (they are
//!   the outside world). `fault <pin> off` mends it; if the level moved
//!   meanwhile, the edge follows after the debounce.
//! * `changes <pin>` counts the level changes made by `set` and by the agent
//!   driving an output. The rest level a pull sets when an input is claimed is
//!   not counted. Counts of outputs are latched like their levels, so a test
//!   can prove that a restart did not glitch a relay.
//!
//! # Latched outputs (`<state_dir>/sim-gpio.json`)
//!
//! Every pin in output mode, with its level and change count, is rewritten on
//! every change of either and loaded at [`SimGpio::start`]. The file is
//! overwritten in place (`fsutil::overwrite_unsynced`: one `pwrite`, padded
//! with spaces, no temporary file, no rename, no fsync), so that it adds
//! nothing to the journal commit of the outbox's `fdatasync` on a command's
//! critical path (#8: the rename's new inode and block did). A crash or
//! `kill -9` of the agent loses nothing (the kernel has the file); a power
//! cut or kernel crash may bring back older levels or a torn file (then
//! reported as unreadable at start), as the power cut would reset a real
//! board's pins (a real relay pin has no file at all):
//!
//! ```text
//! {"version": 1, "outputs": {"27": {"level": 1, "changes": 3}}}
//! ```
//!
//! An unreadable file, or another version, is an error naming the file.
//!
//! # Threads
//!
//! * `sim-gpio-accept` accepts connections; each gets a `sim-gpio-conn`
//!   thread, which only holds the board lock to apply one request.
//! * `sim-gpio-timer` expires debounce deadlines and is the only thread that
//!   calls sinks, in the order events happened and never with the board lock
//!   held, so a sink may read the pin, and may block (the Button's sink
//!   waits for a credit while the outbox writer is behind).
//! * Backpressure: at most 256 events wait for the timer thread; a request
//!   that finds them waiting waits too (its connection reads no further), so
//!   a client streaming `set` lines faster than the agent records them is
//!   held back by its socket, and no edge is dropped.
//!
//! Dropping the [`SimGpio`] stops all three and removes the socket file. Pins
//! already handed out keep working on the board, but report no more edges.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Edge, EdgeSink, Gpio, GpioError, InputPin, InputSpec, Level, MAX_PIN, OutputPin, OutputSpec, Pull};

/// The socket's file name inside `state_dir`.
pub const SOCKET_FILE: &str = "sim.sock";
/// The latched outputs' file name inside `state_dir`.
pub const STATE_FILE: &str = "sim-gpio.json";
/// The version of [`STATE_FILE`]'s format.
const STATE_VERSION: u32 = 1;
/// How long [`request`] waits for the board.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle connection thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// The longest request line accepted.
const MAX_LINE: usize = 1024;
const REQUESTS: &str = "expected set, get, fault, changes";
/// The most events waiting for the timer thread: a connection whose
/// request would add to a full queue waits until the timer thread has taken
/// them (so a client streaming `set` lines faster than the agent records
/// them waits in its socket, not in the agent's memory; #8).
const MAX_QUEUED: usize = 256;

/// Where the simulated board of an agent with this `state_dir` listens.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// A simulated board serving `<state_dir>/sim.sock`.
pub struct SimGpio {
    shared: Arc<Shared>,
    socket: PathBuf,
    accept: Option<JoinHandle<()>>,
    timer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimGpio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimGpio").field("socket", &self.socket).finish_non_exhaustive()
    }
}

impl SimGpio {
    /// Loads the latched outputs and starts serving `<state_dir>/sim.sock`.
    ///
    /// A stale socket file is removed first; a live one (another agent) is an
    /// error.
    pub fn start(state_dir: &Path) -> Result<SimGpio, GpioError> {
        let socket = socket_path(state_dir);
        clear_stale_socket(&socket)?;
        let state_file = state_dir.join(STATE_FILE);
        let saved = load_state(&state_file)?;
        let listener = UnixListener::bind(&socket).map_err(|e| {
            GpioError::Backend(format!(
                "cannot listen on '{}': {e}; is another agent running with this state_dir?",
                socket.display()
            ))
        })?;

        let shared = Arc::new(Shared {
            board: Mutex::new(Board::new(state_file, saved)),
            wake: Condvar::new(),
            room: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        // From here on, dropping `sim` on an error stops what was started and
        // removes the socket.
        let mut sim = SimGpio { shared: Arc::clone(&shared), socket, accept: None, timer: None };
        let timer_shared = Arc::clone(&shared);
        sim.timer = Some(spawn("sim-gpio-timer", move || run_timer(&timer_shared))?);
        sim.accept = Some(spawn("sim-gpio-accept", move || serve(listener, shared))?);
        Ok(sim)
    }

    /// The socket this board serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for SimGpio {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.board().stopping = true;
        self.shared.wake.notify_all();
        self.shared.room.notify_all();
        if let Some(accept) = self.accept.take() {
            // `accept()` blocks: a connection wakes it up to see the flag.
            match UnixStream::connect(&self.socket) {
                Ok(_wake) => {
                    if accept.join().is_err() {
                        tracing::warn!("sim gpio: the accept thread panicked");
                    }
                }
                Err(e) => tracing::warn!(
                    "sim gpio: cannot wake the accept thread through '{}' ({e}); leaving it behind",
                    self.socket.display()
                ),
            }
        }
        if let Some(timer) = self.timer.take()
            && timer.join().is_err()
        {
            tracing::warn!("sim gpio: the timer thread panicked");
        }
        match fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("sim gpio: cannot remove '{}': {e}", self.socket.display()),
        }
    }
}

impl Gpio for SimGpio {
    fn input(&self, spec: &InputSpec, sink: EdgeSink) -> Result<Box<dyn InputPin>, GpioError> {
        let pin = sim_pin(spec.pin)?;
        let token = self.shared.board().claim_input(pin, spec, sink)?;
        Ok(Box::new(SimPin { shared: Arc::clone(&self.shared), pin, token }))
    }

    fn output(&self, spec: &OutputSpec) -> Result<Box<dyn OutputPin>, GpioError> {
        let pin = sim_pin(spec.pin)?;
        let mut board = self.shared.board();
        let token = board.claim_output(pin)?;
        // Like a real pin set before its direction: the first level it
        // drives is `initial` (a no-op when it already drives it).
        if board.read(pin)? != spec.initial
            && let Err(e) = board.drive(pin, token, spec.initial)
        {
            board.release(pin, token);
            return Err(e);
        }
        drop(board);
        Ok(Box::new(SimPin { shared: Arc::clone(&self.shared), pin, token }))
    }
}

/// The simulated board's pins are the header's BCM numbers, 0..=27; the
/// range is this backend's to check.
fn sim_pin(pin: u32) -> Result<u8, GpioError> {
    u8::try_from(pin).ok().filter(|&p| p <= MAX_PIN).ok_or(GpioError::NoSuchPin(pin))
}

/// A claimed pin, input or output; dropping it releases the claim.
struct SimPin {
    shared: Arc<Shared>,
    pin: u8,
    token: u64,
}

impl InputPin for SimPin {
    fn level(&self) -> Result<Level, GpioError> {
        self.shared.board().read(self.pin)
    }
}

impl OutputPin for SimPin {
    fn level(&self) -> Result<Level, GpioError> {
        self.shared.board().read(self.pin)
    }

    fn set(&mut self, level: Level) -> Result<(), GpioError> {
        self.shared.board().drive(self.pin, self.token, level)
    }
}

impl Drop for SimPin {
    fn drop(&mut self) {
        self.shared.board().release(self.pin, self.token);
    }
}

/// What the threads and the pins share.
struct Shared {
    board: Mutex<Board>,
    /// Wakes the timer thread: a deadline, a delivery or the stop flag.
    wake: Condvar,
    /// Wakes connections waiting for room in the board's queue.
    room: Condvar,
    /// Tells the accept and connection threads to stop.
    stop: AtomicBool,
}

impl Shared {
    /// The board, even if a thread panicked while holding it: every change
    /// to it is a few plain assignments, so it stays usable.
    fn board(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Input,
    Output,
}

struct PinState {
    level: Level,
    mode: Mode,
    /// A `set` drives this input from outside, so a pull does not move it.
    driven: bool,
    changes: u64,
    fault: bool,
    claim: Option<Claim>,
}

impl PinState {
    fn fresh() -> PinState {
        PinState { level: Level::Low, mode: Mode::Input, driven: false, changes: 0, fault: false, claim: None }
    }
}

enum Claim {
    Input(InputClaim),
    Output { token: u64 },
}

impl Claim {
    fn token(&self) -> u64 {
        match self {
            Claim::Input(input) => input.token,
            Claim::Output { token } => *token,
        }
    }
}

struct InputClaim {
    token: u64,
    sink: Arc<EdgeSink>,
    debounce: Duration,
    /// The level last reported to the sink (or read at the claim).
    reported: Level,
    /// When the current level will have been stable for `debounce`.
    deadline: Option<Instant>,
    /// When the level last changed: the edge's `at`.
    changed_at: SystemTime,
}

/// An event waiting for the timer thread to hand it to a sink.
struct Delivery {
    pin: u8,
    token: u64,
    sink: Arc<EdgeSink>,
    event: Result<Edge, GpioError>,
}

impl Delivery {
    fn new(pin: u8, claim: &InputClaim, event: Result<Edge, GpioError>) -> Delivery {
        Delivery { pin, token: claim.token, sink: Arc::clone(&claim.sink), event }
    }
}

/// The board's state, changed only under the lock and without sockets
/// (saving latched outputs is its only I/O).
struct Board {
    /// Indexed by pin number, `0..=MAX_PIN`.
    pins: Vec<PinState>,
    state_file: PathBuf,
    next_token: u64,
    /// Events in the order they happened, for the timer thread.
    queue: VecDeque<Delivery>,
    /// Connections waiting for room in `queue` now.
    held_back: usize,
    stopping: bool,
}

impl Board {
    fn new(state_file: PathBuf, saved: BTreeMap<u8, SavedOutput>) -> Board {
        let mut pins: Vec<PinState> = (0..=MAX_PIN).map(|_| PinState::fresh()).collect();
        for (pin, out) in saved {
            if let Some(p) = pins.get_mut(usize::from(pin)) {
                p.mode = Mode::Output;
                p.level = Level::from_bit(out.level == 1);
                p.changes = out.changes;
            }
        }
        Board { pins, state_file, next_token: 0, queue: VecDeque::new(), held_back: 0, stopping: false }
    }

    fn pin_mut(&mut self, pin: u8) -> Result<&mut PinState, GpioError> {
        self.pins.get_mut(usize::from(pin)).ok_or(GpioError::NoSuchPin(pin.into()))
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn claim_input(&mut self, pin: u8, spec: &InputSpec, sink: EdgeSink) -> Result<u64, GpioError> {
        let token = self.token();
        let p = self.pin_mut(pin)?;
        if p.claim.is_some() {
            return Err(GpioError::PinInUse(pin.into()));
        }
        let before = (p.mode, p.level, p.driven);
        let was_output = p.mode == Mode::Output;
        if was_output {
            p.mode = Mode::Input;
            p.driven = false;
        }
        if !p.driven {
            p.level = rest_level(spec.pull);
        }
        if was_output && let Err(e) = self.save() {
            let p = self.pin_mut(pin)?;
            (p.mode, p.level, p.driven) = before;
            return Err(save_failed(pin, &e));
        }
        let p = self.pin_mut(pin)?;
        p.claim = Some(Claim::Input(InputClaim {
            token,
            sink: Arc::new(sink),
            debounce: spec.debounce,
            reported: p.level,
            deadline: None,
            changed_at: SystemTime::now(),
        }));
        Ok(token)
    }

    fn claim_output(&mut self, pin: u8) -> Result<u64, GpioError> {
        let token = self.token();
        let p = self.pin_mut(pin)?;
        if p.claim.is_some() {
            return Err(GpioError::PinInUse(pin.into()));
        }
        // The level is left alone: that is the point.
        let was_output = p.mode == Mode::Output;
        p.mode = Mode::Output;
        p.claim = Some(Claim::Output { token });
        if !was_output && let Err(e) = self.save() {
            let p = self.pin_mut(pin)?;
            p.mode = Mode::Input;
            p.claim = None;
            return Err(save_failed(pin, &e));
        }
        Ok(token)
    }

    fn release(&mut self, pin: u8, token: u64) {
        if let Ok(p) = self.pin_mut(pin)
            && p.claim.as_ref().is_some_and(|c| c.token() == token)
        {
            p.claim = None;
        }
        self.queue.retain(|d| !(d.pin == pin && d.token == token));
    }

    /// The agent reads a pin it holds.
    fn read(&self, pin: u8) -> Result<Level, GpioError> {
        let p = self.pins.get(usize::from(pin)).ok_or(GpioError::NoSuchPin(pin.into()))?;
        if p.fault {
            return Err(fault_error(pin));
        }
        Ok(p.level)
    }

    /// The agent drives an output it holds.
    fn drive(&mut self, pin: u8, token: u64, level: Level) -> Result<(), GpioError> {
        let p = self.pin_mut(pin)?;
        match &p.claim {
            Some(Claim::Output { token: t }) if *t == token => {}
            _ => {
                return Err(GpioError::Failed {
                    pin: pin.into(),
                    reason: "this output is no longer claimed".to_string(),
                });
            }
        }
        if p.fault {
            return Err(fault_error(pin));
        }
        if p.level == level {
            return Ok(());
        }
        let before = (p.level, p.changes);
        p.level = level;
        p.changes += 1;
        if let Err(e) = self.save() {
            let p = self.pin_mut(pin)?;
            (p.level, p.changes) = before;
            return Err(save_failed(pin, &e));
        }
        Ok(())
    }

    /// `set <pin> <level>` from the socket.
    fn external_set(&mut self, pin: u8, level: Level, now: Instant) -> Result<(), GpioError> {
        let p = self.pins.get_mut(usize::from(pin)).ok_or(GpioError::NoSuchPin(pin.into()))?;
        if p.mode == Mode::Output {
            return Err(GpioError::Failed { pin: pin.into(), reason: "is an output driven by the agent".to_string() });
        }
        p.driven = true;
        let changed = p.level != level;
        if changed {
            p.level = level;
            p.changes += 1;
        }
        let Some(Claim::Input(claim)) = &mut p.claim else {
            return Ok(());
        };
        if changed {
            claim.changed_at = SystemTime::now();
        }
        if p.fault {
            claim.deadline = None;
            self.queue.push_back(Delivery::new(pin, claim, Err(fault_error(pin))));
        } else if changed {
            if claim.debounce.is_zero() {
                claim.deadline = None;
                if level != claim.reported {
                    claim.reported = level;
                    let edge = Edge { pin: pin.into(), level, at: claim.changed_at };
                    self.queue.push_back(Delivery::new(pin, claim, Ok(edge)));
                }
            } else {
                claim.deadline = Some(now + claim.debounce);
            }
        }
        Ok(())
    }

    /// `fault <pin> <on|off>` from the socket.
    fn set_fault(&mut self, pin: u8, on: bool, now: Instant) -> Result<(), GpioError> {
        let p = self.pins.get_mut(usize::from(pin)).ok_or(GpioError::NoSuchPin(pin.into()))?;
        if p.fault == on {
            return Ok(());
        }
        p.fault = on;
        let Some(Claim::Input(claim)) = &mut p.claim else {
            return Ok(());
        };
        if on {
            claim.deadline = None;
            self.queue.push_back(Delivery::new(pin, claim, Err(fault_error(pin))));
        } else if p.level != claim.reported {
            // The timer reports it, debounced like any other change.
            claim.deadline = Some(now + claim.debounce);
        }
        Ok(())
    }

    /// Reports the inputs whose level has been stable long enough.
    fn expire(&mut self, now: Instant) {
        for (pin, p) in (0..=MAX_PIN).zip(self.pins.iter_mut()) {
            let Some(Claim::Input(claim)) = &mut p.claim else {
                continue;
            };
            if claim.deadline.is_none_or(|d| d > now) {
                continue;
            }
            claim.deadline = None;
            if !p.fault && p.level != claim.reported {
                claim.reported = p.level;
                let edge = Edge { pin: pin.into(), level: p.level, at: claim.changed_at };
                self.queue.push_back(Delivery::new(pin, claim, Ok(edge)));
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.pins
            .iter()
            .filter_map(|p| match &p.claim {
                Some(Claim::Input(claim)) => claim.deadline,
                _ => None,
            })
            .min()
    }

    /// Answers one request line (without its newline).
    fn answer(&mut self, line: &str, now: Instant) -> String {
        match self.execute(line, now) {
            Ok(answer) => answer,
            Err(message) => format!("err {message}"),
        }
    }

    fn execute(&mut self, line: &str, now: Instant) -> Result<String, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let refused = |e: GpioError| match e {
            // "pin 27: is an output ..." reads better without the colon.
            GpioError::Failed { pin, reason } => format!("pin {pin} {reason}"),
            other => other.to_string(),
        };
        match words.as_slice() {
            [] => Err(format!("empty request; {REQUESTS}")),
            ["set", pin, level] => {
                let (pin, level) = (parse_pin(pin)?, parse_level(level)?);
                self.external_set(pin, level, now).map_err(refused)?;
                Ok("ok".to_string())
            }
            ["get", pin] => {
                let pin = parse_pin(pin)?;
                let p = self.pin_mut(pin).map_err(refused)?;
                Ok(if p.level.is_high() { "1" } else { "0" }.to_string())
            }
            ["fault", pin, state] => {
                let pin = parse_pin(pin)?;
                let on = match *state {
                    "on" => true,
                    "off" => false,
                    other => return Err(format!("fault state '{other}' is not on or off")),
                };
                self.set_fault(pin, on, now).map_err(refused)?;
                Ok("ok".to_string())
            }
            ["changes", pin] => {
                let pin = parse_pin(pin)?;
                Ok(self.pin_mut(pin).map_err(refused)?.changes.to_string())
            }
            ["set", ..] => Err(usage(line, "set <pin> <0|1>")),
            ["get", ..] => Err(usage(line, "get <pin>")),
            ["fault", ..] => Err(usage(line, "fault <pin> <on|off>")),
            ["changes", ..] => Err(usage(line, "changes <pin>")),
            _ => Err(format!("unknown request '{}'; {REQUESTS}", line.trim())),
        }
    }

    /// Rewrites [`STATE_FILE`] from the pins in output mode.
    fn save(&self) -> io::Result<()> {
        let outputs = (0..=MAX_PIN)
            .zip(&self.pins)
            .filter(|(_, p)| p.mode == Mode::Output)
            .map(|(pin, p)| {
                let saved = SavedOutput { level: u8::from(p.level.is_high()), changes: p.changes };
                (pin, saved)
            })
            .collect();
        let file = StateFile { version: STATE_VERSION, outputs };
        let bytes = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        crate::fsutil::overwrite_unsynced(&self.state_file, &bytes)
    }
}

fn rest_level(pull: Pull) -> Level {
    match pull {
        Pull::Up => Level::High,
        Pull::Down | Pull::None => Level::Low,
    }
}

fn fault_error(pin: u8) -> GpioError {
    GpioError::Failed { pin: pin.into(), reason: format!("simulated fault (switched on with 'fault {pin} on')") }
}

fn save_failed(pin: u8, e: &io::Error) -> GpioError {
    GpioError::Failed { pin: pin.into(), reason: format!("cannot save the simulated board's state: {e}") }
}

fn usage(line: &str, form: &str) -> String {
    format!("bad request '{}'; expected {form}", line.trim())
}

fn parse_pin(word: &str) -> Result<u8, String> {
    let n: u64 = word.parse().map_err(|_| format!("pin '{word}' is not a number (0..={MAX_PIN})"))?;
    match u8::try_from(n) {
        Ok(pin) if pin <= MAX_PIN => Ok(pin),
        _ => Err(format!("pin {n} is not a GPIO pin (0..={MAX_PIN})")),
    }
}

fn parse_level(word: &str) -> Result<Level, String> {
    match word {
        "0" => Ok(Level::Low),
        "1" => Ok(Level::High),
        other => Err(format!("level '{other}' is not 0 or 1")),
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    outputs: BTreeMap<u8, SavedOutput>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedOutput {
    /// 0 or 1.
    level: u8,
    changes: u64,
}

/// Reads the latched outputs; a missing file means none.
fn load_state(path: &Path) -> Result<BTreeMap<u8, SavedOutput>, GpioError> {
    let unreadable = |why: String| {
        GpioError::Backend(format!(
            "simulated board state '{}' is unreadable: {why}; delete it to start with every output low",
            path.display()
        ))
    };
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(unreadable(e.to_string())),
    };
    let file: StateFile = serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
    if file.version != STATE_VERSION {
        return Err(unreadable(format!("version {} where {STATE_VERSION} was expected", file.version)));
    }
    for (pin, out) in &file.outputs {
        if *pin > MAX_PIN {
            return Err(unreadable(format!("pin {pin} is not a GPIO pin (0..={MAX_PIN})")));
        }
        if out.level > 1 {
            return Err(unreadable(format!("pin {pin} has level {} where 0 or 1 was expected", out.level)));
        }
    }
    Ok(file.outputs)
}

/// Removes a socket file nobody listens on; fails if somebody does.
fn clear_stale_socket(socket: &Path) -> Result<(), GpioError> {
    match UnixStream::connect(socket) {
        Ok(_) => Err(GpioError::Backend(format!(
            "simulated gpio socket '{}' is in use: is another agent running with this state_dir?",
            socket.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // Refused (or not a socket): left behind by a process that died.
        Err(_) => match fs::remove_file(socket) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(GpioError::Backend(format!("cannot remove the stale socket '{}': {e}", socket.display()))),
        },
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, GpioError> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| GpioError::Backend(format!("cannot start thread '{name}': {e}")))
}

/// The timer thread: expires debounce deadlines and delivers events.
fn run_timer(shared: &Shared) {
    let mut board = shared.board();
    loop {
        if board.stopping {
            return;
        }
        let now = Instant::now();
        board.expire(now);
        if !board.queue.is_empty() {
            let batch: Vec<Delivery> = board.queue.drain(..).collect();
            drop(board);
            if batch.len() >= MAX_QUEUED {
                // A connection may be waiting for room.
                shared.room.notify_all();
            }
            for delivery in batch {
                (delivery.sink)(delivery.event);
            }
            board = shared.board();
            continue;
        }
        board = match board.next_deadline() {
            Some(deadline) => {
                let timeout = deadline.saturating_duration_since(now);
                shared.wake.wait_timeout(board, timeout).unwrap_or_else(PoisonError::into_inner).0
            }
            None => shared.wake.wait(board).unwrap_or_else(PoisonError::into_inner),
        };
    }
}

/// The accept thread.
fn serve(listener: UnixListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(stream) => {
                let conn_shared = Arc::clone(&shared);
                let spawned = spawn("sim-gpio-conn", move || {
                    if let Err(e) = converse(stream, &conn_shared) {
                        tracing::debug!("sim gpio: connection ended: {e}");
                    }
                });
                if let Err(e) = spawned {
                    tracing::warn!("sim gpio: dropping a connection: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("sim gpio: accept failed: {e}");
                // Back-off: a lasting error (out of file descriptors) would
                // otherwise spin this thread.
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// One connection: answers request lines until the client hangs up.
fn converse(stream: UnixStream, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    // Answers are buffered while more requests are already read, and
    // written before the next read could wait: a client that streams lines
    // gets them in a few writes instead of one per line (#8: a write per
    // edge was a tenth of the agent's CPU under a burst).
    let mut writer = io::BufWriter::new(stream.try_clone()?);
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        if reader.buffer().is_empty() {
            writer.flush()?;
        }
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let budget = (MAX_LINE + 1).saturating_sub(line.len()) as u64;
        // On a time-out, what was read so far stays in `line`.
        match (&mut reader).take(budget).read_until(b'\n', &mut line) {
            Ok(0) => {
                // The client hung up, maybe after a last line without "\n".
                if !line.is_empty() {
                    reply(&mut writer, shared, &line)?;
                }
                return writer.flush();
            }
            Ok(_) if line.ends_with(b"\n") => {
                reply(&mut writer, shared, &line)?;
                line.clear();
            }
            Ok(_) if line.len() > MAX_LINE => {
                writer.write_all(format!("err request longer than {MAX_LINE} bytes\n").as_bytes())?;
                return writer.flush();
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

fn reply(writer: &mut impl Write, shared: &Shared, line: &[u8]) -> io::Result<()> {
    let text = String::from_utf8_lossy(line);
    let mut board = shared.board();
    if board.queue.len() >= MAX_QUEUED && !board.stopping {
        board.held_back += 1;
        board = shared
            .room
            .wait_while(board, |b| b.queue.len() >= MAX_QUEUED && !b.stopping)
            .unwrap_or_else(PoisonError::into_inner);
        board.held_back -= 1;
    }
    let answer = board.answer(text.trim_end_matches(['\r', '\n']), Instant::now());
    drop(board);
    shared.wake.notify_all();
    writer.write_all(format!("{answer}\n").as_bytes())
}

/// Sends one request line to the simulated board at `socket` and returns
/// its answer line, without the newline. An `err ...` answer is returned as
/// it is (`Ok`); `Err` means the board could not be reached or did not answer
/// within 5 s.
pub fn request(socket: &Path, line: &str) -> Result<String, GpioError> {
    let shown = socket.display();
    let line = line.trim_end_matches(['\r', '\n']);
    if line.contains('\n') {
        return Err(GpioError::Backend(format!("a request is one line, got {line:?}")));
    }
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => GpioError::Backend(format!(
            "no simulated gpio at '{shown}': is the agent running with gpio.backend = \"sim\"?"
        )),
        _ => GpioError::Backend(format!("cannot connect to the simulated gpio at '{shown}': {e}")),
    })?;
    let failed = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => GpioError::Backend(format!(
            "no answer from the simulated gpio at '{shown}' within {}s",
            CLIENT_TIMEOUT.as_secs()
        )),
        _ => GpioError::Backend(format!("talking to the simulated gpio at '{shown}': {e}")),
    };
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(failed)?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(failed)?;
    stream.write_all(format!("{line}\n").as_bytes()).map_err(failed)?;
    let mut answer = String::new();
    let n = BufReader::new(&stream).read_line(&mut answer).map_err(failed)?;
    if n == 0 {
        return Err(GpioError::Backend(format!("the simulated gpio at '{shown}' hung up without answering")));
    }
    Ok(answer.trim_end_matches(['\r', '\n']).to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    type Events = mpsc::Receiver<Result<Edge, GpioError>>;

    const WAIT: Duration = Duration::from_secs(2);

    fn board() -> (tempfile::TempDir, SimGpio) {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim = SimGpio::start(dir.path()).expect("start the simulated board");
        (dir, sim)
    }

    fn out(pin: u32, initial: Level) -> OutputSpec {
        OutputSpec { chip: None, pin, initial, active_low: false }
    }

    fn button(sim: &SimGpio, pin: u8, pull: Pull, debounce_ms: u64) -> (Box<dyn InputPin>, Events) {
        let (tx, rx) = mpsc::channel();
        let sink: EdgeSink = Box::new(move |event| {
            // The test may have stopped listening; that is fine.
            let _ = tx.send(event);
        });
        let spec = InputSpec {
            chip: None,
            pin: pin.into(),
            pull,
            debounce: Duration::from_millis(debounce_ms),
            active_low: false,
        };
        let pin = sim.input(&spec, sink).expect("claim the input");
        (pin, rx)
    }

    fn ask(sim: &SimGpio, line: &str) -> String {
        request(sim.socket(), line).expect("the board answers")
    }

    fn edge(events: &Events) -> Edge {
        events.recv_timeout(WAIT).expect("an event arrives").expect("the event is an edge")
    }

    #[test]
    fn a_client_streaming_edges_faster_than_the_sink_takes_them_is_held_back_and_loses_none() {
        const N: usize = 1000;
        let (_dir, sim) = board();
        // The sink blocks on its first edge until the gate opens, as the
        // Button's does while the outbox writer is behind.
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let sink: EdgeSink = {
            let gate = Arc::clone(&gate);
            Box::new(move |event| {
                let (open, cv) = &*gate;
                let open = open.lock().unwrap_or_else(PoisonError::into_inner);
                drop(cv.wait_while(open, |o| !*o).unwrap_or_else(PoisonError::into_inner));
                let _ = tx.send(event);
            })
        };
        let spec = InputSpec { chip: None, pin: 17, pull: Pull::Down, debounce: Duration::ZERO, active_low: false };
        let _pin = sim.input(&spec, sink).expect("claim the input");

        let client = {
            let socket = sim.socket().to_path_buf();
            thread::spawn(move || {
                let mut stream = UnixStream::connect(&socket).expect("connect");
                let lines: String = (0..N).map(|i| if i % 2 == 0 { "set 17 1\n" } else { "set 17 0\n" }).collect();
                stream.write_all(lines.as_bytes()).expect("write the lines");
                let mut answers = String::new();
                BufReader::new(stream).take((N * 3) as u64).read_to_string(&mut answers).expect("read the answers");
                answers.lines().filter(|a| *a == "ok").count()
            })
        };
        // While the sink is stuck, the connection ends up waiting for room
        // (or, were there no bound, queues past it).
        let queued = loop {
            let board = sim.shared.board();
            if board.held_back > 0 || board.queue.len() > MAX_QUEUED {
                break board.queue.len();
            }
            drop(board);
            thread::sleep(Duration::from_millis(5));
        };
        // Open the gate before asserting: dropping the board joins the timer
        // thread, stuck in the sink until then.
        let (open, cv) = &*gate;
        *open.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
        assert_eq!(queued, MAX_QUEUED, "the queue stops at its bound");
        assert_eq!(client.join().expect("the client finished"), N, "every line answered ok");
        let levels: Vec<Level> =
            (0..N).map(|_| rx.recv_timeout(WAIT).expect("an event").expect("an edge").level).collect();
        let expected: Vec<Level> = (0..N).map(|i| Level::from_bit(i % 2 == 0)).collect();
        assert_eq!(levels, expected, "every edge, in order");
    }

    #[test]
    fn a_pull_up_input_reads_high_at_rest_and_a_pull_down_one_low() {
        let (_dir, sim) = board();
        let (up, _up_events) = button(&sim, 17, Pull::Up, 50);
        let (down, _down_events) = button(&sim, 18, Pull::Down, 50);
        assert_eq!(up.level().expect("read"), Level::High);
        assert_eq!(down.level().expect("read"), Level::Low);
        assert_eq!(ask(&sim, "get 17"), "1");
        assert_eq!(ask(&sim, "get 18"), "0");
        assert_eq!(ask(&sim, "changes 17"), "0", "a pull is not a change");
    }

    #[test]
    fn setting_a_pull_up_input_low_reports_a_low_edge_after_the_debounce() {
        let (_dir, sim) = board();
        let (pin, events) = button(&sim, 17, Pull::Up, 50);
        let asked = Instant::now();
        assert_eq!(ask(&sim, "set 17 0"), "ok");
        let got = edge(&events);
        assert!(asked.elapsed() >= Duration::from_millis(50), "reported before the debounce");
        assert_eq!((got.pin, got.level), (17, Level::Low));
        assert_eq!(pin.level().expect("read"), Level::Low);
        assert!(events.recv_timeout(Duration::from_millis(150)).is_err(), "one edge only");
    }

    #[test]
    fn bouncing_within_the_debounce_reports_no_edge() {
        let (_dir, sim) = board();
        let (_pin, events) = button(&sim, 17, Pull::Up, 300);
        for level in ["0", "1", "0", "1"] {
            assert_eq!(ask(&sim, &format!("set 17 {level}")), "ok");
        }
        assert!(events.recv_timeout(Duration::from_millis(600)).is_err(), "a bounce was reported");
        assert_eq!(ask(&sim, "changes 17"), "4");
        // A real press after the bounce is reported, once.
        assert_eq!(ask(&sim, "set 17 0"), "ok");
        assert_eq!(edge(&events).level, Level::Low);
        assert!(events.recv_timeout(Duration::from_millis(400)).is_err());
    }

    #[test]
    fn without_debounce_every_change_is_reported_in_order() {
        let (_dir, sim) = board();
        let (_pin, events) = button(&sim, 5, Pull::Up, 0);
        for level in ["0", "1", "0"] {
            assert_eq!(ask(&sim, &format!("set 5 {level}")), "ok");
        }
        let levels: Vec<Level> = (0..3).map(|_| edge(&events).level).collect();
        assert_eq!(levels, [Level::Low, Level::High, Level::Low]);
        // Setting the level it already has is no edge.
        assert_eq!(ask(&sim, "set 5 0"), "ok");
        assert!(events.recv_timeout(Duration::from_millis(100)).is_err());
    }

    #[test]
    fn output_level_and_change_count_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let sim = SimGpio::start(dir.path()).expect("start");
            let mut relay = sim.output(&out(27, Level::Low)).expect("claim the output");
            relay.set(Level::High).expect("drive high");
            relay.set(Level::High).expect("drive high again");
            assert_eq!(ask(&sim, "get 27"), "1");
            assert_eq!(ask(&sim, "changes 27"), "1");
        }
        let sim = SimGpio::start(dir.path()).expect("restart");
        assert_eq!(ask(&sim, "get 27"), "1", "the latch survives the restart");
        let relay = sim.output(&out(27, Level::High)).expect("claim the output again");
        assert_eq!(relay.level().expect("read"), Level::High);
        assert_eq!(ask(&sim, "changes 27"), "1", "the restart glitched the relay");
    }

    #[test]
    fn a_latch_file_that_shrank_in_place_still_loads_after_a_restart() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(STATE_FILE);
        {
            let sim = SimGpio::start(dir.path()).expect("start");
            let mut pump = sim.output(&out(27, Level::Low)).expect("claim 27");
            let mut fan = sim.output(&out(22, Level::Low)).expect("claim 22");
            pump.set(Level::High).expect("drive 27 high");
            let inode = fs::metadata(&file).expect("the latch file exists").ino();
            fan.set(Level::High).expect("drive 22 high");
            drop(fan);
            // Claiming 22 as an input drops it from the file: the content shrinks.
            let (_input, _events) = button(&sim, 22, Pull::Down, 0);
            assert_eq!(fs::metadata(&file).expect("stat").ino(), inode, "rewritten in place, never replaced");
        }
        let sim = SimGpio::start(dir.path()).expect("restart on the shrunk file");
        assert_eq!(ask(&sim, "get 27"), "1", "the relay's latch survives");
        assert_eq!(ask(&sim, "get 22"), "0", "the pin given back as an input is not latched");
        let (_input, _events) = button(&sim, 22, Pull::Down, 0);
    }

    #[test]
    fn acquiring_an_output_drives_its_initial_level_and_nothing_else() {
        let (_dir, sim) = board();
        let fresh = sim.output(&out(27, Level::Low)).expect("claim");
        assert_eq!(fresh.level().expect("read"), Level::Low, "a fresh pin starts low");
        assert_eq!(ask(&sim, "changes 27"), "0");
        drop(fresh);

        let relay = sim.output(&out(27, Level::High)).expect("claim");
        assert_eq!(relay.level().expect("read"), Level::High, "driven high from the claim on");
        assert_eq!(ask(&sim, "changes 27"), "1", "one switch, no glitch through another level");
        drop(relay);
        let relay = sim.output(&out(27, Level::High)).expect("claim again");
        assert_eq!(relay.level().expect("read"), Level::High);
        assert_eq!(ask(&sim, "changes 27"), "1", "claiming at the level it has changes nothing");

        // A pin held high from outside stays high when it becomes an output at that level.
        assert_eq!(ask(&sim, "set 22 1"), "ok");
        let other = sim.output(&out(22, Level::High)).expect("claim");
        assert_eq!(other.level().expect("read"), Level::High);
        assert_eq!(ask(&sim, "changes 22"), "1");
    }

    #[test]
    fn set_on_an_output_is_refused() {
        let (_dir, sim) = board();
        let relay = sim.output(&out(27, Level::Low)).expect("claim");
        assert_eq!(ask(&sim, "set 27 1"), "err pin 27 is an output driven by the agent");
        assert_eq!(relay.level().expect("read"), Level::Low);
        drop(relay);
        // Like a Pi pin that is never reset on drop, it stays an output.
        assert_eq!(ask(&sim, "set 27 1"), "err pin 27 is an output driven by the agent");
    }

    #[test]
    fn a_fault_makes_reads_fail_and_delivers_an_error() {
        let (_dir, sim) = board();
        let (pin, events) = button(&sim, 17, Pull::Up, 0);
        assert_eq!(ask(&sim, "fault 17 on"), "ok");
        let first = events.recv_timeout(WAIT).expect("an event arrives");
        assert!(matches!(first, Err(GpioError::Failed { pin: 17, .. })), "{first:?}");
        assert!(matches!(pin.level(), Err(GpioError::Failed { pin: 17, .. })));
        assert_eq!(ask(&sim, "fault 17 on"), "ok");
        assert!(events.recv_timeout(Duration::from_millis(100)).is_err(), "the error comes once");

        assert_eq!(ask(&sim, "set 17 0"), "ok");
        let again = events.recv_timeout(WAIT).expect("an event arrives");
        assert!(matches!(again, Err(GpioError::Failed { pin: 17, .. })), "{again:?}");

        // Mended: the change made during the fault is reported.
        assert_eq!(ask(&sim, "fault 17 off"), "ok");
        assert_eq!(edge(&events).level, Level::Low);
        assert_eq!(pin.level().expect("read"), Level::Low);

        let mut relay = sim.output(&out(27, Level::Low)).expect("claim");
        assert_eq!(ask(&sim, "fault 27 on"), "ok");
        assert!(relay.level().is_err());
        assert!(relay.set(Level::High).is_err());
        assert_eq!(ask(&sim, "changes 27"), "0");
    }

    #[test]
    fn bad_requests_get_err_lines() {
        let (_dir, sim) = board();
        let cases = [
            ("", "err empty request; expected set, get, fault, changes"),
            ("blah", "err unknown request 'blah'; expected set, get, fault, changes"),
            ("set 99 1", "err pin 99 is not a GPIO pin (0..=27)"),
            ("get 300", "err pin 300 is not a GPIO pin (0..=27)"),
            ("get x", "err pin 'x' is not a number (0..=27)"),
            ("set 17 2", "err level '2' is not 0 or 1"),
            ("set 17", "err bad request 'set 17'; expected set <pin> <0|1>"),
            ("fault 17 maybe", "err fault state 'maybe' is not on or off"),
            ("changes", "err bad request 'changes'; expected changes <pin>"),
        ];
        for (line, expected) in cases {
            assert_eq!(ask(&sim, line), expected, "request {line:?}");
        }
    }

    #[test]
    fn one_connection_carries_many_requests() {
        let (_dir, sim) = board();
        let mut stream = UnixStream::connect(sim.socket()).expect("connect");
        stream.write_all(b"set 4 1\nget 4\nbogus\n").expect("write");
        let mut reader = BufReader::new(stream);
        let mut answers = Vec::new();
        for _ in 0..3 {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            answers.push(line);
        }
        assert_eq!(answers, ["ok\n", "1\n", "err unknown request 'bogus'; expected set, get, fault, changes\n"]);
    }

    #[test]
    fn the_client_reports_a_missing_socket_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = socket_path(dir.path());
        let e = request(&socket, "get 17").expect_err("nobody listens");
        let message = e.to_string();
        assert!(message.contains(&format!("no simulated gpio at '{}'", socket.display())), "{message}");
        assert!(message.contains("gpio.backend = \"sim\""), "{message}");
    }

    #[test]
    fn a_second_board_on_the_same_state_dir_is_refused() {
        let (dir, _sim) = board();
        let e = SimGpio::start(dir.path()).expect_err("the socket is taken");
        assert!(e.to_string().contains("is another agent running with this state_dir?"), "{e}");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_dropping_the_board_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = socket_path(dir.path());
        drop(UnixListener::bind(&socket).expect("bind"));
        assert!(socket.exists(), "a dropped listener leaves its file");
        let sim = SimGpio::start(dir.path()).expect("start over a stale socket");
        assert_eq!(ask(&sim, "get 3"), "0");
        drop(sim);
        assert!(!socket.exists());
    }

    #[test]
    fn claimed_pins_and_pins_off_the_header_are_refused() {
        let (_dir, sim) = board();
        assert!(matches!(sim.output(&out(28, Level::Low)), Err(GpioError::NoSuchPin(28))));
        let (input, _events) = button(&sim, 17, Pull::Up, 0);
        assert!(matches!(sim.output(&out(17, Level::Low)), Err(GpioError::PinInUse(17))));
        drop(input);
        let _relay = sim.output(&out(17, Level::Low)).expect("free again");
        assert!(matches!(sim.output(&out(17, Level::Low)), Err(GpioError::PinInUse(17))));
    }

    #[test]
    fn an_unreadable_state_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(STATE_FILE), "{not json").expect("write");
        let e = SimGpio::start(dir.path()).expect_err("corrupt state");
        assert!(e.to_string().contains("sim-gpio.json' is unreadable"), "{e}");
        assert!(!socket_path(dir.path()).exists(), "nothing left listening");
    }
}
