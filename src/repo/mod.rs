//! The repository: every disk's backup history on storage, and the only code that knows its format.
//!
//! # Layout (format version 2)
//!
//! Everything is an object behind the `Store` trait (a local directory today; an object store
//! fits behind it unchanged): put whole and create-only, get, ranged get, list by prefix,
//! delete. Nothing is ever renamed, linked, appended to or rewritten.
//!
//! ```text
//! cbtfs.repo                 the header: plain checksummed JSON (format, version 2, id,
//!                            encryption). A version-1 header is refused with a clear message.
//! keys/<slot>                key slots: the master key wrapped by a password or key file
//! points/<point id>.<gen>    point manifests (sealed JSON): the commit records
//! pindex/<id>                point indexes (sealed): which blocks a point holds, by chunk id
//! packs/<xx>/<pack id>       chunk records, ~32 MiB per pack (sealed, compressed)
//! cindex/<id>                chunk index objects (sealed): chunk id -> pack, offset, length
//! meta/<id>                  VM metadata exports saved with points (sealed)
//! hosts/<keyed name>         pinned host certificate fingerprints (sealed)
//! journal/<keyed name>.N     what a backup is snapshotting right now (sealed)
//! lock                       the writers' shared / the exclusive maintenance lock
//! locks/writers/<id>         a record per live writer (shared lock holder)
//! locks/disks/<keyed name>   one lock per disk (VDI)
//! deleted/<key>              with Object Lock only: empty records of the objects cbtfs deleted
//!                            (`store::s3::lock`); the header then has `object_lock`
//! ```
//!
//! * A **disk** is a VDI, keyed by uuid; a **set** starts with a full base and grows by
//!   incremental points while CBT stays enabled; a **point** is a manifest naming its index.
//!   Disk, set and VM names live only inside sealed manifests: the store sees random names.
//! * A **chunk** is one 64 KiB block's bytes, named by BLAKE3 keyed with a repository secret,
//!   compressed with zstd when that is smaller, sealed with AES-256-GCM under a key of its own
//!   (`crypto`) bound to its name. The same content is stored once in the whole repository (dedup across disks and
//!   points); all-zero blocks are never stored (recorded in the bitmap only).
//! * Reading block b of point K: the chain (`chain::ChainMap`) finds the newest point ≤ K in the
//!   set whose bitmap has b; its index gives the chunk id; the chunk index gives the pack range.
//!   Cost is independent of chain depth.
//!
//! # Commit and crash safety
//!
//! A writer puts packs, then chunk index objects for them, then the point index, then the
//! manifest: the point exists once its manifest does. A crash leaves unreferenced objects
//! (collected by `gc`), never a half point. Prune never rewrites data: it writes a new index and
//! a new-generation manifest for the next kept point, taking over the removed points' entries,
//! then deletes the removed manifests; every intermediate state reads the same bytes for every
//! kept point (see `load_set` for how superseded manifests are hidden).
//!
//! # Locks
//!
//! Readers never lock. Writers take three kinds (`store`'s module doc has the mechanisms:
//! `flock` locally, leases on S3):
//!
//! * [`SharedLock`] ([`Repository::lock_shared`]): backup, import, copy and prune (dropping
//!   points) hold it for their whole run; any number at once, in one or many processes. Under
//!   it, whoever writes points of a disk holds that disk's [`DiskLock`]
//!   ([`SharedLock::lock_disk`]): two writers of one disk exclude each other (the second
//!   fails after 2 s naming the first), writers of different disks never wait for each other's
//!   transfers. Everything a writer does that is not per disk is safe beside other writers:
//!   packs, chunk index objects and point indexes have random names and are create-only; a
//!   point's set and position are decided, and its manifest put, under its disk's lock; stale
//!   manifests are deleted per disk ([`Repository::clean_orphans`]).
//! * [`ExclusiveLock`] ([`Repository::lock_exclusive`]): gc's sweep, repair; only while no
//!   writer is live. Deleting packs or chunk index objects needs it: a live writer dedups
//!   against the chunk index it loaded, so any chunk it can see may end up referenced by its
//!   next point. `prune` therefore drops points under the shared lock and leaves the deletion
//!   for a later gc while writers are running.
//! * A writer killed mid-run leaves a record (`locks/writers/ID`) that shows it dead, and
//!   objects nothing references. [`Repository::collect_dead_writers`], called when a run ends,
//!   collects them (gc without repacking) when it can take the exclusive lock at once.
//!
//! Deadlock freedom: the shared lock is taken before any disk lock, disk locks one at a time,
//! and the exclusive lock only by a process holding no other lock.
//!
//! # Integrity
//!
//! Every sealed object carries an authentication tag checked before a byte of it is used;
//! damage fails exactly the affected range (EIO through the mount) and is named by
//! `cbtfs verify`. It never yields wrong bytes.

pub mod chunkindex;
pub mod copy;
pub mod crypto;
pub mod error;
pub mod gc;
pub mod index;
pub mod journal;
pub mod keys;
pub mod manifest;
pub mod pack;
pub mod stats;
pub mod store;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use chunkindex::{CacheDir, ChunkIndex};
use crypto::{ChunkId, Keys};
pub use error::{RepoError, Result};
use index::Index;
use keys::Secret;
use pack::ChunkLocation;
use store::{LocalStore, Store};
pub use writer::{PointWriter, SealedPoint};

use crate::{BLOCK_SIZE, blocks_for, timefmt};

pub const REPO_FILE: &str = "cbtfs.repo";
pub const REPO_FORMAT: &str = "cbtfs-repository";
/// The header version of a repository without Object Lock (format 2).
pub const REPO_VERSION: u64 = 2;
/// The header version of a repository with Object Lock (`object_lock` in its header): the same
/// format, but a cbtfs that does not know Object Lock ignores the field and would write
/// unlocked objects into it, so the version is raised and such builds refuse to open it
/// ("upgrade cbtfs"). Repositories without Object Lock keep version 2, readable by every
/// format-2 build. Headers of the first Object Lock builds (version 2 with `object_lock`)
/// still open, locked.
pub const REPO_VERSION_LOCKED: u64 = 3;
pub const POINT_FORMAT: &str = "cbtfs-point";
pub const POINT_VERSION: u64 = 2;
pub(crate) const POINTS: &str = "points/";
pub(crate) const PINDEX: &str = "pindex/";
pub(crate) const META: &str = "meta/";
pub(crate) const HOSTS: &str = "hosts/";
/// Largest disk a point can describe: block numbers are u32 (roaring bitmaps).
pub const MAX_VIRTUAL_SIZE: u64 = (u32::MAX as u64) * BLOCK_SIZE;
/// Largest sealed object read whole (manifests, indexes, metadata): bounds what a damaged
/// length makes us allocate. A point index of a fully written 256 TiB disk is ~128 GiB, far
/// beyond; 2 TiB fully allocated is 1 GiB.
const MAX_OBJECT: u64 = 4 << 30;
/// How often a catalog read is retried while a writer keeps changing the repository.
const SCAN_TRIES: usize = 5;

/// How a new repository protects its contents.
#[derive(Debug, Clone)]
pub enum Encryption {
    /// Encrypted; the master key is wrapped by this secret in the first key slot.
    Secret(Secret),
    /// `--encryption none`: integrity tags only, the key stored in the header.
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoHeader {
    pub format: String,
    pub version: u64,
    pub id: String,
    pub created: String,
    pub block_size: u64,
    /// "aes-256-gcm" (or "xchacha20poly1305" from the first format-2 builds: both read both
    /// envelopes) or "none".
    #[serde(default)]
    pub encryption: String,
    /// Only with `encryption: none`: hex of the 64 master-key bytes (chunk ids need a key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// `cbtfs init s3://… --object-lock DAYS`: every object is written with this retention
    /// (`store::s3::lock`). Absent in other repositories' headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<store::s3::lock::ObjectLock>,
}

/// The header's word for an encrypted repository: objects are sealed with AES-256-GCM under a
/// per-object key (`crypto`).
pub const ENCRYPTION_ON: &str = "aes-256-gcm";
/// What the first format-2 builds wrote for an encrypted repository (its objects sealed with
/// XChaCha20-Poly1305, which still open); treated exactly as `ENCRYPTION_ON`.
pub const ENCRYPTION_XCHACHA: &str = "xchacha20poly1305";
pub const ENCRYPTION_NONE: &str = "none";

/// A sealed object a manifest names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ObjRef {
    pub key: String,
    pub len: u64,
}

/// What a point added to the repository when it was written.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PointStats {
    /// Chunks this point stored that the repository did not have.
    pub new_chunks: u64,
    /// Their plain bytes, and what they take in packs (compressed, sealed).
    pub new_raw_bytes: u64,
    pub new_stored_bytes: u64,
}

/// A point's manifest: its commit record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PointManifest {
    pub format: String,
    pub version: u64,
    /// The point's identity: random, fixed when the point is made; prune's new generations of
    /// the manifest keep it. The mount derives inode numbers and cache keys from it.
    pub id: String,
    /// Generation of this manifest: 1 when written, +1 each time prune rewrites its metadata.
    pub generation: u32,
    /// The point below it in its set's chain (None for a base).
    #[serde(default)]
    pub parent: Option<String>,
    pub vdi: String,
    pub disk_name: String,
    pub vm_uuid: Option<String>,
    pub vm_name: Option<String>,
    /// The set this point belongs to (the base's time, `20261121T020000Z`).
    pub set: String,
    /// Creation number in the set (0 for the base), never changed.
    pub n: u32,
    /// Position in the set's current chain (0 is the base): derived when the set is listed.
    #[serde(skip)]
    pub seq: u32,
    /// Snapshot time, Unix seconds (UTC).
    pub time: i64,
    pub virtual_size: u64,
    /// Blocks this point holds (stored or recorded as zero).
    pub changed_blocks: u64,
    /// Blocks whose bytes are stored (as chunks).
    pub data_blocks: u64,
    pub index: ObjRef,
    /// Where the point came from (`import:FILE`, `backup:HOST`).
    pub source: String,
    /// The host snapshot (VDI uuid) this point was read from: the next backup's diff origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The VM metadata export (`/export_metadata`, a tar holding ova.xml) saved with the point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_metadata: Option<ObjRef>,
    /// The VDI's type on the host (`user`, `system`): a restore creates the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdi_type: Option<String>,
    /// For a backed-up disk of a VM: the backup run it was taken in and its place in the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_run: Option<VmRun>,
    #[serde(default)]
    pub stats: PointStats,
    /// For a point `cbtfs copy` made: the point it is a copy of (its bytes are that point's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_from: Option<CopiedFrom>,
}

/// Where a copied point came from: `cbtfs copy` skips the points a destination already has and
/// continues each set after its newest copied point. Prune keeps a point's id (and this record)
/// through its generations, in both repositories.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CopiedFrom {
    /// The source repository's id (its header's `id`).
    pub repo: String,
    /// The source point's id.
    pub point: String,
    /// Its set in the source repository, and its creation number there (`n`: increasing in a
    /// set, kept by prune).
    pub set: String,
    pub n: u32,
}

impl CopiedFrom {
    fn check(&self) -> std::result::Result<(), String> {
        if !is_hex32(&self.repo) || !is_hex32(&self.point) || !valid_set_name(&self.set) {
            return Err(format!(
                "its copy origin (repository {:?}, point {:?}, set {:?}) is not one `cbtfs copy` writes",
                self.repo, self.point, self.set
            ));
        }
        Ok(())
    }
}

/// A point's place in a whole-VM backup run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmRun {
    /// The run's id (random hex), shared by the points of every disk one `cbtfs backup` took.
    pub run: String,
    /// The VBD's `userdevice` (the disk's position in the VM: `0`, `1`, ...), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userdevice: Option<String>,
    /// The VM's disks (VDI uuids) when the run started, this one included: a restore of the
    /// whole VM tells a disk the run did not back up from one the VM never had.
    #[serde(default)]
    pub vm_disks: Vec<String>,
}

impl VmRun {
    /// What is wrong with a `vm_run` read from storage (its uuids become paths).
    fn check(&self) -> std::result::Result<(), String> {
        if self.run.is_empty()
            || self.run.len() > 64
            || !self.run.bytes().all(|c| c.is_ascii_hexdigit())
        {
            return Err(format!("its backup run id {:?} is not a run id", self.run));
        }
        if let Some(u) = &self.userdevice
            && (u.is_empty() || u.len() > 8 || !u.bytes().all(|c| c.is_ascii_alphanumeric()))
        {
            return Err(format!("its userdevice {u:?} is not a device position"));
        }
        if self.vm_disks.len() > 1024 {
            return Err(format!(
                "it lists {} disks of its VM (at most 1024)",
                self.vm_disks.len()
            ));
        }
        if let Some(d) = self.vm_disks.iter().find(|d| !valid_uuid(d)) {
            return Err(format!("its VM's disk {d:?} is not a VDI uuid"));
        }
        Ok(())
    }
}

/// Is `key` an object key of `prefix` as writers make them: the prefix, then 32 lowercase hex?
fn valid_object_key(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix).is_some_and(is_hex32)
}

fn is_hex32(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

impl PointManifest {
    /// The point's identity.
    pub fn point_id(&self) -> String {
        self.id.clone()
    }

    /// `VDI@TIME`, how errors and logs name a point.
    pub fn label(&self) -> String {
        format!("{}@{}", self.vdi, timefmt::basic(self.time))
    }

    /// The key of this manifest generation.
    pub fn key(&self) -> String {
        manifest_key(&self.id, self.generation)
    }

    /// Check what a manifest read from storage claims before anything trusts it (it was
    /// authenticated, but a repository can be damaged by a buggy writer too): names of the
    /// shape writers make, a size the format can describe, counts that agree.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !is_hex32(&self.id) {
            return Err(format!("its id {:?} is not a point id", self.id));
        }
        if let Some(p) = &self.parent
            && !is_hex32(p)
        {
            return Err(format!("its parent {p:?} is not a point id"));
        }
        if self.generation == 0 {
            return Err("its generation is 0".into());
        }
        if !valid_uuid(&self.vdi) {
            return Err(format!("its disk {:?} is not a VDI uuid", self.vdi));
        }
        if !valid_set_name(&self.set) {
            return Err(format!("its set name {:?} is not a set name", self.set));
        }
        if !valid_object_key(&self.index.key, PINDEX) {
            return Err(format!(
                "its index object {:?} is not a point index key",
                self.index.key
            ));
        }
        if let Some(v) = &self.vm_metadata
            && !valid_object_key(&v.key, META)
        {
            return Err(format!(
                "its VM metadata object {:?} is not a metadata key",
                v.key
            ));
        }
        for r in [Some(&self.index), self.vm_metadata.as_ref()]
            .into_iter()
            .flatten()
        {
            if r.len > MAX_OBJECT {
                return Err(format!("its object {} claims {} bytes", r.key, r.len));
            }
        }
        if let Some(r) = &self.vm_run {
            r.check()?;
        }
        if let Some(c) = &self.copied_from {
            c.check()?;
        }
        if self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(format!(
                "its virtual size {} bytes is above the format's limit of {MAX_VIRTUAL_SIZE} bytes",
                self.virtual_size
            ));
        }
        let blocks = blocks_for(self.virtual_size);
        if self.changed_blocks > blocks {
            return Err(format!(
                "it holds {} blocks but its disk has only {blocks}",
                self.changed_blocks
            ));
        }
        if self.data_blocks > self.changed_blocks {
            return Err(format!(
                "it stores {} blocks but holds only {}",
                self.data_blocks, self.changed_blocks
            ));
        }
        Ok(())
    }
}

/// `points/<id>.<gen, 6 digits>`.
pub(crate) fn manifest_key(id: &str, gen_: u32) -> String {
    format!("{POINTS}{id}.{gen_:06}")
}

/// (id, gen) of a manifest key, if it has the writers' shape.
fn parse_manifest_key(key: &str) -> Option<(&str, u32)> {
    let rest = key.strip_prefix(POINTS)?;
    let (id, g) = rest.split_once('.')?;
    if !is_hex32(id) || g.len() < 6 || !g.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((id, g.parse().ok()?))
}

/// Is `name` a set name as writers make them (`20261121T020000Z`, maybe `-N`): plain
/// characters only, no `/`, no leading `.`, no `..`, at most 64 bytes?
pub fn valid_set_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'_' | b'@' | b'.'))
}

/// Decode a point manifest's plain JSON and check it (`PointManifest::check`).
pub fn decode_point_manifest(bytes: &[u8], location: &str) -> Result<PointManifest> {
    let m: PointManifest = manifest::decode(
        bytes,
        location,
        "point manifest",
        POINT_FORMAT,
        POINT_VERSION,
    )?;
    m.check().map_err(|d| RepoError::corrupt(location, d))?;
    Ok(m)
}

/// A problem found while listing a set (a damaged or missing manifest).
#[derive(Debug, Clone, Serialize)]
pub struct SetProblem {
    pub location: String,
    pub message: String,
}

/// One incremental set: its points in order, as far as they are intact.
#[derive(Debug, Clone)]
pub struct SetHistory {
    pub vdi: String,
    pub id: String,
    /// The chain base first, each point's parent the one before it. Points after a damaged or
    /// missing one are not listed here (they cannot be resolved) but named in `problems`.
    pub points: Vec<PointManifest>,
    pub problems: Vec<SetProblem>,
}

#[derive(Debug, Clone)]
pub struct DiskHistory {
    pub vdi: String,
    pub sets: Vec<SetHistory>,
}

impl DiskHistory {
    /// The disk's newest point (its name, VM and size name the disk).
    pub fn newest(&self) -> Option<&PointManifest> {
        self.sets.iter().rev().find_map(|s| s.points.last())
    }
}

/// What `begin_point` needs to know.
#[derive(Debug, Clone)]
pub struct NewPoint {
    pub vdi: String,
    pub disk_name: String,
    pub vm_uuid: Option<String>,
    pub vm_name: Option<String>,
    pub time: i64,
    pub virtual_size: u64,
    pub source: String,
    /// Start a new set (a full base) instead of extending the newest one.
    pub new_set: bool,
    /// The host snapshot the point is read from.
    pub snapshot: Option<String>,
    /// VM metadata to keep with the point.
    pub vm_metadata: Option<Vec<u8>>,
    pub vdi_type: Option<String>,
    /// The point's place in a whole-VM backup run.
    pub vm_run: Option<VmRun>,
}

/// An opened point: its manifest and checked index. Its chunks are read through the repository
/// it came from.
pub struct StoredPoint {
    pub manifest: PointManifest,
    pub index: Index,
    /// Where the index is, for error messages.
    pub index_location: String,
    repo: Repository,
}

impl StoredPoint {
    pub fn repository(&self) -> &Repository {
        &self.repo
    }
}

impl std::fmt::Debug for StoredPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredPoint")
            .field("point", &self.manifest.label())
            .field("index", &self.index)
            .finish()
    }
}

/// A chunk that could not be read: which of the asked ids, where, and why.
#[derive(Debug, Clone)]
pub struct ChunkFailure {
    /// Position of the failed id in the caller's list; every chunk before it was read.
    pub at: usize,
    pub location: String,
    pub problem: String,
}

/// Every set, by (VDI uuid, set name).
type SetsByDisk = BTreeMap<(String, String), SetHistory>;

/// What every handle on one open repository shares.
struct Shared {
    root: PathBuf,
    store: Arc<dyn Store>,
    keys: Arc<Keys>,
    cache: CacheDir,
    chunks: OnceLock<Arc<ChunkIndex>>,
    chunks_init: std::sync::Mutex<()>,
    /// Parsed manifests by key (objects are immutable and keys never reused).
    manifests: std::sync::Mutex<HashMap<String, std::result::Result<PointManifest, String>>>,
    /// The key slot the secret opened (None for `--encryption none`).
    opened_slot: Option<String>,
    /// Stored packs' buffers, kept for the next packs of any writer of this process: a fresh
    /// ~37 MiB buffer is zeroed and faulted in page by page, which cost a copy of 100 small
    /// points a quarter of its CPU time (one writer per point, each starting empty).
    pack_buffers: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// Pack buffers kept between writers, at most (each ~37 MiB once used).
const KEPT_PACK_BUFFERS: usize = 4;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("root", &self.root)
            .finish()
    }
}

/// An open repository (cheap to clone: handles share one state).
#[derive(Debug, Clone)]
pub struct Repository {
    shared: Arc<Shared>,
    pub header: RepoHeader,
}

/// Is `s` a plausible VDI uuid (it becomes a path component, so nothing else is accepted)?
pub fn valid_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

pub(crate) fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| RepoError::Invalid(format!("no randomness: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

thread_local! {
    /// Per-thread buffers of the chunk read path: the packed records, and decode scratch.
    static READ_BUFS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Most bytes of pack one ranged read fetches for adjacent chunks.
const MAX_COALESCE: usize = 8 << 20;

impl Repository {
    /// Create a repository in `path` (a new or empty directory).
    pub fn init(path: &Path, encryption: &Encryption) -> Result<Repository> {
        Repository::init_locked(path, encryption, None)
    }

    /// Create a repository, with Object Lock if `lock` is given (an `s3://` one, on a bucket
    /// with versioning and Object Lock enabled: checked first).
    pub fn init_locked(
        path: &Path,
        encryption: &Encryption,
        lock: Option<store::s3::lock::ObjectLock>,
    ) -> Result<Repository> {
        let loc = path.display().to_string();
        if lock.is_some() && !store::s3::is_s3_url(path) {
            return Err(RepoError::Invalid(format!(
                "{loc}: --object-lock needs a repository on S3 (s3://BUCKET/PREFIX, a bucket with Object Lock enabled)"
            )));
        }
        if let Some(store) = url_store(path)? {
            let found = store
                .list("")
                .map_err(|e| RepoError::io("list", store.describe(""), e))?;
            if found.iter().any(|o| o.key == REPO_FILE) {
                return Err(RepoError::Invalid(format!(
                    "{loc} is already a cbtfs repository; nothing was changed"
                )));
            }
            if let Some(first) = found.first() {
                return Err(RepoError::Invalid(format!(
                    "{loc} is not empty (it holds {} object{}, such as {}); give `cbtfs init` an empty bucket or a new prefix",
                    found.len(),
                    if found.len() == 1 { "" } else { "s" },
                    store.describe(&first.key)
                )));
            }
            if let Some(l) = lock {
                let s3 = store.s3().ok_or_else(|| {
                    RepoError::Invalid(format!("{loc}: this store cannot lock objects"))
                })?;
                s3.check_bucket_lock()
                    .and_then(|()| s3.enable_object_lock(l))
                    .map_err(|e| RepoError::io("set up Object Lock in", &loc, e))?;
            }
            return Repository::init_in_with(store, path, encryption, lock);
        }
        match std::fs::read_dir(path) {
            Ok(mut entries) => {
                if path.join(REPO_FILE).exists() {
                    return Err(RepoError::Invalid(format!(
                        "{loc} is already a cbtfs repository; nothing was changed"
                    )));
                }
                if entries.next().is_some() {
                    return Err(RepoError::Invalid(format!(
                        "{loc} is not empty; give `cbtfs init` a new or empty directory"
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .mode(store::DIR_MODE)
                    .create(path)
                    .map_err(|e| RepoError::io("create directory", &loc, e))?;
            }
            Err(e) => return Err(RepoError::io("read directory", &loc, e)),
        }
        {
            use std::os::unix::fs::PermissionsExt;
            // The repository directory itself is private.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(store::DIR_MODE))
                .map_err(|e| RepoError::io("set permissions of", &loc, e))?;
        }
        store::sync_parent(path)
            .map_err(|e| RepoError::io("sync the directory holding", &loc, e))?;
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(path));
        Repository::init_in(store, path, encryption)
    }

    /// Create a repository in an empty store.
    pub fn init_in(
        store: Arc<dyn Store>,
        root: &Path,
        encryption: &Encryption,
    ) -> Result<Repository> {
        Repository::init_in_with(store, root, encryption, None)
    }

    fn init_in_with(
        store: Arc<dyn Store>,
        root: &Path,
        encryption: &Encryption,
        object_lock: Option<store::s3::lock::ObjectLock>,
    ) -> Result<Repository> {
        let encrypted = matches!(encryption, Encryption::Secret(_));
        let keys = Keys::generate(encrypted)
            .map_err(|e| RepoError::Invalid(format!("no randomness: {e}")))?;
        let id = random_hex(16)?;
        let header = RepoHeader {
            format: REPO_FORMAT.into(),
            version: if object_lock.is_some() {
                REPO_VERSION_LOCKED
            } else {
                REPO_VERSION
            },
            id: id.clone(),
            created: timefmt::rfc3339(timefmt::now()),
            block_size: BLOCK_SIZE,
            encryption: if encrypted {
                ENCRYPTION_ON
            } else {
                ENCRYPTION_NONE
            }
            .into(),
            master: (!encrypted).then(|| {
                keys.master_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            }),
            object_lock,
        };
        let mut slot = None;
        if let Encryption::Secret(secret) = encryption {
            // The slot first: a header without a slot would be a repository nobody can open.
            slot = Some(keys::add_slot(
                store.as_ref(),
                &id,
                &keys,
                secret,
                None,
                keys::KdfCost::from_env(),
            )?);
        }
        store
            .put(REPO_FILE, &manifest::encode(&header))
            .map_err(|e| RepoError::io("write", store.describe(REPO_FILE), e))?;
        Ok(Repository::assemble(store, root, header, keys, slot))
    }

    fn assemble(
        store: Arc<dyn Store>,
        root: &Path,
        header: RepoHeader,
        keys: Keys,
        opened_slot: Option<String>,
    ) -> Repository {
        let cache = CacheDir::default_for(&header.id);
        Repository {
            shared: Arc::new(Shared {
                root: root.to_path_buf(),
                store,
                keys: Arc::new(keys),
                cache,
                chunks: OnceLock::new(),
                chunks_init: Default::default(),
                manifests: Default::default(),
                pack_buffers: Default::default(),
                opened_slot,
            }),
            header,
        }
    }

    /// Read and check the header of the repository at `path` without opening it (is it
    /// encrypted? which format?).
    pub fn probe(path: &Path) -> Result<RepoHeader> {
        if let Some(store) = url_store(path)? {
            return Repository::probe_in(store.as_ref(), path);
        }
        if let Some(why) = not_a_repository(path) {
            return Err(RepoError::NotARepository {
                path: path.to_path_buf(),
                why,
            });
        }
        let store = LocalStore::new(path);
        Repository::probe_in(&store, path)
    }

    /// Read and check the header of the repository in `store` (`path` names it in messages).
    pub fn probe_in(store: &dyn Store, path: &Path) -> Result<RepoHeader> {
        let loc = store.describe(REPO_FILE);
        let bytes = match store.get(REPO_FILE) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RepoError::NotARepository {
                    path: path.to_path_buf(),
                    why: format!("it has no {REPO_FILE} file"),
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                return Err(RepoError::corrupt(
                    loc,
                    format!("{REPO_FILE} is a directory, not the repository's header file"),
                ));
            }
            Err(e) => return Err(RepoError::io("read", loc, e)),
        };
        let header: RepoHeader =
            manifest::decode(&bytes, &loc, "repository", REPO_FORMAT, REPO_VERSION_LOCKED)?;
        if header.version < REPO_VERSION {
            return Err(RepoError::OldFormat {
                path: path.to_path_buf(),
                found: header.version,
            });
        }
        if header.block_size != BLOCK_SIZE {
            return Err(RepoError::corrupt(
                loc,
                format!("block size {} is not 65536", header.block_size),
            ));
        }
        if header.version == REPO_VERSION_LOCKED && header.object_lock.is_none() {
            // Opened as is, it would be written without locks: the very thing version 3 is for.
            return Err(RepoError::corrupt(
                loc,
                format!(
                    "its header has version {REPO_VERSION_LOCKED} (Object Lock) but no object_lock settings"
                ),
            ));
        }
        Ok(header)
    }

    /// Open an existing repository. An encrypted one needs `secret` (its password or key file).
    pub fn open(path: &Path, secret: Option<&Secret>) -> Result<Repository> {
        if let Some(store) = url_store(path)? {
            // The header, always from the store: it names the repository, and so its cache.
            let header = Repository::probe_in(store.as_ref(), path)?;
            let store = store::cache::wrap(store, &header.id);
            return Repository::open_with(store, path, header, secret);
        }
        let header = Repository::probe(path)?;
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(path));
        Repository::open_with(store, path, header, secret)
    }

    /// Open the repository in any store (`root` names it in messages): nothing above the
    /// `Store` trait knows where the objects are.
    pub fn open_store(
        store: Arc<dyn Store>,
        root: &Path,
        secret: Option<&Secret>,
    ) -> Result<Repository> {
        let header = Repository::probe_in(store.as_ref(), root)?;
        Repository::open_with(store, root, header, secret)
    }

    fn open_with(
        store: Arc<dyn Store>,
        root: &Path,
        header: RepoHeader,
        secret: Option<&Secret>,
    ) -> Result<Repository> {
        let loc = store.describe(REPO_FILE);
        if let Some(l) = header.object_lock {
            // Every object this handle writes gets the retention; a store that cannot lock
            // refuses here rather than write unlocked objects.
            store
                .s3()
                .ok_or_else(|| {
                    io::Error::other("the repository uses Object Lock, which this store cannot set")
                })
                .and_then(|s| s.enable_object_lock(l))
                .map_err(|e| RepoError::io("open", &loc, e))?;
        }
        match header.encryption.as_str() {
            ENCRYPTION_NONE => {
                let master = header
                    .master
                    .as_deref()
                    .and_then(hex_decode)
                    .and_then(|v| <[u8; 64]>::try_from(v).ok())
                    .ok_or_else(|| {
                        RepoError::corrupt(
                            &loc,
                            "an unencrypted repository's key is missing or malformed",
                        )
                    })?;
                let keys = Keys::from_master_bytes(&master, false);
                Ok(Repository::assemble(store, root, header, keys, None))
            }
            ENCRYPTION_ON | ENCRYPTION_XCHACHA => {
                let Some(secret) = secret else {
                    return Err(RepoError::NeedSecret {
                        path: root.to_path_buf(),
                    });
                };
                let (keys, slot) = keys::unlock(store.as_ref(), &header.id, secret)?;
                Ok(Repository::assemble(store, root, header, keys, Some(slot)))
            }
            other => Err(RepoError::corrupt(
                loc,
                format!("its encryption {other:?} is not one this cbtfs knows"),
            )),
        }
    }

    /// Read ranges past the page cache from now on (the mount: the kernel caches its files).
    pub fn with_direct_reads(self) -> Self {
        let Some(root) = self.shared.store.local_root().map(Path::to_path_buf) else {
            return self;
        };
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(root).with_direct_reads());
        let keys = (*self.shared.keys).clone();
        Repository::assemble(
            store,
            &self.shared.root,
            self.header,
            keys,
            self.shared.opened_slot.clone(),
        )
    }

    /// Where the repository is (a directory), for messages and the mount's source name.
    pub fn root(&self) -> &Path {
        &self.shared.root
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    pub fn keys(&self) -> &Arc<Keys> {
        &self.shared.keys
    }

    /// A kept pack buffer to fill again (empty if none is kept).
    pub(crate) fn take_pack_buffer(&self) -> Vec<u8> {
        let mut kept = self
            .shared
            .pack_buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        kept.pop().unwrap_or_default()
    }

    /// A stored pack's buffer, kept for a later pack unless enough are kept already.
    pub(crate) fn give_back_pack_buffer(&self, buffer: Vec<u8>) {
        let mut kept = self
            .shared
            .pack_buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if kept.len() < KEPT_PACK_BUFFERS && buffer.capacity() > 0 {
            kept.push(buffer);
        }
    }

    pub fn encrypted(&self) -> bool {
        self.header.encryption != ENCRYPTION_NONE
    }

    /// The key slot this handle was opened with (None for an unencrypted repository).
    pub fn opened_slot(&self) -> Option<&str> {
        self.shared.opened_slot.as_deref()
    }

    pub(crate) fn describe(&self, key: &str) -> String {
        self.shared.store.describe(key)
    }

    /// Seal and put a new object.
    pub(crate) fn put_sealed(&self, key: &str, aad_role: &str, plain: &[u8]) -> Result<u64> {
        let sealed = self.seal_object(key, aad_role, plain);
        self.put_sealed_object(key, &sealed)?;
        Ok(sealed.len() as u64)
    }

    /// `plain` sealed as the object `key` in the role `aad_role` (stored by
    /// [`put_sealed_object`](Self::put_sealed_object)).
    pub(crate) fn seal_object(&self, key: &str, aad_role: &str, plain: &[u8]) -> Vec<u8> {
        self.shared.keys.seal(&aad(aad_role, key), plain)
    }

    /// Store an object sealed by [`seal_object`](Self::seal_object).
    pub(crate) fn put_sealed_object(&self, key: &str, sealed: &[u8]) -> Result<()> {
        self.shared
            .store
            .put(key, sealed)
            .map_err(|e| RepoError::io("write", self.describe(key), e))
    }

    /// Get and open a sealed object (at most `MAX_OBJECT` bytes; `expect_len` if known). A
    /// local copy that fails (a cache's) is dropped and the object fetched once more from the
    /// store before the failure is reported.
    pub(crate) fn get_sealed(
        &self,
        key: &str,
        aad_role: &str,
        expect_len: Option<u64>,
    ) -> Result<Vec<u8>> {
        let bytes = self
            .shared
            .store
            .get(key)
            .map_err(|e| RepoError::io("read", self.describe(key), e))?;
        self.open_sealed(key, aad_role, expect_len, bytes)
    }

    /// Open the sealed bytes of `key` fetched already (see `get_sealed`).
    fn open_sealed(
        &self,
        key: &str,
        aad_role: &str,
        expect_len: Option<u64>,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>> {
        match self.open_sealed_once(key, aad_role, expect_len, bytes) {
            Err(RepoError::Corrupt { .. }) if self.shared.store.forget_cached(key) => {
                tracing::warn!(
                    "the cached copy of {} did not open; fetched it again",
                    self.describe(key)
                );
                let bytes = self
                    .shared
                    .store
                    .get(key)
                    .map_err(|e| RepoError::io("read", self.describe(key), e))?;
                self.open_sealed_once(key, aad_role, expect_len, bytes)
            }
            r => r,
        }
    }

    fn open_sealed_once(
        &self,
        key: &str,
        aad_role: &str,
        expect_len: Option<u64>,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let loc = self.describe(key);
        if let Some(n) = expect_len
            && bytes.len() as u64 != n
        {
            return Err(RepoError::corrupt(
                loc,
                format!(
                    "it is {} bytes, its manifest says {n} (truncated or replaced)",
                    bytes.len()
                ),
            ));
        }
        if bytes.len() as u64 > MAX_OBJECT {
            return Err(RepoError::corrupt(
                loc,
                "it is larger than any object cbtfs writes",
            ));
        }
        self.shared
            .keys
            .open(&aad(aad_role, key), &bytes)
            .map_err(|e| RepoError::corrupt(loc, e.to_string()))
    }

    /// Every manifest in the store, decoded (cached), and the ones that could not be. The
    /// listing is taken again after the reads; if it changed (a writer committed or deleted
    /// meanwhile), everything is read again, so the result is one moment's state.
    fn manifests(&self) -> Result<(Vec<PointManifest>, Vec<SetProblem>)> {
        let mut last = None;
        for _ in 0..SCAN_TRIES {
            let listed = self.list_keys(POINTS)?;
            let r = self.read_manifests(&listed)?;
            let again = self.list_keys(POINTS)?;
            if again == listed {
                return Ok(r);
            }
            tracing::debug!("the repository changed while it was read; reading it again");
            last = Some(r);
        }
        // Still changing after several tries (a busy writer): the last reading, which may lack
        // a point committed meanwhile but never mixes generations wrongly (see the module doc).
        last.ok_or_else(|| RepoError::Invalid("internal: no scan".into()))
    }

    fn list_keys(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .shared
            .store
            .list(prefix)
            .map_err(|e| RepoError::io("list", self.describe(prefix), e))?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    fn read_manifests(&self, listed: &[String]) -> Result<(Vec<PointManifest>, Vec<SetProblem>)> {
        let mut good = Vec::with_capacity(listed.len());
        let mut bad = Vec::new();
        let mut cache = self
            .shared
            .manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let live: std::collections::HashSet<&str> = listed.iter().map(|k| k.as_str()).collect();
        cache.retain(|k, _| live.contains(k.as_str()));
        // Fetched together: a remote store gets them in parallel (a mount of 1,000 points).
        let todo: Vec<String> = listed
            .iter()
            .filter(|k| !cache.contains_key(*k) && parse_manifest_key(k).is_some())
            .cloned()
            .collect();
        let mut fetched: HashMap<String, io::Result<Vec<u8>>> = if todo.len() > 1 {
            let got = self.shared.store.get_many(&todo);
            todo.into_iter().zip(got).collect()
        } else {
            HashMap::new()
        };
        for key in listed {
            let r = match cache.get(key) {
                Some(r) => r.clone(),
                None => match self.read_manifest(key, fetched.remove(key)) {
                    // Deleted since the listing (a prune's old generation): not a problem.
                    Err(RepoError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound =>
                    {
                        continue;
                    }
                    // Passing I/O trouble is reported, not remembered.
                    Err(e @ RepoError::Io { .. }) => Err(e.to_string()),
                    r => {
                        let r = r.map_err(|e| e.to_string());
                        cache.insert(key.clone(), r.clone());
                        r
                    }
                },
            };
            match r {
                Ok(m) => good.push(m),
                Err(message) => bad.push(SetProblem {
                    location: self.describe(key),
                    message,
                }),
            }
        }
        Ok((good, bad))
    }

    /// Read manifest `key` (its sealed bytes if fetched already).
    fn read_manifest(
        &self,
        key: &str,
        fetched: Option<io::Result<Vec<u8>>>,
    ) -> Result<PointManifest> {
        let loc = self.describe(key);
        let Some((id, gen_)) = parse_manifest_key(key) else {
            return Err(RepoError::corrupt(
                loc,
                "its name is not a point manifest's",
            ));
        };
        let plain = match fetched {
            Some(bytes) => {
                let bytes = bytes.map_err(|e| RepoError::io("read", &loc, e))?;
                self.open_sealed(key, "point", None, bytes)?
            }
            None => self.get_sealed(key, "point", None)?,
        };
        let m = decode_point_manifest(&plain, &loc)?;
        if m.id != id || m.generation != gen_ {
            return Err(RepoError::corrupt(
                loc,
                format!(
                    "it describes point {}.{} but is stored as {id}.{gen_}",
                    m.id, m.generation
                ),
            ));
        }
        Ok(m)
    }

    /// Manifests that could not be read or are damaged. They cannot be attributed to a disk
    /// (their contents are sealed); the sets they belonged to show a missing point.
    pub fn damaged_manifests(&self) -> Result<Vec<SetProblem>> {
        Ok(self.manifests()?.1)
    }

    /// All sets: (vdi, set) -> history, plus the manifest keys no reader should see (older
    /// generations, superseded points) for the next writer to delete.
    fn all_sets(&self) -> Result<(SetsByDisk, Vec<(String, String)>)> {
        let (manifests, _) = self.manifests()?;
        let mut groups: BTreeMap<(String, String), Vec<PointManifest>> = BTreeMap::new();
        for m in manifests {
            groups
                .entry((m.vdi.clone(), m.set.clone()))
                .or_default()
                .push(m);
        }
        let mut out = BTreeMap::new();
        let mut stale = Vec::new();
        for ((vdi, set), ms) in groups {
            let h = self.assemble_set(&vdi, &set, ms, &mut stale);
            out.insert((vdi, set), h);
        }
        Ok((out, stale))
    }

    /// Order one set's manifests into its chain (see the module doc).
    fn assemble_set(
        &self,
        vdi: &str,
        set: &str,
        ms: Vec<PointManifest>,
        stale: &mut Vec<(String, String)>,
    ) -> SetHistory {
        // The newest generation of each point.
        let mut newest: HashMap<String, PointManifest> = HashMap::new();
        for m in ms {
            match newest.get(&m.id) {
                Some(o) if o.generation >= m.generation => stale.push((vdi.to_string(), m.key())),
                _ => {
                    if let Some(o) = newest.insert(m.id.clone(), m) {
                        stale.push((vdi.to_string(), o.key()));
                    }
                }
            }
        }
        let mut points: Vec<PointManifest> = newest.into_values().collect();
        points.sort_by_key(|m| (m.n, m.id.clone()));
        let n_of: HashMap<String, u32> = points.iter().map(|m| (m.id.clone(), m.n)).collect();
        // A point whose parent skips over others supersedes them: a prune took their entries
        // over and had not deleted them yet.
        let mut superseded = std::collections::HashSet::new();
        for y in &points {
            let below: Option<i64> = match &y.parent {
                None => Some(-1),
                Some(p) => n_of.get(p).map(|&n| i64::from(n)),
            };
            if let Some(below) = below {
                for x in &points {
                    if i64::from(x.n) > below && x.n < y.n {
                        superseded.insert(x.id.clone());
                    }
                }
            }
        }
        let mut history = SetHistory {
            vdi: vdi.to_string(),
            id: set.to_string(),
            points: Vec::new(),
            problems: Vec::new(),
        };
        let mut broken = false;
        for mut m in points {
            if superseded.contains(&m.id) {
                stale.push((vdi.to_string(), m.key()));
                continue;
            }
            let loc = self.describe(&m.key());
            if broken {
                history.problems.push(SetProblem {
                    location: loc,
                    message: "unreadable: an earlier point of its set is damaged or missing".into(),
                });
                continue;
            }
            let prev = history.points.last();
            let expected = prev.map(|p| p.id.as_str());
            if m.parent.as_deref() != expected {
                history.problems.push(SetProblem {
                    location: loc,
                    message: match &m.parent {
                        Some(p) => format!(
                            "missing: the point below it (id {p}) is absent or damaged, so it and later points cannot be read"
                        ),
                        None => "damaged: it claims to be a base but its set has an earlier point".into(),
                    },
                });
                broken = true;
                continue;
            }
            if let Some(p) = prev
                && m.time <= p.time
            {
                history.problems.push(SetProblem {
                    location: loc,
                    message: "damaged: its time is not after the previous point's".into(),
                });
                broken = true;
                continue;
            }
            m.seq = history.points.len() as u32;
            history.points.push(m);
        }
        history
    }

    /// The uuids of all disks with points in the repository.
    pub fn disk_ids(&self) -> Result<Vec<String>> {
        let (sets, _) = self.all_sets()?;
        let mut ids: Vec<String> = sets.keys().map(|(v, _)| v.clone()).collect();
        ids.dedup();
        Ok(ids)
    }

    /// Every disk's history (manifests only: cheap).
    pub fn catalog(&self) -> Result<Vec<DiskHistory>> {
        let (sets, _) = self.all_sets()?;
        let mut disks: Vec<DiskHistory> = Vec::new();
        for ((vdi, _), s) in sets {
            if s.points.is_empty() && s.problems.is_empty() {
                continue;
            }
            match disks.last_mut() {
                Some(d) if d.vdi == vdi => d.sets.push(s),
                _ => disks.push(DiskHistory { vdi, sets: vec![s] }),
            }
        }
        Ok(disks)
    }

    /// One disk's history. A disk without committed points has no sets.
    pub fn disk(&self, vdi: &str) -> Result<DiskHistory> {
        let (sets, _) = self.all_sets()?;
        Ok(DiskHistory {
            vdi: vdi.to_string(),
            sets: sets
                .into_iter()
                .filter(|((v, _), s)| v == vdi && !(s.points.is_empty() && s.problems.is_empty()))
                .map(|(_, s)| s)
                .collect(),
        })
    }

    /// Put a manifest (a new point, or a new generation of one).
    pub(crate) fn put_manifest(&self, m: &PointManifest) -> Result<()> {
        let key = m.key();
        self.put_sealed(&key, "point", &manifest::encode(m))
            .map(|_| ())
    }

    /// Delete an object (a manifest prune dropped, an old generation, an orphan).
    pub(crate) fn delete(&self, key: &str) -> Result<()> {
        self.shared
            .store
            .delete(key)
            .map_err(|e| RepoError::io("delete", self.describe(key), e))
    }

    /// Write a point index object; returns its reference.
    pub(crate) fn put_index(
        &self,
        virtual_size: u64,
        changed: &roaring::RoaringBitmap,
        data: &roaring::RoaringBitmap,
        ids: &[u8],
    ) -> Result<ObjRef> {
        self.put_index_body(&index::encode(virtual_size, changed, data, ids))
    }

    /// Store an encoded point index body (`index::encode`) as a new point index object.
    pub(crate) fn put_index_body(&self, body: &[u8]) -> Result<ObjRef> {
        self.put_index_body_recorded(body, &mut Vec::new())
    }

    /// `put_index_body`, recording the new key in `written` *before* the put: a put that
    /// fails after storing its object (on S3, an answer lost on every attempt) leaves an
    /// object its writer must still know of to delete it.
    pub(crate) fn put_index_body_recorded(
        &self,
        body: &[u8],
        written: &mut Vec<String>,
    ) -> Result<ObjRef> {
        let key = format!("{PINDEX}{}", random_hex(16)?);
        written.push(key.clone());
        let len = self.put_sealed(&key, "pindex", body)?;
        Ok(ObjRef { key, len })
    }

    /// The VM metadata export saved with a point, if any.
    pub fn read_vm_metadata(&self, m: &PointManifest) -> Result<Option<Vec<u8>>> {
        let Some(r) = &m.vm_metadata else {
            return Ok(None);
        };
        if !valid_object_key(&r.key, META) {
            return Err(RepoError::corrupt(
                self.describe(&m.key()),
                "it names a VM metadata object outside the repository's",
            ));
        }
        self.get_sealed(&r.key, "meta", Some(r.len)).map(Some)
    }

    /// Open one point's index.
    pub fn open_point(&self, m: &PointManifest) -> Result<StoredPoint> {
        if let Err(detail) = m.check() {
            return Err(RepoError::corrupt(self.describe(&m.key()), detail));
        }
        let body = self.get_sealed(&m.index.key, "pindex", Some(m.index.len))?;
        self.stored_point(m, body)
    }

    /// Open the indexes of points `ms`, fetched together: a remote store gets them in
    /// parallel (`Store::get_many`), where one `open_point` after another waits for each.
    /// One result per manifest, in order.
    pub fn open_points(&self, ms: &[PointManifest]) -> Vec<Result<StoredPoint>> {
        // Only keys of the shape writers make are asked for.
        let checked: Vec<std::result::Result<(), String>> = ms.iter().map(|m| m.check()).collect();
        let keys: Vec<String> = ms
            .iter()
            .zip(&checked)
            .filter(|(_, c)| c.is_ok())
            .map(|(m, _)| m.index.key.clone())
            .collect();
        let mut fetched = self.shared.store.get_many(&keys).into_iter();
        ms.iter()
            .zip(checked)
            .map(|(m, c)| {
                c.map_err(|detail| RepoError::corrupt(self.describe(&m.key()), detail))?;
                let key = &m.index.key;
                let bytes = fetched
                    .next()
                    .ok_or_else(|| RepoError::Invalid("internal: a batched read was lost".into()))?
                    .map_err(|e| RepoError::io("read", self.describe(key), e))?;
                let body = self.open_sealed(key, "pindex", Some(m.index.len), bytes)?;
                self.stored_point(m, body)
            })
            .collect()
    }

    /// A point from its index's opened body (checked against its manifest).
    fn stored_point(&self, m: &PointManifest, body: Vec<u8>) -> Result<StoredPoint> {
        let iloc = self.describe(&m.index.key);
        let index = Index::parse(body, &iloc)?;
        if index.virtual_size != m.virtual_size
            || index.changed.len() != m.changed_blocks
            || index.data.len() != m.data_blocks
        {
            return Err(RepoError::corrupt(
                &iloc,
                "index does not match its manifest (sizes or block counts differ)",
            ));
        }
        Ok(StoredPoint {
            manifest: m.clone(),
            index,
            index_location: iloc,
            repo: self.clone(),
        })
    }

    /// The chunk index, loaded on first use (listing points needs none of it).
    pub fn chunk_index(&self) -> Result<&Arc<ChunkIndex>> {
        if let Some(c) = self.shared.chunks.get() {
            return Ok(c);
        }
        let _g = self
            .shared
            .chunks_init
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = self.shared.chunks.get() {
            return Ok(c);
        }
        let c = ChunkIndex::load(
            self.shared.store.clone(),
            self.shared.keys.clone(),
            &self.shared.cache,
        )?;
        Ok(self.shared.chunks.get_or_init(|| Arc::new(c)))
    }

    /// Where chunk `id` is, refreshing the chunk index once if it is not known (a writer or gc
    /// may have changed it since it was loaded).
    pub fn locate(&self, id: &ChunkId) -> Result<Option<ChunkLocation>> {
        let ci = self.chunk_index()?;
        if let Some(l) = ci.lookup(id) {
            return Ok(Some(l));
        }
        if ci.refresh()? {
            return Ok(ci.lookup(id));
        }
        Ok(None)
    }

    /// Read the chunks `ids` into `out` (64 KiB each, back to back). Adjacent records of one
    /// pack are fetched in one ranged read. Every chunk is authenticated before its bytes are
    /// written to `out`.
    pub fn read_chunks(
        &self,
        ids: &[ChunkId],
        out: &mut [u8],
    ) -> std::result::Result<(), ChunkFailure> {
        match self.read_chunks_once(ids, out) {
            // A pack gone since the chunk index was read: gc repacked it. The index was
            // refreshed; one more try finds the chunk's new place.
            Err((_, true)) => self.read_chunks_once(ids, out).map_err(|(f, _)| f),
            r => r.map_err(|(f, _)| f),
        }
    }

    /// One attempt of `read_chunks`; a failure says whether another attempt may succeed.
    fn read_chunks_once(
        &self,
        ids: &[ChunkId],
        out: &mut [u8],
    ) -> std::result::Result<(), (ChunkFailure, bool)> {
        let bs = BLOCK_SIZE as usize;
        let fail = |at: usize, location: String, problem: String| {
            (
                ChunkFailure {
                    at,
                    location,
                    problem,
                },
                false,
            )
        };
        if out.len() < ids.len() * bs {
            return Err(fail(
                0,
                "(caller)".into(),
                "internal: buffer too small".into(),
            ));
        }
        let mut locs = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            match self.locate(id) {
                Ok(Some(l)) => locs.push(l),
                Ok(None) => {
                    return Err(fail(
                        i,
                        self.describe(chunkindex::CINDEX_PREFIX),
                        format!("is chunk {id}, which no pack index lists (missing)"),
                    ));
                }
                Err(e) => {
                    return Err(fail(
                        i,
                        self.describe(chunkindex::CINDEX_PREFIX),
                        e.to_string(),
                    ));
                }
            }
        }
        let mut i = 0;
        while i < ids.len() {
            // A group: following records of one pack, back to back.
            let first = locs[i];
            let mut end = u64::from(first.offset) + u64::from(first.len);
            let mut j = i + 1;
            while j < ids.len()
                && locs[j].pack == first.pack
                && u64::from(locs[j].offset) == end
                && (end - u64::from(first.offset)) as usize + locs[j].len as usize <= MAX_COALESCE
            {
                end += u64::from(locs[j].len);
                j += 1;
            }
            let key = first.pack.key();
            let r = READ_BUFS.with(|b| {
                let mut b = b.borrow_mut();
                let (buf, scratch) = &mut *b;
                let len = (end - u64::from(first.offset)) as usize;
                buf.resize(len, 0);
                if let Err(e) = self.get_pack_range(&key, u64::from(first.offset), &mut buf[..len])
                {
                    return Err((i, io_problem(&e), e.kind() == io::ErrorKind::NotFound));
                }
                for k in i..j {
                    let at = (u64::from(locs[k].offset) - u64::from(first.offset)) as usize;
                    let rec = &buf[at..at + locs[k].len as usize];
                    let dst = &mut out[k * bs..(k + 1) * bs];
                    if let Err(e) =
                        pack::decode_chunk(&self.shared.keys, &ids[k], rec, dst, scratch)
                    {
                        return Err((k, format!("is chunk {}, which {e}", ids[k]), false));
                    }
                }
                Ok(())
            });
            if let Err((k, problem, retry)) = r {
                let (f, _) = fail(k, self.describe(&key), problem);
                return Err((f, retry));
            }
            i = j;
        }
        Ok(())
    }

    /// A ranged read of a pack; a pack gone since the chunk index was loaded (gc repacked it)
    /// is looked up afresh by the caller's next read.
    fn get_pack_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.shared.store.get_range(key, offset, buf);
        if let Err(e) = &r
            && e.kind() == io::ErrorKind::NotFound
            && let Some(ci) = self.shared.chunks.get()
        {
            let _ = ci.refresh();
        }
        r
    }

    /// Where the bytes of block `block` of point `m` itself are stored (not its chain's): the
    /// pack's key and the chunk record's place in it. None for a block the point does not
    /// store. For tests and tools that damage or inspect objects on purpose.
    pub fn locate_block(
        &self,
        m: &PointManifest,
        block: u32,
    ) -> Result<Option<(String, ChunkLocation)>> {
        let p = self.open_point(m)?;
        if !p.index.data.contains(block) {
            return Ok(None);
        }
        let rank = p.index.data.rank(block) as usize - 1;
        let Some(id) = p.index.entry(rank) else {
            return Ok(None);
        };
        Ok(self.locate(&id)?.map(|l| (l.pack.key(), l)))
    }

    /// A lock error as the repository's: `Held` names the holder.
    fn lock_error(&self, e: store::LockError, what: &str) -> RepoError {
        match e {
            store::LockError::Held(who) => RepoError::Locked {
                path: self.shared.root.clone(),
                holder: match who.trim() {
                    "" => format!("unknown holder{what}"),
                    w => format!("{w}{what}"),
                },
            },
            store::LockError::Io(e) => RepoError::io("lock", self.describe("lock"), e),
        }
    }

    /// Take the writers' shared lock (see [Locks](self#locks)): any number of backups,
    /// imports, copies and prunes at once; only the exclusive lock waits for them. Waits up to
    /// 2 s for an exclusive holder that is just leaving, then fails naming it.
    pub fn lock_shared(&self, holder: &str) -> Result<SharedLock> {
        let g = self
            .shared
            .store
            .take_lock(store::LockKind::Shared, holder, store::LOCK_WAIT)
            .map_err(|e| self.lock_error(e, ""))?;
        Ok(SharedLock {
            _guard: g,
            repo: self.clone(),
        })
    }

    /// Take the exclusive (maintenance) lock: no writer is live while it is held. Waits up to
    /// 2 s, then fails naming the holder (or the running writers). Removes what killed
    /// writers' unfinished puts left (temporary files, multipart uploads).
    pub fn lock_exclusive(&self, holder: &str) -> Result<ExclusiveLock> {
        self.exclusive(holder, store::LOCK_WAIT)
    }

    /// [`lock_exclusive`](Self::lock_exclusive) without waiting: None while anyone holds a
    /// lock it excludes (a writer, or another maintenance run).
    pub fn try_lock_exclusive(&self, holder: &str) -> Result<Option<ExclusiveLock>> {
        match self.exclusive(holder, std::time::Duration::ZERO) {
            Ok(l) => Ok(Some(l)),
            Err(RepoError::Locked { holder, .. }) => {
                tracing::debug!(%holder, "the exclusive lock is not free");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn exclusive(&self, holder: &str, wait: std::time::Duration) -> Result<ExclusiveLock> {
        let g = self
            .shared
            .store
            .take_lock(store::LockKind::Exclusive, holder, wait)
            .map_err(|e| self.lock_error(e, ""))?;
        // Killed writers' unfinished puts: no writer is live while we hold the lock.
        if let Err(e) = self.shared.store.remove_temporaries() {
            tracing::warn!(
                repo = %self.shared.root.display(),
                error = %e,
                "cannot remove the temporary files of killed writers"
            );
        }
        Ok(ExclusiveLock { _guard: g })
    }

    /// The writers that hold the shared lock now, as their records name them.
    pub fn running_writers(&self) -> Result<Vec<String>> {
        Ok(self
            .writer_records()?
            .into_iter()
            .filter(|r| r.live)
            .map(|r| r.holder)
            .collect())
    }

    fn writer_records(&self) -> Result<Vec<store::WriterRecord>> {
        self.shared
            .store
            .writer_records()
            .map_err(|e| RepoError::io("list the writers of", self.describe(""), e))
    }

    /// Collect what dead writers left (issue 19: "the next run aborts its multipart uploads
    /// and collects what is unreferenced"). A writer killed mid-run leaves its record
    /// (`store`'s module doc), perhaps unfinished puts (temporary files, multipart uploads)
    /// and objects no point references. When the exclusive lock can be taken without waiting
    /// (no writer live), taking it removes the unfinished puts, and if there are dead records
    /// `gc` runs without repacking (honouring Object Lock as gc does) and removes them;
    /// otherwise all is left for a later run. Call it after dropping this process's own
    /// [`SharedLock`].
    pub fn collect_dead_writers(&self, holder: &str) -> Result<Collection> {
        let Some(lock) = self.try_lock_exclusive(holder)? else {
            let records = self.writer_records()?;
            let dead = records.iter().filter(|r| !r.live).count();
            if dead == 0 {
                return Ok(Collection::NothingToDo);
            }
            return Ok(Collection::Deferred {
                dead,
                running: records.len() - dead,
            });
        };
        // Under the exclusive lock every record is a dead writer's; gc removes them once it
        // has collected everything.
        let dead: Vec<String> = self
            .writer_records()?
            .into_iter()
            .map(|r| r.holder)
            .collect();
        if dead.is_empty() {
            return Ok(Collection::NothingToDo);
        }
        let report = gc::gc(self, &lock, 0, false)?;
        Ok(Collection::Collected {
            writers: dead,
            gc: report,
        })
    }

    /// Remove every writer record: under the exclusive lock all are dead writers' (`gc` calls
    /// it once it has collected what they left). Returns who they named.
    pub fn forget_dead_writers(&self, _lock: &ExclusiveLock) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for r in self.writer_records()? {
            self.shared.store.remove_writer_record(&r.id).map_err(|e| {
                RepoError::io("remove a dead writer's record in", self.describe(""), e)
            })?;
            tracing::info!(writer = %r.holder, "collected what a dead writer left");
            out.push(r.holder);
        }
        Ok(out)
    }

    /// The manifests `clean_orphans` would delete (prune's dry run counts their bytes).
    pub fn stale_manifests(&self) -> Result<Vec<String>> {
        Ok(self.all_sets()?.1.into_iter().map(|(_, k)| k).collect())
    }

    /// Delete the manifests of disk `vdi` no reader sees any more (older generations, points a
    /// prune superseded before it died). Needs that disk's lock (other disks' writers may be
    /// live). Unreferenced packs and indexes are `gc`'s.
    pub fn clean_orphans(&self, lock: &dyn DiskWriteLock, vdi: &str) -> Result<Vec<String>> {
        lock.check_disk(vdi)?;
        let (_, stale) = self.all_sets()?;
        let mut removed = Vec::new();
        for (_, key) in stale.into_iter().filter(|(v, _)| v == vdi) {
            self.delete(&key)?;
            removed.push(self.describe(&key));
        }
        Ok(removed)
    }

    /// [`clean_orphans`](Self::clean_orphans) of every disk (gc, under the exclusive lock).
    pub fn clean_all_orphans(&self, _lock: &ExclusiveLock) -> Result<Vec<String>> {
        let (_, stale) = self.all_sets()?;
        let mut removed = Vec::new();
        for (_, key) in stale {
            self.delete(&key)?;
            removed.push(self.describe(&key));
        }
        Ok(removed)
    }

    /// Start writing a point. Decides its set and position and checks its time.
    /// Needs the disk's lock (a [`DiskLock`] of `spec.vdi`, or the exclusive lock).
    pub fn begin_point<'l>(
        &self,
        lock: &'l dyn DiskWriteLock,
        spec: NewPoint,
    ) -> Result<PointWriter<'l>> {
        check_new_point(lock, &spec)?;
        // A handle's chunk index may predate a gc (between two runs of this process): the
        // writer dedups only against chunks that exist. Under a lock no gc runs from here on.
        if let Some(ci) = self.shared.chunks.get() {
            ci.refresh()?;
        }
        // One scan serves both the orphans of this disk (as `clean_orphans`) and its sets.
        let (all, stale) = self.all_sets()?;
        for (_, key) in stale.iter().filter(|(v, _)| *v == spec.vdi) {
            self.delete(key)?;
        }
        let disk_sets: Vec<&SetHistory> = all
            .iter()
            .filter(|((v, _), _)| *v == spec.vdi)
            .map(|(_, s)| s)
            .collect();
        let newest_time = disk_sets
            .iter()
            .rev()
            .find_map(|s| s.points.last())
            .map(|p| p.time);
        let (set, n, previous) = if spec.new_set {
            if let Some(t) = newest_time
                && spec.time <= t
            {
                return Err(RepoError::Invalid(format!(
                    "a new base for disk {} must be later than its newest point ({}); give a later --time",
                    spec.vdi,
                    timefmt::rfc3339(t)
                )));
            }
            let mut set = timefmt::basic(spec.time);
            let mut k = 1;
            while disk_sets.iter().any(|s| s.id == set) {
                k += 1;
                set = format!("{}-{k}", timefmt::basic(spec.time));
            }
            (set, 0u32, None)
        } else {
            let Some(last_set) = disk_sets
                .iter()
                .rev()
                .find(|s| !s.points.is_empty() || !s.problems.is_empty())
            else {
                return Err(RepoError::Invalid(format!(
                    "disk {} has no backup set yet: import a full image (without --bitmap) first",
                    spec.vdi
                )));
            };
            if let Some(p) = last_set.problems.first() {
                return Err(RepoError::Invalid(format!(
                    "set {} of disk {} is damaged ({}: {}); start a new set with a full image (import without --bitmap)",
                    last_set.id, spec.vdi, p.location, p.message
                )));
            }
            let prev = last_set.points.last().cloned();
            if let Some(p) = &prev
                && spec.time <= p.time
            {
                return Err(RepoError::Invalid(format!(
                    "the new point's time {} must be later than the set's newest point {}; give a later --time",
                    timefmt::rfc3339(spec.time),
                    timefmt::rfc3339(p.time)
                )));
            }
            let n = prev
                .as_ref()
                .map(|p| p.n.checked_add(1))
                .unwrap_or(Some(0))
                .ok_or_else(|| {
                    RepoError::Invalid(format!(
                        "set {} of disk {} is full; start a new set with a full image",
                        last_set.id, spec.vdi
                    ))
                })?;
            (last_set.id.clone(), n, prev)
        };
        PointWriter::new(self.clone(), lock, set, n, previous, spec)
    }

    /// Start the point that follows `previous` in its set: a point this process wrote under
    /// the same disk lock and sealed ([`PointWriter::seal`]), which may still be publishing.
    /// Nothing is listed: the lock keeps other writers off this disk, so `previous` is the
    /// set's newest point once published. The caller publishes the new point only after
    /// `previous` is published (and drops it if that fails).
    pub fn continue_point<'l>(
        &self,
        lock: &'l dyn DiskWriteLock,
        spec: NewPoint,
        previous: &PointManifest,
    ) -> Result<PointWriter<'l>> {
        check_new_point(lock, &spec)?;
        if spec.new_set || spec.vdi != previous.vdi {
            return Err(RepoError::Invalid(format!(
                "internal: point {} cannot follow {} (a new set, or another disk); a bug in cbtfs: please report it",
                spec.vdi,
                previous.label()
            )));
        }
        if spec.time <= previous.time {
            return Err(RepoError::Invalid(format!(
                "the new point's time {} must be later than the set's newest point {}; give a later --time",
                timefmt::rfc3339(spec.time),
                timefmt::rfc3339(previous.time)
            )));
        }
        let n = previous.n.checked_add(1).ok_or_else(|| {
            RepoError::Invalid(format!(
                "set {} of disk {} is full; start a new set with a full image",
                previous.set, spec.vdi
            ))
        })?;
        PointWriter::new(
            self.clone(),
            lock,
            previous.set.clone(),
            n,
            Some(previous.clone()),
            spec,
        )
    }

    /// A host's pinned certificate fingerprint, if one was saved.
    pub fn read_pin(&self, host: &str) -> Result<Option<String>> {
        let key = self.pin_key(host);
        match self.shared.store.get(&key) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            _ => {}
        }
        let plain = self.get_sealed(&key, "host-pin", None)?;
        String::from_utf8(plain).map(Some).map_err(|_| {
            RepoError::corrupt(self.describe(&key), "the pinned fingerprint is not text")
        })
    }

    /// Pin a host's certificate fingerprint on first use. Create-only: a pin is never
    /// replaced (the admin deletes it to re-pin); when another process pinned first, its pin
    /// stands and is checked on the next connection.
    pub fn write_pin(&self, host: &str, fingerprint: &str) -> Result<()> {
        let key = self.pin_key(host);
        let sealed = self
            .shared
            .keys
            .seal(&aad("host-pin", &key), fingerprint.as_bytes());
        match self.shared.store.put(&key, &sealed) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(RepoError::io("write", self.describe(&key), e)),
        }
    }

    /// Where a host's pin is, for messages.
    pub fn pin_location(&self, host: &str) -> String {
        self.describe(&self.pin_key(host))
    }

    fn pin_key(&self, host: &str) -> String {
        format!("{HOSTS}{}", self.shared.keys.name_key("host-pin", host))
    }
}

/// What every new point must satisfy, whatever comes before it.
fn check_new_point(lock: &dyn DiskWriteLock, spec: &NewPoint) -> Result<()> {
    if !valid_uuid(&spec.vdi) {
        return Err(RepoError::Invalid(format!(
            "{:?} is not a VDI uuid (like 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b)",
            spec.vdi
        )));
    }
    if spec.virtual_size > MAX_VIRTUAL_SIZE {
        return Err(RepoError::Invalid(format!(
            "disk {} is {} bytes; cbtfs stores disks up to 256 TiB",
            spec.vdi, spec.virtual_size
        )));
    }
    lock.check_disk(&spec.vdi)
}

/// The associated data binding a sealed object to its role and key.
pub(crate) fn aad(role: &str, key: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(role.len() + 1 + key.len());
    a.extend_from_slice(role.as_bytes());
    a.push(b':');
    a.extend_from_slice(key.as_bytes());
    a
}

fn io_problem(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "lies past the end of its pack (truncated)".into(),
        io::ErrorKind::NotFound => "is in a pack that is missing".into(),
        _ => format!("cannot be read: {e}"),
    }
}

/// The writers' shared lock ([`Repository::lock_shared`]); released when dropped (or when
/// the process dies). Disks are locked under it with [`SharedLock::lock_disk`].
pub struct SharedLock {
    _guard: Box<dyn store::LockGuard>,
    repo: Repository,
}

impl SharedLock {
    /// Lock disk `vdi` for writing its points (backup, import, copy, prune): one holder at a
    /// time. Waits up to 2 s, then fails naming the holder. The lock file's name is keyed
    /// (`locks/disks/<keyed name>`), like the journal's: the store never sees the uuid.
    pub fn lock_disk(&self, vdi: &str, holder: &str) -> Result<DiskLock<'_>> {
        if !valid_uuid(vdi) {
            return Err(RepoError::Invalid(format!(
                "{vdi:?} is not a VDI uuid (like 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b)"
            )));
        }
        let repo = &self.repo;
        let name = repo.keys().name_key("disk-lock", vdi);
        let g = repo
            .shared
            .store
            .take_lock(store::LockKind::Disk(&name), holder, store::LOCK_WAIT)
            .map_err(|e| repo.lock_error(e, &format!(", writing disk {vdi}")))?;
        Ok(DiskLock {
            vdi: vdi.to_string(),
            _guard: g,
            _shared: std::marker::PhantomData,
        })
    }
}

impl std::fmt::Debug for SharedLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLock").finish_non_exhaustive()
    }
}

/// The exclusive (maintenance) lock ([`Repository::lock_exclusive`]): no writer is live while
/// it is held. It also entitles writing the points of any disk.
pub struct ExclusiveLock {
    _guard: Box<dyn store::LockGuard>,
}

impl std::fmt::Debug for ExclusiveLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExclusiveLock").finish_non_exhaustive()
    }
}

/// One disk's lock, held under a [`SharedLock`]; released when dropped.
pub struct DiskLock<'a> {
    vdi: String,
    _guard: Box<dyn store::LockGuard>,
    _shared: std::marker::PhantomData<&'a SharedLock>,
}

impl DiskLock<'_> {
    pub fn vdi(&self) -> &str {
        &self.vdi
    }
}

impl std::fmt::Debug for DiskLock<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskLock").field("vdi", &self.vdi).finish()
    }
}

/// A lock under which points (and journals, orphan manifests) of a disk may be written: that
/// disk's [`DiskLock`], or the [`ExclusiveLock`].
pub trait DiskWriteLock: Sync {
    /// Ok if this lock covers disk `vdi`; an error naming both otherwise (a bug).
    fn check_disk(&self, vdi: &str) -> Result<()>;
    /// No other writer is live while it is held (the exclusive lock): what this writer put
    /// and indexed may be deleted again, nobody else can have used it.
    fn excludes_other_writers(&self) -> bool;
}

impl DiskWriteLock for DiskLock<'_> {
    fn check_disk(&self, vdi: &str) -> Result<()> {
        if vdi == self.vdi {
            Ok(())
        } else {
            Err(RepoError::Invalid(format!(
                "internal: writing disk {vdi} under the lock of disk {} (a bug in cbtfs: please report it)",
                self.vdi
            )))
        }
    }
    fn excludes_other_writers(&self) -> bool {
        false
    }
}

impl DiskWriteLock for ExclusiveLock {
    fn check_disk(&self, _vdi: &str) -> Result<()> {
        Ok(())
    }
    fn excludes_other_writers(&self) -> bool {
        true
    }
}

/// What [`Repository::collect_dead_writers`] did.
#[derive(Debug)]
pub enum Collection {
    /// No dead writer's record (unfinished puts were removed if the exclusive lock was free).
    NothingToDo,
    /// `dead` records left for a later run: `running` writers are live (or a maintenance run
    /// holds the exclusive lock).
    Deferred { dead: usize, running: usize },
    /// The dead writers (as their records named them) and the gc that collected their leftovers.
    Collected {
        writers: Vec<String>,
        gc: gc::GcReport,
    },
}

/// Why `path` is not a repository at all, or `None` when it may be one (a directory holding a
/// `cbtfs.repo` entry, or a path that cannot be examined: the read then says why).
/// The store of a REPO given as `s3://BUCKET/PREFIX` (checked to answer), or None for a
/// directory.
fn url_store(path: &Path) -> Result<Option<Arc<dyn Store>>> {
    if !store::s3::is_s3_url(path) {
        return Ok(None);
    }
    let url = path.to_string_lossy();
    let s3 = store::s3::S3Store::open_url(&url).map_err(|e| RepoError::Io {
        op: "open repository",
        location: url.to_string(),
        source: e,
        hint: "",
    })?;
    Ok(Some(Arc::new(s3)))
}

fn not_a_repository(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let md = match std::fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Some("nothing exists at that path".into());
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Some("a part of the path is a file, not a directory".into());
        }
        Err(_) => return None,
    };
    let ft = md.file_type();
    let what = if ft.is_dir() {
        return match std::fs::symlink_metadata(path.join(REPO_FILE)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let empty = std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_none());
                Some(if empty {
                    "an empty directory".into()
                } else {
                    format!("a directory without a {REPO_FILE} file")
                })
            }
            _ => None,
        };
    } else if ft.is_file() {
        "a file, not a directory"
    } else if ft.is_block_device() {
        "a block device, not a directory"
    } else if ft.is_char_device() {
        "a character device, not a directory"
    } else if ft.is_fifo() {
        "a pipe (FIFO), not a directory"
    } else if ft.is_socket() {
        "a socket, not a directory"
    } else {
        "not a directory"
    };
    Some(what.into())
}

/// Repositories for unit tests: encrypted with a fixed key file secret (no KDF: fast).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn secret() -> Secret {
        Secret::KeyFile {
            path: "/test/repo.key".into(),
            key: [7; 32],
        }
    }

    pub fn init(path: &Path) -> Repository {
        Repository::init(path, &Encryption::Secret(secret())).expect("init a test repository")
    }

    pub fn open(path: &Path) -> Repository {
        Repository::open(path, Some(&secret())).expect("open a test repository")
    }

    /// A new point of disk `vdi` with nothing but what a writer needs (disk "d", no VM, no
    /// snapshot, no metadata); tests set more with `NewPoint { field, ..bare_point(…) }`.
    pub fn bare_point(vdi: &str, time: i64, virtual_size: u64, new_set: bool) -> NewPoint {
        NewPoint {
            vdi: vdi.into(),
            disk_name: "d".into(),
            vm_uuid: None,
            vm_name: None,
            time,
            virtual_size,
            source: "test".into(),
            new_set,
            snapshot: None,
            vm_metadata: None,
            vdi_type: None,
            vm_run: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::PointReader;

    const VDI_A: &str = "00000000-0000-4000-8000-00000000000a";
    const VDI_B: &str = "00000000-0000-4000-8000-00000000000b";
    const BS: usize = BLOCK_SIZE as usize;

    fn spec(vdi: &str, time: i64, blocks: u64, new_set: bool) -> NewPoint {
        NewPoint {
            vdi: vdi.into(),
            disk_name: "secret-disk-name".into(),
            vm_uuid: Some("11111111-2222-4333-8444-555555555555".into()),
            vm_name: Some("secret-vm-name".into()),
            time,
            virtual_size: blocks * BLOCK_SIZE,
            source: "test".into(),
            new_set,
            snapshot: None,
            vm_metadata: Some(b"secret-vm-metadata".to_vec()),
            vdi_type: None,
            vm_run: None,
        }
    }

    /// A disk image of `blocks` blocks: block b filled from `seed` and b, every third zero.
    fn image(blocks: usize, seed: u8) -> Vec<u8> {
        let mut v = vec![0u8; blocks * BS];
        for (b, chunk) in v.chunks_mut(BS).enumerate() {
            if b % 3 != 2 {
                for (i, x) in chunk.iter_mut().enumerate() {
                    *x = (i as u8).wrapping_mul(seed).wrapping_add(b as u8);
                }
            }
        }
        v
    }

    fn write(repo: &Repository, s: NewPoint, bytes: &[u8], first: u64) -> PointManifest {
        let lock = repo.lock_exclusive("test").unwrap();
        let mut w = repo.begin_point(&lock, s).unwrap();
        w.add_run(first, bytes, true).unwrap();
        w.commit().unwrap()
    }

    fn read_point(repo: &Repository, vdi: &str, set: usize, seq: u32) -> Vec<u8> {
        let d = repo.disk(vdi).unwrap();
        let r = PointReader::open(repo, &d.sets[set], seq).unwrap();
        let mut out = vec![0u8; r.size() as usize];
        assert_eq!(r.read_at(&mut out, 0).unwrap(), out.len());
        out
    }

    fn pack_bytes(root: &Path) -> u64 {
        LocalStore::new(root)
            .list("packs/")
            .unwrap()
            .iter()
            .map(|o| o.len)
            .sum()
    }

    #[test]
    fn equal_disks_are_stored_once_and_read_back_exactly() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let repo = testing::init(&root);
        let img = image(40, 7);
        write(&repo, spec(VDI_A, 1_000, 40, true), &img, 0);
        let one = pack_bytes(&root);
        write(&repo, spec(VDI_B, 2_000, 40, true), &img, 0);
        assert_eq!(pack_bytes(&root), one, "the second disk stored no chunk");
        let fresh = testing::open(&root);
        assert!(read_point(&fresh, VDI_A, 0, 0) == img);
        assert!(read_point(&fresh, VDI_B, 0, 0) == img);
        // Zero blocks are recorded, not stored; repeated blocks once.
        let m = fresh.disk(VDI_A).unwrap().sets[0].points[0].clone();
        assert_eq!(m.changed_blocks, 40);
        assert_eq!(m.data_blocks, 27);
        assert_eq!(m.stats.new_chunks, 27);
    }

    /// The writer's batched, in-place path: runs longer than a batch, duplicates inside one
    /// batch on different workers and across batches, compressible and random blocks mixed, a
    /// short last block, and more than one pack. Every block reads back exactly and each
    /// distinct block is stored once.
    #[test]
    fn long_mixed_runs_read_back_exactly_with_each_chunk_stored_once() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let repo = testing::init(&root);
        let blocks = 1000usize;
        let mut img = vec![0u8; blocks * BS - 1000];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (b, chunk) in img.chunks_mut(BS).enumerate() {
            match b % 5 {
                // Compressible.
                0 => chunk
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = (i / 512 + b) as u8),
                // Zero.
                1 if b > 100 => {}
                // Random.
                _ => chunk.iter_mut().for_each(|v| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *v = x as u8;
                }),
            }
        }
        // Copies of block 2: in its own batch on the other worker, and in later batches.
        let two = img[2 * BS..3 * BS].to_vec();
        for b in [40usize, 63, 64, 300, 999] {
            let end = ((b + 1) * BS).min(img.len());
            let n = end - b * BS;
            img[b * BS..end].copy_from_slice(&two[..n]);
        }
        let blocks_u64 = blocks as u64;
        let m = write(&repo, spec(VDI_A, 1_000, blocks_u64, true), &img, 0);
        let fresh = testing::open(&root);
        let mut back = read_point(&fresh, VDI_A, 0, 0);
        assert!(back[img.len()..].iter().all(|&v| v == 0));
        back.truncate(img.len());
        assert!(back == img, "the point reads back exactly");
        let mut distinct = std::collections::HashSet::new();
        for chunk in img.chunks(BS) {
            let mut full = chunk.to_vec();
            full.resize(BS, 0);
            if full.iter().any(|&v| v != 0) {
                distinct.insert(full);
            }
        }
        assert_eq!(m.stats.new_chunks, distinct.len() as u64);
        assert!(
            LocalStore::new(&root).list("packs/").unwrap().len() >= 2,
            "more than one pack"
        );
    }

    #[test]
    fn names_and_contents_are_encrypted_at_rest() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let repo = testing::init(&root);
        let mut img = image(8, 3);
        img[..16].copy_from_slice(b"plain-guest-text");
        write(&repo, spec(VDI_A, 1_000, 8, true), &img, 0);
        let store = LocalStore::new(&root);
        for o in store.list("").unwrap() {
            assert!(!o.key.contains(VDI_A), "{}", o.key);
            let bytes = std::fs::read(root.join(&o.key)).unwrap();
            for needle in [
                VDI_A.as_bytes(),
                b"secret-disk-name",
                b"secret-vm-name",
                b"secret-vm-metadata",
                b"plain-guest-text",
            ] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{} holds {:?} in the clear",
                    o.key,
                    String::from_utf8_lossy(needle)
                );
            }
        }
    }

    #[test]
    fn a_wrong_or_missing_secret_and_an_old_format_are_named() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        testing::init(&root);
        let e = Repository::open(&root, None).unwrap_err();
        assert!(matches!(e, RepoError::NeedSecret { .. }), "{e}");
        assert!(e.to_string().contains("--key-file"), "{e}");
        let wrong = Secret::KeyFile {
            path: "/x".into(),
            key: [8; 32],
        };
        let e = Repository::open(&root, Some(&wrong)).unwrap_err();
        assert!(matches!(e, RepoError::WrongSecret { .. }), "{e}");
        // A format-1 header: refused, saying so.
        let old = d.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(
            old.join(REPO_FILE),
            manifest::encode(&serde_json::json!({
                "format": REPO_FORMAT, "version": 1, "id": "ab", "created": "x", "block_size": 65536
            })),
        )
        .unwrap();
        let e = Repository::open(&old, None).unwrap_err();
        assert!(matches!(e, RepoError::OldFormat { found: 1, .. }), "{e}");
        assert!(e.to_string().contains("format-1"), "{e}");
    }

    /// A repository with Object Lock has header version 3: a build that knows only version 2
    /// (and would ignore `object_lock`, writing unlocked objects) refuses it; a version-3
    /// header without the settings is damaged; plain repositories keep version 2.
    #[test]
    fn object_lock_raises_the_header_version_and_old_headers_open_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("plain");
        Repository::init(&plain, &Encryption::None).unwrap();
        let bytes = std::fs::read(plain.join(REPO_FILE)).unwrap();
        let h: RepoHeader = manifest::decode(&bytes, "h", "repository", REPO_FORMAT, REPO_VERSION)
            .expect("a plain header is readable by version-2 builds");
        assert_eq!((h.version, h.object_lock), (REPO_VERSION, None));
        assert!(Repository::open(&plain, None).is_ok());

        let header = |version: u64, lock: Option<serde_json::Value>| {
            let mut v = serde_json::json!({
                "format": REPO_FORMAT, "version": version, "id": "ab", "created": "x",
                "block_size": 65536, "encryption": ENCRYPTION_NONE, "master": "00".repeat(64),
            });
            if let Some(l) = lock {
                v["object_lock"] = l;
            }
            manifest::encode(&v)
        };
        let lock = serde_json::json!({"mode": "COMPLIANCE", "days": 7});
        let locked = header(REPO_VERSION_LOCKED, Some(lock.clone()));
        // What a version-2 build does with it: refuses, naming the version.
        let e =
            manifest::decode::<RepoHeader>(&locked, "h", "repository", REPO_FORMAT, REPO_VERSION)
                .unwrap_err();
        assert!(
            matches!(
                e,
                RepoError::UnsupportedVersion {
                    found: 3,
                    supported: 2,
                    ..
                }
            ),
            "{e}"
        );
        let dir = d.path().join("locked");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(REPO_FILE), &locked).unwrap();
        let h = Repository::probe(&dir).unwrap();
        assert_eq!(h.version, REPO_VERSION_LOCKED);
        assert!(h.object_lock.is_some());
        // A local store cannot lock: opening refuses rather than write unlocked objects.
        let e = Repository::open(&dir, None).expect_err("refused");
        assert!(e.to_string().contains("Object Lock"), "{e}");

        for (version, lock, want) in [
            (REPO_VERSION_LOCKED, None, "no object_lock settings"),
            (REPO_VERSION_LOCKED + 1, Some(lock), "upgrade cbtfs"),
        ] {
            std::fs::write(dir.join(REPO_FILE), header(version, lock)).unwrap();
            let e = Repository::probe(&dir).unwrap_err();
            assert!(e.to_string().contains(want), "version {version}: {e}");
        }
    }

    #[test]
    fn an_unencrypted_repository_says_so_and_still_checks_integrity() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let repo = Repository::init(&root, &Encryption::None).unwrap();
        assert!(!repo.encrypted());
        let img = image(6, 5);
        let m = write(&repo, spec(VDI_A, 1_000, 6, true), &img, 0);
        let fresh = Repository::open(&root, None).unwrap();
        assert_eq!(fresh.header.encryption, ENCRYPTION_NONE);
        assert!(read_point(&fresh, VDI_A, 0, 0) == img);
        // A flipped bit in a chunk is an error for that block, never other bytes.
        let (key, loc) = fresh.locate_block(&m, 1).unwrap().unwrap();
        let p = root.join(key);
        let mut b = std::fs::read(&p).unwrap();
        b[loc.offset as usize + 20] ^= 4;
        std::fs::write(&p, b).unwrap();
        let fresh = Repository::open(&root, None).unwrap();
        let d0 = fresh.disk(VDI_A).unwrap();
        let r = PointReader::open(&fresh, &d0.sets[0], 0).unwrap();
        let mut out = vec![0u8; BS];
        assert!(r.read_at(&mut out, 0).is_ok());
        let e = r.read_at(&mut out, BLOCK_SIZE).unwrap_err();
        assert_eq!(e.block, 1);
    }

    /// The states a prune passes through: a kept point's new generation committed while the
    /// points it took over are still there. Readers see the kept points only, with their bytes;
    /// the next writer deletes the rest.
    #[test]
    fn a_prune_interrupted_after_its_commit_hides_what_it_took_over() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let repo = testing::init(&root);
        let mut img = image(12, 9);
        write(&repo, spec(VDI_A, 1_000, 12, true), &img, 0);
        let mut want = vec![img.clone()];
        for (i, b) in [3usize, 5, 3].iter().enumerate() {
            img[b * BS..(b + 1) * BS].fill(50 + i as u8);
            write(
                &repo,
                spec(VDI_A, 2_000 + i as i64, 12, false),
                &img[b * BS..(b + 1) * BS],
                *b as u64,
            );
            want.push(img.clone());
        }
        let before = repo.disk(VDI_A).unwrap().sets[0].points.clone();
        assert_eq!(before.len(), 4);
        // Hand-made: point 2 takes over point 1 (a new generation with point 0 as parent), and
        // the run "dies" before deleting point 1 and point 2's old generation.
        let reader = PointReader::open(&repo, &repo.disk(VDI_A).unwrap().sets[0], 2).unwrap();
        let mut changed = roaring::RoaringBitmap::new();
        let mut data = roaring::RoaringBitmap::new();
        let mut ids = Vec::new();
        for b in [3u32, 5] {
            let run = reader
                .map()
                .runs()
                .iter()
                .find(|r| r.start <= b && b < r.start + r.len)
                .unwrap();
            let id = reader
                .layer(run.layer as usize)
                .unwrap()
                .index
                .entry(run.first_entry as usize + (b - run.start) as usize)
                .unwrap();
            changed.insert(b);
            data.insert(b);
            ids.extend_from_slice(&id.0);
        }
        let index = repo
            .put_index(12 * BLOCK_SIZE, &changed, &data, &ids)
            .unwrap();
        let mut g2 = before[2].clone();
        g2.generation = 2;
        g2.parent = Some(before[0].id.clone());
        g2.changed_blocks = 2;
        g2.data_blocks = 2;
        g2.index = index;
        repo.put_manifest(&g2).unwrap();
        let fresh = testing::open(&root);
        let pts = fresh.disk(VDI_A).unwrap().sets[0].points.clone();
        assert_eq!(
            pts.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
            [&before[0], &before[2], &before[3]].map(|p| p.id.clone()),
            "point 1 is superseded, point 2's new generation is listed"
        );
        for (seq, w) in [(0u32, &want[0]), (1, &want[2]), (2, &want[3])] {
            assert!(read_point(&fresh, VDI_A, 0, seq) == *w, "point at {seq}");
        }
        // The next writer cleans up: point 1 and the old generation of point 2 go.
        let lock = fresh.lock_exclusive("t").unwrap();
        let removed = fresh.clean_orphans(&lock, VDI_A).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        drop(lock);
        assert!(read_point(&testing::open(&root), VDI_A, 0, 2) == want[3]);
    }

    #[test]
    fn a_damaged_manifest_is_named_and_breaks_only_the_chain_above_it() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let repo = testing::init(&root);
        let img = image(4, 2);
        write(&repo, spec(VDI_A, 1_000, 4, true), &img, 0);
        let m1 = write(&repo, spec(VDI_A, 2_000, 4, false), &img[..BS], 0);
        write(&repo, spec(VDI_A, 3_000, 4, false), &img[..BS], 0);
        let p = root.join(m1.key());
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n / 2] ^= 1;
        std::fs::write(&p, b).unwrap();
        let fresh = testing::open(&root);
        let damaged = fresh.damaged_manifests().unwrap();
        assert_eq!(damaged.len(), 1);
        assert!(damaged[0].location.contains(&m1.key()));
        let set = &fresh.disk(VDI_A).unwrap().sets[0];
        assert_eq!(set.points.len(), 1, "only the base is readable");
        assert_eq!(set.problems.len(), 1);
        assert!(
            set.problems[0].message.contains("missing"),
            "{:?}",
            set.problems
        );
    }

    #[test]
    fn gc_deletes_what_nothing_references_and_repacks_what_is_mostly_dead() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let repo = testing::init(&root);
        let a = image(30, 11);
        let b = image(30, 13);
        write(&repo, spec(VDI_A, 1_000, 30, true), &a, 0);
        write(&repo, spec(VDI_B, 1_000, 30, true), &b, 0);
        // Nothing to collect yet.
        let lock = repo.lock_exclusive("t").unwrap();
        let r = gc::gc(&repo, &lock, gc::DEFAULT_REPACK_BELOW, false).unwrap();
        assert_eq!((r.packs_deleted, r.packs_repacked), (0, 0), "{r:?}");
        drop(lock);
        // Drop disk B's point from the metadata: its pack becomes garbage.
        let mb = repo.disk(VDI_B).unwrap().sets[0].points[0].clone();
        repo.delete(&mb.key()).unwrap();
        let before = pack_bytes(&root);
        let lock = repo.lock_exclusive("t").unwrap();
        let dry = gc::gc(&repo, &lock, gc::DEFAULT_REPACK_BELOW, true).unwrap();
        assert_eq!(pack_bytes(&root), before, "a dry run deletes nothing");
        let r = gc::gc(&repo, &lock, gc::DEFAULT_REPACK_BELOW, false).unwrap();
        assert_eq!(r.packs_deleted, dry.packs_deleted);
        assert!(r.packs_deleted >= 1, "{r:?}");
        assert!(pack_bytes(&root) < before);
        assert!(LocalStore::new(&root).list(PINDEX).unwrap().len() == 1);
        drop(lock);
        assert!(read_point(&testing::open(&root), VDI_A, 0, 0) == a);
    }

    /// Issue 18: a writer's pending chunk map never holds `flush_every` entries or more, its
    /// table stays the size that bound needs, and every flush is an index object a fresh
    /// reader finds; blocks repeated across flushes are stored once.
    #[test]
    fn writer_memory_is_bounded_by_its_flush_size() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let repo = testing::init(&root);
        let blocks = 350usize;
        let mut img = vec![0u8; blocks * BS];
        for (b, chunk) in img.chunks_mut(BS).enumerate() {
            // Distinct blocks, except that the last 50 repeat the first 50.
            chunk[..8].copy_from_slice(&((b % 300) as u64 + 1).to_be_bytes());
        }
        let lock = repo.lock_exclusive("test").unwrap();
        let mut w = repo
            .begin_point(&lock, spec(VDI_A, 1_000, blocks as u64, true))
            .unwrap();
        w.set_flush_every(100);
        // Capacity a HashMap needs for 100 entries (it never needs to grow past that).
        let bound =
            HashMap::<crypto::ChunkId, pack::ChunkLocation>::with_capacity(100 + 7).capacity();
        let mut most = 0;
        for (k, run) in img.chunks(7 * BS).enumerate() {
            w.add_run((k * 7) as u64, run, true).unwrap();
            let (len, cap) = w.pending_size();
            assert!(len < 100, "{len} pending after run {k}");
            assert!(cap <= bound, "capacity {cap} > {bound} after run {k}");
            most = most.max(len);
        }
        assert!(most > 50, "{most}: the test never filled the map");
        let objects = LocalStore::new(&root)
            .list(chunkindex::CINDEX_PREFIX)
            .unwrap();
        // The writer flushes after the batch that brings 100 or more: at 105 and 210 here.
        assert_eq!(objects.len(), 2, "300 distinct chunks in flushes of 105");
        let m = w.commit().unwrap();
        drop(lock);
        assert_eq!(
            LocalStore::new(&root)
                .list(chunkindex::CINDEX_PREFIX)
                .unwrap()
                .len(),
            3,
            "the last 90 flushed at commit"
        );
        assert_eq!(m.stats.new_chunks, 300);
        let fresh = testing::open(&root);
        assert_eq!(fresh.chunk_index().unwrap().len(), 300);
        assert!(read_point(&fresh, VDI_A, 0, 0) == img);
        // The real bound's map: at most ~16 MiB (2^18 buckets of a 56-byte entry + 1 control
        // byte), whatever the disk's size.
        let full =
            HashMap::<crypto::ChunkId, pack::ChunkLocation>::with_capacity(writer::FLUSH_PENDING);
        assert!(full.capacity() * 57 <= 16 << 20, "{}", full.capacity());
    }
}
