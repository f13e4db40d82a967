//! Backup jobs into a repository in a bucket: `cbtfs job run` and `cbtfs job check` reach it at
//! the configuration's `s3_endpoint` and verify it with its `ca_cert`, with no endpoint in the
//! environment (a systemd unit has none).

use crate::common;
use crate::common::Bounded;

use std::path::Path;
use std::process::Output;

use crate::common::pool::{SimPool, VmSpec};
use crate::common::rgw::{Rgw, no_secret, s3ok};
use crate::common::{BS, cbtfs_cmd, s};
use serde_json::Value;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    )
}

/// cbtfs with the user's keys and region but no endpoint in its environment.
fn cbtfs_without_endpoint(rgw: &Rgw, args: &[&str]) -> Output {
    let o = cbtfs_cmd()
        .env_remove("CBTFS_S3_ENDPOINT")
        .env_remove("AWS_ENDPOINT_URL")
        .env("AWS_ACCESS_KEY_ID", &rgw.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &rgw.secret_key)
        .env("AWS_REGION", &rgw.region)
        .args(args)
        .bounded()
        .unwrap();
    no_secret(rgw, args, &o);
    o
}

/// A configuration: host xs1 (the pool's simulator), repository main at `url` with
/// `repo_extra` lines, and job `nightly` taking every VM.
fn config(p: &SimPool, url: &str, repo_extra: &str) -> std::path::PathBuf {
    let text = format!(
        "[host.xs1]\nurl = \"{}\"\nuser = \"root\"\npassword_file = \"{}\"\ntimeout = 30\n\n\
         [repository.main]\npath = \"{url}\"\nkey_file = \"{}\"\n{repo_extra}\n\n\
         [job.nightly]\nhost = \"xs1\"\nrepository = \"main\"\nvms = [\"*\"]\nreport = \"{}\"\n",
        p.sim.url,
        p.pw.display(),
        common::key_file().display(),
        p.report_path("nightly").display()
    );
    let c = p.dir.path().join("cbtfs.toml");
    std::fs::write(&c, text).unwrap();
    c
}

fn report(p: &SimPool) -> Value {
    let r = p.report_path("nightly");
    let v = serde_json::from_str(&std::fs::read_to_string(&r).unwrap()).unwrap();
    std::fs::remove_file(&r).unwrap();
    v
}

#[test]
fn a_job_reaches_its_bucket_at_the_configured_endpoint() {
    // Its health check makes loop devices: see `host_state`.
    let _serial = common::host_state();
    let Some(rgw) = common::rgw::rgw() else {
        return;
    };
    let bucket = rgw.bucket("jobs", false);
    let url = format!("s3://{bucket}/pool");
    s3ok(rgw, &["init", &url]);
    let p = SimPool::start(
        "lab",
        &[VmSpec {
            name: "web-1",
            tags: &[],
            disks: &[("root", 24)],
            template: false,
        }],
        |_| {},
    );
    let want = p.disk("web-1/root");
    let cfg = config(&p, &url, &format!("s3_endpoint = \"{}/\"", rgw.endpoint));

    let o = cbtfs_without_endpoint(rgw, &["job", "run", "nightly", "--config", s(&cfg)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r = report(&p);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(r["disks"].as_array().unwrap().len(), 1, "{r}");
    let point = r["disks"][0]["point"].as_str().unwrap().to_string();

    // `ls` of the bucket (the endpoint from the environment here) shows the point, and it
    // holds the disk's bytes.
    let ls: Value = serde_json::from_str(&s3ok(rgw, &["ls", &url, "--json"])).unwrap();
    let d = &ls["vms"][0]["disks"][0];
    assert_eq!(ls["vms"][0]["name"], "web-1", "{ls}");
    assert_eq!(d["sets"].as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(d["sets"][0]["points"].as_array().unwrap().len(), 1, "{ls}");
    let out = p.dir.path().join("point.raw");
    s3ok(rgw, &["export", &url, &point, s(&out), "--force"]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), want.len());
    assert!(
        got.chunks(BS).zip(want.chunks(BS)).all(|(a, b)| a == b),
        "{point} differs from the disk"
    );

    // `job check` opens it the same way: the job's one point is checked.
    let o = cbtfs_without_endpoint(
        rgw,
        &["job", "check", "nightly", "--config", s(&cfg), "--json"],
    );
    let c: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("job check: {e}: {}", text(&o)));
    assert_eq!(c["points"].as_array().unwrap().len(), 1, "{c}");
    assert_eq!(c["points"][0]["point"], point.as_str(), "{c}");
    assert_eq!(c["points"][0]["error"], Value::Null, "{c}");

    // The repository's ca_cert reaches the store: a file holding no certificate is named, by
    // both commands.
    let bad = p.dir.path().join("not-a-ca.pem");
    std::fs::write(&bad, "no certificate here\n").unwrap();
    let cfg = config(
        &p,
        &url,
        &format!(
            "s3_endpoint = \"{}\"\nca_cert = \"{}\"",
            rgw.endpoint,
            bad.display()
        ),
    );
    let o = cbtfs_without_endpoint(rgw, &["job", "run", "nightly", "--config", s(&cfg)]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let r = report(&p);
    let errors = r["errors"].to_string();
    assert!(
        errors.contains(s(&bad)) && errors.contains("no PEM certificate"),
        "{errors}"
    );
    let o = cbtfs_without_endpoint(rgw, &["job", "check", "nightly", "--config", s(&cfg)]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains(s(&bad)) && t.contains("no PEM certificate"),
        "{t}"
    );
    assert!(Path::new(&bad).exists());
}
