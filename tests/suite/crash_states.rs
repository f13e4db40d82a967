//! Every crash state of a commit, found systematically (issue #16).
//!
//! `tests/crash.rs` kills writers at random moments; this test enumerates the states a crash can
//! leave instead. Method (after ALICE and CrashMonkey):
//!
//! 1. Run the real `cbtfs` binary (an import, a prune, a gc, a backup against the simulated host)
//!    under `strace -f -xx -y`, recording every system call that can change a file or a
//!    directory, with the bytes written (hex-escaped, never truncated: a truncated string fails
//!    the test).
//! 2. Replay the calls on paths inside the repository on a model file system: inodes (files as
//!    byte vectors, directories as name → inode maps, so hard links are real), in two layers.
//!    The *volatile* layer is what the running program sees; the *durable* layer is what a
//!    power cut keeps, under a conservative POSIX model: a file's bytes become durable at an
//!    `fsync`/`fdatasync` of that file (its content as of then), a directory's entries (create,
//!    link, unlink, rename, exchange, mkdir, rmdir) at an `fsync` of that directory. (Format 2's
//!    store puts with a temporary file, `fsync`, `renameat2(RENAME_NOREPLACE)` and a directory
//!    `fsync`, deletes with `unlink` and a directory `fsync`; `renameat2`'s flags are parsed,
//!    and a flag the model does not know fails the test.) Unsynced
//!    writes are dropped. The replay starts from the repository as it was before the command
//!    (read from disk: durable), and its volatile layer must end equal, byte for byte, to the
//!    real repository afterwards — or the model is wrong and the test fails.
//! 3. Crash states: the durable state at every fsync barrier, plus, at every directory
//!    operation, the state of a file system that journals metadata in order but loses unsynced
//!    data (directories as the program left them, file bytes only as last fsynced: the
//!    `data=writeback` worst case), plus the durable state once the command has returned.
//!    Identical states are checked once.
//! 4. Each state is materialised in a fresh directory, then: `cbtfs verify` reports no damage;
//!    each set lists exactly the points it had before the command or exactly those it has after
//!    (never a mix, never a gap); every point that survives the command is present (a missing one
//!    is a *lost commit*), and after the command returned every point it made is; every listed
//!    point exports byte-identical to the image it was made from (anything else is *wrong
//!    bytes*); and the next writer goes on: a further import (or backup) succeeds, reads back
//!    exactly, and leaves no leftovers of the crash (no temporary file of a killed put, no
//!    manifest but the listed points'); then `cbtfs gc` collects the unreferenced packs and
//!    indexes a crash may leave (a second gc finds nothing) and `verify` passes. A prune may
//!    also leave, midway, the oldest of a set's dropped points (it deletes them newest first).
//!
//! 5. A kill is not a power cut: a killed writer's unsynced directory changes stay visible, and
//!    the next writer may build on them. `a_commit_after_a_killed_writer_survives_a_power_cut`
//!    kills each import, the prune and the gc after every directory change or fsync (the volatile
//!    state lives on), runs the next import on that state under strace too, and cuts the power
//!    once it returned: its point and every earlier one must be there. `init_is_durable_once_
//!    it_returns` records `cbtfs init` from the directory that holds the new repository.
//!    `a_power_cut_in_the_writer_after_a_prune_keeps_every_point` cuts the power during the
//!    import that follows a returned prune (whose deletions are then still unsynced).
//!
//! The tests print `crash states: K states, L lost commits, W wrong bytes` and fail on any
//! violation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::common::*;
use serde_json::Value;

/// System calls that can change files or directories, or whose descriptors matter for those
/// that do. `?` lets a name this architecture lacks (`open`, `rename` on arm64) pass.
const TRACED: &[&str] = &[
    "open",
    "openat",
    "openat2",
    "creat",
    "write",
    "pwrite64",
    "writev",
    "pwritev",
    "pwritev2",
    "ftruncate",
    "truncate",
    "fallocate",
    "fsync",
    "fdatasync",
    "sync_file_range",
    "syncfs",
    "sync",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "close",
    "close_range",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "lseek",
    "copy_file_range",
    "sendfile",
    "splice",
    "symlink",
    "symlinkat",
    "mknod",
    "mknodat",
    "mmap",
    "clone",
    "clone3",
    "fork",
    "vfork",
];

/// Largest string strace prints whole; anything longer fails the test (never a silent cut).
const STRACE_STRLEN: usize = 64 << 20;

type Name = Vec<u8>;

#[derive(Clone, Debug)]
enum Node {
    File(Arc<Vec<u8>>),
    Dir(BTreeMap<Name, usize>),
}

/// One file-system operation as strace printed it.
#[derive(Debug)]
struct Call {
    line: usize,
    name: String,
    args: Vec<String>,
    ret: i64,
}

/// An open file description (shared by `dup`ed descriptors).
#[derive(Clone)]
struct Ofd {
    ino: usize,
    pos: u64,
    append: bool,
}

/// A state a crash can leave: every entry below the repository root.
#[derive(Clone)]
struct Snap {
    what: String,
    /// Path (relative, `/`-joined) → directory, or file with its inode and bytes.
    entries: BTreeMap<Vec<u8>, SnapEntry>,
}

#[derive(Clone, PartialEq)]
enum SnapEntry {
    Dir,
    File(usize, Arc<Vec<u8>>),
}

impl Snap {
    fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        // Hard links: files sharing an inode share the first path that names it.
        let mut first: HashMap<usize, &[u8]> = HashMap::new();
        for (p, e) in &self.entries {
            p.hash(&mut h);
            match e {
                SnapEntry::Dir => 0u8.hash(&mut h),
                SnapEntry::File(ino, data) => {
                    1u8.hash(&mut h);
                    first.entry(*ino).or_insert(p).hash(&mut h);
                    data.hash(&mut h);
                }
            }
        }
        h.finish()
    }

    /// Write the state out as a real directory tree at `dest` (hard links kept).
    fn materialise(&self, dest: &Path) {
        use std::os::unix::ffi::OsStrExt;
        std::fs::create_dir_all(dest).unwrap();
        let mut made: HashMap<usize, PathBuf> = HashMap::new();
        for (p, e) in &self.entries {
            let path = dest.join(std::ffi::OsStr::from_bytes(p));
            match e {
                SnapEntry::Dir => std::fs::create_dir(&path).unwrap(),
                SnapEntry::File(ino, data) => match made.get(ino) {
                    Some(first) => std::fs::hard_link(first, &path).unwrap(),
                    None => {
                        std::fs::write(&path, &data[..]).unwrap();
                        made.insert(*ino, path);
                    }
                },
            }
        }
    }
}

/// The model file system and the replay of a trace on it.
#[derive(Clone)]
struct Replay {
    /// The repository root, canonical, as bytes.
    root: Vec<u8>,
    vol: Vec<Node>,
    dur: Vec<Node>,
    fds: HashMap<i64, usize>,
    ofds: Vec<Ofd>,
    states: Vec<Snap>,
    fsyncs: usize,
}

fn bytes(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().to_vec()
}

impl Replay {
    /// Start from the repository as it is on disk (all of it durable).
    fn load(root: &Path) -> Replay {
        let mut r = Replay {
            root: bytes(root),
            vol: vec![Node::Dir(BTreeMap::new())],
            dur: Vec::new(),
            fds: HashMap::new(),
            ofds: Vec::new(),
            states: Vec::new(),
            fsyncs: 0,
        };
        let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
        r.load_dir(root, 0, &mut seen);
        r.dur = r.vol.clone();
        r
    }

    fn load_dir(&mut self, dir: &Path, ino: usize, seen: &mut HashMap<(u64, u64), usize>) {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            let name = e.file_name().as_bytes().to_vec();
            let child = if md.is_dir() {
                let c = self.push(Node::Dir(BTreeMap::new()));
                self.load_dir(&e.path(), c, seen);
                c
            } else {
                assert!(
                    md.is_file(),
                    "{}: not a file or directory",
                    e.path().display()
                );
                match seen.get(&(md.dev(), md.ino())) {
                    Some(&c) => c,
                    None => {
                        let c = self.push(Node::File(Arc::new(std::fs::read(e.path()).unwrap())));
                        seen.insert((md.dev(), md.ino()), c);
                        c
                    }
                }
            };
            self.entries(ino).insert(name, child);
        }
    }

    fn push(&mut self, n: Node) -> usize {
        self.vol.push(n.clone());
        // A new inode is durable only as an empty object, reachable from nowhere.
        let empty = match n {
            Node::File(_) => Node::File(Arc::new(Vec::new())),
            Node::Dir(_) => Node::Dir(BTreeMap::new()),
        };
        if self.dur.len() + 1 == self.vol.len() {
            self.dur.push(empty);
        }
        self.vol.len() - 1
    }

    fn entries(&mut self, ino: usize) -> &mut BTreeMap<Name, usize> {
        match &mut self.vol[ino] {
            Node::Dir(m) => m,
            Node::File(_) => panic!("model: inode {ino} is not a directory"),
        }
    }

    /// Components of `abs` below the root; None if `abs` is outside the repository.
    fn rel(&self, abs: &[u8]) -> Option<Vec<Name>> {
        let rest = abs.strip_prefix(&self.root[..])?;
        if !rest.is_empty() && rest[0] != b'/' {
            return None;
        }
        let comps: Vec<Name> = rest
            .split(|&c| c == b'/')
            .filter(|c| !c.is_empty())
            .map(|c| c.to_vec())
            .collect();
        assert!(
            !comps.iter().any(|c| c == b"." || c == b".."),
            "unmodelled: a path with . or .. ({})",
            String::from_utf8_lossy(abs)
        );
        Some(comps)
    }

    fn lookup(&self, comps: &[Name]) -> Option<usize> {
        let mut ino = 0;
        for c in comps {
            match &self.vol[ino] {
                Node::Dir(m) => ino = *m.get(c)?,
                Node::File(_) => return None,
            }
        }
        Some(ino)
    }

    /// The parent directory's inode and the last component.
    fn parent(&self, comps: &[Name], what: &str) -> (usize, Name) {
        let (last, dir) = comps
            .split_last()
            .unwrap_or_else(|| panic!("unmodelled: {what} of the repository root itself"));
        let p = self
            .lookup(dir)
            .unwrap_or_else(|| panic!("model diverged: {what}: parent missing"));
        (p, last.clone())
    }

    fn snapshot(&self, what: String, dirs_volatile: bool) -> Snap {
        self.snap(what, dirs_volatile, false)
    }

    /// The tree with directories and file bytes from the volatile or the durable layer.
    fn snap(&self, what: String, dirs_volatile: bool, files_volatile: bool) -> Snap {
        let mut entries = BTreeMap::new();
        let mut stack = vec![(Vec::new(), 0usize)];
        while let Some((path, ino)) = stack.pop() {
            let layer = if dirs_volatile { &self.vol } else { &self.dur };
            let Node::Dir(m) = &layer[ino] else {
                unreachable!()
            };
            for (name, &child) in m {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                match &self.dur[child] {
                    Node::Dir(_) => {
                        entries.insert(p.clone(), SnapEntry::Dir);
                        stack.push((p, child));
                    }
                    Node::File(d) => {
                        let d = match (&self.vol[child], files_volatile) {
                            (Node::File(v), true) => v.clone(),
                            _ => d.clone(),
                        };
                        entries.insert(p, SnapEntry::File(child, d));
                    }
                }
            }
        }
        Snap { what, entries }
    }

    /// What the running program sees now (to check the model against the real repository).
    fn volatile(&self) -> BTreeMap<Vec<u8>, Option<Arc<Vec<u8>>>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(Vec::new(), 0usize)];
        while let Some((path, ino)) = stack.pop() {
            let Node::Dir(m) = &self.vol[ino] else {
                unreachable!()
            };
            for (name, &child) in m {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                match &self.vol[child] {
                    Node::Dir(_) => {
                        out.insert(p.clone(), None);
                        stack.push((p, child));
                    }
                    Node::File(d) => {
                        out.insert(p, Some(d.clone()));
                    }
                }
            }
        }
        out
    }

    fn fd_ino(&self, fd: i64) -> Option<usize> {
        self.fds.get(&fd).map(|&o| self.ofds[o].ino)
    }

    fn write_at(&mut self, ino: usize, off: u64, data: &[u8]) {
        let Node::File(f) = &mut self.vol[ino] else {
            panic!("model: write to a directory")
        };
        let f = Arc::make_mut(f);
        let end = off as usize + data.len();
        if f.len() < end {
            f.resize(end, 0);
        }
        f[off as usize..end].copy_from_slice(data);
    }

    fn dir_op(&mut self, c: &Call, what: &str) {
        let s = format!("line {}: after {} {}", c.line, c.name, what);
        self.states.push(self.snapshot(s, true));
    }

    /// Apply one call. Calls on paths and descriptors outside the repository are ignored;
    /// anything inside that the model does not know fails the test.
    fn apply(&mut self, c: &Call) {
        let unmodelled = |why: &str| -> ! { panic!("unmodelled (line {}): {why}: {c:?}", c.line) };
        let a = |i: usize| -> &str {
            c.args
                .get(i)
                .map(|s| s.as_str())
                .unwrap_or_else(|| unmodelled("missing argument"))
        };
        if c.ret < 0 {
            return; // failed: no effect
        }
        match c.name.as_str() {
            "open" | "openat" | "creat" | "openat2" => {
                let (path, flags) = match c.name.as_str() {
                    "open" => (abs_path(None, &str_arg(a(0))), a(1).to_string()),
                    "creat" => (abs_path(None, &str_arg(a(0))), "O_CREAT|O_TRUNC".into()),
                    "openat" => (abs_path(Some(a(0)), &str_arg(a(1))), a(2).to_string()),
                    _ => (abs_path(Some(a(0)), &str_arg(a(1))), a(2).to_string()),
                };
                self.fds.remove(&c.ret);
                let Some(comps) = self.rel(&path) else {
                    return;
                };
                let ino = match self.lookup(&comps) {
                    Some(i) => {
                        if flags.contains("O_TRUNC")
                            && let Node::File(f) = &mut self.vol[i]
                        {
                            Arc::make_mut(f).clear();
                        }
                        i
                    }
                    None if flags.contains("O_CREAT") => {
                        let (p, name) = self.parent(&comps, "create");
                        let i = self.push(Node::File(Arc::new(Vec::new())));
                        self.entries(p).insert(name.clone(), i);
                        self.dir_op(c, &String::from_utf8_lossy(&name));
                        i
                    }
                    None => panic!(
                        "model diverged (line {}): {c:?} opened a missing file",
                        c.line
                    ),
                };
                self.ofds.push(Ofd {
                    ino,
                    pos: 0,
                    append: flags.contains("O_APPEND"),
                });
                self.fds.insert(c.ret, self.ofds.len() - 1);
            }
            "close" => {
                self.fds.remove(&fd_num(a(0)));
            }
            "close_range" => {
                let (lo, hi) = (int_arg(a(0)), int_arg(a(1)));
                self.fds.retain(|&fd, _| fd < lo || fd > hi);
            }
            "dup" | "dup2" | "dup3" => {
                let old = fd_num(a(0));
                match self.fds.get(&old).copied() {
                    Some(o) => {
                        self.fds.insert(c.ret, o);
                    }
                    None => {
                        self.fds.remove(&c.ret);
                    }
                }
            }
            "fcntl" => {
                if a(1).starts_with("F_DUPFD") {
                    match self.fds.get(&fd_num(a(0))).copied() {
                        Some(o) => {
                            self.fds.insert(c.ret, o);
                        }
                        None => {
                            self.fds.remove(&c.ret);
                        }
                    }
                }
            }
            "lseek" => {
                if let Some(&o) = self.fds.get(&fd_num(a(0))) {
                    self.ofds[o].pos = c.ret as u64;
                }
            }
            "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2" => {
                let Some(&o) = self.fds.get(&fd_num(a(0))) else {
                    return;
                };
                let mut data = match c.name.as_str() {
                    "write" | "pwrite64" => str_arg(a(1)),
                    _ => iov_arg(a(1)),
                };
                assert!(
                    data.len() as i64 >= c.ret,
                    "line {}: strace printed fewer bytes than were written",
                    c.line
                );
                data.truncate(c.ret as usize);
                let ino = self.ofds[o].ino;
                let off = match c.name.as_str() {
                    "write" | "writev" => {
                        if self.ofds[o].append {
                            match &self.vol[ino] {
                                Node::File(f) => f.len() as u64,
                                Node::Dir(_) => unmodelled("write to a directory"),
                            }
                        } else {
                            self.ofds[o].pos
                        }
                    }
                    _ => int_arg(a(3)) as u64,
                };
                self.write_at(ino, off, &data);
                if matches!(c.name.as_str(), "write" | "writev") {
                    self.ofds[o].pos = off + data.len() as u64;
                }
            }
            "ftruncate" | "truncate" => {
                let ino = if c.name == "ftruncate" {
                    let Some(i) = self.fd_ino(fd_num(a(0))) else {
                        return;
                    };
                    i
                } else {
                    let Some(comps) = self.rel(&abs_path(None, &str_arg(a(0)))) else {
                        return;
                    };
                    self.lookup(&comps)
                        .unwrap_or_else(|| unmodelled("truncate of a missing file"))
                };
                let len = int_arg(a(1)) as usize;
                if let Node::File(f) = &mut self.vol[ino] {
                    Arc::make_mut(f).resize(len, 0);
                }
            }
            "fallocate" => {
                if let Some(ino) = self.fd_ino(fd_num(a(0))) {
                    if a(1) != "0" {
                        unmodelled("fallocate with a mode");
                    }
                    let end = (int_arg(a(2)) + int_arg(a(3))) as usize;
                    if let Node::File(f) = &mut self.vol[ino]
                        && f.len() < end
                    {
                        Arc::make_mut(f).resize(end, 0);
                    }
                }
            }
            "fsync" | "fdatasync" => {
                if let Some(ino) = self.fd_ino(fd_num(a(0))) {
                    self.dur[ino] = self.vol[ino].clone();
                    self.fsyncs += 1;
                    let s = format!("line {}: after {}({})", c.line, c.name, fd_path(a(0)));
                    self.states.push(self.snapshot(s, false));
                }
            }
            "sync_file_range" => {} // promises nothing about durability
            "sync" | "syncfs" => {
                self.dur = self.vol.clone();
                self.fsyncs += 1;
                let s = format!("line {}: after {}", c.line, c.name);
                self.states.push(self.snapshot(s, false));
            }
            "rename" | "renameat" | "renameat2" => {
                // renameat2's flags: RENAME_NOREPLACE (what puts use) or RENAME_EXCHANGE.
                let (from, to, flags) = match c.name.as_str() {
                    "rename" => (
                        abs_path(None, &str_arg(a(0))),
                        abs_path(None, &str_arg(a(1))),
                        "0".to_string(),
                    ),
                    "renameat" => (
                        abs_path(Some(a(0)), &str_arg(a(1))),
                        abs_path(Some(a(2)), &str_arg(a(3))),
                        "0".to_string(),
                    ),
                    _ => (
                        abs_path(Some(a(0)), &str_arg(a(1))),
                        abs_path(Some(a(2)), &str_arg(a(3))),
                        a(4).to_string(),
                    ),
                };
                let (f, t) = match (self.rel(&from), self.rel(&to)) {
                    (None, None) => return,
                    (Some(f), Some(t)) => (f, t),
                    _ => unmodelled("rename across the repository's boundary"),
                };
                let (fp, fname) = self.parent(&f, "rename");
                let (tp, tname) = self.parent(&t, "rename");
                let src = self
                    .lookup(&f)
                    .unwrap_or_else(|| panic!("model diverged: rename of a missing entry"));
                let flags: BTreeSet<&str> = flags
                    .split('|')
                    .map(str::trim)
                    .filter(|f| *f != "0")
                    .collect();
                if let Some(other) = flags
                    .iter()
                    .find(|f| !matches!(**f, "RENAME_NOREPLACE" | "RENAME_EXCHANGE"))
                {
                    unmodelled(&format!("rename flag {other}"));
                }
                if flags.contains("RENAME_NOREPLACE") {
                    // It succeeded, so nothing was there: the model must agree.
                    assert!(
                        self.lookup(&t).is_none(),
                        "model diverged (line {}): RENAME_NOREPLACE onto an existing entry succeeded",
                        c.line
                    );
                }
                if flags.contains("RENAME_EXCHANGE") {
                    let dst = self
                        .lookup(&t)
                        .unwrap_or_else(|| panic!("model diverged: exchange with nothing"));
                    self.entries(fp).insert(fname, dst);
                    self.entries(tp).insert(tname, src);
                } else {
                    self.entries(fp).remove(&fname);
                    self.entries(tp).insert(tname, src);
                }
                self.dir_op(c, &String::from_utf8_lossy(&to));
            }
            "link" | "linkat" => {
                let (from, to) = if c.name == "link" {
                    (
                        abs_path(None, &str_arg(a(0))),
                        abs_path(None, &str_arg(a(1))),
                    )
                } else {
                    (
                        abs_path(Some(a(0)), &str_arg(a(1))),
                        abs_path(Some(a(2)), &str_arg(a(3))),
                    )
                };
                let (f, t) = match (self.rel(&from), self.rel(&to)) {
                    (None, None) => return,
                    (Some(f), Some(t)) => (f, t),
                    _ => unmodelled("link across the repository's boundary"),
                };
                let src = self
                    .lookup(&f)
                    .unwrap_or_else(|| panic!("model diverged: link of a missing file"));
                let (tp, tname) = self.parent(&t, "link");
                self.entries(tp).insert(tname, src);
                self.dir_op(c, &String::from_utf8_lossy(&to));
            }
            "unlink" | "unlinkat" | "rmdir" => {
                let path = match c.name.as_str() {
                    "unlinkat" => abs_path(Some(a(0)), &str_arg(a(1))),
                    _ => abs_path(None, &str_arg(a(0))),
                };
                let Some(comps) = self.rel(&path) else {
                    return;
                };
                let (p, name) = self.parent(&comps, "unlink");
                assert!(
                    self.entries(p).remove(&name).is_some(),
                    "model diverged (line {}): removed a missing entry",
                    c.line
                );
                self.dir_op(c, &String::from_utf8_lossy(&path));
            }
            "mkdir" | "mkdirat" => {
                let path = match c.name.as_str() {
                    "mkdirat" => abs_path(Some(a(0)), &str_arg(a(1))),
                    _ => abs_path(None, &str_arg(a(0))),
                };
                let Some(comps) = self.rel(&path) else {
                    return;
                };
                let (p, name) = self.parent(&comps, "mkdir");
                let i = self.push(Node::Dir(BTreeMap::new()));
                self.entries(p).insert(name, i);
                self.dir_op(c, &String::from_utf8_lossy(&path));
            }
            "copy_file_range" | "sendfile" | "splice" => {
                let out = if c.name == "sendfile" { a(0) } else { a(2) };
                if self.fd_ino(fd_num(out)).is_some() {
                    unmodelled("in-kernel copy into a repository file");
                }
            }
            "symlink" | "symlinkat" | "mknod" | "mknodat" => {
                let p = match c.name.as_str() {
                    "symlink" => abs_path(None, &str_arg(a(1))),
                    "symlinkat" => abs_path(Some(a(1)), &str_arg(a(2))),
                    "mknod" => abs_path(None, &str_arg(a(0))),
                    _ => abs_path(Some(a(0)), &str_arg(a(1))),
                };
                if self.rel(&p).is_some() {
                    unmodelled("a symlink or device node in the repository");
                }
            }
            "mmap" => {
                let fd = fd_num(a(4));
                if self.fd_ino(fd).is_some()
                    && a(2).contains("PROT_WRITE")
                    && a(3).contains("MAP_SHARED")
                {
                    unmodelled("a writable shared mapping of a repository file");
                }
            }
            "clone" | "clone3" | "fork" | "vfork" => {
                // Threads share the descriptor table; another process would not.
                let flags = c.args.join(",");
                if !flags.contains("CLONE_THREAD") {
                    unmodelled("a child process (descriptor tables diverge)");
                }
            }
            other => unmodelled(&format!("system call {other}")),
        }
    }
}

// ---- strace output -------------------------------------------------------------------------

fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 4);
    let mut i = 0;
    while i < b.len() {
        if b.get(i..i + 2)? != b"\\x" {
            return None;
        }
        let h = std::str::from_utf8(b.get(i + 2..i + 4)?).ok()?;
        out.push(u8::from_str_radix(h, 16).ok()?);
        i += 4;
    }
    Some(out)
}

/// A string argument, `"\x.."` (never cut short: strace marks a cut with `...`).
fn str_arg(s: &str) -> Vec<u8> {
    let s = s.trim();
    let inner = s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or_else(|| panic!("strace: expected a whole string, got {:.200}", s));
    unhex(inner).unwrap_or_else(|| panic!("strace: not a hex string: {:.200}", s))
}

/// The bytes of an iovec array, in order.
fn iov_arg(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("iov_base=\"") {
        rest = &rest[i + 10..];
        let end = rest.find('"').expect("strace: unterminated iov_base");
        assert!(
            !rest[end + 1..].starts_with("..."),
            "strace cut an iov_base short"
        );
        out.extend(unhex(&rest[..end]).expect("strace: iov_base not hex"));
        rest = &rest[end + 1..];
    }
    out
}

fn int_arg(s: &str) -> i64 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => i64::from_str_radix(h, 16).unwrap_or_else(|_| panic!("strace: number {s}")),
        None => s.parse().unwrap_or_else(|_| panic!("strace: number {s}")),
    }
}

/// A descriptor argument, `5<\x2f...>` or `AT_FDCWD<...>`: its number.
fn fd_num(s: &str) -> i64 {
    let n = s.split('<').next().unwrap_or("").trim();
    if n == "AT_FDCWD" {
        return -100;
    }
    int_arg(n)
}

/// The path strace's `-y` printed for a descriptor, if it is one.
fn fd_path(s: &str) -> String {
    fd_annotation(s).map_or_else(
        || s.to_string(),
        |p| String::from_utf8_lossy(&p).into_owned(),
    )
}

fn fd_annotation(s: &str) -> Option<Vec<u8>> {
    let (_, rest) = s.split_once('<')?;
    unhex(rest.strip_suffix('>')?)
}

/// An absolute path from a `*at` call's directory descriptor (its `-y` path) and a path.
fn abs_path(dirfd: Option<&str>, p: &[u8]) -> Vec<u8> {
    if p.first() == Some(&b'/') {
        return p.to_vec();
    }
    let dir = dirfd
        .and_then(fd_annotation)
        .unwrap_or_else(|| panic!("unmodelled: relative path {}", String::from_utf8_lossy(p)));
    assert!(
        !dir.ends_with(b" (deleted)"),
        "unmodelled: a path relative to a deleted directory"
    );
    let mut out = dir;
    out.push(b'/');
    out.extend_from_slice(p);
    out
}

fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut in_str = false;
    let mut cur = String::new();
    for ch in s.chars() {
        match ch {
            '"' => in_str = !in_str,
            '(' | '[' | '{' | '<' if !in_str => depth += 1,
            ')' | ']' | '}' | '>' if !in_str => depth -= 1,
            ',' if !in_str && depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// Parse `strace -f -xx -y` output into complete calls, in completion order (a call split by
/// another thread's is joined and placed where it returned).
fn parse_trace(text: &str) -> Vec<Call> {
    let mut pending: HashMap<String, String> = HashMap::new();
    let mut calls = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if rest.starts_with("+++") || rest.starts_with("---") {
            continue;
        }
        let full = if let Some(r) = rest.strip_prefix("<... ") {
            let (_, after) = r
                .split_once(" resumed>")
                .unwrap_or_else(|| panic!("strace line {line_no}: {line:.200}"));
            let start = pending
                .remove(pid)
                .unwrap_or_else(|| panic!("strace line {line_no}: resumed without a start"));
            format!("{start}{after}")
        } else if let Some(s) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid.to_string(), s.to_string());
            continue;
        } else {
            rest.to_string()
        };
        let Some(open) = full.find('(') else {
            continue;
        };
        let name = full[..open].to_string();
        // strace pads short calls' results into a column: `...)      = 0`.
        let Some(eq) = full.rfind(" = ") else {
            panic!("strace line {line_no}: no result: {full:.200}");
        };
        let close = full[..eq].trim_end().len() - 1;
        assert_eq!(
            &full[close..=close],
            ")",
            "strace line {line_no}: {full:.200}"
        );
        let ret_s = full[eq + 3..].split([' ', '<']).next().unwrap_or("?");
        if ret_s == "?" {
            continue;
        }
        let args = split_args(&full[open + 1..close]);
        for a in &args {
            assert!(
                !(a.starts_with('"') && a.ends_with("...")),
                "strace line {line_no}: a string was cut short (raise STRACE_STRLEN)"
            );
        }
        let ret = if name == "mmap" { 0 } else { int_arg(ret_s) };
        calls.push(Call {
            line: line_no,
            name,
            args,
            ret,
        });
    }
    calls
}

/// Whether strace is here and may trace (ptrace can be forbidden in containers); says why not.
fn can_trace() -> bool {
    if !have("strace") {
        skip("strace is not installed (scripts/setup.sh installs it)");
        return false;
    }
    let o = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .bounded();
    match o {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            skip(&format!(
                "strace cannot trace here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
            false
        }
        Err(e) => {
            skip(&format!("strace does not run: {e}"));
            false
        }
    }
}

/// Run cbtfs with `args` under strace; returns the calls recorded, or how the command failed.
fn record(dir: &Path, args: &[String]) -> Result<Vec<Call>, String> {
    let trace = dir.join("trace.txt");
    let list: Vec<String> = TRACED.iter().map(|n| format!("?{n}")).collect();
    let o = Command::new("strace")
        .env("CBTFS_KEY_FILE", key_file())
        .args(["-f", "-qq", "-xx", "-y", "-s"])
        .arg(STRACE_STRLEN.to_string())
        .arg("-o")
        .arg(&trace)
        .arg("-e")
        .arg(format!("trace={}", list.join(",")))
        .arg("--")
        .arg(bin())
        .args(args)
        .bounded()
        .expect("strace runs");
    let text = std::fs::read_to_string(&trace).expect("strace wrote its trace");
    std::fs::remove_file(&trace).unwrap();
    if !o.status.success() {
        return Err(format!(
            "cbtfs {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        ));
    }
    Ok(parse_trace(&text))
}

/// The model must have seen exactly what the command did to the repository at `root`.
fn check_model(label: &str, root: &Path, replay: &Replay) {
    let real = real_tree(root);
    let model = replay.volatile();
    if real != model {
        let diff: Vec<String> = real
            .keys()
            .chain(model.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|k| real.get(*k) != model.get(*k))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        panic!("{label}: the model of the trace differs from the repository at {diff:?}");
    }
}

/// Every file and directory below `root`, as the model sees them.
fn real_tree(root: &Path) -> BTreeMap<Vec<u8>, Option<Arc<Vec<u8>>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let mut p: Vec<u8> = rel.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(&bytes(Path::new(&e.file_name())));
            if e.file_type().unwrap().is_dir() {
                out.insert(p.clone(), None);
                stack.push((e.path(), p));
            } else {
                out.insert(p, Some(Arc::new(std::fs::read(e.path()).unwrap())));
            }
        }
    }
    out
}

// ---- checking the states ---------------------------------------------------------------------

/// (vdi, set) → point times (RFC 3339), in order; and (vdi, time) → path in the listing.
#[derive(Default, Clone, PartialEq, Debug)]
struct Listing {
    sets: BTreeMap<(String, String), Vec<String>>,
    paths: BTreeMap<(String, String), String>,
    problems: Vec<String>,
}

fn listing(repo: &Path) -> Result<Listing, String> {
    let o = cbtfs(&["ls", s(repo), "--json"]);
    if !o.status.success() {
        return Err(format!("ls: {}", String::from_utf8_lossy(&o.stderr)));
    }
    let j: Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("ls --json: {e}"))?;
    let mut l = Listing::default();
    for vm in j["vms"].as_array().into_iter().flatten() {
        for d in vm["disks"].as_array().into_iter().flatten() {
            for set in d["sets"].as_array().into_iter().flatten() {
                for p in set["problems"].as_array().into_iter().flatten() {
                    l.problems.push(p.to_string());
                }
                for p in set["points"].as_array().into_iter().flatten() {
                    let vdi = p["vdi"].as_str().unwrap_or_default().to_string();
                    let t = p["time"].as_str().unwrap_or_default().to_string();
                    let set = p["set"].as_str().unwrap_or_default().to_string();
                    l.sets
                        .entry((vdi.clone(), set))
                        .or_default()
                        .push(t.clone());
                    l.paths
                        .insert((vdi, t), p["path"].as_str().unwrap_or_default().to_string());
                }
            }
        }
    }
    Ok(l)
}

/// (vdi, time) → the image a point was made from.
type Truth = HashMap<(String, String), Vec<u8>>;

/// A writer run after a kill (the command, for a repository as listed) and the point it makes.
struct NextWriter<'a> {
    args: &'a dyn Fn(&Path, &Listing) -> Vec<String>,
    point: ((String, String), Vec<u8>),
}

/// What the states of one recorded command are checked against.
struct Expect<'a> {
    before: Listing,
    after: Listing,
    /// (vdi, time) → the image the point was made from.
    truth: &'a HashMap<(String, String), Vec<u8>>,
}

#[derive(Default)]
struct Tally {
    states: usize,
    lost: usize,
    wrong: usize,
    failures: Vec<String>,
}

/// The next writer after a crash: runs on the state's repository, Err says what went wrong.
type FollowUp<'a> = dyn Fn(&Path, &Listing) -> Result<(), String> + 'a;

fn check_state(
    repo: &Path,
    ex: &Expect,
    returned: bool,
    extra: Option<&(String, String)>,
    follow: &FollowUp,
    t: &mut Tally,
    what: &str,
) {
    let fail = |t: &mut Tally, m: String| t.failures.push(format!("{what}: {m}"));
    t.states += 1;
    let o = cbtfs(&["verify", s(repo), "--json"]);
    if !o.status.success() {
        fail(
            t,
            format!(
                "verify reports damage: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        );
    }
    let l = match listing(repo) {
        Ok(l) => l,
        Err(e) => return fail(t, e),
    };
    if !l.problems.is_empty() {
        fail(t, format!("ls names problems: {:?}", l.problems));
    }
    let mut l = l;
    if let Some((vdi, time)) = extra {
        // The next writer's point: required, and not part of what the set rule compares.
        let mut found = false;
        for ((v, _), times) in l.sets.iter_mut() {
            if v == vdi && times.last() == Some(time) {
                times.pop();
                found = true;
            }
        }
        l.sets.retain(|_, times| !times.is_empty());
        if !found {
            t.lost += 1;
            fail(t, format!("the next writer's point {vdi}@{time} is lost"));
        }
    }
    let keys: BTreeSet<&(String, String)> = l
        .sets
        .keys()
        .chain(ex.before.sets.keys())
        .chain(ex.after.sets.keys())
        .collect();
    let none = Vec::new();
    for k in keys {
        let got = l.sets.get(k).unwrap_or(&none);
        let (b, a) = (
            ex.before.sets.get(k).unwrap_or(&none),
            ex.after.sets.get(k).unwrap_or(&none),
        );
        // Points the command keeps must be there at every moment; after it returned, all of
        // the new ones too.
        let must: Vec<&String> = if returned {
            a.iter().collect()
        } else {
            b.iter().filter(|x| a.contains(x)).collect()
        };
        let lost = must.iter().filter(|x| !got.contains(x)).count();
        t.lost += lost;
        if !set_state_ok(got, b, a, returned) {
            fail(
                t,
                format!(
                    "set {k:?} lists {got:?}: neither its points before {b:?} nor after {a:?} (nor the latter with the oldest of the dropped ones still to delete)"
                ),
            );
        } else if lost > 0 {
            fail(t, format!("set {k:?} lost {lost} committed points"));
        }
    }
    for ((vdi, time), path) in &l.paths {
        let Some(want) = ex.truth.get(&(vdi.clone(), time.clone())) else {
            t.wrong += 1;
            fail(
                t,
                format!("{path} ({vdi}@{time}) is no point ever committed"),
            );
            continue;
        };
        let o = cbtfs(&["export", s(repo), path, "-"]);
        if !o.status.success() {
            fail(
                t,
                format!("export {path}: {}", String::from_utf8_lossy(&o.stderr)),
            );
        } else if o.stdout != *want {
            t.wrong += 1;
            fail(
                t,
                format!("export {path} gives other bytes than the point's image"),
            );
        }
    }
    if let Err(e) = follow(repo, &l) {
        fail(t, format!("the next writer: {e}"));
    }
}

/// Whether a set lists what it may while (`returned` false) or after a command: exactly its
/// points after the command, or (before it returned) exactly those before, or those after plus
/// the oldest of the points the command drops. Format 2's prune deletes a set's dropped points
/// newest first, one manifest at a time (format 1 swapped whole set directories): a crash
/// midway leaves the oldest ones of them, a shorter chain that reads exactly, never a hole.
fn set_state_ok(got: &[String], before: &[String], after: &[String], returned: bool) -> bool {
    if got == after {
        return true;
    }
    if returned {
        return false;
    }
    if got == before {
        return true;
    }
    let dropped: Vec<&String> = before.iter().filter(|x| !after.contains(x)).collect();
    let kept: Vec<&String> = got.iter().filter(|x| after.contains(x)).collect();
    let left: Vec<&String> = got.iter().filter(|x| !after.contains(x)).collect();
    kept.len() == after.len()
        && left.len() <= dropped.len()
        && dropped[..left.len()] == left[..]
        && got.windows(2).all(|w| w[0] < w[1])
}

/// No leftovers of a crash once the next writer ran: no temporary files of killed puts
/// (but a pin's: pins are put without the writer lock, by restores too, so the next writer
/// cannot tell a killed pin's temporary file from a live one; it is a few bytes, never read), no
/// manifest but the listed points' (no older generation, no point a prune
/// superseded), no snapshot journal; and `cbtfs gc` collects whatever unreferenced packs and
/// indexes a killed writer left (a second gc finds nothing), after which `verify` passes.
fn no_leftovers(repo: &Path) -> Result<(), String> {
    let files = files_under(repo);
    let temps: Vec<&PathBuf> = files
        .iter()
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with('.') && n.ends_with(".tmp") && !p.starts_with(repo.join("hosts"))
        })
        .collect();
    if !temps.is_empty() {
        return Err(format!("temporary files of killed puts remain: {temps:?}"));
    }
    let l = listing(repo)?;
    let manifests = files
        .iter()
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("points")))
        .count();
    if manifests != l.paths.len() {
        return Err(format!(
            "{manifests} manifests for {} listed points: superseded ones remain",
            l.paths.len()
        ));
    }
    let o = cbtfs(&["gc", s(repo)]);
    if !o.status.success() {
        return Err(format!("gc: {}", String::from_utf8_lossy(&o.stderr)));
    }
    let o = cbtfs(&["gc", s(repo), "--dry-run", "--json"]);
    let j: Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("gc --json: {e}"))?;
    for what in ["packs_deleted", "packs_repacked", "objects_deleted"] {
        if j[what] != 0 {
            return Err(format!("a second gc would still do something: {j}"));
        }
    }
    if !cbtfs(&["verify", s(repo)]).status.success() {
        return Err("verify fails after gc".into());
    }
    // A backup's snapshot journal is gone once its snapshot is tagged.
    if let Ok(entries) = std::fs::read_dir(repo.join("journal")) {
        let left: Vec<String> = entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        if !left.is_empty() {
            return Err(format!("snapshot journal leftovers: {left:?}"));
        }
    }
    Ok(())
}

/// Record `args` on the repository at `repo`, then check every crash state (or, with `next`,
/// every kill followed by the next writer and a power cut).
#[allow(clippy::too_many_arguments)]
fn crash_states(
    label: &str,
    dir: &Path,
    repo: &Path,
    args: &[String],
    truth_for: &dyn Fn(&Listing) -> Truth,
    follow: &FollowUp,
    next: Option<&NextWriter>,
    total: &mut Tally,
) {
    let before = listing(repo).unwrap();
    let mut replay = Replay::load(repo);
    let initial = replay.snapshot("before the command".into(), false);
    let calls = record(dir, args).unwrap_or_else(|e| panic!("{label}: {e}"));
    // Where the process could be killed (the file system living on): after each call that
    // changed a directory or made something durable.
    let mut kills: Vec<(String, Replay)> = Vec::new();
    let mut seen_kills = BTreeSet::new();
    for c in &calls {
        let n = replay.states.len();
        replay.apply(c);
        if replay.states.len() > n && next.is_some() {
            let both = (
                replay.snap(String::new(), true, true).digest(),
                replay.snapshot(String::new(), false).digest(),
            );
            if seen_kills.insert(both) {
                let mut k = replay.clone();
                k.states.clear();
                k.fds.clear();
                kills.push((format!("killed at line {} ({})", c.line, c.name), k));
            }
        }
    }
    check_model(label, repo, &replay);
    let after = listing(repo).unwrap();
    assert!(
        before != after || initial.digest() != replay.snap(String::new(), true, true).digest(),
        "{label}: the command changed nothing"
    );
    let truth = truth_for(&after);
    let ex = Expect {
        before,
        after,
        truth: &truth,
    };
    let generated = replay.states.len() + 2;
    let fsyncs = replay.fsyncs;
    let done = replay.snapshot("after the command returned".to_string(), false);
    let mut seen = BTreeSet::new();
    let mut t = Tally::default();
    // Checked first: the state that must hold the new points.
    // With a next writer, only the kills are checked (the power cuts alone are another test).
    let alone = if next.is_some() { 0 } else { usize::MAX };
    for (i, st) in std::iter::once(done)
        .chain(std::iter::once(initial))
        .chain(replay.states)
        .enumerate()
        .take(alone)
    {
        if !seen.insert(st.digest()) && i > 0 {
            continue;
        }
        let sdir = tempfile::tempdir_in(dir).unwrap();
        let r = sdir.path().join("repo");
        st.materialise(&r);
        check_state(
            &r,
            &ex,
            i == 0,
            None,
            follow,
            &mut t,
            &format!("{label}: {}", st.what),
        );
    }
    let mut killed = 0;
    if let Some(nw) = next {
        // Killed, then the next writer ran and returned, then the power went: its point and
        // every point committed before must be there.
        let mut truth = truth.clone();
        truth.insert(nw.point.0.clone(), nw.point.1.clone());
        let ex = Expect {
            truth: &truth,
            ..ex
        };
        for (what, mut k) in kills {
            let what = format!("{label}: {what}, the next writer returned, power cut");
            let kdir = tempfile::tempdir_in(dir).unwrap();
            let r = kdir.path().join("repo");
            k.snap(String::new(), true, true).materialise(&r);
            k.root = bytes(&r);
            let l = match listing(&r) {
                Ok(l) => l,
                Err(e) => {
                    t.failures.push(format!("{what}: {e}"));
                    continue;
                }
            };
            let calls = match record(kdir.path(), &(nw.args)(&r, &l)) {
                Ok(c) => c,
                Err(e) => {
                    t.failures.push(format!("{what}: the next writer: {e}"));
                    continue;
                }
            };
            for c in &calls {
                k.apply(c);
            }
            check_model(&what, &r, &k);
            let st = k.snapshot(what.clone(), false);
            let sr = kdir.path().join("power-cut");
            st.materialise(&sr);
            check_state(
                &sr,
                &ex,
                false,
                Some(&nw.point.0),
                &|_, _| Ok(()),
                &mut t,
                &what,
            );
            killed += 1;
        }
    }
    let checked = match next {
        None => format!("{generated} crash states ({} distinct)", t.states),
        Some(_) => format!("{killed} kills, each followed by the next writer and a power cut"),
    };
    eprintln!(
        "{label}: {} calls, {fsyncs} fsyncs, {checked}, {} lost commits, {} wrong bytes",
        calls.len(),
        t.lost,
        t.wrong
    );
    total.states += t.states;
    total.lost += t.lost;
    total.wrong += t.wrong;
    total.failures.extend(t.failures);
}

// ---- the scenarios -------------------------------------------------------------------------------

const VDI: &str = "0000a001-0000-4000-8000-000000000001";
const BLOCKS: usize = 16; // 1 MiB images: small traces

fn image(rng: &mut TestRng) -> Vec<u8> {
    let mut v = vec![0u8; BLOCKS * BS];
    for b in 0..BLOCKS {
        if rng.below(4) != 0 {
            rng.fill(&mut v[b * BS..(b + 1) * BS]);
        }
    }
    v
}

fn import_args(repo: &Path, img: &Path, time: &str, bitmap: Option<&Path>) -> Vec<String> {
    let mut a: Vec<String> = [
        "import",
        s(repo),
        "--vdi",
        VDI,
        "--raw",
        s(img),
        "--time",
        time,
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    if let Some(b) = bitmap {
        a.extend(["--bitmap".to_string(), s(b).to_string()]);
    }
    a
}

fn import(
    repo: &Path,
    dir: &Path,
    data: &[u8],
    time: &str,
    bitmap: Option<&[u64]>,
) -> Result<(), String> {
    let img = dir.join("next.img");
    std::fs::write(&img, data).unwrap();
    let bm = bitmap.map(|b| write_bitmap(dir, "next.bm", b, BLOCKS as u64));
    let a = import_args(repo, &img, time, bm.as_deref());
    let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
    let o = cbtfs(&a);
    if !o.status.success() {
        return Err(format!(
            "import failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

/// The next import after a crash: an increment holding every block (or a base when the disk
/// has no point), which must read back exactly and leave no leftovers.
const NEXT_TIME: &str = "2026-06-01T00:00:00Z";

/// The image the next writer imports.
fn next_image() -> Vec<u8> {
    let mut data = image(&mut TestRng::new(999));
    data[..8].copy_from_slice(b"nextnext");
    data
}

/// The next import: an increment holding every block, or a base when the disk has no point.
fn next_import_args(repo: &Path, l: &Listing, dir: &Path) -> Vec<String> {
    let img = dir.join("next.img");
    std::fs::write(&img, next_image()).unwrap();
    let all: Vec<u64> = (0..BLOCKS as u64).collect();
    let has = l.sets.keys().any(|(v, _)| v == VDI);
    let bm = has.then(|| write_bitmap(dir, "next.bm", &all, BLOCKS as u64));
    import_args(repo, &img, NEXT_TIME, bm.as_deref())
}

/// The next writer after a crash: the next import, which must read back exactly and leave no
/// leftovers.
fn next_import(repo: &Path, l: &Listing, dir: &Path) -> Result<(), String> {
    let data = next_image();
    let a = next_import_args(repo, l, dir);
    let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
    let o = cbtfs(&a);
    if !o.status.success() {
        return Err(format!(
            "import failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    if !cbtfs(&["verify", s(repo)]).status.success() {
        return Err("verify fails after the next import".into());
    }
    let o = cbtfs(&["export", s(repo), &format!("{VDI}@latest"), "-"]);
    if !o.status.success() || o.stdout != data {
        return Err("the next import does not read back exactly".into());
    }
    no_leftovers(repo)?;
    let o = cbtfs(&["export", s(repo), &format!("{VDI}@latest"), "-"]);
    if !o.status.success() || o.stdout != data {
        return Err("the next import does not read back exactly after gc".into());
    }
    Ok(())
}

#[test]
fn every_crash_state_of_import_prune_and_backup_commits_is_intact() {
    if !can_trace() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(d.path()).unwrap();
    let mut total = Tally::default();
    import_and_prune_states(&dir, false, &mut total);
    backup_states(&dir, &mut total);
    report(&total);
    assert!(
        total.states >= 50,
        "too few crash states: the test proved little"
    );
}

/// A writer killed (the machine living on), then the next writer runs and returns, then the
/// power goes: the next writer's point must survive, so it must make durable whatever of the
/// killed writer's directory changes it builds on.
///
/// Needs `LocalStore::make_parents` to fsync the parent of a directory it finds existing (once
/// per process): otherwise an import killed after `mkdir points` (before its fsync of the root)
/// loses the next import's point (issue #16's defect 14, again in format 2).
#[test]
fn a_commit_after_a_killed_writer_survives_a_power_cut() {
    if !can_trace() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(d.path()).unwrap();
    let mut total = Tally::default();
    import_and_prune_states(&dir, true, &mut total);
    report(&total);
    assert!(
        total.states >= 50,
        "too few crash states: the test proved little"
    );
}

fn report(total: &Tally) {
    eprintln!(
        "crash states: {} states, {} lost commits, {} wrong bytes",
        total.states, total.lost, total.wrong
    );
    assert!(
        total.failures.is_empty(),
        "{} violations:\n{}",
        total.failures.len(),
        total.failures.join("\n")
    );
    assert_eq!((total.lost, total.wrong), (0, 0));
}

/// Imports (a disk's first base, an increment, a new set), a prune (with its gc) and a gc that
/// repacks, recorded; their crash states checked (or, with `kills`, their kills followed by the
/// next import and a power cut).
fn import_and_prune_states(dir: &Path, kills: bool, total: &mut Tally) {
    let mut rng = TestRng::new(16);
    let mut truth: HashMap<(String, String), Vec<u8>> = HashMap::new();
    let follow_dir = dir.join("follow");
    std::fs::create_dir(&follow_dir).unwrap();
    let follow = |r: &Path, l: &Listing| next_import(r, l, &follow_dir);
    let next_args = |r: &Path, l: &Listing| next_import_args(r, l, &follow_dir);
    let next = NextWriter {
        args: &next_args,
        point: ((VDI.into(), NEXT_TIME.into()), next_image()),
    };

    let next = kills.then_some(&next);
    let repo = dir.join("repo");
    ok(&["init", s(&repo)]);
    let img = dir.join("img");
    let t0 = "2026-01-01T02:00:00Z";
    let mut data = image(&mut rng);
    std::fs::write(&img, &data).unwrap();
    truth.insert((VDI.into(), t0.into()), data.clone());
    let a = import_args(&repo, &img, t0, None);
    crash_states(
        "import base",
        dir,
        &repo,
        &a,
        &|_| truth.clone(),
        &follow,
        next,
        total,
    );

    let t1 = "2026-01-02T02:00:00Z";
    let changed = [1u64, 2, 7, 15];
    for &b in &changed {
        rng.fill(&mut data[b as usize * BS..(b as usize + 1) * BS]);
    }
    data[7 * BS..8 * BS].fill(0); // a block that became zero: recorded, not stored
    std::fs::write(&img, &data).unwrap();
    truth.insert((VDI.into(), t1.into()), data.clone());
    let bm = write_bitmap(dir, "bm", &changed, BLOCKS as u64);
    let a = import_args(&repo, &img, t1, Some(&bm));
    crash_states(
        "import increment",
        dir,
        &repo,
        &a,
        &|_| truth.clone(),
        &follow,
        next,
        total,
    );

    let t2 = "2026-01-03T02:00:00Z";
    let data2 = image(&mut rng);
    std::fs::write(&img, &data2).unwrap();
    truth.insert((VDI.into(), t2.into()), data2.clone());
    let a = import_args(&repo, &img, t2, None);
    crash_states(
        "import new set",
        dir,
        &repo,
        &a,
        &|_| truth.clone(),
        &follow,
        next,
        total,
    );

    // Prune: three sets; keep the newest point of each of the three newest months. The October
    // set goes whole (moved aside, deleted); November's keeps its second point, rewritten as a
    // base; the last set keeps its base (linked) and its newest point, rewritten to absorb the
    // dropped one.
    let prepo = dir.join("prune-repo");
    ok(&["init", s(&prepo)]);
    let mut data = image(&mut rng);
    let times = [
        ("2025-10-01T00:00:00Z", true),
        ("2025-10-02T00:00:00Z", false),
        ("2025-11-01T00:00:00Z", true),
        ("2025-11-02T00:00:00Z", false),
        ("2025-12-31T00:00:00Z", true),
        ("2026-01-01T00:00:00Z", false),
        ("2026-01-02T00:00:00Z", false),
    ];
    for (k, (t, base)) in times.iter().enumerate() {
        let mut changed: Vec<u64> = (0..3).map(|_| rng.below(BLOCKS as u64)).collect();
        changed.sort();
        changed.dedup();
        for &b in &changed {
            let blk = &mut data[b as usize * BS..(b as usize + 1) * BS];
            if k % 3 == 2 {
                blk.fill(0);
            } else {
                rng.fill(blk);
            }
        }
        import(&prepo, dir, &data, t, (!base).then_some(&changed[..])).unwrap();
        truth.insert((VDI.into(), t.to_string()), data.clone());
    }
    let a: Vec<String> = ["prune", s(&prepo), "--keep-monthly", "3"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    crash_states(
        "prune",
        dir,
        &prepo,
        &a,
        &|_| truth.clone(),
        &follow,
        next,
        total,
    );

    // gc after a prune that left its garbage (--no-gc): the dropped points' packs are dead or
    // partly live; `--repack-below 100` repacks every partly live one (new packs, new chunk
    // index objects, then the old ones deleted). It lists the same points before and after.
    let grepo = dir.join("gc-repo");
    ok(&["init", s(&grepo)]);
    let mut data = image(&mut rng);
    for k in 0..5u64 {
        let t = format!("2026-02-0{}T00:00:00Z", k + 1);
        let changed: Vec<u64> = if k == 0 {
            Vec::new()
        } else {
            let mut c: Vec<u64> = (0..4).map(|_| rng.below(BLOCKS as u64)).collect();
            c.sort();
            c.dedup();
            for &b in &c {
                rng.fill(&mut data[b as usize * BS..(b as usize + 1) * BS]);
            }
            c
        };
        import(&grepo, dir, &data, &t, (k > 0).then_some(&changed[..])).unwrap();
        truth.insert((VDI.into(), t), data.clone());
    }
    ok(&["prune", s(&grepo), "--keep-last", "2", "--no-gc"]);
    let a: Vec<String> = ["gc", s(&grepo), "--repack-below", "100"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    crash_states(
        "gc",
        dir,
        &grepo,
        &a,
        &|_| truth.clone(),
        &follow,
        next,
        total,
    );
}

/// `cbtfs backup` against the simulated host: the first (full export, certificate pinned) and
/// an incremental one (CBT and NBD).
fn backup_states(dir: &Path, total: &mut Tally) {
    use cbtfs::sim::{Sim, SimConfig};
    let cfg = SimConfig::new(&dir.join("sim"));
    let pw = dir.join("password");
    std::fs::write(&pw, format!("{}\n", cfg.password)).unwrap();
    let sim = Sim::start(cfg).unwrap();
    let img = dir.join("disk.img");
    let mut rng = TestRng::new(1616);
    let mut data = vec![0u8; 2 * BLOCKS * BS];
    for b in 0..2 * BLOCKS {
        if rng.below(3) == 0 {
            rng.fill(&mut data[b * BS..b * BS + 4096]);
        }
    }
    std::fs::write(&img, &data).unwrap();
    let (_, vdis) = sim.add_vm("vm1", &[("root", &img)]).unwrap();
    let vdi = vdis[0].clone();
    let repo = dir.join("backup-repo");
    ok(&["init", s(&repo)]);
    let args = |repo: &Path| -> Vec<String> {
        [
            "backup",
            s(repo),
            "--host",
            &sim.url,
            "--password-file",
            s(&pw),
            "--vdi",
            &vdi,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    // A point's time is the host's snapshot time: the point the recorded run made is the one
    // the live repository lists afterwards and no earlier truth names; its image is the disk
    // as it was (no guest writes during a backup).
    let truth: std::cell::RefCell<HashMap<(String, String), Vec<u8>>> = Default::default();
    let truth_for = |after: &Listing| {
        let disk = sim.read_vdi(&vdi).unwrap();
        let mut t = truth.borrow_mut();
        for k in after.paths.keys() {
            t.entry(k.clone()).or_insert_with(|| disk.clone());
        }
        t.clone()
    };
    let follow = |r: &Path, _l: &Listing| -> Result<(), String> {
        let a = args(r);
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        let o = cbtfs(&a);
        if !o.status.success() {
            return Err(format!(
                "backup failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        for pin in std::fs::read_dir(r.join("hosts")).map_err(|e| e.to_string())? {
            let pin = pin.unwrap().path();
            // (A crash may leave the empty temporary file of a pin beside it: not read.)
            if pin.extension().is_none_or(|e| e != "pin") {
                continue;
            }
            let b = std::fs::read(&pin).unwrap();
            if b.len() < 10 || !b.ends_with(b"\n") {
                return Err(format!("a pin file holds {b:?}"));
            }
        }
        let o = cbtfs(&["export", s(r), &format!("{vdi}@latest"), "-"]);
        if !o.status.success() || o.stdout != sim.read_vdi(&vdi).unwrap() {
            return Err("the next backup does not read back exactly".into());
        }
        if !cbtfs(&["verify", s(r)]).status.success() {
            return Err("verify fails after the next backup".into());
        }
        no_leftovers(r)
    };
    let a = args(&repo);
    crash_states(
        "backup base",
        dir,
        &repo,
        &a,
        &truth_for,
        &follow,
        None,
        total,
    );
    for _ in 0..5 {
        let off = rng.below((2 * BLOCKS * BS - 5000) as u64);
        let bytes: Vec<u8> = (0..5000).map(|_| rng.next() as u8).collect();
        sim.with(|st| st.guest_write(&vdi, off, &bytes)).unwrap();
    }
    crash_states(
        "backup increment",
        dir,
        &repo,
        &a,
        &truth_for,
        &follow,
        None,
        total,
    );
}

/// `cbtfs init`, recorded from the directory that will hold the repository: once it returned,
/// a power cut must leave a repository; before, either none or one that works — and in every
/// state the next step (init again, or a first import) goes on.
///
/// Needs issue #16's defect 14 fixed (the new repository's parent directory is never fsynced,
/// so after `init` returned a power cut can lose the whole repository).
#[test]
fn init_is_durable_once_it_returns() {
    if !can_trace() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(d.path()).unwrap();
    let parent = dir.join("parent");
    std::fs::create_dir(&parent).unwrap();
    let repo = parent.join("repo");
    let mut replay = Replay::load(&parent);
    let calls = record(&dir, &["init".to_string(), s(&repo).to_string()]).unwrap();
    for c in &calls {
        replay.apply(c);
    }
    check_model("init", &parent, &replay);
    let done = replay.snapshot("after init returned".into(), false);
    let data = next_image();
    let img = dir.join("img");
    std::fs::write(&img, &data).unwrap();
    let mut failures = Vec::new();
    let mut seen = BTreeSet::new();
    let mut states = 0;
    for (i, st) in std::iter::once(done).chain(replay.states).enumerate() {
        if !seen.insert(st.digest()) && i > 0 {
            continue;
        }
        states += 1;
        let sdir = tempfile::tempdir_in(&dir).unwrap();
        let r = sdir.path().join("repo");
        st.materialise(sdir.path());
        let is_repo = cbtfs(&["ls", s(&r)]).status.success();
        if i == 0 && !is_repo {
            failures.push(format!("{}: no repository", st.what));
            continue;
        }
        if !is_repo {
            // None yet: init again. It refuses a directory an interrupted init left
            // (`disks/`, a temporary header): that costs the user an `rm -r`, never data, so
            // it is noted, not failed; then the directory is cleared as the user would.
            let o = cbtfs(&["init", s(&r)]);
            if !o.status.success() {
                let m = String::from_utf8_lossy(&o.stderr);
                assert!(
                    m.contains("not empty") && !r.join("cbtfs.repo").exists(),
                    "{}: {m}",
                    st.what
                );
                eprintln!("note: {}: init again refuses the leftovers: {m}", st.what);
                std::fs::remove_dir_all(&r).unwrap();
                ok(&["init", s(&r)]);
            }
        }
        let a = import_args(&r, &img, NEXT_TIME, None);
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        let o = cbtfs(&a);
        let back = cbtfs(&["export", s(&r), &format!("{VDI}@latest"), "-"]);
        if !o.status.success() || back.stdout != data {
            failures.push(format!(
                "{}: the first import fails or reads back wrong: {}",
                st.what,
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    eprintln!(
        "init: {} calls, {} fsyncs, {states} distinct crash states",
        calls.len(),
        replay.fsyncs
    );
    assert!(states >= 3, "too few crash states: the test proved little");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A prune (with its gc) returned; then the power goes while the next import runs. The prune's
/// and gc's deletions were made after their last fsync of the directories concerned, so they
/// become durable only as later puts fsync those directories: a dropped set's manifests must
/// never come back without the point indexes gc deleted (a set that cannot be read, and a gc
/// that refuses to run), nor an old chunk index object without the packs it names.
#[test]
fn a_power_cut_in_the_writer_after_a_prune_keeps_every_point() {
    if !can_trace() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(d.path()).unwrap();
    let repo = dir.join("repo");
    ok(&["init", s(&repo)]);
    let mut rng = TestRng::new(18);
    let mut truth: Truth = HashMap::new();
    let mut data = image(&mut rng);
    // A set dropped whole (its manifests deleted last: no later put into points/ syncs them),
    // and a set kept whole.
    let times = [
        ("2025-10-01T00:00:00Z", true),
        ("2025-10-02T00:00:00Z", false),
        ("2025-11-01T00:00:00Z", true),
        ("2025-11-02T00:00:00Z", false),
        ("2025-11-03T00:00:00Z", false),
    ];
    for (t, base) in times {
        let mut changed: Vec<u64> = (0..4).map(|_| rng.below(BLOCKS as u64)).collect();
        changed.sort();
        changed.dedup();
        for &b in &changed {
            rng.fill(&mut data[b as usize * BS..(b as usize + 1) * BS]);
        }
        import(&repo, &dir, &data, t, (!base).then_some(&changed[..])).unwrap();
        truth.insert((VDI.into(), t.to_string()), data.clone());
    }
    let mut replay = Replay::load(&repo);
    let prune: Vec<String> = ["prune", s(&repo), "--keep-last", "3"]
        .iter()
        .map(|x| x.to_string())
        .collect();
    for c in &record(&dir, &prune).unwrap() {
        replay.apply(c);
    }
    check_model("prune", &repo, &replay);
    let before = listing(&repo).unwrap();
    replay.states.clear();
    let follow_dir = dir.join("follow");
    std::fs::create_dir(&follow_dir).unwrap();
    let calls = record(&dir, &next_import_args(&repo, &before, &follow_dir)).unwrap();
    for c in &calls {
        replay.apply(c);
    }
    check_model("the next import", &repo, &replay);
    let after = listing(&repo).unwrap();
    truth.insert((VDI.into(), NEXT_TIME.into()), next_image());
    let ex = Expect {
        before,
        after,
        truth: &truth,
    };
    // The next writer after the power cut: gc must run (it refuses a set it cannot read).
    let follow = |r: &Path, _: &Listing| -> Result<(), String> {
        let o = cbtfs(&["gc", s(r)]);
        if !o.status.success() {
            return Err(format!("gc: {}", String::from_utf8_lossy(&o.stderr)));
        }
        if !cbtfs(&["verify", s(r)]).status.success() {
            return Err("verify fails after gc".into());
        }
        Ok(())
    };
    let mut t = Tally::default();
    let mut seen = BTreeSet::new();
    let done = replay.snapshot("after the import returned".into(), false);
    for (i, st) in std::iter::once(done).chain(replay.states).enumerate() {
        if !seen.insert(st.digest()) && i > 0 {
            continue;
        }
        let sdir = tempfile::tempdir_in(&dir).unwrap();
        let r = sdir.path().join("repo");
        st.materialise(&r);
        let what = format!("prune returned, then the import: {}", st.what);
        check_state(&r, &ex, i == 0, None, &follow, &mut t, &what);
    }
    eprintln!(
        "import after a prune: {} calls, {} crash states, {} lost commits, {} wrong bytes",
        calls.len(),
        t.states,
        t.lost,
        t.wrong
    );
    report(&t);
    assert!(
        t.states >= 5,
        "too few crash states: the test proved little"
    );
}
