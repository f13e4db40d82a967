//! Every test of repositories on S3, in one binary: one radosgw cluster per process
//! (tests/common/rgw.rs starts it once, ~14 s) serves them all, and the suite links once.
//! Run one part with `cargo test --release --test s3 cache::`.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/counting_proxy.rs"]
mod counting_proxy;

mod basics;
mod cache;
mod commands;
mod faults;
mod lock;
mod writers;
