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
//! Inode numbers are hashes of each object's identity (disk uuid, set, point number), so they
//! stay the same across rescans and remounts. The tree is an immutable snapshot rebuilt from the
//! repository's manifests when it may be stale: a lookup that misses, an `opendir` or `readlink`
//! more than `FRESH` after the last scan. Restore points never change, so their files may be
//! cached by the kernel for long; directories and `latest.raw` links get short TTLs.
//! An open file holds its own reader: a point removed from the repository while open keeps
//! reading what it can (or fails with EIO), never another point's bytes.

use std::collections::{BTreeMap, HashMap};
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
/// Open point readers kept after their last handle closes (a chain map and layer references each).
const READER_CACHE: usize = 64;
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

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("invalid argument")]
    Invalid,
    #[error("bad file handle")]
    BadHandle,
    #[error("no data at or after this offset")]
    NoDataAfter,
    #[error("{0}")]
    Damaged(String),
    #[error("{0}")]
    Repository(String),
}

impl FsError {
    /// The errno for the kernel. No `_` arm: a new variant must decide.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::Invalid => libc::EINVAL,
            FsError::BadHandle => libc::EBADF,
            FsError::NoDataAfter => libc::ENXIO,
            FsError::Damaged(_) => libc::EIO,
            FsError::Repository(_) => libc::EIO,
        }
    }
}

enum NodeData {
    Dir(BTreeMap<String, u64>),
    Point {
        set: Arc<SetHistory>,
        seq: u32,
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

/// FNV-1a of an identity: stable inode numbers (never 0 or the root's 1).
fn ino_of(identity: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in identity.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(2)
}

impl Snapshot {
    fn build(tree: &Tree) -> Snapshot {
        let mut s = Snapshot::default();
        let mut root = BTreeMap::new();
        let mut by_uuid = BTreeMap::new();
        let by_uuid_ino = s.unique(ino_of("by-uuid"));
        let mut newest_all = 0;
        for vm in &tree.vms {
            let vm_ino = s.unique(ino_of(&format!("vm:{}", vm.uuid.as_deref().unwrap_or("-"))));
            let mut vm_children = BTreeMap::new();
            let mut vm_newest = 0;
            for disk in &vm.disks {
                let vdi = disk.vdi();
                let disk_ino = s.unique(ino_of(&format!("disk:{vdi}")));
                let mut disk_children = BTreeMap::new();
                let mut disk_newest: Option<(i64, String, u64)> = None;
                for set in &disk.history.sets {
                    if set.points.is_empty() {
                        continue;
                    }
                    let shared = Arc::new(set.clone());
                    let set_ino = s.unique(ino_of(&format!("set:{vdi}/{}", set.id)));
                    let mut set_children = BTreeMap::new();
                    let mut newest: Option<(i64, String, u64)> = None;
                    for p in &set.points {
                        let name = format!("{}{POINT_SUFFIX}", point_name(p));
                        let ino = s.unique(ino_of(&format!("point:{vdi}/{}/{}", set.id, p.seq)));
                        s.nodes.insert(
                            ino,
                            Node {
                                parent: set_ino,
                                mtime: p.time,
                                size: p.virtual_size,
                                data: NodeData::Point {
                                    set: shared.clone(),
                                    seq: p.seq,
                                },
                            },
                        );
                        set_children.insert(name.clone(), ino);
                        let parts = s.unique(ino_of(&format!("parts:{vdi}/{}/{}", set.id, p.seq)));
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
                        let link = s.unique(ino_of(&format!("latest:{vdi}/{}", set.id)));
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
                let link = s.unique(ino_of(&format!("latest:{vdi}")));
                s.link(link, disk_ino, t, target);
                disk_children.insert(LATEST.into(), link);
                s.dir(disk_ino, vm_ino, t, disk_children);
                vm_children.insert(disk.name.clone(), disk_ino);
                let b = s.unique(ino_of(&format!("by-uuid:{vdi}")));
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

    /// Inode numbers are hashes; on the (astronomically rare) collision, probe onwards.
    fn unique(&self, mut ino: u64) -> u64 {
        while ino <= ROOT_INO || self.nodes.contains_key(&ino) {
            ino = ino.wrapping_add(1);
        }
        ino
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
    layers: LayerCache,
    readers: Mutex<lru::LruCache<u64, Arc<PointReader>>>,
    /// st_blocks per point inode, once known (computing it needs the chain).
    blocks: Mutex<HashMap<u64, u64>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// The entries of each `POINT.parts/` listed so far (by its inode), and their files.
    parts: Mutex<HashMap<u64, Arc<BTreeMap<String, u64>>>>,
    vol_nodes: Mutex<HashMap<u64, VolNode>>,
    /// Read-ahead for sequential readers of points (the mount turns it on).
    prefetch: Option<crate::prefetch::Prefetcher>,
}

fn repo_err(e: impl std::fmt::Display) -> FsError {
    FsError::Repository(e.to_string())
}

impl CbtFs {
    pub fn new(repo: Repository) -> Result<CbtFs, FsError> {
        let fs = CbtFs {
            repo,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            scanned: Mutex::new(Instant::now()),
            layers: LayerCache::default(),
            readers: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(READER_CACHE).unwrap_or(NonZeroUsize::MIN),
            )),
            blocks: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            parts: Mutex::new(HashMap::new()),
            vol_nodes: Mutex::new(HashMap::new()),
            prefetch: None,
        };
        fs.rescan()?;
        Ok(fs)
    }

    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    /// Rebuild the tree from the repository now.
    pub fn rescan(&self) -> Result<(), FsError> {
        let catalog = self.repo.catalog().map_err(repo_err)?;
        let snap = Arc::new(Snapshot::build(&Tree::build(catalog)));
        if let Ok(mut s) = self.snapshot.write() {
            *s = snap;
        }
        Ok(())
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

    fn attr_of(&self, ino: u64, node: &Node) -> Attr {
        let (perm, nlink, blocks) = match &node.data {
            NodeData::Dir(c) => (0o555, 2 + c.len() as u32, 0),
            NodeData::Parts { .. } => (0o555, 2, 0),
            NodeData::Link(_) => (0o777, 1, 0),
            NodeData::Point { .. } => (0o444, 1, self.point_blocks(ino, node)),
        };
        Attr {
            ino,
            kind: node.kind(),
            size: node.size,
            blocks,
            mtime: node.mtime,
            perm,
            nlink,
            immutable: matches!(node.data, NodeData::Point { .. }),
        }
    }

    /// Honest st_blocks: the blocks that read from stored data.
    fn point_blocks(&self, ino: u64, node: &Node) -> u64 {
        if let Some(b) = self.blocks.lock().ok().and_then(|m| m.get(&ino).copied()) {
            return b;
        }
        match self.reader(ino, node) {
            Ok(r) => r.map().stored_blocks() * (BLOCK_SIZE / 512),
            // Unknown (damaged): claim the whole size rather than pretend it is a hole.
            Err(_) => node.size.div_ceil(512),
        }
    }

    fn reader(&self, ino: u64, node: &Node) -> Result<Arc<PointReader>, FsError> {
        let NodeData::Point { set, seq } = &node.data else {
            return Err(FsError::IsDir);
        };
        if let Some(r) = self
            .readers
            .lock()
            .ok()
            .and_then(|mut c| c.get(&ino).cloned())
        {
            return Ok(r);
        }
        let r = PointReader::open_cached(&self.repo, set, *seq, &self.layers).map_err(|e| {
            tracing::error!(point = %set.points.get(*seq as usize).map(|p| p.label()).unwrap_or_default(), error = %e, "cannot open restore point");
            FsError::Damaged(e.to_string())
        })?;
        let r = Arc::new(r);
        if let Ok(mut c) = self.readers.lock() {
            c.put(ino, r.clone());
        }
        if let Ok(mut b) = self.blocks.lock() {
            b.insert(ino, r.map().stored_blocks() * (BLOCK_SIZE / 512));
        }
        Ok(r)
    }

    /// The entries of `POINT.parts/` (inode `parts`), reading the point's tables the first
    /// time. A point whose tables cannot be read gets a `volumes.txt` saying why.
    fn parts_of(
        &self,
        parts: u64,
        point: u64,
        snap: &Snapshot,
    ) -> Result<Arc<BTreeMap<String, u64>>, FsError> {
        if let Some(p) = self.parts.lock().ok().and_then(|m| m.get(&parts).cloned()) {
            return Ok(p);
        }
        let node = snap.nodes.get(&point).ok_or(FsError::NotFound)?;
        let reader = self.reader(point, node)?;
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
        for (name, data) in files {
            let mut ino = ino_of(&format!("vol:{parts}/{name}"));
            while ino <= ROOT_INO
                || snap.nodes.contains_key(&ino)
                || nodes.get(&ino).is_some_and(|n| n.parent != parts)
            {
                ino = ino.wrapping_add(1);
            }
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
                Some(_) => Err(FsError::NotDir),
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
        Ok(self.attr_of(ino, node))
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let snap = self.snap();
        match snap.nodes.get(&ino) {
            Some(node) => Ok(self.attr_of(ino, node)),
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
            _ => return Err(FsError::NotDir),
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
                VolData::Volume(volume) => {
                    let node = snap.nodes.get(&v.point).ok_or(FsError::NotFound)?;
                    Handle::Volume {
                        reader: self.reader(v.point, node)?,
                        volume,
                    }
                }
            };
            return Ok(self.new_handle(h));
        }
        let node = snap.nodes.get(&ino).ok_or(FsError::NotFound)?;
        match node.data {
            NodeData::Dir(_) | NodeData::Parts { .. } => return Err(FsError::IsDir),
            NodeData::Link(_) => return Err(FsError::Invalid),
            NodeData::Point { .. } => {}
        }
        if write {
            return Err(FsError::ReadOnly);
        }
        let reader = self.reader(ino, node)?;
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
                        return Err(FsError::Damaged(format!(
                            "volume {}: its mapping does not fit the read",
                            v.name
                        )));
                    };
                    let got = r.read_at(piece, o).map_err(|e| {
                        tracing::error!(point = %e.point, owner = %e.owner, block = e.block, file = %e.location, problem = %e.problem, volume = %v.name, "damaged block: read fails with EIO");
                        FsError::Damaged(e.to_string())
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
                    return Err(FsError::Damaged(format!(
                        "volume {}: bytes from {} are not mapped",
                        v.name,
                        offset.saturating_add(at as u64)
                    )));
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
        let (ino, r) = self.file(fh)?;
        match &self.prefetch {
            Some(p) => p.read(ino, &r, offset, buf),
            None => r.read_at(buf, offset),
        }
        .map_err(|e| {
            tracing::error!(point = %e.point, owner = %e.owner, block = e.block, file = %e.location, problem = %e.problem, "damaged block: read fails with EIO");
            FsError::Damaged(e.to_string())
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

    /// (total, free) bytes of the filesystem holding the repository, for `df`.
    pub fn statfs(&self) -> (u64, u64, u64) {
        let mut total = 0;
        let mut files = 0;
        if let Ok(s) = self.snapshot.read() {
            files = s.nodes.len() as u64;
            for n in s.nodes.values() {
                if matches!(n.data, NodeData::Point { .. }) {
                    total += n.size;
                }
            }
        }
        (total, 0, files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::{ImportRequest, import_raw};

    fn fixture() -> (tempfile::TempDir, CbtFs, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::init(&d.path().join("repo")).unwrap();
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
        assert!(matches!(fs.lookup(f.ino, "x"), Err(FsError::NotDir)));
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
