//! The Link actor: owns the MQTT connection and performs what the sans-IO
//! delivery state ([`Delivery`]) and inbox ([`Inbox`]) decide. It decides
//! nothing about packet ids, order or acknowledgements itself; it must never
//! remove a record except on [`Action::Remove`], never acknowledge a command
//! except when the inbox says so, never do disk I/O on its own thread (reads
//! go through `OutboxReader::read_async`), and never await a rumqttc request
//! (that deadlocks the task that polls the event loop), only `try_*`.
//!
//! # Connections
//!
//! * Each connection attempt gets a fresh rumqttc `AsyncClient`/`EventLoop`
//!   and a new generation number. The attempt's events reach this actor as
//!   `(generation, event)`; anything from an older generation is ignored, so
//!   no stale rumqttc event (an `Outgoing::Publish` after a failed write, a
//!   late ack) can touch the delivery state. The stream ends with the
//!   attempt's first error; rumqttc's own reconnect and its `pending`
//!   bookkeeping are never used across connections.
//! * Before the first poll the Link puts [`Delivery::connecting`]'s resends
//!   into the EventLoop's `pending` (same packet ids, DUP set). rumqttc drops
//!   them itself if the ConnAck says `session_present = false`, and the
//!   delivery state then replays from the oldest outbox record.
//! * A QoS 2 record that got its PUBREC before the link dropped is resent as
//!   its PUBLISH (DUP, same packet id), not as a PUBREL as MQTT 3.1.1 §4.4
//!   asks: the embedded broker (rumqttd 0.20) forgets a received QoS 2
//!   message at the disconnect (`router/routing.rs:336`, `:459`; its saved
//!   session keeps only outgoing PUBRELs, `:518-523`), releases its oldest
//!   message whatever id a PUBREL names (`router/logs.rs:414-418`) and drops
//!   a client whose PUBREL finds none (`router/routing.rs:813-819`), so a
//!   resent PUBREL got the agent disconnected on every attempt. mosquitto
//!   answers the DUP PUBLISH of an id it still holds with PUBREC and
//!   delivers it once (§4.3.3). A broker that had already completed the
//!   exchange delivers it a second time (the hub dedupes by `(device, epoch,
//!   seq)`). Resends behind it wait for its PUBREC and then go under fresh
//!   packet ids. The rules and their price are in `delivery.rs`.
//! * rumqttc's `max_inflight` is [`rumqttc_inflight`] (far above the Link's
//!   window), so its request gate never closes. A desync between rumqttc and
//!   the delivery state (`Outgoing::AwaitAck`, a write under an unexpected
//!   packet id, an ack for an empty slot) is logged at error level and the
//!   connection is dropped and resent; it does not restart the actor and
//!   nothing is removed.
//! * Reconnects follow [`Reconnect`] (see `backoff.rs`): back-off with jitter
//!   from `reconnect_min` to `reconnect_max`, reset only once a connection
//!   proved healthy (a SUBACK, PUBACK or PUBCOMP on it), and after a network
//!   failure a TCP probe of the broker every 2 s while waiting, connecting at
//!   once when it answers (not after a connection the broker dropped before
//!   it proved healthy: that is paced by the back-off alone).
//! * A blackhole (bytes stop, the socket stays open) is noticed by rumqttc's
//!   keep-alive: a PINGREQ every `keep_alive` whatever the traffic, and an
//!   unanswered one fails the next (`state.rs` `outgoing_ping`:
//!   `AwaitPingResp`), within 2 × `keep_alive` of the first lost byte.
//!   Nothing in the write path waits longer: every branch of rumqttc's
//!   `select` writes at most a few packets into an empty `Framed` buffer
//!   (`framed.rs` `write` only buffers below the 8 KiB back-pressure mark;
//!   the request branch adds the requests queued behind the first only
//!   while the buffer holds less than 4 KiB, our patch in
//!   `vendor/rumqttc/PATCHED.md`) and then flushes under a 5 s time-out
//!   (`eventloop.rs`: `FlushTimeout`); connecting (TCP, TLS,
//!   CONNECT/CONNACK) has the same time-out (`NetworkTimeout`).
//!
//! # On every ConnAck, in this order
//!
//! 1. SUBSCRIBE `P/D/relay/+/set` and `P/D/sync`, and `P/D/ack` with
//!    `outbox.confirm = "hub"` (QoS 1, one packet; rumqttc never
//!    re-subscribes);
//! 2. PUBLISH `online` (retained, QoS 1) to `P/D/status`;
//! 3. PUBLISH a random 16-hex-digit nonce (QoS 1, not retained) to `P/D/sync`;
//! 4. tell the Relay `LinkUp { session_present }`; with no session also
//!    `CaughtUp` at once (nothing can be queued for a session that did not
//!    exist), otherwise `CaughtUp` when the nonce comes back, or after
//!    `keep_alive` without it (a warning names the topic; the wait restarts
//!    with every message that arrives meanwhile);
//! 5. send records: resends first (already in `pending`), then from the
//!    cursor in seq order, at most `max_inflight` in flight, nothing
//!    overtaking a QoS 2 record that waits for PUBREC, and one QoS 2 record
//!    in flight at a time.
//!
//! # Confirmation by the hub
//!
//! With `outbox.confirm = "hub"` a `P/D/ack` is decoded
//! ([`StoredAck`]) and handed to [`Delivery::confirmed`], whose removals
//! are the only ones; a payload that does not decode is logged at warn and
//! acknowledged. A timer armed for [`ConfirmClock::next_wake`] asks the
//! clock whether the confirmation time-out ran out (then
//! [`Delivery::resend_unconfirmed`]) and whether to warn, once, that no
//! hub has ever confirmed anything. The clock is updated after every
//! action batch with the unconfirmed count, and the timer moved to its new
//! wake-up (none while nothing waits: no periodic tick).
//!
//! Commands that arrive on a resumed session before the nonce carry
//! `backlog = true`. Every incoming QoS 1 message is acknowledged in arrival
//! order ([`Inbox`]), a command once its `done` handle fires, anything else at
//! once; a dropped `done` skips that one and never blocks later acks.

use std::time::{Duration, Instant};

use actix::prelude::*;
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode,
};
use tokio::sync::oneshot;

use super::backoff::{Failure, Reconnect, Wait, probe_pause};
use super::confirmations::ConfirmClock;
use super::delivery::{Action, Control, Delivery, Desync, Submit, Tag, rumqttc_inflight, subscribe_filters};
use super::homeassistant;
use super::inbox::{Arrival, Inbox};
use super::relay::{CaughtUp, LinkDown, LinkUp, Relay, RelayCommand};
use super::supervisor::{self, SupervisedActor, Supervision};
use crate::config::{Confirm, ConfirmConfig, MqttConfig};
use crate::mqtt_options;
use crate::outbox::{Fresh, OutboxError, OutboxHandle, OutboxReader, Record};
use crate::proto::{self, StoredAck, Topics};

/// How long SIGTERM waits for the broker to acknowledge `offline`.
const OFFLINE_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a TCP probe of the broker may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long to wait before reading again after a failed outbox read.
const READ_RETRY: Duration = Duration::from_secs(1);

/// Room in rumqttc's request channel beyond its inflight: the SUBSCRIBE, the
/// `status` and sync publishes and command acks, so `try_*` never finds it
/// full.
const CHANNEL_SLACK: usize = 1024;

/// The outbox has records up to this seq durable, and these are the records
/// that commit made durable, when the outbox still had them (published
/// without a read, see `Delivery::durable_with`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Durable(pub u64, pub Option<Fresh>);

/// Publish `offline`, wait for its ack (bounded), and disconnect cleanly.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// rumqttc options from the config: the shared client options (persistent
/// session, manual acks, TLS), plus the last will and rumqttc's inflight
/// (see [`rumqttc_inflight`]).
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
    o.set_inflight(rumqttc_inflight(cfg.max_inflight)).set_last_will(LastWill::new(
        topics.status(),
        proto::OFFLINE,
        QoS::AtLeastOnce,
        true,
    ));
    Ok(o)
}

/// Whether the wait after this error may probe the broker (see `backoff.rs`).
pub fn failure_of(e: &ConnectionError) -> Failure {
    if crate::connect_failure::is_refusal(e) { Failure::Refused } else { Failure::Network }
}

/// One connection attempt's events, tagged with its generation, in batches
/// (see [`connection_events`]); the stream ends after the first error (the
/// EventLoop is dropped with it).
type Item = (u64, Result<Vec<Event>, ConnectionError>);

/// The most events handed to the Link in one batch.
const MAX_BATCH: usize = 256;

/// The attempt's events: each `poll` and the events rumqttc already queued
/// behind it (`MqttState::events`, a public field in 0.25.1,
/// `state.rs:72`), which its next `poll`s would return one by one without
/// any I/O (`eventloop.rs` `select` pops them first). A read of up to ten
/// packets (`framed.rs` `readb`) or a flush of several publishes then
/// reaches the Link as one batch: one actix item, one removal message to
/// the outbox writer and one status update per batch instead of per packet.
fn connection_events(generation: u64, el: EventLoop) -> impl Stream<Item = Item> {
    futures_util::stream::unfold(Some(el), move |el| async move {
        let mut el = el?;
        match el.poll().await {
            Ok(first) => {
                let queued = el.state.events.len().min(MAX_BATCH - 1);
                let mut batch = Vec::with_capacity(1 + queued);
                batch.push(first);
                batch.extend(el.state.events.drain(..queued));
                Some(((generation, Ok(batch)), Some(el)))
            }
            Err(e) => Some(((generation, Err(e)), None)),
        }
    })
}

/// Waits as `wait` says; true when a probe found the broker reachable before
/// the delay ran out.
async fn wait_for_next_attempt(wait: Wait, host: String, port: u16) -> bool {
    let deadline = actix::clock::Instant::now() + wait.delay;
    let Some(every) = wait.probe_every else {
        actix::clock::sleep_until(deadline).await;
        return false;
    };
    loop {
        let next = actix::clock::Instant::now() + probe_pause(every, fastrand::f64());
        if next >= deadline {
            actix::clock::sleep_until(deadline).await;
            return false;
        }
        actix::clock::sleep_until(next).await;
        let probe = actix::clock::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port))).await;
        if matches!(probe, Ok(Ok(_))) {
            return true;
        }
    }
}

fn submit(client: &AsyncClient, s: Submit) -> Result<(), ClientError> {
    match s {
        // Moved: the payload becomes rumqttc's `Bytes` without a copy.
        Submit::Publish { topic, qos, retain, payload } => client.try_publish(topic, qos, retain, payload),
        Submit::Subscribe(filters) => client.try_subscribe_many(subscribe_filters(&filters)),
    }
}

/// The current connection attempt.
struct Conn {
    generation: u64,
    client: AsyncClient,
    stream: SpawnHandle,
    /// Its ConnAck came.
    up: bool,
    /// The broker answered something we sent on it.
    healthy: bool,
    /// Commands that arrived as backlog on it.
    backlog: u64,
    sync_timer: Option<SpawnHandle>,
}

pub struct Link {
    cfg: MqttConfig,
    confirm: ConfirmConfig,
    /// `confirm = "hub"`: when unconfirmed records go again.
    clock: ConfirmClock,
    topics: Topics,
    outbox: OutboxHandle,
    reader: OutboxReader,
    relay: Addr<Relay>,
    sup: Supervision,
    options: Option<MqttOptions>,
    delivery: Delivery,
    inbox: Inbox,
    reconnect: Reconnect,
    generation: u64,
    conn: Option<Conn>,
    /// The wait before the next attempt.
    wait: Option<SpawnHandle>,
    /// Failed attempts since the last connection, and since when.
    failures: u32,
    down_since: Option<Instant>,
    /// SIGTERM: no more reconnects; who waits for the goodbye.
    closing: bool,
    closing_reply: Option<oneshot::Sender<()>>,
    /// Home Assistant discovery, when configured or when configs published
    /// before must be removed.
    discovery: Option<Discovery>,
    /// `confirm = "hub"`: the timer armed for the clock's next wake-up.
    confirm_timer: Option<(Instant, SpawnHandle)>,
    /// Removals not yet sent to the outbox writer: held while a batch of
    /// events is handled, sent once at its end (one message, one wake-up of
    /// the writer, for the whole batch).
    removed: Vec<u64>,
    /// A batch of events is being handled: `perform` leaves the removals
    /// and the status report to its end.
    in_batch: bool,
}

/// The discovery round and how far the current connection got with it.
struct Discovery {
    round: homeassistant::Round,
    /// Configs acknowledged on the current connection.
    acked: usize,
    /// [`homeassistant::Published`] has been saved (once per process).
    saved: bool,
}

impl Link {
    pub fn new(
        cfg: MqttConfig,
        confirm: ConfirmConfig,
        topics: Topics,
        outbox: OutboxHandle,
        reader: OutboxReader,
        relay: Addr<Relay>,
        sup: Supervision,
    ) -> Link {
        let delivery = Delivery::new(cfg.max_inflight, confirm.mode);
        let reconnect = Reconnect::new(cfg.reconnect_min, cfg.reconnect_max);
        Link {
            cfg,
            confirm,
            clock: ConfirmClock::new(confirm.timeout),
            topics,
            outbox,
            reader,
            relay,
            sup,
            options: None,
            delivery,
            inbox: Inbox::new(),
            reconnect,
            generation: 0,
            conn: None,
            wait: None,
            failures: 0,
            down_since: Some(Instant::now()),
            closing: false,
            closing_reply: None,
            discovery: None,
            confirm_timer: None,
            removed: Vec::new(),
            in_batch: false,
        }
    }

    /// Announces the device to Home Assistant on every connect (see
    /// `homeassistant.rs`).
    pub fn with_discovery(mut self, round: Option<homeassistant::Round>) -> Link {
        self.discovery = round.map(|round| Discovery { round, acked: 0, saved: false });
        self
    }

    /// The discovery configs (and removals), as control publishes.
    fn discovery_publishes(&mut self) -> Vec<Control> {
        let Some(d) = self.discovery.as_mut() else { return Vec::new() };
        d.acked = 0;
        d.round
            .plan
            .messages
            .iter()
            .map(|m| {
                Control::Publish(
                    Tag::Discovery,
                    Submit::Publish {
                        topic: m.topic.clone(),
                        qos: QoS::AtLeastOnce,
                        retain: true,
                        payload: m.payload.clone(),
                    },
                )
            })
            .collect()
    }

    /// A discovery publish was acknowledged; once the whole round is, what
    /// was published is remembered (off this thread: it is a file write).
    fn discovery_done(&mut self) {
        let Some(d) = self.discovery.as_mut() else { return };
        d.acked += 1;
        if d.saved || d.acked < d.round.plan.messages.len() {
            return;
        }
        d.saved = true;
        let (published, dir) = (d.round.plan.published.clone(), d.round.state_dir.clone());
        let count = published.topics.len();
        let removed = d.round.plan.messages.len() - count;
        tokio::task::spawn_blocking(move || match published.save(&dir) {
            Ok(()) => tracing::info!("Home Assistant discovery: {count} entities announced, {removed} removed"),
            Err(e) => tracing::warn!("Home Assistant discovery: {e}; removed inputs may be announced again"),
        });
    }

    fn report(&mut self, ctx: &mut Context<Self>) {
        let unconfirmed = self.delivery.unconfirmed();
        self.clock.update(Instant::now(), unconfirmed, false);
        self.arm_confirm_timer(ctx);
        self.sup.board().link_delivery(self.delivery.in_flight(), unconfirmed, self.generation);
    }

    /// `confirm = "hub"`: (re)arms the timer for the clock's next wake-up,
    /// or disarms it when nothing is due.
    fn arm_confirm_timer(&mut self, ctx: &mut Context<Self>) {
        if self.confirm.mode != Confirm::Hub {
            return;
        }
        let want = self.clock.next_wake();
        if self.confirm_timer.as_ref().map(|(at, _)| *at) == want {
            return;
        }
        if let Some((_, handle)) = self.confirm_timer.take() {
            ctx.cancel_future(handle);
        }
        let Some(at) = want else { return };
        let handle = ctx.run_later(at.saturating_duration_since(Instant::now()), |act, ctx| {
            act.confirm_timer = None;
            act.confirm_tick(ctx);
            act.arm_confirm_timer(ctx);
        });
        self.confirm_timer = Some((at, handle));
    }

    /// The topics subscribed to on every ConnAck.
    fn filters(&self) -> Vec<String> {
        let mut filters = vec![self.topics.relay_set_filter(), self.topics.sync()];
        if self.confirm.mode == Confirm::Hub {
            filters.push(self.topics.ack());
        }
        if let Some(prefix) = self.discovery.as_ref().and_then(|d| d.round.birth_prefix.as_deref()) {
            filters.push(homeassistant::birth_topic(prefix));
        }
        filters
    }

    /// A `P/D/ack` from the hub: remove what it stored.
    fn on_stored_ack(&mut self, payload: &[u8], ctx: &mut Context<Self>) {
        if self.confirm.mode != Confirm::Hub {
            return;
        }
        let ack = match StoredAck::decode(payload) {
            Ok(ack) => ack,
            Err(e) => {
                tracing::warn!(topic = %self.topics.ack(), "confirmation ignored: {e}");
                return;
            }
        };
        let actions = self.delivery.confirmed(&ack);
        let removed = actions.iter().filter(|a| matches!(a, Action::Remove(_))).count();
        tracing::debug!(epoch = ack.epoch, named = ack.count(), removed, "the hub confirmed storage");
        if removed > 0 {
            self.clock.update(Instant::now(), self.delivery.unconfirmed(), true);
        }
        // Re-arms the confirmation timer (through `report`).
        self.perform(actions, ctx);
    }

    /// At [`ConfirmClock::next_wake`] with `confirm = "hub"`.
    fn confirm_tick(&mut self, ctx: &mut Context<Self>) {
        let waited = self.clock.current();
        let tick = self.clock.tick(Instant::now());
        if tick.warn {
            tracing::warn!(
                unconfirmed = self.delivery.unconfirmed(),
                "no fieldlink hub has confirmed anything in {}, while the broker acknowledges: records stay in the \
                 outbox and are sent again. Is the hub running and subscribed? For a plain broker (no fieldlink \
                 hub) set outbox.confirm = \"broker\"",
                humantime::format_duration(super::confirmations::WARN_AFTER)
            );
        }
        if tick.resend {
            let (n, actions) = self.delivery.resend_unconfirmed();
            if n > 0 {
                tracing::info!(
                    "{n} records the broker acknowledged were not confirmed by the hub within {}: sending them again",
                    humantime::format_duration(waited)
                );
            }
            self.perform(actions, ctx);
        }
    }

    fn up(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.up)
    }

    /// Starts a connection attempt with a fresh client.
    fn attempt(&mut self, ctx: &mut Context<Self>) {
        if self.closing || self.conn.is_some() {
            return;
        }
        let Some(options) = self.options.clone() else { return };
        self.generation += 1;
        let generation = self.generation;
        let capacity = usize::from(self.delivery.rumqttc_inflight()) + CHANNEL_SLACK;
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        // rumqttc leaves Nagle on (`NetworkOptions::new`, lib.rs:405-414 in
        // 0.25.1). A command's state PUBLISH and its PUBACK are two small
        // writes; with Nagle the second waits for the broker's delayed ACK
        // of the first (about 40 ms on Linux), which dominated a command's
        // round trip (#8). Keep the rest of rumqttc's defaults (its 5 s
        // connect time-out).
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        eventloop.pending.extend(self.delivery.connecting());
        tracing::debug!(generation, resends = eventloop.pending.len(), "connecting");
        let stream = ctx.add_stream(connection_events(generation, eventloop));
        self.conn = Some(Conn { generation, client, stream, up: false, healthy: false, backlog: 0, sync_timer: None });
        self.report(ctx);
    }

    fn on_connack(&mut self, session_present: bool, ctx: &mut Context<Self>) {
        let Some(conn) = self.conn.as_mut() else { return };
        conn.up = true;
        let generation = conn.generation;
        self.sup.board().link_up();
        let after = match (self.failures, self.down_since.take()) {
            (0, _) => String::new(),
            (n, Some(t)) => format!(" after {n} failed attempts over {:.1} s", t.elapsed().as_secs_f64()),
            (n, None) => format!(" after {n} failed attempts"),
        };
        self.failures = 0;
        tracing::info!(session_present, generation, "connected to {}:{}{after}", self.cfg.url.host, self.cfg.url.port);

        let nonce = format!("{:016x}", fastrand::u64(..));
        let status = Submit::Publish {
            topic: self.topics.status(),
            qos: QoS::AtLeastOnce,
            retain: true,
            payload: proto::ONLINE.to_vec(),
        };
        let sync = Submit::Publish {
            topic: self.topics.sync(),
            qos: QoS::AtLeastOnce,
            retain: false,
            payload: nonce.clone().into_bytes(),
        };
        let mut control = vec![
            Control::Subscribe(self.filters()),
            Control::Publish(Tag::Online, status),
            Control::Publish(Tag::Sync, sync),
        ];
        control.extend(self.discovery_publishes());
        let unconfirmed = self.delivery.unconfirmed();
        let connected = self.delivery.connected(session_present, control);
        if unconfirmed > 0 {
            // The broker may have lost what it acknowledged (a crash without
            // persistence), and the hub may never have got it.
            tracing::info!("sending the {unconfirmed} records that wait for the hub's confirmation again");
        }
        if connected.forgotten > 0 {
            tracing::warn!(
                "the broker has no session for us: replaying {} unacknowledged records from the outbox",
                connected.forgotten
            );
        }
        self.relay.do_send(LinkUp { session_present });
        if self.inbox.connected(generation, session_present, nonce.into_bytes()) {
            self.relay.do_send(CaughtUp);
        }
        self.arm_sync_timer(ctx);
        self.perform(connected.actions, ctx);
    }

    /// (Re)starts the wait for the sync echo.
    fn arm_sync_timer(&mut self, ctx: &mut Context<Self>) {
        let wait = self.cfg.keep_alive;
        let Some(conn) = self.conn.as_mut() else { return };
        if let Some(t) = conn.sync_timer.take() {
            ctx.cancel_future(t);
        }
        let generation = conn.generation;
        conn.sync_timer = Some(ctx.run_later(wait, move |act, _| act.sync_timed_out(generation)));
    }

    fn sync_timed_out(&mut self, generation: u64) {
        match self.conn.as_mut() {
            Some(conn) if conn.generation == generation && conn.up => conn.sync_timer = None,
            _ => return,
        }
        if self.inbox.echo_missing() {
            tracing::warn!(
                topic = %self.topics.sync(),
                "the sync nonce did not come back within keep_alive ({}): may the agent publish and subscribe to '{}'? Commands queued while offline are applied without knowing the backlog has ended",
                humantime::format_duration(self.cfg.keep_alive),
                self.topics.sync()
            );
        }
        if self.inbox.give_up_waiting() {
            self.relay.do_send(CaughtUp);
        }
    }

    fn on_publish(&mut self, publish: Publish, ctx: &mut Context<Self>) {
        let command = self.topics.is_relay_set_topic(&publish.topic);
        let sync = publish.topic == self.topics.sync();
        let confirmation = publish.topic == self.topics.ack();
        let topic = publish.topic.clone();
        let (payload, pkid, dup) = (publish.payload.to_vec(), publish.pkid, publish.dup);
        let was_waiting = self.inbox.waiting();
        match self.inbox.arrived(publish, command, sync) {
            Arrival::Command { id, backlog } => {
                if backlog && let Some(conn) = self.conn.as_mut() {
                    conn.backlog += 1;
                }
                let (done, rx) = oneshot::channel();
                self.relay.do_send(RelayCommand {
                    relay: self.topics.relay_of_set_topic(&topic).map(str::to_string),
                    topic,
                    payload,
                    pkid,
                    dup,
                    backlog,
                    done,
                });
                ctx.spawn(rx.into_actor(self).map(move |res, act, _| act.command_done(id, res.is_ok())));
            }
            Arrival::Echo { caught_up: true } => {
                let mut backlog = 0;
                if let Some(conn) = self.conn.as_mut() {
                    backlog = conn.backlog;
                    if let Some(t) = conn.sync_timer.take() {
                        ctx.cancel_future(t);
                    }
                }
                if backlog > 0 {
                    tracing::info!("caught up: {backlog} commands queued while offline have arrived");
                } else {
                    tracing::debug!("caught up: no command was queued while offline");
                }
                self.relay.do_send(CaughtUp);
            }
            Arrival::Echo { caught_up: false } => {}
            Arrival::Other if confirmation => self.on_stored_ack(&payload, ctx),
            Arrival::Other if self.is_birth(&topic, &payload) => {
                tracing::info!("Home Assistant (re)started: announcing the device again");
                let mut actions = Vec::new();
                for c in self.discovery_publishes() {
                    actions.extend(self.delivery.control(c));
                }
                self.perform(actions, ctx);
            }
            Arrival::Other => {
                tracing::warn!(topic = %topic, "message on a topic the agent does not handle; acknowledged and ignored")
            }
        }
        if was_waiting && self.inbox.waiting() {
            // The backlog is still coming: restart the wait.
            self.arm_sync_timer(ctx);
        }
        let acks = self.inbox.ready();
        self.send_acks(acks);
    }

    fn is_birth(&self, topic: &str, payload: &[u8]) -> bool {
        self.discovery
            .as_ref()
            .and_then(|d| d.round.birth_prefix.as_deref())
            .is_some_and(|prefix| homeassistant::is_birth(prefix, topic, payload))
    }

    /// The Relay is done with command `id`.
    fn command_done(&mut self, id: u64, applied: bool) {
        let acks = self.inbox.finished(id, applied);
        self.send_acks(acks);
    }

    fn send_acks(&self, acks: Vec<Publish>) {
        let Some(conn) = self.conn.as_ref() else { return };
        for p in acks {
            if let Err(e) = conn.client.try_ack(&p) {
                tracing::warn!(topic = %p.topic, "ack not sent: {e}");
            }
        }
    }

    fn perform(&mut self, actions: Vec<Action>, ctx: &mut Context<Self>) {
        for action in actions {
            match action {
                Action::Submit(s) => {
                    let sent = match self.conn.as_ref() {
                        Some(conn) => submit(&conn.client, s).map_err(|e| e.to_string()),
                        None => Err("no connection".to_string()),
                    };
                    if let Err(e) = sent {
                        tracing::debug!("submission refused: {e}");
                        let more = self.delivery.submit_failed();
                        return self.perform(more, ctx);
                    }
                }
                Action::Read { token, from, upto, limit } => {
                    let read = self.reader.read_async(from, upto, limit);
                    ctx.spawn(read.into_actor(self).map(move |res, act, ctx| act.on_records(token, res, ctx)));
                }
                Action::Remove(seq) => self.removed.push(seq),
                Action::Done(Tag::Offline) => self.finish_closing(true, ctx),
                Action::Done(Tag::Online | Tag::Sync) => {}
                Action::Done(Tag::Discovery) => self.discovery_done(),
                Action::Reconnect(desync) => {
                    self.flush_removed();
                    return self.desync(desync, ctx);
                }
            }
        }
        if !self.in_batch {
            self.flush_removed();
            self.report(ctx);
        }
    }

    /// Sends the removals held so far to the outbox writer, in one message.
    fn flush_removed(&mut self) {
        // Hub mode: `Remove` only ever follows the hub's confirmation.
        if !self.removed.is_empty() {
            self.outbox.ack(std::mem::take(&mut self.removed));
        }
    }

    fn on_records(&mut self, token: u64, res: Result<Vec<Record>, OutboxError>, ctx: &mut Context<Self>) {
        match res {
            Ok(records) => {
                let actions = self.delivery.records(token, records);
                self.perform(actions, ctx);
            }
            Err(e) => {
                tracing::error!("outbox read failed: {e}; reading again in {}", humantime::format_duration(READ_RETRY));
                self.delivery.read_failed(token);
                ctx.run_later(READ_RETRY, |act, ctx| {
                    let actions = act.delivery.pump_now();
                    act.perform(actions, ctx);
                });
            }
        }
    }

    fn desync(&mut self, desync: Desync, ctx: &mut Context<Self>) {
        tracing::error!(
            "delivery desync: {desync}; dropping the connection and resending (nothing was removed from the outbox)"
        );
        self.end_connection(format!("desync: {desync}"), Failure::Refused, true, ctx);
    }

    /// The current attempt or connection is over.
    fn end_connection(&mut self, error: String, failure: Failure, cancel: bool, ctx: &mut Context<Self>) {
        let Some(conn) = self.conn.take() else { return };
        if cancel {
            // Drops the EventLoop and with it the socket.
            ctx.cancel_future(conn.stream);
        }
        if let Some(t) = conn.sync_timer {
            ctx.cancel_future(t);
        }
        self.delivery.disconnected();
        self.inbox.disconnected();
        self.sup.board().link_down(error.clone());
        if conn.up {
            tracing::warn!("connection lost: {error}");
            self.relay.do_send(LinkDown);
            self.down_since = Some(Instant::now());
        } else {
            self.failures += 1;
            // Every refusal at warn, once per back-off step; a network
            // failure at warn first, then at info.
            crate::connect_failure::log_line(
                failure == Failure::Refused,
                &error,
                &self.peer(),
                u64::from(self.failures),
            );
        }
        self.report(ctx);
        if self.closing {
            self.finish_closing(false, ctx);
            return;
        }
        // A broker that accepted the connection and dropped it before
        // answering anything is not a network outage: no probing.
        let failure = if conn.up && !conn.healthy { Failure::Refused } else { failure };
        let wait = self.reconnect.failed(failure, fastrand::f64());
        tracing::debug!(?wait, "next connection attempt");
        let fut = wait_for_next_attempt(wait, self.cfg.url.host.clone(), self.cfg.url.port);
        let handle = ctx.spawn(fut.into_actor(self).map(|probed, act, ctx| {
            act.wait = None;
            if probed {
                tracing::info!("the broker answers again: connecting now");
            }
            act.attempt(ctx);
        }));
        self.wait = Some(handle);
    }

    /// Who the connect failure messages talk about.
    fn peer(&self) -> crate::connect_failure::Peer<'_> {
        crate::connect_failure::Peer {
            section: "mqtt",
            host: &self.cfg.url.host,
            port: self.cfg.url.port,
            client_id: &self.cfg.client_id,
            username: self.cfg.username.as_deref(),
            ca_file: self.cfg.ca_file.as_deref(),
            cert_file: self.cfg.cert_file.as_deref(),
        }
    }

    fn healthy(&mut self) {
        if let Some(conn) = self.conn.as_mut()
            && !conn.healthy
        {
            conn.healthy = true;
            self.reconnect.healthy();
        }
    }

    /// Ends the goodbye: a clean DISCONNECT once `offline` was acknowledged;
    /// otherwise the socket is just dropped so that the broker publishes the
    /// last will (`offline`) for us.
    fn finish_closing(&mut self, acked: bool, ctx: &mut Context<Self>) {
        // Once only: the time-out may fire after the ack.
        let Some(reply) = self.closing_reply.take() else { return };
        match self.conn.as_ref() {
            Some(conn) if acked => {
                if let Err(e) = conn.client.try_disconnect() {
                    tracing::debug!("disconnect not sent: {e}");
                }
            }
            Some(conn) => {
                if conn.up {
                    tracing::warn!("offline was not acknowledged in time; the broker's last will says offline");
                }
                if let Some(conn) = self.conn.take() {
                    ctx.cancel_future(conn.stream);
                }
            }
            None => {}
        }
        // The waiter may have given up already; nothing to do then.
        let _ = reply.send(());
    }
}

supervisor::supervised_actor!(Link);

impl Supervised for Link {
    fn restarting(&mut self, _: &mut Context<Self>) {
        // actix cancelled the streams and timers with the old context.
        if let Some(conn) = self.conn.take()
            && conn.up
        {
            self.relay.do_send(LinkDown);
        }
        self.wait = None;
        self.confirm_timer = None;
        self.in_batch = false;
        self.delivery.disconnected();
        self.inbox.disconnected();
        self.sup.restarting();
    }
}

impl SupervisedActor for Link {
    fn supervision(&mut self) -> &mut Supervision {
        &mut self.sup
    }

    fn init(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        self.options = Some(mqtt_options(&self.cfg, &self.topics)?);
        // Not connected yet: this only records the mark.
        let actions = self.delivery.durable(self.outbox.stats().durable_seq);
        self.perform(actions, ctx);
        self.attempt(ctx);
        Ok(())
    }
}

impl Link {
    /// One of rumqttc's events on the current connection.
    fn on_event(&mut self, event: Event, ctx: &mut Context<Self>) {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => self.on_connack(ack.session_present, ctx),
            Event::Incoming(Packet::Publish(p)) => self.on_publish(p, ctx),
            event => {
                if let Event::Incoming(Packet::SubAck(s)) = &event
                    && s.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    tracing::error!(
                        "the broker refused a subscription to one of {}: commands, catch-up or the hub's \
                         confirmations will not work",
                        self.filters().join(", ")
                    );
                }
                if matches!(event, Event::Incoming(Packet::SubAck(_) | Packet::PubAck(_) | Packet::PubComp(_))) {
                    self.healthy();
                }
                let actions = self.delivery.event(&event);
                self.perform(actions, ctx);
            }
        }
    }
}

impl StreamHandler<Item> for Link {
    fn handle(&mut self, (generation, item): Item, ctx: &mut Context<Self>) {
        let current = |link: &Link| link.conn.as_ref().map(|c| c.generation) == Some(generation);
        if !current(self) {
            return;
        }
        match item {
            Ok(events) => {
                // In order, as rumqttc produced them; the removals and the
                // status report wait for the end of the batch. An event
                // that ends the connection (a desync) makes the rest of
                // the batch stale: dropped, like any later event of that
                // generation.
                self.in_batch = true;
                for event in events {
                    if !current(self) {
                        break;
                    }
                    self.on_event(event, ctx);
                }
                self.in_batch = false;
                self.flush_removed();
                self.report(ctx);
            }
            Err(e) => {
                let why = crate::connect_failure::explain(&e, &self.peer());
                self.end_connection(why, failure_of(&e), false, ctx)
            }
        }
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // Each attempt's stream ends after its first error; that error
        // already scheduled the next attempt.
    }
}

impl Handler<Durable> for Link {
    type Result = ();

    fn handle(&mut self, msg: Durable, ctx: &mut Context<Self>) {
        let actions = self.delivery.durable_with(msg.0, msg.1);
        self.perform(actions, ctx);
    }
}

/// The watchdog's ping: answering it proves this actor's mailbox is served
/// (see `systemd`).
impl Handler<super::systemd::Ping> for Link {
    type Result = ();

    fn handle(&mut self, _: super::systemd::Ping, _: &mut Context<Self>) {}
}

impl Handler<Shutdown> for Link {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) -> ResponseFuture<()> {
        let (tx, rx) = oneshot::channel();
        self.closing = true;
        self.closing_reply = Some(tx);
        self.delivery.closing();
        if let Some(w) = self.wait.take() {
            ctx.cancel_future(w);
        }
        if self.up() {
            let offline = Submit::Publish {
                topic: self.topics.status(),
                qos: QoS::AtLeastOnce,
                retain: true,
                payload: proto::OFFLINE.to_vec(),
            };
            let actions = self.delivery.control(Control::Publish(Tag::Offline, offline));
            self.perform(actions, ctx);
            ctx.run_later(OFFLINE_ACK_TIMEOUT, |act, ctx| act.finish_closing(false, ctx));
        } else {
            // Not connected: the broker has published the last will.
            self.finish_closing(false, ctx);
        }
        Box::pin(async move {
            // A dropped sender also means "done".
            let _ = rx.await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{ConnectReturnCode, TlsError};

    #[test]
    fn only_network_failures_let_the_wait_probe_the_broker() {
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(failure_of(&ConnectionError::Io(io())), Failure::Network);
        assert_eq!(failure_of(&ConnectionError::NetworkTimeout), Failure::Network);
        assert_eq!(failure_of(&ConnectionError::MqttState(rumqttc::StateError::AwaitPingResp)), Failure::Network);
        assert_eq!(failure_of(&ConnectionError::Tls(TlsError::Io(io()))), Failure::Network);
        assert_eq!(failure_of(&ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)), Failure::Refused);
        assert_eq!(failure_of(&ConnectionError::Tls(TlsError::NoValidCertInChain)), Failure::Refused);
        // A handshake refusal comes wrapped in an io error (tokio-rustls).
        let untrusted = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let untrusted = std::io::Error::new(std::io::ErrorKind::InvalidData, untrusted);
        assert_eq!(failure_of(&ConnectionError::Tls(TlsError::Io(untrusted))), Failure::Refused);
    }
}

#[cfg(test)]
mod batch_tests {
    //! The write and read batching of a connection, against a scripted
    //! broker on 127.0.0.1 (a listener that answers with fixed bytes).
    use super::*;
    use futures_util::StreamExt;
    use rumqttc::{Outgoing, PubAck};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const N: u16 = 8;
    const PAYLOAD: usize = 20;
    /// PUBLISH QoS 1 to `t/x`: fixed header (2), topic (2 + 3), packet id (2), payload.
    const PUBLISH_LEN: usize = 2 + 2 + 3 + 2 + PAYLOAD;

    #[tokio::test]
    async fn publishes_queued_together_go_out_in_one_flush_and_their_acks_come_back_as_one_batch() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let broker = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut connect = [0u8; 256];
            let n = s.read(&mut connect).await.expect("read CONNECT");
            assert_eq!(connect[0], 0x10, "CONNECT first ({n} bytes)");
            s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.expect("CONNACK");
            let mut publishes = vec![0u8; PUBLISH_LEN * usize::from(N)];
            s.read_exact(&mut publishes).await.expect("read the publishes");
            let ids: Vec<u16> = publishes.chunks(PUBLISH_LEN).map(|p| u16::from_be_bytes([p[7], p[8]])).collect();
            // Every PUBACK in one write.
            let acks: Vec<u8> = ids.iter().flat_map(|id| [0x40, 0x02, (id >> 8) as u8, *id as u8]).collect();
            s.write_all(&acks).await.expect("PUBACKs");
            // The socket goes back to the test, open: an EOF behind the
            // acks would end the client's read with an error.
            (ids, s)
        });

        let mut options = MqttOptions::new("batch-test", "127.0.0.1", port);
        options.set_inflight(100);
        let (client, eventloop) = AsyncClient::new(options, 100);
        for _ in 0..N {
            client.try_publish("t/x", QoS::AtLeastOnce, false, vec![b'x'; PAYLOAD]).expect("queued");
        }
        let events = connection_events(1, eventloop);
        futures_util::pin_mut!(events);
        let mut next = async || match events.next().await {
            Some((1, Ok(batch))) => batch,
            other => panic!("expected a batch of events, got {other:?}"),
        };

        assert!(matches!(next().await.as_slice(), [Event::Incoming(Packet::ConnAck(_))]));
        let written = next().await;
        let expected: Vec<Event> = (1..=N).map(|id| Event::Outgoing(Outgoing::Publish(id))).collect();
        assert_eq!(written, expected, "all {N} queued publishes written by one poll, in order");
        let acked = next().await;
        let expected: Vec<Event> = (1..=N).map(|id| Event::Incoming(Packet::PubAck(PubAck::new(id)))).collect();
        assert_eq!(acked, expected, "the PUBACKs read together reach the Link as one batch");

        let (ids, _open) = broker.await.expect("broker");
        assert_eq!(ids, (1..=N).collect::<Vec<_>>(), "the broker got every publish once, in order");
    }
}
