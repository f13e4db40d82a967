//! Repositories on S3: one radosgw cluster per test process (common/rgw.rs starts it once,
//! ~14 s) serves all of these. Run one part with `cargo test --release --test suite s3::cache::`.

mod basics;
mod cache;
mod commands;
mod faults;
mod jobs;
mod lock;
mod mount_ready;
mod writers;
