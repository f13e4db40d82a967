//! Chain resolution: which stored point holds each block of a restore point.
//!
//! A set is a base (layer 0) and its incremental points (layers 1..). Reading block `b` of point
//! `K` means finding the newest layer `j ≤ K` whose `changed` bitmap holds `b`; the block then
//! reads from that layer's stored data, or as zeros if that layer recorded it as all-zero (it is
//! in `changed` but not in `data`) — and as zeros when no layer holds it.
//!
//! Walking layers per read would cost O(depth). Instead a [`ChainMap`] is built once per point,
//! top-down with bitmap algebra (`fresh = changed_j − covered`), and flattened into sorted runs
//! of consecutive blocks owned by one layer. A read is then a binary search plus a walk over the
//! runs it touches: its cost depends on the range and the disk's fragmentation, not on depth.
//! Building costs a few bitmap operations per layer (roaring containers cover 4 GiB of disk each)
//! plus one pass over the resulting runs; callers cache maps.
//!
//! Resizes: each layer has its own size. A block at or beyond the size of any layer between
//! `j` and `K` was cut off by a shrink and must not show through from `j` (the writer stores the
//! partial last block of a shrunk disk so that bytes past a shrink point never reappear).

use roaring::RoaringBitmap;

use crate::{BLOCK_SHIFT, BLOCK_SIZE, blocks_for};

/// What `ChainMap::build` needs to know of one layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerView<'a> {
    pub changed: &'a RoaringBitmap,
    pub data: &'a RoaringBitmap,
    pub virtual_size: u64,
}

/// Consecutive blocks `start..start+len` stored in `layer`, whose first block is that layer's
/// data entry `first_entry` (the following blocks are the following entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u32,
    pub len: u32,
    pub layer: u32,
    pub first_entry: u32,
}

impl Run {
    fn end(&self) -> u64 {
        self.start as u64 + self.len as u64
    }
}

/// A byte range of the point, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Reads as zeros.
    Zero { offset: u64, len: u64 },
    /// Bytes `offset..offset+len` of the point come from `layer`; the block containing `offset`
    /// is that layer's entry `entry` and later blocks are the following entries.
    Stored {
        offset: u64,
        len: u64,
        layer: u32,
        entry: u32,
    },
}

impl Extent {
    pub fn offset(&self) -> u64 {
        match *self {
            Extent::Zero { offset, .. } | Extent::Stored { offset, .. } => offset,
        }
    }
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Zero { len, .. } | Extent::Stored { len, .. } => len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The resolved block → layer map of one point.
#[derive(Debug, Clone)]
pub struct ChainMap {
    runs: Vec<Run>,
    size: u64,
}

impl ChainMap {
    /// Resolve the point `layers.last()` of the chain `layers` (base first).
    pub fn build(layers: &[LayerView<'_>]) -> ChainMap {
        let Some(top) = layers.last() else {
            return ChainMap {
                runs: Vec::new(),
                size: 0,
            };
        };
        let size = top.virtual_size;
        // Block numbers are u32 (256 TiB disks); the writer refuses larger ones.
        let mut limit = blocks_for(size).min(u32::MAX as u64) as u32;
        let mut covered = RoaringBitmap::new();
        let mut runs = Vec::new();
        for (j, layer) in layers.iter().enumerate().rev() {
            if j + 1 < layers.len() {
                limit =
                    limit.min(blocks_for(layers[j + 1].virtual_size).min(u32::MAX as u64) as u32);
            }
            if limit == 0 {
                break;
            }
            // Blocks at or past the limit are out of reach below this point: forget them so the
            // "everything covered" test below counts only reachable blocks.
            covered.remove_range(limit..);
            let mut fresh = layer.changed - &covered;
            fresh.remove_range(limit..);
            if fresh.is_empty() {
                continue;
            }
            let fresh_data = &fresh & layer.data;
            let mut it = fresh_data.iter();
            while let Some(r) = it.next_range() {
                let (s, e) = (*r.start(), *r.end());
                // rank counts members ≤ s; s is a member, so its entry index is rank - 1.
                let first_entry = (layer.data.rank(s) - 1) as u32;
                runs.push(Run {
                    start: s,
                    len: e - s + 1,
                    layer: j as u32,
                    first_entry,
                });
            }
            covered |= fresh;
            if covered.len() >= limit as u64 {
                break;
            }
        }
        runs.sort_unstable_by_key(|r| r.start);
        ChainMap { runs, size }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Blocks that hold stored data (for `st_blocks`, export estimates).
    pub fn stored_blocks(&self) -> u64 {
        self.runs.iter().map(|r| r.len as u64).sum()
    }

    /// Index of the first run that ends after `block`.
    fn first_run_after(&self, block: u64) -> usize {
        self.runs.partition_point(|r| r.end() <= block)
    }

    /// Resolve `offset..offset+len` (clipped to the point's size) into extents that tile it.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        self.for_each_extent(offset, len, |e| out.push(e));
        out
    }

    /// Like `extents`, without allocating.
    pub fn for_each_extent(&self, offset: u64, len: u64, mut f: impl FnMut(Extent)) {
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        let mut i = self.first_run_after(offset >> BLOCK_SHIFT);
        while pos < end {
            match self.runs.get(i) {
                Some(run) if (run.start as u64) << BLOCK_SHIFT <= pos => {
                    let run_end = (run.end() << BLOCK_SHIFT).min(end);
                    let block = pos >> BLOCK_SHIFT;
                    f(Extent::Stored {
                        offset: pos,
                        len: run_end - pos,
                        layer: run.layer,
                        entry: run.first_entry + (block - run.start as u64) as u32,
                    });
                    pos = run_end;
                    i += 1;
                }
                Some(run) => {
                    let next = ((run.start as u64) << BLOCK_SHIFT).min(end);
                    f(Extent::Zero {
                        offset: pos,
                        len: next - pos,
                    });
                    pos = next;
                }
                None => {
                    f(Extent::Zero {
                        offset: pos,
                        len: end - pos,
                    });
                    pos = end;
                }
            }
        }
    }

    /// `lseek(SEEK_DATA)`: the first offset ≥ `offset` that may hold non-zero bytes.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let i = self.first_run_after(offset >> BLOCK_SHIFT);
        let run = self.runs.get(i)?;
        Some(offset.max((run.start as u64) << BLOCK_SHIFT).min(self.size))
            .filter(|&o| o < self.size)
    }

    /// `lseek(SEEK_HOLE)`: the first offset ≥ `offset` that reads as zero (the size at the end).
    pub fn next_hole(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let mut i = self.first_run_after(offset >> BLOCK_SHIFT);
        let mut pos = offset;
        while let Some(run) = self.runs.get(i) {
            if (run.start as u64) << BLOCK_SHIFT > pos {
                break;
            }
            pos = pos.max(run.end() << BLOCK_SHIFT);
            i += 1;
        }
        Some(pos.min(self.size))
    }
}

/// Byte offset of block `b`.
pub fn block_offset(b: u64) -> u64 {
    b * BLOCK_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The guide's procedure, block by block: coalesce each layer onto the one below.
    /// Returns, per block of the top point, Some((layer, entry)) or None for zeros.
    fn reference(layers: &[(RoaringBitmap, RoaringBitmap, u64)]) -> Vec<Option<(u32, u32)>> {
        let mut img: Vec<Option<(u32, u32)>> = Vec::new();
        for (j, (changed, data, size)) in layers.iter().enumerate() {
            let n = blocks_for(*size) as usize;
            img.resize(n, None);
            img.truncate(n);
            for b in changed.iter() {
                let b = b as usize;
                if b < n {
                    img[b] = if data.contains(b as u32) {
                        Some((j as u32, (data.rank(b as u32) - 1) as u32))
                    } else {
                        None
                    };
                }
            }
        }
        img
    }

    fn arb_layers() -> impl Strategy<Value = Vec<(RoaringBitmap, RoaringBitmap, u64)>> {
        prop::collection::vec(
            (
                1u64..40,
                prop::collection::vec((0u32..40, any::<bool>()), 0..30),
                any::<bool>(),
            ),
            1..12,
        )
        .prop_map(|ls| {
            ls.into_iter()
                .map(|(blocks, bits, odd)| {
                    let size = blocks * BLOCK_SIZE - if odd { 512 } else { 0 };
                    let mut changed = RoaringBitmap::new();
                    let mut data = RoaringBitmap::new();
                    for (b, is_data) in bits {
                        if (b as u64) < blocks {
                            changed.insert(b);
                            if is_data {
                                data.insert(b);
                            }
                        }
                    }
                    (changed, data, size)
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn map_matches_the_guides_coalescing(layers in arb_layers()) {
            let views: Vec<LayerView> = layers
                .iter()
                .map(|(c, d, s)| LayerView { changed: c, data: d, virtual_size: *s })
                .collect();
            let map = ChainMap::build(&views);
            let want = reference(&layers);
            let size = layers.last().unwrap().2;
            prop_assert_eq!(map.size(), size);
            // Every block, via single-block extents.
            for (b, w) in want.iter().enumerate() {
                let ex = map.extents(b as u64 * BLOCK_SIZE, BLOCK_SIZE);
                prop_assert_eq!(ex.len(), 1);
                let got = match ex[0] {
                    Extent::Zero { .. } => None,
                    Extent::Stored { layer, entry, .. } => Some((layer, entry)),
                };
                prop_assert_eq!(got, *w, "block {}", b);
            }
            // Arbitrary byte ranges tile exactly.
            for (off, len) in [(0, size), (1000, size), (BLOCK_SIZE - 1, 3 * BLOCK_SIZE), (size / 2, size)] {
                let ex = map.extents(off, len);
                let mut pos = off.min(size);
                for e in &ex {
                    prop_assert_eq!(e.offset(), pos);
                    prop_assert!(!e.is_empty());
                    pos += e.len();
                }
                prop_assert_eq!(pos, off.saturating_add(len).min(size).max(off.min(size)));
            }
            // SEEK_DATA / SEEK_HOLE agree with the reference.
            for b in 0..want.len() {
                let off = b as u64 * BLOCK_SIZE;
                let data_at = want[b..].iter().position(|w| w.is_some()).map(|i| ((b + i) as u64 * BLOCK_SIZE).max(off));
                prop_assert_eq!(map.next_data(off), data_at.filter(|&o| o < size));
                let hole_at = want[b..].iter().position(|w| w.is_none()).map(|i| (b + i) as u64 * BLOCK_SIZE).unwrap_or(size).min(size);
                prop_assert_eq!(map.next_hole(off), Some(hole_at));
            }
        }
    }

    #[test]
    fn depth_1000_resolves_like_depth_1() {
        let base_changed: RoaringBitmap = (0..65536u32).collect();
        let mut layers = vec![(base_changed.clone(), base_changed, 4u64 << 30)];
        for i in 0..1000u32 {
            let c: RoaringBitmap = [(i * 7919) % 65536, (i * 104729) % 65536]
                .into_iter()
                .collect();
            layers.push((c.clone(), c, 4u64 << 30));
        }
        let views: Vec<LayerView> = layers
            .iter()
            .map(|(c, d, s)| LayerView {
                changed: c,
                data: d,
                virtual_size: *s,
            })
            .collect();
        let map = ChainMap::build(&views);
        assert_eq!(map.stored_blocks(), 65536);
        let want = reference(&layers);
        for (b, w) in want.iter().enumerate().step_by(97) {
            let ex = map.extents(b as u64 * BLOCK_SIZE, 1);
            match ex[0] {
                Extent::Stored { layer, entry, .. } => assert_eq!(Some((layer, entry)), *w),
                Extent::Zero { .. } => assert_eq!(None, *w),
            }
        }
    }
}
