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
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;

use crate::bitmap::{self, BitmapError};
use crate::repo::{NewPoint, PointManifest, RepoError, Repository};
use crate::{BLOCK_SIZE, blocks_for};

/// Blocks read from the image per call (4 MiB).
const READ_BLOCKS: u64 = 64;

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
}

#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub vdi: String,
    pub disk_name: Option<String>,
    pub vm_uuid: Option<String>,
    pub vm_name: Option<String>,
    pub raw: PathBuf,
    /// The base64 bitmap text and where it came from (for messages).
    pub bitmap: Option<(String, String)>,
    pub time: i64,
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

/// Import `req.raw` into `repo`. `progress(done, total)` is called as blocks are read.
pub fn import_raw(
    repo: &Repository,
    req: &ImportRequest,
    mut progress: impl FnMut(u64, u64),
) -> Result<ImportReport, ImportError> {
    let img_err = |source: io::Error| ImportError::Image {
        path: req.raw.clone(),
        source,
    };
    let mut img = File::open(&req.raw).map_err(img_err)?;
    let size = image_size(&mut img).map_err(img_err)?;
    let blocks = blocks_for(size);
    let marked = match &req.bitmap {
        Some((text, from)) => {
            Some(
                bitmap::decode_base64(text, blocks).map_err(|source| ImportError::Bitmap {
                    path: from.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };

    let lock = repo.lock(&format!("cbtfs import {}", req.vdi))?;
    let known = repo.disk(&req.vdi)?;
    let newest = known.newest();
    let disk_name = req
        .disk_name
        .clone()
        .or_else(|| newest.map(|p| p.disk_name.clone()))
        .unwrap_or_else(|| format!("disk-{}", req.vdi.get(..8).unwrap_or(&req.vdi)));
    let (vm_uuid, vm_name) = if req.vm_uuid.is_some() || req.vm_name.is_some() {
        (req.vm_uuid.clone(), req.vm_name.clone())
    } else {
        (
            newest.and_then(|p| p.vm_uuid.clone()),
            newest.and_then(|p| p.vm_name.clone()),
        )
    };
    let mut w = repo.begin_point(
        &lock,
        NewPoint {
            vdi: req.vdi.clone(),
            disk_name,
            vm_uuid,
            vm_name,
            time: req.time,
            virtual_size: size,
            source: format!("import:{}", display_name(&req.raw)),
            new_set: marked.is_none(),
        },
    )?;

    // Which blocks to read, and whether zero blocks among them must be recorded.
    let (take, record_zeros) = match (&marked, w.previous()) {
        (None, _) => (full_range(blocks), false),
        (Some(m), prev) => {
            let mut take = m.clone();
            if let Some(prev) = prev {
                let prev_size = prev.virtual_size;
                if size > prev_size {
                    // Grown: everything from the old last (possibly partial) block on.
                    let mut grown = full_range(blocks);
                    grown.remove_range(..(prev_size / BLOCK_SIZE) as u32);
                    take |= grown;
                } else if size < prev_size && size % BLOCK_SIZE != 0 {
                    take.insert((size / BLOCK_SIZE) as u32);
                }
            }
            (take, true)
        }
    };

    let total = take.len();
    let mut done = 0u64;
    let mut buf = vec![0u8; (READ_BLOCKS * BLOCK_SIZE) as usize];
    let mut it = take.iter();
    while let Some(run) = it.next_range() {
        let (first, last) = (*run.start() as u64, *run.end() as u64);
        let mut b = first;
        while b <= last {
            let n = (last - b + 1).min(READ_BLOCKS);
            let off = b * BLOCK_SIZE;
            let len = (n * BLOCK_SIZE).min(size - off) as usize;
            img.read_exact_at(&mut buf[..len], off).map_err(img_err)?;
            for i in 0..n {
                let s = (i * BLOCK_SIZE) as usize;
                let e = (s + BLOCK_SIZE as usize).min(len);
                let block = &buf[s..e];
                if record_zeros || !crate::is_zero(block) {
                    w.add_block(b + i, block)?;
                }
            }
            b += n;
            done += n;
            progress(done, total);
        }
    }
    let manifest = w.commit()?;
    Ok(ImportReport {
        manifest,
        blocks_read: total,
    })
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
