//! `cbtfs backup` end to end against the simulated host: the guide's procedure, every point
//! equal to the disk at its snapshot, and each failure path the guide and xen-api name.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::*;
use cbtfs::sim::{NbdMode, Sim, SimConfig};
use serde_json::Value;

const DISK_MB: u64 = 16;

type Host = SimHost;

fn start(cfg: impl FnOnce(&mut SimConfig)) -> Host {
    // A disk that starts with data in a third of its blocks.
    let mut data = vec![0u8; (DISK_MB << 20) as usize];
    let mut rng = TestRng::new(7);
    for b in 0..data.len() / BS {
        if rng.below(3) == 0 {
            for x in &mut data[b * BS..b * BS + 4096] {
                *x = rng.next() as u8;
            }
        }
    }
    SimHost::start(cfg, &data)
}

impl SimHost {
    fn backup_vdi(&self) -> Value {
        let o = self.backup(&["--vdi", &self.vdi]);
        assert!(
            o.status.success(),
            "backup failed: {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["disks"][0].clone()
    }

    /// Random guest writes; returns the blocks they touched.
    fn guest_writes(&self, rng: &mut TestRng, n: u64) -> BTreeSet<u64> {
        let size = DISK_MB << 20;
        let mut touched = BTreeSet::new();
        for _ in 0..n {
            let len = 1 + rng.below(3 * BS as u64);
            let off = rng.below(size - len);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            self.sim
                .with(|st| st.guest_write(&self.vdi, off, &data))
                .unwrap();
            touched.extend(off / BS as u64..=(off + len - 1) / BS as u64);
        }
        touched
    }

    fn disk_now(&self) -> Vec<u8> {
        self.sim.read_vdi(&self.vdi).unwrap()
    }

    /// (uuid, type) of the snapshots of the disk on the host.
    fn snapshots(&self) -> Vec<(String, String, bool)> {
        self.sim.with(|st| {
            let r = st.vdi_ref(&self.vdi).unwrap();
            st.vdis
                .values()
                .filter(|v| v.snapshot_of == r)
                .map(|v| {
                    (
                        v.uuid.clone(),
                        v.kind.clone(),
                        v.other_config.contains_key("cbtfs-repository"),
                    )
                })
                .collect()
        })
    }

    fn export(&self, point: &str) -> Vec<u8> {
        let out = self.dir.path().join("export.raw");
        ok(&["export", s(&self.repo()), point, s(&out), "--force"]);
        std::fs::read(&out).unwrap()
    }
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if got != want {
        let b = got
            .chunks(BS)
            .zip(want.chunks(BS))
            .position(|(a, b)| a != b)
            .unwrap();
        panic!("{what}: block {b} differs");
    }
}

#[test]
fn ten_backups_read_back_exactly_through_the_mount_and_fetch_only_changed_blocks() {
    let h = start(|_| {});
    let mut rng = TestRng::new(11);
    let mut expected = Vec::new();
    let mut labels = Vec::new();
    for i in 0..10 {
        let touched = if i > 0 {
            let n = 1 + rng.below(12);
            h.guest_writes(&mut rng, n)
        } else {
            BTreeSet::new()
        };
        expected.push(h.disk_now());
        let before = h
            .sim
            .with(|st| st.served_bytes.load(std::sync::atomic::Ordering::Relaxed));
        let d = h.backup_vdi();
        let served = h
            .sim
            .with(|st| st.served_bytes.load(std::sync::atomic::Ordering::Relaxed))
            - before;
        assert_eq!(d["seq"], i, "{d}");
        assert_eq!(d["via"], "nbd");
        if i == 0 {
            assert_eq!(d["kind"], "base");
            assert_eq!(served, DISK_MB << 20);
        } else {
            assert_eq!(d["kind"], "incremental", "{d}");
            // Exactly the blocks CBT reported, nothing re-read.
            assert_eq!(d["changed_blocks"], touched.len() as u64, "{d}");
            assert_eq!(d["fetched_blocks"], touched.len() as u64, "{d}");
            assert_eq!(served, touched.len() as u64 * BS as u64, "{d}");
        }
        assert_eq!(d["vm_metadata_saved"], true);
        labels.push(d["point"].as_str().unwrap().to_string());
        // Only the newest snapshot stays on the host, as CBT metadata.
        let snaps = h.snapshots();
        assert_eq!(snaps.len(), 1, "{snaps:?}");
        assert_eq!(snaps[0].1, "cbt_metadata");
        assert_eq!(snaps[0].0, d["snapshot"].as_str().unwrap());
    }
    ok(&["verify", s(&h.repo())]);
    // The guide's order: snapshot, diff, NBD info, data_destroy after the fetch.
    let calls = h.sim.with(|st| st.calls.clone());
    let pos = |m: &str| calls.iter().rposition(|c| c == m).unwrap();
    assert!(pos("VDI.snapshot") < pos("VDI.list_changed_blocks"));
    assert!(pos("VDI.list_changed_blocks") < pos("VDI.get_nbd_info"));
    assert!(pos("VDI.get_nbd_info") < pos("VDI.data_destroy"));
    assert_eq!(calls.last().map(String::as_str), Some("session.logout"));

    if can_mount() {
        let mp = h.dir.path().join("mnt");
        let _m = Mounted::new(&h.repo(), &mp, &[]);
        let paths = point_paths(&h.repo());
        assert_eq!(paths.len(), 10);
        for (i, p) in paths.iter().enumerate() {
            let got = std::fs::read(mp.join(p)).unwrap();
            assert_same(
                &format!("point {i} ({p}) through the mount"),
                &got,
                &expected[i],
            );
        }
    } else {
        for (i, l) in labels.iter().enumerate() {
            assert_same(&format!("point {i}"), &h.export(l), &expected[i]);
        }
    }
}

#[test]
fn cbt_disabled_or_unrelated_or_missing_origin_starts_a_new_set_and_old_sets_stay() {
    let h = start(|_| {});
    let mut rng = TestRng::new(5);
    let mut points = Vec::new();
    let mut record = |h: &Host, d: &Value| {
        points.push((d["point"].as_str().unwrap().to_string(), h.disk_now()));
    };
    let d = h.backup_vdi();
    record(&h, &d);
    h.guest_writes(&mut rng, 5);
    let d = h.backup_vdi();
    record(&h, &d);
    let first_set = d["set"].as_str().unwrap().to_string();

    // A host crash disables CBT: new set, with a warning that says why.
    h.guest_writes(&mut rng, 5);
    h.sim.with(|st| st.crash());
    let o = h.backup(&["--vdi", &h.vdi]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("changed block tracking was disabled"), "{err}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let d = &v["disks"][0];
    assert_eq!(d["kind"], "base");
    assert_ne!(d["set"], first_set.as_str());
    record(&h, d);

    // CBT disabled and re-enabled behind our back: the origin is in another CBT chain.
    h.sim.with(|st| {
        let r = st.vdi_ref(&h.vdi).unwrap();
        let sref = st.sessions.keys().next().cloned();
        let sess = match sref {
            Some(s) => s,
            None => {
                st.sessions.insert("OpaqueRef:test".into(), "root".into());
                "OpaqueRef:test".into()
            }
        };
        for m in ["VDI.disable_cbt", "VDI.enable_cbt"] {
            st.dispatch(m, &[sess.clone().into(), r.clone().into()])
                .unwrap();
        }
    });
    h.guest_writes(&mut rng, 3);
    let o = h.backup(&["--vdi", &h.vdi]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unrelated"), "{err}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["disks"][0]["kind"], "base");
    record(&h, &v["disks"][0]);

    // The origin snapshot was deleted on the host.
    h.sim.with(|st| {
        let r = st.vdi_ref(&h.vdi).unwrap();
        st.vdis.retain(|_, v| v.snapshot_of != r);
    });
    h.guest_writes(&mut rng, 3);
    let o = h.backup(&["--vdi", &h.vdi]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no longer has snapshot"), "{err}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["disks"][0]["kind"], "base");
    record(&h, &v["disks"][0]);

    // Every point of every set reads back.
    for (label, want) in &points {
        assert_same(label, &h.export(label), want);
    }
    let ls: Value = serde_json::from_str(&ok(&["ls", s(&h.repo()), "--json"])).unwrap();
    let sets = ls["vms"][0]["disks"][0]["sets"].as_array().unwrap().len();
    assert_eq!(sets, 4);
}

#[test]
fn refusals_say_what_to_do_and_leave_nothing_behind() {
    // Wrong password: named, never echoed.
    let h = start(|_| {});
    let bad = h.dir.path().join("bad");
    std::fs::write(&bad, "not-the-password-xyz\n").unwrap();
    let repo = h.repo();
    let o = cbtfs_cmd()
        .args(["backup", s(&repo), "--host", &h.sim.url])
        .args(["--password-file", s(&bad), "--vdi", &h.vdi])
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("SESSION_AUTHENTICATION_FAILED"), "{err}");
    assert!(err.contains("wrong user or password"), "{err}");
    assert!(!err.contains("not-the-password-xyz"), "{err}");

    // No licence: enabling CBT is refused with the reason.
    h.sim.with(|st| st.faults.no_licence = true);
    let err = h.backup_fails(&["--vdi", &h.vdi]);
    assert!(err.contains("LICENCE_RESTRICTION"), "{err}");
    assert!(err.contains("Enterprise"), "{err}");
    // ... but a disk that already has CBT goes on without it.
    h.sim.with(|st| st.faults.no_licence = false);
    h.backup_vdi();
    h.sim.with(|st| st.faults.no_licence = true);
    let d = h.backup_vdi();
    assert_eq!(d["kind"], "incremental");
    h.sim.with(|st| st.faults.no_licence = false);

    // The newer snapshot attached to a VM: VDI_IN_USE with advice; after detaching, the next
    // run succeeds and tidies up.
    h.sim.with(|st| st.faults.attach_snapshots = true);
    let err = h.backup_fails(&["--vdi", &h.vdi]);
    assert!(err.contains("VDI_IN_USE"), "{err}");
    assert!(err.contains("must not be attached"), "{err}");
    h.sim.with(|st| {
        st.faults.attach_snapshots = false;
        for b in st.vbds.values_mut() {
            if st.vdis.get(&b.vdi).is_some_and(|v| v.is_a_snapshot) {
                b.attached = false;
            }
        }
    });
    h.backup_vdi();
    let snaps = h.snapshots();
    assert_eq!(snaps.iter().filter(|s| s.2).count(), 1, "{snaps:?}");

    // on_boot=reset and the wrong VDI type cannot have CBT.
    let h2 = start(|_| {});
    h2.sim.with(|st| {
        let r = st.vdi_ref(&h2.vdi).unwrap();
        st.vdis.get_mut(&r).unwrap().on_boot = "reset".into();
    });
    let err = h2.backup_fails(&["--vdi", &h2.vdi]);
    assert!(
        err.contains("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION"),
        "{err}"
    );
    assert!(err.contains("on-boot=persist"), "{err}");
    assert!(h2.snapshots().is_empty());
    // A VDI uuid the host does not know.
    let err = h2.backup_fails(&["--vdi", "00000000-0000-4000-8000-000000000000"]);
    assert!(err.contains("UUID_INVALID"), "{err}");
    // No password at all.
    let o = cbtfs_cmd()
        .args([
            "backup",
            s(&h2.repo()),
            "--host",
            &h2.sim.url,
            "--vdi",
            &h2.vdi,
        ])
        .env_remove("CBTFS_PASSWORD")
        .bounded()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--password-file"));
    // Nothing was committed by the failures.
    let ls: Value = serde_json::from_str(&ok(&["ls", s(&h2.repo()), "--json"])).unwrap();
    assert!(ls["vms"].as_array().unwrap().is_empty(), "{ls}");
}

#[test]
fn certificate_is_pinned_on_first_use_and_a_changed_one_is_refused() {
    let h = start(|_| {});
    let o = h.backup(&["--vdi", &h.vdi]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("pinned the TLS certificate"));
    // The same host again: no new pin message.
    let o = h.backup(&["--vdi", &h.vdi]);
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("pinned"));

    // Another host on the same address with another certificate.
    let other = start(|_| {});
    let o = cbtfs_cmd()
        .args(["backup", s(&h.repo()), "--host", &other.sim.url])
        .args(["--password-file", s(&other.pw), "--vdi", &other.vdi])
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("certificate of 127.0.0.1 changed"), "{err}");
    // It names the pin to delete: the repository's one (sealed, keyed-name) pin object.
    let pins = files_under(&h.repo().join("hosts"));
    assert_eq!(pins.len(), 1, "{pins:?}");
    assert!(
        err.contains(&format!("delete {}", pins[0].display())),
        "{err}"
    );

    // A CA that did not sign it: refused. Its own certificate as the CA: accepted.
    let ca = h.dir.path().join("wrong-ca.pem");
    std::fs::write(&ca, &h.sim.cert_pem).unwrap();
    let o = cbtfs_cmd()
        .args(["backup", s(&h.repo()), "--host", &other.sim.url])
        .args(["--password-file", s(&other.pw), "--vdi", &other.vdi])
        .args(["--ca-cert", s(&ca)])
        .bounded()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("certificate"));
    // --insecure-tls works and says so.
    let o = cbtfs_cmd()
        .args(["backup", s(&h.repo()), "--host", &other.sim.url])
        .args(["--password-file", s(&other.pw), "--vdi", &other.vdi])
        .arg("--insecure-tls")
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not checked"));
}

#[test]
fn xmlrpc_only_host_pool_member_and_vm_selection() {
    let h = start(|c| c.xmlrpc_only = true);
    let o = h.backup(&["--vm", "vm1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["xmlrpc"], true);
    assert_eq!(v["disks"][0]["vm"], "vm1");
    let want = h.disk_now();
    assert_same(
        "xml-rpc base",
        &h.export(v["disks"][0]["point"].as_str().unwrap()),
        &want,
    );

    let j = start(|_| {});
    let o = j.backup(&["--vdi", &j.vdi]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["xmlrpc"], false);

    // A pool member answers HOST_IS_SLAVE: the backup follows it to the master.
    let port = j.sim.port;
    let sdir = tempfile::tempdir().unwrap();
    let mut c = SimConfig::new(sdir.path());
    c.bind = format!("127.0.0.2:{port}");
    let member = match Sim::start(c) {
        Ok(m) => m,
        Err(e) => {
            skip(&format!("the pool member part: {e}"));
            return;
        }
    };
    member.with(|st| st.slave_of = Some("127.0.0.1".into()));
    let o = cbtfs_cmd()
        .args(["backup", s(&j.repo()), "--host", &member.url])
        .args(["--password-file", s(&j.pw), "--vdi", &j.vdi, "--json"])
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("pool master 127.0.0.1"), "{err}");
}

#[test]
fn without_nbd_network_reads_export_raw_vdi_and_keeps_only_changed_blocks() {
    let h = start(|c| c.nbd = NbdMode::None);
    let mut rng = TestRng::new(3);
    let want0 = h.disk_now();
    let o = h.backup(&["--vdi", &h.vdi]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("purpose=nbd"));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["disks"][0]["via"], "export_raw_vdi");
    let p0 = v["disks"][0]["point"].as_str().unwrap().to_string();
    let touched = h.guest_writes(&mut rng, 4);
    let want1 = h.disk_now();
    let d = h.backup_vdi();
    assert_eq!(d["kind"], "incremental");
    assert_eq!(d["changed_blocks"], touched.len() as u64);
    assert_same("base", &h.export(&p0), &want0);
    assert_same("increment", &h.export(d["point"].as_str().unwrap()), &want1);
    let ls: Value = serde_json::from_str(&ok(&["ls", s(&h.repo()), "--json"])).unwrap();
    let pts = &ls["vms"][0]["disks"][0]["sets"][0]["points"];
    assert_eq!(pts[1]["changed_blocks"], touched.len() as u64, "{ls}");

    // A 302 is followed; an error page inside a 200 is an error, and nothing is committed.
    h.sim.with(|st| st.faults.export_redirect = true);
    h.guest_writes(&mut rng, 2);
    let d = h.backup_vdi();
    assert_eq!(d["kind"], "incremental");
    h.sim.with(|st| st.faults.export_error_page = true);
    let err = h.backup_fails(&["--vdi", &h.vdi]);
    assert!(err.contains("export_raw_vdi of VDI"), "{err}");
    assert!(err.contains("unexpected error"), "{err}");
    assert_eq!(h.snapshots().iter().filter(|s| s.2).count(), 1);

    // A host that sends more bytes than the VDI holds is refused (it once made the loop spin).
    h.sim.with(|st| {
        st.faults.export_error_page = false;
        st.faults.export_extra_bytes = 3 * 65536;
    });
    let err = h.backup_fails(&["--vdi", &h.vdi]);
    assert!(err.contains("more than the VDI's"), "{err}");
    assert_eq!(h.snapshots().iter().filter(|s| s.2).count(), 1);
}

#[test]
fn plain_nbd_only_when_asked_and_dropped_connections_are_retried() {
    let h = start(|c| c.nbd = NbdMode::Plain);
    let err = h.backup_fails(&["--vdi", &h.vdi]);
    assert!(err.contains("--allow-plain-nbd"), "{err}");
    // The failed run leaves no snapshot of its own behind.
    assert!(h.snapshots().iter().all(|s| !s.2), "{:?}", h.snapshots());
    let o = h.backup(&["--vdi", &h.vdi, "--allow-plain-nbd"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unencrypted"));

    let t = start(|_| {});
    let mut rng = TestRng::new(9);
    t.sim.with(|st| st.faults.nbd_drop_after = Some(3));
    let want = t.disk_now();
    let d = t.backup_vdi();
    assert_same(
        "base over dropping connections",
        &t.export(d["point"].as_str().unwrap()),
        &want,
    );
    t.guest_writes(&mut rng, 20);
    let want = t.disk_now();
    let d = t.backup_vdi();
    assert_same(
        "increment over dropping connections",
        &t.export(d["point"].as_str().unwrap()),
        &want,
    );
}

#[test]
fn kill_9_at_random_moments_then_the_next_backup_is_right() {
    let h = start(|c| c.nbd = NbdMode::Tls);
    let mut rng = TestRng::new(42);
    h.backup_vdi();
    for trial in 0..12 {
        h.guest_writes(&mut rng, 20);
        let mut child = h.spawn_backup();
        std::thread::sleep(Duration::from_millis(rng.below(700)));
        let _ = child.kill();
        let _ = child.wait();
        // The repository is consistent whatever the moment.
        ok(&["verify", s(&h.repo())]);
        let want = h.disk_now();
        let d = h.backup_vdi();
        assert_same(
            &format!("trial {trial}"),
            &h.export(d["point"].as_str().unwrap()),
            &want,
        );
        let ours: Vec<_> = h.snapshots().into_iter().filter(|s| s.2).collect();
        assert_eq!(ours.len(), 1, "trial {trial}: {ours:?}");
        assert_eq!(ours[0].1, "cbt_metadata");
    }
}

#[test]
fn demo_backs_up_a_real_guest_filesystem_and_shows_each_day() {
    // Its browse makes loop devices: see `host_state`.
    let _serial = host_state();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    let out = ok(&["demo", s(&d)]);
    let mnt = d.join("mnt");
    let _ = cbtfs(&["browse", "--unmount", s(&d.join("files"))]);
    if cbtfs::mount::mounted_fstype(&mnt).is_some() {
        let _ = Command::new("umount").arg(&mnt).status();
    }
    for want in [
        "day 0: base point",
        "day 4: incremental point",
        "notes.txt = \"day 0: started the project\", report.txt = \"(no such file)\"",
        "report.txt = \"Quarterly report, draft 1\"",
        "report.txt = \"Quarterly report, final\"",
        "notes.txt = \"day 4: oops, deleted the report\", report.txt = \"(no such file)\"",
        "ok: 5 points",
    ] {
        assert!(out.contains(want), "demo output lacks {want:?}:\n{out}");
    }
    assert_eq!(out.matches("(cbt_metadata)").count(), 1, "{out}");
    if can_mount() {
        assert!(
            out.contains("files/disk/home/alice/report.txt = \"Quarterly report, final\""),
            "{out}"
        );
        // The diff from day 0 to day 3 names what the guest changed.
        for want in [
            "A\tdisk/home/alice/report.txt",
            "M\tdisk/home/alice/notes.txt\tsize,content",
        ] {
            assert!(out.contains(want), "demo output lacks {want:?}:\n{out}");
        }
    }
}

#[test]
fn a_grown_disk_and_bitmap_lengths() {
    let h = start(|_| {});
    let mut rng = TestRng::new(21);
    h.backup_vdi();
    // Growth: the new end is read whether or not CBT marks it.
    let grown = (DISK_MB << 20) + 3 * BS as u64 + 512;
    h.sim.with(|st| {
        st.sessions.insert("OpaqueRef:t".into(), "root".into());
        let r = st.vdi_ref(&h.vdi).unwrap();
        st.dispatch(
            "VDI.resize",
            &["OpaqueRef:t".into(), r.into(), grown.to_string().into()],
        )
        .unwrap();
        st.guest_write(&h.vdi, grown - 700, &[0x5a; 700]).unwrap();
    });
    h.guest_writes(&mut rng, 3);
    let want = h.disk_now();
    assert_eq!(want.len() as u64, grown);
    let d = h.backup_vdi();
    assert_eq!(d["kind"], "incremental");
    assert_same("grown", &h.export(d["point"].as_str().unwrap()), &want);

    // A bitmap longer than the disk is tolerated ...
    h.sim.with(|st| st.faults.bitmap_len_delta = 5);
    h.guest_writes(&mut rng, 3);
    let want = h.disk_now();
    let d = h.backup_vdi();
    assert_same(
        "long bitmap",
        &h.export(d["point"].as_str().unwrap()),
        &want,
    );
    // ... a shorter one is refused, and nothing is committed or left on the host.
    h.sim.with(|st| st.faults.bitmap_len_delta = -1);
    h.guest_writes(&mut rng, 3);
    let err = h.backup_fails(&["--vdi", &h.vdi]);
    assert!(err.contains("cut short"), "{err}");
    let ours: Vec<_> = h.snapshots().into_iter().filter(|s| s.2).collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0].0, d["snapshot"].as_str().unwrap());
    // The next run with a sane host goes on from the last point.
    h.sim.with(|st| st.faults.bitmap_len_delta = 0);
    let want = h.disk_now();
    let d2 = h.backup_vdi();
    assert_eq!(d2["kind"], "incremental");
    assert_eq!(d2["seq"], d["seq"].as_u64().unwrap() + 1);
    assert_same(
        "after refusal",
        &h.export(d2["point"].as_str().unwrap()),
        &want,
    );
}

#[test]
fn a_host_certificate_signed_by_a_ca_is_trusted_with_ca_cert() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "30",
        "-subj",
        "/CN=pool CA",
        "-keyout",
        &p("ca-key.pem"),
        "-out",
        &p("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &p("key.pem"),
        "-out",
        &p("host.csr"),
    ]);
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("host.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca-key.pem"),
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        &p("ext.cnf"),
        "-out",
        &p("cert.pem"),
    ]);
    let mut cfg = SimConfig::new(&dir.path().join("sim"));
    cfg.subject = "127.0.0.1".into();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, &cfg.password).unwrap();
    let sim = Sim::start_with_cert(
        cfg,
        std::fs::read_to_string(p("cert.pem")).unwrap(),
        std::fs::read_to_string(p("key.pem")).unwrap(),
    )
    .unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![7u8; 2 << 20]).unwrap();
    let (_, vdis) = sim.add_vm("ca-vm", &[("root", &img)]).unwrap();
    let repo = dir.path().join("repo");
    ok(&["init", s(&repo)]);
    let o = cbtfs_cmd()
        .args([
            "backup",
            s(&repo),
            "--host",
            &sim.url,
            "--password-file",
            s(&pw),
        ])
        .args(["--vdi", &vdis[0], "--ca-cert", &p("ca.pem")])
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("pinned"), "{err}");
    // The same host reached by a name its certificate does not carry is refused.
    let o = cbtfs_cmd()
        .args(["backup", s(&repo), "--password-file", s(&pw)])
        .args(["--host", &sim.url.replace("127.0.0.1", "localhost")])
        .args(["--vdi", &vdis[0], "--ca-cert", &p("ca.pem")])
        .bounded()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("certificate"));
}

/// Back up three times with guest writes between; returns the points' labels and images.
fn three_points(h: &Host) -> Vec<(String, Vec<u8>)> {
    let mut rng = TestRng::new(77);
    let mut out = Vec::new();
    for i in 0..3 {
        if i > 0 {
            h.guest_writes(&mut rng, 10);
        }
        let want = h.disk_now();
        let d = h.backup_vdi();
        out.push((d["point"].as_str().unwrap().to_string(), want));
    }
    h.guest_writes(&mut rng, 10);
    out
}

fn restore(h: &Host, args: &[&str]) -> Output {
    cbtfs_cmd()
        .args(["restore", s(&h.repo())])
        .args(args)
        .args(["--host", &h.sim.url, "--password-file", s(&h.pw)])
        .bounded()
        .unwrap()
}

#[test]
fn restore_a_point_over_its_disk_and_into_a_new_vdi_and_vm() {
    let h = start(|_| {});
    // A system disk: a restore into a new VDI creates the same type.
    h.sim.with(|st| {
        let r = st.vdi_ref(&h.vdi).unwrap();
        st.vdis.get_mut(&r).unwrap().kind = "system".into();
    });
    let points = three_points(&h);
    let (label, want) = &points[1];
    // The disk is in use by its running VM: refused, nothing written.
    let before = h.disk_now();
    let o = restore(&h, &[label, "--to-vdi", &h.vdi]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("attached to VM vm1"), "{err}");
    assert_eq!(h.disk_now(), before);
    // VM shut down: the disk becomes the point, byte for byte.
    h.sim
        .with(|st| st.vbds.values_mut().for_each(|b| b.attached = false));
    let o = restore(&h, &[label, "--to-vdi", &h.vdi, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["verified_blocks"].as_u64().unwrap() > 10, "{r}");
    assert_same("restored over the disk", &h.disk_now(), want);

    // Into a new VDI, with a new VM from the saved metadata.
    let sr = h.sim.with(|st| st.sr_uuid.clone());
    let (label0, want0) = &points[0];
    let o = restore(
        &h,
        &[label0, "--new-vdi", "--sr", &sr, "--new-vm", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let new_vdi = r["vdi"].as_str().unwrap();
    assert_ne!(new_vdi, h.vdi);
    assert_eq!(r["created_vdi"], true);
    assert_same("new VDI", &h.sim.read_vdi(new_vdi).unwrap(), want0);
    h.sim.with(|st| {
        let r = st.vdi_ref(new_vdi).unwrap();
        assert_eq!(st.vdis[&r].kind, "system");
    });
    let vm = r["vm"].as_str().unwrap();
    h.sim.with(|st| {
        let (_, v) = st
            .vms
            .iter()
            .find(|(_, v)| v.uuid == vm)
            .expect("the new VM exists");
        assert_eq!(v.name_label, "vm1");
        let disks: Vec<String> = v
            .vbds
            .iter()
            .map(|b| st.vdis[&st.vbds[b].vdi].uuid.clone())
            .collect();
        assert_eq!(disks, vec![new_vdi.to_string()]);
    });
}

#[test]
fn restore_refusals_and_an_interrupted_upload() {
    let h = start(|_| {});
    let points = three_points(&h);
    let (label, want) = &points[2];
    h.sim
        .with(|st| st.vbds.values_mut().for_each(|b| b.attached = false));
    let sr = h.sim.with(|st| st.sr_uuid.clone());
    // A point that does not exist.
    let o = restore(
        &h,
        &[
            &format!("{}@2001-01-01T00:00:00Z", h.vdi),
            "--to-vdi",
            &h.vdi,
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("2001"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A target of another size.
    let other = h.sim.with(|st| {
        let img = cbtfs::sim::disk::Image::empty(&st.dir, 1 << 20).unwrap();
        let r = st.add_vdi("small", img);
        st.vdis[&r].uuid.clone()
    });
    let o = restore(&h, &[label, "--to-vdi", &other]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("xe vdi-resize"), "{err}");
    // A full SR, a detached SR.
    h.sim.with(|st| st.faults.sr_free = Some(1 << 20));
    let o = restore(&h, &[label, "--new-vdi", "--sr", &sr]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("SR_FULL") && err.contains("no space"), "{err}");
    h.sim.with(|st| {
        st.faults.sr_free = None;
        st.faults.sr_detached = true;
    });
    let o = restore(&h, &[label, "--new-vdi", "--sr", &sr]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("SR_NOT_ATTACHED"), "{err}");
    h.sim.with(|st| st.faults.sr_detached = false);
    // The connection drops half-way: a clear error naming the VDI's state; a rerun completes.
    h.sim.with(|st| st.faults.import_drop_after = Some(5 << 20));
    let o = restore(&h, &[label, "--to-vdi", &h.vdi]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("must not be used") && err.contains(&h.vdi),
        "{err}"
    );
    h.sim.with(|st| st.faults.import_drop_after = None);
    let o = restore(&h, &[label, "--to-vdi", &h.vdi]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same("after the rerun", &h.disk_now(), want);
}

/// Start a backup of the disk and kill it (SIGKILL) once the host has seen `call`.
fn backup_killed_at(h: &Host, call: &str) {
    let seen = h
        .sim
        .with(|st| st.calls.iter().filter(|c| *c == call).count());
    let mut child = h.spawn_backup();
    wait_for(call, Duration::from_secs(60), || {
        h.sim
            .with(|st| st.calls.iter().filter(|c| *c == call).count())
            > seen
    });
    child.kill().unwrap();
    let status = child.bounded().unwrap();
    assert!(!status.success(), "the backup finished before the kill");
}

#[test]
fn a_backup_killed_between_snapshot_and_tag_leaves_nothing_after_the_next_run() {
    let h = start(|c| c.nbd = NbdMode::Tls);
    let mut rng = TestRng::new(5);
    // Killed during the very first run (the disk had no snapshot): the first complete run
    // leaves only its own.
    h.sim.with(|st| st.faults.withhold_snapshot_reply = true);
    backup_killed_at(&h, "VDI.snapshot");
    assert_eq!(h.snapshots().len(), 1);
    let mut points = vec![(h.backup_vdi(), h.disk_now())];
    let snaps = h.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].0, points[0].0["snapshot"].as_str().unwrap());
    let snap = |st: &mut cbtfs::sim::host::State| {
        let r = st.snapshot(&h.vdi).unwrap();
        st.vdis[&r].uuid.clone()
    };
    // Another tool's snapshot, untagged, made before the killed run: it must survive.
    let foreign = h.sim.with(snap);
    let foreign_bytes = h.sim.read_vdi(&foreign).unwrap();
    let mut others = vec![foreign.clone()];
    for (fault, call) in [
        // The kill comes while VDI.snapshot's answer is awaited: the journal has no uuid.
        ("withhold", "VDI.snapshot"),
        // The kill comes after the answer, before the tag: the journal names the snapshot.
        ("hang", "VDI.add_to_other_config"),
    ] {
        h.guest_writes(&mut rng, 10);
        h.sim.with(|st| match fault {
            "withhold" => st.faults.withhold_snapshot_reply = true,
            _ => st.faults.hang_after_snapshot = true,
        });
        let before = h.snapshots().len();
        backup_killed_at(&h, call);
        // The killed run's snapshot is on the host, untagged.
        let left = h.snapshots();
        assert_eq!(left.len(), before + 1, "{fault}: {left:?}");
        let killed: Vec<_> = left
            .iter()
            .filter(|x| !x.2 && !others.contains(&x.0))
            .map(|x| x.0.clone())
            .collect();
        assert_eq!(killed.len(), 1, "{fault}: {left:?}");
        if fault == "withhold" {
            // Another tool snapshots the disk after the kill: the killed run's is the older.
            others.push(h.sim.with(snap));
        }
        h.guest_writes(&mut rng, 10);
        let want = h.disk_now();
        let d = h.backup_vdi();
        let warnings = d["warnings"].to_string();
        assert!(
            warnings.contains(&killed[0]) && warnings.contains("interrupted backup"),
            "{fault}: {warnings}"
        );
        // Only the origin (ours) and the other tool's snapshot remain.
        let mut snaps = h.snapshots();
        snaps.sort();
        let mut expect = vec![(
            d["snapshot"].as_str().unwrap().to_string(),
            "cbt_metadata".to_string(),
            true,
        )];
        expect.extend(
            others
                .iter()
                .map(|o| (o.clone(), "user".to_string(), false)),
        );
        expect.sort();
        assert_eq!(snaps, expect, "{fault}");
        points.push((d, want));
    }
    assert_eq!(h.sim.read_vdi(&foreign).unwrap(), foreign_bytes);
    let journal = h.repo().join("journal");
    assert_eq!(std::fs::read_dir(&journal).unwrap().count(), 0);
    ok(&["verify", s(&h.repo())]);
    for (i, (d, want)) in points.iter().enumerate() {
        assert_same(
            &format!("point {i}"),
            &h.export(d["point"].as_str().unwrap()),
            want,
        );
    }
}

/// A raw image of `mb` MiB with data in some blocks.
fn image(h: &Host, name: &str, mb: u64, seed: u64) -> PathBuf {
    let p = h.dir.path().join(name);
    let mut data = vec![0u8; (mb << 20) as usize];
    let mut rng = TestRng::new(seed);
    for b in 0..data.len() / BS {
        if rng.below(2) == 0 {
            for x in &mut data[b * BS..b * BS + 512] {
                *x = rng.next() as u8;
            }
        }
    }
    std::fs::write(&p, &data).unwrap();
    p
}

/// A VM in the sim by uuid: (power state, [(userdevice, VDI uuid)] in VBD order).
fn vm_disks(h: &Host, vm: &str) -> (String, Vec<(String, String)>) {
    h.sim.with(|st| {
        let v = st
            .vms
            .values()
            .find(|v| v.uuid == vm)
            .expect("the VM exists");
        let disks = v
            .vbds
            .iter()
            .map(|b| {
                let b = &st.vbds[b];
                (b.userdevice.clone(), st.vdis[&b.vdi].uuid.clone())
            })
            .collect();
        (v.power_state.clone(), disks)
    })
}

fn halt(h: &Host, vm: &str) {
    h.sim.with(|st| {
        let (r, v) = st.vms.iter_mut().find(|(_, v)| v.uuid == vm).unwrap();
        v.power_state = "Halted".into();
        let r = r.clone();
        st.vbds
            .values_mut()
            .filter(|b| b.vm == r)
            .for_each(|b| b.attached = false);
    });
}

fn backup_vm(h: &Host, vm: &str) -> Vec<Value> {
    let o = h.backup(&["--vm", vm]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["disks"].as_array().unwrap().clone()
}

/// The point of `vdi` in a backup report.
fn point_of(disks: &[Value], vdi: &str) -> String {
    disks
        .iter()
        .find(|d| d["vdi"] == vdi)
        .and_then(|d| d["point"].as_str())
        .unwrap()
        .to_string()
}

#[test]
fn a_vm_with_two_disks_comes_back_whole_into_a_new_vm_and_over_a_halted_vm() {
    let h = start(|_| {});
    let (a_img, b_img) = (image(&h, "a.img", 8, 1), image(&h, "b.img", 4, 2));
    let (vm, vdis) = h
        .sim
        .add_vm("two", &[("sys", &a_img), ("data", &b_img)])
        .unwrap();
    let sr = h.sim.with(|st| st.sr_uuid.clone());
    let now = || -> Vec<Vec<u8>> { vdis.iter().map(|v| h.sim.read_vdi(v).unwrap()).collect() };
    let mut rng = TestRng::new(3);
    let write = |rng: &mut TestRng| {
        for v in &vdis {
            for _ in 0..8 {
                let size = h.sim.read_vdi(v).unwrap().len() as u64;
                let off = rng.below(size - 3 * BS as u64);
                let data: Vec<u8> = (0..2 * BS).map(|_| rng.next() as u8).collect();
                h.sim.with(|st| st.guest_write(v, off, &data)).unwrap();
            }
        }
    };
    let run1 = backup_vm(&h, &vm);
    let imgs1 = now();
    write(&mut rng);
    let run2 = backup_vm(&h, &vm);
    let imgs2 = now();
    assert_ne!(imgs1, imgs2);
    write(&mut rng);
    let current = now();

    // The second disk's point of the first run brings back the whole VM as it was then.
    let o = restore(
        &h,
        &[
            &point_of(&run1, &vdis[1]),
            "--new-vdi",
            "--sr",
            &sr,
            "--new-vm",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["disks"].as_array().unwrap().len(), 2, "{r}");
    let (state, disks) = vm_disks(&h, r["vm"].as_str().unwrap());
    assert_eq!(state, "Halted");
    let mut devs: Vec<&str> = disks.iter().map(|d| d.0.as_str()).collect();
    devs.sort();
    assert_eq!(devs, ["0", "1"], "{disks:?}");
    for (dev, vdi) in &disks {
        let i: usize = dev.parse().unwrap();
        assert!(!vdis.contains(vdi), "the new VM uses an original disk");
        assert_same(
            &format!("new VM, userdevice {dev}"),
            &h.sim.read_vdi(vdi).unwrap(),
            &imgs1[i],
        );
    }
    assert_eq!(now(), current, "the original disks were touched");

    // Over the original VM: refused while it runs, nothing written.
    let p2 = point_of(&run2, &vdis[0]);
    let o = restore(&h, &[&p2, "--to-vm", &vm]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("xe vm-shutdown"), "{err}");
    assert_eq!(now(), current);
    halt(&h, &vm);
    let o = restore(&h, &[&p2, "--to-vm", &vm, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["disks"].as_array().unwrap().len(), 2, "{r}");
    for (i, v) in vdis.iter().enumerate() {
        assert_same(
            &format!("disk {i} over the VM"),
            &h.sim.read_vdi(v).unwrap(),
            &imgs2[i],
        );
    }

    // Another halted VM with disks of the same sizes: matched by position.
    let blank = |n: &str, mb: u64| {
        let p = h.dir.path().join(n);
        std::fs::write(&p, vec![0u8; (mb << 20) as usize]).unwrap();
        p
    };
    let (x, y) = (blank("x.img", 8), blank("y.img", 4));
    let (other, other_vdis) = h.sim.add_vm("other", &[("x", &x), ("y", &y)]).unwrap();
    halt(&h, &other);
    let p1 = point_of(&run1, &vdis[0]);
    let o = restore(&h, &[&p1, "--to-vm", &other]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (i, v) in other_vdis.iter().enumerate() {
        assert_same(
            &format!("disk {i} of the other VM"),
            &h.sim.read_vdi(v).unwrap(),
            &imgs1[i],
        );
    }
    // Disks that do not match: refused before anything is written.
    let (one, one_vdis) = h.sim.add_vm("one", &[("x", &x)]).unwrap();
    halt(&h, &one);
    let o = restore(&h, &[&p1, "--to-vm", &one]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("has 1 disk (") && err.contains("holds 2"),
        "{err}"
    );
    let (swapped, swapped_vdis) = h.sim.add_vm("swapped", &[("y", &y), ("x", &x)]).unwrap();
    halt(&h, &swapped);
    let o = restore(&h, &[&p1, "--to-vm", &swapped]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("xe vdi-resize"), "{err}");
    for v in one_vdis.iter().chain(&swapped_vdis) {
        assert!(h.sim.read_vdi(v).unwrap().iter().all(|&b| b == 0));
    }

    // A run that backed up one disk only cannot make the VM whole: refused, naming the other.
    let d = h.backup(&["--vdi", &vdis[0]]);
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stderr));
    let d: Value = serde_json::from_slice(&d.stdout).unwrap();
    let lone = d["disks"][0]["point"].as_str().unwrap().to_string();
    let vms_before = h.sim.with(|st| st.vms.len());
    let vdis_before = h.sim.with(|st| st.vdis.len());
    for args in [
        vec![lone.as_str(), "--new-vdi", "--sr", &sr, "--new-vm"],
        vec![lone.as_str(), "--to-vm", &vm],
    ] {
        let o = restore(&h, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            err.contains(&vdis[1]) && err.contains("no point of disk"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(h.sim.with(|st| st.vms.len()), vms_before);
    assert_eq!(h.sim.with(|st| st.vdis.len()), vdis_before);
    for (i, v) in vdis.iter().enumerate() {
        assert_same(
            &format!("disk {i} untouched"),
            &h.sim.read_vdi(v).unwrap(),
            &imgs2[i],
        );
    }
    // The disk alone still restores.
    let o = restore(&h, &[&lone, "--to-vdi", &vdis[0]]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Under --json a run where one disk of the VM fails prints one object: the report, and an
/// error naming the disk, with the disks done before it; a run that fails as a whole prints the
/// error object alone. Both exit 1.
#[test]
fn json_errors_name_the_failed_disk_and_the_disks_done() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SimConfig::new(&dir.path().join("sim"));
    let pw = dir.path().join("pw");
    std::fs::write(&pw, &cfg.password).unwrap();
    let sim = Sim::start(cfg).unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&a, vec![1u8; 2 << 20]).unwrap();
    std::fs::write(&b, vec![2u8; 2 << 20]).unwrap();
    let (_, vdis) = sim.add_vm("web01", &[("xvda", &a), ("xvdb", &b)]).unwrap();
    // The second disk cannot have CBT.
    sim.with(|st| {
        let r = st.vdi_ref(&vdis[1]).unwrap();
        st.vdis.get_mut(&r).unwrap().on_boot = "reset".into();
    });
    let repo = dir.path().join("repo");
    ok(&["init", s(&repo)]);
    let run = |selection: &[&str]| {
        cbtfs_cmd()
            .args([
                "backup",
                s(&repo),
                "--host",
                &sim.url,
                "--password-file",
                s(&pw),
            ])
            .args(selection)
            .arg("--json")
            .bounded()
            .unwrap()
    };
    let o = run(&["--vm", "web01"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["code"], "disks_failed", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.starts_with(&format!("VDI {}: ", vdis[1])), "{v}");
    assert!(
        message.contains("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION"),
        "{v}"
    );
    let done = v["error"]["done"].as_array().unwrap();
    assert_eq!(done.len(), 1, "{v}");
    assert_eq!(done[0]["vdi"], vdis[0].as_str(), "{v}");
    assert_eq!(done[0]["disk"], "xvda", "{v}");
    assert_eq!(done[0]["vm"], "web01", "{v}");
    assert_eq!(done[0]["point"], v["disks"][0]["point"], "{v}");
    assert_eq!(v["disks"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["failures"][0][0], vdis[1].as_str(), "{v}");

    // A VDI the host does not know: the run fails as a whole, nothing done.
    let o = run(&["--vdi", "00000000-0000-4000-8000-000000000000"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    assert_eq!(v["error"]["done"], serde_json::json!([]), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("UUID_INVALID"),
        "{v}"
    );
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
}

/// A backup's report names its point as `ls` and the mount do (`VM/DISK/SET/POINT`), beside
/// the `VDI@TIME` label, and both names reach the disk's bytes (issue 17).
#[test]
fn backup_names_its_point_as_ls_and_the_mount_do() {
    let h = start(|_| {});
    let (d, _) = h.backup_ok(&[]);
    assert_eq!(d["disk_path"], "vm1/root", "{d}");
    let label = d["point"].as_str().unwrap().to_string();
    let path = d["path"].as_str().unwrap().to_string();
    let time = label.rsplit_once('@').unwrap().1;
    assert_eq!(
        path,
        format!("vm1/root/{}/{time}", d["set"].as_str().unwrap())
    );
    let want = h.disk_now();
    assert_same("by path", &h.export(&path), &want);
    assert_same("by label", &h.export(&label), &want);
    let ls: Value = serde_json::from_str(&ok(&["ls", s(&h.repo()), "--json"])).unwrap();
    assert_eq!(
        ls["vms"][0]["disks"][0]["sets"][0]["points"][0]["path"],
        path
    );
}
