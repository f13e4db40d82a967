//! Raw S3 requests signed with AWS Signature Version 4, for what `object_store` 0.12 cannot
//! send: Object Lock headers on a PUT, bucket versioning and Object Lock configuration, object
//! retention, object versions, multipart uploads.
//!
//! * Signing ([`Signer::sign`]) follows AWS's "Signature Version 4 signing process" for S3:
//!   canonical request (method, URI-encoded path, sorted query, sorted lower-case headers, the
//!   payload's SHA-256), string to sign, key derived by HMAC-SHA256 from the secret, date,
//!   region and service. ring does the hashing; every header cbtfs sets is signed.
//! * Sending ([`S3Store::raw`]) goes to the same bucket URL `object_store` uses (the store's
//!   endpoint, region and addressing: [`S3Store::bucket_url`]) with the store's credentials, on
//!   the store's runtime. Response bodies are read up to a bound given by each caller and
//!   refused past it (a listing page, a small XML answer): a server cannot make cbtfs allocate
//!   without limit.
//! * Answers are XML: [`parse_xml`] makes a small tree (depth-limited) of element names and
//!   texts; callers pick what they need.

use std::io;
use std::time::Duration;

use base64::Engine as _;
use ring::{digest, hmac};
use time::OffsetDateTime;

use super::{S3Store, block};
use crate::repo::store::Store as _;

/// The most XML nesting accepted in an answer (S3's are 3–4 deep).
const MAX_DEPTH: usize = 16;
/// How many times a request that failed on the way (connection, 5xx, SlowDown) is sent.
const TRIES: u32 = 4;

/// Signs requests for one access key in one region (service `s3`).
pub struct Signer<'a> {
    pub access_key: &'a str,
    pub secret_key: &'a str,
    pub session_token: Option<&'a str>,
    pub region: &'a str,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of `data`, lowercase hex (the `x-amz-content-sha256` form).
pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

/// URI-encode as SigV4 wants: everything but `A-Za-z0-9-_.~` (and `/` when `keep_slash`).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// What a signature covers.
pub struct ToSign<'a> {
    pub method: &'a str,
    /// With `:port` when not the scheme's default.
    pub host: &'a str,
    /// Already URI-encoded.
    pub path: &'a str,
    /// Query parameters, not encoded.
    pub query: &'a [(String, String)],
    /// The request's other headers.
    pub headers: &'a [(String, String)],
    /// SHA-256 of the payload, hex.
    pub payload_sha256: &'a str,
}

impl Signer<'_> {
    /// The headers to add to a request: `x-amz-date`, `x-amz-content-sha256`, the session
    /// token if any, and `authorization` (`host` is signed, and sent by the HTTP client).
    pub fn sign(&self, r: &ToSign<'_>, now: OffsetDateTime) -> Vec<(String, String)> {
        let ToSign {
            method,
            host,
            path,
            query,
            headers,
            payload_sha256,
        } = *r;
        let amz_date = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        let date = amz_date.get(..8).unwrap_or_default().to_string();
        let mut all: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        all.push(("host".into(), host.into()));
        all.push(("x-amz-date".into(), amz_date.clone()));
        all.push(("x-amz-content-sha256".into(), payload_sha256.into()));
        if let Some(t) = self.session_token {
            all.push(("x-amz-security-token".into(), t.into()));
        }
        all.sort();
        let mut q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        q.sort();
        let canonical_query = q
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let canonical_headers: String = all.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let signed = all
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical = format!(
            "{method}\n{path}\n{canonical_query}\n{canonical_headers}\n{signed}\n{payload_sha256}"
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            sha256_hex(canonical.as_bytes())
        );
        let k_date = hmac_sha256(
            format!("AWS4{}", self.secret_key).as_bytes(),
            date.as_bytes(),
        );
        let k_region = hmac_sha256(&k_date, self.region.as_bytes());
        let k_service = hmac_sha256(&k_region, b"s3");
        let k_signing = hmac_sha256(&k_service, b"aws4_request");
        let signature = hex(&hmac_sha256(&k_signing, to_sign.as_bytes()));
        let mut out: Vec<(String, String)> = all
            .into_iter()
            .filter(|(k, _)| k != "host")
            .filter(|(k, _)| !headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(k)))
            .collect();
        out.push((
            "authorization".into(),
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
                self.access_key
            ),
        ));
        out
    }
}

/// One raw request.
pub struct RawRequest<'a> {
    pub method: &'a str,
    /// The object's key below the repository's prefix (`None`: the bucket itself).
    pub key: Option<&'a str>,
    /// Query parameters, not encoded (`("versioning", "")`).
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: bytes::Bytes,
    /// The most response body bytes accepted.
    pub max_response: usize,
}

impl<'a> RawRequest<'a> {
    pub fn new(method: &'a str, key: Option<&'a str>) -> Self {
        RawRequest {
            method,
            key,
            query: Vec::new(),
            headers: Vec::new(),
            body: bytes::Bytes::new(),
            max_response: 64 << 10,
        }
    }
    pub fn query(mut self, k: &str, v: &str) -> Self {
        self.query.push((k.into(), v.into()));
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// A raw answer.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// S3's error code (`AccessDenied`, `NoSuchKey`…) from an error body, if any.
    pub fn error_code(&self) -> Option<String> {
        let t = parse_xml(&String::from_utf8_lossy(&self.body)).ok()?;
        t.text_of("Code").map(str::to_string)
    }
    /// `HTTP 403 AccessDenied: message`, for error texts.
    pub fn describe(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        match parse_xml(&text) {
            Ok(t) => format!(
                "HTTP {} {}{}",
                self.status,
                t.text_of("Code").unwrap_or(""),
                t.text_of("Message")
                    .filter(|m| !m.is_empty())
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ),
            Err(_) => format!("HTTP {}", self.status),
        }
    }
}

impl S3Store {
    /// The bucket's URL, as `object_store` addresses it: `ENDPOINT/BUCKET` (path-style),
    /// `ENDPOINT` itself when virtual-hosted addressing is asked for with an endpoint (which
    /// then names the bucket), else AWS's regional endpoint.
    pub fn bucket_url(&self) -> String {
        let bucket = &self.url.bucket;
        let region = &self.cfg.region;
        match (&self.cfg.endpoint, self.cfg.virtual_hosted) {
            (Some(e), false) => format!("{e}/{bucket}"),
            (Some(e), true) => e.clone(),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
        }
    }

    /// The full object name of `key` (with the prefix).
    pub(crate) fn object_name(&self, key: &str) -> String {
        if self.url.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.url.prefix)
        }
    }

    /// An HTTP client for raw requests (made once per process; a forked child makes its own).
    fn raw_client(&self) -> io::Result<reqwest::Client> {
        let pid = std::process::id();
        let mut g = self.extra.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, c)) = g.as_ref()
            && *p == pid
        {
            return Ok(c.clone());
        }
        // The CA roots are read once per process (`tls`), not once per client.
        let trust =
            super::tls::Trust::of(self.cfg.endpoint.as_deref(), self.cfg.ca_cert.as_deref());
        let b = super::tls::client_builder(&trust)?
            .timeout(Duration::from_secs(300))
            .connect_timeout(Duration::from_secs(10));
        let c = b.build().map_err(|e| {
            io::Error::other(format!("cannot set up the S3 client for {}: {e}", self.url))
        })?;
        *g = Some((pid, c.clone()));
        Ok(c)
    }

    /// Send a signed request; transient failures (connection, HTTP 500/503, SlowDown) are
    /// retried with back-off. Any answer from the server is returned, success or not.
    pub fn raw(&self, req: &RawRequest<'_>) -> io::Result<RawResponse> {
        let client = self.raw_client()?;
        let conn = self.conn()?;
        let (rt, _) = super::parts(&conn)?;
        let base = self.bucket_url();
        let base = base.trim_end_matches('/');
        let url_text = match req.key {
            Some(k) => format!("{base}/{}", uri_encode(&self.object_name(k), true)),
            None if self.cfg.virtual_hosted => format!("{base}/"),
            None => base.to_string(),
        };
        let query: String = req
            .query
            .iter()
            .map(|(k, v)| format!("{}={}", uri_encode(k, false), uri_encode(v, false)))
            .collect::<Vec<_>>()
            .join("&");
        let full = if query.is_empty() {
            url_text
        } else {
            format!("{url_text}?{query}")
        };
        let url = reqwest::Url::parse(&full).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("S3 request URL {full:?}: {e}"),
            )
        })?;
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("S3 request URL {full:?} has no host"),
                ));
            }
        };
        let payload_hash = sha256_hex(&req.body);
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let what = format!(
            "{} {}",
            req.method,
            self.describe(req.key.unwrap_or_default())
        );
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let signer = Signer {
                access_key: &self.cfg.access_key,
                secret_key: &self.cfg.secret_key,
                session_token: self.cfg.session_token.as_deref(),
                region: &self.cfg.region,
            };
            let signed = signer.sign(
                &ToSign {
                    method: req.method,
                    host: &host,
                    path: url.path(),
                    query: &req.query,
                    headers: &req.headers,
                    payload_sha256: &payload_hash,
                },
                OffsetDateTime::now_utc(),
            );
            let mut rb = client.request(method.clone(), url.clone());
            for (k, v) in req.headers.iter().chain(signed.iter()) {
                rb = rb.header(k.as_str(), v.as_str());
            }
            // An empty body must still say so (RGW answers 411 otherwise).
            let rb = rb
                .header(reqwest::header::CONTENT_LENGTH, req.body.len())
                .body(req.body.clone());
            let max = req.max_response;
            let got = block(rt, async move {
                let mut resp = rb.send().await?;
                let status = resp.status().as_u16();
                let headers = resp.headers().clone();
                let mut body = Vec::new();
                let mut too_big = false;
                while let Some(chunk) = resp.chunk().await? {
                    if body.len().saturating_add(chunk.len()) > max {
                        too_big = true;
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok::<_, reqwest::Error>((status, headers, body, too_big))
            });
            let retry = match &got {
                Err(_) => true,
                Ok((status, _, body, _)) => {
                    matches!(status, 500 | 502 | 503 | 504)
                        || (*status >= 400 && String::from_utf8_lossy(body).contains("SlowDown"))
                }
            };
            if retry && attempt < TRIES {
                tracing::debug!(request = %what, attempt, "S3 request failed; trying again");
                std::thread::sleep(delay);
                delay = delay.saturating_mul(3);
                continue;
            }
            let (status, headers, body, too_big) = got.map_err(|e| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "{what}: {e}; cannot reach the S3 endpoint: check --s3-endpoint / CBTFS_S3_ENDPOINT and the network"
                    ),
                )
            })?;
            if too_big {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{what}: the answer is larger than the {max} bytes such an answer can be"
                    ),
                ));
            }
            return Ok(RawResponse {
                status,
                headers,
                body,
            });
        }
    }

    /// Send `req` and fail unless the answer is a success, naming the request and the
    /// server's error.
    pub fn raw_ok(&self, req: &RawRequest<'_>, doing: &str) -> io::Result<RawResponse> {
        let r = self.raw(req)?;
        if r.ok() {
            return Ok(r);
        }
        let kind = match r.status {
            403 => io::ErrorKind::PermissionDenied,
            404 => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        Err(io::Error::new(
            kind,
            format!(
                "{doing} {}: {}",
                self.describe(req.key.unwrap_or_default()),
                r.describe()
            ),
        ))
    }
}

/// `Content-MD5` of a body (base64), which S3 requires on a PUT carrying Object Lock headers.
pub fn content_md5(body: &[u8]) -> String {
    use md5::Digest as _;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body))
}

pub use crate::xml::Node;

/// Parse an S3 XML answer into its root element.
pub fn parse_xml(xml: &str) -> Result<Node, String> {
    crate::xml::parse(xml, MAX_DEPTH)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's published example "GET Object" (Signature Version 4 for S3, header-based
    /// authentication): the signature the documentation gives for it.
    #[test]
    fn signs_aws_documented_get_object_example() {
        let s = Signer {
            access_key: "AKIAIOSFODNN7EXAMPLE",
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            session_token: None,
            region: "us-east-1",
        };
        let now = time::macros::datetime!(2013-05-24 00:00:00 UTC);
        let empty = sha256_hex(b"");
        let out = s.sign(
            &ToSign {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                path: "/test.txt",
                query: &[],
                headers: &[("Range".into(), "bytes=0-9".into())],
                payload_sha256: &empty,
            },
            now,
        );
        let auth = &out.iter().find(|(k, _)| k == "authorization").unwrap().1;
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        // The caller's own headers are not repeated; the signer's are added.
        assert!(!out.iter().any(|(k, _)| k == "range"));
        assert!(
            out.iter()
                .any(|(k, v)| k == "x-amz-date" && v == "20130524T000000Z")
        );
    }

    #[test]
    fn encodes_like_sigv4() {
        assert_eq!(uri_encode("a b/c~d*é", true), "a%20b/c~d%2A%C3%A9");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
    }

    #[test]
    fn parses_s3_answers_and_refuses_bad_xml() {
        let t = parse_xml(
            r#"<?xml version="1.0"?><ListVersionsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><IsTruncated>false</IsTruncated><Version><Key>a&amp;b</Key><VersionId>v1</VersionId></Version><DeleteMarker><Key>c</Key></DeleteMarker></ListVersionsResult>"#,
        )
        .unwrap();
        assert_eq!(t.name, "ListVersionsResult");
        assert_eq!(t.text_of("IsTruncated"), Some("false"));
        let v: Vec<_> = t.all("Version").collect();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].text_of("Key"), Some("a&b"));
        assert_eq!(t.all("DeleteMarker").count(), 1);
        assert!(parse_xml("<a><b></a>").is_err());
        assert!(parse_xml("").is_err());
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(parse_xml(&deep).unwrap_err().contains("deeply"));
    }
}
