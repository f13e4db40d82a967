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

use crate::host::{HostError, connect, open_nbd_pool};
use crate::import::{self, ImportError, ImportRequest};
use crate::nbd::FetchOptions;
use crate::repo::copy::{BlockCopy, READ_BLOCKS};
use crate::repo::journal::SnapshotJournal;
use crate::repo::{DiskWriteLock, RepoError, Repository, SharedLock};
use crate::xapi::{Failure, VdiRecord, Xapi, XapiError};
use crate::{BLOCK_SIZE, blocks_for, timefmt};

/// The other_config key that marks snapshots this repository made.
pub const TAG: &str = "cbtfs-repository";

/// How long `data_destroy`/`destroy` retry while the host still unplugs VBDs.
const IN_USE_WAIT: Duration = Duration::from_secs(60);

/// A backup's options and events name these (they live with the host connection).
pub use crate::host::{Event, HostAccess};

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
    /// Bytes the point added to the repository (new chunks, compressed and sealed).
    pub stored_bytes: u64,
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

/// A failure to reach the host or its NBD exports is the backup's, variant for variant.
impl From<HostError> for BackupError {
    fn from(e: HostError) -> Self {
        match e {
            HostError::Xapi(e) => BackupError::Xapi(e),
            HostError::Repo(e) => BackupError::Repo(e),
            HostError::Nbd(e) => BackupError::Import(ImportError::Nbd(e)),
            HostError::Refused(m) => BackupError::Refused(m),
        }
    }
}

/// Run a backup. The writers' shared lock is held for the whole run, each disk's lock while it
/// is backed up (other runs back up other disks meanwhile); at the end, what dead writers
/// left is collected if no writer is running (`Repository::collect_dead_writers`).
pub async fn run(
    repo: &Repository,
    opts: &BackupOptions,
    say: &dyn Fn(Event),
) -> Result<RunReport, BackupError> {
    let holder = format!("cbtfs backup from {}", opts.host.url);
    let lock = repo.lock_shared(&holder)?;
    let (mut xapi, pinned) = connect(repo, &opts.host, say).await?;
    let result = run_logged_in(repo, &lock, &xapi, opts, say).await;
    // Always log out: sessions are limited per user.
    xapi.logout().await;
    drop(lock);
    collect_dead_writers(repo, &holder, say);
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

/// Collect what dead writers left, if nobody else is writing (a warning if it fails: the
/// backup itself is done).
pub fn collect_dead_writers(repo: &Repository, holder: &str, say: &dyn Fn(Event)) {
    match repo.collect_dead_writers(holder) {
        Ok(crate::repo::Collection::Collected { writers, gc }) => tracing::info!(
            writers = writers.len(),
            packs = gc.packs_deleted,
            objects = gc.objects_deleted,
            "collected what killed writers left"
        ),
        Ok(crate::repo::Collection::Deferred { dead, running }) => tracing::info!(
            dead,
            running,
            "what killed writers left is collected by a later run: writers are running"
        ),
        Ok(crate::repo::Collection::NothingToDo) => {}
        Err(e) => say(Event::Warning(&format!(
            "could not collect what an interrupted writer left ({e}); `cbtfs gc` does it"
        ))),
    }
}

/// A disk to back up and what names it.
pub(crate) struct DiskTarget {
    pub(crate) vdi_ref: String,
    /// The VM's (uuid, name).
    pub(crate) vm: Option<(String, String)>,
    /// Its VBD's `userdevice` in that VM.
    pub(crate) userdevice: Option<String>,
    /// The VM's disks (VDI uuids), this one included.
    pub(crate) vm_disks: Vec<String>,
}

/// The VDI uuids of a VM's disks (VBDs of type Disk with a VDI), with each VBD's record.
pub(crate) async fn vm_disks(
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
    lock: &SharedLock,
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
    lock: &dyn DiskWriteLock,
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

/// Back up one disk (`run` names the backup run its point belongs to). Disks may be backed
/// up concurrently over one session and one lock (a job does).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn backup_disk(
    repo: &Repository,
    lock: &SharedLock,
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
    // This disk's lock, before its history is read: another run may be backing it up.
    let disk_lock = lock.lock_disk(
        &rec.uuid,
        &format!("cbtfs backup of VDI {} from {}", rec.uuid, opts.host.url),
    )?;
    let lock: &dyn DiskWriteLock = &disk_lock;
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
    // The point is committed: the new snapshot is the origin from now on. What is left to
    // tidy on the host cannot undo that (the VM may even have been deleted meanwhile): a
    // failure here is a warning, the next backup tidies again.
    match tidy_snapshots(
        xapi,
        &t.vdi_ref,
        &repo_id,
        Some(&snap.uuid),
        opts.keep_snapshot_data,
    )
    .await
    {
        Ok(ws) => {
            for w in ws {
                warn(w, &mut warnings);
            }
        }
        Err(e) => warn(
            format!(
                "the point of VDI {} is committed, but its snapshots on the host could not be tidied ({e}); the next backup tries again",
                rec.uuid
            ),
            &mut warnings,
        ),
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
        stored_bytes: m.stats.new_stored_bytes,
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

#[allow(clippy::too_many_arguments)]
async fn fetch(
    repo: &Repository,
    lock: &dyn DiskWriteLock,
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
    let pool = open_nbd_pool(
        xapi,
        &infos,
        opts.allow_plain_nbd,
        opts.fetch,
        &mut |w: String| {
            say(Event::Warning(&w));
            warnings.push(w);
        },
    )
    .await?;
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
    lock: &dyn DiskWriteLock,
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
    // The whole disk arrives in order; the blocks of `take` are kept, a run at a time.
    let mut copy = BlockCopy::new(&mut w, Some(&take), record_zeros, total, &mut progress);
    let run_bytes = (READ_BLOCKS * BLOCK_SIZE) as usize;
    let mut run = Vec::with_capacity(run_bytes);
    let mut first = 0u64;
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
        if chunk.len() as u64 > size - received {
            // A host sending more than the VDI holds is not trusted with any of it.
            return Err(BackupError::Xapi(XapiError::Http {
                what: format!("export_raw_vdi of VDI {}", snap.uuid),
                status: 200,
                body: format!("the host sent more than the VDI's {size} bytes"),
            }));
        }
        let mut data = &chunk[..];
        while !data.is_empty() {
            let n = (run_bytes - run.len()).min(data.len());
            run.extend_from_slice(&data[..n]);
            data = &data[n..];
            received += n as u64;
            // A full run, or the disk's end (its last block may be short).
            if run.len() == run_bytes || received == size {
                copy.put(first, &run)?;
                first += READ_BLOCKS;
                run.clear();
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
