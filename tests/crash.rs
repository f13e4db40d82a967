//! Crashes and hostile filesystems: kill -9 at random moments, a full disk, a read-only
//! repository. Nothing half-written may ever become visible; the repository stays writable.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;

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
        let status = child.wait().unwrap();
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
    let mut names = Vec::new();
    for set in std::fs::read_dir(repo.join("disks").join(&v)).unwrap() {
        for f in std::fs::read_dir(set.unwrap().path()).unwrap() {
            names.push(f.unwrap().file_name().to_string_lossy().to_string());
        }
    }
    let manifests = names.iter().filter(|n| n.ends_with(".point")).count();
    let datas = names.iter().filter(|n| n.ends_with(".data")).count();
    assert_eq!(manifests, truth.len());
    assert_eq!(datas, truth.len(), "orphaned data files remain: {names:?}");
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
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
