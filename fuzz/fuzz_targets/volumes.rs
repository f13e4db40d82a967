//! Volume discovery (`cbtfs::volumes::discover`) on a guest disk built from the input, and
//! `Volume::map` of every volume found. Grammar-aware: random bytes rarely make a partition
//! table that points at an LVM label whose metadata area checksums match, so the input
//! describes a disk instead (fields below, little-endian, missing bytes read as zero) and the
//! harness writes it, computing LVM's checksums itself (independently of cbtfs). The disk is
//! sparse, so sizes up to 8 TiB cost nothing. Seeds: `fuzz/seeds/volumes/` (made by
//! `fuzz/gen_seeds.py`).
//!
//! ```text
//! u8 mode % 4: 0 the rest of the input is the disk itself; 1 MBR; 2 GPT; 3 whole-disk PV
//! modes 1-3:
//!   u8 size_exp: disk size = 1 MiB << (size_exp % 24)
//!   mode 1: 4 × { u8 kind, u32 start sector, u32 sectors }
//!           u8 n % 8, n × EBR { u32 sector (from the extended start), u8 kind, u32 start
//!           (from the EBR), u32 sectors, u8 link kind, u32 next (from the extended start),
//!           u32 next sectors }            — the EBRs go where the first extended entry says
//!   mode 2: u64 entries LBA, u32 count, u32 entry size, u8 n % 16, n × { u64 first, u64 last }
//!   u64 PV start byte (mode 3: 0), then the PV:
//!     u8 label sector % 4, u64 pe_start (sectors), u64 metadata area offset (0: none),
//!     u64 area size, u64 text offset in the area, u8 flags (1 bad label crc, 2 bad header
//!     crc, 4 bad text crc, 8 area marked ignored), then the metadata text: the rest.
//! ```
#![no_main]

use std::io;

use cbtfs::volumes::{DiskRead, discover};
use libfuzzer_sys::fuzz_target;

/// A disk of `size` bytes: zeros except the pieces written (later ones win).
struct Sparse {
    size: u64,
    pieces: Vec<(u64, Vec<u8>)>,
}

impl Sparse {
    fn write(&mut self, at: u64, bytes: &[u8]) {
        if at < self.size && !bytes.is_empty() {
            self.pieces.push((at, bytes.to_vec()));
        }
    }
}

impl DiskRead for Sparse {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let (start, end) = (offset as u128, offset as u128 + buf.len() as u128);
        for (at, bytes) in &self.pieces {
            let (ps, pe) = (*at as u128, *at as u128 + bytes.len() as u128);
            let (s, e) = (start.max(ps), end.min(pe).min(self.size as u128));
            if s < e {
                let (bo, po, n) = ((s - start) as usize, (s - ps) as usize, (e - s) as usize);
                buf[bo..bo + n].copy_from_slice(&bytes[po..po + n]);
            }
        }
        Ok(())
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// LVM2's checksum: CRC-32 (reflected 0xEDB88320) from 0xf597a6cf, no final inversion.
fn lvm_crc(data: &[u8]) -> u32 {
    let mut crc = 0xf597_a6cfu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn sector(n: u32) -> u64 {
    u64::from(n) * 512
}

fn mbr_entry(b: &mut [u8], at: usize, kind: u8, start: u32, len: u32) {
    b[at + 4] = kind;
    b[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
    b[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
}

fn boot_record() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

fn write_pv(d: &mut Sparse, at: u64, inp: &mut Input) {
    let label_sector = u64::from(inp.u8() % 4);
    let pe_start = inp.u64();
    let (mda, area_size, loc) = (inp.u64(), inp.u64(), inp.u64());
    let flags = inp.u8();
    let text = inp.0;
    let pv_size = d.size.saturating_sub(at);
    let mut l = vec![0u8; 512];
    l[0..8].copy_from_slice(b"LABELONE");
    l[8..16].copy_from_slice(&label_sector.to_le_bytes());
    l[20..24].copy_from_slice(&32u32.to_le_bytes());
    l[24..32].copy_from_slice(b"LVM2 001");
    l[32..64].copy_from_slice(b"FuzzPvIdFuzzPvIdFuzzPvIdFuzzPvId");
    l[64..72].copy_from_slice(&pv_size.to_le_bytes());
    l[72..80].copy_from_slice(&pe_start.wrapping_mul(512).to_le_bytes());
    if mda != 0 {
        l[104..112].copy_from_slice(&mda.to_le_bytes());
        l[112..120].copy_from_slice(&area_size.to_le_bytes());
    }
    let crc = lvm_crc(&l[20..]) ^ u32::from(flags & 1);
    l[16..20].copy_from_slice(&crc.to_le_bytes());
    d.write(at.saturating_add(label_sector * 512), &l);
    let Some(area) = at.checked_add(mda).filter(|_| mda != 0) else {
        return;
    };
    let mut h = vec![0u8; 512];
    h[4..20].copy_from_slice(b" LVM2 x[5A%r0N*>");
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h[24..32].copy_from_slice(&mda.to_le_bytes());
    h[32..40].copy_from_slice(&area_size.to_le_bytes());
    h[40..48].copy_from_slice(&loc.to_le_bytes());
    h[48..56].copy_from_slice(&(text.len() as u64).to_le_bytes());
    let text_crc = lvm_crc(text) ^ u32::from(flags & 4);
    h[56..60].copy_from_slice(&text_crc.to_le_bytes());
    h[60..64].copy_from_slice(&u32::from(flags >> 3 & 1).to_le_bytes());
    let crc = lvm_crc(&h[4..]) ^ u32::from(flags & 2);
    h[0..4].copy_from_slice(&crc.to_le_bytes());
    d.write(area, &h);
    // The text in the circular buffer: from `loc` to the area's end, the rest after the header.
    let first = (area_size.saturating_sub(loc) as usize).min(text.len());
    d.write(area.saturating_add(loc), &text[..first]);
    d.write(area.saturating_add(512), &text[first..]);
}

fn build(data: &[u8]) -> Sparse {
    let mut inp = Input(data);
    let mode = inp.u8() % 4;
    if mode == 0 {
        let mut d = Sparse {
            size: inp.0.len() as u64,
            pieces: Vec::new(),
        };
        d.write(0, inp.0);
        return d;
    }
    let mut d = Sparse {
        size: (1u64 << 20) << (inp.u8() % 24),
        pieces: Vec::new(),
    };
    match mode {
        1 => {
            let mut mbr = boot_record();
            let mut ext = None;
            for i in 0..4 {
                let (kind, start, len) = (inp.u8(), inp.u32(), inp.u32());
                mbr_entry(&mut mbr, 446 + i * 16, kind, start, len);
                if ext.is_none() && matches!(kind, 0x05 | 0x0f | 0x85) {
                    ext = Some(sector(start));
                }
            }
            d.write(0, &mbr);
            for _ in 0..inp.u8() % 8 {
                let at = ext.unwrap_or(0).saturating_add(sector(inp.u32()));
                let mut ebr = boot_record();
                let (kind, start, len) = (inp.u8(), inp.u32(), inp.u32());
                mbr_entry(&mut ebr, 446, kind, start, len);
                let (kind, start, len) = (inp.u8(), inp.u32(), inp.u32());
                mbr_entry(&mut ebr, 462, kind, start, len);
                d.write(at, &ebr);
            }
        }
        2 => {
            let mut mbr = boot_record();
            mbr_entry(&mut mbr, 446, 0xEE, 1, u32::MAX);
            d.write(0, &mbr);
            let (lba, count, size) = (inp.u64(), inp.u32(), inp.u32());
            let mut h = vec![0u8; 512];
            h[0..8].copy_from_slice(b"EFI PART");
            h[72..80].copy_from_slice(&lba.to_le_bytes());
            h[80..84].copy_from_slice(&count.to_le_bytes());
            h[84..88].copy_from_slice(&size.to_le_bytes());
            d.write(512, &h);
            let entry = if (128..=4096).contains(&size) {
                size as usize
            } else {
                128
            };
            let n = usize::from(inp.u8() % 16);
            let mut table = vec![0u8; n * entry];
            for i in 0..n {
                let e = &mut table[i * entry..];
                e[0] = 0xAF; // any type: not empty
                e[32..40].copy_from_slice(&inp.u64().to_le_bytes());
                e[40..48].copy_from_slice(&inp.u64().to_le_bytes());
                e[56..58].copy_from_slice(&[b'p', 0]);
            }
            d.write(lba.saturating_mul(512), &table);
        }
        _ => {}
    }
    let pv_at = if mode == 3 { 0 } else { inp.u64() };
    write_pv(&mut d, pv_at, &mut inp);
    d
}

fuzz_target!(|data: &[u8]| {
    let d = build(data);
    let Ok(layout) = discover(&d) else {
        return;
    };
    let text = layout.to_text();
    // `CBTFS_FUZZ_PRINT=1 cargo fuzz run TARGET FILE` shows what an input makes.
    if std::env::var_os("CBTFS_FUZZ_PRINT").is_some() {
        eprintln!("{text}");
    }
    for v in &layout.volumes {
        for e in &v.extents {
            for &s in e.stripes.iter().chain([&e.disk_offset]) {
                assert!(s < d.size, "an extent starts outside the disk: {v:?}");
            }
        }
        for offset in [
            0,
            1,
            v.size / 2,
            v.size.saturating_sub(1),
            v.size,
            u64::MAX - 3,
        ] {
            // To the end of the disk's address space: pieces, lazily (a striped 8 TiB volume
            // has billions).
            for (disk, l) in v.pieces(offset, u64::MAX).take(1000) {
                assert!(l > 0 && disk.checked_add(l).is_some_and(|e| e <= d.size));
            }
            for len in [1, 4096, 1 << 20] {
                let mut total = 0u64;
                for (disk, l) in v.map(offset, len) {
                    assert!(l > 0);
                    let end = disk.checked_add(l).expect("a piece wraps");
                    assert!(end <= d.size, "a piece beyond the disk: {v:?}");
                    total += l;
                }
                // A validated volume maps every byte asked for, up to its end.
                let want = v.size.saturating_sub(offset).min(len);
                assert_eq!(total, want, "{v:?} at {offset}+{len}");
            }
        }
    }
});
