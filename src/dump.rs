//! `cbtfs dump`: one file from inside a guest filesystem of a restore point, or (as a tar stream)
//! a whole directory, without root and without loop devices.
//!
//! The point is browsed in userspace-only mode (`browse::BrowseOptions { userspace: true }`):
//! its volumes are served by a private FUSE overlay and each filesystem is mounted by its FUSE
//! driver (fuse2fs, ntfs-3g, fusefat) in a private temporary directory, so any user who can
//! read the repository can do it. Root may also read XFS and Btrfs, which have no userspace
//! driver: for a point that needs them, root uses the kernel's drivers instead. Everything is
//! unmounted when the work ends, on error, and on Ctrl-C ([`Mounted`] ends the browse on drop;
//! the browse's state file lets the next browse clean up after a `kill -9`).
//!
//! Reading through the drivers, rather than parsing each filesystem here, reuses what the
//! browse already does well (journal replay into the overlay, every filesystem it knows) and
//! keeps cbtfs free of a second ext4/NTFS/FAT parser of untrusted bytes.
//!
//! Paths are resolved the way the guest would: its symbolic links are followed inside the
//! volume (an absolute target starts at the volume's root, `..` never climbs above it), never
//! on this host, so `/etc/localtime -> /usr/share/zoneinfo/UTC` gives the guest's file. A link
//! named last is followed for a plain dump (its target's bytes are written) and kept as a link
//! with `--tar` (as `tar` does).
//!
//! The tar stream (GNU format, written by the `tar` crate) keeps each entry's numeric owner,
//! mode, mtime, symbolic links, device nodes and fifos, and hard links between files of the
//! dumped tree; user and group names are left empty (a guest filesystem stores numbers only,
//! and this host's names for them would be wrong), so `tar -x` as root restores the guest's
//! numeric owners. Sockets cannot be stored in tar: they are left out, with a warning.

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::browse::{BrowseOptions, Session};
use crate::repo::Repository;

/// The kernel's limit on symbolic links followed in one lookup (Linux's MAXSYMLINKS).
const MAX_SYMLINKS: u32 = 40;

/// Filesystems no FUSE driver reads: only root (the kernel's drivers) can.
const KERNEL_ONLY: [&str; 2] = ["xfs", "btrfs"];

/// Copy buffer: large enough for FUSE's 128 KiB-1 MiB requests.
const COPY_BUF: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Opening or browsing the point failed (its text names the point).
    #[error("{0:#}")]
    Browse(anyhow::Error),
    #[error(
        "point {point} has no volume {volume:?}; its volumes: {available} (`cbtfs ls --volumes POINT` describes them)"
    )]
    NoVolume {
        point: String,
        volume: String,
        available: String,
    },
    #[error(
        "volume {volume} of point {point} holds {fs}, which no userspace (FUSE) driver reads: run this as root to read it with the kernel's {fs} driver"
    )]
    NeedsRoot {
        point: String,
        volume: String,
        fs: String,
    },
    #[error("volume {volume} of point {point} ({fs}) could not be mounted: {reason}")]
    NotMounted {
        point: String,
        volume: String,
        fs: String,
        reason: String,
    },
    #[error(
        "{volume}/{path} does not exist in point {point} (volume {volume}){why}; `cbtfs find` lists the points that have it"
    )]
    NotFound {
        point: String,
        volume: String,
        path: String,
        why: String,
    },
    #[error(
        "{volume}/{path} in point {point} is a directory: add --tar to write it, and everything under it, as a tar stream"
    )]
    IsDirectory {
        point: String,
        volume: String,
        path: String,
    },
    #[error(
        "{volume}/{path} in point {point} is a {kind}, not a regular file: add --tar to keep it as what it is"
    )]
    NotRegular {
        point: String,
        volume: String,
        path: String,
        kind: &'static str,
    },
    #[error(
        "{volume}/{path} in point {point}: more than {MAX_SYMLINKS} symbolic links on the way (a loop?)"
    )]
    SymlinkLoop {
        point: String,
        volume: String,
        path: String,
    },
    #[error("{0}")]
    BadPath(String),
    #[error("reading {what} in point {point}: {source}{}", read_hint(source))]
    Read {
        point: String,
        what: String,
        source: io::Error,
    },
    #[error("writing {what}: {source}")]
    Write { what: String, source: io::Error },
    #[error("interrupted: stopped, and the point was unmounted")]
    Interrupted,
}

fn read_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EIO) {
        " (the repository may be damaged there: `cbtfs verify` says)"
    } else {
        ""
    }
}

impl RecoveryError {
    /// The reader of standard output went away (`| head`): not worth an error message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, RecoveryError::Write { source, .. } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

type Result<T, E = RecoveryError> = std::result::Result<T, E>;

fn interrupted() -> Result<()> {
    if crate::diff::interrupted() {
        Err(RecoveryError::Interrupted)
    } else {
        Ok(())
    }
}

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A user other than root mounts FUSE filesystems through the setuid fusermount3, but the
/// drivers (fuser, libfuse) first open /dev/fuse themselves: it must be open to every user,
/// as udev's default rule makes it (mode 0666). Say so, rather than let fuse2fs fail later
/// with a bare "Permission denied".
pub(crate) fn fuse_usable() -> Result<()> {
    let dev = c"/dev/fuse";
    // SAFETY: `dev` is a valid NUL-terminated path.
    if unsafe { libc::access(dev.as_ptr(), libc::R_OK | libc::W_OK) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    Err(RecoveryError::Browse(anyhow::anyhow!(
        "/dev/fuse cannot be opened by this user ({e}): reading a point's files without root needs FUSE open to every user, as udev's default rule sets it (`chmod 0666 /dev/fuse` as root, or install the fuse3 package); or run this as root"
    )))
}

/// A private working directory (0700) in `$TMPDIR`, removed on drop (never recursively: a
/// filesystem a failed unmount left behind is not walked into).
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<WorkDir> {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce)
            .map_err(|e| RecoveryError::Browse(anyhow::anyhow!("random numbers: {e}")))?;
        let p = std::env::temp_dir().join(format!(
            "cbtfs-dump-{}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(nonce)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(|e| {
                RecoveryError::Browse(anyhow::anyhow!(
                    "creating the private folder {}: {e} (set TMPDIR to a folder you can write)",
                    p.display()
                ))
            })?;
        Ok(WorkDir(p))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(self.0.join("fs"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// One volume of a mounted point, as the browse left it.
#[derive(Debug, Clone)]
pub struct VolumeState {
    pub name: String,
    /// The filesystem (`ext4`, `ntfs`), if recognised.
    pub fs: Option<String>,
    /// Where its filesystem is mounted, or why it is not.
    pub mounted: std::result::Result<PathBuf, String>,
}

impl VolumeState {
    fn fs_text(&self) -> String {
        self.fs
            .clone()
            .unwrap_or_else(|| "no known filesystem".into())
    }

    /// Whether it holds a filesystem that can have files (not swap, an LVM PV or a gap).
    pub fn holds_files(&self) -> bool {
        matches!(
            self.fs.as_deref(),
            Some("ext2" | "ext3" | "ext4" | "xfs" | "btrfs" | "ntfs" | "vfat")
        )
    }

    /// The mounted root, or the error saying why it cannot be read.
    pub fn root(&self, point: &str) -> Result<&Path> {
        match &self.mounted {
            Ok(p) => Ok(p),
            Err(reason) => {
                let fs = self.fs_text();
                if !is_root() && KERNEL_ONLY.contains(&fs.as_str()) {
                    Err(RecoveryError::NeedsRoot {
                        point: point.into(),
                        volume: self.name.clone(),
                        fs,
                    })
                } else {
                    Err(RecoveryError::NotMounted {
                        point: point.into(),
                        volume: self.name.clone(),
                        fs,
                        reason: reason.clone(),
                    })
                }
            }
        }
    }
}

/// A point's filesystems mounted read-only in a private temporary directory; dropping it
/// unmounts them and removes everything the browse made.
pub struct Mounted {
    session: Option<Session>,
    /// Removed on drop, after the session has ended (fields drop after `Drop::drop`).
    _work: WorkDir,
    /// The point's name as `cbtfs ls` shows it.
    pub point: String,
    pub volumes: Vec<VolumeState>,
}

impl Mounted {
    /// Mount point `point` (any name `cbtfs` accepts; the canonical one reads best in errors).
    /// `wanted` names the volume the caller needs (`None`: all): root switches to the kernel's
    /// drivers only when a wanted volume needs them.
    pub fn open(repo: &Repository, point: &str, wanted: Option<&str>) -> Result<Mounted> {
        if !is_root() {
            fuse_usable()?;
        }
        let work = WorkDir::new()?;
        let dir = work.0.join("fs");
        let userspace = Session::start(
            repo,
            point,
            &dir,
            &BrowseOptions {
                userspace: true,
                secret: None,
            },
        )
        .map_err(RecoveryError::Browse)?;
        let mut m = Mounted::from_session(userspace, work);
        // A name that is no volume of this point (find's path in every volume): all wanted.
        let wanted = wanted.filter(|w| m.volumes.iter().any(|v| v.name == *w));
        let needs_kernel = m.volumes.iter().any(|v| {
            wanted.is_none_or(|w| w == v.name)
                && v.mounted.is_err()
                && v.fs.as_deref().is_some_and(|f| KERNEL_ONLY.contains(&f))
        });
        if needs_kernel && is_root() {
            m.end()?;
            let work = WorkDir::new()?;
            let dir = work.0.join("fs");
            let kernel = Session::start(
                repo,
                point,
                &dir,
                &BrowseOptions {
                    userspace: false,
                    secret: None,
                },
            )
            .map_err(RecoveryError::Browse)?;
            m = Mounted::from_session(kernel, work);
        }
        Ok(m)
    }

    fn from_session(s: Session, work: WorkDir) -> Mounted {
        let volumes = s
            .volumes
            .iter()
            .map(|v| {
                let o = s.outcomes.iter().find(|o| o.name == v.name);
                VolumeState {
                    name: v.name.clone(),
                    fs: v.content.clone(),
                    mounted: match o {
                        Some(o) => o.mounted.clone().ok_or_else(|| o.detail.clone()),
                        None => Err("not mounted".into()),
                    },
                }
            })
            .collect();
        Mounted {
            point: s.label.clone(),
            session: Some(s),
            _work: work,
            volumes,
        }
    }

    /// The volume called `name`, or an error listing the point's volumes.
    pub fn volume(&self, name: &str) -> Result<&VolumeState> {
        self.volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| RecoveryError::NoVolume {
                point: self.point.clone(),
                volume: name.into(),
                available: self.volume_list(),
            })
    }

    /// `p1 (ext4), p2 (swap)`.
    pub fn volume_list(&self) -> String {
        if self.volumes.is_empty() {
            return "none".into();
        }
        self.volumes
            .iter()
            .map(|v| format!("{} ({})", v.name, v.fs_text()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Unmount everything now (errors are reported; drop does the same, quietly).
    pub fn end(&mut self) -> Result<()> {
        if let Some(mut s) = self.session.take() {
            s.end().map_err(RecoveryError::Browse)?;
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.end() {
            tracing::warn!(point = %self.point, "unmounting: {e}");
        }
    }
}

/// `VOLUME/PATH` split into the volume and the path's components (`.` and empty dropped).
/// `..` is refused: a path inside a guest names something under the volume.
pub fn split_target(target: &str) -> Result<(String, Vec<OsString>)> {
    let t = target.trim_start_matches('/');
    let mut parts = t.split('/').filter(|c| !c.is_empty() && *c != ".");
    let Some(volume) = parts.next() else {
        return Err(RecoveryError::BadPath(format!(
            "{target:?} names no volume: give VOLUME/PATH, like p1/etc/hosts (`cbtfs ls --volumes POINT` lists the volumes)"
        )));
    };
    let rest: Vec<OsString> = parts.map(OsString::from).collect();
    if volume == ".." || rest.iter().any(|c| c == "..") {
        return Err(RecoveryError::BadPath(format!(
            "{target:?}: `..` is not allowed; name the path from the volume's root"
        )));
    }
    Ok((volume.to_string(), rest))
}

fn join_guest(parts: &[OsString]) -> String {
    let mut s = String::new();
    for p in parts {
        if !s.is_empty() {
            s.push('/');
        }
        s.push_str(&p.to_string_lossy());
    }
    s
}

/// Why a path could not be resolved inside a guest filesystem.
#[derive(Debug)]
pub enum ResolveError {
    /// This part of the path (from the volume's root, after links) is missing.
    NotFound(String),
    /// This part of the path is not a directory, yet more follows it.
    NotDir(String),
    Loop,
    Io(io::Error),
}

/// A path resolved inside a mounted guest filesystem.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// On this host, under the volume's mount.
    pub host: PathBuf,
    /// Components from the volume's root, after the guest's links.
    pub guest: Vec<OsString>,
    pub meta: std::fs::Metadata,
}

/// Resolve `rel` under the guest filesystem mounted at `root` as the guest would: symbolic
/// links are followed inside the volume (an absolute target from its root, `..` stops at the
/// root), at most [`MAX_SYMLINKS`] of them; the last component's link is followed only if
/// `follow_last`. Never follows a link on this host.
pub fn resolve_in(
    root: &Path,
    rel: &[OsString],
    follow_last: bool,
) -> std::result::Result<Resolved, ResolveError> {
    let mut todo: VecDeque<OsString> = rel.iter().cloned().collect();
    let mut cur: Vec<OsString> = Vec::new();
    let mut hops = 0u32;
    let mut meta = std::fs::symlink_metadata(root).map_err(ResolveError::Io)?;
    while let Some(c) = todo.pop_front() {
        if c.is_empty() || c == "." {
            continue;
        }
        if c == ".." {
            cur.pop();
            let p = host_path(root, &cur);
            meta = std::fs::symlink_metadata(&p).map_err(ResolveError::Io)?;
            continue;
        }
        if !meta.is_dir() {
            return Err(ResolveError::NotDir(join_guest(&cur)));
        }
        cur.push(c);
        let p = host_path(root, &cur);
        let md = match std::fs::symlink_metadata(&p) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ResolveError::NotFound(join_guest(&cur)));
            }
            Err(e) => return Err(ResolveError::Io(e)),
        };
        let last = todo.is_empty();
        if md.file_type().is_symlink() && (!last || follow_last) {
            hops += 1;
            if hops > MAX_SYMLINKS {
                return Err(ResolveError::Loop);
            }
            let target = std::fs::read_link(&p).map_err(ResolveError::Io)?;
            cur.pop();
            let tb = target.as_os_str().as_bytes();
            if tb.first() == Some(&b'/') {
                cur.clear();
            }
            for part in tb.split(|&b| b == b'/').rev() {
                todo.push_front(OsStr::from_bytes(part).to_os_string());
            }
            meta = std::fs::symlink_metadata(host_path(root, &cur)).map_err(ResolveError::Io)?;
            continue;
        }
        meta = md;
    }
    Ok(Resolved {
        host: host_path(root, &cur),
        guest: cur,
        meta,
    })
}

fn host_path(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in parts {
        p.push(c);
    }
    p
}

/// The kind of a file, in words.
pub fn kind_of(ft: &std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "file"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// What one dump wrote.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DumpReport {
    /// The point, as `cbtfs ls` names it.
    pub point: String,
    pub volume: String,
    /// The path inside the volume, after the guest's symbolic links.
    pub path: String,
    /// Bytes of file data written (without tar headers).
    pub bytes: u64,
    /// Tar entries written (0 without --tar).
    pub entries: u64,
    /// What could not be kept (sockets).
    pub warnings: Vec<String>,
}

/// Write `target` (`VOLUME/PATH`) of point `point` to `out`: the file's bytes, or with `tar`
/// a tar stream of the file or directory.
pub fn dump(
    repo: &Repository,
    point: &str,
    target: &str,
    tar: bool,
    out: &mut dyn Write,
) -> Result<DumpReport> {
    let (volume, rel) = split_target(target)?;
    let mut m = Mounted::open(repo, point, Some(&volume))?;
    let r = dump_mounted(&m, &volume, &rel, tar, out);
    let ended = m.end();
    let report = r?;
    ended?;
    Ok(report)
}

/// `dump` into `path`: written aside and renamed into place when complete, so a failed dump
/// never leaves a half-written file under the name (an existing regular file is replaced);
/// devices and pipes (`/dev/null`, a fifo) are written directly.
pub fn dump_to_path(
    repo: &Repository,
    point: &str,
    target: &str,
    tar: bool,
    path: &Path,
) -> Result<DumpReport> {
    let werr = |what: &Path, source: io::Error| RecoveryError::Write {
        what: what.display().to_string(),
        source,
    };
    if let Ok(md) = std::fs::metadata(path) {
        if md.is_dir() {
            return Err(RecoveryError::BadPath(format!(
                "-o {} is a directory: name the file to write",
                path.display()
            )));
        }
        if !md.is_file() {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| werr(path, e))?;
            return dump(repo, point, target, tar, &mut f);
        }
    }
    let name = path
        .file_name()
        .ok_or_else(|| RecoveryError::BadPath(format!("-o {}: name a file", path.display())))?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".cbtfs-{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .open(&tmp)
        .map_err(|e| werr(&tmp, e))?;
    let r = dump(repo, point, target, tar, &mut f)
        .and_then(|rep| f.sync_all().map(|_| rep).map_err(|e| werr(&tmp, e)))
        .and_then(|rep| {
            std::fs::rename(&tmp, path)
                .map(|_| rep)
                .map_err(|e| werr(path, e))
        });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// The dump itself, on a mounted point.
pub fn dump_mounted(
    m: &Mounted,
    volume: &str,
    rel: &[OsString],
    tar: bool,
    out: &mut dyn Write,
) -> Result<DumpReport> {
    let v = m.volume(volume)?;
    let root = v.root(&m.point)?;
    let shown = join_guest(rel);
    let res = resolve_in(root, rel, !tar).map_err(|e| match e {
        ResolveError::NotFound(why) => RecoveryError::NotFound {
            point: m.point.clone(),
            volume: volume.into(),
            path: shown.clone(),
            why: if why == shown {
                String::new()
            } else {
                format!(": {why} is missing")
            },
        },
        ResolveError::NotDir(p) => RecoveryError::NotFound {
            point: m.point.clone(),
            volume: volume.into(),
            path: shown.clone(),
            why: format!(": {p} is not a directory"),
        },
        ResolveError::Loop => RecoveryError::SymlinkLoop {
            point: m.point.clone(),
            volume: volume.into(),
            path: shown.clone(),
        },
        ResolveError::Io(source) => RecoveryError::Read {
            point: m.point.clone(),
            what: format!("{volume}/{shown}"),
            source,
        },
    })?;
    let mut report = DumpReport {
        point: m.point.clone(),
        volume: volume.into(),
        path: join_guest(&res.guest),
        bytes: 0,
        entries: 0,
        warnings: Vec::new(),
    };
    if tar {
        let mut w = TarWriter::new(m, volume, out);
        // The archive's top entry: the dumped file or folder by its own name; a whole volume
        // becomes the archive's top level.
        let top = match res.guest.last() {
            Some(n) => PathBuf::from(n),
            None => PathBuf::new(),
        };
        w.tree(&res.host, &res.guest, &top, &mut report)?;
        w.finish()?;
        return Ok(report);
    }
    let ft = res.meta.file_type();
    if ft.is_dir() {
        return Err(RecoveryError::IsDirectory {
            point: m.point.clone(),
            volume: volume.into(),
            path: report.path,
        });
    }
    if !ft.is_file() {
        return Err(RecoveryError::NotRegular {
            point: m.point.clone(),
            volume: volume.into(),
            path: report.path,
            kind: kind_of(&ft),
        });
    }
    let what = format!("{volume}/{}", report.path);
    let f = open_nofollow(&res.host).map_err(|source| RecoveryError::Read {
        point: m.point.clone(),
        what: what.clone(),
        source,
    })?;
    report.bytes = copy_exact(&m.point, &what, f, res.meta.len(), out)?;
    out.flush().map_err(|source| RecoveryError::Write {
        what: "the output".into(),
        source,
    })?;
    Ok(report)
}

fn open_nofollow(p: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
}

/// Copy exactly `len` bytes of `f` to `out`: a file that ends early is an error, never a
/// short copy presented as whole (the filesystem is read-only, so it cannot legitimately grow
/// or shrink meanwhile).
fn copy_exact(point: &str, what: &str, mut f: File, len: u64, out: &mut dyn Write) -> Result<u64> {
    let rerr = |source: io::Error| RecoveryError::Read {
        point: point.into(),
        what: what.into(),
        source,
    };
    let mut buf = vec![0u8; COPY_BUF];
    let mut done = 0u64;
    while done < len {
        interrupted()?;
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = match f.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(rerr(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended after {done} of its {len} bytes"),
                )));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(rerr(e)),
        };
        out.write_all(&buf[..n])
            .map_err(|source| RecoveryError::Write {
                what: "the output".into(),
                source,
            })?;
        done += n as u64;
    }
    Ok(done)
}

/// A reader giving exactly `len` bytes of a file (an error if it ends early), for tar entries
/// whose header already states the size.
struct Exact {
    f: File,
    left: u64,
    len: u64,
    /// The first read error, kept to report it with the file's name.
    failed: Option<io::Error>,
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        if crate::diff::interrupted() {
            // Not ErrorKind::Interrupted: copy loops retry that forever.
            return Err(io::Error::other("interrupted by a signal"));
        }
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let r = match self.f.read(&mut buf[..want]) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file ended after {} of its {} bytes",
                    self.len - self.left,
                    self.len
                ),
            )),
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &r
            && e.kind() != io::ErrorKind::Interrupted
        {
            self.failed = Some(io::Error::new(e.kind(), e.to_string()));
        }
        r
    }
}

/// The tar stream of a dump.
struct TarWriter<'a> {
    m: &'a Mounted,
    volume: &'a str,
    b: tar::Builder<&'a mut dyn Write>,
    /// Files with several links already written: (device, inode) → their name in the archive.
    links: HashMap<(u64, u64), PathBuf>,
}

impl<'a> TarWriter<'a> {
    fn new(m: &'a Mounted, volume: &'a str, out: &'a mut dyn Write) -> TarWriter<'a> {
        let mut b = tar::Builder::new(out);
        b.mode(tar::HeaderMode::Complete);
        TarWriter {
            m,
            volume,
            b,
            links: HashMap::new(),
        }
    }

    fn werr(source: io::Error) -> RecoveryError {
        RecoveryError::Write {
            what: "the tar stream".into(),
            source,
        }
    }

    fn rerr(&self, guest: &[OsString], source: io::Error) -> RecoveryError {
        RecoveryError::Read {
            point: self.m.point.clone(),
            what: format!("{}/{}", self.volume, join_guest(guest)),
            source,
        }
    }

    /// Archive `host` (the guest's `guest`) as `name`, and everything under it. Iterative: the
    /// depth of a guest's tree costs heap, never stack.
    fn tree(
        &mut self,
        host: &Path,
        guest: &[OsString],
        name: &Path,
        report: &mut DumpReport,
    ) -> Result<()> {
        let mut stack: Vec<(PathBuf, Vec<OsString>, PathBuf)> =
            vec![(host.to_path_buf(), guest.to_vec(), name.to_path_buf())];
        while let Some((h, g, n)) = stack.pop() {
            interrupted()?;
            let md = std::fs::symlink_metadata(&h).map_err(|e| self.rerr(&g, e))?;
            self.entry(&h, &g, &n, &md, report)?;
            if md.is_dir() {
                let mut names: Vec<OsString> = std::fs::read_dir(&h)
                    .and_then(|rd| rd.map(|e| e.map(|e| e.file_name())).collect())
                    .map_err(|e| self.rerr(&g, e))?;
                names.sort();
                for child in names.into_iter().rev() {
                    let mut cg = g.clone();
                    cg.push(child.clone());
                    stack.push((h.join(&child), cg, n.join(&child)));
                }
            }
        }
        Ok(())
    }

    fn header(md: &std::fs::Metadata, kind: tar::EntryType) -> tar::Header {
        let mut hd = tar::Header::new_gnu();
        hd.set_entry_type(kind);
        hd.set_mode(md.mode() & 0o7777);
        hd.set_uid(u64::from(md.uid()));
        hd.set_gid(u64::from(md.gid()));
        // Before 1970 cannot be said in a tar header's unsigned field: 1970 it is.
        hd.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
        hd.set_size(0);
        hd
    }

    fn entry(
        &mut self,
        host: &Path,
        guest: &[OsString],
        name: &Path,
        md: &std::fs::Metadata,
        report: &mut DumpReport,
    ) -> Result<()> {
        let ft = md.file_type();
        // The top of a whole-volume dump is the archive's `./`.
        let name = if name.as_os_str().is_empty() {
            Path::new(".")
        } else {
            name
        };
        if ft.is_dir() {
            let mut hd = Self::header(md, tar::EntryType::Directory);
            let mut n = name.as_os_str().to_os_string();
            n.push("/");
            self.b
                .append_data(&mut hd, Path::new(&n), io::empty())
                .map_err(Self::werr)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(host).map_err(|e| self.rerr(guest, e))?;
            let mut hd = Self::header(md, tar::EntryType::Symlink);
            self.b
                .append_link(&mut hd, name, &target)
                .map_err(Self::werr)?;
        } else if ft.is_file() {
            let key = (md.dev(), md.ino());
            if md.nlink() > 1 {
                if let Some(first) = self.links.get(&key) {
                    let mut hd = Self::header(md, tar::EntryType::Link);
                    let first = first.clone();
                    self.b
                        .append_link(&mut hd, name, &first)
                        .map_err(Self::werr)?;
                    report.entries += 1;
                    return Ok(());
                }
                self.links.insert(key, name.to_path_buf());
            }
            let f = open_nofollow(host).map_err(|e| self.rerr(guest, e))?;
            let mut hd = Self::header(md, tar::EntryType::Regular);
            hd.set_size(md.len());
            let mut data = Exact {
                f,
                left: md.len(),
                len: md.len(),
                failed: None,
            };
            if let Err(e) = self.b.append_data(&mut hd, name, &mut data) {
                interrupted()?;
                return Err(match data.failed.take() {
                    Some(r) => self.rerr(guest, r),
                    None => Self::werr(e),
                });
            }
            report.bytes += md.len();
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            };
            let mut hd = Self::header(md, kind);
            let rdev = md.rdev();
            hd.set_device_major(libc::major(rdev)).map_err(Self::werr)?;
            hd.set_device_minor(libc::minor(rdev)).map_err(Self::werr)?;
            self.b
                .append_data(&mut hd, name, io::empty())
                .map_err(Self::werr)?;
        } else if ft.is_fifo() {
            let mut hd = Self::header(md, tar::EntryType::Fifo);
            self.b
                .append_data(&mut hd, name, io::empty())
                .map_err(Self::werr)?;
        } else {
            report.warnings.push(format!(
                "{}/{} is a {}: tar cannot hold it, left out",
                self.volume,
                join_guest(guest),
                kind_of(&ft)
            ));
            return Ok(());
        }
        report.entries += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.b.finish().map_err(Self::werr)?;
        let out = self.b.into_inner().map_err(Self::werr)?;
        out.flush().map_err(Self::werr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn targets_split_into_volume_and_path() {
        let (v, p) = split_target("p1/etc//nginx/./nginx.conf").unwrap();
        assert_eq!(v, "p1");
        assert_eq!(p, os(&["etc", "nginx", "nginx.conf"]));
        let (v, p) = split_target("/vg0-root/").unwrap();
        assert_eq!(v, "vg0-root");
        assert!(p.is_empty());
        assert!(matches!(split_target(""), Err(RecoveryError::BadPath(_))));
        assert!(matches!(split_target("//"), Err(RecoveryError::BadPath(_))));
        let e = split_target("p1/etc/../../x").unwrap_err().to_string();
        assert!(e.contains("`..` is not allowed"), "{e}");
    }

    #[test]
    fn links_resolve_inside_the_guest_never_on_the_host() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("usr/share/zoneinfo")).unwrap();
        std::fs::write(root.join("usr/share/zoneinfo/UTC"), b"guest tz").unwrap();
        std::fs::create_dir(root.join("etc")).unwrap();
        // Absolute targets start at the volume's root, not this host's `/`.
        std::os::unix::fs::symlink("/usr/share/zoneinfo/UTC", root.join("etc/localtime")).unwrap();
        // `..` stops at the root.
        std::os::unix::fs::symlink("../../../../usr", root.join("etc/up")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("etc/hostpw")).unwrap();
        std::os::unix::fs::symlink("loop2", root.join("etc/loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", root.join("etc/loop2")).unwrap();

        let r = resolve_in(root, &os(&["etc", "localtime"]), true).unwrap();
        assert_eq!(r.guest, os(&["usr", "share", "zoneinfo", "UTC"]));
        assert_eq!(std::fs::read(&r.host).unwrap(), b"guest tz");
        let r = resolve_in(root, &os(&["etc", "localtime"]), false).unwrap();
        assert!(r.meta.file_type().is_symlink());
        assert_eq!(r.guest, os(&["etc", "localtime"]));
        let r = resolve_in(root, &os(&["etc", "up", "share", "zoneinfo", "UTC"]), true).unwrap();
        assert_eq!(r.guest, os(&["usr", "share", "zoneinfo", "UTC"]));
        // The host's /etc/passwd is not the guest's.
        assert!(matches!(
            resolve_in(root, &os(&["etc", "hostpw"]), true),
            Err(ResolveError::NotFound(p)) if p == "etc/passwd"
        ));
        assert!(matches!(
            resolve_in(root, &os(&["etc", "loop1"]), true),
            Err(ResolveError::Loop)
        ));
        assert!(matches!(
            resolve_in(root, &os(&["etc", "localtime", "x"]), true),
            Err(ResolveError::NotDir(p)) if p == "usr/share/zoneinfo/UTC"
        ));
        let r = resolve_in(root, &[], true).unwrap();
        assert!(r.guest.is_empty() && r.meta.is_dir());
    }
}
