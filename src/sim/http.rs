//! The simulated host's own HTTP/1.1 (RFC 9112), written for it alone so that it shares no
//! code with the client's HTTP stack. It behaves as xapi's `http_svr` does on the points a
//! client can trip over:
//! * API replies (`POST /`, `POST /jsonrpc`) carry a Content-Length; the connection stays open
//!   for the next request unless the client asked to close it;
//! * the data handlers (`/export_raw_vdi`, `/export_metadata`) answer `200 OK` with
//!   `Connection: close` and no Content-Length: the body ends when the connection does, and the
//!   connection ends by closing the TCP socket under TLS, without a `close_notify`;
//! * request bodies are delimited by Content-Length only; chunked uploads are refused.
//!
//! The request head is parsed by [`parse_head`], a pure function over bytes with hard bounds
//! (the head, its header count and each length are limited) so a hostile client costs a bounded
//! amount of memory and gets a clear 400.

use std::collections::HashMap;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The request line and headers together: at most this many bytes.
pub const MAX_HEAD: usize = 64 << 10;
/// At most this many header fields.
pub const MAX_HEADERS: usize = 128;
/// Empty lines skipped before a request line.
const MAX_EMPTY_LINES: usize = 16;
/// A body is read from the socket at most this much at a time.
const READ_CHUNK: usize = 1 << 20;

/// Why a request could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("the request head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed request line {0:?}")]
    RequestLine(String),
    #[error("unsupported protocol version {0:?} (HTTP/1.0 and HTTP/1.1 are served)")]
    Version(String),
    #[error("malformed header field {0:?}")]
    Header(String),
    #[error("bad Content-Length {0:?}")]
    Length(String),
    #[error("both Transfer-Encoding and Content-Length are present")]
    Ambiguous,
}

/// A request's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target as sent (origin form: `/path?query`).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Field names lower-cased, values with surrounding whitespace removed.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of a header field (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The query string (after `?`), raw.
    pub fn raw_query(&self) -> &str {
        self.target.split_once('?').map(|(_, q)| q).unwrap_or("")
    }

    /// The query parameters, %-decoded, keys too (`vdi%3AUUID` is `vdi:UUID`); the first of a
    /// repeated key wins.
    pub fn query(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for pair in self.raw_query().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.entry(percent_decode(k))
                .or_insert_with(|| percent_decode(v));
        }
        out
    }

    /// True when the request announces a chunked (or any other coded) body.
    pub fn has_transfer_encoding(&self) -> bool {
        self.header("transfer-encoding").is_some()
    }

    /// The body's length: Content-Length, or 0 when there is none (RFC 9112 §6.3: a request
    /// without Transfer-Encoding or Content-Length has no body). Every Content-Length field
    /// must agree.
    pub fn content_length(&self) -> Result<u64, HttpError> {
        let mut len = None;
        for (_, v) in self.headers.iter().filter(|(n, _)| n == "content-length") {
            for part in v.split(',').map(str::trim) {
                let n = parse_length(part)?;
                if len.is_some_and(|l| l != n) {
                    return Err(HttpError::Length(v.clone()));
                }
                len = Some(n);
            }
        }
        if len.is_some() && self.has_transfer_encoding() {
            return Err(HttpError::Ambiguous);
        }
        Ok(len.unwrap_or(0))
    }

    /// Does the client want the connection kept for another request?
    pub fn keep_alive(&self) -> bool {
        let conn = self.header("connection").unwrap_or("").to_ascii_lowercase();
        let has = |t: &str| conn.split(',').any(|x| x.trim() == t);
        if self.minor == 0 {
            has("keep-alive")
        } else {
            !has("close")
        }
    }
}

fn parse_length(s: &str) -> Result<u64, HttpError> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Length(s.to_string()));
    }
    s.parse().map_err(|_| HttpError::Length(s.to_string()))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `application/x-www-form-urlencoded` decoding: `%XX` and `+` for a space; a `%` not followed
/// by two hex digits stays as it is.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(c),
            },
            b'+' => out.push(b' '),
            _ => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A token character (RFC 9110 §5.6.2).
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parse a request head at the start of `buf`. `Ok(None)`: the head is not complete yet (read
/// more); `Ok(Some((head, n)))`: the head took `n` bytes, the body (if any) follows.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    // RFC 9112 §2.2: empty lines before the request line are ignored (a few: a flood of
    // them is a malformed request, not a reason to buffer forever).
    let skip = buf
        .chunks(2)
        .take(MAX_EMPTY_LINES)
        .take_while(|c| *c == b"\r\n")
        .count()
        .saturating_mul(2);
    let rest = buf.get(skip..).unwrap_or(&[]);
    let window = &rest[..rest.len().min(MAX_HEAD)];
    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if rest.len() >= MAX_HEAD {
            Err(HttpError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    let text = &window[..end];
    let mut lines = text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().unwrap_or(&[]);
    let lossy = || {
        String::from_utf8_lossy(line)
            .chars()
            .take(200)
            .collect::<String>()
    };
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return Err(HttpError::RequestLine(lossy()));
    };
    if method.is_empty() || !method.iter().all(|&b| tchar(b)) {
        return Err(HttpError::RequestLine(lossy()));
    }
    if !target.starts_with(b"/") || !target.iter().all(|&b| b.is_ascii_graphic()) {
        return Err(HttpError::RequestLine(lossy()));
    }
    let minor = match *version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        v => return Err(HttpError::Version(String::from_utf8_lossy(v).into_owned())),
    };
    let mut headers = Vec::new();
    for l in lines {
        let bad = || HttpError::Header(String::from_utf8_lossy(l).chars().take(200).collect());
        if l.contains(&b'\r') || l.contains(&0) {
            return Err(bad());
        }
        // obs-fold (a line starting with whitespace) is refused, as RFC 9112 §5.2 allows.
        let colon = l.iter().position(|&b| b == b':').ok_or_else(bad)?;
        let (name, value) = (&l[..colon], &l[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| tchar(b)) {
            return Err(bad());
        }
        if headers.len() >= MAX_HEADERS {
            return Err(HttpError::TooManyHeaders);
        }
        let value = std::str::from_utf8(value).map_err(|_| bad())?;
        headers.push((
            String::from_utf8_lossy(name).to_ascii_lowercase(),
            value.trim_matches([' ', '\t']).to_string(),
        ));
    }
    let head = Head {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        minor,
        headers,
    };
    Ok(Some((head, skip + end + 4)))
}

/// What a handler answers.
pub enum Reply {
    /// A complete body sent with its Content-Length.
    Full {
        status: u16,
        content_type: &'static str,
        /// Extra header fields (e.g. `Location`).
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// xapi's handler style: `200 OK`, `Connection: close`, no length; the body is whatever
    /// arrives on the channel, then the TCP connection is closed without a TLS `close_notify`.
    CloseDelimited {
        content_type: &'static str,
        body: tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    },
}

impl Reply {
    pub fn full(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
        Reply::Full {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// An HTML error page (xapi's handlers answer errors this way, sometimes inside a 200).
    pub fn error_page(status: u16, text: &str) -> Reply {
        Reply::full(
            status,
            "text/html",
            format!(
                "<html><body><h1>HTTP {status} {}</h1>{text}</body></html>",
                reason(status)
            ),
        )
    }
}

/// The reason phrase of the status codes the simulated host uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        411 => "Length Required",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// One client connection: the stream and the bytes read past the current request's head.
pub struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn into_inner(self) -> S {
        self.stream
    }

    /// The next request's head; `Ok(None)` when the client closed the connection between
    /// requests.
    pub async fn next_head(&mut self) -> io::Result<Option<Result<Head, HttpError>>> {
        loop {
            match parse_head(&self.buf) {
                Ok(Some((head, n))) => {
                    self.buf.drain(..n);
                    return Ok(Some(Ok(head)));
                }
                Ok(None) => {}
                Err(e) => return Ok(Some(Err(e))),
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Up to `max` (≥ 1) bytes of the body, of which `remaining` are still to come; empty only
    /// when `remaining` is 0. The connection ending early is an error.
    pub async fn body_chunk(&mut self, remaining: &mut u64, max: usize) -> io::Result<Vec<u8>> {
        let want = usize::try_from(*remaining)
            .unwrap_or(usize::MAX)
            .min(max.max(1));
        if want == 0 {
            return Ok(Vec::new());
        }
        if self.buf.is_empty() {
            let mut chunk = vec![0u8; want.min(READ_CHUNK)];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection inside the body",
                ));
            }
            chunk.truncate(n);
            self.buf = chunk;
        }
        let n = want.min(self.buf.len());
        let out: Vec<u8> = self.buf.drain(..n).collect();
        *remaining -= n as u64;
        Ok(out)
    }

    /// The whole body, `len` bytes, refused (None) if longer than `limit`.
    pub async fn body(&mut self, len: u64, limit: usize) -> io::Result<Option<Vec<u8>>> {
        if len > limit as u64 {
            return Ok(None);
        }
        let mut remaining = len;
        let mut out = Vec::with_capacity(len as usize);
        while remaining > 0 {
            out.extend(self.body_chunk(&mut remaining, READ_CHUNK).await?);
        }
        Ok(Some(out))
    }

    /// `100 Continue`: the client may send the body it announced.
    pub async fn send_continue(&mut self) -> io::Result<()> {
        self.stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await?;
        self.stream.flush().await
    }

    /// Send a complete reply; `close` adds `Connection: close`.
    pub async fn send_full(
        &mut self,
        status: u16,
        content_type: &str,
        headers: &[(&str, String)],
        body: &[u8],
        close: bool,
    ) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
            reason(status),
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// Send a close-delimited `200 OK`: the head, then the body as it arrives. The caller
    /// closes the connection afterwards.
    pub async fn send_close_delimited(
        &mut self,
        content_type: &str,
        mut body: tokio::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    ) -> io::Result<()> {
        let head =
            format!("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: {content_type}\r\n\r\n");
        self.stream.write_all(head.as_bytes()).await?;
        // While waiting for the next chunk, watch the client: one that went away (a timeout
        // on its side) ends the transfer, so the export is released as xapi releases it.
        let mut probe = [0u8; 512];
        loop {
            tokio::select! {
                chunk = body.recv() => match chunk {
                    Some(chunk) => self.stream.write_all(&chunk?).await?,
                    None => break,
                },
                r = self.stream.read(&mut probe) => match r {
                    Ok(0) => return Err(io::Error::from(io::ErrorKind::ConnectionAborted)),
                    Err(e) => return Err(e),
                    Ok(_) => {} // anything a client sends now is ignored
                },
            }
        }
        self.stream.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Head {
        parse_head(s.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn request_heads_parse() {
        let raw = b"\r\nPOST /jsonrpc?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length:  12 \r\nX-Empty:\r\n\r\nBODY";
        let (h, n) = parse_head(raw).unwrap().unwrap();
        assert_eq!(&raw[n..], b"BODY");
        assert_eq!(h.method, "POST");
        assert_eq!(h.path(), "/jsonrpc");
        assert_eq!(h.raw_query(), "a=1");
        assert_eq!(h.header("content-length"), Some("12"));
        assert_eq!(h.header("x-empty"), Some(""));
        assert_eq!(h.content_length(), Ok(12));
        assert!(h.keep_alive());
        // Incomplete: read more.
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(parse_head(b""), Ok(None));
        let h = head("GET / HTTP/1.0\r\n\r\n");
        assert_eq!((h.minor, h.keep_alive()), (0, false));
        assert!(!head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive());
        assert_eq!(head("GET / HTTP/1.1\r\n\r\n").content_length(), Ok(0));
    }

    #[test]
    fn queries_are_decoded() {
        let h = head(
            "GET /import_metadata?session_id=OpaqueRef%3Aab&vdi%3Ax=y+z&vdi%3Ax=2&bad=%zz&flag HTTP/1.1\r\n\r\n",
        );
        let q = h.query();
        assert_eq!(q["session_id"], "OpaqueRef:ab");
        assert_eq!(q["vdi:x"], "y z");
        assert_eq!(q["bad"], "%zz");
        assert_eq!(q["flag"], "");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%e2%82%ac"), "€");
    }

    #[test]
    fn hostile_heads_are_refused_with_bounds() {
        // A head that never ends is refused once it passes the bound, not buffered forever.
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse_head(&big), Err(HttpError::HeadTooLarge));
        big.truncate(MAX_HEAD - 1);
        assert_eq!(parse_head(&big), Ok(None));
        // A flood of empty lines is not buffered forever either.
        let flood = b"\r\n".repeat(MAX_HEAD);
        assert!(matches!(parse_head(&flood), Err(HttpError::RequestLine(_))));
        assert_eq!(parse_head(&b"\r\n".repeat(MAX_EMPTY_LINES - 1)), Ok(None));
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(parse_head(many.as_bytes()), Err(HttpError::TooManyHeaders));
        for bad in [
            "GET /\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad.as_bytes()), Err(HttpError::RequestLine(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_head(b"GET / HTTP/2.0\r\n\r\n"),
            Err(HttpError::Version(_))
        ));
        for bad in [
            "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET / HTTP/1.1\r\n folded: x\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\n: x\r\n\r\n",
            "GET / HTTP/1.1\r\nA: x\ry\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad.as_bytes()), Err(HttpError::Header(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nA: \xff\r\n\r\n"),
            Err(HttpError::Header(_))
        ));
    }

    #[test]
    fn bad_lengths_are_refused() {
        for bad in ["-1", "1x", "", " ", "0x10", "99999999999999999999", "+5"] {
            let h = head(&format!("PUT / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n"));
            assert!(
                matches!(h.content_length(), Err(HttpError::Length(_))),
                "{bad:?}"
            );
        }
        let h = head("PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert!(matches!(h.content_length(), Err(HttpError::Length(_))));
        let h = head("PUT / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(h.content_length(), Ok(5));
        let h = head("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.content_length(), Err(HttpError::Ambiguous));
        let h = head("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(h.has_transfer_encoding());
    }

    #[tokio::test]
    async fn a_connection_serves_bodies_and_pipelined_requests() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut conn = Conn::new(server);
        let (mut r, mut w) = tokio::io::split(client);
        w.write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /y HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let h = conn.next_head().await.unwrap().unwrap().unwrap();
        assert_eq!(h.path(), "/x");
        assert_eq!(conn.body(5, 4).await.unwrap(), None);
        assert_eq!(conn.body(5, 5).await.unwrap(), Some(b"hello".to_vec()));
        let h = conn.next_head().await.unwrap().unwrap().unwrap();
        assert_eq!(h.path(), "/y");
        conn.send_full(200, "text/plain", &[("Location", "/z".into())], b"ok", true)
            .await
            .unwrap();
        w.shutdown().await.unwrap();
        assert!(conn.next_head().await.unwrap().is_none());
        drop(conn);
        let mut got = String::new();
        r.read_to_string(&mut got).await.unwrap();
        assert_eq!(
            got,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nLocation: /z\r\nConnection: close\r\n\r\nok"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut conn = Conn::new(server);
        let (_r, mut w) = tokio::io::split(client);
        w.write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        w.shutdown().await.unwrap();
        conn.next_head().await.unwrap().unwrap().unwrap();
        let e = conn.body(10, 100).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
