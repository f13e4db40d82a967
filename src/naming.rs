//! The names users type: `VM/DISK/SET/POINT`, `VDI_UUID@latest`, `VDI_UUID@TIME`.
//!
//! Names are safe unquoted in shells and in `qemu-img` (no spaces, no `:`, no `/`, never starting
//! with `-` or being `.`/`..`). VM and disk names come from the host, sanitised; when two objects
//! would get the same name, each gets a short uuid suffix. Sets and points are named by time in
//! ISO 8601 basic form, UTC. The same tree is what the mount shows.

use std::collections::BTreeMap;

use crate::repo::{DiskHistory, PointManifest, SetHistory};
use crate::timefmt;

/// The mount's folder of disks by VDI uuid, for scripts.
pub const BY_UUID: &str = "by-uuid";

/// Name of the folder for disks whose VM is unknown (imported images).
pub const NO_VM: &str = "no-vm";

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

impl Tree {
    pub fn build(disks: Vec<DiskHistory>) -> Tree {
        // Group disks by the VM their newest point names.
        let mut by_vm: BTreeMap<Option<String>, (Option<String>, Vec<DiskHistory>)> =
            BTreeMap::new();
        for d in disks {
            let Some(newest) = d.newest().cloned() else {
                continue;
            };
            let e = by_vm
                .entry(newest.vm_uuid.clone())
                .or_insert((newest.vm_name.clone(), Vec::new()));
            e.1.push(d);
        }
        let vm_items: Vec<(String, String)> = by_vm
            .iter()
            .map(|(uuid, (name, _))| match uuid {
                Some(u) => (u.clone(), sanitize(name.as_deref().unwrap_or("unnamed-vm"))),
                None => (String::new(), NO_VM.to_string()),
            })
            .collect();
        let mut vm_names = unique_names(&vm_items);
        // The mount's root also holds `by-uuid/`: no VM may take that name.
        for (n, (id, _)) in vm_names.iter_mut().zip(&vm_items) {
            if n == BY_UUID {
                *n = format!("{BY_UUID}-{}", short(id));
            }
        }
        let mut vms = Vec::new();
        for ((uuid, (_, disks)), name) in by_vm.into_iter().zip(vm_names) {
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
                uuid,
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

    /// The path of a point as the mount shows it: `VM/DISK/SET/POINT`.
    pub fn path_of(&self, m: &PointManifest) -> Option<String> {
        let (vm, disk) = self.disk_by_uuid(&m.vdi)?;
        Some(format!(
            "{}/{}/{}/{}",
            vm.name,
            disk.name,
            m.set,
            point_name(m)
        ))
    }

    /// Resolve a user's point name to its set and position.
    pub fn resolve(&self, spec: &str) -> Result<(SetHistory, u32), String> {
        let spec = spec.trim_end_matches('/');
        let spec = spec.strip_suffix(".raw").unwrap_or(spec);
        if let Some((vdi, when)) = spec.split_once('@') {
            let Some((_, disk)) = self.disk_by_uuid(vdi) else {
                return Err(format!(
                    "no disk with VDI uuid {vdi} in this repository; `cbtfs ls` lists the disks"
                ));
            };
            return find_in_disk(&disk.history, when, spec);
        }
        let parts: Vec<&str> = spec.split('/').collect();
        let (disk, rest): (&DiskNode, &[&str]) = match parts.as_slice() {
            ["by-uuid", vdi, rest @ ..] => {
                let Some((_, d)) = self.disk_by_uuid(vdi) else {
                    return Err(format!("no disk with VDI uuid {vdi} in this repository"));
                };
                (d, rest)
            }
            [vm, disk, rest @ ..] => {
                let Some(v) = self.vms.iter().find(|v| v.name == *vm) else {
                    return Err(format!(
                        "no VM folder {vm:?} in this repository; `cbtfs ls` lists the points"
                    ));
                };
                let Some(d) = v.disks.iter().find(|d| d.name == *disk) else {
                    return Err(format!(
                        "no disk {disk:?} under VM {vm:?}; `cbtfs ls` lists them"
                    ));
                };
                (d, rest)
            }
            _ => {
                return Err(format!(
                    "{spec:?} names no point: use VM/DISK/SET/POINT (as `cbtfs ls` shows), VDI_UUID@latest or VDI_UUID@2026-11-21T02:00:00Z"
                ));
            }
        };
        match rest {
            ["latest"] => find_in_disk(&disk.history, "latest", spec),
            [set, point] => {
                let Some(s) = disk.history.sets.iter().find(|s| s.id == *set) else {
                    return Err(format!(
                        "disk {} has no set {set:?}; `cbtfs ls` lists its sets",
                        disk.vdi()
                    ));
                };
                if *point == "latest" {
                    return match s.points.len() {
                        0 => Err(format!(
                            "set {set} of disk {} has no readable point",
                            disk.vdi()
                        )),
                        n => Ok((s.clone(), n as u32 - 1)),
                    };
                }
                match s.points.iter().find(|p| point_name(p) == *point) {
                    Some(p) => Ok((s.clone(), p.seq)),
                    None => Err(format!(
                        "set {set} of disk {} has no readable point {point:?}; `cbtfs ls` lists its points{}",
                        disk.vdi(),
                        damage_note(&disk.history)
                    )),
                }
            }
            _ => Err(format!(
                "{spec:?} names no point: use VM/DISK/SET/POINT (as `cbtfs ls` shows)"
            )),
        }
    }
}

fn find_in_disk(d: &DiskHistory, when: &str, spec: &str) -> Result<(SetHistory, u32), String> {
    if when == "latest" {
        return d
            .sets
            .iter()
            .rev()
            .find(|s| !s.points.is_empty())
            .map(|s| (s.clone(), s.points.len() as u32 - 1))
            .ok_or_else(|| format!("disk {} has no readable point", d.vdi));
    }
    let t = timefmt::parse(when)?;
    for s in &d.sets {
        if let Some(p) = s.points.iter().find(|p| p.time == t) {
            return Ok((s.clone(), p.seq));
        }
    }
    Err(format!(
        "disk {} has no readable point at {} ({spec}); `cbtfs ls` lists its points{}",
        d.vdi,
        timefmt::rfc3339(t),
        damage_note(d)
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

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
