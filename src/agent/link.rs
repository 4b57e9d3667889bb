//! The Link actor: owns the MQTT connection (rumqttc) and delivers the outbox.
//!
//! * One stream polls rumqttc's `EventLoop` without pause; its items are
//!   handled synchronously in this actor. When `poll()` fails, rumqttc has
//!   already moved everything unacked into `pending` (`eventloop.rs`
//!   `clean()`), and this actor marks itself disconnected in the same turn,
//!   so nothing is submitted into a dead connection's queue.
//! * Reconnects back off with jitter between `reconnect_min` and
//!   `reconnect_max`; rumqttc has none (rumqtt #703, #918).
//! * On every ConnAck: publish retained `online`, re-subscribe (rumqttc never
//!   does), tell the Relay (`reconnect` states), then send. With
//!   `session_present = false` rumqttc silently drops its pending publishes
//!   (`eventloop.rs`: `pending.clear()`), so the cursor goes back to the
//!   oldest record still in the outbox and everything is replayed.
//! * Records are sent in `seq` order, only once durable, keeping up to
//!   `max_inflight` in flight; each is removed from the outbox only on PUBACK
//!   (QoS 1) or PUBCOMP (QoS 2), correlated through [`Inflight`].
//! * Incoming commands are acked manually, only when the Relay says the pin
//!   switched and the state is recorded, and only on the connection they
//!   came in on.
//!
//! It runs on its own arbiter and never does disk writes or fsyncs itself
//! (the outbox writer thread does); it never awaits `publish()` (that
//! deadlocks the task that polls the event loop), only `try_*`.

use std::collections::VecDeque;
use std::time::Duration;

use actix::prelude::*;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeReasonCode,
};
use tokio::sync::oneshot;

use super::backoff::Backoff;
use super::inflight::{Inflight, Slot};
use super::relay::{LinkDown, LinkUp, Relay, RelayCommand};
use super::supervisor::{self, SupervisedActor, Supervision};
use crate::config::MqttConfig;
use crate::mqtt_options;
use crate::outbox::{OutboxHandle, OutboxReader};
use crate::proto::{self, Qos, Topics};

/// How long SIGTERM waits for the broker to acknowledge `offline`.
const OFFLINE_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// The outbox has records up to this seq durable.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Durable(pub u64);

/// A command handed to the Relay, waiting for its turn to be acknowledged:
/// PUBACKs go out in the order the commands arrived (MQTT-4.6.0-2).
struct PendingAck {
    id: u64,
    /// The connection it arrived on; an ack is only valid there.
    generation: u64,
    publish: Publish,
    /// `Some(true)`: done, ack it; `Some(false)`: the Relay gave up on it,
    /// leave it unacknowledged (the broker redelivers it); `None`: waiting.
    outcome: Option<bool>,
}

/// Publish `offline`, wait for its ack (bounded), and disconnect cleanly.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

pub fn qos(q: Qos) -> QoS {
    match q {
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// rumqttc options from the config: the shared client options (persistent
/// session, manual acks, TLS), plus the last will and the inflight window.
pub fn mqtt_options(cfg: &MqttConfig, topics: &Topics) -> Result<MqttOptions, String> {
    let mut o = mqtt_options::options(mqtt_options::Client {
        client_id: &cfg.client_id,
        url: &cfg.url,
        keep_alive: cfg.keep_alive,
        clean_session: cfg.clean_session,
        username: cfg.username.as_deref(),
        password: cfg.password.as_ref(),
        ca_file: cfg.ca_file.as_ref(),
        cert_file: cfg.cert_file.as_ref(),
        key_file: cfg.key_file.as_ref(),
    })
    .map_err(|e| format!("mqtt: {e}"))?;
    o.set_inflight(cfg.max_inflight).set_last_will(LastWill::new(
        topics.status(),
        proto::OFFLINE,
        QoS::AtLeastOnce,
        true,
    ));
    Ok(o)
}

/// Polls the event loop forever, backing off after each error. The error is
/// yielded first and the sleep happens before the next poll, so the actor
/// learns of a disconnect in the same turn rumqttc cleaned up.
fn events(el: EventLoop, min: Duration, max: Duration) -> impl Stream<Item = Result<Event, ConnectionError>> {
    futures_util::stream::unfold((el, Backoff::new(min, max), false), |(mut el, mut backoff, failed)| async move {
        if failed {
            actix::clock::sleep(backoff.next_delay(fastrand::f64())).await;
        }
        let r = el.poll().await;
        if matches!(r, Ok(Event::Incoming(Packet::ConnAck(_)))) {
            backoff.reset();
        }
        let failed = r.is_err();
        Some((r, (el, backoff, failed)))
    })
}

pub struct Link {
    cfg: MqttConfig,
    topics: Topics,
    outbox: OutboxHandle,
    reader: OutboxReader,
    relay: Addr<Relay>,
    sup: Supervision,
    client: Option<AsyncClient>,
    tracker: Inflight,
    /// The next seq to submit.
    cursor: u64,
    /// The highest durable seq; nothing above it is sent.
    durable: u64,
    connected: bool,
    /// Counts connections; command acks carry it.
    generation: u64,
    next_tag: u64,
    /// Commands in arrival order, until acknowledged or given up.
    acks: VecDeque<PendingAck>,
    next_command: u64,
    /// SIGTERM: the tag of the `offline` publish and who waits for it.
    closing: Option<(u64, Option<oneshot::Sender<()>>)>,
}

impl Link {
    pub fn new(
        cfg: MqttConfig,
        topics: Topics,
        outbox: OutboxHandle,
        reader: OutboxReader,
        relay: Addr<Relay>,
        sup: Supervision,
    ) -> Link {
        Link {
            cfg,
            topics,
            outbox,
            reader,
            relay,
            sup,
            client: None,
            tracker: Inflight::new(),
            cursor: 0,
            durable: 0,
            connected: false,
            generation: 0,
            next_tag: 0,
            acks: VecDeque::new(),
            next_command: 0,
            closing: None,
        }
    }

    fn window(&self) -> usize {
        usize::from(self.cfg.max_inflight.max(1))
    }

    fn publish_status(&mut self, payload: &'static [u8]) -> Option<u64> {
        let client = self.client.as_ref()?;
        match client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, payload) {
            Ok(()) => {
                self.next_tag += 1;
                self.tracker.submitted(Slot::Other(self.next_tag));
                Some(self.next_tag)
            }
            Err(e) => {
                tracing::warn!("status not published: {e}");
                None
            }
        }
    }

    fn on_connack(&mut self, session_present: bool) {
        self.connected = true;
        self.generation += 1;
        self.sup.board().link_up();
        if session_present {
            self.tracker.session_resumed();
        } else {
            let forgotten = self.tracker.session_lost();
            if forgotten > 0 {
                tracing::warn!(
                    "broker has no session for us: replaying {forgotten} unacknowledged publishes from the outbox"
                );
            }
            self.cursor = 0;
        }
        tracing::info!(session_present, "connected to {}:{}", self.cfg.url.host, self.cfg.url.port);
        self.publish_status(proto::ONLINE);
        if let Some(client) = &self.client
            && let Err(e) = client.try_subscribe(self.topics.relay_set_filter(), QoS::AtLeastOnce)
        {
            tracing::error!("subscribe not sent: {e}");
        }
        self.relay.do_send(LinkUp { session_present });
        self.pump();
    }

    fn on_error(&mut self, e: ConnectionError) {
        let error = e.to_string();
        if self.connected {
            tracing::warn!("connection lost: {error}");
            self.connected = false;
            self.relay.do_send(LinkDown);
        } else {
            tracing::debug!("connect failed: {error}");
        }
        self.sup.board().link_down(error);
        if self.closing.is_some() {
            self.finish_closing();
        }
    }

    fn on_publish(&mut self, publish: Publish, ctx: &mut Context<Self>) {
        match self.topics.is_relay_set_topic(&publish.topic) {
            true => {
                let (done, rx) = oneshot::channel();
                self.next_command += 1;
                let id = self.next_command;
                self.relay.do_send(RelayCommand {
                    topic: publish.topic.clone(),
                    relay: self.topics.relay_of_set_topic(&publish.topic).map(str::to_string),
                    payload: publish.payload.to_vec(),
                    pkid: publish.pkid,
                    dup: publish.dup,
                    backlog: false,
                    done,
                });
                self.acks.push_back(PendingAck { id, generation: self.generation, publish, outcome: None });
                ctx.spawn(rx.into_actor(self).map(move |res, act, _| act.command_done(id, res.is_ok())));
            }
            false => {
                tracing::warn!(topic = %publish.topic, "message on a topic the agent does not handle; acknowledged and ignored");
                if let Some(client) = &self.client
                    && let Err(e) = client.try_ack(&publish)
                {
                    tracing::warn!("ack not sent: {e}");
                }
            }
        }
    }

    /// The Relay is done with command `id`: acknowledge every command at the
    /// head of the queue that is done, in arrival order.
    fn command_done(&mut self, id: u64, applied: bool) {
        if let Some(p) = self.acks.iter_mut().find(|p| p.id == id) {
            p.outcome = Some(applied);
        }
        while let Some(outcome) = self.acks.front().and_then(|p| p.outcome) {
            let Some(p) = self.acks.pop_front() else { break };
            let current = self.connected && p.generation == self.generation;
            match (outcome, &self.client, current) {
                (true, Some(client), true) => {
                    if let Err(e) = client.try_ack(&p.publish) {
                        tracing::warn!("command ack not sent: {e}");
                    }
                }
                (true, _, _) => {
                    tracing::debug!(topic = %p.publish.topic, "command came in on an earlier connection; the broker delivers it again")
                }
                (false, _, _) => tracing::warn!(
                    topic = %p.publish.topic,
                    "command not recorded; left unacknowledged so the broker delivers it again"
                ),
            }
        }
    }

    fn completed(&mut self, slot: Option<Slot>) {
        match slot {
            Some(Slot::Record(seq)) => self.outbox.ack(vec![seq]),
            Some(Slot::Other(tag)) => {
                if matches!(self.closing, Some((t, _)) if t == tag) {
                    self.finish_closing();
                }
            }
            None => {}
        }
        self.pump();
    }

    /// Submits durable records from the cursor until the window is full.
    fn pump(&mut self) {
        if !self.connected || self.closing.is_some() {
            return;
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        let window = self.window();
        while self.tracker.outstanding() < window && self.cursor <= self.durable {
            let room = window - self.tracker.outstanding();
            let records = match self.reader.read(self.cursor, self.durable, room) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("outbox read failed: {e}");
                    return;
                }
            };
            if records.is_empty() {
                // Everything up to `durable` is acked or dropped.
                self.cursor = self.durable + 1;
                return;
            }
            for r in records {
                if let Err(e) = client.try_publish(r.topic, qos(r.qos), r.retain, r.payload) {
                    // The request channel is sized above the window, so
                    // this is a closed client; the next event retries.
                    tracing::warn!("publish not submitted: {e}");
                    return;
                }
                self.tracker.submitted(Slot::Record(r.seq));
                self.cursor = r.seq + 1;
            }
        }
    }

    fn finish_closing(&mut self) {
        if let Some((_, reply)) = self.closing.as_mut() {
            if let Some(client) = &self.client {
                // A failed disconnect leaves the last will to say `offline`.
                if let Err(e) = client.try_disconnect() {
                    tracing::debug!("disconnect not sent: {e}");
                }
            }
            if let Some(tx) = reply.take() {
                // The waiter may have given up already; nothing to do then.
                let _ = tx.send(());
            }
        }
    }
}

impl Actor for Link {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        supervisor::start_after_backoff(self, ctx);
    }
}

impl Supervised for Link {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.client = None;
        if self.connected {
            self.connected = false;
            self.relay.do_send(LinkDown);
        }
        self.sup.restarting();
    }
}

impl SupervisedActor for Link {
    fn supervision(&mut self) -> &mut Supervision {
        &mut self.sup
    }

    fn init(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        let options = mqtt_options(&self.cfg, &self.topics)?;
        // Room for a full window of publishes plus status, subscribe and
        // command acks, so `try_*` never finds the channel full.
        let capacity = self.window() + 64;
        let (client, eventloop) = AsyncClient::new(options, capacity);
        self.client = Some(client);
        self.tracker.session_lost();
        self.cursor = 0;
        self.durable = self.durable.max(self.outbox.stats().durable_seq);
        ctx.add_stream(events(eventloop, self.cfg.reconnect_min, self.cfg.reconnect_max));
        Ok(())
    }
}

impl StreamHandler<Result<Event, ConnectionError>> for Link {
    fn handle(&mut self, item: Result<Event, ConnectionError>, ctx: &mut Context<Self>) {
        match item {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => self.on_connack(ack.session_present),
            Ok(Event::Incoming(Packet::Publish(p))) => self.on_publish(p, ctx),
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                let slot = self.tracker.on_puback(a.pkid);
                self.completed(slot);
            }
            Ok(Event::Incoming(Packet::PubRec(r))) => self.tracker.on_pubrec(r.pkid),
            Ok(Event::Incoming(Packet::PubComp(c))) => {
                let slot = self.tracker.on_pubcomp(c.pkid);
                self.completed(slot);
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                if s.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                    tracing::error!(
                        "the broker refused the subscription to {}: commands will not arrive",
                        self.topics.relay_set_filter()
                    );
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Err(d) = self.tracker.on_outgoing_publish(pkid) {
                    supervisor::fail(self, ctx, format!("{d}; reconnecting and replaying from the outbox"));
                }
            }
            Ok(_) => {}
            Err(e) => self.on_error(e),
        }
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // The event stream never ends on its own; a restart replaces it.
    }
}

impl Handler<Durable> for Link {
    type Result = ();

    fn handle(&mut self, msg: Durable, _: &mut Context<Self>) {
        self.durable = self.durable.max(msg.0);
        self.pump();
    }
}

impl Handler<Shutdown> for Link {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) -> ResponseFuture<()> {
        let (tx, rx) = oneshot::channel();
        let tag = if self.connected { self.publish_status(proto::OFFLINE) } else { None };
        match tag {
            Some(tag) => {
                self.closing = Some((tag, Some(tx)));
                ctx.run_later(OFFLINE_ACK_TIMEOUT, |act, _| act.finish_closing());
            }
            None => {
                self.closing = Some((0, None));
                // Not connected: the broker has published the last will.
                let _ = tx.send(());
            }
        }
        Box::pin(async move {
            // A dropped sender also means "done".
            let _ = rx.await;
        })
    }
}
