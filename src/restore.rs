//! `cbtfs restore`: a restore point back into a host, as the guide's "Restoring a VDI" does it,
//! without the coalesced temporary copy: the point's bytes stream straight from the chain into
//! `PUT /import_raw_vdi` (exact Content-Length, never chunked), a few MiB in flight.
//!
//! Into an existing VDI (same size, not attached to a running VM) or a new one (`VDI.create` in
//! the SR given, the point's size, type user), optionally with a new VM made from the VM
//! metadata saved with the point (`/import_metadata`, its disk mapped to the restored VDI).
//! Afterwards the VDI's size is checked and, where the host offers NBD, a sample of blocks is
//! read back and compared.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use crate::backup::{Event, HostAccess};
use crate::read::PointReader;
use crate::repo::{RepoError, Repository};
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
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub host: HostAccess,
    pub target: RestoreTarget,
    /// Also create a VM from the point's saved VM metadata, using the restored VDI.
    pub new_vm: bool,
    /// Skip the read-back comparison.
    pub no_verify: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub point: String,
    pub vdi: String,
    pub created_vdi: bool,
    pub bytes: u64,
    pub seconds: f64,
    /// Blocks read back from the host and compared (0: not possible on this host).
    pub verified_blocks: u64,
    pub vm: Option<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Xapi(#[from] XapiError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
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

/// Restore point `seq` of `set` into the host.
pub async fn run(
    repo: &Repository,
    set: &crate::repo::SetHistory,
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
    let (mut xapi, _) = crate::backup::connect(repo, &opts.host, say).await?;
    let r = restore_logged_in(repo, &xapi, &reader, opts, say).await;
    xapi.logout().await;
    r
}

async fn restore_logged_in(
    repo: &Repository,
    xapi: &Xapi,
    reader: &Arc<PointReader>,
    opts: &RestoreOptions,
    say: &dyn Fn(Event),
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let m = &reader.manifest;
    let size = m.virtual_size;
    let mut warnings = Vec::new();
    let (vdi_ref, created) = match &opts.target {
        RestoreTarget::Existing(uuid) => {
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
            (r, false)
        }
        RestoreTarget::New { sr, name } => {
            let sr_ref = xapi.sr_by_uuid(sr).await?;
            let label = name.clone().unwrap_or_else(|| {
                format!(
                    "{} (restored {})",
                    m.disk_name,
                    crate::timefmt::rfc3339(m.time)
                )
            });
            // The original's type (backups record it); `user` for imported points.
            let kind = m.vdi_type.as_deref().unwrap_or("user");
            let r = xapi.vdi_create(&sr_ref, &label, size, kind).await?;
            (r, true)
        }
    };
    let vdi = xapi.vdi_record(&vdi_ref).await?.uuid;
    if created {
        say(Event::Info(&format!("created VDI {vdi}")));
    }
    upload(xapi, reader, &vdi, say).await?;

    // The final check: size, then a sample read back where the host serves NBD.
    let rec = xapi.vdi_record(&vdi_ref).await?;
    if rec.virtual_size != size {
        return Err(RestoreError::Refused(format!(
            "VDI {vdi} reports {} bytes after the restore, not {size}",
            rec.virtual_size
        )));
    }
    let mut verified = 0;
    if !opts.no_verify {
        match xapi.nbd_info(&vdi_ref).await {
            Ok(infos) if infos.first().is_some_and(|i| i.cert.trim().is_empty()) => {
                let w = "the host offers NBD only without TLS: the restored data was not read back (only its size was checked)".to_string();
                say(Event::Warning(&w));
                warnings.push(w);
            }
            Ok(infos) if !infos.is_empty() => {
                verified = read_back(&infos, reader, &vdi).await?;
            }
            Ok(_) => {
                let w = "the host has no NBD network: the restored data was not read back (only its size was checked)".to_string();
                say(Event::Warning(&w));
                warnings.push(w);
            }
            Err(e) => {
                let w = format!("could not read the restored VDI back: {e}");
                say(Event::Warning(&w));
                warnings.push(w);
            }
        }
    }
    let vm = if opts.new_vm {
        Some(import_vm(xapi, repo, reader, &vdi).await?)
    } else {
        None
    };
    Ok(RestoreReport {
        point: m.label(),
        vdi,
        created_vdi: created,
        bytes: size,
        seconds: started.elapsed().as_secs_f64(),
        verified_blocks: verified,
        vm,
        warnings,
    })
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

/// Read a sample of the restored VDI over NBD and compare it with the point.
async fn read_back(
    infos: &[NbdInfo],
    reader: &Arc<PointReader>,
    vdi: &str,
) -> Result<u64, RestoreError> {
    // Plain NBD is not used for the check either: without TLS the read-back is skipped.
    let target = crate::backup::nbd_target(&infos[0], false)
        .map_err(|e| RestoreError::Refused(format!("reading VDI {vdi} back: {e}")))?;
    let opts = crate::nbd::FetchOptions {
        connections: 1,
        ..Default::default()
    };
    let mut pool = crate::nbd::Pool::open(target, opts)
        .await
        .map_err(|e| RestoreError::Refused(format!("reading VDI {vdi} back: {e}")))?;
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
    Ok(checked)
}

/// Create a VM from the point's saved metadata, its disk mapped to `vdi`.
async fn import_vm(
    xapi: &Xapi,
    repo: &Repository,
    reader: &PointReader,
    vdi: &str,
) -> Result<String, RestoreError> {
    let m = &reader.manifest;
    let meta = repo
        .read_vm_metadata(m)?
        .ok_or_else(|| RestoreError::Refused(format!("point {} has no VM metadata", m.label())))?;
    let task = xapi
        .task_create("cbtfs restore: import VM metadata")
        .await?;
    let result = xapi
        .import_metadata(&task, &[(m.vdi.as_str(), vdi)], meta)
        .await;
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
