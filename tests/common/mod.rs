//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BS: usize = 65536;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cbtfs")
}

/// Run cbtfs with `args`; returns the output (never panics on failure status).
pub fn cbtfs(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("cbtfs binary runs")
}

/// Run and require success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = cbtfs(args);
    assert!(
        o.status.success(),
        "cbtfs {:?} failed: {}\n{}",
        args,
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run and require failure; returns stderr + stdout.
pub fn fails(args: &[&str]) -> (i32, String) {
    let o = cbtfs(args);
    assert!(
        !o.status.success(),
        "cbtfs {:?} unexpectedly succeeded",
        args
    );
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        ),
    )
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce from the seed.
pub struct TestRng(u64);
impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

pub fn vdi(n: u32) -> String {
    format!("{n:08x}-0000-4000-8000-000000000001")
}

/// RFC 3339 time `day` days after 2026-01-01T02:00:00Z plus `sec` seconds.
pub fn time(step: u64) -> String {
    let base = 1_767_232_800u64; // 2026-01-01T02:00:00Z
    let t = base + step * 3600;
    let days = t / 86400;
    let rem = t % 86400;
    // Civil-from-days (Howard Hinnant), enough for test times.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

pub fn write_bitmap(dir: &Path, name: &str, blocks: &[u64], nblocks: u64) -> PathBuf {
    let set: roaring::RoaringBitmap = blocks.iter().map(|&b| b as u32).collect();
    let p = dir.join(name);
    std::fs::write(&p, cbtfs::bitmap::encode_base64(&set, nblocks)).unwrap();
    p
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
