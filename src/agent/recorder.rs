//! Records device-to-cloud messages in the outbox: builds the [`Draft`] for a
//! [`Body`] so that its payload carries the `seq` the outbox assigns. The one
//! path by which Button, Relay and Heartbeat produce messages; it never
//! publishes anything itself (the Link does, from the outbox).

use std::future::Future;
use std::time::SystemTime;

use crate::outbox::{Class, Draft, OutboxError, OutboxHandle};
use crate::proto::{self, Body, Qos};

#[derive(Clone)]
pub struct Recorder {
    device: String,
    outbox: OutboxHandle,
}

impl Recorder {
    pub fn new(device: &str, outbox: OutboxHandle) -> Recorder {
        Recorder { device: device.to_string(), outbox }
    }

    pub fn outbox(&self) -> &OutboxHandle {
        &self.outbox
    }

    /// Appends the message now (so calls are recorded in call order); the
    /// future resolves with its `seq` once it is durable.
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
        let device = self.device.clone();
        let payload = Box::new(move |seq| proto::render(&device, seq, ts, &body));
        self.outbox.append(Draft { topic, qos, retain, class, ts, payload })
    }
}
