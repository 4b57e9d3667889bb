//! The three SQL dialects the store speaks, and the few places where they
//! differ in the statements we write: placeholders (`?` for SQLite and
//! MySQL/MariaDB, `$1, $2, ...` for PostgreSQL) and "insert unless the key is
//! already there". It only builds strings; it never talks to a database.

use std::sync::Arc;

use super::error::{StoreError, redact_url};

/// Which database a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    /// MySQL and MariaDB.
    MySql,
    Postgres,
}

impl Dialect {
    /// From the URL's scheme: `sqlite:`, `mysql:` / `mariadb:`,
    /// `postgres:` / `postgresql:`.
    pub fn from_url(url: &str) -> Result<Dialect, StoreError> {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
        match scheme.as_str() {
            "sqlite" => Ok(Dialect::Sqlite),
            "mysql" | "mariadb" => Ok(Dialect::MySql),
            "postgres" | "postgresql" => Ok(Dialect::Postgres),
            _ => Err(StoreError::BadUrl {
                url: redact_url(url),
                reason: "expected sqlite://PATH, mysql://USER@HOST/DB or postgres://USER@HOST/DB".into(),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "SQLite",
            Dialect::MySql => "MySQL/MariaDB",
            Dialect::Postgres => "PostgreSQL",
        }
    }

    /// Rewrites the `?` placeholders of `sql` for this dialect. Our SQL
    /// never has a `?` inside a string literal (a unit test checks it), so a
    /// plain scan is exact.
    pub fn render(self, sql: &str) -> Arc<str> {
        match self {
            Dialect::Sqlite | Dialect::MySql => Arc::from(sql),
            Dialect::Postgres => {
                let mut out = String::with_capacity(sql.len() + 16);
                let mut n = 0;
                for c in sql.chars() {
                    if c == '?' {
                        n += 1;
                        out.push('$');
                        out.push_str(&n.to_string());
                    } else {
                        out.push(c);
                    }
                }
                Arc::from(out)
            }
        }
    }

    /// `INSERT INTO <table> <columns_and_values>` that does nothing when a
    /// row with the same `key` exists; its `rows_affected` is 1 when the row
    /// is new and 0 when it was there. (MySQL's `ON DUPLICATE KEY UPDATE`
    /// would report 1 for an unchanged row, since sqlx sets `FOUND_ROWS`.)
    pub fn insert_unless_present(self, table: &str, columns_and_values: &str, key: &str) -> Arc<str> {
        let sql = match self {
            Dialect::MySql => format!("INSERT IGNORE INTO {table} {columns_and_values}"),
            Dialect::Sqlite | Dialect::Postgres => {
                format!("INSERT INTO {table} {columns_and_values} ON CONFLICT ({key}) DO NOTHING")
            }
        };
        self.render(&sql)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_placeholders_are_numbered_in_order() {
        let sql = Dialect::Postgres.render("UPDATE t SET a = ?, b = ? WHERE c = ?");
        assert_eq!(&*sql, "UPDATE t SET a = $1, b = $2 WHERE c = $3");
        assert_eq!(&*Dialect::MySql.render("a = ?"), "a = ?");
        assert_eq!(&*Dialect::Sqlite.render("a = ?"), "a = ?");
    }

    #[test]
    fn each_dialect_skips_a_row_whose_key_exists_in_its_own_words() {
        let cv = "(a, b) VALUES (?, ?)";
        assert_eq!(&*Dialect::MySql.insert_unless_present("t", cv, "a"), "INSERT IGNORE INTO t (a, b) VALUES (?, ?)");
        assert_eq!(
            &*Dialect::Postgres.insert_unless_present("t", cv, "a"),
            "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT (a) DO NOTHING"
        );
        assert_eq!(
            &*Dialect::Sqlite.insert_unless_present("t", cv, "a"),
            "INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT (a) DO NOTHING"
        );
    }

    #[test]
    fn the_scheme_picks_the_dialect() {
        assert_eq!(Dialect::from_url("sqlite://state/hub.db").ok(), Some(Dialect::Sqlite));
        assert_eq!(Dialect::from_url("mysql://u@h/d").ok(), Some(Dialect::MySql));
        assert_eq!(Dialect::from_url("mariadb://u@h/d").ok(), Some(Dialect::MySql));
        assert_eq!(Dialect::from_url("postgres://u@h/d").ok(), Some(Dialect::Postgres));
        assert_eq!(Dialect::from_url("postgresql://u@h/d").ok(), Some(Dialect::Postgres));
    }

    #[test]
    fn an_unknown_scheme_is_refused_without_showing_the_password() {
        let e = Dialect::from_url("oracle://scott:tiger@h/d").expect_err("not supported");
        let text = e.to_string();
        assert!(text.contains("oracle://scott:***@h/d"), "{text}");
        assert!(!text.contains("tiger"), "{text}");
    }
}
