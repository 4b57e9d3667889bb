//! The read side for the API: the device list (with newest heartbeat and
//! relay states and set-aside count), a device's events, newest first, and
//! the set-aside messages. It turns rows into the
//! model's views; it never writes.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use sqlx::AnyPool;
use sqlx::{AssertSqlSafe, Row};

use super::error::StoreError;
use super::sql::Statements;
use crate::hub::model::{Before, DeviceView, EventView, Kind, SensorView, SetAside, SetAsideView};

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
            sensors: BTreeMap::new(),
            set_aside: 0,
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
    let what = "read sensor readings";
    let rows =
        sqlx::query(AssertSqlSafe(sql.select_sensors.clone())).fetch_all(pool).await.map_err(StoreError::db(what))?;
    let mut at = 0;
    for row in &rows {
        let device: String = row.try_get(0).map_err(StoreError::db(what))?;
        while at < devices.len() && devices[at].device < device {
            at += 1;
        }
        if let Some(d) = devices.get_mut(at).filter(|d| d.device == device) {
            let sensor: String = row.try_get(1).map_err(StoreError::db(what))?;
            let reading = SensorView {
                value: row.try_get(2).map_err(StoreError::db(what))?,
                unit: row.try_get(3).map_err(StoreError::db(what))?,
                ts: row.try_get(4).map_err(StoreError::db(what))?,
            };
            d.sensors.insert(sensor, reading);
        }
    }
    let rows = sqlx::query(AssertSqlSafe(sql.count_set_aside.clone()))
        .fetch_all(pool)
        .await
        .map_err(StoreError::db("count set-aside messages"))?;
    let mut counts = HashMap::with_capacity(rows.len());
    for row in &rows {
        let device: String = row.try_get(0).map_err(StoreError::db("count set-aside messages"))?;
        let n: i64 = row.try_get(1).map_err(StoreError::db("count set-aside messages"))?;
        counts.insert(device, u64::try_from(n).map_err(|_| corrupt("set-aside count", n))?);
    }
    for d in &mut devices {
        d.set_aside = counts.get(&d.device).copied().unwrap_or(0);
    }
    Ok(devices)
}

/// How many devices are online (a cheap gauge for `/metrics`).
pub async fn online(pool: &AnyPool, sql: &Statements) -> Result<u64, StoreError> {
    let n: i64 = sqlx::query_scalar(AssertSqlSafe(sql.count_online.clone()))
        .fetch_one(pool)
        .await
        .map_err(StoreError::db("count online devices"))?;
    u64::try_from(n).map_err(|_| corrupt("online count", n))
}

/// The newest `limit` set-aside messages, newest first.
pub async fn set_aside(pool: &AnyPool, sql: &Statements, limit: u32) -> Result<Vec<SetAsideView>, StoreError> {
    let what = "read set-aside messages";
    let rows = sqlx::query(AssertSqlSafe(sql.select_set_aside.clone()))
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await
        .map_err(StoreError::db(what))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let bytes: i64 = row.try_get(6).map_err(StoreError::db(what))?;
        out.push(SetAsideView {
            id: row.try_get(0).map_err(StoreError::db(what))?,
            entry: SetAside {
                device: row.try_get(1).map_err(StoreError::db(what))?,
                topic: row.try_get(2).map_err(StoreError::db(what))?,
                reason: row.try_get(3).map_err(StoreError::db(what))?,
                received_at: row.try_get(4).map_err(StoreError::db(what))?,
                payload: row.try_get(5).map_err(StoreError::db(what))?,
                payload_bytes: u64::try_from(bytes).map_err(|_| corrupt("payload_bytes", bytes))?,
            },
        });
    }
    Ok(out)
}

/// A device's messages, newest (greatest `(epoch, seq)`) first: at most
/// `limit`, of one kind if given, older than `before` if given.
pub async fn events(
    pool: &AnyPool,
    sql: &Statements,
    device: &str,
    kind: Option<Kind>,
    limit: u32,
    before: Option<Before>,
) -> Result<Vec<EventView>, StoreError> {
    let what = "read events";
    if limit == 0 {
        return Ok(Vec::new());
    }
    let before = match before {
        None => None,
        Some(Before { epoch: Some(epoch), seq }) => Some((epoch, seq)),
        Some(Before { epoch: None, seq }) => {
            let newest: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql.newest_epoch.clone()))
                .bind(device)
                .fetch_one(pool)
                .await
                .map_err(StoreError::db(what))?;
            let Some(newest) = newest else { return Ok(Vec::new()) };
            Some((u64::try_from(newest).map_err(|_| corrupt("epoch", newest))?, seq))
        }
    };
    let mut q = sqlx::query(AssertSqlSafe(sql.select_events(kind.is_some(), before.is_some()))).bind(device);
    if let Some(kind) = kind {
        q = q.bind(kind.as_str());
    }
    if let Some((epoch, seq)) = before {
        // The columns hold 0..=i64::MAX (`write` checks): a bound beyond that
        // is clamped, which excludes the same rows (all but a row at exactly
        // (i64::MAX, i64::MAX)).
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        q = q.bind(clamp(epoch)).bind(clamp(epoch)).bind(clamp(seq));
    }
    let rows = q.bind(i64::from(limit)).fetch_all(pool).await.map_err(StoreError::db(what))?;
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let epoch: i64 = row.try_get(0).map_err(StoreError::db(what))?;
        let seq: i64 = row.try_get(1).map_err(StoreError::db(what))?;
        let kind: String = row.try_get(3).map_err(StoreError::db(what))?;
        let payload: String = row.try_get(5).map_err(StoreError::db(what))?;
        events.push(EventView {
            epoch: u64::try_from(epoch).map_err(|_| corrupt("epoch", epoch))?,
            seq: u64::try_from(seq).map_err(|_| corrupt("seq", seq))?,
            ts: row.try_get(2).map_err(StoreError::db(what))?,
            kind: Kind::parse(&kind).ok_or(StoreError::Corrupt { what: "message kind", value: kind })?,
            name: row.try_get(4).map_err(StoreError::db(what))?,
            payload: json("payload", payload)?,
        });
    }
    Ok(events)
}

fn corrupt(what: &'static str, value: i64) -> StoreError {
    StoreError::Corrupt { what, value: value.to_string() }
}

fn json(what: &'static str, text: String) -> Result<Value, StoreError> {
    serde_json::from_str(&text).map_err(|_| StoreError::Corrupt { what, value: text })
}
