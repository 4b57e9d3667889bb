//! The rules that make a relay command take effect at most once and keep a
//! backlog of queued commands from flapping a relay (DESIGN: Command rules).
//! Sans-IO: it is told what arrived and what was applied, and answers what
//! to do; it never touches a pin, a file, the outbox or a clock. The Relay
//! actor persists what [`CommandGate::remembered`] returns (in the outbox's
//! database, with the command's record: see `saved_relays`) and applies the
//! verdicts.
//!
//! # Rules, in the order they are checked
//!
//! 1. **Redelivery** ([`CommandGate::redelivered`], for every command, valid
//!    or not). A broker redelivers an unacknowledged QoS 1 command with the
//!    same packet id and DUP = 1. The gate remembers, per packet id, a
//!    fingerprint (topic and payload) of the command handled on it in the
//!    current session. DUP = 1 on a packet id whose entry has the same
//!    fingerprint is a redelivery: acknowledge, nothing else. DUP = 0 on a
//!    packet id is a new command, and the old entry is forgotten. The
//!    fingerprint keeps a DUP = 1 command on a reused packet id, whose first
//!    delivery never reached us, from being taken for the older command.
//!    The entries are cleared when the broker reports no session.
//! 2. **Refused** commands (the caller parses and checks them) get their
//!    `error` recorded; once it is durable the caller calls
//!    [`CommandGate::handled`], so a redelivery does not add a second one.
//!
//! Then [`CommandGate::admit`], for a valid command:
//!
//! 3. **By id.** A command whose `id` is among the [`REMEMBERED_IDS`] most
//!    recently applied ids (all relays) is [`Verdict::AlreadyApplied`].
//! 4. **Backlog.** A plain command (no `id`) that arrived as backlog (queued
//!    by the broker while the agent was offline) is held, one per relay:
//!    [`Verdict::Held`], naming the earlier held command it supersedes. The
//!    held commands are taken with [`CommandGate::take_held`] once the
//!    backlog is over. Any command applied to a relay discards what is held
//!    for it (the applied one is newer).
//! 5. Otherwise [`Verdict::Apply`]; once the pin switched, the caller calls
//!    [`CommandGate::applied`] and persists before acknowledging.
//!
//! # What is persisted
//!
//! Every change to what the gate remembers is also journaled as a
//! [`GateChange`]; the Relay takes them with [`CommandGate::take_changes`]
//! and `saved_relays` writes each as a small value of its own, so a command
//! costs the same few bytes on disk whether the gate remembers 2 ids or 256
//! and 5 packet ids or 60,000 (issue #8: the whole memory, written as one
//! JSON value per command, grew with every command of a session).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::proto::{Action, Command};

/// How many applied command ids are remembered (all relays together).
pub const REMEMBERED_IDS: usize = 256;

/// A stable 64-bit fingerprint of a command on the wire (FNV-1a over the
/// topic, a separator byte that UTF-8 text never holds, and the payload).
/// Stable across processes and builds, since it is persisted.
pub fn fingerprint(topic: &str, payload: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in topic.as_bytes().iter().chain(&[0xff]).chain(payload) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// One change to what the gate remembers, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateChange {
    /// A command id was applied (and is remembered from now on).
    Applied(String),
    /// What was handled on a packet id of this session: its fingerprint,
    /// or `None` when a new command on it (DUP = 0) made the gate forget.
    Session { pkid: u16, fingerprint: Option<u64> },
    /// The broker reported no session: every packet id is forgotten.
    SessionLost,
}

/// The command handled on one packet id of the current session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    pub pkid: u16,
    pub fingerprint: u64,
}

/// A plain backlog command waiting for the backlog to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub relay: String,
    pub action: Action,
    /// The topic it came on (quoted if applying it fails).
    pub topic: String,
}

/// One command as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    pub topic: &'a str,
    pub pkid: u16,
    pub dup: bool,
    pub backlog: bool,
    pub fingerprint: u64,
}

/// What to do with a valid command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its `id` was applied before: acknowledge; nothing switches.
    AlreadyApplied,
    /// Held until the backlog is over; acknowledge at once. `superseded` is
    /// the earlier held command for the same relay, now dropped unapplied.
    Held { superseded: Option<Held> },
    /// Switch, call [`CommandGate::applied`], persist, record, acknowledge.
    Apply,
}

/// What the gate remembers; see the module doc.
#[derive(Debug, Clone, Default)]
pub struct CommandGate {
    /// Applied command ids, oldest first, at most [`REMEMBERED_IDS`].
    ids: VecDeque<String>,
    /// Packet id -> fingerprint of the command handled on it this session.
    session: BTreeMap<u16, u64>,
    /// Relay -> its held plain backlog command. Not persisted: it is
    /// acknowledged already, and a crash loses it (DESIGN: Command rules).
    held: BTreeMap<String, Held>,
    /// Changes not yet taken by [`CommandGate::take_changes`].
    changes: Vec<GateChange>,
}

impl CommandGate {
    /// A gate that remembers what a previous run persisted.
    pub fn restore(ids: &[String], session: &[SessionEntry]) -> CommandGate {
        let skip = ids.len().saturating_sub(REMEMBERED_IDS);
        CommandGate {
            ids: ids.iter().skip(skip).cloned().collect(),
            session: session.iter().map(|e| (e.pkid, e.fingerprint)).collect(),
            held: BTreeMap::new(),
            changes: Vec::new(),
        }
    }

    /// Whether `a` is a redelivery of a command already handled on this
    /// session (rule 1). A command with DUP = 0 makes the gate forget what
    /// was handled on its packet id before.
    pub fn redelivered(&mut self, a: &Arrival<'_>) -> bool {
        if a.dup {
            return self.session.get(&a.pkid) == Some(&a.fingerprint);
        }
        if self.session.remove(&a.pkid).is_some() {
            self.changes.push(GateChange::Session { pkid: a.pkid, fingerprint: None });
        }
        false
    }

    /// Decides what to do with a valid command that is not a redelivery
    /// (rules 3 to 5).
    pub fn admit(&mut self, a: &Arrival<'_>, cmd: &Command) -> Verdict {
        if let Some(id) = &cmd.id {
            if self.ids.contains(id) {
                self.handled(a.pkid, a.fingerprint);
                return Verdict::AlreadyApplied;
            }
        } else if a.backlog {
            self.handled(a.pkid, a.fingerprint);
            let held = Held { relay: cmd.relay.clone(), action: cmd.action, topic: a.topic.to_string() };
            let superseded = self.held.insert(cmd.relay.clone(), held);
            return Verdict::Held { superseded };
        }
        Verdict::Apply
    }

    /// A command on `pkid` was handled (its `error` is durable, or it was
    /// judged a duplicate): a redelivery of it is acknowledged and ignored.
    pub fn handled(&mut self, pkid: u16, fingerprint: u64) {
        if self.session.insert(pkid, fingerprint) != Some(fingerprint) {
            self.changes.push(GateChange::Session { pkid, fingerprint: Some(fingerprint) });
        }
    }

    /// The command switched its relay: remember its id and packet id, and
    /// drop the held command for that relay (returned), which is older.
    pub fn applied(&mut self, cmd: &Command, pkid: u16, fingerprint: u64) -> Option<Held> {
        if let Some(id) = &cmd.id
            && !self.ids.contains(id)
        {
            self.ids.push_back(id.clone());
            self.changes.push(GateChange::Applied(id.clone()));
            while self.ids.len() > REMEMBERED_IDS {
                self.ids.pop_front();
            }
        }
        self.handled(pkid, fingerprint);
        self.held.remove(&cmd.relay)
    }

    /// The broker has no session for us: no command can be redelivered, so
    /// the packet ids are forgotten. Returns whether any were remembered.
    pub fn session_lost(&mut self) -> bool {
        let had = !self.session.is_empty();
        self.session.clear();
        if had {
            self.changes.push(GateChange::SessionLost);
        }
        had
    }

    /// The backlog is over: the held commands, by relay name.
    pub fn take_held(&mut self) -> Vec<Held> {
        std::mem::take(&mut self.held).into_values().collect()
    }

    /// The changes since the last call, oldest first, for the caller to
    /// persist (see the module doc: What is persisted).
    pub fn take_changes(&mut self) -> Vec<GateChange> {
        std::mem::take(&mut self.changes)
    }

    /// Everything remembered: the applied ids (oldest first) and the
    /// session's packet ids.
    #[cfg(test)]
    pub fn remembered(&self) -> (Vec<String>, Vec<SessionEntry>) {
        let session = self.session.iter().map(|(&pkid, &fingerprint)| SessionEntry { pkid, fingerprint }).collect();
        (self.ids.iter().cloned().collect(), session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::RelayState;

    const TOPIC: &str = "fl/pi/relay/pump/set";

    fn plain(action: Action) -> Command {
        Command { relay: "pump".into(), action, id: None }
    }

    fn json(id: &str, action: Action) -> Command {
        Command { relay: "pump".into(), action, id: Some(id.into()) }
    }

    fn arrival(payload: &str, pkid: u16, dup: bool, backlog: bool) -> Arrival<'static> {
        Arrival { topic: TOPIC, pkid, dup, backlog, fingerprint: fingerprint(TOPIC, payload.as_bytes()) }
    }

    /// What the Relay makes of a delivery.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Redelivered,
        Refused,
        Judged(Verdict),
    }
    use Outcome::{Judged, Redelivered, Refused};

    /// Runs a command through the gate the way the Relay does (applying it
    /// when told to); `None` is a refused one.
    fn deliver(
        gate: &mut CommandGate,
        cmd: Option<&Command>,
        payload: &str,
        pkid: u16,
        dup: bool,
        backlog: bool,
    ) -> Outcome {
        let a = arrival(payload, pkid, dup, backlog);
        if gate.redelivered(&a) {
            return Redelivered;
        }
        let Some(cmd) = cmd else {
            return Refused;
        };
        let v = gate.admit(&a, cmd);
        if v == Verdict::Apply {
            gate.applied(cmd, pkid, a.fingerprint);
        }
        Judged(v)
    }

    const APPLY: Outcome = Judged(Verdict::Apply);
    const ALREADY: Outcome = Judged(Verdict::AlreadyApplied);

    #[test]
    fn a_redelivered_plain_toggle_is_not_applied_twice() {
        let mut gate = CommandGate::default();
        let toggle = plain(Action::Toggle);
        assert_eq!(deliver(&mut gate, Some(&toggle), "toggle", 7, false, false), APPLY);
        assert_eq!(deliver(&mut gate, Some(&toggle), "toggle", 7, true, false), Redelivered);
    }

    #[test]
    fn a_new_command_on_a_reused_packet_id_is_applied() {
        let mut gate = CommandGate::default();
        let toggle = plain(Action::Toggle);
        assert_eq!(deliver(&mut gate, Some(&toggle), "toggle", 7, false, false), APPLY);
        // The broker reuses packet id 7 for the next toggle: DUP = 0.
        assert_eq!(deliver(&mut gate, Some(&toggle), "toggle", 7, false, false), APPLY);
        // ... and redelivers that one: it is the one remembered now.
        assert_eq!(deliver(&mut gate, Some(&toggle), "toggle", 7, true, false), Redelivered);
    }

    #[test]
    fn a_first_delivery_with_dup_set_is_applied() {
        let mut gate = CommandGate::default();
        let on = plain(Action::Set(RelayState::On));
        // The DUP = 0 delivery never reached us (the link dropped).
        assert_eq!(deliver(&mut gate, Some(&on), "on", 3, true, false), APPLY);
        assert_eq!(deliver(&mut gate, Some(&on), "on", 3, true, false), Redelivered);
    }

    #[test]
    fn a_dup_command_on_a_packet_id_remembered_for_another_command_is_applied() {
        let mut gate = CommandGate::default();
        assert_eq!(deliver(&mut gate, Some(&plain(Action::Set(RelayState::On))), "on", 3, false, false), APPLY);
        // Packet id 3 was reused for "off", whose DUP = 0 delivery was lost.
        let off = plain(Action::Set(RelayState::Off));
        assert_eq!(deliver(&mut gate, Some(&off), "off", 3, true, false), APPLY);
    }

    #[test]
    fn two_redelivered_commands_with_ids_are_each_applied_once() {
        let mut gate = CommandGate::default();
        let a = json("A", Action::Set(RelayState::On));
        let b = json("B", Action::Set(RelayState::Off));
        assert_eq!(deliver(&mut gate, Some(&a), "A", 1, false, false), APPLY);
        assert_eq!(deliver(&mut gate, Some(&b), "B", 2, false, false), APPLY);
        // Redelivered on a new session (packet ids forgotten), even DUP = 0.
        gate.session_lost();
        assert_eq!(deliver(&mut gate, Some(&a), "A", 9, false, false), ALREADY);
        assert_eq!(deliver(&mut gate, Some(&b), "B", 10, true, false), ALREADY);
        // And once more on the same session: now a plain redelivery.
        assert_eq!(deliver(&mut gate, Some(&b), "B", 10, true, false), Redelivered);
    }

    #[test]
    fn the_remembered_ids_are_the_256_most_recent_across_restarts() {
        let mut gate = CommandGate::default();
        for i in 0..300 {
            let c = json(&format!("c{i}"), Action::Toggle);
            assert_eq!(deliver(&mut gate, Some(&c), &format!("c{i}"), 1, false, false), APPLY);
        }
        let (ids, session) = gate.remembered();
        assert_eq!(ids.len(), REMEMBERED_IDS);
        assert_eq!(ids.first().map(String::as_str), Some("c44"));
        let mut again = CommandGate::restore(&ids, &session);
        let c = |id: &str| json(id, Action::Toggle);
        assert_eq!(deliver(&mut again, Some(&c("c299")), "c299", 2, false, false), ALREADY);
        assert_eq!(deliver(&mut again, Some(&c("c44")), "c44", 3, false, false), ALREADY);
        // Forgotten: the oldest ids fell out of the bound.
        assert_eq!(deliver(&mut again, Some(&c("c43")), "c43", 4, false, false), APPLY);
    }

    #[test]
    fn redeliveries_are_recognised_after_a_restart_on_the_same_session_but_not_after_the_session_is_lost() {
        let mut gate = CommandGate::default();
        let toggle = plain(Action::Toggle);
        assert_eq!(deliver(&mut gate, Some(&toggle), "toggle", 5, false, false), APPLY);
        let (ids, session) = gate.remembered();
        let mut restarted = CommandGate::restore(&ids, &session);
        assert_eq!(deliver(&mut restarted, Some(&toggle), "toggle", 5, true, false), Redelivered);
        assert!(restarted.session_lost(), "there was a packet id to forget");
        assert!(!restarted.session_lost(), "nothing left to forget");
        assert_eq!(deliver(&mut restarted, Some(&toggle), "toggle", 5, true, false), APPLY);
    }

    #[test]
    fn three_hundred_queued_plain_toggles_leave_one_held_command() {
        let mut gate = CommandGate::default();
        let toggle = plain(Action::Toggle);
        let mut superseded = 0;
        for pkid in 1..=300 {
            match deliver(&mut gate, Some(&toggle), "toggle", pkid, false, true) {
                Judged(Verdict::Held { superseded: Some(_) }) => superseded += 1,
                Judged(Verdict::Held { superseded: None }) => {}
                other => panic!("a plain backlog command is held, not {other:?}"),
            }
        }
        assert_eq!(superseded, 299);
        let held = gate.take_held();
        assert_eq!(held, vec![Held { relay: "pump".into(), action: Action::Toggle, topic: TOPIC.into() }]);
        assert!(gate.take_held().is_empty(), "taken once");
    }

    #[test]
    fn a_backlog_command_with_an_id_is_applied_at_once_and_discards_the_held_plain_command() {
        let mut gate = CommandGate::default();
        let toggle = plain(Action::Toggle);
        assert!(matches!(deliver(&mut gate, Some(&toggle), "toggle", 1, false, true), Judged(Verdict::Held { .. })));
        let on = json("J", Action::Set(RelayState::On));
        let a = arrival("J", 2, false, true);
        assert!(!gate.redelivered(&a));
        assert_eq!(gate.admit(&a, &on), Verdict::Apply);
        let dropped = gate.applied(&on, 2, a.fingerprint);
        assert_eq!(dropped.map(|h| h.action), Some(Action::Toggle));
        assert!(gate.take_held().is_empty(), "the held toggle is older than the applied command");
    }

    #[test]
    fn held_commands_are_kept_per_relay() {
        let mut gate = CommandGate::default();
        let mut fan = plain(Action::Set(RelayState::On));
        fan.relay = "fan".into();
        deliver(&mut gate, Some(&plain(Action::Set(RelayState::Off))), "off", 1, false, true);
        deliver(&mut gate, Some(&fan), "on", 2, false, true);
        let held: Vec<(String, Action)> = gate.take_held().into_iter().map(|h| (h.relay, h.action)).collect();
        assert_eq!(
            held,
            vec![("fan".into(), Action::Set(RelayState::On)), ("pump".into(), Action::Set(RelayState::Off))]
        );
    }

    #[test]
    fn a_redelivered_refusal_is_acknowledged_without_a_second_error() {
        let mut gate = CommandGate::default();
        assert_eq!(deliver(&mut gate, None, "maybe", 4, false, false), Refused);
        gate.handled(4, fingerprint(TOPIC, b"maybe"));
        assert_eq!(deliver(&mut gate, None, "maybe", 4, true, false), Redelivered);
    }

    #[test]
    fn a_refusal_whose_error_was_not_recorded_is_refused_again_when_redelivered() {
        let mut gate = CommandGate::default();
        assert_eq!(deliver(&mut gate, None, "maybe", 4, false, false), Refused);
        // No `handled`: the error never became durable.
        assert_eq!(deliver(&mut gate, None, "maybe", 4, true, false), Refused);
    }

    #[test]
    fn a_redelivered_backlog_toggle_that_is_held_is_not_held_twice() {
        let mut gate = CommandGate::default();
        let toggle = plain(Action::Toggle);
        let first = deliver(&mut gate, Some(&toggle), "toggle", 8, false, true);
        assert_eq!(first, Judged(Verdict::Held { superseded: None }));
        assert_eq!(deliver(&mut gate, Some(&toggle), "toggle", 8, true, true), Redelivered);
        assert_eq!(gate.take_held().len(), 1);
    }

    #[test]
    fn fingerprints_differ_by_topic_and_payload_and_are_stable() {
        assert_ne!(fingerprint("a/relay/x/set", b"on"), fingerprint("a/relay/y/set", b"on"));
        assert_ne!(fingerprint(TOPIC, b"on"), fingerprint(TOPIC, b"off"));
        // FNV-1a of the empty topic, the separator and an empty payload:
        // persisted values must never change meaning.
        assert_eq!(fingerprint("", b""), (0xcbf2_9ce4_8422_2325_u64 ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3));
    }
}
