//! The agent's `[[sensor]]` entries and its `[metrics]` section (DESIGN:
//! Agent config, Sensors, Metrics), read into [`SensorConfig`] and
//! [`MetricsConfig`]. Owns the keys, defaults and limits of both; like the
//! rest of `config` it reads no sensor and starts nothing.

use std::path::PathBuf;
use std::time::Duration;

use toml::Table;

use super::reader::{Checked, NAME_HINT, Place, Problems, Reader, is_name, millis, quote, secs};
use crate::proto::Qos;

/// Where the kernel's 1-Wire bus lists its devices.
pub const DEFAULT_W1_DIR: &str = "/sys/bus/w1/devices";

/// Where a reading comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SensorSource {
    /// A DS18B20 on the 1-Wire bus: `<w1_dir>/<id>/w1_slave`, CRC checked,
    /// `t=` in millidegrees Celsius.
    Ds18b20 { path: PathBuf },
    /// The first number in a file (sysfs, hwmon, ...).
    File { path: PathBuf },
    /// The first number a command prints on stdout; killed (with its whole
    /// process group) after `timeout`.
    Command { argv: Vec<String>, timeout: Duration },
}

/// A validated `[[sensor]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorConfig {
    pub name: String,
    pub source: SensorSource,
    /// A reading every this often.
    pub interval: Duration,
    pub qos: Qos,
    /// Deadband: a reading is published when it differs from the last one
    /// published by at least this much (0: every reading) ...
    pub min_change: f64,
    /// ... or when this many readings in a row were held back.
    pub publish_every: u32,
    /// `value = raw * scale + offset`.
    pub scale: f64,
    pub offset: f64,
    pub unit: Option<String>,
}

/// `[metrics]`: the node_exporter textfile, rewritten on each heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsConfig {
    pub textfile: Option<PathBuf>,
}

const KINDS: [(&str, &str); 3] = [("ds18b20", "ds18b20"), ("file", "file"), ("command", "command")];

/// Reads one `[[sensor]]` (1-based `index` for messages); `None` in the
/// second place when the name is missing or bad.
pub(super) fn sensor_config(t: &Table, i: usize, p: &mut Problems) -> (Option<String>, Checked<SensorConfig>) {
    let mut r = Reader::new(t, Place::Entry { kind: "sensor", label: format!("#{}", i + 1) });
    let name = match r.str_opt("name", p) {
        Ok(Some(name)) if is_name(name) => Ok(name.to_string()),
        Ok(Some(name)) => {
            Err(r.problem("name", p, format!("{} is not a valid name (expected {NAME_HINT})", quote(name))))
        }
        Ok(None) => Err(r.missing("name", &format!("{NAME_HINT}, e.g. 'tank'"), p)),
        Err(e) => Err(e),
    };
    if let Ok(name) = &name {
        r.place = Place::Entry { kind: "sensor", label: quote(name) };
    }
    let kind = match r.str_opt("kind", p) {
        Ok(Some(k)) => match KINDS.iter().find(|(n, _)| *n == k) {
            Some((_, k)) => Ok(*k),
            None => Err(r.problem("kind", p, format!("{} is not 'ds18b20', 'file' or 'command'", quote(k)))),
        },
        Ok(None) => Err(r.missing("kind", "'ds18b20', 'file' or 'command'", p)),
        Err(e) => Err(e),
    };
    let only = |r: &mut Reader, key: &str, for_kind: &str, p: &mut Problems| {
        if matches!(kind, Ok(k) if k != for_kind) {
            r.refuse(key, &format!("is only for kind = '{for_kind}'"), p);
        }
    };
    let source: Checked<SensorSource> = match kind {
        Ok("ds18b20") => {
            let id = match r.str_opt("id", p) {
                Ok(Some(id)) if is_name(id) => Ok(id.to_string()),
                Ok(Some(id)) => Err(r.problem(
                    "id",
                    p,
                    format!("{} is not a 1-Wire device id (expected e.g. '28-0316a2795bff')", quote(id)),
                )),
                Ok(None) => Err(r.missing("id", "the 1-Wire device id, e.g. '28-0316a2795bff'", p)),
                Err(e) => Err(e),
            };
            let dir = r.path_or("w1_dir", PathBuf::from(DEFAULT_W1_DIR), "a directory path", p);
            (|| Ok(SensorSource::Ds18b20 { path: dir?.join(id?).join("w1_slave") }))()
        }
        Ok("file") => match r.path_opt("path", p) {
            Ok(Some(path)) => Ok(SensorSource::File { path }),
            Ok(None) => {
                Err(r.missing("path", "a file holding a number, e.g. '/sys/class/hwmon/hwmon0/temp1_input'", p))
            }
            Err(e) => Err(e),
        },
        Ok(_) => {
            let argv = match r.str_list_opt("command", p) {
                Ok(Some(argv)) if !argv[0].is_empty() => Ok(argv),
                Ok(Some(_)) => Err(r.problem("command", p, "names no program (its first element is empty)".into())),
                Ok(None) => Err(r.missing(
                    "command",
                    "the program and its arguments, e.g. [\"vcgencmd\", \"measure_volts\"]",
                    p,
                )),
                Err(e) => Err(e),
            };
            let timeout = r.duration_in("timeout", secs(5), millis(10)..=secs(300), p);
            (|| Ok(SensorSource::Command { argv: argv?, timeout: timeout? }))()
        }
        Err(e) => Err(e),
    };
    only(&mut r, "id", "ds18b20", p);
    only(&mut r, "w1_dir", "ds18b20", p);
    only(&mut r, "path", "file", p);
    only(&mut r, "command", "command", p);
    only(&mut r, "timeout", "command", p);
    let interval = r.duration_in("interval", secs(60), millis(100)..=Duration::MAX, p);
    let qos = r.qos(p);
    let min_change = match r.float_or("min_change", 0.0, p) {
        Ok(m) if m >= 0.0 => Ok(m),
        Ok(m) => Err(r.problem("min_change", p, format!("{m} is negative (expected 0 or more)"))),
        Err(e) => Err(e),
    };
    let publish_every = r.int_in("publish_every", 10, 1..=i64::from(u32::MAX), p);
    let scale = r.float_or("scale", 1.0, p);
    let offset = r.float_or("offset", 0.0, p);
    let default_unit = matches!(kind, Ok("ds18b20")).then(|| "°C".to_string());
    let unit = match r.str_opt("unit", p) {
        Ok(None) => Ok(default_unit),
        Ok(Some("")) => Ok(None),
        Ok(Some(u)) if u.chars().count() <= 16 => Ok(Some(u.to_string())),
        Ok(Some(u)) => Err(r.problem("unit", p, format!("{} is longer than 16 characters", quote(u)))),
        Err(e) => Err(e),
    };
    r.finish(p);
    let config = (|| {
        Ok(SensorConfig {
            name: name.clone()?,
            source: source?,
            interval: interval?,
            qos: qos?,
            min_change: min_change?,
            publish_every: publish_every?,
            scale: scale?,
            offset: offset?,
            unit: unit?,
        })
    })();
    (name.ok(), config)
}

/// Two sensors with the same name.
pub(super) fn check_sensor_names(names: &[Option<String>], p: &mut Problems) {
    for (i, name) in names.iter().enumerate() {
        let Some(name) = name else { continue };
        if let Some(first) = names[..i].iter().position(|n| n.as_ref() == Some(name)) {
            p.report(format!("sensor #{}: name {} is also used by sensor #{}", i + 1, quote(name), first + 1));
        }
    }
}

pub(super) fn metrics_config(t: &Table, p: &mut Problems) -> Checked<MetricsConfig> {
    let mut r = Reader::new(t, Place::Section("metrics"));
    let textfile = r.path_opt("textfile", p);
    let textfile = match textfile {
        Ok(Some(path)) if path.extension().is_none_or(|e| e != "prom") => Err(r.problem(
            "textfile",
            p,
            format!(
                "{} does not end in .prom (node_exporter's textfile collector reads only *.prom)",
                quote(&path.display().to_string())
            ),
        )),
        other => other,
    };
    r.finish(p);
    Ok(MetricsConfig { textfile: textfile? })
}
