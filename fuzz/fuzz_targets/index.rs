//! A point index (`repo::index::Index::parse`) from arbitrary bytes: parsing never panics and
//! never allocates beyond what the bytes justify; every entry a parsed index hands out lies in
//! its data file, and the bitmaps agree with the entry count.
#![no_main]

use cbtfs::repo::index::Index;
use cbtfs::repo::store::Mapped;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(idx) = Index::parse(Mapped::Owned(data.to_vec()), "fuzz.idx") else {
        return;
    };
    assert_eq!(idx.data.len(), idx.entry_count() as u64);
    assert!(idx.data.is_subset(&idx.changed));
    assert!(idx.virtual_size <= cbtfs::repo::MAX_VIRTUAL_SIZE);
    let data_len = idx.entry_count() as u64 * cbtfs::BLOCK_SIZE;
    let _ = idx.check_entries();
    // Entries by rank, as the chain resolver finds them, and a few past the end.
    for (rank, block) in idx.data.iter().enumerate().take(4096) {
        assert!(u64::from(block) < cbtfs::blocks_for(idx.virtual_size));
        if let Some(e) = idx.entry(rank) {
            assert!(e.offset + u64::from(e.len) <= data_len);
        }
    }
    for i in [idx.entry_count(), idx.entry_count() + 1, usize::MAX] {
        assert!(idx.entry(i).is_none());
    }
});
