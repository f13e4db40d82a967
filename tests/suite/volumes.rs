//! Volumes inside a point: MBR (with logical partitions), GPT, and LVM2 LVs (linear in two
//! non-contiguous pieces, striped over two PVs) mapped without device-mapper. Disks are built
//! with sfdisk and the real LVM tools (metadata only: activation off); where each LV's bytes
//! lie is taken from `lvs --segments`, independently of cbtfs's parser.

use std::path::Path;
use std::process::Command;

use crate::common::*;
use cbtfs::read::PointReader;
use cbtfs::repo::Repository;
use cbtfs::volumes::{Layout, discover};
use serde_json::Value;

const LVM_CONF: &str = "global { activation=0 } devices { obtain_device_list_from_udev=0 }";

/// Import `img` as a base point and discover its volumes through the repository.
fn layout_of(dir: &Path, img: &Path) -> (Repository, PointReader, Layout) {
    let repo = dir.join("repo");
    ok(&["init", s(&repo)]);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &vdi(1),
        "--raw",
        s(img),
        "--time",
        &time(0),
    ]);
    let r = open_repo(&repo);
    let d = r.disk(&vdi(1)).unwrap();
    let reader = PointReader::open(&r, &d.sets[0], 0).unwrap();
    let layout = discover(&reader).unwrap();
    (r, reader, layout)
}

fn read_volume(reader: &PointReader, layout: &Layout, name: &str) -> Vec<u8> {
    let v = layout
        .volumes
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name} in {layout:?}"));
    let mut out = vec![0u8; v.size as usize];
    let mut at = 0usize;
    for (o, l) in v.map(0, v.size) {
        reader.read_at(&mut out[at..at + l as usize], o).unwrap();
        at += l as usize;
    }
    out
}

#[test]
fn mbr_with_logical_partitions_and_gpt() {
    if !have("sfdisk") || !have("mkfs.ext4") {
        skip("needs sfdisk and mkfs.ext4 (scripts/setup.sh installs fdisk, e2fsprogs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mbr.img");
    sh(&format!("truncate -s 64M {}", s(&img)));
    sh(&format!(
        "printf 'label: dos\\nstart=2048, size=20480, type=83\\nstart=22528, size=90112, type=5\\nstart=24576, size=8192, type=83\\nstart=34816, size=16384, type=82\\nstart=112640, type=83\\n' | sfdisk -q {}",
        s(&img)
    ));
    // A filesystem in p1, built apart and placed at its offset.
    let fs = dir.path().join("p1.fs");
    sh(&format!(
        "truncate -s 10M {0} && mkfs.ext4 -q -F {0} && dd if={0} of={1} bs=512 seek=2048 conv=notrunc status=none",
        s(&fs),
        s(&img)
    ));
    let want: Value = serde_json::from_str(&sh(&format!("sfdisk --json {}", s(&img)))).unwrap();
    let (_, reader, layout) = layout_of(dir.path(), &img);
    assert_eq!(layout.scheme, "mbr");
    let names: Vec<&str> = layout.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["p1", "p3", "p5", "p6"], "{layout:?}");
    for p in want["partitiontable"]["partitions"].as_array().unwrap() {
        let node = p["node"].as_str().unwrap();
        let n: usize = node
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if p["type"] == "5" {
            continue;
        }
        let v = layout
            .volumes
            .iter()
            .find(|v| v.name == format!("p{n}"))
            .unwrap();
        assert_eq!(
            v.extents[0].disk_offset,
            p["start"].as_u64().unwrap() * 512,
            "{node}"
        );
        assert_eq!(v.size, p["size"].as_u64().unwrap() * 512, "{node}");
    }
    assert_eq!(layout.volumes[0].content.as_deref(), Some("ext4"));
    assert_eq!(
        read_volume(&reader, &layout, "p1"),
        std::fs::read(&fs).unwrap()
    );

    let gimg = dir.path().join("gpt.img");
    sh(&format!("truncate -s 32M {}", s(&gimg)));
    sh(&format!(
        "printf 'label: gpt\\nstart=2048, size=8192, name=efi\\nstart=10240, size=20480, name=root\\n' | sfdisk -q {}",
        s(&gimg)
    ));
    let g = tempfile::tempdir().unwrap();
    let (_, _, layout) = layout_of(g.path(), &gimg);
    assert_eq!(layout.scheme, "gpt");
    assert_eq!(layout.volumes.len(), 2);
    assert_eq!(layout.volumes[1].name, "p2");
    assert!(layout.volumes[1].what.contains("\"root\""), "{layout:?}");
    assert_eq!(layout.volumes[1].extents[0].disk_offset, 10240 * 512);

    // A bare filesystem, and the CLI's listing.
    let b = tempfile::tempdir().unwrap();
    let (_, _, layout) = layout_of(b.path(), &fs);
    assert_eq!(layout.scheme, "none");
    assert_eq!(layout.content.as_deref(), Some("ext4"));
    let out = ok(&[
        "ls",
        s(&dir.path().join("repo")),
        "--volumes",
        &format!("{}@latest", vdi(1)),
    ]);
    assert!(
        out.contains("p5") && out.contains("mbr logical partition"),
        "{out}"
    );
}

#[test]
fn lvm_linear_in_two_pieces_and_striped_over_two_pvs() {
    let _host = host_state();
    if !is_root() || !have("pvcreate") || !have("sfdisk") || !have("losetup") {
        skip("needs root, sfdisk, losetup and lvm2 (scripts/setup.sh installs them)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("lvm.img");
    sh(&format!("truncate -s 96M {}", s(&img)));
    sh(&format!(
        "printf 'label: dos\\nstart=2048, size=81920, type=8e\\nstart=83968, size=100352, type=8e\\n' | sfdisk -q {}",
        s(&img)
    ));
    let loop_at = |start: u64, size: u64| {
        sh(&format!(
            "losetup -f --show -o {} --sizelimit {} {}",
            start * 512,
            size * 512,
            s(&img)
        ))
        .trim()
        .to_string()
    };
    let (a, b) = (loop_at(2048, 81920), loop_at(83968, 100352));
    let c = format!("--config '{LVM_CONF}'");
    let run = || -> Value {
        sh(&format!("pvcreate -q {c} {a} {b}"));
        sh(&format!("vgcreate -q {c} -s 1M vgt {a} {b}"));
        sh(&format!("lvcreate -q {c} -an -Zn -L 3M -n root vgt {a}"));
        sh(&format!("lvcreate -q {c} -an -Zn -L 2M -n gap vgt {a}"));
        sh(&format!("lvextend -q {c} -L 6M vgt/root {a}"));
        sh(&format!(
            "lvcreate -q {c} -an -Zn -i2 -I64k -L 8M -n data vgt"
        ));
        let segs = sh(&format!(
            "lvs {c} --reportformat json --units b --nosuffix --segments -o lv_name,seg_start,seg_size,seg_pe_ranges,stripes,stripe_size vgt"
        ));
        let pvs = sh(&format!(
            "pvs {c} --reportformat json --units b --nosuffix -o pv_name,pe_start {a} {b}"
        ));
        let ext = sh(&format!(
            "vgs {c} --reportformat json --units b --nosuffix -o vg_extent_size vgt"
        ));
        serde_json::json!({"segs": serde_json::from_str::<Value>(&segs).unwrap(), "pvs": serde_json::from_str::<Value>(&pvs).unwrap(), "ext": serde_json::from_str::<Value>(&ext).unwrap()})
    };
    let info = std::panic::catch_unwind(run);
    let _ = Command::new("vgchange")
        .args(["--config", LVM_CONF, "-an", "vgt"])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .bounded();
    for l in [&a, &b] {
        let _ = Command::new("losetup").args(["-d", l]).status();
    }
    let info = info.unwrap();
    let extent: u64 = info["ext"]["report"][0]["vg"][0]["vg_extent_size"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let pv_start = |dev: &str| -> u64 {
        let part = if dev == a { 2048 * 512 } else { 83968 * 512 };
        let pe: u64 = info["pvs"]["report"][0]["pv"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pv_name"] == dev)
            .unwrap()["pe_start"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        part + pe
    };
    // Where each LV byte lies, from lvs: write a pattern there that names the LV and offset.
    let mut disk = std::fs::read(&img).unwrap();
    let mut expect: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    for seg in info["segs"]["report"][0]["seg"].as_array().unwrap() {
        let lv = seg["lv_name"].as_str().unwrap().to_string();
        let start: u64 = seg["seg_start"].as_str().unwrap().parse().unwrap();
        let size: u64 = seg["seg_size"].as_str().unwrap().parse().unwrap();
        let stripes: u64 = seg["stripes"].as_str().unwrap().parse().unwrap();
        let chunk: u64 = seg["stripe_size"].as_str().unwrap().parse().unwrap();
        // "/dev/loop0:0-2 /dev/loop1:0-2" (one range per stripe)
        let ranges: Vec<(String, u64)> = seg["seg_pe_ranges"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .map(|r| {
                let (dev, pes) = r.rsplit_once(':').unwrap();
                (
                    dev.to_string(),
                    pes.split('-').next().unwrap().parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(ranges.len() as u64, stripes);
        let buf = expect.entry(lv.clone()).or_default();
        buf.resize((start + size) as usize, 0);
        let mut rng = TestRng::new(start ^ lv.len() as u64);
        for x in (0..size).step_by(4096) {
            let (dev, pe, off) = if stripes == 1 {
                (&ranges[0].0, ranges[0].1, x)
            } else {
                let ch = x / chunk;
                let (st, row) = (ch % stripes, ch / stripes);
                (
                    &ranges[st as usize].0,
                    ranges[st as usize].1,
                    row * chunk + x % chunk,
                )
            };
            let at = (pv_start(dev) + pe * extent + off) as usize;
            let mut block = [0u8; 4096];
            rng.fill(&mut block);
            disk[at..at + 4096].copy_from_slice(&block);
            buf[(start + x) as usize..(start + x + 4096) as usize].copy_from_slice(&block);
        }
    }
    std::fs::write(&img, &disk).unwrap();
    let (_, reader, layout) = layout_of(dir.path(), &img);
    for (lv, want) in &expect {
        let got = read_volume(&reader, &layout, &format!("vgt-{lv}"));
        assert!(
            got == *want,
            "LV {lv} reads differently through cbtfs's mapping"
        );
    }
    let root = layout
        .volumes
        .iter()
        .find(|v| v.name == "vgt-root")
        .unwrap();
    assert_eq!(root.extents.len(), 2, "root lies in two pieces: {root:?}");
    let data = layout
        .volumes
        .iter()
        .find(|v| v.name == "vgt-data")
        .unwrap();
    assert!(
        data.extents
            .iter()
            .any(|e| e.stripes.len() == 2 && e.chunk == 64 << 10),
        "striped over two PVs in 64 KiB chunks: {data:?}"
    );
}

#[test]
fn partition_files_in_the_mount_loop_mount_without_offsets() {
    let _host = host_state();
    if !can_mount() || !have("sfdisk") || !have("mkfs.ext4") {
        skip("needs root, /dev/fuse, sfdisk and mkfs.ext4");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sh(&format!("truncate -s 48M {}", s(&img)));
    sh(&format!(
        "printf 'label: dos\\nstart=2048, size=4096, type=83\\nstart=8192, size=32768, type=5\\nstart=10240, size=24576, type=83\\n' | sfdisk -q {}",
        s(&img)
    ));
    // An ext4 with a known file inside logical partition p5.
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "guest-in-p5\n").unwrap();
    let fs = dir.path().join("p5.fs");
    sh(&format!(
        "truncate -s 12M {0} && mkfs.ext4 -q -F -d {1} {0} && dd if={0} of={2} bs=512 seek=10240 conv=notrunc status=none",
        s(&fs),
        s(&tree),
        s(&img)
    ));
    let repo = dir.path().join("repo");
    ok(&["init", s(&repo)]);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &vdi(2),
        "--name",
        "root",
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]);
    let mp = dir.path().join("mnt");
    let m = Mounted::new(&repo, &mp, &[]);
    let point = &point_paths(&repo)[0];
    let parts = m.mp.join(point.replace(".raw", ".parts"));
    let mut names: Vec<String> = std::fs::read_dir(&parts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["p1.raw", "p5.raw", "volumes.txt"]);
    let txt = std::fs::read_to_string(parts.join("volumes.txt")).unwrap();
    assert!(txt.contains("p5.raw") && txt.contains("ext4"), "{txt}");
    // The partition file is the filesystem, byte for byte (24576 sectors; the fs image is 12 MiB).
    let p5 = std::fs::read(parts.join("p5.raw")).unwrap();
    assert_eq!(p5.len(), 24576 * 512);
    assert!(p5[..12 << 20] == std::fs::read(&fs).unwrap()[..]);
    // Writes are refused; a loop mount needs no offset.
    assert!(
        std::fs::OpenOptions::new()
            .write(true)
            .open(parts.join("p5.raw"))
            .is_err()
    );
    let guest = dir.path().join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    sh(&format!(
        "mount -o loop,ro,noload {} {}",
        s(&parts.join("p5.raw")),
        s(&guest)
    ));
    let host = std::fs::read_to_string(guest.join("etc/hostname"));
    sh(&format!("umount {}", s(&guest)));
    assert_eq!(host.unwrap(), "guest-in-p5\n");
    drop(m);
}

/// LVM2's checksum, written here from its definition (CRC-32, reflected polynomial
/// 0xEDB88320, started at 0xf597a6cf, no final inversion), apart from cbtfs's.
fn lvm2_crc(data: &[u8]) -> u32 {
    let mut crc = 0xf597_a6cfu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Write an LVM2 PV at byte `at` of `img` (`len` bytes): label in sector 1, one metadata area
/// at PV byte 4096 (64 KiB) holding `text`, data from PV byte 1 MiB.
fn put_pv(img: &mut [u8], at: usize, len: u64, id: &str, text: &str) {
    let put = |img: &mut [u8], o: usize, b: &[u8]| img[at + o..at + o + b.len()].copy_from_slice(b);
    put(img, 512, b"LABELONE");
    put(img, 512 + 8, &1u64.to_le_bytes());
    put(img, 512 + 20, &32u32.to_le_bytes());
    put(img, 512 + 24, b"LVM2 001");
    put(img, 544, id.as_bytes());
    put(img, 544 + 32, &len.to_le_bytes());
    put(img, 544 + 40, &(1u64 << 20).to_le_bytes());
    put(img, 544 + 72, &4096u64.to_le_bytes());
    put(img, 544 + 80, &(64u64 << 10).to_le_bytes());
    let crc = lvm2_crc(&img[at + 532..at + 1024]);
    put(img, 512 + 16, &crc.to_le_bytes());
    let m = 4096;
    put(img, m + 4, b" LVM2 x[5A%r0N*>");
    put(img, m + 20, &1u32.to_le_bytes());
    put(img, m + 24, &4096u64.to_le_bytes());
    put(img, m + 32, &(64u64 << 10).to_le_bytes());
    put(img, m + 40, &512u64.to_le_bytes());
    put(img, m + 48, &(text.len() as u64).to_le_bytes());
    put(img, m + 56, &lvm2_crc(text.as_bytes()).to_le_bytes());
    let crc = lvm2_crc(&img[at + m + 4..at + m + 512]);
    put(img, m, &crc.to_le_bytes());
    put(img, m + 512, text.as_bytes());
}

/// A guest disk built to break partition and LVM parsers: p1 a PV whose metadata nests a
/// list 100,000 deep; p2 a PV whose VG has one good LV and three hostile ones (overlapping
/// segments, a striped segment of 20M extents, a 4 TB LV on an 8 MiB disk); p3 and p4
/// overlapping. Returns the image and the good LV's bytes.
fn hostile_image() -> (Vec<u8>, Vec<u8>) {
    let mut img = vec![0u8; 8 << 20];
    img[510] = 0x55;
    img[511] = 0xAA;
    for (i, (kind, start, len)) in [
        (0x8eu8, 2048u32, 2048u32),
        (0x8e, 4096, 8192),
        (0x83, 12288, 2048),
        (0x83, 13000, 2048),
    ]
    .into_iter()
    .enumerate()
    {
        let e = 446 + i * 16;
        img[e + 4] = kind;
        img[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        img[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
    }
    let deep = format!(
        "vgd {{ a = {}1{} }}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep = &deep[..60_000.min(deep.len())]; // what fits the area: still unclosed, still deep
    put_pv(&mut img, 2048 * 512, 1 << 20, &"D".repeat(32), deep);
    let seg = |n: u32, first: u64, count: u64, more: &str| {
        format!(
            "segment{n} {{ start_extent = {first} extent_count = {count} type = \"striped\" {more} }}\n"
        )
    };
    let lv = |name: &str, segs: &[String]| {
        format!(
            "{name} {{ status = [\"READ\", \"WRITE\", \"VISIBLE\"] segment_count = {}\n{} }}\n",
            segs.len(),
            segs.concat()
        )
    };
    let one = "stripe_count = 1 stripes = [\"pv0\", 0]";
    let text = format!(
        "vgh {{ id = \"h\" seqno = 1 extent_size = 8\n\
         physical_volumes {{ pv0 {{ id = \"{}\" pe_start = 2048 pe_count = 768 }} }}\n\
         logical_volumes {{\n{}{}{}{} }} }}\n",
        "H".repeat(32),
        lv("good", &[seg(1, 0, 4, "stripes = [\"pv0\", 10]")]),
        lv(
            "overlap",
            &[seg(1, 0, 4, one), seg(2, 2, 4, "stripes = [\"pv0\", 20]")]
        ),
        lv(
            "huge",
            &[seg(
                1,
                0,
                20_000_000,
                "stripe_count = 2 stripe_size = 1 stripes = [\"pv0\", 0, \"pv0\", 1]"
            )]
        ),
        lv("big", &[seg(1, 0, 4_000_000_000_000 / 4096, one)]),
    );
    put_pv(&mut img, 4096 * 512, 4 << 20, &"H".repeat(32), &text);
    // The good LV: 4 extents of 4 KiB at PV extent 10 (p2 + 1 MiB + 40 KiB).
    let at = 4096 * 512 + (1 << 20) + 10 * 4096;
    let mut rng = TestRng::new(16);
    rng.fill(&mut img[at..at + 4 * 4096]);
    let good = img[at..at + 4 * 4096].to_vec();
    (img, good)
}

/// A GPT disk whose second entry lies at LBA 2^55 (once listed as a readable p2 at byte 0).
fn gpt_beyond_image() -> Vec<u8> {
    let mut img = vec![0u8; 1 << 20];
    img[510] = 0x55;
    img[511] = 0xAA;
    img[446 + 4] = 0xEE;
    img[512..520].copy_from_slice(b"EFI PART");
    img[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
    img[512 + 80..512 + 84].copy_from_slice(&2u32.to_le_bytes());
    img[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
    for (i, (first, last)) in [(34u64, 1000u64), (1 << 55, (1 << 55) + 100)]
        .into_iter()
        .enumerate()
    {
        let e = 1024 + i * 128;
        img[e] = 0x0F;
        img[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
        img[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
    }
    img
}

/// Hostile guest disks as points of a mounted repository: `POINT.parts/` lists the damage
/// with its reasons, the good volumes read right, and the daemon goes on serving every other
/// file; `cbtfs ls --volumes` reports the same and exits 0 (issue #16, defects 2, 3, 4, 9).
#[test]
fn hostile_guest_disks_are_listed_as_damaged_and_the_mount_survives() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    ok(&["init", s(&repo)]);
    let (hostile, good) = hostile_image();
    let mut plain = vec![0u8; 2 << 20];
    TestRng::new(7).fill(&mut plain);
    let images = [
        ("hostile", hostile.clone()),
        ("gptbeyond", gpt_beyond_image()),
        ("plain", plain.clone()),
    ];
    for (n, (name, bytes)) in images.iter().enumerate() {
        let img = dir.path().join(format!("{name}.img"));
        std::fs::write(&img, bytes).unwrap();
        ok(&[
            "import",
            s(&repo),
            "--vdi",
            &vdi(n as u32 + 1),
            "--name",
            name,
            "--raw",
            s(&img),
            "--time",
            &time(0),
        ]);
    }
    let paths = point_paths(&repo);
    let path_of = |name: &str| {
        paths
            .iter()
            .find(|p| p.contains(name))
            .unwrap_or_else(|| panic!("no point named {name} in {paths:?}"))
            .clone()
    };
    let m = Mounted::new(&repo, &dir.path().join("mnt"), &[]);
    let listing = |point: &str| {
        let parts = m.mp.join(point.replace(".raw", ".parts"));
        let mut names: Vec<String> = std::fs::read_dir(&parts)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let txt = std::fs::read_to_string(parts.join("volumes.txt")).unwrap();
        (parts, names, txt)
    };

    let (parts, names, txt) = listing(&path_of("hostile"));
    assert_eq!(
        names,
        ["p1.raw", "p2.raw", "vgh-good.raw", "volumes.txt"],
        "{txt}"
    );
    for line in [
        "cannot parse the volume group metadata on p1: sections or lists nested more than 32 deep",
        "vgh-overlap          not readable: segment 2 starts at extent 2 where 4 was expected: its segments overlap or leave a gap (damaged metadata)",
        "vgh-huge             not readable: segment 1 lies outside its PV pv0",
        "vgh-big              not readable: segment 1 lies outside its PV pv0",
        "p3                   not readable: it overlaps p4 (bytes 6291456..7340032 and 6656000..7704576): damaged partition table",
        "p4                   not readable: it overlaps p3",
    ] {
        assert!(txt.contains(line), "volumes.txt lacks {line:?}:\n{txt}");
    }
    assert_eq!(std::fs::read(parts.join("vgh-good.raw")).unwrap(), good);

    let (_, names, txt) = listing(&path_of("gptbeyond"));
    assert_eq!(names, ["p1.raw", "volumes.txt"], "{txt}");
    assert!(
        txt.contains("p2                   not readable: it lies at LBA 36028797018963968..=36028797018964068, past any disk: damaged table"),
        "{txt}"
    );

    // The daemon is alive and every point still reads exactly.
    for (name, bytes) in &images {
        let got = std::fs::read(m.mp.join(path_of(name))).unwrap();
        assert!(
            got == *bytes,
            "point {name} reads differently after the listings"
        );
    }
    assert!(cbtfs::mount::mounted_fstype(&m.mp).is_some());
    drop(m);

    // The CLI says the same and exits 0.
    let out = ok(&["ls", s(&repo), "--volumes", &format!("{}@latest", vdi(1))]);
    assert!(out.contains("vgh-good.raw"), "{out}");
    assert!(out.contains("nested more than 32 deep"), "{out}");
    assert!(out.contains("it overlaps p4"), "{out}");
}
