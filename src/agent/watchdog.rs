//! The watchdog's verdict, sans-IO (DESIGN: systemd): whether the agent may
//! tell systemd `WATCHDOG=1` right now. Owns the rule and nothing else: it
//! sends nothing, reads no clock (the caller passes `now`) and asks no actor
//! anything (the caller passes whether the Link answered its ping).
//!
//! The agent is healthy when both hold:
//!
//! 1. **The Link's event loop turns**: the Link actor answered a ping within
//!    the time the caller allowed. A Link in its restart back-off is not
//!    pinged (its mailbox is held on purpose) and is judged by rule 2.
//! 2. **The supervisor keeps the actors running**: no supervised actor has
//!    been down (failed, waiting out its back-off, or failing its `init`
//!    again and again) for longer than `down_limit`. The caller sets that
//!    above `supervisor.backoff_max`, so one back-off never counts, a fault
//!    that outlasts several does.
//!
//! When either fails the agent stops sending `WATCHDOG=1`, and systemd
//! kills and restarts it after `WatchdogSec=` (the outbox makes that safe).

use std::time::{Duration, Instant};

/// One supervised actor as the status board sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorView {
    pub name: &'static str,
    pub running: bool,
    /// Since when it has not been running (`None` while it runs).
    pub down_since: Option<Instant>,
}

/// The Link's answer to this round's ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPing {
    Answered,
    /// No answer within the time allowed: its mailbox (or thread) is wedged.
    Unanswered,
    /// Not asked: the Link is not running (restart back-off).
    NotAsked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// Why not, in one line.
    Unhealthy(String),
}

/// The rule above. `link` is this round's ping; `actors` every supervised
/// actor.
pub fn verdict(link: LinkPing, actors: &[ActorView], now: Instant, down_limit: Duration) -> Verdict {
    for a in actors {
        if let Some(since) = a.down_since
            && !a.running
            && now.saturating_duration_since(since) > down_limit
        {
            return Verdict::Unhealthy(format!(
                "actor '{}' has not run for {} (more than {}): the supervisor cannot bring it back",
                a.name,
                humantime::format_duration(round_secs(now.saturating_duration_since(since))),
                humantime::format_duration(down_limit)
            ));
        }
    }
    if link == LinkPing::Unanswered {
        return Verdict::Unhealthy("the link's event loop did not answer its ping".to_string());
    }
    Verdict::Healthy
}

/// Whether to ping the Link this round: only while it runs.
pub fn ask_link(actors: &[ActorView]) -> bool {
    actors.iter().any(|a| a.name == "link" && a.running)
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(40);

    fn running(name: &'static str) -> ActorView {
        ActorView { name, running: true, down_since: None }
    }

    fn down(name: &'static str, since: Instant) -> ActorView {
        ActorView { name, running: false, down_since: Some(since) }
    }

    #[test]
    fn a_running_agent_whose_link_answers_is_healthy() {
        let now = Instant::now();
        let actors = [running("button"), running("relay"), running("heartbeat"), running("link")];
        assert!(ask_link(&actors));
        assert_eq!(verdict(LinkPing::Answered, &actors, now, LIMIT), Verdict::Healthy);
    }

    #[test]
    fn a_wedged_link_event_loop_stops_the_watchdog() {
        let now = Instant::now();
        let actors = [running("button"), running("relay"), running("heartbeat"), running("link")];
        assert_eq!(
            verdict(LinkPing::Unanswered, &actors, now, LIMIT),
            Verdict::Unhealthy("the link's event loop did not answer its ping".into())
        );
    }

    #[test]
    fn one_restart_back_off_is_not_a_fault() {
        let start = Instant::now();
        let actors = [running("button"), running("relay"), running("heartbeat"), down("link", start)];
        assert!(!ask_link(&actors), "a link in its back-off is not pinged");
        let later = start + Duration::from_secs(30);
        assert_eq!(verdict(LinkPing::NotAsked, &actors, later, LIMIT), Verdict::Healthy);
    }

    #[test]
    fn an_actor_the_supervisor_cannot_bring_back_stops_the_watchdog() {
        let start = Instant::now();
        let actors = [running("button"), down("relay", start), running("heartbeat"), running("link")];
        let later = start + Duration::from_secs(41);
        match verdict(LinkPing::Answered, &actors, later, LIMIT) {
            Verdict::Unhealthy(why) => {
                assert_eq!(
                    why,
                    "actor 'relay' has not run for 41s (more than 40s): the supervisor cannot bring it back"
                )
            }
            Verdict::Healthy => panic!("a relay down for 41 s with a 40 s limit is a fault"),
        }
    }

    #[test]
    fn an_actor_that_came_back_is_healthy_again() {
        let start = Instant::now();
        let later = start + Duration::from_secs(100);
        let actors = [running("button"), running("relay"), running("heartbeat"), running("link")];
        assert_eq!(verdict(LinkPing::Answered, &actors, later, LIMIT), Verdict::Healthy);
    }
}
