//! The binary index of one restore point: which blocks it holds and where their bytes are.
//!
//! Written front to back while blocks arrive (entries are streamed, never held in memory), so its
//! lengths and checksums sit in a footer:
//!
//! ```text
//! offset      size  field
//!      0         8  magic "CBTFSIX" + version byte (1)
//!      8         4  block shift (16: 64 KiB blocks, the CBT granularity)
//!     12         4  flags (0; a reader refuses bits it does not know)
//!     16      16·n  entries, one per stored block in ascending block order:
//!                     u64 offset in the point's data file, u32 stored length,
//!                     u32 CRC-32C of the stored bytes
//!  16+16n        c  `changed` bitmap (roaring portable format): every block this point holds
//!                d  `data` bitmap: the subset of `changed` whose bytes are stored (not all-zero)
//!   end-48       8  virtual size of the disk at this point, bytes
//!   end-40       8  entry count n (= cardinality of `data`)
//!   end-32       8  c
//!   end-24       8  d
//!   end-16       4  CRC-32C of the entries
//!   end-12       4  CRC-32C of both bitmaps
//!    end-8       4  CRC-32C of the first 16 bytes and the footer up to here
//!    end-4       4  "CBTE" (end marker: a truncated file has none)
//! ```
//! All integers are little-endian. Entry `i` belongs to the `i`-th block of `data`, so a block's
//! entry is found by rank (which `chain` precomputes per run), never by a scan; entries are read
//! in place from the mapped file. Entries are 16-byte aligned.

use std::io::{self, Write};

use roaring::RoaringBitmap;

use super::error::{RepoError, Result};
use super::store1::{Mapped, ObjectWriter};
use crate::BLOCK_SHIFT;

pub const MAGIC: [u8; 8] = *b"CBTFSIX\x01";
/// Highest index version this build reads; the magic's last byte is the version.
pub const VERSION: u8 = 1;
pub const HEAD_LEN: usize = 16;
pub const FOOTER_LEN: usize = 48;
pub const ENTRY_LEN: usize = 16;
const END_MARK: [u8; 4] = *b"CBTE";

/// Where one stored block's bytes are and what they must hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl Entry {
    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b
    }
    fn decode(b: &[u8]) -> Entry {
        Entry {
            offset: u64_at(b, 0),
            len: u32_at(b, 8),
            crc: u32_at(b, 12),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn head() -> [u8; HEAD_LEN] {
    let mut h = [0u8; HEAD_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&BLOCK_SHIFT.to_le_bytes());
    h
}

/// Does a serialized roaring bitmap's header claim no more containers than its bytes can hold?
/// The decoder sizes its buffers from that count before reading them: checked first, what it
/// allocates stays bounded by the bytes there are (roaring's portable format: cookie 12346 and
/// a u32 count, 8 bytes per container; or cookie 12347 with the count - 1 in its high half,
/// a run bitmap and at least 4 bytes per container).
fn roaring_header_fits(b: &[u8]) -> bool {
    let Some(cookie) = b.get(0..4).map(|c| u32_at(c, 0)) else {
        return false;
    };
    let (header, per_container, count) = match cookie {
        12346 => match b.get(4..8) {
            Some(n) => (8u64, 8u64, u64::from(u32_at(n, 0))),
            None => return false,
        },
        c if c & 0xffff == 12347 => {
            let n = u64::from(c >> 16) + 1;
            (4 + n.div_ceil(8), 4, n)
        }
        _ => return true, // not a roaring header: the decoder refuses it without allocating
    };
    count
        .checked_mul(per_container)
        .and_then(|x| x.checked_add(header))
        .is_some_and(|need| need <= b.len() as u64)
}

/// The length of the index `IndexWriter` writes for a point holding `changed`, of which `data`
/// is stored (as the writer builds them: one `insert` per block, in ascending order).
pub fn encoded_len(changed: &RoaringBitmap, data: &RoaringBitmap) -> u64 {
    (HEAD_LEN + FOOTER_LEN + changed.serialized_size() + data.serialized_size()) as u64
        + data.len().saturating_mul(ENTRY_LEN as u64)
}

/// Streams an index: entries as blocks arrive, bitmaps and footer at the end.
pub struct IndexWriter {
    out: Box<dyn ObjectWriter>,
    entries: u64,
    entries_crc: u32,
}

impl IndexWriter {
    pub fn new(mut out: Box<dyn ObjectWriter>) -> io::Result<Self> {
        out.write_all(&head())?;
        Ok(IndexWriter {
            out,
            entries: 0,
            entries_crc: 0,
        })
    }

    pub fn push(&mut self, e: Entry) -> io::Result<()> {
        let b = e.encode();
        self.entries_crc = crc32c::crc32c_append(self.entries_crc, &b);
        self.entries += 1;
        self.out.write_all(&b)
    }

    /// Write bitmaps and footer, make the object durable; returns (length, CRC-32C of the file).
    pub fn finish(
        mut self,
        virtual_size: u64,
        changed: &RoaringBitmap,
        data: &RoaringBitmap,
    ) -> io::Result<u64> {
        let mut bitmaps = Vec::with_capacity(changed.serialized_size() + data.serialized_size());
        changed.serialize_into(&mut bitmaps)?;
        let changed_len = bitmaps.len();
        data.serialize_into(&mut bitmaps)?;
        let data_len = bitmaps.len() - changed_len;
        self.out.write_all(&bitmaps)?;
        let mut f = Vec::with_capacity(FOOTER_LEN);
        f.extend_from_slice(&virtual_size.to_le_bytes());
        f.extend_from_slice(&self.entries.to_le_bytes());
        f.extend_from_slice(&(changed_len as u64).to_le_bytes());
        f.extend_from_slice(&(data_len as u64).to_le_bytes());
        f.extend_from_slice(&self.entries_crc.to_le_bytes());
        f.extend_from_slice(&crc32c::crc32c(&bitmaps).to_le_bytes());
        let fcrc = crc32c::crc32c_append(crc32c::crc32c(&head()), &f);
        f.extend_from_slice(&fcrc.to_le_bytes());
        f.extend_from_slice(&END_MARK);
        debug_assert_eq!(f.len(), FOOTER_LEN);
        self.out.write_all(&f)?;
        self.out.finish()
    }
}

/// A parsed, checked index. Bitmaps are decoded into memory; entries stay in the mapping.
pub struct Index {
    pub virtual_size: u64,
    pub changed: RoaringBitmap,
    pub data: RoaringBitmap,
    map: Mapped,
    entry_count: usize,
    entries_crc: u32,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("virtual_size", &self.virtual_size)
            .field("changed", &self.changed.len())
            .field("data", &self.data.len())
            .finish()
    }
}

impl Index {
    /// Parse and check all but the entries' checksum (`check_entries`, which `verify` runs):
    /// entries protect themselves, since a damaged entry can only make its block fail its CRC.
    pub fn parse(map: Mapped, location: &str) -> Result<Index> {
        let b: &[u8] = &map;
        let bad = |d: String| RepoError::corrupt(location, d);
        if b.len() < HEAD_LEN + FOOTER_LEN {
            return Err(bad(format!(
                "index is {} bytes, too short to be one (truncated)",
                b.len()
            )));
        }
        if b[0..7] != MAGIC[0..7] {
            return Err(bad("not a cbtfs index (bad magic)".into()));
        }
        if b[7] > VERSION {
            return Err(RepoError::UnsupportedVersion {
                what: "point index",
                location: location.to_string(),
                found: b[7] as u64,
                supported: VERSION as u64,
            });
        }
        let f = &b[b.len() - FOOTER_LEN..];
        if f[44..48] != END_MARK {
            return Err(bad("index has no end marker (truncated)".into()));
        }
        if u32_at(f, 40) != crc32c::crc32c_append(crc32c::crc32c(&b[0..HEAD_LEN]), &f[0..40]) {
            return Err(bad("index header/footer checksum mismatch".into()));
        }
        if u32_at(b, 8) != BLOCK_SHIFT {
            return Err(bad(format!("unsupported block shift {}", u32_at(b, 8))));
        }
        if u32_at(b, 12) != 0 {
            return Err(bad(format!("unknown index flags {:#x}", u32_at(b, 12))));
        }
        let virtual_size = u64_at(f, 0);
        let entry_count = u64_at(f, 8);
        let changed_len = u64_at(f, 16);
        let data_len = u64_at(f, 24);
        let entries_crc = u32_at(f, 32);
        let bitmaps_crc = u32_at(f, 36);
        let expected_len = entry_count
            .checked_mul(ENTRY_LEN as u64)
            .and_then(|n| n.checked_add(changed_len))
            .and_then(|n| n.checked_add(data_len))
            .and_then(|n| n.checked_add((HEAD_LEN + FOOTER_LEN) as u64));
        if expected_len != Some(b.len() as u64) {
            return Err(bad(format!(
                "index is {} bytes, its footer describes {expected_len:?}",
                b.len()
            )));
        }
        let bitmaps_at = HEAD_LEN + entry_count as usize * ENTRY_LEN;
        let bitmaps = &b[bitmaps_at..b.len() - FOOTER_LEN];
        if crc32c::crc32c(bitmaps) != bitmaps_crc {
            return Err(bad("index bitmaps checksum mismatch".into()));
        }
        let (cb, db) = bitmaps.split_at(changed_len as usize);
        for (what, b) in [("changed-block", cb), ("data-block", db)] {
            if !roaring_header_fits(b) {
                return Err(bad(format!(
                    "{what} bitmap claims more containers than its {} bytes hold",
                    b.len()
                )));
            }
        }
        let changed = RoaringBitmap::deserialize_from(cb)
            .map_err(|e| bad(format!("changed-block bitmap unreadable: {e}")))?;
        let data = RoaringBitmap::deserialize_from(db)
            .map_err(|e| bad(format!("data-block bitmap unreadable: {e}")))?;
        if data.len() != entry_count {
            return Err(bad(format!(
                "{} data blocks but {entry_count} entries",
                data.len()
            )));
        }
        if !data.is_subset(&changed) {
            return Err(bad("data blocks outside the changed blocks".into()));
        }
        if virtual_size > super::MAX_VIRTUAL_SIZE {
            return Err(bad(format!(
                "virtual size {virtual_size} bytes is above the format's limit of {} bytes",
                super::MAX_VIRTUAL_SIZE
            )));
        }
        let blocks = crate::blocks_for(virtual_size);
        if changed.max().is_some_and(|m| m as u64 >= blocks) {
            return Err(bad(format!(
                "blocks beyond the disk's end ({blocks} blocks)"
            )));
        }
        Ok(Index {
            virtual_size,
            changed,
            data,
            entry_count: entry_count as usize,
            entries_crc,
            map,
        })
    }

    pub fn entry_count(&self) -> usize {
        self.entry_count
    }

    /// Entry `i`, if it exists and lies inside the data file the index describes (`entry_count`
    /// blocks of 64 KiB): a damaged entry pointing elsewhere is None, like a missing one, so
    /// callers' offset arithmetic stays below 2^48.
    pub fn entry(&self, i: usize) -> Option<Entry> {
        if i >= self.entry_count {
            return None;
        }
        let at = HEAD_LEN.checked_add(i.checked_mul(ENTRY_LEN)?)?;
        let e = Entry::decode(self.map.get(at..at.checked_add(ENTRY_LEN)?)?);
        let data_len = (self.entry_count as u64).checked_mul(crate::BLOCK_SIZE)?;
        match e.offset.checked_add(u64::from(e.len)) {
            Some(end) if end <= data_len => Some(e),
            _ => None,
        }
    }

    /// Do the entries match their checksum?
    pub fn check_entries(&self) -> bool {
        let end = HEAD_LEN + self.entry_count * ENTRY_LEN;
        self.map
            .get(HEAD_LEN..end)
            .is_some_and(|b| crc32c::crc32c(b) == self.entries_crc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl ObjectWriter for Sink {
        fn finish(self: Box<Self>) -> io::Result<u64> {
            Ok(self.0.lock().unwrap().len() as u64)
        }
    }

    fn sample() -> Vec<u8> {
        let changed: RoaringBitmap = [1u32, 2, 3, 9].into_iter().collect();
        let data: RoaringBitmap = [2u32, 9].into_iter().collect();
        let sink = Sink::default();
        let mut w = IndexWriter::new(Box::new(sink.clone())).unwrap();
        for (i, crc) in [(0u64, 1u32), (1, 2)] {
            w.push(Entry {
                offset: i * 65536,
                len: 65536,
                crc,
            })
            .unwrap();
        }
        w.finish(10 << 16, &changed, &data).unwrap();
        sink.0.lock().unwrap().clone()
    }

    #[test]
    fn encoded_len_is_the_written_length() {
        let changed: RoaringBitmap = [1u32, 2, 3, 9].into_iter().collect();
        let data: RoaringBitmap = [2u32, 9].into_iter().collect();
        assert_eq!(encoded_len(&changed, &data), sample().len() as u64);
    }

    #[test]
    fn round_trip() {
        let idx = Index::parse(Mapped::Owned(sample()), "x").unwrap();
        assert_eq!(idx.virtual_size, 10 << 16);
        assert_eq!(idx.changed.len(), 4);
        assert_eq!(idx.entry(1).unwrap().crc, 2);
        assert!(idx.entry(2).is_none());
        assert!(idx.check_entries());
    }

    #[test]
    fn every_truncation_and_flip_is_refused_or_caught_by_entries_check() {
        let bytes = sample();
        for n in 0..bytes.len() {
            assert!(Index::parse(Mapped::Owned(bytes[..n].to_vec()), "x").is_err());
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(idx) = Index::parse(Mapped::Owned(b), "x") {
                    assert!(
                        (HEAD_LEN..HEAD_LEN + 2 * ENTRY_LEN).contains(&i),
                        "flip at byte {i} bit {bit} accepted"
                    );
                    assert!(!idx.check_entries());
                }
            }
        }
    }

    /// A footer (with its checksum) claiming `entries` entries, bitmaps of the given lengths
    /// and `size`, after a valid head and `body`.
    fn forged(body: &[u8], size: u64, entries: u64, c: u64, d: u64) -> Vec<u8> {
        let mut b = head().to_vec();
        b.extend_from_slice(body);
        let mut f = Vec::new();
        for x in [size, entries, c, d] {
            f.extend_from_slice(&x.to_le_bytes());
        }
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(
            &crc32c::crc32c(&body[body.len().min(16 * entries as usize)..]).to_le_bytes(),
        );
        let fcrc = crc32c::crc32c_append(crc32c::crc32c(&head()), &f);
        f.extend_from_slice(&fcrc.to_le_bytes());
        f.extend_from_slice(&END_MARK);
        b.extend_from_slice(&f);
        b
    }

    #[test]
    fn counts_the_bytes_cannot_hold_are_refused_without_allocating() {
        // 2^40 entries in a 100-byte file, and counts that overflow when added up.
        for (entries, c, d) in [
            (1u64 << 40, 0, 0),
            (u64::MAX / 16, 8, 8),
            (0, u64::MAX, 2),
            (0, 20, u64::MAX - 10),
        ] {
            let b = forged(&[0u8; 36], 1 << 20, entries, c, d);
            let e = Index::parse(Mapped::Owned(b), "x.idx")
                .unwrap_err()
                .to_string();
            assert!(e.contains("its footer describes"), "{e}");
        }
    }

    #[test]
    fn bitmaps_claiming_more_containers_than_their_bytes_are_refused() {
        // 2^32 - 1 containers in 8 bytes (no-run cookie), 65536 in 8 (run cookie).
        for bitmap in [
            [0x3a, 0x30, 0, 0, 0xff, 0xff, 0xff, 0xff],
            [0x3b, 0x30, 0xff, 0xff, 0, 0, 0, 0],
        ] {
            let body = [bitmap.to_vec(), bitmap.to_vec()].concat();
            let b = forged(&body, 1 << 20, 0, 8, 8);
            let e = Index::parse(Mapped::Owned(b), "x.idx")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("claims more containers than its 8 bytes hold"),
                "{e}"
            );
        }
        // Real bitmaps of both serial forms fit, whatever their containers.
        let mut runs = RoaringBitmap::new();
        runs.insert_range(0..1_000_000);
        runs.insert_range(2_000_000..2_000_010);
        let sparse: RoaringBitmap = (0..300_000u32).step_by(3).collect();
        let mut mixed = sparse.clone();
        mixed.insert_range(5_000_000..6_000_000);
        for r in [RoaringBitmap::new(), runs, sparse, mixed] {
            let mut v = Vec::new();
            r.serialize_into(&mut v).unwrap();
            assert!(roaring_header_fits(&v), "{r:?}");
            assert!(!roaring_header_fits(&v[..v.len().min(7)]) || r.is_empty());
        }
    }

    #[test]
    fn virtual_size_above_the_format_limit_is_refused() {
        let empty = {
            let mut v = Vec::new();
            RoaringBitmap::new().serialize_into(&mut v).unwrap();
            v
        };
        let body = [empty.clone(), empty].concat();
        let n = (body.len() / 2) as u64;
        let ok = forged(&body, super::super::MAX_VIRTUAL_SIZE, 0, n, n);
        Index::parse(Mapped::Owned(ok), "x.idx").unwrap();
        let b = forged(&body, 1 << 62, 0, n, n);
        let e = Index::parse(Mapped::Owned(b), "x.idx")
            .unwrap_err()
            .to_string();
        assert!(e.contains("above the format's limit"), "{e}");
    }

    #[test]
    fn an_entry_pointing_outside_the_data_file_is_none() {
        let mut b = sample();
        // Entry 1's offset: u64::MAX - 10, so offset + len overflows; entries' CRC stays wrong
        // (entries protect themselves), the parse accepts it.
        b[HEAD_LEN + ENTRY_LEN..HEAD_LEN + ENTRY_LEN + 8]
            .copy_from_slice(&(u64::MAX - 10).to_le_bytes());
        let idx = Index::parse(Mapped::Owned(b.clone()), "x").unwrap();
        assert!(idx.entry(0).is_some());
        assert_eq!(idx.entry(1), None);
        // One block past the two-block data file.
        b[HEAD_LEN + ENTRY_LEN..HEAD_LEN + ENTRY_LEN + 8]
            .copy_from_slice(&(2u64 << 16).to_le_bytes());
        let idx = Index::parse(Mapped::Owned(b), "x").unwrap();
        assert_eq!(idx.entry(1), None);
        assert_eq!(idx.entry(usize::MAX), None);
    }

    #[test]
    fn newer_version_refused() {
        let mut b = sample();
        b[7] = 2;
        let err = Index::parse(Mapped::Owned(b), "x").unwrap_err();
        assert!(matches!(
            err,
            RepoError::UnsupportedVersion { found: 2, .. }
        ));
    }
}
