//! The mount oracle: a mounted repository under random imports (incremental with a bitmap, and
//! new sets), prunes with random keep rules, and files held open and read between them, all
//! driven by a seeded PRNG. After every round each point file in the mount, every `latest.raw`
//! and `by-uuid` path is compared byte for byte with `cbtfs export` of the same point and with
//! the test's own model of what the point holds; held-open files of removed points must read
//! their old bytes or fail with EIO, never other bytes; an inode number never changes its point.
//!
//! Freshness without sleeping: the mount rescans the repository when a directory is listed and
//! its view is older than 200 ms (see `fs`), so after each change the test lists the tree until
//! it shows exactly what the model says (`wait_for`), then compares.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use cbtfs::prune::Policy;

/// Rounds of random operations (each: `OPS` operations, then a full comparison).
const ROUNDS: usize = 50;
const OPS: usize = 3;
/// The PRNG's seed; `CBTFS_ORACLE_SEED=N` explores others (a failure names its seed).
const SEED: u64 = 0x0016_0c1e;
/// Files held open at most.
const MAX_HELD: usize = 6;

struct Disk {
    vdi: String,
    name: String,
    /// The disk's bytes now (what the next import sees).
    image: Vec<u8>,
    /// Sets in order: the set's name (its first base's time, kept when a prune drops the
    /// base) and its points' times in order.
    sets: Vec<(String, Vec<i64>)>,
}

/// A file of the mount held open, with the bytes its point holds.
struct Held {
    file: File,
    what: String,
    vdi: String,
    time: i64,
    bytes: Arc<Vec<u8>>,
}

struct Oracle {
    rng: TestRng,
    dir: tempfile::TempDir,
    repo: std::path::PathBuf,
    disks: Vec<Disk>,
    /// Every point ever made: (vdi, time) -> bytes.
    points: HashMap<(String, i64), Arc<Vec<u8>>>,
    hours: u64,
    held: Vec<Held>,
    /// Every inode number seen for a point file, and the point it was.
    inodes: HashMap<u64, (String, i64)>,
    compared: usize,
    held_reads: usize,
    /// Of those, reads of points removed since they were opened.
    held_removed_reads: usize,
    mismatches: Vec<String>,
}

fn random_size(rng: &mut TestRng) -> usize {
    let blocks = 2 + rng.below(20) as usize;
    blocks * BS
        - if rng.below(3) == 0 {
            512 * (1 + rng.below(127) as usize)
        } else {
            0
        }
}

fn random_block(rng: &mut TestRng, buf: &mut [u8]) {
    match rng.below(6) {
        0 => buf.fill(0),
        1 => {
            let a = rng.below(buf.len() as u64) as usize;
            let b = a + rng.below((buf.len() - a) as u64 + 1) as usize;
            rng.fill(&mut buf[a..b]);
        }
        _ => rng.fill(buf),
    }
}

impl Oracle {
    fn is_live(&self, vdi: &str, time: i64) -> bool {
        self.disks
            .iter()
            .any(|d| d.vdi == vdi && d.sets.iter().any(|(_, s)| s.contains(&time)))
    }

    fn mismatch(&mut self, what: String) {
        eprintln!("MISMATCH: {what}");
        self.mismatches.push(what);
    }

    /// Import the disk's current image: a new set (`base`) or an increment of `changed` blocks.
    fn import(&mut self, k: usize, base: bool, changed: &[u64]) {
        self.hours += 1 + self.rng.below(30);
        let t = time(self.hours);
        let unix = cbtfs::timefmt::parse(&t).unwrap();
        let img = self.dir.path().join("img");
        let d = &self.disks[k];
        std::fs::write(&img, &d.image).unwrap();
        let mut args = vec![
            "import".to_string(),
            s(&self.repo).into(),
            "--vdi".into(),
            d.vdi.clone(),
            "--name".into(),
            d.name.clone(),
            "--raw".into(),
            s(&img).into(),
            "--time".into(),
            t,
        ];
        if !base {
            let nblocks = d.image.len().div_ceil(BS) as u64;
            let bm = write_bitmap(self.dir.path(), "bm", changed, nblocks);
            args.extend(["--bitmap".into(), s(&bm).into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&args);
        let d = &mut self.disks[k];
        if base {
            d.sets.push((cbtfs::timefmt::basic(unix), vec![unix]));
        } else {
            d.sets.last_mut().expect("a set to extend").1.push(unix);
        }
        self.points
            .insert((d.vdi.clone(), unix), Arc::new(d.image.clone()));
    }

    fn incremental(&mut self, k: usize) {
        if self.disks[k].sets.is_empty() {
            return self.new_set(k);
        }
        let nblocks = self.disks[k].image.len().div_ceil(BS) as u64;
        let mut changed = Vec::new();
        for _ in 0..1 + self.rng.below(5) {
            let b = self.rng.below(nblocks);
            let len = self.disks[k].image.len();
            let end = ((b as usize + 1) * BS).min(len);
            random_block(
                &mut self.rng,
                &mut self.disks[k].image[b as usize * BS..end],
            );
            changed.push(b);
        }
        if self.rng.below(3) == 0 {
            // CBT may over-report: a marked block can be unchanged.
            changed.push(self.rng.below(nblocks));
        }
        changed.sort();
        changed.dedup();
        self.import(k, false, &changed);
    }

    fn new_set(&mut self, k: usize) {
        if self.rng.below(2) == 0 {
            let size = random_size(&mut self.rng);
            self.disks[k].image.resize(size, 0);
        }
        let mut image = std::mem::take(&mut self.disks[k].image);
        for c in image.chunks_mut(BS) {
            if self.rng.below(3) == 0 {
                random_block(&mut self.rng, c);
            }
        }
        self.disks[k].image = image;
        self.import(k, true, &[]);
    }

    fn prune(&mut self) {
        let mut policy = Policy {
            last: self.rng.below(4) as usize,
            daily: self.rng.below(3) as usize,
            weekly: self.rng.below(3) as usize,
            monthly: self.rng.below(2) as usize,
            hourly: self.rng.below(3) as usize,
            yearly: self.rng.below(2) as usize,
            within: (self.rng.below(3) == 0).then(|| self.rng.below(3) * 86_400),
        };
        if policy.is_empty() {
            policy.last = 1;
        }
        let only = (self.rng.below(3) == 0).then(|| self.rng.below(self.disks.len() as u64));
        let mut args = vec![
            "prune".to_string(),
            s(&self.repo).into(),
            "--keep-last".into(),
            policy.last.to_string(),
            "--keep-daily".into(),
            policy.daily.to_string(),
            "--keep-weekly".into(),
            policy.weekly.to_string(),
            "--keep-monthly".into(),
            policy.monthly.to_string(),
            "--keep-hourly".into(),
            policy.hourly.to_string(),
            "--keep-yearly".into(),
            policy.yearly.to_string(),
        ];
        if let Some(w) = policy.within {
            // Seconds are a duration the flag reads.
            args.extend(["--keep-within".into(), format!("{w}s")]);
        }
        if let Some(k) = only {
            args.extend(["--vdi".into(), self.disks[k as usize].vdi.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&args);
        for (k, d) in self.disks.iter_mut().enumerate() {
            if only.is_some_and(|o| o as usize != k) {
                continue;
            }
            let times: Vec<i64> = d.sets.iter().flat_map(|(_, s)| s).copied().collect();
            let keep = policy.keep(&times);
            let kept: BTreeSet<i64> = times
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(t, _)| *t)
                .collect();
            for (_, set) in &mut d.sets {
                set.retain(|t| kept.contains(t));
            }
            d.sets.retain(|(_, s)| !s.is_empty());
        }
    }

    /// Open a random live point through the mount and hold it.
    fn hold(&mut self, mp: &Path) {
        let live: Vec<(usize, i64)> = self
            .disks
            .iter()
            .enumerate()
            .flat_map(|(k, d)| d.sets.iter().flat_map(|(_, s)| s).map(move |t| (k, *t)))
            .collect();
        if live.is_empty() || self.held.len() >= MAX_HELD {
            return;
        }
        let (k, t) = live[self.rng.below(live.len() as u64) as usize];
        let rel = self.point_path(k, t);
        let vdi = self.disks[k].vdi.clone();
        let file = match File::open(mp.join(&rel)) {
            Ok(f) => f,
            Err(e) => return self.mismatch(format!("opening {rel}: {e}")),
        };
        let bytes = self.points[&(vdi.clone(), t)].clone();
        self.held.push(Held {
            file,
            what: rel,
            vdi,
            time: t,
            bytes,
        });
    }

    /// Read a random range of every held file: its point's bytes, or EIO once removed.
    fn read_held(&mut self) {
        let mut problems = Vec::new();
        for h in &self.held {
            let len = h.bytes.len() as u64;
            let off = self.rng.below(len);
            let n = 1 + self.rng.below((len - off).min(3 << 20)) as usize;
            let mut buf = vec![0u8; n];
            let live = self
                .disks
                .iter()
                .any(|d| d.vdi == h.vdi && d.sets.iter().any(|(_, s)| s.contains(&h.time)));
            match h.file.read_exact_at(&mut buf, off) {
                Ok(()) => {
                    if buf[..] != h.bytes[off as usize..off as usize + n] {
                        problems.push(format!(
                            "held-open {} (live: {live}) read other bytes at {off}+{n}",
                            h.what
                        ));
                    }
                }
                Err(e) if !live && e.raw_os_error() == Some(libc::EIO) => {}
                Err(e) => problems.push(format!("held-open {} (live: {live}): {e}", h.what)),
            }
            self.held_reads += 1;
            if !live {
                self.held_removed_reads += 1;
            }
        }
        for p in problems {
            self.mismatch(p);
        }
    }

    fn point_path(&self, k: usize, t: i64) -> String {
        let d = &self.disks[k];
        let (set, _) = d.sets.iter().find(|(_, s)| s.contains(&t)).unwrap();
        format!("no-vm/{}/{set}/{}.raw", d.name, cbtfs::timefmt::basic(t))
    }

    /// Every path the mount must list (directories end in `/`).
    fn expected_tree(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        out.insert("by-uuid/".to_string());
        for d in &self.disks {
            if d.sets.is_empty() {
                continue;
            }
            out.insert("no-vm/".into());
            out.insert(format!("by-uuid/{}", d.vdi));
            out.insert(format!("no-vm/{}/", d.name));
            out.insert(format!("no-vm/{}/latest.raw", d.name));
            for (sid, set) in &d.sets {
                out.insert(format!("no-vm/{}/{sid}/", d.name));
                out.insert(format!("no-vm/{}/{sid}/latest.raw", d.name));
                for t in set {
                    let p = cbtfs::timefmt::basic(*t);
                    out.insert(format!("no-vm/{}/{sid}/{p}.raw", d.name));
                    out.insert(format!("no-vm/{}/{sid}/{p}.parts/", d.name));
                }
            }
        }
        out
    }

    /// Round's end: the mount lists what the model says, then every path reads right.
    fn compare(&mut self, mp: &Path, round: usize) {
        let want = self.expected_tree();
        let mut seen = BTreeSet::new();
        wait_for(
            &format!("round {round}: the mount to list the repository's points"),
            Duration::from_secs(10),
            || {
                seen = listing(mp);
                seen == want
            },
        );
        // `cbtfs ls` names the same points.
        let mut listed = point_paths(&self.repo);
        listed.sort();
        let mut modeled: Vec<String> = want
            .iter()
            .filter(|p| p.ends_with(".raw") && !p.ends_with("latest.raw"))
            .cloned()
            .collect();
        modeled.sort();
        assert_eq!(listed, modeled, "round {round}: cbtfs ls and the model");
        for k in 0..self.disks.len() {
            let d = &self.disks[k];
            let vdi = d.vdi.clone();
            let name = d.name.clone();
            let sets = d.sets.clone();
            for (sid, set) in &sets {
                for &t in set {
                    let rel = self.point_path(k, t);
                    let model = self.points[&(vdi.clone(), t)].clone();
                    let point = rel.trim_end_matches(".raw");
                    let export = cbtfs(&["export", s(&self.repo), point, "-"]);
                    if !export.status.success() {
                        self.mismatch(format!(
                            "round {round}: export {point}: {}",
                            String::from_utf8_lossy(&export.stderr)
                        ));
                    } else if export.stdout != *model {
                        self.mismatch(format!(
                            "round {round}: export of {point} differs from the model"
                        ));
                    }
                    self.check_file(mp, &rel, &vdi, t, &model, round);
                }
                let newest = *set.last().unwrap();
                let link = format!("no-vm/{name}/{sid}/latest.raw");
                let model = self.points[&(vdi.clone(), newest)].clone();
                self.check_link(mp, &link, &format!("{}.raw", cbtfs::timefmt::basic(newest)));
                self.check_file(mp, &link, &vdi, newest, &model, round);
            }
            let Some((sid, &newest)) = sets.last().and_then(|(id, s)| Some((id, s.last()?))) else {
                continue;
            };
            let model = self.points[&(vdi.clone(), newest)].clone();
            let link = format!("no-vm/{name}/latest.raw");
            self.check_link(
                mp,
                &link,
                &format!("{sid}/{}.raw", cbtfs::timefmt::basic(newest)),
            );
            self.check_file(mp, &link, &vdi, newest, &model, round);
            self.check_link(mp, &format!("by-uuid/{vdi}"), &format!("../no-vm/{name}"));
            let by_uuid = format!("by-uuid/{vdi}/latest.raw");
            self.check_file(mp, &by_uuid, &vdi, newest, &model, round);
        }
    }

    fn check_link(&mut self, mp: &Path, rel: &str, target: &str) {
        match std::fs::read_link(mp.join(rel)) {
            Ok(t) if t == Path::new(target) => {}
            Ok(t) => self.mismatch(format!("{rel} -> {} (want {target})", t.display())),
            Err(e) => self.mismatch(format!("readlink {rel}: {e}")),
        }
    }

    /// Read `rel` whole through the mount (and a few random ranges), compare with the model.
    fn check_file(&mut self, mp: &Path, rel: &str, vdi: &str, t: i64, model: &[u8], round: usize) {
        self.compared += 1;
        let p = mp.join(rel);
        match std::fs::read(&p) {
            Ok(b) if b == model => {}
            Ok(b) => {
                let which = self
                    .points
                    .iter()
                    .find(|(_, v)| v[..] == b[..])
                    .map(|((v, t), _)| format!("{v}@{}", cbtfs::timefmt::basic(*t)));
                return self.mismatch(format!(
                    "round {round}: {rel} read {} bytes differing from the model ({} bytes){}",
                    b.len(),
                    model.len(),
                    which
                        .map(|w| format!("; they are {w}'s bytes"))
                        .unwrap_or_default()
                ));
            }
            Err(e) => return self.mismatch(format!("round {round}: reading {rel}: {e}")),
        }
        let f = File::open(&p).unwrap();
        for _ in 0..3 {
            let off = self.rng.below(model.len() as u64) as usize;
            let n = 1 + self.rng.below((model.len() - off) as u64) as usize;
            let mut buf = vec![0u8; n];
            if f.read_exact_at(&mut buf, off as u64).is_err() || buf[..] != model[off..off + n] {
                self.mismatch(format!("round {round}: {rel} at {off}+{n}"));
            }
        }
        let ino = std::fs::metadata(&p).unwrap().ino();
        match self.inodes.insert(ino, (vdi.to_string(), t)) {
            Some(prev) if prev != (vdi.to_string(), t) => self.mismatch(format!(
                "round {round}: inode {ino} was {}@{} and is now {rel}",
                prev.0,
                cbtfs::timefmt::basic(prev.1)
            )),
            _ => {}
        }
        debug_assert!(self.is_live(vdi, t));
    }
}

/// Every path below `mp` (directories with a trailing `/`; `.parts/` and links not entered).
/// Uses only directory listings, so it looks nothing up.
fn listing(mp: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(mp.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let name = format!("{rel}{}", e.file_name().to_string_lossy());
            match e.file_type() {
                Ok(t) if t.is_dir() => {
                    if !name.ends_with(".parts") {
                        stack.push(format!("{name}/"));
                    }
                    out.insert(format!("{name}/"));
                }
                _ => {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn random_imports_prunes_and_held_files_match_export_and_the_model() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ok(&["init", s(&repo)]);
    let seed = std::env::var("CBTFS_ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEED);
    let mut o = Oracle {
        rng: TestRng::new(seed),
        repo,
        disks: Vec::new(),
        points: HashMap::new(),
        hours: 0,
        held: Vec::new(),
        inodes: HashMap::new(),
        compared: 0,
        held_reads: 0,
        held_removed_reads: 0,
        mismatches: Vec::new(),
        dir,
    };
    for n in 0..2u32 {
        let size = random_size(&mut o.rng);
        o.disks.push(Disk {
            vdi: vdi(900 + n),
            name: format!("d{n}"),
            image: vec![0u8; size],
            sets: Vec::new(),
        });
        o.new_set(n as usize);
    }
    let m = Mounted::new(&o.repo, &o.dir.path().join("mnt"), &[]);
    let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
    for round in 0..ROUNDS {
        for _ in 0..OPS {
            let k = o.rng.below(o.disks.len() as u64) as usize;
            let op = match o.rng.below(20) {
                0..=6 => {
                    o.incremental(k);
                    "incremental import"
                }
                7..=9 => {
                    o.new_set(k);
                    "new set"
                }
                10..=14 => {
                    o.prune();
                    "prune"
                }
                _ => {
                    o.hold(&m.mp);
                    "hold a file open"
                }
            };
            *ops.entry(op).or_default() += 1;
            o.read_held();
            if !o.held.is_empty() && o.rng.below(4) == 0 {
                let i = o.rng.below(o.held.len() as u64) as usize;
                o.held.swap_remove(i);
            }
        }
        o.compare(&m.mp, round);
        o.read_held();
    }
    // Open files keep a mount busy: close them before unmounting.
    o.held.clear();
    let log = m.log();
    drop(m);
    println!(
        "oracle (seed {seed}): {ROUNDS} rounds, {} points compared, {} mismatches ({} reads of held-open files, {} of them of removed points; operations: {ops:?})",
        o.compared,
        o.mismatches.len(),
        o.held_reads,
        o.held_removed_reads,
    );
    assert!(
        o.mismatches.is_empty(),
        "seed {seed}: {} mismatches:\n{}\nmount log:\n{log}",
        o.mismatches.len(),
        o.mismatches.join("\n")
    );
}
