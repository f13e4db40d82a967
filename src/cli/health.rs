//! `cbtfs job check NAME` and `cbtfs fsck REPO [POINT...]`: the health check without restore
//! (`crate::health`), printed per point and per volume, with the exit status of a job run
//! (`report::Outcome`: 0 every filesystem clean or clean after its journal, 3 something damaged
//! or left unchecked, 4 nothing could be checked).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::secret::{self, SecretSources};
use crate::health::{self, CheckOptions, State};
use crate::job::config::{Config, JobConf, Selector, VmFacts};
use crate::job::report::{HealthOutcome, Outcome};
use crate::naming::Tree;
use crate::repo::{DiskHistory, Repository, SetHistory};

/// One point checked (or not: `error` says why).
#[derive(Debug, Serialize)]
pub struct PointHealth {
    pub vm: Option<String>,
    pub disk: String,
    pub vdi: String,
    /// The point as `ls` and the mount show it.
    pub point: String,
    pub health: Option<HealthOutcome>,
    pub error: Option<String>,
}

/// What `job check` and `fsck` print as JSON.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub job: Option<String>,
    pub repository: String,
    pub outcome: Outcome,
    /// How the points were chosen, when that needs saying.
    pub notes: Vec<String>,
    pub seconds: f64,
    pub points: Vec<PointHealth>,
}

/// A point to check: where it is and how to name it.
struct Target {
    vm: Option<String>,
    disk: String,
    vdi: String,
    label: String,
    set: SetHistory,
    seq: u32,
}

/// The newest point of `d`, if it has one.
fn newest_target(tree: &Tree, d: &DiskHistory) -> Option<Target> {
    let set = d.sets.iter().rev().find(|s| !s.points.is_empty())?;
    let m = set.points.last()?;
    let seq = u32::try_from(set.points.len().checked_sub(1)?).ok()?;
    Some(Target {
        vm: m.vm_name.clone(),
        disk: m.disk_name.clone(),
        vdi: d.vdi.clone(),
        label: tree.path_of(m).unwrap_or_else(|| m.label()),
        set: set.clone(),
        seq,
    })
}

/// Whether a selector matches a disk's VM offline: `None` when only the host can tell (tags
/// and pools are not recorded in the repository).
fn offline_match(s: &Selector, vm: &VmFacts<'_>) -> Option<bool> {
    match s {
        Selector::Name(_) | Selector::Uuid(_) => Some(s.matches(vm)),
        Selector::Tag(_) | Selector::Pool(_) => None,
    }
}

/// The disks of `disks` the job's selectors take, decided without the host, and notes on what
/// could not be decided.
fn select_offline<'a>(
    job: &JobConf,
    disks: &'a [DiskHistory],
) -> (Vec<&'a DiskHistory>, Vec<String>) {
    let mut notes = Vec::new();
    let host_only: Vec<String> = job
        .vms
        .iter()
        .filter(|s| matches!(s, Selector::Tag(_) | Selector::Pool(_)))
        .map(|s| s.to_string())
        .collect();
    if !host_only.is_empty() {
        notes.push(format!(
            "the job selects by {}, which only the host knows: every disk in the repository is checked, less the excludes by name and uuid",
            host_only.join(", ")
        ));
    }
    let host_only_ex: Vec<String> = job
        .exclude
        .iter()
        .filter(|s| matches!(s, Selector::Tag(_) | Selector::Pool(_)))
        .map(|s| s.to_string())
        .collect();
    if !host_only_ex.is_empty() {
        notes.push(format!(
            "the excludes {} need the host and are not applied",
            host_only_ex.join(", ")
        ));
    }
    let mut out = Vec::new();
    for d in disks {
        let Some(m) = d.newest() else { continue };
        let facts = VmFacts {
            name: m.vm_name.as_deref().unwrap_or(""),
            uuid: m.vm_uuid.as_deref().unwrap_or(""),
            tags: &[],
            pool: "",
        };
        let taken = job
            .vms
            .iter()
            .any(|s| offline_match(s, &facts).unwrap_or(true));
        let excluded = job
            .exclude
            .iter()
            .any(|s| offline_match(s, &facts).unwrap_or(false));
        if taken && !excluded {
            out.push(d);
        }
    }
    (out, notes)
}

/// Open repository `name` of the configuration, with the secret its section names (or the
/// environment's).
fn open_configured(c: &Config, name: &str) -> Result<Repository> {
    let Some(r) = c.repositories.get(name) else {
        bail!("{}: no [repository.{name}] is defined", c.path.display());
    };
    let path = PathBuf::from(&r.path);
    let ctx = || format!("repository {name} ({})", r.path);
    // An s3:// repository at the configuration's s3_endpoint and ca_cert.
    let store = crate::job::run::s3_store(r).with_context(ctx)?;
    let header = match &store {
        Some(s) => Repository::probe_in(s.as_ref(), &path),
        None => Repository::probe(&path),
    }
    .with_context(ctx)?;
    let secret = if header.encryption == crate::repo::ENCRYPTION_NONE {
        None
    } else {
        let sources = SecretSources {
            password_file: r.password_file.clone(),
            key_file: r.key_file.clone(),
        };
        match secret::resolve(&sources, &format!("to open repository {name} ({})", r.path))? {
            Some(s) => Some(s),
            None => bail!(
                "repository {name} ({}) is encrypted: name its password_file or key_file in [repository.{name}] of {}, or set CBTFS_KEY_FILE",
                r.path,
                c.path.display()
            ),
        }
    };
    match store {
        Some(s) => Repository::open_store(
            crate::repo::store::cache::wrap(s, &header.id),
            &path,
            secret.as_ref(),
        ),
        None => Repository::open(&path, secret.as_ref()),
    }
    .with_context(ctx)
}

fn options(timeout: u64) -> CheckOptions {
    CheckOptions {
        timeout: Duration::from_secs(timeout.max(1)),
        ..CheckOptions::default()
    }
}

/// Check the targets, `parallel` at a time, in their order.
fn check_all(
    repo: &Repository,
    targets: Vec<Target>,
    parallel: usize,
    opts: &CheckOptions,
) -> Vec<PointHealth> {
    let parallel = parallel.clamp(1, 16);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<PointHealth>>> = targets
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..parallel.min(targets.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(t) = targets.get(i) else { break };
                    let r = health::check_point(repo, &t.set, t.seq, opts);
                    let (health, error) = match r {
                        Ok(h) => (Some(h), None),
                        Err(e) => (None, Some(e.to_string())),
                    };
                    if let Some(slot) = results.get(i) {
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(PointHealth {
                            vm: t.vm.clone(),
                            disk: t.disk.clone(),
                            vdi: t.vdi.clone(),
                            point: t.label.clone(),
                            health,
                            error,
                        });
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .filter_map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}

/// The outcome of a check: Failed when nothing could be checked, Partial when a point failed,
/// a volume is damaged or was left unchecked, Ok when everything is clean (or clean after its
/// journal).
pub fn judge(points: &[PointHealth]) -> Outcome {
    let checked = points
        .iter()
        .filter_map(|p| p.health.as_ref())
        .any(health::checked_any);
    if !checked {
        return Outcome::Failed;
    }
    let all_good = points.iter().all(|p| {
        p.health.as_ref().is_some_and(|h| {
            h.volumes
                .iter()
                .all(|v| matches!(State::parse(&v.state), Some(State::Clean | State::Journal)))
                && !h.volumes.is_empty()
        })
    });
    if all_good {
        Outcome::Ok
    } else {
        Outcome::Partial
    }
}

/// The human report: per point, per volume, then a count by state.
fn human(r: &CheckReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let what = match &r.job {
        Some(j) => format!("job {j}: "),
        None => String::new(),
    };
    let _ = writeln!(
        o,
        "{what}repository {}: {} checked",
        r.repository,
        super::count(r.points.len(), "point", "points")
    );
    for n in &r.notes {
        let _ = writeln!(o, "note: {n}");
    }
    for p in &r.points {
        match (&p.health, &p.error) {
            (Some(h), _) => {
                let _ = writeln!(o, "{}: {} ({:.1} s)", p.point, h.state, h.seconds);
                if h.volumes.is_empty() {
                    let _ = writeln!(
                        o,
                        "  no filesystem in it (swap or LVM physical volumes only)"
                    );
                }
                for v in &h.volumes {
                    let _ = writeln!(
                        o,
                        "  {:<12} {:<6} {:<9} {}",
                        v.volume,
                        v.filesystem,
                        v.state,
                        if v.checker.is_empty() {
                            "-"
                        } else {
                            &v.checker
                        }
                    );
                    if v.state != State::Clean.as_str() {
                        for l in v.detail.lines() {
                            let _ = writeln!(o, "      {l}");
                        }
                    }
                }
            }
            (None, Some(e)) => {
                let _ = writeln!(o, "{}: not checked: {e}", p.point);
            }
            (None, None) => {
                let _ = writeln!(o, "{}: not checked", p.point);
            }
        }
    }
    let mut by_state = std::collections::BTreeMap::new();
    for p in &r.points {
        let s = p
            .health
            .as_ref()
            .map(|h| h.state.as_str())
            .unwrap_or("failed");
        *by_state.entry(s).or_insert(0usize) += 1;
    }
    let parts: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let _ = writeln!(
        o,
        "{} in {:.1} s: {}",
        super::count(r.points.len(), "point", "points"),
        r.seconds,
        if parts.is_empty() {
            "nothing to check".to_string()
        } else {
            parts.join(", ")
        }
    );
    o
}

fn finish(r: CheckReport, json: bool) -> Result<ExitCode> {
    if json {
        super::emit(&format!("{}\n", serde_json::to_string_pretty(&r)?))?;
    } else {
        super::emit(&human(&r))?;
    }
    Ok(ExitCode::from(
        u8::try_from(r.outcome.exit_code()).unwrap_or(1),
    ))
}

/// `cbtfs job check NAME`: the newest point of every disk the job selects.
pub fn job_check(config: &Path, name: &str, json: bool, timeout: u64) -> Result<ExitCode> {
    let started = Instant::now();
    let c = Config::load(config)?;
    let Some(job) = c.job(name) else {
        let names: Vec<&str> = c.jobs.keys().map(String::as_str).collect();
        bail!(
            "{}: no job {name:?} (jobs: {})",
            c.path.display(),
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    };
    let repo = open_configured(&c, &job.repository)?;
    let catalog = repo.catalog()?;
    let tree = Tree::build(catalog.clone());
    let (disks, notes) = select_offline(job, &catalog);
    let targets: Vec<Target> = disks
        .into_iter()
        .filter_map(|d| newest_target(&tree, d))
        .collect();
    let points = check_all(&repo, targets, job.concurrency, &options(timeout));
    let r = CheckReport {
        job: Some(name.to_string()),
        repository: c
            .repositories
            .get(&job.repository)
            .map(|r| r.path.clone())
            .unwrap_or_default(),
        outcome: judge(&points),
        notes,
        seconds: started.elapsed().as_secs_f64(),
        points,
    };
    finish(r, json)
}

/// `cbtfs fsck REPO [POINT...]`: the given points, or the newest of every disk.
pub fn fsck(
    repo_path: &Path,
    repo: &Repository,
    specs: &[String],
    json: bool,
    timeout: u64,
    parallel: usize,
) -> Result<ExitCode> {
    let started = Instant::now();
    let catalog = repo.catalog()?;
    let tree = Tree::build(catalog.clone());
    let mut targets = Vec::new();
    if specs.is_empty() {
        targets.extend(catalog.iter().filter_map(|d| newest_target(&tree, d)));
    }
    for spec in specs {
        let (set, seq) = tree
            .resolve(spec)
            .map_err(|e| anyhow::anyhow!("point {spec:?}: {e}"))?;
        let Some(m) = usize::try_from(seq).ok().and_then(|i| set.points.get(i)) else {
            bail!("point {spec:?}: not in its set");
        };
        targets.push(Target {
            vm: m.vm_name.clone(),
            disk: m.disk_name.clone(),
            vdi: m.vdi.clone(),
            label: tree.path_of(m).unwrap_or_else(|| m.label()),
            set: set.clone(),
            seq,
        });
    }
    let points = check_all(repo, targets, parallel, &options(timeout));
    let r = CheckReport {
        job: None,
        repository: repo_path.display().to_string(),
        outcome: judge(&points),
        notes: Vec::new(),
        seconds: started.elapsed().as_secs_f64(),
        points,
    };
    finish(r, json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::report::VolumeHealth;

    fn point(states: &[&str]) -> PointHealth {
        PointHealth {
            vm: None,
            disk: "d".into(),
            vdi: "v".into(),
            point: "p".into(),
            health: Some(HealthOutcome {
                state: String::new(),
                seconds: 0.0,
                volumes: states
                    .iter()
                    .map(|s| VolumeHealth {
                        volume: "p1".into(),
                        filesystem: "ext4".into(),
                        state: s.to_string(),
                        checker: String::new(),
                        detail: String::new(),
                    })
                    .collect(),
            }),
            error: None,
        }
    }

    #[test]
    fn exit_status_follows_the_volumes() {
        assert_eq!(judge(&[]), Outcome::Failed);
        assert_eq!(judge(&[point(&["clean", "journal"])]), Outcome::Ok);
        assert_eq!(
            judge(&[point(&["clean"]), point(&["damaged"])]),
            Outcome::Partial
        );
        assert_eq!(judge(&[point(&["clean", "unchecked"])]), Outcome::Partial);
        assert_eq!(judge(&[point(&["unchecked"])]), Outcome::Failed);
        let mut failed = point(&[]);
        failed.health = None;
        failed.error = Some("gone".into());
        assert_eq!(judge(&[point(&["clean"]), failed]), Outcome::Partial);
    }
}
