//! Opening a database from its `[database] url`: the SQLite file and its
//! directory, the connection pool and its per-connection settings, then the
//! migrations. It owns the path from a URL string to a ready pool and
//! nothing after that; it never touches the data tables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::AnyConnection;
use sqlx::AnyPool;
use sqlx::Executor;
use sqlx::any::AnyPoolOptions;

use super::dialect::Dialect;
use super::error::{StoreError, redact_url, scrub};
use super::schema;

/// How long a SQLite connection waits for another writer before it reports
/// the database as busy.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections per pool. SQLite has one writer at a time anyway.
const MAX_CONNECTIONS: u32 = 8;

/// How long a query waits for a free pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens the pool for `url` after bringing the schema up to date.
pub async fn open(url: &str) -> Result<(AnyPool, Dialect), StoreError> {
    sqlx::any::install_default_drivers();
    let dialect = Dialect::from_url(url)?;
    let url = match dialect {
        Dialect::Sqlite => prepare_sqlite(url)?,
        Dialect::MySql | Dialect::Postgres => url.to_string(),
    };
    schema::migrate(&url, dialect).await?;
    let mut options = AnyPoolOptions::new().max_connections(MAX_CONNECTIONS).acquire_timeout(ACQUIRE_TIMEOUT);
    if dialect == Dialect::Sqlite {
        options = options.after_connect(sqlite_session);
    }
    let pool = options
        .connect(&url)
        .await
        .map_err(|e| StoreError::Connect { url: redact_url(&url), reason: scrub(&e.to_string(), &url) })?;
    Ok((pool, dialect))
}

/// Per-connection SQLite settings (WAL itself is persistent in the file and
/// set by the migrator).
fn sqlite_session(conn: &mut AnyConnection, _: sqlx::pool::PoolConnectionMetadata) -> BoxFuture<'_, sqlx::Result<()>> {
    Box::pin(async move {
        let busy = format!("PRAGMA busy_timeout = {}", SQLITE_BUSY_TIMEOUT.as_millis());
        conn.execute(sqlx::AssertSqlSafe(busy)).await?;
        Ok(())
    })
}

/// Checks a `sqlite://PATH` URL, creates the file's directory, and asks
/// sqlx to create the file (`mode=rwc`) unless the URL picks a mode itself.
fn prepare_sqlite(url: &str) -> Result<String, StoreError> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    let (path, params) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let bad = |reason: &str| StoreError::BadUrl { url: redact_url(url), reason: reason.to_string() };
    if path.is_empty() {
        return Err(bad("expected sqlite://PATH with the path of the database file"));
    }
    // Through the Any driver every pooled connection re-reads the URL, and
    // each would get a different in-memory database.
    if path == ":memory:" || params.is_some_and(|q| q.split('&').any(|kv| kv == "mode=memory")) {
        return Err(bad("an in-memory SQLite database is not supported; give a file path"));
    }
    if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir { path: PathBuf::from(dir), source })?;
    }
    Ok(match params {
        None => format!("{url}?mode=rwc"),
        Some(q) if q.split('&').any(|kv| kv.starts_with("mode=")) => url.to_string(),
        Some(_) => format!("{url}&mode=rwc"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sqlite_url_gets_create_mode_and_its_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("a/b/hub.db");
        let url = format!("sqlite://{}", db.display());
        let prepared = prepare_sqlite(&url).expect("valid");
        assert_eq!(prepared, format!("{url}?mode=rwc"));
        assert!(dir.path().join("a/b").is_dir());
    }

    #[test]
    fn a_sqlite_url_that_picks_its_mode_keeps_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/hub.db?mode=rw", dir.path().display());
        assert_eq!(prepare_sqlite(&url).expect("valid"), url);
        let url = format!("sqlite://{}/hub.db?cache=private", dir.path().display());
        assert_eq!(prepare_sqlite(&url).expect("valid"), format!("{url}&mode=rwc"));
    }

    #[test]
    fn in_memory_and_empty_sqlite_urls_are_refused() {
        for url in ["sqlite::memory:", "sqlite://:memory:", "sqlite://?mode=memory", "sqlite://"] {
            assert!(matches!(prepare_sqlite(url), Err(StoreError::BadUrl { .. })), "{url}");
        }
    }
}
