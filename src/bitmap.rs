//! CBT bitmaps as `VDI.list_changed_blocks` returns them: base64 of a bit string where block `i`
//! is bit `0x80 >> (i % 8)` of byte `i / 8` (the guide's `01100000` example: blocks 1 and 2).

use base64::Engine;
use roaring::RoaringBitmap;

#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error(
        "the changed-block bitmap is not valid base64 ({0}); pass the string exactly as VDI.list_changed_blocks returned it"
    )]
    NotBase64(String),
    #[error(
        "the changed-block bitmap covers {bits} blocks but the disk has {blocks} blocks of 64 KiB: it belongs to a smaller disk or was cut short; get it again with VDI.list_changed_blocks for this disk"
    )]
    TooShort { bits: u64, blocks: u64 },
}

/// Decode a base64 bitmap for a disk of `blocks` blocks. Bits past the disk's end (a bitmap from
/// a longer CBT log, legal after a resize) are ignored; a shorter bitmap is an error.
pub fn decode_base64(text: &str, blocks: u64) -> Result<RoaringBitmap, BitmapError> {
    let cleaned: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map_err(|e| BitmapError::NotBase64(e.to_string()))?;
    from_bytes(&bytes, blocks)
}

/// Decode raw bitmap bytes (MSB first) for a disk of `blocks` blocks.
pub fn from_bytes(bytes: &[u8], blocks: u64) -> Result<RoaringBitmap, BitmapError> {
    let bits = bytes.len() as u64 * 8;
    if bits < blocks {
        return Err(BitmapError::TooShort { bits, blocks });
    }
    let mut set = RoaringBitmap::new();
    for (i, &byte) in bytes.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                let block = i as u64 * 8 + bit;
                if block < blocks {
                    set.insert(block as u32);
                }
            }
        }
    }
    Ok(set)
}

/// Encode a set of blocks as the host would (used by tests and the simulated host).
pub fn encode_base64(set: &RoaringBitmap, blocks: u64) -> String {
    let mut bytes = vec![0u8; blocks.div_ceil(8) as usize];
    for b in set.iter() {
        let b = b as usize;
        if b / 8 < bytes.len() {
            bytes[b / 8] |= 0x80 >> (b % 8);
        }
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guide_example_01100000() {
        let s = base64::engine::general_purpose::STANDARD.encode([0b0110_0000]);
        let set = decode_base64(&s, 8).unwrap();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn excess_ignored_short_refused_garbage_refused() {
        let s = base64::engine::general_purpose::STANDARD.encode([0xff, 0xff]);
        assert_eq!(decode_base64(&s, 10).unwrap().len(), 10);
        assert!(matches!(
            decode_base64(&s, 17),
            Err(BitmapError::TooShort {
                bits: 16,
                blocks: 17
            })
        ));
        assert!(matches!(
            decode_base64("not base64!", 1),
            Err(BitmapError::NotBase64(_))
        ));
    }

    #[test]
    fn encode_decode_round_trip() {
        let set: RoaringBitmap = [0u32, 7, 8, 99].into_iter().collect();
        assert_eq!(decode_base64(&encode_base64(&set, 100), 100).unwrap(), set);
    }
}
