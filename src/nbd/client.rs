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

/// Ciphertext read from the socket per system call, at most.
const TLS_READ_BUFFER: usize = 256 << 10;

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

struct Pending {
    kind: Kind,
    offset: u64,
    len: u32,
    buf: Vec<u8>,
    /// Bytes of a structured read covered by data and hole chunks so far.
    covered: u64,
    /// The ranges covered (request-relative), so overlapping chunks cannot fake full coverage
    /// and leave stale or unset bytes in a gap.
    ranges: Vec<(u64, u64)>,
    extents: Vec<(u32, u32)>,
    error: Option<NbdError>,
    reply: oneshot::Sender<Result<Reply, NbdError>>,
    _permit: OwnedSemaphorePermit,
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

/// A negotiated connection.
pub struct Client {
    tx: mpsc::Sender<Job>,
    writer: tokio::task::JoinHandle<()>,
    pub info: ExportInfo,
    pub structured: bool,
    pub status_context: Option<u32>,
    alive: Arc<AtomicBool>,
    target: String,
}

struct Negotiated {
    info: ExportInfo,
    structured: bool,
    status_context: Option<u32>,
}

async fn send<S: Stream>(s: &mut S, bytes: &[u8], t: &str) -> Result<(), NbdError> {
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

/// Read one option reply: (type, payload).
async fn option_reply<S: Stream>(s: &mut S, opt: u32, t: &str) -> Result<(u32, Vec<u8>), NbdError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.map_err(|e| io_err(t, e))?;
    let (kind, len) = proto::parse_option_reply_header(&h, opt).map_err(|e| proto_err(t, e))?;
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).await.map_err(|e| io_err(t, e))?;
    Ok((kind, p))
}

fn reply_error_text(kind: u32, payload: &[u8]) -> String {
    let msg = String::from_utf8_lossy(payload);
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
        let data = proto::meta_context_data(export, "base:allocation");
        send(s, &proto::option(proto::OPT_SET_META_CONTEXT, &data), t).await?;
        loop {
            match option_reply(s, proto::OPT_SET_META_CONTEXT, t).await? {
                (proto::REP_META_CONTEXT, p) if p.len() >= 4 => {
                    status_context = Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
                }
                (proto::REP_ACK, _) => break,
                (k, _) if k & proto::REP_ERR_BIT != 0 => break,
                _ => {}
            }
        }
    }
    let mut info = ExportInfo::default();
    send(s, &proto::option(proto::OPT_GO, &proto::go_data(export)), t).await?;
    loop {
        match option_reply(s, proto::OPT_GO, t).await? {
            (proto::REP_INFO, p) => {
                proto::parse_info(&p, &mut info).map_err(|e| proto_err(t, e))?
            }
            (proto::REP_ACK, _) => {
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
        match tokio::time::timeout(CONNECT_TIMEOUT, Client::connect_inner(target, depth)).await {
            Ok(r) => r,
            Err(_) => Err(NbdError::Connect {
                target: target.describe(),
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no NBD handshake within {} s (does the server allow this many connections?)",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                ),
            }),
        }
    }

    async fn connect_inner(target: &Target, depth: usize) -> Result<Client, NbdError> {
        let t = target.describe();
        let mut s = connect_raw(target, &t).await?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.map_err(|e| io_err(&t, e))?;
        let flags = proto::parse_greeting(&g).map_err(|e| proto_err(&t, e))?;
        let no_zeroes = flags & proto::FLAG_NO_ZEROES != 0;
        let mut cflags = proto::CLIENT_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= proto::CLIENT_NO_ZEROES;
        }
        send(&mut s, &cflags.to_be_bytes(), &t).await?;
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
                // rustls reads the socket a record (≤ 16 KiB) at a time; a buffer below it
                // turns that into one system call per 256 KiB.
                let buffered = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, s);
                let tls = connector
                    .connect(name, buffered)
                    .await
                    .map_err(|e| NbdError::Tls {
                        target: t.clone(),
                        detail: e.to_string(),
                    })?;
                Box::new(tls)
            }
        };
        let n = negotiate(&mut s, &target.export, no_zeroes, &t).await?;
        let (rd, wr) = tokio::io::split(s);
        let (tx, rx) = mpsc::channel::<Job>(depth.max(1) * 2);
        let pending: PendingMap = Arc::new(Mutex::new(HashMap::new()));
        let alive = Arc::new(AtomicBool::new(true));
        let sem = Arc::new(Semaphore::new(depth.max(1)));
        let writer = tokio::spawn(writer(
            wr,
            rx,
            pending.clone(),
            sem,
            alive.clone(),
            t.clone(),
        ));
        tokio::spawn(reader(rd, pending, alive.clone(), n.structured, t.clone()));
        Ok(Client {
            tx,
            writer,
            info: n.info,
            structured: n.structured,
            status_context: n.status_context,
            alive,
            target: t,
        })
    }

    /// Disconnect cleanly: NBD_CMD_DISC, then TLS close_notify. (A host keeps a VBD plugged
    /// per connection until it ends, and `data_destroy` waits for that.)
    pub async fn close(self) {
        let Client { tx, writer, .. } = self;
        drop(tx);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
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

    /// `base:allocation` extents from `offset` (the server may cover less than `len`).
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
        let e = match why {
            NbdError::Proto { source, .. } => NbdError::Proto {
                target: t.into(),
                source: source.clone(),
            },
            _ => NbdError::Io {
                target: t.into(),
                source: io::Error::other(why.to_string()),
            },
        };
        let _ = p.reply.send(Err(e));
    }
}

async fn writer(
    mut wr: WriteHalf<Box<dyn Stream>>,
    mut rx: mpsc::Receiver<Job>,
    pending: PendingMap,
    sem: Arc<Semaphore>,
    alive: Arc<AtomicBool>,
    t: String,
) {
    let mut cookie: u64 = 0;
    while let Some(job) = rx.recv().await {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        if !alive.load(Ordering::Relaxed) {
            let _ = job.reply.send(Err(NbdError::Closed { target: t.clone() }));
            continue;
        }
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
                    covered: 0,
                    ranges: Vec::new(),
                    extents: Vec::new(),
                    error: None,
                    kind: job.kind,
                    offset: job.offset,
                    len: job.len,
                    reply: job.reply,
                    _permit: permit,
                },
            );
        }
        if let Err(e) = wr.write_all(&header).await {
            alive.store(false, Ordering::Relaxed);
            fail_all(&pending, &t, &io_err(&t, e));
            return;
        }
        // Flush only when nothing else is queued, so pipelined requests share packets.
        if rx.is_empty() && wr.flush().await.is_err() {
            alive.store(false, Ordering::Relaxed);
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

async fn reader(
    mut rd: ReadHalf<Box<dyn Stream>>,
    pending: PendingMap,
    alive: Arc<AtomicBool>,
    structured: bool,
    t: String,
) {
    let r = read_replies(&mut rd, &pending, structured, &t).await;
    alive.store(false, Ordering::Relaxed);
    let why = match r {
        Err(e) => e,
        Ok(()) => NbdError::Closed { target: t.clone() },
    };
    fail_all(&pending, &t, &why);
}

async fn read_replies(
    rd: &mut ReadHalf<Box<dyn Stream>>,
    pending: &PendingMap,
    structured: bool,
    t: &str,
) -> Result<(), NbdError> {
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
        rd.read_exact(&mut rest[..rest_len])
            .await
            .map_err(|e| io_err(t, e))?;
        let header =
            proto::parse_reply_header(magic, &rest[..rest_len]).map_err(|e| proto_err(t, e))?;
        match header {
            ReplyHeader::Simple { error, cookie } => {
                let Some(p) = pending.lock().ok().and_then(|mut m| m.remove(&cookie)) else {
                    return Err(proto_err(
                        t,
                        ProtoError::Malformed("reply to an unknown request"),
                    ));
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
                match p.kind {
                    Kind::Read => {
                        let mut buf = super::buffers::take(p.len as usize);
                        rd.read_exact(&mut buf).await.map_err(|e| io_err(t, e))?;
                        let _ = p.reply.send(Ok(Reply::Data(buf)));
                    }
                    Kind::Status => {
                        return Err(proto_err(
                            t,
                            ProtoError::Malformed("simple reply to block status"),
                        ));
                    }
                }
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                cookie,
                len,
            } => {
                if !structured {
                    return Err(proto_err(
                        t,
                        ProtoError::Malformed("structured reply not negotiated"),
                    ));
                }
                let (req_off, req_len) = match pending
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&cookie).map(|p| (p.offset, p.len)))
                {
                    Some(x) => x,
                    None => {
                        return Err(proto_err(
                            t,
                            ProtoError::Malformed("reply to an unknown request"),
                        ));
                    }
                };
                if kind == proto::CHUNK_OFFSET_DATA && len > 8 {
                    // Data goes straight into the request's buffer: no copy, no second buffer.
                    let mut ob = [0u8; 8];
                    rd.read_exact(&mut ob).await.map_err(|e| io_err(t, e))?;
                    let offset = u64::from_be_bytes(ob);
                    let dlen = (len - 8) as u64;
                    if offset < req_off || offset + dlen > req_off + req_len as u64 {
                        return Err(proto_err(
                            t,
                            ProtoError::Malformed("data chunk outside its request"),
                        ));
                    }
                    let Some(mut p) = pending.lock().ok().and_then(|mut m| m.remove(&cookie))
                    else {
                        return Err(proto_err(
                            t,
                            ProtoError::Malformed("reply to an unknown request"),
                        ));
                    };
                    if p.buf.is_empty() {
                        p.buf = super::buffers::take(p.len as usize);
                    }
                    let at = (offset - p.offset) as usize;
                    p.cover(at as u64, dlen, t)?;
                    rd.read_exact(&mut p.buf[at..at + dlen as usize])
                        .await
                        .map_err(|e| io_err(t, e))?;
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        complete(p, t)?;
                    } else if let Ok(mut m) = pending.lock() {
                        m.insert(cookie, p);
                    }
                    continue;
                }
                let mut payload = vec![0u8; len as usize];
                rd.read_exact(&mut payload)
                    .await
                    .map_err(|e| io_err(t, e))?;
                let chunk = proto::parse_chunk(kind, &payload, req_off, req_len)
                    .map_err(|e| proto_err(t, e))?;
                let mut map = pending
                    .lock()
                    .map_err(|_| proto_err(t, ProtoError::Malformed("internal lock")))?;
                let Some(p) = map.get_mut(&cookie) else {
                    return Err(proto_err(
                        t,
                        ProtoError::Malformed("reply to an unknown request"),
                    ));
                };
                match chunk {
                    proto::Chunk::None => {}
                    proto::Chunk::Data { offset, data } => {
                        if p.buf.is_empty() {
                            p.buf = super::buffers::take(p.len as usize);
                        }
                        let at = (offset - p.offset) as usize;
                        p.cover(at as u64, data.len() as u64, t)?;
                        p.buf[at..at + data.len()].copy_from_slice(data);
                    }
                    proto::Chunk::Hole { offset, len } => {
                        if p.buf.is_empty() {
                            p.buf = super::buffers::take(p.len as usize);
                        }
                        let at = (offset - p.offset) as usize;
                        p.cover(at as u64, len as u64, t)?;
                        // Reused buffers hold stale bytes: a hole is written as zeros.
                        p.buf[at..at + len as usize].fill(0);
                    }
                    proto::Chunk::Status { extents, .. } => p.extents.extend(extents),
                    proto::Chunk::Error { error, message } => {
                        p.error = Some(NbdError::Server {
                            target: t.into(),
                            name: proto::error_name(error),
                            offset: p.offset,
                            len: p.len,
                            message: if message.is_empty() {
                                message
                            } else {
                                format!(": {message}")
                            },
                        })
                    }
                }
                if flags & proto::REPLY_FLAG_DONE != 0
                    && let Some(p) = map.remove(&cookie)
                {
                    drop(map);
                    complete(p, t)?;
                }
            }
        }
    }
}

impl Pending {
    /// Record that `[at, at+len)` of the request arrived; overlapping chunks are a protocol
    /// error (a server may not send a range twice, and a gap must never pass as covered).
    fn cover(&mut self, at: u64, len: u64, t: &str) -> Result<(), NbdError> {
        if self.ranges.iter().any(|&(s, l)| at < s + l && s < at + len) {
            return Err(proto_err(
                t,
                ProtoError::Malformed("overlapping chunks in a read reply"),
            ));
        }
        // In-order chunks (the usual case) extend the last range: the list stays short.
        match self.ranges.last_mut() {
            Some((s, l)) if *s + *l == at => *l += len,
            _ => self.ranges.push((at, len)),
        }
        self.covered += len;
        Ok(())
    }
}

/// A request's last chunk arrived: answer it.
fn complete(mut p: Pending, t: &str) -> Result<(), NbdError> {
    let r = match (p.error.take(), p.kind) {
        (Some(e), _) => Err(e),
        (None, Kind::Read) => {
            // Chunks must cover the request exactly: never fill gaps with guesses.
            if p.covered != p.len as u64 {
                return Err(proto_err(
                    t,
                    ProtoError::Malformed("read reply does not cover the request"),
                ));
            }
            if p.buf.is_empty() {
                p.buf = vec![0u8; p.len as usize];
            }
            Ok(Reply::Data(p.buf))
        }
        (None, Kind::Status) => Ok(Reply::Status(p.extents)),
    };
    let _ = p.reply.send(r);
    Ok(())
}
