//! The commands as users run them, and their answers to bad input.

use std::path::Path;

use crate::common::*;

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

/// The commands cbtfs has (clap's own `help` aside).
/// The man pages `cbtfs man` writes: cbtfs.1, one per command and one per subcommand of a
/// command that has some (`cbtfs-key-add.1`).
fn man_pages() -> Vec<String> {
    use clap::CommandFactory;
    let mut out = vec!["cbtfs.1".to_string()];
    for c in cbtfs::cli::Cli::command().get_subcommands() {
        if c.get_name() == "help" {
            continue;
        }
        out.push(format!("cbtfs-{}.1", c.get_name()));
        for sub in c.get_subcommands().filter(|s| s.get_name() != "help") {
            out.push(format!("cbtfs-{}-{}.1", c.get_name(), sub.get_name()));
        }
    }
    out.sort();
    out
}

fn commands() -> Vec<String> {
    use clap::CommandFactory;
    cbtfs::cli::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .filter(|n| n != "help")
        .collect()
}

#[test]
fn help_for_every_command() {
    let names = commands();
    assert!(names.len() >= 15, "{names:?}");
    for c in &names {
        let out = ok(&[c, "--help"]);
        assert!(
            out.contains(&format!("Usage: cbtfs {c}")),
            "{c} --help: {out}"
        );
        assert!(out.contains("\nExamples:\n  cbtfs "), "{c} --help: {out}");
    }
    let top = ok(&["--help"]);
    assert!(
        top.contains("Examples:") && top.contains("CBTFS_REPO"),
        "{top}"
    );
}

/// A missing choice names every alternative, not only the first (clap's default).
#[test]
fn missing_argument_errors_name_every_alternative() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("repo");
    let r = s(&repo);
    let cases: [(&[&str], &str); 3] = [
        (
            &["backup", r, "--host", "https://xcp-ng-master.lan"],
            "<--vm <VM>|--vdi <VDI_UUID>>",
        ),
        (
            &[
                "restore",
                r,
                "web01/xvda/20260104T020000Z/20260105T020000Z",
                "--host",
                "https://xcp-ng-master.lan",
            ],
            "<--to-vdi <VDI_UUID>|--new-vdi|--to-vm <VM_UUID>>",
        ),
        (
            &["import", r, "--vdi", "3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b"],
            "<--raw <IMAGE>|--nbd <URI>>",
        ),
    ];
    for (args, want) in cases {
        let (code, m) = fails(args);
        assert_eq!(code, 2, "{args:?}: {m}");
        assert!(
            m.contains(&format!(
                "the following required arguments were not provided:\n  {want}\n"
            )),
            "{args:?}: {m}"
        );
    }
    // Two of them at once are refused, naming both.
    let (code, m) = fails(&[
        "backup",
        r,
        "--host",
        "https://xcp-ng-master.lan",
        "--vm",
        "web01",
        "--vdi",
        "3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b",
    ]);
    assert_eq!(code, 2, "{m}");
    assert!(
        m.contains("the argument '--vm <VM>' cannot be used with '--vdi <VDI_UUID>'"),
        "{m}"
    );
}

/// `backup` takes REPO as its first argument like every other command; `--repo` is gone.
#[test]
fn backup_takes_repo_as_first_argument() {
    let (code, m) = fails(&[
        "backup",
        "--repo",
        "/backup/repo",
        "--host",
        "https://xcp-ng-master.lan",
        "--vm",
        "web01",
    ]);
    assert_eq!(code, 2, "{m}");
    assert!(m.contains("unexpected argument '--repo'"), "{m}");
    let help = ok(&["backup", "--help"]);
    assert!(
        help.contains(
            "Usage: cbtfs backup [OPTIONS] --host <URL> <--vm <VM>|--vdi <VDI_UUID>> <REPO>"
        ),
        "{help}"
    );
    // The repository is opened before the host is asked anything: a missing one is named.
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nothing-here");
    let o = cbtfs_cmd()
        .args([
            "backup",
            s(&missing),
            "--host",
            "https://127.0.0.1:9",
            "--vm",
            "web01",
        ])
        .env("CBTFS_PASSWORD", "x")
        .bounded()
        .unwrap();
    let m = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{m}");
    assert!(
        m.contains("nothing-here\" is not a cbtfs repository"),
        "{m}"
    );
}

fn with_repo_env(repo: &str, args: &[&str]) -> std::process::Output {
    cbtfs_cmd()
        .args(args)
        .env("CBTFS_REPO", repo)
        .bounded()
        .unwrap()
}

/// CBTFS_REPO stands in for a REPO left out; a REPO given on the line wins.
#[test]
fn cbtfs_repo_names_the_repository_when_left_out() {
    let d = tempfile::tempdir().unwrap();
    let (repo, _) = setup(d.path());
    let explicit = ok(&["ls", &repo, "--json"]);
    let o = with_repo_env(&repo, &["ls", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), explicit);
    // One positional fewer, options first or last.
    let point = "web_prod/root_disk/20261121T020000Z/20261121T020000Z";
    let out = d.path().join("out.raw");
    let o = with_repo_env(&repo, &["export", point, s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let expected = d.path().join("expected.raw");
    ok(&["export", &repo, point, s(&expected)]);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&expected).unwrap()
    );
    let o = with_repo_env(&repo, &["verify"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ok: 1 point"));
    // Given on the line, it wins over CBTFS_REPO (which names nothing here).
    let o = with_repo_env(s(&d.path().join("not-a-repo")), &["ls", &repo, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), explicit);
    // CBTFS_REPO naming nothing, and REPO left out: the error names CBTFS_REPO's directory.
    let o = with_repo_env(s(&d.path().join("not-a-repo")), &["ls"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not-a-repo\" is not a cbtfs repository"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // browse takes REPO POINT DIR in one list: two of them mean CBTFS_REPO's repository.
    let o = with_repo_env(
        s(&d.path().join("not-a-repo")),
        &["browse", point, s(&d.path().join("mnt"))],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not-a-repo"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (_, m) = fails(&["browse", point, s(&d.path().join("mnt"))]);
    assert!(
        m.contains("REPO may be left out when CBTFS_REPO names it"),
        "{m}"
    );
    // Without it, REPO is required (clap's usage error, status 2).
    let (code, m) = fails(&["ls"]);
    assert_eq!(code, 2);
    assert!(m.contains("<REPO>"), "{m}");
}

fn json_error(o: &std::process::Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {out:?} / {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    v
}

/// Under --json a failure is one JSON object on standard output, with a stable code, the same
/// message a human gets, what was done, and the usual exit status.
#[test]
fn json_errors_carry_code_message_done_and_status() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("no-repo");
    let human = cbtfs(&["ls", s(&missing)]);
    let human_err = String::from_utf8_lossy(&human.stderr).into_owned();
    assert_eq!(human.status.code(), Some(1));
    assert!(human.stdout.is_empty());
    let message = format!(
        "{m:?} is not a cbtfs repository (nothing exists at that path); create one with `cbtfs init DIR` or check the path",
        m = missing.display().to_string()
    );
    assert_eq!(human_err, format!("cbtfs: error: {message}\n"));

    let o = cbtfs(&["ls", s(&missing), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v = json_error(&o);
    assert_eq!(
        v,
        serde_json::json!({"error": {"code": "not_a_repository", "message": message, "done": []}})
    );
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The same for every command with --json, e.g. backup (before any host is asked).
    let o = cbtfs_cmd()
        .args([
            "backup",
            s(&missing),
            "--host",
            "https://127.0.0.1:9",
            "--vm",
            "web01",
            "--json",
        ])
        .env("CBTFS_PASSWORD", "x")
        .bounded()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let v = json_error(&o);
    assert_eq!(v["error"]["code"], "not_a_repository", "{v}");
    assert_eq!(v["error"]["done"], serde_json::json!([]), "{v}");

    // A usage error clap finds: code "usage", status 2, clap's words.
    let o = cbtfs(&["backup", s(&missing), "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let v = json_error(&o);
    assert_eq!(v["error"]["code"], "usage", "{v}");
    let m = v["error"]["message"].as_str().unwrap();
    assert!(
        m.starts_with("the following required arguments were not provided:"),
        "{m}"
    );
    assert!(
        m.contains("--host <URL>") && m.contains("<--vm <VM>|--vdi <VDI_UUID>>"),
        "{m}"
    );

    // A locked repository.
    let (repo, _) = setup(d.path());
    let r = open_repo(Path::new(&repo));
    let _held = r.lock_exclusive("test holder").unwrap();
    let img = d.path().join("img");
    let o = cbtfs(&[
        "import",
        &repo,
        "--vdi",
        &vdi(7),
        "--raw",
        s(&img),
        "--json",
    ]);
    let v = json_error(&o);
    assert_eq!(o.status.code(), Some(1), "{v}");
    assert_eq!(v["error"]["code"], "locked", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("test holder"),
        "{v}"
    );
}

/// `cbtfs completions SHELL` prints a script that knows every command.
#[test]
fn completions_know_every_command() {
    let names = commands();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = ok(&["completions", shell]);
        for c in &names {
            assert!(out.contains(c.as_str()), "{shell}: {c} missing");
        }
        assert!(out.contains("keep-daily"), "{shell}");
    }
    assert!(ok(&["completions", "bash"]).contains("complete -F _cbtfs"));
    let (code, m) = fails(&["completions", "tcsh"]);
    assert_eq!(code, 2);
    assert!(
        m.contains("[possible values: bash, elvish, fish, powershell, zsh]"),
        "{m}"
    );
}

/// `cbtfs man DIR` writes roff pages: cbtfs.1, one per command and one per subcommand.
#[test]
fn man_pages_for_every_command() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("man1");
    ok(&["man", s(&dir)]);
    let want = man_pages();
    assert!(want.contains(&"cbtfs-key-add.1".to_string()), "{want:?}");
    let mut have: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    have.sort();
    assert_eq!(have, want);
    for f in &have {
        let page = std::fs::read_to_string(dir.join(f)).unwrap();
        let title = f.trim_end_matches(".1");
        assert!(page.contains(&format!("\n.TH {title} 1 ")), "{f}: {page}");
        assert!(
            page.contains(".SH NAME") && page.contains(".SH SYNOPSIS"),
            "{f}"
        );
    }
    let backup = std::fs::read_to_string(dir.join("cbtfs-backup.1")).unwrap();
    assert!(backup.contains("xcp\\-ng\\-master.lan"), "{backup}");
}

/// scripts/install.sh into a staging root: the binary, the helper, man pages, completions.
#[test]
fn install_script_installs_man_pages_and_completions() {
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("stage");
    let o = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh"))
        .env("DESTDIR", &dest)
        .env("PREFIX", "/usr")
        .env("CBTFS_BIN", bin())
        .env("CBTFS_KEY_FILE", key_file())
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let usr = dest.join("usr");
    for f in [
        "bin/cbtfs",
        "share/man/man1/cbtfs.1",
        "share/man/man1/cbtfs-backup.1",
        "share/man/man1/cbtfs-mount.1",
        "share/bash-completion/completions/cbtfs",
        "share/zsh/site-functions/_cbtfs",
        "share/fish/vendor_completions.d/cbtfs.fish",
    ] {
        let p = usr.join(f);
        assert!(
            std::fs::metadata(&p).map(|m| m.len() > 0).unwrap_or(false),
            "{f} missing"
        );
    }
    assert!(dest.join("sbin/mount.cbtfs").exists());
    let pages = std::fs::read_dir(usr.join("share/man/man1"))
        .unwrap()
        .count();
    assert_eq!(pages, man_pages().len());
    assert_eq!(
        std::fs::read(usr.join("share/zsh/site-functions/_cbtfs")).unwrap(),
        cbtfs(&["completions", "zsh"]).stdout
    );
    assert_eq!(
        std::fs::read(usr.join("bin/cbtfs")).unwrap(),
        std::fs::read(bin()).unwrap()
    );
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
        // 3 is a repository with Object Lock; 4 is newer than any this build knows.
        .replace("\"version\": 2", "\"version\": 4");
    let new = format!(
        "{json}\ncbtfs-crc32c:{:08x}\n",
        crc32c::crc32c(json.as_bytes())
    );
    std::fs::write(&hdr, &new).unwrap();
    let (_, m) = fails(&["ls", &repo]);
    assert!(
        m.contains("format version 4") && m.contains("upgrade cbtfs"),
        "{m}"
    );
    assert_eq!(std::fs::read_to_string(&hdr).unwrap(), new);
}

/// Format 1 (plain per-point data files) is not read: the message says so and what to do, and
/// nothing is changed.
#[test]
fn a_format_1_repository_is_refused_clearly() {
    let d = tempfile::tempdir().unwrap();
    let repo = d.path().join("old");
    std::fs::create_dir(&repo).unwrap();
    let json = r#"{"format":"cbtfs-repository","version":1,"id":"0123","created":"2026-01-01T00:00:00Z","block_size":65536}"#;
    let hdr = format!(
        "{json}\ncbtfs-crc32c:{:08x}\n",
        crc32c::crc32c(json.as_bytes())
    );
    std::fs::write(repo.join("cbtfs.repo"), &hdr).unwrap();
    let (_, m) = fails(&["ls", s(&repo)]);
    assert!(
        m.contains("format-1") && m.contains("cbtfs init") && m.contains("nothing was changed"),
        "{m}"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("cbtfs.repo")).unwrap(),
        hdr
    );
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
    let r = open_repo(Path::new(&repo));
    let _held = r.lock_exclusive("test holder").unwrap();
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

/// Whatever the path is, a command says it is not a repository and what was found there; a
/// repository whose header is damaged is called damaged, not "not a repository".
#[test]
fn a_path_that_is_not_a_repository_says_what_it_is() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("passwd");
    std::fs::write(&file, "root:x:0:0::/root:/bin/sh\n").unwrap();
    let full = d.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("notes.txt"), "x").unwrap();
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let missing = d.path().join("missing");
    let under_file = file.join("repo");
    for (path, found) in [
        (&file, "(a file, not a directory)"),
        (&full, "(a directory without a cbtfs.repo file)"),
        (&empty, "(an empty directory)"),
        (&missing, "(nothing exists at that path)"),
        (
            &under_file,
            "(a part of the path is a file, not a directory)",
        ),
    ] {
        for cmd in [vec!["ls", s(path)], vec!["verify", s(path)]] {
            let (code, m) = fails(&cmd);
            assert_eq!(code, 1, "{m}");
            let want = format!(
                "\"{}\" is not a cbtfs repository {found}; create one with `cbtfs init DIR` or check the path",
                path.display()
            );
            assert!(m.contains(&want), "{cmd:?}: want {want:?}, got {m}");
            assert!(!m.contains("Not a directory"), "{m}");
        }
    }
    // /dev/null: a character device.
    let (_, m) = fails(&["ls", "/dev/null"]);
    assert!(
        m.contains("\"/dev/null\" is not a cbtfs repository (a character device, not a directory)"),
        "{m}"
    );
    // A repository with a damaged header is damaged.
    let (repo, _) = setup(d.path());
    let header = Path::new(&repo).join("cbtfs.repo");
    let mut bytes = std::fs::read(&header).unwrap();
    bytes[2] ^= 0x20;
    std::fs::write(&header, &bytes).unwrap();
    let (_, m) = fails(&["ls", &repo]);
    assert!(m.contains("damaged"), "{m}");
    assert!(!m.contains("not a cbtfs repository"), "{m}");
}

/// `ls` names its columns for what they hold, and counts agree with their nouns.
#[test]
fn ls_columns_say_what_they_count() {
    let d = tempfile::tempdir().unwrap();
    let (repo, v) = setup(d.path());
    let out = ok(&["ls", &repo]);
    assert!(out.contains("(1 point)"), "{out}");
    assert!(!out.contains("points)"), "{out}");
    let header = out.lines().find(|l| l.contains("POINT")).unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "POINT", "TIME", "DISK", "SIZE", "CHANGED", "BLOCKS", "STORED"
        ],
        "{out}"
    );
    // The base holds the 8 non-zero blocks of 40 (the others read as zeros): 512 KiB.
    let tail = |out: &str, time: &str| -> Vec<String> {
        let row = out.lines().find(|l| l.contains(time)).unwrap();
        let w: Vec<String> = row.split_whitespace().map(String::from).collect();
        w[w.len() - 4..].to_vec()
    };
    assert_eq!(
        tail(&out, "2026-11-21T02:00:00Z"),
        ["8", "(20.00%)", "512.0", "KiB"],
        "{out}"
    );
    let img = d.path().join("img");
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
    let out = ok(&["ls", &repo]);
    assert!(out.contains("(2 points)"), "{out}");
    // 3 of 40 blocks marked; blocks 0, 20, 21 of the image are zero: nothing stored.
    assert_eq!(
        tail(&out, "2026-11-22T02:00:00Z"),
        ["3", "(7.50%)", "0", "B"],
        "{out}"
    );
    let out = ok(&["verify", &repo]);
    assert!(
        out.contains("ok: 2 points, 8 stored blocks checked"),
        "{out}"
    );
}

/// Export writes raw bytes to character devices and pipes without --force, converts to the
/// format a name's extension (or --format) asks for, and refuses a regular file that exists.
#[test]
fn export_to_devices_pipes_and_other_image_formats() {
    let d = tempfile::tempdir().unwrap();
    let (repo, v) = setup(d.path());
    let point = format!("{v}@latest");
    let raw = std::fs::read(d.path().join("img")).unwrap();

    let out = ok(&["export", &repo, &point, "/dev/null"]);
    assert!(
        out.contains("to /dev/null (a raw stream of 2621440 bytes, every byte)"),
        "{out}"
    );

    // A named pipe read by another thread gets exactly the raw image.
    let fifo = d.path().join("pipe");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(&fifo).unwrap())
    };
    ok(&["export", &repo, &point, s(&fifo)]);
    assert!(reader.join().unwrap() == raw, "the pipe got other bytes");

    // A regular file that exists still needs --force, and --format with stdout is refused.
    let existing = d.path().join("old.raw");
    std::fs::write(&existing, b"keep me").unwrap();
    let (_, m) = fails(&["export", &repo, &point, s(&existing)]);
    assert!(m.contains("exists") && m.contains("--force"), "{m}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    let (_, m) = fails(&["export", &repo, &point, "-", "--format", "qcow2"]);
    assert!(m.contains("standard output gets raw bytes only"), "{m}");

    if !have("qemu-img") {
        return skip("qemu-img is not installed");
    }
    let raw_path = d.path().join("img");
    let q = d.path().join("x.qcow2");
    let out = ok(&["export", &repo, &point, s(&q)]);
    assert!(out.contains("(qcow2 image of a 2.5 MiB disk"), "{out}");
    let info = run("qemu-img", &["info", "--output=json", s(&q)]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], raw.len() as u64, "{info}");
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(&q), s(&raw_path)],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // Exists now: --force replaces it.
    let (_, m) = fails(&["export", &repo, &point, s(&q)]);
    assert!(m.contains("exists") && m.contains("--force"), "{m}");
    // VHD keeps the disk's exact size (not rounded up to a CHS geometry).
    let vhd = d.path().join("x.vhd");
    let out = ok(&["export", &repo, &point, s(&vhd)]);
    assert!(out.contains("(VHD image of a 2.5 MiB disk"), "{out}");
    let info: serde_json::Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", s(&vhd)])).unwrap();
    assert_eq!(info["format"], "vpc", "{info}");
    assert_eq!(info["virtual-size"], raw.len() as u64, "{info}");
    // --format overrides the extension: VHDX into a .img name; raw into a .qcow2 name.
    let h = d.path().join("disk.img");
    ok(&["export", &repo, &point, s(&h), "--format", "vhdx"]);
    let info = run("qemu-img", &["info", "--output=json", s(&h)]);
    assert!(info.contains("\"format\": \"vhdx\""), "{info}");
    let r = d.path().join("raw.qcow2");
    ok(&["export", &repo, &point, s(&r), "--format", "raw"]);
    assert!(std::fs::read(&r).unwrap() == raw);
    // Nothing temporary is left beside them.
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("partial")), "{names:?}");
    // Without qemu-img on PATH: refused before anything is written.
    let gone = d.path().join("nope.vmdk");
    let o = cbtfs_cmd()
        .args(["export", &repo, &point, s(&gone)])
        .env("PATH", "/nonexistent")
        .bounded()
        .unwrap();
    let m = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{m}");
    assert!(
        m.contains("needs qemu-img, which is not installed") && m.contains("name the file .raw"),
        "{m}"
    );
    assert!(!gone.exists());
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("nope")), "{names:?}");
}

/// A conversion that fails or is interrupted leaves nothing behind: no target, no temporary
/// raw image, no half-converted file; an interrupting signal also stops qemu-img. A stand-in
/// qemu-img on PATH makes both moments deterministic.
#[test]
fn an_export_conversion_that_fails_or_is_interrupted_leaves_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let (repo, v) = setup(d.path());
    let point = format!("{v}@latest");
    let bin_dir = d.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let fake = bin_dir.join("qemu-img");
    let out_dir = d.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let path = format!("{}:/usr/bin:/bin", s(&bin_dir));

    // qemu-img fails: its words are in the error, and nothing is left.
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'Could not open: no space' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = out_dir.join("x.qcow2");
    let o = cbtfs_cmd()
        .args(["export", &repo, &point, s(&target)])
        .env("PATH", &path)
        .bounded()
        .unwrap();
    let m = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{m}");
    assert!(
        m.contains("qemu-img could not convert the export into qcow2")
            && m.contains("Could not open: no space"),
        "{m}"
    );
    assert!(leftovers().is_empty(), "{:?}", leftovers());

    // SIGTERM while qemu-img runs: both temporary files go, qemu-img is stopped, exit 143.
    let marker = d.path().join("qemu-img.pid");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho $$ > {m}.tmp && mv {m}.tmp {m}\nexec sleep 600\n",
            m = s(&marker)
        ),
    )
    .unwrap();
    let errors = d.path().join("export.err");
    let mut child = cbtfs_cmd()
        .args(["export", &repo, &point, s(&target)])
        .env("PATH", &path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&errors).unwrap())
        .spawn()
        .unwrap();
    wait_for(
        "the stand-in qemu-img",
        std::time::Duration::from_secs(20),
        || marker.exists(),
    );
    assert!(
        leftovers().iter().any(|n| n.contains("cbtfs-raw-partial")),
        "the raw image is written first: {:?}",
        leftovers()
    );
    let qpid: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) of our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.bounded().unwrap();
    assert_eq!(
        st.code(),
        Some(128 + libc::SIGTERM),
        "{st}: {}",
        std::fs::read_to_string(&errors).unwrap()
    );
    assert!(leftovers().is_empty(), "{:?}", leftovers());
    // qemu-img was killed (and, its parent gone, reaped by init): no such process left.
    wait_for(
        "qemu-img to be gone",
        std::time::Duration::from_secs(10),
        || {
            let stat = std::fs::read_to_string(format!("/proc/{qpid}/stat")).unwrap_or_default();
            stat.is_empty() || stat.contains(") Z ")
        },
    );
}

/// Commands that found nothing to work on say so: `verify` of an empty repository does not
/// claim "0 points checked" as a pass in silence, and `prune --vdi` of a disk the repository
/// does not hold fails instead of reporting success.
#[test]
fn nothing_to_do_is_said_not_passed_off_as_done() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty-repo");
    ok(&["init", s(&empty)]);
    let out = ok(&["verify", s(&empty)]);
    assert_eq!(
        out,
        "ok: the repository holds no restore points; its header is sound (nothing else to check)\n"
    );
    let (repo, v) = setup(d.path());
    let other = vdi(99);
    let (code, m) = fails(&["prune", &repo, "--keep-last", "1", "--vdi", &other]);
    assert_eq!(code, 1, "{m}");
    assert!(
        m.contains(&format!("--vdi {other}: the repository"))
            && m.contains("holds no disk with that VDI uuid")
            && m.contains("nothing was pruned"),
        "{m}"
    );
    let out = ok(&["prune", &repo, "--keep-last", "1", "--vdi", &v]);
    assert!(out.contains("removed 0 of 1 point"), "{out}");
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
        let o = cbtfs_cmd()
            .args(args)
            .current_dir(d.path())
            .bounded()
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
