//! `cbtfs import`: a raw image (and optionally a CBT bitmap) becomes a restore point.
//!
//! Without a bitmap the image is a full base and starts a new set; all-zero blocks are skipped.
//! With a bitmap (as `VDI.list_changed_blocks` returns it) only the marked blocks are taken, as the
//! next point of the disk's newest set. Two cases the bitmap cannot speak for are decided here:
//! * the disk grew: blocks past the previous point's size have no older data, so every non-zero
//!   block there is taken whether marked or not (a zero one reads as zero anyway);
//! * the disk shrank to a size that is not a multiple of 64 KiB: its last, partial block is
//!   stored, so bytes past the shrink never show through again if the disk grows later.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;

use crate::bitmap::{self, BitmapError};
use crate::repo::copy::{BlockCopy, BlockRange, CopyError, copy_blocks};
use crate::repo::{NewPoint, PointManifest, RepoError, Repository};
use crate::{BLOCK_SIZE, blocks_for};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("bitmap {path}: {source}")]
    Bitmap {
        path: String,
        #[source]
        source: BitmapError,
    },
    #[error("image {path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path}: reading {blocks}: {source}")]
    ImageRead {
        path: PathBuf,
        blocks: BlockRange,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Fetch(#[from] crate::nbd::FetchError),
    #[error(transparent)]
    Nbd(#[from] crate::nbd::NbdError),
    #[error("{0}")]
    Runtime(String),
    #[error(
        "{target} states an export size of {size} bytes, above the {max} bytes a point can hold; nothing was imported"
    )]
    ExportTooLarge { target: String, size: u64, max: u64 },
}

/// Where a point's bytes come from.
#[derive(Debug, Clone)]
pub enum ImportSource {
    /// A raw image file or block device.
    Raw(PathBuf),
    /// An NBD export.
    Nbd {
        target: crate::nbd::Target,
        options: crate::nbd::FetchOptions,
    },
}

#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub vdi: String,
    pub disk_name: Option<String>,
    pub vm_uuid: Option<String>,
    pub vm_name: Option<String>,
    pub source: ImportSource,
    /// The base64 bitmap text and where it came from (for messages).
    pub bitmap: Option<(String, String)>,
    pub time: i64,
    /// The host snapshot the bytes come from (backup).
    pub snapshot: Option<String>,
    /// VM metadata to keep with the point (backup).
    pub vm_metadata: Option<Vec<u8>>,
    /// The VDI's type on the host (`user`, `system`), for a restore into a new VDI.
    pub vdi_type: Option<String>,
    /// Overrides the point's recorded source (`backup:HOST`).
    pub source_label: Option<String>,
    /// The point's place in a whole-VM backup run (backup).
    pub vm_run: Option<crate::repo::VmRun>,
}

#[derive(Debug, Clone)]
pub struct ImportReport {
    pub manifest: PointManifest,
    pub blocks_read: u64,
}

fn image_size(f: &mut File) -> io::Result<u64> {
    // Works for regular files and block devices alike.
    let n = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n)
}

/// Import `req` into `repo`. `progress(done, total)` counts blocks.
pub fn import_raw(
    repo: &Repository,
    req: &ImportRequest,
    progress: impl FnMut(u64, u64),
) -> Result<ImportReport, ImportError> {
    match &req.source {
        ImportSource::Raw(path) => {
            let holder = format!("cbtfs import {}", req.vdi);
            let shared = repo.lock_shared(&holder)?;
            let lock = shared.lock_disk(&req.vdi, &holder)?;
            let r = import_file(repo, &lock, req, path, progress);
            drop(lock);
            drop(shared);
            collect_dead_writers(repo, &holder);
            r
        }
        ImportSource::Nbd { target, options } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| ImportError::Runtime(e.to_string()))?;
            let holder = format!("cbtfs import {}", req.vdi);
            let r = rt.block_on(async {
                let pool = crate::nbd::Pool::open(target.clone(), *options).await?;
                let shared = repo.lock_shared(&holder)?;
                let lock = shared.lock_disk(&req.vdi, &holder)?;
                import_nbd(repo, &lock, req, pool, progress).await
            });
            collect_dead_writers(repo, &holder);
            r
        }
    }
}

/// Collect what dead writers left once this import's locks are gone (logged, never an error:
/// the import is done; `Repository::collect_dead_writers`).
fn collect_dead_writers(repo: &Repository, holder: &str) {
    match repo.collect_dead_writers(holder) {
        Ok(c) => tracing::debug!(?c, "dead writers"),
        Err(e) => {
            tracing::warn!(error = %e, "could not collect what an interrupted writer left; `cbtfs gc` does it")
        }
    }
}

/// The parsed bitmap, if any, for a disk of `blocks` blocks.
pub(crate) fn marked_blocks(
    req: &ImportRequest,
    blocks: u64,
) -> Result<Option<RoaringBitmap>, ImportError> {
    match &req.bitmap {
        Some((text, from)) => Ok(Some(bitmap::decode_base64(text, blocks).map_err(
            |source| ImportError::Bitmap {
                path: from.clone(),
                source,
            },
        )?)),
        None => Ok(None),
    }
}

/// Start the point: the lock, names carried over from the disk's newest point, set and seq.
pub(crate) fn begin<'l>(
    repo: &Repository,
    lock: &'l dyn crate::repo::DiskWriteLock,
    req: &ImportRequest,
    size: u64,
    source: String,
    new_set: bool,
) -> Result<crate::repo::PointWriter<'l>, ImportError> {
    let known = repo.disk(&req.vdi)?;
    let newest = known.newest();
    let disk_name = req
        .disk_name
        .clone()
        .or_else(|| newest.map(|p| p.disk_name.clone()))
        .unwrap_or_else(|| format!("disk-{}", req.vdi.get(..8).unwrap_or(&req.vdi)));
    // The VM: what was given; what was not given is kept from the disk's newest point when
    // that point names the same VM (`--vm-name web01` alone keeps web01's uuid), so one half
    // given never moves a disk out of its VM's folder.
    let (vm_uuid, vm_name) = match (&req.vm_uuid, &req.vm_name) {
        (None, None) => (
            newest.and_then(|p| p.vm_uuid.clone()),
            newest.and_then(|p| p.vm_name.clone()),
        ),
        (Some(u), None) => (
            Some(u.clone()),
            newest
                .filter(|p| p.vm_uuid.as_ref() == Some(u))
                .and_then(|p| p.vm_name.clone()),
        ),
        (None, Some(n)) => (
            newest
                .filter(|p| p.vm_name.as_ref() == Some(n))
                .and_then(|p| p.vm_uuid.clone()),
            Some(n.clone()),
        ),
        (Some(u), Some(n)) => (Some(u.clone()), Some(n.clone())),
    };
    Ok(repo.begin_point(
        lock,
        NewPoint {
            vdi: req.vdi.clone(),
            disk_name,
            vm_uuid,
            vm_name,
            time: req.time,
            virtual_size: size,
            source: req.source_label.clone().unwrap_or(source),
            new_set,
            snapshot: req.snapshot.clone(),
            vm_metadata: req.vm_metadata.clone(),
            vdi_type: req
                .vdi_type
                .clone()
                .or_else(|| newest.and_then(|p| p.vdi_type.clone())),
            vm_run: req.vm_run.clone(),
        },
    )?)
}

/// Which blocks to read, and whether zero blocks among them must be recorded (an incremental
/// point records them: they hide older data; a base skips them).
pub(crate) fn plan(
    marked: Option<&RoaringBitmap>,
    previous: Option<&PointManifest>,
    size: u64,
) -> (RoaringBitmap, bool) {
    let blocks = blocks_for(size);
    match marked {
        None => (full_range(blocks), false),
        Some(m) => {
            let mut take = m.clone();
            if let Some(prev) = previous {
                let prev_size = prev.virtual_size;
                if size > prev_size {
                    // Grown: everything from the old last (possibly partial) block on.
                    let mut grown = full_range(blocks);
                    grown.remove_range(..(prev_size / BLOCK_SIZE) as u32);
                    take |= grown;
                } else if size < prev_size && !size.is_multiple_of(BLOCK_SIZE) {
                    take.insert((size / BLOCK_SIZE) as u32);
                }
            }
            (take, true)
        }
    }
}

fn import_file(
    repo: &Repository,
    lock: &dyn crate::repo::DiskWriteLock,
    req: &ImportRequest,
    path: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<ImportReport, ImportError> {
    let img_err = |source: io::Error| ImportError::Image {
        path: path.to_path_buf(),
        source,
    };
    let mut img = File::open(path).map_err(img_err)?;
    let size = image_size(&mut img).map_err(img_err)?;
    let marked = marked_blocks(req, blocks_for(size))?;
    let mut w = begin(
        repo,
        lock,
        req,
        size,
        format!("import:{}", display_name(path)),
        marked.is_none(),
    )?;
    let (mut take, record_zeros) = plan(marked.as_ref(), w.previous(), size);
    // Blocks that hold no data in the file (holes) read as zeros without a read. A base
    // leaves them out, as it leaves out every zero block; an increment records them as zero
    // blocks, as it records every zero block it takes.
    let data = data_blocks(&img, size).map_err(img_err)?;
    match &data {
        Some(d) => tracing::debug!(
            data_blocks = d.len(),
            blocks = blocks_for(size),
            "holes found"
        ),
        None => tracing::debug!("the image's filesystem cannot tell holes; reading everything"),
    }
    if let (Some(data), false) = (&data, record_zeros) {
        take &= data;
    }
    let mut image = |buf: &mut [u8], off: u64| read_skipping_holes(&img, data.as_ref(), buf, off);
    copy_blocks(&mut w, &mut image, &take, record_zeros, progress).map_err(|e| match e {
        CopyError::Read { blocks, source } => ImportError::ImageRead {
            path: path.to_path_buf(),
            blocks,
            source,
        },
        CopyError::Repo(e) => ImportError::Repo(e),
    })?;
    let manifest = w.commit()?;
    Ok(ImportReport {
        manifest,
        blocks_read: take.len(),
    })
}

/// Fetch a point over NBD through `pool` (closed before returning): the bitmap's blocks, or a
/// whole base (skipping what block status reports as holes). Nothing is committed unless every
/// block arrived.
pub async fn import_nbd(
    repo: &Repository,
    lock: &dyn crate::repo::DiskWriteLock,
    req: &ImportRequest,
    mut pool: crate::nbd::Pool,
    progress: impl FnMut(u64, u64),
) -> Result<ImportReport, ImportError> {
    let target = pool.target().clone();
    // The client only gets here with a size the server stated (NBD_INFO_EXPORT, or the
    // EXPORT_NAME reply); an absurd one is refused before anything is planned from it.
    let size = pool.info.size;
    if size > crate::repo::MAX_VIRTUAL_SIZE {
        pool.close().await;
        return Err(ImportError::ExportTooLarge {
            target: target.describe(),
            size,
            max: crate::repo::MAX_VIRTUAL_SIZE,
        });
    }
    let marked = marked_blocks(req, blocks_for(size))?;
    let allocated = if marked.is_none() {
        match pool.allocated().await {
            Ok(a) => a,
            Err(e) => {
                pool.close().await;
                return Err(e.into());
            }
        }
    } else {
        None
    };
    let mut w = begin(
        repo,
        lock,
        req,
        size,
        format!("nbd:{}", target.describe()),
        marked.is_none(),
    )?;
    let (mut take, record_zeros) = plan(marked.as_ref(), w.previous(), size);
    if let Some(extents) = allocated {
        // Only blocks overlapping data extents can hold anything.
        let mut data = RoaringBitmap::new();
        for (o, l) in extents {
            let first = (o / BLOCK_SIZE) as u32;
            let end = blocks_for(o + l).min(u32::MAX as u64) as u32;
            data.insert_range(first..end);
        }
        take &= data;
    }
    let total = take.len();
    let mut extents = Vec::new();
    let mut it = take.iter();
    while let Some(run) = it.next_range() {
        let off = *run.start() as u64 * BLOCK_SIZE;
        let end = ((*run.end() as u64 + 1) * BLOCK_SIZE).min(size);
        extents.push((off, end - off));
    }
    let mut copy = BlockCopy::new(&mut w, None, record_zeros, total, progress);
    let mut failure = None;
    let fetched = pool
        .fetch(&extents, |off, data| {
            copy.put(off / BLOCK_SIZE, data).map_err(|e| {
                let msg = e.to_string();
                failure = Some(e);
                msg
            })
        })
        .await;
    // Every connection ends cleanly before the point commits (or the error is reported).
    pool.close().await;
    fetched.map_err(|e| match failure.take() {
        Some(r) => ImportError::Repo(r),
        None => ImportError::Fetch(e),
    })?;
    let manifest = w.commit()?;
    Ok(ImportReport {
        manifest,
        blocks_read: total,
    })
}

/// Call `each(offset, len)` for every range of `file`'s first `size` bytes that may hold data,
/// in ascending order, as the filesystem reports them with `lseek(SEEK_DATA / SEEK_HOLE)`;
/// what lies between them are holes (zeros). A range's ends are the filesystem's blocks, so a
/// range may begin or end with zeros. Returns `false` if the file cannot tell (a filesystem
/// without `SEEK_DATA`): then every byte may be data. A block device reports all of itself as
/// data.
pub fn data_ranges(file: &File, size: u64, mut each: impl FnMut(u64, u64)) -> io::Result<bool> {
    let fd = file.as_raw_fd();
    let seek = |pos: u64, whence: i32| -> io::Result<Option<u64>> {
        let Ok(at) = libc::off_t::try_from(pos) else {
            return Ok(None);
        };
        // SAFETY: lseek on a descriptor `file` owns; it moves only that descriptor's offset,
        // which nothing here uses (reads are positional).
        let r = unsafe { libc::lseek(fd, at, whence) };
        if r >= 0 {
            return Ok(u64::try_from(r).ok());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // No data (for SEEK_DATA) or nothing at all (the file shrank) from `pos` on.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let unsupported = |e: &io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
        )
    };
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(pos, libc::SEEK_DATA) {
            Ok(Some(s)) if s < size => s,
            Ok(_) => break,
            Err(e) if unsupported(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        let end = match seek(start, libc::SEEK_HOLE) {
            Ok(Some(h)) => h.min(size),
            Ok(None) => size,
            Err(e) if unsupported(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        // Each step must move forward: anything else is a filesystem not to be trusted with
        // holes (and a loop that would never end).
        if start < pos || end <= start {
            tracing::debug!(
                pos,
                start,
                end,
                "SEEK_DATA/SEEK_HOLE went backwards; reading everything"
            );
            return Ok(false);
        }
        each(start, end - start);
        pos = end;
    }
    Ok(true)
}

/// The blocks of `file` (of `size` bytes) that overlap data ranges (see [`data_ranges`]), or
/// `None` if the file cannot tell its holes (every block may hold data).
pub fn data_blocks(file: &File, size: u64) -> io::Result<Option<RoaringBitmap>> {
    let mut blocks = RoaringBitmap::new();
    let known = data_ranges(file, size, |off, len| {
        let first = (off / BLOCK_SIZE).min(u32::MAX as u64) as u32;
        let end = blocks_for(off.saturating_add(len)).min(u32::MAX as u64) as u32;
        blocks.insert_range(first..end);
    })?;
    Ok(known.then_some(blocks))
}

/// Fill `buf` from `offset` of `img`: blocks outside `data` (holes) are zeros, not read. Only a
/// read starting at a block boundary is split so; any other reads everything.
fn read_skipping_holes(
    img: &File,
    data: Option<&RoaringBitmap>,
    buf: &mut [u8],
    offset: u64,
) -> io::Result<()> {
    let Some(data) = data.filter(|_| offset.is_multiple_of(BLOCK_SIZE)) else {
        return img.read_exact_at(buf, offset);
    };
    let bs = BLOCK_SIZE as usize;
    let first = offset / BLOCK_SIZE;
    let has = |k: usize| u32::try_from(first + k as u64).is_ok_and(|b| data.contains(b));
    let n = buf.len().div_ceil(bs);
    let mut k = 0;
    while k < n {
        let start = k;
        let stored = has(k);
        while k < n && has(k) == stored {
            k += 1;
        }
        let (from, to) = (start * bs, (k * bs).min(buf.len()));
        let part = &mut buf[from..to];
        if stored {
            img.read_exact_at(part, offset + from as u64)?;
        } else {
            part.fill(0);
        }
    }
    Ok(())
}

fn full_range(blocks: u64) -> RoaringBitmap {
    let mut r = RoaringBitmap::new();
    if blocks > 0 {
        r.insert_range(0..blocks.min(u32::MAX as u64) as u32);
    }
    r
}

fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    /// A sparse file of `size` bytes with `fill` bytes written at each of `at`.
    fn sparse(dir: &Path, size: u64, at: &[(u64, u64)], fill: u8) -> File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("img"))
            .unwrap();
        f.set_len(size).unwrap();
        for &(off, len) in at {
            f.write_all_at(&vec![fill; len as usize], off).unwrap();
        }
        f
    }

    fn ranges(f: &File, size: u64) -> (bool, Vec<(u64, u64)>) {
        let mut v = Vec::new();
        let known = data_ranges(f, size, |o, l| v.push((o, l))).unwrap();
        (known, v)
    }

    #[test]
    fn data_ranges_are_the_written_ranges() {
        let d = tempfile::tempdir().unwrap();
        // Filesystem-block aligned (4 KiB), so the filesystem reports exactly these; the first
        // at the start, the last ending at the file's end, two that touch and merge.
        let size = 64 * MIB;
        let written = [
            (0, 4096),
            (MIB, 8192),
            (5 * MIB + 4096, 8192),
            (5 * MIB + 12288, 4096),
            (40 * MIB + 65536, 3 * MIB),
            (size - 4096, 4096),
        ];
        let f = sparse(d.path(), size, &written, 0xa5);
        let (known, got) = ranges(&f, size);
        assert!(known, "this filesystem has no SEEK_DATA: holes go untested");
        assert_eq!(
            got,
            [
                (0, 4096),
                (MIB, 8192),
                (5 * MIB + 4096, 12288),
                (40 * MIB + 65536, 3 * MIB),
                (size - 4096, 4096),
            ]
        );
        // Looking at less than the whole file stops at `size`.
        assert_eq!(ranges(&f, MIB + 4096).1, [(0, 4096), (MIB, 4096)]);
        // The blocks holding data: a 4 KiB range inside a block takes the whole block, one
        // crossing a block boundary takes both.
        let blocks = data_blocks(&f, size).unwrap().unwrap();
        let b = |off: u64| (off / BLOCK_SIZE) as u32;
        let mut want: Vec<u32> = vec![0, b(MIB), b(5 * MIB)];
        want.extend(b(40 * MIB + 65536)..b(43 * MIB + 65536));
        want.push(b(size - 1));
        assert_eq!(blocks.iter().collect::<Vec<_>>(), want);
    }

    #[test]
    fn a_file_without_data_has_no_ranges_and_one_without_holes_one() {
        let d = tempfile::tempdir().unwrap();
        let f = sparse(d.path(), 10 * MIB, &[], 0);
        assert_eq!(ranges(&f, 10 * MIB), (true, vec![]));
        assert_eq!(ranges(&f, 0), (true, vec![]));
        let full = d.path().join("full");
        std::fs::write(&full, vec![1u8; 300_000]).unwrap();
        let f = File::open(&full).unwrap();
        assert_eq!(ranges(&f, 300_000), (true, vec![(0, 300_000)]));
        let blocks = data_blocks(&f, 300_000).unwrap().unwrap();
        assert_eq!(blocks.iter().collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_file_that_cannot_tell_its_holes_is_all_data() {
        // procfs files refuse SEEK_DATA (EINVAL), as filesystems without it do.
        let f = File::open("/proc/self/status").unwrap();
        assert_eq!(ranges(&f, 4096), (false, vec![]));
        assert!(data_blocks(&f, 4096).unwrap().is_none());
    }

    #[test]
    fn holes_read_as_zeros_without_being_read() {
        let d = tempfile::tempdir().unwrap();
        let bs = BLOCK_SIZE;
        let size = 10 * bs + 1000;
        let f = sparse(d.path(), size, &[(0, size)], 7);
        // Blocks 2, 3 and the short last one (10) are "data"; the others are taken for holes,
        // so what the file holds there must not be read.
        let data: RoaringBitmap = [2u32, 3, 10].into_iter().collect();
        let mut buf = vec![1u8; size as usize];
        read_skipping_holes(&f, Some(&data), &mut buf, 0).unwrap();
        for (b, block) in buf.chunks(bs as usize).enumerate() {
            let want = if [2, 3, 10].contains(&b) { 7 } else { 0 };
            assert!(block.iter().all(|&x| x == want), "block {b}");
        }
        // From a later block, and a read not on a block boundary reads everything.
        let mut buf = vec![1u8; 3 * bs as usize];
        read_skipping_holes(&f, Some(&data), &mut buf, bs).unwrap();
        assert!(buf[..bs as usize].iter().all(|&x| x == 0));
        assert!(buf[bs as usize..].iter().all(|&x| x == 7));
        let mut buf = vec![1u8; 100];
        read_skipping_holes(&f, Some(&data), &mut buf, 5).unwrap();
        assert!(buf.iter().all(|&x| x == 7));
        // Past the end is an error, never zeros.
        let mut buf = vec![1u8; 2000];
        let e = read_skipping_holes(&f, Some(&data), &mut buf, 10 * bs).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
