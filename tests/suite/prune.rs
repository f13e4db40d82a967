//! `cbtfs prune`: random chains and random policies keep every kept point byte-identical,
//! reclaim space, survive kill -9 at any moment, and leave an open mount's readers working.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use cbtfs::prune::Policy;
use cbtfs::read::PointReader;

/// Every point in the repository, by time: its bytes.
fn read_all(repo: &Path) -> HashMap<i64, Vec<u8>> {
    let r = open_repo(repo);
    let mut out = HashMap::new();
    for d in r.catalog().unwrap() {
        for set in &d.sets {
            assert!(set.problems.is_empty(), "{:?}", set.problems);
            for p in &set.points {
                let reader = PointReader::open(&r, set, p.seq).unwrap();
                let mut buf = vec![0u8; reader.size() as usize];
                let n = reader.read_at(&mut buf, 0).unwrap();
                assert_eq!(n, buf.len());
                out.insert(p.time, buf);
            }
        }
    }
    out
}

fn dir_bytes(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let md = e.metadata().unwrap();
        n += if md.is_dir() {
            dir_bytes(&e.path())
        } else {
            md.len()
        };
    }
    n
}

fn step_time(i: usize, hours: u64) -> i64 {
    cbtfs::timefmt::parse(&time(i as u64 * hours)).unwrap()
}

#[test]
fn random_chains_and_policies_keep_kept_points_identical() {
    for seed in 0..24u64 {
        let mut rng = TestRng::new(1000 + seed);
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let depth = 3 + rng.below(30) as usize;
        let steps = life(seed + 500, depth);
        let hours = 1 + rng.below(30);
        import_life_spaced(dir.path(), &repo, &steps, seed, hours);
        let policy = Policy {
            last: rng.below(4) as usize,
            daily: rng.below(4) as usize,
            weekly: rng.below(3) as usize,
            monthly: rng.below(2) as usize,
            ..Policy::default()
        };
        let before = dir_bytes(&repo);
        let r = open_repo(&repo);
        let times: Vec<i64> = (0..steps.len()).map(|i| step_time(i, hours)).collect();
        let want_keep = policy.keep(&times);
        let result = cbtfs::prune::prune(&r, policy, None, false, false);
        if policy.is_empty() {
            assert!(
                result.is_err(),
                "seed {seed}: an empty policy must be refused"
            );
            continue;
        }
        let report = result.unwrap();
        let got = read_all(&repo);
        for (i, st) in steps.iter().enumerate() {
            let t = times[i];
            if want_keep[i] {
                let bytes = got
                    .get(&t)
                    .unwrap_or_else(|| panic!("seed {seed}: kept point {i} is gone ({policy:?})"));
                assert!(
                    bytes == &st.image,
                    "seed {seed}: kept point {i} differs ({policy:?})"
                );
            } else {
                assert!(
                    !got.contains_key(&t),
                    "seed {seed}: point {i} should be gone"
                );
            }
        }
        assert_eq!(got.len(), want_keep.iter().filter(|k| **k).count());
        ok(&["verify", s(&repo)]);
        let after = dir_bytes(&repo);
        if report.disks[0].removed > 0 {
            assert!(
                report.bytes_after <= report.bytes_before,
                "seed {seed}: {report:?}"
            );
        }
        assert!(
            after <= before + 64 * 1024 * 8,
            "seed {seed}: {before} -> {after}"
        );
        // Pruning again with the same policy changes nothing.
        let again = cbtfs::prune::prune(&r, policy, None, false, false).unwrap();
        assert_eq!(again.disks[0].removed, 0, "seed {seed}");
    }
}

#[test]
fn cli_dry_run_refusals_and_space_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let steps = life(4242, 20);
    import_life_spaced(dir.path(), &repo, &steps, 7, 24);
    let before_objects = repo_objects(&repo);
    let before = dir_bytes(&repo);
    let (_, err) = fails(&["prune", s(&repo)]);
    assert!(err.contains("--keep-last"), "{err}");
    let out = ok(&["prune", s(&repo), "--keep-last", "3", "--dry-run"]);
    assert!(out.contains("would remove 17 of 20 points"), "{out}");
    assert!(
        repo_objects(&repo) == before_objects,
        "a dry run changes nothing"
    );
    let out = ok(&["prune", s(&repo), "--keep-last", "3"]);
    assert!(out.contains("removed 17 of 20 points"), "{out}");
    assert!(out.contains("reclaimed"), "{out}");
    assert!(dir_bytes(&repo) < before);
    let got = read_all(&repo);
    for i in 17..20 {
        assert!(got[&step_time(i, 24)] == steps[i].image, "point {i}");
    }
    // A prune waits for, then names, a writer holding the repository.
    let r = open_repo(&repo);
    let lock = r.lock_exclusive("cbtfs backup from https://xs1").unwrap();
    let (_, err) = fails(&["prune", s(&repo), "--keep-last", "1"]);
    assert!(err.contains("cbtfs backup from https://xs1"), "{err}");
    drop(lock);
}

#[test]
fn kill_9_at_random_moments_then_rerun() {
    let mut rng = TestRng::new(99);
    for trial in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let steps = life(trial + 70, 40);
        import_life_spaced(dir.path(), &repo, &steps, trial, 7);
        let times: Vec<i64> = (0..steps.len()).map(|i| step_time(i, 7)).collect();
        let policy = Policy {
            last: 2,
            daily: 3,
            ..Policy::default()
        };
        let keep = policy.keep(&times);
        let mut child = cbtfs_cmd()
            .args(["prune", s(&repo), "--keep-last", "2", "--keep-daily", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(120)));
        let _ = child.kill();
        let _ = child.wait();
        // Whatever the moment: every point still listed reads exactly, and every kept one is
        // still there.
        let got = read_all(&repo);
        for (i, st) in steps.iter().enumerate() {
            match got.get(&times[i]) {
                Some(b) => assert!(b == &st.image, "trial {trial}: point {i} differs"),
                None => assert!(!keep[i], "trial {trial}: kept point {i} lost"),
            }
        }
        // A rerun finishes the job.
        ok(&["prune", s(&repo), "--keep-last", "2", "--keep-daily", "3"]);
        ok(&["verify", s(&repo)]);
        let got = read_all(&repo);
        assert_eq!(
            got.len(),
            keep.iter().filter(|k| **k).count(),
            "trial {trial}"
        );
        // Nothing the killed run left is still there: no temporary file of a put (hidden
        // names), no manifest of an older generation or of a superseded point, no point index
        // no manifest names.
        let all = repo_objects(&repo);
        let leftovers: Vec<_> = all
            .keys()
            .filter(|k| k.split('/').any(|part| part.starts_with('.')))
            .collect();
        assert!(leftovers.is_empty(), "trial {trial}: {leftovers:?}");
        let r = open_repo(&repo);
        assert_eq!(
            r.stale_manifests().unwrap(),
            Vec::<String>::new(),
            "trial {trial}"
        );
        let mut named: Vec<String> = Vec::new();
        for d in r.catalog().unwrap() {
            for set in &d.sets {
                named.extend(set.points.iter().map(|p| p.index.key.clone()));
            }
        }
        named.sort();
        let stored: Vec<String> = all
            .keys()
            .filter(|k| k.starts_with("pindex/"))
            .cloned()
            .collect();
        assert_eq!(stored, named, "trial {trial}: point indexes");
    }
}

#[test]
fn prune_under_an_open_mount() {
    if !can_mount() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let steps = life(31337, 12);
    import_life_spaced(dir.path(), &repo, &steps, 3, 24);
    let mp = dir.path().join("mnt");
    let m = Mounted::new(&repo, &mp, &[]);
    let paths = point_paths(&repo);
    assert_eq!(paths.len(), steps.len());
    // Open and start reading a kept point that the prune rewrites (it absorbs the removed
    // ones before it) and a removed point.
    let kept = std::fs::File::open(m.mp.join(&paths[10])).unwrap();
    let removed = std::fs::File::open(m.mp.join(&paths[5])).unwrap();
    let mut head = [0u8; 4096];
    kept.read_exact_at(&mut head, 0).unwrap();
    removed.read_exact_at(&mut head, 0).unwrap();
    let out = ok(&["prune", s(&repo), "--keep-last", "2"]);
    assert!(out.contains("rewritten"), "{out}");
    let mut buf = vec![0u8; steps[10].image.len()];
    kept.read_exact_at(&mut buf, 0).unwrap();
    assert!(
        buf == steps[10].image,
        "the kept point changed under its reader"
    );
    let mut buf = vec![0u8; steps[5].image.len()];
    match removed.read_exact_at(&mut buf, 0) {
        Ok(()) => assert!(
            buf == steps[5].image,
            "a removed point's open file read wrong bytes"
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    // New opens see the pruned history.
    wait_for(
        "the mount to drop removed points",
        Duration::from_secs(5),
        || !m.mp.join(&paths[5]).exists(),
    );
    for i in [10, 11] {
        let again = std::fs::read(m.mp.join(&paths[i])).unwrap();
        assert!(
            again == steps[i].image,
            "point {i} reopened after the prune"
        );
    }
    drop((kept, removed));
    drop(m);
}

/// `prune --dry-run` says what the repository would hold afterwards: exactly what the real run
/// then reports (metadata written and deleted, packs deleted and repacked, chunk index objects
/// rewritten), on random chains with zero blocks, resizes and new sets.
#[test]
fn dry_run_bytes_after_equals_the_real_runs() {
    for seed in 0..20u64 {
        let mut rng = TestRng::new(7000 + seed);
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let steps = life(seed + 900, 3 + rng.below(25) as usize);
        import_life_spaced(dir.path(), &repo, &steps, seed, 1 + rng.below(30));
        let mut policy = Policy {
            last: rng.below(4) as usize,
            daily: rng.below(3) as usize,
            weekly: rng.below(2) as usize,
            monthly: 0,
            ..Policy::default()
        };
        if policy.is_empty() {
            policy.last = 1;
        }
        let r = open_repo(&repo);
        let dry = cbtfs::prune::prune(&r, policy, None, true, false).unwrap();
        let real = cbtfs::prune::prune(&r, policy, None, false, false).unwrap();
        assert_eq!(dry.bytes_before, real.bytes_before, "seed {seed}");
        assert_eq!(
            dry.bytes_after, real.bytes_after,
            "seed {seed}: dry run vs real run ({policy:?})"
        );
        assert_eq!(dry.bytes_written, real.bytes_written, "seed {seed}");
        let (dg, rg) = (dry.gc.unwrap(), real.gc.unwrap());
        assert_eq!(
            (
                dg.bytes_freed,
                dg.bytes_written,
                dg.packs_deleted,
                dg.packs_repacked
            ),
            (
                rg.bytes_freed,
                rg.bytes_written,
                rg.packs_deleted,
                rg.packs_repacked
            ),
            "seed {seed}: dry run's gc vs the real one"
        );
        assert!(real.bytes_after > 0, "seed {seed}");
    }

    // Through the command line, with --json and in words.
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    import_life_spaced(dir.path(), &repo, &life(4243, 12), 9, 24);
    let j = |args: &[&str]| -> serde_json::Value { serde_json::from_str(&ok(args)).unwrap() };
    let dry = j(&["prune", s(&repo), "--keep-last", "2", "--dry-run", "--json"]);
    let words = ok(&["prune", s(&repo), "--keep-last", "2", "--dry-run"]);
    assert!(words.contains("would be reclaimed"), "{words}");
    let real = j(&["prune", s(&repo), "--keep-last", "2", "--json"]);
    assert_eq!(dry["dry_run"], true);
    assert!(dry["bytes_after"].as_u64().unwrap() > 0, "{dry}");
    assert_eq!(dry["bytes_after"], real["bytes_after"], "{dry}\n{real}");
    assert_eq!(dry["bytes_before"], real["bytes_before"]);
}
