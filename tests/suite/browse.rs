//! File-level recovery: `cbtfs browse` and `cbtfs diff` on guest disks built with the real tools
//! (sgdisk/sfdisk, mkfs.ext4/xfs/btrfs/vfat/ntfs, LVM metadata-only), imported as several
//! points. The reference for what a point must show is the guest filesystem itself, read
//! through its own rw mount just before the snapshot; the reference for `diff` is a full
//! comparison of the two browsed trees (and `diff -rq`).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use serde_json::Value;

const LVM_CONF: &str = "global { activation=0 } devices { obtain_device_list_from_udev=0 }";

/// Skip (printing why) unless every tool is here and we are root with FUSE.
fn needs(tools: &[&str]) -> bool {
    if !can_mount() {
        return false;
    }
    let missing: Vec<&&str> = tools.iter().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        skip("missing {missing:?} (scripts/setup.sh installs them)");
        return false;
    }
    true
}

/// Run `f` with a loop device over sectors [start, start+len) of `img`.
fn with_loop<T>(img: &Path, start: u64, len: u64, f: impl FnOnce(&str) -> T) -> T {
    let dev = sh(&format!(
        "losetup -f --show -o {} --sizelimit {} {}",
        start * 512,
        len * 512,
        s(img)
    ))
    .trim()
    .to_string();
    let r = catch_unwind(AssertUnwindSafe(|| f(&dev)));
    sh(&format!("losetup -d {dev}"));
    r.unwrap_or_else(|p| resume_unwind(p))
}

/// What a tree holds: files with their bytes, symlinks with their targets, directories.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File(Vec<u8>),
    Link(String),
}

/// Names filesystems keep for themselves, not the guest's files.
fn system_name(n: &str) -> bool {
    n == "lost+found" || n.starts_with('$') || n == "System Volume Information"
}

fn tree(root: &Path) -> BTreeMap<String, Node> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, Node>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap())
            .collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name().to_string_lossy().into_owned();
            if rel.is_empty() && system_name(&name) {
                continue;
            }
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                out.insert(r.clone(), Node::Dir);
                walk(&e.path(), &r, out);
            } else if md.file_type().is_symlink() {
                let t = std::fs::read_link(e.path()).unwrap();
                out.insert(r, Node::Link(t.to_string_lossy().into_owned()));
            } else {
                let b = std::fs::read(e.path())
                    .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
                out.insert(r, Node::File(b));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

/// Mount a volume rw the way the guest would, change it with `f`, and return its tree.
fn edit(dev: &str, kind: &str, f: impl FnOnce(&Path)) -> BTreeMap<String, Node> {
    let mp = tempfile::tempdir().unwrap();
    let m = s(mp.path());
    match kind {
        "ntfs" => sh(&format!("ntfs-3g {dev} {m}")),
        "vfat" => sh(&format!("fusefat -o rw+ {dev} {m}")),
        _ => sh(&format!("mount -t {kind} {dev} {m}")),
    };
    let r = catch_unwind(AssertUnwindSafe(|| {
        f(mp.path());
        tree(mp.path())
    }));
    sh(&format!("umount {m}"));
    r.unwrap_or_else(|p| resume_unwind(p))
}

fn write(p: &Path, bytes: &[u8]) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, bytes).unwrap();
}

fn random(rng: &mut TestRng, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rng.fill(&mut b);
    b
}

/// Overwrite bytes inside a file without changing its size or (on extent filesystems) where
/// its blocks lie: a change only the changed-block map can reveal.
fn overwrite_in_place(p: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
    f.sync_all().unwrap();
}

/// A disk image whose snapshots are imported as points (increments carry the blocks that
/// differ from the previous snapshot, as CBT would report them).
struct History {
    dir: PathBuf,
    repo: PathBuf,
    img: PathBuf,
    prev: PathBuf,
    vdi: String,
    step: u64,
}

impl History {
    fn new(dir: &Path, img: &Path) -> History {
        let repo = dir.join("repo");
        ok(&["init", s(&repo)]);
        History {
            dir: dir.to_path_buf(),
            repo,
            img: img.to_path_buf(),
            prev: dir.join("prev.img"),
            vdi: vdi(7),
            step: 0,
        }
    }

    /// Import the image as it is now; returns the point's name.
    fn commit(&mut self, new_set: bool) -> String {
        let time = time(self.step);
        if new_set || self.step == 0 {
            ok(&[
                "import",
                s(&self.repo),
                "--vdi",
                &self.vdi,
                "--raw",
                s(&self.img),
                "--time",
                &time,
            ]);
        } else {
            let blocks = changed_blocks(&self.prev, &self.img);
            let n = std::fs::metadata(&self.img)
                .unwrap()
                .len()
                .div_ceil(BS as u64);
            let bm = write_bitmap(&self.dir, &format!("bm{}", self.step), &blocks, n);
            ok(&[
                "import",
                s(&self.repo),
                "--vdi",
                &self.vdi,
                "--raw",
                s(&self.img),
                "--bitmap",
                s(&bm),
                "--time",
                &time,
            ]);
        }
        sh(&format!(
            "cp --sparse=always {} {}",
            s(&self.img),
            s(&self.prev)
        ));
        self.step += 1;
        point_paths(&self.repo).pop().unwrap()
    }
}

/// The 64 KiB blocks that differ between two images.
fn changed_blocks(a: &Path, b: &Path) -> Vec<u64> {
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; BS], vec![0u8; BS]);
    let mut out = Vec::new();
    for i in 0.. {
        let na = fa.read(&mut ba).unwrap();
        let nb = fb.read(&mut bb).unwrap();
        if na == 0 && nb == 0 {
            break;
        }
        // Reads of regular files return whole blocks until the end.
        if na != nb || ba[..na] != bb[..nb] {
            out.push(i);
        }
    }
    out
}

/// Every file of the repository, for "nothing was written" checks.
fn snapshot_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn losetup_list() -> String {
    let mut l: Vec<String> = sh("losetup -a").lines().map(String::from).collect();
    l.sort();
    l.join("\n")
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

/// The mount options of the mount at `mp` (per-mount and superblock options).
fn mount_options(mp: &Path) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(s(mp)))
        .map(|l| l.split(' ').nth(5).unwrap_or("").to_string())
        .unwrap_or_default()
}

/// `cbtfs browse` in the background; `--unmount` on drop if the test did not.
struct Browse {
    dir: PathBuf,
    report: String,
    done: bool,
}

impl Browse {
    fn new(repo: &Path, point: &str, dir: &Path, extra: &[&str]) -> Browse {
        let mut args = vec!["browse", s(repo), point, s(dir)];
        args.extend_from_slice(extra);
        let report = ok(&args);
        Browse {
            dir: std::fs::canonicalize(dir).unwrap(),
            report,
            done: false,
        }
    }

    fn unmount(&mut self) -> String {
        self.done = true;
        ok(&["browse", "--unmount", s(&self.dir)])
    }

    fn mounted(&self, vol: &str) -> bool {
        self.report
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("mounted  {vol} ")))
    }
}

impl Drop for Browse {
    fn drop(&mut self) {
        if !self.done {
            let _ = cbtfs(&["browse", "--unmount", s(&self.dir)]);
        }
    }
}

/// The state file of the browse of `dir`.
fn browse_state(dir: &Path) -> Option<Value> {
    for e in std::fs::read_dir("/run/cbtfs/browse").ok()? {
        let p = e.ok()?.path();
        if p.extension().is_some_and(|x| x == "json")
            && let Ok(v) = serde_json::from_slice::<Value>(&std::fs::read(&p).ok()?)
            && v["dir"].as_str() == Some(s(dir))
        {
            return Some(v);
        }
    }
    None
}

/// The full comparison `diff` must equal: (status, path, what) for every difference in type,
/// mode, owner, size, content or symlink target between two browsed trees.
fn full_compare(a: &Path, b: &Path, vols: &[&str]) -> BTreeSet<(String, String)> {
    fn all(root: &Path, rel: &str, status: &str, out: &mut BTreeSet<(String, String)>) {
        for e in std::fs::read_dir(root).unwrap() {
            let e = e.unwrap();
            let r = format!("{rel}/{}", e.file_name().to_string_lossy());
            out.insert((status.into(), r.clone()));
            if e.file_type().unwrap().is_dir() {
                all(&e.path(), &r, status, out);
            }
        }
    }
    fn cmp(a: &Path, b: &Path, rel: &str, out: &mut BTreeSet<(String, String)>) {
        let (ma, mb) = (
            std::fs::symlink_metadata(a).unwrap(),
            std::fs::symlink_metadata(b).unwrap(),
        );
        let differs = ma.mode() != mb.mode()
            || ma.uid() != mb.uid()
            || ma.gid() != mb.gid()
            || (ma.is_file()
                && (ma.len() != mb.len()
                    || std::fs::read(a).unwrap() != std::fs::read(b).unwrap()))
            || (ma.file_type().is_symlink()
                && std::fs::read_link(a).unwrap() != std::fs::read_link(b).unwrap());
        if differs {
            out.insert(("M".into(), rel.to_string()));
        }
        if ma.mode() & libc::S_IFMT != mb.mode() & libc::S_IFMT {
            if ma.is_dir() {
                all(a, rel, "D", out);
            }
            if mb.is_dir() {
                all(b, rel, "A", out);
            }
            return;
        }
        if ma.is_dir() {
            let names = |d: &Path| -> BTreeSet<String> {
                std::fs::read_dir(d)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            };
            let (na, nb) = (names(a), names(b));
            for n in na.union(&nb) {
                let r = format!("{rel}/{n}");
                match (na.contains(n), nb.contains(n)) {
                    (true, true) => cmp(&a.join(n), &b.join(n), &r, out),
                    (true, false) => {
                        out.insert(("D".into(), r.clone()));
                        if std::fs::symlink_metadata(a.join(n)).unwrap().is_dir() {
                            all(&a.join(n), &r, "D", out);
                        }
                    }
                    _ => {
                        out.insert(("A".into(), r.clone()));
                        if std::fs::symlink_metadata(b.join(n)).unwrap().is_dir() {
                            all(&b.join(n), &r, "A", out);
                        }
                    }
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    for v in vols {
        cmp(&a.join(v), &b.join(v), v, &mut out);
    }
    out
}

fn cbtfs_diff(repo: &Path, a: &str, b: &str) -> (BTreeSet<(String, String)>, String) {
    cbtfs_diff_exit(repo, a, b, 0)
}

/// `cbtfs_diff` expecting exit status `code` (1: some volume could not be compared).
fn cbtfs_diff_exit(
    repo: &Path,
    a: &str,
    b: &str,
    code: i32,
) -> (BTreeSet<(String, String)>, String) {
    let o = cbtfs(&["diff", s(repo), a, b, "--json"]);
    assert_eq!(
        o.status.code(),
        Some(code),
        "diff: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let set = j["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["status"].as_str().unwrap().to_string(),
                c["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (set, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Every difference `diff -rq` names appears in cbtfs's list.
fn check_against_diff_r(a: &Path, b: &Path, ours: &BTreeSet<(String, String)>) {
    let o = Command::new("diff")
        .args(["-rq", "--no-dereference", s(a), s(b)])
        .bounded()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let (pa, pb) = (format!("{}/", s(a)), format!("{}/", s(b)));
    for line in text.lines() {
        let (status, path) = if let Some(rest) = line.strip_prefix("Only in ") {
            let (dir, name) = rest.split_once(": ").unwrap();
            if let Some(d) = format!("{dir}/").strip_prefix(&pa) {
                ("D", format!("{d}{name}"))
            } else {
                (
                    "A",
                    format!("{}{name}", format!("{dir}/").strip_prefix(&pb).unwrap()),
                )
            }
        } else if let Some(rest) = line.strip_prefix("Files ") {
            let first = rest.split(" and ").next().unwrap();
            ("M", first.strip_prefix(&pa).unwrap().to_string())
        } else if line.starts_with("File ") || line.starts_with("Symbolic links ") {
            // type changes and symlinks diff -r reports in prose
            continue;
        } else {
            panic!("unexpected diff -r line: {line}");
        };
        assert!(
            ours.contains(&(status.to_string(), path.clone())),
            "diff -r says {status} {path}; cbtfs diff does not: {ours:?}"
        );
    }
}

const GPT_PARTS: [(u64, u64, &str); 5] = [
    (2048, 409_600, "ext4"),       // p1 200 MiB
    (411_648, 655_360, "xfs"),     // p2 320 MiB (mkfs.xfs wants ≥ 300 MB)
    (1_067_008, 262_144, "btrfs"), // p3 128 MiB
    (1_329_152, 131_072, "vfat"),  // p4 64 MiB
    (1_460_224, 204_800, "ntfs"),  // p5 100 MiB
];

fn fill_v0(rng: &mut TestRng, m: &Path, kind: &str) {
    write(
        &m.join("readme.txt"),
        format!("{kind} at point 0\n").as_bytes(),
    );
    write(&m.join("docs/big.bin"), &random(rng, 700_000));
    write(&m.join("docs/same.bin"), &random(rng, 300_000));
    write(&m.join("docs/gone.txt"), b"removed at point 1\n");
    for i in 0..40 {
        write(&m.join(format!("many/f{i:03}")), &random(rng, 100 + i * 97));
    }
    if kind != "vfat" {
        std::os::unix::fs::symlink("readme.txt", m.join("link")).unwrap();
    }
}

fn change_v1(rng: &mut TestRng, m: &Path, kind: &str) {
    overwrite_in_place(&m.join("docs/big.bin"), 123_456, &random(rng, 5000));
    write(
        &m.join("readme.txt"),
        format!("{kind} at point 1, longer now\n").as_bytes(),
    );
    std::fs::remove_file(m.join("docs/gone.txt")).unwrap();
    write(&m.join("new/dir/added.txt"), b"added at point 1\n");
    overwrite_in_place(&m.join("many/f007"), 0, b"X");
    if kind != "vfat" && kind != "ntfs" {
        std::fs::set_permissions(
            m.join("many/f010"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::chown(m.join("many/f011"), Some(1234), Some(55)).unwrap();
    }
    if kind != "vfat" {
        std::fs::remove_file(m.join("link")).unwrap();
        std::os::unix::fs::symlink("docs/big.bin", m.join("link")).unwrap();
    }
}

#[test]
fn gpt_disk_with_every_filesystem_browsed_at_each_point_and_diffed() {
    let _serial = host_state();
    if !needs(&[
        "sgdisk",
        "mkfs.ext4",
        "mkfs.xfs",
        "mkfs.btrfs",
        "mkfs.vfat",
        "mkfs.ntfs",
        "ntfs-3g",
        "fusefat",
        "losetup",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sh(&format!("truncate -s 870M {}", s(&img)));
    let mut cmd = String::from("sgdisk -a 2048");
    for (i, (start, len, _)) in GPT_PARTS.iter().enumerate() {
        cmd.push_str(&format!(" -n{}:{}:{}", i + 1, start, start + len - 1));
    }
    // p6: a damaged filesystem (an ext superblock magic over garbage); p7: a LUKS header.
    let (p6, p7) = (1_665_024u64, 1_681_408u64);
    cmd.push_str(&format!(
        " -n6:{p6}:{} -n7:{p7}:{}",
        p6 + 16_383,
        p7 + 16_383
    ));
    sh(&format!("{cmd} {}", s(&img)));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut garbage = vec![0u8; 8 << 20];
        TestRng::new(89).fill(&mut garbage);
        garbage[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        f.write_all_at(&garbage, p6 * 512).unwrap();
        f.write_all_at(b"LUKS\xba\xbe\x00\x02", p7 * 512).unwrap();
    }
    let mut rng = TestRng::new(90);
    let mut expect: Vec<BTreeMap<String, BTreeMap<String, Node>>> =
        vec![BTreeMap::new(), BTreeMap::new()];
    for (i, (start, len, kind)) in GPT_PARTS.iter().enumerate() {
        with_loop(&img, *start, *len, |dev| {
            match *kind {
                "ntfs" => sh(&format!("mkfs.ntfs -q -F -f {dev}")),
                "vfat" => sh(&format!("mkfs.vfat {dev}")),
                "btrfs" | "xfs" => sh(&format!("mkfs.{kind} -q -f {dev}")),
                k => sh(&format!("mkfs.{k} -q {dev}")),
            };
            expect[0].insert(
                format!("p{}", i + 1),
                edit(dev, kind, |m| fill_v0(&mut rng, m, kind)),
            );
        });
    }
    let mut h = History::new(dir.path(), &img);
    let p0 = h.commit(false);
    for (i, (start, len, kind)) in GPT_PARTS.iter().enumerate() {
        with_loop(&img, *start, *len, |dev| {
            expect[1].insert(
                format!("p{}", i + 1),
                edit(dev, kind, |m| change_v1(&mut rng, m, kind)),
            );
        });
    }
    let p1 = h.commit(false);
    let vols = ["p1", "p2", "p3", "p4", "p5"];

    let repo_before = snapshot_files(&h.repo);
    let loops_before = losetup_list();
    // Both points at once (same filesystem UUIDs twice: XFS and Btrfs must cope).
    let (d0, d1) = (dir.path().join("b0"), dir.path().join("b1"));
    let mut b0 = Browse::new(&h.repo, &p0, &d0, &[]);
    let mut b1 = Browse::new(&h.repo, &p1, &d1, &[]);
    for (b, want) in [(&b0, &expect[0]), (&b1, &expect[1])] {
        // What cannot be mounted is listed with the reason; the rest is browsed.
        assert!(
            b.report.contains("skipped  p6") && b.report.contains("the kernel refused to mount it"),
            "{}",
            b.report
        );
        assert!(
            b.report.contains("skipped  p7") && b.report.contains("LUKS-encrypted"),
            "{}",
            b.report
        );
        // Guest permissions apply to host users: only the browsing user may enter.
        assert_eq!(std::fs::metadata(&b.dir).unwrap().mode() & 0o777, 0o700);
        for v in vols {
            assert!(b.mounted(v), "{v} not mounted:\n{}", b.report);
            let mp = b.dir.join(v);
            assert_eq!(&tree(&mp), &want[v], "{v} of {}", b.dir.display());
            let e = std::fs::write(mp.join("touch"), b"x").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{v}: {e}");
            let opts = mount_options(&mp);
            for o in ["ro", "nodev", "nosuid", "noexec"] {
                assert!(opts.split(',').any(|x| x == o), "{v}: {opts} lacks {o}");
            }
        }
    }
    // A file changed in place (same size, same blocks) shows its new bytes.
    assert_ne!(
        std::fs::read(d0.join("p1/docs/big.bin")).unwrap(),
        std::fs::read(d1.join("p1/docs/big.bin")).unwrap()
    );

    // diff equals a full comparison of the two trees, and everything diff -r sees.
    let want = full_compare(&b0.dir, &b1.dir, &vols);
    check_against_diff_r(&b0.dir, &b1.dir, &want);
    let (got, err) = cbtfs_diff(&h.repo, &p0, &p1);
    assert_eq!(got, want, "cbtfs diff vs full comparison; stderr: {err}");
    // The map spared reads: files untouched between the points were not compared by content.
    let j: Value = serde_json::from_str(&ok(&["diff", s(&h.repo), &p0, &p1, "--json"])).unwrap();
    assert!(j["unchanged_by_map"].as_u64().unwrap() >= 20, "{j}");
    assert!(j["full_compare"].is_null());
    // The damaged ext4 (p6) and the LUKS volume (p7) cannot be mounted, but no block of them
    // changed between the points: unchanged, and the diff is complete.
    for v in ["p6", "p7"] {
        let vol = j["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == v)
            .unwrap_or_else(|| panic!("{v} missing: {j}"));
        assert_eq!(vol["compared"], false, "{j}");
        assert_eq!(vol["unchanged"], true, "{j}");
    }
    // PATH limits it.
    let sub = ok(&["diff", s(&h.repo), &p0, &p1, "p1/docs"]);
    assert_eq!(sub.lines().count(), 2, "{sub}");
    assert!(
        sub.contains("M\tp1/docs/big.bin\tcontent") && sub.contains("D\tp1/docs/gone.txt"),
        "{sub}"
    );

    // Browsing a point already browsed is refused clearly; a non-empty DIR too.
    let (_, m) = fails(&["browse", s(&h.repo), &p0, s(&d0)]);
    assert!(m.contains("already being browsed"), "{m}");

    b0.unmount();
    b1.unmount();
    assert!(mounts_under(&d0).is_empty() && mounts_under(&d1).is_empty());
    assert!(!d0.exists() && !d1.exists(), "browse folders removed");
    assert_eq!(losetup_list(), loops_before, "loop devices left behind");
    assert!(
        snapshot_files(&h.repo) == repo_before,
        "the repository changed"
    );
    assert!(browse_state(&d0).is_none());

    // A point in a new set: diff compares fully and says so.
    with_loop(&img, GPT_PARTS[0].0, GPT_PARTS[0].1, |dev| {
        edit(dev, "ext4", |m| write(&m.join("third.txt"), b"set 2\n"));
    });
    let p2 = h.commit(true);
    // Between sets nothing proves p6 and p7 unchanged: they are named as not compared, and the
    // diff exits 1 (its list may miss their changes).
    let (got, _) = cbtfs_diff_exit(&h.repo, &p1, &p2, 1);
    let o = cbtfs(&["diff", s(&h.repo), &p1, &p2]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("different sets") && err.contains("every file compared by content"),
        "{err}"
    );
    assert!(
        err.contains("NOT COMPARED: volume p6: its filesystem could not be mounted")
            && err.contains("NOT COMPARED: volume p7: its filesystem could not be mounted")
            && err.contains("LUKS-encrypted")
            && err.contains("2 volumes NOT compared"),
        "{err}"
    );
    let mut b1 = Browse::new(&h.repo, &p1, &d1, &[]);
    let b2 = Browse::new(&h.repo, &p2, &dir.path().join("b2"), &[]);
    assert_eq!(got, full_compare(&b1.dir, &b2.dir, &vols));
    assert!(
        got.contains(&("A".to_string(), "p1/third.txt".to_string())),
        "{got:?}"
    );
    b1.unmount();
    drop(b2);

    // Ctrl-C during a diff: it stops, and both of its browses are unmounted. The process is
    // stopped as soon as its first browse is mounted, so the signal lands before the walk.
    let child = cbtfs_cmd()
        .args(["diff", s(&h.repo), &p0, &p1])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let tag = format!("cbtfs-diff-{pid}-");
    let ours = |tag: &str| -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|m| m.contains(tag))
            .collect()
    };
    wait_for(
        "the diff's first browse",
        std::time::Duration::from_secs(20),
        || !ours(&tag).is_empty(),
    );
    // SAFETY: signals to our child.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
        libc::kill(pid, libc::SIGINT);
        libc::kill(pid, libc::SIGCONT);
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("interrupted"),
        "{err}"
    );
    assert!(ours(&tag).is_empty(), "mounts left: {:?}", ours(&tag));
    assert_eq!(losetup_list(), loops_before);

    // A missing FUSE driver is named with its package; the rest is still browsed.
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    for t in ["losetup", "fusefat", "modprobe", "fusermount3"] {
        let p = sh(&format!("command -v {t}"));
        std::os::unix::fs::symlink(p.trim(), bin_dir.join(t)).unwrap();
    }
    let o = cbtfs_cmd()
        .args(["browse", s(&h.repo), &p1, s(&d1)])
        .env("PATH", &bin_dir)
        .bounded()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("ntfs-3g is not installed: install the `ntfs-3g` package"),
        "{text}"
    );
    assert!(text.contains("mounted  p1 "), "{text}");
    ok(&["browse", "--unmount", s(&d1)]);
    assert_eq!(losetup_list(), loops_before);
}

/// Where an LV's bytes lie on its PV, from `lvs --segments`: (LV offset, length, PV offset).
fn lv_segments(pv: &str, vg: &str, lv: &str) -> Vec<(u64, u64, u64)> {
    let c = format!("--config '{LVM_CONF}'");
    let j = |cmd: String| -> Value { serde_json::from_str(&sh(&cmd)).unwrap() };
    let segs = j(format!(
        "lvs {c} --reportformat json --units b --nosuffix --segments -o lv_name,seg_start,seg_size,seg_pe_ranges {vg}"
    ));
    let pe_start: u64 = j(format!(
        "pvs {c} --reportformat json --units b --nosuffix -o pe_start {pv}"
    ))["report"][0]["pv"][0]["pe_start"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let extent: u64 = j(format!(
        "vgs {c} --reportformat json --units b --nosuffix -o vg_extent_size {vg}"
    ))["report"][0]["vg"][0]["vg_extent_size"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let num = |v: &Value| -> u64 { v.as_str().unwrap().parse().unwrap() };
    segs["report"][0]["seg"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["lv_name"] == lv)
        .map(|s| {
            let ranges = s["seg_pe_ranges"].as_str().unwrap();
            let first: u64 = ranges
                .rsplit(':')
                .next()
                .unwrap()
                .split('-')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            (
                num(&s["seg_start"]),
                num(&s["seg_size"]),
                pe_start + first * extent,
            )
        })
        .collect()
}

/// Copy an LV's filesystem image into its segments on the disk.
fn place_lv(disk: &Path, pv_offset: u64, lv_img: &Path, segs: &[(u64, u64, u64)]) {
    use std::os::unix::fs::FileExt;
    let lv = std::fs::read(lv_img).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    for &(at, len, pv_at) in segs {
        f.write_all_at(&lv[at as usize..(at + len) as usize], pv_offset + pv_at)
            .unwrap();
    }
}

#[test]
fn mbr_logical_partitions_and_an_lvm_volume_in_two_pieces() {
    let _serial = host_state();
    if !needs(&["sfdisk", "mkfs.ext4", "pvcreate", "losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sh(&format!("truncate -s 160M {}", s(&img)));
    sh(&format!(
        "printf 'label: dos\\nsize=20MiB, type=83\\ntype=5\\nsize=10MiB, type=83\\ntype=8e\\n' | sfdisk -q {}",
        s(&img)
    ));
    let parts: Value = serde_json::from_str(&sh(&format!("sfdisk -J {}", s(&img)))).unwrap();
    let part = |n: u32| -> (u64, u64) {
        let p = parts["partitiontable"]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"].as_str().unwrap().ends_with(&n.to_string()))
            .unwrap();
        (p["start"].as_u64().unwrap(), p["size"].as_u64().unwrap())
    };
    let (p1, p5, p6) = (part(1), part(5), part(6));

    // vg0/root: 8 MiB, then a 4 MiB LV in the way, then 16 MiB more: two pieces.
    let c = format!("--config '{LVM_CONF}'");
    let segs = with_loop(&img, p6.0, p6.1, |pv| {
        let r = catch_unwind(AssertUnwindSafe(|| {
            sh(&format!("pvcreate -q {c} {pv}"));
            sh(&format!("vgcreate -q {c} -s 1M vg0 {pv}"));
            sh(&format!("lvcreate -q {c} -an -Zn -L 8M -n root vg0"));
            sh(&format!("lvcreate -q {c} -an -Zn -L 4M -n gap vg0"));
            sh(&format!("lvextend -q {c} -L 24M vg0/root"));
            lv_segments(pv, "vg0", "root")
        }));
        let _ = Command::new("vgchange")
            .args(["--config", LVM_CONF, "-an", "vg0"])
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .bounded();
        r.unwrap_or_else(|p| resume_unwind(p))
    });
    assert_eq!(segs.len(), 2, "root must lie in two pieces: {segs:?}");
    let lv_img = dir.path().join("lv.img");
    sh(&format!(
        "truncate -s 24M {} && mkfs.ext4 -q {}",
        s(&lv_img),
        s(&lv_img)
    ));

    let mut rng = TestRng::new(91);
    let mut expect: Vec<BTreeMap<&str, BTreeMap<String, Node>>> =
        vec![BTreeMap::new(), BTreeMap::new()];
    let mut h = History::new(dir.path(), &img);
    let mut points = Vec::new();
    for (step, expect) in expect.iter_mut().enumerate() {
        for (name, (start, len), kind) in [("p1", p1, "ext4"), ("p5", p5, "ext2")] {
            if step == 0 {
                with_loop(&img, start, len, |dev| sh(&format!("mkfs.{kind} -q {dev}")));
            }
            let t = with_loop(&img, start, len, |dev| {
                edit(dev, kind, |m| {
                    if step == 0 {
                        fill_v0(&mut rng, m, kind)
                    } else {
                        change_v1(&mut rng, m, kind)
                    }
                })
            });
            expect.insert(name, t);
        }
        let sectors = std::fs::metadata(&lv_img).unwrap().len() / 512;
        let t = with_loop(&lv_img, 0, sectors, |dev| {
            edit(dev, "ext4", |m| {
                // Enough data to reach the LV's second piece.
                write(
                    &m.join(format!("fill{step}.bin")),
                    &random(&mut rng, 9 << 20),
                );
                if step == 0 {
                    fill_v0(&mut rng, m, "ext4")
                } else {
                    change_v1(&mut rng, m, "ext4")
                }
            })
        });
        expect.insert("vg0-root", t);
        place_lv(&img, p6.0 * 512, &lv_img, &segs);
        points.push(h.commit(false));
    }
    let loops_before = losetup_list();
    let repo_before = snapshot_files(&h.repo);
    for (step, point) in points.iter().enumerate() {
        let d = dir.path().join(format!("b{step}"));
        let mut b = Browse::new(&h.repo, point, &d, &[]);
        for (name, want) in &expect[step] {
            assert!(b.mounted(name), "{name} not mounted:\n{}", b.report);
            assert_eq!(&tree(&b.dir.join(name)), want, "{name} at point {step}");
        }
        // The PV is listed with what it is, not hidden.
        assert!(
            b.report.contains("skipped  p6") && b.report.contains("LVM physical volume"),
            "{}",
            b.report
        );
        b.unmount();
        assert!(!d.exists());
    }
    let (got, _) = cbtfs_diff(&h.repo, &points[0], &points[1]);
    assert!(
        got.contains(&("M".to_string(), "vg0-root/docs/big.bin".to_string())),
        "{got:?}"
    );
    assert!(
        got.contains(&("A".to_string(), "vg0-root/fill1.bin".to_string())),
        "{got:?}"
    );
    assert!(
        got.contains(&("D".to_string(), "p5/docs/gone.txt".to_string())),
        "{got:?}"
    );
    assert_eq!(losetup_list(), loops_before);
    assert!(
        snapshot_files(&h.repo) == repo_before,
        "the repository changed"
    );
}

fn kill9_browse(dir: &Path) {
    let st = browse_state(dir).expect("browse state");
    let pid = st["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill with the pid of the browse process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for(
        "the browse process to die",
        std::time::Duration::from_secs(10),
        || {
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        },
    );
}

#[test]
fn bare_filesystem_with_a_journal_to_replay_userspace_crash_cleanup_and_damage() {
    let _serial = host_state();
    if !needs(&["mkfs.ext4", "dumpe2fs", "losetup", "fuse2fs", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("live.img");
    let snap = dir.path().join("snap.img");
    sh(&format!(
        "truncate -s 64M {} && mkfs.ext4 -q -b 4096 {}",
        s(&img),
        s(&img)
    ));
    let mut rng = TestRng::new(92);
    // A crash-consistent snapshot: the image copied while the guest has it mounted, right
    // after it wrote (and synced) its files; then the guest goes on writing.
    let sectors = 64 * 2048;
    let want = with_loop(&img, 0, sectors, |dev| {
        let mp = tempfile::tempdir().unwrap();
        sh(&format!("mount -t ext4 {dev} {}", s(mp.path())));
        let r = catch_unwind(AssertUnwindSafe(|| {
            fill_v0(&mut rng, mp.path(), "ext4");
            let mut big = Vec::with_capacity(1 << 20);
            for page in 0..256 {
                let mut p = format!("BIGFILE-PAGE-{page:06}").into_bytes();
                p.resize(4096, 0);
                rng.fill(&mut p[32..]);
                big.extend_from_slice(&p);
            }
            write(&mp.path().join("big-pattern.bin"), &big);
            write(&mp.path().join("small.txt"), b"small file\n");
            sh("sync");
            let t = tree(mp.path());
            sh(&format!("cp --sparse=always {} {}", s(&img), s(&snap)));
            write(&mp.path().join("after-snapshot.txt"), b"not in the point\n");
            t
        }));
        sh(&format!("umount {}", s(mp.path())));
        r.unwrap_or_else(|p| resume_unwind(p))
    });
    let features = sh(&format!("dumpe2fs -h {} 2>/dev/null", s(&snap)));
    assert!(
        features.contains("needs_recovery"),
        "the snapshot must need journal recovery: {features}"
    );

    let mut h = History::new(dir.path(), &snap);
    let point = h.commit(false);
    let loops_before = losetup_list();
    let repo_before = snapshot_files(&h.repo);
    let d = dir.path().join("b");

    // Kernel driver: the journal is replayed into the overlay; the files are as last written.
    // The overlay's store is unlinked from birth: nothing appears in TMPDIR, even meanwhile.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let o = cbtfs_cmd()
        .args(["browse", s(&h.repo), &point, s(&d)])
        .env("TMPDIR", &tmp)
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut b = Browse {
        dir: std::fs::canonicalize(&d).unwrap(),
        report: String::from_utf8_lossy(&o.stdout).into_owned(),
        done: false,
    };
    assert!(b.mounted("disk"), "{}", b.report);
    assert!(b.report.contains("journal replay"), "{}", b.report);
    assert_eq!(tree(&b.dir.join("disk")), want);
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "files left in TMPDIR"
    );
    b.unmount();
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "files left in TMPDIR"
    );

    // Userspace: e2fsck replays into the overlay, fuse2fs serves it.
    let mut b = Browse::new(&h.repo, &point, &d, &["--userspace"]);
    assert!(b.report.contains("fuse2fs"), "{}", b.report);
    assert_eq!(tree(&b.dir.join("disk")), want);
    let e = std::fs::write(b.dir.join("disk/touch"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert!(mount_options(&b.dir.join("disk")).contains("nosuid"));
    b.unmount();
    assert_eq!(losetup_list(), loops_before);

    // Foreground: Ctrl-C (SIGINT) and SIGTERM end it and clean up.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child = cbtfs_cmd()
            .args(["browse", "-f", s(&h.repo), &point, s(&d)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for(
            "the foreground browse",
            std::time::Duration::from_secs(20),
            || {
                d.exists()
                    && !mounts_under(&std::fs::canonicalize(&d).unwrap()).is_empty()
                    && std::fs::read(d.join("disk/small.txt")).is_ok()
            },
        );
        // SAFETY: kill with the pid of our child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let st = child.bounded().unwrap();
        assert!(st.success(), "signal {sig}: {st}");
        assert!(!d.exists(), "signal {sig}: folder left");
        assert_eq!(losetup_list(), loops_before, "signal {sig}");
    }

    // A browse killed with SIGKILL: --unmount cleans up after it.
    let b = Browse::new(&h.repo, &point, &d, &[]);
    let dd = b.dir.clone();
    kill9_browse(&dd);
    std::mem::forget(b);
    let out = ok(&["browse", "--unmount", s(&dd)]);
    assert!(out.contains("unmounted"), "{out}");
    assert!(mounts_under(&dd).is_empty(), "{:?}", mounts_under(&dd));
    assert!(!dd.exists());
    assert_eq!(losetup_list(), loops_before);
    // ... and so does the next browse of the same folder.
    let b = Browse::new(&h.repo, &point, &d, &[]);
    kill9_browse(&dd);
    std::mem::forget(b);
    let o = cbtfs(&["browse", s(&h.repo), &point, s(&d)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cleaning up after a browse"));
    assert_eq!(tree(&dd.join("disk")), want);
    ok(&["browse", "--unmount", s(&dd)]);
    assert_eq!(losetup_list(), loops_before);
    assert!(
        snapshot_files(&h.repo) == repo_before,
        "the repository changed"
    );

    // Damaged data: the file over the damaged block reads EIO, the rest still reads.
    let image = std::fs::read(&snap).unwrap();
    let block = image
        .chunks(BS)
        .position(|c| c.starts_with(b"BIGFILE-PAGE-"))
        .expect("the big file fills a whole 64 KiB block");
    // Flip a bit in the chunk record the point's chain reads that block from.
    let r = open_repo(&h.repo);
    let points: Vec<_> = r
        .disk(&h.vdi)
        .unwrap()
        .sets
        .iter()
        .flat_map(|set| set.points.clone())
        .collect();
    let (pack, loc) = points
        .iter()
        .rev()
        .find_map(|m| r.locate_block(m, block as u32).unwrap())
        .expect("the block is stored");
    drop(r);
    let pack = h.repo.join(pack);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[loc.offset as usize + loc.len as usize / 2] ^= 0x10;
    std::fs::write(&pack, bytes).unwrap();
    let b = Browse::new(&h.repo, &point, &d, &[]);
    let e = std::fs::read(b.dir.join("disk/big-pattern.bin")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(
        std::fs::read(b.dir.join("disk/small.txt")).unwrap(),
        b"small file\n"
    );
    drop(b);
    assert_eq!(losetup_list(), loops_before);
}

/// Issue #17: `browse` of a point with nothing mountable exited 0. It fails, naming each volume
/// and why it was skipped, and leaves nothing behind (no mounts, no state, no folder it made).
#[test]
fn browse_with_nothing_mountable_fails_naming_each_volume() {
    let _serial = host_state();
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ok(&["init", s(&repo)]);
    // Random bytes: no partition table, no filesystem.
    let img = dir.path().join("img");
    let mut data = vec![0u8; 16 * BS];
    TestRng::new(175).fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &vdi(175),
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]);
    let paths = point_paths(&repo);
    let point = paths[0].trim_end_matches(".raw");
    let loops_before = losetup_list();
    let d = dir.path().join("b");
    for userspace in [false, true] {
        let mut args = vec!["browse"];
        if userspace {
            args.push("--userspace");
        }
        args.extend([s(&repo), point, s(&d)]);
        let (code, msg) = fails(&args);
        assert_eq!(code, 1, "{msg}");
        assert!(
            msg.contains(&format!(
                "nothing in {point} could be mounted under {}",
                s(&d)
            )) && msg.contains("disk (-): no filesystem recognised"),
            "{msg}"
        );
        assert!(!msg.contains("Ctrl-C") && !msg.contains("ends it"), "{msg}");
        assert!(browse_state(&d).is_none(), "browse state left behind");
        assert!(!d.exists(), "the folder browse made is removed");
        assert!(mounts_under(dir.path()).is_empty());
        assert_eq!(losetup_list(), loops_before);
    }
}

/// A disk whose bytes hold no filesystem: `diff` cannot compare it, says so per volume (text
/// and JSON) and exits 1, never "0 changes" with success. A plain ext4 disk still diffs and
/// exits 0, its volume marked compared.
#[test]
fn diff_of_a_volume_that_cannot_be_mounted_says_not_compared_and_fails() {
    let _serial = host_state();
    if !needs(&["mkfs.ext4", "losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("noise.img");
    let mut rng = TestRng::new(1717);
    let mut bytes = vec![0u8; 64 * BS];
    rng.fill(&mut bytes);
    std::fs::write(&img, &bytes).unwrap();
    let mut h = History::new(dir.path(), &img);
    let p0 = h.commit(false);
    for b in 0..20usize {
        let at = (3 * b + 1) * BS;
        rng.fill(&mut bytes[at..at + BS]);
    }
    std::fs::write(&img, &bytes).unwrap();
    let p1 = h.commit(false);
    let (p0, p1) = (p0.trim_end_matches(".raw"), p1.trim_end_matches(".raw"));
    let j: Value = serde_json::from_str(&ok(&["ls", s(&h.repo), "--json"])).unwrap();
    assert_eq!(
        j["vms"][0]["disks"][0]["sets"][0]["points"][1]["changed_blocks"],
        20
    );

    let o = cbtfs(&["diff", s(&h.repo), p0, p1]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("NOT COMPARED: volume disk: its filesystem could not be mounted (in "),
        "{err}"
    );
    assert!(
        err.contains("nothing was compared (1 volume not compared"),
        "{err}"
    );
    assert!(!err.contains("0 changes"), "{err}");
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    let o = cbtfs(&["diff", s(&h.repo), p0, p1, "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let vols = j["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 1, "{j}");
    assert_eq!(vols[0]["name"], "disk");
    assert_eq!(vols[0]["compared"], false);
    assert!(
        vols[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("its filesystem could not be mounted"),
        "{j}"
    );
    assert_eq!(j["changes"].as_array().unwrap().len(), 0);

    // A bare ext4 filesystem with a file added between the points: compared, exit 0.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("kept.txt"), b"kept\n").unwrap();
    let img = dir.path().join("fs.img");
    let mkfs = |img: &Path| {
        sh(&format!(
            "rm -f {i} && mkfs.ext4 -q -F -b 4096 -U 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b -E hash_seed=3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b,nodiscard -d {d} {i} 16M",
            i = s(img),
            d = s(&src)
        ))
    };
    mkfs(&img);
    let mut h = History::new(dir.path(), &img);
    let p0 = h.commit(false);
    std::fs::write(src.join("added.txt"), b"new\n").unwrap();
    mkfs(&img);
    let p1 = h.commit(false);
    let (p0, p1) = (p0.trim_end_matches(".raw"), p1.trim_end_matches(".raw"));
    let o = cbtfs(&["diff", s(&h.repo), p0, p1, "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        j["volumes"],
        serde_json::json!([{"name": "disk", "compared": true}]),
        "{j}"
    );
    let changes = j["changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c["path"] == "disk/added.txt" && c["status"] == "A"),
        "{j}"
    );
    let o = cbtfs(&["diff", s(&h.repo), p0, p1]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("in 1 volume compared;"), "{err}");
    assert!(
        !err.contains("NOT COMPARED") && !err.contains("incomplete"),
        "{err}"
    );
    // A PATH in neither point is an error, not "0 changes"; one that exists is not.
    let o = cbtfs(&["diff", s(&h.repo), p0, p1, "disk/nope"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: disk/nope: no such path in either point"),
        "{err}"
    );
    let out = ok(&["diff", s(&h.repo), p0, p1, "disk/added.txt"]);
    assert_eq!(out, "A\tdisk/added.txt\n");
}

// ---- `cbtfs dump` and `cbtfs find`: files back without root or loop devices ----

/// The dump/find test disk (GPT, sectors): p1 ext4 48 MiB, p2 xfs 310 MiB (XFS's minimum is
/// 300 MiB; the image is sparse, so it costs little).
const DF_P1: (u64, u64) = (2048, 98_304);
const DF_P2: (u64, u64) = (100_352, 634_880);

/// A GPT disk with p1 ext4 (empty `etc/`) and p2 xfs (holding `hello.txt`), nothing imported.
fn dumpfind_disk(dir: &Path) -> History {
    let img = dir.join("disk.img");
    sh(&format!("truncate -s 400M {}", s(&img)));
    sh(&format!(
        "sgdisk -a 2048 -n1:{}:{} -n2:{}:{} {}",
        DF_P1.0,
        DF_P1.0 + DF_P1.1 - 1,
        DF_P2.0,
        DF_P2.0 + DF_P2.1 - 1,
        s(&img)
    ));
    with_loop(&img, DF_P1.0, DF_P1.1, |dev| {
        sh(&format!("mkfs.ext4 -q {dev}"));
        edit(dev, "ext4", |m| std::fs::create_dir(m.join("etc")).unwrap());
    });
    with_loop(&img, DF_P2.0, DF_P2.1, |dev| {
        sh(&format!("mkfs.xfs -q -f {dev}"));
        edit(dev, "xfs", |m| {
            write(&m.join("hello.txt"), b"hello from xfs\n")
        });
    });
    History::new(dir, &img)
}

/// Change p1 of the disk with `f` (mounted rw by the kernel, as the guest would).
fn on_p1<T>(h: &History, f: impl FnOnce(&Path) -> T) -> T {
    // Not `edit`: its tree walk would read the fifo made here (and wait forever).
    with_loop(&h.img, DF_P1.0, DF_P1.1, |dev| {
        let mp = tempfile::tempdir().unwrap();
        sh(&format!("mount -t ext4 {dev} {}", s(mp.path())));
        let r = catch_unwind(AssertUnwindSafe(|| f(mp.path())));
        sh(&format!("umount {}", s(mp.path())));
        r.unwrap_or_else(|p| resume_unwind(p))
    })
}

/// Everything tar must keep of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    node: Node,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

/// Every entry under `root` (itself as ""), and the groups of names sharing an inode.
fn meta_tree(root: &Path) -> (BTreeMap<String, Meta>, BTreeSet<Vec<String>>) {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((p, rel)) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let node = if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                let r = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((e.path(), r));
            }
            Node::Dir
        } else if md.file_type().is_symlink() {
            Node::Link(
                std::fs::read_link(&p)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            )
        } else if md.is_file() {
            if md.nlink() > 1 {
                inodes.entry(md.ino()).or_default().push(rel.clone());
            }
            Node::File(std::fs::read(&p).unwrap())
        } else {
            Node::File(format!("special {:o}", md.mode() & 0o170000).into_bytes())
        };
        out.insert(
            rel,
            Meta {
                node,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: md.mtime(),
            },
        );
    }
    let links = inodes
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    (out, links)
}

/// Run cbtfs as `nobody` (uid/gid 65534, no groups) with nothing of this environment but PATH,
/// HOME and TMPDIR (`home`): no XDG_RUNTIME_DIR.
fn as_nobody(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()])
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", home)
        .env("TMPDIR", home)
        .env(
            "CBTFS_KEY_FILE",
            key_file_for(65534, home.parent().unwrap()),
        )
        .bounded()
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    )
}

/// A copy of `repo` readable by everyone, and a home folder owned by nobody, in `dir`.
fn nobody_setup(dir: &Path, repo: &Path) -> (PathBuf, PathBuf) {
    let copy = dir.join("repo-copy");
    sh(&format!("cp -a {} {}", s(repo), s(&copy)));
    sh(&format!(
        "chmod -R a+rX {} && chmod a+rx {}",
        s(&copy),
        s(dir)
    ));
    let home = dir.join("nobody-home");
    std::fs::create_dir(&home).unwrap();
    sh(&format!("chown 65534:65534 {}", s(&home)));
    (copy, home)
}

/// /dev/fuse open to every user (udev's default mode, 0666) while it lives; the mode it had is
/// put back on drop. The container this runs in may create it 0600.
struct FuseOpenToAll(Option<u32>);

impl FuseOpenToAll {
    fn new() -> FuseOpenToAll {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata("/dev/fuse").unwrap().mode() & 0o7777;
        if mode & 0o006 == 0o006 {
            return FuseOpenToAll(None);
        }
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666)).unwrap();
        FuseOpenToAll(Some(mode))
    }
}

impl Drop for FuseOpenToAll {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        if let Some(m) = self.0 {
            let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(m));
        }
    }
}

/// What a dump or find must leave in a TMPDIR: nothing but an empty browse-state folder.
fn assert_clean_tmp(tmp: &Path) {
    for e in std::fs::read_dir(tmp).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with("cbtfs-dump-"),
            "working folder left: {}",
            p.display()
        );
        if name.starts_with("cbtfs-") && p.join("browse").exists() {
            let left: Vec<_> = std::fs::read_dir(p.join("browse")).unwrap().collect();
            assert!(left.is_empty(), "browse state left: {left:?}");
        }
    }
    assert!(mounts_under(tmp).is_empty(), "{:?}", mounts_under(tmp));
}

#[test]
fn dump_files_and_tars_as_root_and_as_nobody() {
    let _serial = host_state();
    if !needs(&[
        "sgdisk",
        "mkfs.ext4",
        "mkfs.xfs",
        "losetup",
        "fuse2fs",
        "e2fsck",
        "tar",
        "setpriv",
        "fusermount3",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut h = dumpfind_disk(dir.path());
    let mut rng = TestRng::new(170);
    let big = random(&mut rng, (3 << 20) + 123);
    let long_dir = "a-long-directory-name-".repeat(4);
    let long_file = format!("{}.txt", "file-with-a-long-name-".repeat(3));
    let long_target = format!("/{}", "t".repeat(150));
    let (want, want_links) = on_p1(&h, |m| {
        let www = m.join("srv/www");
        write(
            &m.join("etc/nginx/nginx.conf"),
            b"events {}\nhttp { server { listen 80; } }\n",
        );
        write(&www.join("big.bin"), &big);
        write(&www.join(&long_dir).join(&long_file), b"deep\n");
        std::fs::hard_link(www.join("big.bin"), www.join("big-hardlink.bin")).unwrap();
        std::os::unix::fs::symlink("../../etc/nginx/nginx.conf", www.join("conf-link")).unwrap();
        std::os::unix::fs::symlink(&long_target, www.join("long-target")).unwrap();
        std::os::unix::fs::symlink("/etc/nginx/nginx.conf", m.join("abs-link")).unwrap();
        sh(&format!("mkfifo {}", s(&www.join("fifo"))));
        sh(&format!(
            "cd {w} && chown 1234:5678 big.bin && chmod 0640 big.bin && chmod 0600 {d}/{f} \
             && chmod 0751 {d} && chown -h 42:43 conf-link && chmod 2750 . && chmod 0600 ../../etc/nginx/nginx.conf",
            w = s(&www),
            d = long_dir,
            f = long_file
        ));
        // Distinct times, children before their folders.
        let mut t = 1_700_000_000u64;
        for p in [
            format!("{long_dir}/{long_file}"),
            long_dir.clone(),
            "big.bin".into(),
            "conf-link".into(),
            "long-target".into(),
            "fifo".into(),
            ".".into(),
        ] {
            sh(&format!("touch -h -d @{t} {}", s(&www.join(p))));
            t += 86_400 + 17;
        }
        sh(&format!("touch -d @{t} {}", s(&m.join("srv"))));
        meta_tree(&m.join("srv"))
    });
    assert!(
        format!("srv/www/{long_dir}/{long_file}").len() > 100,
        "the long name must need more than ustar's 100 bytes"
    );
    assert_eq!(want_links.len(), 1, "{want_links:?}");
    let point = h.commit(false);
    // What errors and reports call it (the mount's file name, without `.raw`).
    let canonical = point.trim_end_matches(".raw").to_string();
    let repo = h.repo.clone();
    let r = s(&repo);
    let loops_before = losetup_list();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let run = |args: &[&str]| {
        cbtfs_cmd()
            .args(args)
            .env("TMPDIR", &tmp)
            .bounded()
            .unwrap()
    };

    // One file, byte for byte, to standard output and to -o FILE; any point name works.
    let o = run(&["dump", r, &point, "p1/srv/www/big.bin"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(o.stdout == big, "stdout differs from the guest's file");
    let out = dir.path().join("big.out");
    let by_uuid = format!("{}@latest", h.vdi);
    let o = run(&["dump", r, &by_uuid, "p1/srv/www/big.bin", "-o", s(&out)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&out).unwrap() == big);
    assert!(
        text(&o).contains(&format!("of {canonical} ")),
        "{}",
        text(&o)
    );
    // The guest's links are followed inside the guest (a relative one, an absolute one).
    let conf = b"events {}\nhttp { server { listen 80; } }\n";
    for link in ["p1/srv/www/conf-link", "p1/abs-link"] {
        let o = run(&["dump", r, &point, link]);
        assert!(o.status.success(), "{link}: {}", text(&o));
        assert_eq!(o.stdout, conf, "{link}");
    }

    // A directory as tar: extracted, everything tar keeps is as in the guest.
    let tar_file = dir.path().join("srv.tar");
    let o = run(&["dump", r, &point, "p1/srv", "--tar", "-o", s(&tar_file)]);
    assert!(o.status.success(), "{}", text(&o));
    let o2 = run(&["dump", r, &point, "p1/srv", "--tar"]);
    assert!(o2.status.success(), "{}", text(&o2));
    assert!(
        o2.stdout == std::fs::read(&tar_file).unwrap(),
        "the tar on stdout differs from the one written with -o"
    );
    let ext = dir.path().join("extracted");
    std::fs::create_dir(&ext).unwrap();
    sh(&format!(
        "tar -x --numeric-owner -p -f {} -C {}",
        s(&tar_file),
        s(&ext)
    ));
    let (got, got_links) = meta_tree(&ext.join("srv"));
    assert_eq!(got.len(), want.len());
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "{k}");
    }
    assert_eq!(got_links, want_links);

    // Errors name the point, the volume and what to do.
    let o = run(&["dump", r, &point, "p1/srv/www"]);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(
        e.contains("is a directory") && e.contains("add --tar") && e.contains(&canonical),
        "{e}"
    );
    let o = run(&["dump", r, &point, "p1/srv/www/nope.txt"]);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(
        e.contains("p1/srv/www/nope.txt does not exist")
            && e.contains(&canonical)
            && e.contains("volume p1"),
        "{e}"
    );
    let o = run(&["dump", r, &point, "p9/etc/hosts"]);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(
        e.contains("no volume \"p9\"") && e.contains("p1 (ext4)") && e.contains("p2 (xfs)"),
        "{e}"
    );
    let o = run(&["dump", r, &point, "p1/srv/www/fifo"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("is a fifo, not a regular file"),
        "{}",
        text(&o)
    );
    // A reader that goes away (`| head`) ends the dump quietly; Ctrl-C ends it with an error.
    // Either way everything is unmounted.
    for sig in [None, Some(libc::SIGINT)] {
        use std::io::Read;
        let mut child = cbtfs_cmd()
            .args(["dump", r, &point, "p1/srv/www/big.bin"])
            .env("TMPDIR", &tmp)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = vec![0u8; 4096];
        stdout.read_exact(&mut first).unwrap();
        assert!(first[..] == big[..4096]);
        match sig {
            None => drop(stdout),
            Some(sig) => {
                // SAFETY: kill with the pid of our child.
                unsafe { libc::kill(child.id() as i32, sig) };
                // Drained, so a dump blocked writing sees the signal at its next chunk.
                let mut rest = Vec::new();
                stdout.read_to_end(&mut rest).unwrap();
                assert!(rest.len() < big.len() - 4096, "the dump did not stop");
            }
        }
        let o = child.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        match sig {
            None => assert!(o.status.success() && e.is_empty(), "{:?} {e}", o.status),
            Some(_) => assert!(
                !o.status.success() && e.contains("interrupted") && e.contains("unmounted"),
                "{:?} {e}",
                o.status
            ),
        }
        assert_clean_tmp(&tmp);
    }
    // Root reads XFS with the kernel's driver, and detaches its loop device afterwards.
    let o = run(&["dump", r, &point, "p2/hello.txt"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(o.stdout, b"hello from xfs\n");
    assert_eq!(losetup_list(), loops_before);
    assert_clean_tmp(&tmp);

    // As nobody, over a copy of the repository anyone may read.
    let (copy, home) = nobody_setup(dir.path(), &repo);
    let c = s(&copy);
    let fuse_mode = std::fs::metadata("/dev/fuse").unwrap().mode() & 0o777;
    if fuse_mode & 0o006 != 0o006 {
        // Closed to other users (this container's /dev): said plainly.
        let o = as_nobody(&home, &["dump", c, &point, "p1/srv/www/big.bin"]);
        assert!(!o.status.success());
        assert!(
            text(&o).contains("/dev/fuse cannot be opened by this user"),
            "{}",
            text(&o)
        );
    }
    let _fuse = FuseOpenToAll::new();
    let out = home.join("big.out");
    let o = as_nobody(
        &home,
        &["dump", c, &point, "p1/srv/www/big.bin", "-o", s(&out)],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&out).unwrap() == big);
    assert_eq!(std::fs::metadata(&out).unwrap().uid(), 65534);
    // A root-owned 0600 file of the guest too: whoever reads the point reads its whole disk.
    let o = as_nobody(&home, &["dump", c, &point, "p1/etc/nginx/nginx.conf"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(o.stdout, conf);
    let o = as_nobody(&home, &["dump", c, &point, "p1/srv", "--tar"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        o.stdout == std::fs::read(&tar_file).unwrap(),
        "nobody's tar differs from root's"
    );
    // XFS has no userspace driver: the error names the volume, its filesystem and root.
    let o = as_nobody(&home, &["dump", c, &point, "p2/hello.txt"]);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(
        e.contains("volume p2") && e.contains("xfs") && e.contains("as root"),
        "{e}"
    );
    assert_eq!(losetup_list(), loops_before, "a loop device was attached");
    assert_clean_tmp(&home);
    assert_clean_tmp(&tmp);
}

#[test]
fn find_lists_the_points_holding_a_path_as_root_and_as_nobody() {
    let _serial = host_state();
    if !needs(&[
        "sgdisk",
        "mkfs.ext4",
        "mkfs.xfs",
        "losetup",
        "fuse2fs",
        "e2fsck",
        "setpriv",
        "fusermount3",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut h = dumpfind_disk(dir.path());
    // Point 0: no app.conf. Point 1: 100 bytes. Point 2: 2500 bytes, a later mtime, and a
    // second match for the glob.
    let p0 = h.commit(false).trim_end_matches(".raw").to_string();
    let (t1, t2) = (1_767_000_000i64, 1_767_100_000i64);
    on_p1(&h, |m| {
        write(&m.join("etc/app.conf"), &[b'a'; 100]);
        sh(&format!("touch -d @{t1} {}", s(&m.join("etc/app.conf"))));
    });
    let p1 = h.commit(false).trim_end_matches(".raw").to_string();
    on_p1(&h, |m| {
        write(&m.join("etc/app.conf"), &[b'b'; 2500]);
        write(&m.join("etc/app-extra.conf"), b"x\n");
        write(&m.join("etc/.app-hidden.conf"), b"hidden\n");
        sh(&format!("touch -d @{t2} {}", s(&m.join("etc/app.conf"))));
        sh(&format!(
            "touch -d @{t2} {}",
            s(&m.join("etc/app-extra.conf"))
        ));
    });
    let p2 = h.commit(false).trim_end_matches(".raw").to_string();
    let repo = h.repo.clone();
    let r = s(&repo);
    let loops_before = losetup_list();
    let rfc = |t: i64| cbtfs::timefmt::rfc3339(t);
    // (point, status, volume, path, size, mtime)
    type Rows = Vec<(String, String, String, String, u64, String)>;
    let rows = |json: &str| -> Rows {
        let v: Value = serde_json::from_str(json).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["point"].as_str().unwrap().to_string(),
                    r["status"].as_str().unwrap().to_string(),
                    r["volume"].as_str().unwrap_or("").to_string(),
                    r["path"].as_str().unwrap_or("").to_string(),
                    r["size"].as_u64().unwrap_or(0),
                    r["mtime"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let row = |p: &str, st: &str, path: &str, size: u64, mtime: &str| {
        (
            p.to_string(),
            st.to_string(),
            "p1".to_string(),
            path.to_string(),
            size,
            mtime.to_string(),
        )
    };
    let want: Rows = vec![
        row(&p2, "present", "etc/app-extra.conf", 2, &rfc(t2)),
        row(&p2, "present", "etc/app.conf", 2500, &rfc(t2)),
        row(&p1, "present", "etc/app.conf", 100, &rfc(t1)),
        row(&p0, "absent", "etc/app*.conf", 0, ""),
    ];
    let json = ok(&["find", r, "p1/etc/app*.conf", "--json"]);
    assert_eq!(rows(&json), want);
    // The text: one line per row, newest point first, `absent` where it is missing.
    let out = ok(&["find", r, "p1/etc/app*.conf"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines[0].starts_with("POINT"), "{out}");
    for (l, w) in lines[1..].iter().zip(&want) {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f[0], w.0, "{out}");
        assert_eq!(f[1], "p1", "{out}");
        assert_eq!(f[2], w.3, "{out}");
        if w.1 == "absent" {
            assert_eq!(f[3], "absent", "{out}");
        } else {
            assert_eq!(f[3], w.4.to_string(), "{out}");
            assert_eq!(f[4], w.5, "{out}");
            assert_eq!(f[5], "file", "{out}");
        }
    }
    // A path in every volume: as root, XFS (p2) is searched with the kernel's driver.
    let json = ok(&["find", r, "etc/app.conf", "--json"]);
    assert_eq!(
        rows(&json),
        vec![
            want[1].clone(),
            want[2].clone(),
            (
                p0.clone(),
                "absent".into(),
                String::new(),
                "etc/app.conf".into(),
                0,
                String::new()
            ),
        ]
    );
    // --since (a time or a date), --vm, --disk bound the points searched.
    let json = ok(&["find", r, "p1/etc/app.conf", "--json", "--since", &time(1)]);
    assert_eq!(rows(&json), vec![want[1].clone(), want[2].clone()]);
    let json = ok(&[
        "find",
        r,
        "p1/etc/app.conf",
        "--json",
        "--since",
        "2026-01-01",
        "--vm",
        "no-vm",
        "--disk",
        &h.vdi,
    ]);
    assert_eq!(rows(&json).len(), 3);
    let out = ok(&["find", r, "p1/etc/app.conf", "--since", "2026-01-02"]);
    assert!(out.contains("no restore point matches"), "{out}");
    let (_, e) = fails(&["find", r, "p1/etc/app.conf", "--vm", "web99"]);
    assert!(e.contains("no VM \"web99\"") && e.contains("no-vm"), "{e}");
    let (_, e) = fails(&["find", r, "p1/etc/app.conf", "--disk", "xvdz"]);
    assert!(e.contains("no disk \"xvdz\""), "{e}");
    assert_eq!(losetup_list(), loops_before);

    // As nobody: the same answer for p1; a search of every volume cannot read XFS, says so
    // on the row and fails.
    let (copy, home) = nobody_setup(dir.path(), &repo);
    if std::fs::metadata("/dev/fuse").unwrap().mode() & 0o006 != 0o006 {
        let o = as_nobody(&home, &["find", s(&copy), "p1/etc/app*.conf"]);
        assert!(!o.status.success());
        let e = text(&o);
        assert!(e.contains("/dev/fuse cannot be opened by this user"), "{e}");
        assert_eq!(e.matches("/dev/fuse cannot").count(), 1, "said once: {e}");
    }
    let _fuse = FuseOpenToAll::new();
    let o = as_nobody(&home, &["find", s(&copy), "p1/etc/app*.conf", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(rows(&String::from_utf8_lossy(&o.stdout)), want);
    let o = as_nobody(&home, &["find", s(&copy), "etc/app.conf", "--json"]);
    assert!(!o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows_p2: Vec<&Value> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["volume"] == "p2")
        .collect();
    assert_eq!(rows_p2.len(), 3, "{v}");
    for r in rows_p2 {
        assert_eq!(r["status"], "not-searched", "{r}");
        let why = r["reason"].as_str().unwrap();
        assert!(why.contains("xfs") && why.contains("as root"), "{why}");
    }
    assert!(text(&o).contains("could not be searched"), "{}", text(&o));
    assert_eq!(losetup_list(), loops_before, "a loop device was attached");
    assert_clean_tmp(&home);
}
