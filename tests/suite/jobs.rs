//! Backup jobs: the configuration file (`cbtfs config check`, `cbtfs job list`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::{Bounded, cbtfs_cmd, ok};

/// The issue's example, with its paths moved under `dir`.
fn example(dir: &Path) -> String {
    format!(
        r#"
[host.xs1]
url = "https://xs1.example"
user = "root"
password_file = "{d}/xs1.password"

[repository.main]
path = "{d}/repo"            # later also "s3://bucket/prefix"
password_file = "{d}/repo.password"

[job.nightly]
host = "xs1"
repository = "main"
vms = ["*"]                      # names or globs; "tag:NAME" selects by tag
exclude = ["test-*"]
concurrency = 4
schedule = "*-*-* 02:00:00"      # systemd OnCalendar
keep = {{ last = 7, daily = 14, weekly = 8, monthly = 12 }}
report = "{d}/log/nightly.json"
metrics = "{d}/prom/cbtfs.prom"
"#,
        d = dir.display()
    )
}

fn secret_file(p: &Path) {
    std::fs::write(p, "secret\n").unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn config_check_accepts_the_example_and_names_what_is_wrong() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let cfg = d.join("cbtfs.toml");
    std::fs::write(&cfg, example(d)).unwrap();
    secret_file(&d.join("xs1.password"));
    secret_file(&d.join("repo.password"));
    std::fs::create_dir(d.join("log")).unwrap();
    std::fs::create_dir(d.join("prom")).unwrap();
    let out = ok(&["config", "check", "--config", cfg.to_str().unwrap()]);
    assert!(out.contains(": ok (1 host, 1 repository, 1 job)"), "{out}");
    // From the environment too.
    let o = cbtfs_cmd()
        .args(["config", "check"])
        .env("CBTFS_CONFIG", &cfg)
        .bounded()
        .unwrap();
    assert!(o.status.success());

    // A password file others can read, and a report directory that cannot be made (its
    // parent is a regular file).
    std::fs::set_permissions(
        d.join("xs1.password"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::remove_dir(d.join("log")).unwrap();
    std::fs::write(d.join("log"), "a file, not a directory\n").unwrap();
    let o = cbtfs_cmd()
        .args(["config", "check", "--config", cfg.to_str().unwrap()])
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("xs1.password: readable by others (mode 644)"),
        "{err}"
    );
    assert!(err.contains("chmod 600"), "{err}");
    assert!(
        err.contains(&format!(
            "[job.nightly] report {d}/log/nightly.json: the directory {d}/log cannot exist: {d}/log is not a directory",
            d = d.display()
        )),
        "{err}"
    );
    assert_eq!(err.matches("[job.nightly]").count(), 1, "{err}");
    // --offline looks at the file alone.
    ok(&[
        "config",
        "check",
        "--offline",
        "--config",
        cfg.to_str().unwrap(),
    ]);

    // Mistakes in the file: each with FILE:LINE:COLUMN, all at once.
    let bad = example(d)
        .replace("concurrency = 4", "concurrency = 40")
        .replace("host = \"xs1\"", "host = \"xs9\"")
        .replace("daily = 14", "dayly = 14");
    std::fs::write(&cfg, bad).unwrap();
    let o = cbtfs_cmd()
        .args(["config", "check", "--config", cfg.to_str().unwrap()])
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    let c = cfg.display();
    assert!(err.contains("3 problems found"), "{err}");
    assert!(
        err.contains(&format!(
            "{c}:12:8: [job.nightly]: host \"xs9\" is not defined"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{c}:16:15: [job.nightly]: concurrency must be")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{c}:18:20: [job.nightly]: keep: unknown key \"dayly\""
        )),
        "{err}"
    );

    // A missing file names itself.
    let o = cbtfs_cmd()
        .args([
            "config",
            "check",
            "--config",
            d.join("none.toml").to_str().unwrap(),
        ])
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("cannot read the configuration") && err.contains("none.toml"),
        "{err}"
    );
}

#[test]
fn job_list_shows_each_job() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("cbtfs.toml");
    let text = example(t.path()).replace(
        "keep = { last = 7, daily = 14, weekly = 8, monthly = 12 }",
        "keep = { last = 7, daily = 14, weekly = 8, monthly = 12, within = \"2d\" }\ncopy_to = \"offsite\"",
    ) + "\n[repository.offsite]\npath = \"s3://bucket/cbtfs\"\nkey_file = \"/etc/cbtfs/offsite.key\"\n";
    std::fs::write(&cfg, text).unwrap();
    let out = ok(&["job", "list", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.contains("nightly\n  host xs1 -> repository main\n"),
        "{out}"
    );
    assert!(out.contains("  vms * except test-*\n"), "{out}");
    assert!(out.contains("  schedule *-*-* 02:00:00\n"), "{out}");
    assert!(
        out.contains("  keep last 7, daily 14, weekly 8, monthly 12, within 2d\n"),
        "{out}"
    );
    assert!(out.contains("  then copy to repository offsite\n"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "job",
        "list",
        "--json",
        "--config",
        cfg.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(json["nightly"]["concurrency"], 4);
    assert_eq!(json["nightly"]["keep"]["within"], 2 * 86_400);
}

/// Regression: delivery makes missing report and metrics directories, so `config check`
/// accepts them when they can be made (the nearest existing ancestor is a writable
/// directory), and names the one that cannot (an ancestor is a regular file).
#[test]
fn config_check_accepts_report_directories_delivery_can_make() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let cfg = d.join("cbtfs.toml");
    secret_file(&d.join("xs1.password"));
    secret_file(&d.join("repo.password"));
    // Neither log/ nor prom/a/b exists; d does.
    let text = example(d).replace("/prom/cbtfs.prom", "/prom/a/b/cbtfs.prom");
    std::fs::write(&cfg, &text).unwrap();
    let out = ok(&["config", "check", "--config", cfg.to_str().unwrap()]);
    assert!(out.contains(": ok (1 host, 1 repository, 1 job)"), "{out}");
    assert!(!d.join("log").exists() && !d.join("prom").exists());

    // prom/a is a regular file: prom/a/b can never be made.
    std::fs::create_dir(d.join("prom")).unwrap();
    std::fs::write(d.join("prom/a"), "").unwrap();
    let o = cbtfs_cmd()
        .args(["config", "check", "--config", cfg.to_str().unwrap()])
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "[job.nightly] metrics {p}/a/b/cbtfs.prom: the directory {p}/a/b cannot exist: {p}/a is not a directory",
            p = d.join("prom").display()
        )),
        "{err}"
    );
    assert!(!err.contains("report"), "{err}");
}
