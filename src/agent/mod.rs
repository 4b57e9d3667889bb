//! The field agent: its actors and how they are wired (DESIGN: The system,
//! Supervision). Owns the process lifecycle of `fieldlink agent`: state
//! directory, pid file, panic policy, actor start-up order and the exit code.
//! Protocol decisions live in the sans-IO modules (`proto`, `delivery`,
//! `inbox`, `command_gate`, `restart_policy`, `backoff`, `confirmations`),
//! not here.
//!
//! # Actors and threads
//!
//! ```text
//!  main thread       every actor: Button (edges from the gpio thread), Relay,
//!  (actix system,    Link (polls the rumqttc event loop), Heartbeat, Sensor,
//!  current-thread    Lifecycle (signals); the systemd task; the status
//!  tokio runtime)    socket's accept task
//!  outbox-writer     inserts, group commit, fdatasync (the outbox's only writer)
//!  gpio backend      the sim socket's accept and timer threads, or rppal's/cdev's
//!  on demand only    tokio's blocking pool (heartbeat samples, the metrics
//!                    textfile, status dumps, sensor readings), the outbox's
//!                    replay reader, sled's log writers; each ends when idle
//! ```
//!
//! Nothing on the main thread blocks: disk, /proc, /sys and sensor reads go
//! to the threads below it (start-up aside: the Relay reads its saved state
//! when it is created). One thread for all the actors keeps a command's
//! hops (Link -> Relay -> outbox -> Link) free of thread switches but the
//! writer's, and an idle agent wakes only for its heartbeat and keep-alive.
//!
//! Button, Relay, Heartbeat, Sensor --record--> outbox --Durable(seq)--> Link --> broker
//! broker --command--> Link --RelayCommand{done}--> Relay; done fires --> Link acks
//!
//! Messages between actors are typed (`relay::RelayCommand`, `link::Durable`,
//! ...); each actor's messages live in its own file. Every actor but
//! Lifecycle runs under a supervisor (see `supervisor`).

mod backoff;
mod button;
mod command_gate;
mod confirmations;
mod delivery;
#[cfg(test)]
mod delivery_model;
mod heartbeat;
pub mod homeassistant;
mod inbox;
mod lifecycle;
mod link;
mod metrics_textfile;
mod recorder;
mod relay;
mod restart_policy;
mod saved_relays;
mod sensor;
mod sensor_reading;
mod sensor_state;
mod status;
mod status_dump;
mod status_socket;
mod supervisor;
mod systemd;
mod watchdog;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix::prelude::*;

pub use backoff::{Backoff, Failure, PROBE_EVERY, Reconnect, Wait};
pub use delivery::{Action, Connected, Control, Delivery, Desync, Pkid, Submit, Tag, rumqttc_inflight};
pub use inbox::{Arrival, Inbox};
pub use restart_policy::{Decision, RestartPolicy};
pub use status::{Dump, StatusBoard};
pub use status_socket::{Answer as StatusAnswer, SocketError, request as request_status};
pub use watchdog::{ActorView, LinkPing, Verdict, verdict as watchdog_verdict};

use crate::config::{AgentConfig, GpioBackend};
use crate::gpio::Gpio;
use crate::outbox;
use crate::proto::Topics;
use recorder::Recorder;
use supervisor::Supervision;

/// How long a thread of tokio's blocking pool waits for more work before it
/// ends (tokio's default is 10 s). The pool runs the heartbeat's sample
/// every `heartbeat.interval`, status dumps and sensor readings; an idle
/// agent keeps none of its threads for long.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// `<state_dir>/agent.pid`: how `fieldlink status` finds the agent.
pub fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.pid")
}

/// `<state_dir>/status.json`: the status dump.
pub fn status_file(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

/// `<state_dir>/status.sock`: where `fieldlink status` asks for a dump.
pub fn status_socket_file(state_dir: &Path) -> PathBuf {
    state_dir.join("status.sock")
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("state_dir '{path}': {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
    #[error(transparent)]
    Gpio(#[from] crate::gpio::GpioError),
    #[error("signals: {0}")]
    Signals(std::io::Error),
    #[error("actor system: {0}")]
    System(std::io::Error),
}

/// A panic anywhere ends the process with exit code 1 (DESIGN: Supervision):
/// actix would otherwise drop the panicked actor silently and keep running
/// without it. systemd restarts the process; the outbox makes that safe.
///
/// One exception: a panic from sled inside the outbox's guarded calls
/// (opening or scanning the database, also when the writer reopens it after
/// a disk fault, and reading one moved aside). sled 0.34.7 panics on some
/// damaged files; the outbox catches that and moves the database aside, so
/// exiting would turn a damaged file into a crash loop.
fn exit_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if outbox::panic_is_caught() {
            tracing::warn!(
                "sled panicked inside the outbox ({info}); caught: the outbox treats the database as damaged"
            );
            return;
        }
        default(info);
        tracing::error!("panic: {info}; exiting with code 1");
        std::process::exit(1);
    }));
}

/// Runs the agent until SIGTERM/SIGINT (exit code 0) or a supervisor
/// escalation (exit code 1).
pub fn run(cfg: AgentConfig) -> Result<i32, AgentError> {
    let state_dir = cfg.state_dir.clone();
    std::fs::create_dir_all(&state_dir).map_err(|source| AgentError::StateDir { path: state_dir.clone(), source })?;
    exit_on_panic();

    // The hook above lets a sled panic caught by the outbox unwind, so a
    // damaged database is moved aside here instead of crash-looping.
    let (outbox, reader, report) = outbox::open(&state_dir, &cfg.outbox)?;
    if let Some(aside) = &report.moved_aside {
        tracing::error!(
            replayed = report.replayed,
            lost = report.lost,
            "THE OUTBOX WAS CORRUPT and was moved to '{}'; started a fresh one",
            aside.display()
        );
    }
    tracing::info!(
        depth = report.depth,
        next_seq = report.next_seq,
        epoch = report.epoch,
        "outbox open at {}",
        state_dir.join("outbox").display()
    );

    // Signal handlers before the sim socket and the pid file exist: a
    // SIGUSR1 (`fieldlink status`) that finds the pid file must never meet
    // the default action, which kills the process. Needs the runtime.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()
        .map_err(AgentError::System)?;
    let system = System::with_tokio_rt(move || runtime);
    let signals = system.block_on(async { lifecycle::register_signals() }).map_err(AgentError::Signals)?;

    // Keeps the sim socket served until the agent ends.
    let gpio: Arc<dyn Gpio> = match cfg.gpio.backend {
        GpioBackend::Sim => Arc::new(crate::gpio::sim::SimGpio::start(&state_dir)?),
        GpioBackend::Rppal => Arc::new(crate::gpio::rppal::RppalGpio::new()?),
        GpioBackend::Cdev => Arc::new(crate::gpio::cdev::CdevGpio::new()),
    };

    // Before the pid file too: a client that finds the pid file finds the
    // socket. Without it `fieldlink status` falls back to SIGUSR1.
    let mut status_socket = match status_socket::StatusSocket::bind(&status_socket_file(&state_dir)) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("{e}; `fieldlink status` falls back to SIGUSR1 and status.json");
            None
        }
    };

    let pid_path = pid_file(&state_dir);
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .map_err(|source| AgentError::StateDir { path: pid_path.clone(), source })?;

    let started = system.block_on(async { start(&cfg, signals, gpio, outbox.clone(), reader, status_socket.as_mut()) });
    let code = match started {
        Ok(()) => system.run_with_code().map_err(AgentError::System)?,
        Err(e) => {
            drop(status_socket);
            outbox.shutdown();
            let _ = std::fs::remove_file(&pid_path);
            return Err(e);
        }
    };
    // No more dumps (they read the outbox).
    drop(status_socket);
    // Escalation and SIGTERM alike: whatever was appended becomes durable.
    outbox.shutdown();
    // A stale pid file only makes `fieldlink status` say the agent is not
    // running; failing to remove it is not worth an error.
    let _ = std::fs::remove_file(&pid_path);
    tracing::info!(code, "agent stopped");
    Ok(code)
}

/// Starts every actor inside the running system.
fn start(
    cfg: &AgentConfig,
    signals: impl Stream<Item = lifecycle::Sig> + Unpin + 'static,
    gpio: Arc<dyn Gpio>,
    outbox: outbox::OutboxHandle,
    reader: outbox::OutboxReader,
    status_socket: Option<&mut status_socket::StatusSocket>,
) -> Result<(), AgentError> {
    let board = Arc::new(StatusBoard::new(&cfg.device_id));
    let topics = Topics::new(&cfg.mqtt.topic_prefix, &cfg.device_id);
    let recorder = Recorder::new(&cfg.device_id, outbox.epoch(), outbox.clone());
    let dumper = Arc::new(status_dump::StatusDump::new(
        board.clone(),
        recorder.clone(),
        reader.clone(),
        status_file(&cfg.state_dir),
    ));
    if let Some(socket) = status_socket {
        let dumper = dumper.clone();
        if let Err(e) = socket.serve(move || dumper.take()) {
            tracing::warn!("{e}; `fieldlink status` falls back to SIGUSR1 and status.json");
        }
    }
    let sup = |name| Supervision::new(name, board.clone(), &cfg.supervisor);

    let relay = {
        let (relays, state_dir, gpio, recorder, reader, topics, sup) = (
            cfg.relays.clone(),
            cfg.state_dir.clone(),
            gpio.clone(),
            recorder.clone(),
            reader.clone(),
            topics.clone(),
            sup("relay"),
        );
        Supervisor::start(move |_| relay::Relay::new(relays, &state_dir, gpio, recorder, reader, topics, sup))
    };

    let link = {
        let (mqtt, confirm, topics, outbox, reader, relay, sup) =
            (cfg.mqtt.clone(), cfg.confirm, topics.clone(), outbox.clone(), reader.clone(), relay.clone(), sup("link"));
        let discovery = discovery_round(cfg, &topics);
        Supervisor::start(move |_| {
            link::Link::new(mqtt, confirm, topics, outbox, reader, relay, sup).with_discovery(discovery.clone())
        })
    };
    {
        let link = link.clone();
        outbox.set_on_durable_with_records(Box::new(move |seq, fresh| link.do_send(link::Durable(seq, fresh))));
    }

    let button = {
        let (buttons, recorder, topics, sup) = (cfg.buttons.clone(), recorder.clone(), topics.clone(), sup("button"));
        Supervisor::start(move |_| button::Button::new(buttons, gpio, recorder, topics, sup))
    };

    let mut supervised: Vec<Box<dyn std::any::Any>> = vec![Box::new(button), Box::new(relay)];
    if !cfg.sensors.is_empty() {
        board.add_actor("sensor");
        let (sensors, recorder, topics, sup) = (cfg.sensors.clone(), recorder.clone(), topics.clone(), sup("sensor"));
        let sensor = Supervisor::start(move |_| sensor::Sensor::new(sensors, recorder, topics, sup));
        supervised.push(Box::new(sensor));
    }

    let heartbeat = {
        let (hb, state_dir, recorder, topics, sup, textfile) = (
            cfg.heartbeat.clone(),
            cfg.state_dir.clone(),
            recorder,
            topics,
            sup("heartbeat"),
            cfg.metrics.textfile.clone(),
        );
        Supervisor::start(move |_| heartbeat::Heartbeat::new(hb, state_dir, recorder, topics, sup, textfile))
    };

    let notifier = crate::sd_notify::Notifier::from_env();
    // One back-off of the supervisor never withholds the watchdog; a fault
    // that outlasts it by a watchdog period does (see `watchdog`).
    let down_limit = cfg.supervisor.backoff_max + notifier.watchdog_timeout().unwrap_or(cfg.supervisor.backoff_max);
    actix::spawn(
        systemd::Systemd {
            notifier: notifier.clone(),
            board: board.clone(),
            outbox: outbox.clone(),
            link: link.clone().recipient(),
            down_limit,
        }
        .run(),
    );
    supervised.push(Box::new(heartbeat));
    lifecycle::Lifecycle::new(signals, dumper, outbox, link, supervised, notifier).start();
    tracing::info!(device = %cfg.device_id, "agent started");
    Ok(())
}

/// Home Assistant discovery for this config (DESIGN: Home Assistant
/// discovery), planned against what earlier runs published.
fn discovery_round(cfg: &AgentConfig, topics: &Topics) -> Option<homeassistant::Round> {
    let ha = &cfg.homeassistant;
    let inputs = homeassistant::Inputs {
        prefix: &ha.prefix,
        topics,
        version: crate::VERSION,
        buttons: cfg.buttons.iter().map(|b| b.name.as_str()).collect(),
        relays: cfg.relays.iter().map(|r| r.name.as_str()).collect(),
        sensors: cfg.sensors.iter().map(|s| (s.name.as_str(), s.unit.as_deref().unwrap_or(""))).collect(),
    };
    homeassistant::Round::prepare(ha.discovery, &cfg.state_dir, &inputs)
}
