//! The delivery state of the Link, sans-IO: which records are in flight under
//! which MQTT packet id, what to send next, and when a record may leave the
//! outbox. Driven by events (a connection attempt, its ConnAck, rumqttc's
//! events, durable marks, read results) and returning [`Action`]s for the Link
//! to perform. It never touches the network, the outbox, a clock or a thread,
//! and it must never return [`Action::Remove`] for a record the broker has not
//! acknowledged under the packet id that record was written with
//! (`confirm = "broker"`), or that the hub has not confirmed
//! (`confirm = "hub"`, see Confirmation by the hub).
//!
//! # Packet ids are ours
//!
//! rumqttc 0.25.1 numbers a publish itself (`state.rs` `outgoing_publish`:
//! `if publish.pkid == 0 { publish.pkid = self.next_pkid() }`), and
//! `AsyncClient::try_publish` cannot hand it a packet id (`client.rs`
//! `try_publish` builds `Publish::new`, packet id 0; the request channel is
//! private). So this state keeps its own counter that `next_pkid`
//! (`state.rs` 486-498: `1, 2, ..., max_inflight, 1, ...`, advanced by each
//! numbered QoS 1/2 publish and each SUBSCRIBE) follows step for step, on a
//! fresh rumqttc `MqttState` per connection (its counter starts at 0). A
//! submission's packet id is fixed when it is handed to the request channel,
//! and it is *checked*: rumqttc reports every write as `Outgoing::Publish(p)` /
//! `Outgoing::Subscribe(p)` in write order, and each must match the next
//! expected packet id. An acknowledgement is trusted only for a slot whose
//! write was confirmed on the current connection, in the phase that expects it.
//! Anything else (a wrong id, `Outgoing::AwaitAck`, an ack for an empty slot)
//! is a [`Desync`]: the Link drops the connection and resends from this state;
//! nothing is removed.
//!
//! * A packet id is used again only after its PUBACK (QoS 1), PUBCOMP (QoS 2)
//!   or SUBACK. When the counter's next id is still in use, submissions wait
//!   until it is free (rumqttc would otherwise park the publish as a
//!   collision, `state.rs` `outgoing_publish`).
//! * rumqttc's own window (`max_inflight`, [`rumqttc_inflight`]) is set far
//!   above what this state ever has outstanding, so its request gate
//!   (`eventloop.rs` `select`: `!inflight_full && !collision`) never closes.
//!
//! # Sessions
//!
//! Before each connection attempt the Link asks [`Delivery::connecting`] for
//! the requests to put into the new EventLoop's `pending`: in seq order, a
//! `Publish` with the same packet id (DUP set if it was written before) for
//! each record in flight, up to and including the first QoS 2 one (see
//! below). rumqttc drops `pending` itself when the ConnAck says
//! `session_present = false` (`eventloop.rs` `poll`); this state then
//! forgets every slot and replays from the oldest record in the outbox. The
//! `status` and sync publishes and the SUBSCRIBE belong to one connection:
//! they are not resent (the next connection sends fresh ones), and their
//! packet ids are free again at the next attempt (a QoS 1 publish leaves no
//! state in the broker).
//!
//! # QoS 2 across a reconnect: the PUBLISH is resent, not the PUBREL
//!
//! MQTT 3.1.1 §4.4 (MQTT-4.4.0-1) says a client resumes a QoS 2 exchange
//! that got its PUBREC by resending the PUBREL. We deviate: a QoS 2 record
//! that was waiting for its PUBCOMP is resent as a DUP `Publish` with the
//! same packet id and goes back to waiting for its PUBREC; the normal
//! PUBREC -> PUBREL -> PUBCOMP follows. The reason is the embedded broker,
//! rumqttd 0.20 (paths under `rumqttd-0.20.0/src`): it keeps a received
//! QoS 2 message only in the connection's `AckLog`, created per connection
//! (`router/routing.rs:336`) and removed at the disconnect
//! (`router/routing.rs:459`); the session it saves keeps only *outgoing*
//! PUBRELs (`router/routing.rs:518-523`). A PUBREL releases whatever message
//! is oldest in that log, ignoring its packet id (`router/logs.rs:414-418`),
//! and with an empty log the client is disconnected without a word
//! (`router/routing.rs:813-819`). A resent PUBREL therefore got the agent
//! disconnected on every attempt, forever, and the message was gone
//! (`tests/chaos.rs` section 9 shows it on the wire).
//!
//! A resent PUBLISH works with both kinds of broker:
//!
//! * one that still holds the packet id awaiting PUBREL (mosquitto; §4.3.3,
//!   MQTT-4.3.3-2: it answers PUBREC and must not deliver it twice) delivers
//!   it once, on our PUBREL;
//! * one that forgot it at the disconnect (rumqttd) takes it as new and
//!   delivers it once, on our PUBREL.
//!
//! The price: a broker that had already *completed* the exchange (our PUBREL
//! arrived, its PUBCOMP was lost) and forgot the id takes the DUP PUBLISH as
//! a new message and delivers it a second time. QoS 2 records are thereby
//! at-least-once across a cut between PUBREL and PUBCOMP, like QoS 1 ones;
//! the hub stores each `(device, epoch, seq)` once. Nothing is ever removed
//! before the PUBCOMP of its own packet id.
//!
//! A record resent this way waits for its PUBREC again, and nothing may
//! overtake it (see Order). So only the resends up to and including the
//! first QoS 2 record go into `pending`; the ones after it go back to the
//! front of the queue and are submitted again, as new publications under
//! fresh packet ids (rumqttc's channel cannot carry our ids), after its
//! PUBREC. They are always QoS 1 records (one QoS 2 record in flight at a
//! time, see Order), for which a broker keeps nothing per packet id, so a
//! new id is the same to it as a DUP resend. Moving a QoS 2 record to a
//! fresh id would leave its old copy stored in a mosquitto-like broker,
//! taking one of the client's incoming slots (`max_inflight_messages`)
//! until the id is reused.
//!
//! # Confirmation by the hub
//!
//! With [`Confirm::Hub`] a broker's ack only says the broker has the
//! message; the broker may still lose it (killed without persistence, or
//! the embedded broker dying with the hub) and the hub may crash before its
//! commit. So a record leaves the outbox only when the hub's `P/D/ack`
//! ([`StoredAck`]) names its identity, `(epoch, seq)` as its payload
//! carries them ([`proto::identity`]; not the outbox key, which differs for
//! records replayed from a salvaged database):
//!
//! * Each record submitted on this session is indexed by its identity
//!   (`ids`). An ack removes (returns [`Action::Remove`] for) every indexed
//!   record it names, wherever it is: *unconfirmed* (the broker acked it),
//!   in flight (the slot is marked `confirmed`; its broker ack then only
//!   frees the packet id), or back in the queue for a resend. Records it
//!   names that this state has not sent on this session are left alone:
//!   they are read and sent in their turn and confirmed then.
//! * The broker's ack of a record moves it to `unconfirmed`, tagged with
//!   the current resend round. Nothing is resent while it waits.
//! * Resends: after a ConnAck that resumes a session, every unconfirmed
//!   record; at [`Delivery::resend_unconfirmed`] (the Link's confirmation
//!   time-out), those acked in an earlier round, so each waited at least a
//!   whole time-out. They are read back from the outbox (a resend read:
//!   the range of their seqs, keeping only those still unconfirmed; one not
//!   found is gone from the outbox and forgotten) and go into the queue in
//!   seq order, ahead of records never sent, as new publications.
//! * A lost session forgets all of this: everything is read again from the
//!   oldest record, unconfirmed records included.
//! * A record whose payload has no identity can never be named by a hub;
//!   its broker ack removes it, as with [`Confirm::Broker`].
//!
//! # Order
//!
//! Records are read from the outbox at the cursor, in seq order, up to the
//! durable mark, and submitted in that order with at most `window` records in
//! flight. Reads go through the Link ([`Action::Read`]), one at a time, and
//! queue up to [`READ_AHEAD`] records ahead of the window; a result is used
//! only if its token is still current (a lost session invalidates it). The
//! records a commit made durable may come with the durable mark instead
//! ([`Delivery::durable_with`], a [`Fresh`] batch complete for its seq
//! range): they are queued exactly as a read of that range would queue them,
//! only when the cursor is at its start and no read is in flight, and the
//! cursor moves past them; anything else is read. Two rules keep first deliveries in seq order whatever
//! the mix of QoS, the order of acks and the cuts:
//!
//! * No record is submitted while a QoS 2 record waits for its PUBREC:
//!   brokers deliver a QoS 2 message only on PUBREL, which rumqttc sends as
//!   soon as the PUBREC arrives, so a later record written earlier would
//!   overtake it (a QoS 1 one at once).
//! * No QoS 2 record is submitted while another one is in flight (until its
//!   PUBCOMP). Two QoS 2 records in flight could otherwise be released in
//!   the order their PUBRECs come back, and after a cut the second one would
//!   have to be resent under a fresh packet id (see above).
//!
//! The price is one round trip per QoS 2 record before anything after it
//! goes, and two between consecutive QoS 2 records; QoS 1 records keep the
//! whole window.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rumqttc::{Event, Outgoing, Packet, Publish, QoS, Request, Subscribe, SubscribeFilter};

use crate::config::Confirm;
use crate::outbox::{Fresh, Record};
use crate::proto::{self, Qos, StoredAck};

/// The most records waiting to be submitted that a [`Fresh`] batch may
/// bring the queue to (what would go beyond is left to reads).
pub const READY_MAX: usize = 4096;

/// How many records a read may queue at most (or the window, if larger).
pub const READ_AHEAD: usize = 256;

/// A message's identity in its payload, `(epoch, seq)` (the device is ours).
pub type Id = (u64, u64);

/// An MQTT packet identifier (1..=65535).
pub type Pkid = u16;

/// rumqttc's `max_inflight` for a Link window of `window` records: the
/// length of the packet-id cycle, and far above anything outstanding (the
/// window plus one SUBSCRIBE and the `status`/sync publishes), so rumqttc's
/// request gate never closes and its counter seldom comes back to an id
/// still in use.
pub fn rumqttc_inflight(window: u16) -> u16 {
    let w = u32::from(window.max(1));
    u16::try_from((4 * (w + 4)).max(64)).unwrap_or(u16::MAX)
}

/// A publish that is not an outbox record. It lives only on the connection
/// it was submitted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// The retained `online` status.
    Online,
    /// The retained `offline` status at shutdown.
    Offline,
    /// The catch-up nonce on `P/D/sync`.
    Sync,
    /// A Home Assistant discovery config (or its removal).
    Discovery,
}

/// Something to put into rumqttc's request channel. rumqttc numbers it.
#[derive(Debug, Clone, PartialEq)]
pub enum Submit {
    Publish {
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    },
    /// One SUBSCRIBE for all these filters, each at QoS 1.
    Subscribe(Vec<String>),
}

impl Submit {
    /// The request `AsyncClient::try_publish` / `try_subscribe_many` put into
    /// the channel for this (`client.rs`): packet id 0, DUP clear.
    pub fn to_request(&self) -> Request {
        match self {
            Submit::Publish { topic, qos, retain, payload } => {
                let mut p = Publish::new(topic.as_str(), *qos, payload.clone());
                p.retain = *retain;
                Request::Publish(p)
            }
            Submit::Subscribe(filters) => Request::Subscribe(Subscribe::new_many(subscribe_filters(filters))),
        }
    }
}

/// The filters of a [`Submit::Subscribe`], as rumqttc takes them.
pub fn subscribe_filters(filters: &[String]) -> Vec<SubscribeFilter> {
    filters.iter().map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)).collect()
}

/// What the Link does after the first things of a connection are queued.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    Subscribe(Vec<String>),
    Publish(Tag, Submit),
}

/// What the Link must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Put this into the current connection's request channel.
    Submit(Submit),
    /// Read up to `limit` records with `from <= seq <= upto` and hand them to
    /// [`Delivery::records`] with this token.
    Read { token: u64, from: u64, upto: u64, limit: usize },
    /// The record may leave the outbox: the broker acknowledged it
    /// (`confirm = "broker"`) or the hub confirmed it (`confirm = "hub"`).
    Remove(u64),
    /// The broker acknowledged this tagged publish.
    Done(Tag),
    /// Drop the current connection (log the reason at error level) and
    /// connect again; nothing is lost.
    Reconnect(Desync),
}

/// rumqttc and this state disagree: the connection is dropped and resent
/// from this state. Should never happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Desync {
    #[error("rumqttc wrote {kind} with packet id {written} where {expected} was expected")]
    WrongWrite { kind: &'static str, written: Pkid, expected: String },
    #[error("rumqttc parked the publish with packet id {0} behind a packet-id collision")]
    Collision(Pkid),
    #[error("{kind} for packet id {pkid}, which holds nothing waiting for it")]
    UnexpectedAck { kind: &'static str, pkid: Pkid },
    #[error("the request channel did not take a submission")]
    NotSubmitted,
}

/// What [`Delivery::connected`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Connected {
    /// Records that were in flight and are replayed from the outbox because
    /// the broker kept no session.
    pub forgotten: usize,
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for PUBACK (QoS 1), PUBREC (QoS 2) or SUBACK.
    Ack,
    /// QoS 2: PUBREC came, PUBREL is (re)sent, waiting for PUBCOMP.
    Comp,
}

#[derive(Debug, Clone)]
enum What {
    Record(Record),
    Tag(Tag),
    Subscribe,
}

#[derive(Debug, Clone)]
struct Slot {
    what: What,
    qos: QoS,
    phase: Phase,
    /// Its write was confirmed on the current connection.
    written: bool,
    /// It was written on some connection (the DUP flag of a resend).
    sent: bool,
    /// Hub mode: the record's identity (None: not a JSON payload with a
    /// seq, so no hub can confirm it; its broker ack removes it).
    id: Option<Id>,
    /// Hub mode: the hub confirmed it while it was in flight; it has been
    /// removed already and its broker ack only frees the packet id.
    confirmed: bool,
}

/// The read in flight.
#[derive(Debug, Clone, Copy)]
struct Reading {
    token: u64,
    upto: u64,
    limit: usize,
    /// Reading back unconfirmed records to send again (module doc:
    /// Confirmation by the hub), not from the cursor.
    resend: bool,
}

/// A submission waiting for its packet id.
#[derive(Debug, Clone)]
enum Queued {
    Record(Record),
    Control(Control),
}

/// See the module doc.
#[derive(Debug)]
pub struct Delivery {
    window: usize,
    cycle: Pkid,
    /// rumqttc's `last_pkid` on the current connection.
    counter: Pkid,
    slots: BTreeMap<Pkid, Slot>,
    /// Packet ids of the writes still to be confirmed, in write order.
    expected: VecDeque<Pkid>,
    /// Connection-scoped submissions, sent before records.
    control: VecDeque<Control>,
    /// Records read but not submitted, in seq order.
    ready: VecDeque<Record>,
    /// The next seq to read.
    cursor: u64,
    /// The highest durable seq; nothing above it is sent.
    durable: u64,
    up: bool,
    closing: bool,
    token: u64,
    /// The read in flight.
    reading: Option<Reading>,
    records_out: usize,
    /// QoS 2 records still waiting for PUBREC.
    qos2_unreceived: usize,
    /// QoS 2 records in flight (at most one, see the module doc).
    qos2_out: usize,
    /// What removes a record: the broker's ack or the hub's.
    confirm: Confirm,
    /// Hub mode: records the broker acknowledged that wait for the hub,
    /// by outbox seq: their identity and the resend round they were
    /// acknowledged in.
    unconfirmed: BTreeMap<u64, (Id, u64)>,
    /// Hub mode: the outbox seq of each identity submitted on this session
    /// and not removed since (in flight, read back for a resend, or
    /// unconfirmed).
    ids: BTreeMap<Id, u64>,
    /// Hub mode: unconfirmed records to read back and send again.
    resend: BTreeSet<u64>,
    /// Hub mode: the current resend round (see [`Delivery::resend_unconfirmed`]).
    round: u64,
}

fn mqtt_qos(q: Qos) -> QoS {
    match q {
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn publish_of(record: &Record) -> Submit {
    Submit::Publish {
        topic: record.topic.clone(),
        qos: mqtt_qos(record.qos),
        retain: record.retain,
        payload: record.payload.clone(),
    }
}

impl Delivery {
    /// A state with nothing in flight, reading from the oldest record.
    /// `window`: records in flight at most (`mqtt.max_inflight`); `confirm`:
    /// whose ack removes a record.
    pub fn new(window: u16, confirm: Confirm) -> Delivery {
        Delivery {
            window: usize::from(window.max(1)),
            cycle: rumqttc_inflight(window),
            counter: 0,
            slots: BTreeMap::new(),
            expected: VecDeque::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            cursor: 0,
            durable: 0,
            up: false,
            closing: false,
            token: 0,
            reading: None,
            records_out: 0,
            qos2_unreceived: 0,
            qos2_out: 0,
            confirm,
            unconfirmed: BTreeMap::new(),
            ids: BTreeMap::new(),
            resend: BTreeSet::new(),
            round: 0,
        }
    }

    /// A state whose packet-id cycle is `cycle` instead of
    /// [`rumqttc_inflight`] (the model test uses short cycles to make the
    /// counter come back to ids still in use). `cycle` must exceed
    /// `window + 3`, or rumqttc's request gate can close.
    #[cfg(test)]
    pub(crate) fn with_cycle(window: u16, cycle: u16, confirm: Confirm) -> Delivery {
        Delivery { cycle, ..Delivery::new(window, confirm) }
    }

    /// The packet ids this state holds (test cross-checks).
    #[cfg(test)]
    pub(crate) fn pkids_in_use(&self) -> Vec<Pkid> {
        self.slots.keys().copied().collect()
    }

    /// rumqttc's `max_inflight` to configure for this state.
    pub fn rumqttc_inflight(&self) -> u16 {
        self.cycle
    }

    /// Records in flight (submitted, not yet acknowledged).
    pub fn in_flight(&self) -> usize {
        self.records_out
    }

    /// Hub mode: records the broker acknowledged that wait for the hub's
    /// confirmation (not counting those read back to be sent again).
    pub fn unconfirmed(&self) -> usize {
        self.unconfirmed.len()
    }

    /// Whether a ConnAck was handled and the connection has not ended since.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// A new connection attempt starts (a fresh rumqttc EventLoop): the
    /// requests to put into its `pending`, in order. A QoS 2 record is resent
    /// as a DUP PUBLISH whatever its phase, and the records after it go back
    /// to the queue (module doc: QoS 2 across a reconnect).
    pub fn connecting(&mut self) -> Vec<Request> {
        self.down();
        self.counter = 0;
        // Connection-scoped slots end with their connection.
        self.slots.retain(|_, s| matches!(s.what, What::Record(_)));
        let mut resend: Vec<(u64, Pkid)> = self
            .slots
            .iter()
            .filter_map(|(&pkid, s)| match &s.what {
                What::Record(r) => Some((r.seq, pkid)),
                _ => None,
            })
            .collect();
        resend.sort_unstable();
        let mut pending = Vec::with_capacity(resend.len());
        let mut requeued = Vec::new();
        let mut behind_qos2 = false;
        for (_, pkid) in resend {
            if behind_qos2 {
                // Held back until the QoS 2 record's PUBREC, then submitted
                // afresh: rumqttc's channel cannot carry this packet id.
                if let Some(slot) = self.slots.remove(&pkid)
                    && let What::Record(record) = slot.what
                {
                    self.records_out -= 1;
                    if slot.qos == QoS::ExactlyOnce {
                        // Not reached: one QoS 2 record in flight at a time.
                        self.qos2_out -= 1;
                        if slot.phase == Phase::Ack {
                            self.qos2_unreceived -= 1;
                        }
                    }
                    // One the hub confirmed has left the outbox: its packet
                    // id was all that was left of it.
                    if !slot.confirmed {
                        requeued.push(record);
                    }
                }
                continue;
            }
            let Some(slot) = self.slots.get_mut(&pkid) else { continue };
            slot.written = false;
            if slot.phase == Phase::Comp {
                // Its PUBREL is not resent: the PUBLISH is (module doc).
                slot.phase = Phase::Ack;
                self.qos2_unreceived += 1;
            }
            let What::Record(record) = &slot.what else { continue };
            let mut p = Publish::new(record.topic.as_str(), slot.qos, record.payload.clone());
            p.retain = record.retain;
            p.pkid = pkid;
            p.dup = slot.sent;
            pending.push(Request::Publish(p));
            self.expected.push_back(pkid);
            behind_qos2 = slot.qos == QoS::ExactlyOnce;
        }
        // They precede everything queued: records are submitted in seq order.
        for record in requeued.into_iter().rev() {
            self.ready.push_front(record);
        }
        pending
    }

    /// The ConnAck came. `control` is queued ahead of any record (the
    /// subscription and the `status` and sync publishes).
    pub fn connected(&mut self, session_present: bool, control: Vec<Control>) -> Connected {
        let mut forgotten = 0;
        if !session_present {
            // rumqttc cleared `pending`; the broker knows none of our ids.
            forgotten = self.records_out;
            self.slots.clear();
            self.records_out = 0;
            self.qos2_unreceived = 0;
            self.qos2_out = 0;
            self.expected.clear();
            self.ready.clear();
            self.cursor = 0;
            self.token += 1;
            // Everything is read again from the oldest record, unconfirmed
            // ones included.
            self.unconfirmed.clear();
            self.ids.clear();
            self.resend.clear();
        } else {
            // The broker may have lost what it acknowledged (a crash
            // without persistence): send every unconfirmed record again.
            self.resend.extend(self.unconfirmed.keys().copied());
        }
        self.up = true;
        self.control.extend(control);
        let mut actions = Vec::new();
        self.pump(&mut actions);
        Connected { forgotten, actions }
    }

    /// The connection (or the attempt) ended. Records in flight stay in
    /// flight: they are resent by the next [`Delivery::connecting`].
    pub fn disconnected(&mut self) {
        self.down();
    }

    fn down(&mut self) {
        self.up = false;
        self.expected.clear();
        self.control.clear();
    }

    /// SIGTERM: submit no more records (the `offline` status still goes).
    pub fn closing(&mut self) {
        self.closing = true;
    }

    /// Queues a connection-scoped submission.
    pub fn control(&mut self, c: Control) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.up {
            self.control.push_back(c);
            self.pump(&mut actions);
        }
        actions
    }

    /// The outbox has everything up to `seq` durable (no records handed
    /// over: they are read from the outbox).
    pub fn durable(&mut self, seq: u64) -> Vec<Action> {
        self.durable_with(seq, None)
    }

    /// The outbox has everything up to `seq` durable, and hands over the
    /// records that commit made durable ([`Fresh`]: complete for its seq
    /// range). They are taken as the result of a read of that range would
    /// be, when the cursor is at its start and no read is in flight, as far
    /// as the queue stays within [`READY_MAX`] (the rest, or all of them
    /// otherwise, is read later from the outbox as usual).
    pub fn durable_with(&mut self, seq: u64, fresh: Option<Fresh>) -> Vec<Action> {
        self.durable = self.durable.max(seq);
        if let Some(f) = fresh
            && self.up
            && !self.closing
            && self.reading.is_none()
            && f.from == self.cursor
            && f.upto <= self.durable
        {
            let room = READY_MAX.saturating_sub(self.ready.len());
            let mut records = f.records;
            if records.len() <= room {
                self.cursor = f.upto + 1;
            } else {
                // A prefix of a complete run is complete up to its last record.
                records.truncate(room);
                if let Some(last) = records.last() {
                    self.cursor = last.seq + 1;
                }
            }
            self.ready.extend(records);
        }
        let mut actions = Vec::new();
        self.pump(&mut actions);
        actions
    }

    /// The result of [`Action::Read`] with this token.
    pub fn records(&mut self, token: u64, records: Vec<Record>) -> Vec<Action> {
        let mut actions = Vec::new();
        let Some(Reading { token: asked, upto, limit, resend }) = self.reading else {
            return actions;
        };
        if asked != token {
            // Not the read in flight (there is only one): nothing to do.
            return actions;
        }
        self.reading = None;
        if resend {
            if token == self.token {
                self.read_back(records, upto, limit);
            }
        } else if token == self.token {
            let n = records.len();
            let last = records.last().map(|r| r.seq);
            self.ready.extend(records.into_iter().filter(|r| r.seq >= self.cursor));
            self.cursor = match last {
                Some(last) if n >= limit => last + 1,
                _ => self.cursor.max(upto.saturating_add(1)),
            };
        }
        self.pump(&mut actions);
        actions
    }

    /// [`Action::Read`] failed; the next call to [`Delivery::pump`] reads
    /// again.
    pub fn read_failed(&mut self, token: u64) {
        if matches!(self.reading, Some(r) if r.token == token) {
            self.reading = None;
        }
    }

    /// The Link could not hand over a submission: drop the connection.
    pub fn submit_failed(&mut self) -> Vec<Action> {
        self.down();
        vec![Action::Reconnect(Desync::NotSubmitted)]
    }

    /// Submits what may go, and reads when there is room.
    pub fn pump_now(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        self.pump(&mut actions);
        actions
    }

    /// A rumqttc event of the current connection.
    pub fn event(&mut self, event: &Event) -> Vec<Action> {
        let mut actions = Vec::new();
        let result = match event {
            Event::Incoming(Packet::PubAck(a)) => self.ack(a.pkid, "PUBACK", &mut actions),
            Event::Incoming(Packet::PubRec(r)) => self.ack(r.pkid, "PUBREC", &mut actions),
            Event::Incoming(Packet::PubComp(c)) => self.ack(c.pkid, "PUBCOMP", &mut actions),
            Event::Incoming(Packet::SubAck(s)) => self.ack(s.pkid, "SUBACK", &mut actions),
            Event::Outgoing(Outgoing::Publish(0)) => Ok(()), // QoS 0: not ours
            Event::Outgoing(Outgoing::Publish(p)) => self.written(*p, "PUBLISH"),
            Event::Outgoing(Outgoing::Subscribe(p)) => self.written(*p, "SUBSCRIBE"),
            Event::Outgoing(Outgoing::AwaitAck(p)) => Err(Desync::Collision(*p)),
            _ => Ok(()),
        };
        match result {
            Ok(()) => self.pump(&mut actions),
            Err(d) => {
                self.down();
                actions.push(Action::Reconnect(d));
            }
        }
        actions
    }

    fn written(&mut self, pkid: Pkid, kind: &'static str) -> Result<(), Desync> {
        let wrong = |expected: String| Desync::WrongWrite { kind, written: pkid, expected };
        let Some(expected) = self.expected.pop_front() else {
            return Err(wrong("no write".into()));
        };
        if expected != pkid {
            return Err(wrong(format!("packet id {expected}")));
        }
        let slot = self.slots.get_mut(&pkid).ok_or_else(|| wrong(format!("packet id {expected} (now free)")))?;
        let is_subscribe = matches!(slot.what, What::Subscribe);
        if is_subscribe != (kind == "SUBSCRIBE") {
            return Err(wrong(format!("packet id {expected} on another kind of packet")));
        }
        slot.written = true;
        slot.sent = true;
        Ok(())
    }

    fn ack(&mut self, pkid: Pkid, kind: &'static str, actions: &mut Vec<Action>) -> Result<(), Desync> {
        let unexpected = Desync::UnexpectedAck { kind, pkid };
        let Some(slot) = self.slots.get_mut(&pkid) else {
            return Err(unexpected);
        };
        let fits = match (kind, &slot.what, slot.qos, slot.phase) {
            ("SUBACK", What::Subscribe, _, Phase::Ack) => slot.written,
            ("PUBACK", What::Record(_) | What::Tag(_), QoS::AtLeastOnce, Phase::Ack) => slot.written,
            ("PUBREC", What::Record(_) | What::Tag(_), QoS::ExactlyOnce, Phase::Ack) => slot.written,
            // Only a PUBREC on this connection leads here: a PUBREL is never
            // resent from `pending`.
            ("PUBCOMP", What::Record(_) | What::Tag(_), QoS::ExactlyOnce, Phase::Comp) => slot.written,
            _ => false,
        };
        if !fits {
            return Err(unexpected);
        }
        if kind == "PUBREC" {
            slot.phase = Phase::Comp;
            if matches!(slot.what, What::Record(_)) {
                self.qos2_unreceived -= 1;
            }
            return Ok(());
        }
        let Some(slot) = self.slots.remove(&pkid) else {
            return Err(unexpected);
        };
        match slot.what {
            What::Record(r) => {
                self.records_out -= 1;
                if slot.qos == QoS::ExactlyOnce {
                    self.qos2_out -= 1;
                }
                match (self.confirm, slot.id) {
                    // Removed when the hub confirmed it.
                    _ if slot.confirmed => {}
                    (Confirm::Hub, Some(id)) => {
                        self.unconfirmed.insert(r.seq, (id, self.round));
                    }
                    _ => actions.push(Action::Remove(r.seq)),
                }
            }
            What::Tag(tag) => actions.push(Action::Done(tag)),
            What::Subscribe => {}
        }
        Ok(())
    }

    /// The packet id rumqttc gives the next numbered request.
    fn next_pkid(&self) -> Pkid {
        self.counter + 1
    }

    fn advance(&mut self) -> Pkid {
        let next = self.next_pkid();
        self.counter = if next >= self.cycle { 0 } else { next };
        next
    }

    fn pump(&mut self, actions: &mut Vec<Action>) {
        if !self.up {
            return;
        }
        loop {
            let control = if !self.control.is_empty() {
                true
            } else {
                let Some(r) = self.ready.front() else { break };
                // After a QoS 2 record nothing goes until its PUBREC, and
                // no other QoS 2 record until its PUBCOMP.
                let barred = self.qos2_unreceived > 0 || (r.qos == Qos::ExactlyOnce && self.qos2_out > 0);
                if self.closing || self.records_out >= self.window || barred {
                    break;
                }
                false
            };
            if self.slots.contains_key(&self.next_pkid()) {
                // rumqttc would park it as a collision: wait for that ack.
                break;
            }
            // Taken, not cloned: the slot keeps the record for resends.
            let queued = if control {
                match self.control.pop_front() {
                    Some(c) => Queued::Control(c),
                    None => break,
                }
            } else {
                match self.ready.pop_front() {
                    Some(r) => Queued::Record(r),
                    None => break,
                }
            };
            let pkid = self.advance();
            let mut id = None;
            let (what, qos, submit) = match queued {
                Queued::Record(r) => {
                    let submit = publish_of(&r);
                    let qos = mqtt_qos(r.qos);
                    self.records_out += 1;
                    if qos == QoS::ExactlyOnce {
                        self.qos2_unreceived += 1;
                        self.qos2_out += 1;
                    }
                    if self.confirm == Confirm::Hub {
                        id = proto::identity(&r.payload);
                        if let Some(id) = id {
                            self.ids.insert(id, r.seq);
                        }
                    }
                    (What::Record(r), qos, submit)
                }
                Queued::Control(Control::Subscribe(filters)) => {
                    (What::Subscribe, QoS::AtLeastOnce, Submit::Subscribe(filters))
                }
                Queued::Control(Control::Publish(tag, submit)) => {
                    let qos = match &submit {
                        Submit::Publish { qos, .. } => *qos,
                        Submit::Subscribe(_) => QoS::AtLeastOnce,
                    };
                    (What::Tag(tag), qos, submit)
                }
            };
            let slot = Slot { what, qos, phase: Phase::Ack, written: false, sent: false, id, confirmed: false };
            self.slots.insert(pkid, slot);
            self.expected.push_back(pkid);
            actions.push(Action::Submit(submit));
        }
        self.read(actions);
    }

    fn read(&mut self, actions: &mut Vec<Action>) {
        if !self.up || self.closing || self.reading.is_some() {
            return;
        }
        // Reads go ahead of the window (up to READ_AHEAD records queued), so
        // a replay reads in batches instead of one read per freed slot; a
        // read is made once the queue could no longer refill the window.
        if self.ready.len() >= self.window {
            return;
        }
        let room = self.window.max(READ_AHEAD) - self.ready.len();
        // Resends first, as after a resumed session.
        if let (Some(&from), Some(&upto)) = (self.resend.first(), self.resend.last()) {
            self.reading = Some(Reading { token: self.token, upto, limit: room, resend: true });
            actions.push(Action::Read { token: self.token, from, upto, limit: room });
            return;
        }
        if self.durable == 0 || self.cursor > self.durable {
            return;
        }
        self.reading = Some(Reading { token: self.token, upto: self.durable, limit: room, resend: false });
        actions.push(Action::Read { token: self.token, from: self.cursor, upto: self.durable, limit: room });
    }

    /// The result of a resend read over `..=upto` with `limit`: the
    /// records still waiting go back to the queue, in seq order; those the
    /// read passed over are gone from the outbox (dropped by its bound) and
    /// are forgotten.
    fn read_back(&mut self, records: Vec<Record>, upto: u64, limit: usize) {
        let covered = match records.last() {
            Some(last) if records.len() >= limit => last.seq,
            _ => upto,
        };
        for r in records {
            if self.resend.remove(&r.seq) && self.unconfirmed.remove(&r.seq).is_some() {
                let at = self.ready.partition_point(|q| q.seq < r.seq);
                self.ready.insert(at, r);
            }
        }
        let gone: Vec<u64> = self.resend.range(..=covered).copied().collect();
        for seq in gone {
            self.resend.remove(&seq);
            if let Some((id, _)) = self.unconfirmed.remove(&seq) {
                self.ids.remove(&id);
            }
        }
    }

    /// Hub mode: the hub stored these messages (`P/D/ack`). Each one this
    /// state has sent on this session is removed from the outbox, whether
    /// the broker has acknowledged it yet or not; the others (sent before
    /// a restart or a lost session, or removed already) are read and sent
    /// again in their turn and confirmed then. Returns the removals.
    pub fn confirmed(&mut self, ack: &StoredAck) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.confirm != Confirm::Hub {
            return actions;
        }
        let mut named: Vec<(Id, u64)> = Vec::new();
        for &(first, last) in &ack.seqs {
            if first > last {
                continue;
            }
            named.extend(self.ids.range((ack.epoch, first)..=(ack.epoch, last)).map(|(id, seq)| (*id, *seq)));
        }
        for (id, seq) in named {
            self.ids.remove(&id);
            if self.unconfirmed.remove(&seq).is_some() {
                self.resend.remove(&seq);
                actions.push(Action::Remove(seq));
            } else if let Some(slot) =
                self.slots.values_mut().find(|s| !s.confirmed && matches!(&s.what, What::Record(r) if r.seq == seq))
            {
                // In flight (sent again, or the hub was faster than the
                // broker's ack): its ack only frees the packet id now.
                slot.confirmed = true;
                actions.push(Action::Remove(seq));
            } else if let Some(at) = self.ready.iter().position(|r| r.seq == seq) {
                self.ready.remove(at);
                actions.push(Action::Remove(seq));
            }
        }
        self.pump(&mut actions);
        actions
    }

    /// Hub mode, when the confirmation time-out runs out: every record
    /// that was unconfirmed at the previous call already (so it waited at
    /// least one whole time-out) is read back and sent again, through the
    /// window, in seq order, ahead of new records. Returns how many, and
    /// what to do.
    pub fn resend_unconfirmed(&mut self) -> (usize, Vec<Action>) {
        let round = self.round;
        self.round += 1;
        let before = self.resend.len();
        self.resend.extend(self.unconfirmed.iter().filter(|(_, (_, r))| *r < round).map(|(seq, _)| *seq));
        let n = self.resend.len() - before;
        let mut actions = Vec::new();
        self.pump(&mut actions);
        (n, actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Class;
    use rumqttc::{PubAck, PubComp, PubRec, SubAck, SubscribeReasonCode};

    fn rec(seq: u64, qos: Qos) -> Record {
        Record {
            seq,
            ts_ms: seq,
            class: Class::Event,
            qos,
            retain: false,
            topic: format!("p/d/button/b{seq}"),
            payload: format!("{{\"seq\":{seq}}}").into_bytes(),
        }
    }

    fn puback(p: Pkid) -> Event {
        Event::Incoming(Packet::PubAck(PubAck::new(p)))
    }
    fn pubrec(p: Pkid) -> Event {
        Event::Incoming(Packet::PubRec(PubRec::new(p)))
    }
    fn pubcomp(p: Pkid) -> Event {
        Event::Incoming(Packet::PubComp(PubComp::new(p)))
    }
    fn wrote(p: Pkid) -> Event {
        Event::Outgoing(Outgoing::Publish(p))
    }

    fn reads(actions: &[Action]) -> Vec<(u64, u64, u64, usize)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Read { token, from, upto, limit } => Some((*token, *from, *upto, *limit)),
                _ => None,
            })
            .collect()
    }

    fn submitted_payloads(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Submit(Submit::Publish { payload, .. }) => Some(String::from_utf8_lossy(payload).into_owned()),
                _ => None,
            })
            .collect()
    }

    fn removed(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Remove(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    /// A state connected on a fresh session with records 1..=n durable and
    /// read, their writes confirmed.
    fn sending(window: u16, records: &[Record]) -> (Delivery, Vec<Action>) {
        sending_in(Confirm::Broker, window, records)
    }

    fn sending_in(confirm: Confirm, window: u16, records: &[Record]) -> (Delivery, Vec<Action>) {
        let mut d = Delivery::new(window, confirm);
        assert!(d.connecting().is_empty());
        let c = d.connected(false, vec![]);
        assert!(c.actions.is_empty(), "nothing durable yet: {:?}", c.actions);
        let last = records.last().map_or(0, |r| r.seq);
        let read = d.durable(last);
        let (token, ..) = reads(&read)[0];
        let actions = d.records(token, records.to_vec());
        (d, actions)
    }

    #[test]
    fn records_go_out_in_seq_order_numbered_like_rumqttc_and_leave_only_on_their_own_ack() {
        let recs: Vec<_> = (1..=3).map(|s| rec(s, Qos::AtLeastOnce)).collect();
        let (mut d, actions) = sending(8, &recs);
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":1}", "{\"seq\":2}", "{\"seq\":3}"]);
        for p in 1..=3 {
            assert!(d.event(&wrote(p)).iter().all(|a| !matches!(a, Action::Reconnect(_))));
        }
        assert_eq!(removed(&d.event(&puback(2))), vec![2], "PUBACK 2 removes the record written as 2");
        assert_eq!(removed(&d.event(&puback(1))), vec![1]);
        assert_eq!(d.in_flight(), 1);
    }

    #[test]
    fn an_ack_before_its_write_is_confirmed_is_a_desync_and_removes_nothing() {
        let (mut d, _) = sending(8, &[rec(1, Qos::AtLeastOnce)]);
        let actions = d.event(&puback(1));
        assert!(removed(&actions).is_empty());
        assert!(matches!(actions.as_slice(), [Action::Reconnect(Desync::UnexpectedAck { pkid: 1, .. })]));
        assert!(!d.is_up());
    }

    #[test]
    fn a_write_under_another_packet_id_than_assigned_is_a_desync() {
        let (mut d, _) = sending(8, &[rec(1, Qos::AtLeastOnce), rec(2, Qos::AtLeastOnce)]);
        let actions = d.event(&wrote(2));
        assert!(matches!(actions.as_slice(), [Action::Reconnect(Desync::WrongWrite { written: 2, .. })]));
    }

    #[test]
    fn a_collision_reported_by_rumqttc_is_a_desync() {
        let (mut d, _) = sending(8, &[rec(1, Qos::AtLeastOnce)]);
        let actions = d.event(&Event::Outgoing(Outgoing::AwaitAck(1)));
        assert_eq!(actions, vec![Action::Reconnect(Desync::Collision(1))]);
    }

    #[test]
    fn the_window_bounds_records_in_flight_and_an_ack_lets_the_next_one_go() {
        let recs: Vec<_> = (1..=3).map(|s| rec(s, Qos::AtLeastOnce)).collect();
        let mut d = Delivery::new(2, Confirm::Broker);
        d.connecting();
        d.connected(false, vec![]);
        let read = d.durable(3);
        assert_eq!(reads(&read), vec![(1, 0, 3, READ_AHEAD)], "reads ahead of the window");
        let actions = d.records(1, recs.clone());
        assert_eq!(submitted_payloads(&actions).len(), 2, "the window bounds what goes out");
        assert!(reads(&actions).is_empty(), "the cursor is past the durable mark: no read");
        d.event(&wrote(1));
        d.event(&wrote(2));
        let actions = d.event(&puback(1));
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":3}"], "an ack lets the next one go");
        assert!(reads(&actions).is_empty());
    }

    fn shape(pending: &[Request]) -> Vec<String> {
        pending
            .iter()
            .map(|r| match r {
                Request::PubRel(r) => format!("pubrel {}", r.pkid),
                Request::Publish(p) => format!("publish {} dup={} {:?}", p.pkid, p.dup, p.qos),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_resumed_session_resends_with_the_same_packet_ids_in_seq_order_with_dup_set() {
        let recs: Vec<_> = (1..=3).map(|s| rec(s, Qos::AtLeastOnce)).collect();
        let (mut d, _) = sending(8, &recs);
        d.event(&wrote(1));
        d.event(&wrote(2));
        d.disconnected();
        assert_eq!(
            shape(&d.connecting()),
            vec!["publish 1 dup=true AtLeastOnce", "publish 2 dup=true AtLeastOnce", "publish 3 dup=false AtLeastOnce"]
        );
        let c = d.connected(true, vec![]);
        assert_eq!(c.forgotten, 0);
        for p in 1..=3 {
            d.event(&wrote(p));
        }
        assert_eq!(removed(&d.event(&puback(3))), vec![3]);
    }

    #[test]
    fn a_qos2_record_waiting_for_pubcomp_is_resent_as_its_publish_not_its_pubrel() {
        let recs = vec![rec(1, Qos::ExactlyOnce), rec(2, Qos::AtLeastOnce), rec(3, Qos::AtLeastOnce)];
        let (mut d, _) = sending(8, &recs);
        d.event(&wrote(1));
        let after_pubrec = d.event(&pubrec(1));
        assert_eq!(submitted_payloads(&after_pubrec), vec!["{\"seq\":2}", "{\"seq\":3}"]);
        d.event(&wrote(2));
        d.event(&wrote(3));
        d.disconnected(); // the link drops between PUBREC and PUBCOMP
        assert_eq!(
            shape(&d.connecting()),
            vec!["publish 1 dup=true ExactlyOnce"],
            "no PUBREL (a broker that forgot the message drops us for it), and nothing after record 1 yet"
        );
        let c = d.connected(true, vec![]);
        assert!(submitted_payloads(&c.actions).is_empty(), "records 2 and 3 wait for record 1's PUBREC");
        assert_eq!(d.in_flight(), 1, "records 2 and 3 are queued again, not in flight");
        d.event(&wrote(1));
        assert!(removed(&d.event(&pubrec(1))).is_empty(), "a PUBREC removes nothing");
        // rumqttc's next packet id is 1, which record 1 holds until PUBCOMP.
        let actions = d.event(&pubcomp(1));
        assert_eq!(removed(&actions), vec![1], "its PUBCOMP completes record 1");
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":2}", "{\"seq\":3}"], "then 2 and 3, in order");
        d.event(&wrote(1));
        d.event(&wrote(2));
        assert_eq!(removed(&d.event(&puback(1))), vec![2], "record 2 under its fresh packet id");
        assert_eq!(removed(&d.event(&puback(2))), vec![3]);
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn records_after_a_resent_qos2_record_go_as_soon_as_its_pubrec_comes_when_the_next_packet_id_is_free() {
        // Records 1 and 2 (QoS 1) hold packet ids 1 and 2; record 3 (QoS 2)
        // holds 3; record 4 (QoS 1) went after its PUBREC.
        let recs = vec![
            rec(1, Qos::AtLeastOnce),
            rec(2, Qos::AtLeastOnce),
            rec(3, Qos::ExactlyOnce),
            rec(4, Qos::AtLeastOnce),
        ];
        let (mut d, _) = sending(8, &recs);
        for p in 1..=3 {
            d.event(&wrote(p));
        }
        d.event(&puback(1));
        d.event(&puback(2));
        let actions = d.event(&pubrec(3));
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":4}"]);
        d.event(&wrote(4));
        d.disconnected();
        assert_eq!(shape(&d.connecting()), vec!["publish 3 dup=true ExactlyOnce"]);
        let actions = d.connected(true, vec![]).actions;
        assert!(submitted_payloads(&actions).is_empty());
        d.event(&wrote(3));
        let actions = d.event(&pubrec(3));
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":4}"], "packet id 1 is free: record 4 goes at once");
        assert!(removed(&actions).is_empty());
        d.event(&wrote(1));
        assert_eq!(removed(&d.event(&puback(1))), vec![4]);
        assert_eq!(removed(&d.event(&pubcomp(3))), vec![3]);
    }

    #[test]
    fn a_lost_session_forgets_the_window_and_reads_again_from_the_oldest_record() {
        let recs: Vec<_> = (1..=2).map(|s| rec(s, Qos::AtLeastOnce)).collect();
        let (mut d, _) = sending(8, &recs);
        d.event(&wrote(1));
        let stale_token = 1;
        d.disconnected();
        assert_eq!(d.connecting().len(), 2);
        let c = d.connected(false, vec![]);
        assert_eq!(c.forgotten, 2);
        assert_eq!(reads(&c.actions), vec![(2, 0, 2, READ_AHEAD)]);
        assert!(d.records(stale_token, recs.clone()).is_empty(), "a stale read result is dropped");
        assert_eq!(d.event(&puback(1)), vec![Action::Reconnect(Desync::UnexpectedAck { kind: "PUBACK", pkid: 1 })]);
    }

    #[test]
    fn no_record_overtakes_a_qos2_record_that_waits_for_pubrec_and_qos2_records_go_one_at_a_time() {
        let recs = vec![rec(1, Qos::ExactlyOnce), rec(2, Qos::ExactlyOnce), rec(3, Qos::AtLeastOnce)];
        let (mut d, actions) = sending(8, &recs);
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":1}"]);
        d.event(&wrote(1));
        let actions = d.event(&pubrec(1));
        assert!(submitted_payloads(&actions).is_empty(), "record 2 is QoS 2: it waits for record 1's PUBCOMP");
        let actions = d.event(&pubcomp(1));
        assert_eq!(removed(&actions), vec![1]);
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":2}"]);
        d.event(&wrote(2));
        let actions = d.event(&pubrec(2));
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":3}"], "a QoS 1 record goes after the PUBREC");
    }

    #[test]
    fn a_packet_id_still_in_use_holds_the_next_submission_until_its_ack() {
        // A resumed session resends record 1 as packet id 1, and the fresh
        // rumqttc state numbers its first request 1 too.
        let mut d = Delivery::new(1, Confirm::Broker);
        d.connecting();
        d.connected(false, vec![]);
        let read = d.durable(2);
        let (token, ..) = reads(&read)[0];
        d.records(token, vec![rec(1, Qos::AtLeastOnce)]);
        d.disconnected();
        assert_eq!(d.connecting().len(), 1, "record 1 resent as packet id 1");
        let c = d.connected(true, vec![Control::Subscribe(vec!["p/d/relay/+/set".into()])]);
        assert!(
            !c.actions.iter().any(|a| matches!(a, Action::Submit(_))),
            "the SUBSCRIBE would get packet id 1, which record 1 still holds: {:?}",
            c.actions
        );
        d.event(&wrote(1));
        let actions = d.event(&puback(1));
        assert_eq!(removed(&actions), vec![1]);
        assert!(actions.iter().any(|a| matches!(a, Action::Submit(Submit::Subscribe(_)))));
        d.event(&Event::Outgoing(Outgoing::Subscribe(1)));
        let suback = SubAck::new(1, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
        assert!(d.event(&Event::Incoming(Packet::SubAck(suback))).iter().all(|a| !matches!(a, Action::Reconnect(_))));
    }

    #[test]
    fn tagged_publishes_are_reported_done_and_are_not_resent_on_the_next_connection() {
        let mut d = Delivery::new(4, Confirm::Broker);
        d.connecting();
        let online = Submit::Publish {
            topic: "p/d/status".into(),
            qos: QoS::AtLeastOnce,
            retain: true,
            payload: b"online".to_vec(),
        };
        let c = d.connected(false, vec![Control::Publish(Tag::Online, online.clone())]);
        assert_eq!(c.actions, vec![Action::Submit(online)]);
        d.event(&wrote(1));
        assert_eq!(d.event(&puback(1)), vec![Action::Done(Tag::Online)]);
        let sync =
            Submit::Publish { topic: "p/d/sync".into(), qos: QoS::AtLeastOnce, retain: false, payload: b"n".to_vec() };
        d.control(Control::Publish(Tag::Sync, sync));
        d.disconnected();
        assert!(d.connecting().is_empty(), "the sync publish belonged to the old connection");
    }

    #[test]
    fn nothing_is_read_or_sent_while_down_or_closing() {
        let mut d = Delivery::new(4, Confirm::Broker);
        assert!(d.durable(5).is_empty(), "down");
        d.connecting();
        let c = d.connected(false, vec![]);
        let (token, ..) = reads(&c.actions)[0];
        d.closing();
        let actions = d.records(token, vec![rec(1, Qos::AtLeastOnce)]);
        assert!(submitted_payloads(&actions).is_empty());
    }

    #[test]
    fn an_empty_read_moves_the_cursor_past_upto() {
        let mut d = Delivery::new(4, Confirm::Broker);
        d.connecting();
        d.connected(false, vec![]);
        let read = d.durable(5);
        let (token, ..) = reads(&read)[0];
        assert!(d.records(token, vec![]).is_empty(), "nothing left up to 5: no read until more is durable");
        assert_eq!(reads(&d.durable(6)), vec![(token, 6, 6, READ_AHEAD)]);
    }

    fn fresh(from: u64, upto: u64, records: &[Record]) -> Option<Fresh> {
        Some(Fresh { from, upto, records: records.to_vec() })
    }

    #[test]
    fn records_handed_over_with_the_durable_mark_go_out_without_a_read() {
        let mut d = Delivery::new(8, Confirm::Broker);
        d.connecting();
        d.connected(false, vec![]);
        let (token, ..) = reads(&d.durable(2))[0];
        d.records(token, vec![rec(1, Qos::AtLeastOnce), rec(2, Qos::AtLeastOnce)]);
        // Seq 4 was dropped before it was stored: the batch still covers it.
        let actions = d.durable_with(5, fresh(3, 5, &[rec(3, Qos::AtLeastOnce), rec(5, Qos::AtLeastOnce)]));
        assert!(reads(&actions).is_empty(), "no read: {actions:?}");
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":3}", "{\"seq\":5}"]);
        let actions = d.durable_with(6, None);
        assert_eq!(reads(&actions), vec![(token, 6, 6, READ_AHEAD)], "without a batch, the outbox is read");
    }

    #[test]
    fn a_batch_that_does_not_start_at_the_cursor_is_left_to_reads() {
        let mut d = Delivery::new(8, Confirm::Broker);
        d.connecting();
        d.connected(false, vec![]);
        // The read of 1..=2 is still in flight when 3 becomes durable.
        let (token, ..) = reads(&d.durable(2))[0];
        let actions = d.durable_with(3, fresh(3, 3, &[rec(3, Qos::AtLeastOnce)]));
        assert!(submitted_payloads(&actions).is_empty());
        let actions = d.records(token, vec![rec(1, Qos::AtLeastOnce), rec(2, Qos::AtLeastOnce)]);
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":1}", "{\"seq\":2}"]);
        assert_eq!(reads(&actions), vec![(token, 3, 3, READ_AHEAD)], "3 is read, not lost");
        // Not connected: a batch changes nothing but the mark.
        let mut down = Delivery::new(8, Confirm::Broker);
        assert!(down.durable_with(1, fresh(1, 1, &[rec(1, Qos::AtLeastOnce)])).is_empty());
        down.connecting();
        let c = down.connected(false, vec![]);
        assert_eq!(reads(&c.actions), vec![(down.token, 0, 1, READ_AHEAD)]);
    }

    #[test]
    fn a_batch_beyond_the_queue_bound_is_taken_in_part_and_the_rest_read() {
        let mut d = Delivery::new(1, Confirm::Broker);
        d.connecting();
        d.connected(false, vec![]);
        let n = READY_MAX as u64 + 2;
        let recs: Vec<_> = (1..=n).map(|s| rec(s, Qos::AtLeastOnce)).collect();
        let actions = d.durable_with(n, fresh(0, n, &recs));
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":1}"], "the window is 1");
        assert!(reads(&actions).is_empty(), "the queue is full: no read yet");
        assert_eq!(d.ready.len() + d.records_out, READY_MAX);
        assert_eq!(d.cursor, READY_MAX as u64 + 1, "what was not taken is read later");
    }

    #[test]
    fn the_rumqttc_window_is_far_above_the_link_window() {
        assert_eq!(rumqttc_inflight(1), 64);
        assert_eq!(rumqttc_inflight(32), 144);
        assert_eq!(rumqttc_inflight(1000), 4016);
    }

    // Confirmation by the hub.

    fn ack(epoch: u64, ranges: &[(u64, u64)]) -> StoredAck {
        StoredAck { epoch, seqs: ranges.to_vec() }
    }

    /// Hub mode, records 1..=n submitted and written under packet ids 1..=n.
    fn hub_sending(window: u16, n: u64) -> (Delivery, Vec<Record>) {
        let recs: Vec<_> = (1..=n).map(|s| rec(s, Qos::AtLeastOnce)).collect();
        let (mut d, actions) = sending_in(Confirm::Hub, window, &recs);
        assert_eq!(submitted_payloads(&actions).len(), recs.len().min(usize::from(window)));
        for p in 1..=n.min(u64::from(window)) {
            d.event(&wrote(u16::try_from(p).expect("small")));
        }
        (d, recs)
    }

    #[test]
    fn in_hub_mode_a_record_the_broker_acknowledged_stays_until_the_hub_confirms_it() {
        let (mut d, _) = hub_sending(8, 2);
        assert!(removed(&d.event(&puback(1))).is_empty(), "a PUBACK does not remove it");
        assert!(removed(&d.event(&puback(2))).is_empty());
        assert_eq!((d.in_flight(), d.unconfirmed()), (0, 2));
        assert!(removed(&d.confirmed(&ack(1, &[(1, 2)]))).is_empty(), "another epoch names other messages");
        assert_eq!(removed(&d.confirmed(&ack(0, &[(2, 2)]))), vec![2]);
        assert_eq!(removed(&d.confirmed(&ack(0, &[(1, 9)]))), vec![1]);
        assert!(removed(&d.confirmed(&ack(0, &[(1, 9)]))).is_empty(), "a repeated ack removes nothing twice");
        assert_eq!(d.unconfirmed(), 0);
    }

    #[test]
    fn in_broker_mode_the_hubs_ack_changes_nothing_and_the_puback_removes() {
        let (mut d, _) = sending(8, &[rec(1, Qos::AtLeastOnce)]);
        d.event(&wrote(1));
        assert!(removed(&d.confirmed(&ack(0, &[(1, 1)]))).is_empty());
        assert_eq!(removed(&d.event(&puback(1))), vec![1]);
    }

    #[test]
    fn a_confirmation_that_overtakes_the_brokers_ack_removes_the_record_and_the_ack_only_frees_its_packet_id() {
        let (mut d, _) = hub_sending(8, 1);
        assert_eq!(removed(&d.confirmed(&ack(0, &[(1, 1)]))), vec![1]);
        assert_eq!(d.in_flight(), 1, "its packet id is still in use");
        assert!(removed(&d.event(&puback(1))).is_empty(), "not removed twice");
        assert_eq!((d.in_flight(), d.unconfirmed()), (0, 0));
    }

    #[test]
    fn unconfirmed_records_are_sent_again_after_a_resumed_session() {
        let (mut d, recs) = hub_sending(8, 3);
        d.event(&puback(1));
        d.event(&puback(2));
        d.disconnected();
        assert_eq!(shape(&d.connecting()), vec!["publish 3 dup=true AtLeastOnce"], "record 3 was in flight");
        let c = d.connected(true, vec![]);
        assert_eq!(reads(&c.actions), vec![(1, 1, 2, READ_AHEAD)], "the unconfirmed ones are read back");
        let actions = d.records(1, recs[..2].to_vec());
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":1}", "{\"seq\":2}"], "in seq order, as new publishes");
        assert_eq!(d.in_flight(), 3);
        d.event(&wrote(3));
        d.event(&wrote(1));
        d.event(&wrote(2));
        assert_eq!(removed(&d.confirmed(&ack(0, &[(1, 3)]))), vec![1, 2, 3]);
    }

    #[test]
    fn a_lost_session_replays_everything_and_forgets_what_waited() {
        let (mut d, _) = hub_sending(8, 2);
        d.event(&puback(1));
        d.disconnected();
        d.connecting();
        let c = d.connected(false, vec![]);
        assert_eq!(reads(&c.actions), vec![(2, 0, 2, READ_AHEAD)], "from the oldest record, as in broker mode");
        assert_eq!(d.unconfirmed(), 0);
        assert!(removed(&d.confirmed(&ack(0, &[(1, 2)]))).is_empty(), "not sent on this session yet");
    }

    #[test]
    fn a_time_out_resends_only_records_that_waited_a_whole_round() {
        let (mut d, recs) = hub_sending(8, 2);
        d.event(&puback(1));
        let (n, actions) = d.resend_unconfirmed();
        assert_eq!(n, 0, "record 1 was acknowledged in this round: it has not waited a whole time-out");
        assert!(reads(&actions).is_empty());
        d.event(&puback(2));
        let (n, actions) = d.resend_unconfirmed();
        assert_eq!(n, 1, "record 1 waited a whole round, record 2 did not");
        assert_eq!(reads(&actions), vec![(1, 1, 1, READ_AHEAD)]);
        let actions = d.records(1, recs[..1].to_vec());
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":1}"]);
        assert_eq!((d.in_flight(), d.unconfirmed()), (1, 1));
    }

    #[test]
    fn a_resend_read_forgets_records_the_outbox_no_longer_holds() {
        let (mut d, recs) = hub_sending(8, 3);
        for p in 1..=3 {
            d.event(&puback(p));
        }
        d.resend_unconfirmed();
        let (_, actions) = d.resend_unconfirmed();
        assert_eq!(reads(&actions), vec![(1, 1, 3, READ_AHEAD)]);
        // The outbox's bound dropped record 2 meanwhile.
        let actions = d.records(1, vec![recs[0].clone(), recs[2].clone()]);
        assert_eq!(submitted_payloads(&actions), vec!["{\"seq\":1}", "{\"seq\":3}"]);
        assert_eq!(d.unconfirmed(), 0, "record 2 is forgotten, not waited for forever");
    }

    #[test]
    fn a_record_sent_again_is_removed_once_by_the_confirmation_and_its_second_ack_only_frees_the_packet_id() {
        let (mut d, recs) = hub_sending(1, 2);
        // Record 2 goes into the window of one; record 1 waits.
        assert_eq!(submitted_payloads(&d.event(&puback(1))), vec!["{\"seq\":2}"]);
        d.event(&wrote(2));
        d.resend_unconfirmed();
        let (_, actions) = d.resend_unconfirmed();
        let (token, from, upto, _) = reads(&actions)[0];
        assert_eq!((from, upto), (1, 1), "read ahead while the window is full");
        let actions = d.records(token, recs[..1].to_vec());
        assert!(submitted_payloads(&actions).is_empty(), "the window is full: not sent yet");
        assert_eq!(submitted_payloads(&d.event(&puback(2))), vec!["{\"seq\":1}"], "sent again");
        d.event(&wrote(3));
        assert_eq!(removed(&d.confirmed(&ack(0, &[(1, 2)]))), vec![1, 2]);
        let actions = d.event(&puback(3));
        assert!(actions.iter().all(|a| !matches!(a, Action::Remove(_) | Action::Reconnect(_))), "{actions:?}");
        assert_eq!((d.in_flight(), d.unconfirmed()), (0, 0));
    }

    #[test]
    fn a_record_without_an_identity_is_removed_by_its_brokers_ack_even_in_hub_mode() {
        let mut r = rec(1, Qos::AtLeastOnce);
        r.payload = b"not json".to_vec();
        let (mut d, _) = sending_in(Confirm::Hub, 8, &[r]);
        d.event(&wrote(1));
        assert_eq!(removed(&d.event(&puback(1))), vec![1], "no hub could ever name it");
    }
}
