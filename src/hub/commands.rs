//! IMPLEMENTATION PENDING (mine). Relay commands: publish with a fresh id and
//! `expires_at`, track requested -> confirmed / rejected / expired.

use std::time::Duration;

use serde::Serialize;

use super::store::StoreError;

/// `POST /api/devices/{d}/relays/{r}` body `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    On,
    Off,
    Toggle,
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
}

/// Publishes relay commands and waits for their outcome.
#[derive(Clone)]
pub struct Commander {}

impl Commander {
    /// Publishes `{"state","id","expires_at"}` (QoS 1) to
    /// `P/<device>/relay/<relay>/set`, records the command as requested, and
    /// waits up to `wait` for the agent's answer.
    pub async fn send(&self, _device: &str, _relay: &str, _req: Requested, _wait: Duration) -> Result<Outcome, CommandError> {
        todo!()
    }
}
