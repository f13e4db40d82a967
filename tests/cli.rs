//! The commands as users run them, and their answers to bad input.

mod common;

use std::path::Path;

use common::*;

fn setup(d: &Path) -> (String, String) {
    let repo = d.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(1);
    let img = d.join("img");
    let mut data = vec![0u8; 40 * BS];
    TestRng::new(1).fill(&mut data[3 * BS..10 * BS]);
    TestRng::new(2).fill(&mut data[30 * BS..31 * BS]);
    std::fs::write(&img, &data).unwrap();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--name",
        "root disk",
        "--vm-name",
        "web: prod",
        "--vm-uuid",
        "11111111-2222-4333-8444-555555555555",
        "--raw",
        s(&img),
        "--time",
        "2026-11-21T02:00:00Z",
    ]);
    (s(&repo).to_string(), v)
}

#[test]
fn help_for_every_command() {
    for c in ["init", "import", "ls", "export", "verify"] {
        let out = ok(&[c, "--help"]);
        assert!(out.contains("Usage: cbtfs"), "{c} --help: {out}");
    }
}

#[test]
fn ls_reports_sizes_blocks_and_changed_percent() {
    let d = tempfile::tempdir().unwrap();
    let (repo, v) = setup(d.path());
    let img = d.path().join("img");
    let mut data = std::fs::read(&img).unwrap();
    TestRng::new(3).fill(&mut data[0..BS]);
    data[20 * BS..21 * BS].fill(0);
    std::fs::write(&img, &data).unwrap();
    let bm = write_bitmap(d.path(), "bm", &[0, 20, 21], 40);
    ok(&[
        "import",
        &repo,
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--bitmap",
        s(&bm),
        "--time",
        "2026-11-22T02:00:00Z",
    ]);
    let human = ok(&["ls", &repo]);
    assert!(human.contains("web_prod/root_disk"), "{human}");
    assert!(human.contains("20261121T020000Z"), "{human}");
    assert!(human.contains("7.50%"), "3 of 40 blocks changed: {human}");
    let j: serde_json::Value = serde_json::from_str(&ok(&["ls", &repo, "--json"])).unwrap();
    let pts = &j["vms"][0]["disks"][0]["sets"][0]["points"];
    assert_eq!(pts[0]["stored_blocks"], 8, "base skips zero blocks");
    assert_eq!(pts[0]["virtual_size"], 40 * BS as u64);
    assert_eq!(pts[1]["changed_blocks"], 3);
    assert_eq!(
        pts[1]["stored_blocks"], 1,
        "zero blocks are recorded, not stored"
    );
    assert_eq!(
        pts[1]["path"],
        "web_prod/root_disk/20261121T020000Z/20261122T020000Z"
    );
    assert_eq!(j["vms"][0]["name"], "web_prod");
}

#[test]
fn export_is_sparse_and_refuses_to_overwrite() {
    let d = tempfile::tempdir().unwrap();
    let (repo, v) = setup(d.path());
    let out = d.path().join("out.raw");
    ok(&["export", &repo, &format!("{v}@latest"), s(&out)]);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(d.path().join("img")).unwrap()
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 40 * BS as u64);
    // 8 data blocks; the other 32 are holes.
    assert!(
        allocated(&out) <= 8 * BS as u64 + 64 * 1024,
        "not sparse: {}",
        allocated(&out)
    );
    let (_, msg) = fails(&["export", &repo, &format!("{v}@latest"), s(&out)]);
    assert!(msg.contains("exists") && msg.contains("--force"), "{msg}");
    ok(&["export", &repo, &format!("{v}@latest"), s(&out), "--force"]);
    // By mount path, with .raw, and by time.
    ok(&[
        "export",
        &repo,
        "web_prod/root_disk/20261121T020000Z/20261121T020000Z.raw",
        s(&d.path().join("a")),
    ]);
    ok(&[
        "export",
        &repo,
        &format!("{v}@20261121T020000Z"),
        s(&d.path().join("b")),
    ]);
    ok(&[
        "export",
        &repo,
        &format!("by-uuid/{v}/20261121T020000Z/latest"),
        s(&d.path().join("c")),
    ]);
    for n in ["a", "b", "c"] {
        assert_eq!(
            std::fs::read(d.path().join(n)).unwrap(),
            std::fs::read(&out).unwrap()
        );
    }
    // No temporary file left behind.
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.to_string_lossy().contains("partial")),
        "{names:?}"
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let (repo, v) = setup(d.path());
    let img = d.path().join("img");

    let (_, m) = fails(&["ls", s(d.path())]);
    assert!(
        m.contains("not a cbtfs repository") && m.contains("cbtfs init"),
        "{m}"
    );

    let (_, m) = fails(&["init", &repo]);
    assert!(m.contains("already a cbtfs repository"), "{m}");

    let (_, m) = fails(&[
        "export",
        &repo,
        "web_prod/root_disk/20261121T020000Z/20991231T000000Z",
        "-",
    ]);
    assert!(
        m.contains("no readable point") && m.contains("its points: 20261121T020000Z"),
        "{m}"
    );
    let (_, m) = fails(&["export", &repo, "nosuchvm/x/y/z", "-"]);
    assert!(
        m.contains("no VM folder") && m.contains("it has: web_prod"),
        "{m}"
    );
    let (_, m) = fails(&["export", &repo, &format!("{}@latest", vdi(99)), "-"]);
    assert!(m.contains("no disk with VDI uuid"), "{m}");
    let (_, m) = fails(&["export", &repo, &format!("{v}@yesterday"), "-"]);
    assert!(m.contains("not a time"), "{m}");

    let (_, m) = fails(&["import", &repo, "--vdi", "not-a-uuid", "--raw", s(&img)]);
    assert!(m.contains("not a VDI uuid"), "{m}");

    let bad = d.path().join("bad.b64");
    std::fs::write(&bad, "this is not base64!!").unwrap();
    let (_, m) = fails(&[
        "import",
        &repo,
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--bitmap",
        s(&bad),
        "--time",
        "2026-11-22T00:00:00Z",
    ]);
    assert!(
        m.contains("not valid base64") && m.contains("bad.b64"),
        "{m}"
    );

    // 40 blocks need 5 bytes of bitmap; 4 is short (the image is too large for it).
    let short = write_bitmap(d.path(), "short", &[1], 32);
    let (_, m) = fails(&[
        "import",
        &repo,
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--bitmap",
        s(&short),
        "--time",
        "2026-11-22T00:00:00Z",
    ]);
    assert!(m.contains("covers 32 blocks but the disk has 40"), "{m}");

    let bm = write_bitmap(d.path(), "bm", &[1], 40);
    let (_, m) = fails(&[
        "import",
        &repo,
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--bitmap",
        s(&bm),
        "--time",
        "2026-11-20T00:00:00Z",
    ]);
    assert!(m.contains("must be later than"), "{m}");
    let (_, m) = fails(&[
        "import",
        &repo,
        "--vdi",
        &vdi(5),
        "--raw",
        s(&img),
        "--bitmap",
        s(&bm),
    ]);
    assert!(m.contains("no backup set yet"), "{m}");
    let (_, m) = fails(&[
        "import",
        &repo,
        "--vdi",
        &v,
        "--raw",
        s(&d.path().join("missing.img")),
    ]);
    assert!(m.contains("missing.img"), "{m}");
    let (_, m) = fails(&[
        "import",
        &repo,
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        "tomorrow",
    ]);
    assert!(m.contains("not a time"), "{m}");

    // Nothing above was committed.
    let j: serde_json::Value = serde_json::from_str(&ok(&["ls", &repo, "--json"])).unwrap();
    assert_eq!(j["vms"][0]["disks"].as_array().unwrap().len(), 1);
    assert_eq!(
        j["vms"][0]["disks"][0]["sets"][0]["points"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    ok(&["verify", &repo]);
}

#[test]
fn newer_repository_version_is_refused_and_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = setup(d.path());
    let hdr = Path::new(&repo).join("cbtfs.repo");
    let text = std::fs::read_to_string(&hdr).unwrap();
    let json = text
        .split("\ncbtfs-crc32c:")
        .next()
        .unwrap()
        .replace("\"version\": 1", "\"version\": 2");
    let new = format!(
        "{json}\ncbtfs-crc32c:{:08x}\n",
        crc32c::crc32c(json.as_bytes())
    );
    std::fs::write(&hdr, &new).unwrap();
    let (_, m) = fails(&["ls", &repo]);
    assert!(
        m.contains("format version 2") && m.contains("upgrade cbtfs"),
        "{m}"
    );
    assert_eq!(std::fs::read_to_string(&hdr).unwrap(), new);
}

#[test]
fn repository_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = setup(d.path());
    let mut stack = vec![std::path::PathBuf::from(&repo)];
    while let Some(p) = stack.pop() {
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(
            md.permissions().mode() & 0o077,
            0,
            "{} is not private",
            p.display()
        );
        if md.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
}

#[test]
fn a_second_writer_is_refused_while_one_holds_the_lock() {
    let d = tempfile::tempdir().unwrap();
    let (repo, v) = setup(d.path());
    let r = cbtfs::repo::Repository::open(Path::new(&repo)).unwrap();
    let _held = r.lock("test holder").unwrap();
    let img = d.path().join("img");
    let (_, m) = fails(&[
        "import",
        &repo,
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        "2026-12-01T00:00:00Z",
    ]);
    assert!(
        m.contains("being written by another process") && m.contains("test holder"),
        "{m}"
    );
    // Readers do not need the lock.
    ok(&["ls", &repo]);
}

#[test]
fn new_base_starts_a_new_set_and_old_sets_stay_readable() {
    let d = tempfile::tempdir().unwrap();
    let (repo, v) = setup(d.path());
    let img = d.path().join("img");
    let first = std::fs::read(&img).unwrap();
    let mut second = first.clone();
    TestRng::new(9).fill(&mut second[..]);
    std::fs::write(&img, &second).unwrap();
    ok(&[
        "import",
        &repo,
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        "2026-11-25T02:00:00Z",
    ]);
    let j: serde_json::Value = serde_json::from_str(&ok(&["ls", &repo, "--json"])).unwrap();
    assert_eq!(j["vms"][0]["disks"][0]["sets"].as_array().unwrap().len(), 2);
    let o = cbtfs(&["export", &repo, &format!("{v}@2026-11-21T02:00:00Z"), "-"]);
    assert!(o.stdout == first);
    let o = cbtfs(&["export", &repo, &format!("{v}@latest"), "-"]);
    assert!(o.stdout == second);
}

/// The README's "Importing images by hand" example, exactly: `--vm-name web01` without
/// `--vm-uuid` files the disk under `web01/`, where `export`, `ls`, `ls --json` and `prune` all
/// find it (issue 17: it was filed under `no-vm/` and `export web01/root/...` failed).
#[test]
fn readme_import_example_names_the_vm() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("backup/repo");
    let v = "3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b";
    let mut base = vec![0u8; 24 * BS];
    TestRng::new(17).fill(&mut base[2 * BS..9 * BS]);
    let mut day2 = base.clone();
    TestRng::new(18).fill(&mut day2[4 * BS..5 * BS]);
    TestRng::new(19).fill(&mut day2[20 * BS..21 * BS]);
    std::fs::write(d.path().join("base.img"), &base).unwrap();
    std::fs::write(d.path().join("day2.img"), &day2).unwrap();
    write_bitmap(d.path(), "day2.b64", &[4, 20], 24);
    std::fs::create_dir(d.path().join("backup")).unwrap();
    let r = s(&repo);
    let in_dir = |args: &[&str]| {
        let o = std::process::Command::new(bin())
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "cbtfs {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    in_dir(&["init", r]);
    let out = in_dir(&[
        "import",
        r,
        "--vdi",
        v,
        "--name",
        "root",
        "--vm-name",
        "web01",
        "--raw",
        "base.img",
        "--time",
        "2026-11-21T02:00:00Z",
    ]);
    assert!(
        out.contains("point web01/root/20261121T020000Z/20261121T020000Z"),
        "{out}"
    );
    in_dir(&[
        "import",
        r,
        "--vdi",
        v,
        "--raw",
        "day2.img",
        "--bitmap",
        "day2.b64",
        "--time",
        "2026-11-22T02:00:00Z",
    ]);
    in_dir(&[
        "export",
        r,
        "web01/root/20261121T020000Z/20261122T020000Z",
        "day2.raw",
    ]);
    assert!(std::fs::read(d.path().join("day2.raw")).unwrap() == day2);
    in_dir(&["export", r, "web01/root/latest", "latest.raw"]);
    assert!(std::fs::read(d.path().join("latest.raw")).unwrap() == day2);
    let j: serde_json::Value = serde_json::from_str(&in_dir(&["ls", r, "--json"])).unwrap();
    assert_eq!(j["vms"].as_array().unwrap().len(), 1, "{j}");
    assert_eq!(j["vms"][0]["name"], "web01");
    assert_eq!(j["vms"][0]["uuid"], serde_json::Value::Null);
    let p = &j["vms"][0]["disks"][0]["sets"][0]["points"][1];
    assert_eq!(p["path"], "web01/root/20261121T020000Z/20261122T020000Z");
    assert_eq!(p["point"], format!("{v}@20261122T020000Z"));
    let human = in_dir(&["ls", r]);
    assert!(human.contains("web01/root  (VDI"), "{human}");
    assert!(!human.contains("no-vm"), "{human}");
    let pr = in_dir(&["prune", r, "--keep-last", "1", "--dry-run"]);
    assert!(pr.starts_with("web01/root: "), "{pr}");
    assert!(
        pr.contains(&format!(
            "web01/root/20261121T020000Z/20261121T020000Z ({v}@20261121T020000Z)"
        )),
        "{pr}"
    );
    let pj: serde_json::Value = serde_json::from_str(&in_dir(&[
        "prune",
        r,
        "--keep-last",
        "1",
        "--dry-run",
        "--json",
    ]))
    .unwrap();
    assert_eq!(pj["disks"][0]["disk_path"], "web01/root");
    assert_eq!(
        pj["disks"][0]["removed_paths"][0],
        "web01/root/20261121T020000Z/20261121T020000Z"
    );
    assert_eq!(
        pj["disks"][0]["removed_points"][0],
        format!("{v}@20261121T020000Z")
    );
}

/// Every way of naming a point reaches the same bytes, in every command that takes a point;
/// `@DATE` is the newest point taken on or before that (UTC) day.
#[test]
fn every_point_form_gives_the_same_point() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let r = s(&repo);
    ok(&["init", r]);
    let v = vdi(7);
    let img = d.path().join("img");
    let mut images = Vec::new();
    let mut data = vec![0u8; 16 * BS];
    // Jan 1 02:00 (base), Jan 2 02:00, Jan 2 23:00, Jan 3 02:00; looser --time forms each.
    for (k, when) in [
        "2026-01-01",
        "2026-01-02 02:00",
        "2026-01-02 23:00:00",
        "2026-01-03T02:00:00Z",
    ]
    .iter()
    .enumerate()
    {
        TestRng::new(40 + k as u64).fill(&mut data[k * BS..(k + 1) * BS]);
        std::fs::write(&img, &data).unwrap();
        let mut args = vec![
            "import",
            r,
            "--vdi",
            &v,
            "--name",
            "xvda",
            "--vm-name",
            "web01",
            "--raw",
            s(&img),
            "--time",
            when,
        ];
        let bm;
        if k > 0 {
            bm = write_bitmap(d.path(), "bm", &[k as u64], 16);
            args.extend(["--bitmap", s(&bm)]);
        }
        ok(&args);
        images.push(data.clone());
    }
    let set = "20260101T000000Z";
    let forms: Vec<(String, usize)> = vec![
        (format!("web01/xvda/{set}/20260101T000000Z"), 0),
        (format!("web01/xvda/{set}/20260102T020000Z.raw"), 1),
        (format!("web01/xvda/{set}/20260102T230000Z/"), 2),
        (format!("web01/xvda/{set}/latest"), 3),
        ("web01/xvda/latest".into(), 3),
        ("web01/xvda/latest.raw".into(), 3),
        (format!("by-uuid/{v}/{set}/20260102T020000Z.raw"), 1),
        (format!("by-uuid/{v}/latest.raw"), 3),
        (format!("{v}@latest"), 3),
        (format!("{v}@20260102T020000Z"), 1),
        (format!("{v}@2026-01-02T02:00:00Z"), 1),
        (format!("{v}@2026-01-02 02:00:00"), 1),
        (format!("{v}@2026-01-02T02:00"), 1),
        (format!("{v}@2026-01-02 22:59"), 1),
        (format!("{v}@2026-01-02"), 2),
        ("web01/xvda@2026-01-02".into(), 2),
        ("web01/xvda@2026-01-01".into(), 0),
        ("web01/xvda@2026-01-02T03:00:00+01:00".into(), 1),
        ("web01/xvda@latest".into(), 3),
        ("web01/xvda@2030-01-01".into(), 3),
    ];
    for (spec, want) in &forms {
        let o = cbtfs(&["export", r, spec, "-"]);
        assert!(
            o.status.success(),
            "export {spec}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.stdout == images[*want], "export {spec}: not point {want}");
        ok(&["verify", r, spec]);
        ok(&["ls", r, "--volumes", spec]);
    }
    let (_, m) = fails(&["export", r, "web01/xvda@2025-12-31", "-"]);
    assert!(
        m.contains("no point at or before 2025-12-31T23:59:59Z")
            && m.contains(&format!("its oldest is web01/xvda/{set}/20260101T000000Z")),
        "{m}"
    );
    let (_, m) = fails(&["export", r, "web01/xvdb/latest", "-"]);
    assert!(
        m.contains("no disk \"xvdb\" under VM \"web01\"; it has: xvda"),
        "{m}"
    );
    let (_, m) = fails(&["export", r, "web01/xvda@2026-02-30", "-"]);
    assert!(m.contains("February 2026 has no day 30"), "{m}");
    let (_, m) = fails(&[
        "import",
        r,
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        "2026-13-01",
    ]);
    assert!(
        m.contains("--time") && m.contains("month must be 01 to 12"),
        "{m}"
    );
    let out = ok(&[
        "export",
        r,
        "web01/xvda@2026-01-02",
        s(&d.path().join("x.raw")),
    ]);
    assert!(
        out.contains(&format!("exported web01/xvda/{set}/20260102T230000Z to")),
        "{out}"
    );
}

/// Giving only one half of the VM (`--vm-name` or `--vm-uuid`) on a later import keeps the
/// other half when the disk's newest point names the same VM: the disk stays in its folder.
#[test]
fn one_half_of_the_vm_keeps_the_other() {
    let d = tempfile::tempdir().unwrap();
    let (repo, v) = setup(d.path());
    let img = d.path().join("img");
    let vm = "11111111-2222-4333-8444-555555555555";
    let vms = |j: &serde_json::Value| -> Vec<(String, serde_json::Value)> {
        j["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap().to_string(), v["uuid"].clone()))
            .collect()
    };
    let mut t = 0;
    let mut import = |extra: &[&str]| {
        t += 1;
        let when = format!("2026-11-2{t} 03:00");
        let mut args = vec![
            "import",
            &repo,
            "--vdi",
            &v,
            "--raw",
            s(&img),
            "--time",
            &when,
        ];
        args.extend(extra);
        ok(&args);
        serde_json::from_str::<serde_json::Value>(&ok(&["ls", &repo, "--json"])).unwrap()
    };
    let j = import(&["--vm-name", "web: prod"]);
    assert_eq!(
        vms(&j),
        vec![("web_prod".to_string(), serde_json::json!(vm))]
    );
    let j = import(&["--vm-uuid", vm]);
    assert_eq!(
        vms(&j),
        vec![("web_prod".to_string(), serde_json::json!(vm))]
    );
    // Another name alone is another VM, known by that name only.
    let j = import(&["--vm-name", "web02"]);
    assert_eq!(
        vms(&j),
        vec![("web02".to_string(), serde_json::Value::Null)]
    );
    let (_, m) = fails(&[
        "import",
        &repo,
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--vm-uuid",
        "web01",
    ]);
    assert!(m.contains("--vm-uuid \"web01\" is not a VM uuid"), "{m}");
}
