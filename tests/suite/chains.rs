//! Model test: random chains (random sizes, changed blocks, zero blocks, over-reported bits,
//! resizes, new sets) built with `import`; every point must read back exactly as the disk was at
//! its snapshot — which is also what the guide's coalescing procedure gives.

use std::path::Path;

use cbtfs::import::{ImportRequest, import_raw};
use cbtfs::naming::Tree;
use cbtfs::read::PointReader;

use crate::common::*;
use proptest::prelude::*;

/// The guide's procedure: coalesce each point's changed blocks onto the previous image.
fn coalesce(prev: &[u8], step: &Step) -> Vec<u8> {
    let Some(bits) = &step.bitmap else {
        return step.image.clone();
    };
    let mut out = prev.to_vec();
    out.resize(step.image.len(), 0);
    for &b in bits {
        let b = b as usize;
        let end = ((b + 1) * BS).min(out.len());
        out[b * BS..end].copy_from_slice(&step.image[b * BS..end]);
    }
    out
}

fn run_life(dir: &Path, steps: &[Step], seed: u64) {
    let repo = init_repo(&dir.join("repo"));
    let v = vdi(seed as u32);
    let img = dir.join("img");
    let mut reference: Vec<u8> = Vec::new();
    for (i, st) in steps.iter().enumerate() {
        std::fs::write(&img, &st.image).unwrap();
        let bitmap = st.bitmap.as_ref().map(|bits| {
            let mut bits = bits.clone();
            let nblocks = st.image.len().div_ceil(BS) as u64;
            if st.bitmap_blocks > nblocks {
                bits.push(st.bitmap_blocks - 1); // junk past the end must be ignored
            }
            let p = write_bitmap(dir, "bm", &bits, st.bitmap_blocks);
            (std::fs::read_to_string(p).unwrap(), "bm".to_string())
        });
        import_raw(
            &repo,
            &ImportRequest {
                vdi: v.clone(),
                disk_name: Some("disk".into()),
                vm_uuid: None,
                vm_name: None,
                source: cbtfs::import::ImportSource::Raw(img.clone()),
                bitmap,
                time: cbtfs::timefmt::parse(&time(i as u64)).unwrap(),
                snapshot: None,
                vm_metadata: None,
                vdi_type: None,
                vm_run: None,
                source_label: None,
            },
            |_, _| {},
        )
        .unwrap_or_else(|e| panic!("seed {seed} step {i}: import failed: {e}"));
        // The guide's coalescing and the disk's true contents agree in this model.
        let shrunk_and_regrown = st.bitmap.is_some() && reference.len() != st.image.len();
        reference = coalesce(&reference, st);
        if !shrunk_and_regrown {
            assert_eq!(reference, st.image, "seed {seed} step {i}: model broken");
        }
        reference = st.image.clone();
    }
    // Every point, read back through the chain, equals its snapshot byte for byte.
    let tree = Tree::build(repo.catalog().unwrap());
    let disk = &tree.disk_by_uuid(&v).unwrap().1.history;
    let mut k = 0;
    for set in &disk.sets {
        assert!(set.problems.is_empty());
        for p in &set.points {
            let want = &steps[k].image;
            let r = PointReader::open(&repo, set, p.seq).unwrap();
            assert_eq!(r.size(), want.len() as u64, "seed {seed} point {k}: size");
            let mut got = vec![0xAAu8; want.len()];
            assert_eq!(r.read_at(&mut got, 0).unwrap(), want.len());
            assert!(got == *want, "seed {seed} point {k}: content differs");
            // Unaligned reads across block and extent boundaries.
            let mut rng = TestRng::new(seed ^ k as u64);
            for _ in 0..8 {
                let off = rng.below(want.len() as u64) as usize;
                let len = rng.below(3 * BS as u64) as usize;
                let mut buf = vec![0x55u8; len];
                let n = r.read_at(&mut buf, off as u64).unwrap();
                let end = (off + len).min(want.len());
                assert_eq!(n, end - off);
                assert!(
                    buf[..n] == want[off..end],
                    "seed {seed} point {k} @{off}+{len}"
                );
            }
            k += 1;
        }
    }
    assert_eq!(k, steps.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_chains_read_back_exactly(seed in any::<u64>(), depth in 1usize..40) {
        let dir = tempfile::tempdir().unwrap();
        run_life(dir.path(), &life(seed, depth), seed);
    }
}

#[test]
fn depth_200_chain_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    run_life(dir.path(), &life(200, 200), 200);
}

/// The same through the command line: import and export as a user runs them, depth 200.
#[test]
fn cli_depth_200_export_equals_each_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    ok(&["init", s(&repo)]);
    let v = vdi(7);
    let steps = life(77, 200);
    let img = d.join("img");
    for (i, st) in steps.iter().enumerate() {
        std::fs::write(&img, &st.image).unwrap();
        let t = time(i as u64);
        let mut args = vec![
            "import",
            s(&repo),
            "--vdi",
            &v,
            "--name",
            "data disk",
            "--raw",
            s(&img),
            "--time",
            &t,
        ];
        let bm;
        if let Some(bits) = &st.bitmap {
            bm = write_bitmap(d, "bm", bits, st.bitmap_blocks);
            args.extend(["--bitmap", s(&bm)]);
        }
        ok(&args);
    }
    let ls: serde_json::Value = serde_json::from_str(&ok(&["ls", s(&repo), "--json"])).unwrap();
    let mut paths = Vec::new();
    for set in ls["vms"][0]["disks"][0]["sets"].as_array().unwrap() {
        for p in set["points"].as_array().unwrap() {
            paths.push(p["path"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(paths.len(), steps.len());
    for (i, (path, st)) in paths.iter().zip(&steps).enumerate() {
        let out = d.join(format!("out{i}.raw"));
        ok(&["export", s(&repo), path, s(&out)]);
        assert!(
            std::fs::read(&out).unwrap() == st.image,
            "point {i} ({path}) differs"
        );
        std::fs::remove_file(&out).unwrap();
    }
    // The newest by uuid, and by time, to stdout.
    let o = cbtfs(&["export", s(&repo), &format!("{v}@latest"), "-"]);
    assert!(o.status.success());
    assert!(o.stdout == steps.last().unwrap().image);
    let t = time(100);
    let o = cbtfs(&["export", s(&repo), &format!("{v}@{t}"), "-"]);
    assert!(o.status.success());
    assert!(o.stdout == steps[100].image);
    ok(&["verify", s(&repo)]);
}
