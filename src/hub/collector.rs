//! The collector: the hub's MQTT client. It subscribes to every device (with
//! a persistent session, optionally through a shared subscription), stores
//! what arrives in batched transactions, and acknowledges each message to the
//! broker only after the transaction holding it committed (DESIGN: Hub). A
//! hub killed mid-batch therefore loses nothing: the broker delivers the
//! unacknowledged messages again and the store keeps each
//! `(device, epoch, seq)` once.
//!
//! Two tasks:
//!
//! * the poller drives rumqttc's event loop without pause (it never awaits
//!   anything but `poll()` and its own back-off), parses messages
//!   ([`ingest`]) and hands them to the batcher;
//! * the batcher groups up to `batch_max` messages (waiting at most
//!   `batch_wait` after the first, less if the stream goes quiet or the
//!   batch holds what the broker sends before it waits for acks: `Window`), writes
//!   them in one transaction, retries with back-off while the database is
//!   down, then acks — only on the connection the messages came in on; after
//!   a reconnect the broker redelivers them instead.
//!
//! # It never stops
//!
//! * Acks are awaited (`AsyncClient::ack`), never `try_ack`: rumqttc's
//!   `EventLoop::select` (rumqttc-0.25.1 `src/eventloop.rs:193`) hands out
//!   buffered incoming packets before it looks at the request channel, and
//!   `readb` (`src/framed.rs`) buffers up to `max_request_batch`/100
//!   packets a read; under a backlog the 1,024-slot request channel filled,
//!   `try_ack` failed ("Failed to send mqtt requests to eventloop"), the
//!   dropped PUBACKs kept the broker's in-flight window full and ingestion
//!   stopped for good. An awaited ack waits for room instead, while the
//!   poller keeps polling, whose `select!` (line 200) takes requests as
//!   soon as the buffer is empty.
//! * A message the database refuses for its data (SQLSTATE class 22/23,
//!   SQLite TOOBIG/CONSTRAINT/MISMATCH: [`StoreError::is_refused_data`]) is
//!   set aside: its batch is written again one message at a time, the one
//!   refused is counted (`set_aside`), logged once at warn and acknowledged,
//!   and the rest flows.
//! * Every message refused at ingest or set aside by the database is also
//!   recorded in the `set_aside` table (bounded, NUL-escaped:
//!   [`ingest::set_aside`]) before its ack, one short transaction each, so
//!   the dashboard shows it. If even that fails it is logged at error and
//!   counted (`set_aside_unrecorded`); the ack is not held back. Other errors (database down, permissions) are
//!   retried with back-off: setting every message aside would lose them.
//! * A shutdown ends a retry at once: what is not committed is not
//!   acknowledged, and the broker delivers it again to the next hub.
//! * The client accepts any packet MQTT allows ([`MAX_INCOMING`]): a packet
//!   over rumqttc's limit is a connection error, and the broker would
//!   redeliver it on every reconnect, forever. Payloads over
//!   [`ingest::MAX_PAYLOAD`] are refused at ingest instead (acknowledged).
//!
//! # It confirms what it stored
//!
//! After each commit, the batcher publishes to every device in the batch
//! which of its messages the hub now holds: `P/D/ack`, QoS 1, not
//! retained, a [`StoredAck`] per device and epoch (`{"epoch":E,"seqs":
//! [[first,last],...]}`; several epochs in one batch: one ack each). It
//! names every message of the batch with an identity: newly stored,
//! duplicates of stored ones, and those set aside or refused at ingest
//! whose topic and payload still name a device and `(epoch, seq)`, so an
//! agent never resends a message the hub will not take. An agent with
//! `outbox.confirm = "hub"` removes a record only on this ack (DESIGN:
//! Delivery promises). The publishes are awaited like the acks (room in
//! the request channel, never dropped); one lost with the connection costs
//! a resend after the agent's `confirm_timeout`, which the store
//! deduplicates and confirms again.
//!
//! It never serves HTTP and never builds SQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS};
use tokio::sync::{broadcast, mpsc, watch};

use super::commands::Commander;
use super::ingest;
use super::metrics::Metrics;
use super::model::{CommandRow, LiveEvent, SetAside, Update};
use super::store::{Store, StoreError};
use crate::agent::Backoff;
use crate::proto::{StoredAck, Topics};
use crate::timefmt;

/// The largest MQTT packet there is (a 268,435,455-byte remaining length
/// plus its 5-byte fixed header): rumqttc refuses a bigger one with
/// `PayloadSizeLimitExceeded` and drops the connection (`mqttbytes/mod.rs`
/// `check`), so with this limit no packet the broker forwards can.
pub const MAX_INCOMING: usize = 268_435_455 + 5;

/// How long the batcher waits for more once messages stop arriving.
const QUIET: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub struct Settings {
    pub prefix: String,
    pub shared_group: Option<String>,
    pub batch_max: usize,
    pub batch_wait: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

/// A received message waiting for its commit; `None` for one that is not
/// stored (it is still acknowledged in arrival order: rumqttd disconnects a
/// client that acks out of order, `broker.rs`). `aside` is the record of a
/// message refused at ingest, written before its ack.
struct Pending {
    update: Option<Update>,
    aside: Option<SetAside>,
    publish: Publish,
    generation: u64,
}

/// Counters for logs and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub refused: AtomicU64,
    /// Messages the database refused for their data (never retried).
    pub set_aside: AtomicU64,
    /// Set-aside records (of refused or set-aside messages) that could not
    /// be written to the `set_aside` table.
    pub set_aside_unrecorded: AtomicU64,
    /// Messages stored with fields of the wrong type replaced by null.
    pub nulled: AtomicU64,
    /// What `GET /metrics` shows (per kind, latency, database errors).
    pub metrics: Arc<Metrics>,
    /// `P/D/ack` confirmations published.
    pub confirmations: AtomicU64,
}

/// Runs the poller and the batcher until `shutdown` turns true; then the
/// messages in hand are committed and acknowledged (the event loop keeps
/// being polled so the acks go out) before a clean disconnect.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: AsyncClient,
    mut eventloop: EventLoop,
    store: Store,
    commander: Commander,
    live: broadcast::Sender<LiveEvent>,
    settings: Settings,
    counters: Arc<Counters>,
    shutdown: watch::Receiver<bool>,
) {
    let outgoing = eventloop.mqtt_options.max_packet_size();
    eventloop.mqtt_options.set_max_packet_size(MAX_INCOMING, outgoing.min(MAX_INCOMING));
    let generation = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::unbounded_channel();
    let mut batcher = tokio::spawn(batch(
        client.clone(),
        rx,
        store,
        commander,
        live,
        settings.clone(),
        generation.clone(),
        counters.clone(),
        shutdown.clone(),
    ));
    poll(&client, &mut eventloop, &settings, &generation, tx, &counters, shutdown).await;
    // The sender is gone: the batcher commits what it holds and ends. Keep
    // the connection serviced meanwhile so its acks reach the broker.
    loop {
        tokio::select! {
            _ = &mut batcher => break,
            e = eventloop.poll() => if e.is_err() { break },
        }
    }
    if client.try_disconnect().is_ok() {
        // Until the DISCONNECT is written (bounded: the broker may be gone).
        let flush = async {
            while let Ok(e) = eventloop.poll().await {
                if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
    }
    tracing::info!(
        stored = counters.stored.load(Ordering::Relaxed),
        duplicates = counters.duplicates.load(Ordering::Relaxed),
        refused = counters.refused.load(Ordering::Relaxed),
        set_aside = counters.set_aside.load(Ordering::Relaxed),
        set_aside_unrecorded = counters.set_aside_unrecorded.load(Ordering::Relaxed),
        nulled = counters.nulled.load(Ordering::Relaxed),
        confirmations = counters.confirmations.load(Ordering::Relaxed),
        "collector stopped"
    );
}

/// Polls until shutdown, forwarding parsed messages to the batcher.
async fn poll(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    settings: &Settings,
    generation: &AtomicU64,
    tx: mpsc::UnboundedSender<Pending>,
    counters: &Counters,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(settings.reconnect_min, settings.reconnect_max);
    let filter = ingest::filter(&settings.prefix, settings.shared_group.as_deref());
    let mut connected = false;
    let mut failed_connects = 0;
    loop {
        let event = tokio::select! {
            // poll() is cancelled only at shutdown; a write it cuts short is
            // a message the broker delivers again.
            e = eventloop.poll() => e,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                connected = true;
                failed_connects = 0;
                generation.fetch_add(1, Ordering::SeqCst);
                tracing::info!(session_present = ack.session_present, "hub connected to the broker");
                if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    tracing::error!("subscribe not sent: {e}");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let at = timefmt::rfc3339_millis(SystemTime::now());
                let mut aside = None;
                let update = match ingest::parse(&settings.prefix, &p.topic, &p.payload, &at) {
                    Ok(parsed) => {
                        if !parsed.nulled.is_empty() {
                            counters.nulled.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                "stored with null for the wrongly typed {} on '{}'",
                                parsed.nulled.join(", "),
                                p.topic
                            );
                        }
                        Some(parsed.update)
                    }
                    // The hub's own commands come back on its filter.
                    Err(ingest::IngestError::Command(_)) => None,
                    Err(e) => {
                        // Nothing to store and nothing a retry would fix.
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                        counters.metrics.refused(ingest::topic_kind(&settings.prefix, &p.topic));
                        tracing::warn!("not stored: {e}");
                        aside = Some(ingest::set_aside(&settings.prefix, &p.topic, &p.payload, &e.to_string(), &at));
                        None
                    }
                };
                let generation = generation.load(Ordering::SeqCst);
                if tx.send(Pending { update, aside, publish: p, generation }).is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                if s.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    tracing::error!("the broker refused the subscription to {filter}: devices will not be stored");
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    tracing::warn!("hub lost the broker: {e}");
                    connected = false;
                } else {
                    failed_connects += 1;
                    crate::connect_failure::log_for_options(&e, &eventloop.mqtt_options, "broker", failed_connects);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay(fastrand::f64())) => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn batch(
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    store: Store,
    commander: Commander,
    live: broadcast::Sender<LiveEvent>,
    settings: Settings,
    generation: Arc<AtomicU64>,
    counters: Arc<Counters>,
    shutdown: watch::Receiver<bool>,
) {
    let batch_max = settings.batch_max.max(1);
    let mut window = Window::default();
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        let deadline = tokio::time::Instant::now() + settings.batch_wait;
        let mut stalled = false;
        while items.len() < batch_max {
            match rx.try_recv() {
                Ok(p) => {
                    items.push(p);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) if window.full(items.len()) => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            let quiet = tokio::time::Instant::now() + QUIET;
            match tokio::time::timeout_at(deadline.min(quiet), rx.recv()).await {
                Ok(Some(p)) => items.push(p),
                Ok(None) => break,
                Err(_) => {
                    stalled = quiet <= deadline;
                    break;
                }
            }
        }
        if stalled {
            window.stalled_at(items.len());
        }
        // Which item each update came from.
        let from: Vec<usize> = (0..items.len()).filter(|&i| items[i].update.is_some()).collect();
        let updates: Vec<Update> = items.iter().filter_map(|p| p.update.clone()).collect();
        let started = std::time::Instant::now();
        let (fresh, answered, refused, committed) = if updates.is_empty() {
            (Vec::new(), Vec::new(), Vec::new(), SystemTime::now())
        } else {
            match commit(&store, &updates, &counters, shutdown.clone()).await {
                Some((fresh, answered, refused)) => (fresh, answered, refused, SystemTime::now()),
                // Shutting down: not committed, so not acknowledged.
                None => break,
            }
        };
        tracing::debug!("batch of {} ({} stored) written in {:?}", items.len(), updates.len(), started.elapsed());
        // Recorded before the ack (the message is gone after it), each in a
        // transaction of its own; a failure is logged and counted, never
        // waited out.
        let at = timefmt::rfc3339_millis(SystemTime::now());
        let refused_records = refused.iter().map(|(u, e)| {
            let p = &items[from[*u]].publish;
            ingest::set_aside(&settings.prefix, &p.topic, &p.payload, e, &at)
        });
        let records: Vec<SetAside> = items.iter().filter_map(|p| p.aside.clone()).chain(refused_records).collect();
        counters.metrics.set_aside.fetch_add(records.len() as u64, Ordering::Relaxed);
        for r in &records {
            record_set_aside(&store, r, &counters).await;
        }
        let current = generation.load(Ordering::SeqCst);
        for p in &items {
            if p.generation != current {
                continue;
            }
            // Awaited: waits for room in the request channel, never drops
            // an ack (module doc). It fails only once the event loop is gone.
            if let Err(e) = client.ack(&p.publish).await {
                tracing::error!("ack not sent, the broker will deliver it again: {e}");
                break;
            }
        }
        // Committed (or set aside for good): tell the agents, whatever
        // connection the messages came in on.
        confirm(&client, &settings.prefix, &items, &counters).await;
        for (update, is_new) in updates.iter().zip(&fresh) {
            match update {
                Update::Message(m) if *is_new => {
                    counters.stored.fetch_add(1, Ordering::Relaxed);
                    counters.metrics.stored(m.kind);
                    if let Some(ts) = timefmt::parse_rfc3339(&m.ts) {
                        // A ts in the future (a fast clock) counts as no delay.
                        counters.metrics.latency.observe(committed.duration_since(ts).unwrap_or_default());
                    }
                    // Nobody listening is fine: the live stream is best
                    // effort (and then the message is not copied for it).
                    if live.receiver_count() > 0 {
                        let _ = live.send(LiveEvent::Message(m.clone()));
                    }
                }
                Update::Message(_) => {
                    counters.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                Update::Status { device, online, at } => {
                    let _ = live.send(LiveEvent::Status { device: device.clone(), online: *online, at: at.clone() });
                }
            }
        }
        commander.answered(&answered);
    }
}

/// What the batcher learned of the broker's window: how many unacknowledged
/// messages it sends before it waits for acks (mosquitto's
/// `max_inflight_messages`, 20 by default). The client cannot ask; it sees
/// it when a batch stalls: messages stopped coming for [`QUIET`] while the
/// batch waited (`batch_wait` not over). Then a batch holding that many, with
/// nothing more in hand, is written at once instead of waiting out
/// [`QUIET`] again for messages the broker will not send before the acks:
/// under a backlog that wait was most of the time per batch. A stall in a
/// trickle of messages (a real lull) only makes the next batches close at
/// that size when nothing else is waiting, which is never fewer messages
/// per commit than that lull gave.
#[derive(Debug, Default)]
struct Window {
    stalled_at: Option<usize>,
}

impl Window {
    fn stalled_at(&mut self, held: usize) {
        self.stalled_at = Some(held);
    }

    /// Whether a batch of `held` messages, with none more in hand, has what
    /// the broker sends before it waits for acks.
    fn full(&self, held: usize) -> bool {
        self.stalled_at.is_some_and(|w| held >= w)
    }
}

/// The device and identity of each item that names one: every parsed
/// message of the batch, and those refused at ingest whose topic and
/// payload still name a device, epoch and seq.
fn identities(prefix: &str, items: &[Pending]) -> Vec<(String, u64, u64)> {
    items
        .iter()
        .filter_map(|p| match &p.update {
            Some(Update::Message(m)) => Some((m.device.clone(), m.epoch, m.seq)),
            Some(Update::Status { .. }) => None,
            None if p.aside.is_some() => ingest::identity(prefix, &p.publish.topic, &p.publish.payload),
            None => None,
        })
        .collect()
}

/// The confirmations for `items`, in first-seen order of device and
/// epoch: `(topic, ack)`. A device segment that is no valid topic level
/// to publish to (`+`, `#`) gets none.
fn confirmations(prefix: &str, items: &[Pending]) -> Vec<(String, StoredAck)> {
    let mut groups: Vec<((String, u64), Vec<u64>)> = Vec::new();
    for (device, epoch, seq) in identities(prefix, items) {
        if device.contains(['+', '#']) {
            continue;
        }
        match groups.iter_mut().find(|((d, e), _)| *d == device && *e == epoch) {
            Some((_, seqs)) => seqs.push(seq),
            None => groups.push(((device, epoch), vec![seq])),
        }
    }
    let mut out = Vec::new();
    for ((device, epoch), seqs) in groups {
        let topic = Topics::new(prefix, &device).ack();
        out.extend(StoredAck::for_seqs(epoch, seqs).into_iter().map(|a| (topic.clone(), a)));
    }
    out
}

/// Publishes the confirmations of a committed batch (module doc), awaited.
async fn confirm(client: &AsyncClient, prefix: &str, items: &[Pending], counters: &Counters) {
    for (topic, ack) in confirmations(prefix, items) {
        match client.publish(topic.as_str(), QoS::AtLeastOnce, false, ack.encode()).await {
            Ok(()) => {
                counters.confirmations.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // Only once the event loop is gone (shutdown): the agent
                // sends these again after its confirm_timeout.
                tracing::warn!("confirmation on '{topic}' not sent: {e}");
                return;
            }
        }
    }
}

/// What [`commit`] did: per update, newly stored; the commands answered;
/// the updates refused for their data (by index) and why.
type Committed = (Vec<bool>, Vec<CommandRow>, Vec<(usize, String)>);

/// Writes one batch; `None` when `shutdown` came first (nothing of the
/// batch may then be acknowledged). An update the database can never take
/// is left out, counted and logged, and the rest written (module doc).
async fn commit(
    store: &Store,
    updates: &[Update],
    counters: &Counters,
    shutdown: watch::Receiver<bool>,
) -> Option<Committed> {
    let all: Vec<usize> = (0..updates.len()).collect();
    match write(store, updates, &all, counters, shutdown.clone()).await {
        Written::Done(fresh, answered, invalid) => return Some((fresh, answered, invalid)),
        Written::Shutdown => return None,
        Written::Refused(e) if updates.len() == 1 => {
            set_aside(counters, &updates[0], &e);
            return Some((vec![false], Vec::new(), vec![(0, format!("the database refuses it: {e}"))]));
        }
        Written::Refused(_) => {}
    }
    // One at a time, to find which the database refuses.
    let mut fresh = vec![false; updates.len()];
    let mut answered = Vec::new();
    let mut refused = Vec::new();
    for i in 0..updates.len() {
        match write(store, updates, &[i], counters, shutdown.clone()).await {
            Written::Done(f, a, invalid) => {
                fresh[i] = f[i];
                answered.extend(a);
                refused.extend(invalid);
            }
            Written::Refused(e) => {
                set_aside(counters, &updates[i], &e);
                refused.push((i, format!("the database refuses it: {e}")));
            }
            Written::Shutdown => return None,
        }
    }
    Some((fresh, answered, refused))
}

/// How long writing one set-aside record may take before it is given up.
const RECORD_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes `r` to the `set_aside` table, once; a failure (or a database that
/// does not answer within [`RECORD_TIMEOUT`]) is logged at error and
/// counted, and ingestion goes on.
async fn record_set_aside(store: &Store, r: &SetAside, counters: &Counters) {
    let failed = match tokio::time::timeout(RECORD_TIMEOUT, store.insert_set_aside(r)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {}", humantime::format_duration(RECORD_TIMEOUT)),
    };
    counters.set_aside_unrecorded.fetch_add(1, Ordering::Relaxed);
    counters.metrics.db_errors.fetch_add(1, Ordering::Relaxed);
    tracing::error!("set-aside message on '{}' not recorded for the dashboard: {failed}", r.topic);
}

fn set_aside(counters: &Counters, update: &Update, e: &StoreError) {
    counters.set_aside.fetch_add(1, Ordering::Relaxed);
    counters.metrics.refused(update_kind(update));
    let what = match update {
        Update::Message(m) => format!("{} {} seq {} of {} (epoch {})", m.kind.as_str(), m.ts, m.seq, m.device, m.epoch),
        Update::Status { device, .. } => format!("status of {device}"),
    };
    tracing::warn!("set aside, the database refuses it: {what}: {e}");
}

/// The metrics label of an update's kind.
fn update_kind(update: &Update) -> &'static str {
    match update {
        Update::Message(m) => m.kind.as_str(),
        Update::Status { .. } => "status",
    }
}

enum Written {
    /// Per update of the whole list, newly stored; commands answered; and
    /// the updates (by index in the whole list) the store's checks refused.
    Done(Vec<bool>, Vec<CommandRow>, Vec<(usize, String)>),
    /// The database refuses the data (a retry would fail the same way).
    Refused(StoreError),
    Shutdown,
}

/// Writes `updates[keep]` in one transaction. Transient and unexplained
/// failures are retried with back-off until the database takes the batch or
/// `shutdown` turns true; `StoreError::Invalid` drops that update (counted
/// as refused) and retries the rest at once.
async fn write(
    store: &Store,
    updates: &[Update],
    keep: &[usize],
    counters: &Counters,
    mut shutdown: watch::Receiver<bool>,
) -> Written {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut keep = keep.to_vec();
    let mut invalid = Vec::new();
    loop {
        if *shutdown.borrow() {
            return Written::Shutdown;
        }
        // The whole list as it is (the common case), or a copy of the part kept.
        let part: Vec<Update>;
        let batch = if keep.len() == updates.len() {
            updates
        } else {
            part = keep.iter().map(|&i| updates[i].clone()).collect();
            &part
        };
        match store.write_batch_report(batch).await {
            Ok(report) => {
                let mut fresh = vec![false; updates.len()];
                for (&i, stored) in keep.iter().zip(report.stored) {
                    fresh[i] = stored;
                }
                return Written::Done(fresh, report.commands, invalid);
            }
            Err(StoreError::Invalid { index, reason }) if index < keep.len() => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                counters.metrics.refused(update_kind(&updates[keep[index]]));
                tracing::warn!("not stored: {reason}");
                invalid.push((keep.remove(index), format!("not stored: {reason}")));
            }
            Err(e) if e.is_refused_data() => return Written::Refused(e),
            Err(e) => {
                counters.metrics.db_errors.fetch_add(1, Ordering::Relaxed);
                let delay = backoff.next_delay(fastrand::f64());
                tracing::error!(
                    "batch of {} not stored: {e}; retrying in {}",
                    batch.len(),
                    humantime::format_duration(delay)
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|s| *s) => return Written::Shutdown,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::model::{Kind, Message};

    fn message(device: &str, epoch: u64, seq: u64) -> Pending {
        let m = Message {
            device: device.into(),
            epoch,
            seq,
            ts: "2026-11-21T10:00:00.000Z".into(),
            kind: Kind::Button,
            name: Some("door".into()),
            payload: serde_json::json!({}),
        };
        let publish = Publish::new(format!("fl/{device}/button/door"), QoS::AtLeastOnce, Vec::new());
        Pending { update: Some(Update::Message(m)), aside: None, publish, generation: 1 }
    }

    fn refused(topic: &str, payload: &[u8]) -> Pending {
        let publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        let aside = ingest::set_aside("fl", topic, payload, "refused", "2026-11-21T10:00:00.000Z");
        Pending { update: None, aside: Some(aside), publish, generation: 1 }
    }

    #[test]
    fn a_batch_as_large_as_the_last_stalled_one_is_written_without_waiting() {
        let mut w = Window::default();
        assert!(!w.full(1000), "nothing learned yet: wait for more");
        w.stalled_at(20);
        assert!(!w.full(19));
        assert!(w.full(20));
        assert!(w.full(21));
        w.stalled_at(40);
        assert!(!w.full(20), "the newest stall counts");
    }

    #[test]
    fn a_batch_is_confirmed_once_per_device_and_epoch_with_refused_messages_that_name_themselves() {
        let status = Pending {
            update: Some(Update::Status { device: "a".into(), online: true, at: "x".into() }),
            aside: None,
            publish: Publish::new("fl/a/status", QoS::AtLeastOnce, b"online".to_vec()),
            generation: 1,
        };
        let command = Pending {
            update: None,
            aside: None,
            publish: Publish::new("fl/a/relay/pump/set", QoS::AtLeastOnce, b"on".to_vec()),
            generation: 1,
        };
        let items = vec![
            message("a", 1, 3),
            message("b", 1, 9),
            status,
            message("a", 1, 4),
            message("a", 2, 1),
            command,
            refused("fl/a/error", br#"{"device":"a","epoch":1,"seq":5,"message":"\u0000"}"#),
            refused("fl/a/error", b"not json"),
            message("a", 1, 3),
            refused("fl/+/button/x", br#"{"epoch":1,"seq":1}"#),
        ];
        let got: Vec<(String, String)> = confirmations("fl", &items)
            .into_iter()
            .map(|(t, a)| (t, String::from_utf8_lossy(&a.encode()).into()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("fl/a/ack".to_string(), r#"{"epoch":1,"seqs":[[3,5]]}"#.to_string()),
                ("fl/b/ack".to_string(), r#"{"epoch":1,"seqs":[[9,9]]}"#.to_string()),
                ("fl/a/ack".to_string(), r#"{"epoch":2,"seqs":[[1,1]]}"#.to_string()),
            ]
        );
    }
}
