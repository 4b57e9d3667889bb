//! Records device-to-cloud messages in the outbox: builds the [`Draft`] for a
//! [`Body`] so that its payload carries the envelope `device`, `epoch` and
//! the `seq` the outbox assigns. The one path by which Button, Relay and
//! Heartbeat produce messages; it never publishes anything itself (the Link
//! does, from the outbox). It also keeps the highest seq it has seen handed
//! out, for the status dump's `outbox.next_seq`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::outbox::{Class, Draft, OutboxError, OutboxHandle};
use crate::proto::{self, Body, Qos};

#[derive(Clone)]
pub struct Recorder {
    device: String,
    epoch: u64,
    outbox: OutboxHandle,
    /// The highest seq the outbox has handed to one of our payload builders
    /// (0: none yet). Shared by every clone.
    assigned: Arc<AtomicU64>,
}

impl Recorder {
    /// `epoch` is the outbox's: the identity of its seq counter (DESIGN:
    /// Topics and payloads), fixed for the life of the outbox.
    pub fn new(device: &str, epoch: u64, outbox: OutboxHandle) -> Recorder {
        Recorder { device: device.to_string(), epoch, outbox, assigned: Arc::new(AtomicU64::new(0)) }
    }

    pub fn outbox(&self) -> &OutboxHandle {
        &self.outbox
    }

    /// The seq the next record gets: one above the highest seq handed out
    /// so far, as far as this agent has seen. Every record is built by a
    /// [`Recorder`], whose payload builder learns its seq when the outbox
    /// assigns it; records the outbox itself renumbers (replayed from a
    /// database moved aside) are covered once they are durable. So
    /// `stats().durable_seq + 1 == next_seq()` means every record made so
    /// far is durable.
    pub fn next_seq(&self) -> u64 {
        let assigned = self.assigned.load(Ordering::Acquire);
        assigned.max(self.outbox.stats().durable_seq).saturating_add(1)
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
        let (device, epoch, assigned) = (self.device.clone(), self.epoch, self.assigned.clone());
        let payload = Box::new(move |seq| {
            assigned.fetch_max(seq, Ordering::AcqRel);
            proto::render(&device, epoch, seq, ts, &body)
        });
        self.outbox.append(Draft { topic, qos, retain, class, ts, payload })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::{Durability, OutboxConfig};
    use crate::outbox::{MemStore, open_in_memory};
    use crate::proto::{ButtonBody, ButtonState};

    fn press(r: &Recorder) {
        let body = Body::Button(ButtonBody { button: "door".into(), state: ButtonState::Pressed });
        // Appended when called; resolving the future is not needed here.
        drop(r.record("t/button/door".into(), Qos::AtLeastOnce, false, SystemTime::now(), body));
    }

    fn wait_depth(r: &Recorder, depth: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while r.outbox().stats().depth < depth {
            assert!(Instant::now() < deadline, "the outbox never held {depth} records");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn next_seq_counts_every_record_made_and_is_one_above_durable_seq_once_flushed() {
        // A flush interval no test waits for: only the explicit flush commits.
        let cfg =
            OutboxConfig { max_bytes: 1 << 20, durability: Durability::Batch, flush_interval: Duration::from_secs(10) };
        let (outbox, _reader, report) = open_in_memory(&MemStore::new(), &cfg).expect("in-memory outbox");
        let r = Recorder::new("pi", 0, outbox.clone());
        assert_eq!(r.next_seq(), report.next_seq, "before any record");
        for _ in 0..3 {
            press(&r);
        }
        wait_depth(&r, 3);
        assert_eq!(r.next_seq(), report.next_seq + 3);
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(outbox.flush())
            .expect("flush");
        assert_eq!(outbox.stats().durable_seq + 1, r.next_seq(), "everything made so far is durable");
        outbox.shutdown();
    }
}
