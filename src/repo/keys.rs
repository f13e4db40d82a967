//! Key slots: the master key wrapped under a password (Argon2id) or a key file.
//!
//! ```text
//! REPO/keys/<slot-id>     one checksummed JSON record per slot (`manifest::encode`)
//! ```
//!
//! A slot holds: its id (16 hex), kind (`password` or `keyfile`), created time, an optional
//! label, KDF parameters and salt, and the 64-byte master key sealed (XChaCha20-Poly1305) under
//! the key-encryption key derived from the secret, with the repository id and slot id as
//! associated data. Opening tries every slot of the matching kind; a wrong secret fails every
//! tag and is reported as a wrong password / key file, never as damage. Removing a slot deletes
//! its record: that secret can no longer open the repository (the master key is unchanged;
//! a holder of an old copy of the slot file could still unwrap it — said in `key remove`'s help).
//!
//! A key file is a small private text file made by `cbtfs init --key-file F` / `key add
//! --new-key-file F`: a first line `cbtfs-keyfile 1` and the base64 of 32 random bytes.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::crypto::{self, Keys};
use super::error::{RepoError, Result};
use super::manifest;
use super::store::Store;

pub const KEYS_PREFIX: &str = "keys/";
pub const KEY_FORMAT: &str = "cbtfs-key";
pub const KEY_VERSION: u64 = 1;

/// First line of a key file.
const KEY_FILE_MAGIC: &str = "cbtfs-keyfile 1";
/// A key file is two short lines; anything much larger is not one (and is not read whole).
const KEY_FILE_MAX: u64 = 4096;
/// What a key file looks like, for messages.
const KEY_FILE_SHAPE: &str = "a key file is two lines, `cbtfs-keyfile 1` and the base64 of 32 random bytes, as `cbtfs init --key-file` and `cbtfs key add --new-key-file` write it";
/// BLAKE3 `derive_key` context of the key-encryption key of a key-file slot.
const KEY_FILE_CONTEXT: &str = "cbtfs key file 2026";
/// A slot record is a few hundred bytes; a larger object under `keys/` is not read whole.
const MAX_SLOT_BYTES: u64 = 64 * 1024;
/// Salt length of new slots (Argon2's recommended length).
const SALT_LEN: usize = 16;
/// Salt lengths accepted from a slot (Argon2 needs at least 8 bytes).
const SALT_RANGE: std::ops::RangeInclusive<usize> = 8..=64;
/// Longest label accepted.
const MAX_LABEL: usize = 200;
/// Slot kinds as recorded.
const KIND_PASSWORD: &str = "password";
const KIND_KEYFILE: &str = "keyfile";
/// Wrapped master key: nonce (24) | 64 bytes | tag (16).
const WRAPPED_LEN: usize = 24 + 64 + 16;

/// A secret that opens a repository. Never `Debug`-printed with its contents; wiped when
/// dropped.
#[derive(Clone)]
pub enum Secret {
    Password(String),
    /// The key file's 32 secret bytes (read from `path`, which names it in messages).
    KeyFile {
        path: PathBuf,
        key: [u8; 32],
    },
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Password(_) => write!(f, "Secret::Password(..)"),
            Secret::KeyFile { path, .. } => write!(f, "Secret::KeyFile({})", path.display()),
        }
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        match self {
            Secret::Password(p) => p.zeroize(),
            Secret::KeyFile { key, .. } => key.zeroize(),
        }
    }
}

impl Secret {
    /// Read a key file (refusing one that is not a cbtfs key file, naming it).
    pub fn read_key_file(path: &Path) -> Result<Secret> {
        let shown = path.display().to_string();
        let meta =
            std::fs::metadata(path).map_err(|e| RepoError::io("reading key file", &shown, e))?;
        if !meta.is_file() {
            return Err(not_a_key_file(path, "it is not a regular file"));
        }
        if meta.len() > KEY_FILE_MAX {
            return Err(not_a_key_file(
                path,
                &format!("it is {} bytes, far larger than a key file", meta.len()),
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %shown,
                "key file {shown} has mode {mode:03o}: other users may read it; `chmod 600 {shown}`"
            );
        }
        let mut bytes =
            std::fs::read(path).map_err(|e| RepoError::io("reading key file", &shown, e))?;
        let parsed = parse_key_file(&bytes);
        bytes.zeroize();
        match parsed {
            Ok(key) => Ok(Secret::KeyFile {
                path: path.to_path_buf(),
                key,
            }),
            Err(why) => Err(not_a_key_file(path, why)),
        }
    }
    /// Make a new key file at `path` (create-only, mode 0600) and return it as a secret.
    pub fn create_key_file(path: &Path) -> Result<Secret> {
        let shown = path.display().to_string();
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| {
            RepoError::io("making a key for key file", &shown, crypto::random_error(e))
        })?;
        let mut text = format!("{KEY_FILE_MAGIC}\n{}\n", B64.encode(key));
        let mut file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                text.zeroize();
                key.zeroize();
                return Err(RepoError::Invalid(format!(
                    "{shown} exists; give a new path, or use it with --key-file to open"
                )));
            }
            Err(e) => {
                text.zeroize();
                key.zeroize();
                return Err(RepoError::io("creating key file", &shown, e));
            }
        };
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .and_then(|()| super::store::sync_parent(path));
        text.zeroize();
        if let Err(e) = written {
            drop(file);
            // Do not leave a half-written key file that looks like a key file.
            let _ = std::fs::remove_file(path);
            key.zeroize();
            return Err(RepoError::io("writing key file", &shown, e));
        }
        let secret = Secret::KeyFile {
            path: path.to_path_buf(),
            key,
        };
        key.zeroize();
        Ok(secret)
    }

    fn kind(&self) -> &'static str {
        match self {
            Secret::Password(_) => KIND_PASSWORD,
            Secret::KeyFile { .. } => KIND_KEYFILE,
        }
    }
}

fn not_a_key_file(path: &Path, why: &str) -> RepoError {
    RepoError::Invalid(format!(
        "{} is not a cbtfs key file ({why}); {KEY_FILE_SHAPE}",
        path.display()
    ))
}

/// Parse a key file's bytes. The error says what is wrong without quoting the content.
pub fn parse_key_file(bytes: &[u8]) -> std::result::Result<[u8; 32], &'static str> {
    let text = std::str::from_utf8(bytes).map_err(|_| "it is not text")?;
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or("");
    if first.strip_suffix('\r').unwrap_or(first) != KEY_FILE_MAGIC {
        return Err("its first line is not `cbtfs-keyfile 1`");
    }
    let second = lines.next().ok_or("it has no second line")?;
    let second = second.strip_suffix('\r').unwrap_or(second);
    // Nothing may follow but the final newline.
    match (lines.next(), lines.next()) {
        (None, _) | (Some(""), None) => {}
        _ => return Err("it has more than two lines"),
    }
    let mut decoded = B64
        .decode(second)
        .map_err(|_| "its second line is not base64")?;
    if decoded.len() != 32 {
        decoded.zeroize();
        return Err("its second line does not hold 32 bytes");
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&decoded);
    decoded.zeroize();
    Ok(key)
}

/// Argon2id cost: memory in KiB, passes, lanes. `DEFAULT` for real use (~0.5 s here);
/// tests may use `FAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KdfCost {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

impl KdfCost {
    pub const DEFAULT: KdfCost = KdfCost {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };
    /// Taken when the environment variable `CBTFS_KDF_FAST=1` is set (tests only; documented).
    pub const FAST: KdfCost = KdfCost {
        m_kib: 1024,
        t: 1,
        p: 1,
    };
    /// The most a slot may ask for: 1 GiB of memory, 64 passes, 16 lanes. A damaged or hostile
    /// slot asking for more is refused as damaged before anything is allocated.
    pub const MAX: KdfCost = KdfCost {
        m_kib: 1 << 20,
        t: 64,
        p: 16,
    };
    /// DEFAULT, or FAST when `CBTFS_KDF_FAST=1`.
    pub fn from_env() -> KdfCost {
        KdfCost::from_var(std::env::var("CBTFS_KDF_FAST").ok().as_deref())
    }

    /// `from_env` given the variable's value.
    fn from_var(fast: Option<&str>) -> KdfCost {
        match fast {
            Some("1") => KdfCost::FAST,
            _ => KdfCost::DEFAULT,
        }
    }

    /// Why this cost is not acceptable under `max` (Argon2's own minimums included), if it
    /// is not.
    fn check(&self, max: &KdfCost) -> std::result::Result<(), String> {
        let min_m = self.p.saturating_mul(8).max(8);
        if self.t == 0 || self.p == 0 || self.m_kib < min_m {
            return Err(format!(
                "its Argon2 cost (m_kib={}, t={}, p={}) is below Argon2's minimum (t ≥ 1, p ≥ 1, m_kib ≥ 8·p)",
                self.m_kib, self.t, self.p
            ));
        }
        if self.m_kib > max.m_kib || self.t > max.t || self.p > max.p {
            return Err(format!(
                "its Argon2 cost (m_kib={}, t={}, p={}) is beyond what cbtfs accepts (m_kib ≤ {}, t ≤ {}, p ≤ {})",
                self.m_kib, self.t, self.p, max.m_kib, max.t, max.p
            ));
        }
        Ok(())
    }
}

/// What `cbtfs key list` shows of a slot (no secret material).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotInfo {
    pub id: String,
    pub kind: String,
    pub created: String,
    pub label: Option<String>,
    /// The slot the secret given to this command opened.
    pub current: bool,
}

/// A key slot record as stored (`manifest::encode`).
#[derive(Debug, Serialize, Deserialize)]
struct SlotRecord {
    format: String,
    version: u64,
    id: String,
    /// `password` or `keyfile`.
    kind: String,
    created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    /// Password slots: Argon2id parameters and salt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kdf: Option<KdfRecord>,
    /// Key-file slots: the salt (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    salt: Option<String>,
    /// base64 of nonce (24) | XChaCha20-Poly1305(KEK, master key 64 bytes) | tag (16).
    wrapped: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct KdfRecord {
    alg: String,
    m_kib: u32,
    t: u32,
    p: u32,
    salt: String,
}

/// How a checked slot derives its key-encryption key.
enum SlotKdf {
    Password {
        cost: KdfCost,
        salt: Vec<u8>,
    },
    KeyFile {
        salt: Vec<u8>,
    },
    /// A kind this cbtfs does not know (a later version's); never tried.
    Other(String),
}

/// A slot record that passed every check: ready to try a secret on.
struct Slot {
    id: String,
    created: String,
    label: Option<String>,
    kdf: SlotKdf,
    wrapped: Vec<u8>,
}

impl Slot {
    fn kind(&self) -> &str {
        match &self.kdf {
            SlotKdf::Password { .. } => KIND_PASSWORD,
            SlotKdf::KeyFile { .. } => KIND_KEYFILE,
            SlotKdf::Other(k) => k,
        }
    }
}

/// Is `id` a slot id of the shape cbtfs writes (16 lowercase hex)?
fn is_slot_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

fn slot_key(id: &str) -> String {
    format!("{KEYS_PREFIX}{id}")
}

fn slot_aad(repo_id: &str, slot_id: &str) -> Vec<u8> {
    format!("cbtfs-key:{repo_id}:{slot_id}").into_bytes()
}

fn decode_b64(field: &str, text: &str) -> std::result::Result<Vec<u8>, String> {
    B64.decode(text)
        .map_err(|_| format!("its {field} is not base64"))
}

/// Decode and check a slot record; `Err` is the reason it is damaged.
fn check_slot(
    slot_id: &str,
    bytes: &[u8],
    location: &str,
    max: &KdfCost,
) -> std::result::Result<Slot, String> {
    let rec: SlotRecord = manifest::decode(bytes, location, "key slot", KEY_FORMAT, KEY_VERSION)
        .map_err(|e| match e {
            RepoError::Corrupt { detail, .. } => detail,
            other => other.to_string(),
        })?;
    if rec.id != slot_id {
        return Err(format!(
            "its id field says {:?}, but it is stored as {}",
            rec.id,
            slot_key(slot_id)
        ));
    }
    let wrapped = decode_b64("wrapped key", &rec.wrapped)?;
    if wrapped.len() != WRAPPED_LEN {
        return Err(format!(
            "its wrapped key is {} bytes, not {WRAPPED_LEN}",
            wrapped.len()
        ));
    }
    let salt_ok = |salt: Vec<u8>| {
        if SALT_RANGE.contains(&salt.len()) {
            Ok(salt)
        } else {
            Err(format!(
                "its salt is {} bytes, not {} to {}",
                salt.len(),
                SALT_RANGE.start(),
                SALT_RANGE.end()
            ))
        }
    };
    let kdf = match rec.kind.as_str() {
        KIND_PASSWORD => {
            let kdf = rec
                .kdf
                .as_ref()
                .ok_or_else(|| "it is a password slot without KDF parameters".to_string())?;
            if kdf.alg != "argon2id" {
                return Err(format!("its KDF {:?} is not argon2id", kdf.alg));
            }
            let cost = KdfCost {
                m_kib: kdf.m_kib,
                t: kdf.t,
                p: kdf.p,
            };
            cost.check(max)?;
            let salt = salt_ok(decode_b64("salt", &kdf.salt)?)?;
            SlotKdf::Password { cost, salt }
        }
        KIND_KEYFILE => {
            let salt = rec
                .salt
                .as_deref()
                .ok_or_else(|| "it is a key-file slot without a salt".to_string())?;
            SlotKdf::KeyFile {
                salt: salt_ok(decode_b64("salt", salt)?)?,
            }
        }
        other => SlotKdf::Other(other.chars().filter(|c| !c.is_control()).take(40).collect()),
    };
    Ok(Slot {
        id: rec.id,
        created: rec.created,
        label: rec.label,
        kdf,
        wrapped,
    })
}

/// The key-encryption key of `slot` for `secret`, if the secret is of the slot's kind.
fn derive_kek(slot: &SlotKdf, secret: &Secret) -> std::result::Result<Option<[u8; 32]>, String> {
    match (slot, secret) {
        (SlotKdf::Password { cost, salt }, Secret::Password(pw)) => {
            password_kek(pw, salt, *cost).map(Some)
        }
        (SlotKdf::KeyFile { salt }, Secret::KeyFile { key, .. }) => {
            Ok(Some(key_file_kek(key, salt)))
        }
        _ => Ok(None),
    }
}

fn password_kek(
    password: &str,
    salt: &[u8],
    cost: KdfCost,
) -> std::result::Result<[u8; 32], String> {
    // Checked again here: nothing reaches Argon2's allocation with a cost above MAX.
    cost.check(&KdfCost::MAX)?;
    let params = argon2::Params::new(cost.m_kib, cost.t, cost.p, Some(32))
        .map_err(|e| format!("its Argon2 parameters are refused: {e}"))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = [0u8; 32];
    a.hash_password_into(password.as_bytes(), salt, &mut kek)
        .map_err(|e| format!("Argon2 failed: {e}"))?;
    Ok(kek)
}

fn key_file_kek(key: &[u8; 32], salt: &[u8]) -> [u8; 32] {
    let mut input = Vec::with_capacity(32 + salt.len());
    input.extend_from_slice(key);
    input.extend_from_slice(salt);
    let kek = blake3::derive_key(KEY_FILE_CONTEXT, &input);
    input.zeroize();
    kek
}

/// Try `secret` on one slot record's bytes: `Ok(Some(keys))` if it opens, `Ok(None)` if the
/// secret is wrong (or of the other kind), `Err(reason)` if the record is damaged or asks for a
/// cost above `max`. Pure over bytes: what `unlock` does per slot, and what the `key_slot` fuzz
/// target drives.
pub fn open_slot_record(
    repo_id: &str,
    slot_id: &str,
    bytes: &[u8],
    secret: &Secret,
    max: &KdfCost,
) -> std::result::Result<Option<Keys>, String> {
    let slot = check_slot(slot_id, bytes, &slot_key(slot_id), max)?;
    try_slot(repo_id, &slot, secret)
}

fn try_slot(
    repo_id: &str,
    slot: &Slot,
    secret: &Secret,
) -> std::result::Result<Option<Keys>, String> {
    let Some(mut kek) = derive_kek(&slot.kdf, secret)? else {
        return Ok(None);
    };
    let opened = crypto::unwrap(&kek, &slot_aad(repo_id, &slot.id), &slot.wrapped);
    kek.zeroize();
    let Some(mut master) = opened else {
        return Ok(None);
    };
    let keys = match <&[u8; 64]>::try_from(master.as_slice()) {
        Ok(m) => Some(Keys::from_master_bytes(m, true)),
        Err(_) => None,
    };
    master.zeroize();
    keys.map(Some)
        .ok_or_else(|| "its wrapped key does not hold 64 bytes".to_string())
}

/// The repository, for messages.
fn repo_name(store: &dyn Store) -> String {
    match store.local_root() {
        Some(p) => p.display().to_string(),
        None => store.describe(""),
    }
}

/// Every object under `keys/`: checked slots, and damaged ones with their reasons.
struct Loaded {
    slots: Vec<Slot>,
    damaged: Vec<(String, String)>,
}

fn load_slots(store: &dyn Store) -> Result<Loaded> {
    let listed = store
        .list(KEYS_PREFIX)
        .map_err(|e| RepoError::io("listing key slots in", store.describe(KEYS_PREFIX), e))?;
    let mut out = Loaded {
        slots: Vec::new(),
        damaged: Vec::new(),
    };
    for obj in listed {
        let id = obj.key.strip_prefix(KEYS_PREFIX).unwrap_or(&obj.key);
        if !is_slot_id(id) {
            out.damaged
                .push((obj.key.clone(), "its name is not a key slot id".into()));
            continue;
        }
        if obj.len > MAX_SLOT_BYTES {
            out.damaged.push((
                obj.key.clone(),
                format!("it is {} bytes, far larger than a key slot", obj.len),
            ));
            continue;
        }
        let bytes = match store.get(&obj.key) {
            Ok(b) => b,
            // Removed since the listing (`key remove` in another process).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(RepoError::io(
                    "reading key slot",
                    store.describe(&obj.key),
                    e,
                ));
            }
        };
        if bytes.len() as u64 > MAX_SLOT_BYTES {
            out.damaged.push((
                obj.key.clone(),
                format!("it is {} bytes, far larger than a key slot", bytes.len()),
            ));
            continue;
        }
        match check_slot(id, &bytes, &obj.key, &KdfCost::MAX) {
            Ok(slot) => out.slots.push(slot),
            Err(why) => out.damaged.push((obj.key.clone(), why)),
        }
    }
    Ok(out)
}

fn kind_phrase(kind: &str) -> &str {
    match kind {
        KIND_PASSWORD => "password",
        KIND_KEYFILE => "key file",
        other => other,
    }
}

/// "2 passwords, 1 key file".
fn slot_summary(slots: &[Slot]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for s in slots {
        match counts.iter_mut().find(|(k, _)| *k == s.kind()) {
            Some((_, n)) => *n += 1,
            None => counts.push((s.kind(), 1)),
        }
    }
    counts
        .iter()
        .map(|(k, n)| {
            let k = kind_phrase(k);
            if *n == 1 {
                format!("1 {k}")
            } else {
                format!("{n} {k}s")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// "; 1 key slot is damaged: keys/… (why)" or "".
fn damaged_summary(damaged: &[(String, String)]) -> String {
    if damaged.is_empty() {
        return String::new();
    }
    // A few named in full; a keys/ full of junk does not make a page-long message.
    const NAMED: usize = 5;
    let mut list = damaged
        .iter()
        .take(NAMED)
        .map(|(k, why)| format!("{k} ({why})"))
        .collect::<Vec<_>>()
        .join(", ");
    if damaged.len() > NAMED {
        list.push_str(&format!(
            " and {} more (see `cbtfs key list`)",
            damaged.len() - NAMED
        ));
    }
    if damaged.len() == 1 {
        format!("; 1 key slot is damaged: {list}")
    } else {
        format!("; {} key slots are damaged: {list}", damaged.len())
    }
}

/// Add a slot wrapping `keys` under `secret`; returns its id.
pub fn add_slot(
    store: &dyn Store,
    repo_id: &str,
    keys: &Keys,
    secret: &Secret,
    label: Option<&str>,
    cost: KdfCost,
) -> Result<String> {
    if !keys.encrypted() {
        return Err(RepoError::Invalid(format!(
            "repository {} is not encrypted (--encryption none): it has no key slots, its key is in its header",
            repo_name(store)
        )));
    }
    if let Some(l) = label
        && (l.chars().count() > MAX_LABEL || l.chars().any(char::is_control))
    {
        return Err(RepoError::Invalid(format!(
            "the key slot label {l:?} is not usable: give at most {MAX_LABEL} characters without control characters"
        )));
    }
    let mut raw = [0u8; 8 + SALT_LEN];
    getrandom::fill(&mut raw).map_err(|e| {
        RepoError::io(
            "making a key slot in",
            store.describe(KEYS_PREFIX),
            crypto::random_error(e),
        )
    })?;
    let id: String = raw[..8].iter().map(|b| format!("{b:02x}")).collect();
    let salt = raw[8..].to_vec();
    let (kdf, salt_field, mut kek) = match secret {
        Secret::Password(pw) => {
            if pw.is_empty() {
                return Err(RepoError::Invalid(
                    "the password is empty: give a password of at least one character".into(),
                ));
            }
            cost.check(&KdfCost::MAX).map_err(|why| {
                RepoError::Invalid(format!("the key derivation cost is not usable: {why}"))
            })?;
            let kek = password_kek(pw, &salt, cost)
                .map_err(|why| RepoError::Invalid(format!("the key derivation failed: {why}")))?;
            let kdf = KdfRecord {
                alg: "argon2id".into(),
                m_kib: cost.m_kib,
                t: cost.t,
                p: cost.p,
                salt: B64.encode(&salt),
            };
            (Some(kdf), None, kek)
        }
        Secret::KeyFile { key, .. } => (None, Some(B64.encode(&salt)), key_file_kek(key, &salt)),
    };
    let mut master = keys.master_bytes();
    let wrapped = crypto::wrap(&kek, &slot_aad(repo_id, &id), &master);
    kek.zeroize();
    master.zeroize();
    let key = slot_key(&id);
    let wrapped = wrapped.map_err(|e| RepoError::io("making key slot", store.describe(&key), e))?;
    let rec = SlotRecord {
        format: KEY_FORMAT.into(),
        version: KEY_VERSION,
        id: id.clone(),
        kind: secret.kind().into(),
        created: crate::timefmt::rfc3339(crate::timefmt::now()),
        label: label.map(str::to_string),
        kdf,
        salt: salt_field,
        wrapped: B64.encode(&wrapped),
    };
    store
        .put(&key, &manifest::encode(&rec))
        .map_err(|e| RepoError::io("writing key slot", store.describe(&key), e))?;
    Ok(id)
}

/// Unwrap the master key with `secret`: returns the keys and the id of the slot that opened.
/// No slot of the secret's kind: `RepoError::Invalid` naming the kind and what to give.
/// A secret no slot accepts: `RepoError::WrongSecret`.
///
/// Damaged slot records are skipped and named in the error should nothing open.
pub fn unlock(store: &dyn Store, repo_id: &str, secret: &Secret) -> Result<(Keys, String)> {
    let loaded = load_slots(store)?;
    let repo = repo_name(store);
    let kind = secret.kind();
    let mut tried = 0usize;
    for slot in loaded.slots.iter().filter(|s| s.kind() == kind) {
        tried += 1;
        match try_slot(repo_id, slot, secret) {
            Ok(Some(keys)) => return Ok((keys, slot.id.clone())),
            Ok(None) => {}
            // Not reachable for a checked slot; treated as a wrong secret for this slot.
            Err(why) => {
                tracing::warn!(slot = %slot_key(&slot.id), "key slot {}: {why}", slot_key(&slot.id))
            }
        }
    }
    let damaged = damaged_summary(&loaded.damaged);
    if tried > 0 {
        let secret_text = match secret {
            Secret::Password(_) => "the password".to_string(),
            Secret::KeyFile { path, .. } => format!("the key file {}", path.display()),
        };
        return Err(RepoError::WrongSecret {
            repo,
            kind: match secret {
                Secret::Password(_) => "password",
                Secret::KeyFile { .. } => "key file",
            },
            secret: secret_text,
            tried,
            damaged,
        });
    }
    let (want, other_flag) = match secret {
        Secret::Password(_) => ("password", "--key-file"),
        Secret::KeyFile { .. } => ("key file", "a password (--repo-password-file)"),
    };
    if loaded.slots.is_empty() && loaded.damaged.is_empty() {
        return Err(RepoError::corrupt(
            store.describe(KEYS_PREFIX),
            "the repository has no key slot at all, so its master key cannot be unwrapped; restore keys/ from a copy of the repository",
        ));
    }
    if loaded.slots.is_empty() {
        return Err(RepoError::corrupt(
            store.describe(KEYS_PREFIX),
            format!(
                "no key slot of the repository could be read{damaged}; restore keys/ from a copy of the repository"
            ),
        ));
    }
    Err(RepoError::Invalid(format!(
        "repository {repo} has no {want} key slot{damaged}; open it with {other_flag} (its key slots: {})",
        slot_summary(&loaded.slots)
    )))
}

/// Every slot, sorted by creation time; `current` marks `opened_with`. A damaged slot record is
/// listed with kind `damaged`, no creation time and the reason as its label.
pub fn list_slots(store: &dyn Store, opened_with: &str) -> Result<Vec<SlotInfo>> {
    let loaded = load_slots(store)?;
    let mut out: Vec<SlotInfo> = loaded
        .slots
        .into_iter()
        .map(|s| SlotInfo {
            current: s.id == opened_with,
            kind: s.kind().to_string(),
            id: s.id,
            created: s.created,
            label: s.label,
        })
        .collect();
    out.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
    for (key, why) in loaded.damaged {
        out.push(SlotInfo {
            id: key.strip_prefix(KEYS_PREFIX).unwrap_or(&key).to_string(),
            kind: "damaged".into(),
            created: String::new(),
            label: Some(why),
            current: false,
        });
    }
    Ok(out)
}

/// Remove slot `id`. Refuses to remove the last slot (the data would be lost): the last
/// readable one, that is — a damaged slot opens nothing.
pub fn remove_slot(store: &dyn Store, id: &str) -> Result<()> {
    let loaded = load_slots(store)?;
    let repo = repo_name(store);
    let exists = loaded.slots.iter().any(|s| s.id == id)
        || loaded
            .damaged
            .iter()
            .any(|(k, _)| k.strip_prefix(KEYS_PREFIX) == Some(id));
    if !exists || !is_slot_id(id) {
        let mut ids: Vec<&str> = loaded.slots.iter().map(|s| s.id.as_str()).collect();
        ids.extend(
            loaded
                .damaged
                .iter()
                .map(|(k, _)| k.strip_prefix(KEYS_PREFIX).unwrap_or(k)),
        );
        let id_shown: String = id.chars().take(64).collect();
        return Err(RepoError::NotFound(format!(
            "repository {repo} has no key slot {id_shown:?}; its key slots are {} (see `cbtfs key list`)",
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.join(", ")
            }
        )));
    }
    let others = loaded.slots.iter().filter(|s| s.id != id).count();
    if others == 0 {
        let damaged = if loaded.damaged.is_empty() {
            String::new()
        } else {
            format!(
                " (the others are damaged: {})",
                damaged_summary(&loaded.damaged).trim_start_matches("; ")
            )
        };
        return Err(RepoError::Invalid(format!(
            "key slot {id} of repository {repo} is not removed: it is the only key slot{damaged}: removing it would make the repository unreadable; add another first (`cbtfs key add`)"
        )));
    }
    let key = slot_key(id);
    store
        .delete(&key)
        .map_err(|e| RepoError::io("removing key slot", store.describe(&key), e))
}

/// Replace the slot `opened_slot` by a new one for `new` (`cbtfs key passwd`): the new slot is
/// written first, then the old one removed, so a crash in between leaves both (either secret
/// opens). The new slot keeps the old one's label. Returns the new slot's id.
pub fn change_password(
    store: &dyn Store,
    repo_id: &str,
    keys: &Keys,
    opened_slot: &str,
    new: &Secret,
    cost: KdfCost,
) -> Result<String> {
    let loaded = load_slots(store)?;
    let Some(old) = loaded.slots.iter().find(|s| s.id == opened_slot) else {
        return Err(RepoError::NotFound(format!(
            "repository {} has no readable key slot {:?} to replace (see `cbtfs key list`)",
            repo_name(store),
            opened_slot.chars().take(64).collect::<String>()
        )));
    };
    let id = add_slot(store, repo_id, keys, new, old.label.as_deref(), cost)?;
    remove_slot(store, opened_slot)?;
    Ok(id)
}

/// An in-memory `Store` for unit tests of the layers above the store.
#[cfg(test)]
pub(crate) mod mem {
    use std::collections::BTreeMap;
    use std::io;
    use std::sync::Mutex;

    use crate::repo::store::{LockError, LockGuard, ObjectInfo, Store};

    #[derive(Debug, Default)]
    pub(crate) struct MemStore {
        pub(crate) objects: Mutex<BTreeMap<String, Vec<u8>>>,
    }

    struct NoLock;
    impl LockGuard for NoLock {}

    impl MemStore {
        fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
            self.objects.lock().unwrap_or_else(|p| p.into_inner())
        }
        /// Replace an object's bytes (tests that damage objects on purpose).
        pub(crate) fn overwrite(&self, key: &str, bytes: Vec<u8>) {
            self.map().insert(key.to_string(), bytes);
        }
    }

    impl Store for MemStore {
        fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
            let mut m = self.map();
            if m.contains_key(key) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    key.to_string(),
                ));
            }
            m.insert(key.to_string(), bytes.to_vec());
            Ok(())
        }
        fn get(&self, key: &str) -> io::Result<Vec<u8>> {
            self.map()
                .get(key)
                .cloned()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, key.to_string()))
        }
        fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let m = self.map();
            let obj = m
                .get(key)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, key.to_string()))?;
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let src = start
                .checked_add(buf.len())
                .and_then(|end| obj.get(start..end))
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
            Ok(self
                .map()
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| ObjectInfo {
                    key: k.clone(),
                    len: v.len() as u64,
                })
                .collect())
        }
        fn delete(&self, key: &str) -> io::Result<()> {
            self.map().remove(key);
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
}

#[cfg(test)]
mod tests {
    use super::mem::MemStore;
    use super::*;

    const REPO: &str = "0123456789abcdef0123456789abcdef";
    const FAST: KdfCost = KdfCost::FAST;

    fn pw(s: &str) -> Secret {
        Secret::Password(s.to_string())
    }

    fn key_file(byte: u8) -> Secret {
        Secret::KeyFile {
            path: PathBuf::from(format!("/k/{byte}")),
            key: [byte; 32],
        }
    }

    fn setup() -> (MemStore, Keys, String) {
        let store = MemStore::default();
        let keys = Keys::generate(true).unwrap();
        let id = add_slot(
            &store,
            REPO,
            &keys,
            &pw("correct horse"),
            Some("admin"),
            FAST,
        )
        .unwrap();
        (store, keys, id)
    }

    fn slot_ids(store: &MemStore) -> Vec<String> {
        store
            .list(KEYS_PREFIX)
            .unwrap()
            .into_iter()
            .map(|o| o.key[KEYS_PREFIX.len()..].to_string())
            .collect()
    }

    #[test]
    fn password_slot_round_trip() {
        let (store, keys, id) = setup();
        assert!(is_slot_id(&id));
        assert_eq!(slot_ids(&store), vec![id.clone()]);
        let (opened, with) = unlock(&store, REPO, &pw("correct horse")).unwrap();
        assert_eq!(with, id);
        assert_eq!(opened.master_bytes(), keys.master_bytes());
        assert!(opened.encrypted());
        // The record is readable JSON that holds no key material in the clear.
        let rec = store.get(&slot_key(&id)).unwrap();
        let text = String::from_utf8(rec).unwrap();
        assert!(text.contains("\"kind\": \"password\""));
        assert!(text.contains("\"alg\": \"argon2id\""));
        assert!(text.contains("\"m_kib\": 1024"));
        assert!(!text.contains(&B64.encode(keys.master_bytes())));
        assert!(!text.contains("correct horse"));
        let infos = list_slots(&store, &id).unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].id, id);
        assert_eq!(infos[0].kind, "password");
        assert_eq!(infos[0].label.as_deref(), Some("admin"));
        assert!(infos[0].current);
    }

    #[test]
    fn slot_opens_only_its_repository() {
        let (store, _, _) = setup();
        let e = unlock(&store, "another-repo-id", &pw("correct horse")).unwrap_err();
        assert!(matches!(e, RepoError::WrongSecret { tried: 1, .. }), "{e}");
    }

    #[test]
    fn wrong_password_is_wrong_secret_not_damage() {
        let (store, _, _) = setup();
        let e = unlock(&store, REPO, &pw("battery staple")).unwrap_err();
        match &e {
            RepoError::WrongSecret {
                kind,
                tried,
                damaged,
                ..
            } => {
                assert_eq!(*kind, "password");
                assert_eq!(*tried, 1);
                assert!(damaged.is_empty());
            }
            other => panic!("expected WrongSecret, got {other:?}"),
        }
        let text = e.to_string();
        assert_eq!(
            text,
            "the password does not open repository mem: (tried 1 password key slot); check the password file, or use another key slot's password or key file"
        );
        assert!(!text.contains("battery"));
    }

    #[test]
    fn key_file_slot_round_trip_and_both_kinds_open_the_same_master() {
        let (store, keys, pid) = setup();
        let kid = add_slot(&store, REPO, &keys, &key_file(5), None, FAST).unwrap();
        assert_ne!(kid, pid);
        let (a, with_a) = unlock(&store, REPO, &key_file(5)).unwrap();
        let (b, with_b) = unlock(&store, REPO, &pw("correct horse")).unwrap();
        assert_eq!(with_a, kid);
        assert_eq!(with_b, pid);
        assert_eq!(a.master_bytes(), keys.master_bytes());
        assert_eq!(b.master_bytes(), keys.master_bytes());
        let e = unlock(&store, REPO, &key_file(6)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the key file /k/6 does not open repository mem: (tried 1 key file key slot); check the key file, or use another key slot's password or key file"
        );
        let infos = list_slots(&store, &kid).unwrap();
        assert_eq!(infos.len(), 2);
        let k = infos.iter().find(|i| i.id == kid).unwrap();
        assert_eq!(k.kind, "keyfile");
        assert!(k.current);
        assert!(!infos.iter().find(|i| i.id == pid).unwrap().current);
    }

    #[test]
    fn no_slot_of_the_kind_says_what_to_give() {
        let (store, keys, _) = setup();
        let e = unlock(&store, REPO, &key_file(1)).unwrap_err();
        assert!(matches!(e, RepoError::Invalid(_)));
        assert_eq!(
            e.to_string(),
            "repository mem: has no key file key slot; open it with a password (--repo-password-file) (its key slots: 1 password)"
        );
        let store2 = MemStore::default();
        add_slot(&store2, REPO, &keys, &key_file(1), None, FAST).unwrap();
        let e = unlock(&store2, REPO, &pw("x")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "repository mem: has no password key slot; open it with --key-file (its key slots: 1 key file)"
        );
        let empty = MemStore::default();
        let e = unlock(&empty, REPO, &pw("x")).unwrap_err();
        assert!(matches!(e, RepoError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("no key slot at all"));
    }

    #[test]
    fn removed_slot_no_longer_opens_and_last_slot_stays() {
        let (store, keys, pid) = setup();
        let kid = add_slot(&store, REPO, &keys, &key_file(9), None, FAST).unwrap();
        remove_slot(&store, &pid).unwrap();
        assert_eq!(slot_ids(&store), vec![kid.clone()]);
        let e = unlock(&store, REPO, &pw("correct horse")).unwrap_err();
        assert!(matches!(e, RepoError::Invalid(_)), "{e}");
        let e = remove_slot(&store, &kid).unwrap_err();
        assert!(matches!(e, RepoError::Invalid(_)));
        assert!(
            e.to_string().contains("it is the only key slot: removing it would make the repository unreadable; add another first (`cbtfs key add`)"),
            "{e}"
        );
        assert_eq!(slot_ids(&store), vec![kid.clone()]);
        let e = remove_slot(&store, "0000000000000000").unwrap_err();
        assert!(matches!(e, RepoError::NotFound(_)));
        assert!(e.to_string().contains(&kid), "{e}");
        let e = remove_slot(&store, "../cbtfs.repo").unwrap_err();
        assert!(matches!(e, RepoError::NotFound(_)));
        unlock(&store, REPO, &key_file(9)).unwrap();
    }

    #[test]
    fn change_password_replaces_the_slot() {
        let (store, keys, old) = setup();
        let new = change_password(&store, REPO, &keys, &old, &pw("new secret"), FAST).unwrap();
        assert_ne!(new, old);
        assert_eq!(slot_ids(&store), vec![new.clone()]);
        assert!(matches!(
            unlock(&store, REPO, &pw("correct horse")),
            Err(RepoError::WrongSecret { .. })
        ));
        let (k, with) = unlock(&store, REPO, &pw("new secret")).unwrap();
        assert_eq!(with, new);
        assert_eq!(k.master_bytes(), keys.master_bytes());
        assert_eq!(
            list_slots(&store, &new).unwrap()[0].label.as_deref(),
            Some("admin")
        );
        let e = change_password(&store, REPO, &keys, &old, &pw("x"), FAST).unwrap_err();
        assert!(matches!(e, RepoError::NotFound(_)));
    }

    #[test]
    fn a_flipped_bit_in_a_slot_is_named_never_a_panic() {
        let (store, keys, pid) = setup();
        let kid = add_slot(&store, REPO, &keys, &key_file(3), None, FAST).unwrap();
        let orig = store.get(&slot_key(&pid)).unwrap();
        let mut damaged_named = 0;
        for i in 0..orig.len() {
            for bit in [0u8, 5] {
                let mut b = orig.clone();
                b[i] ^= 1 << bit;
                store.overwrite(&slot_key(&pid), b);
                match unlock(&store, REPO, &pw("correct horse")) {
                    // A flip the checksum line tolerates (trailing whitespace) changes nothing.
                    Ok((k, with)) => {
                        assert_eq!(with, pid);
                        assert_eq!(k.master_bytes(), keys.master_bytes());
                    }
                    Err(e) => {
                        let text = e.to_string();
                        assert!(text.contains(&slot_key(&pid)), "byte {i}: {text}");
                        damaged_named += 1;
                    }
                }
            }
        }
        assert!(damaged_named > orig.len());
        // The other slot still opens, and the damaged one is listed as such.
        let mut b = orig.clone();
        b[10] ^= 1;
        store.overwrite(&slot_key(&pid), b);
        unlock(&store, REPO, &key_file(3)).unwrap();
        let e = unlock(&store, REPO, &key_file(4)).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "(tried 1 key file key slot); 1 key slot is damaged: {}",
                slot_key(&pid)
            )),
            "{e}"
        );
        let infos = list_slots(&store, &kid).unwrap();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[1].id, pid);
        assert_eq!(infos[1].kind, "damaged");
        // Only the key file slot is readable: removing it is refused.
        let e = remove_slot(&store, &kid).unwrap_err();
        assert!(e.to_string().contains("the others are damaged"), "{e}");
    }

    /// A slot record with valid checksum whose fields are replaced by `edit`.
    fn edited_slot(store: &MemStore, id: &str, edit: impl FnOnce(&mut SlotRecord)) {
        let bytes = store.get(&slot_key(id)).unwrap();
        let mut rec: SlotRecord =
            manifest::decode(&bytes, "t", "key slot", KEY_FORMAT, KEY_VERSION).unwrap();
        edit(&mut rec);
        store.overwrite(&slot_key(id), manifest::encode(&rec));
    }

    #[test]
    fn hostile_cost_is_refused_before_allocation() {
        for (m, t, p) in [
            (u32::MAX, 1, 1),
            ((1 << 20) + 1, 1, 1),
            (1024, 65, 1),
            (1024, u32::MAX, 1),
            (1 << 20, 1, 17),
            (1024, 0, 1),
            (1024, 1, 0),
            (7, 1, 1),
            (64, 1, 16),
        ] {
            let (store, _, id) = setup();
            edited_slot(&store, &id, |r| {
                let k = r.kdf.as_mut().unwrap();
                k.m_kib = m;
                k.t = t;
                k.p = p;
            });
            let e = unlock(&store, REPO, &pw("correct horse")).unwrap_err();
            assert!(matches!(e, RepoError::Corrupt { .. }), "{m} {t} {p}: {e}");
            let text = e.to_string();
            assert!(text.contains(&slot_key(&id)), "{text}");
            assert!(text.contains("Argon2 cost"), "{text}");
        }
        // add_slot refuses an unusable cost too.
        let store = MemStore::default();
        let keys = Keys::generate(true).unwrap();
        let bad = KdfCost {
            m_kib: u32::MAX,
            t: 1,
            p: 1,
        };
        assert!(matches!(
            add_slot(&store, REPO, &keys, &pw("x"), None, bad),
            Err(RepoError::Invalid(_))
        ));
        assert!(slot_ids(&store).is_empty());
    }

    #[test]
    fn malformed_fields_are_damage() {
        type Edit = Box<dyn FnOnce(&mut SlotRecord)>;
        let cases: Vec<Edit> = vec![
            Box::new(|r| r.wrapped = "!!".into()),
            Box::new(|r| r.wrapped = B64.encode([0u8; 103])),
            Box::new(|r| r.kdf.as_mut().unwrap().salt = B64.encode([0u8; 4])),
            Box::new(|r| r.kdf.as_mut().unwrap().salt = B64.encode([0u8; 65])),
            Box::new(|r| r.kdf.as_mut().unwrap().alg = "scrypt".into()),
            Box::new(|r| r.kdf = None),
            Box::new(|r| r.id = "0000000000000000".into()),
        ];
        for (n, edit) in cases.into_iter().enumerate() {
            let (store, _, id) = setup();
            edited_slot(&store, &id, edit);
            let e = unlock(&store, REPO, &pw("correct horse")).unwrap_err();
            assert!(matches!(e, RepoError::Corrupt { .. }), "case {n}: {e}");
            assert!(e.to_string().contains(&slot_key(&id)), "case {n}: {e}");
        }
        // A kind from a later version is listed and never tried.
        let (store, _, id) = setup();
        edited_slot(&store, &id, |r| r.kind = "kms".into());
        let e = unlock(&store, REPO, &pw("correct horse")).unwrap_err();
        assert!(e.to_string().contains("(its key slots: 1 kms)"), "{e}");
        assert_eq!(list_slots(&store, "").unwrap()[0].kind, "kms");
        // Odd names and huge objects under keys/ are damage, not read whole.
        let (store, _, _) = setup();
        store.overwrite("keys/not-a-slot", b"x".to_vec());
        store.overwrite("keys/00000000000000ff", vec![b' '; 70_000]);
        let e = unlock(&store, REPO, &pw("wrong")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("2 key slots are damaged"), "{text}");
        assert!(
            text.contains("keys/not-a-slot (its name is not a key slot id)"),
            "{text}"
        );
        assert!(
            text.contains("keys/00000000000000ff (it is 70000 bytes"),
            "{text}"
        );
    }

    #[test]
    fn unencrypted_keys_and_bad_labels_are_refused() {
        let store = MemStore::default();
        let plain = Keys::generate(false).unwrap();
        assert!(matches!(
            add_slot(&store, REPO, &plain, &pw("x"), None, FAST),
            Err(RepoError::Invalid(_))
        ));
        let keys = Keys::generate(true).unwrap();
        assert!(add_slot(&store, REPO, &keys, &pw(""), None, FAST).is_err());
        assert!(add_slot(&store, REPO, &keys, &pw("x"), Some("a\nb"), FAST).is_err());
        assert!(slot_ids(&store).is_empty());
    }

    #[test]
    fn key_files_are_made_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo.key");
        let made = Secret::create_key_file(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "cbtfs-keyfile 1");
        assert_eq!(lines[2], "");
        assert_eq!(B64.decode(lines[1]).unwrap().len(), 32);
        let read = Secret::read_key_file(&path).unwrap();
        match (&made, &read) {
            (Secret::KeyFile { key: a, .. }, Secret::KeyFile { key: b, path: p }) => {
                assert_eq!(a, b);
                assert_eq!(B64.decode(lines[1]).unwrap(), a.to_vec());
                assert_eq!(p, &path);
            }
            _ => panic!("not key files"),
        }
        // Create-only.
        let e = Secret::create_key_file(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} exists; give a new path, or use it with --key-file to open",
                path.display()
            )
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        // Opens a slot made with it.
        let store = MemStore::default();
        let keys = Keys::generate(true).unwrap();
        add_slot(&store, REPO, &keys, &made, None, FAST).unwrap();
        let (k, _) = unlock(&store, REPO, &read).unwrap();
        assert_eq!(k.master_bytes(), keys.master_bytes());
    }

    #[test]
    fn what_is_not_a_key_file_is_refused_without_printing_it() {
        let key = B64.encode([0x5au8; 32]);
        assert_eq!(
            parse_key_file(format!("cbtfs-keyfile 1\n{key}\n").as_bytes()),
            Ok([0x5a; 32])
        );
        assert_eq!(
            parse_key_file(format!("cbtfs-keyfile 1\r\n{key}\r\n").as_bytes()),
            Ok([0x5a; 32])
        );
        assert_eq!(
            parse_key_file(format!("cbtfs-keyfile 1\n{key}").as_bytes()),
            Ok([0x5a; 32])
        );
        let short = B64.encode([1u8; 31]);
        for (bad, why) in [
            (format!("cbtfs-keyfile 2\n{key}\n"), "first line"),
            (format!("{key}\n"), "first line"),
            ("cbtfs-keyfile 1".to_string(), "no second line"),
            (format!("cbtfs-keyfile 1\n{key}\n\n"), "more than two lines"),
            (
                format!("cbtfs-keyfile 1\n{key}\nextra"),
                "more than two lines",
            ),
            (format!("cbtfs-keyfile 1\n{key}x\n"), "not base64"),
            (format!("cbtfs-keyfile 1\n{short}\n"), "32 bytes"),
            (format!("cbtfs-keyfile 1\n {key}\n"), "not base64"),
        ] {
            let e = parse_key_file(bad.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert_eq!(parse_key_file(&[0xff, 0xfe]), Err("it is not text"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, format!("cbtfs-keyfile 2\n{key}\n")).unwrap();
        let e = Secret::read_key_file(&path).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, RepoError::Invalid(_)));
        assert!(text.starts_with(&format!("{} is not a cbtfs key file", path.display())));
        assert!(text.contains("`cbtfs-keyfile 1` and the base64 of 32 random bytes"));
        assert!(!text.contains(&key));
        std::fs::write(&path, vec![b'a'; 5000]).unwrap();
        assert!(
            Secret::read_key_file(&path)
                .unwrap_err()
                .to_string()
                .contains("5000 bytes")
        );
        let e = Secret::read_key_file(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(Secret::read_key_file(dir.path()).is_err());
    }

    #[test]
    fn kdf_cost_from_env() {
        assert_eq!(KdfCost::from_var(Some("1")), KdfCost::FAST);
        assert_eq!(KdfCost::from_var(Some("0")), KdfCost::DEFAULT);
        assert_eq!(KdfCost::from_var(Some("yes")), KdfCost::DEFAULT);
        assert_eq!(KdfCost::from_var(None), KdfCost::DEFAULT);
        assert!(KdfCost::DEFAULT.check(&KdfCost::MAX).is_ok());
        assert!(KdfCost::FAST.check(&KdfCost::MAX).is_ok());
    }

    /// A slot record with a chosen id (the fuzz target's), made the way `add_slot` makes one.
    fn record_with_id(id: &str, repo_id: &str, keys: &Keys, secret: &Secret) -> SlotRecord {
        let salt = vec![3u8; SALT_LEN];
        let (kdf, salt_field, kek) = match secret {
            Secret::Password(p) => (
                Some(KdfRecord {
                    alg: "argon2id".into(),
                    m_kib: FAST.m_kib,
                    t: FAST.t,
                    p: FAST.p,
                    salt: B64.encode(&salt),
                }),
                None,
                password_kek(p, &salt, FAST).unwrap(),
            ),
            Secret::KeyFile { key, .. } => {
                (None, Some(B64.encode(&salt)), key_file_kek(key, &salt))
            }
        };
        let wrapped = crypto::wrap(&kek, &slot_aad(repo_id, id), &keys.master_bytes()).unwrap();
        SlotRecord {
            format: KEY_FORMAT.into(),
            version: KEY_VERSION,
            id: id.into(),
            kind: secret.kind().into(),
            created: "2026-11-30T02:00:00Z".into(),
            label: Some("seed".into()),
            kdf,
            salt: salt_field,
            wrapped: B64.encode(wrapped),
        }
    }

    /// The seeds of the `key_slot` fuzz target; run with `--ignored` to rewrite
    /// fuzz/seeds/key_slot/. Each one is checked to do what its name says.
    #[test]
    #[ignore = "writes fuzz/seeds/key_slot; run with --ignored to regenerate"]
    fn write_key_slot_fuzz_seeds() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/key_slot");
        std::fs::create_dir_all(&dir).unwrap();
        let keys = Keys::from_master_bytes(&[0x42; 64], true);
        let id = "0123456789abcdef";
        let password = Secret::Password("fuzz password".into());
        let key = Secret::KeyFile {
            path: "fuzz.key".into(),
            key: [7; 32],
        };
        let limit = KdfCost {
            m_kib: 8 * 1024,
            t: 4,
            p: 4,
        };
        let json_only = |rec: &SlotRecord| {
            let bytes = manifest::encode(rec);
            let at = bytes
                .windows(14)
                .rposition(|w| w == b"\ncbtfs-crc32c:")
                .unwrap();
            bytes[..at].to_vec()
        };
        let pw_rec = record_with_id(id, "fuzz-repo", &keys, &password);
        let kf_rec = record_with_id(id, "fuzz-repo", &keys, &key);
        let mut hostile = record_with_id(id, "fuzz-repo", &keys, &password);
        hostile.kdf.as_mut().unwrap().m_kib = u32::MAX;
        let mut seeds = vec![
            ("password.slot", manifest::encode(&pw_rec), true),
            ("password.json", json_only(&pw_rec), true),
            ("keyfile.slot", manifest::encode(&kf_rec), true),
            ("keyfile.json", json_only(&kf_rec), true),
            ("hostile-cost.json", json_only(&hostile), false),
            ("empty", Vec::new(), false),
        ];
        let mut truncated = manifest::encode(&pw_rec);
        truncated.truncate(truncated.len() / 2);
        seeds.push(("truncated.slot", truncated, false));
        for (name, bytes, opens) in &seeds {
            let mut signed = bytes.clone();
            signed.extend_from_slice(
                format!("\ncbtfs-crc32c:{:08x}\n", crc32c::crc32c(bytes)).as_bytes(),
            );
            let opened = [&password, &key].iter().any(|s| {
                [bytes, &signed]
                    .iter()
                    .any(|b| matches!(open_slot_record("fuzz-repo", id, b, s, &limit), Ok(Some(_))))
            });
            assert_eq!(opened, *opens, "{name}");
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = format!("{:?} {:?}", pw("hunter2"), key_file(0x41));
        assert_eq!(s, "Secret::Password(..) Secret::KeyFile(/k/65)");
    }
}
