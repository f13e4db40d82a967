//! An in-memory stream for the NBD fuzz targets: reads return the fuzz input (the server's
//! bytes) and then end; writes (the client's requests) are counted and dropped. Reads wait
//! until the client has written `gate` bytes, so replies meet the requests they may answer.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use cbtfs::nbd::client::{Client, Reply};

#[derive(Default)]
struct Shared {
    written: usize,
    waker: Option<Waker>,
}

pub struct Script {
    data: Vec<u8>,
    at: usize,
    gate: usize,
    shared: Arc<Mutex<Shared>>,
}

impl Script {
    pub fn new(data: &[u8]) -> Script {
        Script {
            data: data.to_vec(),
            at: 0,
            gate: 0,
            shared: Arc::default(),
        }
    }

    /// From now on, reads wait until `bytes` more have been written.
    pub fn gate(&mut self, bytes: usize) {
        let written = self.shared.lock().map(|s| s.written).unwrap_or(0);
        self.gate = written + bytes;
    }
}

impl tokio::io::AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        {
            let mut s = self.shared.lock().unwrap();
            if s.written < self.gate {
                s.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        let rest = &self.data[self.at..];
        // Small, varying reads exercise partial headers and payloads.
        let n = rest.len().min(buf.remaining()).min(1 + self.at % 61);
        buf.put_slice(&rest[..n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Script {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut s = self.shared.lock().unwrap();
        s.written += buf.len();
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The requests the harness sends, in order (cookies 1, 2, ...): (is a read, offset, length).
pub const REQUESTS: [(bool, u64, u32); 4] = [
    (true, 0, 4096),
    (false, 0, 1 << 20),
    (true, 8192, 1024),
    (true, (1 << 20) - 512, 512),
];

/// Send `REQUESTS` on `c` and check every answer: a read's data is exactly as long as asked,
/// block status extents are non-empty and each non-zero; errors are fine.
pub async fn drive(c: Client) {
    let mut reads = Vec::new();
    for &(read, off, len) in &REQUESTS {
        if read {
            reads.push((len, c.read(off, len).await));
        }
    }
    let status = c.block_status(0, 1 << 20).await;
    if let Ok(extents) = status {
        assert!(!extents.is_empty());
        assert!(extents.iter().all(|&(l, _)| l > 0));
        assert!(extents.len() <= cbtfs::nbd::proto::MAX_EXTENTS as usize);
    }
    for (len, rx) in reads {
        if let Ok(Ok(Reply::Data(d))) = rx.await {
            assert_eq!(d.len(), len as usize);
        }
    }
}
