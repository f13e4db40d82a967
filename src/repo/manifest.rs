//! Small JSON records with a trailing checksum: the repository header and point manifests.
//!
//! Encoding: the JSON document, then one line `cbtfs-crc32c:XXXXXXXX` (CRC-32C of the JSON bytes,
//! lowercase hex). Humans can read them; a flipped bit is detected before any field is trusted.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::error::{RepoError, Result};

const CRC_TAG: &[u8] = b"\ncbtfs-crc32c:";

/// Serialize `value` as a checksummed record.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing plain structs of strings and integers cannot fail.
    let mut out = serde_json::to_vec_pretty(value).unwrap_or_default();
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(CRC_TAG);
    out.extend_from_slice(format!("{crc:08x}\n").as_bytes());
    out
}

/// Check a record's checksum, its `format` name and `version`, then parse it.
pub fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    location: &str,
    what: &'static str,
    format: &str,
    supported_version: u64,
) -> Result<T> {
    let tag_at = bytes
        .windows(CRC_TAG.len())
        .rposition(|w| w == CRC_TAG)
        .ok_or_else(|| RepoError::corrupt(location, "checksum line missing (file truncated?)"))?;
    let (json, rest) = bytes.split_at(tag_at);
    let hex = std::str::from_utf8(&rest[CRC_TAG.len()..])
        .map_err(|_| RepoError::corrupt(location, "checksum line is not text"))?
        .trim_end();
    let stored = u32::from_str_radix(hex, 16)
        .map_err(|_| RepoError::corrupt(location, "checksum line is malformed"))?;
    let actual = crc32c::crc32c(json);
    if stored != actual {
        return Err(RepoError::corrupt(
            location,
            format!("checksum mismatch (stored {stored:08x}, computed {actual:08x})"),
        ));
    }
    let head: Head = serde_json::from_slice(json)
        .map_err(|e| RepoError::corrupt(location, format!("not a valid record: {e}")))?;
    if head.format != format {
        return Err(RepoError::corrupt(
            location,
            format!("expected a {format} record, found {:?}", head.format),
        ));
    }
    if head.version > supported_version {
        return Err(RepoError::UnsupportedVersion {
            what,
            location: location.to_string(),
            found: head.version,
            supported: supported_version,
        });
    }
    serde_json::from_slice(json)
        .map_err(|e| RepoError::corrupt(location, format!("invalid {what}: {e}")))
}

#[derive(Deserialize)]
struct Head {
    format: String,
    version: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct R {
        format: String,
        version: u64,
        x: u32,
    }

    fn rec(version: u64) -> R {
        R {
            format: "t".into(),
            version,
            x: 7,
        }
    }

    #[test]
    fn round_trip_and_every_bit_flip_is_caught() {
        let bytes = encode(&rec(1));
        let back: R = decode(&bytes, "f", "test record", "t", 1).unwrap();
        assert_eq!(back, rec(1));
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                // Either refused, or (a flip inside trailing whitespace of the hex) the same record.
                if let Ok(r) = decode::<R>(&b, "f", "test record", "t", 1) {
                    assert_eq!(
                        r,
                        rec(1),
                        "flip at byte {i} bit {bit} gave a different record"
                    );
                }
            }
        }
        for n in 0..bytes.len() {
            if let Ok(r) = decode::<R>(&bytes[..n], "f", "test record", "t", 1) {
                assert_eq!(r, rec(1));
            }
        }
    }

    #[test]
    fn newer_version_is_refused_clearly() {
        let bytes = encode(&rec(9));
        let err = decode::<R>(&bytes, "f", "test record", "t", 1).unwrap_err();
        assert!(matches!(
            err,
            RepoError::UnsupportedVersion { found: 9, .. }
        ));
        assert!(err.to_string().contains("upgrade cbtfs"));
    }
}
