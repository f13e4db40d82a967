//! A pack's plain trailer (`repo::pack::parse_trailer`) and fixed tail (`parse_tail`) from
//! arbitrary bytes: parsing never panics and never allocates beyond what the bytes justify;
//! every chunk a parsed trailer hands out lies within the records, in order, not overlapping.
//! Input: the trailer's plain bytes, then the records' length (u64 LE, last 8 bytes). Each
//! input is tried as it is and with its count made to match its length, so the fuzzer reaches
//! the per-entry checks.
#![no_main]

use cbtfs::repo::pack::{
    MAX_PACK_CHUNKS, PACK_MAGIC, PACK_TAIL_LEN, PackId, TRAILER_ENTRY_LEN, parse_tail,
    parse_trailer,
};
use libfuzzer_sys::fuzz_target;

fn check(plain: &[u8], records_len: u64) {
    let pack = PackId([7; 16]);
    let Ok(chunks) = parse_trailer(pack, plain, records_len) else {
        return;
    };
    assert!(chunks.len() <= MAX_PACK_CHUNKS as usize);
    assert_eq!(plain.len(), 4 + chunks.len() * TRAILER_ENTRY_LEN);
    let mut prev_end = 0u64;
    for (_, loc) in &chunks {
        assert_eq!(loc.pack, pack);
        assert!(loc.len > 0);
        let end = u64::from(loc.offset) + u64::from(loc.len);
        assert!(end <= records_len && end <= u64::from(u32::MAX));
        assert!(u64::from(loc.offset) >= prev_end);
        prev_end = end;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((plain, len)) = data.split_last_chunk::<8>() else {
        return;
    };
    let records_len = u64::from_le_bytes(*len);
    check(plain, records_len);
    if plain.len() >= 4 {
        let mut fixed = plain.to_vec();
        let n = (plain.len() - 4) / TRAILER_ENTRY_LEN;
        fixed.truncate(4 + n * TRAILER_ENTRY_LEN);
        fixed[..4].copy_from_slice(&(n as u32).to_le_bytes());
        check(&fixed, records_len);
    }
    // The first 12 bytes as a pack's tail, the records length as the pack's length.
    if let Some(tail) = plain.get(..PACK_TAIL_LEN) {
        for t in [tail.to_vec(), [&tail[..4], &PACK_MAGIC[..]].concat()] {
            if let Ok(tlen) = parse_tail(&t, records_len) {
                assert!(u64::from(tlen) + PACK_TAIL_LEN as u64 <= records_len);
            }
        }
    }
});
