//! `cbtfs job run NAME`: one run of a job of the configuration file.
//!
//! 1. Reach the job's host (its password from its `password_file`, never from the command
//!    line or a log) and open the job's repository (with its `password_file` or `key_file`).
//! 2. Choose the VMs: every VM of the pool (`VM.get_all_records`) that is not a template, a
//!    snapshot or a control domain, that one of the job's `vms` selectors matches and none
//!    of its `exclude` selectors does; then list each one's disks.
//! 3. Back the disks up, several at once: at most `concurrency` disks, each over `connections`
//!    NBD connections, and never more connections in total than the host allows (XenServer:
//!    16, shared by every disk of the run): the connections per disk are lowered to fit, and
//!    the report says so. All disks share one API session and the writers' shared lock (other
//!    jobs and backups of other disks run beside it); each disk takes its own lock.
//!    Each disk runs on a thread of its own (the repository writer hashes, compresses and
//!    seals on the calling thread's behalf), driven by one tokio runtime whose workers carry
//!    the network I/O. A disk or a VM that fails (deleted meanwhile, CBT reset, a host error)
//!    is recorded with the reason and the others go on.
//! 4. Prune each of the job's disks by the job's `keep` (when it has one), then copy the
//!    job's VMs' new points to the `copy_to` repository (when set), and measure the
//!    repository.
//!
//! Everything that happens lands in one [`JobReport`]; nothing here prints. A run that cannot
//! start (the host unreachable, the repository locked or unreadable) is a report too, with
//! the reason in `errors` and the outcome `failed`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::config::{Config, HostConf, JobConf, RepoConf, VmFacts};
use super::report::{DiskOutcome, JobReport, Outcome, REPORT_FORMAT, REPORT_VERSION, StepOutcome};
use crate::backup::{self, BackupOptions, DiskTarget, Event, HostAccess, Selection};
use crate::repo::keys::Secret;
use crate::repo::{Repository, SharedLock};
use crate::xapi::{Failure, Xapi};

/// The longest password line read from a password file.
const MAX_PASSWORD: usize = 4096;

/// What a run tells as it goes (the CLI prints it).
#[derive(Debug)]
pub enum JobEvent<'a> {
    Info(&'a str),
    Warning(&'a str),
    /// A disk's backup starts: (VM name, disk name).
    DiskStarted(&'a str, &'a str),
    /// A disk's backup ended, well or not.
    DiskDone(&'a DiskOutcome),
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("no job named {name:?} in {config} (`cbtfs job list` lists them)")]
    NoJob { name: String, config: String },
    #[error("{0}")]
    Config(String),
    #[error("cannot read the password file {path} of [{section}]: {why}")]
    Password {
        section: String,
        path: String,
        why: String,
    },
    #[error("repository {path}: {source}")]
    Repo {
        path: String,
        #[source]
        source: crate::repo::RepoError,
    },
    #[error("host {url}: {source}")]
    Host {
        url: String,
        #[source]
        source: Box<crate::host::HostError>,
    },
}

/// The first line of a password file (LF or CR LF ended), refused when empty or too long.
pub fn read_password_file(path: &Path, section: &str) -> Result<String, SetupError> {
    use std::io::Read;
    let err = |why: String| SetupError::Password {
        section: section.to_string(),
        path: path.display().to_string(),
        why,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    (&mut f)
        .take(MAX_PASSWORD as u64 + 2)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    let line_end = bytes.iter().position(|&b| b == b'\n');
    let mut line = bytes.get(..line_end.unwrap_or(bytes.len())).unwrap_or(&[]);
    if let Some(l) = line.strip_suffix(b"\r") {
        line = l;
    }
    let result = if line.len() > MAX_PASSWORD {
        Err(err(format!(
            "its first line is longer than {MAX_PASSWORD} bytes"
        )))
    } else if line.is_empty() {
        Err(err(
            "its first line is empty: write the password there".into()
        ))
    } else {
        std::str::from_utf8(line)
            .map(str::to_string)
            .map_err(|_| err("its first line is not UTF-8 text".into()))
    };
    zeroize::Zeroize::zeroize(&mut bytes);
    result
}

/// How to reach a configured host.
pub fn host_access(name: &str, h: &HostConf) -> Result<HostAccess, SetupError> {
    let password = read_password_file(&h.password_file, &format!("host.{name}"))?;
    let ca_pem = match &h.ca_cert {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
            SetupError::Config(format!(
                "cannot read the CA certificate {} of [host.{name}]: {e}",
                p.display()
            ))
        })?),
        None => None,
    };
    Ok(HostAccess {
        url: h.url.clone(),
        user: h.user.clone(),
        password,
        ca_pem,
        insecure_tls: h.insecure_tls,
        timeout: Duration::from_secs(h.timeout.max(1)),
    })
}

/// Open a configured repository with its own secret.
pub fn open_repository(name: &str, r: &RepoConf) -> Result<Repository, SetupError> {
    let repo_err = |source| SetupError::Repo {
        path: r.path.clone(),
        source,
    };
    let secret = match (&r.key_file, &r.password_file) {
        (Some(k), _) => Some(Secret::read_key_file(k).map_err(repo_err)?),
        (None, Some(p)) => Some(Secret::Password(read_password_file(
            p,
            &format!("repository.{name}"),
        )?)),
        (None, None) => None,
    };
    let path = Path::new(&r.path);
    match s3_store(r).map_err(repo_err)? {
        Some(store) => {
            // As `Repository::open` does for a URL: the header names the cache.
            let header = Repository::probe_in(store.as_ref(), path).map_err(repo_err)?;
            let store = crate::repo::store::cache::wrap(store, &header.id);
            Repository::open_store(store, path, secret.as_ref()).map_err(repo_err)
        }
        None => Repository::open(path, secret.as_ref()).map_err(repo_err),
    }
}

/// The store of a configured `s3://` repository (None for a local path), reached at the
/// repository's `s3_endpoint` and verified with its `ca_cert` when the configuration names
/// them; otherwise as the command line and the environment say (`--s3-endpoint`,
/// `CBTFS_S3_ENDPOINT`, `AWS_ENDPOINT_URL`, `--s3-ca-cert`). Checks that the bucket answers.
pub fn s3_store(
    r: &RepoConf,
) -> Result<Option<std::sync::Arc<dyn crate::repo::store::Store>>, crate::repo::RepoError> {
    use crate::repo::store::s3::{S3Config, S3Store, S3Url, is_s3_url};
    if !is_s3_url(Path::new(&r.path)) {
        return Ok(None);
    }
    let io_err = |source| crate::repo::RepoError::Io {
        op: "open repository",
        location: r.path.clone(),
        source,
        hint: "",
    };
    let mut cfg = S3Config::from_env().map_err(io_err)?;
    if let Some(e) = &r.s3_endpoint {
        cfg.endpoint = Some(e.trim().trim_end_matches('/').to_string());
    }
    if let Some(ca) = &r.ca_cert {
        cfg.ca_cert = Some(ca.clone());
    }
    let store = S3Store::new(S3Url::parse(&r.path).map_err(io_err)?, cfg).map_err(io_err)?;
    store.check().map_err(io_err)?;
    Ok(Some(std::sync::Arc::new(store)))
}

/// How many NBD connections each disk gets: the job's `connections`, lowered so that
/// `disks at once × per disk` stays within the host's limit. Returns (disks at once, per
/// disk, a warning when something was lowered).
pub fn connection_plan(
    concurrency: usize,
    per_disk: usize,
    host_limit: usize,
) -> (usize, usize, Option<String>) {
    let limit = host_limit.clamp(1, crate::nbd::fetch::MAX_CONNECTIONS);
    let at_once = concurrency.clamp(1, limit);
    let per = per_disk.clamp(1, (limit / at_once).max(1));
    let mut why = Vec::new();
    if at_once < concurrency {
        why.push(format!(
            "{at_once} disks at once instead of {concurrency} (the host serves {limit} NBD connections in all)"
        ));
    }
    if per < per_disk {
        why.push(format!(
            "{per} NBD connections per disk instead of {per_disk}: {at_once} disks at once × {per_disk} would pass the host's limit of {limit}"
        ));
    }
    let warning = (!why.is_empty()).then(|| why.join("; "));
    (at_once, per, warning)
}

/// A disk chosen for this run, with what names it before its backup says more.
struct Planned {
    target: DiskTarget,
    vm_name: String,
    vm_uuid: String,
    disk: String,
    vdi: String,
    virtual_size: u64,
}

fn rfc3339_now() -> String {
    crate::timefmt::rfc3339(crate::timefmt::now())
}

/// Run job `name` of `config`. Never fails: what went wrong is in the report.
pub fn run_job(config: &Config, name: &str, on: &(dyn Fn(JobEvent) + Sync)) -> JobReport {
    let started = Instant::now();
    let mut report = JobReport {
        format: REPORT_FORMAT.into(),
        version: REPORT_VERSION,
        job: name.to_string(),
        host: String::new(),
        repository: String::new(),
        started: rfc3339_now(),
        finished: String::new(),
        seconds: 0.0,
        outcome: Outcome::Failed,
        vms_selected: 0,
        disks: Vec::new(),
        errors: Vec::new(),
        prune: None,
        copy: None,
        repository_bytes: None,
        warnings: Vec::new(),
    };
    if let Err(e) = run_into(config, name, on, &mut report) {
        tracing::error!(job = name, error = %e, "the job run could not start");
        report.errors.push(e.to_string());
    }
    report.finished = rfc3339_now();
    report.seconds = started.elapsed().as_secs_f64();
    report.outcome = report.judge();
    report
}

fn run_into(
    config: &Config,
    name: &str,
    on: &(dyn Fn(JobEvent) + Sync),
    report: &mut JobReport,
) -> Result<(), SetupError> {
    let job = config.job(name).ok_or_else(|| SetupError::NoJob {
        name: name.to_string(),
        config: config.path.display().to_string(),
    })?;
    let host = config.hosts.get(&job.host).ok_or_else(|| {
        SetupError::Config(format!("[job.{name}]: host {:?} is not defined", job.host))
    })?;
    let repo_conf = config.repositories.get(&job.repository).ok_or_else(|| {
        SetupError::Config(format!(
            "[job.{name}]: repository {:?} is not defined",
            job.repository
        ))
    })?;
    report.host = host.url.clone();
    report.repository = repo_conf.path.clone();
    let access = host_access(&job.host, host)?;
    let repo = open_repository(&job.repository, repo_conf)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cbtfs-job")
        .enable_all()
        .build()
        .map_err(|e| SetupError::Config(format!("cannot start the I/O runtime: {e}")))?;
    let (at_once, per_disk, lowered) =
        connection_plan(job.concurrency, job.connections, host.nbd_connections);
    if let Some(w) = lowered {
        on(JobEvent::Warning(&w));
        report.warnings.push(w);
    }
    let opts = BackupOptions {
        host: access.clone(),
        // Unused by a disk's backup: the job chose its disks.
        selection: Selection::Vm(String::new()),
        keep_snapshot_data: false,
        allow_plain_nbd: false,
        fetch: crate::nbd::FetchOptions {
            connections: per_disk,
            timeout: Duration::from_secs(host.timeout.max(1)),
            ..Default::default()
        },
    };
    {
        // The writers' lock: other jobs and backups of other disks go on beside this one;
        // each disk takes its own lock in `backup_disk`.
        let lock = repo
            .lock_shared(&format!("cbtfs job run {name}"))
            .map_err(|e| SetupError::Repo {
                path: repo_conf.path.clone(),
                source: e,
            })?;
        let say = |e: Event| match e {
            Event::Info(m) => on(JobEvent::Info(m)),
            Event::Warning(m) => on(JobEvent::Warning(m)),
            Event::Blocks(..) => {}
        };
        let (mut xapi, _pinned) = rt
            .block_on(crate::host::connect(&repo, &access, &say))
            .map_err(|source| SetupError::Host {
                url: access.url.clone(),
                source: Box::new(source),
            })?;
        let planned = rt.block_on(plan(&xapi, job, name, on, report));
        if !planned.is_empty() {
            on(JobEvent::Info(&format!(
                "{} of {} selected: {} disks, {} at once, {} NBD connections each",
                report.vms_selected,
                if report.vms_selected == 1 {
                    "VM"
                } else {
                    "VMs"
                },
                planned.len(),
                at_once.min(planned.len()),
                per_disk
            )));
        }
        report.disks = back_up(&rt, &repo, &lock, &xapi, &opts, &planned, at_once, on);
        // Sessions are limited per user: always log out.
        rt.block_on(xapi.logout());
        // The lock goes before prune and copy, which take it themselves.
    }
    // What killed writers left (an earlier run's, another job's) is collected when no writer
    // is live; otherwise a later run does it.
    crate::backup::collect_dead_writers(&repo, &format!("cbtfs job run {name}"), &|e| {
        if let Event::Warning(m) = e {
            on(JobEvent::Warning(m))
        }
    });
    name_points(&repo, &mut report.disks);
    if !job.keep.is_empty() {
        report.prune = Some(prune(&repo, job, &mut report.disks));
    }
    if job.health == Some(super::config::Health::Fsck) {
        on(JobEvent::Info("health check of the new points"));
        health_check(&repo, &mut report.disks);
    }
    if let Some(to) = &job.copy_to {
        report.copy = Some(copy(config, to, &repo, &report.disks));
    }
    report.repository_bytes = crate::repo::stats::storage_bytes(&repo).ok();
    Ok(())
}

/// The VMs the job selects and their disks, in name order. Failures to list a VM's disks
/// go to the report's errors.
async fn plan(
    xapi: &Xapi,
    job: &JobConf,
    name: &str,
    on: &(dyn Fn(JobEvent) + Sync),
    report: &mut JobReport,
) -> Vec<Planned> {
    let vms = match xapi.all_vms().await {
        Ok(v) => v,
        Err(e) => {
            report
                .errors
                .push(format!("cannot list the VMs of {}: {e}", xapi.host()));
            return Vec::new();
        }
    };
    let pool = match xapi.pool_name().await {
        Ok(p) => p,
        Err(e) => {
            let w = format!("cannot read the pool's name ({e}); pool: selectors match nothing");
            on(JobEvent::Warning(&w));
            report.warnings.push(w);
            String::new()
        }
    };
    let chosen: Vec<_> = vms
        .into_iter()
        .filter(|(_, vm)| {
            let facts = VmFacts {
                name: &vm.name_label,
                uuid: &vm.uuid,
                tags: &vm.tags,
                pool: &pool,
            };
            vm.is_backup_candidate()
                && job.vms.iter().any(|s| s.matches(&facts))
                && !job.exclude.iter().any(|s| s.matches(&facts))
        })
        .collect();
    report.vms_selected = chosen.len() as u64;
    if chosen.is_empty() {
        let sel: Vec<String> = job.vms.iter().map(|s| s.to_string()).collect();
        let ex: Vec<String> = job.exclude.iter().map(|s| s.to_string()).collect();
        report.errors.push(format!(
            "job {name}: no VM of {} matches vms = [{}]{} (templates, snapshots and the control domain are never selected; `xe vm-list` shows the VMs)",
            xapi.host(),
            sel.join(", "),
            if ex.is_empty() {
                String::new()
            } else {
                format!(" except [{}]", ex.join(", "))
            }
        ));
        return Vec::new();
    }
    let mut out = Vec::new();
    for (_, vm) in chosen {
        let listed = async {
            let disks = backup::vm_disks(xapi, &vm).await?;
            let uuids: Vec<String> = disks.iter().map(|d| d.0.clone()).collect();
            let mut planned = Vec::new();
            for (uuid, vbd) in disks {
                let rec = xapi.vdi_record(&vbd.vdi).await?;
                planned.push(Planned {
                    target: DiskTarget {
                        vdi_ref: vbd.vdi,
                        vm: Some((vm.uuid.clone(), vm.name_label.clone())),
                        userdevice: Some(vbd.userdevice).filter(|u| !u.is_empty()),
                        vm_disks: uuids.clone(),
                    },
                    vm_name: vm.name_label.clone(),
                    vm_uuid: vm.uuid.clone(),
                    disk: rec.name_label,
                    vdi: uuid,
                    virtual_size: rec.virtual_size,
                });
            }
            Ok::<_, crate::xapi::XapiError>(planned)
        }
        .await;
        match listed {
            Ok(p) if p.is_empty() => {
                let w = format!("VM {} ({}) has no disks to back up", vm.name_label, vm.uuid);
                on(JobEvent::Warning(&w));
                report.warnings.push(w);
            }
            Ok(p) => out.extend(p),
            Err(e) => report.errors.push(format!(
                "VM {} ({}): its disks could not be listed: {e}",
                vm.name_label, vm.uuid
            )),
        }
    }
    out
}

/// Back up every planned disk, `at_once` at a time, each on a thread of its own driven by
/// `rt`. The outcomes come back in the plan's order.
#[allow(clippy::too_many_arguments)]
fn back_up(
    rt: &tokio::runtime::Runtime,
    repo: &Repository,
    lock: &SharedLock,
    xapi: &Xapi,
    opts: &BackupOptions,
    planned: &[Planned],
    at_once: usize,
    on: &(dyn Fn(JobEvent) + Sync),
) -> Vec<DiskOutcome> {
    // One id for every disk of the run: a whole-VM restore takes all of a VM's disks.
    let run = match crate::repo::random_hex(8) {
        Ok(r) => r,
        Err(e) => {
            return planned
                .iter()
                .map(|p| failed(p, format!("no run id: {e}"), Vec::new(), 0.0))
                .collect();
        }
    };
    let metadata: Mutex<HashMap<String, Option<Vec<u8>>>> = Mutex::new(HashMap::new());
    let outcomes: Mutex<Vec<Option<DiskOutcome>>> = Mutex::new(vec![None; planned.len()]);
    let next = AtomicUsize::new(0);
    let handle = rt.handle();
    std::thread::scope(|scope| {
        for _ in 0..at_once.clamp(1, planned.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(p) = planned.get(i) else { break };
                    on(JobEvent::DiskStarted(&p.vm_name, &p.disk));
                    let o =
                        handle.block_on(one_disk(repo, lock, xapi, opts, p, &run, &metadata, on));
                    on(JobEvent::DiskDone(&o));
                    if let Ok(mut all) = outcomes.lock()
                        && let Some(slot) = all.get_mut(i)
                    {
                        *slot = Some(o);
                    }
                }
            });
        }
    });
    let all = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
    all.into_iter()
        .zip(planned)
        .map(|(o, p)| {
            o.unwrap_or_else(|| failed(p, "internal: the disk was not run".into(), vec![], 0.0))
        })
        .collect()
}

fn failed(p: &Planned, error: String, warnings: Vec<String>, seconds: f64) -> DiskOutcome {
    DiskOutcome {
        vm: p.vm_name.clone(),
        vm_uuid: p.vm_uuid.clone(),
        disk: p.disk.clone(),
        vdi: p.vdi.clone(),
        ok: false,
        kind: None,
        reason: None,
        point: None,
        bytes_read: 0,
        bytes_stored: 0,
        virtual_size: p.virtual_size,
        seconds,
        error: Some(error),
        points_kept: None,
        health: None,
        warnings,
    }
}

/// Back up one disk; its outcome, success or not.
#[allow(clippy::too_many_arguments)]
async fn one_disk(
    repo: &Repository,
    lock: &SharedLock,
    xapi: &Xapi,
    opts: &BackupOptions,
    p: &Planned,
    run: &str,
    metadata: &Mutex<HashMap<String, Option<Vec<u8>>>>,
    on: &(dyn Fn(JobEvent) + Sync),
) -> DiskOutcome {
    let started = Instant::now();
    let warnings: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let say = |e: Event| match e {
        Event::Info(m) => on(JobEvent::Info(m)),
        Event::Warning(m) => {
            if let Ok(mut w) = warnings.lock() {
                w.push(m.to_string());
            }
            on(JobEvent::Warning(m));
        }
        Event::Blocks(..) => {}
    };
    // The VM metadata, once per VM (two of its disks starting together may both ask).
    let known = metadata
        .lock()
        .ok()
        .and_then(|m| m.get(&p.vm_uuid).cloned());
    let meta = match known {
        Some(m) => m,
        None => {
            let m = match xapi.export_metadata(&p.vm_uuid).await {
                Ok(m) => Some(m),
                Err(e) => {
                    say(Event::Warning(&format!(
                        "VM metadata of {} ({}) not saved ({e}); restoring to a new VM will need it",
                        p.vm_name, p.vm_uuid
                    )));
                    None
                }
            };
            if let Ok(mut all) = metadata.lock() {
                all.insert(p.vm_uuid.clone(), m.clone());
            }
            m
        }
    };
    let r = backup::backup_disk(repo, lock, xapi, opts, &p.target, run, meta, &say).await;
    let seconds = started.elapsed().as_secs_f64();
    match r {
        Ok(d) => DiskOutcome {
            vm: p.vm_name.clone(),
            vm_uuid: p.vm_uuid.clone(),
            disk: p.disk.clone(),
            vdi: d.vdi.clone(),
            ok: true,
            kind: Some(d.kind.to_string()),
            reason: d.new_set_reason.clone(),
            point: Some(d.point.clone()),
            bytes_read: d.fetched_bytes,
            bytes_stored: d.stored_bytes,
            virtual_size: d.virtual_size,
            seconds: d.seconds,
            error: None,
            points_kept: None,
            health: None,
            warnings: d.warnings,
        },
        Err(e) => {
            // A VM deleted while the job ran is said as such: the error alone names a VDI
            // the host no longer knows.
            let gone = match xapi.vm_by_uuid(&p.vm_uuid).await {
                Err(x) => matches!(
                    x.failure(),
                    Some(Failure::UuidInvalid | Failure::HandleInvalid)
                ),
                Ok(_) => false,
            };
            let error = if gone {
                format!(
                    "VM {} ({}) was deleted while the job ran; disk {} (VDI {}) was not backed up: {e}",
                    p.vm_name, p.vm_uuid, p.disk, p.vdi
                )
            } else {
                format!("disk {} (VDI {}) of VM {}: {e}", p.disk, p.vdi, p.vm_name)
            };
            tracing::info!(vm = %p.vm_name, vdi = %p.vdi, error = %error, "a disk of the job failed");
            failed(p, error, warnings.into_inner().unwrap_or_default(), seconds)
        }
    }
}

/// Name each committed point as `ls` and the mount show it now (`VM/DISK/SET/POINT`).
fn name_points(repo: &Repository, disks: &mut [DiskOutcome]) {
    match repo.catalog() {
        Ok(catalog) => {
            let tree = crate::naming::Tree::build(catalog);
            for d in disks {
                if let Some(label) = &d.point
                    && let Some(m) = tree.find_label(label)
                {
                    d.point = Some(tree.name_of(m));
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list the repository to name the new points"),
    }
}

/// `health = "fsck"`: check the guest filesystems of each committed disk's newest point (the
/// one this run made) with their own read-only checkers (src/health.rs). A point that cannot
/// be checked is `unchecked` with the reason in the disk's warnings.
fn health_check(repo: &Repository, disks: &mut [DiskOutcome]) {
    let catalog = match repo.catalog() {
        Ok(c) => c,
        Err(e) => {
            for d in disks.iter_mut().filter(|d| d.ok) {
                d.warnings.push(format!(
                    "health check not run: cannot list the repository: {e}"
                ));
            }
            return;
        }
    };
    let opts = crate::health::CheckOptions::default();
    for d in disks.iter_mut().filter(|d| d.ok) {
        let newest = catalog
            .iter()
            .find(|h| h.vdi == d.vdi)
            .and_then(|h| h.sets.iter().rev().find(|s| !s.points.is_empty()))
            .and_then(|set| {
                let seq = u32::try_from(set.points.len().checked_sub(1)?).ok()?;
                Some((set, seq))
            });
        let Some((set, seq)) = newest else {
            d.warnings
                .push("health check not run: the new point is not in the repository".into());
            continue;
        };
        match crate::health::check_point(repo, set, seq, &opts) {
            Ok(h) => d.health = Some(h),
            Err(e) => {
                d.warnings.push(format!("health check failed: {e}"));
                d.health = Some(super::report::HealthOutcome {
                    state: "unchecked".into(),
                    seconds: 0.0,
                    volumes: Vec::new(),
                });
            }
        }
    }
}

/// Apply the job's retention to each of its disks, then collect garbage once.
fn prune(repo: &Repository, job: &JobConf, disks: &mut [DiskOutcome]) -> StepOutcome {
    let started = Instant::now();
    let held = match repo.disk_ids() {
        Ok(ids) => ids,
        Err(e) => {
            return StepOutcome {
                ok: false,
                seconds: started.elapsed().as_secs_f64(),
                summary: format!("cannot list the repository's disks: {e}"),
            };
        }
    };
    let mut removed = 0usize;
    let mut pruned = 0usize;
    let mut problems = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for i in 0..disks.len() {
        let Some(vdi) = disks.get(i).map(|d| d.vdi.clone()) else {
            continue;
        };
        if !held.contains(&vdi) || !seen.insert(vdi.clone()) {
            continue;
        }
        match crate::prune::prune(repo, job.keep, Some(&vdi), false, true) {
            Ok(r) => {
                pruned += 1;
                if let Some(o) = r.disks.iter().find(|o| o.vdi == vdi) {
                    removed += o.removed;
                    for d in disks.iter_mut().filter(|d| d.vdi == vdi) {
                        d.points_kept = Some(o.kept as u64);
                    }
                }
            }
            Err(e) => problems.push(format!("VDI {vdi}: {e}")),
        }
    }
    let gc = if removed > 0 {
        // Never waits for other writers' transfers: with writers live, the space is freed by a
        // later run (or `cbtfs gc`).
        match repo
            .try_lock_exclusive("cbtfs job run (gc after prune)")
            .and_then(|lock| match lock {
                Some(lock) => {
                    crate::repo::gc::gc(repo, &lock, crate::repo::gc::DEFAULT_REPACK_BELOW, false)
                        .map(Some)
                }
                None => Ok(None),
            }) {
            Ok(Some(g)) => format!("; garbage collection freed {} bytes", g.bytes_freed),
            Ok(None) => {
                "; garbage collection left for a later run (other writers are running)".to_string()
            }
            Err(e) => {
                problems.push(format!("garbage collection: {e}"));
                String::new()
            }
        }
    } else {
        String::new()
    };
    let summary = format!(
        "removed {removed} {} of {pruned} {}{gc}",
        if removed == 1 { "point" } else { "points" },
        if pruned == 1 { "disk" } else { "disks" }
    );
    StepOutcome {
        ok: problems.is_empty(),
        seconds: started.elapsed().as_secs_f64(),
        summary: if problems.is_empty() {
            summary
        } else {
            format!("{summary}; failed: {}", problems.join("; "))
        },
    }
}

/// Copy the points of the VMs that committed in this run to repository `to` (every point of
/// theirs the destination lacks: this run's, and any an earlier failed copy left behind).
fn copy(config: &Config, to: &str, repo: &Repository, disks: &[DiskOutcome]) -> StepOutcome {
    let started = Instant::now();
    let step = |ok: bool, summary: String| StepOutcome {
        ok,
        seconds: started.elapsed().as_secs_f64(),
        summary,
    };
    let mut vms: Vec<String> = disks
        .iter()
        .filter(|d| d.ok)
        .map(|d| d.vm_uuid.clone())
        .collect();
    vms.sort();
    vms.dedup();
    if vms.is_empty() {
        return step(true, "nothing to copy: no disk committed a point".into());
    }
    let Some(conf) = config.repositories.get(to) else {
        return step(false, format!("repository {to:?} is not defined"));
    };
    let dst = match open_repository(to, conf) {
        Ok(d) => d,
        Err(e) => return step(false, format!("cannot open {}: {e}", conf.path)),
    };
    let req = crate::copy::CopyRequest {
        vms,
        since: None,
        dry_run: false,
    };
    match crate::copy::copy(repo, &dst, &req, |_| {}) {
        Ok(r) if r.skipped.is_empty() => step(
            true,
            format!(
                "copied {} {} to {} ({} new bytes stored there)",
                r.points_copied,
                if r.points_copied == 1 {
                    "point"
                } else {
                    "points"
                },
                conf.path,
                r.new_stored_bytes
            ),
        ),
        Ok(r) => step(
            false,
            format!(
                "copied {} points to {}, but {} could not be: {}",
                r.points_copied,
                conf.path,
                r.skipped.len(),
                r.skipped
                    .iter()
                    .map(|s| format!("{} ({})", s.path, s.reason))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ),
        Err(e) => step(false, format!("copy to {}: {e}", conf.path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_lowered_to_the_hosts_limit() {
        assert_eq!(connection_plan(4, 4, 16), (4, 4, None));
        let (n, per, w) = connection_plan(4, 8, 16);
        assert_eq!((n, per), (4, 4));
        assert!(
            w.unwrap()
                .contains("4 NBD connections per disk instead of 8")
        );
        let (n, per, w) = connection_plan(16, 4, 16);
        assert_eq!((n, per), (16, 1));
        assert!(w.is_some());
        // A host allowing fewer connections than disks at once: fewer disks at once.
        let (n, per, w) = connection_plan(8, 2, 4);
        assert_eq!((n, per), (4, 1));
        assert!(w.unwrap().contains("4 disks at once instead of 8"));
        for c in 1..=16 {
            for p in 1..=16 {
                let (n, per, _) = connection_plan(c, p, 16);
                assert!(n * per <= 16, "{c} × {p} → {n} × {per}");
            }
        }
    }

    #[test]
    fn password_files_give_their_first_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        std::fs::write(&p, "s3cret\r\nignored\n").unwrap();
        assert_eq!(read_password_file(&p, "host.x").unwrap(), "s3cret");
        std::fs::write(&p, "\nx\n").unwrap();
        let e = read_password_file(&p, "host.x").unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("[host.x]"), "{e}");
        std::fs::write(&p, vec![b'a'; 5000]).unwrap();
        assert!(read_password_file(&p, "host.x").is_err());
        let e = read_password_file(&d.path().join("none"), "host.x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("none"), "{e}");
    }
}
