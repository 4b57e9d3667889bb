//! The write path: one batch of updates from the collector, checked, then
//! written in ONE transaction with everything it implies (device rows, newest
//! heartbeat and relay states, command answers). It owns the rules of what a
//! stored message changes; it never reads wire payloads beyond the few JSON
//! fields those rules need, and never decides when to acknowledge (the
//! collector does, after this returns).
//!
//! # Rules
//!
//! * A message is stored once per `(device, epoch, seq)`: the insert skips a
//!   key that exists, and its `rows_affected` says whether this call stored
//!   it. A device whose seqs restarted under a new epoch (a lost
//!   `seq.floor`) has its new messages stored, not taken for duplicates.
//! * Only a newly stored message has effects, so a replay changes nothing:
//!   - the device row exists (created by its first message or status) and
//!     its `last_seen` moves forward to the hub's receive time;
//!   - a heartbeat replaces `devices.heartbeat` if its `(epoch, seq)` is
//!     greater;
//!   - a relay state (`"on"`/`"off"`) replaces `relays.state` if its
//!     `(epoch, seq)` is greater; with a `command_id` it confirms that command (requested
//!     or expired, same device): `confirmed_at` = the message's `ts`;
//!   - an error with a `command_id` rejects that command: `error` =
//!     `"<code>: <message>"`;
//!   - a sensor reading with a numeric `value` replaces `sensors`' row for
//!     its sensor if its `(epoch, seq)` is greater.
//! * A status sets `online` and moves `last_seen` forward to its `at`; when
//!   it differs from the device's newest `status_events` row (or there is
//!   none), it is added there too (the dashboard's outage timeline).
//! * Updates are written grouped by device (in arrival order within a
//!   device, which is all that order means here), so hubs sharing a
//!   database take row locks in the same order and rarely deadlock.
//! * A deadlock or busy database (several hubs, one database) rolls the
//!   transaction back and runs it again, at most [`ATTEMPTS`] times.
//!
//! # Statements per batch
//!
//! A batch is first written as if every message were new (the common case,
//! issue #8): many-row `INSERT`s, the devices in two statements, and only
//! the newest heartbeat, relay state and reading of the batch per device,
//! relay and sensor, which leaves the state one message at a time would.
//! If the inserts took fewer rows than given, that transaction is rolled
//! back and the batch written one message at a time, which says which
//! were new.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use sqlx::AnyPool;
use sqlx::{AnyConnection, AssertSqlSafe};

use super::dialect::Dialect;
use super::error::StoreError;
use super::sql::Statements;
use super::{affected, commands};
use crate::hub::model::{CommandRow, Kind, Update};
use crate::timefmt;

/// Longest device, button, relay or command name the store accepts (the
/// MySQL schema's VARCHAR(255); the contract's names are far shorter).
pub const MAX_NAME_CHARS: usize = 255;

/// An agent's refusal text is cut to this many characters.
const MAX_ERROR_CHARS: usize = 1000;

/// Tries per batch when the database reports a deadlock or is busy.
pub const ATTEMPTS: u32 = 5;

/// Back-off before the second try; doubles each time, plus up to as much
/// again of random jitter so that two hubs do not collide in step.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);

/// What [`write_batch`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchReport {
    /// Per update, in order: newly stored (false for a `(device, epoch, seq)` that
    /// was already there). Status updates are always true.
    pub stored: Vec<bool>,
    /// Commands this batch confirmed or rejected, as they now stand.
    pub commands: Vec<CommandRow>,
}

/// An update, checked and in the shape the statements bind.
enum Checked<'a> {
    Message {
        device: &'a str,
        epoch: i64,
        seq: i64,
        ts: String,
        kind: &'static str,
        name: Option<&'a str>,
        payload: String,
        effect: Effect<'a>,
    },
    Status {
        device: &'a str,
        online: bool,
        at: String,
    },
}

impl Checked<'_> {
    fn device(&self) -> &str {
        match self {
            Checked::Message { device, .. } | Checked::Status { device, .. } => device,
        }
    }
}

/// What a newly stored message changes besides `messages`.
enum Effect<'a> {
    None,
    Heartbeat,
    Relay { relay: &'a str, state: &'a str, command_id: Option<&'a str> },
    Sensor { sensor: &'a str, value: f64, unit: Option<&'a str> },
    Rejects { command_id: &'a str, error: String },
}

/// Stores `updates` in one transaction; see the module doc for the rules.
pub async fn write_batch(
    pool: &AnyPool,
    dialect: Dialect,
    sql: &Statements,
    updates: &[Update],
) -> Result<BatchReport, StoreError> {
    let checked = updates.iter().enumerate().map(|(i, u)| check(i, u)).collect::<Result<Vec<_>, _>>()?;
    if checked.is_empty() {
        return Ok(BatchReport::default());
    }
    // Stable: arrival order is kept within each device.
    let mut order: Vec<usize> = (0..checked.len()).collect();
    order.sort_by(|a, b| checked[*a].device().cmp(checked[*b].device()));
    let received_at = timefmt::rfc3339_millis(SystemTime::now());
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
        match write_once(pool, dialect, sql, &checked, &order, &received_at).await {
            Err(e) if attempt < ATTEMPTS && e.is_contention() => {
                tracing::debug!("database: batch of {} rolled back (try {attempt}): {e}", checked.len());
                let jitter = fastrand::u64(0..=u64::try_from(backoff.as_millis()).unwrap_or(0));
                tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                backoff *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// A batch's transaction. On SQLite it takes the write lock up front: a
/// deferred transaction that reads first cannot wait for it and fails with
/// SQLITE_BUSY instead.
async fn begin_batch(pool: &AnyPool, dialect: Dialect) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
    match dialect {
        Dialect::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
        Dialect::MySql | Dialect::Postgres => pool.begin().await,
    }
    .map_err(StoreError::db("begin a batch"))
}

async fn write_once(
    pool: &AnyPool,
    dialect: Dialect,
    sql: &Statements,
    checked: &[Checked<'_>],
    order: &[usize],
    received_at: &str,
) -> Result<BatchReport, StoreError> {
    let mut tx = begin_batch(pool, dialect).await?;
    // The common case first: every message new. A redelivery (or a key
    // twice in the batch) is written again, one statement per row, which
    // tells which were there.
    if let Some(answered) = write_all_new(&mut tx, dialect, sql, checked, order, received_at).await? {
        let commands = fetch_commands(&mut tx, sql, answered).await?;
        tx.commit().await.map_err(StoreError::db("commit a batch"))?;
        return Ok(BatchReport { stored: vec![true; checked.len()], commands });
    }
    tx.rollback().await.map_err(StoreError::db("roll back a batch"))?;
    let mut tx = begin_batch(pool, dialect).await?;
    let mut stored = vec![false; checked.len()];
    let mut answered: Vec<&str> = Vec::new();
    let mut touched: HashSet<&str> = HashSet::new();
    for &i in order {
        match &checked[i] {
            Checked::Message { device, epoch, seq, ts, kind, name, payload, effect } => {
                let new = affected(
                    sqlx::query(AssertSqlSafe(sql.insert_message.clone()))
                        .bind(*device)
                        .bind(*epoch)
                        .bind(*seq)
                        .bind(ts.as_str())
                        .bind(*kind)
                        .bind(*name)
                        .bind(payload.as_str())
                        .bind(received_at),
                    &mut tx,
                    "store a message",
                )
                .await?
                    == 1;
                stored[i] = new;
                if new {
                    // Same `received_at` for the whole batch: once per device is enough.
                    if touched.insert(device) {
                        touch_device(&mut tx, sql, device, received_at).await?;
                    }
                    let at = (*epoch, *seq);
                    if let Some(id) = apply_effect(&mut tx, sql, device, at, ts, payload, effect).await? {
                        answered.push(id);
                    }
                }
            }
            Checked::Status { device, online, at } => {
                set_online(&mut tx, sql, device, *online, at).await?;
                stored[i] = true;
            }
        }
    }
    let commands = fetch_commands(&mut tx, sql, answered).await?;
    tx.commit().await.map_err(StoreError::db("commit a batch"))?;
    Ok(BatchReport { stored, commands })
}

/// The commands `answered` names, as they now stand.
async fn fetch_commands(
    conn: &mut AnyConnection,
    sql: &Statements,
    answered: Vec<&str>,
) -> Result<Vec<CommandRow>, StoreError> {
    let mut commands = Vec::with_capacity(answered.len());
    for id in answered {
        if let Some(row) = commands::fetch(conn, sql, id).await? {
            commands.push(row);
        }
    }
    Ok(commands)
}

/// Rows per many-row `INSERT` of messages (8 binds each: 8,000 binds, under
/// SQLite's 32,766 and the 65,535 of MySQL and PostgreSQL).
const MESSAGE_ROWS: usize = 1000;

/// Devices per many-row statement on `devices` (at most 3 binds each).
const DEVICE_ROWS: usize = 1000;

/// Whether a many-row statement (its size varies from batch to batch) is
/// kept in sqlx's per-connection statement cache. SQLite: only a full
/// chunk, whose size comes back, so the others do not push the hot
/// statements out of the cache (each prepared statement holds its own VDBE
/// program). MySQL/MariaDB and PostgreSQL: always. sqlx-mysql 0.9 runs a
/// statement that is not kept as prepare, execute, `COM_STMT_CLOSE`
/// (sqlx-mysql-0.9.0 `src/connection/executor.rs:148-171`); measured here
/// on MariaDB 10.11, three such statements made every batch take 110-140 ms
/// (one message or 500), and the hub 3x slower than one row at a time. The
/// cache is LRU (100 per connection), so the hot statements, used every
/// batch, stay.
fn keep_prepared(dialect: Dialect, full: bool) -> bool {
    full || dialect != Dialect::Sqlite
}

/// The batch written in a few statements, not one per row: its messages in
/// many-row `INSERT`s, its devices in two statements, and per heartbeat,
/// relay or sensor only the newest of the batch (the same end state as one
/// at a time: each update keeps the greater `(epoch, seq)`). Valid only when
/// every message is new, so `Ok(None)` when the inserts took fewer rows
/// than they were given; the caller then rolls back. Otherwise the commands
/// answered, in the order of `order`.
async fn write_all_new<'a>(
    conn: &mut AnyConnection,
    dialect: Dialect,
    sql: &Statements,
    checked: &'a [Checked<'a>],
    order: &[usize],
    received_at: &str,
) -> Result<Option<Vec<&'a str>>, StoreError> {
    let messages: Vec<&Checked<'_>> =
        order.iter().map(|&i| &checked[i]).filter(|c| matches!(c, Checked::Message { .. })).collect();
    let mut inserted = 0;
    for chunk in messages.chunks(MESSAGE_ROWS) {
        let full = chunk.len() == MESSAGE_ROWS;
        let mut q =
            sqlx::query(AssertSqlSafe(sql.insert_messages(chunk.len()))).persistent(keep_prepared(dialect, full));
        for m in chunk {
            if let Checked::Message { device, epoch, seq, ts, kind, name, payload, .. } = m {
                q = q
                    .bind(*device)
                    .bind(*epoch)
                    .bind(*seq)
                    .bind(ts.as_str())
                    .bind(*kind)
                    .bind(*name)
                    .bind(payload.as_str())
                    .bind(received_at);
            }
        }
        inserted += affected(q, conn, "store messages").await?;
    }
    if usize::try_from(inserted).ok() != Some(messages.len()) {
        tracing::debug!("database: {inserted} of {} messages new: written again one at a time", messages.len());
        return Ok(None);
    }
    // `order` is by device: equal names are neighbours.
    let mut devices: Vec<&str> = messages.iter().map(|m| m.device()).collect();
    devices.dedup();
    for chunk in devices.chunks(DEVICE_ROWS) {
        let full = chunk.len() == DEVICE_ROWS;
        let mut q =
            sqlx::query(AssertSqlSafe(sql.insert_devices(chunk.len()))).persistent(keep_prepared(dialect, full));
        for device in chunk {
            q = q.bind(*device).bind(0_i16).bind(received_at);
        }
        affected(q, conn, "create devices").await?;
        let mut q = sqlx::query(AssertSqlSafe(sql.touch_devices(chunk.len())))
            .persistent(keep_prepared(dialect, full))
            .bind(received_at)
            .bind(received_at);
        for device in chunk {
            q = q.bind(*device);
        }
        affected(q, conn, "update devices' last_seen").await?;
    }
    // The newest heartbeat per device, relay state per relay, reading per
    // sensor; the messages that answer a command, each in order.
    let mut newest: Vec<&Checked<'_>> = Vec::new();
    let mut slots: HashMap<(&str, u8, &str), usize> = HashMap::new();
    let mut answers: Vec<&Checked<'_>> = Vec::new();
    for &m in &messages {
        let Checked::Message { device, epoch, seq, effect, .. } = m else { continue };
        let target = match effect {
            Effect::None => continue,
            Effect::Rejects { .. } => {
                answers.push(m);
                continue;
            }
            Effect::Relay { relay, command_id, .. } => {
                if command_id.is_some() {
                    answers.push(m);
                }
                (*device, 1, *relay)
            }
            Effect::Heartbeat => (*device, 0, ""),
            Effect::Sensor { sensor, .. } => (*device, 2, *sensor),
        };
        match slots.get(&target) {
            None => {
                slots.insert(target, newest.len());
                newest.push(m);
            }
            Some(&i) => {
                if let Checked::Message { epoch: e, seq: s, .. } = newest[i]
                    && (*e, *s) < (*epoch, *seq)
                {
                    newest[i] = m;
                }
            }
        }
    }
    for m in newest {
        if let Checked::Message { device, epoch, seq, ts, payload, effect, .. } = m {
            apply_state(conn, sql, device, (*epoch, *seq), ts, payload, effect).await?;
        }
    }
    let mut answered = Vec::new();
    for m in answers {
        if let Checked::Message { device, ts, effect, .. } = m
            && let Some(id) = answer(conn, sql, device, ts, effect).await?
        {
            answered.push(id);
        }
    }
    for &i in order {
        if let Checked::Status { device, online, at } = &checked[i] {
            set_online(conn, sql, device, *online, at).await?;
        }
    }
    Ok(Some(answered))
}

/// Creates the device row or moves its `last_seen` forward.
async fn touch_device(conn: &mut AnyConnection, sql: &Statements, device: &str, at: &str) -> Result<(), StoreError> {
    let q = sqlx::query(AssertSqlSafe(sql.insert_device.clone())).bind(device).bind(0_i16).bind(at);
    if affected(q, conn, "create a device").await? == 0 {
        let q = sqlx::query(AssertSqlSafe(sql.touch_device.clone())).bind(at).bind(at).bind(device);
        affected(q, conn, "update a device's last_seen").await?;
    }
    Ok(())
}

async fn set_online(
    conn: &mut AnyConnection,
    sql: &Statements,
    device: &str,
    online: bool,
    at: &str,
) -> Result<(), StoreError> {
    let flag = i16::from(online);
    let q = sqlx::query(AssertSqlSafe(sql.insert_device.clone())).bind(device).bind(flag).bind(at);
    if affected(q, conn, "create a device").await? == 0 {
        let q = sqlx::query(AssertSqlSafe(sql.set_online.clone())).bind(flag).bind(at).bind(at).bind(device);
        affected(q, conn, "update a device's online state").await?;
    }
    // History keeps changes only: a retained status the broker hands out
    // again (a hub reconnecting) says nothing new.
    let last: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql.last_status_event.clone()))
        .bind(device)
        .fetch_optional(&mut *conn)
        .await
        .map_err(StoreError::db("read a device's last status change"))?;
    if last.map(|l| l != 0) != Some(online) {
        let q = sqlx::query(AssertSqlSafe(sql.insert_status_event.clone())).bind(device).bind(flag).bind(at);
        affected(q, conn, "record a status change").await?;
    }
    Ok(())
}

/// Applies what a newly stored message implies (`at` is its `(epoch, seq)`);
/// returns the id of a command it moved to confirmed or rejected.
async fn apply_effect<'a>(
    conn: &mut AnyConnection,
    sql: &Statements,
    device: &str,
    at: (i64, i64),
    ts: &str,
    payload: &str,
    effect: &Effect<'a>,
) -> Result<Option<&'a str>, StoreError> {
    apply_state(conn, sql, device, at, ts, payload, effect).await?;
    answer(conn, sql, device, ts, effect).await
}

/// The newest-state part of a message's effect: the device's heartbeat, a
/// relay's state, a sensor's reading, each only if `(epoch, seq)` is newer.
async fn apply_state(
    conn: &mut AnyConnection,
    sql: &Statements,
    device: &str,
    (epoch, seq): (i64, i64),
    ts: &str,
    payload: &str,
    effect: &Effect<'_>,
) -> Result<(), StoreError> {
    match effect {
        Effect::None | Effect::Rejects { .. } => Ok(()),
        Effect::Heartbeat => {
            let q = sqlx::query(AssertSqlSafe(sql.set_heartbeat.clone()))
                .bind(epoch)
                .bind(seq)
                .bind(payload)
                .bind(device)
                .bind(epoch)
                .bind(epoch)
                .bind(seq);
            affected(q, conn, "keep the newest heartbeat").await?;
            Ok(())
        }
        Effect::Relay { relay, state, .. } => {
            let q = sqlx::query(AssertSqlSafe(sql.insert_relay.clone()))
                .bind(device)
                .bind(*relay)
                .bind(*state)
                .bind(epoch)
                .bind(seq);
            if affected(q, conn, "store a relay state").await? == 0 {
                let q = sqlx::query(AssertSqlSafe(sql.update_relay.clone()))
                    .bind(*state)
                    .bind(epoch)
                    .bind(seq)
                    .bind(device)
                    .bind(*relay)
                    .bind(epoch)
                    .bind(epoch)
                    .bind(seq);
                affected(q, conn, "keep the newest relay state").await?;
            }
            Ok(())
        }
        Effect::Sensor { sensor, value, unit } => {
            let q = sqlx::query(AssertSqlSafe(sql.insert_sensor.clone()))
                .bind(device)
                .bind(*sensor)
                .bind(*value)
                .bind(*unit)
                .bind(ts)
                .bind(epoch)
                .bind(seq);
            if affected(q, conn, "store a sensor reading").await? == 0 {
                let q = sqlx::query(AssertSqlSafe(sql.update_sensor.clone()))
                    .bind(*value)
                    .bind(*unit)
                    .bind(ts)
                    .bind(epoch)
                    .bind(seq)
                    .bind(device)
                    .bind(*sensor)
                    .bind(epoch)
                    .bind(epoch)
                    .bind(seq);
                affected(q, conn, "keep the newest sensor reading").await?;
            }
            Ok(())
        }
    }
}

/// The command part of a message's effect: a relay state with a
/// `command_id` confirms it, an error with one rejects it. The id of a
/// command it moved.
async fn answer<'a>(
    conn: &mut AnyConnection,
    sql: &Statements,
    device: &str,
    ts: &str,
    effect: &Effect<'a>,
) -> Result<Option<&'a str>, StoreError> {
    match effect {
        Effect::Relay { state, command_id: Some(id), .. } => {
            let q = sqlx::query(AssertSqlSafe(sql.confirm_command.clone()))
                .bind(ts)
                .bind(ts)
                .bind(*state)
                .bind(*id)
                .bind(device);
            Ok((affected(q, conn, "confirm a command").await? == 1).then_some(*id))
        }
        Effect::Rejects { command_id, error } => {
            let q = sqlx::query(AssertSqlSafe(sql.reject_command.clone()))
                .bind(error.as_str())
                .bind(ts)
                .bind(*command_id)
                .bind(device);
            Ok((affected(q, conn, "reject a command").await? == 1).then_some(*command_id))
        }
        _ => Ok(None),
    }
}

/// Checks one update against what the schema can hold. A failure names the
/// update's index, so the caller can set it aside and store the rest.
fn check(index: usize, update: &Update) -> Result<Checked<'_>, StoreError> {
    let invalid = |reason: String| StoreError::Invalid { index, reason };
    match update {
        Update::Message(m) => {
            check_name("device", &m.device).map_err(invalid)?;
            if let Some(name) = &m.name {
                check_name("name", name).map_err(invalid)?;
            }
            let seq = i64::try_from(m.seq).map_err(|_| invalid(format!("seq {} is beyond {}", m.seq, i64::MAX)))?;
            let epoch =
                i64::try_from(m.epoch).map_err(|_| invalid(format!("epoch {} is beyond {}", m.epoch, i64::MAX)))?;
            let ts =
                normalize_ts(&m.ts).ok_or_else(|| invalid(format!("ts '{}' is not an RFC 3339 timestamp", m.ts)))?;
            let effect = match m.kind {
                Kind::Heartbeat => Effect::Heartbeat,
                Kind::Relay => relay_effect(m.name.as_deref(), &m.payload),
                Kind::Error => error_effect(&m.payload),
                Kind::Sensor => sensor_effect(m.name.as_deref(), &m.payload),
                Kind::Button => Effect::None,
            };
            Ok(Checked::Message {
                device: &m.device,
                epoch,
                seq,
                ts,
                kind: m.kind.as_str(),
                name: m.name.as_deref(),
                payload: m.payload.to_string(),
                effect,
            })
        }
        Update::Status { device, online, at } => {
            check_name("device", device).map_err(invalid)?;
            let at = normalize_ts(at).ok_or_else(|| invalid(format!("at '{at}' is not an RFC 3339 timestamp")))?;
            Ok(Checked::Status { device, online: *online, at })
        }
    }
}

fn check_name(what: &str, value: &str) -> Result<(), String> {
    let len = value.chars().count();
    if len == 0 {
        return Err(format!("{what} is empty"));
    }
    if len > MAX_NAME_CHARS {
        let head: String = value.chars().take(32).collect();
        return Err(format!("{what} '{head}...' is {len} characters long; at most {MAX_NAME_CHARS}"));
    }
    Ok(())
}

/// A relay state message changes `relays` when it names its relay and says
/// `on` or `off`; anything else is stored but changes nothing.
fn relay_effect<'a>(name: Option<&'a str>, payload: &'a Value) -> Effect<'a> {
    let state = payload.get("state").and_then(Value::as_str).filter(|s| matches!(*s, "on" | "off"));
    match (name, state) {
        (Some(relay), Some(state)) => Effect::Relay { relay, state, command_id: command_id(payload) },
        _ => Effect::None,
    }
}

/// A sensor reading changes `sensors` when it names its sensor and its
/// `value` is a finite number (ingest makes sure of that).
fn sensor_effect<'a>(name: Option<&'a str>, payload: &'a Value) -> Effect<'a> {
    let value = payload.get("value").and_then(Value::as_f64).filter(|v| v.is_finite());
    match (name, value) {
        (Some(sensor), Some(value)) => {
            Effect::Sensor { sensor, value, unit: payload.get("unit").and_then(Value::as_str) }
        }
        _ => Effect::None,
    }
}

fn error_effect(payload: &Value) -> Effect<'_> {
    let Some(command_id) = command_id(payload) else { return Effect::None };
    let field = |k: &str| payload.get(k).and_then(Value::as_str).unwrap_or("");
    let mut error = format!("{}: {}", field("code"), field("message"));
    if let Some((cut, _)) = error.char_indices().nth(MAX_ERROR_CHARS) {
        error.truncate(cut);
    }
    Effect::Rejects { command_id, error }
}

/// A `command_id` that could name a stored command (non-empty, not too long).
fn command_id(payload: &Value) -> Option<&str> {
    payload.get("command_id").and_then(Value::as_str).filter(|id| check_name("command_id", id).is_ok())
}

/// Any RFC 3339 time -> the canonical UTC-with-milliseconds form, which
/// sorts as text the way it sorts as time.
pub fn normalize_ts(ts: &str) -> Option<String> {
    timefmt::parse_rfc3339(ts).map(timefmt::rfc3339_millis)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::hub::model::Message;

    fn message(kind: Kind, name: Option<&str>, payload: Value) -> Update {
        Update::Message(Message {
            device: "pi".into(),
            epoch: 0,
            seq: 1,
            ts: "2025-11-21T10:00:00.000Z".into(),
            kind,
            name: name.map(str::to_string),
            payload,
        })
    }

    #[test]
    fn timestamps_are_stored_in_one_sortable_form() {
        assert_eq!(normalize_ts("2025-11-21T12:00:00+02:00").as_deref(), Some("2025-11-21T10:00:00.000Z"));
        assert_eq!(normalize_ts("2025-11-21T10:00:00.123456Z").as_deref(), Some("2025-11-21T10:00:00.123Z"));
        assert_eq!(normalize_ts("yesterday"), None);
    }

    #[test]
    fn an_update_the_schema_cannot_hold_is_named_by_its_index() {
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        let mut bad = message(Kind::Button, Some(&long), json!({}));
        assert!(matches!(check(3, &bad), Err(StoreError::Invalid { index: 3, .. })));
        if let Update::Message(m) = &mut bad {
            m.name = Some("door".into());
            m.seq = u64::MAX;
        }
        assert!(matches!(check(0, &bad), Err(StoreError::Invalid { index: 0, .. })));
        if let Update::Message(m) = &mut bad {
            m.seq = 1;
            m.epoch = u64::MAX;
        }
        let e = check(0, &bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("epoch"), "{e}");
        if let Update::Message(m) = &mut bad {
            m.epoch = 0;
            m.ts = "soon".into();
        }
        let e = check(0, &bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("'soon'"), "{e}");
        let status = Update::Status { device: String::new(), online: true, at: "2025-11-21T10:00:00.000Z".into() };
        assert!(matches!(check(1, &status), Err(StoreError::Invalid { index: 1, .. })));
    }

    #[test]
    fn only_an_on_or_off_state_with_a_relay_name_changes_relays() {
        let p = json!({"state": "on", "command_id": "c1"});
        assert!(matches!(relay_effect(Some("pump"), &p), Effect::Relay { command_id: Some("c1"), .. }));
        assert!(matches!(relay_effect(None, &p), Effect::None));
        assert!(matches!(relay_effect(Some("pump"), &json!({"state": "maybe"})), Effect::None));
        assert!(matches!(
            relay_effect(Some("pump"), &json!({"state": "off", "command_id": null})),
            Effect::Relay { command_id: None, .. }
        ));
    }

    #[test]
    fn an_error_reads_as_code_colon_message() {
        let p = json!({"code": "expired", "message": "expires_at is in the past", "command_id": "c9"});
        match error_effect(&p) {
            Effect::Rejects { command_id, error } => {
                assert_eq!(command_id, "c9");
                assert_eq!(error, "expired: expires_at is in the past");
            }
            _ => panic!("an error with a command_id rejects it"),
        }
        assert!(matches!(error_effect(&json!({"code": "bad_payload", "command_id": null})), Effect::None));
    }
}
