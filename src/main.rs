fn main() -> std::process::ExitCode {
    bound_heap_retention();
    cbtfs::cli::main()
}

/// glibc raises its mmap threshold every time a block above it is freed (up to 32 MiB); after
/// that, multi-MiB buffers (FUSE and NBD reads, read-ahead chunks, packs) come from its heaps
/// and per-thread arenas, which keep what is freed in them. A mount reading 10 GiB of a 100 GiB
/// point grew to 300 MiB of anonymous memory that way; with the threshold fixed at 1 MiB,
/// 125 MiB (issue 18). Setting it explicitly turns the adjustment off: blocks of 1 MiB and more
/// are mapped on their own and returned to the system when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn bound_heap_retention() {
    // SAFETY: mallopt has no memory-safety preconditions; it runs before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn bound_heap_retention() {}
