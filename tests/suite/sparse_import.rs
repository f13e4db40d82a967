//! A sparse raw image imports in time proportional to its data, not its size, and reads back
//! byte for byte: data where it was written, zeros in the holes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use crate::common::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A new sparse file of `size` bytes holding `data` (offset, bytes).
fn write_sparse(path: &Path, size: u64, data: &[(u64, Vec<u8>)]) {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    for (off, bytes) in data {
        f.write_all_at(bytes, *off).unwrap();
    }
    f.sync_all().unwrap();
}

fn read_at(f: &File, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

/// Data ranges of the image, ascending and apart: random lengths around 2 MiB at random
/// offsets (most not 64 KiB-aligned, some not even 512-aligned), one at the very start and one
/// ending at the very end of the image.
fn scattered(rng: &mut TestRng, size: u64, count: u64) -> Vec<(u64, Vec<u8>)> {
    let slot = size / count;
    let mut out = Vec::new();
    for i in 0..count {
        let len = MIB + rng.below(2 * MIB);
        let off = match i {
            0 => 0,
            i if i == count - 1 => size - len,
            i => i * slot + rng.below(slot - len),
        };
        let mut bytes = vec![0u8; len as usize];
        rng.fill(&mut bytes);
        out.push((off, bytes));
    }
    out
}

/// The ranges between the data, each checked for zeros: the bytes of the 64 KiB blocks shared
/// with the data around it, and a stretch in the middle of the hole.
fn hole_probes(size: u64, data: &[(u64, Vec<u8>)]) -> Vec<(u64, u64)> {
    let bs = BS as u64;
    let mut probes = Vec::new();
    let mut prev_end = 0u64;
    for (off, bytes) in data.iter().chain(std::iter::once(&(size, Vec::new()))) {
        if *off > prev_end {
            // Up to the block boundary after the previous range, and from the one before this.
            let after = prev_end.next_multiple_of(bs).min(*off);
            probes.push((prev_end, after - prev_end));
            let before = (off - off % bs).max(prev_end);
            probes.push((before, off - before));
            let gap = off - prev_end;
            if gap > 4 * MIB {
                probes.push((prev_end + gap / 2, MIB));
            }
        }
        prev_end = off + bytes.len() as u64;
    }
    probes.retain(|&(_, len)| len > 0);
    probes
}

#[test]
fn a_sparse_2_tib_image_imports_only_its_data_and_reads_back() {
    let d = tempfile::tempdir().unwrap();
    let size = 2048 * GIB;
    let img = d.path().join("disk.raw");
    let mut rng = TestRng::new(18);
    // About 96 MiB of data in 48 ranges.
    let data = scattered(&mut rng, size, 48);
    let total: u64 = data.iter().map(|(_, b)| b.len() as u64).sum();
    if let Err(e) = File::create(d.path().join("probe")).and_then(|f| f.set_len(size)) {
        return skip(&format!(
            "this filesystem cannot hold a 2 TiB sparse file: {e}"
        ));
    }
    write_sparse(&img, size, &data);

    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(1);
    let started = Instant::now();
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&img),
        "--time",
        &time(0),
    ]);
    println!(
        "import of a 2 TiB sparse image holding {} MiB: {:.2} s",
        total / MIB,
        started.elapsed().as_secs_f64()
    );

    let out = d.path().join("out.raw");
    let started = Instant::now();
    ok(&["export", s(&repo), &format!("{v}@latest"), s(&out)]);
    println!("export of it: {:.2} s", started.elapsed().as_secs_f64());
    let f = File::open(&out).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    for (off, bytes) in &data {
        let got = read_at(&f, *off, bytes.len() as u64);
        assert!(
            got == *bytes,
            "the {} bytes at {off} differ from the image's",
            bytes.len()
        );
    }
    let probes = hole_probes(size, &data);
    assert!(probes.len() > 100, "{} probes", probes.len());
    for (off, len) in probes {
        let got = read_at(&f, off, len);
        assert!(
            got.iter().all(|&b| b == 0),
            "the hole's {len} bytes at {off} are not zeros"
        );
    }
}

#[test]
fn an_increment_records_marked_blocks_in_holes_as_zeros() {
    let d = tempfile::tempdir().unwrap();
    let bs = BS as u64;
    let size = 64 * MIB;
    let blocks = size / bs;
    let mut rng = TestRng::new(7);
    let mut first = vec![0u8; 8 * BS];
    rng.fill(&mut first);
    // The base: data in blocks 10..18 and 600..608.
    let base = d.path().join("base.raw");
    write_sparse(
        &base,
        size,
        &[(10 * bs, first.clone()), (600 * bs, first.clone())],
    );
    let repo = d.path().join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(2);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&base),
        "--time",
        &time(0),
    ]);
    // The next state: blocks 10..18 became a hole (trimmed), 600..608 kept their data, and a
    // block (900) got new data in its middle. The bitmap marks 10..18, 600 and 900.
    let next = d.path().join("next.raw");
    let mut new = vec![0u8; 1000];
    rng.fill(&mut new);
    write_sparse(
        &next,
        size,
        &[(600 * bs, first.clone()), (900 * bs + 3000, new.clone())],
    );
    let mut marked: Vec<u64> = (10..18).collect();
    marked.extend([600, 900]);
    let bm = write_bitmap(d.path(), "bm", &marked, blocks);
    ok(&[
        "import",
        s(&repo),
        "--vdi",
        &v,
        "--raw",
        s(&next),
        "--bitmap",
        s(&bm),
        "--time",
        &time(1),
    ]);
    // The newest point reads as the second image, byte for byte; the base as the first.
    let out = d.path().join("out.raw");
    ok(&["export", s(&repo), &format!("{v}@latest"), s(&out)]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&next).unwrap());
    let out0 = d.path().join("out0.raw");
    let j: serde_json::Value = serde_json::from_str(&ok(&["ls", s(&repo), "--json"])).unwrap();
    let pts = &j["vms"][0]["disks"][0]["sets"][0]["points"];
    assert_eq!(pts[1]["changed_blocks"], 10, "{j}");
    let base_path = pts[0]["path"].as_str().unwrap();
    ok(&["export", s(&repo), base_path, s(&out0)]);
    assert!(std::fs::read(&out0).unwrap() == std::fs::read(&base).unwrap());
}
