//! The chunk index: which pack holds each chunk. The dedup lookup and the read path's map.
//!
//! Stored as immutable sealed objects `cindex/<32 hex id>`, each listing some packs' chunks
//! sorted by chunk id. A backup writes one per `FLUSH_ENTRIES` new chunks and one at its end;
//! `gc` merges them. Plain body (sealed with aad = `b"cindex" || object id`):
//!
//! ```text
//! "CBTFSCI" 0x02 | pack count P (u32 LE) | entry count N (u64 LE)
//! P × pack id (16)
//! N × { chunk id (32) | pack number (u32 LE, < P) | offset (u32 LE) | length (u32 LE) }  sorted by id
//! ```
//!
//! Lookups never load the whole index into the heap: each object is opened (authenticated) once
//! and its plain body written to a private cache file (`CacheDir`), which is memory-mapped and
//! binary-searched. Without a cache directory the plain body is kept in an anonymous mapping.
//! Memory therefore stays bounded by the page cache, not by the repository's size: at 2 TiB
//! (32 M chunks) the files are 1.4 GB on disk and only touched pages are resident.
//!
//! **Trust in the cache.** A cache file holds the plain body followed by its BLAKE3 hash. The
//! body was authenticated (opened with the master key) when the file was written, the file is
//! 0600 in a 0700 directory owned by the user, and it is only ever created whole (temporary
//! name, then rename), never written in place. Loading therefore checks the file's length
//! against its own header and its trailing hash (damage on disk, a file cut by a crash) and
//! re-checks the body's structure, but does not re-open the store's object: a user who can
//! write the cache directory can already read the master key from the same account. Issue 19
//! revisits this for object stores (where the cache may outlive or be shared differently).
//!
//! **Order of objects.** An id may be in several objects (gc writes its merged objects before
//! deleting the old ones; two backups may store the same chunk). Lookups search the objects
//! loaded last first, so an object that appeared through `refresh` wins over older ones; at
//! `load` every object is equally new and any of their locations is a valid one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use memmap2::Mmap;

use super::crypto::{ChunkId, Keys};
use super::error::{RepoError, Result};
use super::pack::{ChunkLocation, PackId, parse_hex16};
use super::store::Store;

pub const CINDEX_PREFIX: &str = "cindex/";
pub const ENTRY_LEN: usize = 44;
/// A writer flushes its new chunks into an index object after this many.
pub const FLUSH_ENTRIES: usize = 1 << 20;
/// The body's magic; its last byte is the format version.
pub const CINDEX_MAGIC: [u8; 8] = *b"CBTFSCI\x02";
/// Magic, pack count (u32), entry count (u64).
pub const CINDEX_HEAD_LEN: usize = 20;
/// Length of a pack id in the body's pack table.
const PACK_ID_LEN: usize = 16;
/// A cache file is the body followed by its BLAKE3 hash.
const CACHE_HASH_LEN: usize = 32;
/// Cache files' names start with this (the object key with '/' made '_').
const CACHE_FILE_PREFIX: &str = "cindex_";
/// Temporary cache files (an interrupted write leaves one; removed at load once this old).
const CACHE_TMP_PREFIX: &str = ".tmp-";
const CACHE_TMP_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Where plain copies of index objects are kept: `$CBTFS_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/cbtfs`, else `$HOME/.cache/cbtfs`, then `/<repository id>/cindex/`.
/// Files are 0600 in 0700 directories; a file whose length or trailing BLAKE3 does not match is
/// rebuilt from the store, never trusted.
#[derive(Debug, Clone)]
pub struct CacheDir(pub Option<PathBuf>);

impl CacheDir {
    /// The default for repository `repo_id` (None when no directory can be made: in memory).
    pub fn default_for(repo_id: &str) -> CacheDir {
        match cache_base() {
            Some(base) => CacheDir(cache_dir_under(&base, repo_id)),
            None => {
                tracing::info!(
                    "no cache directory ($CBTFS_CACHE_DIR, $XDG_CACHE_HOME and $HOME unset): the chunk index is kept in memory"
                );
                CacheDir(None)
            }
        }
    }
}

/// The base directory of every repository's caches: `--cache-dir` (`store::cache::options`),
/// else `$CBTFS_CACHE_DIR`, `$XDG_CACHE_HOME/cbtfs`, `$HOME/.cache/cbtfs`.
pub fn cache_base() -> Option<PathBuf> {
    super::store::cache::options()
        .dir
        .map(|d| std::path::absolute(&d).unwrap_or(d))
        .or_else(|| env_dir("CBTFS_CACHE_DIR"))
        .or_else(|| env_dir("XDG_CACHE_HOME").map(|d| d.join("cbtfs")))
        .or_else(|| env_dir("HOME").map(|d| d.join(".cache").join("cbtfs")))
}

/// `BASE/<repo_id>/<sub>` (see `cache_base`), made 0700 and checked to be ours; None (with a
/// warning) when there is no base or it cannot be used.
pub fn repo_cache_dir(repo_id: &str, sub: &str) -> Option<PathBuf> {
    let Some(base) = cache_base() else {
        tracing::info!(
            "no cache directory (--cache-dir, $CBTFS_CACHE_DIR, $XDG_CACHE_HOME and $HOME unset)"
        );
        return None;
    };
    let dir = cache_dir_under(&base, repo_id)?.parent()?.join(sub);
    match make_private_dir(&dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            tracing::warn!("cannot use {} as a cache ({e})", dir.display());
            None
        }
    }
}

/// An environment variable naming an absolute directory (empty or relative values are ignored,
/// as the XDG specification says).
fn env_dir(name: &str) -> Option<PathBuf> {
    let v = std::env::var_os(name)?;
    let p = PathBuf::from(v);
    p.is_absolute().then_some(p)
}

/// `base/<repo_id>/cindex`, made 0700 and checked to be ours; None (with a warning) otherwise.
fn cache_dir_under(base: &Path, repo_id: &str) -> Option<PathBuf> {
    let safe = !repo_id.is_empty()
        && repo_id.len() <= 128
        && repo_id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        && !repo_id.starts_with('-');
    if !safe {
        tracing::warn!(
            repo_id,
            "the repository id is not a plain name: the chunk index is kept in memory"
        );
        return None;
    }
    let dir = base.join(repo_id).join("cindex");
    match make_private_dir(&base.join(repo_id)).and_then(|()| make_private_dir(&dir)) {
        Ok(()) => Some(dir),
        Err(e) => {
            tracing::warn!(
                "cannot use {} as the chunk index cache ({e}): the index is kept in memory",
                dir.display()
            );
            None
        }
    }
}

/// Make `dir` (and missing parents) and check that it is a directory of this user, closed to
/// others (made 0700 if it was not). Only `dir` itself is checked and changed, never a parent
/// (which may be a shared directory such as `/tmp`).
fn make_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(super::store::DIR_MODE)
        .create(dir)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let m = fs::symlink_metadata(dir)?;
    if !m.is_dir() || m.uid() != me {
        return Err(io::Error::other(format!(
            "{} is not a directory owned by uid {me}",
            dir.display()
        )));
    }
    if m.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(super::store::DIR_MODE))?;
    }
    Ok(())
}

/// A checked chunk index body (see the module doc), borrowed: lookups over its bytes without
/// copying them.
#[derive(Debug, Clone, Copy)]
pub struct CindexBody<'a> {
    bytes: &'a [u8],
    packs: u32,
    entries: usize,
}

/// Parse and check a chunk index object's plain body: magic and version, counts that its length
/// holds exactly (checked before anything is allocated or indexed), every pack number below the
/// pack count, ids strictly increasing, no `offset + length` past 4 GiB, no empty record. Pure:
/// the fuzz target calls it on any bytes. The error says what is wrong.
pub fn parse_cindex_body(plain: &[u8]) -> std::result::Result<CindexBody<'_>, String> {
    let Some((head, _)) = plain.split_first_chunk::<CINDEX_HEAD_LEN>() else {
        return Err(format!(
            "it is {} bytes, shorter than a chunk index header",
            plain.len()
        ));
    };
    if head[..7] != CINDEX_MAGIC[..7] {
        return Err("it does not start with the chunk index magic \"CBTFSCI\"".into());
    }
    if head[7] != CINDEX_MAGIC[7] {
        return Err(format!(
            "it is chunk index format version {}, this cbtfs reads version {}; upgrade cbtfs",
            head[7], CINDEX_MAGIC[7]
        ));
    }
    let packs = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let mut n = [0u8; 8];
    n.copy_from_slice(&head[12..20]);
    let n = u64::from_le_bytes(n);
    // u128: no product or sum of a u32 and a u64 count can overflow it.
    let expected = CINDEX_HEAD_LEN as u128
        + u128::from(packs) * PACK_ID_LEN as u128
        + u128::from(n) * ENTRY_LEN as u128;
    if expected != plain.len() as u128 {
        return Err(format!(
            "it claims {packs} packs and {n} entries ({expected} bytes) but is {} bytes",
            plain.len()
        ));
    }
    // n × 44 ≤ plain.len(), so n fits in usize.
    let body = CindexBody {
        bytes: plain,
        packs,
        entries: n as usize,
    };
    let mut prev: Option<&[u8]> = None;
    for (i, e) in body.entry_bytes().chunks_exact(ENTRY_LEN).enumerate() {
        let (id, rest) = e.split_at(32);
        if let Some(p) = prev
            && p >= id
        {
            return Err(format!(
                "its entry {i} is not after the one before it (entries must be sorted by id, without repeats)"
            ));
        }
        prev = Some(id);
        let [pn, off, len] = [0, 4, 8].map(|at| u32_at(rest, at));
        if pn >= packs {
            return Err(format!(
                "its entry {i} names pack number {pn}, but it lists {packs} packs"
            ));
        }
        if off.checked_add(len).is_none() {
            return Err(format!(
                "its entry {i} (offset {off}, length {len}) ends past 4 GiB"
            ));
        }
        if len == 0 {
            return Err(format!("its entry {i} has an empty record"));
        }
    }
    Ok(body)
}

/// The first 8 bytes of an id, big-endian: ordered as the ids are.
fn id_prefix(id: &[u8]) -> u64 {
    id.get(..8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_be_bytes)
}

/// The u32 LE at `at` of `b` (0 if out of range; callers index checked lengths).
fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_le_bytes)
}

impl<'a> CindexBody<'a> {
    fn entries_at(&self) -> usize {
        CINDEX_HEAD_LEN + self.packs as usize * PACK_ID_LEN
    }
    fn entry_bytes(&self) -> &'a [u8] {
        self.bytes.get(self.entries_at()..).unwrap_or(&[])
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries
    }
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
    /// Number of packs in its pack table.
    pub fn pack_count(&self) -> u32 {
        self.packs
    }
    fn id_at(&self, i: usize) -> Option<&'a [u8]> {
        let at = self.entries_at().checked_add(i.checked_mul(ENTRY_LEN)?)?;
        self.bytes.get(at..at.checked_add(32)?)
    }
    /// Entry `i` (in id order).
    pub fn entry(&self, i: usize) -> Option<(ChunkId, ChunkLocation)> {
        let at = self.entries_at().checked_add(i.checked_mul(ENTRY_LEN)?)?;
        let e = self.bytes.get(at..at.checked_add(ENTRY_LEN)?)?;
        let id: [u8; 32] = e.get(..32)?.try_into().ok()?;
        let [pn, offset, len] = [32, 36, 40].map(|o| u32_at(e, o));
        let p = CINDEX_HEAD_LEN.checked_add((pn as usize).checked_mul(PACK_ID_LEN)?)?;
        let pack: [u8; 16] = self
            .bytes
            .get(p..p.checked_add(PACK_ID_LEN)?)?
            .try_into()
            .ok()?;
        Some((
            ChunkId(id),
            ChunkLocation {
                pack: PackId(pack),
                offset,
                len,
            },
        ))
    }
    /// Pack `n` of its pack table.
    fn pack_id(&self, n: usize) -> Option<PackId> {
        let p = CINDEX_HEAD_LEN.checked_add(n.checked_mul(PACK_ID_LEN)?)?;
        let pack: [u8; 16] = self
            .bytes
            .get(p..p.checked_add(PACK_ID_LEN)?)?
            .try_into()
            .ok()?;
        Some(PackId(pack))
    }
    /// The smallest and largest ids (None when empty).
    pub fn range(&self) -> Option<(ChunkId, ChunkId)> {
        let last = self.entries.checked_sub(1)?;
        let lo: [u8; 32] = self.id_at(0)?.try_into().ok()?;
        let hi: [u8; 32] = self.id_at(last)?.try_into().ok()?;
        Some((ChunkId(lo), ChunkId(hi)))
    }
    /// Binary search for `id`.
    pub fn find(&self, id: &ChunkId) -> Option<ChunkLocation> {
        self.find_in(id, 0, self.entries)
    }
    /// Binary search for `id` among entries `lo..hi` (which must hold it if the body does).
    fn find_in(&self, id: &ChunkId, lo: usize, hi: usize) -> Option<ChunkLocation> {
        let (mut lo, mut hi) = (lo, hi.min(self.entries));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.id_at(mid)?.cmp(&id.0[..]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return self.entry(mid).map(|(_, l)| l),
            }
        }
        None
    }
}

/// Encode a body from entries sorted by id without repeats (`write_index` sorts and dedups
/// first; gc's merge produces them in order). Each pack appears once in the pack table.
///
/// # Panics
/// If the entries name more than 2^32 packs (impossible below 2^32 entries).
pub fn encode_cindex_body(entries: &[(ChunkId, ChunkLocation)]) -> Vec<u8> {
    debug_assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
    let mut numbers: HashMap<PackId, u32> = HashMap::new();
    let mut packs: Vec<PackId> = Vec::new();
    let mut nums = Vec::with_capacity(entries.len());
    for (_, loc) in entries {
        let n = *numbers.entry(loc.pack).or_insert_with(|| {
            packs.push(loc.pack);
            u32::try_from(packs.len() - 1).expect("fewer than 2^32 packs in one index object")
        });
        nums.push(n);
    }
    let mut b =
        Vec::with_capacity(CINDEX_HEAD_LEN + packs.len() * PACK_ID_LEN + entries.len() * ENTRY_LEN);
    b.extend_from_slice(&CINDEX_MAGIC);
    b.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for p in &packs {
        b.extend_from_slice(&p.0);
    }
    for ((id, loc), n) in entries.iter().zip(nums) {
        b.extend_from_slice(&id.0);
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&loc.offset.to_le_bytes());
        b.extend_from_slice(&loc.len.to_le_bytes());
    }
    b
}

/// The aad of an index object: `b"cindex" || its 32 hex digits`.
fn cindex_aad(hex: &str) -> Vec<u8> {
    let mut aad = b"cindex".to_vec();
    aad.extend_from_slice(hex.as_bytes());
    aad
}

/// The 32 hex digits of a `cindex/<32 hex>` key (None for any other key).
fn object_hex(key: &str) -> Option<&str> {
    let hex = key.strip_prefix(CINDEX_PREFIX)?;
    parse_hex16(hex).map(|_| hex)
}

/// Entries per fence post. Each object keeps the first 8 bytes of every `FENCE_EVERY`-th id
/// in memory (0.125 B per entry: 4 MiB at 2 TiB of distinct blocks); a lookup finds the one
/// group of entries that can hold its id there and reads only that group (2,816 bytes), with
/// `pread` from a cache file. So lookups cost one small read per object, and leave no page of
/// the cache files mapped into the process: the files stay in the page cache (shared,
/// reclaimable), out of the process's resident set, where binary search over the mappings
/// touched every page in time (70 MiB at 1.6 M chunks, 1.4 GiB at 32 M; issue 18).
const FENCE_EVERY: usize = 64;

/// Where an object's plain body lives.
enum Backing {
    /// A cache file: body then its hash, mapped (structure checks, `for_each`), and the file
    /// (lookups read it with `pread`).
    Map(Mmap, fs::File),
    /// No cache directory (or it failed): the opened body itself.
    Heap(Vec<u8>),
}

/// One loaded index object.
struct Object {
    key: String,
    backing: Backing,
    body_len: usize,
    packs: u32,
    entries: usize,
    range: Option<(ChunkId, ChunkId)>,
    /// `id_prefix` of entries 0, `FENCE_EVERY`, 2 × `FENCE_EVERY`, ...
    fences: Vec<u64>,
    /// The pack table (16 B per pack: a few hundred per object).
    pack_ids: Vec<PackId>,
}

impl Object {
    fn new(key: String, backing: Backing, body_len: usize) -> std::result::Result<Object, String> {
        let bytes = match &backing {
            Backing::Map(m, _) => m.get(..body_len),
            Backing::Heap(v) => v.get(..body_len),
        }
        .ok_or("its body is shorter than recorded")?;
        let body = parse_cindex_body(bytes)?;
        let (packs, entries, range) = (body.packs, body.entries, body.range());
        let pack_ids = (0..packs as usize)
            .map(|n| body.pack_id(n))
            .collect::<Option<Vec<PackId>>>()
            .ok_or("its pack table is shorter than its pack count")?;
        let fences = (0..entries)
            .step_by(FENCE_EVERY)
            .map(|i| body.id_at(i).map_or(0, id_prefix))
            .collect();
        let o = Object {
            key,
            backing,
            body_len,
            packs,
            entries,
            range,
            fences,
            pack_ids,
        };
        o.release_pages();
        Ok(o)
    }
    /// Unmap the pages of a cache file this process touched (checking its hash and structure,
    /// `for_each`): they stay in the page cache, out of the resident set.
    fn release_pages(&self) {
        if let Backing::Map(m, _) = &self.backing {
            // SAFETY: MADV_DONTNEED on a read-only shared mapping of a file only drops the page
            // table entries; later accesses read the same bytes from the file again (no memory
            // is zeroed, as it would be for a private anonymous mapping). Nothing holds
            // references into it across this call that could observe a change: the bytes do
            // not change.
            let _ = unsafe { m.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }
    /// Find `id`: its group from the fences, then that group's entries (read with `pread` from
    /// a cache file).
    fn find(&self, id: &ChunkId) -> Option<ChunkLocation> {
        let p = id_prefix(&id.0);
        // Groups whose range can hold prefix p: from the last one starting below p (its tail
        // may hold p) to the last one starting at p.
        let first = self.fences.partition_point(|&f| f < p).saturating_sub(1);
        let end = self.fences.partition_point(|&f| f <= p);
        if end <= first {
            return None;
        }
        let (a, b) = (
            first.checked_mul(FENCE_EVERY)?,
            end.checked_mul(FENCE_EVERY)?.min(self.entries),
        );
        let body = self.body();
        let Backing::Map(_, file) = &self.backing else {
            return body.find_in(id, a, b);
        };
        if b - a > 2 * FENCE_EVERY {
            // Many ids sharing 8 leading bytes (never from keyed hashes): search the mapping.
            let found = body.find_in(id, a, b);
            self.release_pages();
            return found;
        }
        let mut buf = [0u8; 2 * FENCE_EVERY * ENTRY_LEN];
        let len = (b - a) * ENTRY_LEN;
        let at = body.entries_at().checked_add(a.checked_mul(ENTRY_LEN)?)?;
        let group = buf.get_mut(..len)?;
        use std::os::unix::fs::FileExt;
        if file.read_exact_at(group, at as u64).is_err() {
            let found = body.find_in(id, a, b);
            self.release_pages();
            return found;
        }
        let (mut lo, mut hi) = (0usize, b - a);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = group.get(mid * ENTRY_LEN..(mid + 1) * ENTRY_LEN)?;
            match e.get(..32)?.cmp(&id.0[..]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    // The pack table from memory: touching the mapping would map not only
                    // that page but the kernel's fault-around (64 KiB) of cached pages too.
                    let [pn, offset, len] = [32, 36, 40].map(|o| u32_at(e, o));
                    return Some(ChunkLocation {
                        pack: *self.pack_ids.get(pn as usize)?,
                        offset,
                        len,
                    });
                }
            }
        }
        None
    }
    /// The body, checked by `new`.
    fn body(&self) -> CindexBody<'_> {
        let bytes = match &self.backing {
            Backing::Map(m, _) => m.get(..self.body_len),
            Backing::Heap(v) => v.get(..self.body_len),
        };
        CindexBody {
            bytes: bytes.unwrap_or(&[]),
            packs: self.packs,
            entries: self.entries,
        }
    }
    fn may_hold(&self, id: &ChunkId) -> bool {
        self.range.is_some_and(|(lo, hi)| lo <= *id && *id <= hi)
    }
}

/// Why an object is not loaded.
struct Failure {
    why: String,
    /// An I/O error: try again at the next refresh (damage is not retried: objects are
    /// immutable).
    retry: bool,
}

#[derive(Default)]
struct State {
    /// In load order: lookups search from the end (newest first).
    objects: Vec<Arc<Object>>,
    failed: BTreeMap<String, Failure>,
    /// A local file merging some of `objects` (see `MERGE_AT`), when there is one.
    merged: Option<Arc<Merged>>,
    /// What a lookup searches, newest first: the objects `merged` does not hold, then it.
    search: Vec<Arc<Object>>,
}

impl State {
    /// Drop `merged` if an object it holds is gone, and recompute `search`.
    fn update_search(&mut self) {
        if let Some(m) = &self.merged
            && !m
                .members
                .iter()
                .all(|k| self.objects.iter().any(|o| o.key == *k))
        {
            self.merged = None;
        }
        let merged = self.merged.clone();
        let held = |o: &Object| merged.as_ref().is_some_and(|m| m.members.contains(&o.key));
        self.search = self
            .objects
            .iter()
            .rev()
            .filter(|o| !held(o))
            .cloned()
            .collect();
        if let Some(m) = merged {
            self.search.push(m.obj.clone());
        }
    }
    /// Objects not in `merged`, oldest first.
    fn unmerged(&self) -> Vec<Arc<Object>> {
        self.objects
            .iter()
            .filter(|o| {
                self.merged
                    .as_ref()
                    .is_none_or(|m| !m.members.contains(&o.key))
            })
            .cloned()
            .collect()
    }
}

/// Lookups search every index object (ids are keyed hashes: an object's id range is the whole
/// space), so their cost grows with the number of objects: a backup adds one per
/// `FLUSH_PENDING` new chunks, and only `gc` merges stored objects. So a process merges the
/// objects it has loaded into one local sorted file (unlinked at once: private to the process,
/// gone with it) once `MERGE_AT` objects are outside it holding at least a quarter as many
/// entries as it (or `MERGE_ALWAYS_AT` objects, whatever their size): a lookup searches at most
/// `MERGE_ALWAYS_AT` objects and the merged file, and each entry is rewritten a logarithmic
/// number of times. The merge reads its inputs with `pread` in small batches and writes through
/// a buffer: it maps nothing.
pub const MERGE_AT: usize = 4;
const MERGE_ALWAYS_AT: usize = 16;

/// Objects merged into one local file.
struct Merged {
    /// Keys of the objects it holds.
    members: BTreeSet<String>,
    obj: Arc<Object>,
}

/// Every chunk index object of a repository, mapped.
pub struct ChunkIndex {
    store: Arc<dyn Store>,
    keys: Arc<Keys>,
    cache: Option<PathBuf>,
    state: RwLock<State>,
    load_problems: Vec<(String, String)>,
}

impl std::fmt::Debug for ChunkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkIndex")
    }
}

impl ChunkIndex {
    /// Load every `cindex/` object (each authenticated; a damaged one is skipped and named in
    /// `problems`).
    pub fn load(store: Arc<dyn Store>, keys: Arc<Keys>, cache: &CacheDir) -> Result<ChunkIndex> {
        let cache = cache.0.as_ref().and_then(|d| match make_private_dir(d) {
            Ok(()) => Some(d.clone()),
            Err(e) => {
                tracing::warn!(
                    "cannot use {} as the chunk index cache ({e}): the index is kept in memory",
                    d.display()
                );
                None
            }
        });
        let mut idx = ChunkIndex {
            store,
            keys,
            cache,
            state: RwLock::new(State::default()),
            load_problems: Vec::new(),
        };
        let listed = idx.sync()?;
        if let Some(dir) = &idx.cache {
            prune_cache(dir, &listed);
        }
        idx.load_problems = idx.current_problems();
        Ok(idx)
    }
    /// Load objects that appeared since `load` (a writer's flush, a reader whose lookup failed,
    /// a rescan) and forget those that are gone; returns whether anything changed. Cheap when
    /// nothing did (one list). Interior mutability: readers share one `ChunkIndex`.
    pub fn refresh(&self) -> Result<bool> {
        let before: Vec<String> = self.objects();
        self.sync()?;
        Ok(self.objects() != before)
    }
    pub fn lookup(&self, id: &ChunkId) -> Option<ChunkLocation> {
        let st = self.read();
        st.search
            .iter()
            .filter(|o| o.may_hold(id))
            .find_map(|o| o.find(id))
    }
    /// How many sorted files a lookup searches at most (index objects outside the merged
    /// file, and it).
    pub fn searched_files(&self) -> usize {
        self.read().search.len()
    }
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lookup(id).is_some()
    }
    /// Index objects that could not be read or failed authentication: (location, why).
    /// Those found by `load`; `current_problems` includes later refreshes'.
    pub fn problems(&self) -> &[(String, String)] {
        &self.load_problems
    }
    /// Index objects that are not loaded now, after every refresh: (location, why).
    pub fn current_problems(&self) -> Vec<(String, String)> {
        self.read()
            .failed
            .iter()
            .map(|(k, f)| (self.store.describe(k), f.why.clone()))
            .collect()
    }
    /// Authenticate and parse every index object as it is stored now, bypassing the local
    /// cache: (location, why) for each that fails. For `verify`: a cache file is a copy checked
    /// when it was made, so damage done to the stored object since would otherwise go unseen
    /// here (and surface only on a machine without the cache).
    pub fn check_stored(&self) -> Result<Vec<(String, String)>> {
        let listed = self
            .store
            .list(CINDEX_PREFIX)
            .map_err(|e| RepoError::io("list", self.store.describe(CINDEX_PREFIX), e))?;
        let mut problems = Vec::new();
        for o in listed {
            let loc = self.store.describe(&o.key);
            let Some(hex) = object_hex(&o.key) else {
                problems.push((
                    loc,
                    format!(
                        "its name is not cindex/<32 lowercase hex digits>, as cbtfs names index objects; move it out of {CINDEX_PREFIX}"
                    ),
                ));
                continue;
            };
            let sealed = match self.store.get(&o.key) {
                Ok(b) => b,
                // Deleted since the listing (gc): not damage.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    problems.push((loc, format!("reading it failed: {e}")));
                    continue;
                }
            };
            let why = match self.keys.open(&cindex_aad(hex), &sealed) {
                Err(e) => Some(format!("it does not open: {e}")),
                Ok(plain) => parse_cindex_body(&plain).err(),
            };
            if let Some(why) = why {
                problems.push((loc, why));
            }
        }
        Ok(problems)
    }
    /// The keys of the loaded index objects.
    pub fn objects(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.read().objects.iter().map(|o| o.key.clone()).collect();
        keys.sort();
        keys
    }
    /// Every entry of every object, in id order per object (gc and verify walk them).
    pub fn for_each(&self, f: &mut dyn FnMut(&ChunkId, &ChunkLocation)) {
        // A snapshot: `f` may call `refresh` without deadlocking.
        let objects: Vec<Arc<Object>> = self.read().objects.clone();
        for o in &objects {
            let body = o.body();
            for i in 0..body.len() {
                if let Some((id, loc)) = body.entry(i) {
                    f(&id, &loc);
                }
            }
            o.release_pages();
        }
    }
    /// Number of entries over all objects (duplicates counted).
    pub fn len(&self) -> u64 {
        self.read().objects.iter().map(|o| o.entries as u64).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// List the objects, load new ones (without holding the lock while reading them), drop
    /// vanished ones. Returns the listed keys.
    fn sync(&self) -> Result<BTreeSet<String>> {
        let listed: BTreeSet<String> = self
            .store
            .list(CINDEX_PREFIX)
            .map_err(|e| RepoError::io("list", self.store.describe(CINDEX_PREFIX), e))?
            .into_iter()
            .map(|o| o.key)
            .collect();
        let todo: Vec<String> = {
            let st = self.read();
            let have: BTreeSet<&str> = st.objects.iter().map(|o| o.key.as_str()).collect();
            listed
                .iter()
                .filter(|k| !have.contains(k.as_str()) && st.failed.get(*k).is_none_or(|f| f.retry))
                .cloned()
                .collect()
        };
        let mut loaded = Vec::new();
        let mut failed = Vec::new();
        for key in todo {
            match self.load_object(&key) {
                Ok(Some(o)) => loaded.push(Arc::new(o)),
                // Deleted between the list and the read: as if not listed.
                Ok(None) => {}
                Err(f) => {
                    tracing::warn!(
                        "chunk index object {} skipped: {}",
                        self.store.describe(&key),
                        f.why
                    );
                    failed.push((key, f));
                }
            }
        }
        let mut st = self.write();
        st.objects.retain(|o| listed.contains(&o.key));
        st.failed.retain(|k, _| listed.contains(k));
        for o in loaded {
            st.failed.remove(&o.key);
            if !st.objects.iter().any(|x| x.key == o.key) {
                st.objects.push(o);
            }
        }
        for (k, f) in failed {
            if !st.objects.iter().any(|x| x.key == k) {
                st.failed.insert(k, f);
            }
        }
        st.update_search();
        drop(st);
        self.maybe_merge();
        Ok(listed)
    }

    /// Merge the loaded objects into a new local file when `MERGE_AT` says so (only with a
    /// cache directory; a failure is logged and lookups go on without it).
    fn maybe_merge(&self) {
        let Some(dir) = &self.cache else { return };
        let (inputs, members) = {
            let st = self.read();
            let unmerged = st.unmerged();
            let merged_entries = st.merged.as_ref().map_or(0, |m| m.obj.entries);
            let new_entries: usize = unmerged.iter().map(|o| o.entries).sum();
            let due = unmerged.len() >= MERGE_ALWAYS_AT
                || (unmerged.len() >= MERGE_AT && new_entries.saturating_mul(4) >= merged_entries);
            if !due {
                return;
            }
            let mut members: BTreeSet<String> = st
                .merged
                .as_ref()
                .map(|m| m.members.clone())
                .unwrap_or_default();
            members.extend(unmerged.iter().map(|o| o.key.clone()));
            // Oldest first: the merged file, then the objects in load order.
            let mut inputs: Vec<Arc<Object>> = st.merged.iter().map(|m| m.obj.clone()).collect();
            inputs.extend(unmerged);
            (inputs, members)
        };
        match merge_objects(dir, &inputs) {
            Ok(obj) => {
                let mut st = self.write();
                st.merged = Some(Arc::new(Merged {
                    members,
                    obj: Arc::new(obj),
                }));
                // An input gone meanwhile (a concurrent refresh) drops the new file again.
                st.update_search();
            }
            Err(e) => tracing::warn!(
                "cannot merge the chunk index into {} ({e}); lookups search each object",
                dir.display()
            ),
        }
    }

    /// One object: from its cache file when that is intact, else from the store (then cached).
    /// Ok(None) when it vanished from the store.
    fn load_object(&self, key: &str) -> std::result::Result<Option<Object>, Failure> {
        let damaged = |why: String| Failure { why, retry: false };
        let Some(hex) = object_hex(key) else {
            return Err(damaged(format!(
                "its name is not cindex/<32 lowercase hex digits>, as cbtfs names index objects; move it out of {CINDEX_PREFIX}"
            )));
        };
        let cache_file = self.cache.as_ref().map(|d| d.join(key.replace('/', "_")));
        if let Some(path) = &cache_file
            && let Some(o) = map_cache_file(key, path)
        {
            return Ok(Some(o));
        }
        let sealed = match self.store.get(key) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Failure {
                    why: format!("reading it failed: {e}"),
                    retry: true,
                });
            }
        };
        let plain = self
            .keys
            .open(&cindex_aad(hex), &sealed)
            .map_err(|e| damaged(format!("it does not open: {e}")))?;
        drop(sealed);
        parse_cindex_body(&plain).map_err(damaged)?;
        let body_len = plain.len();
        let backing = match cache_file.as_ref().map(|p| write_cache_file(p, &plain)) {
            Some(Ok((map, file))) => Backing::Map(map, file),
            Some(Err(e)) => {
                tracing::warn!(
                    "cannot write the chunk index cache file for {key} ({e}); kept in memory"
                );
                Backing::Heap(plain)
            }
            None => Backing::Heap(plain),
        };
        Object::new(key.to_string(), backing, body_len)
            .map(Some)
            .map_err(damaged)
    }
}

/// Map an intact cache file of object `key` (None, after removing it, if it is damaged).
fn map_cache_file(key: &str, path: &Path) -> Option<Object> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("cannot open {} ({e}); reading the store", path.display());
            return None;
        }
    };
    let len = f.metadata().ok()?.len();
    let body_len = usize::try_from(len).ok()?.checked_sub(CACHE_HASH_LEN);
    let why = match body_len {
        None => "shorter than a hash".to_string(),
        Some(body_len) => {
            // SAFETY: cache files are private (0600 in a 0700 directory of this user) and cbtfs
            // only ever creates them whole (temporary name, then rename); it never writes or
            // truncates one in place, so the mapped bytes do not change. Truncation by another
            // process of this user would raise SIGBUS, the accepted limit of mapping.
            match unsafe { Mmap::map(&f) } {
                Err(e) => format!("cannot be mapped: {e}"),
                Ok(map) => {
                    let ok = map
                        .get(..body_len)
                        .zip(map.get(body_len..))
                        .is_some_and(|(b, h)| blake3::hash(b).as_bytes()[..] == *h);
                    if !ok {
                        "its hash does not match its bytes".to_string()
                    } else {
                        match Object::new(key.to_string(), Backing::Map(map, f), body_len) {
                            Ok(o) => return Some(o),
                            Err(why) => why,
                        }
                    }
                }
            }
        }
    };
    tracing::warn!(
        "chunk index cache file {} is damaged ({why}); rebuilding it from the repository",
        path.display()
    );
    let _ = fs::remove_file(path);
    None
}

/// Write `body` + its hash as `path` (0600, temporary name then rename) and map it.
fn write_cache_file(path: &Path, body: &[u8]) -> io::Result<(Mmap, fs::File)> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("cache file without a directory"))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("cache file without a name"))?;
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(
        "{CACHE_TMP_PREFIX}{name}-{}",
        u64::from_le_bytes(r)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(super::store::FILE_MODE)
            .open(&tmp)?;
        f.write_all(body)?;
        f.write_all(blake3::hash(body).as_bytes())?;
        // SAFETY: as in `map_cache_file`; this file is complete and no longer written.
        let map = unsafe { Mmap::map(&f)? };
        fs::rename(&tmp, path)?;
        Ok((map, f))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads an object's entries in order, a batch at a time (`pread` from a cache file).
struct Cursor<'a> {
    obj: &'a Object,
    next: usize,
    buf: Vec<u8>,
    /// Entry number of `buf`'s first entry, and how many it holds.
    buf_first: usize,
    buf_n: usize,
}

/// Entries a cursor reads at once (44 KiB).
const CURSOR_BATCH: usize = 1024;

impl<'a> Cursor<'a> {
    fn new(obj: &'a Object) -> Cursor<'a> {
        Cursor {
            obj,
            next: 0,
            buf: Vec::new(),
            buf_first: 0,
            buf_n: 0,
        }
    }
    /// The current entry's bytes (None at the end).
    fn peek(&mut self) -> io::Result<Option<&[u8]>> {
        if self.next >= self.obj.entries {
            return Ok(None);
        }
        if self.next >= self.buf_first + self.buf_n || self.next < self.buf_first {
            let n = CURSOR_BATCH.min(self.obj.entries - self.next);
            let body = self.obj.body();
            let at = body.entries_at() + self.next * ENTRY_LEN;
            self.buf.resize(n * ENTRY_LEN, 0);
            match &self.obj.backing {
                Backing::Map(_, f) => {
                    use std::os::unix::fs::FileExt;
                    f.read_exact_at(&mut self.buf, at as u64)?;
                }
                Backing::Heap(v) => {
                    let src = v
                        .get(at..at + n * ENTRY_LEN)
                        .ok_or_else(|| io::Error::other("index body shorter than its count"))?;
                    self.buf.copy_from_slice(src);
                }
            }
            self.buf_first = self.next;
            self.buf_n = n;
        }
        let i = self.next - self.buf_first;
        Ok(self.buf.get(i * ENTRY_LEN..(i + 1) * ENTRY_LEN))
    }
}

/// Merge `inputs` (oldest first; an id in several keeps the newest's entry) into a new file in
/// `dir`, unlinked at once, and return it as an object (trusted: built here from checked
/// objects, so not parsed again, which would map every page).
fn merge_objects(dir: &Path, inputs: &[Arc<Object>]) -> io::Result<Object> {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| io::Error::other(e.to_string()))?;
    let path = dir.join(format!(
        "{CACHE_TMP_PREFIX}merged-{}",
        u64::from_le_bytes(r)
    ));
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(super::store::FILE_MODE)
        .open(&path)?;
    // Private to this process from now on (a crash before this line leaves a temporary file
    // that `prune_cache` removes).
    fs::remove_file(&path)?;
    // The pack table: every input's packs, in first use.
    let mut pack_ids: Vec<PackId> = Vec::new();
    let mut numbers: HashMap<PackId, u32> = HashMap::new();
    for o in inputs {
        for p in &o.pack_ids {
            if !numbers.contains_key(p) {
                let n = u32::try_from(pack_ids.len())
                    .map_err(|_| io::Error::other("more than 2^32 packs"))?;
                numbers.insert(*p, n);
                pack_ids.push(*p);
            }
        }
    }
    let mut w = io::BufWriter::with_capacity(1 << 20, &file);
    let mut head = Vec::with_capacity(CINDEX_HEAD_LEN);
    head.extend_from_slice(&CINDEX_MAGIC);
    head.extend_from_slice(&(pack_ids.len() as u32).to_le_bytes());
    head.extend_from_slice(&0u64.to_le_bytes());
    w.write_all(&head)?;
    for p in &pack_ids {
        w.write_all(&p.0)?;
    }
    let mut cursors: Vec<Cursor<'_>> = inputs.iter().map(|o| Cursor::new(o)).collect();
    let (mut count, mut fences, mut first, mut last) = (0usize, Vec::new(), None, None);
    loop {
        // The smallest id; among equal ones the newest input (the last).
        let mut best: Option<(usize, [u8; ENTRY_LEN])> = None;
        for (k, c) in cursors.iter_mut().enumerate() {
            let Some(e) = c.peek()? else { continue };
            let e: [u8; ENTRY_LEN] = e
                .try_into()
                .map_err(|_| io::Error::other("short index entry"))?;
            if best.as_ref().is_none_or(|(_, b)| e[..32] <= b[..32]) {
                best = Some((k, e));
            }
        }
        let Some((k, mut e)) = best else { break };
        // Skip this id in every input.
        for c in cursors.iter_mut() {
            if c.peek()?.is_some_and(|x| x[..32] == e[..32]) {
                c.next += 1;
            }
        }
        let pn = u32_at(&e, 32) as usize;
        let pack = inputs
            .get(k)
            .and_then(|o| o.pack_ids.get(pn))
            .and_then(|p| numbers.get(p))
            .ok_or_else(|| io::Error::other("index entry names a pack it does not list"))?;
        e[32..36].copy_from_slice(&pack.to_le_bytes());
        if count % FENCE_EVERY == 0 {
            fences.push(id_prefix(&e));
        }
        let id: [u8; 32] = e[..32].try_into().map_err(io::Error::other)?;
        if first.is_none() {
            first = Some(ChunkId(id));
        }
        last = Some(ChunkId(id));
        w.write_all(&e)?;
        count += 1;
    }
    w.flush()?;
    drop(w);
    use std::os::unix::fs::FileExt;
    file.write_all_at(&(count as u64).to_le_bytes(), 12)?;
    let body_len = CINDEX_HEAD_LEN + pack_ids.len() * PACK_ID_LEN + count * ENTRY_LEN;
    // SAFETY: the file is unlinked and only this function wrote it (it is complete now); no
    // other process can open it, so the mapped bytes do not change.
    let map = unsafe { Mmap::map(&file)? };
    Ok(Object {
        key: "(merged)".into(),
        backing: Backing::Map(map, file),
        body_len,
        packs: pack_ids.len() as u32,
        entries: count,
        range: first.zip(last),
        fences,
        pack_ids,
    })
}

/// Remove cache files of objects no longer listed, and old temporary files.
fn prune_cache(dir: &Path, listed: &BTreeSet<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = if let Some(hex) = name.strip_prefix(CACHE_FILE_PREFIX) {
            !listed.contains(&format!("{CINDEX_PREFIX}{hex}"))
        } else if name.starts_with(CACHE_TMP_PREFIX) {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > CACHE_TMP_MAX_AGE)
        } else {
            false
        };
        if stale {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Write index objects holding `entries` (any order; duplicates of an id keep the first);
/// returns their keys, none for no entries. Entries are sorted in memory: callers pass at most
/// `FLUSH_ENTRIES`-ish at a time; more are split into objects of at most `FLUSH_ENTRIES`.
pub fn write_index(
    store: &dyn Store,
    keys: &Keys,
    entries: Vec<(ChunkId, ChunkLocation)>,
) -> Result<Vec<String>> {
    let mut written = Vec::new();
    write_index_split(store, keys, entries, FLUSH_ENTRIES, &mut written)?;
    Ok(written)
}

/// `write_index`, adding each object's key to `written` before its put: a put that fails
/// may still have stored the object (an answer lost on the way back), and a writer that
/// cleans up after a failure must delete it too, or it would name packs that are deleted.
pub fn write_index_into(
    store: &dyn Store,
    keys: &Keys,
    entries: Vec<(ChunkId, ChunkLocation)>,
    written: &mut Vec<String>,
) -> Result<()> {
    write_index_split(store, keys, entries, FLUSH_ENTRIES, written)
}

fn write_index_split(
    store: &dyn Store,
    keys: &Keys,
    mut entries: Vec<(ChunkId, ChunkLocation)>,
    per_object: usize,
    written: &mut Vec<String>,
) -> Result<()> {
    entries.sort_by_key(|e| e.0);
    entries.dedup_by(|later, first| later.0 == first.0);
    for part in entries.chunks(per_object.max(1)) {
        let body = encode_cindex_body(part);
        let id = PackId::random().map_err(|e| RepoError::io("name", CINDEX_PREFIX, e))?;
        let hex = id.to_string();
        let key = format!("{CINDEX_PREFIX}{hex}");
        let sealed = keys.seal(&cindex_aad(&hex), &body);
        written.push(key.clone());
        store
            .put(&key, &sealed)
            .map_err(|e| RepoError::io("write", store.describe(&key), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::pack::tests::{MemStore, random_bytes};
    use std::sync::atomic::Ordering;

    fn random_id(first: std::ops::RangeInclusive<u8>) -> ChunkId {
        let mut b = [0u8; 32];
        b.copy_from_slice(&random_bytes(32));
        let span = u16::from(*first.end()) - u16::from(*first.start()) + 1;
        b[0] = first.start() + (u16::from(b[0]) % span) as u8;
        ChunkId(b)
    }

    fn entries(
        n: usize,
        first: std::ops::RangeInclusive<u8>,
        packs: &[PackId],
    ) -> Vec<(ChunkId, ChunkLocation)> {
        (0..n)
            .map(|i| {
                (
                    random_id(first.clone()),
                    ChunkLocation {
                        pack: packs[i % packs.len()],
                        offset: (i as u32) * 1000,
                        len: 100 + i as u32,
                    },
                )
            })
            .collect()
    }

    fn packs(n: usize) -> Vec<PackId> {
        (0..n).map(|_| PackId::random().unwrap()).collect()
    }

    struct Repo {
        store: Arc<MemStore>,
        keys: Arc<Keys>,
        _tmp: Option<tempfile::TempDir>,
        cache: CacheDir,
    }

    fn repo(encrypted: bool, cached: bool) -> Repo {
        let tmp = cached.then(|| tempfile::tempdir().unwrap());
        let cache = CacheDir(
            tmp.as_ref()
                .map(|t| t.path().join("repo-id").join("cindex")),
        );
        Repo {
            store: Arc::new(MemStore::default()),
            keys: Arc::new(Keys::generate(encrypted).unwrap()),
            _tmp: tmp,
            cache,
        }
    }

    impl Repo {
        fn load(&self) -> ChunkIndex {
            ChunkIndex::load(self.store.clone(), self.keys.clone(), &self.cache).unwrap()
        }
        fn write(&self, e: Vec<(ChunkId, ChunkLocation)>) -> String {
            let mut keys = write_index(&*self.store, &self.keys, e).unwrap();
            assert_eq!(keys.len(), 1);
            keys.remove(0)
        }
        fn gets(&self) -> usize {
            self.store.gets.load(Ordering::SeqCst)
        }
        fn put_body(&self, body: &[u8]) -> String {
            let hex = PackId::random().unwrap().to_string();
            let key = format!("{CINDEX_PREFIX}{hex}");
            let sealed = self.keys.seal(&cindex_aad(&hex), body);
            self.store.put(&key, &sealed).unwrap();
            key
        }
    }

    #[test]
    fn chunk_index_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChunkIndex>();
    }

    #[test]
    fn lookups_over_several_objects() {
        for (encrypted, cached) in [(true, true), (true, false), (false, true)] {
            let r = repo(encrypted, cached);
            let p = packs(3);
            let a = entries(500, 0..=0x7f, &p);
            let b = entries(300, 0..=0x7f, &p[1..]);
            let c = entries(200, 0x80..=0xff, &p[2..]);
            let mut keys = vec![r.write(a.clone()), r.write(b.clone()), r.write(c.clone())];
            keys.sort();
            let idx = r.load();
            assert!(idx.problems().is_empty(), "{:?}", idx.problems());
            assert_eq!(idx.objects(), keys);
            assert_eq!(idx.len(), 1000);
            for (id, loc) in a.iter().chain(&b).chain(&c) {
                assert_eq!(idx.lookup(id), Some(*loc), "{id}");
            }
            for _ in 0..1000 {
                let id = random_id(0..=0xff);
                assert_eq!(idx.lookup(&id), None);
                assert!(!idx.contains(&id));
            }
            // Ids inside an object's range but absent, and at its ends.
            let mut sorted_a: Vec<_> = a.iter().map(|(id, _)| *id).collect();
            sorted_a.sort();
            let mut between = sorted_a[10];
            between.0[31] = between.0[31].wrapping_add(1);
            if !sorted_a.contains(&between) {
                assert_eq!(idx.lookup(&between), None);
            }
            assert_eq!(ChunkId([0; 32]).cmp(&sorted_a[0]), std::cmp::Ordering::Less);
            assert_eq!(idx.lookup(&ChunkId([0; 32])), None);
            assert_eq!(idx.lookup(&ChunkId([0xff; 32])), None);
            // for_each: every entry once, each object in id order.
            let mut seen = Vec::new();
            idx.for_each(&mut |id, loc| seen.push((*id, *loc)));
            assert_eq!(seen.len(), 1000);
            let mut all: Vec<_> = a.iter().chain(&b).chain(&c).copied().collect();
            all.sort_by_key(|e| e.0);
            let mut seen_sorted = seen.clone();
            seen_sorted.sort_by_key(|e| e.0);
            assert_eq!(seen_sorted, all);
            let descents = seen.windows(2).filter(|w| w[0].0 > w[1].0).count();
            assert!(descents <= 2, "{descents}");
        }
    }

    /// Fenced lookups (issue 18): ids sharing their first 8 bytes across group boundaries, in
    /// runs longer than the two groups a `pread` covers, and absent ids between and around
    /// them, from a cache file and from memory; lookups leave the index's pages unmapped.
    #[test]
    fn fenced_lookups_find_every_id_and_only_those() {
        for cached in [true, false] {
            let r = repo(true, cached);
            let p = packs(3);
            let mut e = entries(1000, 0..=0xff, &p);
            // Runs of one 8-byte prefix: 70 (straddles a fence), 3 and 200 (> 2 groups).
            for (start, n, prefix) in [
                (100usize, 70usize, 0x40u8),
                (400, 3, 0x41),
                (500, 200, 0x42),
            ] {
                for (k, x) in e[start..start + n].iter_mut().enumerate() {
                    x.0.0[..8].copy_from_slice(&[prefix; 8]);
                    x.0.0[8..12].copy_from_slice(&(k as u32 * 2 + 1).to_be_bytes());
                }
            }
            r.write(e.clone());
            let idx = r.load();
            assert!(idx.problems().is_empty());
            for (id, loc) in &e {
                assert_eq!(idx.lookup(id), Some(*loc), "{id}");
            }
            // Absent: the same prefixes with even numbers (between present ids), below and
            // above every present one, and random ids.
            for prefix in [0x40u8, 0x41, 0x42, 0x00, 0xff] {
                for k in [0u32, 2, 4, 68, 140, 398, 400, 100_000] {
                    let mut id = [0u8; 32];
                    id[..8].copy_from_slice(&[prefix; 8]);
                    id[8..12].copy_from_slice(&k.to_be_bytes());
                    assert_eq!(idx.lookup(&ChunkId(id)), None, "{prefix} {k}");
                }
            }
            for _ in 0..2000 {
                let id = random_id(0..=0xff);
                assert_eq!(idx.lookup(&id), None);
            }
            let o = idx.read().objects[0].clone();
            assert_eq!(o.fences.len(), 1000usize.div_ceil(FENCE_EVERY));
            if let Backing::Map(m, _) = &o.backing {
                assert_eq!(resident_pages(m), 0, "lookups leave no page mapped");
                let mut n = 0;
                idx.for_each(&mut |_, _| n += 1);
                assert_eq!(n, 1000);
                assert_eq!(resident_pages(m), 0, "for_each releases its pages");
            } else {
                assert!(!cached);
            }
        }
    }

    /// The local merged file (issue 18): a lookup searches at most a few files however many
    /// objects there are, finds every id, prefers the newest object, and forgets objects that
    /// are gone; the merge leaves no file behind and maps no page.
    #[test]
    fn loaded_objects_are_merged_for_lookups() {
        let r = repo(true, true);
        let p = packs(5);
        let mut all = Vec::new();
        for k in 0..10 {
            let e = entries(50, 0..=0xff, &p[k % 3..]);
            r.write(e.clone());
            all.extend(e);
        }
        // One id in two objects, at two (equally valid) locations.
        let dup = all[3].0;
        let other = ChunkLocation {
            pack: p[4],
            offset: 77,
            len: 7,
        };
        r.write(vec![(dup, other)]);
        let idx = r.load();
        assert_eq!(idx.searched_files(), 1, "11 objects, one merged file");
        assert_eq!(idx.len(), 501);
        for (id, loc) in &all[4..] {
            assert_eq!(idx.lookup(id), Some(*loc), "{id}");
        }
        assert!([Some(all[3].1), Some(other)].contains(&idx.lookup(&dup)));
        for _ in 0..500 {
            assert_eq!(idx.lookup(&random_id(0..=0xff)), None);
        }
        let dir = r.cache.0.clone().unwrap();
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            11,
            "one cache file per object"
        );
        let merged = idx.read().merged.clone().unwrap();
        if let Backing::Map(m, _) = &merged.obj.backing {
            assert_eq!(resident_pages(m), 0);
        }
        // New objects: searched on their own, newest first, until enough for a merge.
        let newer = ChunkLocation {
            pack: p[0],
            offset: 5,
            len: 9,
        };
        r.write(vec![(all[10].0, newer)]);
        let more: Vec<_> = (0..2).map(|_| entries(60, 0..=0xff, &p)).collect();
        for e in &more {
            r.write(e.clone());
        }
        assert!(idx.refresh().unwrap());
        assert_eq!(idx.searched_files(), 4);
        assert_eq!(
            idx.lookup(&all[10].0),
            Some(newer),
            "the newest object wins"
        );
        for (id, loc) in more.iter().flatten() {
            assert_eq!(idx.lookup(id), Some(*loc));
        }
        let last = entries(60, 0..=0xff, &p);
        r.write(last.clone());
        assert!(idx.refresh().unwrap());
        assert_eq!(
            idx.searched_files(),
            1,
            "4 new objects, 181 entries (over a quarter of 501): merged again"
        );
        assert_eq!(idx.lookup(&all[10].0), Some(newer), "still the newest");
        assert_eq!(idx.lookup(&last[0].0), Some(last[0].1));
        // An object deleted (gc): the merged file holding it goes; its ids are not found.
        let gone = r.objects_key(0);
        let sealed = r.store.get(&gone).unwrap();
        let hex = object_hex(&gone).unwrap();
        let plain = r.keys.open(&cindex_aad(hex), &sealed).unwrap();
        let body = parse_cindex_body(&plain).unwrap();
        let gone_ids: Vec<ChunkId> = (0..body.len()).map(|i| body.entry(i).unwrap().0).collect();
        r.store.delete(&gone).unwrap();
        assert!(idx.refresh().unwrap());
        assert_eq!(idx.searched_files(), 1, "the rest merged anew");
        let mut still = BTreeSet::new();
        idx.for_each(&mut |id, _| {
            still.insert(*id);
        });
        for id in &gone_ids {
            if !still.contains(id) {
                assert_eq!(idx.lookup(id), None, "{id}");
            }
        }
        for (id, loc) in &last {
            assert_eq!(idx.lookup(id), Some(*loc));
        }
        // Without a cache directory nothing is merged.
        let mem = ChunkIndex::load(r.store.clone(), r.keys.clone(), &CacheDir(None)).unwrap();
        assert_eq!(mem.searched_files(), mem.objects().len());
        assert_eq!(mem.lookup(&last[0].0), Some(last[0].1));
    }

    /// Pages of `m` mapped into this process (mincore counts page-cache residency, so this
    /// reads /proc/self/smaps' Rss line of the mapping instead).
    fn resident_pages(m: &Mmap) -> usize {
        let start = m.as_ptr() as usize;
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, _)) = range.split_once('-')
                && let Ok(lo) = usize::from_str_radix(lo, 16)
            {
                inside = lo == start;
                continue;
            }
            if inside && let Some(kb) = line.strip_prefix("Rss:") {
                let kb: usize = kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                return kb / 4;
            }
        }
        panic!("mapping at {start:#x} not in /proc/self/smaps");
    }

    #[test]
    fn duplicates_keep_the_first_and_the_newest_object_wins() {
        let r = repo(true, true);
        let p = packs(2);
        let id = random_id(0..=0xff);
        let l1 = ChunkLocation {
            pack: p[0],
            offset: 1,
            len: 10,
        };
        let l2 = ChunkLocation {
            pack: p[1],
            offset: 2,
            len: 20,
        };
        let mut e = entries(50, 0..=0xff, &p);
        e.insert(7, (id, l1));
        e.push((id, l2));
        r.write(e);
        let idx = r.load();
        assert_eq!(idx.len(), 51);
        assert_eq!(idx.lookup(&id), Some(l1));
        // A later object holding the same id: found after refresh, and preferred.
        r.write(vec![(id, l2)]);
        assert!(idx.refresh().unwrap());
        assert_eq!(idx.len(), 52);
        assert_eq!(idx.lookup(&id), Some(l2));
        let mut count = 0;
        idx.for_each(&mut |i, _| count += usize::from(*i == id));
        assert_eq!(count, 2);
    }

    #[test]
    fn refresh_adds_and_forgets_objects() {
        let r = repo(true, true);
        let p = packs(1);
        let a = entries(20, 0..=0xff, &p);
        let b = entries(20, 0..=0xff, &p);
        let ka = r.write(a.clone());
        let idx = r.load();
        assert!(!idx.refresh().unwrap());
        let kb = r.write(b.clone());
        assert_eq!(idx.lookup(&b[0].0), None);
        assert!(idx.refresh().unwrap());
        assert_eq!(idx.lookup(&b[0].0), Some(b[0].1));
        assert_eq!(idx.objects().len(), 2);
        let gets = r.gets();
        assert!(!idx.refresh().unwrap());
        assert_eq!(r.gets(), gets, "an unchanged refresh reads nothing");
        r.store.delete(&ka).unwrap();
        assert!(idx.refresh().unwrap());
        assert_eq!(idx.objects(), vec![kb]);
        assert_eq!(idx.lookup(&a[0].0), None);
        assert_eq!(idx.lookup(&b[5].0), Some(b[5].1));
        assert_eq!(idx.len(), 20);
        // The deleted object's cache file goes at the next load.
        let dir = r.cache.0.clone().unwrap();
        assert!(dir.join(ka.replace('/', "_")).exists());
        drop(idx);
        let _ = r.load();
        assert!(!dir.join(ka.replace('/', "_")).exists());
    }

    #[test]
    fn cache_is_used_and_damaged_cache_files_are_rebuilt() {
        let r = repo(true, true);
        let p = packs(2);
        let a = entries(100, 0..=0xff, &p);
        let b = entries(100, 0..=0xff, &p);
        let ka = r.write(a.clone());
        r.write(b.clone());
        let before = r.gets();
        let idx = r.load();
        assert_eq!(r.gets(), before + 2);
        drop(idx);
        // Intact cache files: no object is read from the store.
        let idx = r.load();
        assert_eq!(r.gets(), before + 2);
        assert_eq!(idx.lookup(&a[3].0), Some(a[3].1));
        drop(idx);
        let dir = r.cache.0.clone().unwrap();
        let file = dir.join(ka.replace('/', "_"));
        let good = fs::read(&file).unwrap();
        assert_eq!(fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let damages: Vec<Vec<u8>> = vec![
            {
                let mut d = good.clone();
                d[CINDEX_HEAD_LEN + 40] ^= 4;
                d
            },
            {
                let mut d = good.clone();
                let n = d.len();
                d[n - 1] ^= 1;
                d
            },
            good[..good.len() - 1].to_vec(),
            good[..10].to_vec(),
            Vec::new(),
        ];
        for (i, d) in damages.into_iter().enumerate() {
            fs::write(&file, d).unwrap();
            let gets = r.gets();
            let idx = r.load();
            assert_eq!(r.gets(), gets + 1, "damage {i}: rebuilt from the store");
            assert!(idx.problems().is_empty());
            for (id, loc) in &a {
                assert_eq!(idx.lookup(id), Some(*loc), "damage {i}");
            }
            assert_eq!(fs::read(&file).unwrap(), good, "damage {i}: file rewritten");
        }
        // A cache file that hashes right but is not a valid body (not something cbtfs writes,
        // but never trusted past its structure).
        let mut bad = good[..good.len() - 32].to_vec();
        bad[0] = b'X';
        let h = blake3::hash(&bad);
        bad.extend_from_slice(h.as_bytes());
        fs::write(&file, bad).unwrap();
        let idx = r.load();
        assert_eq!(idx.lookup(&a[0].0), Some(a[0].1));
        assert_eq!(fs::read(&file).unwrap(), good);
    }

    #[test]
    fn damaged_objects_are_problems() {
        let r = repo(true, false);
        let p = packs(1);
        let a = entries(30, 0..=0xff, &p);
        let b = entries(30, 0..=0xff, &p);
        let ka = r.write(a.clone());
        r.write(b.clone());
        r.store.objects().get_mut(&ka).unwrap()[60] ^= 0x10;
        let odd = format!("{CINDEX_PREFIX}NOT-HEX");
        r.store.put(&odd, b"whatever").unwrap();
        let idx = r.load();
        assert_eq!(idx.problems().len(), 2, "{:?}", idx.problems());
        let why_of = |key: &str| {
            idx.problems()
                .iter()
                .find(|(l, _)| *l == format!("mem:{key}"))
                .map(|(_, w)| w.clone())
                .unwrap()
        };
        assert!(why_of(&ka).contains("does not open"), "{}", why_of(&ka));
        assert!(why_of(&odd).contains("32 lowercase hex"));
        assert_eq!(idx.lookup(&a[0].0), None);
        assert_eq!(idx.lookup(&b[0].0), Some(b[0].1));
        assert_eq!(idx.len(), 30);
        // Damage is not retried at every refresh (objects are immutable).
        let gets = r.gets();
        assert!(!idx.refresh().unwrap());
        assert_eq!(r.gets(), gets);
        assert_eq!(idx.current_problems().len(), 2);
        // Once removed, it is no longer a problem.
        r.store.delete(&ka).unwrap();
        assert!(!idx.refresh().unwrap());
        assert_eq!(idx.current_problems().len(), 1);
        // An object sealed under another name does not open either.
        let sealed = r.store.get(&r.objects_key(0)).unwrap();
        let moved = format!("{CINDEX_PREFIX}{}", PackId::random().unwrap());
        r.store.put(&moved, &sealed).unwrap();
        idx.refresh().unwrap();
        assert!(
            idx.current_problems()
                .iter()
                .any(|(l, w)| l.ends_with(&moved) && w.contains("does not open"))
        );
    }

    impl Repo {
        fn objects_key(&self, i: usize) -> String {
            self.store
                .list(CINDEX_PREFIX)
                .unwrap()
                .into_iter()
                .filter(|o| object_hex(&o.key).is_some())
                .nth(i)
                .unwrap()
                .key
        }
    }

    fn head(magic: &[u8; 8], packs: u32, n: u64) -> Vec<u8> {
        let mut b = magic.to_vec();
        b.extend_from_slice(&packs.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b
    }

    fn entry(b: &mut Vec<u8>, id: u8, pack: u32, offset: u32, len: u32) {
        b.extend_from_slice(&[id; 32]);
        for v in [pack, offset, len] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Bodies that must be refused, with a word of the expected reason.
    fn hostile_bodies() -> Vec<(Vec<u8>, &'static str)> {
        let one_pack = |n| {
            let mut b = head(&CINDEX_MAGIC, 1, n);
            b.extend_from_slice(&[9; 16]);
            b
        };
        let mut v = vec![
            (head(&CINDEX_MAGIC, u32::MAX, u64::MAX), "claims"),
            (head(&CINDEX_MAGIC, 0, u64::MAX / 44 + 1), "claims"),
            (head(&CINDEX_MAGIC, u32::MAX, 0), "claims"),
            (head(&CINDEX_MAGIC, 0, 1), "claims"),
            (head(b"CBTFSCI\x03", 0, 0), "version 3"),
            (head(b"CBTFSPK\x02", 0, 0), "magic"),
            (CINDEX_MAGIC[..7].to_vec(), "shorter"),
        ];
        let mut b = one_pack(2);
        entry(&mut b, 1, 0, 0, 1);
        entry(&mut b, 1, 0, 5, 1);
        v.push((b, "sorted"));
        let mut b = one_pack(2);
        entry(&mut b, 2, 0, 0, 1);
        entry(&mut b, 1, 0, 5, 1);
        v.push((b, "sorted"));
        let mut b = one_pack(1);
        entry(&mut b, 1, 1, 0, 1);
        v.push((b, "pack number 1"));
        let mut b = one_pack(1);
        entry(&mut b, 1, 0, u32::MAX, 1);
        v.push((b, "4 GiB"));
        let mut b = one_pack(1);
        entry(&mut b, 1, 0, 7, 0);
        v.push((b, "empty record"));
        let mut b = one_pack(1);
        entry(&mut b, 1, 0, 7, 1);
        b.push(0);
        v.push((b, "claims"));
        v
    }

    #[test]
    fn hostile_bodies_are_refused() {
        for (body, why) in hostile_bodies() {
            let e = parse_cindex_body(&body).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
        let r = repo(true, true);
        let good = entries(10, 0..=0xff, &packs(1));
        r.write(good.clone());
        let bad: Vec<String> = hostile_bodies()
            .iter()
            .map(|(b, _)| r.put_body(b))
            .collect();
        let idx = r.load();
        let mut named: Vec<String> = idx
            .problems()
            .iter()
            .map(|(l, _)| l.trim_start_matches("mem:").to_string())
            .collect();
        named.sort();
        let mut bad_sorted = bad.clone();
        bad_sorted.sort();
        assert_eq!(named, bad_sorted);
        assert_eq!(idx.len(), 10);
        assert_eq!(idx.lookup(&good[0].0), Some(good[0].1));
    }

    #[test]
    fn a_valid_forged_body_is_read() {
        let mut b = head(&CINDEX_MAGIC, 2, 2);
        b.extend_from_slice(&[7; 16]);
        b.extend_from_slice(&[8; 16]);
        entry(&mut b, 1, 1, 10, 20);
        entry(&mut b, 2, 0, u32::MAX - 5, 5);
        let body = parse_cindex_body(&b).unwrap();
        assert_eq!(body.len(), 2);
        assert_eq!(body.pack_count(), 2);
        let l1 = ChunkLocation {
            pack: PackId([8; 16]),
            offset: 10,
            len: 20,
        };
        assert_eq!(body.find(&ChunkId([1; 32])), Some(l1));
        assert_eq!(body.entry(1).unwrap().1.pack, PackId([7; 16]));
        assert_eq!(body.entry(2), None);
        assert_eq!(body.range(), Some((ChunkId([1; 32]), ChunkId([2; 32]))));
        assert_eq!(body.find(&ChunkId([3; 32])), None);
        // The encoder writes the same bytes for the same entries (packs by first use).
        let mut again = head(&CINDEX_MAGIC, 2, 2);
        again.extend_from_slice(&[8; 16]);
        again.extend_from_slice(&[7; 16]);
        entry(&mut again, 1, 0, 10, 20);
        entry(&mut again, 2, 1, u32::MAX - 5, 5);
        let entries: Vec<_> = (0..2).map(|i| body.entry(i).unwrap()).collect();
        assert_eq!(encode_cindex_body(&entries), again);
        let empty = encode_cindex_body(&[]);
        assert_eq!(empty, head(&CINDEX_MAGIC, 0, 0));
        assert_eq!(parse_cindex_body(&empty).unwrap().range(), None);
    }

    #[test]
    fn large_inputs_are_split() {
        let r = repo(false, true);
        let p = packs(4);
        let mut e = entries(10, 0..=0xff, &p);
        e.push(e[3]);
        let mut keys = Vec::new();
        write_index_split(&*r.store, &r.keys, e.clone(), 3, &mut keys).unwrap();
        assert_eq!(keys.len(), 4);
        assert!(
            write_index(&*r.store, &r.keys, Vec::new())
                .unwrap()
                .is_empty()
        );
        let idx = r.load();
        assert_eq!(idx.len(), 10);
        for k in &keys {
            let sealed = r.store.get(k).unwrap();
            let plain = r
                .keys
                .open(&cindex_aad(object_hex(k).unwrap()), &sealed)
                .unwrap();
            assert!(parse_cindex_body(&plain).unwrap().len() <= 3);
        }
        for (id, loc) in &e {
            assert_eq!(idx.lookup(id), Some(*loc));
        }
        // Object ranges are disjoint (split after sorting), so each lookup searches one.
        let mut ranges = Vec::new();
        for o in &idx.read().objects {
            ranges.push(o.range.unwrap());
        }
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0));
    }

    #[test]
    fn cache_dir_is_private_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let d = cache_dir_under(t.path(), "0123-abcd").unwrap();
        assert_eq!(d, t.path().join("0123-abcd").join("cindex"));
        for p in [&d, &t.path().join("0123-abcd")] {
            assert_eq!(fs::metadata(p).unwrap().mode() & 0o777, 0o700);
        }
        // Directories made too open are closed again; the base is left alone.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(d.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(cache_dir_under(t.path(), "0123-abcd"), Some(d.clone()));
        for p in [&d, &t.path().join("0123-abcd")] {
            assert_eq!(fs::metadata(p).unwrap().mode() & 0o777, 0o700);
        }
        assert_eq!(fs::metadata(t.path()).unwrap().mode() & 0o7777, 0o1777);
        // An explicit cache directory in a shared directory: the shared one is not touched.
        let shared = t.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        let r = repo(true, false);
        let e = entries(3, 0..=0xff, &packs(1));
        r.write(e.clone());
        let idx = ChunkIndex::load(
            r.store.clone(),
            r.keys.clone(),
            &CacheDir(Some(shared.join("c"))),
        )
        .unwrap();
        assert_eq!(idx.lookup(&e[0].0), Some(e[0].1));
        assert_eq!(fs::metadata(&shared).unwrap().mode() & 0o7777, 0o1777);
        assert_eq!(fs::read_dir(shared.join("c")).unwrap().count(), 1);
        for bad in ["", "..", "a/b", "../x", "-x", "a b"] {
            assert_eq!(cache_dir_under(t.path(), bad), None, "{bad:?}");
        }
        // Not a directory: in memory.
        fs::write(t.path().join("file"), b"").unwrap();
        assert_eq!(cache_dir_under(&t.path().join("file"), "x"), None);
    }

    /// Writes the fuzz seeds of `cindex_body` and `pack_trailer` when CBTFS_WRITE_FUZZ_SEEDS
    /// names the fuzz directory (`CBTFS_WRITE_FUZZ_SEEDS=$PWD/fuzz cargo test --release --lib
    /// write_fuzz_seeds`); otherwise checks that the seeds parse as their names say.
    #[test]
    fn write_fuzz_seeds() {
        let mut cindex: Vec<(String, Vec<u8>)> = Vec::new();
        let p = [PackId([1; 16]), PackId([2; 16])];
        let mut e: Vec<_> = (0..6u8)
            .map(|i| {
                let mut id = [i * 40; 32];
                id[31] = i;
                (
                    ChunkId(id),
                    ChunkLocation {
                        pack: p[usize::from(i % 2)],
                        offset: u32::from(i) * 100,
                        len: 100,
                    },
                )
            })
            .collect();
        e.sort_by_key(|x| x.0);
        cindex.push(("ok-6".into(), encode_cindex_body(&e)));
        cindex.push(("ok-1".into(), encode_cindex_body(&e[..1])));
        cindex.push(("ok-empty".into(), encode_cindex_body(&[])));
        for (i, (b, _)) in hostile_bodies().into_iter().enumerate() {
            cindex.push((format!("bad-{i}"), b));
        }
        for (name, b) in &cindex {
            assert_eq!(
                parse_cindex_body(b).is_ok(),
                name.starts_with("ok"),
                "{name}"
            );
        }
        let keys = Keys::generate(false).unwrap();
        let mut trailers: Vec<(String, Vec<u8>)> = Vec::new();
        // A pack's plain trailer, followed by its records length (u64 LE) as the target reads.
        for n in [0usize, 1, 3] {
            let mut w = crate::repo::pack::PackWriter::new().unwrap();
            for i in 0..n {
                w.add(ChunkId([i as u8; 32]), &vec![i as u8; 50 + i]);
            }
            let (id, bytes, chunks) = w.finish(&keys);
            let records: u64 = chunks.iter().map(|(_, l)| u64::from(l.len)).sum();
            let tlen = u32::from_le_bytes(bytes[bytes.len() - 12..][..4].try_into().unwrap());
            let sealed = &bytes[records as usize..][..tlen as usize];
            let aad: Vec<u8> = b"pack".iter().chain(&id.0).copied().collect();
            let mut plain = keys.open(&aad, sealed).unwrap();
            plain.extend_from_slice(&records.to_le_bytes());
            trailers.push((format!("ok-{n}"), plain));
        }
        let mut over = trailers[2].1.clone();
        let at = over.len() - 8;
        over[at..].copy_from_slice(&10u64.to_le_bytes());
        trailers.push(("bad-short-records".into(), over));
        let mut lie = trailers[2].1.clone();
        lie[0] = 4;
        trailers.push(("bad-count".into(), lie));
        let Some(fuzz) = std::env::var_os("CBTFS_WRITE_FUZZ_SEEDS") else {
            return;
        };
        for (target, seeds) in [("cindex_body", &cindex), ("pack_trailer", &trailers)] {
            let dir = Path::new(&fuzz).join("seeds").join(target);
            fs::create_dir_all(&dir).unwrap();
            for (name, b) in seeds {
                fs::write(dir.join(name), b).unwrap();
            }
        }
    }
}
