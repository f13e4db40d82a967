//! The volumes inside a disk: MBR partitions (logical ones in an extended partition included),
//! GPT partitions, and LVM2 logical volumes inside any of them, found by reading the disk's
//! own metadata. cbtfs maps LVs itself (linear and striped segments, an LV in several
//! non-contiguous pieces): there is no device-mapper here, and a restore must never activate a
//! guest's volume group on the backup host.
//!
//! A volume is a list of extents (volume offset → disk offset, length); reading it costs the
//! same as reading the disk there. Names are stable and safe in shells and `qemu-img`:
//! `p1`, `p5` (partition numbers as the guest's kernel counts them), `VG-LV`. What cannot be
//! read as a plain volume (thin pools, RAID, LUKS, BitLocker, PVs on other disks, damaged
//! tables) is listed with the reason, never hidden.

use std::collections::{BTreeMap, HashSet};
use std::io;

use serde::Serialize;

const SECTOR: u64 = 512;
/// Extended-partition chains longer than this are treated as damaged (loops).
const MAX_LOGICAL: usize = 128;
/// Largest LVM metadata text accepted (real ones are a few KiB).
const MAX_LVM_TEXT: u64 = 4 << 20;

/// One contiguous piece of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// Offset in the volume.
    pub offset: u64,
    /// Offset in the disk.
    pub disk_offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Volume {
    /// `p1`, `p5`, `vg0-root`.
    pub name: String,
    /// What it is: `mbr partition, type 0x83`, `gpt partition "root"`, `lvm2 lv vg0/root`.
    pub what: String,
    pub size: u64,
    pub extents: Vec<Extent>,
    /// The filesystem or content its first bytes show (`ext4`, `xfs`, `lvm2 pv`, ...).
    pub content: Option<String>,
}

/// Something found that is not readable as a plain volume, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unreadable {
    pub name: String,
    pub what: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Layout {
    /// `mbr`, `gpt` or `none` (a bare filesystem or nothing known).
    pub scheme: String,
    /// The whole disk's content when it has no partition table.
    pub content: Option<String>,
    pub volumes: Vec<Volume>,
    pub unreadable: Vec<Unreadable>,
}

impl Layout {
    /// What `volumes.txt` and `cbtfs ls --volumes` show.
    pub fn to_text(&self) -> String {
        let mut out = match self.scheme.as_str() {
            "none" => format!(
                "no partition table ({})\n",
                self.content.as_deref().unwrap_or("content unknown")
            ),
            s => format!("{s} partition table\n"),
        };
        for v in &self.volumes {
            out.push_str(&format!(
                "{:<20} {:<9} {:>14} bytes  {}{}\n",
                format!("{}.raw", v.name),
                v.content.as_deref().unwrap_or("-"),
                v.size,
                v.what,
                if v.extents.len() > 1 {
                    format!(" ({} pieces)", v.extents.len())
                } else {
                    String::new()
                }
            ));
        }
        for u in &self.unreadable {
            out.push_str(&format!(
                "{:<20} not readable: {} ({})\n",
                u.name, u.reason, u.what
            ));
        }
        out
    }
}

impl Volume {
    /// Map `[offset, offset+len)` of the volume onto disk ranges, in order.
    pub fn map(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let i = self.extents.partition_point(|e| e.offset + e.len <= offset);
        for e in &self.extents[i..] {
            if e.offset >= end {
                break;
            }
            let s = offset.max(e.offset);
            let t = end.min(e.offset + e.len);
            out.push((e.disk_offset + (s - e.offset), t - s));
        }
        out
    }
}

/// Reads of the disk being examined.
pub trait DiskRead {
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; past the end reads as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

fn read(d: &dyn DiskRead, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    if offset < d.size() {
        d.read_at(&mut b, offset)?;
    }
    Ok(b)
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes([
        b[o],
        b[o + 1],
        b[o + 2],
        b[o + 3],
        b[o + 4],
        b[o + 5],
        b[o + 6],
        b[o + 7],
    ])
}

/// What the first bytes of a region show.
pub fn sniff(d: &dyn DiskRead, start: u64) -> io::Result<Option<String>> {
    let head = read(d, start, 4096)?;
    let sb = read(d, start + 1024, 1024)?;
    if le16(&sb, 56) == 0xEF53 {
        // ext2/3/4 by feature flags: journal (ext3), extents or 64bit (ext4).
        let compat = le32(&sb, 92);
        let incompat = le32(&sb, 96);
        let kind = if incompat & (0x40 | 0x80 | 0x200) != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        return Ok(Some(kind.into()));
    }
    if &head[0..4] == b"XFSB" {
        return Ok(Some("xfs".into()));
    }
    if &head[3..11] == b"NTFS    " {
        return Ok(Some("ntfs".into()));
    }
    if &head[3..11] == b"-FVE-FS-" {
        return Ok(Some("bitlocker".into()));
    }
    if &head[0..6] == b"LUKS\xba\xbe" {
        return Ok(Some("luks".into()));
    }
    if &head[4086..4096] == b"SWAPSPACE2" {
        return Ok(Some("swap".into()));
    }
    for s in 0..4u64 {
        let b = read(d, start + s * SECTOR, SECTOR as usize)?;
        if &b[0..8] == b"LABELONE" && &b[24..32] == b"LVM2 001" {
            return Ok(Some("lvm2 pv".into()));
        }
    }
    let btrfs = read(d, start + 0x10040, 8)?;
    if &btrfs[..] == b"_BHRfS_M" {
        return Ok(Some("btrfs".into()));
    }
    if le16(&head, 510) == 0xAA55 && (&head[54..57] == b"FAT" || &head[82..87] == b"FAT32") {
        return Ok(Some("vfat".into()));
    }
    Ok(None)
}

/// Find every volume of the disk.
pub fn discover(d: &dyn DiskRead) -> io::Result<Layout> {
    let mut layout = Layout::default();
    let mbr = read(d, 0, SECTOR as usize)?;
    let gpt = read(d, SECTOR, SECTOR as usize)?;
    let mut parts: Vec<(String, String, u64, u64)> = Vec::new(); // name, what, start, len
    if &gpt[0..8] == b"EFI PART" {
        layout.scheme = "gpt".into();
        gpt_partitions(d, &gpt, &mut parts, &mut layout.unreadable)?;
    } else if le16(&mbr, 510) == 0xAA55 && sniff(d, 0)?.is_none() {
        layout.scheme = "mbr".into();
        mbr_partitions(d, &mbr, &mut parts, &mut layout.unreadable)?;
    } else {
        layout.scheme = "none".into();
        layout.content = sniff(d, 0)?;
        if layout.content.as_deref() == Some("lvm2 pv") {
            parts.push(("disk".into(), "whole disk".into(), 0, d.size()));
        }
    }
    let mut pvs = Vec::new();
    for (name, what, start, len) in parts {
        let end = start.saturating_add(len);
        if end > d.size() || len == 0 {
            layout.unreadable.push(Unreadable {
                name,
                what,
                reason: format!(
                    "it lies outside the disk ({start}..{end} of {} bytes): damaged partition table",
                    d.size()
                ),
            });
            continue;
        }
        let content = sniff(d, start)?;
        if content.as_deref() == Some("lvm2 pv") {
            pvs.push((name.clone(), start, len));
        }
        if name != "disk" {
            layout.volumes.push(Volume {
                name,
                what,
                size: len,
                extents: vec![Extent {
                    offset: 0,
                    disk_offset: start,
                    len,
                }],
                content,
            });
        }
    }
    lvm_volumes(d, &pvs, &mut layout)?;
    for v in &mut layout.volumes {
        if v.what.starts_with("lvm2") {
            v.content = sniff_volume(d, v)?;
        }
    }
    for u in layout
        .volumes
        .iter()
        .filter(|v| matches!(v.content.as_deref(), Some("luks") | Some("bitlocker")))
    {
        layout.unreadable.push(Unreadable {
            name: u.name.clone(),
            what: u.what.clone(),
            reason: format!(
                "{} encrypted: its raw file is there, its files need the key",
                u.content.as_deref().unwrap_or("")
            ),
        });
    }
    Ok(layout)
}

/// Sniff a volume made of extents (an LV) through its mapping.
fn sniff_volume(d: &dyn DiskRead, v: &Volume) -> io::Result<Option<String>> {
    struct View<'a> {
        d: &'a dyn DiskRead,
        v: &'a Volume,
    }
    impl DiskRead for View<'_> {
        fn size(&self) -> u64 {
            self.v.size
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            buf.fill(0);
            let mut at = 0usize;
            for (o, l) in self.v.map(offset, buf.len() as u64) {
                self.d.read_at(&mut buf[at..at + l as usize], o)?;
                at += l as usize;
            }
            Ok(())
        }
    }
    sniff(&View { d, v }, 0)
}

fn mbr_partitions(
    d: &dyn DiskRead,
    mbr: &[u8],
    parts: &mut Vec<(String, String, u64, u64)>,
    bad: &mut Vec<Unreadable>,
) -> io::Result<()> {
    let mut logical = Vec::new();
    for i in 0..4 {
        let e = &mbr[446 + i * 16..446 + (i + 1) * 16];
        let kind = e[4];
        let start = le32(e, 8) as u64 * SECTOR;
        let len = le32(e, 12) as u64 * SECTOR;
        if kind == 0 || len == 0 {
            continue;
        }
        let name = format!("p{}", i + 1);
        if matches!(kind, 0x05 | 0x0f | 0x85) {
            // Logical partitions (p5 on) come after the primaries, as the guest numbers them.
            logical_partitions(d, start, &mut logical, bad)?;
            continue;
        }
        parts.push((
            name,
            format!("mbr partition, type 0x{kind:02x}"),
            start,
            len,
        ));
    }
    parts.extend(logical);
    Ok(())
}

/// Walk the chain of extended boot records; logical partitions are numbered from 5.
fn logical_partitions(
    d: &dyn DiskRead,
    ext_start: u64,
    parts: &mut Vec<(String, String, u64, u64)>,
    bad: &mut Vec<Unreadable>,
) -> io::Result<()> {
    let mut ebr = ext_start;
    let mut seen = HashSet::new();
    let mut n = 5;
    loop {
        if !seen.insert(ebr) || seen.len() > MAX_LOGICAL || ebr >= d.size() {
            bad.push(Unreadable {
                name: format!("p{n}"),
                what: "extended partition".into(),
                reason: "the chain of logical partitions loops or leaves the disk: damaged table; the partitions before it are listed".into(),
            });
            return Ok(());
        }
        let b = read(d, ebr, SECTOR as usize)?;
        if le16(&b, 510) != 0xAA55 {
            bad.push(Unreadable {
                name: format!("p{n}"),
                what: "extended partition".into(),
                reason: format!("no boot record signature at byte {ebr}: damaged table"),
            });
            return Ok(());
        }
        let (e1, e2) = (&b[446..462], &b[462..478]);
        let len = le32(e1, 12) as u64 * SECTOR;
        if e1[4] != 0 && len > 0 {
            let start = ebr + le32(e1, 8) as u64 * SECTOR;
            parts.push((
                format!("p{n}"),
                format!("mbr logical partition, type 0x{:02x}", e1[4]),
                start,
                len,
            ));
            n += 1;
        }
        if e2[4] == 0 || le32(e2, 12) == 0 {
            return Ok(());
        }
        ebr = ext_start + le32(e2, 8) as u64 * SECTOR;
    }
}

fn gpt_partitions(
    d: &dyn DiskRead,
    hdr: &[u8],
    parts: &mut Vec<(String, String, u64, u64)>,
    bad: &mut Vec<Unreadable>,
) -> io::Result<()> {
    let entries_lba = le64(hdr, 72);
    let count = le32(hdr, 80) as u64;
    let size = le32(hdr, 84) as u64;
    if !(128..=4096).contains(&size) || count > 1024 {
        bad.push(Unreadable {
            name: "gpt".into(),
            what: "GPT header".into(),
            reason: format!("{count} entries of {size} bytes: damaged header"),
        });
        return Ok(());
    }
    let table = read(d, entries_lba * SECTOR, (count * size) as usize)?;
    for i in 0..count as usize {
        let e = &table[i * size as usize..(i + 1) * size as usize];
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        let label: String = char::decode_utf16((0..36).map(|k| le16(e, 56 + 2 * k)))
            .map(|c| c.unwrap_or('?'))
            .take_while(|&c| c != '\0')
            .collect();
        let what = if label.is_empty() {
            "gpt partition".to_string()
        } else {
            format!("gpt partition {label:?}")
        };
        if last < first {
            bad.push(Unreadable {
                name: format!("p{}", i + 1),
                what,
                reason: "it ends before it starts: damaged table".into(),
            });
            continue;
        }
        parts.push((
            format!("p{}", i + 1),
            what,
            first * SECTOR,
            (last - first + 1) * SECTOR,
        ));
    }
    Ok(())
}

/// A value of LVM2's metadata text format.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Str(String),
    Num(i64),
    List(Vec<Val>),
    Section(BTreeMap<String, Val>),
}

impl Val {
    fn get(&self, k: &str) -> Option<&Val> {
        match self {
            Val::Section(m) => m.get(k),
            _ => None,
        }
    }
    fn num(&self, k: &str) -> Option<i64> {
        match self.get(k)? {
            Val::Num(n) => Some(*n),
            _ => None,
        }
    }
    fn str(&self, k: &str) -> Option<&str> {
        match self.get(k)? {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Parse LVM2 metadata text (`name { key = value ... }`, lists, strings, numbers, comments).
fn parse_lvm(text: &str) -> Result<BTreeMap<String, Val>, String> {
    let toks = tokenize(text)?;
    let mut pos = 0;
    let v = parse_body(&toks, &mut pos, 0)?;
    Ok(v)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(i64),
    Sym(char),
}

fn tokenize(text: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut it = text.chars().peekable();
    while let Some(&c) = it.peek() {
        match c {
            '#' => while it.next().is_some_and(|c| c != '\n') {},
            c if c.is_whitespace() => {
                it.next();
            }
            '{' | '}' | '[' | ']' | '=' | ',' => {
                out.push(Tok::Sym(c));
                it.next();
            }
            '"' => {
                it.next();
                let mut s = String::new();
                loop {
                    match it.next() {
                        Some('\\') => s.extend(it.next()),
                        Some('"') => break,
                        Some(c) => s.push(c),
                        None => return Err("unterminated string".into()),
                    }
                }
                out.push(Tok::Str(s));
            }
            c if c.is_ascii_digit() || c == '-' => {
                let mut s = String::new();
                while let Some(&c) = it.peek() {
                    if c.is_ascii_digit() || c == '-' || c == '.' {
                        s.push(c);
                        it.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Num(
                    s.parse::<f64>()
                        .map(|f| f as i64)
                        .map_err(|_| format!("bad number {s}"))?,
                ));
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '+' => {
                let mut s = String::new();
                while let Some(&c) = it.peek() {
                    if c.is_ascii_alphanumeric() || "_.+-".contains(c) {
                        s.push(c);
                        it.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Ident(s));
            }
            c => return Err(format!("unexpected character {c:?}")),
        }
    }
    Ok(out)
}

fn parse_body(
    toks: &[Tok],
    pos: &mut usize,
    depth: usize,
) -> Result<BTreeMap<String, Val>, String> {
    if depth > 32 {
        return Err("nested too deeply".into());
    }
    let mut m = BTreeMap::new();
    while *pos < toks.len() {
        match &toks[*pos] {
            Tok::Sym('}') => return Ok(m),
            Tok::Ident(name) => {
                *pos += 1;
                match toks.get(*pos) {
                    Some(Tok::Sym('{')) => {
                        *pos += 1;
                        let body = parse_body(toks, pos, depth + 1)?;
                        if toks.get(*pos) != Some(&Tok::Sym('}')) {
                            return Err(format!("section {name} is not closed"));
                        }
                        *pos += 1;
                        m.insert(name.clone(), Val::Section(body));
                    }
                    Some(Tok::Sym('=')) => {
                        *pos += 1;
                        let v = parse_value(toks, pos)?;
                        m.insert(name.clone(), v);
                    }
                    _ => return Err(format!("expected {{ or = after {name}")),
                }
            }
            t => return Err(format!("unexpected {t:?}")),
        }
    }
    Ok(m)
}

fn parse_value(toks: &[Tok], pos: &mut usize) -> Result<Val, String> {
    let t = toks.get(*pos).ok_or("value missing")?.clone();
    *pos += 1;
    Ok(match t {
        Tok::Str(s) => Val::Str(s),
        Tok::Num(n) => Val::Num(n),
        Tok::Ident(s) => Val::Str(s),
        Tok::Sym('[') => {
            let mut items = Vec::new();
            loop {
                match toks.get(*pos) {
                    Some(Tok::Sym(']')) => {
                        *pos += 1;
                        break;
                    }
                    Some(Tok::Sym(',')) => *pos += 1,
                    Some(_) => items.push(parse_value(toks, pos)?),
                    None => return Err("list is not closed".into()),
                }
            }
            Val::List(items)
        }
        t => return Err(format!("unexpected {t:?}")),
    })
}

/// A PV found on this disk: its uuid and where its data area starts.
struct Pv {
    id: String,
    start: u64,
    metadata: Option<String>,
}

/// Read a PV's label and, through its metadata area, the current metadata text.
fn read_pv(d: &dyn DiskRead, start: u64) -> io::Result<Option<Pv>> {
    for s in 0..4u64 {
        let b = read(d, start + s * SECTOR, SECTOR as usize)?;
        if &b[0..8] != b"LABELONE" || &b[24..32] != b"LVM2 001" {
            continue;
        }
        let off = le32(&b, 20) as usize;
        if off + 40 > b.len() {
            return Ok(None);
        }
        let id = String::from_utf8_lossy(&b[off..off + 32]).into_owned();
        // Data areas, then metadata areas: (offset, size) pairs each ended by a zero pair.
        let mut p = off + 40;
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            while p + 16 <= b.len() {
                let (o, sz) = (le64(&b, p), le64(&b, p + 8));
                p += 16;
                if o == 0 {
                    break;
                }
                list.push((o, sz));
            }
        }
        let mut metadata = None;
        for &(mda, _) in &lists[1] {
            let h = read(d, start + mda, SECTOR as usize)?;
            if &h[4..20] != b" LVM2 x[5A%r0N*>" {
                continue;
            }
            let area_start = le64(&h, 24);
            let area_size = le64(&h, 32);
            let (loc, len) = (le64(&h, 40), le64(&h, 48));
            if len == 0 || len > MAX_LVM_TEXT || area_size == 0 {
                continue;
            }
            // The text lives in a circular buffer after the header's sector.
            let first = len.min(area_size.saturating_sub(loc));
            let mut text = read(d, start + area_start + loc, first as usize)?;
            if first < len {
                text.extend(read(
                    d,
                    start + area_start + SECTOR,
                    (len - first) as usize,
                )?);
            }
            let t = String::from_utf8_lossy(&text)
                .trim_end_matches('\0')
                .to_string();
            metadata = Some(t);
            break;
        }
        return Ok(Some(Pv {
            id: id.clone(),
            start,
            metadata,
        }));
    }
    Ok(None)
}

fn strip_dashes(s: &str) -> String {
    s.chars().filter(|&c| c != '-').collect()
}

fn lvm_volumes(
    d: &dyn DiskRead,
    pvs: &[(String, u64, u64)],
    layout: &mut Layout,
) -> io::Result<()> {
    let mut found = Vec::new();
    for (name, start, _) in pvs {
        match read_pv(d, *start)? {
            Some(pv) => found.push(pv),
            None => layout.unreadable.push(Unreadable {
                name: name.clone(),
                what: "lvm2 pv".into(),
                reason: "its LVM label is damaged".into(),
            }),
        }
    }
    let mut done = HashSet::new();
    for pv in &found {
        let Some(text) = &pv.metadata else {
            continue;
        };
        let root = match parse_lvm(text) {
            Ok(r) => r,
            Err(e) => {
                layout.unreadable.push(Unreadable {
                    name: "lvm".into(),
                    what: "lvm2 metadata".into(),
                    reason: format!("cannot parse the volume group metadata: {e}"),
                });
                continue;
            }
        };
        for (vg_name, vg) in &root {
            let Val::Section(_) = vg else { continue };
            if !done.insert(vg_name.clone()) {
                continue;
            }
            vg_volumes(vg_name, vg, &found, layout);
        }
    }
    Ok(())
}

fn vg_volumes(vg_name: &str, vg: &Val, found: &[Pv], layout: &mut Layout) {
    let extent = vg.num("extent_size").unwrap_or(0).max(0) as u64 * SECTOR;
    // PV name in the metadata (pv0) → where its extents start on this disk.
    let mut pv_at: BTreeMap<String, Option<u64>> = BTreeMap::new();
    if let Some(Val::Section(pvs)) = vg.get("physical_volumes") {
        for (k, p) in pvs {
            let id = p.str("id").map(strip_dashes).unwrap_or_default();
            let pe_start = p.num("pe_start").unwrap_or(0).max(0) as u64 * SECTOR;
            let at = found
                .iter()
                .find(|f| strip_dashes(&f.id) == id)
                .map(|f| f.start + pe_start);
            pv_at.insert(k.clone(), at);
        }
    }
    let Some(Val::Section(lvs)) = vg.get("logical_volumes") else {
        return;
    };
    for (lv_name, lv) in lvs {
        let name = format!("{vg_name}-{lv_name}");
        let what = format!("lvm2 lv {vg_name}/{lv_name}");
        let visible = matches!(lv.get("status"), Some(Val::List(l)) if l.contains(&Val::Str("VISIBLE".into())));
        let mut extents = Vec::new();
        let mut problem = None;
        let count = lv.num("segment_count").unwrap_or(0);
        for s in 1..=count {
            let Some(seg) = lv.get(&format!("segment{s}")) else {
                problem = Some(format!("segment {s} is missing"));
                break;
            };
            let kind = seg.str("type").unwrap_or("");
            if kind != "striped" {
                problem = Some(format!(
                    "a {kind} segment: cbtfs maps linear and striped LVs only"
                ));
                break;
            }
            let start = seg.num("start_extent").unwrap_or(0).max(0) as u64 * extent;
            let len = seg.num("extent_count").unwrap_or(0).max(0) as u64 * extent;
            let stripes: Vec<(String, u64)> = match seg.get("stripes") {
                Some(Val::List(l)) => l
                    .chunks(2)
                    .filter_map(|c| match c {
                        [Val::Str(p), Val::Num(n)] => Some((p.clone(), (*n).max(0) as u64)),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let mut starts = Vec::new();
            for (p, pe) in &stripes {
                match pv_at.get(p).copied().flatten() {
                    Some(at) => starts.push(at + pe * extent),
                    None => {
                        problem = Some(format!("it uses {p}, a PV that is not on this disk"));
                        break;
                    }
                }
            }
            if problem.is_some() {
                break;
            }
            if starts.len() == 1 {
                extents.push(Extent {
                    offset: start,
                    disk_offset: starts[0],
                    len,
                });
            } else if starts.len() > 1 {
                let chunk = seg.num("stripe_size").unwrap_or(0).max(0) as u64 * SECTOR;
                let n = starts.len() as u64;
                if chunk == 0 || !len.is_multiple_of(chunk * n) {
                    problem = Some("a striped segment with an unusual geometry".into());
                    break;
                }
                for c in 0..len / chunk {
                    let (stripe, row) = (c % n, c / n);
                    extents.push(Extent {
                        offset: start + c * chunk,
                        disk_offset: starts[stripe as usize] + row * chunk,
                        len: chunk,
                    });
                }
            } else {
                problem = Some("a segment without stripes".into());
                break;
            }
        }
        if problem.is_none() && !visible {
            problem = Some("a hidden LV (part of another LV: pool, mirror or snapshot)".into());
        }
        match problem {
            Some(reason) => layout.unreadable.push(Unreadable { name, what, reason }),
            None => {
                // Coalesce adjacent pieces.
                let mut merged: Vec<Extent> = Vec::new();
                for e in extents {
                    match merged.last_mut() {
                        Some(l)
                            if l.offset + l.len == e.offset
                                && l.disk_offset + l.len == e.disk_offset =>
                        {
                            l.len += e.len
                        }
                        _ => merged.push(e),
                    }
                }
                let size = merged.last().map_or(0, |e| e.offset + e.len);
                layout.volumes.push(Volume {
                    name,
                    what,
                    size,
                    extents: merged,
                    content: None,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvm_text_parses() {
        let t = r#"vg0 {
            id = "abc" seqno = 3 extent_size = 8192 # 4 MiB
            status = ["RESIZEABLE", "READ", "WRITE"]
            physical_volumes { pv0 { id = "x-y" pe_start = 2048 pe_count = 10 } }
            logical_volumes { root { status = ["READ", "WRITE", "VISIBLE"] segment_count = 1
                segment1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 1
                    stripes = [ "pv0", 3 ] } } }
        }
        contents = "Text Format Volume Group" version = 1 creation_time = 1700000000"#;
        let root = parse_lvm(t).unwrap();
        let vg = &root["vg0"];
        assert_eq!(vg.num("extent_size"), Some(8192));
        let pv = Pv {
            id: "xy".into(),
            start: 1 << 20,
            metadata: None,
        };
        let mut layout = Layout::default();
        vg_volumes("vg0", vg, &[pv], &mut layout);
        assert_eq!(layout.volumes.len(), 1, "{layout:?}");
        let v = &layout.volumes[0];
        assert_eq!(v.name, "vg0-root");
        assert_eq!(v.size, 8 << 20);
        assert_eq!(
            v.extents[0].disk_offset,
            (1 << 20) + 2048 * 512 + 3 * (4 << 20)
        );
        assert!(parse_lvm("vg { a = [ 1, ").is_err());
        assert!(parse_lvm(&"a { ".repeat(100)).is_err());
    }

    struct Mem(Vec<u8>);
    impl DiskRead for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            buf.fill(0);
            let o = offset as usize;
            if o < self.0.len() {
                let n = buf.len().min(self.0.len() - o);
                buf[..n].copy_from_slice(&self.0[o..o + n]);
            }
            Ok(())
        }
    }

    proptest::proptest! {
        /// Hostile tables (random bytes behind valid signatures) never panic or loop.
        #[test]
        fn hostile_tables_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 4096), kind in 0u8..4) {
            let mut d = vec![0u8; 1 << 20];
            d[..4096].copy_from_slice(&body);
            match kind {
                0 => { d[510] = 0x55; d[511] = 0xAA; d[450] = 0x05; }
                1 => d[512..520].copy_from_slice(b"EFI PART"),
                2 => { d[512..520].copy_from_slice(b"LABELONE"); d[536..544].copy_from_slice(b"LVM2 001"); }
                _ => {}
            }
            let _ = discover(&Mem(d));
        }
    }

    #[test]
    fn an_extended_partition_that_loops_is_listed_as_damaged() {
        let mut d = vec![0u8; 1 << 20];
        d[510] = 0x55;
        d[511] = 0xAA;
        // p1: extended at sector 8; its EBR points back to itself as the next EBR.
        d[446 + 4] = 0x05;
        d[446 + 8..446 + 12].copy_from_slice(&8u32.to_le_bytes());
        d[446 + 12..446 + 16].copy_from_slice(&100u32.to_le_bytes());
        let ebr = 8 * 512;
        d[ebr + 510] = 0x55;
        d[ebr + 511] = 0xAA;
        d[ebr + 446 + 4] = 0x83;
        d[ebr + 446 + 8..ebr + 446 + 12].copy_from_slice(&1u32.to_le_bytes());
        d[ebr + 446 + 12..ebr + 446 + 16].copy_from_slice(&10u32.to_le_bytes());
        d[ebr + 462 + 4] = 0x05;
        d[ebr + 462 + 12..ebr + 462 + 16].copy_from_slice(&10u32.to_le_bytes());
        let l = discover(&Mem(d)).unwrap();
        assert_eq!(l.volumes.len(), 1, "{l:?}");
        assert!(l.unreadable[0].reason.contains("loops"), "{l:?}");
    }

    #[test]
    fn map_splits_across_extents() {
        let v = Volume {
            name: "x".into(),
            what: String::new(),
            size: 300,
            extents: vec![
                Extent {
                    offset: 0,
                    disk_offset: 1000,
                    len: 100,
                },
                Extent {
                    offset: 100,
                    disk_offset: 5000,
                    len: 200,
                },
            ],
            content: None,
        };
        assert_eq!(v.map(50, 100), vec![(1050, 50), (5000, 50)]);
        assert_eq!(v.map(250, 100), vec![(5150, 50)]);
        assert!(v.map(300, 10).is_empty());
    }
}
