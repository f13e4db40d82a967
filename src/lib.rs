//! cbtfs: incremental backups of XenServer / XCP-ng disks with Changed Block Tracking, and their
//! history as a read-only filesystem.
//!
//! Layers, each depending only on those below it:
//! `cli` → `import`/`export`/`verify` → `read` (positional reads of a point) → `chain` (block →
//! owning point) and `repo` (the on-disk format). `naming` turns repository identities into the
//! names users type; `bitmap` decodes CBT bitmaps as the host sends them. `backup` drives the
//! host through `xapi` (management API) and `nbd` (data); `sim` stands in for the host in tests.

pub mod backup;
pub mod bitmap;
pub mod browse;
pub mod chain;
pub mod cli;
pub mod copy;
pub mod demo;
pub mod diff;
pub mod dump;
pub mod export;
pub mod find;
pub mod fs;
pub mod fuse;
pub mod health;
pub mod host;
pub mod import;
pub mod job;
pub mod mount;
pub mod naming;
pub mod nbd;
pub mod overlay;
pub mod prefetch;
pub mod prune;
pub mod read;
pub mod repo;
pub mod restore;
pub mod sim;
pub mod tar;
pub mod timefmt;
pub mod verify;
pub mod volumes;
pub mod xapi;
pub mod xml;

/// CBT tracks 64 KiB blocks (the guide: "Blocks of 64 kB within the VDI are tracked").
pub const BLOCK_SHIFT: u32 = 16;
pub const BLOCK_SIZE: u64 = 1 << BLOCK_SHIFT;

/// Number of blocks covering `size` bytes (the last one may be partial).
pub fn blocks_for(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

/// Whether a buffer is all zeros (written so the compiler vectorizes it).
pub fn is_zero(buf: &[u8]) -> bool {
    let (chunks, tail) = buf.split_at(buf.len() - buf.len() % 64);
    chunks
        .chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Let the process hold one descriptor per stored point in use (sets may hold 1,000 points).
pub fn raise_fd_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to and read from a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}
