//! Times: RFC 3339 on input, ISO 8601 basic form (`20261121T020000Z`, safe in file names) in
//! names. All UTC, whole seconds.

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset, macros::format_description};

const BASIC: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year][month][day]T[hour][minute][second]Z");

/// Unix seconds → `20261121T020000Z`.
pub fn basic(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(BASIC).ok())
        .unwrap_or_else(|| format!("@{unix}"))
}

/// xapi's dateTime form (`20261121T02:00:00Z`).
const XAPI: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year][month][day]T[hour]:[minute]:[second]Z");

/// Unix seconds → `20261121T02:00:00Z`, as xapi writes dateTime values.
pub fn xapi(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(XAPI).ok())
        .unwrap_or_else(|| format!("@{unix}"))
}

/// Unix seconds → `2026-11-21T02:00:00Z`.
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("@{unix}"))
}

/// Parse RFC 3339 (`2026-11-21T02:00:00Z`, any offset) or the basic form; fractions are dropped.
pub fn parse(s: &str) -> Result<i64, String> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t.unix_timestamp());
    }
    for form in [BASIC, XAPI] {
        if let Ok(t) = PrimitiveDateTime::parse(s, form) {
            return Ok(t.assume_offset(UtcOffset::UTC).unix_timestamp());
        }
    }
    Err(format!(
        "{s:?} is not a time: use RFC 3339 like 2026-11-21T02:00:00Z (or 20261121T020000Z)"
    ))
}

pub fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_round_trip() {
        let t = parse("2026-11-21T02:00:00Z").unwrap();
        assert_eq!(basic(t), "20261121T020000Z");
        assert_eq!(parse("20261121T020000Z").unwrap(), t);
        assert_eq!(parse("2026-11-21T03:00:00+01:00").unwrap(), t);
        assert_eq!(rfc3339(t), "2026-11-21T02:00:00Z");
        assert!(parse("yesterday").is_err());
    }
}
