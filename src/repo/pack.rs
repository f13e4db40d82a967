//! Chunks and packs: how block bytes are stored.
//!
//! A **chunk** is one 64 KiB block's bytes, named by its `ChunkId`. Stored, it is a sealed record
//! (`Keys::seal`, aad = `b"chunk" || id`) of: one codec byte (0 = stored as is, 1 = zstd) and the
//! payload. zstd (level `ZSTD_LEVEL`) is kept only when it is smaller. A chunk's plain length is
//! 64 KiB except possibly a disk's last block, which is zero-padded to 64 KiB before hashing.
//!
//! A **pack** is an immutable object `packs/<2 hex>/<32 hex pack id>` holding chunk records back
//! to back, then a sealed trailer listing them, so a pack describes itself (verify and index
//! rebuilds read it):
//!
//! ```text
//! record 0 | record 1 | … | sealed trailer | trailer length (u32 LE) | "CBTFSPK" 0x02
//! trailer (plain): n (u32 LE), then n × { chunk id (32), offset (u32 LE), length (u32 LE) }
//! ```
//!
//! The trailer is sealed with aad = `b"pack" || pack id`. Packs are cut at `PACK_TARGET` bytes.

use super::crypto::{ChunkId, Keys, SealError};

/// A pack is finished once it holds at least this many bytes.
pub const PACK_TARGET: usize = 32 << 20;
pub const ZSTD_LEVEL: i32 = 1;
pub const PACK_MAGIC: [u8; 8] = *b"CBTFSPK\x02";
/// Most chunks a trailer may list (bounds what a damaged trailer makes a reader allocate).
pub const MAX_PACK_CHUNKS: u32 = 1 << 20;

/// A pack's name: 16 random bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    pub fn random() -> std::io::Result<PackId> {
        todo!()
    }
    /// Its object key: `packs/<first 2 hex>/<32 hex>`.
    pub fn key(&self) -> String {
        todo!()
    }
    /// Parse a key made by `key` (None for anything else).
    pub fn from_key(key: &str) -> Option<PackId> {
        let _ = key;
        todo!()
    }
}
impl std::fmt::Debug for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}
impl std::fmt::Display for PackId {
    /// The 32 hex digits.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Where a chunk's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLocation {
    pub pack: PackId,
    pub offset: u32,
    pub len: u32,
}

/// Why a chunk record would not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("{0}")]
    Seal(#[from] SealError),
    #[error("its codec byte {0} is unknown")]
    Codec(u8),
    #[error("it does not decompress to 64 KiB: {0}")]
    Decompress(String),
    /// Only possible with `--encryption none` (an encrypted record is bound to its id).
    #[error("its bytes do not hash to its name")]
    Hash,
}

/// An encoded chunk, ready to go into a pack.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    pub id: ChunkId,
    /// The sealed record.
    pub record: Vec<u8>,
    /// Whether zstd was kept (for statistics).
    pub compressed: bool,
}

/// Hash, compress and seal one block (`plain` is exactly 64 KiB).
pub fn encode_chunk(keys: &Keys, plain: &[u8]) -> EncodedChunk {
    let _ = (keys, plain);
    todo!()
}

/// The same with the id already computed (`keys.chunk_id(plain)`): the writer hashes first,
/// skips chunks the repository has, and encodes only the rest.
pub fn encode_chunk_with_id(keys: &Keys, id: ChunkId, plain: &[u8]) -> EncodedChunk {
    let _ = (keys, id, plain);
    todo!()
}

/// Open, decompress and check a chunk record into `out` (exactly 64 KiB). `scratch` is reused
/// between calls.
pub fn decode_chunk(
    keys: &Keys,
    id: &ChunkId,
    record: &[u8],
    out: &mut [u8],
    scratch: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    let _ = (keys, id, record, out, scratch);
    todo!()
}

/// Builds one pack in memory.
pub struct PackWriter {
    _private: (),
}

impl PackWriter {
    pub fn new() -> std::io::Result<PackWriter> {
        todo!()
    }
    pub fn id(&self) -> PackId {
        todo!()
    }
    /// Append a record; returns where it is.
    pub fn add(&mut self, id: ChunkId, record: &[u8]) -> ChunkLocation {
        let _ = (id, record);
        todo!()
    }
    /// Bytes so far (records only).
    pub fn len(&self) -> usize {
        todo!()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn chunk_count(&self) -> usize {
        todo!()
    }
    /// Seal the trailer and return the whole pack's bytes and its chunks' locations.
    pub fn finish(self, keys: &Keys) -> (PackId, Vec<u8>, Vec<(ChunkId, ChunkLocation)>) {
        let _ = keys;
        todo!()
    }
}

/// Read a pack's trailer from the store (two ranged reads: the fixed tail, then the trailer):
/// its chunks and their locations. Every length and count is checked against the pack's
/// length before use; damage is `RepoError::Corrupt` naming the pack.
pub fn read_pack_chunks(
    store: &dyn super::store::Store,
    keys: &Keys,
    pack: PackId,
    pack_len: u64,
) -> super::error::Result<Vec<(ChunkId, ChunkLocation)>> {
    let _ = (store, keys, pack, pack_len);
    todo!()
}
