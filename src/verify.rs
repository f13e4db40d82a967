//! `cbtfs verify`: check every record, index and stored block; name each damaged one.

use serde::Serialize;

use crate::BLOCK_SIZE;
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
    pub blocks_checked: u64,
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

/// Verify the whole repository.
pub fn verify_all(repo: &Repository, report: &mut VerifyReport) -> crate::repo::Result<()> {
    for disk in repo.catalog()? {
        for set in &disk.sets {
            verify_set(repo, set, None, report);
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
    report: &mut VerifyReport,
) {
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
        verify_point(repo, m, report);
    }
}

fn verify_point(repo: &Repository, m: &PointManifest, report: &mut VerifyReport) {
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
    let mut push = |block: Option<u64>, location: &str, problem: String| {
        report.damage.push(Damage {
            point: Some(label.clone()),
            path: None,
            block,
            location: location.to_string(),
            problem,
        })
    };
    if !p.index.check_entries() {
        push(
            None,
            &p.data_location.replace(".data", ".idx"),
            "index entries fail their checksum".into(),
        );
    }
    let expected = m.data_blocks * BLOCK_SIZE;
    let data = match p.data() {
        Ok(d) => d.clone(),
        Err(e) => {
            push(
                None,
                &p.data_location,
                format!("data file cannot be opened: {e}"),
            );
            return;
        }
    };
    if data.len() != m.data.len || data.len() != expected {
        push(
            None,
            &p.data_location,
            format!(
                "data file is {} bytes, expected {expected} (truncated or extended)",
                data.len()
            ),
        );
    }
    // Read the data file front to back in large pieces, checking each block against its entry.
    const BATCH: usize = 64;
    let mut buf = vec![0u8; BATCH * BLOCK_SIZE as usize];
    // Walk the data bitmap alongside the entries (entry k is the k-th data block).
    let mut data_blocks = p.index.data.iter();
    let total = p.index.entry_count();
    let mut i = 0;
    while i < total {
        let n = BATCH.min(total - i);
        let blocks: Vec<u32> = data_blocks.by_ref().take(n).collect();
        let entries: Vec<_> = (i..i + n).filter_map(|k| p.index.entry(k)).collect();
        let contiguous = entries.len() == n
            && entries.iter().enumerate().all(|(k, e)| {
                e.len as u64 == BLOCK_SIZE && e.offset == entries[0].offset + k as u64 * BLOCK_SIZE
            });
        if contiguous
            && data
                .read_exact_at(&mut buf[..n * BLOCK_SIZE as usize], entries[0].offset)
                .is_ok()
        {
            for (k, e) in entries.iter().enumerate() {
                let chunk = &buf[k * BLOCK_SIZE as usize..(k + 1) * BLOCK_SIZE as usize];
                if crc32c::crc32c(chunk) != e.crc {
                    push(
                        Some(blocks[k] as u64),
                        &p.data_location,
                        "block fails its checksum".into(),
                    );
                }
            }
        } else {
            // Slow path: one block at a time, to name exactly which fail.
            for (k, &block) in blocks.iter().enumerate() {
                let block = block as u64;
                let Some(e) = p.index.entry(i + k) else {
                    push(Some(block), &p.data_location, "no index entry".into());
                    continue;
                };
                if e.len as u64 != BLOCK_SIZE {
                    push(
                        Some(block),
                        &p.data_location,
                        format!("impossible stored length {}", e.len),
                    );
                    continue;
                }
                let chunk = &mut buf[..BLOCK_SIZE as usize];
                match data.read_exact_at(chunk, e.offset) {
                    Ok(()) if crc32c::crc32c(chunk) == e.crc => {}
                    Ok(()) => push(
                        Some(block),
                        &p.data_location,
                        "block fails its checksum".into(),
                    ),
                    Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => push(
                        Some(block),
                        &p.data_location,
                        "block lies past the end of the data file (truncated)".into(),
                    ),
                    Err(err) => push(Some(block), &p.data_location, format!("unreadable: {err}")),
                }
            }
        }
        report.blocks_checked += n as u64;
        i += n;
    }
}
