#!/usr/bin/env bash
# NBD fetch throughput: cbtfs import --nbd against nbdcopy, same server, same data.
#
# Method (run the same way every time):
#   * Source: a 4 GiB raw image of random data (fully allocated), served by one qemu-nbd
#     (-r, -e 16) over a Unix socket, plain and with TLS (x509, a self-made CA).
#   * Full read: `cbtfs import --nbd` of the whole disk as a base into a repository on /dev/shm,
#     against `nbdcopy SOURCE /dev/shm/copy.raw`, both with C connections (4 and 8).
#   * Scattered read: 5% of the 64 KiB blocks at random, as an incremental point (its base is
#     imported first, untimed). nbdcopy has no way to read a block list, so that row has no peer.
#   * Page cache warm on the server side (the image was read once); cbtfs and nbdcopy runs
#     interleaved, each figure the best of RUNS (default 5); the ratio of each round (cbtfs run,
#     then nbdcopy run) and their median are printed too, since this VM's speed drifts.
# Usage: scripts/bench-nbd.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/cbtfs-bench-nbd}
SIZE_MB=${SIZE_MB:-4096}
RUNS=${RUNS:-5}
cargo build --release --quiet
CBTFS=$PWD/target/release/cbtfs
mkdir -p "$WORK"; cd "$WORK"
[ -f src.img ] || head -c $((SIZE_MB << 20)) /dev/urandom > src.img
cat src.img > /dev/null
V=c0ffee00-0000-4000-8000-000000000001
blocks=$((SIZE_MB * 16))

if [ ! -f pki/ca-cert.pem ]; then
  mkdir -p pki
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=bench CA" -keyout pki/ca-key.pem -out pki/ca-cert.pem 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout pki/server-key.pem -out pki/server.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > pki/ext.cnf
  openssl x509 -req -in pki/server.csr -CA pki/ca-cert.pem -CAkey pki/ca-key.pem -CAcreateserial -days 30 -extfile pki/ext.cnf -out pki/server-cert.pem 2>/dev/null
fi
python3 -c "
import base64, random
random.seed(5)
bits = bytearray(($blocks + 7) // 8)
for b in random.sample(range($blocks), $blocks // 20): bits[b // 8] |= 0x80 >> (b % 8)
open('bitmap5', 'w').write(base64.b64encode(bits).decode())"

cleanup() { pkill -f "qemu-nbd.*$WORK/" 2>/dev/null || true; rm -rf /dev/shm/cbtfs-bench-nbd; }
trap cleanup EXIT
cleanup
qemu-nbd -r -f raw -t -e 16 -x disk -k "$WORK/plain.sock" src.img &
qemu-nbd -r -f raw -t -e 16 -x disk -k "$WORK/tls.sock" \
  --object tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir="$WORK/pki" --tls-creds tls0 src.img &
sleep 1
SHM=/dev/shm/cbtfs-bench-nbd; mkdir -p $SHM

once() { # command... -> seconds of one run (fresh repository and copy target)
  local t0 t1
  rm -rf $SHM/repo $SHM/copy.raw; "$CBTFS" init $SHM/repo >/dev/null
  t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N)
  python3 -c "print($t1 - $t0)"
}
best() { # command... -> best seconds over RUNS
  local best=999999 t0 t1
  for ((r = 0; r < RUNS; r++)); do
    rm -rf $SHM/repo $SHM/copy.raw; "$CBTFS" init $SHM/repo >/dev/null
    [ -n "${PRE:-}" ] && eval "$PRE" >/dev/null
    t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N)
    best=$(python3 -c "print(min($best, $t1 - $t0))")
  done
  echo "$best"
}
mbps() { python3 -c "print(round($1 / $2 / 1e6))"; }
bytes=$((SIZE_MB << 20))

printf "%-6s %-4s %12s %12s %8s\n" mode conn "cbtfs MB/s" "nbdcopy MB/s" ratio
for mode in ${MODES:-plain tls}; do
  if [ $mode = plain ]; then
    uri="nbd+unix:///disk?socket=$WORK/plain.sock"; tlsargs=(); curi="$uri"
  else
    uri="nbds+unix:///disk?socket=$WORK/tls.sock"; tlsargs=(--ca-cert "$WORK/pki/ca-cert.pem" --tls-subject localhost)
    curi="nbds+unix:///disk?socket=$WORK/tls.sock&tls-certificates=$WORK/pki"
  fi
  for c in 4 8; do
    # Interleaved, best of RUNS each: this machine's speed drifts between runs.
    t_c=999999; t_n=999999; ratios=()
    for ((r = 0; r < RUNS; r++)); do
      x=$(once "$CBTFS" import $SHM/repo --vdi $V --nbd "$uri" "${tlsargs[@]}" --connections $c --time 2026-01-01T00:00:00Z)
      t_c=$(python3 -c "print(min($t_c, $x))")
      y=$(once nbdcopy --connections=$c "$curi" $SHM/copy.raw)
      t_n=$(python3 -c "print(min($t_n, $y))")
      ratios+=("$(python3 -c "print('%.2f' % ($y / $x))")")
    done
    printf "%-6s %-4s %12s %12s %8s   (per round: %s; median %s)\n" $mode $c "$(mbps $bytes $t_c)" "$(mbps $bytes $t_n)" \
      "$(python3 -c "print('%.2f' % ($t_n / $t_c))")" "${ratios[*]}" \
      "$(python3 -c "import statistics; print('%.2f' % statistics.median([$(IFS=,; echo "${ratios[*]}")]))")"
  done
  PRE="'$CBTFS' import $SHM/repo --vdi $V --raw $WORK/src.img --time 2026-01-01T00:00:00Z"
  t_s=$(PRE="$PRE" best "$CBTFS" import $SHM/repo --vdi $V --nbd "$uri" "${tlsargs[@]}" --connections 8 --bitmap bitmap5 --time 2026-01-02T00:00:00Z)
  printf "%-6s %-4s %12s %12s %8s   (5%% scattered blocks: %s s)\n" $mode 8 "$(mbps $((bytes / 20)) $t_s)" "-" "-" "$(python3 -c "print('%.2f' % $t_s)")"
done
