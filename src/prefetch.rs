//! Read-ahead inside the mount. When the kernel reads a restore point sequentially, the next
//! `window` bytes are fetched from the repository by a pool of threads, chunk by chunk, before
//! the kernel asks for them.
//!
//! Why: FUSE keeps only a few 1 MiB requests in flight, where a raw file gets the block layer's
//! full readahead; and a deep point's blocks lie scattered over many data files, which the disk
//! serves fast only when many reads are queued at once. Reads stay direct (no second page
//! cache): a chunk lives from its fetch until the kernel has taken its bytes.
//!
//! Correctness does not depend on it: a request not wholly covered by fetched chunks, or
//! covering a chunk whose fetch failed, is read the ordinary way (`PointReader::read_at`), which
//! also reports damage precisely.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::read::{PointReader, ReadError};
use crate::repo::store::aligned_slice;

/// Unit of fetch: the kernel's largest FUSE read, so a request usually maps to one chunk.
pub const CHUNK: u64 = 1 << 20;
/// Sequential streams followed at once (e.g. several `cp` or `qemu-img` jobs); the least
/// recently used is forgotten, with its chunks.
const MAX_STREAMS: usize = 8;
/// A request this far before or after where a stream stands (at most; less for small windows)
/// still continues it: the kernel sends its readahead requests to several threads, which
/// answer in any order.
const SLACK: u64 = 8 << 20;

/// Requests in order before read-ahead starts. A random reader's request lands near the one
/// before it now and then; twice in a row, almost never.
const START_AFTER: u32 = 3;

/// The read-ahead of one mount.
pub struct Prefetcher {
    shared: Arc<Shared>,
    window: u64,
    slack: u64,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Requests answered from read-ahead (for tests and logs).
    hits: AtomicU64,
    /// Of those, the ones that had to wait for their chunk's fetch.
    waited: AtomicU64,
    /// Every request seen.
    requests: AtomicU64,
}

struct Shared {
    streams: Mutex<Vec<Stream>>,
    queue: Mutex<Queue>,
    queued: Condvar,
    buffers: Mutex<Vec<Vec<u8>>>,
    max_buffers: usize,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<(Arc<PointReader>, Arc<Chunk>)>,
    stop: bool,
}

/// A reader going through one file in order.
struct Stream {
    key: u64,
    /// Furthest end read so far.
    pos: u64,
    /// Requests seen in order.
    hits: u32,
    /// Chunks fetched or being fetched, by start offset.
    chunks: BTreeMap<u64, Arc<Chunk>>,
    /// Everything below this has been queued.
    ahead: u64,
    last_used: u64,
}

struct Chunk {
    offset: u64,
    len: usize,
    slot: Mutex<Slot>,
    done: Condvar,
    shared: std::sync::Weak<Shared>,
}

enum Slot {
    Pending,
    /// The buffer (aligned within it by `aligned_slice`) and the bytes handed out so far.
    Ready(Vec<u8>, usize),
    Failed,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these structures half-updated in a way that matters:
    // every value is consistent between statements.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let slot = std::mem::replace(
            self.slot.get_mut().unwrap_or_else(|e| e.into_inner()),
            Slot::Failed,
        );
        if let (Slot::Ready(buf, _), Some(shared)) = (slot, self.shared.upgrade()) {
            shared.give_back(buf);
        }
    }
}

impl Shared {
    fn take_buffer(&self) -> Vec<u8> {
        lock(&self.buffers).pop().unwrap_or_default()
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut b = lock(&self.buffers);
        if b.len() < self.max_buffers {
            b.push(buf);
        }
    }

    fn worker(self: Arc<Self>) {
        loop {
            let (reader, chunk) = {
                let mut q = lock(&self.queue);
                loop {
                    if q.stop {
                        return;
                    }
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    q = self.queued.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            // Nobody holds the chunk but this job: its stream was forgotten.
            if Arc::strong_count(&chunk) == 1 {
                continue;
            }
            let mut buf = self.take_buffer();
            let slot = match reader.read_at(aligned_slice(&mut buf, chunk.len), chunk.offset) {
                Ok(n) if n == chunk.len => Slot::Ready(buf, 0),
                _ => {
                    self.give_back(buf);
                    Slot::Failed
                }
            };
            *lock(&chunk.slot) = slot;
            chunk.done.notify_all();
        }
    }
}

impl Prefetcher {
    /// Read ahead `window` bytes of each sequential reader, with `threads` fetching.
    pub fn new(window: u64, threads: usize) -> Prefetcher {
        let window = window.max(CHUNK);
        let shared = Arc::new(Shared {
            streams: Mutex::new(Vec::new()),
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            buffers: Mutex::new(Vec::new()),
            // Keep enough for one window in flight; more are allocated when several streams run.
            max_buffers: (window / CHUNK) as usize * 2,
        });
        let threads = (0..threads.max(1))
            .filter_map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("cbtfs-ahead-{i}"))
                    .spawn(move || s.worker())
                    .ok()
            })
            .collect();
        Prefetcher {
            shared,
            window,
            slack: SLACK.min(window),
            threads,
            hits: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// Read `buf.len()` bytes at `offset` of the point `reader`, read through `key` (the mount
    /// passes the open file's handle, so a stream's chunks all come from that handle's reader):
    /// from fetched chunks when they cover the request, else directly. Returns the bytes read,
    /// fewer only at the end of the disk.
    pub fn read(
        &self,
        key: u64,
        reader: &Arc<PointReader>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Box<ReadError>> {
        let size = reader.size();
        // No fetch threads (none could start): never wait for a chunk nobody fetches.
        if offset >= size || buf.is_empty() || self.threads.is_empty() {
            return reader.read_at(buf, offset);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let end = (offset + buf.len() as u64).min(size);
        let covering = self.follow(key, reader, offset, end, size);
        if let Some(chunks) = covering
            && self.copy_out(&chunks, offset, &mut buf[..(end - offset) as usize])
        {
            self.forget_taken(key, &chunks);
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((end - offset) as usize);
        }
        reader.read_at(buf, offset)
    }

    /// Log how many requests read-ahead answered.
    pub fn log_stats(&self) {
        tracing::info!(
            requests = self.requests.load(Ordering::Relaxed),
            from_read_ahead = self.hits.load(Ordering::Relaxed),
            waited_for_disk = self.waited.load(Ordering::Relaxed),
            "read-ahead"
        );
    }

    /// How many requests were answered from read-ahead.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Update the stream this request belongs to, queue what lies ahead of it, and return the
    /// chunks that cover the request, if all do.
    fn follow(
        &self,
        key: u64,
        reader: &Arc<PointReader>,
        offset: u64,
        end: u64,
        size: u64,
    ) -> Option<Vec<Arc<Chunk>>> {
        let mut streams = lock(&self.shared.streams);
        let tick = streams.iter().map(|s| s.last_used).max().unwrap_or(0) + 1;
        let found = streams.iter().position(|s| {
            s.key == key
                && offset + self.slack >= s.pos
                && offset <= s.pos.max(s.ahead) + self.slack
        });
        let Some(i) = found else {
            if streams.len() >= MAX_STREAMS
                && let Some(oldest) = (0..streams.len()).min_by_key(|&i| streams[i].last_used)
            {
                streams.swap_remove(oldest);
            }
            streams.push(Stream {
                key,
                pos: end,
                hits: 1,
                chunks: BTreeMap::new(),
                ahead: 0,
                last_used: tick,
            });
            return None;
        };
        let s = &mut streams[i];
        s.last_used = tick;
        s.hits += 1;
        s.pos = s.pos.max(end);
        // Chunks well behind the reader will not be asked for again (the kernel caches them).
        let behind = s.pos.saturating_sub(self.slack);
        s.chunks.retain(|&o, c| o + c.len as u64 > behind);
        let first = offset - offset % CHUNK;
        let mut covering = Vec::new();
        let mut at = first;
        while at < end {
            match s.chunks.get(&at) {
                Some(c) => covering.push(c.clone()),
                None => break,
            }
            at += CHUNK;
        }
        let covered = at >= end;
        if s.hits < START_AFTER {
            return None;
        }
        // Queue chunks from the end of this request to a window past it. A request not covered
        // is read directly, so nothing before its end is queued.
        let from = s.ahead.max(end.div_ceil(CHUNK) * CHUNK);
        let until = (s.pos + self.window).min(size);
        let mut jobs = Vec::new();
        let mut o = from;
        while o < until {
            let c = Arc::new(Chunk {
                offset: o,
                len: CHUNK.min(size - o) as usize,
                slot: Mutex::new(Slot::Pending),
                done: Condvar::new(),
                shared: Arc::downgrade(&self.shared),
            });
            s.chunks.insert(o, c.clone());
            jobs.push((reader.clone(), c));
            o += CHUNK;
        }
        s.ahead = s.ahead.max(o);
        drop(streams);
        if !jobs.is_empty() {
            lock(&self.shared.queue).jobs.extend(jobs);
            self.shared.queued.notify_all();
        }
        covered.then_some(covering)
    }

    /// Copy the request's bytes out of its chunks, waiting for fetches under way. False if a
    /// fetch failed (the caller then reads directly and reports the damage).
    fn copy_out(&self, chunks: &[Arc<Chunk>], offset: u64, out: &mut [u8]) -> bool {
        let end = offset + out.len() as u64;
        for c in chunks {
            let mut slot = lock(&c.slot);
            if matches!(*slot, Slot::Pending) {
                self.waited.fetch_add(1, Ordering::Relaxed);
            }
            while matches!(*slot, Slot::Pending) {
                slot = c.done.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
            let Slot::Ready(buf, taken) = &mut *slot else {
                return false;
            };
            let from = offset.max(c.offset);
            let to = end.min(c.offset + c.len as u64);
            let data = aligned_slice(buf, c.len);
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - c.offset) as usize..(to - c.offset) as usize]);
            *taken += (to - from) as usize;
        }
        true
    }

    /// Drop chunks whose every byte has been handed to the kernel: it has them cached now.
    fn forget_taken(&self, key: u64, chunks: &[Arc<Chunk>]) {
        let done: Vec<u64> = chunks
            .iter()
            .filter(|c| matches!(*lock(&c.slot), Slot::Ready(_, taken) if taken >= c.len))
            .map(|c| c.offset)
            .collect();
        if done.is_empty() {
            return;
        }
        let mut streams = lock(&self.shared.streams);
        for s in streams.iter_mut().filter(|s| s.key == key) {
            for o in &done {
                s.chunks.remove(o);
            }
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.queued.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BLOCK_SIZE;
    use crate::import::{ImportRequest, ImportSource, import_raw};
    use crate::repo::Repository;

    const VDI: &str = "11111111-2222-4333-8444-555555555555";

    fn import(repo: &Repository, img: &std::path::Path, time: i64, bitmap: Option<String>) {
        import_raw(
            repo,
            &ImportRequest {
                vdi: VDI.into(),
                disk_name: Some("root".into()),
                vm_uuid: None,
                vm_name: None,
                source: ImportSource::Raw(img.to_path_buf()),
                bitmap: bitmap.map(|b| (b, "test".into())),
                time,
                snapshot: None,
                vm_metadata: None,
                vdi_type: None,
                vm_run: None,
                source_label: None,
            },
            |_, _| {},
        )
        .unwrap();
    }

    /// A two-point chain whose top point takes scattered blocks from each layer, of a size that
    /// ends inside a block and inside a chunk, mostly zeros after its first 5 MiB; and the top
    /// point's bytes.
    fn chain() -> (tempfile::TempDir, Arc<PointReader>, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let repo = crate::repo::testing::init(&d.path().join("repo")).with_direct_reads();
        let img = d.path().join("img");
        let size = 5 * CHUNK as usize + 3 * BLOCK_SIZE as usize + 4096;
        let mut data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 65536) as u8).collect();
        // Then zeros, so the disk is larger than the distance that still counts as in order.
        data.resize(size + 3 * SLACK as usize, 0);
        let size = data.len();
        std::fs::write(&img, &data).unwrap();
        import(&repo, &img, 1_800_000_000, None);
        let blocks = (size as u64).div_ceil(BLOCK_SIZE);
        let mut changed = roaring::RoaringBitmap::new();
        for b in (1..blocks).step_by(3) {
            changed.insert(b as u32);
            let at = (b * BLOCK_SIZE) as usize;
            let end = (at + BLOCK_SIZE as usize).min(size);
            data[at..end].fill(b as u8 ^ 0x5a);
        }
        std::fs::write(&img, &data).unwrap();
        let bitmap = crate::bitmap::encode_base64(&changed, blocks);
        import(&repo, &img, 1_800_003_600, Some(bitmap));
        let disk = repo.disk(VDI).unwrap();
        let reader = PointReader::open(&repo, &disk.sets[0], 1).unwrap();
        (d, Arc::new(reader), data)
    }

    #[test]
    fn sequential_and_scattered_requests_read_the_point_exactly() {
        let (_d, reader, data) = chain();
        let p = Prefetcher::new(2 * CHUNK, 3);
        let size = data.len() as u64;
        // In order, with sizes that do not fall on chunks, then past the end.
        let mut buf = vec![0u8; 300_000];
        let mut at = 0;
        while at < size {
            let n = p.read(1, &reader, at, &mut buf).unwrap();
            assert_eq!(&buf[..n], &data[at as usize..at as usize + n], "at {at}");
            at += n as u64;
        }
        assert_eq!(p.read(1, &reader, size, &mut buf).unwrap(), 0);
        let in_order = p.hits();
        assert!(in_order >= 10, "{in_order} of 20 requests from read-ahead");
        // Kernel-style: 1 MiB requests answered out of order, two streams on one file, and a
        // jump back to the start.
        let mut big = vec![0u8; CHUNK as usize];
        for (key, order) in [(2, [0u64, 2, 1, 3, 5, 4]), (2, [3, 4, 5, 0, 1, 2])] {
            for c in order {
                let n = p.read(key, &reader, c * CHUNK, &mut big).unwrap();
                let from = (c * CHUNK) as usize;
                assert_eq!(&big[..n], &data[from..from + n], "chunk {c}");
            }
        }
        assert!(
            p.hits() > in_order,
            "out-of-order requests use read-ahead too"
        );
    }

    #[test]
    fn random_requests_fetch_nothing_ahead() {
        let (_d, reader, data) = chain();
        let p = Prefetcher::new(2 * CHUNK, 2);
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        // Each request far from the one before (7 MiB on, wrapping around).
        for i in 0..20u64 {
            let at = (i * 7 * CHUNK + i * 4096) % (data.len() as u64 - BLOCK_SIZE);
            let n = p.read(9, &reader, at, &mut buf).unwrap();
            assert_eq!(&buf[..n], &data[at as usize..at as usize + n]);
        }
        assert_eq!(p.hits(), 0);
        // Near each other but only twice in a row: still nothing queued.
        p.read(10, &reader, 0, &mut buf).unwrap();
        p.read(10, &reader, BLOCK_SIZE, &mut buf).unwrap();
        assert!(lock(&p.shared.streams).iter().all(|s| s.chunks.is_empty()));
    }

    #[test]
    fn a_damaged_block_fails_only_the_requests_that_cover_it() {
        let (d, reader, data) = chain();
        // Flip a byte of the base's block 6 (not changed by the top point: 6 % 3 == 0).
        let repo = crate::repo::testing::open(&d.path().join("repo"));
        let base = &repo.disk(VDI).unwrap().sets[0].points[0];
        let (key, loc) = repo.locate_block(base, 6).unwrap().unwrap();
        let pack_file = d.path().join("repo").join(key);
        let mut bytes = std::fs::read(&pack_file).unwrap();
        bytes[loc.offset as usize + loc.len as usize / 2] ^= 1;
        std::fs::write(&pack_file, &bytes).unwrap();
        let p = Prefetcher::new(4 * CHUNK, 2);
        let mut buf = vec![0u8; 128 * 1024];
        let mut at = 0;
        let mut failed = Vec::new();
        while at < data.len() as u64 {
            match p.read(1, &reader, at, &mut buf) {
                Ok(n) => assert_eq!(&buf[..n], &data[at as usize..at as usize + n]),
                Err(e) => failed.push((at, e.block)),
            }
            at += buf.len() as u64;
        }
        // Requests of two blocks: exactly the one holding block 6 (its chunk's fetch failed and
        // the request was read again directly, which names the block).
        assert_eq!(failed, vec![(6 * BLOCK_SIZE, 6)]);
        assert!(p.hits() > 20, "the other requests came from read-ahead");
    }
}
