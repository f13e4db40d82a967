//! `cbtfs restore`: a restore point back into a host, as the guide's "Restoring a VDI" does it,
//! without the coalesced temporary copy: the point's bytes stream straight from the chain into
//! `PUT /import_raw_vdi` (exact Content-Length, never chunked), a few MiB in flight.
//!
//! Into an existing VDI (same size, not attached to a running VM) or a new one (`VDI.create` in
//! the SR given, the point's size, the original's type). Whole VMs: with `--new-vm`, every disk
//! of the point's backup run (the points sharing its `vm_run` id, one per disk the VM had) goes
//! into a new VDI and one `/import_metadata` maps them all (`vdi:ORIG=NEW`) into a new VM made
//! from the VM metadata saved with the point; with `--to-vm`, every disk of the run overwrites
//! the matching disk of a halted VM (by VDI uuid when it is the VM backed up, else by
//! `userdevice`), after every check has passed. A run missing a disk of its VM is refused,
//! never filled in from another moment. Disks are restored one after another. Afterwards each
//! VDI's size is checked and, where the host offers NBD, a sample of blocks is read back and
//! compared.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use crate::host::{Event, HostAccess, NbdPurpose};
use crate::read::PointReader;
use crate::repo::{DiskHistory, PointManifest, RepoError, Repository, SetHistory};
use crate::xapi::{Failure, NbdInfo, Xapi, XapiError};
use crate::{BLOCK_SIZE, blocks_for};

/// Bytes per upload chunk; at most `CHUNKS_IN_FLIGHT` are buffered.
const CHUNK: usize = 4 << 20;
const CHUNKS_IN_FLIGHT: usize = 4;
/// Blocks read back over NBD after the upload (plus the first and the last).
const SAMPLE_BLOCKS: u64 = 64;

#[derive(Debug, Clone)]
pub enum RestoreTarget {
    /// Overwrite this VDI (uuid).
    Existing(String),
    /// Create a VDI in this SR (uuid), named so (default: the disk's name and the point's time).
    New { sr: String, name: Option<String> },
    /// Overwrite the disks of this halted VM (uuid) with every disk of the point's backup run.
    Vm(String),
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub host: HostAccess,
    pub target: RestoreTarget,
    /// Also create a VM from the point's saved VM metadata: every disk of the point's backup
    /// run is restored into a new VDI and mapped.
    pub new_vm: bool,
    /// Skip the read-back comparison.
    pub no_verify: bool,
}

/// One disk put back.
#[derive(Debug, Clone, Serialize)]
pub struct DiskRestored {
    /// `VDI@TIME`.
    pub point: String,
    /// The point's canonical name, `VM/DISK/SET/POINT`, as `ls` and the mount show it.
    pub path: String,
    /// The disk the point was taken from.
    pub from_vdi: String,
    /// Its position in the VM, as recorded at backup time.
    pub userdevice: Option<String>,
    /// The VDI written.
    pub vdi: String,
    pub created_vdi: bool,
    pub bytes: u64,
    pub verified_blocks: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The point asked for (`VDI@TIME`), and where it went (`disks` lists every disk restored).
    pub point: String,
    /// The point's canonical name, `VM/DISK/SET/POINT`.
    pub path: String,
    pub vdi: String,
    pub created_vdi: bool,
    /// Bytes written, all disks.
    pub bytes: u64,
    pub seconds: f64,
    /// Blocks read back from the host and compared, all disks (0: not possible on this host).
    pub verified_blocks: u64,
    pub vm: Option<String>,
    pub disks: Vec<DiskRestored>,
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Xapi(#[from] XapiError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error("{0}")]
    Refused(String),
    #[error(
        "the upload into VDI {vdi} stopped after {sent} of {size} bytes ({cause}): the VDI now holds a mix of old and restored data and must not be used; run the restore again"
    )]
    Interrupted {
        vdi: String,
        sent: u64,
        size: u64,
        cause: String,
    },
    #[error(
        "the restored VDI {vdi} differs from point {point} at block {block} when read back: do not use it; run the restore again and check the host's storage"
    )]
    Mismatch {
        vdi: String,
        point: String,
        block: u64,
    },
}

/// The points of a whole-VM restore: every disk of the VM the point's backup run took, ordered
/// by their place in the VM. A point recorded without its run (an older cbtfs) stands alone.
/// A disk of the VM without a point in that run is refused, named, with the newest run that
/// holds every disk suggested: a VM is never put together from different moments.
pub fn run_points(
    repo: &Repository,
    set: &SetHistory,
    seq: u32,
) -> Result<Vec<(SetHistory, u32)>, RestoreError> {
    let m = set
        .points
        .get(seq as usize)
        .ok_or_else(|| RestoreError::Refused(format!("set {} has no point {seq}", set.id)))?;
    let Some(run) = &m.vm_run else {
        return Ok(vec![(set.clone(), seq)]);
    };
    let mut disks = run.vm_disks.clone();
    if !disks.contains(&m.vdi) {
        disks.push(m.vdi.clone());
    }
    let histories: Vec<DiskHistory> = disks
        .iter()
        .map(|d| repo.disk(d))
        .collect::<Result<_, _>>()?;
    let find = |h: &DiskHistory, id: &str| -> Option<(SetHistory, u32)> {
        h.sets.iter().find_map(|s| {
            s.points
                .iter()
                .position(|p| p.vm_run.as_ref().is_some_and(|r| r.run == id))
                .and_then(|i| Some((s.clone(), u32::try_from(i).ok()?)))
        })
    };
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for h in &histories {
        match find(h, &run.run) {
            Some(p) => found.push(p),
            None => missing.push(match h.newest() {
                Some(p) => format!("{} ({})", h.vdi, p.disk_name),
                None => h.vdi.clone(),
            }),
        }
    }
    if !missing.is_empty() {
        // The newest run of this disk that holds every disk of the VM, to suggest.
        let complete = set
            .points
            .iter()
            .rev()
            .chain(
                histories
                    .iter()
                    .filter(|h| h.vdi == m.vdi)
                    .flat_map(|h| h.sets.iter().rev().flat_map(|s| s.points.iter().rev())),
            )
            .filter(|p| {
                p.vm_run
                    .as_ref()
                    .is_some_and(|r| r.vm_disks == run.vm_disks)
            })
            .find(|p| {
                let id = p.vm_run.as_ref().map(|r| r.run.as_str()).unwrap_or("");
                histories.iter().all(|h| find(h, id).is_some())
            })
            .map(|p| {
                format!(
                    "a point of a run that holds all of them, such as {}",
                    p.label()
                )
            })
            .unwrap_or_else(|| {
                "a point of a run that holds all of them (back up the whole VM with --vm)".into()
            });
        return Err(RestoreError::Refused(format!(
            "point {} was taken in a backup run that holds no point of disk {} of VM {}: the run failed for it, backed up one disk (--vdi), or its point was pruned. Restore {complete}, or this disk alone with --to-vdi or --new-vdi (without --new-vm)",
            m.label(),
            missing.join(", "),
            m.vm_name
                .as_deref()
                .unwrap_or(m.vm_uuid.as_deref().unwrap_or("?")),
        )));
    }
    found.sort_by_key(|(s, q)| {
        let p = s.points.get(*q as usize);
        let u = p.and_then(|p| p.vm_run.as_ref()?.userdevice.clone());
        (
            u.as_deref()
                .and_then(|u| u.parse::<u64>().ok())
                .unwrap_or(u64::MAX),
            u,
            p.map(|p| p.vdi.clone()),
        )
    });
    Ok(found)
}

/// Restore point `seq` of `set` into the host: that disk alone (`--to-vdi`, `--new-vdi`), or
/// every disk of its backup run (`--new-vm`, `--to-vm`), one after another.
pub async fn run(
    repo: &Repository,
    set: &SetHistory,
    seq: u32,
    opts: &RestoreOptions,
    say: &dyn Fn(Event),
) -> Result<RestoreReport, RestoreError> {
    let reader = Arc::new(PointReader::open(repo, set, seq)?);
    let m = reader.manifest.clone();
    if opts.new_vm && m.vm_metadata.is_none() {
        return Err(RestoreError::Refused(format!(
            "point {} has no VM metadata saved with it (it was imported, or the export failed): restore the disk without --new-vm and attach it to a VM by hand",
            m.label()
        )));
    }
    if opts.new_vm && !matches!(opts.target, RestoreTarget::New { .. }) {
        return Err(RestoreError::Refused(
            "a new VM needs new VDIs: give --new-vdi --sr UUID with --new-vm".into(),
        ));
    }
    let whole_vm = opts.new_vm || matches!(opts.target, RestoreTarget::Vm(_));
    let mut warnings = Vec::new();
    let readers = if whole_vm {
        if m.vm_run.is_none() {
            if let RestoreTarget::Vm(_) = opts.target {
                return Err(RestoreError::Refused(format!(
                    "point {} does not record its backup run and its place in the VM (taken by an older cbtfs, or imported): restore its disk with --to-vdi",
                    m.label()
                )));
            }
            let w = format!(
                "point {} does not record its backup run (taken by an older cbtfs): only its own disk is restored and mapped into the new VM",
                m.label()
            );
            say(Event::Warning(&w));
            warnings.push(w);
        }
        let mut v = Vec::new();
        for (s, q) in run_points(repo, set, seq)? {
            v.push(Arc::new(PointReader::open(repo, &s, q)?));
        }
        v
    } else {
        vec![reader.clone()]
    };
    let (mut xapi, _) = crate::host::connect(repo, &opts.host, say).await?;
    let r = restore_logged_in(repo, &xapi, &reader, &readers, opts, warnings, say).await;
    xapi.logout().await;
    let mut report = r?;
    // Name the points as the mount shows them.
    if let Ok(catalog) = repo.catalog() {
        let tree = crate::naming::Tree::build(catalog);
        report.path = tree.name_of(&m);
        for d in &mut report.disks {
            if let Some(p) = tree.find_label(&d.point) {
                d.path = tree.name_of(p);
            }
        }
    }
    Ok(report)
}

/// Where each disk goes: an existing VDI (checked) or a new one in an SR.
enum Dest {
    Existing(String),
    New { sr_ref: String, label: String },
}

/// Check that `uuid` can be overwritten with `m`: a disk (not a snapshot), the same size, not
/// attached. Returns its reference.
async fn check_existing(
    xapi: &Xapi,
    uuid: &str,
    m: &PointManifest,
) -> Result<String, RestoreError> {
    let size = m.virtual_size;
    let r = xapi.vdi_by_uuid(uuid).await?;
    let rec = xapi.vdi_record(&r).await?;
    if rec.is_a_snapshot || rec.kind == "cbt_metadata" {
        return Err(RestoreError::Refused(format!(
            "VDI {uuid} is a snapshot; restore into a disk or use --new-vdi"
        )));
    }
    if rec.virtual_size != size {
        return Err(RestoreError::Refused(format!(
            "VDI {uuid} is {} bytes but point {} is {size} bytes: resize the VDI (xe vdi-resize uuid={uuid} disk-size={size}) or restore with --new-vdi",
            rec.virtual_size,
            m.label()
        )));
    }
    for vbd in &rec.vbds {
        let b = xapi.vbd_record(vbd).await?;
        if b.currently_attached {
            let vm = xapi
                .vm_record(&b.vm)
                .await
                .map(|v| format!("{} ({})", v.name_label, v.uuid))
                .unwrap_or_else(|_| b.vm.clone());
            return Err(RestoreError::Refused(format!(
                "VDI {uuid} is attached to VM {vm}: shut the VM down (or unplug the disk) before overwriting it"
            )));
        }
    }
    Ok(r)
}

/// Match the run's points to the disks of the halted VM `vm_uuid`: by VDI uuid when it is the
/// VM that was backed up, else by position (`userdevice`). Every check passes before anything
/// is written.
async fn plan_to_vm(
    xapi: &Xapi,
    vm_uuid: &str,
    readers: &[Arc<PointReader>],
) -> Result<Vec<Dest>, RestoreError> {
    let vm_ref = xapi.vm_by_uuid(vm_uuid).await?;
    let vm = xapi.vm_record(&vm_ref).await?;
    if vm.is_a_snapshot || vm.is_a_template || vm.is_control_domain {
        return Err(RestoreError::Refused(format!(
            "{vm_uuid} is a snapshot, a template or the control domain, not a VM to restore into"
        )));
    }
    if vm.power_state != "Halted" {
        return Err(RestoreError::Refused(format!(
            "VM {} ({vm_uuid}) is {}: shut it down first (xe vm-shutdown uuid={vm_uuid}); its disks are overwritten only while it is halted",
            vm.name_label, vm.power_state
        )));
    }
    let mut disks = Vec::new();
    for vbd in &vm.vbds {
        let b = xapi.vbd_record(vbd).await?;
        if b.kind.eq_ignore_ascii_case("disk") && b.vdi != crate::xapi::NULL_REF {
            let uuid = xapi.vdi_record(&b.vdi).await?.uuid;
            disks.push((uuid, b.userdevice));
        }
    }
    let same_vm = readers
        .first()
        .is_some_and(|r| r.manifest.vm_uuid.as_deref() == Some(vm_uuid));
    let describe = |d: &[(String, String)]| {
        d.iter()
            .map(|(u, dev)| format!("{u} at userdevice {dev}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if disks.len() != readers.len() {
        return Err(RestoreError::Refused(format!(
            "VM {} ({vm_uuid}) has {} {} ({}) but the backup run of point {} holds {}: restore disks one by one with --to-vdi",
            vm.name_label,
            disks.len(),
            if disks.len() == 1 { "disk" } else { "disks" },
            describe(&disks),
            readers
                .first()
                .map(|r| r.manifest.label())
                .unwrap_or_default(),
            readers.len()
        )));
    }
    let mut plan = Vec::new();
    for r in readers {
        let m = &r.manifest;
        let dev = m.vm_run.as_ref().and_then(|v| v.userdevice.clone());
        let target = if same_vm {
            disks.iter().find(|(u, _)| *u == m.vdi)
        } else {
            match &dev {
                Some(d) => disks.iter().find(|(_, u)| u == d),
                None => {
                    return Err(RestoreError::Refused(format!(
                        "point {} does not record its disk's position in the VM, so it cannot be matched to a disk of another VM: restore it with --to-vdi",
                        m.label()
                    )));
                }
            }
        };
        let Some((uuid, _)) = target else {
            return Err(RestoreError::Refused(format!(
                "VM {} ({vm_uuid}) has no disk {} for point {} (its disks: {}): restore disks one by one with --to-vdi",
                vm.name_label,
                if same_vm {
                    m.vdi.clone()
                } else {
                    format!("at userdevice {}", dev.unwrap_or_default())
                },
                m.label(),
                describe(&disks)
            )));
        };
        check_existing(xapi, uuid, m).await?;
        plan.push(Dest::Existing(uuid.clone()));
    }
    Ok(plan)
}

async fn restore_logged_in(
    repo: &Repository,
    xapi: &Xapi,
    reader: &Arc<PointReader>,
    readers: &[Arc<PointReader>],
    opts: &RestoreOptions,
    mut warnings: Vec<String>,
    say: &dyn Fn(Event),
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let m = &reader.manifest;
    // Every check first: nothing is written before all pass.
    let plan: Vec<Dest> = match &opts.target {
        RestoreTarget::Existing(uuid) => {
            check_existing(xapi, uuid, m).await?;
            vec![Dest::Existing(uuid.clone())]
        }
        RestoreTarget::New { sr, name } => {
            let sr_ref = xapi.sr_by_uuid(sr).await?;
            readers
                .iter()
                .map(|r| {
                    let rm = &r.manifest;
                    let label = match name {
                        Some(n) if rm.vdi == m.vdi => n.clone(),
                        _ => format!(
                            "{} (restored {})",
                            rm.disk_name,
                            crate::timefmt::rfc3339(rm.time)
                        ),
                    };
                    Dest::New {
                        sr_ref: sr_ref.clone(),
                        label,
                    }
                })
                .collect()
        }
        RestoreTarget::Vm(vm) => plan_to_vm(xapi, vm, readers).await?,
    };
    // One disk after another (the simplest order; each upload streams at the host's pace).
    let mut done: Vec<DiskRestored> = Vec::new();
    for (r, dest) in readers.iter().zip(plan) {
        match restore_disk(xapi, r, dest, opts.no_verify, &mut warnings, say).await {
            Ok(d) => done.push(d),
            Err(e) => {
                forget_created(xapi, &done, say).await;
                return Err(e);
            }
        }
    }
    let vm = if opts.new_vm {
        let map: Vec<(String, String)> = done
            .iter()
            .map(|d| (d.from_vdi.clone(), d.vdi.clone()))
            .collect();
        match import_vm(xapi, repo, reader, &map).await {
            Ok(vm) => Some(vm),
            Err(e) => {
                forget_created(xapi, &done, say).await;
                return Err(e);
            }
        }
    } else {
        None
    };
    let main = done
        .iter()
        .find(|d| d.from_vdi == m.vdi)
        .or(done.first())
        .cloned()
        .ok_or_else(|| RestoreError::Refused("nothing was restored".into()))?;
    Ok(RestoreReport {
        point: m.label(),
        path: m.label(),
        vdi: main.vdi,
        created_vdi: main.created_vdi,
        bytes: done.iter().map(|d| d.bytes).sum(),
        seconds: started.elapsed().as_secs_f64(),
        verified_blocks: done.iter().map(|d| d.verified_blocks).sum(),
        vm,
        disks: done,
        warnings,
    })
}

/// A whole-VM restore that failed part-way: the VDIs it created hold nothing anyone uses.
async fn forget_created(xapi: &Xapi, done: &[DiskRestored], say: &dyn Fn(Event)) {
    for d in done.iter().filter(|d| d.created_vdi) {
        let r = match xapi.vdi_by_uuid(&d.vdi).await {
            Ok(r) => xapi.vdi_destroy(&r).await,
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            say(Event::Warning(&format!(
                "could not remove VDI {} that this restore created ({e}): remove it with `xe vdi-destroy uuid={}`",
                d.vdi, d.vdi
            )));
        }
    }
}

/// Put one point into its destination: create the VDI if asked, upload, check the size, read a
/// sample back.
async fn restore_disk(
    xapi: &Xapi,
    reader: &Arc<PointReader>,
    dest: Dest,
    no_verify: bool,
    warnings: &mut Vec<String>,
    say: &dyn Fn(Event),
) -> Result<DiskRestored, RestoreError> {
    let m = &reader.manifest;
    let size = m.virtual_size;
    let (vdi_ref, created) = match dest {
        Dest::Existing(uuid) => (xapi.vdi_by_uuid(&uuid).await?, false),
        Dest::New { sr_ref, label } => {
            // The original's type (backups record it); `user` for imported points.
            let kind = m.vdi_type.as_deref().unwrap_or("user");
            (xapi.vdi_create(&sr_ref, &label, size, kind).await?, true)
        }
    };
    let vdi = xapi.vdi_record(&vdi_ref).await?.uuid;
    if created {
        say(Event::Info(&format!("created VDI {vdi} for {}", m.label())));
    }
    let verified = match fill(xapi, reader, &vdi_ref, &vdi, no_verify, warnings, say).await {
        Ok(v) => v,
        Err(e) => {
            if created {
                // A new VDI with part of the point in it is of no use to anyone.
                let _ = xapi.vdi_destroy(&vdi_ref).await;
            }
            return Err(e);
        }
    };
    Ok(DiskRestored {
        point: m.label(),
        path: m.label(),
        from_vdi: m.vdi.clone(),
        userdevice: m.vm_run.as_ref().and_then(|r| r.userdevice.clone()),
        vdi,
        created_vdi: created,
        bytes: size,
        verified_blocks: verified,
    })
}

/// Upload, then check: size, and a sample read back where the host serves NBD.
async fn fill(
    xapi: &Xapi,
    reader: &Arc<PointReader>,
    vdi_ref: &str,
    vdi: &str,
    no_verify: bool,
    warnings: &mut Vec<String>,
    say: &dyn Fn(Event),
) -> Result<u64, RestoreError> {
    let size = reader.manifest.virtual_size;
    upload(xapi, reader, vdi, say).await?;
    let rec = xapi.vdi_record(vdi_ref).await?;
    if rec.virtual_size != size {
        return Err(RestoreError::Refused(format!(
            "VDI {vdi} reports {} bytes after the restore, not {size}",
            rec.virtual_size
        )));
    }
    let mut verified = 0;
    if !no_verify {
        match xapi.nbd_info(vdi_ref).await {
            Ok(infos) if !infos.is_empty() => {
                let purpose = crate::host::nbd_purposes(xapi, &infos[..1])
                    .await
                    .pop()
                    .unwrap_or(NbdPurpose::Unknown);
                match read_back(&infos[0], &purpose, reader, vdi).await? {
                    Some(n) => verified = n,
                    None => {
                        let w = "the host offers NBD only without TLS: the restored data was not read back (only its size was checked)".to_string();
                        say(Event::Warning(&w));
                        warnings.push(w);
                    }
                }
            }
            Ok(_) => {
                let w = "the host has no NBD network: the restored data was not read back (only its size was checked)".to_string();
                say(Event::Warning(&w));
                warnings.push(w);
            }
            Err(e) => {
                let w = format!("could not read the restored VDI {vdi} back: {e}");
                say(Event::Warning(&w));
                warnings.push(w);
            }
        }
    }
    Ok(verified)
}

/// Stream the point into `PUT /import_raw_vdi`.
async fn upload(
    xapi: &Xapi,
    reader: &Arc<PointReader>,
    vdi: &str,
    say: &dyn Fn(Event),
) -> Result<(), RestoreError> {
    let size = reader.size();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(CHUNKS_IN_FLIGHT);
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producer = {
        let (reader, sent) = (reader.clone(), sent.clone());
        tokio::task::spawn_blocking(move || {
            let mut off = 0u64;
            while off < size {
                let n = (size - off).min(CHUNK as u64) as usize;
                let mut buf = vec![0u8; n];
                let r = match reader.read_at(&mut buf, off) {
                    Ok(got) if got == n => Ok(Bytes::from(buf)),
                    Ok(got) => Err(std::io::Error::other(format!(
                        "short read of the point at {off}: {got} of {n} bytes"
                    ))),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                };
                let failed = r.is_err();
                if tx.blocking_send(r).is_err() || failed {
                    return;
                }
                off += n as u64;
                sent.store(off, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let progress = {
        let sent = sent.clone();
        async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let s = sent.load(std::sync::atomic::Ordering::Relaxed);
                say(Event::Blocks(vdi, s / BLOCK_SIZE, blocks_for(size)));
            }
        }
    };
    let result = tokio::select! {
        r = xapi.import_raw_vdi(vdi, stream, size) => r,
        _ = progress => unreachable!("the progress loop never ends"),
    };
    let _ = producer.await;
    say(Event::Blocks(vdi, blocks_for(size), blocks_for(size)));
    result.map_err(|e| RestoreError::Interrupted {
        vdi: vdi.to_string(),
        sent: sent.load(std::sync::atomic::Ordering::Relaxed).min(size),
        size,
        cause: e.to_string(),
    })
}

/// Read a sample of the restored VDI over NBD and compare it with the point: the number of
/// blocks checked, or None when the server speaks only plain text (an `insecure_nbd`
/// network, or a server that does not offer TLS): plain NBD is not used for the check.
async fn read_back(
    info: &NbdInfo,
    purpose: &NbdPurpose,
    reader: &Arc<PointReader>,
    vdi: &str,
) -> Result<Option<u64>, RestoreError> {
    let refused = |e: String| RestoreError::Refused(format!("reading VDI {vdi} back: {e}"));
    let target = match crate::host::nbd_target(info, purpose, false, false) {
        Ok(t) => t,
        Err(e) if *purpose == NbdPurpose::Nbd => return Err(refused(e.to_string())),
        Err(_) => return Ok(None),
    };
    let opts = crate::nbd::FetchOptions {
        connections: 1,
        ..Default::default()
    };
    let mut pool = match crate::nbd::Pool::open(target, opts).await {
        Ok(p) => p,
        Err(crate::nbd::NbdError::NoTls { .. }) if *purpose == NbdPurpose::Unknown => {
            return Ok(None);
        }
        Err(e) => return Err(refused(e.to_string())),
    };
    let size = reader.size();
    let blocks = blocks_for(size);
    let mut sample: Vec<u64> = vec![0, blocks.saturating_sub(1)];
    let mut x = crate::timefmt::now() as u64 | 1;
    for _ in 0..SAMPLE_BLOCKS.min(blocks) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sample.push(x % blocks.max(1));
    }
    sample.sort_unstable();
    sample.dedup();
    let extents: Vec<(u64, u64)> = sample
        .iter()
        .map(|&b| {
            let off = b * BLOCK_SIZE;
            (off, BLOCK_SIZE.min(size - off))
        })
        .collect();
    let mut mismatch = None;
    let mut checked = 0u64;
    let fetched = pool
        .fetch(&extents, |off, data| {
            let mut want = vec![0u8; data.len()];
            match reader.read_at(&mut want, off) {
                Ok(_) if want == data => {
                    checked += 1;
                    Ok(())
                }
                Ok(_) => {
                    mismatch = Some(off / BLOCK_SIZE);
                    Err("mismatch".into())
                }
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    pool.close().await;
    if let Some(block) = mismatch {
        return Err(RestoreError::Mismatch {
            vdi: vdi.to_string(),
            point: reader.manifest.label(),
            block,
        });
    }
    fetched.map_err(|e| RestoreError::Refused(format!("reading VDI {vdi} back: {e}")))?;
    Ok(Some(checked))
}

/// Create a VM from the point's saved metadata, its disks mapped as `map` says (original VDI
/// uuid → restored VDI uuid), all in one `/import_metadata`.
async fn import_vm(
    xapi: &Xapi,
    repo: &Repository,
    reader: &PointReader,
    map: &[(String, String)],
) -> Result<String, RestoreError> {
    let m = &reader.manifest;
    let meta = repo
        .read_vm_metadata(m)?
        .ok_or_else(|| RestoreError::Refused(format!("point {} has no VM metadata", m.label())))?;
    let task = xapi
        .task_create("cbtfs restore: import VM metadata")
        .await?;
    let pairs: Vec<(&str, &str)> = map.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let result = xapi.import_metadata(&task, &pairs, meta).await;
    let status = xapi.task_status(&task).await;
    let _ = xapi.task_destroy(&task).await;
    result?;
    let (state, value, error) = status?;
    if state != "success" {
        return Err(XapiError::Api(crate::xapi::ApiFailure {
            call: "import_metadata".into(),
            code: error.first().cloned().unwrap_or_else(|| state.clone()),
            params: error.iter().skip(1).cloned().collect(),
        })
        .into());
    }
    // The task's result is an XML-RPC value: the new VMs' references.
    let vm_ref = crate::xapi::xmlrpc::decode_value(&value)
        .ok()
        .and_then(|v| v.as_array()?.first()?.as_str().map(String::from))
        .ok_or_else(|| {
            RestoreError::Refused(format!(
                "import_metadata succeeded but its result names no VM: {value}"
            ))
        })?;
    let vm = xapi.vm_record(&vm_ref).await?;
    Ok(vm.uuid)
}

impl RestoreError {
    /// The host's failure, if this is one.
    pub fn failure(&self) -> Option<Failure> {
        match self {
            RestoreError::Xapi(e) => e.failure(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{NewPoint, VmRun};

    const A: &str = "00000000-0000-4000-8000-00000000000a";
    const B: &str = "00000000-0000-4000-8000-00000000000b";

    fn point(repo: &Repository, vdi: &str, time: i64, run: Option<(&str, &str)>) {
        let lock = repo.lock_exclusive("test").unwrap();
        let w = repo
            .begin_point(
                &lock,
                NewPoint {
                    vdi: vdi.into(),
                    disk_name: format!("disk-{}", &vdi[35..]),
                    vm_uuid: None,
                    vm_name: Some("vm".into()),
                    time,
                    virtual_size: BLOCK_SIZE,
                    source: "test".into(),
                    new_set: time == 100,
                    snapshot: None,
                    vm_metadata: None,
                    vdi_type: None,
                    vm_run: run.map(|(id, dev)| VmRun {
                        run: id.into(),
                        userdevice: Some(dev.into()),
                        vm_disks: vec![B.into(), A.into()],
                    }),
                },
            )
            .unwrap();
        w.commit().unwrap();
    }

    fn disks_of(got: &[(SetHistory, u32)]) -> Vec<(String, i64)> {
        got.iter()
            .map(|(s, q)| {
                let p = &s.points[*q as usize];
                (p.vdi.clone(), p.time)
            })
            .collect()
    }

    #[test]
    fn run_points_take_every_disk_of_the_run_in_vm_order_or_name_the_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::repo::testing::init(&dir.path().join("r"));
        // Run 1 took both disks (B at userdevice 0), run 2 only A, run 3 both again; an older
        // point without a run stands alone.
        point(&repo, A, 100, Some(("01", "1")));
        point(&repo, B, 100, Some(("01", "0")));
        point(&repo, A, 200, Some(("02", "1")));
        point(&repo, A, 300, Some(("03", "1")));
        point(&repo, B, 300, Some(("03", "0")));
        point(&repo, A, 400, None);
        let a = repo.disk(A).unwrap().sets[0].clone();
        let b = repo.disk(B).unwrap().sets[0].clone();
        let got = run_points(&repo, &a, 0).unwrap();
        assert_eq!(disks_of(&got), [(B.to_string(), 100), (A.to_string(), 100)]);
        let got = run_points(&repo, &b, 1).unwrap();
        assert_eq!(disks_of(&got), [(B.to_string(), 300), (A.to_string(), 300)]);
        let e = run_points(&repo, &a, 1).unwrap_err().to_string();
        assert!(e.contains(&format!("no point of disk {B} (disk-b)")), "{e}");
        assert!(e.contains("19700101T000500Z"), "suggests run 3: {e}");
        let got = run_points(&repo, &a, 3).unwrap();
        assert_eq!(disks_of(&got), [(A.to_string(), 400)]);
        assert!(run_points(&repo, &a, 9).is_err());
    }
}
