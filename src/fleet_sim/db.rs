//! Reading back what the hub stored for a fleet-sim run (`--verify-db`): it
//! waits until the hub has stored every message the sim sent (or stops
//! making progress), then reads each simulated device's rows of the run's
//! epoch from `messages`, by its primary key `(device, epoch, seq)`. It only
//! reads: it never migrates, writes or deletes, so it can point at a live
//! hub's database (SQLite, MySQL/MariaDB, PostgreSQL).
//!
//! Commit time is the row's `received_at`: the hub stamps it (RFC 3339,
//! milliseconds) when it starts writing the batch that stores the row
//! (`src/hub/store/write.rs`, `write_batch`), and the batch commits in that
//! same transaction, so publish → commit as measured here is short of the
//! real commit by that one transaction's duration.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, AssertSqlSafe, Row};

use super::report::{self, StoredRow, Verified};
use crate::hub::store::{Dialect, redact_url};
use crate::timefmt;

/// How often the stored counts are polled while the hub catches up.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open the hub's database: {0}")]
    Connect(String),
    #[error("cannot read the hub's messages: {0}")]
    Query(String),
}

/// A read-only view of the hub's `messages`.
pub struct Reader {
    pool: AnyPool,
    count_sql: String,
    rows_sql: String,
}

/// Opens `url` for reading (no migration: the hub made the schema).
pub async fn open(url: &str) -> Result<Reader, DbError> {
    sqlx::any::install_default_drivers();
    let dialect = Dialect::from_url(url).map_err(|e| DbError::Connect(e.to_string()))?;
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .map_err(|e| DbError::Connect(format!("{}: {}", redact_url(url), e.to_string().replace(url, "<url>"))))?;
    Ok(Reader {
        pool,
        count_sql: dialect.render("SELECT COUNT(*) FROM messages WHERE device = ? AND epoch = ?").to_string(),
        rows_sql: dialect
            .render("SELECT epoch, seq, ts, received_at FROM messages WHERE device = ? AND epoch = ?")
            .to_string(),
    })
}

impl Reader {
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn count(r: &Reader, device: &str, epoch: u64) -> Result<u64, DbError> {
    let row = sqlx::query(AssertSqlSafe(r.count_sql.as_str()))
        .bind(device)
        .bind(epoch_param(epoch))
        .fetch_one(&r.pool)
        .await
        .map_err(|e| DbError::Query(e.to_string()))?;
    let n: i64 = row.try_get(0).map_err(|e| DbError::Query(e.to_string()))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn epoch_param(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(i64::MAX)
}

/// Waits until every device's rows of `epoch` number what it sent, or until
/// no row was added for `settle`; returns how many were stored then.
pub async fn wait_stored(
    pool: &Reader,
    epoch: u64,
    sent: &HashMap<String, u64>,
    settle: Duration,
) -> Result<u64, DbError> {
    let mut pending: Vec<(&String, u64)> = sent.iter().map(|(d, &n)| (d, n)).collect();
    let mut done = 0_u64;
    let mut last_progress = tokio::time::Instant::now();
    loop {
        let mut still = Vec::with_capacity(pending.len());
        let mut partial = 0_u64;
        for (device, n) in pending {
            let have = count(pool, device, epoch).await?;
            if have >= n {
                done += n;
            } else {
                partial += have;
                still.push((device, n));
            }
        }
        pending = still;
        let stored = done + partial;
        if pending.is_empty() {
            return Ok(stored);
        }
        if last_progress.elapsed() >= settle {
            return Ok(stored);
        }
        tokio::time::sleep(POLL).await;
        // Progress means fewer devices pending or more rows among them; a
        // re-count is cheap next to the hub's own work.
        let recount: u64 = {
            let mut sum = done;
            for (device, _) in &pending {
                sum += count(pool, device, epoch).await?;
            }
            sum
        };
        if recount > stored {
            last_progress = tokio::time::Instant::now();
        }
    }
}

/// Reads every row of `epoch` for the devices in `sent` and compares.
pub async fn verify(pool: &Reader, epoch: u64, sent: &HashMap<String, u64>) -> Result<Verified, DbError> {
    struct Owned {
        device: String,
        epoch: u64,
        seq: u64,
        ts_ms: u64,
        stored_ms: u64,
    }
    let q = |e: sqlx::Error| DbError::Query(e.to_string());
    let mut rows = Vec::new();
    for device in sent.keys() {
        let found = sqlx::query(AssertSqlSafe(pool.rows_sql.as_str()))
            .bind(device.as_str())
            .bind(epoch_param(epoch))
            .fetch_all(&pool.pool)
            .await
            .map_err(q)?;
        for r in found {
            let e: i64 = r.try_get(0).map_err(q)?;
            let seq: i64 = r.try_get(1).map_err(q)?;
            let ts: String = r.try_get(2).map_err(q)?;
            let received: String = r.try_get(3).map_err(q)?;
            let ms = |s: &str| timefmt::parse_rfc3339(s).map(timefmt::to_millis).unwrap_or(0);
            rows.push(Owned {
                device: device.clone(),
                epoch: u64::try_from(e).unwrap_or(0),
                seq: u64::try_from(seq).unwrap_or(0),
                ts_ms: ms(&ts),
                stored_ms: ms(&received),
            });
        }
    }
    Ok(report::verify(
        epoch,
        sent,
        rows.iter().map(|r| StoredRow {
            device: &r.device,
            epoch: r.epoch,
            seq: r.seq,
            ts_ms: r.ts_ms,
            stored_ms: r.stored_ms,
        }),
    ))
}
