#!/usr/bin/env bash
# Run every cargo-fuzz target for SECONDS each (default 60) on its committed seeds
# (fuzz/seeds/TARGET) plus a working corpus (fuzz/corpus/TARGET, not committed), built with
# overflow checks and debug assertions, memory capped at 512 MiB.
# Prints one line per target: executions, crashes, OOMs, timeouts; exits 1 if any target failed.
# Any finding is saved under fuzz/artifacts/TARGET/: turn it into a regression test.
# FUZZ_TARGETS="a b" limits the run to those targets; FUZZ_JOBS=N runs N targets at once;
# FUZZ_SANITIZER=none builds without AddressSanitizer (CI's short smoke run: it builds faster;
# the default, address, is what long runs use); FUZZ_DEV=1 builds without optimisation (CI's
# smoke run again: its build takes a fraction of an optimised one, and 5 s per target need no
# speed).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
jobs=${FUZZ_JOBS:-1}
sanitizer=${FUZZ_SANITIZER:-address}
build=(--sanitizer "$sanitizer" --debug-assertions)
[ "${FUZZ_DEV:-0}" = 1 ] && build+=(--dev)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=${FUZZ_TARGETS:-$(cd fuzz && cargo +nightly fuzz list)}
# cargo-fuzz builds one target or all of them.
if [ -n "${FUZZ_TARGETS:-}" ]; then
  for t in $targets; do (cd fuzz && cargo +nightly fuzz build "${build[@]}" "$t" >/dev/null); done
else
  (cd fuzz && cargo +nightly fuzz build "${build[@]}" >/dev/null)
fi
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
touch "$logs/start"   # findings of this run are the artifacts newer than this

run_one() {
  local t=$1
  mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t" "fuzz/artifacts/$t"
  (cd fuzz && cargo +nightly fuzz run "${build[@]}" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=512 -timeout=10 -print_final_stats=1 \
      -artifact_prefix="artifacts/$t/") >"$logs/$t.log" 2>&1
}

status=0
running=0
for t in $targets; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then wait -n || true; running=$((running - 1)); fi
done
wait || true

printf '%-22s %12s %8s %6s %9s\n' target executions crashes ooms timeouts
for t in $targets; do
  log=$logs/$t.log
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  found() { find "fuzz/artifacts/$t" -name "$1-*" -newer "$logs/start" | wc -l; }
  crashes=$(found crash)
  ooms=$(found oom)
  timeouts=$(found timeout)
  printf '%-22s %12s %8s %6s %9s\n' "$t" "${execs:-0}" "$crashes" "$ooms" "$timeouts"
  if [ "$crashes$ooms$timeouts" != 000 ] || ! grep -q 'Done [0-9]* runs' "$log"; then
    status=1
    echo "--- $t failed; the end of its log:" >&2
    tail -n 30 "$log" >&2
  fi
done
exit $status
