//! `cbtfs backup` against hosts as pools and busy hosts make them: fewer NBD connections than
//! asked, several NBD addresses (one `get_nbd_info` record each) that come and go, pool
//! members behind `/export_raw_vdi` redirects, and hosts that accept but never answer.

use crate::common::*;
use cbtfs::sim::SimConfig;
use serde_json::Value;

const DISK_MB: u64 = 16;

type Host = SimHost;

fn start(cfg: impl FnOnce(&mut SimConfig)) -> Host {
    // Random data in every block: any block read from the wrong place shows.
    let mut rng = TestRng::new(21);
    let data: Vec<u8> = (0..DISK_MB << 20).map(|_| rng.next() as u8).collect();
    SimHost::start(cfg, &data)
}

impl SimHost {
    fn requests(&self) -> std::collections::BTreeMap<String, u64> {
        self.sim.with(|st| st.nbd_requests.clone())
    }
}

fn warnings(d: &Value) -> Vec<String> {
    d["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_host_taking_fewer_nbd_connections_than_asked_is_read_through_those_it_took() {
    let h = start(|_| {});
    h.sim.with(|st| st.faults.nbd_connection_limit = Some(2));
    let (d, err) = h.backup_ok(&["--connections", "8"]);
    assert_eq!(d["via"], "nbd");
    let said = "the host accepted 2 of 8 NBD connections; going on with 2";
    let w = warnings(&d);
    assert_eq!(w.iter().filter(|w| w.starts_with(said)).count(), 1, "{w:?}");
    assert_eq!(err.matches(said).count(), 1, "{err}");
    h.assert_point_is_disk(&d);

    // No connection at all: an error naming the addresses, nothing committed.
    h.sim.with(|st| st.faults.nbd_connection_limit = Some(0));
    let e = h.backup_disk_fails(&["--connections", "4"]);
    assert!(e.contains("no NBD connection could be opened"), "{e}");
    assert!(e.contains("127.0.0.1") && e.contains("127.0.0.2"), "{e}");
}

#[test]
fn connections_are_spread_over_every_nbd_address_the_host_lists() {
    let h = start(|_| {});
    let (d, _) = h.backup_ok(&["--connections", "4"]);
    assert!(warnings(&d).is_empty(), "{d}");
    h.assert_point_is_disk(&d);
    let r = h.requests();
    assert!(
        r.get("127.0.0.1").is_some_and(|n| *n > 0) && r.get("127.0.0.2").is_some_and(|n| *n > 0),
        "requests by address: {r:?}"
    );
}

#[test]
fn a_dead_nbd_address_is_done_without_and_all_dead_is_an_error_naming_them() {
    let h = start(|_| {});
    h.sim.with(|st| {
        st.faults.nbd_down.insert("127.0.0.2".into());
    });
    let (d, _) = h.backup_ok(&["--connections", "4"]);
    let w = warnings(&d);
    assert!(
        w.iter()
            .any(|w| w.contains("accepted 2 of 4") && w.contains("127.0.0.2")),
        "{w:?}"
    );
    h.assert_point_is_disk(&d);
    assert_eq!(h.requests().get("127.0.0.2"), None);

    h.sim.with(|st| {
        st.faults.nbd_down.insert("127.0.0.1".into());
    });
    let e = h.backup_disk_fails(&["--connections", "4"]);
    assert!(e.contains("no NBD connection could be opened"), "{e}");
    assert!(
        e.contains("nbds://127.0.0.1:") && e.contains("nbds://127.0.0.2:"),
        "{e}"
    );
    assert!(
        !e.contains("session_id=OpaqueRef"),
        "the session leaked: {e}"
    );
}

#[test]
fn an_nbd_address_dying_mid_run_is_replaced_by_the_other() {
    let h = start(|_| {});
    // After its first request the address is gone: connections to it drop, new ones close.
    h.sim
        .with(|st| st.faults.nbd_dies_after = Some(("127.0.0.1".into(), 1)));
    let (d, _) = h.backup_ok(&["--connections", "4"]);
    h.assert_point_is_disk(&d);
    let w = warnings(&d);
    assert!(
        w.iter()
            .any(|w| w.contains("127.0.0.1") && w.contains("stopped taking connections")),
        "{w:?}"
    );
    let r = h.requests();
    assert!(r.get("127.0.0.2").is_some_and(|n| *n > 0), "{r:?}");
}

#[test]
fn a_host_that_accepts_but_never_answers_fails_within_the_timeout_saying_so() {
    let h = start(|_| {});
    h.repo();
    h.sim.with(|st| st.faults.api_hangs = true);
    let t0 = std::time::Instant::now();
    let e = h.backup_disk_fails(&["--timeout", "2"]);
    let took = t0.elapsed();
    // A bound, not a timing claim: far below the 30 s and more a hung host held it before.
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}");
    let host = "127.0.0.1 accepted the connection but did not answer session.login_with_password within 2 s";
    assert!(e.contains(host), "{e}");
    assert!(!e.contains("cannot reach"), "{e}");

    // Restore takes --timeout too, and says the same.
    h.sim.with(|st| st.faults.api_hangs = false);
    h.backup_ok(&[]);
    h.sim.with(|st| st.faults.api_hangs = true);
    let point = format!("{}@latest", h.vdi);
    let t0 = std::time::Instant::now();
    let o = cbtfs_cmd()
        .args(["restore", s(&h.repo()), &point, "--host", &h.sim.url])
        .args([
            "--password-file",
            s(&h.pw),
            "--to-vdi",
            &h.vdi,
            "--timeout",
            "2",
        ])
        .bounded()
        .unwrap();
    let took = t0.elapsed();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}");
    assert!(e.contains(host), "{e}");

    // Nothing listening at all is still "cannot reach".
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let o = cbtfs_cmd()
        .args(["backup", s(&h.repo()), "--host", &url])
        .args([
            "--password-file",
            s(&h.pw),
            "--vdi",
            &h.vdi,
            "--timeout",
            "2",
        ])
        .bounded()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("cannot reach 127.0.0.1"), "{e}");
}

#[test]
fn a_redirect_to_a_pool_member_is_followed_with_the_certificate_the_master_handed_over() {
    // No NBD network: the disk comes through /export_raw_vdi, which the master redirects to
    // the member (its own certificate, not the pinned master's).
    let h = start(|c| c.nbd = cbtfs::sim::NbdMode::None);
    let member = h.sim.start_member(&h.dir.path().join("member")).unwrap();
    h.sim
        .with(|st| st.faults.export_redirect_to = Some(member.clone()));
    // First use (the master pinned now) and a later run (the pin read back).
    for run in 0..2 {
        let (d, _) = h.backup_ok(&[]);
        assert_eq!(d["via"], "export_raw_vdi", "run {run}: {d}");
        h.assert_point_is_disk(&d);
    }
    let calls = h.sim.with(|st| st.calls.clone());
    assert!(
        calls.iter().any(|c| c == "host.get_server_certificate"),
        "{calls:?}"
    );

    // A member the master does not list: its certificate is nobody's, the redirect refused.
    h.sim
        .with(|st| st.hosts.retain(|x| x.address != "127.0.0.2"));
    let e = h.backup_disk_fails(&[]);
    assert!(e.contains("127.0.0.2 presented certificate"), "{e}");
    assert!(e.contains("refused"), "{e}");
    assert!(
        !e.contains("session_id=OpaqueRef"),
        "the session leaked: {e}"
    );
}

#[test]
fn a_transfer_that_stops_midway_fails_within_the_timeout_saying_so() {
    // /export_raw_vdi sends 3 MiB, then nothing.
    let h = start(|c| c.nbd = cbtfs::sim::NbdMode::None);
    h.sim
        .with(|st| st.faults.export_hangs_after = Some(3 << 20));
    let t0 = std::time::Instant::now();
    let e = h.backup_disk_fails(&["--timeout", "2"]);
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        e.contains("127.0.0.1 accepted the connection but did not answer export_raw_vdi of VDI"),
        "{e}"
    );
    assert!(
        e.contains(&format!("after {} of {} bytes", 3 << 20, DISK_MB << 20)),
        "{e}"
    );
    assert!(e.contains("within 2 s"), "{e}");

    // /import_raw_vdi takes 4 MiB of a restore, then stops reading and never answers.
    h.sim.with(|st| st.faults.export_hangs_after = None);
    h.backup_ok(&[]);
    h.sim.with(|st| {
        st.faults.import_hangs_after = Some(4 << 20);
        // A restore over the disk needs it detached from its VM.
        for b in st.vbds.values_mut() {
            b.attached = false;
        }
    });
    let point = format!("{}@latest", h.vdi);
    let t0 = std::time::Instant::now();
    let o = cbtfs_cmd()
        .args(["restore", s(&h.repo()), &point, "--host", &h.sim.url])
        .args(["--password-file", s(&h.pw), "--no-verify", "--timeout", "2"])
        .args(["--to-vdi", &h.vdi])
        .bounded()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        e.contains("accepted the connection but did not answer import_raw_vdi into VDI"),
        "{e}"
    );
}
