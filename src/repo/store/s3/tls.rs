//! The TLS settings of every S3 client, made once per process.
//!
//! Left to itself, reqwest reads the system's CA roots for every client it builds (on Debian,
//! `ca-certificates.crt` and the ~150 files of `/etc/ssl/certs`, each parsed): the object
//! client and the raw-request client of a store, then both again in a mount's forked daemon,
//! which must rebuild its clients (the parent's runtime threads do not exist there), before
//! its first request. Here the roots are read once, into one `rustls::ClientConfig` per
//! [`Trust`]; every client of the process is built from a clone of it, and a forked child
//! inherits the parent's copy with its memory, so the daemon reads no certificate at all.
//! A client of an `http://` endpoint (a test cluster on loopback) never makes a TLS
//! connection and reads no root.
//!
//! Roots: the system's (`rustls-native-certs`, what reqwest and object_store read by
//! themselves) plus those of `--s3-ca-cert` (`s3_ca_cert=`) when given. Protocol: HTTP/1.1
//! (no ALPN offered), what S3 clients use for parallel transfers.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

/// What a client's TLS trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The system's roots, and those of a CA file if given.
    Roots(Option<PathBuf>),
    /// Nothing: the client never makes a TLS connection (an `http://` test endpoint), so no
    /// root is read at all.
    PlainHttp,
}

impl Trust {
    /// The trust of clients of `endpoint` (None: AWS, over https) with CA file `ca`.
    pub fn of(endpoint: Option<&str>, ca: Option<&Path>) -> Trust {
        if endpoint.is_some_and(|e| e.starts_with("http://")) {
            Trust::PlainHttp
        } else {
            Trust::Roots(ca.map(Path::to_path_buf))
        }
    }
}

/// The configurations made so far in this process.
static CONFIGS: Mutex<Vec<(Trust, Arc<ClientConfig>)>> = Mutex::new(Vec::new());

/// The TLS configuration for clients with `trust`, made the first time this process asks
/// (or inherited from the parent of a fork).
pub fn client_config(trust: &Trust) -> io::Result<Arc<ClientConfig>> {
    let mut made = CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, c)) = made.iter().find(|(t, _)| t == trust) {
        return Ok(c.clone());
    }
    let roots = match trust {
        Trust::PlainHttp => RootCertStore::empty(),
        Trust::Roots(ca) => roots(ca.as_deref())?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let c = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| io::Error::other(format!("cannot set up TLS for S3: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let c = Arc::new(c);
    made.push((trust.clone(), c.clone()));
    Ok(c)
}

fn roots(ca: Option<&Path>) -> io::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    if !native.errors.is_empty() {
        tracing::debug!(errors = ?native.errors, "some system CA certificates could not be read");
    }
    let (_, unusable) = roots.add_parsable_certificates(native.certs);
    if unusable > 0 {
        tracing::debug!(
            unusable,
            "system CA certificates rustls cannot use were skipped"
        );
    }
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot read the CA certificate {}: {e}", ca.display()),
            )
        })?;
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} {why}; give --s3-ca-cert (the mount option s3_ca_cert=) a PEM file of the CA that signed the endpoint's certificate",
                    ca.display()
                ),
            )
        };
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| bad(format!("is not a PEM certificate file ({e})")))?;
            roots
                .add(c)
                .map_err(|e| bad(format!("holds an unusable certificate ({e})")))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad("holds no PEM certificate".into()));
        }
    }
    if roots.is_empty() {
        tracing::warn!(
            "no CA certificate found on this system: TLS connections to S3 will fail unless --s3-ca-cert names one"
        );
    }
    Ok(roots)
}

/// A reqwest client builder using the process's TLS configuration for `trust`.
pub fn client_builder(trust: &Trust) -> io::Result<reqwest::ClientBuilder> {
    let tls = client_config(trust)?;
    Ok(reqwest::Client::builder().use_preconfigured_tls((*tls).clone()))
}

/// object_store's clients, built on [`client_builder`] instead of reading the roots again.
#[derive(Debug)]
pub struct Connector {
    pub trust: Trust,
    pub connect_timeout: std::time::Duration,
    pub allow_http: bool,
}

impl object_store::client::HttpConnector for Connector {
    fn connect(
        &self,
        _options: &object_store::ClientOptions,
    ) -> object_store::Result<object_store::client::HttpClient> {
        let generic = |e: Box<dyn std::error::Error + Send + Sync>| object_store::Error::Generic {
            store: "S3",
            source: e,
        };
        let c = client_builder(&self.trust)
            .map_err(|e| generic(Box::new(e)))?
            .connect_timeout(self.connect_timeout)
            .https_only(!self.allow_http)
            .user_agent(concat!("cbtfs/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| generic(Box::new(e)))?;
        Ok(object_store::client::HttpClient::new(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_configuration_per_trust_and_bad_ca_files_are_named() {
        let roots = Trust::of(Some("https://s3.example"), None);
        assert_eq!(roots, Trust::Roots(None));
        let a = client_config(&roots).unwrap();
        let b = client_config(&roots).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the roots are read once");
        let plain = Trust::of(Some("http://127.0.0.1:1"), Some(Path::new("/ignored")));
        assert_eq!(plain, Trust::PlainHttp);
        assert!(!Arc::ptr_eq(&a, &client_config(&plain).unwrap()));
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        let e = client_config(&Trust::Roots(Some(p)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ca.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = client_config(&Trust::Roots(Some(d.path().join("absent.pem"))))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read the CA certificate"), "{e}");
    }
}
