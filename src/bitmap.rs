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
    #[error(
        "the disk has {blocks} blocks of 64 KiB, more than cbtfs stores (block numbers are 32-bit: disks up to 256 TiB)"
    )]
    TooManyBlocks { blocks: u64 },
}

/// Most blocks a disk may have: block numbers are u32 (roaring bitmaps).
const MAX_BLOCKS: u64 = u32::MAX as u64;

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
    if blocks > MAX_BLOCKS {
        return Err(BitmapError::TooManyBlocks { blocks });
    }
    let bits = (bytes.len() as u64).saturating_mul(8);
    if bits < blocks {
        return Err(BitmapError::TooShort { bits, blocks });
    }
    let mut set = RoaringBitmap::new();
    // Only the bytes that cover the disk: the excess of a longer CBT log is ignored.
    let used = usize::try_from(blocks.div_ceil(8)).unwrap_or(usize::MAX);
    for (i, &byte) in bytes.iter().take(used).enumerate() {
        if byte == 0 {
            continue;
        }
        for bit in 0..8u32 {
            if byte & (0x80 >> bit) != 0
                && let Some(block) = u32::try_from(i)
                    .ok()
                    .and_then(|i| i.checked_mul(8))
                    .and_then(|b| b.checked_add(bit))
                && u64::from(block) < blocks
            {
                set.insert(block);
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
    fn block_counts_beyond_32_bits_are_refused_not_truncated() {
        assert!(matches!(
            from_bytes(&[0xff; 4], 1 << 32),
            Err(BitmapError::TooManyBlocks { blocks: 4294967296 })
        ));
        assert_eq!(from_bytes(&[0xff; 4], 0).unwrap().len(), 0);
    }

    #[test]
    fn encode_decode_round_trip() {
        let set: RoaringBitmap = [0u32, 7, 8, 99].into_iter().collect();
        assert_eq!(decode_base64(&encode_base64(&set, 100), 100).unwrap(), set);
    }
}
