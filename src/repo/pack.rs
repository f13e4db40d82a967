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

use std::cell::RefCell;

use super::crypto::{ChunkId, Keys, SealError};
use super::error::RepoError;

/// A pack is finished once it holds at least this many bytes.
pub const PACK_TARGET: usize = 32 << 20;
/// Room reserved past `PACK_TARGET` in a pack's buffer: the last record and a typical trailer.
const PACK_SLACK: usize = 1 << 20;
/// zstd's fastest level: backups are bound by the source's read rate and by this CPU cost;
/// higher levels gain little on disk images (most of whose savings are zero blocks, never
/// stored).
pub const ZSTD_LEVEL: i32 = 1;
pub const PACK_MAGIC: [u8; 8] = *b"CBTFSPK\x02";
/// Most chunks a trailer may list (bounds what a damaged trailer makes a reader allocate).
pub const MAX_PACK_CHUNKS: u32 = 1 << 20;
/// The plain length of every chunk: one block.
pub const CHUNK_LEN: usize = 64 << 10;
/// The fixed end of a pack: trailer length (u32 LE) and `PACK_MAGIC`.
pub const PACK_TAIL_LEN: usize = 12;
/// One trailer entry: chunk id (32), offset (u32), length (u32).
pub const TRAILER_ENTRY_LEN: usize = 40;
/// Codec byte of a chunk stored as is.
pub const CODEC_RAW: u8 = 0;
/// Codec byte of a zstd-compressed chunk.
pub const CODEC_ZSTD: u8 = 1;

/// A pack's name: 16 random bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackId(pub [u8; 16]);

const PACK_PREFIX: &str = "packs/";

impl PackId {
    pub fn random() -> std::io::Result<PackId> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).map_err(|e| {
            std::io::Error::other(format!("the OS gave no random bytes for a pack name: {e}"))
        })?;
        Ok(PackId(b))
    }
    /// Its object key: `packs/<first 2 hex>/<32 hex>`.
    pub fn key(&self) -> String {
        let hex = self.to_string();
        format!("{PACK_PREFIX}{}/{hex}", &hex[..2])
    }
    /// Parse a key made by `key` (None for anything else).
    pub fn from_key(key: &str) -> Option<PackId> {
        let rest = key.strip_prefix(PACK_PREFIX)?;
        let (dir, name) = rest.split_once('/')?;
        let id = parse_hex16(name)?;
        // `name` is 32 ASCII hex digits here, so slicing at 2 is on a char boundary.
        if dir.len() != 2 || name.get(..2) != Some(dir) {
            return None;
        }
        Some(PackId(id))
    }
}

/// 32 lowercase hex digits to 16 bytes (None for anything else).
pub(crate) fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
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

/// The aad binding a chunk record to its id: `b"chunk" || id`.
fn chunk_aad(id: &ChunkId) -> [u8; 37] {
    let mut aad = [0u8; 37];
    aad[..5].copy_from_slice(b"chunk");
    aad[5..].copy_from_slice(&id.0);
    aad
}

/// Encoder state: a zstd context. Made once per thread or
/// per writer worker (a zstd context is ~1 MiB of tables: making one per chunk, or per run of
/// chunks, would dominate the cost).
pub struct Encoder {
    /// None if zstd could not make a context (out of memory): chunks are then stored raw.
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder {
            zstd: zstd::bulk::Compressor::new(ZSTD_LEVEL).ok(),
        }
    }

    /// Compress (when smaller) and seal one block under `id`, appending the record to `out`.
    /// Returns the record's length and whether zstd was kept.
    pub fn encode_append(
        &mut self,
        keys: &Keys,
        id: ChunkId,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> (usize, bool) {
        let start = out.len();
        out.resize(start + max_record_len(keys, plain.len()), 0);
        let (len, compressed) = self.encode_in_place(keys, id, plain, &mut out[start..]);
        out.truncate(start + len);
        (len, compressed)
    }

    /// Compress (when smaller) and seal one block under `id` into the front of `slot`, which
    /// must hold `max_record_len(keys, plain.len())` bytes. Returns the record's length (0 if
    /// the slot is too short: a caller's bug) and whether zstd was kept.
    pub fn encode_in_place(
        &mut self,
        keys: &Keys,
        id: ChunkId,
        plain: &[u8],
        slot: &mut [u8],
    ) -> (usize, bool) {
        let at = keys.plain_at();
        let Some(body) = slot.get_mut(at..at + 1 + plain.len()) else {
            return (0, false);
        };
        // zstd may write at most `plain.len() - 1` bytes: a result that does not fit is not
        // smaller than the block, and is not kept.
        let compressed_len = match (self.zstd.as_mut(), plain.len().checked_sub(1)) {
            (Some(z), Some(room)) if room > 0 && !looks_incompressible(plain) => body
                .get_mut(1..1 + room)
                .and_then(|dst| z.compress_to_buffer(plain, dst).ok()),
            _ => None,
        };
        let (codec, payload_len) = match compressed_len {
            Some(n) if n < plain.len() => (CODEC_ZSTD, n),
            _ => {
                body[1..].copy_from_slice(plain);
                (CODEC_RAW, plain.len())
            }
        };
        body[0] = codec;
        let len = keys.seal_in_place(&chunk_aad(&id), slot, 1 + payload_len);
        (len, codec == CODEC_ZSTD)
    }
}

/// Bytes looked at per sample in [`looks_incompressible`], and the distinct byte values a
/// sample must show to look random. 128 random bytes show 100.7 distinct values on average
/// (256·(1 − e^−½)), standard deviation ≈ 4.8; text shows 30–60, machine code 50–80.
const SAMPLE_LEN: usize = 128;
const RANDOM_DISTINCT: u32 = 88;

/// True if every 4 KiB of `plain` looks like random bytes (encrypted or already compressed
/// data), judged from one 128-byte sample per 4 KiB: then zstd is not tried. A failed zstd
/// attempt on 64 KiB costs as much as AES-GCM sealing it; this check reads 2 KiB. A block
/// with any 4 KiB of zeros, text or code has a sample that says so and is compressed as
/// always, and so is one whose 4 KiB pieces repeat the first. What it misses is random bytes
/// repeated at another distance: stored raw then, bigger but never wrong. Deterministic, so
/// equal blocks encode alike.
pub fn looks_incompressible(plain: &[u8]) -> bool {
    const AT: usize = 1024;
    if plain.len() < 4096 {
        return false;
    }
    let first = &plain[AT..AT + SAMPLE_LEN];
    plain.chunks(4096).enumerate().all(|(i, piece)| {
        let Some(sample) = piece.get(AT..AT + SAMPLE_LEN) else {
            // A short last piece: too little to judge, let zstd try.
            return false;
        };
        if i > 0 && sample[..16] == first[..16] {
            return false;
        }
        let mut seen = [0u64; 4];
        for &b in sample {
            seen[usize::from(b >> 6)] |= 1 << (b & 63);
        }
        seen.iter().map(|w| w.count_ones()).sum::<u32>() >= RANDOM_DISTINCT
    })
}

/// The largest record a block of `plain_len` bytes can become: stored raw, plus the codec byte
/// and the envelope.
pub fn max_record_len(keys: &Keys, plain_len: usize) -> usize {
    plain_len + 1 + keys.overhead()
}

thread_local! {
    static ENCODER: RefCell<Encoder> = RefCell::new(Encoder::new());
    /// The read path's zstd context, likewise made once per thread.
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        RefCell::new(zstd::bulk::Decompressor::new().ok());
}

/// Hash, compress and seal one block (`plain` is exactly 64 KiB).
pub fn encode_chunk(keys: &Keys, plain: &[u8]) -> EncodedChunk {
    encode_chunk_with_id(keys, keys.chunk_id(plain), plain)
}

/// The same with the id already computed (`keys.chunk_id(plain)`): the writer hashes first,
/// skips chunks the repository has, and encodes only the rest.
pub fn encode_chunk_with_id(keys: &Keys, id: ChunkId, plain: &[u8]) -> EncodedChunk {
    ENCODER.with(|enc| {
        let mut record = Vec::with_capacity(plain.len() + 1 + super::crypto::SEAL_OVERHEAD);
        let (_, compressed) = enc.borrow_mut().encode_append(keys, id, plain, &mut record);
        EncodedChunk {
            id,
            record,
            compressed,
        }
    })
}

/// Open, decompress and check a chunk record into `out` (exactly 64 KiB). `scratch` is reused
/// between calls.
///
/// zstd decompresses straight into `out` and may not write past it, so a record crafted to
/// expand (a "bomb") fails instead of allocating; anything but exactly `out.len()` bytes is an
/// error. In a repository without encryption the result is also hashed against `id` (the
/// integrity tag there is keyed with a key stored in the clear).
pub fn decode_chunk(
    keys: &Keys,
    id: &ChunkId,
    record: &[u8],
    out: &mut [u8],
    scratch: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    keys.open_into(&chunk_aad(id), record, scratch)?;
    let Some((&codec, payload)) = scratch.split_first() else {
        return Err(ChunkError::Decompress(
            "it is empty (not even a codec byte)".into(),
        ));
    };
    match codec {
        CODEC_RAW => {
            if payload.len() != out.len() {
                return Err(ChunkError::Decompress(format!(
                    "it is stored as is but holds {} bytes instead of {}",
                    payload.len(),
                    out.len()
                )));
            }
            out.copy_from_slice(payload);
        }
        CODEC_ZSTD => {
            let n = DECOMPRESSOR.with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| ChunkError::Decompress(format!("zstd: {e}")))?,
                    );
                }
                match d.as_mut() {
                    Some(d) => d.decompress_to_buffer(payload, out).map_err(|e| {
                        ChunkError::Decompress(format!(
                            "zstd: {e} (a block decompresses to at most {} bytes)",
                            out.len()
                        ))
                    }),
                    None => Err(ChunkError::Decompress("zstd has no context".into())),
                }
            })?;
            if n != out.len() {
                return Err(ChunkError::Decompress(format!(
                    "zstd gave {n} bytes instead of {}",
                    out.len()
                )));
            }
        }
        other => return Err(ChunkError::Codec(other)),
    }
    if !keys.encrypted() && keys.chunk_id(out) != *id {
        return Err(ChunkError::Hash);
    }
    Ok(())
}

/// Builds one pack in memory.
pub struct PackWriter {
    id: PackId,
    /// Records in `bytes[..used]`; past it, zeroed room the writer encodes into in place
    /// (kept initialised so a recycled buffer is zeroed once, not per pack).
    bytes: Vec<u8>,
    used: usize,
    chunks: Vec<(ChunkId, ChunkLocation)>,
}

impl PackWriter {
    pub fn new() -> std::io::Result<PackWriter> {
        PackWriter::with_buffer(Vec::new())
    }
    /// A pack filling `buffer` (a finished pack's bytes handed back for reuse): the writer
    /// recycles its few pack buffers instead of faulting in fresh memory for each pack.
    pub fn with_buffer(buffer: Vec<u8>) -> std::io::Result<PackWriter> {
        Ok(PackWriter {
            id: PackId::random()?,
            bytes: buffer,
            used: 0,
            chunks: Vec::new(),
        })
    }
    pub fn id(&self) -> PackId {
        self.id
    }
    /// `n` bytes of room after the records so far, to encode records into in place (then
    /// `add_in_place`). What was there before is unspecified.
    pub fn room(&mut self, n: usize) -> &mut [u8] {
        let end = self.used.saturating_add(n);
        if self.bytes.len() < end {
            // A pack is cut once it reaches PACK_TARGET: at most one batch of records follows.
            self.bytes.resize(end.max(PACK_TARGET + PACK_SLACK), 0);
        }
        &mut self.bytes[self.used..end]
    }
    /// Append a record; returns where it is.
    ///
    /// # Panics
    /// If the pack would pass 4 GiB or `MAX_PACK_CHUNKS` records (a caller's bug: packs are cut
    /// at `PACK_TARGET`, 32 MiB).
    pub fn add(&mut self, id: ChunkId, record: &[u8]) -> ChunkLocation {
        let at = self.used;
        self.room(record.len()).copy_from_slice(record);
        self.add_in_place(id, at, record.len())
    }
    /// Append the record of `len` bytes at `bytes[at..]` (in the room, so `at >= len()`; `len()`
    /// before `room` was called tells where the room starts), moving it down to the end of the
    /// records so far; returns where it is. Records from one room go in ascending `at` order.
    ///
    /// # Panics
    /// As `add`, or if the record lies outside the buffer (a caller's bug).
    pub fn add_in_place(&mut self, id: ChunkId, at: usize, len: usize) -> ChunkLocation {
        let end = self.used.saturating_add(len);
        let (Ok(offset), Ok(len32), Ok(_)) = (
            u32::try_from(self.used),
            u32::try_from(len),
            u32::try_from(end),
        ) else {
            panic!("PackWriter::add: a pack cannot pass 4 GiB (cut packs at PACK_TARGET)");
        };
        assert!(
            self.chunks.len() < MAX_PACK_CHUNKS as usize,
            "PackWriter::add: a pack holds at most MAX_PACK_CHUNKS records"
        );
        assert!(
            at >= self.used && at.saturating_add(len) <= self.bytes.len(),
            "PackWriter::add_in_place: the record must lie in the room"
        );
        if at != self.used {
            self.bytes.copy_within(at..at + len, self.used);
        }
        self.used = end;
        let loc = ChunkLocation {
            pack: self.id,
            offset,
            len: len32,
        };
        self.chunks.push((id, loc));
        loc
    }
    /// Bytes so far (records only).
    pub fn len(&self) -> usize {
        self.used
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
    /// Seal the trailer and return the whole pack's bytes and its chunks' locations.
    pub fn finish(self, keys: &Keys) -> (PackId, Vec<u8>, Vec<(ChunkId, ChunkLocation)>) {
        let PackWriter {
            id,
            mut bytes,
            used,
            chunks,
        } = self;
        bytes.truncate(used);
        let mut plain = Vec::with_capacity(4 + chunks.len() * TRAILER_ENTRY_LEN);
        // `add` keeps the count within MAX_PACK_CHUNKS (< 2^32).
        plain.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
        for (cid, loc) in &chunks {
            plain.extend_from_slice(&cid.0);
            plain.extend_from_slice(&loc.offset.to_le_bytes());
            plain.extend_from_slice(&loc.len.to_le_bytes());
        }
        let sealed = keys.seal(&trailer_aad(&id), &plain);
        let Ok(sealed_len) = u32::try_from(sealed.len()) else {
            // 4 + 2^20 × 40 + overhead is far below 4 GiB.
            unreachable!("a sealed trailer of at most MAX_PACK_CHUNKS entries fits a u32");
        };
        bytes.reserve(sealed.len() + PACK_TAIL_LEN);
        bytes.extend_from_slice(&sealed);
        bytes.extend_from_slice(&sealed_len.to_le_bytes());
        bytes.extend_from_slice(&PACK_MAGIC);
        (id, bytes, chunks)
    }
}

/// The aad binding a pack's trailer to its pack: `b"pack" || pack id`.
fn trailer_aad(id: &PackId) -> [u8; 20] {
    let mut aad = [0u8; 20];
    aad[..4].copy_from_slice(b"pack");
    aad[4..].copy_from_slice(&id.0);
    aad
}

/// Parse a pack's fixed tail (its last `PACK_TAIL_LEN` bytes) given the pack's length: the
/// sealed trailer's length, checked to fit in the pack and to be no larger than a trailer of
/// `MAX_PACK_CHUNKS` entries can be. Pure, for the fuzz target and `read_pack_chunks`.
pub fn parse_tail(tail: &[u8], pack_len: u64) -> Result<u32, String> {
    if tail.len() != PACK_TAIL_LEN {
        return Err(format!(
            "its tail is {} bytes, not {PACK_TAIL_LEN}",
            tail.len()
        ));
    }
    let (len_bytes, magic) = tail.split_at(4);
    if magic != PACK_MAGIC {
        return Err(format!(
            "it does not end with the pack magic {:?} (not a format-2 pack, or cut short)",
            String::from_utf8_lossy(&PACK_MAGIC[..7])
        ));
    }
    let mut l = [0u8; 4];
    l.copy_from_slice(len_bytes);
    let tlen = u32::from_le_bytes(l);
    let room = pack_len.saturating_sub(PACK_TAIL_LEN as u64);
    if pack_len < PACK_TAIL_LEN as u64 || u64::from(tlen) > room {
        return Err(format!(
            "its trailer length {tlen} does not fit in its {pack_len} bytes"
        ));
    }
    let max = 4
        + u64::from(MAX_PACK_CHUNKS) * TRAILER_ENTRY_LEN as u64
        + super::crypto::SEAL_OVERHEAD as u64;
    if u64::from(tlen) > max {
        return Err(format!(
            "its trailer length {tlen} is more than {max}, the most a trailer can be"
        ));
    }
    Ok(tlen)
}

/// Parse a pack's opened (plain) trailer: its chunks and their locations in pack `pack`, whose
/// records take its first `records_len` bytes. Checks the count (at most `MAX_PACK_CHUNKS`,
/// exactly what the trailer's length holds) and that every record lies within the records, in
/// order, without overlapping the previous one. Pure: the fuzz target calls it on any bytes.
pub fn parse_trailer(
    pack: PackId,
    plain: &[u8],
    records_len: u64,
) -> Result<Vec<(ChunkId, ChunkLocation)>, String> {
    let Some((count, entries)) = plain.split_first_chunk::<4>() else {
        return Err(format!(
            "its trailer is {} bytes, too short for a count",
            plain.len()
        ));
    };
    let n = u32::from_le_bytes(*count);
    if n > MAX_PACK_CHUNKS {
        return Err(format!(
            "its trailer lists {n} chunks, more than the {MAX_PACK_CHUNKS} a pack may hold"
        ));
    }
    // n ≤ 2^20, so this product is < 2^26.
    if entries.len() != n as usize * TRAILER_ENTRY_LEN {
        return Err(format!(
            "its trailer lists {n} chunks but holds {} bytes of entries (expected {})",
            entries.len(),
            n as usize * TRAILER_ENTRY_LEN
        ));
    }
    let mut out = Vec::with_capacity(n as usize);
    let mut prev_end = 0u64;
    for (i, e) in entries.chunks_exact(TRAILER_ENTRY_LEN).enumerate() {
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[..32]);
        let mut o = [0u8; 4];
        o.copy_from_slice(&e[32..36]);
        let mut l = [0u8; 4];
        l.copy_from_slice(&e[36..40]);
        let (offset, len) = (u32::from_le_bytes(o), u32::from_le_bytes(l));
        let end = u64::from(offset) + u64::from(len);
        if len == 0 {
            return Err(format!("its trailer entry {i} has an empty record"));
        }
        if end > u64::from(u32::MAX) {
            return Err(format!(
                "its trailer entry {i} (offset {offset}, length {len}) ends past 4 GiB, where no record can be"
            ));
        }
        if end > records_len {
            return Err(format!(
                "its trailer entry {i} (offset {offset}, length {len}) ends past its records ({records_len} bytes)"
            ));
        }
        if u64::from(offset) < prev_end {
            return Err(format!(
                "its trailer entry {i} (offset {offset}) starts before the previous record's end ({prev_end}): out of order or overlapping"
            ));
        }
        prev_end = end;
        out.push((ChunkId(id), ChunkLocation { pack, offset, len }));
    }
    Ok(out)
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
    let key = pack.key();
    let corrupt = |why: String| RepoError::corrupt(store.describe(&key), why);
    if pack_len < PACK_TAIL_LEN as u64 {
        return Err(corrupt(format!(
            "it is {pack_len} bytes, too short to be a pack"
        )));
    }
    let tail_at = pack_len - PACK_TAIL_LEN as u64;
    let mut tail = [0u8; PACK_TAIL_LEN];
    read_range(store, &key, tail_at, &mut tail)?;
    let tlen = parse_tail(&tail, pack_len).map_err(corrupt)?;
    // parse_tail checked tlen ≤ pack_len - PACK_TAIL_LEN.
    let records_len = tail_at - u64::from(tlen);
    let mut sealed = vec![0u8; tlen as usize];
    read_range(store, &key, records_len, &mut sealed)?;
    let plain = keys
        .open(&trailer_aad(&pack), &sealed)
        .map_err(|e| corrupt(format!("its trailer does not open: {e}")))?;
    parse_trailer(pack, &plain, records_len).map_err(corrupt)
}

fn read_range(
    store: &dyn super::store::Store,
    key: &str,
    offset: u64,
    buf: &mut [u8],
) -> super::error::Result<()> {
    store.get_range(key, offset, buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            RepoError::corrupt(
                store.describe(key),
                format!(
                    "it is shorter than listed (reading {} bytes at {offset})",
                    buf.len()
                ),
            )
        } else {
            RepoError::io("read", store.describe(key), e)
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::repo::crypto::SEAL_OVERHEAD;
    use crate::repo::store::{LockError, LockGuard, ObjectInfo, Store};
    use std::collections::BTreeMap;
    use std::io;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An in-memory `Store` written from the trait's contract (create-only put, ranged reads
    /// that fail with `UnexpectedEof` past the end, sorted prefix listing with lengths).
    #[derive(Debug, Default)]
    pub(crate) struct MemStore {
        pub objects: Mutex<BTreeMap<String, Vec<u8>>>,
        /// Whole-object and ranged reads so far.
        pub gets: AtomicUsize,
    }

    struct NoLock;
    impl LockGuard for NoLock {}

    impl MemStore {
        pub fn objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
            self.objects.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl Store for MemStore {
        fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
            let mut o = self.objects();
            if o.contains_key(key) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    key.to_string(),
                ));
            }
            o.insert(key.to_string(), bytes.to_vec());
            Ok(())
        }
        fn get(&self, key: &str) -> io::Result<Vec<u8>> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.objects()
                .get(key)
                .cloned()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, key.to_string()))
        }
        fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            let o = self.objects();
            let v = o
                .get(key)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, key.to_string()))?;
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let src = start
                .checked_add(buf.len())
                .and_then(|end| v.get(start..end))
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, key.to_string()))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
            Ok(self
                .objects()
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| ObjectInfo {
                    key: k.clone(),
                    len: v.len() as u64,
                })
                .collect())
        }
        fn delete(&self, key: &str) -> io::Result<()> {
            self.objects().remove(key);
            Ok(())
        }
        fn describe(&self, key: &str) -> String {
            format!("mem:{key}")
        }
        fn take_lock(
            &self,
            _kind: crate::repo::store::LockKind<'_>,
            _holder: &str,
            _wait: std::time::Duration,
        ) -> Result<Box<dyn LockGuard>, LockError> {
            Ok(Box::new(NoLock))
        }
    }

    /// Deterministic bytes that look random.
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut v);
        v
    }

    #[test]
    fn random_blocks_skip_zstd_and_compressible_ones_never_do() {
        let b = crate::BLOCK_SIZE as usize;
        let flagged = (0..200)
            .filter(|&s| looks_incompressible(&noise(s, b)))
            .count();
        assert!(
            flagged >= 160,
            "only {flagged} of 200 random blocks skip zstd"
        );
        // Any 4 KiB that compresses is seen.
        for hole in 0..16 {
            let mut v = noise(1000 + hole as u64, b);
            v[hole * 4096..(hole + 1) * 4096].fill(0);
            assert!(!looks_incompressible(&v), "zeros at 4 KiB piece {hole}");
            let mut t = noise(2000 + hole as u64, b);
            let text = b"the quick brown fox jumps over the lazy dog, again and again; ";
            for (k, byte) in t[hole * 4096..(hole + 1) * 4096].iter_mut().enumerate() {
                *byte = text[k % text.len()];
            }
            assert!(!looks_incompressible(&t), "text at 4 KiB piece {hole}");
        }
        // Random 4 KiB repeated through the block.
        let page = noise(7, 4096);
        assert!(!looks_incompressible(&page.repeat(16)));
        // Short blocks (a disk's last) are left to zstd.
        assert!(!looks_incompressible(&noise(8, 4000)));
        // Real data: every block of this test binary (code, tables, strings) that zstd
        // shrinks by more than 2% is compressed.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let mut z = zstd::bulk::Compressor::new(ZSTD_LEVEL).unwrap();
        let mut checked = 0;
        for block in exe.chunks_exact(b) {
            if looks_incompressible(block) {
                let n = z.compress(block).unwrap().len();
                assert!(
                    n * 100 >= b * 98,
                    "a block zstd shrinks to {n} bytes was skipped"
                );
            }
            checked += 1;
        }
        assert!(checked > 10);
    }

    pub(crate) fn random_bytes(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        getrandom::fill(&mut v).unwrap();
        v
    }

    fn both_modes() -> [Keys; 2] {
        [
            Keys::generate(true).unwrap(),
            Keys::generate(false).unwrap(),
        ]
    }

    fn compressible() -> Vec<u8> {
        (0..CHUNK_LEN)
            .map(|i| b"cbtfs block of text, "[i % 21])
            .collect()
    }

    fn short_last_block() -> Vec<u8> {
        let mut b = vec![0u8; CHUNK_LEN];
        b[..1000].copy_from_slice(&random_bytes(1000));
        b
    }

    fn zeroish() -> Vec<u8> {
        let mut b = vec![0u8; CHUNK_LEN];
        b[CHUNK_LEN / 2] = 1;
        b
    }

    fn decode(keys: &Keys, id: &ChunkId, record: &[u8]) -> Result<Vec<u8>, ChunkError> {
        let mut out = vec![0xa5u8; CHUNK_LEN];
        let mut scratch = Vec::new();
        decode_chunk(keys, id, record, &mut out, &mut scratch).map(|()| out)
    }

    #[test]
    fn chunks_round_trip() {
        for keys in both_modes() {
            let random = random_bytes(CHUNK_LEN);
            for (name, block, zstd) in [
                ("compressible", compressible(), true),
                ("random", random.clone(), false),
                ("zero-ish", zeroish(), true),
                ("last short block", short_last_block(), true),
            ] {
                let e = encode_chunk(&keys, &block);
                assert_eq!(e.id, keys.chunk_id(&block), "{name}");
                assert_eq!(e.compressed, zstd, "{name}");
                if zstd {
                    assert!(e.record.len() < CHUNK_LEN, "{name}: {}", e.record.len());
                } else {
                    assert!(e.record.len() <= CHUNK_LEN + 1 + SEAL_OVERHEAD, "{name}");
                }
                assert_eq!(decode(&keys, &e.id, &e.record).unwrap(), block, "{name}");
                let again = encode_chunk_with_id(&keys, e.id, &block);
                assert_eq!(
                    decode(&keys, &e.id, &again.record).unwrap(),
                    block,
                    "{name}"
                );
            }
            // Random data is stored as is: codec 0 then the block itself.
            let e = encode_chunk(&keys, &random);
            let plain = keys.open(&chunk_aad(&e.id), &e.record).unwrap();
            assert_eq!(plain[0], CODEC_RAW);
            assert_eq!(&plain[1..], &random[..]);
        }
    }

    #[test]
    fn flipped_bits_and_truncations_are_refused() {
        for keys in both_modes() {
            for block in [compressible(), random_bytes(CHUNK_LEN)] {
                let e = encode_chunk(&keys, &block);
                let step = if e.record.len() > 4096 { 509 } else { 1 };
                for at in (0..e.record.len()).step_by(step) {
                    for bit in 0..8 {
                        let mut r = e.record.clone();
                        r[at] ^= 1 << bit;
                        assert!(decode(&keys, &e.id, &r).is_err(), "flip {at}.{bit}");
                    }
                }
                for len in (0..e.record.len()).step_by(step) {
                    assert!(
                        decode(&keys, &e.id, &e.record[..len]).is_err(),
                        "cut to {len}"
                    );
                }
                let mut other = e.id;
                other.0[31] ^= 1;
                assert_eq!(
                    decode(&keys, &other, &e.record),
                    Err(ChunkError::Seal(SealError::Tag))
                );
            }
        }
    }

    #[test]
    fn forged_records_are_refused() {
        for keys in both_modes() {
            let block = compressible();
            let id = keys.chunk_id(&block);
            let aad = chunk_aad(&id);
            let forge = |codec: u8, payload: &[u8]| {
                let mut p = vec![codec];
                p.extend_from_slice(payload);
                keys.seal(&aad, &p)
            };
            assert_eq!(
                decode(&keys, &id, &forge(7, &block)),
                Err(ChunkError::Codec(7))
            );
            assert!(matches!(
                decode(&keys, &id, &keys.seal(&aad, &[])),
                Err(ChunkError::Decompress(_))
            ));
            assert!(matches!(
                decode(&keys, &id, &forge(CODEC_RAW, &block[1..])),
                Err(ChunkError::Decompress(_))
            ));
            let mut long = block.clone();
            long.extend_from_slice(&block);
            for (what, plain) in [("more", &long[..]), ("fewer", &block[..CHUNK_LEN / 2])] {
                let z = zstd::bulk::compress(plain, 1).unwrap();
                assert!(
                    matches!(
                        decode(&keys, &id, &forge(CODEC_ZSTD, &z)),
                        Err(ChunkError::Decompress(_))
                    ),
                    "{what}"
                );
            }
            // Garbage that is not a zstd frame at all.
            assert!(matches!(
                decode(&keys, &id, &forge(CODEC_ZSTD, b"not zstd")),
                Err(ChunkError::Decompress(_))
            ));
            // A record of other bytes sealed under this id: only the hash check of an
            // unencrypted repository can see it (in an encrypted one, only the key's holder
            // can make one).
            let other = random_bytes(CHUNK_LEN);
            let r = forge(CODEC_RAW, &other);
            if keys.encrypted() {
                assert_eq!(decode(&keys, &id, &r).unwrap(), other);
            } else {
                assert_eq!(decode(&keys, &id, &r), Err(ChunkError::Hash));
            }
        }
        // A record of an encrypted repository read with the same master key as unencrypted.
        let k = Keys::generate(true).unwrap();
        let plain = Keys::from_master_bytes(&k.master_bytes(), false);
        let e = encode_chunk(&k, &compressible());
        assert_eq!(
            decode(&plain, &e.id, &e.record),
            Err(ChunkError::Seal(SealError::Mode))
        );
    }

    #[test]
    fn pack_id_keys() {
        let id = PackId::random().unwrap();
        let key = id.key();
        assert_eq!(key.len(), 41);
        assert_eq!(PackId::from_key(&key), Some(id));
        let p = PackId([0xab; 16]);
        assert_eq!(p.key(), format!("packs/ab/{}", "ab".repeat(16)));
        let hex = "ab".repeat(16);
        for bad in [
            format!("packs/ac/{hex}"),
            format!("packs/AB/{}", "AB".repeat(16)),
            format!("packs/ab/{hex}0"),
            format!("packs/ab/{}", &hex[1..]),
            format!("packs/ab/{hex}/"),
            format!("packs//{hex}"),
            format!("packs/a/{hex}"),
            format!("pack/ab/{hex}"),
            format!("/packs/ab/{hex}"),
            format!("packs/ab/{}g", &hex[1..]),
            format!("packs/ab/ab/{hex}"),
            "packs/ab/".into(),
            String::new(),
            format!("packs/ab/é{}", &hex[2..]),
        ] {
            assert_eq!(PackId::from_key(&bad), None, "{bad}");
        }
    }

    /// A pack of `n` chunks of varied sizes, stored; returns its id, bytes, records and
    /// the locations `finish` gave.
    type StoredPack = (
        PackId,
        Vec<u8>,
        Vec<EncodedChunk>,
        Vec<(ChunkId, ChunkLocation)>,
    );

    fn stored_pack(store: &MemStore, keys: &Keys, n: usize) -> StoredPack {
        let mut w = PackWriter::new().unwrap();
        assert!(w.is_empty());
        let mut encoded = Vec::new();
        for i in 0..n {
            let mut block = if i % 2 == 0 {
                compressible()
            } else {
                random_bytes(CHUNK_LEN)
            };
            block[0] = i as u8;
            let e = encode_chunk(keys, &block);
            let before = w.len();
            let loc = w.add(e.id, &e.record);
            assert_eq!(loc.offset as usize, before);
            assert_eq!(loc.len as usize, e.record.len());
            assert_eq!(loc.pack, w.id());
            encoded.push(e);
        }
        assert_eq!(w.chunk_count(), n);
        let wid = w.id();
        let (id, bytes, chunks) = w.finish(keys);
        assert_eq!(id, wid);
        store.put(&id.key(), &bytes).unwrap();
        (id, bytes, encoded, chunks)
    }

    #[test]
    fn pack_trailer_round_trip() {
        for keys in both_modes() {
            let store = MemStore::default();
            let (id, bytes, encoded, chunks) = stored_pack(&store, &keys, 5);
            assert_eq!(&bytes[bytes.len() - 8..], &PACK_MAGIC);
            let read = read_pack_chunks(&store, &keys, id, bytes.len() as u64).unwrap();
            assert_eq!(read, chunks);
            assert_eq!(read.len(), 5);
            for ((cid, loc), e) in read.iter().zip(&encoded) {
                assert_eq!(*cid, e.id);
                let rec = &bytes[loc.offset as usize..][..loc.len as usize];
                assert_eq!(rec, &e.record[..]);
                let out = decode(&keys, cid, rec).unwrap();
                assert_eq!(keys.chunk_id(&out), *cid);
            }
            // An empty pack is valid too.
            let (eid, ebytes, _) = PackWriter::new().unwrap().finish(&keys);
            store.put(&eid.key(), &ebytes).unwrap();
            assert_eq!(
                read_pack_chunks(&store, &keys, eid, ebytes.len() as u64).unwrap(),
                vec![]
            );
            // Another pack's trailer does not open under this pack's name.
            let other = PackId::random().unwrap();
            store.put(&other.key(), &bytes).unwrap();
            let err = read_pack_chunks(&store, &keys, other, bytes.len() as u64).unwrap_err();
            assert!(matches!(err, RepoError::Corrupt { .. }), "{err}");
        }
    }

    fn assert_corrupt(r: super::super::error::Result<Vec<(ChunkId, ChunkLocation)>>, what: &str) {
        match r {
            Err(RepoError::Corrupt { location, detail }) => {
                assert!(location.starts_with("mem:packs/"), "{what}: {location}");
                assert!(!detail.is_empty(), "{what}");
            }
            other => panic!("{what}: {other:?}"),
        }
    }

    #[test]
    fn damaged_pack_tails_are_corrupt() {
        let keys = Keys::generate(true).unwrap();
        let store = MemStore::default();
        let (id, bytes, _, chunks) = stored_pack(&store, &keys, 3);
        let key = id.key();
        let records_len = chunks
            .last()
            .map(|(_, l)| (l.offset + l.len) as usize)
            .unwrap();
        // Every truncation of the pack (the listing shows the shorter length).
        for len in 0..bytes.len() {
            store.objects().insert(key.clone(), bytes[..len].to_vec());
            assert_corrupt(
                read_pack_chunks(&store, &keys, id, len as u64),
                &format!("cut {len}"),
            );
        }
        // Every flipped bit of the trailer and the tail.
        for at in records_len..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[at] ^= 1 << bit;
                store.objects().insert(key.clone(), b);
                assert_corrupt(
                    read_pack_chunks(&store, &keys, id, bytes.len() as u64),
                    &format!("flip {at}.{bit}"),
                );
            }
        }
        // A listing longer than the object.
        store.objects().insert(key.clone(), bytes.clone());
        assert_corrupt(
            read_pack_chunks(&store, &keys, id, bytes.len() as u64 + 1),
            "listed longer",
        );
        assert_eq!(
            read_pack_chunks(&store, &keys, id, bytes.len() as u64).unwrap(),
            chunks
        );
    }

    fn trailer(entries: &[(u32, u32)], count: u32) -> Vec<u8> {
        let mut t = count.to_le_bytes().to_vec();
        for (i, (o, l)) in entries.iter().enumerate() {
            t.extend_from_slice(&[i as u8; 32]);
            t.extend_from_slice(&o.to_le_bytes());
            t.extend_from_slice(&l.to_le_bytes());
        }
        t
    }

    #[test]
    fn trailer_parser_checks_everything() {
        let p = PackId([1; 16]);
        let ok = parse_trailer(p, &trailer(&[(0, 10), (10, 5), (20, 80)], 3), 100).unwrap();
        assert_eq!(
            ok.iter()
                .map(|(_, l)| (l.offset, l.len))
                .collect::<Vec<_>>(),
            vec![(0, 10), (10, 5), (20, 80)]
        );
        assert_eq!(ok[1].0, ChunkId([1; 32]));
        for (t, records, why) in [
            (trailer(&[(0, 10)], 2), 100, "lists 2 chunks"),
            (trailer(&[(0, 10), (10, 5)], 1), 100, "lists 1 chunks"),
            (trailer(&[], MAX_PACK_CHUNKS + 1), 100, "more than"),
            (trailer(&[(0, 10), (9, 5)], 2), 100, "overlapping"),
            (trailer(&[(10, 10), (0, 5)], 2), 100, "overlapping"),
            (trailer(&[(0, 10), (95, 6)], 2), 100, "ends past"),
            (trailer(&[(u32::MAX, u32::MAX)], 1), u64::MAX, "4 GiB"),
            (trailer(&[(u32::MAX - 1, 2)], 1), u64::MAX, "4 GiB"),
            (trailer(&[(0, 0)], 1), 100, "empty record"),
            (vec![1, 0, 0], 100, "too short"),
        ] {
            let e = parse_trailer(p, &t, records).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
        assert_eq!(
            parse_trailer(p, &trailer(&[(u32::MAX - 1, 1)], 1), u64::MAX).unwrap()[0]
                .1
                .offset,
            u32::MAX - 1
        );

        assert!(parse_tail(&[0; 12], 100).unwrap_err().contains("magic"));
        let mut tail = 88u32.to_le_bytes().to_vec();
        tail.extend_from_slice(&PACK_MAGIC);
        assert_eq!(parse_tail(&tail, 100), Ok(88));
        assert!(parse_tail(&tail, 99).unwrap_err().contains("does not fit"));
        assert!(parse_tail(&tail[1..], 100).is_err());
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&PACK_MAGIC);
        assert!(
            parse_tail(&huge, u64::MAX)
                .unwrap_err()
                .contains("the most")
        );
    }
}
