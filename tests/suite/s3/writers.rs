//! Concurrent writers of one repository in a bucket (issue 20; issue 19's "the next run
//! collects what is unreferenced"), against the real radosgw: the lease protocol of the shared,
//! exclusive and per-disk locks, two writers of different disks at once, and a killed backup
//! collected by the next run.

use crate::common;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use crate::common::rgw::{Rgw, s3cbtfs, s3ok};
use crate::common::*;
use cbtfs::repo::store::s3::{S3Config, S3Store, S3Url};
use cbtfs::repo::store::{LockError, LockGuard, LockKind, Store};
use cbtfs::repo::{NewPoint, Repository};
use serde_json::Value;

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

fn held(r: Result<Box<dyn LockGuard>, LockError>) -> String {
    match r {
        Err(LockError::Held(who)) => who,
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("taken while held"),
    }
}

/// A lease record of a process of this host that no longer exists.
fn dead_lease(holder: &str) -> String {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let gone = child.id();
    child.bounded().unwrap();
    let host = String::from_utf8(std::fs::read("/proc/sys/kernel/hostname").unwrap())
        .unwrap()
        .trim()
        .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    format!(
        r#"{{"holder":"{holder}","host":"{host}","pid":{gone},"since":"2026-11-30T00:00:00Z","refreshed":{now},"token":"dead"}}"#
    )
}

#[test]
fn s3_shared_exclusive_and_disk_leases() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("writers-leases", false);
    let mut fast = config(rgw);
    fast.heartbeat = Duration::from_millis(500);
    let a = store_in(&bucket, fast.clone());
    let b = store_in(&bucket, fast.clone());
    let now = Duration::ZERO;

    // Shared + shared: both held, each with a live record naming it.
    let w1 = a
        .take_lock(LockKind::Shared, "cbtfs backup vm1", now)
        .unwrap();
    let w2 = b
        .take_lock(LockKind::Shared, "cbtfs import d2", now)
        .unwrap();
    let recs = a.writer_records().unwrap();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(recs.iter().all(|r| r.live), "{recs:?}");
    assert!(a.list("").unwrap().is_empty(), "lease objects are listed");
    // Shared blocks exclusive, which names both writers and withdraws its own lease.
    let who = held(b.take_lock(LockKind::Exclusive, "cbtfs gc", Duration::from_secs(1)));
    assert!(who.starts_with("2 writers are running: "), "{who}");
    assert!(
        who.contains("(cbtfs backup vm1)") && who.contains("(cbtfs import d2)"),
        "{who}"
    );
    assert_eq!(
        rgw.request("GET", &format!("{bucket}/repo/lock"), &[]).0,
        404
    );
    drop(w1);
    let who = held(b.take_lock(LockKind::Exclusive, "cbtfs gc", now));
    assert!(who.starts_with("1 writer is running: "), "{who}");
    drop(w2);
    assert_eq!(a.writer_records().unwrap(), []);

    // Exclusive blocks shared (naming its holder); the refused writer leaves no record.
    let x = a.take_lock(LockKind::Exclusive, "cbtfs gc", now).unwrap();
    let who = held(b.take_lock(LockKind::Shared, "cbtfs backup vm1", Duration::from_secs(1)));
    assert!(who.contains("(cbtfs gc)"), "{who}");
    assert_eq!(a.writer_records().unwrap(), []);
    drop(x);
    let w = b
        .take_lock(LockKind::Shared, "cbtfs backup vm1", now)
        .unwrap();

    // One holder per disk; other disks are free.
    let d1 = a
        .take_lock(LockKind::Disk("00ff"), "backup of A", now)
        .unwrap();
    let who = held(b.take_lock(
        LockKind::Disk("00ff"),
        "import of A",
        Duration::from_secs(1),
    ));
    assert!(who.contains("(backup of A)"), "{who}");
    let d2 = b
        .take_lock(LockKind::Disk("11ee"), "backup of B", now)
        .unwrap();
    drop(d1);
    let d1 = b
        .take_lock(LockKind::Disk("00ff"), "import of A", now)
        .unwrap();
    drop((d1, d2, w));
    assert!(a.list("").unwrap().is_empty());

    // A killed writer's lease (its process is gone): a dead record, which does not hold the
    // exclusive lock back and is removed by the collector.
    let key = format!("{bucket}/repo/locks/writers/00000000deadbeef");
    let (code, body) = rgw.request_with(
        "PUT",
        &key,
        &[],
        dead_lease("cbtfs import killed").as_bytes(),
    );
    assert_eq!(code, 200, "{body}");
    let recs = a.writer_records().unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert!(!recs[0].live, "{recs:?}");
    assert!(recs[0].holder.contains("(cbtfs import killed)"), "{recs:?}");
    let x = a.take_lock(LockKind::Exclusive, "collector", now).unwrap();
    a.remove_writer_record(&recs[0].id).unwrap();
    assert_eq!(rgw.request("GET", &key, &[]).0, 404);
    drop(x);

    // A stale exclusive lease (its holder gone) is broken by a writer.
    let lock_key = format!("{bucket}/repo/lock");
    let (code, body) = rgw.request_with(
        "PUT",
        &lock_key,
        &[],
        dead_lease("cbtfs gc killed").as_bytes(),
    );
    assert_eq!(code, 200, "{body}");
    let w = b.take_lock(LockKind::Shared, "cbtfs backup", now).unwrap();
    assert_eq!(rgw.request("GET", &lock_key, &[]).0, 404);
    drop(w);
    assert_eq!(a.writer_records().unwrap(), []);
}

/// `blocks` blocks of random bytes (each distinct), every seventh zero.
fn image(blocks: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; blocks * BS];
    let mut rng = TestRng::new(seed);
    for (b, chunk) in v.chunks_mut(BS).enumerate() {
        if b % 7 != 3 {
            rng.fill(chunk);
        }
    }
    v
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(b) = got
        .chunks(BS)
        .zip(want.chunks(BS))
        .position(|(a, b)| a != b)
    {
        panic!("{what}: block {b} differs");
    }
}

fn export(rgw: &Rgw, url: &str, v: &str) -> Vec<u8> {
    let o = s3cbtfs(rgw, &["export", url, &format!("{v}@latest"), "-"]);
    assert!(o.status.success(), "{}", text(&o));
    o.stdout
}

fn import(rgw: &Rgw, url: &str, v: &str, img: &Path, step: u64) {
    s3ok(
        rgw,
        &[
            "import",
            url,
            "--vdi",
            v,
            "--raw",
            s(img),
            "--time",
            &time(step),
        ],
    );
}

#[test]
fn s3_writers_of_different_disks_run_at_once_and_a_killed_one_is_collected() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("writers", false);
    let url = format!("s3://{bucket}/repo");
    s3ok(rgw, &["init", &url]);
    let d = tempfile::tempdir().unwrap();
    let store = Arc::new(store_in(&bucket, config(rgw)));
    let packs = || store.list("packs/").unwrap().len();
    let repo = Repository::open_store(store.clone(), Path::new(&url), Some(&secret())).unwrap();

    // Writer A (this process), stopped mid-point with its first pack stored.
    let va = vdi(1);
    let disk_a = image(1200, 1);
    let shared = repo.lock_shared("test writer of disk A").unwrap();
    let lock_a = shared.lock_disk(&va, "test writer of disk A").unwrap();
    let mut w = repo
        .begin_point(
            &lock_a,
            NewPoint {
                vdi: va.clone(),
                disk_name: "disk".into(),
                vm_uuid: None,
                vm_name: None,
                time: 1_767_232_800 + 3600,
                virtual_size: disk_a.len() as u64,
                source: "test writer".into(),
                new_set: true,
                snapshot: None,
                vm_metadata: None,
                vdi_type: None,
                vm_run: None,
            },
        )
        .unwrap();
    w.add_run(0, &disk_a[..700 * BS], true).unwrap();
    wait_for("writer A's first pack", Duration::from_secs(120), || {
        packs() >= 1
    });
    // Writer B (another process) imports another disk meanwhile, and commits.
    let vb = vdi(2);
    let disk_b = image(200, 2);
    let img_b = d.path().join("b");
    std::fs::write(&img_b, &disk_b).unwrap();
    import(rgw, &url, &vb, &img_b, 1);
    assert_same("B, while A is mid-point", &export(rgw, &url, &vb), &disk_b);
    assert!(!repo.disk_ids().unwrap().contains(&va));
    w.add_run(700, &disk_a[700 * BS..], true).unwrap();
    w.commit().unwrap();
    drop(lock_a);
    drop(shared);
    assert_same("A", &export(rgw, &url, &va), &disk_a);

    // A backup whose host stops sending after 100 MiB of 128 MiB, killed once its packs are
    // stored.
    let big = image(2048, 9);
    let h = SimHost::start(|c| c.nbd = cbtfs::sim::NbdMode::None, &big);
    h.sim
        .with(|st| st.faults.export_hangs_after = Some(100 << 20));
    let before = packs();
    let mut child = cbtfs_cmd()
        .envs(rgw.env())
        .args(["backup", &url, "--host", &h.sim.url])
        .args([
            "--password-file",
            s(&h.pw),
            "--vdi",
            &h.vdi,
            "--timeout",
            "600",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "two packs of the hung backup",
        Duration::from_secs(180),
        || packs() >= before + 2,
    );
    child.kill().unwrap();
    child.bounded().unwrap();
    let recs = store.writer_records().unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert!(
        !recs[0].live,
        "a killed writer of this host is dead: {recs:?}"
    );
    let with_garbage = packs();

    // The next run, of another disk, collects what the killed one left.
    let vc = vdi(3);
    let disk_c = image(100, 3);
    let img_c = d.path().join("c");
    std::fs::write(&img_c, &disk_c).unwrap();
    import(rgw, &url, &vc, &img_c, 1);
    assert_eq!(store.writer_records().unwrap(), []);
    assert!(packs() + 2 <= with_garbage + 1, "nothing was collected");
    let v: Value = serde_json::from_str(&s3ok(rgw, &["gc", &url, "--dry-run", "--json"])).unwrap();
    assert_eq!(v["packs_deleted"], 0, "{v}");
    assert_eq!(v["objects_deleted"], 0, "{v}");
    s3ok(rgw, &["verify", &url]);
    assert_same("A", &export(rgw, &url, &va), &disk_a);
    assert_same("B", &export(rgw, &url, &vb), &disk_b);
    assert_same("C", &export(rgw, &url, &vc), &disk_c);
}
