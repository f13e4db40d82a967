//! A point index body (`repo::index::Index::parse`, what a sealed index opens to) from arbitrary
//! bytes: parsing never panics and never allocates beyond what the bytes justify; a parsed
//! index's bitmaps agree with its entry count and every entry is in range. Each input is tried
//! as it is and with its head and counts made consistent, so the fuzzer reaches the bitmap
//! decoding and the checks behind them.
#![no_main]

use cbtfs::repo::index::{ENTRY_LEN, HEAD_LEN, Index, MAGIC};
use libfuzzer_sys::fuzz_target;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// `b` with a valid head and counts that add up to its length.
fn consistent(mut b: Vec<u8>) -> Option<Vec<u8>> {
    if b.len() < HEAD_LEN {
        return None;
    }
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&16u32.to_le_bytes());
    b[12..16].copy_from_slice(&0u32.to_le_bytes());
    let room = (b.len() - HEAD_LEN) as u64;
    let n = u64_at(&b, 24) % (room / ENTRY_LEN as u64 + 1);
    let rest = room - n * ENTRY_LEN as u64;
    let c = u64_at(&b, 32) % (rest + 1);
    b[24..32].copy_from_slice(&n.to_le_bytes());
    b[32..40].copy_from_slice(&c.to_le_bytes());
    b[40..48].copy_from_slice(&(rest - c).to_le_bytes());
    Some(b)
}

fn exercise(bytes: Vec<u8>) {
    let Ok(idx) = Index::parse(bytes, "fuzz.idx") else {
        return;
    };
    assert_eq!(idx.data.len(), idx.entry_count() as u64);
    assert!(idx.data.is_subset(&idx.changed));
    assert!(idx.virtual_size <= cbtfs::repo::MAX_VIRTUAL_SIZE);
    let blocks = cbtfs::blocks_for(idx.virtual_size);
    assert!(idx.changed.max().is_none_or(|m| u64::from(m) < blocks));
    // Entries by rank, as the chain resolver finds them, and a few past the end.
    for (rank, block) in idx.data.iter().enumerate().take(4096) {
        assert_eq!(idx.data.rank(block), rank as u64 + 1);
        assert!(idx.entry(rank).is_some());
    }
    for i in [idx.entry_count(), idx.entry_count() + 1, usize::MAX] {
        assert!(idx.entry(i).is_none());
    }
    assert_eq!(idx.chunk_ids().count(), idx.entry_count());
}

fuzz_target!(|data: &[u8]| {
    exercise(data.to_vec());
    if let Some(b) = consistent(data.to_vec()) {
        exercise(b);
    }
});
