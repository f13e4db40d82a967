//! Where a job run's record goes (`cbtfs::job::deliver`): the report file, the metrics file,
//! webhooks received by a real HTTP listener in the test, mail through a fake `sendmail`;
//! then `cbtfs job status` reading the report and `cbtfs job units` writing the timers.

use crate::common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Bounded, cbtfs_cmd, s};
use cbtfs::job::config::{Config, JobConf};
use cbtfs::job::deliver::{self, Options};
use cbtfs::job::report::sample::{END, disk, report};
use cbtfs::job::report::{JobReport, Outcome};

fn partial() -> JobReport {
    report(vec![
        disk("web01", "xvda", "v1", true),
        disk("db02", "root", "v2", false),
    ])
}

fn all_ok() -> JobReport {
    report(vec![disk("web01", "xvda", "v1", true)])
}

/// A config of one job `nightly` whose files are under `dir`, with `notify` as its notify table.
fn config_text(dir: &Path, notify: &str) -> String {
    format!(
        r#"
[host.xs1]
url = "https://xs1.example"
user = "root"
password_file = "{d}/xs1.password"

[repository.main]
path = "{d}/repo"
password_file = "{d}/repo.password"

[job.nightly]
host = "xs1"
repository = "main"
vms = ["*"]
schedule = "*-*-* 02:00:00"
report = "{d}/log/nightly.json"
metrics = "{d}/prom/cbtfs.prom"
{notify}
"#,
        d = dir.display()
    )
}

fn job(dir: &Path, notify: &str) -> JobConf {
    let c = Config::parse(&config_text(dir, notify), &dir.join("cbtfs.toml")).unwrap();
    c.jobs["nightly"].clone()
}

/// One HTTP request as the listener received it.
#[derive(Debug, Clone)]
struct Request {
    head: String,
    body: Vec<u8>,
}

/// A webhook receiver: answers every request with `status`, or holds the connection without a
/// word when `status` is None. Counts connections.
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    connections: Arc<AtomicUsize>,
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
        assert!(buf.len() < 65536, "the request head is too long");
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some(Request { head, body })
}

impl Receiver {
    fn start(status: Option<u16>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (l, reqs, conns) = (listener, requests.clone(), connections.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in l.incoming() {
                let Ok(mut stream) = stream else { continue };
                conns.fetch_add(1, Ordering::SeqCst);
                match status {
                    None => held.push(stream),
                    Some(code) => {
                        if let Some(r) = read_request(&mut stream) {
                            reqs.lock().unwrap().push(r);
                        }
                        let _ = write!(
                            stream,
                            "HTTP/1.1 {code} X\r\nContent-Length: 10\r\nConnection: close\r\n\r\nanswer {code}"
                        );
                    }
                }
            }
        });
        Receiver {
            url: format!("http://127.0.0.1:{port}/hooks/T0/B0/SECRET-TOKEN"),
            requests,
            connections,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// No connection came. (Called after `deliver` returned without a problem: a request it
    /// made was answered, so its connection was accepted and counted before that.)
    fn nothing_sent(&self) -> bool {
        self.connections.load(Ordering::SeqCst) == 0
    }
}

fn quick() -> Options {
    Options {
        webhook_timeout: Duration::from_secs(1),
        webhook_retry_pause: Duration::from_millis(100),
        mail_timeout: Duration::from_secs(5),
    }
}

#[test]
fn webhooks_post_the_report_as_json_slack_and_teams() {
    let t = tempfile::tempdir().unwrap();
    let r = partial();
    for format in ["json", "slack", "teams"] {
        let rx = Receiver::start(Some(200));
        let j = job(
            t.path(),
            &format!(
                "notify = {{ webhook = \"{}\", webhook_format = \"{format}\" }}",
                rx.url
            ),
        );
        let problems = deliver::deliver_with("nightly", &j, &r, &quick());
        assert_eq!(problems, Vec::<String>::new(), "{format}");
        let reqs = rx.requests();
        assert_eq!(reqs.len(), 1, "{format}: one POST");
        let req = &reqs[0];
        assert!(
            req.head
                .starts_with("POST /hooks/T0/B0/SECRET-TOKEN HTTP/1.1\r\n"),
            "{}",
            req.head
        );
        assert!(
            req.head
                .to_ascii_lowercase()
                .contains("\r\ncontent-type: application/json\r\n"),
            "{}",
            req.head
        );
        let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        match format {
            "json" => {
                let back: JobReport = serde_json::from_value(v).unwrap();
                assert_eq!(back, r);
            }
            "slack" => {
                let text = v["text"].as_str().unwrap();
                assert_eq!(v.as_object().unwrap().len(), 1);
                assert!(
                    text.starts_with("cbtfs job nightly on xs1: PARTIAL (1 of 2 disks ok)\n```\n"),
                    "{text}"
                );
                assert!(text.ends_with("```"), "{text}");
                assert!(
                    text.contains("  FAILED  db02/root: VM.snapshot: VM_NOT_FOUND"),
                    "{text}"
                );
            }
            _ => {
                assert_eq!(v["@type"], "MessageCard");
                assert_eq!(v["@context"], "https://schema.org/extensions");
                assert_eq!(
                    v["title"],
                    "cbtfs job nightly on xs1: PARTIAL (1 of 2 disks ok)"
                );
                assert_eq!(v["themeColor"], "ECB22E");
                let facts = v["sections"][0]["facts"].as_array().unwrap();
                let fact = |n: &str| {
                    facts
                        .iter()
                        .find(|f| f["name"] == n)
                        .map(|f| f["value"].clone())
                };
                assert_eq!(fact("Outcome").unwrap(), "PARTIAL");
                assert_eq!(fact("Disks").unwrap(), "1 ok, 1 failed");
                assert_eq!(fact("Repository").unwrap(), "/backup/repo");
            }
        }
    }
    // The report file holds the run, byte for byte as serde writes it, mode 0640.
    let p = t.path().join("log/nightly.json");
    let back = deliver::read_report(&p).unwrap().unwrap();
    assert_eq!(back, r);
    let mut want = serde_json::to_vec_pretty(&r).unwrap();
    want.push(b'\n');
    assert_eq!(std::fs::read(&p).unwrap(), want);
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // The metrics file is there; no temporary file is left in either directory.
    let m = std::fs::read_to_string(t.path().join("prom/cbtfs.prom")).unwrap();
    assert!(
        m.contains(
            "cbtfs_disk_last_run_ok{cbtfs_job=\"nightly\",vm=\"db02\",disk=\"root\",vdi=\"v2\"} 0\n"
        ),
        "{m}"
    );
    for d in ["log", "prom"] {
        let names: Vec<String> = std::fs::read_dir(t.path().join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 1, "{d}: {names:?}");
    }
}

#[test]
fn when_failure_sends_nothing_on_ok_and_always_does() {
    let t = tempfile::tempdir().unwrap();
    let sendmail = fake_sendmail(t.path(), 0, "");
    let rx = Receiver::start(Some(200));
    let notify = |when: &str| {
        format!(
            "notify = {{ webhook = \"{}\", mail = \"ops@example.com\", sendmail = \"{}\", when = \"{when}\" }}",
            rx.url,
            sendmail.display()
        )
    };
    let j = job(t.path(), &notify("failure"));
    assert_eq!(
        deliver::deliver_with("nightly", &j, &all_ok(), &quick()),
        Vec::<String>::new()
    );
    assert!(rx.nothing_sent(), "a webhook went out for an ok run");
    assert!(
        !t.path().join("mail.stdin").exists(),
        "a mail went out for an ok run"
    );
    // The report and metrics are written all the same.
    assert!(t.path().join("log/nightly.json").is_file());
    assert!(t.path().join("prom/cbtfs.prom").is_file());

    let j = job(t.path(), &notify("always"));
    assert_eq!(
        deliver::deliver_with("nightly", &j, &all_ok(), &quick()),
        Vec::<String>::new()
    );
    assert_eq!(rx.requests().len(), 1);
    assert!(t.path().join("mail.stdin").is_file());
}

/// A `sendmail` that saves its arguments and standard input beside it, writes `stderr` and
/// exits with `code`.
fn fake_sendmail(dir: &Path, code: i32, stderr: &str) -> PathBuf {
    let p = dir.join("sendmail");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{d}/mail.argv'\ncat > '{d}/mail.stdin'\nprintf '%s' '{stderr}' >&2\nexit {code}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn mail_goes_to_sendmail_with_the_summary() {
    let t = tempfile::tempdir().unwrap();
    let sendmail = fake_sendmail(t.path(), 0, "");
    let j = job(
        t.path(),
        &format!(
            "notify = {{ mail = [\"ops@example.com\", \"backup@example.com\"], sendmail = \"{}\" }}",
            sendmail.display()
        ),
    );
    let r = partial();
    assert_eq!(
        deliver::deliver_with("nightly", &j, &r, &quick()),
        Vec::<String>::new()
    );
    assert_eq!(
        std::fs::read_to_string(t.path().join("mail.argv")).unwrap(),
        "-t\n-oi\n"
    );
    let mail = std::fs::read_to_string(t.path().join("mail.stdin")).unwrap();
    let want = format!(
        "To: ops@example.com, backup@example.com\n\
         Subject: cbtfs job nightly: PARTIAL (1 of 2 disks ok)\n\
         MIME-Version: 1.0\n\
         Content-Type: text/plain; charset=utf-8\n\
         Content-Transfer-Encoding: 8bit\n\
         Auto-Submitted: auto-generated\n\
         \n{}",
        deliver::summary(&r)
    );
    assert_eq!(mail, want);
    assert!(mail.contains("\n  FAILED  db02/root: VM.snapshot: VM_NOT_FOUND; 0 B read, 2.5 s\n"));
    assert!(mail.ends_with("outcome: PARTIAL (exit status 3)\n"));

    // A sendmail that refuses: a problem naming its exit and what it said; the report is
    // still written.
    let t = tempfile::tempdir().unwrap();
    let sendmail = fake_sendmail(t.path(), 75, "queue directory full");
    let j = job(
        t.path(),
        &format!(
            "notify = {{ mail = \"ops@example.com\", sendmail = \"{}\" }}",
            sendmail.display()
        ),
    );
    let problems = deliver::deliver_with("nightly", &j, &r, &quick());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("exit status: 75"), "{problems:?}");
    assert!(problems[0].contains("queue directory full"), "{problems:?}");
    assert!(problems[0].contains("ops@example.com"), "{problems:?}");
    assert!(t.path().join("log/nightly.json").is_file());

    // No sendmail at all.
    let j = job(
        t.path(),
        &format!(
            "notify = {{ mail = \"ops@example.com\", sendmail = \"{}\" }}",
            t.path().join("nope").display()
        ),
    );
    let problems = deliver::deliver_with("nightly", &j, &r, &quick());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("cannot start it"), "{problems:?}");
}

#[test]
fn failing_webhooks_are_problems_in_bounded_time_and_hide_the_url() {
    let t = tempfile::tempdir().unwrap();
    let r = partial();
    // A server error: tried twice, then a problem.
    let rx = Receiver::start(Some(500));
    let j = job(
        t.path(),
        &format!("notify = {{ webhook = \"{}\" }}", rx.url),
    );
    let problems = deliver::deliver_with("nightly", &j, &r, &quick());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("the webhook to 127.0.0.1 failed"),
        "{problems:?}"
    );
    assert!(problems[0].contains("500"), "{problems:?}");
    assert!(problems[0].contains("answer 500"), "{problems:?}");
    assert!(!problems[0].contains("SECRET"), "{problems:?}");
    assert!(!problems[0].contains("hooks/"), "{problems:?}");
    assert_eq!(rx.requests().len(), 2, "one retry");
    // The report was written regardless, with the run's own outcome.
    let back = deliver::read_report(&t.path().join("log/nightly.json"))
        .unwrap()
        .unwrap();
    assert_eq!(back.outcome, Outcome::Partial);

    // A client error is not retried.
    let rx = Receiver::start(Some(404));
    let j = job(
        t.path(),
        &format!("notify = {{ webhook = \"{}\" }}", rx.url),
    );
    let problems = deliver::deliver_with("nightly", &j, &r, &quick());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(rx.requests().len(), 1, "no retry of a 404");

    // A server that accepts and never answers: two attempts of 1 s each, then a problem.
    let rx = Receiver::start(None);
    let j = job(
        t.path(),
        &format!("notify = {{ webhook = \"{}\" }}", rx.url),
    );
    let start = Instant::now();
    let problems = deliver::deliver_with("nightly", &j, &r, &quick());
    let took = start.elapsed();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("127.0.0.1"), "{problems:?}");
    assert!(problems[0].contains("no answer"), "{problems:?}");
    assert!(!problems[0].contains("SECRET"), "{problems:?}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "took {took:?}"
    );
    common::wait_for("the retry's connection", Duration::from_secs(5), || {
        rx.connections.load(Ordering::SeqCst) == 2
    });

    // https: a server that answers the TLS handshake with plain text is refused (the TLS
    // client is set up with the system's roots and never falls back to plain HTTP).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let j = job(
        t.path(),
        &format!("notify = {{ webhook = \"https://127.0.0.1:{port}/x/SECRET\" }}"),
    );
    let problems = deliver::deliver_with("nightly", &j, &r, &quick());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("the webhook to 127.0.0.1 failed: error sending request"),
        "{problems:?}"
    );
    assert!(!problems[0].contains("SECRET"), "{problems:?}");

    // Nobody listening at all.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let j = job(
        t.path(),
        &format!("notify = {{ webhook = \"http://127.0.0.1:{port}/x/SECRET\" }}"),
    );
    let problems = deliver::deliver_with("nightly", &j, &r, &quick());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(!problems[0].contains("SECRET"), "{problems:?}");
}

#[test]
fn metrics_keep_the_last_success_of_a_disk_that_failed() {
    let t = tempfile::tempdir().unwrap();
    let j = job(t.path(), "");
    let first = report(vec![
        disk("web01", "xvda", "v1", true),
        disk("db02", "root", "v2", true),
    ]);
    assert_eq!(
        deliver::deliver("nightly", &j, &first),
        Vec::<String>::new()
    );
    let mut second = partial();
    second.started = "2026-12-01T02:00:00Z".into();
    second.finished = "2026-12-01T02:10:00Z".into();
    assert_eq!(
        deliver::deliver("nightly", &j, &second),
        Vec::<String>::new()
    );
    let m = std::fs::read_to_string(t.path().join("prom/cbtfs.prom")).unwrap();
    let first_end = END; // 2026-11-30T02:10:00Z
    let second_end = first_end + 86_400;
    assert!(
        m.contains(&format!("cbtfs_disk_last_success_timestamp_seconds{{cbtfs_job=\"nightly\",vm=\"db02\",disk=\"root\",vdi=\"v2\"}} {first_end}\n")),
        "{m}"
    );
    assert!(
        m.contains(&format!("cbtfs_disk_last_success_timestamp_seconds{{cbtfs_job=\"nightly\",vm=\"web01\",disk=\"xvda\",vdi=\"v1\"}} {second_end}\n")),
        "{m}"
    );
    assert!(
        m.contains("cbtfs_job_last_run_outcome{cbtfs_job=\"nightly\",outcome=\"partial\"} 1\n")
    );
    assert!(m.contains(&format!(
        "cbtfs_job_last_success_timestamp_seconds{{cbtfs_job=\"nightly\"}} {first_end}\n"
    )));
    assert_eq!(
        std::fs::metadata(t.path().join("prom/cbtfs.prom"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    // Where promtool is installed, it accepts the file.
    if common::have("promtool") {
        let o = common::output_within(
            std::process::Command::new("promtool")
                .args(["check", "metrics"])
                .stdin(std::fs::File::open(t.path().join("prom/cbtfs.prom")).unwrap()),
            common::command_limit(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

fn write_config(dir: &Path, notify: &str) -> PathBuf {
    let p = dir.join("cbtfs.toml");
    let mut text = config_text(dir, notify);
    text.push_str(
        r#"
[job.weekly]
host = "xs1"
repository = "main"
vms = ["tag:weekly"]
report = "WEEKLY"
"#
        .replace("WEEKLY", &dir.join("log/weekly.json").display().to_string())
        .as_str(),
    );
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn job_status_reads_the_last_report() {
    let t = tempfile::tempdir().unwrap();
    let cfg = write_config(t.path(), "");
    let r = partial();
    deliver::write_report(&t.path().join("log/nightly.json"), &r).unwrap();
    let o = cbtfs_cmd()
        .args(["job", "status", "--config", s(&cfg)])
        .env("TZ", "UTC")
        .bounded()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The next run, where systemd can tell: the next 02:00 UTC, within a day.
    let next = if common::have("systemd-analyze") {
        let now = cbtfs::timefmt::now();
        let day = now - now.rem_euclid(86_400);
        let at2 = day + 7200;
        let next = if at2 > now { at2 } else { at2 + 86_400 };
        format!(" (next {})", cbtfs::timefmt::rfc3339(next))
    } else {
        common::skip("systemd-analyze is not installed: job status shows no next run");
        String::new()
    };
    let d = t.path().display();
    let mut lines = out.lines();
    let first = lines.next().unwrap();
    assert!(
        first.starts_with("nightly: last run 2026-11-30T02:00:00Z ("),
        "{out}"
    );
    assert!(
        first.ends_with(" ago), PARTIAL (exit status 3): 1 of 2 disks ok, 1 failed"),
        "{out}"
    );
    let rest: Vec<&str> = lines.collect();
    assert_eq!(
        rest,
        [
            "  db02/root: VM.snapshot: VM_NOT_FOUND".to_string(),
            format!("  report {d}/log/nightly.json"),
            format!("  schedule *-*-* 02:00:00{next}"),
            format!("weekly: never run (no report at {d}/log/weekly.json)"),
            "  schedule none (run by hand)".to_string(),
        ]
    );

    // One job, as JSON.
    let o = cbtfs_cmd()
        .args(["job", "status", "nightly", "--json", "--config", s(&cfg)])
        .env("TZ", "UTC")
        .bounded()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0]["job"], "nightly");
    assert_eq!(a[0]["schedule"], "*-*-* 02:00:00");
    if !next.is_empty() {
        assert!(a[0]["next"].as_str().unwrap().ends_with("T02:00:00Z"));
    }
    let lr = &a[0]["last_run"];
    assert_eq!(lr["outcome"], "partial");
    assert_eq!(lr["exit_status"], 3);
    assert_eq!(lr["disks_ok"], 1);
    assert_eq!(lr["disks_failed"], 1);
    assert_eq!(lr["finished"], "2026-11-30T02:10:00Z");
    assert_eq!(lr["failed"][0], "db02/root: VM.snapshot: VM_NOT_FOUND");
    assert_eq!(a[0]["error"], serde_json::Value::Null);

    // An unknown job, and a damaged report: errors that say what to do.
    let o = cbtfs_cmd()
        .args(["job", "status", "nope", "--config", s(&cfg)])
        .bounded()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("there is no job \"nope\""), "{err}");
    std::fs::write(t.path().join("log/weekly.json"), b"{ not json").unwrap();
    let o = cbtfs_cmd()
        .args(["job", "status", "--config", s(&cfg)])
        .bounded()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!(
            "weekly: cannot read the report {d}/log/weekly.json: not a job report"
        )),
        "{out}"
    );
    assert!(out.starts_with("nightly: last run"), "{out}");
}

#[test]
fn job_units_write_a_service_and_timer_per_scheduled_job() {
    let t = tempfile::tempdir().unwrap();
    let cfg = write_config(t.path(), "");
    let units = t.path().join("units");
    let o = cbtfs_cmd()
        .args([
            "job",
            "units",
            "--config",
            s(&cfg),
            "--dir",
            s(&units),
            "--bin",
            common::bin(),
        ])
        .bounded()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!(
            "{u}/cbtfs-job-nightly.service\n{u}/cbtfs-job-nightly.timer\n",
            u = units.display()
        )
    );
    assert!(stderr.contains("job weekly has no schedule"), "{stderr}");
    let service = std::fs::read_to_string(units.join("cbtfs-job-nightly.service")).unwrap();
    let cfg_abs = std::fs::canonicalize(&cfg).unwrap();
    assert!(
        service.contains(&format!(
            "\n[Service]\nType=oneshot\nExecStart={} job run nightly --config {}\n",
            common::bin(),
            cfg_abs.display()
        )),
        "{service}"
    );
    assert!(service.contains("\nStandardOutput=journal\n"));
    let timer = std::fs::read_to_string(units.join("cbtfs-job-nightly.timer")).unwrap();
    assert!(
        timer.contains("\n[Timer]\nOnCalendar=*-*-* 02:00:00\nPersistent=true\nUnit=cbtfs-job-nightly.service\n"),
        "{timer}"
    );
    assert!(timer.contains("\n[Install]\nWantedBy=timers.target\n"));
    let mut names: Vec<String> = std::fs::read_dir(&units)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["cbtfs-job-nightly.service", "cbtfs-job-nightly.timer"]
    );

    // systemd itself accepts them (the man page they name is installed with cbtfs, not here).
    if !common::have("systemd-analyze") {
        common::skip("systemd-analyze is not installed: the units are not verified by systemd");
        return;
    }
    let o = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(units.join("cbtfs-job-nightly.service"))
        .arg(units.join("cbtfs-job-nightly.timer"))
        .bounded()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.contains("cbtfs-job-nightly"),
        "systemd-analyze verify complains: {err}"
    );

    // A job that lost its schedule leaves stale units, which are named.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("schedule = \"*-*-* 02:00:00\"\n", "");
    std::fs::write(&cfg, text).unwrap();
    let o = cbtfs_cmd()
        .args(["job", "units", "--config", s(&cfg), "--dir", s(&units)])
        .bounded()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(o.stdout, b"");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cbtfs-job-nightly.timer is not a scheduled job of")
            && err.contains("systemctl disable --now cbtfs-job-nightly.timer"),
        "{err}"
    );
}

/// scripts/install.sh writes the units of the configuration's scheduled jobs (into the staging
/// root here, where it says how to enable them instead of calling systemctl).
#[test]
fn install_script_writes_the_job_units() {
    let t = tempfile::tempdir().unwrap();
    let cfg = write_config(t.path(), "");
    let dest = t.path().join("stage");
    let o = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh"))
        .env("DESTDIR", &dest)
        .env("PREFIX", "/usr")
        .env("CBTFS_BIN", common::bin())
        .env("CBTFS_CONFIG", &cfg)
        .bounded()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let units = dest.join("etc/systemd/system");
    assert!(
        out.contains(&format!(
            "wrote cbtfs-job-nightly.timer to {}; enable them where systemd runs with:\n  systemctl daemon-reload && systemctl enable --now cbtfs-job-nightly.timer\n",
            units.display()
        )),
        "{out}"
    );
    let service = std::fs::read_to_string(units.join("cbtfs-job-nightly.service")).unwrap();
    assert!(
        service.contains(&format!(
            "\nExecStart=/usr/bin/cbtfs job run nightly --config {}\n",
            std::fs::canonicalize(&cfg).unwrap().display()
        )),
        "{service}"
    );
    assert!(units.join("cbtfs-job-nightly.timer").is_file());
    assert!(!units.join("cbtfs-job-weekly.timer").exists());
}

/// The README's "Backing up a pool": its config reads as written (`config check --offline`),
/// its units come out of `job units`, and the series its alert rules use are the ones written.
#[test]
fn readme_pool_example_works_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split_once("### Backing up a pool\n")
        .expect("the README has the section")
        .1;
    let section = section.split("\n### ").next().unwrap();
    let toml = section
        .split_once("```toml\n")
        .unwrap()
        .1
        .split_once("```")
        .unwrap()
        .0;
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("cbtfs.toml");
    std::fs::write(&cfg, toml).unwrap();
    let o = cbtfs_cmd()
        .args(["config", "check", "--offline", "--config", s(&cfg)])
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = Config::parse(toml, &cfg).unwrap();
    let j = &c.jobs["nightly"];
    assert_eq!(
        j.report.as_deref(),
        Some(Path::new("/var/log/cbtfs/nightly.json"))
    );
    let units = t.path().join("units");
    let o = cbtfs_cmd()
        .args(["job", "units", "--config", s(&cfg), "--dir", s(&units)])
        .bounded()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read_to_string(units.join("cbtfs-job-nightly.timer"))
            .unwrap()
            .contains("\nOnCalendar=*-*-* 02:00:00\n")
    );
    // Every series the alert rules name is in a metrics file of a run.
    let m = cbtfs::job::deliver::metrics_text("nightly", &partial(), "");
    for series in [
        "time() - cbtfs_disk_last_success_timestamp_seconds > 26 * 3600",
        "cbtfs_job_last_run_outcome{outcome=\"ok\"} == 0",
    ] {
        assert!(section.contains(series), "the README lost {series:?}");
        let name = series
            .trim_start_matches("time() - ")
            .split(['{', ' '])
            .next()
            .unwrap();
        assert!(
            m.contains(&format!("\n{name}{{cbtfs_job=\"nightly\",")),
            "{name}"
        );
    }
    assert!(section.contains("$labels.cbtfs_job"));
}
