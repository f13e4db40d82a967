//! Object Lock repositories against a real radosgw: what ransomware holding the backup
//! server's S3 keys can and cannot do, gc and prune on a locked repository, and stale multipart
//! uploads. Every S3 answer is read here by plain string search over curl's output (an S3
//! client independent of cbtfs's own).

use crate::common;

use crate::common::rgw::{Rgw, s3cbtfs, s3ok};
use crate::common::*;

/// Exit code and stdout+stderr of a command expected to fail.
fn s3fails(rgw: &Rgw, args: &[&str]) -> (i32, String) {
    let o = s3cbtfs(rgw, args);
    assert!(!o.status.success(), "cbtfs {args:?} succeeded");
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The texts of every `<tag>…</tag>` in `xml`, in order.
fn tags<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

/// One entry of a version listing: (key, version id, is a delete marker, is latest).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Ver {
    key: String,
    id: String,
    marker: bool,
    latest: bool,
}

/// Every version and delete marker under `prefix/` (one page: the tests stay far below 1,000).
fn versions(rgw: &Rgw, bucket: &str, prefix: &str) -> Vec<Ver> {
    let (code, body) = rgw.request(
        "GET",
        &format!("{bucket}?max-keys=1000&prefix={prefix}%2F&versions="),
        &[],
    );
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("<IsTruncated>true"), "{body}");
    let mut out = Vec::new();
    for (tag, marker) in [("Version", false), ("DeleteMarker", true)] {
        for v in tags(&body, tag) {
            out.push(Ver {
                key: tags(v, "Key")[0].to_string(),
                id: tags(v, "VersionId")[0].to_string(),
                marker,
                latest: tags(v, "IsLatest")[0] == "true",
            });
        }
    }
    out.sort();
    out
}

/// The current objects' keys under `prefix/` (a plain listing).
fn current(rgw: &Rgw, bucket: &str, prefix: &str) -> Vec<String> {
    let (code, body) = rgw.request(
        "GET",
        &format!("{bucket}?list-type=2&max-keys=1000&prefix={prefix}%2F"),
        &[],
    );
    assert_eq!(code, 200, "{body}");
    tags(&body, "Key").into_iter().map(str::to_string).collect()
}

/// Retain-until date (as S3 prints it) and mode of a version.
fn retention(rgw: &Rgw, bucket: &str, key: &str, id: &str) -> (String, String) {
    let (code, body) = rgw.request(
        "GET",
        &format!("{bucket}/{key}?retention=&versionId={id}"),
        &[],
    );
    assert_eq!(code, 200, "retention of {key}: {body}");
    (
        tags(&body, "RetainUntilDate")[0].to_string(),
        tags(&body, "Mode")[0].to_string(),
    )
}

fn unix(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn iso(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A PutObjectRetention request (with the Content-MD5 S3 wants on it).
fn put_retention(
    rgw: &Rgw,
    bucket: &str,
    key: &str,
    mode: &str,
    until: i64,
    extra: &[&str],
) -> (u16, String) {
    use base64::Engine as _;
    use md5::Digest as _;
    let body = format!(
        "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{mode}</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
        iso(until)
    );
    let md5 = format!(
        "Content-MD5: {}",
        base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body.as_bytes()))
    );
    let mut headers = vec![md5.as_str()];
    headers.extend_from_slice(extra);
    rgw.request_with(
        "PUT",
        &format!("{bucket}/{key}?retention="),
        &headers,
        body.as_bytes(),
    )
}

/// Three points of one disk (a base and two increments), imported into `r`; returns each
/// point's bytes.
fn three_points(rgw: &Rgw, dir: &std::path::Path, r: &str, v: &str, seed: u64) -> Vec<Vec<u8>> {
    let blocks = 12u64;
    let mut img = vec![0u8; blocks as usize * BS];
    TestRng::new(seed).fill(&mut img[..8 * BS]);
    let mut points = Vec::new();
    for i in 0..3u64 {
        let mut args = vec!["import".to_string(), r.into(), "--vdi".into(), v.into()];
        if i > 0 {
            let changed = [i, 9 + i];
            for &b in &changed {
                TestRng::new(seed * 10 + i * 100 + b)
                    .fill(&mut img[b as usize * BS..(b as usize + 1) * BS]);
            }
            let bm = write_bitmap(dir, &format!("bm{i}"), &changed, blocks);
            args.extend(["--bitmap".into(), s(&bm).into()]);
        }
        let path = dir.join(format!("p{i}.img"));
        std::fs::write(&path, &img).unwrap();
        args.extend([
            "--raw".into(),
            s(&path).into(),
            "--time".into(),
            time(i),
            "--vm-name".into(),
            "web01".into(),
            "--name".into(),
            "xvda".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        s3ok(rgw, &args);
        points.push(img.clone());
    }
    points
}

/// Export every point the repository lists and compare it with what was imported (point `i`
/// is the one taken at `time(i)`); `first` is the first point still kept.
fn every_point_restores(
    rgw: &Rgw,
    dir: &std::path::Path,
    r: &str,
    points: &[Vec<u8>],
    first: usize,
) {
    let ls = s3ok(rgw, &["ls", r, "--json"]);
    let j: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let listed = j["vms"][0]["disks"][0]["sets"][0]["points"]
        .as_array()
        .unwrap();
    let times: Vec<&str> = listed.iter().map(|p| p["time"].as_str().unwrap()).collect();
    let want: Vec<String> = (first..points.len()).map(|i| time(i as u64)).collect();
    assert_eq!(times, want, "{ls}");
    for (p, i) in listed.iter().zip(first..) {
        let out = dir.join(format!("out{i}"));
        s3ok(rgw, &["export", r, p["path"].as_str().unwrap(), s(&out)]);
        assert!(
            std::fs::read(&out).unwrap() == points[i],
            "point {i} restored other bytes"
        );
    }
}

#[test]
fn object_lock_needs_a_bucket_with_it_and_an_s3_repository() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let plain = rgw.bucket("nolock", false);
    let (_, m) = s3fails(
        rgw,
        &["init", &format!("s3://{plain}/r"), "--object-lock", "7"],
    );
    assert!(
        m.contains(&format!(
            "bucket {plain:?} does not have Object Lock enabled"
        )) && m.contains("--object-lock-enabled-for-bucket"),
        "{m}"
    );
    assert!(current(rgw, &plain, "r").is_empty(), "init wrote objects");
    let d = tempfile::tempdir().unwrap();
    let (_, m) = s3fails(rgw, &["init", s(&d.path().join("r")), "--object-lock", "7"]);
    assert!(m.contains("--object-lock needs a repository on S3"), "{m}");
    let locked = rgw.bucket("days", true);
    let (_, m) = s3fails(
        rgw,
        &["init", &format!("s3://{locked}/r"), "--object-lock", "0"],
    );
    assert!(m.contains("1 to 36500 days"), "{m}");
}

/// Ransomware with the repository's own S3 keys: deletes every version it can (all refused),
/// overwrites objects, tries to shorten the locks (refused in COMPLIANCE mode), then deletes
/// every key. `verify` names the damage and the repair; `repair --undelete` undoes it and every
/// point restores byte for byte.
#[test]
fn ransomware_with_the_writers_keys_cannot_destroy_a_locked_repository() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("ransom", true);
    let d = tempfile::tempdir().unwrap();
    let prefix = "site";
    let url = format!("s3://{bucket}/{prefix}");
    let r = url.as_str();
    let out = s3ok(rgw, &["init", r, "--object-lock", "1"]);
    assert!(out.contains("1 day in COMPLIANCE mode"), "{out}");
    let points = three_points(rgw, d.path(), r, &vdi(31), 31);
    s3ok(rgw, &["verify", r]);

    // Every object cbtfs wrote is locked for a day, in COMPLIANCE mode; the lease is gone.
    let keys = current(rgw, &bucket, prefix);
    assert!(keys.iter().any(|k| k.ends_with("/cbtfs.repo")), "{keys:?}");
    assert!(keys.iter().any(|k| k.contains("/packs/")), "{keys:?}");
    assert!(!keys.iter().any(|k| k.ends_with("/lock")), "{keys:?}");
    let written = versions(rgw, &bucket, prefix);
    let t0 = now();
    for v in written.iter().filter(|v| !v.marker) {
        let (until, mode) = retention(rgw, &bucket, &v.key, &v.id);
        assert_eq!(mode, "COMPLIANCE", "{v:?}");
        let until = unix(&until);
        assert!(
            until > t0 + 86_400 - 600 && until <= t0 + 86_400 + 5,
            "{v:?}: {until}"
        );
    }

    // 1. Delete every version by id: all refused, all still there.
    for v in written.iter().filter(|v| !v.marker) {
        let (code, body) = rgw.request(
            "DELETE",
            &format!("{bucket}/{}?versionId={}", v.key, v.id),
            &[],
        );
        assert_eq!(code, 403, "deleting locked {v:?} answered {code}: {body}");
    }
    assert_eq!(versions(rgw, &bucket, prefix), written);
    // 2. Shorten a lock: refused in COMPLIANCE mode, even with the governance bypass.
    let pack = written.iter().find(|v| v.key.contains("/packs/")).unwrap();
    let before = retention(rgw, &bucket, &pack.key, &pack.id);
    for extra in [&[][..], &["x-amz-bypass-governance-retention: true"][..]] {
        let (code, body) = put_retention(rgw, &bucket, &pack.key, "COMPLIANCE", now() + 60, extra);
        assert_eq!(
            code, 403,
            "shortening a COMPLIANCE lock answered {code}: {body}"
        );
    }
    assert_eq!(retention(rgw, &bucket, &pack.key, &pack.id), before);
    // 3. Overwrite a point index: verify names it and the repair.
    let pindex = keys.iter().find(|k| k.contains("/pindex/")).unwrap();
    let (code, body) = rgw.request_with(
        "PUT",
        &format!("{bucket}/{pindex}"),
        &[],
        b"encrypted by ransomware",
    );
    assert_eq!(code, 200, "{body}");
    let (code, m) = s3fails(rgw, &["verify", r]);
    assert_eq!(code, 3, "{m}");
    assert!(
        m.contains(&format!("s3://{bucket}/{pindex}"))
            && m.contains("overwritten")
            && m.contains(&format!("cbtfs repair --undelete {url}")),
        "{m}"
    );
    // 4. Overwrite a pack, then delete every key (delete markers on top of everything).
    let (code, body) = rgw.request_with("PUT", &format!("{bucket}/{}", pack.key), &[], b"gone");
    assert_eq!(code, 200, "{body}");
    for k in &keys {
        let (code, body) = rgw.request("DELETE", &format!("{bucket}/{k}"), &[]);
        assert_eq!(code, 204, "plain delete of {k}: {body}");
    }
    assert!(current(rgw, &bucket, prefix).is_empty());
    // The repository looks gone; verify names every deleted object and the way back.
    let (_, m) = s3fails(rgw, &["ls", r]);
    assert!(m.contains("cbtfs.repo"), "{m}");
    let (code, m) = s3fails(rgw, &["verify", r]);
    assert_eq!(code, 3, "{m}");
    for k in &keys {
        assert!(
            m.contains("deleted by someone other than cbtfs: a delete marker")
                && m.contains(&format!("s3://{bucket}/{k})")),
            "verify does not name {k}: {m}"
        );
    }
    assert!(m.contains(&format!("cbtfs repair --undelete {url}")), "{m}");

    // The repair: every delete marker and foreign version removed, the originals on top.
    let out = s3ok(rgw, &["repair", r, "--undelete"]);
    assert!(
        out.contains(&format!("undeleted s3://{bucket}/{prefix}/cbtfs.repo")),
        "{out}"
    );
    assert!(out.contains("0 failed"), "{out}");
    let mut now_keys = current(rgw, &bucket, prefix);
    now_keys.sort();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(now_keys, want);
    let after: Vec<Ver> = versions(rgw, &bucket, prefix);
    assert_eq!(
        after, written,
        "the versions cbtfs wrote, and only those, remain"
    );
    let out = s3ok(rgw, &["verify", r]);
    assert!(out.contains("ok: 3 points"), "{out}");
    every_point_restores(rgw, d.path(), r, &points, 0);
    // A second repair has nothing to do.
    let out = s3ok(rgw, &["repair", r, "--undelete"]);
    assert!(out.contains("0 undeleted, 0 restored, 0 failed"), "{out}");
}

/// GOVERNANCE mode: prune drops points without deleting anything locked (cbtfs's own delete
/// markers are not damage), gc extends a lock an administrator shortened and reclaims nothing
/// still locked.
#[test]
fn prune_and_gc_on_a_locked_repository_extend_locks_and_delete_nothing_locked() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("gc", true);
    let d = tempfile::tempdir().unwrap();
    let prefix = "site";
    let url = format!("s3://{bucket}/{prefix}");
    let r = url.as_str();
    let out = s3ok(
        rgw,
        &[
            "init",
            r,
            "--object-lock",
            "1",
            "--object-lock-mode",
            "governance",
        ],
    );
    assert!(out.contains("GOVERNANCE"), "{out}");
    let points = three_points(rgw, d.path(), r, &vdi(32), 32);
    let written: Vec<Ver> = versions(rgw, &bucket, prefix);

    // An administrator shortens one pack's lock to ten minutes (allowed in GOVERNANCE mode).
    let pack = written
        .iter()
        .find(|v| v.key.contains("/packs/"))
        .unwrap()
        .clone();
    let (code, body) = put_retention(
        rgw,
        &bucket,
        &pack.key,
        "GOVERNANCE",
        now() + 600,
        &["x-amz-bypass-governance-retention: true"],
    );
    assert_eq!(code, 200, "{body}");
    let short = unix(&retention(rgw, &bucket, &pack.key, &pack.id).0);
    assert!(short <= now() + 600, "{short}");

    let out = s3ok(rgw, &["prune", r, "--keep-last", "1", "--no-gc"]);
    assert!(out.contains("removed 2 of 3 point"), "{out}");
    // Nothing cbtfs wrote is gone: prune only put delete markers (and their records).
    let after_prune = versions(rgw, &bucket, prefix);
    for v in &written {
        assert!(
            after_prune
                .iter()
                .any(|a| a.key == v.key && a.id == v.id && !a.marker),
            "prune deleted the locked version {v:?}"
        );
    }
    let markers: Vec<&Ver> = after_prune.iter().filter(|v| v.marker).collect();
    assert!(!markers.is_empty(), "prune dropped nothing");
    for m in &markers {
        let rec = m
            .key
            .replacen(&format!("{prefix}/"), &format!("{prefix}/deleted/"), 1);
        assert!(
            after_prune.iter().any(|v| v.key == rec && !v.marker),
            "no deletion record for {}",
            m.key
        );
    }
    // cbtfs's own deletions are not damage.
    s3ok(rgw, &["verify", r]);

    let t0 = now();
    let j: serde_json::Value = serde_json::from_str(&s3ok(rgw, &["gc", r, "--json"])).unwrap();
    let lock = &j["object_lock"];
    assert!(lock["extended"].as_u64().unwrap() >= 1, "{j}");
    assert_eq!(lock["versions_reclaimed"].as_u64(), Some(0), "{j}");
    let extended = unix(&retention(rgw, &bucket, &pack.key, &pack.id).0);
    assert!(
        extended >= t0 + 86_400,
        "the shortened lock was not extended: {extended}"
    );
    // Every version written before is still there after gc.
    let after_gc = versions(rgw, &bucket, prefix);
    for v in &written {
        assert!(
            after_gc.iter().any(|a| a.key == v.key && a.id == v.id),
            "gc deleted the locked version {v:?}"
        );
    }
    s3ok(rgw, &["verify", r]);
    every_point_restores(rgw, d.path(), r, &points, 2);
}

/// A writer taking the lock aborts the multipart uploads killed writers left below the prefix
/// (and only those).
#[test]
fn a_writer_aborts_multipart_uploads_left_below_its_prefix() {
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("uploads", false);
    let d = tempfile::tempdir().unwrap();
    let r = format!("s3://{bucket}/site");
    s3ok(rgw, &["init", &r]);
    for key in ["site/packs/ab/abandoned", "elsewhere/upload"] {
        let (code, body) = rgw.request("POST", &format!("{bucket}/{key}?uploads="), &[]);
        assert_eq!(code, 200, "{body}");
        assert_eq!(tags(&body, "UploadId").len(), 1, "{body}");
    }
    let in_progress = || {
        let (code, body) = rgw.request("GET", &format!("{bucket}?uploads="), &[]);
        assert_eq!(code, 200, "{body}");
        let mut keys: Vec<String> = tags(&body, "Upload")
            .into_iter()
            .map(|u| tags(u, "Key")[0].to_string())
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(
        in_progress(),
        ["elsewhere/upload", "site/packs/ab/abandoned"]
    );
    // Readers leave it alone; a writer (taking the lock) aborts it.
    s3ok(rgw, &["ls", &r]);
    assert_eq!(in_progress().len(), 2);
    let points = three_points(rgw, d.path(), &r, &vdi(33), 33);
    assert_eq!(in_progress(), ["elsewhere/upload"]);
    every_point_restores(rgw, d.path(), &r, &points, 0);
}

/// The store itself with Object Lock: puts are locked and create-only, a delete hides the
/// object behind a recorded delete marker (gone for every read and listing), and a key cbtfs
/// deletes may be put again (the journal's stages are).
#[test]
fn a_locked_store_hides_what_it_deletes_and_may_put_the_key_again() {
    use cbtfs::repo::store::Store;
    use cbtfs::repo::store::s3::lock::{LockMode, ObjectLock};
    use cbtfs::repo::store::s3::{S3Config, S3Store, S3Url};
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("store", true);
    let store = S3Store::new(
        S3Url::parse(&format!("s3://{bucket}/p")).unwrap(),
        S3Config::new(
            Some(rgw.endpoint.clone()),
            &rgw.region,
            &rgw.access_key,
            &rgw.secret_key,
        ),
    )
    .unwrap();
    store.check_bucket_lock().unwrap();
    store
        .enable_object_lock(ObjectLock::new(1, LockMode::Governance).unwrap())
        .unwrap();
    store.put("journal/j.1", b"first").unwrap();
    let e = store.put("journal/j.1", b"again").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
    let id = tags(
        &rgw.request(
            "GET",
            &format!("{bucket}?prefix=p%2Fjournal%2F&versions="),
            &[],
        )
        .1,
        "VersionId",
    )[0]
    .to_string();
    let (until, mode) = retention(rgw, &bucket, "p/journal/j.1", &id);
    assert_eq!(mode, "GOVERNANCE");
    assert!(unix(&until) > now() + 86_000, "{until}");
    store.delete("journal/j.1").unwrap();
    assert_eq!(
        store.get("journal/j.1").unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    assert!(store.list("journal/").unwrap().is_empty());
    assert_eq!(
        current(rgw, &bucket, "p"),
        ["p/deleted/journal/j.1"],
        "the record of the deletion"
    );
    store.put("journal/j.1", b"second").unwrap();
    assert_eq!(store.get("journal/j.1").unwrap(), b"second");
    // Deleting it again keeps the one record.
    store.delete("journal/j.1").unwrap();
    assert_eq!(current(rgw, &bucket, "p"), ["p/deleted/journal/j.1"]);
}
