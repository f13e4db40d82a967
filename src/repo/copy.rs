//! Copying a disk's blocks into a point: the one loop behind `import` (a raw image, an NBD
//! export), `backup` (NBD, `/export_raw_vdi`) and `prune` (a point rewritten from its chain).
//!
//! Sources come two ways. One that can be read at any offset (a file, a point of the chain) is
//! pulled by [`copy_blocks`]: each run of wanted blocks is read [`READ_BLOCKS`] at a time into
//! one buffer, reused for the whole point. One that pushes its bytes (the NBD pool's pieces, an
//! HTTP body) hands them to a [`BlockCopy`] as they come, in ascending order. Either way the
//! bytes go to [`PointWriter::add_run`] with no copy of their own, and zero blocks are decided
//! there: recorded when the point records them (an increment, where a zero block hides older
//! data), skipped otherwise (a base, where a missing block reads as zeros anyway).

use roaring::RoaringBitmap;

use super::{PointWriter, RepoError};
use crate::{BLOCK_SIZE, blocks_for};

/// Blocks read from a pulled source per call (4 MiB): large enough that a read costs little
/// per byte, small enough to stay in cache while the writer checksums it.
pub const READ_BLOCKS: u64 = 64;

/// Consecutive blocks, for messages: `block 5 (byte 327680)` or `blocks 64 to 127 (bytes
/// 4194304 to 8388607)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub first: u64,
    /// Inclusive.
    pub last: u64,
}

impl std::fmt::Display for BlockRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |b: u64| b.saturating_mul(BLOCK_SIZE);
        if self.first == self.last {
            write!(f, "block {} (byte {})", self.first, at(self.first))
        } else {
            write!(
                f,
                "blocks {} to {} (bytes {} to {})",
                self.first,
                self.last,
                at(self.first),
                at(self.last.saturating_add(1)).saturating_sub(1)
            )
        }
    }
}

/// Why a copy stopped: the source could not give a block, or the point could not take it.
#[derive(Debug, thiserror::Error)]
pub enum CopyError<E> {
    #[error("reading {blocks}: {source}")]
    Read {
        blocks: BlockRange,
        #[source]
        source: E,
    },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// A disk that can be read at any offset.
pub trait BlockSource {
    type Error;
    /// Fill all of `buf` with the disk's bytes from `offset` (never past the disk's end; a
    /// short read is an error).
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), Self::Error>;
}

impl<E, F: FnMut(&mut [u8], u64) -> Result<(), E>> BlockSource for F {
    type Error = E;
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), E> {
        self(buf, offset)
    }
}

/// Blocks pushed into a point in ascending order, with progress.
pub struct BlockCopy<'w, 'l, P: FnMut(u64, u64)> {
    writer: &'w mut PointWriter<'l>,
    /// The blocks kept among those handed over (None: every one).
    take: Option<&'w RoaringBitmap>,
    record_zeros: bool,
    done: u64,
    total: u64,
    progress: P,
}

impl<'w, 'l, P: FnMut(u64, u64)> BlockCopy<'w, 'l, P> {
    /// Copy into `writer` the blocks of `take` (None: every block handed over), recording zero
    /// blocks when `record_zeros`. `progress(done, total)` hears, after each hand-over, how many
    /// blocks were handed over so far (kept or not) out of `total`.
    pub fn new(
        writer: &'w mut PointWriter<'l>,
        take: Option<&'w RoaringBitmap>,
        record_zeros: bool,
        total: u64,
        progress: P,
    ) -> Self {
        BlockCopy {
            writer,
            take,
            record_zeros,
            done: 0,
            total,
            progress,
        }
    }

    /// Hand over the consecutive blocks from `first`, back to back in `bytes` (whole blocks;
    /// only the disk's last may be short). Blocks must come in ascending order, each once.
    pub fn put(&mut self, first: u64, bytes: &[u8]) -> Result<(), RepoError> {
        let bs = BLOCK_SIZE as usize;
        match self.take {
            None => self.writer.add_run(first, bytes, self.record_zeros)?,
            Some(take) => {
                // Each stretch of kept blocks goes to the writer in one call.
                let kept =
                    |k: usize| u32::try_from(first + k as u64).is_ok_and(|b| take.contains(b));
                let n = bytes.len().div_ceil(bs);
                let mut k = 0;
                while k < n {
                    if !kept(k) {
                        k += 1;
                        continue;
                    }
                    let start = k;
                    while k < n && kept(k) {
                        k += 1;
                    }
                    let end = (k * bs).min(bytes.len());
                    self.writer.add_run(
                        first + start as u64,
                        &bytes[start * bs..end],
                        self.record_zeros,
                    )?;
                }
            }
        }
        self.done += blocks_for(bytes.len() as u64);
        (self.progress)(self.done, self.total);
        Ok(())
    }
}

/// Copy the blocks of `take` from `source` into `writer`, recording zero blocks when
/// `record_zeros`. `progress(done, total)` counts the blocks of `take` copied so far. An error
/// of the source names the block that could not be read.
pub fn copy_blocks<S: BlockSource>(
    writer: &mut PointWriter<'_>,
    source: &mut S,
    take: &RoaringBitmap,
    record_zeros: bool,
    progress: impl FnMut(u64, u64),
) -> Result<(), CopyError<S::Error>> {
    let size = writer.virtual_size();
    let mut buf = vec![0u8; (READ_BLOCKS * BLOCK_SIZE) as usize];
    let mut copy = BlockCopy::new(writer, None, record_zeros, take.len(), progress);
    let mut runs = take.iter();
    while let Some(run) = runs.next_range() {
        let (first, last) = (u64::from(*run.start()), u64::from(*run.end()));
        if last >= blocks_for(size) {
            // Reading would stop at the disk's end and leave the rest of the run out.
            return Err(CopyError::Repo(RepoError::Invalid(format!(
                "internal: blocks {first} to {last} to copy go past the disk's {} blocks",
                blocks_for(size)
            ))));
        }
        let mut b = first;
        while b <= last {
            let n = (last - b + 1).min(READ_BLOCKS);
            let off = b * BLOCK_SIZE;
            let len = (n * BLOCK_SIZE).min(size - off) as usize;
            let chunk = &mut buf[..len];
            if let Err(e) = source.read_exact_at(chunk, off) {
                return Err(narrow(source, chunk, b, n, e));
            }
            copy.put(b, chunk)?;
            b += n;
        }
    }
    Ok(())
}

/// The error for a failed read of blocks `first..first + n` held in `buf`: the first of them
/// that fails alone, or all of them when each reads alone (the first error then stands).
fn narrow<S: BlockSource>(
    source: &mut S,
    buf: &mut [u8],
    first: u64,
    n: u64,
    error: S::Error,
) -> CopyError<S::Error> {
    let bs = BLOCK_SIZE as usize;
    if n > 1 {
        for (k, block) in buf.chunks_mut(bs).enumerate() {
            let b = first + k as u64;
            if let Err(source) = source.read_exact_at(block, b * BLOCK_SIZE) {
                return CopyError::Read {
                    blocks: BlockRange { first: b, last: b },
                    source,
                };
            }
        }
    }
    CopyError::Read {
        blocks: BlockRange {
            first,
            last: first + n.saturating_sub(1),
        },
        source: error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::NewPoint;

    const BS: usize = BLOCK_SIZE as usize;
    /// 200 whole blocks and a short last one.
    const SIZE: u64 = 200 * BLOCK_SIZE + 1000;

    /// The disk: block `b` is zero when `b % 5 == 0` (block 200, the short one, is not), else
    /// filled with a byte from its number.
    fn disk() -> Vec<u8> {
        let mut d = vec![0u8; SIZE as usize];
        for (b, block) in d.chunks_mut(BS).enumerate() {
            if b % 5 != 0 || b == 200 {
                block.fill(b as u8 ^ 0xa5);
            }
        }
        d
    }

    fn bitmap(ranges: &[std::ops::RangeInclusive<u32>]) -> RoaringBitmap {
        let mut t = RoaringBitmap::new();
        for r in ranges {
            t.insert_range(r.clone());
        }
        t
    }

    fn spec() -> NewPoint {
        crate::repo::testing::bare_point(
            "00000000-0000-4000-8000-000000000001",
            1_700_000_000,
            SIZE,
            true,
        )
    }

    /// A point of `SIZE` written by `fill`, as (its data bytes, its index entries and bitmaps).
    fn point(
        fill: impl FnOnce(&mut PointWriter<'_>) -> Result<(), RepoError>,
    ) -> (Vec<u8>, String) {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::repo::testing::init(&dir.path().join("r"));
        let lock = repo.lock_exclusive("test").unwrap();
        let mut w = repo.begin_point(&lock, spec()).unwrap();
        fill(&mut w).unwrap();
        let m = w.commit().unwrap();
        let p = repo.open_point(&m).unwrap();
        let entries: Vec<_> = p.index.chunk_ids().collect();
        let mut data = vec![0u8; entries.len() * BS];
        repo.read_chunks(&entries, &mut data).unwrap();
        let bits = |b: &RoaringBitmap| b.iter().collect::<Vec<u32>>();
        // Chunk ids are keyed per repository: the bitmaps and the bytes are what must agree.
        let index = format!(
            "changed {:?} stored {:?}",
            bits(&p.index.changed),
            bits(&p.index.data)
        );
        (data, index)
    }

    /// The point as the loops before this module wrote it: block by block, zero blocks
    /// recorded only when `record_zeros`.
    fn reference(take: &RoaringBitmap, record_zeros: bool) -> (Vec<u8>, String) {
        let d = disk();
        point(|w| {
            for b in take {
                let block = d.chunks(BS).nth(b as usize).unwrap();
                if record_zeros || !crate::is_zero(block) {
                    w.add_block(b.into(), block)?;
                }
            }
            Ok(())
        })
    }

    #[test]
    fn pulled_runs_split_at_their_ends_and_every_read_blocks() {
        // A run longer than two reads, zero blocks inside runs, a one-block run, the short end.
        let take = bitmap(&[0..=129, 140..=141, 150..=150, 197..=200]);
        for record_zeros in [false, true] {
            let d = disk();
            let mut reads = Vec::new();
            let mut progress = Vec::new();
            let got = point(|w| {
                let mut source = |buf: &mut [u8], off: u64| {
                    reads.push((off / BLOCK_SIZE, buf.len()));
                    buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
                    Ok::<(), String>(())
                };
                copy_blocks(w, &mut source, &take, record_zeros, |d, t| {
                    progress.push((d, t))
                })
                .map_err(|e| match e {
                    CopyError::Repo(e) => e,
                    CopyError::Read { .. } => unreachable!("the source never fails"),
                })
            });
            assert_eq!(
                reads,
                vec![
                    (0, 64 * BS),
                    (64, 64 * BS),
                    (128, 2 * BS),
                    (140, 2 * BS),
                    (150, BS),
                    (197, 3 * BS + 1000)
                ]
            );
            assert_eq!(
                progress,
                vec![
                    (64, 137),
                    (128, 137),
                    (130, 137),
                    (132, 137),
                    (133, 137),
                    (137, 137)
                ]
            );
            assert_eq!(
                got,
                reference(&take, record_zeros),
                "record_zeros={record_zeros}"
            );
        }
        // Zero blocks: recorded (they hide older data) or left out, never stored.
        let (_, with) = reference(&take, true);
        let (_, without) = reference(&take, false);
        assert!(with.contains("changed [0, 1, 2,"), "{with}");
        assert!(without.contains("changed [1, 2, 3, 4, 6,"), "{without}");
        assert!(with.contains("stored [1, 2, 3, 4, 6,"), "{with}");
    }

    #[test]
    fn pushed_blocks_keep_only_the_bitmaps_and_count_every_one() {
        let take = bitmap(&[3..=70, 100..=100, 127..=129, 199..=200]);
        for record_zeros in [false, true] {
            let d = disk();
            let mut progress = Vec::new();
            let got = point(|w| {
                let mut copy = BlockCopy::new(w, Some(&take), record_zeros, 201, |d, t| {
                    progress.push((d, t))
                });
                // The whole disk, in hand-overs that cut runs of `take` anywhere.
                for (first, last) in [(0, 63), (64, 127), (128, 128), (129, 200)] {
                    let end = ((last + 1) * BS).min(d.len());
                    copy.put(first as u64, &d[first * BS..end])?;
                }
                Ok(())
            });
            assert_eq!(
                progress,
                vec![(64, 201), (128, 201), (129, 201), (201, 201)]
            );
            assert_eq!(
                got,
                reference(&take, record_zeros),
                "record_zeros={record_zeros}"
            );
        }
    }

    #[test]
    fn a_failed_read_names_the_block() {
        let take = bitmap(&[0..=200]);
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::repo::testing::init(&dir.path().join("r"));
        let lock = repo.lock_exclusive("test").unwrap();
        // Block 70 cannot be read: the 4 MiB read holding it fails, then it alone.
        let mut w = repo.begin_point(&lock, spec()).unwrap();
        let mut bad = |buf: &mut [u8], off: u64| {
            let (first, end) = (
                off / BLOCK_SIZE,
                (off + buf.len() as u64).div_ceil(BLOCK_SIZE),
            );
            if (first..end).contains(&70) {
                return Err("Input/output error".to_string());
            }
            buf.fill(1);
            Ok(())
        };
        let e = copy_blocks(&mut w, &mut bad, &take, false, |_, _| {}).unwrap_err();
        assert!(
            matches!(
                e,
                CopyError::Read {
                    blocks: BlockRange {
                        first: 70,
                        last: 70
                    },
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "reading block 70 (byte 4587520): Input/output error"
        );
        drop(w);
        // A failure no single block repeats is told for the whole read.
        let mut w = repo.begin_point(&lock, spec()).unwrap();
        let mut flaky = |buf: &mut [u8], off: u64| {
            if off == 64 * BLOCK_SIZE && buf.len() > BS {
                return Err("timed out".to_string());
            }
            buf.fill(1);
            Ok(())
        };
        let e = copy_blocks(&mut w, &mut flaky, &take, false, |_, _| {}).unwrap_err();
        assert_eq!(
            e.to_string(),
            "reading blocks 64 to 127 (bytes 4194304 to 8388607): timed out"
        );
    }

    #[test]
    fn a_block_outside_the_disk_is_refused() {
        let take = bitmap(&[199..=201]);
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::repo::testing::init(&dir.path().join("r"));
        let lock = repo.lock_exclusive("test").unwrap();
        let mut w = repo.begin_point(&lock, spec()).unwrap();
        let mut zeros = |buf: &mut [u8], _: u64| {
            buf.fill(0);
            Ok::<(), String>(())
        };
        let e = copy_blocks(&mut w, &mut zeros, &take, true, |_, _| {}).unwrap_err();
        assert!(matches!(e, CopyError::Repo(_)), "{e:?}");
    }
}
