//! Relay commands from the hub (DESIGN: HTTP API, Command rules): publish a
//! JSON command with a fresh `id` and an `expires_at`, track it in the
//! database as requested -> confirmed / rejected / expired, and wait (bounded)
//! for the agent's answer.
//!
//! The answer is whatever the collector stores: a `relay/<r>/state` or an
//! `error` carrying the command's id (the store moves the command's status
//! in the same transaction). Waiters are woken in-process when this
//! hub's collector stores it, and also re-read the database every
//! [`POLL`], because with several hubs sharing the subscription another hub
//! may be the one that stores the answer. It never parses wire payloads
//! itself (`ingest` does) and never writes SQL (`store` does).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, QoS};
use serde::Serialize;
use tokio::sync::{Notify, broadcast};

use super::metrics::Metrics;
use super::model::{CommandRow, CommandStatus, LiveEvent, Requester};
use super::store::{Store, StoreError};
use crate::timefmt;

/// How often a waiter re-reads the database.
pub const POLL: Duration = Duration::from_millis(200);

/// `POST /api/devices/{d}/relays/{r}` body `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    On,
    Off,
    Toggle,
}

impl Requested {
    pub fn as_str(self) -> &'static str {
        match self {
            Requested::On => "on",
            Requested::Off => "off",
            Requested::Toggle => "toggle",
        }
    }

    pub fn parse(s: &str) -> Option<Requested> {
        match s {
            "on" => Some(Requested::On),
            "off" => Some(Requested::Off),
            "toggle" => Some(Requested::Toggle),
            _ => None,
        }
    }
}

/// What a command came to within the wait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    /// HTTP 200 `{"command_id","status":"confirmed","state"}`
    Confirmed { command_id: String, state: String },
    /// HTTP 202 `{"command_id","status":"pending"}`
    Pending { command_id: String },
    /// HTTP 409 `{"command_id","status":"rejected","error"}`
    Rejected { command_id: String, error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the hub's broker connection refused the command: {0}")]
    Publish(String),
    #[error("no randomness for a command id: {0}")]
    Random(String),
}

/// The outcome a stored command row stands for, if it is final.
pub fn outcome_of(row: &CommandRow) -> Option<Outcome> {
    let command_id = row.command_id.clone();
    match row.status {
        CommandStatus::Requested => None,
        CommandStatus::Confirmed => {
            Some(Outcome::Confirmed { command_id, state: row.state.clone().unwrap_or_else(|| row.requested.clone()) })
        }
        CommandStatus::Rejected => Some(Outcome::Rejected {
            command_id,
            error: row.error.clone().unwrap_or_else(|| "rejected by the agent".to_string()),
        }),
        CommandStatus::Expired => Some(Outcome::Rejected {
            command_id,
            error: format!("expired: no answer from the device before {}", row.expires_at),
        }),
    }
}

/// The JSON command the agent receives.
pub fn command_payload(req: Requested, id: &str, expires_at: &str) -> Vec<u8> {
    serde_json::json!({ "state": req.as_str(), "id": id, "expires_at": expires_at }).to_string().into_bytes()
}

fn fresh_id() -> Result<String, CommandError> {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).map_err(|e| CommandError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

struct Inner {
    store: Store,
    client: AsyncClient,
    prefix: String,
    ttl: Duration,
    live: broadcast::Sender<LiveEvent>,
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    metrics: Arc<Metrics>,
}

/// Publishes relay commands and waits for their outcome. Cheap to clone.
#[derive(Clone)]
pub struct Commander {
    inner: Arc<Inner>,
}

impl Commander {
    pub fn new(
        store: Store,
        client: AsyncClient,
        prefix: &str,
        ttl: Duration,
        live: broadcast::Sender<LiveEvent>,
    ) -> Self {
        Commander {
            inner: Arc::new(Inner {
                store,
                client,
                prefix: prefix.to_string(),
                ttl,
                live,
                waiters: Mutex::new(HashMap::new()),
                metrics: Arc::default(),
            }),
        }
    }

    /// Counts commands by status in `metrics` (call right after `new`,
    /// before the commander is cloned; a clone keeps its own counters).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.metrics = metrics,
            None => tracing::warn!("Commander::with_metrics on a shared commander: commands are not counted"),
        }
        self
    }

    fn waiter(&self, id: &str) -> Arc<Notify> {
        let mut w = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        w.entry(id.to_string()).or_default().clone()
    }

    fn forget(&self, id: &str) {
        self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// Publishes `{"state","id","expires_at"}` (QoS 1) to
    /// `P/<device>/relay/<relay>/set`, records the command as requested (by
    /// `by`), and waits up to `wait` for the agent's answer.
    pub async fn send(
        &self,
        device: &str,
        relay: &str,
        req: Requested,
        wait: Duration,
        by: &Requester,
    ) -> Result<Outcome, CommandError> {
        let id = fresh_id()?;
        let now = SystemTime::now();
        let expires_at = timefmt::rfc3339_millis(now + self.inner.ttl);
        let row = CommandRow {
            command_id: id.clone(),
            device: device.to_string(),
            relay: relay.to_string(),
            requested: req.as_str().to_string(),
            status: CommandStatus::Requested,
            requested_at: timefmt::rfc3339_millis(now),
            expires_at: expires_at.clone(),
            confirmed_at: None,
            state: None,
            error: None,
            requested_by: Some(by.origin.as_str().to_string()),
            client: by.client.clone(),
            answered_at: None,
        };
        // Recorded before it is published, so the answer always finds it.
        self.inner.store.insert_command(&row).await?;
        let notify = self.waiter(&id);
        let topic = format!("{}/{device}/relay/{relay}/set", self.inner.prefix);
        let published = self
            .inner
            .client
            .publish(topic, QoS::AtLeastOnce, false, command_payload(req, &id, &expires_at))
            .await
            .map_err(|e| CommandError::Publish(e.to_string()));
        if let Err(e) = published {
            self.forget(&id);
            return Err(e);
        }
        tracing::info!(device, relay, command_id = %id, requested = req.as_str(), "command published");
        self.inner.metrics.command(CommandStatus::Requested);
        let outcome = self.wait(&id, &notify, wait).await;
        self.forget(&id);
        outcome
    }

    async fn wait(&self, id: &str, notify: &Notify, wait: Duration) -> Result<Outcome, CommandError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(outcome) = self.inner.store.command(id).await?.as_ref().and_then(outcome_of) {
                return Ok(outcome);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Outcome::Pending { command_id: id.to_string() });
            }
            // Woken by this hub's collector, or re-read after POLL in case
            // another hub stored the answer.
            let _woken_or_polled = tokio::time::timeout((deadline - now).min(POLL), notify.notified()).await;
        }
    }

    /// Called after a batch committed or commands expired: wakes the
    /// waiters of these commands and tells the live stream.
    pub fn answered(&self, rows: &[CommandRow]) {
        for row in rows {
            self.inner.metrics.command(row.status);
            if let Some(n) = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner()).get(&row.command_id) {
                n.notify_one();
            }
            // Nobody listening is fine: the live stream is best effort.
            let _ = self.inner.live.send(LiveEvent::Command(row.clone()));
        }
    }

    /// Marks commands past `expires_at` with no answer as expired.
    pub async fn expire(&self) -> Result<usize, StoreError> {
        let rows = self.inner.store.expire_commands_returning(SystemTime::now()).await?;
        self.answered(&rows);
        Ok(rows.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: CommandStatus) -> CommandRow {
        CommandRow {
            command_id: "c1".into(),
            device: "pi".into(),
            relay: "pump".into(),
            requested: "toggle".into(),
            status,
            requested_at: "2026-11-21T10:00:00.000Z".into(),
            expires_at: "2026-11-21T10:00:30.000Z".into(),
            confirmed_at: None,
            state: Some("on".into()),
            error: Some("expired: command expired at ...".into()),
            requested_by: None,
            client: None,
            answered_at: None,
        }
    }

    #[test]
    fn only_answered_commands_have_an_outcome() {
        assert_eq!(outcome_of(&row(CommandStatus::Requested)), None);
        assert_eq!(
            outcome_of(&row(CommandStatus::Confirmed)),
            Some(Outcome::Confirmed { command_id: "c1".into(), state: "on".into() })
        );
        assert!(matches!(outcome_of(&row(CommandStatus::Rejected)), Some(Outcome::Rejected { .. })));
        let Some(Outcome::Rejected { error, .. }) = outcome_of(&row(CommandStatus::Expired)) else {
            panic!("an expired command is a rejection")
        };
        assert!(error.contains("2026-11-21T10:00:30.000Z"), "{error}");
    }

    #[test]
    fn the_published_command_is_the_json_the_agent_parses() {
        let bytes = command_payload(Requested::Toggle, "c9", "2099-01-01T00:00:00.000Z");
        let now = timefmt::parse_rfc3339("2026-11-21T10:00:00Z").expect("valid");
        let cmd = crate::proto::parse_command("pump", true, &bytes, now).expect("the agent accepts it");
        assert_eq!(cmd.id.as_deref(), Some("c9"));
        assert_eq!(cmd.action, crate::proto::Action::Toggle);
    }

    #[test]
    fn command_ids_are_fresh() {
        let a = fresh_id().expect("random");
        assert_eq!(a.len(), 24);
        assert_ne!(a, fresh_id().expect("random"));
    }
}
