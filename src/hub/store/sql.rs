//! The data statements (DML), rendered once per dialect when the store opens.
//! It owns the SQL text and the order of its bind parameters (written next to
//! each statement); it never executes anything. Every statement is written
//! with `?` and renumbered for PostgreSQL by [`Dialect::render`].

use std::sync::Arc;

use super::dialect::Dialect;

/// Columns of `commands`, in the order `read::command_row` reads them.
pub const COMMAND_COLUMNS: &str = "command_id, device, relay, requested, status, requested_at, expires_at, \
     confirmed_at, state, error, requested_by, client, answered_at";

/// Every statement the store runs against the data tables.
#[derive(Debug)]
pub struct Statements {
    /// device, epoch, seq, ts, kind, name, payload, received_at -> 1 row if new
    pub insert_message: Arc<str>,
    /// device, online, last_seen -> 1 row if new
    pub insert_device: Arc<str>,
    /// last_seen, last_seen, device: moves `last_seen` forward only
    pub touch_device: Arc<str>,
    /// online, last_seen, last_seen, device
    pub set_online: Arc<str>,
    /// heartbeat_epoch, heartbeat_seq, heartbeat, device, then epoch, epoch,
    /// seq again: only a newer one (greater `(epoch, seq)`)
    pub set_heartbeat: Arc<str>,
    /// device, relay, state, epoch, seq -> 1 row if new
    pub insert_relay: Arc<str>,
    /// state, epoch, seq, device, relay, then epoch, epoch, seq again: only
    /// a newer one (greater `(epoch, seq)`)
    pub update_relay: Arc<str>,
    /// device, sensor, value, unit, ts, epoch, seq -> 1 row if new
    pub insert_sensor: Arc<str>,
    /// value, unit, ts, epoch, seq, device, sensor, then epoch, epoch, seq
    /// again: only a newer one (greater `(epoch, seq)`)
    pub update_sensor: Arc<str>,
    /// () -> device, sensor, value, unit, ts
    pub select_sensors: Arc<str>,
    /// () -> how many devices are online
    pub count_online: Arc<str>,
    /// confirmed_at, answered_at (the same), state, command_id, device -> 1 row if it moved
    pub confirm_command: Arc<str>,
    /// error, answered_at, command_id, device -> 1 row if it moved
    pub reject_command: Arc<str>,
    /// command_id -> one row of [`COMMAND_COLUMNS`]
    pub select_command: Arc<str>,
    /// the [`COMMAND_COLUMNS`] values
    pub insert_command: Arc<str>,
    /// now -> command ids that are requested and past `expires_at`
    pub select_expirable: Arc<str>,
    /// answered_at, command_id -> 1 row if it moved from requested to expired
    pub expire_command: Arc<str>,
    /// status, command_id
    pub set_command_status: Arc<str>,
    /// () -> device, online, last_seen, heartbeat
    pub select_devices: Arc<str>,
    /// () -> device, relay, state
    pub select_relays: Arc<str>,
    /// before (ts) -> rows deleted
    pub prune_heartbeats: Arc<str>,
    /// device -> its greatest epoch (NULL without messages)
    pub newest_epoch: Arc<str>,
    /// device, topic, reason, received_at, payload, payload_bytes
    pub insert_set_aside: Arc<str>,
    /// limit -> id, device, topic, reason, received_at, payload,
    /// payload_bytes, newest (greatest id) first
    pub select_set_aside: Arc<str>,
    /// () -> device, how many set aside (devices named by a topic only)
    pub count_set_aside: Arc<str>,
    /// device -> online of its newest status event (none: no event yet)
    pub last_status_event: Arc<str>,
    /// device, online, at
    pub insert_status_event: Arc<str>,
    /// device, from, to -> online, at, oldest first
    pub select_status_events: Arc<str>,
    /// device, before -> online, at of the newest status event before it
    pub status_before: Arc<str>,
    /// device, from, to -> ts, received_at, kind, name, payload (payload
    /// only for heartbeats and sensors), by ts
    pub select_range: Arc<str>,
    /// device, limit -> rows of [`COMMAND_COLUMNS`], newest requested first
    pub select_device_commands: Arc<str>,
    /// SQLite only: () -> one row, the whole `GET /api/devices` body (the
    /// JSON of [`crate::hub::model::DeviceView`]s by device), built by
    /// SQLite's JSON functions; `None` for the other dialects.
    pub select_devices_json: Option<Arc<str>>,
    dialect: Dialect,
}

impl Statements {
    pub fn new(d: Dialect) -> Statements {
        Statements {
            insert_message: d.insert_unless_present(
                "messages",
                "(device, epoch, seq, ts, kind, name, payload, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                "device, epoch, seq",
            ),
            insert_device: d.insert_unless_present("devices", "(device, online, last_seen) VALUES (?, ?, ?)", "device"),
            touch_device: d
                .render("UPDATE devices SET last_seen = ? WHERE (last_seen IS NULL OR last_seen < ?) AND device = ?"),
            set_online: d.render(
                "UPDATE devices SET online = ?, \
                 last_seen = CASE WHEN last_seen IS NULL OR last_seen < ? THEN ? ELSE last_seen END \
                 WHERE device = ?",
            ),
            set_heartbeat: d.render(
                "UPDATE devices SET heartbeat_epoch = ?, heartbeat_seq = ?, heartbeat = ? \
                 WHERE device = ? AND (heartbeat_seq IS NULL OR heartbeat_epoch < ? \
                 OR (heartbeat_epoch = ? AND heartbeat_seq < ?))",
            ),
            insert_relay: d.insert_unless_present(
                "relays",
                "(device, relay, state, epoch, seq) VALUES (?, ?, ?, ?, ?)",
                "device, relay",
            ),
            update_relay: d.render(
                "UPDATE relays SET state = ?, epoch = ?, seq = ? \
                 WHERE device = ? AND relay = ? AND (epoch < ? OR (epoch = ? AND seq < ?))",
            ),
            insert_sensor: d.insert_unless_present(
                "sensors",
                "(device, sensor, value, unit, ts, epoch, seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
                "device, sensor",
            ),
            update_sensor: d.render(
                "UPDATE sensors SET value = ?, unit = ?, ts = ?, epoch = ?, seq = ? \
                 WHERE device = ? AND sensor = ? AND (epoch < ? OR (epoch = ? AND seq < ?))",
            ),
            select_sensors: d.render("SELECT device, sensor, value, unit, ts FROM sensors ORDER BY device, sensor"),
            count_online: d.render("SELECT COUNT(*) FROM devices WHERE online = 1"),
            confirm_command: d.render(
                "UPDATE commands SET status = 'confirmed', confirmed_at = ?, answered_at = ?, state = ? \
                 WHERE command_id = ? AND device = ? AND status IN ('requested', 'expired')",
            ),
            reject_command: d.render(
                "UPDATE commands SET status = 'rejected', error = ?, answered_at = ? \
                 WHERE command_id = ? AND device = ? AND status IN ('requested', 'expired')",
            ),
            select_command: d.render(&format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE command_id = ?")),
            insert_command: d.render(&format!(
                "INSERT INTO commands ({COMMAND_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            )),
            select_expirable: d.render(
                "SELECT command_id FROM commands WHERE status = 'requested' AND expires_at < ? ORDER BY expires_at",
            ),
            expire_command: d.render(
                "UPDATE commands SET status = 'expired', answered_at = ? WHERE command_id = ? AND status = 'requested'",
            ),
            set_command_status: d.render("UPDATE commands SET status = ? WHERE command_id = ?"),
            select_devices: d.render("SELECT device, online, last_seen, heartbeat FROM devices ORDER BY device"),
            select_relays: d.render("SELECT device, relay, state FROM relays ORDER BY device, relay"),
            prune_heartbeats: d.render("DELETE FROM messages WHERE kind = 'heartbeat' AND ts < ?"),
            newest_epoch: d.render("SELECT MAX(epoch) FROM messages WHERE device = ?"),
            insert_set_aside: d.render(
                "INSERT INTO set_aside (device, topic, reason, received_at, payload, payload_bytes) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            ),
            select_set_aside: d.render(
                "SELECT id, device, topic, reason, received_at, payload, payload_bytes \
                 FROM set_aside ORDER BY id DESC LIMIT ?",
            ),
            count_set_aside: d
                .render("SELECT device, COUNT(*) FROM set_aside WHERE device IS NOT NULL GROUP BY device"),
            last_status_event: d.render("SELECT online FROM status_events WHERE device = ? ORDER BY id DESC LIMIT 1"),
            insert_status_event: d.render("INSERT INTO status_events (device, online, at) VALUES (?, ?, ?)"),
            select_status_events: d.render(
                "SELECT online, at FROM status_events WHERE device = ? AND at >= ? AND at <= ? ORDER BY at, id",
            ),
            status_before: d.render(
                "SELECT online, at FROM status_events WHERE device = ? AND at < ? ORDER BY at DESC, id DESC LIMIT 1",
            ),
            select_range: d.render(
                "SELECT ts, received_at, kind, name, \
                 CASE WHEN kind IN ('heartbeat', 'sensor') THEN payload ELSE NULL END \
                 FROM messages WHERE device = ? AND ts >= ? AND ts <= ? ORDER BY ts",
            ),
            select_device_commands: d.render(&format!(
                "SELECT {COMMAND_COLUMNS} FROM commands WHERE device = ? ORDER BY requested_at DESC, command_id LIMIT ?"
            )),
            select_devices_json: (d == Dialect::Sqlite).then(|| d.render(SQLITE_DEVICES_JSON)),
            dialect: d,
        }
    }

    /// The events query for the filters given, newest (greatest
    /// `(epoch, seq)`) first; binds, in order: device, kind (if `with_kind`),
    /// before epoch, before epoch, before seq (if `with_before`), limit.
    pub fn select_events(&self, with_kind: bool, with_before: bool) -> Arc<str> {
        let mut sql = String::from("SELECT epoch, seq, ts, kind, name, payload FROM messages WHERE device = ?");
        if with_kind {
            sql.push_str(" AND kind = ?");
        }
        if with_before {
            sql.push_str(" AND (epoch < ? OR (epoch = ? AND seq < ?))");
        }
        sql.push_str(" ORDER BY epoch DESC, seq DESC LIMIT ?");
        self.dialect.render(&sql)
    }

    /// `insert_message` for `rows` messages in one statement: the same eight
    /// binds per row, row after row. Its `rows_affected` is how many of them
    /// were new.
    pub fn insert_messages(&self, rows: usize) -> Arc<str> {
        self.dialect.insert_unless_present(
            "messages",
            &format!("(device, epoch, seq, ts, kind, name, payload, received_at) VALUES {}", values(8, rows)),
            "device, epoch, seq",
        )
    }

    /// `insert_device` for `rows` devices in one statement: device, online,
    /// last_seen per row.
    pub fn insert_devices(&self, rows: usize) -> Arc<str> {
        self.dialect.insert_unless_present(
            "devices",
            &format!("(device, online, last_seen) VALUES {}", values(3, rows)),
            "device",
        )
    }

    /// `touch_device` for `devices` devices: last_seen, last_seen, then
    /// each device.
    pub fn touch_devices(&self, devices: usize) -> Arc<str> {
        let list = vec!["?"; devices].join(", ");
        self.dialect.render(&format!(
            "UPDATE devices SET last_seen = ? WHERE (last_seen IS NULL OR last_seen < ?) AND device IN ({list})"
        ))
    }

    /// Every statement, for checks.
    #[cfg(test)]
    fn all(&self) -> Vec<&str> {
        [
            &self.insert_message,
            &self.insert_device,
            &self.touch_device,
            &self.set_online,
            &self.set_heartbeat,
            &self.insert_relay,
            &self.update_relay,
            &self.insert_sensor,
            &self.update_sensor,
            &self.select_sensors,
            &self.count_online,
            &self.confirm_command,
            &self.reject_command,
            &self.select_command,
            &self.insert_command,
            &self.select_expirable,
            &self.expire_command,
            &self.set_command_status,
            &self.select_devices,
            &self.select_relays,
            &self.prune_heartbeats,
            &self.newest_epoch,
            &self.insert_set_aside,
            &self.select_set_aside,
            &self.count_set_aside,
            &self.last_status_event,
            &self.insert_status_event,
            &self.select_status_events,
            &self.status_before,
            &self.select_range,
            &self.select_device_commands,
        ]
        .into_iter()
        .map(|s| &**s)
        .collect()
    }
}

/// The device list as one JSON text, in one statement (SQLite 3.44+: an
/// aggregate's own `ORDER BY`), keys in the order `DeviceView` has them,
/// relays and sensors by name (a `BTreeMap` there). Each device's object
/// is put together as text, and its newest heartbeat goes in as stored:
/// only the store writes `devices.heartbeat`, always serde_json's text of a
/// payload it parsed (`write`), so it is JSON; running it through `json()`
/// (twice: again inside the device's object) was most of the statement's
/// time (measured: 4.0 against 1.8 ms for 1,000 devices).
const SQLITE_DEVICES_JSON: &str = "SELECT '[' || COALESCE(group_concat(v, ',' ORDER BY device), '') || ']' FROM (\
    SELECT d.device AS device, \
        '{\"device\":' || json_quote(d.device) \
        || ',\"online\":' || CASE WHEN d.online <> 0 THEN 'true' ELSE 'false' END \
        || ',\"last_seen\":' || json_quote(d.last_seen) \
        || ',\"heartbeat\":' || COALESCE(d.heartbeat, 'null') \
        || ',\"relays\":' || (SELECT json_group_object(r.relay, r.state ORDER BY r.relay) \
            FROM relays r WHERE r.device = d.device) \
        || ',\"sensors\":' || (SELECT json_group_object(s.sensor, \
            json_object('value', s.value, 'unit', s.unit, 'ts', s.ts) ORDER BY s.sensor) \
            FROM sensors s WHERE s.device = d.device) \
        || ',\"set_aside\":' || COALESCE(a.n, 0) || '}' AS v \
    FROM devices d LEFT JOIN (SELECT device, COUNT(*) AS n FROM set_aside WHERE device IS NOT NULL \
        GROUP BY device) a ON a.device = d.device)";

/// `(?, ?, ...), (?, ?, ...)`: `rows` rows of `columns` placeholders.
fn values(columns: usize, rows: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row.as_str(); rows].join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Dialect::render` counts on this.
    #[test]
    fn no_string_literal_holds_a_question_mark() {
        let s = Statements::new(Dialect::Sqlite);
        let events = [s.select_events(true, true)];
        for sql in s.all().into_iter().chain(events.iter().map(|e| &**e)) {
            for (i, literal) in sql.split('\'').enumerate() {
                assert!(i % 2 == 0 || !literal.contains('?'), "{sql}");
            }
        }
    }

    #[test]
    fn a_many_row_statement_numbers_every_placeholder_for_postgres() {
        let s = Statements::new(Dialect::Postgres);
        assert_eq!(
            &*s.insert_devices(2),
            "INSERT INTO devices (device, online, last_seen) VALUES ($1, $2, $3), ($4, $5, $6) \
             ON CONFLICT (device) DO NOTHING"
        );
        assert_eq!(
            &*s.touch_devices(2),
            "UPDATE devices SET last_seen = $1 WHERE (last_seen IS NULL OR last_seen < $2) AND device IN ($3, $4)"
        );
        assert!(s.insert_messages(1000).contains("$8000)"));
        let m = Statements::new(Dialect::MySql).insert_messages(2);
        assert!(m.starts_with("INSERT IGNORE INTO messages"), "{m}");
        assert_eq!(m.matches('?').count(), 16);
    }

    #[test]
    fn postgres_statements_have_no_question_marks_left() {
        let s = Statements::new(Dialect::Postgres);
        for sql in s.all() {
            assert!(!sql.contains('?'), "{sql}");
        }
        assert_eq!(
            &*s.select_events(true, true),
            "SELECT epoch, seq, ts, kind, name, payload FROM messages WHERE device = $1 AND kind = $2 \
             AND (epoch < $3 OR (epoch = $4 AND seq < $5)) ORDER BY epoch DESC, seq DESC LIMIT $6"
        );
    }
}
