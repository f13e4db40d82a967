//! Every integration test, in one binary: the suite links once (25 binaries took minutes of
//! CI to link), and shared set-up (the tests' key, one radosgw cluster) is made once per run.
//! Run one file's tests with `cargo test --release --test suite backup::`.

mod common;

mod backup;
mod browse;
mod chains;
mod cli;
mod copy;
mod corruption;
mod crash;
mod crash_states;
mod health;
mod job_deliver;
mod job_run;
mod jobs;
mod keys;
mod mount;
mod nbd;
mod oracle;
mod pool;
mod prune;
mod realhost;
mod s3;
mod sparse_import;
mod volumes;
mod writers;
