//! Wall-clock timestamps as the contract writes them: RFC 3339, UTC, with
//! milliseconds (`2026-11-21T10:00:00.123Z`). Owns formatting and parsing of
//! those strings and nothing else; it never reads a config or a socket.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; what records store.
pub fn to_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// The inverse of [`to_millis`].
pub fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// `2026-11-21T10:00:00.123Z`.
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses an RFC 3339 timestamp with any offset (`Z`, `+02:00`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let nanos = dt.unix_timestamp_nanos();
    if nanos < 0 {
        return None;
    }
    let nanos = u64::try_from(nanos).ok()?;
    Some(UNIX_EPOCH + Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        let t = from_millis(1_763_719_200_123);
        assert_eq!(rfc3339_millis(t), "2025-11-21T10:00:00.123Z");
    }

    #[test]
    fn offsets_other_than_utc_are_understood() {
        let z = parse_rfc3339("2025-11-21T10:00:00Z").expect("valid");
        let plus2 = parse_rfc3339("2025-11-21T12:00:00+02:00").expect("valid");
        assert_eq!(z, plus2);
    }

    #[test]
    fn garbage_is_not_a_timestamp() {
        assert!(parse_rfc3339("tomorrow").is_none());
        assert!(parse_rfc3339("").is_none());
    }
}
