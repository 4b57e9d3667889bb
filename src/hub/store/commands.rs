//! The `commands` table: recording a published command, reading one back,
//! expiring the unanswered ones, a device's command history, and setting a
//! status by hand. Confirmation
//! and rejection by the agent's answer happen in `write`, inside the batch
//! that stores the answer. It never publishes anything (`hub::commands`
//! does).

use std::time::SystemTime;

use sqlx::AnyPool;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::affected;
use super::error::StoreError;
use super::sql::Statements;
use super::write::{MAX_NAME_CHARS, normalize_ts};
use crate::hub::model::{CommandRow, CommandStatus};
use crate::timefmt;

/// Records a command as published. Its times are stored in canonical form.
pub async fn insert(pool: &AnyPool, sql: &Statements, cmd: &CommandRow) -> Result<(), StoreError> {
    let bad = |reason: String| StoreError::BadCommand { command_id: cmd.command_id.clone(), reason };
    for (what, value) in [("command_id", &cmd.command_id), ("device", &cmd.device), ("relay", &cmd.relay)] {
        let len = value.chars().count();
        if len == 0 || len > MAX_NAME_CHARS {
            return Err(bad(format!("{what} must be 1..={MAX_NAME_CHARS} characters, not {len}")));
        }
    }
    if !matches!(cmd.requested.as_str(), "on" | "off" | "toggle") {
        return Err(bad(format!("requested '{}': expected on, off or toggle", cmd.requested)));
    }
    let time = |what: &str, ts: &str| normalize_ts(ts).ok_or_else(|| bad(format!("{what} '{ts}' is not RFC 3339")));
    let requested_at = time("requested_at", &cmd.requested_at)?;
    let expires_at = time("expires_at", &cmd.expires_at)?;
    let confirmed_at = cmd.confirmed_at.as_deref().map(|t| time("confirmed_at", t)).transpose()?;
    let q = sqlx::query(AssertSqlSafe(sql.insert_command.clone()))
        .bind(cmd.command_id.as_str())
        .bind(cmd.device.as_str())
        .bind(cmd.relay.as_str())
        .bind(cmd.requested.as_str())
        .bind(cmd.status.as_str())
        .bind(requested_at)
        .bind(expires_at)
        .bind(confirmed_at)
        .bind(cmd.state.as_deref())
        .bind(cmd.error.as_deref())
        .bind(cmd.requested_by.as_deref())
        .bind(cmd.client.as_deref())
        .bind(cmd.answered_at.as_deref().map(|t| time("answered_at", t)).transpose()?);
    let mut conn = pool.acquire().await.map_err(StoreError::db("record a command"))?;
    affected(q, &mut conn, "record a command").await?;
    Ok(())
}

/// One command by id, on any connection (a pooled one, or a transaction's).
pub async fn fetch(conn: &mut AnyConnection, sql: &Statements, id: &str) -> Result<Option<CommandRow>, StoreError> {
    let row = sqlx::query(AssertSqlSafe(sql.select_command.clone()))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(StoreError::db("read a command"))?;
    row.as_ref().map(command_row).transpose()
}

/// Moves every `requested` command whose `expires_at` is before `now` to
/// `expired`; returns them as they now stand. A command that an answer moved
/// on meanwhile (another hub) is left alone and not returned.
pub async fn expire(pool: &AnyPool, sql: &Statements, now: SystemTime) -> Result<Vec<CommandRow>, StoreError> {
    let now = timefmt::rfc3339_millis(now);
    let ids: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql.select_expirable.clone()))
        .bind(now.as_str())
        .fetch_all(pool)
        .await
        .map_err(StoreError::db("find expired commands"))?;
    let mut expired = Vec::with_capacity(ids.len());
    if ids.is_empty() {
        return Ok(expired);
    }
    let mut conn = pool.acquire().await.map_err(StoreError::db("expire commands"))?;
    for id in &ids {
        let q = sqlx::query(AssertSqlSafe(sql.expire_command.clone())).bind(now.as_str()).bind(id.as_str());
        if affected(q, &mut conn, "expire a command").await? == 1
            && let Some(row) = fetch(&mut conn, sql, id).await?
        {
            expired.push(row);
        }
    }
    Ok(expired)
}

/// A device's commands, newest requested first, at most `limit`.
pub async fn of_device(
    pool: &AnyPool,
    sql: &Statements,
    device: &str,
    limit: u32,
) -> Result<Vec<CommandRow>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(sql.select_device_commands.clone()))
        .bind(device)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
        .map_err(StoreError::db("read a device's commands"))?;
    rows.iter().map(command_row).collect()
}

/// Sets a command's status, whatever it was.
pub async fn set_status(pool: &AnyPool, sql: &Statements, id: &str, status: CommandStatus) -> Result<(), StoreError> {
    let q = sqlx::query(AssertSqlSafe(sql.set_command_status.clone())).bind(status.as_str()).bind(id);
    let mut conn = pool.acquire().await.map_err(StoreError::db("set a command's status"))?;
    // rows_affected counts matched rows on every backend (sqlx sets MySQL's
    // FOUND_ROWS), so 0 means there is no such command.
    if affected(q, &mut conn, "set a command's status").await? == 0 {
        return Err(StoreError::UnknownCommand(id.to_string()));
    }
    Ok(())
}

/// A row of `sql::COMMAND_COLUMNS`.
fn command_row(row: &AnyRow) -> Result<CommandRow, StoreError> {
    let get = |i: usize| row.try_get::<String, _>(i).map_err(StoreError::db("read a command"));
    let opt = |i: usize| row.try_get::<Option<String>, _>(i).map_err(StoreError::db("read a command"));
    let status = get(4)?;
    Ok(CommandRow {
        command_id: get(0)?,
        device: get(1)?,
        relay: get(2)?,
        requested: get(3)?,
        status: CommandStatus::parse(&status).ok_or(StoreError::Corrupt { what: "command status", value: status })?,
        requested_at: get(5)?,
        expires_at: get(6)?,
        confirmed_at: opt(7)?,
        state: opt(8)?,
        error: opt(9)?,
        requested_by: opt(10)?,
        client: opt(11)?,
        answered_at: opt(12)?,
    })
}
