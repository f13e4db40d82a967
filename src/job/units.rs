//! systemd units that run the jobs on their schedules: per job with a `schedule`, a service
//! `cbtfs-job-NAME.service` (`Type=oneshot`, `cbtfs job run NAME --config PATH`, its output to
//! the journal) and a timer `cbtfs-job-NAME.timer` (`OnCalendar=` the schedule,
//! `Persistent=true`: a run missed while the machine was off starts at the next boot).
//! `cbtfs job units` writes them; `scripts/install.sh` enables the timers.
//!
//! Hardening stays within what a run needs: it writes repositories, reports and metrics
//! anywhere outside `/usr`, `/boot` and `/etc` (`ProtectSystem=full`, not `strict`), keeps its
//! cache under root's home (no `ProtectHome`), and a health check attaches loop devices and
//! mounts guest filesystems (no `PrivateDevices`, no namespace restrictions).

use std::path::Path;

use super::config::JobConf;

/// The unit name's stem for a job (`cbtfs-job-NAME`); job names are letters, digits, `-`, `_`
/// and `.` (the config checks), all valid in unit names.
pub fn unit_stem(job_name: &str) -> String {
    format!("cbtfs-job-{job_name}")
}

/// One word of an `ExecStart=` line: as is when plain, else double-quoted with `\` and `"`
/// escaped; `%` (a specifier) doubled and `$` (a variable) doubled in both cases.
pub fn exec_word(w: &str) -> String {
    let specials = w.replace('%', "%%").replace('$', "$$");
    let plain = !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@,%$".contains(&b));
    if plain {
        return specials;
    }
    let mut s = String::from("\"");
    for c in specials.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// The service unit of job `name`, run by `bin` with the configuration at `config`.
pub fn service(name: &str, bin: &Path, config: &Path) -> String {
    let exec = [
        exec_word(&bin.to_string_lossy()),
        "job".into(),
        "run".into(),
        exec_word(name),
        "--config".into(),
        exec_word(&config.to_string_lossy()),
    ]
    .join(" ");
    // A path in a comment: one line whatever it holds.
    let from = config.to_string_lossy().replace(['\n', '\r'], " ");
    format!(
        "\
# Written by `cbtfs job units` from {from}; run it again after changing the job
# (edits made here are lost).
[Unit]
Description=cbtfs backup job {name}
Documentation=man:cbtfs-job-run(1)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart={exec}
# Exit 3 (some disks failed) and 4 (nothing committed) leave the unit failed, for
# `systemctl --failed` and OnFailure=; the report says which disks.
TimeoutStartSec=infinity
StandardOutput=journal
StandardError=journal
SyslogIdentifier={stem}
Nice=10
IOSchedulingClass=best-effort
IOSchedulingPriority=7
UMask=0027
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full
ProtectControlGroups=yes
ProtectKernelModules=yes
ProtectClock=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
",
        stem = unit_stem(name)
    )
}

/// The timer unit of job `name`; None when the job has no schedule.
pub fn timer(name: &str, job: &JobConf) -> Option<String> {
    let schedule = job.schedule.as_deref()?;
    // The config checked it; its words are joined by single spaces so that nothing but the
    // expression reaches the line.
    let schedule = schedule.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(format!(
        "\
# Written by `cbtfs job units`; run it again after changing the job's schedule.
[Unit]
Description=Schedule of cbtfs backup job {name}

[Timer]
OnCalendar={schedule}
Persistent=true
Unit={stem}.service

[Install]
WantedBy=timers.target
",
        stem = unit_stem(name)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::config::Config;

    #[test]
    fn exec_words_are_quoted_for_systemd() {
        assert_eq!(exec_word("/usr/local/bin/cbtfs"), "/usr/local/bin/cbtfs");
        assert_eq!(exec_word("nightly"), "nightly");
        assert_eq!(exec_word("/etc/a b.toml"), "\"/etc/a b.toml\"");
        assert_eq!(exec_word("/x/50%"), "/x/50%%");
        assert_eq!(exec_word("/x/$HOME"), "/x/$$HOME");
        assert_eq!(exec_word("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(exec_word(""), "\"\"");
    }

    #[test]
    fn units_of_the_example_job() {
        let c = Config::parse(
            "[host.xs1]\nurl = \"https://xs1.example\"\npassword_file = \"/etc/cbtfs/xs1.password\"\n\
             [repository.main]\npath = \"/backup/repo\"\n\
             [job.nightly]\nhost = \"xs1\"\nrepository = \"main\"\nvms = [\"*\"]\n\
             schedule = \"*-*-*   02:00:00\"\n\
             [job.manual]\nhost = \"xs1\"\nrepository = \"main\"\nvms = [\"*\"]\n",
            Path::new("/etc/cbtfs/cbtfs.toml"),
        )
        .unwrap();
        let s = service(
            "nightly",
            Path::new("/usr/local/bin/cbtfs"),
            Path::new("/etc/cbtfs/cbtfs.toml"),
        );
        assert!(s.contains(
            "\nType=oneshot\nExecStart=/usr/local/bin/cbtfs job run nightly --config /etc/cbtfs/cbtfs.toml\n"
        ));
        assert!(s.contains("\nStandardOutput=journal\n"));
        assert!(s.contains("\nSyslogIdentifier=cbtfs-job-nightly\n"));
        assert!(s.contains("\nProtectSystem=full\n"));
        assert!(!s.contains("ProtectSystem=strict"));
        assert!(!s.contains("ProtectHome"));
        assert!(!s.contains("PrivateDevices"));
        let t = timer("nightly", &c.jobs["nightly"]).unwrap();
        assert_eq!(
            t,
            "\
# Written by `cbtfs job units`; run it again after changing the job's schedule.
[Unit]
Description=Schedule of cbtfs backup job nightly

[Timer]
OnCalendar=*-*-* 02:00:00
Persistent=true
Unit=cbtfs-job-nightly.service

[Install]
WantedBy=timers.target
"
        );
        assert_eq!(timer("manual", &c.jobs["manual"]), None);
    }
}
