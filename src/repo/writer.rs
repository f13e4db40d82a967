//! Writing one point: blocks in ascending order become chunks (hashed, deduplicated against
//! the whole repository, compressed, sealed) in packs; at commit the point index and then the
//! manifest are put.
//!
//! Hashing and encoding run on several threads per run of blocks (`add_run` gets up to 64
//! blocks at a time); dedup decisions and pack order stay sequential, so the result does not
//! depend on thread timing. Finished packs are put by an uploader thread while the next pack
//! fills (at most `UPLOAD_QUEUE` packs wait), so storage latency overlaps hashing.

use std::collections::HashMap;
use std::sync::mpsc;

use roaring::RoaringBitmap;

use super::chunkindex;
use super::crypto::ChunkId;
use super::pack::{self, ChunkLocation, EncodedChunk, PackWriter};
use super::{
    CopiedFrom, META, NewPoint, ObjRef, POINT_FORMAT, POINT_VERSION, PointManifest, PointStats,
    RepoError, Repository, Result, WriteLock, random_hex,
};
use crate::{BLOCK_SIZE, blocks_for};

/// Finished packs waiting for the uploader, at most.
const UPLOAD_QUEUE: usize = 2;
/// Threads hashing and encoding a run (the machine's cores, at most this many).
const MAX_WORKERS: usize = 4;

struct Uploader {
    tx: Option<mpsc::SyncSender<(String, Vec<u8>)>>,
    done: Option<std::thread::JoinHandle<std::result::Result<(), RepoError>>>,
}

impl Uploader {
    fn new(repo: Repository) -> Uploader {
        let (tx, rx) = mpsc::sync_channel::<(String, Vec<u8>)>(UPLOAD_QUEUE);
        let done = std::thread::Builder::new()
            .name("cbtfs-upload".into())
            .spawn(move || {
                for (key, bytes) in rx {
                    repo.store()
                        .put(&key, &bytes)
                        .map_err(|e| RepoError::io("write", repo.describe(&key), e))?;
                }
                Ok(())
            })
            .ok();
        Uploader { tx: Some(tx), done }
    }

    /// Queue a pack; an earlier upload's failure surfaces here.
    fn send(&mut self, key: String, bytes: Vec<u8>) -> Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx.send((key.clone(), bytes)).is_ok(),
            None => false,
        };
        if !sent {
            // The uploader stopped: it failed (or could not start); say why.
            self.finish()?;
            return Err(RepoError::Invalid(format!(
                "internal: the upload thread stopped before {key}"
            )));
        }
        Ok(())
    }

    /// Wait for every queued pack to be stored.
    fn finish(&mut self) -> Result<()> {
        self.tx.take();
        match self.done.take() {
            Some(h) => h
                .join()
                .map_err(|_| RepoError::Invalid("internal: the upload thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

/// Writes one point; blocks must come in ascending order. Dropped without `commit`, it deletes
/// what it wrote (best effort; `gc` collects anything left): nothing becomes visible.
pub struct PointWriter<'l> {
    repo: Repository,
    _lock: &'l WriteLock,
    spec: NewPoint,
    set: String,
    n: u32,
    previous: Option<PointManifest>,
    changed: RoaringBitmap,
    stored: RoaringBitmap,
    /// Chunk ids of the stored blocks, in block order (32 bytes each).
    ids: Vec<u8>,
    next_block: u64,
    pack: Option<PackWriter>,
    /// Chunks written by this writer that no chunk index object lists yet.
    pending: HashMap<ChunkId, ChunkLocation>,
    uploader: Uploader,
    /// Every object this writer put (deleted again if it is dropped without commit).
    written: Vec<String>,
    stats: PointStats,
    copied_from: Option<CopiedFrom>,
    committed: bool,
}

impl<'l> PointWriter<'l> {
    pub(crate) fn new(
        repo: Repository,
        lock: &'l WriteLock,
        set: String,
        n: u32,
        previous: Option<PointManifest>,
        spec: NewPoint,
    ) -> Result<PointWriter<'l>> {
        let uploader = Uploader::new(repo.clone());
        Ok(PointWriter {
            repo,
            _lock: lock,
            spec,
            set,
            n,
            previous,
            changed: RoaringBitmap::new(),
            stored: RoaringBitmap::new(),
            ids: Vec::new(),
            next_block: 0,
            pack: None,
            pending: HashMap::new(),
            uploader,
            written: Vec::new(),
            stats: PointStats::default(),
            copied_from: None,
            committed: false,
        })
    }

    /// Record in the manifest that this point is a copy of another repository's point
    /// (`cbtfs copy`).
    pub fn set_copied_from(&mut self, origin: CopiedFrom) {
        self.copied_from = Some(origin);
    }

    /// The point this one follows in its set (None for a base).
    pub fn previous(&self) -> Option<&PointManifest> {
        self.previous.as_ref()
    }

    pub fn set(&self) -> &str {
        &self.set
    }

    /// The disk's size at this point.
    pub fn virtual_size(&self) -> u64 {
        self.spec.virtual_size
    }

    /// The point's position in its set's chain.
    pub fn seq(&self) -> u32 {
        self.previous.as_ref().map(|p| p.seq + 1).unwrap_or(0)
    }

    /// Check that `block` comes after every block added so far and lies on the disk.
    fn next(&mut self, block: u64, len: usize) -> Result<u32> {
        let blocks = blocks_for(self.spec.virtual_size);
        if block < self.next_block || block >= blocks || len as u64 > BLOCK_SIZE {
            return Err(RepoError::Invalid(format!(
                "internal: block {block} out of order or outside the disk ({blocks} blocks)"
            )));
        }
        let b32 = u32::try_from(block).map_err(|_| {
            RepoError::Invalid(format!(
                "internal: block {block} beyond the format's 32-bit block numbers"
            ))
        })?;
        self.next_block = block + 1;
        self.changed.insert(b32);
        Ok(b32)
    }

    /// Add block `block` with `bytes` (64 KiB, or less for the disk's last block: zero-padded).
    /// An all-zero block is recorded in the bitmap but not stored.
    pub fn add_block(&mut self, block: u64, bytes: &[u8]) -> Result<()> {
        self.add_run(block, bytes, true)
    }

    /// Add the consecutive blocks from `first` held back to back in `bytes` (only the disk's
    /// last block may be short). All-zero blocks are recorded when `record_zeros` (a base or a
    /// CBT-marked block), else skipped.
    pub fn add_run(&mut self, first: u64, bytes: &[u8], record_zeros: bool) -> Result<()> {
        let bs = BLOCK_SIZE as usize;
        // Blocks to store: (block, bytes padded to 64 KiB when short).
        let mut padded: Option<Vec<u8>> = None;
        let mut todo: Vec<(u32, usize)> = Vec::with_capacity(bytes.len().div_ceil(bs));
        for (k, b) in bytes.chunks(bs).enumerate() {
            let block = first + k as u64;
            if crate::is_zero(b) {
                if record_zeros {
                    self.next(block, b.len())?;
                }
                continue;
            }
            let b32 = self.next(block, b.len())?;
            if b.len() < bs {
                let mut p = vec![0u8; bs];
                p[..b.len()].copy_from_slice(b);
                padded = Some(p);
            }
            todo.push((b32, k));
        }
        if todo.is_empty() {
            return Ok(());
        }
        let block_bytes = |k: usize| -> &[u8] {
            match (&padded, bytes.get(k * bs..(k + 1) * bs)) {
                (_, Some(b)) => b,
                (Some(p), None) => p,
                (None, None) => &[],
            }
        };
        // 1. Hash every block (in parallel).
        let keys = self.repo.keys().clone();
        let ids: Vec<ChunkId> = parallel_map(&todo, |&(_, k)| keys.chunk_id(block_bytes(k)));
        // 2. Decide, in order, which chunks are new (not in the repository, not in this point).
        let index = self.repo.chunk_index()?.clone();
        let mut fresh: Vec<usize> = Vec::new();
        let mut seen_here: std::collections::HashSet<ChunkId> = std::collections::HashSet::new();
        for (i, id) in ids.iter().enumerate() {
            self.ids.extend_from_slice(&id.0);
            self.stored.insert(todo[i].0);
            if self.pending.contains_key(id) || seen_here.contains(id) || index.contains(id) {
                continue;
            }
            seen_here.insert(*id);
            fresh.push(i);
        }
        // 3. Encode the new ones (in parallel), 4. pack them in order.
        let encoded: Vec<EncodedChunk> = parallel_map(&fresh, |&i| {
            pack::encode_chunk_with_id(&keys, ids[i], block_bytes(todo[i].1))
        });
        for e in encoded {
            self.put_chunk(e)?;
        }
        Ok(())
    }

    fn put_chunk(&mut self, e: EncodedChunk) -> Result<()> {
        if self.pack.is_none() {
            self.pack = Some(
                PackWriter::new().map_err(|e| RepoError::Invalid(format!("no randomness: {e}")))?,
            );
        }
        let Some(p) = self.pack.as_mut() else {
            return Ok(());
        };
        let loc = p.add(e.id, &e.record);
        self.pending.insert(e.id, loc);
        self.stats.new_chunks += 1;
        self.stats.new_raw_bytes += BLOCK_SIZE;
        self.stats.new_stored_bytes += e.record.len() as u64;
        if p.len() >= pack::PACK_TARGET {
            self.finish_pack()?;
        }
        if self.pending.len() >= chunkindex::FLUSH_ENTRIES {
            self.flush_index()?;
        }
        Ok(())
    }

    /// Seal the open pack and queue it for storage.
    fn finish_pack(&mut self) -> Result<()> {
        let Some(p) = self.pack.take() else {
            return Ok(());
        };
        if p.is_empty() {
            return Ok(());
        }
        let (id, bytes, _) = p.finish(self.repo.keys());
        let key = id.key();
        self.written.push(key.clone());
        self.uploader.send(key, bytes)
    }

    /// Store every pack so far and an index object listing their chunks; readers and later
    /// writers then find them.
    fn flush_index(&mut self) -> Result<()> {
        self.finish_pack()?;
        // The packs must be stored before an index names them.
        self.uploader.finish()?;
        if !self.pending.is_empty() {
            let entries: Vec<(ChunkId, ChunkLocation)> = self.pending.drain().collect();
            let keys =
                chunkindex::write_index(self.repo.store().as_ref(), self.repo.keys(), entries)?;
            self.written.extend(keys);
            self.repo.chunk_index()?.refresh()?;
        }
        self.uploader = Uploader::new(self.repo.clone());
        Ok(())
    }

    /// Make the point durable and visible. Returns its manifest.
    pub fn commit(mut self) -> Result<PointManifest> {
        self.flush_index()?;
        self.uploader.finish()?;
        let index = self.repo.put_index(
            self.spec.virtual_size,
            &self.changed,
            &self.stored,
            &self.ids,
        )?;
        self.written.push(index.key.clone());
        let vm_metadata = match &self.spec.vm_metadata {
            Some(bytes) => {
                let key = format!("{META}{}", random_hex(16)?);
                let len = self.repo.put_sealed(&key, "meta", bytes)?;
                self.written.push(key.clone());
                Some(ObjRef { key, len })
            }
            None => None,
        };
        let m = PointManifest {
            format: POINT_FORMAT.into(),
            version: POINT_VERSION,
            id: random_hex(16)?,
            generation: 1,
            parent: self.previous.as_ref().map(|p| p.id.clone()),
            vdi: self.spec.vdi.clone(),
            disk_name: self.spec.disk_name.clone(),
            vm_uuid: self.spec.vm_uuid.clone(),
            vm_name: self.spec.vm_name.clone(),
            set: self.set.clone(),
            n: self.n,
            seq: self.seq(),
            time: self.spec.time,
            virtual_size: self.spec.virtual_size,
            changed_blocks: self.changed.len(),
            data_blocks: self.stored.len(),
            index,
            source: self.spec.source.clone(),
            snapshot: self.spec.snapshot.clone(),
            vm_metadata,
            vdi_type: self.spec.vdi_type.clone(),
            vm_run: self.spec.vm_run.clone(),
            stats: self.stats.clone(),
            copied_from: self.copied_from.clone(),
        };
        test_hang("commit-before-manifest");
        self.repo.put_manifest(&m)?;
        self.committed = true;
        tracing::info!(point = %m.label(), set = %m.set, seq = m.seq, new_chunks = m.stats.new_chunks, "committed");
        Ok(m)
    }
}

impl Drop for PointWriter<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        self.pack.take();
        let _ = self.uploader.finish();
        for key in &self.written {
            let _ = self.repo.store().delete(key);
        }
        if !self.written.is_empty()
            && let Ok(ci) = self.repo.chunk_index()
        {
            let _ = ci.refresh();
        }
    }
}

/// Test hook: when `CBTFS_TEST_HANG` is `PLACE` or `PLACE:K`, the K-th time (default the
/// first) this process reaches `PLACE`, it writes `cbtfs-test-hang: PLACE` to standard error
/// and waits to be killed, so a test can `kill -9` a writer at an exact step (everything before
/// the place written, nothing after it). Places: `commit-before-manifest` (a point's packs,
/// chunk index objects, point index and VM metadata are stored; its manifest is not).
pub(crate) fn test_hang(place: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static REACHED: AtomicU32 = AtomicU32::new(0);
    let Some(want) = std::env::var_os("CBTFS_TEST_HANG") else {
        return;
    };
    let want = want.to_string_lossy();
    let (name, k) = match want.split_once(':') {
        Some((n, k)) => (n, k.parse::<u32>().unwrap_or(1)),
        None => (want.as_ref(), 1),
    };
    if name != place {
        return;
    }
    let n = REACHED.fetch_add(1, Ordering::SeqCst).saturating_add(1);
    if n != k {
        return;
    }
    use std::io::Write;
    let mut err = std::io::stderr();
    let _ = writeln!(err, "cbtfs-test-hang: {place}");
    let _ = err.flush();
    loop {
        std::thread::park();
    }
}

/// `f` over `items` on up to `MAX_WORKERS` threads, results in order. Small inputs stay on the
/// calling thread (spawning costs more than hashing a block or two).
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(MAX_WORKERS);
    if workers <= 1 || items.len() < 4 {
        return items.iter().map(&f).collect();
    }
    let per = items.len().div_ceil(workers);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|part| s.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            match h.join() {
                Ok(v) => out.extend(v),
                // A panicking worker re-raises its panic here (a bug, not input).
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        out
    })
}
