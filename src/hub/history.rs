//! A device's history over a time range, summarized for the dashboard
//! (`GET /api/devices/{d}/history?range=`, #9 item 7): heartbeat and sensor
//! values downsampled into at most [`MAX_BUCKETS`] buckets (min/avg/max),
//! link outages from the stored status changes, reconnects from the
//! heartbeats' `link.connects`, and how late the messages arrived (the hub's
//! commit time − the payload's `ts`) with the replayed bursts marked. It is
//! sans-IO: the store reads the rows (an index range scan on `(device, ts)`),
//! this turns them into a [`HistoryView`]; it never touches the database.
//!
//! # Rules
//!
//! * Buckets are `ceil(range / MAX_BUCKETS)` wide, counted from the range's
//!   start; only buckets holding a value are returned, so a series has at
//!   most [`MAX_BUCKETS`] of them whatever the message rate.
//! * An outage starts at a status change to offline and ends at the next
//!   change to online; one that has not ended has `to: null`. The state the
//!   range starts in is the newest change before it.
//! * A reconnect is a heartbeat whose `link.connects` is greater than the
//!   previous heartbeat's (a counter that fell means the agent restarted:
//!   the new value is the new baseline). Short cuts that the broker never
//!   noticed (no last will) show here and not as outages.
//! * Lateness is `received_at − ts` per message (0 when the device's clock
//!   is ahead). A message more than [`REPLAY_LATE`] late came out of the
//!   agent's outbox after a cut, not live; late messages committed within
//!   [`BURST_GAP`] of each other form one replayed burst, shown over the
//!   span of their `ts`. The numbers assume the device's clock is roughly
//!   right (NTP); a skewed clock shows as lateness.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;

use super::model::{Kind, RangeRow, StatusEvent};
use crate::timefmt;

/// The most buckets one series has.
pub const MAX_BUCKETS: u64 = 300;

/// A message committed more than this after its `ts` was replayed.
pub const REPLAY_LATE: Duration = Duration::from_secs(10);

/// Late messages committed within this of each other are one burst.
pub const BURST_GAP: Duration = Duration::from_secs(30);

/// The ranges the dashboard offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    Hour,
    Day,
    Week,
}

impl Range {
    pub const ALL: [Range; 3] = [Range::Hour, Range::Day, Range::Week];

    pub fn as_str(self) -> &'static str {
        match self {
            Range::Hour => "1h",
            Range::Day => "24h",
            Range::Week => "7d",
        }
    }

    pub fn parse(s: &str) -> Option<Range> {
        Range::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn duration(self) -> Duration {
        Duration::from_secs(match self {
            Range::Hour => 3600,
            Range::Day => 24 * 3600,
            Range::Week => 7 * 24 * 3600,
        })
    }

    /// Width of one bucket, in ms.
    pub fn bucket_ms(self) -> u64 {
        let ms = u64::try_from(self.duration().as_millis()).unwrap_or(u64::MAX);
        ms.div_ceil(MAX_BUCKETS)
    }
}

/// One bucket of a series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    /// The bucket's start.
    pub t: String,
    /// How many values fell in it.
    pub n: u64,
    pub min: f64,
    pub avg: f64,
    pub max: f64,
}

/// A sensor's buckets, with the unit of its newest reading.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SensorSeries {
    pub unit: Option<String>,
    pub buckets: Vec<Bucket>,
}

/// The heartbeat fields the dashboard charts.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct HeartbeatSeries {
    /// `cpu_percent`
    pub cpu: Vec<Bucket>,
    /// `temp_c`
    pub temp: Vec<Bucket>,
    /// `mem_used_bytes / mem_total_bytes`, in %
    pub mem: Vec<Bucket>,
}

/// A time the device was offline, as the hub saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outage {
    pub from: String,
    /// `None`: still offline.
    pub to: Option<String>,
}

/// A heartbeat that counted more broker connects than the one before.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reconnect {
    /// The heartbeat's `ts`.
    pub at: String,
    /// How many connects since the previous heartbeat.
    pub connects: u64,
}

/// Late messages that arrived together: the device's outbox replaying.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replay {
    /// The earliest and latest `ts` among them.
    pub from: String,
    pub to: String,
    /// When the last of them was committed.
    pub arrived_at: String,
    pub count: u64,
    pub max_late_ms: u64,
}

/// How late the range's messages were committed.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Lateness {
    pub messages: u64,
    /// More than [`REPLAY_LATE`] late.
    pub replayed: u64,
    pub p50_ms: u64,
    pub max_ms: u64,
}

/// `GET /api/devices/{d}/history?range=`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryView {
    pub range: &'static str,
    pub from: String,
    pub to: String,
    pub bucket_s: f64,
    pub heartbeat: HeartbeatSeries,
    pub sensors: BTreeMap<String, SensorSeries>,
    /// The status changes inside the range, oldest first.
    pub status: Vec<StatusEvent>,
    /// Whether the device was online when the range began (`None`: no
    /// status known before it).
    pub online_at_start: Option<bool>,
    pub outages: Vec<Outage>,
    pub reconnects: Vec<Reconnect>,
    pub replays: Vec<Replay>,
    pub lateness: Lateness,
}

#[derive(Debug, Clone, Copy)]
struct Acc {
    n: u64,
    sum: f64,
    min: f64,
    max: f64,
}

/// Values folded into buckets by index.
#[derive(Debug, Default)]
struct Series(BTreeMap<u64, Acc>);

impl Series {
    fn add(&mut self, index: u64, v: f64) {
        if !v.is_finite() {
            return;
        }
        let acc = self.0.entry(index).or_insert(Acc { n: 0, sum: 0.0, min: v, max: v });
        acc.n += 1;
        acc.sum += v;
        acc.min = acc.min.min(v);
        acc.max = acc.max.max(v);
    }

    fn buckets(self, from_ms: u64, bucket_ms: u64) -> Vec<Bucket> {
        self.0
            .into_iter()
            .map(|(i, a)| Bucket {
                t: iso(from_ms + i * bucket_ms),
                n: a.n,
                min: a.min,
                avg: a.sum / a.n as f64,
                max: a.max,
            })
            .collect()
    }
}

fn iso(ms: u64) -> String {
    timefmt::rfc3339_millis(timefmt::from_millis(ms))
}

fn number(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// Summarizes a device's rows over `range` ending at `to`. `before` is the
/// newest status change before the range, `status` those inside it (oldest
/// first), `rows` the messages inside it (by `ts`).
pub fn build(
    range: Range,
    to: SystemTime,
    before: Option<&StatusEvent>,
    status: Vec<StatusEvent>,
    rows: &[RangeRow],
) -> HistoryView {
    let to_ms = timefmt::to_millis(to);
    let from_ms = to_ms.saturating_sub(u64::try_from(range.duration().as_millis()).unwrap_or(u64::MAX));
    let bucket_ms = range.bucket_ms();
    let index = |ts: u64| (ts.saturating_sub(from_ms) / bucket_ms).min(MAX_BUCKETS - 1);

    let (mut cpu, mut temp, mut mem) = (Series::default(), Series::default(), Series::default());
    let mut sensors: BTreeMap<String, (Option<String>, Series)> = BTreeMap::new();
    let mut reconnects = Vec::new();
    let mut last_connects: Option<u64> = None;
    let mut late = Vec::with_capacity(rows.len());
    for row in rows {
        late.push((row.received_ms, row.received_ms.saturating_sub(row.ts_ms), row.ts_ms));
        let Some(p) = &row.payload else { continue };
        let i = index(row.ts_ms);
        match row.kind {
            Kind::Heartbeat => {
                if let Some(v) = number(p, &["cpu_percent"]) {
                    cpu.add(i, v);
                }
                if let Some(v) = number(p, &["temp_c"]) {
                    temp.add(i, v);
                }
                if let (Some(used), Some(total)) = (number(p, &["mem_used_bytes"]), number(p, &["mem_total_bytes"]))
                    && total > 0.0
                {
                    mem.add(i, 100.0 * used / total);
                }
                if let Some(c) = p.pointer("/link/connects").and_then(Value::as_u64) {
                    if let Some(prev) = last_connects
                        && c > prev
                    {
                        reconnects.push(Reconnect { at: iso(row.ts_ms), connects: c - prev });
                    }
                    last_connects = Some(c);
                }
            }
            Kind::Sensor => {
                let Some(name) = row.name.clone() else { continue };
                let entry = sensors.entry(name).or_default();
                if let Some(unit) = p.get("unit").and_then(Value::as_str) {
                    entry.0 = Some(unit.to_string());
                }
                if let Some(v) = number(p, &["value"]) {
                    entry.1.add(i, v);
                }
            }
            Kind::Button | Kind::Relay | Kind::Error => {}
        }
    }

    HistoryView {
        range: range.as_str(),
        from: iso(from_ms),
        to: iso(to_ms),
        bucket_s: bucket_ms as f64 / 1000.0,
        heartbeat: HeartbeatSeries {
            cpu: cpu.buckets(from_ms, bucket_ms),
            temp: temp.buckets(from_ms, bucket_ms),
            mem: mem.buckets(from_ms, bucket_ms),
        },
        sensors: sensors
            .into_iter()
            .map(|(name, (unit, s))| (name, SensorSeries { unit, buckets: s.buckets(from_ms, bucket_ms) }))
            .collect(),
        online_at_start: before.map(|b| b.online),
        outages: outages(before, &status),
        status,
        reconnects,
        replays: replays(&mut late),
        lateness: lateness(&late),
    }
}

fn outages(before: Option<&StatusEvent>, status: &[StatusEvent]) -> Vec<Outage> {
    let mut out = Vec::new();
    let mut since = before.filter(|b| !b.online).map(|b| b.at.clone());
    for e in status {
        match (e.online, &since) {
            (false, None) => since = Some(e.at.clone()),
            (true, Some(from)) => {
                out.push(Outage { from: from.clone(), to: Some(e.at.clone()) });
                since = None;
            }
            _ => {}
        }
    }
    if let Some(from) = since {
        out.push(Outage { from, to: None });
    }
    out
}

/// `late` holds `(received_ms, late_ms, ts_ms)`; sorted here by commit time.
fn replays(late: &mut [(u64, u64, u64)]) -> Vec<Replay> {
    late.sort_unstable();
    let threshold = u64::try_from(REPLAY_LATE.as_millis()).unwrap_or(u64::MAX);
    let gap = u64::try_from(BURST_GAP.as_millis()).unwrap_or(u64::MAX);
    let mut out: Vec<Replay> = Vec::new();
    let mut last_received: Option<u64> = None;
    for &(received, late_ms, ts) in late.iter().filter(|(_, l, _)| *l > threshold) {
        match out.last_mut() {
            Some(burst) if last_received.is_some_and(|r| received.saturating_sub(r) <= gap) => {
                burst.count += 1;
                burst.max_late_ms = burst.max_late_ms.max(late_ms);
                burst.arrived_at = iso(received);
                let (from, to) = (iso(ts), iso(ts));
                if from < burst.from {
                    burst.from = from;
                }
                if to > burst.to {
                    burst.to = to;
                }
            }
            _ => out.push(Replay {
                from: iso(ts),
                to: iso(ts),
                arrived_at: iso(received),
                count: 1,
                max_late_ms: late_ms,
            }),
        }
        last_received = Some(received);
    }
    out
}

fn lateness(late: &[(u64, u64, u64)]) -> Lateness {
    let mut ms: Vec<u64> = late.iter().map(|(_, l, _)| *l).collect();
    if ms.is_empty() {
        return Lateness::default();
    }
    let threshold = u64::try_from(REPLAY_LATE.as_millis()).unwrap_or(u64::MAX);
    let replayed = ms.iter().filter(|l| **l > threshold).count();
    let mid = (ms.len() - 1) / 2;
    let (_, p50, _) = ms.select_nth_unstable(mid);
    let p50 = *p50;
    Lateness {
        messages: ms.len() as u64,
        replayed: replayed as u64,
        p50_ms: p50,
        max_ms: ms.iter().copied().max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// 2025-11-21T10:00:00.000Z
    const T0: u64 = 1_763_719_200_000;

    fn end() -> SystemTime {
        timefmt::from_millis(T0 + 3_600_000)
    }

    fn hb(ts_ms: u64, late_ms: u64, cpu: f64, connects: u64) -> RangeRow {
        RangeRow {
            ts_ms,
            received_ms: ts_ms + late_ms,
            kind: Kind::Heartbeat,
            name: None,
            payload: Some(json!({"cpu_percent": cpu, "temp_c": 40.0, "mem_used_bytes": 1, "mem_total_bytes": 4,
                                 "link": {"connects": connects, "disconnects": 0}})),
        }
    }

    fn button(ts_ms: u64, late_ms: u64) -> RangeRow {
        RangeRow { ts_ms, received_ms: ts_ms + late_ms, kind: Kind::Button, name: Some("door".into()), payload: None }
    }

    fn status(online: bool, ms: u64) -> StatusEvent {
        StatusEvent { online, at: iso(ms) }
    }

    #[test]
    fn every_range_fits_in_at_most_three_hundred_buckets_however_many_messages_there_are() {
        for range in Range::ALL {
            let span = u64::try_from(range.duration().as_millis()).expect("small");
            let start = T0 + 3_600_000 - span;
            // One heartbeat a second over the whole range, and one exactly at each end.
            let step = (span / 20_000).max(1000);
            let rows: Vec<_> = (0..=span / step).map(|i| hb(start + i * step, 0, 50.0, 1)).collect();
            let view = build(range, end(), None, Vec::new(), &rows);
            assert!(view.heartbeat.cpu.len() as u64 <= MAX_BUCKETS, "{}: {}", range.as_str(), view.heartbeat.cpu.len());
            assert!(view.heartbeat.cpu.len() as u64 >= MAX_BUCKETS - 1, "{}: a full range fills them", range.as_str());
            let n: u64 = view.heartbeat.cpu.iter().map(|b| b.n).sum();
            assert_eq!(n, rows.len() as u64, "{}: every value is in a bucket", range.as_str());
        }
    }

    #[test]
    fn a_bucket_holds_the_min_avg_and_max_of_its_values() {
        let rows = [hb(T0 + 1000, 0, 10.0, 1), hb(T0 + 2000, 0, 30.0, 1), hb(T0 + 3000, 0, 20.0, 1)];
        let view = build(Range::Hour, end(), None, Vec::new(), &rows);
        let b = &view.heartbeat.cpu;
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].n, b[0].min, b[0].avg, b[0].max), (3, 10.0, 20.0, 30.0));
        assert_eq!(b[0].t, iso(T0));
        assert_eq!(view.heartbeat.mem[0].avg, 25.0);
    }

    #[test]
    fn sensor_readings_are_bucketed_per_sensor_with_their_unit() {
        let reading = |ts_ms: u64, name: &str, v: f64| RangeRow {
            ts_ms,
            received_ms: ts_ms,
            kind: Kind::Sensor,
            name: Some(name.into()),
            payload: Some(json!({"sensor": name, "value": v, "unit": "°C"})),
        };
        let rows = [reading(T0 + 10, "tank", 1.0), reading(T0 + 20, "tank", 3.0), reading(T0 + 30, "air", -2.0)];
        let view = build(Range::Hour, end(), None, Vec::new(), &rows);
        assert_eq!(view.sensors["tank"].buckets[0].avg, 2.0);
        assert_eq!(view.sensors["tank"].unit.as_deref(), Some("°C"));
        assert_eq!(view.sensors["air"].buckets[0].min, -2.0);
    }

    #[test]
    fn an_outage_runs_from_offline_to_online_and_one_still_going_has_no_end() {
        let before = status(false, T0 - 5000);
        let changes = vec![status(true, T0 + 1000), status(false, T0 + 2000), status(true, T0 + 3000)];
        let view = build(Range::Hour, end(), Some(&before), changes, &[]);
        assert_eq!(
            view.outages,
            [
                Outage { from: iso(T0 - 5000), to: Some(iso(T0 + 1000)) },
                Outage { from: iso(T0 + 2000), to: Some(iso(T0 + 3000)) },
            ]
        );
        assert_eq!(view.online_at_start, Some(false));
        let view = build(Range::Hour, end(), None, vec![status(false, T0 + 10)], &[]);
        assert_eq!(view.outages, [Outage { from: iso(T0 + 10), to: None }]);
    }

    #[test]
    fn a_heartbeat_counting_more_connects_is_a_reconnect_and_a_restart_is_not() {
        let rows = [hb(T0, 0, 1.0, 1), hb(T0 + 1000, 0, 1.0, 1), hb(T0 + 2000, 0, 1.0, 3), hb(T0 + 3000, 0, 1.0, 1)];
        let view = build(Range::Hour, end(), None, Vec::new(), &rows);
        assert_eq!(view.reconnects, [Reconnect { at: iso(T0 + 2000), connects: 2 }]);
    }

    #[test]
    fn late_messages_committed_together_are_one_replayed_burst_and_live_ones_are_not() {
        // Live traffic, then a 2-minute cut whose button presses arrive at
        // once when the link is back, then live again.
        let mut rows = vec![button(T0, 20), button(T0 + 1000, 30)];
        let back = T0 + 130_000;
        for i in 0..5 {
            let ts = T0 + 10_000 + i * 20_000;
            rows.push(button(ts, back + i * 10 - ts));
        }
        rows.push(button(T0 + 140_000, 40));
        rows.sort_by_key(|r| r.ts_ms);
        let view = build(Range::Hour, end(), None, Vec::new(), &rows);
        assert_eq!(view.replays.len(), 1, "{:?}", view.replays);
        let burst = &view.replays[0];
        assert_eq!((burst.count, burst.from.as_str(), burst.to.as_str()), (5, &*iso(T0 + 10_000), &*iso(T0 + 90_000)));
        assert_eq!(burst.max_late_ms, 120_000);
        assert_eq!(view.lateness.messages, 8);
        assert_eq!(view.lateness.replayed, 5);
        assert_eq!(view.lateness.max_ms, 120_000);
        assert!(view.lateness.p50_ms > 40, "most messages were late: {:?}", view.lateness);
    }

    #[test]
    fn an_empty_range_has_no_lateness_and_no_series() {
        let view = build(Range::Week, end(), None, Vec::new(), &[]);
        assert_eq!(view.lateness, Lateness::default());
        assert!(view.heartbeat.cpu.is_empty() && view.sensors.is_empty() && view.replays.is_empty());
        assert_eq!(view.bucket_s, 2016.0);
    }

    #[test]
    fn ranges_parse_from_their_names_only() {
        assert_eq!(Range::parse("24h"), Some(Range::Day));
        assert_eq!(Range::parse("7d"), Some(Range::Week));
        assert_eq!(Range::parse("1d"), None);
    }
}
