#!/usr/bin/env bash
# Backup throughput: `cbtfs backup` against a simulated host, API overhead included, beside
# nbdcopy reading the same blocks from the same qemu-nbd server.
#
# Method (run the same way every time):
#   * src.img: a 4 GiB disk of random data (fully allocated). delta.raw: a sparse 4 GiB file
#     holding 5% of the 64 KiB blocks (random, new random data), nothing else.
#   * `cbtfs sim` runs the host with a VM on src.img. An incremental backup is prepared by the
#     guest writing delta.raw's blocks (`/sim/write_file`), so CBT reports exactly those 5%.
#   * qemu-nbd rows: the host's get_nbd_info names a qemu-nbd (TCP, TLS x509) serving src.img
#     for the base and delta.raw for the increment. nbdcopy reads the same server; on delta.raw
#     it reads only the allocated 5% (block status), i.e. the same blocks cbtfs fetches.
#   * xapi-nbd rows: the host's own xapi-nbd-like server (TLS 1.2, one request at a time per
#     connection, VBD unplug delay 300 ms before data_destroy succeeds) with 1, 4 and 16
#     connections. No peer can read that server with a block list, so these rows stand alone.
#   * cbtfs times are whole `cbtfs backup` runs (login, snapshot, list_changed_blocks,
#     get_nbd_info, fetch, commit with fsync, data_destroy, logout); best of RUNS each. The
#     repository is on /dev/shm; the peer doing the same job is nbdcopy into a file there
#     (`nbdcopy -> file`); `nbdcopy -> null:` (reading only, storing nothing) is the floor.
# Usage: scripts/bench-backup.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/cbtfs-bench-backup}
SIZE_MB=${SIZE_MB:-4096}
RUNS=${RUNS:-3}
cargo build --release --quiet
CBTFS=$PWD/target/release/cbtfs
mkdir -p "$WORK"; cd "$WORK"
[ -f src.img ] || head -c $((SIZE_MB << 20)) /dev/urandom > src.img
blocks=$((SIZE_MB * 16))
if [ ! -f delta.raw ]; then
  python3 - "$blocks" <<'EOF'
import os, random, sys
blocks = int(sys.argv[1]); random.seed(5)
with open('delta.raw', 'wb') as f:
    f.truncate(blocks * 65536)
    for b in sorted(random.sample(range(blocks), blocks // 20)):
        f.seek(b * 65536); f.write(os.urandom(65536))
EOF
fi
cat src.img delta.raw > /dev/null
if [ ! -f pki/ca-cert.pem ]; then
  mkdir -p pki
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=bench CA" -keyout pki/ca-key.pem -out pki/ca-cert.pem 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout pki/server-key.pem -out pki/server.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > pki/ext.cnf
  openssl x509 -req -in pki/server.csr -CA pki/ca-cert.pem -CAkey pki/ca-key.pem -CAcreateserial -days 30 -extfile pki/ext.cnf -out pki/server-cert.pem 2>/dev/null
fi

SHM=/dev/shm/cbtfs-bench-backup
cleanup() {
  pkill -f "qemu-nbd.*$WORK/" 2>/dev/null || true
  [ -n "${SIM_PID:-}" ] && kill "$SIM_PID" 2>/dev/null || true
  rm -rf "$SHM"
}
trap cleanup EXIT
cleanup
mkdir -p "$SHM"
rm -rf sim; "$CBTFS" sim --dir "$WORK/sim" --disk root="$WORK/src.img" > sim.out &
SIM_PID=$!
for _ in $(seq 100); do grep -q Ctrl-C sim.out 2>/dev/null && break; sleep 0.1; done
URL=$(grep -o 'https://[0-9.:]*' sim.out | head -1)
VDI=$(sed -n 's/.*disks: //p' sim.out)
TOKEN=$(grep -o 'x-sim-token: [0-9a-f-]*' sim.out | cut -d' ' -f2)
ctl() { curl -sfk -H "x-sim-token: $TOKEN" -X POST "$URL/sim/$1" "${@:2}" > /dev/null; }

qemu-nbd -r -f raw -t -e 16 -x disk -b 127.0.0.1 -p 10811 \
  --object tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir="$WORK/pki" --tls-creds tls0 "$WORK/src.img" &
qemu-nbd -r -f raw -t -e 16 -x disk -b 127.0.0.1 -p 10812 \
  --object tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir="$WORK/pki" --tls-creds tls0 "$WORK/delta.raw" &
sleep 1
use_qemu() { ctl "nbd?address=127.0.0.1&port=$1&export=disk&subject=localhost" --data-binary @"$WORK/pki/server-cert.pem"; }
use_sim() { ctl "nbd"; }

secs() { local t0 t1; t0=$(date +%s.%N); "$@" > /dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }; t1=$(date +%s.%N); python3 -c "print($t1 - $t0)"; }
backup() { "$CBTFS" backup "$SHM/repo" --host "$URL" --password-file "$WORK/sim/password" --vdi "$VDI" --connections "$1"; }
fresh() { rm -rf "$SHM/repo"; "$CBTFS" init "$SHM/repo" > /dev/null; }
min() { python3 -c "import sys; print(min(float(x) for x in sys.argv[1:]))" "$@"; }
mbps() { python3 -c "print(round($1 / $2 / 1e6))"; }
bytes=$((SIZE_MB << 20)); delta_bytes=$(( (blocks / 20) * 65536 ))

# Base and 5% increment with the given server setup; prints "base_s incr_s".
run_pair() { # connections base_server delta_server
  local bt=() it=()
  for ((r = 0; r < RUNS; r++)); do
    fresh
    $2; bt+=("$(secs backup "$1")")
    ctl "write_file?vdi=$VDI&path=$WORK/delta.raw"
    $3; it+=("$(secs backup "$1")")
  done
  echo "$(min "${bt[@]}") $(min "${it[@]}")"
}

echo "disk ${SIZE_MB} MiB, increment 5% = $((blocks / 20)) blocks; best of $RUNS"
# qemu-nbd rows: each repetition runs cbtfs and nbdcopy back to back, so both see the same
# machine state (page cache, memory in /dev/shm).
BASE_URI="nbds://localhost:10811/disk?tls-certificates=$WORK/pki"
DELTA_URI="nbds://localhost:10812/disk?tls-certificates=$WORK/pki"
cb=(); ci=(); nb=(); ni=(); nb0=(); ni0=()
ncopy() { rm -f "$SHM/copy.raw"; secs nbdcopy --connections=4 "$1" "$2"; }
for ((r = 0; r < RUNS; r++)); do
  fresh
  use_qemu 10811; cb+=("$(secs backup 4)")
  nb+=("$(ncopy "$BASE_URI" "$SHM/copy.raw")"); nb0+=("$(ncopy "$BASE_URI" null:)")
  ctl "write_file?vdi=$VDI&path=$WORK/delta.raw"
  use_qemu 10812; ci+=("$(secs backup 4)")
  ni+=("$(ncopy "$DELTA_URI" "$SHM/copy.raw")"); ni0+=("$(ncopy "$DELTA_URI" null:)")
done
rm -f "$SHM/copy.raw"
b=$(min "${cb[@]}"); i=$(min "${ci[@]}"); nb=$(min "${nb[@]}"); ni=$(min "${ni[@]}"); nb0=$(min "${nb0[@]}"); ni0=$(min "${ni0[@]}")
printf "%-28s %10s %10s %12s %12s\n" server "base s" "base MB/s" "5% incr s" "incr MB/s"
printf "%-28s %10.2f %10s %12.2f %12s\n" "cbtfs backup, qemu-nbd, 4c" "$b" "$(mbps $bytes "$b")" "$i" "$(mbps $delta_bytes "$i")"
printf "%-28s %10.2f %10s %12.2f %12s\n" "nbdcopy -> file, 4c" "$nb" "$(mbps $bytes "$nb")" "$ni" "$(mbps $delta_bytes "$ni")"
printf "%-28s %10.2f %10s %12.2f %12s\n" "nbdcopy -> null:, 4c" "$nb0" "$(mbps $bytes "$nb0")" "$ni0" "$(mbps $delta_bytes "$ni0")"
echo "ratios vs nbdcopy -> file: base throughput cbtfs/nbdcopy = $(python3 -c "print('%.2f' % ($nb / $b))"), increment time cbtfs/nbdcopy = $(python3 -c "print('%.2f' % ($i / $ni))")"
echo "ratios vs nbdcopy -> null: base throughput = $(python3 -c "print('%.2f' % ($nb0 / $b))"), increment time = $(python3 -c "print('%.2f' % ($i / $ni0))")"
for c in 1 4 16; do
  read -r b i < <(run_pair "$c" use_sim use_sim)
  printf "%-28s %10.2f %10s %12.2f %12s\n" "cbtfs backup, xapi-nbd, ${c}c" "$b" "$(mbps $bytes "$b")" "$i" "$(mbps $delta_bytes "$i")"
done
