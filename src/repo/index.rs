//! The index of one restore point: which blocks it holds and which chunk holds each.
//!
//! Stored sealed (`Keys::seal`, aad = `b"pindex:" || object key`), so its plain body needs no
//! checksums of its own: the AEAD tag covers every byte. Plain body:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "CBTFSIX" + version byte (2)
//!      8     4  block shift (16: 64 KiB blocks, the CBT granularity)
//!     12     4  flags (0; a reader refuses bits it does not know)
//!     16     8  virtual size of the disk at this point, bytes
//!     24     8  entry count n (= cardinality of `data`)
//!     32     8  c: length of the `changed` bitmap
//!     40     8  d: length of the `data` bitmap
//!     48     c  `changed` (roaring portable format): every block this point holds
//!   48+c     d  `data`: the subset of `changed` whose bytes are stored (not all-zero)
//! 48+c+d  32·n  chunk ids, one per block of `data` in ascending block order
//! ```
//! All integers are little-endian. Entry `i` belongs to the `i`-th block of `data`, so a block's
//! entry is found by rank (which `chain` precomputes per run), never by a scan.

use roaring::RoaringBitmap;

use super::crypto::ChunkId;
use super::error::{RepoError, Result};
use crate::BLOCK_SHIFT;

pub const MAGIC: [u8; 8] = *b"CBTFSIX\x02";
/// Highest index version this build reads; the magic's last byte is the version.
pub const VERSION: u8 = 2;
pub const HEAD_LEN: usize = 48;
pub const ENTRY_LEN: usize = 32;

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

/// Serialize a point index (the plain body; the caller seals it).
pub fn encode(
    virtual_size: u64,
    changed: &RoaringBitmap,
    data: &RoaringBitmap,
    ids: &[u8],
) -> Vec<u8> {
    let (c, d) = (changed.serialized_size(), data.serialized_size());
    let mut out = Vec::with_capacity(HEAD_LEN + c + d + ids.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&BLOCK_SHIFT.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&virtual_size.to_le_bytes());
    out.extend_from_slice(&((ids.len() / ENTRY_LEN) as u64).to_le_bytes());
    out.extend_from_slice(&(c as u64).to_le_bytes());
    out.extend_from_slice(&(d as u64).to_le_bytes());
    // Serializing into a Vec cannot fail.
    let _ = changed.serialize_into(&mut out);
    let _ = data.serialize_into(&mut out);
    out.extend_from_slice(ids);
    out
}

/// A parsed, checked point index.
pub struct Index {
    pub virtual_size: u64,
    pub changed: RoaringBitmap,
    pub data: RoaringBitmap,
    body: Vec<u8>,
    ids_at: usize,
    entry_count: usize,
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
    /// Parse and check an opened (authenticated) index body. `location` names it in errors.
    pub fn parse(body: Vec<u8>, location: &str) -> Result<Index> {
        let b: &[u8] = &body;
        let bad = |d: String| RepoError::corrupt(location, d);
        if b.len() < HEAD_LEN {
            return Err(bad(format!(
                "index is {} bytes, too short to be one (truncated)",
                b.len()
            )));
        }
        if b[0..7] != MAGIC[0..7] {
            return Err(bad("not a cbtfs index (bad magic)".into()));
        }
        if b[7] != VERSION {
            return Err(RepoError::UnsupportedVersion {
                what: "point index",
                location: location.to_string(),
                found: b[7] as u64,
                supported: VERSION as u64,
            });
        }
        if u32_at(b, 8) != BLOCK_SHIFT {
            return Err(bad(format!("unsupported block shift {}", u32_at(b, 8))));
        }
        if u32_at(b, 12) != 0 {
            return Err(bad(format!("unknown index flags {:#x}", u32_at(b, 12))));
        }
        let virtual_size = u64_at(b, 16);
        let entry_count = u64_at(b, 24);
        let changed_len = u64_at(b, 32);
        let data_len = u64_at(b, 40);
        let expected_len = entry_count
            .checked_mul(ENTRY_LEN as u64)
            .and_then(|n| n.checked_add(changed_len))
            .and_then(|n| n.checked_add(data_len))
            .and_then(|n| n.checked_add(HEAD_LEN as u64));
        if expected_len != Some(b.len() as u64) {
            return Err(bad(format!(
                "index is {} bytes, its header describes {expected_len:?}",
                b.len()
            )));
        }
        // All three fit: their sum is the body's length.
        let cb = &b[HEAD_LEN..HEAD_LEN + changed_len as usize];
        let db_at = HEAD_LEN + changed_len as usize;
        let db = &b[db_at..db_at + data_len as usize];
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
        let ids_at = db_at + data_len as usize;
        Ok(Index {
            virtual_size,
            changed,
            data,
            body,
            ids_at,
            entry_count: entry_count as usize,
        })
    }

    pub fn entry_count(&self) -> usize {
        self.entry_count
    }

    /// The chunk id of entry `i` (the `i`-th stored block), if it exists.
    pub fn entry(&self, i: usize) -> Option<ChunkId> {
        if i >= self.entry_count {
            return None;
        }
        let at = self.ids_at.checked_add(i.checked_mul(ENTRY_LEN)?)?;
        let b = self.body.get(at..at.checked_add(ENTRY_LEN)?)?;
        let mut id = [0u8; 32];
        id.copy_from_slice(b);
        Some(ChunkId(id))
    }

    /// Every entry's chunk id, in block order.
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.ids().chunks_exact(ENTRY_LEN).map(|c| {
            let mut id = [0u8; 32];
            id.copy_from_slice(c);
            ChunkId(id)
        })
    }

    /// All entries' bytes (32 per entry, in block order).
    pub fn ids(&self) -> &[u8] {
        self.body.get(self.ids_at..).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut changed = RoaringBitmap::new();
        let mut data = RoaringBitmap::new();
        for b in [0u32, 1, 5, 9, 10] {
            changed.insert(b);
        }
        for b in [1u32, 5, 10] {
            data.insert(b);
        }
        let ids: Vec<u8> = (0..3 * 32).map(|i| i as u8).collect();
        encode(11 * 65536, &changed, &data, &ids)
    }

    #[test]
    fn round_trip() {
        let ix = Index::parse(sample(), "t").unwrap();
        assert_eq!(ix.virtual_size, 11 * 65536);
        assert_eq!(ix.changed.len(), 5);
        assert_eq!(ix.entry_count(), 3);
        assert_eq!(ix.entry(1).unwrap().0[0], 32);
        assert!(ix.entry(3).is_none());
    }

    #[test]
    fn every_truncation_and_header_damage_is_refused_never_a_panic() {
        let b = sample();
        for n in 0..b.len() {
            assert!(
                Index::parse(b[..n].to_vec(), "t").is_err(),
                "truncated to {n}"
            );
        }
        // Flips in the header and bitmaps either fail or still describe a consistent index;
        // none panics (the AEAD stops real damage before this parser runs).
        for i in 0..(b.len() - 3 * 32) * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            let _ = Index::parse(c, "t");
        }
    }

    #[test]
    fn counts_the_bytes_cannot_hold_are_refused_without_allocating() {
        let mut b = sample();
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Index::parse(b, "t").is_err());
    }

    /// Seeds for the `index` and `manifest` fuzz targets: run with
    /// `CBTFS_WRITE_FUZZ_SEEDS=$PWD/fuzz cargo test --release --lib write_index_fuzz_seeds`.
    #[test]
    fn write_index_fuzz_seeds() {
        let Some(dir) = std::env::var_os("CBTFS_WRITE_FUZZ_SEEDS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir).join("seeds");
        let idx = dir.join("index");
        let _ = std::fs::remove_dir_all(&idx);
        std::fs::create_dir_all(&idx).unwrap();
        let full = sample();
        std::fs::write(idx.join("three.idx"), &full).unwrap();
        std::fs::write(idx.join("truncated.idx"), &full[..full.len() - 5]).unwrap();
        let empty = encode(0, &RoaringBitmap::new(), &RoaringBitmap::new(), &[]);
        std::fs::write(idx.join("empty.idx"), &empty).unwrap();
        let mut many = RoaringBitmap::new();
        many.insert_range(0..5000);
        let ids: Vec<u8> = (0..5000 * 32).map(|i| (i % 251) as u8).collect();
        std::fs::write(
            idx.join("runs.idx"),
            encode(5000 * 65536, &many, &many, &ids),
        )
        .unwrap();
        let man = dir.join("manifest");
        let _ = std::fs::remove_dir_all(&man);
        std::fs::create_dir_all(&man).unwrap();
        let m = super::super::PointManifest {
            format: super::super::POINT_FORMAT.into(),
            version: super::super::POINT_VERSION,
            id: "0123456789abcdef0123456789abcdef".into(),
            generation: 1,
            parent: None,
            vdi: "3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b".into(),
            disk_name: "root".into(),
            vm_uuid: Some("4f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b".into()),
            vm_name: Some("web01".into()),
            set: "20261121T020000Z".into(),
            n: 0,
            seq: 0,
            time: 1_700_000_000,
            virtual_size: 10 * 65536,
            changed_blocks: 10,
            data_blocks: 3,
            index: super::super::ObjRef {
                key: "pindex/0123456789abcdef0123456789abcdef".into(),
                len: 500,
            },
            source: "backup:xs1".into(),
            snapshot: None,
            vm_metadata: Some(super::super::ObjRef {
                key: "meta/0123456789abcdef0123456789abcdef".into(),
                len: 10,
            }),
            vdi_type: Some("user".into()),
            vm_run: None,
            stats: Default::default(),
            copied_from: None,
        };
        std::fs::write(man.join("base.point"), super::super::manifest::encode(&m)).unwrap();
        let mut inc = m.clone();
        inc.n = 1;
        inc.parent = Some("fedcba9876543210fedcba9876543210".into());
        inc.generation = 2;
        std::fs::write(
            man.join("incremental.point"),
            super::super::manifest::encode(&inc),
        )
        .unwrap();
        let mut copied = inc.clone();
        copied.copied_from = Some(super::super::CopiedFrom {
            repo: "00112233445566778899aabbccddeeff".into(),
            point: "ffeeddccbbaa99887766554433221100".into(),
            set: "20261120T020000Z".into(),
            n: 7,
        });
        std::fs::write(
            man.join("copied.point"),
            super::super::manifest::encode(&copied),
        )
        .unwrap();
    }

    #[test]
    fn newer_version_refused() {
        let mut b = sample();
        b[7] = 3;
        assert!(matches!(
            Index::parse(b, "t"),
            Err(RepoError::UnsupportedVersion { .. })
        ));
    }
}
