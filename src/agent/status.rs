//! The agent's shared status board and the status dump (DESIGN: Status dump).
//! Actors report into the board (link state, relay and button states, actor
//! health); SIGUSR1 renders it, with outbox numbers, into
//! `<state_dir>/status.json` atomically. It holds no secrets by construction:
//! nothing from `[mqtt]` credentials is ever put on the board. It must not
//! block on anything but its own short mutex.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::outbox::Stats;
use crate::proto::{ButtonState, Cause, LinkCounters, RelayState};
use crate::timefmt;

/// The four supervised actors, by the names the dump uses.
pub const ACTORS: [&str; 4] = ["button", "relay", "heartbeat", "link"];

#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStatus {
    pub connected: bool,
    pub since: Option<String>,
    pub connects: u64,
    pub disconnects: u64,
    pub last_error: Option<String>,
    /// Records sent and not yet acknowledged.
    pub in_flight: usize,
    /// Connection attempts since start (each gets a fresh MQTT client).
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RelayStatus {
    pub state: RelayState,
    pub cause: Cause,
    pub command_id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ButtonStatus {
    pub state: ButtonState,
    pub presses: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActorStatus {
    pub running: bool,
    pub restarts: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Board {
    link: LinkStatus,
    relays: BTreeMap<String, RelayStatus>,
    buttons: BTreeMap<String, ButtonStatus>,
    actors: BTreeMap<&'static str, ActorStatus>,
}

/// Shared by every actor (`Arc<StatusBoard>`).
#[derive(Debug)]
pub struct StatusBoard {
    device: String,
    started: Instant,
    board: Mutex<Board>,
}

#[derive(Debug, Serialize)]
pub struct OutboxStatus {
    pub depth: u64,
    pub bytes: u64,
    pub dropped: u64,
    pub oldest_ts: Option<String>,
}

/// What `status.json` holds.
#[derive(Debug, Serialize)]
pub struct Dump {
    pub device: String,
    pub version: &'static str,
    pub pid: u32,
    pub uptime_s: u64,
    pub dumped_at: String,
    pub link: LinkStatus,
    pub outbox: OutboxStatus,
    pub relays: BTreeMap<String, RelayStatus>,
    pub buttons: BTreeMap<String, ButtonStatus>,
    pub actors: BTreeMap<&'static str, ActorStatus>,
}

impl Dump {
    /// The one-line summary logged with each dump.
    pub fn summary(&self) -> String {
        let restarts: u64 = self.actors.values().map(|a| a.restarts).sum();
        let down: Vec<&str> = self.actors.iter().filter(|(_, a)| !a.running).map(|(n, _)| *n).collect();
        format!(
            "status: link {} ({} connects, {} disconnects); outbox depth {} ({} bytes, {} dropped); {} actor restarts{}",
            if self.link.connected { "up" } else { "down" },
            self.link.connects,
            self.link.disconnects,
            self.outbox.depth,
            self.outbox.bytes,
            self.outbox.dropped,
            restarts,
            if down.is_empty() { String::new() } else { format!("; not running: {}", down.join(", ")) },
        )
    }
}

impl StatusBoard {
    pub fn new(device: &str) -> StatusBoard {
        let mut board = Board::default();
        for name in ACTORS {
            board.actors.insert(name, ActorStatus { running: false, restarts: 0, last_error: None });
        }
        StatusBoard { device: device.to_string(), started: Instant::now(), board: Mutex::new(board) }
    }

    fn lock(&self) -> MutexGuard<'_, Board> {
        // A panic elsewhere ends the process (see agent::run), so a poisoned
        // lock only means a reader saw a half-finished report: still useful.
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn link_up(&self) {
        let mut b = self.lock();
        b.link.connected = true;
        b.link.connects += 1;
        b.link.since = Some(timefmt::rfc3339_millis(SystemTime::now()));
    }

    pub fn link_down(&self, error: String) {
        let mut b = self.lock();
        if b.link.connected {
            b.link.disconnects += 1;
            b.link.since = Some(timefmt::rfc3339_millis(SystemTime::now()));
        }
        b.link.connected = false;
        b.link.last_error = Some(error);
    }

    /// The Link's delivery numbers.
    pub fn link_delivery(&self, in_flight: usize, generation: u64) {
        let mut b = self.lock();
        b.link.in_flight = in_flight;
        b.link.generation = generation;
    }

    pub fn link_counters(&self) -> LinkCounters {
        let b = self.lock();
        LinkCounters { connects: b.link.connects, disconnects: b.link.disconnects }
    }

    pub fn relay(&self, name: &str, status: RelayStatus) {
        self.lock().relays.insert(name.to_string(), status);
    }

    pub fn button(&self, name: &str, state: ButtonState) {
        let mut b = self.lock();
        let entry = b.buttons.entry(name.to_string()).or_insert(ButtonStatus { state, presses: 0 });
        if state == ButtonState::Pressed && entry.state != ButtonState::Pressed {
            entry.presses += 1;
        }
        entry.state = state;
    }

    /// The state a button starts in; counts no press.
    pub fn button_initial(&self, name: &str, state: ButtonState) {
        let mut b = self.lock();
        b.buttons.entry(name.to_string()).or_insert(ButtonStatus { state, presses: 0 }).state = state;
    }

    pub fn actor_running(&self, name: &'static str) {
        if let Some(a) = self.lock().actors.get_mut(name) {
            a.running = true;
        }
    }

    pub fn actor_failed(&self, name: &'static str, error: String) {
        if let Some(a) = self.lock().actors.get_mut(name) {
            a.running = false;
            a.last_error = Some(error);
        }
    }

    pub fn actor_restarted(&self, name: &'static str) {
        if let Some(a) = self.lock().actors.get_mut(name) {
            a.restarts += 1;
        }
    }

    /// Everything the dump shows.
    pub fn dump(&self, outbox: Stats, oldest_ts_ms: Option<u64>) -> Dump {
        let b = self.lock();
        Dump {
            device: self.device.clone(),
            version: crate::VERSION,
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            dumped_at: timefmt::rfc3339_millis(SystemTime::now()),
            link: b.link.clone(),
            outbox: OutboxStatus {
                depth: outbox.depth,
                bytes: outbox.bytes,
                dropped: outbox.dropped,
                oldest_ts: oldest_ts_ms.map(|ms| timefmt::rfc3339_millis(timefmt::from_millis(ms))),
            },
            relays: b.relays.clone(),
            buttons: b.buttons.clone(),
            actors: b.actors.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> Stats {
        Stats { depth: 2, bytes: 300, dropped: 1, durable_seq: 9 }
    }

    #[test]
    fn the_dump_lists_every_actor_even_before_it_starts() {
        let board = StatusBoard::new("pi");
        let d = board.dump(stats(), None);
        assert_eq!(d.actors.keys().copied().collect::<Vec<_>>(), vec!["button", "heartbeat", "link", "relay"]);
        assert!(d.actors.values().all(|a| !a.running));
    }

    #[test]
    fn presses_count_only_transitions_into_pressed() {
        let board = StatusBoard::new("pi");
        board.button_initial("door", ButtonState::Released);
        board.button("door", ButtonState::Pressed);
        board.button("door", ButtonState::Pressed);
        board.button("door", ButtonState::Released);
        board.button("door", ButtonState::Pressed);
        assert_eq!(board.dump(stats(), None).buttons["door"].presses, 2);
    }

    #[test]
    fn disconnects_count_only_lost_connections() {
        let board = StatusBoard::new("pi");
        board.link_down("refused".into());
        board.link_up();
        board.link_down("reset".into());
        let d = board.dump(stats(), None);
        assert_eq!((d.link.connects, d.link.disconnects), (1, 1));
        assert_eq!(d.link.last_error.as_deref(), Some("reset"));
    }

    #[test]
    fn restarts_and_errors_show_per_actor_and_in_the_summary() {
        let board = StatusBoard::new("pi");
        board.actor_running("link");
        board.actor_failed("button", "pin 17: read failed".into());
        board.actor_restarted("button");
        let d = board.dump(stats(), Some(1_000));
        assert_eq!(d.actors["button"].restarts, 1);
        assert_eq!(d.outbox.oldest_ts.as_deref(), Some("1970-01-01T00:00:01.000Z"));
        let s = d.summary();
        assert!(s.contains("1 actor restarts"), "{s}");
        assert!(s.contains("not running: button, heartbeat, relay"), "{s}");
    }
}
