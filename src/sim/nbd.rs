//! An NBD server that behaves as XenServer's xapi-nbd (xen-api `ocaml/nbd`), so the client is
//! tested against the host it will meet:
//! * fixed newstyle; with TLS required, every option but STARTTLS and ABORT before TLS gets
//!   `NBD_REP_ERR_TLS_REQD`; TLS 1.2 only, ECDHE-RSA with AES-GCM, curve secp384r1;
//! * after TLS only EXPORT_NAME, ABORT, LIST and STARTTLS are known (GO, INFO, STRUCTURED_REPLY,
//!   meta contexts: `NBD_REP_ERR_UNSUP`); an unknown export closes the connection;
//! * no NO_ZEROES (124 zero bytes follow the export size); reads only, 512-byte aligned, flags 0,
//!   served one at a time; any error reply is followed by closing the connection;
//! * at most 16 connections per host, over all its addresses: the 17th is closed right after
//!   accept (the limit is a fault tests can lower, see [`Exports::admission`]).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// The protocol's numbers, written for the simulated server from the NBD protocol document
/// (NetworkBlockDevice/nbd `doc/proto.md`), not taken from the client's codec.
mod proto {
    /// "NBDMAGIC": the first 8 bytes the server sends.
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    /// "IHAVEOPT": newstyle negotiation, and the magic of every option the client sends.
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    /// Starts every option reply.
    pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    /// Starts every transmission request.
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    /// Starts every simple reply.
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    /// Handshake flag bit 0: fixed newstyle.
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
    /// Options.
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    /// Option reply types; errors have bit 31 set.
    pub const REP_ACK: u32 = 1;
    pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// Transmission flags: bit 0 "flags are valid", bit 1 read-only.
    pub const TFLAG_HAS_FLAGS: u16 = 1;
    pub const TFLAG_READ_ONLY: u16 = 1 << 1;
    /// Commands.
    pub const CMD_READ: u16 = 0;
    pub const CMD_DISC: u16 = 2;
    /// Error values are errno numbers as Linux has them.
    pub const EINVAL: u32 = 22;
}

/// Connections a host serves at once.
pub const MAX_CONNECTIONS: usize = 16;

/// An export's bytes while a client has it open; dropped when the connection ends (the
/// simulated host then unplugs its VBD).
pub trait ExportData: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()>;
}

/// Resolves export names at connect time.
pub trait Exports: Send + Sync {
    /// None closes the connection (xapi-nbd has no error reply for EXPORT_NAME).
    fn open(&self, name: &str) -> Option<Box<dyn ExportData>>;
    /// Requests a connection serves before it is dropped (fault injection); None: no limit.
    fn drop_after(&self) -> Option<u64> {
        None
    }
    /// How a new connection to the host's address `local` is treated.
    fn admission(&self, _local: &str) -> Admission {
        Admission::default()
    }
    /// A request is about to be served on a connection to `local`; false ends the connection
    /// instead (fault injection: the address went away).
    fn serving(&self, _local: &str) -> bool {
        true
    }
    /// A connection was admitted: `active` are being served now, this one included.
    fn admitted(&self, _active: usize) {}
    /// A connection was closed at accept because `limit` were being served already.
    fn refused(&self) {}
    /// A connection was dropped by `drop_after`.
    fn dropped(&self) {}
    /// Reads wait while this says so (fault injection: a barrier for concurrency tests).
    fn held(&self) -> bool {
        false
    }
}

/// What the host does with a new connection (fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Connections served at once over all the host's addresses (xapi-nbd: 16); one more is
    /// closed right after accept.
    pub limit: usize,
    /// Close this connection right after accept whatever the count (the address is down).
    pub close: bool,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            limit: MAX_CONNECTIONS,
            close: false,
        }
    }
}

struct FileExport(std::fs::File, u64);

impl ExportData for FileExport {
    fn size(&self) -> u64 {
        self.1
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, off)
    }
}

impl Exports for HashMap<String, PathBuf> {
    fn open(&self, name: &str) -> Option<Box<dyn ExportData>> {
        let f = std::fs::File::open(self.get(name)?).ok()?;
        let size = f.metadata().ok()?.len();
        Some(Box::new(FileExport(f, size)))
    }
}

pub struct ServerConfig {
    /// Export name → contents.
    pub exports: Arc<dyn Exports>,
    /// TLS certificate and key (PEM); None serves plain NBD (an `insecure_nbd` network).
    pub tls: Option<(String, String)>,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub(crate) fn tls_config(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    provider.kx_groups = vec![rustls::crypto::ring::kx_group::SECP384R1];
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

/// Start serving on 127.0.0.1 (an ephemeral port) in the current tokio runtime; returns the
/// port and a counter of connections accepted.
pub async fn start(config: ServerConfig) -> Result<(u16, Arc<AtomicUsize>), String> {
    start_on("127.0.0.1:0", config).await
}

/// Start serving on `addr`.
pub async fn start_on(addr: &str, config: ServerConfig) -> Result<(u16, Arc<AtomicUsize>), String> {
    let listener = TcpListener::bind(addr).await.map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let tls = acceptor(&config)?;
    let accepted = Arc::new(AtomicUsize::new(0));
    tokio::spawn(accept_loop(
        listener,
        config.exports,
        tls,
        Arc::new(AtomicUsize::new(0)),
        accepted.clone(),
    ));
    Ok((port, accepted))
}

/// Start serving on each of `ips` (as a host with an address on several networks), on one
/// port where it is free on all of them; the connection limit counts connections to every
/// address together, as xapi-nbd's does. Returns (ip, port) per address.
pub async fn start_on_addresses(
    ips: &[&str],
    config: ServerConfig,
) -> Result<Vec<(String, u16)>, String> {
    let tls = acceptor(&config)?;
    let active = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut out: Vec<(String, u16)> = Vec::new();
    for ip in ips {
        let first_port = out.first().map(|(_, p)| *p).unwrap_or(0);
        let listener = match TcpListener::bind((*ip, first_port)).await {
            Ok(l) => l,
            Err(_) => TcpListener::bind((*ip, 0))
                .await
                .map_err(|e| format!("bind {ip}: {e}"))?,
        };
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        out.push((ip.to_string(), port));
        tokio::spawn(accept_loop(
            listener,
            config.exports.clone(),
            tls.clone(),
            active.clone(),
            accepted.clone(),
        ));
    }
    Ok(out)
}

fn acceptor(config: &ServerConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    Ok(match &config.tls {
        Some((c, k)) => Some(tokio_rustls::TlsAcceptor::from(tls_config(c, k)?)),
        None => None,
    })
}

/// Decrements the count of connections being served when one ends.
struct Active(Arc<AtomicUsize>);
impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: TcpListener,
    exports: Arc<dyn Exports>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    active: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
) {
    while let Ok((sock, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::SeqCst);
        let local = sock
            .local_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let admission = exports.admission(&local);
        if admission.close || active.load(Ordering::SeqCst) >= admission.limit {
            if !admission.close {
                exports.refused();
            }
            drop(sock); // over the limit (or the address is down): closed at once
            continue;
        }
        let now = active.fetch_add(1, Ordering::SeqCst) + 1;
        exports.admitted(now);
        let guard = Active(active.clone());
        let (exports, tls) = (exports.clone(), tls.clone());
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            // The guard goes to the session, which ends the count before the socket closes:
            // a client that saw its connection end may count on the slot being free.
            let r = session(Box::new(sock), &exports, tls, &local, guard).await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "sim nbd: connection ended");
            }
        });
    }
}

async fn reply<S: Stream + ?Sized>(
    s: &mut S,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&proto::OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await?;
    s.flush().await
}

async fn session(
    stream: Box<dyn Stream>,
    exports: &Arc<dyn Exports>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    local: &str,
    guard: Active,
) -> std::io::Result<()> {
    // Locals drop in reverse order: the count (`_guard`) ends before the stream closes.
    let mut s = stream;
    let _guard = guard;
    let mut g = Vec::new();
    g.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&proto::FLAG_FIXED_NEWSTYLE.to_be_bytes());
    s.write_all(&g).await?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).await?;
    let mut secure = tls.is_none();
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await?;
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]) != proto::IHAVEOPT
            || len > 4096
        {
            return Ok(());
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match opt {
            proto::OPT_ABORT => {
                let _ = reply(&mut *s, opt, proto::REP_ACK, &[]).await;
                return Ok(());
            }
            proto::OPT_STARTTLS if !secure => {
                reply(&mut *s, opt, proto::REP_ACK, &[]).await?;
                if let Some(acceptor) = &tls {
                    s = Box::new(acceptor.accept(s).await?);
                    secure = true;
                }
            }
            _ if !secure => reply(&mut *s, opt, proto::REP_ERR_TLS_REQD, &[]).await?,
            proto::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = exports.open(&name) else {
                    return Ok(()); // xapi-nbd closes: EXPORT_NAME has no error reply
                };
                let size = export.size();
                let mut b = Vec::new();
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(
                    &(proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY).to_be_bytes(),
                );
                b.extend_from_slice(&[0u8; 124]);
                s.write_all(&b).await?;
                return transmission(&mut s, export, size, exports, local).await;
            }
            proto::OPT_LIST => reply(&mut *s, opt, proto::REP_ACK, &[]).await?,
            _ => reply(&mut *s, opt, proto::REP_ERR_UNSUP, &[]).await?,
        }
    }
}

async fn simple_reply<S: Stream + ?Sized>(
    s: &mut S,
    error: u32,
    cookie: &[u8],
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(cookie);
    b.extend_from_slice(data);
    s.write_all(&b).await?;
    s.flush().await
}

/// Requests one at a time; any error reply ends the connection.
async fn transmission(
    s: &mut Box<dyn Stream>,
    export: Box<dyn ExportData>,
    size: u64,
    exports: &Arc<dyn Exports>,
    local: &str,
) -> std::io::Result<()> {
    let drop_after = exports.drop_after();
    let mut served = 0u64;
    loop {
        served += 1;
        let mut r = [0u8; 28];
        s.read_exact(&mut r).await?;
        let magic = u32::from_be_bytes([r[0], r[1], r[2], r[3]]);
        let flags = u16::from_be_bytes([r[4], r[5]]);
        let cmd = u16::from_be_bytes([r[6], r[7]]);
        let cookie = r[8..16].to_vec();
        let offset = u64::from_be_bytes([r[16], r[17], r[18], r[19], r[20], r[21], r[22], r[23]]);
        let len = u32::from_be_bytes([r[24], r[25], r[26], r[27]]) as u64;
        if magic != proto::REQUEST_MAGIC {
            return Ok(());
        }
        // Injected fault: the connection drops with this request (past the first N)
        // unanswered; a disconnect is not a request to drop.
        if cmd != proto::CMD_DISC && drop_after.is_some_and(|n| served > n) {
            exports.dropped();
            return Ok(());
        }
        if cmd != proto::CMD_DISC && !exports.serving(local) {
            return Ok(()); // injected fault: the address went away
        }
        // Held reads: ask again shortly (the client's timeout bounds the wait).
        while cmd == proto::CMD_READ && exports.held() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        match cmd {
            proto::CMD_DISC => return Ok(()),
            proto::CMD_READ
                if flags == 0
                    && offset.is_multiple_of(512)
                    && len.is_multiple_of(512)
                    && len <= 32 << 20
                    && offset.checked_add(len).is_some_and(|e| e <= size) =>
            {
                let mut buf = vec![0u8; len as usize];
                export.read_at(&mut buf, offset)?;
                simple_reply(&mut *s, 0, &cookie, &buf).await?;
            }
            _ => {
                simple_reply(&mut *s, proto::EINVAL, &cookie, &[]).await?;
                return Ok(());
            }
        }
    }
}
