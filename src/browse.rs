//! `cbtfs browse`: every filesystem of a restore point mounted read-only under one directory.
//!
//! The point's volumes (partitions, LVM LVs, or the bare disk) are served as writable
//! copy-on-write files by a private FUSE mount (`overlay`); each filesystem is mounted from
//! there — by the kernel through a loop device, or by a FUSE driver (ntfs-3g, fusefat, fuse2fs).
//! Journal replay writes land in the overlay's private temporary files, never in the
//! repository; the filesystems are mounted `ro,nodev,nosuid,noexec`.
//!
//! Everything a browse makes is recorded in a state file (in a private runtime directory)
//! *before* it is made, so `--unmount`, or the next browse after a crash, can undo it all: the
//! filesystems named in the state, every loop device whose backing file lies in the overlay,
//! the overlay itself, and the folders it created.
//!
//! Nothing here prints: `browse` reports through its caller's callback (`BrowseEvent`), and a
//! browse where nothing could be mounted is an error naming every volume and why.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::mount::{Unmount, UnmountError, mounted_fstype};
use crate::naming::Tree;
use crate::overlay::{CowFile, OverlayFs, VolumeSource};
use crate::read::PointReader;
use crate::repo::Repository;
use crate::volumes::{Extent, Layout, Volume};

/// Flags every browsed filesystem gets.
const SAFE_OPTIONS: &str = "ro,nodev,nosuid,noexec";

#[derive(Debug, Clone, Default)]
pub struct BrowseOptions {
    /// Only FUSE drivers: no kernel code parses the guest's filesystems.
    pub userspace: bool,
    /// The repository's secret (resolved by the command line).
    pub secret: Option<crate::repo::keys::Secret>,
}

/// What became of one volume.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub name: String,
    pub content: Option<String>,
    /// Where it is mounted, if it is.
    pub mounted: Option<PathBuf>,
    /// The driver used (`kernel ext4`, `ntfs-3g`), or why it was skipped.
    pub detail: String,
}

/// The record of one browse: everything listed here is undone by `cleanup`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    pid: u32,
    /// The process's start time (from /proc), so a reused pid is not taken for ours.
    start_time: u64,
    dir: PathBuf,
    point: String,
    overlay: PathBuf,
    /// Mount points a filesystem was (or was about to be) mounted on.
    mounts: Vec<PathBuf>,
    /// Folders this browse created (removed when empty).
    created: Vec<PathBuf>,
}

/// Where browse state lives: private to the user.
fn state_root() -> Result<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let base = if uid == 0 {
        PathBuf::from("/run/cbtfs")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(d).join("cbtfs")
    } else {
        std::env::temp_dir().join(format!("cbtfs-{uid}"))
    };
    let root = base.join("browse");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .with_context(|| format!("creating {}", root.display()))?;
    let md = std::fs::symlink_metadata(&base)?;
    if md.uid() != uid || md.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is not private to this user (owner {}, mode {:o}); remove it",
            base.display(),
            md.uid(),
            md.permissions().mode() & 0o7777
        );
    }
    Ok(root)
}

/// The state file's key for a browse directory.
fn key_of(dir: &Path) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, dir.as_os_str().as_bytes());
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The start time of a running process (`None` if it is gone or a zombie).
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses: state is the
    // first, start time the 20th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

fn alive(st: &State) -> bool {
    process_start_time(st.pid) == Some(st.start_time)
}

fn save(path: &Path, st: &State) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn load(path: &Path) -> Result<State> {
    let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&b).with_context(|| {
        format!(
            "{} is damaged; remove it after unmounting what it names by hand",
            path.display()
        )
    })
}

/// Loop devices whose backing file lies under `dir`.
pub(crate) fn loops_backed_by(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    let prefix = dir.as_os_str().as_bytes();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = std::fs::read(e.path().join("loop/backing_file")) {
            let b = b.strip_suffix(b"\n").unwrap_or(&b);
            if b.starts_with(prefix) && b.get(prefix.len()) == Some(&b'/') {
                out.push(format!("/dev/{name}"));
            }
        }
    }
    out
}

/// Unmount `mp`, trying again for a second while it is busy: a probe that opened a file or
/// the device for a moment (udev, a scanner, a shell's completion) is no reason to refuse.
fn unmount_unless_busy(mp: &Path) -> Result<(), UnmountError> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match crate::mount::unmount(mp, Unmount::Normal) {
            Err(UnmountError::Busy { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            r => return r,
        }
    }
}

/// Unmount the filesystems `st` records and detach their loop devices. Refuses (changing
/// nothing more) if a filesystem is in use.
fn unmount_filesystems(st: &State) -> Result<()> {
    for mp in st.mounts.iter().rev() {
        if mounted_fstype(mp).is_none() {
            continue;
        }
        match unmount_unless_busy(mp) {
            Ok(()) => {}
            Err(UnmountError::Busy { .. }) => bail!(
                "{} is in use (a shell or program has files open there); close them and run `cbtfs browse --unmount {}` again",
                mp.display(),
                st.dir.display()
            ),
            Err(e) => {
                // A filesystem whose overlay died may refuse a clean unmount: detach it.
                tracing::warn!(mountpoint = %mp.display(), error = %e, "detaching");
                crate::mount::unmount(mp, Unmount::Lazy)?;
            }
        }
    }
    for dev in loops_backed_by(&st.overlay) {
        let out = Command::new("losetup")
            .args(["-d", &dev])
            .stdin(Stdio::null())
            .output()
            .context("running losetup -d")?;
        if !out.status.success() {
            tracing::warn!(device = %dev, error = %String::from_utf8_lossy(&out.stderr).trim(), "losetup -d failed");
        }
    }
    Ok(())
}

/// Undo everything `st` records: filesystems, loop devices, the overlay, created folders.
fn cleanup(st: &State) -> Result<()> {
    unmount_filesystems(st)?;
    if mounted_fstype(&st.overlay).is_some()
        && crate::mount::unmount(&st.overlay, Unmount::Normal).is_err()
    {
        crate::mount::unmount(&st.overlay, Unmount::Lazy)?;
    }
    let _ = std::fs::remove_dir(&st.overlay);
    for d in st.created.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
    Ok(())
}

/// Clean up every browse whose process is gone (killed, crashed, power cut), saying what it
/// does through `notice`.
fn clean_stale(root: &Path, notice: &dyn Fn(&str)) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let Ok(st) = load(&p) else { continue };
        if alive(&st) {
            continue;
        }
        notice(&format!(
            "cleaning up after a browse of {} that did not end (process {} is gone)",
            st.dir.display(),
            st.pid
        ));
        match cleanup(&st) {
            Ok(()) => {
                let _ = std::fs::remove_file(&p);
            }
            Err(e) => notice(&format!("{e:#}")),
        }
    }
}

/// How one kind of filesystem is mounted.
enum Driver {
    Kernel(&'static str),
    Fuse2fs,
    Ntfs3g,
    Fusefat,
}

fn kernel_has(fstype: &str) -> bool {
    let has = || {
        std::fs::read_to_string("/proc/filesystems")
            .map(|s| {
                s.lines()
                    .any(|l| l.split_whitespace().last() == Some(fstype))
            })
            .unwrap_or(false)
    };
    if has() {
        return true;
    }
    let _ = Command::new("modprobe")
        .args(["-q", fstype])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
    has()
}

fn have_program(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            std::fs::metadata(d.join(name)).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
        })
    })
}

/// The driver for `content`, or why it cannot be browsed.
fn driver_for(content: Option<&str>, userspace: bool) -> Result<Driver, String> {
    let need = |prog: &str, package: &str| -> Result<(), String> {
        if have_program(prog) {
            Ok(())
        } else {
            Err(format!(
                "{prog} is not installed: install the `{package}` package (apt-get install {package})"
            ))
        }
    };
    match content {
        Some("ext2" | "ext3" | "ext4") if userspace => {
            need("fuse2fs", "fuse2fs")?;
            need("e2fsck", "e2fsprogs")?;
            Ok(Driver::Fuse2fs)
        }
        Some(k @ ("ext2" | "ext3" | "ext4")) => {
            if kernel_has("ext4") {
                Ok(Driver::Kernel("ext4"))
            } else if kernel_has(k) {
                Ok(Driver::Kernel(if k == "ext2" { "ext2" } else { "ext3" }))
            } else {
                Err(format!("this kernel has no {k} driver; try --userspace (fuse2fs)"))
            }
        }
        Some(k @ ("xfs" | "btrfs")) if userspace => Err(format!(
            "no FUSE driver for {k} exists; browse without --userspace to use the kernel's"
        )),
        Some("xfs") if kernel_has("xfs") => Ok(Driver::Kernel("xfs")),
        Some("btrfs") if kernel_has("btrfs") => Ok(Driver::Kernel("btrfs")),
        Some(k @ ("xfs" | "btrfs")) => Err(format!("this kernel has no {k} driver")),
        Some("ntfs") => {
            need("ntfs-3g", "ntfs-3g")?;
            Ok(Driver::Ntfs3g)
        }
        Some("vfat") if !userspace && kernel_has("vfat") => Ok(Driver::Kernel("vfat")),
        Some("vfat") => {
            need("fusefat", "fusefat")?;
            Ok(Driver::Fusefat)
        }
        Some("swap") => Err("swap space: holds no files".into()),
        Some("lvm2 pv") => Err("LVM physical volume: its logical volumes are browsed by name".into()),
        Some("luks") => Err(
            "LUKS-encrypted: cbtfs does not unlock volumes; open POINT.parts/NAME.raw with cryptsetup yourself"
                .into(),
        ),
        Some("bitlocker") => Err(
            "BitLocker-encrypted: cbtfs does not unlock volumes; use dislocker on POINT.parts/NAME.raw"
                .into(),
        ),
        Some(other) => Err(format!("{other}: no driver known")),
        None => Err("no filesystem recognised (unknown type or damaged)".into()),
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr);
            let text = if text.trim().is_empty() {
                String::from_utf8_lossy(&o.stdout).into_owned()
            } else {
                text.into_owned()
            };
            Err(format!(
                "{prog} failed: {}",
                text.trim().replace('\n', "; ")
            ))
        }
        Err(e) => Err(format!("cannot run {prog}: {e}")),
    }
}

/// A point browsed in this process: its overlay is served by this process's threads.
pub struct Session {
    state_path: PathBuf,
    state: State,
    fuse: Option<fuser::BackgroundSession>,
    pub files: Vec<Arc<CowFile>>,
    pub outcomes: Vec<Outcome>,
    pub layout: Layout,
    pub reader: Arc<PointReader>,
    /// The volumes by name, as browsed (the bare disk is `disk`).
    pub volumes: Vec<Volume>,
    /// The point's path as the mount shows it.
    pub label: String,
}

/// The volumes a point offers for browsing: its partitions and LVs, or the whole disk. The
/// health check (`health`) checks the same list.
pub(crate) fn browsable(layout: &Layout, size: u64) -> Vec<Volume> {
    if layout.scheme == "none" && layout.content.as_deref() != Some("lvm2 pv") {
        return vec![Volume {
            name: "disk".into(),
            what: "whole disk".into(),
            size,
            extents: vec![Extent::linear(0, 0, size)],
            content: layout.content.clone(),
        }];
    }
    layout.volumes.clone()
}

impl Session {
    /// Browse point `spec` of `repo` under `dir` (created if missing; must be empty).
    pub fn start(
        repo: &Repository,
        spec: &str,
        dir: &Path,
        opts: &BrowseOptions,
    ) -> Result<Session> {
        // SAFETY: geteuid has no preconditions.
        let root_user = unsafe { libc::geteuid() } == 0;
        if !root_user && !opts.userspace {
            bail!(
                "browsing with the kernel's drivers needs root (loop devices and mounts); run as root, or use --userspace (FUSE drivers only)"
            );
        }
        let tree = Tree::build(repo.catalog()?);
        let (set, seq) = tree
            .resolve(spec)
            .map_err(|e| anyhow::anyhow!("point {spec:?}: {e}"))?;
        let reader = Arc::new(
            PointReader::open(repo, &set, seq).with_context(|| format!("opening point {spec}"))?,
        );
        let label = tree
            .path_of(&reader.manifest)
            .unwrap_or_else(|| reader.manifest.label());
        let layout = crate::volumes::discover(&*reader)
            .with_context(|| format!("reading the partition table of {label}"))?;

        let states = state_root()?;
        clean_stale(&states, &|m| tracing::warn!("{m}"));
        let made_dir = !dir.exists();
        if made_dir {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
        let key = key_of(&dir);
        let state_path = states.join(format!("{key}.json"));
        if state_path.exists() {
            let st = load(&state_path)?;
            bail!(
                "{} is already being browsed (point {}, process {}); `cbtfs browse --unmount {}` ends it",
                dir.display(),
                st.point,
                st.pid,
                dir.display()
            );
        }
        if std::fs::read_dir(&dir)
            .with_context(|| format!("{}", dir.display()))?
            .next()
            .is_some()
        {
            bail!(
                "{} is not empty; browse into an empty or new directory",
                dir.display()
            );
        }
        // The guest's file modes and owners apply as they are to this host's users: only the
        // browsing user may enter.
        let mode = std::fs::metadata(&dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            // `browse` says so on the terminal (this may run in the background).
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making {} private (0700)", dir.display()))?;
        }
        let pid = std::process::id();
        let state = State {
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
            dir: dir.clone(),
            point: label.clone(),
            overlay: states.join(format!("{key}.overlay")),
            created: if made_dir {
                vec![dir.clone()]
            } else {
                Vec::new()
            },
            ..State::default()
        };
        save(&state_path, &state)?;
        let mut session = Session {
            state_path,
            state,
            fuse: None,
            files: Vec::new(),
            outcomes: Vec::new(),
            volumes: browsable(&layout, reader.size()),
            layout,
            reader,
            label,
        };
        // On any error below, undo what was made.
        match session.mount_all(opts) {
            Ok(()) => Ok(session),
            Err(e) => {
                let _ = session.end();
                Err(e)
            }
        }
    }

    fn save(&self) -> Result<()> {
        save(&self.state_path, &self.state)
    }

    fn mount_all(&mut self, opts: &BrowseOptions) -> Result<()> {
        let tmp = std::env::temp_dir();
        for v in &self.volumes {
            let source = Arc::new(VolumeSource {
                reader: self.reader.clone(),
                volume: v.clone(),
            });
            self.files
                .push(Arc::new(CowFile::new(&v.name, source, &tmp).with_context(
                    || format!("creating a temporary file in {}", tmp.display()),
                )?));
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.state.overlay)
            .with_context(|| format!("creating {}", self.state.overlay.display()))?;
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("cbtfs-overlay".into()),
            fuser::MountOption::Subtype("cbtfs".into()),
            fuser::MountOption::RW,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoExec,
            fuser::MountOption::DefaultPermissions,
        ];
        config.acl = fuser::SessionACL::Owner;
        config.n_threads = Some(crate::mount::DEFAULT_THREADS);
        let fs = OverlayFs::new(self.files.clone());
        self.fuse = Some(
            fuser::spawn_mount(fs, &self.state.overlay, &config).with_context(|| {
                format!("mounting the overlay on {}", self.state.overlay.display())
            })?,
        );
        crate::mount::raise_readahead(&self.state.overlay);

        for i in 0..self.volumes.len() {
            let v = self.volumes[i].clone();
            let outcome = match driver_for(v.content.as_deref(), opts.userspace) {
                Err(reason) => Outcome {
                    name: v.name.clone(),
                    content: v.content.clone(),
                    mounted: None,
                    detail: reason,
                },
                Ok(driver) => {
                    let mp = self.state.dir.join(&v.name);
                    std::fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&mp)
                        .with_context(|| format!("creating {}", mp.display()))?;
                    self.state.created.push(mp.clone());
                    self.state.mounts.push(mp.clone());
                    self.save()?;
                    let file = self.state.overlay.join(&v.name);
                    match mount_one(&driver, &file, &mp) {
                        Ok(how) => {
                            let replayed: u64 =
                                self.files[i].written_ranges().iter().map(|r| r.1).sum();
                            let detail = if replayed > 0 {
                                format!(
                                    "{how}; {} KiB of journal replay/recovery writes kept in a private overlay",
                                    replayed / 1024
                                )
                            } else {
                                how
                            };
                            Outcome {
                                name: v.name.clone(),
                                content: v.content.clone(),
                                mounted: Some(mp),
                                detail,
                            }
                        }
                        Err(reason) => {
                            self.state.mounts.pop();
                            self.state.created.pop();
                            let _ = std::fs::remove_dir(&mp);
                            for dev in loops_backed_by(&file) {
                                let _ = Command::new("losetup").args(["-d", &dev]).status();
                            }
                            self.save()?;
                            Outcome {
                                name: v.name.clone(),
                                content: v.content.clone(),
                                mounted: None,
                                detail: reason,
                            }
                        }
                    }
                }
            };
            self.outcomes.push(outcome);
        }
        for u in &self.layout.unreadable {
            self.outcomes.push(Outcome {
                name: u.name.clone(),
                content: None,
                mounted: None,
                detail: format!("{} ({})", u.reason, u.what),
            });
        }
        Ok(())
    }

    /// The text `browse` prints.
    pub fn report(&self) -> String {
        let mut out = format!("{} under {}\n", self.label, self.state.dir.display());
        for o in &self.outcomes {
            match &o.mounted {
                Some(mp) => out.push_str(&format!(
                    "  mounted  {:<12} {:<6} on {} ({})\n",
                    o.name,
                    o.content.as_deref().unwrap_or("-"),
                    mp.display(),
                    o.detail
                )),
                None => out.push_str(&format!(
                    "  skipped  {:<12} {:<6} {}\n",
                    o.name,
                    o.content.as_deref().unwrap_or("-"),
                    o.detail
                )),
            }
        }
        if !self.mounted_any() {
            out.push_str("  nothing could be mounted\n");
        }
        out
    }

    /// Whether at least one filesystem is mounted.
    pub fn mounted_any(&self) -> bool {
        self.outcomes.iter().any(|o| o.mounted.is_some())
    }

    /// Why nothing could be mounted: every volume and the reason it was skipped.
    fn nothing_mounted(&self) -> String {
        let mut out = format!(
            "nothing in {} could be mounted under {}:",
            self.label,
            self.state.dir.display()
        );
        for o in &self.outcomes {
            out.push_str(&format!(
                "\n  {} ({}): {}",
                o.name,
                o.content.as_deref().unwrap_or("-"),
                o.detail
            ));
        }
        if self.outcomes.is_empty() {
            out.push_str("\n  the point holds no volumes");
        }
        out
    }

    pub fn dir(&self) -> &Path {
        &self.state.dir
    }

    /// Whether the overlay was unmounted from outside (its serving threads ended).
    fn overlay_gone(&self) -> bool {
        self.fuse.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmount everything and remove what the browse made. Refuses while a filesystem is in use
    /// (then nothing more is changed and the session stays usable).
    pub fn end(&mut self) -> Result<()> {
        cleanup(&self.state)?;
        if let Some(s) = self.fuse.take() {
            // Not joined: see mount::finish (fuser's drop unmounts by path).
            std::mem::forget(s);
        }
        let _ = std::fs::remove_file(&self.state_path);
        Ok(())
    }
}

fn mount_one(driver: &Driver, file: &Path, mp: &Path) -> Result<String, String> {
    match driver {
        Driver::Kernel(fstype) => {
            let out = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(file)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run losetup: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "losetup failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // Large reads down the stack (the default 128 KiB makes FUSE requests small).
            if let Some(name) = dev.strip_prefix("/dev/") {
                let _ = std::fs::write(format!("/sys/block/{name}/queue/read_ahead_kb"), "4096");
            }
            // Two points of one disk hold filesystems with the same UUID: XFS refuses the
            // second unless told.
            let data = if *fstype == "xfs" { "nouuid" } else { "" };
            let c = |s: &str| CString::new(s).map_err(|_| "bad path".to_string());
            let (cdev, cmp, ctype, cdata) = (
                c(&dev)?,
                CString::new(mp.as_os_str().as_bytes()).map_err(|_| "bad path".to_string())?,
                c(fstype)?,
                c(data)?,
            );
            let flags = libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC;
            // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
            let r = unsafe {
                libc::mount(
                    cdev.as_ptr(),
                    cmp.as_ptr(),
                    ctype.as_ptr(),
                    flags,
                    cdata.as_ptr().cast(),
                )
            };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                return Err(format!(
                    "the kernel refused to mount it as {fstype}: {e} (damaged? `dmesg` says more)"
                ));
            }
            Ok(format!("kernel {fstype} via {dev}"))
        }
        Driver::Fuse2fs => {
            // fuse2fs does not replay journals: e2fsck does, into the overlay.
            let out = Command::new("e2fsck")
                .args(["-E", "journal_only", "-y"])
                .arg(file)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run e2fsck: {e}"))?;
            // 0: clean; 1 and 2: something (the journal) was replayed.
            if !matches!(out.status.code(), Some(0..=2)) {
                return Err(format!(
                    "e2fsck could not replay its journal: {}",
                    String::from_utf8_lossy(&out.stderr)
                        .trim()
                        .replace('\n', "; ")
                ));
            }
            // A user who can read the point can read its whole disk: the guest's permission
            // checks (root-owned 0600 files) would only hide files, as ntfs-3g's and
            // fusefat's owner-is-the-user views never do. Root is not checked anyway.
            // SAFETY: geteuid has no preconditions.
            let opts = if unsafe { libc::geteuid() } == 0 {
                SAFE_OPTIONS.to_string()
            } else {
                format!("{SAFE_OPTIONS},fakeroot")
            };
            run(Command::new("fuse2fs")
                .arg(file)
                .arg(mp)
                .args(["-o", &opts]))?;
            Ok("fuse2fs".into())
        }
        Driver::Ntfs3g => {
            run(Command::new("ntfs-3g")
                .args(["-o", SAFE_OPTIONS])
                .arg(file)
                .arg(mp))?;
            Ok("ntfs-3g".into())
        }
        Driver::Fusefat => {
            run(Command::new("fusefat")
                .args(["-o", SAFE_OPTIONS])
                .arg(file)
                .arg(mp))?;
            Ok("fusefat".into())
        }
    }
}

/// What `browse` tells its caller (the CLI prints it).
#[derive(Debug)]
pub enum BrowseEvent<'a> {
    /// Something to know before the browse starts: a stale browse cleaned up, the directory
    /// about to be made private.
    Notice(&'a str),
    /// The filesystems are mounted: the report (`Session::report`). In the foreground the
    /// browse serves until a signal; in the background `browse` returns after this.
    Ready {
        report: &'a str,
        dir: &'a Path,
        foreground: bool,
    },
}

/// `cbtfs browse REPO POINT DIR`: mount, report, serve until unmounted. Fails (undoing what it
/// made) when no filesystem of the point could be mounted, naming each volume and why.
pub fn browse(
    repo: &Path,
    spec: &str,
    dir: &Path,
    foreground: bool,
    opts: &BrowseOptions,
    say: &dyn Fn(BrowseEvent),
) -> Result<()> {
    // Absolute: the background process works from `/`.
    let repo = if crate::repo::store::s3::is_s3_url(repo) {
        repo.to_path_buf()
    } else {
        std::fs::canonicalize(repo).with_context(|| format!("repository {}", repo.display()))?
    };
    let repository = Repository::open(&repo, opts.secret.as_ref())?;
    crate::raise_fd_limit();
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()?.join(dir)
    };
    // Here, not only in the background process: what it cleans is said on this terminal.
    clean_stale(&state_root()?, &|m| say(BrowseEvent::Notice(m)));
    if let Ok(md) = std::fs::metadata(&dir)
        && md.permissions().mode() & 0o077 != 0
        && std::fs::read_dir(&dir).is_ok_and(|mut r| r.next().is_none())
    {
        say(BrowseEvent::Notice(&format!(
            "{} will be made private (0700): the guest's file owners and modes would otherwise apply to this host's users",
            dir.display()
        )));
    }
    if foreground {
        crate::mount::init_logging(crate::mount::LogTarget::Stderr)?;
        return serve(&repository, spec, &dir, opts, &|report| {
            say(BrowseEvent::Ready {
                report,
                dir: &dir,
                foreground: true,
            })
        });
    }
    let report = crate::mount::daemonize(None, |ready| {
        serve(&repository, spec, &dir, opts, &|report| ready(report))
    })?;
    say(BrowseEvent::Ready {
        report: &report,
        dir: &dir,
        foreground: false,
    });
    Ok(())
}

fn serve(
    repo: &Repository,
    spec: &str,
    dir: &Path,
    opts: &BrowseOptions,
    ready: &dyn Fn(&str),
) -> Result<()> {
    let set = crate::mount::signal_set();
    // SAFETY: blocks the signals in this thread before any other starts, so the overlay's
    // threads inherit the mask and the signals wait for sigtimedwait below.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let mut session = Session::start(repo, spec, dir, opts)?;
    if !session.mounted_any() {
        let why = session.nothing_mounted();
        if let Err(e) = session.end() {
            bail!("{why}\n  and cleaning up after it failed: {e:#}");
        }
        bail!("{why}");
    }
    ready(&session.report());
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 250_000_000,
    };
    loop {
        // SAFETY: waits for one of the blocked signals, with a valid set and timeout.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        let gone = session.overlay_gone();
        if sig > 0 || gone {
            if gone {
                tracing::warn!(dir = %session.dir().display(), "the overlay was unmounted from outside; ending the browse");
            }
            match session.end() {
                Ok(()) => return Ok(()),
                // Logged (to the terminal in the foreground); the browse serves on.
                Err(e) if !gone => tracing::warn!("{e:#}"),
                Err(e) => return Err(e),
            }
        }
    }
}

/// `cbtfs browse --unmount DIR`: end the browse of DIR, live or crashed. Returns the
/// directory's absolute path.
pub fn unmount_dir(dir: &Path) -> Result<PathBuf> {
    // The folder may be gone (removed by hand after a crash): its path still names the state.
    let abs = match std::fs::canonicalize(dir) {
        Ok(p) => p,
        Err(_) if dir.is_absolute() => dir.to_path_buf(),
        Err(_) => std::env::current_dir()?.join(dir),
    };
    let states = state_root()?;
    let path = states.join(format!("{}.json", key_of(&abs)));
    if !path.exists() {
        bail!(
            "{} is not being browsed (no browse state for it)",
            abs.display()
        );
    }
    let st = load(&path)?;
    // Unmount the filesystems here (a busy one stops everything with a clear message), then
    // let the browse process end its overlay and exit.
    unmount_filesystems(&st)?;
    if alive(&st) {
        // SAFETY: kill with a pid we verified is our browse process.
        unsafe { libc::kill(st.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(&st) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(&st) {
            bail!(
                "the browse process {} did not exit after SIGTERM; its log (syslog) says why",
                st.pid
            );
        }
    }
    // Whatever the process did not get to (or all of it, if it was dead).
    cleanup(&st)?;
    let _ = std::fs::remove_file(&path);
    Ok(abs)
}
