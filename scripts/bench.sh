#!/usr/bin/env bash
# Export throughput of a restore point by chain depth, with peers side by side.
#
# Method (run the same way every time):
#   * One 4 GiB disk, fully written with random data, is the base. Each later point rewrites
#     BLOCKS_PER_POINT random 64 KiB blocks (new random data), DEPTH_MAX points in all.
#   * The same writes build a qcow2 backing chain (qemu-img create -b, qemu-io write -s), so
#     both hold identical data at every depth (checked with cmp on the outputs).
#   * For each depth: the point at that depth is exported by `cbtfs export` to a file in /dev/shm
#     and to /dev/null (stdout); the qcow2 overlay at that depth is converted by
#     `qemu-img convert -O raw` to /dev/shm; `cp` copies the equivalent raw image to /dev/shm.
#   * Caches are warm (every input was read once before timing); each figure is the best of RUNS.
#   Outputs land in tmpfs so the writer's disk is not what is measured.
# Usage: scripts/bench.sh [WORKDIR]   (needs ~14 GiB free in WORKDIR and 4 GiB in /dev/shm)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/cbtfs-bench}
SIZE_MB=${SIZE_MB:-4096}
DEPTH_MAX=${DEPTH_MAX:-1000}
DEPTHS=${DEPTHS:-"1 100 1000"}
BLOCKS_PER_POINT=${BLOCKS_PER_POINT:-16}
RUNS=${RUNS:-3}
OUT=/dev/shm/cbtfs-bench-out.raw

cargo build --release --quiet
CBTFS=$PWD/target/release/cbtfs
mkdir -p "$WORK"
cd "$WORK"
V=b3c4d5e6-0000-4000-8000-00000000beef
blocks=$((SIZE_MB * 16))

if [ ! -f built-$DEPTH_MAX ]; then
  echo "building a chain of $DEPTH_MAX points of a ${SIZE_MB} MiB disk in $WORK ..." >&2
  rm -rf repo qcow raw.img built-*
  mkdir qcow
  head -c $((SIZE_MB << 20)) /dev/urandom > raw.img
  "$CBTFS" init repo >/dev/null
  "$CBTFS" import repo --vdi $V --name bench --raw raw.img --time 2026-01-01T00:00:00Z >/dev/null
  qemu-img convert -O qcow2 raw.img qcow/1.qcow2
  for ((d = 2; d <= DEPTH_MAX; d++)); do
    head -c 65536 /dev/urandom > pattern
    # This point's blocks, its CBT bitmap (written to ./bitmap) and its time.
    read -r t picks < <(python3 -c "
import base64, datetime, random
random.seed($d)
picks = sorted(random.sample(range($blocks), $BLOCKS_PER_POINT))
bits = bytearray(($blocks + 7) // 8)
for b in picks: bits[b // 8] |= 0x80 >> (b % 8)
open('bitmap', 'w').write(base64.b64encode(bits).decode())
t = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(hours=$d)
print(t.strftime('%Y-%m-%dT%H:%M:%SZ'), ' '.join(map(str, picks)))")
    cmds=()
    for b in $picks; do cmds+=(-c "write -q -s pattern $((b * 65536)) 64k"); done
    qemu-io -f raw "${cmds[@]}" raw.img >/dev/null
    # -u and a backing-less open keep building linear: whole 64 KiB clusters need no backing.
    qemu-img create -q -f qcow2 -u -b "$PWD/qcow/$((d - 1)).qcow2" -F qcow2 qcow/$d.qcow2 ${SIZE_MB}M
    qemu-io "${cmds[@]}" "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"qcow/$d.qcow2\"},\"backing\":null}" >/dev/null
    "$CBTFS" import repo --vdi $V --raw raw.img --bitmap bitmap --time "$t" >/dev/null
    [ $((d % 100)) = 0 ] && echo "  $d points" >&2
  done
  touch built-$DEPTH_MAX
fi

# Seconds taken by a command (best of RUNS, after one warm-up run).
best() {
  local best=999999 t0 t1 dt
  "$@" >/dev/null 2>&1
  for ((r = 0; r < RUNS; r++)); do
    rm -f $OUT
    t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N)
    best=$(python3 -c "print(min($best, $t1 - $t0))")
  done
  echo "$best"
}
mbps() { python3 -c "print(round($SIZE_MB * 1048576 / $1 / 1e6))"; }
ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }

points=$("$CBTFS" ls repo --json | python3 -c "import json,sys; j=json.load(sys.stdin); print(' '.join(p['path'] for p in j['vms'][0]['disks'][0]['sets'][0]['points']))")
read -r -a P <<< "$points"

t_cp=$(best cp raw.img $OUT)
printf "%-7s %14s %14s %14s %14s %10s %10s\n" depth "cbtfs->file" "cbtfs->null" "qcow2 convert" "cp raw" "vs cp" "vs qcow2"
for d in $DEPTHS; do
  pt=${P[$((d - 1))]}
  t_file=$(best "$CBTFS" export repo "$pt" $OUT --force)
  t_null=$(best sh -c "'$CBTFS' export repo '$pt' - > /dev/null")
  # qemu-img may not survive a deep chain at all (it recurses per backing file).
  if qemu-img convert -O raw qcow/$d.qcow2 $WORK/check.q 2>/dev/null; then
    t_q=$(best qemu-img convert -O raw qcow/$d.qcow2 $OUT)
    "$CBTFS" export repo "$pt" $OUT --force >/dev/null
    cmp $OUT $WORK/check.q || { echo "depth $d: cbtfs and qcow2 differ" >&2; exit 1; }
  else
    t_q=0
  fi
  rm -f $WORK/check.q
  if [ "$t_q" = 0 ]; then
    printf "%-7s %9s MB/s %9s MB/s %14s %9s MB/s %9sx %10s\n" "$d" \
      "$(mbps $t_file)" "$(mbps $t_null)" "qemu-img crash" "$(mbps $t_cp)" "$(ratio $t_cp $t_file)" "-"
    continue
  fi
  printf "%-7s %9s MB/s %9s MB/s %9s MB/s %9s MB/s %9sx %9sx\n" "$d" \
    "$(mbps $t_file)" "$(mbps $t_null)" "$(mbps $t_q)" "$(mbps $t_cp)" \
    "$(ratio $t_cp $t_file)" "$(ratio $t_q $t_file)"
done
rm -f $OUT
