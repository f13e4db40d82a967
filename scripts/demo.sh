#!/usr/bin/env bash
# Set up, build and run the demo: a guest filesystem backed up day by day, then explored.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet
exec ./target/release/cbtfs demo "$@"
