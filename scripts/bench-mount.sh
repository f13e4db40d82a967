#!/usr/bin/env bash
# Reads through the mount by chain depth, against the raw file and the qcow2 peer over FUSE.
#
# Method (run the same way every time), on the chain scripts/bench.sh builds (run it first):
#   * cbtfs: the point at each depth, read through `cbtfs mount`.
#   * raw: the equivalent raw image read directly (the limit).
#   * peer: the qcow2 overlay at that depth served by `qemu-nbd -r` and mounted by `nbdfuse`
#     (the peer's FUSE path).
#   * seq: `dd bs=1M` of the whole 4 GiB file; cold = after `echo 3 > drop_caches` (cbtfs maps
#     only its indexes, not data, so dropping caches does empty its data path); re-read = again
#     at once (the kernel moves every cached page to its active list then); warm = best of three
#     more passes (steady state). rand: `fio` 64 KiB random reads at queue depth 1 for RAND_SECS
#     seconds, cold start.
#   * This VM's disk drifts by 2x between minutes, so cold reads are measured again at the end
#     in COLD_ROUNDS rounds, each reading the raw file, the first and the deepest point in turn:
#     medians of the per-round ratios. The two points are also read on a second mount without
#     the daemon's read-ahead (-o prefetch=0), to show what it gains.
#   * Also: how long `cbtfs mount` of the whole repository takes to be ready, and the warm read
#     of the raw image copied to tmpfs, whose page cache, like any FUSE file's on this kernel, is
#     made of 4 KiB pages, where ext4 caches the raw file in large folios.
# Usage: scripts/bench-mount.sh [WORKDIR]   (root; needs fio, qemu-nbd, nbdfuse)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/cbtfs-bench}
DEPTHS=${DEPTHS:-"1 100 1000"}
RAND_SECS=${RAND_SECS:-10}
COLD_ROUNDS=${COLD_ROUNDS:-5}
cargo build --release --quiet
CBTFS=$PWD/target/release/cbtfs
cd "$WORK"
[ -f repo/cbtfs.repo ] || { echo "run scripts/bench.sh first (it builds the chain)" >&2; exit 1; }
mkdir -p mnt peer
cleanup() {
  umount mnt 2>/dev/null || true
  umount mnt0 2>/dev/null || true
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
best_warm() { # file -> best MB/s of three passes
  local best=0 x
  for _ in 1 2 3; do x=$(seq_mbps "$1" || true); best=$(python3 -c "print(max($best, ${x:-0}))"); done
  echo "$best"
}
measure() { # label file depth; a reader that fails (a crashed peer) scores 0
  local cold reread warm rand
  drop; cold=$(seq_mbps "$2" || true); reread=$(seq_mbps "$2" || true); warm=$(best_warm "$2")
  drop; rand=$(rand_mbps "$2" || true)
  cold=${cold:-0}; reread=${reread:-0}; warm=${warm:-0}; rand=${rand:-0}
  printf "%-6s %-6s %10s %10s %10s %10s\n" "$3" "$1" "$cold" "$reread" "$warm" "$rand"
  echo "$cold $reread $warm $rand" > "result.$1.$3"
}
ratio() { python3 -c "print('%.2f' % ($1 / $2 if $2 else 0))"; }

points=$("$CBTFS" ls repo --json | python3 -c "import json,sys; j=json.load(sys.stdin); print(' '.join(p['path'] for p in j['vms'][0]['disks'][0]['sets'][0]['points']))")
read -r -a P <<< "$points"
SHM_RAW=/dev/shm/cbtfs-bench-raw.img
cp raw.img $SHM_RAW
echo "raw image on tmpfs (4 KiB page cache): warm $(best_warm $SHM_RAW) MB/s"
rm -f $SHM_RAW
printf "%-6s %-6s %10s %10s %10s %10s   (MB/s)\n" depth what "seq cold" "re-read" "seq warm" "rand64K"
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
    echo "0 0 0 0" > "result.peer.$d"
  fi
done
echo
printf "%-6s %28s %28s %22s\n" depth "cbtfs/raw cold,reread,warm,rand" "cbtfs/peer cold,reread,warm,rand" "vs depth 1 cold,warm"
for d in $DEPTHS; do
  read -r rc rre rw rr < result.raw.$d; read -r cc cre cw cr < result.cbtfs.$d; read -r pc pre pw pr < result.peer.$d
  read -r c1 _ w1 _ < result.cbtfs.1
  printf "%-6s %28s %28s %22s\n" "$d" "$(ratio $cc $rc),$(ratio $cre $rre),$(ratio $cw $rw),$(ratio $cr $rr)" \
    "$(ratio $cc $pc),$(ratio $cre $pre),$(ratio $cw $pw),$(ratio $cr $pr)" "$(ratio $cc $c1),$(ratio $cw $w1)"
done
rm -f result.*

echo
last=$(echo $DEPTHS | awk '{print $NF}')
first=$(echo $DEPTHS | awk '{print $1}')
echo "cold, interleaved ($COLD_ROUNDS rounds): raw, depth $first, depth $last; then the same two points on a mount without read-ahead (-o prefetch=0) (MB/s)"
mkdir -p mnt0
"$CBTFS" mount repo mnt0 -o prefetch=0
rounds=()
for ((r = 1; r <= COLD_ROUNDS; r++)); do
  drop; a=$(seq_mbps raw.img); drop; b=$(seq_mbps "mnt/${P[$((first - 1))]}.raw"); drop; c=$(seq_mbps "mnt/${P[$((last - 1))]}.raw")
  drop; b0=$(seq_mbps "mnt0/${P[$((first - 1))]}.raw"); drop; c0=$(seq_mbps "mnt0/${P[$((last - 1))]}.raw")
  echo "  round $r: $a $b $c | $b0 $c0"
  rounds+=("$a,$b,$c,$b0,$c0")
done
umount mnt0
python3 -c "
import statistics as st
r = [tuple(map(float, x.split(','))) for x in '${rounds[*]}'.split()]
print('median: depth $first/raw %.2f, depth $last/raw %.2f, depth $last/depth $first %.2f' % (
    st.median(b / a for a, b, c, _, _ in r), st.median(c / a for a, b, c, _, _ in r), st.median(c / b for a, b, c, _, _ in r)))
print('without read-ahead: depth $first/raw %.2f, depth $last/depth $first %.2f; read-ahead gains depth $first %.2fx, depth $last %.2fx' % (
    st.median(b0 / a for a, _, _, b0, _ in r), st.median(c0 / b0 for _, _, _, b0, c0 in r),
    st.median(b / b0 for _, b, _, b0, _ in r), st.median(c / c0 for _, _, c, _, c0 in r)))"
