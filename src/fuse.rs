//! The thin adapter from fuser's callbacks to `fs`: span, call, reply — or one errno.
//!
//! Every operation enters a `tracing` span named after it, carrying the inode and, where they
//! apply, the handle, offset and length (`CBTFS_LOG=cbtfs=trace` shows them). Spans are
//! `trace_span!`/`debug_span!`: when that level is off they cost a level check, and their
//! fields are never formatted. TTLs are decided by `fs::ttls`; this file only applies them.

use std::ffi::OsStr;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, Request,
};

use crate::fs::{Attr, CbtFs, FsError, Kind, ttls};
/// Largest read the kernel may send (1 MiB, its maximum with 256 pages).
pub const MAX_READ: u32 = 1 << 20;

pub struct FuseAdapter {
    pub fs: CbtFs,
    uid: u32,
    gid: u32,
}

impl FuseAdapter {
    pub fn new(fs: CbtFs) -> Self {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FuseAdapter { fs, uid, gid }
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        let t = if a.mtime >= 0 {
            UNIX_EPOCH + Duration::from_secs(a.mtime as u64)
        } else {
            UNIX_EPOCH
        };
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.blocks,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: kind(a.kind),
            perm: a.perm,
            nlink: a.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 1 << 16,
            flags: 0,
        }
    }
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

thread_local! {
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _span = tracing::debug_span!("init").entered();
        // Ask for the largest reads and readahead the kernel allows; it caps what it cannot do.
        let _ = config.set_max_readahead(MAX_READ);
        let _ = config.set_max_write(MAX_READ);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _span = tracing::debug_span!("lookup", parent = parent.0, ?name).entered();
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self.fs.lookup(parent.0, name) {
            Ok(a) => {
                let t = ttls(&a);
                // fuser's order is (attribute TTL, entry TTL).
                reply.entry_with_ttls(&t.attr, &t.entry, &self.attr(&a), Generation(0))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _span = tracing::debug_span!("getattr", ino = ino.0).entered();
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&ttls(&a).attr, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _span = tracing::debug_span!("readlink", ino = ino.0).entered();
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _span = tracing::debug_span!("open", ino = ino.0, flags = flags.0).entered();
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        match self.fs.open(ino.0, write) {
            // The page cache survives opens: restore points never change, and an inode number
            // never comes to mean another point (see `fs`: identity from the point's own id).
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _span = tracing::trace_span!("read", ino = ino.0, fh = fh.0, offset, size).entered();
        READ_BUF.with(|b| {
            let mut b = b.borrow_mut();
            // Requests start on a page and blocks on 64 KiB, so with the buffer aligned every
            // block run in the request can be read directly.
            let buf = crate::repo::store::aligned_slice(&mut b, size as usize);
            match self.fs.read(fh.0, offset, buf) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    /// Nothing to flush on a read-only filesystem (and fuser's default logs a warning).
    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _span = tracing::trace_span!("flush", ino = ino.0, fh = fh.0).entered();
        reply.ok();
    }

    fn destroy(&mut self) {
        let _span = tracing::debug_span!("destroy").entered();
        self.fs.log_stats();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _span = tracing::debug_span!("release", ino = ino.0, fh = fh.0).entered();
        self.fs.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _span = tracing::debug_span!("opendir", ino = ino.0).entered();
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _span = tracing::debug_span!("readdir", ino = ino.0, fh = fh.0, offset).entered();
        match self.fs.readdir(fh.0, offset) {
            Ok(entries) => {
                for e in entries.iter().skip(offset as usize) {
                    if reply.add(INodeNo(e.ino), e.next_offset, kind(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _span = tracing::debug_span!("releasedir", ino = ino.0, fh = fh.0).entered();
        self.fs.release(fh.0);
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _span = tracing::trace_span!("lseek", ino = ino.0, fh = fh.0, offset, whence).entered();
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        match self.fs.seek(fh.0, off, whence) {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _span = tracing::debug_span!("statfs", ino = ino.0).entered();
        match self.fs.statfs() {
            Ok(st) => reply.statfs(
                st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.bsize, st.namelen, st.frsize,
            ),
            Err(e) => {
                tracing::warn!(error = %e, "statfs of the repository's filesystem failed");
                reply.error(errno(&e))
            }
        }
    }
}
