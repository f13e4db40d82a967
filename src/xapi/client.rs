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
    /// Whole-request limit for API calls (not for the data handlers).
    pub timeout: Duration,
}

/// A connection to one host, logged in once `login` succeeded.
pub struct Xapi {
    http: reqwest::Client,
    base: String,
    host: String,
    rpc: Mutex<Rpc>,
    session: Option<String>,
    seen_cert: Arc<Mutex<Option<String>>>,
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

impl Xapi {
    pub fn connect(cfg: &HostConfig) -> Result<Xapi, XapiError> {
        let (base, host) = parse_url(&cfg.url)?;
        let (tls, seen_cert) = trust::client_config(&cfg.trust).map_err(XapiError::Config)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(|e| XapiError::Config(format!("HTTP client: {e}")))?;
        Ok(Xapi {
            http,
            base,
            host,
            rpc: Mutex::new(Rpc::Unknown),
            session: None,
            seen_cert,
            next_id: AtomicU64::new(1),
            timeout: cfg.timeout,
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The fingerprint of the certificate the host presented (after the first request).
    pub fn seen_certificate(&self) -> Option<String> {
        self.seen_cert.lock().ok().and_then(|s| s.clone())
    }

    /// True when the host answered XML-RPC only.
    pub fn uses_xmlrpc(&self) -> bool {
        self.rpc.lock().map(|r| *r == Rpc::Xml).unwrap_or(false)
    }

    fn transport(&self, e: reqwest::Error) -> XapiError {
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
        XapiError::Transport {
            host: self.host.clone(),
            detail: redact(&detail),
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
            .timeout(self.timeout)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
            return Ok(None);
        };
        if !status.is_success() && v.get("error").is_none() {
            return Err(self.protocol(method, format!("HTTP {status}")));
        }
        match interpret_json(v) {
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => Err(self.protocol(method, "neither result nor error")),
            Err((code, params)) => Err(self.failure(method, code, params)),
        }
    }

    fn failure(&self, call: &str, code: String, params: Vec<String>) -> XapiError {
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
            .timeout(self.timeout)
            .header("content-type", "text/xml")
            .body(xmlrpc::encode_call(method, params))
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.transport(e))?;
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
        let body = resp.text().await.unwrap_or_default();
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
            .map_err(|e| self.transport(e))?;
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
            return Err(self.handler_error(&what, resp).await);
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
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if !resp.status().is_success() {
            return Err(self.handler_error(&what, resp).await);
        }
        let body = resp.bytes().await.map_err(|e| self.transport(e))?;
        if !crate::tar::holds(&body, "ova.xml") {
            let excerpt: String = String::from_utf8_lossy(&body[..body.len().min(200)]).into();
            return Err(XapiError::Http {
                what,
                status: 200,
                body: format!("not a tar holding ova.xml: {}", redact(&excerpt)),
            });
        }
        Ok(body.to_vec())
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
            .timeout(self.timeout)
            .header("content-length", len)
            .body(tar)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if !resp.status().is_success() {
            return Err(self.handler_error(&what, resp).await);
        }
        Ok(())
    }

    /// `PUT /import_raw_vdi`: exactly `len` bytes from `body` (Content-Length, never chunked:
    /// the host refuses chunked uploads).
    pub async fn import_raw_vdi(
        &self,
        vdi: &str,
        body: reqwest::Body,
        len: u64,
    ) -> Result<(), XapiError> {
        let what = format!("import_raw_vdi into VDI {vdi}");
        let url = self.handler_url("/import_raw_vdi", &[("vdi", vdi), ("format", "raw")])?;
        let resp = self
            .http
            .put(url)
            .header("content-length", len)
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
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
