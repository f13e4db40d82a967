//! Disk images of the simulated host, copy-on-write like a VHD chain: a snapshot freezes the
//! layers the disk has so far and the disk goes on writing into a fresh layer. A snapshot costs
//! nothing whatever the disk's size, as on a real SR.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use roaring::RoaringBitmap;

use crate::{BLOCK_SIZE, blocks_for};

/// One layer: the blocks written while it was the top, at their own offsets in a sparse file.
#[derive(Debug)]
pub struct Layer {
    file: File,
    path: PathBuf,
    /// A layer over an image supplied by the user is not ours to delete.
    owned: bool,
    blocks: RwLock<RoaringBitmap>,
}

impl Drop for Layer {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Layer {
    fn has(&self, b: u32) -> bool {
        self.blocks.read().map(|s| s.contains(b)).unwrap_or(false)
    }
}

/// A disk's contents: layers bottom to top; the top one is written when the disk is live.
#[derive(Debug, Clone)]
pub struct Image {
    size: u64,
    layers: Vec<Arc<Layer>>,
    dir: PathBuf,
}

fn new_layer(dir: &Path) -> io::Result<Arc<Layer>> {
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).map_err(|e| io::Error::other(e.to_string()))?;
    let name: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("layer-{name}.img"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok(Arc::new(Layer {
        file,
        path,
        owned: true,
        blocks: RwLock::new(RoaringBitmap::new()),
    }))
}

impl Image {
    /// An empty (all zero) disk of `size` bytes, its layers kept in `dir`.
    pub fn empty(dir: &Path, size: u64) -> io::Result<Image> {
        Ok(Image {
            size,
            layers: vec![new_layer(dir)?],
            dir: dir.to_path_buf(),
        })
    }

    /// A disk whose contents start as the raw image at `path` (read, never written).
    pub fn from_raw(dir: &Path, path: &Path) -> io::Result<Image> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        let mut all = RoaringBitmap::new();
        all.insert_range(0..blocks_for(size) as u32);
        let base = Arc::new(Layer {
            file,
            path: path.to_path_buf(),
            owned: false,
            blocks: RwLock::new(all),
        });
        Ok(Image {
            size,
            layers: vec![base, new_layer(dir)?],
            dir: dir.to_path_buf(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Which layer holds block `b` (None: never written, reads as zero).
    fn owner(&self, b: u32) -> Option<&Arc<Layer>> {
        self.layers.iter().rev().find(|l| l.has(b))
    }

    /// Read `buf.len()` bytes at `off`; past the end reads as zero.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let b = pos / BLOCK_SIZE;
            let in_block = (pos % BLOCK_SIZE) as usize;
            let n = (BLOCK_SIZE as usize - in_block).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match (pos < self.size).then(|| self.owner(b as u32)).flatten() {
                Some(layer) => {
                    let avail = (self.size - pos).min(n as u64) as usize;
                    read_full_at(&layer.file, &mut out[..avail], pos)?;
                    out[avail..].fill(0);
                }
                None => out.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Write `data` at `off` into the top layer (whole blocks are copied up first). Returns the
    /// blocks touched.
    pub fn write_at(&mut self, data: &[u8], off: u64) -> io::Result<Vec<u32>> {
        let end = off
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| io::Error::other("write past the end of the disk"))?;
        let top = self
            .layers
            .last()
            .cloned()
            .ok_or_else(|| io::Error::other("disk without layers"))?;
        let mut touched = Vec::new();
        if data.is_empty() {
            return Ok(touched);
        }
        for b in off / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
            let bstart = b * BLOCK_SIZE;
            let blen = BLOCK_SIZE.min(self.size - bstart) as usize;
            let mut block = vec![0u8; blen];
            self.read_at(&mut block, bstart)?;
            let from = off.max(bstart);
            let to = end.min(bstart + blen as u64);
            block[(from - bstart) as usize..(to - bstart) as usize]
                .copy_from_slice(&data[(from - off) as usize..(to - off) as usize]);
            top.file.write_all_at(&block, bstart)?;
            top.blocks
                .write()
                .map_err(|_| io::Error::other("poisoned"))?
                .insert(b as u32);
            touched.push(b as u32);
        }
        Ok(touched)
    }

    /// A frozen copy of the disk as it is now (the snapshot's contents); the disk itself goes
    /// on in a new top layer.
    pub fn freeze(&mut self) -> io::Result<Image> {
        let frozen = self.clone();
        self.layers.push(new_layer(&self.dir)?);
        Ok(frozen)
    }

    /// Grow the disk to `size` bytes; the new bytes read as zero.
    pub fn grow(&mut self, size: u64) {
        if size > self.size {
            self.size = size;
        }
    }

    /// A new empty top layer over exactly this image (for a restored copy to be written).
    pub fn replace_all(&mut self, size: u64) -> io::Result<()> {
        self.size = size;
        self.layers = vec![new_layer(&self.dir)?];
        Ok(())
    }
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    // The user's base image may be shorter than a block at its end: short reads are zeros.
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64)? {
            0 => {
                buf[done..].fill(0);
                break;
            }
            n => done += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_frozen_and_writes_copy_up() {
        let dir = tempfile::tempdir().unwrap();
        let size = 3 * BLOCK_SIZE + 100;
        let mut d = Image::empty(dir.path(), size).unwrap();
        d.write_at(&[1u8; 10], BLOCK_SIZE - 5).unwrap();
        let snap = d.freeze().unwrap();
        d.write_at(&[2u8; 3], BLOCK_SIZE - 1).unwrap();
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        snap.read_at(&mut a, 0).unwrap();
        d.read_at(&mut b, 0).unwrap();
        let mut want = vec![0u8; size as usize];
        want[(BLOCK_SIZE - 5) as usize..(BLOCK_SIZE + 5) as usize].fill(1);
        assert_eq!(a, want);
        want[(BLOCK_SIZE - 1) as usize..(BLOCK_SIZE + 2) as usize].fill(2);
        assert_eq!(b, want);
        assert!(d.write_at(&[1], size).is_err());
    }
}
