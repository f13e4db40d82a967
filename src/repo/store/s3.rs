//! `S3Store`: a repository in an S3 bucket (`s3://BUCKET/PREFIX`), through the `object_store`
//! crate (SigV4, pagination), with retries of our own ([`retry`]).
//!
//! # Mapping of the `Store` contract
//!
//! * `put` is one `PutObject` with `If-None-Match: *`: atomic (S3 never shows part of an
//!   object) and create-only (a second put of the key is refused with 412, reported as
//!   `AlreadyExists`). One request per object, packs (~32 MiB) included: multipart uploads
//!   cannot be create-only, and a single PUT of 32 MiB is far below S3's 5 GiB limit. So
//!   there are no temporary objects: `remove_temporaries` has nothing to do.
//! * `get`/`get_range` are `GetObject` (with `Range`); `list` is `ListObjectsV2` of the key's
//!   directory part, paginated, filtered to the prefix and sorted; `delete` is `DeleteObject`
//!   (durable once answered).
//! * Keys are the local store's (`check_key`), below `PREFIX/`.
//! * Every request is retried with jittered back-off and bounded in time ([`retry`]); a
//!   create-only PUT whose answer was lost and whose retry finds the object (412) reads it
//!   back: the same bytes are success, others `AlreadyExists`. Errors name the object, the
//!   attempts and the last failure.
//! * A writer keeps [`PARALLEL_PUTS`] pack uploads in flight (`Store::parallel_puts`): one
//!   PUT's latency would otherwise bound a backup. `put_owned` hands the pack's buffer to the
//!   client without a copy and gets it back for the next pack.
//! * Multipart is not used for packs. Measured against the test radosgw on loopback
//!   (`put_throughput` in tests/suite/s3/faults.rs, 2 shared cores, 32 MiB objects, warm): one
//!   PUT 152 MiB/s, multipart 4 × 8 MiB parts at once 110 MiB/s (two more requests and the
//!   server's assembly), 1/2/3/4 single PUTs in flight 160/172/185/185 MiB/s. Parallel
//!   single PUTs give what multipart would (several streams) while staying create-only.
//! * With Object Lock (`cbtfs init --object-lock`), puts carry a retention date and deletes
//!   leave a deletion record; raw SigV4 requests (`sign`) do what `object_store` cannot
//!   (`lock`).
//!
//! # Locks: leases
//!
//! S3 has no locks. Each lock is a lease object, put create-only, holding JSON: who
//! (`holder`, host, pid), since when, a random token, and when it was last refreshed. While
//! the guard lives, a thread refreshes it every [`HEARTBEAT`] (reading it first: if the token
//! is no longer ours the lease was broken and it is left alone, with an error logged).
//! Dropping the guard deletes it if it is still ours. The objects (`Store` module doc):
//!
//! * `PREFIX/lock`: the exclusive (maintenance) lease;
//! * `PREFIX/locks/writers/ID`: one lease per holder of the shared lock, which is also its
//!   writer record (a killed writer's lease goes stale, or names a process of this host that is
//!   gone: the writer is dead);
//! * `PREFIX/locks/disks/NAME`: one lease per disk.
//!
//! A one-holder lease (`lock`, a disk's) found held may be broken (deleted, then taken
//! create-only) when it is stale: not refreshed for [`STALE_AFTER`] by both the holder's clock
//! (the `refreshed` field) and the server's (the object's last-modified time), or held by a
//! process of this host that no longer exists. Otherwise `take_lock` waits (2 s for
//! [`Store::lock`]), then fails naming the holder. Two processes breaking the same stale lease at
//! the same instant could both believe they hold it (S3 of this generation has no conditional
//! delete); the heartbeat's token check makes the loser notice within one heartbeat and log it.
//!
//! Shared against exclusive, without a lock of S3's: a writer puts its lease, then reads
//! `lock`; absent, it goes on; stale, it breaks it and reads again; live, it deletes its lease,
//! waits and tries again. The exclusive taker puts `lock`, then lists the writers' leases; none
//! live, it goes on; otherwise it deletes `lock`, waits and tries again. S3 is strongly
//! consistent (read-after-write, list-after-write), so both cannot go on: each looks after
//! its own put, and whichever looked second sees the other's lease. Stale writer leases do not
//! hold the exclusive lock back: they are dead writers' records, removed by the collector
//! (`Repository::collect_dead_writers`).

//! # Runtime
//!
//! The trait is synchronous and called from plain threads. The store keeps one tokio runtime
//! (2 worker threads driving the I/O) and blocks on it; a call made from inside another tokio
//! runtime (the NBD import runs the writer inside one) is run on a scoped helper thread
//! instead, so it can never panic with "cannot block inside a runtime". The runtime and
//! client are rebuilt in a forked child (the mount's daemon): the parent's threads do not
//! exist there.
//!
//! # Configuration
//!
//! [`S3Config::from_env`]: endpoint from `--s3-endpoint`, `CBTFS_S3_ENDPOINT` or
//! `AWS_ENDPOINT_URL` (AWS itself when none); region from `AWS_REGION` or
//! `AWS_DEFAULT_REGION` (default `us-east-1`, what RGW expects); credentials from
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), else the profile
//! `AWS_PROFILE` (default `default`) of `AWS_SHARED_CREDENTIALS_FILE` or
//! `~/.aws/credentials` — never argv, and never instance metadata (no request ever goes to an
//! address nobody configured). A custom endpoint is addressed path-style
//! (`ENDPOINT/BUCKET/KEY`) unless virtual-hosted is asked for. `http://` endpoints are allowed
//! (a loopback test cluster) with a warning: requests travel in clear, though every object
//! cbtfs stores is already encrypted and authenticated.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientOptions, GetOptions, ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload,
    RetryConfig, WriteMultipart,
};
use serde::{Deserialize, Serialize};

use super::{
    DISKS_DIR, LOCK_FILE, LockError, LockGuard, LockKind, ObjectInfo, Store, WRITERS_DIR,
    WriterRecord, check_key, check_lock_name, check_prefix, is_lock_key,
};

pub mod retry;
use retry::{Failure, GaveUp, within};
pub mod lock;
pub mod sign;
pub mod tls;

/// How often a held lock is refreshed.
pub const HEARTBEAT: Duration = Duration::from_secs(20);
/// A lock not refreshed for this long is stale and may be broken (six missed heartbeats:
/// a slow network does not lose a live writer its lock).
pub const STALE_AFTER: Duration = Duration::from_secs(120);
/// How often a lock that is held is looked at again while waiting.
const LOCK_POLL: Duration = Duration::from_millis(200);
/// The most attempts one `lock` makes (polls within the wait, plus immediate retries).
const MAX_LOCK_TRIES: u32 = 64;
/// The most of a lock object read back (anyone with the keys may have put anything there).
const LOCK_MAX: usize = 4096;
/// Objects larger than this would be uploaded in parts; kept above every object cbtfs writes
/// (see the module doc: a multipart upload cannot be create-only). The seam for a later
/// multipart writer.
pub const MULTIPART_ABOVE: usize = 4 << 30;
/// Puts a writer keeps in flight (`Store::parallel_puts`): a PUT's latency, not the link,
/// bounds one stream of packs. Each holds a pack buffer (≤ ~37 MiB), so a backup holds at
/// most `PARALLEL_PUTS + 1` of them: ~150 MiB at 3.
pub const PARALLEL_PUTS: usize = 3;

/// `s3://BUCKET/PREFIX`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty (the bucket's top).
    pub prefix: String,
}

/// Is `path` (a REPO argument) an S3 URL rather than a directory?
pub fn is_s3_url(path: &Path) -> bool {
    path.to_str().is_some_and(|s| s.starts_with("s3://"))
}

impl S3Url {
    /// Parse `s3://BUCKET[/PREFIX]`. The bucket follows S3's naming rules (3–63 of `a-z0-9.-`);
    /// the prefix's names follow the store's key rules.
    pub fn parse(s: &str) -> io::Result<S3Url> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| bad(format!("{s:?} is not an s3://BUCKET/PREFIX URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_end_matches('/');
        let ok_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
            && !bucket.starts_with(['.', '-'])
            && !bucket.ends_with(['.', '-']);
        if !ok_bucket {
            return Err(bad(format!(
                "{s:?}: {bucket:?} is not a valid bucket name (3 to 63 lowercase letters, digits, '.' and '-')"
            )));
        }
        if !prefix.is_empty() {
            check_key(prefix).map_err(|_| {
                bad(format!(
                    "{s:?}: the prefix {prefix:?} must be '/'-separated names, none empty or starting with '.'"
                ))
            })?;
        }
        Ok(S3Url {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// What the command line adds to the environment (set once by the CLI before any store is
/// opened; see [`set_cli_options`]).
#[derive(Debug, Clone, Default)]
pub struct S3CliOptions {
    pub endpoint: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub virtual_hosted: bool,
}

static CLI_OPTIONS: std::sync::OnceLock<S3CliOptions> = std::sync::OnceLock::new();

/// Record the command line's S3 options (the first call wins).
pub fn set_cli_options(o: S3CliOptions) {
    let _ = CLI_OPTIONS.set(o);
}

/// Everything needed to reach a bucket. `Debug` never shows the secret key.
#[derive(Clone)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: String,
    secret_key: String,
    session_token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub virtual_hosted: bool,
    /// Lock lease timing (tests shorten them).
    pub heartbeat: Duration,
    pub stale_after: Duration,
    /// How requests are retried and timed out (`retry`'s module doc).
    pub retry: retry::Policy,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("ca_cert", &self.ca_cert)
            .field("virtual_hosted", &self.virtual_hosted)
            .finish_non_exhaustive()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl S3Config {
    /// From the command line's options and the environment (see the module doc).
    pub fn from_env() -> io::Result<S3Config> {
        let cli = CLI_OPTIONS.get().cloned().unwrap_or_default();
        let endpoint = cli
            .endpoint
            .or_else(|| env("CBTFS_S3_ENDPOINT"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .map(|e| e.trim().trim_end_matches('/').to_string());
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        let (access_key, secret_key, session_token) = credentials()?;
        Ok(S3Config {
            endpoint,
            region,
            access_key,
            secret_key,
            session_token,
            ca_cert: cli.ca_cert,
            virtual_hosted: cli.virtual_hosted,
            heartbeat: HEARTBEAT,
            stale_after: STALE_AFTER,
            retry: retry::Policy::from_env()?,
        })
    }

    /// Explicit settings (tests, callers with their own configuration).
    pub fn new(
        endpoint: Option<String>,
        region: &str,
        access_key: &str,
        secret_key: &str,
    ) -> S3Config {
        S3Config {
            endpoint,
            region: region.into(),
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            session_token: None,
            ca_cert: None,
            virtual_hosted: false,
            heartbeat: HEARTBEAT,
            stale_after: STALE_AFTER,
            retry: retry::Policy::default(),
        }
    }
}

/// The credentials: environment first, then the shared credentials file.
fn credentials() -> io::Result<(String, String, Option<String>)> {
    let token = env("AWS_SESSION_TOKEN");
    match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        (Some(a), Some(s)) => return Ok((a, s, token)),
        (Some(_), None) => {
            return Err(no_credentials(
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not",
            ));
        }
        (None, Some(_)) => {
            return Err(no_credentials(
                "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not",
            ));
        }
        (None, None) => {}
    }
    let file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".aws/credentials")));
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let Some(file) = file else {
        return Err(no_credentials(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set and there is no HOME",
        ));
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(no_credentials(&format!(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set and {} does not exist",
                file.display()
            )));
        }
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot read S3 credentials from {}: {e}", file.display()),
            ));
        }
    };
    let found = parse_credentials(&text, &profile);
    match found {
        (Some(a), Some(s), t) => Ok((a, s, t.or(token))),
        _ => Err(no_credentials(&format!(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set and profile [{profile}] of {} has no aws_access_key_id and aws_secret_access_key",
            file.display()
        ))),
    }
}

fn no_credentials(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "no S3 credentials: {why}; set both in the environment, or in ~/.aws/credentials (profile AWS_PROFILE, default \"default\"; another file with AWS_SHARED_CREDENTIALS_FILE)"
        ),
    )
}

/// `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token` of `[profile]` in an
/// AWS credentials file (INI).
pub fn parse_credentials(
    text: &str,
    profile: &str,
) -> (Option<String>, Option<String>, Option<String>) {
    let (mut a, mut s, mut t) = (None, None, None);
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            inside = name == profile || name.strip_prefix("profile ") == Some(profile);
            continue;
        }
        if !inside {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = Some(v.trim().to_string()).filter(|v| !v.is_empty());
            match k.trim() {
                "aws_access_key_id" => a = v,
                "aws_secret_access_key" => s = v,
                "aws_session_token" => t = v,
                _ => {}
            }
        }
    }
    (a, s, t)
}

/// A runtime and client, made in (and only used by) one process.
struct Conn {
    pid: u32,
    rt: Option<tokio::runtime::Runtime>,
    s3: Option<AmazonS3>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.pid == std::process::id() {
            // Never blocks: safe even when dropped inside another runtime.
            if let Some(rt) = self.rt.take() {
                rt.shutdown_background();
            }
        } else {
            // A forked child: the runtime's threads are the parent's. Leave it all untouched.
            std::mem::forget(self.rt.take());
            std::mem::forget(self.s3.take());
        }
    }
}

/// A repository in a bucket (cheap to clone: clones share the connection).
#[derive(Clone)]
pub struct S3Store {
    url: S3Url,
    cfg: Arc<S3Config>,
    conn: Arc<Mutex<Option<Arc<Conn>>>>,
    /// Raw requests' client and the Object Lock policy (`lock`).
    extra: Arc<lock::Extra>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("url", &self.url.to_string())
            .field("config", &self.cfg)
            .finish()
    }
}

impl S3Store {
    /// A store for `url` (nothing is sent yet; see [`S3Store::check`]).
    pub fn new(url: S3Url, cfg: S3Config) -> io::Result<S3Store> {
        if let Some(e) = &cfg.endpoint {
            static WARNED: std::sync::Once = std::sync::Once::new();
            if e.starts_with("http://") {
                WARNED.call_once(|| tracing::warn!(endpoint = %e, "S3 endpoint over plain http: requests are not protected in transit (objects are encrypted by cbtfs all the same)"));
            } else if !e.starts_with("https://") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "S3 endpoint {e:?} must start with https:// (or http:// for a test endpoint)"
                    ),
                ));
            }
        }
        if let Some(ca) = &cfg.ca_cert {
            // Read now for a clear error before any request.
            read_ca(ca)?;
        }
        let store = S3Store {
            url,
            cfg: Arc::new(cfg),
            conn: Arc::default(),
            extra: Arc::default(),
        };
        store.conn()?;
        Ok(store)
    }

    /// Open `s3://…` with the configuration of the environment and command line, and check
    /// that the bucket is there and answers (one request).
    pub fn open_url(url: &str) -> io::Result<S3Store> {
        let store = S3Store::new(S3Url::parse(url)?, S3Config::from_env()?)?;
        store.check()?;
        Ok(store)
    }

    pub fn url(&self) -> &S3Url {
        &self.url
    }

    /// Check that the bucket exists and the credentials are accepted (a one-level listing of
    /// the prefix).
    pub fn check(&self) -> io::Result<()> {
        let c = self.conn()?;
        let (rt, s3) = parts(&c)?;
        let prefix = self.dir_path("")?;
        let idle = self.cfg.retry.timeout;
        block(
            rt,
            retry::run(&self.cfg.retry, &self.describe(""), |_| {
                within(idle, s3.list_with_delimiter(prefix.as_ref()))
            }),
        )
        .map(|_| ())
        .map_err(|g| self.gave_up("reach", "", g))
    }

    /// An exhausted or final failure as an `io::Error` naming the object, the attempts made
    /// and the last failure.
    fn gave_up(&self, op: &str, key: &str, g: GaveUp) -> io::Error {
        let what = self.describe(key);
        let base = match g.last {
            Failure::Store(e) => self.error(op, key, e),
            Failure::Io(e) => e,
            f @ (Failure::TimedOut(_) | Failure::Short { .. }) => {
                let kind = match f {
                    Failure::TimedOut(_) => io::ErrorKind::TimedOut,
                    _ => io::ErrorKind::UnexpectedEof,
                };
                io::Error::new(
                    kind,
                    format!(
                        "{op} {what}: {f}; check the S3 endpoint {} and the network (CBTFS_S3_TIMEOUT sets the timeout, now {} s)",
                        self.cfg.endpoint.as_deref().unwrap_or("AWS S3"),
                        self.cfg.retry.timeout.as_secs()
                    ),
                )
            }
        };
        if g.attempts <= 1 {
            return base;
        }
        io::Error::new(
            base.kind(),
            format!(
                "{base} (gave up after {} attempts in {:.1} s; CBTFS_S3_ATTEMPTS sets how many)",
                g.attempts,
                g.elapsed.as_secs_f64()
            ),
        )
    }

    /// Read an object (or `range` of it) whole, each wait for the answer or the next piece
    /// of its body bounded by the idle timeout; a body shorter than announced is a failure.
    async fn fetch(
        &self,
        s3: &AmazonS3,
        path: &ObjPath,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<(bytes::BytesMut, ObjectMeta), Failure> {
        let idle = self.cfg.retry.timeout;
        let opts = GetOptions {
            range: range.map(Into::into),
            ..GetOptions::default()
        };
        let r = within(idle, s3.get_opts(path, opts)).await?;
        let want = r.range.end.saturating_sub(r.range.start);
        let meta = r.meta.clone();
        let mut stream = r.into_stream();
        // The announced length is the server's word: reserve at most a pack's worth ahead.
        let mut buf = bytes::BytesMut::with_capacity(
            usize::try_from(want).unwrap_or(usize::MAX).min(64 << 20),
        );
        while let Some(piece) =
            within(idle, async { Ok::<_, Failure>(stream.next().await) }).await?
        {
            buf.extend_from_slice(&piece?);
            if buf.len() as u64 > want {
                return Err(Failure::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} answered more than the {want} bytes it announced",
                        self.cfg.endpoint.as_deref().unwrap_or("AWS S3")
                    ),
                )));
            }
        }
        if (buf.len() as u64) < want {
            return Err(Failure::Short {
                got: buf.len() as u64,
                want,
            });
        }
        Ok((buf, meta))
    }

    /// Put `data` at `path` (the object `key`, or the lock), retried. A create-only put whose
    /// retry finds the object there (412) succeeded if an earlier attempt may have reached
    /// the server and the object holds exactly `data` (its answer was lost); otherwise it is
    /// `AlreadyExists`. Reading back costs a GET of the object, only on that path.
    fn put_retried(
        &self,
        op: &str,
        key: &str,
        path: &ObjPath,
        data: bytes::Bytes,
        mode: PutMode,
    ) -> io::Result<()> {
        let c = self.conn()?;
        let (rt, s3) = parts(&c)?;
        let limit = self.cfg.retry.put_timeout(data.len());
        let create = matches!(mode, PutMode::Create);
        let what = self.describe(key);
        block(
            rt,
            retry::run(&self.cfg.retry, &what, |n| {
                let payload = PutPayload::from(data.clone());
                let opts = PutOptions {
                    mode: mode.clone(),
                    ..PutOptions::default()
                };
                let data = &data;
                let what = &what;
                async move {
                    match within(limit, s3.put_opts(path, payload, opts)).await {
                        Ok(_) => Ok(()),
                        Err(Failure::Store(e @ object_store::Error::AlreadyExists { .. }))
                            if create && n > 1 =>
                        {
                            // An earlier attempt may have stored it, its answer lost.
                            match self.fetch(s3, path, None).await {
                                Ok((stored, _)) if stored[..] == data[..] => {
                                    tracing::info!(object = %what, "a retried put found its own object: an earlier attempt stored it and its answer was lost");
                                    Ok(())
                                }
                                Ok(_) => Err(Failure::Store(e)),
                                Err(f) => Err(Failure::Io(io::Error::other(
                                    format!(
                                        "{what} exists after a retried put, and reading it back to see whether it is ours failed: {f}"
                                    ),
                                ))),
                            }
                        }
                        Err(f) => Err(f),
                    }
                }
            }),
        )
        .map_err(|g| self.gave_up(op, key, g))
    }

    /// The runtime and client of this process (rebuilt after a fork).
    fn conn(&self) -> io::Result<Arc<Conn>> {
        let pid = std::process::id();
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = g.as_ref()
            && c.pid == pid
        {
            return Ok(c.clone());
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cbtfs-s3")
            .enable_all()
            .build()
            .map_err(|e| io::Error::other(format!("cannot start the S3 client's runtime: {e}")))?;
        let s3 = self.build_client()?;
        let c = Arc::new(Conn {
            pid,
            rt: Some(rt),
            s3: Some(s3),
        });
        *g = Some(c.clone());
        Ok(c)
    }

    fn build_client(&self) -> io::Result<AmazonS3> {
        let cfg = &self.cfg;
        // Timeouts and retries are ours (`retry`): per attempt, idle-based for reads, scaled
        // by size for PUTs; the client's own whole-request timeout would cut a slow pack.
        let mut opts = ClientOptions::new()
            .with_timeout_disabled()
            .with_connect_timeout(cfg.retry.timeout.min(Duration::from_secs(10)));
        let allow_http = cfg
            .endpoint
            .as_ref()
            .is_some_and(|e| e.starts_with("http://"));
        opts = opts.with_allow_http(allow_http);
        let retry = RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&self.url.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key)
            .with_secret_access_key(&cfg.secret_key)
            .with_client_options(opts)
            .with_retry(retry)
            .with_virtual_hosted_style_request(cfg.virtual_hosted)
            // No SHA-256 of every body for the signature (`UNSIGNED-PAYLOAD`, what AWS's own
            // SDKs send over https): it was a quarter of a backup's CPU samples into RGW
            // (perf, 512 MiB of packs), on the cores the backup shares with the host's NBD
            // server. Every object cbtfs stores is sealed (AEAD) and authenticated when read,
            // and TLS protects the body in transit.
            .with_unsigned_payload(true)
            // The CA roots are read once per process (`tls`), not once per client.
            .with_http_connector(tls::Connector {
                trust: tls::Trust::of(cfg.endpoint.as_deref(), cfg.ca_cert.as_deref()),
                connect_timeout: cfg.retry.timeout.min(Duration::from_secs(10)),
                allow_http,
            });
        if let Some(t) = &cfg.session_token {
            b = b.with_token(t);
        }
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        b.build().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot set up the S3 client for {}: {e}", self.url),
            )
        })
    }

    /// The object path of `key`.
    fn path(&self, key: &str) -> io::Result<ObjPath> {
        let full = if self.url.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.url.prefix)
        };
        ObjPath::parse(&full).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("object key {key:?}: {e} (a bug in cbtfs: please report it)"),
            )
        })
    }

    /// The path of directory `dir` ("" for the prefix itself; None for the bucket's top).
    fn dir_path(&self, dir: &str) -> io::Result<Option<ObjPath>> {
        match (self.url.prefix.is_empty(), dir.is_empty()) {
            (true, true) => Ok(None),
            (false, true) => {
                Ok(Some(ObjPath::parse(&self.url.prefix).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
                })?))
            }
            _ => self.path(dir).map(Some),
        }
    }

    /// The key of an object path below the prefix.
    fn key_of<'a>(&self, p: &'a str) -> Option<&'a str> {
        if self.url.prefix.is_empty() {
            Some(p)
        } else {
            p.strip_prefix(self.url.prefix.as_str())?.strip_prefix('/')
        }
    }

    /// An `object_store` error as an `io::Error` whose kind the repository understands and
    /// whose text names the object and what to do. Secrets never appear: the errors carry
    /// URLs and the server's answer only.
    fn error(&self, op: &str, key: &str, e: object_store::Error) -> io::Error {
        let what = self.describe(key);
        let text = e.to_string();
        let has = |s: &str| text.contains(s);
        let bucket = &self.url.bucket;
        let endpoint = self.cfg.endpoint.as_deref().unwrap_or("AWS S3");
        let (kind, hint) = if has("NoSuchBucket") {
            (
                io::ErrorKind::NotFound,
                format!(
                    "bucket {bucket:?} does not exist at {endpoint}: create it first (or check the URL and --s3-endpoint)"
                ),
            )
        } else if has("InvalidAccessKeyId") {
            (
                io::ErrorKind::PermissionDenied,
                format!(
                    "{endpoint} does not know the access key {}: check AWS_ACCESS_KEY_ID (or the credentials file)",
                    self.cfg.access_key
                ),
            )
        } else if has("SignatureDoesNotMatch") {
            (
                io::ErrorKind::PermissionDenied,
                format!(
                    "{endpoint} refused the request's signature: the secret key of access key {} is wrong (AWS_SECRET_ACCESS_KEY or the credentials file), or the region {:?} is not the bucket's (AWS_REGION)",
                    self.cfg.access_key, self.cfg.region
                ),
            )
        } else if has("AccessDenied") || matches!(e, object_store::Error::PermissionDenied { .. }) {
            (
                io::ErrorKind::PermissionDenied,
                format!(
                    "access denied: give access key {} read, write, list and delete rights on bucket {bucket:?}",
                    self.cfg.access_key
                ),
            )
        } else {
            match &e {
                object_store::Error::NotFound { .. } => {
                    return io::Error::new(io::ErrorKind::NotFound, format!("{what} not found"));
                }
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. } => {
                    return io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{what} already exists"),
                    );
                }
                object_store::Error::Unauthenticated { .. } => (
                    io::ErrorKind::PermissionDenied,
                    "the credentials were refused: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".to_string(),
                ),
                _ if has("error sending request")
                    || has("onnection refused")
                    || has("dns error")
                    || has("timed out") =>
                {
                    (
                        io::ErrorKind::ConnectionRefused,
                        format!(
                            "cannot reach the S3 endpoint {endpoint}: check --s3-endpoint / CBTFS_S3_ENDPOINT and the network"
                        ),
                    )
                }
                _ => (io::ErrorKind::Other, String::new()),
            }
        };
        let hint = if hint.is_empty() {
            String::new()
        } else {
            format!("; {hint}")
        };
        io::Error::new(kind, format!("{op} {what}: {text}{hint}"))
    }

    /// `Store::put` of bytes the store may keep (no copy).
    fn put_bytes(&self, key: &str, data: bytes::Bytes) -> io::Result<()> {
        let key = check_key(key)?;
        if let Some(l) = self.object_lock() {
            return self.put_locked(key, &data, l);
        }
        let path = self.path(key)?;
        if data.len() > MULTIPART_ABOVE {
            // Not create-only, and not retried by us: only reached by objects larger than
            // cbtfs writes.
            let c = self.conn()?;
            let (rt, s3) = parts(&c)?;
            let payload = PutPayload::from(data);
            return block(rt, async {
                let up = s3.put_multipart(&path).await?;
                let mut w = WriteMultipart::new(up);
                for part in payload.iter() {
                    w.write(part);
                }
                w.finish().await
            })
            .map(|_| ())
            .map_err(|e| self.error("write", key, e));
        }
        self.put_retried("write", key, &path, data, PutMode::Create)
    }

    /// The path of lock object `key` (`lock`, `locks/…`): not an object key (`check_key`
    /// refuses those).
    fn lock_path(&self, key: &str) -> io::Result<ObjPath> {
        let full = if self.url.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.url.prefix)
        };
        ObjPath::parse(&full)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    /// Lock object `key`'s record and its last-modified time (unix seconds), if it exists.
    fn read_lock(&self, key: &str) -> io::Result<Option<(Lease, i64)>> {
        let c = self.conn()?;
        let (rt, s3) = parts(&c)?;
        let path = self.lock_path(key)?;
        let got = block(
            rt,
            retry::run(&self.cfg.retry, &self.describe(key), |_| {
                self.fetch(s3, &path, None)
            }),
        );
        match got {
            Ok((bytes, meta)) => {
                let modified = meta.last_modified.timestamp();
                let raw = bytes.get(..LOCK_MAX).unwrap_or(&bytes).to_vec();
                let lease = serde_json::from_slice::<Lease>(&raw).unwrap_or_else(|_| Lease {
                    holder: format!(
                        "an unreadable lock record ({:?})",
                        String::from_utf8_lossy(raw.get(..200).unwrap_or(&raw))
                    ),
                    ..Lease::default()
                });
                Ok(Some((lease, modified)))
            }
            Err(GaveUp {
                last: Failure::Store(object_store::Error::NotFound { .. }),
                ..
            }) => Ok(None),
            Err(g) => Err(self.gave_up("read the lock", key, g)),
        }
    }

    fn put_lock(&self, key: &str, lease: &Lease, mode: PutMode) -> io::Result<()> {
        let path = self.lock_path(key)?;
        let body = serde_json::to_vec(lease).map_err(io::Error::other)?;
        self.put_retried("write the lock", key, &path, body.into(), mode)
    }

    fn delete_lock(&self, key: &str) -> io::Result<()> {
        if self.object_lock().is_some() && self.delete_lock_versions(key)? {
            return Ok(());
        }
        let path = self.lock_path(key)?;
        self.delete_path("delete the lock", key, &path)
    }

    /// Is a lease found held stale (not refreshed in time, or its process gone from this
    /// host)? The reason, if so.
    fn stale(&self, held: &Lease, modified: i64) -> Option<String> {
        let now = unix_now();
        let stale_after = i64::try_from(self.cfg.stale_after.as_secs()).unwrap_or(i64::MAX);
        let age = now.saturating_sub(held.refreshed.max(modified));
        let dead_here =
            held.host == hostname() && held.pid != std::process::id() && !pid_alive(held.pid);
        if dead_here {
            Some("its process no longer exists".to_string())
        } else if age > stale_after {
            Some(format!("not refreshed for {age} s"))
        } else {
            None
        }
    }

    /// A new lease record for this process.
    fn new_lease(holder: &str, token: &str) -> Lease {
        let now = unix_now();
        Lease {
            holder: holder.to_string(),
            host: hostname(),
            pid: std::process::id(),
            since: crate::timefmt::rfc3339(now),
            refreshed: now,
            token: token.to_string(),
        }
    }

    /// Start refreshing lease `key` (just put): the guard that holds it.
    fn hold(&self, key: &str, lease: Lease) -> Result<Box<dyn LockGuard>, LockError> {
        let (tx, rx) = mpsc::channel();
        let store = self.clone();
        let every = self.cfg.heartbeat;
        let token = lease.token.clone();
        let k = key.to_string();
        let thread = std::thread::Builder::new()
            .name("cbtfs-s3-lock".into())
            .spawn(move || heartbeat(store, k, lease, every, rx))?;
        Ok(Box::new(S3Lock {
            stop: Some(tx),
            thread: Some(thread),
            store: self.clone(),
            key: key.to_string(),
            token,
        }))
    }

    /// Take the one-holder lease `key` (`lock`, `locks/disks/NAME`): put it create-only; if
    /// held, break it when stale, else wait until `deadline` and fail naming the holder.
    fn lease_exclusive(
        &self,
        key: &str,
        holder: &str,
        deadline: Instant,
    ) -> Result<Box<dyn LockGuard>, LockError> {
        let token = random_token()?;
        // Bounds the retries without a wait (released meanwhile, broken as stale) should
        // other processes keep taking and dropping the lock.
        let mut tries = 0u32;
        loop {
            tries += 1;
            if tries > MAX_LOCK_TRIES {
                return Err(LockError::Io(io::Error::other(format!(
                    "the lock {} keeps changing hands; try again",
                    self.describe(key)
                ))));
            }
            let lease = Self::new_lease(holder, &token);
            match self.put_lock(key, &lease, PutMode::Create) {
                Ok(()) => return self.hold(key, lease),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(LockError::Io(e)),
            }
            let Some((held, modified)) = self.read_lock(key)? else {
                continue; // released meanwhile: try again at once
            };
            if let Some(why) = self.stale(&held, modified) {
                tracing::warn!(lock = %self.describe(key), holder = %held.describe(), %why, "breaking a stale lock");
                self.delete_lock(key)?;
                continue;
            }
            if Instant::now() >= deadline {
                return Err(LockError::Held(format!(
                    "{}; the lock {} is broken automatically once not refreshed for {} s",
                    held.describe(),
                    self.describe(key),
                    self.cfg.stale_after.as_secs()
                )));
            }
            std::thread::sleep(LOCK_POLL);
        }
    }

    /// The writers' shared lock: put this writer's lease `locks/writers/ID`, then look at the
    /// exclusive lease: absent, go on; stale, break it and look again; live, withdraw the
    /// lease, wait and try again (until `deadline`). The exclusive side does the mirror image
    /// (its lease first, then the writers'), so the two can never both go on.
    fn lease_shared(
        &self,
        holder: &str,
        deadline: Instant,
    ) -> Result<Box<dyn LockGuard>, LockError> {
        let token = random_token()?;
        let key = format!("{WRITERS_DIR}/{token}");
        let mut tries = 0u32;
        let mut lease = Self::new_lease(holder, &token);
        self.put_lock(&key, &lease, PutMode::Create)?;
        loop {
            tries += 1;
            let found = self.read_lock(LOCK_FILE);
            let held = match found {
                Ok(None) => return self.hold(&key, lease),
                Ok(Some((held, modified))) => match self.stale(&held, modified) {
                    Some(why) if tries <= MAX_LOCK_TRIES => {
                        tracing::warn!(lock = %self.describe(LOCK_FILE), holder = %held.describe(), %why, "breaking a stale lock");
                        if let Err(e) = self.delete_lock(LOCK_FILE) {
                            let _ = self.delete_lock(&key);
                            return Err(LockError::Io(e));
                        }
                        continue;
                    }
                    _ => held,
                },
                Err(e) => {
                    let _ = self.delete_lock(&key);
                    return Err(LockError::Io(e));
                }
            };
            // Withdraw while the exclusive holder works.
            self.delete_lock(&key)?;
            if Instant::now() >= deadline || tries > MAX_LOCK_TRIES {
                return Err(LockError::Held(format!(
                    "{}; the lock {} is broken automatically once not refreshed for {} s",
                    held.describe(),
                    self.describe(LOCK_FILE),
                    self.cfg.stale_after.as_secs()
                )));
            }
            std::thread::sleep(LOCK_POLL);
            lease = Self::new_lease(holder, &token);
            self.put_lock(&key, &lease, PutMode::Create)?;
        }
    }

    /// Every object below the prefix whose key starts with `prefix`, lock objects included.
    fn list_all(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        let dir = check_prefix(prefix)?;
        let listed = self.dir_path(dir)?;
        let c = self.conn()?;
        let (rt, s3) = parts(&c)?;
        let idle = self.cfg.retry.timeout;
        // A listing that fails part way is listed again from its start.
        let metas = block(
            rt,
            retry::run(&self.cfg.retry, &self.describe(prefix), |_| {
                let listed = listed.clone();
                async move {
                    let mut out = Vec::new();
                    let mut stream = s3.list(listed.as_ref());
                    while let Some(m) =
                        within(idle, async { Ok::<_, Failure>(stream.next().await) }).await?
                    {
                        out.push(m?);
                    }
                    Ok::<_, Failure>(out)
                }
            }),
        )
        .map_err(|g| self.gave_up("list", prefix, g))?;
        let mut found: Vec<ObjectInfo> = metas
            .into_iter()
            .filter_map(|m| {
                let key = self.key_of(m.location.as_ref())?;
                key.starts_with(prefix).then(|| ObjectInfo {
                    key: key.to_string(),
                    len: m.size,
                })
            })
            .collect();
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// Delete `path` (the object `key`, or the lock), retried; absent is fine.
    fn delete_path(&self, op: &str, key: &str, path: &ObjPath) -> io::Result<()> {
        let c = self.conn()?;
        let (rt, s3) = parts(&c)?;
        let idle = self.cfg.retry.timeout;
        match block(
            rt,
            retry::run(&self.cfg.retry, &self.describe(key), |_| {
                within(idle, s3.delete(path))
            }),
        ) {
            Ok(())
            | Err(GaveUp {
                last: Failure::Store(object_store::Error::NotFound { .. }),
                ..
            }) => Ok(()),
            Err(g) => Err(self.gave_up(op, key, g)),
        }
    }
}

fn read_ca(path: &Path) -> io::Result<Vec<object_store::Certificate>> {
    let pem = std::fs::read(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read the CA certificate {}: {e}", path.display()),
        )
    })?;
    let certs = object_store::Certificate::from_pem_bundle(&pem).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds no usable PEM certificate ({e}); give --s3-ca-cert (the mount option s3_ca_cert=) a PEM file of the CA that signed the endpoint's certificate",
                path.display()
            ),
        )
    })?;
    if certs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds no PEM certificate; give --s3-ca-cert (the mount option s3_ca_cert=) a PEM file of the CA that signed the endpoint's certificate",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// The runtime and client of a live connection.
fn parts(c: &Conn) -> io::Result<(&tokio::runtime::Runtime, &AmazonS3)> {
    match (c.rt.as_ref(), c.s3.as_ref()) {
        (Some(rt), Some(s3)) => Ok((rt, s3)),
        _ => Err(io::Error::other("the S3 client is shut down")),
    }
}

/// Run `fut` to completion on the store's runtime, from any thread: inside another tokio
/// runtime it runs on a scoped helper thread (blocking a runtime thread in `block_on` would
/// panic).
fn block<F>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| match s.spawn(|| rt.block_on(fut)).join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        })
    } else {
        rt.block_on(fut)
    }
}

/// The lock object's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Lease {
    holder: String,
    host: String,
    pid: u32,
    since: String,
    /// Unix seconds of the last refresh, by the holder's clock.
    refreshed: i64,
    token: String,
}

impl Lease {
    fn describe(&self) -> String {
        format!(
            "pid {} on {} ({}) since {}, last refreshed {}",
            self.pid,
            if self.host.is_empty() {
                "an unknown host"
            } else {
                &self.host
            },
            self.holder,
            self.since,
            crate::timefmt::rfc3339(self.refreshed)
        )
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(buf.get(..end).unwrap_or(&[])).into_owned()
}

/// Does process `pid` exist on this host?
fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    if unsafe { libc::kill(p, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn random_token() -> io::Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A held lease: refreshed by a thread until dropped, then deleted if still ours.
struct S3Lock {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    store: S3Store,
    key: String,
    token: String,
}

impl LockGuard for S3Lock {}

impl Drop for S3Lock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self.store.read_lock(&self.key) {
            Ok(Some((lease, _))) if lease.token == self.token => {
                if let Err(e) = self.store.delete_lock(&self.key) {
                    tracing::warn!(lock = %self.store.describe(&self.key), error = %e, "cannot release an S3 lock; it goes stale by itself");
                }
            }
            Ok(_) => {
                tracing::error!(lock = %self.store.describe(&self.key), "the lock was taken over by another process while held")
            }
            Err(e) => {
                tracing::warn!(lock = %self.store.describe(&self.key), error = %e, "cannot release an S3 lock; it goes stale by itself")
            }
        }
    }
}

fn heartbeat(
    store: S3Store,
    key: String,
    mut lease: Lease,
    every: Duration,
    stop: mpsc::Receiver<()>,
) {
    loop {
        match stop.recv_timeout(every) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        match store.read_lock(&key) {
            Ok(Some((now, _))) if now.token == lease.token => {}
            Ok(other) => {
                tracing::error!(
                    lock = %store.describe(&key),
                    now = %other.map(|(l, _)| l.describe()).unwrap_or_else(|| "nobody".into()),
                    "the lock was broken by another process while held (it was not refreshed in time); stop this writer and check the repository with `cbtfs verify`"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh an S3 lock; trying again");
                continue;
            }
        }
        lease.refreshed = unix_now();
        if let Err(e) = store.put_lock(&key, &lease, PutMode::Overwrite) {
            tracing::warn!(error = %e, "cannot refresh an S3 lock; trying again");
        }
    }
}

impl Store for S3Store {
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        self.put_bytes(key, bytes::Bytes::copy_from_slice(bytes))
    }

    fn put_owned(&self, key: &str, bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        let data = bytes::Bytes::from(bytes);
        self.put_bytes(key, data.clone())?;
        // Every clone the requests held is gone once the put has returned: the buffer comes
        // back for the next pack (or a new one is made, should the client still hold it).
        Ok(data.try_into_mut().map(Vec::from).unwrap_or_default())
    }

    fn parallel_puts(&self) -> usize {
        PARALLEL_PUTS
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        let key = check_key(key)?;
        let path = self.path(key)?;
        let c = self.conn()?;
        let (rt, s3) = parts(&c)?;
        block(
            rt,
            retry::run(&self.cfg.retry, &self.describe(key), |_| {
                self.fetch(s3, &path, None)
            }),
        )
        .map(|(b, _)| Vec::from(b))
        .map_err(|g| self.gave_up("read", key, g))
    }

    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let key = check_key(key)?;
        let path = self.path(key)?;
        let c = self.conn()?;
        let (rt, s3) = parts(&c)?;
        let eof = |len: u64| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} holds {len} bytes, fewer than the {} asked for at offset {offset}",
                    self.describe(key),
                    buf.len()
                ),
            )
        };
        let end = offset.checked_add(buf.len() as u64);
        let idle = self.cfg.retry.timeout;
        let head = || {
            block(
                rt,
                retry::run(&self.cfg.retry, &self.describe(key), |_| {
                    within(idle, s3.head(&path))
                }),
            )
            .map(|m| m.size)
            .map_err(|g| self.gave_up("read", key, g))
        };
        let Some(end) = end.filter(|_| !buf.is_empty()) else {
            // Nothing to read, or past any length: only the object's length matters.
            let len = head()?;
            return match end {
                Some(e) if e <= len => Ok(()),
                _ => Err(eof(len)),
            };
        };
        let got = block(
            rt,
            retry::run(&self.cfg.retry, &self.describe(key), |_| {
                self.fetch(s3, &path, Some(offset..end))
            }),
        );
        match got {
            Ok((bytes, _)) if bytes.len() == buf.len() => {
                buf.copy_from_slice(&bytes);
                Ok(())
            }
            Ok(_) => Err(eof(head()?)),
            Err(
                g @ GaveUp {
                    last: Failure::Store(object_store::Error::NotFound { .. }),
                    ..
                },
            ) => Err(self.gave_up("read", key, g)),
            Err(g) => {
                // A range past the end is refused (416) or cut short: say so plainly.
                match head() {
                    Ok(len) if end > len => Err(eof(len)),
                    _ => Err(self.gave_up("read", key, g)),
                }
            }
        }
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        let mut found = self.list_all(prefix)?;
        found.retain(|o| !is_lock_key(&o.key));
        Ok(found)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let key = check_key(key)?;
        if let Some(l) = self.object_lock() {
            // Tells this delete marker from anyone else's (`lock` module doc).
            self.record_deletion(key, l)?;
        }
        let path = self.path(key)?;
        self.delete_path("delete", key, &path)
    }

    fn s3(&self) -> Option<&S3Store> {
        Some(self)
    }

    fn remove_temporaries(&self) -> io::Result<u64> {
        // Multipart uploads of killed writers (`lock` module doc).
        self.abort_uploads()
    }

    fn describe(&self, key: &str) -> String {
        match (self.url.prefix.is_empty(), key.is_empty()) {
            (_, true) => self.url.to_string(),
            (true, false) => format!("s3://{}/{key}", self.url.bucket),
            (false, false) => format!("{}/{key}", self.url),
        }
    }

    fn take_lock(
        &self,
        kind: LockKind<'_>,
        holder: &str,
        wait: Duration,
    ) -> Result<Box<dyn LockGuard>, LockError> {
        let deadline = Instant::now() + wait;
        match kind {
            LockKind::Shared => self.lease_shared(holder, deadline),
            LockKind::Disk(name) => {
                let key = format!("{DISKS_DIR}/{}", check_lock_name(name)?);
                self.lease_exclusive(&key, holder, deadline)
            }
            LockKind::Exclusive => {
                let mut tries = 0u32;
                loop {
                    tries += 1;
                    let guard = self.lease_exclusive(LOCK_FILE, holder, deadline)?;
                    let live: Vec<String> = self
                        .writer_records()?
                        .into_iter()
                        .filter(|r| r.live)
                        .map(|r| r.holder)
                        .collect();
                    if live.is_empty() {
                        return Ok(guard);
                    }
                    // Withdraw: the writers go on, and a new one waits for nothing.
                    drop(guard);
                    if Instant::now() >= deadline || tries > MAX_LOCK_TRIES {
                        return Err(LockError::Held(super::running_writers(&live)));
                    }
                    std::thread::sleep(LOCK_POLL);
                }
            }
        }
    }

    fn writer_records(&self) -> io::Result<Vec<WriterRecord>> {
        let mut out = Vec::new();
        for o in self.list_all(&format!("{WRITERS_DIR}/"))? {
            let Some(id) = o.key.strip_prefix(&format!("{WRITERS_DIR}/")) else {
                continue;
            };
            if check_lock_name(id).is_err() {
                continue;
            }
            let Some((lease, modified)) = self.read_lock(&o.key)? else {
                continue; // ended meanwhile
            };
            out.push(WriterRecord {
                id: id.to_string(),
                live: self.stale(&lease, modified).is_none(),
                holder: lease.describe(),
            });
        }
        Ok(out)
    }

    fn remove_writer_record(&self, id: &str) -> io::Result<()> {
        self.delete_lock(&format!("{WRITERS_DIR}/{}", check_lock_name(id)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_named() {
        let u = S3Url::parse("s3://my-bucket/backups/site1/").unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.prefix, "backups/site1");
        assert_eq!(u.to_string(), "s3://my-bucket/backups/site1");
        let top = S3Url::parse("s3://b.example").unwrap();
        assert_eq!(
            (top.bucket.as_str(), top.prefix.as_str()),
            ("b.example", "")
        );
        assert_eq!(top.to_string(), "s3://b.example");
        for bad in [
            "s3://",
            "s3://ab",
            "s3://UPPER/x",
            "s3://-b/x",
            "s3://bucket/a//b",
            "s3://bucket/.hidden",
            "http://bucket/x",
        ] {
            let e = S3Url::parse(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
        assert!(is_s3_url(Path::new("s3://b/p")));
        assert!(!is_s3_url(Path::new("/backup/s3:")));
    }

    #[test]
    fn credentials_files_are_read_by_profile() {
        let text = "\
# comment
[default]
aws_access_key_id = AKDEFAULT
aws_secret_access_key = secretdefault

[profile other]
aws_access_key_id=AKOTHER
aws_secret_access_key=secretother
aws_session_token = tok
[empty]
aws_access_key_id =
";
        assert_eq!(
            parse_credentials(text, "default"),
            (Some("AKDEFAULT".into()), Some("secretdefault".into()), None)
        );
        assert_eq!(
            parse_credentials(text, "other"),
            (
                Some("AKOTHER".into()),
                Some("secretother".into()),
                Some("tok".into())
            )
        );
        assert_eq!(parse_credentials(text, "empty"), (None, None, None));
        assert_eq!(parse_credentials(text, "absent"), (None, None, None));
    }

    #[test]
    fn the_config_never_shows_its_secret() {
        let c = S3Config::new(None, "us-east-1", "AKID", "VERYSECRET");
        let shown = format!("{c:?}");
        assert!(shown.contains("AKID"), "{shown}");
        assert!(!shown.contains("VERYSECRET"), "{shown}");
    }

    #[test]
    fn a_call_from_inside_a_runtime_does_not_panic() {
        let mut cfg = S3Config::new(
            Some("http://127.0.0.1:9".into()),
            "us-east-1",
            "AKID",
            "SECRET",
        );
        cfg.retry = retry::Policy {
            attempts: 2,
            timeout: Duration::from_secs(2),
            backoff: Duration::from_millis(1),
        };
        let store = S3Store::new(S3Url::parse("s3://bucket/p").unwrap(), cfg).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Port 9 (discard) is closed on loopback: the request fails, but cleanly.
        let e = rt.block_on(async { store.get("cbtfs.repo") }).unwrap_err();
        assert!(e.to_string().contains("s3://bucket/p/cbtfs.repo"), "{e}");
        // A refused connection is worth another attempt; the error says how many were made.
        assert!(e.to_string().contains("gave up after 2 attempts"), "{e}");
        assert!(!e.to_string().contains("SECRET"), "{e}");
        // And the store may be dropped there too.
        rt.block_on(async move { drop(store) });
    }
}
