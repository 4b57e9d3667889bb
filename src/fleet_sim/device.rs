//! One simulated device: its own MQTT connection (rumqttc) on the fleet's
//! tokio runtime, connecting, waiting for the fleet's common start, sending
//! its planned messages at their planned times, and waiting for the broker's
//! acknowledgements before it disconnects. It owns that connection's life
//! and the counters it bumps; what it sends and when is [`super::plan`]'s.
//! It never reads the hub's database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::plan::{self, Plan};

/// Requests a device's client may queue before `publish` waits.
const CLIENT_CAPACITY: usize = 64;

/// Pause after a connection error before the event loop tries again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The fleet's counters, shared by every device.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub reconnects: AtomicU64,
    pub late_sends: AtomicU64,
}

/// What a device reports once, when it is connected or has given up.
pub type Connected = Result<(), String>;

/// Everything one device needs.
pub struct Device {
    pub index: usize,
    pub id: String,
    pub options: MqttOptions,
    pub qos: QoS,
    pub epoch: u64,
    pub topic_prefix: Arc<str>,
    pub plan: Arc<Plan>,
    pub counters: Arc<Counters>,
    /// How long the device waits for the broker to acknowledge its last
    /// messages before it disconnects anyway.
    pub ack_wait: Duration,
}

impl Device {
    /// Connects, reports on `connected`, waits for `start` (the common start
    /// instant), sends, waits for acks, disconnects. Returns how many
    /// messages it sent (seqs `1..=n` of its epoch).
    pub async fn run(self, connected: mpsc::Sender<Connected>, mut start: watch::Receiver<Option<Instant>>) -> u64 {
        let (client, eventloop) = AsyncClient::new(self.options.clone(), CLIENT_CAPACITY);
        let (acked_tx, mut acked_rx) = watch::channel(0_u64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let poller = tokio::spawn(poll(eventloop, connected, acked_tx, stop_rx, Arc::clone(&self.counters)));

        let Ok(start_at) = start.wait_for(Option::is_some).await.map(|s| s.unwrap_or_else(Instant::now)) else {
            // The fleet gave up before starting (not every device connected).
            let _ = stop_tx.send(true);
            poller.abort();
            return 0;
        };
        let period = self.plan.period();
        let mut sent = 0_u64;
        for k in 0..self.plan.per_device() {
            let due = start_at + self.plan.send_at(self.index, k);
            tokio::time::sleep_until(due).await;
            if Instant::now() > due + period {
                self.counters.late_sends.fetch_add(1, Ordering::Relaxed);
            }
            let seq = k + 1;
            let m = plan::message(&self.topic_prefix, &self.id, self.index, self.epoch, seq, SystemTime::now());
            if client.publish(m.topic, self.qos, false, m.payload).await.is_err() {
                // The event loop is gone; nothing more can be sent.
                break;
            }
            sent = seq;
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        if self.qos != QoS::AtMostOnce {
            let _ = tokio::time::timeout(self.ack_wait, acked_rx.wait_for(|&a| a >= sent)).await;
        }
        let _ = stop_tx.send(true);
        let _ = client.disconnect().await;
        // The poller ends on the outgoing DISCONNECT, or on the error after it.
        if tokio::time::timeout(Duration::from_secs(5), poller).await.is_err() {
            tracing::debug!(device = %self.id, "event loop did not end after DISCONNECT");
        }
        sent
    }
}

/// Drives the event loop: reports the first CONNACK (or a refusal), counts
/// acknowledgements and reconnects, and retries after errors until stopped.
async fn poll(
    mut eventloop: EventLoop,
    connected: mpsc::Sender<Connected>,
    acked: watch::Sender<u64>,
    stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
) {
    let mut reported = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if reported {
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                } else {
                    reported = true;
                    let _ = connected.send(Ok(())).await;
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => {
                counters.acked.fetch_add(1, Ordering::Relaxed);
                acked.send_modify(|a| *a += 1);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                if *stop.borrow() {
                    return;
                }
                if !reported && let ConnectionError::ConnectionRefused(code) = &e {
                    // Bad credentials do not get better by retrying.
                    let _ = connected.send(Err(format!("the broker refused the connection: {code:?}"))).await;
                    return;
                }
                tracing::debug!("connection error: {e}");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}
