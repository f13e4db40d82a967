//! `cbtfs copy SRC DST`: the offsite copy. Every copied point must read exactly as in the
//! source (byte for byte, through `export`), runs must be incremental and resumable, the
//! destination must store only the chunks it lacks, and a prune in the source must not break
//! the destination's chains.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::common::*;
use serde_json::Value;

/// A source and a destination repository with different keys (the source's is the tests'
/// usual key, in CBTFS_KEY_FILE; the destination's its own).
struct Pair {
    dir: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    dst_key: PathBuf,
}

impl Pair {
    fn new() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        let dst_key = dir.path().join("dst.key");
        ok(&["init", s(&src)]);
        ok(&["init", s(&dst), "--key-file", s(&dst_key)]);
        assert!(dst_key.exists());
        Pair {
            dir,
            src,
            dst,
            dst_key,
        }
    }

    /// `cbtfs copy SRC DST --json ARGS`: its exit success and report.
    fn copy_status(&self, args: &[&str]) -> (bool, Value, String) {
        let o = cbtfs_cmd()
            .args(["copy", s(&self.src), s(&self.dst), "--json"])
            .args(["--to-key-file", s(&self.dst_key)])
            .args(args)
            .bounded()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "copy printed no JSON ({e}): {out}\n{}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
        (
            o.status.success(),
            v,
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    fn copy(&self, args: &[&str]) -> Value {
        let (ok, v, err) = self.copy_status(args);
        assert!(ok, "copy failed: {v}\n{err}");
        v
    }

    fn dst_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut a = args.to_vec();
        a.extend(["--key-file", s(&self.dst_key)]);
        a
    }

    fn dst_repo(&self) -> cbtfs::repo::Repository {
        let secret = cbtfs::repo::keys::Secret::read_key_file(&self.dst_key).unwrap();
        cbtfs::repo::Repository::open(&self.dst, Some(&secret)).unwrap()
    }
}

/// Every point of a repository: `VDI@TIME` label -> canonical path.
fn points(repo: &Path, extra: &[&str]) -> BTreeMap<String, String> {
    let mut args = vec!["ls", s(repo), "--json"];
    args.extend(extra);
    let j: Value = serde_json::from_str(&ok(&args)).unwrap();
    let mut out = BTreeMap::new();
    for vm in j["vms"].as_array().unwrap() {
        for d in vm["disks"].as_array().unwrap() {
            for set in d["sets"].as_array().unwrap() {
                assert!(set["problems"].as_array().unwrap().is_empty(), "{set}");
                for p in set["points"].as_array().unwrap() {
                    out.insert(
                        p["point"].as_str().unwrap().to_string(),
                        p["path"].as_str().unwrap().to_string(),
                    );
                }
            }
        }
    }
    out
}

fn export(repo: &Path, point: &str, extra: &[&str]) -> Vec<u8> {
    let mut c = cbtfs_cmd();
    c.args(["export", s(repo), point, "-"]).args(extra);
    let o = c.bounded().unwrap();
    assert!(
        o.status.success(),
        "export {point} from {}: {}",
        repo.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// A disk whose every version is kept, imported point by point into a repository.
struct Disk {
    vdi: String,
    vm: &'static str,
    data: Vec<u8>,
    /// label -> the disk's bytes at that point.
    truth: BTreeMap<String, Vec<u8>>,
    rng: TestRng,
}

impl Disk {
    fn new(n: u32, vm: &'static str, size: usize, seed: u64) -> Disk {
        let mut rng = TestRng::new(seed);
        let mut data = vec![0u8; size];
        // Random data with a few zero blocks (a base stores none of them).
        rng.fill(&mut data);
        for b in (0..size.div_ceil(BS)).step_by(7) {
            let end = ((b + 1) * BS).min(size);
            data[b * BS..end].fill(0);
        }
        Disk {
            vdi: vdi(n),
            vm,
            data,
            truth: BTreeMap::new(),
            rng,
        }
    }

    fn blocks(&self) -> u64 {
        self.data.len().div_ceil(BS) as u64
    }

    fn label(&self, time: &str) -> String {
        let t = cbtfs::timefmt::parse(time).unwrap();
        format!("{}@{}", self.vdi, cbtfs::timefmt::basic(t))
    }

    fn import(&mut self, repo: &Path, dir: &Path, time: &str, bitmap: Option<&[u64]>) {
        let img = dir.join(format!("{}.img", self.vdi));
        std::fs::write(&img, &self.data).unwrap();
        let vm_uuid = format!("{:0>8}-0000-4000-8000-00000000000f", self.vm.len());
        let mut args = vec![
            "import",
            s(repo),
            "--vdi",
            &self.vdi,
            "--vm-name",
            self.vm,
            "--vm-uuid",
            &vm_uuid,
            "--raw",
            s(&img),
            "--time",
            time,
        ];
        let bm;
        if let Some(blocks) = bitmap {
            bm = write_bitmap(dir, "bm", blocks, self.blocks());
            args.extend(["--bitmap", s(&bm)]);
        }
        ok(&args);
        self.truth.insert(self.label(time), self.data.clone());
    }

    /// Change some blocks (random data, zeros: a zero block recorded in an increment hides
    /// older data, and bytes copied from elsewhere on the disk: dedup) and import the result as
    /// an increment at `time`. Returns the blocks changed.
    fn step(&mut self, repo: &Path, dir: &Path, time: &str) -> Vec<u64> {
        let n = self.blocks();
        let mut changed: Vec<u64> = (0..4).map(|_| self.rng.below(n)).collect();
        changed.sort_unstable();
        changed.dedup();
        for (i, &b) in changed.iter().enumerate() {
            let start = b as usize * BS;
            let end = (start + BS).min(self.data.len());
            match i % 3 {
                0 => self.rng.fill(&mut self.data[start..end]),
                1 => self.data[start..end].fill(0),
                _ => {
                    let from = (b as usize + 1) % (n as usize - 1) * BS;
                    let copy = self.data[from..from + (end - start)].to_vec();
                    self.data[start..end].copy_from_slice(&copy);
                }
            }
        }
        self.import(repo, dir, time, Some(&changed));
        changed
    }
}

/// Every point of the destination reads exactly the disk as it was at that time; the source's
/// points too (the ones it still has).
fn check_exact(pair: &Pair, disks: &[&Disk]) {
    let key = ["--key-file", s(&pair.dst_key)];
    let dst = points(&pair.dst, &key);
    let src = points(&pair.src, &[]);
    let truth: BTreeMap<&String, &Vec<u8>> = disks.iter().flat_map(|d| d.truth.iter()).collect();
    for (label, path) in &dst {
        let want = truth
            .get(label)
            .unwrap_or_else(|| panic!("the destination has {label}, which no disk had"));
        assert!(
            export(&pair.dst, path, &key) == **want,
            "destination point {path} ({label}) does not read as the disk did"
        );
        if let Some(spath) = src.get(label) {
            assert!(
                export(&pair.src, spath, &[]) == **want,
                "source point {spath} does not read as the disk did"
            );
        }
    }
    let v = ok(&pair.dst_args(&["verify", s(&pair.dst)]));
    assert!(v.contains("no damage"), "{v}");
}

fn copied_paths(report: &Value) -> Vec<String> {
    report["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap().to_string())
        .collect()
}

/// Two disks of one VM (one of them of an odd size), several points each.
fn two_disks(pair: &Pair, points: u64) -> (Disk, Disk) {
    let dir = pair.dir.path();
    let mut a = Disk::new(1, "web", 48 * BS, 1);
    let mut b = Disk::new(2, "web", 32 * BS + 4096, 2);
    a.import(&pair.src, dir, &time(0), None);
    b.import(&pair.src, dir, &time(0), None);
    for step in 1..points {
        a.step(&pair.src, dir, &time(step));
        b.step(&pair.src, dir, &time(step));
    }
    (a, b)
}

#[test]
fn copies_every_point_exactly_then_only_the_new_ones() {
    let pair = Pair::new();
    let (mut a, b) = two_disks(&pair, 4);
    let r = pair.copy(&[]);
    assert_eq!(r["points_copied"], 8, "{r}");
    assert_eq!(r["already_there"], 0, "{r}");
    // The same names in both.
    assert_eq!(
        points(&pair.dst, &["--key-file", s(&pair.dst_key)]),
        points(&pair.src, &[])
    );
    // A base reads every block it stores; an increment only its bitmap's blocks.
    let src_points = points(&pair.src, &[]);
    assert_eq!(
        copied_paths(&r),
        {
            // Disk by disk, each in time order.
            let mut v: Vec<String> = src_points.values().cloned().collect();
            v.sort_by_key(|p| {
                let disk = if p.contains("disk-00000001") { 0 } else { 1 };
                (disk, p.clone())
            });
            v
        },
        "{r}"
    );
    check_exact(&pair, &[&a, &b]);

    // The manifests say where each point came from and keep the source's fields.
    let src = open_repo(&pair.src);
    let dst = pair.dst_repo();
    let src_all: Vec<_> = src
        .catalog()
        .unwrap()
        .into_iter()
        .flat_map(|d| d.sets)
        .flat_map(|s| s.points)
        .collect();
    let dst_all: Vec<_> = dst
        .catalog()
        .unwrap()
        .into_iter()
        .flat_map(|d| d.sets)
        .flat_map(|s| s.points)
        .collect();
    assert_eq!(src_all.len(), dst_all.len());
    for (sp, dp) in src_all.iter().zip(&dst_all) {
        let c = dp
            .copied_from
            .as_ref()
            .expect("a copied point names its origin");
        assert_eq!(
            (c.repo.as_str(), c.point.as_str(), c.set.as_str(), c.n),
            (
                src.header.id.as_str(),
                sp.id.as_str(),
                sp.set.as_str(),
                sp.n
            )
        );
        assert_ne!(dp.id, sp.id);
        assert_eq!(
            (
                &dp.vdi,
                &dp.disk_name,
                &dp.vm_uuid,
                &dp.vm_name,
                dp.time,
                dp.virtual_size,
                &dp.source,
                &dp.set,
                dp.seq,
                dp.changed_blocks,
                dp.data_blocks
            ),
            (
                &sp.vdi,
                &sp.disk_name,
                &sp.vm_uuid,
                &sp.vm_name,
                sp.time,
                sp.virtual_size,
                &sp.source,
                &sp.set,
                sp.seq,
                sp.changed_blocks,
                sp.data_blocks
            ),
            "{}",
            sp.label()
        );
    }

    // Again: nothing to copy, nothing read.
    let r = pair.copy(&[]);
    assert_eq!(r["points_copied"], 0, "{r}");
    assert_eq!(r["blocks_read"], 0, "{r}");
    assert_eq!(r["already_there"], 8, "{r}");

    // Two new points of one disk: only they are copied, reading only their changed blocks.
    let dir = pair.dir.path();
    let c1 = a.step(&pair.src, dir, &time(10));
    let c2 = a.step(&pair.src, dir, &time(11));
    let dry = pair.copy(&["--dry-run"]);
    assert_eq!(dry["points_copied"], 2, "{dry}");
    let r = pair.copy(&[]);
    assert_eq!(r["points_copied"], 2, "{r}");
    assert_eq!(copied_paths(&r), copied_paths(&dry));
    let blocks: Vec<u64> = r["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["blocks_read"].as_u64().unwrap())
        .collect();
    assert_eq!(blocks, vec![c1.len() as u64, c2.len() as u64], "{r}");
    assert_eq!(r["already_there"], 8, "{r}");
    check_exact(&pair, &[&a, &b]);
}

#[test]
fn the_destination_stores_only_the_chunks_it_lacks() {
    let pair = Pair::new();
    let dir = pair.dir.path();
    let mut a = Disk::new(1, "web", 40 * BS, 7);
    a.import(&pair.src, dir, &time(0), None);
    // The destination already holds the same bytes, as another disk backed up there itself.
    let img = dir.join("same.img");
    std::fs::write(&img, &a.data).unwrap();
    let other = vdi(9);
    let mut same = Disk::new(9, "web", 0, 0);
    same.data = a.data.clone();
    same.truth.insert(same.label(&time(0)), a.data.clone());
    ok(&pair.dst_args(&[
        "import",
        s(&pair.dst),
        "--vdi",
        &other,
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]));
    let r = pair.copy(&[]);
    assert_eq!(r["points_copied"], 1, "{r}");
    let stored = a
        .data
        .chunks(BS)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count();
    assert_eq!(r["blocks_read"], stored as u64, "{r}");
    assert_eq!(r["new_chunks"], 0, "{r}");
    assert_eq!(r["new_stored_bytes"], 0, "{r}");
    // An increment of fresh random data stores exactly its new chunks.
    let mut changed = a.step(&pair.src, dir, &time(1));
    changed.sort_unstable();
    let fresh = changed
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
        .count();
    let r = pair.copy(&[]);
    assert_eq!(r["points_copied"], 1, "{r}");
    assert_eq!(r["new_chunks"], fresh as u64, "{r}");
    check_exact(&pair, &[&a, &same]);
}

/// Day `d` (from 2026-01-01) at 02:00 UTC.
fn day(d: u32) -> String {
    format!("2026-{:02}-{:02}T02:00:00Z", 1 + d / 28, 1 + d % 28)
}

#[test]
fn a_prune_in_the_source_keeps_the_destination_exact() {
    let pair = Pair::new();
    let dir = pair.dir.path();
    let mut a = Disk::new(1, "web", 40 * BS, 11);
    let mut b = Disk::new(2, "db", 24 * BS, 12);
    // Months 1, 1, 2 copied; then 2, 3, 3 made.
    a.import(&pair.src, dir, &day(0), None);
    b.import(&pair.src, dir, &day(0), None);
    for d in [1, 28] {
        a.step(&pair.src, dir, &day(d));
        b.step(&pair.src, dir, &day(d));
    }
    assert_eq!(pair.copy(&[])["points_copied"], 6);
    for d in [29, 56, 57] {
        a.step(&pair.src, dir, &day(d));
        b.step(&pair.src, dir, &day(d));
    }
    // Disk a keeps the newest of each month (days 1, 29, 57): the base and the point after
    // each copied point are dropped and taken over. Disk b keeps only its newest point: it
    // becomes a base none of whose copied points is left in the source.
    ok(&[
        "prune",
        s(&pair.src),
        "--keep-monthly",
        "3",
        "--vdi",
        &a.vdi,
    ]);
    ok(&["prune", s(&pair.src), "--keep-last", "1", "--vdi", &b.vdi]);
    let src_now = points(&pair.src, &[]);
    assert_eq!(src_now.len(), 4, "{src_now:?}");
    let r = pair.copy(&[]);
    // Disk a: days 29 and 57 are new (day 1 was copied); disk b: day 57.
    let mut copied: Vec<String> = r["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap().to_string())
        .collect();
    copied.sort();
    let mut want = vec![a.label(&day(29)), a.label(&day(57)), b.label(&day(57))];
    want.sort();
    assert_eq!(copied, want, "{r}");
    // The destination keeps what it had: 3 + 2 points of a, 3 + 1 of b.
    let dst_now = points(&pair.dst, &["--key-file", s(&pair.dst_key)]);
    assert_eq!(dst_now.len(), 9, "{dst_now:?}");
    check_exact(&pair, &[&a, &b]);
    // And a new point after the prune follows on.
    a.step(&pair.src, dir, &day(58));
    b.step(&pair.src, dir, &day(58));
    assert_eq!(pair.copy(&[])["points_copied"], 2);
    check_exact(&pair, &[&a, &b]);
}

#[test]
fn a_copy_killed_before_a_commit_is_finished_by_the_next_run() {
    let pair = Pair::new();
    let (a, b) = two_disks(&pair, 3);
    // Killed while the third point's packs, chunk index and point index are stored but not
    // its manifest.
    let mut child = cbtfs_cmd()
        .args(["copy", s(&pair.src), s(&pair.dst)])
        .args(["--to-key-file", s(&pair.dst_key)])
        .env("CBTFS_TEST_HANG", "commit-before-manifest:3")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("copy ended without reaching the hook: {seen}");
        }
        seen.push_str(&line);
        if line.starts_with("cbtfs-test-hang: commit-before-manifest") {
            break;
        }
    }
    child.kill().unwrap();
    child.bounded().unwrap();
    let key = ["--key-file", s(&pair.dst_key)];
    assert_eq!(points(&pair.dst, &key).len(), 2);
    let objects = |sub: &str| std::fs::read_dir(pair.dst.join(sub)).unwrap().count();
    // The killed point's index is there, unreferenced.
    assert_eq!(objects("pindex"), 3);
    check_exact(&pair, &[&a, &b]);

    let r = pair.copy(&[]);
    assert_eq!(r["points_copied"], 4, "{r}");
    assert_eq!(r["already_there"], 2, "{r}");
    check_exact(&pair, &[&a, &b]);
    // gc deletes what the killed run left; then nothing is unreferenced, not even one chunk.
    ok(&pair.dst_args(&["gc", s(&pair.dst)]));
    assert_eq!(objects("pindex"), 6);
    let g: Value = serde_json::from_str(&ok(&pair.dst_args(&[
        "gc",
        s(&pair.dst),
        "--dry-run",
        "--repack-below",
        "100",
        "--json",
    ])))
    .unwrap();
    for k in ["packs_deleted", "packs_repacked", "objects_deleted"] {
        assert_eq!(g[k], 0, "{k}: {g}");
    }
    check_exact(&pair, &[&a, &b]);
}

/// Every file under `dir` with its length.
fn listing(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            } else {
                out.insert(e.path(), m.len());
            }
        }
    }
    out
}

#[test]
fn a_wrong_or_missing_destination_secret_is_refused_and_nothing_is_written() {
    let pair = Pair::new();
    let dir = pair.dir.path();
    let mut a = Disk::new(1, "web", 8 * BS, 3);
    a.import(&pair.src, dir, &time(0), None);
    let before = listing(&pair.dst);
    let wrong = dir.join("wrong.key");
    cbtfs::repo::keys::Secret::create_key_file(&wrong).unwrap();
    let o = cbtfs_cmd()
        .args([
            "copy",
            s(&pair.src),
            s(&pair.dst),
            "--to-key-file",
            s(&wrong),
        ])
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(s(&pair.dst)) && err.contains(s(&wrong)),
        "{err}"
    );
    let o = cbtfs_cmd()
        .args(["copy", s(&pair.src), s(&pair.dst), "--json"])
        .args(["--to-key-file", s(&wrong)])
        .bounded()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["code"], "wrong_secret", "{v}");
    // Without a destination secret: the source's is not tried on it.
    let o = cbtfs_cmd()
        .args(["copy", s(&pair.src), s(&pair.dst)])
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--to-key-file") && err.contains("Nothing was copied"),
        "{err}"
    );
    // A destination password that is not its password.
    let pw = dir.join("pw");
    std::fs::write(&pw, "not-the-password\n").unwrap();
    let o = cbtfs_cmd()
        .args(["copy", s(&pair.src), s(&pair.dst), "--json"])
        .env("CBTFS_TO_REPO_PASSWORD_FILE", &pw)
        .bounded()
        .unwrap();
    assert!(!o.status.success());
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(s(&pair.dst)) && msg.contains("no password key slot"),
        "{v}"
    );
    assert_eq!(listing(&pair.dst), before);
}

#[test]
fn a_locked_destination_is_refused_and_nothing_is_written() {
    let pair = Pair::new();
    let dir = pair.dir.path();
    let mut a = Disk::new(1, "web", 8 * BS, 4);
    a.import(&pair.src, dir, &time(0), None);
    let dst = pair.dst_repo();
    let lock = dst.lock_exclusive("cbtfs backup (pid 4242)").unwrap();
    let before = listing(&pair.dst);
    let (ok, v, _) = pair.copy_status(&[]);
    assert!(!ok);
    assert_eq!(v["error"]["code"], "locked", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("cbtfs backup (pid 4242)") && msg.contains(s(&pair.dst)),
        "{msg}"
    );
    assert_eq!(listing(&pair.dst), before);
    drop(lock);
    assert_eq!(pair.copy(&[])["points_copied"], 1);
    check_exact(&pair, &[&a]);
}

#[test]
fn vm_and_since_select_the_points() {
    let pair = Pair::new();
    let dir = pair.dir.path();
    let mut web = Disk::new(1, "web", 16 * BS, 5);
    let mut db = Disk::new(2, "db", 16 * BS, 6);
    web.import(&pair.src, dir, &time(0), None);
    db.import(&pair.src, dir, &time(0), None);
    for step in 1..4 {
        web.step(&pair.src, dir, &time(step));
        db.step(&pair.src, dir, &time(step));
    }
    let (ok_, v, _) = pair.copy_status(&["--vm", "nosuchvm"]);
    assert!(!ok_);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("nosuchvm") && msg.contains("db, web"), "{msg}");
    // Only web's points from step 2 on: its copy starts a set there, a full view of step 2.
    let r = pair.copy(&["--vm", "web", "--since", &time(2)]);
    let mut want = vec![web.label(&time(2)), web.label(&time(3))];
    want.sort();
    let mut got: Vec<String> = r["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    assert_eq!(got, want, "{r}");
    assert_eq!(r["copied"][0]["new_set"], true);
    check_exact(&pair, &[&web, &db]);
    // Everything else: db's points all go; web's older ones cannot go before its set's copy.
    let (ok_, r, err) = pair.copy_status(&[]);
    assert!(!ok_, "{r}");
    assert_eq!(r["points_copied"], 4, "{r}");
    let skipped: Vec<&str> = r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        skipped,
        vec![web.label(&time(0)), web.label(&time(1))],
        "{r}\n{err}"
    );
    check_exact(&pair, &[&web, &db]);
    // Points left out by --since inside a set the destination has: the next copied point holds
    // everything they changed.
    let mut changed = Vec::new();
    for step in 4..7 {
        changed.extend(web.step(&pair.src, dir, &time(step)));
    }
    changed.sort_unstable();
    changed.dedup();
    let r = pair.copy(&["--since", &time(6), "--vm", "web"]);
    assert_eq!(r["points_copied"], 1, "{r}");
    assert_eq!(r["copied"][0]["label"], web.label(&time(6)), "{r}");
    assert_eq!(r["blocks_read"], changed.len() as u64, "{r}");
    check_exact(&pair, &[&web, &db]);
}
