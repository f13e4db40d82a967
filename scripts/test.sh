#!/usr/bin/env bash
# Everything CI checks: system packages, formatting, lints, then every test, then each fuzz
# target briefly on its committed seeds (scripts/fuzz.sh SECONDS runs them longer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
(cd fuzz && cargo fmt --all -- --check)
cargo clippy --all-targets -- -D warnings
cargo test --release --all-targets
# The smoke run: two targets at a time, without AddressSanitizer and without debug info (a
# much shorter build; the long runs of scripts/fuzz.sh keep both).
CARGO_PROFILE_RELEASE_DEBUG=${CARGO_PROFILE_RELEASE_DEBUG:-0} \
  FUZZ_JOBS=${FUZZ_JOBS:-2} FUZZ_SANITIZER=${FUZZ_SANITIZER:-none} \
  scripts/fuzz.sh "${CBTFS_CI_FUZZ_SECONDS:-5}"
