//! One NBD connection: negotiation (fixed newstyle, STARTTLS, GO or EXPORT_NAME, structured
//! replies, `base:allocation`), then pipelined reads. A writer task sends requests (at most
//! `depth` in flight), a reader task matches replies to them by cookie. Any protocol error or
//! dropped connection fails every outstanding request and marks the connection dead: callers
//! reconnect and re-issue, never carry on (xapi-nbd closes the connection after any error).

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::proto::{self, ExportInfo, ProtoError, ReplyHeader};
use super::tls::{self, Trust};

/// Connecting and negotiating must finish within this time.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// Where an export is and how to trust it. `trust: None` is plain NBD (only when asked).
#[derive(Debug, Clone)]
pub struct Target {
    pub address: Address,
    pub export: String,
    pub trust: Option<Trust>,
}

impl Target {
    /// How errors name the export: never with the session id xapi puts in export names.
    pub fn describe(&self) -> String {
        let export = redact_session(&self.export);
        let scheme = if self.trust.is_some() { "nbds" } else { "nbd" };
        match &self.address {
            Address::Tcp { host, port } => format!("{scheme}://{host}:{port}/{export}"),
            Address::Unix(p) => format!("{scheme}+unix:///{export}?socket={}", p.display()),
        }
    }
}

/// `text` with everything from a session id on replaced: xapi's export names carry the API
/// session, a secret that must not reach errors, logs or manifests (plain or %-encoded).
pub fn redact_session(text: &str) -> String {
    match text.find("session_id") {
        Some(i) => format!("{}session_id=<redacted>", &text[..i]),
        None => text.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("{target}: connection lost: {source}")]
    Io {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("{target}: protocol error: {source}")]
    Proto {
        target: String,
        #[source]
        source: ProtoError,
    },
    #[error("{target}: TLS failed: {detail}")]
    Tls { target: String, detail: String },
    #[error(
        "{target} requires TLS: use an nbds:// URI with the server's certificate (--tls-cert and --tls-subject, or --ca-cert)"
    )]
    TlsRequired { target: String },
    #[error(
        "{target} does not offer TLS; refusing to fall back to plain text (use an nbd:// URI only if the network is trusted, e.g. an insecure_nbd network)"
    )]
    NoTls { target: String },
    #[error("{target}: the server refused the export: {detail}")]
    Refused { target: String, detail: String },
    #[error("{target}: the server answered {name} reading {len} bytes at offset {offset}{message}")]
    Server {
        target: String,
        name: &'static str,
        offset: u64,
        len: u32,
        message: String,
    },
    #[error("{target}: the connection was closed")]
    Closed { target: String },
    #[error("no NBD connection could be opened at any address the host lists: {tried}")]
    NoConnection { tried: String },
}

impl NbdError {
    /// Worth reconnecting and trying again?
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            NbdError::Io { .. }
                | NbdError::Closed { .. }
                | NbdError::Server { .. }
                | NbdError::Connect { .. }
        )
    }
}

/// What a request returns.
#[derive(Debug)]
pub enum Reply {
    Data(Vec<u8>),
    Status(Vec<(u32, u32)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Status,
}

struct Job {
    kind: Kind,
    offset: u64,
    len: u32,
    reply: oneshot::Sender<Result<Reply, NbdError>>,
}

/// Separate byte ranges a structured read reply may arrive in. Servers send chunks in order
/// (one range); the bound keeps a hostile server's out-of-order slivers from costing memory
/// and a scan per chunk without end.
const MAX_RANGES: usize = 4096;
/// Error chunks accepted in one reply before the server counts as hostile.
const MAX_ERROR_CHUNKS: u32 = 16;
/// Option replies accepted for one option during negotiation (meta contexts, information).
const MAX_OPTION_REPLIES: u32 = 64;

struct Pending {
    kind: Kind,
    offset: u64,
    len: u32,
    buf: Vec<u8>,
    /// Any chunk arrived (a simple reply may no longer follow).
    started: bool,
    /// Bytes of a structured read covered by data and hole chunks so far.
    covered: u64,
    /// The ranges covered (request-relative), so overlapping chunks cannot fake full coverage
    /// and leave stale or unset bytes in a gap.
    ranges: Vec<(u64, u64)>,
    extents: Option<Vec<(u32, u32)>>,
    error: Option<NbdError>,
    error_chunks: u32,
    reply: oneshot::Sender<Result<Reply, NbdError>>,
    _permit: OwnedSemaphorePermit,
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

/// Ids telling connections apart (a pool replaces a dead one with a new one in its slot).
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Aborts the connection's reader task when the connection is dropped.
struct ReaderTask(tokio::task::AbortHandle);
impl Drop for ReaderTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A negotiated connection.
pub struct Client {
    tx: mpsc::Sender<Job>,
    writer: tokio::task::JoinHandle<()>,
    reader: ReaderTask,
    /// Ends when the server has closed the connection (after DISC, as servers do).
    reader_end: tokio::task::JoinHandle<()>,
    pub info: ExportInfo,
    pub structured: bool,
    pub status_context: Option<u32>,
    alive: Arc<AtomicBool>,
    target: String,
    id: u64,
}

/// What negotiation agreed: the export, and whether structured replies and block status
/// (`base:allocation`, with the context id the server gave it) are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub info: ExportInfo,
    pub structured: bool,
    pub status_context: Option<u32>,
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8], t: &str) -> Result<(), NbdError> {
    s.write_all(bytes).await.map_err(|e| io_err(t, e))?;
    s.flush().await.map_err(|e| io_err(t, e))
}

fn io_err(t: &str, e: io::Error) -> NbdError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        NbdError::Closed { target: t.into() }
    } else {
        NbdError::Io {
            target: t.into(),
            source: e,
        }
    }
}

fn proto_err(t: &str, e: ProtoError) -> NbdError {
    NbdError::Proto {
        target: t.into(),
        source: e,
    }
}

/// Read one option reply: (type, payload). The payload is bounded before it is allocated.
async fn option_reply<S: Stream>(s: &mut S, opt: u32, t: &str) -> Result<(u32, Vec<u8>), NbdError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.map_err(|e| io_err(t, e))?;
    let (kind, len) = proto::parse_option_reply_header(&h, opt).map_err(|e| proto_err(t, e))?;
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).await.map_err(|e| io_err(t, e))?;
    Ok((kind, p))
}

fn reply_error_text(kind: u32, payload: &[u8]) -> String {
    let msg = proto::shown_message(payload);
    let name = match kind {
        proto::REP_ERR_UNSUP => "unsupported",
        proto::REP_ERR_POLICY => "refused by policy",
        proto::REP_ERR_TLS_REQD => "TLS required",
        proto::REP_ERR_UNKNOWN => "no such export",
        _ => "error",
    };
    if msg.is_empty() {
        name.to_string()
    } else {
        format!("{name}: {msg}")
    }
}

fn too_many_replies(t: &str, what: &'static str) -> NbdError {
    proto_err(
        t,
        ProtoError::TooLong {
            what,
            len: MAX_OPTION_REPLIES as u64 + 1,
            max: MAX_OPTION_REPLIES as u64,
        },
    )
}

/// The meta context the client asks for.
const ALLOCATION_CONTEXT: &str = "base:allocation";

/// Options after (optional) TLS: structured replies, block status, then GO or EXPORT_NAME.
async fn negotiate<S: Stream>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    t: &str,
) -> Result<Negotiated, NbdError> {
    let mut structured = false;
    let mut status_context = None;
    send(s, &proto::option(proto::OPT_STRUCTURED_REPLY, &[]), t).await?;
    match option_reply(s, proto::OPT_STRUCTURED_REPLY, t).await? {
        (proto::REP_ACK, _) => structured = true,
        (proto::REP_ERR_TLS_REQD, _) => return Err(NbdError::TlsRequired { target: t.into() }),
        _ => {}
    }
    if structured {
        let data = proto::meta_context_data(export, ALLOCATION_CONTEXT);
        send(s, &proto::option(proto::OPT_SET_META_CONTEXT, &data), t).await?;
        let mut replies = 0;
        loop {
            replies += 1;
            if replies > MAX_OPTION_REPLIES {
                return Err(too_many_replies(t, "meta context replies"));
            }
            match option_reply(s, proto::OPT_SET_META_CONTEXT, t).await? {
                // Only the context asked for counts: another one's bits mean something else.
                (proto::REP_META_CONTEXT, p)
                    if p.len() >= 4 && &p[4..] == ALLOCATION_CONTEXT.as_bytes() =>
                {
                    status_context = Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
                }
                (proto::REP_ACK, _) => break,
                (k, _) if k & proto::REP_ERR_BIT != 0 => break,
                _ => {}
            }
        }
    }
    let mut info = ExportInfo::default();
    let mut size_stated = false;
    send(s, &proto::option(proto::OPT_GO, &proto::go_data(export)), t).await?;
    let mut replies = 0;
    loop {
        replies += 1;
        if replies > MAX_OPTION_REPLIES {
            return Err(too_many_replies(t, "replies to NBD_OPT_GO"));
        }
        match option_reply(s, proto::OPT_GO, t).await? {
            (proto::REP_INFO, p) => {
                let kind = proto::parse_info(&p, &mut info).map_err(|e| proto_err(t, e))?;
                size_stated |= kind == proto::INFO_EXPORT;
            }
            (proto::REP_ACK, _) => {
                // Without the size nothing can be read safely: an export of unknown size is
                // never taken as empty.
                if !size_stated {
                    return Err(proto_err(t, ProtoError::NoExportSize));
                }
                return Ok(Negotiated {
                    info,
                    structured,
                    status_context,
                });
            }
            (proto::REP_ERR_UNSUP, _) => break,
            (proto::REP_ERR_TLS_REQD, _) => return Err(NbdError::TlsRequired { target: t.into() }),
            (k, p) if k & proto::REP_ERR_BIT != 0 => {
                return Err(NbdError::Refused {
                    target: t.into(),
                    detail: reply_error_text(k, &p),
                });
            }
            _ => {}
        }
    }
    // No GO (xapi-nbd): EXPORT_NAME. A refusal is a closed connection, not a reply.
    send(
        s,
        &proto::option(proto::OPT_EXPORT_NAME, export.as_bytes()),
        t,
    )
    .await?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => NbdError::Refused {
            target: t.into(),
            detail: "it closed the connection on EXPORT_NAME (no such export, or not allowed)"
                .into(),
        },
        _ => io_err(t, e),
    })?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z).await.map_err(|e| io_err(t, e))?;
    }
    info.size = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    info.flags = u16::from_be_bytes([b[8], b[9]]);
    // Structured replies were agreed before EXPORT_NAME; they stay in force.
    Ok(Negotiated {
        info,
        structured,
        status_context,
    })
}

/// The server's greeting and the client's flags; returns whether NO_ZEROES is in force.
async fn greet<S: Stream>(s: &mut S, t: &str) -> Result<bool, NbdError> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.map_err(|e| io_err(t, e))?;
    let flags = proto::parse_greeting(&g).map_err(|e| proto_err(t, e))?;
    let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
    let mut cflags = proto::CLIENT_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= proto::CLIENT_NO_ZEROES;
    }
    send(s, &cflags.to_be_bytes(), t).await?;
    Ok(no_zeroes)
}

/// The whole handshake of a plain (no TLS) connection over `s`, from the server's greeting to
/// the end of negotiation for `export`; `t` names the server in errors. The stream is then
/// ready for [`Client::over`]. (Public for the handshake fuzz target.)
pub async fn handshake_plain<S: Stream>(
    s: &mut S,
    export: &str,
    t: &str,
) -> Result<Negotiated, NbdError> {
    let no_zeroes = greet(s, t).await?;
    negotiate(s, export, no_zeroes, t).await
}

async fn connect_raw(target: &Target, t: &str) -> Result<Box<dyn Stream>, NbdError> {
    let conn_err = |e| NbdError::Connect {
        target: t.into(),
        source: e,
    };
    match &target.address {
        Address::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(conn_err)?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Address::Unix(p) => Ok(Box::new(UnixStream::connect(p).await.map_err(conn_err)?)),
    }
}

impl Client {
    /// Connect, negotiate and start the connection's tasks. `depth`: requests in flight.
    /// A server that accepts but never greets (one busy with another client) times out.
    pub async fn connect(target: &Target, depth: usize) -> Result<Client, NbdError> {
        Client::connect_within(target, depth, CONNECT_TIMEOUT).await
    }

    /// [`Client::connect`], the handshake bounded by `limit` instead.
    pub async fn connect_within(
        target: &Target,
        depth: usize,
        limit: std::time::Duration,
    ) -> Result<Client, NbdError> {
        match tokio::time::timeout(limit, Client::connect_inner(target, depth)).await {
            Ok(r) => r,
            Err(_) => Err(NbdError::Connect {
                target: target.describe(),
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no NBD handshake within {} s (does the server allow this many connections?)",
                        limit.as_secs()
                    ),
                ),
            }),
        }
    }

    async fn connect_inner(target: &Target, depth: usize) -> Result<Client, NbdError> {
        let t = target.describe();
        let mut s = connect_raw(target, &t).await?;
        let no_zeroes = greet(&mut s, &t).await?;
        let mut s: Box<dyn Stream> = match &target.trust {
            None => s,
            Some(trust) => {
                send(&mut s, &proto::option(proto::OPT_STARTTLS, &[]), &t).await?;
                match option_reply(&mut s, proto::OPT_STARTTLS, &t).await? {
                    (proto::REP_ACK, _) => {}
                    _ => return Err(NbdError::NoTls { target: t }),
                }
                let (config, name) = tls::client_config(trust).map_err(|e| NbdError::Tls {
                    target: t.clone(),
                    detail: e.to_string(),
                })?;
                let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
                // No read buffer below rustls: it reads a record (≤ 16 KiB) per system call,
                // but a buffer costs a copy of every byte, which measured slower (a 4 GiB
                // backup over 4 connections: 6.2 s without, 6.5 s with a 256 KiB buffer).
                let tls = connector
                    .connect(name, s)
                    .await
                    .map_err(|e| NbdError::Tls {
                        target: t.clone(),
                        detail: e.to_string(),
                    })?;
                Box::new(tls)
            }
        };
        let n = negotiate(&mut s, &target.export, no_zeroes, &t).await?;
        Ok(Client::over(s, n, depth, t))
    }

    /// Start the connection's tasks over a negotiated stream (in the current tokio runtime).
    /// `t` names the server in errors. (Public so the reply reader can be driven over an
    /// in-memory stream, as the fuzz target does.)
    pub fn over<S: Stream>(s: S, n: Negotiated, depth: usize, t: String) -> Client {
        let (rd, wr) = tokio::io::split(s);
        let (tx, rx) = mpsc::channel::<Job>(depth.max(1) * 2);
        let pending: PendingMap = Arc::new(Mutex::new(HashMap::new()));
        let alive = Arc::new(AtomicBool::new(true));
        let death: Death = Arc::new(Mutex::new(None));
        let sem = Arc::new(Semaphore::new(depth.max(1)));
        let writer = tokio::spawn(writer(
            wr,
            rx,
            pending.clone(),
            sem,
            (alive.clone(), death.clone()),
            t.clone(),
        ));
        let reader = tokio::spawn(reader(
            rd,
            pending,
            (alive.clone(), death),
            ReplyRules {
                structured: n.structured,
                status_context: n.status_context,
            },
            t.clone(),
        ));
        Client {
            tx,
            writer,
            reader: ReaderTask(reader.abort_handle()),
            reader_end: reader,
            info: n.info,
            structured: n.structured,
            status_context: n.status_context,
            alive,
            target: t,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Disconnect cleanly: NBD_CMD_DISC, then TLS close_notify. (A host keeps a VBD plugged
    /// per connection until it ends, and `data_destroy` waits for that.)
    pub async fn close(self) {
        let Client {
            tx,
            writer,
            reader,
            reader_end,
            ..
        } = self;
        drop(tx);
        // Then wait (boundedly) for the server to close its side: only then has the host let
        // go of the connection, so a new one opened next does not count twice against its
        // limit of 16 (and its VBD is on its way out).
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let _ = writer.await;
            let _ = reader_end.await;
        })
        .await;
        drop(reader);
    }

    /// True while the connection can answer: its reader task runs and no error ended it.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.reader.0.is_finished()
    }

    /// Give the connection up (a request on it timed out): its reader stops, every request
    /// in flight on it fails, and a pool reconnects instead of queueing more on it.
    pub fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.reader.0.abort();
    }

    /// Tells this connection apart from the one that may replace it.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    async fn submit(
        &self,
        kind: Kind,
        offset: u64,
        len: u32,
    ) -> oneshot::Receiver<Result<Reply, NbdError>> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            kind,
            offset,
            len,
            reply,
        };
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job).await {
            let _ = job.reply.send(Err(NbdError::Closed {
                target: self.target.clone(),
            }));
        }
        rx
    }

    /// Queue a read; the receiver yields its data.
    pub async fn read(&self, offset: u64, len: u32) -> oneshot::Receiver<Result<Reply, NbdError>> {
        self.submit(Kind::Read, offset, len).await
    }

    /// `base:allocation` extents from `offset` (the server may cover less than `len`; only
    /// the last extent may reach past it).
    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<(u32, u32)>, NbdError> {
        let rx = self.submit(Kind::Status, offset, len).await;
        match rx.await {
            Ok(Ok(Reply::Status(e))) => Ok(e),
            Ok(Ok(Reply::Data(_))) => Err(proto_err(
                &self.target,
                ProtoError::Malformed("status reply"),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NbdError::Closed {
                target: self.target.clone(),
            }),
        }
    }
}

fn fail_all(pending: &PendingMap, t: &str, why: &NbdError) {
    let drained: Vec<Pending> = match pending.lock() {
        Ok(mut m) => m.drain().map(|(_, p)| p).collect(),
        Err(_) => Vec::new(),
    };
    for p in drained {
        let _ = p.reply.send(Err(copy_error(t, why)));
    }
}

/// Why the reader ended, kept for requests that reach the connection after it did (a server
/// that breaks the protocol before a request is even sent must still read as a protocol error,
/// not as a lost connection worth retrying).
type Death = Arc<Mutex<Option<NbdError>>>;

/// The error a request gets on a connection that is already dead.
fn dead_error(death: &Death, t: &str) -> NbdError {
    match death.lock() {
        Ok(d) => match d.as_ref() {
            Some(why) => copy_error(t, why),
            None => NbdError::Closed { target: t.into() },
        },
        Err(_) => NbdError::Closed { target: t.into() },
    }
}

/// The error every request in flight gets when the connection ends: a protocol error stays
/// one (not worth retrying), anything else reads as a lost connection.
fn copy_error(t: &str, why: &NbdError) -> NbdError {
    match why {
        NbdError::Proto { source, .. } => NbdError::Proto {
            target: t.into(),
            source: source.clone(),
        },
        _ => NbdError::Io {
            target: t.into(),
            source: io::Error::other(why.to_string()),
        },
    }
}

async fn writer<W: AsyncWrite>(
    mut wr: WriteHalf<W>,
    mut rx: mpsc::Receiver<Job>,
    pending: PendingMap,
    sem: Arc<Semaphore>,
    (alive, death): (Arc<AtomicBool>, Death),
    t: String,
) {
    let mut cookie: u64 = 0;
    while let Some(job) = rx.recv().await {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        if !alive.load(Ordering::SeqCst) {
            let _ = job.reply.send(Err(dead_error(&death, &t)));
            continue;
        }
        // Cookies are never reused (DISC's u64::MAX is out of reach).
        cookie += 1;
        let (cmd, flags) = match job.kind {
            Kind::Read => (proto::CMD_READ, 0),
            Kind::Status => (proto::CMD_BLOCK_STATUS, 0),
        };
        let header = proto::request(cmd, flags, cookie, job.offset, job.len);
        if let Ok(mut m) = pending.lock() {
            m.insert(
                cookie,
                Pending {
                    buf: Vec::new(),
                    started: false,
                    covered: 0,
                    ranges: Vec::new(),
                    extents: None,
                    error: None,
                    error_chunks: 0,
                    kind: job.kind,
                    offset: job.offset,
                    len: job.len,
                    reply: job.reply,
                    _permit: permit,
                },
            );
        }
        // The reader may have ended between the check above and the insert: it marks the
        // connection dead before failing what is pending, so this request is failed here.
        if !alive.load(Ordering::SeqCst) {
            fail_all(&pending, &t, &dead_error(&death, &t));
            continue;
        }
        if let Err(e) = wr.write_all(&header).await {
            alive.store(false, Ordering::SeqCst);
            fail_all(&pending, &t, &io_err(&t, e));
            return;
        }
        // Flush only when nothing else is queued, so pipelined requests share packets.
        if rx.is_empty() && wr.flush().await.is_err() {
            alive.store(false, Ordering::SeqCst);
            fail_all(&pending, &t, &NbdError::Closed { target: t.clone() });
            return;
        }
    }
    // Every handle dropped: disconnect cleanly.
    let _ = wr
        .write_all(&proto::request(proto::CMD_DISC, 0, u64::MAX, 0, 0))
        .await;
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

/// What replies may contain, from negotiation.
#[derive(Debug, Clone, Copy)]
struct ReplyRules {
    structured: bool,
    status_context: Option<u32>,
}

/// Marks the connection dead and fails what is pending however the reader ends: an error, the
/// server closing, an abort (`kill`, the client dropped) or a panic.
struct ReaderEnd {
    pending: PendingMap,
    alive: Arc<AtomicBool>,
    death: Death,
    t: String,
    why: Option<NbdError>,
}

impl Drop for ReaderEnd {
    fn drop(&mut self) {
        let why = self.why.take().unwrap_or_else(|| NbdError::Io {
            target: self.t.clone(),
            source: io::Error::other("the connection was given up"),
        });
        // The reason first: whoever sees the connection dead finds it.
        if let Ok(mut d) = self.death.lock() {
            *d = Some(copy_error(&self.t, &why));
        }
        self.alive.store(false, Ordering::SeqCst);
        fail_all(&self.pending, &self.t, &why);
    }
}

async fn reader<R: AsyncRead>(
    mut rd: ReadHalf<R>,
    pending: PendingMap,
    (alive, death): (Arc<AtomicBool>, Death),
    rules: ReplyRules,
    t: String,
) {
    let mut end = ReaderEnd {
        pending: pending.clone(),
        alive,
        death,
        t: t.clone(),
        why: None,
    };
    let r = read_replies(&mut rd, &pending, rules, &t).await;
    if let Err(e) = &r {
        tracing::debug!(target = %t, error = %e, "nbd: connection ends");
    }
    end.why = Some(match r {
        Err(e) => e,
        Ok(()) => NbdError::Closed { target: t.clone() },
    });
}

/// Read replies until the server closes the connection between two replies (`Ok`) or breaks
/// the protocol (`Err`: the connection is not used again).
async fn read_replies<R: AsyncRead + Unpin>(
    rd: &mut R,
    pending: &PendingMap,
    rules: ReplyRules,
    t: &str,
) -> Result<(), NbdError> {
    let lock = |pending| lock_map(pending, t);
    loop {
        let mut m = [0u8; 4];
        match rd.read_exact(&mut m).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io_err(t, e)),
        }
        let magic = u32::from_be_bytes(m);
        let rest_len = proto::reply_rest_len(magic).map_err(|e| proto_err(t, e))?;
        let mut rest = [0u8; 16];
        let rest = rest
            .get_mut(..rest_len)
            .ok_or_else(|| proto_err(t, ProtoError::Malformed("reply header")))?;
        rd.read_exact(rest).await.map_err(|e| io_err(t, e))?;
        let header = proto::parse_reply_header(magic, rest).map_err(|e| proto_err(t, e))?;
        match header {
            ReplyHeader::Simple { error, cookie } => {
                let p = {
                    let mut map = lock(pending)?;
                    match map.get(&cookie) {
                        None => return Err(proto_err(t, ProtoError::UnknownCookie(cookie))),
                        Some(p) if p.started => {
                            return Err(proto_err(
                                t,
                                ProtoError::Malformed(
                                    "simple reply to a request already answered in chunks",
                                ),
                            ));
                        }
                        Some(p) if error == 0 && p.kind == Kind::Status => {
                            return Err(proto_err(
                                t,
                                ProtoError::Malformed("simple reply to block status"),
                            ));
                        }
                        Some(_) => {}
                    }
                    map.remove(&cookie)
                };
                let Some(p) = p else {
                    return Err(proto_err(t, ProtoError::UnknownCookie(cookie)));
                };
                if error != 0 {
                    let _ = p.reply.send(Err(NbdError::Server {
                        target: t.into(),
                        name: proto::error_name(error),
                        offset: p.offset,
                        len: p.len,
                        message: String::new(),
                    }));
                    continue;
                }
                // A read: its data follows, exactly the length asked for.
                let mut buf = super::buffers::take(p.len as usize);
                if let Err(e) = rd.read_exact(&mut buf).await {
                    let e = io_err(t, e);
                    let _ = p.reply.send(Err(copy_error(t, &e)));
                    return Err(e);
                }
                let _ = p.reply.send(Ok(Reply::Data(buf)));
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                len,
            } => {
                if !rules.structured {
                    return Err(proto_err(
                        t,
                        ProtoError::Malformed("structured reply not negotiated"),
                    ));
                }
                let (req_off, req_len, req_kind) = {
                    let mut map = lock(pending)?;
                    let Some(p) = map.get_mut(&cookie) else {
                        return Err(proto_err(t, ProtoError::UnknownCookie(cookie)));
                    };
                    p.started = true;
                    (p.offset, p.len, p.kind)
                };
                let read = req_kind == Kind::Read;
                // Bounded by what the request justifies before anything is allocated.
                let max = proto::chunk_len_max(kind, read, req_len).map_err(|e| proto_err(t, e))?;
                if len as u64 > max {
                    return Err(proto_err(t, ProtoError::ChunkTooLong { kind, len, max }));
                }
                let done = flags & proto::REPLY_FLAG_DONE != 0;
                if kind == proto::CHUNK_OFFSET_DATA && len > 8 {
                    // Data goes straight into the request's buffer: no copy, no second buffer.
                    let mut ob = [0u8; 8];
                    rd.read_exact(&mut ob).await.map_err(|e| io_err(t, e))?;
                    let offset = u64::from_be_bytes(ob);
                    let dlen = u64::from(len - 8);
                    let at = offset
                        .checked_sub(req_off)
                        .filter(|at| {
                            at.checked_add(dlen)
                                .is_some_and(|e| e <= u64::from(req_len))
                        })
                        .ok_or_else(|| {
                            proto_err(t, ProtoError::Malformed("data chunk outside its request"))
                        })?;
                    // The buffer leaves the request while the socket fills it; the request
                    // stays pending, so an error here still reaches its caller.
                    let mut buf = {
                        let mut map = lock(pending)?;
                        let p = map
                            .get_mut(&cookie)
                            .ok_or_else(|| proto_err(t, ProtoError::UnknownCookie(cookie)))?;
                        p.cover(at, dlen, t)?;
                        if p.buf.is_empty() {
                            super::buffers::take(p.len as usize)
                        } else {
                            std::mem::take(&mut p.buf)
                        }
                    };
                    let (a, e) = (at as usize, (at + dlen) as usize);
                    let slot = buf.get_mut(a..e).ok_or_else(|| {
                        proto_err(t, ProtoError::Malformed("data chunk outside its request"))
                    })?;
                    rd.read_exact(slot).await.map_err(|e| io_err(t, e))?;
                    let mut map = lock(pending)?;
                    let p = map
                        .get_mut(&cookie)
                        .ok_or_else(|| proto_err(t, ProtoError::UnknownCookie(cookie)))?;
                    p.buf = buf;
                    if done && let Some(p) = map.remove(&cookie) {
                        drop(map);
                        complete(p, t)?;
                    }
                    continue;
                }
                let mut payload = vec![0u8; len as usize];
                rd.read_exact(&mut payload)
                    .await
                    .map_err(|e| io_err(t, e))?;
                let chunk = proto::parse_chunk(kind, &payload, req_off, req_len)
                    .map_err(|e| proto_err(t, e))?;
                let mut map = lock(pending)?;
                let Some(p) = map.get_mut(&cookie) else {
                    return Err(proto_err(t, ProtoError::UnknownCookie(cookie)));
                };
                p.apply(chunk, done, rules, t)?;
                if done && let Some(p) = map.remove(&cookie) {
                    drop(map);
                    complete(p, t)?;
                }
            }
        }
    }
}

fn lock_map<'a>(
    pending: &'a PendingMap,
    t: &str,
) -> Result<std::sync::MutexGuard<'a, HashMap<u64, Pending>>, NbdError> {
    pending
        .lock()
        .map_err(|_| proto_err(t, ProtoError::Malformed("internal lock")))
}

impl Pending {
    /// Record that `[at, at+len)` of the request arrived; overlapping chunks are a protocol
    /// error (a server may not send a range twice, and a gap must never pass as covered).
    fn cover(&mut self, at: u64, len: u64, t: &str) -> Result<(), NbdError> {
        let end = at
            .checked_add(len)
            .filter(|&e| e <= u64::from(self.len))
            .ok_or_else(|| proto_err(t, ProtoError::Malformed("chunk outside its request")))?;
        if self.ranges.iter().any(|&(s, l)| at < s + l && s < end) {
            return Err(proto_err(
                t,
                ProtoError::Malformed("overlapping chunks in a read reply"),
            ));
        }
        // In-order chunks (the usual case) extend the last range: the list stays short.
        let n = self.ranges.len();
        match self.ranges.last_mut() {
            Some((s, l)) if *s + *l == at => *l += len,
            _ if n >= MAX_RANGES => {
                return Err(proto_err(
                    t,
                    ProtoError::TooLong {
                        what: "read reply in separate pieces",
                        len: MAX_RANGES as u64 + 1,
                        max: MAX_RANGES as u64,
                    },
                ));
            }
            _ => self.ranges.push((at, len)),
        }
        self.covered += len;
        Ok(())
    }

    /// Apply one chunk (other than data read straight into the buffer) to the request.
    fn apply(
        &mut self,
        chunk: proto::Chunk<'_>,
        done: bool,
        rules: ReplyRules,
        t: &str,
    ) -> Result<(), NbdError> {
        let malformed = |what| Err(proto_err(t, ProtoError::Malformed(what)));
        match chunk {
            // NONE only ever ends a reply.
            proto::Chunk::None if !done => return malformed("NONE chunk without the DONE flag"),
            proto::Chunk::None => {}
            proto::Chunk::Data { offset, data } => {
                let at = offset.checked_sub(self.offset).ok_or_else(|| {
                    proto_err(t, ProtoError::Malformed("data chunk outside its request"))
                })?;
                self.cover(at, data.len() as u64, t)?;
                if self.buf.is_empty() {
                    self.buf = super::buffers::take(self.len as usize);
                }
                let slot = (at as usize)
                    .checked_add(data.len())
                    .and_then(|e| self.buf.get_mut(at as usize..e))
                    .ok_or_else(|| {
                        proto_err(t, ProtoError::Malformed("data chunk outside its request"))
                    })?;
                slot.copy_from_slice(data);
            }
            proto::Chunk::Hole { offset, len } => {
                let at = offset.checked_sub(self.offset).ok_or_else(|| {
                    proto_err(t, ProtoError::Malformed("hole chunk outside its request"))
                })?;
                self.cover(at, u64::from(len), t)?;
                if self.buf.is_empty() {
                    self.buf = super::buffers::take(self.len as usize);
                }
                let slot = (at as usize)
                    .checked_add(len as usize)
                    .and_then(|e| self.buf.get_mut(at as usize..e))
                    .ok_or_else(|| {
                        proto_err(t, ProtoError::Malformed("hole chunk outside its request"))
                    })?;
                // Reused buffers hold stale bytes: a hole is written as zeros.
                slot.fill(0);
            }
            proto::Chunk::Status { context, extents } => {
                if rules.status_context != Some(context) {
                    return malformed("block status for a metadata context not agreed");
                }
                // Exactly one status chunk per context per request.
                if self.extents.is_some() {
                    return malformed("a second block status chunk for one request");
                }
                // Extents follow each other from the request's offset; only the last may
                // reach past the request's end.
                let mut start = 0u64;
                for &(l, _) in &extents {
                    if start >= u64::from(self.len) {
                        return malformed("block status extents past the request's end");
                    }
                    start += u64::from(l);
                }
                self.extents = Some(extents);
            }
            proto::Chunk::Error { error, message } => {
                self.error_chunks += 1;
                if self.error_chunks > MAX_ERROR_CHUNKS {
                    return malformed("reply with too many error chunks");
                }
                self.error = Some(NbdError::Server {
                    target: t.into(),
                    name: proto::error_name(error),
                    offset: self.offset,
                    len: self.len,
                    message: if message.is_empty() {
                        message
                    } else {
                        format!(": {message}")
                    },
                });
            }
        }
        Ok(())
    }
}

/// A request's last chunk arrived: answer it.
fn complete(mut p: Pending, t: &str) -> Result<(), NbdError> {
    let r = match (p.error.take(), p.kind) {
        (Some(e), _) => Err(e),
        (None, Kind::Read) => {
            // Chunks must cover the request exactly: never fill gaps with guesses.
            if p.covered != u64::from(p.len) {
                let e = proto_err(
                    t,
                    ProtoError::Malformed("read reply does not cover the request"),
                );
                let _ = p.reply.send(Err(copy_error(t, &e)));
                return Err(e);
            }
            if p.buf.is_empty() {
                p.buf = vec![0u8; p.len as usize];
            }
            Ok(Reply::Data(p.buf))
        }
        (None, Kind::Status) => match p.extents {
            Some(e) => Ok(Reply::Status(e)),
            None => {
                let e = proto_err(
                    t,
                    ProtoError::Malformed("block status reply without a status chunk"),
                );
                let _ = p.reply.send(Err(copy_error(t, &e)));
                return Err(e);
            }
        },
    };
    let _ = p.reply.send(r);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    const CTX: u32 = 9;

    fn negotiated(structured: bool) -> Negotiated {
        Negotiated {
            info: ExportInfo {
                size: 1 << 20,
                flags: 3,
                min_block: 0,
                max_block: 0,
            },
            structured,
            status_context: structured.then_some(CTX),
        }
    }

    /// A client over an in-memory stream, and the server's end of it.
    fn pair(structured: bool) -> (Client, DuplexStream) {
        let (c, s) = tokio::io::duplex(4 << 20);
        (Client::over(c, negotiated(structured), 4, "test".into()), s)
    }

    /// The next request the client sent: (command, cookie, offset, length).
    async fn request(s: &mut DuplexStream) -> (u16, u64, u64, u32) {
        let mut r = [0u8; 28];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[..4], &[0x25, 0x60, 0x95, 0x13]);
        (
            u16::from_be_bytes([r[6], r[7]]),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
            u64::from_be_bytes(r[16..24].try_into().unwrap()),
            u32::from_be_bytes(r[24..28].try_into().unwrap()),
        )
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0x66, 0x8e, 0x33, 0xef];
        b.extend(flags.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend((payload.len() as u32).to_be_bytes());
        b.extend(payload);
        b
    }

    fn status_payload(extents: &[(u32, u32)]) -> Vec<u8> {
        let mut p = CTX.to_be_bytes().to_vec();
        for (l, f) in extents {
            p.extend(l.to_be_bytes());
            p.extend(f.to_be_bytes());
        }
        p
    }

    async fn read_result(c: &Client, off: u64, len: u32) -> Result<Reply, NbdError> {
        c.read(off, len).await.await.unwrap()
    }

    fn proto_text(r: Result<impl std::fmt::Debug, NbdError>) -> String {
        match r {
            Err(e @ NbdError::Proto { .. }) => e.to_string(),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    /// Defect 5: an offset that wraps with the chunk's length was a panic in the reader task,
    /// and the dead connection still counted as alive.
    #[tokio::test]
    async fn a_wrapping_data_offset_is_an_error_and_the_connection_is_dead() {
        let (c, mut s) = pair(true);
        let rx = c.read(4096, 4096).await;
        let (_, cookie, _, _) = request(&mut s).await;
        let mut p = (u64::MAX - 100).to_be_bytes().to_vec();
        p.extend(vec![7u8; 4096]);
        s.write_all(&chunk(1, proto::CHUNK_OFFSET_DATA, cookie, &p))
            .await
            .unwrap();
        let e = proto_text(rx.await.unwrap());
        assert!(e.contains("data chunk outside its request"), "{e}");
        assert!(!c.is_alive());
        // A request on the dead connection fails at once with the same reason, never waits
        // for a timeout.
        let e = read_result(&c, 0, 512).await.unwrap_err();
        assert!(matches!(e, NbdError::Proto { .. }), "{e}");
        assert!(
            e.to_string().contains("data chunk outside its request"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_killed_connection_fails_what_is_in_flight() {
        let (c, mut s) = pair(true);
        let rx = c.read(0, 512).await;
        request(&mut s).await;
        assert!(c.is_alive());
        c.kill();
        let e = rx.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("given up"), "{e}");
        assert!(!c.is_alive());
    }

    /// Defect 6: an empty extent let the caller ask again and again for the same offset.
    #[tokio::test]
    async fn a_zero_length_extent_is_an_error() {
        let (c, mut s) = pair(true);
        let server = tokio::spawn(async move {
            let (cmd, cookie, _, _) = request(&mut s).await;
            assert_eq!(cmd, proto::CMD_BLOCK_STATUS);
            let p = status_payload(&[(0, 0)]);
            s.write_all(&chunk(1, proto::CHUNK_BLOCK_STATUS, cookie, &p))
                .await
                .unwrap();
            s
        });
        let e = proto_text(c.block_status(0, 1 << 20).await);
        assert!(e.contains("zero-length extent"), "{e}");
        drop(server.await.unwrap());
    }

    /// Defect 7: status chunks without DONE were kept without bound.
    #[tokio::test]
    async fn status_chunks_without_done_are_refused_at_the_second() {
        let (c, mut s) = pair(true);
        let server = tokio::spawn(async move {
            let (_, cookie, _, _) = request(&mut s).await;
            let p = status_payload(&[(512, 0); 64]);
            let one = chunk(0, proto::CHUNK_BLOCK_STATUS, cookie, &p);
            // Until the client hangs up.
            while s.write_all(&one).await.is_ok() {}
        });
        let e = proto_text(c.block_status(0, 1 << 20).await);
        assert!(e.contains("a second block status chunk"), "{e}");
        drop(c);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn block_status_replies_are_checked() {
        // Another context's bits, extents past the request, no status chunk at all, a NONE
        // chunk that does not end the reply.
        let cases: [(Vec<u8>, &str); 4] = [
            (
                {
                    let mut p = status_payload(&[(512, 0)]);
                    p[..4].copy_from_slice(&(CTX + 1).to_be_bytes());
                    chunk(1, proto::CHUNK_BLOCK_STATUS, 1, &p)
                },
                "metadata context not agreed",
            ),
            (
                chunk(
                    1,
                    proto::CHUNK_BLOCK_STATUS,
                    1,
                    &status_payload(&[(4096, 0), (512, 0)]),
                ),
                "past the request's end",
            ),
            (
                chunk(1, proto::CHUNK_NONE, 1, &[]),
                "without a status chunk",
            ),
            (
                chunk(0, proto::CHUNK_NONE, 1, &[]),
                "NONE chunk without the DONE",
            ),
        ];
        for (reply, want) in cases {
            let (c, mut s) = pair(true);
            let server = tokio::spawn(async move {
                let (_, cookie, _, _) = request(&mut s).await;
                assert_eq!(cookie, 1);
                s.write_all(&reply).await.unwrap();
                s
            });
            let e = proto_text(c.block_status(0, 4096).await);
            assert!(e.contains(want), "{want}: {e}");
            drop(server.await.unwrap());
        }
        // The last extent may reach past the request: that is allowed.
        let (c, mut s) = pair(true);
        let server = tokio::spawn(async move {
            let (_, cookie, _, _) = request(&mut s).await;
            let p = status_payload(&[(1024, 0), (1 << 20, 1)]);
            s.write_all(&chunk(1, proto::CHUNK_BLOCK_STATUS, cookie, &p))
                .await
                .unwrap();
            s
        });
        assert_eq!(
            c.block_status(0, 4096).await.unwrap(),
            vec![(1024, 0), (1 << 20, 1)]
        );
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn unknown_cookies_and_chunks_after_done_are_errors() {
        // A simple reply to a cookie never used.
        let (c, mut s) = pair(false);
        let rx = c.read(0, 512).await;
        let (_, cookie, _, _) = request(&mut s).await;
        let mut b = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0];
        b.extend((cookie + 77).to_be_bytes());
        b.extend([0u8; 512]);
        s.write_all(&b).await.unwrap();
        let e = proto_text(rx.await.unwrap());
        assert!(e.contains("names no request in flight"), "{e}");

        // A whole reply, then one more chunk for the finished request.
        let (c, mut s) = pair(true);
        let rx = c.read(0, 512).await;
        let (_, cookie, _, _) = request(&mut s).await;
        let mut p = 0u64.to_be_bytes().to_vec();
        p.extend([5u8; 512]);
        s.write_all(&chunk(1, proto::CHUNK_OFFSET_DATA, cookie, &p))
            .await
            .unwrap();
        match rx.await.unwrap() {
            Ok(Reply::Data(d)) => assert_eq!(d, vec![5u8; 512]),
            other => panic!("{other:?}"),
        }
        let rx = c.read(512, 512).await;
        request(&mut s).await;
        s.write_all(&chunk(1, proto::CHUNK_NONE, cookie, &[]))
            .await
            .unwrap();
        let e = proto_text(rx.await.unwrap());
        assert!(e.contains(&format!("cookie {cookie:#x}")), "{e}");
        assert!(!c.is_alive());
    }

    /// A reply before any request kills the connection; a request made afterwards must fail
    /// with that protocol error (not retried), not as a lost connection (retried 5 times).
    #[tokio::test]
    async fn a_request_after_the_reader_died_of_a_protocol_error_gets_that_error() {
        let (c, mut s) = pair(false);
        let mut b = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0];
        b.extend(999u64.to_be_bytes());
        s.write_all(&b).await.unwrap();
        while c.is_alive() {
            tokio::task::yield_now().await;
        }
        let e = c.read(0, 512).await.await.unwrap().unwrap_err();
        assert!(!e.is_transient(), "{e}");
        assert!(e.to_string().contains("names no request in flight"), "{e}");
    }

    #[tokio::test]
    async fn chunks_longer_than_the_request_are_refused_before_reading_them() {
        let (c, mut s) = pair(true);
        let rx = c.read(0, 4096).await;
        let (_, cookie, _, _) = request(&mut s).await;
        // Announces 4096 + 8 + 1 bytes; only the header is sent.
        let mut h = chunk(1, proto::CHUNK_OFFSET_DATA, cookie, &[]);
        let n = h.len();
        h[n - 4..].copy_from_slice(&(4096u32 + 9).to_be_bytes());
        s.write_all(&h).await.unwrap();
        let e = proto_text(rx.await.unwrap());
        assert!(e.contains("where at most 4104 fit"), "{e}");
    }

    #[tokio::test]
    async fn out_of_order_data_and_hole_chunks_assemble_exactly() {
        let (c, mut s) = pair(true);
        let rx = c.read(8192, 3072).await;
        let (_, cookie, off, _) = request(&mut s).await;
        assert_eq!(off, 8192);
        let mut tail = (8192u64 + 2048).to_be_bytes().to_vec();
        tail.extend([3u8; 1024]);
        let mut hole = (8192u64 + 1024).to_be_bytes().to_vec();
        hole.extend(1024u32.to_be_bytes());
        let mut head = 8192u64.to_be_bytes().to_vec();
        head.extend([1u8; 1024]);
        let mut b = chunk(0, proto::CHUNK_OFFSET_DATA, cookie, &tail);
        b.extend(chunk(0, proto::CHUNK_OFFSET_HOLE, cookie, &hole));
        b.extend(chunk(1, proto::CHUNK_OFFSET_DATA, cookie, &head));
        s.write_all(&b).await.unwrap();
        let mut want = vec![1u8; 1024];
        want.extend([0u8; 1024]);
        want.extend([3u8; 1024]);
        match rx.await.unwrap() {
            Ok(Reply::Data(d)) => assert_eq!(d, want),
            other => panic!("{other:?}"),
        }
        assert!(c.is_alive());
    }

    #[tokio::test]
    async fn error_chunks_have_bounded_messages() {
        let (c, mut s) = pair(true);
        let rx = c.read(0, 512).await;
        let (_, cookie, _, _) = request(&mut s).await;
        // The message length says 100 bytes; 3 follow.
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend(100u16.to_be_bytes());
        p.extend(b"abc");
        s.write_all(&chunk(1, proto::CHUNK_ERROR, cookie, &p))
            .await
            .unwrap();
        let e = proto_text(rx.await.unwrap());
        assert!(e.contains("error chunk (message length)"), "{e}");
        // A well-formed one reaches the caller as the server's error, escaped.
        let (c, mut s) = pair(true);
        let rx = c.read(0, 512).await;
        let (_, cookie, _, _) = request(&mut s).await;
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend(8u16.to_be_bytes());
        p.extend(b"bad\x1b[2Jx");
        s.write_all(&chunk(1, proto::CHUNK_ERROR, cookie, &p))
            .await
            .unwrap();
        let e = rx.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("EIO") && e.contains("bad\\u{1b}[2Jx"), "{e}");
    }

    /// A handshake whose server side is `server` (after the client's first bytes); returns
    /// what negotiation gave.
    async fn handshake_with(server: Vec<u8>) -> Result<Negotiated, NbdError> {
        let (mut c, mut s) = tokio::io::duplex(1 << 20);
        s.write_all(&server).await.unwrap();
        // The client's own bytes are not checked here; keep reading them so it never blocks.
        let drain = tokio::spawn(async move {
            let mut sink = [0u8; 4096];
            while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let r = handshake_plain(&mut c, "disk", "test").await;
        drop(c);
        drain.await.unwrap();
        r
    }

    fn opt_reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut b = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        b.extend(opt.to_be_bytes());
        b.extend(kind.to_be_bytes());
        b.extend((data.len() as u32).to_be_bytes());
        b.extend(data);
        b
    }

    fn greeting() -> Vec<u8> {
        let mut g = b"NBDMAGICIHAVEOPT".to_vec();
        g.extend(3u16.to_be_bytes());
        g
    }

    /// Defect 8: GO acknowledged without NBD_INFO_EXPORT left the size at 0.
    #[tokio::test]
    async fn go_without_the_export_size_is_refused() {
        let mut b = greeting();
        b.extend(opt_reply(
            proto::OPT_STRUCTURED_REPLY,
            proto::REP_ERR_UNSUP,
            &[],
        ));
        b.extend(opt_reply(proto::OPT_GO, proto::REP_ACK, &[]));
        let e = handshake_with(b).await.unwrap_err().to_string();
        assert!(e.contains("without stating its size"), "{e}");

        let mut b = greeting();
        b.extend(opt_reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]));
        // A context other than the one asked for is not taken for base:allocation.
        let mut m = 4u32.to_be_bytes().to_vec();
        m.extend(b"qemu:dirty-bitmap:x");
        b.extend(opt_reply(
            proto::OPT_SET_META_CONTEXT,
            proto::REP_META_CONTEXT,
            &m,
        ));
        b.extend(opt_reply(proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]));
        let mut i = proto::INFO_EXPORT.to_be_bytes().to_vec();
        i.extend(12345u64.to_be_bytes());
        i.extend(3u16.to_be_bytes());
        b.extend(opt_reply(proto::OPT_GO, proto::REP_INFO, &i));
        b.extend(opt_reply(proto::OPT_GO, proto::REP_ACK, &[]));
        let n = handshake_with(b).await.unwrap();
        assert_eq!(n.info.size, 12345);
        assert!(n.structured);
        assert_eq!(n.status_context, None);
    }

    #[tokio::test]
    async fn endless_option_replies_are_cut_off() {
        let mut b = greeting();
        b.extend(opt_reply(
            proto::OPT_STRUCTURED_REPLY,
            proto::REP_ERR_UNSUP,
            &[],
        ));
        for _ in 0..100 {
            b.extend(opt_reply(proto::OPT_GO, 77, b"x"));
        }
        let e = handshake_with(b).await.unwrap_err().to_string();
        assert!(e.contains("replies to NBD_OPT_GO"), "{e}");
    }
}
