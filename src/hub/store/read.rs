//! The read side for the API: the device list (with newest heartbeat and
//! relay states) and a device's events, newest first. It turns rows into the
//! model's views; it never writes.

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::AnyPool;
use sqlx::{AssertSqlSafe, Row};

use super::error::StoreError;
use super::sql::Statements;
use crate::hub::model::{DeviceView, EventView, Kind};

/// Every device the hub has heard of, by name.
pub async fn devices(pool: &AnyPool, sql: &Statements) -> Result<Vec<DeviceView>, StoreError> {
    let what = "read devices";
    let rows =
        sqlx::query(AssertSqlSafe(sql.select_devices.clone())).fetch_all(pool).await.map_err(StoreError::db(what))?;
    let mut devices = Vec::with_capacity(rows.len());
    for row in &rows {
        let heartbeat: Option<String> = row.try_get(3).map_err(StoreError::db(what))?;
        devices.push(DeviceView {
            device: row.try_get(0).map_err(StoreError::db(what))?,
            online: row.try_get::<i64, _>(1).map_err(StoreError::db(what))? != 0,
            last_seen: row.try_get(2).map_err(StoreError::db(what))?,
            heartbeat: heartbeat.map(|h| json("heartbeat", h)).transpose()?,
            relays: BTreeMap::new(),
        });
    }
    let rows = sqlx::query(AssertSqlSafe(sql.select_relays.clone()))
        .fetch_all(pool)
        .await
        .map_err(StoreError::db("read relay states"))?;
    // Both lists are ordered by device: walk them together.
    let mut at = 0;
    for row in &rows {
        let device: String = row.try_get(0).map_err(StoreError::db("read relay states"))?;
        while at < devices.len() && devices[at].device < device {
            at += 1;
        }
        if let Some(d) = devices.get_mut(at).filter(|d| d.device == device) {
            let relay: String = row.try_get(1).map_err(StoreError::db("read relay states"))?;
            let state: String = row.try_get(2).map_err(StoreError::db("read relay states"))?;
            d.relays.insert(relay, state);
        }
    }
    Ok(devices)
}

/// A device's messages, newest (highest seq) first: at most `limit`, of one
/// kind if given, with seq below `before_seq` if given.
pub async fn events(
    pool: &AnyPool,
    sql: &Statements,
    device: &str,
    kind: Option<Kind>,
    limit: u32,
    before_seq: Option<u64>,
) -> Result<Vec<EventView>, StoreError> {
    let what = "read events";
    if limit == 0 || before_seq == Some(0) {
        return Ok(Vec::new());
    }
    // A bound beyond the column's range excludes nothing.
    let before = before_seq.and_then(|s| i64::try_from(s).ok());
    let mut q = sqlx::query(AssertSqlSafe(sql.select_events(kind.is_some(), before.is_some()))).bind(device);
    if let Some(kind) = kind {
        q = q.bind(kind.as_str());
    }
    if let Some(before) = before {
        q = q.bind(before);
    }
    let rows = q.bind(i64::from(limit)).fetch_all(pool).await.map_err(StoreError::db(what))?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let seq: i64 = row.try_get(0).map_err(StoreError::db(what))?;
        let kind: String = row.try_get(2).map_err(StoreError::db(what))?;
        let payload: String = row.try_get(4).map_err(StoreError::db(what))?;
        events.push(EventView {
            seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt { what: "seq", value: seq.to_string() })?,
            ts: row.try_get(1).map_err(StoreError::db(what))?,
            kind: Kind::parse(&kind).ok_or(StoreError::Corrupt { what: "message kind", value: kind })?,
            name: row.try_get(3).map_err(StoreError::db(what))?,
            payload: json("payload", payload)?,
        });
    }
    Ok(events)
}

fn json(what: &'static str, text: String) -> Result<Value, StoreError> {
    serde_json::from_str(&text).map_err(|_| StoreError::Corrupt { what, value: text })
}
