//! Repositories on S3 through a fault-injecting proxy (tests/suite/common/faulty.rs) in front of a
//! real radosgw: retries commit exact points, a failing store fails cleanly with nothing
//! referenced, and reads give exact bytes or an error, never wrong bytes.

use crate::common;

use std::io;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::faulty::{Fault, Proxy, Schedule, When};
use crate::common::rgw::Rgw;
use crate::common::*;
use cbtfs::repo::store::Store;
use cbtfs::repo::store::s3::retry::Policy;
use cbtfs::repo::store::s3::{S3Config, S3Store, S3Url};

/// The client's idle timeout in these tests (a stall lasts longer).
const TIMEOUT_SECS: &str = "2";
const STALL: Duration = Duration::from_secs(5);

/// cbtfs with the endpoint's keys, reaching it at `endpoint` (the proxy or radosgw itself).
fn run_at(rgw: &Rgw, endpoint: &str, args: &[&str]) -> Output {
    let o = cbtfs_cmd()
        .envs(rgw.env())
        .env("CBTFS_S3_ENDPOINT", endpoint)
        .env("CBTFS_S3_TIMEOUT", TIMEOUT_SECS)
        // Retries at 20 ms, not 200: the faults are the same, the suite shorter.
        .env("CBTFS_S3_BACKOFF_MS", "20")
        .args(args)
        .bounded()
        .unwrap();
    for text in [&o.stdout, &o.stderr] {
        assert!(
            !String::from_utf8_lossy(text).contains(&rgw.secret_key),
            "cbtfs {args:?} printed the secret key"
        );
    }
    o
}

fn ok_at(rgw: &Rgw, endpoint: &str, args: &[&str]) -> String {
    let o = run_at(rgw, endpoint, args);
    assert!(
        o.status.success(),
        "cbtfs {args:?} at {endpoint}: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A disk of `blocks` blocks, a random run in its first half, distinct per `seed`.
fn disk(blocks: usize, seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; blocks * BS];
    let from = (seed as usize * 3) % (blocks / 2);
    TestRng::new(seed).fill(&mut d[from * BS..(from + blocks / 2) * BS]);
    d
}

fn import_args<'a>(url: &'a str, v: &'a str, img: &'a str, time: &'a str) -> Vec<&'a str> {
    vec![
        "import",
        url,
        "--vdi",
        v,
        "--name",
        "root",
        "--vm-name",
        "web01",
        "--raw",
        img,
        "--time",
        time,
    ]
}

/// The point of set time `t`'s path for `export`.
fn point(t: &str) -> String {
    format!("web01/root/{t}/{t}")
}

fn stamp(i: usize) -> (String, String) {
    let t = format!("2026-11-{:02}T02:00:00Z", i + 1);
    let p = format!("202611{:02}T020000Z", i + 1);
    (t, p)
}

/// Export `pt` from `url` at `endpoint` and compare byte for byte.
fn export_is(rgw: &Rgw, endpoint: &str, url: &str, pt: &str, want: &[u8], out: &std::path::Path) {
    let _ = std::fs::remove_file(out);
    ok_at(rgw, endpoint, &["export", url, pt, s(out)]);
    let got = std::fs::read(out).unwrap();
    assert!(got == want, "{pt} exported other bytes through {endpoint}");
}

/// Manifest keys of the repository (read past the proxy).
fn manifests(rgw: &Rgw, bucket: &str, prefix: &str) -> Vec<String> {
    let st = S3Store::new(
        S3Url::parse(&format!("s3://{bucket}/{prefix}")).unwrap(),
        S3Config::new(
            Some(rgw.endpoint.clone()),
            &rgw.region,
            &rgw.access_key,
            &rgw.secret_key,
        ),
    )
    .unwrap();
    st.list("points/")
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

/// Every object key below the repository's prefix (past the proxy).
fn objects(rgw: &Rgw, bucket: &str, prefix: &str) -> Vec<String> {
    let st = S3Store::new(
        S3Url::parse(&format!("s3://{bucket}/{prefix}")).unwrap(),
        S3Config::new(
            Some(rgw.endpoint.clone()),
            &rgw.region,
            &rgw.access_key,
            &rgw.secret_key,
        ),
    )
    .unwrap();
    st.list("").unwrap().into_iter().map(|o| o.key).collect()
}

/// Each fault kind on every third request: the import retries and commits an exact point,
/// and an export through the same faults reads it back exactly.
#[test]
fn imports_and_exports_through_each_fault_are_exact() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("each-fault", false);
    let url = format!("s3://{bucket}/repo");
    let proxy = Proxy::start(&rgw.endpoint);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let v = vdi(31);
    ok_at(rgw, &rgw.endpoint, &["init", &url]);
    let kinds = [
        Fault::Drop,
        Fault::LostAnswer,
        Fault::CutHead,
        Fault::Truncate,
        Fault::Status500,
        Fault::SlowDown,
        Fault::Stall(STALL),
    ];
    let mut disks = Vec::new();
    for (i, fault) in kinds.iter().enumerate() {
        let img = dp.join(format!("d{i}.img"));
        let bytes = disk(40, 300 + i as u64);
        std::fs::write(&img, &bytes).unwrap();
        let (t, p) = stamp(i);
        proxy.set(Schedule::new(When::EveryNth(3), &[*fault]));
        let started = Instant::now();
        ok_at(rgw, &proxy.endpoint, &import_args(&url, &v, s(&img), &t));
        let faults = proxy.faults();
        assert!(
            faults.get(fault.name()).copied().unwrap_or(0) >= 2,
            "{fault:?}: {faults:?}"
        );
        // Reads through the same faults.
        let out = dp.join("out.img");
        export_is(rgw, &proxy.endpoint, &url, &point(&p), &bytes, &out);
        eprintln!(
            "{}: import and export in {:.1} s, requests {:?}, faults {:?}",
            fault.name(),
            started.elapsed().as_secs_f64(),
            proxy.counts(),
            proxy.faults()
        );
        proxy.set(Schedule::none());
        proxy.reset_counts();
        disks.push((p, bytes));
    }
    // Past the proxy: every point is there, exact, and the repository verifies.
    for (p, bytes) in &disks {
        export_is(
            rgw,
            &rgw.endpoint,
            &url,
            &point(p),
            bytes,
            &dp.join("direct.img"),
        );
    }
    ok_at(rgw, &rgw.endpoint, &["verify", &url]);
    assert_eq!(manifests(rgw, &bucket, "repo").len(), kinds.len());
    // Half the reads faulted at random: each export is exact or fails naming the
    // repository, never other bytes.
    proxy.set(
        Schedule::new(
            When::Random {
                seed: 0x5eed,
                fraction: 0.5,
            },
            &[
                Fault::Truncate,
                Fault::CutHead,
                Fault::Status500,
                Fault::Drop,
            ],
        )
        .method("GET"),
    );
    let (mut exact, mut failed) = (0, 0);
    for (p, bytes) in &disks {
        let out = dp.join("random.img");
        let _ = std::fs::remove_file(&out);
        let o = run_at(rgw, &proxy.endpoint, &["export", &url, &point(p), s(&out)]);
        if o.status.success() {
            assert!(std::fs::read(&out).unwrap() == *bytes, "{p}: other bytes");
            exact += 1;
        } else {
            let m = String::from_utf8_lossy(&o.stderr);
            assert!(m.contains(&format!("s3://{bucket}/repo")), "{m}");
            failed += 1;
        }
    }
    eprintln!("random faults: {exact} exact exports, {failed} failed cleanly");
    assert!(!proxy.faults().is_empty());
}

/// A store that answers nothing (every request faulted) fails the command within bounded
/// time, naming the object and the attempts; a store that fails only pack or only manifest
/// uploads fails the import cleanly, nothing new is referenced, and `verify` and `gc` find
/// a consistent repository.
#[test]
fn a_failing_store_fails_cleanly_and_references_nothing() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("failing", false);
    let url = format!("s3://{bucket}/repo");
    let proxy = Proxy::start(&rgw.endpoint);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let v = vdi(32);
    ok_at(rgw, &rgw.endpoint, &["init", &url]);
    let base = disk(40, 320);
    std::fs::write(dp.join("base.img"), &base).unwrap();
    let (t0, p0) = stamp(0);
    ok_at(
        rgw,
        &rgw.endpoint,
        &import_args(&url, &v, s(&dp.join("base.img")), &t0),
    );
    let before = objects(rgw, &bucket, "repo");
    let next = disk(40, 321);
    std::fs::write(dp.join("next.img"), &next).unwrap();
    let (t1, _) = stamp(1);
    let img = dp.join("next.img");
    let args = import_args(&url, &v, s(&img), &t1);

    // Unreachable: every request fails, with each kind of failure in turn.
    proxy.set(Schedule::new(
        When::Always,
        &[
            Fault::Status500,
            Fault::Drop,
            Fault::SlowDown,
            Fault::CutHead,
        ],
    ));
    let started = Instant::now();
    let o = run_at(rgw, &proxy.endpoint, &args);
    let took = started.elapsed();
    let m = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{m}");
    assert!(m.contains(&format!("s3://{bucket}/repo")), "{m}");
    assert!(m.contains("gave up after 6 attempts"), "{m}");
    assert!(took < Duration::from_secs(60), "took {took:?}: {m}");
    assert_eq!(objects(rgw, &bucket, "repo"), before);

    // One kind of upload fails every time: the import fails naming the object, after its
    // attempts. Lost answers store the object all the same: the failed writer must delete
    // it (a chunk index object left behind would name packs the writer deleted, and a later
    // backup would dedup against chunks that are gone; a manifest would name them).
    for (what, path, kinds) in [
        (
            "packs",
            "/repo/packs/",
            &[Fault::Drop, Fault::Status500][..],
        ),
        ("chunk index", "/repo/cindex/", &[Fault::LostAnswer][..]),
        ("point index", "/repo/pindex/", &[Fault::Truncate][..]),
        (
            "manifest",
            "/repo/points/",
            &[Fault::SlowDown, Fault::LostAnswer][..],
        ),
    ] {
        proxy.set(Schedule::new(When::Always, kinds).method("PUT").path(path));
        let o = run_at(rgw, &proxy.endpoint, &args);
        let m = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what}: {m}");
        assert!(
            m.contains(&format!("s3://{bucket}{path}")) && m.contains("gave up after 6 attempts"),
            "{what}: {m}"
        );
        proxy.set(Schedule::none());
        // Nothing new is referenced: the same manifests; verify and gc agree.
        assert_eq!(
            manifests(rgw, &bucket, "repo"),
            before
                .iter()
                .filter(|k| k.starts_with("points/"))
                .cloned()
                .collect::<Vec<_>>(),
            "{what}"
        );
        ok_at(rgw, &rgw.endpoint, &["verify", &url]);
        ok_at(rgw, &rgw.endpoint, &["gc", &url]);
        ok_at(rgw, &rgw.endpoint, &["verify", &url]);
        // What the failed import wrote is gone (deleted by it, or by gc). A failed writer
        // keeps the chunk index objects it wrote (a writer beside it may have deduplicated
        // against them); gc then merges the chunk index into one new object: other name,
        // same count, and every other object exactly as before.
        let (cindex_now, rest_now): (Vec<String>, Vec<String>) = objects(rgw, &bucket, "repo")
            .into_iter()
            .partition(|k| k.starts_with("cindex/"));
        let (cindex_before, rest_before): (Vec<String>, Vec<String>) = before
            .iter()
            .cloned()
            .partition(|k| k.starts_with("cindex/"));
        assert_eq!(rest_now, rest_before, "{what}");
        assert_eq!(
            cindex_now.len(),
            cindex_before.len(),
            "{what}: {cindex_now:?}"
        );
    }
    export_is(
        rgw,
        &rgw.endpoint,
        &url,
        &point(&p0),
        &base,
        &dp.join("out.img"),
    );
    // And with the store healthy again the same import commits.
    ok_at(rgw, &proxy.endpoint, &args);
    export_is(
        rgw,
        &rgw.endpoint,
        &url,
        "web01/root/latest",
        &next,
        &dp.join("out.img"),
    );
}

/// A PUT that the server stored but whose answer was lost (the pack's, then the manifest's)
/// does not fail the import: the retry's 412 is recognised as our own object.
#[test]
fn a_lost_answer_put_does_not_fail_the_import() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("lost", false);
    let url = format!("s3://{bucket}/repo");
    let proxy = Proxy::start(&rgw.endpoint);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let v = vdi(33);
    ok_at(rgw, &rgw.endpoint, &["init", &url]);
    for (i, path) in ["/repo/packs/", "/repo/points/", "/repo/pindex/"]
        .iter()
        .enumerate()
    {
        let bytes = disk(40, 330 + i as u64);
        let img = dp.join(format!("{i}.img"));
        std::fs::write(&img, &bytes).unwrap();
        let (t, p) = stamp(i);
        proxy.reset_counts();
        proxy.set(
            Schedule::new(When::Nth(vec![1]), &[Fault::LostAnswer])
                .method("PUT")
                .path(path),
        );
        ok_at(rgw, &proxy.endpoint, &import_args(&url, &v, s(&img), &t));
        let log = proxy.log();
        let lost = log
            .iter()
            .find(|r| r.fault.is_some())
            .unwrap_or_else(|| panic!("{path}: no answer was lost: {log:?}"))
            .path
            .clone();
        // The PUT twice (the second answered 412), then at once the object read back to
        // compare (the command may read it again later, after the commit).
        let puts: Vec<usize> = log
            .iter()
            .enumerate()
            .filter(|(_, r)| r.method == "PUT" && r.path == lost)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(puts.len(), 2, "{path}: {log:?}");
        let next = &log[puts[1] + 1];
        assert_eq!(
            (next.method.as_str(), next.path.as_str()),
            ("GET", lost.as_str()),
            "{path}: {log:?}"
        );
        proxy.set(Schedule::none());
        export_is(
            rgw,
            &rgw.endpoint,
            &url,
            &point(&p),
            &bytes,
            &dp.join("out.img"),
        );
    }
    ok_at(rgw, &rgw.endpoint, &["verify", &url]);
}

fn store_at(rgw: &Rgw, endpoint: &str, bucket: &str, policy: Policy) -> S3Store {
    let mut cfg = S3Config::new(
        Some(endpoint.to_string()),
        &rgw.region,
        &rgw.access_key,
        &rgw.secret_key,
    );
    cfg.retry = policy;
    S3Store::new(S3Url::parse(&format!("s3://{bucket}/repo")).unwrap(), cfg).unwrap()
}

/// The store's retries, request by request: bounded attempts named in the error, a stall cut
/// by the timeout, a retried create-only put that finds someone else's object refused.
#[test]
fn s3_store_retries_are_bounded_and_named() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("store-retries", false);
    let proxy = Proxy::start(&rgw.endpoint);
    let policy = Policy {
        attempts: 3,
        timeout: Duration::from_secs(1),
        backoff: Duration::from_millis(20),
    };
    let st = store_at(rgw, &proxy.endpoint, &bucket, policy);
    let bytes: Vec<u8> = (0..300_000u32)
        .map(|i| ((i * 31) ^ (i >> 7)) as u8)
        .collect();
    st.put("packs/00/a", &bytes).unwrap();

    // Every GET answered 500: three attempts, then an error naming them and the object.
    proxy.set(Schedule::new(When::Always, &[Fault::Status500]).method("GET"));
    proxy.reset_counts();
    let e = st.get("packs/00/a").unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains(&format!("s3://{bucket}/repo/packs/00/a"))
            && m.contains("gave up after 3 attempts")
            && m.contains("500"),
        "{m}"
    );
    assert_eq!(proxy.counts().get("GET"), Some(&3));
    // A stalled answer is cut by the timeout, each time.
    proxy.set(Schedule::new(When::Always, &[Fault::Stall(STALL)]).method("GET"));
    let started = Instant::now();
    let mut buf = vec![0u8; 1000];
    let e = st.get_range("packs/00/a", 5, &mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("stalled"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10), "{e}");
    // Truncated bodies, then a good one: the exact bytes.
    proxy.set(
        Schedule::new(When::Nth(vec![1, 2]), &[Fault::Truncate, Fault::CutHead]).method("GET"),
    );
    assert!(st.get("packs/00/a").unwrap() == bytes);
    proxy.set(Schedule::new(When::Nth(vec![1, 2]), &[Fault::Truncate]).method("GET"));
    st.get_range("packs/00/a", 100_000, &mut buf).unwrap();
    assert!(buf == bytes[100_000..101_000]);
    // Past the end is not retried: one request, then the length.
    proxy.set(Schedule::none());
    proxy.reset_counts();
    let e = st.get_range("packs/00/a", 299_500, &mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    assert_eq!(proxy.counts().get("GET"), Some(&1), "{:?}", proxy.log());

    // A create-only put whose first attempt never arrived, finding another object in place
    // on its retry (put meanwhile by someone else): AlreadyExists, the other bytes kept.
    let (code, body) = rgw.request_with("PUT", &format!("{bucket}/repo/points/x"), &[], b"theirs");
    assert_eq!(code, 200, "{body}");
    proxy.set(
        Schedule::new(When::Nth(vec![1]), &[Fault::Drop])
            .method("PUT")
            .path("points/x"),
    );
    let e = st.put("points/x", b"ours").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(st.get("points/x").unwrap(), b"theirs");
    // Its answer lost instead: our own object, success.
    proxy.set(
        Schedule::new(When::Nth(vec![1]), &[Fault::LostAnswer])
            .method("PUT")
            .path("points/y"),
    );
    st.put("points/y", b"ours").unwrap();
    assert_eq!(st.get("points/y").unwrap(), b"ours");
    // And a first attempt that finds the key taken is refused at once.
    proxy.set(Schedule::none());
    proxy.reset_counts();
    let e = st.put("points/y", b"again").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
    assert_eq!(proxy.counts().get("PUT"), Some(&1));
    // Deletes and lists retry too.
    proxy.set(Schedule::new(
        When::EveryNth(2),
        &[Fault::LostAnswer, Fault::SlowDown],
    ));
    st.delete("points/y").unwrap();
    let listed: Vec<String> = st.list("").unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(listed, ["packs/00/a", "points/x"]);
}

/// Several packs of one import are stored at once on S3 (a slow link shows it), and the
/// point is exact; faults on the way change nothing.
#[test]
fn packs_are_uploaded_in_parallel_and_exactly() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("parallel", false);
    let url = format!("s3://{bucket}/repo");
    let proxy = Proxy::start(&rgw.endpoint);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let v = vdi(34);
    ok_at(rgw, &rgw.endpoint, &["init", &url]);
    // 120 MiB of random data: four packs.
    let mut bytes = vec![0u8; 1920 * BS];
    TestRng::new(340).fill(&mut bytes);
    let img = dp.join("big.img");
    std::fs::write(&img, &bytes).unwrap();
    let (t, p) = stamp(0);
    proxy.set(
        Schedule::new(When::Nth(vec![2]), &[Fault::Truncate])
            .method("PUT")
            .path("/repo/packs/")
            .delay(Duration::from_millis(1500)),
    );
    ok_at(rgw, &proxy.endpoint, &import_args(&url, &v, s(&img), &t));
    let packs = proxy
        .log()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/repo/packs/"))
        .count();
    assert!(packs >= 4, "{packs} pack PUTs");
    let most = proxy.max_in_flight("PUT");
    assert!(
        (2..=3).contains(&most),
        "{most} PUTs in flight at most (S3Store keeps 3)"
    );
    proxy.set(Schedule::none());
    export_is(
        rgw,
        &rgw.endpoint,
        &url,
        &point(&p),
        &bytes,
        &dp.join("out.img"),
    );
    ok_at(rgw, &rgw.endpoint, &["verify", &url]);
}

/// A mount reading through faults gives the exact bytes when retries get through, and EIO
/// (never other bytes) when the store keeps failing.
#[test]
fn mount_reads_through_faults_are_exact_or_eio() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    if !can_mount() {
        return;
    }
    let bucket = rgw.bucket("mount-faults", false);
    let url = format!("s3://{bucket}/repo");
    let proxy = Proxy::start(&rgw.endpoint);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let v = vdi(35);
    ok_at(rgw, &rgw.endpoint, &["init", &url]);
    let a = disk(64, 350);
    let b = disk(64, 351);
    for (i, bytes) in [&a, &b].into_iter().enumerate() {
        let img = dp.join(format!("{i}.img"));
        std::fs::write(&img, bytes).unwrap();
        let (t, _) = stamp(i);
        // Without a bitmap each import is a set's base; the disks share no chunk.
        ok_at(rgw, &rgw.endpoint, &import_args(&url, &v, s(&img), &t));
    }
    let mp = dp.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    ok_at(rgw, &proxy.endpoint, &["mount", &url, s(&mp)]);
    let _guard = MountGuard(mp.clone());
    let (_, pa) = stamp(0);
    let (_, pb) = stamp(1);
    let file = |p: &str| {
        mp.join("web01")
            .join("root")
            .join(p)
            .join(format!("{p}.raw"))
    };
    // Every other GET faulted, each kind in turn: exact.
    proxy.set(
        Schedule::new(
            When::EveryNth(2),
            &[
                Fault::Truncate,
                Fault::CutHead,
                Fault::Status500,
                Fault::LostAnswer,
                Fault::Drop,
                Fault::SlowDown,
            ],
        )
        .method("GET"),
    );
    let got = std::fs::read(file(&pa)).unwrap();
    assert!(got == a, "the mount read other bytes through faults");
    assert!(!proxy.faults().is_empty());
    // Every GET fails: EIO, never other bytes.
    proxy.set(Schedule::new(When::Always, &[Fault::Status500]).method("GET"));
    let e = std::fs::read(file(&pb)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // And once the store answers again, the same file reads exactly.
    proxy.set(Schedule::none());
    let got = std::fs::read(file(&pb)).unwrap();
    assert!(got == b, "the mount read other bytes after failures");
}

/// Measures a 32 MiB PUT to radosgw: one PUT, multipart (4 × 8 MiB parts at once), and one
/// to four single PUTs in flight. Run by hand: `cargo test --release --test suite s3::faults::
/// put_throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn put_throughput() {
    use futures_util::StreamExt;
    use object_store::ObjectStore;
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("throughput", false);
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_region(&rgw.region)
        .with_access_key_id(&rgw.access_key)
        .with_secret_access_key(&rgw.secret_key)
        .with_endpoint(&rgw.endpoint)
        .with_allow_http(true)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut data = vec![0u8; 32 << 20];
    TestRng::new(7).fill(&mut data);
    let data = bytes::Bytes::from(data);
    let rounds = 4;
    let mib = |n: usize, t: Duration| (n * 32) as f64 / t.as_secs_f64();
    // The test cluster keeps objects in memory: delete each batch once measured.
    let clear = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let all: Vec<_> = s3.list(None).collect::<Vec<_>>().await;
            for m in all {
                s3.delete(&m.unwrap().location).await.unwrap();
            }
        })
    };
    for round in 0..2 {
        let t = Instant::now();
        for i in 0..rounds {
            let p = object_store::path::Path::from(format!("single/{round}/{i}"));
            rt.block_on(s3.put(&p, data.clone().into())).unwrap();
        }
        println!("single PUT: {:.0} MiB/s", mib(rounds, t.elapsed()));
        clear(&rt);
        let t = Instant::now();
        for i in 0..rounds {
            let p = object_store::path::Path::from(format!("multi/{round}/{i}"));
            rt.block_on(async {
                let up = s3.put_multipart(&p).await.unwrap();
                let mut w = object_store::WriteMultipart::new_with_chunk_size(up, 8 << 20);
                w.write(&data);
                w.finish().await.unwrap();
            });
        }
        println!("multipart 4 x 8 MiB: {:.0} MiB/s", mib(rounds, t.elapsed()));
        clear(&rt);
        for par in 1..=4usize {
            let t = Instant::now();
            let n = rounds;
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(par));
                for i in 0..n {
                    let (s3, data, sem) = (s3.clone(), data.clone(), sem.clone());
                    let p = object_store::path::Path::from(format!("par{par}/{round}/{i}"));
                    set.spawn(async move {
                        let _g = sem.acquire().await.unwrap();
                        s3.put(&p, data.into()).await.unwrap();
                    });
                }
                while let Some(r) = set.join_next().await {
                    r.unwrap();
                }
            });
            println!(
                "{par} single PUTs in flight: {:.0} MiB/s",
                mib(n, t.elapsed())
            );
        }
    }
}

/// `cbtfs copy` publishes a point while it writes the next one. When a manifest put fails
/// for good, the copy fails naming the destination, the destination holds exactly the points
/// before it (each exact), nothing after it became visible, and the next run copies the rest
/// exactly.
#[test]
fn a_copy_whose_publish_fails_leaves_exact_earlier_points_and_the_next_run_finishes() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("copy-pipeline", false);
    let url = format!("s3://{bucket}/dst");
    let proxy = Proxy::start(&rgw.endpoint);
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let src = dp.join("src");
    let src_s = s(&src);
    let v = vdi(33);
    ok_at(rgw, &rgw.endpoint, &["init", src_s]);
    ok_at(rgw, &rgw.endpoint, &["init", &url]);
    // A base and five points, each a whole image (import finds what changed).
    let mut images = Vec::new();
    for i in 0..6 {
        let img = disk(40, 330 + i as u64);
        let path = dp.join(format!("{i}.img"));
        std::fs::write(&path, &img).unwrap();
        let (t, _) = stamp(i);
        let mut args = import_args(src_s, &v, s(&path), &t);
        // Later points join the base's set, every block marked changed.
        let all = write_bitmap(dp, &format!("{i}.b64"), &(0..40).collect::<Vec<u64>>(), 40);
        if i > 0 {
            args.extend(["--bitmap", s(&all)]);
        }
        ok_at(rgw, &rgw.endpoint, &args);
        images.push(img);
    }
    // The third manifest put, and every one after it, fails (each attempt).
    proxy.set(
        Schedule::new(When::Nth((3..200).collect()), &[Fault::Status500])
            .method("PUT")
            .path("/dst/points/"),
    );
    let key = key_file();
    let copy = ["copy", src_s, &url, "--to-key-file", s(key)];
    let o = run_at(rgw, &proxy.endpoint, &copy);
    let m = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "the copy succeeded through failing manifest puts: {m}"
    );
    assert!(
        m.contains(&format!("{url}/points/")),
        "the error does not name the manifest that could not be stored: {m}"
    );
    assert_eq!(
        manifests(rgw, &bucket, "dst").len(),
        2,
        "the destination holds other than the two points published before the failure: {m}"
    );
    proxy.set(Schedule::none());
    let out = dp.join("out.img");
    for (i, img) in images.iter().enumerate().take(2) {
        let (t, _) = stamp(i);
        export_is(rgw, &rgw.endpoint, &url, &format!("{v}@{t}"), img, &out);
    }
    // The next run copies the rest, exactly.
    ok_at(rgw, &rgw.endpoint, &copy);
    assert_eq!(manifests(rgw, &bucket, "dst").len(), 6);
    for (i, img) in images.iter().enumerate() {
        let (t, _) = stamp(i);
        export_is(rgw, &rgw.endpoint, &url, &format!("{v}@{t}"), img, &out);
    }
    ok_at(rgw, &rgw.endpoint, &["verify", &url]);
}
