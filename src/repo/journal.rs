//! The snapshot journal: what a backup is about to make on the host, written before it asks.
//!
//! `VDI.snapshot` creates an object on the host that only becomes recognisable as cbtfs's once
//! it is tagged (`other_config:cbtfs-repository`), one call later. A backup killed in between
//! would leave an untagged snapshot nobody removes. So before the call a backup writes, per
//! disk, a journal record naming the VDI, the snapshots it has right then and the newest of
//! their snapshot times (the host's clock); when the call returns it writes a second record that
//! adds the new snapshot's uuid; once the snapshot is tagged (or destroyed) both go. The next
//! backup of that disk reads what is left and removes what the killed run made (see
//! `backup::recover_snapshot_journal`).
//!
//! # Layout
//!
//! ```text
//! journal/<keyed name of the VDI>.1    before VDI.snapshot (no snapshot uuid yet)
//! journal/<keyed name of the VDI>.2    after it returned (with the uuid)
//! ```
//!
//! Each is a checksummed record (`manifest`), sealed, put with the store's atomic create-only
//! put: a crash leaves a whole record or none. The second is put before the first is deleted, so at
//! every moment at least one names what the host may hold. Records are small and written
//! under the repository lock.

use std::io;

use serde::{Deserialize, Serialize};

use super::error::{RepoError, Result};
use super::{DiskWriteLock, Repository, manifest, valid_uuid};

pub const JOURNAL_DIR: &str = "journal";
pub const JOURNAL_FORMAT: &str = "cbtfs-snapshot-journal";
pub const JOURNAL_VERSION: u64 = 1;

/// One disk's journal record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotJournal {
    pub format: String,
    pub version: u64,
    /// The VDI (uuid) being snapshotted.
    pub vdi: String,
    /// References of the VDI's snapshots right before `VDI.snapshot` was called.
    pub before: Vec<String>,
    /// The newest `snapshot_time` among them (Unix seconds, the host's clock): the snapshot the
    /// call makes is not older. None when the VDI had no snapshot.
    pub not_before: Option<i64>,
    /// The new snapshot's uuid, once the call returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// When the record was written (this machine's clock, RFC 3339), for humans.
    pub written: String,
}

impl SnapshotJournal {
    pub fn new(vdi: &str, before: Vec<String>, not_before: Option<i64>) -> SnapshotJournal {
        SnapshotJournal {
            format: JOURNAL_FORMAT.into(),
            version: JOURNAL_VERSION,
            vdi: vdi.to_string(),
            before,
            not_before,
            snapshot: None,
            written: crate::timefmt::rfc3339(crate::timefmt::now()),
        }
    }
}

impl Repository {
    fn journal_key(&self, vdi: &str, stage: u8) -> String {
        format!(
            "{JOURNAL_DIR}/{}.{stage}",
            self.keys().name_key("journal", vdi)
        )
    }
}

fn check_vdi(vdi: &str) -> Result<()> {
    if valid_uuid(vdi) {
        Ok(())
    } else {
        Err(RepoError::Invalid(format!("{vdi:?} is not a VDI uuid")))
    }
}

impl Repository {
    /// What a killed backup of `vdi` left: the newest stage's record, or None. A record that
    /// does not decode, or names another disk, is an error naming the object.
    pub fn snapshot_journal(&self, vdi: &str) -> Result<Option<SnapshotJournal>> {
        check_vdi(vdi)?;
        for stage in [2, 1] {
            let k = self.journal_key(vdi, stage);
            let loc = self.describe(&k);
            match self.store().get(&k) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(RepoError::io("read", loc, e)),
            }
            let bytes = self.get_sealed(&k, "journal", None)?;
            let j: SnapshotJournal = manifest::decode(
                &bytes,
                &loc,
                "snapshot journal",
                JOURNAL_FORMAT,
                JOURNAL_VERSION,
            )?;
            if j.vdi != vdi || j.snapshot.is_some() != (stage == 2) {
                return Err(RepoError::corrupt(
                    &loc,
                    format!("it names disk {:?} at the wrong stage", j.vdi),
                ));
            }
            return Ok(Some(j));
        }
        Ok(None)
    }

    /// Durably record `j` (stage 1 without a snapshot uuid, stage 2 with one). Stage 2 is put
    /// before stage 1 is deleted.
    pub fn put_snapshot_journal(
        &self,
        lock: &dyn DiskWriteLock,
        j: &SnapshotJournal,
    ) -> Result<()> {
        check_vdi(&j.vdi)?;
        lock.check_disk(&j.vdi)?;
        let stage = if j.snapshot.is_some() { 2 } else { 1 };
        let k = self.journal_key(&j.vdi, stage);
        // A stage-1 record of an earlier attempt that died before `VDI.snapshot` returned is
        // replaced: the caller read and handled it first.
        self.delete(&k)?;
        self.put_sealed(&k, "journal", &manifest::encode(j))?;
        if stage == 2 {
            self.delete(&self.journal_key(&j.vdi, 1))?;
        }
        Ok(())
    }

    /// Forget `vdi`'s journal: what it named is tagged or gone.
    pub fn clear_snapshot_journal(&self, lock: &dyn DiskWriteLock, vdi: &str) -> Result<()> {
        check_vdi(vdi)?;
        lock.check_disk(vdi)?;
        // Stage 2 first: a crash in between leaves stage 1 alone, which names only snapshots
        // that are untagged, and this one is tagged or destroyed by now.
        self.delete(&self.journal_key(vdi, 2))?;
        self.delete(&self.journal_key(vdi, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VDI: &str = "3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b";

    #[test]
    fn stages_replace_each_other_and_clear_removes_both() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        let repo = crate::repo::testing::init(&root);
        let lock = repo.lock_exclusive("test").unwrap();
        assert_eq!(repo.snapshot_journal(VDI).unwrap(), None);
        let mut j = SnapshotJournal::new(VDI, vec!["OpaqueRef:a".into()], Some(5));
        repo.put_snapshot_journal(&lock, &j).unwrap();
        assert_eq!(repo.snapshot_journal(VDI).unwrap(), Some(j.clone()));
        j.snapshot = Some("0f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b".into());
        repo.put_snapshot_journal(&lock, &j).unwrap();
        assert_eq!(repo.snapshot_journal(VDI).unwrap(), Some(j.clone()));
        assert!(!root.join(repo.journal_key(VDI, 1)).exists());
        // Records are sealed and named by a keyed hash: the disk's uuid is not in the name.
        assert!(!repo.journal_key(VDI, 2).contains(VDI));
        repo.clear_snapshot_journal(&lock, VDI).unwrap();
        assert_eq!(repo.snapshot_journal(VDI).unwrap(), None);
        // Clearing twice is harmless.
        repo.clear_snapshot_journal(&lock, VDI).unwrap();
        // A damaged record is named, never trusted.
        let other = "4f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b";
        repo.put_snapshot_journal(&lock, &SnapshotJournal::new(other, vec![], None))
            .unwrap();
        let key = repo.journal_key(other, 1);
        let p = root.join(&key);
        let mut b = std::fs::read(&p).unwrap();
        b[30] ^= 1;
        std::fs::write(&p, &b).unwrap();
        let e = repo.snapshot_journal(other).unwrap_err().to_string();
        assert!(e.contains(&key), "{e}");
        // A record filed under another disk's name is refused.
        std::fs::remove_file(&p).unwrap();
        let j2 = SnapshotJournal::new(VDI, vec![], None);
        let sealed = repo
            .keys()
            .seal(&crate::repo::aad("journal", &key), &manifest::encode(&j2));
        std::fs::write(&p, sealed).unwrap();
        assert!(repo.snapshot_journal(other).is_err());
        assert!(repo.snapshot_journal("../x").is_err());
    }
}
