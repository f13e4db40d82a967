//! Trust for NBD over TLS: the host's own certificate pinned exactly, or a CA.
//!
//! XenServer hands each NBD connection's certificate (PEM) and subject over the management API.
//! Its certificates are self-signed RSA with only a subjectAltName and no basicConstraints
//! (xen-api's `gencert`), which path validation refuses as an anchor; so a pinned certificate is
//! trusted by exact match of the DER the server presents, its name checked against the expected
//! subject, and the handshake signature verified with its key. TLS 1.2 (ECDHE-RSA, AES-GCM,
//! secp384r1, as xapi-nbd offers) and 1.3 are enabled.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

/// How the server's certificate is trusted.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Exactly this certificate (PEM as the host gives it), for this subject name.
    Pinned { cert_pem: String, subject: String },
    /// Any certificate a CA in this PEM bundle signed for `subject`.
    Ca { ca_pem: String, subject: String },
}

impl Trust {
    pub fn subject(&self) -> &str {
        match self {
            Trust::Pinned { subject, .. } | Trust::Ca { subject, .. } => subject,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("the certificate is not PEM: {0}")]
    BadPem(String),
    #[error("{0:?} is not a valid TLS server name")]
    BadName(String),
    #[error("TLS setup: {0}")]
    Rustls(#[from] Error),
}

fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first (TLS 1.3 and 1.2): as sound for this traffic as AES-256, and about a
    // third less CPU per byte on both ends: the host's dom0 encrypts every block we read.
    p.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite::*;
        match s.suite() {
            TLS13_AES_128_GCM_SHA256
            | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
            | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => 0,
            _ => 1,
        }
    });
    Arc::new(p)
}

#[derive(Debug)]
struct PinnedVerifier {
    cert: CertificateDer<'static>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if end_entity.as_ref() != self.cert.as_ref() {
            return Err(Error::General(
                "the server's certificate is not the one the host gave for this connection (pinned certificate mismatch)".into(),
            ));
        }
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| Error::General(format!("unreadable server certificate: {e}")))?;
        cert.verify_is_valid_for_subject_name(server_name)
            .map_err(|_| {
                Error::General(format!(
                    "the pinned certificate is not issued for {server_name:?} (subject mismatch)"
                ))
            })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let v: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let v = v.map_err(|e| TlsSetupError::BadPem(e.to_string()))?;
    if v.is_empty() {
        return Err(TlsSetupError::BadPem("no CERTIFICATE block".into()));
    }
    Ok(v)
}

/// A client configuration and the server name to present, for `trust`.
pub fn client_config(trust: &Trust) -> Result<(ClientConfig, ServerName<'static>), TlsSetupError> {
    let name = ServerName::try_from(trust.subject().to_string())
        .map_err(|_| TlsSetupError::BadName(trust.subject().into()))?;
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let config = match trust {
        Trust::Pinned { cert_pem, .. } => {
            let cert = certs(cert_pem)?.remove(0);
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                    cert,
                    algs: provider.signature_verification_algorithms,
                }))
                .with_no_client_auth()
        }
        Trust::Ca { ca_pem, .. } => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca_pem)? {
                roots.add(c)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok((config, name))
}
