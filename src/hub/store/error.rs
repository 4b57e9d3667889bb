//! What can go wrong in the store, as one `thiserror` enum, and the redaction
//! of database URLs so that no password ever reaches a message or a log line.
//! It owns no I/O and no SQL.

use std::path::PathBuf;

/// Everything the store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The `[database] url` is not one the store understands.
    #[error("database url '{url}': {reason}")]
    BadUrl {
        /// Redacted.
        url: String,
        reason: String,
    },

    /// The directory for a SQLite file could not be created.
    #[error("cannot create the directory '{}' for the SQLite database: {source}", path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },

    /// The database did not accept a connection.
    #[error("cannot connect to the database at '{url}': {reason}")]
    Connect {
        /// Redacted.
        url: String,
        /// The driver's message, with the password scrubbed from it.
        reason: String,
    },

    /// A schema migration failed; the database keeps its previous version.
    #[error("database schema migration {version} ({name}) failed: {source}")]
    Migrate { version: i64, name: &'static str, source: sqlx::Error },

    /// The schema could not be checked or locked.
    #[error("database schema: {0}")]
    Schema(String),

    /// A query failed. `what` says which.
    #[error("database: {what}: {source}")]
    Db { what: &'static str, source: sqlx::Error },

    /// One update of a batch cannot be stored as it is (too long a name, a
    /// `seq` beyond the database's range, a `ts` that is not RFC 3339).
    /// Nothing of the batch was written; storing the others without it works.
    #[error("update {index} of the batch cannot be stored: {reason}")]
    Invalid { index: usize, reason: String },

    /// A value handed to a command method is not acceptable.
    #[error("command '{command_id}': {reason}")]
    BadCommand { command_id: String, reason: String },

    /// `set_command_status` for an id the database does not know.
    #[error("no command with id '{0}'")]
    UnknownCommand(String),

    /// A stored value does not read back (someone edited the tables by hand,
    /// or a newer fieldlink wrote them).
    #[error("stored {what} is not valid: '{value}'")]
    Corrupt { what: &'static str, value: String },
}

impl StoreError {
    /// A query error, labelled.
    pub(crate) fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
        move |source| StoreError::Db { what, source }
    }

    /// True when retrying the same call may succeed: the database is down or
    /// unreachable, a connection broke, or a lock conflict rolled the
    /// transaction back. False for input the store refuses and for errors
    /// that a retry would only repeat (a duplicate key, a bad URL).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect { .. } | StoreError::Schema(_) => true,
            StoreError::Db { source, .. } | StoreError::Migrate { source, .. } => match source {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(_) => self.is_contention(),
                _ => false,
            },
            StoreError::BadUrl { .. }
            | StoreError::CreateDir { .. }
            | StoreError::Invalid { .. }
            | StoreError::BadCommand { .. }
            | StoreError::UnknownCommand(_)
            | StoreError::Corrupt { .. } => false,
        }
    }

    /// The database refuses the data itself, so the same write fails every
    /// time: SQLSTATE class 22 (data exception: a NUL or an untranslatable
    /// character, a string too long, a number out of range) or 23 (a
    /// constraint) from PostgreSQL or MySQL; SQLite TOOBIG, CONSTRAINT or
    /// MISMATCH. The collector sets such a message aside; every other error
    /// is retried, since it would refuse any message alike.
    pub fn is_refused_data(&self) -> bool {
        let StoreError::Db { source: sqlx::Error::Database(db), .. } = self else { return false };
        if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
            return my.code().is_some_and(|state| state.starts_with("22") || state.starts_with("23"));
        }
        if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
            return pg.code().starts_with("22") || pg.code().starts_with("23");
        }
        if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            // The primary result code is the low byte of the extended one.
            return db.code().and_then(|c| c.parse::<u32>().ok()).is_some_and(|n| matches!(n & 0xff, 18..=20));
        }
        false
    }

    /// A lock conflict that rolled the transaction back: SQLite busy or
    /// locked, PostgreSQL serialization failure or deadlock, MySQL deadlock
    /// or lock wait time-out.
    pub fn is_contention(&self) -> bool {
        let (StoreError::Db { source: sqlx::Error::Database(db), .. }
        | StoreError::Migrate { source: sqlx::Error::Database(db), .. }) = self
        else {
            return false;
        };
        if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
            return matches!(my.number(), 1205 | 1213);
        }
        let Some(code) = db.code() else { return false };
        match code.as_ref() {
            "40001" | "40P01" => true,
            // SQLite: the primary result code is the low byte of the extended one.
            other => other.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6)),
        }
    }
}

/// `scheme://user:secret@host/db` -> `scheme://user:***@host/db`. URLs
/// without a password come back unchanged.
pub fn redact_url(url: &str) -> String {
    match password_span(url) {
        Some((start, end)) => format!("{}***{}", &url[..start], &url[end..]),
        None => url.to_string(),
    }
}

/// Removes the URL's password (as written and percent-decoded) from a
/// driver's message, which may quote the URL or parts of it.
pub fn scrub(message: &str, url: &str) -> String {
    let Some((start, end)) = password_span(url) else {
        return message.to_string();
    };
    let raw = &url[start..end];
    let mut out = message.replace(raw, "***");
    let decoded = percent_decode(raw);
    if !decoded.is_empty() && decoded != raw {
        out = out.replace(&decoded, "***");
    }
    out
}

/// Byte range of the password in `scheme://user:password@host...`.
fn password_span(url: &str) -> Option<(usize, usize)> {
    let authority_start = url.find("://")? + 3;
    let rest = &url[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let at = authority.rfind('@')?;
    let colon = authority[..at].find(':')?;
    let start = authority_start + colon + 1;
    let end = authority_start + at;
    (start < end).then_some((start, end))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_a_url_is_replaced_by_stars() {
        assert_eq!(
            redact_url("mysql://hub:s3cret@db.example:3306/fieldlink"),
            "mysql://hub:***@db.example:3306/fieldlink"
        );
        assert_eq!(redact_url("postgres://u:p%40ss@h/db?sslmode=require"), "postgres://u:***@h/db?sslmode=require");
    }

    #[test]
    fn urls_without_a_password_are_left_alone() {
        for url in ["sqlite://state/hub.db", "mysql://root@127.0.0.1:3306/x", "postgres://h/db", "nonsense"] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn a_driver_message_quoting_the_password_is_scrubbed() {
        let url = "postgres://u:p%40ss@h/db";
        let msg = "password authentication failed for p@ss (url postgres://u:p%40ss@h/db)";
        let out = scrub(msg, url);
        assert!(!out.contains("p@ss") && !out.contains("p%40ss"), "{out}");
    }

    #[test]
    fn a_lost_connection_is_worth_a_retry_and_refused_input_is_not() {
        assert!(StoreError::Db { what: "x", source: sqlx::Error::PoolTimedOut }.is_transient());
        assert!(!StoreError::Db { what: "x", source: sqlx::Error::RowNotFound }.is_transient());
        assert!(!StoreError::Invalid { index: 0, reason: "too long".into() }.is_transient());
        assert!(!StoreError::Db { what: "x", source: sqlx::Error::PoolTimedOut }.is_contention());
    }

    #[test]
    fn connect_errors_name_the_server_but_not_the_password() {
        let e = StoreError::Connect { url: redact_url("mysql://a:hunter2@h/d"), reason: "refused".into() };
        let text = e.to_string();
        assert!(text.contains("mysql://a:***@h/d"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
}
