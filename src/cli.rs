//! The small client commands of the `fieldlink` binary: `status` (ask the
//! running agent for a status dump and print it), `sim` (drive the simulated
//! GPIO of a running agent) and `check-config`. They talk to a running agent
//! only through its pid file, its status socket (or a signal and its status
//! file) and its sim socket; they never open the outbox or the broker.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::agent::{SocketError, pid_file, request_status, status_file, status_socket_file};
use crate::config::AgentConfig;
use crate::gpio::{GpioError, sim};

/// How long `fieldlink status` waits for the dump.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("the agent is not running: no pid file at '{0}'")]
    NoPidFile(PathBuf),
    #[error("pid file '{path}' holds '{content}', not a process id")]
    BadPidFile { path: PathBuf, content: String },
    #[error("the agent is not running: pid {pid} from '{path}' does not exist (stale pid file)")]
    StalePid { pid: i32, path: PathBuf },
    #[error("cannot signal the agent (pid {pid}): {error}")]
    Signal { pid: i32, error: nix::Error },
    #[error(
        "the agent (pid {pid}) wrote no status dump to '{path}' within {secs} s (it logs every dump's summary, and \
         why a write failed)"
    )]
    NoDump { pid: i32, path: PathBuf, secs: u64 },
    #[error(
        "the agent (pid {pid}) did not answer on '{path}' within {secs} s (is it stuck? a dump waits for the outbox \
         and for the disk)"
    )]
    NoAnswer { pid: i32, path: PathBuf, secs: u64 },
    #[error("the agent (pid {pid}) gave no status dump on '{path}': {error}")]
    Socket { pid: i32, path: PathBuf, error: SocketError },
    #[error("cannot read '{path}': {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{0}")]
    Sim(#[from] GpioError),
    /// The simulated board answered `err ...`: bad usage.
    #[error("{0}")]
    SimRefused(String),
}

impl CliError {
    /// 2 for bad usage, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::SimRefused(_) => 2,
            _ => 1,
        }
    }
}

fn dumped_at(path: &std::path::Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("dumped_at")?.as_str().map(str::to_string)
}

/// What `fieldlink status` prints: the dump on stdout, a warning on stderr.
#[derive(Debug)]
pub struct Status {
    pub dump: String,
    /// Set when `status.json` does not hold this dump.
    pub warning: Option<String>,
}

/// Asks the agent for a fresh dump over its status socket; an agent without
/// one is sent SIGUSR1 and its fresh `status.json` is read instead.
pub fn status(cfg: &AgentConfig) -> Result<Status, CliError> {
    let pid_path = pid_file(&cfg.state_dir);
    let content = match std::fs::read_to_string(&pid_path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CliError::NoPidFile(pid_path)),
        Err(error) => return Err(CliError::Read { path: pid_path, error }),
    };
    let pid: i32 = content
        .trim()
        .parse()
        .map_err(|_| CliError::BadPidFile { path: pid_path.clone(), content: content.trim().to_string() })?;
    match kill(Pid::from_raw(pid), None) {
        Ok(()) => {}
        Err(nix::Error::ESRCH) => return Err(CliError::StalePid { pid, path: pid_path }),
        Err(error) => return Err(CliError::Signal { pid, error }),
    }
    let socket = status_socket_file(&cfg.state_dir);
    match request_status(&socket, STATUS_TIMEOUT) {
        Ok(answer) => {
            let warning = answer.unwritten.map(|why| {
                format!(
                    "warning: the agent {why}; this dump came over '{}' instead, and the agent's log has its summary",
                    socket.display()
                )
            });
            return Ok(Status { dump: answer.dump, warning });
        }
        // No socket (bound by agents since #6; binding may have failed): the signal and the file.
        Err(SocketError::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {}
        Err(SocketError::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
        {
            return Err(CliError::NoAnswer { pid, path: socket, secs: STATUS_TIMEOUT.as_secs() });
        }
        Err(error) => return Err(CliError::Socket { pid, path: socket, error }),
    }
    let dump = dump_by_signal(pid, status_file(&cfg.state_dir))?;
    Ok(Status { dump, warning: None })
}

/// Signals the agent (SIGUSR1) and returns the fresh `status.json`.
fn dump_by_signal(pid: i32, path: PathBuf) -> Result<String, CliError> {
    let before = dumped_at(&path);
    kill(Pid::from_raw(pid), Signal::SIGUSR1).map_err(|error| CliError::Signal { pid, error })?;
    let deadline = Instant::now() + STATUS_TIMEOUT;
    while Instant::now() < deadline {
        let now = dumped_at(&path);
        if now.is_some() && now != before {
            return std::fs::read_to_string(&path).map_err(|error| CliError::Read { path, error });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(CliError::NoDump { pid, path, secs: STATUS_TIMEOUT.as_secs() })
}

/// Sends one request (`set 17 0`, `get 27`, ...) to the agent's simulated
/// GPIO and returns its answer.
pub fn sim(cfg: &AgentConfig, request: &[String]) -> Result<String, CliError> {
    let answer = sim::request(&sim::socket_path(&cfg.state_dir), &request.join(" "))?;
    match answer.strip_prefix("err ") {
        Some(reason) => Err(CliError::SimRefused(reason.to_string())),
        None => Ok(answer),
    }
}

/// The one-line summary `check-config` prints for a valid file.
pub fn describe(cfg: &AgentConfig) -> String {
    format!(
        "ok: device '{}', broker {}://{}:{}, {} button(s), {} relay(s), gpio {:?}, outbox {:?}",
        cfg.device_id,
        if cfg.mqtt.url.tls { "mqtts" } else { "mqtt" },
        cfg.mqtt.url.host,
        cfg.mqtt.url.port,
        cfg.buttons.len(),
        cfg.relays.len(),
        cfg.gpio.backend,
        cfg.outbox.durability,
    )
    .to_lowercase()
}

/// Which config a file is: the hub's has `[broker]`, `[database]` or `[web]`
/// and no `device_id`; anything else is checked as an agent config (whose
/// errors then say what is missing).
pub fn is_hub_config(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    !table.contains_key("device_id") && ["broker", "database", "web"].iter().any(|k| table.contains_key(*k))
}

/// `fieldlink check-config`: the one-line summary of a valid agent or hub
/// config and its warnings (each one line, for stderr), or every problem.
/// A build without the `hub` feature refuses a hub config, saying why.
pub fn check_config(path: &std::path::Path) -> Result<(String, Vec<String>), crate::config::ConfigError> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    #[cfg(not(feature = "hub"))]
    if is_hub_config(&text) {
        return Err(crate::config::ConfigError::Invalid(vec![format!(
            "'{}' is a hub config (it has [broker], [database] or [web] and no device_id), and this fieldlink is the \
             agent-only build (without the cargo feature `hub`): check it with a full build",
            path.display()
        )]));
    }
    #[cfg(feature = "hub")]
    if is_hub_config(&text) {
        let cfg = crate::config::HubConfig::load(path)?;
        let summary = format!(
            "ok: hub, broker {}, database {:?}, web {}",
            match cfg.broker.embedded() {
                Some(listen) => format!("embedded on {listen}"),
                None => {
                    let u = cfg.broker.client_url();
                    format!("{}://{}:{}", if u.tls { "mqtts" } else { "mqtt" }, u.host, u.port)
                }
            },
            cfg.database.url.kind(),
            cfg.web.listen,
        )
        .to_lowercase();
        return Ok((summary, cfg.warnings));
    }
    crate::config::AgentConfig::load(path).map(|cfg| (describe(&cfg), cfg.warnings))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The shipped hub config, as a user would pass it.
    fn hub_toml() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hub.toml")
    }

    #[test]
    fn the_shipped_configs_are_told_apart() {
        let hub = std::fs::read_to_string(hub_toml()).expect("config/hub.toml");
        let agent = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.toml"))
            .expect("config/agent.toml");
        assert!(is_hub_config(&hub));
        assert!(!is_hub_config(&agent));
    }

    #[cfg(not(feature = "hub"))]
    #[test]
    fn the_agent_only_build_refuses_a_hub_config_and_says_why() {
        let err = check_config(&hub_toml()).expect_err("a hub config in the agent-only build");
        let text = err.to_string();
        assert!(text.contains("is a hub config"), "{text}");
        assert!(text.contains("agent-only build"), "{text}");
        assert!(text.contains("`hub`"), "{text}");
    }

    #[cfg(feature = "hub")]
    #[test]
    fn the_full_build_checks_a_hub_config_as_a_hub() {
        let (summary, _) = check_config(&hub_toml()).expect("the shipped hub config is valid");
        assert!(summary.starts_with("ok: hub,"), "{summary}");
    }
}
