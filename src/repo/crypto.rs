//! Keys and sealing: what makes a format-2 repository private and tamper-evident.
//!
//! * The **master key** is 64 random bytes made at `cbtfs init`: a 32-byte encryption key and a
//!   32-byte id key. It never leaves memory unwrapped; key slots (`keys`) hold it wrapped.
//! * A **chunk id** is BLAKE3 keyed with the id key over the chunk's plain bytes: equal blocks get
//!   equal ids (dedup), and ids reveal nothing about content to whoever lacks the key.
//! * **Sealing** (`seal`/`open`) is AES-256-GCM under a key of its own per object: a fresh
//!   random 24-byte nonce is drawn, and the object's key is BLAKE3 keyed with (a key derived
//!   from) the encryption key over that nonce, so no AES key ever seals two objects and random
//!   192-bit nonces make a repeated key negligible at any realistic count (2^-96 after 2^48
//!   seals), with no counter state to lose in a crash. AES-GCM with AES-NI runs ~5× faster than
//!   XChaCha20-Poly1305 in software on the backup path; blobs sealed with XChaCha20-Poly1305
//!   (envelope 0x01, the first format-2 builds) still open. The caller's `aad` binds a sealed
//!   blob to what it claims to be (a chunk to its id, an index to its object name), so a swapped
//!   or renamed object fails to open instead of yielding other bytes.
//! * With `--encryption none` the master key is stored in the plain repository header; sealing
//!   then keeps the plain bytes and appends a 16-byte keyed BLAKE3 tag, so damage is still
//!   detected (not tampering by someone who can read the header).
//!
//! Envelope of every sealed blob (first byte tells which):
//!
//! ```text
//! 0x02 | nonce (24) | ciphertext | GCM tag (16)           encrypted (AES-256-GCM, per-object key)
//! 0x01 | nonce (24) | ciphertext | Poly1305 tag (16)      encrypted (XChaCha20-Poly1305; read only)
//! 0x00 | plain | BLAKE3-keyed(id key, aad || plain)[..16]  --encryption none
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroize;

/// Bytes a sealed blob adds to its plain bytes (encrypted: 1 + 24 + 16; none: 1 + 16).
pub const SEAL_OVERHEAD: usize = 41;

/// Envelope kind byte of a blob sealed with `--encryption none`.
const KIND_NONE: u8 = 0x00;
/// Envelope kind byte of a blob encrypted with XChaCha20-Poly1305 (still read, never written).
const KIND_ENCRYPTED: u8 = 0x01;
/// Envelope kind byte of a blob encrypted with AES-256-GCM under a per-object key.
const KIND_AES: u8 = 0x02;
/// XChaCha20 nonce length.
const NONCE_LEN: usize = 24;
/// Poly1305 tag length, and the length of the keyed BLAKE3 tag of the none envelope.
const TAG_LEN: usize = 16;
/// Where an encrypted blob's ciphertext starts.
const CT_AT: usize = 1 + NONCE_LEN;
/// Overhead of the none envelope (never more than `SEAL_OVERHEAD`).
const NONE_OVERHEAD: usize = 1 + TAG_LEN;

const _: () = assert!(SEAL_OVERHEAD == CT_AT + TAG_LEN);
const _: () = assert!(NONE_OVERHEAD <= SEAL_OVERHEAD);

/// Secret key material. `Debug` never prints it. The key bytes are wiped when dropped.
#[derive(Clone)]
pub struct Keys {
    enc: [u8; 32],
    id: [u8; 32],
    encrypted: bool,
    /// The AEAD keyed with `enc` (it wipes its own copy on drop).
    aead: XChaCha20Poly1305,
    /// BLAKE3 `derive_key("cbtfs 2026 aes-256-gcm object keys", enc)`: keys the per-object
    /// AES keys.
    aes_root: [u8; 32],
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.id.zeroize();
        self.aes_root.zeroize();
    }
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
        let mut bytes = [0u8; 64];
        getrandom::fill(&mut bytes).map_err(random_error)?;
        let keys = Keys::from_master_bytes(&bytes, encrypted);
        bytes.zeroize();
        Ok(keys)
    }
    /// The 64 master-key bytes (enc key || id key), to wrap in a key slot or store in the
    /// header of an unencrypted repository.
    pub fn master_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.enc);
        out[32..].copy_from_slice(&self.id);
        out
    }
    /// Rebuild from `master_bytes`.
    pub fn from_master_bytes(bytes: &[u8; 64], encrypted: bool) -> Keys {
        let mut enc = [0u8; 32];
        let mut id = [0u8; 32];
        enc.copy_from_slice(&bytes[..32]);
        id.copy_from_slice(&bytes[32..]);
        let aead = XChaCha20Poly1305::new(&enc.into());
        let aes_root = blake3::derive_key("cbtfs 2026 aes-256-gcm object keys", &enc);
        Keys {
            enc,
            id,
            encrypted,
            aead,
            aes_root,
        }
    }
    pub fn encrypted(&self) -> bool {
        self.encrypted
    }
    /// BLAKE3 keyed with the id key: the chunk's name.
    pub fn chunk_id(&self, plain: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id, plain).as_bytes())
    }
    /// A keyed hash (hex, 32 chars) naming an object after a secret name (a host name, a VDI
    /// uuid) without revealing it: `context` separates uses ("host-pin", "journal").
    ///
    /// The per-context key is BLAKE3 `derive_key("cbtfs 2026 name key: " + context, id key)`;
    /// the name is hashed keyed with it and the first 16 bytes are kept.
    pub fn name_key(&self, context: &str, name: &str) -> String {
        let mut key = blake3::derive_key(&format!("cbtfs 2026 name key: {context}"), &self.id);
        let hash = blake3::keyed_hash(&key, name.as_bytes());
        key.zeroize();
        let mut out = String::with_capacity(32);
        for b in &hash.as_bytes()[..16] {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }
    /// Seal `plain`, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len().saturating_add(SEAL_OVERHEAD));
        self.seal_into(aad, plain, &mut out);
        out
    }
    /// Seal into `out` (cleared first): the chunk path reuses its buffers.
    pub fn seal_into(&self, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) {
        out.clear();
        self.seal_append(aad, plain, out);
    }
    /// Seal `plain` onto the end of `out` (what is there already stays). Returns the sealed
    /// blob's length.
    pub fn seal_append(&self, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) -> usize {
        let start = out.len();
        let at = self.plain_at();
        out.resize(start + plain.len() + self.overhead(), 0);
        out[start + at..start + at + plain.len()].copy_from_slice(plain);
        let len = self.seal_in_place(aad, &mut out[start..], plain.len());
        out.truncate(start + len);
        len
    }
    /// Where a sealed blob's plain bytes go in `seal_in_place`'s slot.
    pub fn plain_at(&self) -> usize {
        if self.encrypted { CT_AT } else { 1 }
    }
    /// Bytes sealing adds to the plain bytes in this repository's mode.
    pub fn overhead(&self) -> usize {
        if self.encrypted {
            SEAL_OVERHEAD
        } else {
            NONE_OVERHEAD
        }
    }
    /// Seal in place: `slot[plain_at()..][..plain_len]` holds the plain bytes; the envelope is
    /// written around them. `slot` must hold `plain_len + overhead()` bytes. Returns the sealed
    /// length, or 0 (a blob that never opens) if `slot` is too short or the AEAD refuses, which
    /// the callers' sizes rule out. The writer seals each chunk where it lies in the pack.
    pub fn seal_in_place(&self, aad: &[u8], slot: &mut [u8], plain_len: usize) -> usize {
        let total = plain_len.saturating_add(self.overhead());
        let Some(slot) = slot.get_mut(..total) else {
            return 0;
        };
        if !self.encrypted {
            let (head, rest) = slot.split_at_mut(1);
            head[0] = KIND_NONE;
            let (plain, tag) = rest.split_at_mut(plain_len);
            tag.copy_from_slice(&self.none_tag(aad, plain));
            return total;
        }
        let nonce = fresh_nonce(&self.id);
        let (head, rest) = slot.split_at_mut(CT_AT);
        head[0] = KIND_AES;
        head[1..].copy_from_slice(&nonce);
        let (body, tag_out) = rest.split_at_mut(plain_len);
        let sealed = self.aes_key(&nonce).and_then(|key| {
            key.seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key([0u8; 12]),
                ring::aead::Aad::from(aad),
                body,
            )
            .ok()
        });
        match sealed {
            Some(tag) => {
                tag_out.copy_from_slice(tag.as_ref());
                total
            }
            None => {
                // Unreachable for real sizes; never leave plain bytes under an "encrypted"
                // envelope.
                slot.fill(0);
                0
            }
        }
    }
    /// The AES-256-GCM key of the object sealed with `nonce`: used for that one object only,
    /// so GCM's own nonce can stay zero.
    fn aes_key(&self, nonce: &[u8]) -> Option<ring::aead::LessSafeKey> {
        let mut k = *blake3::keyed_hash(&self.aes_root, nonce).as_bytes();
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &k).ok();
        k.zeroize();
        key.map(ring::aead::LessSafeKey::new)
    }
    /// Open a sealed blob bound to `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::with_capacity(sealed.len().saturating_sub(NONE_OVERHEAD));
        self.open_into(aad, sealed, &mut out)?;
        Ok(out)
    }
    /// Open into `out` (cleared first), avoiding an allocation per chunk on the read path.
    pub fn open_into(&self, aad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        out.clear();
        let Some((&kind, rest)) = sealed.split_first() else {
            return Err(SealError::Short(0));
        };
        match kind {
            KIND_NONE => {
                if self.encrypted {
                    return Err(SealError::Mode);
                }
                let Some(plain_len) = rest.len().checked_sub(TAG_LEN) else {
                    return Err(SealError::Short(sealed.len()));
                };
                let (plain, tag) = rest.split_at(plain_len);
                let want = self.none_tag(aad, plain);
                if !ct_eq(&want, tag) {
                    return Err(SealError::Tag);
                }
                out.extend_from_slice(plain);
                Ok(())
            }
            KIND_ENCRYPTED => {
                if !self.encrypted {
                    return Err(SealError::Mode);
                }
                if sealed.len() < SEAL_OVERHEAD {
                    return Err(SealError::Short(sealed.len()));
                }
                let (nonce, body) = rest.split_at(NONCE_LEN);
                let (ct, tag) = body.split_at(body.len() - TAG_LEN);
                out.extend_from_slice(ct);
                let nonce = XNonce::from_slice(nonce);
                let tag = chacha20poly1305::Tag::from_slice(tag);
                if self
                    .aead
                    .decrypt_in_place_detached(nonce, aad, out, tag)
                    .is_err()
                {
                    out.clear();
                    return Err(SealError::Tag);
                }
                Ok(())
            }
            KIND_AES => {
                if !self.encrypted {
                    return Err(SealError::Mode);
                }
                if sealed.len() < SEAL_OVERHEAD {
                    return Err(SealError::Short(sealed.len()));
                }
                let (nonce, body) = rest.split_at(NONCE_LEN);
                out.extend_from_slice(body);
                let opened = self.aes_key(nonce).is_some_and(|key| {
                    key.open_in_place(
                        ring::aead::Nonce::assume_unique_for_key([0u8; 12]),
                        ring::aead::Aad::from(aad),
                        out,
                    )
                    .is_ok()
                });
                if !opened {
                    out.clear();
                    return Err(SealError::Tag);
                }
                out.truncate(body.len() - TAG_LEN);
                Ok(())
            }
            other => Err(SealError::Kind(other)),
        }
    }

    /// The none envelope's tag: BLAKE3 keyed with the id key over
    /// `u64le(aad.len()) || aad || plain`, first 16 bytes (the length prefix keeps the
    /// aad/plain boundary unambiguous).
    fn none_tag(&self, aad: &[u8], plain: &[u8]) -> [u8; TAG_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.id);
        h.update(&(aad.len() as u64).to_le_bytes());
        h.update(aad);
        h.update(plain);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&h.finalize().as_bytes()[..TAG_LEN]);
        tag
    }
}

/// Wrap `plain` (a master key) under a key-encryption key: `nonce (24) | ct | tag (16)`, for key
/// slots.
pub(crate) fn wrap(kek: &[u8; 32], aad: &[u8], plain: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(random_error)?;
    let aead = XChaCha20Poly1305::new(kek.into());
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = match out.get_mut(NONCE_LEN..) {
        Some(body) => aead.encrypt_in_place_detached(&XNonce::from(nonce), aad, body),
        None => Err(chacha20poly1305::aead::Error),
    }
    .map_err(|_| std::io::Error::other("the key could not be wrapped"))?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Unwrap what `wrap` made; `None` if the tag fails (wrong key, or damage) or the length is off.
/// The caller wipes the returned bytes.
pub(crate) fn unwrap(kek: &[u8; 32], aad: &[u8], wrapped: &[u8]) -> Option<Vec<u8>> {
    let body_len = wrapped.len().checked_sub(NONCE_LEN + TAG_LEN)?;
    let (nonce, rest) = wrapped.split_at(NONCE_LEN);
    let (ct, tag) = rest.split_at(body_len);
    let aead = XChaCha20Poly1305::new(kek.into());
    let mut out = ct.to_vec();
    match aead.decrypt_in_place_detached(
        XNonce::from_slice(nonce),
        aad,
        &mut out,
        chacha20poly1305::Tag::from_slice(tag),
    ) {
        Ok(()) => Some(out),
        Err(_) => {
            out.zeroize();
            None
        }
    }
}

/// The OS refused randomness: as an I/O error.
pub(crate) fn random_error(e: getrandom::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::other(format!("the OS gave no random bytes: {e}")),
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Constant-time equality of two tags (lengths are public).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh 24-byte nonce from the OS. Should the OS refuse randomness (never seen on Linux
/// after boot), fall back to a unique nonce: BLAKE3 keyed (a key derived from the id key) over
/// the process id, a per-process counter and the clock, so two seals never share one anyway.
fn fresh_nonce(id_key: &[u8; 32]) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    if getrandom::fill(&mut nonce).is_ok() {
        return nonce;
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut key = blake3::derive_key("cbtfs 2026 fallback nonce", id_key);
    let mut h = blake3::Hasher::new_keyed(&key);
    key.zeroize();
    h.update(&std::process::id().to_le_bytes());
    h.update(&n.to_le_bytes());
    h.update(&now.to_le_bytes());
    nonce.copy_from_slice(&h.finalize().as_bytes()[..NONCE_LEN]);
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(encrypted: bool) -> Keys {
        let mut m = [0u8; 64];
        for (i, b) in m.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        Keys::from_master_bytes(&m, encrypted)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i.wrapping_mul(131) >> 3) as u8).collect()
    }

    #[test]
    fn overhead_is_what_the_envelopes_add() {
        for encrypted in [true, false] {
            let k = keys(encrypted);
            for n in [0usize, 1, 100] {
                let s = k.seal(b"a", &pattern(n));
                let over = s.len() - n;
                if encrypted {
                    assert_eq!(over, SEAL_OVERHEAD);
                    assert_eq!(s[0], KIND_AES);
                } else {
                    assert_eq!(over, 17);
                    assert!(over <= SEAL_OVERHEAD);
                    assert_eq!(s[0], 0x00);
                    assert_eq!(&s[1..1 + n], &pattern(n)[..]);
                }
            }
        }
    }

    #[test]
    fn round_trips_at_edge_sizes() {
        for encrypted in [true, false] {
            let k = keys(encrypted);
            let mut sealed = Vec::new();
            let mut opened = vec![0xAA; 7];
            for n in [0usize, 1, 65535, 65536, 65577] {
                let plain = pattern(n);
                k.seal_into(b"chunk", &plain, &mut sealed);
                assert_eq!(sealed.len(), n + if encrypted { 41 } else { 17 });
                if encrypted && n > 64 {
                    assert_ne!(&sealed[25..25 + 64], &plain[..64], "not encrypted");
                }
                k.open_into(b"chunk", &sealed, &mut opened).unwrap();
                assert_eq!(opened, plain, "size {n} encrypted {encrypted}");
                assert_eq!(k.open(b"chunk", &sealed).unwrap(), plain);
                assert_eq!(k.open(b"chunk", &k.seal(b"chunk", &plain)).unwrap(), plain);
            }
        }
    }

    fn flip_fails(k: &Keys, sealed: &[u8], byte: usize, bit: u8) {
        let mut b = sealed.to_vec();
        b[byte] ^= 1 << bit;
        let mut out = Vec::new();
        let r = k.open_into(b"x", &b, &mut out);
        assert!(r.is_err(), "flip of byte {byte} bit {bit} opened");
        assert!(out.is_empty(), "failed open left bytes in out");
    }

    #[test]
    fn every_bit_flip_of_a_small_blob_fails() {
        for encrypted in [true, false] {
            let k = keys(encrypted);
            for n in [0usize, 1, 33] {
                let sealed = k.seal(b"x", &pattern(n));
                for byte in 0..sealed.len() {
                    for bit in 0..8 {
                        flip_fails(&k, &sealed, byte, bit);
                    }
                }
            }
        }
    }

    #[test]
    fn bit_flips_of_a_large_blob_fail() {
        for encrypted in [true, false] {
            let k = keys(encrypted);
            let sealed = k.seal(b"x", &pattern(65536));
            let len = sealed.len();
            let mut positions = vec![0, 1, 12, 24, 25, 26, len / 2, len - 17, len - 16, len - 1];
            positions.extend((0..len).step_by(4093));
            for byte in positions {
                for bit in [0, 3, 7] {
                    flip_fails(&k, &sealed, byte, bit);
                }
            }
            // Truncation and extension fail as well.
            assert!(k.open(b"x", &sealed[..len - 1]).is_err());
            let mut longer = sealed.clone();
            longer.push(0);
            assert!(k.open(b"x", &longer).is_err());
        }
    }

    #[test]
    fn wrong_aad_wrong_key_and_wrong_mode_fail() {
        for encrypted in [true, false] {
            let k = keys(encrypted);
            let sealed = k.seal(b"chunk:1", b"hello");
            assert_eq!(k.open(b"chunk:2", &sealed), Err(SealError::Tag));
            assert_eq!(k.open(b"", &sealed), Err(SealError::Tag));
            // The aad/plain boundary is bound too (none mode hashes them together).
            let other = k.seal(b"chunk:", b"1hello");
            assert_eq!(k.open(b"chunk:1", &other), Err(SealError::Tag));
            let mut m = k.master_bytes();
            m[0] ^= 1;
            m[40] ^= 1;
            let k2 = Keys::from_master_bytes(&m, encrypted);
            assert_eq!(k2.open(b"chunk:1", &sealed), Err(SealError::Tag));
            let other_mode = Keys::from_master_bytes(&k.master_bytes(), !encrypted);
            assert_eq!(other_mode.open(b"chunk:1", &sealed), Err(SealError::Mode));
        }
    }

    #[test]
    fn short_and_unknown_blobs_are_refused() {
        let e = keys(true);
        let n = keys(false);
        assert_eq!(e.open(b"", b""), Err(SealError::Short(0)));
        assert_eq!(n.open(b"", b""), Err(SealError::Short(0)));
        assert_eq!(e.open(b"", &[1u8; 40]), Err(SealError::Short(40)));
        assert_eq!(n.open(b"", &[0u8; 16]), Err(SealError::Short(16)));
        assert_eq!(e.open(b"", &[3u8; 80]), Err(SealError::Kind(3)));
        assert_eq!(e.open(b"", &[2u8; 40]), Err(SealError::Short(40)));
        assert_eq!(e.open(b"", &[2u8; 41]), Err(SealError::Tag));
        assert_eq!(n.open(b"", &[0xffu8; 80]), Err(SealError::Kind(0xff)));
        assert_eq!(e.open(b"", &[1u8; 41]), Err(SealError::Tag));
    }

    /// Blobs sealed by the first format-2 builds (XChaCha20-Poly1305, envelope 0x01) still
    /// open, and stay bound to their aad.
    #[test]
    fn xchacha_sealed_blobs_still_open() {
        let k = keys(true);
        let plain = pattern(1000);
        let nonce = [9u8; NONCE_LEN];
        let mut body = plain.clone();
        let tag = k
            .aead
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), b"chunk:7", &mut body)
            .expect("seal");
        let mut blob = vec![KIND_ENCRYPTED];
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&body);
        blob.extend_from_slice(&tag);
        assert_eq!(k.open(b"chunk:7", &blob).as_deref(), Ok(&plain[..]));
        assert_eq!(k.open(b"chunk:8", &blob), Err(SealError::Tag));
        blob[30] ^= 4;
        assert_eq!(k.open(b"chunk:7", &blob), Err(SealError::Tag));
    }

    /// Sealing in place gives a blob that opens, in both modes, and a too-short slot gives
    /// nothing rather than a partial envelope.
    #[test]
    fn sealing_in_place_opens_and_refuses_short_slots() {
        for encrypted in [true, false] {
            let k = keys(encrypted);
            let plain = pattern(5000);
            let mut slot = vec![0xeeu8; plain.len() + k.overhead() + 7];
            slot[k.plain_at()..k.plain_at() + plain.len()].copy_from_slice(&plain);
            let n = k.seal_in_place(b"x", &mut slot, plain.len());
            assert_eq!(n, plain.len() + k.overhead());
            assert_eq!(k.open(b"x", &slot[..n]).as_deref(), Ok(&plain[..]));
            assert_eq!(slot[n..], [0xee; 7]);
            let mut short = vec![0u8; plain.len() + k.overhead() - 1];
            assert_eq!(k.seal_in_place(b"x", &mut short, plain.len()), 0);
        }
    }

    #[test]
    fn two_seals_of_the_same_plain_differ() {
        let k = keys(true);
        let a = k.seal(b"x", b"same bytes");
        let b = k.seal(b"x", b"same bytes");
        assert_ne!(a, b);
        assert_ne!(a[1..25], b[1..25], "nonces must differ");
        assert_eq!(k.open(b"x", &a).unwrap(), k.open(b"x", &b).unwrap());
    }

    #[test]
    fn master_bytes_round_trip_and_generate_is_random() {
        let k = keys(true);
        let k2 = Keys::from_master_bytes(&k.master_bytes(), true);
        assert_eq!(k.master_bytes(), k2.master_bytes());
        assert_eq!(k2.open(b"a", &k.seal(b"a", b"p")).unwrap(), b"p");
        let g1 = Keys::generate(true).unwrap();
        let g2 = Keys::generate(false).unwrap();
        assert!(g1.encrypted());
        assert!(!g2.encrypted());
        assert_ne!(g1.master_bytes(), g2.master_bytes());
        assert!(!format!("{g1:?}").contains(&format!("{}", g1.master_bytes()[0])));
    }

    #[test]
    fn chunk_ids_and_name_keys() {
        let k = keys(true);
        let id = k.chunk_id(b"block");
        assert_eq!(id.0, *blake3::keyed_hash(&k.id, b"block").as_bytes());
        assert_ne!(id, keys(false).chunk_id(b"block2"));
        // Same id key, either mode: same ids (the id does not depend on encryption).
        assert_eq!(id, keys(false).chunk_id(b"block"));
        assert_eq!(id.to_string().len(), 16);
        let a = k.name_key("host-pin", "xen1");
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(a, k.name_key("host-pin", "xen1"));
        assert_ne!(a, k.name_key("journal", "xen1"));
        assert_ne!(a, k.name_key("host-pin", "xen2"));
        let sub = blake3::derive_key("cbtfs 2026 name key: host-pin", &k.id);
        let want = blake3::keyed_hash(&sub, b"xen1");
        assert_eq!(a, want.to_hex()[..32]);
    }

    #[test]
    fn wrapped_keys_open_only_with_their_kek_and_aad() {
        let kek = [7u8; 32];
        let w = wrap(&kek, b"slot", &[9u8; 64]).unwrap();
        assert_eq!(w.len(), 24 + 64 + 16);
        assert_eq!(unwrap(&kek, b"slot", &w).unwrap(), vec![9u8; 64]);
        assert!(unwrap(&[8u8; 32], b"slot", &w).is_none());
        assert!(unwrap(&kek, b"slot2", &w).is_none());
        assert!(unwrap(&kek, b"slot", &w[..39]).is_none());
        assert!(unwrap(&kek, b"slot", &[]).is_none());
    }
}
