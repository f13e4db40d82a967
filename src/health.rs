//! The health check without restore: every guest filesystem of a point, checked by its own
//! read-only checker (`cbtfs job check`, `cbtfs fsck`, and a job's `health = "fsck"`).
//!
//! The point's volumes are found as `browse` finds them (`volumes::discover`: partitions, LVM
//! LVs, or the bare disk) and served as writable copy-on-write files by a private FUSE mount of
//! the browse overlay (`overlay`), in a directory of its own under the temporary directory. The
//! checkers run on those files, so nothing they (or a journal replay) write can reach the
//! repository: writes land in the overlay's unlinked temporary files and vanish with it.
//!
//! | filesystem | checker | journal |
//! |---|---|---|
//! | ext2/3/4 | `e2fsck -fn` | `needs_recovery` in the superblock: `e2fsck -E journal_only -y` replays it into the overlay first |
//! | xfs | `xfs_repair -n -f` | a dirty log (the checker says so): a kernel mount through a loop device replays it first (root) |
//! | ntfs | `ntfsfix -n` | — |
//! | vfat | `fsck.vfat -n` | the dirty mark Linux sets while mounted: cleared in the overlay first |
//! | btrfs | `btrfs check --readonly` | — (copy-on-write: nothing to replay) |
//!
//! Each volume gets a state: `clean`; `journal` (clean once its journal was replayed: what a
//! crash-consistent snapshot of a running guest normally looks like); `damaged` (the checker
//! found errors, could not read the filesystem, or the partition table is damaged); `unchecked`
//! (no checker installed, no known filesystem, encrypted, or the checker ran out of time — the
//! reason is in `detail`). The point's state is the worst of its volumes (clean < journal <
//! unchecked < damaged). Swap space and LVM physical volumes (whose LVs are checked by name)
//! hold no filesystem and are not listed.
//!
//! Bounds: each checker run has a time-out (its process group is killed at the end of it), and
//! of its output only the last [`OUTPUT_LIMIT`] bytes are kept, of which the last
//! [`DETAIL_LINES`] lines go into the report. Several checks may run at once in one process: each
//! has its own overlay directory, temporary files and loop devices, and all of them are gone
//! when `check_point` returns, error or not.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::job::report::{HealthOutcome, VolumeHealth};
use crate::overlay::{CowFile, OverlayFs, VolumeSource};
use crate::read::PointReader;
use crate::repo::{RepoError, Repository, SetHistory};
use crate::volumes::Volume;

/// How long one checker run may take by default (a full check of a multi-terabyte volume takes
/// tens of minutes; a hung one must not hold a job forever).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Bytes of a checker's output kept (its end): memory stays bounded whatever it prints.
pub const OUTPUT_LIMIT: usize = 64 * 1024;

/// Lines of the checker's output kept in the report's `detail`.
pub const DETAIL_LINES: usize = 12;

/// Characters kept of one line of output in `detail`.
const LINE_CHARS: usize = 400;

/// How a health check runs.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The longest one checker run may take; then it is killed and the volume is `unchecked`.
    pub timeout: Duration,
    /// Where the overlay's directory and copy-on-write files are made.
    pub tmp_dir: PathBuf,
    /// Where checkers are looked for (`PATH`'s syntax); `None`: this process's `PATH`.
    pub search_path: Option<OsString>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            timeout: DEFAULT_TIMEOUT,
            tmp_dir: std::env::temp_dir(),
            search_path: None,
        }
    }
}

/// A volume's (and a point's) state, in order of gravity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Clean,
    Journal,
    Unchecked,
    Damaged,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Clean => "clean",
            State::Journal => "journal",
            State::Unchecked => "unchecked",
            State::Damaged => "damaged",
        }
    }

    /// The state a report names (`None` for a name this version does not know).
    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "clean" => State::Clean,
            "journal" => State::Journal,
            "unchecked" => State::Unchecked,
            "damaged" => State::Damaged,
            _ => return None,
        })
    }
}

/// The worst state of `volumes` (an unknown name counts as `damaged`); `unchecked` when there
/// are none: nothing was checked.
pub fn worst(volumes: &[VolumeHealth]) -> State {
    volumes
        .iter()
        .map(|v| State::parse(&v.state).unwrap_or(State::Damaged))
        .max()
        .unwrap_or(State::Unchecked)
}

/// Whether a checker looked at at least one volume (its state is not `unchecked`).
pub fn checked_any(h: &HealthOutcome) -> bool {
    h.volumes
        .iter()
        .any(|v| v.state != State::Unchecked.as_str())
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("opening point {point}: {source}")]
    Open {
        point: String,
        #[source]
        source: RepoError,
    },
    #[error("reading the volumes of point {point}: {source}")]
    Layout {
        point: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} {}: {source} (set TMPDIR to a writable local directory)", path.display())]
    Temp {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Check point `seq` of `set`: every guest filesystem, each by its checker, on a copy-on-write
/// overlay (the point is never modified).
pub fn check_point(
    repo: &Repository,
    set: &SetHistory,
    seq: u32,
    opts: &CheckOptions,
) -> Result<HealthOutcome, HealthError> {
    let started = Instant::now();
    let point = usize::try_from(seq)
        .ok()
        .and_then(|i| set.points.get(i))
        .map(|m| m.label())
        .unwrap_or_else(|| format!("{} set {} point {seq}", set.vdi, set.id));
    let reader =
        Arc::new(
            PointReader::open(repo, set, seq).map_err(|source| HealthError::Open {
                point: point.clone(),
                source,
            })?,
        );
    let mut h = check_reader(reader, &point, opts)?;
    h.seconds = started.elapsed().as_secs_f64();
    Ok(h)
}

/// `check_point` for an opened point; `point` names it in errors.
pub fn check_reader(
    reader: Arc<PointReader>,
    point: &str,
    opts: &CheckOptions,
) -> Result<HealthOutcome, HealthError> {
    let started = Instant::now();
    let layout = crate::volumes::discover(&*reader).map_err(|source| HealthError::Layout {
        point: point.to_string(),
        source,
    })?;
    let volumes = crate::browse::browsable(&layout, reader.size());
    let mut results: Vec<Option<VolumeHealth>> = Vec::new();
    let mut to_check: Vec<(usize, Volume, Kind, PathBuf)> = Vec::new();
    for v in volumes {
        let fs = v.content.clone().unwrap_or_else(|| "-".into());
        let unchecked = |why: String| {
            Some(VolumeHealth {
                volume: v.name.clone(),
                filesystem: fs.clone(),
                state: State::Unchecked.as_str().into(),
                checker: String::new(),
                detail: why,
            })
        };
        match plan(v.content.as_deref()) {
            Plan::Skip => {}
            Plan::Unchecked(why) => results.push(unchecked(why)),
            Plan::Check(kind) => match find_program(kind.program(), opts) {
                Some(prog) => {
                    to_check.push((results.len(), v, kind, prog));
                    results.push(None);
                }
                None => results.push(unchecked(format!(
                    "{} is not installed: install the `{}` package (scripts/setup.sh does)",
                    kind.program(),
                    kind.package()
                ))),
            },
        }
    }
    if !to_check.is_empty() {
        let vols: Vec<Volume> = to_check.iter().map(|(_, v, _, _)| v.clone()).collect();
        let overlay = Overlay::new(&reader, &vols, &opts.tmp_dir)?;
        for (i, (slot, v, kind, prog)) in to_check.into_iter().enumerate() {
            let Some(file) = overlay.files.get(i) else {
                continue;
            };
            let path = overlay.dir.join(&v.name);
            let (state, checker, detail) = check_volume(kind, &prog, &path, file, opts);
            tracing::info!(point, volume = %v.name, state = state.as_str(), "checked");
            if let Some(r) = results.get_mut(slot) {
                *r = Some(VolumeHealth {
                    volume: v.name.clone(),
                    filesystem: v.content.clone().unwrap_or_else(|| "-".into()),
                    state: state.as_str().into(),
                    checker,
                    detail,
                });
            }
        }
        overlay.close();
    }
    let mut volumes: Vec<VolumeHealth> = results.into_iter().flatten().collect();
    for u in &layout.unreadable {
        let damaged = u.reason.contains("damaged");
        volumes.push(VolumeHealth {
            volume: u.name.clone(),
            filesystem: "-".into(),
            state: if damaged {
                State::Damaged
            } else {
                State::Unchecked
            }
            .as_str()
            .into(),
            checker: String::new(),
            detail: format!("{} ({})", u.reason, u.what),
        });
    }
    Ok(HealthOutcome {
        state: worst(&volumes).as_str().into(),
        seconds: started.elapsed().as_secs_f64(),
        volumes,
    })
}

/// The filesystems a checker exists for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ext,
    Xfs,
    Ntfs,
    Vfat,
    Btrfs,
}

impl Kind {
    fn program(self) -> &'static str {
        match self {
            Kind::Ext => "e2fsck",
            Kind::Xfs => "xfs_repair",
            Kind::Ntfs => "ntfsfix",
            Kind::Vfat => "fsck.vfat",
            Kind::Btrfs => "btrfs",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Kind::Ext => "e2fsprogs",
            Kind::Xfs => "xfsprogs",
            Kind::Ntfs => "ntfs-3g",
            Kind::Vfat => "dosfstools",
            Kind::Btrfs => "btrfs-progs",
        }
    }

    /// The read-only check's arguments (before the file).
    fn args(self) -> &'static [&'static str] {
        match self {
            Kind::Ext => &["-fn"],
            Kind::Xfs => &["-n", "-f"],
            Kind::Ntfs => &["-n"],
            Kind::Vfat => &["-n"],
            Kind::Btrfs => &["check", "--readonly"],
        }
    }
}

enum Plan {
    /// Not a filesystem: not listed.
    Skip,
    Unchecked(String),
    Check(Kind),
}

fn plan(content: Option<&str>) -> Plan {
    match content {
        Some("ext2" | "ext3" | "ext4") => Plan::Check(Kind::Ext),
        Some("xfs") => Plan::Check(Kind::Xfs),
        Some("ntfs") => Plan::Check(Kind::Ntfs),
        Some("vfat") => Plan::Check(Kind::Vfat),
        Some("btrfs") => Plan::Check(Kind::Btrfs),
        Some("swap" | "lvm2 pv") => Plan::Skip,
        Some(k @ ("luks" | "bitlocker")) => Plan::Unchecked(format!(
            "{k}-encrypted: cbtfs does not unlock volumes, so its filesystem cannot be checked"
        )),
        Some(other) => Plan::Unchecked(format!("{other}: no checker known for it")),
        None => Plan::Unchecked("no filesystem recognised (unknown type, empty or damaged)".into()),
    }
}

/// `name` in the search path, as a full path.
fn find_program(name: &str, opts: &CheckOptions) -> Option<PathBuf> {
    let paths = opts
        .search_path
        .clone()
        .or_else(|| std::env::var_os("PATH"))?;
    std::env::split_paths(&paths)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

/// The overlay of one check: a private FUSE mount serving the volumes as copy-on-write files.
/// Dropping it (or `close`) unmounts it and removes its directory.
struct Overlay {
    dir: PathBuf,
    files: Vec<Arc<CowFile>>,
    session: Option<fuser::BackgroundSession>,
}

/// The prefix of an overlay's directory name; the process id follows.
const DIR_PREFIX: &str = "cbtfs-health-";

/// Undo what checks of processes that are gone (killed, crashed) left in `tmp`: their replay
/// mounts and loop devices, their overlays and directories.
fn clean_stale(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = e.path();
        tracing::warn!(dir = %path.display(), "cleaning up after a health check whose process {pid} is gone");
        if name.ends_with(".replay") {
            let _ = crate::mount::unmount(&path, crate::mount::Unmount::Lazy);
        } else {
            for dev in crate::browse::loops_backed_by(&path) {
                let _ = Command::new("losetup")
                    .args(["-d", &dev])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = crate::mount::unmount(&path, crate::mount::Unmount::Lazy);
        }
        let _ = std::fs::remove_dir(&path);
    }
}

impl Overlay {
    fn new(reader: &Arc<PointReader>, vols: &[Volume], tmp: &Path) -> Result<Overlay, HealthError> {
        clean_stale(tmp);
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| HealthError::Temp {
            what: "choosing a name in",
            path: tmp.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
        let dir = tmp.join(format!(
            "{DIR_PREFIX}{}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(nonce)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| HealthError::Temp {
                what: "creating",
                path: dir.clone(),
                source,
            })?;
        let mut ov = Overlay {
            dir,
            files: Vec::new(),
            session: None,
        };
        for v in vols {
            let source = Arc::new(VolumeSource {
                reader: reader.clone(),
                volume: v.clone(),
            });
            let f = CowFile::new(&v.name, source, tmp).map_err(|source| HealthError::Temp {
                what: "creating a temporary file in",
                path: tmp.to_path_buf(),
                source,
            })?;
            ov.files.push(Arc::new(f));
        }
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("cbtfs-health".into()),
            fuser::MountOption::Subtype("cbtfs".into()),
            fuser::MountOption::RW,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoExec,
            fuser::MountOption::DefaultPermissions,
        ];
        config.acl = fuser::SessionACL::Owner;
        config.n_threads = Some(crate::mount::DEFAULT_THREADS);
        let fs = OverlayFs::new(ov.files.clone());
        ov.session =
            Some(
                fuser::spawn_mount(fs, &ov.dir, &config).map_err(|source| HealthError::Temp {
                    what: "mounting the copy-on-write overlay on",
                    path: ov.dir.clone(),
                    source,
                })?,
            );
        Ok(ov)
    }

    fn close(mut self) {
        self.end();
    }

    fn end(&mut self) {
        // A replay's loop device left behind by an error: detach it before the unmount.
        for dev in crate::browse::loops_backed_by(&self.dir) {
            let _ = Command::new("losetup")
                .args(["-d", &dev])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(s) = self.session.take() {
            // Our own directory, removed right after: unmounting by path cannot hit another
            // mount.
            if let Err(e) = s.umount_and_join() {
                tracing::warn!(dir = %self.dir.display(), error = %e, "unmounting the overlay; detaching it");
                let _ = crate::mount::unmount(&self.dir, crate::mount::Unmount::Lazy);
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "removing the overlay's directory");
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.session.is_some() || self.dir.exists() {
            self.end();
        }
    }
}

/// What one run of a program gave.
struct RunResult {
    /// The exit status (`None`: killed by a signal).
    status: Option<i32>,
    timed_out: bool,
    /// The end of its output (stdout and stderr as they interleaved).
    output: String,
    /// The start of its output (where checkers warn about logs and journals).
    head: String,
    /// Bytes it wrote in all.
    total: u64,
}

/// Run `prog args file` with the time-out, keeping the end of its output.
fn run_bounded(
    prog: &Path,
    args: &[&str],
    file: &Path,
    opts: &CheckOptions,
) -> io::Result<RunResult> {
    let (reader, writer) = io::pipe()?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .env("LC_ALL", "C")
        // Its own process group: the time-out kills whatever it started too.
        .process_group(0);
    if let Some(p) = &opts.search_path {
        cmd.env("PATH", p);
    }
    let mut child = cmd.spawn()?;
    // Our copies of the pipe's write end go with the command: EOF comes when the checker ends.
    drop(cmd);
    let collector = std::thread::spawn(move || tail(reader, OUTPUT_LIMIT));
    let pid = child.id();
    let deadline = Instant::now() + opts.timeout;
    let mut pause = Duration::from_millis(5);
    let mut timed_out = false;
    loop {
        if exited(pid)? {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    // The group leader is not reaped yet (a zombie at most), so its group id cannot name
    // another group: kill whatever of the group is left (everything, on a time-out).
    if let Ok(pgid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a negative pid signals the process group we created above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let status = child.wait()?;
    let (head, output, total) = collector.join().unwrap_or_else(|_| {
        (
            String::new(),
            String::from("(the output could not be read)"),
            0,
        )
    });
    Ok(RunResult {
        status: if timed_out { None } else { status.code() },
        timed_out,
        output,
        head,
        total,
    })
}

/// Whether child `pid` has ended, without reaping it.
fn exited(pid: u32) -> io::Result<bool> {
    let id = libc::id_t::from(pid);
    // SAFETY: siginfo_t is plain data; zeroed is a valid value, and si_pid stays 0 when no
    // child has changed state (WNOHANG).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with a valid siginfo_t; WNOWAIT leaves it waitable.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            id,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (or left it zeroed); reading si_pid is valid for SIGCHLD.
    Ok(unsafe { info.si_pid() } != 0)
}

/// Bytes of the start of a checker's output kept apart from its end.
const HEAD_LIMIT: usize = 8192;

/// Read `r` to its end, keeping its first `HEAD_LIMIT` bytes, its last `limit` bytes (as text)
/// and the total count.
fn tail(mut r: impl Read, limit: usize) -> (String, String, u64) {
    let mut head: Vec<u8> = Vec::new();
    let mut kept: Vec<u8> = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let got = buf.get(..n).unwrap_or_default();
                total = total.saturating_add(n as u64);
                let room = HEAD_LIMIT.saturating_sub(head.len()).min(got.len());
                head.extend_from_slice(got.get(..room).unwrap_or_default());
                kept.extend_from_slice(got);
                if kept.len() > limit.saturating_mul(2) {
                    let cut = kept.len() - limit;
                    kept.drain(..cut);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if kept.len() > limit {
        let cut = kept.len() - limit;
        kept.drain(..cut);
    }
    (
        String::from_utf8_lossy(&head).into_owned(),
        String::from_utf8_lossy(&kept).into_owned(),
        total,
    )
}

/// The last `DETAIL_LINES` non-empty lines of `output`, each cut to `LINE_CHARS` characters.
fn last_lines(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let from = lines.len().saturating_sub(DETAIL_LINES);
    lines
        .get(from..)
        .unwrap_or_default()
        .iter()
        .map(|l| {
            if l.chars().count() > LINE_CHARS {
                let cut: String = l.chars().take(LINE_CHARS).collect();
                format!("{cut}…")
            } else {
                (*l).to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The command line as the report shows it.
fn command_text(prog: &Path, args: &[&str]) -> String {
    let name = prog
        .file_name()
        .map(OsStr::to_string_lossy)
        .unwrap_or_default();
    std::iter::once(name.into_owned())
        .chain(args.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Check one volume: (state, checker, detail).
fn check_volume(
    kind: Kind,
    prog: &Path,
    file: &Path,
    cow: &CowFile,
    opts: &CheckOptions,
) -> (State, String, String) {
    let mut checker = command_text(prog, kind.args());
    let mut notes: Vec<String> = Vec::new();
    let mut replayed = false;
    // Replay a journal first (into the overlay), so that the check sees what the guest last
    // wrote rather than what a crash-consistent snapshot left half-done.
    if kind == Kind::Ext && ext_needs_recovery(cow) {
        let args = ["-E", "journal_only", "-y"];
        checker = format!("{} (after {})", checker, command_text(prog, &args));
        match run_bounded(prog, &args, file, opts) {
            Err(e) => return (State::Unchecked, checker, format!("cannot run e2fsck: {e}")),
            Ok(r) if r.timed_out => return (State::Unchecked, checker, timeout_text(opts, &r)),
            // 0: nothing to do; 1, 2: the journal was replayed.
            Ok(r) if matches!(r.status, Some(0..=2)) && !ext_needs_recovery(cow) => {
                replayed = true;
                notes.push("the journal was replayed into the overlay".into());
            }
            Ok(r) => {
                return (
                    State::Damaged,
                    checker,
                    format!(
                        "the journal could not be replayed ({}):\n{}",
                        status_text(r.status),
                        last_lines(&r.output)
                    ),
                );
            }
        }
    }
    // FAT has no journal, but Linux marks it dirty while mounted: a snapshot of a running
    // guest carries the mark, which fsck.vfat counts as an error. Cleared in the overlay, the
    // check says whether anything else is wrong.
    if kind == Kind::Vfat
        && let Some(at) = fat_dirty_byte(cow)
    {
        let mut b = [0u8; 1];
        let cleared = cow
            .read_at(&mut b, at)
            .and_then(|_| cow.write_at(&[b[0] & !FAT_DIRTY], at));
        if let Err(e) = cleared {
            return (
                State::Unchecked,
                checker,
                format!("clearing its dirty mark in the overlay failed: {e}"),
            );
        }
        checker = format!("{checker} (after clearing the dirty mark)");
        replayed = true;
        notes.push(
            "it was marked dirty (mounted when the snapshot was taken); the mark was cleared in the overlay"
                .into(),
        );
    }
    let mut r = match run_bounded(prog, kind.args(), file, opts) {
        Ok(r) => r,
        Err(e) => {
            return (
                State::Unchecked,
                checker,
                format!("cannot run {}: {e}", prog.display()),
            );
        }
    };
    if kind == Kind::Xfs && !r.timed_out && xfs_log_dirty(&r) {
        checker = format!("{checker} (after a log replay by a kernel mount)");
        if let Err(why) = xfs_replay(file) {
            return (
                State::Unchecked,
                checker,
                format!(
                    "its log is dirty and must be replayed before a check, which failed: {why}"
                ),
            );
        }
        replayed = true;
        notes.push("the log was replayed into the overlay".into());
        r = match run_bounded(prog, kind.args(), file, opts) {
            Ok(r) => r,
            Err(e) => {
                return (
                    State::Unchecked,
                    checker,
                    format!("cannot run {}: {e}", prog.display()),
                );
            }
        };
    }
    if r.timed_out {
        return (State::Unchecked, checker, timeout_text(opts, &r));
    }
    let state = match (kind, r.status) {
        (_, Some(0)) if replayed => State::Journal,
        (_, Some(0)) => State::Clean,
        // e2fsck: 4 errors left uncorrected, 8 the filesystem could not be opened or read.
        (Kind::Ext, Some(4 | 8)) => State::Damaged,
        // xfs_repair -n: 1 corruption found.
        (Kind::Xfs, Some(1)) => State::Damaged,
        // fsck.vfat: 1 errors found; 2 the filesystem could not be read.
        (Kind::Vfat, Some(1 | 2)) => State::Damaged,
        (Kind::Ntfs | Kind::Btrfs, Some(1)) => State::Damaged,
        (_, _) => State::Unchecked,
    };
    let mut detail = notes.join("; ");
    if state == State::Unchecked {
        detail = format!(
            "{} ended with {}, which does not say whether the filesystem is damaged",
            kind.program(),
            status_text(r.status)
        );
    }
    let out = last_lines(&r.output);
    if !out.is_empty() {
        if !detail.is_empty() {
            detail.push('\n');
        }
        if r.total > r.output.len() as u64 {
            detail.push_str(&format!(
                "(the last lines of {} bytes of output)\n",
                r.total
            ));
        }
        detail.push_str(&out);
    }
    (state, checker, detail)
}

fn status_text(status: Option<i32>) -> String {
    match status {
        Some(c) => format!("status {c}"),
        None => "a signal".into(),
    }
}

fn timeout_text(opts: &CheckOptions, r: &RunResult) -> String {
    let mut t = format!(
        "the checker did not finish within {} s and was stopped",
        opts.timeout.as_secs_f64()
    );
    let out = last_lines(&r.output);
    if !out.is_empty() {
        t.push('\n');
        t.push_str(&out);
    }
    t
}

/// ext2/3/4's superblock (at byte 1024): its magic at 56, and the incompatible features at 96,
/// of which `RECOVER` (0x4) says the journal holds transactions not yet written in place.
fn ext_needs_recovery(cow: &CowFile) -> bool {
    let mut sb = [0u8; 100];
    match cow.read_at(&mut sb, 1024) {
        Ok(n) if n == sb.len() => {}
        _ => return false,
    }
    let magic = u16::from_le_bytes([sb[56], sb[57]]);
    let incompat = u32::from_le_bytes([sb[96], sb[97], sb[98], sb[99]]);
    magic == 0xEF53 && incompat & 0x4 != 0
}

/// The "not properly unmounted" bit of a FAT boot sector's state byte.
const FAT_DIRTY: u8 = 0x01;

/// Where a FAT boot sector's state byte is, if its dirty bit is set: byte 37 of FAT12/16,
/// byte 65 of FAT32 (whose 16-bit sectors-per-FAT field, at 22, is zero).
fn fat_dirty_byte(cow: &CowFile) -> Option<u64> {
    let mut bs = [0u8; 512];
    match cow.read_at(&mut bs, 0) {
        Ok(n) if n == bs.len() => {}
        _ => return None,
    }
    let fat32 = u16::from_le_bytes([bs[22], bs[23]]) == 0;
    // The extended boot record's signature (0x28 or 0x29) says the state byte is there.
    let (sig, state) = if fat32 { (66, 65) } else { (38, 37) };
    let has_ebr = matches!(bs[sig], 0x28 | 0x29);
    (has_ebr && bs[state] & FAT_DIRTY != 0).then_some(state as u64)
}

/// Whether `xfs_repair -n` stopped at (or warned about) a log that needs replaying.
fn xfs_log_dirty(r: &RunResult) -> bool {
    let says = |t: &str| t.replace('\n', " ").contains("metadata changes in a log");
    says(&r.head) || says(&r.output)
}

/// Replay an XFS log into the overlay: mount the file through a loop device (the kernel
/// replays the log at mount), unmount, detach.
fn xfs_replay(file: &Path) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("replaying needs root (a loop device and a kernel mount)".into());
    }
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
    let result = (|| {
        // Beside the overlay's directory (nothing can be made inside it), named after both.
        let name = match (file.parent(), file.file_name()) {
            (Some(dir), Some(vol)) => {
                let mut n = dir.as_os_str().to_os_string();
                n.push("-");
                n.push(vol);
                n.push(".replay");
                PathBuf::from(n)
            }
            _ => return Err(format!("{}: not a volume of an overlay", file.display())),
        };
        let mp = name;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&mp)
            .map_err(|e| format!("creating {}: {e}", mp.display()))?;
        let r = mount_xfs_and_unmount(&dev, &mp);
        let _ = std::fs::remove_dir(&mp);
        r
    })();
    let _ = Command::new("losetup")
        .args(["-d", &dev])
        .stdin(Stdio::null())
        .status();
    result
}

fn mount_xfs_and_unmount(dev: &str, mp: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = |b: &[u8]| std::ffi::CString::new(b).map_err(|_| "a path holds a NUL byte".to_string());
    let (cdev, cmp, ctype, cdata) = (
        c(dev.as_bytes())?,
        c(mp.as_os_str().as_bytes())?,
        c(b"xfs")?,
        // Another point of the same disk may be mounted: same filesystem uuid.
        c(b"nouuid")?,
    );
    let flags = libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC;
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
        return Err(format!(
            "the kernel refused to mount it as xfs: {} (damaged? `dmesg` says more)",
            io::Error::last_os_error()
        ));
    }
    crate::mount::unmount(mp, crate::mount::Unmount::Normal).map_err(|e| {
        // Nothing of ours uses it: detach it, so the loop device and the overlay can go.
        let _ = crate::mount::unmount(mp, crate::mount::Unmount::Lazy);
        e.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(state: &str) -> VolumeHealth {
        VolumeHealth {
            volume: "p1".into(),
            filesystem: "ext4".into(),
            state: state.into(),
            checker: String::new(),
            detail: String::new(),
        }
    }

    #[test]
    fn the_worst_volume_decides() {
        assert_eq!(worst(&[]), State::Unchecked);
        assert_eq!(worst(&[vol("clean"), vol("journal")]), State::Journal);
        assert_eq!(
            worst(&[vol("clean"), vol("unchecked"), vol("journal")]),
            State::Unchecked
        );
        assert_eq!(worst(&[vol("damaged"), vol("unchecked")]), State::Damaged);
        assert_eq!(worst(&[vol("clean"), vol("what")]), State::Damaged);
        for s in [
            State::Clean,
            State::Journal,
            State::Unchecked,
            State::Damaged,
        ] {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn output_keeps_its_end_within_the_limit() {
        let text: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        let (head, kept, total) = tail(text.as_bytes(), 1000);
        assert_eq!(total, text.len() as u64);
        assert_eq!(head.as_bytes(), &text.as_bytes()[..HEAD_LIMIT]);
        assert_eq!(kept.len(), 1000);
        assert!(text.ends_with(&kept));
        let last = last_lines(&kept);
        let want: Vec<String> = (10_000 - DETAIL_LINES..10_000)
            .map(|i| format!("line {i}"))
            .collect();
        assert_eq!(last, want.join("\n"));
        let long = "x".repeat(LINE_CHARS + 5);
        assert_eq!(
            last_lines(&format!("\n\n{long}\n  \n")),
            format!("{}…", "x".repeat(LINE_CHARS))
        );
    }

    #[test]
    fn a_checker_that_hangs_is_killed_at_the_time_out() {
        let opts = CheckOptions {
            timeout: Duration::from_millis(200),
            ..CheckOptions::default()
        };
        let Some(sh) = find_program("sh", &opts) else {
            return;
        };
        let started = Instant::now();
        // The shell's child (sleep) holds the pipe too: the group kill ends it.
        let r = run_bounded(
            &sh,
            &["-c", "echo started; sleep 30 & wait"],
            Path::new("x"),
            &opts,
        )
        .unwrap();
        assert!(r.timed_out);
        assert_eq!(r.status, None);
        assert_eq!(r.output, "started\n");
        assert!(started.elapsed() < Duration::from_secs(20));
        let r = run_bounded(&sh, &["-c", "echo $0; exit 4"], Path::new("arg"), &opts).unwrap();
        assert!(!r.timed_out);
        assert_eq!((r.status, r.output.as_str()), (Some(4), "arg\n"));
    }

    #[test]
    fn plans_by_filesystem() {
        assert!(matches!(plan(Some("ext3")), Plan::Check(Kind::Ext)));
        assert!(matches!(plan(Some("swap")), Plan::Skip));
        assert!(matches!(plan(Some("lvm2 pv")), Plan::Skip));
        assert!(matches!(plan(Some("luks")), Plan::Unchecked(_)));
        assert!(matches!(plan(None), Plan::Unchecked(_)));
        let none = CheckOptions {
            search_path: Some(OsString::from("/nonexistent")),
            ..CheckOptions::default()
        };
        assert_eq!(find_program("sh", &none), None);
    }
}
