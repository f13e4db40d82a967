//! A job's `schedule`: a systemd calendar event (`OnCalendar=`, systemd.time(7)), checked
//! here so that `cbtfs config check` finds a typo before `scripts/install.sh` writes it into
//! a timer that systemd would then refuse.
//!
//! Accepted: the shorthands (`minutely`, `hourly`, `daily`, `weekly`, `monthly`, `yearly`,
//! `annually`, `quarterly`, `semiannually`) and `[WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]]
//! [TIMEZONE]`, each number field `*` or a comma list of values, ranges `A..B` and steps
//! `/N`, days also `~D` (counted from the month's end).

/// Why a schedule is refused.
pub fn check(expr: &str) -> Result<(), String> {
    let s = expr.trim();
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.len() > 200 || !s.is_ascii() {
        return Err("it is too long or not plain ASCII".into());
    }
    const SHORTHANDS: &[&str] = &[
        "minutely",
        "hourly",
        "daily",
        "weekly",
        "monthly",
        "yearly",
        "annually",
        "quarterly",
        "semiannually",
    ];
    if SHORTHANDS.contains(&s.to_ascii_lowercase().as_str()) {
        return Ok(());
    }
    let mut tokens: Vec<&str> = s.split_whitespace().collect();
    // Weekdays first: "Mon", "Mon,Fri", "Mon..Fri", "Sat,Sun".
    if tokens
        .first()
        .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_alphabetic()) && !is_zone(t, &tokens))
    {
        weekdays(tokens[0])?;
        tokens.remove(0);
    }
    // A time zone last: "UTC", "Europe/Berlin".
    if tokens
        .last()
        .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_alphabetic()))
    {
        let z = tokens.pop().unwrap_or_default();
        if !z
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c))
        {
            return Err(format!("{z:?} is not a time zone"));
        }
    }
    let mut seen_date = false;
    let mut seen_time = false;
    for t in tokens {
        if t.contains(':') {
            if seen_time {
                return Err(format!("{t:?}: a second time"));
            }
            seen_time = true;
            time(t)?;
        } else if t.contains('-') || t.contains('~') {
            if seen_date || seen_time {
                return Err(format!("{t:?}: the date comes once, before the time"));
            }
            seen_date = true;
            date(t)?;
        } else {
            return Err(format!(
                "{t:?} is neither a date (YEAR-MONTH-DAY) nor a time (HOUR:MINUTE[:SECOND])"
            ));
        }
    }
    if !seen_date && !seen_time {
        return Err("it has no date and no time; e.g. \"*-*-* 02:00:00\" or daily".into());
    }
    Ok(())
}

/// When systemd will next start a timer on `expr`, as RFC 3339 UTC (`2026-12-01T02:00:00Z`):
/// asked of `systemd-analyze calendar`, systemd's own calendar arithmetic with time zones and
/// daylight saving. None where systemd is not installed or the expression is refused.
pub fn next_elapse(expr: &str) -> Option<String> {
    check(expr).ok()?;
    let o = std::process::Command::new("systemd-analyze")
        .args(["calendar", "--"])
        .arg(expr.trim())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    parse_next_elapse(&String::from_utf8_lossy(&o.stdout))
}

/// The next elapse in `systemd-analyze calendar`'s answer: the `(in UTC):` line, or the
/// `Next elapse:` line when that is in UTC already (`Tue 2026-12-01 02:00:00 UTC`).
pub fn parse_next_elapse(out: &str) -> Option<String> {
    let pick = |key: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key).map(str::trim))
    };
    let t = pick("(in UTC):").or_else(|| pick("Next elapse:"))?;
    let w: Vec<&str> = t.split_whitespace().collect();
    let [_weekday, date, time, "UTC"] = w.as_slice() else {
        return None;
    };
    let unix = crate::timefmt::parse(&format!("{date}T{time}Z")).ok()?;
    Some(crate::timefmt::rfc3339(unix))
}

fn is_zone(t: &str, tokens: &[&str]) -> bool {
    tokens.len() == 1 && t.contains('/')
}

const DAYS: &[&str] = &[
    "mon",
    "tue",
    "wed",
    "thu",
    "fri",
    "sat",
    "sun",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

fn weekdays(t: &str) -> Result<(), String> {
    for part in t.split(',') {
        for d in part.split("..") {
            if !DAYS.contains(&d.to_ascii_lowercase().as_str()) {
                return Err(format!(
                    "{d:?} is not a weekday (Mon, Tue, ... or Mon..Fri)"
                ));
            }
        }
    }
    Ok(())
}

fn date(t: &str) -> Result<(), String> {
    // DAY may be written `~N` after the month (the N-th last day): MONTH~DAY.
    let (ym, day, last) = match t.rsplit_once('~') {
        Some((ym, d)) => (ym, d, true),
        None => match t.rsplit_once('-') {
            Some((ym, d)) => (ym, d, false),
            None => return Err(format!("{t:?} is not a date")),
        },
    };
    let (year, month) = match ym.split_once('-') {
        Some((y, m)) => (Some(y), m),
        None => (None, ym),
    };
    if let Some(y) = year {
        field(y, "year", 1970, 2199)?;
    }
    field(month, "month", 1, 12)?;
    field(day, "day", 1, 31)?;
    if last && day.contains('*') {
        return Err(format!("{t:?}: ~ needs a day count"));
    }
    Ok(())
}

fn time(t: &str) -> Result<(), String> {
    let parts: Vec<&str> = t.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(format!("{t:?} is not HOUR:MINUTE[:SECOND]"));
    }
    field(parts[0], "hour", 0, 23)?;
    field(parts[1], "minute", 0, 59)?;
    if let Some(sec) = parts.get(2) {
        // Seconds may have a fraction: 00:00:30.5.
        let whole = sec.split_once('.').map_or(*sec, |(w, frac)| {
            if frac.chars().all(|c| c.is_ascii_digit()) {
                w
            } else {
                "bad"
            }
        });
        field(whole, "second", 0, 59)?;
    }
    Ok(())
}

/// `*`, or a comma list of `V`, `A..B`, each optionally `/STEP`.
fn field(t: &str, what: &str, lo: u32, hi: u32) -> Result<(), String> {
    if t.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    for part in t.split(',') {
        let (base, step) = match part.split_once('/') {
            Some((b, s)) => (b, Some(s)),
            None => (part, None),
        };
        if let Some(s) = step {
            match s.parse::<u32>() {
                Ok(n) if n >= 1 => {}
                _ => return Err(format!("{part:?}: the {what}'s step must be a number ≥ 1")),
            }
        }
        if base == "*" {
            continue;
        }
        let value = |v: &str| -> Result<u32, String> {
            match v.parse::<u32>() {
                Ok(n) if (lo..=hi).contains(&n) => Ok(n),
                _ => Err(format!("{v:?} is not a {what} ({lo} to {hi})")),
            }
        };
        match base.split_once("..") {
            Some((a, b)) => {
                if value(a)? > value(b)? {
                    return Err(format!("{base:?}: the {what} range runs backwards"));
                }
            }
            None => {
                value(base)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    pub const GOOD: &[&str] = &[
        "*-*-* 02:00:00",
        "daily",
        "Hourly",
        "weekly",
        "Mon..Fri 22:30",
        "Sat,Sun *-*-* 03:15:00",
        "*-*-01 04:00:00",
        "2026-*-* 01:00:00 UTC",
        "*-*-* *:00/15:00",
        "*-02~01 00:00:00",
        "*-1,4,7,10-01 05:00:00",
        "Mon *-*-* 00:00:00 Europe/Berlin",
        "12:00",
        "*-*-* 00:00:30.5",
    ];

    pub const BAD: &[&str] = &[
        "",
        "every day",
        "*-*-* 25:00:00",
        "*-13-* 00:00",
        "*-*-32 00:00",
        "Funday 00:00",
        "*-*-* 02:00:00 02:00:00",
        "*-*-* 00:60",
        "*-*-* 00:00/0",
        "*-*-* 5..2:00",
        "02:00 *-*-*",
    ];

    #[test]
    fn calendar_events_are_checked() {
        for g in GOOD {
            assert_eq!(check(g), Ok(()), "{g}");
        }
        for b in BAD {
            assert!(check(b).is_err(), "{b:?} was accepted");
        }
    }

    #[test]
    fn next_elapse_is_read_from_systemd_analyze() {
        use super::parse_next_elapse;
        let utc = "Normalized form: *-*-* 02:00:00\n    Next elapse: Tue 2026-12-01 02:00:00 UTC\n       From now: 13h left\n";
        assert_eq!(
            parse_next_elapse(utc).as_deref(),
            Some("2026-12-01T02:00:00Z")
        );
        let cet = "Normalized form: *-*-* 02:00:00\n    Next elapse: Tue 2026-12-01 02:00:00 CET\n       (in UTC): Tue 2026-12-01 01:00:00 UTC\n       From now: 12h left\n";
        assert_eq!(
            parse_next_elapse(cet).as_deref(),
            Some("2026-12-01T01:00:00Z")
        );
        let only_local = "    Next elapse: Tue 2026-12-01 02:00:00 CET\n";
        assert_eq!(parse_next_elapse(only_local), None);
        assert_eq!(parse_next_elapse("Next elapse: never\n"), None);
        assert_eq!(parse_next_elapse(""), None);
        assert_eq!(super::next_elapse("every day"), None);
    }

    /// Where systemd is installed, it agrees with every verdict above.
    #[test]
    fn systemd_agrees_where_it_is_installed() {
        let Ok(o) = std::process::Command::new("systemd-analyze")
            .args(["calendar", "daily"])
            .output()
        else {
            assert!(
                std::env::var_os("CBTFS_TEST_STRICT").is_none(),
                "systemd-analyze is not installed: the schedules are not checked against systemd"
            );
            return;
        };
        assert!(o.status.success(), "systemd-analyze calendar daily failed");
        for (exprs, ok) in [(GOOD, true), (BAD, false)] {
            for e in exprs {
                if e.is_empty() {
                    continue;
                }
                let s = std::process::Command::new("systemd-analyze")
                    .args(["calendar", e])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(!ok);
                assert_eq!(s, ok, "systemd-analyze calendar {e:?}");
            }
        }
    }
}
