//! `cbtfs config check`, `cbtfs job list` and `cbtfs job run`: the configuration file of
//! backup jobs, and running them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Subcommand;

use super::JSON_HELP;
use crate::job::config::{self, Config};

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
    }
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
                if !dir.is_dir() {
                    problems.push(format!(
                        "[job.{name}] {what} {}: the directory {} does not exist",
                        p.display(),
                        dir.display()
                    ));
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
