//! Records device-to-cloud messages in the outbox: builds the [`Draft`] for a
//! [`Body`] so that its payload carries the envelope `device`, `epoch` and
//! the `seq` the outbox assigns. The one path by which Button, Relay and
//! Heartbeat produce messages; it never publishes anything itself (the Link
//! does, from the outbox).

use std::future::Future;
use std::time::SystemTime;

use crate::outbox::{Class, Credit, Draft, OutboxError, OutboxHandle, Saved};
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
        self.outbox.append(self.draft(topic, qos, retain, ts, body))
    }

    /// Appends the message now, in call order, without waiting for it to
    /// be durable ([`crate::outbox::OutboxHandle::record`]): for a message
    /// whose outcome would only be logged (a button edge); the outbox logs
    /// a failure itself. Fails at once only when the outbox is shut down.
    /// `credit`, if the producer took one, goes with the record and is given
    /// back once the writer has stored it ([`crate::outbox::Credits`]).
    pub fn record_now(
        &self,
        topic: String,
        qos: Qos,
        retain: bool,
        ts: SystemTime,
        body: Body,
        credit: Option<Credit>,
    ) -> Result<(), OutboxError> {
        let mut draft = self.draft(topic, qos, retain, ts, body);
        draft.credit = credit;
        self.outbox.record(draft)
    }

    /// [`Recorder::record`] for a message someone waits on (a command's
    /// confirmation or refusal): committed at once in `batch` mode too, with
    /// `saved` (the Relay's saved state) written before it in the same
    /// commit ([`OutboxHandle::append_urgent`]).
    pub fn record_urgent(
        &self,
        topic: String,
        qos: Qos,
        retain: bool,
        ts: SystemTime,
        body: Body,
        saved: Vec<Saved>,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send + 'static {
        self.outbox.append_urgent(self.draft(topic, qos, retain, ts, body), saved)
    }

    fn draft(&self, topic: String, qos: Qos, retain: bool, ts: SystemTime, body: Body) -> Draft {
        let class = match body {
            Body::Heartbeat(_) => Class::Heartbeat,
            _ => Class::Event,
        };
        let (device, epoch) = (self.device.clone(), self.epoch);
        let payload = Box::new(move |seq| proto::render(&device, epoch, seq, ts, &body));
        Draft { topic, qos, retain, class, ts, payload, credit: None }
    }
}
