//! Keys and sealing: what makes a format-2 repository private and tamper-evident.
//!
//! * The **master key** is 64 random bytes made at `cbtfs init`: a 32-byte encryption key and a
//!   32-byte id key. It never leaves memory unwrapped; key slots (`keys`) hold it wrapped.
//! * A **chunk id** is BLAKE3 keyed with the id key over the chunk's plain bytes: equal blocks get
//!   equal ids (dedup), and ids reveal nothing about content to whoever lacks the key.
//! * **Sealing** (`seal`/`open`) is XChaCha20-Poly1305 with a fresh random 24-byte nonce per
//!   object: random 192-bit nonces make reuse negligible at any realistic count (2^-96 after
//!   2^48 seals), with no counter state to lose in a crash. The caller's `aad` binds a sealed
//!   blob to what it claims to be (a chunk to its id, an index to its object name), so a swapped
//!   or renamed object fails to open instead of yielding other bytes.
//! * With `--encryption none` the master key is stored in the plain repository header; sealing
//!   then keeps the plain bytes and appends a 16-byte keyed BLAKE3 tag, so damage is still
//!   detected (not tampering by someone who can read the header).
//!
//! Envelope of every sealed blob (first byte tells which):
//!
//! ```text
//! 0x01 | nonce (24) | ciphertext | Poly1305 tag (16)      encrypted
//! 0x00 | plain | BLAKE3-keyed(id key, aad || plain)[..16]  --encryption none
//! ```

use std::fmt;

/// Bytes a sealed blob adds to its plain bytes (encrypted: 1 + 24 + 16; none: 1 + 16).
pub const SEAL_OVERHEAD: usize = 41;

/// Secret key material. `Debug` never prints it.
#[derive(Clone)]
pub struct Keys {
    // helper: fields of your choice (enc key, id key, encrypted flag); zeroize on drop if cheap.
    _private: (),
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys {{ encrypted: {}, .. }}", self.encrypted())
    }
}

/// A chunk's name: BLAKE3 keyed with the repository's id key over its plain bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}
impl fmt::Display for ChunkId {
    /// Lowercase hex of the first 8 bytes (enough to name it in a message).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Why a sealed blob would not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("it fails its authentication tag (damaged, or not what it claims to be)")]
    Tag,
    #[error("it is {0} bytes, too short to be sealed")]
    Short(usize),
    #[error("its envelope kind {0:#04x} is unknown")]
    Kind(u8),
    #[error("it is encrypted, but this repository is not (or the reverse)")]
    Mode,
}

impl Keys {
    /// A new random master key (for `cbtfs init`). Errors only if the OS has no randomness.
    pub fn generate(encrypted: bool) -> std::io::Result<Keys> {
        let _ = encrypted;
        todo!()
    }
    /// The 64 master-key bytes (enc key || id key), to wrap in a key slot or store in the
    /// header of an unencrypted repository.
    pub fn master_bytes(&self) -> [u8; 64] {
        todo!()
    }
    /// Rebuild from `master_bytes`.
    pub fn from_master_bytes(bytes: &[u8; 64], encrypted: bool) -> Keys {
        let _ = (bytes, encrypted);
        todo!()
    }
    pub fn encrypted(&self) -> bool {
        todo!()
    }
    /// BLAKE3 keyed with the id key: the chunk's name.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        let _ = plain;
        todo!()
    }
    /// A keyed hash (hex, 32 chars) naming an object after a secret name (a host name, a VDI
    /// uuid) without revealing it: `context` separates uses ("host-pin", "journal").
    pub fn name_key(&self, context: &str, name: &str) -> String {
        let _ = (context, name);
        todo!()
    }
    /// Seal `plain`, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let _ = (aad, plain);
        todo!()
    }
    /// Seal into `out` (cleared first): the chunk path reuses its buffers.
    pub fn seal_into(&self, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) {
        let _ = (aad, plain, out);
        todo!()
    }
    /// Open a sealed blob bound to `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let _ = (aad, sealed);
        todo!()
    }
    /// Open into `out` (cleared first), avoiding an allocation per chunk on the read path.
    pub fn open_into(&self, aad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        let _ = (aad, sealed, out);
        todo!()
    }
}
