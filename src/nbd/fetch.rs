//! Fetching byte ranges of an export over several connections at once.
//!
//! The host serves each connection serially, so speed comes from connections in parallel (never
//! more than 16 per host) and requests pipelined on each. Pieces are handed to the sink in
//! ascending order through a bounded window, so memory is `connections × depth × request size`
//! whatever the disk's size. A failed piece (dropped connection, error reply, timeout) is
//! re-issued on a fresh connection with back-off, a bounded number of times.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::oneshot;

use super::client::{Client, NbdError, Reply, Target};
use super::proto::{self, ExportInfo};

/// XenServer's limit of concurrent NBD connections per host.
pub const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, Clone, Copy)]
pub struct FetchOptions {
    pub connections: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// Largest single read (capped by what the server advertises). 1 MiB by default: a
    /// server allocates a buffer per request, and qemu-nbd's 2 MiB ones land above glibc's
    /// mmap threshold, so every request faulted in fresh zeroed pages (0.5–0.9 million page
    /// faults per 4 GiB, a third of its CPU); 512 KiB costs more per request on our side.
    pub max_request: u32,
    /// Attempts per piece before giving up.
    pub attempts: u32,
    /// A piece not answered in this time counts as failed.
    pub timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            connections: 4,
            depth: 8,
            max_request: 1 << 20,
            attempts: 5,
            timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error(
        "reading {len} bytes at offset {offset} of {target} failed {attempts} times; last error: {last}"
    )]
    GaveUp {
        target: String,
        offset: u64,
        len: u32,
        attempts: u32,
        last: NbdError,
    },
    #[error("{target}: no answer for {len} bytes at offset {offset} within {secs} s")]
    Timeout {
        target: String,
        offset: u64,
        len: u32,
        secs: u64,
    },
    #[error("storing fetched data: {0}")]
    Sink(String),
}

/// Warnings a pool gathers as it goes (the backup shows them and puts them in its report):
/// fewer connections than asked, an address that stopped answering.
pub type Notes = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// How a note about a pool that shrank mid-run starts (a later one replaces it: said once).
const SHRANK: &str = "an NBD connection was lost and the host took no new one";

/// Connections to one export, reachable at one or more addresses (a host lists one
/// `get_nbd_info` record per address): connections are spread over the addresses in turn, and
/// a connection that dies is replaced through a live one.
///
/// The host limits connections (xapi-nbd: 16 per host, shared with every other client), and
/// says so by refusing or closing a connection before the export is open. So the pool opens
/// what the host takes and goes on with that, failing only when no connection opened at all;
/// a reconnect the host refuses mid-run shrinks the pool while other connections live.
pub struct Pool {
    targets: Vec<Target>,
    /// Per address: a connection to it was refused or failed; tried again only when every
    /// address has.
    exhausted: Vec<bool>,
    opts: FetchOptions,
    clients: Vec<Client>,
    /// The address (index into `targets`) of each connection.
    home: Vec<usize>,
    pub info: ExportInfo,
    next: usize,
    notes: Notes,
}

/// Every address tried and why it failed (each error names its address).
fn tried(targets: &[Target], errors: &[Option<NbdError>]) -> String {
    targets
        .iter()
        .zip(errors)
        .map(|(t, e)| match e {
            Some(e) => e.to_string(),
            None => t.describe(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl Pool {
    /// Open `opts.connections` connections to `target` in parallel.
    pub async fn open(target: Target, opts: FetchOptions) -> Result<Pool, NbdError> {
        Pool::open_many(vec![target], opts).await
    }

    /// Open `opts.connections` connections in parallel, spread over `targets` (addresses of
    /// the same export) in turn. Connections the host refuses or closes during the handshake
    /// are done without (said once in [`Pool::notes`]); only when none opens is it an error.
    pub async fn open_many(targets: Vec<Target>, mut opts: FetchOptions) -> Result<Pool, NbdError> {
        let Some(first) = targets.first() else {
            return Err(NbdError::NoConnection {
                tried: "(the host listed no NBD address)".into(),
            });
        };
        let first = first.describe();
        opts.connections = opts.connections.clamp(1, MAX_CONNECTIONS);
        let mut handles = Vec::new();
        for i in 0..opts.connections {
            let home = i % targets.len();
            let t = targets[home].clone();
            let (depth, limit) = (opts.depth, opts.timeout);
            handles.push((
                home,
                tokio::spawn(async move { Client::connect_within(&t, depth, limit).await }),
            ));
        }
        let mut clients = Vec::new();
        let mut home = Vec::new();
        let mut failures: Vec<Option<NbdError>> = targets.iter().map(|_| None).collect();
        let mut failed = 0usize;
        for (t, h) in handles {
            let r = h.await.unwrap_or_else(|e| {
                Err(NbdError::Connect {
                    target: targets[t].describe(),
                    source: std::io::Error::other(e.to_string()),
                })
            });
            match r {
                Ok(c) => {
                    clients.push(c);
                    home.push(t);
                }
                Err(e) => {
                    failed += 1;
                    tracing::info!(error = %e, "an NBD connection did not open");
                    if let Some(slot) = failures.get_mut(t)
                        && slot.is_none()
                    {
                        *slot = Some(e);
                    }
                }
            }
        }
        // Fewer connections than addresses, and none opened: the addresses not tried yet,
        // one at a time, until one answers.
        let asked = opts.connections.min(targets.len());
        if clients.is_empty() {
            for (t, target) in targets.iter().enumerate().skip(asked) {
                match Client::connect_within(target, opts.depth, opts.timeout).await {
                    Ok(c) => {
                        clients.push(c);
                        home.push(t);
                        break;
                    }
                    Err(e) => failures[t] = Some(e),
                }
            }
        }
        let Some(info) = clients.first().map(|c| c.info) else {
            // One address: its own error, as it is. Several: every address and its error.
            if targets.len() == 1
                && let Some(e) = failures.pop().flatten()
            {
                return Err(e);
            }
            return Err(NbdError::NoConnection {
                tried: tried(&targets, &failures),
            });
        };
        // Every connection serves the same export: a server that disagrees with itself
        // about its size is not read from.
        if clients.iter().any(|c| c.info.size != info.size) {
            return Err(NbdError::Proto {
                target: first,
                source: proto::ProtoError::Malformed(
                    "export size (connections to the same export disagree)",
                ),
            });
        }
        let exhausted: Vec<bool> = (0..targets.len())
            .map(|t| failures[t].is_some() && !home.contains(&t))
            .collect();
        let mut notes = Vec::new();
        if failed > 0 {
            let mut n = if clients.len() < opts.connections {
                format!(
                    "the host accepted {} of {} NBD connections; going on with {}",
                    clients.len(),
                    opts.connections,
                    clients.len()
                )
            } else {
                "going on through the host's other NBD addresses".to_string()
            };
            // Addresses that took none: the error names each.
            for (i, e) in failures.iter().enumerate() {
                if let Some(e) = e
                    && !home.contains(&i)
                {
                    n.push_str(&format!("; none opened at {e}"));
                }
            }
            tracing::info!("{n}");
            notes.push(n);
        }
        let server_max = if info.max_block > 0 {
            info.max_block
        } else {
            proto::MAX_REQUEST
        };
        // Whole 64 KiB blocks per request.
        opts.max_request =
            (opts.max_request.min(server_max).min(proto::MAX_REQUEST) >> 16 << 16).max(1 << 16);
        Ok(Pool {
            targets,
            exhausted,
            opts,
            clients,
            home,
            info,
            next: 0,
            notes: std::sync::Arc::new(std::sync::Mutex::new(notes)),
        })
    }

    /// Close every connection cleanly.
    pub async fn close(self) {
        // All at once: each waits for its server to close its side.
        let mut closing = tokio::task::JoinSet::new();
        for c in self.clients {
            closing.spawn(c.close());
        }
        while closing.join_next().await.is_some() {}
    }

    /// The first address the export was offered at (how points name their source).
    pub fn target(&self) -> &Target {
        // `open_many` refuses an empty list: there is always a first.
        &self.targets[0]
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.clients.len()
    }

    /// The pool's warnings, shared: they keep arriving while it fetches.
    pub fn notes(&self) -> Notes {
        self.notes.clone()
    }

    fn note(&self, text: String) {
        tracing::info!("{text}");
        if let Ok(mut n) = self.notes.lock() {
            match n.last_mut() {
                Some(last) if last.starts_with(SHRANK) && text.starts_with(SHRANK) => *last = text,
                _ => n.push(text),
            }
        }
    }

    /// A fresh connection, to address `preferred` if it takes one, else to the next address
    /// that does. Addresses that failed are skipped while another has not (all failed: all
    /// are tried again). Returns the address's index and the connection.
    async fn reconnect(&mut self, preferred: usize) -> Result<(usize, Client), NbdError> {
        let n = self.targets.len();
        let all_failed = self.exhausted.iter().all(|e| *e);
        let mut last = None;
        for k in 0..n {
            let t = (preferred + k) % n;
            if self.exhausted[t] && !all_failed {
                continue;
            }
            tracing::info!(target = %self.targets[t].describe(), "reconnecting");
            match Client::connect_within(&self.targets[t], self.opts.depth, self.opts.timeout).await
            {
                Ok(fresh) => {
                    if fresh.info.size != self.info.size {
                        return Err(NbdError::Proto {
                            target: self.targets[t].describe(),
                            source: proto::ProtoError::Malformed(
                                "export size (it changed on reconnecting)",
                            ),
                        });
                    }
                    self.exhausted[t] = false;
                    return Ok((t, fresh));
                }
                Err(e) if e.is_transient() => {
                    if !self.exhausted[t] && n > 1 {
                        self.note(format!(
                            "the NBD address {} stopped taking connections ({e}); going on through the host's other addresses",
                            self.targets[t].describe()
                        ));
                    }
                    self.exhausted[t] = true;
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| NbdError::Closed {
            target: self.targets[preferred % n].describe(),
        }))
    }

    /// A live connection, reconnecting the next one in turn if it died: a connection whose
    /// reader stopped (an error, a timeout) is never given another request. When the host
    /// takes no new connection, the dead one's place is given up while others live.
    async fn pick(&mut self) -> Result<usize, NbdError> {
        loop {
            if self.clients.is_empty() {
                return Err(NbdError::Closed {
                    target: self.target().describe(),
                });
            }
            let i = self.next % self.clients.len();
            self.next = self.next.wrapping_add(1);
            if self.clients[i].is_alive() {
                return Ok(i);
            }
            match self.reconnect(self.home[i]).await {
                Ok((t, fresh)) => {
                    self.clients[i] = fresh;
                    self.home[i] = t;
                    return Ok(i);
                }
                Err(e)
                    if e.is_transient()
                        && self
                            .clients
                            .iter()
                            .enumerate()
                            .any(|(j, c)| j != i && c.is_alive()) =>
                {
                    self.clients.remove(i);
                    self.home.remove(i);
                    let n = self.clients.len();
                    let plural = if n == 1 { "" } else { "s" };
                    self.note(format!(
                        "{SHRANK} ({e}); going on with {n} connection{plural}"
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Give up the connection `id` (if still in the pool): the next pick reconnects it.
    fn kill(&self, id: u64) {
        if let Some(c) = self.clients.iter().find(|c| c.id() == id) {
            c.kill();
        }
    }

    /// Extents of the export that may hold data (`base:allocation`), if the server says.
    /// None means "read everything": no block status, or a server whose answers are too
    /// meagre to be worth following (every request must make progress, and all of them
    /// together fit a budget by the export's size, so no server can keep this looping).
    pub async fn allocated(&mut self) -> Result<Option<Vec<(u64, u64)>>, NbdError> {
        if self.clients[0].status_context.is_none() {
            return Ok(None);
        }
        let size = self.info.size;
        // One request per GiB, plus one per 4 MiB beyond the first thousand requests.
        let budget = 1024 + size / (4 << 20) + size / (1 << 30);
        let mut requests = 0u64;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            requests += 1;
            if requests > budget {
                tracing::warn!(
                    requests,
                    offset = pos,
                    "block status answers cover too little each; reading the whole export"
                );
                return Ok(None);
            }
            let len = (size - pos).min(1 << 30) as u32;
            let i = self.pick().await?;
            let c = &self.clients[i];
            if c.status_context.is_none() {
                return Ok(None);
            }
            let extents =
                match tokio::time::timeout(self.opts.timeout, c.block_status(pos, len)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        c.kill();
                        // No answer about allocation: read everything instead.
                        tracing::warn!(
                            offset = pos,
                            "block status timed out; reading the whole export"
                        );
                        return Ok(None);
                    }
                };
            let before = pos;
            for (l, flags) in extents {
                let l = (l as u64).min(size - pos);
                if flags & (proto::STATE_HOLE | proto::STATE_ZERO) == 0 && l > 0 {
                    match out.last_mut() {
                        Some((o, ol)) if *o + *ol == pos => *ol += l,
                        _ => out.push((pos, l)),
                    }
                }
                pos += l;
                if pos >= size {
                    break;
                }
            }
            if pos == before {
                // The client refuses empty extents; this is the loop's own guarantee.
                return Err(NbdError::Proto {
                    target: self.target().describe(),
                    source: proto::ProtoError::Malformed("block status reply that covers nothing"),
                });
            }
        }
        Ok(Some(out))
    }

    /// Read `extents` (ascending byte ranges) and give each piece to `sink` in order.
    pub async fn fetch(
        &mut self,
        extents: &[(u64, u64)],
        mut sink: impl FnMut(u64, &[u8]) -> Result<(), String>,
    ) -> Result<(), FetchError> {
        let max = self.opts.max_request as u64;
        let mut pieces = extents.iter().flat_map(|&(o, l)| {
            (0..l.div_ceil(max)).map(move |i| (o + i * max, (l - i * max).min(max) as u32))
        });
        // (offset, length, attempt, connection id, answer)
        type Slot = (
            u64,
            u32,
            u32,
            u64,
            oneshot::Receiver<Result<Reply, NbdError>>,
        );
        let mut q: VecDeque<Slot> = VecDeque::new();
        loop {
            // The pool may shrink as it goes: the window follows it.
            while q.len() < self.clients.len().max(1) * self.opts.depth {
                let Some((off, len)) = pieces.next() else {
                    break;
                };
                let i = self.pick().await?;
                let rx = self.clients[i].read(off, len).await;
                q.push_back((off, len, 1, self.clients[i].id(), rx));
            }
            let Some((off, len, attempt, id, rx)) = q.pop_front() else {
                return Ok(());
            };
            let result = match tokio::time::timeout(self.opts.timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(NbdError::Closed {
                    target: self.target().describe(),
                }),
                Err(_) => {
                    // Whatever holds it is stuck: that connection is never used again (every
                    // request on it fails now and is retried on a fresh one).
                    self.kill(id);
                    if attempt >= self.opts.attempts {
                        return Err(FetchError::Timeout {
                            target: self.target().describe(),
                            offset: off,
                            len,
                            secs: self.opts.timeout.as_secs(),
                        });
                    }
                    Err(NbdError::Closed {
                        target: self.target().describe(),
                    })
                }
            };
            match result {
                Ok(Reply::Data(d)) if d.len() == len as usize => {
                    let r = sink(off, &d).map_err(FetchError::Sink);
                    super::buffers::give(d);
                    r?;
                }
                Ok(_) => {
                    return Err(FetchError::Nbd(NbdError::Proto {
                        target: self.target().describe(),
                        source: proto::ProtoError::Malformed("read reply of the wrong size"),
                    }));
                }
                Err(e) if e.is_transient() && attempt < self.opts.attempts => {
                    let wait = Duration::from_millis(100 << attempt.min(6));
                    tracing::warn!(offset = off, len, attempt, error = %e, "read failed; retrying");
                    tokio::time::sleep(wait).await;
                    // Everything queued on a dead connection fails too and is retried in turn.
                    // Each on the connection it failed on, opened afresh: there it is the first
                    // request. Another live connection may be one the host is about to drop
                    // with what is queued on it (a host that drops every connection after 8
                    // requests: a piece sent round the pool met 4 such in a row and failed
                    // 38 of 40 disks).
                    if let Some(k) = self.clients.iter().position(|c| c.id() == id) {
                        self.next = k;
                    }
                    let mut tries = attempt;
                    let i = loop {
                        match self.pick().await {
                            Ok(i) => break i,
                            Err(ce) if tries + 1 < self.opts.attempts => {
                                tries += 1;
                                tracing::warn!(error = %ce, "reconnect failed; retrying");
                                tokio::time::sleep(wait).await;
                            }
                            Err(ce) => {
                                return Err(FetchError::GaveUp {
                                    target: self.target().describe(),
                                    offset: off,
                                    len,
                                    attempts: tries + 1,
                                    last: ce,
                                });
                            }
                        }
                    };
                    let rx = self.clients[i].read(off, len).await;
                    q.push_front((off, len, attempt + 1, self.clients[i].id(), rx));
                }
                Err(e) if e.is_transient() => {
                    return Err(FetchError::GaveUp {
                        target: self.target().describe(),
                        offset: off,
                        len,
                        attempts: attempt,
                        last: e,
                    });
                }
                Err(e) => return Err(FetchError::Nbd(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::client::{Address, Negotiated};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A pool of one connection to a server answering every block status request with one
    /// extent of `extent` bytes; returns what `allocated` says and how many requests it made.
    async fn allocated_with(size: u64, extent: u32) -> (Option<Vec<(u64, u64)>>, u64) {
        let (c, mut s) = tokio::io::duplex(1 << 20);
        let n = Negotiated {
            info: ExportInfo {
                size,
                ..ExportInfo::default()
            },
            structured: true,
            status_context: Some(1),
        };
        let server = tokio::spawn(async move {
            let mut served = 0u64;
            let mut r = [0u8; 28];
            while s.read_exact(&mut r).await.is_ok() && r[6..8] == [0, 7] {
                served += 1;
                let mut b = vec![0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5];
                b.extend_from_slice(&r[8..16]);
                b.extend_from_slice(&12u32.to_be_bytes());
                b.extend_from_slice(&1u32.to_be_bytes());
                b.extend_from_slice(&extent.to_be_bytes());
                b.extend_from_slice(&0u32.to_be_bytes());
                if s.write_all(&b).await.is_err() {
                    break;
                }
            }
            served
        });
        let mut pool = Pool {
            targets: vec![Target {
                address: Address::Unix("/nonexistent".into()),
                export: String::new(),
                trust: None,
            }],
            exhausted: vec![false],
            opts: FetchOptions::default(),
            clients: vec![Client::over(c, n, 4, "test".into())],
            home: vec![0],
            info: n.info,
            next: 0,
            notes: Default::default(),
        };
        let r = pool.allocated().await.unwrap();
        pool.close().await;
        (r, server.await.unwrap())
    }

    /// A plain xapi-nbd-like server (the simulator's) serving `data` as export "d", with a
    /// connection limit tests change as they go, and the first connection dropping after
    /// `first_drops_after` requests.
    struct Limited {
        files: std::collections::HashMap<String, std::path::PathBuf>,
        limit: std::sync::atomic::AtomicUsize,
        first_drops_after: Option<u64>,
        /// Every connection drops after this many requests (the first one's own rule first).
        all_drop_after: Option<u64>,
        sessions: std::sync::atomic::AtomicU64,
    }

    impl crate::sim::nbd::Exports for Limited {
        fn open(&self, name: &str) -> Option<Box<dyn crate::sim::nbd::ExportData>> {
            self.files.open(name)
        }
        fn drop_after(&self) -> Option<u64> {
            use std::sync::atomic::Ordering;
            match self.sessions.fetch_add(1, Ordering::SeqCst) {
                0 if self.first_drops_after.is_some() => self.first_drops_after,
                _ => self.all_drop_after,
            }
        }
        fn admission(&self, _local: &str) -> crate::sim::nbd::Admission {
            crate::sim::nbd::Admission {
                limit: self.limit.load(std::sync::atomic::Ordering::SeqCst),
                close: false,
            }
        }
    }

    fn plain(port: u16) -> Target {
        Target {
            address: Address::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            export: "d".into(),
            trust: None,
        }
    }

    /// Serve `data` with `exports`' rules; returns the port.
    async fn serve(
        dir: &std::path::Path,
        data: &[u8],
        limit: usize,
        drops: Option<u64>,
    ) -> (u16, std::sync::Arc<Limited>) {
        serve_dropping(dir, data, limit, drops, None).await
    }

    /// As `serve`, every connection dropping after `all_drop` requests.
    async fn serve_dropping(
        dir: &std::path::Path,
        data: &[u8],
        limit: usize,
        drops: Option<u64>,
        all_drop: Option<u64>,
    ) -> (u16, std::sync::Arc<Limited>) {
        let path = dir.join("disk");
        std::fs::write(&path, data).unwrap();
        let exports = std::sync::Arc::new(Limited {
            files: [("d".to_string(), path)].into_iter().collect(),
            limit: limit.into(),
            first_drops_after: drops,
            all_drop_after: all_drop,
            sessions: 0.into(),
        });
        let (port, _) = crate::sim::nbd::start(crate::sim::nbd::ServerConfig {
            exports: exports.clone(),
            tls: None,
        })
        .await
        .unwrap();
        (port, exports)
    }

    async fn read_all(pool: &mut Pool, size: u64) -> Vec<u8> {
        let mut got = vec![0u8; size as usize];
        pool.fetch(&[(0, size)], |off, d| {
            got[off as usize..off as usize + d.len()].copy_from_slice(d);
            Ok(())
        })
        .await
        .unwrap();
        got
    }

    fn pattern(size: usize) -> Vec<u8> {
        (0..size).map(|i| (i * 7 + i / 65536) as u8).collect()
    }

    #[tokio::test]
    async fn an_address_that_refuses_is_done_without_and_the_note_says_so_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(8 << 20);
        let (port, _) = serve(dir.path(), &data, 16, None).await;
        // A port nobody listens on: connections are refused.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        let opts = FetchOptions {
            connections: 4,
            ..FetchOptions::default()
        };
        let mut pool = Pool::open_many(vec![plain(dead_port), plain(port)], opts)
            .await
            .unwrap();
        assert_eq!(pool.connections(), 2);
        assert_eq!(read_all(&mut pool, data.len() as u64).await, data);
        let notes = pool.notes().lock().unwrap().clone();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("the host accepted 2 of 4 NBD connections; going on with 2"),
            "{notes:?}"
        );
        assert!(
            notes[0].contains(&format!("cannot connect to nbd://127.0.0.1:{dead_port}/d")),
            "{notes:?}"
        );
        pool.close().await;
        // Every address refusing: the error names each.
        let e = Pool::open_many(vec![plain(dead_port), plain(dead_port)], opts)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("no NBD connection could be opened"), "{e}");
        assert_eq!(
            e.matches(&format!("cannot connect to nbd://127.0.0.1:{dead_port}/d"))
                .count(),
            2,
            "{e}"
        );
    }

    #[tokio::test]
    async fn one_connection_and_a_dead_first_address_goes_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(4 << 20);
        let (port, _) = serve(dir.path(), &data, 16, None).await;
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        let opts = FetchOptions {
            connections: 1,
            ..FetchOptions::default()
        };
        let mut pool = Pool::open_many(vec![plain(dead_port), plain(port)], opts)
            .await
            .unwrap();
        assert_eq!(read_all(&mut pool, data.len() as u64).await, data);
        let notes = pool.notes().lock().unwrap().clone();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("going on through the host's other NBD addresses; none opened at"),
            "{notes:?}"
        );
        pool.close().await;
    }

    #[tokio::test]
    async fn a_reconnect_the_host_refuses_shrinks_the_pool_while_others_live() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(16 << 20);
        // The first connection drops after 2 requests; by then the host takes only one.
        let (port, exports) = serve(dir.path(), &data, 2, Some(2)).await;
        let opts = FetchOptions {
            connections: 2,
            depth: 1,
            ..FetchOptions::default()
        };
        let mut pool = Pool::open(plain(port), opts).await.unwrap();
        assert_eq!(pool.connections(), 2);
        assert!(pool.notes().lock().unwrap().is_empty());
        exports.limit.store(1, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(read_all(&mut pool, data.len() as u64).await, data);
        assert_eq!(pool.connections(), 1);
        let notes = pool.notes().lock().unwrap().clone();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with(SHRANK), "{notes:?}");
        assert!(
            notes[0].ends_with("going on with 1 connection"),
            "{notes:?}"
        );
        pool.close().await;
    }

    #[tokio::test]
    async fn a_host_dropping_every_connection_after_a_few_requests_is_read_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(24 << 20);
        // 4 connections, 8 requests in flight on each, and every connection dropped at its
        // 4th request: most pieces are lost with their connection, and a connection that
        // served 3 stays open, idle, until the next request sent to it.
        let (port, _) = serve_dropping(dir.path(), &data, 16, None, Some(3)).await;
        let opts = FetchOptions {
            connections: 4,
            max_request: 256 << 10,
            ..FetchOptions::default()
        };
        let mut pool = Pool::open(plain(port), opts).await.unwrap();
        assert_eq!(read_all(&mut pool, data.len() as u64).await, data);
        pool.close().await;
        // A host that answers nothing before it drops: the attempts run out, and the error
        // says how often the piece failed.
        let dir = tempfile::tempdir().unwrap();
        let (port, _) = serve_dropping(dir.path(), &data, 16, None, Some(0)).await;
        let opts = FetchOptions {
            connections: 2,
            ..FetchOptions::default()
        };
        let mut pool = Pool::open(plain(port), opts).await.unwrap();
        let e = pool
            .fetch(&[(0, data.len() as u64)], |_, _| Ok(()))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("failed 5 times"), "{e}");
        pool.close().await;
    }

    #[tokio::test]
    async fn a_server_that_accepts_but_never_greets_fails_within_the_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s); // never a byte
            }
        });
        let opts = FetchOptions {
            connections: 2,
            timeout: Duration::from_secs(1),
            ..FetchOptions::default()
        };
        let t0 = std::time::Instant::now();
        let e = Pool::open(plain(port), opts)
            .await
            .err()
            .unwrap()
            .to_string();
        // A bound, not a timing claim: the default handshake limit is 30 s.
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        assert!(e.contains("no NBD handshake within 1 s"), "{e}");
    }

    #[tokio::test]
    async fn block_status_follows_the_server_and_meagre_answers_are_cut_off() {
        // 1 MiB extents over 8 MiB: eight requests, all data.
        let (r, served) = allocated_with(8 << 20, 1 << 20).await;
        assert_eq!(r, Some(vec![(0, 8 << 20)]));
        assert_eq!(served, 8);
        // 512-byte answers over 64 MiB would take 131072 requests: the budget (1024 + 16)
        // ends it, and everything is read instead.
        let (r, served) = allocated_with(64 << 20, 512).await;
        assert_eq!(r, None);
        assert_eq!(served, 1024 + 16);
    }
}
