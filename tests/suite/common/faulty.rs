//! A fault-injecting HTTP proxy for the S3 tests: it listens on loopback in front of the
//! radosgw of `rgw.rs`, and cbtfs is pointed at it (`CBTFS_S3_ENDPOINT`). Each request is
//! forwarded on a fresh upstream connection, or not, and its answer delivered, damaged or
//! withheld, as the test's [`Schedule`] says; every request is counted by method and logged.
//!
//! Written from HTTP/1.1 (RFC 9112) alone: a request is a head ending in CRLF CRLF and a
//! `Content-Length` body (the S3 client never sends chunked bodies: it signs the length);
//! the upstream is asked to close after its answer (`Connection: close`), which is then read
//! to its end, whatever its framing, and the client is told to close as well. One request per
//! client connection keeps the proxy free of any framing logic of its own: the client's own
//! parser judges what arrives.
//!
//! Bounded: heads up to 64 KiB, bodies up to 256 MiB, one thread per client connection
//! (the client pools a handful), stalls end when the proxy is dropped, the log keeps the
//! first 100,000 requests.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What is done to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection without forwarding the request: the server never sees it.
    Drop,
    /// Forward the request, then close without answering: it took effect, the answer is lost.
    LostAnswer,
    /// Forward, then deliver the first half of the answer's head and close.
    CutHead,
    /// Forward, then deliver the head (its `Content-Length` intact) and half the body, and
    /// close. An answer without a body loses half its head instead.
    Truncate,
    /// Answer 500 `InternalError` (S3's XML error body) without forwarding.
    Status500,
    /// Answer 503 `SlowDown` without forwarding.
    SlowDown,
    /// Forward, then hold the answer back for this long before closing without it.
    Stall(Duration),
}

impl Fault {
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Drop => "drop",
            Fault::LostAnswer => "lost-answer",
            Fault::CutHead => "cut-head",
            Fault::Truncate => "truncate",
            Fault::Status500 => "500",
            Fault::SlowDown => "503-slowdown",
            Fault::Stall(_) => "stall",
        }
    }
}

/// Which of the matching requests get a fault.
#[derive(Debug, Clone, PartialEq)]
pub enum When {
    Never,
    Always,
    /// The N-th, 2N-th, … matching request.
    EveryNth(u64),
    /// These matching requests (1-based).
    Nth(Vec<u64>),
    /// Each matching request with this probability, from a seeded generator.
    Random {
        seed: u64,
        fraction: f64,
    },
}

/// The proxy's plan: requests matching `method` and `path_contains` (both optional) are
/// counted, and those `when` picks get the next of `faults` in turn.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub when: When,
    pub faults: Vec<Fault>,
    pub method: Option<&'static str>,
    pub path_contains: Option<String>,
    /// Every matching request (faulted or not) is held this long before it is forwarded:
    /// a slow link, so that a client's concurrency shows.
    pub delay: Option<Duration>,
}

impl Schedule {
    pub fn none() -> Schedule {
        Schedule {
            when: When::Never,
            faults: Vec::new(),
            method: None,
            path_contains: None,
            delay: None,
        }
    }
    pub fn new(when: When, faults: &[Fault]) -> Schedule {
        Schedule {
            when,
            faults: faults.to_vec(),
            method: None,
            path_contains: None,
            delay: None,
        }
    }
    pub fn delay(mut self, d: Duration) -> Schedule {
        self.delay = Some(d);
        self
    }
    pub fn method(mut self, m: &'static str) -> Schedule {
        self.method = Some(m);
        self
    }
    pub fn path(mut self, p: &str) -> Schedule {
        self.path_contains = Some(p.to_string());
        self
    }
}

/// One request seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub fault: Option<Fault>,
}

struct State {
    schedule: Schedule,
    /// Requests that matched the schedule's filter so far.
    matched: u64,
    /// Faults handed out so far (picks the next fault in turn).
    given: usize,
    rng: u64,
    by_method: BTreeMap<String, u64>,
    /// Requests being handled now, and the most at once, by method.
    in_flight: BTreeMap<String, u64>,
    max_in_flight: BTreeMap<String, u64>,
    log: Vec<Seen>,
}

const LOG_MAX: usize = 100_000;
const HEAD_MAX: usize = 64 << 10;
const BODY_MAX: usize = 256 << 20;

/// The running proxy; stopped when dropped.
pub struct Proxy {
    /// `http://127.0.0.1:PORT`, for `CBTFS_S3_ENDPOINT`.
    pub endpoint: String,
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy in front of `upstream` (`http://HOST:PORT`), with no faults yet.
    pub fn start(upstream: &str) -> Proxy {
        let up = upstream
            .strip_prefix("http://")
            .expect("an http:// upstream")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("the proxy's address");
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(State {
            schedule: Schedule::none(),
            matched: 0,
            given: 0,
            rng: 1,
            by_method: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            max_in_flight: BTreeMap::new(),
            log: Vec::new(),
        }));
        let accept = {
            let (stop, state) = (stop.clone(), state.clone());
            std::thread::Builder::new()
                .name("faulty-accept".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let Ok(conn) = conn else { continue };
                        let (stop, state, up) = (stop.clone(), state.clone(), up.clone());
                        let _ = std::thread::Builder::new()
                            .name("faulty-conn".into())
                            .spawn(move || serve(conn, &up, &state, &stop));
                    }
                })
                .expect("start the proxy's thread")
        };
        Proxy {
            endpoint: format!("http://{addr}"),
            addr,
            stop,
            state,
            accept: Some(accept),
        }
    }

    /// Replace the schedule (and restart its counts; the request counts stay).
    pub fn set(&self, schedule: Schedule) {
        let mut s = self.state.lock().unwrap();
        if let When::Random { seed, .. } = schedule.when {
            s.rng = seed | 1;
        }
        s.schedule = schedule;
        s.matched = 0;
        s.given = 0;
    }

    /// Requests seen so far, by method.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.state.lock().unwrap().by_method.clone()
    }

    /// The most requests of `method` handled at once so far.
    pub fn max_in_flight(&self, method: &str) -> u64 {
        let s = self.state.lock().unwrap();
        s.max_in_flight.get(method).copied().unwrap_or(0)
    }

    /// Every request seen so far (the first 100,000).
    pub fn log(&self) -> Vec<Seen> {
        self.state.lock().unwrap().log.clone()
    }

    /// How many requests got each fault.
    pub fn faults(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for s in self.state.lock().unwrap().log.iter() {
            if let Some(f) = s.fault {
                *out.entry(f.name()).or_default() += 1;
            }
        }
        out
    }

    /// Forget the counts and the log.
    pub fn reset_counts(&self) {
        let mut s = self.state.lock().unwrap();
        s.by_method.clear();
        s.max_in_flight.clear();
        s.log.clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Decide the fault (and delay) for one request and record it as in flight.
fn decide(state: &Mutex<State>, method: &str, path: &str) -> (Option<Fault>, Option<Duration>) {
    let mut s = state.lock().unwrap();
    *s.by_method.entry(method.to_string()).or_default() += 1;
    let now = {
        let n = s.in_flight.entry(method.to_string()).or_default();
        *n += 1;
        *n
    };
    let max = s.max_in_flight.entry(method.to_string()).or_default();
    *max = (*max).max(now);
    let sched = s.schedule.clone();
    let matches = sched.method.is_none_or(|m| m == method)
        && sched
            .path_contains
            .as_deref()
            .is_none_or(|p| path.contains(p));
    let mut fault = None;
    if matches && !sched.faults.is_empty() {
        s.matched += 1;
        let k = s.matched;
        let pick = match &sched.when {
            When::Never => false,
            When::Always => true,
            When::EveryNth(n) => *n > 0 && k.is_multiple_of(*n),
            When::Nth(list) => list.contains(&k),
            When::Random { fraction, .. } => {
                // xorshift64*
                let mut x = s.rng;
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                s.rng = x;
                let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
                (r as f64 / (1u64 << 53) as f64) < *fraction
            }
        };
        if pick {
            let f = sched.faults[s.given % sched.faults.len()];
            s.given += 1;
            fault = Some(f);
        }
    }
    if s.log.len() < LOG_MAX {
        s.log.push(Seen {
            method: method.to_string(),
            path: path.to_string(),
            fault,
        });
    }
    (fault, sched.delay.filter(|_| matches))
}

/// Marks a request done (in-flight count) when dropped.
struct Done<'a>(&'a Mutex<State>, String);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = s.in_flight.get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Read up to the end of a head (CRLF CRLF); returns the head and whatever followed it.
/// None at a clean end of stream before any byte, or on an error.
fn read_head(conn: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut piece = [0u8; 8192];
    loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            let rest = buf.split_off(at + 4);
            return Some((buf, rest));
        }
        if buf.len() > HEAD_MAX {
            return None;
        }
        match conn.read(&mut piece) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&piece[..n]),
        }
    }
}

/// The head's lines after the first, as (lowercase name, value).
fn headers(head: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(head)
        .split("\r\n")
        .skip(1)
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect()
}

/// `head` without its `Connection` headers and with `Connection: close` added.
fn closing(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut lines: Vec<&str> = text
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| {
            !l.to_ascii_lowercase().starts_with("connection:")
                && !l.to_ascii_lowercase().starts_with("keep-alive:")
        })
        .collect();
    lines.push("Connection: close");
    let mut out = lines.join("\r\n").into_bytes();
    out.extend_from_slice(b"\r\n\r\n");
    out
}

fn error_answer(status: &str, code: &str, message: &str, path: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource><RequestId>faulty-proxy</RequestId></Error>"
    );
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Sleep `d` unless the proxy stops first.
fn nap(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

/// One client connection: one request, then close.
fn serve(mut conn: TcpStream, upstream: &str, state: &Mutex<State>, stop: &AtomicBool) {
    if stop.load(Ordering::Relaxed) {
        return;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let Some((head, mut body)) = read_head(&mut conn) else {
        return;
    };
    let line = String::from_utf8_lossy(&head)
        .split("\r\n")
        .next()
        .unwrap_or("")
        .to_string();
    let mut words = line.split(' ');
    let method = words.next().unwrap_or("").to_string();
    let path = words.next().unwrap_or("").to_string();
    let hs = headers(&head);
    assert!(
        !hs.iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")),
        "the faulty proxy takes no chunked request bodies ({line})"
    );
    let len: usize = hs
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if len > BODY_MAX {
        return;
    }
    let mut piece = vec![0u8; 64 << 10];
    while body.len() < len {
        match conn.read(&mut piece) {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&piece[..n]),
        }
    }
    body.truncate(len);
    let (fault, delay) = decide(state, &method, &path);
    let _done = Done(state, method.clone());
    if let Some(d) = delay {
        nap(d, stop);
    }
    match fault {
        Some(Fault::Drop) => {
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        Some(Fault::Status500) => {
            let _ = conn.write_all(&error_answer(
                "500 Internal Server Error",
                "InternalError",
                "We encountered an internal error. Please try again.",
                &path,
            ));
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        Some(Fault::SlowDown) => {
            let _ = conn.write_all(&error_answer(
                "503 Slow Down",
                "SlowDown",
                "Please reduce your request rate.",
                &path,
            ));
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        _ => {}
    }
    // Forward on a fresh connection, asking the server to close after its answer.
    let Ok(mut up) = TcpStream::connect(upstream) else {
        let _ = conn.shutdown(Shutdown::Both);
        return;
    };
    let _ = up.set_read_timeout(Some(Duration::from_secs(120)));
    if up.write_all(&closing(&head)).is_err() || up.write_all(&body).is_err() {
        return;
    }
    drop(body);
    let mut answer = Vec::new();
    loop {
        match up.read(&mut piece) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&piece[..n]);
                if answer.len() > BODY_MAX + HEAD_MAX {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let Some(at) = find(&answer, b"\r\n\r\n") else {
        return;
    };
    let (ahead, abody) = answer.split_at(at + 4);
    let ahead = closing(ahead);
    match fault {
        None => {
            let _ = conn.write_all(&ahead);
            let _ = conn.write_all(abody);
        }
        Some(Fault::LostAnswer) => {}
        Some(Fault::CutHead) => {
            let _ = conn.write_all(&ahead[..ahead.len() / 2]);
        }
        Some(Fault::Truncate) => {
            if abody.is_empty() || method == "HEAD" {
                let _ = conn.write_all(&ahead[..ahead.len() / 2]);
            } else {
                let _ = conn.write_all(&ahead);
                let _ = conn.write_all(&abody[..abody.len() / 2]);
            }
        }
        Some(Fault::Stall(d)) => nap(d, stop),
        Some(Fault::Drop | Fault::Status500 | Fault::SlowDown) => {}
    }
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Both);
}
