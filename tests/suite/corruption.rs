//! Damage to each object of repository format 2, through the real binary (`verify`, `export`,
//! a kernel FUSE mount) and the library: a flipped bit, a cut, a deletion or a swap in a pack
//! (a chunk record, the trailer), a point index, a manifest, a chunk index object, the header or
//! a key slot is detected and named (`cbtfs verify` exits 3 naming the object, point and block);
//! reads fail with EIO for exactly the blocks whose chunk is damaged and return every other byte
//! exactly as the source image held it; never other bytes, never a panic. Also: wrong and
//! removed secrets, chunks shared by two disks, `verify --sample`, and random damage anywhere.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::common::*;
use cbtfs::read::PointReader;
use cbtfs::repo::{PointManifest, Repository};

/// Blocks of the test disk; blocks 16.. are zero (never stored).
const BLOCKS: usize = 20;

/// A repository with one disk: base (blocks 0..16 data), point 1 changes block 3, point 2
/// changes block 5.
struct Fixture {
    d: tempfile::TempDir,
    repo: PathBuf,
    v: String,
    /// Each point's image.
    images: Vec<Vec<u8>>,
    /// Each point's manifest (seq order).
    points: Vec<PointManifest>,
    /// The chunk index objects each point's import wrote.
    cindex: Vec<Vec<String>>,
}

impl Fixture {
    fn dir(&self) -> &Path {
        self.d.path()
    }
    /// The file of object `key`.
    fn obj(&self, key: &str) -> PathBuf {
        self.repo.join(key)
    }
    /// Where point `seq`'s own copy of `block` is: (pack file, record offset, record length).
    fn record(&self, seq: usize, block: u32) -> (PathBuf, u64, u64) {
        let r = open_repo(&self.repo);
        let (key, loc) = r
            .locate_block(&self.points[seq], block)
            .unwrap()
            .expect("the point stores the block");
        (self.obj(&key), u64::from(loc.offset), u64::from(loc.len))
    }
}

fn keys_under(repo: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = files_under(&repo.join(prefix))
        .iter()
        .map(|p| p.strip_prefix(repo).unwrap().to_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn import(repo: &Path, v: &str, img: &Path, step: u64, bitmap: Option<&Path>) {
    let t = time(step);
    let mut args = vec!["import", s(repo), "--vdi", v, "--raw", s(img), "--time", &t];
    if let Some(bm) = bitmap {
        args.extend(["--bitmap", s(bm)]);
    }
    ok(&args);
}

fn build() -> Fixture {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(3);
    let img = d.path().join("img");
    let mut data = vec![0u8; BLOCKS * BS];
    TestRng::new(10).fill(&mut data[..16 * BS]);
    let mut images = vec![data.clone()];
    std::fs::write(&img, &data).unwrap();
    import(&repo, &v, &img, 0, None);
    let mut cindex = vec![keys_under(&repo, "cindex")];
    for (i, b) in [(1u64, 3usize), (2, 5)] {
        TestRng::new(10 + i).fill(&mut data[b * BS..(b + 1) * BS]);
        std::fs::write(&img, &data).unwrap();
        let bm = write_bitmap(d.path(), "bm", &[b as u64], BLOCKS as u64);
        let before = keys_under(&repo, "cindex");
        import(&repo, &v, &img, i, Some(&bm));
        let after = keys_under(&repo, "cindex");
        cindex.push(after.into_iter().filter(|k| !before.contains(k)).collect());
        images.push(data.clone());
    }
    let points = open_repo(&repo).disk(&v).unwrap().sets[0].points.clone();
    assert_eq!(points.len(), 3);
    assert!(cindex.iter().all(|c| c.len() == 1), "{cindex:?}");
    Fixture {
        d,
        repo,
        v,
        images,
        points,
        cindex,
    }
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

/// Forget this machine's cached copies of the chunk index (as a machine that never read the
/// repository would be): reads then go to the stored objects. Mirrors `CacheDir::default_for`.
fn forget_cache(repo: &Path) {
    // A damaged header: nothing can be opened, so nothing is cached either.
    let Ok(header) = Repository::probe(repo) else {
        return;
    };
    let id = header.id;
    let abs = |n: &str| {
        std::env::var_os(n)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let base = abs("CBTFS_CACHE_DIR")
        .or_else(|| abs("XDG_CACHE_HOME").map(|d| d.join("cbtfs")))
        .or_else(|| abs("HOME").map(|d| d.join(".cache").join("cbtfs")));
    if let Some(base) = base {
        let _ = std::fs::remove_dir_all(base.join(id));
    }
}

fn point_arg(v: &str, step: u64) -> String {
    format!("{v}@{}", time(step))
}

fn export_ok(repo: &Path, v: &str, step: u64, want: &[u8]) {
    let o = cbtfs(&["export", s(repo), &point_arg(v, step), "-"]);
    assert!(
        o.status.success(),
        "export of point {step}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.stdout == want, "point {step} exported wrong bytes");
}

/// Export must fail, leave no image, and say why; returns its message.
fn export_fails(repo: &Path, v: &str, step: u64) -> String {
    let out = repo.join("../out.raw");
    let o = cbtfs(&["export", s(repo), &point_arg(v, step), s(&out)]);
    assert!(
        !o.status.success(),
        "export of damaged point {step} succeeded"
    );
    assert_eq!(o.status.code(), Some(1), "export of point {step}");
    assert!(!out.exists(), "a failed export left an image behind");
    let m = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!m.contains("panicked"), "{m}");
    m
}

/// `cbtfs verify` must exit 3 and name `needle`; returns its output.
fn verify_names(repo: &Path, needle: &str) -> String {
    let o = cbtfs(&["verify", s(repo)]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(3),
        "verify must exit 3 on damage: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(needle),
        "verify output lacks {needle:?}:\n{out}"
    );
    out
}

/// `cbtfs verify --json [--sample P]`: the report (exit status checked against `damaged`).
fn verify_json(repo: &Path, sample: Option<&str>, damaged: bool) -> serde_json::Value {
    let mut args = vec!["verify", s(repo), "--json"];
    if let Some(p) = sample {
        args.extend(["--sample", p]);
    }
    let o = cbtfs(&args);
    assert_eq!(
        o.status.code(),
        Some(if damaged { 3 } else { 0 }),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The (point label, block) pairs a verify report names.
fn damaged_blocks(report: &serde_json::Value) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = report["damage"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| Some((d["point"].as_str()?.to_string(), d["block"].as_u64()?)))
        .collect();
    v.sort();
    v
}

/// Every block of every point of the disk's first set, through the library: a block `bad`
/// names fails with an error for exactly its range; every other block reads its image's bytes.
fn check_reads(repo: &Path, v: &str, images: &[Vec<u8>], bad: &dyn Fn(usize, u64) -> bool) {
    let r = open_repo(repo);
    let set = r.disk(v).unwrap().sets[0].clone();
    assert_eq!(set.points.len(), images.len());
    for (seq, want) in images.iter().enumerate() {
        let pr = PointReader::open(&r, &set, seq as u32).unwrap();
        for b in 0..(want.len() / BS) as u64 {
            let mut buf = vec![0u8; BS];
            let at = b as usize * BS;
            match pr.read_at(&mut buf, b * BS as u64) {
                Ok(n) => {
                    assert!(!bad(seq, b), "point {seq} block {b} read though damaged");
                    assert_eq!(n, BS);
                    assert!(
                        buf == want[at..at + BS],
                        "point {seq} block {b}: wrong bytes"
                    );
                }
                Err(e) => {
                    assert!(bad(seq, b), "point {seq} block {b} failed: {e}");
                    assert_eq!(e.block, b);
                    assert_eq!(
                        (e.range_start, e.range_end),
                        (b * BS as u64, (b + 1) * BS as u64)
                    );
                    let m = e.to_string();
                    assert!(m.contains("cbtfs verify"), "{m}");
                }
            }
        }
    }
}

/// The same through a kernel mount of the repository: EIO for exactly the bad blocks, every
/// other block byte for byte (whole blocks, and a small read inside each block).
fn check_mount(f: &Fixture, images: &[Vec<u8>], bad: &dyn Fn(usize, u64) -> bool) {
    if !can_mount() {
        return;
    }
    let paths = point_paths(&f.repo);
    assert_eq!(paths.len(), images.len(), "{paths:?}");
    let m = Mounted::new(&f.repo, &f.dir().join("mnt"), &[]);
    for (seq, (p, want)) in paths.iter().zip(images).enumerate() {
        let file = std::fs::File::open(m.mp.join(p)).unwrap();
        for b in 0..(want.len() / BS) as u64 {
            let at = b as usize * BS;
            let mut buf = vec![0u8; BS];
            let mut small = vec![0u8; 512];
            let r = file.read_exact_at(&mut buf, b * BS as u64);
            let r2 = file.read_exact_at(&mut small, b * BS as u64 + 4096);
            if bad(seq, b) {
                for r in [r, r2] {
                    let e = r.expect_err("a damaged block read through the mount");
                    assert_eq!(e.raw_os_error(), Some(libc::EIO), "point {seq} block {b}");
                }
            } else {
                r.unwrap_or_else(|e| panic!("point {seq} block {b} through the mount: {e}"));
                r2.unwrap();
                assert!(
                    buf == want[at..at + BS],
                    "point {seq} block {b}: wrong bytes"
                );
                assert!(small == want[at + 4096..at + 4096 + 512]);
            }
        }
    }
    // A whole read of each point: fails where damage is, else equals its image.
    for (seq, (p, want)) in paths.iter().zip(images).enumerate() {
        let whole = std::fs::read(m.mp.join(p));
        let any_bad = (0..(want.len() / BS) as u64).any(|b| bad(seq, b));
        match whole {
            Ok(bytes) => {
                assert!(!any_bad, "point {seq} read whole though damaged");
                assert!(bytes == *want, "point {seq}: wrong bytes");
            }
            Err(e) => {
                assert!(any_bad, "point {seq}: {e}");
                assert_eq!(e.raw_os_error(), Some(libc::EIO));
            }
        }
    }
    let log = m.log();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn flipped_chunk_record_fails_exactly_its_block_in_every_point_reading_it() {
    let f = build();
    let full = verify_json(&f.repo, None, false);
    assert_eq!(
        full["blocks_checked"], 18,
        "16 base blocks + 2 changed: {full}"
    );
    // Base block 7 (unchanged later, so every point reads the base's chunk).
    let (pack, off, len) = f.record(0, 7);
    flip(&pack, off + len / 2);
    forget_cache(&f.repo);
    let bad = |_: usize, b: u64| b == 7;
    check_reads(&f.repo, &f.v, &f.images, &bad);
    let pack_key = pack.strip_prefix(&f.repo).unwrap().to_str().unwrap();
    // Verify names the block once, with the point that stores it (the others read its copy);
    // every export reading it fails naming the block and the pack.
    let out = verify_names(&f.repo, "block 7 ");
    assert!(out.contains(pack_key), "{out}");
    assert!(out.contains(&f.points[0].label()), "{out}");
    for step in 0..3 {
        let m = export_fails(&f.repo, &f.v, step);
        assert!(m.contains("block 7") && m.contains(pack_key), "{m}");
        assert!(m.contains(&f.points[0].label()), "the owner is named: {m}");
    }
    // --sample 100 finds exactly what the full run finds.
    let want = vec![(f.points[0].label(), 7u64)];
    assert_eq!(damaged_blocks(&verify_json(&f.repo, None, true)), want);
    let sampled = verify_json(&f.repo, Some("100"), true);
    assert_eq!(damaged_blocks(&sampled), want);
    assert_eq!(sampled["blocks_checked"], 18);
    // A read spanning the damage reports how far it was good, and those bytes are right.
    let r = open_repo(&f.repo);
    let set = r.disk(&f.v).unwrap().sets[0].clone();
    for (seq, want) in f.images.iter().enumerate() {
        let pr = PointReader::open(&r, &set, seq as u32).unwrap();
        let mut buf = vec![0u8; 4 * BS];
        let e = pr.read_at(&mut buf, 5 * BS as u64 + 100).unwrap_err();
        assert_eq!(e.valid_until, 7 * BS as u64);
        assert!(buf[..2 * BS - 100] == want[5 * BS + 100..7 * BS]);
    }
    check_mount(&f, &f.images, &bad);
}

#[test]
fn damaged_block_that_a_later_point_replaced_does_not_matter_to_it() {
    let f = build();
    // Base block 3 is replaced in point 1: points 1 and 2 never read the base's copy.
    let (pack, off, _) = f.record(0, 3);
    flip(&pack, off + 5);
    forget_cache(&f.repo);
    export_fails(&f.repo, &f.v, 0);
    export_ok(&f.repo, &f.v, 1, &f.images[1]);
    export_ok(&f.repo, &f.v, 2, &f.images[2]);
    let report = verify_json(&f.repo, None, true);
    assert_eq!(damaged_blocks(&report), [(f.points[0].label(), 3)]);
    check_reads(&f.repo, &f.v, &f.images, &|seq, b| seq == 0 && b == 3);
}

#[test]
fn verify_sample_reads_about_a_share_and_checks_every_reference() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(5);
    let images = import_random_points(d.path(), &repo, &v, 128, 1, 77);
    let full = verify_json(&repo, None, false);
    assert_eq!(full["blocks_checked"], 128);
    assert_eq!(full["references_checked"], 128);
    let all = verify_json(&repo, Some("100"), false);
    assert_eq!(all["blocks_checked"], 128);
    let tenth = verify_json(&repo, Some("10"), false);
    let n = tenth["blocks_checked"].as_u64().unwrap();
    // Binomial(128, 0.1): mean 12.8; 0 or 40+ has a probability below 1e-6.
    assert!((1..40).contains(&n), "--sample 10 read {n} of 128 chunks");
    assert_eq!(tenth["references_checked"], 128, "{tenth}");
    assert_eq!(tenth["sample_percent"], 10.0);
    export_ok(&repo, &v, 0, &images[0]);
}

/// Where pack `pack`'s sealed trailer is: (start, end) in the file (the fixed tail follows).
fn trailer_range(pack: &Path) -> (u64, u64) {
    let b = std::fs::read(pack).unwrap();
    let n = b.len();
    assert_eq!(&b[n - 8..], b"CBTFSPK\x02");
    let tlen = u32::from_le_bytes(b[n - 12..n - 8].try_into().unwrap()) as usize;
    ((n - 12 - tlen) as u64, (n - 12) as u64)
}

#[test]
fn damaged_pack_trailer_or_tail_is_named_and_every_block_still_reads() {
    for (what, at) in [("trailer", 0u8), ("length", 1), ("magic", 2)] {
        let f = build();
        let (pack, _, _) = f.record(0, 0);
        let (start, end) = trailer_range(&pack);
        let len = std::fs::metadata(&pack).unwrap().len();
        flip(
            &pack,
            match at {
                0 => (start + end) / 2,
                1 => len - 10,
                _ => len - 2,
            },
        );
        forget_cache(&f.repo);
        // Reads never use the trailer: every byte is right.
        check_reads(&f.repo, &f.v, &f.images, &|_, _| false);
        for (step, img) in f.images.iter().enumerate() {
            export_ok(&f.repo, &f.v, step as u64, img);
        }
        let key = pack.strip_prefix(&f.repo).unwrap().to_str().unwrap();
        let out = verify_names(&f.repo, key);
        assert!(out.contains("DAMAGED repository"), "{what}: {out}");
        if at == 0 {
            assert!(out.contains("trailer"), "{out}");
        }
    }
}

#[test]
fn truncated_pack_fails_the_blocks_past_the_cut() {
    let f = build();
    let (pack, off10, _) = f.record(0, 10);
    truncate(&pack, off10 + 7);
    forget_cache(&f.repo);
    // Blocks whose records end past the cut fail; those before read.
    let past: Vec<u64> = (0..16u32)
        .filter(|&b| {
            let (_, o, l) = f.record(0, b);
            o + l > off10 + 7
        })
        .map(u64::from)
        .collect();
    assert!(past.contains(&10) && past.contains(&15), "{past:?}");
    let bad =
        |seq: usize, b: u64| past.contains(&b) && !(seq >= 1 && b == 3) && !(seq >= 2 && b == 5);
    check_reads(&f.repo, &f.v, &f.images, &bad);
    let out = verify_names(&f.repo, "block 10 ");
    assert!(
        out.contains("block 15 ") && out.contains("truncated"),
        "{out}"
    );
    let key = pack.strip_prefix(&f.repo).unwrap().to_str().unwrap();
    assert!(out.contains(key), "{out}");
    let m = export_fails(&f.repo, &f.v, 2);
    assert!(m.contains("truncated") && m.contains(key), "{m}");
    check_mount(&f, &f.images, &bad);
}

#[test]
fn deleted_pack_fails_its_blocks_only() {
    let f = build();
    let (pack, _, _) = f.record(0, 0);
    std::fs::remove_file(&pack).unwrap();
    forget_cache(&f.repo);
    let bad = |seq: usize, b: u64| b < 16 && !(seq >= 1 && b == 3) && !(seq >= 2 && b == 5);
    check_reads(&f.repo, &f.v, &f.images, &bad);
    let out = verify_names(&f.repo, "missing");
    for b in 0..16 {
        assert!(out.contains(&format!("block {b} ")), "{out}");
    }
    let m = export_fails(&f.repo, &f.v, 1);
    assert!(m.contains("missing"), "{m}");
    check_mount(&f, &f.images, &bad);
}

#[test]
fn a_pack_replaced_by_another_packs_bytes_never_serves_its_data() {
    // Two disks of the same shape, different random bytes: their packs have the same layout
    // (incompressible records of equal length at equal offsets), so the records of one parse
    // where the other's are expected. Only the seal's binding to the chunk id tells them apart.
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    let (a, b) = (vdi(6), vdi(7));
    let ia = import_random_points(d.path(), &repo, &a, 8, 1, 100);
    let ib = import_random_points(d.path(), &repo, &b, 8, 1, 200);
    let r = open_repo(&repo);
    let ma = r.disk(&a).unwrap().sets[0].points[0].clone();
    let mb = r.disk(&b).unwrap().sets[0].points[0].clone();
    let (ka, la) = r.locate_block(&ma, 2).unwrap().unwrap();
    let (kb, lb) = r.locate_block(&mb, 2).unwrap().unwrap();
    assert_ne!(ka, kb);
    assert_eq!((la.offset, la.len), (lb.offset, lb.len), "same layout");
    drop(r);
    std::fs::copy(repo.join(&kb), repo.join(&ka)).unwrap();
    forget_cache(&repo);
    check_reads(&repo, &a, &ia, &|_, _| true);
    check_reads(&repo, &b, &ib, &|_, _| false);
    let m = export_fails(&repo, &a, 0);
    assert!(m.contains(&ka), "{m}");
    export_ok(&repo, &b, 0, &ib[0]);
    let report = verify_json(&repo, None, true);
    let want: Vec<(String, u64)> = (0..8).map(|b| (ma.label(), b)).collect();
    assert_eq!(damaged_blocks(&report), want);
    // The trailer is bound to its pack's name: named as damaged too.
    let out = verify_names(&repo, &ka);
    assert!(
        out.contains("DAMAGED repository") && out.contains("trailer"),
        "{out}"
    );
}

#[test]
fn damaged_point_index_fails_its_point_and_later_ones_not_earlier_ones() {
    for (what, damage) in [("flipped", 0u8), ("truncated", 1), ("swapped", 2)] {
        let f = build();
        let idx = f.obj(&f.points[1].index.key);
        let len = std::fs::metadata(&idx).unwrap().len();
        match damage {
            0 => flip(&idx, len / 2),
            1 => truncate(&idx, len - 10),
            _ => {
                // Point 2's index has the same shape (one changed block): same length, so
                // only the seal's binding to its key can tell.
                let other = f.obj(&f.points[2].index.key);
                assert_eq!(std::fs::metadata(&other).unwrap().len(), len);
                std::fs::copy(&other, &idx).unwrap();
            }
        }
        forget_cache(&f.repo);
        export_ok(&f.repo, &f.v, 0, &f.images[0]);
        for step in [1, 2] {
            let m = export_fails(&f.repo, &f.v, step);
            assert!(
                m.contains(&f.points[1].index.key) && m.contains("damaged"),
                "{what}: {m}"
            );
        }
        let out = verify_names(&f.repo, &f.points[1].index.key);
        assert!(out.contains(&f.points[1].label()), "{what}: {out}");
        assert!(out.contains(&f.points[2].label()), "{what}: {out}");
        assert!(!out.contains(&f.points[0].label()), "{what}: {out}");
        // Through the mount: the base reads right, the damaged points fail with EIO.
        if damage == 2 && can_mount() {
            let paths = point_paths(&f.repo);
            let m = Mounted::new(&f.repo, &f.dir().join("mnt"), &[]);
            assert!(std::fs::read(m.mp.join(&paths[0])).unwrap() == f.images[0]);
            for p in &paths[1..] {
                let e = std::fs::File::open(m.mp.join(p))
                    .and_then(|f| f.read_exact_at(&mut [0u8; 512], 0))
                    .unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{p}: {e}");
            }
        }
    }
}

#[test]
fn damaged_truncated_or_deleted_manifest_is_named_and_earlier_points_still_read() {
    for (what, damage) in [("flipped", 0u8), ("truncated", 1), ("deleted", 2)] {
        let f = build();
        let key = f.points[1].key();
        let man = f.obj(&key);
        match damage {
            0 => flip(&man, 40),
            1 => truncate(&man, 30),
            _ => std::fs::remove_file(&man).unwrap(),
        }
        forget_cache(&f.repo);
        export_ok(&f.repo, &f.v, 0, &f.images[0]);
        let (_, m) = fails(&["export", s(&f.repo), &point_arg(&f.v, 2), "-"]);
        assert!(!m.contains("panicked"), "{m}");
        let m2 = m.to_lowercase();
        assert!(
            m2.contains("missing") || m2.contains("damaged") || m2.contains("no point"),
            "{what}: {m}"
        );
        // Verify names the damaged manifest (unless it is gone) and reports the point above
        // it missing, by its manifest's name.
        let out = verify_names(&f.repo, &f.points[2].key());
        assert!(out.contains("missing"), "{what}: {out}");
        if damage != 2 {
            assert!(out.contains(&key), "{what}: {out}");
        }
        // The base still reads everywhere.
        check_reads(&f.repo, &f.v, &f.images[..1], &|_, _| false);
        let ls = ok(&["ls", s(&f.repo)]);
        assert!(
            ls.contains("DAMAGED") || ls.contains("MISSING"),
            "{what}: {ls}"
        );
        if damage != 0 {
            continue;
        }
        // A new point cannot be added to a damaged set; a new base can.
        let img = f.dir().join("img");
        std::fs::write(&img, &f.images[2]).unwrap();
        let bm = write_bitmap(f.dir(), "bm", &[1], BLOCKS as u64);
        let t = time(9);
        let (_, m) = fails(&[
            "import",
            s(&f.repo),
            "--vdi",
            &f.v,
            "--raw",
            s(&img),
            "--bitmap",
            s(&bm),
            "--time",
            &t,
        ]);
        assert!(m.contains("damaged") && m.contains("new set"), "{m}");
        import(&f.repo, &f.v, &img, 9, None);
        export_ok(&f.repo, &f.v, 9, &f.images[2]);
    }
}

#[test]
fn damaged_swapped_or_truncated_chunk_index_object_is_named_and_fails_only_its_chunks() {
    for (what, damage) in [("flipped", 0u8), ("swapped", 1), ("truncated", 2)] {
        let f = build();
        let key = &f.cindex[0][0];
        let path = f.obj(key);
        match damage {
            0 => flip(&path, std::fs::metadata(&path).unwrap().len() / 2),
            1 => {
                std::fs::copy(f.obj(&f.cindex[1][0]), &path).unwrap();
            }
            _ => truncate(&path, 50),
        }
        // With this machine's cache of the index (made by the imports): reads are right (the
        // cache was authenticated when made), and verify still checks the stored object.
        let out = verify_names(&f.repo, key);
        assert!(out.contains("DAMAGED repository"), "{what}: {out}");
        check_reads(&f.repo, &f.v, &f.images, &|_, _| false);
        // A machine without the cache: the base's chunks are unknown; every other read is right.
        forget_cache(&f.repo);
        let bad = |seq: usize, b: u64| b < 16 && !(seq >= 1 && b == 3) && !(seq >= 2 && b == 5);
        check_reads(&f.repo, &f.v, &f.images, &bad);
        let out = verify_names(&f.repo, key);
        assert!(
            out.contains("block 0 ") && out.contains("missing"),
            "{what}: {out}"
        );
        let m = export_fails(&f.repo, &f.v, 0);
        assert!(m.contains("missing"), "{what}: {m}");
        if damage == 1 {
            forget_cache(&f.repo);
            check_mount(&f, &f.images, &bad);
        }
    }
}

#[test]
fn damaged_repository_header_is_named() {
    let f = build();
    let hdr = f.obj("cbtfs.repo");
    flip(&hdr, 30);
    for args in [
        vec!["ls", s(&f.repo)],
        vec!["verify", s(&f.repo)],
        vec!["export", s(&f.repo), "x", "-"],
    ] {
        let (code, m) = fails(&args);
        assert_eq!(code, 1, "{args:?}: {m}");
        assert!(m.contains("cbtfs.repo") && m.contains("damaged"), "{m}");
    }
    truncate(&hdr, 10);
    let (_, m) = fails(&["verify", s(&f.repo)]);
    assert!(m.contains("cbtfs.repo") && m.contains("damaged"), "{m}");
    if can_mount() {
        let mp = f.dir().join("mnt");
        std::fs::create_dir(&mp).unwrap();
        let o = cbtfs_cmd()
            .args(["mount", "-f", s(&f.repo), s(&mp)])
            .bounded()
            .unwrap();
        assert!(!o.status.success());
        let m = String::from_utf8_lossy(&o.stderr);
        assert!(m.contains("cbtfs.repo"), "{m}");
    }
}

fn plain_cmd() -> std::process::Command {
    let mut c = std::process::Command::new(bin());
    c.env_remove("CBTFS_KEY_FILE")
        .env_remove("CBTFS_REPO_PASSWORD")
        .env_remove("CBTFS_REPO_PASSWORD_FILE")
        .env("CBTFS_KDF_FAST", "1")
        .stdin(std::process::Stdio::null());
    c
}

fn out_of(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    )
}

#[test]
fn a_wrong_password_says_so() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let pw = d.path().join("pw");
    let wrong = d.path().join("wrong");
    std::fs::write(&pw, "right horse battery\n").unwrap();
    std::fs::write(&wrong, "wrong horse battery\n").unwrap();
    let o = plain_cmd()
        .args(["init", s(&repo), "--repo-password-file", s(&pw)])
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", out_of(&o));
    let o = plain_cmd()
        .args(["ls", s(&repo), "--repo-password-file", s(&pw)])
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", out_of(&o));
    for args in [vec!["ls", s(&repo)], vec!["verify", s(&repo)]] {
        let o = plain_cmd()
            .args(&args)
            .args(["--repo-password-file", s(&wrong)])
            .bounded()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", out_of(&o));
        let m = out_of(&o);
        assert!(
            m.contains("password does not open") && m.contains(s(&repo)),
            "{m}"
        );
        assert!(
            !m.contains("damaged"),
            "a wrong password is not damage: {m}"
        );
    }
}

#[test]
fn a_removed_key_slot_no_longer_opens_and_a_damaged_one_is_named() {
    let f = build();
    let k2 = f.dir().join("second.key");
    let before = keys_under(&f.repo, "keys");
    ok(&["key", "add", s(&f.repo), "--new-key-file", s(&k2)]);
    let after = keys_under(&f.repo, "keys");
    let added: Vec<&String> = after.iter().filter(|k| !before.contains(k)).collect();
    assert_eq!(added.len(), 1, "{after:?}");
    let slot_key = added[0].clone();
    let slot_id = slot_key.strip_prefix("keys/").unwrap().to_string();
    let open_with_k2 = || {
        plain_cmd()
            .args([
                "export",
                s(&f.repo),
                &point_arg(&f.v, 2),
                "-",
                "--key-file",
                s(&k2),
            ])
            .bounded()
            .unwrap()
    };
    let o = open_with_k2();
    assert!(o.status.success(), "{}", out_of(&o));
    assert!(o.stdout == f.images[2]);

    // A flipped bit in the original slot: named; the other slot still opens the repository.
    let first = f.obj(&before[0]);
    let saved = std::fs::read(&first).unwrap();
    flip(&first, saved.len() as u64 / 2);
    let (code, m) = fails(&["ls", s(&f.repo)]);
    assert_eq!(code, 1);
    assert!(m.contains(&before[0]) && m.contains("damaged"), "{m}");
    let o = open_with_k2();
    assert!(o.status.success(), "{}", out_of(&o));
    assert!(o.stdout == f.images[2]);
    std::fs::write(&first, &saved).unwrap();

    // Removed, the second slot's key file no longer opens the repository.
    ok(&["key", "remove", s(&f.repo), &slot_id]);
    assert!(!f.obj(&slot_key).exists());
    let o = open_with_k2();
    assert_eq!(o.status.code(), Some(1), "{}", out_of(&o));
    let m = out_of(&o);
    assert!(m.contains("does not open") && m.contains(s(&k2)), "{m}");
    assert!(o.stdout.is_empty());
    ok(&["verify", s(&f.repo)]);
}

#[test]
fn a_damaged_shared_chunk_fails_both_disks_points() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    let (a, b) = (vdi(8), vdi(9));
    let img = d.path().join("img");
    let mut data = vec![0u8; 8 * BS];
    TestRng::new(33).fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    import(&repo, &a, &img, 0, None);
    let packs = keys_under(&repo, "packs");
    import(&repo, &b, &img, 1, None);
    assert_eq!(
        keys_under(&repo, "packs"),
        packs,
        "the second disk stored nothing"
    );
    let r = open_repo(&repo);
    let ma = r.disk(&a).unwrap().sets[0].points[0].clone();
    let mb = r.disk(&b).unwrap().sets[0].points[0].clone();
    let (key, loc) = r.locate_block(&ma, 4).unwrap().unwrap();
    assert_eq!(r.locate_block(&mb, 4).unwrap().unwrap(), (key.clone(), loc));
    drop(r);
    flip(&repo.join(&key), u64::from(loc.offset) + 100);
    forget_cache(&repo);
    let images = vec![data.clone()];
    let bad = |_: usize, blk: u64| blk == 4;
    check_reads(&repo, &a, &images, &bad);
    check_reads(&repo, &b, &images, &bad);
    let out = verify_names(&repo, "block 4 ");
    assert!(
        out.contains(&ma.label()) && out.contains(&mb.label()),
        "{out}"
    );
    let mut want = vec![(ma.label(), 4), (mb.label(), 4)];
    want.sort();
    assert_eq!(damaged_blocks(&verify_json(&repo, None, true)), want);
    assert_eq!(damaged_blocks(&verify_json(&repo, Some("100"), true)), want);
    export_fails(&repo, &a, 0);
    export_fails(&repo, &b, 1);
    if can_mount() {
        let m = Mounted::new(&repo, &d.path().join("mnt"), &[]);
        let paths = point_paths(&repo);
        assert_eq!(paths.len(), 2);
        for p in &paths {
            let file = std::fs::File::open(m.mp.join(p)).unwrap();
            for blk in 0..8u64 {
                let mut buf = vec![0u8; BS];
                let r = file.read_exact_at(&mut buf, blk * BS as u64);
                if blk == 4 {
                    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO), "{p}");
                } else {
                    r.unwrap();
                    let at = blk as usize * BS;
                    assert!(buf == data[at..at + BS], "{p} block {blk}");
                }
            }
        }
    }
}

#[test]
fn random_damage_anywhere_never_yields_wrong_bytes_and_verify_sees_it() {
    let f = build();
    let all: Vec<String> = files_under(&f.repo)
        .iter()
        .map(|p| {
            p.strip_prefix(&f.repo)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        })
        .filter(|k| k != "lock")
        .collect();
    for trial in 0..30u64 {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("repo");
        run("cp", &["-a", s(&f.repo), s(&repo)]);
        let mut rng = TestRng::new(trial);
        let mut hit = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let k = &all[rng.below(all.len() as u64) as usize];
            let p = repo.join(k);
            let len = std::fs::metadata(&p).unwrap().len();
            flip(&p, rng.below(len));
            hit.push(k.clone());
        }
        forget_cache(&repo);
        let o = cbtfs(&["verify", s(&repo)]);
        let out = out_of(&o);
        assert!(!out.contains("panicked"), "trial {trial} {hit:?}: {out}");
        match Repository::open(&repo, Some(&secret())) {
            Err(e) => {
                // Only the header or the key slot can keep the repository from opening.
                assert!(
                    hit.iter()
                        .any(|k| k == "cbtfs.repo" || k.starts_with("keys/")),
                    "trial {trial} {hit:?}: {e}"
                );
                assert_eq!(o.status.code(), Some(1), "trial {trial} {hit:?}: {out}");
                continue;
            }
            Ok(r) => {
                assert_eq!(
                    o.status.code(),
                    Some(3),
                    "trial {trial} {hit:?}: verify missed damage: {out}"
                );
                let Ok(disk) = r.disk(&f.v) else { continue };
                for set in &disk.sets {
                    for p in &set.points {
                        let Ok(pr) = PointReader::open(&r, set, p.seq) else {
                            continue;
                        };
                        let want = &f.images[f.points.iter().position(|q| q.id == p.id).unwrap()];
                        for b in 0..BLOCKS {
                            let mut buf = vec![0u8; BS];
                            if let Ok(n) = pr.read_at(&mut buf, (b * BS) as u64) {
                                assert!(
                                    buf[..n] == want[b * BS..b * BS + n],
                                    "trial {trial} {hit:?}: point {} block {b} read wrong bytes",
                                    p.seq
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Seal `m` as its manifest object with the repository's key: what a buggy writer holding the
/// key could commit (an attacker without the key cannot make a manifest that opens).
fn write_sealed_manifest(repo: &Repository, root: &Path, m: &PointManifest) {
    let key = m.key();
    let mut aad = b"point:".to_vec();
    aad.extend_from_slice(key.as_bytes());
    let sealed = repo.keys().seal(&aad, &cbtfs::repo::manifest::encode(m));
    std::fs::write(root.join(&key), sealed).unwrap();
}

#[test]
fn a_manifest_naming_objects_outside_their_place_or_beyond_the_limits_is_damaged() {
    let f = build();
    let r = open_repo(&f.repo);
    let good = f.points[1].clone();
    // A copy of point 1's own index under a name outside pindex/: were the name followed, the
    // point would read and verify fine, so only the check can make these commands fail.
    std::fs::copy(f.obj(&good.index.key), f.dir().join("outside")).unwrap();
    type Edit = fn(&mut PointManifest);
    let edits: [(Edit, &str); 6] = [
        (
            |m| m.index.key = "pindex/../../outside".into(),
            "is not a point index key",
        ),
        (|m| m.set = "../../..".into(), "not a set name"),
        (
            |m| {
                m.vm_metadata = Some(cbtfs::repo::ObjRef {
                    key: "meta/../cbtfs.repo".into(),
                    len: 10,
                })
            },
            "is not a metadata key",
        ),
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
        std::fs::remove_file(f.obj(&good.key())).unwrap();
        write_sealed_manifest(&r, &f.repo, &m);
        let ls = ok(&["ls", s(&f.repo)]);
        assert!(!ls.contains("PiB"), "{ls}");
        let out = verify_names(&f.repo, says);
        assert!(out.contains(&good.key()), "{out}");
        let m = export_fails(&f.repo, &f.v, 2);
        assert!(!m.contains("panicked"), "{m}");
        export_ok(&f.repo, &f.v, 0, &f.images[0]);
    }
    std::fs::remove_file(f.obj(&good.key())).unwrap();
    write_sealed_manifest(&r, &f.repo, &good);
    ok(&["verify", s(&f.repo)]);
    export_ok(&f.repo, &f.v, 2, &f.images[2]);
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
        .env("CBTFS_KEY_FILE", key_file())
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_repository_and_the_objects_directories_are_synced_into_their_parents() {
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
    // A point's commit: the manifest's directory is synced (the commit is durable), and the
    // directories its objects went into, existing or new.
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
    std::fs::write(&img, vec![9u8; 4 * BS]).unwrap();
    let t = time(1);
    strace_cbtfs(
        &log,
        &[
            "import",
            s(&repo),
            "--vdi",
            &v,
            "--raw",
            s(&img),
            "--bitmap",
            s(&bm),
            "--time",
            &t,
        ],
    );
    let synced = fsynced_paths(&std::fs::read_to_string(&log).unwrap());
    for dir in ["points", "pindex", "cindex"] {
        assert!(
            synced.iter().any(|p| Path::new(p) == repo.join(dir)),
            "{dir} was not synced: {synced:?}"
        );
    }
}

#[test]
fn a_damaged_pin_is_an_error_naming_it_and_no_password_is_sent() {
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
    let backup = || {
        cbtfs(&[
            "backup",
            s(&repo),
            "--host",
            &sim.url,
            "--password-file",
            s(&pw),
            "--vdi",
            &vdis[0],
        ])
    };
    // The first backup pins the host's certificate (a sealed object under hosts/).
    let o = backup();
    assert!(o.status.success(), "{}", out_of(&o));
    let pins = keys_under(&repo, "hosts");
    assert_eq!(pins.len(), 1, "{pins:?}");
    let pin = repo.join(&pins[0]);
    let good = std::fs::read(&pin).unwrap();
    sim.with(|st| st.calls.clear());
    for at in [0, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        std::fs::write(&pin, &bad).unwrap();
        let o = backup();
        assert!(!o.status.success());
        let m = out_of(&o);
        assert!(m.contains(&pins[0]) && m.contains("damaged"), "{m}");
        assert!(!m.contains("panicked"), "{m}");
        assert!(std::fs::read(&pin).unwrap() == bad, "the pin was changed");
        let calls = sim.with(|st| st.calls.clone());
        assert!(calls.is_empty(), "the host was called: {calls:?}");
    }
    // Deleted, it is pinned again on first use.
    std::fs::remove_file(&pin).unwrap();
    let o = backup();
    assert!(o.status.success(), "{}", out_of(&o));
    assert!(pin.exists());
}
