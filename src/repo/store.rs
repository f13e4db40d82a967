//! Where repository objects live: the `Store` trait, and `LocalStore`, a local directory.
//!
//! The repository needs only what an S3-compatible object store offers: put a whole object
//! atomically and create-only, get it whole or a byte range, list keys by prefix, delete. No
//! renames, no hard links, no appends, no directories: an object store fits behind the trait
//! without touching anything above it. Keys are `/`-separated (`packs/3f/3f9a…`).
//!
//! The writer lock is part of the trait too: a local store takes `flock` on `REPO/lock`; an
//! object store will use a lock object.

use std::io;
use std::path::Path;

/// File mode of every object: repository data is private to its owner.
pub const FILE_MODE: u32 = 0o600;
/// Directory mode: private as well.
pub const DIR_MODE: u32 = 0o700;

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub len: u64,
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else holds it; the text says who ("pid 123 (cbtfs backup) since …").
    #[error("held by {0}")]
    Held(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A held writer lock; released when dropped (or when the process dies).
pub trait LockGuard: Send + Sync {}

/// Storage behind a repository.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Atomically and durably put a whole object. Fails with `AlreadyExists` if `key` exists
    /// (create-only: a commit can never overwrite another). Readers see all of it or nothing.
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()>;
    /// A whole object (`NotFound` if absent).
    fn get(&self, key: &str) -> io::Result<Vec<u8>>;
    /// Fill `buf` from `offset` of the object (`UnexpectedEof` if it is shorter, `NotFound` if
    /// absent).
    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Every object whose key starts with `prefix` (any depth), with its length, sorted by key.
    /// Temporary objects of unfinished puts are never listed.
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>>;
    /// Delete an object; one that is absent is not an error.
    fn delete(&self, key: &str) -> io::Result<()>;
    /// A human-readable location of `key`, for error messages (a path, a URL).
    fn describe(&self, key: &str) -> String;
    /// Take the exclusive writer lock, waiting up to 2 s for a holder that is just leaving.
    fn lock(&self, holder: &str) -> Result<Box<dyn LockGuard>, LockError>;
    /// The local directory holding the objects, if the store is one (statvfs, messages).
    fn local_root(&self) -> Option<&Path> {
        None
    }
}

/// A repository in a local directory. Keys map to files under `root` (directories made on
/// demand, 0700); puts go to a temporary name, are fsynced, then moved into place with
/// `renameat2(RENAME_NOREPLACE)` (never replaces; no hard links) and the directory fsynced.
/// Open files are kept in a small cache (packs are read many times).
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: std::path::PathBuf,
    // helper: your fields (direct-read flag, shared fd cache behind an Arc<Mutex<lru::LruCache>>)
}

impl LocalStore {
    pub fn new(root: impl Into<std::path::PathBuf>) -> Self {
        LocalStore { root: root.into() }
    }

    /// Read ranges past the page cache (`O_DIRECT`, aligned superset reads) where the
    /// filesystem allows it: for the mount, whose files the kernel caches already.
    pub fn with_direct_reads(self) -> Self {
        todo!()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of `key` (tests that damage objects on purpose; nothing else above the trait).
    pub fn path(&self, key: &str) -> std::path::PathBuf {
        self.root.join(key)
    }
}

/// fsync a directory so that entries created or renamed in it survive power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// fsync the directory holding `path` (`.` for a bare relative name).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

impl Store for LocalStore {
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let _ = (key, bytes);
        todo!()
    }
    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        let _ = key;
        todo!()
    }
    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let _ = (key, offset, buf);
        todo!()
    }
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        let _ = prefix;
        todo!()
    }
    fn delete(&self, key: &str) -> io::Result<()> {
        let _ = key;
        todo!()
    }
    fn describe(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }
    fn lock(&self, holder: &str) -> Result<Box<dyn LockGuard>, LockError> {
        let _ = holder;
        todo!()
    }
    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }
}

/// What `O_DIRECT` reads must be aligned to: buffer address, offset and length. 4 KiB covers
/// every logical block size in use.
pub const DIRECT_ALIGN: usize = 4096;

/// `len` bytes of `v`, grown as needed, starting at an address direct reads accept.
pub fn aligned_slice(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if v.len() < len + DIRECT_ALIGN {
        v.resize(len + DIRECT_ALIGN, 0);
    }
    let start = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    &mut v[start..start + len]
}
