#!/usr/bin/env bash
# Reads through the mount by chain depth, against the raw file and the qcow2 peer over FUSE.
#
# Method (run the same way every time), on the chain scripts/bench.sh builds (run it first):
#   * cbtfs: the point at each depth, read through `cbtfs mount`.
#   * raw: the equivalent raw image read directly (the limit).
#   * peer: the qcow2 overlay at that depth served by `qemu-nbd -r` and mounted by `nbdfuse`
#     (the peer's FUSE path).
#   * seq: `dd bs=1M` of the whole 4 GiB file; cold = after `echo 3 > drop_caches` (cbtfs maps
#     only its indexes, not data, so dropping caches does empty its data path), warm = again at
#     once. rand: `fio` 64 KiB random reads at queue depth 1 for RAND_SECS seconds, cold start.
#   * Also: how long `cbtfs mount` of the whole repository takes to be ready.
# Usage: scripts/bench-mount.sh [WORKDIR]   (root; needs fio, qemu-nbd, nbdfuse)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/cbtfs-bench}
DEPTHS=${DEPTHS:-"1 100 1000"}
RAND_SECS=${RAND_SECS:-10}
cargo build --release --quiet
CBTFS=$PWD/target/release/cbtfs
cd "$WORK"
[ -f repo/cbtfs.repo ] || { echo "run scripts/bench.sh first (it builds the chain)" >&2; exit 1; }
mkdir -p mnt peer
cleanup() {
  umount mnt 2>/dev/null || true
  fusermount3 -u peer 2>/dev/null || umount -l peer 2>/dev/null || true
  pkill -f "qemu-nbd.*$WORK/nbd.sock" 2>/dev/null || true
}
trap cleanup EXIT
cleanup

t0=$(date +%s.%N)
"$CBTFS" mount repo mnt
t1=$(date +%s.%N)
python3 -c "print('mount ready in %.0f ms (%s points)' % (($t1 - $t0) * 1000, '$(ls mnt/no-vm/*/*/ | grep -c 'Z.raw')'))"

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
seq_mbps() { # file -> MB/s of dd
  dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+$/ && $(i+1) ~ /^s,?$/) secs = $i; bytes = $1 } END { printf "%.0f", bytes / secs / 1e6 }'
}
rand_mbps() {
  fio --name=r --readonly --rw=randread --bs=64k --iodepth=1 --ioengine=psync --time_based \
    --runtime="$RAND_SECS" --filename="$1" --output-format=json 2>/dev/null |
    python3 -c "import json,sys; j=json.load(sys.stdin); print('%.0f' % (j['jobs'][0]['read']['bw_bytes'] / 1e6))"
}
measure() { # label file depth; a reader that fails (a crashed peer) scores 0
  local cold warm rand
  drop; cold=$(seq_mbps "$2" || true); warm=$(seq_mbps "$2" || true)
  drop; rand=$(rand_mbps "$2" || true)
  cold=${cold:-0}; warm=${warm:-0}; rand=${rand:-0}
  printf "%-6s %-6s %10s %10s %10s\n" "$3" "$1" "$cold" "$warm" "$rand"
  echo "$cold $warm $rand" > "result.$1.$3"
}
ratio() { python3 -c "print('%.2f' % ($1 / $2 if $2 else 0))"; }

points=$("$CBTFS" ls repo --json | python3 -c "import json,sys; j=json.load(sys.stdin); print(' '.join(p['path'] for p in j['vms'][0]['disks'][0]['sets'][0]['points']))")
read -r -a P <<< "$points"
printf "%-6s %-6s %10s %10s %10s   (MB/s)\n" depth what "seq cold" "seq warm" "rand64K"
for d in $DEPTHS; do
  measure raw raw.img "$d"
  measure cbtfs "mnt/${P[$((d - 1))]}.raw" "$d"
  if qemu-nbd -r -f qcow2 --socket="$WORK/nbd.sock" --persistent --shared=8 --fork "qcow/$d.qcow2" 2>/dev/null &&
     (nbdfuse peer --unix "$WORK/nbd.sock" & sleep 2; [ -f peer/nbd ]); then
    measure peer peer/nbd "$d"
    fusermount3 -u peer 2>/dev/null || umount -l peer
    pkill -f "qemu-nbd.*$WORK/nbd.sock" || true
  else
    printf "%-6s %-6s %10s\n" "$d" peer "qemu-nbd could not open the chain"
    echo "0 0 0" > "result.peer.$d"
  fi
done
echo
printf "%-6s %22s %22s %22s\n" depth "cbtfs/raw cold,warm,rand" "cbtfs/peer cold,warm,rand" "vs depth 1 cold,warm"
for d in $DEPTHS; do
  read -r rc rw rr < result.raw.$d; read -r cc cw cr < result.cbtfs.$d; read -r pc pw pr < result.peer.$d
  read -r c1 w1 _ < result.cbtfs.1
  printf "%-6s %22s %22s %22s\n" "$d" "$(ratio $cc $rc),$(ratio $cw $rw),$(ratio $cr $rr)" \
    "$(ratio $cc $pc),$(ratio $cw $pw),$(ratio $cr $pr)" "$(ratio $cc $c1),$(ratio $cw $w1)"
done
rm -f result.*
