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
# The smoke run: two targets at a time, unoptimised and without AddressSanitizer (a much
# shorter build; the long runs of scripts/fuzz.sh are optimised and keep the sanitizer).
FUZZ_JOBS=${FUZZ_JOBS:-2} FUZZ_SANITIZER=${FUZZ_SANITIZER:-none} FUZZ_DEV=${FUZZ_DEV:-1} \
  scripts/fuzz.sh "${CBTFS_CI_FUZZ_SECONDS:-5}"
