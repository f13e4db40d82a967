//! Reading a restore point: resolve with `chain`, then chunk reads, each authenticated before a
//! single byte of it is returned.
//!
//! Shared by `export`, `verify` and the mount. A `PointReader` is immutable and `Sync`: many
//! threads may read at once (no locks on the read path).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::chain::{ChainMap, Extent, LayerView};
use crate::repo::{PointManifest, RepoError, Repository, SetHistory, StoredPoint};
use crate::{BLOCK_SHIFT, BLOCK_SIZE};

/// Largest single positional read: large enough to amortize the syscall, small enough that a
/// reader's request is not delayed behind one huge read.
const MAX_GROUP_BLOCKS: u64 = 64;

/// A range that could not be read. Bytes before `valid_until` were read correctly.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read bytes {range_start}..{range_end} of point {point}: block {block} (stored by point {owner} in {location}) {problem}; run `cbtfs verify` for a full report"
)]
pub struct ReadError {
    pub point: String,
    pub owner: String,
    pub block: u64,
    pub range_start: u64,
    pub range_end: u64,
    pub location: String,
    pub problem: String,
    pub valid_until: u64,
}

/// Shares opened points between readers: a point's index is parsed and mapped once however many
/// restore points above it are open.
#[derive(Default)]
pub struct LayerCache {
    map: Mutex<HashMap<String, Weak<StoredPoint>>>,
}

impl LayerCache {
    pub fn get(&self, repo: &Repository, m: &PointManifest) -> Result<Arc<StoredPoint>, RepoError> {
        // The index key is random: it identifies this exact point's index. The whole manifest
        // must match too: a layer must describe the chain it is read in (its position), not
        // an older listing.
        let key = m.index.key.clone();
        if let Ok(map) = self.map.lock()
            && let Some(p) = map.get(&key).and_then(Weak::upgrade)
            && p.manifest == *m
        {
            return Ok(p);
        }
        let p = Arc::new(repo.open_point(m)?);
        if let Ok(mut map) = self.map.lock() {
            if map.len() > 4096 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            map.insert(key, Arc::downgrade(&p));
        }
        Ok(p)
    }

    /// Forget the entries of points no reader uses any more (after a rescan).
    pub fn forget_unused(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.retain(|_, w| w.strong_count() > 0);
        }
    }
}

/// A restore point ready to read.
pub struct PointReader {
    pub manifest: PointManifest,
    layers: Vec<Arc<StoredPoint>>,
    map: ChainMap,
}

impl std::fmt::Debug for PointReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointReader")
            .field("point", &self.manifest.label())
            .field("depth", &self.layers.len())
            .finish()
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; BLOCK_SIZE as usize]);
}

impl crate::volumes::DiskRead for PointReader {
    fn size(&self) -> u64 {
        PointReader::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        PointReader::read_at(self, buf, offset)
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

impl PointReader {
    /// Open point `seq` of `set`: opens it and every point below it.
    pub fn open(repo: &Repository, set: &SetHistory, seq: u32) -> Result<PointReader, RepoError> {
        let mut layers = Vec::with_capacity(seq as usize + 1);
        for m in set.points.iter().take(seq as usize + 1) {
            layers.push(Arc::new(repo.open_point(m)?));
        }
        PointReader::from_layers(layers)
    }

    /// Open point `seq` of `set`, sharing opened points through `cache`.
    pub fn open_cached(
        repo: &Repository,
        set: &SetHistory,
        seq: u32,
        cache: &LayerCache,
    ) -> Result<PointReader, RepoError> {
        let mut layers = Vec::with_capacity(seq as usize + 1);
        for m in set.points.iter().take(seq as usize + 1) {
            layers.push(cache.get(repo, m)?);
        }
        PointReader::from_layers(layers)
    }

    /// Build from opened layers (base first); the last is the point read.
    pub fn from_layers(layers: Vec<Arc<StoredPoint>>) -> Result<PointReader, RepoError> {
        let manifest = layers
            .last()
            .map(|p| p.manifest.clone())
            .ok_or_else(|| RepoError::Invalid("internal: empty chain".into()))?;
        let views: Vec<LayerView> = layers
            .iter()
            .map(|p| LayerView {
                changed: &p.index.changed,
                data: &p.index.data,
                virtual_size: p.index.virtual_size,
            })
            .collect();
        let map = ChainMap::build(&views);
        Ok(PointReader {
            manifest,
            layers,
            map,
        })
    }

    pub fn size(&self) -> u64 {
        self.map.size()
    }

    pub fn map(&self) -> &ChainMap {
        &self.map
    }

    /// Layer `i` of the chain (0 is the base).
    pub fn layer(&self, i: usize) -> Option<&StoredPoint> {
        self.layers.get(i).map(|l| &**l)
    }

    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// Whether this reader reads exactly the chain `points` (base first): the same manifests,
    /// so the same objects in the same order. A cached reader is reused only then.
    pub fn reads_chain(&self, points: &[PointManifest]) -> bool {
        self.layers.len() == points.len()
            && self
                .layers
                .iter()
                .zip(points)
                .all(|(l, m)| l.manifest == *m)
    }

    /// Read at `offset` into `buf`; returns the bytes read (short only at the end of the disk).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, Box<ReadError>> {
        let size = self.size();
        if offset >= size {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(size - offset) as usize;
        let buf = &mut buf[..len];
        let mut result = Ok(());
        self.map.for_each_extent(offset, len as u64, |e| {
            if result.is_err() {
                return;
            }
            let at = (e.offset() - offset) as usize;
            let dst = &mut buf[at..at + e.len() as usize];
            match e {
                Extent::Zero { .. } => dst.fill(0),
                Extent::Stored {
                    offset: o,
                    layer,
                    entry,
                    ..
                } => result = self.read_stored(dst, o, layer, entry),
            }
        });
        result.map(|_| len)
    }

    fn fail(
        &self,
        layer: &StoredPoint,
        block: u64,
        valid_until: u64,
        location: String,
        problem: String,
    ) -> Box<ReadError> {
        let start = block << BLOCK_SHIFT;
        let e = ReadError {
            point: self.manifest.label(),
            owner: layer.manifest.label(),
            block,
            range_start: start,
            range_end: (start + BLOCK_SIZE).min(self.size()),
            location,
            problem,
            valid_until,
        };
        tracing::debug!(point = %e.point, owner = %e.owner, block, file = %e.location, problem = %e.problem, "damaged block");
        Box::new(e)
    }

    /// Fill `dst` with point bytes `offset..`, all stored in `layer` from entry `entry` on.
    fn read_stored(
        &self,
        dst: &mut [u8],
        offset: u64,
        layer: u32,
        entry: u32,
    ) -> Result<(), Box<ReadError>> {
        let p = &self.layers[layer as usize];
        let repo = p.repository();
        let end = offset + dst.len() as u64;
        let mut pos = offset;
        let mut ei = entry as usize;
        while pos < end {
            let block = pos >> BLOCK_SHIFT;
            let in_block = pos - (block << BLOCK_SHIFT);
            let at = (pos - offset) as usize;
            if in_block == 0 && end - pos >= BLOCK_SIZE {
                // Whole blocks: read up to MAX_GROUP_BLOCKS straight into the caller's buffer
                // (adjacent chunks of one pack come in one ranged read).
                let n = ((end - pos) / BLOCK_SIZE).min(MAX_GROUP_BLOCKS) as usize;
                let mut ids = Vec::with_capacity(n);
                for k in 0..n {
                    match p.index.entry(ei + k) {
                        Some(id) => ids.push(id),
                        None => {
                            return Err(self.fail(
                                p,
                                block + k as u64,
                                pos + k as u64 * BLOCK_SIZE,
                                p.index_location.clone(),
                                "has no index entry".into(),
                            ));
                        }
                    }
                }
                let out = &mut dst[at..at + n * BLOCK_SIZE as usize];
                if let Err(f) = repo.read_chunks(&ids, out) {
                    return Err(self.fail(
                        p,
                        block + f.at as u64,
                        pos + f.at as u64 * BLOCK_SIZE,
                        f.location,
                        f.problem,
                    ));
                }
                pos += n as u64 * BLOCK_SIZE;
                ei += n;
            } else {
                // Part of a block: read and check the whole block, copy the part.
                let take = (BLOCK_SIZE - in_block).min(end - pos) as usize;
                let Some(id) = p.index.entry(ei) else {
                    return Err(self.fail(
                        p,
                        block,
                        pos,
                        p.index_location.clone(),
                        "has no index entry".into(),
                    ));
                };
                let r = SCRATCH.with(|s| {
                    let mut s = s.borrow_mut();
                    repo.read_chunks(&[id], &mut s[..])?;
                    dst[at..at + take]
                        .copy_from_slice(&s[in_block as usize..in_block as usize + take]);
                    Ok::<(), crate::repo::ChunkFailure>(())
                });
                if let Err(f) = r {
                    return Err(self.fail(p, block, pos, f.location, f.problem));
                }
                pos += take as u64;
                ei += 1;
            }
        }
        Ok(())
    }

    /// Check every stored block this point reads (verify): returns the damaged blocks' errors.
    pub fn check_all(&self, mut on_error: impl FnMut(Box<ReadError>)) {
        let mut buf = vec![0u8; (MAX_GROUP_BLOCKS * BLOCK_SIZE) as usize];
        let mut pos = 0;
        while pos < self.size() {
            let len = (buf.len() as u64).min(self.size() - pos);
            match self.read_at(&mut buf[..len as usize], pos) {
                Ok(_) => pos += len,
                Err(e) => {
                    pos = e.range_end.max(pos + 1);
                    on_error(e);
                }
            }
        }
    }
}
