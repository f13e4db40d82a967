//! `cbtfs mount`: the mount's lifecycle — options, mount point checks, daemonizing, signals,
//! unmounting. The filesystem itself is `fs`; `fuse` adapts it to the kernel.
//!
//! * Background mode forks before any thread exists, reports success or the error through a
//!   pipe, and logs to syslog (or `log_file=`); `-f` stays in the foreground, logging to stderr.
//! * SIGINT, SIGTERM and SIGHUP unmount and exit; so does an outside `umount`/`fusermount3 -u`.
//!   A busy mount point is detached lazily and served until its last user closes it.
//! * A mount left behind by a killed daemon ("Transport endpoint is not connected") is detached
//!   by the next `cbtfs mount` on that directory; a live mount there is refused, and so is a
//!   directory that is not empty (the mount would hide what is in it), unless `-o nonempty`.
//! * `unmount` is the one way cbtfs unmounts anything (this mount, browse's filesystems and
//!   overlay, the demo's mount).
//! * Nothing here prints: what the user should read goes through the caller's `notice`.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fuser::{Config, MountOption, SessionACL};

use crate::fs::CbtFs;
use crate::fuse::{FuseAdapter, MAX_READ};
use crate::repo::Repository;

/// Threads serving requests by default: the kernel's readahead keeps several requests in
/// flight, and cold reads wait on the disk (direct reads, no readahead of their own), so more
/// threads than cores keep the disk busy.
pub const DEFAULT_THREADS: usize = 4;
/// Read-ahead of each sequential reader, in MiB (`prefetch=N`, 0 turns it off): about twice a
/// block device's own readahead, so the disk always has a queue to work on.
pub const DEFAULT_PREFETCH_MIB: u64 = 16;
/// Threads fetching ahead: enough to keep a deep point's scattered reads queued on the disk.
const PREFETCH_THREADS: usize = 8;

/// What `-o` may say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub allow_other: bool,
    pub allow_root: bool,
    pub log_file: Option<PathBuf>,
    /// Threads serving the kernel's requests (`threads=N`).
    pub threads: Option<usize>,
    /// Read-ahead window in MiB (`prefetch=N`; 0 = off).
    pub prefetch_mib: Option<u64>,
    /// Kernel mount flags passed through (nodev, nosuid, noexec, noatime, ...).
    pub flags: Vec<String>,
    /// Mount over a directory that is not empty, hiding its entries (`nonempty`).
    pub nonempty: bool,
    /// `key_file=FILE` / `repo_password_file=FILE`: what opens an encrypted repository (fstab
    /// lines cannot pass flags).
    pub key_file: Option<PathBuf>,
    pub repo_password_file: Option<PathBuf>,
    /// `cache_dir=DIR`, `cache_size=SIZE`: as `--cache-dir` and `--cache-size`.
    pub cache_dir: Option<PathBuf>,
    pub cache_size: Option<u64>,
    /// An `s3://` repository's endpoint, CA and addressing (`s3_endpoint=URL`,
    /// `s3_ca_cert=FILE`, `s3_virtual_hosted`), as `--s3-endpoint` and friends: an fstab line
    /// has neither flags nor an environment. The flags win when both are given.
    pub s3_endpoint: Option<String>,
    pub s3_ca_cert: Option<PathBuf>,
    pub s3_virtual_hosted: bool,
    /// Where its credentials are (`s3_credentials_file=FILE`, `s3_profile=NAME`), as
    /// AWS_SHARED_CREDENTIALS_FILE and AWS_PROFILE; keys in the environment still come first.
    pub s3_credentials_file: Option<PathBuf>,
    pub s3_profile: Option<String>,
}

/// Split an option string on commas; `\,` is a literal comma (util-linux's escaping).
pub fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&',') => {
                cur.push(',');
                chars.next();
            }
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter().filter(|o| !o.is_empty()).collect()
}

/// Parse `-o` options. fstab-only options are accepted and ignored; unknown ones are refused.
pub fn parse_options(opts: &[String]) -> Result<MountOptions> {
    let mut m = MountOptions::default();
    for o in opts.iter().flat_map(|s| split_options(s)) {
        let (key, value) = match o.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (o.clone(), None),
        };
        match key.as_str() {
            "allow_other" => m.allow_other = true,
            "allow_root" => m.allow_root = true,
            "nonempty" => m.nonempty = true,
            "log_file" => m.log_file = value.map(PathBuf::from),
            "key_file" => m.key_file = value.map(PathBuf::from),
            "repo_password_file" => m.repo_password_file = value.map(PathBuf::from),
            "cache_dir" => match value.filter(|v| !v.is_empty()) {
                Some(v) => m.cache_dir = Some(PathBuf::from(v)),
                None => bail!("cache_dir= takes a directory"),
            },
            "cache_size" => {
                match crate::repo::store::cache::parse_size(value.as_deref().unwrap_or("")) {
                    Ok(n) => m.cache_size = Some(n),
                    Err(e) => bail!("cache_size=: {e}"),
                }
            }
            "s3_endpoint" | "s3_ca_cert" | "s3_credentials_file" | "s3_profile" => {
                let Some(v) = value.filter(|v| !v.is_empty()) else {
                    bail!("{key}= needs a value ({key}=...)");
                };
                match key.as_str() {
                    "s3_endpoint" => m.s3_endpoint = Some(v),
                    "s3_ca_cert" => m.s3_ca_cert = Some(PathBuf::from(v)),
                    "s3_credentials_file" => m.s3_credentials_file = Some(PathBuf::from(v)),
                    _ => m.s3_profile = Some(v),
                }
            }
            "s3_virtual_hosted" => m.s3_virtual_hosted = true,
            "threads" => {
                let n = value
                    .as_deref()
                    .and_then(|v| v.parse::<usize>().ok())
                    .filter(|n| (1..=64).contains(n));
                match n {
                    Some(n) => m.threads = Some(n),
                    None => bail!("threads= takes a number of threads from 1 to 64"),
                }
            }
            "prefetch" => {
                let n = value
                    .as_deref()
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|n| *n <= 1024);
                match n {
                    Some(n) => m.prefetch_mib = Some(n),
                    None => bail!("prefetch= takes a read-ahead size in MiB from 0 (off) to 1024"),
                }
            }
            "rw" => bail!("cbtfs mounts are read-only: remove `rw` from the options"),
            // Always so: restore points are read-only.
            "ro" | "default_permissions" => {}
            "nodev" | "nosuid" | "noexec" | "dev" | "suid" | "exec" | "noatime" | "atime"
            | "nodiratime" | "relatime" | "strictatime" | "sync" | "async" | "dirsync" => {
                m.flags.push(key)
            }
            // For mount(8) and fstab, not for the filesystem.
            "auto" | "noauto" | "user" | "users" | "nouser" | "owner" | "group" | "_netdev"
            | "nofail" | "defaults" | "comment" | "loop" => {}
            k if k.starts_with("x-") => {}
            k => bail!(
                "unknown mount option `{k}`; cbtfs knows allow_other, allow_root, nonempty, log_file=FILE, key_file=FILE, repo_password_file=FILE, s3_endpoint=URL, s3_ca_cert=FILE, s3_virtual_hosted, s3_credentials_file=FILE, s3_profile=NAME, threads=N, prefetch=MiB, cache_dir=DIR, cache_size=SIZE, ro, nodev, nosuid, noexec, noatime (and ignores fstab's auto/noauto/user/_netdev/nofail/x-*)"
            ),
        }
    }
    if m.allow_other && m.allow_root {
        bail!("allow_other and allow_root exclude each other: pick one");
    }
    Ok(m)
}

fn flag_option(f: &str) -> Option<MountOption> {
    Some(match f {
        "nodev" => MountOption::NoDev,
        "nosuid" => MountOption::NoSuid,
        "noexec" => MountOption::NoExec,
        "dev" => MountOption::Dev,
        "suid" => MountOption::Suid,
        "exec" => MountOption::Exec,
        "noatime" => MountOption::NoAtime,
        "atime" => MountOption::Atime,
        "sync" => MountOption::Sync,
        "async" => MountOption::Async,
        "dirsync" => MountOption::DirSync,
        _ => return None,
    })
}

/// The fstype of the mount at `path`, if `path` is a mount point.
pub fn mounted_fstype(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.as_os_str().as_bytes();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mp) = fields.get(4) else { continue };
        if unescape_mountinfo(mp).as_bytes() == want {
            let dash = fields.iter().position(|f| *f == "-");
            found = dash.and_then(|d| fields.get(d + 1)).map(|s| s.to_string());
        }
    }
    found
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How `unmount` goes about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmount {
    /// Unmount now; fails with `UnmountError::Busy` while files are open there.
    Normal,
    /// Detach now: the name goes at once, the filesystem when its last user closes it
    /// (`MNT_DETACH`, `fusermount3 -z`).
    Lazy,
}

#[derive(Debug, thiserror::Error)]
pub enum UnmountError {
    #[error("{path} is in use (a shell or program has files open there); close them and try again")]
    Busy { path: PathBuf },
    #[error("cannot unmount {path}: {detail}")]
    Failed { path: PathBuf, detail: String },
}

/// Unmount `path`. As root with umount2(2), which takes kernel and FUSE mounts alike; as
/// another user with `fusermount3 -u` (`-uz` for `Lazy`), which takes this user's FUSE mounts.
/// The one unmount of cbtfs: the mount's shutdown, browse and the demo all use it.
pub fn unmount(path: &Path, how: Unmount) -> Result<(), UnmountError> {
    let failed = |detail: String| UnmountError::Failed {
        path: path.to_path_buf(),
        detail,
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| failed("the path holds a NUL byte".into()))?;
        let flags = match how {
            Unmount::Normal => 0,
            Unmount::Lazy => libc::MNT_DETACH,
        };
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EBUSY) => UnmountError::Busy {
                path: path.to_path_buf(),
            },
            _ => failed(format!("umount2: {e}")),
        });
    }
    let flag = match how {
        Unmount::Normal => "-u",
        Unmount::Lazy => "-uz",
    };
    let out = std::process::Command::new("fusermount3")
        .arg(flag)
        .arg(path)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| failed(format!("cannot run fusermount3 (install fuse3): {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if text.contains("busy") {
        return Err(UnmountError::Busy {
            path: path.to_path_buf(),
        });
    }
    Err(failed(format!("fusermount3 {flag}: {text}")))
}

/// Detach a mount lazily (`unmount` with `Unmount::Lazy`).
pub(crate) fn detach(path: &Path) -> Result<()> {
    Ok(unmount(path, Unmount::Lazy)?)
}

/// What a FUSE mount whose daemon died answers: "not connected" or "connection aborted".
fn is_dead_mount_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

/// Check the mount point; recover it if a dead cbtfs left a stale mount there (saying so
/// through `notice`). A directory that is not empty is refused unless `nonempty`.
fn prepare_mountpoint(mp: &Path, nonempty: bool, notice: &dyn Fn(&str)) -> Result<PathBuf> {
    let stale = |abs: &Path| -> Result<PathBuf> {
        notice(&format!(
            "{} was left mounted by a process that no longer runs; detaching it",
            abs.display()
        ));
        detach(abs).with_context(|| format!("detaching the stale mount at {}", abs.display()))?;
        prepare_mountpoint(abs, nonempty, notice)
    };
    match std::fs::metadata(mp) {
        Err(e) if is_dead_mount_error(&e) => stale(&absolute(mp)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "mount point {} does not exist; create it with `mkdir -p {}`",
            mp.display(),
            mp.display()
        ),
        Err(e) => Err(e).with_context(|| format!("mount point {}", mp.display())),
        Ok(md) if !md.is_dir() => bail!("mount point {} is not a directory", mp.display()),
        Ok(_) => {
            let abs = std::fs::canonicalize(mp).or_else(|_| absolute(mp))?;
            if let Some(fstype) = mounted_fstype(&abs) {
                // A dead FUSE daemon's mount may still answer stat from cached attributes;
                // listing it tells.
                let dead = fstype.starts_with("fuse")
                    && matches!(std::fs::read_dir(&abs), Err(e) if is_dead_mount_error(&e));
                if dead {
                    return stale(&abs);
                }
                bail!(
                    "{} is already a mount point ({fstype}); unmount it first (`umount {}`) or choose another directory",
                    abs.display(),
                    abs.display()
                );
            }
            // As mount(8) helpers do: a mount would hide what the directory holds.
            let occupied = std::fs::read_dir(&abs)
                .with_context(|| format!("reading mount point {}", abs.display()))?
                .next()
                .is_some();
            if occupied && !nonempty {
                bail!(
                    "mount point {} is not empty: mounting there would hide what it holds; use an empty directory, or add `-o nonempty` to mount over it",
                    abs.display()
                );
            }
            Ok(abs)
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir()?.join(p))
}

/// Ask for 4 MiB readahead on the mount's backing device info, so sequential readers get
/// 1 MiB requests (fuser cannot raise it; the kernel default gives 128 KiB).
pub(crate) fn raise_readahead(mp: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(mp) else {
        return;
    };
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&path, "4096") {
        Ok(()) => tracing::debug!(%path, "readahead set to 4 MiB"),
        Err(e) => {
            tracing::debug!(%path, error = %e, "cannot raise readahead (needs root); reads stay at the kernel's default size")
        }
    }
}

/// Where logs go.
pub(crate) enum LogTarget {
    Stderr,
    File(PathBuf),
    Syslog,
}

pub(crate) fn init_logging(target: LogTarget) -> Result<()> {
    let filter = log_filter();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match target {
        LogTarget::Stderr => {
            use std::io::IsTerminal;
            let ansi = std::io::stderr().is_terminal();
            let _ = b.with_writer(std::io::stderr).with_ansi(ansi).try_init();
        }
        LogTarget::File(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("opening log file {}", p.display()))?;
            let _ = b
                .with_writer(std::sync::Mutex::new(f))
                .with_ansi(false)
                .try_init();
        }
        LogTarget::Syslog => {
            // SAFETY: the identity is a static NUL-terminated string that outlives the process's
            // use of syslog.
            unsafe { libc::openlog(c"cbtfs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
            let _ = b
                .with_writer(Syslog)
                .with_ansi(false)
                .without_time()
                .try_init();
        }
    }
    Ok(())
}

/// What is logged: `CBTFS_LOG` (an `EnvFilter`), else warnings and errors. Not by default:
/// fuser's "Failed to send FUSE reply", which it logs as an error whenever the kernel no longer
/// wants an answer (the reading process was killed, a `| head` went away, the unmount ended the
/// connection). Nothing is wrong then, and nothing could be done.
pub(crate) fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_env("CBTFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser::reply=off"))
}

/// A tracing writer that sends each event to syslog at its level.
struct Syslog;
struct SyslogLine {
    prio: i32,
    buf: Vec<u8>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Syslog {
    type Writer = SyslogLine;
    fn make_writer(&'a self) -> SyslogLine {
        SyslogLine {
            prio: libc::LOG_INFO,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> SyslogLine {
        let prio = match *meta.level() {
            tracing::Level::ERROR => libc::LOG_ERR,
            tracing::Level::WARN => libc::LOG_WARNING,
            tracing::Level::INFO => libc::LOG_INFO,
            tracing::Level::DEBUG | tracing::Level::TRACE => libc::LOG_DEBUG,
        };
        SyslogLine {
            prio,
            buf: Vec::new(),
        }
    }
}

impl Write for SyslogLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine {
    fn drop(&mut self) {
        let text: Vec<u8> = self.buf.iter().copied().filter(|&c| c != 0).collect();
        if let Ok(c) = CString::new(String::from_utf8_lossy(&text).trim_end().to_string()) {
            // SAFETY: "%s" with one valid C string argument.
            unsafe { libc::syslog(self.prio, c"%s".as_ptr(), c.as_ptr()) };
        }
    }
}

/// Mount `repo` at `mountpoint`; returns when unmounted (foreground) or once mounted (parent
/// of a background daemon). What the user should read before that (a stale mount detached)
/// goes to `notice`.
pub fn mount(
    repo: &Path,
    mountpoint: &Path,
    foreground: bool,
    opts: MountOptions,
    secret: Option<&crate::repo::keys::Secret>,
    notice: &dyn Fn(&str),
) -> Result<()> {
    let repo_path = if crate::repo::store::s3::is_s3_url(repo) {
        repo.to_path_buf()
    } else {
        std::fs::canonicalize(repo).with_context(|| format!("repository {}", repo.display()))?
    };
    let repository = Repository::open(&repo_path, secret)?.with_direct_reads();
    let mp = prepare_mountpoint(mountpoint, opts.nonempty, notice)?;
    crate::raise_fd_limit();
    if foreground {
        init_logging(LogTarget::Stderr)?;
        return serve(repository, &mp, &opts, &|| {});
    }
    let log_file = opts.log_file.as_ref().map(|p| absolute(p)).transpose()?;
    daemonize(log_file, |ready| {
        serve(repository, &mp, &opts, &|| ready(""))
    })
    .map(|_| ())
}

/// Run `work` in a detached child process (its own session, `/` as working directory, standard
/// streams on /dev/null, logs to syslog or `log_file`). Returns in the parent once the child
/// calls `ready(message)` (the message is returned), or with the child's error.
///
/// Must be called before any thread exists: the child continues with one thread.
pub(crate) fn daemonize(
    log_file: Option<PathBuf>,
    work: impl FnOnce(&dyn Fn(&str)) -> Result<()>,
) -> Result<String> {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into a valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned here only.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller guarantees no thread has been started yet, so fork is safe; the child
    // continues with a single thread.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            drop(rd);
            // SAFETY: setsid and chdir take no pointers we do not own; the child detaches from
            // the terminal session and the caller's working directory.
            unsafe {
                libc::setsid();
                libc::chdir(c"/".as_ptr());
            }
            let target = match log_file {
                Some(p) => LogTarget::File(p),
                None => LogTarget::Syslog,
            };
            // Written once: "ok" and the message when ready (then closed, so the parent sees
            // EOF), or the error.
            let report = std::cell::RefCell::new(Some(std::fs::File::from(wr)));
            let ready = |msg: &str| {
                if let Some(mut f) = report.borrow_mut().take() {
                    let _ = write!(f, "ok{msg}");
                }
            };
            let code = match init_logging(target)
                .and_then(|_| redirect_stdio())
                .and_then(|_| work(&ready))
            {
                Ok(()) => 0,
                Err(e) => {
                    if let Some(mut f) = report.borrow_mut().take() {
                        let _ = write!(f, "error: {e:#}");
                    }
                    tracing::error!("{e:#}");
                    1
                }
            };
            std::process::exit(code);
        }
        _child => {
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            if let Some(m) = msg.strip_prefix("ok") {
                Ok(m.to_string())
            } else if let Some(e) = msg.strip_prefix("error: ") {
                bail!("{e}")
            } else {
                bail!("the cbtfs daemon exited before it was ready; see the system log")
            }
        }
    }
}

fn redirect_stdio() -> Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    use std::os::fd::AsRawFd;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors from a valid open file.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
    Ok(())
}

pub(crate) fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialize and fill a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Mount and serve until a signal or an outside unmount.
fn serve(repo: Repository, mp: &Path, opts: &MountOptions, ready: &dyn Fn()) -> Result<()> {
    let set = signal_set();
    // SAFETY: blocking signals in this (only) thread before the mount's threads start, so they
    // inherit the mask and the signals wait for sigtimedwait below.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };

    let started = std::time::Instant::now();
    // Past the fork: the cache may write on a thread of its own (a cold mount is ready
    // without waiting for its cache files).
    repo.store().cache_writes_in_background(true);
    let prefetch = opts.prefetch_mib.unwrap_or(DEFAULT_PREFETCH_MIB) << 20;
    let fs = CbtFs::new(repo.clone())?.with_prefetch(prefetch, PREFETCH_THREADS);
    let mut options = vec![
        MountOption::FSName(repo.root().display().to_string()),
        MountOption::Subtype("cbtfs".into()),
        MountOption::RO,
        MountOption::DefaultPermissions,
    ];
    options.extend(opts.flags.iter().filter_map(|f| flag_option(f)));
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if opts.allow_other {
        SessionACL::All
    } else if opts.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.unwrap_or(DEFAULT_THREADS));
    config.clone_fd = true;
    let session = fuser::spawn_mount(FuseAdapter::new(fs), mp, &config)
        .with_context(|| format!("mounting {} on {}", repo.root().display(), mp.display()))?;
    raise_readahead(mp);
    tracing::info!(repository = %repo.root().display(), mountpoint = %mp.display(), ms = started.elapsed().as_millis() as u64, max_read = MAX_READ, "mounted");
    ready();

    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 250_000_000,
    };
    loop {
        if session.guard.is_finished() {
            tracing::info!(mountpoint = %mp.display(), "unmounted from outside; exiting");
            repo.store().cache_writes_in_background(false);
            return finish(session);
        }
        // SAFETY: waits for one of the blocked signals, with a valid set and timeout.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if sig > 0 {
            tracing::info!(signal = sig, mountpoint = %mp.display(), "unmounting");
            break;
        }
    }
    if let Err(e) = detach_or_unmount(mp) {
        tracing::warn!(error = %e, "unmount failed");
    }
    // Serve whatever still holds the detached mount until it is released.
    while !session.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    repo.store().cache_writes_in_background(false);
    finish(session)
}

/// End a session whose thread has finished (the mount is gone). Not joined: dropping fuser's
/// session unmounts its mount point *by path* if the kernel has not yet marked the connection
/// dead, and by then the path may hold a new mount (`umount` then `cbtfs mount` at once): that
/// unmounted the new one.
fn finish(session: fuser::BackgroundSession) -> Result<()> {
    std::mem::forget(session);
    Ok(())
}

/// Unmount; if busy, detach lazily so the name disappears now and the last user ends it.
fn detach_or_unmount(mp: &Path) -> Result<()> {
    match unmount(mp, Unmount::Normal) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::warn!(mountpoint = %mp.display(), error = %e, "detaching instead: open files are served until closed");
            detach(mp)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_on_unescaped_commas() {
        assert_eq!(split_options("a,b\\,c,,d"), vec!["a", "b,c", "d"]);
        assert_eq!(split_options(""), Vec::<String>::new());
    }

    #[test]
    fn fstab_options_are_tolerated_and_unknown_refused() {
        let o = parse_options(&[
            "ro,noauto,_netdev,nofail,x-systemd.automount,user,nodev,allow_other".into(),
        ])
        .unwrap();
        assert!(o.allow_other);
        assert_eq!(o.flags, vec!["nodev"]);
        assert!(parse_options(&["rw".into()]).is_err());
        let e = parse_options(&["bogus".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown mount option `bogus`"), "{e}");
        assert!(parse_options(&["allow_other,allow_root".into()]).is_err());
        assert_eq!(
            parse_options(&["threads=4".into()]).unwrap().threads,
            Some(4)
        );
        assert!(parse_options(&["threads=0".into()]).is_err());
        let o = parse_options(&["prefetch=0".into(), "prefetch=64".into()]).unwrap();
        assert_eq!(o.prefetch_mib, Some(64));
        assert_eq!(
            parse_options(&["prefetch=0".into()]).unwrap().prefetch_mib,
            Some(0)
        );
        for bad in ["prefetch", "prefetch=x", "prefetch=2048", "prefetch=-1"] {
            assert!(parse_options(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(parse_options(&["noauto,nonempty".into()]).unwrap().nonempty);
        assert!(!parse_options(&["ro".into()]).unwrap().nonempty);
        let o = parse_options(&["log_file=/tmp/a\\,b.log".into()]).unwrap();
        assert_eq!(o.log_file, Some(PathBuf::from("/tmp/a,b.log")));
        let o = parse_options(&["cache_dir=/var/cache/x,cache_size=512M".into()]).unwrap();
        assert_eq!(o.cache_dir, Some(PathBuf::from("/var/cache/x")));
        assert_eq!(o.cache_size, Some(512 << 20));
        for bad in [
            "cache_dir",
            "cache_dir=",
            "cache_size",
            "cache_size=1.5G",
            "cache_size=9Q",
        ] {
            assert!(parse_options(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn s3_options_name_the_endpoint_and_credentials() {
        let o = parse_options(&[
            "noauto,s3_endpoint=https://rgw.lan:8443,s3_ca_cert=/etc/ca.pem,s3_virtual_hosted"
                .into(),
            "s3_credentials_file=/root/.aws/cbtfs,s3_profile=offsite".into(),
        ])
        .unwrap();
        assert_eq!(o.s3_endpoint.as_deref(), Some("https://rgw.lan:8443"));
        assert_eq!(o.s3_ca_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert!(o.s3_virtual_hosted);
        assert_eq!(
            o.s3_credentials_file,
            Some(PathBuf::from("/root/.aws/cbtfs"))
        );
        assert_eq!(o.s3_profile.as_deref(), Some("offsite"));
        let none = parse_options(&["ro".into()]).unwrap();
        assert_eq!((none.s3_endpoint, none.s3_virtual_hosted), (None, false));
        for bad in ["s3_endpoint", "s3_endpoint=", "s3_profile", "s3_ca_cert="] {
            let e = parse_options(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("needs a value"), "{bad}: {e}");
        }
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
    }
}
