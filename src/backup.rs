//! `cbtfs backup`: the CBT guide's procedure against a host, for each disk of a VM (or one VDI).
//!
//! Per disk: check CBT (enable it and start a new set with a full base when it is off or the
//! set is broken), snapshot, `list_changed_blocks` against the snapshot the previous point was
//! read from, `get_nbd_info`, fetch the changed blocks over NBD (or `/export_raw_vdi` when the
//! host has no NBD network), commit the point, close every NBD connection, `data_destroy` the
//! snapshot so only its CBT metadata stays (the next diff's origin), and destroy the snapshots
//! this repository made that no longer serve as an origin.
//!
//! Snapshots the repository made are tagged `other_config:cbtfs-repository=<repository id>`:
//! that is how a run that was killed half-way is cleaned up by the next one, and how two
//! repositories backing up the same disk leave each other's snapshots alone. A snapshot is
//! untagged for the moment between `VDI.snapshot` and `VDI.add_to_other_config`; a journal in the
//! repository (`repo::journal`), written before the call, covers that moment: the next run
//! removes what a run killed there made, and never a snapshot someone else made.
//!
//! Crash safety follows from the order: the previous origin is destroyed only after the new
//! point is committed, so at any moment the repository's newest point names a snapshot that
//! still exists on the host.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::import::{self, ImportError, ImportRequest};
use crate::nbd::{Address, FetchOptions, Pool, Target, Trust};
use crate::repo::journal::SnapshotJournal;
use crate::repo::{RepoError, Repository, WriteLock};
use crate::xapi::{Failure, HostConfig, HostTrust, NbdInfo, VdiRecord, Xapi, XapiError};
use crate::{BLOCK_SIZE, blocks_for, timefmt};

/// The other_config key that marks snapshots this repository made.
pub const TAG: &str = "cbtfs-repository";

/// How long `data_destroy`/`destroy` retry while the host still unplugs VBDs.
const IN_USE_WAIT: Duration = Duration::from_secs(60);

/// How to reach the host. The password is never printed.
#[derive(Clone)]
pub struct HostAccess {
    /// `https://HOST[:PORT]`.
    pub url: String,
    pub user: String,
    pub password: String,
    /// A CA bundle (PEM) that signed the host's certificate.
    pub ca_pem: Option<String>,
    /// No certificate check at all.
    pub insecure_tls: bool,
    /// How long the host may take to accept a connection, to start answering a request, and
    /// between bytes of an answer (API calls and HTTP handlers).
    pub timeout: Duration,
}

impl std::fmt::Debug for HostAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAccess")
            .field("url", &self.url)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub enum Selection {
    Vdi(String),
    /// A VM's uuid or name.
    Vm(String),
}

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub host: HostAccess,
    pub selection: Selection,
    /// Keep the snapshot's data on the host (skip `data_destroy`).
    pub keep_snapshot_data: bool,
    /// Accept plain NBD from a host whose NBD network is `insecure_nbd`.
    pub allow_plain_nbd: bool,
    pub fetch: FetchOptions,
}

/// What happened to one disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub vdi: String,
    pub disk: String,
    pub vm: Option<String>,
    /// `VDI@TIME`.
    pub point: String,
    /// The point's canonical name, `VM/DISK/SET/POINT`, as `ls` and the mount show it (`point`
    /// when the repository could not be listed after the run).
    pub path: String,
    /// The disk's folder, `VM/DISK`.
    pub disk_path: String,
    pub set: String,
    pub seq: u32,
    /// `base` or `incremental`.
    pub kind: &'static str,
    /// Why a new set was started, if one was.
    pub new_set_reason: Option<String>,
    /// `nbd` or `export_raw_vdi`.
    pub via: &'static str,
    pub virtual_size: u64,
    /// Blocks the host reported changed (a base: every block).
    pub changed_blocks: u64,
    pub changed_percent: f64,
    /// Blocks read from the host.
    pub fetched_blocks: u64,
    pub fetched_bytes: u64,
    pub seconds: f64,
    /// The host snapshot the point was read from (the next backup's origin).
    pub snapshot: String,
    pub vm_metadata_saved: bool,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub host: String,
    /// Set when this run pinned the host's certificate (first use).
    pub pinned_certificate: Option<String>,
    pub xmlrpc: bool,
    pub disks: Vec<DiskReport>,
    /// (VDI uuid, error) for disks that failed.
    pub failures: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Xapi(#[from] XapiError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{0}")]
    Refused(String),
}

/// Progress and warnings as the run goes.
pub enum Event<'a> {
    Info(&'a str),
    Warning(&'a str),
    /// (vdi, blocks done, blocks total)
    Blocks(&'a str, u64, u64),
}

fn pin_key(host: &str) -> String {
    let safe: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("hosts/{safe}.pin")
}

/// The pinned fingerprint; None on first use only (an empty or damaged pin is an error).
fn read_pin(repo: &Repository, host: &str) -> Result<Option<String>, XapiError> {
    crate::xapi::trust::read_pin(&repo.store().path(&pin_key(host)))
}

fn write_pin(repo: &Repository, host: &str, fp: &str) -> Result<(), RepoError> {
    use crate::repo::store::Store;
    let store = repo.store();
    store
        .make_dir("hosts")
        .map_err(|e| RepoError::io("create", store.describe("hosts"), e))?;
    let key = pin_key(host);
    store
        .put_new(&key, format!("{fp}\n").as_bytes())
        .map_err(|e| RepoError::io("write", store.describe(&key), e))
}

/// Connect and log in, following HOST_IS_SLAVE to the pool master; pins the certificate on
/// first use. Returns the session and the fingerprint pinned now, if any.
pub(crate) async fn connect(
    repo: &Repository,
    access: &HostAccess,
    say: &dyn Fn(Event),
) -> Result<(Xapi, Option<String>), BackupError> {
    let mut url = access.url.clone();
    for _ in 0..3 {
        let (_, host) = crate::xapi::client::parse_url(&url)?;
        let pinned = match access.ca_pem.is_none() && !access.insecure_tls {
            true => read_pin(repo, &host)?,
            false => None,
        };
        let trust = if let Some(ca) = &access.ca_pem {
            HostTrust::Ca(ca.clone())
        } else if access.insecure_tls {
            HostTrust::Insecure
        } else {
            HostTrust::Pinned(pinned.clone())
        };
        let mut xapi = Xapi::connect(&HostConfig {
            url: url.clone(),
            trust: trust.clone(),
            timeout: access.timeout,
        })?;
        match xapi.login(&access.user, &access.password).await {
            Ok(()) => {
                let mut newly = None;
                if let (HostTrust::Pinned(None), Some(seen)) = (&trust, xapi.seen_certificate()) {
                    write_pin(repo, &host, &seen)?;
                    xapi.trust_state().pin(&seen);
                    say(Event::Info(&format!(
                        "pinned the TLS certificate of {host} on first use: {seen} (compare it with `openssl x509 -noout -fingerprint -sha256 -in /etc/xensource/xapi-ssl.pem` on the host)"
                    )));
                    newly = Some(seen);
                }
                if let HostTrust::Pinned(_) = trust {
                    trust_pool_members(&xapi, say).await;
                }
                return Ok((xapi, newly));
            }
            Err(XapiError::Api(f)) if f.master().is_some() => {
                let master = f.master().unwrap_or_default();
                let port = url
                    .trim_start_matches("https://")
                    .rsplit_once(':')
                    .map(|(_, p)| format!(":{p}"))
                    .unwrap_or_default();
                say(Event::Info(&format!(
                    "{host} is a pool member; connecting to the pool master {master}"
                )));
                url = format!("https://{master}{port}");
            }
            Err(e @ XapiError::Transport { .. }) => {
                if let (Some(p), Some(seen)) = (&pinned, xapi.seen_certificate())
                    && access.ca_pem.is_none()
                    && !access.insecure_tls
                    && *p != seen
                {
                    return Err(XapiError::CertificateChanged {
                        host: host.clone(),
                        pinned: p.clone(),
                        seen,
                        pin_file: repo.store().path(&pin_key(&host)).display().to_string(),
                    }
                    .into());
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(BackupError::Refused(format!(
        "{}: too many HOST_IS_SLAVE redirections; give the pool master's address",
        access.url
    )))
}

/// With a pinned master: trust each pool member's certificate, as the master hands it over,
/// for that member's address (a handler may redirect to the member holding the disk). Hosts
/// whose certificate cannot be had stay untrusted: a redirect to one is refused.
async fn trust_pool_members(xapi: &Xapi, say: &dyn Fn(Event)) {
    match xapi.pool_certificates().await {
        Ok(hosts) => {
            for (address, pem) in hosts {
                match crate::xapi::trust::pem_fingerprint(&pem) {
                    Some(fp) if !address.is_empty() => {
                        xapi.trust_state().trust_member(&address, &fp)
                    }
                    _ => say(Event::Warning(&format!(
                        "the pool master handed over no usable certificate for pool member {address:?}; a transfer redirected to it will be refused"
                    ))),
                }
            }
        }
        Err(e) => say(Event::Warning(&format!(
            "cannot learn the pool members' certificates ({e}); a transfer redirected to another pool member will be refused"
        ))),
    }
}

/// Run a backup. The repository lock is held for the whole run.
pub async fn run(
    repo: &Repository,
    opts: &BackupOptions,
    say: &dyn Fn(Event),
) -> Result<RunReport, BackupError> {
    let lock = repo.lock(&format!("cbtfs backup from {}", opts.host.url))?;
    let (mut xapi, pinned) = connect(repo, &opts.host, say).await?;
    let result = run_logged_in(repo, &lock, &xapi, opts, say).await;
    // Always log out: sessions are limited per user.
    xapi.logout().await;
    let (mut disks, failures) = result?;
    // Name the new points as the mount shows them, in the repository as it is now.
    match repo.catalog() {
        Ok(catalog) => {
            let tree = crate::naming::Tree::build(catalog);
            for d in &mut disks {
                if let Some(m) = tree.find_label(&d.point) {
                    d.path = tree.name_of(m);
                }
                if let Some(disk) = tree.disk_path(&d.vdi) {
                    d.disk_path = disk;
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot list the repository to name the new points"),
    }
    Ok(RunReport {
        host: xapi.host().to_string(),
        pinned_certificate: pinned,
        xmlrpc: xapi.uses_xmlrpc(),
        disks,
        failures,
    })
}

/// A disk to back up and what names it.
struct DiskTarget {
    vdi_ref: String,
    vm: Option<(String, String)>,
    /// Its VBD's `userdevice` in that VM.
    userdevice: Option<String>,
    /// The VM's disks (VDI uuids), this one included.
    vm_disks: Vec<String>,
}

/// The VDI uuids of a VM's disks (VBDs of type Disk with a VDI), with each VBD's record.
async fn vm_disks(
    xapi: &Xapi,
    vm: &crate::xapi::VmRecord,
) -> Result<Vec<(String, crate::xapi::VbdRecord)>, XapiError> {
    let mut out = Vec::new();
    for vbd in &vm.vbds {
        let b = xapi.vbd_record(vbd).await?;
        if b.kind.eq_ignore_ascii_case("disk") && b.vdi != crate::xapi::NULL_REF {
            let uuid = xapi.vdi_record(&b.vdi).await?.uuid;
            out.push((uuid, b));
        }
    }
    Ok(out)
}

async fn select(xapi: &Xapi, sel: &Selection) -> Result<Vec<DiskTarget>, BackupError> {
    match sel {
        Selection::Vdi(uuid) => {
            let vdi_ref = xapi.vdi_by_uuid(uuid).await?;
            let rec = xapi.vdi_record(&vdi_ref).await?;
            let mut target = DiskTarget {
                vdi_ref,
                vm: None,
                userdevice: None,
                vm_disks: Vec::new(),
            };
            for vbd in &rec.vbds {
                let b = xapi.vbd_record(vbd).await?;
                let v = xapi.vm_record(&b.vm).await?;
                if !v.is_control_domain {
                    target.vm_disks = vm_disks(xapi, &v).await?.into_iter().map(|d| d.0).collect();
                    target.vm = Some((v.uuid, v.name_label));
                    target.userdevice = Some(b.userdevice).filter(|u| !u.is_empty());
                    break;
                }
            }
            Ok(vec![target])
        }
        Selection::Vm(key) => {
            let vm_ref = if crate::repo::valid_uuid(key) {
                xapi.vm_by_uuid(key).await?
            } else {
                let found = xapi.vm_by_name(key).await?;
                match found.as_slice() {
                    [one] => one.clone(),
                    [] => {
                        return Err(BackupError::Refused(format!(
                            "no VM is named {key:?} on the host (xe vm-list)"
                        )));
                    }
                    many => {
                        let mut uuids = Vec::new();
                        for r in many {
                            uuids.push(xapi.vm_record(r).await?.uuid);
                        }
                        return Err(BackupError::Refused(format!(
                            "{} VMs are named {key:?} ({}); give --vm UUID",
                            many.len(),
                            uuids.join(", ")
                        )));
                    }
                }
            };
            let vm = xapi.vm_record(&vm_ref).await?;
            let disks = vm_disks(xapi, &vm).await?;
            let uuids: Vec<String> = disks.iter().map(|d| d.0.clone()).collect();
            let out: Vec<DiskTarget> = disks
                .into_iter()
                .map(|(_, b)| DiskTarget {
                    vdi_ref: b.vdi,
                    vm: Some((vm.uuid.clone(), vm.name_label.clone())),
                    userdevice: Some(b.userdevice).filter(|u| !u.is_empty()),
                    vm_disks: uuids.clone(),
                })
                .collect();
            if out.is_empty() {
                return Err(BackupError::Refused(format!(
                    "VM {} ({}) has no disks to back up",
                    vm.name_label, vm.uuid
                )));
            }
            Ok(out)
        }
    }
}

type Outcome = (Vec<DiskReport>, Vec<(String, String)>);

async fn run_logged_in(
    repo: &Repository,
    lock: &WriteLock,
    xapi: &Xapi,
    opts: &BackupOptions,
    say: &dyn Fn(Event),
) -> Result<Outcome, BackupError> {
    let targets = select(xapi, &opts.selection).await?;
    // One id for every disk this run backs up: a whole-VM restore takes all of them.
    let run = crate::repo::random_hex(8)?;
    // The VM metadata, once per VM, saved with each of its disks' points.
    let mut metadata: std::collections::HashMap<String, Option<Vec<u8>>> = Default::default();
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for t in &targets {
        let meta = match &t.vm {
            Some((uuid, _)) => {
                if !metadata.contains_key(uuid) {
                    let m = match xapi.export_metadata(uuid).await {
                        Ok(m) => Some(m),
                        Err(e) => {
                            say(Event::Warning(&format!(
                                "VM metadata of {uuid} not saved ({e}); restoring to a new VM will need it"
                            )));
                            None
                        }
                    };
                    metadata.insert(uuid.clone(), m);
                }
                metadata.get(uuid).cloned().flatten()
            }
            None => None,
        };
        match backup_disk(repo, lock, xapi, opts, t, &run, meta, say).await {
            Ok(r) => reports.push(r),
            Err(e) => {
                let uuid = xapi
                    .vdi_record(&t.vdi_ref)
                    .await
                    .map(|r| r.uuid)
                    .unwrap_or_else(|_| t.vdi_ref.clone());
                failures.push((uuid, e.to_string()));
            }
        }
    }
    Ok((reports, failures))
}

/// Retry `f` while the host answers VDI_IN_USE (VBDs of closed NBD connections unplug for a
/// few seconds).
async fn while_in_use<F, Fut>(mut f: F) -> Result<(), XapiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), XapiError>>,
{
    let start = Instant::now();
    let deadline = start + IN_USE_WAIT;
    loop {
        match f().await {
            Err(e) if e.failure() == Some(Failure::VdiInUse) && Instant::now() < deadline => {
                // The unplug usually ends within a second or two: ask often then (a doubling
                // pause would overshoot it by as much as it waited), rarely afterwards.
                let pause = match start.elapsed() {
                    t if t < Duration::from_secs(3) => Duration::from_millis(100),
                    t if t < Duration::from_secs(10) => Duration::from_millis(500),
                    _ => Duration::from_secs(2),
                };
                tokio::time::sleep(pause).await;
            }
            other => return other,
        }
    }
}

/// True when a VM has `vdi_ref` plugged: VDI_IN_USE will not clear by waiting.
async fn attached_to_vm(xapi: &Xapi, vdi_ref: &str) -> bool {
    let Ok(rec) = xapi.vdi_record(vdi_ref).await else {
        return false;
    };
    for vbd in &rec.vbds {
        if xapi
            .vbd_record(vbd)
            .await
            .map(|b| b.currently_attached)
            .unwrap_or(false)
        {
            return true;
        }
    }
    false
}

/// Destroy this repository's snapshots of `vdi_ref` except `keep` (whose data is destroyed
/// unless asked to keep it). Returns warnings for what could not be removed.
async fn tidy_snapshots(
    xapi: &Xapi,
    vdi_ref: &str,
    repo_id: &str,
    keep: Option<&str>,
    keep_data: bool,
) -> Result<Vec<String>, XapiError> {
    let rec = xapi.vdi_record(vdi_ref).await?;
    let mut warnings = Vec::new();
    for s in &rec.snapshots {
        let Ok(snap) = xapi.vdi_record(s).await else {
            continue; // destroyed meanwhile
        };
        if snap.other_config.get(TAG).map(String::as_str) != Some(repo_id) {
            continue; // not ours
        }
        if attached_to_vm(xapi, s).await {
            warnings.push(format!(
                "snapshot {} of VDI {} is attached to a VM; detach it (xe vbd-unplug, xe vbd-destroy) and the next backup removes it",
                snap.uuid, rec.uuid
            ));
            continue;
        }
        let r = if Some(snap.uuid.as_str()) == keep {
            if keep_data || snap.kind == "cbt_metadata" {
                continue;
            }
            while_in_use(|| xapi.data_destroy(s)).await
        } else {
            while_in_use(|| xapi.vdi_destroy(s)).await
        };
        if let Err(e) = r {
            warnings.push(format!(
                "could not remove snapshot {} of VDI {}: {e}; the next backup tries again",
                snap.uuid, rec.uuid
            ));
        }
    }
    Ok(warnings)
}

/// The records of a VDI's snapshots (those destroyed meanwhile are skipped), by reference.
async fn snapshot_records(
    xapi: &Xapi,
    rec: &VdiRecord,
) -> Result<Vec<(String, VdiRecord)>, XapiError> {
    let mut out = Vec::new();
    for s in &rec.snapshots {
        match xapi.vdi_record(s).await {
            Ok(r) => out.push((s.clone(), r)),
            Err(e) if e.failure() == Some(Failure::HandleInvalid) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Remove what a backup of this disk that was killed between `VDI.snapshot` and tagging left on
/// the host, as its journal (`repo::journal`) tells, then forget the journal. Returns warnings
/// naming every snapshot removed or left.
///
/// With the snapshot's uuid recorded (the call had returned), that snapshot goes, unless it is
/// the repository's origin. Without (the kill came during the call), the killed run's snapshot
/// is one the VDI did not have before the call, that nobody marked since (its other_config is
/// exactly the one it inherited from the VDI: xapi copies the VDI's other_config to snapshots,
/// and backup tools add their own keys to theirs), and
/// that is not older than the newest snapshot before the call. A run makes one snapshot, so
/// only the oldest such is removed: a later one was made by someone else after the kill (and
/// two of the same second are left alone, named, for a human to decide).
async fn recover_snapshot_journal(
    repo: &Repository,
    lock: &WriteLock,
    xapi: &Xapi,
    rec: &VdiRecord,
    origin: Option<&str>,
) -> Result<Vec<String>, BackupError> {
    let mut warnings = Vec::new();
    let journal = match repo.snapshot_journal(&rec.uuid) {
        Ok(Some(j)) => j,
        Ok(None) => return Ok(warnings),
        Err(e) => {
            warnings.push(format!(
                "{e}; it is removed, so a snapshot of VDI {} that an interrupted backup made may be left on the host: check `xe vdi-list snapshot-of={}`",
                rec.uuid, rec.uuid
            ));
            repo.clear_snapshot_journal(lock, &rec.uuid)?;
            return Ok(warnings);
        }
    };
    let snaps = snapshot_records(xapi, rec).await?;
    let not_origin = |s: &VdiRecord| Some(s.uuid.as_str()) != origin;
    let victims: Vec<&(String, VdiRecord)> = match &journal.snapshot {
        Some(uuid) => snaps
            .iter()
            .filter(|(_, s)| &s.uuid == uuid && not_origin(s))
            .collect(),
        None => {
            let mut found: Vec<&(String, VdiRecord)> = snaps
                .iter()
                .filter(|(r, s)| {
                    // Exactly what it inherited from the VDI: another tool marks its own.
                    !journal.before.contains(r)
                        && s.other_config == rec.other_config
                        && match journal.not_before {
                            Some(t) => s.snapshot_time.is_some_and(|st| st >= t),
                            None => true,
                        }
                        && not_origin(s)
                })
                .collect();
            found.sort_by_key(|(_, s)| s.snapshot_time);
            let first = found.first().map(|(_, s)| s.snapshot_time);
            let tied = found
                .iter()
                .filter(|(_, s)| Some(s.snapshot_time) == first)
                .count();
            if tied > 1 {
                let names: Vec<&str> = found.iter().map(|(_, s)| s.uuid.as_str()).collect();
                warnings.push(format!(
                    "an interrupted backup of VDI {} made one of the snapshots {} (made in the same second, untagged): none was removed; destroy the one that is not another tool's (xe vdi-destroy uuid=...)",
                    rec.uuid,
                    names.join(", ")
                ));
                found.clear();
            }
            found.truncate(1);
            found
        }
    };
    for (r, s) in victims {
        if attached_to_vm(xapi, r).await {
            warnings.push(format!(
                "snapshot {} of VDI {}, made by an interrupted backup, is attached to a VM: detach it and destroy it (xe vbd-unplug, xe vbd-destroy, xe vdi-destroy uuid={})",
                s.uuid, rec.uuid, s.uuid
            ));
            continue;
        }
        match while_in_use(|| xapi.vdi_destroy(r)).await {
            Ok(()) => warnings.push(format!(
                "removed snapshot {} of VDI {} that an interrupted backup made",
                s.uuid, rec.uuid
            )),
            Err(e) if e.failure() == Some(Failure::HandleInvalid) => {}
            Err(e) => warnings.push(format!(
                "could not remove snapshot {} of VDI {} that an interrupted backup made ({e}): destroy it with `xe vdi-destroy uuid={}`",
                s.uuid, rec.uuid, s.uuid
            )),
        }
    }
    repo.clear_snapshot_journal(lock, &rec.uuid)?;
    Ok(warnings)
}

#[allow(clippy::too_many_arguments)]
async fn backup_disk(
    repo: &Repository,
    lock: &WriteLock,
    xapi: &Xapi,
    opts: &BackupOptions,
    t: &DiskTarget,
    run: &str,
    vm_metadata: Option<Vec<u8>>,
    say: &dyn Fn(Event),
) -> Result<DiskReport, BackupError> {
    let started = Instant::now();
    let repo_id = repo.header.id.clone();
    let rec = xapi.vdi_record(&t.vdi_ref).await?;
    if rec.is_a_snapshot {
        return Err(BackupError::Refused(format!(
            "VDI {} is a snapshot; back up the disk it is a snapshot of",
            rec.uuid
        )));
    }
    let mut warnings = Vec::new();
    let warn = |w: String, warnings: &mut Vec<String>| {
        say(Event::Warning(&w));
        warnings.push(w);
    };
    let history = repo.disk(&rec.uuid)?;
    let last_set = history.sets.last();
    let last = last_set.and_then(|s| s.points.last());
    let origin = last_set
        .filter(|s| s.problems.is_empty())
        .and_then(|s| s.points.last())
        .and_then(|p| p.snapshot.clone());

    let mut reason: Option<String> = None;
    if !rec.cbt_enabled {
        if last.is_some() {
            reason = Some(format!(
                "changed block tracking was disabled on VDI {} since the last backup (a host or SR crash, a user, or a storage migration)",
                rec.uuid
            ));
        }
        xapi.enable_cbt(&t.vdi_ref).await?;
    }
    if last.is_none() {
        reason.get_or_insert_with(|| "first backup of this disk".into());
    } else if origin.is_none() {
        reason.get_or_insert_with(|| {
            "the newest point was not taken from a host snapshot (imported) or its set is damaged"
                .into()
        });
    }

    // Snapshots an interrupted run left behind go first; the origin stays.
    for w in recover_snapshot_journal(repo, lock, xapi, &rec, origin.as_deref()).await? {
        warn(w, &mut warnings);
    }
    for w in tidy_snapshots(xapi, &t.vdi_ref, &repo_id, origin.as_deref(), true).await? {
        warn(w, &mut warnings);
    }

    // The journal names what the host holds before the call, so that a kill before the
    // snapshot is tagged leaves it recognisable (see `repo::journal`).
    let existing = snapshot_records(xapi, &xapi.vdi_record(&t.vdi_ref).await?).await?;
    let mut journal = SnapshotJournal::new(
        &rec.uuid,
        existing.iter().map(|(r, _)| r.clone()).collect(),
        existing.iter().filter_map(|(_, s)| s.snapshot_time).max(),
    );
    repo.put_snapshot_journal(lock, &journal)?;
    let snap_ref = match xapi.snapshot(&t.vdi_ref).await {
        Ok(r) => r,
        Err(e) => {
            // A failure the host answered made nothing; a lost answer may have: the journal
            // stays for the next run.
            if matches!(e, XapiError::Api(_)) {
                repo.clear_snapshot_journal(lock, &rec.uuid)?;
            }
            return Err(e.into());
        }
    };
    let outcome = async {
        let snap = xapi.vdi_record(&snap_ref).await?;
        journal.snapshot = Some(snap.uuid.clone());
        repo.put_snapshot_journal(lock, &journal)?;
        // xapi's snapshot copies the VDI's other_config (`snapshot_and_clone` in xen-api's
        // xapi_vdi.ml sets the new VDI's other_config to the original's): a tag someone put on
        // the disk itself arrives on the snapshot and must give way to ours.
        if snap.other_config.contains_key(TAG) {
            xapi.remove_from_other_config(&snap_ref, TAG).await?;
        }
        xapi.add_to_other_config(&snap_ref, TAG, &repo_id).await?;
        repo.clear_snapshot_journal(lock, &rec.uuid)?;
        let mut bitmap = None;
        if reason.is_none()
            && let Some(o) = &origin
        {
            match changed_blocks(xapi, o, &snap_ref).await? {
                Ok(b) => bitmap = Some(b),
                Err(why) => reason = Some(why),
            }
        }
        if let Some(r) = &reason
            && last.is_some()
        {
            warn(
                format!("starting a new set for VDI {}: {r}", rec.uuid),
                &mut warnings,
            );
        }
        let time = snap
            .snapshot_time
            .unwrap_or_else(timefmt::now)
            .max(history.newest().map(|p| p.time + 1).unwrap_or(i64::MIN));
        let req = ImportRequest {
            vdi: rec.uuid.clone(),
            disk_name: Some(if rec.name_label.is_empty() {
                format!("disk-{}", rec.uuid.get(..8).unwrap_or(&rec.uuid))
            } else {
                rec.name_label.clone()
            }),
            vm_uuid: t.vm.as_ref().map(|v| v.0.clone()),
            vm_name: t.vm.as_ref().map(|v| v.1.clone()),
            source: import::ImportSource::Raw(Default::default()),
            bitmap: bitmap.map(|b| (b, format!("VDI.list_changed_blocks of {}", rec.uuid))),
            time,
            snapshot: Some(snap.uuid.clone()),
            vm_metadata: vm_metadata.clone(),
            vdi_type: Some(rec.kind.clone()),
            source_label: Some(format!("backup:{}", xapi.host())),
            vm_run: t.vm.as_ref().map(|_| crate::repo::VmRun {
                run: run.to_string(),
                userdevice: t.userdevice.clone(),
                vm_disks: t.vm_disks.clone(),
            }),
        };
        let (report, via) = fetch(
            repo,
            lock,
            xapi,
            opts,
            &snap,
            &snap_ref,
            &req,
            say,
            &mut warnings,
        )
        .await?;
        Ok::<_, BackupError>((report, via, snap, req.bitmap.is_some()))
    }
    .await;
    let (report, via, snap, incremental) = match outcome {
        Ok(o) => o,
        Err(e) => {
            // The new snapshot serves as nobody's origin: remove it (the old origin stays).
            if attached_to_vm(xapi, &snap_ref).await {
                say(Event::Warning(
                    "the new snapshot is attached to a VM, so it stays on the host; detach it and the next backup removes it",
                ));
            } else {
                match while_in_use(|| xapi.vdi_destroy(&snap_ref)).await {
                    Ok(()) => {
                        // Gone: nothing left for the journal to name.
                        if let Err(j) = repo.clear_snapshot_journal(lock, &rec.uuid) {
                            tracing::warn!(error = %j, "could not remove the snapshot journal");
                        }
                    }
                    Err(d) => {
                        tracing::warn!(error = %d, "could not destroy the unused snapshot; the next backup removes it")
                    }
                }
            }
            return Err(e);
        }
    };
    // The point is committed: the new snapshot is the origin from now on.
    for w in tidy_snapshots(
        xapi,
        &t.vdi_ref,
        &repo_id,
        Some(&snap.uuid),
        opts.keep_snapshot_data,
    )
    .await?
    {
        warn(w, &mut warnings);
    }
    let m = &report.manifest;
    let blocks = blocks_for(m.virtual_size);
    let changed = if incremental {
        m.changed_blocks
    } else {
        blocks
    };
    Ok(DiskReport {
        vdi: rec.uuid.clone(),
        disk: m.disk_name.clone(),
        vm: m.vm_name.clone(),
        point: m.label(),
        path: m.label(),
        disk_path: format!(
            "{}/{}",
            m.vm_name.as_deref().unwrap_or(crate::naming::NO_VM),
            m.disk_name
        ),
        set: m.set.clone(),
        seq: m.seq,
        kind: if incremental { "incremental" } else { "base" },
        new_set_reason: if incremental { None } else { reason },
        via,
        virtual_size: m.virtual_size,
        changed_blocks: changed,
        changed_percent: if blocks == 0 {
            0.0
        } else {
            changed as f64 * 100.0 / blocks as f64
        },
        fetched_blocks: report.blocks_read,
        fetched_bytes: report.blocks_read * BLOCK_SIZE,
        seconds: started.elapsed().as_secs_f64(),
        snapshot: snap.uuid,
        vm_metadata_saved: m.vm_metadata.is_some(),
        warnings,
    })
}

/// The bitmap from `origin` (uuid) to `snap_ref`, or why the set cannot continue.
async fn changed_blocks(
    xapi: &Xapi,
    origin: &str,
    snap_ref: &str,
) -> Result<Result<String, String>, BackupError> {
    let origin_ref = match xapi.vdi_by_uuid(origin).await {
        Ok(r) => r,
        Err(e)
            if matches!(
                e.failure(),
                Some(Failure::UuidInvalid | Failure::HandleInvalid)
            ) =>
        {
            return Ok(Err(format!(
                "the host no longer has snapshot {origin} that the last point was taken from"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    match xapi.list_changed_blocks(&origin_ref, snap_ref).await {
        Ok(b) => Ok(Ok(b)),
        Err(e)
            if matches!(
                e.failure(),
                Some(Failure::Unrelated | Failure::VdiNoCbtMetadata | Failure::HandleInvalid)
            ) =>
        {
            Ok(Err(format!(
                "the host cannot diff against snapshot {origin}: {e}"
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// What the host says about the network an NBD address is on (xen-api's `network.purpose`).
/// `get_nbd_info` carries the host's certificate on every NBD network, so its `cert` cannot
/// tell an `nbd` network from an `insecure_nbd` one: the purpose does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NbdPurpose {
    /// `nbd`: the server requires TLS; always TLS, pinned to the record's certificate.
    Nbd,
    /// `insecure_nbd`: the server speaks plain text. The network's uuid, when known, for
    /// the advice to switch it.
    Insecure { network: Option<String> },
    /// The host did not say (no attached PIF holds the address, or the calls were refused, as
    /// for a role that may not read networks): the server's own answer decides.
    Unknown,
}

/// How one record's NBD server is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NbdSecurity {
    Tls,
    Plain,
}

/// The decision for one record, from its network's purpose, `--allow-plain-nbd`, whether the
/// record has a certificate to pin, and whether a TLS attempt found a server that does not
/// offer STARTTLS. An error is the refusal to show the user. `place`: `ADDRESS:PORT`.
pub(crate) fn nbd_security(
    purpose: &NbdPurpose,
    allow_plain: bool,
    has_cert: bool,
    server_refused_tls: bool,
    place: &str,
) -> Result<NbdSecurity, String> {
    let switch = |network: Option<&str>| {
        format!(
            "or make the network encrypt NBD: xe network-param-set uuid={} purpose=nbd{}",
            network.unwrap_or("<network-uuid>"),
            if network.is_none() {
                " (xe network-list shows the networks and their purpose)"
            } else {
                ""
            }
        )
    };
    match purpose {
        NbdPurpose::Nbd if server_refused_tls => Err(format!(
            "the NBD server at {place} does not offer TLS although its network's purpose is nbd; refusing to send data in plain text (is something other than the host's NBD server listening there?)"
        )),
        NbdPurpose::Nbd if !has_cert => Err(format!(
            "the host gave no certificate for the NBD server at {place} (an nbd network requires TLS), so it cannot be verified"
        )),
        NbdPurpose::Nbd => Ok(NbdSecurity::Tls),
        NbdPurpose::Insecure { .. } if allow_plain => Ok(NbdSecurity::Plain),
        NbdPurpose::Insecure { network } => Err(format!(
            "the host offers NBD at {place} on an insecure_nbd network, without TLS; pass --allow-plain-nbd to accept unencrypted transfers, {}",
            switch(network.as_deref())
        )),
        NbdPurpose::Unknown if has_cert && !server_refused_tls => Ok(NbdSecurity::Tls),
        NbdPurpose::Unknown if allow_plain => Ok(NbdSecurity::Plain),
        NbdPurpose::Unknown => Err(format!(
            "the NBD server at {place} does not offer TLS (its network is insecure_nbd); pass --allow-plain-nbd to accept unencrypted transfers, {}",
            switch(None)
        )),
    }
}

/// How one `get_nbd_info` record becomes a target. `server_refused_tls`: a TLS attempt at it
/// found a server without STARTTLS.
pub(crate) fn nbd_target(
    info: &NbdInfo,
    purpose: &NbdPurpose,
    allow_plain: bool,
    server_refused_tls: bool,
) -> Result<Target, BackupError> {
    let place = format!("{}:{}", info.address, info.port);
    let has_cert = !info.cert.trim().is_empty();
    let security = nbd_security(purpose, allow_plain, has_cert, server_refused_tls, &place)
        .map_err(BackupError::Refused)?;
    let trust = match security {
        NbdSecurity::Plain => None,
        NbdSecurity::Tls => Some(Trust::Pinned {
            cert_pem: info.cert.clone(),
            subject: info.subject.clone(),
        }),
    };
    Ok(Target {
        address: Address::Tcp {
            host: info.address.clone(),
            port: info.port,
        },
        export: info.exportname.clone(),
        trust,
    })
}

/// The target for one record as its network's purpose allows; when the purpose is unknown,
/// one connection asks the server whether it speaks TLS (a server refusing STARTTLS is an
/// insecure_nbd one). A refusal is an error: no other record will do better.
pub(crate) async fn resolve_nbd_target(
    info: &NbdInfo,
    purpose: &NbdPurpose,
    allow_plain: bool,
) -> Result<Target, BackupError> {
    let target = nbd_target(info, purpose, allow_plain, false)?;
    if *purpose != NbdPurpose::Unknown || target.trust.is_none() {
        return Ok(target);
    }
    match crate::nbd::client::Client::connect(&target, 1).await {
        Err(crate::nbd::NbdError::NoTls { .. }) => nbd_target(info, purpose, allow_plain, true),
        Ok(c) => {
            c.close().await;
            Ok(target)
        }
        // Not reachable now: the pool's own attempts report it (or use the other records).
        Err(_) => Ok(target),
    }
}

/// The address as an IP, for comparing the forms a host may write (`fd00::1`, `[fd00::1]`,
/// `fd00::1/64`).
fn ip_of(text: &str) -> Option<std::net::IpAddr> {
    let t = text.split('/').next().unwrap_or(text);
    t.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// The network of the attached PIF that holds `address` (its `IP`, or one of its `IPv6`
/// entries), from a `PIF.get_all_records` answer.
pub(crate) fn network_of_address(pifs: &serde_json::Value, address: &str) -> Option<String> {
    let want = ip_of(address);
    let same = |a: &str| match (want, ip_of(a)) {
        (Some(w), Some(x)) => w == x,
        _ => a == address,
    };
    pifs.as_object()?.values().find_map(|p| {
        let attached = p.get("currently_attached").and_then(|a| a.as_bool()) != Some(false);
        let v4 = p.get("IP").and_then(|v| v.as_str()).is_some_and(&same);
        let v6 = p
            .get("IPv6")
            .and_then(|v| v.as_array())
            .is_some_and(|l| l.iter().filter_map(|a| a.as_str()).any(&same));
        (attached && (v4 || v6))
            .then(|| p.get("network")?.as_str().map(str::to_string))
            .flatten()
    })
}

/// The purpose of a network from its record (`purpose`: a list of names) and its uuid.
pub(crate) fn purpose_of(network: &serde_json::Value) -> NbdPurpose {
    let has = |name: &str| {
        network
            .get("purpose")
            .and_then(|p| p.as_array())
            .is_some_and(|l| l.iter().any(|x| x.as_str() == Some(name)))
    };
    if has("nbd") {
        NbdPurpose::Nbd
    } else if has("insecure_nbd") {
        NbdPurpose::Insecure {
            network: network
                .get("uuid")
                .and_then(|u| u.as_str())
                .map(str::to_string),
        }
    } else {
        NbdPurpose::Unknown
    }
}

/// For each record, the purpose of the network whose PIF holds its address. Calls the host
/// refuses (or a host without these classes) leave it unknown.
pub(crate) async fn nbd_purposes(xapi: &Xapi, infos: &[NbdInfo]) -> Vec<NbdPurpose> {
    let pifs = match xapi.call("PIF.get_all_records", vec![]).await {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(error = %e, "cannot read the host's PIFs; the NBD servers' answers will tell whether they offer TLS");
            return vec![NbdPurpose::Unknown; infos.len()];
        }
    };
    let mut known: std::collections::HashMap<String, NbdPurpose> = Default::default();
    let mut out = Vec::with_capacity(infos.len());
    for info in infos {
        let Some(net) = network_of_address(&pifs, &info.address) else {
            out.push(NbdPurpose::Unknown);
            continue;
        };
        if !known.contains_key(&net) {
            let p = match xapi
                .call("network.get_record", vec![serde_json::json!(net)])
                .await
            {
                Ok(rec) => purpose_of(&rec),
                Err(e) => {
                    tracing::info!(error = %e, network = %net, "cannot read the network's purpose");
                    NbdPurpose::Unknown
                }
            };
            known.insert(net.clone(), p);
        }
        out.push(known.get(&net).cloned().unwrap_or(NbdPurpose::Unknown));
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn fetch(
    repo: &Repository,
    lock: &WriteLock,
    xapi: &Xapi,
    opts: &BackupOptions,
    snap: &VdiRecord,
    snap_ref: &str,
    req: &ImportRequest,
    say: &dyn Fn(Event),
    warnings: &mut Vec<String>,
) -> Result<(import::ImportReport, &'static str), BackupError> {
    let infos = xapi.nbd_info(snap_ref).await?;
    let progress = |d: u64, t: u64| say(Event::Blocks(&req.vdi, d, t));
    if infos.is_empty() {
        let w = format!(
            "the host has no NBD network, so VDI {} is read through /export_raw_vdi (slower, one stream); enable NBD: xe network-param-set uuid=<network> purpose=nbd",
            req.vdi
        );
        say(Event::Warning(&w));
        warnings.push(w);
        let r = import_http(repo, lock, xapi, snap, req, progress).await?;
        return Ok((r, "export_raw_vdi"));
    }
    let purposes = nbd_purposes(xapi, &infos).await;
    // One record per address the host has on an NBD network: connections are spread over
    // those that answer, and one that fails mid-run is replaced through the others.
    let mut targets = Vec::with_capacity(infos.len());
    for (info, purpose) in infos.iter().zip(&purposes) {
        let target = resolve_nbd_target(info, purpose, opts.allow_plain_nbd).await?;
        if target.trust.is_none() {
            let why = match purpose {
                NbdPurpose::Insecure { .. } => "the host's network is insecure_nbd",
                _ => "the NBD server does not offer TLS",
            };
            let w = format!(
                "NBD without TLS at {}:{} ({why}): disk data crosses the network unencrypted",
                info.address, info.port
            );
            say(Event::Warning(&w));
            warnings.push(w);
        }
        targets.push(target);
    }
    let pool = match Pool::open_many(targets.clone(), opts.fetch).await {
        Ok(pool) => pool,
        Err(e) => {
            // A record on an `nbd` network whose server speaks plain text is named as such.
            for ((info, purpose), target) in infos.iter().zip(&purposes).zip(&targets) {
                if *purpose == NbdPurpose::Nbd
                    && let Err(crate::nbd::NbdError::NoTls { .. }) =
                        crate::nbd::client::Client::connect(target, 1).await
                {
                    nbd_target(info, purpose, opts.allow_plain_nbd, true)?;
                }
            }
            return Err(ImportError::Nbd(e).into());
        }
    };
    let notes = pool.notes();
    let said = notes.lock().map(|n| n.len()).unwrap_or(0);
    for n in notes.lock().map(|n| n.clone()).unwrap_or_default() {
        say(Event::Warning(&n));
        warnings.push(n);
    }
    // The export must be the snapshot, whole: a server stating another size (or none) must
    // never make a short or empty point that then replaces the data.
    if pool.info.size != snap.virtual_size {
        let (what, stated) = (pool.target().describe(), pool.info.size);
        pool.close().await;
        return Err(BackupError::Refused(format!(
            "the NBD export {what} is {stated} bytes but snapshot {} of VDI {} is {} bytes; nothing was committed (is the NBD server the host's?)",
            snap.uuid, req.vdi, snap.virtual_size
        )));
    }
    let r = import::import_nbd(repo, lock, req, pool, progress).await;
    // What happened to the connections while fetching (said once each, success or not).
    for n in notes
        .lock()
        .map(|n| n.iter().skip(said).cloned().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        say(Event::Warning(&n));
        warnings.push(n);
    }
    Ok((r?, "nbd"))
}

/// Read the snapshot through `/export_raw_vdi`; an increment keeps only the bitmap's blocks.
async fn import_http(
    repo: &Repository,
    lock: &WriteLock,
    xapi: &Xapi,
    snap: &VdiRecord,
    req: &ImportRequest,
    mut progress: impl FnMut(u64, u64),
) -> Result<import::ImportReport, BackupError> {
    let size = snap.virtual_size;
    let marked = import::marked_blocks(req, blocks_for(size))?;
    let mut resp = xapi.export_raw_vdi(&snap.uuid, size).await?;
    let mut w = import::begin(
        repo,
        lock,
        req,
        size,
        "export_raw_vdi".into(),
        marked.is_none(),
    )?;
    let (take, record_zeros) = import::plan(marked.as_ref(), w.previous(), size);
    let total = blocks_for(size);
    let mut block = Vec::with_capacity(BLOCK_SIZE as usize);
    let mut b = 0u64;
    let mut received = 0u64;
    let short = |received: u64, why: String| {
        BackupError::Xapi(XapiError::Http {
            what: format!("export_raw_vdi of VDI {}", snap.uuid),
            status: 200,
            body: format!(
                "the transfer ended after {received} of {size} bytes ({why}); nothing was committed"
            ),
        })
    };
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            // xapi's body is close-delimited and its TLS stream may end without a
            // close_notify: once every byte of the VDI arrived, that error is the end.
            Err(e) if received == size => {
                tracing::debug!(error = %crate::xapi::client::error_chain(e), "export_raw_vdi: every byte arrived; the connection ended without close_notify");
                break;
            }
            Err(e) if e.is_timeout() => {
                return Err(BackupError::Xapi(XapiError::Timeout {
                    host: xapi.host().to_string(),
                    call: format!(
                        "export_raw_vdi of VDI {} (after {received} of {size} bytes)",
                        snap.uuid
                    ),
                    secs: xapi.timeout().as_secs(),
                }));
            }
            Err(e) => return Err(short(received, crate::xapi::client::error_chain(e))),
        };
        let mut data = &chunk[..];
        while !data.is_empty() {
            if b >= total {
                // A host sending more than the VDI holds is not trusted with any of it.
                return Err(BackupError::Xapi(XapiError::Http {
                    what: format!("export_raw_vdi of VDI {}", snap.uuid),
                    status: 200,
                    body: format!("the host sent more than the VDI's {size} bytes"),
                }));
            }
            // b < total, so b * BLOCK_SIZE < size: neither operation can wrap.
            let block_len = BLOCK_SIZE.min(size - b * BLOCK_SIZE) as usize;
            let n = (block_len - block.len()).min(data.len());
            block.extend_from_slice(&data[..n]);
            data = &data[n..];
            received += n as u64;
            if block.len() == block_len {
                if take.contains(b as u32) && (record_zeros || !crate::is_zero(&block)) {
                    w.add_block(b, &block)?;
                }
                block.clear();
                b += 1;
                if b.is_multiple_of(64) {
                    progress(b, total);
                }
            }
        }
    }
    if received != size {
        return Err(short(received, "the host closed the connection".into()));
    }
    progress(total, total);
    let manifest = w.commit()?;
    Ok(import::ImportReport {
        manifest,
        // The whole disk crossed the network.
        blocks_read: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P: &str = "10.0.0.5:10809";

    #[test]
    fn nbd_security_follows_the_purpose_then_the_server() {
        use NbdPurpose::*;
        use NbdSecurity::*;
        let insecure = Insecure {
            network: Some("net-uuid".into()),
        };
        // (purpose, --allow-plain-nbd, cert present, server refused STARTTLS) → decision.
        let ok = [
            (Nbd, false, true, false, Tls),
            (Nbd, true, true, false, Tls),
            (insecure.clone(), true, true, false, Plain),
            (insecure.clone(), true, false, false, Plain),
            (Unknown, false, true, false, Tls),
            (Unknown, true, true, false, Tls),
            (Unknown, true, true, true, Plain),
            (Unknown, true, false, false, Plain),
        ];
        for (purpose, allow, cert, refused, want) in ok {
            assert_eq!(
                nbd_security(&purpose, allow, cert, refused, P),
                Ok(want),
                "{purpose:?} allow={allow} cert={cert} refused={refused}"
            );
        }
        let refusals = [
            (Nbd, true, true, true, "purpose is nbd"),
            (Nbd, false, false, false, "no certificate"),
            (insecure.clone(), false, true, false, "--allow-plain-nbd"),
            (Unknown, false, true, true, "--allow-plain-nbd"),
            (Unknown, false, false, false, "--allow-plain-nbd"),
        ];
        for (purpose, allow, cert, refused, says) in refusals {
            let e = nbd_security(&purpose, allow, cert, refused, P).unwrap_err();
            assert!(e.contains(says), "{purpose:?}: {e}");
            assert!(e.contains(P), "{e}");
        }
        let e = nbd_security(&insecure, false, true, false, P).unwrap_err();
        assert!(
            e.contains("xe network-param-set uuid=net-uuid purpose=nbd"),
            "{e}"
        );
        let e = nbd_security(&Unknown, false, true, true, P).unwrap_err();
        assert!(
            e.contains("uuid=<network-uuid>") && e.contains("xe network-list"),
            "{e}"
        );
    }

    #[test]
    fn a_record_becomes_a_pinned_or_plain_target() {
        let info = NbdInfo {
            address: "10.0.0.5".into(),
            port: 10809,
            exportname: "/vdi?session_id=OpaqueRef:s".into(),
            cert: "-----BEGIN CERTIFICATE-----".into(),
            subject: "host".into(),
        };
        let t = nbd_target(&info, &NbdPurpose::Nbd, false, false).unwrap();
        assert!(matches!(t.trust, Some(Trust::Pinned { .. })));
        let t = nbd_target(&info, &NbdPurpose::Insecure { network: None }, true, false).unwrap();
        assert!(t.trust.is_none());
        assert!(nbd_target(&info, &NbdPurpose::Insecure { network: None }, false, false).is_err());
    }

    #[test]
    fn the_pif_holding_an_address_names_the_network() {
        let pifs = json!({
            "OpaqueRef:p1": {"IP": "10.0.0.5", "IPv6": [], "network": "OpaqueRef:n1", "currently_attached": true},
            "OpaqueRef:p2": {"IP": "", "IPv6": ["fd00::7/64", ""], "network": "OpaqueRef:n2", "currently_attached": true},
            "OpaqueRef:p3": {"IP": "10.0.0.9", "IPv6": [], "network": "OpaqueRef:n3", "currently_attached": false},
        });
        assert_eq!(
            network_of_address(&pifs, "10.0.0.5").as_deref(),
            Some("OpaqueRef:n1")
        );
        assert_eq!(
            network_of_address(&pifs, "fd00::7").as_deref(),
            Some("OpaqueRef:n2")
        );
        assert_eq!(
            network_of_address(&pifs, "[fd00:0::7]").as_deref(),
            Some("OpaqueRef:n2")
        );
        assert_eq!(network_of_address(&pifs, "10.0.0.9"), None, "not attached");
        assert_eq!(network_of_address(&pifs, "10.0.0.6"), None);
        assert_eq!(network_of_address(&json!("junk"), "10.0.0.5"), None);
        assert_eq!(purpose_of(&json!({"purpose": ["nbd"]})), NbdPurpose::Nbd);
        assert_eq!(
            purpose_of(&json!({"purpose": ["insecure_nbd"], "uuid": "u"})),
            NbdPurpose::Insecure {
                network: Some("u".into())
            }
        );
        assert_eq!(purpose_of(&json!({"purpose": []})), NbdPurpose::Unknown);
        assert_eq!(purpose_of(&json!({})), NbdPurpose::Unknown);
    }
}
