//! The agent's shared status board and what a status dump holds (DESIGN:
//! Status dump). Actors report into the board (link state, relay and button
//! states, actor health); [`StatusBoard::dump`] renders it, with the outbox
//! numbers its caller gathered, into a [`Dump`] and its one-line summary.
//! Writing and serving the dump is `status_dump`'s and `status_socket`'s
//! business. It holds no secrets by construction: nothing from `[mqtt]`
//! credentials is ever put on the board. It must not block on anything but
//! its own short mutex, and does no I/O.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::outbox::Stats;
use crate::proto::{ButtonState, Cause, LinkCounters, RelayState};
use crate::timefmt;

/// The supervised actors every agent runs, by the names the dump uses
/// (`sensor` joins them when sensors are configured: [`StatusBoard::add_actor`]).
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
    /// Since when it has not been running, for the watchdog (not dumped).
    #[serde(skip)]
    pub down_since: Option<Instant>,
}

#[derive(Debug, Default)]
struct Board {
    link: LinkStatus,
    /// Records the broker acknowledged that wait for the hub's confirmation.
    unconfirmed: usize,
    relays: BTreeMap<String, RelayStatus>,
    buttons: BTreeMap<String, ButtonStatus>,
    actors: BTreeMap<&'static str, ActorStatus>,
    /// When the link last came up (for the metrics textfile).
    last_connect: Option<SystemTime>,
}

/// Shared by every actor (`Arc<StatusBoard>`).
#[derive(Debug)]
pub struct StatusBoard {
    device: String,
    started: Instant,
    board: Mutex<Board>,
    /// Wakes the one waiter (`agent::systemd`) after a change that
    /// `STATUS=` or readiness shows: link up/down, delivery numbers, an
    /// actor running or failing. Permits coalesce: a burst wakes it once.
    changed: tokio::sync::Notify,
}

/// The outbox numbers a dump shows, gathered by the caller (the outbox
/// calls may touch the disk; the board does not).
#[derive(Debug, Clone, Copy, Default)]
pub struct OutboxView {
    pub stats: Stats,
    /// Whether the outbox is riding out a disk fault.
    pub disk_fault: bool,
    pub oldest_ts_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct OutboxStatus {
    pub depth: u64,
    pub bytes: u64,
    pub dropped: u64,
    pub oldest_ts: Option<String>,
    /// Every record up to this seq is durable (0: none yet).
    pub durable_seq: u64,
    /// The seq the next record gets: `durable_seq + 1 == next_seq` means
    /// every record made so far is durable.
    pub next_seq: u64,
    /// The outbox cannot write to its disk right now (full, failing):
    /// heartbeats are shed, events kept in memory until it recovers.
    pub disk_fault: bool,
    /// `confirm = "hub"`: records the broker acknowledged that wait in the
    /// outbox for the hub's confirmation (always 0 with "broker").
    pub unconfirmed: usize,
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
        let o = &self.outbox;
        format!(
            "status: link {} ({} connects, {} disconnects); outbox depth {} ({} bytes, {} dropped, {} unconfirmed, \
             durable up to seq {}, next seq {}){}; {} actor restarts{}",
            if self.link.connected { "up" } else { "down" },
            self.link.connects,
            self.link.disconnects,
            o.depth,
            o.bytes,
            o.dropped,
            o.unconfirmed,
            o.durable_seq,
            o.next_seq,
            if o.disk_fault { ", DISK FAULT: heartbeats shed, events kept in memory" } else { "" },
            restarts,
            if down.is_empty() { String::new() } else { format!("; not running: {}", down.join(", ")) },
        )
    }
}

impl StatusBoard {
    pub fn new(device: &str) -> StatusBoard {
        let mut board = Board::default();
        for name in ACTORS {
            board.actors.insert(
                name,
                ActorStatus { running: false, restarts: 0, last_error: None, down_since: Some(Instant::now()) },
            );
        }
        StatusBoard {
            device: device.to_string(),
            started: Instant::now(),
            board: Mutex::new(board),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Resolves after the next change (or at once if one happened since the
    /// last call). For one waiter only.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn touch(&self) {
        self.changed.notify_one();
    }

    /// Every supervised actor, for the watchdog.
    pub fn actor_views(&self) -> Vec<super::watchdog::ActorView> {
        self.lock()
            .actors
            .iter()
            .map(|(&name, a)| super::watchdog::ActorView { name, running: a.running, down_since: a.down_since })
            .collect()
    }

    /// Whether every supervised actor has run its `init`.
    pub fn all_running(&self) -> bool {
        self.lock().actors.values().all(|a| a.running)
    }

    /// The link state in a few words: `up` or `down (<last error>)`.
    pub fn link_summary(&self) -> String {
        let b = self.lock();
        match (&b.link.connected, &b.link.last_error) {
            (true, _) => "up".to_string(),
            (false, None) => "connecting".to_string(),
            (false, Some(e)) => {
                let short: String = e.chars().take(80).collect();
                let cut = if short.len() < e.len() { "..." } else { "" };
                format!("down ({short}{cut})")
            }
        }
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
        let now = SystemTime::now();
        b.link.since = Some(timefmt::rfc3339_millis(now));
        b.last_connect = Some(now);
        drop(b);
        self.touch();
    }

    pub fn link_connected(&self) -> bool {
        self.lock().link.connected
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// When the link last came up, if it ever did.
    pub fn last_connect(&self) -> Option<SystemTime> {
        self.lock().last_connect
    }

    /// Another supervised actor to list (not running until it says so).
    pub fn add_actor(&self, name: &'static str) {
        self.lock().actors.entry(name).or_insert(ActorStatus {
            running: false,
            restarts: 0,
            last_error: None,
            down_since: Some(Instant::now()),
        });
    }

    /// Restarts per actor, by name.
    pub fn actor_restarts(&self) -> BTreeMap<&'static str, u64> {
        self.lock().actors.iter().map(|(n, a)| (*n, a.restarts)).collect()
    }

    pub fn link_down(&self, error: String) {
        let mut b = self.lock();
        if b.link.connected {
            b.link.disconnects += 1;
            b.link.since = Some(timefmt::rfc3339_millis(SystemTime::now()));
        }
        b.link.connected = false;
        b.link.last_error = Some(error);
        drop(b);
        self.touch();
    }

    /// The Link's delivery numbers.
    pub fn link_delivery(&self, in_flight: usize, unconfirmed: usize, generation: u64) {
        let mut b = self.lock();
        b.link.in_flight = in_flight;
        b.unconfirmed = unconfirmed;
        b.link.generation = generation;
        drop(b);
        self.touch();
    }

    /// Records waiting for the hub's confirmation (see [`OutboxStatus`]).
    pub fn unconfirmed(&self) -> usize {
        self.lock().unconfirmed
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
            a.down_since = None;
        }
        self.touch();
    }

    pub fn actor_failed(&self, name: &'static str, error: String) {
        if let Some(a) = self.lock().actors.get_mut(name) {
            if a.running || a.down_since.is_none() {
                a.down_since = Some(Instant::now());
            }
            a.running = false;
            a.last_error = Some(error);
        }
        self.touch();
    }

    pub fn actor_restarted(&self, name: &'static str) {
        if let Some(a) = self.lock().actors.get_mut(name) {
            a.restarts += 1;
        }
    }

    /// Everything the dump shows.
    pub fn dump(&self, outbox: OutboxView) -> Dump {
        let b = self.lock();
        Dump {
            device: self.device.clone(),
            version: crate::VERSION,
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            dumped_at: timefmt::rfc3339_millis(SystemTime::now()),
            link: b.link.clone(),
            outbox: OutboxStatus {
                depth: outbox.stats.depth,
                bytes: outbox.stats.bytes,
                dropped: outbox.stats.dropped,
                oldest_ts: outbox.oldest_ts_ms.map(|ms| timefmt::rfc3339_millis(timefmt::from_millis(ms))),
                durable_seq: outbox.stats.durable_seq,
                next_seq: outbox.stats.next_seq,
                disk_fault: outbox.disk_fault,
                unconfirmed: b.unconfirmed,
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

    fn stats() -> OutboxView {
        OutboxView {
            stats: Stats { depth: 2, bytes: 300, dropped: 1, durable_seq: 9, next_seq: 11 },
            disk_fault: false,
            oldest_ts_ms: None,
        }
    }

    #[test]
    fn the_dump_lists_every_actor_even_before_it_starts() {
        let board = StatusBoard::new("pi");
        let d = board.dump(stats());
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
        assert_eq!(board.dump(stats()).buttons["door"].presses, 2);
    }

    #[test]
    fn disconnects_count_only_lost_connections() {
        let board = StatusBoard::new("pi");
        board.link_down("refused".into());
        board.link_up();
        board.link_down("reset".into());
        let d = board.dump(stats());
        assert_eq!((d.link.connects, d.link.disconnects), (1, 1));
        assert_eq!(d.link.last_error.as_deref(), Some("reset"));
    }

    #[test]
    fn restarts_and_errors_show_per_actor_and_in_the_summary() {
        let board = StatusBoard::new("pi");
        board.actor_running("link");
        board.actor_failed("button", "pin 17: read failed".into());
        board.actor_restarted("button");
        let d = board.dump(OutboxView { oldest_ts_ms: Some(1_000), ..stats() });
        assert_eq!(d.actors["button"].restarts, 1);
        assert_eq!(d.outbox.oldest_ts.as_deref(), Some("1970-01-01T00:00:01.000Z"));
        let s = d.summary();
        assert!(s.contains("1 actor restarts"), "{s}");
        assert!(s.contains("not running: button, heartbeat, relay"), "{s}");
    }

    #[test]
    fn the_summary_says_how_far_the_outbox_is_durable_and_shouts_a_disk_fault() {
        let board = StatusBoard::new("pi");
        let calm = board.dump(stats()).summary();
        assert!(calm.contains("durable up to seq 9, next seq 11"), "{calm}");
        assert!(!calm.contains("DISK FAULT"), "{calm}");
        let d = board.dump(OutboxView { disk_fault: true, ..stats() });
        assert!(d.outbox.disk_fault);
        let s = d.summary();
        assert!(s.contains("DISK FAULT"), "{s}");
    }
}
