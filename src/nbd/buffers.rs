//! Read buffers reused across requests. A fresh multi-MiB allocation per request costs an
//! mmap, a page fault per 4 KiB page and the kernel zeroing every page — more CPU than the
//! copy from the socket itself on a full-disk fetch.
//!
//! A buffer from `take` holds stale bytes of an earlier request: whoever fills it must write
//! every byte (a read of its whole length, or data and hole chunks that cover it exactly).

use std::sync::Mutex;

/// Buffers kept for reuse: enough for every request in flight on 16 connections.
const KEEP: usize = 160;
/// Larger buffers are not kept (requests are at most a few MiB).
const MAX_KEPT: usize = 32 << 20;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of exactly `len` bytes, contents unspecified.
pub(crate) fn take(len: usize) -> Vec<u8> {
    let reused = {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        pool.iter()
            .rposition(|b| b.capacity() >= len)
            .map(|i| pool.swap_remove(i))
    };
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
    if b.capacity() == 0 || b.capacity() > MAX_KEPT {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < KEEP {
        pool.push(b);
    }
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
}
