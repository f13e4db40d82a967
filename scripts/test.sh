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
scripts/fuzz.sh "${CBTFS_CI_FUZZ_SECONDS:-5}"
