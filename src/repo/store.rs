//! Where repository objects live: the `Store` trait, and `LocalStore`, a local directory.
//!
//! The repository needs only what an S3-compatible object store offers: put a whole object
//! atomically and create-only, get it whole or a byte range, list keys by prefix, delete. No
//! renames, no hard links, no appends, no directories: an object store fits behind the trait
//! without touching anything above it. Keys are `/`-separated (`packs/3f/3f9a…`).
//!
//! Locks are part of the trait too ([`LockKind`]): the writers' shared lock, the exclusive
//! maintenance lock and one lock per disk. A local store takes `flock`s on files (`REPO/lock`,
//! `REPO/locks/…`); an object store holds leases on lock objects (`s3::S3Store`,
//! `PREFIX/lock`, `PREFIX/locks/…`).
//!
//! # Locks
//!
//! * **Shared** (writers: backup, import, copy, prune's dropping of points): any number at
//!   once, in one or many processes. Each holder also leaves a **writer record** while it
//!   lives (`locks/writers/ID`): a holder that ends cleanly removes it; a killed one leaves it,
//!   and the record then shows the writer dead (local: the record's own `flock` is free; S3:
//!   its lease is stale or its process gone). What a dead writer put and nothing references
//!   is collected by the next holder of the exclusive lock ([`Store::writer_records`]).
//! * **Exclusive** (maintenance: gc's sweep, repair): granted only while no shared holder is
//!   live, and keeps new shared holders out while held.
//! * **Disk** (`locks/disks/NAME`, NAME a keyed name the repository derives from the VDI
//!   uuid): one holder at a time; taken under the shared lock by whoever writes points of that
//!   disk.
//!
//! Every kind waits up to [`LOCK_WAIT`] (or what the caller gives) for a holder that is just
//! leaving, then fails with [`LockError::Held`] naming the holder(s). `locks/` and `lock` are
//! not objects: `list` never shows them and no key may name them.
//!
//! Stores: [`LocalStore`] (a directory, the default) and [`s3::S3Store`] (`s3://BUCKET/PREFIX`).
//! [`cache::CachedStore`] wraps a remote store (metadata kept whole, recently read pack ranges
//! in a bounded LRU); a repository on S3 is opened through it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod cache;
pub mod s3;

use lru::LruCache;
use std::fs::TryLockError;

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

/// A held lock; released when dropped (or when the process dies).
pub trait LockGuard: Send + Sync {}

/// Which lock to take (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind<'a> {
    /// The writers' lock: many holders at once; each leaves a writer record while it lives.
    Shared,
    /// The maintenance lock: only while no shared holder is live.
    Exclusive,
    /// One disk's lock, by its keyed name (`[0-9A-Za-z_-]`, at most 128 characters).
    Disk(&'a str),
}

/// The record a shared holder leaves while it lives (`locks/writers/ID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterRecord {
    pub id: String,
    /// Who (pid, command, since when), as the holder wrote it.
    pub holder: String,
    /// The holder still holds its lock (local: its record's flock; S3: a fresh lease of a
    /// process that may exist).
    pub live: bool,
}

/// The directory (local) or key prefix (S3) of every lock but the top `lock`.
pub const LOCKS_DIR: &str = "locks";
/// Writer records, below [`LOCKS_DIR`].
pub const WRITERS_DIR: &str = "locks/writers";
/// Disk locks, below [`LOCKS_DIR`].
pub const DISKS_DIR: &str = "locks/disks";

/// Is `key` one of the lock objects rather than a repository object (`lock`, `locks/…`)?
pub fn is_lock_key(key: &str) -> bool {
    key == LOCK_FILE || key == LOCKS_DIR || key.starts_with("locks/")
}

/// Check a disk lock's or writer record's name (a keyed name or a random id).
pub(crate) fn check_lock_name(name: &str) -> io::Result<&str> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("lock name {name:?} is not a keyed name (a bug in cbtfs: please report it)"),
        ));
    }
    Ok(name)
}

/// The text a holder leaves: who and since when.
pub(crate) fn holder_text(holder: &str) -> String {
    format!(
        "pid {} ({holder}) since {}",
        std::process::id(),
        crate::timefmt::rfc3339(crate::timefmt::now())
    )
}

/// Storage behind a repository.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Atomically and durably put a whole object. Fails with `AlreadyExists` if `key` exists
    /// (create-only: a commit can never overwrite another). Readers see all of it or nothing.
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()>;
    /// `put` of a buffer the store may keep while it works (no copy), handed back for
    /// reuse (possibly empty, if the store could not give it back). Default: `put`.
    fn put_owned(&self, key: &str, bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        self.put(key, &bytes).map(|()| bytes)
    }
    /// How many `put`s a writer should keep in flight at once: more than one only where a
    /// put's latency, not the bandwidth, bounds a stream of them (an object store over a
    /// network). Each costs a pack buffer of memory. Default: 1.
    fn parallel_puts(&self) -> usize {
        1
    }
    /// Let a cache in front of the store write what it keeps on a thread of its own (`true`),
    /// or finish those writes and go back to writing at once (`false`: before a process ends
    /// without dropping the store, as a mount's daemon does). Off by default, and turned on
    /// only once the process will not fork any more (a mount's daemon after its fork: a fork
    /// must find no thread running). Default: nothing to do.
    fn cache_writes_in_background(&self, _on: bool) {}
    /// A whole object (`NotFound` if absent).
    fn get(&self, key: &str) -> io::Result<Vec<u8>>;
    /// Several whole objects, each as `get` gives it, in `keys`' order. Remote stores fetch
    /// them in parallel (`cache::CachedStore`); the default reads one after the other.
    fn get_many(&self, keys: &[String]) -> Vec<io::Result<Vec<u8>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    /// Fill `buf` from `offset` of the object (`UnexpectedEof` if it is shorter, `NotFound` if
    /// absent).
    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Every object whose key starts with `prefix` (any depth), with its length, sorted by key.
    /// Temporary objects of unfinished puts are never listed.
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>>;
    /// Delete an object, durably (a power cut after it returned cannot bring the object back):
    /// deletions are ordered like puts, so a prune's dropped manifests are gone for good before
    /// gc deletes what they referenced. One that is absent is not an error.
    fn delete(&self, key: &str) -> io::Result<()>;
    /// A human-readable location of `key`, for error messages (a path, a URL).
    fn describe(&self, key: &str) -> String;
    /// Take a lock of `kind`, waiting up to `wait` for a holder that is just leaving (see the
    /// module doc). `holder` says who, for the messages of those who find it held.
    fn take_lock(
        &self,
        kind: LockKind<'_>,
        holder: &str,
        wait: Duration,
    ) -> Result<Box<dyn LockGuard>, LockError>;
    /// Take the exclusive (maintenance) lock, waiting up to [`LOCK_WAIT`].
    fn lock(&self, holder: &str) -> Result<Box<dyn LockGuard>, LockError> {
        self.take_lock(LockKind::Exclusive, holder, LOCK_WAIT)
    }
    /// The records of the shared lock's holders, live and dead. Default: none (a store
    /// without shared locks).
    fn writer_records(&self) -> io::Result<Vec<WriterRecord>> {
        Ok(Vec::new())
    }
    /// Remove a dead writer's record (call it holding the exclusive lock, after collecting
    /// what it left). Absent is fine.
    fn remove_writer_record(&self, _id: &str) -> io::Result<()> {
        Ok(())
    }
    /// The local directory holding the objects, if the store is one (statvfs, messages).
    fn local_root(&self) -> Option<&Path> {
        None
    }
    /// Remove what unfinished puts of killed writers left (temporary objects), below the
    /// prefixes only writers holding a lock put to; returns how many. Call it holding the
    /// exclusive lock: no put of a live writer is then under way there. Default: nothing to do.
    fn remove_temporaries(&self) -> io::Result<u64> {
        Ok(0)
    }
    /// Drop a local copy of `key` (a cached object that did not open), so the next `get`
    /// fetches it from the store; returns whether there was one. Default: no copies.
    fn forget_cached(&self, _key: &str) -> bool {
        false
    }
    /// The S3 store behind this one, if any (Object Lock, object versions: `s3::lock`). A
    /// store wrapping another must forward it: a repository with Object Lock refuses to open
    /// without it rather than write unlocked objects.
    fn s3(&self) -> Option<&s3::S3Store> {
        None
    }
}

/// The top-level directories only writers holding a lock put objects into: their temporary
/// files belong to killed writers once the exclusive lock is held. (Key slots and host pins may be put
/// without the lock; the header is put by `init` alone.)
pub const LOCKED_PREFIXES: &[&str] = &["packs", "cindex", "pindex", "meta", "points", "journal"];

/// A repository in a local directory. Keys map to files under `root` (directories made on
/// demand, 0700); puts go to a temporary name, are fsynced, then moved into place with
/// `renameat2(RENAME_NOREPLACE)` (never replaces; no hard links) and the directory fsynced;
/// deletes unlink and fsync the directory.
/// Open files are kept in a small cache (packs are read many times).
///
/// # Open files and deletion
///
/// `get_range` keeps up to [`OPEN_FILES`] files open, shared by every clone of the store (as
/// many again opened with `O_DIRECT` if some clones read that way). A key
/// deleted through this store (any clone) is dropped from the cache, so reading it afterwards
/// gives `NotFound`. A key deleted by another process may still be read through a file this
/// store opened before: the kernel keeps the deleted file's bytes while it is open. Objects read
/// by range are immutable (packs, chunk indexes), so those bytes are still the object's bytes;
/// the file is closed when the cache evicts it. `get` always opens the file afresh.
///
/// # Keys
///
/// A key is one or more `/`-separated names, none empty, `.` or `..`, none starting with `.`
/// (the temporary files of unfinished puts) and without NUL; `lock` at the top is the writer
/// lock's file, not an object. Anything else is refused with `InvalidInput`: nothing outside
/// `root` is ever touched.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: std::path::PathBuf,
    /// `get_range` reads with `O_DIRECT` where the filesystem allows it.
    direct_reads: bool,
    open: Arc<Mutex<OpenFiles>>,
    /// Directories whose entry in their parent this process has made durable (fsynced the
    /// parent), shared by clones: a directory found existing may have been made by a writer
    /// killed before its parent was fsynced, so the first put into it syncs the parent anyway.
    durable_dirs: Arc<Mutex<std::collections::HashSet<std::path::PathBuf>>>,
}

/// How many files `get_range` keeps open (shared by the clones of a store): enough for the
/// packs a mount reads at once, far below the usual limit of 1024 descriptors per process.
pub const OPEN_FILES: usize = 256;

/// What `O_DIRECT` reads must be aligned to: buffer address, offset and length. 4 KiB covers
/// every logical block size in use.
pub const DIRECT_ALIGN: usize = 4096;

/// The most a direct read goes through its aligned bounce buffer in one piece (1 MiB), so a
/// large unaligned read never needs a second buffer of its whole size.
const DIRECT_PIECE: usize = 1 << 20;

/// The name of the writer lock's file at the top of a local store.
pub const LOCK_FILE: &str = "lock";

/// How long `lock` waits for a holder that is just leaving, and how often it looks.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);
const LOCK_POLL: Duration = Duration::from_millis(20);

/// The most of a lock file's text read back for a message (it is written by cbtfs, but any
/// process may have written anything there).
const LOCK_TEXT_MAX: u64 = 4096;

#[derive(Debug)]
struct OpenFiles {
    /// Files opened without and with `O_DIRECT` (clones of a store may differ in
    /// `with_direct_reads`; each reads through descriptors opened its way).
    files: [LruCache<String, Arc<OpenFile>>; 2],
    /// Counts deletions: a file opened before a deletion that finished since is not cached
    /// (it may be the deleted one).
    deletions: u64,
}

#[derive(Debug)]
struct OpenFile {
    file: File,
    len: u64,
    /// The descriptor has `O_DIRECT` set (cleared for good if a read is refused).
    direct: AtomicBool,
    /// Tests: direct reads fail with `EINVAL`, as on a filesystem that refuses them.
    #[cfg(test)]
    refuse_direct: AtomicBool,
}

impl LocalStore {
    pub fn new(root: impl Into<std::path::PathBuf>) -> Self {
        let cap = NonZeroUsize::new(OPEN_FILES).unwrap_or(NonZeroUsize::MIN);
        LocalStore {
            root: root.into(),
            direct_reads: false,
            open: Arc::new(Mutex::new(OpenFiles {
                files: [LruCache::new(cap), LruCache::new(cap)],
                deletions: 0,
            })),
            durable_dirs: Arc::default(),
        }
    }

    /// Read ranges past the page cache (`O_DIRECT`, aligned superset reads) where the
    /// filesystem allows it: for the mount, whose files the kernel caches already.
    pub fn with_direct_reads(mut self) -> Self {
        self.direct_reads = true;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of `key` (tests that damage objects on purpose; nothing else above the trait).
    pub fn path(&self, key: &str) -> std::path::PathBuf {
        self.root.join(key)
    }

    fn durable(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<std::path::PathBuf>> {
        // Only ever grows by whole entries: a panic elsewhere cannot leave it inconsistent.
        self.durable_dirs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, OpenFiles> {
        // A panic while holding the lock cannot leave the cache inconsistent (every update is
        // one call on it): carry on with it.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open file of `key`, from the cache or opened now (and cached).
    fn open_file(&self, key: &str) -> io::Result<Arc<OpenFile>> {
        let deletions = {
            let mut c = self.cache();
            if let Some(f) = c.files[usize::from(self.direct_reads)].get(key) {
                return Ok(f.clone());
            }
            c.deletions
        };
        let file = File::open(self.path(key))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.describe(key)),
            ));
        }
        let direct = self.direct_reads && set_direct(&file, true).is_ok();
        let f = Arc::new(OpenFile {
            file,
            len: meta.len(),
            direct: AtomicBool::new(direct),
            #[cfg(test)]
            refuse_direct: AtomicBool::new(false),
        });
        let mut c = self.cache();
        if c.deletions == deletions {
            c.files[usize::from(self.direct_reads)].put(key.to_string(), f.clone());
        }
        Ok(f)
    }

    /// Make the directories of `key`'s parent below the root (0700), fsyncing the parent of each
    /// one made, and of each one found that this process has not made durable yet: a writer
    /// killed between its `mkdir` and that fsync leaves a directory that only looks durable,
    /// and an object put into it would vanish with it at a power cut. The root itself must
    /// exist.
    fn make_parents(&self, key: &str) -> io::Result<()> {
        let mut dir = self.root.clone();
        let mut parts = key.split('/').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                break; // the object's own name
            }
            let parent = dir.clone();
            dir.push(part);
            if self.durable().contains(&dir) {
                continue;
            }
            match std::fs::DirBuilder::new().mode(DIR_MODE).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if !std::fs::symlink_metadata(&dir)?.is_dir() {
                        return Err(io::Error::new(
                            io::ErrorKind::NotADirectory,
                            format!("{} is not a directory", dir.display()),
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
            sync_dir(&parent)?;
            self.durable().insert(dir.clone());
        }
        Ok(())
    }
}

/// Set or clear `O_DIRECT` on an open file (`EINVAL` where the filesystem does not take it).
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Check a key (see [`LocalStore`]'s rules) and return it.
fn check_key(key: &str) -> io::Result<&str> {
    let bad = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("object key {key:?} {why} (a bug in cbtfs: please report it)"),
        ))
    };
    if is_lock_key(key) {
        return bad("is the name of a lock file");
    }
    if key.contains('\0') {
        return bad("holds a NUL byte");
    }
    for part in key.split('/') {
        if part.is_empty() {
            return bad("has an empty name (leading, trailing or double '/')");
        }
        if part.starts_with('.') {
            return bad("has a name starting with '.'");
        }
    }
    Ok(key)
}

/// Check a list prefix: its directory part (up to the last `/`) follows the key rules, the rest
/// is any start of a name. Returns the directory part without its trailing `/`.
fn check_prefix(prefix: &str) -> io::Result<&str> {
    let bad = |why: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("list prefix {prefix:?} {why} (a bug in cbtfs: please report it)"),
        ))
    };
    if prefix.contains('\0') {
        return bad("holds a NUL byte");
    }
    let dir = match prefix.rfind('/') {
        Some(i) => prefix.get(..i).unwrap_or(""),
        None => "",
    };
    if !dir.is_empty() {
        for part in dir.split('/') {
            if part.is_empty() || part.starts_with('.') {
                return bad("has an empty name or one starting with '.'");
            }
        }
    } else if prefix.starts_with('/') {
        return bad("starts with '/'");
    }
    Ok(dir)
}

/// A random name for the temporary file of a put of `name`: hidden (a leading '.') and
/// ending `.tmp`, so `list` never shows it.
fn temp_name(name: &str) -> io::Result<String> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(format!(".{name}.{:016x}.tmp", u64::from_le_bytes(nonce)))
}

/// `rename(from, to)` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: both strings are valid NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the filesystem of {} cannot rename without replacing (renameat2 RENAME_NOREPLACE: {e}); keep the repository on a local filesystem such as ext4, XFS or Btrfs",
                to.display()
            ),
        )),
        _ => Err(e),
    }
}

/// Fill `buf` from `offset` of `f` through its `O_DIRECT` descriptor: aligned pieces go straight
/// into `buf`, others through an aligned bounce buffer holding the 4 KiB-aligned superset.
/// The caller has checked that the file holds the whole range.
fn read_direct(f: &OpenFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    #[cfg(test)]
    if f.refuse_direct.load(Relaxed) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let a = DIRECT_ALIGN as u64;
    let aligned = (buf.as_ptr() as usize | buf.len()).is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(a);
    if aligned {
        return f.file.read_exact_at(buf, offset);
    }
    let mut bounce = Vec::new();
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let start = pos - pos % a;
        let skip = (pos - start) as usize;
        let want = (buf.len() - done).min(DIRECT_PIECE - skip);
        let span = (skip + want).next_multiple_of(DIRECT_ALIGN);
        let piece = aligned_slice(&mut bounce, span);
        let mut got = 0usize;
        // The last piece may end past the file's end: the kernel then reads up to it.
        while got < skip + want {
            let n = f.file.read_at(&mut piece[got..], start + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
            if !got.is_multiple_of(DIRECT_ALIGN) {
                break; // the file's end; another unaligned read would be refused
            }
        }
        if got < skip + want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "object ended before the range asked for",
            ));
        }
        buf[done..done + want].copy_from_slice(&piece[skip..skip + want]);
        done += want;
    }
    Ok(())
}

/// `len` bytes of `v` (grown as needed) starting at an address direct reads accept.
pub fn aligned_slice(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if v.len() < len + DIRECT_ALIGN {
        v.resize(len + DIRECT_ALIGN, 0);
    }
    let start = v.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    &mut v[start..start + len]
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

/// A lock of a local store: `flock`s released when their files close; a shared holder's
/// writer record is removed first.
#[derive(Debug)]
struct LocalLock {
    _files: Vec<File>,
    record: Option<std::path::PathBuf>,
}

impl LockGuard for LocalLock {}

impl Drop for LocalLock {
    fn drop(&mut self) {
        // The record goes while its flock is still held: nobody can see it dead meanwhile.
        if let Some(path) = self.record.take() {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    if let Err(e) = sync_parent(&path) {
                        tracing::debug!(path = %path.display(), error = %e, "cannot sync the writer records' directory");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove this writer's record; the next exclusive lock holder takes it for a dead writer's and collects garbage")
                }
            }
        }
    }
}

/// Open (creating it, 0600) a lock file.
fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)
}

/// Take `file`'s flock (shared or exclusive), trying for up to `wait`. False: still held.
fn flock_wait(file: &File, shared: bool, wait: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + wait;
    loop {
        let r = if shared {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match r {
            Ok(()) => return Ok(true),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(LOCK_POLL)
            }
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// What a lock file says about its holder (or that it says nothing yet).
fn lock_file_text(file: &File) -> io::Result<String> {
    let mut text = Vec::new();
    let r = file;
    r.take(LOCK_TEXT_MAX).read_to_end(&mut text)?;
    let text = String::from_utf8_lossy(&text).trim().to_string();
    Ok(if text.is_empty() {
        "another process (it has not written its name yet)".to_string()
    } else {
        text
    })
}

/// Write who holds a lock file (its exclusive holder only).
fn write_holder(file: &File, holder: &str) -> io::Result<()> {
    let text = format!("{}\n", holder_text(holder));
    file.set_len(0)?;
    file.write_all_at(text.as_bytes(), 0)
}

/// "2 writers are running: A; B" for the exclusive lock's refusal.
pub(crate) fn running_writers(live: &[String]) -> String {
    format!(
        "{} writer{} running: {}",
        live.len(),
        if live.len() == 1 { " is" } else { "s are" },
        live.join("; ")
    )
}

impl LocalStore {
    /// `ROOT/<rel>` made (0700, with `locks/`) if absent.
    fn lock_dir(&self, rel: &str) -> io::Result<std::path::PathBuf> {
        let dir = self.root.join(rel);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)?;
        Ok(dir)
    }

    /// The shared lock: a shared flock on `ROOT/lock`, then a writer record locked before it
    /// gets its name (so nobody ever sees a live writer's record unlocked).
    fn lock_shared(&self, holder: &str, wait: Duration) -> Result<Box<dyn LockGuard>, LockError> {
        let main = open_lock_file(&self.root.join(LOCK_FILE))?;
        if !flock_wait(&main, true, wait)? {
            return Err(LockError::Held(lock_file_text(&main)?));
        }
        let dir = self.lock_dir(WRITERS_DIR)?;
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
        let id = format!("{:016x}", u64::from_le_bytes(nonce));
        let tmp = dir.join(format!(".{id}.tmp"));
        let record = dir.join(&id);
        let made = (|| {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&tmp)?;
            f.try_lock().map_err(|e| match e {
                TryLockError::WouldBlock => io::Error::other("a new writer record is locked"),
                TryLockError::Error(e) => e,
            })?;
            f.write_all(format!("{}\n", holder_text(holder)).as_bytes())?;
            f.sync_all()?;
            rename_noreplace(&tmp, &record)?;
            sync_dir(&dir)?;
            Ok::<File, io::Error>(f)
        })();
        match made {
            Ok(f) => Ok(Box::new(LocalLock {
                _files: vec![main, f],
                record: Some(record),
            })),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(LockError::Io(e))
            }
        }
    }
}

impl Store for LocalStore {
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let key = check_key(key)?;
        self.make_parents(key)?;
        let dst = self.path(key);
        let (dir, name) = match (dst.parent(), key.rsplit('/').next()) {
            (Some(d), Some(n)) => (d.to_path_buf(), n),
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty key")),
        };
        let tmp = dir.join(temp_name(name)?);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        let written = (|| {
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            rename_noreplace(&tmp, &dst)
        })();
        if let Err(e) = written {
            if let Err(rm) = std::fs::remove_file(&tmp) {
                tracing::warn!(path = %tmp.display(), error = %rm, "cannot remove a temporary file");
            }
            return Err(e);
        }
        sync_dir(&dir)
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        let key = check_key(key)?;
        let mut f = File::open(self.path(key))?;
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.describe(key)),
            ));
        }
        let mut v = Vec::new();
        // The length is only a hint for the allocation; what the file holds is read.
        v.try_reserve_exact(usize::try_from(meta.len()).unwrap_or(0))
            .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e.to_string()))?;
        f.read_to_end(&mut v)?;
        Ok(v)
    }

    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let key = check_key(key)?;
        let f = self.open_file(key)?;
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > f.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} holds {} bytes, fewer than the {} asked for at offset {offset}",
                    self.describe(key),
                    f.len,
                    buf.len()
                ),
            ));
        }
        if f.direct.load(Relaxed) {
            match read_direct(&f, buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(key, error = %e, "direct read refused; using the page cache");
                    f.direct.store(false, Relaxed);
                    set_direct(&f.file, false)?;
                }
                r => return r,
            }
        }
        f.file.read_exact_at(buf, offset)
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        let dir = check_prefix(prefix)?;
        let mut found = Vec::new();
        // Directories still to read, as (path, key prefix of its entries).
        let start = match dir {
            "" => (self.root.clone(), String::new()),
            d => (self.path(d), format!("{d}/")),
        };
        let mut todo = vec![start];
        while let Some((path, keys)) = todo.pop() {
            let entries = match std::fs::read_dir(&path) {
                Ok(e) => e,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    tracing::debug!(dir = %path.display(), "skipping a name that is not UTF-8");
                    continue;
                };
                if name.starts_with('.') || (keys.is_empty() && is_lock_key(&name)) {
                    continue;
                }
                let key = format!("{keys}{name}");
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    let sub = format!("{key}/");
                    if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                        todo.push((entry.path(), sub));
                    }
                } else if kind.is_file() && key.starts_with(prefix) {
                    let len = entry.metadata()?.len();
                    found.push(ObjectInfo { key, len });
                }
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let key = check_key(key)?;
        let path = self.path(key);
        let removed = match std::fs::remove_file(&path) {
            // Absent: perhaps unlinked by a writer killed before it synced the directory.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
        .and_then(|()| match sync_parent(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        });
        // After the removal: a reader that opened the file before it went sees the count
        // change and does not cache it.
        let mut c = self.cache();
        c.deletions = c.deletions.wrapping_add(1);
        for files in &mut c.files {
            files.pop(key);
        }
        removed
    }

    fn describe(&self, key: &str) -> String {
        self.path(key).display().to_string()
    }

    fn take_lock(
        &self,
        kind: LockKind<'_>,
        holder: &str,
        wait: Duration,
    ) -> Result<Box<dyn LockGuard>, LockError> {
        match kind {
            LockKind::Shared => self.lock_shared(holder, wait),
            LockKind::Exclusive => {
                let file = open_lock_file(&self.root.join(LOCK_FILE))?;
                if !flock_wait(&file, false, wait)? {
                    let live: Vec<String> = self
                        .writer_records()?
                        .into_iter()
                        .filter(|r| r.live)
                        .map(|r| r.holder)
                        .collect();
                    return Err(LockError::Held(if live.is_empty() {
                        lock_file_text(&file)?
                    } else {
                        running_writers(&live)
                    }));
                }
                write_holder(&file, holder)?;
                Ok(Box::new(LocalLock {
                    _files: vec![file],
                    record: None,
                }))
            }
            LockKind::Disk(name) => {
                let name = check_lock_name(name)?;
                let dir = self.lock_dir(DISKS_DIR)?;
                let file = open_lock_file(&dir.join(name))?;
                if !flock_wait(&file, false, wait)? {
                    return Err(LockError::Held(lock_file_text(&file)?));
                }
                write_holder(&file, holder)?;
                Ok(Box::new(LocalLock {
                    _files: vec![file],
                    record: None,
                }))
            }
        }
    }

    fn writer_records(&self) -> io::Result<Vec<WriterRecord>> {
        let dir = self.root.join(WRITERS_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if id.starts_with('.') || check_lock_name(&id).is_err() {
                continue; // a record being made (or not ours)
            }
            let file = match File::open(entry.path()) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // ended meanwhile
                Err(e) => return Err(e),
            };
            // The holder locked its record before it was given its name: a free lock is a
            // holder that is gone (the test lock is released when `file` closes).
            let live = match file.try_lock() {
                Ok(()) => false,
                Err(TryLockError::WouldBlock) => true,
                Err(TryLockError::Error(e)) => return Err(e),
            };
            let holder = lock_file_text(&file)?;
            out.push(WriterRecord { id, holder, live });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn remove_writer_record(&self, id: &str) -> io::Result<()> {
        let dir = self.root.join(WRITERS_DIR);
        match std::fs::remove_file(dir.join(check_lock_name(id)?)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            Ok(()) => sync_dir(&dir),
        }
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn remove_temporaries(&self) -> io::Result<u64> {
        let mut removed = 0u64;
        // Writer records a killed writer had not named yet.
        let writers = self.root.join(WRITERS_DIR);
        if let Ok(entries) = std::fs::read_dir(&writers) {
            for entry in entries.flatten() {
                if is_temp_name(entry.file_name().as_bytes()) {
                    match std::fs::remove_file(entry.path()) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => removed += 1,
                    }
                }
            }
        }
        let mut todo: Vec<std::path::PathBuf> =
            LOCKED_PREFIXES.iter().map(|p| self.root.join(p)).collect();
        while let Some(dir) = todo.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut found = false;
            for entry in entries {
                let entry = entry?;
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    todo.push(entry.path());
                } else if kind.is_file() && is_temp_name(entry.file_name().as_bytes()) {
                    match std::fs::remove_file(entry.path()) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                    tracing::info!(path = %entry.path().display(), "removed the temporary file of a killed writer");
                    removed += 1;
                    found = true;
                }
            }
            if found {
                // A removal that a power cut could undo would only bring back garbage; still,
                // the next writer should not find it again.
                sync_dir(&dir)?;
            }
        }
        Ok(removed)
    }
}

/// Whether a file name is one `temp_name` makes (`.NAME.<16 hex>.tmp`).
fn is_temp_name(name: &[u8]) -> bool {
    name.first() == Some(&b'.') && name.ends_with(b".tmp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        (dir, s)
    }

    /// Every name under `dir` at any depth (hidden ones included), relative, sorted.
    fn all_names(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                if e.file_type().unwrap().is_dir() {
                    todo.push(e.path());
                }
                out.push(rel);
            }
        }
        out.sort();
        out
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn put_is_create_only_and_private() {
        let (dir, s) = store();
        s.put("packs/3f/3f00", b"first").unwrap();
        let e = s.put("packs/3f/3f00", b"second").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(s.get("packs/3f/3f00").unwrap(), b"first");
        // The failed put left no temporary file behind.
        assert_eq!(
            all_names(dir.path()),
            ["packs", "packs/3f", "packs/3f/3f00"]
        );
        assert_eq!(mode(&dir.path().join("packs/3f/3f00")), 0o600);
        assert_eq!(mode(&dir.path().join("packs/3f")), 0o700);
        assert_eq!(mode(&dir.path().join("packs")), 0o700);
        // An empty object is an object.
        s.put("empty", b"").unwrap();
        assert_eq!(s.get("empty").unwrap(), b"");
        assert_eq!(
            s.put("empty", b"x").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn failed_puts_leave_no_temporary_files() {
        let (dir, s) = store();
        s.put("a", b"file").unwrap();
        // The key's parent is a file.
        let e = s.put("a/b", b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotADirectory, "{e}");
        // The key is a directory: the temporary file is written, the rename refused.
        s.put("d/x", b"x").unwrap();
        let e = s.put("d", b"y").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(all_names(dir.path()), ["a", "d", "d/x"]);
        // The root must exist: it is never made.
        let gone = LocalStore::new(dir.path().join("missing"));
        assert_eq!(
            gone.put("x/y", b"z").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(!dir.path().join("missing").exists());
    }

    #[test]
    fn killed_writers_temporaries_are_removed_where_only_lock_holders_put() {
        let (dir, s) = store();
        for k in [
            "packs/3f/3f00",
            "points/a.1",
            "cindex/c",
            "keys/k",
            "hosts/h",
        ] {
            s.put(k, b"object").unwrap();
        }
        // What puts killed before their rename leave (the name `temp_name` gives).
        let left = [
            "packs/3f/.3f01.0123456789abcdef.tmp",
            "points/.b.1.0123456789abcdef.tmp",
            "cindex/.d.0123456789abcdef.tmp",
            "pindex/.e.0123456789abcdef.tmp",
        ];
        std::fs::create_dir(dir.path().join("pindex")).unwrap();
        // Key slots and pins may be put without the lock; the header only by init.
        let kept = [
            "keys/.k2.0123456789abcdef.tmp",
            "hosts/.h2.0123456789abcdef.tmp",
            ".cbtfs.repo.0123456789abcdef.tmp",
        ];
        for f in left.iter().chain(&kept) {
            std::fs::write(dir.path().join(f), b"partial").unwrap();
        }
        assert_eq!(
            temp_name("x").unwrap().len(),
            ".x.".len() + 16 + ".tmp".len()
        );
        assert!(is_temp_name(temp_name("3f00").unwrap().as_bytes()));
        assert_eq!(s.remove_temporaries().unwrap(), left.len() as u64);
        let mut want = vec![
            "cindex",
            "cindex/c",
            "hosts",
            "hosts/h",
            "keys",
            "keys/k",
            "packs",
            "packs/3f",
            "packs/3f/3f00",
            "pindex",
            "points",
            "points/a.1",
        ];
        want.extend(kept);
        want.sort();
        assert_eq!(all_names(dir.path()), want);
        assert_eq!(s.remove_temporaries().unwrap(), 0);
        assert_eq!(s.get("packs/3f/3f00").unwrap(), b"object");
    }

    #[test]
    fn bad_keys_are_refused() {
        let (dir, s) = store();
        for key in [
            "", "/abs", "a//b", "a/", "../x", "a/../b", "./a", ".hidden", "a/.b", "lock", "a\0b",
        ] {
            let e = s.put(key, b"x").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{key:?}: {e}");
            assert_eq!(
                s.get(key).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{key:?}"
            );
        }
        for prefix in ["/", "../", "a/../", ".x/"] {
            assert_eq!(
                s.list(prefix).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{prefix:?}"
            );
        }
        assert!(all_names(dir.path()).is_empty());
    }

    #[test]
    fn list_finds_keys_at_any_depth_sorted_without_temporaries() {
        let (dir, s) = store();
        let keys = [
            "packs/3f/3f01",
            "packs/3f/3f00",
            "packs/40/4000",
            "packs/3/x",
            "points/b.1",
            "points/a.2",
            "points/a.1",
            "cbtfs.repo",
            "pindex/00",
        ];
        for (i, k) in keys.iter().enumerate() {
            s.put(k, &vec![7u8; i]).unwrap();
        }
        let _lock = s.lock("test").unwrap();
        // What an unfinished put leaves, and a stray directory.
        std::fs::write(dir.path().join("packs/3f/.3f02.0123456789abcdef.tmp"), b"t").unwrap();
        std::fs::write(dir.path().join(".cbtfs.repo.1.tmp"), b"t").unwrap();
        std::fs::create_dir(dir.path().join("points/empty")).unwrap();
        let list = |p: &str| -> Vec<(String, u64)> {
            s.list(p)
                .unwrap()
                .into_iter()
                .map(|o| (o.key, o.len))
                .collect()
        };
        let len = |k: &str| keys.iter().position(|x| *x == k).unwrap() as u64;
        let want = |ks: &[&str]| -> Vec<(String, u64)> {
            ks.iter().map(|k| (k.to_string(), len(k))).collect()
        };
        assert_eq!(
            list(""),
            want(&[
                "cbtfs.repo",
                "packs/3/x",
                "packs/3f/3f00",
                "packs/3f/3f01",
                "packs/40/4000",
                "pindex/00",
                "points/a.1",
                "points/a.2",
                "points/b.1",
            ])
        );
        assert_eq!(
            list("packs/"),
            want(&[
                "packs/3/x",
                "packs/3f/3f00",
                "packs/3f/3f01",
                "packs/40/4000"
            ])
        );
        assert_eq!(
            list("packs/3"),
            want(&["packs/3/x", "packs/3f/3f00", "packs/3f/3f01"])
        );
        assert_eq!(list("packs/3f"), want(&["packs/3f/3f00", "packs/3f/3f01"]));
        assert_eq!(list("packs/3f/3f01"), want(&["packs/3f/3f01"]));
        assert_eq!(list("points/a."), want(&["points/a.1", "points/a.2"]));
        assert_eq!(
            list("p"),
            want(&[
                "packs/3/x",
                "packs/3f/3f00",
                "packs/3f/3f01",
                "packs/40/4000",
                "pindex/00",
                "points/a.1",
                "points/a.2",
                "points/b.1",
            ])
        );
        // Absent directories list nothing; so does a file used as a directory.
        assert_eq!(list("meta/"), []);
        assert_eq!(list("nothing/here/"), []);
        assert_eq!(list("cbtfs.repo/"), []);
        assert_eq!(list("lock"), []);
    }

    #[test]
    fn ranges_fail_past_the_end_and_for_absent_objects() {
        let (_dir, s) = store();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        s.put("o", &bytes).unwrap();
        let mut buf = vec![0u8; 100];
        s.get_range("o", 9_900, &mut buf).unwrap();
        assert_eq!(buf, &bytes[9_900..]);
        s.get_range("o", 10_000, &mut []).unwrap();
        let e = s.get_range("o", 9_901, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        let e = s.get_range("o", u64::MAX - 10, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        let e = s.get_range("absent", 0, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert_eq!(s.get("absent").unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn deleted_keys_are_not_served_from_open_files() {
        let (_dir, s) = store();
        let other = s.clone();
        let direct = s.clone().with_direct_reads();
        s.put("packs/00/a", b"0123456789").unwrap();
        let mut buf = [0u8; 4];
        s.get_range("packs/00/a", 2, &mut buf).unwrap();
        other.get_range("packs/00/a", 2, &mut buf).unwrap();
        assert_eq!(&buf, b"2345");
        buf.fill(0);
        direct.get_range("packs/00/a", 2, &mut buf).unwrap();
        assert_eq!(&buf, b"2345");
        let cached = |c: &OpenFiles| [c.files[0].len(), c.files[1].len()];
        assert_eq!(cached(&s.cache()), [1, 1], "the file was not cached");
        // Deleted through a clone: the shared cache forgets it.
        other.delete("packs/00/a").unwrap();
        assert_eq!(cached(&s.cache()), [0, 0]);
        for store in [&s, &direct] {
            let e = store.get_range("packs/00/a", 2, &mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        }
        // Deleting what is absent is fine; a new object under the key is the new bytes.
        s.delete("packs/00/a").unwrap();
        s.put("packs/00/a", b"abcdefghij").unwrap();
        s.get_range("packs/00/a", 2, &mut buf).unwrap();
        assert_eq!(&buf, b"cdef");
    }

    #[test]
    fn the_open_file_cache_is_bounded() {
        let (_dir, s) = store();
        let mut buf = [0u8; 1];
        for i in 0..OPEN_FILES + 10 {
            let k = format!("o/{i}");
            s.put(&k, &[i as u8]).unwrap();
            s.get_range(&k, 0, &mut buf).unwrap();
            assert_eq!(buf[0], i as u8);
        }
        assert_eq!(s.cache().files[0].len(), OPEN_FILES);
    }

    #[test]
    fn direct_reads_give_the_same_bytes_at_any_offset() {
        let (_dir, plain) = store();
        let direct = LocalStore::new(plain.root()).with_direct_reads();
        // Not a multiple of 4 KiB, so the end of the file is a partial page.
        let len = 3 * DIRECT_PIECE + 12_345;
        let bytes: Vec<u8> = (0..len as u32).map(|i| (i ^ (i >> 11)) as u8).collect();
        plain.put("p", &bytes).unwrap();
        let mut probe = [0u8; 1];
        direct.get_range("p", 0, &mut probe).unwrap();
        let f = direct.open_file("p").unwrap();
        // ext4, XFS, Btrfs and tmpfs (since 6.6) all take O_DIRECT.
        assert!(
            f.direct.load(Relaxed),
            "no O_DIRECT here: the direct path goes untested"
        );
        let mut v = Vec::new();
        for (offset, n, shift) in [
            (0, 65536, 0),
            (4096, 8192, 0),
            (4096, 8192, 1),
            (1, 1, 0),
            (4095, 2, 3),
            (100, 4000, 0),
            (65537, 3 * DIRECT_PIECE - 70_000, 5),
            (len - 1, 1, 0),
            (len - 12_345, 12_345, 0),
            (len - 5000, 5000, 7),
            (len - 3 * DIRECT_PIECE - 1, 3 * DIRECT_PIECE + 1, 0),
            (0, len, 0),
        ] {
            let want = &bytes[offset..offset + n];
            let buf = &mut aligned_slice(&mut v, n + 8)[shift..shift + n];
            buf.fill(0);
            direct.get_range("p", offset as u64, buf).unwrap();
            assert!(buf == want, "direct: offset {offset} len {n} shift {shift}");
            buf.fill(0);
            plain.get_range("p", offset as u64, buf).unwrap();
            assert!(buf == want, "plain: offset {offset} len {n} shift {shift}");
        }
        assert!(f.direct.load(Relaxed), "a direct read was refused");
        let mut buf = vec![0u8; 2];
        let e = direct.get_range("p", len as u64 - 1, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_refused_direct_read_falls_back_to_the_page_cache() {
        let (_dir, s) = store();
        let s = s.with_direct_reads();
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 13) as u8).collect();
        s.put("p", &bytes).unwrap();
        let f = s.open_file("p").unwrap();
        assert!(
            f.direct.load(Relaxed),
            "no O_DIRECT here: the fallback goes untested"
        );
        // SAFETY: fcntl(F_GETFL) on a descriptor the test owns.
        let flags = |f: &File| unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags(&f.file) & libc::O_DIRECT, 0);
        f.refuse_direct.store(true, Relaxed);
        let mut buf = vec![0u8; 4097];
        s.get_range("p", 3, &mut buf).unwrap();
        assert_eq!(buf, &bytes[3..4100]);
        // From then on the file is read through the page cache.
        assert!(!f.direct.load(Relaxed));
        assert_eq!(flags(&f.file) & libc::O_DIRECT, 0);
        buf.fill(0);
        s.get_range("p", 15_000, &mut buf).unwrap();
        assert_eq!(buf, &bytes[15_000..19_097]);
    }

    #[test]
    fn the_lock_is_exclusive_and_names_its_holder() {
        let (dir, s) = store();
        let lock_path = dir.path().join(LOCK_FILE);
        let guard = s.lock("cbtfs backup vm1").unwrap();
        assert_eq!(mode(&lock_path), 0o600);
        let text = std::fs::read_to_string(&lock_path).unwrap();
        let want = format!("pid {} (cbtfs backup vm1) since ", std::process::id());
        assert!(text.starts_with(&want), "{text:?}");
        // Another open file description (as another process would have) cannot take it.
        let other = File::open(&lock_path).unwrap();
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
        drop(other);
        // Nor can a second lock of the store; it names the holder.
        match s.lock("cbtfs import") {
            Err(LockError::Held(who)) => assert_eq!(who, text.trim()),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("locked twice"),
        }
        drop(guard);
        let again = s.lock("cbtfs prune").unwrap();
        let text = std::fs::read_to_string(&lock_path).unwrap();
        assert!(text.contains("(cbtfs prune)"), "{text:?}");
        assert!(!text.contains("vm1"), "{text:?}");
        drop(again);
    }

    #[test]
    fn the_lock_held_elsewhere_is_reported_and_waited_for() {
        let (dir, s) = store();
        let lock_path = dir.path().join(LOCK_FILE);
        // Another process: its own open of the file, its own text.
        let theirs = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&lock_path)
            .unwrap();
        theirs.try_lock().unwrap();
        theirs
            .write_all_at(b"pid 4242 (cbtfs gc) since 2026-11-30T00:00:00Z\n", 0)
            .unwrap();
        match s.lock("cbtfs backup") {
            Err(LockError::Held(who)) => {
                assert_eq!(who, "pid 4242 (cbtfs gc) since 2026-11-30T00:00:00Z")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("locked while held"),
        }
        // A holder that leaves within the wait is waited for.
        let (tx, rx) = std::sync::mpsc::channel();
        let leaving = std::thread::spawn(move || {
            rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            drop(theirs);
        });
        tx.send(()).unwrap();
        let started = Instant::now();
        let guard = s.lock("cbtfs backup").unwrap();
        assert!(started.elapsed() < LOCK_WAIT);
        leaving.join().unwrap();
        let text = std::fs::read_to_string(&lock_path).unwrap();
        assert!(text.contains("(cbtfs backup)"), "{text:?}");
        drop(guard);
    }

    fn take(
        s: &LocalStore,
        kind: LockKind<'_>,
        who: &str,
    ) -> Result<Box<dyn LockGuard>, LockError> {
        s.take_lock(kind, who, Duration::ZERO)
    }

    fn held(r: Result<Box<dyn LockGuard>, LockError>) -> String {
        match r {
            Err(LockError::Held(who)) => who,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("taken while held"),
        }
    }

    #[test]
    fn shared_locks_coexist_and_exclude_the_exclusive_one() {
        let (dir, s) = store();
        let a = take(&s, LockKind::Shared, "cbtfs backup vm1").unwrap();
        let b = take(&s, LockKind::Shared, "cbtfs import d2").unwrap();
        // Each leaves a live record naming it.
        let recs = s.writer_records().unwrap();
        assert_eq!(recs.len(), 2, "{recs:?}");
        assert!(recs.iter().all(|r| r.live), "{recs:?}");
        let mut names: Vec<&str> = recs.iter().map(|r| r.holder.as_str()).collect();
        names.sort();
        assert!(names[0].contains("(cbtfs backup vm1) since "), "{names:?}");
        assert!(names[1].contains("(cbtfs import d2)"), "{names:?}");
        // The exclusive lock names both writers, waiting its full time first.
        let started = Instant::now();
        let who = held(s.lock("cbtfs gc"));
        assert!(started.elapsed() >= LOCK_WAIT);
        assert!(who.starts_with("2 writers are running: "), "{who}");
        assert!(
            who.contains("(cbtfs backup vm1)") && who.contains("(cbtfs import d2)"),
            "{who}"
        );
        drop(a);
        let who = held(take(&s, LockKind::Exclusive, "cbtfs gc"));
        assert!(
            who.starts_with("1 writer is running: ") && who.contains("(cbtfs import d2)"),
            "{who}"
        );
        // A writer that ends cleanly leaves no record.
        drop(b);
        assert_eq!(s.writer_records().unwrap(), []);
        let x = take(&s, LockKind::Exclusive, "cbtfs gc").unwrap();
        // The exclusive lock keeps writers out, naming its holder.
        let who = held(take(&s, LockKind::Shared, "cbtfs backup vm1"));
        assert!(who.contains("(cbtfs gc)"), "{who}");
        assert!(
            who.contains(&format!("pid {}", std::process::id())),
            "{who}"
        );
        drop(x);
        let again = take(&s, LockKind::Shared, "cbtfs backup vm1").unwrap();
        drop(again);
        // Lock files are never objects.
        assert_eq!(s.list("").unwrap(), []);
        assert!(dir.path().join("locks/writers").is_dir());
        for key in ["locks", "locks/writers/x", "locks/disks/y"] {
            assert_eq!(
                s.put(key, b"x").unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
    }

    #[test]
    fn a_disk_lock_has_one_holder_and_other_disks_are_free() {
        let (dir, s) = store();
        let _w = take(&s, LockKind::Shared, "w").unwrap();
        let a = take(&s, LockKind::Disk("0a1b"), "cbtfs backup of VDI A").unwrap();
        let b = take(&s, LockKind::Disk("ffee"), "cbtfs backup of VDI B").unwrap();
        let who = held(take(&s, LockKind::Disk("0a1b"), "cbtfs import A"));
        assert!(who.contains("(cbtfs backup of VDI A)"), "{who}");
        drop(a);
        let a2 = take(&s, LockKind::Disk("0a1b"), "cbtfs import A").unwrap();
        assert!(
            std::fs::read_to_string(dir.path().join("locks/disks/0a1b"))
                .unwrap()
                .contains("(cbtfs import A)")
        );
        drop((a2, b));
        for bad in ["", "../x", "a/b", ".x", "a b"] {
            match take(&s, LockKind::Disk(bad), "x") {
                Err(LockError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::InvalidInput),
                _ => panic!("{bad:?} accepted"),
            }
        }
    }

    #[test]
    fn a_dead_writers_record_shows_it_dead_until_removed() {
        let (dir, s) = store();
        let live = take(&s, LockKind::Shared, "cbtfs backup live").unwrap();
        // A writer killed mid-run: its record stays, its flock is gone with its process.
        let writers = dir.path().join(WRITERS_DIR);
        std::fs::write(
            writers.join("00000000deadbeef"),
            "pid 1 (cbtfs import killed) since x\n",
        )
        .unwrap();
        // A record being made (hidden name) is not listed.
        std::fs::write(writers.join(".0000000000000001.tmp"), "x").unwrap();
        let recs = s.writer_records().unwrap();
        assert_eq!(recs.len(), 2, "{recs:?}");
        let dead: Vec<&WriterRecord> = recs.iter().filter(|r| !r.live).collect();
        assert_eq!(dead.len(), 1, "{recs:?}");
        assert_eq!(dead[0].id, "00000000deadbeef");
        assert_eq!(dead[0].holder, "pid 1 (cbtfs import killed) since x");
        // The dead record does not hold the exclusive lock back; the live writer does.
        let who = held(take(&s, LockKind::Exclusive, "gc"));
        assert!(
            who.starts_with("1 writer is running") && who.contains("cbtfs backup live"),
            "{who}"
        );
        drop(live);
        let x = take(&s, LockKind::Exclusive, "gc").unwrap();
        s.remove_writer_record("00000000deadbeef").unwrap();
        s.remove_writer_record("00000000deadbeef").unwrap();
        assert_eq!(s.writer_records().unwrap(), []);
        drop(x);
    }
}
