//! `cbtfs copy SRC DST`: copy restore points from one repository into another (the offsite
//! copy), incrementally and resumably.
//!
//! The two repositories have their own keys, so chunk ids differ: a point's blocks are read
//! (decrypted) from the source and written to the destination through its `PointWriter`, whose
//! chunk index decides what is stored. Only the chunks the destination lacks take space there.
//!
//! # Which points, in which order
//!
//! Each source set becomes a destination set with the same points in the same order; a copied
//! point's parent is the copy of its source parent. Every copied manifest records where it came
//! from ([`CopiedFrom`]: the source repository's id, the point's id, its set and creation
//! number). A run copies, per set, the selected points newer than the newest point already
//! copied from that set, so a second run copies nothing and a killed run continues where it
//! stopped: a point is visible in the destination only once its manifest is stored, and a
//! killed writer leaves only unreferenced objects (`cbtfs gc` deletes them).
//!
//! # Which blocks
//!
//! A copied point holds exactly the blocks where its bytes may differ from its destination
//! parent's: the union of the `changed` bitmaps of the source chain's points after the newest
//! point `Q` whose copy is in the destination set, up to the point itself (plus the disk's tail
//! where a point between had a smaller disk). Their bytes are read through the source chain
//! (the point as it reads, whichever layer holds each block), zero blocks recorded as zero.
//! Why this is enough even after a prune in the source: prune keeps every kept point's bytes and
//! id, and the kept point after dropped ones takes over their `changed` blocks; so the union
//! over the current chain after `Q` covers every block changed since `Q` in the original
//! history, and the destination parent (a copy of `Q` or of a later point) differs from the
//! point only in such blocks. Without such a `Q` (the copied points were all pruned in the
//! source, or the set is new), every block of the disk is taken.
//!
//! The copy never prunes the destination: points the source has dropped since they were
//! copied stay there until a prune of the destination removes them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use roaring::RoaringBitmap;
use serde::Serialize;

use crate::naming::Tree;
use crate::read::PointReader;
use crate::repo::copy::{CopyError, copy_blocks};
use crate::repo::{
    CopiedFrom, NewPoint, PointManifest, RepoError, Repository, SetHistory, StoredPoint,
};
use crate::{BLOCK_SIZE, blocks_for};

/// What to copy.
#[derive(Debug, Clone, Default)]
pub struct CopyRequest {
    /// Only these VMs (name as `cbtfs ls` shows it, or uuid); empty: every disk.
    pub vms: Vec<String>,
    /// Only points taken at or after this time (Unix seconds).
    pub since: Option<i64>,
    /// Say what would be copied; write nothing.
    pub dry_run: bool,
}

/// One point copied (or, in a dry run, to copy).
#[derive(Debug, Clone, Serialize)]
pub struct CopiedPoint {
    /// `VM/DISK/SET/POINT` in the source.
    pub path: String,
    /// `VDI@TIME`.
    pub label: String,
    /// Its set in the destination.
    pub dst_set: String,
    /// A new set (a full base) in the destination.
    pub new_set: bool,
    /// Blocks read from the source (and written to the destination point).
    pub blocks_read: u64,
    /// Chunks the destination did not have, their plain and stored bytes (0 in a dry run).
    pub new_chunks: u64,
    pub new_raw_bytes: u64,
    pub new_stored_bytes: u64,
}

/// What a copy reports while it runs.
#[derive(Debug)]
pub enum Event<'a> {
    /// Blocks of the point `path` read and written so far, of `total`.
    Blocks {
        path: &'a str,
        done: u64,
        total: u64,
    },
    /// A point committed in the destination (in a dry run: planned).
    Copied(&'a CopiedPoint),
}

/// A selected point that was not copied, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub label: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    pub dry_run: bool,
    pub source: String,
    pub destination: String,
    pub copied: Vec<CopiedPoint>,
    /// Selected points the destination already had.
    pub already_there: usize,
    /// Selected points that could not be copied (the destination's set went on without them).
    pub skipped: Vec<Skipped>,
    /// Sets of the source that are damaged: the points after the damage were not copied.
    pub damaged_sets: Vec<String>,
    pub points_copied: usize,
    pub blocks_read: u64,
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyFailure {
    #[error("{0}")]
    Refused(String),
    #[error("source repository {repo}: {source}")]
    Source {
        repo: String,
        #[source]
        source: RepoError,
    },
    #[error("destination repository {repo}: {source}")]
    Destination {
        repo: String,
        #[source]
        source: RepoError,
    },
    #[error(
        "reading point {point} of the source: {detail}; it was not copied (the destination is unchanged by it; `cbtfs verify` on the source tells more)"
    )]
    Read { point: String, detail: String },
}

/// What the destination holds of one source set.
#[derive(Debug, Clone)]
struct DstSet {
    /// The destination set's name.
    name: String,
    /// Source point ids whose copies are in it.
    copied: HashSet<String>,
    /// Its newest point.
    last: PointManifest,
}

/// Copy the points `req` selects from `src` into `dst`. `on_event` hears the blocks copied and
/// each point as soon as it is committed (or, in a dry run, planned).
pub fn copy(
    src: &Repository,
    dst: &Repository,
    req: &CopyRequest,
    mut on_event: impl FnMut(Event<'_>),
) -> Result<CopyReport, CopyFailure> {
    let started = Instant::now();
    let s_err = |source: RepoError| CopyFailure::Source {
        repo: src.root().display().to_string(),
        source,
    };
    let d_err = |source: RepoError| CopyFailure::Destination {
        repo: dst.root().display().to_string(),
        source,
    };
    if src.header.id == dst.header.id {
        return Err(CopyFailure::Refused(format!(
            "{} and {} are the same repository (id {}); give another destination",
            src.root().display(),
            dst.root().display(),
            src.header.id
        )));
    }
    // The destination's lock first: a busy destination fails before anything is read.
    let mut lock = if req.dry_run {
        None
    } else {
        Some(dst.lock_shared("cbtfs copy").map_err(d_err)?)
    };
    let catalog = src.catalog().map_err(s_err)?;
    let tree = Tree::build(catalog);
    let disks = select_disks(&tree, &req.vms)?;
    let mut report = CopyReport {
        dry_run: req.dry_run,
        source: src.root().display().to_string(),
        destination: dst.root().display().to_string(),
        copied: Vec::new(),
        already_there: 0,
        skipped: Vec::new(),
        damaged_sets: Vec::new(),
        points_copied: 0,
        blocks_read: 0,
        new_chunks: 0,
        new_stored_bytes: 0,
        seconds: 0.0,
    };
    for vdi in disks {
        let Some((_, disk)) = tree.disk_by_uuid(&vdi) else {
            continue;
        };
        // The destination disk's lock before reading what it holds: another writer (a backup
        // into the destination) may be adding points to it.
        let disk_lock = match &lock {
            Some(shared) => Some(shared.lock_disk(&vdi, "cbtfs copy").map_err(d_err)?),
            None => None,
        };
        // What the destination holds of this disk's sets, by source set name.
        let dst_disk = dst.disk(&vdi).map_err(d_err)?;
        let mut held: HashMap<String, DstSet> = HashMap::new();
        for s in &dst_disk.sets {
            for p in &s.points {
                let Some(c) = p.copied_from.as_ref().filter(|c| c.repo == src.header.id) else {
                    continue;
                };
                let e = held.entry(c.set.clone()).or_insert_with(|| DstSet {
                    name: s.id.clone(),
                    copied: HashSet::new(),
                    last: p.clone(),
                });
                e.copied.insert(c.point.clone());
            }
            if let Some(last) = s.points.last()
                && let Some(e) = held.values_mut().find(|e| e.name == s.id)
            {
                e.last = last.clone();
            }
        }
        let mut newest_dst_set = dst_disk
            .sets
            .iter()
            .rev()
            .find(|s| !s.points.is_empty() || !s.problems.is_empty())
            .map(|s| s.id.clone());
        for set in &disk.history.sets {
            if !set.problems.is_empty() {
                report.damaged_sets.push(format!(
                    "{}/{}",
                    tree.disk_path(&vdi).unwrap_or_else(|| vdi.clone()),
                    set.id
                ));
            }
            copy_set(
                src,
                dst,
                disk_lock
                    .as_ref()
                    .map(|l| l as &dyn crate::repo::DiskWriteLock),
                &tree,
                set,
                req,
                &mut held,
                &mut newest_dst_set,
                &mut report,
                &mut on_event,
            )?;
        }
    }
    if lock.take().is_some() {
        // This copy's lock is gone: collect what killed writers left, if nobody is writing.
        if let Err(e) = dst.collect_dead_writers("cbtfs copy") {
            tracing::warn!(error = %e, "could not collect what an interrupted writer left; `cbtfs gc` does it");
        }
    }
    report.points_copied = report.copied.len();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The disks (VDI uuids) of the VMs `vms` names (every disk when empty), in the tree's order.
fn select_disks(tree: &Tree, vms: &[String]) -> Result<Vec<String>, CopyFailure> {
    for w in vms {
        if !tree
            .vms
            .iter()
            .any(|v| v.name == *w || v.uuid.as_deref() == Some(w.as_str()))
        {
            let names: Vec<&str> = tree.vms.iter().map(|v| v.name.as_str()).collect();
            return Err(CopyFailure::Refused(format!(
                "--vm {w}: the source repository has no such VM; its VMs: {} (name or uuid, as `cbtfs ls` shows); nothing was copied",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        }
    }
    Ok(tree
        .vms
        .iter()
        .filter(|v| {
            vms.is_empty()
                || vms
                    .iter()
                    .any(|w| v.name == *w || v.uuid.as_deref() == Some(w.as_str()))
        })
        .flat_map(|v| v.disks.iter().map(|d| d.vdi().to_string()))
        .collect())
}

/// A copied point whose manifest is being stored on another thread, with what the report
/// says of it once it is.
type Publishing<'s> = (
    std::thread::ScopedJoinHandle<'s, Result<PointManifest, RepoError>>,
    CopiedPoint,
);

/// Copy the selected points of one source set that the destination lacks.
///
/// Points follow each other in a pipeline: once a point is sealed (all its blocks written,
/// its manifest decided), it is published (its last pack, indexes and manifest stored) on
/// another thread while the next point of the set is read and encoded. A point's manifest is
/// stored only after its parent's, and a failed publish stops the copy before anything after
/// it becomes visible.
#[allow(clippy::too_many_arguments)]
fn copy_set(
    src: &Repository,
    dst: &Repository,
    lock: Option<&dyn crate::repo::DiskWriteLock>,
    tree: &Tree,
    set: &SetHistory,
    req: &CopyRequest,
    held: &mut HashMap<String, DstSet>,
    newest_dst_set: &mut Option<String>,
    report: &mut CopyReport,
    on_event: &mut impl FnMut(Event<'_>),
) -> Result<(), CopyFailure> {
    std::thread::scope(|scope| {
        let mut publishing: Option<Publishing<'_>> = None;
        // The new chunks of the point being published, for the next point to dedup against.
        let mut in_flight = None;
        // The set's points; a failure returns from here and leaves the publish in flight to
        // `land` below.
        let r = (|| -> Result<(), CopyFailure> {
            let s_err = |source: RepoError| CopyFailure::Source {
                repo: src.root().display().to_string(),
                source,
            };
            let d_err = |source: RepoError| CopyFailure::Destination {
                repo: dst.root().display().to_string(),
                source,
            };
            // The set's points opened so far (base first), shared by the readers of its points.
            let mut layers: Vec<Arc<StoredPoint>> = Vec::new();
            for (k, p) in set.points.iter().enumerate() {
                if req.since.is_some_and(|t| p.time < t) {
                    continue;
                }
                let path = tree.name_of(p);
                let there = held.get(&set.id);
                if there.is_some_and(|h| h.copied.contains(&p.id)) {
                    report.already_there += 1;
                    continue;
                }
                let skip = |reason: String| Skipped {
                    path: path.clone(),
                    label: p.label(),
                    reason,
                };
                if let Some(h) = there {
                    let last_n = h.last.copied_from.as_ref().map(|c| c.n);
                    if last_n.is_none_or(|n| n >= p.n) {
                        report.skipped.push(skip(format!(
                            "the destination's set {} already goes on past it (a copy made without it, e.g. with a later --since)",
                            h.name
                        )));
                        continue;
                    }
                    if newest_dst_set.as_deref() != Some(h.name.as_str()) {
                        report.skipped.push(skip(format!(
                            "the destination's set {} of this disk is no longer its newest (a newer set was started there)",
                            h.name
                        )));
                        continue;
                    }
                }
                // Open the chain up to this point.
                while layers.len() <= k {
                    let m = &set.points[layers.len()];
                    layers.push(Arc::new(src.open_point(m).map_err(s_err)?));
                }
                let chain = &layers[..=k];
                // The newest earlier point of the chain whose copy the destination set holds.
                let q = there
                    .and_then(|h| (0..k).rev().find(|&i| h.copied.contains(&set.points[i].id)));
                let take = blocks_to_take(chain, q, there.map(|h| h.last.virtual_size))?;
                let new_set = there.is_none();
                let mut done = CopiedPoint {
                    path: path.clone(),
                    label: p.label(),
                    dst_set: there.map(|h| h.name.clone()).unwrap_or_default(),
                    new_set,
                    blocks_read: take.len(),
                    new_chunks: 0,
                    new_raw_bytes: 0,
                    new_stored_bytes: 0,
                };
                let Some(lock) = lock else {
                    // A dry run: the destination set is named when the base is written.
                    if new_set {
                        done.dst_set = done_name(p);
                    }
                    report.blocks_read += done.blocks_read;
                    on_event(Event::Copied(&done));
                    report.copied.push(done);
                    // Later points of the set follow this one.
                    let h = held.entry(set.id.clone()).or_insert_with(|| DstSet {
                        name: done_name(p),
                        copied: HashSet::new(),
                        last: p.clone(),
                    });
                    h.copied.insert(p.id.clone());
                    h.last = with_origin(src, p);
                    *newest_dst_set = Some(h.name.clone());
                    continue;
                };
                let spec = NewPoint {
                    vdi: p.vdi.clone(),
                    disk_name: p.disk_name.clone(),
                    vm_uuid: p.vm_uuid.clone(),
                    vm_name: p.vm_name.clone(),
                    time: p.time,
                    virtual_size: p.virtual_size,
                    source: p.source.clone(),
                    new_set,
                    snapshot: p.snapshot.clone(),
                    vm_metadata: src.read_vm_metadata(p).map_err(s_err)?,
                    vdi_type: p.vdi_type.clone(),
                    vm_run: p.vm_run.clone(),
                };
                // The point being published is this one's parent: follow it without waiting. Else
                // the destination is read, which must show every point published so far.
                let follows_publishing = publishing.is_some()
                    && there.is_some_and(|h| h.last.copied_from.is_some() && !new_set);
                let begun = if follows_publishing && let Some(h) = there {
                    dst.continue_point(lock, spec, &h.last)
                } else {
                    land(dst, &mut publishing, report, on_event)?;
                    dst.begin_point(lock, spec)
                };
                let mut writer = match begun {
                    Ok(w) => w,
                    Err(RepoError::Invalid(why)) => {
                        report.skipped.push(skip(why));
                        continue;
                    }
                    Err(e) => return Err(d_err(e)),
                };
                if let Some(chunks) = in_flight.take().filter(|_| follows_publishing) {
                    writer.dedup_in_flight(chunks);
                }
                writer.set_copied_from(CopiedFrom {
                    repo: src.header.id.clone(),
                    point: p.id.clone(),
                    set: set.id.clone(),
                    n: p.n,
                });
                let reader = PointReader::from_layers(chain.to_vec()).map_err(s_err)?;
                let mut source = |buf: &mut [u8], offset: u64| match reader.read_at(buf, offset) {
                    Ok(n) if n == buf.len() => Ok(()),
                    Ok(n) => Err(format!(
                        "the point ends after {n} of {} bytes at byte {offset}",
                        buf.len()
                    )),
                    Err(e) => Err(e.to_string()),
                };
                let progress = |done, total| {
                    on_event(Event::Blocks {
                        path: &path,
                        done,
                        total,
                    })
                };
                match copy_blocks(&mut writer, &mut source, &take, true, progress) {
                    Ok(()) => {}
                    Err(CopyError::Read { blocks, source }) => {
                        return Err(CopyFailure::Read {
                            point: path,
                            detail: format!("{blocks}: {source}"),
                        });
                    }
                    Err(CopyError::Repo(e)) => return Err(d_err(e)),
                }
                let sealed = writer.seal().map_err(d_err)?;
                let m = sealed.manifest().clone();
                in_flight = Some(sealed.unindexed_chunks());
                // Its parent's manifest is stored first; if that failed, this point is dropped
                // (deleting what it wrote) and the copy stops.
                land(dst, &mut publishing, report, on_event)?;
                publishing = Some((scope.spawn(move || sealed.publish()), done));
                // Later points of the set follow this one.
                let h = held.entry(set.id.clone()).or_insert_with(|| DstSet {
                    name: m.set.clone(),
                    copied: HashSet::new(),
                    last: m.clone(),
                });
                h.copied.insert(p.id.clone());
                h.last = m;
                *newest_dst_set = Some(h.name.clone());
            }
            Ok(())
        })();
        // The last point's publish, or the one in flight when a later point failed (its
        // success is reported either way).
        let landed = land(dst, &mut publishing, report, on_event);
        r.and(landed)
    })
}

/// Wait for the point being published, if any, and report it.
fn land(
    dst: &Repository,
    publishing: &mut Option<Publishing<'_>>,
    report: &mut CopyReport,
    on_event: &mut impl FnMut(Event<'_>),
) -> Result<(), CopyFailure> {
    let Some((handle, mut done)) = publishing.take() else {
        return Ok(());
    };
    let m = handle
        .join()
        .map_err(|_| CopyFailure::Destination {
            repo: dst.root().display().to_string(),
            source: RepoError::Invalid(format!(
                "internal: storing point {} panicked; a bug in cbtfs: please report it",
                done.path
            )),
        })?
        .map_err(|source| CopyFailure::Destination {
            repo: dst.root().display().to_string(),
            source,
        })?;
    done.dst_set = m.set.clone();
    done.new_chunks = m.stats.new_chunks;
    done.new_raw_bytes = m.stats.new_raw_bytes;
    done.new_stored_bytes = m.stats.new_stored_bytes;
    report.blocks_read += done.blocks_read;
    report.new_chunks += done.new_chunks;
    report.new_stored_bytes += done.new_stored_bytes;
    on_event(Event::Copied(&done));
    report.copied.push(done);
    Ok(())
}

/// The name a dry run gives a set it would start.
fn done_name(p: &PointManifest) -> String {
    format!("(new set from {})", crate::timefmt::basic(p.time))
}

/// `p` as its copy would describe its origin (a dry run's stand-in for the committed copy).
fn with_origin(src: &Repository, p: &PointManifest) -> PointManifest {
    let mut m = p.clone();
    m.copied_from = Some(CopiedFrom {
        repo: src.header.id.clone(),
        point: p.id.clone(),
        set: p.set.clone(),
        n: p.n,
    });
    m
}

/// The blocks the copy of `chain`'s last point must hold: those changed in the chain after
/// layer `q` (whose copy the destination holds), up to the point; with no such layer, every
/// block the chain ever changed (a new set) or every block of the disk (after a destination
/// parent none of whose source points is left). Plus the disk's tail where a point in between,
/// or the destination parent (`parent_size`), had a smaller disk.
fn blocks_to_take(
    chain: &[Arc<StoredPoint>],
    q: Option<usize>,
    parent_size: Option<u64>,
) -> Result<RoaringBitmap, CopyFailure> {
    let Some(top) = chain.last() else {
        return Ok(RoaringBitmap::new());
    };
    let size = top.manifest.virtual_size;
    let blocks = u32::try_from(blocks_for(size)).map_err(|_| CopyFailure::Read {
        point: top.manifest.label(),
        detail: format!("its {size} bytes are beyond the format's block numbers"),
    })?;
    let mut take = RoaringBitmap::new();
    match (q, parent_size) {
        // Appending to a destination set none of whose source points is left: everything.
        (None, Some(_)) => {
            take.insert_range(0..blocks);
        }
        // A new set: every block the chain holds (the rest reads as zeros anyway).
        (None, None) => {
            for l in chain {
                take |= &l.index.changed;
            }
        }
        (Some(q), _) => {
            for l in chain.get(q + 1..).unwrap_or(&[]) {
                take |= &l.index.changed;
            }
            let min_size = chain
                .get(q..)
                .unwrap_or(&[])
                .iter()
                .map(|l| l.manifest.virtual_size)
                .chain(parent_size)
                .min()
                .unwrap_or(size);
            // Only a smaller disk in between cut blocks off (its partial last block too).
            if min_size < size
                && let Ok(kept) = u32::try_from(min_size / BLOCK_SIZE)
                && kept < blocks
            {
                take.insert_range(kept..blocks);
            }
        }
    }
    take.remove_range(blocks..);
    Ok(take)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::testing;

    const VDI: &str = "00000000-0000-4000-8000-0000000000c1";
    const BS: usize = BLOCK_SIZE as usize;
    const T0: i64 = 1_767_232_800;

    fn spec(time: i64, size: u64, new_set: bool) -> NewPoint {
        NewPoint {
            vdi: VDI.into(),
            disk_name: "xvda".into(),
            vm_uuid: None,
            vm_name: Some("web".into()),
            time,
            virtual_size: size,
            source: "test".into(),
            new_set,
            snapshot: Some("00000000-0000-4000-8000-0000000000d1".into()),
            vm_metadata: Some(format!("metadata at {time}").into_bytes()),
            vdi_type: Some("user".into()),
            vm_run: None,
        }
    }

    /// Write a point whose blocks `blocks` hold `fill(block)` (the disk's last block short).
    fn write(repo: &Repository, s: NewPoint, blocks: &[u64], fill: impl Fn(u64) -> u8) {
        let size = s.virtual_size;
        let lock = repo.lock_exclusive("test").unwrap();
        let mut w = repo.begin_point(&lock, s).unwrap();
        for &b in blocks {
            let len = (size - b * BLOCK_SIZE).min(BLOCK_SIZE) as usize;
            w.add_block(b, &vec![fill(b); len]).unwrap();
        }
        w.commit().unwrap();
    }

    /// Every point of the disk: (time, bytes).
    fn all_points(repo: &Repository) -> Vec<(i64, Vec<u8>)> {
        let mut out = Vec::new();
        for set in repo.disk(VDI).unwrap().sets {
            for p in &set.points {
                let r = PointReader::open(repo, &set, p.seq).unwrap();
                let mut buf = vec![0u8; r.size() as usize];
                assert_eq!(r.read_at(&mut buf, 0).unwrap(), buf.len());
                out.push((p.time, buf));
            }
        }
        out
    }

    #[test]
    fn a_disk_that_shrank_and_grew_between_copies_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let src = testing::init(&dir.path().join("src"));
        let dst = testing::init(&dir.path().join("dst"));
        // A base of 10 blocks of data.
        write(
            &src,
            spec(T0, 10 * BLOCK_SIZE, true),
            &(0..10).collect::<Vec<_>>(),
            |b| b as u8 + 1,
        );
        let r = copy(&src, &dst, &CopyRequest::default(), |_: Event<'_>| {}).unwrap();
        assert_eq!(r.points_copied, 1);
        // Shrunk to 5 blocks and 1000 bytes (its partial last block stored), then grown back
        // to 10 blocks with only block 8 written: blocks 6, 7 and 9 read as zeros now.
        let small = 5 * BLOCK_SIZE + 1000;
        write(&src, spec(T0 + 10, small, false), &[1, 5], |_| 0x77);
        write(&src, spec(T0 + 20, 10 * BLOCK_SIZE, false), &[8], |_| 0x88);
        // Copy only the newest: it follows the copied base directly.
        let req = CopyRequest {
            since: Some(T0 + 20),
            ..CopyRequest::default()
        };
        let r = copy(&src, &dst, &req, |_: Event<'_>| {}).unwrap();
        assert_eq!(r.points_copied, 1);
        // Blocks 1 and 5 (the middle point) and 8, and the tail cut by the shrink: 5 to 9.
        assert_eq!(r.blocks_read, 6, "{r:?}");
        let want = all_points(&src);
        let got = all_points(&dst);
        assert_eq!(got.len(), 2);
        assert!(got[0] == want[0] && got[1] == want[2]);
        let last = &got[1].1;
        assert_eq!(last.len(), 10 * BS);
        assert!(last[6 * BS..8 * BS].iter().all(|&x| x == 0));
        assert!(last[5 * BS..5 * BS + 1000].iter().all(|&x| x == 0x77));
        assert!(last[5 * BS + 1000..6 * BS].iter().all(|&x| x == 0));
        // The copy's manifest keeps the source's fields and says where it came from.
        let s = src.disk(VDI).unwrap().sets[0].points[2].clone();
        let d = dst.disk(VDI).unwrap().sets[0].points[1].clone();
        assert_eq!(
            d.copied_from,
            Some(CopiedFrom {
                repo: src.header.id.clone(),
                point: s.id.clone(),
                set: s.set.clone(),
                n: 2
            })
        );
        assert_eq!(
            dst.read_vm_metadata(&d).unwrap(),
            src.read_vm_metadata(&s).unwrap()
        );
        assert_eq!(
            (&d.snapshot, &d.vdi_type, &d.vm_name),
            (&s.snapshot, &s.vdi_type, &s.vm_name)
        );
        // A run without --since cannot put the middle point before the copied newer one.
        let r = copy(&src, &dst, &CopyRequest::default(), |_: Event<'_>| {}).unwrap();
        assert_eq!(r.points_copied, 0);
        assert_eq!(r.already_there, 2);
        assert_eq!(r.skipped.len(), 1, "{r:?}");
    }

    #[test]
    fn a_repository_is_not_copied_into_itself() {
        let dir = tempfile::tempdir().unwrap();
        let src = testing::init(&dir.path().join("src"));
        let same = testing::open(&dir.path().join("src"));
        let e = copy(&src, &same, &CopyRequest::default(), |_: Event<'_>| {}).unwrap_err();
        assert!(e.to_string().contains("are the same repository"), "{e}");
    }

    #[test]
    fn a_copy_origin_is_checked_when_read() {
        let origin = CopiedFrom {
            repo: "00112233445566778899aabbccddeeff".into(),
            point: "ffeeddccbbaa99887766554433221100".into(),
            set: "20261120T020000Z".into(),
            n: 3,
        };
        let dir = tempfile::tempdir().unwrap();
        let src = testing::init(&dir.path().join("src"));
        write(&src, spec(T0, 2 * BLOCK_SIZE, true), &[0], |_| 1);
        let mut m = src.disk(VDI).unwrap().sets[0].points[0].clone();
        // An old manifest (no field) reads as no origin; a good one round-trips.
        let plain = crate::repo::manifest::encode(&m);
        assert!(!String::from_utf8_lossy(&plain).contains("copied_from"));
        m.copied_from = Some(origin.clone());
        let back =
            crate::repo::decode_point_manifest(&crate::repo::manifest::encode(&m), "m").unwrap();
        assert_eq!(back.copied_from, Some(origin.clone()));
        for bad in [
            CopiedFrom {
                set: "../x".into(),
                ..origin.clone()
            },
            CopiedFrom {
                point: "zz".into(),
                ..origin.clone()
            },
            CopiedFrom {
                repo: String::new(),
                ..origin.clone()
            },
        ] {
            m.copied_from = Some(bad);
            let e = crate::repo::decode_point_manifest(&crate::repo::manifest::encode(&m), "m")
                .unwrap_err();
            assert!(e.to_string().contains("copy origin"), "{e}");
        }
    }
}
