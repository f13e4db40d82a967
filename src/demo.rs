//! `cbtfs demo`: the whole job on an embedded default, with nothing to set up.
//!
//! Builds a real guest filesystem (ext4, `mkfs.ext4 -d`), starts a simulated XenServer host
//! with a VM on that disk, and runs `cbtfs backup` against it: a full base, then a day of guest
//! changes (files added, edited, deleted with `debugfs -w`, written to the host as guest writes
//! that its CBT tracks) and an incremental backup, four times. Then it verifies, reads a file
//! from inside every point, mounts the history, diffs the first and third day, and browses day 3's files.
//!
//! The narrative is handed line by line to the caller's `say` (the CLI prints it).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use roaring::RoaringBitmap;

use crate::BLOCK_SIZE;
use crate::naming::Tree;
use crate::read::PointReader;
use crate::repo::Repository;

const DISK_SIZE: &str = "256M";
const MARKER: &str = ".cbtfs-demo";

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} (is it installed? scripts/demo.sh installs it)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Blocks that differ between two images of the same size: what CBT reports.
fn changed_blocks(old: &Path, new: &Path) -> Result<RoaringBitmap> {
    use std::os::unix::fs::FileExt;
    let a = fs::File::open(old)?;
    let b = fs::File::open(new)?;
    let size = b.metadata()?.len();
    let mut set = RoaringBitmap::new();
    let mut ba = vec![0u8; BLOCK_SIZE as usize];
    let mut bb = vec![0u8; BLOCK_SIZE as usize];
    for blk in 0..crate::blocks_for(size) {
        let off = blk * BLOCK_SIZE;
        let n = (size - off).min(BLOCK_SIZE) as usize;
        a.read_exact_at(&mut ba[..n], off)?;
        b.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            set.insert(blk as u32);
        }
    }
    Ok(set)
}

fn debugfs_cat(image: &Path, file: &str) -> Result<String> {
    run(
        "debugfs",
        &["-R", &format!("cat {file}"), &image.display().to_string()],
    )
}

/// Run the demo in `dir` (cleared first if it is a previous demo's), telling the story line by
/// line through `say`.
pub fn run_demo(dir: &Path, say: &dyn Fn(&str)) -> Result<()> {
    let mnt = dir.join("mnt");
    let files = dir.join("files");
    if files.exists() {
        // A previous demo's browse: end it before clearing the directory.
        let _ = crate::browse::unmount_dir(&files);
    }
    if crate::mount::mounted_fstype(&mnt).is_some() {
        // A previous demo's mount: take it down before clearing the directory.
        use crate::mount::{Unmount, unmount};
        if unmount(&mnt, Unmount::Normal).is_err() {
            unmount(&mnt, Unmount::Lazy)?;
        }
    }
    if dir.exists() {
        if !dir.join(MARKER).exists() && fs::read_dir(dir)?.next().is_some() {
            bail!(
                "{} exists and is not a cbtfs demo directory; give the demo a new directory",
                dir.display()
            );
        }
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    fs::write(dir.join(MARKER), "")?;
    let repo_path = dir.join("repo");
    let image = dir.join("guest-disk.img");
    let prev = dir.join("guest-disk.prev");
    let tree = dir.join("guest-files");
    let img = image.display().to_string();

    say(&format!(
        "== a guest disk: ext4 with a few files ({DISK_SIZE})"
    ));
    for (p, text) in [
        ("etc/hostname", "demo-vm\n"),
        ("etc/motd", "Welcome to the demo VM (day 0)\n"),
        ("home/alice/notes.txt", "day 0: started the project\n"),
        ("var/www/index.html", "<h1>version 1</h1>\n"),
    ] {
        let f = tree.join(p);
        fs::create_dir_all(f.parent().unwrap_or(&tree))?;
        fs::write(f, text)?;
    }
    let mut blob = vec![0u8; 3 << 20];
    getrandom::fill(&mut blob).map_err(|e| anyhow::anyhow!("{e}"))?;
    fs::write(tree.join("var/lib/blob.bin"), &blob).or_else(|_| {
        fs::create_dir_all(tree.join("var/lib"))?;
        fs::write(tree.join("var/lib/blob.bin"), &blob)
    })?;
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            &tree.display().to_string(),
            &img,
            DISK_SIZE,
        ],
    )?;

    // Encrypted like every repository, with a key file beside it (a real one belongs
    // somewhere else, with a copy offsite).
    let key_file = dir.join("repo.key");
    let secret = crate::repo::keys::Secret::create_key_file(&key_file)?;
    let repo = Repository::init(&repo_path, &crate::repo::Encryption::Secret(secret))?;
    say(&format!(
        "== repository {} (encrypted; its key file is {})",
        repo_path.display(),
        key_file.display()
    ));
    say("== a simulated XenServer host (management API over HTTPS, NBD over TLS, CBT)");
    let mut cfg = crate::sim::SimConfig::new(&dir.join("host"));
    cfg.user = "root".into();
    let sim = crate::sim::Sim::start(cfg.clone()).map_err(anyhow::Error::msg)?;
    let (vm, vdis) = sim
        .add_vm("demo-vm", &[("root", image.as_path())])
        .map_err(anyhow::Error::msg)?;
    let vdi = vdis
        .first()
        .cloned()
        .context("the simulated VM has no disk")?;
    say(&format!(
        "   {} : VM demo-vm ({vm}), disk root (VDI {vdi})",
        sim.url
    ));
    let options = crate::backup::BackupOptions {
        host: crate::backup::HostAccess {
            url: sim.url.clone(),
            user: cfg.user.clone(),
            password: cfg.password.clone(),
            ca_pem: None,
            insecure_tls: false,
            timeout: std::time::Duration::from_secs(60),
        },
        selection: crate::backup::Selection::Vm("demo-vm".into()),
        keep_snapshot_data: false,
        allow_plain_nbd: false,
        fetch: crate::nbd::FetchOptions::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let backup = |day: usize| -> Result<()> {
        let events = |e: crate::backup::Event| match e {
            crate::backup::Event::Info(m) => say(&format!("   {m}")),
            crate::backup::Event::Warning(m) => say(&format!("   warning: {m}")),
            crate::backup::Event::Blocks(..) => {}
        };
        let r = rt.block_on(crate::backup::run(&repo, &options, &events))?;
        if let Some((v, e)) = r.failures.first() {
            bail!("backup of VDI {v} failed: {e}");
        }
        for d in &r.disks {
            say(&format!(
                "   day {day}: {} point {}: {} of {} blocks changed, {} KiB read over {} in {:.2} s",
                d.kind,
                d.path,
                d.changed_blocks,
                crate::blocks_for(d.virtual_size),
                d.fetched_bytes >> 10,
                d.via,
                d.seconds
            ));
        }
        Ok(())
    };
    say("== backups: a full base, then one incremental point a day (cbtfs backup --vm demo-vm)");
    backup(0)?;
    // The guest's disk as the guest sees it; edits go to the host as guest writes.
    let work = dir.join("guest-disk.work");
    fs::copy(&image, &work)?;
    let wimg = work.display().to_string();
    let edits: [&[(&str, &str)]; 4] = [
        &[
            ("home/alice/notes.txt", "day 1: wrote the report\n"),
            ("home/alice/report.txt", "Quarterly report, draft 1\n"),
        ],
        &[
            ("var/www/index.html", "<h1>version 2</h1>\n"),
            ("etc/motd", "Welcome to the demo VM (day 2)\n"),
        ],
        &[("home/alice/report.txt", "Quarterly report, final\n")],
        &[
            ("home/alice/notes.txt", "day 4: oops, deleted the report\n"),
            ("-home/alice/report.txt", ""),
        ],
    ];
    for (i, edit) in edits.iter().enumerate() {
        fs::copy(&work, &prev)?;
        let mut cmds = String::new();
        for (k, (path, text)) in edit.iter().enumerate() {
            if let Some(p) = path.strip_prefix('-') {
                cmds.push_str(&format!("rm /{p}\n"));
                continue;
            }
            let local = dir.join(format!("edit-{i}-{k}"));
            fs::write(&local, text)?;
            cmds.push_str(&format!("rm /{path}\nwrite {} /{path}\n", local.display()));
        }
        let script = dir.join("debugfs.cmds");
        fs::File::create(&script)?.write_all(cmds.as_bytes())?;
        run(
            "debugfs",
            &["-w", "-f", &script.display().to_string(), &wimg],
        )?;
        // The guest writes what it changed; the host's CBT marks those blocks.
        use std::os::unix::fs::FileExt;
        let w = fs::File::open(&work)?;
        let size = w.metadata()?.len();
        for b in changed_blocks(&prev, &work)? {
            let off = b as u64 * BLOCK_SIZE;
            let mut buf = vec![0u8; (size - off).min(BLOCK_SIZE) as usize];
            w.read_exact_at(&mut buf, off)?;
            sim.with(|st| st.guest_write(&vdi, off, &buf))
                .map_err(anyhow::Error::msg)?;
        }
        backup(i + 1)?;
    }
    let _ = fs::remove_file(&prev);
    let _ = fs::remove_file(&work);
    let snaps = sim.with(|st| {
        st.vdis
            .values()
            .filter(|v| v.is_a_snapshot)
            .map(|v| format!("{} ({})", v.uuid, v.kind))
            .collect::<Vec<_>>()
    });
    say(&format!(
        "   snapshots left on the host: {} (only CBT metadata: the next backup's origin)",
        snaps.join(", ")
    ));
    drop(sim);

    say(&format!("== cbtfs ls {}", repo_path.display()));
    let out = Command::new(std::env::current_exe()?)
        .env("CBTFS_KEY_FILE", &key_file)
        .args(["ls", &repo_path.display().to_string()])
        .output()?;
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        say(l);
    }

    say("== verify");
    let mut report = crate::verify::VerifyReport::default();
    crate::verify::verify_all(&repo, &crate::verify::VerifyOptions::default(), &mut report)?;
    if !report.ok() {
        bail!("verify found damage: {:?}", report.damage);
    }
    say(&format!(
        "   ok: {} points, {} stored blocks checked",
        report.points_checked, report.blocks_checked
    ));

    say("== each point, exported, holds the guest as it was that day");
    let catalog = Tree::build(repo.catalog()?);
    let Some((_, disk)) = catalog.disk_by_uuid(&vdi) else {
        bail!("the demo disk is missing from the repository");
    };
    let out_img = dir.join("export.raw");
    let mut day3_path = String::from("demo-vm/root/latest.raw");
    let mut first_path = String::new();
    for set in &disk.history.sets {
        for p in &set.points {
            let reader = PointReader::open(&repo, set, p.seq)?;
            if first_path.is_empty() {
                first_path = catalog.path_of(p).unwrap_or_default();
            }
            if p.seq == 3 {
                day3_path = format!("{}.raw", catalog.path_of(p).unwrap_or_default());
            }
            let _ = fs::remove_file(&out_img);
            crate::export::export_to_path(&reader, &out_img, true, &|_| {})?;
            let notes = debugfs_cat(&out_img, "/home/alice/notes.txt")?;
            let report = debugfs_cat(&out_img, "/home/alice/report.txt")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "(no such file)\n".into());
            say(&format!(
                "   {}: notes.txt = {:?}, report.txt = {:?}",
                catalog.path_of(p).unwrap_or_else(|| p.label()),
                notes.trim_end(),
                report.trim_end()
            ));
        }
    }
    let _ = fs::remove_file(&out_img);

    say("== the whole history, mounted: every restore point is a raw disk file");
    fs::create_dir_all(&mnt)?;
    let exe = std::env::current_exe()?;
    let mounted = Command::new(&exe)
        .env("CBTFS_KEY_FILE", &key_file)
        .args([
            "mount",
            &repo_path.display().to_string(),
            &mnt.display().to_string(),
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if mounted {
        for e in walk(&mnt, 0)? {
            say(&format!("   {e}"));
        }
        let day3 = mnt.join(&day3_path);
        let day3_point = day3_path.trim_end_matches(".raw").to_string();
        let repo_arg = repo_path.display().to_string();
        say("== what changed in the guest from the first backup to day 3 (cbtfs diff)");
        if let Ok(o) = Command::new(&exe)
            .env("CBTFS_KEY_FILE", &key_file)
            .args(["diff", &repo_arg, &first_path, &day3_point])
            .output()
        {
            for l in String::from_utf8_lossy(&o.stdout).lines() {
                say(&format!("   {l}"));
            }
            for l in String::from_utf8_lossy(&o.stderr).lines() {
                say(&format!("   {l}"));
            }
        }
        say("== day 3's files, browsed (cbtfs browse): the guest's filesystem, read-only");
        // SAFETY: geteuid has no preconditions.
        let userspace = unsafe { libc::geteuid() } != 0;
        let mut browse = Command::new(&exe);
        browse.env("CBTFS_KEY_FILE", &key_file).arg("browse");
        if userspace {
            browse.arg("--userspace");
        }
        let browsed = browse
            .args([&repo_arg, &day3_point, &files.display().to_string()])
            .output();
        if let Ok(o) = &browsed {
            for l in String::from_utf8_lossy(&o.stdout).lines() {
                say(&format!("   {l}"));
            }
            if !o.status.success() {
                say(&format!("   {}", String::from_utf8_lossy(&o.stderr).trim()));
            }
        }
        let report = files.join("disk/home/alice/report.txt");
        if let Ok(text) = fs::read_to_string(&report) {
            say(&format!("   {} = {:?}", report.display(), text.trim_end()));
        }
        say(&format!(
            "== done. Explore it:\n   export CBTFS_KEY_FILE={key}   # what opens the repository\n   ls -l {m}/demo-vm/root/*/\n   ls -R {f}/disk/home\n   qemu-img info {m}/demo-vm/root/latest.raw\n   cbtfs ls {repo}; cbtfs verify {repo}\n   sudo mount -o loop,ro,noload {day3} /mnt   # the raw way\n   cbtfs browse --unmount {f}; umount {m}    # when done",
            m = mnt.display(),
            f = files.display(),
            day3 = day3.display(),
            repo = repo_path.display(),
            key = key_file.display()
        ));
    } else {
        say(&format!(
            "   (the mount needs FUSE: install fuse3, then `cbtfs mount {} {}`)",
            repo_path.display(),
            mnt.display()
        ));
        say(&format!(
            "== done. Explore it:\n   export CBTFS_KEY_FILE={key}\n   cbtfs ls {repo}\n   cbtfs export {repo} {vdi}@latest /tmp/latest.raw\n   cbtfs verify {repo}",
            repo = repo_path.display(),
            key = key_file.display()
        ));
    }
    Ok(())
}

/// The mount's tree, indented, for display.
fn walk(dir: &Path, depth: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)?.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = e.file_type()?;
        let pad = "  ".repeat(depth);
        if ft.is_symlink() {
            let t = fs::read_link(e.path())?;
            out.push(format!("{pad}{name} -> {}", t.display()));
        } else if ft.is_dir() && name.ends_with(crate::fs::PARTS_SUFFIX) {
            // The volumes inside the point: say what volumes.txt says, in one line.
            let summary = fs::read_to_string(e.path().join(crate::fs::VOLUMES_TXT))
                .ok()
                .and_then(|t| t.lines().next().map(String::from))
                .unwrap_or_default();
            out.push(format!("{pad}{name}/  ({summary})"));
        } else if ft.is_dir() {
            out.push(format!("{pad}{name}/"));
            out.extend(walk(&e.path(), depth + 1)?);
        } else {
            out.push(format!("{pad}{name}  ({} MiB)", e.metadata()?.len() >> 20));
        }
    }
    Ok(out)
}

/// Default demo directory.
pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("cbtfs-demo")
}
