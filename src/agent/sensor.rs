//! The Sensor actor: every sensor's `interval` it takes a reading off the
//! actor thread (`spawn_blocking`: a 1-Wire read takes ~750 ms, a command
//! up to its timeout), asks [`SensorState`] what it means, and records a
//! `sensor/<name>` message or, when the sensor starts failing, an `error`
//! with code `sensor_failed` (DESIGN: Sensors). A failing sensor is never
//! an actor failure. It never publishes directly and never blocks.
//!
//! A sensor whose previous reading is still running when its next is due
//! skips that tick (a command slower than its interval is read as often as
//! it can be, never twice at once).

use std::time::{Duration, SystemTime};

use actix::prelude::*;

use super::recorder::Recorder;
use super::sensor_reading::{self, ReadError};
use super::sensor_state::{SensorState, Verdict};
use super::supervisor::{self, SupervisedActor, Supervision};
use crate::config::SensorConfig;
use crate::proto::{Body, ErrorBody, ErrorCode, SensorBody, Topics};

pub struct Sensor {
    sensors: Vec<SensorConfig>,
    states: Vec<SensorState>,
    busy: Vec<bool>,
    recorder: Recorder,
    topics: Topics,
    sup: Supervision,
    /// Which start of the actor a reading belongs to; one that comes back
    /// after a restart is dropped.
    generation: u64,
}

impl Sensor {
    pub fn new(sensors: Vec<SensorConfig>, recorder: Recorder, topics: Topics, sup: Supervision) -> Sensor {
        let states = sensors.iter().map(|s| SensorState::new(s.min_change, s.publish_every)).collect();
        let busy = vec![false; sensors.len()];
        Sensor { sensors, states, busy, recorder, topics, sup, generation: 0 }
    }

    fn tick(&mut self, i: usize, ctx: &mut Context<Self>) {
        if std::mem::replace(&mut self.busy[i], true) {
            tracing::debug!(sensor = %self.sensors[i].name, "previous reading still running; tick skipped");
            return;
        }
        let cfg = &self.sensors[i];
        let (source, scale, offset) = (cfg.source.clone(), cfg.scale, cfg.offset);
        let generation = self.generation;
        let read = tokio::task::spawn_blocking(move || {
            let value = sensor_reading::read(&source, scale, offset);
            (value, SystemTime::now())
        });
        ctx.spawn(read.into_actor(self).map(move |joined, act, ctx| {
            if generation != act.generation {
                return;
            }
            act.busy[i] = false;
            let (reading, at) = match joined {
                Ok((reading, at)) => (reading.map_err(|e: ReadError| e.to_string()), at),
                Err(e) => (Err(format!("the reading thread failed: {e}")), SystemTime::now()),
            };
            act.on_reading(i, reading, at, ctx);
        }));
    }

    fn on_reading(&mut self, i: usize, reading: Result<f64, String>, at: SystemTime, ctx: &mut Context<Self>) {
        let cfg = &self.sensors[i];
        let record = match self.states[i].on_reading(reading) {
            Verdict::Hold => return,
            Verdict::StillFailing => {
                tracing::debug!(sensor = %cfg.name, "still failing");
                return;
            }
            Verdict::Publish(value) => {
                tracing::debug!(sensor = %cfg.name, value, "reading");
                let body = SensorBody { sensor: cfg.name.clone(), value, unit: cfg.unit.clone() };
                self.recorder.record(self.topics.sensor(&cfg.name), cfg.qos, false, at, Body::Sensor(body))
            }
            Verdict::Failed(why) => {
                let message = format!("sensor '{}': {why}", cfg.name);
                tracing::warn!("{message}");
                let body = ErrorBody {
                    code: ErrorCode::SensorFailed,
                    message,
                    topic: self.topics.sensor(&cfg.name),
                    command_id: None,
                };
                self.recorder.record(self.topics.error(), cfg.qos, false, at, Body::Error(body))
            }
        };
        ctx.spawn(record.into_actor(self).map(|res, _, _| {
            if let Err(e) = res {
                tracing::error!("sensor message not recorded: {e}");
            }
        }));
    }
}

supervisor::supervised_actor!(Sensor);

impl Supervised for Sensor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.sup.restarting();
    }
}

impl SupervisedActor for Sensor {
    fn supervision(&mut self) -> &mut Supervision {
        &mut self.sup
    }

    fn init(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        self.generation += 1;
        self.busy.iter_mut().for_each(|b| *b = false);
        for i in 0..self.sensors.len() {
            // The first reading at once, then one every interval.
            ctx.run_later(Duration::ZERO, move |act, ctx| act.tick(i, ctx));
            ctx.run_interval(self.sensors[i].interval, move |act, ctx| act.tick(i, ctx));
        }
        Ok(())
    }
}
