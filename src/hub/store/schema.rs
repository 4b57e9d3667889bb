//! The database schema, per dialect, and the small migrator that brings a
//! database up to it at start. It owns the DDL and the `fieldlink_schema`
//! table; it never reads or writes the data tables' rows.
//!
//! # Migrating
//!
//! Migrations are numbered from 1 and applied in order; `fieldlink_schema`
//! holds one `(version, applied_at)` row per applied migration. On SQLite and
//! PostgreSQL a migration runs in one transaction (their DDL is
//! transactional), so it is applied whole or not at all. MySQL commits each
//! DDL statement on its own, so there every step is idempotent on its own
//! (`CREATE ... IF NOT EXISTS`, or a [`Step::Unless`] guarded by a probe of
//! `information_schema`, since MySQL, unlike MariaDB, has no `ADD COLUMN IF
//! NOT EXISTS`), and a migration that half-ran simply runs again.
//!
//! Hubs sharing one database may start at the same moment. The migrator runs
//! on its own connection under a lock, so they take turns:
//!
//! * SQLite: `BEGIN IMMEDIATE` (one writer; others wait `busy_timeout`), the
//!   whole migration in that transaction.
//! * PostgreSQL: one transaction holding `pg_advisory_xact_lock` (concurrent
//!   `CREATE TABLE IF NOT EXISTS` can otherwise fail on `pg_type`).
//! * MySQL/MariaDB: `GET_LOCK('fieldlink_schema.<database>')` around the
//!   DDL, which cannot be transactional there.
//!
//! The version row is inserted with "insert unless present", so even two
//! migrators that somehow ran at once do not fail on it.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use sqlx::{AnyConnection, Connection, Executor, Row};

use super::dialect::Dialect;
use super::error::{StoreError, redact_url, scrub};
use crate::timefmt;

/// One schema version.
struct Migration {
    version: i64,
    name: &'static str,
    steps: fn(Dialect) -> Vec<Step>,
}

/// One statement of a migration.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Run as is.
    Sql(&'static str),
    /// Run `sql` only when `probe` (a `SELECT COUNT(*) ...`) counts 0: the
    /// change it makes is not there yet.
    Unless { probe: &'static str, sql: &'static str },
}

/// Every migration, oldest first. Append; never edit a released one.
const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "messages, devices, relays, commands", steps: v1_steps },
    Migration { version: 2, name: "message identity (device, epoch, seq)", steps: v2_epoch },
    Migration { version: 3, name: "set_aside", steps: v3_set_aside },
    Migration { version: 4, name: "sensors", steps: v4_sensors },
    Migration { version: 5, name: "status history, command origin, time indexes", steps: v5_history },
];

/// The newest schema version this build knows.
pub const LATEST: i64 = 5;

/// Key of the PostgreSQL advisory lock ("fieldlin" in ASCII).
const PG_LOCK_KEY: &str = "7378697629483820654";

/// How long a MySQL hub waits for another one's migration, in seconds.
const MYSQL_LOCK_WAIT_S: i64 = 60;

/// Schema version 1.
///
/// ```text
/// messages  (device, seq) PK   ts, kind, name, payload (JSON text), received_at
///           index (device, kind, seq): events paging; index (kind, ts): pruning
/// devices   device PK          online (0/1), last_seen, heartbeat_seq, heartbeat (JSON text)
/// relays    (device, relay) PK state, seq (of the state message that set it)
/// commands  command_id PK      device, relay, requested, status, requested_at,
///                              expires_at, confirmed_at, state, error
///           index (status, expires_at): expiry
/// ```
///
/// Times are RFC 3339 UTC strings with milliseconds (`timefmt`), so every
/// database orders them the same way. MySQL gets `utf8mb4_bin` so that names
/// compare as bytes, as they do in SQLite and PostgreSQL.
fn v1_steps(d: Dialect) -> Vec<Step> {
    v1_tables(d).iter().map(|sql| Step::Sql(sql)).collect()
}

fn v1_tables(d: Dialect) -> &'static [&'static str] {
    match d {
        Dialect::Sqlite => &[
            "CREATE TABLE IF NOT EXISTS messages (
                device TEXT NOT NULL,
                seq INTEGER NOT NULL,
                ts TEXT NOT NULL,
                kind TEXT NOT NULL,
                name TEXT,
                payload TEXT NOT NULL,
                received_at TEXT NOT NULL,
                PRIMARY KEY (device, seq)
            )",
            "CREATE INDEX IF NOT EXISTS messages_device_kind_seq ON messages (device, kind, seq)",
            "CREATE INDEX IF NOT EXISTS messages_kind_ts ON messages (kind, ts)",
            "CREATE TABLE IF NOT EXISTS devices (
                device TEXT NOT NULL PRIMARY KEY,
                online INTEGER NOT NULL DEFAULT 0,
                last_seen TEXT,
                heartbeat_seq INTEGER,
                heartbeat TEXT
            )",
            "CREATE TABLE IF NOT EXISTS relays (
                device TEXT NOT NULL,
                relay TEXT NOT NULL,
                state TEXT NOT NULL,
                seq INTEGER NOT NULL,
                PRIMARY KEY (device, relay)
            )",
            "CREATE TABLE IF NOT EXISTS commands (
                command_id TEXT NOT NULL PRIMARY KEY,
                device TEXT NOT NULL,
                relay TEXT NOT NULL,
                requested TEXT NOT NULL,
                status TEXT NOT NULL,
                requested_at TEXT NOT NULL,
                expires_at TEXT NOT NULL,
                confirmed_at TEXT,
                state TEXT,
                error TEXT
            )",
            "CREATE INDEX IF NOT EXISTS commands_status_expires ON commands (status, expires_at)",
        ],
        Dialect::Postgres => &[
            "CREATE TABLE IF NOT EXISTS messages (
                device TEXT NOT NULL,
                seq BIGINT NOT NULL,
                ts TEXT NOT NULL,
                kind TEXT NOT NULL,
                name TEXT,
                payload TEXT NOT NULL,
                received_at TEXT NOT NULL,
                PRIMARY KEY (device, seq)
            )",
            "CREATE INDEX IF NOT EXISTS messages_device_kind_seq ON messages (device, kind, seq)",
            "CREATE INDEX IF NOT EXISTS messages_kind_ts ON messages (kind, ts)",
            "CREATE TABLE IF NOT EXISTS devices (
                device TEXT NOT NULL PRIMARY KEY,
                online SMALLINT NOT NULL DEFAULT 0,
                last_seen TEXT,
                heartbeat_seq BIGINT,
                heartbeat TEXT
            )",
            "CREATE TABLE IF NOT EXISTS relays (
                device TEXT NOT NULL,
                relay TEXT NOT NULL,
                state TEXT NOT NULL,
                seq BIGINT NOT NULL,
                PRIMARY KEY (device, relay)
            )",
            "CREATE TABLE IF NOT EXISTS commands (
                command_id TEXT NOT NULL PRIMARY KEY,
                device TEXT NOT NULL,
                relay TEXT NOT NULL,
                requested TEXT NOT NULL,
                status TEXT NOT NULL,
                requested_at TEXT NOT NULL,
                expires_at TEXT NOT NULL,
                confirmed_at TEXT,
                state TEXT,
                error TEXT
            )",
            "CREATE INDEX IF NOT EXISTS commands_status_expires ON commands (status, expires_at)",
        ],
        // Indexes are declared inline: MySQL (unlike MariaDB) has no
        // `CREATE INDEX IF NOT EXISTS`. VARCHAR(255) keys stay within
        // InnoDB's 3072-byte key limit in utf8mb4; `write` checks lengths.
        Dialect::MySql => &[
            "CREATE TABLE IF NOT EXISTS messages (
                device VARCHAR(255) NOT NULL,
                seq BIGINT NOT NULL,
                ts VARCHAR(32) NOT NULL,
                kind VARCHAR(16) NOT NULL,
                name VARCHAR(255) NULL,
                payload LONGTEXT NOT NULL,
                received_at VARCHAR(32) NOT NULL,
                PRIMARY KEY (device, seq),
                INDEX messages_device_kind_seq (device, kind, seq),
                INDEX messages_kind_ts (kind, ts)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            "CREATE TABLE IF NOT EXISTS devices (
                device VARCHAR(255) NOT NULL PRIMARY KEY,
                online SMALLINT NOT NULL DEFAULT 0,
                last_seen VARCHAR(32) NULL,
                heartbeat_seq BIGINT NULL,
                heartbeat LONGTEXT NULL
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            "CREATE TABLE IF NOT EXISTS relays (
                device VARCHAR(255) NOT NULL,
                relay VARCHAR(255) NOT NULL,
                state VARCHAR(16) NOT NULL,
                seq BIGINT NOT NULL,
                PRIMARY KEY (device, relay)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            "CREATE TABLE IF NOT EXISTS commands (
                command_id VARCHAR(255) NOT NULL PRIMARY KEY,
                device VARCHAR(255) NOT NULL,
                relay VARCHAR(255) NOT NULL,
                requested VARCHAR(16) NOT NULL,
                status VARCHAR(16) NOT NULL,
                requested_at VARCHAR(32) NOT NULL,
                expires_at VARCHAR(32) NOT NULL,
                confirmed_at VARCHAR(32) NULL,
                state VARCHAR(16) NULL,
                error TEXT NULL,
                INDEX commands_status_expires (status, expires_at)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        ],
    }
}

/// Schema version 2: a message's identity is `(device, epoch, seq)` (DESIGN:
/// Topics and payloads; #6). Rows stored before get epoch 0, as does any
/// payload without an epoch.
///
/// ```text
/// messages  (device, epoch, seq) PK   index (device, kind, epoch, seq) replaces
///                                     (device, kind, seq)
/// devices   + heartbeat_epoch         the newest heartbeat is the greatest
///                                     (heartbeat_epoch, heartbeat_seq)
/// relays    + epoch                   the newest state is the greatest (epoch, seq)
/// ```
///
/// SQLite cannot change a primary key in place: `messages` is copied into a
/// new table (in the migration's transaction).
fn v2_epoch(d: Dialect) -> Vec<Step> {
    match d {
        Dialect::Sqlite => [
            "CREATE TABLE messages_v2 (
                device TEXT NOT NULL,
                epoch INTEGER NOT NULL DEFAULT 0,
                seq INTEGER NOT NULL,
                ts TEXT NOT NULL,
                kind TEXT NOT NULL,
                name TEXT,
                payload TEXT NOT NULL,
                received_at TEXT NOT NULL,
                PRIMARY KEY (device, epoch, seq)
            )",
            "INSERT INTO messages_v2 (device, epoch, seq, ts, kind, name, payload, received_at)
                SELECT device, 0, seq, ts, kind, name, payload, received_at FROM messages",
            "DROP TABLE messages",
            "ALTER TABLE messages_v2 RENAME TO messages",
            "CREATE INDEX IF NOT EXISTS messages_device_kind_epoch_seq ON messages (device, kind, epoch, seq)",
            "CREATE INDEX IF NOT EXISTS messages_kind_ts ON messages (kind, ts)",
            "ALTER TABLE devices ADD COLUMN heartbeat_epoch INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE relays ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        ]
        .map(Step::Sql)
        .to_vec(),
        // `messages_pkey` is the name PostgreSQL gave v1's primary key.
        Dialect::Postgres => [
            "ALTER TABLE messages ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_pkey",
            "ALTER TABLE messages ADD CONSTRAINT messages_pkey PRIMARY KEY (device, epoch, seq)",
            "DROP INDEX IF EXISTS messages_device_kind_seq",
            "CREATE INDEX IF NOT EXISTS messages_device_kind_epoch_seq ON messages (device, kind, epoch, seq)",
            "ALTER TABLE devices ADD COLUMN IF NOT EXISTS heartbeat_epoch BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE relays ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0",
        ]
        .map(Step::Sql)
        .to_vec(),
        // One ALTER per table: each is applied whole or not at all, and the
        // probe tells whether it was.
        Dialect::MySql => vec![
            Step::Unless {
                probe: "SELECT COUNT(*) FROM information_schema.columns \
                        WHERE table_schema = DATABASE() AND table_name = 'messages' AND column_name = 'epoch'",
                sql: "ALTER TABLE messages ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0 AFTER device, \
                      DROP PRIMARY KEY, ADD PRIMARY KEY (device, epoch, seq), \
                      DROP INDEX messages_device_kind_seq, \
                      ADD INDEX messages_device_kind_epoch_seq (device, kind, epoch, seq)",
            },
            Step::Unless {
                probe: "SELECT COUNT(*) FROM information_schema.columns \
                        WHERE table_schema = DATABASE() AND table_name = 'devices' AND column_name = 'heartbeat_epoch'",
                sql: "ALTER TABLE devices ADD COLUMN heartbeat_epoch BIGINT NOT NULL DEFAULT 0",
            },
            Step::Unless {
                probe: "SELECT COUNT(*) FROM information_schema.columns \
                        WHERE table_schema = DATABASE() AND table_name = 'relays' AND column_name = 'epoch'",
                sql: "ALTER TABLE relays ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0",
            },
        ],
    }
}

/// Schema version 3: the messages the collector set aside (refused at
/// ingest, or refused by the database for their data), so the dashboard can
/// show them (#7). `payload` is a bounded, NUL-escaped text copy;
/// `payload_bytes` the size that arrived. `device` is NULL when the topic
/// names none.
///
/// ```text
/// set_aside  id PK (ascending)  device, topic, reason, received_at, payload,
///                               payload_bytes
///            index (device): the per-device count
/// ```
fn v3_set_aside(d: Dialect) -> Vec<Step> {
    match d {
        Dialect::Sqlite => [
            "CREATE TABLE IF NOT EXISTS set_aside (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                device TEXT,
                topic TEXT NOT NULL,
                reason TEXT NOT NULL,
                received_at TEXT NOT NULL,
                payload TEXT NOT NULL,
                payload_bytes INTEGER NOT NULL
            )",
            "CREATE INDEX IF NOT EXISTS set_aside_device ON set_aside (device)",
        ]
        .map(Step::Sql)
        .to_vec(),
        Dialect::Postgres => [
            "CREATE TABLE IF NOT EXISTS set_aside (
                id BIGSERIAL PRIMARY KEY,
                device TEXT,
                topic TEXT NOT NULL,
                reason TEXT NOT NULL,
                received_at TEXT NOT NULL,
                payload TEXT NOT NULL,
                payload_bytes BIGINT NOT NULL
            )",
            "CREATE INDEX IF NOT EXISTS set_aside_device ON set_aside (device)",
        ]
        .map(Step::Sql)
        .to_vec(),
        Dialect::MySql => vec![Step::Sql(
            "CREATE TABLE IF NOT EXISTS set_aside (
                id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                device VARCHAR(255) NULL,
                topic TEXT NOT NULL,
                reason TEXT NOT NULL,
                received_at VARCHAR(32) NOT NULL,
                payload TEXT NOT NULL,
                payload_bytes BIGINT NOT NULL,
                INDEX set_aside_device (device)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        )],
    }
}

/// Schema version 4: sensor readings (#9). The readings themselves are
/// `messages` rows of kind `sensor` (name = the sensor); this table keeps
/// each sensor's newest reading for `GET /api/devices`, chosen by
/// `(epoch, seq)` like relay states.
///
/// ```text
/// sensors  (device, sensor) PK  value (float), unit (NULL: none), ts, epoch, seq
/// ```
fn v4_sensors(d: Dialect) -> Vec<Step> {
    vec![Step::Sql(match d {
        Dialect::Sqlite => {
            "CREATE TABLE IF NOT EXISTS sensors (
                device TEXT NOT NULL,
                sensor TEXT NOT NULL,
                value REAL NOT NULL,
                unit TEXT,
                ts TEXT NOT NULL,
                epoch INTEGER NOT NULL,
                seq INTEGER NOT NULL,
                PRIMARY KEY (device, sensor)
            )"
        }
        Dialect::Postgres => {
            "CREATE TABLE IF NOT EXISTS sensors (
                device TEXT NOT NULL,
                sensor TEXT NOT NULL,
                value DOUBLE PRECISION NOT NULL,
                unit TEXT,
                ts TEXT NOT NULL,
                epoch BIGINT NOT NULL,
                seq BIGINT NOT NULL,
                PRIMARY KEY (device, sensor)
            )"
        }
        Dialect::MySql => {
            "CREATE TABLE IF NOT EXISTS sensors (
                device VARCHAR(255) NOT NULL,
                sensor VARCHAR(255) NOT NULL,
                value DOUBLE NOT NULL,
                unit TEXT NULL,
                ts VARCHAR(32) NOT NULL,
                epoch BIGINT NOT NULL,
                seq BIGINT NOT NULL,
                PRIMARY KEY (device, sensor)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
        }
    })]
}

/// Schema version 5: what the dashboard's timeline and command history need
/// (#9 item 7).
///
/// ```text
/// status_events  id PK (ascending)  device, online (0/1), at: one row per
///                                   change of a device's online state
///                index (device, at): a device's changes over a range
/// commands       + requested_by     "api token" | "dashboard session" (NULL before v5)
///                + client           the requester's IP address (NULL: unknown)
///                + answered_at      when it was confirmed, rejected or expired
///                index (device, requested_at): a device's command history
/// messages       index (device, ts): a device's messages over a time range
/// ```
fn v5_history(d: Dialect) -> Vec<Step> {
    match d {
        Dialect::Sqlite => [
            "CREATE TABLE IF NOT EXISTS status_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                device TEXT NOT NULL,
                online INTEGER NOT NULL,
                at TEXT NOT NULL
            )",
            "CREATE INDEX IF NOT EXISTS status_events_device_at ON status_events (device, at)",
            "ALTER TABLE commands ADD COLUMN requested_by TEXT",
            "ALTER TABLE commands ADD COLUMN client TEXT",
            "ALTER TABLE commands ADD COLUMN answered_at TEXT",
            "CREATE INDEX IF NOT EXISTS commands_device_requested ON commands (device, requested_at)",
            "CREATE INDEX IF NOT EXISTS messages_device_ts ON messages (device, ts)",
        ]
        .map(Step::Sql)
        .to_vec(),
        Dialect::Postgres => [
            "CREATE TABLE IF NOT EXISTS status_events (
                id BIGSERIAL PRIMARY KEY,
                device TEXT NOT NULL,
                online SMALLINT NOT NULL,
                at TEXT NOT NULL
            )",
            "CREATE INDEX IF NOT EXISTS status_events_device_at ON status_events (device, at)",
            "ALTER TABLE commands ADD COLUMN IF NOT EXISTS requested_by TEXT",
            "ALTER TABLE commands ADD COLUMN IF NOT EXISTS client TEXT",
            "ALTER TABLE commands ADD COLUMN IF NOT EXISTS answered_at TEXT",
            "CREATE INDEX IF NOT EXISTS commands_device_requested ON commands (device, requested_at)",
            "CREATE INDEX IF NOT EXISTS messages_device_ts ON messages (device, ts)",
        ]
        .map(Step::Sql)
        .to_vec(),
        Dialect::MySql => vec![
            Step::Sql(
                "CREATE TABLE IF NOT EXISTS status_events (
                    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
                    device VARCHAR(255) NOT NULL,
                    online SMALLINT NOT NULL,
                    at VARCHAR(32) NOT NULL,
                    INDEX status_events_device_at (device, at)
                ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            ),
            Step::Unless {
                probe: "SELECT COUNT(*) FROM information_schema.columns \
                        WHERE table_schema = DATABASE() AND table_name = 'commands' AND column_name = 'requested_by'",
                sql: "ALTER TABLE commands ADD COLUMN requested_by VARCHAR(32) NULL, \
                      ADD COLUMN client VARCHAR(64) NULL, ADD COLUMN answered_at VARCHAR(32) NULL, \
                      ADD INDEX commands_device_requested (device, requested_at)",
            },
            Step::Unless {
                probe: "SELECT COUNT(*) FROM information_schema.statistics \
                        WHERE table_schema = DATABASE() AND table_name = 'messages' AND index_name = 'messages_device_ts'",
                sql: "ALTER TABLE messages ADD INDEX messages_device_ts (device, ts)",
            },
        ],
    }
}

fn schema_table(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite | Dialect::Postgres => {
            "CREATE TABLE IF NOT EXISTS fieldlink_schema (
                version BIGINT NOT NULL PRIMARY KEY,
                applied_at TEXT NOT NULL
            )"
        }
        Dialect::MySql => {
            "CREATE TABLE IF NOT EXISTS fieldlink_schema (
                version BIGINT NOT NULL PRIMARY KEY,
                applied_at VARCHAR(32) NOT NULL
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
        }
    }
}

/// Brings the database at `url` up to [`LATEST`], on a connection of its
/// own that is closed afterwards (so a MySQL session lock cannot outlive it).
pub async fn migrate(url: &str, dialect: Dialect) -> Result<(), StoreError> {
    migrate_upto(url, dialect, LATEST).await
}

/// [`migrate`], up to schema version `upto` only (tests of a migration
/// start from the version before it).
pub(super) async fn migrate_upto(url: &str, dialect: Dialect, upto: i64) -> Result<(), StoreError> {
    let mut conn = AnyConnection::connect(url)
        .await
        .map_err(|e| StoreError::Connect { url: redact_url(url), reason: scrub(&e.to_string(), url) })?;
    let result = match dialect {
        Dialect::Sqlite => migrate_sqlite(&mut conn, upto).await,
        Dialect::Postgres => migrate_postgres(&mut conn, upto).await,
        Dialect::MySql => migrate_mysql(&mut conn, upto).await,
    };
    // A failed close only loses a connection we are done with; the server
    // drops its session (and any lock) when the socket goes.
    let _ = conn.close().await;
    result
}

async fn migrate_sqlite(conn: &mut AnyConnection, upto: i64) -> Result<(), StoreError> {
    enable_wal(conn).await?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::db("begin the migration"))?;
    apply(&mut tx, Dialect::Sqlite, upto).await?;
    tx.commit().await.map_err(StoreError::db("commit the migration"))
}

async fn migrate_postgres(conn: &mut AnyConnection, upto: i64) -> Result<(), StoreError> {
    let mut tx = conn.begin().await.map_err(StoreError::db("begin the migration"))?;
    // `pg_advisory_xact_lock` returns `void`, which the Any driver cannot
    // read back; cast it to text. Released at commit or rollback.
    let lock = format!("SELECT CAST(pg_advisory_xact_lock({PG_LOCK_KEY}) AS TEXT)");
    tx.execute(sqlx::AssertSqlSafe(lock)).await.map_err(StoreError::db("lock the schema"))?;
    apply(&mut tx, Dialect::Postgres, upto).await?;
    tx.commit().await.map_err(StoreError::db("commit the migration"))
}

async fn migrate_mysql(conn: &mut AnyConnection, upto: i64) -> Result<(), StoreError> {
    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(CONCAT('fieldlink_schema.', DATABASE()), ?)")
        .bind(MYSQL_LOCK_WAIT_S)
        .fetch_one(&mut *conn)
        .await
        .map_err(StoreError::db("lock the schema"))?;
    if got != Some(1) {
        return Err(StoreError::Schema(format!(
            "waited {MYSQL_LOCK_WAIT_S}s for the lock 'fieldlink_schema.<database>' without getting it; \
             is another hub stuck migrating this database?"
        )));
    }
    let result = apply(conn, Dialect::MySql, upto).await;
    // The lock also goes with the connection, which `migrate` closes next.
    let _ = conn.execute("SELECT RELEASE_LOCK(CONCAT('fieldlink_schema.', DATABASE()))").await;
    result
}

/// `PRAGMA journal_mode = WAL` (persistent in the file). Switching needs a
/// moment with no other connection, which `busy_timeout` does not wait for,
/// so it is retried: 20 tries, 50 ms apart.
async fn enable_wal(conn: &mut AnyConnection) -> Result<(), StoreError> {
    let mut tries = 0;
    loop {
        let mode: Result<String, sqlx::Error> =
            sqlx::query_scalar("PRAGMA journal_mode = WAL").fetch_one(&mut *conn).await;
        match mode {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => {
                return Err(StoreError::Schema(format!("SQLite refused WAL mode (journal_mode is '{mode}')")));
            }
            Err(e) if tries < 20 => {
                tries += 1;
                tracing::debug!("sqlite: WAL switch retry {tries} after: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(StoreError::Db { what: "switch SQLite to WAL mode", source: e }),
        }
    }
}

/// Creates `fieldlink_schema` and applies what is missing up to version
/// `upto`, under the lock the caller holds.
async fn apply(conn: &mut AnyConnection, d: Dialect, upto: i64) -> Result<(), StoreError> {
    conn.execute(schema_table(d)).await.map_err(StoreError::db("create fieldlink_schema"))?;
    let rows = sqlx::query("SELECT version FROM fieldlink_schema")
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::db("read fieldlink_schema"))?;
    let mut applied = BTreeSet::new();
    for row in rows {
        let v: i64 = row.try_get(0).map_err(StoreError::db("read fieldlink_schema"))?;
        applied.insert(v);
    }
    if let Some(newest) = applied.last().copied().filter(|v| *v > LATEST) {
        // A newer hub migrated this database. Its changes are additive by
        // rule (append-only migrations), so this build can still work.
        tracing::warn!("database schema version {newest} is newer than this fieldlink knows ({LATEST})");
    }
    let record = d.insert_unless_present("fieldlink_schema", "(version, applied_at) VALUES (?, ?)", "version");
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version) && m.version <= upto) {
        let failed = |source| StoreError::Migrate { version: m.version, name: m.name, source };
        for step in (m.steps)(d) {
            let sql = match step {
                Step::Sql(sql) => sql,
                Step::Unless { probe, sql } => {
                    let n: i64 = sqlx::query_scalar(probe).fetch_one(&mut *conn).await.map_err(failed)?;
                    if n > 0 {
                        continue;
                    }
                    sql
                }
            };
            conn.execute(sql).await.map_err(failed)?;
        }
        sqlx::query(sqlx::AssertSqlSafe(record.clone()))
            .bind(m.version)
            .bind(timefmt::rfc3339_millis(SystemTime::now()))
            .execute(&mut *conn)
            .await
            .map_err(|source| StoreError::Migrate { version: m.version, name: m.name, source })?;
        tracing::info!("database: applied schema migration {} ({})", m.version, m.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i64::try_from(i).expect("few") + 1, "{}", m.name);
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(LATEST));
    }

    /// MySQL commits each DDL statement on its own: a migration that
    /// half-ran runs again from the start, so every step must be a no-op the
    /// second time. (SQLite and PostgreSQL run a migration in one
    /// transaction.)
    #[test]
    fn every_mysql_step_can_run_twice() {
        for m in MIGRATIONS {
            for step in (m.steps)(Dialect::MySql).into_iter().chain([Step::Sql(schema_table(Dialect::MySql))]) {
                match step {
                    Step::Sql(sql) => assert!(sql.contains("IF NOT EXISTS"), "migration {}: {sql}", m.version),
                    Step::Unless { probe, .. } => assert!(probe.starts_with("SELECT COUNT(*)"), "{probe}"),
                }
            }
        }
    }

    #[test]
    fn v1_creates_only_what_is_missing() {
        for d in [Dialect::Sqlite, Dialect::MySql, Dialect::Postgres] {
            for sql in v1_tables(d) {
                assert!(sql.contains("IF NOT EXISTS"), "{d:?}: {sql}");
            }
        }
    }
}
