//! Every command on a repository in an S3 bucket (issue 19), against a real radosgw
//! (tests/suite/common/rgw.rs), beyond what tests/suite/s3/basics.rs covers (init, import, ls, export, a mount
//! read, verify, prune, gc, copy local ↔ S3): `backup` and `restore` through the simulated
//! host, `browse`, `dump`, `find` and `diff` of a real ext4 inside the points, the key slots,
//! `copy` from one bucket to another, and `mount -t cbtfs s3://…` with the endpoint and the
//! credentials in its `-o` options (an fstab line has no environment).
//!
//! Bytes are checked against the source (the simulated disk, the guest's files); where a local
//! repository holding the same points can answer too, the bucket's answer must equal it.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::rgw::{no_secret, s3cbtfs, s3ok};
use crate::common::simhost::SimHost;
use crate::common::*;
use serde_json::Value;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    )
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(b) = got
        .chunks(BS)
        .zip(want.chunks(BS))
        .position(|(a, b)| a != b)
    {
        panic!("{what}: block {b} differs");
    }
}

/// `cbtfs backup`, `export` and `verify` of three runs (a base, then two incrementals fetching
/// only the blocks the guest wrote) into a bucket; `restore` of the points over the disk and
/// into a new VDI, byte for byte.
#[test]
fn backup_and_restore_through_the_simulator_with_the_repository_in_a_bucket() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("backup", false);
    let url = format!("s3://{bucket}/pool1");
    let mut disk = vec![0u8; 8 << 20];
    let mut rng = TestRng::new(1901);
    for b in 0..disk.len() / BS {
        if rng.below(3) == 0 {
            rng.fill(&mut disk[b * BS..b * BS + 8192]);
        }
    }
    let h = SimHost::start(|_| {}, &disk);
    s3ok(rgw, &["init", &url]);
    let backup = || -> Value {
        let o = cbtfs_cmd()
            .envs(rgw.env())
            .args(["backup", &url, "--host", &h.sim.url])
            .args(["--password-file", s(&h.pw), "--vdi", &h.vdi, "--json"])
            .bounded()
            .unwrap();
        no_secret(rgw, &["backup"], &o);
        assert!(o.status.success(), "backup: {}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["disks"][0].clone()
    };
    let mut points = Vec::new();
    for i in 0..3u64 {
        let mut touched = BTreeSet::new();
        if i > 0 {
            // Guest writes at known places, some across a block boundary.
            for _ in 0..5 {
                let len = 1 + rng.below(2 * BS as u64);
                let off = rng.below(disk.len() as u64 - len);
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                h.sim.with(|st| st.guest_write(&h.vdi, off, &data)).unwrap();
                touched.extend(off / BS as u64..=(off + len - 1) / BS as u64);
            }
        }
        let want = h.sim.read_vdi(&h.vdi).unwrap();
        let d = backup();
        assert_eq!(d["seq"], i, "{d}");
        if i == 0 {
            assert_eq!(d["kind"], "base", "{d}");
        } else {
            assert_eq!(d["kind"], "incremental", "{d}");
            assert_eq!(d["changed_blocks"], touched.len() as u64, "{d}");
            assert_eq!(d["fetched_blocks"], touched.len() as u64, "{d}");
        }
        points.push((d["point"].as_str().unwrap().to_string(), want));
    }
    let dir = tempfile::tempdir().unwrap();
    for (k, (p, want)) in points.iter().enumerate() {
        let out = dir.path().join(format!("{k}.raw"));
        s3ok(rgw, &["export", &url, p, s(&out)]);
        assert_same(
            &format!("point {k} ({p})"),
            &std::fs::read(&out).unwrap(),
            want,
        );
    }
    let out = s3ok(rgw, &["verify", &url]);
    assert!(out.starts_with("ok"), "{out}");
    let ls: Value = serde_json::from_str(&s3ok(rgw, &["ls", &url, "--json"])).unwrap();
    let listed = ls["vms"][0]["disks"][0]["sets"][0]["points"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(listed, 3, "{ls}");

    let restore = |args: &[&str]| -> Output {
        let o = cbtfs_cmd()
            .envs(rgw.env())
            .args(["restore", &url])
            .args(args)
            .args(["--host", &h.sim.url, "--password-file", s(&h.pw), "--json"])
            .bounded()
            .unwrap();
        no_secret(rgw, &["restore"], &o);
        o
    };
    // Over the disk (its VM shut down): the disk becomes point 1 again.
    h.sim
        .with(|st| st.vbds.values_mut().for_each(|b| b.attached = false));
    let (p1, want1) = &points[1];
    let o = restore(&[p1, "--to-vdi", &h.vdi]);
    assert!(o.status.success(), "restore: {}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["verified_blocks"].as_u64().unwrap() > 0, "{r}");
    assert_same(
        "the disk restored from point 1",
        &h.sim.read_vdi(&h.vdi).unwrap(),
        want1,
    );
    // Into a new VDI: the base.
    let sr = h.sim.with(|st| st.sr_uuid.clone());
    let (p0, want0) = &points[0];
    let o = restore(&[p0, "--new-vdi", "--sr", &sr]);
    assert!(o.status.success(), "restore: {}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let new_vdi = r["vdi"].as_str().unwrap();
    assert_ne!(new_vdi, h.vdi);
    assert_same(
        "a new VDI restored from the base",
        &h.sim.read_vdi(new_vdi).unwrap(),
        want0,
    );
}

/// What a tree holds: files with their bytes, symlinks with their targets, directories.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>),
    Link(String),
}

/// Every entry below `root` (but ext4's lost+found), by path relative to it.
fn tree(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if rel.is_empty() && name == "lost+found" {
                continue;
            }
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                out.insert(r.clone(), Node::Dir);
                stack.push((e.path(), r));
            } else if md.file_type().is_symlink() {
                let t = std::fs::read_link(e.path()).unwrap();
                out.insert(r, Node::Link(t.to_string_lossy().into_owned()));
            } else {
                out.insert(r, Node::File(std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

/// Mount the ext4 image `img` rw (the guest), run `f` on it, unmount; returns `f`'s answer.
fn in_guest<T>(img: &Path, f: impl FnOnce(&Path) -> T) -> T {
    // Its loop device must not show up as another test's leftover.
    let _host = crate::common::host_state();
    let mp = tempfile::tempdir().unwrap();
    sh(&format!(
        "mount -o loop -t ext4 {} {}",
        s(img),
        s(mp.path())
    ));
    let r = catch_unwind(AssertUnwindSafe(|| f(mp.path())));
    sh(&format!("umount {}", s(mp.path())));
    r.unwrap_or_else(|p| resume_unwind(p))
}

fn write(p: &Path, bytes: &[u8]) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, bytes).unwrap();
}

/// The 64 KiB blocks that differ between two images of the same size.
fn changed_blocks(a: &[u8], b: &[u8]) -> Vec<u64> {
    a.chunks(BS)
        .zip(b.chunks(BS))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

/// The changes `cbtfs diff` must list between two trees of volume `vol`: (status, vol/path).
fn expected_changes(
    vol: &str,
    a: &BTreeMap<String, Node>,
    b: &BTreeMap<String, Node>,
) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.insert(("D".into(), format!("{vol}/{k}"))),
            Some(w) if w != v => out.insert(("M".into(), format!("{vol}/{k}"))),
            Some(_) => false,
        };
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.insert(("A".into(), format!("{vol}/{k}")));
    }
    out
}

fn changes(json: &str) -> BTreeSet<(String, String)> {
    let j: Value = serde_json::from_str(json).unwrap();
    j["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes in {j}"))
        .iter()
        .map(|c| {
            (
                c["status"].as_str().unwrap().to_string(),
                c["path"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Mounts at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = s(dir);
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == d || m.starts_with(&format!("{d}/")))
        .map(String::from)
        .collect()
}

/// `browse`, `dump` (a file, a tar), `find` and `diff` of a real ext4 (made with mkfs.ext4,
/// written by the kernel's driver) in two points in a bucket: the guest's bytes, and the same
/// answers as a local repository holding the same points.
#[test]
fn browse_dump_find_and_diff_read_a_real_ext4_from_a_bucket() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    if !can_mount() {
        return;
    }
    let missing: Vec<&str> = ["mkfs.ext4", "losetup", "fuse2fs", "e2fsck", "tar"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        skip(&format!(
            "missing {missing:?} (scripts/setup.sh installs them)"
        ));
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let img = dp.join("guest.img");
    sh(&format!(
        "truncate -s 48M {i} && mkfs.ext4 -q -b 4096 {i}",
        i = s(&img)
    ));
    let mut rng = TestRng::new(1902);
    let mut random = |n: usize| {
        let mut b = vec![0u8; n];
        rng.fill(&mut b);
        b
    };
    let big0 = random((1 << 20) + 4321);
    let patch = random(5000);
    let many: Vec<Vec<u8>> = (0..12).map(|i| random(200 + i * 331)).collect();
    let want0 = in_guest(&img, |m| {
        write(&m.join("etc/app.conf"), &[b'a'; 100]);
        write(&m.join("srv/big.bin"), &big0);
        write(&m.join("srv/gone.txt"), b"removed at point 1\n");
        for (i, b) in many.iter().enumerate() {
            write(&m.join(format!("srv/many/f{i:02}")), b);
        }
        std::os::unix::fs::symlink("../etc/app.conf", m.join("srv/conf-link")).unwrap();
        sh("sync");
        tree(m)
    });
    let v0 = std::fs::read(&img).unwrap();
    let want1 = in_guest(&img, |m| {
        write(&m.join("etc/app.conf"), &[b'b'; 2500]);
        write(&m.join("etc/app-extra.conf"), b"x\n");
        // In place: the file keeps its blocks, only the changed-block map tells.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.join("srv/big.bin"))
            .unwrap();
        f.write_all_at(&patch, 300_000).unwrap();
        f.sync_all().unwrap();
        std::fs::remove_file(m.join("srv/gone.txt")).unwrap();
        write(&m.join("new/dir/added.txt"), b"added at point 1\n");
        sh("sync");
        tree(m)
    });
    let v1 = std::fs::read(&img).unwrap();
    let mut big1 = big0.clone();
    big1[300_000..305_000].copy_from_slice(&patch);
    assert_eq!(want1["srv/big.bin"], Node::File(big1.clone()));
    std::fs::write(dp.join("v0.img"), &v0).unwrap();
    std::fs::write(dp.join("v1.img"), &v1).unwrap();
    let nblocks = (v1.len() / BS) as u64;
    let bm = write_bitmap(dp, "v1.b64", &changed_blocks(&v0, &v1), nblocks);

    // The same two points in a bucket and in a local repository.
    let bucket = rgw.bucket("recovery", false);
    let url = format!("s3://{bucket}/guests");
    let local = dp.join("local");
    let v = vdi(1902);
    let (t0, t1) = (time(0), time(24));
    for repo in [url.as_str(), s(&local)] {
        s3ok(rgw, &["init", repo]);
        s3ok(
            rgw,
            &[
                "import",
                repo,
                "--vdi",
                &v,
                "--name",
                "xvda",
                "--vm-name",
                "web01",
                "--raw",
                s(&dp.join("v0.img")),
                "--time",
                &t0,
            ],
        );
        s3ok(
            rgw,
            &[
                "import",
                repo,
                "--vdi",
                &v,
                "--raw",
                s(&dp.join("v1.img")),
                "--bitmap",
                s(&bm),
                "--time",
                &t1,
            ],
        );
    }
    let ls: Value = serde_json::from_str(&s3ok(rgw, &["ls", &url, "--json"])).unwrap();
    let names: Vec<String> = ls["vms"][0]["disks"][0]["sets"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["path"]
                .as_str()
                .unwrap()
                .trim_end_matches(".raw")
                .to_string()
        })
        .collect();
    assert_eq!(names.len(), 2, "{ls}");
    let (p0, p1) = (names[0].clone(), names[1].clone());

    // browse: each point's tree is the guest's at its snapshot.
    for (p, want) in [(&p0, &want0), (&p1, &want1)] {
        let b = dp.join("browse");
        let out = s3ok(rgw, &["browse", &url, p, s(&b)]);
        let b = std::fs::canonicalize(&b).unwrap();
        let got = catch_unwind(AssertUnwindSafe(|| tree(&b.join("disk"))));
        let done = s3cbtfs(rgw, &["browse", "--unmount", s(&b)]);
        assert!(done.status.success(), "{}", text(&done));
        assert!(mounts_under(&b).is_empty(), "{:?}", mounts_under(&b));
        let got = got.unwrap_or_else(|e| panic!("{p}: {out}: {e:?}"));
        assert!(
            got == *want,
            "{p}: the browsed tree differs from the guest's"
        );
    }

    // dump: a file to stdout and to -o, a directory as tar; the bucket and the local
    // repository give the same bytes.
    let o = s3cbtfs(rgw, &["dump", &url, &p1, "disk/srv/big.bin"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(o.stdout == big1, "dump of srv/big.bin at point 1 differs");
    let out = dp.join("big0.out");
    s3ok(rgw, &["dump", &url, &p0, "disk/srv/big.bin", "-o", s(&out)]);
    assert!(std::fs::read(&out).unwrap() == big0, "dump -o at point 0");
    let o = s3cbtfs(rgw, &["dump", &url, &p0, "disk/srv/conf-link"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(o.stdout, [b'a'; 100]);
    let tar_s3 = s3cbtfs(rgw, &["dump", &url, &p0, "disk/srv", "--tar"]);
    assert!(tar_s3.status.success(), "{}", text(&tar_s3));
    let tar_local = s3cbtfs(rgw, &["dump", s(&local), &p0, "disk/srv", "--tar"]);
    assert!(tar_local.status.success(), "{}", text(&tar_local));
    assert!(
        tar_s3.stdout == tar_local.stdout,
        "the tar from the bucket differs from the local one"
    );
    std::fs::write(dp.join("srv.tar"), &tar_s3.stdout).unwrap();
    let ext = dp.join("extracted");
    std::fs::create_dir(&ext).unwrap();
    sh(&format!(
        "tar -x -p -f {} -C {}",
        s(&dp.join("srv.tar")),
        s(&ext)
    ));
    let got: BTreeMap<String, Node> = tree(&ext);
    let want_srv: BTreeMap<String, Node> = want0
        .iter()
        .filter(|(k, _)| *k == "srv" || k.starts_with("srv/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(
        got == want_srv,
        "the extracted tar differs from the guest's srv/"
    );

    // find: the points holding etc/app*.conf, newest first, with sizes.
    let found = s3ok(rgw, &["find", &url, "disk/etc/app*.conf", "--json"]);
    let rows: Vec<(String, String, String, u64)> = serde_json::from_str::<Value>(&found)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["point"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap_or("").to_string(),
                r["size"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let row =
        |p: &str, path: &str, n: usize| (p.to_string(), "present".into(), path.into(), n as u64);
    assert_eq!(
        rows,
        vec![
            row(&p1, "etc/app-extra.conf", 2),
            row(&p1, "etc/app.conf", 2500),
            row(&p0, "etc/app.conf", 100),
        ],
        "{found}"
    );
    let found_local = s3ok(rgw, &["find", s(&local), "disk/etc/app*.conf", "--json"]);
    assert_eq!(found, found_local);

    // diff: exactly the guest's changes, as the local repository says.
    let got = changes(&s3ok(rgw, &["diff", &url, &p0, &p1, "--json"]));
    assert_eq!(got, expected_changes("disk", &want0, &want1));
    let local_diff = changes(&s3ok(rgw, &["diff", s(&local), &p0, &p1, "--json"]));
    assert_eq!(got, local_diff);
    assert!(got.contains(&("M".to_string(), "disk/srv/big.bin".to_string())));
}

/// `cbtfs key list/add/passwd/remove` on a password-encrypted repository in a bucket, and
/// `copy` from that bucket into another bucket (opened with the key file added).
#[test]
fn key_slots_and_a_copy_between_buckets() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let bucket = rgw.bucket("keys", false);
    let url = format!("s3://{bucket}/enc");
    let pw = dp.join("pw");
    let pw2 = dp.join("pw2");
    let key = dp.join("offsite.key");
    std::fs::write(&pw, "first-s3-password-19\n").unwrap();
    std::fs::write(&pw2, "second-s3-password-19\n").unwrap();
    // No CBTFS_KEY_FILE: only what each command names opens the repository.
    let run = |args: &[&str]| -> Output {
        let o = cbtfs_cmd()
            .env_remove("CBTFS_KEY_FILE")
            .envs(rgw.env())
            .args(args)
            .bounded()
            .unwrap();
        no_secret(rgw, args, &o);
        for t in [&o.stdout, &o.stderr] {
            let t = String::from_utf8_lossy(t);
            assert!(!t.contains("s3-password-19"), "a password was printed: {t}");
        }
        o
    };
    let ok_ = |args: &[&str]| -> String {
        let o = run(args);
        assert!(o.status.success(), "cbtfs {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let slots = |open: &[&str]| -> Vec<(String, String, bool)> {
        let v: Value =
            serde_json::from_str(&ok_(&[&["key", "list", &url, "--json"][..], open].concat()))
                .unwrap();
        v["slots"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().to_string(),
                    s["kind"].as_str().unwrap().to_string(),
                    s["current"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let by_pw = ["--repo-password-file", s(&pw)];
    let by_pw2 = ["--repo-password-file", s(&pw2)];
    let by_key = ["--key-file", s(&key)];
    ok_(&[&["init", &url][..], &by_pw].concat());
    let out = ok_(&[
        &[
            "key",
            "add",
            &url,
            "--new-key-file",
            s(&key),
            "--label",
            "offsite",
        ][..],
        &by_pw,
    ]
    .concat());
    assert!(
        out.contains("added key slot") && out.contains("(made now)"),
        "{out}"
    );
    let v = slots(&by_key);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v.iter().any(|s| s.1 == "password" && !s.2), "{v:?}");
    assert!(v.iter().any(|s| s.1 != "password" && s.2), "{v:?}");
    let table = ok_(&[&["key", "list", &url][..], &by_key].concat());
    assert!(table.contains("offsite"), "{table}");

    // A point, written with the password.
    let mut data = vec![0u8; 24 * BS];
    TestRng::new(1903).fill(&mut data[3 * BS..17 * BS]);
    let img = dp.join("img");
    std::fs::write(&img, &data).unwrap();
    let v = vdi(1903);
    ok_(&[
        &[
            "import",
            &url,
            "--vdi",
            &v,
            "--raw",
            s(&img),
            "--time",
            &time(0),
        ][..],
        &by_pw,
    ]
    .concat());

    // passwd: the new password opens it, the old one no longer does.
    let before = slots(&by_pw);
    let pw_slot = before.iter().find(|s| s.2).unwrap().0.clone();
    let out = ok_(&[
        &["key", "passwd", &url, "--new-password-file", s(&pw2)][..],
        &by_pw,
    ]
    .concat());
    assert!(out.contains(&format!("key slot {pw_slot}")), "{out}");
    let o = run(&[&["ls", &url][..], &by_pw].concat());
    assert!(!o.status.success());
    assert!(text(&o).contains("does not open"), "{}", text(&o));
    let after = slots(&by_pw2);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(!after.iter().any(|s| s.0 == pw_slot), "{after:?}");
    let new_pw_slot = after.iter().find(|s| s.2).unwrap().0.clone();

    // remove: the slot in use is refused; the password's slot goes, opened with the key file.
    let key_slot = after.iter().find(|s| !s.2).unwrap().0.clone();
    let o = run(&[&["key", "remove", &url, &key_slot][..], &by_key].concat());
    assert!(!o.status.success());
    assert!(text(&o).contains("opened with"), "{}", text(&o));
    let out = ok_(&[&["key", "remove", &url, &new_pw_slot][..], &by_key].concat());
    assert!(
        out.contains(&format!("removed key slot {new_pw_slot}")),
        "{out}"
    );
    let o = run(&[&["ls", &url][..], &by_pw2].concat());
    assert!(!o.status.success(), "{}", text(&o));
    assert_eq!(slots(&by_key).len(), 1);
    let out = dp.join("out");
    ok_(&[
        &["export", &url, &format!("{v}@latest"), s(&out)][..],
        &by_key,
    ]
    .concat());
    assert!(std::fs::read(&out).unwrap() == data);

    // copy from this bucket into another one (encrypted with the tests' key file).
    let other = rgw.bucket("keys-copy", false);
    let dst = format!("s3://{other}/copy");
    s3ok(rgw, &["init", &dst]);
    let to = ["--to-key-file", s(key_file())];
    let out = ok_(&[&["copy", &url, &dst, "--json"][..], &by_key, &to].concat());
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["points_copied"], 1, "{j}");
    let out2 = dp.join("out2");
    s3ok(rgw, &["export", &dst, &format!("{v}@latest"), s(&out2)]);
    assert!(std::fs::read(&out2).unwrap() == data);
    s3ok(rgw, &["verify", &dst]);
}

/// `mount.cbtfs` on mount(8)'s search path, pointing at this checkout's helper (as
/// tests/mount.rs does).
fn install_helper() -> PathBuf {
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helper/mount.cbtfs");
    let installed = Path::new("/sbin/mount.cbtfs");
    match std::fs::symlink_metadata(installed) {
        Ok(md) if md.file_type().is_symlink() => {
            let _ = std::fs::remove_file(installed);
            let _ = std::os::unix::fs::symlink(&helper, installed);
        }
        Ok(_) => {}
        Err(_) => {
            let _ = std::os::unix::fs::symlink(&helper, installed);
        }
    }
    helper
}

/// `mount -t cbtfs s3://BUCKET/PREFIX DIR -o …` as an fstab line runs it: no environment but
/// PATH, so the endpoint, the credentials file and profile, and the key file come from `-o`.
#[test]
fn mount_t_cbtfs_of_a_bucket_takes_the_endpoint_and_credentials_from_its_options() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    if !can_mount() {
        return;
    }
    install_helper();
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let bucket = rgw.bucket("fstab", false);
    let url = format!("s3://{bucket}/site");
    let mut data = vec![0u8; 20 * BS];
    TestRng::new(1904).fill(&mut data[2 * BS..9 * BS]);
    std::fs::write(dp.join("img"), &data).unwrap();
    let v = vdi(1904);
    s3ok(rgw, &["init", &url]);
    s3ok(
        rgw,
        &[
            "import",
            &url,
            "--vdi",
            &v,
            "--raw",
            s(&dp.join("img")),
            "--time",
            &time(0),
        ],
    );
    let creds = dp.join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n\n[cbtfs]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            rgw.access_key, rgw.secret_key
        ),
    )
    .unwrap();
    let mp = dp.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp = std::fs::canonicalize(&mp).unwrap();
    let mount = |opts: &str| -> Output {
        Command::new("mount")
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("CBTFS_BIN", bin())
            .args(["-t", "cbtfs", "-o", opts, &url, s(&mp)])
            .bounded()
            .unwrap()
    };
    let base = format!(
        "noauto,_netdev,key_file={},s3_endpoint={}",
        s(key_file()),
        rgw.endpoint
    );
    // Without credentials: refused, saying what is missing; nothing mounted.
    let o = mount(&format!(
        "{base},s3_credentials_file={}",
        s(&dp.join("none"))
    ));
    assert!(!o.status.success());
    assert!(text(&o).contains("no S3 credentials"), "{}", text(&o));
    assert!(cbtfs::mount::mounted_fstype(&mp).is_none());
    // s3_ca_cert= reaches the store: a file that is no PEM is named, with the flag to fix.
    let bad_ca = dp.join("ca.pem");
    std::fs::write(&bad_ca, "not a certificate\n").unwrap();
    let o = mount(&format!(
        "{base},s3_credentials_file={},s3_profile=cbtfs,s3_ca_cert={}",
        s(&creds),
        s(&bad_ca)
    ));
    assert!(!o.status.success());
    let m = text(&o);
    assert!(
        m.contains(&format!("{} holds no PEM certificate", s(&bad_ca)))
            && m.contains("--s3-ca-cert")
            && m.contains("s3_ca_cert="),
        "{m}"
    );
    assert!(cbtfs::mount::mounted_fstype(&mp).is_none());
    // The profile picks the right keys in the file.
    let o = mount(&format!(
        "{base},s3_credentials_file={},s3_profile=cbtfs",
        s(&creds)
    ));
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains(&rgw.secret_key));
    let _guard = MountGuard(mp.clone());
    let read = std::fs::read(mp.join("by-uuid").join(&v).join("latest.raw"));
    wait_for("the unmount", std::time::Duration::from_secs(10), || {
        Command::new("umount").arg(&mp).status().unwrap().success()
    });
    assert!(read.unwrap() == data, "the mount read other bytes");
}

/// Damage in the bucket (a pack's bytes changed by anyone holding the keys, then the pack
/// deleted): `verify` exits 3 naming the object and the blocks, and `export` fails rather than
/// give other bytes.
#[test]
fn verify_and_export_name_a_damaged_or_deleted_pack_in_the_bucket() {
    use cbtfs::repo::store::Store;
    use cbtfs::repo::store::s3::{S3Config, S3Store, S3Url};
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let bucket = rgw.bucket("damage", false);
    let url = format!("s3://{bucket}/dmg");
    let mut data = vec![0u8; 16 * BS];
    TestRng::new(1905).fill(&mut data);
    std::fs::write(dp.join("img"), &data).unwrap();
    let v = vdi(1905);
    s3ok(rgw, &["init", &url]);
    s3ok(
        rgw,
        &[
            "import",
            &url,
            "--vdi",
            &v,
            "--raw",
            s(&dp.join("img")),
            "--time",
            &time(0),
        ],
    );
    let out = s3ok(rgw, &["verify", &url]);
    assert!(out.starts_with("ok"), "{out}");
    let store = S3Store::new(
        S3Url::parse(&url).unwrap(),
        S3Config::new(
            Some(rgw.endpoint.clone()),
            &rgw.region,
            &rgw.access_key,
            &rgw.secret_key,
        ),
    )
    .unwrap();
    let packs = store.list("packs/").unwrap();
    assert_eq!(packs.len(), 1, "one pack holds 16 random blocks: {packs:?}");
    let key = packs[0].key.clone();
    let mut bytes = store.get(&key).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    store.delete(&key).unwrap();
    store.put(&key, &bytes).unwrap();

    let verify = |needle: &str| -> String {
        let o = s3cbtfs(rgw, &["verify", &url]);
        let t = text(&o);
        assert_eq!(
            o.status.code(),
            Some(3),
            "verify must exit 3 on damage: {t}"
        );
        assert!(t.contains(needle) && t.contains(&key), "{t}");
        t
    };
    verify("block ");
    let out = dp.join("out");
    let o = s3cbtfs(rgw, &["export", &url, &format!("{v}@latest"), s(&out)]);
    assert!(!o.status.success(), "export of a damaged point succeeded");
    assert!(text(&o).contains(&key), "{}", text(&o));
    // Deleted: every block of the pack is missing.
    store.delete(&key).unwrap();
    let t = verify("missing");
    for b in 0..16 {
        assert!(t.contains(&format!("block {b} ")), "{t}");
    }
    let o = s3cbtfs(rgw, &["export", &url, &format!("{v}@latest"), s(&out)]);
    assert!(
        !o.status.success(),
        "export of a point without its pack succeeded"
    );
}
