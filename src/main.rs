//! The `fieldlink` binary: parses the command line, sets up logging, loads
//! the config and maps results to exit codes (0 ok, 1 runtime failure, 2 bad
//! usage or config). All logic lives in the library. Without the `hub`
//! feature the `demo` and `hub` subcommands do not exist (the lean agent
//! build: clap answers "unrecognized subcommand").

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fieldlink::config::AgentConfig;

#[derive(Parser)]
#[command(name = "fieldlink", version, about = "Reliable Raspberry Pi field agent over MQTT")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole system on one machine: embedded broker, hub on SQLite and a
    /// simulated agent whose button is pressed every few seconds.
    #[cfg(feature = "hub")]
    Demo {
        /// Where the demo keeps its files.
        #[arg(long, default_value = "state/demo")]
        dir: PathBuf,
    },
    /// Run the cloud side: broker, collector, database, API and dashboard.
    #[cfg(feature = "hub")]
    Hub {
        #[arg(short, long, default_value = "config/hub.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        action: Option<HubAction>,
    },
    /// Load a hub with simulated devices to size it: N connections sending
    /// the agent's messages; prints sent, acked, and with --verify-db stored,
    /// lost, duplicates and publish→commit latency. Exit 1 if any was lost.
    #[cfg(feature = "hub")]
    FleetSim(Box<FleetSimArgs>),
    /// Run the field agent.
    Agent {
        #[arg(short, long, default_value = "config/agent.toml")]
        config: PathBuf,
    },
    /// Ask the running agent for a status dump and print it.
    Status {
        #[arg(short, long, default_value = "config/agent.toml")]
        config: PathBuf,
    },
    /// Drive the simulated GPIO of a running agent: `set <pin> <0|1>`, `get <pin>`,
    /// `fault <pin> <on|off>`, `changes <pin>`.
    Sim {
        #[arg(short, long, default_value = "config/agent.toml")]
        config: PathBuf,
        #[arg(required = true, num_args = 1.., trailing_var_arg = true)]
        request: Vec<String>,
    },
    /// Validate a config file (agent or hub): exit 0, or print every problem and exit 2.
    #[cfg_attr(
        not(feature = "hub"),
        command(about = "Validate an agent config file: exit 0, or print every problem and exit 2")
    )]
    CheckConfig {
        #[arg(short, long)]
        config: PathBuf,
    },
}

#[cfg(feature = "hub")]
#[derive(clap::Args)]
struct FleetSimArgs {
    /// The broker: mqtt://host:port, mqtts://host:port or host:port.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Simulated devices, one MQTT connection each.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Messages per second per device (90 % button, 5 % heartbeat, 5 % relay state).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// How long each device sends (e.g. 30s, 10m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Device ids are <prefix>-<n>.
    #[arg(long, default_value = "sim")]
    id_prefix: String,
    /// The hub's topic_prefix.
    #[arg(long, default_value = "fieldlink")]
    topic_prefix: String,
    /// Every device logs in as its id with the password in this file
    /// (with --provision: created with a random password if missing).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Add the simulated devices to this hub config's broker password file
    /// (as `hub device add` does) before the run; needs --password-file.
    #[arg(long, value_name = "HUB_TOML")]
    provision: Option<PathBuf>,
    /// With mqtts://: the CA that signed the broker's certificate.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// The hub's database url ([database] url): check what it stored.
    #[arg(long, value_name = "URL")]
    verify_db: Option<String>,
    /// With --verify-db: give up waiting for the hub after this long without progress.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    settle: std::time::Duration,
    /// Give up if the fleet is not connected within this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    connect_timeout: std::time::Duration,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    keep_alive: std::time::Duration,
}

#[cfg(feature = "hub")]
fn fleet_sim(a: FleetSimArgs) -> ExitCode {
    use fieldlink::fleet_sim::{self, Options, Plan, provision};
    let usage = |e: String| {
        eprintln!("fleet-sim: {e}");
        ExitCode::from(2)
    };
    let broker = match fieldlink::config::parse_broker_arg(&a.broker) {
        Ok(b) => b,
        Err(e) => return usage(format!("--broker {e}")),
    };
    let plan = Plan { id_prefix: a.id_prefix, devices: a.devices, rate: a.rate, duration: a.duration };
    let password = match (&a.provision, &a.password_file) {
        (Some(_), None) => return usage("--provision needs --password-file".into()),
        (Some(hub), Some(file)) => {
            let provisioned = provision::password_or_create(file)
                .and_then(|pw| provision::provision(hub, &plan.device_ids(), &pw).map(|line| (pw, line)));
            match provisioned {
                Ok((pw, line)) => {
                    eprintln!("{line}");
                    Some(pw)
                }
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(1);
                }
            }
        }
        (None, Some(file)) => match provision::read_password(file) {
            Ok(pw) => Some(pw),
            Err(e) => return usage(e.to_string()),
        },
        (None, None) => None,
    };
    let qos = a.qos;
    let outcome = fleet_sim::run(Options {
        broker,
        plan,
        qos,
        topic_prefix: a.topic_prefix,
        password,
        ca_file: a.ca_file,
        keep_alive: a.keep_alive,
        connect_timeout: a.connect_timeout,
        verify_db: a.verify_db,
        settle: a.settle,
    });
    match outcome {
        Ok(o) => {
            print!("{}", fleet_sim::report::render(qos, &o.sent, o.verified.as_ref()));
            println!("epoch        {}", o.epoch);
            if o.clean() { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(fleet_sim::FleetError::Invalid(e)) => usage(e),
        Err(e) => finish::<fleet_sim::FleetError>(Err(e)),
    }
}

#[cfg(feature = "hub")]
#[derive(Subcommand)]
enum HubAction {
    /// Devices of a hub-managed mosquitto: `<state_dir>/mosquitto.passwd` and `mosquitto.acl`.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
    },
}

#[cfg(feature = "hub")]
#[derive(Subcommand)]
enum DeviceAction {
    /// Create a device's credentials; prints its password (once) and an agent `[mqtt]` section.
    Add {
        id: String,
        /// The broker url for the agent (default: the hub config's broker.url).
        #[arg(long)]
        url: Option<String>,
    },
    /// The provisioned device ids.
    List,
    /// Remove a device; mosquitto drops it when it reloads.
    Remove { id: String },
}

#[cfg(feature = "hub")]
fn device(config: &std::path::Path, action: DeviceAction) -> ExitCode {
    let cfg = match fieldlink::config::HubConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let p = fieldlink::hub::devices::Provisioning::from_config(&cfg);
    let result = match action {
        DeviceAction::Add { id, url } => p.add(&id, url.as_deref()),
        DeviceAction::List => p.list().map(|ids| ids.join("\n")),
        DeviceAction::Remove { id } => p.remove(&id),
    };
    match result {
        Ok(text) => {
            if !text.is_empty() {
                println!("{}", text.trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// A config's warnings (`warning: ...`), logged at warn when a long-running
/// command starts.
fn log_warnings(warnings: &[String]) {
    for w in warnings {
        tracing::warn!("config: {}", w.strip_prefix("warning: ").unwrap_or(w));
    }
}

fn load(path: &std::path::Path) -> Result<AgentConfig, ExitCode> {
    AgentConfig::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// Exit code from a run result: the code, or 1 with the error printed.
fn finish<E: std::error::Error + Send + Sync + 'static>(result: Result<i32, E>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("{:#}", anyhow::Error::from(e));
            ExitCode::from(1)
        }
    }
}

/// A client command's answer on stdout (exit 0), or its error on stderr with
/// the error's exit code.
fn answer(result: Result<String, fieldlink::cli::CliError>) -> ExitCode {
    match result {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}

/// rumqttc is built without a default crypto provider (no aws-lc); rustls
/// needs one chosen before any TLS config is built. Installing fails only if
/// one is installed already, which is fine.
fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        #[cfg(feature = "hub")]
        Command::Demo { dir } => {
            init_logging("warn,fieldlink=info");
            install_crypto();
            finish(fieldlink::demo::run(&dir))
        }
        #[cfg(feature = "hub")]
        Command::Hub { config, action: Some(HubAction::Device { action }) } => device(&config, action),
        #[cfg(feature = "hub")]
        Command::FleetSim(args) => {
            init_logging("warn,fieldlink=info");
            install_crypto();
            fleet_sim(*args)
        }
        #[cfg(feature = "hub")]
        Command::Hub { config, action: None } => {
            init_logging("info");
            let cfg = match fieldlink::config::HubConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            log_warnings(&cfg.warnings);
            install_crypto();
            finish(fieldlink::hub::run(cfg))
        }
        Command::Agent { config } => {
            // Before any thread starts; returns only if there is nothing to
            // do or the restart failed (then the agent runs as it is).
            let restart = fieldlink::memtrim::restart_with_small_thread_cache();
            init_logging("info");
            if let Err(e) = restart {
                tracing::warn!("{e}");
            }
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            log_warnings(&cfg.warnings);
            install_crypto();
            finish(fieldlink::agent::run(cfg))
        }
        Command::Status { config } => {
            init_logging("warn");
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let status = fieldlink::cli::status(&cfg).map(|s| {
                if let Some(warning) = s.warning {
                    eprintln!("{warning}");
                }
                s.dump
            });
            answer(status)
        }
        Command::Sim { config, request } => {
            init_logging("warn");
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            answer(fieldlink::cli::sim(&cfg, &request))
        }
        Command::CheckConfig { config } => match fieldlink::cli::check_config(&config) {
            Ok((summary, warnings)) => {
                for warning in warnings {
                    eprintln!("{warning}");
                }
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    #[cfg(not(feature = "hub"))]
    use clap::error::ErrorKind;

    use super::Cli;

    #[cfg(not(feature = "hub"))]
    #[test]
    fn the_agent_only_build_has_no_hub_and_no_demo_command() {
        for command in ["hub", "demo", "fleet-sim"] {
            let err = Cli::try_parse_from(["fieldlink", command]).err().expect("no such subcommand");
            assert_eq!(err.kind(), ErrorKind::InvalidSubcommand, "{command}: {err}");
        }
    }

    #[cfg(feature = "hub")]
    #[test]
    fn the_full_build_has_the_hub_and_the_demo() {
        for args in [
            &["fieldlink", "hub"][..],
            &["fieldlink", "demo"],
            &["fieldlink", "hub", "device", "list"],
            &["fieldlink", "fleet-sim", "--devices", "1000", "--rate", "1", "--duration", "10m"],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
    }

    #[test]
    fn every_build_has_the_agent_commands() {
        for args in [
            &["fieldlink", "agent"][..],
            &["fieldlink", "status"],
            &["fieldlink", "sim", "get", "17"],
            &["fieldlink", "check-config", "-c", "x.toml"],
        ] {
            if let Err(e) = Cli::try_parse_from(args) {
                panic!("{args:?}: {e}");
            }
        }
    }
}
