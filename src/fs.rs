//! The filesystem's logic: the tree of restore points, attributes, reads. No fuser types here;
//! `fuse` translates. Everything can be exercised without a kernel.
//!
//! ```text
//! /VM/DISK/SET/POINT.raw        one file per restore point (size: the disk at that point)
//! /VM/DISK/SET/latest.raw       -> the set's newest point
//! /VM/DISK/latest.raw           -> SET/POINT.raw, the disk's newest point
//! /by-uuid/VDI_UUID             -> ../VM/DISK (stable paths for scripts)
//! /VM/DISK/SET/POINT.parts/      the volumes inside the point, found when first listed:
//!     p1.raw, p5.raw, VG-LV.raw  partitions and LVM volumes as raw files (`mount -o loop`)
//!     volumes.txt                everything found, with what cannot be read and why
//! ```
//!
//! # Identity
//!
//! A name in the mount never comes to mean other bytes, and neither does an inode number. A
//! point's inode is a hash of its disk and its own id (`PointManifest::point_id`: random, fixed
//! when the point is made, kept by prune), never of its position: a prune renumbers the points
//! of a set (and may rewrite their objects) but a point's bytes, and so its id, stay the same.
//! `POINT.parts/` and the volume files in it derive from the point's inode. Every number given
//! out is remembered with a check hash of the identity it was given to (`Inodes`), so even a
//! hash collision cannot hand one number to two objects while the mount lives. This matters
//! because the kernel keeps a point's pages and attributes per inode number: point files are
//! opened with keep-cache and long attribute TTLs, and nothing ever needs invalidating. (The
//! bodies of `latest.raw` links are not cached by the kernel, FUSE_CACHE_SYMLINKS is not asked
//! for, and directory listings are not cached either, no FOPEN_CACHE_DIR: both are read from
//! the current view each time; their entries and attributes get short TTLs.)
//!
//! Readers are cached by the identity of the whole chain they read (the manifests of points
//! 0..=K of the set), checked on every hit: a rewrite below a point gives it a new reader. Each
//! rescan drops the cached readers, block counts and `POINT.parts/` listings that the new view
//! no longer has. An open file holds its own reader: a point removed from the repository while
//! open keeps reading its own bytes (every layer's data file is opened when the point is), or
//! fails with EIO, never another point's bytes. A point the kernel still knows by name but that a
//! prune removed is ENOENT, logged at debug level only; one still in the repository whose
//! objects cannot be opened is damage: EIO and a warning (`CbtFs::current_reader`).
//!
//! # Freshness
//!
//! The tree is an immutable snapshot rebuilt from the repository's manifests when it may be
//! stale: a lookup that misses (at once), any lookup more than a second after the last scan,
//! and an `opendir` or `readlink` more than `FRESH` after it. So a change in the repository
//! shows in a directory listing taken `FRESH` after the change, at the latest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::BLOCK_SIZE;
use crate::naming::{BY_UUID, Tree, point_name};
use crate::read::{LayerCache, PointReader};
use crate::repo::{Repository, SetHistory};

pub const ROOT_INO: u64 = 1;
/// Snapshots younger than this are not rescanned by `opendir`/`readlink`.
const FRESH: Duration = Duration::from_millis(200);
/// Reads of the catalog tried before a rescan gives up (each retry follows a prune's swap).
/// Open point readers kept after their last handle closes (a chain map and layer references each).
const READER_CACHE: usize = 64;
/// Point indexes fetched together by one step of `set_blocks` (a remote store gets them in
/// parallel); memory: this many indexes of one set at once.
const BLOCKS_BATCH: usize = 64;
pub const POINT_SUFFIX: &str = ".raw";
pub const LATEST: &str = "latest.raw";
/// Beside `POINT.raw`: the directory of the volumes inside it.
pub const PARTS_SUFFIX: &str = ".parts";
pub const VOLUMES_TXT: &str = "volumes.txt";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// What `getattr` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// 512-byte units actually backed by stored data (holes are free).
    pub blocks: u64,
    /// Unix seconds.
    pub mtime: i64,
    pub perm: u16,
    pub nlink: u32,
    /// Restore points never change: the kernel may cache them for long.
    pub immutable: bool,
}

/// One directory entry as `readdir` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
    /// Offset of the next entry (what the kernel passes back to continue).
    pub next_offset: u64,
}

/// Why a filesystem operation failed. Each kind knows its errno (`errno`); the damaged and I/O
/// kinds keep their cause as `source` for the log.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such name or inode, or a restore point no longer in the repository (pruned since the
    /// kernel learned its name).
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("invalid argument")]
    Invalid,
    #[error("bad file handle")]
    BadHandle,
    #[error("no data at or after this offset")]
    NoDataAfter,
    /// A restore point still in the repository whose objects cannot be opened.
    #[error("restore point {point} cannot be opened: {source}")]
    Damaged {
        point: String,
        #[source]
        source: crate::repo::RepoError,
    },
    /// A stored block that cannot be read (the error names the point, block and file).
    #[error(transparent)]
    DamagedBlock(#[from] Box<crate::read::ReadError>),
    /// A volume inside a point whose mapping is inconsistent.
    #[error("volume {volume}: {detail}")]
    DamagedVolume { volume: String, detail: String },
    /// Reading the repository's catalog failed.
    #[error("reading the repository: {source}")]
    Repository {
        #[source]
        source: crate::repo::RepoError,
    },
    /// Prunes kept swapping sets while the catalog was read.
    #[error(
        "the repository's sets changed during each of {tries} reads of it; serving the previous view"
    )]
    Unsettled { tries: usize },
    /// A system call on the repository's filesystem failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl FsError {
    /// The errno for the kernel. No `_` arm: a new variant must decide.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotADirectory => libc::ENOTDIR,
            FsError::IsADirectory => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::Invalid => libc::EINVAL,
            FsError::BadHandle => libc::EBADF,
            FsError::NoDataAfter => libc::ENXIO,
            FsError::Damaged { .. } => libc::EIO,
            FsError::DamagedBlock(_) => libc::EIO,
            FsError::DamagedVolume { .. } => libc::EIO,
            FsError::Repository { .. } => libc::EIO,
            FsError::Unsettled { .. } => libc::EIO,
            FsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// How long the kernel may cache what a lookup or getattr returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttls {
    /// Attributes (size, times, st_blocks).
    pub attr: Duration,
    /// The name → inode entry.
    pub entry: Duration,
}

/// Restore points (and the volume files inside them) never change: their attributes are cached
/// for long, and an inode number never comes to mean another point (see `Identity` above).
pub const TTL_IMMUTABLE: Duration = Duration::from_secs(3600);
/// Directories and `latest.raw` links change as backups land and prunes remove points; names
/// come and go for every kind, so entries are kept only this long (a listing taken `FRESH`
/// after a change shows it; a lookup of a removed name fails within this).
pub const TTL_CHANGING: Duration = Duration::from_secs(1);

/// The TTLs of a node: decided here, applied by `fuse`.
pub fn ttls(attr: &Attr) -> Ttls {
    let attr_ttl = match attr.kind {
        Kind::File if attr.immutable => TTL_IMMUTABLE,
        Kind::File | Kind::Dir | Kind::Symlink => TTL_CHANGING,
    };
    Ttls {
        attr: attr_ttl,
        entry: TTL_CHANGING,
    }
}

/// What `statfs` reports: the figures of the filesystem holding the repository (see
/// `CbtFs::statfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    /// Total, free and available-to-unprivileged blocks, in units of `frsize`.
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    /// Total and free inodes.
    pub files: u64,
    pub ffree: u64,
    /// Preferred I/O size and fragment size (the unit of the block counts).
    pub bsize: u32,
    pub frsize: u32,
    pub namelen: u32,
}

enum NodeData {
    Dir(BTreeMap<String, u64>),
    Point {
        set: Arc<SetHistory>,
        seq: u32,
        /// Hash of the chain the point reads (see `chain_step`): the reader cache's key.
        chain: u64,
    },
    Link(String),
    /// `POINT.parts/`: its entries come from reading the point (`point` is its inode).
    Parts {
        point: u64,
    },
}

/// A file inside a `POINT.parts/` directory.
#[derive(Clone)]
enum VolData {
    Volume(Arc<crate::volumes::Volume>),
    Text(Arc<Vec<u8>>),
}

#[derive(Clone)]
struct VolNode {
    parent: u64,
    point: u64,
    mtime: i64,
    data: VolData,
}

impl VolNode {
    fn size(&self) -> u64 {
        match &self.data {
            VolData::Volume(v) => v.size,
            VolData::Text(t) => t.len() as u64,
        }
    }
}

struct Node {
    parent: u64,
    mtime: i64,
    size: u64,
    data: NodeData,
}

impl Node {
    fn kind(&self) -> Kind {
        match self.data {
            NodeData::Dir(_) | NodeData::Parts { .. } => Kind::Dir,
            NodeData::Point { .. } => Kind::File,
            NodeData::Link(_) => Kind::Symlink,
        }
    }
}

/// An immutable view of the tree.
#[derive(Default)]
struct Snapshot {
    nodes: HashMap<u64, Node>,
}

/// FNV-1a offset basis: inode numbers.
const INO_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// Another basis: the check hash `Inodes` keeps beside each number (an independent hash, so a
/// collision of inode numbers is told apart).
const CHECK_BASIS: u64 = 0x6c62_272e_07bb_0142;
/// Chain hashes start from this basis.
const CHAIN_BASIS: u64 = 0x8422_2325_cbf2_9ce4;

/// FNV-1a of `bytes` continuing from `h`.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The stable inode number of an identity (before `Inodes` settles collisions).
fn ino_of(identity: &str) -> u64 {
    fnv(INO_BASIS, identity.as_bytes()).max(2)
}

/// The chain hash of a point, from the hash of the chain below it (index keys are random and
/// change with every new generation; `PointReader::reads_chain` checks a cache hit exactly
/// anyway).
fn chain_step(below: u64, m: &crate::repo::PointManifest) -> u64 {
    let h = fnv(below, m.index.key.as_bytes());
    let h = fnv(h, b"/");
    let h = fnv(h, m.id.as_bytes());
    fnv(h, &m.seq.to_le_bytes())
}

/// Every inode number this mount has given out, with a check hash of the identity it went to.
/// A number is never given to another identity while the mount lives: on a collision the next
/// free number is taken (the same one every time, since the first owner keeps its number).
#[derive(Default)]
struct Inodes(HashMap<u64, u64>);

impl Inodes {
    /// The number of `identity`, never one `taken` says is in use by something else now.
    fn assign(&mut self, identity: &str, taken: impl Fn(u64) -> bool) -> u64 {
        let check = fnv(CHECK_BASIS, identity.as_bytes());
        let mut ino = ino_of(identity);
        // Ends: the map is finite, and every number it lacks is free.
        loop {
            if ino > ROOT_INO && !taken(ino) {
                match self.0.get(&ino) {
                    None => {
                        self.0.insert(ino, check);
                        return ino;
                    }
                    Some(&c) if c == check => return ino,
                    Some(_) => {}
                }
            }
            ino = ino.wrapping_add(1);
        }
    }
}

impl Snapshot {
    fn build(tree: &Tree, inodes: &mut Inodes) -> Snapshot {
        let mut s = Snapshot::default();
        let mut root = BTreeMap::new();
        let mut by_uuid = BTreeMap::new();
        let by_uuid_ino = s.unique(inodes, "by-uuid");
        let mut newest_all = 0;
        for vm in &tree.vms {
            let vm_ino = s.unique(inodes, &format!("vm:{}", vm.uuid.as_deref().unwrap_or("-")));
            let mut vm_children = BTreeMap::new();
            let mut vm_newest = 0;
            for disk in &vm.disks {
                let vdi = disk.vdi();
                let disk_ino = s.unique(inodes, &format!("disk:{vdi}"));
                let mut disk_children = BTreeMap::new();
                let mut disk_newest: Option<(i64, String, u64)> = None;
                for set in &disk.history.sets {
                    if set.points.is_empty() {
                        continue;
                    }
                    let shared = Arc::new(set.clone());
                    let set_ino = s.unique(inodes, &format!("set:{vdi}/{}", set.id));
                    let mut set_children = BTreeMap::new();
                    let mut newest: Option<(i64, String, u64)> = None;
                    let mut chain = fnv(CHAIN_BASIS, format!("{vdi}/{}", set.id).as_bytes());
                    let mut ids = HashSet::new();
                    for p in &set.points {
                        let name = format!("{}{POINT_SUFFIX}", point_name(p));
                        chain = chain_step(chain, p);
                        // Identity: the point's own id, never its position. Two points of a set
                        // with one id cannot come from cbtfs (a copied manifest): tell them
                        // apart by their objects' names.
                        let mut id = format!("{vdi}/{}/{}", set.id, p.point_id());
                        if !ids.insert(id.clone()) {
                            id = format!("{id}/{}", p.index.key);
                        }
                        let ino = s.unique(inodes, &format!("point:{id}"));
                        s.nodes.insert(
                            ino,
                            Node {
                                parent: set_ino,
                                mtime: p.time,
                                size: p.virtual_size,
                                data: NodeData::Point {
                                    set: shared.clone(),
                                    seq: p.seq,
                                    chain,
                                },
                            },
                        );
                        set_children.insert(name.clone(), ino);
                        let parts = s.unique(inodes, &format!("parts:{id}"));
                        s.nodes.insert(
                            parts,
                            Node {
                                parent: set_ino,
                                mtime: p.time,
                                size: 0,
                                data: NodeData::Parts { point: ino },
                            },
                        );
                        set_children.insert(format!("{}{PARTS_SUFFIX}", point_name(p)), parts);
                        newest = Some((p.time, name, p.virtual_size));
                    }
                    if let Some((t, name, size)) = newest {
                        let link = s.unique(inodes, &format!("latest:{vdi}/{}", set.id));
                        s.link(link, set_ino, t, name.clone());
                        set_children.insert(LATEST.into(), link);
                        if disk_newest.as_ref().is_none_or(|(dt, _, _)| t > *dt) {
                            disk_newest = Some((t, format!("{}/{name}", set.id), size));
                        }
                        s.dir(set_ino, disk_ino, t, set_children);
                        disk_children.insert(set.id.clone(), set_ino);
                    }
                }
                let Some((t, target, _)) = disk_newest else {
                    continue;
                };
                let link = s.unique(inodes, &format!("latest:{vdi}"));
                s.link(link, disk_ino, t, target);
                disk_children.insert(LATEST.into(), link);
                s.dir(disk_ino, vm_ino, t, disk_children);
                vm_children.insert(disk.name.clone(), disk_ino);
                let b = s.unique(inodes, &format!("by-uuid:{vdi}"));
                s.link(b, by_uuid_ino, t, format!("../{}/{}", vm.name, disk.name));
                by_uuid.insert(vdi.to_string(), b);
                vm_newest = vm_newest.max(t);
            }
            if !vm_children.is_empty() {
                s.dir(vm_ino, ROOT_INO, vm_newest, vm_children);
                root.insert(vm.name.clone(), vm_ino);
                newest_all = newest_all.max(vm_newest);
            }
        }
        s.dir(by_uuid_ino, ROOT_INO, newest_all, by_uuid);
        root.insert(BY_UUID.into(), by_uuid_ino);
        s.dir(ROOT_INO, ROOT_INO, newest_all, root);
        s
    }

    /// The inode number of `identity` (see `Inodes`), never one this snapshot already uses.
    fn unique(&self, inodes: &mut Inodes, identity: &str) -> u64 {
        inodes.assign(identity, |ino| self.nodes.contains_key(&ino))
    }

    fn dir(&mut self, ino: u64, parent: u64, mtime: i64, children: BTreeMap<String, u64>) {
        self.nodes.insert(
            ino,
            Node {
                parent,
                mtime,
                size: 0,
                data: NodeData::Dir(children),
            },
        );
    }

    fn link(&mut self, ino: u64, parent: u64, mtime: i64, target: String) {
        self.nodes.insert(
            ino,
            Node {
                parent,
                mtime,
                size: target.len() as u64,
                data: NodeData::Link(target),
            },
        );
    }
}

enum Handle {
    File {
        ino: u64,
        reader: Arc<PointReader>,
    },
    Volume {
        reader: Arc<PointReader>,
        volume: Arc<crate::volumes::Volume>,
    },
    Text(Arc<Vec<u8>>),
    Dir(Arc<Vec<DirEntry>>),
}

/// The mounted repository.
pub struct CbtFs {
    repo: Repository,
    snapshot: RwLock<Arc<Snapshot>>,
    scanned: Mutex<Instant>,
    /// One rescan at a time (a slower older scan must not replace a newer view).
    scanning: Mutex<()>,
    /// Every inode number given out (see `Inodes`).
    inodes: Mutex<Inodes>,
    layers: LayerCache,
    /// Open point readers by chain hash (checked exactly on a hit).
    readers: Mutex<lru::LruCache<u64, Arc<PointReader>>>,
    /// st_blocks per chain hash, once known (computing it needs the chain).
    blocks: Mutex<HashMap<u64, u64>>,
    /// One `set_blocks` pass at a time (the kernel asks many points' attributes at once).
    blocks_pass: Mutex<()>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// The entries of each `POINT.parts/` listed so far (by its inode), and their files.
    parts: Mutex<HashMap<u64, Arc<BTreeMap<String, u64>>>>,
    vol_nodes: Mutex<HashMap<u64, VolNode>>,
    /// Read-ahead for sequential readers of points (the mount turns it on).
    prefetch: Option<crate::prefetch::Prefetcher>,
}

impl CbtFs {
    pub fn new(repo: Repository) -> Result<CbtFs, FsError> {
        let fs = CbtFs {
            repo,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            scanned: Mutex::new(Instant::now()),
            scanning: Mutex::new(()),
            inodes: Mutex::new(Inodes::default()),
            layers: LayerCache::default(),
            readers: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(READER_CACHE).unwrap_or(NonZeroUsize::MIN),
            )),
            blocks: Mutex::new(HashMap::new()),
            blocks_pass: Mutex::new(()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            parts: Mutex::new(HashMap::new()),
            vol_nodes: Mutex::new(HashMap::new()),
            prefetch: None,
        };
        fs.rescan()?;
        // The view is as fresh as the end of its scan (on S3, a scan of many points takes a
        // while): the kernel's first listing, right after the mount, must not scan again.
        *fs.scanned.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Ok(fs)
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// The repository's catalog. The repository layer reads it consistently (a listing that
    /// changed while manifests were read is read again), and every state a prune passes
    /// through reads the same bytes for every kept point.
    fn consistent_catalog(&self) -> Result<Vec<crate::repo::DiskHistory>, FsError> {
        self.repo
            .catalog()
            .map_err(|source| FsError::Repository { source })
    }

    /// Rebuild the tree from the repository now, and forget what the new view no longer has.
    pub fn rescan(&self) -> Result<(), FsError> {
        let _one = self.scanning.lock().unwrap_or_else(|p| p.into_inner());
        let catalog = self.consistent_catalog()?;
        let tree = Tree::build(catalog);
        let snap = {
            let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
            Arc::new(Snapshot::build(&tree, &mut inodes))
        };
        match self.snapshot.write() {
            Ok(mut s) => *s = snap.clone(),
            Err(p) => *p.into_inner() = snap.clone(),
        }
        self.forget_stale(&snap);
        Ok(())
    }

    /// Drop cached readers, block counts and `POINT.parts/` listings of chains and points that
    /// `snap` does not have (open handles keep their own).
    fn forget_stale(&self, snap: &Snapshot) {
        let mut chains = HashSet::new();
        let mut parts = HashSet::new();
        for (&ino, n) in &snap.nodes {
            match &n.data {
                NodeData::Point { chain, .. } => {
                    chains.insert(*chain);
                }
                NodeData::Parts { .. } => {
                    parts.insert(ino);
                }
                NodeData::Dir(_) | NodeData::Link(_) => {}
            }
        }
        if let Ok(mut r) = self.readers.lock() {
            let stale: Vec<u64> = r
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| !chains.contains(k))
                .collect();
            for k in stale {
                r.pop(&k);
            }
        }
        if let Ok(mut b) = self.blocks.lock() {
            b.retain(|k, _| chains.contains(k));
        }
        if let Ok(mut p) = self.parts.lock() {
            p.retain(|k, _| parts.contains(k));
        }
        if let Ok(mut v) = self.vol_nodes.lock() {
            v.retain(|_, n| parts.contains(&n.parent));
        }
        self.layers.forget_unused();
    }

    /// Rescan if the snapshot is older than `max_age`; one scan at a time, others use the old.
    fn refresh(&self, max_age: Duration) {
        let Ok(mut scanned) = self.scanned.try_lock() else {
            return;
        };
        if scanned.elapsed() < max_age {
            return;
        }
        match self.rescan() {
            Ok(()) => *scanned = Instant::now(),
            Err(e) => {
                tracing::warn!(error = %e, "rescanning the repository failed; serving the previous view")
            }
        }
    }

    fn snap(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The attributes of `ino` (`node` in `snap`): `NotFound` if it is a point pruned since.
    fn attr_of(&self, ino: u64, node: &Node, snap: &Arc<Snapshot>) -> Result<Attr, FsError> {
        let (perm, nlink, blocks) = match &node.data {
            NodeData::Dir(c) => (0o555, 2 + c.len() as u32, 0),
            NodeData::Parts { .. } => (0o555, 2, 0),
            NodeData::Link(_) => (0o777, 1, 0),
            NodeData::Point { .. } => (0o444, 1, self.point_blocks(ino, node, snap)?),
        };
        Ok(Attr {
            ino,
            kind: node.kind(),
            size: node.size,
            blocks,
            mtime: node.mtime,
            perm,
            nlink,
            immutable: matches!(node.data, NodeData::Point { .. }),
        })
    }

    /// Honest st_blocks: the blocks that read from stored data. `NotFound` if the point was
    /// pruned since `snap` was taken.
    fn point_blocks(&self, ino: u64, node: &Node, snap: &Arc<Snapshot>) -> Result<u64, FsError> {
        if let NodeData::Point { set, seq, chain } = &node.data {
            let known = || self.blocks.lock().ok().and_then(|m| m.get(chain).copied());
            if let Some(b) = known() {
                return Ok(b);
            }
            self.set_blocks(set, *seq, *chain);
            if let Some(b) = known() {
                return Ok(b);
            }
        }
        // Not found by the set's pass (an index that does not open): the point's own reader
        // tells a point pruned since from a damaged one.
        match self.current_reader(ino, snap) {
            Ok(r) => Ok(r.map().stored_blocks() * (BLOCK_SIZE / 512)),
            Err(FsError::NotFound) => Err(FsError::NotFound),
            // Unknown (damaged, logged): claim the whole size rather than pretend it is a hole.
            Err(_) => Ok(node.size.div_ceil(512)),
        }
    }

    /// Learn st_blocks of every point of `set` in one pass up its chain (the kernel asks for
    /// all of a directory's points at once, `ls -l` or `find`): the indexes are fetched
    /// `BLOCKS_BATCH` at a time, together (`Repository::open_points`), and each point's count
    /// follows from the one below it, where opening each point's reader reads its whole chain
    /// and fetches one index after another. Point k's stored blocks are the point below's,
    /// less the blocks k records, plus those it stores, cut at its size: exactly what its
    /// `ChainMap` counts (`chain_map_counts_and_set_pass_agree` checks). The pass stops at
    /// the first index that does not open (its point and those above go the reader's way);
    /// `seq`/`chain` is the point asked for: a pass whose hashes do not reach it records nothing.
    fn set_blocks(&self, set: &SetHistory, seq: u32, chain: u64) {
        let _one = self.blocks_pass.lock().unwrap_or_else(|p| p.into_inner());
        if self
            .blocks
            .lock()
            .ok()
            .is_some_and(|m| m.contains_key(&chain))
        {
            return;
        }
        let mut hash = fnv(CHAIN_BASIS, format!("{}/{}", set.vdi, set.id).as_bytes());
        let mut stored = roaring::RoaringBitmap::new();
        let mut found: Vec<(u64, u64)> = Vec::with_capacity(set.points.len());
        'pass: for batch in set.points.chunks(BLOCKS_BATCH) {
            for (m, p) in batch.iter().zip(self.repo.open_points(batch)) {
                let Ok(p) = p else {
                    break 'pass;
                };
                hash = chain_step(hash, m);
                let limit = crate::blocks_for(p.index.virtual_size).min(u32::MAX as u64) as u32;
                stored -= &p.index.changed;
                stored |= &p.index.changed & &p.index.data;
                stored.remove_range(limit..);
                found.push((hash, stored.len() * (BLOCK_SIZE / 512)));
            }
        }
        if found.get(seq as usize).map(|f| f.0) != Some(chain) {
            return;
        }
        if let Ok(mut b) = self.blocks.lock() {
            b.extend(found);
        }
    }

    /// The reader of point `ino` as the repository has it now, `snap` being the view in which
    /// the kernel found it. A reader that cannot be opened may belong to a point pruned since
    /// (its objects are gone): the repository is read again at once, and then
    ///
    /// * a point no longer there is `NotFound`, quietly (debug log): the kernel held an old
    ///   name, nothing is damaged;
    /// * a point still there (perhaps rewritten by the prune) is opened as it is now;
    /// * one still there that cannot be opened is damaged: EIO, with a warning naming it.
    fn current_reader(&self, ino: u64, snap: &Arc<Snapshot>) -> Result<Arc<PointReader>, FsError> {
        let node = snap.nodes.get(&ino).ok_or(FsError::NotFound)?;
        let first = match self.reader(ino, node) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        if let Err(e) = self.rescan() {
            tracing::warn!(ino, error = %first, rescan = %e, "cannot open restore point, and the repository cannot be read again to tell whether it was pruned");
            return Err(first);
        }
        let fresh = self.snap();
        match fresh.nodes.get(&ino) {
            None => {
                tracing::debug!(ino, error = %first, "restore point no longer in the repository (pruned): no such file");
                Err(FsError::NotFound)
            }
            Some(n) => self.reader(ino, n).map_err(|e| {
                tracing::warn!(ino, error = %e, "cannot open restore point: its reads fail with EIO");
                e
            }),
        }
    }

    /// The reader of point `ino` (`node`), cached by chain. Logs nothing: `current_reader`
    /// tells a pruned point from a damaged one.
    fn reader(&self, ino: u64, node: &Node) -> Result<Arc<PointReader>, FsError> {
        let NodeData::Point { set, seq, chain } = &node.data else {
            return Err(FsError::IsADirectory);
        };
        // A view's set always holds its points' chains (`Snapshot::build`).
        let points = set.points.get(..=*seq as usize).ok_or(FsError::NotFound)?;
        if let Some(r) = self
            .readers
            .lock()
            .ok()
            .and_then(|mut c| c.get(chain).cloned())
            .filter(|r| r.reads_chain(points))
        {
            return Ok(r);
        }
        let r =
            PointReader::open_cached(&self.repo, set, *seq, &self.layers).map_err(|source| {
                FsError::Damaged {
                    point: set
                        .points
                        .get(*seq as usize)
                        .map(|p| p.label())
                        .unwrap_or_default(),
                    source,
                }
            })?;
        let r = Arc::new(r);
        tracing::debug!(ino, point = %r.manifest.label(), depth = r.depth(), "opened restore point");
        if let Ok(mut c) = self.readers.lock() {
            c.put(*chain, r.clone());
        }
        if let Ok(mut b) = self.blocks.lock() {
            b.insert(*chain, r.map().stored_blocks() * (BLOCK_SIZE / 512));
        }
        Ok(r)
    }

    /// The entries of `POINT.parts/` (inode `parts`), reading the point's tables the first
    /// time. A point whose tables cannot be read gets a `volumes.txt` saying why.
    fn parts_of(
        &self,
        parts: u64,
        point: u64,
        snap: &Arc<Snapshot>,
    ) -> Result<Arc<BTreeMap<String, u64>>, FsError> {
        if let Some(p) = self.parts.lock().ok().and_then(|m| m.get(&parts).cloned()) {
            return Ok(p);
        }
        let node = snap.nodes.get(&point).ok_or(FsError::NotFound)?;
        let reader = self.current_reader(point, snap)?;
        let mut files: Vec<(String, VolData)> = Vec::new();
        // Discovery never panics on any guest's bytes (it is fuzzed); should it all the same,
        // this point's parts say so and the daemon serves on.
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::volumes::discover(&*reader)
        }))
        .unwrap_or_else(|_| {
            tracing::error!(
                point,
                "volume discovery panicked: listing the point's parts as damaged"
            );
            Err(std::io::Error::other(
                "internal error while reading them (a cbtfs bug: please report it)",
            ))
        });
        let text = match found {
            Ok(layout) => {
                for v in &layout.volumes {
                    files.push((
                        format!("{}{POINT_SUFFIX}", v.name),
                        VolData::Volume(Arc::new(v.clone())),
                    ));
                }
                layout.to_text()
            }
            Err(e) => format!("the partition tables of this point cannot be read: {e}\n"),
        };
        files.push((
            VOLUMES_TXT.into(),
            VolData::Text(Arc::new(text.into_bytes())),
        ));
        let mut children = BTreeMap::new();
        let mut nodes = self.vol_nodes.lock().map_err(|_| FsError::Invalid)?;
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        for (name, data) in files {
            // `parts` derives from the point's own id: the same volume, the same number.
            let ino = inodes.assign(&format!("vol:{parts}/{name}"), |ino| {
                snap.nodes.contains_key(&ino) || nodes.get(&ino).is_some_and(|n| n.parent != parts)
            });
            nodes.insert(
                ino,
                VolNode {
                    parent: parts,
                    point,
                    mtime: node.mtime,
                    data,
                },
            );
            children.insert(name, ino);
        }
        let children = Arc::new(children);
        if let Ok(mut m) = self.parts.lock() {
            m.insert(parts, children.clone());
        }
        Ok(children)
    }

    fn vol_attr(ino: u64, n: &VolNode) -> Attr {
        Attr {
            ino,
            kind: Kind::File,
            size: n.size(),
            blocks: n.size().div_ceil(512),
            mtime: n.mtime,
            perm: 0o444,
            nlink: 1,
            immutable: true,
        }
    }

    fn vol_node(&self, ino: u64) -> Option<VolNode> {
        self.vol_nodes
            .lock()
            .ok()
            .and_then(|m| m.get(&ino).cloned())
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        self.refresh(Duration::from_secs(1));
        {
            let snap = self.snap();
            if let Some(NodeData::Parts { point }) = snap.nodes.get(&parent).map(|n| &n.data) {
                let children = self.parts_of(parent, *point, &snap)?;
                let ino = *children.get(name).ok_or(FsError::NotFound)?;
                let n = self.vol_node(ino).ok_or(FsError::NotFound)?;
                return Ok(Self::vol_attr(ino, &n));
            }
        }
        let find = |snap: &Snapshot| -> Result<Option<u64>, FsError> {
            match snap.nodes.get(&parent).map(|n| &n.data) {
                Some(NodeData::Dir(c)) => Ok(c.get(name).copied()),
                Some(_) => Err(FsError::NotADirectory),
                None => Err(FsError::NotFound),
            }
        };
        let mut snap = self.snap();
        let mut found = find(&snap)?;
        if found.is_none() {
            // A miss may be a point committed since the last scan: look again now.
            self.refresh(Duration::ZERO);
            snap = self.snap();
            found = find(&snap)?;
        }
        let ino = found.ok_or(FsError::NotFound)?;
        let node = snap.nodes.get(&ino).ok_or(FsError::NotFound)?;
        self.attr_of(ino, node, &snap)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let snap = self.snap();
        match snap.nodes.get(&ino) {
            Some(node) => self.attr_of(ino, node, &snap),
            None if self.vol_node(ino).is_some() => {
                let n = self.vol_node(ino).ok_or(FsError::NotFound)?;
                Ok(Self::vol_attr(ino, &n))
            }
            None => {
                // An open file of a point no longer listed still has attributes.
                if let Ok(h) = self.handles.lock() {
                    for handle in h.values() {
                        if let Handle::File { ino: i, reader } = handle
                            && *i == ino
                        {
                            return Ok(Attr {
                                ino,
                                kind: Kind::File,
                                size: reader.size(),
                                blocks: reader.map().stored_blocks() * (BLOCK_SIZE / 512),
                                mtime: reader.manifest.time,
                                perm: 0o444,
                                nlink: 0,
                                immutable: true,
                            });
                        }
                    }
                }
                Err(FsError::NotFound)
            }
        }
    }

    pub fn readlink(&self, ino: u64) -> Result<String, FsError> {
        self.refresh(FRESH);
        match self.snap().nodes.get(&ino).map(|n| &n.data) {
            Some(NodeData::Link(t)) => Ok(t.clone()),
            Some(_) => Err(FsError::Invalid),
            None => Err(FsError::NotFound),
        }
    }

    fn new_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.handles.lock() {
            m.insert(fh, h);
        }
        fh
    }

    /// Open a directory: its listing is fixed for the life of the handle, so offsets stay valid.
    pub fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        self.refresh(FRESH);
        let snap = self.snap();
        let node = snap.nodes.get(&ino).ok_or(FsError::NotFound)?;
        let parts_children;
        let children = match &node.data {
            NodeData::Dir(c) => c,
            NodeData::Parts { point } => {
                parts_children = self.parts_of(ino, *point, &snap)?;
                &*parts_children
            }
            _ => return Err(FsError::NotADirectory),
        };
        let mut entries = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: ".".into(),
                next_offset: 1,
            },
            DirEntry {
                ino: node.parent,
                kind: Kind::Dir,
                name: "..".into(),
                next_offset: 2,
            },
        ];
        for (name, &child) in children {
            let kind = match snap.nodes.get(&child) {
                Some(c) => c.kind(),
                None if self.vol_node(child).is_some() => Kind::File,
                None => continue,
            };
            let next_offset = entries.len() as u64 + 1;
            entries.push(DirEntry {
                ino: child,
                kind,
                name: name.clone(),
                next_offset,
            });
        }
        Ok(self.new_handle(Handle::Dir(Arc::new(entries))))
    }

    /// Entries from `offset` on (offset 0 is the start; an offset repeats its page).
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Arc<Vec<DirEntry>>, FsError> {
        match self.handles.lock().ok().and_then(|m| match m.get(&fh) {
            Some(Handle::Dir(e)) => Some(e.clone()),
            _ => None,
        }) {
            Some(e) if offset as usize <= e.len() => Ok(e),
            Some(_) => Ok(Arc::new(Vec::new())),
            None => Err(FsError::BadHandle),
        }
    }

    pub fn release(&self, fh: u64) {
        if let Ok(mut m) = self.handles.lock() {
            m.remove(&fh);
        }
    }

    /// Open a restore point for reading. `write` is whether write access was asked for.
    pub fn open(&self, ino: u64, write: bool) -> Result<u64, FsError> {
        let snap = self.snap();
        if !snap.nodes.contains_key(&ino)
            && let Some(v) = self.vol_node(ino)
        {
            if write {
                return Err(FsError::ReadOnly);
            }
            let h = match v.data {
                VolData::Text(t) => Handle::Text(t),
                VolData::Volume(volume) => Handle::Volume {
                    reader: self.current_reader(v.point, &snap)?,
                    volume,
                },
            };
            return Ok(self.new_handle(h));
        }
        let node = snap.nodes.get(&ino).ok_or(FsError::NotFound)?;
        match node.data {
            NodeData::Dir(_) | NodeData::Parts { .. } => return Err(FsError::IsADirectory),
            NodeData::Link(_) => return Err(FsError::Invalid),
            NodeData::Point { .. } => {}
        }
        if write {
            return Err(FsError::ReadOnly);
        }
        // The view may predate a prune that removed the point (NotFound) or rewrote its chain
        // (its old objects are gone; it opens as the repository has it now).
        let reader = self.current_reader(ino, &snap)?;
        Ok(self.new_handle(Handle::File { ino, reader }))
    }

    /// Read `window` bytes ahead of sequential readers of points, with `threads` fetching.
    pub fn with_prefetch(mut self, window: u64, threads: usize) -> Self {
        self.prefetch = (window > 0).then(|| crate::prefetch::Prefetcher::new(window, threads));
        self
    }

    /// Log what the read-ahead did (at unmount).
    pub fn log_stats(&self) {
        if let Some(p) = &self.prefetch {
            p.log_stats();
        }
    }

    fn file(&self, fh: u64) -> Result<(u64, Arc<PointReader>), FsError> {
        match self.handles.lock().ok().and_then(|m| match m.get(&fh) {
            Some(Handle::File { ino, reader }) => Some((*ino, reader.clone())),
            _ => None,
        }) {
            Some(r) => Ok(r),
            None => Err(FsError::BadHandle),
        }
    }

    /// A volume or text handle, if `fh` is one.
    fn part_handle(&self, fh: u64) -> Option<(Option<Arc<PointReader>>, VolData)> {
        self.handles.lock().ok().and_then(|m| match m.get(&fh) {
            Some(Handle::Volume { reader, volume }) => {
                Some((Some(reader.clone()), VolData::Volume(volume.clone())))
            }
            Some(Handle::Text(t)) => Some((None, VolData::Text(t.clone()))),
            _ => None,
        })
    }

    /// Read a volume through its extents: each piece is a read of the point at that offset.
    fn read_part(
        reader: Option<&PointReader>,
        data: &VolData,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, FsError> {
        match (data, reader) {
            (VolData::Text(t), _) => {
                let rest = usize::try_from(offset)
                    .ok()
                    .and_then(|o| t.get(o..))
                    .unwrap_or_default();
                let n = buf.len().min(rest.len());
                buf[..n].copy_from_slice(&rest[..n]);
                Ok(n)
            }
            (VolData::Volume(v), Some(r)) => {
                let mut at = 0usize;
                for (o, l) in v.map(offset, buf.len() as u64) {
                    // `map` never returns more than asked; should it, the read fails, never
                    // the daemon.
                    let end = usize::try_from(l).ok().and_then(|l| at.checked_add(l));
                    let Some(piece) = end.and_then(|end| buf.get_mut(at..end)) else {
                        return Err(FsError::DamagedVolume {
                            volume: v.name.clone(),
                            detail: "its mapping does not fit the read".into(),
                        });
                    };
                    let got = r.read_at(piece, o).map_err(|e| {
                        tracing::error!(point = %e.point, owner = %e.owner, block = e.block, file = %e.location, problem = %e.problem, volume = %v.name, "damaged block: read fails with EIO");
                        FsError::DamagedBlock(e)
                    })?;
                    // Volumes lie inside the disk (checked when built); should one not, the
                    // part past the disk's end reads as zeros.
                    if let Some(tail) = piece.get_mut(got..) {
                        tail.fill(0);
                    }
                    at = end.unwrap_or(at);
                }
                // Every byte up to the volume's end is mapped: a shorter mapping is damage,
                // never a short read that would look like the end of the file.
                let want = v.size.saturating_sub(offset).min(buf.len() as u64);
                if (at as u64) < want {
                    return Err(FsError::DamagedVolume {
                        volume: v.name.clone(),
                        detail: format!(
                            "bytes from {} are not mapped",
                            offset.saturating_add(at as u64)
                        ),
                    });
                }
                Ok(at)
            }
            (VolData::Volume(_), None) => Err(FsError::BadHandle),
        }
    }

    /// Read into `buf` at `offset`; returns the bytes read (fewer only at the end of the disk).
    /// Damage anywhere in the range fails the whole request: the kernel then retries smaller
    /// pieces, so exactly the damaged range ends up failing for the reader.
    pub fn read(&self, fh: u64, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        if let Some((reader, data)) = self.part_handle(fh) {
            return Self::read_part(reader.as_deref(), &data, offset, buf);
        }
        let (_, r) = self.file(fh)?;
        match &self.prefetch {
            // Streams are per handle: their chunks come from this handle's own reader.
            Some(p) => p.read(fh, &r, offset, buf),
            None => r.read_at(buf, offset),
        }
        .map_err(|e| {
            tracing::error!(point = %e.point, owner = %e.owner, block = e.block, file = %e.location, problem = %e.problem, "damaged block: read fails with EIO");
            FsError::DamagedBlock(e)
        })
    }

    /// `lseek` with SEEK_DATA (3) or SEEK_HOLE (4).
    pub fn seek(&self, fh: u64, offset: u64, whence: i32) -> Result<u64, FsError> {
        if let Some((_, data)) = self.part_handle(fh) {
            // Volumes report no holes: all data up to the end.
            let size = match &data {
                VolData::Volume(v) => v.size,
                VolData::Text(t) => t.len() as u64,
            };
            return match whence {
                libc::SEEK_DATA if offset < size => Ok(offset),
                libc::SEEK_HOLE if offset < size => Ok(size),
                libc::SEEK_DATA | libc::SEEK_HOLE => Err(FsError::NoDataAfter),
                _ => Err(FsError::Invalid),
            };
        }
        let (_, r) = self.file(fh)?;
        match whence {
            libc::SEEK_DATA => r.map().next_data(offset).ok_or(FsError::NoDataAfter),
            libc::SEEK_HOLE => r.map().next_hole(offset).ok_or(FsError::NoDataAfter),
            _ => Err(FsError::Invalid),
        }
    }

    /// What `df` on the mount shows: the figures of the filesystem holding the repository
    /// (its `statvfs`), passed through unchanged.
    ///
    /// The mount itself is read-only and its files are views of that filesystem's data, so the
    /// question an admin asks of `df MOUNT` is "how much room do the backups have": total, free
    /// and available space and inodes of the repository's filesystem answer it. The sum of the
    /// points' virtual sizes (what this once reported, with 0 free) answers nothing: points
    /// share most of their blocks and holes are free, so it overstated the space used many
    /// times over and made every mount look full.
    ///
    /// A repository in object storage has no such filesystem: the figures are all zero (no
    /// capacity known, nothing free), as network filesystems without quotas report.
    pub fn statfs(&self) -> Result<StatFs, FsError> {
        match self.repo.store().local_root() {
            Some(root) => statvfs(root),
            None => Ok(StatFs {
                blocks: 0,
                bfree: 0,
                bavail: 0,
                files: 0,
                ffree: 0,
                bsize: 4096,
                frsize: 4096,
                namelen: 255,
            }),
        }
    }
}

/// `statvfs(2)` of `path`, as `StatFs`.
pub fn statvfs(path: &std::path::Path) -> Result<StatFs, FsError> {
    use std::os::unix::ffi::OsStrExt;
    let io_err = |source| FsError::Io {
        op: "statvfs",
        path: path.display().to_string(),
        source,
    };
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io_err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statvfs for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io_err(std::io::Error::last_os_error()));
    }
    let u32_of = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    #[allow(clippy::unnecessary_cast)] // the field types differ between libc targets
    Ok(StatFs {
        blocks: st.f_blocks as u64,
        bfree: st.f_bfree as u64,
        bavail: st.f_bavail as u64,
        files: st.f_files as u64,
        ffree: st.f_ffree as u64,
        bsize: u32_of(st.f_bsize as u64),
        frsize: u32_of(st.f_frsize as u64),
        namelen: u32_of(st.f_namemax as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::{ImportRequest, import_raw};

    fn fixture() -> (tempfile::TempDir, CbtFs, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let repo = crate::repo::testing::init(&d.path().join("repo"));
        let img = d.path().join("img");
        let mut data = vec![0u8; 8 * BLOCK_SIZE as usize];
        data[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize].fill(7);
        std::fs::write(&img, &data).unwrap();
        import_raw(
            &repo,
            &ImportRequest {
                vdi: "11111111-2222-4333-8444-555555555555".into(),
                disk_name: Some("root".into()),
                vm_uuid: None,
                vm_name: None,
                source: crate::import::ImportSource::Raw(img),
                bitmap: None,
                time: 1_800_000_000,
                snapshot: None,
                vm_metadata: None,
                vdi_type: None,
                vm_run: None,
                source_label: None,
            },
            |_, _| {},
        )
        .unwrap();
        (d, CbtFs::new(repo).unwrap(), data)
    }

    fn walk(fs: &CbtFs, path: &str) -> Attr {
        let mut ino = ROOT_INO;
        let mut attr = fs.getattr(ino).unwrap();
        for part in path.split('/') {
            attr = fs.lookup(ino, part).unwrap();
            ino = attr.ino;
        }
        attr
    }

    #[test]
    fn tree_reads_seeks_and_errors() {
        let (_d, fs, data) = fixture();
        let dir = fs.opendir(ROOT_INO).unwrap();
        let names: Vec<String> = fs
            .readdir(dir, 0)
            .unwrap()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        assert_eq!(names, vec![".", "..", "by-uuid", "no-vm"]);
        let set = walk(&fs, "no-vm/root/20270115T080000Z");
        assert_eq!(set.kind, Kind::Dir);
        let f = walk(&fs, "no-vm/root/20270115T080000Z/20270115T080000Z.raw");
        assert_eq!(
            (f.kind, f.size, f.perm),
            (Kind::File, data.len() as u64, 0o444)
        );
        assert_eq!(f.blocks, BLOCK_SIZE / 512, "one stored block");
        assert!(f.immutable);
        let l = walk(&fs, "no-vm/root/latest.raw");
        assert_eq!(
            fs.readlink(l.ino).unwrap(),
            "20270115T080000Z/20270115T080000Z.raw"
        );
        let b = walk(&fs, "by-uuid/11111111-2222-4333-8444-555555555555");
        assert_eq!(fs.readlink(b.ino).unwrap(), "../no-vm/root");

        assert!(matches!(fs.open(f.ino, true), Err(FsError::ReadOnly)));
        let fh = fs.open(f.ino, false).unwrap();
        let mut buf = vec![1u8; 3 * BLOCK_SIZE as usize];
        assert_eq!(fs.read(fh, 100, &mut buf).unwrap(), buf.len());
        assert_eq!(buf[..], data[100..100 + buf.len()]);
        let mut tail = vec![0u8; 100];
        assert_eq!(fs.read(fh, data.len() as u64 - 10, &mut tail).unwrap(), 10);
        assert_eq!(fs.seek(fh, 0, libc::SEEK_DATA).unwrap(), BLOCK_SIZE);
        assert_eq!(
            fs.seek(fh, BLOCK_SIZE, libc::SEEK_HOLE).unwrap(),
            2 * BLOCK_SIZE
        );
        assert!(matches!(
            fs.seek(fh, 3 * BLOCK_SIZE, libc::SEEK_DATA),
            Err(FsError::NoDataAfter)
        ));
        assert_eq!(FsError::NoDataAfter.errno(), libc::ENXIO);
        fs.release(fh);
        assert!(matches!(fs.read(fh, 0, &mut tail), Err(FsError::BadHandle)));
        assert!(matches!(
            fs.lookup(ROOT_INO, "nope"),
            Err(FsError::NotFound)
        ));
        assert!(matches!(fs.lookup(f.ino, "x"), Err(FsError::NotADirectory)));
    }

    /// st_blocks from one pass over a set (`set_blocks`) equal each point's own `ChainMap`
    /// count, through overlapping writes, zero blocks written over data, a shrink and a grow.
    #[test]
    fn chain_map_counts_and_set_pass_agree() {
        let d = tempfile::tempdir().unwrap();
        let repo = crate::repo::testing::init(&d.path().join("repo"));
        let bs = BLOCK_SIZE as usize;
        // (blocks of the image, blocks its bitmap names, blocks written with data, rest zero)
        let steps: &[(u32, &[u32], &[u32])] = &[
            (16, &[], &[0, 1, 2, 5, 9, 15]),
            (16, &[1, 2, 3], &[3]),
            (16, &[0, 4, 5, 15], &[4, 15]),
            (12, &[6, 7], &[6, 7]),
            (20, &[13, 18, 19], &[18]),
            (20, &[0, 1, 2, 3, 4, 5, 6, 7], &[2, 3, 5]),
        ];
        for (i, (blocks, bits, data)) in steps.iter().enumerate() {
            let mut img = vec![0u8; *blocks as usize * bs];
            for &b in *data {
                img[b as usize * bs..(b as usize + 1) * bs].fill(i as u8 * 16 + b as u8 + 1);
            }
            let path = d.path().join("img");
            std::fs::write(&path, &img).unwrap();
            let bm: roaring::RoaringBitmap = bits.iter().copied().collect();
            import_raw(
                &repo,
                &ImportRequest {
                    vdi: "11111111-2222-4333-8444-555555555555".into(),
                    disk_name: Some("root".into()),
                    vm_uuid: None,
                    vm_name: None,
                    source: crate::import::ImportSource::Raw(path),
                    bitmap: (i > 0).then(|| {
                        (
                            crate::bitmap::encode_base64(&bm, *blocks as u64),
                            "bm".into(),
                        )
                    }),
                    time: 1_800_000_000 + i as i64 * 3600,
                    snapshot: None,
                    vm_metadata: None,
                    vdi_type: None,
                    vm_run: None,
                    source_label: None,
                },
                |_, _| {},
            )
            .unwrap();
        }
        let fs = CbtFs::new(repo.clone()).unwrap();
        let set = repo
            .disk("11111111-2222-4333-8444-555555555555")
            .unwrap()
            .sets[0]
            .clone();
        assert_eq!(set.points.len(), steps.len());
        let snap = fs.snap();
        let mut points: Vec<(u32, u64)> = snap
            .nodes
            .iter()
            .filter_map(|(&ino, n)| match &n.data {
                NodeData::Point { seq, .. } => Some((*seq, ino)),
                _ => None,
            })
            .collect();
        points.sort();
        assert_eq!(points.len(), steps.len());
        // The newest first: its stat makes the pass, which records every point's count.
        let newest = points.last().unwrap().1;
        fs.getattr(newest).unwrap();
        assert_eq!(
            fs.blocks.lock().unwrap().len(),
            steps.len(),
            "one pass, every point"
        );
        let mut counts = Vec::new();
        for &(seq, ino) in &points {
            let want = PointReader::open(&repo, &set, seq)
                .unwrap()
                .map()
                .stored_blocks();
            let got = fs.getattr(ino).unwrap().blocks;
            assert_eq!(got, want * (BLOCK_SIZE / 512), "point {seq}");
            counts.push(want);
        }
        // Hand-counted, so that agreement is not agreement on a wrong answer.
        assert_eq!(counts, vec![6, 5, 4, 5, 6, 5]);
    }

    /// Points A, B, C of random bytes in one set (each rewrites every block); their bytes.
    fn three_points(repo: &Repository, dir: &std::path::Path) -> Vec<Vec<u8>> {
        let blocks = 16u64;
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut out = Vec::new();
        for i in 0..3i64 {
            let mut data = vec![0u8; (blocks * BLOCK_SIZE) as usize];
            for c in data.chunks_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                c.copy_from_slice(&rng.to_le_bytes()[..c.len()]);
            }
            let img = dir.join("img");
            std::fs::write(&img, &data).unwrap();
            let all: roaring::RoaringBitmap = (0..blocks as u32).collect();
            import_raw(
                repo,
                &ImportRequest {
                    vdi: "11111111-2222-4333-8444-555555555555".into(),
                    disk_name: Some("root".into()),
                    vm_uuid: None,
                    vm_name: None,
                    source: crate::import::ImportSource::Raw(img),
                    bitmap: (i > 0)
                        .then(|| (crate::bitmap::encode_base64(&all, blocks), "all".into())),
                    time: 1_800_000_000 + i * 3600,
                    snapshot: None,
                    vm_metadata: None,
                    vdi_type: None,
                    vm_run: None,
                    source_label: None,
                },
                |_, _| {},
            )
            .unwrap();
            out.push(data);
        }
        out
    }

    fn read_all(fs: &CbtFs, fh: u64, size: usize) -> Result<Vec<u8>, FsError> {
        let mut buf = vec![0u8; size];
        let n = fs.read(fh, 0, &mut buf)?;
        assert_eq!(n, size);
        Ok(buf)
    }

    /// Issue #16, defect 1: after a prune renumbered C to seq 0, the reader cached for A (seq 0)
    /// was served for C.
    #[test]
    fn a_prune_never_makes_a_name_or_an_inode_read_another_point() {
        let d = tempfile::tempdir().unwrap();
        let repo = crate::repo::testing::init(&d.path().join("repo"));
        let data = three_points(&repo, d.path());
        let fs = CbtFs::new(crate::repo::testing::open(&d.path().join("repo"))).unwrap();
        let set = "no-vm/root/20270115T080000Z";
        let names = [
            "20270115T080000Z.raw",
            "20270115T090000Z.raw",
            "20270115T100000Z.raw",
        ];
        // C's inode from the view itself: a lookup would open (and cache) its reader.
        let set_ino = walk(&fs, set).ino;
        let inos: Vec<u64> = match &fs.snap().nodes[&set_ino].data {
            NodeData::Dir(c) => names.iter().map(|n| c[*n]).collect(),
            _ => panic!("a set is a directory"),
        };
        assert!(fs.readers.lock().unwrap().is_empty());
        // Open and close A without reading: its reader stays cached.
        let a = fs.open(inos[0], false).unwrap();
        fs.release(a);
        // B stays open across the prune.
        let b = fs.open(inos[1], false).unwrap();
        let parts = fs.lookup(set_ino, "20270115T100000Z.parts").unwrap();

        let policy = crate::prune::Policy {
            last: 1,
            ..Default::default()
        };
        let report = crate::prune::prune(&repo, policy, None, false, false).unwrap();
        assert_eq!(report.disks[0].removed, 2);
        // The view still predates the prune: opening C finds its old chain gone and looks again.
        let fh = fs.open(inos[2], false).unwrap();
        assert!(
            read_all(&fs, fh, data[2].len()).unwrap() == data[2],
            "the kept point reads its own bytes"
        );
        fs.release(fh);
        assert!(
            matches!(fs.lookup(set_ino, names[0]), Err(FsError::NotFound)),
            "the failed open rescanned"
        );
        // C's volumes listed (its `.parts/` cached).
        fs.release(fs.opendir(parts.ino).unwrap());

        let c = walk(&fs, &format!("{set}/{}", names[2]));
        assert_eq!(c.ino, inos[2], "the kept point keeps its inode");
        assert!(
            !inos[..2].contains(&c.ino),
            "a removed point's inode is not reused"
        );
        for n in &names[..2] {
            assert!(matches!(
                fs.lookup(walk(&fs, set).ino, n),
                Err(FsError::NotFound)
            ));
        }
        assert!(matches!(fs.open(inos[0], false), Err(FsError::NotFound)));
        let fh = fs.open(c.ino, false).unwrap();
        assert!(
            read_all(&fs, fh, data[2].len()).unwrap() == data[2],
            "the kept point reads its own bytes"
        );
        fs.release(fh);
        let latest = walk(&fs, "no-vm/root/latest.raw");
        assert_eq!(
            fs.readlink(latest.ino).unwrap(),
            format!("20270115T080000Z/{}", names[2])
        );
        // B was open: its old bytes (or EIO), never another point's.
        match read_all(&fs, b, data[1].len()) {
            Ok(got) => assert!(got == data[1], "an open removed point changed its bytes"),
            Err(e) => assert_eq!(e.errno(), libc::EIO),
        }
        assert_eq!(fs.getattr(inos[1]).unwrap().size, data[1].len() as u64);
        fs.release(b);
        // Caches of removed points are gone; C's `.parts/` keeps its inode.
        let parts_after = walk(&fs, &format!("{set}/20270115T100000Z.parts"));
        assert_eq!(parts_after.ino, parts.ino);
        assert_eq!(fs.readers.lock().unwrap().len(), 1);
        assert_eq!(fs.parts.lock().unwrap().len(), 1);
        assert!(matches!(
            fs.lookup(walk(&fs, set).ino, "20270115T080000Z.parts"),
            Err(FsError::NotFound)
        ));
    }

    /// A point id survives prune: a kept point taking over removed ones gets a new generation
    /// of its manifest (and a new index), never a new identity; an untouched one keeps both.
    #[test]
    fn point_ids_are_kept_by_prune() {
        let d = tempfile::tempdir().unwrap();
        let repo = crate::repo::testing::init(&d.path().join("repo"));
        three_points(&repo, d.path());
        let vdi = "11111111-2222-4333-8444-555555555555";
        let before = repo.disk(vdi).unwrap().sets[0].points.clone();
        assert!(before.iter().all(|p| p.id.len() == 32 && p.generation == 1));
        let keep = |last| crate::prune::Policy {
            last,
            ..Default::default()
        };
        // Keep B and C: B takes over A as the new base, C is untouched.
        crate::prune::prune(&repo, keep(2), None, false, false).unwrap();
        let after = repo.disk(vdi).unwrap().sets[0].points.clone();
        assert_eq!(after.len(), 2);
        assert_eq!(
            after[0].id, before[1].id,
            "a point taking over keeps its id"
        );
        assert_eq!(after[0].generation, 2);
        assert_eq!(after[0].parent, None, "it is the base now");
        assert_ne!(after[0].index.key, before[1].index.key, "B got a new index");
        assert_eq!(after[1].key(), before[2].key(), "C was not touched");
        assert_eq!(after[1].index, before[2].index);
        // Keep C alone: it becomes the base, still the same point.
        crate::prune::prune(&repo, keep(1), None, false, false).unwrap();
        let after = repo.disk(vdi).unwrap().sets[0].points.clone();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].seq, 0);
        assert_eq!(after[0].id, before[2].id);
        assert_eq!(after[0].generation, 2);
    }

    /// A prune deletes manifests and the next imports create new ones at the same paths: the
    /// mount's view must show the new points, whatever inode numbers the filesystem reuses.
    #[test]
    fn points_made_after_a_prune_show_as_themselves() {
        let d = tempfile::tempdir().unwrap();
        let repo = crate::repo::testing::init(&d.path().join("repo"));
        three_points(&repo, d.path());
        let fs = CbtFs::new(crate::repo::testing::open(&d.path().join("repo"))).unwrap();
        let policy = crate::prune::Policy {
            last: 1,
            ..Default::default()
        };
        crate::prune::prune(&repo, policy, None, false, false).unwrap();
        fs.rescan().unwrap();
        // Two more points: manifests 000001 and 000002 again, as B's and C's were.
        let img = d.path().join("img");
        let mut want = Vec::new();
        for i in 3..5i64 {
            let data = vec![i as u8; 16 * BLOCK_SIZE as usize];
            std::fs::write(&img, &data).unwrap();
            let all: roaring::RoaringBitmap = (0..16u32).collect();
            import_raw(
                &repo,
                &ImportRequest {
                    vdi: "11111111-2222-4333-8444-555555555555".into(),
                    disk_name: Some("root".into()),
                    vm_uuid: None,
                    vm_name: None,
                    source: crate::import::ImportSource::Raw(img.clone()),
                    bitmap: Some((crate::bitmap::encode_base64(&all, 16), "all".into())),
                    time: 1_800_000_000 + i * 3600,
                    snapshot: None,
                    vm_metadata: None,
                    vdi_type: None,
                    vm_run: None,
                    source_label: None,
                },
                |_, _| {},
            )
            .unwrap();
            want.push(data);
        }
        fs.rescan().unwrap();
        let set = "no-vm/root/20270115T080000Z";
        for (n, data) in ["20270115T110000Z.raw", "20270115T120000Z.raw"]
            .iter()
            .zip(&want)
        {
            let f = walk(&fs, &format!("{set}/{n}"));
            let fh = fs.open(f.ino, false).unwrap();
            assert!(read_all(&fs, fh, data.len()).unwrap() == *data, "{n}");
            fs.release(fh);
        }
    }

    /// Rescans racing with imports and prunes (each prune commits new generations and deletes
    /// manifests): every
    /// point of every view reads its own bytes or fails, never another chain's bytes.
    #[test]
    fn rescans_during_prunes_never_read_a_torn_chain() {
        use std::sync::atomic::AtomicBool;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let repo = crate::repo::testing::init(&root);
        let fs = CbtFs::new(crate::repo::testing::open(&root)).unwrap();
        let expected: Mutex<HashMap<i64, Vec<u8>>> = Mutex::new(HashMap::new());
        let done = AtomicBool::new(false);
        let blocks = 4u64;
        let (checked, problems) = std::thread::scope(|sc| {
            let reader = sc.spawn(|| {
                let (mut checked, mut problems) = (0usize, Vec::new());
                while !done.load(Ordering::Relaxed) {
                    if fs.rescan().is_err() {
                        continue;
                    }
                    let points: Vec<(u64, i64)> = fs
                        .snap()
                        .nodes
                        .iter()
                        .filter(|(_, n)| matches!(n.data, NodeData::Point { .. }))
                        .map(|(i, n)| (*i, n.mtime))
                        .collect();
                    for (ino, t) in points {
                        let Ok(fh) = fs.open(ino, false) else {
                            continue;
                        };
                        let want = expected.lock().unwrap().get(&t).cloned().unwrap();
                        let mut buf = vec![0u8; want.len()];
                        if let Ok(n) = fs.read(fh, 0, &mut buf) {
                            checked += 1;
                            if n != want.len() || buf != want {
                                problems.push(t);
                            }
                        }
                        fs.release(fh);
                    }
                }
                (checked, problems)
            });
            let mut image = vec![0u8; (blocks * BLOCK_SIZE) as usize];
            let img = d.path().join("img");
            for i in 0..60i64 {
                // Each point rewrites one block: a chain missing a point reads wrong.
                let b = (i as u64) % blocks;
                let at = (b * BLOCK_SIZE) as usize;
                image[at..at + BLOCK_SIZE as usize].fill(i as u8 + 1);
                std::fs::write(&img, &image).unwrap();
                let t = 1_800_000_000 + i * 3600;
                expected.lock().unwrap().insert(t, image.clone());
                let bm: roaring::RoaringBitmap = [b as u32].into_iter().collect();
                import_raw(
                    &repo,
                    &ImportRequest {
                        vdi: "11111111-2222-4333-8444-555555555555".into(),
                        disk_name: Some("root".into()),
                        vm_uuid: None,
                        vm_name: None,
                        source: crate::import::ImportSource::Raw(img.clone()),
                        bitmap: (i > 0)
                            .then(|| (crate::bitmap::encode_base64(&bm, blocks), "bm".into())),
                        time: t,
                        snapshot: None,
                        vm_metadata: None,
                        vdi_type: None,
                        vm_run: None,
                        source_label: None,
                    },
                    |_, _| {},
                )
                .unwrap();
                if i % 2 == 1 {
                    // Drops the oldest: the next point takes it over, the newest is untouched.
                    let keep = crate::prune::Policy {
                        last: 2,
                        ..Default::default()
                    };
                    crate::prune::prune(&repo, keep, None, false, false).unwrap();
                }
            }
            done.store(true, Ordering::Relaxed);
            reader.join().unwrap()
        });
        assert!(checked > 0);
        assert!(
            problems.is_empty(),
            "points read wrong: {problems:?} ({checked} reads)"
        );
    }

    /// Log lines written while `f` runs (DEBUG and above), for asserting what was logged.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
            type Writer = Buf;
            fn make_writer(&'a self) -> Buf {
                self.clone()
            }
        }
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        let out = tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        (out, text)
    }

    /// Issue #17: a point pruned after the kernel learned its inode is NotFound (ENOENT) and
    /// logged at debug level only; a point still in the repository whose objects cannot be
    /// opened is Damaged (EIO) with a warning naming it.
    #[test]
    fn a_pruned_point_is_not_found_quietly_and_a_damaged_one_is_eio_with_a_warning() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let repo = crate::repo::testing::init(&root);
        three_points(&repo, d.path());
        let fs = CbtFs::new(crate::repo::testing::open(&root)).unwrap();
        let set = "no-vm/root/20270115T080000Z";
        let set_ino = walk(&fs, set).ino;
        let names = ["20270115T080000Z", "20270115T090000Z", "20270115T100000Z"];
        let (inos, parts): (Vec<u64>, Vec<u64>) = match &fs.snap().nodes[&set_ino].data {
            NodeData::Dir(c) => names
                .iter()
                .map(|n| (c[&format!("{n}.raw")], c[&format!("{n}.parts")]))
                .unzip(),
            _ => panic!("a set is a directory"),
        };
        let policy = crate::prune::Policy {
            last: 1,
            ..Default::default()
        };
        crate::prune::prune(&repo, policy, None, false, false).unwrap();
        // The view predates the prune: A and B are still in it, their objects gone.
        let (r, log) = logged(|| {
            (
                fs.open(inos[0], false).map(|_| ()),
                fs.getattr(inos[1]).map(|_| ()),
                fs.opendir(parts[1]).map(|_| ()),
            )
        });
        assert!(matches!(r.0, Err(FsError::NotFound)), "{:?}", r.0);
        assert!(matches!(r.1, Err(FsError::NotFound)), "{:?}", r.1);
        assert!(matches!(r.2, Err(FsError::NotFound)), "{:?}", r.2);
        assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
        assert!(log.contains("no longer in the repository"), "{log}");

        // C is kept; remove its index object behind the repository's back: damage.
        let vdi = "11111111-2222-4333-8444-555555555555";
        let c = repo.disk(vdi).unwrap().sets[0].points[0].clone();
        std::fs::remove_file(root.join(&c.index.key)).unwrap();
        let fresh = CbtFs::new(crate::repo::testing::open(&root)).unwrap();
        let c_ino = walk(&fresh, &format!("{set}/{}.raw", names[2])).ino;
        let (r, log) = logged(|| fresh.open(c_ino, false));
        match r {
            Err(e @ FsError::Damaged { .. }) => {
                assert_eq!(e.errno(), libc::EIO);
                assert!(e.to_string().contains(names[2]), "{e}");
                assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
            }
            other => panic!("expected Damaged, got {other:?}"),
        }
        assert!(
            log.contains("WARN") && log.contains("cannot open restore point"),
            "{log}"
        );
    }

    #[test]
    fn every_error_kind_has_its_errno() {
        let io = |e| FsError::Io {
            op: "statvfs",
            path: "/r".into(),
            source: std::io::Error::from_raw_os_error(e),
        };
        let repo = || crate::repo::RepoError::Invalid("x".into());
        let cases: Vec<(FsError, i32)> = vec![
            (FsError::NotFound, libc::ENOENT),
            (FsError::NotADirectory, libc::ENOTDIR),
            (FsError::IsADirectory, libc::EISDIR),
            (FsError::ReadOnly, libc::EROFS),
            (FsError::Invalid, libc::EINVAL),
            (FsError::BadHandle, libc::EBADF),
            (FsError::NoDataAfter, libc::ENXIO),
            (
                FsError::Damaged {
                    point: "p".into(),
                    source: repo(),
                },
                libc::EIO,
            ),
            (
                FsError::DamagedBlock(Box::new(crate::read::ReadError {
                    point: "p".into(),
                    owner: "o".into(),
                    block: 3,
                    range_start: 0,
                    range_end: 1,
                    location: "f".into(),
                    problem: "bad".into(),
                    valid_until: 0,
                })),
                libc::EIO,
            ),
            (
                FsError::DamagedVolume {
                    volume: "p1".into(),
                    detail: "d".into(),
                },
                libc::EIO,
            ),
            (FsError::Repository { source: repo() }, libc::EIO),
            (FsError::Unsettled { tries: 8 }, libc::EIO),
            (io(libc::EACCES), libc::EACCES),
            (
                FsError::Io {
                    op: "x",
                    path: "y".into(),
                    source: std::io::Error::other("no errno"),
                },
                libc::EIO,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.errno(), want, "{e:?}");
        }
    }

    #[test]
    fn ttls_are_long_only_for_restore_points_and_entries_always_short() {
        let attr = |kind, immutable| Attr {
            ino: 2,
            kind,
            size: 0,
            blocks: 0,
            mtime: 0,
            perm: 0o444,
            nlink: 1,
            immutable,
        };
        let long = Ttls {
            attr: TTL_IMMUTABLE,
            entry: TTL_CHANGING,
        };
        let short = Ttls {
            attr: TTL_CHANGING,
            entry: TTL_CHANGING,
        };
        assert_eq!(ttls(&attr(Kind::File, true)), long);
        assert_eq!(ttls(&attr(Kind::File, false)), short);
        assert_eq!(ttls(&attr(Kind::Dir, false)), short);
        assert_eq!(ttls(&attr(Kind::Symlink, false)), short);
        // Whatever a directory or link claims, its attributes change as backups land.
        assert_eq!(ttls(&attr(Kind::Dir, true)), short);
        assert_eq!(ttls(&attr(Kind::Symlink, true)), short);
        // From the tree: a point, a volume file, a set directory, a latest link.
        let (_d, fs, _) = fixture();
        let point = walk(&fs, "no-vm/root/20270115T080000Z/20270115T080000Z.raw");
        assert_eq!(ttls(&point), long);
        let vol = walk(
            &fs,
            &format!("no-vm/root/20270115T080000Z/20270115T080000Z{PARTS_SUFFIX}/{VOLUMES_TXT}"),
        );
        assert_eq!(ttls(&vol), long);
        assert_eq!(ttls(&walk(&fs, "no-vm/root/20270115T080000Z")), short);
        assert_eq!(ttls(&walk(&fs, "no-vm/root/latest.raw")), short);
    }

    /// Issue #17: `df` on the mount shows the repository's filesystem, not the points' sizes.
    #[test]
    fn statfs_is_the_repository_filesystems_own() {
        let (_d, fs, _) = fixture();
        let got = fs.statfs().unwrap();
        let want = statvfs(fs.repository().root()).unwrap();
        assert_eq!(
            (got.blocks, got.bsize, got.frsize, got.files, got.namelen),
            (
                want.blocks,
                want.bsize,
                want.frsize,
                want.files,
                want.namelen
            )
        );
        assert!(got.blocks > 0 && got.bfree <= got.blocks && got.bavail <= got.bfree);
        // Other processes write to this filesystem meanwhile: free space within 256 MiB.
        let slack = (256 << 20) / u64::from(want.frsize.max(1));
        assert!(got.bfree.abs_diff(want.bfree) <= slack, "{got:?} {want:?}");
        let e = statvfs(std::path::Path::new("/nonexistent/cbtfs")).unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT);
        assert!(e.to_string().contains("/nonexistent/cbtfs"), "{e}");
    }

    #[test]
    fn an_inode_number_never_goes_to_two_identities() {
        let mut inodes = Inodes::default();
        // Pretend "x"'s number already went to something else.
        inodes.0.insert(ino_of("x"), 12345);
        let x = inodes.assign("x", |_| false);
        assert_ne!(x, ino_of("x"));
        assert_eq!(inodes.assign("x", |_| false), x, "stable");
        assert_eq!(inodes.assign("y", |_| false), ino_of("y"));
        // A number in use in this view is skipped.
        let z = inodes.assign("z", |i| i == ino_of("z"));
        assert_ne!(z, ino_of("z"));
        assert!(z > ROOT_INO);
    }

    #[test]
    fn inode_numbers_are_stable_across_rescans() {
        let (_d, fs, _) = fixture();
        let a = walk(&fs, "no-vm/root/20270115T080000Z/20270115T080000Z.raw").ino;
        fs.rescan().unwrap();
        let b = walk(&fs, "no-vm/root/20270115T080000Z/20270115T080000Z.raw").ino;
        assert_eq!(a, b);
    }
}
