//! The mount through a real kernel FUSE mount: contents, holes, guest filesystems, concurrency,
//! damage, live updates, lifecycle and `mount -t cbtfs`. Needs root and /dev/fuse (CI has both).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

#[test]
fn every_point_of_random_chains_reads_exactly_through_the_mount() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let steps = life(4242, 200);
    import_life(d.path(), &repo, &steps, 4242);
    let m = Mounted::new(&repo, &d.path().join("mnt"), &[]);
    let paths = point_paths(&repo);
    assert_eq!(paths.len(), steps.len());
    let refimg = d.path().join("ref.raw");
    for (i, (p, st)) in paths.iter().zip(&steps).enumerate() {
        let f = m.mp.join(p);
        assert_eq!(std::fs::metadata(&f).unwrap().len(), st.image.len() as u64);
        assert!(
            std::fs::read(&f).unwrap() == st.image,
            "point {i} ({p}) differs"
        );
        std::fs::write(&refimg, &st.image).unwrap();
        run(
            "qemu-img",
            &["compare", "-q", "-f", "raw", "-F", "raw", s(&f), s(&refimg)],
        );
    }
    // Reads at odd offsets and lengths, across blocks and the end.
    let last = &steps.last().unwrap().image;
    let f = File::open(m.mp.join(paths.last().unwrap())).unwrap();
    let mut rng = TestRng::new(5);
    for _ in 0..200 {
        let off = rng.below(last.len() as u64 + 10);
        let mut buf = vec![0u8; rng.below(300_000) as usize];
        let n = f.read_at(&mut buf, off).unwrap();
        let end = (off as usize + buf.len()).min(last.len()).max(off as usize);
        assert_eq!(n, end.saturating_sub(off as usize));
        assert!(buf[..n] == last[off as usize..off as usize + n]);
    }
}

#[test]
fn holes_show_to_cp_and_qemu_img_and_convert_round_trips() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(20);
    let mut data = vec![0u8; 256 * BS];
    let mut rng = TestRng::new(20);
    for b in [0usize, 1, 2, 50, 100, 101, 255] {
        rng.fill(&mut data[b * BS..(b + 1) * BS]);
    }
    let img = d.path().join("img");
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
    let m = Mounted::new(&repo, &d.path().join("mnt"), &[]);
    let f = m.mp.join("by-uuid").join(&v).join("latest.raw");

    let copy = d.path().join("copy.raw");
    run("cp", &["--sparse=always", s(&f), s(&copy)]);
    assert!(std::fs::read(&copy).unwrap() == data);
    assert!(
        allocated(&copy) <= 8 * BS as u64,
        "cp --sparse made {} bytes",
        allocated(&copy)
    );

    // qemu-img map asks SEEK_DATA/SEEK_HOLE: it must see exactly the 7 data blocks.
    let map: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", s(&f)],
    ))
    .unwrap();
    let mut data_bytes = 0;
    for e in map.as_array().unwrap() {
        if e["data"].as_bool().unwrap() {
            data_bytes += e["length"].as_u64().unwrap();
            let start = e["start"].as_u64().unwrap() as usize / BS;
            assert!(
                [0, 50, 100, 255].contains(&start),
                "data extent at block {start}"
            );
        }
    }
    assert_eq!(data_bytes, 7 * BS as u64);
    let st = std::fs::metadata(&f).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        st.blocks() * 512,
        7 * BS as u64,
        "st_blocks counts stored data only"
    );

    let q = d.path().join("p.qcow2");
    let back = d.path().join("back.raw");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&f), s(&q)],
    );
    run("qemu-img", &["convert", "-O", "raw", s(&q), s(&back)]);
    assert!(std::fs::read(&back).unwrap() == data);
}

/// Blocks that differ between two images: what CBT would report.
fn diff_blocks(a: &[u8], b: &[u8]) -> Vec<u64> {
    (0..b.len().div_ceil(BS))
        .filter(|&i| {
            let r = i * BS..((i + 1) * BS).min(b.len());
            a.get(r.clone()) != b.get(r)
        })
        .map(|i| i as u64)
        .collect()
}

#[test]
fn guest_ext4_files_at_each_point_through_a_loop_mount() {
    let _host = host_state();
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let tree = dp.join("tree");
    std::fs::create_dir_all(tree.join("docs")).unwrap();
    std::fs::write(tree.join("docs/a.txt"), "version 0\n").unwrap();
    std::fs::write(tree.join("keep.txt"), "unchanged\n").unwrap();
    let img = dp.join("guest.img");
    run("mkfs.ext4", &["-q", "-F", "-d", s(&tree), s(&img), "64M"]);
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(21);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--name",
        "guest",
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]);
    let mut expected = vec![vec![
        ("docs/a.txt", Some("version 0\n")),
        ("docs/b.txt", None),
    ]];
    for (step, (a, b)) in [("version 1\n", Some("new file\n")), ("version 2\n", None)]
        .into_iter()
        .enumerate()
    {
        let before = std::fs::read(&img).unwrap();
        let local = dp.join("local");
        std::fs::write(&local, a).unwrap();
        let mut cmds = format!("rm /docs/a.txt\nwrite {} /docs/a.txt\n", s(&local));
        match b {
            Some(text) => {
                let lb = dp.join("localb");
                std::fs::write(&lb, text).unwrap();
                cmds.push_str(&format!("write {} /docs/b.txt\n", s(&lb)));
            }
            None => cmds.push_str("rm /docs/b.txt\n"),
        }
        std::fs::write(dp.join("cmds"), cmds).unwrap();
        run("debugfs", &["-w", "-f", s(&dp.join("cmds")), s(&img)]);
        let after = std::fs::read(&img).unwrap();
        let bm = write_bitmap(
            dp,
            "bm",
            &diff_blocks(&before, &after),
            (after.len() / BS) as u64,
        );
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
            &time(step as u64 + 1),
        ]);
        expected.push(vec![("docs/a.txt", Some(a)), ("docs/b.txt", b)]);
    }
    let m = Mounted::new(&repo, &dp.join("mnt"), &[]);
    let paths = point_paths(&repo);
    assert_eq!(paths.len(), 3);
    for (p, want) in paths.iter().zip(&expected) {
        let gm = dp.join("guest");
        std::fs::create_dir_all(&gm).unwrap();
        run("mount", &["-o", "loop,ro,noload", s(&m.mp.join(p)), s(&gm)]);
        let check = (|| {
            for (file, content) in want {
                let got = std::fs::read_to_string(gm.join(file)).ok();
                if got.as_deref() != *content {
                    return Err(format!("{p}: {file} is {got:?}, want {content:?}"));
                }
            }
            if std::fs::read_to_string(gm.join("keep.txt")).ok().as_deref() != Some("unchanged\n") {
                return Err(format!("{p}: keep.txt changed"));
            }
            Ok(())
        })();
        run("umount", &[s(&gm)]);
        check.unwrap();
    }
}

#[test]
fn concurrent_readers_while_points_are_added() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(22);
    let blocks = 512; // 32 MiB
    let mut data = vec![0u8; blocks * BS];
    let mut rng = TestRng::new(22);
    rng.fill(&mut data);
    let img = dp.join("img");
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
    let mut truth = vec![data.clone()];
    let m = Mounted::new(&repo, &dp.join("mnt"), &[]);
    let first = m.mp.join(&point_paths(&repo)[0]);

    let fio = Command::new("fio")
        .args([
            "--name=readers",
            "--readonly",
            "--rw=randread",
            "--bs=64k",
            "--numjobs=4",
            "--ioengine=psync",
            "--time_based",
            "--runtime=4",
            "--group_reporting",
            &format!("--filename={}", s(&first)),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio is installed (scripts/setup.sh)");

    let base = truth[0].clone();
    std::thread::scope(|sc| {
        // A checking reader: point 0 must read the same while the set grows.
        let reader = sc.spawn(|| {
            let f = File::open(&first).unwrap();
            let mut rng = TestRng::new(99);
            let mut buf = vec![0u8; 3 * BS];
            for _ in 0..300 {
                let off = rng.below((blocks - 3) as u64 * BS as u64);
                f.read_exact_at(&mut buf, off).unwrap();
                assert!(buf == base[off as usize..off as usize + buf.len()]);
            }
        });
        for step in 1..=10u64 {
            let mut changed = Vec::new();
            for _ in 0..20 {
                let b = rng.below(blocks as u64);
                rng.fill(&mut data[b as usize * BS..(b as usize + 1) * BS]);
                changed.push(b);
            }
            changed.sort();
            changed.dedup();
            std::fs::write(&img, &data).unwrap();
            let bm = write_bitmap(dp, "bm", &changed, blocks as u64);
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
            // The new point is there at once, and reads right.
            let p = point_paths(&repo).pop().unwrap();
            let got = std::fs::read(m.mp.join(&p)).unwrap();
            assert!(got == data, "new point {p} reads wrong");
        }
        reader.join().unwrap();
    });
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("err= 0"), "fio saw errors: {text}");
    // Every point, old and new, still reads exactly.
    let paths = point_paths(&repo);
    assert_eq!(paths.len(), 11);
    for (p, want) in paths.iter().zip(&truth) {
        assert!(std::fs::read(m.mp.join(p)).unwrap() == *want, "{p}");
    }
    let latest = std::fs::read_link(
        m.mp.join("no-vm")
            .join(format!("disk-{}", &v[..8]))
            .join("latest.raw"),
    )
    .unwrap();
    assert!(
        paths
            .last()
            .unwrap()
            .ends_with(latest.file_name().unwrap().to_str().unwrap()),
        "{latest:?}"
    );
}

#[test]
fn damaged_block_fails_only_its_range_and_is_logged() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(23);
    let mut data = vec![0u8; 32 * BS];
    TestRng::new(23).fill(&mut data);
    let img = dp.join("img");
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
    // A second disk, undamaged: other bytes, so that it shares no chunk with the first
    // (format 2 stores a chunk once for every disk holding it).
    let mut other = vec![0u8; 32 * BS];
    TestRng::new(24).fill(&mut other);
    let img2 = dp.join("img2");
    std::fs::write(&img2, &other).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &vdi(24),
        "--raw",
        s(&img2),
        "--time",
        &time(0),
    ]);
    // Flip one bit inside the chunk record of block 10.
    let r = open_repo(&repo);
    let point = r.disk(&v).unwrap().sets[0].points[0].clone();
    let (pack, loc) = r.locate_block(&point, 10).unwrap().unwrap();
    drop(r);
    let pack = repo.join(pack);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[loc.offset as usize + loc.len as usize / 2] ^= 0x01;
    std::fs::write(&pack, bytes).unwrap();

    let m = Mounted::new(&repo, &dp.join("mnt"), &[]);
    let f = File::open(m.mp.join("by-uuid").join(&v).join("latest.raw")).unwrap();
    let mut buf = vec![0u8; BS];
    f.read_exact_at(&mut buf, 9 * BS as u64).unwrap();
    assert!(buf == data[9 * BS..10 * BS]);
    let e = f.read_exact_at(&mut buf, 10 * BS as u64).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let mut small = vec![0u8; 512];
    let e = f
        .read_exact_at(&mut small, 10 * BS as u64 + 4096)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    f.read_exact_at(&mut buf, 11 * BS as u64).unwrap();
    assert!(buf == data[11 * BS..12 * BS]);
    f.read_exact_at(&mut small, 10 * BS as u64 - 512).unwrap();
    assert!(small == data[10 * BS - 512..10 * BS]);
    // Reading the whole file stops at the damage; the rest of the mount serves on.
    let mut all = Vec::new();
    assert!(
        File::open(m.mp.join("by-uuid").join(&v).join("latest.raw"))
            .unwrap()
            .read_to_end(&mut all)
            .is_err()
    );
    assert!(std::fs::read(m.mp.join("by-uuid").join(vdi(24)).join("latest.raw")).unwrap() == other);
    let log = m.log();
    assert!(
        log.contains("damaged block") && log.contains("block=10") && log.contains(&v),
        "log: {log}"
    );
}

#[test]
fn removed_set_disappears_while_open_files_keep_reading() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(25);
    let mut data = vec![0u8; 16 * BS];
    TestRng::new(25).fill(&mut data);
    let img = dp.join("img");
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
    let mut data2 = data.clone();
    TestRng::new(26).fill(&mut data2);
    std::fs::write(&img, &data2).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(1),
    ]);
    let m = Mounted::new(&repo, &dp.join("mnt"), &[]);
    let paths = point_paths(&repo);
    let old = m.mp.join(&paths[0]);
    let f = File::open(&old).unwrap();
    let mut buf = vec![0u8; data.len()];
    f.read_exact_at(&mut buf, 0).unwrap();
    // Remove the first set from the repository, as a prune does before its gc: delete the
    // set's manifests.
    let r = open_repo(&repo);
    let sets = r.disk(&v).unwrap().sets;
    assert_eq!(sets.len(), 2);
    for p in &sets[0].points {
        std::fs::remove_file(repo.join(p.key())).unwrap();
    }
    drop(r);
    let mut again = vec![0u8; data.len()];
    f.read_exact_at(&mut again, 0).unwrap();
    assert!(again == data, "an open file of a removed point changed");
    let disk_dir = old.parent().unwrap().parent().unwrap().to_path_buf();
    wait_for(
        "the removed set to disappear",
        Duration::from_secs(5),
        || {
            std::fs::read_dir(&disk_dir)
                .unwrap()
                .all(|e| e.unwrap().path() != old.parent().unwrap())
        },
    );
    assert!(std::fs::read(m.mp.join(&paths[1])).unwrap() == data2);
}

#[test]
fn lifecycle_background_signals_stale_mounts_and_read_only() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let img = dp.join("img");
    std::fs::write(&img, vec![1u8; 4 * BS]).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &vdi(27),
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]);
    let mp = dp.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp = std::fs::canonicalize(&mp).unwrap();
    let daemon_pids = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                (cmd.contains(" mount ") && cmd.contains(s(&mp)) && cmd.contains("cbtfs"))
                    .then_some(pid)
            })
            .collect()
    };

    // Background mode: returns once the mount is ready.
    ok(&["mount", s(&repo), s(&mp)]);
    assert_eq!(cbtfs::mount::mounted_fstype(&mp).as_deref(), Some("fuse"));
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.contains(s(&mp))).unwrap();
    assert!(!line.contains("allow_other"), "{line}");
    assert_eq!(daemon_pids().len(), 1);
    // Read-only, with EROFS.
    for r in [
        std::fs::write(mp.join("new"), b"x").err(),
        std::fs::create_dir(mp.join("d")).err(),
        std::fs::OpenOptions::new()
            .write(true)
            .open(mp.join("no-vm/disk-0000001b/latest.raw"))
            .err(),
    ] {
        assert_eq!(r.and_then(|e| e.raw_os_error()), Some(libc::EROFS));
    }
    // A second mount there is refused clearly.
    let (_, m) = fails(&["mount", s(&repo), s(&mp)]);
    assert!(m.contains("already a mount point"), "{m}");
    // umount ends the daemon.
    run("umount", &[s(&mp)]);
    wait_for(
        "the daemon to exit after umount",
        Duration::from_secs(10),
        || daemon_pids().is_empty(),
    );

    // SIGTERM in the foreground unmounts and exits 0.
    let mut m = Mounted::new(&repo, &mp, &["-o", "allow_other"]);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        info.lines()
            .any(|l| l.contains(s(&mp)) && l.contains("allow_other"))
    );
    let st = m.stop();
    assert!(st.success(), "exit status {st}");
    assert!(
        cbtfs::mount::mounted_fstype(&mp).is_none(),
        "still mounted after SIGTERM"
    );
    drop(m);

    // kill -9 leaves a dead mount; the next cbtfs mount recovers it.
    ok(&["mount", s(&repo), s(&mp)]);
    for pid in daemon_pids() {
        // SAFETY: kill with a pid read from /proc.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait_for("the daemon to die", Duration::from_secs(10), || {
        daemon_pids().is_empty()
    });
    let dead = std::fs::read_dir(&mp).err().and_then(|e| e.raw_os_error());
    assert!(
        matches!(dead, Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)),
        "{dead:?}"
    );
    let o = cbtfs(&["mount", s(&repo), s(&mp)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no longer runs"));
    assert!(std::fs::read_dir(&mp).unwrap().count() > 0);
    run("umount", &[s(&mp)]);
    wait_for("the daemon to exit", Duration::from_secs(10), || {
        daemon_pids().is_empty()
    });

    // Bad option and missing mount point: clear errors.
    let (_, m) = fails(&["mount", s(&repo), s(&mp), "-o", "bogus"]);
    assert!(m.contains("unknown mount option `bogus`"), "{m}");
    let (_, m) = fails(&["mount", s(&repo), s(&dp.join("nope"))]);
    assert!(m.contains("does not exist") && m.contains("mkdir"), "{m}");
    let (_, m) = fails(&["mount", s(dp), s(&mp)]);
    assert!(m.contains("not a cbtfs repository"), "{m}");
}

#[test]
fn mount_t_cbtfs_and_fstab_through_the_helper() {
    if !can_mount() {
        return;
    }
    let helper = install_helper();
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let img = dp.join("img");
    let data = vec![9u8; 4 * BS];
    std::fs::write(&img, &data).unwrap();
    let v = vdi(28);
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
    let mp = dp.join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp = std::fs::canonicalize(&mp).unwrap();

    let mount = |args: &[&str]| {
        let o = Command::new("mount")
            .args(args)
            .env("CBTFS_BIN", bin())
            .env("CBTFS_KEY_FILE", key_file())
            .bounded()
            .unwrap();
        assert!(
            o.status.success(),
            "mount {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    mount(&[
        "-t",
        "cbtfs",
        "-o",
        "ro,noauto,_netdev,nofail,x-systemd.automount,nodev",
        s(&repo),
        s(&mp),
    ]);
    assert!(std::fs::read(mp.join("by-uuid").join(&v).join("latest.raw")).unwrap() == data);
    run("umount", &[s(&mp)]);
    assert!(cbtfs::mount::mounted_fstype(&mp).is_none());

    // An fstab line.
    let fstab = dp.join("fstab");
    std::fs::write(
        &fstab,
        format!("{} {} cbtfs noauto,_netdev,x-test 0 0\n", s(&repo), s(&mp)),
    )
    .unwrap();
    mount(&["--fstab", s(&fstab), s(&mp)]);
    assert!(std::fs::read(mp.join("by-uuid").join(&v).join("latest.raw")).unwrap() == data);
    run("umount", &[s(&mp)]);

    // The helper translates mount(8)'s calling convention without mounting (-f: fake).
    let o = Command::new(&helper)
        .args([
            s(&repo),
            s(&mp),
            "-fv",
            "-o",
            "rw,noauto,allow_other,log_file=/tmp/a\\,b",
        ])
        .env("CBTFS_BIN", bin())
        .env("CBTFS_KEY_FILE", key_file())
        .bounded()
        .unwrap();
    assert!(o.status.success());
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("-o allow_other,log_file=/tmp/a\\,b"),
        "{said}"
    );
    assert!(!said.contains("noauto") && !said.contains("rw,"), "{said}");
}

#[test]
fn a_new_mount_right_after_an_outside_umount_survives_the_old_process() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    import_life(dir.path(), &repo, &life(5, 3), 5);
    let mp = dir.path().join("mnt");
    for round in 0..5 {
        let mut old = Mounted::new(&repo, &mp, &[]);
        run("umount", &[s(&old.mp)]);
        // At once, a new mount on the same directory; then the old process ends.
        let new = Mounted::new(&repo, &mp, &[]);
        assert!(old.wait_exit().success(), "round {round}: {}", old.log());
        assert!(
            cbtfs::mount::mounted_fstype(&new.mp).is_some(),
            "round {round}: the old process unmounted the new mount"
        );
        assert_eq!(point_paths(&repo).len(), 3);
        drop(new);
    }
}

/// Issue #16, defect 1: three points A, B, C (1 MiB of random bytes each) in one set, mounted;
/// A's file opened and closed without reading; `prune --keep-last 1` renumbers C to seq 0.
/// `cp` of C through the mount then gave A's bytes. Now it gives C's, the same as `export`; B,
/// held open across the prune, reads its own bytes or EIO.
#[test]
fn after_a_prune_a_kept_point_reads_its_own_bytes_not_a_removed_ones() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(16);
    let points = import_random_points(dp, &repo, &v, 16, 3, 1600);
    let m = Mounted::new(&repo, &dp.join("mnt"), &[]);
    let paths = point_paths(&repo);
    assert_eq!(paths.len(), 3);
    drop(File::open(m.mp.join(&paths[0])).unwrap());
    let b = File::open(m.mp.join(&paths[1])).unwrap();

    ok(&["prune", s(&repo), "--keep-last", "1"]);
    assert_eq!(point_paths(&repo), vec![paths[2].clone()]);

    // The mount sees the prune: the removed points leave the listing (a directory listing
    // rescans when the view is 200 ms old). Nothing has looked C up since the mount started.
    let set_dir = m.mp.join(&paths[2]).parent().unwrap().to_path_buf();
    let removed: Vec<String> = paths[..2]
        .iter()
        .map(|p| {
            Path::new(p)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    wait_for(
        "the removed points to leave the listing",
        Duration::from_secs(5),
        || {
            std::fs::read_dir(&set_dir)
                .unwrap()
                .all(|e| !removed.contains(&e.unwrap().file_name().to_string_lossy().into_owned()))
        },
    );
    let copy = dp.join("copy.raw");
    run("cp", &[s(&m.mp.join(&paths[2])), s(&copy)]);
    let exported = dp.join("export.raw");
    ok(&["export", s(&repo), &format!("{v}@latest"), s(&exported)]);
    assert!(std::fs::read(&exported).unwrap() == points[2]);
    assert!(
        std::fs::read(&copy).unwrap() == points[2],
        "cp of the kept point through the mount differs from its bytes (and from export)"
    );
    let mut buf = vec![0u8; points[1].len()];
    match b.read_exact_at(&mut buf, 0) {
        Ok(()) => assert!(
            buf == points[1],
            "a held-open removed point changed its bytes"
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    assert!(std::fs::read(m.mp.join(&paths[2])).unwrap() == points[2]);
    let latest = m.mp.join("by-uuid").join(&v).join("latest.raw");
    assert!(std::fs::read(&latest).unwrap() == points[2]);
}

/// `mount.cbtfs` on mount(8)'s search path, pointing at this checkout's helper.
fn install_helper() -> std::path::PathBuf {
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helper/mount.cbtfs");
    let installed = Path::new("/sbin/mount.cbtfs");
    // A symlink from an earlier checkout may dangle: point it at this one. A helper installed by
    // scripts/install.sh (a regular file) is left alone.
    match std::fs::symlink_metadata(installed) {
        Ok(md) if md.file_type().is_symlink() => {
            let _ = std::fs::remove_file(installed);
            let _ = std::os::unix::fs::symlink(&helper, installed);
        }
        Ok(_) => {}
        Err(_) => {
            let _ = std::os::unix::fs::symlink(&helper, installed);
        }
    }
    helper
}

/// A repository with one 4-block point; returns (repo, vdi, data).
fn one_point(dp: &Path, n: u32) -> (std::path::PathBuf, String, Vec<u8>) {
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    let img = dp.join("img");
    let mut data = vec![0u8; 4 * BS];
    TestRng::new(n as u64).fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let v = vdi(n);
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
    (repo, v, data)
}

fn statvfs(p: &Path) -> libc::statvfs {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: a zeroed statvfs is valid; `c` is NUL-terminated and `st` writable.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0, "{p:?}");
    st
}

/// Issue #17: `df MOUNT` showed the sum of the points' sizes and 0 free. It shows the
/// repository's filesystem: how much room the backups have.
#[test]
fn df_on_the_mount_shows_the_repository_filesystem() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (repo, _, _) = one_point(d.path(), 171);
    let m = Mounted::new(&repo, &d.path().join("mnt"), &[]);
    let before = statvfs(&repo);
    let got = statvfs(&m.mp);
    let after = statvfs(&repo);
    assert_eq!(
        (
            got.f_blocks,
            got.f_bsize,
            got.f_frsize,
            got.f_files,
            got.f_namemax
        ),
        (
            before.f_blocks,
            before.f_bsize,
            before.f_frsize,
            before.f_files,
            before.f_namemax
        )
    );
    assert!(got.f_bfree > 0, "a mount with free space says so");
    // Other tests write to this filesystem between the calls: the mount's free figures lie
    // between the repository's before and after, give or take 256 MiB.
    let slack = (256u64 << 20) / before.f_frsize;
    for (g, b, a) in [
        (got.f_bfree, before.f_bfree, after.f_bfree),
        (got.f_bavail, before.f_bavail, after.f_bavail),
    ] {
        let (lo, hi) = (b.min(a), b.max(a));
        assert!(g + slack >= lo && g <= hi + slack, "{g} not in {lo}..{hi}");
    }
    // And `df` itself agrees on the size.
    let size = |p: &Path| run("df", &["--output=size", "-B1", s(p)]);
    assert_eq!(size(&m.mp), size(&repo));
}

/// Issue #17: a point pruned between a listing and `open` gave EIO and logged "cannot open
/// restore point". It is ENOENT, and nothing is logged at warning level.
#[test]
fn a_point_pruned_after_a_listing_is_enoent_without_a_warning() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let repo = dp.join("repo");
    ok(&["init", s(&repo)]);
    import_random_points(dp, &repo, &vdi(172), 4, 3, 1720);
    let paths = point_paths(&repo);
    assert_eq!(paths.len(), 3);
    let m = Mounted::new(&repo, &dp.join("mnt"), &[]);
    // The listing: the kernel learns the names (nothing looked up or opened yet).
    let set_dir = m.mp.join(&paths[0]).parent().unwrap().to_path_buf();
    let listed: Vec<String> = std::fs::read_dir(&set_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for p in &paths {
        let name = Path::new(p).file_name().unwrap().to_string_lossy();
        assert!(listed.iter().any(|l| *l == name), "{name} in {listed:?}");
    }
    ok(&["prune", s(&repo), "--keep-last", "1"]);
    for p in &paths[..2] {
        let e = File::open(m.mp.join(p)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{p}: {e}");
    }
    assert!(File::open(m.mp.join(&paths[2])).is_ok());
    let log = m.log();
    assert!(
        !log.contains("WARN") && !log.contains("ERROR") && !log.contains("cannot open"),
        "the mount's log: {log}"
    );
}

/// Issue #17: `mount` on a non-empty directory silently hid what was there. It is refused
/// (naming the directory, saying what to do) unless `-o nonempty`, by `cbtfs mount` and by
/// `mount -t cbtfs` alike.
#[test]
fn a_non_empty_mount_point_is_refused_unless_nonempty() {
    if !can_mount() {
        return;
    }
    let helper = install_helper();
    let d = tempfile::tempdir().unwrap();
    let (repo, v, data) = one_point(d.path(), 173);
    let mp = d.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let mp = std::fs::canonicalize(&mp).unwrap();
    std::fs::write(mp.join("keep.txt"), b"mine").unwrap();

    let (_, msg) = fails(&["mount", s(&repo), s(&mp)]);
    assert!(
        msg.contains(&format!("mount point {} is not empty", mp.display()))
            && msg.contains("empty directory")
            && msg.contains("-o nonempty"),
        "{msg}"
    );
    assert!(cbtfs::mount::mounted_fstype(&mp).is_none());
    let o = Command::new("mount")
        .args(["-t", "cbtfs", s(&repo), s(&mp)])
        .env("CBTFS_BIN", bin())
        .env("CBTFS_KEY_FILE", key_file())
        .bounded()
        .unwrap();
    assert!(!o.status.success());
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(
        said.contains("is not empty") && said.contains("-o nonempty"),
        "{said}"
    );
    assert!(cbtfs::mount::mounted_fstype(&mp).is_none());
    assert_eq!(std::fs::read(mp.join("keep.txt")).unwrap(), b"mine");

    // With nonempty: mounted over it; the file is back after the unmount.
    let latest = mp.join("by-uuid").join(&v).join("latest.raw");
    {
        let m = Mounted::new(&repo, &mp, &["-o", "nonempty"]);
        assert!(std::fs::read(&latest).unwrap() == data);
        assert!(!m.mp.join("keep.txt").exists());
    }
    assert_eq!(std::fs::read(mp.join("keep.txt")).unwrap(), b"mine");
    let o = Command::new("mount")
        .args(["-t", "cbtfs", "-o", "noauto,nonempty", s(&repo), s(&mp)])
        .env("CBTFS_BIN", bin())
        .env("CBTFS_KEY_FILE", key_file())
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&latest).unwrap() == data);
    // Busy only for the moment a parallel test's fork holds an inherited descriptor.
    wait_for("the unmount", Duration::from_secs(10), || {
        Command::new("umount").arg(&mp).status().unwrap().success()
    });
    assert_eq!(std::fs::read(mp.join("keep.txt")).unwrap(), b"mine");
    // The helper passes nonempty through.
    let o = Command::new(&helper)
        .args([s(&repo), s(&mp), "-fv", "-o", "noauto,nonempty,nodev"])
        .env("CBTFS_BIN", bin())
        .env("CBTFS_KEY_FILE", key_file())
        .bounded()
        .unwrap();
    assert!(o.status.success());
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("-o nonempty,nodev"), "{said}");
}

/// The one unmount: a busy mount is refused by `Normal` and detached by `Lazy`, whose open
/// files keep reading until closed; then the mount's process exits.
#[test]
fn one_unmount_refuses_a_busy_mount_and_detaches_it_lazily() {
    use cbtfs::mount::{Unmount, UnmountError, unmount};
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (repo, v, data) = one_point(d.path(), 174);
    let mut m = Mounted::new(&repo, &d.path().join("mnt"), &[]);
    let f = File::open(m.mp.join("by-uuid").join(&v).join("latest.raw")).unwrap();
    match unmount(&m.mp, Unmount::Normal) {
        Err(e @ UnmountError::Busy { .. }) => {
            assert!(e.to_string().contains(s(&m.mp)), "{e}")
        }
        other => panic!("a busy mount: {other:?}"),
    }
    assert!(cbtfs::mount::mounted_fstype(&m.mp).is_some());
    unmount(&m.mp, Unmount::Lazy).unwrap();
    assert!(cbtfs::mount::mounted_fstype(&m.mp).is_none());
    let mut buf = vec![0u8; data.len()];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == data, "an open file of a detached mount reads on");
    drop(f);
    assert!(m.wait_exit().success(), "{}", m.log());
    // Not a mount point: an error naming it.
    let e = unmount(&m.mp, Unmount::Normal).unwrap_err();
    assert!(
        matches!(e, UnmountError::Failed { .. }) && e.to_string().contains(s(&m.mp)),
        "{e}"
    );
}

/// A point's file in the mount, given by its absolute path, names that point to every command
/// (issue 17: one resolver, every form).
#[test]
fn a_path_inside_the_mount_names_its_point() {
    if !can_mount() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let steps = life(1717, 3);
    import_life(d.path(), &repo, &steps, 1717);
    let m = Mounted::new(&repo, &d.path().join("mnt"), &[]);
    let paths = point_paths(&repo);
    for (p, st) in paths.iter().zip(&steps) {
        let abs = m.mp.join(p);
        let o = cbtfs(&["export", s(&repo), s(&abs), "-"]);
        assert!(
            o.status.success(),
            "export {}: {}",
            abs.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.stdout == st.image,
            "export {} gave other bytes",
            abs.display()
        );
    }
    let disk = Path::new(&paths[0]).parent().unwrap().parent().unwrap();
    let latest = m.mp.join(disk).join("latest.raw");
    let o = cbtfs(&["export", s(&repo), s(&latest), "-"]);
    assert!(o.stdout == steps.last().unwrap().image, "latest.raw");
    let (_, e) = fails(&["export", s(&repo), s(&d.path().join("elsewhere.raw")), "-"]);
    assert!(e.contains("outside any mounted cbtfs repository"), "{e}");
}
