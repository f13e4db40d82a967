//! Damage to each file of the format: detected, named, and never read as wrong bytes.

mod common;

use std::path::{Path, PathBuf};

use cbtfs::naming::Tree;
use cbtfs::read::PointReader;
use cbtfs::repo::Repository;
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
    let r = Repository::open(&repo).unwrap();
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
    let r = Repository::open(&repo).unwrap();
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
        let r = Repository::open(&repo).unwrap();
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
