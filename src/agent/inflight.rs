//! Which outbox record each MQTT packet id carries, sans-IO.
//!
//! rumqttc's `publish()` returns no packet id (rumqtt issues #349, #1007), so
//! the Link correlates by order: requests are processed FIFO, and each one
//! surfaces as `Outgoing::Publish(pkid)` in submission order. This tracker
//! mirrors rumqttc's own state (`state.rs`): `outgoing_pub` (waiting for
//! PUBACK or PUBREC) and `outgoing_rel` (QoS 2, waiting for PUBCOMP) are
//! separate, because rumqttc can reuse a pkid for a new publish while the old
//! one is still being released.
//!
//! It never touches the network or the outbox; the Link feeds it events and
//! acts on what it returns. A sequence it cannot explain is reported as
//! [`Desync`] rather than guessed at: the Link then starts a fresh connection
//! and replays from the outbox, which may duplicate but never loses.

use std::collections::{HashMap, HashSet, VecDeque};

/// What a submitted publish was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// An outbox record, by seq; acked records are removed from the outbox.
    Record(u64),
    /// A publish outside the outbox (the `status` topic), by caller's tag.
    Other(u64),
}

/// An event the tracker cannot explain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Desync {
    #[error("publish with packet id {0} was written but nothing was submitted")]
    NothingSubmitted(u16),
    #[error("packet id {0} was reused while still in flight")]
    PkidInUse(u16),
}

#[derive(Debug, Default)]
pub struct Inflight {
    /// Submitted to the client, not yet written (no pkid yet), in order.
    queued: VecDeque<Slot>,
    /// Written; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    publishing: HashMap<u16, Slot>,
    /// QoS 2 after PUBREC; waiting for PUBCOMP.
    releasing: HashMap<u16, Slot>,
    /// After a session resume: pkids rumqttc will write again.
    retransmit: HashSet<u16>,
}

impl Inflight {
    pub fn new() -> Inflight {
        Inflight::default()
    }

    /// A publish was handed to the client (`try_publish` returned Ok).
    pub fn submitted(&mut self, slot: Slot) {
        self.queued.push_back(slot);
    }

    /// Publishes not yet completed, including those not yet written.
    pub fn outstanding(&self) -> usize {
        self.queued.len() + self.publishing.len() + self.releasing.len()
    }

    /// `Outgoing::Publish(pkid)`: a publish was written to the socket.
    pub fn on_outgoing_publish(&mut self, pkid: u16) -> Result<(), Desync> {
        if self.retransmit.remove(&pkid) {
            return Ok(());
        }
        if self.publishing.contains_key(&pkid) {
            return Err(Desync::PkidInUse(pkid));
        }
        let slot = self.queued.pop_front().ok_or(Desync::NothingSubmitted(pkid))?;
        self.publishing.insert(pkid, slot);
        Ok(())
    }

    /// `Incoming::PubAck(pkid)`: a QoS 1 publish is delivered.
    pub fn on_puback(&mut self, pkid: u16) -> Option<Slot> {
        self.retransmit.remove(&pkid);
        self.publishing.remove(&pkid)
    }

    /// `Incoming::PubRec(pkid)`: a QoS 2 publish moves to its release phase.
    pub fn on_pubrec(&mut self, pkid: u16) {
        self.retransmit.remove(&pkid);
        if let Some(slot) = self.publishing.remove(&pkid) {
            self.releasing.insert(pkid, slot);
        }
    }

    /// `Incoming::PubComp(pkid)`: a QoS 2 publish is delivered.
    pub fn on_pubcomp(&mut self, pkid: u16) -> Option<Slot> {
        self.releasing.remove(&pkid)
    }

    /// ConnAck with `session_present = true`: rumqttc resends its unacked
    /// publishes with their original pkids, then its PUBRELs, then what was
    /// still queued (which gets new pkids, in order).
    pub fn session_resumed(&mut self) {
        self.retransmit = self.publishing.keys().copied().collect();
    }

    /// ConnAck with `session_present = false` (or a fresh client): rumqttc
    /// dropped everything pending, so nothing is in flight any more. Returns
    /// how many publishes were forgotten; their records must be replayed.
    pub fn session_lost(&mut self) -> usize {
        let n = self.outstanding();
        *self = Inflight::default();
        n
    }

    /// Whether a record is submitted or in flight.
    pub fn holds_record(&self, seq: u64) -> bool {
        let slot = Slot::Record(seq);
        self.queued.contains(&slot)
            || self.publishing.values().any(|s| *s == slot)
            || self.releasing.values().any(|s| *s == slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(t: &mut Inflight, seqs: &[u64]) {
        for &s in seqs {
            t.submitted(Slot::Record(s));
        }
    }

    #[test]
    fn acks_map_back_to_the_records_in_submission_order() {
        let mut t = Inflight::new();
        submit(&mut t, &[10, 11, 12]);
        for pkid in [1, 2, 3] {
            t.on_outgoing_publish(pkid).expect("explained");
        }
        assert_eq!(t.on_puback(2), Some(Slot::Record(11)));
        assert_eq!(t.on_puback(1), Some(Slot::Record(10)));
        assert_eq!(t.on_puback(3), Some(Slot::Record(12)));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn status_publishes_interleave_without_shifting_records() {
        let mut t = Inflight::new();
        t.submitted(Slot::Other(1));
        submit(&mut t, &[5]);
        t.on_outgoing_publish(7).expect("explained");
        t.on_outgoing_publish(8).expect("explained");
        assert_eq!(t.on_puback(8), Some(Slot::Record(5)));
        assert_eq!(t.on_puback(7), Some(Slot::Other(1)));
    }

    #[test]
    fn qos2_records_complete_only_on_pubcomp() {
        let mut t = Inflight::new();
        submit(&mut t, &[1]);
        t.on_outgoing_publish(1).expect("explained");
        t.on_pubrec(1);
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.on_puback(1), None);
        assert_eq!(t.on_pubcomp(1), Some(Slot::Record(1)));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_pkid_reused_while_its_predecessor_is_being_released_is_tracked_apart() {
        let mut t = Inflight::new();
        submit(&mut t, &[1, 2]);
        t.on_outgoing_publish(4).expect("explained");
        t.on_pubrec(4);
        t.on_outgoing_publish(4).expect("pkid 4 is free in outgoing_pub");
        assert_eq!(t.on_pubcomp(4), Some(Slot::Record(1)));
        assert_eq!(t.on_puback(4), Some(Slot::Record(2)));
    }

    #[test]
    fn a_resumed_session_retransmits_with_old_pkids_then_sends_the_queue() {
        let mut t = Inflight::new();
        submit(&mut t, &[1, 2, 3]);
        t.on_outgoing_publish(1).expect("explained");
        t.on_outgoing_publish(2).expect("explained");
        t.session_resumed();
        t.on_outgoing_publish(2).expect("retransmission");
        t.on_outgoing_publish(1).expect("retransmission");
        t.on_outgoing_publish(3).expect("the queued one");
        assert_eq!(t.on_puback(3), Some(Slot::Record(3)));
        assert_eq!(t.on_puback(1), Some(Slot::Record(1)));
        assert_eq!(t.on_puback(2), Some(Slot::Record(2)));
    }

    #[test]
    fn a_lost_session_forgets_everything_in_flight() {
        let mut t = Inflight::new();
        submit(&mut t, &[1, 2]);
        t.on_outgoing_publish(1).expect("explained");
        assert!(t.holds_record(2));
        assert_eq!(t.session_lost(), 2);
        assert_eq!(t.outstanding(), 0);
        assert!(!t.holds_record(1));
        assert_eq!(t.on_puback(1), None, "a late ack from the old session is ignored");
    }

    #[test]
    fn a_write_with_nothing_submitted_is_a_desync_not_a_guess() {
        let mut t = Inflight::new();
        assert_eq!(t.on_outgoing_publish(3), Err(Desync::NothingSubmitted(3)));
        submit(&mut t, &[1, 2]);
        t.on_outgoing_publish(3).expect("explained");
        assert_eq!(t.on_outgoing_publish(3), Err(Desync::PkidInUse(3)));
    }
}
