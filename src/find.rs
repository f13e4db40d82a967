//! `cbtfs find`: in which restore points a path exists, with its size and mtime in each, so the
//! admin picks the right day before `cbtfs dump`.
//!
//! The points searched are those `--vm`, `--disk` and `--since` select (all by default), newest
//! first. Each point's filesystems are mounted as `dump` mounts them (userspace drivers, a
//! private temporary directory; see `dump`), searched, and unmounted before the next point:
//! one point is mounted at a time.
//!
//! PATTERN is `VOLUME/PATH` when its first component names a volume of the point (`p1`,
//! `vg0-root`, `disk`), else a path searched in every volume holding a filesystem. Any
//! component may hold shell globs (`*`, `?`, `[a-z]`, `[!0-9]`, `\` escapes one character);
//! as in the shell, a name starting with `.` is matched only by a pattern starting with `.`,
//! and `/` is never matched. Directories on the way follow the guest's symbolic links inside
//! the volume; what matches is reported as it is (a symlink as a symlink, with its target).
//!
//! Every point searched gets at least one row: a row per match (`present`), or one `absent`
//! row when nothing matched, so the days a file was missing show too; a volume that could not
//! be read gets a `not-searched` row with the reason (and `find` then ends with a failure
//! status: its answer is incomplete).

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::dump::{Mounted, RecoveryError, ResolveError, resolve_in};
use crate::naming::Tree;
use crate::repo::Repository;
use crate::timefmt;

/// Matches one pattern may give in one volume of one point: a bound on the work and the
/// output (`*/*/*` over a whole system disk would otherwise list it all).
pub const MAX_MATCHES: usize = 10_000;

#[derive(Debug, Clone, Default)]
pub struct FindRequest {
    pub pattern: String,
    /// VM name (as `cbtfs ls` shows it) or uuid.
    pub vm: Option<String>,
    /// Disk name (as `cbtfs ls` shows it) or VDI uuid.
    pub disk: Option<String>,
    /// Only points taken at or after this time (Unix seconds).
    pub since: Option<i64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Present,
    Absent,
    NotSearched,
}

/// One line of the answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Row {
    /// `VM/DISK/SET/POINT`.
    pub point: String,
    /// The point's time, RFC 3339.
    pub time: String,
    pub status: Status,
    /// The volume the match is in (for `absent`: the volume named by the pattern, if any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The path inside the volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `file`, `directory`, `symlink`, ...
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The file's modification time, RFC 3339 (UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtime: Option<String>,
    /// A symlink's target, as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Why a volume or point was not searched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FindReport {
    /// Newest point first; within a point, by volume and path.
    pub rows: Vec<Row>,
    pub points: usize,
    /// Rows whose volume or point could not be searched: the answer is incomplete.
    pub not_searched: usize,
}

/// A point to search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub name: String,
    pub time: i64,
}

/// `--since`: every time form the other commands take (`timefmt::parse`); a date is that day's
/// start, UTC.
pub fn parse_since(s: &str) -> Result<i64, String> {
    timefmt::parse(s).map_err(|e| e.to_string())
}

/// The points `req` selects, newest first.
pub fn select(tree: &Tree, req: &FindRequest) -> Result<Vec<Selected>, RecoveryError> {
    let vms: Vec<_> = tree
        .vms
        .iter()
        .filter(|v| {
            req.vm
                .as_deref()
                .is_none_or(|w| v.name == w || v.uuid.as_deref() == Some(w))
        })
        .collect();
    if let Some(w) = &req.vm
        && vms.is_empty()
    {
        let names: Vec<&str> = tree.vms.iter().map(|v| v.name.as_str()).collect();
        return Err(RecoveryError::BadPath(format!(
            "no VM {w:?} in this repository; its VMs: {} (name or uuid, as `cbtfs ls` shows)",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    }
    let mut out = Vec::new();
    let mut disks_seen = Vec::new();
    for vm in &vms {
        for d in &vm.disks {
            disks_seen.push(format!("{}/{}", vm.name, d.name));
            if req
                .disk
                .as_deref()
                .is_some_and(|w| d.name != w && d.vdi() != w)
            {
                continue;
            }
            for s in &d.history.sets {
                for p in &s.points {
                    if req.since.is_some_and(|t| p.time < t) {
                        continue;
                    }
                    out.push(Selected {
                        name: tree.path_of(p).unwrap_or_else(|| p.label()),
                        time: p.time,
                    });
                }
            }
        }
    }
    if let Some(w) = &req.disk
        && !vms
            .iter()
            .flat_map(|v| v.disks.iter())
            .any(|d| d.name == *w || d.vdi() == w)
    {
        return Err(RecoveryError::BadPath(format!(
            "no disk {w:?}{}; disks: {} (name or VDI uuid, as `cbtfs ls` shows)",
            req.vm
                .as_deref()
                .map(|v| format!(" under VM {v:?}"))
                .unwrap_or_default(),
            if disks_seen.is_empty() {
                "none".to_string()
            } else {
                disks_seen.join(", ")
            }
        )));
    }
    out.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.name.cmp(&b.name)));
    Ok(out)
}

/// Search the points `req` selects. `progress(i, n, point)` is called before each point.
pub fn find(
    repo: &Repository,
    req: &FindRequest,
    progress: &dyn Fn(usize, usize, &str),
) -> Result<FindReport, RecoveryError> {
    let pattern = parse_pattern(&req.pattern)?;
    let tree = Tree::build(
        repo.catalog()
            .map_err(|e| RecoveryError::Browse(anyhow::Error::new(e)))?,
    );
    let points = select(&tree, req)?;
    // Said once, not on every point's row.
    if !points.is_empty() && !crate::dump::is_root() {
        crate::dump::fuse_usable()?;
    }
    let mut report = FindReport {
        points: points.len(),
        ..FindReport::default()
    };
    for (i, p) in points.iter().enumerate() {
        if crate::diff::interrupted() {
            return Err(RecoveryError::Interrupted);
        }
        progress(i, points.len(), &p.name);
        let rows = search_point(repo, p, &pattern)?;
        report.not_searched += rows
            .iter()
            .filter(|r| r.status == Status::NotSearched)
            .count();
        report.rows.extend(rows);
    }
    Ok(report)
}

fn parse_pattern(pattern: &str) -> Result<Vec<OsString>, RecoveryError> {
    let parts: Vec<OsString> = pattern
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(OsString::from)
        .collect();
    if parts.is_empty() {
        return Err(RecoveryError::BadPath(format!(
            "{pattern:?} names nothing: give VOLUME/PATH (p1/etc/hosts) or a path searched in every volume (etc/host*)"
        )));
    }
    if parts.iter().any(|c| c == "..") {
        return Err(RecoveryError::BadPath(format!(
            "{pattern:?}: `..` is not allowed; name the path from the volume's root"
        )));
    }
    Ok(parts)
}

fn search_point(
    repo: &Repository,
    p: &Selected,
    pattern: &[OsString],
) -> Result<Vec<Row>, RecoveryError> {
    let row = |status| Row {
        point: p.name.clone(),
        time: timefmt::rfc3339(p.time),
        status,
        volume: None,
        path: None,
        kind: None,
        size: None,
        mtime: None,
        target: None,
        reason: None,
    };
    let first = pattern.first().map(|c| c.to_string_lossy().into_owned());
    let mut m = match Mounted::open(repo, &p.name, first.as_deref()) {
        Ok(m) => m,
        Err(RecoveryError::Interrupted) => return Err(RecoveryError::Interrupted),
        Err(e) => {
            return Ok(vec![Row {
                reason: Some(e.to_string()),
                ..row(Status::NotSearched)
            }]);
        }
    };
    // The pattern's first component names a volume, or the path is searched in every one.
    let named = first
        .as_deref()
        .filter(|f| m.volumes.iter().any(|v| v.name == *f));
    let (volumes, rel): (Vec<_>, &[OsString]) = match named {
        Some(n) => (
            m.volumes.iter().filter(|v| v.name == n).collect(),
            pattern.get(1..).unwrap_or(&[]),
        ),
        None => (
            m.volumes.iter().filter(|v| v.holds_files()).collect(),
            pattern,
        ),
    };
    let mut rows = Vec::new();
    let mut hits = 0usize;
    for v in volumes {
        let root = match v.root(&m.point) {
            Ok(r) => r,
            Err(e) => {
                rows.push(Row {
                    volume: Some(v.name.clone()),
                    reason: Some(e.to_string()),
                    ..row(Status::NotSearched)
                });
                continue;
            }
        };
        match search_volume(root, rel) {
            Ok(found) => {
                for (path, md, target) in found {
                    hits += 1;
                    rows.push(Row {
                        volume: Some(v.name.clone()),
                        path: Some(path),
                        kind: Some(crate::dump::kind_of(&md.file_type())),
                        size: Some(md.len()),
                        mtime: Some(timefmt::rfc3339(md.mtime())),
                        target,
                        ..row(Status::Present)
                    });
                }
            }
            Err(reason) => rows.push(Row {
                volume: Some(v.name.clone()),
                reason: Some(reason),
                ..row(Status::NotSearched)
            }),
        }
    }
    if hits == 0 && rows.iter().all(|r| r.status != Status::NotSearched) {
        rows.push(Row {
            volume: named.map(String::from),
            path: Some(
                rel.iter()
                    .map(|c| c.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/"),
            ),
            ..row(Status::Absent)
        });
    }
    m.end()?;
    Ok(rows)
}

type Found = (String, std::fs::Metadata, Option<String>);

/// The entries of the guest filesystem at `root` that `rel` (components, globs allowed)
/// matches: (path, metadata without following a final link, link target), sorted by path.
fn search_volume(root: &Path, rel: &[OsString]) -> Result<Vec<Found>, String> {
    let too_many =
        || format!("the pattern matches more than {MAX_MATCHES} entries here; make it narrower");
    let mut candidates: Vec<Vec<OsString>> = vec![Vec::new()];
    for comp in rel {
        let mut next = Vec::new();
        let bytes = comp.as_bytes();
        for c in &candidates {
            if crate::diff::interrupted() {
                return Err("interrupted".into());
            }
            if !has_glob(bytes) {
                let mut n = c.clone();
                n.push(comp.clone());
                next.push(n);
                continue;
            }
            let dir = match resolve_in(root, c, true) {
                Ok(d) if d.meta.is_dir() => d,
                Ok(_) | Err(ResolveError::NotFound(_) | ResolveError::NotDir(_)) => continue,
                Err(ResolveError::Loop) => continue,
                Err(ResolveError::Io(e)) => {
                    return Err(format!("reading {}: {e}", shown(c)));
                }
            };
            let rd =
                std::fs::read_dir(&dir.host).map_err(|e| format!("reading {}: {e}", shown(c)))?;
            let mut names = Vec::new();
            for e in rd {
                let e = e.map_err(|e| format!("reading {}: {e}", shown(c)))?;
                let name = e.file_name();
                if glob_match(bytes, name.as_bytes()) {
                    names.push(name);
                    if names.len() > MAX_MATCHES {
                        return Err(too_many());
                    }
                }
            }
            names.sort();
            for name in names {
                let mut n = c.clone();
                n.push(name);
                next.push(n);
            }
            if next.len() > MAX_MATCHES {
                return Err(too_many());
            }
        }
        candidates = next;
    }
    let mut out = Vec::new();
    for c in candidates {
        match resolve_in(root, &c, false) {
            Ok(r) => {
                let target = if r.meta.file_type().is_symlink() {
                    std::fs::read_link(&r.host)
                        .ok()
                        .map(|t| t.to_string_lossy().into_owned())
                } else {
                    None
                };
                out.push((shown(&c), r.meta, target));
            }
            Err(ResolveError::NotFound(_) | ResolveError::NotDir(_) | ResolveError::Loop) => {}
            Err(ResolveError::Io(e)) => return Err(format!("reading {}: {e}", shown(&c))),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

fn shown(parts: &[OsString]) -> String {
    if parts.is_empty() {
        return "/".into();
    }
    parts
        .iter()
        .map(|c| c.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether a path component holds glob characters.
pub fn has_glob(c: &[u8]) -> bool {
    c.iter().any(|b| matches!(b, b'*' | b'?' | b'[' | b'\\'))
}

/// A bracket expression starting at `pat[start] == '['`: whether `c` matches it and where the
/// pattern goes on. `None` if it is not closed (then `[` is an ordinary character).
fn class(pat: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start.checked_add(1)?;
    let negate = matches!(pat.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let b = *pat.get(i)?;
        if b == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        let lo = if b == b'\\' {
            i += 1;
            *pat.get(i)?
        } else {
            b
        };
        // A range `a-z` (a `-` before the closing `]` is an ordinary character).
        if pat.get(i + 1) == Some(&b'-') && pat.get(i + 2).is_some_and(|&x| x != b']') {
            let hi = *pat.get(i + 2)?;
            if lo <= c && c <= hi {
                matched = true;
            }
            i += 3;
        } else {
            if lo == c {
                matched = true;
            }
            i += 1;
        }
    }
}

/// Shell-style matching of one name: `*`, `?`, `[...]`, `\x`. A leading `.` in `name` must be
/// matched by a literal `.` (as the shell does). Time is at most len(pat) × len(name).
pub fn glob_match(pat: &[u8], name: &[u8]) -> bool {
    if name.first() == Some(&b'.') && !(pat.first() == Some(&b'.') || pat.starts_with(b"\\.")) {
        return false;
    }
    let (mut p, mut n) = (0usize, 0usize);
    // Where the last `*` was, and the name position it is currently taken to end at.
    let mut star: Option<(usize, usize)> = None;
    while let Some(&c) = name.get(n) {
        let step = match pat.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match class(pat, p, c) {
                Some((true, next)) => Some(next),
                Some((false, _)) => None,
                None => (c == b'[').then_some(p + 1),
            },
            Some(b'\\') => match pat.get(p + 1) {
                Some(&e) => (e == c).then_some(p + 2),
                None => (c == b'\\').then_some(p + 1),
            },
            Some(&l) => (l == c).then_some(p + 1),
            None => None,
        };
        match step {
            Some(next) => {
                p = next;
                n += 1;
            }
            None => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    while pat.get(p) == Some(&b'*') {
        p += 1;
    }
    p == pat.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str, n: &str) -> bool {
        glob_match(p.as_bytes(), n.as_bytes())
    }

    #[test]
    fn globs_match_as_the_shell_does() {
        assert!(g("host*", "hosts"));
        assert!(g("host*", "hostname"));
        assert!(g("host*", "host"));
        assert!(!g("host*", "ghost"));
        assert!(g("*.conf", "nginx.conf"));
        assert!(!g("*.conf", "nginx.conf.bak"));
        assert!(g("*.conf*", "nginx.conf.bak"));
        assert!(g("a?c", "abc"));
        assert!(!g("a?c", "ac"));
        assert!(g("[ab]x", "bx"));
        assert!(!g("[ab]x", "cx"));
        assert!(g("[!ab]x", "cx"));
        assert!(g("[^ab]x", "cx"));
        assert!(g("log[0-9]", "log7"));
        assert!(!g("log[0-9]", "logx"));
        assert!(g("[]]", "]"));
        assert!(g("[a-]", "-"));
        assert!(g("x[", "x["), "an unclosed [ is literal");
        assert!(g("\\*", "*"));
        assert!(!g("\\*", "a"));
        assert!(g("*", "anything"));
        assert!(
            !g("*", ".bashrc"),
            "a leading dot is matched only literally"
        );
        assert!(g(".*", ".bashrc"));
        assert!(!g("?bashrc", ".bashrc"));
        assert!(g("*a*b*c", "xxaxxbxxc"));
        assert!(!g("*a*b*c", "xxaxxbxx"));
        assert!(g("", "") && !g("", "a") && !g("a", ""));
        // Worst cases stay quadratic at most.
        let name = "a".repeat(255);
        assert!(!g(&format!("{}b", "*a".repeat(100)), &name));
    }

    #[test]
    fn since_takes_dates() {
        assert_eq!(
            parse_since("2026-01-02").unwrap(),
            timefmt::parse("2026-01-02T00:00:00Z").unwrap()
        );
        assert_eq!(
            parse_since("2026-01-02T03:00:00Z").unwrap(),
            timefmt::parse("20260102T030000Z").unwrap()
        );
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("2026-1-2").is_err());
    }

    #[test]
    fn patterns_search_the_guest_tree() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("etc/nginx/conf.d")).unwrap();
        std::fs::write(r.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
        std::fs::write(r.join("etc/hostname"), b"web01\n").unwrap();
        std::fs::write(r.join("etc/.hostsecret"), b"x").unwrap();
        std::fs::write(r.join("etc/nginx/nginx.conf"), b"events {}\n").unwrap();
        std::fs::write(r.join("etc/nginx/conf.d/site.conf"), b"server {}\n").unwrap();
        std::os::unix::fs::symlink("/etc/nginx", r.join("ngx")).unwrap();
        let p = |s: &str| parse_pattern(s).unwrap();
        let names = |v: Vec<Found>| v.into_iter().map(|f| f.0).collect::<Vec<_>>();
        assert_eq!(
            names(search_volume(r, &p("etc/host*")).unwrap()),
            ["etc/hostname", "etc/hosts"]
        );
        assert_eq!(
            names(search_volume(r, &p("etc/nginx/*/*.conf")).unwrap()),
            ["etc/nginx/conf.d/site.conf"]
        );
        // Through the guest's absolute link, inside the volume.
        let f = search_volume(r, &p("ngx/nginx.conf")).unwrap();
        assert_eq!(names(f.clone()), ["ngx/nginx.conf"]);
        assert_eq!(f[0].1.len(), 10);
        let f = search_volume(r, &p("ngx")).unwrap();
        assert_eq!(f[0].2.as_deref(), Some("/etc/nginx"));
        assert!(search_volume(r, &p("etc/nothing*")).unwrap().is_empty());
        assert!(search_volume(r, &p("etc/hosts/x")).unwrap().is_empty());
        assert!(parse_pattern("a/../b").is_err());
        assert!(parse_pattern("//").is_err());
    }
}
