//! Repositories on S3, against a real radosgw (tests/suite/common/rgw.rs starts one per process).

use crate::common;

use std::io;
use std::time::{Duration, Instant};

use crate::common::rgw::{Rgw, s3cbtfs, s3ok};
use crate::common::*;
use cbtfs::repo::store::s3::{S3Config, S3Store, S3Url};
use cbtfs::repo::store::{LockError, Store};

#[test]
fn the_engine_serves_s3_with_object_lock_buckets() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let b = rgw.bucket("engine", false);
    let (code, body) = rgw.request_with("PUT", &format!("{b}/hello"), &[], b"world");
    assert_eq!(code, 200, "{body}");
    let (code, body) = rgw.request("GET", &format!("{b}/hello"), &[]);
    assert_eq!((code, body.as_str()), (200, "world"));
    // Object Lock needs versioning: a bucket made with it reports both.
    let locked = rgw.bucket("engine-locked", true);
    let (code, body) = rgw.request("GET", &format!("{locked}?object-lock="), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("<ObjectLockEnabled>Enabled</ObjectLockEnabled>"),
        "{body}"
    );
    let (code, body) = rgw.request("GET", &format!("{locked}?versioning="), &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("<Status>Enabled</Status>"), "{body}");
}

fn config(rgw: &Rgw) -> S3Config {
    S3Config::new(
        Some(rgw.endpoint.clone()),
        &rgw.region,
        &rgw.access_key,
        &rgw.secret_key,
    )
}

fn store_in(bucket: &str, cfg: S3Config) -> S3Store {
    S3Store::new(S3Url::parse(&format!("s3://{bucket}/repo")).unwrap(), cfg).unwrap()
}

#[test]
fn s3_store_keeps_the_store_contract() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("contract", false);
    let s = store_in(&bucket, config(rgw));
    s.check().unwrap();
    // Create-only: the second put of a key is refused and the first bytes stay.
    s.put("points/a.1", b"first").unwrap();
    let e = s.put("points/a.1", b"second").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("s3://{bucket}/repo/points/a.1")),
        "{e}"
    );
    assert_eq!(s.get("points/a.1").unwrap(), b"first");
    s.put("empty", b"").unwrap();
    assert_eq!(s.get("empty").unwrap(), b"");
    // Ranges.
    let bytes: Vec<u8> = (0..100_000u32)
        .map(|i| ((i * 7) ^ (i >> 9)) as u8)
        .collect();
    s.put("packs/3f/3f00", &bytes).unwrap();
    let mut buf = vec![0u8; 1000];
    s.get_range("packs/3f/3f00", 12_345, &mut buf).unwrap();
    assert!(buf == bytes[12_345..13_345]);
    s.get_range("packs/3f/3f00", 99_000, &mut buf).unwrap();
    assert!(buf == bytes[99_000..]);
    s.get_range("packs/3f/3f00", 100_000, &mut []).unwrap();
    for at in [99_001, 100_000, 200_000, u64::MAX - 10] {
        let e = s.get_range("packs/3f/3f00", at, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "at {at}: {e}");
    }
    let e = s.get_range("packs/3f/3f00", 100_001, &mut []).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    let e = s.get_range("absent", 0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    assert_eq!(s.get("absent").unwrap_err().kind(), io::ErrorKind::NotFound);
    // Listing: any depth, by string prefix, sorted, with lengths; the lock is not an object.
    for (k, n) in [
        ("packs/3f/3f01", 1),
        ("packs/40/4000", 2),
        ("packs/3/x", 3),
        ("points/b.1", 4),
        ("points/a.2", 5),
        ("cbtfs.repo", 6),
    ] {
        s.put(k, &vec![1u8; n]).unwrap();
    }
    let _lock = s.lock("cbtfs test").unwrap();
    let list = |p: &str| -> Vec<(String, u64)> {
        s.list(p)
            .unwrap()
            .into_iter()
            .map(|o| (o.key, o.len))
            .collect()
    };
    let keys = |p: &str| -> Vec<String> { list(p).into_iter().map(|(k, _)| k).collect() };
    assert_eq!(
        list(""),
        [
            ("cbtfs.repo", 6),
            ("empty", 0),
            ("packs/3/x", 3),
            ("packs/3f/3f00", 100_000),
            ("packs/3f/3f01", 1),
            ("packs/40/4000", 2),
            ("points/a.1", 5),
            ("points/a.2", 5),
            ("points/b.1", 4),
        ]
        .map(|(k, n)| (k.to_string(), n))
    );
    assert_eq!(
        keys("packs/3"),
        ["packs/3/x", "packs/3f/3f00", "packs/3f/3f01"]
    );
    assert_eq!(keys("packs/3f"), ["packs/3f/3f00", "packs/3f/3f01"]);
    assert_eq!(keys("points/a."), ["points/a.1", "points/a.2"]);
    assert_eq!(keys("p").len(), 7);
    assert!(keys("meta/").is_empty());
    assert!(keys("lock").is_empty());
    // Another prefix of the bucket is another repository.
    let other = S3Store::new(
        S3Url::parse(&format!("s3://{bucket}/repo2")).unwrap(),
        config(rgw),
    )
    .unwrap();
    assert!(other.list("").unwrap().is_empty());
    // Delete: gone, and deleting what is absent is fine.
    s.delete("points/a.2").unwrap();
    s.delete("points/a.2").unwrap();
    assert_eq!(keys("points/"), ["points/a.1", "points/b.1"]);
    assert_eq!(
        s.get("points/a.2").unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
    // Bad keys never reach the server.
    for key in ["", "/abs", "a//b", "../x", ".hidden", "lock", "a\0b"] {
        let e = s.put(key, b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{key:?}: {e}");
    }
    assert_eq!(s.describe("keys/k"), format!("s3://{bucket}/repo/keys/k"));
    // Called from inside a tokio runtime (the NBD import runs the writer in one), on its only
    // thread: no panic, the same answers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        s.put("meta/in-runtime", b"from async").unwrap();
        assert_eq!(s.get("meta/in-runtime").unwrap(), b"from async");
        assert_eq!(keys("meta/"), ["meta/in-runtime"]);
    });
    assert_eq!(s.remove_temporaries().unwrap(), 0);
}

#[test]
fn s3_listing_pages_past_a_thousand_keys() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("pages", false);
    let s = store_in(&bucket, config(rgw));
    // 1,100 keys (S3 pages by 1,000), put from 8 threads.
    let n = 1100usize;
    std::thread::scope(|sc| {
        for t in 0..8 {
            let s = &s;
            sc.spawn(move || {
                for i in (t..n).step_by(8) {
                    s.put(&format!("cindex/{i:05}"), &i.to_le_bytes()).unwrap();
                }
            });
        }
    });
    s.put("other/x", b"x").unwrap();
    let all = s.list("cindex/").unwrap();
    let want: Vec<String> = (0..n).map(|i| format!("cindex/{i:05}")).collect();
    assert_eq!(all.iter().map(|o| o.key.clone()).collect::<Vec<_>>(), want);
    assert!(all.iter().all(|o| o.len == 8));
    assert_eq!(s.list("cindex/010").unwrap().len(), 100);
    assert_eq!(s.list("").unwrap().len(), n + 1);
}

#[test]
fn s3_lock_is_an_exclusive_lease_and_stale_ones_are_broken() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("lock", false);
    let mut fast = config(rgw);
    fast.heartbeat = Duration::from_millis(500);
    fast.stale_after = Duration::from_secs(2);
    let a = store_in(&bucket, fast.clone());
    let b = store_in(&bucket, fast.clone());
    let held = a.lock("cbtfs backup vm1").unwrap();
    let lock_key = format!("{bucket}/repo/lock");
    let (code, record) = rgw.request("GET", &lock_key, &[]);
    assert_eq!(code, 200, "{record}");
    assert!(
        record.contains("\"holder\":\"cbtfs backup vm1\""),
        "{record}"
    );
    // Refreshed by the heartbeat: still held long after the stale time.
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(4) {
        match b.lock("cbtfs import") {
            Err(LockError::Held(who)) => {
                assert!(who.contains("(cbtfs backup vm1)"), "{who}");
                assert!(
                    who.contains(&format!("pid {}", std::process::id())),
                    "{who}"
                );
                refused += 1;
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("the lock was taken while held and refreshed"),
        }
    }
    assert!(refused >= 1);
    let (_, later) = rgw.request("GET", &lock_key, &[]);
    assert_ne!(later, record, "the lease was never refreshed");
    // Released on drop: the object is gone and the next writer takes it at once.
    drop(held);
    assert_eq!(rgw.request("GET", &lock_key, &[]).0, 404);
    let again = b.lock("cbtfs prune").unwrap();
    drop(again);

    // A lease nobody refreshes (its writer was killed on another host) goes stale. (Ages are
    // whole seconds: 4 s is not reached within the first 2 s wait, and passed 3 s later.)
    let mut stale4 = config(rgw);
    stale4.stale_after = Duration::from_secs(4);
    let b = store_in(&bucket, stale4);
    let dead = r#"{"holder":"cbtfs backup","host":"elsewhere","pid":1,"since":"2026-11-30T00:00:00Z","refreshed":1,"token":"x"}"#;
    let (code, body) = rgw.request_with("PUT", &lock_key, &[], dead.as_bytes());
    assert_eq!(code, 200, "{body}");
    // Its last-modified time is now: stale only once the server's clock agrees too.
    match b.lock("cbtfs gc") {
        Err(LockError::Held(who)) => assert!(
            who.contains("pid 1 on elsewhere (cbtfs backup)") && who.contains("4 s"),
            "{who}"
        ),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a fresh lock object was broken"),
    }
    std::thread::sleep(Duration::from_secs(3));
    let g = b.lock("cbtfs gc").unwrap();
    let (_, now) = rgw.request("GET", &lock_key, &[]);
    assert!(now.contains("\"holder\":\"cbtfs gc\""), "{now}");
    drop(g);

    // A lease of this host whose process is gone is broken at once.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let gone = child.id();
    child.bounded().unwrap();
    let host = String::from_utf8(std::fs::read("/proc/sys/kernel/hostname").unwrap())
        .unwrap()
        .trim()
        .to_string();
    let record = format!(
        r#"{{"holder":"cbtfs backup","host":"{host}","pid":{gone},"since":"2026-11-30T00:00:00Z","refreshed":{},"token":"y"}}"#,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
    let (code, body) = rgw.request_with("PUT", &lock_key, &[], record.as_bytes());
    assert_eq!(code, 200, "{body}");
    let slow = store_in(&bucket, config(rgw));
    let g = slow.lock("cbtfs verify").unwrap();
    drop(g);

    // A holder whose lease was broken (its object deleted, another writer took it) never
    // deletes the new holder's lease when it lets go.
    let a = store_in(&bucket, fast.clone());
    let first = a.lock("cbtfs backup vm2").unwrap();
    assert_eq!(rgw.request("DELETE", &lock_key, &[]).0, 204);
    let second = b.lock("cbtfs backup vm3").unwrap();
    drop(first);
    let (code, now) = rgw.request("GET", &lock_key, &[]);
    assert_eq!(code, 200, "{now}");
    assert!(now.contains("\"holder\":\"cbtfs backup vm3\""), "{now}");
    drop(second);
    assert_eq!(rgw.request("GET", &lock_key, &[]).0, 404);
}

#[test]
fn every_command_works_on_an_s3_repository() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("e2e", false);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let url = format!("s3://{bucket}/backups/site1");
    let r = url.as_str();
    let v = vdi(19);
    let mut base = vec![0u8; 48 * BS];
    TestRng::new(190).fill(&mut base[2 * BS..20 * BS]);
    TestRng::new(191).fill(&mut base[40 * BS..41 * BS]);
    let mut day2 = base.clone();
    TestRng::new(192).fill(&mut day2[4 * BS..5 * BS]);
    TestRng::new(193).fill(&mut day2[30 * BS..31 * BS]);
    std::fs::write(dp.join("base.img"), &base).unwrap();
    std::fs::write(dp.join("day2.img"), &day2).unwrap();
    write_bitmap(dp, "day2.b64", &[4, 30], 48);

    s3ok(rgw, &["init", r]);
    let o = s3cbtfs(rgw, &["init", r]);
    assert!(!o.status.success());
    let m = String::from_utf8_lossy(&o.stderr);
    assert!(m.contains("already a cbtfs repository"), "{m}");
    let out = s3ok(
        rgw,
        &[
            "import",
            r,
            "--vdi",
            &v,
            "--name",
            "root",
            "--vm-name",
            "web01",
            "--raw",
            s(&dp.join("base.img")),
            "--time",
            "2026-11-21T02:00:00Z",
        ],
    );
    assert!(
        out.contains("point web01/root/20261121T020000Z/20261121T020000Z"),
        "{out}"
    );
    let ls = s3ok(rgw, &["ls", r]);
    assert!(
        ls.contains("web01") && ls.contains("20261121T020000Z"),
        "{ls}"
    );
    let exported = dp.join("base.out");
    s3ok(rgw, &["export", r, "web01/root/latest", s(&exported)]);
    assert!(std::fs::read(&exported).unwrap() == base);

    // A mount (a background daemon: the store is used again after the fork).
    if can_mount() {
        let mp = dp.join("mnt");
        std::fs::create_dir(&mp).unwrap();
        s3ok(rgw, &["mount", r, s(&mp)]);
        let read = std::fs::read(mp.join("by-uuid").join(&v).join("latest.raw"));
        // `df` of the mount: an object store has no capacity to show.
        let st = cbtfs::fs::statvfs(&mp);
        run("umount", &[s(&mp)]);
        assert!(read.unwrap() == base, "the mount read other bytes");
        let st = st.unwrap();
        assert_eq!((st.blocks, st.bfree, st.bsize), (0, 0, 4096));
    }

    let out = s3ok(rgw, &["verify", r]);
    assert!(!out.is_empty());
    s3ok(
        rgw,
        &[
            "import",
            r,
            "--vdi",
            &v,
            "--raw",
            s(&dp.join("day2.img")),
            "--bitmap",
            s(&dp.join("day2.b64")),
            "--time",
            "2026-11-22T02:00:00Z",
        ],
    );
    let j: serde_json::Value = serde_json::from_str(&s3ok(rgw, &["ls", r, "--json"])).unwrap();
    assert_eq!(
        j["vms"][0]["disks"][0]["sets"][0]["points"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{j}"
    );
    let out = s3ok(rgw, &["prune", r, "--keep-last", "1"]);
    assert!(out.contains("removed 1 of 2 point"), "{out}");
    s3ok(rgw, &["gc", r]);
    let exported = dp.join("day2.out");
    s3ok(rgw, &["export", r, "web01/root/latest", s(&exported)]);
    assert!(std::fs::read(&exported).unwrap() == day2);
    s3ok(rgw, &["verify", r]);

    // Refusals name the bucket and what to do, and never show the secret.
    let mut wrong = cbtfs_cmd();
    wrong
        .envs(rgw.env())
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-key-0123456789");
    let o = wrong.args(["ls", r]).bounded().unwrap();
    assert!(!o.status.success());
    let m = String::from_utf8_lossy(&o.stderr);
    assert!(
        m.contains(&url) && m.contains("secret key") && m.contains("AWS_SECRET_ACCESS_KEY"),
        "{m}"
    );
    assert!(!m.contains("wrong-secret-key"), "{m}");
    let o = cbtfs_cmd()
        .envs(rgw.env())
        .env("CBTFS_S3_ENDPOINT", "http://127.0.0.1:9")
        .args(["ls", r])
        .bounded()
        .unwrap();
    assert!(!o.status.success());
    let m = String::from_utf8_lossy(&o.stderr);
    assert!(
        m.contains("cannot reach the S3 endpoint http://127.0.0.1:9") && m.contains(&url),
        "{m}"
    );
    let o = s3cbtfs(rgw, &["ls", "s3://no-such-bucket-cbtfs/x"]);
    assert!(!o.status.success());
    let m = String::from_utf8_lossy(&o.stderr);
    assert!(
        m.contains("\"no-such-bucket-cbtfs\" does not exist") && m.contains("create it"),
        "{m}"
    );
    let o = cbtfs_cmd()
        .env("CBTFS_S3_ENDPOINT", &rgw.endpoint)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", dp.join("none"))
        .args(["ls", r])
        .bounded()
        .unwrap();
    let m = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(m.contains("no S3 credentials"), "{m}");
    // The credentials file works as well as the environment.
    std::fs::write(
        dp.join("credentials"),
        format!(
            "[backup]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            rgw.access_key, rgw.secret_key
        ),
    )
    .unwrap();
    let o = cbtfs_cmd()
        .env("CBTFS_S3_ENDPOINT", &rgw.endpoint)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", dp.join("credentials"))
        .env("AWS_PROFILE", "backup")
        .args(["ls", r])
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A repository's prefix that holds other objects is refused by init.
    let o = s3cbtfs(rgw, &["init", &format!("s3://{bucket}/backups")]);
    assert!(!o.status.success());
    let m = String::from_utf8_lossy(&o.stderr);
    assert!(m.contains("is not empty"), "{m}");
}

/// `cbtfs copy` from a local repository into a bucket and back: every point exports the same
/// bytes at each end, a second copy adds nothing, and `verify` passes in the bucket.
#[test]
fn copy_goes_from_local_to_s3_and_back_exactly() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("copy", false);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let local = dp.join("local");
    let back = dp.join("back");
    let url = format!("s3://{bucket}/offsite");
    let v = vdi(23);
    let mut base = vec![0u8; 40 * BS];
    TestRng::new(230).fill(&mut base[BS..15 * BS]);
    let mut day2 = base.clone();
    TestRng::new(231).fill(&mut day2[3 * BS..4 * BS]);
    day2[20 * BS..21 * BS].fill(0);
    std::fs::write(dp.join("base.img"), &base).unwrap();
    std::fs::write(dp.join("day2.img"), &day2).unwrap();
    write_bitmap(dp, "day2.b64", &[3, 20], 40);
    s3ok(rgw, &["init", s(&local)]);
    for (img, time, bitmap) in [
        ("base.img", "2026-11-21T02:00:00Z", None),
        ("day2.img", "2026-11-22T02:00:00Z", Some("day2.b64")),
    ] {
        let img = dp.join(img);
        let mut args = vec![
            "import",
            s(&local),
            "--vdi",
            &v,
            "--name",
            "root",
            "--vm-name",
            "web01",
            "--raw",
            s(&img),
            "--time",
            time,
        ];
        let bm;
        if let Some(b) = bitmap {
            bm = dp.join(b);
            args.extend(["--bitmap", s(&bm)]);
        }
        s3ok(rgw, &args);
    }
    s3ok(rgw, &["init", &url]);
    let key = common::key_file();
    let to = ["--to-key-file", s(key)];
    let out = s3ok(rgw, &[&["copy", s(&local), &url][..], &to[..]].concat());
    assert!(out.contains("web01/root/"), "{out}");
    let again = s3ok(
        rgw,
        &[&["copy", s(&local), &url, "--json"][..], &to[..]].concat(),
    );
    assert!(
        again.contains("\"points_copied\": 0") || again.contains("\"points_copied\":0"),
        "{again}"
    );
    s3ok(rgw, &["verify", &url]);
    s3ok(rgw, &["init", s(&back)]);
    s3ok(rgw, &[&["copy", &url, s(&back)][..], &to[..]].concat());
    for (repo, name) in [(url.as_str(), "s3"), (s(&back), "back")] {
        for (k, (point, want)) in [
            ("web01/root/20261121T020000Z/20261121T020000Z", &base),
            ("web01/root/latest", &day2),
        ]
        .into_iter()
        .enumerate()
        {
            let out = dp.join(format!("{name}-{k}.out"));
            s3ok(rgw, &["export", repo, point, s(&out)]);
            assert!(std::fs::read(&out).unwrap() == *want, "{name} {point}");
        }
        let ls = s3ok(rgw, &["ls", repo, "--json"]);
        assert!(
            ls.contains("20261121T020000Z") && ls.contains("20261122T020000Z"),
            "{ls}"
        );
    }
}
