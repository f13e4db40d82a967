//! The simulated host on the wire: the management API over HTTPS (JSON-RPC at `/jsonrpc`,
//! XML-RPC at `/`), the HTTP handlers (`/export_raw_vdi`, `/import_raw_vdi`,
//! `/export_metadata`), an xapi-nbd-like NBD server for snapshots, and a control surface for
//! tests (in process through `Sim::with`, or `/sim/...` with the control token).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::disk::Image;
use super::host::{State, VmDeletion};
use super::http::{Conn, Head, Reply};
use super::nbd::{ExportData, Exports, ServerConfig};

/// How the host offers NBD (the purpose of its networks).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NbdMode {
    /// An `nbd` network: TLS required.
    Tls,
    /// An `insecure_nbd` network: the NBD server speaks plain (no STARTTLS), while
    /// `get_nbd_info` still carries the host's certificate, as xapi's does.
    Plain,
    /// No NBD network: `get_nbd_info` returns an empty list.
    None,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where disk layers and the certificate live.
    pub dir: PathBuf,
    pub user: String,
    pub password: String,
    pub nbd: NbdMode,
    /// An older host: no `/jsonrpc`, XML-RPC only.
    pub xmlrpc_only: bool,
    /// Listen address (default 127.0.0.1, an ephemeral port).
    pub bind: String,
    /// The name the host's certificate is issued for (get_nbd_info's `subject`).
    pub subject: String,
}

impl SimConfig {
    pub fn new(dir: &Path) -> SimConfig {
        SimConfig {
            dir: dir.to_path_buf(),
            user: "root".into(),
            password: super::host::new_uuid(),
            nbd: NbdMode::Tls,
            xmlrpc_only: false,
            bind: "127.0.0.1:0".into(),
            subject: "xenserver-sim".into(),
        }
    }
}

/// A running simulated host.
pub struct Sim {
    state: Arc<Mutex<State>>,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    pub port: u16,
    /// The host's certificate (API and NBD), PEM.
    pub cert_pem: String,
    /// Token for `/sim/...` control requests (header `x-sim-token`).
    pub control_token: String,
    pub config: SimConfig,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A self-signed RSA certificate with only a subjectAltName, as xen-api's gencert makes.
pub fn self_signed(dir: &Path, name: &str) -> Result<(String, String), String> {
    let cnf = dir.join("cert.cnf");
    let (cert, key) = (dir.join("host-cert.pem"), dir.join("host-key.pem"));
    std::fs::write(
        &cnf,
        format!(
            "[req]\ndistinguished_name=dn\nx509_extensions=ext\nprompt=no\n[dn]\nCN={name}\n[ext]\nsubjectAltName=DNS:{name},IP:127.0.0.1,IP:127.0.0.2\n"
        ),
    )
    .map_err(|e| format!("{}: {e}", cnf.display()))?;
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-config",
        ])
        .arg(&cnf)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .map_err(|e| format!("cannot run openssl (install it: apt-get install openssl): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    Ok((read(&cert)?, read(&key)?))
}

impl Sim {
    /// Start a host; its certificate is generated (or reused from `dir`).
    pub fn start(config: SimConfig) -> Result<Sim, String> {
        std::fs::create_dir_all(&config.dir).map_err(|e| e.to_string())?;
        let (cert_pem, key_pem) = match (
            std::fs::read_to_string(config.dir.join("host-cert.pem")),
            std::fs::read_to_string(config.dir.join("host-key.pem")),
        ) {
            (Ok(c), Ok(k)) => (c, k),
            _ => self_signed(&config.dir, &config.subject)?,
        };
        Sim::start_with_cert(config, cert_pem, key_pem)
    }

    pub fn start_with_cert(
        config: SimConfig,
        cert_pem: String,
        key_pem: String,
    ) -> Result<Sim, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sim")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let layers = config.dir.join("layers");
        std::fs::create_dir_all(&layers).map_err(|e| e.to_string())?;
        let state = Arc::new(Mutex::new(State::new(
            layers,
            &config.user,
            &config.password,
        )));
        let tls = super::nbd::tls_config(&cert_pem, &key_pem)?;
        let listener = runtime
            .block_on(TcpListener::bind(&config.bind))
            .map_err(|e| format!("bind {}: {e}", config.bind))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        lock(&state).add_host(&addr.ip().to_string(), &cert_pem);
        let control_token = super::host::new_uuid();
        let ctx = Arc::new(Ctx {
            state: state.clone(),
            xmlrpc_only: config.xmlrpc_only,
            token: control_token.clone(),
        });
        runtime.spawn(serve_https(
            listener,
            tokio_rustls::TlsAcceptor::from(tls),
            ctx,
        ));
        if config.nbd != NbdMode::None {
            let exports: Arc<dyn Exports> = Arc::new(HostExports(state.clone()));
            let nbd_cfg = ServerConfig {
                exports,
                tls: (config.nbd == NbdMode::Tls).then(|| (cert_pem.clone(), key_pem.clone())),
            };
            // One listener per address the host has on an NBD network (get_nbd_info lists
            // each); the certificate names both loopback addresses.
            let ips: Vec<String> = match addr.ip().to_string().as_str() {
                "127.0.0.1" => vec!["127.0.0.1".into(), "127.0.0.2".into()],
                ip => vec![ip.to_string()],
            };
            let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
            let mut addresses = runtime.block_on(super::nbd::start_on_addresses(&ips, nbd_cfg))?;
            let nbd_port = addresses.first().map(|(_, p)| *p).unwrap_or(0);
            if addr.ip().is_unspecified() {
                // Listening everywhere: the record names the address a local client uses.
                addresses = vec![("127.0.0.1".into(), nbd_port)];
            }
            lock(&state).nbd_addresses = addresses;
            // Like xapi: the record carries the certificate whatever the network's purpose.
            lock(&state).nbd = Some((nbd_port, cert_pem.clone(), config.subject.clone()));
        }
        let purpose: &[&str] = match config.nbd {
            NbdMode::Tls => &["nbd"],
            NbdMode::Plain => &["insecure_nbd"],
            NbdMode::None => &[],
        };
        // The PIF's address: the one clients reach the host at.
        let ip = match addr.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_string(),
            ip => ip.to_string(),
        };
        {
            let mut st = lock(&state);
            let mut net = super::network::Net::new(&ip, &config.subject, &cert_pem, purpose);
            // Every further NBD address is a PIF of its own, on a network of the same purpose.
            let extra: Vec<String> = st
                .nbd_addresses
                .iter()
                .map(|(a, _)| a.clone())
                .filter(|a| *a != ip)
                .collect();
            for (i, a) in extra.iter().enumerate() {
                net.add_network(&format!("eth{}", i + 1), a, purpose);
            }
            // The pool's master is this host record.
            if let Some(h) = st.hosts.first_mut() {
                h.reference = net.host_ref.clone();
                h.uuid = net.host_uuid.clone();
            }
            st.net = net;
        }
        Ok(Sim {
            state,
            url: format!("https://{addr}"),
            port: addr.port(),
            cert_pem,
            control_token,
            config,
            runtime: Some(runtime),
        })
    }

    /// Start a pool member on 127.0.0.2 with its own certificate (made in `dir`), serving
    /// the same state (the disks are on shared storage); `host.get_all` lists it. Returns its
    /// base URL, `https://127.0.0.2:PORT`.
    pub fn start_member(&self, dir: &Path) -> Result<String, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (cert, key) = self_signed(dir, "xenserver-sim-member")?;
        let tls = super::nbd::tls_config(&cert, &key)?;
        let rt = self
            .runtime
            .as_ref()
            .ok_or("the simulated host is stopped")?;
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.2:0"))
            .map_err(|e| format!("bind 127.0.0.2: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let ctx = Arc::new(Ctx {
            state: self.state.clone(),
            xmlrpc_only: self.config.xmlrpc_only,
            token: self.control_token.clone(),
        });
        rt.spawn(serve_https(
            listener,
            tokio_rustls::TlsAcceptor::from(tls),
            ctx,
        ));
        lock(&self.state).add_host("127.0.0.2", &cert);
        Ok(format!("https://{addr}"))
    }

    /// Run `f` on the host's state (the test control surface).
    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut lock(&self.state))
    }

    /// Add a VM whose disks start as these raw images; returns (vm uuid, vdi uuids).
    pub fn add_vm(
        &self,
        name: &str,
        disks: &[(&str, &Path)],
    ) -> Result<(String, Vec<String>), String> {
        let mut st = lock(&self.state);
        let mut images = Vec::new();
        for (label, path) in disks {
            let img =
                Image::from_raw(&st.dir, path).map_err(|e| format!("{}: {e}", path.display()))?;
            images.push((label.to_string(), img));
        }
        Ok(st.add_vm(name, images))
    }

    /// The bytes of a VDI (by uuid), as a guest would read them.
    pub fn read_vdi(&self, vdi: &str) -> Result<Vec<u8>, String> {
        let st = lock(&self.state);
        let r = st.vdi_ref(vdi).ok_or("no such VDI")?;
        let img = st.vdis[&r].image.as_ref().ok_or("no data")?;
        let mut buf = vec![0u8; img.size() as usize];
        img.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
        Ok(buf)
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct HostExports(Arc<Mutex<State>>);

struct VdiExport {
    image: Image,
    served: Arc<std::sync::atomic::AtomicU64>,
    state: Arc<Mutex<State>>,
    vdi: String,
}

impl ExportData for VdiExport {
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.served
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.image.read_at(buf, off)
    }
}

impl Drop for VdiExport {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        let delay = st.faults.unplug_delay;
        if let Some(v) = st.vdis.get_mut(&self.vdi) {
            v.users = v.users.saturating_sub(1);
            v.busy_until = Some(Instant::now() + delay);
        }
    }
}

/// Plug a VBD for `vdi` (by uuid) on behalf of `session`: the export's bytes while in use.
fn plug(state: &Arc<Mutex<State>>, vdi: &str, session: &str) -> Option<VdiExport> {
    let mut st = lock(state);
    if !st.sessions.contains_key(session) {
        return None;
    }
    let r = st.vdi_ref(vdi)?;
    let v = st.vdis.get_mut(&r)?;
    let image = v.image.clone()?;
    v.users += 1;
    Some(VdiExport {
        image,
        served: st.served_bytes.clone(),
        state: state.clone(),
        vdi: r,
    })
}

impl Exports for HostExports {
    fn open(&self, name: &str) -> Option<Box<dyn ExportData>> {
        // `/VDI_UUID?session_id=OpaqueRef:...`
        let (path, query) = name.split_once('?')?;
        let session = query.strip_prefix("session_id=")?;
        let e = plug(&self.0, path.trim_start_matches('/'), session)?;
        Some(Box::new(e))
    }
    fn drop_after(&self) -> Option<u64> {
        lock(&self.0).faults.nbd_drop_after
    }
    fn admission(&self, local: &str) -> super::nbd::Admission {
        let (limit, close) = lock(&self.0).nbd_admission(local);
        super::nbd::Admission { limit, close }
    }
    fn serving(&self, local: &str) -> bool {
        lock(&self.0).nbd_serving(local)
    }
    fn admitted(&self, active: usize) {
        let mut st = lock(&self.0);
        st.nbd_peak = st.nbd_peak.max(active);
    }
    fn refused(&self) {
        lock(&self.0).nbd_refused += 1;
    }
    fn dropped(&self) {
        lock(&self.0).nbd_dropped += 1;
    }
    fn held(&self) -> bool {
        let st = lock(&self.0);
        st.faults
            .nbd_hold_reads_until
            .is_some_and(|n| st.nbd_peak < n)
    }
}

struct Ctx {
    state: Arc<Mutex<State>>,
    xmlrpc_only: bool,
    token: String,
}

type TlsConn = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

async fn serve_https(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, ctx: Arc<Ctx>) {
    while let Ok((sock, _)) = listener.accept().await {
        let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(sock).await else {
                return;
            };
            serve_connection(&ctx, tls).await;
        });
    }
}

/// Requests on one connection until either side closes it. It ends as xapi's connections
/// do: the TCP socket under TLS is shut down without a TLS `close_notify`.
async fn serve_connection(ctx: &Arc<Ctx>, tls: TlsConn) {
    let mut conn = Conn::new(tls);
    loop {
        let head = match conn.next_head().await {
            Ok(Some(Ok(head))) => head,
            Ok(Some(Err(e))) => {
                let _ = send(&mut conn, Reply::error_page(400, &e.to_string()), true).await;
                break;
            }
            Ok(None) | Err(_) => break,
        };
        let (reply, reusable) = route(ctx, &head, &mut conn).await;
        let close =
            !reusable || !head.keep_alive() || matches!(reply, Reply::CloseDelimited { .. });
        if send(&mut conn, reply, close).await.is_err() || close {
            break;
        }
    }
    let (mut tcp, _) = conn.into_inner().into_inner();
    let _ = tcp.shutdown().await;
}

async fn send(conn: &mut Conn<TlsConn>, reply: Reply, close: bool) -> std::io::Result<()> {
    match reply {
        Reply::Full {
            status,
            content_type,
            headers,
            body,
        } => {
            conn.send_full(status, content_type, &headers, &body, close)
                .await
        }
        Reply::CloseDelimited { content_type, body } => {
            conn.send_close_delimited(content_type, body).await
        }
    }
}

/// Read the request's body and answer it. The flag: the connection can serve another request
/// (its body was read whole).
async fn route(ctx: &Arc<Ctx>, head: &Head, conn: &mut Conn<TlsConn>) -> (Reply, bool) {
    if !head.path().starts_with("/sim/") && lock(&ctx.state).faults.api_hangs {
        // Fault: a hung xapi holds the request and never writes a byte.
        std::future::pending::<()>().await;
    }
    // xapi's handlers take no chunked uploads (/import_raw_vdi answers this way).
    if head.has_transfer_encoding() {
        return (
            Reply::error_page(400, "chunked encoding not supported"),
            false,
        );
    }
    let len = match head.content_length() {
        Ok(len) => len,
        Err(e) => return (Reply::error_page(400, &e.to_string()), false),
    };
    // A client waiting to be told to send its body (curl does for large ones).
    if head
        .header("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        && len > 0
        && conn.send_continue().await.is_err()
    {
        return (Reply::error_page(400, "the connection failed"), false);
    }
    if head.method == "PUT" && head.path() == "/import_raw_vdi" {
        if head.header("content-length").is_none() {
            return (Reply::error_page(411, "Content-Length required"), false);
        }
        return import_raw(ctx, head, len, conn).await;
    }
    let limit = match head.path() {
        "/import_metadata" => 64 << 20,
        p if p.starts_with("/sim/") => 256 << 20,
        _ => 16 << 20,
    };
    match conn.body(len, limit).await {
        Ok(Some(body)) => (handle(ctx, head, &body).await, true),
        Ok(None) => (
            Reply::error_page(413, &format!("a body of {len} bytes; at most {limit}")),
            false,
        ),
        Err(_) => (
            Reply::error_page(400, "the request body was cut short"),
            false,
        ),
    }
}

fn json_reply(v: &Value) -> Reply {
    Reply::full(200, "application/json", v.to_string())
}

async fn handle(ctx: &Arc<Ctx>, head: &Head, body: &[u8]) -> Reply {
    let path = head.path();
    match (head.method.as_str(), path) {
        ("POST", "/jsonrpc") if !ctx.xmlrpc_only => {
            let Ok(call) = serde_json::from_slice::<Value>(body) else {
                return Reply::error_page(400, "not JSON");
            };
            let v2 = call.get("jsonrpc").and_then(|v| v.as_str()) == Some("2.0");
            let id = call.get("id").cloned().unwrap_or(Value::Null);
            let method = call.get("method").and_then(|m| m.as_str()).unwrap_or("");
            let params = match call.get("params") {
                Some(Value::Array(a)) => a.clone(),
                _ => Vec::new(),
            };
            let result = super::host::answer(&ctx.state, method, &params).await;
            let out = match (result, v2) {
                (Ok(r), true) => json!({"jsonrpc": "2.0", "result": r, "id": id}),
                (Ok(r), false) => json!({"result": r, "error": null, "id": id}),
                (Err(e), true) => {
                    json!({"jsonrpc": "2.0", "error": {"code": 1, "message": e[0], "data": e[1..]}, "id": id})
                }
                (Err(e), false) => json!({"result": null, "error": e, "id": id}),
            };
            json_reply(&out)
        }
        ("POST", "/") | ("POST", "/RPC2") => {
            let text = String::from_utf8_lossy(body);
            let out = match super::xmlrpc::decode_call(&text) {
                Ok((method, params)) => {
                    match super::host::answer(&ctx.state, &method, &params).await {
                        Ok(v) => json!({"Status": "Success", "Value": v}),
                        Err(e) => json!({"Status": "Failure", "ErrorDescription": e}),
                    }
                }
                Err(e) => {
                    json!({"Status": "Failure", "ErrorDescription": ["XMLRPC_UNMARSHAL_FAILURE", e]})
                }
            };
            Reply::full(200, "text/xml", super::xmlrpc::encode_response(&out))
        }
        ("GET", "/export_raw_vdi") | ("GET", "/export_raw_vdi_redirected") => export_raw(ctx, head),
        ("PUT", "/import_metadata") => {
            let q = head.query();
            let map: Vec<(String, String)> = q
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("vdi:").map(|f| (f.to_string(), v.clone())))
                .collect();
            let session = q.get("session_id").cloned().unwrap_or_default();
            let task = q.get("task_id").cloned();
            let mut st = lock(&ctx.state);
            if !st.sessions.contains_key(&session) {
                return Reply::error_page(403, "session not valid");
            }
            let r = st.import_metadata(body, &map);
            if let Some(t) = task.and_then(|t| st.tasks.get_mut(&t)) {
                *t = match &r {
                    Ok(vm) => ("success".into(), super::xmlrpc::encode_value(&json!([vm]))),
                    Err(e) => ("failure".into(), e.join(" ")),
                };
            }
            match r {
                Ok(_) => Reply::full(200, "text/plain", ""),
                Err(e) => Reply::error_page(500, &e.join(" ")),
            }
        }
        ("GET", "/export_metadata") => {
            let q = head.query();
            let st = lock(&ctx.state);
            if !st
                .sessions
                .contains_key(q.get("session_id").map(String::as_str).unwrap_or(""))
            {
                return Reply::error_page(403, "session not valid");
            }
            match st.export_metadata(q.get("uuid").map(String::as_str).unwrap_or("")) {
                Some(mut tar) => {
                    if let Some(n) = st.faults.metadata_close_after {
                        tar.truncate(usize::try_from(n).unwrap_or(usize::MAX));
                    }
                    close_delimited("application/x-tar", vec![tar])
                }
                None => Reply::error_page(404, "VM not found"),
            }
        }
        (_, p) if p.starts_with("/sim/") => control(ctx, head, body),
        _ => Reply::error_page(404, "not found"),
    }
}

/// A close-delimited reply of these chunks.
fn close_delimited(content_type: &'static str, chunks: Vec<Vec<u8>>) -> Reply {
    let (tx, rx) = mpsc::channel(chunks.len().max(1));
    for c in chunks {
        let _ = tx.try_send(Ok(c));
    }
    Reply::CloseDelimited {
        content_type,
        body: rx,
    }
}

/// The `export_redirect_to` fault: a request for `/export_raw_vdi` reaching another host than
/// the one named is sent there (as the master sends it to the member holding the disk).
fn redirect_to_member(faults: &super::host::Faults, head: &Head) -> Option<Reply> {
    let to = faults.export_redirect_to.clone()?;
    let here = head.header("host").unwrap_or("");
    if head.path() != "/export_raw_vdi" || to.trim_start_matches("https://") == here {
        return None;
    }
    Some(Reply::Full {
        status: 302,
        content_type: "text/plain",
        headers: vec![(
            "Location",
            format!("{to}/export_raw_vdi?{}", head.raw_query()),
        )],
        body: Vec::new(),
    })
}

/// `/export_raw_vdi`: the VDI's bytes, close-delimited as xapi sends them.
fn export_raw(ctx: &Arc<Ctx>, head: &Head) -> Reply {
    let q = head.query();
    let faults = lock(&ctx.state).faults.clone();
    if let Some(r) = redirect_to_member(&faults, head) {
        return r;
    }
    if faults.export_redirect && head.path() == "/export_raw_vdi" {
        return Reply::Full {
            status: 302,
            content_type: "text/plain",
            headers: vec![(
                "Location",
                format!("/export_raw_vdi_redirected?{}", head.raw_query()),
            )],
            body: Vec::new(),
        };
    }
    if faults.export_error_page {
        return Reply::error_page(
            200,
            "An unexpected error occurred; please wait a while and try again.",
        );
    }
    let session = q.get("session_id").cloned().unwrap_or_default();
    let vdi = q.get("vdi").cloned().unwrap_or_default();
    let Some(export) = plug(&ctx.state, &vdi, &session) else {
        return Reply::error_page(403, "VDI or session not valid, or VDI has no data");
    };
    // Past the VDI's end (the extra-bytes fault) the body is zeros; the close-after fault
    // ends the body early.
    let mut len = export.size().saturating_add(faults.export_extra_bytes);
    if let Some(n) = faults.export_close_after {
        len = len.min(n);
    }
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut off = 0u64;
        while off < len {
            if faults.export_hangs_after.is_some_and(|h| off >= h) {
                // Fault: the host stops sending, until the client goes away.
                while !tx.is_closed() {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                return;
            }
            let n = (len - off).min(1 << 20) as usize;
            let mut buf = vec![0u8; n];
            let r = if off >= export.size() {
                Ok(buf)
            } else {
                let k = (export.size() - off).min(n as u64) as usize;
                export.read_at(&mut buf[..k], off).map(|_| buf)
            };
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return;
            }
            off += n as u64;
        }
    });
    Reply::CloseDelimited {
        content_type: "application/octet-stream",
        body: rx,
    }
}

async fn import_raw(
    ctx: &Arc<Ctx>,
    head: &Head,
    len: u64,
    conn: &mut Conn<TlsConn>,
) -> (Reply, bool) {
    let q = head.query();
    let vdi = q.get("vdi").cloned().unwrap_or_default();
    let r = {
        let st = lock(&ctx.state);
        if !st
            .sessions
            .contains_key(q.get("session_id").map(String::as_str).unwrap_or(""))
        {
            return (Reply::error_page(403, "session not valid"), false);
        }
        st.vdi_ref(&vdi)
    };
    let Some(r) = r else {
        return (Reply::error_page(404, "VDI not found"), false);
    };
    let (drop_after, attached, hang) = {
        let st = lock(&ctx.state);
        (
            st.faults.import_drop_after,
            st.attached(&r),
            st.faults.import_hangs_after,
        )
    };
    if attached {
        return (Reply::error_page(500, &format!("VDI_IN_USE {r}")), false);
    }
    let mut remaining = len;
    let mut off = 0u64;
    while remaining > 0 {
        let Ok(data) = conn.body_chunk(&mut remaining, 1 << 20).await else {
            return (Reply::error_page(400, "upload interrupted"), false);
        };
        if hang.is_some_and(|h| off >= h) {
            // Fault: the host stops reading the upload and never answers.
            std::future::pending::<()>().await;
        }
        if drop_after.is_some_and(|d| off >= d) {
            // Injected fault: the host goes away mid-upload.
            return (Reply::error_page(500, "connection lost"), false);
        }
        let mut st = lock(&ctx.state);
        let Some(img) = st.vdis.get_mut(&r).and_then(|v| v.image.as_mut()) else {
            return (Reply::error_page(500, "VDI has no data"), false);
        };
        if img.write_at(&data, off).is_err() {
            return (
                Reply::error_page(500, "write past the end of the VDI"),
                false,
            );
        }
        off += data.len() as u64;
    }
    (Reply::full(200, "text/plain", ""), true)
}

/// `/sim/...`: writes, crash, licence, for a host run with `cbtfs sim`.
fn control(ctx: &Arc<Ctx>, head: &Head, body: &[u8]) -> Reply {
    if head.header("x-sim-token") != Some(ctx.token.as_str()) {
        return Reply::error_page(403, "control token required (x-sim-token)");
    }
    let q = head.query();
    let mut st = lock(&ctx.state);
    let r: Result<Value, String> = match head.path() {
        "/sim/write" => {
            let off = q.get("offset").and_then(|o| o.parse().ok()).unwrap_or(0);
            st.guest_write(q.get("vdi").map(String::as_str).unwrap_or(""), off, body)
                .map(|_| json!("ok"))
        }
        "/sim/write_file" => st
            .guest_write_file(
                q.get("vdi").map(String::as_str).unwrap_or(""),
                Path::new(q.get("path").map(String::as_str).unwrap_or("")),
            )
            .map(|n| json!({ "blocks": n })),
        "/sim/nbd" => {
            st.nbd_override = match (q.get("address"), q.get("port").and_then(|p| p.parse().ok())) {
                (Some(a), Some(p)) => Some((
                    a.clone(),
                    p,
                    q.get("export").cloned().unwrap_or_default(),
                    String::from_utf8_lossy(body).into_owned(),
                    q.get("subject").cloned().unwrap_or_default(),
                )),
                _ => None,
            };
            Ok(json!("ok"))
        }
        "/sim/faults" => {
            if let Some(ms) = q.get("unplug_ms").and_then(|m| m.parse().ok()) {
                st.faults.unplug_delay = std::time::Duration::from_millis(ms);
            }
            if let Some(n) = q.get("nbd_limit").and_then(|n| n.parse().ok()) {
                st.faults.nbd_connection_limit = Some(n);
            }
            // `nbd_drop_after=N`: every NBD connection drops after N requests (empty: never).
            if let Some(n) = q.get("nbd_drop_after") {
                st.faults.nbd_drop_after = n.parse().ok();
            }
            // `delete_vm=NAME[&delete_at=METHOD]`: the VM is uninstalled at the first METHOD
            // call on one of its disks (default `VDI.snapshot`; empty name: no deletion).
            if let Some(vm) = q.get("delete_vm") {
                st.faults.delete_vm = (!vm.is_empty()).then(|| VmDeletion {
                    vm: vm.clone(),
                    at: q
                        .get("delete_at")
                        .cloned()
                        .unwrap_or_else(|| "VDI.snapshot".into()),
                });
            }
            Ok(json!("ok"))
        }
        "/sim/add_vm" => {
            // `name=VM&disks=LABEL=RAW_IMAGE,LABEL=RAW_IMAGE[&tags=A,B]`: another VM (benches
            // of pools: `cbtfs sim` starts one VM).
            let name = q.get("name").cloned().unwrap_or_default();
            let mut images = Vec::new();
            let mut bad = None;
            for d in q.get("disks").map(String::as_str).unwrap_or("").split(',') {
                let Some((label, path)) = d.split_once('=') else {
                    bad = Some(format!("disks: {d:?} is not LABEL=RAW_IMAGE"));
                    break;
                };
                match Image::from_raw(&st.dir, Path::new(path)) {
                    Ok(img) => images.push((label.to_string(), img)),
                    Err(e) => {
                        bad = Some(format!("{path}: {e}"));
                        break;
                    }
                }
            }
            match bad {
                Some(e) => Err(e),
                None if name.is_empty() => Err("name is missing".into()),
                None => {
                    let (vm, vdis) = st.add_vm(&name, images);
                    for t in q.get("tags").map(String::as_str).unwrap_or("").split(',') {
                        if !t.is_empty() {
                            st.tag_vm(&name, t);
                        }
                    }
                    Ok(json!({ "vm": vm, "vdis": vdis }))
                }
            }
        }
        "/sim/crash" => {
            st.crash();
            Ok(json!("ok"))
        }
        "/sim/licence" => {
            st.faults.no_licence = q.get("enabled").map(String::as_str) == Some("0");
            Ok(json!("ok"))
        }
        "/sim/stats" => Ok(json!({
            "nbd_peak": st.nbd_peak,
            "nbd_refused": st.nbd_refused,
            "nbd_dropped": st.nbd_dropped,
            "served_bytes": st.served_bytes.load(std::sync::atomic::Ordering::Relaxed),
        })),
        "/sim/state" => Ok(json!(
            st.vdis
                .values()
                .map(|v| json!({
            "uuid": v.uuid, "name": v.name_label, "type": v.kind, "snapshot": v.is_a_snapshot,
            "cbt": v.cbt.is_some(), "other_config": v.other_config}))
                .collect::<Vec<_>>()
        )),
        _ => Err("unknown control".into()),
    };
    match r {
        Ok(v) => json_reply(&v),
        Err(e) => Reply::full(400, "text/plain", e),
    }
}
