//! The Heartbeat actor: every `heartbeat.interval` it samples the board's
//! health (sysinfo, `statvfs`) and records a `heartbeat` message with the
//! outbox and link counters. The sample reads /proc and /sys, and with
//! `[metrics] textfile` set the node_exporter textfile is rewritten on each
//! beat (`metrics_textfile`: a write and an fsync): both run on tokio's
//! blocking pool, never on the actors' thread, so they cannot stall the
//! MQTT keep-alive or a relay command. Only what the heartbeat publishes is
//! read. It never publishes directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use sysinfo::{Components, MemoryRefreshKind, System};

use super::metrics_textfile;
use super::recorder::Recorder;
use super::status::StatusBoard;
use super::supervisor::{self, SupervisedActor, Supervision};
use crate::config::HeartbeatConfig;
use crate::proto::{Body, HeartbeatBody, LinkCounters, OutboxCounters, Topics};

/// The sysinfo handles, kept between samples: CPU usage is the difference
/// between two refreshes, so the first value after creating `System` is
/// meaningless (crates.md §6).
struct Sampler {
    sys: System,
    components: Components,
    state_dir: PathBuf,
}

impl Sampler {
    fn new(state_dir: &Path) -> Result<Sampler, String> {
        let mut sys = System::new().map_err(|e| format!("system info: {e}"))?;
        sys.refresh_cpu_usage();
        let components = Components::new_with_refreshed_list().map_err(|e| format!("sensor info: {e}"))?;
        let state_dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
        Ok(Sampler { sys, components, state_dir })
    }

    /// The board's health; the caller fills in the outbox and link counters.
    /// Reads `/proc/stat`, `/proc/meminfo`, the listed sensors' temperature
    /// files and `statvfs` of state_dir: nothing the heartbeat does not
    /// publish (no mount table, no sensor directory scan).
    fn sample(&mut self) -> HeartbeatBody {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        for c in self.components.iter_mut() {
            c.refresh();
        }
        // The filesystem that holds state_dir: the outbox lives there.
        let (disk_free_bytes, disk_total_bytes) = disk_space(&self.state_dir).unwrap_or((0, 0));
        HeartbeatBody {
            uptime_s: System::uptime().unwrap_or(0),
            cpu_percent: self.sys.global_cpu_usage(),
            load_1m: System::load_average().map(|l| l.one).unwrap_or(0.0),
            mem_used_bytes: self.sys.used_memory(),
            mem_total_bytes: self.sys.total_memory(),
            disk_free_bytes,
            disk_total_bytes,
            temp_c: board_temperature(self.components.iter().map(|c| (c.label(), c.temperature()))),
            outbox: OutboxCounters::default(),
            link: LinkCounters::default(),
            version: crate::VERSION.to_string(),
        }
    }
}

/// Free (for unprivileged users) and total bytes of the filesystem holding
/// `path`, as `df` and sysinfo's `Disk` compute them (`f_frsize` units).
// The casts are no-ops on 64-bit Linux, not on a 32-bit Pi OS (u32 there).
#[allow(clippy::unnecessary_cast)]
fn disk_space(path: &Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frsize = st.fragment_size() as u64;
    Some(((st.blocks_available() as u64).saturating_mul(frsize), (st.blocks() as u64).saturating_mul(frsize)))
}

/// The SoC temperature: a sensor labelled like the CPU (`cpu_thermal` on a
/// Pi), else the first that reads anything; `None` where there is none.
pub fn board_temperature<'a>(sensors: impl Iterator<Item = (&'a str, Option<f32>)> + Clone) -> Option<f32> {
    let is_cpu = |label: &str| {
        let l = label.to_ascii_lowercase();
        l.contains("cpu") || l.contains("soc") || l.contains("package")
    };
    let valid = |t: Option<f32>| t.filter(|t| t.is_finite());
    sensors
        .clone()
        .filter(|(l, _)| is_cpu(l))
        .find_map(|(_, t)| valid(t))
        .or_else(|| sensors.into_iter().find_map(|(_, t)| valid(t)))
}

pub struct Heartbeat {
    cfg: HeartbeatConfig,
    state_dir: PathBuf,
    recorder: Recorder,
    topics: Topics,
    board: Arc<StatusBoard>,
    sup: Supervision,
    sampler: Option<Sampler>,
    textfile: Option<PathBuf>,
}

impl Heartbeat {
    pub fn new(
        cfg: HeartbeatConfig,
        state_dir: PathBuf,
        recorder: Recorder,
        topics: Topics,
        sup: Supervision,
        textfile: Option<PathBuf>,
    ) -> Heartbeat {
        let board = sup.board().clone();
        Heartbeat { cfg, state_dir, recorder, topics, board, sup, sampler: None, textfile }
    }

    /// What the metrics textfile shows now, if one is configured.
    fn textfile_snapshot(&self, outbox: crate::outbox::Stats) -> Option<(PathBuf, metrics_textfile::Snapshot)> {
        let path = self.textfile.clone()?;
        let snapshot = metrics_textfile::Snapshot {
            device: self.board.device().to_string(),
            outbox,
            link: self.board.link_counters(),
            connected: self.board.link_connected(),
            last_connect: self.board.last_connect(),
            restarts: self.board.actor_restarts(),
        };
        Some((path, snapshot))
    }

    /// Samples (and rewrites the textfile) on the blocking pool, then
    /// records the heartbeat. A beat that finds the previous sample still
    /// running is skipped.
    fn beat(&mut self, ctx: &mut Context<Self>) {
        let Some(mut sampler) = self.sampler.take() else {
            return;
        };
        let stats = self.recorder.outbox().stats();
        let textfile = self.textfile_snapshot(stats);
        let outbox = OutboxCounters {
            depth: stats.depth,
            bytes: stats.bytes,
            dropped: stats.dropped,
            unconfirmed: u64::try_from(self.board.unconfirmed()).unwrap_or(u64::MAX),
        };
        let link = self.board.link_counters();
        let work = tokio::task::spawn_blocking(move || {
            if let Some((path, snapshot)) = textfile {
                // A failure is logged, never fatal.
                if let Err(e) = metrics_textfile::write(&path, &metrics_textfile::render(&snapshot)) {
                    tracing::warn!("metrics textfile '{}' not written: {e}", path.display());
                }
            }
            let body = sampler.sample();
            (sampler, body)
        });
        ctx.spawn(work.into_actor(self).map(move |res, act, ctx| {
            let (sampler, sample) = match res {
                Ok(done) => done,
                // Only a panic (which ends the process) or a runtime
                // shutting down gets here; a restart makes a new sampler.
                Err(e) => return supervisor::fail(act, ctx, format!("heartbeat sample: {e}")),
            };
            act.sampler = Some(sampler);
            let body = HeartbeatBody { outbox, link, ..sample };
            let fut = act.recorder.record(
                act.topics.heartbeat(),
                act.cfg.qos,
                false,
                SystemTime::now(),
                Body::Heartbeat(body),
            );
            ctx.spawn(fut.into_actor(act).map(|res, _, _| {
                if let Err(e) = res {
                    tracing::warn!("heartbeat not recorded: {e}");
                }
            }));
        }));
    }
}

supervisor::supervised_actor!(Heartbeat);

impl Supervised for Heartbeat {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.sup.restarting();
    }
}

impl SupervisedActor for Heartbeat {
    fn supervision(&mut self) -> &mut Supervision {
        &mut self.sup
    }

    fn init(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        // Once per start: one read of /proc/stat and one listing of the
        // temperature sensors, on this thread (the beats sample elsewhere).
        self.sampler = Some(Sampler::new(&self.state_dir)?);
        // The first CPU figure needs two samples at least 200 ms apart; the
        // first beat comes one interval (>= 1 s) after this one.
        ctx.run_interval(self.cfg.interval.max(Duration::from_secs(1)), |act, ctx| act.beat(ctx));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_sensor_is_preferred_over_others() {
        let s = [("nvme Composite", Some(40.0)), ("cpu_thermal temp1", Some(52.5))];
        assert_eq!(board_temperature(s.iter().map(|(l, t)| (*l, *t))), Some(52.5));
    }

    #[test]
    fn any_reading_sensor_is_used_when_none_looks_like_the_cpu() {
        let s = [("acpitz", None), ("nvme Composite", Some(40.0))];
        assert_eq!(board_temperature(s.iter().map(|(l, t)| (*l, *t))), Some(40.0));
    }

    #[test]
    fn no_sensor_means_no_temperature() {
        let s: [(&str, Option<f32>); 1] = [("cpu", Some(f32::NAN))];
        assert_eq!(board_temperature(s.iter().map(|(l, t)| (*l, *t))), None);
    }

    #[test]
    fn a_real_sample_reports_memory_and_the_disk_holding_state_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Sampler::new(dir.path()).expect("sysinfo works on linux");
        let h = s.sample();
        assert!(h.mem_total_bytes > 0);
        assert!(h.mem_used_bytes <= h.mem_total_bytes);
        assert!(h.disk_total_bytes > 0, "no disk found for {:?}", dir.path());
        assert!(h.uptime_s > 0);
    }
}
