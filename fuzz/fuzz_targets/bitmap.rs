//! CBT bitmap decoding (`bitmap::decode_base64`, `from_bytes`) with a block count taken from the
//! input: never a panic; decoded blocks lie below the count; encoding and decoding again gives
//! the same set.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (head, rest) = data.split_at(8);
    let mut n = [0u8; 8];
    n.copy_from_slice(head);
    // Mostly small counts (near the input's bit length), sometimes any u64.
    let raw = u64::from_le_bytes(n);
    let blocks = if raw >> 63 == 1 {
        raw
    } else {
        raw % (rest.len() as u64 * 8 + 16)
    };
    if let Ok(set) = cbtfs::bitmap::from_bytes(rest, blocks) {
        assert!(set.max().is_none_or(|m| u64::from(m) < blocks));
        let enc = cbtfs::bitmap::encode_base64(&set, blocks);
        assert_eq!(
            cbtfs::bitmap::decode_base64(&enc, blocks).expect("own encoding"),
            set
        );
    }
    if let Ok(set) = cbtfs::bitmap::decode_base64(&String::from_utf8_lossy(rest), blocks) {
        assert!(set.max().is_none_or(|m| u64::from(m) < blocks));
    }
});
