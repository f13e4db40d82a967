//! The command line: the only place that prints for humans.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, CommandFactory, Parser, Subcommand};
use serde_json::json;

mod copy;
mod health;
mod job;
mod key;
mod secret;
pub mod text;
use secret::SecretSources;
use text::{count, plural};

use crate::export;
use crate::import::{self, ImportRequest, ImportSource};
use crate::naming::{Tree, point_name};
use crate::read::PointReader;
use crate::repo::stats::SpaceStats;
use crate::repo::{Repository, valid_uuid};
use crate::verify::{self, VerifyReport};
use crate::{BLOCK_SIZE, blocks_for, timefmt};

/// A percentage in (0, 100].
fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (like 10 or 2.5)"))?;
    if v > 0.0 && v <= 100.0 {
        Ok(v)
    } else {
        Err(format!("{s} is not between 0 (excluded) and 100"))
    }
}

/// Exit status when `verify` finds damage (1 is any other error, 2 a usage error).
pub const EXIT_DAMAGE: u8 = 3;

/// Exit status of a usage error (as clap exits).
const EXIT_USAGE: u8 = 2;

/// The environment variable naming the repository when a command's REPO is left out.
pub const REPO_ENV: &str = "CBTFS_REPO";

const REPO_HELP: &str = "The repository directory (made by `cbtfs init`), or s3://BUCKET/PREFIX for one in an S3 bucket. May be left out when CBTFS_REPO names it";

const POINT_HELP: &str = "A restore point: VM/DISK/SET/POINT as `cbtfs ls` shows it, VM/DISK/latest, VM/DISK@TIME, VDI_UUID@latest or VDI_UUID@TIME (the newest point at or before TIME, UTC: 2026-01-05, 2026-01-05 02:00, 2026-01-05T02:00:00Z), or a point file's path in a cbtfs mount";

const JSON_HELP: &str = "Print the result as JSON on standard output; an error becomes {\"error\": {\"code\", \"message\", \"done\"}} there too";

const USER_HELP: &str = "The user to log in to the host's management API as";

const TOP_AFTER_HELP: &str = "\
Examples:
  cbtfs init /backup/repo
  cbtfs backup /backup/repo --host https://xcp-ng-master.lan --password-file /root/.xcp-password --vm web01
  cbtfs ls /backup/repo

Environment:
  CBTFS_REPO                the repository of every command whose REPO is left out (CBTFS_REPO=/backup/repo)
  CBTFS_REPO_PASSWORD_FILE  a file whose first line is the repository's password (as --repo-password-file)
  CBTFS_REPO_PASSWORD       the repository's password itself, when no file names it
  CBTFS_KEY_FILE            a key file that opens the repository (as --key-file)
  CBTFS_TO_KEY_FILE, CBTFS_TO_REPO_PASSWORD_FILE, CBTFS_TO_REPO_PASSWORD
                            the same for `cbtfs copy`'s destination
  CBTFS_CACHE_DIR           where caches are kept (as --cache-dir; default $XDG_CACHE_HOME/cbtfs, else ~/.cache/cbtfs)
  CBTFS_CACHE_SIZE          most bytes of pack ranges an S3 repository's cache keeps (as --cache-size; default 1G)
  CBTFS_PASSWORD            the host's password when --password-file is not given
  CBTFS_LOG                 log detail on standard error: warn (default), info, debug
  CBTFS_S3_ENDPOINT         the S3 endpoint of s3://BUCKET/PREFIX repositories (as --s3-endpoint)
  CBTFS_S3_ATTEMPTS         attempts per S3 request before giving up (default 6, with back-off)
  CBTFS_S3_TIMEOUT          seconds an S3 request may go without a byte before it is retried (default 30)
  CBTFS_S3_BACKOFF_MS       milliseconds before an S3 request's first retry, doubled after each (default 200)
  CBTFS_CONFIG              the configuration file of backup jobs (default /etc/cbtfs/cbtfs.toml)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION   S3 credentials and region";

/// The mount's `-o` options, with the defaults the mount really uses.
fn mount_options_help() -> String {
    format!(
        "Mount options, comma-separated: allow_other (every user may read the mount), allow_root, \
         log_file=FILE, key_file=FILE or repo_password_file=FILE (what opens an encrypted \
         repository, for fstab), s3_endpoint=URL, s3_ca_cert=FILE, s3_virtual_hosted, \
         s3_credentials_file=FILE and s3_profile=NAME (an s3:// repository's endpoint and \
         credentials, for fstab; as --s3-endpoint, AWS_SHARED_CREDENTIALS_FILE, AWS_PROFILE), \
         threads=N (threads serving reads, 1 to 64; default {threads}), \
         prefetch=MiB (read-ahead of each sequential reader, 0 turns it off, at most 1024; \
         default {prefetch}), cache_dir=DIR and cache_size=SIZE (as --cache-dir and \
         --cache-size), nonempty (mount over a directory that is not empty, hiding what is \
         there; refused without it), nodev, nosuid, noexec, noatime (and dev, suid, exec, atime, \
         nodiratime, relatime, strictatime, sync, async, dirsync); ro and default_permissions \
         always hold; fstab's defaults/auto/noauto/user/users/nouser/owner/group/_netdev/nofail/\
         comment/loop/x-* are accepted and ignored; rw is refused",
        threads = crate::mount::DEFAULT_THREADS,
        prefetch = crate::mount::DEFAULT_PREFETCH_MIB,
    )
}

#[derive(Parser, Debug)]
#[command(
    name = "cbtfs",
    version,
    about = "Incremental backups of XenServer/XCP-ng disks with Changed Block Tracking, and their history as files.",
    after_help = TOP_AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The repository's password, read from the first line of FILE (never give it on the
    /// command line). Also CBTFS_REPO_PASSWORD_FILE, or CBTFS_REPO_PASSWORD
    #[arg(long, global = true, value_name = "FILE")]
    repo_password_file: Option<PathBuf>,
    /// A key file that opens the repository (made by `cbtfs init --key-file` or `cbtfs key
    /// add --new-key-file`). Also CBTFS_KEY_FILE
    #[arg(long, global = true, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// The S3 endpoint of an s3://BUCKET/PREFIX repository (https://…; http:// only for a test
    /// endpoint on a trusted network). Also CBTFS_S3_ENDPOINT or AWS_ENDPOINT_URL; AWS itself
    /// when none. Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, else
    /// ~/.aws/credentials (AWS_PROFILE); the region from AWS_REGION (default us-east-1)
    #[arg(long, global = true, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// A PEM file of the private CA that signed the S3 endpoint's certificate
    #[arg(long, global = true, value_name = "FILE")]
    s3_ca_cert: Option<PathBuf>,
    /// Address the bucket virtual-hosted style (https://BUCKET.ENDPOINT/KEY) instead of
    /// path style (https://ENDPOINT/BUCKET/KEY, the default with --s3-endpoint)
    #[arg(long, global = true)]
    s3_virtual_hosted: bool,
    /// Where caches are kept: a repository's in DIR/<repository id>/ (its chunk index, and for
    /// a repository on S3 its metadata and recently read pack ranges). Also CBTFS_CACHE_DIR;
    /// default $XDG_CACHE_HOME/cbtfs, else ~/.cache/cbtfs
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Most bytes of pack ranges an S3 repository's cache keeps (least recently used dropped
    /// first), e.g. 512M, 4G. Also CBTFS_CACHE_SIZE; default 1G
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_cache_size)]
    cache_size: Option<u64>,
}

fn parse_cache_size(s: &str) -> std::result::Result<u64, String> {
    crate::repo::store::cache::parse_size(s)
}

/// Where this run's repository secret comes from (set once, before any command runs).
static SECRET_SOURCES: std::sync::OnceLock<SecretSources> = std::sync::OnceLock::new();

fn secret_sources() -> SecretSources {
    SECRET_SOURCES.get().cloned().unwrap_or_default()
}

// Parsed once per run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new, empty repository.
    ///
    /// It is encrypted unless --encryption none: its key is wrapped by a password or a key file
    /// (a key slot); `cbtfs key add` adds more.
    #[command(after_help = "\
Examples:
  cbtfs init /backup/repo --key-file /root/cbtfs.key    # makes the key file: keep a copy elsewhere
  cbtfs init /backup/repo --repo-password-file /root/.cbtfs-password
  cbtfs init /backup/local-only --encryption none
  export CBTFS_REPO=/backup/repo CBTFS_KEY_FILE=/root/cbtfs.key    # later commands may leave REPO out")]
    Init {
        /// The directory to create (or an empty one). May be left out when CBTFS_REPO names it.
        repo: PathBuf,
        /// `none` stores the repository unencrypted (integrity tags only; `cbtfs ls` shows it).
        /// The default encrypts everything with a key held in key slots: a password (from
        /// --repo-password-file, CBTFS_REPO_PASSWORD_FILE, CBTFS_REPO_PASSWORD or a prompt) or a
        /// key file (--key-file FILE: made if it does not exist)
        #[arg(long, value_name = "MODE", default_value = "on", value_parser = ["on", "none"])]
        encryption: String,
        /// S3 only: write every object with an Object Lock retention of DAYS (the bucket must
        /// have versioning and Object Lock enabled). Locked objects cannot be deleted or
        /// replaced, even with cbtfs's own keys; `cbtfs gc` extends the locks of what is still
        /// referenced and deletes garbage once its lock has ended
        #[arg(long, value_name = "DAYS")]
        object_lock: Option<u32>,
        /// compliance (the default: nobody can shorten a lock or delete a locked object before
        /// its date, which is what protects backups from ransomware holding the backup
        /// server's keys) or governance (users allowed to bypass governance retention can: an
        /// administrator can undo a mistake, but keys with that right give no protection)
        #[arg(long, value_name = "MODE", default_value = "compliance", value_parser = ["compliance", "governance"], requires = "object_lock")]
        object_lock_mode: String,
    },
    /// Add a restore point from a raw disk image or an NBD export.
    ///
    /// Without --bitmap the image is a full base starting a new set; with it, only the blocks the
    /// CBT bitmap marks as changed are read and stored.
    #[command(after_help = "\
Examples:
  cbtfs import /backup/repo --vdi 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b --vm-name web01 --raw web01-xvda.img
  xe vdi-list-changed-blocks vdi-from-uuid=SNAP_MONDAY vdi-to-uuid=SNAP_TUESDAY > changed.b64
  cbtfs import /backup/repo --vdi 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b --raw tuesday.img --bitmap changed.b64")]
    #[command(group(ArgGroup::new("source").required(true).args(["raw", "nbd"])))]
    Import {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        /// The disk's VDI uuid (`xe vm-disk-list vm=web01` shows it).
        #[arg(long, value_name = "VDI_UUID")]
        vdi: String,
        /// The disk's name (default: the name it already has, else disk-<uuid prefix>).
        #[arg(long)]
        name: Option<String>,
        /// The uuid of the VM owning the disk.
        #[arg(long, value_name = "VM_UUID")]
        vm_uuid: Option<String>,
        /// The name of the VM owning the disk.
        #[arg(long, value_name = "VM_NAME")]
        vm_name: Option<String>,
        /// A raw image (or block device) holding the disk as it was at the snapshot.
        #[arg(long, value_name = "IMAGE")]
        raw: Option<PathBuf>,
        /// An NBD export holding the disk: nbd://HOST[:PORT]/EXPORT, nbds://… (TLS), or
        /// nbd+unix:///EXPORT?socket=PATH.
        #[arg(long, value_name = "URI")]
        nbd: Option<String>,
        /// NBD connections in parallel (at most 16, XenServer's limit per host).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// The server's own certificate (PEM), trusted by exact match (nbds:// only).
        #[arg(
            long,
            value_name = "PEM",
            requires = "tls_subject",
            conflicts_with = "ca_cert"
        )]
        tls_cert: Option<PathBuf>,
        /// The name the server's certificate must be issued for (default: the URI's host).
        #[arg(long, value_name = "NAME")]
        tls_subject: Option<String>,
        /// A CA bundle (PEM) that signed the server's certificate (nbds:// only).
        #[arg(long, value_name = "PEM")]
        ca_cert: Option<PathBuf>,
        /// Seconds an NBD read may take before it is retried on another connection.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        timeout: u64,
        /// A file holding the base64 bitmap from VDI.list_changed_blocks (`-` reads standard
        /// input). Without it, the image starts a new set as its full base.
        #[arg(long, value_name = "FILE")]
        bitmap: Option<PathBuf>,
        /// Snapshot time, UTC unless an offset is given: 2026-11-21T02:00:00Z, 2026-11-21 02:00,
        /// 2026-11-21 (midnight); default now. Must be later than the set's newest point.
        #[arg(long)]
        time: Option<String>,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// List disks, sets and restore points, or the volumes inside a point.
    ///
    /// After each disk's points, a `space` line: the bytes its backups read (before dedup and
    /// compression), its unique chunks, what they take in the repository, and the dedup and
    /// compression ratios. The last line sums up the repository: encrypted or not, its bytes on
    /// storage, and the same figures over every disk (a chunk shared by disks counts once).
    /// With --volumes POINT: the partitions and LVM volumes inside that point.
    #[command(after_help = "\
Examples:
  cbtfs ls /backup/repo
  cbtfs ls /backup/repo --volumes web01/xvda/20260104T020000Z/20260105T020000Z")]
    Ls {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        /// List the volumes inside this point: MBR/GPT partitions, LVM2 logical volumes, and
        /// what cannot be read as a plain volume, with the reason.
        #[arg(long, value_name = "POINT")]
        volumes: Option<String>,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Write a restore point as a raw image (sparse file, block device, or `-` for stdout).
    #[command(after_help = "\
Examples:
  cbtfs export /backup/repo web01/xvda/20260104T020000Z/20260105T020000Z /var/tmp/web01-xvda.raw
  cbtfs export /backup/repo 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b@2026-01-05 - | gzip > db01-xvda.raw.gz")]
    Export {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        #[arg(help = POINT_HELP)]
        point: String,
        /// The output: a file (created sparse), a block device, or `-` for standard output.
        out: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
        /// Image format to write (default: from OUT's extension: .qcow2, .vhd (vpc), .vhdx,
        /// .vmdk, .vdi are converted with qemu-img; anything else is raw).
        #[arg(long, value_parser = ["raw", "qcow2", "vpc", "vhdx", "vmdk", "vdi"])]
        format: Option<String>,
    },
    /// Mount the repository read-only: every restore point appears as a raw disk image file.
    #[command(after_help = "\
Examples:
  cbtfs mount /backup/repo /mnt/backups -o allow_other
  qemu-img info /mnt/backups/web01/xvda/20260104T020000Z/20260105T020000Z.raw
  umount /mnt/backups")]
    Mount {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        /// The directory to mount on (it must be empty, unless -o nonempty).
        mountpoint: PathBuf,
        /// Stay in the foreground, logging to standard error (default: a daemon logging to
        /// syslog, or to log_file=FILE).
        #[arg(short, long)]
        foreground: bool,
        #[arg(short = 'o', value_name = "OPTIONS", help = mount_options_help())]
        options: Vec<String>,
    },
    /// Check the guest filesystems of points, each with its own read-only checker.
    ///
    /// e2fsck, xfs_repair, ntfsfix, fsck.vfat or btrfs check runs on a copy-on-write overlay of
    /// each volume (journals are replayed into the overlay first): the points are never
    /// modified. Every volume is clean, journal (clean once its journal is replayed), damaged
    /// or unchecked (with why). Exit status 0 all clean or journal, 3 something damaged or
    /// unchecked, 4 nothing could be checked.
    #[command(after_help = "\
Examples:
  cbtfs fsck /backup/repo                   # the newest point of every disk
  cbtfs fsck /backup/repo web01/xvda/20260104T020000Z/20260105T020000Z --json")]
    Fsck {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        /// Points to check (as `cbtfs ls` names them); none: the newest point of every disk.
        points: Vec<String>,
        /// Seconds one checker may run before it is stopped (the volume is then unchecked).
        #[arg(long, value_name = "SECS", default_value_t = 3600)]
        timeout: u64,
        /// Points checked at once.
        #[arg(long, value_name = "N", default_value_t = 1)]
        parallel: usize,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Mount every filesystem inside a point under DIR, read-only.
    ///
    /// One folder per partition or LVM volume, named like the files in POINT.parts/ of the
    /// mount. `cbtfs browse --unmount DIR` ends it.
    #[command(
        override_usage = "cbtfs browse [OPTIONS] REPO POINT DIR\n       cbtfs browse --unmount DIR",
        after_help = "\
Examples:
  cbtfs browse /backup/repo web01/xvda/20260104T020000Z/20260105T020000Z /mnt/web01
  cp -a /mnt/web01/p1/etc/nginx /root/nginx-restored
  cbtfs browse --unmount /mnt/web01"
    )]
    Browse {
        /// REPO POINT DIR (REPO may be left out when CBTFS_REPO names it); with --unmount, DIR
        /// only.
        #[arg(num_args = 1..=3, required = true, value_name = "ARGS")]
        args: Vec<PathBuf>,
        /// End the browse of DIR (a live one, or one whose process died): unmounts everything
        /// and removes its loop devices, overlay and temporary files.
        #[arg(long)]
        unmount: bool,
        /// Stay in the foreground until Ctrl-C (default: a background process).
        #[arg(short, long)]
        foreground: bool,
        /// Use only FUSE drivers (fuse2fs, ntfs-3g, fusefat): no kernel code parses the guest's
        /// filesystems. Slower, and XFS/Btrfs cannot be browsed this way.
        #[arg(long)]
        userspace: bool,
    },
    /// List files added (A), removed (D) and modified (M) between two points of the same disk.
    ///
    /// The changes are listed per volume; only what the changed-block bitmaps say may differ is
    /// read.
    #[command(after_help = "\
Examples:
  cbtfs diff /backup/repo web01/xvda/20260104T020000Z/20260104T020000Z web01/xvda/20260104T020000Z/20260105T020000Z
  cbtfs diff /backup/repo 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b@2026-01-04 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b@2026-01-05 p1/etc")]
    Diff {
        /// The repository directory (made by `cbtfs init`). May be left out when CBTFS_REPO
        /// names it and PATH is not given.
        repo: PathBuf,
        /// The older point (any form `cbtfs export` takes).
        point_a: String,
        /// The newer point, of the same disk.
        point_b: String,
        /// Only under this path: VOLUME/PATH (e.g. p1/etc), or a path within every volume.
        path: Option<String>,
        /// Use only FUSE drivers to read the filesystems (see `browse --userspace`).
        #[arg(long)]
        userspace: bool,
        /// Print the changes and counters as JSON (no summary on standard error).
        #[arg(long)]
        json: bool,
    },
    /// Back up the disks of a VM, or one disk, from a XenServer/XCP-ng host.
    ///
    /// Changed block tracking makes it incremental: a full base the first time (or when CBT was
    /// reset), afterwards only the changed blocks.
    #[command(after_help = "\
Examples:
  cbtfs backup /backup/repo --host https://xcp-ng-master.lan --password-file /root/.xcp-password --vm web01
  xe vm-disk-list vm=db01 params=uuid    # the VDI uuids of db01's disks
  cbtfs backup /backup/repo --host https://xcp-ng-master.lan --vdi 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b --json")]
    #[command(group(ArgGroup::new("target").required(true).args(["vm", "vdi"])))]
    Backup {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        /// The host (pool master): https://HOST[:PORT].
        #[arg(long, value_name = "URL")]
        host: String,
        #[arg(long, default_value = "root", help = USER_HELP)]
        user: String,
        /// A file holding the password (else the CBTFS_PASSWORD environment variable).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Back up every disk of this VM (uuid or name).
        #[arg(long)]
        vm: Option<String>,
        /// Back up this one disk (VDI uuid).
        #[arg(long, value_name = "VDI_UUID")]
        vdi: Option<String>,
        /// A CA bundle (PEM) that signed the host's certificate (default: pin the host's own
        /// certificate on first use).
        #[arg(long, value_name = "PEM")]
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
        #[arg(long, value_name = "SECONDS", default_value_t = 120)]
        timeout: u64,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Put a restore point back into a host: one disk, or a whole VM.
    ///
    /// One disk goes over an existing VDI (--to-vdi) or into a new one (--new-vdi). A whole VM
    /// (every disk of the point's backup run) goes into a new VM (--new-vdi --new-vm) or over a
    /// halted VM's disks (--to-vm).
    #[command(after_help = "\
Examples:
  cbtfs restore /backup/repo web01/xvda/20260104T020000Z/20260105T020000Z --host https://xcp-ng-master.lan --to-vdi 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b
  xe sr-list name-label='Local storage' params=uuid    # an SR for --new-vdi
  cbtfs restore /backup/repo 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b@2026-01-05 --host https://xcp-ng-master.lan --new-vdi --sr SR_UUID --new-vm")]
    #[command(group(ArgGroup::new("target").required(true).args(["to_vdi", "new_vdi", "to_vm"])))]
    Restore {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        #[arg(help = POINT_HELP)]
        point: String,
        /// The host (pool master): https://HOST[:PORT].
        #[arg(long, value_name = "URL")]
        host: String,
        #[arg(long, default_value = "root", help = USER_HELP)]
        user: String,
        /// A file holding the password (else the CBTFS_PASSWORD environment variable).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Overwrite this VDI (uuid); it must have the point's size and not be attached.
        #[arg(long, value_name = "VDI_UUID")]
        to_vdi: Option<String>,
        /// Overwrite the disks of this halted VM (uuid) with every disk of the point's backup
        /// run: matched by VDI when it is the VM backed up, else by position (userdevice).
        #[arg(long, value_name = "VM_UUID", conflicts_with = "new_vm")]
        to_vm: Option<String>,
        /// Create a new VDI (in --sr) with the point's size.
        #[arg(long, requires = "sr")]
        new_vdi: bool,
        /// The SR (uuid) for --new-vdi.
        #[arg(long, value_name = "SR_UUID")]
        sr: Option<String>,
        /// The name of the new VDI (default: the disk's name and the point's time); with
        /// --new-vm, the name of the point's own disk (the others get the default).
        #[arg(long)]
        name: Option<String>,
        /// Also create a VM from the point's saved VM metadata: every disk of the point's backup
        /// run is restored into a new VDI and mapped into it.
        #[arg(long, requires = "new_vdi")]
        new_vm: bool,
        /// A CA bundle (PEM) that signed the host's certificate.
        #[arg(long, value_name = "PEM")]
        ca_cert: Option<PathBuf>,
        /// Do not check the host's certificate at all.
        #[arg(long, conflicts_with = "ca_cert")]
        insecure_tls: bool,
        /// Skip reading a sample of the restored VDI back.
        #[arg(long)]
        no_verify: bool,
        /// Seconds the host may take to accept a connection, to start answering an API call or
        /// an HTTP transfer, or between bytes of an answer.
        #[arg(long, value_name = "SECONDS", default_value_t = 120)]
        timeout: u64,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Remove old restore points by retention policy.
    ///
    /// What a removed point holds is taken over by the next kept point, so every kept point
    /// stays byte-identical. Prune writes only metadata (a new index and manifest for each kept
    /// point that takes removed ones over; no data is rewritten), then runs `cbtfs gc` to delete
    /// the chunks no point references any more: that frees the space (--no-gc leaves it to a
    /// later `cbtfs gc`).
    #[command(after_help = "\
Examples:
  cbtfs prune /backup/repo --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --dry-run
  cbtfs prune /backup/repo --keep-last 14 --vdi 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b")]
    Prune {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        /// Keep the newest N points of each disk.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_last: usize,
        /// Keep the newest point of each of the newest N hours.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_hourly: usize,
        /// Keep the newest point of each of the newest N days.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_daily: usize,
        /// Keep the newest point of each of the newest N ISO weeks.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_weekly: usize,
        /// Keep the newest point of each of the newest N months.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_monthly: usize,
        /// Keep the newest point of each of the newest N years.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_yearly: usize,
        /// Keep every point taken within DURATION before the disk's newest point (30d, 12h,
        /// 2w, 1y, 1d12h).
        #[arg(long, value_name = "DURATION", value_parser = parse_within)]
        keep_within: Option<u64>,
        /// Prune only this disk (VDI uuid).
        #[arg(long, value_name = "VDI_UUID")]
        vdi: Option<String>,
        /// Show what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only drop the points from the metadata; leave deleting the data nothing references
        /// any more to a later `cbtfs gc`.
        #[arg(long)]
        no_gc: bool,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Copy restore points into another repository (the offsite copy), incrementally.
    ///
    /// Every point of SRC (or of the VMs --vm names, taken at or after --since) that DST does
    /// not have yet is copied with its set structure, names and VM metadata; only the chunks
    /// DST lacks are stored. A second run copies only the points made since; a killed run is
    /// finished by the next. DST keeps points SRC has pruned since (prune DST on its own).
    /// DST's secret comes from --to-key-file, --to-repo-password-file or CBTFS_TO_KEY_FILE,
    /// CBTFS_TO_REPO_PASSWORD_FILE, CBTFS_TO_REPO_PASSWORD (never SRC's). Exit status 1 if a
    /// selected point could not be copied.
    #[command(after_help = "\
Examples:
  cbtfs copy /backup/repo /mnt/offsite/repo --key-file /root/cbtfs.key --to-key-file /root/offsite.key
  cbtfs copy /backup/repo /mnt/offsite/repo --vm web01 --since 2026-01-01 --dry-run")]
    Copy {
        /// The source repository. May be left out when CBTFS_REPO names it.
        repo: PathBuf,
        /// The destination repository (made by `cbtfs init`, with its own key).
        dst: PathBuf,
        /// Only this VM's disks (its name as `cbtfs ls` shows it, or its uuid); repeatable.
        #[arg(long, value_name = "VM")]
        vm: Vec<String>,
        /// Only points taken at or after this time: 2026-01-05, 2026-01-05T00:00:00Z or
        /// 20260105T000000Z (UTC).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Show what would be copied; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// A key file that opens the destination. Also CBTFS_TO_KEY_FILE
        #[arg(long, value_name = "FILE")]
        to_key_file: Option<PathBuf>,
        /// The destination's password, read from the first line of FILE. Also
        /// CBTFS_TO_REPO_PASSWORD_FILE, or CBTFS_TO_REPO_PASSWORD
        #[arg(long, value_name = "FILE")]
        to_repo_password_file: Option<PathBuf>,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Undo deletions and overwrites made behind cbtfs's back in a repository on a versioned
    /// S3 bucket (what `cbtfs verify` names): remove delete markers nobody recorded, put the
    /// versions cbtfs wrote back on top.
    #[command(after_help = "\
Examples:
  cbtfs verify s3://backups/site1     # names what was deleted or overwritten
  cbtfs repair s3://backups/site1 --undelete")]
    Repair {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        /// Remove foreign delete markers and newer versions (the only repair so far).
        #[arg(long, required = true)]
        undelete: bool,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Delete the data no restore point references any more, and repack mostly empty packs.
    ///
    /// Takes the repository's writer lock (it waits for no backup: a running one makes it
    /// fail). `cbtfs prune` runs it already unless --no-gc.
    #[command(after_help = "\
Examples:
  cbtfs gc /backup/repo --dry-run
  cbtfs gc /backup/repo --repack-below 20 --json")]
    Gc {
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        /// Show what would be deleted and repacked; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Repack a pack when its live data is below PERCENT of it (its live chunks are copied
        /// into a new pack and it is deleted); 0 never repacks.
        #[arg(
            long,
            value_name = "PERCENT",
            default_value_t = crate::repo::gc::DEFAULT_REPACK_BELOW,
            value_parser = clap::value_parser!(u8).range(0..=100)
        )]
        repack_below: u8,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Manage the key slots of an encrypted repository: the passwords and key files that open it.
    #[command(after_help = "\
Examples:
  cbtfs key list /backup/repo --key-file /root/cbtfs.key
  cbtfs key add /backup/repo --key-file /root/cbtfs.key --new-password-file /root/.cbtfs-password
  cbtfs key passwd /backup/repo --repo-password-file /root/.old-password --new-password-file /root/.new-password")]
    Key {
        #[command(subcommand)]
        action: key::KeyAction,
    },
    /// The configuration file of backup jobs (/etc/cbtfs/cbtfs.toml): check it.
    #[command(after_help = "\
Examples:
  cbtfs config check
  cbtfs config check --config /etc/cbtfs/cbtfs.toml --offline")]
    Config {
        #[command(subcommand)]
        action: job::ConfigAction,
    },
    /// Backup jobs of the configuration file: list them, run one, their last runs, their
    /// health checks, their systemd units.
    #[command(after_help = "\
Examples:
  cbtfs job list
  cbtfs job run nightly
  cbtfs job status
  cbtfs job check nightly
  cbtfs job units --dir /etc/systemd/system
  cbtfs job list --config /etc/cbtfs/cbtfs.toml --json")]
    Job {
        #[command(subcommand)]
        action: job::JobAction,
    },
    /// Run a simulated XenServer host (management API, NBD, CBT) for trying cbtfs out.
    #[command(after_help = "\
Examples:
  cbtfs sim --dir /var/tmp/sim --disk xvda=/var/tmp/web01-xvda.raw --vm-name web01
  cbtfs backup /backup/repo --host https://127.0.0.1:PORT --password-file /var/tmp/sim/password --vm web01")]
    Sim {
        /// The working directory (certificate, disk layers, password file).
        #[arg(long)]
        dir: PathBuf,
        /// A disk of the VM: NAME=RAW_IMAGE (repeatable).
        #[arg(long = "disk", value_name = "NAME=IMAGE")]
        disks: Vec<String>,
        /// The simulated VM's name.
        #[arg(long, default_value = "sim-vm")]
        vm_name: String,
        /// The address to listen on (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: String,
        /// The NBD network: nbd (TLS), insecure (plain) or none.
        #[arg(long, default_value = "nbd")]
        nbd: String,
        /// Answer XML-RPC only (an older host).
        #[arg(long)]
        xmlrpc_only: bool,
    },
    /// Run the whole job on a built-in example: a guest filesystem, daily backups, exports.
    #[command(after_help = "\
Examples:
  cbtfs demo
  cbtfs demo /var/tmp/cbtfs-demo")]
    Demo {
        /// The working directory (recreated; default: $TMPDIR/cbtfs-demo).
        dir: Option<PathBuf>,
    },
    /// Check every checksum and structure; exit status 3 if anything is damaged.
    #[command(after_help = "\
Examples:
  cbtfs verify /backup/repo
  cbtfs verify /backup/repo web01/xvda/20260104T020000Z/20260105T020000Z --json")]
    Verify {
        /// The repository directory (made by `cbtfs init`). May be left out when CBTFS_REPO
        /// names it and POINT is not given.
        repo: PathBuf,
        /// Check only this point (and the points it depends on); any form `cbtfs export` takes.
        point: Option<String>,
        /// Read and authenticate only about PERCENT of the stored chunks, chosen at random each
        /// run (every manifest, index and reference is still checked). Default: all of them
        #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
        sample: Option<f64>,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Print a shell completion script generated from these definitions.
    #[command(after_help = "\
Examples:
  cbtfs completions bash > /usr/share/bash-completion/completions/cbtfs
  cbtfs completions zsh > /usr/local/share/zsh/site-functions/_cbtfs
  cbtfs completions fish > /usr/share/fish/vendor_completions.d/cbtfs.fish")]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Write man pages: cbtfs.1 and one cbtfs-COMMAND.1 per command.
    #[command(after_help = "\
Examples:
  cbtfs man /usr/local/share/man/man1
  man cbtfs-backup")]
    Man {
        /// The directory to write the pages into (created if missing).
        dir: PathBuf,
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
        #[arg(help = REPO_HELP)]
        repo: PathBuf,
        #[arg(help = POINT_HELP)]
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
        #[arg(help = REPO_HELP)]
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
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let json = wants_json(&args);
    let cli = match parse_args(args, std::env::var_os(REPO_ENV)) {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e, json),
    };
    let _ = SECRET_SOURCES.set(SecretSources {
        password_file: cli.repo_password_file.clone(),
        key_file: cli.key_file.clone(),
    });
    let mut s3 = crate::repo::store::s3::S3CliOptions {
        endpoint: cli.s3_endpoint.clone(),
        ca_cert: cli.s3_ca_cert.clone(),
        virtual_hosted: cli.s3_virtual_hosted,
    };
    // A mount's -o may name them too (fstab lines have no flags and no environment). Options
    // that do not parse are reported when the mount runs.
    if let Command::Mount { options, .. } = &cli.command
        && let Ok(o) = crate::mount::parse_options(options)
    {
        s3.endpoint = s3.endpoint.or(o.s3_endpoint);
        s3.ca_cert = s3.ca_cert.or(o.s3_ca_cert);
        s3.virtual_hosted |= o.s3_virtual_hosted;
        for (var, value) in [
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                o.s3_credentials_file.map(|p| p.into_os_string()),
            ),
            ("AWS_PROFILE", o.s3_profile.map(OsString::from)),
        ] {
            if let Some(v) = value {
                // SAFETY: at start-up, before this process has started any other thread.
                unsafe { std::env::set_var(var, v) };
            }
        }
    }
    crate::repo::store::s3::set_cli_options(s3);
    crate::repo::store::cache::set_options(crate::repo::store::cache::CacheOptions {
        dir: cli.cache_dir.clone(),
        size: cli.cache_size,
        // verify reads what is stored, never a local copy.
        off: matches!(cli.command, Command::Verify { .. }),
    });
    // Commands that print data end quietly when their reader goes away (`cbtfs ls | head`,
    // `cbtfs export ... - | cmp`). The others keep SIGPIPE ignored: a server closing a socket
    // must surface as an error to retry, never kill the process.
    if matches!(
        cli.command,
        Command::Ls { .. }
            | Command::Export { .. }
            | Command::Verify { .. }
            | Command::Completions { .. }
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
        tracing_subscriber::fmt()
            .with_env_filter(crate::mount::log_filter())
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .init();
    }
    let done = Done::default();
    match run(cli, &done) {
        Ok(code) => code,
        Err(e) if json => {
            println!(
                "{}",
                error_json(error_code(&e), &error_text(&e), done.items())
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cbtfs: error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// True when the command line asks for JSON (`--json` before any `--`): then even a usage
/// error clap finds is reported as JSON.
fn wants_json(args: &[OsString]) -> bool {
    args.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

/// Parse the command line. A command whose REPO was left out (clap finds a positional missing)
/// takes it from `repo_env` (CBTFS_REPO): the value is inserted as the first positional, right
/// after the command's name (after the action's, for `key list`), and the line parsed again. A
/// REPO given on the line always wins.
fn parse_args(args: Vec<OsString>, repo_env: Option<OsString>) -> Result<Cli, clap::Error> {
    let first = match Cli::try_parse_from(&args) {
        Ok(cli) => return Ok(cli),
        Err(e) => e,
    };
    let Some(repo) = repo_env.filter(|r| !r.is_empty()) else {
        return Err(first);
    };
    if first.kind() != clap::error::ErrorKind::MissingRequiredArgument
        || !missing_positional(&first)
    {
        return Err(first);
    }
    // The command's name: the first argument that is neither an option nor the value of a
    // global option taking one (--repo-password-file FILE, --key-file FILE); for a command with
    // actions (`key list`), the action's name after it.
    let mut cmd = Cli::command();
    let mut from = 1;
    let at = loop {
        let Some(at) = next_positional(&args, from) else {
            return Err(first);
        };
        let Some(sub) = args
            .get(at)
            .and_then(|a| cmd.find_subcommand(a.to_string_lossy().as_ref()))
            .cloned()
        else {
            return Err(first);
        };
        if sub.has_subcommands() {
            cmd = sub;
            from = at + 1;
            continue;
        }
        if !takes_repo(&sub) {
            return Err(first);
        }
        break at;
    };
    let mut with = args;
    with.insert(at + 1, repo);
    match Cli::try_parse_from(with) {
        Ok(cli) => Ok(cli),
        // One positional too many now: the line had its REPO; what clap said first is the news.
        Err(e) if e.kind() == clap::error::ErrorKind::UnknownArgument => Err(first),
        Err(e) => Err(e),
    }
}

/// True when clap's missing-argument error names a positional (`<REPO>`), not only options.
fn missing_positional(e: &clap::Error) -> bool {
    use clap::error::{ContextKind, ContextValue};
    match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::Strings(v)) => {
            v.iter().any(|a| a.starts_with('<') && !a.starts_with("<-"))
        }
        Some(ContextValue::String(a)) => a.starts_with('<') && !a.starts_with("<-"),
        _ => false,
    }
}

/// The position of the first argument from `from` on that is neither an option nor the value
/// of a global option taking one.
fn next_positional(args: &[OsString], from: usize) -> Option<usize> {
    let mut skip_value = false;
    for (i, a) in args.iter().enumerate().skip(from) {
        let a = a.to_string_lossy();
        if skip_value {
            skip_value = false;
            continue;
        }
        if matches!(
            a.as_ref(),
            "--repo-password-file" | "--key-file" | "--s3-endpoint" | "--s3-ca-cert"
        ) {
            skip_value = true;
            continue;
        }
        if !a.starts_with('-') {
            return Some(i);
        }
    }
    None
}

/// True when command `c` takes a REPO positional first (so CBTFS_REPO can stand in for it).
fn takes_repo(c: &clap::Command) -> bool {
    c.get_positionals()
        .next()
        .is_some_and(|a| a.get_id() == "repo")
}

/// Report a usage error clap found: as clap does (help and version print normally), or as a
/// JSON error object under `--json`, with clap's exit status.
fn usage_error(e: &clap::Error, json: bool) -> ExitCode {
    use clap::error::ErrorKind;
    let display = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !json || display {
        let _ = e.print();
        return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE));
    }
    let text = e.render().to_string();
    let text = text.trim();
    let message = text.strip_prefix("error: ").unwrap_or(text);
    println!("{}", error_json("usage", message, Vec::new()));
    ExitCode::from(EXIT_USAGE)
}

/// What a command completed before it failed, reported as `done` in a `--json` error (for a
/// backup: the disks backed up). A command records into it as it goes; most record nothing.
#[derive(Default)]
pub struct Done(Mutex<Vec<serde_json::Value>>);

impl Done {
    pub fn add(&self, item: serde_json::Value) {
        if let Ok(mut v) = self.0.lock() {
            v.push(item);
        }
    }

    pub fn items(&self) -> Vec<serde_json::Value> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// The JSON a failure prints under `--json`: one object on one line.
fn error_json(code: &str, message: &str, done: Vec<serde_json::Value>) -> serde_json::Value {
    json!({ "error": { "code": code, "message": message, "done": done } })
}

/// A stable snake_case code for a failure, from the first typed error in its chain (the
/// outermost context is usually words added by the command line). Scripts branch on it.
fn error_code(e: &anyhow::Error) -> &'static str {
    e.chain().find_map(typed_code).unwrap_or("other")
}

/// The code of one error, when it is a type cbtfs knows; wrappers are opened (a transparent
/// `BackupError::Repo` shows up in the chain as the BackupError only).
fn typed_code(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use crate::backup::BackupError;
    use crate::export::ExportError;
    use crate::host::HostError;
    use crate::import::ImportError;
    use crate::nbd::{FetchError, NbdError};
    use crate::prune::PruneError;
    use crate::repo::RepoError;
    use crate::restore::RestoreError;
    use crate::xapi::XapiError;
    if let Some(e) = e.downcast_ref::<RepoError>() {
        return Some(repo_code(e));
    }
    if let Some(e) = e.downcast_ref::<XapiError>() {
        return Some(xapi_code(e));
    }
    if let Some(e) = e.downcast_ref::<BackupError>() {
        return Some(match e {
            BackupError::Xapi(x) => xapi_code(x),
            BackupError::Repo(r) => repo_code(r),
            BackupError::Import(i) => typed_code(i).unwrap_or("other"),
            BackupError::Refused(_) => "refused",
        });
    }
    if let Some(e) = e.downcast_ref::<HostError>() {
        return Some(match e {
            HostError::Xapi(x) => xapi_code(x),
            HostError::Repo(r) => repo_code(r),
            HostError::Nbd(n) => typed_code(n).unwrap_or("nbd"),
            HostError::Refused(_) => "refused",
        });
    }
    if let Some(e) = e.downcast_ref::<RestoreError>() {
        return Some(match e {
            RestoreError::Xapi(x) => xapi_code(x),
            RestoreError::Repo(r) => repo_code(r),
            RestoreError::Host(h) => typed_code(h).unwrap_or("other"),
            RestoreError::Refused(_) => "refused",
            RestoreError::Interrupted { .. } => "interrupted",
            RestoreError::Mismatch { .. } => "verify_failed",
        });
    }
    if let Some(e) = e.downcast_ref::<ImportError>() {
        return Some(match e {
            ImportError::Repo(r) => repo_code(r),
            ImportError::Bitmap { .. } | ImportError::ExportTooLarge { .. } => "invalid_input",
            ImportError::Image { .. } | ImportError::ImageRead { .. } => "io",
            ImportError::Fetch(f) => typed_code(f).unwrap_or("nbd"),
            ImportError::Nbd(n) => typed_code(n).unwrap_or("nbd"),
            ImportError::Runtime(_) => "internal",
        });
    }
    if let Some(e) = e.downcast_ref::<crate::copy::CopyFailure>() {
        use crate::copy::CopyFailure;
        return Some(match e {
            CopyFailure::Refused(_) => "refused",
            CopyFailure::Source { source, .. } | CopyFailure::Destination { source, .. } => {
                repo_code(source)
            }
            CopyFailure::Read { .. } => "damaged",
        });
    }
    if let Some(e) = e.downcast_ref::<PruneError>() {
        return Some(match e {
            PruneError::Repo(r) => repo_code(r),
            PruneError::Refused(_) => "refused",
            PruneError::Read { .. } => "damaged",
        });
    }
    if let Some(e) = e.downcast_ref::<ExportError>() {
        return Some(match e {
            ExportError::Read(_) => "damaged",
            ExportError::Exists { .. } => "exists",
            ExportError::IsDirectory { .. } | ExportError::NotAFile { .. } => "invalid_input",
            ExportError::NoQemuImg { .. } => "missing_tool",
            ExportError::Convert { .. } => "convert_failed",
            ExportError::Output { .. } => "io",
        });
    }
    if e.downcast_ref::<crate::read::ReadError>().is_some() {
        return Some("damaged");
    }
    if let Some(e) = e.downcast_ref::<FetchError>() {
        return Some(match e {
            FetchError::Nbd(n) => typed_code(n).unwrap_or("nbd"),
            FetchError::Timeout { .. } => "timeout",
            FetchError::GaveUp { .. } => "nbd",
            FetchError::Sink(_) => "io",
        });
    }
    if let Some(e) = e.downcast_ref::<NbdError>() {
        return Some(match e {
            NbdError::Connect { .. } => "host_unreachable",
            _ => "nbd",
        });
    }
    if e.downcast_ref::<std::io::Error>().is_some() {
        return Some("io");
    }
    if e.downcast_ref::<clap::Error>().is_some() {
        return Some("usage");
    }
    None
}

fn repo_code(e: &crate::repo::RepoError) -> &'static str {
    use crate::repo::RepoError;
    match e {
        RepoError::NotARepository { .. } => "not_a_repository",
        RepoError::UnsupportedVersion { .. } => "unsupported_version",
        RepoError::Corrupt { .. } => "damaged",
        RepoError::Io { .. } => "io",
        RepoError::Locked { .. } => "locked",
        RepoError::Invalid(_) => "invalid_input",
        RepoError::NotFound(_) => "not_found",
        RepoError::OldFormat { .. } => "unsupported_version",
        RepoError::NeedSecret { .. } => "key_needed",
        RepoError::WrongSecret { .. } => "wrong_secret",
    }
}

fn xapi_code(e: &crate::xapi::XapiError) -> &'static str {
    use crate::xapi::{Failure, XapiError};
    match e {
        XapiError::Api(a) => match a.kind() {
            Failure::AuthenticationFailed | Failure::SessionInvalid => "auth_failed",
            Failure::VdiMissing | Failure::HandleInvalid | Failure::UuidInvalid => "not_found",
            Failure::VdiInUse => "in_use",
            Failure::LicenceRestriction => "licence_restricted",
            Failure::SrFull => "sr_full",
            Failure::HostIsSlave(_) => "not_pool_master",
            Failure::VdiIncompatibleType
            | Failure::VdiOnBootResetIncompatible
            | Failure::SrNotAttached
            | Failure::SrHasNoPbds
            | Failure::Unrelated
            | Failure::VdiNoCbtMetadata
            | Failure::Other => "host_refused",
        },
        // The certificate checks fail inside the TLS handshake: the transport's words are all
        // that is left of them.
        XapiError::Transport { detail, .. } if detail.contains("certificate") => "tls_untrusted",
        XapiError::Transport { .. } => "host_unreachable",
        XapiError::Timeout { .. } => "timeout",
        XapiError::Http { .. } | XapiError::Protocol { .. } => "host_error",
        XapiError::CertificateChanged { .. } | XapiError::Pin { .. } => "tls_untrusted",
        XapiError::Config(_) => "invalid_input",
    }
}

/// Write `cbtfs.1` and one `cbtfs-COMMAND.1` per command (nested ones too: `cbtfs-A-B.1`) into
/// `dir`, generated from the clap definitions; returns the pages written.
fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command();
    // Building names every command for its page and usage: `cbtfs-backup`, `cbtfs backup`.
    cmd.build();
    let mut written = Vec::new();
    let mut todo = vec![cmd];
    while let Some(c) = todo.pop() {
        let name = c
            .get_display_name()
            .unwrap_or_else(|| c.get_name())
            .to_string();
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(c.clone())
            .render(&mut page)
            .with_context(|| format!("rendering the man page {name}"))?;
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        todo.extend(
            c.get_subcommands()
                .filter(|s| s.get_name() != "help")
                .cloned(),
        );
    }
    written.sort();
    Ok(written)
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

fn run(cli: Cli, done: &Done) -> Result<ExitCode> {
    match cli.command {
        Command::Init {
            repo,
            encryption,
            object_lock,
            object_lock_mode,
        } => {
            let lock = match object_lock {
                Some(days) => Some(
                    crate::repo::store::s3::lock::LockMode::parse(&object_lock_mode)
                        .and_then(|m| crate::repo::store::s3::lock::ObjectLock::new(days, m))
                        .map_err(anyhow::Error::msg)?,
                ),
                None => None,
            };
            cmd_init(&repo, &encryption, lock)?
        }
        Command::Repair {
            repo,
            undelete: _,
            json,
        } => return cmd_repair(&repo, json),
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
            format,
        } => cmd_export(&repo, &point, &out, force, format.as_deref())?,
        Command::Verify {
            repo,
            point,
            sample,
            json,
        } => return cmd_verify(&repo, point, sample, json),
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
            let secret = match args.as_slice() {
                [repo, _, _] if !unmount => repo_secret(repo)?,
                [_, _] if !unmount => match std::env::var_os(REPO_ENV) {
                    Some(r) => repo_secret(Path::new(&r))?,
                    None => None,
                },
                _ => None,
            };
            let opts = crate::browse::BrowseOptions { userspace, secret };
            match (unmount, args.as_slice()) {
                (true, [dir]) => {
                    let dir = crate::browse::unmount_dir(dir)?;
                    println!("unmounted {}", dir.display());
                }
                (true, _) => {
                    bail!("--unmount takes only the directory: cbtfs browse --unmount DIR")
                }
                (false, [repo, point, dir]) => {
                    let point = point.to_str().context("the point name is not UTF-8")?;
                    crate::browse::browse(repo, point, dir, foreground, &opts, &print_browse)?
                }
                // REPO left out: CBTFS_REPO names it.
                (false, [point, dir])
                    if std::env::var_os(REPO_ENV).is_some_and(|r| !r.is_empty()) =>
                {
                    let repo = PathBuf::from(std::env::var_os(REPO_ENV).unwrap_or_default());
                    let point = point.to_str().context("the point name is not UTF-8")?;
                    crate::browse::browse(&repo, point, dir, foreground, &opts, &print_browse)?
                }
                (false, _) => {
                    bail!(
                        "usage: cbtfs browse REPO POINT DIR (REPO may be left out when CBTFS_REPO names it), or cbtfs browse --unmount DIR"
                    )
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
            let opts = crate::browse::BrowseOptions {
                userspace,
                secret: None,
            };
            let repository = open(&repo)?;
            crate::diff::stop_on_signals();
            let report =
                crate::diff::diff(&repository, &point_a, &point_b, path.as_deref(), &opts)?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
            } else {
                emit(&report.to_text())?;
                eprint!("{}", text::diff_summary(&report));
            }
            // 1: a volume or a file could not be compared (its changes are not all listed).
            if !report.complete() {
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
            // cache_dir= and cache_size= (fstab lines cannot pass flags) over the flags.
            if opts.cache_dir.is_some() || opts.cache_size.is_some() {
                let mut c = crate::repo::store::cache::options();
                c.dir = opts.cache_dir.clone().or(c.dir);
                c.size = opts.cache_size.or(c.size);
                crate::repo::store::cache::set_options(c);
            }
            // fstab lines name the secret in -o; flags and the environment work as anywhere.
            let mut sources = secret_sources();
            if sources.key_file.is_none() {
                sources.key_file = opts.key_file.clone();
            }
            if sources.password_file.is_none() {
                sources.password_file = opts.repo_password_file.clone();
            }
            let _ = SECRET_SOURCES.set(sources.clone());
            let secret = match secret::resolve(&sources, "mount the repository")? {
                Some(s) => Some(s),
                None => repo_secret(&repo)?,
            };
            crate::mount::mount(
                &repo,
                &mountpoint,
                foreground,
                opts,
                secret.as_ref(),
                &|m| eprintln!("cbtfs: {m}"),
            )?
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
                (None, None) => bail!("give --vm VM or --vdi VDI_UUID"),
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
            return cmd_backup(&repo, &opts, json, done);
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
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            keep_within,
            vdi,
            dry_run,
            no_gc,
            json,
        } => {
            let policy = crate::prune::Policy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
                within: keep_within,
            };
            let repository = open(&repo)?;
            if let Some(v) = &vdi
                && !repository.disk_ids()?.contains(v)
            {
                bail!(
                    "--vdi {v}: the repository {} holds no disk with that VDI uuid (`cbtfs ls` lists them); nothing was pruned",
                    repo.display()
                );
            }
            let r = crate::prune::prune(&repository, policy, vdi.as_deref(), dry_run, no_gc)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for d in &r.disks {
                    println!(
                        "{}: {} {} of {}{}{}",
                        d.disk_path,
                        if r.dry_run { "would remove" } else { "removed" },
                        d.removed,
                        count(d.removed + d.kept, "point", "points"),
                        if d.sets_removed > 0 {
                            format!(" ({})", count(d.sets_removed, "whole set", "whole sets"))
                        } else {
                            String::new()
                        },
                        if d.rewritten > 0 {
                            format!(
                                ", {} to absorb them",
                                count(d.rewritten, "kept point rewritten", "kept points rewritten")
                            )
                        } else {
                            String::new()
                        }
                    );
                    if r.dry_run {
                        for (p, l) in d.removed_paths.iter().zip(&d.removed_points) {
                            println!("  remove {}", crate::naming::with_label(Some(p), l));
                        }
                    }
                    for s in &d.skipped_sets {
                        eprintln!(
                            "cbtfs: warning: set {s} of disk {} is damaged and was left alone (cbtfs verify tells more)",
                            d.vdi
                        );
                    }
                }
                println!(
                    "repository objects: {} -> {} ({} {})",
                    human(r.bytes_before),
                    human(r.bytes_after),
                    human(r.bytes_before.saturating_sub(r.bytes_after)),
                    if r.dry_run {
                        "would be reclaimed"
                    } else {
                        "reclaimed"
                    }
                );
                for (vdi, holder) in &r.busy_disks {
                    eprintln!(
                        "cbtfs: warning: disk {vdi} was not pruned: it is being written ({holder}); the next prune takes it"
                    );
                }
                match &r.gc {
                    Some(g) => println!("garbage collection: {}", gc_summary(g)),
                    None if r.gc_deferred.is_some() => println!(
                        "garbage collection: {}",
                        r.gc_deferred
                            .as_ref()
                            .map(|d| d.describe())
                            .unwrap_or_default()
                    ),
                    None if no_gc && !r.dry_run => println!(
                        "garbage collection: not run (--no-gc); `cbtfs gc {}` deletes the data no point references any more",
                        repo.display()
                    ),
                    None => {}
                }
            }
        }
        Command::Copy {
            repo,
            dst,
            vm,
            since,
            dry_run,
            to_key_file,
            to_repo_password_file,
            json,
        } => {
            let to = SecretSources {
                password_file: to_repo_password_file,
                key_file: to_key_file,
            };
            return copy::run(&repo, &dst, vm, since, dry_run, &to, json, done);
        }
        Command::Gc {
            repo,
            dry_run,
            repack_below,
            json,
        } => cmd_gc(&repo, dry_run, repack_below, json)?,
        Command::Key { action } => key::run(action)?,
        Command::Config { action } => job::run_config(action)?,
        Command::Job { action } => return job::run_job(action),
        Command::Fsck {
            repo,
            points,
            timeout,
            parallel,
            json,
        } => {
            let r = open(&repo)?;
            return health::fsck(&repo, &r, &points, json, timeout, parallel);
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
            crate::demo::run_demo(&dir.unwrap_or_else(crate::demo::default_dir), &|l| {
                println!("{l}")
            })?
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "cbtfs", &mut out);
            emit(&String::from_utf8_lossy(&out))?;
        }
        Command::Man { dir } => {
            for page in write_man_pages(&dir)? {
                println!("wrote {}", page.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cbtfs gc`: collect garbage under the writer lock and say what was done.
fn cmd_gc(repo: &Path, dry_run: bool, repack_below: u8, json: bool) -> Result<()> {
    let repository = open(repo)?;
    let lock = repository.lock_exclusive("cbtfs gc")?;
    let r = crate::repo::gc::gc(&repository, &lock, repack_below, dry_run)?;
    drop(lock);
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "repository {}{}: {}",
            repo.display(),
            if dry_run { " (dry run)" } else { "" },
            gc_summary(&r)
        );
        if let Some(m) = &r.object_lock {
            println!(
                "Object Lock: {} extended ({} checked), {} reclaimed, {} of deleted objects still locked (reclaimed by a later gc)",
                plural(m.extended, "lock", "locks"),
                m.retention_checked,
                plural(m.versions_reclaimed, "version", "versions"),
                plural(m.versions_still_locked, "version", "versions")
            );
        }
    }
    Ok(())
}

/// `cbtfs repair --undelete`: works without opening the repository (its header may be what
/// was deleted).
fn cmd_repair(repo: &Path, json: bool) -> Result<ExitCode> {
    use crate::repo::store::s3;
    if !s3::is_s3_url(repo) {
        bail!(
            "{}: `cbtfs repair --undelete` undoes deletions on a versioned S3 bucket; a local repository keeps no versions (restore it from a copy)",
            repo.display()
        );
    }
    let store = s3::S3Store::open_url(&repo.to_string_lossy())?;
    if !store.versioning_enabled()? {
        bail!(
            "{}: the bucket has no versioning, so nothing deleted or overwritten can be brought back",
            repo.display()
        );
    }
    if let Ok(h) = Repository::probe_in(&store, repo)
        && let Some(l) = h.object_lock
    {
        store.enable_object_lock(l)?;
    }
    let r = s3::lock::undelete(&store)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for k in &r.undeleted {
            println!("undeleted {k}");
        }
        for k in &r.restored {
            println!("restored the original version of {k}");
        }
        for (k, why) in &r.failed {
            println!("FAILED {k}: {why}");
        }
        println!(
            "{} undeleted, {} restored, {} failed; run `cbtfs verify {}` to check",
            r.undeleted.len(),
            r.restored.len(),
            r.failed.len(),
            repo.display()
        );
    }
    Ok(if r.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DAMAGE)
    })
}

/// One line saying what a garbage collection did (or, in a dry run, would do).
fn gc_summary(g: &crate::repo::gc::GcReport) -> String {
    let did = |done: &str, would: &str| if g.dry_run { would } else { done }.to_string();
    let mut parts = Vec::new();
    if g.packs_deleted > 0 {
        parts.push(format!(
            "{} {}",
            did("deleted", "would delete"),
            plural(g.packs_deleted, "unreferenced pack", "unreferenced packs")
        ));
    }
    if g.packs_repacked > 0 {
        parts.push(if g.dry_run {
            format!(
                "would repack {}",
                plural(
                    g.packs_repacked,
                    "mostly unreferenced pack",
                    "mostly unreferenced packs"
                )
            )
        } else {
            format!(
                "repacked {} into {}",
                plural(
                    g.packs_repacked,
                    "mostly unreferenced pack",
                    "mostly unreferenced packs"
                ),
                plural(g.packs_written, "new pack", "new packs")
            )
        });
    }
    if g.objects_deleted > 0 {
        parts.push(format!(
            "{} {}",
            did("deleted", "would delete"),
            plural(
                g.objects_deleted,
                "unreferenced index or metadata object",
                "unreferenced index or metadata objects"
            )
        ));
    }
    if g.manifests_deleted > 0 {
        parts.push(format!(
            "deleted {}",
            plural(g.manifests_deleted, "stale manifest", "stale manifests")
        ));
    }
    if parts.is_empty() && g.packs_before == 0 {
        return "nothing to do (no data is stored)".into();
    }
    if parts.is_empty() {
        return format!(
            "nothing to do: no pack is unreferenced or below the repack threshold ({}, {}, {})",
            plural(g.packs_before, "pack", "packs"),
            human(g.bytes_before),
            plural(g.live_chunks, "live chunk", "live chunks")
        );
    }
    let mut out = parts.join(", ");
    out.push_str(&format!(
        "; {} {}",
        did("freed", "would free"),
        human(g.bytes_freed)
    ));
    if g.bytes_written > 0 {
        out.push_str(&format!(" and wrote {}", human(g.bytes_written)));
    }
    out.push_str(&format!(
        " ({} before, {} live)",
        plural(g.packs_before, "pack", "packs"),
        plural(g.live_chunks, "chunk", "chunks")
    ));
    out
}

/// What `browse` reports, for the terminal.
fn print_browse(e: crate::browse::BrowseEvent) {
    match e {
        crate::browse::BrowseEvent::Notice(m) => eprintln!("cbtfs: {m}"),
        crate::browse::BrowseEvent::Ready {
            report,
            dir,
            foreground,
        } => {
            print!("{report}");
            let end = if foreground { "Ctrl-C or " } else { "" };
            println!("  {end}`cbtfs browse --unmount {}` ends it", dir.display());
        }
    }
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

fn cmd_backup(
    repo: &Path,
    opts: &crate::backup::BackupOptions,
    json: bool,
    done: &Done,
) -> Result<ExitCode> {
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
    for d in &report.disks {
        done.add(json!({ "vdi": d.vdi, "vm": d.vm, "disk": d.disk, "point": d.point }));
    }
    if json {
        let mut value = serde_json::to_value(&report)?;
        // Some disks failed: the report says which, and carries the error object every failing
        // command prints under --json.
        if !report.failures.is_empty()
            && let (Some(obj), serde_json::Value::Object(error)) = (
                value.as_object_mut(),
                error_json(
                    "disks_failed",
                    &report
                        .failures
                        .iter()
                        .map(|(vdi, e)| format!("VDI {vdi}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                    done.items(),
                ),
            )
        {
            obj.extend(error);
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        for d in &report.disks {
            let what = match (&d.new_set_reason, d.kind) {
                (Some(r), _) => format!("full base, new set ({r})"),
                (None, k) => k.to_string(),
            };
            println!(
                "{}: {what}: {} of {} changed ({:.1}%), {} read over {} in {:.1} s -> point {}",
                d.disk_path,
                d.changed_blocks,
                plural(blocks_for(d.virtual_size), "block", "blocks"),
                d.changed_percent,
                human(d.fetched_bytes),
                d.via,
                d.seconds,
                crate::naming::with_label(Some(&d.path), &d.point),
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
fn parse_within(s: &str) -> std::result::Result<u64, String> {
    crate::timefmt::parse_duration(s).map_err(|e| e.to_string())
}

fn host_access(
    url: String,
    user: String,
    password_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    insecure_tls: bool,
    timeout: u64,
) -> Result<crate::host::HostAccess> {
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
    Ok(crate::host::HostAccess {
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
    use crate::host::Event;
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
            crate::naming::with_label(Some(&d.path), &d.point),
            d.userdevice
                .as_deref()
                .map(|u| format!(" (userdevice {u})"))
                .unwrap_or_default(),
            if d.created_vdi { "new " } else { "" },
            d.vdi,
        );
    }
    println!(
        "{}, {} in {:.1} s, {}/s",
        count(report.disks.len(), "disk", "disks"),
        human(report.bytes),
        report.seconds,
        human((report.bytes as f64 / report.seconds.max(1e-9)) as u64)
    );
    if report.verified_blocks > 0 {
        println!(
            "read back {} from the host: identical to the point",
            plural(report.verified_blocks, "sample block", "sample blocks")
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
    let (tree, set, seq) = resolve(&repository, spec)?;
    let reader = PointReader::open(&repository, &set, seq)
        .with_context(|| format!("opening point {spec}"))?;
    let layout = crate::volumes::discover(&reader)
        .with_context(|| format!("reading the partition table of {spec}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&layout)?);
        return Ok(());
    }
    print!("{}: {}", tree.name_of(&reader.manifest), layout.to_text());
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

/// The repository secret this run was given, or (for an encrypted repository, on a
/// terminal) asked for.
fn repo_secret(repo: &Path) -> Result<Option<crate::repo::keys::Secret>> {
    // The header first: a wrong path or an unencrypted repository needs no secret.
    let header = Repository::probe(repo)?;
    if header.encryption == crate::repo::ENCRYPTION_NONE {
        return Ok(None);
    }
    if let Some(s) = secret::resolve(&secret_sources(), "open the repository")? {
        return Ok(Some(s));
    }
    if std::io::stdin().is_terminal() {
        return Ok(Some(secret::prompt(
            &format!("password of repository {}: ", repo.display()),
            false,
        )?));
    }
    Ok(None)
}

fn open(repo: &Path) -> Result<Repository> {
    let secret = repo_secret(repo)?;
    Ok(Repository::open(repo, secret.as_ref())?)
}

/// `cbtfs init`: create the repository and say where its key material is.
fn cmd_init(
    repo: &Path,
    encryption: &str,
    lock: Option<crate::repo::store::s3::lock::ObjectLock>,
) -> Result<()> {
    use crate::repo::keys::Secret;
    if let Some(l) = lock {
        // Said first: init fails before anything is written if the bucket cannot lock.
        println!(
            "Object Lock: every object is retained {} day{} in {} mode (`cbtfs gc` extends what is still referenced)",
            l.days,
            if l.days == 1 { "" } else { "s" },
            l.mode.as_str()
        );
    }
    if encryption == "none" {
        Repository::init_locked(repo, &crate::repo::Encryption::None, lock)?;
        println!(
            "created repository {} WITHOUT encryption (--encryption none): anyone who can read its files can read the backed-up disks; integrity is still checked",
            repo.display()
        );
        return Ok(());
    }
    let sources = secret_sources();
    let key_file = sources
        .key_file
        .clone()
        .or_else(|| std::env::var_os("CBTFS_KEY_FILE").map(PathBuf::from));
    let (secret, made_key_file) = match &key_file {
        Some(k) if !k.exists() => (Secret::create_key_file(k)?, true),
        _ => match secret::resolve(&sources, "encrypt the new repository")? {
            Some(s) => (s, false),
            None if std::io::stdin().is_terminal() => (
                secret::prompt(
                    &format!("new password for repository {}: ", repo.display()),
                    true,
                )?,
                false,
            ),
            None => bail!(
                "a new repository is encrypted: give a password with --repo-password-file FILE (or CBTFS_REPO_PASSWORD_FILE / CBTFS_REPO_PASSWORD), or a key file with --key-file FILE (made if it does not exist); or choose --encryption none"
            ),
        },
    };
    let r = Repository::init_locked(repo, &crate::repo::Encryption::Secret(secret.clone()), lock)?;
    println!("created encrypted repository {}", repo.display());
    let slot = r.opened_slot().unwrap_or("?");
    match &secret {
        Secret::KeyFile { path, .. } => println!(
            "  its key is wrapped by the key file {}{} (key slot {}/keys/{slot})",
            path.display(),
            if made_key_file { ", made now" } else { "" },
            repo.display()
        ),
        Secret::Password(_) => println!(
            "  its key is wrapped by your password (key slot {}/keys/{slot})",
            repo.display()
        ),
    }
    println!(
        "  keep a copy of the password or key file somewhere else: if every key slot's secret is lost, the backups cannot be read by anyone (add another with `cbtfs key add`)"
    );
    Ok(())
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
    if let Some(u) = vm_uuid.as_ref().filter(|u| !valid_uuid(u)) {
        bail!(
            "--vm-uuid {u:?} is not a VM uuid (like 3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b); to name the VM, use --vm-name"
        );
    }
    let repository = open(repo)?;
    let time = match time {
        Some(t) => timefmt::parse(&t).map_err(|e| anyhow::anyhow!("--time: {e}"))?,
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
    let path = tree.name_of(m);
    if json {
        println!("{}", serde_json::to_string_pretty(&point_json(m, &path))?);
    } else {
        println!(
            "{} point {path}: {} changed, {} stored ({}), disk {}",
            if m.seq == 0 { "base" } else { "incremental" },
            plural(m.changed_blocks, "block", "blocks"),
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
            let secs = self.start.elapsed().as_secs_f64();
            eprint!("\r{}   ", text::progress_line(self.what, done, total, secs));
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
        "point": m.label(),
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

/// How `ls` names a repository's protection.
fn encryption_word(header: &crate::repo::RepoHeader) -> &str {
    match header.encryption.as_str() {
        crate::repo::ENCRYPTION_ON | crate::repo::ENCRYPTION_XCHACHA => "encrypted",
        crate::repo::ENCRYPTION_NONE => "NOT encrypted",
        other => other,
    }
}

/// A ratio as `ls` prints it: `3.87x`, or `-` when there is nothing to divide.
fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

/// The words of a disk's or the repository's space statistics.
fn space_text(s: &SpaceStats) -> String {
    let mut t = format!(
        "{} read by its backups, {} in {} stored in {} (dedup {}, compression {})",
        human(s.logical_bytes),
        human(s.unique_raw_bytes),
        plural(s.unique_chunks, "unique chunk", "unique chunks"),
        human(s.stored_bytes),
        ratio(s.dedup_ratio),
        ratio(s.compression_ratio)
    );
    if s.missing_chunks > 0 {
        t.push_str(&format!(
            "; {} MISSING from the chunk index (run `cbtfs verify`)",
            plural(s.missing_chunks, "chunk", "chunks")
        ));
    }
    if s.unreadable_points > 0 {
        t.push_str(&format!(
            "; {} not counted: {} unreadable (run `cbtfs verify`)",
            plural(s.unreadable_points, "point", "points"),
            if s.unreadable_points == 1 {
                "its index is"
            } else {
                "their indexes are"
            }
        ));
    }
    t
}

fn cmd_ls(repo: &Path, json: bool) -> Result<()> {
    let repository = open(repo)?;
    let catalog = repository.catalog()?;
    // Every point index is read once, here.
    let (per_disk, total) = crate::repo::stats::all_stats(&repository, &catalog)?;
    let on_storage = crate::repo::stats::storage_bytes(&repository)?;
    let space: std::collections::HashMap<String, SpaceStats> = catalog
        .iter()
        .map(|d| d.vdi.clone())
        .zip(per_disk)
        .collect();
    let no_space = SpaceStats::default();
    let space_of = |vdi: &str| space.get(vdi).unwrap_or(&no_space);
    let encryption = encryption_word(&repository.header);
    let tree = Tree::build(catalog);
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
                            "space": space_of(d.vdi()),
                            "sets": d.history.sets.iter().map(|s| json!({
                                "name": s.id,
                                "points": s.points.iter().map(|p| point_json(p, &tree.name_of(p))).collect::<Vec<_>>(),
                                "problems": s.problems,
                            })).collect::<Vec<_>>(),
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut summary = serde_json::to_value(&total)?;
        if let Some(o) = summary.as_object_mut() {
            o.insert("path".into(), json!(repo.display().to_string()));
            o.insert("id".into(), json!(repository.header.id));
            o.insert("encryption".into(), json!(repository.header.encryption));
            o.insert("encrypted".into(), json!(repository.encrypted()));
            o.insert("storage_bytes".into(), json!(on_storage));
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "repository": summary,
                "vms": vms
            }))?
        );
        return Ok(());
    }
    if tree.vms.is_empty() {
        println!(
            "repository {} ({encryption}, {} on storage) holds no restore points yet (add one with `cbtfs import` or `cbtfs backup`)",
            repo.display(),
            human(on_storage)
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
                writeln!(
                    out,
                    "  set {}  ({})",
                    s.id,
                    count(s.points.len(), "point", "points")
                )?;
                // CHANGED: blocks this point holds (CBT-marked, or all of a base) and their share
                // of the disk; STORED: the bytes its own data takes in the repository.
                writeln!(
                    out,
                    "    {:<18} {:<22} {:>10} {:>22} {:>12}",
                    "POINT", "TIME", "DISK SIZE", "CHANGED BLOCKS", "STORED"
                )?;
                for p in &s.points {
                    writeln!(
                        out,
                        "    {:<18} {:<22} {:>10} {:>22} {:>12}",
                        point_name(p),
                        timefmt::rfc3339(p.time),
                        human(p.virtual_size),
                        format!("{} ({:.2}%)", p.changed_blocks, changed_percent(p)),
                        human(p.data_blocks * BLOCK_SIZE),
                    )?;
                }
                for pr in &s.problems {
                    writeln!(out, "    DAMAGED {}: {}", pr.location, pr.message)?;
                }
            }
            writeln!(out, "  space  {}", space_text(space_of(d.vdi())))?;
        }
    }
    writeln!(
        out,
        "repository {} ({encryption}): {} on storage; {}: {}",
        repo.display(),
        human(on_storage),
        count(space.len(), "disk", "disks"),
        space_text(&total)
    )?;
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

fn cmd_export(
    repo: &Path,
    spec: &str,
    out: &Path,
    force: bool,
    format: Option<&str>,
) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let stdout = out.as_os_str() == "-";
    let format = match format {
        Some(f) => export::ImageFormat::from_name(f)
            .with_context(|| format!("--format {f}: use raw, qcow2, vpc, vhdx, vmdk or vdi"))?,
        None if stdout => export::ImageFormat::Raw,
        None => export::ImageFormat::for_path(out),
    };
    if stdout && format != export::ImageFormat::Raw {
        bail!(
            "standard output gets raw bytes only; give a file name to write {}",
            format.name()
        );
    }
    if !stdout {
        // Before any thread starts (they inherit the blocked signals).
        export::remove_partial_files_on_signals();
    }
    let repository = open(repo)?;
    let (tree, set, seq) = resolve(&repository, spec)?;
    let reader = PointReader::open(&repository, &set, seq)
        .with_context(|| format!("opening point {spec}"))?;
    let path = tree.name_of(&reader.manifest);
    // A stream (stdout, a character device, a pipe) carries every byte; a file or a block
    // device only the stored ones (the rest are holes or written as zeros at the end).
    let streamed = stdout
        || std::fs::metadata(out)
            .is_ok_and(|m| m.file_type().is_char_device() || m.file_type().is_fifo());
    let progress = Progress::new(
        "export",
        if streamed {
            reader.size()
        } else {
            reader.map().stored_blocks() * BLOCK_SIZE
        },
    );
    let report = if stdout {
        let mut stdout = std::io::stdout().lock();
        export::export_to_writer(&reader, &mut stdout, &|d| progress.update(d))
    } else {
        if format == export::ImageFormat::Raw {
            export::export_to_path(&reader, out, force, &|d| progress.update(d))
        } else {
            export::export_converted(&reader, out, format, force, &|d| progress.update(d))
        }
    };
    progress.finish();
    let report = report?;
    if stdout {
        return Ok(());
    }
    let what = if report.stream {
        format!(
            "a raw stream of {}, every byte",
            plural(report.size, "byte", "bytes")
        )
    } else if format == export::ImageFormat::Raw {
        format!(
            "raw image of {}, {} of data",
            human(report.size),
            human(report.data_bytes)
        )
    } else {
        let on_disk = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        format!(
            "{} image of a {} disk, {} of data, file {}",
            format.label(),
            human(report.size),
            human(report.data_bytes),
            human(on_disk)
        )
    };
    println!("exported {path} to {} ({what})", out.display());
    Ok(())
}

fn cmd_verify(
    repo: &Path,
    point: Option<String>,
    sample: Option<f64>,
    json: bool,
) -> Result<ExitCode> {
    let mut report = VerifyReport::default();
    let repository = match open(repo) {
        Ok(r) => r,
        Err(e) => {
            // On S3 its header or key slots may be what was deleted: say so, and how to undo it.
            if let Some(s3) = crate::repo::store::s3::is_s3_url(repo)
                .then(|| crate::repo::store::s3::S3Store::open_url(&repo.to_string_lossy()).ok())
                .flatten()
            {
                verify::verify_object_versions(&s3, &mut report)?;
            }
            if report.ok() {
                return Err(e);
            }
            for d in &report.damage {
                println!("DAMAGED repository: {} ({})", d.problem, d.location);
            }
            println!(
                "the repository cannot be opened ({e:#}); undo the damage above, then verify again"
            );
            return Ok(ExitCode::from(EXIT_DAMAGE));
        }
    };
    let opts = verify::VerifyOptions {
        sample_percent: sample,
    };
    match &point {
        None => verify::verify_all(&repository, &opts, &mut report)?,
        Some(spec) => {
            let (_, set, seq) = resolve(&repository, spec)?;
            let mut checked = verify::checked();
            verify::verify_set(
                &repository,
                &set,
                Some(seq),
                &opts,
                &mut checked,
                &mut report,
            );
        }
    }
    if let Ok(catalog) = repository.catalog() {
        report.name_points(&Tree::build(catalog));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for d in &report.damage {
            let point = d
                .point
                .as_ref()
                .map(|l| crate::naming::with_label(d.path.as_deref(), l));
            let what = match (&point, d.block) {
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
        if report.ok() && report.points_checked == 0 {
            println!(
                "ok: the repository holds no restore points; its header is sound (nothing else to check)"
            );
        } else if report.ok() {
            println!(
                "ok: {}, {} checked, no damage",
                plural(report.points_checked, "point", "points"),
                plural(report.blocks_checked, "stored block", "stored blocks")
            );
        } else {
            println!(
                "{} found in {} ({} checked); damaged ranges read as errors, never as wrong data",
                count(report.damage.len(), "problem", "problems"),
                plural(report.points_checked, "point", "points"),
                plural(report.blocks_checked, "stored block", "stored blocks")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command has words, and every command an example.
    #[test]
    fn every_argument_has_help_and_every_command_an_example() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        let mut todo = vec![cmd];
        while let Some(c) = todo.pop() {
            let name = c.get_display_name().unwrap_or(c.get_name()).to_string();
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                // clap's own --help and --version.
                if id == "help" || id == "version" {
                    continue;
                }
                let help = a.get_help().or(a.get_long_help()).map(|h| h.to_string());
                if help.is_none_or(|h| h.trim().is_empty()) {
                    missing.push(format!("{name}: argument {id} has no help"));
                }
            }
            let example = [c.get_after_help(), c.get_after_long_help()]
                .into_iter()
                .flatten()
                .any(|h| h.to_string().contains("Examples:\n  cbtfs "));
            if !example {
                missing.push(format!("{name}: no Examples: block"));
            }
            if c.get_about()
                .is_none_or(|a| a.to_string().trim().is_empty())
            {
                missing.push(format!("{name}: no about"));
            }
            todo.extend(
                c.get_subcommands()
                    .filter(|s| s.get_name() != "help")
                    .cloned(),
            );
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    /// True when a text stops mid-sentence (clap drops a summary's final period, so a missing
    /// one proves nothing).
    fn cut_short(text: &str) -> bool {
        let t = text.trim_end();
        let last = t.rsplit(' ').next().unwrap_or("");
        t.is_empty()
            || t.ends_with([',', ':', ';', '(', '-'])
            || ["and", "or", "the", "a", "of", "to", "with"].contains(&last)
    }

    /// Abouts and helps are whole sentences: no trailing fragment such as "Space is reclaimed".
    #[test]
    fn help_texts_end_as_sentences() {
        assert!(cut_short("Keep the newest point of each of the"));
        assert!(cut_short("Mount options:"));
        assert!(!cut_short("Keep the newest N points of each disk."));
        let mut cmd = Cli::command();
        cmd.build();
        let mut todo = vec![cmd];
        let mut bad = Vec::new();
        while let Some(c) = todo.pop() {
            let about = c.get_about().map(|a| a.to_string()).unwrap_or_default();
            let long = c
                .get_long_about()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if cut_short(&about) || (!long.is_empty() && cut_short(&long)) {
                bad.push(format!("{}: about {about:?} / {long:?}", c.get_name()));
            }
            for a in c.get_arguments() {
                for h in [a.get_help(), a.get_long_help()].into_iter().flatten() {
                    if cut_short(&h.to_string()) {
                        bad.push(format!("{}: {}: {h:?}", c.get_name(), a.get_id()));
                    }
                }
            }
            todo.extend(
                c.get_subcommands()
                    .filter(|s| s.get_name() != "help")
                    .cloned(),
            );
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
        let prune = Cli::command()
            .find_subcommand("prune")
            .and_then(|c| c.get_about().map(|a| a.to_string()))
            .unwrap_or_default();
        assert!(!prune.contains("Space is reclaimed"), "{prune}");
    }

    /// The mount's help states the defaults the mount uses and names every option it takes.
    #[test]
    fn mount_help_names_the_real_defaults_and_every_option() {
        let help = mount_options_help();
        assert!(
            help.contains(&format!(
                "threads=N (threads serving reads, 1 to 64; default {})",
                crate::mount::DEFAULT_THREADS
            )),
            "{help}"
        );
        assert!(
            help.contains(&format!(
                "off, at most 1024; default {})",
                crate::mount::DEFAULT_PREFETCH_MIB
            )),
            "{help}"
        );
        // What parse_options takes (values where it needs one).
        let accepted = [
            "allow_other",
            "allow_root",
            "log_file=/var/log/cbtfs.log",
            "threads=8",
            "prefetch=0",
            "cache_dir=/var/cache/cbtfs",
            "cache_size=2G",
            "ro",
            "default_permissions",
            "nodev",
            "nosuid",
            "noexec",
            "dev",
            "suid",
            "exec",
            "noatime",
            "atime",
            "nodiratime",
            "relatime",
            "strictatime",
            "sync",
            "async",
            "dirsync",
            "auto",
            "noauto",
            "user",
            "users",
            "nouser",
            "owner",
            "group",
            "_netdev",
            "nofail",
            "defaults",
            "comment",
            "loop",
            "x-systemd.automount",
        ];
        for o in accepted {
            crate::mount::parse_options(&[o.to_string()]).unwrap_or_else(|e| panic!("{o}: {e}"));
            let word = o.split(['=', '.']).next().unwrap_or(o);
            let word = if word.starts_with("x-") { "x-*" } else { word };
            assert!(help.contains(word), "{o} is not in the help: {help}");
        }
        assert!(help.contains("nonempty"), "{help}");
        assert!(help.contains("rw is refused"), "{help}");
    }

    fn args(a: &[&str]) -> Vec<OsString> {
        std::iter::once("cbtfs")
            .chain(a.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn repo_of(cli: &Cli) -> Option<&Path> {
        match &cli.command {
            Command::Export { repo, .. }
            | Command::Ls { repo, .. }
            | Command::Backup { repo, .. }
            | Command::Mount { repo, .. } => Some(repo),
            _ => None,
        }
    }

    #[test]
    fn repo_comes_from_cbtfs_repo_only_when_left_out() {
        let env = Some(OsString::from("/backup/repo"));
        let p = "web01/xvda/20260104T020000Z/20260105T020000Z";
        // Left out: one positional fewer.
        let cli = parse_args(args(&["export", p, "out.raw"]), env.clone()).unwrap();
        assert_eq!(repo_of(&cli), Some(Path::new("/backup/repo")));
        match &cli.command {
            Command::Export { point, out, .. } => {
                assert_eq!(point, p);
                assert_eq!(out, Path::new("out.raw"));
            }
            other => panic!("{other:?}"),
        }
        let cli = parse_args(args(&["ls", "--json"]), env.clone()).unwrap();
        assert_eq!(repo_of(&cli), Some(Path::new("/backup/repo")));
        let cli = parse_args(
            args(&[
                "backup",
                "--host",
                "https://xcp-ng-master.lan",
                "--vm",
                "web01",
            ]),
            env.clone(),
        )
        .unwrap();
        assert_eq!(repo_of(&cli), Some(Path::new("/backup/repo")));
        let cli = parse_args(args(&["mount", "/mnt/backups"]), env.clone()).unwrap();
        assert_eq!(repo_of(&cli), Some(Path::new("/backup/repo")));
        // Given: the line wins.
        let cli = parse_args(args(&["export", "/srv/other", p, "-"]), env.clone()).unwrap();
        assert_eq!(repo_of(&cli), Some(Path::new("/srv/other")));
        let cli = parse_args(
            args(&["backup", "/srv/other", "--host", "https://h", "--vdi", "x"]),
            env.clone(),
        )
        .unwrap();
        assert_eq!(repo_of(&cli), Some(Path::new("/srv/other")));
        // A missing option is not helped by CBTFS_REPO, and is what the error names.
        let e = parse_args(
            args(&["backup", "/srv/other", "--vm", "web01"]),
            env.clone(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(e.to_string().contains("--host <URL>"), "{e}");
        // Without CBTFS_REPO (or empty), REPO is required.
        for none in [None, Some(OsString::new())] {
            let e = parse_args(args(&["ls"]), none).unwrap_err();
            assert!(e.to_string().contains("<REPO>"), "{e}");
        }
        // Commands without REPO are left alone.
        let e = parse_args(args(&["completions"]), env).unwrap_err();
        assert!(e.to_string().contains("<SHELL>"), "{e}");
    }

    #[test]
    fn json_is_detected_before_the_end_of_options() {
        assert!(wants_json(&args(&["ls", "/backup/repo", "--json"])));
        assert!(wants_json(&args(&["backup", "--json"])));
        assert!(!wants_json(&args(&["ls", "/backup/repo"])));
        assert!(!wants_json(&args(&["export", "--", "--json", "p", "-"])));
        // argv[0] is not an option.
        assert!(!wants_json(&[OsString::from("--json")]));
    }

    #[test]
    fn error_codes_come_from_the_typed_errors() {
        use crate::backup::BackupError;
        use crate::repo::RepoError;
        use crate::xapi::{ApiFailure, XapiError};
        let api = |code: &str| {
            XapiError::Api(ApiFailure {
                call: "session.login_with_password".into(),
                code: code.into(),
                params: Vec::new(),
            })
        };
        let io = || std::io::Error::from_raw_os_error(libc::ENOSPC);
        let table: Vec<(anyhow::Error, &str)> = vec![
            (
                RepoError::NotARepository {
                    path: "/backup/repo".into(),
                    why: "an empty directory".into(),
                }
                .into(),
                "not_a_repository",
            ),
            (
                RepoError::Locked {
                    path: "/backup/repo".into(),
                    holder: "cbtfs backup".into(),
                }
                .into(),
                "locked",
            ),
            (RepoError::corrupt("points/x", "bad crc").into(), "damaged"),
            (RepoError::NotFound("no point".into()).into(), "not_found"),
            (
                RepoError::io("writing", "/backup/repo/x", io()).into(),
                "io",
            ),
            (
                RepoError::UnsupportedVersion {
                    what: "repository",
                    location: "/backup/repo".into(),
                    found: 9,
                    supported: 1,
                }
                .into(),
                "unsupported_version",
            ),
            (api("SESSION_AUTHENTICATION_FAILED").into(), "auth_failed"),
            (api("VDI_MISSING").into(), "not_found"),
            (api("SR_FULL").into(), "sr_full"),
            (api("SOMETHING_ELSE").into(), "host_refused"),
            (
                XapiError::Transport {
                    host: "xcp-ng-master.lan".into(),
                    detail: "connection refused".into(),
                }
                .into(),
                "host_unreachable",
            ),
            (
                XapiError::Transport {
                    host: "xcp-ng-master.lan".into(),
                    detail: "invalid peer certificate: UnknownIssuer".into(),
                }
                .into(),
                "tls_untrusted",
            ),
            (
                XapiError::Timeout {
                    host: "xcp-ng-master.lan".into(),
                    call: "VDI.snapshot".into(),
                    secs: 120,
                }
                .into(),
                "timeout",
            ),
            (
                XapiError::CertificateChanged {
                    host: "xcp-ng-master.lan".into(),
                    pinned: "aa".into(),
                    seen: "bb".into(),
                    pin_file: "/backup/repo/hosts/x.pin".into(),
                }
                .into(),
                "tls_untrusted",
            ),
            // Wrapped transparently, and under context the command line adds.
            (
                anyhow::Error::from(BackupError::Repo(RepoError::Locked {
                    path: "/backup/repo".into(),
                    holder: "cbtfs prune".into(),
                }))
                .context("backup from https://xcp-ng-master.lan"),
                "locked",
            ),
            (
                anyhow::Error::from(BackupError::Xapi(api("SESSION_INVALID")))
                    .context("backup from https://xcp-ng-master.lan"),
                "auth_failed",
            ),
            (
                crate::restore::RestoreError::Host(crate::host::HostError::Xapi(
                    XapiError::Timeout {
                        host: "h".into(),
                        call: "VDI.create".into(),
                        secs: 1,
                    },
                ))
                .into(),
                "timeout",
            ),
            (
                crate::export::ExportError::Exists {
                    path: "/var/tmp/web01.raw".into(),
                }
                .into(),
                "exists",
            ),
            (
                anyhow::Error::from(io()).context("reading the password file"),
                "io",
            ),
            (anyhow::anyhow!("something plain"), "other"),
        ];
        for (e, want) in table {
            assert_eq!(error_code(&e), want, "{e:#}");
        }
    }

    #[test]
    fn error_json_has_code_message_and_done() {
        let v = error_json(
            "locked",
            "repository /backup/repo is being written",
            vec![json!("x")],
        );
        assert_eq!(
            v.to_string(),
            r#"{"error":{"code":"locked","done":["x"],"message":"repository /backup/repo is being written"}}"#
        );
    }

    #[test]
    fn man_pages_name_every_command() {
        let d = tempfile::tempdir().unwrap();
        let pages = write_man_pages(d.path()).unwrap();
        let names: Vec<String> = pages
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert!(names.contains(&"cbtfs.1".to_string()), "{names:?}");
        for c in Cli::command().get_subcommands() {
            if c.get_name() == "help" {
                continue;
            }
            let want = format!("cbtfs-{}.1", c.get_name());
            assert!(names.contains(&want), "{want} missing: {names:?}");
        }
    }

    /// A command with actions (`key list`) takes its REPO from CBTFS_REPO after the action's
    /// name, past global options; a REPO on the line wins.
    #[test]
    fn cbtfs_repo_fills_the_repo_of_an_action() {
        use key::KeyAction;
        let env = Some(OsString::from("/backup/repo"));
        let cli = parse_args(args(&["key", "list", "--json"]), env.clone()).unwrap();
        match &cli.command {
            Command::Key {
                action: KeyAction::List { repo, json },
            } => {
                assert_eq!(repo, Path::new("/backup/repo"));
                assert!(json);
            }
            other => panic!("{other:?}"),
        }
        let cli = parse_args(
            args(&["key", "--key-file", "list", "remove", "0123456789abcdef"]),
            env.clone(),
        )
        .unwrap();
        assert_eq!(cli.key_file.as_deref(), Some(Path::new("list")));
        match &cli.command {
            Command::Key {
                action: KeyAction::Remove { repo, id },
            } => {
                assert_eq!(repo, Path::new("/backup/repo"));
                assert_eq!(id, "0123456789abcdef");
            }
            other => panic!("{other:?}"),
        }
        let cli = parse_args(args(&["key", "list", "/srv/other"]), env.clone()).unwrap();
        match &cli.command {
            Command::Key {
                action: KeyAction::List { repo, .. },
            } => assert_eq!(repo, Path::new("/srv/other")),
            other => panic!("{other:?}"),
        }
        let cli = parse_args(args(&["gc", "--dry-run"]), env.clone()).unwrap();
        match &cli.command {
            Command::Gc {
                repo,
                dry_run,
                repack_below,
                ..
            } => {
                assert_eq!(repo, Path::new("/backup/repo"));
                assert!(dry_run);
                assert_eq!(*repack_below, crate::repo::gc::DEFAULT_REPACK_BELOW);
            }
            other => panic!("{other:?}"),
        }
        // No action named: clap's own error, CBTFS_REPO or not.
        assert!(parse_args(args(&["key"]), env).is_err());
    }

    /// The new secret of `key add` and `key passwd` never comes from argv: only files or the
    /// terminal, one of them.
    #[test]
    fn key_actions_take_new_secrets_from_files_only() {
        let e = parse_args(
            args(&[
                "key",
                "add",
                "/r",
                "--new-password-file",
                "a",
                "--new-key-file",
                "b",
            ]),
            None,
        )
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        let key = Cli::command();
        let key = key.find_subcommand("key").unwrap();
        for action in ["add", "passwd"] {
            let c = key.find_subcommand(action).unwrap();
            let names: Vec<String> = c
                .get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect();
            assert!(
                names.contains(&"new-password-file".to_string()),
                "{names:?}"
            );
            assert!(names.contains(&"new-key-file".to_string()), "{names:?}");
            assert!(!names.iter().any(|n| n == "password" || n == "new-password"));
        }
    }

    /// The help names every variable that gives a secret, init shows every way to protect a
    /// repository, and prune says what it writes and that it runs gc.
    #[test]
    fn help_names_the_secrets_and_what_prune_does() {
        for v in [
            "CBTFS_REPO_PASSWORD_FILE",
            "CBTFS_REPO_PASSWORD ",
            "CBTFS_KEY_FILE",
            "CBTFS_CACHE_DIR",
        ] {
            assert!(TOP_AFTER_HELP.contains(v), "{v}");
        }
        let cmd = Cli::command();
        let init = cmd
            .find_subcommand("init")
            .and_then(|c| c.get_after_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        for ex in [
            "cbtfs init /backup/repo --key-file /root/cbtfs.key",
            "--repo-password-file",
            "--encryption none",
        ] {
            assert!(init.contains(ex), "{ex}: {init}");
        }
        let prune = cmd
            .find_subcommand("prune")
            .and_then(|c| c.get_long_about())
            .map(|h| h.to_string())
            .unwrap_or_default();
        assert!(prune.contains("writes only metadata"), "{prune}");
        assert!(prune.contains("runs `cbtfs gc`"), "{prune}");
        assert!(prune.contains("--no-gc"), "{prune}");
    }

    fn gc_report(f: impl FnOnce(&mut crate::repo::gc::GcReport)) -> crate::repo::gc::GcReport {
        let mut r = crate::repo::gc::GcReport::default();
        f(&mut r);
        r
    }

    #[test]
    fn gc_summaries_say_what_was_done() {
        assert_eq!(
            gc_summary(&gc_report(|_| {})),
            "nothing to do (no data is stored)"
        );
        assert_eq!(
            gc_summary(&gc_report(|r| {
                r.packs_before = 3;
                r.bytes_before = 3 << 20;
                r.live_chunks = 40;
            })),
            "nothing to do: no pack is unreferenced or below the repack threshold (3 packs, 3.0 MiB, 40 live chunks)"
        );
        assert_eq!(
            gc_summary(&gc_report(|r| {
                r.packs_before = 5;
                r.packs_deleted = 2;
                r.packs_repacked = 1;
                r.packs_written = 1;
                r.objects_deleted = 1;
                r.manifests_deleted = 2;
                r.bytes_freed = 3 << 20;
                r.bytes_written = 1 << 20;
                r.live_chunks = 1;
            })),
            "deleted 2 unreferenced packs, repacked 1 mostly unreferenced pack into 1 new pack, deleted 1 unreferenced index or metadata object, deleted 2 stale manifests; freed 3.0 MiB and wrote 1.0 MiB (5 packs before, 1 chunk live)"
        );
        assert_eq!(
            gc_summary(&gc_report(|r| {
                r.dry_run = true;
                r.packs_before = 4;
                r.packs_deleted = 1;
                r.packs_repacked = 2;
                r.bytes_freed = 1536;
                r.live_chunks = 9;
            })),
            "would delete 1 unreferenced pack, would repack 2 mostly unreferenced packs; would free 1.5 KiB (4 packs before, 9 chunks live)"
        );
    }

    #[test]
    fn space_texts_name_damage() {
        let s = SpaceStats {
            points: 2,
            logical_bytes: 10 << 20,
            unique_chunks: 100,
            unique_raw_bytes: 100 << 16,
            stored_bytes: 5 << 20,
            dedup_ratio: Some(1.6),
            compression_ratio: Some(1.25),
            missing_chunks: 0,
            unreadable_points: 0,
        };
        assert_eq!(
            space_text(&s),
            "10.0 MiB read by its backups, 6.2 MiB in 100 unique chunks stored in 5.0 MiB (dedup 1.60x, compression 1.25x)"
        );
        let bad = SpaceStats {
            missing_chunks: 3,
            unreadable_points: 1,
            ..s
        };
        assert!(
            space_text(&bad).ends_with(
                "; 3 chunks MISSING from the chunk index (run `cbtfs verify`); 1 point not counted: its index is unreadable (run `cbtfs verify`)"
            ),
            "{}",
            space_text(&bad)
        );
        assert_eq!(
            space_text(&SpaceStats::default()),
            "0 B read by its backups, 0 B in 0 unique chunks stored in 0 B (dedup -, compression -)"
        );
    }
}
