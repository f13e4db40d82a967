//! A chunk index object's plain body (`repo::chunkindex::parse_cindex_body`) from arbitrary
//! bytes: parsing never panics and never allocates beyond what the bytes justify; a parsed
//! body finds every entry it lists by binary search, and re-encoding its entries gives a body
//! that parses to the same entries. Each input is tried as it is, with its header made to
//! match its length, and with its entries also sorted and made valid (which must parse), so the
//! fuzzer reaches the lookups.
#![no_main]

use cbtfs::repo::chunkindex::{
    CINDEX_HEAD_LEN, CINDEX_MAGIC, ENTRY_LEN, encode_cindex_body, parse_cindex_body,
};
use libfuzzer_sys::fuzz_target;

/// Returns whether it parsed.
fn check(b: &[u8]) -> bool {
    let Ok(body) = parse_cindex_body(b) else {
        return false;
    };
    let mut entries = Vec::with_capacity(body.len());
    for i in 0..body.len() {
        let (id, loc) = body.entry(i).expect("a parsed body's entries are readable");
        assert_eq!(body.find(&id), Some(loc));
        assert!(u64::from(loc.offset) + u64::from(loc.len) <= u64::from(u32::MAX));
        entries.push((id, loc));
    }
    assert!(body.entry(body.len()).is_none());
    match body.range() {
        Some((lo, hi)) => {
            assert_eq!(lo, entries[0].0);
            assert_eq!(hi, entries[entries.len() - 1].0);
        }
        None => assert!(entries.is_empty()),
    }
    let again = encode_cindex_body(&entries);
    let body2 = parse_cindex_body(&again).expect("a re-encoded body parses");
    assert_eq!(body2.len(), entries.len());
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(body2.entry(i), Some(*e));
    }
    true
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() < CINDEX_HEAD_LEN {
        return;
    }
    // Header consistent with the length: a few packs, as many entries as fit.
    let mut b = data.to_vec();
    let room = b.len() - CINDEX_HEAD_LEN;
    let packs = (usize::from(b[8]) % 4).min(room / 16);
    let n = (room - packs * 16) / ENTRY_LEN;
    b.truncate(CINDEX_HEAD_LEN + packs * 16 + n * ENTRY_LEN);
    b[..8].copy_from_slice(&CINDEX_MAGIC);
    b[8..12].copy_from_slice(&(packs as u32).to_le_bytes());
    b[12..20].copy_from_slice(&(n as u64).to_le_bytes());
    check(&b);
    if packs == 0 {
        return;
    }
    // Entries made valid: sorted without repeats, pack numbers in range, records non-empty
    // and below 4 GiB. That must parse.
    let at = CINDEX_HEAD_LEN + packs * 16;
    let mut es: Vec<[u8; ENTRY_LEN]> = b[at..]
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            let mut e: [u8; ENTRY_LEN] = e.try_into().unwrap();
            let pn = u32::from_le_bytes(e[32..36].try_into().unwrap()) % packs as u32;
            let len = u32::from_le_bytes(e[40..44].try_into().unwrap()).max(1);
            let off = u32::from_le_bytes(e[36..40].try_into().unwrap()).min(u32::MAX - len);
            e[32..36].copy_from_slice(&pn.to_le_bytes());
            e[36..40].copy_from_slice(&off.to_le_bytes());
            e[40..44].copy_from_slice(&len.to_le_bytes());
            e
        })
        .collect();
    es.sort_by(|x, y| x[..32].cmp(&y[..32]));
    es.dedup_by(|x, y| x[..32] == y[..32]);
    let mut v = b[..at].to_vec();
    v[12..20].copy_from_slice(&(es.len() as u64).to_le_bytes());
    for e in &es {
        v.extend_from_slice(e);
    }
    assert!(check(&v), "a valid body was refused");
});
