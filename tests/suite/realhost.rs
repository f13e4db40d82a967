//! Three wire behaviours of real XenServer hosts, through the real `cbtfs` binary against the
//! simulated host (which behaves as xapi does on each):
//! 1. `get_nbd_info` carries the host's certificate on every NBD network, `insecure_nbd`
//!    included: the network's purpose (or the server's answer) decides TLS, not the `cert`;
//! 2. `/export_raw_vdi` answers a close-delimited body that ends without a TLS `close_notify`;
//! 3. `/export_metadata` too.

use std::io::{Read, Write};

use std::sync::Arc;

use crate::common::*;
use cbtfs::sim::NbdMode;
use serde_json::Value;

const DISK_MB: u64 = 8;

type Host = SimHost;

fn start(mode: NbdMode) -> Host {
    let mut data = vec![0u8; (DISK_MB << 20) as usize];
    let mut rng = TestRng::new(21);
    for b in 0..data.len() / BS {
        if rng.below(2) == 0 {
            for x in &mut data[b * BS..b * BS + 512] {
                *x = rng.next() as u8;
            }
        }
    }
    SimHost::start(|c| c.nbd = mode, &data)
}

impl SimHost {
    /// Our snapshots left on the host (tagged by the repository).
    fn our_snapshots(&self) -> usize {
        self.sim.with(|st| {
            st.vdis
                .values()
                .filter(|v| v.is_a_snapshot && v.other_config.contains_key("cbtfs-repository"))
                .count()
        })
    }
}

/// get_nbd_info as the host answers it (logged in as the test).
fn nbd_info(h: &Host) -> Vec<Value> {
    h.sim.with(|st| {
        st.sessions.insert("OpaqueRef:test".into(), "root".into());
        let r = st.vdi_ref(&h.vdi).unwrap();
        let v = st
            .dispatch(
                "VDI.get_nbd_info",
                &[Value::from("OpaqueRef:test"), Value::from(r)],
            )
            .unwrap();
        v.as_array().unwrap().clone()
    })
}

/// Defect 1: an insecure_nbd network whose records carry the certificate. Plain only with
/// --allow-plain-nbd (and a warning); without it, refused, naming the flag and the way to
/// switch the network to nbd.
#[test]
fn insecure_nbd_network_with_a_certificate_is_plain_only_with_the_flag() {
    let h = start(NbdMode::Plain);
    let info = nbd_info(&h);
    assert!(!info.is_empty());
    for record in &info {
        assert!(
            record["cert"]
                .as_str()
                .unwrap()
                .contains("BEGIN CERTIFICATE"),
            "xapi fills the certificate on insecure_nbd networks too: {info:?}"
        );
    }
    let err = h.backup_disk_fails(&[]);
    assert!(err.contains("--allow-plain-nbd"), "{err}");
    assert!(err.contains("insecure_nbd"), "{err}");
    assert!(err.contains("xe network-param-set uuid="), "{err}");
    assert!(err.contains("purpose=nbd"), "{err}");
    let net_uuid = h.sim.with(|st| st.net.networks[0].1.uuid.clone());
    assert!(err.contains(&net_uuid), "the network is named: {err}");
    assert!(!err.contains("does not offer TLS; refusing"), "{err}");
    assert_eq!(h.our_snapshots(), 0, "the refused run left a snapshot");

    let (d, stderr) = h.backup_ok(&["--allow-plain-nbd"]);
    assert_eq!(d["via"], "nbd");
    assert!(stderr.contains("unencrypted"), "{stderr}");
    h.assert_point_is_disk(&d);
}

/// Defect 1: an `nbd` network means TLS, always: a server there that offers no TLS is refused
/// even with --allow-plain-nbd; the host's own TLS server is used without a warning.
#[test]
fn an_nbd_network_always_uses_tls() {
    let h = start(NbdMode::Tls);
    let (d, stderr) = h.backup_ok(&["--allow-plain-nbd"]);
    assert_eq!(d["via"], "nbd");
    assert!(!stderr.contains("unencrypted"), "{stderr}");
    h.assert_point_is_disk(&d);

    // The network says nbd, the server speaks plain: not a downgrade cbtfs accepts.
    let p = start(NbdMode::Plain);
    p.sim.with(|st| st.net.set_purpose(&["nbd"]));
    let err = p.backup_disk_fails(&["--allow-plain-nbd"]);
    assert!(err.contains("does not offer TLS"), "{err}");
    assert!(err.contains("purpose is nbd"), "{err}");
}

/// Defect 1: when the host does not tell the purpose (a role that may not read networks and
/// PIFs), the server's answer decides: TLS when it offers it, else plain only with the flag.
#[test]
fn an_unknown_purpose_is_decided_by_the_servers_answer() {
    let h = start(NbdMode::Plain);
    h.sim.with(|st| st.faults.networks_denied = true);
    let err = h.backup_disk_fails(&[]);
    assert!(err.contains("--allow-plain-nbd"), "{err}");
    assert!(err.contains("does not offer TLS"), "{err}");
    let (d, stderr) = h.backup_ok(&["--allow-plain-nbd"]);
    assert!(stderr.contains("unencrypted"), "{stderr}");
    h.assert_point_is_disk(&d);
    assert!(
        h.sim
            .with(|st| st.calls.iter().any(|c| c == "PIF.get_all_records")),
        "the purpose was asked for"
    );

    let t = start(NbdMode::Tls);
    t.sim.with(|st| st.faults.networks_denied = true);
    let (d, stderr) = t.backup_ok(&[]);
    assert!(!stderr.contains("unencrypted"), "{stderr}");
    t.assert_point_is_disk(&d);
}

/// Defect 2: without an NBD network, /export_raw_vdi answers close-delimited and the TLS
/// stream ends without close_notify: every byte arrived, so the backup succeeds. A body cut
/// short fails, saying how many bytes of how many arrived.
#[test]
fn export_raw_vdi_close_delimited_without_close_notify() {
    let h = start(NbdMode::None);
    assert!(nbd_info(&h).is_empty());
    let (d, stderr) = h.backup_ok(&[]);
    assert_eq!(d["via"], "export_raw_vdi", "{stderr}");
    h.assert_point_is_disk(&d);

    let size = DISK_MB << 20;
    let cut = 3 * 65536 + 100;
    h.sim.with(|st| st.faults.export_close_after = Some(cut));
    let err = h.backup_disk_fails(&[]);
    assert!(
        err.contains(&format!("the transfer ended after {cut} of {size} bytes")),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
    assert_eq!(h.our_snapshots(), 1, "only the first run's snapshot stays");
}

/// Defect 3: /export_metadata is close-delimited too: the metadata is saved, and a restore to
/// a new VM uses it. A cut archive is reported as what it is, never as "cannot reach".
#[test]
fn export_metadata_close_delimited_then_restore_to_a_new_vm() {
    let h = start(NbdMode::Tls);
    let (d, stderr) = h.backup_ok(&[]);
    assert_eq!(d["vm_metadata_saved"], true, "{stderr}");
    assert!(!stderr.contains("not saved"), "{stderr}");

    let sr = h.sim.with(|st| st.sr_uuid.clone());
    let o = cbtfs_cmd()
        .args(["restore", s(&h.repo()), d["point"].as_str().unwrap()])
        .args(["--new-vdi", "--sr", &sr, "--new-vm", "--json"])
        .args(["--host", &h.sim.url, "--password-file", s(&h.pw)])
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let vm = r["vm"].as_str().unwrap().to_string();
    let new_vdi = r["vdi"].as_str().unwrap().to_string();
    h.sim.with(|st| {
        let (_, v) = st.vms.iter().find(|(_, v)| v.uuid == vm).unwrap();
        assert_eq!(v.name_label, "vm1");
        let disks: Vec<&str> = v
            .vbds
            .iter()
            .map(|b| st.vdis[&st.vbds[b].vdi].uuid.as_str())
            .collect();
        assert_eq!(disks, [new_vdi.as_str()]);
    });

    h.sim.with(|st| st.faults.metadata_close_after = Some(700));
    let (d, stderr) = h.backup_ok(&[]);
    assert_eq!(d["vm_metadata_saved"], false);
    assert!(
        stderr.contains("closed the connection after 700 bytes, before the end of the archive")
            || stderr.contains("the connection ended") && stderr.contains("after 700 bytes"),
        "{stderr}"
    );
    assert!(!stderr.contains("cannot reach"), "{stderr}");
}

/// The simulated host's handlers on the wire, read with a raw TLS client: `200 OK`,
/// `Connection: close`, no Content-Length, every byte, then the TCP connection ends without
/// a TLS close_notify (as xapi's do).
#[test]
fn sim_handlers_end_without_close_notify() {
    let h = start(NbdMode::None);
    h.sim.with(|st| {
        st.sessions.insert("OpaqueRef:wire".into(), "root".into());
    });
    let (cfg, _) = cbtfs::xapi::trust::client_config(&cbtfs::xapi::HostTrust::Insecure).unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", h.sim.port)).unwrap();
    let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
    write!(
        stream,
        "GET /export_raw_vdi?session_id=OpaqueRef%3Awire&vdi={}&format=raw HTTP/1.1\r\nHost: x\r\n\r\n",
        h.vdi
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e),
        }
    };
    let e = end.expect("the stream ended with a close_notify");
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&got[..split]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: close"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    let want = h.sim.read_vdi(&h.vdi).unwrap();
    assert!(got[split + 4..] == want[..], "the body is the VDI");
}

/// Restore's read-back follows the same decision: over TLS where the network is nbd (or the
/// server offers TLS when the purpose cannot be read), skipped with a warning on insecure_nbd.
#[test]
fn restore_reads_back_only_over_tls() {
    for (mode, denied, read_back) in [
        (NbdMode::Plain, false, false),
        (NbdMode::Plain, true, false),
        (NbdMode::Tls, true, true),
    ] {
        let h = start(mode);
        let (d, _) = h.backup_ok(&["--allow-plain-nbd"]);
        h.sim.with(|st| st.faults.networks_denied = denied);
        let sr = h.sim.with(|st| st.sr_uuid.clone());
        let o = cbtfs_cmd()
            .args(["restore", s(&h.repo()), d["point"].as_str().unwrap()])
            .args(["--new-vdi", "--sr", &sr, "--json"])
            .args(["--host", &h.sim.url, "--password-file", s(&h.pw)])
            .bounded()
            .unwrap();
        let what = format!("{mode:?}, purpose hidden: {denied}");
        assert!(o.status.success(), "{what}: {}", text(&o));
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        let verified = r["verified_blocks"].as_u64().unwrap();
        if read_back {
            assert!(verified > 10, "{what}: {r}");
        } else {
            assert_eq!(verified, 0, "{what}: {r}");
            assert!(stderr.contains("not read back"), "{what}: {stderr}");
        }
        let new_vdi = r["vdi"].as_str().unwrap();
        assert!(
            h.sim.read_vdi(new_vdi).unwrap() == h.sim.read_vdi(&h.vdi).unwrap(),
            "{what}: the restored VDI is the point"
        );
    }
}
