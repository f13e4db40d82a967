//! Where a job run's record goes once the run is over: the JSON report file, the Prometheus
//! textfile, the notifications (webhook, mail), and the human summary printed on the terminal
//! and mailed. `cbtfs job run` builds one [`JobReport`] and hands it to [`deliver`]; nothing
//! here changes the run's outcome: whatever fails is returned as a problem (and logged).
//!
//! ## The report file
//!
//! The job's `report` path, or when none is set [`default_report_path`]:
//! `/var/lib/cbtfs/jobs/NAME.json` for root, `$XDG_STATE_HOME/cbtfs/jobs/NAME.json` (else
//! `~/.local/state/cbtfs/jobs/NAME.json`) for other users. It holds the last run only, written
//! atomically (a temporary file in the same directory, fsync, rename, fsync of the directory),
//! mode 0640; missing directories are made. `cbtfs job status` reads it.
//!
//! ## The metrics file
//!
//! node_exporter's textfile collector format (`# HELP`, `# TYPE`, then samples), written
//! atomically as the report. Every series carries a `cbtfs_job` label (not `job`, which
//! Prometheus sets itself to the scrape job's name). Several jobs may share one file: the
//! series of the other jobs are kept as they were, under a lock (`flock` on the file's
//! directory) so that two jobs finishing at once do not lose each other's lines.
//!
//! Per disk (`cbtfs_job`, `vm`, `disk`, `vdi`): `cbtfs_disk_last_success_timestamp_seconds`
//! (carried over from the previous file when this run failed for the disk, 0 if it never
//! succeeded, so that "no success for 26 h" is the expression
//! `time() - cbtfs_disk_last_success_timestamp_seconds > 26 * 3600`),
//! `cbtfs_disk_last_run_ok`, `cbtfs_disk_last_run_bytes_read`,
//! `cbtfs_disk_last_run_bytes_stored`, `cbtfs_disk_last_run_seconds`, `cbtfs_disk_points_kept`.
//! A disk the run did not reach (its VM could not be listed, the host was down) keeps its last
//! success series while the run reports such errors; a run without errors drops the series of
//! disks it no longer selects.
//!
//! Per job: `cbtfs_job_last_run_start_timestamp_seconds`, `..._end_timestamp_seconds`,
//! `cbtfs_job_last_run_seconds`, `cbtfs_job_last_run_outcome{outcome}` (1 for the run's outcome,
//! 0 for the others), `cbtfs_job_last_success_timestamp_seconds`, `cbtfs_job_disks{state}`,
//! `cbtfs_job_vms_selected`, `cbtfs_job_errors`, `cbtfs_job_step_ok{step}` (prune, copy) and
//! `cbtfs_repository_stored_bytes{repository}`.
//!
//! ## Notifications
//!
//! `notify.when = "failure"` (the default) sends only when the outcome is not ok; `"always"`
//! after every run. A webhook gets a POST of the report as JSON (`webhook_format = "json"`),
//! `{"text": ...}` (`"slack"`) or a MessageCard (`"teams"`); each attempt is bounded by
//! [`WEBHOOK_TIMEOUT`] and a failed one (no answer, 5xx, 429) is tried once more. Mail goes
//! through `sendmail -t -oi` (`notify.sendmail`, default [`DEFAULT_SENDMAIL`]) with the summary
//! as its plain-text body. Webhook URLs may hold tokens: only their host is ever printed.

use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{JobConf, NotifyWhen, WebhookFormat};
use super::report::{DiskOutcome, JobReport, Outcome};

/// The mail submission program when `notify.sendmail` is not set.
pub const DEFAULT_SENDMAIL: &str = "/usr/sbin/sendmail";

/// How long one webhook attempt may take (connect, send, answer): a chat service answers in
/// well under a second; a run must not hang on one that does not.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause before the webhook's one retry.
pub const WEBHOOK_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// How long `sendmail` may take to accept a message (it queues; it does not deliver).
pub const MAIL_TIMEOUT: Duration = Duration::from_secs(60);

/// The most bytes of a previous metrics file read back (a job of 1,000 disks writes ~1 MiB).
const MAX_PREVIOUS_METRICS: u64 = 16 << 20;

/// The most bytes of a report file read back by `job status`.
pub const MAX_REPORT_BYTES: u64 = 64 << 20;

/// Bounds of [`deliver_with`]; [`deliver`] uses the constants above.
#[derive(Debug, Clone)]
pub struct Options {
    pub webhook_timeout: Duration,
    pub webhook_retry_pause: Duration,
    pub mail_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            webhook_timeout: WEBHOOK_TIMEOUT,
            webhook_retry_pause: WEBHOOK_RETRY_PAUSE,
            mail_timeout: MAIL_TIMEOUT,
        }
    }
}

/// What went wrong delivering a run's record.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("cannot write the {what} {path}: {source}")]
    Write {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "no place for the report of job {job}: set `report = \"/path/{job}.json\"` in [job.{job}] ($HOME and $XDG_STATE_HOME are unset)"
    )]
    NoReportPath { job: String },
    #[error("the webhook to {host} failed: {why}; the run's outcome is unchanged")]
    Webhook { host: String, why: String },
    #[error("the mail to {to} through {sendmail} failed: {why}; the run's outcome is unchanged")]
    Mail {
        to: String,
        sendmail: String,
        why: String,
    },
    #[error("cannot read the report {path}: {why}")]
    ReadReport { path: String, why: String },
}

/// Where a job's report goes when its `report` is not set (see the module doc); None when the
/// user has no home and no state directory.
pub fn default_report_path(job_name: &str) -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let file = format!("{job_name}.json");
    if root {
        return Some(Path::new("/var/lib/cbtfs/jobs").join(file));
    }
    let env_dir = |k: &str| {
        std::env::var_os(k)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    env_dir("XDG_STATE_HOME")
        .or_else(|| env_dir("HOME").map(|h| h.join(".local/state")))
        .map(|d| d.join("cbtfs/jobs").join(file))
}

/// Where a job's report is written and read.
pub fn report_path(job_name: &str, job: &JobConf) -> Option<PathBuf> {
    job.report.clone().or_else(|| default_report_path(job_name))
}

/// A job's last report, or None when it was never written.
pub fn read_report(path: &Path) -> Result<Option<JobReport>, DeliverError> {
    let bad = |why: String| DeliverError::ReadReport {
        path: path.display().to_string(),
        why,
    };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    let mut bytes = Vec::new();
    f.take(MAX_REPORT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_REPORT_BYTES {
        return Err(bad(format!("larger than {MAX_REPORT_BYTES} bytes")));
    }
    let r: JobReport = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("not a job report ({e}); the next run rewrites it")))?;
    if r.format != super::report::REPORT_FORMAT {
        return Err(bad(format!(
            "its format is {:?}, not {:?}",
            r.format,
            super::report::REPORT_FORMAT
        )));
    }
    if r.version > super::report::REPORT_VERSION {
        return Err(bad(format!(
            "it is version {} of the report format; this cbtfs reads up to {}: upgrade cbtfs",
            r.version,
            super::report::REPORT_VERSION
        )));
    }
    Ok(Some(r))
}

/// Write the report file and the metrics file, and send the notifications, of a run of job
/// `job_name`. Returns what failed, one line each (already logged); the run's outcome stays
/// what the report says.
pub fn deliver(job_name: &str, job: &JobConf, report: &JobReport) -> Vec<String> {
    deliver_with(job_name, job, report, &Options::default())
}

/// [`deliver`] with other time bounds (tests).
pub fn deliver_with(
    job_name: &str,
    job: &JobConf,
    report: &JobReport,
    opts: &Options,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut note = |e: DeliverError| {
        tracing::warn!(job = job_name, "{e}");
        problems.push(e.to_string());
    };
    match report_path(job_name, job) {
        Some(p) => {
            if let Err(e) = write_report(&p, report) {
                note(e);
            }
        }
        None => note(DeliverError::NoReportPath {
            job: job_name.to_string(),
        }),
    }
    if let Some(m) = &job.metrics
        && let Err(e) = write_metrics(m, job_name, report)
    {
        note(e);
    }
    let send = match job.notify.when {
        NotifyWhen::Always => true,
        NotifyWhen::Failure => report.outcome != Outcome::Ok,
    };
    if send {
        if let Some(url) = &job.notify.webhook {
            let body = webhook_body(job.notify.webhook_format, report);
            match post_webhook(url, body, opts) {
                Ok(()) => tracing::info!(job = job_name, host = url_host(url), "webhook sent"),
                Err(e) => note(e),
            }
        }
        if !job.notify.mail.is_empty() {
            let sendmail = job
                .notify
                .sendmail
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SENDMAIL));
            match send_mail(&sendmail, &job.notify.mail, report, opts.mail_timeout) {
                Ok(()) => tracing::info!(job = job_name, "mail handed to {}", sendmail.display()),
                Err(e) => note(e),
            }
        }
    }
    problems
}

/// Write `report` to `path` atomically (mode 0640).
pub fn write_report(path: &Path, report: &JobReport) -> Result<(), DeliverError> {
    let mut bytes = serde_json::to_vec_pretty(report).map_err(|e| DeliverError::Write {
        what: "report",
        path: path.display().to_string(),
        source: io::Error::other(e),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, 0o640).map_err(|source| DeliverError::Write {
        what: "report",
        path: path.display().to_string(),
        source,
    })
}

/// Replace `path` with `bytes` so that a reader sees the old file or the new one, never a
/// part: a temporary file beside it (same filesystem), fsync, rename over, fsync of the
/// directory. Missing directories are made (0750). No temporary file is left behind, on
/// success or failure.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)?;
    // A name node_exporter's collector skips (it reads *.prom only) and no other writer
    // shares: the process id and a counter.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{seq}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

// ---------------------------------------------------------------------------------------------
// The summary

fn outcome_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::Partial => "PARTIAL",
        Outcome::Failed => "FAILED",
    }
}

fn secs(s: f64) -> String {
    if s.is_finite() && s >= 0.0 {
        format!("{s:.1} s")
    } else {
        "? s".into()
    }
}

fn disk_line(d: &DiskOutcome) -> String {
    let name = format!("{}/{}", d.vm, d.disk);
    if !d.ok {
        let why = d.error.as_deref().unwrap_or("no reason given");
        let kind = match (&d.kind, &d.reason) {
            (Some(k), Some(r)) => format!(" (was a {k}: {r})"),
            (Some(k), None) => format!(" (was a {k})"),
            _ => String::new(),
        };
        return format!(
            "  FAILED  {name}: {why}{kind}; {} read, {}",
            crate::cli::human(d.bytes_read),
            secs(d.seconds)
        );
    }
    let kind = match (&d.kind, &d.reason) {
        (Some(k), Some(r)) => format!("{k} ({r})"),
        (Some(k), None) => k.clone(),
        (None, _) => "committed".into(),
    };
    let mut line = format!(
        "  ok      {name}: {kind}, {} read, {} stored, {}",
        crate::cli::human(d.bytes_read),
        crate::cli::human(d.bytes_stored),
        secs(d.seconds)
    );
    if let Some(h) = &d.health {
        line.push_str(&format!(", health {}", h.state));
    }
    line
}

/// The human summary of a run, for the terminal and the mail: a head line with the outcome,
/// one line per disk (failed ones first, each with its reason), the run's own errors, the
/// prune and copy steps, the totals and the outcome again.
pub fn summary(report: &JobReport) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "job {} (host {}, repository {}): {}",
        report.job,
        report.host,
        report.repository,
        outcome_word(report.outcome)
    ));
    line(format!(
        "  started {}, finished {}, {}",
        report.started,
        report.finished,
        secs(report.seconds)
    ));
    let failed: Vec<&DiskOutcome> = report.disks.iter().filter(|d| !d.ok).collect();
    let ok: Vec<&DiskOutcome> = report.disks.iter().filter(|d| d.ok).collect();
    if !report.disks.is_empty() {
        line("disks:".into());
    }
    for d in failed.iter().chain(ok.iter()) {
        line(disk_line(d));
        if let Some(h) = &d.health {
            for v in h.volumes.iter().filter(|v| v.state != "clean") {
                line(format!(
                    "          health of {}/{}: {} {}: {} ({})",
                    d.vm, v.volume, v.filesystem, v.state, v.detail, v.checker
                ));
            }
        }
        for w in &d.warnings {
            line(format!("          warning: {w}"));
        }
    }
    if !report.errors.is_empty() {
        line("errors:".into());
        for e in &report.errors {
            line(format!("  {e}"));
        }
    }
    for w in &report.warnings {
        line(format!("warning: {w}"));
    }
    for (what, step) in [("prune", &report.prune), ("copy", &report.copy)] {
        if let Some(s) = step {
            line(format!(
                "{what}: {}: {} ({})",
                if s.ok { "ok" } else { "FAILED" },
                s.summary,
                secs(s.seconds)
            ));
        }
    }
    let read: u64 = report
        .disks
        .iter()
        .fold(0u64, |a, d| a.saturating_add(d.bytes_read));
    let stored: u64 = report
        .disks
        .iter()
        .fold(0u64, |a, d| a.saturating_add(d.bytes_stored));
    line(format!(
        "total: {} of {} ok, {} failed ({} selected); {} read, {} stored{}",
        ok.len(),
        crate::cli::text::count(report.disks.len(), "disk", "disks"),
        failed.len(),
        crate::cli::text::plural(report.vms_selected, "VM", "VMs"),
        crate::cli::human(read),
        crate::cli::human(stored),
        match report.repository_bytes {
            Some(b) => format!("; repository {}", crate::cli::human(b)),
            None => String::new(),
        }
    ));
    line(format!(
        "outcome: {} (exit status {})",
        outcome_word(report.outcome),
        report.outcome.exit_code()
    ));
    out
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// A label value as the text format wants it: `\`, `"` and line feeds escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// One sample line of the text format as read back: its family, labels and value text.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: String,
}

impl Sample {
    fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    fn render(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect();
        if labels.is_empty() {
            format!("{} {}", self.name, self.value)
        } else {
            format!("{}{{{}}} {}", self.name, labels.join(","), self.value)
        }
    }
}

/// Read one sample line (`name{k="v",...} value [timestamp]`); None for anything else.
fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = line.get(..name_end)?;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
    {
        return None;
    }
    let mut rest = line.get(name_end..)?;
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices();
        let mut key = String::new();
        loop {
            // key up to '=' (or '}' at the end)
            let (i, c) = chars.next()?;
            match c {
                '}' if key.is_empty() => {
                    rest = r.get(i + 1..)?;
                    break;
                }
                ',' | ' ' if key.is_empty() => continue,
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                '\\' => value.push('\\'),
                                '"' => value.push('"'),
                                _ => return None,
                            },
                            c => value.push(c),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                c if c.is_ascii_alphanumeric() || c == '_' => key.push(c),
                _ => return None,
            }
        }
    }
    let value = rest.split_whitespace().next()?.to_string();
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The families this module writes, in file order: name, type, help.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "cbtfs_job_last_run_start_timestamp_seconds",
        "gauge",
        "When the job's last run started (Unix time).",
    ),
    (
        "cbtfs_job_last_run_end_timestamp_seconds",
        "gauge",
        "When the job's last run finished (Unix time).",
    ),
    (
        "cbtfs_job_last_run_seconds",
        "gauge",
        "How long the job's last run took.",
    ),
    (
        "cbtfs_job_last_run_outcome",
        "gauge",
        "1 for the outcome of the job's last run (ok, partial, failed), 0 for the others.",
    ),
    (
        "cbtfs_job_last_success_timestamp_seconds",
        "gauge",
        "When a run of the job last ended ok (Unix time; 0 if never).",
    ),
    (
        "cbtfs_job_disks",
        "gauge",
        "Disks of the job's last run by state (ok, failed).",
    ),
    (
        "cbtfs_job_vms_selected",
        "gauge",
        "VMs the job's selectors matched in its last run.",
    ),
    (
        "cbtfs_job_errors",
        "gauge",
        "Errors of the job's last run that are not one disk's (host, VM listing, lock).",
    ),
    (
        "cbtfs_job_step_ok",
        "gauge",
        "1 if the step (prune, copy) of the job's last run succeeded, 0 if it failed.",
    ),
    (
        "cbtfs_repository_stored_bytes",
        "gauge",
        "Bytes stored in the job's repository after its last run.",
    ),
    (
        "cbtfs_disk_last_success_timestamp_seconds",
        "gauge",
        "When a point of the disk was last committed by the job (Unix time; 0 if never).",
    ),
    (
        "cbtfs_disk_last_run_ok",
        "gauge",
        "1 if the job's last run committed a point of the disk, 0 if it failed.",
    ),
    (
        "cbtfs_disk_last_run_bytes_read",
        "gauge",
        "Bytes of the disk read from the host in the job's last run.",
    ),
    (
        "cbtfs_disk_last_run_bytes_stored",
        "gauge",
        "New bytes of the disk stored in the repository in the job's last run.",
    ),
    (
        "cbtfs_disk_last_run_seconds",
        "gauge",
        "How long the disk's backup took in the job's last run.",
    ),
    (
        "cbtfs_disk_points_kept",
        "gauge",
        "Points of the disk kept after the prune of the job's last run.",
    ),
];

const JOB_LABEL: &str = "cbtfs_job";
const DISK_SUCCESS: &str = "cbtfs_disk_last_success_timestamp_seconds";
const JOB_SUCCESS: &str = "cbtfs_job_last_success_timestamp_seconds";

fn number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "0".into()
    }
}

/// A disk's identity across runs: its VDI uuid, else its names.
fn disk_key(vm: &str, disk: &str, vdi: &str) -> String {
    if vdi.is_empty() {
        format!("{vm}\n{disk}")
    } else {
        vdi.to_string()
    }
}

/// The metrics file after a run of `job_name`: `previous` (the file as it was, or "") with the
/// job's series replaced and the other jobs' kept.
pub fn metrics_text(job_name: &str, report: &JobReport, previous: &str) -> String {
    let mut samples: Vec<Sample> = Vec::new();
    // What the previous file says of this job.
    let mut prior_disk_success: Vec<(String, Sample)> = Vec::new();
    let mut prior_job_success: Option<String> = None;
    for s in previous.lines().filter_map(parse_sample) {
        if !FAMILIES.iter().any(|(n, _, _)| *n == s.name) {
            continue;
        }
        if s.label(JOB_LABEL) != Some(job_name) {
            if !samples.contains(&s) {
                samples.push(s);
            }
            continue;
        }
        if s.name == DISK_SUCCESS {
            let key = disk_key(
                s.label("vm").unwrap_or(""),
                s.label("disk").unwrap_or(""),
                s.label("vdi").unwrap_or(""),
            );
            prior_disk_success.push((key, s));
        } else if s.name == JOB_SUCCESS {
            prior_job_success = Some(s.value.clone());
        }
    }
    let start = crate::timefmt::parse(&report.started).ok();
    let end = crate::timefmt::parse(&report.finished).ok();
    let end_or_now = end.unwrap_or_else(crate::timefmt::now);
    let job = |name: &str, extra: &[(&str, &str)], value: String| Sample {
        name: name.to_string(),
        labels: std::iter::once((JOB_LABEL.to_string(), job_name.to_string()))
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .collect(),
        value,
    };
    if let Some(t) = start {
        samples.push(job(
            "cbtfs_job_last_run_start_timestamp_seconds",
            &[],
            t.to_string(),
        ));
    }
    if let Some(t) = end {
        samples.push(job(
            "cbtfs_job_last_run_end_timestamp_seconds",
            &[],
            t.to_string(),
        ));
    }
    samples.push(job(
        "cbtfs_job_last_run_seconds",
        &[],
        number(report.seconds),
    ));
    for o in [Outcome::Ok, Outcome::Partial, Outcome::Failed] {
        let word = match o {
            Outcome::Ok => "ok",
            Outcome::Partial => "partial",
            Outcome::Failed => "failed",
        };
        samples.push(job(
            "cbtfs_job_last_run_outcome",
            &[("outcome", word)],
            u8::from(report.outcome == o).to_string(),
        ));
    }
    let job_success = if report.outcome == Outcome::Ok {
        end_or_now.to_string()
    } else {
        prior_job_success.unwrap_or_else(|| "0".into())
    };
    samples.push(job(JOB_SUCCESS, &[], job_success));
    let ok = report.disks.iter().filter(|d| d.ok).count();
    let failed = report.disks.len().saturating_sub(ok);
    samples.push(job("cbtfs_job_disks", &[("state", "ok")], ok.to_string()));
    samples.push(job(
        "cbtfs_job_disks",
        &[("state", "failed")],
        failed.to_string(),
    ));
    samples.push(job(
        "cbtfs_job_vms_selected",
        &[],
        report.vms_selected.to_string(),
    ));
    samples.push(job(
        "cbtfs_job_errors",
        &[],
        report.errors.len().to_string(),
    ));
    for (step, s) in [("prune", &report.prune), ("copy", &report.copy)] {
        if let Some(s) = s {
            samples.push(job(
                "cbtfs_job_step_ok",
                &[("step", step)],
                u8::from(s.ok).to_string(),
            ));
        }
    }
    if let Some(b) = report.repository_bytes {
        samples.push(job(
            "cbtfs_repository_stored_bytes",
            &[("repository", &report.repository)],
            b.to_string(),
        ));
    }
    let mut seen: Vec<String> = Vec::new();
    for d in &report.disks {
        let key = disk_key(&d.vm, &d.disk, &d.vdi);
        // A disk listed twice would make the file invalid (duplicate series): the first wins.
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        let labels: [(&str, &str); 3] = [("vm", &d.vm), ("disk", &d.disk), ("vdi", &d.vdi)];
        let success = if d.ok {
            end_or_now.to_string()
        } else {
            prior_disk_success
                .iter()
                .find(|(k, _)| *k == key)
                .map_or_else(|| "0".into(), |(_, s)| s.value.clone())
        };
        samples.push(job(DISK_SUCCESS, &labels, success));
        samples.push(job(
            "cbtfs_disk_last_run_ok",
            &labels,
            u8::from(d.ok).to_string(),
        ));
        samples.push(job(
            "cbtfs_disk_last_run_bytes_read",
            &labels,
            d.bytes_read.to_string(),
        ));
        samples.push(job(
            "cbtfs_disk_last_run_bytes_stored",
            &labels,
            d.bytes_stored.to_string(),
        ));
        samples.push(job(
            "cbtfs_disk_last_run_seconds",
            &labels,
            number(d.seconds),
        ));
        if let Some(k) = d.points_kept {
            samples.push(job("cbtfs_disk_points_kept", &labels, k.to_string()));
        }
    }
    // Disks this run did not reach keep their last success while the run reports errors that
    // could explain it; a clean run no longer selecting them drops them.
    if !report.errors.is_empty() {
        for (key, s) in prior_disk_success {
            if !seen.contains(&key) {
                seen.push(key);
                samples.push(s);
            }
        }
    }
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        let mut of: Vec<&Sample> = samples.iter().filter(|s| s.name == *name).collect();
        if of.is_empty() {
            continue;
        }
        // Stable order: by job, then as written.
        of.sort_by(|a, b| a.label(JOB_LABEL).cmp(&b.label(JOB_LABEL)));
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for s in of {
            out.push_str(&s.render());
            out.push('\n');
        }
    }
    out
}

/// Holds `flock` on a directory while the metrics file in it is read and replaced.
struct DirLock(std::fs::File);

impl DirLock {
    fn take(dir: &Path) -> io::Result<DirLock> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(dir)?;
        // SAFETY: flock on a descriptor this function owns; blocks until the lock is free
        // (other jobs hold it for a read and a rename only).
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirLock(f))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking a descriptor this struct owns.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Replace the job's series in the metrics file at `path` (other jobs' series stay).
pub fn write_metrics(path: &Path, job_name: &str, report: &JobReport) -> Result<(), DeliverError> {
    let fail = |source: io::Error| DeliverError::Write {
        what: "metrics file",
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(fail)?;
    let _lock = DirLock::take(&dir).map_err(fail)?;
    let previous = match std::fs::File::open(path) {
        Ok(f) => {
            let mut b = Vec::new();
            f.take(MAX_PREVIOUS_METRICS)
                .read_to_end(&mut b)
                .map_err(fail)?;
            String::from_utf8_lossy(&b).into_owned()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(fail(e)),
    };
    let text = metrics_text(job_name, report, &previous);
    // node_exporter runs as its own user: the file is readable by all (it holds no secret).
    write_atomic(path, text.as_bytes(), 0o644).map_err(fail)
}

// ---------------------------------------------------------------------------------------------
// Notifications

/// The host of a URL, for messages (the rest of a webhook URL may be a token).
pub fn url_host(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "an unparsable URL".into())
}

/// The head line of notifications: job, host and outcome.
fn headline(report: &JobReport) -> String {
    let ok = report.disks.iter().filter(|d| d.ok).count();
    format!(
        "cbtfs job {} on {}: {} ({} of {} ok)",
        report.job,
        report.host,
        outcome_word(report.outcome),
        ok,
        crate::cli::text::count(report.disks.len(), "disk", "disks"),
    )
}

/// Slack's text: `&`, `<` and `>` are markup there and must be escaped.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The webhook's body for `format`.
pub fn webhook_body(format: WebhookFormat, report: &JobReport) -> Vec<u8> {
    let value = match format {
        WebhookFormat::Json => serde_json::to_value(report).unwrap_or(serde_json::Value::Null),
        WebhookFormat::Slack => serde_json::json!({
            "text": format!(
                "{}\n```\n{}```",
                slack_escape(&headline(report)),
                slack_escape(&summary(report))
            ),
        }),
        WebhookFormat::Teams => {
            let ok = report.disks.iter().filter(|d| d.ok).count();
            let color = match report.outcome {
                Outcome::Ok => "2EB67D",
                Outcome::Partial => "ECB22E",
                Outcome::Failed => "E01E5A",
            };
            // Teams renders the text as Markdown: a line break needs two spaces before it.
            let text = summary(report)
                .lines()
                .map(|l| l.trim_start().to_string())
                .collect::<Vec<_>>()
                .join("  \n");
            serde_json::json!({
                "@type": "MessageCard",
                "@context": "https://schema.org/extensions",
                "summary": headline(report),
                "themeColor": color,
                "title": headline(report),
                "sections": [{
                    "facts": [
                        {"name": "Job", "value": report.job},
                        {"name": "Host", "value": report.host},
                        {"name": "Repository", "value": report.repository},
                        {"name": "Outcome", "value": outcome_word(report.outcome)},
                        {"name": "Disks", "value": format!("{ok} ok, {} failed", report.disks.len().saturating_sub(ok))},
                        {"name": "Started", "value": report.started},
                        {"name": "Finished", "value": report.finished},
                    ],
                    "text": text,
                }],
            })
        }
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The system's CA certificates (for https webhooks): `$SSL_CERT_FILE`, else the first bundle
/// found in the usual places. An empty store when there is none (https then fails, named).
fn system_roots() -> rustls::RootCertStore {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let candidates = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/ca-bundle.pem",
                "/etc/ssl/cert.pem",
            ]
            .map(PathBuf::from),
        );
    for p in candidates {
        let Ok(pem) = std::fs::read(&p) else {
            continue;
        };
        for c in CertificateDer::pem_slice_iter(&pem).flatten() {
            let _ = roots.add(c);
        }
        if !roots.is_empty() {
            break;
        }
    }
    roots
}

fn webhook_client(timeout: Duration) -> Result<reqwest::Client, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(system_roots())
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot set up the HTTP client: {}", e.without_url()))
}

/// One POST; Err says why and whether another attempt may help.
async fn post_once(client: &reqwest::Client, url: &str, body: &[u8]) -> Result<(), (String, bool)> {
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            reqwest::header::USER_AGENT,
            concat!("cbtfs/", env!("CARGO_PKG_VERSION")),
        )
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| {
            let timeout = e.is_timeout();
            let why = crate::xapi::client::error_chain(e);
            (
                if timeout {
                    format!("no answer in time ({why})")
                } else {
                    why
                },
                true,
            )
        })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    // The answer's start, printable, for the admin (a chat service says what it disliked).
    let text = match tokio::time::timeout(Duration::from_secs(2), resp.bytes()).await {
        Ok(Ok(b)) => {
            let b = b.get(..b.len().min(200)).unwrap_or_default();
            String::from_utf8_lossy(b)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>()
        }
        _ => String::new(),
    };
    let again = status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
    let text = text.trim();
    Err((
        if text.is_empty() {
            format!("it answered {status}")
        } else {
            format!("it answered {status}: {text}")
        },
        again,
    ))
}

/// POST `body` to `url`: at most two attempts, each bounded by the options' timeout. Runs on
/// a thread of its own with its own runtime, so it may be called from anywhere (inside a tokio
/// runtime or not).
pub fn post_webhook(url: &str, body: Vec<u8>, opts: &Options) -> Result<(), DeliverError> {
    let host = url_host(url);
    let fail = |why: String| DeliverError::Webhook {
        host: host.clone(),
        why,
    };
    let url = url.to_string();
    let opts = opts.clone();
    let worker = std::thread::Builder::new()
        .name("cbtfs-webhook".into())
        .spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
            rt.block_on(async {
                let client = webhook_client(opts.webhook_timeout)?;
                let mut last = String::new();
                for attempt in 0..2 {
                    if attempt > 0 {
                        tokio::time::sleep(opts.webhook_retry_pause).await;
                    }
                    // The client's own timeout bounds the attempt; this one bounds it even
                    // if a body read were to stall.
                    let bound = opts.webhook_timeout.saturating_add(Duration::from_secs(1));
                    match tokio::time::timeout(bound, post_once(&client, &url, &body)).await {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err((why, again))) => {
                            last = why;
                            if !again {
                                break;
                            }
                        }
                        Err(_) => {
                            last = format!("no answer in {} s", bound.as_secs());
                        }
                    }
                    tracing::debug!("webhook attempt {} failed: {last}", attempt + 1);
                }
                Err(last)
            })
        })
        .map_err(|e| fail(format!("cannot start a thread: {e}")))?;
    worker
        .join()
        .map_err(|_| fail("its thread panicked".into()))?
        .map_err(fail)
}

/// The mail's text: headers and the summary. Recipients were checked by the config (no
/// whitespace, no commas, no control characters); they are checked again here.
pub fn mail_message(to: &[String], report: &JobReport) -> Result<String, String> {
    for a in to {
        if a.is_empty()
            || a.starts_with('-')
            || a.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == ',')
        {
            return Err(format!("{a:?} is not a mail address"));
        }
    }
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    let ok = report.disks.iter().filter(|d| d.ok).count();
    let subject = clean(&format!(
        "cbtfs job {}: {} ({} of {} ok)",
        report.job,
        outcome_word(report.outcome),
        ok,
        crate::cli::text::count(report.disks.len(), "disk", "disks"),
    ));
    Ok(format!(
        "To: {}\nSubject: {subject}\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\nAuto-Submitted: auto-generated\n\n{}",
        to.join(", "),
        summary(report)
    ))
}

/// Hand the mail to `sendmail -t -oi` (recipients from the To: header; a line holding a dot
/// does not end the message), waiting at most `timeout` for it to exit.
pub fn send_mail(
    sendmail: &Path,
    to: &[String],
    report: &JobReport,
    timeout: Duration,
) -> Result<(), DeliverError> {
    let fail = |why: String| DeliverError::Mail {
        to: to.join(", "),
        sendmail: sendmail.display().to_string(),
        why,
    };
    let message = mail_message(to, report).map_err(fail)?;
    let mut child = Command::new(sendmail)
        .args(["-t", "-oi"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    // Write and read on threads of their own: a sendmail that reads nothing or writes much
    // must not block this one past the timeout.
    let stdin = child.stdin.take();
    let writer = std::thread::spawn(move || -> io::Result<()> {
        if let Some(mut w) = stdin {
            w.write_all(message.as_bytes())?;
        }
        Ok(())
    });
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(r) = stderr {
            let mut r = r.take(4096);
            let _ = r.read_to_end(&mut b);
        }
        b
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = writer.join();
                return Err(fail(format!(
                    "it did not finish in {} s and was stopped",
                    timeout.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(fail(format!("cannot wait for it: {e}"))),
        }
    };
    let wrote = writer.join().unwrap_or(Ok(()));
    let err = reader.join().unwrap_or_default();
    let err = String::from_utf8_lossy(&err).trim().replace('\n', "; ");
    if !status.success() {
        return Err(fail(format!(
            "it exited with {status}{}",
            if err.is_empty() {
                String::new()
            } else {
                format!(": {err}")
            }
        )));
    }
    if let Err(e) = wrote {
        return Err(fail(format!("it did not take the whole message: {e}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::report::StepOutcome;
    use crate::job::report::sample::{END, disk, report};

    #[test]
    fn end_time_constant_is_right() {
        assert_eq!(crate::timefmt::parse("2026-11-30T02:10:00Z"), Ok(END));
    }

    #[test]
    fn summary_names_failures_first_with_their_reason() {
        let mut a = disk("web", "root", "v1", true);
        a.kind = Some("base".into());
        a.reason = Some("first backup".into());
        let b = disk("db", "data", "v2", false);
        let mut r = report(vec![a, b]);
        r.prune = Some(StepOutcome {
            ok: true,
            seconds: 1.5,
            summary: "3 points dropped".into(),
        });
        r.errors
            .push("vm old: its disks could not be listed".into());
        r.outcome = r.judge();
        let s = summary(&r);
        let expect = "\
job nightly (host xs1, repository /backup/repo): PARTIAL
  started 2026-11-30T02:00:00Z, finished 2026-11-30T02:10:00Z, 600.0 s
disks:
  FAILED  db/data: VM.snapshot: VM_NOT_FOUND; 0 B read, 2.5 s
  ok      web/root: base (first backup), 3.0 MiB read, 1.0 MiB stored, 2.5 s
errors:
  vm old: its disks could not be listed
prune: ok: 3 points dropped (1.5 s)
total: 1 of 2 disks ok, 1 failed (2 VMs selected); 3.0 MiB read, 1.0 MiB stored; repository 5.0 GiB
outcome: PARTIAL (exit status 3)
";
        assert_eq!(s, expect);
    }

    #[test]
    fn label_values_are_escaped_and_read_back() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let s = Sample {
            name: DISK_SUCCESS.into(),
            labels: vec![
                ("cbtfs_job".into(), "j".into()),
                ("vm".into(), "we\"ird\\vm\nx".into()),
            ],
            value: "12".into(),
        };
        let line = s.render();
        assert_eq!(
            line,
            "cbtfs_disk_last_success_timestamp_seconds{cbtfs_job=\"j\",vm=\"we\\\"ird\\\\vm\\nx\"} 12"
        );
        assert_eq!(parse_sample(&line), Some(s));
        for bad in [
            "",
            "# HELP x y",
            "x{a=\"b} 1",
            "x{a=b} 1",
            "{a=\"b\"} 1",
            "x{a=\"\\q\"} 1",
        ] {
            assert_eq!(parse_sample(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn metrics_text_is_exact() {
        let mut r = report(vec![disk("web \"1\"", "root", "v1", true)]);
        r.prune = Some(StepOutcome {
            ok: false,
            seconds: 0.5,
            summary: "locked".into(),
        });
        r.outcome = r.judge();
        let t = metrics_text("nightly", &r, "");
        let l = "cbtfs_job=\"nightly\",vm=\"web \\\"1\\\"\",disk=\"root\",vdi=\"v1\"";
        let expect = format!(
            "\
# HELP cbtfs_job_last_run_start_timestamp_seconds When the job's last run started (Unix time).
# TYPE cbtfs_job_last_run_start_timestamp_seconds gauge
cbtfs_job_last_run_start_timestamp_seconds{{cbtfs_job=\"nightly\"}} {start}
# HELP cbtfs_job_last_run_end_timestamp_seconds When the job's last run finished (Unix time).
# TYPE cbtfs_job_last_run_end_timestamp_seconds gauge
cbtfs_job_last_run_end_timestamp_seconds{{cbtfs_job=\"nightly\"}} {END}
# HELP cbtfs_job_last_run_seconds How long the job's last run took.
# TYPE cbtfs_job_last_run_seconds gauge
cbtfs_job_last_run_seconds{{cbtfs_job=\"nightly\"}} 600
# HELP cbtfs_job_last_run_outcome 1 for the outcome of the job's last run (ok, partial, failed), 0 for the others.
# TYPE cbtfs_job_last_run_outcome gauge
cbtfs_job_last_run_outcome{{cbtfs_job=\"nightly\",outcome=\"ok\"}} 0
cbtfs_job_last_run_outcome{{cbtfs_job=\"nightly\",outcome=\"partial\"}} 1
cbtfs_job_last_run_outcome{{cbtfs_job=\"nightly\",outcome=\"failed\"}} 0
# HELP cbtfs_job_last_success_timestamp_seconds When a run of the job last ended ok (Unix time; 0 if never).
# TYPE cbtfs_job_last_success_timestamp_seconds gauge
cbtfs_job_last_success_timestamp_seconds{{cbtfs_job=\"nightly\"}} 0
# HELP cbtfs_job_disks Disks of the job's last run by state (ok, failed).
# TYPE cbtfs_job_disks gauge
cbtfs_job_disks{{cbtfs_job=\"nightly\",state=\"ok\"}} 1
cbtfs_job_disks{{cbtfs_job=\"nightly\",state=\"failed\"}} 0
# HELP cbtfs_job_vms_selected VMs the job's selectors matched in its last run.
# TYPE cbtfs_job_vms_selected gauge
cbtfs_job_vms_selected{{cbtfs_job=\"nightly\"}} 2
# HELP cbtfs_job_errors Errors of the job's last run that are not one disk's (host, VM listing, lock).
# TYPE cbtfs_job_errors gauge
cbtfs_job_errors{{cbtfs_job=\"nightly\"}} 0
# HELP cbtfs_job_step_ok 1 if the step (prune, copy) of the job's last run succeeded, 0 if it failed.
# TYPE cbtfs_job_step_ok gauge
cbtfs_job_step_ok{{cbtfs_job=\"nightly\",step=\"prune\"}} 0
# HELP cbtfs_repository_stored_bytes Bytes stored in the job's repository after its last run.
# TYPE cbtfs_repository_stored_bytes gauge
cbtfs_repository_stored_bytes{{cbtfs_job=\"nightly\",repository=\"/backup/repo\"}} 5368709120
# HELP cbtfs_disk_last_success_timestamp_seconds When a point of the disk was last committed by the job (Unix time; 0 if never).
# TYPE cbtfs_disk_last_success_timestamp_seconds gauge
cbtfs_disk_last_success_timestamp_seconds{{{l}}} {END}
# HELP cbtfs_disk_last_run_ok 1 if the job's last run committed a point of the disk, 0 if it failed.
# TYPE cbtfs_disk_last_run_ok gauge
cbtfs_disk_last_run_ok{{{l}}} 1
# HELP cbtfs_disk_last_run_bytes_read Bytes of the disk read from the host in the job's last run.
# TYPE cbtfs_disk_last_run_bytes_read gauge
cbtfs_disk_last_run_bytes_read{{{l}}} 3145728
# HELP cbtfs_disk_last_run_bytes_stored New bytes of the disk stored in the repository in the job's last run.
# TYPE cbtfs_disk_last_run_bytes_stored gauge
cbtfs_disk_last_run_bytes_stored{{{l}}} 1048576
# HELP cbtfs_disk_last_run_seconds How long the disk's backup took in the job's last run.
# TYPE cbtfs_disk_last_run_seconds gauge
cbtfs_disk_last_run_seconds{{{l}}} 2.5
# HELP cbtfs_disk_points_kept Points of the disk kept after the prune of the job's last run.
# TYPE cbtfs_disk_points_kept gauge
cbtfs_disk_points_kept{{{l}}} 7
",
            start = END - 600
        );
        assert_eq!(t, expect);
    }

    fn value_of(text: &str, name: &str, want: &[(&str, &str)]) -> Option<String> {
        text.lines()
            .filter_map(parse_sample)
            .find(|s| s.name == name && want.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .map(|s| s.value)
    }

    #[test]
    fn last_success_is_kept_when_a_disk_fails_and_other_jobs_stay() {
        let first = report(vec![
            disk("web", "root", "v1", true),
            disk("db", "data", "v2", true),
        ]);
        let other = {
            let mut o = report(vec![disk("mail", "root", "v9", true)]);
            o.job = "weekly".into();
            o
        };
        let t = metrics_text("weekly", &other, "");
        let t = metrics_text("nightly", &first, &t);
        let end1 = END.to_string();
        assert_eq!(
            value_of(&t, DISK_SUCCESS, &[("vdi", "v2")]).as_deref(),
            Some(end1.as_str())
        );
        // A day later db fails: its success stays at the first run's end, web moves on.
        let mut second = report(vec![
            disk("web", "root", "v1", true),
            disk("db", "data", "v2", false),
        ]);
        second.finished = "2026-12-01T02:10:00Z".into();
        second.outcome = second.judge();
        let t2 = metrics_text("nightly", &second, &t);
        let end2 = (END + 86_400).to_string();
        assert_eq!(
            value_of(&t2, DISK_SUCCESS, &[("vdi", "v2")]).as_deref(),
            Some(end1.as_str())
        );
        assert_eq!(
            value_of(&t2, DISK_SUCCESS, &[("vdi", "v1")]).as_deref(),
            Some(end2.as_str())
        );
        assert_eq!(
            value_of(&t2, "cbtfs_disk_last_run_ok", &[("vdi", "v2")]).as_deref(),
            Some("0")
        );
        // The job's last success is the first run's (the second was partial).
        assert_eq!(
            value_of(&t2, JOB_SUCCESS, &[("cbtfs_job", "nightly")]).as_deref(),
            Some(end1.as_str())
        );
        // The other job's series are still there, once, each family in one block.
        assert_eq!(
            value_of(&t2, DISK_SUCCESS, &[("cbtfs_job", "weekly"), ("vdi", "v9")]).as_deref(),
            Some(end1.as_str())
        );
        for (name, _, _) in FAMILIES {
            let types = t2.matches(&format!("# TYPE {name} ")).count();
            assert!(types <= 1, "{name} has {types} TYPE lines");
            let lines: Vec<usize> = t2
                .lines()
                .enumerate()
                .filter(|(_, l)| parse_sample(l).is_some_and(|s| s.name == *name))
                .map(|(i, _)| i)
                .collect();
            assert!(
                lines.windows(2).all(|w| w[1] == w[0] + 1),
                "{name}'s samples are not contiguous"
            );
        }
        let t3 = metrics_text("nightly", &second, &t2);
        assert_eq!(t3, t2, "rewriting with the same run changes nothing");

        // A run that no longer reaches db because its VM could not be listed keeps db's
        // success; a clean run without db drops it.
        let mut third = report(vec![disk("web", "root", "v1", true)]);
        third.errors.push("vm db: cannot list its disks".into());
        third.outcome = third.judge();
        let t4 = metrics_text("nightly", &third, &t2);
        assert_eq!(
            value_of(&t4, DISK_SUCCESS, &[("vdi", "v2")]).as_deref(),
            Some(end1.as_str())
        );
        assert_eq!(
            value_of(&t4, "cbtfs_disk_last_run_ok", &[("vdi", "v2")]),
            None
        );
        let fourth = report(vec![disk("web", "root", "v1", true)]);
        let t5 = metrics_text("nightly", &fourth, &t4);
        assert_eq!(value_of(&t5, DISK_SUCCESS, &[("vdi", "v2")]), None);
        // A disk that never succeeded reads 0: the 26 h alert fires for it.
        let never = report(vec![disk("new", "root", "v3", false)]);
        let t6 = metrics_text("nightly", &never, "");
        assert_eq!(
            value_of(&t6, DISK_SUCCESS, &[("vdi", "v3")]).as_deref(),
            Some("0")
        );
    }

    #[test]
    fn a_disk_listed_twice_gives_one_series() {
        let r = report(vec![
            disk("web", "root", "v1", true),
            disk("web", "root", "v1", false),
        ]);
        let t = metrics_text("nightly", &r, "");
        assert_eq!(t.matches("cbtfs_disk_last_run_ok{").count(), 1, "{t}");
    }

    #[test]
    fn garbage_in_the_previous_file_is_dropped() {
        let r = report(vec![disk("web", "root", "v1", true)]);
        let prev = "not a metric line\n\u{0}\u{1}{{{\nfoo_bar{cbtfs_job=\"x\"} 1\ncbtfs_job_errors{cbtfs_job=\"x\"} 3\ncbtfs_job_errors{cbtfs_job=\"x\"\n";
        let t = metrics_text("nightly", &r, prev);
        assert!(!t.contains("foo_bar"));
        assert!(!t.contains("not a metric"));
        assert_eq!(
            value_of(&t, "cbtfs_job_errors", &[("cbtfs_job", "x")]).as_deref(),
            Some("3")
        );
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/report.json");
        write_atomic(&p, b"one", 0o640).unwrap();
        write_atomic(&p, b"two", 0o640).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let names: Vec<_> = std::fs::read_dir(d.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["report.json"]);
        // A failure (the target is a directory) leaves no temporary file either.
        let q = d.path().join("dir");
        std::fs::create_dir_all(q.join("x")).unwrap();
        assert!(write_atomic(&q, b"x", 0o640).is_err());
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn webhook_payloads_have_their_shapes() {
        let mut r = report(vec![
            disk("web", "root", "v1", true),
            disk("<db>", "data", "v2", false),
        ]);
        r.outcome = r.judge();
        let json: serde_json::Value =
            serde_json::from_slice(&webhook_body(WebhookFormat::Json, &r)).unwrap();
        let back: JobReport = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
        let slack: serde_json::Value =
            serde_json::from_slice(&webhook_body(WebhookFormat::Slack, &r)).unwrap();
        let obj = slack.as_object().unwrap();
        assert_eq!(obj.len(), 1);
        let text = obj["text"].as_str().unwrap();
        assert!(
            text.starts_with(
                "cbtfs job nightly on xs1: PARTIAL (1 of 2 disks ok)\n```\njob nightly"
            ),
            "{text}"
        );
        assert!(text.contains("FAILED  &lt;db&gt;/data: VM.snapshot: VM_NOT_FOUND"));
        let teams: serde_json::Value =
            serde_json::from_slice(&webhook_body(WebhookFormat::Teams, &r)).unwrap();
        assert_eq!(teams["@type"], "MessageCard");
        assert_eq!(teams["@context"], "https://schema.org/extensions");
        assert_eq!(
            teams["title"],
            "cbtfs job nightly on xs1: PARTIAL (1 of 2 disks ok)"
        );
        assert_eq!(teams["summary"], teams["title"]);
        assert_eq!(teams["themeColor"], "ECB22E");
        let facts = teams["sections"][0]["facts"].as_array().unwrap();
        assert_eq!(facts[4]["name"], "Disks");
        assert_eq!(facts[4]["value"], "1 ok, 1 failed");
        let text = teams["sections"][0]["text"].as_str().unwrap();
        assert!(
            text.contains("FAILED  <db>/data: VM.snapshot: VM_NOT_FOUND; 0 B read, 2.5 s  \n"),
            "{text}"
        );
    }

    #[test]
    fn url_hosts_hide_the_rest() {
        assert_eq!(
            url_host("https://hooks.slack.com/services/T000/B000/SECRET"),
            "hooks.slack.com"
        );
        assert_eq!(url_host("not a url"), "an unparsable URL");
    }

    #[test]
    fn mail_headers_are_exact_and_addresses_rechecked() {
        let r = report(vec![disk("web", "root", "v1", true)]);
        let m = mail_message(&["a@x.example".into(), "b@y.example".into()], &r).unwrap();
        let head = "To: a@x.example, b@y.example\nSubject: cbtfs job nightly: ok (1 of 1 disk ok)\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\nAuto-Submitted: auto-generated\n\n";
        assert_eq!(m, format!("{head}{}", summary(&r)));
        for bad in ["a@x\nBcc: e@vil", "-oQ/tmp", "a@x, b@y", ""] {
            assert!(mail_message(&[bad.into()], &r).is_err(), "{bad:?}");
        }
    }
}
