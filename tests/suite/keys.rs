//! Encrypted repositories from the command line: init with a key file or a password, opening
//! with the right and the wrong secret, `cbtfs key`, `--encryption none`, the space statistics
//! of `ls`, and `cbtfs gc`.
//!
//! Every command runs with `CBTFS_KDF_FAST=1` (cheap password slots), a private
//! `CBTFS_CACHE_DIR`, and none of the caller's secret variables.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;
use serde_json::Value;

/// The secret variables a test must not inherit from whoever runs it.
const SECRET_VARS: [&str; 4] = [
    "CBTFS_REPO_PASSWORD",
    "CBTFS_REPO_PASSWORD_FILE",
    "CBTFS_KEY_FILE",
    "CBTFS_REPO",
];

/// A test's directory: cbtfs runs with its cache in `DIR/cache`.
struct T {
    dir: tempfile::TempDir,
}

impl T {
    fn new() -> T {
        T {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A password file holding `password` and a newline.
    fn password_file(&self, name: &str, password: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(bin());
        c.args(args)
            .env("CBTFS_KDF_FAST", "1")
            .env("CBTFS_CACHE_DIR", self.path("cache"));
        for v in SECRET_VARS {
            c.env_remove(v);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.bounded().expect("cbtfs runs")
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    /// Run and require success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "cbtfs {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run and require failure; returns the exit status and stderr + stdout.
    fn fails(&self, args: &[&str]) -> (i32, String) {
        let o = self.run(args);
        assert!(!o.status.success(), "cbtfs {args:?} unexpectedly succeeded");
        (
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&o.stdout)
            ),
        )
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }
}

/// The slots `key list --json` shows: (id, kind, current).
fn slots(t: &T, repo: &Path, open: &[&str]) -> Vec<(String, String, bool)> {
    let mut args = vec!["key", "list", s(repo), "--json"];
    args.extend_from_slice(open);
    let v = t.json(&args);
    v["slots"]
        .as_array()
        .unwrap_or_else(|| panic!("no slots in {v}"))
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["kind"].as_str().unwrap().to_string(),
                s["current"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn init_with_a_key_file_makes_it_private_and_it_opens_the_repository() {
    let t = T::new();
    let repo = t.path("repo");
    let key = t.path("cbtfs.key");
    let out = t.ok(&["init", s(&repo), "--key-file", s(&key)]);
    assert!(out.contains("created encrypted repository"), "{out}");
    assert!(
        out.contains(&format!("{}, made now", key.display())),
        "{out}"
    );
    let md = std::fs::metadata(&key).unwrap();
    assert!(md.is_file());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    let ls = t.ok(&["ls", s(&repo), "--key-file", s(&key)]);
    assert!(ls.contains("(encrypted"), "{ls}");
    assert!(!ls.contains("NOT encrypted"), "{ls}");
    // The same key file through the environment.
    let o = t.run_env(&["ls", s(&repo)], &[("CBTFS_KEY_FILE", s(&key))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A second init with the existing key file uses it (nothing is overwritten).
    let before = std::fs::read(&key).unwrap();
    let repo2 = t.path("repo2");
    let out = t.ok(&["init", s(&repo2), "--key-file", s(&key)]);
    assert!(!out.contains("made now"), "{out}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
    t.ok(&["ls", s(&repo2), "--key-file", s(&key)]);
}

#[test]
fn init_with_a_password_file_and_open_with_it() {
    let t = T::new();
    let repo = t.path("repo");
    let pw = t.password_file("pw", "first-secret-5d1e");
    let out = t.ok(&["init", s(&repo), "--repo-password-file", s(&pw)]);
    assert!(out.contains("wrapped by your password"), "{out}");
    assert!(!out.contains("first-secret-5d1e"), "{out}");
    t.ok(&["ls", s(&repo), "--repo-password-file", s(&pw)]);
    let o = t.run_env(&["ls", s(&repo)], &[("CBTFS_REPO_PASSWORD_FILE", s(&pw))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = t.run_env(
        &["ls", s(&repo)],
        &[("CBTFS_REPO_PASSWORD", "first-secret-5d1e")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = slots(&t, &repo, &["--repo-password-file", s(&pw)]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].1, "password");
    assert!(v[0].2, "{v:?}");
}

#[test]
fn a_wrong_password_is_refused_without_showing_it() {
    let t = T::new();
    let repo = t.path("repo");
    let pw = t.password_file("pw", "right-password-7f3a");
    t.ok(&["init", s(&repo), "--repo-password-file", s(&pw)]);
    let wrong = t.password_file("wrong", "wrong-password-91bc");
    let (code, m) = t.fails(&["ls", s(&repo), "--repo-password-file", s(&wrong)]);
    assert_eq!(code, 1, "{m}");
    assert!(m.contains("does not open"), "{m}");
    assert!(m.contains("password"), "{m}");
    assert!(!m.contains("wrong-password-91bc"), "{m}");
    assert!(!m.contains("right-password-7f3a"), "{m}");
    let o = t.run_env(
        &["ls", s(&repo), "--json"],
        &[("CBTFS_REPO_PASSWORD", "wrong-password-91bc")],
    );
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not open") && !m.contains("wrong-password-91bc")),
        "{v}"
    );
}

#[test]
fn no_secret_names_the_ways_to_give_one() {
    let t = T::new();
    let repo = t.path("repo");
    let key = t.path("k");
    t.ok(&["init", s(&repo), "--key-file", s(&key)]);
    let (code, m) = t.fails(&["ls", s(&repo)]);
    assert_eq!(code, 1, "{m}");
    assert!(m.contains("--repo-password-file"), "{m}");
    assert!(m.contains("--key-file"), "{m}");
    // A new encrypted repository without any secret is refused the same way, and not made.
    let repo2 = t.path("repo2");
    let (code, m) = t.fails(&["init", s(&repo2)]);
    assert_eq!(code, 1, "{m}");
    assert!(
        m.contains("--repo-password-file") && m.contains("--key-file"),
        "{m}"
    );
    assert!(m.contains("--encryption none"), "{m}");
    assert!(!repo2.join("cbtfs.repo").exists());
}

#[test]
fn key_add_with_a_new_key_file_then_it_opens_the_repository() {
    let t = T::new();
    let repo = t.path("repo");
    let pw = t.password_file("pw", "admin-password-4c2b");
    t.ok(&["init", s(&repo), "--repo-password-file", s(&pw)]);
    let key = t.path("offsite.key");
    let out = t.ok(&[
        "key",
        "add",
        s(&repo),
        "--repo-password-file",
        s(&pw),
        "--new-key-file",
        s(&key),
        "--label",
        "offsite copy",
    ]);
    assert!(out.contains("added key slot"), "{out}");
    assert!(out.contains("(made now)"), "{out}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    t.ok(&["ls", s(&repo), "--key-file", s(&key)]);
    let v = slots(&t, &repo, &["--key-file", s(&key)]);
    assert_eq!(v.len(), 2, "{v:?}");
    let kinds: Vec<(&str, bool)> = v.iter().map(|s| (s.1.as_str(), s.2)).collect();
    assert!(kinds.contains(&("password", false)), "{v:?}");
    assert!(
        kinds.iter().any(|(k, cur)| *k != "password" && *cur),
        "{v:?}"
    );
    // The text table: a header, one row per slot, the label, a `*` on the slot in use.
    let table = t.ok(&["key", "list", s(&repo), "--key-file", s(&key)]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].contains("ID") && lines[0].contains("LABEL"),
        "{table}"
    );
    let current: Vec<&&str> = lines.iter().filter(|l| l.starts_with("* ")).collect();
    assert_eq!(current.len(), 2, "{table}"); // the row and the legend
    assert!(current[0].contains("offsite copy"), "{table}");
}

#[test]
fn key_remove_of_the_other_slot_then_its_secret_no_longer_opens() {
    let t = T::new();
    let repo = t.path("repo");
    let pw = t.password_file("pw", "old-password-aa01");
    t.ok(&["init", s(&repo), "--repo-password-file", s(&pw)]);
    let key = t.path("k");
    t.ok(&[
        "key",
        "add",
        s(&repo),
        "--repo-password-file",
        s(&pw),
        "--new-key-file",
        s(&key),
    ]);
    let v = slots(&t, &repo, &["--key-file", s(&key)]);
    let password_slot = v.iter().find(|s| s.1 == "password").unwrap().0.clone();
    let key_slot = v.iter().find(|s| s.2).unwrap().0.clone();
    // The slot in use is not removed.
    let (code, m) = t.fails(&["key", "remove", s(&repo), &key_slot, "--key-file", s(&key)]);
    assert_eq!(code, 1, "{m}");
    assert!(m.contains("opened with"), "{m}");
    assert!(m.contains("another key slot"), "{m}");
    // An id that is no slot.
    let (_, m) = t.fails(&[
        "key",
        "remove",
        s(&repo),
        "0000000000000000",
        "--key-file",
        s(&key),
    ]);
    assert!(m.contains("no key slot"), "{m}");
    // The password slot, opened with the key file.
    let out = t.ok(&[
        "key",
        "remove",
        s(&repo),
        &password_slot,
        "--key-file",
        s(&key),
    ]);
    assert!(
        out.contains(&format!("removed key slot {password_slot}")),
        "{out}"
    );
    let (code, m) = t.fails(&["ls", s(&repo), "--repo-password-file", s(&pw)]);
    assert_eq!(code, 1, "{m}");
    assert!(!m.contains("old-password-aa01"), "{m}");
    t.ok(&["ls", s(&repo), "--key-file", s(&key)]);
    assert_eq!(slots(&t, &repo, &["--key-file", s(&key)]).len(), 1);
}

#[test]
fn key_passwd_replaces_the_password() {
    let t = T::new();
    let repo = t.path("repo");
    let old = t.password_file("old", "old-password-b7");
    let new = t.password_file("new", "new-password-c8");
    t.ok(&["init", s(&repo), "--repo-password-file", s(&old)]);
    let before = slots(&t, &repo, &["--repo-password-file", s(&old)]);
    let out = t.ok(&[
        "key",
        "passwd",
        s(&repo),
        "--repo-password-file",
        s(&old),
        "--new-password-file",
        s(&new),
    ]);
    assert!(
        out.contains(&format!("key slot {} of repository", before[0].0)),
        "{out}"
    );
    assert!(
        !out.contains("password-b7") && !out.contains("password-c8"),
        "{out}"
    );
    t.ok(&["ls", s(&repo), "--repo-password-file", s(&new)]);
    let (code, m) = t.fails(&["ls", s(&repo), "--repo-password-file", s(&old)]);
    assert_eq!(code, 1, "{m}");
    assert!(m.contains("does not open"), "{m}");
    let after = slots(&t, &repo, &["--repo-password-file", s(&new)]);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after[0].0, before[0].0);
    // Without a new secret and without a terminal: refused, naming the flags.
    let (code, m) = t.fails(&["key", "passwd", s(&repo), "--repo-password-file", s(&new)]);
    assert_eq!(code, 1, "{m}");
    assert!(
        m.contains("--new-password-file") && m.contains("--new-key-file"),
        "{m}"
    );
}

#[test]
fn encryption_none_needs_no_secret_and_says_so() {
    let t = T::new();
    let repo = t.path("repo");
    let out = t.ok(&["init", s(&repo), "--encryption", "none"]);
    assert!(out.contains("WITHOUT encryption"), "{out}");
    let ls = t.ok(&["ls", s(&repo)]);
    assert!(ls.contains("NOT encrypted"), "{ls}");
    let v = t.json(&["ls", s(&repo), "--json"]);
    assert_eq!(v["repository"]["encryption"], "none", "{v}");
    assert_eq!(v["repository"]["encrypted"], false, "{v}");
    for action in ["list", "passwd"] {
        let (code, m) = t.fails(&["key", action, s(&repo)]);
        assert_eq!(code, 1, "{m}");
        assert!(
            m.contains(&format!(
                "repository {} is not encrypted (created with --encryption none): it has no key slots",
                repo.display()
            )),
            "{action}: {m}"
        );
    }
    let (_, m) = t.fails(&["key", "remove", s(&repo), "0123456789abcdef"]);
    assert!(m.contains("is not encrypted"), "{m}");
}

/// An image of 8 blocks: two equal random blocks, a zero block, three random blocks, one
/// block of a repeated byte (compresses well; the byte depends on the seed), a zero block.
fn image(path: &Path, seed: u8) {
    let mut data = vec![0u8; 8 * BS];
    TestRng::new(u64::from(seed)).fill(&mut data[..BS]);
    data.copy_within(..BS, BS);
    TestRng::new(u64::from(seed) + 1).fill(&mut data[3 * BS..6 * BS]);
    data[6 * BS..7 * BS].fill(0x40 + seed);
    std::fs::write(path, data).unwrap();
}

/// Equal but for the last digits JSON's decimal form rounds away.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

fn space(v: &Value) -> (u64, u64, u64, u64, f64) {
    (
        v["logical_bytes"].as_u64().unwrap(),
        v["unique_chunks"].as_u64().unwrap(),
        v["unique_raw_bytes"].as_u64().unwrap(),
        v["stored_bytes"].as_u64().unwrap(),
        v["dedup_ratio"].as_f64().unwrap(),
    )
}

#[test]
fn ls_shows_space_statistics_per_disk_and_for_the_repository() {
    let t = T::new();
    let repo = t.path("repo");
    let key = t.path("k");
    t.ok(&["init", s(&repo), "--key-file", s(&key)]);
    let img = t.path("img");
    image(&img, 11);
    let (a, b) = (vdi(1), vdi(2));
    // Disk a: the image twice (a base, then a new set with the same bytes); disk b: once.
    for (v, time) in [(&a, time(0)), (&a, time(24)), (&b, time(0))] {
        t.ok(&[
            "import",
            s(&repo),
            "--vdi",
            v,
            "--raw",
            s(&img),
            "--time",
            &time,
            "--key-file",
            s(&key),
        ]);
    }
    let v = t.json(&["ls", s(&repo), "--json", "--key-file", s(&key)]);
    let disks: Vec<&Value> = v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|vm| vm["disks"].as_array().unwrap())
        .collect();
    assert_eq!(disks.len(), 2, "{v}");
    let bs = BS as u64;
    // 6 stored blocks per import, 5 distinct (two blocks are equal).
    for d in &disks {
        let imports = if d["vdi"] == a.as_str() { 2 } else { 1 };
        let (logical, unique, raw, stored, dedup) = space(&d["space"]);
        assert_eq!(logical, imports * 6 * bs, "{d}");
        assert_eq!(unique, 5, "{d}");
        assert_eq!(raw, 5 * bs, "{d}");
        assert!(close(dedup, (imports * 6) as f64 / 5.0), "{d}");
        // Four random blocks do not compress; the repeated byte does.
        assert!(stored > 4 * bs && stored < 5 * bs, "{d}");
        assert_eq!(d["space"]["points"], imports, "{d}");
        assert_eq!(d["space"]["missing_chunks"], 0, "{d}");
    }
    let r = &v["repository"];
    let (logical, unique, raw, stored, dedup) = space(r);
    assert_eq!((logical, unique, raw), (18 * bs, 5, 5 * bs), "{r}");
    assert!(close(dedup, 3.6), "{r}");
    let c = r["compression_ratio"].as_f64().unwrap();
    assert!(close(c, raw as f64 / stored as f64), "{r}");
    assert!(c > 1.0, "{r}");
    assert_eq!(r["encryption"], "aes-256-gcm", "{r}");
    assert_eq!(r["encrypted"], true, "{r}");
    assert_eq!(r["path"], s(&repo), "{r}");
    // Everything on storage: at least the chunks, and exactly what the files hold (lock
    // files, `lock` and `locks/`, are not objects).
    let on_disk: u64 = files_under(&repo)
        .iter()
        .filter(|p| !p.starts_with(repo.join("locks")))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n != "lock" && !n.starts_with('.'))
        })
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(r["storage_bytes"].as_u64().unwrap(), on_disk, "{r}");
    assert!(on_disk > stored);
    // The text: a space line per disk, a summary line for the repository.
    let text = t.ok(&["ls", s(&repo), "--key-file", s(&key)]);
    let space_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("  space  "))
        .collect();
    assert_eq!(space_lines.len(), 2, "{text}");
    assert!(
        space_lines
            .iter()
            .any(|l| l.contains("768.0 KiB read by its backups")
                && l.contains("in 5 unique chunks")
                && l.contains("dedup 2.40x")),
        "{text}"
    );
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with(&format!("repository {} (encrypted): ", repo.display())),
        "{text}"
    );
    assert!(
        last.contains("on storage; 2 disks: ") && last.contains(" read by its backups"),
        "{text}"
    );
    assert!(last.contains("dedup 3.60x"), "{text}");
}

#[test]
fn gc_on_an_empty_repository_has_nothing_to_do() {
    let t = T::new();
    let repo = t.path("repo");
    let key = t.path("k");
    t.ok(&["init", s(&repo), "--key-file", s(&key)]);
    let out = t.ok(&["gc", s(&repo), "--key-file", s(&key)]);
    assert!(out.contains("nothing to do"), "{out}");
    let v = t.json(&["gc", s(&repo), "--key-file", s(&key), "--json", "--dry-run"]);
    assert_eq!(v["packs_deleted"], 0, "{v}");
    assert_eq!(v["bytes_freed"], 0, "{v}");
    assert_eq!(v["dry_run"], true, "{v}");
    // The repack threshold is a percentage.
    let (code, m) = t.fails(&[
        "gc",
        s(&repo),
        "--key-file",
        s(&key),
        "--repack-below",
        "101",
    ]);
    assert_eq!(code, 2, "{m}");
}

#[test]
fn prune_says_what_gc_freed_and_gc_then_has_nothing_to_do() {
    let t = T::new();
    let repo = t.path("repo");
    t.ok(&["init", s(&repo), "--encryption", "none"]);
    let (one, two) = (t.path("one"), t.path("two"));
    image(&one, 21);
    image(&two, 31);
    let v = vdi(1);
    // Two sets of different bytes: keeping the newest point drops the first set's chunks.
    for (img, time) in [(&one, time(0)), (&two, time(24))] {
        t.ok(&[
            "import",
            s(&repo),
            "--vdi",
            &v,
            "--raw",
            s(img),
            "--time",
            &time,
        ]);
    }
    let out = t.ok(&["prune", s(&repo), "--keep-last", "1"]);
    let gc_line = out
        .lines()
        .find(|l| l.starts_with("garbage collection: "))
        .unwrap_or_else(|| panic!("no gc line: {out}"));
    assert!(gc_line.contains("deleted 1 unreferenced pack"), "{out}");
    assert!(gc_line.contains("; freed "), "{out}");
    let out = t.ok(&["gc", s(&repo)]);
    assert!(out.contains("nothing to do"), "{out}");
    // --no-gc says where the space went.
    let out = t.ok(&["prune", s(&repo), "--keep-last", "1", "--no-gc"]);
    assert!(out.contains("not run (--no-gc)"), "{out}");
}

#[test]
fn cbtfs_repo_stands_in_for_the_repository_of_a_key_action() {
    let t = T::new();
    let repo = t.path("repo");
    let key = t.path("k");
    t.ok(&["init", s(&repo), "--key-file", s(&key)]);
    let o = t.run_env(
        &["key", "--key-file", s(&key), "list", "--json"],
        &[("CBTFS_REPO", s(&repo))],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["repository"], s(&repo), "{v}");
}
