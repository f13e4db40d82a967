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
//!
//! Everything here reads a guest's disk, which is untrusted: a partition table or LVM metadata
//! may say anything. So every offset is computed with checked arithmetic, every allocation is
//! bounded by a constant or by what the disk's size justifies, the LVM text parser bounds its
//! nesting ([`MAX_LVM_DEPTH`]), and a [`Volume`] is validated when it is built (pieces in
//! order, contiguous from 0, inside the disk; for an LV, inside its PV). Anything that fails is
//! an [`Unreadable`] entry with the reason; nothing panics. `fuzz/fuzz_targets/volumes.rs` and
//! `lvm_text.rs` exercise this.
//!
//! LVM2's on-disk format, as read here (from LVM2's `label.h`, `layout.h`): a 512-byte label in
//! one of the PV's first four sectors (`LABELONE`, its sector, a CRC of bytes 20..512, the PV
//! header's offset, `LVM2 001`); the PV header (uuid, size, zero-terminated lists of data and
//! metadata areas as byte offset/size pairs from the PV's start); each metadata area starts with
//! a 512-byte header (CRC of bytes 4..512, magic, version 1, the area's start and size, then
//! the location of the current text: offset in the area, size, CRC, flags), the text lying in
//! a circular buffer after the header. The CRCs are CRC-32 (IEEE) started at `0xf597a6cf`
//! without the final inversion.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;

use serde::Serialize;

const SECTOR: u64 = 512;
/// Extended-partition chains longer than this are treated as damaged (loops).
const MAX_LOGICAL: usize = 128;
/// GPT headers announcing more entries than this are damaged (tools write 128).
const MAX_GPT_ENTRIES: u64 = 1024;
/// Largest LVM metadata text accepted (real ones are a few KiB; the default area is 1 MiB).
const MAX_LVM_TEXT: u64 = 4 << 20;
/// Deepest nesting of sections and lists accepted in LVM metadata text (real metadata nests
/// 4 deep: VG, logical_volumes, LV, segment).
pub const MAX_LVM_DEPTH: usize = 32;
/// The magic of an LVM2 metadata area header.
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";

/// One contiguous piece of a volume: `len` bytes from volume offset `offset`, at
/// `disk_offset` on the disk (linear), or dealt in `chunk`-byte chunks in turn over the stripes
/// starting at the disk offsets in `stripes` (striped; `disk_offset` is then `stripes[0]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// Offset in the volume.
    pub offset: u64,
    /// Offset in the disk (of the first stripe, if striped).
    pub disk_offset: u64,
    pub len: u64,
    /// Striped: where each stripe starts on the disk; empty for a linear piece.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stripes: Vec<u64>,
    /// Striped: bytes per chunk (0 for a linear piece).
    #[serde(skip_serializing_if = "is_zero")]
    pub chunk: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Extent {
    /// `len` bytes at volume offset `offset`, in one piece at `disk_offset`.
    pub fn linear(offset: u64, disk_offset: u64, len: u64) -> Extent {
        Extent {
            offset,
            disk_offset,
            len,
            stripes: Vec::new(),
            chunk: 0,
        }
    }
}

/// Why a list of extents does not make a readable volume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    #[error("it has no data (no extents)")]
    Empty,
    #[error("piece {index} is empty")]
    EmptyPiece { index: usize },
    #[error(
        "piece {index} starts at volume byte {offset} where {expected} was expected: its pieces overlap or leave a gap"
    )]
    NotContiguous {
        index: usize,
        offset: u64,
        expected: u64,
    },
    #[error("piece {index} reaches past 2^64 bytes")]
    Overflow { index: usize },
    #[error("piece {index} lies at disk bytes {start}..{end}, outside the {disk}-byte disk")]
    OutsideDisk {
        index: usize,
        start: u64,
        end: u64,
        disk: u64,
    },
    #[error(
        "piece {index} ({len} bytes) does not divide into {stripes} stripes of {chunk}-byte chunks"
    )]
    BadStripes {
        index: usize,
        len: u64,
        stripes: usize,
        chunk: u64,
    },
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
            let striped = v.extents.iter().map(|e| e.stripes.len()).max().unwrap_or(0);
            out.push_str(&format!(
                "{:<20} {:<9} {:>14} bytes  {}{}\n",
                format!("{}.raw", v.name),
                v.content.as_deref().unwrap_or("-"),
                v.size,
                v.what,
                if striped > 1 {
                    format!(" (striped over {striped})")
                } else if v.extents.len() > 1 {
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
    /// A volume made of `extents`, checked: at least one, each non-empty, in order and
    /// contiguous from volume offset 0, striping that divides evenly, and every disk byte
    /// inside a disk of `disk_size` bytes. Its size is where the last extent ends.
    pub fn new(
        name: String,
        what: String,
        extents: Vec<Extent>,
        content: Option<String>,
        disk_size: u64,
    ) -> Result<Volume, ExtentError> {
        let mut expected = 0u64;
        for (index, e) in extents.iter().enumerate() {
            if e.len == 0 {
                return Err(ExtentError::EmptyPiece { index });
            }
            if e.offset != expected {
                return Err(ExtentError::NotContiguous {
                    index,
                    offset: e.offset,
                    expected,
                });
            }
            expected = e
                .offset
                .checked_add(e.len)
                .ok_or(ExtentError::Overflow { index })?;
            // Each stripe (a linear piece is one) holds `per` bytes from its start.
            let (starts, per): (&[u64], u64) = if e.stripes.is_empty() {
                (std::slice::from_ref(&e.disk_offset), e.len)
            } else {
                let n = e.stripes.len() as u64;
                let bad = ExtentError::BadStripes {
                    index,
                    len: e.len,
                    stripes: e.stripes.len(),
                    chunk: e.chunk,
                };
                let row = e.chunk.checked_mul(n).ok_or(bad.clone())?;
                if row == 0 || !e.len.is_multiple_of(row) || e.stripes[0] != e.disk_offset {
                    return Err(bad);
                }
                (&e.stripes, e.len / n)
            };
            for &start in starts {
                match start.checked_add(per) {
                    Some(end) if end <= disk_size => {}
                    end => {
                        return Err(ExtentError::OutsideDisk {
                            index,
                            start,
                            end: end.unwrap_or(u64::MAX),
                            disk: disk_size,
                        });
                    }
                }
            }
        }
        if extents.is_empty() {
            return Err(ExtentError::Empty);
        }
        Ok(Volume {
            name,
            what,
            size: expected,
            extents,
            content,
        })
    }

    /// Map `[offset, offset+len)` of the volume onto disk ranges `(disk offset, length)`, in
    /// order, adjacent ranges merged. They cover a contiguous start of the range: all of it up
    /// to the volume's end. (For extents not built by [`Volume::new`] that overlap, leave gaps
    /// or wrap, the mapping stops at the first inconsistency: it never panics, never returns
    /// more than `len` bytes in all, and never maps a byte to the wrong place.)
    pub fn map(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (d, l) in self.pieces(offset, len) {
            match out.last_mut() {
                Some((pd, pl)) if pd.checked_add(*pl) == Some(d) => *pl += l,
                _ => out.push((d, l)),
            }
        }
        out
    }

    /// The disk ranges of `[offset, offset+len)` one at a time (one per stripe chunk), as
    /// [`Volume::map`] without collecting them: for long ranges of striped volumes.
    pub fn pieces(&self, offset: u64, len: u64) -> Pieces<'_> {
        Pieces {
            volume: self,
            pos: offset,
            end: offset.saturating_add(len).min(self.size),
            index: self
                .extents
                .partition_point(|e| e.offset.saturating_add(e.len) <= offset),
        }
    }
}

/// Iterator of [`Volume::pieces`].
pub struct Pieces<'a> {
    volume: &'a Volume,
    pos: u64,
    end: u64,
    index: usize,
}

impl Pieces<'_> {
    fn step(&mut self) -> Option<(u64, u64)> {
        if self.pos >= self.end {
            return None;
        }
        let e = self.volume.extents.get(self.index)?;
        let e_end = e.offset.checked_add(e.len)?;
        if e.offset > self.pos || e_end <= self.pos {
            return None;
        }
        let until = self.end.min(e_end);
        let rel = self.pos - e.offset;
        let (disk, len) = if e.stripes.is_empty() {
            (e.disk_offset.checked_add(rel)?, until - self.pos)
        } else {
            let n = e.stripes.len() as u64;
            let chunk = e.chunk;
            if chunk == 0 {
                return None;
            }
            let (idx, within) = (rel / chunk, rel % chunk);
            let stripe = *e.stripes.get(usize::try_from(idx % n).ok()?)?;
            let disk = stripe
                .checked_add((idx / n).checked_mul(chunk)?)?
                .checked_add(within)?;
            (disk, (chunk - within).min(until - self.pos))
        };
        self.pos += len;
        if self.pos >= e_end {
            self.index += 1;
        }
        Some((disk, len))
    }
}

impl Iterator for Pieces<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        let piece = self.step();
        if piece.is_none() {
            self.end = self.pos; // fused: an inconsistency ends the mapping for good
        }
        piece
    }
}

/// Reads of the disk being examined.
pub trait DiskRead {
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; past the end reads as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// `len` bytes at `offset` (callers pass bounded lengths: a sector, a table, a metadata text).
fn read(d: &dyn DiskRead, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    if offset < d.size() {
        d.read_at(&mut b, offset)?;
    }
    Ok(b)
}

/// Little-endian fields of a buffer; bytes past its end read as zero.
fn le_bytes<const N: usize>(b: &[u8], o: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(s) = o.checked_add(N).and_then(|end| b.get(o..end)) {
        out.copy_from_slice(s);
    }
    out
}
fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(le_bytes(b, o))
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(le_bytes(b, o))
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(le_bytes(b, o))
}
/// Whether `b[o..]` starts with `magic`.
fn has(b: &[u8], o: usize, magic: &[u8]) -> bool {
    b.get(o..).is_some_and(|s| s.starts_with(magic))
}

/// CRC-32 (IEEE, reflected) lookup table.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// LVM2's checksum (`calc_crc`): CRC-32 from `0xf597a6cf`, without the final inversion.
/// Continue a checksum over more bytes by passing the previous result as `crc`.
fn lvm_crc(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = CRC_TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}
const LVM_CRC_INIT: u32 = 0xf597_a6cf;

/// What the first bytes of a region show.
pub fn sniff(d: &dyn DiskRead, start: u64) -> io::Result<Option<String>> {
    let at = |o: u64| start.saturating_add(o);
    let head = read(d, start, 4096)?;
    let sb = read(d, at(1024), 1024)?;
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
    if has(&head, 0, b"XFSB") {
        return Ok(Some("xfs".into()));
    }
    if has(&head, 3, b"NTFS    ") {
        return Ok(Some("ntfs".into()));
    }
    if has(&head, 3, b"-FVE-FS-") {
        return Ok(Some("bitlocker".into()));
    }
    if has(&head, 0, b"LUKS\xba\xbe") {
        return Ok(Some("luks".into()));
    }
    if has(&head, 4086, b"SWAPSPACE2") {
        return Ok(Some("swap".into()));
    }
    for s in 0..4u64 {
        let b = read(d, at(s * SECTOR), SECTOR as usize)?;
        if has(&b, 0, b"LABELONE") && has(&b, 24, b"LVM2 001") {
            return Ok(Some("lvm2 pv".into()));
        }
    }
    let btrfs = read(d, at(0x10040), 8)?;
    if has(&btrfs, 0, b"_BHRfS_M") {
        return Ok(Some("btrfs".into()));
    }
    if le16(&head, 510) == 0xAA55 && (has(&head, 54, b"FAT") || has(&head, 82, b"FAT32")) {
        return Ok(Some("vfat".into()));
    }
    Ok(None)
}

/// A partition found in a table: name, what, byte range on the disk.
struct Part {
    name: String,
    what: String,
    start: u64,
    len: u64,
}

/// Find every volume of the disk. Damage in the guest's tables or metadata never fails this:
/// it becomes an [`Unreadable`] entry saying what is wrong. Only a failed read of the disk
/// itself is an error.
pub fn discover(d: &dyn DiskRead) -> io::Result<Layout> {
    let disk = d.size();
    let mut layout = Layout::default();
    let mbr = read(d, 0, SECTOR as usize)?;
    let gpt = read(d, SECTOR, SECTOR as usize)?;
    let mut parts: Vec<Part> = Vec::new();
    if has(&gpt, 0, b"EFI PART") {
        layout.scheme = "gpt".into();
        gpt_partitions(d, &gpt, &mut parts, &mut layout.unreadable)?;
    } else if le16(&mbr, 510) == 0xAA55 && sniff(d, 0)?.is_none() {
        layout.scheme = "mbr".into();
        mbr_partitions(d, &mbr, &mut parts, &mut layout.unreadable)?;
    } else {
        layout.scheme = "none".into();
        layout.content = sniff(d, 0)?;
        if layout.content.as_deref() == Some("lvm2 pv") {
            parts.push(Part {
                name: "disk".into(),
                what: "whole disk".into(),
                start: 0,
                len: disk,
            });
        }
    }
    // Partitions outside the disk, empty, or overlapping another are damage.
    let mut inside = Vec::new();
    for p in parts {
        match p.start.checked_add(p.len) {
            Some(end) if end <= disk && p.len > 0 => inside.push(p),
            end => layout.unreadable.push(Unreadable {
                reason: match end {
                    _ if p.len == 0 => "it is empty: damaged partition table".into(),
                    Some(end) => format!(
                        "it lies outside the disk (bytes {}..{end} of a {disk}-byte disk): damaged partition table",
                        p.start
                    ),
                    None => format!(
                        "it starts at byte {} and is {} bytes long, past any disk: damaged partition table",
                        p.start, p.len
                    ),
                },
                name: p.name,
                what: p.what,
            }),
        }
    }
    let overlaps = overlapping(&inside);
    let mut pvs = Vec::new();
    for (p, other) in inside.into_iter().zip(overlaps) {
        if let Some(o) = other {
            layout.unreadable.push(Unreadable {
                reason: format!(
                    "it overlaps {} (bytes {}..{} and {}..{}): damaged partition table",
                    o.0,
                    p.start,
                    p.start + p.len,
                    o.1,
                    o.2
                ),
                name: p.name,
                what: p.what,
            });
            continue;
        }
        let content = sniff(d, p.start)?;
        if content.as_deref() == Some("lvm2 pv") {
            pvs.push((p.name.clone(), p.start, p.len));
        }
        if p.name == "disk" {
            continue;
        }
        let extents = vec![Extent::linear(0, p.start, p.len)];
        match Volume::new(p.name.clone(), p.what.clone(), extents, content, disk) {
            Ok(v) => layout.volumes.push(v),
            Err(e) => layout.unreadable.push(Unreadable {
                name: p.name,
                what: p.what,
                reason: format!("{e}: damaged partition table"),
            }),
        }
    }
    lvm_volumes(d, &pvs, &mut layout)?;
    for v in &mut layout.volumes {
        if v.what.starts_with("lvm2") {
            v.content = sniff_volume(d, v)?;
        }
    }
    // Two volumes of one name (VG "a-b" LV "c" and VG "a" LV "b-c") cannot both be files.
    let mut names = HashSet::new();
    let (volumes, repeated): (Vec<Volume>, Vec<Volume>) = std::mem::take(&mut layout.volumes)
        .into_iter()
        .partition(|v| names.insert(v.name.clone()));
    layout.volumes = volumes;
    for v in repeated {
        layout.unreadable.push(Unreadable {
            name: v.name,
            what: v.what,
            reason: "another volume has the same name".into(),
        });
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

/// For each partition (all inside the disk), another one it overlaps: (name, start, end).
fn overlapping(parts: &[Part]) -> Vec<Option<(String, u64, u64)>> {
    let mut out = vec![None; parts.len()];
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by_key(|&i| (parts[i].start, i));
    // The partition reaching furthest so far: any later start before its end overlaps it.
    let mut reach: Option<(usize, u64)> = None;
    for &i in &order {
        let p = &parts[i];
        let end = p.start + p.len; // checked by the caller: inside the disk
        if let Some((j, r)) = reach {
            if p.start < r {
                let q = &parts[j];
                out[i] = Some((q.name.clone(), q.start, q.start + q.len));
                if out[j].is_none() {
                    out[j] = Some((p.name.clone(), p.start, end));
                }
            }
            if end <= r {
                continue;
            }
        }
        reach = Some((i, end));
    }
    out
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
                let end = usize::try_from(l).ok().and_then(|l| at.checked_add(l));
                let Some(piece) = end.and_then(|end| buf.get_mut(at..end)) else {
                    break;
                };
                self.d.read_at(piece, o)?;
                at += piece.len();
            }
            Ok(())
        }
    }
    sniff(&View { d, v }, 0)
}

fn mbr_partitions(
    d: &dyn DiskRead,
    mbr: &[u8],
    parts: &mut Vec<Part>,
    bad: &mut Vec<Unreadable>,
) -> io::Result<()> {
    let mut logical = Vec::new();
    let mut next_logical = 5;
    for i in 0..4 {
        let e = 446 + i * 16;
        let kind = mbr.get(e + 4).copied().unwrap_or(0);
        // 32-bit sector numbers times 512 always fit in u64.
        let start = u64::from(le32(mbr, e + 8)) * SECTOR;
        let len = u64::from(le32(mbr, e + 12)) * SECTOR;
        if kind == 0 || len == 0 {
            continue;
        }
        let name = format!("p{}", i + 1);
        if matches!(kind, 0x05 | 0x0f | 0x85) {
            // Logical partitions (p5 on) come after the primaries, as the guest numbers them.
            logical_partitions(d, start, len, &mut next_logical, &mut logical, bad)?;
            continue;
        }
        parts.push(Part {
            name,
            what: format!("mbr partition, type 0x{kind:02x}"),
            start,
            len,
        });
    }
    parts.extend(logical);
    Ok(())
}

/// Walk the chain of extended boot records; logical partitions are numbered from 5. Each
/// must lie inside the extended partition (`ext_start`, `ext_len` bytes).
fn logical_partitions(
    d: &dyn DiskRead,
    ext_start: u64,
    ext_len: u64,
    n: &mut usize,
    parts: &mut Vec<Part>,
    bad: &mut Vec<Unreadable>,
) -> io::Result<()> {
    let ext_end = ext_start.saturating_add(ext_len).min(d.size());
    let mut ebr = ext_start;
    let mut seen = HashSet::new();
    loop {
        if !seen.insert(ebr) || seen.len() > MAX_LOGICAL || ebr >= ext_end {
            bad.push(Unreadable {
                name: format!("p{n}"),
                what: "extended partition".into(),
                reason: "the chain of logical partitions loops or leaves the extended partition or the disk: damaged table; the partitions before it are listed".into(),
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
        let (k1, k2) = (b.get(446 + 4).copied(), b.get(462 + 4).copied());
        let len = u64::from(le32(&b, 446 + 12)) * SECTOR;
        if k1.is_some_and(|k| k != 0) && len > 0 {
            let what = format!("mbr logical partition, type 0x{:02x}", k1.unwrap_or(0));
            let start = ebr.checked_add(u64::from(le32(&b, 446 + 8)) * SECTOR);
            match start {
                Some(start) if start >= ext_start && start.saturating_add(len) <= ext_end => {
                    parts.push(Part {
                        name: format!("p{n}"),
                        what,
                        start,
                        len,
                    })
                }
                _ => bad.push(Unreadable {
                    name: format!("p{n}"),
                    what,
                    reason: format!(
                        "it lies outside its extended partition (bytes {ext_start}..{ext_end}): damaged table"
                    ),
                }),
            }
            *n += 1;
        }
        if k2.is_none_or(|k| k == 0) || le32(&b, 462 + 12) == 0 {
            return Ok(());
        }
        match ext_start.checked_add(u64::from(le32(&b, 462 + 8)) * SECTOR) {
            Some(next) => ebr = next,
            None => ebr = u64::MAX,
        }
    }
}

fn gpt_partitions(
    d: &dyn DiskRead,
    hdr: &[u8],
    parts: &mut Vec<Part>,
    bad: &mut Vec<Unreadable>,
) -> io::Result<()> {
    let entries_lba = le64(hdr, 72);
    let count = u64::from(le32(hdr, 80));
    let size = u64::from(le32(hdr, 84));
    let damaged = |bad: &mut Vec<Unreadable>, reason: String| {
        bad.push(Unreadable {
            name: "gpt".into(),
            what: "GPT header".into(),
            reason,
        })
    };
    if !(128..=4096).contains(&size) || count > MAX_GPT_ENTRIES {
        damaged(
            bad,
            format!("{count} entries of {size} bytes: damaged header"),
        );
        return Ok(());
    }
    // At most 1024 × 4096 bytes: 4 MiB.
    let table_len = count * size;
    let table_at = entries_lba.checked_mul(SECTOR);
    match table_at.and_then(|t| t.checked_add(table_len)) {
        Some(end) if end <= d.size() => {}
        _ => {
            damaged(
                bad,
                format!(
                    "its partition entries at LBA {entries_lba} ({table_len} bytes) lie outside the {}-byte disk: damaged header",
                    d.size()
                ),
            );
            return Ok(());
        }
    }
    let (Some(table_at), Ok(table_len), Ok(entry_len)) =
        (table_at, usize::try_from(table_len), usize::try_from(size))
    else {
        return Ok(());
    };
    let table = read(d, table_at, table_len)?;
    for (i, e) in table.chunks_exact(entry_len).enumerate() {
        if e.iter().take(16).all(|&b| b == 0) {
            continue;
        }
        let name = format!("p{}", i + 1);
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
                name,
                what,
                reason: format!(
                    "it ends (LBA {last}) before it starts (LBA {first}): damaged table"
                ),
            });
            continue;
        }
        let range = first.checked_mul(SECTOR).zip(
            (last - first)
                .checked_add(1)
                .and_then(|n| n.checked_mul(SECTOR)),
        );
        match range {
            Some((start, len)) => parts.push(Part {
                name,
                what,
                start,
                len,
            }),
            None => bad.push(Unreadable {
                name,
                what,
                reason: format!("it lies at LBA {first}..={last}, past any disk: damaged table"),
            }),
        }
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
    /// A count or size field: present, a number, not negative.
    fn unsigned(&self, k: &str) -> Option<u64> {
        u64::try_from(self.num(k)?).ok()
    }
    fn str(&self, k: &str) -> Option<&str> {
        match self.get(k)? {
            Val::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Why LVM2 metadata text does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LvmTextError {
    #[error("sections or lists nested more than {MAX_LVM_DEPTH} deep at byte {at}")]
    TooDeep { at: usize },
    #[error("at byte {at}: {what}")]
    Syntax { at: usize, what: String },
}

/// A recursive-descent parser of LVM2 metadata text (`name { key = value ... }`, lists,
/// strings, numbers, `#` comments), bounded in depth by [`MAX_LVM_DEPTH`]; its memory is a
/// small multiple of the text's length.
struct LvmParser<'a> {
    b: &'a [u8],
    at: usize,
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || matches!(c, b'_' | b'.' | b'+')
}
fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'+' | b'-')
}

impl LvmParser<'_> {
    fn err<T>(&self, what: impl Into<String>) -> Result<T, LvmTextError> {
        Err(LvmTextError::Syntax {
            at: self.at,
            what: what.into(),
        })
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }
    fn skip_blank(&mut self) {
        while let Some(c) = self.peek() {
            if c == b'#' {
                while self.peek().is_some_and(|c| c != b'\n') {
                    self.at += 1;
                }
            } else if c.is_ascii_whitespace() || c == 0 {
                self.at += 1;
            } else {
                break;
            }
        }
    }
    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> String {
        let start = self.at;
        while self.peek().is_some_and(&f) {
            self.at += 1;
        }
        String::from_utf8_lossy(self.b.get(start..self.at).unwrap_or_default()).into_owned()
    }
    fn check_depth(&self, depth: usize) -> Result<(), LvmTextError> {
        if depth > MAX_LVM_DEPTH {
            return Err(LvmTextError::TooDeep { at: self.at });
        }
        Ok(())
    }

    /// `key = value` and `name { ... }` items up to a `}` or the end.
    fn body(&mut self, depth: usize) -> Result<BTreeMap<String, Val>, LvmTextError> {
        self.check_depth(depth)?;
        let mut m = BTreeMap::new();
        loop {
            self.skip_blank();
            match self.peek() {
                None | Some(b'}') => return Ok(m),
                Some(c) if ident_start(c) => {
                    let name = self.take_while(ident_char);
                    self.skip_blank();
                    match self.peek() {
                        Some(b'{') => {
                            self.at += 1;
                            let body = self.body(depth + 1)?;
                            if self.peek() != Some(b'}') {
                                return self.err(format!("section {name} is not closed"));
                            }
                            self.at += 1;
                            m.insert(name, Val::Section(body));
                        }
                        Some(b'=') => {
                            self.at += 1;
                            let v = self.value(depth + 1)?;
                            m.insert(name, v);
                        }
                        _ => return self.err(format!("expected {{ or = after {name}")),
                    }
                }
                Some(c) => return self.err(format!("unexpected {:?}", char::from(c))),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Val, LvmTextError> {
        self.check_depth(depth)?;
        self.skip_blank();
        match self.peek() {
            Some(b'"') => {
                self.at += 1;
                let mut s = Vec::new();
                loop {
                    match self.peek() {
                        Some(b'\\') => {
                            self.at += 1;
                            if let Some(c) = self.peek() {
                                s.push(c);
                                self.at += 1;
                            }
                        }
                        Some(b'"') => {
                            self.at += 1;
                            break;
                        }
                        Some(c) => {
                            s.push(c);
                            self.at += 1;
                        }
                        None => return self.err("unterminated string"),
                    }
                }
                Ok(Val::Str(String::from_utf8_lossy(&s).into_owned()))
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_blank();
                    match self.peek() {
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Val::List(items));
                        }
                        Some(b',') => self.at += 1,
                        Some(_) => items.push(self.value(depth + 1)?),
                        None => return self.err("list is not closed"),
                    }
                }
            }
            Some(c) if c.is_ascii_digit() || c == b'-' => {
                let at = self.at;
                let s = self.take_while(|c| c.is_ascii_digit() || c == b'-' || c == b'.');
                if s.contains('.') {
                    // A decimal (LVM writes none in metadata): kept as text, never a size.
                    if s.parse::<f64>().is_err() {
                        self.at = at;
                        return self.err(format!("bad number {s}"));
                    }
                    return Ok(Val::Str(s));
                }
                match s.parse::<i64>() {
                    Ok(n) => Ok(Val::Num(n)),
                    Err(_) => {
                        let what = format!("bad or out-of-range number {s}");
                        self.at = at;
                        self.err(what)
                    }
                }
            }
            Some(c) if ident_start(c) => Ok(Val::Str(self.take_while(ident_char))),
            Some(c) => self.err(format!("unexpected {:?}", char::from(c))),
            None => self.err("value missing"),
        }
    }
}

/// Parse LVM2 metadata text.
fn parse_lvm(text: &str) -> Result<BTreeMap<String, Val>, LvmTextError> {
    let mut p = LvmParser {
        b: text.as_bytes(),
        at: 0,
    };
    let root = p.body(0)?;
    if p.peek().is_some() {
        return p.err("unexpected }");
    }
    Ok(root)
}

/// Parse LVM2 metadata `text` and map its LVs as if the PVs `pvs` (uuid, start byte, length)
/// lay on a disk of `disk_size` bytes: what [`discover`] does with the text it finds. Public
/// for the `lvm_text` fuzz target and tests.
pub fn lvm_text_layout(
    text: &str,
    pvs: &[(&str, u64, u64)],
    disk_size: u64,
) -> Result<Layout, LvmTextError> {
    let root = parse_lvm(text)?;
    let found: Vec<Pv> = pvs
        .iter()
        .map(|&(id, start, len)| Pv {
            name: id.to_string(),
            id: id.to_string(),
            start,
            len,
            metadata: None,
        })
        .collect();
    let mut layout = Layout::default();
    for (vg_name, vg) in &root {
        if let Val::Section(_) = vg {
            vg_volumes(vg_name, vg, &found, disk_size, &mut layout);
        }
    }
    Ok(layout)
}

/// A PV found on this disk: the partition holding it, its uuid, where it lies, and the
/// metadata text its first usable metadata area holds.
struct Pv {
    name: String,
    id: String,
    start: u64,
    len: u64,
    metadata: Option<String>,
}

/// Read a PV's label and, through its metadata areas, the current metadata text. Damage is
/// reported in `bad`; `None` when the label itself is damaged.
fn read_pv(
    d: &dyn DiskRead,
    name: &str,
    start: u64,
    len: u64,
    bad: &mut Vec<Unreadable>,
) -> io::Result<Option<Pv>> {
    let mut damaged = |what: &str, reason: String| {
        bad.push(Unreadable {
            name: name.to_string(),
            what: what.to_string(),
            reason,
        })
    };
    for s in 0..4u64 {
        let b = read(d, start.saturating_add(s * SECTOR), SECTOR as usize)?;
        if !has(&b, 0, b"LABELONE") || !has(&b, 24, b"LVM2 001") {
            continue;
        }
        if lvm_crc(LVM_CRC_INIT, b.get(20..).unwrap_or_default()) != le32(&b, 16) {
            damaged(
                "lvm2 pv",
                format!("the checksum of its LVM label (sector {s}) does not match: damaged label"),
            );
            return Ok(None);
        }
        let off = le32(&b, 20) as usize;
        let Some(id) = off
            .checked_add(40)
            .filter(|&end| end <= b.len())
            .and_then(|_| b.get(off..off + 32))
        else {
            damaged(
                "lvm2 pv",
                format!(
                    "its LVM label puts the PV header at byte {off} of a 512-byte sector: damaged label"
                ),
            );
            return Ok(None);
        };
        let id = String::from_utf8_lossy(id).into_owned();
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
        for &(mda, mda_size) in &lists[1] {
            match read_mda(d, start, len, mda, mda_size)? {
                Ok(Some(text)) => {
                    metadata = Some(text);
                    break;
                }
                Ok(None) => {}
                Err(reason) => damaged("lvm2 metadata area", reason),
            }
        }
        return Ok(Some(Pv {
            name: name.to_string(),
            id,
            start,
            len,
            metadata,
        }));
    }
    damaged("lvm2 pv", "its LVM label is damaged".into());
    Ok(None)
}

/// The metadata text in the area at PV byte `mda` (`mda_size` bytes) of the PV at `pv_start`
/// (`pv_len` bytes): `Ok(None)` for an area that holds none (empty, or marked ignored), `Err`
/// with the reason for a damaged one.
fn read_mda(
    d: &dyn DiskRead,
    pv_start: u64,
    pv_len: u64,
    mda: u64,
    mda_size: u64,
) -> io::Result<Result<Option<String>, String>> {
    let fits = mda
        .checked_add(mda_size)
        .is_some_and(|end| end <= pv_len && mda_size >= 2 * SECTOR);
    let Some(at) = pv_start.checked_add(mda).filter(|_| fits) else {
        return Ok(Err(format!(
            "the metadata area at byte {mda} ({mda_size} bytes) lies outside the {pv_len}-byte PV: damaged label"
        )));
    };
    let h = read(d, at, SECTOR as usize)?;
    if !has(&h, 4, MDA_MAGIC) {
        return Ok(Err(format!(
            "no metadata area header at byte {mda} of the PV: damaged metadata area"
        )));
    }
    if lvm_crc(LVM_CRC_INIT, h.get(4..).unwrap_or_default()) != le32(&h, 0) {
        return Ok(Err(format!(
            "the checksum of the metadata area header at byte {mda} of the PV does not match: damaged metadata area"
        )));
    }
    let (version, area_start, area_size) = (le32(&h, 20), le64(&h, 24), le64(&h, 32));
    if version != 1 {
        return Ok(Err(format!(
            "its metadata area header has version {version}; cbtfs knows version 1"
        )));
    }
    if area_start != mda || area_size < 2 * SECTOR || area_size > mda_size {
        return Ok(Err(format!(
            "its metadata area header says the area is at byte {area_start} ({area_size} bytes), the label at byte {mda} ({mda_size} bytes): damaged metadata area"
        )));
    }
    let (loc, len, sum, flags) = (le64(&h, 40), le64(&h, 48), le32(&h, 56), le32(&h, 60));
    if (loc == 0 && len == 0) || flags & 1 != 0 {
        return Ok(Ok(None)); // no text yet, or an area LVM is told to ignore
    }
    if len == 0
        || len > MAX_LVM_TEXT
        || loc < SECTOR
        || loc >= area_size
        || len > area_size - SECTOR
    {
        return Ok(Err(format!(
            "its metadata text ({len} bytes at byte {loc} of a {area_size}-byte area) does not fit the area or exceeds {MAX_LVM_TEXT} bytes: damaged metadata area"
        )));
    }
    // The text lives in a circular buffer after the header's sector. All of it lies inside
    // the area, which lies inside the PV, which lies inside the disk: the sums cannot wrap.
    let first = len.min(area_size - loc);
    let mut text = read(d, at + loc, first as usize)?;
    if first < len {
        text.extend(read(d, at + SECTOR, (len - first) as usize)?);
    }
    if lvm_crc(LVM_CRC_INIT, &text) != sum {
        return Ok(Err(format!(
            "the checksum of its metadata text ({len} bytes at byte {loc} of the area) does not match: damaged metadata"
        )));
    }
    let t = String::from_utf8_lossy(&text)
        .trim_end_matches('\0')
        .to_string();
    Ok(Ok(Some(t)))
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
    for (name, start, len) in pvs {
        if let Some(pv) = read_pv(d, name, *start, *len, &mut layout.unreadable)? {
            found.push(pv);
        }
    }
    let mut done = BTreeSet::new();
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
                    reason: format!("cannot parse the volume group metadata on {}: {e}", pv.name),
                });
                continue;
            }
        };
        for (vg_name, vg) in &root {
            let Val::Section(_) = vg else { continue };
            if !done.insert(vg_name.clone()) {
                continue;
            }
            vg_volumes(vg_name, vg, &found, d.size(), layout);
        }
    }
    Ok(())
}

/// Where a PV named in a VG's metadata lies on this disk: (first extent's byte, PV's end).
type PvPlace = Option<(u64, u64)>;

fn vg_volumes(vg_name: &str, vg: &Val, found: &[Pv], disk_size: u64, layout: &mut Layout) {
    let extent = vg
        .unsigned("extent_size")
        .and_then(|n| n.checked_mul(SECTOR))
        .filter(|&n| n > 0);
    // PV name in the metadata (pv0) → where its extents start on this disk, and its end.
    let mut pv_at: BTreeMap<String, PvPlace> = BTreeMap::new();
    if let Some(Val::Section(pvs)) = vg.get("physical_volumes") {
        for (k, p) in pvs {
            let id = p.str("id").map(strip_dashes).unwrap_or_default();
            let place = found
                .iter()
                .find(|f| strip_dashes(&f.id) == id)
                .and_then(|f| {
                    let pe = p.unsigned("pe_start")?.checked_mul(SECTOR)?;
                    Some((f.start.checked_add(pe)?, f.start.checked_add(f.len)?))
                });
            pv_at.insert(k.clone(), place);
        }
    }
    let Some(Val::Section(lvs)) = vg.get("logical_volumes") else {
        return;
    };
    for (lv_name, lv) in lvs {
        let name = format!("{vg_name}-{lv_name}");
        let what = format!("lvm2 lv {vg_name}/{lv_name}");
        let visible = matches!(lv.get("status"), Some(Val::List(l)) if l.contains(&Val::Str("VISIBLE".into())));
        let result = match extent {
            None => {
                Err("the volume group's extent size is missing or zero: damaged metadata".into())
            }
            Some(extent) => lv_extents(lv, extent, &pv_at),
        }
        .and_then(|extents| {
            if visible {
                Ok(extents)
            } else {
                Err("a hidden LV (part of another LV: pool, mirror or snapshot)".into())
            }
        })
        .and_then(|extents| {
            Volume::new(name.clone(), what.clone(), extents, None, disk_size)
                .map_err(|e| format!("{e}: damaged metadata"))
        });
        match result {
            Ok(v) => layout.volumes.push(v),
            Err(reason) => layout.unreadable.push(Unreadable { name, what, reason }),
        }
    }
}

/// An LV's extents from its segments (`extent` bytes per LVM extent), each checked to lie
/// inside its PV; adjacent linear pieces merged.
fn lv_extents(
    lv: &Val,
    extent: u64,
    pv_at: &BTreeMap<String, PvPlace>,
) -> Result<Vec<Extent>, String> {
    let count = lv.unsigned("segment_count").unwrap_or(0);
    if count == 0 {
        return Err("it has no segments: damaged metadata".into());
    }
    let mut extents: Vec<Extent> = Vec::new();
    let mut next_extent = 0u64;
    // Each segment must be present: the loop ends at the first missing one, so its length is
    // bounded by the text's.
    for s in 1..=count {
        let Some(seg) = lv.get(&format!("segment{s}")) else {
            return Err(format!("segment {s} is missing: damaged metadata"));
        };
        let kind = seg.str("type").unwrap_or("");
        if kind != "striped" {
            return Err(format!(
                "a {} segment: cbtfs maps linear and striped LVs only",
                kind.escape_debug()
            ));
        }
        let (Some(first), Some(count)) =
            (seg.unsigned("start_extent"), seg.unsigned("extent_count"))
        else {
            return Err(format!(
                "segment {s} has no start_extent or extent_count: damaged metadata"
            ));
        };
        if first != next_extent {
            return Err(format!(
                "segment {s} starts at extent {first} where {next_extent} was expected: its segments overlap or leave a gap (damaged metadata)"
            ));
        }
        let too_big =
            || format!("segment {s} ({count} extents) is larger than any disk: damaged metadata");
        next_extent = first.checked_add(count).ok_or_else(too_big)?;
        let start = first.checked_mul(extent).ok_or_else(too_big)?;
        let len = count.checked_mul(extent).ok_or_else(too_big)?;
        start.checked_add(len).ok_or_else(too_big)?;
        if len == 0 {
            return Err(format!("segment {s} is empty: damaged metadata"));
        }
        let stripes: Vec<(&str, u64)> = match seg.get("stripes") {
            Some(Val::List(l)) => l
                .chunks(2)
                .map(|c| match c {
                    [Val::Str(p), Val::Num(n)] => u64::try_from(*n).ok().map(|n| (p.as_str(), n)),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    format!("segment {s} has a malformed stripes list: damaged metadata")
                })?,
            _ => Vec::new(),
        };
        if stripes.is_empty() {
            return Err(format!("segment {s} has no stripes: damaged metadata"));
        }
        if seg
            .unsigned("stripe_count")
            .is_some_and(|n| n != stripes.len() as u64)
        {
            return Err(format!(
                "segment {s} says stripe_count {} but lists {} stripes: damaged metadata",
                seg.num("stripe_count").unwrap_or(0),
                stripes.len()
            ));
        }
        let n = stripes.len() as u64;
        let chunk = if n == 1 {
            0
        } else {
            let chunk = seg
                .unsigned("stripe_size")
                .and_then(|c| c.checked_mul(SECTOR))
                .unwrap_or(0);
            match chunk.checked_mul(n) {
                Some(row) if row > 0 && len.is_multiple_of(row) => chunk,
                _ => {
                    return Err(format!(
                        "segment {s}: a striped segment with an unusual geometry"
                    ));
                }
            }
        };
        // Each stripe holds len / n bytes from its first extent, inside its PV.
        let per = len / n;
        let mut starts = Vec::with_capacity(stripes.len());
        for (p, pe) in stripes {
            let Some((base, pv_end)) = pv_at.get(p).copied().flatten() else {
                return Err(format!("it uses {p:?}, a PV that is not on this disk"));
            };
            let at = pe.checked_mul(extent).and_then(|o| base.checked_add(o));
            match at.and_then(|a| Some((a, a.checked_add(per)?))) {
                Some((a, end)) if end <= pv_end => starts.push(a),
                _ => {
                    return Err(format!(
                        "segment {s} lies outside its PV {p} (extent {pe}, {per} bytes, the PV ends at disk byte {pv_end}): damaged metadata or a PV larger than its partition"
                    ));
                }
            }
        }
        let piece = if n == 1 {
            Extent::linear(start, starts[0], len)
        } else {
            Extent {
                offset: start,
                disk_offset: starts[0],
                len,
                stripes: starts,
                chunk,
            }
        };
        // Coalesce a linear piece that continues the previous one on the disk.
        match extents.last_mut() {
            Some(l)
                if l.stripes.is_empty()
                    && piece.stripes.is_empty()
                    && l.disk_offset.checked_add(l.len) == Some(piece.disk_offset) =>
            {
                l.len += piece.len
            }
            _ => extents.push(piece),
        }
    }
    Ok(extents)
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
            name: "p1".into(),
            id: "xy".into(),
            start: 1 << 20,
            len: 64 << 20,
            metadata: None,
        };
        let mut layout = Layout::default();
        vg_volumes("vg0", vg, &[pv], 1 << 30, &mut layout);
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
            extents: vec![Extent::linear(0, 1000, 100), Extent::linear(100, 5000, 200)],
            content: None,
        };
        assert_eq!(v.map(50, 100), vec![(1050, 50), (5000, 50)]);
        assert_eq!(v.map(250, 100), vec![(5150, 50)]);
        assert!(v.map(300, 10).is_empty());
    }
}

/// Regression tests for hostile guest disks (issue #16): each builds the bytes that broke an
/// older parser and checks the damage is listed with its reason, nothing panics, nothing
/// allocates beyond what the disk justifies.
#[cfg(test)]
mod hostile {
    use super::*;

    struct Mem(Vec<u8>);
    impl DiskRead for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            buf.fill(0);
            let o = usize::try_from(offset).unwrap();
            if o < self.0.len() {
                let n = buf.len().min(self.0.len() - o);
                buf[..n].copy_from_slice(&self.0[o..o + n]);
            }
            Ok(())
        }
    }

    const PV_ID: &str = "AAAAAABBBBBBCCCCCCDDDDDDEEEEEEFF";
    /// Where the metadata area lies in the test PV, and its size.
    const MDA: usize = 4096;
    const MDA_SIZE: usize = 64 << 10;

    fn put(d: &mut [u8], at: usize, bytes: &[u8]) {
        d[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A disk of `len` bytes that is one whole LVM PV (label in sector 1) whose metadata area
    /// at byte 4096 holds `text`; data from byte 1 MiB (`pe_start = 2048`).
    fn lvm_disk(len: usize, text: &str) -> Vec<u8> {
        let mut d = vec![0u8; len];
        let l = 512;
        put(&mut d, l, b"LABELONE");
        put(&mut d, l + 8, &1u64.to_le_bytes());
        put(&mut d, l + 20, &32u32.to_le_bytes());
        put(&mut d, l + 24, b"LVM2 001");
        let h = l + 32;
        put(&mut d, h, PV_ID.as_bytes());
        put(&mut d, h + 32, &(len as u64).to_le_bytes());
        // One data area (1 MiB on), end; one metadata area, end.
        put(&mut d, h + 40, &(1u64 << 20).to_le_bytes());
        put(&mut d, h + 72, &(MDA as u64).to_le_bytes());
        put(&mut d, h + 80, &(MDA_SIZE as u64).to_le_bytes());
        let crc = lvm_crc(LVM_CRC_INIT, &d[l + 20..l + 512]);
        put(&mut d, l + 16, &crc.to_le_bytes());
        put_text(&mut d, text);
        d
    }

    /// (Re)write the metadata area header and its text.
    fn put_text(d: &mut [u8], text: &str) {
        let m = MDA;
        put(d, m + 4, MDA_MAGIC);
        put(d, m + 20, &1u32.to_le_bytes());
        put(d, m + 24, &(MDA as u64).to_le_bytes());
        put(d, m + 32, &(MDA_SIZE as u64).to_le_bytes());
        put(d, m + 40, &512u64.to_le_bytes());
        put(d, m + 48, &(text.len() as u64).to_le_bytes());
        put(
            d,
            m + 56,
            &lvm_crc(LVM_CRC_INIT, text.as_bytes()).to_le_bytes(),
        );
        let crc = lvm_crc(LVM_CRC_INIT, &d[m + 4..m + 512]);
        put(d, m, &crc.to_le_bytes());
        put(d, m + 512, text.as_bytes());
    }

    /// VG text with 4 KiB extents (`extent_size = 8` sectors) and the LV `root` made of
    /// `segments` (each `start_extent extent_count [stripes…]`).
    fn vg_text(segments: &[&str]) -> String {
        let mut segs = String::new();
        for (i, s) in segments.iter().enumerate() {
            segs.push_str(&format!("segment{} {{ type = \"striped\" {s} }}\n", i + 1));
        }
        format!(
            "vg0 {{ id = \"v\" seqno = 1 extent_size = 8\n\
             physical_volumes {{ pv0 {{ id = \"{PV_ID}\" pe_start = 2048 pe_count = 100 }} }}\n\
             logical_volumes {{ root {{ status = [\"READ\", \"WRITE\", \"VISIBLE\"] segment_count = {}\n{segs} }} }} }}\n\
             contents = \"Text Format Volume Group\" version = 1\n",
            segments.len()
        )
    }

    fn unreadable<'a>(l: &'a Layout, name: &str) -> &'a Unreadable {
        l.unreadable
            .iter()
            .find(|u| u.name == name)
            .unwrap_or_else(|| panic!("{name} is not listed as unreadable: {l:?}"))
    }

    #[test]
    fn a_valid_lvm_disk_maps_its_lv() {
        let text = vg_text(&["start_extent = 0 extent_count = 3 stripes = [\"pv0\", 5]"]);
        let l = discover(&Mem(lvm_disk(2 << 20, &text))).unwrap();
        assert!(l.unreadable.is_empty(), "{l:?}");
        assert_eq!(l.volumes.len(), 1, "{l:?}");
        let v = &l.volumes[0];
        assert_eq!(v.name, "vg0-root");
        assert_eq!(v.size, 3 * 4096);
        assert_eq!(
            v.extents,
            vec![Extent::linear(0, (1 << 20) + 5 * 4096, 3 * 4096)]
        );
        assert_eq!(v.map(100, 10), vec![((1 << 20) + 5 * 4096 + 100, 10)]);
    }

    #[test]
    fn deeply_nested_lvm_text_is_an_error_not_a_stack_overflow() {
        // Lists nested a million deep (the reported crash), and sections.
        for text in [
            format!("a = {}", "[".repeat(1_000_000)),
            format!("a = {}1{}", "[".repeat(5000), "]".repeat(5000)),
            "a { ".repeat(100_000),
        ] {
            match parse_lvm(&text) {
                Err(LvmTextError::TooDeep { .. }) => {}
                other => panic!("{other:?}"),
            }
        }
        // Through a disk: the metadata is listed as damaged with the reason.
        let text = format!(
            "vg0 {{ a = {}1{} }}",
            "[".repeat(20_000),
            "]".repeat(20_000)
        );
        let l = discover(&Mem(lvm_disk(2 << 20, &text))).unwrap();
        let u = unreadable(&l, "lvm");
        assert!(u.reason.contains("nested more than 32 deep"), "{u:?}");
        // Nesting within the limit still parses.
        let ok = format!("a = {}1{}", "[".repeat(20), "]".repeat(20));
        assert!(parse_lvm(&ok).is_ok());
    }

    #[test]
    fn overlapping_lv_segments_are_damage_and_map_never_panics() {
        let text = vg_text(&[
            "start_extent = 0 extent_count = 4 stripes = [\"pv0\", 0]",
            "start_extent = 2 extent_count = 4 stripes = [\"pv0\", 10]",
        ]);
        let l = discover(&Mem(lvm_disk(2 << 20, &text))).unwrap();
        assert!(l.volumes.is_empty(), "{l:?}");
        let u = unreadable(&l, "vg0-root");
        assert!(
            u.reason
                .contains("segment 2 starts at extent 2 where 4 was expected"),
            "{u:?}"
        );
        // A gap is damage too.
        let text = vg_text(&[
            "start_extent = 0 extent_count = 4 stripes = [\"pv0\", 0]",
            "start_extent = 9 extent_count = 4 stripes = [\"pv0\", 10]",
        ]);
        let l = discover(&Mem(lvm_disk(2 << 20, &text))).unwrap();
        assert!(unreadable(&l, "vg0-root").reason.contains("leave a gap"));
        // Volume::new refuses overlapping extents.
        let overlapping = vec![Extent::linear(0, 0, 100), Extent::linear(50, 1000, 100)];
        assert_eq!(
            Volume::new(
                "x".into(),
                String::new(),
                overlapping.clone(),
                None,
                1 << 20
            ),
            Err(ExtentError::NotContiguous {
                index: 1,
                offset: 50,
                expected: 100
            })
        );
        // A volume built by hand with overlapping, unsorted, wrapping extents: `map` stops at
        // the first inconsistency and never returns more than asked.
        let v = Volume {
            name: "x".into(),
            what: String::new(),
            size: 1000,
            extents: vec![
                Extent::linear(0, 5000, 100),
                Extent::linear(50, 9000, 200),
                Extent::linear(10, u64::MAX - 5, 500),
            ],
            content: None,
        };
        assert_eq!(v.map(0, 300), vec![(5000, 100), (9050, 150)]);
        assert_eq!(v.map(40, 20), vec![(5040, 20)]);
        let w = Volume {
            extents: vec![Extent::linear(0, u64::MAX - 5, 100)],
            ..v.clone()
        };
        assert_eq!(w.map(0, 100), vec![(u64::MAX - 5, 100)]);
        assert!(
            w.map(10, 10).is_empty(),
            "disk offset wraps: nothing mapped"
        );
    }

    #[test]
    fn a_huge_extent_count_allocates_nothing_and_is_damage() {
        // The reported input: a striped segment of 4M extents (20M aborted on allocation).
        for count in [4_000_000u64, 20_000_000, i64::MAX as u64] {
            let text = vg_text(&[&format!(
                "start_extent = 0 extent_count = {count} stripe_count = 2 stripe_size = 1 stripes = [\"pv0\", 0, \"pv0\", 1]"
            )]);
            let l = discover(&Mem(lvm_disk(2 << 20, &text))).unwrap();
            assert!(l.volumes.is_empty(), "{l:?}");
            let u = unreadable(&l, "vg0-root");
            assert!(
                u.reason.contains("lies outside its PV")
                    || u.reason.contains("larger than any disk"),
                "{u:?}"
            );
        }
        // A real-sized striped LV (1 TiB in 512-byte chunks over two PVs) is one extent, not
        // 2^31 of them.
        let text = format!(
            "vg {{ extent_size = 8192 physical_volumes {{ a {{ id = \"A\" pe_start = 0 }} b {{ id = \"B\" pe_start = 0 }} }}\n\
             logical_volumes {{ big {{ status = [\"VISIBLE\"] segment_count = 1 segment1 {{ start_extent = 0 extent_count = {} type = \"striped\" stripe_count = 2 stripe_size = 1 stripes = [\"a\", 0, \"b\", 0] }} }} }} }}",
            (1u64 << 40) / (4 << 20)
        );
        let l = lvm_text_layout(
            &text,
            &[("A", 0, 1 << 40), ("B", 1 << 40, 1 << 40)],
            2 << 40,
        )
        .unwrap();
        assert_eq!(l.volumes.len(), 1, "{l:?}");
        let v = &l.volumes[0];
        assert_eq!(v.extents.len(), 1);
        assert_eq!(v.extents[0].stripes, vec![0, 1 << 40]);
        assert_eq!(v.size, 1 << 40);
        // Chunks alternate between the stripes.
        assert_eq!(
            v.map(0, 2048),
            vec![(0, 512), (1 << 40, 512), (512, 512), ((1 << 40) + 512, 512)]
        );
        // Each stripe holds half: the last chunk is the second stripe's last.
        assert_eq!(
            v.map((1 << 40) - 512, 4096),
            vec![((1 << 40) + (1 << 39) - 512, 512)]
        );
    }

    /// A protective MBR and a GPT header whose entries (128 bytes each) are `(first, last)`.
    fn gpt_disk(len: usize, entries: &[(u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; len];
        d[510] = 0x55;
        d[511] = 0xAA;
        d[446 + 4] = 0xEE;
        put(&mut d, 512, b"EFI PART");
        put(&mut d, 512 + 72, &2u64.to_le_bytes());
        put(&mut d, 512 + 80, &(entries.len() as u32).to_le_bytes());
        put(&mut d, 512 + 84, &128u32.to_le_bytes());
        for (i, &(first, last)) in entries.iter().enumerate() {
            let e = 1024 + i * 128;
            d[e] = 0xAF; // a type guid that is not zero
            put(&mut d, e + 32, &first.to_le_bytes());
            put(&mut d, e + 40, &last.to_le_bytes());
        }
        d
    }

    #[test]
    fn gpt_entries_past_any_disk_or_overlapping_are_damage() {
        let d = gpt_disk(
            4 << 20,
            &[
                (2048, 4095),
                (4096, 6143),
                (1 << 55, (1 << 55) + 7),
                (8000, 9000),
            ],
        );
        let l = discover(&Mem(d)).unwrap();
        let names: Vec<&str> = l.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["p1", "p2"], "{l:?}");
        let p3 = unreadable(&l, "p3");
        assert!(p3.reason.contains("past any disk"), "{p3:?}");
        let p4 = unreadable(&l, "p4");
        assert!(p4.reason.contains("outside the disk"), "{p4:?}");
        // Overlapping entries: both listed as damaged, naming each other.
        let d = gpt_disk(4 << 20, &[(2048, 4095), (4000, 6143), (6144, 6200)]);
        let l = discover(&Mem(d)).unwrap();
        let names: Vec<&str> = l.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["p3"], "{l:?}");
        assert!(
            unreadable(&l, "p1").reason.contains("it overlaps p2"),
            "{l:?}"
        );
        assert!(
            unreadable(&l, "p2").reason.contains("it overlaps p1"),
            "{l:?}"
        );
        // An entry table beyond the disk.
        let mut d = gpt_disk(1 << 20, &[(34, 100)]);
        put(&mut d, 512 + 72, &(1u64 << 60).to_le_bytes());
        let l = discover(&Mem(d)).unwrap();
        assert!(l.volumes.is_empty());
        assert!(unreadable(&l, "gpt").reason.contains("outside"), "{l:?}");
    }

    #[test]
    fn overlapping_mbr_partitions_are_damage() {
        let mut d = vec![0u8; 8 << 20];
        d[510] = 0x55;
        d[511] = 0xAA;
        for (i, (start, len)) in [(2048u32, 4096u32), (6000, 2048), (10000, 100)]
            .into_iter()
            .enumerate()
        {
            let e = 446 + i * 16;
            d[e + 4] = 0x83;
            put(&mut d, e + 8, &start.to_le_bytes());
            put(&mut d, e + 12, &len.to_le_bytes());
        }
        let l = discover(&Mem(d)).unwrap();
        let names: Vec<&str> = l.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["p3"], "{l:?}");
        assert!(unreadable(&l, "p1").reason.contains("it overlaps p2"));
        assert!(unreadable(&l, "p2").reason.contains("it overlaps p1"));
    }

    #[test]
    fn an_lv_larger_than_the_disk_is_damage() {
        // 4 TB on a 4 MiB disk.
        let text = vg_text(&[&format!(
            "start_extent = 0 extent_count = {} stripes = [\"pv0\", 0]",
            4_000_000_000_000u64 / 4096
        )]);
        let l = discover(&Mem(lvm_disk(4 << 20, &text))).unwrap();
        assert!(l.volumes.is_empty(), "{l:?}");
        let u = unreadable(&l, "vg0-root");
        assert!(u.reason.contains("lies outside its PV pv0"), "{u:?}");
        // One extent past the end is enough.
        let fits = (4 << 20) / 4096 - 256; // the data area starts at 1 MiB
        for (count, ok) in [(fits, true), (fits + 1, false)] {
            let text = vg_text(&[&format!(
                "start_extent = 0 extent_count = {count} stripes = [\"pv0\", 0]"
            )]);
            let l = discover(&Mem(lvm_disk(4 << 20, &text))).unwrap();
            assert_eq!(l.volumes.len(), usize::from(ok), "{count}: {l:?}");
        }
    }

    #[test]
    fn an_lvm_metadata_area_past_the_end_is_damage() {
        let text = vg_text(&["start_extent = 0 extent_count = 3 stripes = [\"pv0\", 5]"]);
        let mut d = lvm_disk(2 << 20, &text);
        // The metadata area's offset in the PV header, then the label's checksum.
        put(&mut d, 512 + 32 + 72, &(1u64 << 40).to_le_bytes());
        let crc = lvm_crc(LVM_CRC_INIT, &d[532..1024]);
        put(&mut d, 512 + 16, &crc.to_le_bytes());
        let l = discover(&Mem(d)).unwrap();
        assert!(l.volumes.is_empty(), "{l:?}");
        let u = unreadable(&l, "disk");
        assert_eq!(u.what, "lvm2 metadata area");
        assert!(
            u.reason.contains("lies outside the 2097152-byte PV"),
            "{u:?}"
        );
        // Text reaching past its area.
        let mut d = lvm_disk(2 << 20, &text);
        put(&mut d, MDA + 48, &((MDA_SIZE as u64) * 2).to_le_bytes());
        let crc = lvm_crc(LVM_CRC_INIT, &d[MDA + 4..MDA + 512]);
        put(&mut d, MDA, &crc.to_le_bytes());
        let u = &discover(&Mem(d)).unwrap().unreadable;
        assert!(u[0].reason.contains("does not fit the area"), "{u:?}");
    }

    #[test]
    fn lvm_checksums_are_checked() {
        let text = vg_text(&["start_extent = 0 extent_count = 3 stripes = [\"pv0\", 5]"]);
        // A changed byte of the text (its checksum is the old one's).
        let mut d = lvm_disk(2 << 20, &text);
        d[MDA + 512 + 1] ^= 1;
        let l = discover(&Mem(d)).unwrap();
        assert!(l.volumes.is_empty());
        assert!(
            unreadable(&l, "disk")
                .reason
                .contains("checksum of its metadata text"),
            "{l:?}"
        );
        // A changed byte of the label.
        let mut d = lvm_disk(2 << 20, &text);
        d[512 + 32 + 40] ^= 1;
        let l = discover(&Mem(d)).unwrap();
        assert!(
            unreadable(&l, "disk")
                .reason
                .contains("checksum of its LVM label"),
            "{l:?}"
        );
    }

    #[test]
    fn guest_strings_cannot_break_volumes_txt_and_names_stay_unique() {
        let lv = |vg: &str, lv: &str, kind: &str, pe: u32| {
            format!(
                "{vg} {{ extent_size = 8 physical_volumes {{ pv0 {{ id = \"{PV_ID}\" pe_start = 2048 }} }}\n\
                 logical_volumes {{ {lv} {{ status = [\"VISIBLE\"] segment_count = 1 segment1 {{ start_extent = 0 extent_count = 1 type = \"{kind}\" stripes = [\"pv0\", {pe}] }} }} }} }}\n"
            )
        };
        let text = [
            lv("a-b", "c", "striped", 0),
            lv("a", "b-c", "striped", 1),
            lv("x", "y", "evil\\\"\ninjected line\u{1b}[2J", 2),
        ]
        .concat();
        let l = discover(&Mem(lvm_disk(2 << 20, &text))).unwrap();
        let names: Vec<&str> = l.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a-b-c"], "{l:?}");
        let same = unreadable(&l, "a-b-c");
        assert_eq!(same.reason, "another volume has the same name");
        let evil = unreadable(&l, "x-y");
        assert!(
            !evil.reason.contains('\n') && !evil.reason.contains('\u{1b}'),
            "{evil:?}"
        );
        assert_eq!(l.to_text().lines().count(), 4, "{}", l.to_text());
    }

    #[test]
    fn lvm_crc_matches_lvm2() {
        // LVM2's calc_crc over "123456789": CRC-32's check value computed from 0xf597a6cf
        // without the final inversion (independently: zlib's crc32 with that start, see
        // the integration test with the real LVM tools for the end-to-end check).
        assert_eq!(
            lvm_crc(0xffff_ffff, b"123456789") ^ 0xffff_ffff,
            0xCBF4_3926
        );
    }

    proptest::proptest! {
        /// `map` over any extents (the fields are public) never panics, never returns more
        /// than asked, and returns pieces for consecutive volume bytes.
        #[test]
        fn map_of_any_extents_is_bounded(
            raw in proptest::collection::vec((0u64..5000, 0u64..u64::MAX, 0u64..3000, 0usize..3, 0u64..700), 0..6),
            size in 0u64..20000, offset in 0u64..20000, len in 0u64..20000,
        ) {
            let extents = raw.iter().map(|&(o, d, l, n, chunk)| Extent {
                offset: o, disk_offset: d, len: l,
                stripes: (0..n).map(|k| d.wrapping_add(k as u64 * 7919)).collect(), chunk,
            }).collect();
            let v = Volume { name: "x".into(), what: String::new(), size, extents, content: None };
            let total: u64 = v.map(offset, len).iter().map(|p| p.1).sum();
            proptest::prop_assert!(total <= len);
            proptest::prop_assert!(total <= size.saturating_sub(offset));
            let n: u64 = v.pieces(offset, len).map(|p| p.1).sum();
            proptest::prop_assert_eq!(n, total);
        }
    }
}
