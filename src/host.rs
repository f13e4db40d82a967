//! The connection to a host, shared by `backup` and `restore`: how to reach it
//! ([`HostAccess`]), logging in with the certificate pinned on first use (and the pool
//! members' certificates trusted through the master), and how each `get_nbd_info` record
//! becomes an NBD target: TLS pinned to the record's certificate, or plain text where the
//! network's purpose (`insecure_nbd`) and `--allow-plain-nbd` allow it.

use std::time::Duration;

use crate::nbd::{Address, FetchOptions, NbdError, Pool, Target, Trust};
use crate::repo::{RepoError, Repository};
use crate::xapi::{HostConfig, HostTrust, NbdInfo, Xapi, XapiError};

/// How to reach the host. The password is never printed.
#[derive(Clone)]
pub struct HostAccess {
    /// `https://HOST[:PORT]`.
    pub url: String,
    pub user: String,
    pub password: String,
    /// A CA bundle (PEM) that signed the host's certificate.
    pub ca_pem: Option<String>,
    /// No certificate check at all.
    pub insecure_tls: bool,
    /// How long the host may take to accept a connection, to start answering a request, and
    /// between bytes of an answer (API calls and HTTP handlers).
    pub timeout: Duration,
}

impl std::fmt::Debug for HostAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAccess")
            .field("url", &self.url)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Why connecting to a host, or opening its NBD exports, failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Xapi(#[from] XapiError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error("{0}")]
    Refused(String),
}

/// Progress and warnings as a run against a host (a backup, a restore) goes.
pub enum Event<'a> {
    Info(&'a str),
    Warning(&'a str),
    /// (vdi, blocks done, blocks total)
    Blocks(&'a str, u64, u64),
}

/// The pinned fingerprint; None on first use only (an empty or damaged pin is an error).
fn read_pin(repo: &Repository, host: &str) -> Result<Option<String>, XapiError> {
    let file = repo.pin_location(host);
    match repo.read_pin(host) {
        Ok(None) => Ok(None),
        Ok(Some(text)) => crate::xapi::trust::parse_pin(text.as_bytes(), &file).map(Some),
        Err(e) => Err(XapiError::Pin {
            file,
            problem: format!("cannot be read ({e})"),
        }),
    }
}

fn write_pin(repo: &Repository, host: &str, fp: &str) -> Result<(), RepoError> {
    repo.write_pin(host, fp)
}

/// Connect and log in, following HOST_IS_SLAVE to the pool master; pins the certificate on
/// first use. Returns the session and the fingerprint pinned now, if any.
pub(crate) async fn connect(
    repo: &Repository,
    access: &HostAccess,
    say: &dyn Fn(Event),
) -> Result<(Xapi, Option<String>), HostError> {
    let mut url = access.url.clone();
    for _ in 0..3 {
        let (_, host) = crate::xapi::client::parse_url(&url)?;
        let pinned = match access.ca_pem.is_none() && !access.insecure_tls {
            true => read_pin(repo, &host)?,
            false => None,
        };
        let trust = if let Some(ca) = &access.ca_pem {
            HostTrust::Ca(ca.clone())
        } else if access.insecure_tls {
            HostTrust::Insecure
        } else {
            HostTrust::Pinned(pinned.clone())
        };
        let mut xapi = Xapi::connect(&HostConfig {
            url: url.clone(),
            trust: trust.clone(),
            timeout: access.timeout,
        })?;
        match xapi.login(&access.user, &access.password).await {
            Ok(()) => {
                let mut newly = None;
                if let (HostTrust::Pinned(None), Some(seen)) = (&trust, xapi.seen_certificate()) {
                    write_pin(repo, &host, &seen)?;
                    xapi.trust_state().pin(&seen);
                    say(Event::Info(&format!(
                        "pinned the TLS certificate of {host} on first use: {seen} (compare it with `openssl x509 -noout -fingerprint -sha256 -in /etc/xensource/xapi-ssl.pem` on the host)"
                    )));
                    newly = Some(seen);
                }
                if let HostTrust::Pinned(_) = trust {
                    trust_pool_members(&xapi, say).await;
                }
                return Ok((xapi, newly));
            }
            Err(XapiError::Api(f)) if f.master().is_some() => {
                let master = f.master().unwrap_or_default();
                let port = url
                    .trim_start_matches("https://")
                    .rsplit_once(':')
                    .map(|(_, p)| format!(":{p}"))
                    .unwrap_or_default();
                say(Event::Info(&format!(
                    "{host} is a pool member; connecting to the pool master {master}"
                )));
                url = format!("https://{master}{port}");
            }
            Err(e @ XapiError::Transport { .. }) => {
                if let (Some(p), Some(seen)) = (&pinned, xapi.seen_certificate())
                    && access.ca_pem.is_none()
                    && !access.insecure_tls
                    && *p != seen
                {
                    return Err(XapiError::CertificateChanged {
                        host: host.clone(),
                        pinned: p.clone(),
                        seen,
                        pin_file: repo.pin_location(&host),
                    }
                    .into());
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(HostError::Refused(format!(
        "{}: too many HOST_IS_SLAVE redirections; give the pool master's address",
        access.url
    )))
}

/// With a pinned master: trust each pool member's certificate, as the master hands it over,
/// for that member's address (a handler may redirect to the member holding the disk). Hosts
/// whose certificate cannot be had stay untrusted: a redirect to one is refused.
async fn trust_pool_members(xapi: &Xapi, say: &dyn Fn(Event)) {
    match xapi.pool_certificates().await {
        Ok(hosts) => {
            for (address, pem) in hosts {
                match crate::xapi::trust::pem_fingerprint(&pem) {
                    Some(fp) if !address.is_empty() => {
                        xapi.trust_state().trust_member(&address, &fp)
                    }
                    _ => say(Event::Warning(&format!(
                        "the pool master handed over no usable certificate for pool member {address:?}; a transfer redirected to it will be refused"
                    ))),
                }
            }
        }
        Err(e) => say(Event::Warning(&format!(
            "cannot learn the pool members' certificates ({e}); a transfer redirected to another pool member will be refused"
        ))),
    }
}
/// What the host says about the network an NBD address is on (xen-api's `network.purpose`).
/// `get_nbd_info` carries the host's certificate on every NBD network, so its `cert` cannot
/// tell an `nbd` network from an `insecure_nbd` one: the purpose does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NbdPurpose {
    /// `nbd`: the server requires TLS; always TLS, pinned to the record's certificate.
    Nbd,
    /// `insecure_nbd`: the server speaks plain text. The network's uuid, when known, for
    /// the advice to switch it.
    Insecure { network: Option<String> },
    /// The host did not say (no attached PIF holds the address, or the calls were refused, as
    /// for a role that may not read networks): the server's own answer decides.
    Unknown,
}

/// How one record's NBD server is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NbdSecurity {
    Tls,
    Plain,
}

/// The decision for one record, from its network's purpose, `--allow-plain-nbd`, whether the
/// record has a certificate to pin, and whether a TLS attempt found a server that does not
/// offer STARTTLS. An error is the refusal to show the user. `place`: `ADDRESS:PORT`.
pub(crate) fn nbd_security(
    purpose: &NbdPurpose,
    allow_plain: bool,
    has_cert: bool,
    server_refused_tls: bool,
    place: &str,
) -> Result<NbdSecurity, String> {
    let switch = |network: Option<&str>| {
        format!(
            "or make the network encrypt NBD: xe network-param-set uuid={} purpose=nbd{}",
            network.unwrap_or("<network-uuid>"),
            if network.is_none() {
                " (xe network-list shows the networks and their purpose)"
            } else {
                ""
            }
        )
    };
    match purpose {
        NbdPurpose::Nbd if server_refused_tls => Err(format!(
            "the NBD server at {place} does not offer TLS although its network's purpose is nbd; refusing to send data in plain text (is something other than the host's NBD server listening there?)"
        )),
        NbdPurpose::Nbd if !has_cert => Err(format!(
            "the host gave no certificate for the NBD server at {place} (an nbd network requires TLS), so it cannot be verified"
        )),
        NbdPurpose::Nbd => Ok(NbdSecurity::Tls),
        NbdPurpose::Insecure { .. } if allow_plain => Ok(NbdSecurity::Plain),
        NbdPurpose::Insecure { network } => Err(format!(
            "the host offers NBD at {place} on an insecure_nbd network, without TLS; pass --allow-plain-nbd to accept unencrypted transfers, {}",
            switch(network.as_deref())
        )),
        NbdPurpose::Unknown if has_cert && !server_refused_tls => Ok(NbdSecurity::Tls),
        NbdPurpose::Unknown if allow_plain => Ok(NbdSecurity::Plain),
        NbdPurpose::Unknown => Err(format!(
            "the NBD server at {place} does not offer TLS (its network is insecure_nbd); pass --allow-plain-nbd to accept unencrypted transfers, {}",
            switch(None)
        )),
    }
}

/// How one `get_nbd_info` record becomes a target. `server_refused_tls`: a TLS attempt at it
/// found a server without STARTTLS.
pub(crate) fn nbd_target(
    info: &NbdInfo,
    purpose: &NbdPurpose,
    allow_plain: bool,
    server_refused_tls: bool,
) -> Result<Target, HostError> {
    let place = format!("{}:{}", info.address, info.port);
    let has_cert = !info.cert.trim().is_empty();
    let security = nbd_security(purpose, allow_plain, has_cert, server_refused_tls, &place)
        .map_err(HostError::Refused)?;
    let trust = match security {
        NbdSecurity::Plain => None,
        NbdSecurity::Tls => Some(Trust::Pinned {
            cert_pem: info.cert.clone(),
            subject: info.subject.clone(),
        }),
    };
    Ok(Target {
        address: Address::Tcp {
            host: info.address.clone(),
            port: info.port,
        },
        export: info.exportname.clone(),
        trust,
    })
}

/// The target for one record as its network's purpose allows; when the purpose is unknown,
/// one connection asks the server whether it speaks TLS (a server refusing STARTTLS is an
/// insecure_nbd one). A refusal is an error: no other record will do better.
pub(crate) async fn resolve_nbd_target(
    info: &NbdInfo,
    purpose: &NbdPurpose,
    allow_plain: bool,
) -> Result<Target, HostError> {
    let target = nbd_target(info, purpose, allow_plain, false)?;
    if *purpose != NbdPurpose::Unknown || target.trust.is_none() {
        return Ok(target);
    }
    match crate::nbd::client::Client::connect(&target, 1).await {
        Err(crate::nbd::NbdError::NoTls { .. }) => nbd_target(info, purpose, allow_plain, true),
        Ok(c) => {
            c.close().await;
            Ok(target)
        }
        // Not reachable now: the pool's own attempts report it (or use the other records).
        Err(_) => Ok(target),
    }
}

/// Open connections to one export through every record `get_nbd_info` gave for it (one per
/// address the host has on an NBD network): connections are spread over those that answer, and
/// one that fails mid-run is replaced through the others. Each record is resolved as its
/// network's purpose and `allow_plain` allow; `warn` hears of every record reached without TLS.
pub(crate) async fn open_nbd_pool(
    xapi: &Xapi,
    infos: &[NbdInfo],
    allow_plain: bool,
    options: FetchOptions,
    warn: &mut dyn FnMut(String),
) -> Result<Pool, HostError> {
    let purposes = nbd_purposes(xapi, infos).await;
    let mut targets = Vec::with_capacity(infos.len());
    for (info, purpose) in infos.iter().zip(&purposes) {
        let target = resolve_nbd_target(info, purpose, allow_plain).await?;
        if target.trust.is_none() {
            let why = match purpose {
                NbdPurpose::Insecure { .. } => "the host's network is insecure_nbd",
                _ => "the NBD server does not offer TLS",
            };
            warn(format!(
                "NBD without TLS at {}:{} ({why}): disk data crosses the network unencrypted",
                info.address, info.port
            ));
        }
        targets.push(target);
    }
    match Pool::open_many(targets.clone(), options).await {
        Ok(pool) => Ok(pool),
        Err(e) => {
            // A record on an `nbd` network whose server speaks plain text is named as such.
            for ((info, purpose), target) in infos.iter().zip(&purposes).zip(&targets) {
                if *purpose == NbdPurpose::Nbd
                    && let Err(NbdError::NoTls { .. }) =
                        crate::nbd::client::Client::connect(target, 1).await
                {
                    nbd_target(info, purpose, allow_plain, true)?;
                }
            }
            Err(e.into())
        }
    }
}

/// The address as an IP, for comparing the forms a host may write (`fd00::1`, `[fd00::1]`,
/// `fd00::1/64`).
fn ip_of(text: &str) -> Option<std::net::IpAddr> {
    let t = text.split('/').next().unwrap_or(text);
    t.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// The network of the attached PIF that holds `address` (its `IP`, or one of its `IPv6`
/// entries), from a `PIF.get_all_records` answer.
pub(crate) fn network_of_address(pifs: &serde_json::Value, address: &str) -> Option<String> {
    let want = ip_of(address);
    let same = |a: &str| match (want, ip_of(a)) {
        (Some(w), Some(x)) => w == x,
        _ => a == address,
    };
    pifs.as_object()?.values().find_map(|p| {
        let attached = p.get("currently_attached").and_then(|a| a.as_bool()) != Some(false);
        let v4 = p.get("IP").and_then(|v| v.as_str()).is_some_and(&same);
        let v6 = p
            .get("IPv6")
            .and_then(|v| v.as_array())
            .is_some_and(|l| l.iter().filter_map(|a| a.as_str()).any(&same));
        (attached && (v4 || v6))
            .then(|| p.get("network")?.as_str().map(str::to_string))
            .flatten()
    })
}

/// The purpose of a network from its record (`purpose`: a list of names) and its uuid.
pub(crate) fn purpose_of(network: &serde_json::Value) -> NbdPurpose {
    let has = |name: &str| {
        network
            .get("purpose")
            .and_then(|p| p.as_array())
            .is_some_and(|l| l.iter().any(|x| x.as_str() == Some(name)))
    };
    if has("nbd") {
        NbdPurpose::Nbd
    } else if has("insecure_nbd") {
        NbdPurpose::Insecure {
            network: network
                .get("uuid")
                .and_then(|u| u.as_str())
                .map(str::to_string),
        }
    } else {
        NbdPurpose::Unknown
    }
}

/// For each record, the purpose of the network whose PIF holds its address. Calls the host
/// refuses (or a host without these classes) leave it unknown.
pub(crate) async fn nbd_purposes(xapi: &Xapi, infos: &[NbdInfo]) -> Vec<NbdPurpose> {
    let pifs = match xapi.call("PIF.get_all_records", vec![]).await {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(error = %e, "cannot read the host's PIFs; the NBD servers' answers will tell whether they offer TLS");
            return vec![NbdPurpose::Unknown; infos.len()];
        }
    };
    let mut known: std::collections::HashMap<String, NbdPurpose> = Default::default();
    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        let Some(net) = network_of_address(&pifs, &info.address) else {
            out.push(NbdPurpose::Unknown);
            continue;
        };
        if !known.contains_key(&net) {
            let p = match xapi
                .call("network.get_record", vec![serde_json::json!(net)])
                .await
            {
                Ok(rec) => purpose_of(&rec),
                Err(e) => {
                    tracing::info!(error = %e, network = %net, "cannot read the network's purpose");
                    NbdPurpose::Unknown
                }
            };
            known.insert(net.clone(), p);
        }
        out.push(known.get(&net).cloned().unwrap_or(NbdPurpose::Unknown));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P: &str = "10.0.0.5:10809";

    #[test]
    fn nbd_security_follows_the_purpose_then_the_server() {
        use NbdPurpose::*;
        use NbdSecurity::*;
        let insecure = Insecure {
            network: Some("net-uuid".into()),
        };
        // (purpose, --allow-plain-nbd, cert present, server refused STARTTLS) → decision.
        let ok = [
            (Nbd, false, true, false, Tls),
            (Nbd, true, true, false, Tls),
            (insecure.clone(), true, true, false, Plain),
            (insecure.clone(), true, false, false, Plain),
            (Unknown, false, true, false, Tls),
            (Unknown, true, true, false, Tls),
            (Unknown, true, true, true, Plain),
            (Unknown, true, false, false, Plain),
        ];
        for (purpose, allow, cert, refused, want) in ok {
            assert_eq!(
                nbd_security(&purpose, allow, cert, refused, P),
                Ok(want),
                "{purpose:?} allow={allow} cert={cert} refused={refused}"
            );
        }
        let refusals = [
            (Nbd, true, true, true, "purpose is nbd"),
            (Nbd, false, false, false, "no certificate"),
            (insecure.clone(), false, true, false, "--allow-plain-nbd"),
            (Unknown, false, true, true, "--allow-plain-nbd"),
            (Unknown, false, false, false, "--allow-plain-nbd"),
        ];
        for (purpose, allow, cert, refused, says) in refusals {
            let e = nbd_security(&purpose, allow, cert, refused, P).unwrap_err();
            assert!(e.contains(says), "{purpose:?}: {e}");
            assert!(e.contains(P), "{e}");
        }
        let e = nbd_security(&insecure, false, true, false, P).unwrap_err();
        assert!(
            e.contains("xe network-param-set uuid=net-uuid purpose=nbd"),
            "{e}"
        );
        let e = nbd_security(&Unknown, false, true, true, P).unwrap_err();
        assert!(
            e.contains("uuid=<network-uuid>") && e.contains("xe network-list"),
            "{e}"
        );
    }

    #[test]
    fn a_record_becomes_a_pinned_or_plain_target() {
        let info = NbdInfo {
            address: "10.0.0.5".into(),
            port: 10809,
            exportname: "/vdi?session_id=OpaqueRef:s".into(),
            cert: "-----BEGIN CERTIFICATE-----".into(),
            subject: "host".into(),
        };
        let t = nbd_target(&info, &NbdPurpose::Nbd, false, false).unwrap();
        assert!(matches!(t.trust, Some(Trust::Pinned { .. })));
        let t = nbd_target(&info, &NbdPurpose::Insecure { network: None }, true, false).unwrap();
        assert!(t.trust.is_none());
        assert!(nbd_target(&info, &NbdPurpose::Insecure { network: None }, false, false).is_err());
    }

    #[test]
    fn the_pif_holding_an_address_names_the_network() {
        let pifs = json!({
            "OpaqueRef:p1": {"IP": "10.0.0.5", "IPv6": [], "network": "OpaqueRef:n1", "currently_attached": true},
            "OpaqueRef:p2": {"IP": "", "IPv6": ["fd00::7/64", ""], "network": "OpaqueRef:n2", "currently_attached": true},
            "OpaqueRef:p3": {"IP": "10.0.0.9", "IPv6": [], "network": "OpaqueRef:n3", "currently_attached": false},
        });
        assert_eq!(
            network_of_address(&pifs, "10.0.0.5").as_deref(),
            Some("OpaqueRef:n1")
        );
        assert_eq!(
            network_of_address(&pifs, "fd00::7").as_deref(),
            Some("OpaqueRef:n2")
        );
        assert_eq!(
            network_of_address(&pifs, "[fd00:0::7]").as_deref(),
            Some("OpaqueRef:n2")
        );
        assert_eq!(network_of_address(&pifs, "10.0.0.9"), None, "not attached");
        assert_eq!(network_of_address(&pifs, "10.0.0.6"), None);
        assert_eq!(network_of_address(&json!("junk"), "10.0.0.5"), None);
        assert_eq!(purpose_of(&json!({"purpose": ["nbd"]})), NbdPurpose::Nbd);
        assert_eq!(
            purpose_of(&json!({"purpose": ["insecure_nbd"], "uuid": "u"})),
            NbdPurpose::Insecure {
                network: Some("u".into())
            }
        );
        assert_eq!(purpose_of(&json!({"purpose": []})), NbdPurpose::Unknown);
        assert_eq!(purpose_of(&json!({})), NbdPurpose::Unknown);
    }
}
