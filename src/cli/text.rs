//! Words of the human output: counts with their noun, and the summaries of reports.

use crate::diff::DiffReport;

/// `n` and the noun that agrees with it: `plural(1, "point", "points")` is "1 point".
pub fn plural(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `plural` for `usize` counts (lengths of lists).
pub fn count(n: usize, one: &str, many: &str) -> String {
    plural(n as u64, one, many)
}

/// The progress line: `export: 1.5 GiB of 4.0 GiB (512.0 MiB/s, 5 s left)`, binary units for
/// amounts and rates alike.
pub fn progress_line(what: &str, done: u64, total: u64, secs: f64) -> String {
    let rate = done as f64 / secs.max(1e-3);
    let eta = if rate > 0.0 && total > done {
        format!(", {:.0} s left", (total - done) as f64 / rate)
    } else {
        String::new()
    };
    format!(
        "{what}: {} of {} ({}/s{eta})",
        super::human(done),
        super::human(total),
        super::human(rate as u64)
    )
}

/// What `diff` prints on standard error: notes, errors, volumes not compared, then one line
/// saying what was compared and what was found. The exit status follows
/// `DiffReport::complete`.
pub fn diff_summary(r: &DiffReport) -> String {
    let mut out = String::new();
    for n in &r.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    for e in &r.errors {
        out.push_str(&format!("error: {e}\n"));
    }
    if let Some(why) = &r.full_compare {
        out.push_str(&format!("note: {why}: every file compared by content\n"));
    }
    for v in r.volumes.iter().filter(|v| v.no_files) {
        out.push_str(&format!(
            "note: volume {} holds no files: {}\n",
            v.name,
            v.reason.as_deref().unwrap_or("no filesystem of its own")
        ));
    }
    for v in r.volumes.iter().filter(|v| v.unchanged) {
        out.push_str(&format!(
            "note: volume {} unchanged: {}\n",
            v.name,
            v.reason
                .as_deref()
                .unwrap_or("no block of it changed between the points")
        ));
    }
    for v in r.not_compared() {
        out.push_str(&format!(
            "NOT COMPARED: volume {}: {}\n",
            v.name,
            v.reason.as_deref().unwrap_or("no reason given")
        ));
    }
    let compared = r.volumes.iter().filter(|v| v.compared).count();
    let skipped = r.not_compared().count();
    let scope = if r.volumes.is_empty() {
        "no volume found in either point: nothing was compared".to_string()
    } else if compared == 0 && skipped == 0 {
        "no volume holds files: nothing to compare".to_string()
    } else if compared == 0 {
        format!(
            "nothing was compared ({} not compared, see above)",
            count(skipped, "volume", "volumes")
        )
    } else {
        let mut s = format!(
            "{} in {} compared; {} ({} proved unchanged by the changed-block map, {} compared by content)",
            count(r.changes.len(), "change", "changes"),
            count(compared, "volume", "volumes"),
            plural(r.files, "file", "files"),
            r.unchanged_by_map,
            r.compared_by_content,
        );
        if skipped > 0 {
            s.push_str(&format!(
                "; {} NOT compared (see above): its changes are not listed",
                count(skipped, "volume", "volumes")
            ));
        }
        if !r.errors.is_empty() {
            s.push_str(&format!(
                "; {} could not be read",
                count(r.errors.len(), "file", "files")
            ));
        }
        s
    };
    out.push_str(&format!(
        "{} → {}: {scope} ({:.2} s)\n",
        r.a, r.b, r.seconds
    ));
    if !r.complete() {
        out.push_str("the comparison is incomplete: exit status 1\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::VolumeResult;

    #[test]
    fn progress_uses_binary_units_for_amounts_and_rates() {
        assert_eq!(
            progress_line("export", 3 << 29, 4 << 30, 3.0),
            "export: 1.5 GiB of 4.0 GiB (512.0 MiB/s, 5 s left)"
        );
        assert_eq!(
            progress_line("backup", 10 << 20, 10 << 20, 2.0),
            "backup: 10.0 MiB of 10.0 MiB (5.0 MiB/s)"
        );
    }

    #[test]
    fn plural_agrees_with_the_count() {
        assert_eq!(plural(0u64, "point", "points"), "0 points");
        assert_eq!(plural(1u64, "point", "points"), "1 point");
        assert_eq!(plural(2u32, "point", "points"), "2 points");
        assert_eq!(count(1, "whole set", "whole sets"), "1 whole set");
    }

    #[test]
    fn a_diff_with_a_volume_not_compared_says_so_and_is_incomplete() {
        let r = DiffReport {
            a: "vm/d/s/p0".into(),
            b: "vm/d/s/p1".into(),
            volumes: vec![VolumeResult {
                name: "disk".into(),
                compared: false,
                reason: Some("its filesystem could not be mounted".into()),
                no_files: false,
                unchanged: false,
            }],
            ..DiffReport::default()
        };
        assert!(!r.complete());
        let t = diff_summary(&r);
        assert!(
            t.contains("NOT COMPARED: volume disk: its filesystem could not be mounted\n"),
            "{t}"
        );
        assert!(
            t.contains("nothing was compared (1 volume not compared"),
            "{t}"
        );
        assert!(!t.contains("0 changes"), "{t}");
    }

    #[test]
    fn swap_and_lvm_physical_volumes_hold_no_files_and_leave_the_diff_complete() {
        let vol = |name: &str, compared: bool, no_files: bool| VolumeResult {
            name: name.into(),
            compared,
            reason: (!compared).then(|| "swap space: holds no files".to_string()),
            no_files,
            unchanged: false,
        };
        let mut r = DiffReport {
            a: "a".into(),
            b: "b".into(),
            volumes: vec![vol("p1", true, false), vol("p2", false, true)],
            ..DiffReport::default()
        };
        assert!(r.complete());
        let t = diff_summary(&r);
        assert!(
            t.contains("note: volume p2 holds no files: swap space: holds no files\n"),
            "{t}"
        );
        assert!(t.contains("0 changes in 1 volume compared; 0 files"), "{t}");
        assert!(
            !t.contains("NOT COMPARED") && !t.contains("incomplete"),
            "{t}"
        );
        // The same volume when it should have held files: incomplete.
        r.volumes[1].no_files = false;
        assert!(!r.complete());
        assert!(diff_summary(&r).contains("NOT COMPARED: volume p2"));
    }

    #[test]
    fn a_complete_diff_counts_with_the_right_nouns() {
        let r = DiffReport {
            a: "a".into(),
            b: "b".into(),
            volumes: vec![VolumeResult {
                name: "p1".into(),
                compared: true,
                reason: None,
                no_files: false,
                unchanged: false,
            }],
            files: 1,
            ..DiffReport::default()
        };
        assert!(r.complete());
        let t = diff_summary(&r);
        assert!(
            t.contains("a → b: 0 changes in 1 volume compared; 1 file ("),
            "{t}"
        );
        assert!(!t.contains("incomplete"), "{t}");
    }
}
