//! Records device-to-cloud messages in the outbox: builds the [`Draft`] for a
//! [`Body`] so that its payload carries the envelope `device`, `epoch` and
//! the `seq` the outbox assigns. The one path by which Button, Relay and
//! Heartbeat produce messages; it never publishes anything itself (the Link
//! does, from the outbox).

use std::future::Future;
use std::time::SystemTime;

use crate::outbox::{Class, Draft, OutboxError, OutboxHandle};
use crate::proto::{self, Body, Qos};

#[derive(Clone)]
pub struct Recorder {
    device: String,
    epoch: u64,
    outbox: OutboxHandle,
}

impl Recorder {
    /// `epoch` is the outbox's: the identity of its seq counter (DESIGN:
    /// Topics and payloads), fixed for the life of the outbox.
    pub fn new(device: &str, epoch: u64, outbox: OutboxHandle) -> Recorder {
        Recorder { device: device.to_string(), epoch, outbox }
    }

    pub fn outbox(&self) -> &OutboxHandle {
        &self.outbox
    }

    /// Appends the message now (so calls are recorded in call order); the
    /// future resolves with its `seq` once it is durable. Dropping the
    /// future does not take the message back.
    pub fn record(
        &self,
        topic: String,
        qos: Qos,
        retain: bool,
        ts: SystemTime,
        body: Body,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send + 'static {
        let class = match body {
            Body::Heartbeat(_) => Class::Heartbeat,
            _ => Class::Event,
        };
        let (device, epoch) = (self.device.clone(), self.epoch);
        let payload = Box::new(move |seq| proto::render(&device, epoch, seq, ts, &body));
        self.outbox.append(Draft { topic, qos, retain, class, ts, payload })
    }
}
