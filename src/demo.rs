//! `fieldlink demo`: the whole system on one machine with nothing to install
//! (DESIGN: Command line). An embedded broker and a hub on SQLite run in this
//! process; one agent with simulated GPIO runs as a child process (the real
//! `fieldlink agent`, so the demo shows exactly what a Pi would do), and a
//! presser presses its button every few seconds. It prints a one-time login
//! link to the dashboard, the token file and the broker address (with the
//! hub's own broker user and its password file, for watching the traffic), picks free ports when the default
//! ones are taken, and stops everything cleanly on Ctrl-C. Everything it
//! writes lives under `state/demo/`. The agent is provisioned like any
//! device (`hub device add`'s logic): its password is in
//! `state/demo/agent-mqtt.pass`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::HubConfig;
use crate::gpio::sim;
use crate::hub::devices::{DevicesError, Provisioning};
use crate::hub::{Hub, HubError};

/// The demo device.
pub const DEVICE: &str = "demo-pi";
/// The hub's client id, which is also its user on the embedded broker.
const HUB_USER: &str = "fieldlink-demo-hub";
/// How often the simulated button is pressed.
pub const PRESS_EVERY: Duration = Duration::from_secs(4);
const HOLD: Duration = Duration::from_millis(400);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo directory '{path}': {source}")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("demo hub config: {0}")]
    Config(String),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("cannot start the demo agent ({exe}): {source}")]
    Agent { exe: PathBuf, source: std::io::Error },
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
}

/// `preferred` if it can be bound now, else any free port on loopback.
pub fn free_or_any(preferred: u16) -> SocketAddr {
    let addr = SocketAddr::from(([127, 0, 0, 1], preferred));
    match TcpListener::bind(addr) {
        Ok(_) => addr,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

fn hub_config(dir: &Path, broker: SocketAddr, web: SocketAddr) -> Result<HubConfig, DemoError> {
    let text = format!(
        "state_dir = {dir:?}\n\
         [broker]\nembedded = true\nlisten = \"{broker}\"\nclient_id = \"{HUB_USER}\"\n\
         [database]\nurl = \"sqlite://{db}\"\n\
         [web]\nlisten = \"{web}\"\ntoken_file = {token:?}\n",
        dir = dir.display().to_string(),
        db = dir.join("hub.db").display(),
        token = dir.join("hub.token").display().to_string(),
    );
    HubConfig::parse(&text).map_err(|e| DemoError::Config(e.to_string()))
}

/// The demo device's MQTT password, in the demo directory (mode 0600).
const AGENT_PASSWORD_FILE: &str = "agent-mqtt.pass";

/// Provisions the demo device with the embedded broker (as `fieldlink hub
/// device add` would), unless its password file still matches.
fn provision(cfg: &HubConfig, dir: &Path) -> Result<(), DemoError> {
    let p = Provisioning::from_config(cfg);
    let path = dir.join(AGENT_PASSWORD_FILE);
    let fail = |e: DevicesError| DemoError::Config(format!("provisioning {DEVICE}: {e}"));
    if let Ok(password) = std::fs::read_to_string(&path)
        && p.verifies(DEVICE, password.trim()).map_err(fail)?
    {
        return Ok(());
    }
    match p.remove(DEVICE) {
        Ok(_) | Err(DevicesError::Unknown(_)) => {}
        Err(e) => return Err(fail(e)),
    }
    let (password, _) = p.create(DEVICE).map_err(fail)?;
    crate::fsutil::write_atomic_private(&path, format!("{password}\n").as_bytes())
        .map_err(|source| DemoError::Dir { path, source })
}

fn agent_config(dir: &Path, broker: SocketAddr) -> String {
    format!(
        "# written by `fieldlink demo`\n\
         device_id = \"{DEVICE}\"\nstate_dir = {state:?}\n\
         [mqtt]\nurl = \"mqtt://{broker}\"\nkeep_alive = \"15s\"\nreconnect_max = \"5s\"\n\
         client_id = \"{DEVICE}\"\nusername = \"{DEVICE}\"\npassword_file = {pass:?}\n\
         [outbox]\nconfirm = \"hub\"\n\
         [gpio]\nbackend = \"sim\"\n\
         [[button]]\nname = \"door\"\npin = 17\n\
         [[relay]]\nname = \"pump\"\npin = 27\npower_on_state = \"last\"\n\
         [heartbeat]\ninterval = \"5s\"\n",
        state = dir.join("agent").display().to_string(),
        pass = dir.join(AGENT_PASSWORD_FILE).display().to_string(),
    )
}

fn start_agent(dir: &Path, broker: SocketAddr) -> Result<Child, DemoError> {
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, agent_config(dir, broker)).map_err(|source| DemoError::Dir { path: cfg.clone(), source })?;
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path).map_err(|source| DemoError::Dir { path: log_path, source })?;
    let exe = std::env::current_exe().map_err(|source| DemoError::Agent { exe: PathBuf::from("fieldlink"), source })?;
    Command::new(&exe)
        .arg("agent")
        .arg("-c")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|source| DemoError::Agent { exe, source })
}

/// Presses and releases the demo button forever (electrical levels: the
/// button is pull-up, active low). Errors while the agent starts are normal.
fn press_forever(socket: PathBuf) {
    loop {
        std::thread::sleep(PRESS_EVERY);
        if sim::request(&socket, "set 17 0").is_ok() {
            std::thread::sleep(HOLD);
            if let Err(e) = sim::request(&socket, "set 17 1") {
                tracing::debug!("demo release: {e}");
            }
        }
    }
}

fn stop_agent(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!("the demo agent did not stop within 5 s; killing it");
    // It may have exited in the meantime; either way it is gone after this.
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs the demo until Ctrl-C (exit 0), or until the agent dies (exit 1).
pub fn run(dir: &Path) -> Result<i32, DemoError> {
    std::fs::create_dir_all(dir).map_err(|source| DemoError::Dir { path: dir.to_path_buf(), source })?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(DemoError::Runtime)?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| DemoError::Hub(HubError::Signals(e)))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| DemoError::Hub(HubError::Signals(e)))?;

        let cfg = hub_config(dir, free_or_any(1883), free_or_any(8080))?;
        provision(&cfg, dir)?;
        let hub = Hub::start(&cfg).await?;
        let started = hub.started().clone();
        let broker = SocketAddr::from(([127, 0, 0, 1], started.broker.port));
        let mut agent = start_agent(dir, broker)?;
        let socket = sim::socket_path(&dir.join("agent"));
        std::thread::Builder::new()
            .name("demo-presser".into())
            .spawn(move || press_forever(socket))
            .map_err(|source| DemoError::Agent { exe: PathBuf::from("demo-presser thread"), source })?;

        println!("fieldlink demo");
        // A one-time link, not the token: the URL ends up in the browser's
        // history, where it must be worth nothing.
        match started.access.login_link() {
            Ok(link) => println!("  dashboard: http://{}{link} (signs you in once, within 10 minutes)", started.web),
            Err(e) => println!("  dashboard: http://{}/ (no login link: {e})", started.web),
        }
        println!("  token:     {} (sign in with it at /login)", dir.join("hub.token").display());
        // The broker needs credentials: the hub's own user may watch everything.
        println!(
            "  broker:    mqtt://{broker} (user {HUB_USER}, password in {})",
            dir.join(crate::hub::BROKER_PASSWORD_FILE).display()
        );
        println!("  device:    {DEVICE} (simulated GPIO; its button is pressed every {} s)", PRESS_EVERY.as_secs());
        println!("  files:     {} (agent log: {})", dir.display(), dir.join("agent.log").display());
        println!("press Ctrl-C to stop");

        let mut code = 0;
        let mut check = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = check.tick() => {
                    if let Ok(Some(status)) = agent.try_wait() {
                        eprintln!("the demo agent exited ({status}); see {}", dir.join("agent.log").display());
                        code = 1;
                        break;
                    }
                }
            }
        }
        println!("stopping…");
        tokio::task::spawn_blocking(move || stop_agent(&mut agent)).await.ok();
        hub.shutdown().await;
        println!("stopped");
        Ok(code)
    })
}
