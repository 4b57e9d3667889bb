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
//!   `batch_wait` after the first, less if the stream goes quiet), writes
//!   them in one transaction, retries with back-off while the database is
//!   down, then acks — only on the connection the messages came in on; after
//!   a reconnect the broker redelivers them instead.
//!
//! It never serves HTTP and never builds SQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS};
use tokio::sync::{broadcast, mpsc, watch};

use super::commands::Commander;
use super::ingest;
use super::model::{CommandRow, LiveEvent, Update};
use super::store::{Store, StoreError};
use crate::agent::Backoff;
use crate::timefmt;

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
/// client that acks out of order, `broker.rs`).
struct Pending {
    update: Option<Update>,
    publish: Publish,
    generation: u64,
}

/// Counters for logs and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub refused: AtomicU64,
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
                let update = match ingest::parse(&settings.prefix, &p.topic, &p.payload, &at) {
                    Ok(update) => Some(update),
                    // The hub's own commands come back on its filter.
                    Err(ingest::IngestError::Command(_)) => None,
                    Err(e) => {
                        // Nothing to store and nothing a retry would fix.
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("not stored: {e}");
                        None
                    }
                };
                if tx.send(Pending { update, publish: p, generation: generation.load(Ordering::SeqCst) }).is_err() {
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
) {
    let batch_max = settings.batch_max.max(1);
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        let deadline = tokio::time::Instant::now() + settings.batch_wait;
        while items.len() < batch_max {
            let quiet = tokio::time::Instant::now() + QUIET;
            match tokio::time::timeout_at(deadline.min(quiet), rx.recv()).await {
                Ok(Some(p)) => items.push(p),
                Ok(None) | Err(_) => break,
            }
        }
        let updates: Vec<Update> = items.iter().filter_map(|p| p.update.clone()).collect();
        let (fresh, answered) =
            if updates.is_empty() { (Vec::new(), Vec::new()) } else { commit(&store, &updates, &counters).await };
        let current = generation.load(Ordering::SeqCst);
        for p in &items {
            if p.generation != current {
                continue;
            }
            if let Err(e) = client.try_ack(&p.publish) {
                tracing::warn!("ack not sent: {e}");
            }
        }
        for (update, is_new) in updates.iter().zip(&fresh) {
            match update {
                Update::Message(m) if *is_new => {
                    counters.stored.fetch_add(1, Ordering::Relaxed);
                    // Nobody listening is fine: the live stream is best effort.
                    let _ = live.send(LiveEvent::Message(m.clone()));
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

/// Writes one batch; returns, per update, whether it was newly stored, and
/// the commands it answered. A transient failure (database down, deadlock)
/// is retried with back-off until the database takes the batch: the messages
/// are not acknowledged before, so waiting is the only way not to lose them
/// (the broker would redeliver them only after a reconnect). An update the
/// database can never take (`StoreError::Invalid`) is left out, logged and
/// counted, and the rest retried at once, so one bad message cannot block
/// the stream.
async fn commit(store: &Store, updates: &[Update], counters: &Counters) -> (Vec<bool>, Vec<CommandRow>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    // Indexes into `updates` still to be written.
    let mut keep: Vec<usize> = (0..updates.len()).collect();
    loop {
        let batch: Vec<Update> = keep.iter().map(|&i| updates[i].clone()).collect();
        match store.write_batch_report(&batch).await {
            Ok(report) => {
                let mut fresh = vec![false; updates.len()];
                for (&i, stored) in keep.iter().zip(report.stored) {
                    fresh[i] = stored;
                }
                return (fresh, report.commands);
            }
            Err(StoreError::Invalid { index, reason }) if index < keep.len() => {
                counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("not stored: {reason}");
                keep.remove(index);
            }
            Err(e) => {
                let delay = backoff.next_delay(fastrand::f64());
                tracing::error!(
                    "batch of {} not stored: {e}; retrying in {}",
                    batch.len(),
                    humantime::format_duration(delay)
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}
