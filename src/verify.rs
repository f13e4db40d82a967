//! `cbtfs verify`: check every record, index and stored block; name each damaged one.

use serde::Serialize;

use std::collections::HashMap;

use crate::BLOCK_SIZE;
use crate::repo::crypto::ChunkId;
use crate::repo::{PointManifest, Repository, SetHistory};

#[derive(Debug, Clone, Serialize)]
pub struct Damage {
    /// `VDI@TIME` of the point, when known.
    pub point: Option<String>,
    /// The point's canonical name, `VM/DISK/SET/POINT`, when known (`VerifyReport::name_points`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The damaged block, when the damage is one block.
    pub block: Option<u64>,
    /// The file concerned.
    pub location: String,
    pub problem: String,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyReport {
    pub points_checked: u64,
    /// Chunks read and authenticated.
    pub blocks_checked: u64,
    /// Block references resolved to a stored chunk.
    pub references_checked: u64,
    /// The share of chunks read, when `--sample` asked for part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_percent: Option<f64>,
    pub damage: Vec<Damage>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.damage.is_empty()
    }

    /// Fill in the canonical name of each damaged point that `tree` holds.
    pub fn name_points(&mut self, tree: &crate::naming::Tree) {
        for d in &mut self.damage {
            if let Some(m) = d.point.as_deref().and_then(|l| tree.find_label(l)) {
                d.path = Some(tree.name_of(m));
            }
        }
    }
}

/// What `verify` reads.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Read only about this percentage of the chunks (chosen at random each run); every
    /// reference and every manifest and index is still checked. None: read everything.
    pub sample_percent: Option<f64>,
}

/// Chunks already read in this run: shared chunks are read once, whatever references them.
#[derive(Default)]
pub struct Checked {
    seen: HashMap<ChunkId, Option<(String, String)>>,
    salt: u64,
}

impl Checked {
    fn new() -> Checked {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        Checked {
            seen: HashMap::new(),
            salt: u64::from_le_bytes(b),
        }
    }
    /// Whether this run's sample reads chunk `id`.
    fn sampled(&self, id: &ChunkId, opts: &VerifyOptions) -> bool {
        match opts.sample_percent {
            None => true,
            Some(p) => {
                let mut x = [0u8; 8];
                x.copy_from_slice(&id.0[..8]);
                // Ids are uniformly distributed keyed hashes; the salt picks a new sample
                // every run.
                let v = (u64::from_le_bytes(x) ^ self.salt) % 1_000_000;
                (v as f64) < p * 10_000.0
            }
        }
    }
}

/// Verify the whole repository.
pub fn verify_all(
    repo: &Repository,
    opts: &VerifyOptions,
    report: &mut VerifyReport,
) -> crate::repo::Result<()> {
    for p in repo.damaged_manifests()? {
        report.damage.push(Damage {
            point: None,
            path: None,
            block: None,
            location: p.location,
            problem: p.message,
        });
    }
    match repo.chunk_index() {
        Ok(ci) => {
            for (location, problem) in ci.problems() {
                report.damage.push(Damage {
                    point: None,
                    path: None,
                    block: None,
                    location: location.clone(),
                    problem: problem.clone(),
                });
            }
        }
        Err(e) => report.damage.push(Damage {
            point: None,
            path: None,
            block: None,
            location: String::new(),
            problem: e.to_string(),
        }),
    }
    let mut checked = Checked::new();
    for disk in repo.catalog()? {
        for set in &disk.sets {
            verify_set(repo, set, None, opts, &mut checked, report);
        }
    }
    Ok(())
}

/// Verify points `0..=upto` of a set (all of it when `upto` is None): a point's reads depend on
/// every point below it.
pub fn verify_set(
    repo: &Repository,
    set: &SetHistory,
    upto: Option<u32>,
    opts: &VerifyOptions,
    checked: &mut Checked,
    report: &mut VerifyReport,
) {
    if opts.sample_percent.is_some() {
        report.sample_percent = opts.sample_percent;
    }
    for p in &set.problems {
        report.damage.push(Damage {
            point: None,
            path: None,
            block: None,
            location: p.location.clone(),
            problem: p.message.clone(),
        });
    }
    let n = upto.map_or(set.points.len(), |k| (k as usize + 1).min(set.points.len()));
    for m in &set.points[..n] {
        verify_point(repo, m, opts, checked, report);
    }
}

/// A fresh `Checked` for one `verify_set` call.
pub fn checked() -> Checked {
    Checked::new()
}

fn verify_point(
    repo: &Repository,
    m: &PointManifest,
    opts: &VerifyOptions,
    checked: &mut Checked,
    report: &mut VerifyReport,
) {
    report.points_checked += 1;
    let label = m.label();
    let p = match repo.open_point(m) {
        Ok(p) => p,
        Err(e) => {
            report.damage.push(Damage {
                point: Some(label),
                path: None,
                block: None,
                location: String::new(),
                problem: e.to_string(),
            });
            return;
        }
    };
    if let Some(Err(e)) = m.vm_metadata.as_ref().map(|_| repo.read_vm_metadata(m)) {
        report.damage.push(Damage {
            point: Some(label.clone()),
            path: None,
            block: None,
            location: String::new(),
            problem: format!("its VM metadata: {e}"),
        });
    }
    let mut push = |block: Option<u64>, location: &str, problem: String| {
        report.damage.push(Damage {
            point: Some(label.clone()),
            path: None,
            block,
            location: location.to_string(),
            problem,
        })
    };
    let blocks: Vec<u32> = p.index.data.iter().collect();
    let total = p.index.entry_count();
    if blocks.len() != total {
        push(
            None,
            &p.index_location,
            "index entries do not match its bitmap".into(),
        );
        return;
    }
    let mut buf = vec![0u8; (GROUP * BLOCK_SIZE) as usize];
    let mut i = 0;
    while i < total {
        let n = GROUP.min((total - i) as u64) as usize;
        // References first (cheap), then the sampled chunks not read yet.
        let mut to_read: Vec<(usize, ChunkId)> = Vec::new();
        for (k, &b) in blocks.iter().enumerate().skip(i).take(n) {
            let block = u64::from(b);
            let Some(id) = p.index.entry(k) else {
                push(Some(block), &p.index_location, "has no index entry".into());
                continue;
            };
            report.references_checked += 1;
            match checked.seen.get(&id) {
                Some(Some((loc, problem))) => {
                    push(Some(block), loc, problem.clone());
                    continue;
                }
                Some(None) => continue,
                None => {}
            }
            match repo.locate(&id) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    let problem = format!("is chunk {id}, which no pack index lists (missing)");
                    let loc = repo.store().describe("cindex/");
                    push(Some(block), &loc, problem.clone());
                    checked.seen.insert(id, Some((loc, problem)));
                    continue;
                }
                Err(e) => {
                    push(Some(block), "", e.to_string());
                    continue;
                }
            }
            if checked.sampled(&id, opts) {
                to_read.push((k, id));
            }
        }
        // Read in runs of consecutive entries (adjacent in packs, usually).
        let mut a = 0;
        while a < to_read.len() {
            let ids: Vec<ChunkId> = to_read[a..].iter().map(|(_, id)| *id).collect();
            match repo.read_chunks(&ids, &mut buf[..ids.len() * BLOCK_SIZE as usize]) {
                Ok(()) => {
                    for (_, id) in &to_read[a..] {
                        checked.seen.insert(*id, None);
                    }
                    report.blocks_checked += ids.len() as u64;
                    a = to_read.len();
                }
                Err(f) => {
                    for (_, id) in &to_read[a..a + f.at] {
                        checked.seen.insert(*id, None);
                    }
                    let (k, id) = to_read[a + f.at];
                    push(Some(u64::from(blocks[k])), &f.location, f.problem.clone());
                    checked.seen.insert(id, Some((f.location, f.problem)));
                    report.blocks_checked += f.at as u64 + 1;
                    a += f.at + 1;
                }
            }
        }
        i += n;
    }
}

/// Chunks per read while verifying.
const GROUP: u64 = 64;
