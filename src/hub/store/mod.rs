//! The hub's database: every message stored once per `(device, epoch, seq)`, the
//! devices' online state, newest heartbeat, relay states and sensor readings, the relay
//! commands the hub published, and the messages the collector set aside. One [`Store`] handle over a sqlx `Any` pool
//! speaks SQLite (`sqlite://path`), MySQL/MariaDB (`mysql://...`) or
//! PostgreSQL (`postgres://...`). It never parses MQTT and never decides
//! when the broker gets its acknowledgement; the collector does both.
//!
//! # Invariants
//!
//! * `write_batch` is one transaction: all of a batch is stored, or none.
//!   When it returns `Ok`, the batch is committed and may be acknowledged.
//! * A `(device, epoch, seq)` is stored once; only its first storing has
//!   effects (device, heartbeat, relay state, command answer), so replays are
//!   harmless. Newest heartbeat and relay state are chosen by `(epoch, seq)`,
//!   never by arrival order.
//! * Times are RFC 3339 UTC strings with milliseconds, normalized on the way
//!   in, so they compare as text the way they compare as time in all three
//!   databases.
//! * No error message carries the database password.
//!
//! # Layout
//!
//! * `connect`: URL -> SQLite file and directory, pool, per-connection settings.
//! * `schema`: the DDL per dialect and the migrator (`fieldlink_schema`).
//! * `dialect`: placeholders and "insert unless present", per database.
//! * `sql`: the data statements, rendered once per dialect.
//! * `write`: the batch write path and its rules.
//! * `read`: devices, events, set-aside messages and a device's history
//!   over a time range, for the API.
//! * `commands`: the `commands` table (and a device's command history).
//! * `error`: [`StoreError`] and URL redaction.

mod commands;
mod connect;
mod dialect;
mod error;
mod read;
mod schema;
mod sql;
mod write;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::SystemTime;

use sqlx::AnyPool;
use sqlx::any::{Any, AnyArguments};
use sqlx::query::Query;
use sqlx::{AnyConnection, AssertSqlSafe};

pub use self::dialect::Dialect;
pub use self::error::{StoreError, redact_url};
pub use self::write::{BatchReport, MAX_NAME_CHARS};
use super::model::{
    Before, CommandRow, CommandStatus, DeviceView, EventView, Kind, RangeRow, SetAside, SetAsideView, StatusEvent,
    Update,
};
use crate::timefmt;

/// A handle to the database (cheap to clone; a connection pool inside).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    sql: Arc<sql::Statements>,
}

impl Store {
    /// Connects (`sqlite://path`, `mysql://...`, `postgres://...`), creating
    /// the SQLite file if needed, and applies the schema migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let (pool, dialect) = connect::open(url).await?;
        tracing::debug!("database: {} at {}", dialect.name(), redact_url(url));
        Ok(Store { pool, dialect, sql: Arc::new(sql::Statements::new(dialect)) })
    }

    /// Which kind of database this is.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Closes the pool: waits for borrowed connections to come back, then
    /// closes them all. Clones of this handle stop working too.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Stores a batch in ONE transaction. Returns, per update, whether it was
    /// newly stored (false for a `(device, epoch, seq)` already there). Also keeps
    /// the devices' online state / last_seen / latest heartbeat, the newest
    /// relay states, and moves commands to confirmed / rejected when a relay
    /// state or error carrying their `command_id` is stored.
    ///
    /// An update the schema cannot hold fails the whole batch, before
    /// anything is written, with [`StoreError::Invalid`] naming its index.
    pub async fn write_batch(&self, updates: &[Update]) -> Result<Vec<bool>, StoreError> {
        Ok(self.write_batch_report(updates).await?.stored)
    }

    /// [`Store::write_batch`], also returning the commands the batch moved
    /// (for `LiveEvent::Command`).
    pub async fn write_batch_report(&self, updates: &[Update]) -> Result<BatchReport, StoreError> {
        write::write_batch(&self.pool, self.dialect, &self.sql, updates).await
    }

    /// Every device the hub has heard of (a message or a status), by name.
    pub async fn devices(&self) -> Result<Vec<DeviceView>, StoreError> {
        read::devices(&self.pool, &self.sql).await
    }

    /// [`Store::devices`] as JSON text, for `GET /api/devices` (one
    /// statement on SQLite).
    pub async fn devices_json(&self) -> Result<String, StoreError> {
        read::devices_json(&self.pool, &self.sql).await
    }

    /// How many devices are online now.
    pub async fn devices_online(&self) -> Result<u64, StoreError> {
        read::online(&self.pool, &self.sql).await
    }

    /// A device's messages, newest (greatest `(epoch, seq)`) first: at most
    /// `limit`, of `kind` if given, older than `before` if given.
    pub async fn events(
        &self,
        device: &str,
        kind: Option<Kind>,
        limit: u32,
        before: Option<Before>,
    ) -> Result<Vec<EventView>, StoreError> {
        read::events(&self.pool, &self.sql, device, kind, limit, before).await
    }

    /// Records a published command (its times normalized to UTC
    /// milliseconds). A duplicate `command_id` is an error.
    pub async fn insert_command(&self, cmd: &CommandRow) -> Result<(), StoreError> {
        commands::insert(&self.pool, &self.sql, cmd).await
    }

    pub async fn command(&self, id: &str) -> Result<Option<CommandRow>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::db("read a command"))?;
        commands::fetch(&mut conn, &self.sql, id).await
    }

    /// Marks still-`requested` commands whose `expires_at` is before `now` as
    /// expired; returns how many.
    pub async fn expire_commands(&self, now: SystemTime) -> Result<u64, StoreError> {
        let n = self.expire_commands_returning(now).await?.len();
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    /// [`Store::expire_commands`], returning the commands it expired.
    pub async fn expire_commands_returning(&self, now: SystemTime) -> Result<Vec<CommandRow>, StoreError> {
        commands::expire(&self.pool, &self.sql, now).await
    }

    /// A device's commands, newest requested first, at most `limit`.
    pub async fn device_commands(&self, device: &str, limit: u32) -> Result<Vec<CommandRow>, StoreError> {
        commands::of_device(&self.pool, &self.sql, device, limit).await
    }

    /// A device's online/offline changes between `from` and `to`, oldest
    /// first, with the newest change before `from`.
    pub async fn status_events(
        &self,
        device: &str,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<(Option<StatusEvent>, Vec<StatusEvent>), StoreError> {
        let (from, to) = (timefmt::rfc3339_millis(from), timefmt::rfc3339_millis(to));
        read::status_events(&self.pool, &self.sql, device, &from, &to).await
    }

    /// A device's messages whose `ts` is between `from` and `to`, by `ts`,
    /// with payloads for heartbeats and sensor readings only.
    pub async fn range(&self, device: &str, from: SystemTime, to: SystemTime) -> Result<Vec<RangeRow>, StoreError> {
        let (from, to) = (timefmt::rfc3339_millis(from), timefmt::rfc3339_millis(to));
        read::range(&self.pool, &self.sql, device, &from, &to).await
    }

    /// Sets a command's status unconditionally; [`StoreError::UnknownCommand`]
    /// if there is no such command.
    pub async fn set_command_status(&self, id: &str, status: CommandStatus) -> Result<(), StoreError> {
        commands::set_status(&self.pool, &self.sql, id, status).await
    }

    /// Records a message the collector set aside, in a transaction of its
    /// own (one statement). The record must already be in the form
    /// [`crate::hub::ingest::set_aside`] gives it.
    pub async fn insert_set_aside(&self, r: &SetAside) -> Result<(), StoreError> {
        let q = sqlx::query(AssertSqlSafe(self.sql.insert_set_aside.clone()))
            .bind(r.device.clone())
            .bind(r.topic.clone())
            .bind(r.reason.clone())
            .bind(r.received_at.clone())
            .bind(r.payload.clone())
            .bind(i64::try_from(r.payload_bytes).unwrap_or(i64::MAX));
        let mut conn = self.pool.acquire().await.map_err(StoreError::db("record a set-aside message"))?;
        affected(q, &mut conn, "record a set-aside message").await.map(|_| ())
    }

    /// The newest `limit` set-aside messages, newest first.
    pub async fn set_aside(&self, limit: u32) -> Result<Vec<SetAsideView>, StoreError> {
        read::set_aside(&self.pool, &self.sql, limit).await
    }

    /// Deletes heartbeats whose `ts` is older than `before`; returns how many.
    /// The devices' newest heartbeat (`DeviceView::heartbeat`) is a copy and
    /// stays.
    pub async fn prune_heartbeats(&self, before: SystemTime) -> Result<u64, StoreError> {
        let before = timefmt::rfc3339_millis(before);
        let q = sqlx::query(AssertSqlSafe(self.sql.prune_heartbeats.clone())).bind(before);
        let mut conn = self.pool.acquire().await.map_err(StoreError::db("prune heartbeats"))?;
        affected(q, &mut conn, "prune heartbeats").await
    }
}

/// Runs a statement; its `rows_affected`.
async fn affected(
    q: Query<'_, Any, AnyArguments>,
    conn: &mut AnyConnection,
    what: &'static str,
) -> Result<u64, StoreError> {
    Ok(q.execute(conn).await.map_err(StoreError::db(what))?.rows_affected())
}
