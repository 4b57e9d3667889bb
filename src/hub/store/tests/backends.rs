//! Test databases: a SQLite file in a temporary directory, or a fresh
//! database created on the machine's MariaDB (127.0.0.1:3306, root, no
//! password) or PostgreSQL (127.0.0.1:5432, postgres, trust) and dropped
//! afterwards. A server that is not there skips the test with a printed
//! reason, unless `FIELDLINK_REQUIRE_DATABASES=1`, which makes it a failure.
//! It knows nothing of what the cases check.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::{AnyConnection, AssertSqlSafe, Connection, Executor};

use crate::hub::store::Store;

/// Where a test's database lives.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    MariaDb,
    Postgres,
}

impl Backend {
    /// (what to call it, where it is, URL of a database to run CREATE DATABASE from)
    fn server(self) -> Option<(&'static str, &'static str, &'static str)> {
        match self {
            Backend::Sqlite => None,
            Backend::MariaDb => Some(("MariaDB", "127.0.0.1:3306", "mysql://root@127.0.0.1:3306/mysql")),
            Backend::Postgres => Some(("PostgreSQL", "127.0.0.1:5432", "postgres://postgres@127.0.0.1:5432/postgres")),
        }
    }
}

/// How long to wait for a server before calling it absent. Not a test
/// assertion: a server that answers later just means the test was skipped.
const REACH: Duration = Duration::from_secs(5);

/// A database made for one test.
struct TestDb {
    backend: Backend,
    url: String,
    name: String,
    admin_url: &'static str,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// `None`: no server, test skipped (and the reason printed).
    async fn create(backend: Backend) -> Option<TestDb> {
        sqlx::any::install_default_drivers();
        let Some((what, at, admin_url)) = backend.server() else {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let url = format!("sqlite://{}/hub.db", dir.path().display());
            return Some(TestDb { backend, url, name: String::new(), admin_url: "", _dir: Some(dir) });
        };
        let mut admin = match tokio::time::timeout(REACH, AnyConnection::connect(admin_url)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return absent(what, at, &e.to_string()),
            Err(_) => return absent(what, at, "no answer within 5s"),
        };
        let name = format!("fieldlink_test_{:016x}", fastrand::u64(..));
        let create = match backend {
            Backend::MariaDb => format!("CREATE DATABASE {name} CHARACTER SET utf8mb4"),
            Backend::Postgres | Backend::Sqlite => format!("CREATE DATABASE {name}"),
        };
        if let Err(e) = admin.execute(AssertSqlSafe(create)).await {
            return absent(what, at, &format!("CREATE DATABASE failed: {e}"));
        }
        let _ = admin.close().await; // done with it; the server cleans up the session
        let base = admin_url.rsplit_once('/').map(|(b, _)| b).expect("admin URLs have a path");
        Some(TestDb { backend, url: format!("{base}/{name}"), name, admin_url, _dir: None })
    }

    async fn drop_it(self) {
        let sql = match self.backend {
            Backend::Sqlite => return,
            Backend::MariaDb => format!("DROP DATABASE IF EXISTS {}", self.name),
            Backend::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        };
        match AnyConnection::connect(self.admin_url).await {
            Ok(mut admin) => {
                if let Err(e) = admin.execute(AssertSqlSafe(sql)).await {
                    eprintln!("could not drop test database {}: {e}", self.name);
                }
                let _ = admin.close().await; // as above
            }
            Err(e) => eprintln!("could not drop test database {}: {e}", self.name),
        }
    }
}

/// Skips, or fails when the environment requires the databases.
fn absent(what: &str, at: &str, why: &str) -> Option<TestDb> {
    if std::env::var("FIELDLINK_REQUIRE_DATABASES").is_ok_and(|v| v == "1") {
        panic!("no {what} at {at} ({why}), and FIELDLINK_REQUIRE_DATABASES=1 requires it");
    }
    eprintln!("skipping: no {what} at {at} ({why})");
    None
}

/// Runs `case` against a fresh database of `backend`, then drops the
/// database, whether the case passed or panicked.
pub async fn run<F, Fut>(backend: Backend, case: F)
where
    F: FnOnce(Store, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(db) = TestDb::create(backend).await else { return };
    let store = match Store::connect(&db.url).await {
        Ok(store) => store,
        Err(e) => {
            db.drop_it().await;
            panic!("connect to the {backend:?} test database: {e}");
        }
    };
    let outcome = AssertUnwindSafe(case(store.clone(), db.url.clone())).catch_unwind().await;
    store.close().await;
    db.drop_it().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `case` with the URL of a fresh, empty database of `backend` (no
/// schema: for migration tests), then drops the database.
pub async fn run_unmigrated<F, Fut>(backend: Backend, case: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(db) = TestDb::create(backend).await else { return };
    let outcome = AssertUnwindSafe(case(db.url.clone())).catch_unwind().await;
    db.drop_it().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
