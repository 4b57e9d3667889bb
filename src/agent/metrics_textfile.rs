//! The agent's metrics for node_exporter's textfile collector (DESIGN:
//! Metrics): outbox depth, bytes and drops, link connects and disconnects,
//! the last connect time and restarts per actor, in the Prometheus text
//! format. [`render`] is pure; [`write`] replaces the file atomically
//! (`<file>.tmp`, fsync, rename: node_exporter reads only `*.prom`, so it
//! never sees the temporary file). The Heartbeat actor calls both on each
//! beat; this module decides nothing about when.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::SystemTime;

use crate::outbox::Stats;
use crate::proto::LinkCounters;

/// What one rendering shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub device: String,
    pub outbox: Stats,
    pub link: LinkCounters,
    pub connected: bool,
    pub last_connect: Option<SystemTime>,
    pub restarts: BTreeMap<&'static str, u64>,
}

/// A label value, escaped as the text format asks (`\\`, `\"`, `\n`).
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text node_exporter reads: `# HELP`, `# TYPE`, then samples, every
/// sample labelled with the device.
pub fn render(s: &Snapshot) -> String {
    let dev = format!("device=\"{}\"", escape_label(&s.device));
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let one = |v: u64| vec![(dev.clone(), v as f64)];
    metric(
        "fieldlink_agent_outbox_depth",
        "gauge",
        "Records in the outbox not yet acknowledged.",
        &one(s.outbox.depth),
    );
    metric("fieldlink_agent_outbox_bytes", "gauge", "Bytes the outbox holds.", &one(s.outbox.bytes));
    metric(
        "fieldlink_agent_outbox_dropped_total",
        "counter",
        "Records the outbox dropped to stay within max_bytes.",
        &one(s.outbox.dropped),
    );
    metric("fieldlink_agent_link_up", "gauge", "1 while connected to the broker.", &one(u64::from(s.connected)));
    metric("fieldlink_agent_link_connects_total", "counter", "Connections to the broker.", &one(s.link.connects));
    metric(
        "fieldlink_agent_link_disconnects_total",
        "counter",
        "Connections to the broker that were lost.",
        &one(s.link.disconnects),
    );
    let last = s.last_connect.map(|t| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
    metric(
        "fieldlink_agent_last_connect_timestamp_seconds",
        "gauge",
        "When the link last came up (unix seconds; 0: never).",
        &[(dev.clone(), last.unwrap_or(0.0))],
    );
    let restarts: Vec<(String, f64)> =
        s.restarts.iter().map(|(actor, n)| (format!("{dev},actor=\"{}\"", escape_label(actor)), *n as f64)).collect();
    metric("fieldlink_agent_actor_restarts_total", "counter", "Restarts of each supervised actor.", &restarts);
    out
}

/// Replaces `path` with `text` atomically.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    crate::fsutil::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_follows_its_help_and_type_and_carries_the_device() {
        let s = Snapshot {
            device: "pi-\"1\"".into(),
            outbox: Stats { depth: 3, bytes: 700, dropped: 1, durable_seq: 0, next_seq: 0 },
            link: LinkCounters { connects: 2, disconnects: 1 },
            connected: true,
            last_connect: Some(crate::timefmt::from_millis(1_763_719_200_500)),
            restarts: [("button", 0), ("sensor", 4)].into_iter().collect(),
        };
        let text = render(&s);
        assert!(text.contains("fieldlink_agent_outbox_depth{device=\"pi-\\\"1\\\"\"} 3\n"), "{text}");
        assert!(
            text.contains("fieldlink_agent_last_connect_timestamp_seconds{device=\"pi-\\\"1\\\"\"} 1763719200.5\n")
        );
        assert!(text.contains("fieldlink_agent_actor_restarts_total{device=\"pi-\\\"1\\\"\",actor=\"sensor\"} 4\n"));
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().expect("a name").to_string());
            } else if !line.starts_with("# HELP ") {
                let name = line.split('{').next().expect("a name");
                assert!(typed.contains(name), "{name} has no # TYPE before it");
            }
        }
    }

    #[test]
    fn the_textfile_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fieldlink.prom");
        write(&path, "a 1\n").expect("write");
        write(&path, "b 2\n").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "b 2\n");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1, "no temporary file left");
    }
}
