//! What one sensor's reading means for the wire (DESIGN: Sensors): publish
//! it, hold it back (deadband), or report that the sensor started failing.
//! Sans-IO: it is fed readings and answers with a [`Verdict`]; it never reads
//! a sensor, records or publishes.
//!
//! # Rules
//!
//! * A reading is published when it is the first, the first after a
//!   failure, when it differs from the last published value by at least
//!   `min_change`, or when the `publish_every - 1` readings before it were
//!   all held back (so a steady sensor still shows it is alive).
//! * A failed reading reports `sensor_failed` only when the sensor was not
//!   failing already: one error per ok -> failing change, never one per
//!   reading. Failing readings publish nothing.

/// What to do with one reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Publish(f64),
    /// Within the deadband of the last published value.
    Hold,
    /// The sensor just started failing: send `sensor_failed` with this text.
    Failed(String),
    /// Still failing; already reported.
    StillFailing,
}

#[derive(Debug, Clone)]
pub struct SensorState {
    min_change: f64,
    publish_every: u32,
    last: Option<f64>,
    held: u32,
    failing: bool,
}

impl SensorState {
    pub fn new(min_change: f64, publish_every: u32) -> SensorState {
        SensorState { min_change, publish_every: publish_every.max(1), last: None, held: 0, failing: false }
    }

    #[cfg(test)]
    pub fn failing(&self) -> bool {
        self.failing
    }

    pub fn on_reading(&mut self, reading: Result<f64, String>) -> Verdict {
        match reading {
            Err(why) if self.failing => {
                let _ = why; // already reported when it started failing
                Verdict::StillFailing
            }
            Err(why) => {
                self.failing = true;
                Verdict::Failed(why)
            }
            Ok(value) => {
                let recovered = std::mem::take(&mut self.failing);
                let publish = recovered
                    || self.last.is_none_or(|last| (value - last).abs() >= self.min_change)
                    || self.held + 1 >= self.publish_every;
                if publish {
                    self.last = Some(value);
                    self.held = 0;
                    Verdict::Publish(value)
                } else {
                    self.held += 1;
                    Verdict::Hold
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(s: &mut SensorState, readings: &[Result<f64, &str>]) -> Vec<Verdict> {
        readings.iter().map(|r| s.on_reading(r.map_err(str::to_string))).collect()
    }

    #[test]
    fn with_no_deadband_every_reading_is_published() {
        let mut s = SensorState::new(0.0, 10);
        assert_eq!(feed(&mut s, &[Ok(1.0), Ok(1.0), Ok(2.0)]), [1.0, 1.0, 2.0].map(Verdict::Publish));
    }

    #[test]
    fn small_changes_are_held_back_and_a_big_one_is_published() {
        let mut s = SensorState::new(0.5, 100);
        let v = feed(&mut s, &[Ok(20.0), Ok(20.2), Ok(20.4), Ok(20.5), Ok(20.1), Ok(19.9)]);
        assert_eq!(
            v,
            [
                Verdict::Publish(20.0),
                Verdict::Hold,
                Verdict::Hold,
                Verdict::Publish(20.5),
                Verdict::Hold,
                Verdict::Publish(19.9)
            ]
        );
    }

    #[test]
    fn a_steady_sensor_is_still_published_every_n_readings() {
        let mut s = SensorState::new(1.0, 3);
        let v = feed(&mut s, &[Ok(5.0), Ok(5.0), Ok(5.0), Ok(5.0), Ok(5.0), Ok(5.0), Ok(5.0)]);
        let published: Vec<usize> =
            v.iter().enumerate().filter(|(_, v)| **v != Verdict::Hold).map(|(i, _)| i).collect();
        assert_eq!(published, [0, 3, 6]);
    }

    #[test]
    fn a_failure_is_reported_once_per_change_from_ok_to_failing() {
        let mut s = SensorState::new(10.0, 100);
        let v = feed(&mut s, &[Ok(1.0), Err("crc"), Err("crc"), Ok(1.0), Ok(1.0), Err("gone"), Err("gone")]);
        assert_eq!(
            v,
            [
                Verdict::Publish(1.0),
                Verdict::Failed("crc".into()),
                Verdict::StillFailing,
                Verdict::Publish(1.0), // the first good reading after a failure, deadband or not
                Verdict::Hold,
                Verdict::Failed("gone".into()),
                Verdict::StillFailing,
            ]
        );
        assert!(s.failing());
    }

    /// Random readings against the rules, checked from the outside: the
    /// published values, the holds and the reports.
    #[test]
    fn random_readings_keep_the_deadband_the_liveness_bound_and_one_report_per_failure() {
        for round in 0..200u64 {
            let mut rng = fastrand::Rng::with_seed(round);
            let min_change = [0.0, 0.1, 1.0, 5.0][rng.usize(0..4)];
            let every = rng.u32(1..6);
            let mut s = SensorState::new(min_change, every);
            let (mut last, mut held, mut failing) = (None::<f64>, 0u32, false);
            for _ in 0..300 {
                let reading = if rng.u8(0..10) == 0 { Err("x".to_string()) } else { Ok(f64::from(rng.i8(..)) / 4.0) };
                let verdict = s.on_reading(reading.clone());
                match (&reading, &verdict) {
                    (Err(_), Verdict::Failed(_)) => assert!(!failing, "reported twice in one failure"),
                    (Err(_), Verdict::StillFailing) => assert!(failing, "a new failure went unreported"),
                    (Ok(v), Verdict::Publish(p)) => {
                        assert_eq!(v, p);
                        let due = failing || last.is_none_or(|l: f64| (v - l).abs() >= min_change) || held + 1 >= every;
                        assert!(due, "published {v} within the deadband of {last:?} after {held} holds");
                        last = Some(*v);
                        held = 0;
                    }
                    (Ok(v), Verdict::Hold) => {
                        let l = last.expect("a hold follows a publish");
                        assert!((v - l).abs() < min_change, "held {v}, {l} was published");
                        assert!(!failing, "the first reading after a failure was held");
                        held += 1;
                        assert!(held < every, "{held} readings in a row held back (publish_every {every})");
                    }
                    other => panic!("{other:?}"),
                }
                failing = reading.is_err();
            }
        }
    }
}
