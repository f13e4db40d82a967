//! Trust for the management API's HTTPS: a CA, or the host's certificate pinned on first use
//! (its SHA-256 fingerprint kept in the repository), or nothing at all when the user says so.

use std::collections::HashMap;
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

/// What the verifier knows and learns during a run: the certificate each handshake
/// presented, the pinned fingerprint, and the pool members' fingerprints the pinned master
/// handed over (the client is shared, so these are set behind locks as the run learns them).
#[derive(Debug, Default)]
pub struct TrustState {
    seen: Mutex<Option<String>>,
    pinned: Mutex<Option<String>>,
    /// Fingerprint by the name or address a member is reached at.
    members: Mutex<HashMap<String, String>>,
}

impl TrustState {
    /// The fingerprint of the certificate the last handshake presented.
    pub fn seen(&self) -> Option<String> {
        self.seen.lock().ok().and_then(|s| s.clone())
    }

    /// From now on the host must present this certificate (first use, once pinned).
    pub fn pin(&self, fp: &str) {
        if let Ok(mut p) = self.pinned.lock() {
            *p = Some(fp.to_string());
        }
    }

    /// Trust `fp` for the pool member reached at `address` (as the pinned master says).
    pub fn trust_member(&self, address: &str, fp: &str) {
        if let Ok(mut m) = self.members.lock() {
            m.insert(address.to_ascii_lowercase(), fp.to_string());
        }
    }

    /// Is `fp` the certificate to accept from `name`? The error says why not.
    fn check(&self, name: &str, fp: &str) -> Result<(), String> {
        let member = self
            .members
            .lock()
            .ok()
            .and_then(|m| m.get(&name.to_ascii_lowercase()).cloned());
        let pinned = self.pinned.lock().ok().and_then(|p| p.clone());
        match (member, pinned) {
            (Some(m), _) if m == fp => Ok(()),
            (Some(m), _) => Err(format!(
                "{name} presented certificate {fp}, but the pool master says {name}'s certificate is {m}; refused"
            )),
            (None, Some(p)) if p == fp => Ok(()),
            (None, Some(p)) => Err(format!(
                "{name} presented certificate {fp}, which is neither the pinned {p} nor one the pool master handed over for {name}; refused (is {name} a member of this pool?)"
            )),
            // First use: whatever is presented is recorded and pinned by the caller.
            (None, None) => Ok(()),
        }
    }
}

/// The name a handshake is for, as a host name or an address.
fn name_of(server_name: &ServerName<'_>) -> String {
    match server_name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

#[derive(Debug)]
struct Verifier {
    ca: Option<Arc<dyn ServerCertVerifier>>,
    check: bool,
    state: Arc<TrustState>,
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
        if let Ok(mut s) = self.state.seen.lock() {
            *s = Some(fp.clone());
        }
        if let Some(ca) = &self.ca {
            return ca.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        }
        if !self.check {
            return Ok(ServerCertVerified::assertion());
        }
        self.state
            .check(&name_of(server_name), &fp)
            .map(|_| ServerCertVerified::assertion())
            .map_err(Error::General)
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

/// A TLS client config for `trust`, and the verifier's state: where the fingerprint of the
/// certificate the host presented is recorded, and where pins learnt during the run go.
pub fn client_config(trust: &HostTrust) -> Result<(ClientConfig, Arc<TrustState>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let state = Arc::new(TrustState::default());
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
    let check = match trust {
        HostTrust::Pinned(fp) => {
            if let Some(fp) = fp {
                state.pin(fp);
            }
            true
        }
        _ => false,
    };
    let verifier = Verifier {
        ca,
        check,
        state: state.clone(),
        provider: provider.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((config, state))
}

/// Is `s` a fingerprint as `fingerprint` writes it (`SHA256:` and 32 colon-separated
/// uppercase hex pairs)?
pub fn valid_fingerprint(s: &str) -> bool {
    let Some(hex) = s.strip_prefix("SHA256:") else {
        return false;
    };
    let pairs: Vec<&str> = hex.split(':').collect();
    pairs.len() == 32
        && pairs
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'F')))
}

/// Longest pin file read: a fingerprint line is 103 bytes.
const MAX_PIN_BYTES: u64 = 4096;

/// The fingerprint pinned in `path`: `None` only when the file does not exist (first use). A
/// pin file that is empty, unreadable or holds anything but one fingerprint is an error naming
/// it: treating it as first use would send the password to a host nobody verified.
pub fn read_pin(path: &std::path::Path) -> Result<Option<String>, super::XapiError> {
    use std::io::Read;
    let file = path.display().to_string();
    let err = |problem: String| super::XapiError::Pin {
        file: file.clone(),
        problem,
    };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(format!("cannot be read ({e})"))),
    };
    let mut bytes = Vec::new();
    f.take(MAX_PIN_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot be read ({e})")))?;
    parse_pin(&bytes, &file).map(Some)
}

/// The fingerprint a pin holds (`file` names it in errors).
pub fn parse_pin(bytes: &[u8], file: &str) -> Result<String, super::XapiError> {
    let err = |problem: String| super::XapiError::Pin {
        file: file.to_string(),
        problem,
    };
    if bytes.len() as u64 > MAX_PIN_BYTES {
        return Err(err("is far longer than a fingerprint".into()));
    }
    let text = String::from_utf8_lossy(bytes);
    let fp = text.trim();
    if fp.is_empty() {
        return Err(err(
            "is empty (a run may have been interrupted while pinning)".into(),
        ));
    }
    if !valid_fingerprint(fp) {
        let shown: String = fp.chars().take(120).collect();
        return Err(err(format!(
            "does not hold a SHA-256 fingerprint like SHA256:AB:CD:... (it holds {shown:?})"
        )));
    }
    Ok(fp.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_trusted_for_their_own_address_only_and_unknown_ones_are_refused() {
        let (master, member, other) = (fingerprint(b"m"), fingerprint(b"p"), fingerprint(b"x"));
        let t = TrustState::default();
        // First use: anything, to be pinned.
        assert!(t.check("xs1", &other).is_ok());
        t.pin(&master);
        assert!(t.check("xs1", &master).is_ok());
        let e = t.check("10.0.0.2", &member).unwrap_err();
        assert!(
            e.contains("10.0.0.2") && e.contains("neither the pinned"),
            "{e}"
        );
        t.trust_member("10.0.0.2", &member);
        assert!(t.check("10.0.0.2", &member).is_ok());
        // A member's certificate is not good for another name, nor another for the member.
        assert!(t.check("10.0.0.3", &member).is_err());
        let e = t.check("10.0.0.2", &other).unwrap_err();
        assert!(
            e.contains("the pool master says 10.0.0.2's certificate is"),
            "{e}"
        );
    }

    #[test]
    fn pin_files_missing_valid_empty_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.pin");
        assert_eq!(read_pin(&p).unwrap(), None);
        let fp = fingerprint(b"a certificate");
        std::fs::write(&p, format!("{fp}\n")).unwrap();
        assert_eq!(read_pin(&p).unwrap(), Some(fp.clone()));
        for (bytes, says) in [
            (&b""[..], "is empty"),
            (b" \n\n", "is empty"),
            (b"SHA256:AB\n", "does not hold a SHA-256 fingerprint"),
            (b"hello", "does not hold a SHA-256 fingerprint"),
        ] {
            std::fs::write(&p, bytes).unwrap();
            let e = read_pin(&p).unwrap_err().to_string();
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(e.contains(says), "{e}");
            assert!(e.contains("delete it to pin"), "{e}");
        }
        std::fs::write(&p, vec![b'A'; 10_000]).unwrap();
        assert!(read_pin(&p).unwrap_err().to_string().contains("longer"));
        // A directory where the file should be: unreadable, not first use.
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert!(
            read_pin(&p)
                .unwrap_err()
                .to_string()
                .contains("cannot be read")
        );
    }
}
