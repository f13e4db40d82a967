//! A point index (`repo::index::Index::parse`) from arbitrary bytes: parsing never panics and
//! never allocates beyond what the bytes justify; every entry a parsed index hands out lies in
//! its data file, and the bitmaps agree with the entry count. Each input is tried as it is and
//! with its head, counts, checksums and end marker made consistent, so the fuzzer reaches the
//! bitmap decoding and the checks behind the checksums.
#![no_main]

use cbtfs::repo::index::{ENTRY_LEN, FOOTER_LEN, HEAD_LEN, Index, MAGIC};
use cbtfs::repo::store::Mapped;
use libfuzzer_sys::fuzz_target;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// `b` with a valid head, counts that add up to its length (taken from its own footer, reduced),
/// both checksums and the end marker.
fn consistent(mut b: Vec<u8>) -> Option<Vec<u8>> {
    if b.len() < HEAD_LEN + FOOTER_LEN {
        return None;
    }
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&16u32.to_le_bytes());
    b[12..16].copy_from_slice(&0u32.to_le_bytes());
    let f = b.len() - FOOTER_LEN;
    let room = (f - HEAD_LEN) as u64;
    let n = u64_at(&b, f + 8) % (room / ENTRY_LEN as u64 + 1);
    let rest = room - n * ENTRY_LEN as u64;
    let c = u64_at(&b, f + 16) % (rest + 1);
    b[f + 8..f + 16].copy_from_slice(&n.to_le_bytes());
    b[f + 16..f + 24].copy_from_slice(&c.to_le_bytes());
    b[f + 24..f + 32].copy_from_slice(&(rest - c).to_le_bytes());
    let entries_end = HEAD_LEN + n as usize * ENTRY_LEN;
    let ecrc = crc32c::crc32c(&b[HEAD_LEN..entries_end]);
    b[f + 32..f + 36].copy_from_slice(&ecrc.to_le_bytes());
    let bcrc = crc32c::crc32c(&b[entries_end..f]);
    b[f + 36..f + 40].copy_from_slice(&bcrc.to_le_bytes());
    let fcrc = crc32c::crc32c_append(crc32c::crc32c(&b[0..HEAD_LEN]), &b[f..f + 40]);
    b[f + 40..f + 44].copy_from_slice(&fcrc.to_le_bytes());
    b[f + 44..f + 48].copy_from_slice(b"CBTE");
    Some(b)
}

fn exercise(bytes: Vec<u8>) {
    let Ok(idx) = Index::parse(Mapped::Owned(bytes), "fuzz.idx") else {
        return;
    };
    assert_eq!(idx.data.len(), idx.entry_count() as u64);
    assert!(idx.data.is_subset(&idx.changed));
    assert!(idx.virtual_size <= cbtfs::repo::MAX_VIRTUAL_SIZE);
    let blocks = cbtfs::blocks_for(idx.virtual_size);
    assert!(idx.changed.max().is_none_or(|m| u64::from(m) < blocks));
    let data_len = idx.entry_count() as u64 * cbtfs::BLOCK_SIZE;
    let _ = idx.check_entries();
    // Entries by rank, as the chain resolver finds them, and a few past the end.
    for (rank, block) in idx.data.iter().enumerate().take(4096) {
        assert_eq!(idx.data.rank(block), rank as u64 + 1);
        if let Some(e) = idx.entry(rank) {
            assert!(e.offset + u64::from(e.len) <= data_len);
        }
    }
    for i in [idx.entry_count(), idx.entry_count() + 1, usize::MAX] {
        assert!(idx.entry(i).is_none());
    }
}

fuzz_target!(|data: &[u8]| {
    exercise(data.to_vec());
    if let Some(b) = consistent(data.to_vec()) {
        exercise(b);
    }
});
