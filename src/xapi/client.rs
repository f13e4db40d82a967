//! The management API client: JSON-RPC at `/jsonrpc`, XML-RPC at `/` when the host does not
//! speak JSON, one session, typed calls for what backup and restore need, and the HTTP
//! handlers. The session id is a secret: it goes in requests only, never in errors or logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::error::{ApiFailure, XapiError};
use super::trust::{self, HostTrust};
use super::xmlrpc;

/// The API version cbtfs speaks (XenServer 7.x and later, XCP-ng 8.x).
const API_VERSION: &str = "2.21";
const ORIGINATOR: &str = "cbtfs";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rpc {
    Unknown,
    Json,
    Xml,
}

/// Where the host is and how it is trusted.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// `https://HOST[:PORT]`.
    pub url: String,
    pub trust: HostTrust,
    /// How long the host may take to accept a connection, to start answering, and between
    /// bytes of an answer (every API call and handler).
    pub timeout: Duration,
}

/// A connection to one host, logged in once `login` succeeded.
pub struct Xapi {
    http: reqwest::Client,
    /// For uploads: no read timeout (reqwest's would bound the whole upload); a watchdog
    /// bounds how long the host may stop taking bytes instead.
    upload: reqwest::Client,
    base: String,
    host: String,
    rpc: Mutex<Rpc>,
    session: Option<String>,
    trust: Arc<trust::TrustState>,
    next_id: AtomicU64,
    timeout: Duration,
}

/// Split `https://HOST[:PORT][/]` into the base URL and the host name.
pub fn parse_url(url: &str) -> Result<(String, String), XapiError> {
    let bad = || {
        XapiError::Config(format!(
            "--host {url:?} is not a host URL; give https://HOST or https://HOST:PORT"
        ))
    };
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') || hostport.contains('@') {
        return Err(bad());
    }
    let host = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || p.parse::<u16>().is_ok() => {
            p.parse::<u16>().map_err(|_| bad())?;
            h
        }
        _ => hostport,
    };
    Ok((
        format!("https://{hostport}"),
        host.trim_matches(['[', ']']).to_string(),
    ))
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Largest API response body read (a record of every VM of a large pool is a few MiB): a host
/// or proxy that sends more is refused instead of filling memory.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// What a `/jsonrpc` response body says.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonReply {
    /// Not JSON at all: a host without JSON-RPC (use XML-RPC).
    NotJson,
    /// JSON with neither a result nor an error.
    Empty,
    Result(Value),
    /// The failure's code and parameters.
    Failure(String, Vec<String>),
}

/// Decode a JSON-RPC response body (pure: the fuzz target drives it with arbitrary bytes).
pub fn decode_json_reply(bytes: &[u8]) -> JsonReply {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return JsonReply::NotJson;
    };
    match interpret_json(v) {
        Ok(Some(r)) => JsonReply::Result(r),
        Ok(None) => JsonReply::Empty,
        Err((code, params)) => JsonReply::Failure(code, params),
    }
}

/// A JSON-RPC reply: its result (None if it has neither result nor error), or the failure's
/// code and parameters, in either of xapi's shapes: v2 `{"code":..,"message":CODE,"data":[..]}`
/// or v1 `[CODE, params...]`.
fn interpret_json(v: Value) -> Result<Option<Value>, (String, Vec<String>)> {
    match v.get("error") {
        None | Some(Value::Null) => Ok(v.get("result").cloned()),
        Some(Value::Object(e)) => {
            let code = e.get("message").map(text_of).unwrap_or_default();
            let params = match e.get("data") {
                Some(Value::Array(a)) => a.iter().map(text_of).collect(),
                Some(Value::Null) | None => Vec::new(),
                Some(other) => vec![text_of(other)],
            };
            Err((code, params))
        }
        Some(Value::Array(a)) => {
            let mut it = a.iter().map(text_of);
            let code = it.next().unwrap_or_default();
            Err((code, it.collect()))
        }
        Some(other) => Err((text_of(other), Vec::new())),
    }
}

fn redact(s: &str) -> String {
    crate::nbd::client::redact_session(s)
}

/// Redirects are followed (a handler may answer 302 to the host holding the disk) only to
/// `https`: the URL carries the session id, which must never travel in plain text.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        if attempt.url().scheme() != "https" {
            let to = format!(
                "{}://{}",
                attempt.url().scheme(),
                attempt.url().host_str().unwrap_or("?")
            );
            attempt.error(format!(
                "refused a redirect to {to}: only https is followed (the request carries the session)"
            ))
        } else if attempt.previous().len() >= 5 {
            attempt.error("too many redirects (more than 5)")
        } else {
            attempt.follow()
        }
    })
}

/// How an upload goes: when the HTTP stack last asked for bytes, and whether it waits on the
/// body's producer now (a slow producer is not the host's stall).
#[derive(Debug)]
struct Watch {
    start: std::time::Instant,
    /// Milliseconds after `start` of the last request for bytes.
    last: AtomicU64,
    waiting_on_body: std::sync::atomic::AtomicBool,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            start: std::time::Instant::now(),
            last: AtomicU64::new(0),
            waiting_on_body: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Watch {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The host has neither taken bytes nor answered for longer than `limit`.
    fn stalled(&self, limit: Duration) -> bool {
        !self.waiting_on_body.load(Ordering::SeqCst)
            && self.now().saturating_sub(self.last.load(Ordering::SeqCst))
                > u64::try_from(limit.as_millis()).unwrap_or(u64::MAX)
    }
}

/// `body`, noting in `watch` each time the HTTP stack asks for bytes.
fn watched<S>(
    body: S,
    watch: Arc<Watch>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static,
{
    let mut body = Box::pin(body);
    futures_util::stream::poll_fn(move |cx| {
        watch.last.store(watch.now(), Ordering::SeqCst);
        let r = body.as_mut().poll_next(cx);
        watch
            .waiting_on_body
            .store(r.is_pending(), Ordering::SeqCst);
        if r.is_ready() {
            // Asked and answered: the wait from here on is the host's.
            watch.last.store(watch.now(), Ordering::SeqCst);
        }
        r
    })
}

/// Read a response body of at most `limit` bytes; a longer one is an error naming the limit.
pub(crate) async fn read_body(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if let Some(n) = resp.content_length()
        && n > limit as u64
    {
        return Err(BodyError::TooLarge(limit));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Transport)? {
        if out.len().saturating_add(chunk.len()) > limit {
            return Err(BodyError::TooLarge(limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// An HTTP error with its causes (`error reading a body: peer closed connection without
/// sending TLS close_notify`), URL and session removed.
pub(crate) fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut detail = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let t = s.to_string();
        if !detail.contains(&t) {
            detail = format!("{detail}: {t}");
        }
        src = s.source();
    }
    redact(&detail)
}

/// Why a body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    Transport(reqwest::Error),
    TooLarge(usize),
}

impl Xapi {
    pub fn connect(cfg: &HostConfig) -> Result<Xapi, XapiError> {
        let (base, host) = parse_url(&cfg.url)?;
        let (tls, trust) = trust::client_config(&cfg.trust).map_err(XapiError::Config)?;
        // Per-host bounds on every request, API call or handler: to connect, to the first
        // byte of the answer, and between bytes of a streamed body (a transfer of any length
        // goes on while bytes keep arriving).
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls.clone())
            .connect_timeout(cfg.timeout)
            .read_timeout(cfg.timeout)
            .redirect(redirect_policy())
            .build()
            .map_err(|e| XapiError::Config(format!("HTTP client: {e}")))?;
        let upload = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(cfg.timeout)
            .redirect(redirect_policy())
            .build()
            .map_err(|e| XapiError::Config(format!("HTTP client: {e}")))?;
        Ok(Xapi {
            http,
            upload,
            base,
            host,
            rpc: Mutex::new(Rpc::Unknown),
            session: None,
            trust,
            next_id: AtomicU64::new(1),
            timeout: cfg.timeout,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// How long the host may stay silent (see [`HostConfig::timeout`]).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The fingerprint of the certificate the host presented (after the first request).
    pub fn seen_certificate(&self) -> Option<String> {
        self.trust.seen()
    }

    /// With a pinned certificate: what to accept from now on, the host's own pin (once pinned
    /// on first use) and pool members' certificates by address.
    pub fn trust_state(&self) -> &trust::TrustState {
        &self.trust
    }

    /// True when the host answered XML-RPC only.
    pub fn uses_xmlrpc(&self) -> bool {
        self.rpc.lock().map(|r| *r == Rpc::Xml).unwrap_or(false)
    }

    /// What a failed request means: a host that accepted the connection and then did not
    /// answer `call` in time is not "unreachable".
    fn transport(&self, call: &str, e: reqwest::Error) -> XapiError {
        if e.is_timeout() && !e.is_connect() {
            return XapiError::Timeout {
                host: self.host.clone(),
                call: redact(call),
                secs: self.timeout.as_secs(),
            };
        }
        XapiError::Transport {
            host: self.host.clone(),
            detail: error_chain(e),
        }
    }

    /// Call `method` with exactly `params` (no session prepended).
    pub async fn raw_call(&self, method: &str, params: Vec<Value>) -> Result<Value, XapiError> {
        let rpc = *self
            .rpc
            .lock()
            .map_err(|_| XapiError::Config("poisoned".into()))?;
        if rpc != Rpc::Xml {
            match self.json_call(method, &params).await {
                Ok(Some(v)) => {
                    self.set_rpc(Rpc::Json);
                    return Ok(v);
                }
                Ok(None) if rpc == Rpc::Unknown => {
                    tracing::info!(host = %self.host, "no JSON-RPC at /jsonrpc; using XML-RPC");
                    self.set_rpc(Rpc::Xml);
                }
                Ok(None) => {
                    return Err(self.protocol(method, "the reply is not JSON"));
                }
                Err(e) => return Err(e),
            }
        }
        self.xml_call(method, &params).await
    }

    fn set_rpc(&self, r: Rpc) {
        if let Ok(mut g) = self.rpc.lock() {
            *g = r;
        }
    }

    fn protocol(&self, call: &str, detail: impl Into<String>) -> XapiError {
        XapiError::Protocol {
            host: self.host.clone(),
            call: call.to_string(),
            detail: redact(&detail.into()),
        }
    }

    /// Ok(None) when the host does not answer JSON (an older host: use XML-RPC).
    async fn json_call(&self, method: &str, params: &[Value]) -> Result<Option<Value>, XapiError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
        let resp = self
            .http
            .post(format!("{}/jsonrpc", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| self.transport(method, e))?;
        let status = resp.status();
        let bytes = self.body(method, resp).await?;
        match decode_json_reply(&bytes) {
            JsonReply::NotJson => Ok(None),
            JsonReply::Failure(code, params) => Err(self.failure(method, code, params)),
            _ if !status.is_success() => Err(self.protocol(method, format!("HTTP {status}"))),
            JsonReply::Result(r) => Ok(Some(r)),
            JsonReply::Empty => Err(self.protocol(method, "neither result nor error")),
        }
    }

    /// An API response's body, bounded by `MAX_RESPONSE_BYTES`.
    async fn body(&self, call: &str, resp: reqwest::Response) -> Result<Vec<u8>, XapiError> {
        read_body(resp, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| match e {
                BodyError::Transport(e) => self.transport(call, e),
                BodyError::TooLarge(n) => self.protocol(
                    call,
                    format!(
                        "the reply is larger than {} MiB, far more than any API reply; is --host a XenServer/XCP-ng host?",
                        n >> 20
                    ),
                ),
            })
    }

    fn failure(&self, call: &str, code: String, params: Vec<String>) -> XapiError {
        // The host may echo the session reference (SESSION_INVALID does): never keep it.
        let params = params
            .into_iter()
            .map(|p| match &self.session {
                Some(s) if !s.is_empty() && p.contains(s.as_str()) => {
                    p.replace(s.as_str(), super::error::REDACTED_SESSION)
                }
                _ => p,
            })
            .collect();
        XapiError::Api(ApiFailure {
            call: call.to_string(),
            code,
            params,
        })
    }

    async fn xml_call(&self, method: &str, params: &[Value]) -> Result<Value, XapiError> {
        let resp = self
            .http
            .post(format!("{}/", self.base))
            .header("content-type", "text/xml")
            .body(xmlrpc::encode_call(method, params))
            .send()
            .await
            .map_err(|e| self.transport(method, e))?;
        let status = resp.status();
        let body = self.body(method, resp).await?;
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            return Err(self.protocol(method, format!("HTTP {status}")));
        }
        let v = xmlrpc::decode_response(&text).map_err(|e| self.protocol(method, e))?;
        match v.get("Status").map(text_of).as_deref() {
            Some("Success") => v
                .get("Value")
                .cloned()
                .ok_or_else(|| self.protocol(method, "Success without Value")),
            Some("Failure") => {
                let mut it = match v.get("ErrorDescription") {
                    Some(Value::Array(a)) => a.iter().map(text_of).collect::<Vec<_>>().into_iter(),
                    _ => Vec::new().into_iter(),
                };
                let code = it.next().unwrap_or_else(|| "UNKNOWN".into());
                Err(self.failure(method, code, it.collect()))
            }
            _ => Err(self.protocol(method, "no Status in the reply")),
        }
    }

    /// Log in. The password is sent and forgotten.
    pub async fn login(&mut self, user: &str, password: &str) -> Result<(), XapiError> {
        let r = self
            .raw_call(
                "session.login_with_password",
                vec![
                    json!(user),
                    json!(password),
                    json!(API_VERSION),
                    json!(ORIGINATOR),
                ],
            )
            .await?;
        match r {
            Value::String(s) if !s.is_empty() => {
                self.session = Some(s);
                Ok(())
            }
            _ => Err(self.protocol("session.login_with_password", "no session reference")),
        }
    }

    /// Log out (sessions are limited per user); errors are logged, not returned.
    pub async fn logout(&mut self) {
        if let Some(s) = self.session.take()
            && let Err(e) = self.raw_call("session.logout", vec![json!(s)]).await
        {
            tracing::warn!(host = %self.host, error = %e, "logout failed");
        }
    }

    pub(crate) fn session_id(&self) -> Result<&str, XapiError> {
        self.session
            .as_deref()
            .ok_or_else(|| XapiError::Config("internal: not logged in".into()))
    }

    /// Call `method(session, args...)`.
    pub async fn call(&self, method: &str, args: Vec<Value>) -> Result<Value, XapiError> {
        let mut params = Vec::with_capacity(args.len() + 1);
        params.push(json!(self.session_id()?));
        params.extend(args);
        self.raw_call(method, params).await
    }

    pub async fn call_str(&self, method: &str, args: Vec<Value>) -> Result<String, XapiError> {
        match self.call(method, args).await? {
            Value::String(s) => Ok(s),
            other => Err(self.protocol(method, format!("expected a string, got {other}"))),
        }
    }

    /// `https://HOST/PATH?session_id=...&QUERY`: for the HTTP handlers.
    fn handler_url(&self, path: &str, query: &[(&str, &str)]) -> Result<reqwest::Url, XapiError> {
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base))
            .map_err(|e| XapiError::Config(format!("URL: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("session_id", self.session_id()?);
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        Ok(url)
    }

    /// An error page in the body of a failed (or falsely successful) handler reply.
    async fn handler_error(&self, what: &str, resp: reqwest::Response) -> XapiError {
        let status = resp.status().as_u16();
        // An excerpt is all an error shows: read no more than a small page.
        let body = match read_body(resp, 64 << 10).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(BodyError::TooLarge(_)) => "(a page of more than 64 KiB)".into(),
            Err(BodyError::Transport(_)) => String::new(),
        };
        let mut excerpt: String = body.chars().take(300).collect();
        excerpt = excerpt.split_whitespace().collect::<Vec<_>>().join(" ");
        XapiError::Http {
            what: what.to_string(),
            status,
            body: redact(&excerpt),
        }
    }

    /// `GET /export_raw_vdi` of `vdi` (uuid): the raw disk, `expected` bytes long. A 302 to
    /// another host is followed; an error page (even inside a 200) is an error.
    pub async fn export_raw_vdi(
        &self,
        vdi: &str,
        expected: u64,
    ) -> Result<reqwest::Response, XapiError> {
        let what = format!("export_raw_vdi of VDI {vdi}");
        let url = self.handler_url("/export_raw_vdi", &[("vdi", vdi), ("format", "raw")])?;
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.transport(&what, e))?;
        let is_html = resp
            .headers()
            .get("content-type")
            .and_then(|c| c.to_str().ok())
            .is_some_and(|c| c.contains("html"));
        if !resp.status().is_success() || is_html {
            return Err(self.handler_error(&what, resp).await);
        }
        if let Some(len) = resp.content_length()
            && len != expected
        {
            return Err(XapiError::Http {
                what,
                status: resp.status().as_u16(),
                body: format!("the host announces {len} bytes where the VDI holds {expected}"),
            });
        }
        Ok(resp)
    }

    /// `GET /export_metadata` of a VM without its snapshots: a tar holding `ova.xml`.
    pub async fn export_metadata(&self, vm_uuid: &str) -> Result<Vec<u8>, XapiError> {
        let what = format!("export_metadata of VM {vm_uuid}");
        let url = self.handler_url(
            "/export_metadata",
            &[("uuid", vm_uuid), ("export_snapshots", "false")],
        )?;
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.transport(&what, e))?;
        if !resp.status().is_success() {
            return Err(self.handler_error(&what, resp).await);
        }
        let body = self.metadata_body(&what, resp).await?;
        if !crate::tar::holds(&body, "ova.xml") {
            let excerpt: String = String::from_utf8_lossy(&body[..body.len().min(200)]).into();
            return Err(XapiError::Http {
                what,
                status: 200,
                body: format!("not a tar holding ova.xml: {}", redact(&excerpt)),
            });
        }
        Ok(body)
    }

    /// The body of `/export_metadata`. xapi sends it close-delimited and may end the TLS stream
    /// without a `close_notify`: an error after the bytes form a tar read to its end blocks is
    /// the end of a complete body; before that, the message says how far it got.
    async fn metadata_body(
        &self,
        what: &str,
        mut resp: reqwest::Response,
    ) -> Result<Vec<u8>, XapiError> {
        let mut out = Vec::new();
        let cut = |out: &Vec<u8>, how: String| XapiError::Http {
            what: what.to_string(),
            status: 200,
            body: format!(
                "{how} after {} bytes, before the end of the archive",
                out.len()
            ),
        };
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if out.len().saturating_add(c.len()) > MAX_RESPONSE_BYTES {
                        return Err(self.protocol(
                            what,
                            format!(
                                "the metadata export is larger than {} MiB",
                                MAX_RESPONSE_BYTES >> 20
                            ),
                        ));
                    }
                    out.extend_from_slice(&c);
                }
                // A clean end: what arrived is checked as a tar by the caller.
                Ok(None) => return Ok(out),
                Err(e) if crate::tar::complete(&out) => {
                    tracing::debug!(error = %error_chain(e), "export_metadata: the archive is complete; the connection ended without close_notify");
                    return Ok(out);
                }
                Err(e) if e.is_timeout() => {
                    return Err(cut(
                        &out,
                        format!("the host sent nothing for {} s", self.timeout.as_secs()),
                    ));
                }
                Err(e) => {
                    return Err(cut(
                        &out,
                        format!("the connection ended ({})", error_chain(e)),
                    ));
                }
            }
        }
    }

    /// `PUT /import_metadata`: a VM from a metadata export, its disks mapped (original VDI uuid
    /// → new VDI uuid). The outcome is in `task`.
    pub async fn import_metadata(
        &self,
        task: &str,
        vdi_map: &[(&str, &str)],
        tar: Vec<u8>,
    ) -> Result<(), XapiError> {
        let what = "import_metadata".to_string();
        let maps: Vec<(String, &str)> = vdi_map
            .iter()
            .map(|(from, to)| (format!("vdi:{from}"), *to))
            .collect();
        let mut q: Vec<(&str, &str)> = vec![("task_id", task)];
        q.extend(maps.iter().map(|(k, v)| (k.as_str(), *v)));
        let url = self.handler_url("/import_metadata", &q)?;
        let len = tar.len() as u64;
        let resp = self
            .http
            .put(url)
            .header("content-length", len)
            .body(tar)
            .send()
            .await
            .map_err(|e| self.transport(&what, e))?;
        if !resp.status().is_success() {
            return Err(self.handler_error(&what, resp).await);
        }
        Ok(())
    }

    /// `PUT /import_raw_vdi`: exactly `len` bytes from `body` (Content-Length, never chunked:
    /// the host refuses chunked uploads). The host may stop taking bytes, or stay silent
    /// after the last one, for the timeout at most; `body` itself may take its time.
    pub async fn import_raw_vdi<S>(&self, vdi: &str, body: S, len: u64) -> Result<(), XapiError>
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static,
    {
        let what = format!("import_raw_vdi into VDI {vdi}");
        let url = self.handler_url("/import_raw_vdi", &[("vdi", vdi), ("format", "raw")])?;
        let watch = Arc::new(Watch::default());
        let body = reqwest::Body::wrap_stream(watched(body, watch.clone()));
        let send = self
            .upload
            .put(url)
            .header("content-length", len)
            .body(body)
            .send();
        tokio::pin!(send);
        let resp = loop {
            tokio::select! {
                r = &mut send => break r.map_err(|e| self.transport(&what, e))?,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    if watch.stalled(self.timeout) {
                        return Err(XapiError::Timeout {
                            host: self.host.clone(),
                            call: what,
                            secs: self.timeout.as_secs(),
                        });
                    }
                }
            }
        };
        if !resp.status().is_success() {
            return Err(self.handler_error(&what, resp).await);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rpc_replies_in_both_versions() {
        assert_eq!(
            interpret_json(json!({"jsonrpc": "2.0", "result": "OpaqueRef:1", "id": 1})),
            Ok(Some(json!("OpaqueRef:1")))
        );
        assert_eq!(
            interpret_json(
                json!({"jsonrpc": "2.0", "error": {"code": 1, "message": "VDI_IN_USE", "data": ["OpaqueRef:2", "data_destroy"]}, "id": 1})
            ),
            Err((
                "VDI_IN_USE".into(),
                vec!["OpaqueRef:2".into(), "data_destroy".into()]
            ))
        );
        assert_eq!(
            interpret_json(
                json!({"result": null, "error": ["SESSION_INVALID", "OpaqueRef:3"], "id": 1})
            ),
            Err(("SESSION_INVALID".into(), vec!["OpaqueRef:3".into()]))
        );
        assert_eq!(
            interpret_json(json!({"result": true, "error": null, "id": 1})),
            Ok(Some(json!(true)))
        );
        assert_eq!(interpret_json(json!({"id": 1})), Ok(None));
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTPS server answering every request on its connection with `answer(request head)`
    /// (written in pieces, as a real server streams), then closing.
    async fn https_server(
        answer: impl Fn(&str) -> Vec<Vec<u8>> + Send + Sync + 'static,
    ) -> (String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = crate::sim::server::self_signed(dir.path(), "127.0.0.1").unwrap();
        let tls = crate::sim::nbd::tls_config(&cert, &key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (acceptor, answer) = (acceptor.clone(), answer.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut b = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&b[..n]),
                        }
                    }
                    for piece in answer(&String::from_utf8_lossy(&head)) {
                        if tls.write_all(&piece).await.is_err() {
                            return;
                        }
                    }
                    let _ = tls.shutdown().await;
                });
            }
        });
        (url, dir)
    }

    fn client(url: &str) -> Xapi {
        let mut x = Xapi::connect(&HostConfig {
            url: url.into(),
            trust: HostTrust::Insecure,
            timeout: Duration::from_secs(30),
        })
        .unwrap();
        x.session = Some("OpaqueRef:5ec2e7-session".into());
        x
    }

    #[tokio::test]
    async fn a_redirect_from_https_to_http_is_refused_and_nothing_reaches_the_plain_port() {
        // Where the downgrade points: a plain listener that counts connections.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_addr = plain.local_addr().unwrap();
        let reached = Arc::new(AtomicU64::new(0));
        let r = reached.clone();
        tokio::spawn(async move {
            while plain.accept().await.is_ok() {
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        let (url, _d) = https_server(move |head| {
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            vec![
                format!(
                    "HTTP/1.1 302 Found\r\nLocation: http://{plain_addr}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .into_bytes(),
            ]
        })
        .await;
        let x = client(&url);
        let e = x
            .export_raw_vdi("3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b", 1 << 20)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("refused a redirect to http://{}", plain_addr.ip())),
            "{e}"
        );
        assert!(
            !e.contains("5ec2e7"),
            "the session leaked into the error: {e}"
        );
        let e = x.export_metadata("vm").await.err().unwrap().to_string();
        assert!(e.contains("refused a redirect"), "{e}");
        let e = x
            .call("VM.get_all", vec![])
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("refused a redirect"), "{e}");
        assert_eq!(
            reached.load(Ordering::SeqCst),
            0,
            "a request went out in plain text"
        );
    }

    #[tokio::test]
    async fn an_api_reply_larger_than_the_bound_is_an_error() {
        // One server announcing its length, one streaming without (Connection: close).
        let over = MAX_RESPONSE_BYTES + 1;
        let (announced, _d1) = https_server(move |_| {
            vec![format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {over}\r\n\r\n"
            )
            .into_bytes()]
        })
        .await;
        let (streamed, _d2) = https_server(move |_| {
            let mut v = vec![
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n[\"".to_vec(),
            ];
            v.extend((0..=MAX_RESPONSE_BYTES >> 20).map(|_| vec![b'a'; 1 << 20]));
            v
        })
        .await;
        for url in [announced, streamed] {
            let e = client(&url)
                .call("VM.get_all", vec![])
                .await
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("larger than 64 MiB"), "{url}: {e}");
        }
    }

    #[test]
    fn failures_never_carry_the_session_reference() {
        let x = client("https://127.0.0.1:1");
        let e = x
            .failure(
                "VDI.get_record",
                "HANDLE_INVALID".into(),
                vec!["session".into(), "OpaqueRef:5ec2e7-session".into()],
            )
            .to_string();
        assert!(!e.contains("5ec2e7"), "{e}");
        assert!(e.contains("(session, <session redacted>)"), "{e}");
    }

    #[test]
    fn json_reply_bodies() {
        assert_eq!(decode_json_reply(b"<html>"), JsonReply::NotJson);
        assert_eq!(decode_json_reply(b""), JsonReply::NotJson);
        assert_eq!(decode_json_reply(b"{\"id\":1}"), JsonReply::Empty);
        assert_eq!(decode_json_reply(b"[1,2]"), JsonReply::Empty);
        assert_eq!(
            decode_json_reply(b"{\"result\":\"OpaqueRef:1\",\"id\":1}"),
            JsonReply::Result(json!("OpaqueRef:1"))
        );
        assert_eq!(
            decode_json_reply(b"{\"error\":[\"SESSION_INVALID\",\"OpaqueRef:s\"]}"),
            JsonReply::Failure("SESSION_INVALID".into(), vec!["OpaqueRef:s".into()])
        );
        // Nesting past serde_json's limit is "not JSON", not a stack overflow.
        let deep = "[".repeat(100_000);
        assert_eq!(decode_json_reply(deep.as_bytes()), JsonReply::NotJson);
    }

    #[test]
    fn host_urls() {
        assert_eq!(
            parse_url("https://xs1.example").unwrap(),
            ("https://xs1.example".into(), "xs1.example".into())
        );
        assert_eq!(parse_url("https://10.0.0.1:8443/").unwrap().1, "10.0.0.1");
        assert!(parse_url("http://xs1").is_err());
        assert!(parse_url("https://user:pw@xs1").is_err());
        assert!(parse_url("https://xs1/path").is_err());
    }
}
