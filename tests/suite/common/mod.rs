//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod counting_proxy;
pub mod faulty;
pub mod pool;
pub mod rgw;
pub mod simhost;
#[allow(unused_imports)]
pub use simhost::{SimHost, text};

pub const BS: usize = 65536;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cbtfs")
}

/// The key file every test repository is encrypted with (made once per test process; no KDF,
/// so opening costs nothing). Commands get it through CBTFS_KEY_FILE (see `cmd`).
pub fn key_file() -> &'static Path {
    static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        remove_dead_key_dirs();
        let dir = std::env::temp_dir().join(format!("{KEY_DIR_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("repo.key");
        if !p.exists() {
            cbtfs::repo::keys::Secret::create_key_file(&p).expect("make the tests' key file");
        }
        p
    })
}

const KEY_DIR_PREFIX: &str = "cbtfs-test-keys-";

/// Remove the key directories of test processes that have ended (each process makes one; a
/// process cannot remove its own at exit, as statics are never dropped).
fn remove_dead_key_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(KEY_DIR_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A copy of the tests' key file that user `uid` owns (tests that run cbtfs as nobody).
pub fn key_file_for(uid: u32, dir: &Path) -> PathBuf {
    let p = dir.join("repo.key");
    std::fs::copy(key_file(), &p).unwrap();
    std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
    p
}

/// Held by every test that makes loop devices or compares the host's loop devices and mounts
/// before and after: all integration tests share one process, and one test's loop device must
/// not show up as another's leftover.
pub fn host_state() -> std::sync::MutexGuard<'static, ()> {
    static HOST_STATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HOST_STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// The tests' repository secret, for library calls.
pub fn secret() -> cbtfs::repo::keys::Secret {
    cbtfs::repo::keys::Secret::read_key_file(key_file()).expect("read the tests' key file")
}

/// Create a repository (encrypted with `key_file`) through the library.
pub fn init_repo(path: &Path) -> cbtfs::repo::Repository {
    cbtfs::repo::Repository::init(path, &cbtfs::repo::Encryption::Secret(secret()))
        .expect("init a test repository")
}

/// Open a test repository through the library.
pub fn open_repo(path: &Path) -> cbtfs::repo::Repository {
    cbtfs::repo::Repository::open(path, Some(&secret())).expect("open a test repository")
}

/// The cbtfs binary as a command, with the tests' repository key in its environment.
pub fn cbtfs_cmd() -> Command {
    let mut c = Command::new(bin());
    c.env("CBTFS_KEY_FILE", key_file());
    c
}

/// Run cbtfs with `args`; returns the output (never panics on failure status).
pub fn cbtfs(args: &[&str]) -> Output {
    output_within(cbtfs_cmd().args(args).stdin(Stdio::null()), command_limit())
}

/// How long one command of a test may take before the test fails naming it (a hang must fail
/// the test that hung, with what the host was doing, not stall the whole run):
/// `CBTFS_TEST_COMMAND_LIMIT` seconds, 600 by default.
pub fn command_limit() -> Duration {
    let secs = std::env::var("CBTFS_TEST_COMMAND_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(secs)
}

/// `cmd.output()`, bounded (stdin is what `cmd` says, inherited if unset): a command still running after `limit`, or one that exited while a
/// process it started still holds its output open (a daemon that kept the caller's pipes), is
/// killed and the test panics with what the host was doing.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    use std::io::Read;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        rx
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let status = wait_within(&mut child, limit, &what);
    // Once the command has exited, its output ends at once unless something else holds it.
    let eof = Duration::from_secs(30);
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>, name: &str| {
        rx.recv_timeout(eof).unwrap_or_else(|_| {
            panic!(
                "{what} exited ({status}) but its {name} stayed open for {eof:?}: a process it started holds it\n{}",
                hang_report()
            )
        })
    };
    let stdout = collect(out, "stdout");
    let stderr = collect(err, "stderr");
    Output {
        status,
        stdout,
        stderr,
    }
}

/// `output()` (stdin on /dev/null, as there) and `wait()`, bounded by `command_limit()` (see
/// `output_within`): the commands tests run use these, so a hang fails its own test instead of
/// stalling the whole run.
pub trait Bounded {
    type Out;
    fn bounded(&mut self) -> std::io::Result<Self::Out>;
}

impl Bounded for Command {
    type Out = Output;
    fn bounded(&mut self) -> std::io::Result<Output> {
        Ok(output_within(self.stdin(Stdio::null()), command_limit()))
    }
}

impl Bounded for Child {
    type Out = std::process::ExitStatus;
    fn bounded(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let what = format!("process {}", self.id());
        Ok(wait_within(self, command_limit(), &what))
    }
}

/// Wait for `child` at most `limit`; past it, kill it and panic with what the host was doing.
pub fn wait_within(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(st) = child.try_wait().expect("waiting for a child") {
            return st;
        }
        if start.elapsed() > limit {
            let report = hang_report();
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}; killed. The host:\n{report}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// scripts/hang-report.sh's picture of the host: processes, blocked kernel stacks, mounts.
pub fn hang_report() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hang-report.sh");
    match Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("(no report: {e})"),
    }
}

/// Run and require success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = cbtfs(args);
    assert!(
        o.status.success(),
        "cbtfs {:?} failed: {}\n{}",
        args,
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run and require failure; returns stderr + stdout.
pub fn fails(args: &[&str]) -> (i32, String) {
    let o = cbtfs(args);
    assert!(
        !o.status.success(),
        "cbtfs {:?} unexpectedly succeeded",
        args
    );
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        ),
    )
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce from the seed.
pub struct TestRng(u64);
impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

pub fn vdi(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-000000000001")
}

/// RFC 3339 time `day` days after 2026-01-01T02:00:00Z plus `sec` seconds.
pub fn time(step: u64) -> String {
    let base = 1_767_232_800u64; // 2026-01-01T02:00:00Z
    let t = base + step * 3600;
    let days = t / 86400;
    let rem = t % 86400;
    // Civil-from-days (Howard Hinnant), enough for test times.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

pub fn write_bitmap(dir: &Path, name: &str, blocks: &[u64], nblocks: u64) -> PathBuf {
    let set: roaring::RoaringBitmap = blocks.iter().map(|&b| b as u32).collect();
    let p = dir.join(name);
    std::fs::write(&p, cbtfs::bitmap::encode_base64(&set, nblocks)).unwrap();
    p
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// One step of a disk's life: the image at the snapshot and the blocks CBT reports.
pub struct Step {
    pub image: Vec<u8>,
    /// None: a new full base (new set).
    pub bitmap: Option<Vec<u64>>,
    /// Bitmap length in blocks (≥ the disk's blocks: longer is legal).
    pub bitmap_blocks: u64,
}

fn random_size(rng: &mut TestRng) -> usize {
    let blocks = 1 + rng.below(40) as usize;
    blocks * BS
        - if rng.below(3) == 0 {
            512 * (1 + rng.below(127) as usize)
        } else {
            0
        }
}

fn random_block(rng: &mut TestRng, buf: &mut [u8]) {
    match rng.below(10) {
        0..=1 => buf.fill(0),
        2 => {
            // A partial write inside the block.
            let a = rng.below(buf.len() as u64) as usize;
            let b = a + rng.below((buf.len() - a) as u64 + 1) as usize;
            rng.fill(&mut buf[a..b]);
        }
        _ => rng.fill(buf),
    }
}

/// A random life of a disk: a base, then changes, resizes and occasional new bases.
pub fn life(seed: u64, depth: usize) -> Vec<Step> {
    let mut rng = TestRng::new(seed);
    let mut image = vec![0u8; random_size(&mut rng)];
    for c in image.chunks_mut(BS) {
        if rng.below(3) != 0 {
            random_block(&mut rng, c);
        }
    }
    let mut steps = vec![Step {
        image: image.clone(),
        bitmap: None,
        bitmap_blocks: 0,
    }];
    for _ in 1..depth {
        if rng.below(25) == 0 {
            for c in image.chunks_mut(BS) {
                if rng.below(4) == 0 {
                    random_block(&mut rng, c);
                }
            }
            steps.push(Step {
                image: image.clone(),
                bitmap: None,
                bitmap_blocks: 0,
            });
            continue;
        }
        let mut changed = Vec::new();
        if rng.below(8) == 0 {
            // Resize (XenServer only grows, but the format must not care).
            let new = random_size(&mut rng);
            let old = image.len();
            image.resize(new, 0);
            if new > old {
                // Growth: the new area is marked, as CBT would, when written.
                for b in (old / BS)..new.div_ceil(BS) {
                    match rng.below(3) {
                        0 => changed.push(b as u64),
                        // Data past the old end that no bitmap marks: import must still
                        // take it, since no older point can hold it.
                        1 if b * BS >= old => {
                            let end = ((b + 1) * BS).min(new);
                            rng.fill(&mut image[b * BS..end]);
                        }
                        _ => {}
                    }
                }
            }
        }
        let nblocks = image.len().div_ceil(BS) as u64;
        for _ in 0..rng.below(6) {
            changed.push(rng.below(nblocks));
        }
        for &b in &changed {
            let b = b as usize;
            let end = ((b + 1) * BS).min(image.len());
            random_block(&mut rng, &mut image[b * BS..end]);
        }
        if rng.below(4) == 0 {
            // CBT may over-report: a marked block can be unchanged.
            changed.push(rng.below(nblocks));
        }
        changed.sort();
        changed.dedup();
        let extra = if rng.below(5) == 0 {
            1 + rng.below(20)
        } else {
            0
        };
        steps.push(Step {
            image: image.clone(),
            bitmap: Some(changed),
            bitmap_blocks: nblocks + extra,
        });
    }
    steps
}

/// Import a life into a new repository at `repo` (library calls: fast). Returns the vdi.
pub fn import_life(dir: &Path, repo: &Path, steps: &[Step], seed: u64) -> String {
    import_life_spaced(dir, repo, steps, seed, 1)
}

/// `n` points of one disk of `blocks` blocks, each wholly random (seed `seed + i`): a base,
/// then increments whose bitmap marks every block, an hour apart. Returns each point's bytes.
pub fn import_random_points(
    dir: &Path,
    repo: &Path,
    vdi: &str,
    blocks: u64,
    n: u64,
    seed: u64,
) -> Vec<Vec<u8>> {
    let all: Vec<u64> = (0..blocks).collect();
    let bm = write_bitmap(dir, "all.bm", &all, blocks);
    let img = dir.join("img");
    let mut points = Vec::new();
    for i in 0..n {
        let mut data = vec![0u8; blocks as usize * 65536];
        TestRng::new(seed + i).fill(&mut data);
        std::fs::write(&img, &data).unwrap();
        let t = time(i);
        let mut args = vec![
            "import",
            s(repo),
            "--vdi",
            vdi,
            "--raw",
            s(&img),
            "--time",
            &t,
        ];
        if i > 0 {
            args.extend(["--bitmap", s(&bm)]);
        }
        ok(&args);
        points.push(data);
    }
    std::fs::remove_file(&img).unwrap();
    points
}

/// `import_life` with points `hours` apart.
pub fn import_life_spaced(
    dir: &Path,
    repo: &Path,
    steps: &[Step],
    seed: u64,
    hours: u64,
) -> String {
    let r = init_repo(repo);
    let v = vdi(seed as u32);
    let img = dir.join("life.img");
    for (i, st) in steps.iter().enumerate() {
        std::fs::write(&img, &st.image).unwrap();
        let bitmap = st.bitmap.as_ref().map(|bits| {
            let p = write_bitmap(dir, "life.bm", bits, st.bitmap_blocks);
            (std::fs::read_to_string(p).unwrap(), "bm".to_string())
        });
        cbtfs::import::import_raw(
            &r,
            &cbtfs::import::ImportRequest {
                vdi: v.clone(),
                disk_name: Some("disk".into()),
                vm_uuid: None,
                vm_name: None,
                source: cbtfs::import::ImportSource::Raw(img.clone()),
                bitmap,
                time: cbtfs::timefmt::parse(&time(i as u64 * hours)).unwrap(),
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
    std::fs::remove_file(&img).unwrap();
    v
}

/// A test that cannot run here says why; under `CBTFS_TEST_STRICT=1` (CI sets it) it fails
/// instead, so a missing tool or privilege can never pass unseen.
pub fn skip(reason: &str) {
    if std::env::var_os("CBTFS_TEST_STRICT").is_some_and(|v| v == "1") {
        panic!("cannot run under CBTFS_TEST_STRICT=1: {reason}");
    }
    eprintln!("skipped: {reason}");
}

pub fn can_mount() -> bool {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        skip("needs root and /dev/fuse");
        return false;
    }
    true
}

pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `cbtfs mount -f`, unmounted (SIGTERM) when dropped.
pub struct Mounted {
    pub mp: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Mounted {
    pub fn new(repo: &Path, mp: &Path, extra: &[&str]) -> Mounted {
        std::fs::create_dir_all(mp).unwrap();
        let mp = std::fs::canonicalize(mp).unwrap();
        let log = mp.with_extension("log");
        let mut child = cbtfs_cmd()
            .args(["mount", "-f", s(repo), s(&mp)])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while cbtfs::mount::mounted_fstype(&mp).is_none() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "cbtfs mount exited ({st}): {}",
                    std::fs::read_to_string(&log).unwrap()
                );
            }
            assert!(start.elapsed() < Duration::from_secs(20), "mount not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        Mounted {
            mp,
            child: Some(child),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for the mount process to exit by itself (after an outside unmount).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("cbtfs mount did not exit after its mount went away");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill with a valid pid of our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                panic!("cbtfs mount did not exit on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        if cbtfs::mount::mounted_fstype(&self.mp).is_some() {
            let _ = Command::new("umount").arg("-l").arg(&self.mp).status();
        }
    }
}

/// Every point's path in the mount, in order (from `cbtfs ls --json`).
pub fn point_paths(repo: &Path) -> Vec<String> {
    let j: serde_json::Value = serde_json::from_str(&ok(&["ls", s(repo), "--json"])).unwrap();
    let mut out = Vec::new();
    for vm in j["vms"].as_array().unwrap() {
        for d in vm["disks"].as_array().unwrap() {
            for set in d["sets"].as_array().unwrap() {
                for p in set["points"].as_array().unwrap() {
                    out.push(format!("{}.raw", p["path"].as_str().unwrap()));
                }
            }
        }
    }
    out
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run openssl with `args`; fails the test with its message if it fails.
pub fn openssl(args: &[&str]) {
    let o = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Whether a program is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Run a shell command (LVM's descriptor warnings silenced); fails the test with its output.
pub fn sh(cmd: &str) -> String {
    let o = output_within(
        Command::new("sh")
            .args(["-c", cmd])
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null()),
        command_limit(),
    );
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every file below `p` (directories walked, not listed).
pub fn files_under(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap().path();
            if e.is_dir() {
                stack.push(e);
            } else {
                out.push(e);
            }
        }
    }
    out
}

/// Every file of the repository at `repo` (relative path -> bytes), but the lock files,
/// whose content names the current holder.
pub fn repo_objects(repo: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    files_under(repo)
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(repo).unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&f).unwrap();
            (rel, bytes)
        })
        // Lock files (the writers' lock, disk locks) are not objects.
        .filter(|(rel, _)| rel != "lock" && !rel.starts_with("locks/"))
        .collect()
}

/// Unmounts (lazily) a filesystem the test mounted, however the test ends.
pub struct MountGuard(pub PathBuf);
impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
