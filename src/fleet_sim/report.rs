//! The fleet simulator's result: counts and the publish → commit latency
//! distribution, computed from what the sim sent and the rows the hub stored;
//! sans-IO (it is handed the rows, never queries a database). It owns the
//! definitions of stored, lost, duplicates and the percentiles, and the
//! printed table; it never decides what to send.

use std::collections::HashMap;
use std::fmt::Write as _;

/// One stored row of the hub's `messages` table, reduced to what the check
/// needs: its identity and both timestamps in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRow<'a> {
    pub device: &'a str,
    pub epoch: u64,
    pub seq: u64,
    /// The payload's `ts`: when the sim built and published the message.
    pub ts_ms: u64,
    /// The hub's `received_at`: when it wrote the batch that stored the row.
    pub stored_ms: u64,
}

/// What the database says about the run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Verified {
    /// Distinct `(device, epoch, seq)` sent in this run that the hub stored.
    pub stored: u64,
    /// Sent in this run and never stored.
    pub lost: u64,
    /// Rows beyond the first for one `(device, epoch, seq)` (the hub's key
    /// makes this 0 unless the schema lost it), plus rows of this run's
    /// devices and epoch with a seq the sim never sent.
    pub duplicates: u64,
    /// A few lost identities, to look up by hand.
    pub lost_examples: Vec<(String, u64)>,
    /// Publish → commit, milliseconds, over the stored messages.
    pub latency: Option<Latency>,
}

/// Percentiles (nearest rank) of publish → commit in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

impl Latency {
    /// Nearest-rank percentiles of `samples`; `None` when there are none.
    pub fn of(mut samples: Vec<u64>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            let n = samples.len();
            // Nearest rank: ceil(p × n), 1-based.
            let r = ((p * n as f64).ceil() as usize).clamp(1, n);
            samples[r - 1]
        };
        Some(Latency { p50: rank(0.50), p95: rank(0.95), p99: rank(0.99), max: samples[samples.len() - 1] })
    }
}

/// Compares what each device sent (`sent[device]` = seqs 1..=n of `epoch`)
/// with the rows the hub stored for those devices and that epoch.
pub fn verify<'a>(epoch: u64, sent: &HashMap<String, u64>, rows: impl IntoIterator<Item = StoredRow<'a>>) -> Verified {
    let mut seen: HashMap<(&str, u64), u32> = HashMap::new();
    let mut v = Verified::default();
    let mut samples = Vec::new();
    for row in rows {
        let Some(&n) = sent.get(row.device) else { continue };
        if row.epoch != epoch {
            continue;
        }
        if row.seq == 0 || row.seq > n {
            v.duplicates += 1;
            continue;
        }
        let count = seen.entry((row.device, row.seq)).or_default();
        *count += 1;
        if *count > 1 {
            v.duplicates += 1;
            continue;
        }
        v.stored += 1;
        samples.push(row.stored_ms.saturating_sub(row.ts_ms));
    }
    let mut devices: Vec<(&String, &u64)> = sent.iter().collect();
    devices.sort();
    for (device, &n) in devices {
        for seq in 1..=n {
            if !seen.contains_key(&(device.as_str(), seq)) {
                v.lost += 1;
                if v.lost_examples.len() < 10 {
                    v.lost_examples.push((device.clone(), seq));
                }
            }
        }
    }
    v.latency = Latency::of(samples);
    v
}

/// What the sim itself saw.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sent {
    pub devices: usize,
    /// Devices that connected (all of them, or the run stops before sending).
    pub connected: usize,
    pub sent: u64,
    /// Publishes the broker acknowledged (PUBACK, or PUBCOMP at QoS 2); at
    /// QoS 0 nothing is acknowledged and this stays 0.
    pub acked: u64,
    /// Connections lost and made again during the run.
    pub reconnects: u64,
    /// Sends that started more than one period after their planned time:
    /// the sim itself fell behind (the machine is too busy to trust the run).
    pub late_sends: u64,
    pub seconds: f64,
}

/// The table `fieldlink fleet-sim` prints.
pub fn render(qos: u8, sent: &Sent, verified: Option<&Verified>) -> String {
    let mut s = String::new();
    let rate = if sent.seconds > 0.0 { sent.sent as f64 / sent.seconds } else { 0.0 };
    let _ = writeln!(s, "devices      {} ({} connected)", sent.devices, sent.connected);
    let _ = writeln!(s, "sent         {} in {:.1} s ({rate:.0} msg/s, QoS {qos})", sent.sent, sent.seconds);
    if qos > 0 {
        let _ = writeln!(s, "acked        {} by the broker", sent.acked);
    } else {
        let _ = writeln!(s, "acked        - (QoS 0: the broker acknowledges nothing)");
    }
    let _ = writeln!(s, "reconnects   {}", sent.reconnects);
    let _ =
        writeln!(s, "late sends   {} (sent over one period after their time: the sim fell behind)", sent.late_sends);
    match verified {
        None => {
            let _ = writeln!(s, "stored       - (give --verify-db to check the hub's database)");
        }
        Some(v) => {
            let _ = writeln!(s, "stored       {}", v.stored);
            let _ = writeln!(s, "lost         {}", v.lost);
            if !v.lost_examples.is_empty() {
                let ex: Vec<String> = v.lost_examples.iter().map(|(d, q)| format!("{d}#{q}")).collect();
                let _ = writeln!(s, "             e.g. {}", ex.join(", "));
            }
            let _ = writeln!(s, "duplicates   {}", v.duplicates);
            match v.latency {
                Some(l) => {
                    let _ =
                        writeln!(s, "publish→commit ms  p50 {}  p95 {}  p99 {}  max {}", l.p50, l.p95, l.p99, l.max);
                }
                None => {
                    let _ = writeln!(s, "publish→commit ms  - (nothing stored)");
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(device: &str, epoch: u64, seq: u64, ts_ms: u64, stored_ms: u64) -> StoredRow<'_> {
        StoredRow { device, epoch, seq, ts_ms, stored_ms }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latency::of((1..=100).collect()).expect("samples");
        assert_eq!(l, Latency { p50: 50, p95: 95, p99: 99, max: 100 });
        assert_eq!(Latency::of(vec![7]), Some(Latency { p50: 7, p95: 7, p99: 7, max: 7 }));
        assert_eq!(Latency::of(Vec::new()), None);
    }

    #[test]
    fn a_message_sent_and_never_stored_is_lost_and_named() {
        let sent = HashMap::from([("a".to_string(), 3), ("b".to_string(), 1)]);
        let rows = [row("a", 9, 1, 1000, 1010), row("a", 9, 3, 3000, 3050), row("b", 9, 1, 1000, 1200)];
        let v = verify(9, &sent, rows);
        assert_eq!((v.stored, v.lost, v.duplicates), (3, 1, 0));
        assert_eq!(v.lost_examples, [("a".to_string(), 2)]);
        assert_eq!(v.latency.map(|l| l.max), Some(200));
    }

    #[test]
    fn other_devices_and_other_epochs_are_not_this_runs_rows() {
        let sent = HashMap::from([("a".to_string(), 1)]);
        let rows = [row("a", 9, 1, 0, 5), row("a", 8, 1, 0, 5), row("z", 9, 1, 0, 5)];
        let v = verify(9, &sent, rows);
        assert_eq!((v.stored, v.lost, v.duplicates), (1, 0, 0));
    }

    #[test]
    fn a_second_row_or_a_seq_never_sent_counts_as_a_duplicate() {
        let sent = HashMap::from([("a".to_string(), 2)]);
        let rows = [row("a", 9, 1, 0, 5), row("a", 9, 1, 0, 6), row("a", 9, 2, 0, 5), row("a", 9, 3, 0, 5)];
        let v = verify(9, &sent, rows);
        assert_eq!((v.stored, v.lost, v.duplicates), (2, 0, 2));
    }

    #[test]
    fn a_commit_stamped_before_the_publish_counts_as_zero_not_a_wrap() {
        let sent = HashMap::from([("a".to_string(), 1)]);
        let v = verify(9, &sent, [row("a", 9, 1, 1000, 999)]);
        assert_eq!(v.latency.map(|l| l.max), Some(0));
    }

    #[test]
    fn the_table_names_every_figure() {
        let sent = Sent { devices: 2, connected: 2, sent: 20, acked: 20, seconds: 10.0, ..Sent::default() };
        let v =
            Verified { stored: 20, latency: Some(Latency { p50: 3, p95: 9, p99: 12, max: 40 }), ..Verified::default() };
        let text = render(1, &sent, Some(&v));
        for needle in ["sent         20", "acked        20", "stored       20", "lost         0", "p99 12"] {
            assert!(text.contains(needle), "{needle:?} in\n{text}");
        }
        assert!(render(0, &sent, None).contains("--verify-db"));
    }
}
