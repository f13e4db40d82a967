//! Delivering a run's report: the JSON file and a plain summary.
//!
//! PLACEHOLDER: the `reports` branch replaces this file (metrics, webhook and mail
//! notifications, a richer summary) keeping these two signatures.

use std::io::Write;
use std::path::Path;

use super::config::JobConf;
use super::report::{JobReport, Outcome};

/// Write what the job asks for (the report file, as pretty JSON, atomically). Returns the
/// problems met, each naming the file.
pub fn deliver(job_name: &str, job: &JobConf, report: &JobReport) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(path) = &job.report
        && let Err(e) = write_atomically(path, report)
    {
        problems.push(format!(
            "job {job_name}: cannot write the report {}: {e}",
            path.display()
        ));
    }
    problems
}

fn write_atomically(path: &Path, report: &JobReport) -> std::io::Result<()> {
    let mut text = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    text.push(b'\n');
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A plain summary of the run for the terminal.
pub fn summary(report: &JobReport) -> String {
    let ok = report.disks.iter().filter(|d| d.ok).count();
    let mut s = format!(
        "job {}: {} — {} of {} disks backed up from {} VMs in {:.1} s",
        report.job,
        match report.outcome {
            Outcome::Ok => "ok",
            Outcome::Partial => "partly failed",
            Outcome::Failed => "failed",
        },
        ok,
        report.disks.len(),
        report.vms_selected,
        report.seconds
    );
    for d in &report.disks {
        match &d.error {
            None => s.push_str(&format!(
                "\n  {}/{}: {}{}, {} bytes read, {} stored, {:.1} s",
                d.vm,
                d.disk,
                d.kind.as_deref().unwrap_or("?"),
                d.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default(),
                d.bytes_read,
                d.bytes_stored,
                d.seconds
            )),
            Some(e) => s.push_str(&format!("\n  {}/{}: FAILED: {e}", d.vm, d.disk)),
        }
    }
    for e in &report.errors {
        s.push_str(&format!("\n  error: {e}"));
    }
    for w in &report.warnings {
        s.push_str(&format!("\n  warning: {w}"));
    }
    for (what, step) in [("prune", &report.prune), ("copy", &report.copy)] {
        if let Some(st) = step {
            s.push_str(&format!(
                "\n  {what}: {}{}",
                if st.ok { "" } else { "FAILED: " },
                st.summary
            ));
        }
    }
    s
}
