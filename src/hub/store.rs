//! IMPLEMENTATION PENDING (store helper). The hub's database: see the brief.
//! Signatures below are the contract the collector, commands and web code
//! against.

use std::time::SystemTime;

use super::model::{CommandRow, CommandStatus, DeviceView, EventView, Kind, Update};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(String),
}

/// A handle to the database (cheap to clone; a connection pool inside).
#[derive(Clone, Debug)]
pub struct Store {}

impl Store {
    /// Connects (`sqlite://path`, `mysql://...`, `postgres://...`), creating
    /// the SQLite file if needed, and applies the schema migrations.
    pub async fn connect(_url: &str) -> Result<Store, StoreError> {
        todo!()
    }

    /// Stores a batch in ONE transaction. Returns, per update, whether it was
    /// newly stored (false for a `(device, seq)` already there). Also keeps
    /// the devices' online state / last_seen / latest heartbeat, the newest
    /// relay states, and moves commands to confirmed / rejected when a relay
    /// state or error carrying their `command_id` is stored.
    pub async fn write_batch(&self, _updates: &[Update]) -> Result<Vec<bool>, StoreError> {
        todo!()
    }

    pub async fn devices(&self) -> Result<Vec<DeviceView>, StoreError> {
        todo!()
    }

    pub async fn events(
        &self,
        _device: &str,
        _kind: Option<Kind>,
        _limit: u32,
        _before_seq: Option<u64>,
    ) -> Result<Vec<EventView>, StoreError> {
        todo!()
    }

    pub async fn insert_command(&self, _cmd: &CommandRow) -> Result<(), StoreError> {
        todo!()
    }

    pub async fn command(&self, _id: &str) -> Result<Option<CommandRow>, StoreError> {
        todo!()
    }

    /// Marks still-`requested` commands whose `expires_at` is before `now` as
    /// expired; returns how many.
    pub async fn expire_commands(&self, _now: SystemTime) -> Result<u64, StoreError> {
        todo!()
    }

    pub async fn set_command_status(&self, _id: &str, _status: CommandStatus) -> Result<(), StoreError> {
        todo!()
    }

    /// Deletes heartbeats whose `ts` is older than `before`; returns how many.
    pub async fn prune_heartbeats(&self, _before: SystemTime) -> Result<u64, StoreError> {
        todo!()
    }
}
