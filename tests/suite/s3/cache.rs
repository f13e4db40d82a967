//! The local cache of repositories on S3 (`repo::store::cache`), against a real radosgw, with
//! a counting proxy between cbtfs and it: what a warm cache saves is counted in requests that
//! reached the server.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::counting_proxy::{CountingProxy, Seen};
use crate::common::rgw::Rgw;
use crate::common::*;

const BS: usize = 65536;

/// cbtfs against one radosgw through a counting proxy, with its caches in `cache`.
struct S3 {
    rgw: &'static Rgw,
    proxy: CountingProxy,
}

impl S3 {
    fn new() -> Option<S3> {
        let rgw = common::rgw::rgw()?;
        Some(S3 {
            rgw,
            proxy: CountingProxy::start(&rgw.endpoint),
        })
    }

    fn cmd(&self, cache: &Path) -> std::process::Command {
        let mut c = cbtfs_cmd();
        c.envs(self.rgw.env())
            .env("CBTFS_S3_ENDPOINT", &self.proxy.endpoint)
            .env("CBTFS_CACHE_DIR", cache)
            .env_remove("CBTFS_CACHE_SIZE");
        c
    }

    fn run(&self, cache: &Path, args: &[&str]) -> Output {
        self.cmd(cache).args(args).bounded().unwrap()
    }

    fn ok(&self, cache: &Path, args: &[&str]) -> String {
        let o = self.run(cache, args);
        assert!(
            o.status.success(),
            "cbtfs {args:?}: {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Requests seen since the last call.
    fn seen(&self) -> Vec<Seen> {
        self.proxy.take()
    }
}

fn object_gets(seen: &[Seen]) -> Vec<&Seen> {
    seen.iter().filter(|s| s.is_object_get()).collect()
}

fn pack_gets(seen: &[Seen]) -> usize {
    object_gets(seen)
        .iter()
        .filter(|s| s.target.contains("/packs/"))
        .count()
}

/// The one repository directory below a cache base.
fn repo_cache(base: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(base)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A random disk image of `blocks` blocks with some zero blocks.
fn image(blocks: usize, seed: u64) -> Vec<u8> {
    let mut img = vec![0u8; blocks * BS];
    let mut rng = TestRng::new(seed);
    for b in 0..blocks {
        if rng.below(5) != 0 {
            rng.fill(&mut img[b * BS..(b + 1) * BS]);
        }
    }
    img
}

#[test]
fn a_warm_ls_gets_nothing_but_the_header_and_the_cache_is_private() {
    let Some(s3) = S3::new() else { return };
    let bucket = s3.rgw.bucket("cache-ls", false);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let writer_cache = dp.join("writer-cache");
    let r = &format!("s3://{bucket}/repo");
    let v = vdi(31);
    let base = image(24, 310);
    let mut day2 = base.clone();
    TestRng::new(311).fill(&mut day2[3 * BS..4 * BS]);
    std::fs::write(dp.join("base.img"), &base).unwrap();
    std::fs::write(dp.join("day2.img"), &day2).unwrap();
    write_bitmap(dp, "day2.b64", &[3], 24);
    s3.ok(&writer_cache, &["init", r]);
    let base_img = dp.join("base.img");
    s3.ok(
        &writer_cache,
        &[
            "import",
            r,
            "--vdi",
            &v,
            "--raw",
            s(&base_img),
            "--time",
            &time(0),
        ],
    );
    let (day2_img, day2_bm) = (dp.join("day2.img"), dp.join("day2.b64"));
    s3.ok(
        &writer_cache,
        &[
            "import",
            r,
            "--vdi",
            &v,
            "--raw",
            s(&day2_img),
            "--bitmap",
            s(&day2_bm),
            "--time",
            &time(1),
        ],
    );

    // Another machine's empty cache: the first ls fetches manifests and the key slot.
    let cache = dp.join("cache");
    s3.seen();
    let cold = s3.ok(&cache, &["ls", r]);
    let seen = s3.seen();
    let gets = object_gets(&seen);
    assert!(
        gets.iter()
            .filter(|g| g.target.contains("/points/"))
            .count()
            >= 2,
        "{seen:?}"
    );
    assert!(gets.iter().any(|g| g.target.contains("/keys/")), "{seen:?}");
    assert!(cold.contains(&time(0)) && cold.contains(&time(1)), "{cold}");

    // Warm: the same answer, listings, and no GET but the header's (it names the repository,
    // so which cache to trust).
    for _ in 0..2 {
        let warm = s3.ok(&cache, &["ls", r]);
        assert_eq!(warm, cold);
        let seen = s3.seen();
        let gets = object_gets(&seen);
        assert!(
            gets.iter().all(|g| g.target.ends_with("/repo/cbtfs.repo")),
            "a warm ls fetched objects: {gets:?}"
        );
        assert!(gets.len() <= 2, "{gets:?}");
        assert!(seen.iter().any(|s| s.is_list()), "{seen:?}");
    }

    // Private: directories 0700, files 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let rc = repo_cache(&cache);
    let files = files_under(&rc);
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("/store/meta/points/")),
        "{files:?}"
    );
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
        let mut p = f.parent().unwrap();
        while p != cache {
            assert_eq!(mode(p), 0o700, "{}", p.display());
            p = p.parent().unwrap();
        }
    }

    // A manifest deleted (a prune elsewhere): the next ls no longer shows it, and its copy
    // is dropped from the cache.
    s3.ok(&writer_cache, &["prune", r, "--keep-last", "1"]);
    let after = s3.ok(&cache, &["ls", r]);
    assert!(
        !after.contains(&time(0)) && after.contains(&time(1)),
        "{after}"
    );
    let manifests = files_under(&rc.join("store/meta/points"));
    assert_eq!(manifests.len(), 1, "{manifests:?}");
}

#[test]
fn pack_ranges_are_cached_within_cache_size_and_damage_is_refetched() {
    let Some(s3) = S3::new() else { return };
    let bucket = s3.rgw.bucket("cache-ranges", false);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let r = &format!("s3://{bucket}/repo");
    let v = vdi(32);
    let img = image(160, 320);
    let img_path = dp.join("img");
    std::fs::write(&img_path, &img).unwrap();
    let setup_cache = dp.join("setup");
    s3.ok(&setup_cache, &["init", r]);
    s3.ok(
        &setup_cache,
        &[
            "import",
            r,
            "--vdi",
            &v,
            "--raw",
            s(&img_path),
            "--time",
            &time(0),
        ],
    );
    let out = dp.join("out");
    let point = format!("by-uuid/{v}/latest");
    let export = |cache: &Path, extra: &[&str]| {
        let _ = std::fs::remove_file(&out);
        let mut args = vec!["export", r, &point, s(&out)];
        args.extend(extra);
        s3.ok(cache, &args);
        assert!(std::fs::read(&out).unwrap() == img, "the export differs");
    };

    // A small budget: the export is exact and the cache stays within it.
    let small = dp.join("small");
    export(&small, &["--cache-size", "2M"]);
    let ranges = repo_cache(&small).join("store/ranges");
    let total: u64 = files_under(&ranges)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(total > 0 && total <= 2 << 20, "{total} bytes cached");

    // A budget that holds the point: the second export fetches no pack range.
    let big = dp.join("big");
    s3.seen();
    export(&big, &[]);
    let first = pack_gets(&s3.seen());
    assert!(first > 0);
    export(&big, &[]);
    assert_eq!(
        pack_gets(&s3.seen()),
        0,
        "a warm export fetched pack ranges"
    );

    // Damage: a range file cut short (a killed process), one with a byte flipped, a
    // manifest's copy cut short. Every read stays exact; just those are fetched again.
    let rc = repo_cache(&big);
    let files = files_under(&rc.join("store/ranges"));
    assert!(files.len() >= 2, "{files:?}");
    let cut = &files[0];
    let len = std::fs::metadata(cut).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(cut)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let flipped = &files[1];
    let mut bytes = std::fs::read(flipped).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(flipped, &bytes).unwrap();
    let manifests = files_under(&rc.join("store/meta/points"));
    assert_eq!(manifests.len(), 1);
    let mlen = std::fs::metadata(&manifests[0]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&manifests[0])
        .unwrap()
        .set_len(mlen - 1)
        .unwrap();
    s3.seen();
    export(&big, &[]);
    let seen = s3.seen();
    assert_eq!(pack_gets(&seen), 2, "{seen:?}");
    assert_eq!(
        object_gets(&seen)
            .iter()
            .filter(|g| g.target.contains("/points/"))
            .count(),
        1,
        "{seen:?}"
    );
    // Whole again.
    export(&big, &[]);
    assert_eq!(pack_gets(&s3.seen()), 0);
    let ls = s3.ok(&big, &["ls", r]);
    assert!(ls.contains(&time(0).replace(['-', ':'], "")), "{ls}");
}

/// `cbtfs mount -f` with the S3 environment; unmounted (SIGTERM) when dropped.
struct S3Mount {
    child: Option<Child>,
}

impl S3Mount {
    fn new(s3: &S3, cache: &Path, repo: &str, mp: &Path, opts: &str) -> S3Mount {
        let log = mp.with_extension("log");
        let mut child = s3
            .cmd(Path::new("/nonexistent-cache-base"))
            .env_remove("CBTFS_CACHE_DIR")
            .args(["mount", "-f", repo, s(mp), "-o"])
            .arg(format!("cache_dir={},{opts}", cache.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while cbtfs::mount::mounted_fstype(mp).is_none() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "cbtfs mount exited ({st}): {}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            assert!(start.elapsed() < Duration::from_secs(30), "mount not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        S3Mount { child: Some(child) }
    }
}

impl Drop for S3Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill with the pid of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[test]
fn a_point_read_through_the_mount_equals_the_disk_with_a_cold_and_a_warm_cache() {
    if !can_mount() {
        skip("no FUSE here (needs root and /dev/fuse)");
        return;
    }
    let Some(s3) = S3::new() else { return };
    let bucket = s3.rgw.bucket("cache-mount", false);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let r = &format!("s3://{bucket}/repo");
    let v = vdi(33);
    // 24 MiB: more than the read-ahead window, so the prefetcher's parallel reads run.
    let base = image(384, 330);
    let mut day2 = base.clone();
    TestRng::new(331).fill(&mut day2[100 * BS..140 * BS]);
    std::fs::write(dp.join("base.img"), &base).unwrap();
    std::fs::write(dp.join("day2.img"), &day2).unwrap();
    write_bitmap(dp, "day2.b64", &(100..140).collect::<Vec<u64>>(), 384);
    let setup = dp.join("setup");
    s3.ok(&setup, &["init", r]);
    let base_img = dp.join("base.img");
    s3.ok(
        &setup,
        &[
            "import",
            r,
            "--vdi",
            &v,
            "--raw",
            s(&base_img),
            "--time",
            &time(0),
        ],
    );
    let (day2_img, day2_bm) = (dp.join("day2.img"), dp.join("day2.b64"));
    s3.ok(
        &setup,
        &[
            "import",
            r,
            "--vdi",
            &v,
            "--raw",
            s(&day2_img),
            "--bitmap",
            s(&day2_bm),
            "--time",
            &time(1),
        ],
    );
    let cache = dp.join("cache");
    let mp = dp.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    for round in ["cold", "warm"] {
        s3.seen();
        let m = S3Mount::new(&s3, &cache, r, &mp, "cache_size=256M");
        let dir = mp
            .join("by-uuid")
            .join(&v)
            .join(time(0).replace(['-', ':'], ""));
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".raw") && !n.starts_with("latest"))
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        let got0 = std::fs::read(dir.join(&names[0])).unwrap();
        let got1 = std::fs::read(dir.join(&names[1])).unwrap();
        drop(m);
        assert!(
            got0 == base,
            "{round}: the base read through the mount differs"
        );
        assert!(
            got1 == day2,
            "{round}: day 2 read through the mount differs"
        );
        let seen = s3.seen();
        let packs = pack_gets(&seen);
        if round == "cold" {
            assert!(packs > 0, "{seen:?}");
            // Ranged GETs in parallel (the read-ahead's threads): the client needed several
            // connections at once for them.
            let conns: std::collections::BTreeSet<u64> = object_gets(&seen)
                .iter()
                .filter(|g| g.target.contains("/packs/"))
                .map(|g| g.conn)
                .collect();
            assert!(conns.len() >= 4, "pack ranges came one at a time: {seen:?}");
            assert!(
                repo_cache(&cache)
                    .join("store/ranges")
                    .read_dir()
                    .unwrap()
                    .count()
                    > 0,
                "the mount's cache_dir= was not used"
            );
        } else {
            assert_eq!(packs, 0, "a warm mount fetched pack ranges: {seen:?}");
            let gets = object_gets(&seen);
            assert!(
                gets.iter().all(|g| g.target.ends_with("/repo/cbtfs.repo")),
                "a warm mount fetched objects: {gets:?}"
            );
        }
    }
}

/// Figures for the issue (not a test of correctness; run by hand with `--ignored
/// --nocapture`): a mount of an S3 repository with 1,000 points, empty and warm cache.
#[test]
#[ignore]
fn figure_mount_ready_with_1000_points() {
    use cbtfs::repo::store::Store;
    use cbtfs::repo::store::s3::{S3Config, S3Store, S3Url};
    use cbtfs::repo::{Encryption, NewPoint, Repository};
    if !can_mount() {
        skip("no FUSE here (needs root and /dev/fuse)");
        return;
    }
    let Some(s3) = S3::new() else { return };
    let bucket = s3.rgw.bucket("cache-1000", false);
    let url = format!("s3://{bucket}/repo");
    let cfg = S3Config::new(
        Some(s3.rgw.endpoint.clone()),
        &s3.rgw.region,
        &s3.rgw.access_key,
        &s3.rgw.secret_key,
    );
    let store: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(S3Store::new(S3Url::parse(&url).unwrap(), cfg).unwrap());
    let repo = Repository::init_in(store, Path::new(&url), &Encryption::Secret(secret())).unwrap();
    let lock = repo.lock_exclusive("figure").unwrap();
    let started = Instant::now();
    let n: u32 = 1000;
    for i in 0..n {
        let mut w = repo
            .begin_point(
                &lock,
                NewPoint {
                    vdi: vdi(34),
                    disk_name: "disk".into(),
                    vm_uuid: None,
                    vm_name: Some("vm".into()),
                    time: 1_790_000_000 + i64::from(i) * 3600,
                    virtual_size: 16 * BS as u64,
                    source: "test".into(),
                    new_set: i == 0,
                    snapshot: None,
                    vm_metadata: None,
                    vdi_type: None,
                    vm_run: None,
                },
            )
            .unwrap();
        let mut block = vec![0u8; BS];
        TestRng::new(u64::from(i)).fill(&mut block);
        w.add_block(u64::from(i % 16), &block).unwrap();
        w.commit().unwrap();
    }
    drop(lock);
    println!("{n} points written in {:?}", started.elapsed());
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let mp = d.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    for round in ["empty", "warm", "warm"] {
        s3.seen();
        let started = Instant::now();
        // The daemon: `cbtfs mount` returns once the mount is ready.
        let o = s3
            .cmd(&cache)
            .args(["mount", &url, s(&mp)])
            .bounded()
            .unwrap();
        let took = started.elapsed();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // The set's directory: its points and latest.raw.
        let names = std::fs::read_dir(mp.join("by-uuid").join(vdi(34)))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .map(|p| std::fs::read_dir(p).unwrap().count())
            .sum::<usize>();
        let seen = s3.seen();
        let st = std::process::Command::new("umount")
            .arg(&mp)
            .status()
            .unwrap();
        assert!(st.success());
        println!(
            "mount ready, {round} cache: {took:?} ({} requests: {} object GETs, {} LISTs); {names} entries",
            seen.len(),
            object_gets(&seen).len(),
            seen.iter().filter(|s| s.is_list()).count()
        );
    }
}
