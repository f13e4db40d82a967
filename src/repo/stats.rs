//! Space statistics: what the backups of a disk (or of the whole repository) read, what their
//! unique chunks take in packs, and what deduplication and compression saved (`cbtfs ls`).
//!
//! * **logical** bytes: what the backups read and stored before dedup and compression, the sum
//!   over the points of their stored (non-zero) blocks × 64 KiB. Zero blocks are never stored
//!   and not counted.
//! * **unique raw** bytes: the distinct chunks the points reference × 64 KiB.
//! * **stored** bytes: what those chunks take in packs (compressed, sealed), from the chunk
//!   index. Pack trailers, indexes and manifests are not chunks: the repository's bytes on
//!   storage (`storage_bytes`) count everything.
//! * **dedup ratio** = logical / unique raw; **compression ratio** = unique raw / stored (over
//!   the chunks the chunk index lists).
//!
//! Each point index is read once; distinct ids are counted with a sorted, deduplicated vector
//! (32 bytes plus a length per distinct chunk: ~1.3 GiB for a fully written 2 TiB disk, as gc's
//! mark phase).

use serde::Serialize;

use super::crypto::ChunkId;
use super::{DiskHistory, RepoError, Repository, Result};
use crate::BLOCK_SIZE;

/// Space used by some points (a disk's, or every disk's).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpaceStats {
    /// Points counted.
    pub points: u64,
    /// Bytes the backups read and stored, before dedup and compression.
    pub logical_bytes: u64,
    /// Distinct chunks the points reference.
    pub unique_chunks: u64,
    /// Their plain bytes: `unique_chunks` × 64 KiB.
    pub unique_raw_bytes: u64,
    /// What those chunks take in packs (compressed and sealed).
    pub stored_bytes: u64,
    /// logical / unique raw; None when no chunk is referenced.
    pub dedup_ratio: Option<f64>,
    /// unique raw / stored (over the chunks the chunk index lists); None when nothing is stored.
    pub compression_ratio: Option<f64>,
    /// Referenced chunks the chunk index does not list (damage: `cbtfs verify` names them).
    pub missing_chunks: u64,
    /// Points whose index could not be read: their chunks are not counted.
    pub unreadable_points: u64,
}

/// What one disk's points reference: its distinct chunks with their stored length (None when
/// the chunk index does not list the chunk), sorted by id.
#[derive(Debug, Default)]
struct Referenced {
    points: u64,
    logical: u64,
    unreadable: u64,
    chunks: Vec<(ChunkId, Option<u32>)>,
}

/// The space one disk's points use.
pub fn disk_stats(repo: &Repository, disk: &DiskHistory) -> Result<SpaceStats> {
    Ok(summarize(&referenced(repo, disk)?))
}

/// The space every disk's points use together (a chunk shared by disks counts once).
pub fn repository_stats(repo: &Repository, disks: &[DiskHistory]) -> Result<SpaceStats> {
    Ok(all_stats(repo, disks)?.1)
}

/// Each disk's statistics (in the order of `disks`) and the repository's, reading every point
/// index once.
pub fn all_stats(
    repo: &Repository,
    disks: &[DiskHistory],
) -> Result<(Vec<SpaceStats>, SpaceStats)> {
    let mut per_disk = Vec::with_capacity(disks.len());
    let mut all = Referenced::default();
    for d in disks {
        let r = referenced(repo, d)?;
        per_disk.push(summarize(&r));
        all.points = all.points.saturating_add(r.points);
        all.logical = all.logical.saturating_add(r.logical);
        all.unreadable = all.unreadable.saturating_add(r.unreadable);
        all.chunks.extend(r.chunks);
    }
    all.chunks.sort_unstable_by_key(|c| c.0);
    all.chunks.dedup_by_key(|c| c.0);
    Ok((per_disk, summarize(&all)))
}

/// Bytes of every object of the repository on its storage (packs, indexes, manifests, keys).
pub fn storage_bytes(repo: &Repository) -> Result<u64> {
    let objects = repo
        .store()
        .list("")
        .map_err(|e| RepoError::io("list", repo.store().describe(""), e))?;
    Ok(objects
        .iter()
        .fold(0u64, |sum, o| sum.saturating_add(o.len)))
}

/// Read a disk's point indexes and look their distinct chunks up.
fn referenced(repo: &Repository, disk: &DiskHistory) -> Result<Referenced> {
    let mut r = Referenced::default();
    let mut ids: Vec<ChunkId> = Vec::new();
    for set in &disk.sets {
        for m in &set.points {
            r.points += 1;
            r.logical = r
                .logical
                .saturating_add(m.data_blocks.saturating_mul(BLOCK_SIZE));
            match repo.open_point(m) {
                Ok(p) => ids.extend(p.index.chunk_ids()),
                Err(e) => {
                    tracing::warn!(point = %m.label(), "space statistics leave out a point: {e}");
                    r.unreadable += 1;
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(r);
    }
    let ci = repo.chunk_index()?;
    r.chunks = ids
        .into_iter()
        .map(|id| (id, ci.lookup(&id).map(|l| l.len)))
        .collect();
    // A writer or gc may have changed the chunk index since it was loaded: one refresh.
    if r.chunks.iter().any(|c| c.1.is_none()) && ci.refresh()? {
        for c in r.chunks.iter_mut().filter(|c| c.1.is_none()) {
            c.1 = ci.lookup(&c.0).map(|l| l.len);
        }
    }
    Ok(r)
}

fn summarize(r: &Referenced) -> SpaceStats {
    let unique = r.chunks.len() as u64;
    let found = r.chunks.iter().filter(|c| c.1.is_some()).count() as u64;
    let stored = r
        .chunks
        .iter()
        .filter_map(|c| c.1)
        .fold(0u64, |s, l| s.saturating_add(u64::from(l)));
    let unique_raw = unique.saturating_mul(BLOCK_SIZE);
    let found_raw = found.saturating_mul(BLOCK_SIZE);
    SpaceStats {
        points: r.points,
        logical_bytes: r.logical,
        unique_chunks: unique,
        unique_raw_bytes: unique_raw,
        stored_bytes: stored,
        dedup_ratio: (unique_raw > 0).then(|| r.logical as f64 / unique_raw as f64),
        compression_ratio: (stored > 0).then(|| found_raw as f64 / stored as f64),
        missing_chunks: unique - found,
        unreadable_points: r.unreadable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn nothing_stored_has_no_ratios() {
        let s = summarize(&Referenced {
            points: 2,
            ..Default::default()
        });
        assert_eq!(
            s,
            SpaceStats {
                points: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn ratios_follow_their_definitions() {
        // 3 points stored 10 blocks; 4 distinct chunks, stored in 1000 + 2000 + 3000 + 4000
        // bytes.
        let r = Referenced {
            points: 3,
            logical: 10 * BLOCK_SIZE,
            unreadable: 0,
            chunks: vec![
                (id(1), Some(1000)),
                (id(2), Some(2000)),
                (id(3), Some(3000)),
                (id(4), Some(4000)),
            ],
        };
        let s = summarize(&r);
        assert_eq!(s.logical_bytes, 655_360);
        assert_eq!(s.unique_chunks, 4);
        assert_eq!(s.unique_raw_bytes, 262_144);
        assert_eq!(s.stored_bytes, 10_000);
        assert_eq!(s.dedup_ratio, Some(2.5));
        assert_eq!(s.compression_ratio, Some(26.2144));
        assert_eq!(s.missing_chunks, 0);
    }

    #[test]
    fn missing_chunks_are_counted_and_left_out_of_compression() {
        let r = Referenced {
            points: 1,
            logical: 2 * BLOCK_SIZE,
            unreadable: 1,
            chunks: vec![(id(1), Some(32768)), (id(2), None)],
        };
        let s = summarize(&r);
        assert_eq!(s.unique_chunks, 2);
        assert_eq!(s.missing_chunks, 1);
        assert_eq!(s.stored_bytes, 32768);
        assert_eq!(s.dedup_ratio, Some(1.0));
        assert_eq!(s.compression_ratio, Some(2.0));
        assert_eq!(s.unreadable_points, 1);
    }

    #[test]
    fn serializes_with_every_field() {
        let v = serde_json::to_value(SpaceStats::default()).unwrap();
        for k in [
            "points",
            "logical_bytes",
            "unique_chunks",
            "unique_raw_bytes",
            "stored_bytes",
            "dedup_ratio",
            "compression_ratio",
            "missing_chunks",
            "unreadable_points",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert!(v["dedup_ratio"].is_null());
    }
}
