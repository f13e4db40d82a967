//! Errors of the management API, typed by the codes the CBT guide and xen-api name, each with
//! what the admin should do about it.

use std::fmt;

/// An error the host reported: its code and parameters (`ErrorDescription`).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiFailure {
    /// The call that failed (`VDI.enable_cbt`).
    pub call: String,
    pub code: String,
    pub params: Vec<String>,
}

/// The failures backup and restore decide on.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    VdiMissing,
    VdiInUse,
    VdiIncompatibleType,
    VdiOnBootResetIncompatible,
    SrNotAttached,
    SrHasNoPbds,
    LicenceRestriction,
    /// `SR_BACKEND_FAILURE_460`: "Source and target VDI are unrelated".
    Unrelated,
    VdiNoCbtMetadata,
    HandleInvalid,
    UuidInvalid,
    AuthenticationFailed,
    SessionInvalid,
    /// Connect to the pool master at this address instead.
    HostIsSlave(String),
    SrFull,
    Other,
}

impl ApiFailure {
    pub fn kind(&self) -> Failure {
        match self.code.as_str() {
            "VDI_MISSING" => Failure::VdiMissing,
            "VDI_IN_USE" => Failure::VdiInUse,
            "VDI_INCOMPATIBLE_TYPE" => Failure::VdiIncompatibleType,
            "VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION" => Failure::VdiOnBootResetIncompatible,
            "SR_NOT_ATTACHED" => Failure::SrNotAttached,
            "SR_HAS_NO_PBDS" => Failure::SrHasNoPbds,
            "LICENCE_RESTRICTION" | "FEATURE_RESTRICTED" => Failure::LicenceRestriction,
            "VDI_NO_CBT_METADATA" => Failure::VdiNoCbtMetadata,
            "HANDLE_INVALID" => Failure::HandleInvalid,
            "UUID_INVALID" => Failure::UuidInvalid,
            "SESSION_AUTHENTICATION_FAILED" => Failure::AuthenticationFailed,
            "SESSION_INVALID" => Failure::SessionInvalid,
            "HOST_IS_SLAVE" => {
                Failure::HostIsSlave(self.params.first().cloned().unwrap_or_default())
            }
            "SR_FULL" => Failure::SrFull,
            c if c.starts_with("SR_BACKEND_FAILURE")
                && self.params.iter().any(|p| p.contains("unrelated")) =>
            {
                Failure::Unrelated
            }
            _ => Failure::Other,
        }
    }

    /// The pool master a `HOST_IS_SLAVE` names.
    pub fn master(&self) -> Option<String> {
        match self.kind() {
            Failure::HostIsSlave(m) if !m.is_empty() => Some(m),
            _ => None,
        }
    }

    /// What to do about it, in the admin's terms.
    fn advice(&self) -> &'static str {
        match self.kind() {
            Failure::VdiMissing => "check the VDI's uuid (xe vdi-list) and that it still exists",
            Failure::VdiInUse => {
                "another operation or a VM uses the VDI; the newer snapshot of a diff must not be attached to a VM (xe vbd-list vdi-uuid=...)"
            }
            Failure::VdiIncompatibleType => {
                "changed block tracking works only on VDIs of type user or system (xe vdi-param-get param-name=type)"
            }
            Failure::VdiOnBootResetIncompatible => {
                "the VDI has on-boot=reset; set it to persist (xe vdi-param-set on-boot=persist uuid=...) to back it up"
            }
            Failure::SrNotAttached | Failure::SrHasNoPbds => {
                "the VDI's SR is not attached to a host; plug its PBD (xe pbd-plug) and make sure it is writable"
            }
            Failure::LicenceRestriction => {
                "enabling changed block tracking needs an Enterprise licence on the host (VDIs that already have CBT keep working)"
            }
            Failure::Unrelated => {
                "the snapshots belong to different CBT sets (CBT was disabled in between); a new full backup starts a new set"
            }
            Failure::VdiNoCbtMetadata => {
                "the snapshot has no CBT metadata (CBT was off when it was taken); a new full backup starts a new set"
            }
            Failure::HandleInvalid | Failure::UuidInvalid => {
                "the object no longer exists on the host (deleted, or the host was rebuilt)"
            }
            Failure::AuthenticationFailed => {
                "wrong user or password: check the password file or CBTFS_PASSWORD"
            }
            Failure::SessionInvalid => {
                "the API session ended (host restarted or session limit reached); run again"
            }
            Failure::HostIsSlave(_) => "this host is a pool member; connect to the pool master",
            Failure::SrFull => "the SR has no space left; free space on it or choose another SR",
            Failure::Other => "see the host's documentation for this error code",
        }
    }
}

/// What errors show instead of a session reference.
pub const REDACTED_SESSION: &str = "<session redacted>";

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.call, self.code)?;
        // Parameters never include the session (a secret); refs and texts help the admin.
        // SESSION_INVALID's parameter *is* the session reference (xen-api's
        // `session_invalid` carries the ref): show none of it.
        let session_invalid = self.kind() == Failure::SessionInvalid;
        let params: Vec<String> = self
            .params
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| match session_invalid {
                true => REDACTED_SESSION.to_string(),
                false => crate::nbd::client::redact_session(p),
            })
            .collect();
        if !params.is_empty() {
            write!(f, " ({})", params.join(", "))?;
        }
        write!(f, ": {}", self.advice())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum XapiError {
    #[error("{0}")]
    Api(ApiFailure),
    #[error("cannot reach {host}: {detail}")]
    Transport { host: String, detail: String },
    #[error(
        "{host} accepted the connection but did not answer {call} within {secs} s (is the host overloaded or its management API hung? try again, or raise --timeout)"
    )]
    Timeout {
        host: String,
        call: String,
        secs: u64,
    },
    #[error("{what} answered HTTP {status}: {body}")]
    Http {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{host} sent a malformed reply to {call}: {detail}")]
    Protocol {
        host: String,
        call: String,
        detail: String,
    },
    #[error(
        "the TLS certificate of {host} changed: it was pinned as {pinned}, it is now {seen}. If the host's certificate was replaced on purpose, delete {pin_file} (or pass --ca-cert) and run again; otherwise someone may be intercepting the connection"
    )]
    CertificateChanged {
        host: String,
        pinned: String,
        seen: String,
        pin_file: String,
    },
    #[error("{0}")]
    Config(String),
    #[error(
        "the pinned certificate file {file} {problem}; delete it to pin the host's certificate again on the next run (first use), or write the host's fingerprint into it (`openssl x509 -noout -fingerprint -sha256 -in /etc/xensource/xapi-ssl.pem` on the host)"
    )]
    Pin { file: String, problem: String },
}

impl XapiError {
    /// The host's failure, if this is one.
    pub fn failure(&self) -> Option<Failure> {
        match self {
            XapiError::Api(a) => Some(a.kind()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(code: &str, params: &[&str]) -> ApiFailure {
        ApiFailure {
            call: "VDI.list_changed_blocks".into(),
            code: code.into(),
            params: params.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn codes_map_to_kinds_with_advice() {
        let u = f(
            "SR_BACKEND_FAILURE_460",
            &[
                "",
                "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]",
                "",
            ],
        );
        assert_eq!(u.kind(), Failure::Unrelated);
        assert!(u.to_string().contains("new set"), "{u}");
        assert_eq!(
            f("SR_BACKEND_FAILURE_460", &["other"]).kind(),
            Failure::Other
        );
        assert_eq!(
            f("HOST_IS_SLAVE", &["10.0.0.1"]).kind(),
            Failure::HostIsSlave("10.0.0.1".into())
        );
        let t = f("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION", &[]).to_string();
        assert!(t.contains("on-boot=persist"), "{t}");
        let s = f("SESSION_INVALID", &["/x?session_id=OpaqueRef:secret"]).to_string();
        assert!(!s.contains("secret"), "{s}");
    }

    #[test]
    fn session_invalid_never_shows_the_session_reference() {
        let s = f(
            "SESSION_INVALID",
            &["OpaqueRef:5e1a2f0c-1111-2222-3333-444455556666"],
        )
        .to_string();
        assert_eq!(
            s,
            format!(
                "VDI.list_changed_blocks failed: SESSION_INVALID ({REDACTED_SESSION}): the API session ended (host restarted or session limit reached); run again"
            )
        );
        // Other failures keep their references: they name objects the admin can look up.
        let h = f("HANDLE_INVALID", &["VDI", "OpaqueRef:abc"]).to_string();
        assert!(h.contains("(VDI, OpaqueRef:abc)"), "{h}");
    }
}
