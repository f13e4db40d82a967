//! A writable copy-on-write view of a restore point's volumes, served over a private FUSE mount.
//!
//! `browse` loop-mounts a point's filesystems through it. Real backups are crash-consistent
//! snapshots, so the kernel (or `e2fsck -E journal_only`) must replay the guest's journal to
//! show what it last wrote: those writes land here, in a private temporary file that is
//! unlinked from birth (nothing is left behind, even by `kill -9`), never in the repository.
//! Pages never written read from the point. What the user sees stays read-only: the
//! filesystems on top are mounted `ro`.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, WriteFlags,
};
use roaring::RoaringTreemap;

use crate::read::PointReader;
use crate::volumes::Volume;

/// Copy-on-write granularity: the page size, what the kernel writes through a loop device.
const PAGE: u64 = 4096;
const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;

/// The read-only bytes a view starts from.
pub trait Source: Send + Sync {
    fn size(&self) -> u64;
    /// Fill `buf` from `offset` (within `size`).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// One volume of a point (or the whole disk): reads map through the volume's extents.
pub struct VolumeSource {
    pub reader: Arc<PointReader>,
    pub volume: Volume,
}

impl Source for VolumeSource {
    fn size(&self) -> u64 {
        self.volume.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut at = 0usize;
        for (o, l) in self.volume.map(offset, buf.len() as u64) {
            // `map` never returns more than asked; should it, the read fails with EIO.
            let end = usize::try_from(l).ok().and_then(|l| at.checked_add(l));
            let Some(part) = end.and_then(|end| buf.get_mut(at..end)) else {
                tracing::error!(volume = %self.volume.name, "volume mapping does not fit the read");
                return Err(io::Error::from_raw_os_error(libc::EIO));
            };
            part.fill(0);
            self.reader.read_at(part, o).map_err(|e| {
                tracing::error!(volume = %self.volume.name, error = %e, "read failed");
                io::Error::from_raw_os_error(libc::EIO)
            })?;
            at = end.unwrap_or(at);
        }
        // Past the volume's end: zeros (within it every byte is mapped).
        if let Some(rest) = buf.get_mut(at..) {
            rest.fill(0);
        }
        Ok(())
    }
}

/// A volume as a writable file: written pages in a private temporary file, the rest from the
/// source.
pub struct CowFile {
    pub name: String,
    source: Arc<dyn Source>,
    size: u64,
    store: File,
    /// Pages (offset / PAGE) held by `store`.
    written: Mutex<RoaringTreemap>,
}

/// A temporary file in `dir` no other process can open and that vanishes with its descriptor.
fn private_temp_file(dir: &Path) -> io::Result<File> {
    let tmpfile = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match tmpfile {
        Ok(f) => Ok(f),
        // Filesystems without O_TMPFILE: create a unique name and unlink it at once.
        Err(_) => {
            let mut nonce = [0u8; 8];
            getrandom::fill(&mut nonce).map_err(|e| io::Error::other(e.to_string()))?;
            let p = dir.join(format!(".cbtfs-cow-{:016x}", u64::from_le_bytes(nonce)));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)?;
            std::fs::remove_file(&p)?;
            Ok(f)
        }
    }
}

impl CowFile {
    pub fn new(name: &str, source: Arc<dyn Source>, tmp_dir: &Path) -> io::Result<CowFile> {
        Ok(CowFile {
            name: name.to_string(),
            size: source.size(),
            source,
            store: private_temp_file(tmp_dir)?,
            written: Mutex::new(RoaringTreemap::new()),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn pages(&self) -> std::sync::MutexGuard<'_, RoaringTreemap> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read up to `buf.len()` bytes at `offset`; returns the count (short at the end).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        // Runs of pages from one place, decided under the lock, read without it.
        let mut runs: Vec<(usize, usize, bool)> = Vec::new();
        {
            let written = self.pages();
            let mut at = 0usize;
            while at < n {
                let pos = offset + at as u64;
                let page = pos / PAGE;
                let len = ((page + 1) * PAGE - pos).min((n - at) as u64) as usize;
                let stored = written.contains(page);
                match runs.last_mut() {
                    Some((_, l, s)) if *s == stored => *l += len,
                    _ => runs.push((at, len, stored)),
                }
                at += len;
            }
        }
        for (at, len, stored) in runs {
            let part = &mut buf[at..at + len];
            let pos = offset + at as u64;
            if stored {
                self.store.read_exact_at(part, pos)?;
            } else {
                self.source.read_at(part, pos)?;
            }
        }
        Ok(n)
    }

    /// Write `data` at `offset` into the private store; never past the volume's end.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<usize> {
        if offset.saturating_add(data.len() as u64) > self.size {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        // Writes are rare (journal replay); one at a time keeps partial pages consistent.
        let mut written = self.pages();
        let mut at = 0usize;
        let mut page_buf = vec![0u8; PAGE as usize];
        while at < data.len() {
            let pos = offset + at as u64;
            let page = pos / PAGE;
            let start = page * PAGE;
            let within = (pos - start) as usize;
            let len = (PAGE as usize - within).min(data.len() - at);
            if len == PAGE as usize {
                self.store.write_all_at(&data[at..at + len], pos)?;
            } else {
                let plen = (self.size - start).min(PAGE) as usize;
                let page_bytes = &mut page_buf[..plen];
                if written.contains(page) {
                    self.store.read_exact_at(page_bytes, start)?;
                } else {
                    self.source.read_at(page_bytes, start)?;
                }
                page_bytes[within..within + len].copy_from_slice(&data[at..at + len]);
                self.store.write_all_at(page_bytes, start)?;
            }
            written.insert(page);
            at += len;
        }
        Ok(data.len())
    }

    /// The byte ranges written so far (page-aligned, merged, ascending).
    pub fn written_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for page in self.pages().iter() {
            let s = page * PAGE;
            match out.last_mut() {
                Some((o, l)) if *o + *l == s => *l += PAGE,
                _ => out.push((s, PAGE)),
            }
        }
        out
    }
}

thread_local! {
    /// One read buffer per serving thread, reused: reads are up to 1 MiB each.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The FUSE filesystem: one flat directory of copy-on-write files.
pub struct OverlayFs {
    files: Vec<Arc<CowFile>>,
    uid: u32,
    gid: u32,
    time: SystemTime,
}

impl OverlayFs {
    pub fn new(files: Vec<Arc<CowFile>>) -> OverlayFs {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        OverlayFs {
            files,
            uid,
            gid,
            time: SystemTime::now(),
        }
    }

    fn file(&self, ino: INodeNo) -> Option<&Arc<CowFile>> {
        ino.0
            .checked_sub(2)
            .and_then(|i| self.files.get(usize::try_from(i).ok()?))
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o700, 0, 2)
        } else {
            (
                FileType::RegularFile,
                0o600,
                self.file(INodeNo(ino))?.size,
                1,
            )
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }
}

fn io_errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Filesystem for OverlayFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_readahead(crate::fuse::MAX_READ);
        let _ = config.set_max_write(crate::fuse::MAX_READ);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (parent.0 == ROOT)
            .then(|| self.files.iter().position(|f| OsStr::new(&f.name) == name))
            .flatten();
        match found.and_then(|i| self.attr(i as u64 + 2)) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(a) = self.attr(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // A volume's size, owner and mode are fixed; times are accepted and ignored.
        if mode.is_some() || uid.is_some() || gid.is_some() || size.is_some_and(|s| s != a.size) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &a)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.file(ino).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EPERM);
        }
        reply.opened(FileHandle(0), FopenFlags::empty())
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        READ_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            match f.read_at(&mut buf[..size as usize], offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(io_errno(&e)),
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match f.write_at(data, offset) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The store is temporary by design: nothing to make durable.
        reply.ok()
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, &str)> = vec![
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ];
        for (i, f) in self.files.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, &f.name));
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // No extended attributes (the kernel asks for security.capability before each write).
        reply.error(Errno::ENODATA)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Loop devices probe for ioctls (FS_IOC_GETFLAGS...): plain files have none.
        reply.error(Errno::ENOTTY)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total: u64 = self.files.iter().map(|f| f.size.div_ceil(PAGE)).sum();
        reply.statfs(
            total,
            0,
            0,
            self.files.len() as u64,
            0,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pattern(u64);
    impl Source for Pattern {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    #[test]
    fn writes_land_in_the_store_and_reads_merge_them() {
        let dir = tempfile::tempdir().unwrap();
        let size = 10 * PAGE + 100;
        let f = CowFile::new("v", Arc::new(Pattern(size)), dir.path()).unwrap();
        let mut reference: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let writes: [(u64, usize); 5] = [
            (10, 5),
            (PAGE - 3, 7),
            (3 * PAGE, 2 * PAGE as usize),
            (5 * PAGE + 17, 9000),
            (10 * PAGE, 100),
        ];
        for (n, (o, l)) in writes.iter().enumerate() {
            let data = vec![200 + n as u8; *l];
            f.write_at(&data, *o).unwrap();
            reference[*o as usize..*o as usize + l].copy_from_slice(&data);
        }
        assert!(f.write_at(&[1], size).is_err(), "past the end");
        for (o, l) in [
            (0u64, size as usize),
            (PAGE - 10, 30),
            (size - 50, 100),
            (size, 10),
        ] {
            let mut buf = vec![0u8; l];
            let n = f.read_at(&mut buf, o).unwrap();
            let end = (o as usize + l).min(size as usize);
            assert_eq!(n, end.saturating_sub(o as usize));
            assert_eq!(&buf[..n], &reference[o as usize..end], "at {o}+{l}");
        }
        assert_eq!(
            f.written_ranges(),
            // Adjacent pages merge into one range.
            vec![(0, 2 * PAGE), (3 * PAGE, 5 * PAGE), (10 * PAGE, PAGE)]
        );
        // Nothing named was left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
