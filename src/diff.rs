//! `cbtfs diff`: files added, removed and changed between two points of one disk, per volume.
//!
//! Both points are browsed (read-only, journals replayed into private overlays) and their trees
//! walked side by side. Metadata (type, mode, owner, size, symlink target) is always compared.
//! File contents are compared only where they can differ: between points of one set, the
//! changed-block bitmaps of the points in between say which disk blocks were written; a file
//! whose data extents (FIEMAP, mapped through the partition/LV layout) are identical in both
//! points and touch none of those blocks — nor anything journal replay wrote — has the same
//! bytes. Everything else is read and compared. Between sets there is no bitmap chain, so every
//! file is compared, and the report says so.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use roaring::RoaringBitmap;
use serde::Serialize;

use crate::browse::{BrowseOptions, Session};
use crate::naming::Tree;
use crate::repo::Repository;
use crate::volumes::Volume;

#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    /// `VOLUME/path/in/it`.
    pub path: String,
    /// `A` added, `D` removed, `M` modified.
    pub status: &'static str,
    /// For `M`: what differs (`type`, `mode`, `owner`, `size`, `content`, `target`, `device`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<&'static str>,
}

/// One volume of the points and whether its files were compared.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VolumeResult {
    pub name: String,
    /// Whether its trees were walked in both points. `false`: its changes are unknown, and
    /// `changes` holds none of them.
    pub compared: bool,
    /// Why it was not compared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Not compared because it holds no files of its own in either point (swap space, an LVM
    /// physical volume whose logical volumes are compared by name): nothing is missing.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_files: bool,
    /// Not compared (no filesystem could be mounted), but no block of it changed between the
    /// points: its bytes, and so any file in it, are the same in both.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct DiffReport {
    pub a: String,
    pub b: String,
    /// Why contents were compared in full rather than through the changed-block map.
    pub full_compare: Option<String>,
    pub changes: Vec<Change>,
    /// Every volume in scope, compared or not (and why not).
    pub volumes: Vec<VolumeResult>,
    /// Remarks on how volumes were compared.
    pub notes: Vec<String>,
    pub files: u64,
    /// Files whose contents were read on both sides.
    pub compared_by_content: u64,
    /// Files the changed-block map proved unchanged without reading them.
    pub unchanged_by_map: u64,
    /// Unreadable files (I/O errors): their state is unknown.
    pub errors: Vec<String>,
    pub seconds: f64,
}

impl DiffReport {
    /// Volumes whose files could not be compared: the report is incomplete.
    pub fn not_compared(&self) -> impl Iterator<Item = &VolumeResult> {
        self.volumes
            .iter()
            .filter(|v| !v.compared && !v.no_files && !v.unchanged)
    }

    /// Whether every volume in scope and every file in them was compared.
    pub fn complete(&self) -> bool {
        self.errors.is_empty() && !self.volumes.is_empty() && self.not_compared().next().is_none()
    }

    /// `git diff --name-status` style lines.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for c in &self.changes {
            if c.what.is_empty() {
                out.push_str(&format!("{}\t{}\n", c.status, c.path));
            } else {
                out.push_str(&format!("{}\t{}\t{}\n", c.status, c.path, c.what.join(",")));
            }
        }
        out
    }
}

/// What can make a volume's bytes differ between the points.
struct Dirty<'a> {
    volume: &'a Volume,
    /// Disk blocks written between the points; `None`: unknown (compare everything).
    changed: Option<&'a RoaringBitmap>,
    /// Volume ranges journal replay wrote in either overlay.
    replayed: Vec<(u64, u64)>,
    /// Whether FIEMAP's physical offsets are offsets in the volume (not Btrfs's logical
    /// addresses, not a FUSE driver's).
    fiemap_usable: bool,
}

impl Dirty<'_> {
    fn touches(&self, offset: u64, len: u64) -> bool {
        let Some(changed) = self.changed else {
            return true;
        };
        if self
            .replayed
            .iter()
            .any(|&(o, l)| o < offset.saturating_add(len) && offset < o.saturating_add(l))
        {
            return true;
        }
        // One piece at a time: a long FIEMAP extent of a striped LV has many.
        let mut mapped = 0u64;
        for (d, l) in self.volume.pieces(offset, len) {
            mapped = mapped.saturating_add(l);
            let first = d >> crate::BLOCK_SHIFT;
            let Some(last) = d.checked_add(l.saturating_sub(1)) else {
                return true;
            };
            let last = last >> crate::BLOCK_SHIFT;
            match (u32::try_from(first), u32::try_from(last)) {
                (Ok(f), Ok(t)) if changed.range_cardinality(f..=t) == 0 => {}
                _ => return true,
            }
        }
        // Not all of it maps (beyond the volume): cannot reason about it.
        mapped != len
    }
}

/// Per-extent flags after which the physical offset does not say where the bytes are.
const FIEMAP_OPAQUE: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_MERGED: u32 = 0x1000;
/// FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; 64],
}

/// A file's extents: (logical, physical, length, flags).
fn fiemap(f: &File) -> io::Result<Vec<(u64, u64, u64, u32)>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut m = Fiemap {
            start,
            length: u64::MAX - start,
            flags: 0,
            mapped_extents: 0,
            extent_count: 64,
            reserved: 0,
            extents: [FiemapExtent::default(); 64],
        };
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most extent_count (64) extents
        // into the array that follows it, all inside `m`.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, &mut m as *mut Fiemap) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (m.mapped_extents as usize).min(64);
        if n == 0 {
            return Ok(out);
        }
        for e in &m.extents[..n] {
            out.push((
                e.logical,
                e.physical,
                e.length,
                e.flags & !FIEMAP_EXTENT_MERGED,
            ));
        }
        let last = m.extents[n - 1];
        if last.flags & FIEMAP_EXTENT_LAST != 0 {
            return Ok(out);
        }
        start = last.logical.saturating_add(last.length);
        if out.len() > 1_000_000 {
            return Err(io::Error::other("too many extents"));
        }
    }
}

/// Set when Ctrl-C, SIGTERM or SIGHUP arrives (see `stop_on_signals`): the walk stops and
/// both browses end, so nothing is left mounted.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether a signal asked the work to stop (see `stop_on_signals`); `dump` and `find` ask too.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Turn SIGINT, SIGTERM and SIGHUP into a clean stop of `diff` instead of death with two
/// browses mounted. Call before `diff`, from the main thread, before other threads start.
pub fn stop_on_signals() {
    let set = crate::mount::signal_set();
    // SAFETY: blocks the signals in this thread; threads started later inherit the mask, so
    // only the watcher below receives them.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits for one of the blocked signals with a valid set and output pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            INTERRUPTED.store(true, Ordering::Relaxed);
        }
    });
}

/// Threads walking the trees: the work is waiting on reads through two FUSE overlays and loop
/// devices, so a few walkers overlap those waits.
const WALKERS: usize = 4;

type Job = (PathBuf, PathBuf, String);

/// Directory pairs waiting to be compared, shared by the walkers.
struct Queue {
    /// Jobs, and how many walkers are busy with one (and may add more).
    state: Mutex<(Vec<Job>, usize)>,
    cv: Condvar,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            state: Mutex::new((Vec::new(), 0)),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Job>, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, job: Job) {
        self.lock().0.push(job);
        self.cv.notify_one();
    }

    /// The next job, or `None` once no job is left and no walker can add one.
    fn next(&self) -> Option<Job> {
        let mut st = self.lock();
        loop {
            if interrupted() {
                self.cv.notify_all();
                return None;
            }
            if let Some(j) = st.0.pop() {
                st.1 += 1;
                return Some(j);
            }
            if st.1 == 0 {
                self.cv.notify_all();
                return None;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn done(&self) {
        let mut st = self.lock();
        st.1 -= 1;
        if st.1 == 0 && st.0.is_empty() {
            self.cv.notify_all();
        }
    }
}

struct Busy<'q>(&'q Queue);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.done();
    }
}

struct Walker<'a> {
    report: DiffReport,
    dirty: &'a Dirty<'a>,
    queue: &'a Queue,
    buf_a: Vec<u8>,
    buf_b: Vec<u8>,
}

fn sorted_entries(dir: &Path) -> io::Result<BTreeMap<OsString, PathBuf>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        out.insert(e.file_name(), e.path());
    }
    Ok(out)
}

fn join(rel: &str, name: &std::ffi::OsStr) -> String {
    format!("{rel}/{}", name.to_string_lossy())
}

impl<'a> Walker<'a> {
    fn new(dirty: &'a Dirty<'a>, queue: &'a Queue) -> Walker<'a> {
        Walker {
            report: DiffReport::default(),
            dirty,
            queue,
            buf_a: vec![0u8; 1 << 20],
            buf_b: vec![0u8; 1 << 20],
        }
    }

    fn error(&mut self, path: &str, e: impl std::fmt::Display) {
        self.report.errors.push(format!("{path}: {e}"));
    }

    /// Every entry under `dir` (which itself was added or removed).
    fn all_under(&mut self, dir: &Path, rel: &str, status: &'static str) {
        let entries = match sorted_entries(dir) {
            Ok(e) => e,
            Err(e) => return self.error(rel, e),
        };
        for (name, p) in entries {
            let r = join(rel, &name);
            self.report.files += 1;
            self.report.changes.push(Change {
                path: r.clone(),
                status,
                what: Vec::new(),
            });
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
                self.all_under(&p, &r, status);
            }
        }
    }

    fn dirs(&mut self, a: &Path, b: &Path, rel: &str) {
        let (ea, eb) = match (sorted_entries(a), sorted_entries(b)) {
            (Ok(x), Ok(y)) => (x, y),
            (Err(e), _) | (_, Err(e)) => return self.error(rel, e),
        };
        let mut names: Vec<&OsString> = ea.keys().chain(eb.keys()).collect();
        names.sort();
        names.dedup();
        for name in names {
            let r = join(rel, name);
            match (ea.get(name), eb.get(name)) {
                (Some(pa), Some(pb)) => self.entry(pa, pb, &r),
                (Some(pa), None) => self.one_side(pa, &r, "D"),
                (None, Some(pb)) => self.one_side(pb, &r, "A"),
                (None, None) => {}
            }
        }
    }

    fn one_side(&mut self, p: &Path, rel: &str, status: &'static str) {
        self.report.files += 1;
        self.report.changes.push(Change {
            path: rel.to_string(),
            status,
            what: Vec::new(),
        });
        if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
            self.all_under(p, rel, status);
        }
    }

    fn entry(&mut self, a: &Path, b: &Path, rel: &str) {
        self.report.files += 1;
        let (ma, mb) = match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
            (Ok(x), Ok(y)) => (x, y),
            (Err(e), _) | (_, Err(e)) => return self.error(rel, e),
        };
        let (ta, tb) = (ma.file_type(), mb.file_type());
        if ma.mode() & libc::S_IFMT != mb.mode() & libc::S_IFMT {
            self.report.changes.push(Change {
                path: rel.to_string(),
                status: "M",
                what: vec!["type"],
            });
            if ta.is_dir() {
                self.all_under(a, rel, "D");
            }
            if tb.is_dir() {
                self.all_under(b, rel, "A");
            }
            return;
        }
        let mut what = Vec::new();
        if ma.mode() & 0o7777 != mb.mode() & 0o7777 {
            what.push("mode");
        }
        if ma.uid() != mb.uid() || ma.gid() != mb.gid() {
            what.push("owner");
        }
        if ta.is_symlink() {
            match (std::fs::read_link(a), std::fs::read_link(b)) {
                (Ok(x), Ok(y)) if x != y => what.push("target"),
                (Ok(_), Ok(_)) => {}
                (Err(e), _) | (_, Err(e)) => return self.error(rel, e),
            }
        } else if ta.is_file() {
            if ma.len() != mb.len() {
                what.push("size");
                what.push("content");
            } else {
                match self.same_content(a, b, ma.len()) {
                    Ok(true) => {}
                    Ok(false) => what.push("content"),
                    Err(e) => return self.error(rel, e),
                }
            }
        } else if (ta.is_block_device() || ta.is_char_device()) && ma.rdev() != mb.rdev() {
            what.push("device");
        }
        if !what.is_empty() {
            self.report.changes.push(Change {
                path: rel.to_string(),
                status: "M",
                what,
            });
        }
        if ta.is_dir() {
            self.queue
                .push((a.to_path_buf(), b.to_path_buf(), rel.to_string()));
        }
    }

    /// Whether two regular files of the same size `len` hold the same bytes.
    fn same_content(&mut self, a: &Path, b: &Path, len: u64) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
        if self.dirty.fiemap_usable
            && self.dirty.changed.is_some()
            && let (Ok(xa), Ok(xb)) = (fiemap(&fa), fiemap(&fb))
            && xa == xb
            && !xa.is_empty()
            && xa.iter().all(|e| e.3 & FIEMAP_OPAQUE == 0)
            && !xa.iter().any(|e| self.dirty.touches(e.1, e.2))
        {
            self.report.unchanged_by_map += 1;
            return Ok(true);
        }
        self.report.compared_by_content += 1;
        loop {
            if interrupted() {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            let n = read_full(&mut fa, &mut self.buf_a)?;
            let m = read_full(&mut fb, &mut self.buf_b)?;
            if n != m || self.buf_a[..n] != self.buf_b[..m] {
                return Ok(false);
            }
            if n == 0 {
                return Ok(true);
            }
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match f.read(&mut buf[at..])? {
            0 => break,
            n => at += n,
        }
    }
    Ok(at)
}

/// Compare point `spec_a` with `spec_b` (same disk), optionally only under `path`.
pub fn diff(
    repo: &Repository,
    spec_a: &str,
    spec_b: &str,
    path: Option<&str>,
    opts: &BrowseOptions,
) -> Result<DiffReport> {
    let started = Instant::now();
    let tree = Tree::build(repo.catalog()?);
    let (set_a, seq_a) = tree
        .resolve(spec_a)
        .map_err(|e| anyhow::anyhow!("point {spec_a:?}: {e}"))?;
    let (set_b, seq_b) = tree
        .resolve(spec_b)
        .map_err(|e| anyhow::anyhow!("point {spec_b:?}: {e}"))?;
    if set_a.vdi != set_b.vdi {
        bail!(
            "{spec_a} and {spec_b} are points of different disks ({} and {}); diff compares two points of one disk",
            set_a.vdi,
            set_b.vdi
        );
    }
    let mut report = DiffReport::default();
    // The blocks written between the two points: the union of the bitmaps of the points
    // after the older one, up to the newer one.
    let changed = if set_a.id == set_b.id {
        let (lo, hi) = (seq_a.min(seq_b), seq_a.max(seq_b));
        let mut u = RoaringBitmap::new();
        for m in &set_a.points[lo as usize + 1..=hi as usize] {
            let p = repo
                .open_point(m)
                .with_context(|| format!("reading the changed blocks of {}", m.label()))?;
            u |= &p.index.changed;
        }
        Some(u)
    } else {
        report.full_compare = Some(format!(
            "the points are in different sets ({} and {}), with no changed-block chain between them",
            set_a.id, set_b.id
        ));
        None
    };

    let work = tempdir()?;
    let sessions = (|| -> Result<(Session, Session)> {
        let a = Session::start(repo, spec_a, &work.0.join("a"), opts)?;
        match Session::start(repo, spec_b, &work.0.join("b"), opts) {
            Ok(b) => Ok((a, b)),
            Err(e) => {
                let mut a = a;
                let _ = a.end();
                Err(e)
            }
        }
    })();
    let (mut sa, mut sb) = sessions?;
    report.a = sa.label.clone();
    report.b = sb.label.clone();
    let result = compare_sessions(&sa, &sb, changed.as_ref(), path, &mut report);
    let ends = (sa.end(), sb.end());
    result?;
    if interrupted() {
        bail!("interrupted: the comparison stopped and both points were unmounted");
    }
    ends.0?;
    ends.1?;
    report.changes.sort();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn compare_sessions(
    sa: &Session,
    sb: &Session,
    changed: Option<&RoaringBitmap>,
    path: Option<&str>,
    report: &mut DiffReport,
) -> Result<()> {
    let mounted = |s: &Session, name: &str| {
        s.outcomes
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| o.mounted.clone().map(|m| (m, o.detail.clone())))
    };
    // Why a volume is not mounted in a session (it exists there).
    let why_not = |s: &Session, name: &str| {
        s.outcomes
            .iter()
            .find(|o| o.name == name && o.mounted.is_none())
            .map(|o| o.detail.clone())
    };
    // Volumes browsed, and those the layout names but could not read (a damaged LVM PV…).
    let mut names: Vec<&str> = sa
        .volumes
        .iter()
        .chain(sb.volumes.iter())
        .map(|v| v.name.as_str())
        .chain(
            sa.outcomes
                .iter()
                .chain(sb.outcomes.iter())
                .map(|o| o.name.as_str()),
        )
        .collect();
    names.sort();
    names.dedup();
    // PATH: `VOLUME/sub/path` names one volume; anything else applies inside every volume.
    let (only, sub) = match path.map(|p| p.trim_matches('/')) {
        Some(p) if !p.is_empty() => {
            let (first, rest) = p.split_once('/').unwrap_or((p, ""));
            if names.contains(&first) {
                (Some(first.to_string()), rest.to_string())
            } else {
                (None, p.to_string())
            }
        }
        _ => (None, String::new()),
    };
    // Whether PATH was found in some compared volume of either point.
    let mut path_found = false;
    for name in names {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let (va, vb) = (
            sa.volumes.iter().find(|v| v.name == name),
            sb.volumes.iter().find(|v| v.name == name),
        );
        let (ma, mb) = (mounted(sa, name), mounted(sb, name));
        let (Some(va), Some(vb), Some((ra, da)), Some((rb, _))) = (va, vb, ma, mb) else {
            let content = |s: &Session| {
                s.outcomes
                    .iter()
                    .find(|o| o.name == name)
                    .and_then(|o| o.content.clone())
            };
            let (ca, cb) = (content(sa), content(sb));
            if ca == cb && matches!(ca.as_deref(), Some("swap" | "lvm2 pv")) {
                report.volumes.push(VolumeResult {
                    name: name.to_string(),
                    compared: false,
                    reason: why_not(sa, name),
                    no_files: true,
                    unchanged: false,
                });
                continue;
            }
            // Same place in both points and no block of it written in between: unchanged.
            if let (Some(va), Some(vb), Some(_)) = (va, vb, changed)
                && va.extents == vb.extents
                && !(Dirty {
                    volume: va,
                    changed,
                    replayed: Vec::new(),
                    fiemap_usable: false,
                })
                .touches(0, va.size)
            {
                report.volumes.push(VolumeResult {
                    name: name.to_string(),
                    compared: false,
                    reason: why_not(sa, name).map(|w| {
                        format!(
                            "{w}; no block of it changed between the points: its bytes are the same"
                        )
                    }),
                    no_files: false,
                    unchanged: true,
                });
                continue;
            }
            let in_a = va.is_some() || sa.outcomes.iter().any(|o| o.name == name);
            let in_b = vb.is_some() || sb.outcomes.iter().any(|o| o.name == name);
            let why = match (in_a, in_b) {
                (true, false) => format!("it exists only in {}", sa.label),
                (false, true) => format!("it exists only in {}", sb.label),
                _ => {
                    let side =
                        |s: &Session| why_not(s, name).map(|w| format!("in {}: {w}", s.label));
                    let sides: Vec<String> = [side(sa), side(sb)].into_iter().flatten().collect();
                    format!(
                        "its filesystem could not be mounted ({})",
                        if sides.is_empty() {
                            "no reason given".to_string()
                        } else {
                            sides.join("; ")
                        }
                    )
                }
            };
            report.volumes.push(VolumeResult {
                name: name.to_string(),
                compared: false,
                reason: Some(why),
                no_files: false,
                unchanged: false,
            });
            continue;
        };
        report.volumes.push(VolumeResult {
            name: name.to_string(),
            compared: true,
            reason: None,
            no_files: false,
            unchanged: false,
        });
        let (ra, rb) = if sub.is_empty() {
            (ra, rb)
        } else {
            (ra.join(&sub), rb.join(&sub))
        };
        let same_layout = va.extents == vb.extents;
        if !same_layout {
            report.notes.push(format!(
                "volume {name} moved or changed size between the points: its files are compared by content"
            ));
        }
        let idx_a = sa.volumes.iter().position(|v| v.name == name);
        let idx_b = sb.volumes.iter().position(|v| v.name == name);
        let mut replayed = Vec::new();
        if let (Some(i), Some(j)) = (idx_a, idx_b) {
            replayed.extend(sa.files[i].written_ranges());
            replayed.extend(sb.files[j].written_ranges());
        }
        let kernel_fs = da.starts_with("kernel ") && !da.starts_with("kernel btrfs");
        let dirty = Dirty {
            volume: va,
            changed: if same_layout { changed } else { None },
            replayed,
            fiemap_usable: kernel_fs,
        };
        let rel = if sub.is_empty() {
            name.to_string()
        } else {
            format!("{name}/{sub}")
        };
        let queue = Queue::new();
        let mut root = Walker::new(&dirty, &queue);
        path_found |= ra.exists() || rb.exists();
        match (ra.exists(), rb.exists()) {
            (true, true) => root.entry(&ra, &rb, &rel),
            (true, false) => root.one_side(&ra, &rel, "D"),
            (false, true) => root.one_side(&rb, &rel, "A"),
            (false, false) => {}
        }
        let mut parts = vec![root.report];
        std::thread::scope(|scope| {
            let walkers: Vec<_> = (0..WALKERS)
                .map(|_| {
                    scope.spawn(|| {
                        let mut w = Walker::new(&dirty, &queue);
                        while let Some((a, b, rel)) = queue.next() {
                            // Marks the job done even if the walk panics, so no walker waits
                            // forever for it.
                            let _busy = Busy(&queue);
                            w.dirs(&a, &b, &rel);
                        }
                        w.report
                    })
                })
                .collect();
            for h in walkers {
                parts.push(h.join().unwrap_or_else(|_| DiffReport {
                    errors: vec![format!("{name}: internal error: a walker thread failed")],
                    ..DiffReport::default()
                }));
            }
        });
        for p in parts {
            report.changes.extend(p.changes);
            report.errors.extend(p.errors);
            report.files += p.files;
            report.compared_by_content += p.compared_by_content;
            report.unchanged_by_map += p.unchanged_by_map;
        }
    }
    // A mistyped PATH must not pass for "no changes".
    if !sub.is_empty() && !path_found && report.volumes.iter().any(|v| v.compared) {
        let shown = match &only {
            Some(v) => format!("{v}/{sub}"),
            None => sub.clone(),
        };
        report.errors.push(format!(
            "{shown}: no such path in either point (give VOLUME/PATH, e.g. p1/etc, as `cbtfs ls --volumes` names the volumes)"
        ));
    }
    Ok(())
}

/// A private working directory, removed on drop.
struct TempDir(PathBuf);

fn tempdir() -> Result<TempDir> {
    use std::os::unix::fs::DirBuilderExt;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let p = std::env::temp_dir().join(format!(
        "cbtfs-diff-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(nonce)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&p)
        .with_context(|| format!("creating {}", p.display()))?;
    Ok(TempDir(p))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Not recursive: never walk into a filesystem a failed unmount left behind.
        let _ = std::fs::remove_dir(self.0.join("a"));
        let _ = std::fs::remove_dir(self.0.join("b"));
        let _ = std::fs::remove_dir(&self.0);
    }
}
