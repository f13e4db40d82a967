//! A simulated XenServer host with one VM and one disk, and the `cbtfs backup` runs the tests
//! make against it (the real binary, JSON output).

use std::path::PathBuf;
use std::process::{Child, Output, Stdio};

use cbtfs::sim::{Sim, SimConfig};
use serde_json::Value;

use super::{BS, Bounded, ok, s};

pub struct SimHost {
    pub sim: Sim,
    pub dir: tempfile::TempDir,
    /// The file holding the host's password.
    pub pw: PathBuf,
    /// The disk's VDI uuid.
    pub vdi: String,
}

/// A command's stderr then stdout, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    )
}

impl SimHost {
    /// A host configured by `cfg`, with VM `vm1` whose disk `root` starts as `disk`.
    pub fn start(cfg: impl FnOnce(&mut SimConfig), disk: &[u8]) -> SimHost {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SimConfig::new(&dir.path().join("sim"));
        cfg(&mut c);
        let pw = dir.path().join("password");
        std::fs::write(&pw, format!("{}\n", c.password)).unwrap();
        let sim = Sim::start(c).unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, disk).unwrap();
        let (_, vdis) = sim.add_vm("vm1", &[("root", &img)]).unwrap();
        SimHost {
            sim,
            dir,
            pw,
            vdi: vdis[0].clone(),
        }
    }

    /// The repository (made on first use).
    pub fn repo(&self) -> PathBuf {
        let r = self.dir.path().join("repo");
        if !r.exists() {
            ok(&["init", s(&r)]);
        }
        r
    }

    /// `cbtfs backup --json` with `extra`, which holds the selection (`--vdi`, `--vm`).
    pub fn backup(&self, extra: &[&str]) -> Output {
        super::cbtfs_cmd()
            .args(["backup", s(&self.repo()), "--host", &self.sim.url])
            .args(["--password-file", s(&self.pw), "--json"])
            .args(extra)
            .bounded()
            .unwrap()
    }

    /// A backup of the disk started in the background, its output discarded (to be killed).
    pub fn spawn_backup(&self) -> Child {
        super::cbtfs_cmd()
            .args(["backup", s(&self.repo()), "--host", &self.sim.url])
            .args(["--password-file", s(&self.pw), "--vdi", &self.vdi])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// A backup that must fail; its stderr and stdout.
    pub fn backup_fails(&self, extra: &[&str]) -> String {
        let o = self.backup(extra);
        assert!(
            !o.status.success(),
            "backup unexpectedly succeeded: {}",
            text(&o)
        );
        text(&o)
    }

    /// A backup of the disk that must succeed: its disk report and the run's stderr.
    pub fn backup_ok(&self, extra: &[&str]) -> (Value, String) {
        let o = self.backup(&[&["--vdi", self.vdi.as_str()], extra].concat());
        assert!(o.status.success(), "backup failed: {}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        (
            v["disks"][0].clone(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// A backup of the disk that must fail; its stderr and stdout.
    pub fn backup_disk_fails(&self, extra: &[&str]) -> String {
        self.backup_fails(&[&["--vdi", self.vdi.as_str()], extra].concat())
    }

    /// The point a disk report names, exported with `cbtfs export`, equals the disk as it is
    /// now, block for block.
    pub fn assert_point_is_disk(&self, report: &Value) {
        let out = self.dir.path().join("export.raw");
        let point = report["point"].as_str().unwrap();
        ok(&["export", s(&self.repo()), point, s(&out), "--force"]);
        let got = std::fs::read(&out).unwrap();
        let want = self.sim.read_vdi(&self.vdi).unwrap();
        assert_eq!(got.len(), want.len(), "{point}: size");
        if let Some(b) = got
            .chunks(BS)
            .zip(want.chunks(BS))
            .position(|(a, b)| a != b)
        {
            panic!("{point}: block {b} differs from the disk");
        }
    }
}
