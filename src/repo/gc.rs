//! Garbage collection: delete what no point references, repack what is mostly dead.
//!
//! Runs under the exclusive lock, so no writer is live (and no chunk a running backup is about
//! to reference can be deleted: writers hold the shared lock for their whole run, and a new
//! writer refreshes its chunk index when it begins a point). Steps, each safe
//! to interrupt at any moment:
//!
//! 1. Delete manifests no reader sees (older generations, points a dead prune superseded).
//! 2. Mark: every chunk id named by any point index. A manifest or index that cannot be read
//!    stops gc before anything is deleted: what it references is unknown.
//! 3. Sweep per pack: packs with no live chunk are dead; packs whose live bytes fall below the
//!    threshold are repacked (their live records copied, still sealed, into new packs); packs in
//!    no chunk index (a killed writer's) are orphans.
//! 4. New packs are put, then new chunk index objects listing every live chunk, then the old
//!    index objects are deleted, then dead, repacked and orphan packs, then point indexes and
//!    VM metadata no manifest names. A crash before the old index objects go leaves duplicates
//!    (both valid); after, only unreferenced objects, which the next gc deletes.
//! 5. Remove the records of dead writers (`Repository::collect_dead_writers`): what they left
//!    is collected.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::chunkindex::{self, CINDEX_PREFIX};
use super::crypto::ChunkId;
use super::pack::{self, ChunkLocation, PackId, PackWriter};
use super::store::s3::lock::{LockMaintenance, extend_locks, reclaim};
use super::{ExclusiveLock, META, PINDEX, RepoError, Repository, Result};

/// Packs whose live bytes are below this share of their records are repacked (percent).
pub const DEFAULT_REPACK_BELOW: u8 = 50;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    pub manifests_deleted: u64,
    pub packs_before: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub packs_written: u64,
    /// Bytes of the packs before.
    pub bytes_before: u64,
    /// Bytes of every object deleted: dead and repacked packs, replaced chunk index objects,
    /// point indexes and VM metadata no manifest names.
    pub bytes_freed: u64,
    /// Bytes of every object written: new packs and chunk index objects.
    pub bytes_written: u64,
    pub live_chunks: u64,
    pub objects_deleted: u64,
    pub dry_run: bool,
    /// On a repository with Object Lock: locks extended, versions reclaimed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<LockMaintenance>,
}

#[derive(Default)]
struct PackUse {
    len: u64,
    live: Vec<(ChunkId, ChunkLocation)>,
    live_bytes: u64,
    dead_bytes: u64,
}

/// Collect garbage. `repack_below`: percent (0 disables repacking).
pub fn gc(
    repo: &Repository,
    lock: &ExclusiveLock,
    repack_below: u8,
    dry_run: bool,
) -> Result<GcReport> {
    // Object Lock: extend the locks running out before deleting anything; never repack (it
    // frees nothing while the old packs are locked); reclaim expired versions last.
    let locked = repo.header.object_lock.zip(repo.store().s3());
    let lock_err = |e| {
        RepoError::io(
            "maintain the Object Lock retention of",
            repo.describe(""),
            e,
        )
    };
    let mut maintenance = LockMaintenance::default();
    let repack_below = if locked.is_some() { 0 } else { repack_below };
    if let Some((l, s3)) = locked.filter(|_| !dry_run) {
        extend_locks(s3, l, &mut maintenance).map_err(lock_err)?;
    }
    // 1.
    let manifests_deleted = if dry_run {
        0
    } else {
        repo.clean_all_orphans(lock)?.len() as u64
    };
    let (live, live_objects) = mark(repo)?;
    let mut report = sweep(repo, &live, Some(&live_objects), repack_below, dry_run)?;
    report.manifests_deleted = manifests_deleted;
    if let Some((l, s3)) = locked.filter(|_| !dry_run) {
        reclaim(s3, l, &mut maintenance).map_err(lock_err)?;
    }
    if !dry_run {
        // Everything dead writers left is collected: their records can go.
        repo.forget_dead_writers(lock)?;
    }
    report.object_lock = locked.map(|_| maintenance);
    Ok(report)
}

/// What a gc would delete now, without a lock and without deleting anything (prune's
/// message when it must leave the gc for later). It may count packs a running writer has put
/// and not indexed yet.
pub fn pending(repo: &Repository) -> Result<GcReport> {
    let (live, live_objects) = mark(repo)?;
    sweep(repo, &live, Some(&live_objects), 0, true)
}

/// What gc would free and write if exactly the chunks `live` (sorted, deduplicated) and the
/// point index and VM metadata objects `live_objects` were referenced (prune's dry run). Its
/// byte counts are exact: the repacked packs and the new chunk index objects are laid out as
/// `gc` would lay them out, only not sealed or written.
pub fn plan(
    repo: &Repository,
    live: &[ChunkId],
    live_objects: &HashSet<String>,
    repack_below: u8,
) -> Result<GcReport> {
    sweep(repo, live, Some(live_objects), repack_below, true)
}

/// Every object under `prefix`, with its length.
fn object_sizes(repo: &Repository, prefix: &str) -> Result<HashMap<String, u64>> {
    Ok(repo
        .store()
        .list(prefix)
        .map_err(|e| RepoError::io("list", repo.describe(prefix), e))?
        .into_iter()
        .map(|o| (o.key, o.len))
        .collect())
}

/// Bytes a pack of `count` records of `records` bytes takes (`PackWriter::finish`'s layout).
fn pack_len(records: u64, count: u64, seal_overhead: u64) -> u64 {
    records
        + 4
        + count * pack::TRAILER_ENTRY_LEN as u64
        + seal_overhead
        + pack::PACK_TAIL_LEN as u64
}

/// Bytes of the chunk index objects `write_index` makes of `entries` (chunk id, pack number),
/// sorted by id without repeats (`encode_cindex_body`'s layout, sealed).
fn cindex_len(entries: &[(ChunkId, u64)], seal_overhead: u64) -> u64 {
    entries
        .chunks(chunkindex::FLUSH_ENTRIES)
        .map(|part| {
            let packs: HashSet<u64> = part.iter().map(|e| e.1).collect();
            chunkindex::CINDEX_HEAD_LEN as u64
                + 16 * packs.len() as u64
                + chunkindex::ENTRY_LEN as u64 * part.len() as u64
                + seal_overhead
        })
        .sum()
}

/// Mark (step 2): every chunk any point references (sorted), and the index and metadata
/// objects that manifests name.
fn mark(repo: &Repository) -> Result<(Vec<ChunkId>, HashSet<String>)> {
    let damaged = repo.damaged_manifests()?;
    if let Some(d) = damaged.first() {
        return Err(RepoError::Invalid(format!(
            "gc stopped before deleting anything: {} point manifest(s) cannot be read ({}: {}), and the data they reference is unknown; run `cbtfs verify`, and delete what it names as damaged before collecting garbage",
            damaged.len(),
            d.location,
            d.message
        )));
    }
    let mut live: Vec<ChunkId> = Vec::new();
    let mut live_objects: HashSet<String> = HashSet::new();
    for disk in repo.catalog()? {
        for set in &disk.sets {
            for m in &set.points {
                let p = repo.open_point(m).map_err(|e| {
                    RepoError::Invalid(format!(
                        "gc stopped before deleting anything: the index of point {} cannot be read ({e})",
                        m.label()
                    ))
                })?;
                live.extend(p.index.ids().chunks_exact(32).map(|c| {
                    let mut id = [0u8; 32];
                    id.copy_from_slice(c);
                    ChunkId(id)
                }));
                live_objects.insert(m.index.key.clone());
                if let Some(v) = &m.vm_metadata {
                    live_objects.insert(v.key.clone());
                }
            }
            if !set.problems.is_empty() {
                return Err(RepoError::Invalid(format!(
                    "gc stopped before deleting anything: set {} of disk {} is damaged ({}: {}); run `cbtfs verify`",
                    set.id, disk.vdi, set.problems[0].location, set.problems[0].message
                )));
            }
        }
    }
    live.sort_unstable();
    live.dedup();
    Ok((live, live_objects))
}

/// Sweep and delete (steps 3 and 4).
fn sweep(
    repo: &Repository,
    live: &[ChunkId],
    live_objects: Option<&HashSet<String>>,
    repack_below: u8,
    dry_run: bool,
) -> Result<GcReport> {
    let mut report = GcReport {
        dry_run,
        live_chunks: live.len() as u64,
        ..Default::default()
    };
    let is_live = |id: &ChunkId| live.binary_search(id).is_ok();

    // 3. Sweep.
    let store = repo.store().clone();
    let ci = repo.chunk_index()?.clone();
    ci.refresh()?;
    if let Some((loc, why)) = ci.problems().first() {
        return Err(RepoError::Invalid(format!(
            "gc stopped before deleting anything: chunk index object {loc} is damaged ({why}); run `cbtfs verify`"
        )));
    }
    let mut packs: BTreeMap<PackId, PackUse> = BTreeMap::new();
    let mut listed_packs = Vec::new();
    for o in store
        .list("packs/")
        .map_err(|e| RepoError::io("list", repo.describe("packs/"), e))?
    {
        if let Some(id) = PackId::from_key(&o.key) {
            report.packs_before += 1;
            report.bytes_before += o.len;
            packs.entry(id).or_default().len = o.len;
            listed_packs.push(id);
        }
    }
    let mut indexed: HashSet<PackId> = HashSet::new();
    let mut taken: HashSet<ChunkId> = HashSet::new();
    ci.for_each(&mut |id, loc| {
        indexed.insert(loc.pack);
        let u = packs.entry(loc.pack).or_default();
        if is_live(id) && taken.insert(*id) {
            u.live.push((*id, *loc));
            u.live_bytes += u64::from(loc.len);
        } else {
            u.dead_bytes += u64::from(loc.len);
        }
    });
    if let Some(missing) = live.iter().find(|id| !taken.contains(id)) {
        return Err(RepoError::Invalid(format!(
            "gc stopped before deleting anything: chunk {missing} is referenced but in no pack index; run `cbtfs verify`"
        )));
    }
    let mut dead: Vec<PackId> = Vec::new();
    let mut repack: Vec<PackId> = Vec::new();
    for (id, u) in &packs {
        if !indexed.contains(id) || u.live.is_empty() {
            dead.push(*id);
        } else if repack_below > 0
            && u.dead_bytes > 0
            && u.live_bytes * 100 < (u.live_bytes + u.dead_bytes) * u64::from(repack_below)
        {
            repack.push(*id);
        }
    }
    // Objects no manifest names.
    let mut stray_objects = Vec::new();
    for prefix in live_objects.map_or(&[][..], |_| &[PINDEX, META][..]) {
        for o in store
            .list(prefix)
            .map_err(|e| RepoError::io("list", repo.describe(prefix), e))?
        {
            if !live_objects.is_some_and(|l| l.contains(&o.key)) {
                stray_objects.push((o.key, o.len));
            }
        }
    }
    let index_changed = !dead.is_empty() || !repack.is_empty();
    let cindex_sizes = object_sizes(repo, CINDEX_PREFIX)?;
    let cindex_bytes: u64 = ci
        .objects()
        .iter()
        .filter_map(|k| cindex_sizes.get(k))
        .sum();
    if dry_run {
        // The same layout as below, counted instead of written: repacked records go into new
        // packs in this order, cut at PACK_TARGET; the index lists every live chunk.
        let overhead = repo.keys().seal(b"gc plan", &[]).len() as u64;
        let mut numbers: BTreeMap<PackId, u64> = BTreeMap::new();
        for (n, id) in packs.keys().enumerate() {
            numbers.insert(*id, n as u64);
        }
        let mut next = numbers.len() as u64;
        let mut entries: Vec<(ChunkId, u64)> = Vec::new();
        let (mut records, mut count) = (0u64, 0u64);
        for id in &repack {
            let Some(u) = packs.get(id) else { continue };
            for (cid, loc) in &u.live {
                records += u64::from(loc.len);
                count += 1;
                entries.push((*cid, next));
                if records >= pack::PACK_TARGET as u64 {
                    report.packs_written += 1;
                    report.bytes_written += pack_len(records, count, overhead);
                    (records, count, next) = (0, 0, next + 1);
                }
            }
            report.packs_repacked += 1;
            report.bytes_freed += u.len;
        }
        if records > 0 {
            report.packs_written += 1;
            report.bytes_written += pack_len(records, count, overhead);
        }
        for id in &dead {
            report.packs_deleted += 1;
            report.bytes_freed += packs.get(id).map(|u| u.len).unwrap_or(0);
        }
        if index_changed {
            let repacked: HashSet<PackId> = repack.iter().copied().collect();
            for (id, u) in &packs {
                if !repacked.contains(id) && indexed.contains(id) {
                    let n = numbers.get(id).copied().unwrap_or(0);
                    entries.extend(u.live.iter().map(|(cid, _)| (*cid, n)));
                }
            }
            entries.sort_unstable_by_key(|e| e.0);
            report.bytes_written += cindex_len(&entries, overhead);
            report.bytes_freed += cindex_bytes;
        }
        report.objects_deleted = stray_objects.len() as u64;
        report.bytes_freed += stray_objects.iter().map(|o| o.1).sum::<u64>();
        return Ok(report);
    }

    // 4. Repack, then re-index, then delete.
    let mut moved: Vec<(ChunkId, ChunkLocation)> = Vec::new();
    let mut writer: Option<PackWriter> = None;
    let put_pack = |w: PackWriter,
                    report: &mut GcReport,
                    moved: &mut Vec<(ChunkId, ChunkLocation)>|
     -> Result<()> {
        let (id, bytes, entries) = w.finish(repo.keys());
        let key = id.key();
        store
            .put(&key, &bytes)
            .map_err(|e| RepoError::io("write", repo.describe(&key), e))?;
        report.packs_written += 1;
        report.bytes_written += bytes.len() as u64;
        moved.extend(entries);
        Ok(())
    };
    for id in &repack {
        let Some(u) = packs.get(id) else { continue };
        let key = id.key();
        let bytes = store
            .get(&key)
            .map_err(|e| RepoError::io("read", repo.describe(&key), e))?;
        for (cid, loc) in &u.live {
            let start = loc.offset as usize;
            let Some(rec) = bytes.get(start..start + loc.len as usize) else {
                return Err(RepoError::corrupt(
                    repo.describe(&key),
                    format!("chunk {cid} lies past the end of the pack"),
                ));
            };
            let w = match &mut writer {
                Some(w) => w,
                None => writer.insert(
                    PackWriter::new()
                        .map_err(|e| RepoError::Invalid(format!("no randomness: {e}")))?,
                ),
            };
            w.add(*cid, rec);
            if w.len() >= pack::PACK_TARGET
                && let Some(w) = writer.take()
            {
                put_pack(w, &mut report, &mut moved)?;
            }
        }
        report.packs_repacked += 1;
        report.bytes_freed += u.len;
    }
    if let Some(w) = writer.take()
        && !w.is_empty()
    {
        put_pack(w, &mut report, &mut moved)?;
    }
    if index_changed {
        let repacked: HashSet<PackId> = repack.iter().copied().collect();
        let mut entries: Vec<(ChunkId, ChunkLocation)> = moved;
        for (id, u) in &packs {
            if !repacked.contains(id) && indexed.contains(id) && !u.live.is_empty() {
                entries.extend(u.live.iter().copied());
            }
        }
        let old = ci.objects();
        let new = chunkindex::write_index(store.as_ref(), repo.keys(), entries)?;
        let sizes = object_sizes(repo, CINDEX_PREFIX)?;
        report.bytes_written += new.iter().filter_map(|k| sizes.get(k)).sum::<u64>();
        for key in old {
            repo.delete(&key)?;
        }
        report.bytes_freed += cindex_bytes;
        ci.refresh()?;
    }
    for id in &dead {
        repo.delete(&id.key())?;
        report.packs_deleted += 1;
        report.bytes_freed += packs.get(id).map(|u| u.len).unwrap_or(0);
    }
    for id in &repack {
        repo.delete(&id.key())?;
    }
    for (key, len) in &stray_objects {
        repo.delete(key)?;
        report.bytes_freed += len;
    }
    report.objects_deleted = stray_objects.len() as u64;
    tracing::info!(
        packs_deleted = report.packs_deleted,
        packs_repacked = report.packs_repacked,
        bytes_freed = report.bytes_freed,
        "gc done"
    );
    Ok(report)
}
