//! Read buffers reused across requests. A fresh multi-MiB allocation per request costs an
//! mmap, a page fault per 4 KiB page and the kernel zeroing every page — more CPU than the
//! copy from the socket itself on a full-disk fetch.
//!
//! A buffer from `take` holds stale bytes of an earlier request: whoever fills it must write
//! every byte (a read of its whole length, or data and hole chunks that cover it exactly).
//!
//! The pool is bounded by bytes, and a request takes the smallest buffer that fits. Bounding
//! only the count (160 buffers of up to 32 MiB) let it grow with the length of a backup:
//! requests of mixed sizes took the larger buffers, the next large request allocated another,
//! and idle buffers piled up (94 MiB after 16 GiB of 1 MiB extents, ~230 MiB at 100 GiB;
//! issue 18).

use std::sync::Mutex;

/// Idle buffers kept for reuse, in bytes at most: half the default fetch window (4 connections
/// × 8 requests × 2 MiB), so steady full-disk fetches mostly reuse, and the pool adds at most
/// this to the window's own memory.
const KEEP_BYTES: usize = 32 << 20;

/// Idle buffers and the sum of their capacities.
#[derive(Default)]
struct Pool {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            bufs: Vec::new(),
            bytes: 0,
        }
    }
    /// The smallest idle buffer holding `len` bytes, if any.
    fn take(&mut self, len: usize) -> Option<Vec<u8>> {
        let (i, _) = self
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())?;
        let b = self.bufs.swap_remove(i);
        self.bytes -= b.capacity();
        Some(b)
    }
    /// Keep `b` if it fits under `KEEP_BYTES` (else it is freed).
    fn give(&mut self, b: Vec<u8>) {
        let cap = b.capacity();
        if cap == 0 || self.bytes + cap > KEEP_BYTES {
            return;
        }
        self.bytes += cap;
        self.bufs.push(b);
    }
}

static POOL: Mutex<Pool> = Mutex::new(Pool::new());

/// A buffer of exactly `len` bytes, contents unspecified.
pub(crate) fn take(len: usize) -> Vec<u8> {
    let reused = POOL.lock().unwrap_or_else(|p| p.into_inner()).take(len);
    match reused {
        Some(mut b) => {
            // Within capacity: truncating is free, growing zeroes only the new tail.
            b.resize(len, 0);
            b
        }
        None => vec![0u8; len],
    }
}

/// Return a buffer for reuse.
pub(crate) fn give(b: Vec<u8>) {
    POOL.lock().unwrap_or_else(|p| p.into_inner()).give(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_at_the_asked_length() {
        let mut b = take(4096);
        b.fill(7);
        give(b);
        let b = take(1000);
        assert_eq!(b.len(), 1000);
        give(b);
        let b = take(8192);
        assert_eq!(b.len(), 8192);
    }

    /// Issue 18: the pool never holds more than `KEEP_BYTES`, however many buffers come back,
    /// and a request takes the smallest buffer that fits (a large one stays for a large
    /// request instead of a new one being allocated).
    #[test]
    fn the_pool_is_bounded_by_bytes_and_takes_the_best_fit() {
        let mut p = Pool::new();
        for k in 0..200 {
            p.give(Vec::with_capacity((1 + k % 3) << 20));
            assert!(p.bytes <= KEEP_BYTES, "{} after {k}", p.bytes);
            assert_eq!(p.bytes, p.bufs.iter().map(|b| b.capacity()).sum::<usize>());
        }
        assert!(p.bytes > KEEP_BYTES - (3 << 20), "{}", p.bytes);
        let mut q = Pool::new();
        q.give(Vec::with_capacity(2 << 20));
        q.give(Vec::with_capacity(1 << 20));
        q.give(Vec::with_capacity(3 << 20));
        assert_eq!(q.take(1 << 20).unwrap().capacity(), 1 << 20);
        assert_eq!(q.take((1 << 20) + 1).unwrap().capacity(), 2 << 20);
        assert!(q.take(4 << 20).is_none());
        assert_eq!(q.bytes, 3 << 20);
        q.give(Vec::new());
        assert_eq!(q.bufs.len(), 1);
    }
}
