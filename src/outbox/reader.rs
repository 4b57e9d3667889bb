//! The read path: replay reads for the Link, on the caller's thread. Owns
//! merging the two class trees into one seq-ordered stream, capping reads at
//! what the writer has finished writing, and reporting records that do not
//! decode. It must not mutate the store or fsync: a corrupt record is handed
//! to the writer for removal (and counted there), and skipped here.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::record;
use super::store::Store;
use super::writer::Msg;
use super::{Class, HandleInner, OutboxError, Record, Shared};

/// Reads records straight from the store. Cheap to clone; `Send + Sync`.
///
/// Holding a reader keeps the database open (and its lock held) after the
/// writer has stopped; drop every clone before reopening the same state_dir.
#[derive(Clone)]
pub struct OutboxReader {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) shared: Arc<Shared>,
    /// To hand corrupt records to the writer. Weak, so that a reader alone
    /// does not keep the writer thread alive.
    pub(crate) writer: Weak<HandleInner>,
}

impl OutboxReader {
    /// Up to `limit` records with `from <= seq <= upto`, both classes merged,
    /// in seq order. Records that do not decode are skipped, logged and
    /// handed to the writer, which removes them and counts them as dropped.
    ///
    /// `upto` is capped at the last seq the writer has finished writing, so a
    /// read never returns a seq while a smaller one is still on its way in:
    /// resuming from the last returned seq + 1 skips nothing. To send only
    /// durable records, pass `upto = stats().durable_seq`.
    pub fn read(&self, from: u64, upto: u64, limit: usize) -> Result<Vec<Record>, OutboxError> {
        let upto = upto.min(self.shared.written_seq.load(Ordering::Acquire));
        let mut out = Vec::new();
        let mut cursor = from;
        while out.len() < limit && cursor <= upto {
            let want = limit - out.len();
            let heartbeats = self.store.range(Class::Heartbeat, cursor, upto, want).map_err(OutboxError::Read)?;
            let events = self.store.range(Class::Event, cursor, upto, want).map_err(OutboxError::Read)?;
            // Each class returned everything in range and all of it fits: this
            // pass reaches the end.
            let complete = heartbeats.len() + events.len() <= want && heartbeats.len() < want && events.len() < want;
            let merged = merge(heartbeats, events);
            let Some(&(last, _, _)) = merged.get(want.min(merged.len()).saturating_sub(1)) else {
                break;
            };
            for (seq, class, value) in merged.into_iter().take(want) {
                match record::decode(seq, class, &value) {
                    Ok(r) => out.push(r),
                    Err(e) => self.report_corrupt(seq, class, &e),
                }
            }
            if complete || last == u64::MAX {
                break;
            }
            cursor = last + 1;
        }
        Ok(out)
    }

    /// [`OutboxReader::read`] off the caller's thread: the Link must never do
    /// sled I/O on its own thread (a cache miss can page in, and a page-in can
    /// make sled write). Resolves with what `read` returns.
    pub fn read_async(
        &self,
        from: u64,
        upto: u64,
        limit: usize,
    ) -> impl std::future::Future<Output = Result<Vec<Record>, OutboxError>> + Send + 'static {
        let reader = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("outbox-read".into()).spawn(move || {
            // The caller may have stopped waiting; nothing to do then.
            let _ = tx.send(reader.read(from, upto, limit));
        });
        async move {
            if let Err(e) = spawned {
                return Err(OutboxError::Spawn(e));
            }
            rx.await.unwrap_or_else(|_| Err(OutboxError::Closed))
        }
    }

    /// The `ts_ms` of the oldest stored record, if any.
    pub fn oldest_ts_ms(&self) -> Option<u64> {
        [Class::Heartbeat, Class::Event]
            .into_iter()
            .filter_map(|class| match self.store.first(class) {
                Ok(Some((seq, value))) => match record::decode(seq, class, &value) {
                    Ok(r) => Some(r.ts_ms),
                    Err(e) => {
                        self.report_corrupt(seq, class, &e);
                        None
                    }
                },
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox: cannot read the oldest record");
                    None
                }
            })
            .min()
    }

    fn report_corrupt(&self, seq: u64, class: Class, error: &record::RecordError) {
        tracing::warn!(seq, ?class, %error, "outbox: skipping a record that does not decode");
        let sent = match self.writer.upgrade() {
            Some(writer) => writer.send(Msg::DropCorrupt { seq, reason: error.to_string() }),
            None => Err(OutboxError::Closed),
        };
        if sent.is_err() {
            // No writer to remove it: later reads skip it again, and the
            // next outbox opened on this state_dir removes it when read.
            tracing::debug!(seq, "outbox: writer stopped; the corrupt record stays for now");
        }
    }
}

/// Merges two seq-ordered runs into one.
fn merge(a: Vec<(u64, Vec<u8>)>, b: Vec<(u64, Vec<u8>)>) -> Vec<(u64, Class, Vec<u8>)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut a = a.into_iter().peekable();
    let mut b = b.into_iter().peekable();
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.0 < y.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let next = if take_a {
            a.next().map(|(s, v)| (s, Class::Heartbeat, v))
        } else {
            b.next().map(|(s, v)| (s, Class::Event, v))
        };
        out.extend(next);
    }
    out
}
