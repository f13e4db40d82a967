//! Object Lock: a repository whose every object is written with a retention date, on a bucket
//! with versioning and Object Lock enabled (`cbtfs init s3://B/P --object-lock DAYS`).
//!
//! # What S3 guarantees, and what cbtfs does with it
//!
//! On such a bucket an object version under retention cannot be deleted or replaced by anyone
//! (COMPLIANCE), or only by someone allowed to bypass governance retention (GOVERNANCE),
//! until its retain-until date. What *can* still be done with the writer's own keys, and so by
//! ransomware on the backup server:
//!
//! * a `DeleteObject` without a version id: it succeeds, but only puts a **delete marker** on
//!   top. The object disappears from plain listings and reads (`NotFound`); its versions stay.
//! * a `PutObject` on an existing key: a new version on top, the locked one below it.
//!
//! Both are undone by removing what lies on top (a delete marker or a version has no lock of
//! its own unless it was given one): `cbtfs repair --undelete`.
//!
//! # Writing
//!
//! Every object cbtfs puts in the repository carries `x-amz-object-lock-mode` and
//! `x-amz-object-lock-retain-until-date` (now + DAYS) on the PUT itself, with `Content-MD5`
//! as S3 requires with them: the object never exists unlocked (PutObjectRetention after the
//! PUT would leave a window, and cost a request per object). The PUT stays create-only
//! (`If-None-Match: *`, and a HEAD first: RGW Pacific ignores If-None-Match on versioned
//! buckets). The writer lock's object (`PREFIX/lock`) is the exception: it is
//! written through `object_store` without retention, so it stays deletable.
//!
//! # Deleting, and telling cbtfs's deletions from anyone else's
//!
//! cbtfs deletes (prune's dropped manifests, gc's garbage) with a plain `DeleteObject`: a
//! delete marker hides the object from cbtfs's own bookkeeping at once (a listing no longer
//! shows it, so it is gone for every reader), while its locked versions stay until their date.
//! Before each such delete it puts a **deletion record**, the empty object
//! `deleted/<key>` (itself under retention). A delete marker on a key without a record was
//! made by someone else: `verify` names it. Records are not authenticated: someone holding the
//! keys who forges one hides a deletion from `verify`, though a referenced object deleted so is
//! still found missing by the ordinary checks.
//!
//! # gc
//!
//! Before deleting anything, gc extends the retention of every object still current (not yet
//! collected: a superset of what is referenced) whose lock ends within half the period
//! ([`ObjectLock::margin`]) to now + DAYS. In COMPLIANCE mode a retention can never be
//! shortened, so the object's write time + DAYS is a lower bound and only objects near it are
//! asked for their retention (one request each); in GOVERNANCE mode (where an administrator may
//! have shortened one) every object is asked. Then gc collects as usual (delete markers and
//! records), never repacks (a repack frees nothing while the old packs are locked), and last
//! reclaims space: the versions below cbtfs's own delete markers whose lock has ended are
//! deleted by version id (a refused one is still locked: left for a later gc), then the
//! markers and records of keys with nothing left. Versions under someone else's delete marker
//! are never reclaimed: they are what `repair --undelete` restores.
//!
//! # Stale multipart uploads
//!
//! Only writers upload, and no writer is live while the exclusive lock is held; so when the
//! exclusive lock is taken, every multipart upload in progress below the prefix belongs to a
//! writer that is gone (killed, or whose lease was broken as stale): all of them are aborted,
//! whatever their age (`Store::remove_temporaries`). A lease object is removed with all its
//! versions (one per heartbeat on a versioned bucket) when released.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use super::S3Store;
use super::sign::{RawRequest, content_md5, parse_xml};
use crate::repo::store::Store as _;
use crate::repo::store::is_lock_key;

/// Where deletion records live.
pub const RECORDS: &str = "deleted/";
/// Longest retention accepted (100 years).
pub const MAX_DAYS: u32 = 36_500;
/// Largest listing page accepted (1,000 entries of a few hundred bytes each).
const LIST_PAGE_MAX: usize = 8 << 20;
/// Most listing pages followed (10 million versions).
const MAX_PAGES: usize = 10_000;
const DAY: i64 = 86_400;

/// S3's two retention modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LockMode {
    /// Nobody can shorten the retention or delete a version before its date: what protects
    /// backups from ransomware holding the writer's own keys.
    Compliance,
    /// Users allowed to bypass governance retention may shorten it or delete: recoverable by
    /// an administrator, and only protective if the writer's keys lack that permission.
    Governance,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Compliance => "COMPLIANCE",
            LockMode::Governance => "GOVERNANCE",
        }
    }
    pub fn parse(s: &str) -> Result<LockMode, String> {
        match s.to_ascii_lowercase().as_str() {
            "compliance" => Ok(LockMode::Compliance),
            "governance" => Ok(LockMode::Governance),
            _ => Err(format!(
                "{s:?} is not an Object Lock mode: use compliance or governance"
            )),
        }
    }
}

/// A repository's Object Lock policy (recorded in its header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectLock {
    pub mode: LockMode,
    /// Every object is retained this many days after it is written (or its lock extended).
    pub days: u32,
}

impl ObjectLock {
    pub fn new(days: u32, mode: LockMode) -> Result<ObjectLock, String> {
        if !(1..=MAX_DAYS).contains(&days) {
            return Err(format!(
                "--object-lock {days}: the retention must be 1 to {MAX_DAYS} days"
            ));
        }
        Ok(ObjectLock { mode, days })
    }
    /// The retention period in seconds.
    pub fn period(&self) -> i64 {
        i64::from(self.days) * DAY
    }
    /// gc extends locks ending within this: half the period, so a gc run at least that often
    /// keeps every referenced object locked.
    pub fn margin(&self) -> i64 {
        self.period() / 2
    }
}

/// What a store shares across its clones for raw requests and the lock policy.
#[derive(Default)]
pub struct Extra {
    pub(super) client: Mutex<Option<(u32, reqwest::Client)>>,
    pub(super) lock: OnceLock<ObjectLock>,
}

/// One version (or delete marker) of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The key below the repository's prefix.
    pub key: String,
    pub version_id: String,
    pub latest: bool,
    pub marker: bool,
    /// Last-modified time, Unix seconds.
    pub modified: i64,
    pub etag: String,
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn iso(unix: i64) -> String {
    crate::timefmt::rfc3339(unix)
}

fn parse_time(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

fn bad_answer(what: &str, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what}: the S3 answer cannot be read ({why})"),
    )
}

impl S3Store {
    /// The repository's Object Lock policy, once known.
    pub fn object_lock(&self) -> Option<ObjectLock> {
        self.extra.lock.get().copied()
    }

    /// Write every object from now on with `lock`'s retention.
    pub fn enable_object_lock(&self, lock: ObjectLock) -> io::Result<()> {
        let set = *self.extra.lock.get_or_init(|| lock);
        if set != lock {
            return Err(io::Error::other(format!(
                "{}: the store was opened with another Object Lock policy",
                self.url
            )));
        }
        Ok(())
    }

    /// Is versioning enabled on the bucket?
    pub fn versioning_enabled(&self) -> io::Result<bool> {
        let r = self.raw_ok(
            &RawRequest::new("GET", None).query("versioning", ""),
            "read the versioning status of",
        )?;
        let t = parse_xml(&String::from_utf8_lossy(&r.body))
            .map_err(|e| bad_answer("GetBucketVersioning", e))?;
        Ok(t.text_of("Status") == Some("Enabled"))
    }

    /// Check that the bucket has versioning and Object Lock enabled, naming it and what to
    /// do if not.
    pub fn check_bucket_lock(&self) -> io::Result<()> {
        let bucket = &self.url.bucket;
        let how = "Object Lock can only be enabled when a bucket is created (on AWS also later, with versioning on): create a new bucket with it, e.g. `aws s3api create-bucket --bucket NAME --object-lock-enabled-for-bucket` (or `s3cmd mb --bucket-object-lock`), and give `cbtfs init` that bucket";
        let r = self.raw(&RawRequest::new("GET", None).query("object-lock", ""))?;
        let enabled = if r.ok() {
            let t = parse_xml(&String::from_utf8_lossy(&r.body))
                .map_err(|e| bad_answer("GetObjectLockConfiguration", e))?;
            t.text_of("ObjectLockEnabled") == Some("Enabled")
        } else if r.status == 404 {
            false
        } else {
            return Err(io::Error::other(format!(
                "cannot read the Object Lock configuration of bucket {bucket:?}: {}",
                r.describe()
            )));
        };
        if !enabled {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bucket {bucket:?} does not have Object Lock enabled; {how}"),
            ));
        }
        if !self.versioning_enabled()? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bucket {bucket:?} does not have versioning enabled (Object Lock needs it): `aws s3api put-bucket-versioning --bucket {bucket} --versioning-configuration Status=Enabled`"
                ),
            ));
        }
        Ok(())
    }

    /// Put a new object create-only with the policy's retention (see the module doc).
    pub(super) fn put_locked(&self, key: &str, bytes: &[u8], lock: ObjectLock) -> io::Result<()> {
        // Create-only is asked with If-None-Match (AWS honours it), but RGW (Pacific) ignores
        // it on a versioned bucket and would put a second version: look first. Only two
        // writers racing for one key could slip between, and the writer lock excludes that.
        let head = self.raw(&RawRequest::new("HEAD", Some(key)))?;
        match head.status {
            200..=299 => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} already exists", self.describe(key)),
                ));
            }
            404 => {}
            _ => {
                return Err(io::Error::other(format!(
                    "look for {} before writing it: HTTP {}",
                    self.describe(key),
                    head.status
                )));
            }
        }
        let until = unix_now().saturating_add(lock.period());
        let mut req = RawRequest::new("PUT", Some(key))
            .header("If-None-Match", "*")
            .header("Content-MD5", &content_md5(bytes))
            .header("x-amz-object-lock-mode", lock.mode.as_str())
            .header("x-amz-object-lock-retain-until-date", &iso(until));
        req.body = bytes::Bytes::copy_from_slice(bytes);
        let r = self.raw(&req)?;
        match r.status {
            200..=299 => Ok(()),
            412 => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", self.describe(key)),
            )),
            403 => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "write {}: {}; give access key {} write rights on bucket {:?} (and s3:PutObjectRetention)",
                    self.describe(key),
                    r.describe(),
                    self.cfg.access_key,
                    self.url.bucket
                ),
            )),
            _ => Err(io::Error::other(format!(
                "write {} with Object Lock retention: {}",
                self.describe(key),
                r.describe()
            ))),
        }
    }

    /// Put the deletion record of `key` (before cbtfs deletes it).
    pub(super) fn record_deletion(&self, key: &str, lock: ObjectLock) -> io::Result<()> {
        if key.starts_with(RECORDS) {
            return Ok(());
        }
        match self.put_locked(&format!("{RECORDS}{key}"), &[], lock) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    }

    /// Every version and delete marker below the repository's prefix whose key starts with
    /// `prefix`, in S3's order (by key, newest first).
    pub fn versions(&self, prefix: &str) -> io::Result<Vec<Version>> {
        let full = self.object_name(prefix);
        let mut out = Vec::new();
        let mut marker: Option<(String, String)> = None;
        for _ in 0..MAX_PAGES {
            let mut req = RawRequest::new("GET", None)
                .query("versions", "")
                .query("prefix", &full);
            if let Some((k, v)) = &marker {
                req = req.query("key-marker", k).query("version-id-marker", v);
            }
            req.max_response = LIST_PAGE_MAX;
            let r = self.raw_ok(&req, "list the object versions of")?;
            let t = parse_xml(&String::from_utf8_lossy(&r.body))
                .map_err(|e| bad_answer("ListObjectVersions", e))?;
            for n in &t.children {
                let is_marker = match n.name.as_str() {
                    "Version" => false,
                    "DeleteMarker" => true,
                    _ => continue,
                };
                let Some(key) = n.text_of("Key").and_then(|k| self.key_of(k)) else {
                    continue;
                };
                out.push(Version {
                    key: key.to_string(),
                    version_id: n.text_of("VersionId").unwrap_or("null").to_string(),
                    latest: n.text_of("IsLatest") == Some("true"),
                    marker: is_marker,
                    modified: n
                        .text_of("LastModified")
                        .and_then(parse_time)
                        .ok_or_else(|| bad_answer("ListObjectVersions", "no LastModified"))?,
                    etag: n
                        .text_of("ETag")
                        .unwrap_or("")
                        .trim_matches('"')
                        .to_string(),
                });
            }
            if t.text_of("IsTruncated") != Some("true") {
                return Ok(out);
            }
            let next = (
                t.text_of("NextKeyMarker").unwrap_or("").to_string(),
                t.text_of("NextVersionIdMarker").unwrap_or("").to_string(),
            );
            if next.0.is_empty() || marker.as_ref() == Some(&next) {
                return Err(bad_answer(
                    "ListObjectVersions",
                    "a truncated page without a new marker",
                ));
            }
            marker = Some(next);
        }
        Err(io::Error::other(format!(
            "{} holds more than {MAX_PAGES} pages of object versions",
            self.url
        )))
    }

    /// Delete one version (or delete marker) for good. `Ok(false)`: refused, it is locked.
    pub fn delete_version(&self, key: &str, version_id: &str) -> io::Result<bool> {
        let r = self.raw(&RawRequest::new("DELETE", Some(key)).query("versionId", version_id))?;
        match r.status {
            200..=299 | 404 => Ok(true),
            403 => Ok(false),
            _ => Err(io::Error::other(format!(
                "delete version {version_id} of {}: {}",
                self.describe(key),
                r.describe()
            ))),
        }
    }

    /// A version's retention: mode and retain-until (None: it has none).
    pub fn retention(&self, key: &str, version_id: &str) -> io::Result<Option<(String, i64)>> {
        let r = self.raw(
            &RawRequest::new("GET", Some(key))
                .query("retention", "")
                .query("versionId", version_id),
        )?;
        if r.status == 404 {
            return Ok(None);
        }
        if !r.ok() {
            return Err(io::Error::other(format!(
                "read the retention of {}: {}",
                self.describe(key),
                r.describe()
            )));
        }
        let t = parse_xml(&String::from_utf8_lossy(&r.body))
            .map_err(|e| bad_answer("GetObjectRetention", e))?;
        let until = t
            .text_of("RetainUntilDate")
            .and_then(parse_time)
            .ok_or_else(|| bad_answer("GetObjectRetention", "no RetainUntilDate"))?;
        Ok(Some((t.text_of("Mode").unwrap_or("").to_string(), until)))
    }

    /// Set a version's retention (S3 refuses to shorten a COMPLIANCE one).
    pub fn set_retention(
        &self,
        key: &str,
        version_id: &str,
        mode: LockMode,
        until: i64,
    ) -> io::Result<()> {
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
            mode.as_str(),
            iso(until)
        )
        .into_bytes();
        let mut req = RawRequest::new("PUT", Some(key))
            .query("retention", "")
            .query("versionId", version_id)
            .header("Content-MD5", &content_md5(&body));
        req.body = body.into();
        self.raw_ok(&req, "set the retention of").map(|_| ())
    }

    /// Abort every multipart upload in progress below the prefix (see the module doc), and
    /// delete the old versions of the lock object. Returns how many uploads were aborted.
    pub(super) fn abort_uploads(&self) -> io::Result<u64> {
        let full = self.object_name("");
        let mut aborted = 0u64;
        let mut marker: Option<(String, String)> = None;
        for _ in 0..MAX_PAGES {
            let mut req = RawRequest::new("GET", None)
                .query("uploads", "")
                .query("prefix", &full);
            if let Some((k, u)) = &marker {
                req = req.query("key-marker", k).query("upload-id-marker", u);
            }
            req.max_response = LIST_PAGE_MAX;
            let r = self.raw_ok(&req, "list the multipart uploads in progress in")?;
            let t = parse_xml(&String::from_utf8_lossy(&r.body))
                .map_err(|e| bad_answer("ListMultipartUploads", e))?;
            for u in t.all("Upload") {
                let (Some(key), Some(id)) = (
                    u.text_of("Key").and_then(|k| self.key_of(k)),
                    u.text_of("UploadId"),
                ) else {
                    continue;
                };
                let r = self.raw(&RawRequest::new("DELETE", Some(key)).query("uploadId", id))?;
                if r.ok() || r.status == 404 {
                    tracing::info!(object = %self.describe(key), started = u.text_of("Initiated").unwrap_or("?"), "aborted a killed writer's multipart upload");
                    aborted += 1;
                } else {
                    tracing::warn!(object = %self.describe(key), error = %r.describe(), "cannot abort a killed writer's multipart upload");
                }
            }
            if t.text_of("IsTruncated") != Some("true") {
                break;
            }
            let next = (
                t.text_of("NextKeyMarker").unwrap_or("").to_string(),
                t.text_of("NextUploadIdMarker").unwrap_or("").to_string(),
            );
            if next.0.is_empty() || marker.as_ref() == Some(&next) {
                break;
            }
            marker = Some(next);
        }
        Ok(aborted)
    }

    /// Delete the lock object for good (its versions, oldest first, the current one last)
    /// rather than put a delete marker on it: on a versioned bucket every heartbeat left a
    /// version. Nobody else can put the lock while it exists (create-only), so the current
    /// version deleted last is the one just checked. Falls back to a plain delete if a version
    /// is refused (a bucket default retention locked it).
    pub(super) fn delete_lock_versions(&self, key: &str) -> io::Result<bool> {
        let mut vs: Vec<Version> = self
            .versions(key)?
            .into_iter()
            .filter(|v| v.key == key)
            .collect();
        vs.sort_by_key(|v| (v.latest, v.modified));
        for v in &vs {
            if !self.delete_version(&v.key, &v.version_id)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The versions of each key, newest first.
fn by_key(versions: Vec<Version>) -> BTreeMap<String, Vec<Version>> {
    let mut m: BTreeMap<String, Vec<Version>> = BTreeMap::new();
    for v in versions {
        m.entry(v.key.clone()).or_default().push(v);
    }
    for vs in m.values_mut() {
        // S3 lists newest first; keep that, with the latest one certainly first.
        vs.sort_by_key(|v| (!v.latest, std::cmp::Reverse(v.modified)));
    }
    m
}

/// Keys whose deletion cbtfs recorded (a current record).
fn recorded(m: &BTreeMap<String, Vec<Version>>) -> BTreeSet<String> {
    m.iter()
        .filter_map(|(k, vs)| {
            let orig = k.strip_prefix(RECORDS)?;
            vs.first().filter(|v| !v.marker)?;
            Some(orig.to_string())
        })
        .collect()
}

/// Keys cbtfs itself rewrites (a journal stage is deleted and put again): an older version
/// there is not an overwrite.
fn rewritten_by_cbtfs(key: &str) -> bool {
    key.starts_with("journal/") || is_lock_key(key)
}

/// What is wrong with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionProblem {
    /// A delete marker nobody recorded hides it; `versions` real versions remain.
    Deleted { marker: String, versions: usize },
    /// Its current version is not the one cbtfs wrote (the oldest).
    Overwritten { current: String, original: String },
}

/// One damaged object.
#[derive(Debug, Clone)]
pub struct VersionDamage {
    pub key: String,
    pub problem: VersionProblem,
}

impl VersionDamage {
    /// The sentence `verify` prints: what happened and how to undo it.
    pub fn describe(&self, store: &S3Store) -> String {
        let full = store.object_name(&self.key);
        let bucket = &store.url.bucket;
        let repo = store.url.to_string();
        match &self.problem {
            VersionProblem::Deleted { marker, versions } => format!(
                "deleted by someone other than cbtfs: a delete marker (version {marker}) hides it, and Object Lock kept its {versions} version{}; undo with `cbtfs repair --undelete {repo}` (or `aws s3api delete-object --bucket {bucket} --key {full} --version-id {marker}`)",
                if *versions == 1 { "" } else { "s" }
            ),
            VersionProblem::Overwritten { current, original } => format!(
                "overwritten: its current version {current} is not the one cbtfs wrote (version {original}, kept by Object Lock); undo with `cbtfs repair --undelete {repo}` (or delete every version above {original}: `aws s3api delete-object --bucket {bucket} --key {full} --version-id {current}`)"
            ),
        }
    }
}

/// Every object of the repository that was deleted (a delete marker cbtfs did not make on
/// top of kept versions) or overwritten (its current version is not its oldest, the one
/// cbtfs wrote create-only).
pub fn find_damage(store: &S3Store) -> io::Result<Vec<VersionDamage>> {
    Ok(damage_of(store.versions("")?))
}

/// [`find_damage`] over a listing.
fn damage_of(versions: Vec<Version>) -> Vec<VersionDamage> {
    let m = by_key(versions);
    let records = recorded(&m);
    let mut out = Vec::new();
    for (key, vs) in &m {
        if is_lock_key(key) {
            continue;
        }
        let Some(top) = vs.first() else { continue };
        let real: Vec<&Version> = vs.iter().filter(|v| !v.marker).collect();
        let Some(oldest) = real.last() else { continue };
        if top.marker {
            if !records.contains(key) {
                out.push(VersionDamage {
                    key: key.clone(),
                    problem: VersionProblem::Deleted {
                        marker: top.version_id.clone(),
                        versions: real.len(),
                    },
                });
            }
        } else if real.len() > 1 && !rewritten_by_cbtfs(key) && top.etag != oldest.etag {
            out.push(VersionDamage {
                key: key.clone(),
                problem: VersionProblem::Overwritten {
                    current: top.version_id.clone(),
                    original: oldest.version_id.clone(),
                },
            });
        }
    }
    out
}

/// What `repair --undelete` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairReport {
    /// Objects whose delete markers were removed.
    pub undeleted: Vec<String>,
    /// Objects whose original version is current again.
    pub restored: Vec<String>,
    /// Objects that could not be repaired, and why.
    pub failed: Vec<(String, String)>,
}

/// Undo what [`find_damage`] finds: for each deleted or overwritten object, remove what lies
/// above the version cbtfs wrote (delete markers, foreign versions), or, when one of those is
/// locked, copy that version back on top. Deletion records are restored first (someone may
/// have deleted them too), so cbtfs's own deletions are left alone.
pub fn undelete(store: &S3Store) -> io::Result<RepairReport> {
    let mut report = RepairReport::default();
    for pass in 0..2 {
        let m = by_key(store.versions("")?);
        let records = recorded(&m);
        for (key, vs) in &m {
            let record = key.starts_with(RECORDS);
            if is_lock_key(key) || (pass == 0) != record {
                continue;
            }
            let Some(top) = vs.first() else { continue };
            let real: Vec<&Version> = vs.iter().filter(|v| !v.marker).collect();
            // The version cbtfs wrote: the oldest (create-only), or the newest where cbtfs
            // itself rewrites the key.
            let target = if rewritten_by_cbtfs(key) {
                real.first()
            } else {
                real.last()
            };
            let Some(target) = target else { continue };
            let deleted = top.marker && (record || !records.contains(key));
            let overwritten = !top.marker && top.etag != target.etag;
            if !deleted && !overwritten {
                continue;
            }
            let above: Vec<&Version> = vs
                .iter()
                .take_while(|v| v.version_id != target.version_id)
                .collect();
            let mut refused = false;
            for v in &above {
                if !store.delete_version(key, &v.version_id)? {
                    refused = true;
                    break;
                }
            }
            if refused {
                match copy_back(store, key, &target.version_id) {
                    Ok(()) => report.restored.push(store.describe(key)),
                    Err(e) => report.failed.push((store.describe(key), e.to_string())),
                }
            } else if deleted {
                report.undeleted.push(store.describe(key));
            } else {
                report.restored.push(store.describe(key));
            }
        }
    }
    Ok(report)
}

/// Copy version `version_id` of `key` on top of it (with the policy's retention).
fn copy_back(store: &S3Store, key: &str, version_id: &str) -> io::Result<()> {
    let source = format!(
        "/{}/{}?versionId={version_id}",
        store.url.bucket,
        super::sign::uri_encode(&store.object_name(key), true)
    );
    let mut req = RawRequest::new("PUT", Some(key)).header("x-amz-copy-source", &source);
    if let Some(lock) = store.object_lock() {
        req = req
            .header("x-amz-object-lock-mode", lock.mode.as_str())
            .header(
                "x-amz-object-lock-retain-until-date",
                &iso(unix_now().saturating_add(lock.period())),
            );
    }
    store
        .raw_ok(&req, "copy the original version back onto")
        .map(|_| ())
}

/// What gc did about locks.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LockMaintenance {
    /// Current objects whose retention was read.
    pub retention_checked: u64,
    /// Current objects whose retention was extended to now + the period.
    pub extended: u64,
    /// Versions and delete markers deleted for good (their lock had ended).
    pub versions_reclaimed: u64,
    /// Versions of deleted objects still locked (left for a later gc).
    pub versions_still_locked: u64,
}

/// Extend the retention of every current object whose lock ends within the margin (see the
/// module doc).
pub fn extend_locks(
    store: &S3Store,
    lock: ObjectLock,
    out: &mut LockMaintenance,
) -> io::Result<()> {
    let now = unix_now();
    let horizon = now.saturating_add(lock.margin());
    let m = by_key(store.versions("")?);
    for (key, vs) in &m {
        let Some(top) = vs.first() else { continue };
        if is_lock_key(key) || top.marker {
            continue;
        }
        if lock.mode == LockMode::Compliance && top.modified.saturating_add(lock.period()) > horizon
        {
            continue;
        }
        out.retention_checked += 1;
        let until = store.retention(key, &top.version_id)?;
        if until.is_some_and(|(_, u)| u > horizon) {
            continue;
        }
        store.set_retention(
            key,
            &top.version_id,
            lock.mode,
            now.saturating_add(lock.period()),
        )?;
        out.extended += 1;
    }
    Ok(())
}

/// Delete for good the versions of objects cbtfs deleted whose lock has ended, then their
/// delete markers and records once nothing is left under them.
pub fn reclaim(store: &S3Store, lock: ObjectLock, out: &mut LockMaintenance) -> io::Result<()> {
    let now = unix_now();
    let m = by_key(store.versions("")?);
    let records = recorded(&m);
    for key in &records {
        let Some(vs) = m.get(key) else { continue };
        let mut left = 0usize;
        for v in vs.iter().filter(|v| !v.marker && !v.latest) {
            if v.modified.saturating_add(lock.period()) > now {
                out.versions_still_locked += 1;
                left += 1;
            } else if store.delete_version(key, &v.version_id)? {
                out.versions_reclaimed += 1;
            } else {
                out.versions_still_locked += 1;
                left += 1;
            }
        }
        let current_real = vs.first().is_some_and(|v| !v.marker);
        if left > 0 || current_real {
            continue;
        }
        for v in vs.iter().filter(|v| v.marker) {
            if store.delete_version(key, &v.version_id)? {
                out.versions_reclaimed += 1;
            }
        }
        // The record itself, once its own lock has ended.
        let rkey = format!("{RECORDS}{key}");
        for v in m.get(&rkey).into_iter().flatten() {
            if v.modified.saturating_add(lock.period()) <= now
                && store.delete_version(&rkey, &v.version_id)?
            {
                out.versions_reclaimed += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(key: &str, id: &str, latest: bool, marker: bool, t: i64, etag: &str) -> Version {
        Version {
            key: key.into(),
            version_id: id.into(),
            latest,
            marker,
            modified: t,
            etag: etag.into(),
        }
    }

    #[test]
    fn policies_are_checked_and_recorded_by_name() {
        assert!(ObjectLock::new(0, LockMode::Compliance).is_err());
        assert!(ObjectLock::new(MAX_DAYS + 1, LockMode::Compliance).is_err());
        let l = ObjectLock::new(30, LockMode::Governance).unwrap();
        assert_eq!(l.margin(), 15 * DAY);
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"{"mode":"GOVERNANCE","days":30}"#
        );
        assert_eq!(LockMode::parse("Compliance"), Ok(LockMode::Compliance));
        assert!(LockMode::parse("strict").is_err());
    }

    #[test]
    fn records_and_version_order() {
        let m = by_key(vec![
            v("deleted/packs/a", "r1", true, false, 5, "x"),
            v("deleted/packs/b", "m", true, true, 6, ""),
            v("deleted/packs/b", "r2", false, false, 5, "x"),
            v("packs/a", "2", false, false, 3, "e"),
            v("packs/a", "3", true, true, 4, ""),
        ]);
        assert_eq!(
            recorded(&m).into_iter().collect::<Vec<_>>(),
            vec!["packs/a".to_string()]
        );
        let a = &m["packs/a"];
        assert!(a[0].marker && a[0].latest);
    }

    #[test]
    fn foreign_delete_markers_and_overwrites_are_damage_and_cbtfs_own_are_not() {
        let found = damage_of(vec![
            // Deleted by cbtfs (recorded): not damage.
            v("deleted/packs/a", "r", true, false, 5, "x"),
            v("packs/a", "m", true, true, 6, ""),
            v("packs/a", "1", false, false, 3, "e"),
            // Deleted by someone else, over an overwrite.
            v("packs/b", "m2", true, true, 9, ""),
            v("packs/b", "evil", false, false, 8, "bad"),
            v("packs/b", "1", false, false, 3, "e"),
            // Overwritten.
            v("pindex/c", "evil", true, false, 8, "bad"),
            v("pindex/c", "1", false, false, 3, "e"),
            // Overwritten with the same bytes (a copy back): not damage.
            v("pindex/d", "copy", true, false, 8, "e"),
            v("pindex/d", "1", false, false, 3, "e"),
            // cbtfs rewrites journal stages and the lock.
            v("journal/j.1", "2", true, false, 8, "f"),
            v("journal/j.1", "1", false, false, 3, "e"),
            v("lock", "m", true, true, 8, ""),
            v("lock", "1", false, false, 3, "e"),
            // Only a marker left (versions reclaimed): nothing to restore.
            v("packs/e", "m", true, true, 8, ""),
        ]);
        let got: Vec<(String, VersionProblem)> =
            found.into_iter().map(|d| (d.key, d.problem)).collect();
        assert_eq!(
            got,
            vec![
                (
                    "packs/b".to_string(),
                    VersionProblem::Deleted {
                        marker: "m2".into(),
                        versions: 2
                    }
                ),
                (
                    "pindex/c".to_string(),
                    VersionProblem::Overwritten {
                        current: "evil".into(),
                        original: "1".into()
                    }
                ),
            ]
        );
    }
}
