//! The agent's side of `Type=notify` (DESIGN: systemd): one task on the
//! actors' (main) thread that tells systemd `READY=1`, `STATUS=` and `WATCHDOG=1` through
//! [`Notifier`]. It owns *when* each is sent; the verdict for the watchdog
//! is the sans-IO `watchdog` module's, the socket is `sd_notify`'s, and
//! `STOPPING=1` is sent by the Lifecycle actor at SIGTERM. It must never
//! block that thread and never fail the agent: a notification that cannot be
//! sent is logged.
//!
//! * `READY=1` (with the first `STATUS=`) once every supervised actor has
//!   run its `init` (the outbox was opened before any actor started). It
//!   does not wait for the broker: a Pi with no network is up and recording.
//! * `STATUS=link up; outbox N records` whenever that text changes, woken by
//!   the status board (link up/down, delivery numbers, actor health), at most
//!   once per [`STATUS_GAP`] so a busy outbox does not flood the journal.
//!   Nothing is sent while nothing changes.
//! * `WATCHDOG=1` every `WATCHDOG_USEC / 2`, only when the verdict is healthy:
//!   each round pings the Link (an actix message: a Link whose mailbox is
//!   stuck leaves it unanswered within the round's half period). The Link
//!   and this task share the actors' thread, so a wedged thread sends no
//!   `WATCHDOG=1` at all. Without `WATCHDOG_USEC` there is no timer at all.
//!   A withheld watchdog is logged once per change and shown in `STATUS=`.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::time::Instant;

use super::status::StatusBoard;
use super::watchdog::{self, LinkPing, Verdict};
use crate::outbox::OutboxHandle;
use crate::sd_notify::{Notifier, status_line};

/// The least time between two `STATUS=` notifications.
pub const STATUS_GAP: Duration = Duration::from_secs(1);

/// Asks an actor whether its mailbox is served; the answer is the reply.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Ping;

/// What the task needs.
pub struct Systemd {
    pub notifier: Notifier,
    pub board: Arc<StatusBoard>,
    pub outbox: OutboxHandle,
    /// The Link (any actor, in tests) that must answer [`Ping`].
    pub link: Recipient<Ping>,
    /// How long a supervised actor may stay down before the watchdog is
    /// withheld (see `watchdog`).
    pub down_limit: Duration,
}

impl Systemd {
    /// Runs until the system stops. Returns at once when systemd does not
    /// listen (no `NOTIFY_SOCKET`).
    pub async fn run(self) {
        if !self.notifier.enabled() {
            return;
        }
        while !self.board.all_running() {
            self.board.changed().await;
        }
        let mut verdict = Verdict::Healthy;
        let mut shown = self.status(&verdict);
        self.notifier.send(&format!("READY=1\n{}", status_line(&shown)));
        tracing::info!("told systemd: ready ({shown})");

        let period = self.notifier.watchdog_timeout().map(|t| t / 2);
        if let Some(p) = period {
            tracing::info!("systemd watchdog on: WATCHDOG=1 every {} while healthy", humantime::format_duration(p));
        }
        let mut tick = period.map(|p| {
            let mut t = tokio::time::interval(p);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut status_due: Option<Instant> = None;
        loop {
            let watchdog_tick = async {
                match tick.as_mut() {
                    Some(t) => t.tick().await,
                    None => std::future::pending().await,
                }
            };
            let status_wait = async {
                match status_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = watchdog_tick => {
                    let now = verdict_now(&self, period.unwrap_or(STATUS_GAP) / 2).await;
                    if now != verdict {
                        match &now {
                            Verdict::Healthy => tracing::info!("watchdog: healthy again"),
                            Verdict::Unhealthy(why) => tracing::error!("watchdog withheld: {why}; systemd restarts the agent after WatchdogSec"),
                        }
                        verdict = now;
                        status_due.get_or_insert_with(Instant::now);
                    }
                    if verdict == Verdict::Healthy {
                        self.notifier.send("WATCHDOG=1");
                    }
                }
                () = self.board.changed() => {
                    status_due.get_or_insert_with(|| Instant::now() + STATUS_GAP);
                }
                () = status_wait => {
                    status_due = None;
                    let text = self.status(&verdict);
                    if text != shown {
                        self.notifier.send(&status_line(&text));
                        shown = text;
                    }
                }
            }
        }
    }

    /// The `STATUS=` text.
    fn status(&self, verdict: &Verdict) -> String {
        let depth = self.outbox.stats().depth;
        let records = if depth == 1 { "record" } else { "records" };
        let mut text = format!("link {}; outbox {depth} {records}", self.board.link_summary());
        if let Verdict::Unhealthy(why) = verdict {
            text.push_str(&format!("; WATCHDOG WITHHELD: {why}"));
        }
        text
    }
}

/// This round's verdict: pings the Link (when it runs) and waits at most
/// `wait` for the answer.
async fn verdict_now(s: &Systemd, wait: Duration) -> Verdict {
    let actors = s.board.actor_views();
    let link = if watchdog::ask_link(&actors) {
        match tokio::time::timeout(wait, s.link.send(Ping)).await {
            Ok(Ok(())) => LinkPing::Answered,
            // Timed out, or the mailbox is closed (the actor is gone).
            Ok(Err(_)) | Err(_) => LinkPing::Unanswered,
        }
    } else {
        LinkPing::NotAsked
    };
    watchdog::verdict(link, &actors, std::time::Instant::now(), s.down_limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::status::ACTORS;
    use crate::config::{Durability, OutboxConfig};
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An actor on its own arbiter that answers pings, except while
    /// `wedged` is set: then its handler blocks the arbiter's thread, as a
    /// blocking call in the Link would.
    struct Stuck {
        wedged: Arc<AtomicBool>,
    }

    impl Actor for Stuck {
        type Context = Context<Self>;
    }

    impl Handler<Ping> for Stuck {
        type Result = ();
        fn handle(&mut self, _: Ping, _: &mut Context<Self>) {
            while self.wedged.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// The next datagram, within a generous deadline.
    fn next(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification within the deadline");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn the_watchdog_stops_while_the_link_arbiter_is_wedged_and_resumes_after() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        listener.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        // A ping may take up to 250 ms to be answered: plenty on a loaded CI.
        let notifier = Notifier::new(path.to_str(), Some("1000000"), None, 1).expect("valid");
        let cfg = OutboxConfig {
            max_bytes: 1 << 20,
            durability: Durability::Batch,
            flush_interval: Duration::from_millis(10),
        };
        let (outbox, _reader, _) = crate::outbox::open(dir.path(), &cfg).expect("outbox");
        let board = Arc::new(StatusBoard::new("pi"));
        for a in ACTORS {
            board.actor_running(a);
        }
        let wedged = Arc::new(AtomicBool::new(false));

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runner = {
            let (wedged, outbox) = (wedged.clone(), outbox.clone());
            std::thread::spawn(move || {
                let system = actix::System::new();
                system.block_on(async move {
                    let arbiter = Arbiter::new();
                    let stuck = Stuck::start_in_arbiter(&arbiter.handle(), move |_| Stuck { wedged });
                    let link = stuck.recipient();
                    actix::spawn(Systemd { notifier, board, outbox, link, down_limit: Duration::from_secs(60) }.run());
                    // Runs the task until the test is done with it.
                    let _ = stopped.await;
                    arbiter.stop();
                });
            })
        };

        assert!(next(&listener).starts_with("READY=1\nSTATUS=link connecting; outbox 0 records"));
        assert_eq!(next(&listener), "WATCHDOG=1");
        assert_eq!(next(&listener), "WATCHDOG=1");

        wedged.store(true, Ordering::Release);
        // Watchdogs already on their way may still arrive; then the status
        // says why they stop.
        let mut msg = next(&listener);
        while msg == "WATCHDOG=1" {
            msg = next(&listener);
        }
        assert_eq!(
            msg,
            "STATUS=link connecting; outbox 0 records; WATCHDOG WITHHELD: the link's event loop did not answer its ping"
        );

        wedged.store(false, Ordering::Release);
        // Nothing but status lines until the next watchdog: no WATCHDOG=1
        // was sent while wedged.
        let mut msg = next(&listener);
        while msg.starts_with("STATUS=") {
            msg = next(&listener);
        }
        assert_eq!(msg, "WATCHDOG=1");
        assert_eq!(next(&listener), "STATUS=link connecting; outbox 0 records");

        let _ = stop.send(());
        runner.join().expect("the system thread ends");
        outbox.shutdown();
    }
}
