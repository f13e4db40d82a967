//! A real S3 endpoint for the tests: Ceph's radosgw on a throwaway single-node cluster on
//! loopback (`scripts/rgw.sh`), started once per test process on first use and stopped when the
//! process is gone.
//!
//! The Rust test harness has no exit hook, so the cluster is started by a watchdog: a small
//! shell in its own process group that runs `rgw.sh start`, hands the endpoint and keys back
//! on its stdout, then waits for the test process to exit (however it ends: success, panic,
//! SIGKILL) and runs `rgw.sh stop` and removes the cluster's directory. No daemon outlives the
//! test run by more than about a second.
//!
//! Buckets are made with `curl --aws-sigv4` (an S3 client independent of cbtfs's own), one fresh
//! bucket per test.

use super::Bounded;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A running radosgw and an S3 user's keys.
#[derive(Debug, Clone)]
pub struct Rgw {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    /// The cluster's directory (logs in `log/`).
    pub dir: PathBuf,
}

static RGW: OnceLock<Result<Rgw, String>> = OnceLock::new();

/// Are Ceph's daemons installed?
fn ceph_installed() -> bool {
    ["ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph"]
        .iter()
        .all(|t| {
            ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
                .iter()
                .any(|d| Path::new(d).join(t).exists())
        })
}

/// The test process's cluster, started on first use; `None` (after `skip`, which fails under
/// CBTFS_TEST_STRICT=1) when Ceph is not installed. A cluster that fails to start panics the
/// test with the script's message.
pub fn rgw() -> Option<&'static Rgw> {
    if !ceph_installed() {
        super::skip("Ceph (ceph-mon, ceph-osd, radosgw) is not installed; run scripts/setup.sh");
        return None;
    }
    match RGW.get_or_init(start) {
        Ok(r) => Some(r),
        Err(e) => panic!("cannot start radosgw: {e}"),
    }
}

fn start() -> Result<Rgw, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/rgw.sh");
    let dir = std::env::temp_dir().join(format!("cbtfs-rgw-{}", std::process::id()));
    // The watchdog: start, report, wait for the test process to go, stop, clean up (a
    // cluster that failed to start keeps its directory, for its logs). Its output after the
    // report goes nowhere (the test process may be gone by then).
    let watchdog = r#"
        script=$1 dir=$2 parent=$3
        keep=0
        if out=$("$script" start "$dir" 2>&1); then
            printf '%s\nREADY\n' "$out"
        else
            keep=1
            printf '%s\n(its logs are kept in %s)\nFAILED\n' "$out" "$dir"
        fi
        exec >/dev/null 2>&1 </dev/null
        while kill -0 "$parent" 2>/dev/null; do sleep 0.5; done
        "$script" stop "$dir"
        [ "$keep" = 1 ] || rm -rf "$dir"
    "#;
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new("bash")
            .arg("-c")
            .arg(watchdog)
            .arg("rgw-watchdog")
            .arg(&script)
            .arg(&dir)
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C to the test run does not stop it before it
            // has stopped the cluster.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run bash: {e}"))?
    };
    let stdout = child.stdout.take().ok_or("no watchdog stdout")?;
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading the watchdog: {e}"))?;
        match line.as_str() {
            "READY" => return parse_env(&lines, dir),
            "FAILED" => return Err(lines.join("\n")),
            _ => lines.push(line),
        }
    }
    Err(format!(
        "the watchdog ended without a report: {}",
        lines.join("\n")
    ))
}

fn parse_env(lines: &[String], dir: PathBuf) -> Result<Rgw, String> {
    let get = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
            .ok_or_else(|| format!("rgw.sh printed no {k}"))
    };
    Ok(Rgw {
        endpoint: get("CBTFS_S3_ENDPOINT")?,
        access_key: get("AWS_ACCESS_KEY_ID")?,
        secret_key: get("AWS_SECRET_ACCESS_KEY")?,
        region: get("AWS_REGION")?,
        dir,
    })
}

impl Rgw {
    /// A new empty bucket named after `hint` (unique in this test process); with Object Lock
    /// (and so versioning) enabled if `object_lock`.
    pub fn bucket(&self, hint: &str, object_lock: bool) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let clean: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(30)
            .collect();
        let name = format!(
            "t{}-{}-{clean}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut headers = Vec::new();
        if object_lock {
            headers.push("x-amz-bucket-object-lock-enabled: true");
        }
        let (code, body) = self.request("PUT", &name, &headers);
        assert_eq!(code, 200, "create bucket {name}: HTTP {code}: {body}");
        name
    }

    /// An S3 request signed with the user's keys by curl (keys passed on stdin, never in
    /// argv), with `body` (sent for PUT and POST); returns the HTTP status and body.
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: &[u8],
    ) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-K", "-", "-X", method, "-w", "\n%{http_code}"])
            .arg("--aws-sigv4")
            .arg(format!("aws:amz:{}:s3", self.region))
            // curl 7.88 signs no payload hash of its own; S3 wants one.
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]);
        for h in headers {
            cmd.arg("-H").arg(h);
        }
        let body_file = tempfile::NamedTempFile::new().expect("a temporary file");
        if matches!(method, "PUT" | "POST") {
            std::fs::write(body_file.path(), body).expect("write the request body");
            cmd.arg("--data-binary")
                .arg(format!("@{}", body_file.path().display()));
        }
        cmd.arg(format!("{}/{}", self.endpoint, path))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("curl runs");
        child
            .stdin
            .take()
            .expect("curl stdin")
            .write_all(format!("user = \"{}:{}\"\n", self.access_key, self.secret_key).as_bytes())
            .expect("write curl's config");
        let out = child.wait_with_output().expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            code.trim().parse().unwrap_or(0),
            format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
        )
    }

    /// `request_with` without a body.
    pub fn request(&self, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
        self.request_with(method, path, headers, b"")
    }

    /// The environment a cbtfs command needs to reach the endpoint as this user.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CBTFS_S3_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", self.region.clone()),
        ]
    }
}

/// cbtfs with the endpoint's credentials in its environment; no output ever shows the secret
/// key.
pub fn s3cbtfs(rgw: &Rgw, args: &[&str]) -> Output {
    let o = super::cbtfs_cmd()
        .envs(rgw.env())
        .args(args)
        .bounded()
        .unwrap();
    no_secret(rgw, args, &o);
    o
}

/// Neither output of `o` shows the endpoint's secret key.
pub fn no_secret(rgw: &Rgw, args: &[&str], o: &Output) {
    for text in [&o.stdout, &o.stderr] {
        assert!(
            !String::from_utf8_lossy(text).contains(&rgw.secret_key),
            "cbtfs {args:?} printed the secret key"
        );
    }
}

/// `s3cbtfs`, required to succeed; its stdout.
pub fn s3ok(rgw: &Rgw, args: &[&str]) -> String {
    let o = s3cbtfs(rgw, args);
    assert!(
        o.status.success(),
        "cbtfs {args:?}: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
