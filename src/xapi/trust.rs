//! Trust for the management API's HTTPS: a CA, or the host's certificate pinned on first use
//! (its SHA-256 fingerprint kept in the repository), or nothing at all when the user says so.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

/// How the host's certificate is trusted.
#[derive(Debug, Clone)]
pub enum HostTrust {
    /// Certificates a CA in this PEM bundle signed for the host's name.
    Ca(String),
    /// Exactly the certificate with this fingerprint; `None` on first use (whatever the host
    /// presents is recorded, to be pinned by the caller).
    Pinned(Option<String>),
    /// No check (`--insecure-tls`).
    Insecure,
}

/// `SHA256:AB:CD:...`, as `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = d.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    format!("SHA256:{}", hex.join(":"))
}

/// The fingerprint of the first certificate in a PEM text.
pub fn pem_fingerprint(pem: &str) -> Option<String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(|c| c.ok())
        .map(|c| fingerprint(&c))
}

#[derive(Debug)]
struct Verifier {
    ca: Option<Arc<dyn ServerCertVerifier>>,
    expected: Option<String>,
    check: bool,
    seen: SeenCertificate,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let fp = fingerprint(end_entity);
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(fp.clone());
        }
        if let Some(ca) = &self.ca {
            return ca.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        }
        match &self.expected {
            Some(e) if self.check && *e != fp => Err(Error::General(format!(
                "certificate {fp} is not the pinned {e}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Where the verifier records the fingerprint of the certificate the host presented.
pub type SeenCertificate = Arc<Mutex<Option<String>>>;

/// A TLS client config for `trust`, and where the fingerprint of the certificate the host
/// presented is recorded.
pub fn client_config(trust: &HostTrust) -> Result<(ClientConfig, SeenCertificate), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let seen = Arc::new(Mutex::new(None));
    let ca: Option<Arc<dyn ServerCertVerifier>> = match trust {
        HostTrust::Ca(pem) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let c = c.map_err(|e| format!("the CA file is not PEM: {e}"))?;
                roots
                    .add(c)
                    .map_err(|e| format!("the CA file holds an unusable certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err("the CA file holds no certificate".into());
            }
            let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| e.to_string())?;
            Some(v)
        }
        _ => None,
    };
    let (expected, check) = match trust {
        HostTrust::Pinned(fp) => (fp.clone(), true),
        _ => (None, false),
    };
    let verifier = Verifier {
        ca,
        expected,
        check,
        seen: seen.clone(),
        provider: provider.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((config, seen))
}
