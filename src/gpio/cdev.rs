//! The Linux GPIO character device backend: [`Gpio`] on the lines of any
//! `/dev/gpiochipN`, through gpiocdev 0.8 (uAPI v2, Linux 5.10+). Written for
//! boards rppal does not know: Walnut Pi 1B (Allwinner H616), Raspberry Pi 5
//! (RP1) and Orange Pi boards; **not tested on hardware** (see README).
//!
//! It owns the translation between our trait and a line request, and
//! nothing else: no persistence, no retries.
//!
//! * **Active-low** is the kernel's line flag (`GPIO_V2_LINE_FLAG_ACTIVE_LOW`),
//!   so `gpioinfo` and every other consumer see the line's polarity. The
//!   kernel then speaks in logical values (active/inactive, and edges
//!   inverted); levels at our trait stay electrical like every backend's
//!   (the actors apply `active_low`), so this backend converts both ways
//!   ([`value_of`], [`level_of`], [`edge_level`]).
//!
//! * **Pins** are line offsets on a chip (`chip = "gpiochip0"` or a path;
//!   default `gpiochip0`). The offset is checked against the chip's line
//!   count when the line is claimed ([`GpioError::NoSuchLine`]), not in the
//!   config: a Walnut Pi's or a Pi 5's chip has many more lines than 28.
//! * **Inputs** are requested with the configured bias (pull-up, pull-down,
//!   disabled) and both edges; `debounce` goes to the kernel as the line's
//!   `debounce_period` (v2; the kernel debounces in hardware when the driver
//!   can and in software otherwise, `drivers/gpio/gpiolib-cdev.c`
//!   `debounce_setup`). If the kernel refuses the debounce period, the line
//!   is requested without it and [`Debouncer`] debounces in user space. A
//!   thread per input reads the events; dropping the pin stops it and
//!   releases the line.
//! * **Outputs** are requested as outputs with their initial value in the
//!   same ioctl (`GPIO_V2_LINE_FLAG_OUTPUT` with `output_values`), so the
//!   line never drives anything but the desired power-on state. On drop the
//!   request is *not* closed: the kernel says that once a request's file
//!   descriptor is closed "the state of the line becomes uncontrolled from
//!   the userspace perspective, and may revert to its default state"
//!   (Documentation/userspace-api/gpio/gpio-v2-get-line-ioctl.rst). The
//!   Relay never drops its pins while the process runs; when the process
//!   ends, the kernel closes the descriptor and the line keeps its level
//!   only if the driver leaves it be (the pinctrl drivers of the boards
//!   above do not reset a freed line; unverified on hardware).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use gpiocdev::line::{Bias, EdgeDetection, EdgeKind, Value};
use gpiocdev::request::Request;

use super::{Debouncer, Edge, EdgeSink, Gpio, GpioError, InputPin, InputSpec, Level, OutputPin, OutputSpec, Pull};

/// The chip used when an entry names none.
pub const DEFAULT_CHIP: &str = "gpiochip0";

/// How often an input's thread looks at its stop flag while no edge comes.
const STOP_POLL: Duration = Duration::from_millis(200);

/// The consumer name the kernel shows for our lines (`gpioinfo`).
const CONSUMER: &str = "fieldlink";

/// `/dev/<name>` for a bare chip name, the path itself for a path.
pub fn chip_path(chip: Option<&str>) -> PathBuf {
    let chip = chip.unwrap_or(DEFAULT_CHIP);
    if chip.contains('/') { PathBuf::from(chip) } else { Path::new("/dev").join(chip) }
}

/// Whether `offset` is a line of a chip with `lines` lines.
pub fn check_line(chip: &Path, offset: u32, lines: u32) -> Result<(), GpioError> {
    if offset < lines {
        Ok(())
    } else {
        Err(GpioError::NoSuchLine { chip: chip.display().to_string(), pin: offset, lines })
    }
}

/// The kernel's bias for our pull.
pub fn bias(pull: Pull) -> Bias {
    match pull {
        Pull::Up => Bias::PullUp,
        Pull::Down => Bias::PullDown,
        Pull::None => Bias::Disabled,
    }
}

/// The kernel's (logical) value for an electrical level on a line whose
/// active-low flag is `active_low`.
pub fn value_of(level: Level, active_low: bool) -> Value {
    if level.is_high() != active_low { Value::Active } else { Value::Inactive }
}

/// The electrical level of a (logical) kernel value.
pub fn level_of(value: Value, active_low: bool) -> Level {
    Level::from_bit((value == Value::Active) != active_low)
}

/// The electrical level after an edge the kernel reports (a logical rising
/// edge is an electrical fall on an active-low line).
pub fn edge_level(kind: EdgeKind, active_low: bool) -> Level {
    Level::from_bit((kind == EdgeKind::Rising) != active_low)
}

/// The errno inside a gpiocdev error, if it came from the kernel.
fn errno(e: &gpiocdev::Error) -> Option<i32> {
    match e {
        gpiocdev::Error::Os(gpiocdev_uapi::Errno(n)) => Some(*n),
        gpiocdev::Error::Uapi(_, gpiocdev_uapi::Error::Os(gpiocdev_uapi::Errno(n))) => Some(*n),
        _ => None,
    }
}

/// Maps a gpiocdev error about `pin` on `chip` to ours, with a hint for the
/// usual causes.
fn line_error(chip: &Path, pin: u32, e: &gpiocdev::Error) -> GpioError {
    match errno(e) {
        Some(n) if n == nix::libc::EBUSY => GpioError::PinInUse(pin),
        Some(n) if n == nix::libc::EACCES || n == nix::libc::EPERM => GpioError::Backend(format!(
            "permission denied on '{}': is the user in the 'gpio' group (and does a udev rule give it the chip)?",
            chip.display()
        )),
        _ => GpioError::Failed { pin, reason: format!("{}: {}", chip.display(), e.to_string().to_lowercase()) },
    }
}

/// GPIO on `/dev/gpiochipN`.
#[derive(Debug, Default)]
pub struct CdevGpio;

impl CdevGpio {
    pub fn new() -> CdevGpio {
        CdevGpio
    }

    /// Opens the chip and checks that `pin` is one of its lines.
    fn open(&self, chip: Option<&str>, pin: u32) -> Result<PathBuf, GpioError> {
        let path = chip_path(chip);
        let opened = gpiocdev::Chip::from_path(&path).and_then(|c| c.info());
        let info = opened.map_err(|e| match e {
            gpiocdev::Error::Os(gpiocdev_uapi::Errno(n)) if n == nix::libc::ENOENT => GpioError::Backend(format!(
                "'{}' does not exist: which chips does `ls /dev/gpiochip*` show? (or set gpio.backend = \"sim\")",
                path.display()
            )),
            other => line_error(&path, pin, &other),
        })?;
        check_line(&path, pin, info.num_lines)?;
        Ok(path)
    }
}

impl Gpio for CdevGpio {
    fn input(&self, spec: &InputSpec, sink: EdgeSink) -> Result<Box<dyn InputPin>, GpioError> {
        let pin = spec.pin;
        let path = self.open(spec.chip.as_deref(), pin)?;
        let request = |debounce: Option<Duration>| {
            let mut b = Request::builder();
            b.on_chip(&path)
                .with_consumer(CONSUMER)
                .with_line(pin)
                .as_input()
                .with_bias(bias(spec.pull))
                .with_edge_detection(EdgeDetection::BothEdges);
            if spec.active_low {
                b.as_active_low();
            }
            if let Some(d) = debounce {
                b.with_debounce_period(d);
            }
            b.request()
        };
        let kernel_debounce = (!spec.debounce.is_zero()).then_some(spec.debounce);
        let (req, software) = match request(kernel_debounce) {
            Ok(r) => (r, None),
            Err(e) if kernel_debounce.is_some() && errno(&e) != Some(nix::libc::EBUSY) => {
                tracing::warn!(
                    pin,
                    chip = %path.display(),
                    "the kernel refused a debounce period ({e}); debouncing in user space"
                );
                (request(None).map_err(|e| line_error(&path, pin, &e))?, Some(spec.debounce))
            }
            Err(e) => return Err(line_error(&path, pin, &e)),
        };
        let req = Arc::new(req);
        let active_low = spec.active_low;
        let first = level_of(req.value(pin).map_err(|e| line_error(&path, pin, &e))?, active_low);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (req, stop, path) = (req.clone(), stop.clone(), path.clone());
            let debouncer = software.map(|p| Debouncer::new(p, first));
            std::thread::Builder::new()
                .name(format!("gpio-{pin}"))
                .spawn(move || watch(&req, pin, active_low, &path, debouncer, &stop, &sink))
                .map_err(|e| GpioError::Backend(format!("cannot start the thread for line {pin}: {e}")))?;
        }
        Ok(Box::new(CdevInput { req, pin, active_low, path, stop }))
    }

    fn output(&self, spec: &OutputSpec) -> Result<Box<dyn OutputPin>, GpioError> {
        let pin = spec.pin;
        let path = self.open(spec.chip.as_deref(), pin)?;
        // Direction, polarity and value in one request: no glitch.
        let mut b = Request::builder();
        b.on_chip(&path).with_consumer(CONSUMER).with_line(pin);
        if spec.active_low {
            b.as_active_low();
        }
        let req =
            b.as_output(value_of(spec.initial, spec.active_low)).request().map_err(|e| line_error(&path, pin, &e))?;
        Ok(Box::new(CdevOutput { req: Some(req), pin, active_low: spec.active_low, path, level: spec.initial }))
    }
}

/// Reads edges until `stop`; reports them (debounced by `debouncer` when the
/// kernel could not) to `sink`. A read error is reported once and ends the
/// thread: the Button fails and its supervisor claims the line again.
fn watch(
    req: &Request,
    pin: u32,
    active_low: bool,
    path: &Path,
    mut debouncer: Option<Debouncer>,
    stop: &AtomicBool,
    sink: &EdgeSink,
) {
    while !stop.load(Ordering::Acquire) {
        let wait = debouncer
            .as_ref()
            .and_then(Debouncer::deadline)
            .map_or(STOP_POLL, |d| d.saturating_duration_since(Instant::now()).min(STOP_POLL));
        let ready = match req.wait_edge_event(wait) {
            Ok(r) => r,
            Err(e) => return sink(Err(line_error(path, pin, &e))),
        };
        if ready {
            let event = match req.read_edge_event() {
                Ok(ev) => ev,
                Err(e) => return sink(Err(line_error(path, pin, &e))),
            };
            let level = edge_level(event.kind, active_low);
            match debouncer.as_mut() {
                Some(d) => d.raw(level, Instant::now()),
                None => sink(Ok(Edge { pin, level, at: SystemTime::now() })),
            }
        }
        if let Some(level) = debouncer.as_mut().and_then(|d| d.poll(Instant::now())) {
            sink(Ok(Edge { pin, level, at: SystemTime::now() }));
        }
    }
}

/// A claimed input line; dropping it stops its thread, which releases it.
struct CdevInput {
    req: Arc<Request>,
    pin: u32,
    active_low: bool,
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl InputPin for CdevInput {
    fn level(&self) -> Result<Level, GpioError> {
        let active_low = self.active_low;
        self.req.value(self.pin).map(|v| level_of(v, active_low)).map_err(|e| line_error(&self.path, self.pin, &e))
    }
}

impl Drop for CdevInput {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// A claimed output line.
struct CdevOutput {
    /// Always `Some` until drop, which leaks it (see the module doc).
    req: Option<Request>,
    pin: u32,
    active_low: bool,
    path: PathBuf,
    /// What we drive (an output's value reads back as requested).
    level: Level,
}

impl OutputPin for CdevOutput {
    fn level(&self) -> Result<Level, GpioError> {
        Ok(self.level)
    }

    fn set(&mut self, level: Level) -> Result<(), GpioError> {
        let Some(req) = &self.req else { return Err(GpioError::Failed { pin: self.pin, reason: "released".into() }) };
        req.set_value(self.pin, value_of(level, self.active_low)).map_err(|e| line_error(&self.path, self.pin, &e))?;
        self.level = level;
        Ok(())
    }
}

impl Drop for CdevOutput {
    fn drop(&mut self) {
        // Closing the request would leave the line "uncontrolled" and free
        // to revert (module doc): keep it requested, and driven, until the
        // process ends.
        if let Some(req) = self.req.take() {
            std::mem::forget(req);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_chip_name_lives_in_dev_and_a_path_is_taken_as_is() {
        assert_eq!(chip_path(None), PathBuf::from("/dev/gpiochip0"));
        assert_eq!(chip_path(Some("gpiochip4")), PathBuf::from("/dev/gpiochip4"));
        assert_eq!(chip_path(Some("/dev/gpiochip1")), PathBuf::from("/dev/gpiochip1"));
    }

    #[test]
    fn an_offset_past_the_chip_is_refused_naming_the_chip_and_its_lines() {
        let chip = Path::new("/dev/gpiochip0");
        assert!(check_line(chip, 287, 288).is_ok());
        assert!(check_line(chip, 0, 1).is_ok());
        let e = check_line(chip, 288, 288).expect_err("one past the end");
        assert_eq!(e.to_string(), "line 288 is not on /dev/gpiochip0 (it has 288 lines, 0..=287)");
        assert!(check_line(chip, 0, 0).is_err(), "a chip with no lines has none to give");
    }

    #[test]
    fn pulls_map_to_the_kernels_bias_flags() {
        assert_eq!(bias(Pull::Up), Bias::PullUp);
        assert_eq!(bias(Pull::Down), Bias::PullDown);
        assert_eq!(bias(Pull::None), Bias::Disabled);
    }

    #[test]
    fn levels_at_the_trait_stay_electrical_whatever_the_kernels_active_low_flag() {
        // Active-high: logical = electrical.
        assert_eq!(value_of(Level::High, false), Value::Active);
        assert_eq!(value_of(Level::Low, false), Value::Inactive);
        assert_eq!(edge_level(EdgeKind::Rising, false), Level::High);
        // Active-low: the kernel inverts; we invert back.
        assert_eq!(value_of(Level::Low, true), Value::Active);
        assert_eq!(value_of(Level::High, true), Value::Inactive);
        assert_eq!(edge_level(EdgeKind::Rising, true), Level::Low);
        assert_eq!(edge_level(EdgeKind::Falling, true), Level::High);
        for active_low in [false, true] {
            for level in [Level::Low, Level::High] {
                assert_eq!(level_of(value_of(level, active_low), active_low), level);
            }
        }
    }

    #[test]
    fn a_missing_chip_says_which_and_how_to_look() {
        let e = CdevGpio::new().open(Some("gpiochip-none-here"), 3).expect_err("no such chip");
        let text = e.to_string();
        assert!(text.contains("/dev/gpiochip-none-here"), "{text}");
    }

    #[test]
    fn a_file_that_is_not_a_gpio_chip_is_refused() {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        let e = CdevGpio::new().open(f.path().to_str(), 3).expect_err("not a chip");
        assert!(e.to_string().contains(&f.path().display().to_string()), "{e}");
    }
}
