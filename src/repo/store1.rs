//! Where repository objects live: a small interface that a local directory implements today and
//! an S3-compatible bucket can implement tomorrow.
//!
//! The repository only ever needs five things from storage: stream a new immutable object, put a
//! small object atomically *without replacing* an existing one (the commit), read a byte range,
//! list a "directory", and delete. Objects are never modified after they are finished.
//!
//! Keys are relative, `/`-separated paths (`disks/<vdi>/<set>/000003.point`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

/// File mode of every object: repository data is private to its owner.
pub const FILE_MODE: u32 = 0o600;
/// Directory mode: private as well.
pub const DIR_MODE: u32 = 0o700;

/// A readable, finished object.
pub trait Object: Send + Sync {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` from `offset`; an object shorter than asked is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The same, for runs of whole blocks read by a caller that caches what it reads itself
    /// (the mount, whose files live in the kernel's page cache): the store may then skip its
    /// own cache.
    fn read_blocks_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

/// An object being written. Nothing is durable until `finish` returns.
pub trait ObjectWriter: Write + Send {
    /// Make the object durable and return its length.
    fn finish(self: Box<Self>) -> io::Result<u64>;
}

/// Storage behind a repository.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Start a new object under `key` (its "directory" must exist). Fails if it exists.
    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>>;
    /// Atomically and durably put a small object; fails with `AlreadyExists` if `key` exists.
    /// This is the repository's commit primitive.
    fn put_new(&self, key: &str, bytes: &[u8]) -> io::Result<()>;
    fn open(&self, key: &str) -> io::Result<Arc<dyn Object>>;
    /// Map a whole object into memory (indexes are read as arrays).
    fn map(&self, key: &str) -> io::Result<Mapped>;
    /// Names directly under the "directory" `prefix` (no recursion), sorted.
    fn list(&self, prefix: &str) -> io::Result<Vec<String>>;
    fn delete(&self, key: &str) -> io::Result<()>;
    /// Make a "directory" (no-op on object stores).
    fn make_dir(&self, key: &str) -> io::Result<()>;
    /// Remove an empty "directory" (no-op on object stores).
    fn remove_dir(&self, key: &str) -> io::Result<()>;
    /// A human-readable location of `key`, for error messages.
    fn describe(&self, key: &str) -> String;
}

/// A mapped object: its bytes, whether they come from an mmap or memory.
pub enum Mapped {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Mapped::Map(m) => m,
            Mapped::Owned(v) => v,
        }
    }
}

/// A repository in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// Block runs bypass the page cache (`O_DIRECT`) where the filesystem allows it.
    direct_reads: bool,
}

/// What `O_DIRECT` reads must be aligned to: buffer address, offset and length. 4 KiB covers
/// every logical block size in use; a read that is not aligned goes through the page cache.
pub const DIRECT_ALIGN: usize = 4096;

/// `len` bytes of `v`, grown as needed, starting at an address direct reads accept.
pub fn aligned_slice(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if v.len() < len + DIRECT_ALIGN {
        v.resize(len + DIRECT_ALIGN, 0);
    }
    let start = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    &mut v[start..start + len]
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore {
            root: root.into(),
            direct_reads: false,
        }
    }

    /// Read runs of whole blocks with `O_DIRECT`. For the mount: its files are cached by the
    /// kernel already, so caching the data files as well would hold every byte twice, and
    /// copying each byte through a second cache costs more CPU than the disk read itself.
    pub fn with_direct_reads(mut self) -> Self {
        self.direct_reads = true;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn open_local(&self, key: &str) -> io::Result<LocalFile> {
        let path = self.path(key);
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        // Filesystems without O_DIRECT (tmpfs before 6.6, some FUSE ones) refuse the open.
        let direct = match self.direct_reads {
            true => OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .ok(),
            false => None,
        };
        Ok(LocalFile {
            file,
            len,
            direct,
            direct_refused: Default::default(),
        })
    }

    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn parent_dir(&self, key: &str) -> PathBuf {
        match self.path(key).parent() {
            Some(p) => p.to_path_buf(),
            None => self.root.clone(),
        }
    }
}

/// fsync a directory so that entries created or renamed in it survive power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// fsync the directory holding `path` (`.` for a bare relative name): makes `path`'s own entry
/// durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

struct LocalFile {
    file: File,
    len: u64,
    /// The same file opened with `O_DIRECT`, if asked for and the filesystem allows it.
    direct: Option<File>,
    /// Set when the filesystem refused a direct read after all: use the page cache from then on.
    direct_refused: std::sync::atomic::AtomicBool,
}

impl Object for LocalFile {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn read_blocks_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let aligned =
            (buf.as_ptr() as usize | offset as usize | buf.len()).is_multiple_of(DIRECT_ALIGN);
        match &self.direct {
            Some(d) if aligned && !self.direct_refused.load(Relaxed) => {
                match FileExt::read_exact_at(d, buf, offset) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::debug!(error = %e, "direct read refused; using the page cache");
                        self.direct_refused.store(true, Relaxed);
                        self.read_exact_at(buf, offset)
                    }
                    r => r,
                }
            }
            _ => self.read_exact_at(buf, offset),
        }
    }
}

struct LocalWriter {
    file: io::BufWriter<File>,
    written: u64,
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl ObjectWriter for LocalWriter {
    fn finish(self: Box<Self>) -> io::Result<u64> {
        let written = self.written;
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(written)
    }
}

impl Store for LocalStore {
    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(self.path(key))?;
        Ok(Box::new(LocalWriter {
            // Blocks arrive 64 KiB at a time; fewer, larger writes are cheaper.
            file: io::BufWriter::with_capacity(1 << 20, file),
            written: 0,
        }))
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let dst = self.path(key);
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| io::Error::other(e.to_string()))?;
        let tmp = dst.with_file_name(format!(
            ".{}.{:016x}.tmp",
            dst.file_name().and_then(|n| n.to_str()).unwrap_or("object"),
            u64::from_le_bytes(nonce)
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            // link(2) never replaces an existing name: a commit cannot overwrite another.
            fs::hard_link(&tmp, &dst)?;
            sync_dir(&self.parent_dir(key))
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn open(&self, key: &str) -> io::Result<Arc<dyn Object>> {
        Ok(Arc::new(self.open_local(key)?))
    }

    fn map(&self, key: &str) -> io::Result<Mapped> {
        let f = File::open(self.path(key))?;
        let len = f.metadata()?.len();
        if len == 0 {
            return Ok(Mapped::Owned(Vec::new()));
        }
        // SAFETY: repository objects are immutable once finished; nothing in cbtfs writes or
        // truncates a finished object. An outside process truncating it while mapped would raise
        // SIGBUS, the accepted limit of mapping (documented in the repo module).
        let map = unsafe { Mmap::map(&f)? };
        Ok(Mapped::Map(map))
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        let dir = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path(prefix)
        };
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        fs::remove_file(self.path(key))
    }

    fn make_dir(&self, key: &str) -> io::Result<()> {
        let p = self.path(key);
        match fs::DirBuilder::new().mode(DIR_MODE).create(&p) {
            Ok(()) => {}
            // Made by a run that may have crashed before its parent was synced: sync it now,
            // or objects committed inside it could vanish with the directory on power loss.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => {}
            Err(e) => return Err(e),
        }
        sync_dir(&self.parent_dir(key))
    }

    fn remove_dir(&self, key: &str) -> io::Result<()> {
        fs::remove_dir(self.path(key))
    }

    fn describe(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_reads_are_the_same_direct_or_not_and_fail_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..256 * 1024u32)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        fs::write(dir.path().join("x.data"), &bytes).unwrap();
        let store = LocalStore::new(dir.path()).with_direct_reads();
        let local = store.open_local("x.data").unwrap();
        // ext4, XFS, Btrfs and tmpfs (since 6.6) all take O_DIRECT.
        assert!(
            local.direct.is_some(),
            "no O_DIRECT here: the direct path goes untested"
        );
        let obj: Arc<dyn Object> = Arc::new(local);
        let mut v = Vec::new();
        // Aligned (direct where the filesystem allows), unaligned (page cache), odd offsets.
        for (offset, len, shift) in [
            (0, 65536, 0),
            (65536, 131072, 0),
            (4096, 8192, 1),
            (100, 4000, 0),
        ] {
            let buf = &mut aligned_slice(&mut v, len + 1)[shift..shift + len];
            obj.read_blocks_at(buf, offset as u64).unwrap();
            assert_eq!(
                buf,
                &bytes[offset..offset + len],
                "offset {offset} len {len} shift {shift}"
            );
        }
        let local = store.open_local("x.data").unwrap();
        local
            .read_blocks_at(aligned_slice(&mut v, 65536), 65536)
            .unwrap();
        assert!(
            !local
                .direct_refused
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        // A run the file does not hold in full is an error, never a short read passed on.
        let buf = aligned_slice(&mut v, 131072);
        let e = obj.read_blocks_at(buf, 196608).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // Without direct reads asked for, the same bytes come through the page cache.
        let plain = LocalStore::new(dir.path()).open("x.data").unwrap();
        let buf = aligned_slice(&mut v, 65536);
        plain.read_blocks_at(buf, 131072).unwrap();
        assert_eq!(buf, &bytes[131072..196608]);
    }
}
