//! `cbtfs key`: the key slots of an encrypted repository (the passwords and key files that
//! open it): list, add, remove, change.
//!
//! The command is opened like any other (`--repo-password-file`, `--key-file`, the environment,
//! or a prompt). The new secret of `add` and `passwd` never comes from the command line: from
//! `--new-password-file FILE`, `--new-key-file FILE` (made when it does not exist), or a
//! confirmed prompt on a terminal.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::json;

use super::{JSON_HELP, REPO_HELP, secret};
use crate::repo::Repository;
use crate::repo::keys::{self, KdfCost, Secret, SlotInfo};

const NEW_PASSWORD_FILE_HELP: &str = "The new password, read from the first line of FILE (never give it on the command line). Without this or --new-key-file, it is asked twice on the terminal";

const NEW_KEY_FILE_HELP: &str = "A key file for the new key slot: used if it exists (a cbtfs key file), else made now (32 random bytes, mode 0600)";

#[derive(Subcommand, Debug)]
pub enum KeyAction {
    /// List the key slots: the passwords and key files that open the repository.
    #[command(after_help = "\
Examples:
  cbtfs key list /backup/repo --key-file /root/cbtfs.key
  cbtfs key list /backup/repo --repo-password-file /root/.cbtfs-password --json")]
    List {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Add a key slot: another password or key file that opens the repository.
    #[command(after_help = "\
Examples:
  cbtfs key add /backup/repo --key-file /root/cbtfs.key --new-password-file /root/.cbtfs-password --label 'offsite copy'
  cbtfs key add /backup/repo --repo-password-file /root/.cbtfs-password --new-key-file /root/cbtfs-2.key")]
    Add {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        #[arg(long, value_name = "FILE", help = NEW_PASSWORD_FILE_HELP, conflicts_with = "new_key_file")]
        new_password_file: Option<PathBuf>,
        #[arg(long, value_name = "FILE", help = NEW_KEY_FILE_HELP)]
        new_key_file: Option<PathBuf>,
        /// A note shown by `cbtfs key list` (who holds it, where it is kept).
        #[arg(long, value_name = "TEXT")]
        label: Option<String>,
    },
    /// Remove a key slot: its password or key file no longer opens the repository.
    ///
    /// The repository's key is not changed: someone who kept a copy of the removed slot's file
    /// (keys/ID) and knows its password or holds its key file can still open the repository.
    /// The slot this command is opened with, and the last slot, are never removed.
    #[command(after_help = "\
Examples:
  cbtfs key list /backup/repo --key-file /root/cbtfs.key
  cbtfs key remove /backup/repo 3f9a0c1d2e4b5a69 --key-file /root/cbtfs.key")]
    Remove {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        /// The key slot to remove, as `cbtfs key list` shows it.
        id: String,
    },
    /// Change the password (or key file) of the key slot in use (the one given to this command).
    ///
    /// A new slot holding the new secret is written, then the old slot removed: the old
    /// password or key file no longer opens the repository.
    #[command(after_help = "\
Examples:
  cbtfs key passwd /backup/repo --repo-password-file /root/.old-password --new-password-file /root/.new-password
  cbtfs key passwd /backup/repo --key-file /root/old.key --new-key-file /root/new.key")]
    Passwd {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        #[arg(long, value_name = "FILE", help = NEW_PASSWORD_FILE_HELP, conflicts_with = "new_key_file")]
        new_password_file: Option<PathBuf>,
        #[arg(long, value_name = "FILE", help = NEW_KEY_FILE_HELP)]
        new_key_file: Option<PathBuf>,
    },
}

pub fn run(action: KeyAction) -> Result<()> {
    match action {
        KeyAction::List { repo, json } => list(&repo, json),
        KeyAction::Add {
            repo,
            new_password_file,
            new_key_file,
            label,
        } => add(
            &repo,
            new_password_file.as_deref(),
            new_key_file.as_deref(),
            label.as_deref(),
        ),
        KeyAction::Remove { repo, id } => remove(&repo, &id),
        KeyAction::Passwd {
            repo,
            new_password_file,
            new_key_file,
        } => passwd(&repo, new_password_file.as_deref(), new_key_file.as_deref()),
    }
}

/// Open `repo`, refusing an unencrypted one before asking for any secret.
fn open_encrypted(repo: &Path) -> Result<Repository> {
    let header = Repository::probe(repo)?;
    if header.encryption == crate::repo::ENCRYPTION_NONE {
        bail!("{}", not_encrypted(repo));
    }
    let r = super::open(repo)?;
    if r.opened_slot().is_none() {
        bail!("{}", not_encrypted(repo));
    }
    Ok(r)
}

fn not_encrypted(repo: &Path) -> String {
    format!(
        "repository {} is not encrypted (created with --encryption none): it has no key slots",
        repo.display()
    )
}

fn list(repo: &Path, json: bool) -> Result<()> {
    let r = open_encrypted(repo)?;
    let slots = keys::list_slots(r.store().as_ref(), r.opened_slot().unwrap_or_default())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "repository": repo.display().to_string(),
                "slots": slots,
            }))?
        );
        return Ok(());
    }
    super::emit(&slot_table(&slots))
}

/// The table `key list` prints: a `*` marks the slot this command was opened with.
fn slot_table(slots: &[SlotInfo]) -> String {
    let mut out = format!(
        "  {:<16}  {:<8}  {:<20}  {}\n",
        "ID", "KIND", "CREATED", "LABEL"
    );
    for s in slots {
        out.push_str(&format!(
            "{} {:<16}  {:<8}  {:<20}  {}\n",
            if s.current { '*' } else { ' ' },
            s.id,
            s.kind,
            s.created,
            s.label.as_deref().map(one_line).unwrap_or_default()
        ));
    }
    if slots.iter().any(|s| s.current) {
        out.push_str("* the key slot this command was opened with\n");
    }
    out
}

/// A label as one line of printable text (a label is the user's, but a slot file can be
/// edited: never let it move the terminal).
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn add(
    repo: &Path,
    password_file: Option<&Path>,
    key_file: Option<&Path>,
    label: Option<&str>,
) -> Result<()> {
    if let Some(l) = label
        && (l.is_empty() || l.len() > 200 || l.chars().any(char::is_control))
    {
        bail!("--label {l:?}: give 1 to 200 characters of plain text (no control characters)");
    }
    let r = open_encrypted(repo)?;
    let (secret, made) = new_secret(repo, password_file, key_file)?;
    let id = keys::add_slot(
        r.store().as_ref(),
        &r.header.id,
        r.keys(),
        &secret,
        label,
        KdfCost::from_env(),
    )?;
    println!(
        "added key slot {id} to repository {}: {} opens it from now on",
        repo.display(),
        describe(&secret, made)
    );
    Ok(())
}

fn remove(repo: &Path, id: &str) -> Result<()> {
    let r = open_encrypted(repo)?;
    if r.opened_slot() == Some(id) {
        bail!(
            "key slot {id} is the one this command was opened with; to remove it, open the repository with another key slot's password or key file (--repo-password-file FILE or --key-file FILE); nothing was changed"
        );
    }
    keys::remove_slot(r.store().as_ref(), id)?;
    println!(
        "removed key slot {id} from repository {}: its password or key file no longer opens it",
        repo.display()
    );
    Ok(())
}

fn passwd(repo: &Path, password_file: Option<&Path>, key_file: Option<&Path>) -> Result<()> {
    let r = open_encrypted(repo)?;
    let Some(old) = r.opened_slot().map(str::to_string) else {
        bail!("{}", not_encrypted(repo));
    };
    let slots = keys::list_slots(r.store().as_ref(), &old)?;
    let label = slots
        .iter()
        .find(|s| s.id == old)
        .and_then(|s| s.label.clone());
    let (secret, made) = new_secret(repo, password_file, key_file)?;
    // The new slot first: a crash in between leaves both, and either secret opens.
    let id = keys::add_slot(
        r.store().as_ref(),
        &r.header.id,
        r.keys(),
        &secret,
        label.as_deref(),
        KdfCost::from_env(),
    )?;
    keys::remove_slot(r.store().as_ref(), &old).with_context(|| {
        format!("the new key slot {id} was added, but the old key slot {old} could not be removed (remove it with `cbtfs key remove`)")
    })?;
    println!(
        "key slot {old} of repository {} replaced by key slot {id}: {} opens it now, the old secret no longer does",
        repo.display(),
        describe(&secret, made)
    );
    Ok(())
}

/// How messages name a secret (never its contents).
fn describe(secret: &Secret, made: bool) -> String {
    match secret {
        Secret::Password(_) => "the new password".into(),
        Secret::KeyFile { path, .. } => format!(
            "the key file {}{}",
            path.display(),
            if made { " (made now)" } else { "" }
        ),
    }
}

/// The new secret of `add` and `passwd`, and whether a key file was made for it.
fn new_secret(
    repo: &Path,
    password_file: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<(Secret, bool)> {
    match (password_file, key_file) {
        (Some(_), Some(_)) => {
            bail!("give either --new-password-file or --new-key-file, not both")
        }
        (None, Some(k)) => {
            if std::fs::symlink_metadata(k).is_ok() {
                Ok((Secret::read_key_file(k)?, false))
            } else {
                Ok((Secret::create_key_file(k)?, true))
            }
        }
        (Some(p), None) => Ok((Secret::Password(read_new_password(p)?), false)),
        (None, None) if std::io::stdin().is_terminal() => Ok((
            secret::prompt(
                &format!("new password for repository {}: ", repo.display()),
                true,
            )?,
            false,
        )),
        (None, None) => bail!(
            "no new secret: give --new-password-file FILE or --new-key-file FILE (made if it does not exist), or run on a terminal to type it; it is never taken from the command line"
        ),
    }
}

/// Longest password line read from a file.
const MAX_PASSWORD: u64 = 4096;

/// The first line of a password file (without its LF or CR LF); empty is refused.
fn read_new_password(path: &Path) -> Result<String> {
    let shown = path.display();
    let f = std::fs::File::open(path)
        .with_context(|| format!("reading the new password file {shown}"))?;
    let mut bytes = Vec::new();
    f.take(MAX_PASSWORD + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading the new password file {shown}"))?;
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() as u64 > MAX_PASSWORD {
        bail!(
            "the new password file {shown} has a first line longer than {MAX_PASSWORD} bytes: it does not look like a password file"
        );
    }
    let Ok(text) = std::str::from_utf8(line) else {
        bail!("the new password file {shown} does not hold UTF-8 text in its first line");
    };
    if text.is_empty() {
        bail!("the new password file {shown} is empty: its first line is the password");
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str, kind: &str, label: Option<&str>, current: bool) -> SlotInfo {
        SlotInfo {
            id: id.into(),
            kind: kind.into(),
            created: "2026-11-30T02:00:00Z".into(),
            label: label.map(Into::into),
            current,
        }
    }

    #[test]
    fn the_table_marks_the_slot_in_use() {
        let t = slot_table(&[
            slot("0123456789abcdef", "password", None, false),
            slot("fedcba9876543210", "keyfile", Some("safe\x1b[2J"), true),
        ]);
        assert_eq!(
            t,
            "  ID                KIND      CREATED               LABEL\n\
            \x20 0123456789abcdef  password  2026-11-30T02:00:00Z  \n\
             * fedcba9876543210  keyfile   2026-11-30T02:00:00Z  safe?[2J\n\
             * the key slot this command was opened with\n"
        );
    }

    #[test]
    fn password_files_give_their_first_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        std::fs::write(&p, "s3cret word\r\nsecond line\n").unwrap();
        assert_eq!(read_new_password(&p).unwrap(), "s3cret word");
        std::fs::write(&p, "").unwrap();
        let e = read_new_password(&p).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        std::fs::write(&p, vec![b'x'; 5000]).unwrap();
        let e = read_new_password(&p).unwrap_err().to_string();
        assert!(e.contains("longer than 4096"), "{e}");
        let e = read_new_password(&d.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
