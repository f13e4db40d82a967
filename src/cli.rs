//! The command line: the only place that prints for humans.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::json;

use crate::export;
use crate::import::{self, ImportRequest, ImportSource};
use crate::naming::{Tree, point_name};
use crate::read::PointReader;
use crate::repo::{Repository, valid_uuid};
use crate::verify::{self, VerifyReport};
use crate::{BLOCK_SIZE, blocks_for, timefmt};

/// Exit status when `verify` finds damage (1 is any other error, 2 a usage error).
pub const EXIT_DAMAGE: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "cbtfs",
    version,
    about = "Incremental backups of XenServer/XCP-ng disks with Changed Block Tracking, and their history as files",
    after_help = "Logs go to standard error; set CBTFS_LOG=debug for more."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new, empty repository.
    Init {
        /// Directory to create (or an empty one).
        repo: PathBuf,
    },
    /// Add a restore point from a raw disk image (a full base, or the blocks a CBT bitmap marks).
    Import {
        repo: PathBuf,
        /// The disk's VDI uuid.
        #[arg(long)]
        vdi: String,
        /// The disk's name (default: the name it already has, else disk-<uuid prefix>).
        #[arg(long)]
        name: Option<String>,
        /// The uuid of the VM owning the disk.
        #[arg(long)]
        vm_uuid: Option<String>,
        /// The name of the VM owning the disk.
        #[arg(long)]
        vm_name: Option<String>,
        /// Raw image (or block device) holding the disk as it was at the snapshot.
        #[arg(long, required_unless_present = "nbd", conflicts_with = "nbd")]
        raw: Option<PathBuf>,
        /// NBD export holding the disk: nbd://HOST[:PORT]/EXPORT, nbds://… (TLS),
        /// nbd+unix:///EXPORT?socket=PATH.
        #[arg(long)]
        nbd: Option<String>,
        /// NBD connections in parallel (at most 16, XenServer's limit per host).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// The server's own certificate (PEM), trusted by exact match (nbds:// only).
        #[arg(long, requires = "tls_subject", conflicts_with = "ca_cert")]
        tls_cert: Option<PathBuf>,
        /// The name the server's certificate must be issued for (default: the URI's host).
        #[arg(long)]
        tls_subject: Option<String>,
        /// A CA bundle (PEM) that signed the server's certificate (nbds:// only).
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Seconds an NBD read may take before it is retried on another connection.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// File holding the base64 bitmap from VDI.list_changed_blocks (`-` reads standard
        /// input). Without it, the image starts a new set as its full base.
        #[arg(long)]
        bitmap: Option<PathBuf>,
        /// Snapshot time, RFC 3339 (2026-11-21T02:00:00Z); default now. Must be later than the
        /// set's newest point.
        #[arg(long)]
        time: Option<String>,
        /// Print the new point as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List disks, sets and restore points (or, with --volumes POINT, the partitions and LVM
    /// volumes inside a point).
    Ls {
        repo: PathBuf,
        /// List the volumes inside this point: MBR/GPT partitions, LVM2 logical volumes, and
        /// what cannot be read as a plain volume, with the reason.
        #[arg(long, value_name = "POINT")]
        volumes: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write a restore point as a raw image (sparse file, block device, or `-` for stdout).
    Export {
        repo: PathBuf,
        /// VM/DISK/SET/POINT as `cbtfs ls` shows it, VDI_UUID@latest or VDI_UUID@TIME.
        point: String,
        /// Output file, block device, or `-`.
        out: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
    /// Mount the repository read-only: every restore point as a raw disk file.
    Mount {
        repo: PathBuf,
        mountpoint: PathBuf,
        /// Stay in the foreground, logging to standard error (default: a daemon logging to
        /// syslog, or to log_file=FILE).
        #[arg(short, long)]
        foreground: bool,
        /// Mount options: allow_other, allow_root, log_file=FILE, threads=N (default 2), nodev,
        /// nosuid, noexec, noatime; fstab's ro/noauto/user/_netdev/nofail/x-* are accepted and
        /// ignored.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
    /// Mount every filesystem inside a point under DIR, read-only (one folder per partition or
    /// LVM volume, named like the files in POINT.parts/). `cbtfs browse --unmount DIR` ends it.
    #[command(
        override_usage = "cbtfs browse [OPTIONS] REPO POINT DIR\n       cbtfs browse --unmount DIR"
    )]
    Browse {
        /// REPO POINT DIR; with --unmount, DIR only.
        #[arg(num_args = 1..=3, required = true, value_name = "ARGS")]
        args: Vec<PathBuf>,
        /// End the browse of DIR (a live one, or one whose process died): unmounts everything
        /// and removes its loop devices, overlay and temporary files.
        #[arg(long)]
        unmount: bool,
        /// Stay in the foreground until Ctrl-C (default: a background process).
        #[arg(short, long)]
        foreground: bool,
        /// Only FUSE drivers (fuse2fs, ntfs-3g, fusefat): no kernel code parses the guest's
        /// filesystems. Slower, and XFS/Btrfs cannot be browsed this way.
        #[arg(long)]
        userspace: bool,
    },
    /// List files added (A), removed (D) and modified (M) between two points of the same disk,
    /// per volume; reads only what the changed-block bitmaps say may differ.
    Diff {
        repo: PathBuf,
        point_a: String,
        point_b: String,
        /// Only under this path: VOLUME/PATH (e.g. p1/etc), or a path within every volume.
        path: Option<String>,
        /// Only FUSE drivers to read the filesystems (see `browse --userspace`).
        #[arg(long)]
        userspace: bool,
        /// The changes and counters as JSON (no summary on standard error).
        #[arg(long)]
        json: bool,
    },
    /// Back up disks from a XenServer/XCP-ng host with changed block tracking: a full base the
    /// first time (or when CBT was reset), afterwards only the changed blocks.
    Backup {
        #[arg(long)]
        repo: PathBuf,
        /// The host (pool master): https://HOST[:PORT].
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "root")]
        user: String,
        /// File holding the password (else the CBTFS_PASSWORD environment variable).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Back up this VDI (uuid).
        #[arg(long, required_unless_present = "vm", conflicts_with = "vm")]
        vdi: Option<String>,
        /// Back up every disk of this VM (uuid or name).
        #[arg(long)]
        vm: Option<String>,
        /// CA bundle (PEM) that signed the host's certificate (default: pin the host's own
        /// certificate on first use).
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Do not check the host's certificate at all.
        #[arg(long, conflicts_with = "ca_cert")]
        insecure_tls: bool,
        /// Keep the snapshot's data on the host (default: data_destroy, keeping CBT metadata).
        #[arg(long)]
        keep_snapshot_data: bool,
        /// Accept plain NBD (no TLS) from a host whose NBD network is insecure_nbd (or whose NBD
        /// server does not offer TLS when the network's purpose cannot be read).
        #[arg(long)]
        allow_plain_nbd: bool,
        /// NBD connections in parallel (XenServer allows 16 per host).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Seconds the host may take to accept a connection, to start answering an API call or
        /// an HTTP transfer, or between bytes of an answer; and an NBD read before it is
        /// retried. A snapshot on a busy SR can take a minute: keep it above that.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Put a restore point back into a host: over an existing VDI or into a new one; or a whole
    /// VM (every disk of the point's backup run): into a new VM (--new-vdi --new-vm) or over a
    /// halted VM's disks (--to-vm).
    Restore {
        repo: PathBuf,
        /// VM/DISK/SET/POINT as `cbtfs ls` shows it, VDI_UUID@latest or VDI_UUID@TIME.
        point: String,
        /// The host (pool master): https://HOST[:PORT].
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "root")]
        user: String,
        /// File holding the password (else the CBTFS_PASSWORD environment variable).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Overwrite this VDI (uuid); it must have the point's size and not be attached.
        #[arg(
            long,
            required_unless_present_any = ["new_vdi", "to_vm"],
            conflicts_with_all = ["new_vdi", "to_vm"]
        )]
        to_vdi: Option<String>,
        /// Overwrite the disks of this halted VM (uuid) with every disk of the point's backup
        /// run: matched by VDI when it is the VM backed up, else by position (userdevice).
        #[arg(long, conflicts_with_all = ["new_vdi", "new_vm"])]
        to_vm: Option<String>,
        /// Create a new VDI (in --sr) with the point's size.
        #[arg(long, requires = "sr")]
        new_vdi: bool,
        /// The SR (uuid) for --new-vdi.
        #[arg(long)]
        sr: Option<String>,
        /// Name of the new VDI (default: the disk's name and the point's time); with --new-vm,
        /// the name of the point's own disk (the others get the default).
        #[arg(long)]
        name: Option<String>,
        /// Also create a VM from the point's saved VM metadata: every disk of the point's backup
        /// run is restored into a new VDI and mapped into it.
        #[arg(long, requires = "new_vdi")]
        new_vm: bool,
        /// CA bundle (PEM) that signed the host's certificate.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Do not check the host's certificate at all.
        #[arg(long, conflicts_with = "ca_cert")]
        insecure_tls: bool,
        /// Skip reading a sample of the restored VDI back.
        #[arg(long)]
        no_verify: bool,
        /// Seconds the host may take to accept a connection, to start answering an API call or
        /// an HTTP transfer, or between bytes of an answer.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Remove old restore points by retention policy, merging what they hold into the next
    /// kept point so every kept point stays byte-identical. Space is reclaimed.
    Prune {
        repo: PathBuf,
        /// Keep the newest N points of each disk.
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        /// Keep the newest point of each of the newest N days.
        #[arg(long, default_value_t = 0)]
        keep_daily: usize,
        /// Keep the newest point of each of the newest N ISO weeks.
        #[arg(long, default_value_t = 0)]
        keep_weekly: usize,
        /// Keep the newest point of each of the newest N months.
        #[arg(long, default_value_t = 0)]
        keep_monthly: usize,
        /// Only this disk (VDI uuid).
        #[arg(long)]
        vdi: Option<String>,
        /// Show what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Run a simulated XenServer host (management API, NBD, CBT) for trying cbtfs out.
    Sim {
        /// Working directory (certificate, disk layers, password file).
        #[arg(long)]
        dir: PathBuf,
        /// A disk of the VM: NAME=RAW_IMAGE (repeatable).
        #[arg(long = "disk", value_name = "NAME=IMAGE")]
        disks: Vec<String>,
        #[arg(long, default_value = "sim-vm")]
        vm_name: String,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: String,
        /// NBD network: nbd (TLS), insecure (plain) or none.
        #[arg(long, default_value = "nbd")]
        nbd: String,
        /// Answer XML-RPC only (an older host).
        #[arg(long)]
        xmlrpc_only: bool,
    },
    /// Run the whole job on a built-in example: a guest filesystem, daily backups, exports.
    Demo {
        /// Working directory (recreated; default: $TMPDIR/cbtfs-demo).
        dir: Option<PathBuf>,
    },
    /// Check every checksum and structure; exit status 3 if anything is damaged.
    Verify {
        repo: PathBuf,
        /// Only this point (and the points it depends on).
        point: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write one file from inside a guest filesystem of a restore point (or, with --tar, a
    /// directory and everything under it). Needs no root and no loop device: the filesystem is
    /// read by its FUSE driver (fuse2fs, ntfs-3g, fusefat) in a private temporary folder; XFS
    /// and Btrfs need root.
    #[command(after_help = "Examples:\n  \
        cbtfs dump /backup/repo web01/xvda/latest p1/etc/nginx/nginx.conf -o nginx.conf\n  \
        cbtfs dump /backup/repo web01/xvda/latest vg0-root/var/www --tar | tar -xvf - -C /tmp/restore\n\n\
        `cbtfs ls --volumes POINT` names the volumes; `cbtfs find` tells which point holds the file you want.")]
    Dump {
        /// The repository (a folder holding cbtfs.repo).
        repo: PathBuf,
        /// The restore point: VM/DISK/SET/POINT as `cbtfs ls` shows it, VM/DISK/latest,
        /// VDI_UUID@latest or VDI_UUID@TIME.
        point: String,
        /// VOLUME/PATH inside the point: the volume as `cbtfs ls --volumes` names it (p1,
        /// vg0-root, disk for an unpartitioned disk), then the path from its root.
        target: String,
        /// Write to this file instead of standard output (replaced once complete; `-` is
        /// standard output).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        /// Write a tar stream (GNU format) of the file or directory, keeping numeric owners,
        /// modes, mtimes, symlinks and hard links.
        #[arg(long)]
        tar: bool,
    },
    /// List the restore points in which a path exists, with its size and mtime in each (newest
    /// point first; points without it say `absent`), to pick the day to `cbtfs dump` from.
    #[command(after_help = "Examples:\n  \
        cbtfs find /backup/repo 'p1/etc/nginx/*.conf' --vm web01 --since 2026-01-01\n  \
        cbtfs find /backup/repo 'etc/host*' --vm web01 --disk xvda --json\n\n\
        Each point searched is mounted (userspace drivers, no root) and unmounted before the next: \
        narrow the search with --vm, --disk and --since. Exit status 1 if a volume could not be searched.")]
    Find {
        /// The repository (a folder holding cbtfs.repo).
        repo: PathBuf,
        /// VOLUME/PATH (p1/etc/hosts), or a path searched in every volume (etc/hosts); shell
        /// globs (*, ?, [a-z]) in any component. Quote it so the shell leaves it alone.
        pattern: String,
        /// Only this VM's disks (its name as `cbtfs ls` shows it, or its uuid).
        #[arg(long)]
        vm: Option<String>,
        /// Only this disk (its name as `cbtfs ls` shows it, or its VDI uuid).
        #[arg(long)]
        disk: Option<String>,
        /// Only points taken at or after this time: 2026-01-05, 2026-01-05T00:00:00Z or
        /// 20260105T000000Z (UTC).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Print the rows as a JSON array.
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print data end quietly when their reader goes away (`cbtfs ls | head`,
    // `cbtfs export ... - | cmp`). The others keep SIGPIPE ignored: a server closing a socket
    // must surface as an error to retry, never kill the process.
    if matches!(
        cli.command,
        Command::Ls { .. } | Command::Export { .. } | Command::Verify { .. }
    ) {
        // SAFETY: changing a signal disposition at start-up, before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Reading a deep chain may open one data file per point.
    crate::raise_fd_limit();
    // The mount sets up its own logging (a daemon logs to syslog or a file).
    if !matches!(cli.command, Command::Mount { .. } | Command::Browse { .. }) {
        let filter = tracing_subscriber::EnvFilter::try_from_env("CBTFS_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .init();
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cbtfs: error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: typed errors already quote their cause in their text.
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if out.contains(&c) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&c);
    }
    out
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Init { repo } => {
            Repository::init(&repo)?;
            println!("created repository {}", repo.display());
        }
        Command::Import {
            repo,
            vdi,
            name,
            vm_uuid,
            vm_name,
            raw,
            nbd,
            connections,
            tls_cert,
            tls_subject,
            ca_cert,
            timeout,
            bitmap,
            time,
            json,
        } => {
            let mut source = import_source(raw, nbd, connections, tls_cert, tls_subject, ca_cert)?;
            if let ImportSource::Nbd { options, .. } = &mut source {
                options.timeout = std::time::Duration::from_secs(timeout.max(1));
            }
            cmd_import(
                &repo, vdi, name, vm_uuid, vm_name, source, bitmap, time, json,
            )?
        }
        Command::Ls {
            repo,
            volumes: Some(point),
            json,
        } => cmd_volumes(&repo, &point, json)?,
        Command::Ls { repo, json, .. } => cmd_ls(&repo, json)?,
        Command::Export {
            repo,
            point,
            out,
            force,
        } => cmd_export(&repo, &point, &out, force)?,
        Command::Verify { repo, point, json } => return cmd_verify(&repo, point, json),
        Command::Dump {
            repo,
            point,
            target,
            output,
            tar,
        } => cmd_dump(&repo, &point, &target, output.as_deref(), tar)?,
        Command::Find {
            repo,
            pattern,
            vm,
            disk,
            since,
            json,
        } => return cmd_find(&repo, pattern, vm, disk, since, json),
        Command::Browse {
            args,
            unmount,
            foreground,
            userspace,
        } => {
            let opts = crate::browse::BrowseOptions { userspace };
            match (unmount, args.as_slice()) {
                (true, [dir]) => crate::browse::unmount_dir(dir)?,
                (true, _) => {
                    bail!("--unmount takes only the directory: cbtfs browse --unmount DIR")
                }
                (false, [repo, point, dir]) => {
                    let point = point.to_str().context("the point name is not UTF-8")?;
                    crate::browse::browse(repo, point, dir, foreground, &opts)?
                }
                (false, _) => {
                    bail!("usage: cbtfs browse REPO POINT DIR (or cbtfs browse --unmount DIR)")
                }
            }
        }
        Command::Diff {
            repo,
            point_a,
            point_b,
            path,
            userspace,
            json,
        } => {
            let opts = crate::browse::BrowseOptions { userspace };
            let repository = open(&repo)?;
            crate::diff::stop_on_signals();
            let report =
                crate::diff::diff(&repository, &point_a, &point_b, path.as_deref(), &opts)?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
            } else {
                emit(&report.to_text())?;
                eprint!("{}", report.summary());
            }
            if !report.errors.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Mount {
            repo,
            mountpoint,
            foreground,
            options,
        } => {
            let opts = crate::mount::parse_options(&options)?;
            crate::mount::mount(&repo, &mountpoint, foreground, opts)?
        }
        Command::Backup {
            repo,
            host,
            user,
            password_file,
            vdi,
            vm,
            ca_cert,
            insecure_tls,
            keep_snapshot_data,
            allow_plain_nbd,
            connections,
            timeout,
            json,
        } => {
            let access = host_access(host, user, password_file, ca_cert, insecure_tls, timeout)?;
            let selection = match (vdi, vm) {
                (Some(v), _) => crate::backup::Selection::Vdi(v),
                (None, Some(v)) => crate::backup::Selection::Vm(v),
                (None, None) => bail!("give --vdi UUID or --vm UUID_OR_NAME"),
            };
            let fetch = crate::nbd::FetchOptions {
                connections: connections.clamp(1, crate::nbd::fetch::MAX_CONNECTIONS),
                timeout: Duration::from_secs(timeout.max(1)),
                ..Default::default()
            };
            let opts = crate::backup::BackupOptions {
                host: access,
                selection,
                keep_snapshot_data,
                allow_plain_nbd,
                fetch,
            };
            return cmd_backup(&repo, &opts, json);
        }
        Command::Restore {
            repo,
            point,
            host,
            user,
            password_file,
            to_vdi,
            to_vm,
            new_vdi: _,
            sr,
            name,
            new_vm,
            ca_cert,
            insecure_tls,
            no_verify,
            timeout,
            json,
        } => {
            let access = host_access(host, user, password_file, ca_cert, insecure_tls, timeout)?;
            let target = match (to_vdi, to_vm, sr) {
                (Some(v), _, _) => crate::restore::RestoreTarget::Existing(v),
                (None, Some(vm), _) => crate::restore::RestoreTarget::Vm(vm),
                (None, None, Some(sr)) => crate::restore::RestoreTarget::New { sr, name },
                (None, None, None) => {
                    bail!("give --to-vdi UUID, --to-vm UUID or --new-vdi --sr UUID")
                }
            };
            let opts = crate::restore::RestoreOptions {
                host: access,
                target,
                new_vm,
                no_verify,
            };
            cmd_restore(&repo, &point, &opts, json)?
        }
        Command::Prune {
            repo,
            keep_last,
            keep_daily,
            keep_weekly,
            keep_monthly,
            vdi,
            dry_run,
            json,
        } => {
            let policy = crate::prune::Policy {
                last: keep_last,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
            };
            let repository = open(&repo)?;
            let r = crate::prune::prune(&repository, policy, vdi.as_deref(), dry_run)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for d in &r.disks {
                    println!(
                        "{}/{}: {} {} of {} points{}{}",
                        d.vm.as_deref().unwrap_or("no-vm"),
                        d.disk,
                        if r.dry_run { "would remove" } else { "removed" },
                        d.removed,
                        d.removed + d.kept,
                        if d.sets_removed > 0 {
                            format!(" ({} whole sets)", d.sets_removed)
                        } else {
                            String::new()
                        },
                        if d.rewritten > 0 {
                            format!(", {} kept points rewritten to absorb them", d.rewritten)
                        } else {
                            String::new()
                        }
                    );
                    if r.dry_run {
                        for p in &d.removed_points {
                            println!("  remove {p}");
                        }
                    }
                    for s in &d.skipped_sets {
                        eprintln!(
                            "cbtfs: warning: set {s} of disk {} is damaged and was left alone (cbtfs verify tells more)",
                            d.vdi
                        );
                    }
                }
                if !r.dry_run {
                    println!(
                        "repository objects: {} -> {} ({} reclaimed)",
                        human(r.bytes_before),
                        human(r.bytes_after),
                        human(r.bytes_before.saturating_sub(r.bytes_after))
                    );
                }
            }
        }
        Command::Sim {
            dir,
            disks,
            vm_name,
            bind,
            nbd,
            xmlrpc_only,
        } => cmd_sim(&dir, &disks, &vm_name, &bind, &nbd, xmlrpc_only)?,
        Command::Demo { dir } => {
            crate::demo::run_demo(&dir.unwrap_or_else(crate::demo::default_dir))?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The host password: from a file (first line) or CBTFS_PASSWORD; never from argv.
fn read_password(file: Option<&Path>) -> Result<String> {
    let p = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the password file {}", f.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        None => std::env::var("CBTFS_PASSWORD").map_err(|_| {
            anyhow::anyhow!("no password: give --password-file FILE or set CBTFS_PASSWORD")
        })?,
    };
    if p.is_empty() {
        bail!("the password is empty (check the password file or CBTFS_PASSWORD)");
    }
    Ok(p)
}

fn cmd_backup(repo: &Path, opts: &crate::backup::BackupOptions, json: bool) -> Result<ExitCode> {
    use crate::backup::Event;
    let repo = open(repo)?;
    let progress: Mutex<Option<(String, Progress)>> = Mutex::new(None);
    let say = |e: Event| match e {
        Event::Info(m) => eprintln!("cbtfs: {m}"),
        Event::Warning(m) => eprintln!("cbtfs: warning: {m}"),
        Event::Blocks(vdi, done, total) => {
            if let Ok(mut p) = progress.lock() {
                if p.as_ref().is_none_or(|(v, _)| v != vdi) {
                    *p = Some((vdi.to_string(), Progress::new("backup", 0)));
                }
                if let Some((_, pr)) = p.as_ref() {
                    pr.update_total(done * BLOCK_SIZE, total * BLOCK_SIZE);
                    if done == total {
                        pr.finish();
                    }
                }
            }
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt
        .block_on(crate::backup::run(&repo, opts, &say))
        .with_context(|| format!("backup from {}", opts.host.url))?;
    if let Ok(p) = progress.lock()
        && let Some((_, pr)) = p.as_ref()
    {
        pr.finish();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for d in &report.disks {
            let what = match (&d.new_set_reason, d.kind) {
                (Some(r), _) => format!("full base, new set ({r})"),
                (None, k) => k.to_string(),
            };
            println!(
                "{}/{}: {what}: {} of {} blocks changed ({:.1}%), {} read over {} in {:.1} s -> point {} (set {}, #{})",
                d.vm.as_deref().unwrap_or("no-vm"),
                d.disk,
                d.changed_blocks,
                blocks_for(d.virtual_size),
                d.changed_percent,
                human(d.fetched_bytes),
                d.via,
                d.seconds,
                d.point,
                d.set,
                d.seq
            );
        }
        for (vdi, e) in &report.failures {
            eprintln!("cbtfs: error: VDI {vdi}: {e}");
        }
    }
    if report.failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

/// How to reach a host: its URL, the user, the password (file or CBTFS_PASSWORD) and trust.
fn host_access(
    url: String,
    user: String,
    password_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    insecure_tls: bool,
    timeout: u64,
) -> Result<crate::backup::HostAccess> {
    let password = read_password(password_file.as_deref())?;
    let ca_pem = match ca_cert {
        Some(p) => Some(
            std::fs::read_to_string(&p)
                .with_context(|| format!("reading the CA file {}", p.display()))?,
        ),
        None => None,
    };
    if insecure_tls {
        eprintln!(
            "cbtfs: warning: --insecure-tls: the host's certificate is not checked; anyone on the path can read the password and the disks"
        );
    }
    Ok(crate::backup::HostAccess {
        url,
        user,
        password,
        ca_pem,
        insecure_tls,
        timeout: Duration::from_secs(timeout.max(1)),
    })
}

fn cmd_restore(
    repo: &Path,
    spec: &str,
    opts: &crate::restore::RestoreOptions,
    json: bool,
) -> Result<()> {
    use crate::backup::Event;
    let repository = open(repo)?;
    let (_, set, seq) = resolve(&repository, spec)?;
    let progress = Progress::new("restore", 0);
    let say = |e: Event| match e {
        Event::Info(m) => eprintln!("cbtfs: {m}"),
        Event::Warning(m) => eprintln!("cbtfs: warning: {m}"),
        Event::Blocks(_, done, total) => {
            progress.update_total(done * BLOCK_SIZE, total * BLOCK_SIZE)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(crate::restore::run(&repository, &set, seq, opts, &say));
    progress.finish();
    let report = r.with_context(|| format!("restore of {spec} to {}", opts.host.url))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for d in &report.disks {
        println!(
            "restored {}{} into {}VDI {}",
            d.point,
            d.userdevice
                .as_deref()
                .map(|u| format!(" (userdevice {u})"))
                .unwrap_or_default(),
            if d.created_vdi { "new " } else { "" },
            d.vdi,
        );
    }
    println!(
        "{} disk{}, {} in {:.1} s, {:.0} MB/s",
        report.disks.len(),
        if report.disks.len() == 1 { "" } else { "s" },
        human(report.bytes),
        report.seconds,
        report.bytes as f64 / report.seconds.max(1e-9) / 1e6
    );
    if report.verified_blocks > 0 {
        println!(
            "read back {} sample blocks from the host: identical to the point",
            report.verified_blocks
        );
    }
    if let Some(vm) = &report.vm {
        let vdis: Vec<&str> = report.disks.iter().map(|d| d.vdi.as_str()).collect();
        println!(
            "created VM {vm} from the saved VM metadata, using VDI {}",
            vdis.join(", ")
        );
    }
    Ok(())
}

fn cmd_volumes(repo: &Path, spec: &str, json: bool) -> Result<()> {
    let repository = open(repo)?;
    let (_, set, seq) = resolve(&repository, spec)?;
    let reader = PointReader::open(&repository, &set, seq)
        .with_context(|| format!("opening point {spec}"))?;
    let layout = crate::volumes::discover(&reader)
        .with_context(|| format!("reading the partition table of {spec}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&layout)?);
        return Ok(());
    }
    print!("{}: {}", reader.manifest.label(), layout.to_text());
    Ok(())
}

fn cmd_sim(
    dir: &Path,
    disks: &[String],
    vm_name: &str,
    bind: &str,
    nbd: &str,
    xmlrpc_only: bool,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut cfg = crate::sim::SimConfig::new(dir);
    cfg.bind = bind.to_string();
    cfg.xmlrpc_only = xmlrpc_only;
    cfg.nbd = match nbd {
        "nbd" => crate::sim::NbdMode::Tls,
        "insecure" => crate::sim::NbdMode::Plain,
        "none" => crate::sim::NbdMode::None,
        other => bail!("--nbd {other:?}: use nbd, insecure or none"),
    };
    let sim = crate::sim::Sim::start(cfg.clone()).map_err(|e| anyhow::anyhow!(e))?;
    let mut list = Vec::new();
    for d in disks {
        let (name, path) = d
            .split_once('=')
            .with_context(|| format!("--disk {d:?}: use NAME=RAW_IMAGE"))?;
        list.push((name, Path::new(path)));
    }
    let (vm, vdis) = sim.add_vm(vm_name, &list).map_err(|e| anyhow::anyhow!(e))?;
    let pw_file = dir.join("password");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&pw_file)
        .with_context(|| format!("writing {}", pw_file.display()))?;
    writeln!(f, "{}", cfg.password)?;
    println!("simulated host: {}", sim.url);
    println!("user root, password in {}", pw_file.display());
    println!("VM {vm_name} ({vm}), disks: {}", vdis.join(" "));
    println!(
        "control: curl -k -H 'x-sim-token: {}' -X POST '{}/sim/write?vdi=UUID&offset=N' --data-binary @FILE  (also /sim/crash, /sim/licence?enabled=0, /sim/state)",
        sim.control_token, sim.url
    );
    println!("Ctrl-C stops it.");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;
    drop(sim);
    Ok(())
}

fn open(repo: &Path) -> Result<Repository> {
    Ok(Repository::open(repo)?)
}

/// Progress on a terminal: one line, rewritten at most every 200 ms.
struct Progress {
    on: bool,
    what: &'static str,
    total: u64,
    start: Instant,
    last: Mutex<Instant>,
}

impl Progress {
    fn new(what: &'static str, total: u64) -> Self {
        Progress {
            on: std::io::stderr().is_terminal(),
            what,
            total,
            start: Instant::now(),
            last: Mutex::new(Instant::now()),
        }
    }
    fn update(&self, done: u64) {
        self.update_total(done, self.total)
    }
    fn finish(&self) {
        if self.on {
            eprint!("\r\x1b[K");
        }
    }
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[allow(clippy::too_many_arguments)]
fn cmd_import(
    repo: &Path,
    vdi: String,
    name: Option<String>,
    vm_uuid: Option<String>,
    vm_name: Option<String>,
    source: ImportSource,
    bitmap: Option<PathBuf>,
    time: Option<String>,
    json: bool,
) -> Result<()> {
    if !valid_uuid(&vdi) {
        bail!("--vdi {vdi:?} is not a VDI uuid (like 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b)");
    }
    let repository = open(repo)?;
    let time = match time {
        Some(t) => timefmt::parse(&t).map_err(anyhow::Error::msg)?,
        None => timefmt::now(),
    };
    let bitmap = match bitmap {
        None => None,
        Some(p) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the bitmap from standard input")?;
            Some((s, "standard input".to_string()))
        }
        Some(p) => Some((
            std::fs::read_to_string(&p)
                .with_context(|| format!("reading bitmap file {}", p.display()))?,
            p.display().to_string(),
        )),
    };
    let req = ImportRequest {
        vdi,
        disk_name: name,
        vm_uuid,
        vm_name,
        source,
        bitmap,
        time,
        snapshot: None,
        vm_metadata: None,
        vdi_type: None,
        vm_run: None,
        source_label: None,
    };
    let progress = Progress::new("import", 0);
    let report = import::import_raw(&repository, &req, |done, total| {
        progress.update_total(done * BLOCK_SIZE, total * BLOCK_SIZE)
    })?;
    progress.finish();
    let m = &report.manifest;
    let tree = Tree::build(repository.catalog()?);
    let path = tree.path_of(m).unwrap_or_else(|| m.label());
    if json {
        println!("{}", serde_json::to_string_pretty(&point_json(m, &path))?);
    } else {
        println!(
            "{} point {path}: {} blocks changed, {} stored ({}), disk {}",
            if m.seq == 0 { "base" } else { "incremental" },
            m.changed_blocks,
            m.data_blocks,
            human(m.data_blocks * BLOCK_SIZE),
            human(m.virtual_size)
        );
    }
    Ok(())
}

impl Progress {
    fn update_total(&self, done: u64, total: u64) {
        if let Ok(mut last) = self.last.lock()
            && self.on
            && (last.elapsed() >= Duration::from_millis(200) || done >= total)
        {
            *last = Instant::now();
            let secs = self.start.elapsed().as_secs_f64().max(1e-3);
            let rate = done as f64 / secs;
            let eta = if rate > 0.0 && total > done {
                format!(", {:.0} s left", (total - done) as f64 / rate)
            } else {
                String::new()
            };
            eprint!(
                "\r{}: {} of {} ({:.0} MB/s{eta})   ",
                self.what,
                human(done),
                human(total),
                rate / 1e6
            );
        }
    }
}

/// The import's source from the command line: a raw image, or an NBD export and its trust.
fn import_source(
    raw: Option<PathBuf>,
    nbd: Option<String>,
    connections: usize,
    tls_cert: Option<PathBuf>,
    tls_subject: Option<String>,
    ca_cert: Option<PathBuf>,
) -> Result<ImportSource> {
    let Some(uri) = nbd else {
        let Some(raw) = raw else {
            bail!("give the disk's data with --raw IMAGE or --nbd URI");
        };
        if tls_cert.is_some() || ca_cert.is_some() {
            bail!("--tls-cert and --ca-cert apply to --nbd nbds:// imports only");
        }
        return Ok(ImportSource::Raw(raw));
    };
    use crate::nbd::{FetchOptions, Target, Trust, fetch::MAX_CONNECTIONS, uri};
    let u = uri::parse(&uri).map_err(anyhow::Error::msg)?;
    // Export names may carry a session id (xapi's do): show URIs only as the target describes.
    let shown = Target {
        address: u.address.clone(),
        export: u.export.clone(),
        trust: None,
    }
    .describe();
    let uri = if u.tls {
        shown.replacen("nbd", "nbds", 1)
    } else {
        shown
    };
    if connections == 0 || connections > MAX_CONNECTIONS {
        bail!(
            "--connections must be 1 to {MAX_CONNECTIONS} (XenServer allows 16 NBD connections per host)"
        );
    }
    let host_name = match &u.address {
        crate::nbd::Address::Tcp { host, .. } => host.clone(),
        crate::nbd::Address::Unix(_) => "localhost".into(),
    };
    let subject = tls_subject.unwrap_or(host_name);
    let read = |p: &Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading certificate {}", p.display()))
    };
    let trust = match (u.tls, tls_cert, ca_cert) {
        (false, None, None) => {
            eprintln!("cbtfs: note: {uri} is plain NBD: data crosses the network unencrypted");
            None
        }
        (false, _, _) => {
            bail!("certificates were given but {uri} is plain NBD; use an nbds:// URI")
        }
        (true, Some(c), None) => Some(Trust::Pinned {
            cert_pem: read(&c)?,
            subject,
        }),
        (true, None, Some(c)) => Some(Trust::Ca {
            ca_pem: read(&c)?,
            subject,
        }),
        (true, None, None) => bail!(
            "{uri} uses TLS: give the server's certificate (--tls-cert PEM --tls-subject NAME, as VDI.get_nbd_info returns them) or --ca-cert FILE"
        ),
        (true, Some(_), Some(_)) => bail!("give --tls-cert or --ca-cert, not both"),
    };
    Ok(ImportSource::Nbd {
        target: Target {
            address: u.address,
            export: u.export,
            trust,
        },
        options: FetchOptions {
            connections,
            ..FetchOptions::default()
        },
    })
}

fn changed_percent(m: &crate::repo::PointManifest) -> f64 {
    let blocks = blocks_for(m.virtual_size).max(1);
    m.changed_blocks as f64 * 100.0 / blocks as f64
}

fn point_json(m: &crate::repo::PointManifest, path: &str) -> serde_json::Value {
    json!({
        "path": path,
        "name": point_name(m),
        "vdi": m.vdi,
        "set": m.set,
        "seq": m.seq,
        "time": timefmt::rfc3339(m.time),
        "virtual_size": m.virtual_size,
        "changed_blocks": m.changed_blocks,
        "stored_blocks": m.data_blocks,
        "stored_bytes": m.data_blocks * BLOCK_SIZE,
        "changed_percent": (changed_percent(m) * 100.0).round() / 100.0,
        "source": m.source,
    })
}

fn cmd_ls(repo: &Path, json: bool) -> Result<()> {
    let repository = open(repo)?;
    let tree = Tree::build(repository.catalog()?);
    if json {
        let vms: Vec<_> = tree
            .vms
            .iter()
            .map(|vm| {
                json!({
                    "name": vm.name,
                    "uuid": vm.uuid,
                    "disks": vm.disks.iter().map(|d| {
                        let newest = d.history.newest();
                        json!({
                            "name": d.name,
                            "vdi": d.vdi(),
                            "disk_name": newest.map(|p| p.disk_name.clone()),
                            "virtual_size": newest.map(|p| p.virtual_size),
                            "sets": d.history.sets.iter().map(|s| json!({
                                "name": s.id,
                                "points": s.points.iter().map(|p| point_json(
                                    p, &format!("{}/{}/{}/{}", vm.name, d.name, s.id, point_name(p)))).collect::<Vec<_>>(),
                                "problems": s.problems,
                            })).collect::<Vec<_>>(),
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "repository": repo.display().to_string(),
                "vms": vms
            }))?
        );
        return Ok(());
    }
    if tree.vms.is_empty() {
        println!(
            "repository {} holds no restore points yet (add one with `cbtfs import` or `cbtfs backup`)",
            repo.display()
        );
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    for vm in &tree.vms {
        for d in &vm.disks {
            let newest = d.history.newest();
            writeln!(
                out,
                "{}/{}  (VDI {}, {}{})",
                vm.name,
                d.name,
                d.vdi(),
                human(newest.map_or(0, |p| p.virtual_size)),
                vm.uuid
                    .as_ref()
                    .map(|u| format!(", VM {u}"))
                    .unwrap_or_default()
            )?;
            for s in &d.history.sets {
                writeln!(out, "  set {}  ({} points)", s.id, s.points.len())?;
                writeln!(
                    out,
                    "    {:<18} {:<22} {:>10} {:>12} {:>10} {:>8}",
                    "POINT", "TIME", "SIZE", "STORED", "BLOCKS", "CHANGED"
                )?;
                for p in &s.points {
                    writeln!(
                        out,
                        "    {:<18} {:<22} {:>10} {:>12} {:>10} {:>7.2}%",
                        point_name(p),
                        timefmt::rfc3339(p.time),
                        human(p.virtual_size),
                        human(p.data_blocks * BLOCK_SIZE),
                        p.data_blocks,
                        changed_percent(p)
                    )?;
                }
                for pr in &s.problems {
                    writeln!(out, "    DAMAGED {}: {}", pr.location, pr.message)?;
                }
            }
        }
    }
    Ok(())
}

/// Write to standard output; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn resolve(repository: &Repository, spec: &str) -> Result<(Tree, crate::repo::SetHistory, u32)> {
    let tree = Tree::build(repository.catalog()?);
    let (set, seq) = tree
        .resolve(spec)
        .map_err(|e| anyhow::anyhow!("point {spec:?}: {e}"))?;
    Ok((tree, set, seq))
}

fn cmd_export(repo: &Path, spec: &str, out: &Path, force: bool) -> Result<()> {
    let repository = open(repo)?;
    let (tree, set, seq) = resolve(&repository, spec)?;
    let reader = PointReader::open(&repository, &set, seq)
        .with_context(|| format!("opening point {spec}"))?;
    let path = tree
        .path_of(&reader.manifest)
        .unwrap_or_else(|| reader.manifest.label());
    let progress = Progress::new("export", reader.map().stored_blocks() * BLOCK_SIZE);
    let report = if out.as_os_str() == "-" {
        let p = Progress::new("export", reader.size());
        let mut stdout = std::io::stdout().lock();
        let r = export::export_to_writer(&reader, &mut stdout, &|d| p.update(d))?;
        p.finish();
        r
    } else {
        let r = export::export_to_path(&reader, out, force, &|d| progress.update(d))?;
        progress.finish();
        r
    };
    if out.as_os_str() != "-" {
        println!(
            "exported {path} to {} ({}, {} of data)",
            out.display(),
            human(report.size),
            human(report.data_bytes)
        );
    }
    Ok(())
}

fn cmd_verify(repo: &Path, point: Option<String>, json: bool) -> Result<ExitCode> {
    let repository = open(repo)?;
    let mut report = VerifyReport::default();
    match &point {
        None => verify::verify_all(&repository, &mut report)?,
        Some(spec) => {
            let (_, set, seq) = resolve(&repository, spec)?;
            verify::verify_set(&repository, &set, Some(seq), &mut report);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for d in &report.damage {
            let what = match (&d.point, d.block) {
                (Some(p), Some(b)) => format!(
                    "point {p}, block {b} (bytes {}..{})",
                    b * BLOCK_SIZE,
                    (b + 1) * BLOCK_SIZE
                ),
                (Some(p), None) => format!("point {p}"),
                _ => "repository".to_string(),
            };
            if d.location.is_empty() {
                println!("DAMAGED {what}: {}", d.problem);
            } else {
                println!("DAMAGED {what}: {} ({})", d.problem, d.location);
            }
        }
        if report.ok() {
            println!(
                "ok: {} points, {} stored blocks checked, no damage",
                report.points_checked, report.blocks_checked
            );
        } else {
            println!(
                "{} problems found in {} points ({} stored blocks checked); damaged ranges read as errors, never as wrong data",
                report.damage.len(),
                report.points_checked,
                report.blocks_checked
            );
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DAMAGE)
    })
}

/// The canonical `VM/DISK/SET/POINT` of any point name the CLI accepts.
fn canonical_point(repository: &Repository, spec: &str) -> Result<String> {
    let (tree, set, seq) = resolve(repository, spec)?;
    let m = set
        .points
        .iter()
        .find(|p| p.seq == seq)
        .with_context(|| format!("point {spec:?}: not in its set"))?;
    Ok(tree.path_of(m).unwrap_or_else(|| m.label()))
}

fn cmd_dump(repo: &Path, spec: &str, target: &str, output: Option<&Path>, tar: bool) -> Result<()> {
    use crate::dump;
    let repository = open(repo)?;
    let point = canonical_point(&repository, spec)?;
    let to_stdout = output.is_none_or(|o| o.as_os_str() == "-");
    if to_stdout && tar && std::io::stdout().is_terminal() {
        bail!(
            "refusing to write a tar stream to the terminal: add -o FILE, or pipe it (| tar -xvf -)"
        );
    }
    crate::diff::stop_on_signals();
    let result = match output {
        Some(o) if !to_stdout => dump::dump_to_path(&repository, &point, target, tar, o),
        _ => dump::dump(
            &repository,
            &point,
            target,
            tar,
            &mut std::io::stdout().lock(),
        ),
    };
    let report = match result {
        Ok(r) => r,
        // The reader went away (`| head`): everything was unmounted; end quietly.
        Err(e) if e.is_broken_pipe() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for w in &report.warnings {
        eprintln!("cbtfs: warning: {w}");
    }
    if let Some(o) = output.filter(|_| !to_stdout) {
        let what = if tar {
            format!(
                "{} entries, {} of file data",
                report.entries,
                human(report.bytes)
            )
        } else {
            format!("{} bytes", report.bytes)
        };
        println!(
            "wrote {}/{} of {} to {} ({what})",
            report.volume,
            report.path,
            report.point,
            o.display()
        );
    }
    Ok(())
}

fn cmd_find(
    repo: &Path,
    pattern: String,
    vm: Option<String>,
    disk: Option<String>,
    since: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    use crate::find::{self, FindRequest, Status};
    let repository = open(repo)?;
    let since = match since {
        Some(s) => Some(find::parse_since(&s).map_err(|e| anyhow::anyhow!("--since: {e}"))?),
        None => None,
    };
    let req = FindRequest {
        pattern,
        vm,
        disk,
        since,
    };
    crate::diff::stop_on_signals();
    let on = std::io::stderr().is_terminal();
    let report = find::find(&repository, &req, &|i, n, p| {
        if on {
            eprint!("\r\x1b[Ksearching point {} of {n}: {p}", i + 1);
        }
    });
    if on {
        eprint!("\r\x1b[K");
    }
    let report = report?;
    if json {
        emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&report.rows)?
        ))?;
    } else if report.points == 0 {
        emit("no restore point matches --vm/--disk/--since\n")?;
    } else {
        let width = |f: &dyn Fn(&find::Row) -> usize, min: usize| {
            report.rows.iter().map(f).max().unwrap_or(0).max(min)
        };
        let wp = width(&|r| r.point.len(), 5);
        let wv = width(&|r| r.volume.as_deref().map_or(1, str::len), 6);
        let wf = width(&|r| r.path.as_deref().map_or(1, str::len), 4);
        let mut out = format!(
            "{:<wp$}  {:<wv$}  {:<wf$}  {:>12}  {:<20}  TYPE\n",
            "POINT", "VOLUME", "PATH", "SIZE", "MTIME"
        );
        for r in &report.rows {
            let vol = r.volume.as_deref().unwrap_or("-");
            let path = r.path.as_deref().unwrap_or("-");
            match r.status {
                Status::Present => {
                    let kind = match (&r.target, r.kind) {
                        (Some(t), _) => format!("symlink -> {t}"),
                        (None, k) => k.unwrap_or("-").to_string(),
                    };
                    out.push_str(&format!(
                        "{:<wp$}  {vol:<wv$}  {path:<wf$}  {:>12}  {:<20}  {kind}\n",
                        r.point,
                        r.size.unwrap_or(0),
                        r.mtime.as_deref().unwrap_or("-"),
                    ));
                }
                Status::Absent => out.push_str(&format!(
                    "{:<wp$}  {vol:<wv$}  {path:<wf$}  {:>12}\n",
                    r.point, "absent"
                )),
                Status::NotSearched => out.push_str(&format!(
                    "{:<wp$}  {vol:<wv$}  {path:<wf$}  {:>12}  {}\n",
                    r.point,
                    "not searched",
                    r.reason.as_deref().unwrap_or("")
                )),
            }
        }
        emit(&out)?;
    }
    if report.not_searched > 0 {
        eprintln!(
            "cbtfs: error: {} volume(s) or point(s) could not be searched (rows marked `not searched` say why): the answer is incomplete",
            report.not_searched
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
