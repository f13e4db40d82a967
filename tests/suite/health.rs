//! The health check without restore (`cbtfs::health`, `cbtfs fsck`, `cbtfs job check`) on guest
//! disks built with the real tools: GPT disks holding ext4, xfs, vfat, ntfs and btrfs made by
//! their mkfs, a damage planted with debugfs, crash-consistent snapshots (copied while mounted)
//! whose journals need replaying. Each disk is imported as a point; what a check must say comes
//! from the filesystems' own checkers run on the images before import, and the point's bytes
//! must be the same after the check as before.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use cbtfs::health::{CheckOptions, check_point};
use cbtfs::job::report::HealthOutcome;
use cbtfs::read::PointReader;
use cbtfs::repo::Repository;
use serde_json::Value;

/// Skip (saying why) unless we are root with FUSE and every tool is here.
fn needs(tools: &[&str]) -> bool {
    if !can_mount() {
        return false;
    }
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        skip(&format!(
            "needs {} (scripts/setup.sh installs them)",
            missing.join(", ")
        ));
        return false;
    }
    true
}

/// One partition of a test disk: its size, and how its image file is made.
struct Part {
    mib: u64,
    make: Box<dyn Fn(&Path)>,
}

fn part(mib: u64, make: impl Fn(&Path) + 'static) -> Part {
    Part {
        mib,
        make: Box::new(make),
    }
}

fn mkfs(kind: &'static str) -> impl Fn(&Path) {
    move |img: &Path| {
        let i = s(img);
        match kind {
            "ext4" => sh(&format!("mkfs.ext4 -q -F {i}")),
            "xfs" => sh(&format!("mkfs.xfs -q -f {i}")),
            "btrfs" => sh(&format!("mkfs.btrfs -q -f {i}")),
            "vfat" => sh(&format!("mkfs.vfat {i}")),
            "ntfs" => sh(&format!("mkfs.ntfs -q -F -f {i} 2>/dev/null")),
            k => panic!("no mkfs for {k}"),
        };
    }
}

/// An ext4 whose root directory's link count is wrong (7): e2fsck must find it.
fn damaged_ext4(img: &Path) {
    mkfs("ext4")(img);
    sh(&format!(
        "debugfs -w -R 'set_inode_field <2> links_count 7' {} 2>/dev/null",
        s(img)
    ));
}

/// A crash-consistent snapshot: the filesystem copied while mounted, after it wrote and synced
/// files; its journal (log) holds what is not yet written in place.
fn snapshot_while_mounted(kind: &'static str) -> impl Fn(&Path) {
    move |img: &Path| {
        mkfs(kind)(img);
        let live = img.with_extension("live");
        std::fs::rename(img, &live).unwrap();
        let mp = tempfile::tempdir().unwrap();
        sh(&format!(
            "mount -o loop -t {kind} {} {}",
            s(&live),
            s(mp.path())
        ));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for i in 0..40 {
                std::fs::write(mp.path().join(format!("f{i}")), format!("file {i}\n")).unwrap();
            }
            std::fs::create_dir(mp.path().join("dir")).unwrap();
            sh("sync");
            sh(&format!("cp --sparse=always {} {}", s(&live), s(img)));
        }));
        sh(&format!("umount {}", s(mp.path())));
        r.unwrap();
        std::fs::remove_file(&live).unwrap();
    }
}

/// A FAT32 marked dirty, as Linux leaves it while mounted (the boot sector's state byte, 65).
fn dirty_fat32(img: &Path) {
    sh(&format!("mkfs.vfat -F 32 {}", s(img)));
    let mut b = std::fs::read(img).unwrap();
    b[65] |= 1;
    std::fs::write(img, b).unwrap();
    // fsck.vfat alone calls it an error.
    let o = std::process::Command::new("fsck.vfat")
        .arg("-n")
        .arg(img)
        .bounded()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Dirty bit is set"));
}

/// A GPT disk of `parts` (p1, p2, ... in order), each made by its function in its own image and
/// copied into place.
fn make_disk(dir: &Path, name: &str, parts: &[Part]) -> PathBuf {
    let disk = dir.join(format!("{name}.img"));
    let total: u64 = parts.iter().map(|p| p.mib).sum::<u64>() + 2;
    sh(&format!("truncate -s {total}M {}", s(&disk)));
    let table: String = parts
        .iter()
        .map(|p| format!("size={}MiB\\n", p.mib))
        .collect();
    sh(&format!(
        "printf 'label: gpt\\n{table}' | sfdisk -q {}",
        s(&disk)
    ));
    let layout: Value = serde_json::from_str(&sh(&format!("sfdisk -J {}", s(&disk)))).unwrap();
    let found = layout["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(found.len(), parts.len());
    for (i, (p, f)) in parts.iter().zip(found).enumerate() {
        let img = dir.join(format!("{name}-p{}.img", i + 1));
        sh(&format!("truncate -s {}M {}", p.mib, s(&img)));
        (p.make)(&img);
        sh(&format!(
            "dd if={} of={} bs=512 seek={} conv=notrunc,sparse status=none",
            s(&img),
            s(&disk),
            f["start"].as_u64().unwrap()
        ));
        std::fs::remove_file(&img).unwrap();
    }
    disk
}

/// Import `img` as disk `n` of VM `vm` into `repo` (made if missing).
fn import(repo: &Path, img: &Path, n: u32, vm: &str) {
    if !repo.exists() {
        ok(&["init", s(repo)]);
    }
    ok(&[
        "import",
        s(repo),
        "--vdi",
        &vdi(n),
        "--vm-name",
        vm,
        "--raw",
        s(img),
        "--time",
        &time(u64::from(n)),
    ]);
}

/// SHA-256 of the whole newest point of disk `n`, read through the library.
fn point_digest(r: &Repository, n: u32) -> String {
    let d = r.disk(&vdi(n)).unwrap();
    let set = d.sets.last().unwrap();
    let reader = PointReader::open(r, set, set.points.len() as u32 - 1).unwrap();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < reader.size() {
        let len = (reader.size() - at).min(buf.len() as u64) as usize;
        reader.read_at(&mut buf[..len], at).unwrap();
        ctx.update(&buf[..len]);
        at += len as u64;
    }
    hex(ctx.finish().as_ref())
}

fn file_digest(p: &Path) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, &std::fs::read(p).unwrap()).as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn check_newest(r: &Repository, n: u32, opts: &CheckOptions) -> HealthOutcome {
    let d = r.disk(&vdi(n)).unwrap();
    let set = d.sets.last().unwrap();
    check_point(r, set, set.points.len() as u32 - 1, opts).unwrap()
}

/// volume → (filesystem, state)
fn states(h: &HealthOutcome) -> BTreeMap<String, (String, String)> {
    h.volumes
        .iter()
        .map(|v| (v.volume.clone(), (v.filesystem.clone(), v.state.clone())))
        .collect()
}

fn want(list: &[(&str, &str, &str)]) -> BTreeMap<String, (String, String)> {
    list.iter()
        .map(|(v, f, st)| (v.to_string(), (f.to_string(), st.to_string())))
        .collect()
}

/// What the host holds of checks: loop devices and mounts naming an overlay.
fn leftovers() -> String {
    let loops = sh("losetup -a");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    loops
        .lines()
        .chain(mounts.lines())
        .filter(|l| l.contains("cbtfs-health"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn private_tmp(dir: &Path) -> CheckOptions {
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    CheckOptions {
        tmp_dir: tmp,
        ..CheckOptions::default()
    }
}

#[test]
fn every_filesystem_checked_a_planted_damage_found_and_the_point_unchanged() {
    let _serial = host_state();
    if !needs(&[
        "sfdisk",
        "mkfs.ext4",
        "mkfs.xfs",
        "mkfs.vfat",
        "mkfs.ntfs",
        "mkfs.btrfs",
        "debugfs",
        "e2fsck",
        "xfs_repair",
        "fsck.vfat",
        "ntfsfix",
        "btrfs",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(
        dir.path(),
        "all",
        &[
            part(64, mkfs("ext4")),
            part(320, mkfs("xfs")),
            part(32, mkfs("vfat")),
            part(32, mkfs("ntfs")),
            part(150, mkfs("btrfs")),
            part(64, damaged_ext4),
        ],
    );
    let disk_sum = file_digest(&disk);
    let repo = dir.path().join("repo");
    import(&repo, &disk, 1, "web01");
    let r = open_repo(&repo);
    assert_eq!(point_digest(&r, 1), disk_sum);
    let before = repo_objects(&repo);
    let opts = private_tmp(dir.path());

    let h = check_newest(&r, 1, &opts);
    assert_eq!(
        states(&h),
        want(&[
            ("p1", "ext4", "clean"),
            ("p2", "xfs", "clean"),
            ("p3", "vfat", "clean"),
            ("p4", "ntfs", "clean"),
            ("p5", "btrfs", "clean"),
            ("p6", "ext4", "damaged"),
        ]),
        "{h:#?}"
    );
    assert_eq!(h.state, "damaged");
    let p6 = h.volumes.iter().find(|v| v.volume == "p6").unwrap();
    assert_eq!(p6.checker, "e2fsck -fn");
    // The checker's own words, as it says them on the image itself.
    assert!(
        p6.detail.contains("Inode 2 ref count is 7"),
        "{}",
        p6.detail
    );
    let checkers: Vec<&str> = h.volumes.iter().map(|v| v.checker.as_str()).collect();
    assert_eq!(
        checkers,
        [
            "e2fsck -fn",
            "xfs_repair -n -f",
            "fsck.vfat -n",
            "ntfsfix -n",
            "btrfs check --readonly",
            "e2fsck -fn"
        ]
    );

    // Several checks at once in one process: the same verdicts, nothing shared.
    let r = Arc::new(r);
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (r, opts) = (r.clone(), opts.clone());
            std::thread::spawn(move || states(&check_newest(&r, 1, &opts)))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), states(&h));
    }

    // Nothing changed, nothing left behind.
    assert_eq!(point_digest(&r, 1), disk_sum);
    assert_eq!(repo_objects(&repo), before);
    assert_eq!(leftovers(), "");
    assert_eq!(std::fs::read_dir(&opts.tmp_dir).unwrap().count(), 0);
}

#[test]
fn journals_of_a_crash_consistent_snapshot_are_replayed_into_the_overlay() {
    let _serial = host_state();
    if !needs(&[
        "sfdisk",
        "mkfs.ext4",
        "mkfs.xfs",
        "dumpe2fs",
        "e2fsck",
        "xfs_repair",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(
        dir.path(),
        "dirty",
        &[
            part(64, snapshot_while_mounted("ext4")),
            part(320, snapshot_while_mounted("xfs")),
            part(64, dirty_fat32),
        ],
    );
    // The images really need their journals: e2fsck sees the flag, xfs_repair the log.
    let start = |n: usize| {
        let layout: Value = serde_json::from_str(&sh(&format!("sfdisk -J {}", s(&disk)))).unwrap();
        layout["partitiontable"]["partitions"][n]["start"]
            .as_u64()
            .unwrap()
    };
    let p1 = dir.path().join("p1.img");
    sh(&format!(
        "dd if={} of={} bs=512 skip={} count=131072 status=none",
        s(&disk),
        s(&p1),
        start(0)
    ));
    assert!(
        sh(&format!("dumpe2fs -h {} 2>/dev/null", s(&p1))).contains("needs_recovery"),
        "the snapshot must need journal recovery"
    );
    let disk_sum = file_digest(&disk);
    let repo = dir.path().join("repo");
    import(&repo, &disk, 2, "db01");
    let r = open_repo(&repo);
    let opts = private_tmp(dir.path());
    let h = check_newest(&r, 2, &opts);
    assert_eq!(
        states(&h),
        want(&[
            ("p1", "ext4", "journal"),
            ("p2", "xfs", "journal"),
            ("p3", "vfat", "journal")
        ]),
        "{h:#?}"
    );
    assert_eq!(h.state, "journal");
    assert_eq!(
        h.volumes[0].checker,
        "e2fsck -fn (after e2fsck -E journal_only -y)"
    );
    assert_eq!(
        h.volumes[1].checker,
        "xfs_repair -n -f (after a log replay by a kernel mount)"
    );
    assert_eq!(
        h.volumes[2].checker,
        "fsck.vfat -n (after clearing the dirty mark)"
    );
    // The replays went to the overlay only.
    assert_eq!(point_digest(&r, 2), disk_sum);
    assert_eq!(leftovers(), "");
    assert_eq!(std::fs::read_dir(&opts.tmp_dir).unwrap().count(), 0);
}

#[test]
fn a_missing_checker_leaves_the_volume_unchecked_saying_why() {
    let _serial = host_state();
    if !needs(&["sfdisk", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), "one", &[part(32, mkfs("ext4"))]);
    let repo = dir.path().join("repo");
    import(&repo, &disk, 3, "web01");
    let r = open_repo(&repo);
    let opts = CheckOptions {
        search_path: Some(OsString::from("/nonexistent")),
        ..private_tmp(dir.path())
    };
    let h = check_newest(&r, 3, &opts);
    assert_eq!(states(&h), want(&[("p1", "ext4", "unchecked")]));
    assert_eq!(h.state, "unchecked");
    assert_eq!(
        h.volumes[0].detail,
        "e2fsck is not installed: install the `e2fsprogs` package (scripts/setup.sh does)"
    );
    // With a checker that hangs: stopped at the time-out, unchecked with the reason.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let fake = bin.join("e2fsck");
    // The checkers run with the search path as their PATH: sleep by its full path.
    let sleep = sh("command -v sleep");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho checking\nexec {} 60\n", sleep.trim()),
    )
    .unwrap();
    sh(&format!("chmod 755 {}", s(&fake)));
    let opts = CheckOptions {
        search_path: Some(bin.into_os_string()),
        timeout: Duration::from_millis(500),
        ..private_tmp(dir.path())
    };
    let h = check_newest(&r, 3, &opts);
    assert_eq!(states(&h), want(&[("p1", "ext4", "unchecked")]));
    assert_eq!(
        h.volumes[0].detail,
        "the checker did not finish within 0.5 s and was stopped\nchecking"
    );
    assert_eq!(leftovers(), "");
    assert_eq!(std::fs::read_dir(&opts.tmp_dir).unwrap().count(), 0);
}

fn write_config(dir: &Path, repo: &Path) -> PathBuf {
    let cfg = dir.join("cbtfs.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[host.xs1]
url = "https://xs1.example"
user = "root"
password_file = "/nonexistent/xs1.password"

[repository.main]
path = "{}"
key_file = "{}"

[job.web]
host = "xs1"
repository = "main"
vms = ["web*"]

[job.tagged]
host = "xs1"
repository = "main"
vms = ["tag:prod"]
exclude = ["db*"]
"#,
            repo.display(),
            key_file().display()
        ),
    )
    .unwrap();
    cfg
}

fn job_check(cfg: &Path, job: &str, path: Option<&str>) -> (i32, Value) {
    let mut c = cbtfs_cmd();
    c.env_remove("CBTFS_KEY_FILE")
        .args(["job", "check", job, "--config", s(cfg), "--json"]);
    if let Some(p) = path {
        c.env("PATH", p);
    }
    let o = c.bounded().unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().unwrap(), v)
}

/// point → worst state, volume states
fn point_states(v: &Value) -> BTreeMap<String, (String, Vec<String>)> {
    v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let h = &p["health"];
            (
                format!(
                    "{}/{}",
                    p["vm"].as_str().unwrap(),
                    p["disk"].as_str().unwrap()
                ),
                (
                    h["state"].as_str().unwrap().to_string(),
                    h["volumes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v["state"].as_str().unwrap().to_string())
                        .collect(),
                ),
            )
        })
        .collect()
}

#[test]
fn job_check_selects_the_jobs_disks_and_exits_by_the_worst() {
    let _serial = host_state();
    if !needs(&["sfdisk", "mkfs.ext4", "debugfs", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let good = make_disk(dir.path(), "good", &[part(32, mkfs("ext4"))]);
    let bad = make_disk(
        dir.path(),
        "bad",
        &[part(32, mkfs("ext4")), part(32, damaged_ext4)],
    );
    import(&repo, &good, 11, "web01");
    import(&repo, &bad, 12, "web02");
    import(&repo, &good, 13, "db01");
    let disk = |n: u32| format!("disk-{}", &vdi(n)[..8]);
    let cfg = write_config(dir.path(), &repo);

    // By name: web01 and web02, not db01; web02's second partition is damaged: exit 3.
    let (code, v) = job_check(&cfg, "web", None);
    assert_eq!(code, 3, "{v:#}");
    assert_eq!(v["outcome"], "partial");
    assert_eq!(v["job"], "web");
    let mut expected = BTreeMap::new();
    expected.insert(
        format!("web01/{}", disk(11)),
        ("clean".to_string(), vec!["clean".to_string()]),
    );
    expected.insert(
        format!("web02/{}", disk(12)),
        (
            "damaged".to_string(),
            vec!["clean".to_string(), "damaged".to_string()],
        ),
    );
    assert_eq!(point_states(&v), expected);
    assert_eq!(v["notes"].as_array().unwrap().len(), 0);

    // By tag, which only the host knows: every disk less the excludes by name, said so.
    let (code, v) = job_check(&cfg, "tagged", None);
    assert_eq!(code, 3);
    assert_eq!(point_states(&v), expected);
    let notes = v["notes"].to_string();
    assert!(notes.contains("tag:prod"), "{notes}");

    // Without the checker on PATH: nothing checked, exit 4, and the report says why.
    let (code, v) = job_check(&cfg, "web", Some("/nonexistent"));
    assert_eq!(code, 4, "{v:#}");
    assert_eq!(v["outcome"], "failed");
    for p in v["points"].as_array().unwrap() {
        assert_eq!(p["health"]["state"], "unchecked");
        for vol in p["health"]["volumes"].as_array().unwrap() {
            assert_eq!(vol["state"], "unchecked");
            assert!(
                vol["detail"]
                    .as_str()
                    .unwrap()
                    .starts_with("e2fsck is not installed"),
                "{vol}"
            );
        }
    }
    // The human report names the state and the checker of each volume.
    let o = cbtfs_cmd()
        .env_remove("CBTFS_KEY_FILE")
        .args(["job", "check", "web", "--config", s(&cfg)])
        .bounded()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("web02/{}/", disk(12)))
            && text.contains("  p2           ext4   damaged   e2fsck -fn")
            && text.contains("2 points in "),
        "{text}"
    );
    assert_eq!(leftovers(), "");
}

#[test]
fn fsck_of_a_256_mib_disk_with_one_ext4() {
    let _serial = host_state();
    if !needs(&["sfdisk", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let mut rng = TestRng::new(20);
    for i in 0..200 {
        let mut b = vec![0u8; 1000 + (rng.below(64) as usize) * 1024];
        rng.fill(&mut b);
        std::fs::write(files.join(format!("f{i:03}")), b).unwrap();
    }
    let src = files.clone();
    let disk = make_disk(
        dir.path(),
        "ext",
        &[part(254, move |img: &Path| {
            sh(&format!("mkfs.ext4 -q -F -d {} {}", s(&src), s(img)));
        })],
    );
    let repo = dir.path().join("repo");
    import(&repo, &disk, 21, "web01");
    let point = point_paths(&repo).pop().unwrap();
    let o = cbtfs(&["fsck", s(&repo), &point, "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["outcome"], "ok");
    let h = &v["points"][0]["health"];
    assert_eq!(h["state"], "clean");
    assert_eq!(h["volumes"][0]["volume"], "p1");
    // e2fsck's summary line: the 200 files plus the 11 inodes of a new ext4.
    let detail = h["volumes"][0]["detail"].as_str().unwrap();
    assert!(detail.contains(": 211/"), "{detail}");
    eprintln!(
        "health check of a 256 MiB disk with one ext4: {:.3} s per point",
        h["seconds"].as_f64().unwrap()
    );
    assert_eq!(leftovers(), "");
}

#[test]
fn a_check_killed_midway_is_cleaned_up_by_the_next() {
    let _serial = host_state();
    if !needs(&["sfdisk", "mkfs.ext4", "e2fsck"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), "one", &[part(32, mkfs("ext4"))]);
    let repo = dir.path().join("repo");
    import(&repo, &disk, 4, "web01");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    // A checker that says where it is and waits.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let pid_file = dir.path().join("checker.pid");
    std::fs::write(
        bin.join("e2fsck"),
        format!(
            "#!/bin/sh\necho $$ > {}\nexec {} 60\n",
            s(&pid_file),
            sh("command -v sleep").trim()
        ),
    )
    .unwrap();
    sh(&format!("chmod 755 {}", s(&bin.join("e2fsck"))));
    let mut child = cbtfs_cmd()
        .args(["fsck", s(&repo)])
        .env("TMPDIR", &tmp)
        .env("PATH", &bin)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the checker to start", Duration::from_secs(60), || {
        std::fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n'))
    });
    assert!(
        leftovers().contains("cbtfs-health"),
        "the overlay is mounted"
    );
    child.kill().unwrap();
    child.bounded().unwrap();
    let checker: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: the checker is the process this test's script started (it wrote its own pid).
    unsafe { libc::kill(checker, libc::SIGKILL) };
    // The killed check's overlay is left behind: the next check cleans it up.
    let o = cbtfs_cmd()
        .args(["fsck", s(&repo), "--json"])
        .env("TMPDIR", &tmp)
        .bounded()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(leftovers(), "");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
}
