//! Crashes and hostile filesystems: kill -9 at random moments, a full disk, a read-only
//! repository. Nothing half-written may ever become visible; the repository stays writable.

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use crate::common::*;

fn points(repo: &Path) -> Vec<String> {
    let j: serde_json::Value = serde_json::from_str(&ok(&["ls", s(repo), "--json"])).unwrap();
    let mut out = Vec::new();
    for vm in j["vms"].as_array().unwrap() {
        for d in vm["disks"].as_array().unwrap() {
            for set in d["sets"].as_array().unwrap() {
                assert!(set["problems"].as_array().unwrap().is_empty(), "{set}");
                for p in set["points"].as_array().unwrap() {
                    out.push(p["path"].as_str().unwrap().to_string());
                }
            }
        }
    }
    out
}

fn export_bytes(repo: &Path, point: &str) -> Vec<u8> {
    let o = cbtfs(&["export", s(repo), point, "-"]);
    assert!(
        o.status.success(),
        "export {point}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

#[test]
fn kill_9_during_import_never_leaves_a_partial_point() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(4);
    let blocks = 256u64; // 16 MiB
    let img = d.path().join("img");
    let mut data = vec![0u8; blocks as usize * BS];
    let mut rng = TestRng::new(42);
    rng.fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]);
    let mut truth: Vec<Vec<u8>> = vec![data.clone()];
    let all: Vec<u64> = (0..blocks).collect();
    let bm = write_bitmap(d.path(), "bm", &all, blocks);

    // How long an uninterrupted import takes, to spread kills over its whole life.
    let mut step = 1;
    let t0 = Instant::now();
    rng.fill(&mut data[..BS]);
    std::fs::write(&img, &data).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--bitmap",
        s(&bm),
        "--time",
        &time(step),
    ]);
    truth.push(data.clone());
    let full = t0.elapsed();

    let trials = 30;
    let mut committed_during_kill = 0;
    let mut killed_midway = 0;
    for trial in 0..trials {
        step += 1;
        // Change the whole disk so a partial point would be visible as wrong bytes.
        rng.fill(&mut data);
        std::fs::write(&img, &data).unwrap();
        let new_base = trial % 5 == 4;
        let t = time(step);
        let mut args = vec![
            "import",
            s(&repo),
            "--vdi",
            &v,
            "--raw",
            s(&img),
            "--time",
            &t,
        ];
        if !new_base {
            args.extend(["--bitmap", s(&bm)]);
        }
        let before = points(&repo).len();
        let mut child = cbtfs_cmd()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = full.mul_f64(rng.below(1200) as f64 / 1000.0);
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.bounded().unwrap();
        let after = points(&repo);
        if after.len() == before + 1 {
            committed_during_kill += 1;
            truth.push(data.clone());
        } else {
            assert_eq!(after.len(), before, "trial {trial}: points vanished");
            if !status.success() {
                killed_midway += 1;
            }
        }
        // verify passes and every committed point reads exactly as it was.
        let o = cbtfs(&["verify", s(&repo)]);
        assert!(
            o.status.success(),
            "trial {trial}: verify: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert_eq!(after.len(), truth.len());
        for i in [0, after.len() / 2, after.len() - 1] {
            assert!(
                export_bytes(&repo, &after[i]) == truth[i],
                "trial {trial}: point {i} differs"
            );
        }
    }
    eprintln!(
        "{killed_midway} imports killed midway, {committed_during_kill} committed before the kill"
    );
    assert!(
        killed_midway > 0,
        "no kill landed during an import: the test proved nothing"
    );

    // The repository is still writable, and leftovers were cleaned by the next writer.
    step += 1;
    rng.fill(&mut data[..BS]);
    std::fs::write(&img, &data).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--bitmap",
        s(&bm),
        "--time",
        &time(step),
    ]);
    truth.push(data.clone());
    let all_points = points(&repo);
    for (p, want) in all_points.iter().zip(&truth) {
        assert!(export_bytes(&repo, p) == *want, "{p} differs");
    }
    // The next writer removed the killed puts' temporary files; one manifest per point.
    assert_clean(&repo, truth.len());
    // What the killed imports put before their commit (packs, indexes) nothing references:
    // gc collects it, and then finds nothing more.
    let g = gc_report(&repo, &[]);
    eprintln!(
        "gc after the killed imports: {} unreferenced packs, {} index objects deleted",
        g["packs_deleted"], g["objects_deleted"]
    );
    assert_nothing_left(&repo);
    ok(&["verify", s(&repo)]);
    for (p, want) in all_points.iter().zip(&truth) {
        assert!(export_bytes(&repo, p) == *want, "{p} differs after gc");
    }
}

/// Every file below `repo`, relative, sorted.
fn repo_files(repo: &Path) -> Vec<String> {
    let mut v: Vec<String> = files_under(repo)
        .iter()
        .map(|p| p.strip_prefix(repo).unwrap().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// No temporary file of a killed put anywhere, and exactly one manifest per listed point (no
/// older generation, no point a prune superseded).
fn assert_clean(repo: &Path, points: usize) {
    let files = repo_files(repo);
    let temps: Vec<&String> = files
        .iter()
        .filter(|f| {
            let name = f.rsplit('/').next().unwrap_or_default();
            name.starts_with('.') && name.ends_with(".tmp")
        })
        .collect();
    assert!(temps.is_empty(), "temporary files remain: {temps:?}");
    let manifests = files.iter().filter(|f| f.starts_with("points/")).count();
    assert_eq!(manifests, points, "stale manifests remain: {files:?}");
}

/// `cbtfs gc --json` with `extra` arguments: its report.
fn gc_report(repo: &Path, extra: &[&str]) -> serde_json::Value {
    let mut a = vec!["gc", s(repo), "--json"];
    a.extend(extra);
    serde_json::from_str(&ok(&a)).unwrap()
}

/// A further gc (even one repacking everything partly dead) finds nothing to collect.
fn assert_nothing_left(repo: &Path) {
    let g = gc_report(repo, &["--dry-run", "--repack-below", "100"]);
    for what in ["packs_deleted", "packs_repacked", "objects_deleted"] {
        assert_eq!(g[what], 0, "garbage left: {g}");
    }
}

/// What a killed command had done to the repository: the top-level prefixes (`points`,
/// `packs`, ...) under which objects appeared (+) or went (-), or that it finished.
fn phase(before: &[String], after: &[String], finished: bool) -> String {
    if finished {
        return "finished before the kill".into();
    }
    let top = |f: &String| f.split('/').next().unwrap_or_default().to_string();
    let temp = |f: &&String| f.rsplit('/').next().is_some_and(|n| n.starts_with('.'));
    let mut parts = std::collections::BTreeSet::new();
    for f in after.iter().filter(|f| !temp(f)) {
        if f != "lock" && before.binary_search(f).is_err() {
            parts.insert(format!("+{}", top(f)));
        }
    }
    for f in before {
        if after.binary_search(f).is_err() {
            parts.insert(format!("-{}", top(f)));
        }
    }
    if after.iter().any(|f| temp(&f)) {
        parts.insert("temporary file".into());
    }
    if parts.is_empty() {
        "nothing written yet".into()
    } else {
        parts.into_iter().collect::<Vec<_>>().join(" ")
    }
}

/// A repository whose history leaves garbage when pruned: a 8 MiB base and increments that
/// rewrite a quarter of it, so the dropped points' packs are dead or partly live. Returns the
/// images of the points, oldest first.
fn pruneable(dir: &Path, repo: &Path, v: &str, seed: u64) -> Vec<Vec<u8>> {
    let blocks = 128u64;
    let img = dir.join("img");
    let mut data = vec![0u8; blocks as usize * BS];
    let mut rng = TestRng::new(seed);
    rng.fill(&mut data);
    ok(&["init", s(repo)]);
    let mut truth = Vec::new();
    let mut changed: Vec<u64> = Vec::new();
    for step in 0..6u64 {
        if step != 3 {
            changed = (0..32).map(|_| rng.below(blocks)).collect();
            changed.sort();
            changed.dedup();
        }
        // (Step 3 rewrites exactly step 2's blocks: step 2's pack dies once step 2 is dropped
        // and step 3 kept.)
        if step > 0 {
            for &b in &changed {
                rng.fill(&mut data[b as usize * BS..(b as usize + 1) * BS]);
            }
        }
        std::fs::write(&img, &data).unwrap();
        let t = time(step);
        let bm = write_bitmap(dir, "bm", &changed, blocks);
        let mut a = vec![
            "import",
            s(repo),
            "--vdi",
            v,
            "--raw",
            s(&img),
            "--time",
            &t,
        ];
        if step > 0 {
            a.extend(["--bitmap", s(&bm)]);
        }
        ok(&a);
        truth.push(data.clone());
    }
    truth
}

/// Copy a repository (a fresh copy per kill).
fn copy_repo(from: &Path, to: &Path) {
    run("cp", &["-a", s(from), s(to)]);
}

/// Kill `args` (run on a fresh copy of `template` per trial, `{repo}` standing for the copy)
/// at random moments from `earliest` thousandths of an uninterrupted run's time to 1.1 times
/// it; after each kill: the listed points are those
/// `allowed` accepts (given the template's and the finished command's listings), every listed
/// point exports its image, `verify` passes, a rerun of the command completes and leaves the
/// finished command's points, no temporary files and nothing for gc. Returns the phases the
/// kills landed in, with counts.
fn kill_trials(
    dir: &Path,
    template: &Path,
    args: &[&str],
    truth: &std::collections::HashMap<String, Vec<u8>>,
    trials: usize,
    earliest: u64,
    seed: u64,
) -> std::collections::BTreeMap<String, usize> {
    let with = |repo: &Path| -> Vec<String> {
        args.iter()
            .map(|a| {
                if *a == "{repo}" {
                    s(repo).to_string()
                } else {
                    a.to_string()
                }
            })
            .collect()
    };
    let before = points(template);
    let before_files = repo_files(template);
    // One uninterrupted run: how long it takes, and the points it leaves.
    let done = dir.join("done");
    copy_repo(template, &done);
    let t0 = Instant::now();
    let a = with(&done);
    ok(&a.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    let full = t0.elapsed();
    let after = points(&done);
    assert!(after.iter().all(|p| before.contains(p)));
    std::fs::remove_dir_all(&done).unwrap();
    let mut rng = TestRng::new(seed);
    let mut phases = std::collections::BTreeMap::new();
    for trial in 0..trials {
        let repo = dir.join(format!("trial{trial}"));
        copy_repo(template, &repo);
        let a = with(&repo);
        let mut child = cbtfs_cmd()
            .args(&a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let permille = earliest + rng.below(1100 - earliest);
        std::thread::sleep(full.mul_f64(permille as f64 / 1000.0));
        let _ = child.kill();
        let status = child.bounded().unwrap();
        *phases
            .entry(phase(&before_files, &repo_files(&repo), status.success()))
            .or_insert(0) += 1;
        // No committed point the command keeps is lost; nothing but its points is listed.
        let now = points(&repo);
        for p in &after {
            assert!(
                now.contains(p),
                "trial {trial}: kept point {p} lost: {now:?}"
            );
        }
        for p in &now {
            assert!(
                before.contains(p),
                "trial {trial}: {p} is no committed point"
            );
            assert!(
                export_bytes(&repo, p) == truth[p],
                "trial {trial}: {p} reads other bytes"
            );
        }
        let o = cbtfs(&["verify", s(&repo)]);
        assert!(
            o.status.success(),
            "trial {trial}: verify after the kill: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        // The rerun completes what the killed one began.
        ok(&a.iter().map(|x| x.as_str()).collect::<Vec<_>>());
        assert_eq!(points(&repo), after, "trial {trial}: after the rerun");
        assert_clean(&repo, after.len());
        assert_nothing_left(&repo);
        ok(&["verify", s(&repo)]);
        for p in &after {
            assert!(
                export_bytes(&repo, p) == truth[p],
                "trial {trial}: {p} reads other bytes after the rerun"
            );
        }
        std::fs::remove_dir_all(&repo).unwrap();
    }
    phases
}

#[test]
fn kill_9_during_gc_and_prune_loses_no_committed_point() {
    let d = tempfile::tempdir().unwrap();
    let v = vdi(5);
    let repo = d.path().join("repo");
    let images = pruneable(d.path(), &repo, &v, 55);
    let truth: std::collections::HashMap<String, Vec<u8>> =
        points(&repo).into_iter().zip(images).collect();
    let trials = 12;

    // prune runs gc: killed anywhere in the metadata take-over, the manifest deletions or the
    // collection.
    let prune = kill_trials(
        d.path(),
        &repo,
        &["prune", "{repo}", "--keep-last", "2"],
        &truth,
        trials,
        0,
        1,
    );
    // gc after a prune that left its garbage, repacking every partly live pack.
    let garbage = d.path().join("garbage");
    copy_repo(&repo, &garbage);
    ok(&["prune", s(&garbage), "--keep-last", "3", "--no-gc"]);
    let planned = gc_report(&garbage, &["--dry-run", "--repack-below", "100"]);
    assert!(
        planned["packs_repacked"].as_u64() > Some(0) && planned["packs_deleted"].as_u64() > Some(0),
        "no repacking or deleting for gc to be killed in: {planned}"
    );
    let gc = kill_trials(
        d.path(),
        &garbage,
        &["gc", "{repo}", "--repack-below", "100"],
        &truth,
        trials,
        // gc reads every index before its first change: kills from a third of its time on.
        300,
        2,
    );
    for (what, phases) in [("prune", &prune), ("gc", &gc)] {
        eprintln!("{trials} kill -9 of {what}: {phases:?}");
        let midway: usize = phases
            .iter()
            .filter(|(p, _)| !p.starts_with("finished") && *p != "nothing written yet")
            .map(|(_, n)| n)
            .sum();
        assert!(
            midway > 0,
            "no kill of {what} landed after its first change: the test proved nothing"
        );
    }
}

/// A mount made for a test, removed when dropped.
#[test]
fn full_disk_during_import_commits_nothing_and_keeps_earlier_points() {
    if !is_root() {
        skip("mounting a small tmpfs needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let fsdir = d.path().join("small");
    std::fs::create_dir(&fsdir).unwrap();
    run(
        "mount",
        &["-t", "tmpfs", "-o", "size=6m", "tmpfs", s(&fsdir)],
    );
    let _g = MountGuard(fsdir.clone());
    let repo = fsdir.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(6);
    let img = d.path().join("img");
    let mut data = vec![0u8; 64 * BS];
    TestRng::new(6).fill(&mut data[..32 * BS]);
    std::fs::write(&img, &data).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]);
    let first = data.clone();

    let mut big = vec![0u8; 256 * BS]; // 16 MiB: does not fit
    TestRng::new(7).fill(&mut big);
    std::fs::write(&img, &big).unwrap();
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(1),
    ]);
    assert!(
        m.contains("disk is full") && m.contains("nothing partial was committed"),
        "{m}"
    );
    let all: Vec<u64> = (0..256).collect();
    let bm = write_bitmap(d.path(), "bm", &all, 256);
    let (_, m) = fails(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--bitmap",
        s(&bm),
        "--time",
        &time(1),
    ]);
    assert!(m.contains("disk is full"), "{m}");

    assert_eq!(points(&repo).len(), 1);
    ok(&["verify", s(&repo)]);
    assert!(export_bytes(&repo, &format!("{v}@latest")) == first);
    // The failed imports removed what they wrote: the space is free again.
    let used: u64 = files_under(&repo)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(used < 3 << 20, "{used} bytes still used");
    // And a point that fits still goes in.
    std::fs::write(&img, &first).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(2),
    ]);
}

#[test]
fn read_only_repository_reads_but_refuses_to_write() {
    if !is_root() {
        skip("a read-only bind mount needs root");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(8);
    let img = d.path().join("img");
    let mut data = vec![0u8; 16 * BS];
    TestRng::new(8).fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]);
    let ro = d.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    run("mount", &["--bind", s(&repo), s(&ro)]);
    let _g = MountGuard(ro.clone());
    run("mount", &["-o", "remount,bind,ro", s(&ro)]);
    let (_, m) = fails(&[
        "import",
        s(&ro),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(1),
    ]);
    assert!(m.contains("read-only"), "{m}");
    ok(&["ls", s(&ro)]);
    ok(&["verify", s(&ro)]);
    assert!(export_bytes(&ro, &format!("{v}@latest")) == data);
}
