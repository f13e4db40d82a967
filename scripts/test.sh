#!/usr/bin/env bash
# Everything CI checks: system packages, formatting, lints, then every test, then each fuzz
# target briefly on its committed seeds (scripts/fuzz.sh SECONDS runs them longer).
set -euo pipefail
cd "$(dirname "$0")/.."
# Each phase says when it starts (seconds since the start): where CI's time goes.
start=$(date +%s)
phase() { echo "== test.sh: $1 (at $(( $(date +%s) - start )) s)"; }
phase "system packages"
bash scripts/setup.sh
phase "format and lints"
cargo fmt --all -- --check
(cd fuzz && cargo fmt --all -- --check)
# In the release profile, as the tests: the build scripts' work (ring's and zstd's C) and the
# proc macros are then built once for both.
cargo clippy --release --all-targets -- -D warnings
phase "tests"
# A hung test must fail with what it hangs on, not run silently into CI's own time limit:
# past CBTFS_TEST_TIMEOUT seconds the run prints what is running and blocked (process tree,
# kernel stacks, FUSE mounts, loop devices), then is killed.
test_timeout=${CBTFS_TEST_TIMEOUT:-1800}
setsid cargo test --release --all-targets &
tests=$!
# The watchdog has a process group of its own so that killing it takes its sleep along (a
# sleep left behind would hold this script's output open).
setsid bash -c '
  sleep "$1"
  echo "test.sh: FAILED: the tests did not finish within $1 s; what was running:" >&2
  bash scripts/hang-report.sh >&2
  kill -KILL -- "-$2" 2>/dev/null' watchdog "$test_timeout" "$tests" &
watchdog=$!
rc=0
wait "$tests" || rc=$?
kill -- "-$watchdog" 2>/dev/null || true
[ "$rc" = 0 ] || exit "$rc"
phase "fuzz smoke run"
# The smoke run: two targets at a time, unoptimised and without AddressSanitizer (a much
# shorter build; the long runs of scripts/fuzz.sh are optimised and keep the sanitizer).
FUZZ_JOBS=${FUZZ_JOBS:-2} FUZZ_SANITIZER=${FUZZ_SANITIZER:-none} FUZZ_DEV=${FUZZ_DEV:-1} \
  scripts/fuzz.sh "${CBTFS_CI_FUZZ_SECONDS:-5}"
phase "done"
