//! Writing one point: blocks in ascending order become chunks (hashed, deduplicated against
//! the whole repository, compressed, sealed) in packs; at commit the point index and then the
//! manifest are put.
//!
//! Blocks go in batches of up to `BATCH_BLOCKS`, split between worker threads that each hash,
//! look up and encode their blocks in one pass, sealing new chunks in place in worst-case slots
//! of the open pack's buffer (no copy per record). Dedup decisions are then taken in block
//! order, so the result does not depend on thread timing. A finished pack is handed to an
//! uploader thread while the next one fills; its buffer comes back for a later pack, so at
//! most two pack buffers exist (the memory a backup needs does not grow with the disk). A
//! store whose puts are bound by latency (S3) gets `Store::parallel_puts` uploader threads
//! instead of one, and so that many plus one pack buffers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, mpsc};

use roaring::RoaringBitmap;

use super::chunkindex;
use super::crypto::ChunkId;
use super::pack::{self, ChunkLocation, PackWriter};
use super::{
    CopiedFrom, DiskWriteLock, META, NewPoint, ObjRef, PINDEX, POINT_FORMAT, POINT_VERSION,
    PointManifest, PointStats, RepoError, Repository, Result, random_hex,
};
use crate::{BLOCK_SIZE, blocks_for};

/// Finished packs waiting for the uploader, at most (0: a finished pack waits until the
/// previous one is stored; one fills while one is stored).
const UPLOAD_QUEUE: usize = 0;
/// The most upload threads, whatever a store asks for (each costs a pack buffer).
const MAX_PARALLEL_PUTS: usize = 8;
/// Threads hashing and encoding a run (the machine's cores, at most this many).
const MAX_WORKERS: usize = 4;
/// Blocks hashed and encoded per round of the workers (their slots, ≤ 4.1 MiB, are room in
/// the open pack).
const BATCH_BLOCKS: usize = 64;
/// New chunks held in `pending` before they are written out as a chunk index object. Memory,
/// not lookups, sets it: the map costs ~114 B per entry (56-byte entries in a table kept at
/// most 7/8 full, rounded up to a power of two), and a flush briefly adds a sorted copy (56 B)
/// and the encoded and sealed bodies (44 B each). At 2^17 that is a constant ~15 MiB map plus
/// ~19 MiB during a flush, whatever the disk's size; at the chunk index's own split size
/// (2^20) it was ~114 + ~140 MiB, too much for a backup of a 2 TiB disk to stay under 256 MiB.
/// Each flush adds one index object (100 GiB of new data: 13 until `gc` merges them); lookups
/// do not search them one by one but a local merged file (`chunkindex::MERGE_AT`), so their
/// number does not slow dedup (issue 18).
pub const FLUSH_PENDING: usize = 1 << 17;

/// Stores finished packs on `Store::parallel_puts` threads (1 on a local disk: a put there is
/// bound by the disk, not by latency). A pack is handed over only when a thread is free to
/// take it (a rendezvous), so at most `threads` packs are being stored while the next one
/// fills: `threads + 1` pack buffers at most (~37 MiB each), whatever the disk's size.
struct Uploader {
    tx: Option<mpsc::SyncSender<(String, Vec<u8>)>>,
    done: Vec<std::thread::JoinHandle<std::result::Result<(), RepoError>>>,
    /// Set by the first thread whose put fails: the others take no more packs.
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Uploader {
    fn new(repo: Repository) -> Uploader {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let (tx, rx) = mpsc::sync_channel::<(String, Vec<u8>)>(UPLOAD_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let failed = Arc::new(AtomicBool::new(false));
        let threads = repo.store().parallel_puts().clamp(1, MAX_PARALLEL_PUTS);
        let mut done = Vec::with_capacity(threads);
        for i in 0..threads {
            let (repo, rx, failed) = (repo.clone(), rx.clone(), failed.clone());
            let t = std::thread::Builder::new()
                .name(format!("cbtfs-upload-{i}"))
                .spawn(move || {
                    loop {
                        if failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        // The lock is held only while waiting for the next pack.
                        let next = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return Ok(()),
                        };
                        let Ok((key, bytes)) = next else {
                            return Ok(());
                        };
                        match repo.store().put_owned(&key, bytes) {
                            // The stored pack's buffer goes back for the next packs.
                            Ok(back) => repo.give_back_pack_buffer(back),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(RepoError::io("write", repo.describe(&key), e));
                            }
                        }
                    }
                });
            if let Ok(t) = t {
                done.push(t);
            }
        }
        Uploader {
            tx: (!done.is_empty()).then_some(tx),
            done,
            failed,
        }
    }

    /// Queue a pack; an earlier upload's failure surfaces here.
    fn send(&mut self, key: String, bytes: Vec<u8>) -> Result<()> {
        let sent = match &self.tx {
            Some(tx) if !self.failed.load(std::sync::atomic::Ordering::Relaxed) => {
                tx.send((key.clone(), bytes)).is_ok()
            }
            _ => false,
        };
        if !sent {
            // An upload failed (or no thread could start); say why.
            self.finish()?;
            return Err(RepoError::Invalid(format!(
                "internal: the upload threads stopped before {key}"
            )));
        }
        Ok(())
    }

    /// Wait for every queued pack to be stored; the first failure is returned.
    fn finish(&mut self) -> Result<()> {
        self.tx.take();
        let mut first = Ok(());
        for h in self.done.drain(..) {
            let r = h
                .join()
                .map_err(|_| RepoError::Invalid("internal: an upload thread panicked".into()))
                .and_then(|r| r);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Writes one point; blocks must come in ascending order. Dropped without `commit`, it deletes
/// what it wrote (best effort; `gc` collects anything left): nothing becomes visible.
pub struct PointWriter<'l> {
    repo: Repository,
    lock: &'l dyn DiskWriteLock,
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
    /// Chunks written by this writer that no chunk index object lists yet (flushed after the
    /// batch that brings it to `flush_every`: never more than that plus one batch).
    pending: HashMap<ChunkId, ChunkLocation>,
    /// New chunks of the sealed point this one continues, still being published (no chunk
    /// index object lists them yet): deduplicated against like stored ones. Its manifest is
    /// stored before this point's, so they are durable by the time anything names them.
    in_flight: Arc<HashSet<ChunkId>>,
    /// `FLUSH_PENDING`; smaller in tests.
    flush_every: usize,
    uploader: Uploader,
    /// Hashing/encoding workers' state, one per worker thread, kept for the whole point.
    workers: Vec<Worker>,
    /// The threads that run them, started once per point: a batch is often one NBD reply
    /// (≤ 16 blocks), and starting threads per batch cost more than some batches' work.
    pool: rayon::ThreadPool,
    /// Every object this writer put (deleted again if it is dropped without commit).
    written: Vec<String>,
    /// How many of `written` other writers may have seen: packs a chunk index object names
    /// (or may name: its put was tried), and those objects. Another live writer may dedup
    /// against them, so an unfinished point leaves them for `gc` unless it holds the
    /// exclusive lock.
    published: usize,
    stats: PointStats,
    copied_from: Option<CopiedFrom>,
    committed: bool,
    /// A failed commit could not tell whether its manifest was stored: keep every object.
    keep_written: bool,
}

impl<'l> PointWriter<'l> {
    pub(crate) fn new(
        repo: Repository,
        lock: &'l dyn DiskWriteLock,
        set: String,
        n: u32,
        previous: Option<PointManifest>,
        spec: NewPoint,
    ) -> Result<PointWriter<'l>> {
        let uploader = Uploader::new(repo.clone());
        Ok(PointWriter {
            repo,
            lock,
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
            in_flight: Arc::default(),
            flush_every: FLUSH_PENDING,
            uploader,
            workers: (0..worker_count()).map(|_| Worker::default()).collect(),
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(worker_count())
                .thread_name(|i| format!("cbtfs-encode-{i}"))
                .build()
                .map_err(|e| RepoError::Invalid(format!("cannot start encoding threads: {e}")))?,
            written: Vec::new(),
            published: 0,
            stats: PointStats::default(),
            copied_from: None,
            committed: false,
            keep_written: false,
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
        let keys = self.repo.keys().clone();
        let index = self.repo.chunk_index()?.clone();
        let slot = pack::max_record_len(&keys, bs);
        for batch in todo.chunks(BATCH_BLOCKS) {
            // One pass per block on a worker while its bytes are hot in cache: hash it, look it
            // up (repository, then this point's earlier chunks), and encode a new one straight
            // into its worst-case slot in the open pack's room. Then, in order, keep the first
            // of each new id (moving its record down over unused room) and drop the rest.
            if self.pack.is_none() {
                self.pack = Some(
                    PackWriter::with_buffer(self.repo.take_pack_buffer())
                        .map_err(|e| RepoError::Invalid(format!("no randomness: {e}")))?,
                );
            }
            let Some(p) = self.pack.as_mut() else {
                return Ok(());
            };
            let base = p.len();
            let room = p.room(batch.len() * slot);
            let per = if batch.len() < 4 {
                batch.len()
            } else {
                batch.len().div_ceil(self.workers.len().max(1))
            };
            let pending = &self.pending;
            let in_flight = &self.in_flight;
            let work = |w: &mut Worker, items: &[(u32, usize)], region: &mut [u8], at: usize| {
                w.done.clear();
                let mut used = 0;
                for &(b32, k) in items {
                    let plain = block_bytes(k);
                    let id = keys.chunk_id(plain);
                    let record = if pending.contains_key(&id)
                        || in_flight.contains(&id)
                        || index.contains(&id)
                    {
                        None
                    } else {
                        let (len, _) = w.encoder.encode_in_place(
                            &keys,
                            id,
                            plain,
                            region.get_mut(used..).unwrap_or_default(),
                        );
                        let r = (at + used, len);
                        used += len;
                        Some(r)
                    };
                    w.done.push((b32, id, record));
                }
            };
            let parts: Vec<&[(u32, usize)]> = batch.chunks(per.max(1)).collect();
            if parts.len() <= 1 {
                if let Some(w) = self.workers.first_mut() {
                    work(w, batch, room, base);
                }
            } else {
                let mut regions: Vec<(&mut [u8], usize)> = Vec::with_capacity(parts.len());
                let mut rest = room;
                let mut at = base;
                for part in &parts {
                    let (r, tail) = rest.split_at_mut((part.len() * slot).min(rest.len()));
                    regions.push((r, at));
                    at += part.len() * slot;
                    rest = tail;
                }
                self.pool.scope(|s| {
                    for ((w, part), (region, at)) in
                        self.workers.iter_mut().zip(&parts).zip(regions)
                    {
                        s.spawn(move |_| work(w, part, region, at));
                    }
                });
            }
            let used = parts.len().min(self.workers.len());
            for k in 0..used {
                for r in 0..self.workers[k].done.len() {
                    let (b32, id, record) = self.workers[k].done[r];
                    self.ids.extend_from_slice(&id.0);
                    self.stored.insert(b32);
                    let Some((at, len)) = record else {
                        continue;
                    };
                    // A second copy of a block new in this batch: the first one is kept.
                    if len == 0 || self.pending.contains_key(&id) {
                        if len == 0 {
                            return Err(RepoError::Invalid(
                                "internal: a chunk did not fit its slot".into(),
                            ));
                        }
                        continue;
                    }
                    let Some(p) = self.pack.as_mut() else {
                        return Ok(());
                    };
                    let loc = p.add_in_place(id, at, len);
                    self.pending.insert(id, loc);
                    self.stats.new_chunks += 1;
                    self.stats.new_raw_bytes += BLOCK_SIZE;
                    self.stats.new_stored_bytes += len as u64;
                }
            }
            if self
                .pack
                .as_ref()
                .is_some_and(|p| p.len() >= pack::PACK_TARGET)
            {
                self.finish_pack()?;
            }
            if self.pending.len() >= self.flush_every {
                self.flush_index()?;
            }
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

    /// Write a chunk index object listing `entries` (chunks of stored packs) and load it:
    /// from then on other writers may dedup against them.
    fn index_entries(&mut self, entries: Vec<(ChunkId, ChunkLocation)>) -> Result<()> {
        let put = chunkindex::write_index_into(
            self.repo.store().as_ref(),
            self.repo.keys(),
            entries,
            &mut self.written,
        );
        self.published = self.written.len();
        put?;
        self.repo.chunk_index()?.refresh()?;
        Ok(())
    }

    /// Store every pack so far and an index object listing their chunks; readers and later
    /// writers then find them.
    fn flush_index(&mut self) -> Result<()> {
        self.finish_pack()?;
        // The packs must be stored before an index names them.
        self.uploader.finish()?;
        if !self.pending.is_empty() {
            // `drain` keeps the map's table (bounded by `flush_every`) for the next entries.
            let entries: Vec<(ChunkId, ChunkLocation)> = self.pending.drain().collect();
            self.index_entries(entries)?;
        }
        self.uploader = Uploader::new(self.repo.clone());
        Ok(())
    }

    /// Deduplicate against the chunks of the sealed point this one continues
    /// ([`SealedPoint::unindexed_chunks`]). The caller publishes that point before this one:
    /// if its publish fails, this point must be dropped.
    pub fn dedup_in_flight(&mut self, chunks: Arc<HashSet<ChunkId>>) {
        self.in_flight = chunks;
    }

    /// Make the point durable and visible. Returns its manifest.
    pub fn commit(self) -> Result<PointManifest> {
        self.seal()?.publish()
    }

    /// Finish adding blocks and decide the point's manifest without waiting for any store:
    /// the last pack goes to the upload threads, the point index and VM metadata are encoded
    /// and sealed. [`SealedPoint::publish`] then stores the rest and the manifest. Between the
    /// two a caller may write the next point of the same set ([`Repository::continue_point`]),
    /// so that one point's uploads overlap the next one's reading and encoding (`cbtfs copy`).
    pub fn seal(mut self) -> Result<SealedPoint<'l>> {
        // Its upload starts now, on this writer's upload threads.
        self.finish_pack()?;
        // Free what is no longer needed before the point index is encoded and sealed: the
        // pending map's table (its entries kept in a vector, half the size), and the ids
        // themselves once encoded, so at most two copies of the ids (32 B per stored block)
        // exist at once.
        let entries: Vec<(ChunkId, ChunkLocation)> =
            std::mem::take(&mut self.pending).into_iter().collect();
        let ids = std::mem::take(&mut self.ids);
        let body = super::index::encode(self.spec.virtual_size, &self.changed, &self.stored, &ids);
        drop(ids);
        let index_key = format!("{PINDEX}{}", random_hex(16)?);
        let index_bytes = self.repo.seal_object(&index_key, "pindex", &body);
        drop(body);
        let index = ObjRef {
            key: index_key,
            len: index_bytes.len() as u64,
        };
        let meta = match &self.spec.vm_metadata {
            Some(bytes) => {
                let key = format!("{META}{}", random_hex(16)?);
                let sealed = self.repo.seal_object(&key, "meta", bytes);
                Some((key, sealed))
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
            index: index.clone(),
            source: self.spec.source.clone(),
            snapshot: self.spec.snapshot.clone(),
            vm_metadata: meta.as_ref().map(|(key, b)| ObjRef {
                key: key.clone(),
                len: b.len() as u64,
            }),
            vdi_type: self.spec.vdi_type.clone(),
            vm_run: self.spec.vm_run.clone(),
            stats: self.stats.clone(),
            copied_from: self.copied_from.clone(),
        };
        Ok(SealedPoint {
            writer: self,
            manifest: m,
            entries,
            index: (index.key, index_bytes),
            meta,
        })
    }
}

/// A point whose blocks are all added and whose manifest is decided, not yet stored
/// ([`PointWriter::seal`]). Dropped without [`publish`](Self::publish), it deletes what it
/// wrote, as an unfinished writer does: nothing becomes visible.
pub struct SealedPoint<'l> {
    writer: PointWriter<'l>,
    manifest: PointManifest,
    /// New chunks no chunk index object lists yet.
    entries: Vec<(ChunkId, ChunkLocation)>,
    /// The sealed point index and VM metadata objects: (key, bytes).
    index: (String, Vec<u8>),
    meta: Option<(String, Vec<u8>)>,
}

impl SealedPoint<'_> {
    /// The manifest `publish` stores (the next point of the set names it as its parent).
    pub fn manifest(&self) -> &PointManifest {
        &self.manifest
    }

    /// The new chunks no chunk index object lists yet, for the writer of the next point
    /// ([`PointWriter::dedup_in_flight`]): without them it would store a second copy of each
    /// block it shares with this point while this one publishes.
    pub fn unindexed_chunks(&self) -> Arc<HashSet<ChunkId>> {
        Arc::new(self.entries.iter().map(|(id, _)| *id).collect())
    }

    /// Store the packs, the chunk index object, the point index, the VM metadata and last the
    /// manifest: the point is durable and visible. Returns its manifest.
    pub fn publish(mut self) -> Result<PointManifest> {
        let w = &mut self.writer;
        // The packs must be stored before an index names them.
        w.uploader.finish()?;
        let entries = std::mem::take(&mut self.entries);
        if !entries.is_empty() {
            w.index_entries(entries)?;
        }
        // Keys are recorded before their puts, as chunk index keys are (`write_index_into`):
        // a put that stored its object and then failed leaves an object this writer deletes.
        let (key, bytes) = std::mem::take(&mut self.index);
        w.written.push(key.clone());
        w.repo.put_sealed_object(&key, &bytes)?;
        drop(bytes);
        if let Some((key, bytes)) = self.meta.take() {
            w.written.push(key.clone());
            w.repo.put_sealed_object(&key, &bytes)?;
        }
        let m = self.manifest.clone();
        test_hang("commit-before-manifest");
        if let Err(e) = w.repo.put_manifest(&m) {
            // A failed put may still have stored the manifest (on S3, its last attempt's
            // answer lost): it must not be left naming what the drop below deletes. Its key
            // is this point's own (a random id), so deleting it touches nothing else; if
            // that fails too, everything written is kept (consistent either way; `gc`
            // collects it if the manifest is not there).
            if let Err(d) = w.repo.store().delete(&m.key()) {
                tracing::warn!(object = %w.repo.describe(&m.key()), error = %d, "cannot make sure a failed manifest put left nothing; keeping the point's objects for `cbtfs gc`");
                w.keep_written = true;
            }
            return Err(e);
        }
        w.committed = true;
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
        if self.keep_written {
            return;
        }
        // What other writers may have seen stays (for `gc`, under the exclusive lock), unless
        // this writer holds that lock itself.
        let keep = if self.lock.excludes_other_writers() {
            0
        } else {
            self.published.min(self.written.len())
        };
        if keep > 0 {
            tracing::info!(
                objects = keep,
                "an unfinished point leaves the chunks it indexed for `cbtfs gc`: other writers may use them"
            );
        }
        // Newest first: what refers to other objects (chunk index objects name packs) goes
        // before what it refers to, so stopping half way leaves nothing naming a deleted
        // object.
        for key in self.written.get(keep..).unwrap_or(&[]).iter().rev() {
            if let Err(e) = self.repo.store().delete(key) {
                // The store is failing (each delete was retried already): leave the rest to
                // `gc` rather than wait out every object's retries. Nothing references them.
                tracing::warn!(object = %self.repo.describe(key), error = %e, "cannot delete what an unfinished point wrote; `cbtfs gc` collects it");
                break;
            }
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

#[cfg(test)]
impl PointWriter<'_> {
    /// Flush after `n` pending chunks instead of `FLUSH_PENDING` (tests of the bound).
    pub(crate) fn set_flush_every(&mut self, n: usize) {
        self.flush_every = n.max(1);
    }
    /// Entries waiting for a flush, and the pending map's capacity.
    pub(crate) fn pending_size(&self) -> (usize, usize) {
        (self.pending.len(), self.pending.capacity())
    }
}

/// One hashing/encoding worker's state: its zstd context and the records it encoded last.
#[derive(Default)]
struct Worker {
    encoder: pack::Encoder,
    /// Per block of its last share of a batch, in order.
    done: Vec<Hashed>,
}

/// A block of a batch after its worker's pass: (block, chunk id, its new record's place in
/// the pack buffer and length, or None if the chunk was already stored).
type Hashed = (u32, ChunkId, Option<(usize, usize)>);

/// Worker threads for a run: the machine's cores, at most `MAX_WORKERS`.
fn worker_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_WORKERS)
}

#[cfg(test)]
mod tests {
    use super::super::store::{LocalStore, LockError, LockGuard, ObjectInfo, Store};
    use super::super::{NewPoint, Repository, testing};
    use crate::BLOCK_SIZE;
    use std::io;
    use std::sync::Arc;

    /// A local store whose puts of keys under `prefix` store the object and then fail, as a
    /// PUT whose answer was lost on every attempt does.
    #[derive(Debug)]
    struct LostAnswers {
        inner: LocalStore,
        prefix: &'static str,
    }

    impl Store for LostAnswers {
        fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
            self.inner.put(key, bytes)?;
            if key.starts_with(self.prefix) {
                return Err(io::Error::other(format!("{key}: the answer was lost")));
            }
            Ok(())
        }
        fn get(&self, key: &str) -> io::Result<Vec<u8>> {
            self.inner.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.inner.get_range(key, offset, buf)
        }
        fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> io::Result<()> {
            self.inner.delete(key)
        }
        fn describe(&self, key: &str) -> String {
            self.inner.describe(key)
        }
        fn take_lock(
            &self,
            kind: crate::repo::store::LockKind<'_>,
            holder: &str,
            wait: std::time::Duration,
        ) -> Result<Box<dyn LockGuard>, LockError> {
            self.inner.take_lock(kind, holder, wait)
        }
    }

    /// A writer whose chunk index, point index, VM metadata or manifest put fails after
    /// storing the object leaves nothing behind: a chunk index object left over would name
    /// the packs the writer deletes (and a later backup would dedup against chunks that are
    /// gone); a manifest would be a point whose data is gone; a point index or VM metadata
    /// object would be unreferenced, left for gc.
    #[test]
    fn a_failed_put_that_stored_its_object_leaves_nothing() {
        for prefix in ["cindex/", "pindex/", "meta/", "points/", "packs/"] {
            let d = tempfile::tempdir().unwrap();
            let root = d.path().join("r");
            drop(testing::init(&root));
            let before = LocalStore::new(&root).list("").unwrap();
            let store: Arc<dyn Store> = Arc::new(LostAnswers {
                inner: LocalStore::new(&root),
                prefix,
            });
            let repo = Repository::open_store(store, &root, Some(&testing::secret())).unwrap();
            let lock = repo.lock_exclusive("test").unwrap();
            let blocks = 40u64;
            let mut w = repo
                .begin_point(
                    &lock,
                    NewPoint {
                        // VM metadata too, so that its put is one of those failing.
                        vm_metadata: Some(b"<ova.xml of the test VM/>".to_vec()),
                        ..testing::bare_point(
                            "00000000-0000-4000-8000-00000000000a",
                            1_000,
                            blocks * BLOCK_SIZE,
                            true,
                        )
                    },
                )
                .unwrap();
            let img: Vec<u8> = (0..blocks as usize * BLOCK_SIZE as usize)
                .map(|i| (i / 7) as u8 ^ (i >> 16) as u8)
                .collect();
            w.add_run(0, &img, true).unwrap();
            let e = w.commit().unwrap_err();
            assert!(
                e.to_string().contains("the answer was lost"),
                "{prefix}: {e}"
            );
            drop(lock);
            assert_eq!(
                LocalStore::new(&root).list("").unwrap(),
                before,
                "{prefix}: objects left behind"
            );
        }
    }

    /// A point written while the point it continues is still publishing (`cbtfs copy`'s
    /// pipeline) stores no second copy of the chunks they share: it dedups against the sealed
    /// point's unindexed chunks. Without them, each shared block is stored twice (`gc` then
    /// counts the second copy as garbage), as the second half shows.
    #[test]
    fn a_point_continuing_a_sealed_one_stores_no_second_copy_of_its_chunks() {
        for dedup in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let root = d.path().join("r");
            let repo = testing::init(&root);
            let lock = repo.lock_exclusive("test").unwrap();
            let blocks = 8u64;
            let vdi = "00000000-0000-4000-8000-00000000000b";
            let spec = |time, new_set| testing::bare_point(vdi, time, blocks * BLOCK_SIZE, new_set);
            let img: Vec<u8> = (0..blocks as usize * BLOCK_SIZE as usize)
                .map(|i| (i / 5) as u8 ^ (i >> 16) as u8)
                .collect();
            let mut w = repo.begin_point(&lock, spec(1_000, true)).unwrap();
            w.add_run(0, &img, true).unwrap();
            let first = w.seal().unwrap();
            assert_eq!(first.manifest().stats.new_chunks, blocks);
            // The same bytes again, block order reversed: every block changed, none new.
            let mut w = repo
                .continue_point(&lock, spec(2_000, false), first.manifest())
                .unwrap();
            if dedup {
                w.dedup_in_flight(first.unindexed_chunks());
            }
            let bs = BLOCK_SIZE as usize;
            let mut moved = vec![0u8; img.len()];
            for k in 0..blocks as usize {
                let j = blocks as usize - 1 - k;
                moved[k * bs..(k + 1) * bs].copy_from_slice(&img[j * bs..(j + 1) * bs]);
            }
            w.add_run(0, &moved, true).unwrap();
            let second = w.seal().unwrap();
            let first = first.publish().unwrap();
            let second = second.publish().unwrap();
            assert_eq!(second.parent.as_deref(), Some(first.id.as_str()));
            let want = if dedup { 0 } else { blocks };
            assert_eq!(second.stats.new_chunks, want, "dedup {dedup}");
            // Read back whole.
            let p1 = Arc::new(repo.open_point(&first).unwrap());
            let p2 = Arc::new(repo.open_point(&second).unwrap());
            let reader = crate::read::PointReader::from_layers(vec![p1, p2]).unwrap();
            let mut got = vec![0u8; moved.len()];
            assert_eq!(reader.read_at(&mut got, 0).unwrap(), got.len());
            assert!(
                got == moved,
                "dedup {dedup}: the second point reads back wrong"
            );
        }
    }

    /// Under a disk lock (other writers live), an unfinished point keeps what other writers
    /// may have deduplicated against: its chunk index object and the packs it names. Only
    /// what nobody can see (its point index) goes; gc under the exclusive lock collects the
    /// rest.
    #[test]
    fn an_unfinished_point_beside_other_writers_keeps_what_it_indexed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        drop(testing::init(&root));
        let before = LocalStore::new(&root).list("").unwrap();
        let store: Arc<dyn Store> = Arc::new(LostAnswers {
            inner: LocalStore::new(&root),
            prefix: "points/",
        });
        let repo = Repository::open_store(store, &root, Some(&testing::secret())).unwrap();
        let vdi = "00000000-0000-4000-8000-00000000000a";
        let shared = repo.lock_shared("test").unwrap();
        let lock = shared.lock_disk(vdi, "test").unwrap();
        let blocks = 40u64;
        let mut w = repo
            .begin_point(
                &lock,
                testing::bare_point(vdi, 1_000, blocks * BLOCK_SIZE, true),
            )
            .unwrap();
        let img: Vec<u8> = (0..blocks as usize * BLOCK_SIZE as usize)
            .map(|i| (i / 7) as u8 ^ (i >> 16) as u8)
            .collect();
        w.add_run(0, &img, true).unwrap();
        assert!(w.commit().is_err());
        drop(lock);
        drop(shared);
        let after = LocalStore::new(&root).list("").unwrap();
        let new: Vec<&str> = after
            .iter()
            .filter(|o| !before.contains(o))
            .map(|o| o.key.split('/').next().unwrap_or(""))
            .collect();
        assert!(new.contains(&"cindex") && new.contains(&"packs"), "{new:?}");
        assert!(
            new.iter().all(|p| *p == "cindex" || *p == "packs"),
            "{new:?}"
        );
        // gc (exclusive) collects it.
        let x = repo.lock_exclusive("gc").unwrap();
        crate::repo::gc::gc(&repo, &x, 0, false).unwrap();
        assert_eq!(LocalStore::new(&root).list("").unwrap(), before);
    }
}
