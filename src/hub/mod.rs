//! The cloud side (`fieldlink hub`): the seeds' server program, MySQL and web
//! page, made reliable (DESIGN: Hub, HTTP API). Owns the hub's wiring and
//! lifecycle: the broker (embedded or external), the database, the
//! collector, the command tracker, the web server, housekeeping timers and a
//! clean shutdown on SIGTERM/SIGINT.
//!
//! # Layout
//!
//! * [`ingest`]: topics and payloads the hub subscribes to, parsed (sans-IO).
//! * [`collector`]: the hub's MQTT client; batched commits, acks after commit.
//! * [`store`]: the database (SQLite, MySQL/MariaDB, PostgreSQL) via sqlx.
//! * [`commands`]: relay commands, tracked requested -> confirmed / rejected
//!   / expired.
//! * [`web`]: the REST API, the live stream and the dashboard.
//! * [`metrics`]: the counters and histogram behind `GET /metrics`.
//! * [`history`]: a device's history over 1 h / 24 h / 7 d for the dashboard
//!   (downsampled series, outages, reconnects, lateness; sans-IO).
//! * [`token`]: the API token file.
//! * [`devices`]: provisioning for a hub-managed mosquitto (password file, ACL).
//! * [`model`]: the types they share.

pub mod collector;
pub mod commands;
pub mod devices;
pub mod history;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod store;
pub mod token;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, MqttOptions};
use tokio::sync::{broadcast, watch};

use crate::broker::{BrokerError, EmbeddedBroker};
use crate::config::BrokerUrl;
use crate::config::hub::HubConfig;

/// The embedded broker's password for the hub's own user, in `state_dir`
/// (created on first start like the API token: random, mode 0600).
pub const BROKER_PASSWORD_FILE: &str = "broker-hub.pass";
/// The running hub's pid, in `state_dir`, while it runs an embedded broker:
/// `fieldlink hub device add|remove` sends it SIGHUP to reload credentials.
pub const PID_FILE: &str = "hub.pid";

/// How often expired commands are marked and old heartbeats pruned.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Token(#[from] token::TokenError),
    #[error("web listen address {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("mqtt: {0}")]
    Mqtt(String),
    #[error("signals: {0}")]
    Signals(std::io::Error),
    #[error("runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot write the pid file '{path}': {source}")]
    PidFile { path: std::path::PathBuf, source: std::io::Error },
}

/// What a started hub tells its caller (`fieldlink demo` prints it).
#[derive(Debug, Clone)]
pub struct Started {
    pub broker: BrokerUrl,
    /// The embedded broker's `mqtts` listener, when it has one.
    pub broker_tls: Option<SocketAddr>,
    pub web: SocketAddr,
    /// Where `/metrics` is served without authentication (`[web] metrics_listen`).
    pub metrics: Option<SocketAddr>,
    pub token: String,
    pub token_created: bool,
    /// The web side's sessions and login links (`demo` mints a link).
    pub access: Arc<web::Access>,
}

/// A running hub: stop it with [`Hub::shutdown`].
pub struct Hub {
    started: Started,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Stops accepting when dropped, after the collector has disconnected.
    broker: Option<EmbeddedBroker>,
}

/// The hub's client always keeps its session: unacknowledged messages are
/// what make a hub crash lose nothing. With the embedded broker it logs in
/// as the hub's own user (its client id) with `own_password`.
fn mqtt_options(
    cfg: &HubConfig,
    url: &BrokerUrl,
    own_password: Option<&crate::config::Secret>,
) -> Result<MqttOptions, HubError> {
    let b = &cfg.broker;
    let (username, password) = match own_password {
        Some(pw) => (Some(b.client_id.as_str()), Some(pw)),
        None => (b.username.as_deref(), b.password.as_ref()),
    };
    crate::mqtt_options::options(crate::mqtt_options::Client {
        client_id: &b.client_id,
        url,
        keep_alive: b.keep_alive,
        clean_session: false,
        username,
        password,
        ca_file: b.ca_file.as_ref(),
        cert_file: b.cert_file.as_ref(),
        key_file: b.key_file.as_ref(),
    })
    .map_err(HubError::Mqtt)
}

impl Hub {
    /// Starts everything inside the current tokio runtime.
    pub async fn start(cfg: &HubConfig) -> Result<Hub, HubError> {
        let (broker, own_password) = match cfg.broker.embedded() {
            Some(listen) => {
                let (password, _) = token::load_or_create(&cfg.state_dir.join(BROKER_PASSWORD_FILE))?;
                let settings = crate::broker::Settings {
                    listen,
                    tls: cfg.broker.tls_listener.as_ref().map(|t| crate::broker::TlsListener {
                        listen: t.listen,
                        cert_file: t.cert_file.clone(),
                        key_file: t.key_file.clone(),
                    }),
                    topic_prefix: cfg.topic_prefix.clone(),
                    passwd_file: cfg.state_dir.join(devices::PASSWD_FILE),
                    hub_user: cfg.broker.client_id.clone(),
                    hub_password: password.clone(),
                    limits: crate::broker::Limits::default(),
                };
                (Some(EmbeddedBroker::start(settings).await?), Some(crate::config::Secret(password)))
            }
            None => (None, None),
        };
        let mut url = cfg.broker.client_url();
        if let Some(b) = &broker {
            url.port = b.addr().port();
        }

        let store = store::Store::connect(cfg.database.url.expose()).await?;
        let (token, token_created) = token::load_or_create(&cfg.web.token_file)?;
        let (live, _) = broadcast::channel(4096);
        let (stop, stopped) = watch::channel(false);

        let (client, eventloop) = AsyncClient::new(mqtt_options(cfg, &url, own_password.as_ref())?, 1024);
        let counters = Arc::new(collector::Counters::default());
        let commander = commands::Commander::new(
            store.clone(),
            client.clone(),
            &cfg.topic_prefix,
            cfg.web.command_ttl,
            live.clone(),
        )
        .with_metrics(counters.metrics.clone());
        let settings = collector::Settings {
            prefix: cfg.topic_prefix.clone(),
            shared_group: cfg.broker.shared_group.clone(),
            batch_max: cfg.database.batch_max,
            batch_wait: cfg.database.batch_wait,
            reconnect_min: cfg.broker.reconnect_min,
            reconnect_max: cfg.broker.reconnect_max,
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(collector::run(
            client,
            eventloop,
            store.clone(),
            commander.clone(),
            live.clone(),
            settings,
            counters.clone(),
            stopped.clone(),
        )));
        tasks.push(tokio::spawn(housekeeping(
            store.clone(),
            commander.clone(),
            cfg.database.heartbeat_retention,
            stopped.clone(),
        )));

        let listener = tokio::net::TcpListener::bind(cfg.web.listen)
            .await
            .map_err(|source| HubError::Listen { addr: cfg.web.listen, source })?;
        let web_addr = listener.local_addr().map_err(|source| HubError::Listen { addr: cfg.web.listen, source })?;
        let state = web::AppState::new(store, commander, live, &token, cfg.web.command_wait, web::Limits::default())
            .with_metrics(counters.metrics.clone());
        let access = state.access.clone();
        let metrics_addr = match cfg.web.metrics_listen {
            None => None,
            Some(addr) => {
                let listener =
                    tokio::net::TcpListener::bind(addr).await.map_err(|source| HubError::Listen { addr, source })?;
                let bound = listener.local_addr().map_err(|source| HubError::Listen { addr, source })?;
                let (state, mut stopped) = (state.clone(), stopped.clone());
                tasks.push(tokio::spawn(async move {
                    let shutdown = async move {
                        // An error means the hub is gone: stop serving as well.
                        let _ = stopped.wait_for(|s| *s).await;
                    };
                    if let Err(e) = web::serve_metrics(listener, state, shutdown).await {
                        tracing::error!("metrics server: {e}");
                    }
                }));
                tracing::info!(metrics = %bound, "GET /metrics also served here, without authentication");
                Some(bound)
            }
        };
        let mut web_stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                // An error means the hub is gone: stop serving as well.
                let _ = web_stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = web::serve(listener, state, shutdown).await {
                tracing::error!("web server: {e}");
            }
        }));
        tracing::info!(broker = %format!("{}:{}", url.host, url.port), web = %web_addr, "hub started");
        let started = Started {
            broker: url,
            broker_tls: broker.as_ref().and_then(EmbeddedBroker::tls_addr),
            web: web_addr,
            metrics: metrics_addr,
            token,
            token_created,
            access,
        };
        Ok(Hub { started, stop, tasks, broker })
    }

    pub fn started(&self) -> &Started {
        &self.started
    }

    /// With the embedded broker: rereads the devices' credentials and closes
    /// the connections of removed ones (SIGHUP; `hub device remove`).
    pub async fn reload_devices(&self) {
        let Some(broker) = &self.broker else {
            tracing::info!("SIGHUP ignored: the hub runs no broker (devices are the external broker's business)");
            return;
        };
        if let Err(e) = broker.reload().await {
            tracing::warn!("reloading the broker's credentials failed, the previous ones stay in force: {e}");
        }
    }

    /// Stops serving, commits and acknowledges what the collector holds, and
    /// disconnects.
    pub async fn shutdown(self) {
        // Receivers may be gone already; then there is nothing to stop.
        let _ = self.stop.send(true);
        for t in self.tasks {
            if let Err(e) = t.await {
                tracing::warn!("hub task ended badly: {e}");
            }
        }
        drop(self.broker);
    }
}

/// Marks expired commands every second and prunes old heartbeats hourly.
async fn housekeeping(
    store: store::Store,
    commander: commands::Commander,
    retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
            _ = expire.tick() => {
                if let Err(e) = commander.expire().await {
                    tracing::warn!("expiring commands: {e}");
                }
            }
            _ = prune.tick() => {
                let before = SystemTime::now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH);
                match store.prune_heartbeats(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("pruned {n} heartbeats older than {}", humantime::format_duration(retention)),
                    Err(e) => tracing::warn!("pruning heartbeats: {e}"),
                }
            }
        }
    }
}

/// Prints the token the first time (DESIGN: generated on first start and
/// printed once).
pub fn announce(started: &Started) {
    if started.token_created {
        println!("api token (shown once; it is kept in the token file): {}", started.token);
    }
    println!("dashboard: http://{}/", started.web);
    println!("broker: mqtt://{}:{}", started.broker.host, started.broker.port);
    if let Some(tls) = started.broker_tls {
        println!("broker (tls): mqtts://{tls}");
    }
}

/// `fieldlink hub`: runs until SIGTERM or SIGINT; exit code 0.
pub fn run(cfg: HubConfig) -> Result<i32, HubError> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(HubError::Runtime)?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(HubError::Signals)?;
        let mut int = signal(SignalKind::interrupt()).map_err(HubError::Signals)?;
        let mut hup = signal(SignalKind::hangup()).map_err(HubError::Signals)?;
        let hub = Hub::start(&cfg).await?;
        // SIGHUP is handled from here on: tell `hub device add|remove` whom to signal.
        let pid_file = match hub.broker {
            Some(_) => {
                let path = cfg.state_dir.join(PID_FILE);
                crate::fsutil::write_atomic(&path, format!("{}\n", std::process::id()).as_bytes())
                    .map_err(|source| HubError::PidFile { path: path.clone(), source })?;
                Some(path)
            }
            None => None,
        };
        announce(hub.started());
        // The database is open, the web listener bound and the collector
        // running (it connects to the broker on its own): systemd may count
        // the hub as started.
        let notifier = crate::sd_notify::Notifier::from_env();
        notifier.send(&format!("READY=1\nSTATUS=dashboard on http://{}/", hub.started().web));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => hub.reload_devices().await,
            }
        }
        notifier.send("STOPPING=1");
        tracing::info!("stopping: committing what is in hand, then disconnecting");
        hub.shutdown().await;
        if let Some(path) = pid_file {
            // Best effort: a stale pid file only makes `device add` signal
            // a process that is gone, which it reports.
            let _ = std::fs::remove_file(path);
        }
        Ok(0)
    })
}
