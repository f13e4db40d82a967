//! Errors of the repository layer: a small kind plus the object it concerns.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The path is not a repository at all (a file, a directory without `cbtfs.repo`, nothing).
    /// A repository whose `cbtfs.repo` is unreadable or damaged is `Corrupt` instead.
    #[error(
        "\"{}\" is not a cbtfs repository ({why}); create one with `cbtfs init DIR` or check the path",
        path.display()
    )]
    NotARepository { path: PathBuf, why: String },

    /// A repository of an older format (version 1: plain per-point data files).
    #[error(
        "\"{}\" is a format-{found} cbtfs repository; this cbtfs reads and writes only format 2 (encrypted, compressed, deduplicated). Format {found} is no longer supported: create a new repository with `cbtfs init` and take a new full backup into it (nothing was changed)",
        path.display()
    )]
    OldFormat { path: PathBuf, found: u64 },

    /// An encrypted repository opened without a password or key file.
    #[error(
        "repository \"{}\" is encrypted: give its password with --repo-password-file FILE (or CBTFS_REPO_PASSWORD_FILE, or CBTFS_REPO_PASSWORD), or its key file with --key-file FILE (or CBTFS_KEY_FILE)",
        path.display()
    )]
    NeedSecret { path: PathBuf },

    #[error(
        "{what} at {location} has format version {found}, but this cbtfs reads up to version {supported}; upgrade cbtfs to read it (nothing was changed)"
    )]
    UnsupportedVersion {
        what: &'static str,
        location: String,
        found: u64,
        supported: u64,
    },

    #[error("{location} is damaged: {detail}; run `cbtfs verify` for a full report")]
    Corrupt { location: String, detail: String },

    #[error("{op} {location}: {source}{hint}")]
    Io {
        op: &'static str,
        location: String,
        #[source]
        source: io::Error,
        hint: &'static str,
    },

    #[error(
        "repository {path} is being written by another process ({holder}); wait for it to finish and try again (the lock of a process that was killed is released by itself: at once on a local repository, once stale on S3)"
    )]
    Locked { path: PathBuf, holder: String },

    #[error("{0}")]
    Invalid(String),

    /// No key slot of the secret's kind accepts the secret given: a wrong password or key file
    /// (never damage; damaged slots are named in `damaged`).
    #[error(
        "{secret} does not open repository {repo} (tried {tried} {kind} key slot{}){damaged}; check the {}, or use another key slot's password or key file",
        if *.tried == 1 { "" } else { "s" },
        if *.kind == "password" { "password file" } else { "key file" }
    )]
    WrongSecret {
        /// The repository (its path or URL).
        repo: String,
        /// `password` or `key file`.
        kind: &'static str,
        /// What was given, without its secret: "the password", "the key file /root/k".
        secret: String,
        /// How many slots of that kind were tried.
        tried: usize,
        /// "; 1 key slot is damaged: keys/… (why)", or empty.
        damaged: String,
    },

    #[error("{0}")]
    NotFound(String),
}

impl RepoError {
    /// Wrap an I/O error with the operation and object, adding advice for the errors a user can fix.
    pub fn io(op: &'static str, location: impl Into<String>, source: io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                "; the disk is full: free space or move the repository, then run the command again (nothing partial was committed)"
            }
            Some(libc::EROFS) => {
                "; the repository is on a read-only filesystem: remount it read-write to add points (reading works as is)"
            }
            Some(libc::EACCES) | Some(libc::EPERM) => {
                "; permission denied: run as the repository's owner"
            }
            _ => "",
        };
        RepoError::Io {
            op,
            location: location.into(),
            source,
            hint,
        }
    }

    pub fn corrupt(location: impl Into<String>, detail: impl Into<String>) -> Self {
        RepoError::Corrupt {
            location: location.into(),
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = RepoError> = std::result::Result<T, E>;
