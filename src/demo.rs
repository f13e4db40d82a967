//! `cbtfs demo`: the whole job on an embedded default, with nothing to set up.
//!
//! Builds a real guest filesystem (ext4, `mkfs.ext4 -d`), changes files in it day by day
//! (`debugfs -w`, no root needed), takes each day's changed 64 KiB blocks as the host's CBT
//! would report them, imports every day as a restore point, then verifies, exports each point and
//! reads a file from inside it to show each point holds the guest as it was that day.
//! (The simulated XenServer host and the mount join this demo as they land.)

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use roaring::RoaringBitmap;

use crate::import::{ImportRequest, import_raw};
use crate::naming::Tree;
use crate::read::PointReader;
use crate::repo::Repository;
use crate::{BLOCK_SIZE, bitmap, timefmt};

const DISK_SIZE: &str = "256M";
const VDI: &str = "6f3d2a10-4b8e-4c1a-9d2f-0a1b2c3d4e5f";
const VM: &str = "0c9e7b42-1f3a-4d5e-8b6c-7d8e9f0a1b2c";
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

pub fn run_demo(dir: &Path) -> Result<()> {
    let mnt = dir.join("mnt");
    if crate::mount::mounted_fstype(&mnt).is_some() {
        // A previous demo's mount: take it down before clearing the directory.
        let _ = Command::new("umount").arg(&mnt).status();
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

    println!("== a guest disk: ext4 with a few files ({DISK_SIZE})");
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

    let repo = Repository::init(&repo_path)?;
    println!("== repository {}", repo_path.display());
    let start = timefmt::parse("2026-11-16T02:00:00Z").map_err(anyhow::Error::msg)?;
    let import = |bitmap: Option<String>, day: i64| -> Result<()> {
        let r = import_raw(
            &repo,
            &ImportRequest {
                vdi: VDI.into(),
                disk_name: Some("root".into()),
                vm_uuid: Some(VM.into()),
                vm_name: Some("demo-vm".into()),
                source: crate::import::ImportSource::Raw(image.clone()),
                bitmap: bitmap.map(|b| (b, "demo".into())),
                time: start + day * 86400,
                snapshot: None,
                vm_metadata: None,
                source_label: None,
            },
            |_, _| {},
        )?;
        let m = r.manifest;
        println!(
            "   day {day}: {} point {}, {} blocks changed, {} stored",
            if m.seq == 0 { "base" } else { "incremental" },
            timefmt::basic(m.time),
            m.changed_blocks,
            m.data_blocks
        );
        Ok(())
    };
    println!("== backups: a full base, then one incremental point a day");
    import(None, 0)?;
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
        fs::copy(&image, &prev)?;
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
            &["-w", "-f", &script.display().to_string(), &img],
        )?;
        let changed = changed_blocks(&prev, &image)?;
        let size = fs::metadata(&image)?.len();
        let b64 = bitmap::encode_base64(&changed, crate::blocks_for(size));
        import(Some(b64), i as i64 + 1)?;
    }
    let _ = fs::remove_file(&prev);

    println!("== cbtfs ls {}", repo_path.display());
    let out = Command::new(std::env::current_exe()?)
        .args(["ls", &repo_path.display().to_string()])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    println!("== verify");
    let mut report = crate::verify::VerifyReport::default();
    crate::verify::verify_all(&repo, &mut report)?;
    if !report.ok() {
        bail!("verify found damage: {:?}", report.damage);
    }
    println!(
        "   ok: {} points, {} stored blocks checked",
        report.points_checked, report.blocks_checked
    );

    println!("== each point, exported, holds the guest as it was that day");
    let catalog = Tree::build(repo.catalog()?);
    let Some((_, disk)) = catalog.disk_by_uuid(VDI) else {
        bail!("the demo disk is missing from the repository");
    };
    let out_img = dir.join("export.raw");
    for set in &disk.history.sets {
        for p in &set.points {
            let reader = PointReader::open(&repo, set, p.seq)?;
            let _ = fs::remove_file(&out_img);
            crate::export::export_to_path(&reader, &out_img, true, &|_| {})?;
            let notes = debugfs_cat(&out_img, "/home/alice/notes.txt")?;
            let report = debugfs_cat(&out_img, "/home/alice/report.txt")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "(no such file)\n".into());
            println!(
                "   {}: notes.txt = {:?}, report.txt = {:?}",
                catalog.path_of(p).unwrap_or_else(|| p.label()),
                notes.trim_end(),
                report.trim_end()
            );
        }
    }
    let _ = fs::remove_file(&out_img);

    println!("== the whole history, mounted: every restore point is a raw disk file");
    fs::create_dir_all(&mnt)?;
    let exe = std::env::current_exe()?;
    let mounted = Command::new(&exe)
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
            println!("   {e}");
        }
        let day3 = mnt.join("demo-vm/root/20261116T020000Z/20261119T020000Z.raw");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let guest = dir.join("guest");
            fs::create_dir_all(&guest)?;
            let ok = Command::new("mount")
                .args(["-o", "loop,ro,noload"])
                .arg(&day3)
                .arg(&guest)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                let text = fs::read_to_string(guest.join("home/alice/report.txt"))
                    .unwrap_or_else(|e| format!("({e})"));
                println!(
                    "== day 3's disk, loop-mounted from the mount: home/alice/report.txt = {:?}",
                    text.trim_end()
                );
                let _ = Command::new("umount").arg(&guest).status();
            }
        }
        println!(
            "== done. Explore it:\n   ls -l {m}/demo-vm/root/*/\n   sudo mount -o loop,ro,noload {day3} /mnt\n   qemu-img info {m}/demo-vm/root/latest.raw\n   cbtfs ls {repo}; cbtfs verify {repo}\n   umount {m}    # when done",
            m = mnt.display(),
            day3 = day3.display(),
            repo = repo_path.display()
        );
    } else {
        println!(
            "   (the mount needs FUSE: install fuse3, then `cbtfs mount {} {}`)",
            repo_path.display(),
            mnt.display()
        );
        println!(
            "== done. Explore it:\n   cbtfs ls {repo}\n   cbtfs export {repo} {VDI}@2026-11-19T02:00:00Z /tmp/day3.raw\n   cbtfs verify {repo}",
            repo = repo_path.display()
        );
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
