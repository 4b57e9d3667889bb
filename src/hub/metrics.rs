//! The hub's Prometheus metrics (DESIGN: Metrics): counters kept in the
//! process as atomics (messages stored and refused per kind, the ingest
//! latency histogram, set-aside messages, database errors) and their
//! rendering in the Prometheus text format for `GET /metrics`. The
//! collector and the commander bump the counters; the one gauge read from
//! the database per scrape (devices online) is a single `COUNT(*)`. It
//! never serves HTTP and never touches the broker.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::model::{CommandStatus, Kind};

/// What a refused message was, by its topic: a message kind, `status`,
/// or `other` (not a device topic at all).
pub const REFUSED_LABELS: [&str; 7] = ["button", "relay", "heartbeat", "sensor", "error", "status", "other"];

/// Upper bounds of the ingest latency buckets, in seconds: from a live
/// link (milliseconds) to data replayed after a day offline.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0];

/// The command statuses, in the order [`Metrics::commands`] counts them.
pub const COMMAND_STATUSES: [CommandStatus; 4] =
    [CommandStatus::Requested, CommandStatus::Confirmed, CommandStatus::Rejected, CommandStatus::Expired];

fn kind_index(kind: Kind) -> usize {
    Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

/// A cumulative histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative), plus one for `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The hub's counters. Cheap to bump from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    stored: [AtomicU64; Kind::ALL.len()],
    refused: [AtomicU64; REFUSED_LABELS.len()],
    /// Payload `ts` -> commit, per newly stored message.
    pub latency: Histogram,
    /// Messages recorded as set aside (refused at ingest or by the database).
    pub set_aside: AtomicU64,
    /// Failed database operations (each failed try of a batch, each
    /// set-aside record that could not be written).
    pub db_errors: AtomicU64,
    commands: [AtomicU64; COMMAND_STATUSES.len()],
}

impl Metrics {
    pub fn stored(&self, kind: Kind) {
        self.stored[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// `label` is one of [`REFUSED_LABELS`]; anything else counts as `other`.
    pub fn refused(&self, label: &str) {
        let i = REFUSED_LABELS.iter().position(|l| *l == label).unwrap_or(REFUSED_LABELS.len() - 1);
        self.refused[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A command reached `status` (requested when published).
    pub fn command(&self, status: CommandStatus) {
        if let Some(i) = COMMAND_STATUSES.iter().position(|s| *s == status) {
            self.commands[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stored_count(&self, kind: Kind) -> u64 {
        self.stored[kind_index(kind)].load(Ordering::Relaxed)
    }

    /// The exposition text; `online` is the devices-online gauge, absent
    /// when the database could not be asked (then `fieldlink_hub_up` is 0
    /// for the database).
    pub fn render(&self, online: Option<u64>) -> String {
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        head(&mut out, "fieldlink_hub_database_up", "gauge", "1 when the last scrape could query the database.");
        let _ = writeln!(out, "fieldlink_hub_database_up {}", u8::from(online.is_some()));
        head(&mut out, "fieldlink_hub_devices_online", "gauge", "Devices whose last status was online.");
        let _ = writeln!(out, "fieldlink_hub_devices_online {}", online.unwrap_or(0));

        head(&mut out, "fieldlink_hub_messages_stored_total", "counter", "Device messages newly stored, by kind.");
        for (kind, n) in Kind::ALL.iter().zip(&self.stored) {
            let _ = writeln!(out, "fieldlink_hub_messages_stored_total{{kind=\"{}\"}} {}", kind.as_str(), load(n));
        }
        head(
            &mut out,
            "fieldlink_hub_messages_refused_total",
            "counter",
            "Messages not stored (refused at ingest or by the database), by the kind their topic names.",
        );
        for (label, n) in REFUSED_LABELS.iter().zip(&self.refused) {
            let _ = writeln!(out, "fieldlink_hub_messages_refused_total{{kind=\"{label}\"}} {}", load(n));
        }
        head(&mut out, "fieldlink_hub_set_aside_total", "counter", "Messages recorded as set aside.");
        let _ = writeln!(out, "fieldlink_hub_set_aside_total {}", load(&self.set_aside));
        head(&mut out, "fieldlink_hub_database_errors_total", "counter", "Failed database operations.");
        let _ = writeln!(out, "fieldlink_hub_database_errors_total {}", load(&self.db_errors));

        head(&mut out, "fieldlink_hub_commands_total", "counter", "Relay commands reaching each status.");
        for (status, n) in COMMAND_STATUSES.iter().zip(&self.commands) {
            let _ = writeln!(out, "fieldlink_hub_commands_total{{status=\"{}\"}} {}", status.as_str(), load(n));
        }

        let name = "fieldlink_hub_ingest_latency_seconds";
        head(&mut out, name, "histogram", "From a message's ts to the commit that stored it.");
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&self.latency.buckets) {
            cumulative += load(n);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += load(&self.latency.buckets[LATENCY_BUCKETS.len()]);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", load(&self.latency.sum_micros) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", load(&self.latency.count));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_show_per_kind_and_the_histogram_is_cumulative() {
        let m = Metrics::default();
        m.stored(Kind::Sensor);
        m.stored(Kind::Sensor);
        m.refused("heartbeat");
        m.refused("weird");
        m.command(CommandStatus::Requested);
        m.latency.observe(Duration::from_millis(3));
        m.latency.observe(Duration::from_secs(7200));
        m.latency.observe(Duration::from_secs(1_000_000));
        let t = m.render(Some(2));
        assert_eq!(sample(&t, "fieldlink_hub_messages_stored_total{kind=\"sensor\"}"), Some(2.0));
        assert_eq!(sample(&t, "fieldlink_hub_messages_stored_total{kind=\"button\"}"), Some(0.0));
        assert_eq!(sample(&t, "fieldlink_hub_messages_refused_total{kind=\"heartbeat\"}"), Some(1.0));
        assert_eq!(sample(&t, "fieldlink_hub_messages_refused_total{kind=\"other\"}"), Some(1.0));
        assert_eq!(sample(&t, "fieldlink_hub_commands_total{status=\"requested\"}"), Some(1.0));
        assert_eq!(sample(&t, "fieldlink_hub_devices_online"), Some(2.0));
        assert_eq!(sample(&t, "fieldlink_hub_ingest_latency_seconds_bucket{le=\"0.005\"}"), Some(1.0));
        assert_eq!(sample(&t, "fieldlink_hub_ingest_latency_seconds_bucket{le=\"3600\"}"), Some(1.0));
        assert_eq!(sample(&t, "fieldlink_hub_ingest_latency_seconds_bucket{le=\"86400\"}"), Some(2.0));
        assert_eq!(sample(&t, "fieldlink_hub_ingest_latency_seconds_bucket{le=\"+Inf\"}"), Some(3.0));
        assert_eq!(sample(&t, "fieldlink_hub_ingest_latency_seconds_count"), Some(3.0));
        assert_eq!(sample(&t, "fieldlink_hub_database_up"), Some(1.0));
        assert_eq!(sample(&m.render(None), "fieldlink_hub_database_up"), Some(0.0));
    }
}
