//! `cbtfs config check` and `cbtfs job list|run|status|check|units`: the configuration file of
//! backup jobs, running them, the last run of each, their health checks (src/cli/health.rs)
//! and the systemd units that run them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Subcommand;

use super::JSON_HELP;
use crate::job::config::{self, Config};
use crate::job::deliver;
use crate::job::report::{JobReport, Outcome};
use crate::job::units;

const CONFIG_HELP: &str =
    "The configuration file (default /etc/cbtfs/cbtfs.toml, or $CBTFS_CONFIG)";

#[derive(Subcommand, Debug)]
pub enum ConfigAction {
    /// Check the configuration file: every problem is named with its line, and the files it
    /// names (password and key files, certificates) are checked to exist, be readable and
    /// private. Exit status 0 if it can run as written.
    #[command(after_help = "\
Examples:
  cbtfs config check
  cbtfs config check --config /etc/cbtfs/cbtfs.toml")]
    Check {
        #[arg(long, value_name = "FILE", env = "CBTFS_CONFIG", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Only the file itself; do not look at the files it names.
        #[arg(long)]
        offline: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobAction {
    /// List the jobs of the configuration: host, repository, VMs, schedule and retention.
    #[command(after_help = "\
Examples:
  cbtfs job list
  cbtfs job list --json")]
    List {
        #[arg(long, value_name = "FILE", env = "CBTFS_CONFIG", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// The last run of each job (or of NAME), from its report file: when, the outcome, disks ok
    /// and failed; and the schedule. A job never run says so.
    #[command(after_help = "\
Examples:
  cbtfs job status
  cbtfs job status nightly --json")]
    Status {
        /// Only this job.
        name: Option<String>,
        #[arg(long, value_name = "FILE", env = "CBTFS_CONFIG", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Write a systemd service and timer per job with a schedule (cbtfs-job-NAME.service,
    /// cbtfs-job-NAME.timer); prints the files written. Then `systemctl daemon-reload` and
    /// `systemctl enable --now cbtfs-job-NAME.timer` (scripts/install.sh does both).
    #[command(after_help = "\
Examples:
  cbtfs job units
  cbtfs job units --config /etc/cbtfs/cbtfs.toml --dir /etc/systemd/system --bin /usr/local/bin/cbtfs")]
    Units {
        #[arg(long, value_name = "FILE", env = "CBTFS_CONFIG", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Where the units go.
        #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
        dir: PathBuf,
        /// The cbtfs the services run (default: this one).
        #[arg(long, value_name = "PATH")]
        bin: Option<PathBuf>,
    },
    /// Check the guest filesystems of the newest point of every disk the job selects, each
    /// with its own read-only checker (e2fsck, xfs_repair, ntfsfix, fsck.vfat, btrfs check) on
    /// a copy-on-write overlay: no restore, no host, the points are never modified. Exit status
    /// 0 all clean (or clean after a journal replay), 3 something damaged or unchecked, 4
    /// nothing could be checked.
    #[command(after_help = "\
Examples:
  cbtfs job check nightly
  cbtfs job check nightly --json --timeout 600")]
    Check {
        /// The job's name (`cbtfs job list`).
        name: String,
        #[arg(long, value_name = "FILE", env = "CBTFS_CONFIG", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Seconds one checker may run before it is stopped (the volume is then unchecked).
        #[arg(long, value_name = "SECS", default_value_t = 3600)]
        timeout: u64,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Run a job now: back up the disks of the VMs it selects (several at once, within the
    /// host's 16 NBD connections), prune by its retention, copy to its second repository.
    /// Progress goes to stderr, a summary to stdout, the report to the job's report file.
    /// Exit status 0: every disk committed; 3: some failed; 4: nothing was committed.
    #[command(after_help = "\
Examples:
  cbtfs job run nightly
  cbtfs job run nightly --config /etc/cbtfs/cbtfs.toml --json")]
    Run {
        /// The job's name, as `cbtfs job list` shows it.
        name: String,
        #[arg(long, value_name = "FILE", env = "CBTFS_CONFIG", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Print the run's report as JSON instead of the summary.
        #[arg(long)]
        json: bool,
    },
}

fn config_path(p: Option<PathBuf>) -> PathBuf {
    p.unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

pub fn run_config(action: ConfigAction) -> Result<()> {
    match action {
        ConfigAction::Check { config, offline } => {
            let path = config_path(config);
            let c = Config::load(&path)?;
            let mut problems = Vec::new();
            if !offline {
                check_files(&c, &mut problems);
            }
            if !problems.is_empty() {
                bail!(
                    "{}: the file reads, but {} of the files it names:\n  {}",
                    path.display(),
                    if problems.len() == 1 {
                        "there is a problem with one".to_string()
                    } else {
                        format!("there are problems with {}", problems.len())
                    },
                    problems.join("\n  ")
                );
            }
            println!(
                "{}: ok ({}, {}, {})",
                path.display(),
                super::count(c.hosts.len(), "host", "hosts"),
                super::count(c.repositories.len(), "repository", "repositories"),
                super::count(c.jobs.len(), "job", "jobs"),
            );
            Ok(())
        }
    }
}

pub fn run_job(action: JobAction) -> Result<ExitCode> {
    match action {
        JobAction::Run { name, config, json } => job_run(&config_path(config), &name, json),
        JobAction::Check {
            name,
            config,
            timeout,
            json,
        } => super::health::job_check(&config_path(config), &name, json, timeout),
        JobAction::List { config, json } => {
            let c = Config::load(&config_path(config))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c.jobs)?);
                return Ok(ExitCode::SUCCESS);
            }
            if c.jobs.is_empty() {
                println!("{}: no jobs", c.path.display());
            }
            for (name, j) in &c.jobs {
                let vms: Vec<String> = j.vms.iter().map(|s| s.to_string()).collect();
                let ex: Vec<String> = j.exclude.iter().map(|s| s.to_string()).collect();
                println!("{name}");
                println!("  host {} -> repository {}", j.host, j.repository);
                println!(
                    "  vms {}{}",
                    vms.join(", "),
                    if ex.is_empty() {
                        String::new()
                    } else {
                        format!(" except {}", ex.join(", "))
                    }
                );
                println!(
                    "  {} disks at once, {} NBD connections each",
                    j.concurrency, j.connections
                );
                println!(
                    "  schedule {}",
                    j.schedule.as_deref().unwrap_or("none (run by hand)")
                );
                println!("  keep {}", describe_keep(&j.keep));
                if let Some(t) = &j.copy_to {
                    println!("  then copy to repository {t}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobAction::Status { name, config, json } => {
            status(name, config, json).map(|()| ExitCode::SUCCESS)
        }
        JobAction::Units { config, dir, bin } => {
            units(config, &dir, bin).map(|()| ExitCode::SUCCESS)
        }
    }
}

/// One job's line of `job status`.
#[derive(serde::Serialize)]
struct JobStatus {
    job: String,
    report: Option<PathBuf>,
    schedule: Option<String>,
    /// When the timer starts it next (RFC 3339 UTC), where systemd can tell.
    next: Option<String>,
    /// None when the job never ran (or its report cannot be read: see `error`).
    last_run: Option<LastRun>,
    error: Option<String>,
}

#[derive(serde::Serialize)]
struct LastRun {
    started: String,
    finished: String,
    seconds: f64,
    outcome: Outcome,
    exit_status: i32,
    disks_ok: usize,
    disks_failed: usize,
    errors: Vec<String>,
    /// `VM/DISK: why` of each failed disk.
    failed: Vec<String>,
}

fn status(name: Option<String>, config: Option<PathBuf>, json: bool) -> Result<()> {
    let c = Config::load(&config_path(config))?;
    let names: Vec<&String> = match &name {
        Some(n) => match c.jobs.get_key_value(n) {
            Some((k, _)) => vec![k],
            None => bail!(
                "{}: there is no job {n:?}; `cbtfs job list` shows the jobs",
                c.path.display()
            ),
        },
        None => c.jobs.keys().collect(),
    };
    let mut out = Vec::new();
    for n in names {
        let j = &c.jobs[n];
        let path = deliver::report_path(n, j);
        let (last_run, error) = match &path {
            None => (
                None,
                Some(deliver::DeliverError::NoReportPath { job: n.clone() }.to_string()),
            ),
            Some(p) => match deliver::read_report(p) {
                Ok(r) => (r.map(|r| last_run(&r)), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        out.push(JobStatus {
            job: n.clone(),
            report: path,
            schedule: j.schedule.clone(),
            next: j
                .schedule
                .as_deref()
                .and_then(crate::job::schedule::next_elapse),
            last_run,
            error,
        });
    }
    let unreadable = out.iter().filter(|s| s.error.is_some()).count();
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if out.is_empty() {
            println!("{}: no jobs", c.path.display());
        }
        let now = crate::timefmt::now();
        for s in &out {
            print!("{}", status_text(s, now));
        }
    }
    if unreadable > 0 {
        bail!(
            "{} could not be read",
            super::count(unreadable, "report", "reports")
        );
    }
    Ok(())
}

fn last_run(r: &JobReport) -> LastRun {
    let ok = r.disks.iter().filter(|d| d.ok).count();
    LastRun {
        started: r.started.clone(),
        finished: r.finished.clone(),
        seconds: r.seconds,
        outcome: r.outcome,
        exit_status: r.outcome.exit_code(),
        disks_ok: ok,
        disks_failed: r.disks.len().saturating_sub(ok),
        errors: r.errors.clone(),
        failed: r
            .disks
            .iter()
            .filter(|d| !d.ok)
            .map(|d| {
                format!(
                    "{}/{}: {}",
                    d.vm,
                    d.disk,
                    d.error.as_deref().unwrap_or("no reason given")
                )
            })
            .collect(),
    }
}

/// `3 h ago`, `2 d ago`; empty when the time is unreadable or ahead.
fn ago(when: &str, now: i64) -> String {
    let Ok(t) = crate::timefmt::parse(when) else {
        return String::new();
    };
    let Some(d) = now.checked_sub(t).filter(|d| *d >= 0) else {
        return String::new();
    };
    let (n, unit) = match d {
        0..120 => (d, "s"),
        120..7200 => (d / 60, "min"),
        7200..172_800 => (d / 3600, "h"),
        _ => (d / 86_400, "d"),
    };
    format!(" ({n} {unit} ago)")
}

fn status_text(s: &JobStatus, now: i64) -> String {
    let mut t = String::new();
    let report = s
        .report
        .as_ref()
        .map_or_else(|| "no report path".into(), |p| p.display().to_string());
    match (&s.last_run, &s.error) {
        (_, Some(e)) => t.push_str(&format!("{}: {e}\n", s.job)),
        (None, None) => t.push_str(&format!("{}: never run (no report at {report})\n", s.job)),
        (Some(r), None) => {
            let word = match r.outcome {
                Outcome::Ok => "ok",
                Outcome::Partial => "PARTIAL",
                Outcome::Failed => "FAILED",
            };
            t.push_str(&format!(
                "{}: last run {}{}, {word} (exit status {}): {} of {} ok, {} failed{}\n",
                s.job,
                r.started,
                ago(&r.started, now),
                r.exit_status,
                r.disks_ok,
                super::count(r.disks_ok + r.disks_failed, "disk", "disks"),
                r.disks_failed,
                if r.errors.is_empty() {
                    String::new()
                } else {
                    format!(", {}", super::count(r.errors.len(), "error", "errors"))
                }
            ));
            for f in r.failed.iter().chain(r.errors.iter()) {
                t.push_str(&format!("  {f}\n"));
            }
            t.push_str(&format!("  report {report}\n"));
        }
    }
    let next = s
        .next
        .as_ref()
        .map_or_else(String::new, |n| format!(" (next {n})"));
    t.push_str(&format!(
        "  schedule {}{next}\n",
        s.schedule.as_deref().unwrap_or("none (run by hand)")
    ));
    t
}

fn units(config: Option<PathBuf>, dir: &Path, bin: Option<PathBuf>) -> Result<()> {
    let path = config_path(config);
    let c = Config::load(&path)?;
    // The units outlive this shell: absolute paths only.
    let config_abs = std::fs::canonicalize(&path).unwrap_or(std::path::absolute(&path)?);
    let bin = match bin {
        Some(b) => std::path::absolute(b)?,
        None => std::env::current_exe()?,
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot make the unit directory {}: {e}", dir.display()))?;
    let mut wanted = std::collections::BTreeSet::new();
    for (name, j) in &c.jobs {
        let Some(timer) = units::timer(name, j) else {
            eprintln!(
                "job {name} has no schedule: no timer written (run it with `cbtfs job run {name}`)"
            );
            continue;
        };
        let stem = units::unit_stem(name);
        for (file, text) in [
            (
                format!("{stem}.service"),
                units::service(name, &bin, &config_abs),
            ),
            (format!("{stem}.timer"), timer),
        ] {
            let p = dir.join(&file);
            deliver::write_atomic(&p, text.as_bytes(), 0o644)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
            println!("{}", p.display());
            wanted.insert(file);
        }
    }
    // Units of jobs that are gone or lost their schedule: named, not removed (they may be
    // running).
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut stale: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|f| {
                f.starts_with("cbtfs-job-")
                    && (f.ends_with(".timer") || f.ends_with(".service"))
                    && !wanted.contains(f)
            })
            .collect();
        stale.sort();
        for f in stale.iter().filter(|f| f.ends_with(".timer")) {
            eprintln!(
                "{} is not a scheduled job of {} any more: `systemctl disable --now {f}` and remove it and its service",
                dir.join(f).display(),
                c.path.display()
            );
        }
    }
    Ok(())
}

/// `cbtfs job run NAME`: run it, deliver its report, exit with its outcome.
fn job_run(path: &Path, name: &str, json: bool) -> Result<ExitCode> {
    use crate::job::run::JobEvent;
    let c = Config::load(path)?;
    let Some(job) = c.job(name) else {
        let names: Vec<&str> = c.jobs.keys().map(String::as_str).collect();
        bail!(
            "{}: no job named {name:?} (jobs: {}); nothing was run",
            path.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    };
    tracing::info!(job = name, config = %path.display(), "job run starts");
    let on = |e: JobEvent| match e {
        JobEvent::Info(m) => eprintln!("cbtfs: {m}"),
        JobEvent::Warning(m) => eprintln!("cbtfs: warning: {m}"),
        JobEvent::DiskStarted(vm, disk) => eprintln!("cbtfs: {vm}/{disk}: backing up"),
        JobEvent::DiskDone(d) => match &d.error {
            None => eprintln!(
                "cbtfs: {}/{}: {} in {:.1} s",
                d.vm,
                d.disk,
                d.kind.as_deref().unwrap_or("done"),
                d.seconds
            ),
            Some(e) => eprintln!("cbtfs: {}/{}: failed: {e}", d.vm, d.disk),
        },
    };
    let report = crate::job::run::run_job(&c, name, &on);
    for p in crate::job::deliver::deliver(name, job, &report) {
        eprintln!("cbtfs: warning: {p}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", crate::job::deliver::summary(&report));
    }
    tracing::info!(job = name, outcome = ?report.outcome, "job run ended");
    let code = u8::try_from(report.outcome.exit_code()).unwrap_or(1);
    Ok(ExitCode::from(code))
}

pub fn describe_keep(p: &crate::prune::Policy) -> String {
    if p.is_empty() {
        return "every point".into();
    }
    let mut parts = Vec::new();
    for (n, what) in [
        (p.last, "last"),
        (p.hourly, "hourly"),
        (p.daily, "daily"),
        (p.weekly, "weekly"),
        (p.monthly, "monthly"),
        (p.yearly, "yearly"),
    ] {
        if n > 0 {
            parts.push(format!("{what} {n}"));
        }
    }
    if let Some(w) = p.within {
        parts.push(format!("within {}", human_duration(w)));
    }
    parts.join(", ")
}

fn human_duration(s: u64) -> String {
    for (unit, len) in [
        ("y", 365 * 86_400),
        ("w", 7 * 86_400),
        ("d", 86_400),
        ("h", 3600),
        ("min", 60),
    ] {
        if s >= len && s.is_multiple_of(len) {
            return format!("{}{unit}", s / len);
        }
    }
    format!("{s}s")
}

/// The files a config names: present, readable, and secrets private.
fn check_files(c: &Config, problems: &mut Vec<String>) {
    let secret = |what: &str, p: &Path, problems: &mut Vec<String>| match std::fs::metadata(p) {
        Err(e) => problems.push(format!("{what} {}: {e}", p.display())),
        Ok(m) if !m.is_file() => problems.push(format!("{what} {}: not a file", p.display())),
        Ok(m) if m.mode() & 0o077 != 0 => problems.push(format!(
            "{what} {}: readable by others (mode {:o}); `chmod 600 {}`",
            p.display(),
            m.mode() & 0o777,
            p.display()
        )),
        Ok(_) => {
            if let Err(e) = std::fs::File::open(p) {
                problems.push(format!("{what} {}: {e}", p.display()));
            }
        }
    };
    let readable = |what: &str, p: &Path, problems: &mut Vec<String>| {
        if let Err(e) = std::fs::File::open(p) {
            problems.push(format!("{what} {}: {e}", p.display()));
        }
    };
    for (name, h) in &c.hosts {
        secret(
            &format!("[host.{name}] password_file"),
            &h.password_file,
            problems,
        );
        if let Some(ca) = &h.ca_cert {
            readable(&format!("[host.{name}] ca_cert"), ca, problems);
        }
    }
    for (name, r) in &c.repositories {
        if let Some(p) = &r.password_file {
            secret(&format!("[repository.{name}] password_file"), p, problems);
        }
        if let Some(p) = &r.key_file {
            secret(&format!("[repository.{name}] key_file"), p, problems);
        }
        if let Some(ca) = &r.ca_cert {
            readable(&format!("[repository.{name}] ca_cert"), ca, problems);
        }
    }
    for (name, j) in &c.jobs {
        for (what, p) in [("report", &j.report), ("metrics", &j.metrics)] {
            if let Some(p) = p {
                let dir = p.parent().unwrap_or(Path::new("/"));
                if let Err(why) = creatable_dir(dir) {
                    problems.push(format!("[job.{name}] {what} {}: {why}", p.display()));
                }
            }
        }
        if let Some(s) = &j.notify.sendmail
            && !s.is_file()
        {
            problems.push(format!(
                "[job.{name}] notify.sendmail {}: not found",
                s.display()
            ));
        }
    }
}

/// Whether a run can write into directory `dir`: it exists, or delivery can make it (the
/// nearest existing ancestor is a directory this process may write into). Err says why not.
fn creatable_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() && at == dir => return Ok(()),
            Ok(m) if m.is_dir() => {
                let Ok(c) = std::ffi::CString::new(at.as_os_str().as_bytes()) else {
                    return Err(format!("{} is not a usable path", at.display()));
                };
                // SAFETY: `c` is a NUL-terminated path that outlives the call.
                let rc = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) };
                return if rc == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "the directory {} does not exist and cannot be made: {} is not writable ({})",
                        dir.display(),
                        at.display(),
                        std::io::Error::last_os_error()
                    ))
                };
            }
            Ok(_) => {
                return Err(format!(
                    "the directory {} cannot exist: {} is not a directory",
                    dir.display(),
                    at.display()
                ));
            }
            // Missing, or below a file (ENOTDIR): the ancestors tell.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => at = p,
                    // A relative path whose every component is missing: the working
                    // directory (once: it may be gone too).
                    _ if at != Path::new(".") => at = Path::new("."),
                    _ => {
                        return Err(format!(
                            "the directory {} cannot be made: {e}",
                            dir.display()
                        ));
                    }
                }
            }
            Err(e) => {
                return Err(format!(
                    "the directory {} cannot be used: {}: {e}",
                    dir.display(),
                    at.display()
                ));
            }
        }
    }
}
