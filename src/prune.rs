//! `cbtfs prune`: retention with restic's vocabulary (`--keep-last`, `--keep-daily`,
//! `--keep-weekly`, `--keep-monthly`), keeping every kept point byte-identical.
//!
//! Prune never rewrites data; it writes metadata:
//! * a kept point right after another kept point (or the base) is not touched;
//! * a kept point after dropped ones gets a new index that takes over the entries it still
//!   needs from them: for every block that changed since the previous kept point (every block,
//!   for a new base; plus the disk's tail when a dropped point had shrunk the disk), the chunk
//!   the original chain resolves it to, or a zero record. Its bytes are exactly the kept
//!   point's. It is committed as a new generation of its manifest whose parent skips the
//!   dropped points;
//! * then the dropped points' manifests are deleted (the newest first, so a crash never leaves
//!   a chain with a hole), and `gc` deletes the chunks nothing references any more.
//!
//! A crash at any moment leaves every kept point readable with the same bytes: a new generation
//! hides the points it skips (see `Repository::assemble_set`) and the next writer deletes them.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::naming::Tree;
use crate::read::PointReader;
use crate::repo::crypto::ChunkId;
use crate::repo::gc::{self, GcReport};
use crate::repo::{
    DiskWriteLock, ObjRef, PointManifest, RepoError, Repository, SetHistory, index, manifest,
};
use crate::{BLOCK_SIZE, blocks_for};

/// Which points to keep. A point is kept if any rule keeps it.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Policy {
    /// The newest N points.
    pub last: usize,
    /// The newest point of each of the newest N hours (UTC) that have points.
    pub hourly: usize,
    /// The newest point of each of the newest N days (UTC) that have points.
    pub daily: usize,
    /// The newest point of each of the newest N ISO weeks that have points.
    pub weekly: usize,
    /// The newest point of each of the newest N months that have points.
    pub monthly: usize,
    /// The newest point of each of the newest N years that have points.
    pub yearly: usize,
    /// Every point at most this many seconds older than the disk's newest point (measured
    /// from the newest point, not the clock, so a disk whose backups stopped keeps its last
    /// ones).
    pub within: Option<u64>,
}

fn date(t: i64) -> time::Date {
    time::OffsetDateTime::from_unix_timestamp(t)
        .map(|d| d.date())
        .unwrap_or(time::Date::MIN)
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.last == 0
            && self.hourly == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
            && self.yearly == 0
            && self.within.is_none()
    }

    /// Which of `times` (ascending) to keep.
    pub fn keep(&self, times: &[i64]) -> Vec<bool> {
        let n = times.len();
        let mut keep = vec![false; n];
        for k in keep.iter_mut().rev().take(self.last) {
            *k = true;
        }
        let mut bucket = |count: usize, key: &dyn Fn(i64) -> (i32, u32)| {
            let mut left = count;
            let mut last = None;
            for i in (0..n).rev() {
                if left == 0 {
                    break;
                }
                let k = key(times[i]);
                if last != Some(k) {
                    keep[i] = true;
                    left -= 1;
                    last = Some(k);
                }
            }
        };
        bucket(self.hourly, &|t| {
            // Hours since the epoch, split to fit the key.
            let h = t.div_euclid(3600);
            ((h >> 32) as i32, h as u32)
        });
        bucket(self.daily, &|t| (date(t).year(), date(t).ordinal() as u32));
        bucket(self.weekly, &|t| {
            let (y, w, _) = date(t).to_iso_week_date();
            (y, w as u32)
        });
        bucket(self.monthly, &|t| (date(t).year(), date(t).month() as u32));
        bucket(self.yearly, &|t| (date(t).year(), 0));
        if let (Some(within), Some(&newest)) = (self.within, times.last()) {
            let from = newest.saturating_sub(i64::try_from(within).unwrap_or(i64::MAX));
            for (k, &t) in keep.iter_mut().zip(times) {
                *k |= t >= from;
            }
        }
        keep
    }
}

/// What prune does (or would do) to one disk.
#[derive(Debug, Clone, Serialize)]
pub struct DiskOutcome {
    pub vdi: String,
    pub disk: String,
    pub vm: Option<String>,
    pub kept: usize,
    pub removed: usize,
    /// Kept points whose metadata took over removed ones' entries.
    pub rewritten: usize,
    pub sets_removed: usize,
    /// Labels (`VDI@TIME`) of the points removed.
    pub removed_points: Vec<String>,
    /// The disk's folder, `VM/DISK`, as `ls` and the mount show it.
    pub disk_path: String,
    /// Canonical names (`VM/DISK/SET/POINT`) of the points removed, in `removed_points`' order.
    pub removed_paths: Vec<String>,
    /// Sets left alone because they are damaged (`cbtfs verify` tells more).
    pub skipped_sets: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub policy: Policy,
    pub disks: Vec<DiskOutcome>,
    /// Bytes the repository's objects take before and after (after the garbage collection
    /// that follows, when it runs; a dry run estimates it).
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Bytes of new metadata (indexes, manifests) written: prune never rewrites data.
    pub bytes_written: u64,
    /// The garbage collection that ran after (or would run, in a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc: Option<GcReport>,
    /// The garbage collection left for later because writers were running (it needs the
    /// exclusive lock, and prune never waits for other disks' transfers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc_deferred: Option<GcDeferred>,
    /// Disks not pruned because another process was writing them: (VDI uuid, holder).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub busy_disks: Vec<(String, String)>,
}

/// A garbage collection prune could not run yet.
#[derive(Debug, Clone, Serialize)]
pub struct GcDeferred {
    /// Objects a gc would delete now (packs and indexes no point references; it may include
    /// packs the running writers have put and not indexed yet).
    pub objects: u64,
    /// The running writers, as they name themselves.
    pub running: Vec<String>,
}

impl GcDeferred {
    /// "N objects left for a later gc: K backups are running".
    pub fn describe(&self) -> String {
        format!(
            "{} object{} left for a later gc: {} backup{} running ({})",
            self.objects,
            if self.objects == 1 { "" } else { "s" },
            self.running.len(),
            if self.running.len() == 1 {
                " is"
            } else {
                "s are"
            },
            self.running.join("; ")
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("{0}")]
    Refused(String),
    #[error("reading point {point} to rewrite it: {detail}; nothing was changed in its set")]
    Read { point: String, detail: String },
}

/// Bytes of every object in the repository.
fn repository_bytes(repo: &Repository) -> Result<u64, PruneError> {
    let all = repo
        .store()
        .list("")
        .map_err(|e| RepoError::io("list", repo.store().describe(""), e))?;
    Ok(all.iter().map(|o| o.len).sum())
}

/// Apply `policy` to every disk (or just `only`), then collect garbage unless `no_gc`.
pub fn prune(
    repo: &Repository,
    policy: Policy,
    only: Option<&str>,
    dry_run: bool,
    no_gc: bool,
) -> Result<PruneReport, PruneError> {
    if policy.is_empty() {
        return Err(PruneError::Refused(
            "this policy keeps no point at all; give at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly"
                .into(),
        ));
    }
    // Writers of other disks go on: prune holds the shared lock and, while it drops a disk's
    // points, that disk's lock. Deleting data (gc) needs the exclusive lock: deferred while
    // writers run.
    let shared = repo.lock_shared("cbtfs prune")?;
    let mut report = PruneReport {
        dry_run,
        policy,
        disks: Vec::new(),
        bytes_before: repository_bytes(repo)?,
        bytes_after: 0,
        bytes_written: 0,
        gc: None,
        gc_deferred: None,
        busy_disks: Vec::new(),
    };
    // What the dry run counts to say exactly what the real run leaves.
    let mut tally = Tally {
        sizes: object_sizes(repo, crate::repo::POINTS)?,
        seal_overhead: repo.keys().seal(b"prune", &[]).len() as u64,
        ..Tally::default()
    };
    // Leftovers of an interrupted prune go first (per disk, under its lock, below).
    if dry_run {
        for key in repo.stale_manifests()? {
            tally.deleted += tally.sizes.get(&key).copied().unwrap_or(0);
        }
    }
    // Names as the mount shows them before the prune (the removed points are in it).
    let tree = Tree::build(repo.catalog()?);
    for listed in repo.catalog()? {
        let vdi = listed.vdi.clone();
        let selected = only.is_none_or(|o| o == vdi);
        // A disk that loses points is locked, then read again: a backup may have added one.
        let wants_lock = !dry_run && selected && {
            let n: Vec<i64> = listed
                .sets
                .iter()
                .flat_map(|s| s.points.iter().map(|m| m.time))
                .collect();
            policy.keep(&n).iter().any(|k| !k)
        };
        let disk_lock = if wants_lock {
            match shared.lock_disk(&vdi, "cbtfs prune") {
                Ok(l) => Some(l),
                Err(RepoError::Locked { holder, .. }) if only.is_none() => {
                    tracing::warn!(%vdi, %holder, "disk not pruned: it is being written");
                    report.busy_disks.push((vdi.clone(), holder));
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let disk = match &disk_lock {
            Some(l) => {
                repo.clean_orphans(l, &vdi)?;
                repo.disk(&vdi)?
            }
            None => listed,
        };
        let Some(newest) = disk.newest().cloned() else {
            continue;
        };
        let all: Vec<&PointManifest> = disk.sets.iter().flat_map(|s| s.points.iter()).collect();
        let times: Vec<i64> = all.iter().map(|m| m.time).collect();
        let keep = policy.keep(&times);
        let keep: Vec<bool> = if selected && (dry_run || disk_lock.is_some()) {
            keep
        } else {
            vec![true; all.len()]
        };
        let mut outcome = DiskOutcome {
            vdi: vdi.clone(),
            disk: newest.disk_name.clone(),
            vm: newest.vm_name.clone(),
            kept: keep.iter().filter(|k| **k).count(),
            removed: keep.iter().filter(|k| !**k).count(),
            rewritten: 0,
            sets_removed: 0,
            removed_points: all
                .iter()
                .zip(&keep)
                .filter(|(_, k)| !**k)
                .map(|(m, _)| m.label())
                .collect(),
            skipped_sets: Vec::new(),
            disk_path: tree.disk_path(&vdi).unwrap_or_else(|| vdi.clone()),
            removed_paths: Vec::new(),
        };
        let mut i = 0;
        for set in &disk.sets {
            let flags = &keep[i..i + set.points.len()];
            i += set.points.len();
            if !set.problems.is_empty() {
                // Points after the damage are not even listed: taking them over would lose
                // them. Their chunks stay referenced (gc refuses to run on a damaged set).
                outcome.skipped_sets.push(set.id.clone());
                outcome.kept += flags.iter().filter(|k| !**k).count();
                outcome.removed -= flags.iter().filter(|k| !**k).count();
                if dry_run {
                    tally.live.extend(chunks_of(repo, &set.points)?);
                    for m in &set.points {
                        tally.keep_objects(m, true);
                    }
                }
                continue;
            }
            if flags.iter().all(|k| !*k) {
                outcome.sets_removed += 1;
            } else {
                outcome.rewritten += rewrites(flags);
            }
            if flags.iter().all(|k| *k) && !dry_run {
                continue; // nothing to do, and no lock taken
            }
            let lock: Option<&dyn DiskWriteLock> = disk_lock.as_ref().map(|l| l as _);
            retire(repo, lock, set, flags, dry_run, &mut tally)?;
        }
        drop(disk_lock);
        if !selected {
            continue;
        }
        outcome.removed_points.retain(|l| {
            !disk
                .sets
                .iter()
                .filter(|s| outcome.skipped_sets.contains(&s.id))
                .any(|s| s.points.iter().any(|p| p.label() == *l))
        });
        outcome.removed_paths = outcome
            .removed_points
            .iter()
            .map(|l| {
                tree.find_label(l)
                    .map_or_else(|| l.clone(), |m| tree.name_of(m))
            })
            .collect();
        report.disks.push(outcome);
    }
    drop(shared);
    report.bytes_written = tally.written;
    if dry_run {
        // Exact: the metadata prune writes and deletes, then what gc frees and writes.
        let mut after = (report.bytes_before + tally.written).saturating_sub(tally.deleted);
        if !no_gc {
            tally.live.sort_unstable();
            tally.live.dedup();
            let plan = gc::plan(
                repo,
                &tally.live,
                &tally.live_objects,
                gc::DEFAULT_REPACK_BELOW,
            )?;
            after = (after + plan.bytes_written).saturating_sub(plan.bytes_freed);
            report.gc = Some(plan);
        }
        report.bytes_after = after;
    } else {
        if !no_gc {
            match repo.try_lock_exclusive("cbtfs prune (gc)")? {
                Some(lock) => {
                    report.gc = Some(gc::gc(repo, &lock, gc::DEFAULT_REPACK_BELOW, false)?);
                }
                None => {
                    let pending = gc::pending(repo)?;
                    let d = GcDeferred {
                        objects: pending.packs_deleted + pending.objects_deleted,
                        running: repo.running_writers()?,
                    };
                    tracing::info!("{}", d.describe());
                    report.gc_deferred = Some(d);
                }
            }
        }
        report.bytes_after = repository_bytes(repo)?;
    }
    Ok(report)
}

/// Every object under `prefix`, with its length.
fn object_sizes(repo: &Repository, prefix: &str) -> Result<HashMap<String, u64>, PruneError> {
    Ok(repo
        .store()
        .list(prefix)
        .map_err(|e| RepoError::io("list", repo.store().describe(prefix), e))?
        .into_iter()
        .map(|o| (o.key, o.len))
        .collect())
}

/// The metadata bytes prune writes and deletes, and (for a dry run) what the kept points will
/// reference, so that the dry run's `bytes_after` is exactly the real run's.
#[derive(Default)]
struct Tally {
    /// Lengths of the manifests before.
    sizes: HashMap<String, u64>,
    /// Bytes sealing adds to a blob.
    seal_overhead: u64,
    /// Bytes of new point indexes and manifests.
    written: u64,
    /// Bytes of manifests deleted.
    deleted: u64,
    /// Chunks the kept points will reference (dry run).
    live: Vec<ChunkId>,
    /// Point index and VM metadata objects the kept points will name (dry run).
    live_objects: HashSet<String>,
}

impl Tally {
    /// Point `m` is kept; `index`: with the index it has now (not a new one).
    fn keep_objects(&mut self, m: &PointManifest, index: bool) {
        if index {
            self.live_objects.insert(m.index.key.clone());
        }
        if let Some(v) = &m.vm_metadata {
            self.live_objects.insert(v.key.clone());
        }
    }
    fn delete(&mut self, m: &PointManifest) {
        self.deleted += self.sizes.get(&m.key()).copied().unwrap_or(0);
    }
}

/// Every chunk id the points' indexes name.
fn chunks_of(repo: &Repository, points: &[PointManifest]) -> Result<Vec<ChunkId>, PruneError> {
    let mut out = Vec::new();
    for m in points {
        out.extend(repo.open_point(m)?.index.chunk_ids());
    }
    Ok(out)
}

/// Kept points whose metadata changes: those right after a dropped point.
fn rewrites(flags: &[bool]) -> usize {
    (1..flags.len())
        .filter(|&k| flags[k] && !flags[k - 1])
        .count()
}

/// Drop the points of `set` that `flags` does not keep (in a dry run, only count). `tally`
/// gets the metadata bytes written and deleted and (dry run) what the kept points reference.
fn retire(
    repo: &Repository,
    lock: Option<&dyn DiskWriteLock>,
    set: &SetHistory,
    flags: &[bool],
    dry_run: bool,
    tally: &mut Tally,
) -> Result<(), PruneError> {
    if !dry_run {
        match lock {
            Some(l) => l.check_disk(&set.vdi)?,
            None => {
                return Err(PruneError::Refused(format!(
                    "internal: pruning disk {} without its lock (a bug in cbtfs: please report it)",
                    set.vdi
                )));
            }
        }
    }
    let mut previous_kept: Option<usize> = None;
    for (k, m) in set.points.iter().enumerate() {
        if !flags[k] {
            continue;
        }
        let unchanged = match previous_kept {
            None => k == 0,
            Some(p) => p + 1 == k,
        };
        if unchanged {
            if dry_run {
                tally.live.extend(repo.open_point(m)?.index.chunk_ids());
                tally.keep_objects(m, true);
            }
        } else {
            let from = previous_kept.map_or(0, |p| p + 1);
            let parent = previous_kept.map(|p| set.points[p].id.clone());
            let (changed, data, ids) = take_over(repo, set, from, k, parent.is_none())?;
            let index = if dry_run {
                tally.live.extend(ids.chunks_exact(32).map(|c| {
                    let mut id = [0u8; 32];
                    id.copy_from_slice(c);
                    ChunkId(id)
                }));
                tally.keep_objects(m, false);
                // A key of the same length as the one `put_index` draws.
                let plain = index::encode(m.virtual_size, &changed, &data, &ids);
                ObjRef {
                    key: format!("{}{}", crate::repo::PINDEX, "0".repeat(32)),
                    len: plain.len() as u64 + tally.seal_overhead,
                }
            } else {
                repo.put_index(m.virtual_size, &changed, &data, &ids)?
            };
            tally.written += index.len;
            let mut nm = m.clone();
            nm.generation = m.generation.checked_add(1).ok_or_else(|| {
                PruneError::Refused(format!("point {} was rewritten too often", m.label()))
            })?;
            nm.parent = parent;
            nm.changed_blocks = changed.len();
            nm.data_blocks = data.len();
            nm.index = index;
            tally.written += manifest::encode(&nm).len() as u64 + tally.seal_overhead;
            tally.delete(m);
            if !dry_run {
                // The commit: from here on the dropped points below it are superseded.
                repo.put_manifest(&nm)?;
                repo.delete(&m.key())?;
            }
        }
        previous_kept = Some(k);
    }
    // Newest first: a crash midway leaves a shorter chain, never one with a hole.
    for (k, m) in set.points.iter().enumerate().rev() {
        if !flags[k] {
            tally.delete(m);
            if !dry_run {
                repo.delete(&m.key())?;
            }
        }
    }
    Ok(())
}

/// The index point `k` of `set` gets when it absorbs points `from..k`: for every block those
/// points changed (every block, for a new base; plus the disk's tail where one of them had
/// shrunk the disk), the chunk the original chain resolves it to, or a zero record (a base
/// records no zeros). Pure metadata: no block is read.
fn take_over(
    repo: &Repository,
    set: &SetHistory,
    from: usize,
    k: usize,
    base: bool,
) -> Result<(roaring::RoaringBitmap, roaring::RoaringBitmap, Vec<u8>), PruneError> {
    let reader = PointReader::open(repo, set, k as u32)?;
    let take = blocks_to_write(repo, set, from, k, base)?;
    let runs = reader.map().runs();
    let mut changed = roaring::RoaringBitmap::new();
    let mut data = roaring::RoaringBitmap::new();
    let mut ids: Vec<u8> = Vec::new();
    let mut r = 0usize;
    for b in take.iter() {
        while r < runs.len() && u64::from(runs[r].start) + u64::from(runs[r].len) <= u64::from(b) {
            r += 1;
        }
        let stored = runs.get(r).filter(|run| run.start <= b);
        match stored {
            Some(run) => {
                let layer = reader.layer(run.layer as usize);
                let entry = run.first_entry as usize + (b - run.start) as usize;
                let id =
                    layer
                        .and_then(|l| l.index.entry(entry))
                        .ok_or_else(|| PruneError::Read {
                            point: set.points[k].label(),
                            detail: format!("block {b} has no index entry in the chain"),
                        })?;
                changed.insert(b);
                data.insert(b);
                ids.extend_from_slice(&id.0);
            }
            None => {
                if !base {
                    changed.insert(b);
                }
            }
        }
    }
    Ok((changed, data, ids))
}

/// The blocks point `k` of `set` must hold when absorbing points `from..k`: every block of a
/// new base; otherwise every block those points changed, plus the disk's tail where one of
/// them had shrunk the disk.
fn blocks_to_write(
    repo: &Repository,
    set: &SetHistory,
    from: usize,
    k: usize,
    base: bool,
) -> Result<roaring::RoaringBitmap, PruneError> {
    let m = &set.points[k];
    let size = m.virtual_size;
    let blocks = blocks_for(size);
    // Manifests are checked on read (sizes within the format), so this cannot fail; checked
    // anyway rather than truncated.
    let blocks32 = u32::try_from(blocks).map_err(|_| PruneError::Read {
        point: m.label(),
        detail: format!("{blocks} blocks is beyond the format's limit"),
    })?;
    let mut take = roaring::RoaringBitmap::new();
    if base {
        take.insert_range(0..blocks32);
        return Ok(take);
    }
    let points = set.points.get(from..=k).unwrap_or(&[]);
    for p in points {
        let sp = repo.open_point(p)?;
        take |= &sp.index.changed;
    }
    // Where a removed point had shrunk the disk, the old chain hid older data by size.
    let min_size = points.iter().map(|p| p.virtual_size).min().unwrap_or(size);
    if let Ok(kept) = u32::try_from(min_size / BLOCK_SIZE)
        && kept < blocks32
    {
        take.insert_range(kept..blocks32);
    }
    take.remove_range(blocks32..);
    Ok(take)
}

#[cfg(test)]
mod tests {
    use super::Policy;

    fn at(s: &str) -> i64 {
        crate::timefmt::parse(s).unwrap()
    }

    #[test]
    fn hourly_yearly_and_within_keep_what_they_say() {
        let times = [
            at("2024-06-01T10:00:00Z"),
            at("2025-03-01T10:00:00Z"),
            at("2025-12-31T23:00:00Z"),
            at("2026-01-01T09:10:00Z"),
            at("2026-01-01T09:50:00Z"),
            at("2026-01-01T10:05:00Z"),
            at("2026-01-01T10:40:00Z"),
        ];
        let p = Policy {
            hourly: 2,
            ..Policy::default()
        };
        assert_eq!(
            p.keep(&times),
            [false, false, false, false, true, false, true]
        );
        let p = Policy {
            yearly: 2,
            ..Policy::default()
        };
        assert_eq!(
            p.keep(&times),
            [false, false, true, false, false, false, true]
        );
        // Within 12 h of the newest point (10:40): 2025-12-31 23:00 is 11 h 40 min before.
        let p = Policy {
            within: Some(12 * 3600),
            ..Policy::default()
        };
        assert_eq!(p.keep(&times), [false, false, true, true, true, true, true]);
        assert!(!p.is_empty());
        assert!(Policy::default().is_empty());
        assert!(Policy::default().keep(&[]).is_empty());
    }
}
