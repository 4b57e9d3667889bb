//! The incoming side of the Link, sans-IO: acknowledging what the broker
//! sends in arrival order, and the catch-up after a resumed session. It owns
//! no connection and no timer; the Link feeds it and performs what it says.
//! It must never acknowledge a message on a connection other than the one it
//! came on, and never let one unfinished command hold back the acks of later
//! ones for good.
//!
//! # Acknowledgements
//!
//! Every QoS 1 message gets its PUBACK in the order the messages arrived
//! (MQTT-4.6.0-2), whatever its topic. A command is acknowledged once the
//! Relay is done with it (its `done` handle fired); a sync echo or a message
//! on a topic the agent does not handle is done at once. A command whose
//! `done` handle was dropped (nothing could be recorded) is skipped: it is
//! left unacknowledged (the broker delivers it again on a later session) and
//! the ones after it are acknowledged. Messages from an earlier connection
//! are never acknowledged on a later one (the broker redelivers them).
//!
//! # Catch-up
//!
//! After every ConnAck the Link publishes a random nonce to `P/D/sync` (to
//! which it subscribes). On a resumed session, every command that arrives
//! before that nonce comes back was queued by the broker while the agent was
//! offline: it carries `backlog = true`, and the echo means caught up. On a
//! new session (`session_present = false`) there is no backlog: caught up at
//! once (the nonce is still published, so a broker ACL that forbids
//! `P/D/sync` shows in the log on the first connection, not after the first
//! outage). If the echo has not come within the wait (the Link uses
//! `keep_alive`, counted from the ConnAck and again from each message that
//! arrives meanwhile, so a long backlog does not trip it) the Link warns and
//! declares catch-up anyway.

use std::collections::VecDeque;

use rumqttc::Publish;

/// How a message fits the catch-up of its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// A command: hand it to the Relay with this id and backlog flag.
    Command { id: u64, backlog: bool },
    /// The nonce came back: the backlog (if any) is over. `caught_up` is
    /// true when this ends a catch-up that was still waiting.
    Echo { caught_up: bool },
    /// Anything else: acknowledged and otherwise ignored.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Waiting,
    Done,
    GaveUp,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    generation: u64,
    publish: Publish,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CatchUp {
    /// Not connected.
    Down,
    /// A resumed session waiting for this nonce: commands are backlog.
    Waiting { nonce: Vec<u8> },
    /// Caught up; the nonce may still come back (new session).
    Done { nonce: Vec<u8>, echoed: bool },
}

/// See the module doc.
#[derive(Debug)]
pub struct Inbox {
    queue: VecDeque<Entry>,
    next_id: u64,
    generation: u64,
    up: bool,
    catch_up: CatchUp,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox::new()
    }
}

impl Inbox {
    pub fn new() -> Inbox {
        Inbox { queue: VecDeque::new(), next_id: 0, generation: 0, up: false, catch_up: CatchUp::Down }
    }

    /// A ConnAck on connection `generation`, whose sync publish carries
    /// `nonce`. Returns true when catch-up is already done (no session: no
    /// backlog).
    pub fn connected(&mut self, generation: u64, session_present: bool, nonce: Vec<u8>) -> bool {
        self.generation = generation;
        self.up = true;
        if session_present {
            self.catch_up = CatchUp::Waiting { nonce };
            false
        } else {
            self.catch_up = CatchUp::Done { nonce, echoed: false };
            true
        }
    }

    pub fn disconnected(&mut self) {
        self.up = false;
        self.catch_up = CatchUp::Down;
    }

    /// Whether catch-up still waits for its echo.
    pub fn waiting(&self) -> bool {
        matches!(self.catch_up, CatchUp::Waiting { .. })
    }

    /// Whether the sync echo has not come back on this connection (for the
    /// warning when the wait runs out).
    pub fn echo_missing(&self) -> bool {
        matches!(self.catch_up, CatchUp::Waiting { .. } | CatchUp::Done { echoed: false, .. })
    }

    /// The wait for the echo ran out: declare catch-up. Returns true if it
    /// was still waiting (the Link then tells the Relay).
    pub fn give_up_waiting(&mut self) -> bool {
        match std::mem::replace(&mut self.catch_up, CatchUp::Down) {
            CatchUp::Waiting { nonce, .. } => {
                self.catch_up = CatchUp::Done { nonce, echoed: false };
                true
            }
            other => {
                self.catch_up = other;
                false
            }
        }
    }

    /// A message arrived on the current connection. `command` says whether
    /// its topic is a command topic, `sync` whether it is the sync topic.
    pub fn arrived(&mut self, publish: Publish, command: bool, sync: bool) -> Arrival {
        self.next_id += 1;
        let id = self.next_id;
        let arrival = if command {
            Arrival::Command { id, backlog: matches!(self.catch_up, CatchUp::Waiting { .. }) }
        } else if sync {
            Arrival::Echo { caught_up: self.echo(&publish.payload) }
        } else {
            Arrival::Other
        };
        let outcome = if command { Outcome::Waiting } else { Outcome::Done };
        self.queue.push_back(Entry { id, generation: self.generation, publish, outcome });
        arrival
    }

    fn echo(&mut self, payload: &[u8]) -> bool {
        match &mut self.catch_up {
            CatchUp::Waiting { nonce, .. } if nonce.as_slice() == payload => {
                let nonce = std::mem::take(nonce);
                self.catch_up = CatchUp::Done { nonce, echoed: true };
                true
            }
            CatchUp::Done { nonce, echoed } if nonce.as_slice() == payload => {
                *echoed = true;
                false
            }
            // An echo of an earlier connection's nonce (queued in the
            // session), or someone else's: nothing to do.
            _ => false,
        }
    }

    /// The Relay is done with command `id` (`applied = false`: it dropped
    /// the handle). Returns the messages to acknowledge now, in order.
    pub fn finished(&mut self, id: u64, applied: bool) -> Vec<Publish> {
        if let Some(e) = self.queue.iter_mut().find(|e| e.id == id) {
            e.outcome = if applied { Outcome::Done } else { Outcome::GaveUp };
        }
        self.ready()
    }

    /// The messages at the head of the queue that may be acknowledged now, in
    /// arrival order. Call after [`Inbox::arrived`] too.
    pub fn ready(&mut self) -> Vec<Publish> {
        let mut acks = Vec::new();
        while let Some(front) = self.queue.front() {
            if front.outcome == Outcome::Waiting {
                break;
            }
            let Some(e) = self.queue.pop_front() else { break };
            match e.outcome {
                Outcome::Done if self.up && e.generation == self.generation => acks.push(e.publish),
                Outcome::Done => tracing::debug!(
                    topic = %e.publish.topic,
                    "message came in on an earlier connection; the broker delivers it again"
                ),
                _ => tracing::warn!(
                    topic = %e.publish.topic,
                    "command not recorded; left unacknowledged so the broker delivers it again"
                ),
            }
        }
        acks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::QoS;

    fn msg(topic: &str, pkid: u16, payload: &[u8]) -> Publish {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.pkid = pkid;
        p
    }

    fn pkids(acks: &[Publish]) -> Vec<u16> {
        acks.iter().map(|p| p.pkid).collect()
    }

    fn command_id(a: Arrival) -> u64 {
        match a {
            Arrival::Command { id, .. } => id,
            other => panic!("not a command: {other:?}"),
        }
    }

    #[test]
    fn acks_go_out_in_arrival_order_even_when_commands_finish_out_of_order() {
        let mut inbox = Inbox::new();
        inbox.connected(1, false, b"n".to_vec());
        let a = command_id(inbox.arrived(msg("r/a/set", 1, b"on"), true, false));
        let b = command_id(inbox.arrived(msg("r/b/set", 2, b"on"), true, false));
        assert_eq!(inbox.arrived(msg("other", 3, b"x"), false, false), Arrival::Other);
        assert!(inbox.ready().is_empty(), "command 1 is still being applied");
        assert!(inbox.finished(b, true).is_empty(), "2 may not overtake 1");
        assert_eq!(pkids(&inbox.finished(a, true)), vec![1, 2, 3]);
    }

    #[test]
    fn a_command_the_relay_gave_up_on_stays_unacked_and_does_not_block_later_acks() {
        let mut inbox = Inbox::new();
        inbox.connected(1, false, b"n".to_vec());
        let a = command_id(inbox.arrived(msg("r/a/set", 1, b"on"), true, false));
        let b = command_id(inbox.arrived(msg("r/a/set", 2, b"off"), true, false));
        inbox.finished(b, true);
        assert_eq!(pkids(&inbox.finished(a, false)), vec![2]);
    }

    #[test]
    fn a_command_from_an_earlier_connection_is_never_acked_on_a_later_one() {
        let mut inbox = Inbox::new();
        inbox.connected(1, true, b"n1".to_vec());
        let a = command_id(inbox.arrived(msg("r/a/set", 7, b"on"), true, false));
        inbox.disconnected();
        inbox.connected(2, true, b"n2".to_vec());
        let b = command_id(inbox.arrived(msg("r/a/set", 7, b"on"), true, false));
        assert!(inbox.finished(a, true).is_empty(), "its connection is gone");
        assert_eq!(pkids(&inbox.finished(b, true)), vec![7]);
    }

    #[test]
    fn on_a_resumed_session_commands_before_the_echo_are_backlog_and_the_echo_ends_it() {
        let mut inbox = Inbox::new();
        assert!(!inbox.connected(1, true, b"abc".to_vec()));
        assert_eq!(inbox.arrived(msg("r/a/set", 1, b"toggle"), true, false), Arrival::Command { id: 1, backlog: true });
        assert_eq!(inbox.arrived(msg("sync", 2, b"old"), false, true), Arrival::Echo { caught_up: false });
        assert!(inbox.waiting(), "an earlier connection's nonce does not end catch-up");
        assert_eq!(inbox.arrived(msg("sync", 3, b"abc"), false, true), Arrival::Echo { caught_up: true });
        assert_eq!(inbox.arrived(msg("r/a/set", 4, b"on"), true, false), Arrival::Command { id: 4, backlog: false });
        assert!(!inbox.echo_missing());
    }

    #[test]
    fn a_new_session_has_no_backlog_and_the_echo_is_just_acked() {
        let mut inbox = Inbox::new();
        assert!(inbox.connected(1, false, b"abc".to_vec()));
        assert_eq!(inbox.arrived(msg("r/a/set", 1, b"on"), true, false), Arrival::Command { id: 1, backlog: false });
        assert!(inbox.echo_missing());
        assert_eq!(inbox.arrived(msg("sync", 2, b"abc"), false, true), Arrival::Echo { caught_up: false });
        assert!(!inbox.echo_missing());
        assert!(!inbox.give_up_waiting(), "nothing was waiting");
    }

    #[test]
    fn giving_up_on_the_echo_ends_the_backlog() {
        let mut inbox = Inbox::new();
        inbox.connected(1, true, b"abc".to_vec());
        assert!(inbox.give_up_waiting());
        assert!(inbox.echo_missing());
        assert_eq!(inbox.arrived(msg("r/a/set", 1, b"on"), true, false), Arrival::Command { id: 1, backlog: false });
        assert!(!inbox.give_up_waiting());
    }
}
