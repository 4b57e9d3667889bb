//! `fieldlink fleet-sim`: a load generator that sizes a hub. N simulated
//! devices, each on its own MQTT connection, send the agent's wire contract
//! (90 % button, 5 % heartbeat, 5 % relay state) at a steady rate, spread
//! evenly over each second; at the end it prints what was sent, what the
//! broker acknowledged and, with the hub's database url, what was stored,
//! lost and duplicated and the publish → commit latency (DESIGN: Sizing a
//! hub). It owns the run's wiring (runtime, connect phase, common start,
//! verification); it is not an agent (no outbox, no GPIO, no retries beyond
//! QoS) and never writes to the hub's database.
//!
//! # Layout
//!
//! * [`plan`]: device ids, send times, the message mix and payloads (sans-IO).
//! * [`device`]: one simulated device's connection and sends.
//! * [`report`]: stored / lost / duplicates / percentiles and the table (sans-IO).
//! * [`db`]: reading the run's rows back from the hub's database.
//! * [`provision`]: credentials for the simulated devices on a hub-managed
//!   broker (the `hub device add` code path, for N devices at once).
//!
//! Each run has its own epoch (the start time in milliseconds), so runs
//! against one database never mix: a run's messages are
//! `(<prefix>-<n>, epoch, 1..=sent)`.

pub mod db;
pub mod device;
pub mod plan;
pub mod provision;
pub mod report;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use rumqttc::QoS;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{BrokerUrl, Secret};
use crate::timefmt;

pub use self::plan::Plan;
pub use self::report::{Sent, Verified};

/// Gap between two devices' connection attempts at the start, so a large
/// fleet does not flood the broker's listen backlog in one instant.
const CONNECT_STAGGER: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("mqtt options: {0}")]
    Options(String),
    #[error("device '{device}' could not connect: {reason}")]
    Refused { device: String, reason: String },
    #[error(
        "only {connected} of {devices} devices connected within {secs} s (is the broker's connection limit or the \
         open-file limit, `ulimit -n`, below the fleet?)"
    )]
    NotConnected { connected: usize, devices: usize, secs: u64 },
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
}

/// A fleet-sim run.
#[derive(Debug, Clone)]
pub struct Options {
    pub broker: BrokerUrl,
    pub plan: Plan,
    /// 0, 1 or 2.
    pub qos: u8,
    pub topic_prefix: String,
    /// Every device logs in as its device id with this password (the
    /// provisioned devices' convention: user name = client id = device id);
    /// none: anonymous.
    pub password: Option<Secret>,
    /// With `mqtts://`: the CA that signed the broker's certificate.
    pub ca_file: Option<PathBuf>,
    pub keep_alive: Duration,
    /// How long to wait for every device to connect.
    pub connect_timeout: Duration,
    /// The hub's database url: check what it stored.
    pub verify_db: Option<String>,
    /// With `verify_db`: how long to wait for the hub to store the last
    /// messages once nothing new arrives.
    pub settle: Duration,
}

/// What a run saw.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub epoch: u64,
    pub sent: Sent,
    pub verified: Option<Verified>,
}

impl Outcome {
    /// Whether every sent message was stored exactly once (true when the
    /// database was not checked and every device connected and sent).
    pub fn clean(&self) -> bool {
        match &self.verified {
            Some(v) => v.lost == 0 && v.duplicates == 0,
            None => self.sent.connected == self.sent.devices,
        }
    }
}

fn qos(level: u8) -> Result<QoS, FleetError> {
    match level {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => Err(FleetError::Invalid(format!("--qos {level}: expected 0, 1 or 2"))),
    }
}

fn check(o: &Options) -> Result<(), FleetError> {
    let bad = |s: String| Err(FleetError::Invalid(s));
    if o.plan.devices == 0 {
        return bad("--devices must be at least 1".into());
    }
    if !(o.plan.rate.is_finite() && o.plan.rate > 0.0 && o.plan.rate <= 1000.0) {
        return bad(format!(
            "--rate {}: expected messages per second per device, above 0 and at most 1000",
            o.plan.rate
        ));
    }
    if o.plan.duration.is_zero() {
        return bad("--duration must be above 0".into());
    }
    if o.plan.id_prefix.is_empty()
        || !o.plan.id_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return bad(format!(
            "--id-prefix '{}': expected [A-Za-z0-9_-]+ (device ids are <prefix>-<n>)",
            o.plan.id_prefix
        ));
    }
    Ok(())
}

/// Runs the fleet on its own tokio runtime and returns what it saw.
pub fn run(o: Options) -> Result<Outcome, FleetError> {
    check(&o)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(FleetError::Runtime)?;
    runtime.block_on(run_fleet(o))
}

async fn run_fleet(o: Options) -> Result<Outcome, FleetError> {
    let qos = qos(o.qos)?;
    // Open the database first: a wrong url should fail before ten minutes of load.
    let reader = match &o.verify_db {
        Some(url) => Some(db::open(url).await?),
        None => None,
    };
    let epoch = timefmt::to_millis(SystemTime::now());
    let plan = Arc::new(o.plan.clone());
    let ids = plan.device_ids();
    let counters = Arc::new(device::Counters::default());
    let prefix: Arc<str> = Arc::from(o.topic_prefix.as_str());
    let (connected_tx, mut connected_rx) = mpsc::channel(ids.len());
    let (start_tx, start_rx) = watch::channel(None);
    let ack_wait = (o.settle).max(Duration::from_secs(5));

    let mut tasks = JoinSet::new();
    for (index, id) in ids.iter().enumerate() {
        let options = crate::mqtt_options::options(crate::mqtt_options::Client {
            client_id: id,
            url: &o.broker,
            keep_alive: o.keep_alive,
            clean_session: true,
            username: o.password.as_ref().map(|_| id.as_str()),
            password: o.password.as_ref(),
            ca_file: o.ca_file.as_ref(),
            cert_file: None,
            key_file: None,
        })
        .map_err(FleetError::Options)?;
        let dev = device::Device {
            index,
            id: id.clone(),
            options,
            qos,
            epoch,
            topic_prefix: Arc::clone(&prefix),
            plan: Arc::clone(&plan),
            counters: Arc::clone(&counters),
            ack_wait,
        };
        let (tx, rx) = (connected_tx.clone(), start_rx.clone());
        let stagger = CONNECT_STAGGER * u32::try_from(index).unwrap_or(u32::MAX);
        tasks.spawn(async move {
            tokio::time::sleep(stagger).await;
            let id = dev.id.clone();
            (id, dev.run(tx, rx).await)
        });
    }
    drop(connected_tx);

    let deadline = Instant::now() + o.connect_timeout;
    let mut connected = 0;
    while connected < ids.len() {
        match tokio::time::timeout_at(deadline, connected_rx.recv()).await {
            Ok(Some(Ok(()))) => connected += 1,
            Ok(Some(Err(reason))) => {
                drop(start_tx);
                tasks.shutdown().await;
                // Which device: the first not yet connected is as good a name as any.
                return Err(FleetError::Refused { device: ids[connected].clone(), reason });
            }
            Ok(None) | Err(_) => {
                drop(start_tx);
                tasks.shutdown().await;
                return Err(FleetError::NotConnected {
                    connected,
                    devices: ids.len(),
                    secs: o.connect_timeout.as_secs(),
                });
            }
        }
    }
    tracing::info!(
        devices = ids.len(),
        per_device = plan.per_device(),
        rate = plan.rate,
        "every device connected; sending for {}",
        humantime::format_duration(plan.duration)
    );
    let started = Instant::now();
    // A short lead so every device is waiting on the same instant.
    let _ = start_tx.send(Some(started + Duration::from_millis(100)));

    let mut sent_by_device: HashMap<String, u64> = HashMap::with_capacity(ids.len());
    while let Some(done) = tasks.join_next().await {
        if let Ok((id, n)) = done {
            sent_by_device.insert(id, n);
        }
    }
    let sent = Sent {
        devices: ids.len(),
        connected,
        sent: counters.sent.load(Ordering::Relaxed),
        acked: counters.acked.load(Ordering::Relaxed),
        reconnects: counters.reconnects.load(Ordering::Relaxed),
        late_sends: counters.late_sends.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    };
    let verified = match reader {
        None => None,
        Some(reader) => {
            db::wait_stored(&reader, epoch, &sent_by_device, o.settle).await?;
            let v = db::verify(&reader, epoch, &sent_by_device).await?;
            reader.close().await;
            Some(v)
        }
    };
    Ok(Outcome { epoch, sent, verified })
}
