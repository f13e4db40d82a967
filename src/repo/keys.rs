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

use std::path::{Path, PathBuf};

use super::crypto::Keys;
use super::error::Result;
use super::store::Store;

pub const KEYS_PREFIX: &str = "keys/";
pub const KEY_FORMAT: &str = "cbtfs-key";
pub const KEY_VERSION: u64 = 1;

/// A secret that opens a repository. Never `Debug`-printed with its contents.
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

impl Secret {
    /// Read a key file (refusing one that is not a cbtfs key file, naming it).
    pub fn read_key_file(path: &Path) -> Result<Secret> {
        let _ = path;
        todo!()
    }
    /// Make a new key file at `path` (create-only, mode 0600) and return it as a secret.
    pub fn create_key_file(path: &Path) -> Result<Secret> {
        let _ = path;
        todo!()
    }
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
    /// DEFAULT, or FAST when `CBTFS_KDF_FAST=1`.
    pub fn from_env() -> KdfCost {
        todo!()
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

/// Add a slot wrapping `keys` under `secret`; returns its id.
pub fn add_slot(
    store: &dyn Store,
    repo_id: &str,
    keys: &Keys,
    secret: &Secret,
    label: Option<&str>,
    cost: KdfCost,
) -> Result<String> {
    let _ = (store, repo_id, keys, secret, label, cost);
    todo!()
}

/// Unwrap the master key with `secret`: returns the keys and the id of the slot that opened.
/// No slot of the secret's kind: `RepoError::Invalid` naming the kind and what to give.
/// A secret no slot accepts: `RepoError::WrongSecret`.
pub fn unlock(store: &dyn Store, repo_id: &str, secret: &Secret) -> Result<(Keys, String)> {
    let _ = (store, repo_id, secret);
    todo!()
}

/// Every slot, sorted by creation time; `current` marks `opened_with`.
pub fn list_slots(store: &dyn Store, opened_with: &str) -> Result<Vec<SlotInfo>> {
    let _ = (store, opened_with);
    todo!()
}

/// Remove slot `id`. Refuses to remove the last slot (the data would be lost).
pub fn remove_slot(store: &dyn Store, id: &str) -> Result<()> {
    let _ = (store, id);
    todo!()
}
