//! Concurrent writers of one local repository (issue 20: "each disk takes a lock of its own";
//! issue 19: "the next run collects what is unreferenced"). Overlap is proven, never hoped
//! for: one writer is held mid-transfer (a point written through the library and not yet
//! committed, or a backup whose host stops sending) while the other one runs to its end.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use cbtfs::repo::{NewPoint, RepoError};
use serde_json::Value;

/// `blocks` blocks of random bytes (each distinct: nothing dedups), every seventh zero.
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

fn write_image(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn import(repo: &Path, v: &str, img: &Path, step: u64) {
    ok(&[
        "import",
        s(repo),
        "--vdi",
        v,
        "--raw",
        s(img),
        "--time",
        &time(step),
    ]);
}

/// The newest point of disk `v`, exported.
fn export(repo: &Path, v: &str) -> Vec<u8> {
    let o = cbtfs(&["export", s(repo), &format!("{v}@latest"), "-"]);
    assert!(o.status.success(), "{}", text(&o));
    o.stdout
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

/// The pack files of the repository (relative paths).
fn packs(repo: &Path) -> BTreeSet<String> {
    let dir = repo.join("packs");
    if !dir.exists() {
        return BTreeSet::new();
    }
    files_under(&dir)
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .map(|p| p.strip_prefix(repo).unwrap().display().to_string())
        .collect()
}

/// The writer records left in the repository.
fn records(repo: &Path) -> Vec<String> {
    let dir = repo.join("locks/writers");
    if !dir.exists() {
        return Vec::new();
    }
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

fn spec(vdi: &str, step: u64, len: usize) -> NewPoint {
    NewPoint {
        vdi: vdi.to_string(),
        disk_name: "disk".into(),
        vm_uuid: None,
        vm_name: None,
        time: 1_767_232_800 + step as i64 * 3600,
        virtual_size: len as u64,
        source: "test writer".into(),
        new_set: true,
        snapshot: None,
        vm_metadata: None,
        vdi_type: None,
        vm_run: None,
    }
}

/// Nothing unreferenced is left: a gc would delete and rewrite nothing.
fn assert_nothing_to_collect(repo: &Path) {
    let v: Value = serde_json::from_str(&ok(&["gc", s(repo), "--dry-run", "--json"])).unwrap();
    assert_eq!(v["packs_deleted"], 0, "{v}");
    assert_eq!(v["packs_repacked"], 0, "{v}");
    assert_eq!(v["objects_deleted"], 0, "{v}");
    assert_eq!(v["manifests_deleted"], 0, "{v}");
}

/// `cbtfs backup` of `h`'s disk into `repo`.
fn backup_into(h: &SimHost, repo: &Path) -> std::process::Command {
    let mut c = cbtfs_cmd();
    c.args(["backup", s(repo), "--host", &h.sim.url]).args([
        "--password-file",
        s(&h.pw),
        "--vdi",
        &h.vdi,
        "--json",
    ]);
    c
}

#[test]
fn writers_of_different_disks_run_at_once_and_both_points_are_exact() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("repo");
    ok(&["init", s(&root)]);
    let disk_b = image(256, 5);
    let h = SimHost::start(|_| {}, &disk_b);

    // Writer A (this process): a point of 1,200 blocks, stopped after 700 of them, its
    // first pack stored.
    let repo = open_repo(&root);
    let va = vdi(1);
    let disk_a = image(1200, 1);
    let shared = repo.lock_shared("test writer of disk A").unwrap();
    let lock_a = shared.lock_disk(&va, "test writer of disk A").unwrap();
    let mut w = repo
        .begin_point(&lock_a, spec(&va, 1, disk_a.len()))
        .unwrap();
    w.add_run(0, &disk_a[..700 * BS], true).unwrap();
    wait_for("writer A's first pack", Duration::from_secs(60), || {
        !packs(&root).is_empty()
    });

    // Writer B (another process): a whole backup of another disk, meanwhile.
    let o = backup_into(&h, &root).bounded().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["disks"][0]["kind"], "base", "{v}");
    assert_same(
        "B, committed while A is mid-point",
        &export(&root, &h.vdi),
        &disk_b,
    );
    assert!(!repo.disk_ids().unwrap().contains(&va), "A committed early");

    // A goes on and commits.
    w.add_run(700, &disk_a[700 * BS..], true).unwrap();
    let m = w.commit().unwrap();
    assert_eq!(m.vdi, va);
    drop(lock_a);
    drop(shared);
    assert_same("A", &export(&root, &va), &disk_a);
    assert_same("B", &export(&root, &h.vdi), &disk_b);
    ok(&["verify", s(&root)]);
    assert_nothing_to_collect(&root);
    assert_eq!(records(&root), Vec::<String>::new());
}

#[test]
fn a_second_writer_of_one_disk_fails_naming_the_first() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("repo");
    ok(&["init", s(&root)]);
    let (va, vb) = (vdi(1), vdi(2));
    let img_a = write_image(d.path(), "a", &image(40, 1));
    let img_b = write_image(d.path(), "b", &image(40, 2));
    let repo = open_repo(&root);
    let shared = repo.lock_shared("cbtfs test").unwrap();
    let lock_a = shared.lock_disk(&va, "cbtfs test writer of A").unwrap();

    // Another process.
    let o = cbtfs(&[
        "import",
        s(&root),
        "--vdi",
        &va,
        "--raw",
        s(&img_a),
        "--time",
        &time(1),
    ]);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(e.contains("being written by another process"), "{e}");
    assert!(e.contains("(cbtfs test writer of A)"), "{e}");
    assert!(e.contains(&format!("writing disk {va}")), "{e}");
    assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
    // This process.
    match shared.lock_disk(&va, "second") {
        Err(RepoError::Locked { holder, .. }) => {
            assert!(holder.contains("(cbtfs test writer of A)"), "{holder}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("one disk locked twice"),
    }
    // Another disk goes at once; A's own writer can still write.
    import(&root, &vb, &img_b, 1);
    let mut w = repo.begin_point(&lock_a, spec(&va, 1, 40 * BS)).unwrap();
    w.add_run(0, &image(40, 1), true).unwrap();
    w.commit().unwrap();
    drop(lock_a);
    drop(shared);
    // Released: the other process takes it now.
    import(&root, &va, &img_a, 2);
    assert_same("A", &export(&root, &va), &image(40, 1));
    assert_same("B", &export(&root, &vb), &image(40, 2));
}

#[test]
fn prune_of_one_disk_does_not_wait_for_another_disks_transfer_and_defers_gc() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("repo");
    ok(&["init", s(&root)]);
    let (va, vb) = (vdi(1), vdi(2));
    let imgs: Vec<Vec<u8>> = (0..3).map(|k| image(600, 10 + k)).collect();
    for (k, data) in imgs.iter().enumerate() {
        let p = write_image(d.path(), &format!("a{k}"), data);
        import(&root, &va, &p, k as u64 + 1);
    }
    // Disk B's writer, mid-transfer (its first pack stored).
    let repo = open_repo(&root);
    let disk_b = image(900, 20);
    let shared = repo.lock_shared("test writer of disk B").unwrap();
    let lock_b = shared.lock_disk(&vb, "test writer of disk B").unwrap();
    let before_b = packs(&root);
    let mut w = repo
        .begin_point(&lock_b, spec(&vb, 1, disk_b.len()))
        .unwrap();
    w.add_run(0, &disk_b[..600 * BS], true).unwrap();
    wait_for("writer B's first pack", Duration::from_secs(60), || {
        packs(&root).len() > before_b.len()
    });
    let held = packs(&root);

    let out = ok(&["prune", s(&root), "--keep-last", "1", "--vdi", &va]);
    assert!(
        out.contains("left for a later gc: 1 backup is running"),
        "{out}"
    );
    assert!(out.contains("(test writer of disk B)"), "{out}");
    let history = open_repo(&root).disk(&va).unwrap();
    assert_eq!(history.sets.len(), 1, "{history:?}");
    assert_eq!(history.sets[0].points.len(), 1, "{history:?}");
    // Nothing was deleted while B runs: every pack is still there.
    assert!(packs(&root).is_superset(&held));
    // gc itself refuses while B runs, naming it.
    let o = cbtfs(&["gc", s(&root)]);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(e.contains("1 writer is running"), "{e}");
    assert!(e.contains("(test writer of disk B)"), "{e}");
    assert!(packs(&root).is_superset(&held));

    w.add_run(600, &disk_b[600 * BS..], true).unwrap();
    w.commit().unwrap();
    drop(lock_b);
    drop(shared);
    // Now the gc runs: the dropped points' packs go.
    ok(&["gc", s(&root)]);
    assert!(packs(&root).len() < held.len(), "nothing was collected");
    assert_nothing_to_collect(&root);
    ok(&["verify", s(&root)]);
    assert_same("A", &export(&root, &va), &imgs[2]);
    assert_same("B", &export(&root, &vb), &disk_b);
}

#[test]
fn a_killed_backup_is_collected_by_the_next_run_of_another_disk() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("repo");
    ok(&["init", s(&root)]);
    let (vc, vd, ve) = (vdi(3), vdi(4), vdi(5));
    let img_c = image(100, 3);
    import(&root, &vc, &write_image(d.path(), "c", &img_c), 1);
    let packs0 = packs(&root);

    // A backup whose host stops sending after 100 MiB of a 128 MiB disk: its first packs
    // are stored, then it waits forever (until killed).
    let big = image(2048, 9);
    let h = SimHost::start(|c| c.nbd = cbtfs::sim::NbdMode::None, &big);
    h.sim
        .with(|st| st.faults.export_hangs_after = Some(100 << 20));
    let mut child = backup_into(&h, &root)
        .args(["--timeout", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "two packs of the hung backup",
        Duration::from_secs(120),
        || packs(&root).len() >= packs0.len() + 2,
    );
    assert_eq!(records(&root).len(), 1);
    // Another process writes another disk meanwhile: it does not wait, and it collects
    // nothing (the hung backup is live).
    let img_d = image(100, 4);
    import(&root, &vd, &write_image(d.path(), "d", &img_d), 1);
    assert_eq!(records(&root).len(), 1);

    child.kill().unwrap(); // SIGKILL
    child.bounded().unwrap();
    let before = packs(&root);
    assert_eq!(
        records(&root).len(),
        1,
        "the killed writer's record is left"
    );

    // The next run (of yet another disk) collects what the killed one left.
    let img_e = image(100, 5);
    import(&root, &ve, &write_image(d.path(), "e", &img_e), 1);
    assert_eq!(records(&root), Vec::<String>::new());
    let after = packs(&root);
    let gone: Vec<&String> = before.difference(&after).collect();
    assert!(gone.len() >= 2, "{gone:?}");
    assert!(gone.iter().all(|p| !packs0.contains(*p)), "{gone:?}");
    assert_nothing_to_collect(&root);
    ok(&["verify", s(&root)]);
    assert_same("C", &export(&root, &vc), &img_c);
    assert_same("D", &export(&root, &vd), &img_d);
    assert_same("E", &export(&root, &ve), &img_e);
    // And the killed disk's next backup is a full one that reads back exactly.
    h.sim.with(|st| st.faults.export_hangs_after = None);
    let o = backup_into(&h, &root).bounded().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_same("the killed disk", &export(&root, &h.vdi), &big);
    ok(&["verify", s(&root)]);
}
