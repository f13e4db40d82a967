//! A mount of a repository on S3 with many points, counted in requests (not time) through a
//! counting proxy: a warm mount asks nothing but the header and listings before its first
//! listing, and a cold one fetches a set's point indexes together (in parallel batches), not
//! one after another as each point's attributes are asked. Also: the header version of a
//! repository with Object Lock.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::counting_proxy::{CountingProxy, Seen};
use crate::common::rgw::Rgw;
use crate::common::*;

const BS: usize = 65536;
/// Points in the set: more than one batch of the mount's index fetches (64).
const POINTS: u32 = 100;
/// Blocks of the disk; point i writes block i % DISK_BLOCKS.
const DISK_BLOCKS: u32 = 16;

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

    fn cmd(&self, cache: &Path) -> Command {
        let mut c = cbtfs_cmd();
        c.envs(self.rgw.env())
            .env("CBTFS_S3_ENDPOINT", &self.proxy.endpoint)
            .env("CBTFS_CACHE_DIR", cache)
            .env_remove("CBTFS_CACHE_SIZE");
        c
    }
}

/// A repository in a new bucket with one set of `POINTS` points (written through the library,
/// straight to radosgw); its URL.
fn repository_with_many_points(s3: &S3) -> String {
    use cbtfs::repo::store::Store;
    use cbtfs::repo::store::s3::{S3Config, S3Store, S3Url};
    use cbtfs::repo::{Encryption, NewPoint, Repository};
    let bucket = s3.rgw.bucket("mount-ready", false);
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
    let lock = repo.lock_exclusive("test").unwrap();
    for i in 0..POINTS {
        let mut w = repo
            .begin_point(
                &lock,
                NewPoint {
                    vdi: vdi(41),
                    disk_name: "disk".into(),
                    vm_uuid: None,
                    vm_name: Some("vm".into()),
                    time: 1_790_000_000 + i64::from(i) * 3600,
                    virtual_size: u64::from(DISK_BLOCKS) * BS as u64,
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
        TestRng::new(u64::from(i) + 1).fill(&mut block);
        w.add_block(u64::from(i % DISK_BLOCKS), &block).unwrap();
        w.commit().unwrap();
    }
    url
}

/// `cbtfs mount` (the daemon, as fstab runs it) of `url` on `mp`; unmounted when dropped.
struct Mounted(PathBuf);

impl Mounted {
    fn new(s3: &S3, cache: &Path, url: &str, mp: &Path) -> Mounted {
        let o = s3.cmd(cache).args(["mount", url, s(mp)]).bounded().unwrap();
        assert!(
            o.status.success(),
            "cbtfs mount: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Mounted(mp.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(&self.0).status();
        if !st.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// The set's directory and its points' files, oldest first (names are times).
fn point_files(mp: &Path) -> Vec<PathBuf> {
    let disk = mp.join("by-uuid").join(vdi(41));
    // By the entries' own types: following `latest.raw` would stat the newest point.
    let sets: Vec<PathBuf> = std::fs::read_dir(&disk)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.path())
        .collect();
    assert_eq!(sets.len(), 1, "{sets:?}");
    let mut points: Vec<PathBuf> = std::fs::read_dir(&sets[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with("Z.raw")
        })
        .collect();
    points.sort();
    points
}

fn pindex_gets(seen: &[Seen]) -> Vec<&Seen> {
    seen.iter()
        .filter(|s| s.is_object_get() && s.target.contains("/pindex/"))
        .collect()
}

/// Point i holds blocks 0..=i of the disk (at most all of them): its honest st_blocks.
fn st_blocks(i: usize) -> u64 {
    (i as u64 + 1).min(u64::from(DISK_BLOCKS)) * (BS as u64 / 512)
}

#[test]
fn a_cold_mount_fetches_a_sets_point_indexes_together_and_a_warm_one_only_lists() {
    use std::os::unix::fs::MetadataExt;
    if !can_mount() {
        skip("no FUSE here (needs root and /dev/fuse)");
        return;
    }
    let Some(s3) = S3::new() else { return };
    let url = repository_with_many_points(&s3);
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let mp = d.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();

    // Cold: listing the set reads manifests, never an index.
    s3.proxy.take();
    {
        let _m = Mounted::new(&s3, &cache, &url, &mp);
        let points = point_files(&mp);
        assert_eq!(points.len(), POINTS as usize);
        let seen = s3.proxy.take();
        assert!(
            pindex_gets(&seen).is_empty(),
            "indexes read to list: {seen:?}"
        );
        // The base's attributes: the whole set's indexes at once, each fetched once, several
        // in flight (a client opens more connections only for requests in parallel).
        let base = std::fs::metadata(&points[0]).unwrap();
        assert_eq!(base.blocks(), st_blocks(0));
        let seen = s3.proxy.take();
        let gets = pindex_gets(&seen);
        let mut keys: Vec<&str> = gets.iter().map(|s| s.target.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(
            (gets.len(), keys.len()),
            (POINTS as usize, POINTS as usize),
            "one GET per point index: {seen:?}"
        );
        let conns: std::collections::HashSet<u64> = gets.iter().map(|s| s.conn).collect();
        assert!(
            conns.len() > 1,
            "the indexes were fetched one after another on one connection"
        );
        // Every other point's attributes: known already, honest (its stored blocks).
        for (i, p) in points.iter().enumerate() {
            assert_eq!(
                std::fs::metadata(p).unwrap().blocks(),
                st_blocks(i),
                "{p:?}"
            );
        }
        let seen = s3.proxy.take();
        assert!(
            seen.iter().all(|s| !s.is_object_get()),
            "stats after the set's pass fetched objects: {seen:?}"
        );
    }

    // Warm: before the first listing answers, the header (its id names the cache) and
    // listings only (the bucket check, key slots, and the points twice: a listing that
    // changed while manifests were read is read again).
    s3.proxy.take();
    let _m = Mounted::new(&s3, &cache, &url, &mp);
    let points = point_files(&mp);
    assert_eq!(points.len(), POINTS as usize);
    let seen = s3.proxy.take();
    let gets: Vec<&str> = seen
        .iter()
        .filter(|s| s.is_object_get())
        .map(|s| s.target.as_str())
        .collect();
    assert_eq!(gets.len(), 1, "{seen:?}");
    assert!(gets[0].ends_with("/repo/cbtfs.repo"), "{seen:?}");
    // Listings: the bucket check, the key slots, and the points twice per scan (the mount's
    // own; the kernel's walk rescans only if it took over a second, `CbtFs::lookup`).
    let lists: Vec<&Seen> = seen.iter().filter(|s| s.is_list()).collect();
    let of = |prefix: &str| {
        lists
            .iter()
            .filter(|s| {
                s.target.contains(&format!("prefix=repo%2F{prefix}&"))
                    || s.target.ends_with(&format!("prefix=repo%2F{prefix}"))
            })
            .count()
    };
    let (points_lists, keys_lists, check) = (of("points%2F"), of("keys%2F"), of(""));
    assert!(
        points_lists >= 2 && points_lists % 2 == 0 && keys_lists == 1 && check == 1,
        "{seen:?}"
    );
    assert_eq!(
        lists.len(),
        points_lists + keys_lists + check,
        "other listings: {seen:?}"
    );
    assert_eq!(seen.len(), 1 + lists.len(), "other requests: {seen:?}");
    // And stats from the cache: no request at all.
    for (i, p) in points.iter().enumerate() {
        assert_eq!(
            std::fs::metadata(p).unwrap().blocks(),
            st_blocks(i),
            "{p:?}"
        );
    }
    let seen = s3.proxy.take();
    assert!(
        seen.iter().all(|s| !s.is_object_get()),
        "warm stats fetched objects: {seen:?}"
    );
}

/// A repository with Object Lock has header version 3, which builds that ignore Object Lock
/// (they read up to version 2) refuse; one without keeps version 2 and opens as before.
#[test]
fn an_object_lock_header_has_a_version_older_builds_refuse() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let header = |bucket: &str| {
        let (st, body) = rgw.request("GET", &format!("{bucket}/r/cbtfs.repo"), &[]);
        assert_eq!(st, 200, "{body}");
        let json = &body[..body.rfind("\ncbtfs-crc32c:").unwrap_or(body.len())];
        let v: serde_json::Value =
            serde_json::from_str(json.trim_end()).unwrap_or_else(|e| panic!("{e}: {body}"));
        (v["version"].as_u64(), v.get("object_lock").is_some())
    };
    let locked = rgw.bucket("hdr-locked", true);
    common::rgw::s3ok(
        rgw,
        &["init", &format!("s3://{locked}/r"), "--object-lock", "1"],
    );
    assert_eq!(header(&locked), (Some(3), true));
    let plain = rgw.bucket("hdr-plain", false);
    common::rgw::s3ok(rgw, &["init", &format!("s3://{plain}/r")]);
    assert_eq!(header(&plain), (Some(2), false));
    // Both open in this build.
    for b in [&locked, &plain] {
        common::rgw::s3ok(rgw, &["ls", &format!("s3://{b}/r")]);
    }
}
