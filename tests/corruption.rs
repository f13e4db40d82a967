//! Damage to each file of the format: detected, named, and never read as wrong bytes.

mod common;

use std::path::{Path, PathBuf};

use cbtfs::naming::Tree;
use cbtfs::read::PointReader;
use cbtfs::repo::{POINT_FORMAT, POINT_VERSION, PointManifest, Repository, manifest};
use common::*;

/// A repository with one disk: base (blocks 0..16 data), point 1 changes block 3, point 2
/// changes block 5. Returns (dir, repo path, vdi, images per point).
fn build() -> (tempfile::TempDir, PathBuf, String, Vec<Vec<u8>>) {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(3);
    let img = d.path().join("img");
    let mut data = vec![0u8; 20 * BS];
    TestRng::new(10).fill(&mut data[..16 * BS]);
    let mut images = vec![data.clone()];
    std::fs::write(&img, &data).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]);
    for (i, b) in [(1u64, 3usize), (2, 5)] {
        TestRng::new(10 + i).fill(&mut data[b * BS..(b + 1) * BS]);
        std::fs::write(&img, &data).unwrap();
        let bm = write_bitmap(d.path(), "bm", &[b as u64], 20);
        ok(&[
            "import",
            s(&repo),
            "--vdi",
            &v,
            "--raw",
            s(&img),
            "--bitmap",
            s(&bm),
            "--time",
            &time(i),
        ]);
        images.push(data.clone());
    }
    (d, repo, v, images)
}

fn set_dir(repo: &Path, v: &str) -> PathBuf {
    let disk = repo.join("disks").join(v);
    std::fs::read_dir(&disk)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

fn file_of(repo: &Path, v: &str, seq: u32, ext: &str) -> PathBuf {
    let dir = set_dir(repo, v);
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with(&format!("{seq:06}")) && n.ends_with(ext)
        })
        .unwrap()
}

fn flip(p: &Path, at: u64) {
    let mut b = std::fs::read(p).unwrap();
    let i = at as usize % b.len();
    b[i] ^= 0x04;
    std::fs::write(p, b).unwrap();
}

fn truncate(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn export_ok(repo: &Path, v: &str, step: u64, want: &[u8]) {
    let o = cbtfs(&["export", s(repo), &format!("{v}@{}", time(step)), "-"]);
    assert!(
        o.status.success(),
        "export of point {step}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.stdout == want, "point {step} exported wrong bytes");
}

fn export_fails(repo: &Path, v: &str, step: u64) -> String {
    let o = cbtfs(&[
        "export",
        s(repo),
        &format!("{v}@{}", time(step)),
        s(&repo.join("../out.raw")),
    ]);
    assert!(
        !o.status.success(),
        "export of damaged point {step} succeeded"
    );
    assert!(
        !repo.join("../out.raw").exists(),
        "a failed export left an image behind"
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn verify_names(repo: &Path, needle: &str) -> String {
    let o = cbtfs(&["verify", s(repo)]);
    assert_eq!(o.status.code(), Some(3), "verify must exit 3 on damage");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains(needle),
        "verify output lacks {needle:?}:\n{out}"
    );
    out
}

#[test]
fn flipped_data_block_fails_exactly_its_range() {
    let (_d, repo, v, images) = build();
    ok(&["verify", s(&repo)]);
    // Base data block 7 (entry 7: blocks 0..16 are stored in order) gets a flipped bit.
    flip(&file_of(&repo, &v, 0, ".data"), 7 * BS as u64 + 1234);
    let out = verify_names(&repo, "block 7 ");
    assert!(out.contains(&format!("{v}@")), "{out}");
    let m = export_fails(&repo, &v, 2);
    assert!(m.contains("block 7") && m.contains("checksum"), "{m}");

    // Everything else of every point still reads; the damaged range errors, never wrong bytes.
    let r = open_repo(&repo);
    let tree = Tree::build(r.catalog().unwrap());
    let set = tree.disk_by_uuid(&v).unwrap().1.history.sets[0].clone();
    for (seq, want) in images.iter().enumerate() {
        let pr = PointReader::open(&r, &set, seq as u32).unwrap();
        for b in 0..20usize {
            let mut buf = vec![0u8; BS];
            match pr.read_at(&mut buf, (b * BS) as u64) {
                Ok(n) => {
                    assert_ne!(b, 7);
                    assert_eq!(&buf[..n], &want[b * BS..(b + 1) * BS]);
                }
                Err(e) => {
                    assert_eq!(b, 7);
                    assert_eq!(e.block, 7);
                    assert_eq!((e.range_start, e.range_end), (7 * BS as u64, 8 * BS as u64));
                }
            }
        }
        // A read spanning the damage reports how far it was good.
        let mut buf = vec![0u8; 4 * BS];
        let e = pr.read_at(&mut buf, 5 * BS as u64 + 100).unwrap_err();
        assert_eq!(e.valid_until, 7 * BS as u64);
        assert_eq!(&buf[..2 * BS - 100], &want[5 * BS + 100..7 * BS]);
    }
}

#[test]
fn damaged_block_that_a_later_point_replaced_does_not_matter_to_it() {
    let (_d, repo, v, images) = build();
    // Base block 3 is replaced in point 1: point 1 and 2 never read the base's copy.
    flip(&file_of(&repo, &v, 0, ".data"), 3 * BS as u64 + 5);
    export_fails(&repo, &v, 0);
    export_ok(&repo, &v, 1, &images[1]);
    export_ok(&repo, &v, 2, &images[2]);
    verify_names(&repo, "block 3 ");
}

#[test]
fn truncated_data_file_fails_the_missing_blocks() {
    let (_d, repo, v, images) = build();
    truncate(&file_of(&repo, &v, 0, ".data"), 10 * BS as u64 + 7);
    let out = verify_names(&repo, "truncated");
    assert!(
        out.contains("block 10 ") && out.contains("block 15 "),
        "{out}"
    );
    let m = export_fails(&repo, &v, 2);
    assert!(m.contains("block 10") && m.contains("truncated"), "{m}");
    let r = open_repo(&repo);
    let set = r.disk(&v).unwrap().sets[0].clone();
    let pr = PointReader::open(&r, &set, 2).unwrap();
    let mut buf = vec![0u8; 10 * BS];
    pr.read_at(&mut buf, 0).unwrap();
    assert!(buf == images[2][..10 * BS]);
}

#[test]
fn damaged_index_makes_its_point_and_later_ones_fail_not_earlier_ones() {
    for (what, damage) in [
        ("bitmaps", 0u8),
        ("footer", 1),
        ("truncated", 2),
        ("magic", 3),
    ] {
        let (_d, repo, v, images) = build();
        let idx = file_of(&repo, &v, 1, ".idx");
        let len = std::fs::metadata(&idx).unwrap().len();
        match damage {
            0 => flip(&idx, len - 48 - 3),
            1 => flip(&idx, len - 30),
            2 => truncate(&idx, len - 10),
            _ => flip(&idx, 2),
        }
        export_ok(&repo, &v, 0, &images[0]);
        let m = export_fails(&repo, &v, 1);
        assert!(m.contains(".idx") && m.contains("damaged"), "{what}: {m}");
        let m = export_fails(&repo, &v, 2);
        assert!(m.contains(".idx"), "{what}: {m}");
        verify_names(&repo, ".idx");
    }
}

#[test]
fn damaged_index_entry_fails_its_block_and_verify_says_so() {
    let (_d, repo, v, images) = build();
    // Point 1 stores one block: its entry is bytes 16..32; flip a bit of its CRC field.
    let idx = file_of(&repo, &v, 1, ".idx");
    flip(&idx, 16 + 12);
    verify_names(&repo, "index entries fail their checksum");
    let m = export_fails(&repo, &v, 1);
    assert!(m.contains("block 3"), "{m}");
    export_ok(&repo, &v, 0, &images[0]);
}

#[test]
fn damaged_or_missing_manifest_is_named_and_earlier_points_still_read() {
    let (_d, repo, v, images) = build();
    let man = set_dir(&repo, &v).join("000001.point");
    flip(&man, 40);
    let ls = ok(&["ls", s(&repo)]);
    assert!(
        ls.contains("DAMAGED") && ls.contains("000001.point"),
        "{ls}"
    );
    export_ok(&repo, &v, 0, &images[0]);
    let o = cbtfs(&["export", s(&repo), &format!("{v}@{}", time(2)), "-"]);
    assert!(!o.status.success());
    let m = String::from_utf8_lossy(&o.stderr);
    assert!(m.contains("damaged") && m.contains("cbtfs verify"), "{m}");
    let out = verify_names(&repo, "000001.point");
    assert!(
        out.contains("000002.point"),
        "the point above is reported unreadable: {out}"
    );
    // A new point cannot be added to a damaged set; a new base can.
    let img = repo.join("../img");
    let bm = write_bitmap(&repo.join(".."), "bm", &[1], 20);
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--bitmap",
        s(&bm),
        "--time",
        &time(9),
    ]);
    assert!(m.contains("damaged") && m.contains("new set"), "{m}");
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(9),
    ]);
    export_ok(&repo, &v, 9, &images[2]);

    // A truncated manifest, and a missing one.
    let (_d2, repo2, v2, images2) = build();
    let man2 = set_dir(&repo2, &v2).join("000002.point");
    truncate(&man2, 100);
    verify_names(&repo2, "000002.point");
    export_ok(&repo2, &v2, 1, &images2[1]);
    std::fs::remove_file(set_dir(&repo2, &v2).join("000001.point")).unwrap();
    let out = verify_names(&repo2, "missing");
    assert!(out.contains("000001.point"), "{out}");
    export_ok(&repo2, &v2, 0, &images2[0]);
}

#[test]
fn damaged_repository_header_is_named() {
    let (_d, repo, _, _) = build();
    let hdr = repo.join("cbtfs.repo");
    flip(&hdr, 30);
    let (_, m) = fails(&["ls", s(&repo)]);
    assert!(m.contains("cbtfs.repo") && m.contains("damaged"), "{m}");
    truncate(&hdr, 10);
    let (_, m) = fails(&["verify", s(&repo)]);
    assert!(m.contains("cbtfs.repo"), "{m}");
}

#[test]
fn random_damage_never_yields_wrong_bytes() {
    // Flip random bytes anywhere in the set's files; whatever still reads must be right.
    for trial in 0..40u64 {
        let (_d, repo, v, images) = build();
        let dir = set_dir(&repo, &v);
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let mut rng = TestRng::new(trial);
        for _ in 0..1 + rng.below(3) {
            let f = &files[rng.below(files.len() as u64) as usize];
            let len = std::fs::metadata(f).unwrap().len();
            flip(f, rng.below(len));
        }
        let r = open_repo(&repo);
        let Ok(disk) = r.disk(&v) else { continue };
        for set in &disk.sets {
            for p in &set.points {
                let Ok(pr) = PointReader::open(&r, set, p.seq) else {
                    continue;
                };
                let want = &images[p.seq as usize];
                for b in 0..20usize {
                    let mut buf = vec![0u8; BS];
                    if let Ok(n) = pr.read_at(&mut buf, (b * BS) as u64) {
                        assert!(
                            buf[..n] == want[b * BS..b * BS + n],
                            "trial {trial}: point {} block {b} read wrong bytes",
                            p.seq
                        );
                    }
                }
            }
        }
        let o = cbtfs(&["verify", s(&repo)]);
        assert_eq!(
            o.status.code(),
            Some(3),
            "trial {trial}: verify missed damage"
        );
    }
}

/// Point `seq`'s manifest, decoded as stored (no checks beyond its checksum).
fn read_manifest(repo: &Path, v: &str, seq: u32) -> (PathBuf, PointManifest) {
    let path = set_dir(repo, v).join(format!("{seq:06}.point"));
    let m = manifest::decode(
        &std::fs::read(&path).unwrap(),
        "test",
        "point manifest",
        POINT_FORMAT,
        POINT_VERSION,
    )
    .unwrap();
    (path, m)
}

/// Replace a manifest as an attacker with write access could: any content, a valid checksum.
fn write_manifest(path: &Path, m: &PointManifest) {
    std::fs::write(path, manifest::encode(m)).unwrap();
}

#[test]
fn a_manifest_naming_files_outside_the_repository_is_damaged_and_they_are_never_read() {
    let (d, repo, v, images) = build();
    let (path, good) = read_manifest(&repo, &v, 1);
    // Copies of point 1's own objects outside the repository: were the names followed, the
    // point would read and verify fine, so only the check can make these commands fail.
    let set = set_dir(&repo, &v);
    std::fs::copy(set.join(&good.index.name), d.path().join("outside.idx")).unwrap();
    std::fs::copy(set.join(&good.data.name), d.path().join("outside.data")).unwrap();
    let mut evil = good.clone();
    evil.index.name = "../../../../outside.idx".into();
    evil.data.name = "../../../../outside.data".into();
    assert!(set.join(&evil.data.name).exists());
    write_manifest(&path, &evil);

    let out = verify_names(&repo, "000001.point");
    assert!(
        out.contains("index object name \"../../../../outside.idx\" is not a plain .idx file name"),
        "{out}"
    );
    let m = export_fails(&repo, &v, 1);
    assert!(
        m.contains("000001.point") && m.contains("damaged") && m.contains("cbtfs verify"),
        "{m}"
    );
    export_fails(&repo, &v, 2);
    export_ok(&repo, &v, 0, &images[0]);
    let ls = ok(&["ls", s(&repo)]);
    assert!(
        ls.contains("DAMAGED") && ls.contains("000001.point"),
        "{ls}"
    );

    // The VM metadata name and the set name are held to the same rule.
    let mut evil = good.clone();
    evil.set = "../../../..".into();
    write_manifest(&path, &evil);
    verify_names(&repo, "not a set name");
    write_manifest(&path, &good);
    ok(&["verify", s(&repo)]);
    export_ok(&repo, &v, 2, &images[2]);
}

#[test]
fn a_manifest_beyond_the_format_limits_is_damaged_not_listed() {
    let (_d, repo, v, images) = build();
    let (path, good) = read_manifest(&repo, &v, 1);
    type Edit = fn(&mut PointManifest);
    let edits: [(Edit, &str); 3] = [
        (|m| m.virtual_size = 1 << 62, "above the format's limit"),
        (
            |m| m.changed_blocks = 21,
            "holds 21 blocks but its disk has only 20",
        ),
        (
            |m| m.data_blocks = m.changed_blocks + 1,
            "stores 2 blocks but holds only 1",
        ),
    ];
    for (edit, says) in edits {
        let mut m = good.clone();
        edit(&mut m);
        write_manifest(&path, &m);
        let ls = ok(&["ls", s(&repo)]);
        assert!(!ls.contains("PiB"), "{ls}");
        assert!(ls.contains("DAMAGED"), "{ls}");
        verify_names(&repo, says);
        let m = export_fails(&repo, &v, 1);
        assert!(m.contains("000001.point"), "{m}");
        export_ok(&repo, &v, 0, &images[0]);
    }
}

/// The paths each `fsync` in an strace log (`-f -e trace=openat,fsync`) was made on.
fn fsynced_paths(log: &str) -> Vec<String> {
    let mut open: std::collections::HashMap<(String, String), String> = Default::default();
    let mut synced = Vec::new();
    for line in log.lines() {
        let (pid, call) = line.split_once(' ').unwrap_or(("", line));
        let call = call.trim_start();
        if let Some(rest) = call.strip_prefix("openat(AT_FDCWD, \"") {
            let (path, tail) = rest.split_once('"').unwrap();
            if let Some(fd) = tail.rsplit_once("= ").map(|(_, fd)| fd.trim())
                && fd.parse::<u32>().is_ok()
            {
                open.insert((pid.to_string(), fd.to_string()), path.to_string());
            }
        } else if let Some(rest) = call.strip_prefix("fsync(") {
            let fd = rest.split(')').next().unwrap();
            if let Some(p) = open.get(&(pid.to_string(), fd.to_string())) {
                synced.push(p.clone());
            }
        }
    }
    synced
}

fn strace_cbtfs(log: &Path, args: &[&str]) {
    let o = std::process::Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=openat,fsync", "-o", s(log), bin()])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_repository_and_existing_directories_are_synced_into_their_parents() {
    if !have("strace") {
        return skip("needs strace to watch fsync calls");
    }
    let d = tempfile::tempdir().unwrap();
    let parent = d.path().join("parent");
    std::fs::create_dir(&parent).unwrap();
    let repo = parent.join("repo");
    let log = d.path().join("log");
    strace_cbtfs(&log, &["init", s(&repo)]);
    let synced = fsynced_paths(&std::fs::read_to_string(&log).unwrap());
    assert!(
        synced.iter().any(|p| Path::new(p) == parent),
        "init never synced {} (the directory holding the repository): {synced:?}",
        parent.display()
    );

    // A second point in an existing set: the set's and the disk's directories already exist,
    // and are synced into their parents all the same (a crashed run may have made them).
    let v = vdi(4);
    let img = d.path().join("img");
    std::fs::write(&img, vec![7u8; 4 * BS]).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]);
    let bm = write_bitmap(d.path(), "bm", &[1], 4);
    let args = [
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--bitmap",
        s(&bm),
        "--time",
        &time(1),
    ];
    strace_cbtfs(&log, &args);
    let synced = fsynced_paths(&std::fs::read_to_string(&log).unwrap());
    for dir in [repo.join("disks"), repo.join("disks").join(&v)] {
        assert!(
            synced.iter().any(|p| Path::new(p) == dir),
            "{} was not synced: {synced:?}",
            dir.display()
        );
    }
}

#[test]
fn an_empty_or_malformed_pin_file_is_an_error_and_no_password_is_sent() {
    use cbtfs::sim::{Sim, SimConfig};
    if !have("openssl") {
        return skip("the simulated host needs openssl for its certificate");
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = SimConfig::new(&d.path().join("sim"));
    let pw = d.path().join("password");
    std::fs::write(&pw, format!("{}\n", cfg.password)).unwrap();
    let sim = Sim::start(cfg).unwrap();
    let img = d.path().join("disk.img");
    std::fs::write(&img, vec![1u8; 4 * BS]).unwrap();
    let (_, vdis) = sim.add_vm("vm1", &[("root", &img)]).unwrap();
    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    std::fs::create_dir(repo.join("hosts")).unwrap();
    let pin = repo.join("hosts/127.0.0.1.pin");
    for (content, says) in [
        ("", "is empty"),
        ("\n", "is empty"),
        ("SHA256:00:11\n", "does not hold a SHA-256 fingerprint"),
    ] {
        std::fs::write(&pin, content).unwrap();
        let (_, m) = fails(&[
            "backup",
            s(&repo),
            "--host",
            &sim.url,
            "--password-file",
            s(&pw),
            "--vdi",
            &vdis[0],
        ]);
        assert!(m.contains(s(&pin)) && m.contains(says), "{m}");
        assert!(m.contains("delete it to pin"), "{m}");
        assert_eq!(
            std::fs::read_to_string(&pin).unwrap(),
            content,
            "the pin was changed"
        );
        let calls = sim.with(|st| st.calls.clone());
        assert!(calls.is_empty(), "the host was called: {calls:?}");
    }
    // Deleted, it is pinned again on first use.
    std::fs::remove_file(&pin).unwrap();
    let o = cbtfs(&[
        "backup",
        s(&repo),
        "--host",
        &sim.url,
        "--password-file",
        s(&pw),
        "--vdi",
        &vdis[0],
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fp = std::fs::read_to_string(&pin).unwrap();
    assert!(fp.starts_with("SHA256:"), "{fp}");
}
