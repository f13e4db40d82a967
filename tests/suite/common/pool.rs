//! A simulated pool of several VMs (tags, a template; the host's control domain is always
//! there), a job configuration written for it, and `cbtfs job run` against it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cbtfs::sim::{Sim, SimConfig};
use serde_json::Value;

use super::{BS, Bounded, TestRng, ok, s};

/// One VM to create: name, tags, disks (name, size in 64 KiB blocks).
pub struct VmSpec<'a> {
    pub name: &'a str,
    pub tags: &'a [&'a str],
    pub disks: &'a [(&'a str, usize)],
    pub template: bool,
}

pub struct SimPool {
    pub sim: Sim,
    pub dir: tempfile::TempDir,
    pub pw: PathBuf,
    pub repo: PathBuf,
    /// `VM/DISK` → VDI uuid.
    pub vdis: BTreeMap<String, String>,
}

/// The outcome of one `cbtfs job run`.
pub struct Run {
    pub code: i32,
    /// The report file's JSON.
    pub report: Value,
    pub stdout: String,
    pub stderr: String,
}

impl SimPool {
    /// A host whose pool is named `pool`, with these VMs; every disk holds random bytes
    /// (seeded, different per disk) except a zero block in the middle.
    pub fn start(pool: &str, vms: &[VmSpec<'_>], cfg: impl FnOnce(&mut SimConfig)) -> SimPool {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SimConfig::new(&dir.path().join("sim"));
        cfg(&mut c);
        let pw = dir.path().join("host.password");
        std::fs::write(&pw, format!("{}\n", c.password)).unwrap();
        let sim = Sim::start(c).unwrap();
        let mut rng = TestRng::new(0x5eed);
        let mut vdis = BTreeMap::new();
        for vm in vms {
            let mut images = Vec::new();
            for (disk, blocks) in vm.disks {
                let mut data = vec![0u8; blocks * BS];
                rng.fill(&mut data);
                let mid = blocks / 2 * BS;
                data[mid..mid + BS].fill(0);
                let p = dir.path().join(format!("{}-{disk}.img", vm.name));
                std::fs::write(&p, &data).unwrap();
                images.push((*disk, p));
            }
            let list: Vec<(&str, &Path)> = images.iter().map(|(d, p)| (*d, p.as_path())).collect();
            let (_, uuids) = sim.add_vm(vm.name, &list).unwrap();
            for ((disk, _), uuid) in vm.disks.iter().zip(uuids) {
                vdis.insert(format!("{}/{disk}", vm.name), uuid);
            }
            sim.with(|st| {
                for t in vm.tags {
                    st.tag_vm(vm.name, t);
                }
                if vm.template {
                    st.make_template(vm.name);
                }
            });
        }
        sim.with(|st| st.pool_name = pool.to_string());
        let repo = dir.path().join("repo");
        ok(&["init", s(&repo)]);
        SimPool {
            sim,
            dir,
            pw,
            repo,
            vdis,
        }
    }

    /// A repository besides the main one (made now).
    pub fn second_repo(&self, name: &str) -> PathBuf {
        let r = self.dir.path().join(name);
        ok(&["init", s(&r)]);
        r
    }

    /// Write a configuration with host `xs1` (this host, or `url` instead), repository
    /// `main` (and `more`, extra sections verbatim) and the `jobs` text; returns its path.
    pub fn config(&self, url: Option<&str>, more: &str, jobs: &str) -> PathBuf {
        let text = format!(
            "[host.xs1]\nurl = \"{url}\"\nuser = \"root\"\npassword_file = \"{pw}\"\ntimeout = 30\n\n\
             [repository.main]\npath = \"{repo}\"\nkey_file = \"{key}\"\n\n{more}\n{jobs}\n",
            url = url.unwrap_or(&self.sim.url),
            pw = self.pw.display(),
            repo = self.repo.display(),
            key = super::key_file().display(),
        );
        let p = self.dir.path().join("cbtfs.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    /// The report path jobs of `config` should name.
    pub fn report_path(&self, job: &str) -> PathBuf {
        self.dir.path().join(format!("{job}.json"))
    }

    /// `cbtfs job run JOB --config CONFIG`; the report file is read (and removed, so the
    /// next run's is its own).
    pub fn run(&self, config: &Path, job: &str) -> Run {
        let o = super::cbtfs_cmd()
            .args(["job", "run", job, "--config", s(config)])
            .env("RUST_LOG", "warn")
            .bounded()
            .unwrap();
        let rp = self.report_path(job);
        let text = std::fs::read_to_string(&rp).unwrap_or_else(|e| {
            panic!(
                "no report at {} ({e}): {}{}",
                rp.display(),
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&o.stdout)
            )
        });
        std::fs::remove_file(&rp).unwrap();
        Run {
            code: o.status.code().unwrap_or(-1),
            report: serde_json::from_str(&text).unwrap(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// The point `point` (`VM/DISK/SET/POINT`) of the main repository, exported, equals
    /// `want` block for block.
    pub fn assert_point(&self, point: &str, want: &[u8]) {
        let out = self.dir.path().join("export.raw");
        ok(&["export", s(&self.repo), point, s(&out), "--force"]);
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), want.len(), "{point}: size");
        if let Some(b) = got
            .chunks(BS)
            .zip(want.chunks(BS))
            .position(|(a, b)| a != b)
        {
            panic!("{point}: block {b} differs from the disk");
        }
    }

    /// A disk's bytes as the guest sees them now, by `VM/DISK`.
    pub fn disk(&self, vm_disk: &str) -> Vec<u8> {
        self.sim.read_vdi(&self.vdis[vm_disk]).unwrap()
    }
}

impl Run {
    /// The report's disks as `VM/DISK` → the disk's outcome.
    pub fn disks(&self) -> BTreeMap<String, Value> {
        self.report["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    format!(
                        "{}/{}",
                        d["vm"].as_str().unwrap(),
                        d["disk"].as_str().unwrap()
                    ),
                    d.clone(),
                )
            })
            .collect()
    }

    pub fn text(&self) -> String {
        format!(
            "exit {}\n{}\n{}\n{}",
            self.code,
            self.stderr,
            self.stdout,
            serde_json::to_string_pretty(&self.report).unwrap()
        )
    }
}
