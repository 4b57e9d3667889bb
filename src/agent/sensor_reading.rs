//! Taking one reading from a sensor's source (DESIGN: Sensors): a DS18B20's
//! `w1_slave` file, any file holding a number, or a command's output. The
//! parsers are pure functions; [`read`] does the blocking I/O and must only
//! be called off the actor threads (a 1-Wire read takes ~750 ms on real
//! hardware, a command up to its timeout). It keeps no state between
//! readings and never records or publishes anything.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::config::SensorSource;

/// The most of a command's stdout or stderr that is kept.
const MAX_OUTPUT: usize = 64 * 1024;

/// How often a running command is checked for its exit.
const POLL: Duration = Duration::from_millis(5);

/// Why a reading failed; its text is the `message` of the `sensor_failed`
/// error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read '{}': {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error("'{}': CRC check failed (the first line does not end in YES): {line:?}", path.display())]
    Crc { path: PathBuf, line: String },
    #[error("{what}: no number in {text:?}")]
    NoNumber { what: String, text: String },
    #[error("{what}: {value} is not a finite number")]
    NotFinite { what: String, value: f64 },
    #[error("cannot run '{program}': {reason}")]
    Spawn { program: String, reason: String },
    #[error("'{program}' did not finish within {}; killed", humantime::format_duration(*timeout))]
    Timeout { program: String, timeout: Duration },
    #[error("'{program}' failed ({status}): {stderr:?}")]
    Exit { program: String, status: String, stderr: String },
}

/// Shortens text quoted in an error.
fn excerpt(text: &str) -> String {
    let t = text.trim();
    let mut out: String = t.chars().take(80).collect();
    if t.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// The temperature in °C from the text of a DS18B20's `w1_slave`:
///
/// ```text
/// 72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
/// 72 01 4b 46 7f ff 0e 10 57 t=23125
/// ```
///
/// The first line must end in `YES` (the kernel's CRC check passed); `t=`
/// is in millidegrees.
pub fn parse_w1_slave(path: &Path, text: &str) -> Result<f64, ReadError> {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    if !first.trim_end().ends_with("YES") {
        return Err(ReadError::Crc { path: path.to_path_buf(), line: excerpt(first) });
    }
    let what = format!("'{}'", path.display());
    let milli = lines
        .next()
        .and_then(|l| l.split("t=").nth(1))
        .and_then(|t| t.trim().parse::<i64>().ok())
        .ok_or_else(|| ReadError::NoNumber { what: what.clone(), text: excerpt(text) })?;
    Ok(milli as f64 / 1000.0)
}

/// The first number in `text` (`-12`, `3.5`, `1e3`, `+0.25`), as a float;
/// `what` names the source for the error.
pub fn first_number(what: &str, text: &str) -> Result<f64, ReadError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_number = bytes[i].is_ascii_digit()
            || (matches!(bytes[i], b'-' | b'+' | b'.')
                && bytes.get(i + 1).is_some_and(|b| b.is_ascii_digit() || (*b == b'.' && bytes[i] != b'.')));
        if starts_number {
            let end = number_end(bytes, i);
            if let Ok(v) = text[i..end].parse::<f64>() {
                return finite(what, v);
            }
        }
        i += 1;
    }
    Err(ReadError::NoNumber { what: what.to_string(), text: excerpt(text) })
}

/// The end of the number starting at `start`: sign, digits, fraction,
/// exponent.
fn number_end(b: &[u8], start: usize) -> usize {
    let digits = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    let mut i = start;
    if matches!(b[i], b'-' | b'+') {
        i += 1;
    }
    i = digits(i);
    if i < b.len() && b[i] == b'.' {
        i = digits(i + 1);
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        let mut j = i + 1;
        if j < b.len() && matches!(b[j], b'-' | b'+') {
            j += 1;
        }
        let k = digits(j);
        if k > j {
            i = k;
        }
    }
    i
}

fn finite(what: &str, value: f64) -> Result<f64, ReadError> {
    if value.is_finite() { Ok(value) } else { Err(ReadError::NotFinite { what: what.to_string(), value }) }
}

/// Reads `source` once and returns `raw * scale + offset`. Blocks.
pub fn read(source: &SensorSource, scale: f64, offset: f64) -> Result<f64, ReadError> {
    let raw = match source {
        SensorSource::Ds18b20 { path } => parse_w1_slave(path, &read_text(path)?)?,
        SensorSource::File { path } => first_number(&format!("'{}'", path.display()), &read_text(path)?)?,
        SensorSource::Command { argv, timeout } => {
            let out = run_command(argv, *timeout)?;
            first_number(&format!("the output of '{}'", argv[0]), &out)?
        }
    };
    finite("the scaled value", raw * scale + offset)
}

fn read_text(path: &Path) -> Result<String, ReadError> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_OUTPUT as u64).read_to_string(&mut text))
        .map_err(|e| ReadError::Io { path: path.to_path_buf(), reason: crate::config::describe_io(&e) })?;
    Ok(text)
}

/// Drains a pipe on a thread of its own, keeping the first [`MAX_OUTPUT`]
/// bytes; the bytes arrive on the channel once the pipe closes.
fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = MAX_OUTPUT.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
            }
            // The reader gave up waiting: nobody wants the output.
            let _ = tx.send(kept);
        });
    }
    rx
}

/// Runs `argv` in a process group of its own, with stdin closed; returns its
/// stdout. Past `timeout` the whole group is killed (SIGKILL), so a shell
/// pipeline's children go too.
pub fn run_command(argv: &[String], timeout: Duration) -> Result<String, ReadError> {
    let program = argv.first().cloned().unwrap_or_default();
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(&program)
        .args(argv.get(1..).unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| ReadError::Spawn { program: program.clone(), reason: crate::config::describe_io(&e) })?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status: Option<ExitStatus> = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            Ok(None) | Err(_) => break None,
        }
    };
    // The output is complete once every process holding the pipe is gone;
    // a child left in the background counts against the timeout too.
    let out = status.and_then(|_| stdout.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok());
    let (Some(status), Some(out)) = (status, out) else {
        kill_group(&child);
        // Reaps the child; after SIGKILL this does not block.
        let _ = child.wait();
        return Err(ReadError::Timeout { program, timeout });
    };
    if !status.success() {
        let err = stderr.recv_timeout(Duration::from_millis(100)).unwrap_or_default();
        return Err(ReadError::Exit {
            program,
            status: status.to_string(),
            stderr: excerpt(&String::from_utf8_lossy(&err)),
        });
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn kill_group(child: &std::process::Child) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    // The child leads its own group (`process_group(0)`); a pid always fits
    // in i32 on Linux (pid_max is at most 2^22).
    let Ok(pid) = i32::try_from(child.id()) else { return };
    if let Err(e) = killpg(Pid::from_raw(pid), Signal::SIGKILL) {
        // ESRCH: the group is gone already, which is what we wanted.
        tracing::debug!("killpg({pid}): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n";
    const BAD_CRC: &str = "72 01 4b 46 7f ff 0e 10 57 : crc=58 NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n";

    fn p() -> PathBuf {
        PathBuf::from("/w1/28-x/w1_slave")
    }

    #[test]
    fn a_ds18b20_reading_with_a_good_crc_is_in_degrees() {
        assert_eq!(parse_w1_slave(&p(), GOOD), Ok(23.125));
        let below = GOOD.replace("t=23125", "t=-1062");
        assert_eq!(parse_w1_slave(&p(), &below), Ok(-1.062));
    }

    #[test]
    fn a_ds18b20_reading_with_a_bad_crc_is_refused() {
        let e = parse_w1_slave(&p(), BAD_CRC).expect_err("crc NO");
        assert!(matches!(e, ReadError::Crc { .. }), "{e}");
        assert!(e.to_string().contains("CRC check failed"), "{e}");
        assert!(matches!(parse_w1_slave(&p(), ""), Err(ReadError::Crc { .. })));
        let no_t = "xx : crc=57 YES\nxx\n";
        assert!(matches!(parse_w1_slave(&p(), no_t), Err(ReadError::NoNumber { .. })));
    }

    #[test]
    fn the_first_number_is_found_in_any_text() {
        assert_eq!(first_number("f", "45123\n"), Ok(45123.0));
        assert_eq!(first_number("f", "temp=48.3'C\n"), Ok(48.3));
        assert_eq!(first_number("f", "volt: -0.25V"), Ok(-0.25));
        assert_eq!(first_number("f", "x +7 y"), Ok(7.0));
        assert_eq!(first_number("f", "1.5e3 ops"), Ok(1500.0));
        assert_eq!(first_number("f", "a-b 3e"), Ok(3.0));
        assert!(matches!(first_number("f", "no digits here"), Err(ReadError::NoNumber { .. })));
        assert!(matches!(first_number("f", ""), Err(ReadError::NoNumber { .. })));
        assert!(matches!(first_number("f", "1e999"), Err(ReadError::NotFinite { .. })));
    }

    #[test]
    fn a_file_reading_is_scaled_and_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("temp1_input");
        std::fs::write(&path, "45123\n").expect("write");
        let v = read(&SensorSource::File { path: path.clone() }, 0.001, 0.5).expect("reads");
        assert!((v - 45.623).abs() < 1e-9, "{v}");
        let e = read(&SensorSource::File { path: dir.path().join("absent") }, 1.0, 0.0).expect_err("missing");
        assert!(e.to_string().contains("no such file"), "{e}");
    }

    #[test]
    fn a_command_prints_its_reading() {
        let argv = ["sh", "-c", "echo 'volt=1.2000V'"].map(String::from).to_vec();
        let v = read(&SensorSource::Command { argv, timeout: Duration::from_secs(10) }, 1.0, 0.0);
        assert_eq!(v, Ok(1.2));
    }

    #[test]
    fn a_command_that_fails_or_cannot_start_is_an_error_naming_it() {
        let argv = ["sh", "-c", "echo broken >&2; exit 3"].map(String::from).to_vec();
        let e = run_command(&argv, Duration::from_secs(10)).expect_err("exit 3");
        assert!(matches!(&e, ReadError::Exit { stderr, .. } if stderr == "broken"), "{e}");
        let e = run_command(&["/nonexistent/sensor-tool".to_string()], Duration::from_secs(1)).expect_err("absent");
        assert!(matches!(e, ReadError::Spawn { .. }), "{e}");
    }

    #[test]
    fn a_command_that_hangs_is_killed_with_its_children_at_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        // The shell starts a child that would outlive it, records its pid and waits.
        let script = format!("sleep 300 & echo $! > '{}'; wait", pid_file.display());
        let argv = ["sh".to_string(), "-c".to_string(), script];
        let e = run_command(&argv, Duration::from_millis(300)).expect_err("hangs");
        assert!(matches!(e, ReadError::Timeout { .. }), "{e}");
        let pid: i32 = std::fs::read_to_string(&pid_file).expect("pid written").trim().parse().expect("a pid");
        // The grandchild is killed too: wait (generously) until it is gone.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'));
            if !alive {
                break;
            }
            assert!(Instant::now() < deadline, "the background sleep {pid} survived the timeout");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
