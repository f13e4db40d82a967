//! `CachedStore`: a local cache in front of a remote store (an S3 bucket), so that listing a
//! repository and reading it again cost no downloads.
//!
//! Objects are immutable and create-only: a cached copy of key K is K's bytes for as long as K
//! exists. What is kept:
//!
//! * **Metadata, whole.** Point manifests (`points/`), point indexes (`pindex/`), VM metadata
//!   (`meta/`) and key slots (`keys/`) are kept once read (or written), in `DIR/meta/KEY`. A warm
//!   `ls` or mount start does one LIST per prefix (to learn what exists, which the cache never
//!   guesses) and no GET of them. Every LIST through the cache drops the cached copies of keys it
//!   no longer shows, or shows with another length. The chunk index (`cindex/`) has its own cache
//!   of plain bodies (`chunkindex`) and passes through; so do the header, host pins, journals and
//!   the lock.
//! * **Pack ranges, bounded.** Ranges of packs read with `get_range` are kept in
//!   `DIR/ranges/`, one file per range fetched, up to a byte budget (`--cache-size`,
//!   `CBTFS_CACHE_SIZE`, default [`DEFAULT_SIZE`]): the least recently used go first. A request
//!   wholly inside a cached range is served from it. The budget bounds pack ranges only;
//!   metadata is small beside them (a manifest ~1 KiB, a point index ~8 bytes per stored block).
//!
//! # Trust
//!
//! The cache is never trusted over the store. Every cache file is
//! `MAGIC | body length (u64 LE) | body | BLAKE3(name, length, body)`: a file cut short by a
//! killed process or a power cut, damaged on disk, or moved under another name fails the check,
//! is removed and fetched again from the store. Above it, every chunk is still authenticated
//! (`pack::decode_chunk`) and every sealed object opened with its key; a cached object that
//! does not open is dropped ([`Store::forget_cached`]) and fetched once more from the store
//! before any error is reported (`Repository::get_sealed`).
//!
//! # Sharing
//!
//! Files are 0600 in 0700 directories. Several processes (a mount and an `ls`) may share one
//! directory: files are written under a temporary name and renamed into place, so a reader sees
//! a whole file or none; a file another process evicted is a miss. Each process keeps the
//! ranges within the budget by its own accounting, started from what the directory holds when
//! it opens the cache (files ordered by modification time, which a hit refreshes); processes
//! caching at the same time may together exceed it until the next one starts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{DIR_MODE, FILE_MODE, LockError, LockGuard, ObjectInfo, Store};

/// The default budget of cached pack ranges: 1 GiB, a few minutes of a mount's reads at S3
/// speeds, small beside any disk holding backups.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// A cache file's magic; its last byte is the file format's version.
const MAGIC: [u8; 8] = *b"CBTFSOC\x01";
/// Magic and body length before the body; the hash after it.
const HEAD_LEN: usize = 16;
const HASH_LEN: usize = 32;
/// Largest range kept: the repository's reads coalesce at most 8 MiB (`MAX_COALESCE`); a
/// larger one is not cached (and bounds how far back a containing range is searched for).
const MAX_RANGE: u64 = 16 << 20;
/// Key prefixes kept whole.
const META_PREFIXES: &[&str] = &["points/", "pindex/", "meta/", "keys/"];
const PACKS: &str = "packs/";
/// Most fetches of a batch (`get_many`) in flight at once.
pub const PARALLEL_GETS: usize = 32;
/// Temporary files older than this belong to killed writers and are removed at open.
const TMP_MAX_AGE: Duration = Duration::from_secs(3600);

/// How the cache is configured (the command line, mount options, the environment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheOptions {
    /// The base directory of caches (`--cache-dir`, else `CBTFS_CACHE_DIR`, `XDG_CACHE_HOME`,
    /// `HOME`); a repository's are in `BASE/<repository id>/`.
    pub dir: Option<PathBuf>,
    /// Budget of cached pack ranges in bytes (`--cache-size`, else `CBTFS_CACHE_SIZE`).
    pub size: Option<u64>,
    /// No cache at all (`verify` reads what is stored, never a copy).
    pub off: bool,
}

static OPTIONS: Mutex<Option<CacheOptions>> = Mutex::new(None);

/// Set the process's cache options (the last call wins; set before opening repositories).
pub fn set_options(o: CacheOptions) {
    *OPTIONS.lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
}

/// The process's cache options.
pub fn options() -> CacheOptions {
    OPTIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// The budget of cached pack ranges: the options', else `CBTFS_CACHE_SIZE`, else the default.
/// A malformed `CBTFS_CACHE_SIZE` is named in a warning and the default used.
pub fn size_limit() -> u64 {
    if let Some(s) = options().size {
        return s;
    }
    match std::env::var("CBTFS_CACHE_SIZE") {
        Ok(v) if !v.trim().is_empty() => match parse_size(&v) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("CBTFS_CACHE_SIZE: {e}; using the default of 1 GiB");
                DEFAULT_SIZE
            }
        },
        _ => DEFAULT_SIZE,
    }
}

/// Parse a size: a number of bytes, or with a suffix K, M, G, T (powers of 1024; `KiB`, `MB`,
/// `GiB`... are read the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let bad =
        || format!("{s:?} is not a size: give bytes or a number with K, M, G or T (e.g. 512M, 2G)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Put a cache in front of `inner`, the store of repository `repo_id`, as the options say; the
/// store itself when the cache is off or its directory cannot be used (with a warning).
pub fn wrap(inner: Arc<dyn Store>, repo_id: &str) -> Arc<dyn Store> {
    let o = options();
    if o.off {
        return inner;
    }
    let Some(root) = crate::repo::chunkindex::repo_cache_dir(repo_id, "store") else {
        return inner;
    };
    match CachedStore::open(inner.clone(), &root, size_limit()) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(
                "cannot use {} as the cache of {} ({e}); reading the store without a cache",
                root.display(),
                inner.describe("")
            );
            inner
        }
    }
}

/// What the cache did (tests, logs).
#[derive(Debug, Default)]
pub struct CacheStats {
    pub meta_hits: AtomicU64,
    pub range_hits: AtomicU64,
    /// Objects and ranges fetched from the store.
    pub fetches: AtomicU64,
    /// Cache files found damaged (removed and fetched again).
    pub damaged: AtomicU64,
}

/// A local cache in front of another store (see the module doc).
pub struct CachedStore {
    inner: Arc<dyn Store>,
    root: PathBuf,
    limit: u64,
    lru: Mutex<RangeLru>,
    stats: CacheStats,
    meta_writer: MetaWriter,
}

/// Small metadata objects fetched by a mount, written to the cache by a thread of their own
/// (once turned on, after the daemon's fork). A cold mount of 1,000 points fetched its manifests in half a second, then spent as long
/// again, or more on a busy disk, creating 1,000 cache files before it was ready. Until an
/// entry is written, this process reads it from `pending`; an entry not written when the
/// process ends is only a later cache miss.
#[derive(Default)]
struct MetaWriter {
    /// Writes go to the thread (`Store::cache_writes_in_background`).
    enabled: std::sync::atomic::AtomicBool,
    /// Entries queued and not written yet, by key.
    pending: Arc<Mutex<HashMap<String, Arc<[u8]>>>>,
    /// The writer thread's queue (None until the first entry, or once it stopped).
    queue: Mutex<Option<std::sync::mpsc::SyncSender<(PathBuf, String)>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Metadata objects up to this size are written by the writer thread; larger ones (a big
/// disk's point index) at once, so that `pending` stays small.
const BACKGROUND_ENTRY_MAX: usize = 1 << 20;
/// Entries queued for the writer thread at most; then the fetching threads wait.
const BACKGROUND_QUEUE: usize = 4096;

impl MetaWriter {
    /// Queue `body` for `path`; false if it must be written at once (too large, or no thread).
    fn queue(&self, path: PathBuf, key: &str, body: &[u8]) -> bool {
        if body.len() > BACKGROUND_ENTRY_MAX || !self.enabled.load(Relaxed) {
            return false;
        }
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.is_none() {
            let (tx, rx) = std::sync::mpsc::sync_channel::<(PathBuf, String)>(BACKGROUND_QUEUE);
            let pending = self.pending.clone();
            let Ok(t) = std::thread::Builder::new()
                .name("cbtfs-cache-write".into())
                .spawn(move || {
                    for (path, key) in rx {
                        let body = pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&key)
                            .cloned();
                        if let Some(body) = body
                            && let Err(e) = write_entry(&path, &key, &body)
                        {
                            tracing::debug!("cannot cache {key} ({e})");
                        }
                        pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&key);
                    }
                })
            else {
                return false;
            };
            *queue = Some(tx);
            *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        }
        let Some(tx) = queue.as_ref() else {
            return false;
        };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), Arc::from(body));
        let tx = tx.clone();
        // Not under the queue's lock: a full queue makes this thread wait, not every thread.
        drop(queue);
        if tx.send((path, key.to_string())).is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
            return false;
        }
        true
    }

    /// An entry queued and not written yet.
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|b| b.to_vec())
    }

    /// Write what is queued and stop the thread.
    fn finish(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for CachedStore {
    fn drop(&mut self) {
        self.meta_writer.finish();
    }
}

impl std::fmt::Debug for CachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStore")
            .field("inner", &self.inner)
            .field("root", &self.root)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

fn is_meta(key: &str) -> bool {
    META_PREFIXES.iter().any(|p| key.starts_with(p))
}

fn is_pack(key: &str) -> bool {
    key.starts_with(PACKS)
}

/// One cached range of a pack.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeId {
    pub pack: String,
    pub offset: u64,
    pub len: u64,
}

impl RangeId {
    /// Its file name: the pack key with '/' made '_', then `.OFFSET.LEN`.
    fn file_name(&self) -> String {
        format!(
            "{}.{}.{}",
            self.pack.replace('/', "_"),
            self.offset,
            self.len
        )
    }

    /// The range a file name stands for (None for anything else).
    fn parse(name: &str) -> Option<RangeId> {
        let (rest, len) = name.rsplit_once('.')?;
        let (pack, offset) = rest.rsplit_once('.')?;
        let pack = pack.strip_prefix("packs_")?;
        if pack.is_empty() || pack.contains(['.', '/']) || pack.starts_with('_') {
            return None;
        }
        let (offset, len) = (offset.parse().ok()?, len.parse().ok()?);
        let id = RangeId {
            pack: format!("{PACKS}{}", pack.replace('_', "/")),
            offset,
            len,
        };
        (id.file_name() == name).then_some(id)
    }

    /// Bytes its file takes.
    fn cost(&self) -> u64 {
        self.len + (HEAD_LEN + HASH_LEN) as u64
    }
}

/// The least-recently-used order of cached ranges, and which ranges each pack has. Pure
/// bookkeeping: the files are the caller's.
#[derive(Debug, Default)]
pub struct RangeLru {
    tick: u64,
    total: u64,
    used: HashMap<RangeId, u64>,
    order: BTreeMap<u64, RangeId>,
    by_pack: HashMap<String, BTreeSet<(u64, u64)>>,
}

impl RangeLru {
    /// Bytes of the ranges held (with their files' overhead).
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// A held range holding `len` bytes at `offset` of `pack` (made most recently used).
    pub fn find(&mut self, pack: &str, offset: u64, len: u64) -> Option<RangeId> {
        let end = offset.checked_add(len)?;
        let set = self.by_pack.get(pack)?;
        let found = set
            .range(..=(offset, u64::MAX))
            .rev()
            .take_while(|(o, _)| o.saturating_add(MAX_RANGE) >= end)
            .find(|(o, l)| o.saturating_add(*l) >= end)
            .map(|&(o, l)| RangeId {
                pack: pack.to_string(),
                offset: o,
                len: l,
            })?;
        self.touch(&found);
        Some(found)
    }

    fn touch(&mut self, id: &RangeId) {
        if let Some(t) = self.used.get_mut(id) {
            self.order.remove(t);
            self.tick += 1;
            *t = self.tick;
            self.order.insert(self.tick, id.clone());
        }
    }

    /// Hold `id` as the most recently used; returns the ranges evicted to stay within `limit`
    /// (the least recently used first; `id` itself if it alone is over the limit).
    pub fn insert(&mut self, id: RangeId, limit: u64) -> Vec<RangeId> {
        if self.used.contains_key(&id) {
            self.touch(&id);
        } else {
            self.tick += 1;
            self.total = self.total.saturating_add(id.cost());
            self.by_pack
                .entry(id.pack.clone())
                .or_default()
                .insert((id.offset, id.len));
            self.order.insert(self.tick, id.clone());
            self.used.insert(id, self.tick);
        }
        let mut evicted = Vec::new();
        while self.total > limit {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.forget(&oldest);
            evicted.push(oldest);
        }
        evicted
    }

    /// Stop holding `id` (its file is gone).
    pub fn remove(&mut self, id: &RangeId) {
        if let Some(t) = self.used.get(id).copied() {
            self.order.remove(&t);
            self.forget(id);
        }
    }

    /// Drop the bookkeeping of `id` (already out of `order`).
    fn forget(&mut self, id: &RangeId) {
        if self.used.remove(id).is_some() {
            self.total = self.total.saturating_sub(id.cost());
        }
        if let Some(set) = self.by_pack.get_mut(&id.pack) {
            set.remove(&(id.offset, id.len));
            if set.is_empty() {
                self.by_pack.remove(&id.pack);
            }
        }
    }

    /// Every range of `pack`.
    pub fn of_pack(&self, pack: &str) -> Vec<RangeId> {
        self.by_pack
            .get(pack)
            .map(|s| {
                s.iter()
                    .map(|&(offset, len)| RangeId {
                        pack: pack.to_string(),
                        offset,
                        len,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The packs with ranges held.
    pub fn packs(&self) -> Vec<String> {
        self.by_pack.keys().cloned().collect()
    }
}

/// The hash that closes a cache file: of its name (the key, or the range's file name), the
/// body's length and the body.
fn entry_hash(name: &str, body: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update(&(body.len() as u64).to_le_bytes());
    h.update(body);
    h.finalize()
}

/// The body of a cache file's bytes, checked (see the module doc); why not otherwise.
pub fn open_entry<'a>(name: &str, file: &'a [u8]) -> Result<&'a [u8], String> {
    let Some((head, rest)) = file.split_first_chunk::<HEAD_LEN>() else {
        return Err(format!(
            "it is {} bytes, shorter than its header",
            file.len()
        ));
    };
    if head[..8] != MAGIC {
        return Err("it does not start with the cache file magic".into());
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&head[8..]);
    let n = u64::from_le_bytes(n);
    if (rest.len() as u64).checked_sub(HASH_LEN as u64) != Some(n) {
        return Err(format!(
            "its header says {n} bytes but it holds {} (cut short or damaged)",
            rest.len().saturating_sub(HASH_LEN)
        ));
    }
    let (body, hash) = rest.split_at(rest.len() - HASH_LEN);
    if entry_hash(name, body).as_bytes() != hash {
        return Err("its hash does not match its contents (damaged)".into());
    }
    Ok(body)
}

/// Write a cache file whole: a temporary name in the same directory (0600), then renamed.
fn write_entry(path: &Path, name: &str, body: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("a cache file without a directory"))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("a cache file without a name"))?;
    let tmp = dir.join(super::temp_name(file_name)?);
    let r = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        f.write_all(&MAGIC)?;
        f.write_all(&(body.len() as u64).to_le_bytes())?;
        f.write_all(body)?;
        f.write_all(entry_hash(name, body).as_bytes())?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// Read a whole cache file: Ok(None) when absent.
fn read_file(path: &Path) -> io::Result<Option<(File, Vec<u8>)>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(Some((f, v)))
}

impl CachedStore {
    /// A cache in directory `root` (made 0700 if needed) in front of `inner`, keeping at most
    /// `limit` bytes of pack ranges. Ranges already in the directory are taken over, oldest
    /// first; temporary files of killed processes are removed.
    pub fn open(inner: Arc<dyn Store>, root: &Path, limit: u64) -> io::Result<CachedStore> {
        for d in [root.to_path_buf(), root.join("meta"), root.join("ranges")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&d)?;
        }
        let c = CachedStore {
            inner,
            root: root.to_path_buf(),
            limit,
            lru: Mutex::new(RangeLru::default()),
            stats: CacheStats::default(),
            meta_writer: MetaWriter::default(),
        };
        c.scan_ranges()?;
        remove_old_temporaries(&root.join("meta"), 0);
        Ok(c)
    }

    /// What the cache did so far.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, RangeLru> {
        // Every update is whole under the lock: a panic elsewhere cannot leave it half done.
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn meta_path(&self, key: &str) -> PathBuf {
        self.root.join("meta").join(key)
    }

    fn range_path(&self, id: &RangeId) -> PathBuf {
        self.root.join("ranges").join(id.file_name())
    }

    /// Take over the ranges in the directory, least recently used first, and evict down to the
    /// limit.
    fn scan_ranges(&self) -> io::Result<()> {
        let dir = self.root.join("ranges");
        let mut found = Vec::new();
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                if is_old(&e) {
                    let _ = fs::remove_file(e.path());
                }
                continue;
            }
            let Some(id) = RangeId::parse(name) else {
                continue;
            };
            let Ok(md) = e.metadata() else { continue };
            if md.len() != id.cost() {
                // Cut short (or not ours): it would fail its check anyway.
                let _ = fs::remove_file(e.path());
                continue;
            }
            found.push((md.modified().unwrap_or(SystemTime::UNIX_EPOCH), id));
        }
        found.sort();
        let mut lru = self.lru();
        for (_, id) in found {
            for gone in lru.insert(id, self.limit) {
                let _ = fs::remove_file(self.range_path(&gone));
            }
        }
        Ok(())
    }

    /// The cached body of metadata object `key`, if intact (a damaged file is removed).
    fn cached_meta(&self, key: &str) -> Option<Vec<u8>> {
        if let Some(body) = self.meta_writer.get(key) {
            self.stats.meta_hits.fetch_add(1, Relaxed);
            return Some(body);
        }
        let path = self.meta_path(key);
        let (_, bytes) = match read_file(&path) {
            Ok(Some(x)) => x,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!("cache file {} unreadable ({e}): fetching", path.display());
                return None;
            }
        };
        match open_entry(key, &bytes) {
            Ok(body) => {
                self.stats.meta_hits.fetch_add(1, Relaxed);
                Some(body.to_vec())
            }
            Err(why) => {
                self.stats.damaged.fetch_add(1, Relaxed);
                tracing::warn!(
                    "cache file {} is damaged ({why}); fetching {} again",
                    path.display(),
                    self.inner.describe(key)
                );
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    fn keep_meta(&self, key: &str, body: &[u8]) {
        if self.meta_writer.queue(self.meta_path(key), key, body) {
            return;
        }
        if let Err(e) = write_entry(&self.meta_path(key), key, body) {
            tracing::debug!("cannot cache {key} ({e})");
        }
    }

    fn fetch_meta(&self, key: &str) -> io::Result<Vec<u8>> {
        self.stats.fetches.fetch_add(1, Relaxed);
        let body = self.inner.get(key)?;
        self.keep_meta(key, &body);
        Ok(body)
    }

    /// Serve `buf` at `offset` of `pack` from a cached range, if one holds it intact.
    fn cached_range(&self, pack: &str, offset: u64, buf: &mut [u8]) -> bool {
        loop {
            let Some(id) = self.lru().find(pack, offset, buf.len() as u64) else {
                return false;
            };
            let path = self.range_path(&id);
            let name = id.file_name();
            let ok = match read_file(&path) {
                Ok(Some((f, bytes))) => match open_entry(&name, &bytes) {
                    Ok(body) => {
                        // find() guarantees the range holds [offset, offset + len).
                        let at = (offset - id.offset) as usize;
                        match body.get(at..at + buf.len()) {
                            Some(src) => {
                                buf.copy_from_slice(src);
                                // Its use, for the order other processes take over.
                                let _ = f.set_modified(SystemTime::now());
                                true
                            }
                            None => false,
                        }
                    }
                    Err(why) => {
                        self.stats.damaged.fetch_add(1, Relaxed);
                        tracing::warn!(
                            "cache file {} is damaged ({why}); fetching the range again",
                            path.display()
                        );
                        false
                    }
                },
                // Evicted by another process.
                Ok(None) => false,
                Err(e) => {
                    tracing::debug!("cache file {} unreadable ({e})", path.display());
                    false
                }
            };
            if ok {
                self.stats.range_hits.fetch_add(1, Relaxed);
                return true;
            }
            let _ = fs::remove_file(&path);
            self.lru().remove(&id);
        }
    }

    fn keep_range(&self, pack: &str, offset: u64, body: &[u8]) {
        let id = RangeId {
            pack: pack.to_string(),
            offset,
            len: body.len() as u64,
        };
        if id.len == 0 || id.len > MAX_RANGE || id.cost() > self.limit {
            return;
        }
        if let Err(e) = write_entry(&self.range_path(&id), &id.file_name(), body) {
            tracing::debug!("cannot cache a range of {pack} ({e})");
            return;
        }
        let evicted = self.lru().insert(id, self.limit);
        for gone in evicted {
            let _ = fs::remove_file(self.range_path(&gone));
        }
    }

    /// Drop cached copies under `prefix` that `listed` does not show (or shows with another
    /// length).
    fn reconcile(&self, prefix: &str, listed: &[ObjectInfo]) {
        let lens: HashMap<&str, u64> = listed.iter().map(|o| (o.key.as_str(), o.len)).collect();
        // Metadata: walk the cached files below the prefix's directory part.
        let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let start = self.root.join("meta").join(dir_part);
        let mut stack = vec![(start, dir_part.to_string())];
        let mut seen_dirs = 0usize;
        while let Some((dir, rel)) = stack.pop() {
            seen_dirs += 1;
            if seen_dirs > 100_000 {
                break; // never unbounded; the cache holds a few top-level prefixes
            }
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.starts_with('.') {
                    continue;
                }
                let key = if rel.is_empty() {
                    name.to_string()
                } else {
                    format!("{rel}/{name}")
                };
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    let k = format!("{key}/");
                    if k.starts_with(prefix) || prefix.starts_with(&k) {
                        stack.push((e.path(), key));
                    }
                    continue;
                }
                if !key.starts_with(prefix) {
                    continue;
                }
                let cached_len = e
                    .metadata()
                    .map(|m| m.len().saturating_sub((HEAD_LEN + HASH_LEN) as u64))
                    .ok();
                if lens.get(key.as_str()).copied() != cached_len {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        // Ranges of packs no longer listed.
        if PACKS.starts_with(prefix) || prefix.starts_with(PACKS) {
            let gone: Vec<RangeId> = {
                let lru = self.lru();
                lru.packs()
                    .into_iter()
                    .filter(|p| p.starts_with(prefix) && !lens.contains_key(p.as_str()))
                    .flat_map(|p| lru.of_pack(&p))
                    .collect()
            };
            for id in gone {
                let _ = fs::remove_file(self.range_path(&id));
                self.lru().remove(&id);
            }
        }
    }

    /// Drop every cached copy of `key`.
    fn drop_key(&self, key: &str) -> bool {
        if is_meta(key) {
            return fs::remove_file(self.meta_path(key)).is_ok();
        }
        if is_pack(key) {
            let ids = self.lru().of_pack(key);
            for id in &ids {
                let _ = fs::remove_file(self.range_path(id));
                self.lru().remove(id);
            }
            return !ids.is_empty();
        }
        false
    }
}

fn is_old(e: &fs::DirEntry) -> bool {
    e.metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > TMP_MAX_AGE)
}

/// Remove temporary files older than `TMP_MAX_AGE` below `dir` (bounded depth).
fn remove_old_temporaries(dir: &Path, depth: u32) {
    if depth > 4 {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let is_tmp = e.file_name().to_str().is_some_and(|n| n.starts_with('.'));
        match e.file_type() {
            Ok(t) if t.is_dir() => remove_old_temporaries(&e.path(), depth + 1),
            Ok(_) if is_tmp && is_old(&e) => {
                let _ = fs::remove_file(e.path());
            }
            _ => {}
        }
    }
}

/// Get `keys` from `store` with up to `threads` requests in flight (results in `keys`' order).
pub fn get_parallel(
    store: &dyn Store,
    keys: &[String],
    threads: usize,
    on_fetched: &(dyn Fn(&str, &[u8]) + Sync),
) -> Vec<io::Result<Vec<u8>>> {
    let get = |k: &String| {
        let r = store.get(k);
        if let Ok(b) = &r {
            on_fetched(k, b);
        }
        r
    };
    let n = threads.clamp(1, keys.len().max(1));
    if n == 1 {
        return keys.iter().map(get).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<io::Result<Vec<u8>>>>> =
        keys.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    let Some(k) = keys.get(i) else { break };
                    let r = get(k);
                    if let Some(slot) = results.get(i) {
                        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err(io::Error::other("internal: a batched read was lost")))
        })
        .collect()
}

impl Store for CachedStore {
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        self.inner.put(key, bytes)?;
        if is_meta(key) {
            self.keep_meta(key, bytes);
        }
        Ok(())
    }

    // Packs (never cached here) go straight to the inner store's owned put, and its
    // parallelism is the writer's: a wrapper must not turn S3's uploads back into one at a
    // time.
    fn put_owned(&self, key: &str, bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        let bytes = self.inner.put_owned(key, bytes)?;
        if is_meta(key) {
            self.keep_meta(key, &bytes);
        }
        Ok(bytes)
    }

    fn parallel_puts(&self) -> usize {
        self.inner.parallel_puts()
    }

    fn cache_writes_in_background(&self, on: bool) {
        self.meta_writer.enabled.store(on, Relaxed);
        if !on {
            self.meta_writer.finish();
        }
    }

    // Object Lock and object versions are the S3 store's: a locked repository refuses to
    // open without it.
    fn s3(&self) -> Option<&super::s3::S3Store> {
        self.inner.s3()
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        if !is_meta(key) {
            return self.inner.get(key);
        }
        if let Some(b) = self.cached_meta(key) {
            return Ok(b);
        }
        self.fetch_meta(key)
    }

    fn get_many(&self, keys: &[String]) -> Vec<io::Result<Vec<u8>>> {
        let mut out: Vec<Option<io::Result<Vec<u8>>>> = keys
            .iter()
            .map(|k| {
                if is_meta(k) {
                    self.cached_meta(k).map(Ok)
                } else {
                    None
                }
            })
            .collect();
        let missing: Vec<String> = keys
            .iter()
            .zip(&out)
            .filter(|(_, r)| r.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        if !missing.is_empty() {
            self.stats.fetches.fetch_add(missing.len() as u64, Relaxed);
            // Each object is kept by the thread that fetched it, while others still wait on
            // the network (1,000 manifests kept one after another took a quarter second).
            let keep = |k: &str, b: &[u8]| {
                if is_meta(k) {
                    self.keep_meta(k, b);
                }
            };
            let fetched = get_parallel(self.inner.as_ref(), &missing, PARALLEL_GETS, &keep);
            let mut fetched = fetched.into_iter();
            for slot in out.iter_mut().filter(|r| r.is_none()) {
                if let Some(r) = fetched.next() {
                    *slot = Some(r);
                }
            }
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(io::Error::other("internal: a batched read was lost")))
            })
            .collect()
    }

    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if is_pack(key) && !buf.is_empty() {
            if self.cached_range(key, offset, buf) {
                return Ok(());
            }
            self.stats.fetches.fetch_add(1, Relaxed);
            self.inner.get_range(key, offset, buf)?;
            self.keep_range(key, offset, buf);
            return Ok(());
        }
        if is_meta(key)
            && let Some(b) = self.cached_meta(key)
        {
            let start = usize::try_from(offset).ok();
            let src = start
                .and_then(|s| Some(s..s.checked_add(buf.len())?))
                .and_then(|r| b.get(r));
            return match src {
                Some(src) => {
                    buf.copy_from_slice(src);
                    Ok(())
                }
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} holds {} bytes, fewer than the {} asked for at offset {offset}",
                        self.inner.describe(key),
                        b.len(),
                        buf.len()
                    ),
                )),
            };
        }
        self.inner.get_range(key, offset, buf)
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        let listed = self.inner.list(prefix)?;
        self.reconcile(prefix, &listed);
        Ok(listed)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        self.inner.delete(key)?;
        self.drop_key(key);
        Ok(())
    }

    fn describe(&self, key: &str) -> String {
        self.inner.describe(key)
    }

    fn take_lock(
        &self,
        kind: super::LockKind<'_>,
        holder: &str,
        wait: std::time::Duration,
    ) -> Result<Box<dyn LockGuard>, LockError> {
        self.inner.take_lock(kind, holder, wait)
    }

    fn writer_records(&self) -> io::Result<Vec<super::WriterRecord>> {
        self.inner.writer_records()
    }

    fn remove_writer_record(&self, id: &str) -> io::Result<()> {
        self.inner.remove_writer_record(id)
    }

    fn local_root(&self) -> Option<&Path> {
        self.inner.local_root()
    }

    fn remove_temporaries(&self) -> io::Result<u64> {
        self.inner.remove_temporaries()
    }

    fn forget_cached(&self, key: &str) -> bool {
        self.drop_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::super::LocalStore;
    use super::*;

    fn rid(pack: &str, offset: u64, len: u64) -> RangeId {
        RangeId {
            pack: pack.into(),
            offset,
            len,
        }
    }

    /// Counts what reaches the store behind the cache.
    #[derive(Debug)]
    struct Counting {
        inner: LocalStore,
        gets: AtomicU64,
        ranges: AtomicU64,
    }

    impl Store for Counting {
        fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
            self.inner.put(key, bytes)
        }
        fn get(&self, key: &str) -> io::Result<Vec<u8>> {
            self.gets.fetch_add(1, Relaxed);
            self.inner.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.ranges.fetch_add(1, Relaxed);
            self.inner.get_range(key, offset, buf)
        }
        fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> io::Result<()> {
            self.inner.delete(key)
        }
        fn describe(&self, key: &str) -> String {
            self.inner.describe(key)
        }
        fn take_lock(
            &self,
            kind: crate::repo::store::LockKind<'_>,
            holder: &str,
            wait: std::time::Duration,
        ) -> Result<Box<dyn LockGuard>, LockError> {
            self.inner.take_lock(kind, holder, wait)
        }
        fn parallel_puts(&self) -> usize {
            3
        }
    }

    /// The writer's upload parallelism and owned puts pass through the cache.
    #[test]
    fn uploads_keep_the_inner_stores_parallelism() {
        let (_t, counting, c) = setup(1 << 20);
        assert_eq!(c.parallel_puts(), 3);
        let back = c.put_owned("points/a/000001", vec![7u8; 100]).unwrap();
        assert_eq!(back, vec![7u8; 100]);
        assert_eq!(c.get("points/a/000001").unwrap(), vec![7u8; 100]);
        // Kept as metadata by the owned put: read without reaching the store.
        assert_eq!(counting.gets.load(Relaxed), 0);
    }

    #[test]
    fn background_cache_writes_start_only_when_asked_and_finish_whole() {
        let (t, counting, c) = setup(1 << 20);
        let keys: Vec<String> = (0..50).map(|i| format!("points/m{i:03}.000001")).collect();
        for (i, k) in keys.iter().enumerate() {
            counting.inner.put(k, &pattern(300, i as u32 + 1)).unwrap();
        }
        let files = || {
            fs::read_dir(t.path().join("cache").join("meta").join("points"))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        // Off by default: kept at once, by the calling thread (a process may still fork).
        c.get_many(&keys[..10]);
        assert_eq!(files(), 10);
        assert!(c.meta_writer.thread.lock().unwrap().is_none());
        // On: kept by the writer thread; readable from this process at once either way.
        c.cache_writes_in_background(true);
        let got = c.get_many(&keys);
        for (i, (k, g)) in keys.iter().zip(&got).enumerate() {
            assert_eq!(g.as_ref().unwrap(), &pattern(300, i as u32 + 1), "{k}");
        }
        let before = counting.gets.load(Relaxed);
        for k in &keys {
            c.get(k).unwrap();
        }
        assert_eq!(
            counting.gets.load(Relaxed),
            before,
            "queued entries were fetched again"
        );
        // Off again: every queued entry is written before it returns, and the thread is gone.
        c.cache_writes_in_background(false);
        assert_eq!(files(), keys.len());
        assert!(c.meta_writer.thread.lock().unwrap().is_none());
        assert!(c.meta_writer.pending.lock().unwrap().is_empty());
        // A new cache on the same directory finds them all.
        let c2 = CachedStore::open(counting.clone(), &t.path().join("cache"), 1 << 20).unwrap();
        let before = counting.gets.load(Relaxed);
        c2.get_many(&keys);
        assert_eq!(counting.gets.load(Relaxed), before);
    }

    fn setup(limit: u64) -> (tempfile::TempDir, Arc<Counting>, CachedStore) {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("store")).unwrap();
        let counting = Arc::new(Counting {
            inner: LocalStore::new(t.path().join("store")),
            gets: AtomicU64::new(0),
            ranges: AtomicU64::new(0),
        });
        let c = CachedStore::open(counting.clone(), &t.path().join("cache"), limit).unwrap();
        (t, counting, c)
    }

    fn pattern(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(seed) ^ (i >> 7)) as u8)
            .collect()
    }

    #[test]
    fn lru_evicts_least_recently_used_first() {
        let mut l = RangeLru::default();
        let c = rid("packs/00/a", 0, 100).cost();
        assert!(l.insert(rid("packs/00/a", 0, 100), 3 * c).is_empty());
        assert!(l.insert(rid("packs/00/a", 100, 100), 3 * c).is_empty());
        assert!(l.insert(rid("packs/00/b", 0, 100), 3 * c).is_empty());
        // Using the first makes the second the oldest.
        assert_eq!(
            l.find("packs/00/a", 10, 50),
            Some(rid("packs/00/a", 0, 100))
        );
        let gone = l.insert(rid("packs/00/c", 0, 100), 3 * c);
        assert_eq!(gone, [rid("packs/00/a", 100, 100)]);
        assert_eq!(l.total(), 3 * c);
        assert_eq!(l.len(), 3);
        assert_eq!(l.find("packs/00/a", 150, 10), None);
        // A range larger than the budget evicts everything, itself included.
        let big = rid("packs/00/d", 0, 10 * 100);
        let gone = l.insert(big.clone(), 3 * c);
        assert_eq!(gone.len(), 4);
        assert_eq!(gone.last(), Some(&big));
        assert!(l.is_empty());
        assert_eq!(l.total(), 0);
        assert!(l.packs().is_empty());
    }

    #[test]
    fn lru_finds_only_ranges_that_hold_the_whole_request() {
        let mut l = RangeLru::default();
        l.insert(rid("packs/00/a", 1000, 500), u64::MAX);
        l.insert(rid("packs/00/a", 1200, 1000), u64::MAX);
        for (off, len, want) in [
            (1000, 500, Some((1000, 500))),
            (1100, 100, Some((1000, 500))),
            (1300, 900, Some((1200, 1000))),
            (1400, 100, Some((1200, 1000))),
            (999, 10, None),
            (1300, 901, None),
            (2199, 1, Some((1200, 1000))),
            (2200, 1, None),
            (u64::MAX, 2, None),
        ] {
            assert_eq!(
                l.find("packs/00/a", off, len).map(|r| (r.offset, r.len)),
                want,
                "{off}+{len}"
            );
        }
        assert_eq!(l.find("packs/00/b", 1000, 1), None);
        l.remove(&rid("packs/00/a", 1200, 1000));
        assert_eq!(l.find("packs/00/a", 1600, 10), None);
        assert_eq!(l.of_pack("packs/00/a"), [rid("packs/00/a", 1000, 500)]);
    }

    #[test]
    fn range_file_names_round_trip_and_others_are_ignored() {
        let id = rid("packs/3f/3f9a00", 12345, 65536);
        assert_eq!(id.file_name(), "packs_3f_3f9a00.12345.65536");
        assert_eq!(RangeId::parse(&id.file_name()), Some(id));
        for bad in [
            "packs_3f_x.1",
            "packs_3f_x.a.1",
            "other_3f_x.1.2",
            "packs_.1.2",
            "packs_3f_x.01.2",
            ".packs_3f_x.1.2.0123.tmp",
            "packs_3f_x.1.2.3",
        ] {
            assert_eq!(RangeId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size(" 64 kb "), Ok(64 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in [
            "",
            "G",
            "1.5G",
            "-1",
            "1X",
            "99999999999999999999",
            "20000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_files_detect_every_damage() {
        let body = pattern(1000, 7);
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x");
        write_entry(&p, "points/a.1", &body).unwrap();
        let bytes = fs::read(&p).unwrap();
        assert_eq!(open_entry("points/a.1", &bytes), Ok(&body[..]));
        // Under another name, cut at any length, or with any byte flipped: refused.
        assert!(open_entry("points/b.1", &bytes).is_err());
        for n in 0..bytes.len() {
            assert!(open_entry("points/a.1", &bytes[..n]).is_err(), "cut at {n}");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(open_entry("points/a.1", &b).is_err(), "flip at {i}");
        }
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn metadata_is_fetched_once_and_dropped_when_no_longer_listed() {
        let (t, counting, c) = setup(1 << 20);
        c.put("points/a.1", b"manifest a").unwrap();
        counting.inner.put("points/b.1", b"manifest b").unwrap();
        // Written through: no fetch for a.
        assert_eq!(c.get("points/a.1").unwrap(), b"manifest a");
        assert_eq!(c.get("points/b.1").unwrap(), b"manifest b");
        assert_eq!(c.get("points/b.1").unwrap(), b"manifest b");
        assert_eq!(counting.gets.load(Relaxed), 1);
        let many = c.get_many(&[
            "points/a.1".into(),
            "points/b.1".into(),
            "points/c.1".into(),
        ]);
        assert_eq!(many[0].as_ref().unwrap(), b"manifest a");
        assert_eq!(many[1].as_ref().unwrap(), b"manifest b");
        assert_eq!(
            many[2].as_ref().unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(counting.gets.load(Relaxed), 2);
        // Deleted by another process: the next list drops the copy.
        counting.inner.delete("points/b.1").unwrap();
        let cached = t.path().join("cache/meta/points/b.1");
        assert!(cached.exists());
        assert_eq!(c.list("points/").unwrap().len(), 1);
        assert!(!cached.exists());
        assert!(t.path().join("cache/meta/points/a.1").exists());
        // Headers and chunk index objects pass through.
        counting.inner.put("cbtfs.repo", b"h").unwrap();
        c.get("cbtfs.repo").unwrap();
        c.get("cbtfs.repo").unwrap();
        assert_eq!(counting.gets.load(Relaxed), 4);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&t.path().join("cache/meta/points")), 0o700);
        assert_eq!(mode(&t.path().join("cache/meta/points/a.1")), 0o600);
    }

    #[test]
    fn a_damaged_metadata_copy_is_fetched_again() {
        let (t, counting, c) = setup(1 << 20);
        counting.inner.put("pindex/0a", &pattern(5000, 3)).unwrap();
        assert_eq!(c.get("pindex/0a").unwrap(), pattern(5000, 3));
        let f = t.path().join("cache/meta/pindex/0a");
        let len = fs::metadata(&f).unwrap().len();
        // Torn by a killed process: shorter than its header says.
        OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        assert_eq!(c.get("pindex/0a").unwrap(), pattern(5000, 3));
        assert_eq!(counting.gets.load(Relaxed), 2);
        assert_eq!(c.stats().damaged.load(Relaxed), 1);
        // Whole again: served from the cache.
        assert_eq!(c.get("pindex/0a").unwrap(), pattern(5000, 3));
        assert_eq!(counting.gets.load(Relaxed), 2);
        // Dropped on request (a copy that did not open): fetched again.
        assert!(c.forget_cached("pindex/0a"));
        assert_eq!(c.get("pindex/0a").unwrap(), pattern(5000, 3));
        assert_eq!(counting.gets.load(Relaxed), 3);
    }

    #[test]
    fn pack_ranges_are_kept_within_the_budget_and_served_exactly() {
        let range = 10_000u64;
        let limit = 3 * (range + 48);
        let (t, counting, c) = setup(limit);
        let pack = pattern(100_000, 13);
        counting.inner.put("packs/00/p", &pack).unwrap();
        let mut buf = vec![0u8; range as usize];
        for i in 0..5u64 {
            c.get_range("packs/00/p", i * range, &mut buf).unwrap();
            assert!(buf == pack[(i * range) as usize..((i + 1) * range) as usize]);
        }
        assert_eq!(counting.ranges.load(Relaxed), 5);
        let files = fs::read_dir(t.path().join("cache/ranges")).unwrap().count();
        assert_eq!(files, 3);
        let bytes: u64 = fs::read_dir(t.path().join("cache/ranges"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(bytes <= limit, "{bytes} > {limit}");
        // The last three are held; a request inside one is served from it.
        let mut small = vec![0u8; 100];
        c.get_range("packs/00/p", 4 * range + 17, &mut small)
            .unwrap();
        assert!(small == pack[(4 * range + 17) as usize..(4 * range + 117) as usize]);
        assert_eq!(counting.ranges.load(Relaxed), 5);
        // The first was evicted.
        c.get_range("packs/00/p", 0, &mut buf).unwrap();
        assert_eq!(counting.ranges.load(Relaxed), 6);
        // A new process takes the directory over within its own budget.
        drop(c);
        let c2 =
            CachedStore::open(counting.clone(), &t.path().join("cache"), 2 * (range + 48)).unwrap();
        assert_eq!(c2.lru().len(), 2);
        assert_eq!(
            fs::read_dir(t.path().join("cache/ranges")).unwrap().count(),
            2
        );
    }

    #[test]
    fn a_damaged_range_is_fetched_again_and_deleted_packs_are_dropped() {
        let (t, counting, c) = setup(1 << 20);
        let pack = pattern(50_000, 5);
        counting.inner.put("packs/00/p", &pack).unwrap();
        let mut buf = vec![0u8; 20_000];
        c.get_range("packs/00/p", 1000, &mut buf).unwrap();
        let file = t.path().join("cache/ranges/packs_00_p.1000.20000");
        // Damaged in place (the length stays right).
        let mut bytes = fs::read(&file).unwrap();
        bytes[500] ^= 1;
        fs::write(&file, &bytes).unwrap();
        buf.fill(0);
        c.get_range("packs/00/p", 1000, &mut buf).unwrap();
        assert!(buf == pack[1000..21_000]);
        assert_eq!(counting.ranges.load(Relaxed), 2);
        assert_eq!(c.stats().damaged.load(Relaxed), 1);
        // Removed by another process: a miss, not an error.
        fs::remove_file(&file).unwrap();
        c.get_range("packs/00/p", 1000, &mut buf).unwrap();
        assert!(buf == pack[1000..21_000]);
        assert_eq!(counting.ranges.load(Relaxed), 3);
        // Past the end: the store's error, nothing cached.
        let e = c.get_range("packs/00/p", 40_000, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // A pack gc deleted elsewhere: the next listing drops its ranges.
        counting.inner.delete("packs/00/p").unwrap();
        c.list("packs/").unwrap();
        assert!(!file.exists());
        assert!(c.lru().is_empty());
    }
}
