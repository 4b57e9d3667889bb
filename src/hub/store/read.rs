//! The read side for the API: the device list (with newest heartbeat and
//! relay states and set-aside count), a device's events, newest first, the
//! set-aside messages, and a device's messages and status changes over a
//! time range (the dashboard's history; `hub::history` summarizes them). It turns rows into the
//! model's views; it never writes.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use sqlx::AnyPool;
use sqlx::{AssertSqlSafe, Row};

use super::error::StoreError;
use super::sql::Statements;
use crate::hub::model::{
    Before, DeviceView, EventView, Kind, RangeRow, SensorView, SetAside, SetAsideView, StatusEvent,
};
use crate::timefmt;

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

/// [`devices`] as the JSON text of `GET /api/devices`. On SQLite one
/// statement builds it, so the rows never cross from sqlx's worker thread
/// one by one and no heartbeat is parsed and printed again (issue #8: that
/// was most of the time of the request); the other databases serialize
/// [`devices`]. The same JSON value either way (a test compares them); only
/// the order of a heartbeat's keys may differ (as stored, or sorted).
pub async fn devices_json(pool: &AnyPool, sql: &Statements) -> Result<String, StoreError> {
    match &sql.select_devices_json {
        Some(q) => {
            sqlx::query_scalar(AssertSqlSafe(q.clone())).fetch_one(pool).await.map_err(StoreError::db("read devices"))
        }
        None => {
            let devices = devices(pool, sql).await?;
            serde_json::to_string(&devices)
                .map_err(|e| StoreError::Corrupt { what: "device list", value: e.to_string() })
        }
    }
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

/// A device's status changes with `from <= at <= to`, oldest first, and the
/// newest one before `from` (the state the range starts in).
pub async fn status_events(
    pool: &AnyPool,
    sql: &Statements,
    device: &str,
    from: &str,
    to: &str,
) -> Result<(Option<StatusEvent>, Vec<StatusEvent>), StoreError> {
    let what = "read status changes";
    let event = |row: &sqlx::any::AnyRow| -> Result<StatusEvent, StoreError> {
        Ok(StatusEvent {
            online: row.try_get::<i64, _>(0).map_err(StoreError::db(what))? != 0,
            at: row.try_get(1).map_err(StoreError::db(what))?,
        })
    };
    let before = sqlx::query(AssertSqlSafe(sql.status_before.clone()))
        .bind(device)
        .bind(from)
        .fetch_optional(pool)
        .await
        .map_err(StoreError::db(what))?;
    let rows = sqlx::query(AssertSqlSafe(sql.select_status_events.clone()))
        .bind(device)
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await
        .map_err(StoreError::db(what))?;
    Ok((before.as_ref().map(event).transpose()?, rows.iter().map(event).collect::<Result<_, _>>()?))
}

/// A device's messages with `from <= ts <= to`, by `ts` (an index range
/// scan on `(device, ts)`). Payloads come only for heartbeats and sensor
/// readings; a row whose times do not parse is skipped (they were
/// normalized on the way in, so that is a row written by hand).
pub async fn range(
    pool: &AnyPool,
    sql: &Statements,
    device: &str,
    from: &str,
    to: &str,
) -> Result<Vec<RangeRow>, StoreError> {
    let what = "read a device's messages over a range";
    let rows = sqlx::query(AssertSqlSafe(sql.select_range.clone()))
        .bind(device)
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await
        .map_err(StoreError::db(what))?;
    let ms = |s: &str| timefmt::parse_rfc3339(s).map(timefmt::to_millis);
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let ts: String = row.try_get(0).map_err(StoreError::db(what))?;
        let received: String = row.try_get(1).map_err(StoreError::db(what))?;
        let kind: String = row.try_get(2).map_err(StoreError::db(what))?;
        let payload: Option<String> = row.try_get(4).map_err(StoreError::db(what))?;
        let (Some(ts_ms), Some(received_ms), Some(kind)) = (ms(&ts), ms(&received), Kind::parse(&kind)) else {
            continue;
        };
        out.push(RangeRow {
            ts_ms,
            received_ms,
            kind,
            name: row.try_get(3).map_err(StoreError::db(what))?,
            payload: payload.map(|p| json("payload", p)).transpose()?,
        });
    }
    Ok(out)
}

fn corrupt(what: &'static str, value: i64) -> StoreError {
    StoreError::Corrupt { what, value: value.to_string() }
}

fn json(what: &'static str, text: String) -> Result<Value, StoreError> {
    serde_json::from_str(&text).map_err(|_| StoreError::Corrupt { what, value: text })
}
