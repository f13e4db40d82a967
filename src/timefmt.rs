//! Times: ISO 8601 basic form (`20261121T020000Z`, safe in file names) in names; on input the
//! forms an admin types. All UTC, whole seconds.
//!
//! One parser ([`parse_span`]) reads every form the command line accepts:
//!
//! | form                          | example                     | covers            |
//! |-------------------------------|-----------------------------|-------------------|
//! | basic (the names)             | `20260105T020000Z`          | that second       |
//! | RFC 3339, any offset          | `2026-01-05T02:00:00+01:00` | that second       |
//! | xapi's dateTime               | `20260105T02:00:00Z`        | that second       |
//! | date and time, space or `T`   | `2026-01-05 02:00:00`       | that second       |
//! | to the minute                 | `2026-01-05 02:00`          | that whole minute |
//! | a date                        | `2026-01-02`, `20260102`    | that whole day    |
//!
//! A time without a zone is UTC, as the names are. Fractions of a second are dropped. A written
//! time covers a span: a date the whole day, a time to the minute the whole minute. Where a time
//! picks a point (`VDI@2026-01-02`) it means the newest point at or before the end of that span
//! ([`parse_not_after`]: "the backup of Jan 2" is the one taken that day, `@…T02:00` finds the
//! 02:00:12 backup); where a time is assigned (`import --time`) it is the span's start
//! ([`parse`]).

use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime, Time, macros::format_description};

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

/// The forms [`parse_span`] accepts, for error and help texts.
pub const FORMS: &str = "2026-01-05T02:00:00Z, 2026-01-05 02:00:00, 2026-01-05 02:00, 2026-01-05 or 20260105T020000Z (UTC unless an offset like +01:00 is given)";

/// A time that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a time: {why}; use {FORMS}")]
pub struct TimeError {
    /// What was given (cut to 80 characters).
    pub text: String,
    /// What is wrong with it.
    pub why: String,
}

/// How much of a time was written: a date, a time to the minute, or to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Day,
    Minute,
    Second,
}

/// The span of seconds a written time covers: `start..=end`, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: i64,
    pub end: i64,
    pub precision: Precision,
}

/// Parse a time in any accepted form (see the module's table) into the span it covers.
pub fn parse_span(text: &str) -> Result<Span, TimeError> {
    let err = |why: &str| TimeError {
        text: text.chars().take(80).collect(),
        why: why.to_string(),
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    if s.len() > 40 || !s.is_ascii() {
        return Err(err("it is too long or holds characters no time has"));
    }
    let b = s.as_bytes();
    // The date: YYYY-MM-DD or YYYYMMDD (four-digit years only: no overflow, no ambiguity).
    let (year, month, day, rest) = if b.get(4) == Some(&b'-') {
        let year = digits(b, 0, 4).ok_or_else(|| err("the year must be 4 digits"))?;
        if b.get(7) != Some(&b'-') {
            return Err(err("the date must be YYYY-MM-DD"));
        }
        let month = digits(b, 5, 2).ok_or_else(|| err("the month must be 2 digits"))?;
        let day = digits(b, 8, 2).ok_or_else(|| err("the day must be 2 digits"))?;
        (year, month, day, b.get(10..).unwrap_or_default())
    } else {
        let year = digits(b, 0, 4).ok_or_else(|| err("it does not start with a date"))?;
        let month = digits(b, 4, 2).ok_or_else(|| err("the date must be YYYYMMDD"))?;
        let day = digits(b, 6, 2).ok_or_else(|| err("the date must be YYYYMMDD"))?;
        (year, month, day, b.get(8..).unwrap_or_default())
    };
    let month = u8::try_from(month)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or_else(|| err("the month must be 01 to 12"))?;
    let year = i32::try_from(year).map_err(|_| err("the year is out of range"))?;
    let day = u8::try_from(day).map_err(|_| err("no such day"))?;
    let date = Date::from_calendar_date(year, month, day)
        .map_err(|_| err(&format!("{month} {year} has no day {day}")))?;
    // The time of day, if any.
    let (time, precision, rest) = match rest.first() {
        None => (Time::MIDNIGHT, Precision::Day, rest),
        Some(b'T' | b't' | b' ') => {
            let t = rest.get(1..).unwrap_or_default();
            let hour = digits(t, 0, 2).ok_or_else(|| err("the hour must be 2 digits"))?;
            let extended = t.get(2) == Some(&b':');
            let at = if extended { 3 } else { 2 };
            let minute = digits(t, at, 2).ok_or_else(|| err("the minute must be 2 digits"))?;
            let mut at = at + 2;
            let seconds_follow = if extended {
                t.get(at) == Some(&b':')
            } else {
                t.get(at).is_some_and(u8::is_ascii_digit)
            };
            let (second, precision) = if seconds_follow {
                if extended {
                    at += 1;
                }
                let sec = digits(t, at, 2).ok_or_else(|| err("the second must be 2 digits"))?;
                at += 2;
                // A fraction is dropped: names are whole seconds.
                if matches!(t.get(at), Some(b'.' | b',')) {
                    at += 1;
                    let n = t
                        .get(at..)
                        .unwrap_or_default()
                        .iter()
                        .take_while(|c| c.is_ascii_digit())
                        .count();
                    if n == 0 {
                        return Err(err("a fraction of a second needs digits"));
                    }
                    at += n;
                }
                (sec, Precision::Second)
            } else {
                (0, Precision::Minute)
            };
            let time = match (
                u8::try_from(hour),
                u8::try_from(minute),
                u8::try_from(second),
            ) {
                (Ok(h), Ok(m), Ok(s)) => Time::from_hms(h, m, s).ok(),
                _ => None,
            }
            .ok_or_else(|| err("the hour must be 00-23, minutes and seconds 00-59"))?;
            (time, precision, t.get(at..).unwrap_or_default())
        }
        Some(_) => return Err(err("the date must be followed by T or a space and a time")),
    };
    // The zone: Z, an offset, or nothing (UTC).
    let offset_seconds: i64 = match rest {
        [] | [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), z @ ..] => {
            let (h, m) = match z {
                [_, _] => (digits(z, 0, 2), Some(0)),
                [_, _, b':', _, _] => (digits(z, 0, 2), digits(z, 3, 2)),
                [_, _, _, _] => (digits(z, 0, 2), digits(z, 2, 2)),
                _ => (None, None),
            };
            let (Some(h), Some(m)) = (h, m) else {
                return Err(err("the offset must be like +01:00"));
            };
            if h > 23 || m > 59 {
                return Err(err("the offset must be at most 23:59"));
            }
            let v = i64::from(h * 3600 + m * 60);
            if *sign == b'-' { -v } else { v }
        }
        _ => return Err(err("unexpected text after the time")),
    };
    let local = date.with_time(time).assume_utc().unix_timestamp();
    // Four-digit years and offsets below a day keep this far inside i64.
    let start = local - offset_seconds;
    let len = match precision {
        Precision::Day => 86_400,
        Precision::Minute => 60,
        Precision::Second => 1,
    };
    Ok(Span {
        start,
        end: start + len - 1,
        precision,
    })
}

/// `len` ASCII digits at `at`, as a number.
fn digits(b: &[u8], at: usize, len: usize) -> Option<u32> {
    let d = b.get(at..at.checked_add(len)?)?;
    let mut v: u32 = 0;
    for c in d {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Some(v)
}

/// Parse a time to assign (`import --time`): the start of what was written (a date is its
/// midnight UTC).
pub fn parse(s: &str) -> Result<i64, TimeError> {
    parse_span(s).map(|sp| sp.start)
}

/// Parse a time that picks a point: the last second of what was written (a date is its
/// 23:59:59 UTC), so "at or before it" includes the whole day or minute given.
pub fn parse_not_after(s: &str) -> Result<i64, TimeError> {
    parse_span(s).map(|sp| sp.end)
}

pub fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// A length of time that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{text:?} is not a duration: {why}; write e.g. 30d, 12h, 2w, 1y or 1d12h (units s, min, h, d, w, y)"
)]
pub struct DurationError {
    pub text: String,
    pub why: String,
}

/// Parse a duration like `30d`, `1d12h`, `2w` or `90min` into seconds. A year is 365 days;
/// `m` alone is refused (minutes or months?).
pub fn parse_duration(text: &str) -> Result<u64, DurationError> {
    let err = |why: &str| DurationError {
        text: text.chars().take(80).collect(),
        why: why.to_string(),
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    if s.len() > 40 || !s.is_ascii() {
        return Err(err("it is too long or holds other characters"));
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err("a number must come before each unit"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| err("a number is too large"))?;
        rest = rest[digits..].trim_start();
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let secs: u64 = match unit {
            "s" => 1,
            "min" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "y" => 365 * 86_400,
            "m" => {
                return Err(err(
                    "`m` could mean minutes or months: write min, or e.g. 30d",
                ));
            }
            "" => return Err(err("a unit must follow each number")),
            _ => return Err(err("unknown unit")),
        };
        total = n
            .checked_mul(secs)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| err("it is too long"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {

    #[test]
    fn durations_read_and_bad_ones_are_named() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("1d12h"), Ok(86_400 + 12 * 3600));
        assert_eq!(parse_duration(" 2w 3h "), Ok(14 * 86_400 + 3 * 3600));
        assert_eq!(parse_duration("90min"), Ok(5400));
        assert_eq!(parse_duration("1y"), Ok(365 * 86_400));
        for bad in [
            "",
            "d",
            "5",
            "5m",
            "5x",
            "-5d",
            "99999999999999999999d",
            "5d-",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.to_string().contains("is not a duration"), "{bad}: {e}");
        }
    }
    use super::*;

    const T: i64 = 1_767_578_400; // 2026-01-05T02:00:00Z

    #[test]
    fn forms_round_trip() {
        let t = parse("2026-11-21T02:00:00Z").unwrap();
        assert_eq!(basic(t), "20261121T020000Z");
        assert_eq!(parse("20261121T020000Z").unwrap(), t);
        assert_eq!(parse("2026-11-21T03:00:00+01:00").unwrap(), t);
        assert_eq!(rfc3339(t), "2026-11-21T02:00:00Z");
        assert!(parse("yesterday").is_err());
    }

    #[test]
    fn every_accepted_form() {
        let day = 1_767_571_200; // 2026-01-05T00:00:00Z
        let table: &[(&str, i64, i64)] = &[
            ("20260105T020000Z", T, T),
            ("20260105T020000", T, T),
            ("2026-01-05T02:00:00Z", T, T),
            ("2026-01-05t02:00:00z", T, T),
            ("2026-01-05T02:00:00.999Z", T, T),
            ("2026-01-05T03:00:00+01:00", T, T),
            ("2026-01-05T01:30:00-00:30", T, T),
            ("2026-01-05T03:00:00+0100", T, T),
            ("2026-01-05T03:00:00+01", T, T),
            ("20260105T02:00:00Z", T, T),
            ("2026-01-05 02:00:00", T, T),
            ("  2026-01-05 02:00:00  ", T, T),
            ("2026-01-05T02:00:00", T, T),
            ("2026-01-05T02:00", T, T + 59),
            ("2026-01-05 02:00", T, T + 59),
            ("2026-01-05 02:00Z", T, T + 59),
            ("20260105T0200Z", T, T + 59),
            ("2026-01-05", day, day + 86_399),
            ("20260105", day, day + 86_399),
            ("1970-01-01", 0, 86_399),
            ("1969-12-31T23:59:59Z", -1, -1),
            ("2024-02-29", 1_709_164_800, 1_709_164_800 + 86_399),
            ("9999-12-31T23:59:59Z", 253_402_300_799, 253_402_300_799),
            ("0000-01-01", -62_167_219_200, -62_167_219_200 + 86_399),
        ];
        for (text, start, end) in table {
            let sp = parse_span(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((sp.start, sp.end), (*start, *end), "{text}");
            assert_eq!(parse(text).unwrap(), *start, "{text}");
            assert_eq!(parse_not_after(text).unwrap(), *end, "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_time() {
        for text in [
            "",
            "   ",
            "yesterday",
            "latest",
            "2026-13-01",
            "2026-00-10",
            "2026-02-30",
            "2025-02-29",
            "2026-01-32",
            "2026-01-00",
            "2026-1-5",
            "26-01-05",
            "2026-01-05T24:00:00Z",
            "2026-01-05T23:60:00Z",
            "2026-01-05T23:59:60Z",
            "2026-01-05T2:00",
            "2026-01-05T02",
            "2026-01-05T02:00:00.Z",
            "2026-01-05T02:00:00+25:00",
            "2026-01-05T02:00:00+01:0",
            "2026-01-05T02:00:00 UTC",
            "2026-01-05Z",
            "2026-01-05+01:00",
            "2026-01-05x",
            "2026-01-05T",
            "99999999999999999999-01-01",
            "999999-01-01",
            "+12026-01-01",
            "-2026-01-01",
            "2026-01-05T02:00:00Z trailing",
            "２０２６-01-05",
            "2026-01-05T02:00:00.99999999999999999999999999999999999999Z",
            "@1767578400",
        ] {
            let e = parse_span(text).expect_err(text);
            let msg = e.to_string();
            assert!(msg.contains("is not a time"), "{text}: {msg}");
            assert!(msg.contains("2026-01-05 02:00:00"), "{text}: {msg}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = parse_span("2026-02-30").unwrap_err();
        assert_eq!(e.why, "February 2026 has no day 30");
        let e = parse_span("2026-13-01").unwrap_err();
        assert_eq!(e.why, "the month must be 01 to 12");
    }

    proptest::proptest! {
        /// Every second from year 0 to 9999 survives formatting and parsing in each output form.
        #[test]
        fn parse_inverts_format(t in -62_167_219_200i64..=253_402_300_799) {
            proptest::prop_assert_eq!(parse(&basic(t)).unwrap(), t);
            proptest::prop_assert_eq!(parse(&rfc3339(t)).unwrap(), t);
            proptest::prop_assert_eq!(parse(&xapi(t)).unwrap(), t);
            proptest::prop_assert_eq!(parse_not_after(&basic(t)).unwrap(), t);
        }

        /// No text makes the parser panic.
        #[test]
        fn parse_never_panics(s in "\\PC{0,48}") {
            let _ = parse_span(&s);
        }
    }
}
