//! `cbtfs copy SRC DST`: open both repositories (each with its own secret), copy, and say what
//! was copied.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, bail};
use serde_json::json;

use super::secret::{self, SecretSources, TO_NAMES};
use super::text::{count, plural};
use super::{Done, human, open};
use crate::copy::{CopiedPoint, CopyRequest, Event};
use crate::repo::Repository;

/// The destination's secret: from its own flags and variables only (never the source's), or a
/// prompt on a terminal.
fn open_destination(dst: &Path, to: &SecretSources) -> Result<Repository> {
    let header = Repository::probe(dst)?;
    if header.encryption == crate::repo::ENCRYPTION_NONE {
        return Ok(Repository::open(dst, None)?);
    }
    let purpose = format!("to open the destination repository {}", dst.display());
    let s = match secret::resolve_named(to, &TO_NAMES, &purpose)? {
        Some(s) => s,
        None if std::io::stdin().is_terminal() => secret::prompt(
            &format!("password of destination repository {}: ", dst.display()),
            false,
        )?,
        None => bail!(
            "the destination repository {} is encrypted: give its secret with --to-key-file FILE or --to-repo-password-file FILE (or CBTFS_TO_KEY_FILE, CBTFS_TO_REPO_PASSWORD_FILE, CBTFS_TO_REPO_PASSWORD); the source's secret is not used for it. Nothing was copied",
            dst.display()
        ),
    };
    Ok(Repository::open(dst, Some(&s))?)
}

fn point_line(p: &CopiedPoint, dry_run: bool) -> String {
    let at = crate::naming::with_label(Some(&p.path), &p.label);
    if dry_run {
        return format!(
            "would copy {at}: {} to read{}",
            plural(p.blocks_read, "block", "blocks"),
            if p.new_set { ", a new set" } else { "" }
        );
    }
    format!(
        "copied {at}: {} read, {} ({} stored){}",
        plural(p.blocks_read, "block", "blocks"),
        plural(p.new_chunks, "new chunk", "new chunks"),
        human(p.new_stored_bytes),
        if p.new_set {
            format!(", new set {}", p.dst_set)
        } else {
            String::new()
        }
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    src: &Path,
    dst: &Path,
    vms: Vec<String>,
    since: Option<String>,
    dry_run: bool,
    to: &SecretSources,
    json: bool,
    done: &Done,
) -> Result<ExitCode> {
    let since = match since {
        Some(s) => Some(
            crate::timefmt::parse(&s)
                .map_err(|e| anyhow::anyhow!("--since {s}: {e}; nothing was copied"))?,
        ),
        None => None,
    };
    let source = open(src)?;
    let destination = open_destination(dst, to)?;
    let req = CopyRequest {
        vms,
        since,
        dry_run,
    };
    // Progress on a terminal: one line per point being copied, rewritten in place.
    let tty = !json && std::io::stderr().is_terminal();
    let mut shown: Option<(String, std::time::Instant, std::time::Instant)> = None;
    let r = crate::copy::copy(&source, &destination, &req, |e| match e {
        Event::Blocks { path, done, total } if tty => {
            let now = std::time::Instant::now();
            let (started, last) = match &mut shown {
                Some((p, started, last)) if p == path => (*started, last),
                _ => {
                    shown = Some((path.to_string(), now, now));
                    return;
                }
            };
            if now.duration_since(*last).as_millis() >= 200 || done >= total {
                *last = now;
                let bs = crate::BLOCK_SIZE;
                eprint!(
                    "\r\x1b[K{}",
                    super::text::progress_line(
                        path,
                        done.saturating_mul(bs),
                        total.saturating_mul(bs),
                        now.duration_since(started).as_secs_f64()
                    )
                );
            }
        }
        Event::Blocks { .. } => {}
        Event::Copied(p) => {
            if shown.take().is_some() {
                eprint!("\r\x1b[K");
            }
            if !dry_run {
                done.add(json!({ "point": p.path, "label": p.label, "dst_set": p.dst_set }));
            }
            if !json {
                println!("{}", point_line(p, dry_run));
            }
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for s in &r.damaged_sets {
            eprintln!(
                "cbtfs: warning: set {s} of the source is damaged: the points after the damage were not copied (`cbtfs verify {}` tells more)",
                src.display()
            );
        }
        for s in &r.skipped {
            eprintln!(
                "cbtfs: warning: {} was not copied: {}",
                crate::naming::with_label(Some(&s.path), &s.label),
                s.reason
            );
        }
        let blocks_bytes = r.blocks_read.saturating_mul(crate::BLOCK_SIZE);
        if dry_run {
            println!(
                "would copy {} from {} to {}: {} to read ({}); {} already there",
                count(r.points_copied, "point", "points"),
                src.display(),
                dst.display(),
                plural(r.blocks_read, "block", "blocks"),
                human(blocks_bytes),
                count(r.already_there, "point is", "points are"),
            );
        } else {
            println!(
                "copied {} from {} to {} in {:.1} s: {} read ({}), {} in the destination ({} stored); {} already there",
                count(r.points_copied, "point", "points"),
                src.display(),
                dst.display(),
                r.seconds,
                plural(r.blocks_read, "block", "blocks"),
                human(blocks_bytes),
                plural(r.new_chunks, "new chunk", "new chunks"),
                human(r.new_stored_bytes),
                count(r.already_there, "point was", "points were"),
            );
        }
    }
    if !r.skipped.is_empty() {
        if !json {
            eprintln!(
                "cbtfs: error: {} could not be copied (see the warnings above)",
                count(r.skipped.len(), "selected point", "selected points")
            );
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
