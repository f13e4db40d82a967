//! The names users type: `VM/DISK/SET/POINT`, `VDI_UUID@latest`, `VDI_UUID@TIME`.
//!
//! Names are safe unquoted in shells and in `qemu-img` (no spaces, no `:`, no `/`, never starting
//! with `-` or being `.`/`..`). VM and disk names come from the host, sanitised; when two objects
//! would get the same name, each gets a short uuid suffix. Sets and points are named by time in
//! ISO 8601 basic form, UTC. The same tree is what the mount shows.
//!
//! # VM folders
//!
//! A disk lives under the VM its newest point names: disks are grouped by VM uuid; a disk
//! whose VM has a name but no uuid (`import --vm-name web01` without `--vm-uuid`) is grouped
//! with the other such disks by that (sanitised) name; only a disk with neither lives under
//! `no-vm/`. When folder names collide, a VM with a uuid gets its uuid's first 8 characters
//! as a suffix and a VM known only by name gets `-no-uuid`. `by-uuid` and `no-vm` are never
//! a VM's folder name.
//!
//! # The canonical name
//!
//! `VM/DISK/SET/POINT` ([`Tree::path_of`]) is how every command prints a point; where a
//! script may want the stable form too, `VDI_UUID@TIME` (`PointManifest::label`) follows in
//! parentheses ([`Tree::display`]).
//!
//! # Every form resolves ([`Tree::resolve`])
//!
//! * `VM/DISK/SET/POINT`, `VM/DISK/SET/latest`, `VM/DISK/latest` (as the mount shows them);
//! * `by-uuid/VDI_UUID/...` the same under the mount's stable folder;
//! * `VDI_UUID@latest`, `VDI_UUID@TIME`, `VM/DISK@latest`, `VM/DISK@TIME`;
//! * each with or without a trailing `.raw` or `/`, and as an absolute path into a mounted
//!   cbtfs (`/mnt/backups/web01/root/latest.raw`).
//!
//! `@TIME` picks the newest point of the disk at or before the end of the time written
//! (`timefmt`'s forms; a date is its whole UTC day, so `@2026-01-02` is the last point taken
//! on 2 January, a time to the minute its whole minute); points of every set of the disk count.

use std::collections::BTreeMap;

use crate::repo::{DiskHistory, PointManifest, SetHistory};
use crate::timefmt;

/// The mount's folder of disks by VDI uuid, for scripts.
pub const BY_UUID: &str = "by-uuid";

/// Name of the folder for disks whose VM is unknown (imported images).
pub const NO_VM: &str = "no-vm";

/// Suffix of a VM folder known only by name whose name another VM folder has too.
const NO_UUID: &str = "no-uuid";

/// At most this many names are listed in an error ("it has: ...").
const LIST_MAX: usize = 8;

/// Make a host-given name safe for file names, shells and qemu-img.
pub fn sanitize(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let ok = c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+');
        if ok {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let mut out = out.trim_matches('_').to_string();
    out.truncate(64);
    if out.is_empty() || out == "." || out == ".." {
        out = "unnamed".into();
    }
    if out.starts_with('-') || out.starts_with('.') {
        out.insert(0, '_');
    }
    out
}

fn short(uuid: &str) -> &str {
    uuid.get(..8).unwrap_or(uuid)
}

#[derive(Debug, Clone)]
pub struct VmNode {
    pub name: String,
    pub uuid: Option<String>,
    pub disks: Vec<DiskNode>,
}

#[derive(Debug, Clone)]
pub struct DiskNode {
    pub name: String,
    pub history: DiskHistory,
}

impl DiskNode {
    pub fn vdi(&self) -> &str {
        &self.history.vdi
    }
}

/// Point `seq` of a set is named by its time.
pub fn point_name(m: &PointManifest) -> String {
    timefmt::basic(m.time)
}

/// The whole naming tree of a repository.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    pub vms: Vec<VmNode>,
}

/// What groups disks into a VM folder.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum VmKey {
    /// The VM's uuid (its name is the newest disk's).
    Uuid(String),
    /// No uuid, only a name: the sanitised name.
    Name(String),
    /// Neither: `no-vm/`.
    Unknown,
}

impl VmKey {
    /// The suffix that tells this VM's folder from another with the same name.
    fn suffix(&self) -> &str {
        match self {
            VmKey::Uuid(u) => short(u),
            VmKey::Name(_) | VmKey::Unknown => NO_UUID,
        }
    }
}

/// Give each key a sanitized name; keys whose names collide get a short-uuid suffix.
fn unique_names(items: &[(String, String)]) -> Vec<String> {
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for (_, n) in items {
        *count.entry(n.clone()).or_default() += 1;
    }
    items
        .iter()
        .map(|(id, n)| {
            if count.get(n).copied().unwrap_or(0) > 1 {
                format!("{n}-{}", short(id))
            } else {
                n.clone()
            }
        })
        .collect()
}

/// `a, b, c` for at most `LIST_MAX` names, then how many more.
fn list(names: &[String]) -> String {
    let mut out = names
        .iter()
        .take(LIST_MAX)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > LIST_MAX {
        out.push_str(&format!(" and {} more", names.len() - LIST_MAX));
    }
    if out.is_empty() {
        out.push_str("nothing");
    }
    out
}

/// At most `LIST_MAX` of the sorted `names`, those around where `wanted` would sort.
fn nearby(names: &[String], wanted: &str) -> String {
    if names.len() <= LIST_MAX {
        return list(names);
    }
    let at = names.partition_point(|n| n.as_str() < wanted);
    let from = at.saturating_sub(LIST_MAX / 2).min(names.len() - LIST_MAX);
    let shown = names.get(from..from + LIST_MAX).unwrap_or_default();
    format!(
        "{}{}{} (of {})",
        if from > 0 { "… " } else { "" },
        shown.join(", "),
        if from + LIST_MAX < names.len() {
            " …"
        } else {
            ""
        },
        names.len()
    )
}

impl Tree {
    pub fn build(disks: Vec<DiskHistory>) -> Tree {
        // Group disks by the VM their newest point names.
        let mut by_vm: BTreeMap<VmKey, (Option<String>, Vec<DiskHistory>)> = BTreeMap::new();
        for d in disks {
            let Some(newest) = d.newest().cloned() else {
                continue;
            };
            let key = match (&newest.vm_uuid, &newest.vm_name) {
                (Some(u), _) => VmKey::Uuid(u.clone()),
                (None, Some(n)) => VmKey::Name(sanitize(n)),
                (None, None) => VmKey::Unknown,
            };
            let e = by_vm
                .entry(key)
                .or_insert((newest.vm_name.clone(), Vec::new()));
            e.1.push(d);
        }
        let wanted: Vec<String> = by_vm
            .iter()
            .map(|(key, (name, _))| match key {
                VmKey::Uuid(_) => sanitize(name.as_deref().unwrap_or("unnamed-vm")),
                VmKey::Name(n) => n.clone(),
                VmKey::Unknown => NO_VM.to_string(),
            })
            .collect();
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for n in &wanted {
            *count.entry(n.as_str()).or_default() += 1;
        }
        let vm_names: Vec<String> = by_vm
            .keys()
            .zip(&wanted)
            .map(|(key, n)| {
                // The mount's root holds `by-uuid/` and `no-vm/`: no VM may take those names.
                if *key == VmKey::Unknown {
                    return n.clone();
                }
                if n == BY_UUID || n == NO_VM || count.get(n.as_str()).copied().unwrap_or(0) > 1 {
                    format!("{n}-{}", key.suffix())
                } else {
                    n.clone()
                }
            })
            .collect();
        let mut vms = Vec::new();
        for ((key, (_, disks)), name) in by_vm.into_iter().zip(vm_names) {
            let items: Vec<(String, String)> = disks
                .iter()
                .map(|d| {
                    let n = d.newest().map(|p| p.disk_name.as_str()).unwrap_or("disk");
                    (d.vdi.clone(), sanitize(n))
                })
                .collect();
            let names = unique_names(&items);
            let mut nodes: Vec<DiskNode> = disks
                .into_iter()
                .zip(names)
                .map(|(history, name)| DiskNode { name, history })
                .collect();
            nodes.sort_by(|a, b| a.name.cmp(&b.name));
            vms.push(VmNode {
                name,
                uuid: match key {
                    VmKey::Uuid(u) => Some(u),
                    VmKey::Name(_) | VmKey::Unknown => None,
                },
                disks: nodes,
            });
        }
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Tree { vms }
    }

    pub fn disk_by_uuid(&self, vdi: &str) -> Option<(&VmNode, &DiskNode)> {
        self.vms
            .iter()
            .flat_map(|v| v.disks.iter().map(move |d| (v, d)))
            .find(|(_, d)| d.vdi() == vdi)
    }

    /// `VM/DISK` of a disk, as the mount and `ls` show it.
    pub fn disk_path(&self, vdi: &str) -> Option<String> {
        let (vm, disk) = self.disk_by_uuid(vdi)?;
        Some(format!("{}/{}", vm.name, disk.name))
    }

    /// The canonical name of a point, as the mount shows it: `VM/DISK/SET/POINT`. The one
    /// place a point's name is formed.
    pub fn path_of(&self, m: &PointManifest) -> Option<String> {
        let disk = self.disk_path(&m.vdi)?;
        Some(format!("{disk}/{}/{}", m.set, point_name(m)))
    }

    /// The canonical name of a point, or its `VDI@TIME` label when this tree does not hold
    /// its disk.
    pub fn name_of(&self, m: &PointManifest) -> String {
        self.path_of(m).unwrap_or_else(|| m.label())
    }

    /// `VM/DISK/SET/POINT (VDI_UUID@TIME)`: the canonical name with the stable form scripts
    /// can use, for lines a person and a script both read.
    pub fn display(&self, m: &PointManifest) -> String {
        with_label(self.path_of(m).as_deref(), &m.label())
    }

    /// The point a `VDI@TIME` label names (an exact time), if this tree holds it.
    pub fn find_label(&self, label: &str) -> Option<&PointManifest> {
        let (vdi, when) = label.split_once('@')?;
        let t = timefmt::parse(when).ok()?;
        let (_, d) = self.disk_by_uuid(vdi)?;
        d.history
            .sets
            .iter()
            .flat_map(|s| s.points.iter())
            .find(|p| p.time == t)
    }

    /// Resolve a user's point name to its set and position; every form in the module's
    /// documentation is accepted.
    pub fn resolve(&self, spec: &str) -> Result<(SetHistory, u32), String> {
        let roots = if spec.trim().starts_with('/') {
            cbtfs_mount_roots()
        } else {
            Vec::new()
        };
        self.resolve_with_mounts(spec, &roots)
    }

    /// [`Tree::resolve`], with the mount points of cbtfs mounts given (an absolute path inside
    /// one of them is taken relative to it).
    pub fn resolve_with_mounts(
        &self,
        spec: &str,
        mounts: &[String],
    ) -> Result<(SetHistory, u32), String> {
        let mut spec = spec.trim();
        if spec.starts_with('/') {
            spec = strip_mount_root(spec, mounts).ok_or_else(|| {
                "that path is outside any mounted cbtfs repository; name the point as `cbtfs ls` shows it (VM/DISK/SET/POINT) or mount the repository and give a path inside it".to_string()
            })?;
        }
        let spec = spec.trim_end_matches('/');
        let spec = spec.strip_suffix(".raw").unwrap_or(spec);
        if let Some((disk, when)) = spec.rsplit_once('@')
            && !when.contains('/')
        {
            let d = self.find_disk(disk)?;
            return find_in_disk(self, &d.history, when);
        }
        let parts: Vec<&str> = spec.split('/').collect();
        let (disk, rest): (&DiskNode, &[&str]) = match parts.as_slice() {
            [BY_UUID, vdi, rest @ ..] => (self.by_uuid(vdi)?, rest),
            [vm, disk, rest @ ..] => (self.by_path(vm, disk)?, rest),
            [one] if crate::repo::valid_uuid(one) => {
                return Err(
                    "that VDI uuid is a disk, not a point: add @latest, @TIME (like @2026-01-02) or give VM/DISK/SET/POINT"
                        .to_string(),
                );
            }
            _ => return Err(format!("it names no point: {FORMS_HELP}")),
        };
        let here = self
            .disk_path(disk.vdi())
            .unwrap_or_else(|| disk.vdi().to_string());
        match rest {
            ["latest"] => find_in_disk(self, &disk.history, "latest"),
            [] => Err(format!(
                "{here} is a disk, not a point: add /latest, @TIME or /SET/POINT; its sets: {}",
                list(&set_names(&disk.history))
            )),
            [set, rest @ ..] => {
                let Some(s) = disk.history.sets.iter().find(|s| s.id == *set) else {
                    return Err(format!(
                        "disk {here} has no set {set:?}; its sets: {}",
                        nearby(&set_names(&disk.history), set)
                    ));
                };
                match rest {
                    [] => Err(format!(
                        "{here}/{set} is a set, not a point: add /latest or /POINT; its points: {}",
                        list(&point_names(s))
                    )),
                    ["latest"] => match s.points.len() {
                        0 => Err(format!(
                            "set {here}/{set} has no readable point{}",
                            damage_note(&disk.history)
                        )),
                        n => Ok((s.clone(), n as u32 - 1)),
                    },
                    [point] => match s.points.iter().find(|p| point_name(p) == *point) {
                        Some(p) => Ok((s.clone(), p.seq)),
                        None => Err(format!(
                            "set {here}/{set} has no readable point {point:?}; its points: {}{}",
                            nearby(&point_names(s), point),
                            damage_note(&disk.history)
                        )),
                    },
                    _ => Err(format!("it names no point: {FORMS_HELP}")),
                }
            }
        }
    }

    /// The disk `by-uuid/VDI`.
    fn by_uuid(&self, vdi: &str) -> Result<&DiskNode, String> {
        match self.disk_by_uuid(vdi) {
            Some((_, d)) => Ok(d),
            None => Err(format!(
                "no disk with VDI uuid {vdi} in this repository; it has: {}",
                list(
                    &self
                        .vms
                        .iter()
                        .flat_map(|v| v.disks.iter().map(move |d| format!(
                            "{} ({}/{})",
                            d.vdi(),
                            v.name,
                            d.name
                        )))
                        .collect::<Vec<_>>()
                )
            )),
        }
    }

    /// The disk `VM/DISK`.
    fn by_path(&self, vm: &str, disk: &str) -> Result<&DiskNode, String> {
        let Some(v) = self.vms.iter().find(|v| v.name == vm) else {
            let names: Vec<String> = self.vms.iter().map(|v| v.name.clone()).collect();
            // A VM's name as the host spells it may differ from its folder's.
            let hint = self
                .vms
                .iter()
                .find(|v| v.name.starts_with(&sanitize(vm)) && v.name != vm)
                .map(|v| format!(" (did you mean {}?)", v.name))
                .unwrap_or_default();
            return Err(format!(
                "no VM folder {vm:?} in this repository{hint}; it has: {}",
                nearby(&names, vm)
            ));
        };
        match v.disks.iter().find(|d| d.name == disk) {
            Some(d) => Ok(d),
            None => Err(format!(
                "no disk {disk:?} under VM {:?}; it has: {}",
                v.name,
                list(&v.disks.iter().map(|d| d.name.clone()).collect::<Vec<_>>())
            )),
        }
    }

    /// The disk left of an `@`: a VDI uuid, `VM/DISK` or `by-uuid/VDI`.
    fn find_disk(&self, disk: &str) -> Result<&DiskNode, String> {
        match disk.split('/').collect::<Vec<_>>().as_slice() {
            [vdi] if crate::repo::valid_uuid(vdi) => self.by_uuid(vdi),
            [BY_UUID, vdi] => self.by_uuid(vdi),
            [vm, d] => self.by_path(vm, d),
            _ => Err(format!(
                "{disk:?} before the @ names no disk: use a VDI uuid or VM/DISK (as `cbtfs ls` shows it), as in VDI_UUID@latest or web01/root@2026-01-02"
            )),
        }
    }
}

/// `VM/DISK/SET/POINT (VDI@TIME)`: a canonical name and its label; the label alone when the
/// canonical name is not known.
pub fn with_label(path: Option<&str>, label: &str) -> String {
    match path {
        Some(p) if p != label => format!("{p} ({label})"),
        _ => label.to_string(),
    }
}

/// How to name a point, for errors.
const FORMS_HELP: &str = "use VM/DISK/SET/POINT or VM/DISK/latest (as `cbtfs ls` and the mount show them), VDI_UUID@latest, or VDI_UUID@TIME or VM/DISK@TIME (TIME like 2026-01-02 or 2026-01-02 02:00, UTC: the newest point at or before it)";

fn set_names(d: &DiskHistory) -> Vec<String> {
    d.sets.iter().map(|s| s.id.clone()).collect()
}

fn point_names(s: &SetHistory) -> Vec<String> {
    s.points.iter().map(point_name).collect()
}

/// `latest`, or the newest point at or before the end of a written time, in any set.
fn find_in_disk(tree: &Tree, d: &DiskHistory, when: &str) -> Result<(SetHistory, u32), String> {
    let here = tree.disk_path(&d.vdi).unwrap_or_else(|| d.vdi.clone());
    let points = || {
        d.sets
            .iter()
            .flat_map(|s| s.points.iter().map(move |p| (s, p)))
    };
    if when == "latest" {
        return d
            .sets
            .iter()
            .rev()
            .find(|s| !s.points.is_empty())
            .map(|s| (s.clone(), s.points.len() as u32 - 1))
            .ok_or_else(|| {
                format!(
                    "disk {here} ({}) has no readable point{}",
                    d.vdi,
                    damage_note(d)
                )
            });
    }
    let t = timefmt::parse_not_after(when)
        .map_err(|e| format!("after the @ comes `latest` or a time: {e}"))?;
    // Ties (the same second in two sets) go to the newer set.
    let found = points()
        .filter(|(_, p)| p.time <= t)
        .max_by_key(|(s, p)| (p.time, s.id.clone(), p.seq));
    match found {
        Some((s, p)) => match hidden_by_damage(d, p.time, t) {
            // A damaged point may be the one meant: never answer with an older one silently.
            Some(set) => Err(format!(
                "the newest readable point of disk {here} at or before {} (UTC) is {}, but set {set} has damaged points after {} that may be the one meant{}; name {} exactly to use it",
                timefmt::rfc3339(t),
                tree.name_of(p),
                timefmt::rfc3339(p.time),
                damage_note(d),
                tree.name_of(p),
            )),
            None => Ok((s.clone(), p.seq)),
        },
        None => {
            let oldest = points().min_by_key(|(_, p)| p.time);
            Err(match oldest {
                Some((_, p)) => format!(
                    "disk {here} has no point at or before {} (UTC); its oldest is {} taken {}{}",
                    timefmt::rfc3339(t),
                    tree.name_of(p),
                    timefmt::rfc3339(p.time),
                    damage_note(d)
                ),
                None => format!("disk {here} has no readable point{}", damage_note(d)),
            })
        }
    }
}

/// A set whose unreadable points (those `SetHistory::problems` cuts off) may lie after
/// `chosen` and at or before `t`: they come after its last readable point (or, with none, after
/// its base's time, which names the set).
fn hidden_by_damage(d: &DiskHistory, chosen: i64, t: i64) -> Option<&str> {
    d.sets
        .iter()
        .filter(|s| !s.problems.is_empty())
        .find(|s| {
            let after = match s.points.last() {
                Some(p) => Some(p.time),
                None => {
                    s.id.split('-')
                        .next()
                        .and_then(|b| timefmt::parse(b).ok())
                        .map(|base| base - 1)
                }
            };
            after.is_some_and(|a| a >= chosen && a < t)
        })
        .map(|s| s.id.as_str())
}

/// A hint when a name may be missing because its manifest is damaged.
fn damage_note(d: &DiskHistory) -> String {
    match d.sets.iter().find_map(|s| s.problems.first()) {
        Some(p) => format!(
            " (some points of this disk are damaged, e.g. {}: run `cbtfs verify`)",
            p.location
        ),
        None => String::new(),
    }
}

/// `path` relative to the cbtfs mount (one of `mounts`) it lies in, the deepest one.
fn strip_mount_root<'a>(path: &'a str, mounts: &[String]) -> Option<&'a str> {
    mounts
        .iter()
        .filter_map(|m| {
            let m = m.trim_end_matches('/');
            let rest = path.strip_prefix(m)?.strip_prefix('/')?;
            Some((m.len(), rest.trim_start_matches('/')))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, rest)| rest)
}

/// The mount points of the cbtfs mounts this process can see; none when /proc/self/mountinfo
/// cannot be read.
fn cbtfs_mount_roots() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| {
            parse_mountinfo(&t, |source| {
                std::path::Path::new(source).join("cbtfs.repo").is_file()
            })
        })
        .unwrap_or_default()
}

/// The mount points of a mountinfo text's cbtfs mounts: FUSE mounts (`fuse`, `fuse.cbtfs`)
/// whose source (the mount's fsname, the repository's path) `is_repo` accepts.
fn parse_mountinfo(text: &str, is_repo: impl Fn(&str) -> bool) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let fstype = *fields.get(dash + 1)?;
            let source = unescape_octal(fields.get(dash + 2)?);
            if !(fstype == "fuse" || fstype == "fuse.cbtfs") || !is_repo(&source) {
                return None;
            }
            Some(unescape_octal(fields.get(4)?))
        })
        .collect()
}

/// mountinfo's `\040`-style escapes.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let esc = b
            .get(i + 1..i + 4)
            .filter(|d| b.get(i) == Some(&b'\\') && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match esc {
            Some(d) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(b.get(i).copied().unwrap_or(b'?'));
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "11111111-1111-4111-8111-111111111111";
    const V2: &str = "22222222-2222-4222-8222-222222222222";
    const V3: &str = "33333333-3333-4333-8333-333333333333";
    const V4: &str = "44444444-4444-4444-8444-444444444444";
    const VM: &str = "aaaaaaaa-0000-4000-8000-000000000000";
    /// 2026-01-01T02:00:00Z, and one day.
    const JAN1: i64 = 1_767_232_800;
    const DAY: i64 = 86_400;

    fn manifest(
        vdi: &str,
        disk: &str,
        vm: (Option<&str>, Option<&str>),
        set: &str,
        seq: u32,
        time: i64,
    ) -> PointManifest {
        PointManifest {
            format: "cbtfs-point".into(),
            version: 2,
            id: format!("{:032x}", (time as u64) << 8 | u64::from(seq)),
            generation: 1,
            parent: None,
            n: seq,
            stats: Default::default(),
            vdi: vdi.into(),
            disk_name: disk.into(),
            vm_uuid: vm.0.map(str::to_string),
            vm_name: vm.1.map(str::to_string),
            set: set.into(),
            seq,
            time,
            virtual_size: 1 << 20,
            changed_blocks: 0,
            data_blocks: 0,
            index: crate::repo::ObjRef {
                key: format!("pindex/{:032x}", time),
                len: 0,
            },
            source: "test".into(),
            snapshot: None,
            vm_metadata: None,
            vdi_type: None,
            vm_run: None,
            copied_from: None,
        }
    }

    /// A disk with sets of points at the given times (each set named by its first time).
    fn disk(
        vdi: &str,
        name: &str,
        vm: (Option<&str>, Option<&str>),
        sets: &[&[i64]],
    ) -> DiskHistory {
        DiskHistory {
            vdi: vdi.into(),
            sets: sets
                .iter()
                .map(|times| {
                    let id = timefmt::basic(times[0]);
                    SetHistory {
                        vdi: vdi.into(),
                        id: id.clone(),
                        points: times
                            .iter()
                            .enumerate()
                            .map(|(k, t)| manifest(vdi, name, vm, &id, k as u32, *t))
                            .collect(),
                        problems: Vec::new(),
                    }
                })
                .collect(),
        }
    }

    /// web01 (name only): root with two sets (Jan 1, 2, 3 at 02:00; Jan 5 at 02:00 and 14:30),
    /// data; db (with a uuid): root; and a disk with no VM.
    fn tree() -> Tree {
        let web = (None, Some("web01"));
        Tree::build(vec![
            disk(
                V1,
                "root",
                web,
                &[
                    &[JAN1, JAN1 + DAY, JAN1 + 2 * DAY],
                    &[JAN1 + 4 * DAY, JAN1 + 4 * DAY + 45_000],
                ],
            ),
            disk(V2, "data", web, &[&[JAN1 + DAY]]),
            disk(V3, "root", (Some(VM), Some("db")), &[&[JAN1]]),
            disk(V4, "scratch", (None, None), &[&[JAN1]]),
        ])
    }

    /// (set, time) of what `spec` resolves to.
    fn at(t: &Tree, spec: &str) -> (String, String) {
        let (s, q) = t
            .resolve_with_mounts(spec, &["/mnt/backups".into()])
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        let p = &s.points[q as usize];
        assert_eq!(p.seq, q);
        (s.id.clone(), point_name(p))
    }

    fn err(t: &Tree, spec: &str) -> String {
        t.resolve_with_mounts(spec, &["/mnt/backups".into()])
            .expect_err(spec)
    }

    #[test]
    fn a_vm_known_by_name_only_gets_its_folder() {
        let t = tree();
        let names: Vec<&str> = t.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, vec!["db", "no-vm", "web01"]);
        let web = &t.vms[2];
        assert_eq!(web.uuid, None);
        let disks: Vec<&str> = web.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(disks, vec!["data", "root"]);
        assert_eq!(t.vms[0].uuid.as_deref(), Some(VM));
        assert_eq!(t.disk_path(V4).as_deref(), Some("no-vm/scratch"));
        let m = manifest(
            V1,
            "root",
            (None, Some("web01")),
            "20260101T020000Z",
            0,
            JAN1,
        );
        assert_eq!(
            t.path_of(&m).as_deref(),
            Some("web01/root/20260101T020000Z/20260101T020000Z")
        );
        assert_eq!(
            t.display(&m),
            format!("web01/root/20260101T020000Z/20260101T020000Z ({V1}@20260101T020000Z)")
        );
        assert_eq!(t.find_label(&format!("{V1}@20260101T020000Z")), Some(&m));
        assert_eq!(t.find_label("nope@20260101T020000Z"), None);
        assert_eq!(with_label(None, "x@y"), "x@y");
    }

    #[test]
    fn vm_folder_names_never_collide() {
        // Two VMs named web01 (uuids), one web01 by name only, one VM called "no-vm", one
        // "by-uuid", and names that sanitise alike ("web 01" and "web_01").
        let t = Tree::build(vec![
            disk(V1, "a", (Some(VM), Some("web01")), &[&[JAN1]]),
            disk(
                V2,
                "b",
                (Some("bbbbbbbb-0000-4000-8000-000000000000"), Some("web01")),
                &[&[JAN1]],
            ),
            disk(V3, "c", (None, Some("web01")), &[&[JAN1]]),
            disk(
                V4,
                "d",
                (Some("cccccccc-0000-4000-8000-000000000000"), Some("no-vm")),
                &[&[JAN1]],
            ),
            disk(
                "55555555-5555-4555-8555-555555555555",
                "e",
                (None, Some("by-uuid")),
                &[&[JAN1]],
            ),
            disk(
                "66666666-6666-4666-8666-666666666666",
                "f",
                (None, None),
                &[&[JAN1]],
            ),
            disk(
                "77777777-7777-4777-8777-777777777777",
                "g",
                (None, Some("web 01")),
                &[&[JAN1]],
            ),
            disk(
                "88888888-8888-4888-8888-888888888888",
                "h",
                (None, Some("web_01")),
                &[&[JAN1]],
            ),
        ]);
        let names: Vec<&str> = t.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "by-uuid-no-uuid",
                "no-vm",
                "no-vm-cccccccc",
                "web01-aaaaaaaa",
                "web01-bbbbbbbb",
                "web01-no-uuid",
                "web_01"
            ]
        );
        let web_01 = t.vms.iter().find(|v| v.name == "web_01").unwrap();
        assert_eq!(
            web_01.disks.len(),
            2,
            "names that sanitise alike are one VM"
        );
    }

    #[test]
    fn every_form_resolves() {
        let t = tree();
        let jan3 = (
            "20260101T020000Z".to_string(),
            "20260103T020000Z".to_string(),
        );
        let jan5 = (
            "20260105T020000Z".to_string(),
            "20260105T143000Z".to_string(),
        );
        let jan5_early = (
            "20260105T020000Z".to_string(),
            "20260105T020000Z".to_string(),
        );
        let jan2 = (
            "20260101T020000Z".to_string(),
            "20260102T020000Z".to_string(),
        );
        for (spec, want) in [
            ("web01/root/20260101T020000Z/20260103T020000Z", &jan3),
            ("web01/root/20260101T020000Z/20260103T020000Z.raw", &jan3),
            ("web01/root/20260101T020000Z/20260103T020000Z/", &jan3),
            ("  web01/root/20260101T020000Z/20260103T020000Z ", &jan3),
            ("web01/root/20260101T020000Z/latest", &jan3),
            ("web01/root/20260101T020000Z/latest.raw", &jan3),
            ("web01/root/latest", &jan5),
            ("web01/root/latest.raw", &jan5),
            (
                "by-uuid/11111111-1111-4111-8111-111111111111/latest.raw",
                &jan5,
            ),
            (
                "by-uuid/11111111-1111-4111-8111-111111111111/20260101T020000Z/20260102T020000Z",
                &jan2,
            ),
            ("/mnt/backups/web01/root/latest.raw", &jan5),
            (
                "/mnt/backups/web01/root/20260101T020000Z/20260102T020000Z.raw",
                &jan2,
            ),
            (
                "/mnt/backups/by-uuid/11111111-1111-4111-8111-111111111111/latest.raw",
                &jan5,
            ),
            ("11111111-1111-4111-8111-111111111111@latest", &jan5),
            (
                "11111111-1111-4111-8111-111111111111@20260102T020000Z",
                &jan2,
            ),
            (
                "11111111-1111-4111-8111-111111111111@2026-01-02T02:00:00Z",
                &jan2,
            ),
            (
                "11111111-1111-4111-8111-111111111111@2026-01-02 02:00:00",
                &jan2,
            ),
            ("web01/root@latest", &jan5),
            ("web01/root@2026-01-02", &jan2),
            ("web01/root@2026-01-02T02:00", &jan2),
            ("web01/root@2026-01-02 02:00", &jan2),
            (
                "web01/root@2026-01-02T01:59:59Z",
                &("20260101T020000Z".into(), "20260101T020000Z".into()),
            ),
            ("web01/root@2026-01-04", &jan3),
            ("web01/root@2026-01-05", &jan5),
            ("web01/root@2026-01-05T14:29:59Z", &jan5_early),
            ("web01/root@2026-01-05T14:30", &jan5),
            ("web01/root@2027-01-01", &jan5),
            ("web01/root@2026-01-05T15:00:00+01:00", &jan5_early),
            (
                "by-uuid/11111111-1111-4111-8111-111111111111@2026-01-03",
                &jan3,
            ),
            ("web01/root@2026-01-02.raw", &jan2),
        ] {
            assert_eq!(&at(&t, spec), want, "{spec}");
        }
        assert_eq!(at(&t, "no-vm/scratch/latest").1, "20260101T020000Z");
        assert_eq!(at(&t, "db/root@2026-01-01").1, "20260101T020000Z");
    }

    #[test]
    fn unresolvable_names_say_what_is_there() {
        let t = tree();
        let cases = [
            (
                "web02/root/latest",
                "no VM folder \"web02\" in this repository; it has: db, no-vm, web01",
            ),
            (
                "web01/xvdb/latest",
                "no disk \"xvdb\" under VM \"web01\"; it has: data, root",
            ),
            (
                "web01/root/20990101T000000Z/latest",
                "disk web01/root has no set \"20990101T000000Z\"; its sets: 20260101T020000Z, 20260105T020000Z",
            ),
            (
                "web01/root/20260101T020000Z/20260104T020000Z",
                "set web01/root/20260101T020000Z has no readable point \"20260104T020000Z\"; its points: 20260101T020000Z, 20260102T020000Z, 20260103T020000Z",
            ),
            (
                "web01/root",
                "web01/root is a disk, not a point: add /latest, @TIME or /SET/POINT; its sets: 20260101T020000Z, 20260105T020000Z",
            ),
            (
                "web01/root/20260101T020000Z",
                "web01/root/20260101T020000Z is a set, not a point: add /latest or /POINT; its points: 20260101T020000Z, 20260102T020000Z, 20260103T020000Z",
            ),
            (
                "web01/root@2025-12-31",
                "disk web01/root has no point at or before 2025-12-31T23:59:59Z (UTC); its oldest is web01/root/20260101T020000Z/20260101T020000Z taken 2026-01-01T02:00:00Z",
            ),
            (
                "99999999-9999-4999-8999-999999999999@latest",
                "no disk with VDI uuid 99999999-9999-4999-8999-999999999999 in this repository; it has: 33333333-3333-4333-8333-333333333333 (db/root)",
            ),
            (
                "/etc/passwd",
                "that path is outside any mounted cbtfs repository",
            ),
            (
                "11111111-1111-4111-8111-111111111111",
                "is a disk, not a point: add @latest",
            ),
            (
                "web01/root@yesterday",
                "after the @ comes `latest` or a time: \"yesterday\" is not a time",
            ),
            ("web01/root@2026-02-30", "February 2026 has no day 30"),
            ("latest", "names no point: use VM/DISK/SET/POINT"),
            ("", "names no point"),
            ("web01/root/20260101T020000Z/latest/x", "names no point"),
            ("a/b/c@latest", "before the @ names no disk"),
        ];
        for (spec, want) in cases {
            let e = err(&t, spec);
            assert!(e.contains(want), "{spec}: {e}");
            assert!(e.len() < 600, "{spec}: bounded: {e}");
        }
    }

    #[test]
    fn a_time_never_skips_a_damaged_point_silently() {
        let mut d = disk(V1, "root", (None, Some("web01")), &[&[JAN1, JAN1 + DAY]]);
        d.sets[0].problems.push(crate::repo::SetProblem {
            location: "disks/x/20260101T020000Z/000002.point".into(),
            message: "checksum".into(),
        });
        let mut base_damaged = disk(
            V2,
            "data",
            (None, Some("web01")),
            &[&[JAN1], &[JAN1 + 3 * DAY]],
        );
        base_damaged.sets[1].points.clear();
        base_damaged.sets[1].problems.push(crate::repo::SetProblem {
            location: "disks/y/20260104T020000Z/000000.point".into(),
            message: "checksum".into(),
        });
        let t = Tree::build(vec![d, base_damaged]);
        // At or before the last readable point: fine.
        assert_eq!(
            at(&t, "web01/root@2026-01-02T02:00:00Z").1,
            "20260102T020000Z"
        );
        assert_eq!(at(&t, "web01/root@2026-01-01").1, "20260101T020000Z");
        // After it, the damaged point 2 may be the one meant.
        let e = err(&t, "web01/root@2026-01-03");
        assert!(
            e.contains("set 20260101T020000Z has damaged points after 2026-01-02T02:00:00Z")
                && e.contains("cbtfs verify")
                && e.contains("name web01/root/20260101T020000Z/20260102T020000Z exactly"),
            "{e}"
        );
        assert_eq!(at(&t, "web01/root/latest").1, "20260102T020000Z");
        // A damaged base of a later set: before its time is fine, after it is refused.
        assert_eq!(at(&t, "web01/data@2026-01-04T01:00").1, "20260101T020000Z");
        let e = err(&t, "web01/data@2026-01-04");
        assert!(e.contains("set 20260104T020000Z has damaged points"), "{e}");
    }

    #[test]
    fn long_lists_are_cut_near_the_name() {
        let times: Vec<i64> = (0..40).map(|k| JAN1 + k * DAY).collect();
        let t = Tree::build(vec![disk(V1, "root", (None, Some("web01")), &[&times])]);
        let e = err(&t, "web01/root/20260101T020000Z/20260120T030000Z");
        assert!(
            e.contains("its points: … 20260117T020000Z, 20260118T020000Z, 20260119T020000Z, 20260120T020000Z, 20260121T020000Z, 20260122T020000Z, 20260123T020000Z, 20260124T020000Z … (of 40)"),
            "{e}"
        );
        assert_eq!(
            list(&(0..10).map(|k| k.to_string()).collect::<Vec<_>>()),
            "0, 1, 2, 3, 4, 5, 6, 7 and 2 more"
        );
    }

    #[test]
    fn paths_in_a_mount_are_taken_from_its_root() {
        let text = "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    90 29 0:52 / /mnt/back\\040ups ro,nosuid,nodev,relatime - fuse /srv/re\\040po ro,user_id=0\n\
                    91 29 0:53 / /mnt/other rw - fuse.sshfs host: rw\n\
                    92 29 0:54 / /mnt/notrepo rw - fuse /srv/else rw\n\
                    93 29 0:55 / /mnt/sub ro - fuse.cbtfs /srv/repo2 ro\n";
        let repos = ["/srv/re po", "/srv/repo2", "host:"];
        assert_eq!(
            parse_mountinfo(text, |s| repos.contains(&s)),
            vec!["/mnt/back ups".to_string(), "/mnt/sub".to_string()]
        );
        assert_eq!(unescape_octal("a\\134b\\0"), "a\\b\\0");
        let roots = vec!["/mnt".to_string(), "/mnt/b/".to_string()];
        assert_eq!(
            strip_mount_root("/mnt/b/web01/root/latest.raw", &roots),
            Some("web01/root/latest.raw")
        );
        assert_eq!(strip_mount_root("/mnt/x", &roots), Some("x"));
        assert_eq!(strip_mount_root("/mntx/y", &roots), None);
    }

    #[test]
    fn sanitize_makes_safe_names() {
        assert_eq!(sanitize("Web server: prod"), "Web_server_prod");
        assert_eq!(sanitize("a/b\\c d"), "a_b_c_d");
        assert_eq!(sanitize(""), "unnamed");
        assert_eq!(sanitize(".."), "unnamed");
        assert_eq!(sanitize("-rf"), "_-rf");
        assert_eq!(sanitize(".hidden"), "_.hidden");
        assert_eq!(sanitize("disk 0 ☃"), "disk_0");
        for s in ["x:y", "a b", "/", "*?$`'\""] {
            let n = sanitize(s);
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
            );
        }
    }

    #[test]
    fn collisions_get_uuid_suffixes() {
        let items = vec![
            ("aaaaaaaa-1".to_string(), "db".to_string()),
            ("bbbbbbbb-2".to_string(), "db".to_string()),
            ("cccccccc-3".to_string(), "web".to_string()),
        ];
        assert_eq!(
            unique_names(&items),
            vec!["db-aaaaaaaa", "db-bbbbbbbb", "web"]
        );
    }
}
