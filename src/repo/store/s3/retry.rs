//! Retrying S3 requests: bounded attempts, jittered exponential back-off, and a timeout on
//! every attempt.
//!
//! # Why not `object_store`'s own retries
//!
//! `object_store` (0.12) retries 5xx answers, 429 and connection errors, but:
//!
//! * a PUT (not idempotent for it) is not retried after a timeout or an interrupted answer,
//!   and when it is retried (a connection closed before the answer) a create-only PUT whose
//!   first attempt was stored gets 412, reported as "already exists": a backup would fail
//!   on its own pack. Here the object is then read back and compared: ours (the same bytes)
//!   is success, anything else `AlreadyExists`.
//! * its timeout is one figure for a whole request, 32 MiB uploads included: either too
//!   long to notice a stalled small request or too short for a pack on a slow link. Here a
//!   read fails after [`Policy::timeout`] without a byte arriving (an idle timeout on the
//!   answer's head and on each piece of its body), and a PUT gets that timeout once per
//!   [`PUT_TIMEOUT_UNIT`] sent, plus one.
//! * its errors do not say how many attempts were made.
//!
//! So `object_store` is built with retries off and every request of [`super::S3Store`] goes
//! through [`run`]: at most [`Policy::attempts`] attempts, each bounded in time; between
//! them a back-off doubling from [`Policy::backoff`] up to [`MAX_BACKOFF`], half of it
//! random ("equal jitter", so many writers do not retry in step), four times longer when the
//! server asked to slow down (503, 429). What is retried: transport failures (refused,
//! reset or closed connections, an answer cut short, a timeout), 5xx, 408, 429 and 400
//! `RequestTimeout`. Never retried: the other 4xx (not found, refused credentials, a failed
//! precondition), which no second attempt changes. The worst case is bounded: with the
//! defaults (6 attempts, 30 s) a request fails within 6 × 30 s plus ~15 s of back-off.

use std::future::Future;
use std::time::{Duration, Instant};

/// Default attempts per request (`CBTFS_S3_ATTEMPTS`).
pub const ATTEMPTS: u32 = 6;
/// Default idle timeout (`CBTFS_S3_TIMEOUT`, seconds).
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// First back-off; doubled after each failed attempt.
pub const BACKOFF: Duration = Duration::from_millis(200);
/// The longest back-off between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A PUT may take the timeout once per this many bytes sent, plus once (32 MiB: 9 × 30 s,
/// enough for a pack at ~120 KiB/s).
pub const PUT_TIMEOUT_UNIT: usize = 4 << 20;
/// Bounds of the environment's settings.
const MAX_ATTEMPTS: u32 = 100;
const MAX_TIMEOUT_SECS: u64 = 3600;
const MAX_BACKOFF_MS: u64 = 10_000;

/// How requests are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Attempts per request, the first included (≥ 1).
    pub attempts: u32,
    /// How long an attempt may go without progress.
    pub timeout: Duration,
    /// The first back-off.
    pub backoff: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            attempts: ATTEMPTS,
            timeout: TIMEOUT,
            backoff: BACKOFF,
        }
    }
}

impl Policy {
    /// The defaults, with `CBTFS_S3_ATTEMPTS` (1–100), `CBTFS_S3_TIMEOUT` (seconds, 1–3600)
    /// and `CBTFS_S3_BACKOFF_MS` (the first back-off, 1–10000 ms) if set.
    pub fn from_env() -> std::io::Result<Policy> {
        let mut p = Policy::default();
        if let Some(v) = super::env("CBTFS_S3_ATTEMPTS") {
            p.attempts = parse_bounded("CBTFS_S3_ATTEMPTS", &v, 1, u64::from(MAX_ATTEMPTS))?
                .try_into()
                .unwrap_or(ATTEMPTS);
        }
        if let Some(v) = super::env("CBTFS_S3_TIMEOUT") {
            p.timeout =
                Duration::from_secs(parse_bounded("CBTFS_S3_TIMEOUT", &v, 1, MAX_TIMEOUT_SECS)?);
        }
        if let Some(v) = super::env("CBTFS_S3_BACKOFF_MS") {
            p.backoff =
                Duration::from_millis(parse_bounded("CBTFS_S3_BACKOFF_MS", &v, 1, MAX_BACKOFF_MS)?);
        }
        Ok(p)
    }

    /// The time a PUT of `len` bytes may take.
    pub fn put_timeout(&self, len: usize) -> Duration {
        let units = u32::try_from(len / PUT_TIMEOUT_UNIT)
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        self.timeout.saturating_mul(units)
    }

    /// The wait after failed attempt `n` (1-based): `backoff × 2^(n-1)` (×4 if the server
    /// asked to slow down), at most `MAX_BACKOFF`, its second half random.
    pub fn wait_after(&self, n: u32, slow_down: bool) -> Duration {
        let shift = n.saturating_sub(1).min(20);
        let mut full = self.backoff.saturating_mul(1u32 << shift);
        if slow_down {
            full = full.saturating_mul(4);
        }
        let full = full.min(MAX_BACKOFF);
        let half = full / 2;
        let mut r = [0u8; 8];
        let frac = match getrandom::fill(&mut r) {
            Ok(()) => (u64::from_le_bytes(r) >> 11) as f64 / (1u64 << 53) as f64,
            Err(_) => 0.5,
        };
        half + half.mul_f64(frac)
    }
}

fn parse_bounded(name: &str, v: &str, min: u64, max: u64) -> std::io::Result<u64> {
    match v.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name}={v:?} must be a whole number from {min} to {max}"),
        )),
    }
}

/// Why one attempt failed.
#[derive(Debug)]
pub enum Failure {
    /// The client's error.
    Store(object_store::Error),
    /// No progress within this long (a stalled answer).
    TimedOut(Duration),
    /// A body shorter than its announced length without an error from the client.
    Short { got: u64, want: u64 },
    /// Final, already explained (e.g. a lost answer's object turned out not to be ours).
    Io(std::io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Store(e) => write!(f, "{e}"),
            Failure::TimedOut(d) => write!(f, "no answer for {:.1} s (stalled)", d.as_secs_f64()),
            Failure::Short { got, want } => {
                write!(f, "the answer was cut short: {got} of {want} bytes")
            }
            Failure::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<object_store::Error> for Failure {
    fn from(e: object_store::Error) -> Failure {
        Failure::Store(e)
    }
}

impl Failure {
    /// May another attempt succeed?
    pub fn transient(&self) -> bool {
        match self {
            Failure::Store(e) => transient(e),
            Failure::TimedOut(_) | Failure::Short { .. } => true,
            Failure::Io(_) => false,
        }
    }

    /// Did the server ask to slow down (503, 429)?
    fn slow_down(&self) -> bool {
        match self {
            Failure::Store(e) => {
                let text = e.to_string();
                matches!(status_of(&text), Some(503 | 429)) || text.contains("SlowDown")
            }
            _ => false,
        }
    }
}

/// The HTTP status an `object_store` error's text reports, if any.
pub fn status_of(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// Is `e` worth another attempt? Transport failures (a `HttpError` in the error's chain or
/// its text), 5xx, 408, 429 and `RequestTimeout`, and an error answer inside a 200 (S3's
/// `InternalError`/`SlowDown` on a 200); not the other 4xx, nor errors of the client's own
/// making (an invalid range, a path).
pub fn transient(e: &object_store::Error) -> bool {
    let object_store::Error::Generic { .. } = e else {
        return false;
    };
    let text = e.to_string();
    if let Some(s) = status_of(&text) {
        return s >= 500 || s == 408 || s == 429 || text.contains("RequestTimeout");
    }
    // A 200 carrying an error; a transport failure (`HttpError`, shown as "HTTP error: …":
    // a `RetryError` hides it from the source chain).
    if text.contains("Server returned error response") || text.contains("HTTP error: ") {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// The outcome of a request that did not succeed.
#[derive(Debug)]
pub struct GaveUp {
    pub attempts: u32,
    pub elapsed: Duration,
    pub last: Failure,
}

/// `fut` within `limit`, else `TimedOut`.
pub async fn within<T, E: Into<Failure>>(
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(Failure::TimedOut(limit)),
    }
}

/// Run `attempt(n)` for n = 1, 2, … until it succeeds, fails for good, or `policy.attempts`
/// are spent; `what` names the request in the logs.
pub async fn run<T, F, Fut>(policy: &Policy, what: &str, mut attempt: F) -> Result<T, GaveUp>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        n = n.saturating_add(1);
        match attempt(n).await {
            Ok(v) => {
                if n > 1 {
                    tracing::info!(request = %what, attempts = n, "S3 request succeeded after retries");
                }
                return Ok(v);
            }
            Err(last) => {
                if !last.transient() || n >= policy.attempts.max(1) {
                    return Err(GaveUp {
                        attempts: n,
                        elapsed: start.elapsed(),
                        last,
                    });
                }
                let wait = policy.wait_after(n, last.slow_down());
                tracing::warn!(request = %what, attempt = n, of = policy.attempts, error = %last, wait_ms = wait.as_millis() as u64, "S3 request failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_with_jitter_and_is_capped() {
        let p = Policy::default();
        for n in 1..=12u32 {
            let full = (BACKOFF * (1 << (n - 1).min(20))).min(MAX_BACKOFF);
            for _ in 0..20 {
                let w = p.wait_after(n, false);
                assert!(w >= full / 2 && w <= full, "attempt {n}: {w:?} of {full:?}");
            }
        }
        let slow = p.wait_after(1, true);
        assert!(slow >= BACKOFF * 2 && slow <= BACKOFF * 4, "{slow:?}");
        assert!(p.wait_after(u32::MAX, true) <= MAX_BACKOFF);
    }

    #[test]
    fn put_timeouts_grow_with_the_body() {
        let p = Policy {
            timeout: Duration::from_secs(2),
            ..Policy::default()
        };
        assert_eq!(p.put_timeout(0), Duration::from_secs(2));
        assert_eq!(p.put_timeout(PUT_TIMEOUT_UNIT - 1), Duration::from_secs(2));
        assert_eq!(p.put_timeout(32 << 20), Duration::from_secs(18));
        assert_eq!(
            Policy::default().put_timeout(usize::MAX),
            Duration::from_secs(30).saturating_mul(u32::MAX)
        );
    }

    #[test]
    fn statuses_are_found_and_classified() {
        assert_eq!(
            status_of(
                "Error performing PUT http://x in 1ms - Server returned non-2xx status code: 503 Service Unavailable: "
            ),
            Some(503)
        );
        assert_eq!(status_of("no status here"), None);
        assert_eq!(status_of("status code: 5"), None);
        let generic = |t: &str| object_store::Error::Generic {
            store: "S3",
            source: t.to_string().into(),
        };
        assert!(transient(&generic(
            "Server returned non-2xx status code: 500 Internal Server Error"
        )));
        assert!(transient(&generic(
            "Server returned non-2xx status code: 503 Service Unavailable"
        )));
        assert!(transient(&generic(
            "Server returned non-2xx status code: 429 Too Many Requests"
        )));
        assert!(transient(&generic(
            "Server returned non-2xx status code: 400 Bad Request: <Code>RequestTimeout</Code>"
        )));
        assert!(!transient(&generic(
            "Server returned non-2xx status code: 400 Bad Request: <Code>InvalidArgument</Code>"
        )));
        assert!(!transient(&generic(
            "Server returned non-2xx status code: 416 Range Not Satisfiable"
        )));
        assert!(transient(&generic(
            "Server returned error response: <Error><Code>SlowDown</Code></Error>"
        )));
        assert!(transient(&generic(
            "Error performing GET http://127.0.0.1:9/b/k in 280µs - HTTP error: error sending request"
        )));
        // Errors of the client's own making are final.
        assert!(!transient(&generic("Requested 5..10, got 5..8")));
        assert!(!transient(&object_store::Error::NotFound {
            path: "p".into(),
            source: "404".to_string().into(),
        }));
        assert!(!transient(&object_store::Error::AlreadyExists {
            path: "p".into(),
            source: "412".to_string().into(),
        }));
        assert!(Failure::TimedOut(Duration::from_secs(1)).transient());
        assert!(Failure::Short { got: 1, want: 2 }.transient());
        assert!(!Failure::Io(std::io::Error::other("final")).transient());
        assert!(
            Failure::Store(generic(
                "Server returned non-2xx status code: 503 Service Unavailable"
            ))
            .slow_down()
        );
    }

    #[test]
    fn attempts_are_bounded_and_final_errors_stop_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let p = Policy {
            attempts: 4,
            timeout: Duration::from_millis(50),
            backoff: Duration::from_millis(1),
        };
        let mut calls = 0;
        let r: Result<(), GaveUp> = rt.block_on(run(&p, "test", |_| {
            calls += 1;
            async { Err(Failure::TimedOut(Duration::from_millis(50))) }
        }));
        let g = r.unwrap_err();
        assert_eq!((g.attempts, calls), (4, 4));
        let mut calls = 0;
        let r: Result<(), GaveUp> = rt.block_on(run(&p, "test", |_| {
            calls += 1;
            async { Err(Failure::Io(std::io::Error::other("no"))) }
        }));
        assert_eq!((r.unwrap_err().attempts, calls), (1, 1));
        let r = rt.block_on(run(&p, "test", |n| async move {
            if n < 3 {
                Err(Failure::Short { got: 0, want: 1 })
            } else {
                Ok(n)
            }
        }));
        assert_eq!(r.unwrap(), 3);
        // A stalled attempt is cut at its limit.
        let started = Instant::now();
        let r: Result<(), Failure> = rt.block_on(within(
            Duration::from_millis(50),
            std::future::pending::<Result<(), Failure>>(),
        ));
        assert!(matches!(r, Err(Failure::TimedOut(_))));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
