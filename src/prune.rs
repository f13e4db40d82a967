//! `cbtfs prune`: retention with restic's vocabulary (`--keep-last`, `--keep-daily`,
//! `--keep-weekly`, `--keep-monthly`), keeping every kept point byte-identical.
//!
//! A set loses points by being rebuilt beside itself and swapped in atomically:
//! * a kept point right after another kept point (or the base) keeps its objects, hard-linked;
//! * a kept point after dropped ones is rewritten to hold every block that changed since the
//!   previous kept point, read from the original chain (so its bytes are exactly the kept
//!   point's), plus the disk's tail when a dropped point had shrunk the disk (the old chain hid
//!   older data there by size; the new one must hide it by content);
//! * a dropped base makes the first kept point a full base.
//!
//! The rebuilt set lives in a `.prune-*` directory until `renameat2(RENAME_EXCHANGE)` swaps it
//! with the set; then the old set (now in the `.prune-*` directory) is deleted. A crash at any
//! moment leaves the old set or the new one, whole; the next writer deletes the leftover
//! directory and a rerun finishes the job. Readers that opened points before the swap keep
//! their open files (the mount opens every layer's data when it opens a point).

use serde::Serialize;

use crate::naming::Tree;
use crate::read::PointReader;
use crate::repo::copy::{CopyError, copy_blocks};
use crate::repo::{NewPoint, PointManifest, RepoError, Repository, SetHistory, WriteLock};
use crate::{BLOCK_SIZE, blocks_for};

/// Which points to keep. A point is kept if any rule keeps it.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Policy {
    /// The newest N points.
    pub last: usize,
    /// The newest point of each of the newest N days (UTC) that have points.
    pub daily: usize,
    /// The newest point of each of the newest N ISO weeks that have points.
    pub weekly: usize,
    /// The newest point of each of the newest N months that have points.
    pub monthly: usize,
}

fn date(t: i64) -> time::Date {
    time::OffsetDateTime::from_unix_timestamp(t)
        .map(|d| d.date())
        .unwrap_or(time::Date::MIN)
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.last == 0 && self.daily == 0 && self.weekly == 0 && self.monthly == 0
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
        bucket(self.daily, &|t| (date(t).year(), date(t).ordinal() as u32));
        bucket(self.weekly, &|t| {
            let (y, w, _) = date(t).to_iso_week_date();
            (y, w as u32)
        });
        bucket(self.monthly, &|t| (date(t).year(), date(t).month() as u32));
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
    /// Kept points rewritten to absorb removed ones.
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
    /// Bytes of point objects (data and index) before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
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

fn stored_bytes(points: &[PointManifest]) -> u64 {
    points
        .iter()
        .map(|m| m.data.len + m.index.len + m.vm_metadata.as_ref().map_or(0, |v| v.len))
        .sum()
}

/// Apply `policy` to every disk (or just `only`).
pub fn prune(
    repo: &Repository,
    policy: Policy,
    only: Option<&str>,
    dry_run: bool,
) -> Result<PruneReport, PruneError> {
    if policy.is_empty() {
        return Err(PruneError::Refused(
            "this policy keeps no point at all; give at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly"
                .into(),
        ));
    }
    let lock = repo.lock("cbtfs prune")?;
    let mut report = PruneReport {
        dry_run,
        policy,
        disks: Vec::new(),
        bytes_before: 0,
        bytes_after: 0,
    };
    // Names as the mount shows them before the prune (the removed points are in it).
    let tree = Tree::build(repo.catalog()?);
    for vdi in repo.disk_ids()? {
        if only.is_some_and(|o| o != vdi) {
            continue;
        }
        // Leftovers of an interrupted prune or import go first.
        if !dry_run {
            repo.clean_orphans(&lock, &vdi)?;
        }
        let disk = repo.disk(&vdi)?;
        let Some(newest) = disk.newest().cloned() else {
            continue;
        };
        let all: Vec<&PointManifest> = disk.sets.iter().flat_map(|s| s.points.iter()).collect();
        let times: Vec<i64> = all.iter().map(|m| m.time).collect();
        let keep = policy.keep(&times);
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
        report.bytes_before += stored_bytes(&all.iter().map(|m| (*m).clone()).collect::<Vec<_>>());
        let mut i = 0;
        for set in &disk.sets {
            let flags = &keep[i..i + set.points.len()];
            i += set.points.len();
            if !set.problems.is_empty() {
                // Points after the damage are not even listed: rewriting would lose them.
                outcome.skipped_sets.push(set.id.clone());
                outcome.kept += flags.iter().filter(|k| !**k).count();
                outcome.removed -= flags.iter().filter(|k| !**k).count();
                continue;
            }
            if flags.iter().all(|k| *k) {
                continue;
            }
            if flags.iter().all(|k| !*k) {
                outcome.sets_removed += 1;
                if !dry_run {
                    let aside = repo.retire_set(&lock, &vdi, &set.id)?;
                    repo.remove_tree(&aside)?;
                }
                continue;
            }
            outcome.rewritten += rewrites(flags);
            if !dry_run {
                rebuild_set(repo, &lock, set, flags)?;
            }
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
        report.bytes_after += if dry_run {
            estimate_after(repo, &disk.sets, &keep)?
        } else {
            stored_bytes(
                &repo
                    .disk(&vdi)?
                    .sets
                    .iter()
                    .flat_map(|s| s.points.iter().cloned())
                    .collect::<Vec<_>>(),
            )
        };
        report.disks.push(outcome);
    }
    Ok(report)
}

/// The bytes of point objects a disk's sets will hold after a prune keeping `keep` (flags over
/// all points of all sets, in order), computed from the manifests and bitmaps the way `fill`
/// and `rewrite` will write them: kept objects keep their lengths, a dropped set holds nothing,
/// and a rewritten point stores the blocks of its chain that read as non-zero among those it
/// will hold. Exact as long as every stored block has a non-zero byte within the disk (what
/// every cbtfs writer stores); a damaged set is left alone, so it counts as it is.
fn estimate_after(
    repo: &Repository,
    sets: &[SetHistory],
    keep: &[bool],
) -> Result<u64, PruneError> {
    let mut total = 0u64;
    let mut i = 0;
    for set in sets {
        let flags = keep.get(i..i + set.points.len()).unwrap_or(&[]);
        i += set.points.len();
        if !set.problems.is_empty() || flags.iter().all(|k| *k) {
            total += stored_bytes(&set.points);
            continue;
        }
        let mut previous_kept: Option<usize> = None;
        let mut new_seq = 0u32;
        for (k, m) in set.points.iter().enumerate() {
            if !flags.get(k).copied().unwrap_or(true) {
                continue;
            }
            let unchanged = match previous_kept {
                None => k == 0,
                Some(p) => p + 1 == k,
            };
            total += if unchanged {
                stored_bytes(std::slice::from_ref(m))
            } else {
                let from = previous_kept.map_or(0, |p| p + 1);
                rewritten_bytes(repo, set, from, k, new_seq == 0)?
            };
            previous_kept = Some(k);
            new_seq += 1;
        }
    }
    Ok(total)
}

/// The bytes `rewrite` will write for point `k` of `set` absorbing points `from..k`.
fn rewritten_bytes(
    repo: &Repository,
    set: &SetHistory,
    from: usize,
    k: usize,
    base: bool,
) -> Result<u64, PruneError> {
    let m = &set.points[k];
    let reader = PointReader::open(repo, set, k as u32)?;
    let take = blocks_to_write(repo, set, from, k, base)?;
    // Blocks of the point that read as non-zero: those its chain resolves to stored data.
    let mut nonzero = roaring::RoaringBitmap::new();
    for r in reader.map().runs() {
        nonzero.insert_range(r.start..r.start.saturating_add(r.len));
    }
    // A short last block reads only up to the disk's end: its stored bytes past the end (from
    // a layer when the disk was larger) do not count. One block read says whether it is zero.
    let size = m.virtual_size;
    let tail = size % BLOCK_SIZE;
    if let Ok(last) = u32::try_from(size / BLOCK_SIZE)
        && tail != 0
        && nonzero.contains(last)
    {
        let mut buf = vec![0u8; tail as usize];
        reader
            .read_at(&mut buf, size - tail)
            .map_err(|e| PruneError::Read {
                point: m.label(),
                detail: e.to_string(),
            })?;
        if crate::is_zero(&buf) {
            nonzero.remove(last);
        }
    }
    // Built as the writer builds them (one insert per block, ascending): the same containers,
    // so the same serialized length.
    let (mut changed, mut data) = (roaring::RoaringBitmap::new(), roaring::RoaringBitmap::new());
    for b in take.iter() {
        let stored = nonzero.contains(b);
        // A base records only what it stores; an increment records zero blocks too.
        if stored || !base {
            changed.insert(b);
        }
        if stored {
            data.insert(b);
        }
    }
    let vm = m.vm_metadata.as_ref().map_or(0, |v| v.len);
    Ok(data.len().saturating_mul(BLOCK_SIZE)
        + crate::repo::index::encoded_len(&changed, &data)
        + vm)
}

/// The blocks `rewrite` reads and writes for point `k` of `set` absorbing points `from..k`:
/// every block of a new base; otherwise every block those points changed, plus the disk's tail
/// where one of them had shrunk the disk.
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

/// Kept points that must be rewritten: those right after a dropped point.
fn rewrites(flags: &[bool]) -> usize {
    (1..flags.len())
        .filter(|&k| flags[k] && !flags[k - 1])
        .count()
}

/// Rebuild `set` keeping the points `flags` marks, then swap it in.
fn rebuild_set(
    repo: &Repository,
    lock: &WriteLock,
    set: &SetHistory,
    flags: &[bool],
) -> Result<(), PruneError> {
    let vdi = &set.points[0].vdi;
    let work = repo.prune_dir(lock, vdi, &set.id)?;
    let result = fill(repo, lock, set, flags, &work);
    if let Err(e) = result {
        let _ = repo.remove_tree(&work);
        return Err(e);
    }
    repo.exchange_set(lock, vdi, &set.id, &work)?;
    // `work` now holds the old set.
    repo.remove_tree(&work)?;
    Ok(())
}

fn fill(
    repo: &Repository,
    lock: &WriteLock,
    set: &SetHistory,
    flags: &[bool],
    work: &str,
) -> Result<(), PruneError> {
    let vdi = &set.points[0].vdi;
    let set_dir = crate::repo::set_key(vdi, &set.id);
    let mut previous_kept: Option<usize> = None;
    let mut new_seq = 0u32;
    for (k, m) in set.points.iter().enumerate() {
        if !flags[k] {
            continue;
        }
        let unchanged = match previous_kept {
            None => k == 0,
            Some(p) => p + 1 == k,
        };
        if unchanged {
            for name in [
                Some(&m.data.name),
                Some(&m.index.name),
                m.vm_metadata.as_ref().map(|v| &v.name),
            ]
            .into_iter()
            .flatten()
            {
                repo.link_object(&set_dir, work, name)?;
            }
            let mut nm = m.clone();
            nm.seq = new_seq;
            // Same bytes, same identity (the mount's inodes and caches follow it).
            nm.id = Some(m.point_id());
            repo.put_manifest(work, &nm)?;
        } else {
            let from = previous_kept.map_or(0, |p| p + 1);
            rewrite(repo, lock, set, from, k, new_seq, work)?;
        }
        previous_kept = Some(k);
        new_seq += 1;
    }
    Ok(())
}

/// Write point `k` of `set` as point `new_seq` of the rebuilt set, holding every block that
/// points `from..=k` changed (everything, for a new base), read from the original chain.
fn rewrite(
    repo: &Repository,
    lock: &WriteLock,
    set: &SetHistory,
    from: usize,
    k: usize,
    new_seq: u32,
    work: &str,
) -> Result<(), PruneError> {
    let m = &set.points[k];
    let read_err = |detail: String| PruneError::Read {
        point: m.label(),
        detail,
    };
    let reader = PointReader::open(repo, set, k as u32)?;
    let size = m.virtual_size;
    let base = new_seq == 0;
    let take = blocks_to_write(repo, set, from, k, base)?;
    let mut w = repo.writer_at(
        lock,
        work.to_string(),
        set.id.clone(),
        new_seq,
        None,
        NewPoint {
            vdi: m.vdi.clone(),
            disk_name: m.disk_name.clone(),
            vm_uuid: m.vm_uuid.clone(),
            vm_name: m.vm_name.clone(),
            time: m.time,
            virtual_size: size,
            source: m.source.clone(),
            new_set: base,
            snapshot: m.snapshot.clone(),
            vm_metadata: repo.read_vm_metadata(m)?,
            vdi_type: m.vdi_type.clone(),
            vm_run: m.vm_run.clone(),
        },
    )?;
    // The rewritten point holds the same bytes: it keeps its identity.
    w.keep_id(m.point_id());
    let mut chain = |buf: &mut [u8], off: u64| match reader.read_at(buf, off) {
        Ok(n) if n == buf.len() => Ok(()),
        Ok(n) => Err(format!("the chain ends after {n} of {} bytes", buf.len())),
        Err(e) => Err(e.to_string()),
    };
    // A base needs no zero blocks; an increment records them (they hide older data).
    copy_blocks(&mut w, &mut chain, &take, !base, |_, _| {}).map_err(|e| match e {
        CopyError::Read { blocks, source } => read_err(format!("{blocks}: {source}")),
        CopyError::Repo(e) => PruneError::Repo(e),
    })?;
    w.commit()?;
    Ok(())
}
