//! The repository: every disk's backup history on storage, and the only code that knows its format.
//!
//! # Layout (format version 1)
//!
//! ```text
//! REPO/
//!   cbtfs.repo                          repository header (record, see below)
//!   lock                                writers hold an exclusive lock on it
//!   disks/<VDI-UUID>/<SET>/             one directory per incremental set, named by its base time
//!       000000.point                    the base's manifest: the commit record
//!       000000-<nonce>.idx              its index (see `index`)
//!       000000-<nonce>.data             its block data
//!       000001.point ...                incremental points, numbered from the base
//!   journal/<VDI-UUID>.{1,2}.snap       what a backup is snapshotting right now (see `journal`)
//!   hosts/<HOST>.pin                    pinned TLS certificate fingerprints of hosts
//! ```
//!
//! * A **disk** is a VDI, keyed by uuid. Its name, virtual size and owning VM are recorded in each
//!   point's manifest (as they were at that snapshot); the newest point's values name the disk.
//! * A **set** starts with a full base and grows by incremental points while CBT stays enabled on
//!   the host. Its directory name is the base's time in ISO 8601 basic form (`20261121T020000Z`).
//!   The newest set is the one with the greatest name; only it grows.
//! * A **point** is three objects: a data file (the stored blocks, 64 KiB each, concatenated in
//!   ascending block order; written once, never modified), an index (bitmaps of the blocks the
//!   point holds and of those that are stored, and per stored block its offset, length and
//!   CRC-32C), and a manifest (a checksummed JSON record naming the other two, with the point's
//!   time, virtual size, disk and VM). Every point, the base included, is stored this way. A block
//!   in the point's `changed` bitmap but not in `data` was all zeros: recorded, not stored.
//!
//! # Commit and crash safety
//!
//! Data and index objects get fresh names (a random nonce) and are made durable (fsync) first; the
//! point becomes visible only when its manifest `NNNNNN.point` is put — written to a temporary
//! name, fsynced, hard-linked into place (link never replaces: a commit cannot overwrite another)
//! and the directory fsynced. A crash at any moment leaves either no manifest (the orphaned data
//! and index are deleted by the next writer, under the lock) or a complete point. Readers never
//! look at objects no manifest names. On an S3-compatible store the same sequence is: PUT data,
//! PUT index, conditional PUT of the manifest.
//!
//! # Records
//!
//! `cbtfs.repo` and `*.point` are JSON followed by a line `cbtfs-crc32c:XXXXXXXX` (see
//! `manifest`). Each has `format` and `version`; a version newer than this build reads is refused
//! with an "upgrade cbtfs" message, never guessed at. A point manifest is then checked before
//! any field is used (`PointManifest::check`): its `vdi` and `set` must be those of the directory
//! it is in, its object names plain names of the writers' shape (`NNNNNN-<16 hex>.idx`, `.data`,
//! `.vm.tar`: never a `/`, a `..` or a NUL, so nothing outside the set is ever opened), its
//! virtual size within `MAX_VIRTUAL_SIZE`, and its counts consistent (data blocks ≤ changed
//! blocks ≤ the disk's blocks, the data file exactly the stored blocks). Anything else makes
//! the manifest damaged, named with the reason.
//!
//! # Integrity
//!
//! Every stored block carries a CRC-32C checked on every read; manifests and index headers,
//! bitmaps and entries carry their own. Damage fails exactly the affected range (EIO through the
//! mount) and is named by `cbtfs verify`; it never yields wrong bytes.
//!
//! Indexes are memory-mapped. Objects are immutable, so the mapping is safe against cbtfs itself;
//! another process truncating an index while it is mapped would fault the reader (the limit of
//! mapping; repository files are private to their owner).

pub mod chunkindex;
pub mod copy;
pub mod crypto;
pub mod error;
pub mod index;
pub mod journal;
pub mod keys;
pub mod manifest;
pub mod pack;
pub mod store;
pub mod store1;

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

pub use error::{RepoError, Result};
use index::{Entry, Index, IndexWriter};
use store1::{LocalStore, Object, ObjectWriter, Store};

use crate::{BLOCK_SIZE, blocks_for, timefmt};

pub const REPO_FILE: &str = "cbtfs.repo";
pub const REPO_FORMAT: &str = "cbtfs-repository";
pub const REPO_VERSION: u64 = 1;
pub const POINT_FORMAT: &str = "cbtfs-point";
pub const POINT_VERSION: u64 = 1;
const DISKS: &str = "disks";
const LOCK_FILE: &str = "lock";
/// Directories a prune works in, beside the set they replace.
pub(crate) const PRUNE_PREFIX: &str = ".prune-";
/// How long a writer waits for the lock before saying who holds it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Largest disk a point can describe: block numbers are u32 (roaring bitmaps).
pub const MAX_VIRTUAL_SIZE: u64 = (u32::MAX as u64) * BLOCK_SIZE;
/// The largest write a point's data file gets at once (see `PointWriter::append`).
const WRITE_PIECE: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepoHeader {
    pub format: String,
    pub version: u64,
    pub id: String,
    pub created: String,
    pub block_size: u64,
}

/// A point's manifest: its commit record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PointManifest {
    pub format: String,
    pub version: u64,
    pub vdi: String,
    pub disk_name: String,
    pub vm_uuid: Option<String>,
    pub vm_name: Option<String>,
    /// The set (directory) this point belongs to.
    pub set: String,
    /// Position in the set: 0 is the base.
    pub seq: u32,
    /// Snapshot time, Unix seconds (UTC).
    pub time: i64,
    pub virtual_size: u64,
    /// Blocks this point holds (stored or recorded as zero).
    pub changed_blocks: u64,
    /// Blocks whose bytes are stored.
    pub data_blocks: u64,
    pub index: FileRef,
    pub data: FileRef,
    /// Where the point came from (`import:FILE`, `backup:HOST`).
    pub source: String,
    /// The host snapshot (VDI uuid) this point was read from: the next backup's diff origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The VM metadata export (`/export_metadata`, a tar holding ova.xml) saved with the point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_metadata: Option<FileRef>,
    /// The VDI's type on the host (`user`, `system`): a restore creates the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdi_type: Option<String>,
    /// The point's own identity: random, fixed when the point is made and kept by prune, which
    /// renumbers `seq` and may rewrite a point's objects but never changes its bytes. The mount
    /// derives inode numbers and cache keys from it. Absent in older manifests: see `point_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// For a backed-up disk of a VM: the backup run it was taken in and its place in the VM,
    /// what a whole-VM restore needs. Absent in older manifests and for imports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_run: Option<VmRun>,
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileRef {
    pub name: String,
    pub len: u64,
}

impl PointManifest {
    /// The point's identity (`id`), or for a manifest written before ids existed, one derived
    /// from its data object's name (which carries a random nonce and is kept by prune's hard
    /// links; a rewrite records the derived id explicitly).
    pub fn point_id(&self) -> String {
        match &self.id {
            Some(id) => id.clone(),
            None => format!("data:{}", self.data.name),
        }
    }

    /// `VDI@TIME`, how errors and logs name a point.
    pub fn label(&self) -> String {
        format!("{}@{}", self.vdi, timefmt::basic(self.time))
    }

    /// Check what a manifest read from storage claims before anything trusts it: its names
    /// stay inside its set directory (`valid_uuid`, `valid_set_name`, `valid_object_name`), its
    /// size is one the format can describe, and its counts agree with each other. Returns what
    /// is wrong, for a "damaged" report naming the manifest.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !valid_uuid(&self.vdi) {
            return Err(format!("its disk {:?} is not a VDI uuid", self.vdi));
        }
        if !valid_set_name(&self.set) {
            return Err(format!("its set name {:?} is not a set name", self.set));
        }
        let objects = [
            ("index", Some(&self.index), ObjectKind::Index),
            ("data", Some(&self.data), ObjectKind::Data),
            (
                "VM metadata",
                self.vm_metadata.as_ref(),
                ObjectKind::VmMetadata,
            ),
        ];
        for (what, f, kind) in objects {
            if let Some(f) = f
                && !valid_object_name(&f.name, kind)
            {
                return Err(format!(
                    "its {what} object name {:?} is not a plain {} file name of its set",
                    f.name,
                    kind.suffix()
                ));
            }
        }
        if let Some(r) = &self.vm_run {
            r.check()?;
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
        // Both products are below 2^48: blocks fit in u32 (checked above).
        let data_len = self.data_blocks * BLOCK_SIZE;
        if self.data.len != data_len {
            return Err(format!(
                "its data file length {} is not {} stored blocks of 64 KiB",
                self.data.len, self.data_blocks
            ));
        }
        let min_index = (index::HEAD_LEN + index::FOOTER_LEN) as u64
            + self.data_blocks * index::ENTRY_LEN as u64;
        if self.index.len < min_index {
            return Err(format!(
                "its index length {} is too short for {} entries",
                self.index.len, self.data_blocks
            ));
        }
        Ok(())
    }
}

/// The objects a manifest names, each with its own file name suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Index,
    Data,
    VmMetadata,
}

impl ObjectKind {
    pub fn suffix(self) -> &'static str {
        match self {
            ObjectKind::Index => ".idx",
            ObjectKind::Data => ".data",
            ObjectKind::VmMetadata => ".vm.tar",
        }
    }
}

/// Is `name` an object name as writers make them: `NNNNNN-<nonce>.<kind>` (6 to 10 decimal
/// digits, a dash, 16 lowercase hex digits, the kind's suffix)? Anything else, and above all
/// anything with `/`, `..` or NUL, would let a manifest name a file outside its set.
pub fn valid_object_name(name: &str, kind: ObjectKind) -> bool {
    let Some(stem) = name.strip_suffix(kind.suffix()) else {
        return false;
    };
    let Some((seq, nonce)) = stem.split_once('-') else {
        return false;
    };
    (6..=10).contains(&seq.len())
        && seq.bytes().all(|c| c.is_ascii_digit())
        && nonce.len() == 16
        && nonce
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// Is `name` a set directory name as writers make them (`20261121T020000Z`, maybe `-N`): plain
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

/// Decode a point manifest and check it (`PointManifest::check`): what every reader of a
/// `*.point` file goes through. `location` names the file in errors.
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
    /// Points 0..n with no gap. Points after a damaged or missing one are not listed here (they
    /// cannot be resolved) but named in `problems`.
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

/// An opened point: its manifest, checked index and data file.
pub struct StoredPoint {
    pub manifest: PointManifest,
    pub index: Index,
    /// Where the data file is, for error messages.
    pub data_location: String,
    data_key: String,
    store: Arc<LocalStore>,
    /// Opened on first read: a set of 1,000 points must not hold 1,000 descriptors per reader.
    data: std::sync::OnceLock<Arc<dyn Object>>,
}

impl StoredPoint {
    /// The point's data file, opened on first use.
    pub fn data(&self) -> io::Result<&Arc<dyn Object>> {
        if let Some(d) = self.data.get() {
            return Ok(d);
        }
        let d = self.store.open(&self.data_key)?;
        Ok(self.data.get_or_init(|| d))
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

/// Parsed manifests by key, with the bytes they were parsed from.
type ManifestCache = HashMap<String, (Vec<u8>, PointManifest)>;

/// An open repository.
#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
    store: Arc<LocalStore>,
    pub header: RepoHeader,
    /// Parsed manifests by key, with the bytes they were parsed from: a mount rescanning the
    /// repository parses only new ones. Keyed by content, not by file identity: a prune
    /// deletes manifests and the next commit at the same path may get the freed inode number
    /// (ext4 reuses them at once) and the same length, yet say something else.
    manifests: Arc<std::sync::Mutex<ManifestCache>>,
}

/// Is `s` a plausible VDI uuid (it becomes a directory name, so nothing else is accepted)?
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

pub(crate) fn set_key(vdi: &str, set: &str) -> String {
    format!("{DISKS}/{vdi}/{set}")
}

impl Repository {
    /// Create a repository in `path` (a new or empty directory).
    pub fn init(path: &Path) -> Result<Repository> {
        let loc = path.display().to_string();
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
                std::fs::DirBuilder::new()
                    .mode_private()
                    .create(path)
                    .map_err(|e| RepoError::io("create directory", &loc, e))?;
            }
            Err(e) => return Err(RepoError::io("read directory", &loc, e)),
        }
        // The repository directory itself is private: it holds whole disks.
        set_private(path).map_err(|e| RepoError::io("set permissions of", &loc, e))?;
        // Its own entry must survive power loss, or the whole repository could vanish.
        store1::sync_parent(path)
            .map_err(|e| RepoError::io("sync the directory holding", &loc, e))?;
        let store = LocalStore::new(path);
        store
            .make_dir(DISKS)
            .map_err(|e| RepoError::io("create", store.describe(DISKS), e))?;
        let header = RepoHeader {
            format: REPO_FORMAT.into(),
            version: REPO_VERSION,
            id: random_hex(16)?,
            created: timefmt::rfc3339(timefmt::now()),
            block_size: BLOCK_SIZE,
        };
        store
            .put_new(REPO_FILE, &manifest::encode(&header))
            .map_err(|e| RepoError::io("write", store.describe(REPO_FILE), e))?;
        Repository::open(path)
    }

    /// Open an existing repository, checking its header.
    pub fn open(path: &Path) -> Result<Repository> {
        let store = LocalStore::new(path);
        let loc = store.describe(REPO_FILE);
        if let Some(why) = not_a_repository(path) {
            return Err(RepoError::NotARepository {
                path: path.to_path_buf(),
                why,
            });
        }
        let bytes = match std::fs::read(path.join(REPO_FILE)) {
            Ok(b) => b,
            // Removed between the look and the read.
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
            manifest::decode(&bytes, &loc, "repository", REPO_FORMAT, REPO_VERSION)?;
        if header.block_size != BLOCK_SIZE {
            return Err(RepoError::corrupt(
                loc,
                format!("block size {} is not 65536", header.block_size),
            ));
        }
        Ok(Repository {
            root: path.to_path_buf(),
            store: Arc::new(store),
            header,
            manifests: Default::default(),
        })
    }

    /// Read block runs past the page cache from now on (see `LocalStore::with_direct_reads`).
    pub fn with_direct_reads(mut self) -> Self {
        self.store = Arc::new((*self.store).clone().with_direct_reads());
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// The uuids of all disks with a directory in the repository.
    pub fn disk_ids(&self) -> Result<Vec<String>> {
        let names = self
            .store
            .list(DISKS)
            .map_err(|e| RepoError::io("list", self.store.describe(DISKS), e))?;
        Ok(names.into_iter().filter(|n| valid_uuid(n)).collect())
    }

    /// Every disk's history (manifests only: cheap).
    pub fn catalog(&self) -> Result<Vec<DiskHistory>> {
        let mut disks = Vec::new();
        for vdi in self.disk_ids()? {
            let d = self.disk(&vdi)?;
            if !d.sets.is_empty() {
                disks.push(d);
            }
        }
        Ok(disks)
    }

    /// One disk's history. A disk without committed points has no sets.
    pub fn disk(&self, vdi: &str) -> Result<DiskHistory> {
        let key = format!("{DISKS}/{vdi}");
        let set_names = match self.store.list(&key) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(RepoError::io("list", self.store.describe(&key), e)),
        };
        let mut sets = Vec::new();
        for set in set_names {
            if set.starts_with('.') {
                continue;
            }
            let s = self.load_set(vdi, &set)?;
            if !s.points.is_empty() || !s.problems.is_empty() {
                sets.push(s);
            }
        }
        Ok(DiskHistory {
            vdi: vdi.to_string(),
            sets,
        })
    }

    fn load_set(&self, vdi: &str, set: &str) -> Result<SetHistory> {
        let key = set_key(vdi, set);
        let names = self
            .store
            .list(&key)
            .map_err(|e| RepoError::io("list", self.store.describe(&key), e))?;
        let mut found: Vec<(u32, std::result::Result<PointManifest, RepoError>, String)> =
            Vec::new();
        for name in &names {
            let Some(stem) = name.strip_suffix(".point") else {
                continue;
            };
            let Ok(seq) = stem.parse::<u32>() else {
                continue;
            };
            let k = format!("{key}/{name}");
            let loc = self.store.describe(&k);
            let bytes = match std::fs::read(self.store.path(&k)) {
                Ok(b) => b,
                Err(e) => {
                    found.push((seq, Err(RepoError::io("read", &loc, e)), loc));
                    continue;
                }
            };
            let cached = self.manifests.lock().ok().and_then(|cache| {
                cache
                    .get(&k)
                    .filter(|(raw, _)| *raw == bytes)
                    .map(|(_, m)| m.clone())
            });
            if let Some(m) = cached {
                found.push((seq, Ok(m), loc));
                continue;
            }
            let parsed = decode_point_manifest(&bytes, &loc).and_then(|m| {
                if m.seq != seq || m.vdi != vdi || m.set != set {
                    Err(RepoError::corrupt(
                        &loc,
                        format!(
                            "manifest describes {}/{}/{} but is stored as {vdi}/{set}/{seq}",
                            m.vdi, m.set, m.seq
                        ),
                    ))
                } else {
                    Ok(m)
                }
            });
            if let (Ok(m), Ok(mut cache)) = (&parsed, self.manifests.lock()) {
                cache.insert(k.clone(), (bytes, m.clone()));
            }
            found.push((seq, parsed, loc));
        }
        found.sort_by_key(|(s, _, _)| *s);
        let mut points: Vec<PointManifest> = Vec::new();
        let mut problems = Vec::new();
        let mut broken = false;
        for (seq, parsed, loc) in found {
            if broken {
                problems.push(SetProblem {
                    location: loc,
                    message: "unreadable: an earlier point of its set is damaged or missing".into(),
                });
                continue;
            }
            if seq as usize != points.len() {
                problems.push(SetProblem {
                    location: self
                        .store
                        .describe(&format!("{key}/{:06}.point", points.len())),
                    message: format!(
                        "missing: points {}..{} are absent, so later points cannot be read",
                        points.len(),
                        seq
                    ),
                });
                broken = true;
                problems.push(SetProblem {
                    location: loc,
                    message: "unreadable: an earlier point of its set is damaged or missing".into(),
                });
                continue;
            }
            match parsed {
                Ok(m) => {
                    if let Some(prev) = points.last()
                        && m.time <= prev.time
                    {
                        problems.push(SetProblem {
                            location: loc,
                            message: "damaged: its time is not after the previous point's".into(),
                        });
                        broken = true;
                        continue;
                    }
                    points.push(m)
                }
                Err(e) => {
                    problems.push(SetProblem {
                        location: loc,
                        message: e.to_string(),
                    });
                    broken = true;
                }
            }
        }
        Ok(SetHistory {
            vdi: vdi.to_string(),
            id: set.to_string(),
            points,
            problems,
        })
    }

    /// Write a point's manifest into directory `dir` (a prune's rebuilt set).
    pub(crate) fn put_manifest(&self, dir: &str, m: &PointManifest) -> Result<()> {
        let k = format!("{dir}/{:06}.point", m.seq);
        self.store
            .put_new(&k, &manifest::encode(m))
            .map_err(|e| RepoError::io("commit", self.store.describe(&k), e))
    }

    /// Make an empty work directory for a prune of `vdi`'s set `set`; returns its key.
    pub(crate) fn prune_dir(&self, _lock: &WriteLock, vdi: &str, set: &str) -> Result<String> {
        let key = set_key(vdi, &format!("{PRUNE_PREFIX}{set}-{}", random_hex(4)?));
        self.store
            .make_dir(&key)
            .map_err(|e| RepoError::io("create", self.store.describe(&key), e))?;
        Ok(key)
    }

    /// Hard-link object `name` of set directory `from` into directory `to` (an unchanged point
    /// a prune keeps costs no copy).
    pub(crate) fn link_object(&self, from: &str, to: &str, name: &str) -> Result<()> {
        let (a, b) = (format!("{from}/{name}"), format!("{to}/{name}"));
        std::fs::hard_link(self.store.path(&a), self.store.path(&b))
            .map_err(|e| RepoError::io("link", self.store.describe(&b), e))
    }

    /// Atomically swap the set directory `vdi/set` with the directory `other` (a prune's
    /// result): readers see the old set or the new one, never a mix of files. Afterwards
    /// `other` holds the old set.
    pub(crate) fn exchange_set(
        &self,
        _lock: &WriteLock,
        vdi: &str,
        set: &str,
        other: &str,
    ) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let a = self.store.path(&set_key(vdi, set));
        let b = self.store.path(other);
        store1::sync_dir(&b).map_err(|e| RepoError::io("sync", self.store.describe(other), e))?;
        let ca = std::ffi::CString::new(a.as_os_str().as_bytes())
            .map_err(|_| RepoError::Invalid("path with a NUL byte".into()))?;
        let cb = std::ffi::CString::new(b.as_os_str().as_bytes())
            .map_err(|_| RepoError::Invalid("path with a NUL byte".into()))?;
        // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc != 0 {
            return Err(RepoError::io(
                "swap",
                self.store.describe(&set_key(vdi, set)),
                io::Error::last_os_error(),
            ));
        }
        let parent = self.store.path(&format!("{DISKS}/{vdi}"));
        store1::sync_dir(&parent)
            .map_err(|e| RepoError::io("sync", parent.display().to_string(), e))
    }

    /// Move set `vdi/set` aside into a prune directory (removing a whole set atomically);
    /// returns the key it now has.
    pub(crate) fn retire_set(&self, _lock: &WriteLock, vdi: &str, set: &str) -> Result<String> {
        let to = set_key(vdi, &format!("{PRUNE_PREFIX}{set}-{}", random_hex(4)?));
        let from = set_key(vdi, set);
        std::fs::rename(self.store.path(&from), self.store.path(&to))
            .map_err(|e| RepoError::io("move", self.store.describe(&from), e))?;
        let parent = self.store.path(&format!("{DISKS}/{vdi}"));
        store1::sync_dir(&parent)
            .map_err(|e| RepoError::io("sync", parent.display().to_string(), e))?;
        Ok(to)
    }

    /// Delete a prune directory and everything in it.
    pub(crate) fn remove_tree(&self, key: &str) -> Result<()> {
        std::fs::remove_dir_all(self.store.path(key))
            .map_err(|e| RepoError::io("delete", self.store.describe(key), e))
    }

    /// The VM metadata export saved with a point, if any (its length checked).
    pub fn read_vm_metadata(&self, m: &PointManifest) -> Result<Option<Vec<u8>>> {
        let Some(f) = &m.vm_metadata else {
            return Ok(None);
        };
        let key = self.object_key(m, f, ObjectKind::VmMetadata)?;
        let bytes = std::fs::read(self.store.path(&key))
            .map_err(|e| RepoError::io("read", self.store.describe(&key), e))?;
        if bytes.len() as u64 != f.len {
            return Err(RepoError::Corrupt {
                location: self.store.describe(&key),
                detail: format!(
                    "the VM metadata is {} bytes, its manifest says {}",
                    bytes.len(),
                    f.len
                ),
            });
        }
        Ok(Some(bytes))
    }

    /// The key of an object `m` names, refused (the manifest is damaged) unless the manifest
    /// passes `PointManifest::check`: a name from storage never leads outside its set.
    fn object_key(&self, m: &PointManifest, f: &FileRef, kind: ObjectKind) -> Result<String> {
        let key = set_key(&m.vdi, &m.set);
        if let Err(detail) = m.check() {
            return Err(RepoError::corrupt(
                self.store.describe(&format!("{key}/{:06}.point", m.seq)),
                detail,
            ));
        }
        if !valid_object_name(&f.name, kind) {
            return Err(RepoError::corrupt(
                self.store.describe(&format!("{key}/{:06}.point", m.seq)),
                format!(
                    "object name {:?} is not a plain file name of its set",
                    f.name
                ),
            ));
        }
        Ok(format!("{key}/{}", f.name))
    }

    /// Open one point's index and data.
    pub fn open_point(&self, m: &PointManifest) -> Result<StoredPoint> {
        let ik = self.object_key(m, &m.index, ObjectKind::Index)?;
        let iloc = self.store.describe(&ik);
        let map = self
            .store
            .map(&ik)
            .map_err(|e| RepoError::io("open index", &iloc, e))?;
        if map.len() as u64 != m.index.len {
            return Err(RepoError::corrupt(
                &iloc,
                format!(
                    "index is {} bytes, its manifest says {} (truncated or replaced)",
                    map.len(),
                    m.index.len
                ),
            ));
        }
        let index = Index::parse(map, &iloc)?;
        if index.virtual_size != m.virtual_size
            || index.changed.len() != m.changed_blocks
            || index.data.len() != m.data_blocks
        {
            return Err(RepoError::corrupt(
                &iloc,
                "index does not match its manifest (sizes or block counts differ)",
            ));
        }
        let data_key = self.object_key(m, &m.data, ObjectKind::Data)?;
        // A short or missing data file is not fatal here: the blocks it lacks fail when read.
        Ok(StoredPoint {
            manifest: m.clone(),
            index,
            data_location: self.store.describe(&data_key),
            data_key,
            store: self.store.clone(),
            data: std::sync::OnceLock::new(),
        })
    }

    /// Take the writer lock (one writer at a time; readers never lock).
    pub fn lock(&self, holder: &str) -> Result<WriteLock> {
        let path = self.root.join(LOCK_FILE);
        let loc = path.display().to_string();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(store1::FILE_MODE)
            .open(&path)
            .map_err(|e| RepoError::io("open lock file", &loc, e))?;
        // A lock just released can stay held for a moment by a forked child that has not yet
        // exec'd (it shares the open file description): wait briefly before giving up.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let mut locked = f.try_lock();
        while matches!(locked, Err(std::fs::TryLockError::WouldBlock))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
            locked = f.try_lock();
        }
        match locked {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut who = String::new();
                let _ = f.read_to_string(&mut who);
                let who = who.trim();
                return Err(RepoError::Locked {
                    path: self.root.clone(),
                    holder: if who.is_empty() {
                        "unknown holder".into()
                    } else {
                        who.to_string()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(RepoError::io("lock", &loc, e));
            }
        }
        let info = format!(
            "pid {} ({holder}) since {}",
            std::process::id(),
            timefmt::rfc3339(timefmt::now())
        );
        let _ = f.set_len(0);
        let _ = f.rewind();
        let _ = f.write_all(info.as_bytes());
        Ok(WriteLock { _file: f })
    }

    /// Delete what a crashed writer left in `vdi`'s sets: temporary files, data and index
    /// objects no manifest names, and set directories without points. Needs the lock.
    pub fn clean_orphans(&self, _lock: &WriteLock, vdi: &str) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let dkey = format!("{DISKS}/{vdi}");
        let sets = match self.store.list(&dkey) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(RepoError::io("list", self.store.describe(&dkey), e)),
        };
        for set in sets {
            if set.starts_with(PRUNE_PREFIX) {
                // A prune's work directory (the set it was building, or the old set it had
                // swapped out): the prune died before removing it.
                let k = set_key(vdi, &set);
                std::fs::remove_dir_all(self.store.path(&k))
                    .map_err(|e| RepoError::io("delete", self.store.describe(&k), e))?;
                removed.push(self.store.describe(&k));
                continue;
            }
            let key = set_key(vdi, &set);
            let names = self
                .store
                .list(&key)
                .map_err(|e| RepoError::io("list", self.store.describe(&key), e))?;
            let mut referenced = BTreeSet::new();
            let mut has_manifest = false;
            for n in names.iter().filter(|n| n.ends_with(".point")) {
                has_manifest = true;
                // A manifest we cannot read keeps the objects its name prefix may own.
                let prefix = n.trim_end_matches(".point").to_string();
                match std::fs::read(self.store.path(&format!("{key}/{n}")))
                    .ok()
                    .and_then(|b| {
                        manifest::decode::<PointManifest>(
                            &b,
                            "",
                            "point manifest",
                            POINT_FORMAT,
                            u64::MAX,
                        )
                        .ok()
                    }) {
                    Some(m) => {
                        referenced.insert(m.index.name);
                        referenced.insert(m.data.name);
                        if let Some(v) = m.vm_metadata {
                            referenced.insert(v.name);
                        }
                    }
                    None => {
                        referenced.insert(format!("{prefix}-*"));
                    }
                }
            }
            for n in &names {
                let orphan_obj =
                    (n.ends_with(".data") || n.ends_with(".idx") || n.ends_with(".vm.tar"))
                        && !referenced.contains(n)
                        && !n
                            .split_once('-')
                            .is_some_and(|(p, _)| referenced.contains(&format!("{p}-*")));
                let tmp = n.starts_with('.') && n.ends_with(".tmp");
                if orphan_obj || tmp {
                    let k = format!("{key}/{n}");
                    self.store
                        .delete(&k)
                        .map_err(|e| RepoError::io("delete", self.store.describe(&k), e))?;
                    removed.push(self.store.describe(&k));
                }
            }
            if !has_manifest {
                let rest = self.store.list(&key).unwrap_or_default();
                if rest.is_empty() && self.store.remove_dir(&key).is_ok() {
                    removed.push(self.store.describe(&key));
                }
            }
        }
        Ok(removed)
    }

    /// Start writing a point. Decides its set and sequence number and checks its time.
    pub fn begin_point<'l>(&self, lock: &'l WriteLock, spec: NewPoint) -> Result<PointWriter<'l>> {
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
        self.clean_orphans(lock, &spec.vdi)?;
        let disk = self.disk(&spec.vdi)?;
        let newest_time = disk.newest().map(|p| p.time);
        let (set, seq, previous) = if spec.new_set {
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
            let mut n = 1;
            while disk.sets.iter().any(|s| s.id == set)
                || self.store.path(&set_key(&spec.vdi, &set)).exists()
            {
                n += 1;
                set = format!("{}-{n}", timefmt::basic(spec.time));
            }
            (set, 0u32, None)
        } else {
            let Some(last_set) = disk.sets.last() else {
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
            let seq = u32::try_from(last_set.points.len()).map_err(|_| {
                RepoError::Invalid(format!(
                    "set {} of disk {} is full ({} points); start a new set with a full image",
                    last_set.id,
                    spec.vdi,
                    last_set.points.len()
                ))
            })?;
            (last_set.id.clone(), seq, prev)
        };
        let key = set_key(&spec.vdi, &set);
        let dkey = format!("{DISKS}/{}", spec.vdi);
        self.store
            .make_dir(&dkey)
            .and_then(|_| self.store.make_dir(&key))
            .map_err(|e| RepoError::io("create", self.store.describe(&key), e))?;
        self.writer_at(lock, key, set, seq, previous, spec)
    }

    /// A writer for point `seq` of set `set` whose files go in the directory `key` (the set's
    /// own, or a directory a prune builds before swapping it in).
    pub(crate) fn writer_at<'l>(
        &self,
        lock: &'l WriteLock,
        key: String,
        set: String,
        seq: u32,
        previous: Option<PointManifest>,
        spec: NewPoint,
    ) -> Result<PointWriter<'l>> {
        let nonce = random_hex(8)?;
        let data_name = format!("{seq:06}-{nonce}.data");
        let index_name = format!("{seq:06}-{nonce}.idx");
        let dk = format!("{key}/{data_name}");
        let ik = format!("{key}/{index_name}");
        let data = self
            .store
            .create(&dk)
            .map_err(|e| RepoError::io("create", self.store.describe(&dk), e))?;
        let mut w = PointWriter {
            store: self.store.clone(),
            _lock: lock,
            set_key: key,
            spec,
            set,
            seq,
            previous,
            data_name,
            index_name,
            data: Some(data),
            index: None,
            changed: RoaringBitmap::new(),
            stored: RoaringBitmap::new(),
            data_len: 0,
            next_block: 0,
            committed: false,
            extra: None,
            id: None,
        };
        let iw = w
            .store
            .create(&ik)
            .and_then(IndexWriter::new)
            .map_err(|e| RepoError::io("create", w.store.describe(&ik), e))?;
        w.index = Some(iw);
        Ok(w)
    }
}

trait DirBuilderPrivate {
    fn mode_private(&mut self) -> &mut Self;
}
impl DirBuilderPrivate for std::fs::DirBuilder {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt;
        self.mode(store1::DIR_MODE)
    }
}

fn set_private(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(store1::DIR_MODE))
}

/// The writer lock; released when dropped (or when the process dies).
pub struct WriteLock {
    _file: File,
}

/// Writes one point; blocks must come in ascending order. Dropped without `commit`, it deletes
/// what it wrote: nothing becomes visible.
pub struct PointWriter<'l> {
    store: Arc<LocalStore>,
    _lock: &'l WriteLock,
    set_key: String,
    spec: NewPoint,
    set: String,
    seq: u32,
    previous: Option<PointManifest>,
    data_name: String,
    index_name: String,
    data: Option<Box<dyn ObjectWriter>>,
    index: Option<IndexWriter>,
    changed: RoaringBitmap,
    stored: RoaringBitmap,
    data_len: u64,
    next_block: u64,
    committed: bool,
    /// The VM metadata object, once written.
    extra: Option<String>,
    /// The identity to record (prune keeps a rewritten point's); None: a new random one.
    id: Option<String>,
}

impl PointWriter<'_> {
    /// The point this one follows in its set (None for a base).
    pub fn previous(&self) -> Option<&PointManifest> {
        self.previous.as_ref()
    }

    pub fn set(&self) -> &str {
        &self.set
    }

    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// Record `id` as the point's identity instead of a new one (prune rewriting a point).
    pub(crate) fn keep_id(&mut self, id: String) {
        self.id = Some(id);
    }

    fn data_loc(&self) -> String {
        self.store
            .describe(&format!("{}/{}", self.set_key, self.data_name))
    }

    /// Check that `block` comes after every block added so far and lies on the disk.
    fn next(&mut self, block: u64, len: usize) -> Result<()> {
        let blocks = blocks_for(self.spec.virtual_size);
        if block < self.next_block || block >= blocks || len as u64 > BLOCK_SIZE {
            return Err(RepoError::Invalid(format!(
                "internal: block {block} out of order or outside the disk ({blocks} blocks)"
            )));
        }
        let b32 = u32::try_from(block).map_err(|_| {
            RepoError::Invalid(format!(
                "internal: block {block} beyond the format's 32-bit block numbers"
            ))
        })?;
        self.next_block = block + 1;
        self.changed.insert(b32);
        Ok(())
    }

    /// Index a stored block whose bytes are (or are about to be) appended at `data_len`.
    fn record(&mut self, block: u64, crc: u32) -> Result<()> {
        let entry = Entry {
            offset: self.data_len,
            len: BLOCK_SIZE as u32,
            crc,
        };
        let b32 = u32::try_from(block)
            .map_err(|_| RepoError::Invalid(format!("internal: block {block} beyond u32")))?;
        self.data_len += BLOCK_SIZE;
        self.stored.insert(b32);
        let iloc = self
            .store
            .describe(&format!("{}/{}", self.set_key, self.index_name));
        self.index
            .as_mut()
            .ok_or_else(|| RepoError::Invalid("internal: point already finished".into()))?
            .push(entry)
            .map_err(|e| RepoError::io("write", iloc, e))
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let loc = self.data_loc();
        let data = self
            .data
            .as_mut()
            .ok_or_else(|| RepoError::Invalid("internal: point already finished".into()))?;
        // A run of blocks goes to the file at most 1 MiB per write: measured on a 1 GiB
        // import, 4 MiB writes into the page cache were throttled to several times the time of
        // the same bytes in 1 MiB writes.
        for piece in bytes.chunks(WRITE_PIECE) {
            data.write_all(piece)
                .map_err(|e| RepoError::io("write", &loc, e))?;
        }
        Ok(())
    }

    /// Add block `block` with `bytes` (64 KiB, or less for the disk's last block: zero-padded).
    /// An all-zero block is recorded in the bitmap but not stored.
    pub fn add_block(&mut self, block: u64, bytes: &[u8]) -> Result<()> {
        self.next(block, bytes.len())?;
        if crate::is_zero(bytes) {
            return Ok(());
        }
        let pad = vec![0u8; BLOCK_SIZE as usize - bytes.len()];
        let crc = crc32c::crc32c_append(crc32c::crc32c(bytes), &pad);
        self.append(bytes)?;
        self.append(&pad)?;
        self.record(block, crc)
    }

    /// Add the consecutive blocks from `first` held back to back in `bytes` (only the disk's
    /// last block may be short). All-zero blocks are recorded when `record_zeros` (a base or a
    /// CBT-marked block), else skipped. The same as `add_block` for each, but runs of stored
    /// blocks go to the data file in one write, with no copy through a buffer.
    pub fn add_run(&mut self, first: u64, bytes: &[u8], record_zeros: bool) -> Result<()> {
        let bs = BLOCK_SIZE as usize;
        let mut pending: Option<(usize, usize)> = None;
        for (k, b) in bytes.chunks(bs).enumerate() {
            let block = first + k as u64;
            let zero = crate::is_zero(b);
            if b.len() < bs || zero {
                if let Some((s, e)) = pending.take() {
                    self.append(&bytes[s..e])?;
                }
                if b.len() < bs && !zero {
                    self.add_block(block, b)?;
                } else if record_zeros {
                    self.next(block, b.len())?;
                }
                continue;
            }
            self.next(block, bs)?;
            self.record(block, crc32c::crc32c(b))?;
            let at = k * bs;
            pending = match pending {
                Some((s, e)) if e == at => Some((s, at + bs)),
                Some((s, e)) => {
                    self.append(&bytes[s..e])?;
                    Some((at, at + bs))
                }
                None => Some((at, at + bs)),
            };
        }
        if let Some((s, e)) = pending {
            self.append(&bytes[s..e])?;
        }
        Ok(())
    }

    /// Make the point durable and visible. Returns its manifest.
    pub fn commit(mut self) -> Result<PointManifest> {
        let dloc = self.data_loc();
        let iloc = self
            .store
            .describe(&format!("{}/{}", self.set_key, self.index_name));
        let data = self
            .data
            .take()
            .ok_or_else(|| RepoError::Invalid("internal: point already finished".into()))?;
        let data_len = data
            .finish()
            .map_err(|e| RepoError::io("write", &dloc, e))?;
        let index = self
            .index
            .take()
            .ok_or_else(|| RepoError::Invalid("internal: point already finished".into()))?;
        let index_len = index
            .finish(self.spec.virtual_size, &self.changed, &self.stored)
            .map_err(|e| RepoError::io("write", &iloc, e))?;
        let mut m = PointManifest {
            format: POINT_FORMAT.into(),
            version: POINT_VERSION,
            vdi: self.spec.vdi.clone(),
            disk_name: self.spec.disk_name.clone(),
            vm_uuid: self.spec.vm_uuid.clone(),
            vm_name: self.spec.vm_name.clone(),
            set: self.set.clone(),
            seq: self.seq,
            time: self.spec.time,
            virtual_size: self.spec.virtual_size,
            changed_blocks: self.changed.len(),
            data_blocks: self.stored.len(),
            index: FileRef {
                name: self.index_name.clone(),
                len: index_len,
            },
            data: FileRef {
                name: self.data_name.clone(),
                len: data_len,
            },
            source: self.spec.source.clone(),
            snapshot: self.spec.snapshot.clone(),
            vm_metadata: None,
            vdi_type: self.spec.vdi_type.clone(),
            vm_run: self.spec.vm_run.clone(),
            id: Some(match self.id.take() {
                Some(id) => id,
                None => random_hex(16)?,
            }),
        };
        let vm_metadata = match &self.spec.vm_metadata {
            Some(bytes) => {
                let name = self.data_name.replace(".data", ".vm.tar");
                let k = format!("{}/{}", self.set_key, name);
                self.store
                    .put_new(&k, bytes)
                    .map_err(|e| RepoError::io("write", self.store.describe(&k), e))?;
                self.extra = Some(name.clone());
                Some(FileRef {
                    name,
                    len: bytes.len() as u64,
                })
            }
            None => None,
        };
        m.vm_metadata = vm_metadata;
        let mk = format!("{}/{:06}.point", self.set_key, self.seq);
        self.store
            .put_new(&mk, &manifest::encode(&m))
            .map_err(|e| RepoError::io("commit", self.store.describe(&mk), e))?;
        self.committed = true;
        tracing::info!(point = %m.label(), set = %m.set, seq = m.seq, "committed");
        Ok(m)
    }
}

impl Drop for PointWriter<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        self.data.take();
        self.index.take();
        for name in [
            Some(&self.data_name),
            Some(&self.index_name),
            self.extra.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = self.store.delete(&format!("{}/{}", self.set_key, name));
        }
        if self.seq == 0 {
            let _ = self.store.remove_dir(&self.set_key);
        }
    }
}

/// Why `path` is not a repository at all, or `None` when it may be one (a directory holding a
/// `cbtfs.repo` entry, or a path that cannot be examined: the read then says why).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn point_with(blocks: &[(u64, Vec<u8>)], size: u64, by_run: bool) -> (Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("r")).unwrap();
        let lock = repo.lock("test").unwrap();
        let mut w = repo
            .begin_point(
                &lock,
                NewPoint {
                    vdi: "00000000-0000-4000-8000-000000000001".into(),
                    disk_name: "d".into(),
                    vm_uuid: None,
                    vm_name: None,
                    time: 1_700_000_000,
                    virtual_size: size,
                    source: "test".into(),
                    new_set: true,
                    snapshot: None,
                    vm_metadata: None,
                    vdi_type: None,
                    vm_run: None,
                },
            )
            .unwrap();
        if by_run {
            // Consecutive blocks in one call, the rest alone.
            let mut i = 0;
            while i < blocks.len() {
                let mut j = i + 1;
                while j < blocks.len() && blocks[j].0 == blocks[j - 1].0 + 1 {
                    j += 1;
                }
                let bytes: Vec<u8> = blocks[i..j].iter().flat_map(|b| b.1.clone()).collect();
                w.add_run(blocks[i].0, &bytes, true).unwrap();
                i = j;
            }
        } else {
            for (b, bytes) in blocks {
                w.add_block(*b, bytes).unwrap();
            }
        }
        let m = w.commit().unwrap();
        let p = repo.open_point(&m).unwrap();
        let obj = p.data().unwrap();
        let mut data = vec![0u8; obj.len() as usize];
        obj.read_exact_at(&mut data, 0).unwrap();
        let mut index: Vec<u8> = (0..p.index.entry_count())
            .flat_map(|i| p.index.entry(i).unwrap().encode())
            .collect();
        let bits = |b: &RoaringBitmap| b.iter().collect::<Vec<u32>>();
        index
            .extend(format!("{:?} {:?}", bits(&p.index.changed), bits(&p.index.data)).into_bytes());
        (data, index)
    }

    const VDI: &str = "00000000-0000-4000-8000-000000000001";

    /// A repository with one committed point (3 blocks stored of a 10-block disk, VM metadata).
    fn one_point() -> (tempfile::TempDir, Repository, PointManifest) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("r")).unwrap();
        let lock = repo.lock("test").unwrap();
        let mut w = repo
            .begin_point(
                &lock,
                NewPoint {
                    vdi: VDI.into(),
                    disk_name: "d".into(),
                    vm_uuid: None,
                    vm_name: None,
                    time: 1_700_000_000,
                    virtual_size: 10 * BLOCK_SIZE,
                    source: "test".into(),
                    new_set: true,
                    snapshot: None,
                    vm_metadata: Some(b"tar".to_vec()),
                    vdi_type: None,
                    vm_run: None,
                },
            )
            .unwrap();
        for b in [1u64, 4, 7] {
            w.add_block(b, &vec![b as u8; BLOCK_SIZE as usize]).unwrap();
        }
        w.add_block(8, &vec![0u8; BLOCK_SIZE as usize]).unwrap();
        let m = w.commit().unwrap();
        drop(lock);
        (dir, repo, m)
    }

    #[test]
    fn check_refuses_escaping_names_and_impossible_sizes() {
        let (_d, _repo, good) = one_point();
        assert_eq!(good.check(), Ok(()));
        assert_eq!((good.changed_blocks, good.data_blocks), (4, 3));
        type Edit = fn(&mut PointManifest);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |m| m.index.name = "../../outside".into(),
                "index object name",
            ),
            (
                |m| m.data.name = "../000000-0123456789abcdef.data".into(),
                "data object name",
            ),
            (|m| m.data.name = "/etc/passwd".into(), "data object name"),
            (
                |m| m.data.name = "000000-0123456789abcdef.data\0".into(),
                "data object name",
            ),
            (
                |m| m.data.name = "000000-0123456789abcdef.idx".into(),
                "data object name",
            ),
            (
                |m| m.index.name = "x/000000-0123456789abcdef.idx".into(),
                "index object name",
            ),
            (|m| m.index.name = String::new(), "index object name"),
            (
                |m| {
                    m.vm_metadata = Some(FileRef {
                        name: "../../../../etc/shadow".into(),
                        len: 3,
                    })
                },
                "VM metadata object name",
            ),
            (|m| m.set = "../other".into(), "set name"),
            (|m| m.set = "..".into(), "set name"),
            (|m| m.set = "a/b".into(), "set name"),
            (|m| m.set = ".prune-x".into(), "set name"),
            (|m| m.vdi = "../../etc".into(), "not a VDI uuid"),
            (|m| m.virtual_size = 1 << 62, "above the format's limit"),
            (
                |m| m.virtual_size = MAX_VIRTUAL_SIZE + 1,
                "above the format's limit",
            ),
            (
                |m| m.changed_blocks = 11,
                "holds 11 blocks but its disk has only 10",
            ),
            (|m| m.data_blocks = 5, "stores 5 blocks but holds only 4"),
            (|m| m.data.len += 1, "data file length"),
            (|m| m.index.len = 60, "index length"),
            (
                |m| m.vm_run = Some(run("../x", Some("0"), &[VDI])),
                "backup run id",
            ),
            (|m| m.vm_run = Some(run("", None, &[])), "backup run id"),
            (
                |m| m.vm_run = Some(run("ab", Some("0/1"), &[VDI])),
                "userdevice",
            ),
            (
                |m| m.vm_run = Some(run("ab", Some("0"), &["../../etc"])),
                "VM's disk",
            ),
        ];
        for (edit, says) in cases {
            let mut m = good.clone();
            edit(&mut m);
            let e = m.check().unwrap_err();
            assert!(e.contains(says), "{e:?} should say {says:?}");
        }
        let mut m = good.clone();
        m.virtual_size = MAX_VIRTUAL_SIZE;
        assert_eq!(m.check(), Ok(()), "the limit itself is a valid size");
        m.vm_run = Some(run("0123456789abcdef", Some("3"), &[VDI]));
        assert_eq!(m.check(), Ok(()));
        // Names as every writer makes them, prune's renumbered points included.
        for n in [
            "000000-0123456789abcdef.data",
            "4294967295-ffffffffffffffff.data",
        ] {
            assert!(valid_object_name(n, ObjectKind::Data), "{n}");
        }
        for n in ["20261121T020000Z", "20261121T020000Z-2", "@-5"] {
            assert!(valid_set_name(n), "{n}");
        }
    }

    fn run(id: &str, dev: Option<&str>, disks: &[&str]) -> VmRun {
        VmRun {
            run: id.into(),
            userdevice: dev.map(String::from),
            vm_disks: disks.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn vm_run_round_trips_and_older_manifests_without_it_still_load() {
        let (_d, _repo, good) = one_point();
        assert_eq!(good.vm_run, None);
        let bytes = manifest::encode(&good);
        assert!(!String::from_utf8_lossy(&bytes).contains("vm_run"));
        assert_eq!(decode_point_manifest(&bytes, "old").unwrap(), good);
        let mut m = good.clone();
        m.vm_run = Some(run("00ff", Some("1"), &[VDI]));
        let back = decode_point_manifest(&manifest::encode(&m), "new").unwrap();
        assert_eq!(back.vm_run, m.vm_run);
        // A hostile vm_run makes the manifest damaged, named.
        m.vm_run = Some(run("00ff", None, &["/etc"]));
        let e = decode_point_manifest(&manifest::encode(&m), "bad")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad") && e.contains("VM's disk"), "{e}");
    }

    /// Rewrite a committed manifest as an attacker could: any fields, a valid checksum.
    fn rewrite(repo: &Repository, m: &PointManifest) {
        let path = repo
            .store()
            .path(&format!("{}/{:06}.point", set_key(&m.vdi, &m.set), m.seq));
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, manifest::encode(m)).unwrap();
    }

    #[test]
    fn a_manifest_naming_a_file_outside_its_set_is_damaged_and_nothing_is_opened() {
        let (d, repo, good) = one_point();
        // Copies of the point's own objects outside the repository: were they followed, the
        // point would read fine.
        let set_dir = repo.store().path(&set_key(VDI, &good.set));
        for (f, to) in [(&good.index, "outside.idx"), (&good.data, "outside.data")] {
            std::fs::copy(set_dir.join(&f.name), d.path().join(to)).unwrap();
        }
        let mut evil = good.clone();
        evil.index.name = "../../../../outside.idx".into();
        evil.data.name = "../../../../outside.data".into();
        assert!(
            set_dir.join(&evil.index.name).exists(),
            "the escape works on disk"
        );
        rewrite(&repo, &evil);
        let disk = repo.disk(VDI).unwrap();
        assert!(disk.sets[0].points.is_empty());
        let p = &disk.sets[0].problems[0];
        assert!(p.location.ends_with("/000000.point"), "{p:?}");
        assert!(
            p.message.contains("damaged") && p.message.contains("\"../../../../outside.idx\""),
            "{p:?}"
        );
        // A manifest that reaches open_point some other way is refused there too.
        let e = repo.open_point(&evil).unwrap_err().to_string();
        assert!(
            e.contains("000000.point is damaged") && e.contains("outside"),
            "{e}"
        );
        let mut evil_vm = good.clone();
        evil_vm.vm_metadata = Some(FileRef {
            name: "../../../../outside.data".into(),
            len: 3,
        });
        let e = repo.read_vm_metadata(&evil_vm).unwrap_err().to_string();
        assert!(e.contains("VM metadata object name"), "{e}");
        // The genuine manifest back: all is well again.
        rewrite(&repo, &good);
        assert_eq!(repo.disk(VDI).unwrap().sets[0].points, vec![good.clone()]);
        assert_eq!(repo.read_vm_metadata(&good).unwrap().unwrap(), b"tar");
    }

    #[test]
    fn a_manifest_beyond_the_format_limits_is_damaged() {
        let (_d, repo, good) = one_point();
        let mut huge = good.clone();
        huge.virtual_size = 1 << 62;
        rewrite(&repo, &huge);
        let disk = repo.disk(VDI).unwrap();
        assert!(disk.sets[0].points.is_empty());
        let msg = &disk.sets[0].problems[0].message;
        assert!(
            msg.contains("virtual size 4611686018427387904 bytes is above the format's limit"),
            "{msg}"
        );
        assert!(repo.open_point(&huge).is_err());
    }

    #[test]
    fn make_dir_accepts_an_existing_directory_not_a_file() {
        // Its parent is synced in both cases: tests/corruption.rs watches the fsyncs.
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store.make_dir("a").unwrap();
        store.make_dir("a").unwrap();
        std::fs::write(dir.path().join("f"), b"").unwrap();
        assert!(store.make_dir("f").is_err());
    }

    #[test]
    fn add_run_stores_what_add_block_stores() {
        let bs = BLOCK_SIZE as usize;
        let size = 9 * BLOCK_SIZE + 1000; // a short last block
        let block = |fill: u8| vec![fill; bs];
        let blocks = vec![
            (0, block(1)),
            (1, block(0)), // zero inside a run: recorded, not stored
            (2, block(2)),
            (3, block(3)),
            (5, block(5)),
            (6, block(0)),
            (7, block(0)),
            (8, block(8)),
            (9, vec![9u8; 1000]),
        ];
        assert_eq!(
            point_with(&blocks, size, true),
            point_with(&blocks, size, false)
        );
    }
}
