//! What a job run did: the record `cbtfs job run` fills in, writes as JSON (the job's `report`
//! path), prints as a summary, sends to notifications and turns into metrics and an exit
//! status. One shape for all of them, so they can never disagree.

use serde::{Deserialize, Serialize};

/// The format of the report file; bumped when a field changes meaning.
pub const REPORT_FORMAT: &str = "cbtfs-job-report";
pub const REPORT_VERSION: u64 = 1;

/// How a whole run ended; also its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Every selected disk committed a point (and prune, copy, health passed). Exit 0.
    Ok,
    /// Some disks (or the prune, copy or health check) failed, others committed. Exit 3.
    Partial,
    /// Nothing was committed: every disk failed, no VM matched, or the run could not start
    /// (host unreachable, repository locked or damaged). Exit 4.
    Failed,
}

impl Outcome {
    /// The process exit status for this outcome (1 and 2 stay what they are for every other
    /// command: an error, a usage error).
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Ok => 0,
            Outcome::Partial => 3,
            Outcome::Failed => 4,
        }
    }
}

/// One disk's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskOutcome {
    pub vm: String,
    pub vm_uuid: String,
    /// The disk's name (its VDI's name label) and uuid.
    pub disk: String,
    pub vdi: String,
    /// True when a point was committed.
    pub ok: bool,
    /// `base` or `incremental` (None when it failed before deciding).
    pub kind: Option<String>,
    /// Why it was a base (a new set) rather than an incremental: first backup, CBT reset, ...
    pub reason: Option<String>,
    /// The committed point, `VM/DISK/SET/POINT` as `ls` shows it.
    pub point: Option<String>,
    /// Bytes read from the host.
    pub bytes_read: u64,
    /// Bytes stored in the repository (new, after dedup and compression).
    pub bytes_stored: u64,
    pub virtual_size: u64,
    pub seconds: f64,
    /// Why it failed (None when ok).
    pub error: Option<String>,
    /// Points of this disk kept after the run's prune (None when no prune ran).
    pub points_kept: Option<u64>,
    /// The health check's verdict on the new point (None when none ran).
    pub health: Option<HealthOutcome>,
    pub warnings: Vec<String>,
}

/// A health check's verdict on one point: each guest filesystem's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthOutcome {
    /// `clean`, `journal` (clean once its journal is replayed), `damaged`, or `unchecked`
    /// (no checker for that filesystem, or it could not run): the worst of the volumes.
    pub state: String,
    pub seconds: f64,
    pub volumes: Vec<VolumeHealth>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeHealth {
    /// The volume's name in the browse tree (e.g. `p1`, `vg0-root`).
    pub volume: String,
    /// `ext4`, `xfs`, ...
    pub filesystem: String,
    pub state: String,
    /// The checker run and the end of its output, for the admin.
    pub checker: String,
    pub detail: String,
}

/// A step after the backups (prune, copy) that can fail on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepOutcome {
    pub ok: bool,
    pub seconds: f64,
    /// What it did, in one line (points dropped, bytes copied), or why it failed.
    pub summary: String,
}

/// The record of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReport {
    pub format: String,
    pub version: u64,
    pub job: String,
    pub host: String,
    /// The repository as configured (path or `s3://` URL; never a secret).
    pub repository: String,
    /// RFC 3339, UTC.
    pub started: String,
    pub finished: String,
    pub seconds: f64,
    pub outcome: Outcome,
    /// VMs the selectors matched, after excludes.
    pub vms_selected: u64,
    pub disks: Vec<DiskOutcome>,
    /// Failures that are not one disk's: a VM whose disks could not be listed, the host
    /// unreachable, the repository locked.
    pub errors: Vec<String>,
    pub prune: Option<StepOutcome>,
    pub copy: Option<StepOutcome>,
    /// The repository's stored bytes after the run (None if it could not be measured).
    pub repository_bytes: Option<u64>,
    /// What the run changed or noticed that is not one disk's: fewer NBD connections per
    /// disk than configured (the host's limit), a VM without disks.
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl JobReport {
    /// The outcome the disks and steps imply: Ok when everything passed, Failed when no disk
    /// committed, Partial otherwise.
    pub fn judge(&self) -> Outcome {
        let committed = self.disks.iter().filter(|d| d.ok).count();
        if committed == 0 {
            return Outcome::Failed;
        }
        let steps_ok = self.prune.as_ref().is_none_or(|s| s.ok)
            && self.copy.as_ref().is_none_or(|s| s.ok)
            && self
                .disks
                .iter()
                .filter_map(|d| d.health.as_ref())
                .all(|h| h.state != "damaged");
        if committed == self.disks.len() && self.errors.is_empty() && steps_ok {
            Outcome::Ok
        } else {
            Outcome::Partial
        }
    }
}

/// Fixed, plausible reports for tests: the library's own and the integration tests' (one
/// builder, so their expectations agree). Not part of the API.
#[doc(hidden)]
pub mod sample {
    use super::*;

    /// The end of [`report`]'s run, 2026-11-30T02:10:00Z, in seconds since the epoch.
    pub const END: i64 = 1_796_004_600;

    /// Disk `name` of VM `vm` (VDI `vdi`): an incremental of 3 MiB read, 1 MiB stored, 2.5 s,
    /// 7 points kept when `ok`; else failed with `VM.snapshot: VM_NOT_FOUND`.
    pub fn disk(vm: &str, name: &str, vdi: &str, ok: bool) -> DiskOutcome {
        DiskOutcome {
            vm: vm.into(),
            vm_uuid: format!("{vm}-uuid"),
            disk: name.into(),
            vdi: vdi.into(),
            ok,
            kind: ok.then(|| "incremental".into()),
            reason: None,
            point: ok.then(|| format!("{vm}/{name}/1/2")),
            bytes_read: if ok { 3 << 20 } else { 0 },
            bytes_stored: if ok { 1 << 20 } else { 0 },
            virtual_size: 1 << 30,
            seconds: 2.5,
            error: (!ok).then(|| "VM.snapshot: VM_NOT_FOUND".into()),
            points_kept: ok.then_some(7),
            health: None,
            warnings: vec![],
        }
    }

    /// Job `nightly` on host `xs1` into `/backup/repo`, 2026-11-30 02:00:00 to 02:10:00 (600
    /// s), 2 VMs selected, the repository 5 GiB; its outcome judged from `disks`.
    pub fn report(disks: Vec<DiskOutcome>) -> JobReport {
        let mut r = JobReport {
            format: REPORT_FORMAT.into(),
            version: REPORT_VERSION,
            job: "nightly".into(),
            host: "xs1".into(),
            repository: "/backup/repo".into(),
            started: "2026-11-30T02:00:00Z".into(),
            finished: "2026-11-30T02:10:00Z".into(),
            seconds: 600.0,
            outcome: Outcome::Ok,
            vms_selected: 2,
            disks,
            errors: vec![],
            prune: None,
            copy: None,
            repository_bytes: Some(5 << 30),
            warnings: vec![],
        };
        r.outcome = r.judge();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::sample::report;
    use super::*;

    fn disk(ok: bool) -> DiskOutcome {
        sample::disk("web", "root", "v", ok)
    }

    #[test]
    fn outcome_follows_the_disks_and_steps() {
        assert_eq!(report(vec![disk(true), disk(true)]).judge(), Outcome::Ok);
        assert_eq!(
            report(vec![disk(true), disk(false)]).judge(),
            Outcome::Partial
        );
        assert_eq!(report(vec![disk(false)]).judge(), Outcome::Failed);
        assert_eq!(report(vec![]).judge(), Outcome::Failed);
        let mut r = report(vec![disk(true)]);
        r.prune = Some(StepOutcome {
            ok: false,
            seconds: 0.0,
            summary: "locked".into(),
        });
        assert_eq!(r.judge(), Outcome::Partial);
        let mut r = report(vec![disk(true)]);
        r.errors.push("vm x: gone".into());
        assert_eq!(r.judge(), Outcome::Partial);
        assert_eq!(Outcome::Partial.exit_code(), 3);
    }
}
