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
    if let Some(s3) = repo.store().s3() {
        verify_object_versions(s3, report)?;
    }
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
            // The objects as stored now (not the local cache's copies), plus any the load
            // skipped that are gone or unlisted by now.
            let mut problems = ci.check_stored()?;
            for p in ci.problems() {
                if !problems.iter().any(|(l, _)| *l == p.0) {
                    problems.push(p.clone());
                }
            }
            for (location, problem) in problems {
                report.damage.push(Damage {
                    point: None,
                    path: None,
                    block: None,
                    location,
                    problem,
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
    verify_pack_trailers(repo, report)?;
    let mut checked = Checked::new();
    for disk in repo.catalog()? {
        for set in &disk.sets {
            verify_set(repo, set, None, opts, &mut checked, report);
        }
    }
    Ok(())
}

/// On a versioned S3 bucket: every object deleted (a delete marker cbtfs did not make) or
/// overwritten (its current version is not the one cbtfs wrote) behind cbtfs's back, with how
/// to undo it (`store::s3::lock`). Objects hidden so are invisible to every other check (a
/// listing no longer shows them), so this is the only way to see them.
pub fn verify_object_versions(
    store: &crate::repo::store::s3::S3Store,
    report: &mut VerifyReport,
) -> crate::repo::Result<()> {
    use crate::repo::store::Store as _;
    match store.versioning_enabled() {
        Ok(true) => {}
        Ok(false) => return Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell whether the bucket keeps object versions; deleted or overwritten objects are not looked for");
            return Ok(());
        }
    }
    let found = crate::repo::store::s3::lock::find_damage(store).map_err(|e| {
        crate::repo::RepoError::io("list the object versions of", store.describe(""), e)
    })?;
    for d in found {
        report.damage.push(Damage {
            point: None,
            path: None,
            block: None,
            location: store.describe(&d.key),
            problem: d.describe(store),
        });
    }
    Ok(())
}

/// Authenticate every pack's trailer (its list of chunks, what rebuilds the chunk index if
/// that is lost): reads never use it, so only this finds damage to it, a cut-short pack, or a
/// pack replaced by another's bytes (the trailer is bound to its pack's name). Two small
/// ranged reads per pack.
fn verify_pack_trailers(repo: &Repository, report: &mut VerifyReport) -> crate::repo::Result<()> {
    use crate::repo::pack::{self, PackId};
    let store = repo.store();
    let listed = store
        .list(PACKS)
        .map_err(|e| crate::repo::RepoError::io("list", store.describe(PACKS), e))?;
    for o in listed {
        let problem = match PackId::from_key(&o.key) {
            None => Some("its name is not packs/<2 hex>/<32 hex>, as cbtfs names packs".into()),
            Some(id) => match pack::read_pack_chunks(store.as_ref(), repo.keys(), id, o.len) {
                Ok(_) => None,
                // Deleted since the listing (gc): not damage.
                Err(crate::repo::RepoError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(crate::repo::RepoError::Corrupt { detail, .. }) => Some(detail),
                Err(e) => Some(e.to_string()),
            },
        };
        if let Some(problem) = problem {
            report.damage.push(Damage {
                point: None,
                path: None,
                block: None,
                location: store.describe(&o.key),
                problem,
            });
        }
    }
    Ok(())
}

const PACKS: &str = "packs/";

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
    // A point whose index cannot be opened makes every point above it unreadable too (their
    // reads need it): each is named, not only the damaged one.
    let mut broken: Option<String> = None;
    for m in &set.points[..n] {
        if let Some(below) = &broken {
            report.damage.push(Damage {
                point: Some(m.label()),
                path: None,
                block: None,
                location: String::new(),
                problem: format!(
                    "unreadable: point {below} below it in its set is damaged (its own objects are checked below)"
                ),
            });
        }
        if !verify_point(repo, m, opts, checked, report) && broken.is_none() {
            broken = Some(m.label());
        }
    }
}

/// A fresh `Checked` for one `verify_set` call.
pub fn checked() -> Checked {
    Checked::new()
}

/// Check one point; false when its index could not be opened (points above it cannot be read).
fn verify_point(
    repo: &Repository,
    m: &PointManifest,
    opts: &VerifyOptions,
    checked: &mut Checked,
    report: &mut VerifyReport,
) -> bool {
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
            return false;
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
        return false;
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
    true
}

/// Chunks per read while verifying.
const GROUP: u64 = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::testing;
    use std::path::Path;

    const VDI: &str = "00000000-0000-4000-8000-00000000000c";
    const BS: usize = BLOCK_SIZE as usize;

    fn write(repo: &Repository, time: i64, new_set: bool, bytes: &[u8]) -> PointManifest {
        let lock = repo.lock_exclusive("test").unwrap();
        let spec = testing::bare_point(VDI, time, 4 * BLOCK_SIZE, new_set);
        let mut w = repo.begin_point(&lock, spec).unwrap();
        w.add_run(0, bytes, true).unwrap();
        w.commit().unwrap()
    }

    fn image(seed: u8, blocks: usize) -> Vec<u8> {
        (0..blocks * BS)
            .map(|i| {
                (i as u8)
                    .wrapping_mul(seed)
                    .wrapping_add((i / BS) as u8 + 1)
            })
            .collect()
    }

    fn flip(p: &Path, at: usize) {
        let mut b = std::fs::read(p).unwrap();
        b[at] ^= 4;
        std::fs::write(p, b).unwrap();
    }

    fn run(repo: &Repository) -> VerifyReport {
        let mut r = VerifyReport::default();
        verify_all(repo, &VerifyOptions::default(), &mut r).unwrap();
        r
    }

    /// Regression: verify read the chunk index through this machine's cache (copies checked
    /// when made), so a damaged stored object was reported ok; and it never read pack trailers.
    #[test]
    fn a_damaged_stored_chunk_index_object_or_pack_trailer_is_found_despite_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let repo = testing::init(&root);
        let m = write(&repo, 1_000, true, &image(3, 4));
        // A handle that loaded (and cached) the chunk index, as a long-running reader has.
        let r = testing::open(&root);
        assert!(run(&r).ok());
        let ci = std::fs::read_dir(root.join("cindex"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let saved = std::fs::read(&ci).unwrap();
        flip(&ci, saved.len() / 2);
        let rep = run(&r);
        assert!(
            rep.damage.iter().any(|x| x.location.contains("cindex/")),
            "{:?}",
            rep.damage
        );
        std::fs::write(&ci, &saved).unwrap();
        assert!(run(&r).ok());
        // The pack's trailer: the last byte of its seal (just before the 12-byte tail).
        let (key, _) = r.locate_block(&m, 0).unwrap().unwrap();
        let pack = root.join(&key);
        let len = std::fs::metadata(&pack).unwrap().len() as usize;
        flip(&pack, len - 13);
        let rep = run(&r);
        assert_eq!(rep.damage.len(), 1, "{:?}", rep.damage);
        assert!(rep.damage[0].location.contains(&key), "{:?}", rep.damage);
        assert!(
            rep.damage[0].problem.contains("trailer"),
            "{:?}",
            rep.damage
        );
    }

    #[test]
    fn points_above_a_point_whose_index_is_damaged_are_named_unreadable() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        let repo = testing::init(&root);
        write(&repo, 1_000, true, &image(3, 4));
        let m1 = write(&repo, 2_000, false, &image(5, 1));
        let m2 = write(&repo, 3_000, false, &image(7, 1));
        let idx = root.join(&m1.index.key);
        let n = std::fs::metadata(&idx).unwrap().len() as usize;
        flip(&idx, n / 2);
        let rep = run(&testing::open(&root));
        let named: Vec<&str> = rep
            .damage
            .iter()
            .filter_map(|x| x.point.as_deref())
            .collect();
        assert_eq!(named, [m1.label(), m2.label()], "{:?}", rep.damage);
        assert!(
            rep.damage[1].problem.contains("unreadable"),
            "{:?}",
            rep.damage
        );
    }
}
