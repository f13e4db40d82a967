#!/usr/bin/env bash
# Repositories on S3 (issue 19): the issue's figures, a repository in Ceph RGW beside the same
# work on a local format-2 repository, in one table.
#
# Method (run the same way every time; one RGW started by scripts/rgw.sh for the whole run, on
# this machine's loopback, its OSD on memstore, i.e. in RAM; every repository encrypted with a
# key file; local repositories on /dev/shm, also in RAM, so both sides store in memory and the
# comparison is of cbtfs's two stores, not of two kinds of storage):
#   1. full backup: a SIZE_MB disk of random data (incompressible) served by qemu-nbd (TLS,
#      4 connections) to the simulated host (`cbtfs sim`), as scripts/bench-format2.sh row 4
#      does; whole `cbtfs backup` runs into a fresh repository: s3://BUCKET/PREFIX in RGW, or a
#      directory on /dev/shm. ROUNDS rounds, the order alternating (interleaved); the median of
#      the per-round throughput ratios RGW / local. Peak RSS by /usr/bin/time -f %M. Also timed
#      each round: `aws s3 cp` of the image itself into RGW (what the engine takes in here from
#      its standard client), stated beside as the ratio cbtfs / aws throughput.
#   2. cold sequential read: `dd bs=1M` of row 1's point through `cbtfs mount` (a daemon), RGW
#      vs local, after `echo 3 > drop_caches` and with an empty cbtfs cache (CBTFS_CACHE_DIR a
#      fresh empty directory for every mount: the chunk index and any object cache start cold).
#      ROUNDS rounds, alternating; median of the per-round ratios. RSS: the mount daemon's
#      VmHWM after its read.
#   3. mount ready: a chain of POINTS points of a 64 MiB disk (a base with 16 MiB of random
#      data, then one new random block per point), built locally with `import --bitmap` and
#      copied into RGW with `cbtfs copy` (not timed). Timed as scripts/bench-format2.sh does:
#      from `cbtfs mount` starting to the first `ls` of the mountpoint answering; empty cache (a
#      fresh CBTFS_CACHE_DIR, median of 3) and warm cache (a copy of that directory after those
#      mounts, one unmeasured mount, median of 5); a mount slower than 5 s is measured once
#      each. Page cache warm in both cases. Also stated: the time until `find` has listed all
#      POINTS points (a stat of each; LIST_TIMEOUT s at most, default 120).
#   4. requests: counted from radosgw's own access log (its `beast:` lines in rgw.log, one per
#      request, with method and path): the PUTs of row 1's RGW backups per 8 MiB stored (the
#      sum of the objects' sizes under the prefix, from `aws s3 ls --recursive --summarize`),
#      and the GETs of row 2's RGW reads per GiB read.
#   5. copy: a local repository holding a 1 GiB disk (64 MiB of random data) as its base,
#      copied into RGW first (not timed), then COPY_POINTS incremental points each changing
#      COPY_MB of random blocks (new random data) imported locally. Timed: `cbtfs copy` of
#      those points local -> RGW, vs `aws s3 cp --recursive` of the same changed bytes (one
#      file of COPY_MB per point, the blocks concatenated) into the same RGW. ROUNDS rounds
#      (a destination repository per round, each with the base copied beforehand), alternating;
#      median of the per-round ratios cbtfs / aws.
# Results: the table on standard output and in WORKDIR/results.txt; progress on standard error.
# Usage: scripts/bench-s3.sh [WORKDIR]   (root; default /var/tmp/cbtfs-bench-s3; ~2.5 x SIZE_MB
#   free there, and RAM for RGW's memstore (RGW_MEMSTORE_MB, default 2 x SIZE_MB + 4 GiB, used
#   as filled) plus SIZE_MB in /dev/shm; installs qemu-utils if missing; aws is the AWS CLI)
#   QUICK=1: SIZE_MB=512, ROUNDS=1, POINTS=100, COPY_POINTS=100, COPY_MB=2 (~6 min, a smoke run;
#   the copy row keeps the issue's 100 points, smaller ones)
#   Default: SIZE_MB=4096, ROUNDS=2, POINTS=1000, COPY_POINTS=100, COPY_MB=8 (< 15 min)
#   Also settable: SIZE_MB, ROUNDS, POINTS, COPY_POINTS, COPY_MB, LIST_TIMEOUT, ONLY (rows, e.g. ONLY="1 5";
#   2 and 4 need 1), CBTFS (a prebuilt binary instead of building this tree), AWS (the CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
WORK=${1:-/var/tmp/cbtfs-bench-s3}
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  SIZE_MB=${SIZE_MB:-512}; ROUNDS=${ROUNDS:-1}; POINTS=${POINTS:-100}
  COPY_POINTS=${COPY_POINTS:-100}; COPY_MB=${COPY_MB:-2}
else
  SIZE_MB=${SIZE_MB:-4096}; ROUNDS=${ROUNDS:-2}; POINTS=${POINTS:-1000}
  COPY_POINTS=${COPY_POINTS:-100}; COPY_MB=${COPY_MB:-8}
fi
ONLY=${ONLY:-1 2 3 5}   # row 4 comes with rows 1 and 2
AWS=${AWS:-$(command -v aws || echo /root/.pyenv/shims/aws)}
export RGW_MEMSTORE_MB=${RGW_MEMSTORE_MB:-$((2 * SIZE_MB + 4096))}
[ "$(id -u)" = 0 ] || { echo "run as root (drop_caches, mount)" >&2; exit 1; }
[ -x "$AWS" ] || command -v "$AWS" > /dev/null || { echo "the AWS CLI ($AWS) is missing: pip install awscli, or AWS=/path/to/aws" >&2; exit 1; }

need() { # command package
  command -v "$1" > /dev/null || { echo "installing $2 ..." >&2; apt-get install -y -q "$2" > /dev/null; }
}
need qemu-nbd qemu-utils; need openssl openssl; need curl curl; need /usr/bin/time time

if [ -n "${CBTFS:-}" ]; then BIN=$(realpath "$CBTFS"); else cargo build --release --quiet; BIN=$SRC/target/release/cbtfs; fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
cd "$WORK"
SHM=/dev/shm/cbtfs-bench-s3
MNT=$WORK/mnt
RGWDIR=$WORK/rgw
RESULTS=$WORK/results.txt
: > "$RESULTS"
say() { echo "$*" | tee -a "$RESULTS"; }
log() { echo "[$(date +%T)] $*" >&2; }
py() { python3 -c "$1"; }

export CBTFS_KEY_FILE=$WORK/key          # made by the first `cbtfs init`
[ -f "$CBTFS_KEY_FILE" ] || "$BIN" init "$WORK/keyrepo" --key-file "$CBTFS_KEY_FILE" > /dev/null
rm -rf "$WORK/keyrepo"

SIM_PID=; QEMU_PID=
cleanup() {
  mountpoint -q "$MNT" 2>/dev/null && { umount "$MNT" 2>/dev/null || umount -l "$MNT"; }
  [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null || true
  [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null || true
  "$SRC/scripts/rgw.sh" stop "$RGWDIR" > /dev/null 2>&1 || true
  rm -rf "$SHM"
}
trap cleanup EXIT
cleanup
mkdir -p "$SHM" "$MNT"

log "starting radosgw (memstore $RGW_MEMSTORE_MB MiB) ..."
"$SRC/scripts/rgw.sh" start "$RGWDIR" > /dev/null
set -a; . "$RGWDIR/env"; set +a      # CBTFS_S3_ENDPOINT, AWS_ACCESS_KEY_ID, ... for cbtfs and aws
export AWS_REQUEST_CHECKSUM_CALCULATION=when_required AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
export CBTFS_LOG=error                   # no warning about the http:// loopback endpoint per run
RGWLOG=$RGWDIR/log/rgw.log
s3() { "$AWS" --endpoint-url "$CBTFS_S3_ENDPOINT" s3 "$@"; }
mkbucket() { s3 mb "s3://$1" > /dev/null; }
# Requests radosgw served since byte offset $2 of its log, with method $1 on bucket $3.
logpos() { stat -c %s "$RGWLOG"; }
requests() {
  tail -c +"$(($2 + 1))" "$RGWLOG" | grep -c "beast: .*\"$1 /$3[/?]" || true
}
# Bytes stored under s3://$1 (every object).
s3bytes() { s3 ls --recursive --summarize "s3://$1" | awk '/Total Size:/ { print $3 }'; }
# Delete everything under s3://$1 and let RGW free it now (its gc would wait hours).
s3purge() {
  s3 rm --recursive --quiet "s3://$1" > /dev/null
  CEPH_CONF=$RGWDIR/ceph.conf radosgw-admin gc process --include-all > /dev/null 2>&1 || true
}

# Runs a command (stdout to $WORK/last.out, stderr to $WORK/last.err); prints "seconds rss_kib".
timed() {
  local t0 t1
  t0=$(date +%s.%N)
  if ! /usr/bin/time -f %M -o "$WORK/last.rss" "$@" > "$WORK/last.out" 2> "$WORK/last.err"; then
    echo "failed: $*" >&2; tail -5 "$WORK/last.err" >&2; return 1
  fi
  t1=$(date +%s.%N)
  echo "$(py "print('%.3f' % ($t1 - $t0))") $(tail -1 "$WORK/last.rss")"
}
median() { py "import statistics; print('%.6g' % statistics.median([$(IFS=,; echo "$*")]))"; }
ratio() { py "print('%.3f' % ($1 / $2))"; }
mib() { py "print('%.1f' % ($1 / 1048576))"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
seq_mbps() { # file -> MB/s of a dd bs=1M read
  dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+$/ && $(i+1) ~ /^s,?$/) secs = $i; bytes = $1 } END { printf "%.0f", bytes / secs / 1e6 }'
}
mount_pid() { # the daemon serving mountpoint $1 (its argv is the `cbtfs mount` command's)
  python3 - "$1" <<'EOF'
import os, sys
for p in os.listdir('/proc'):
    try: a = open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace').split('\0')
    except OSError: continue
    if len(a) > 2 and os.path.basename(a[0]) == 'cbtfs' and a[1] == 'mount' and sys.argv[1] in a:
        print(p); break
EOF
}
ROWS=()
row() { ROWS+=("$1|$2|$3|$4|$5|$6|$7"); } # what cbtfs reference ratio target result rss
verdict() { py "print('pass' if $1 else 'FAIL')"; }
on() { [[ " $ONLY " == *" $1 "* ]]; }
bytes=$((SIZE_MB << 20))
log "SIZE_MB=$SIZE_MB ROUNDS=$ROUNDS POINTS=$POINTS COPY_POINTS=$COPY_POINTS COPY_MB=$COPY_MB QUICK=$QUICK"

# Writes a CBT bitmap (base64, most significant bit first, XAPI's layout) in python code.
PYBITMAP='
import base64
def bitmap(path, picks, nblocks):
    bits = bytearray((nblocks + 7) // 8)
    for b in picks: bits[b // 8] |= 0x80 >> (b % 8)
    open(path, "w").write(base64.b64encode(bits).decode())
'

if [ ! -f pki/ca-cert.pem ]; then
  mkdir -p pki
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=bench CA" -keyout pki/ca-key.pem -out pki/ca-cert.pem 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout pki/server-key.pem -out pki/server.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > pki/ext.cnf
  openssl x509 -req -in pki/server.csr -CA pki/ca-cert.pem -CAkey pki/ca-key.pem -CAcreateserial -days 30 -extfile pki/ext.cnf -out pki/server-cert.pem 2>/dev/null
fi
# A simulated host with one VM whose disk is $1, read through qemu-nbd (TLS) on port 10822.
start_host() {
  stop_host
  rm -rf "$WORK/sim"; "$BIN" sim --dir "$WORK/sim" --disk root="$1" > "$WORK/sim.out" &
  SIM_PID=$!
  for _ in $(seq 100); do grep -q Ctrl-C "$WORK/sim.out" 2>/dev/null && break; sleep 0.1; done
  URL=$(grep -o 'https://[0-9.:]*' "$WORK/sim.out" | head -1)
  VDI=$(sed -n 's/.*disks: //p' "$WORK/sim.out")
  TOKEN=$(grep -o 'x-sim-token: [0-9a-f-]*' "$WORK/sim.out" | cut -d' ' -f2)
  qemu-nbd -r -f raw -t -e 16 -x disk -b 127.0.0.1 -p 10822 \
    --object tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir="$WORK/pki" --tls-creds tls0 "$1" &
  QEMU_PID=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/10822) 2>/dev/null && break; sleep 0.1; done
  curl -sfk -H "x-sim-token: $TOKEN" -X POST "$URL/sim/nbd?address=127.0.0.1&port=10822&export=disk&subject=localhost" \
    --data-binary @"$WORK/pki/server-cert.pem" > /dev/null
  BK=(--host "$URL" --password-file "$WORK/sim/password" --vdi "$VDI" --connections 4)
}
stop_host() {
  [ -n "$QEMU_PID" ] && { kill "$QEMU_PID" 2>/dev/null || true; wait "$QEMU_PID" 2>/dev/null || true; }
  [ -n "$SIM_PID" ] && { kill "$SIM_PID" 2>/dev/null || true; wait "$SIM_PID" 2>/dev/null || true; }
  QEMU_PID=; SIM_PID=
}

############ 1 (and 4's PUTs). full backup, RGW vs local
B1=bench-backup
bench_1() {
log "row 1: full backups of ${SIZE_MB} MiB random, $ROUNDS rounds ..."
SRCIMG=$WORK/src-$SIZE_MB.img
[ -f "$SRCIMG" ] || head -c "$bytes" /dev/urandom > "$SRCIMG"
start_host "$SRCIMG"
cat "$SRCIMG" > /dev/null
mkbucket "$B1"
tl=(); ts=(); q=(); rssl=(); rsss=(); puts=(); stored=()
one_local() {
  rm -rf "$SHM/local"; "$BIN" init "$SHM/local" > /dev/null
  out=$(timed "$BIN" backup "$SHM/local" "${BK[@]}"); tl+=("${out% *}"); rssl+=("${out#* }")
}
one_s3() {
  local r=s3://$B1/r$1 at
  "$BIN" init "$r" > /dev/null
  at=$(logpos)
  out=$(timed "$BIN" backup "$r" "${BK[@]}"); ts+=("${out% *}"); rsss+=("${out#* }")
  sleep 1   # radosgw writes its log line once the response is sent
  puts+=("$(requests PUT "$at" "$B1")"); stored+=("$(s3bytes "$B1/r$1/")")
}
# The engine's own ingest of the same bytes through the standard client (multipart, 10 parts
# at once): what RGW on this machine takes in, whoever sends it.
ta1=()
one_aws() {
  out=$(timed "$AWS" --endpoint-url "$CBTFS_S3_ENDPOINT" s3 cp --quiet "$SRCIMG" "s3://$B1/aws$1.img"); ta1+=("${out% *}")
  s3purge "$B1/aws$1.img"
}
for ((r = 1; r <= ROUNDS; r++)); do
  [ "$r" -gt 1 ] && s3purge "$B1/r$((r - 1))/"
  if [ $((r % 2)) = 1 ]; then one_local; one_s3 "$r"; one_aws "$r"; else one_aws "$r"; one_s3 "$r"; one_local; fi
  q+=("$(ratio "${tl[-1]}" "${ts[-1]}")")
  log "  round $r: local ${tl[-1]} s, RGW ${ts[-1]} s (${puts[-1]} PUTs for $(mib "${stored[-1]}") MiB stored), aws s3 cp of the image ${ta1[-1]} s"
done
stop_host
S3REPO=s3://$B1/r$ROUNDS       # rows 2 and 4 read these
LOCALREPO=$SHM/local
thr() { py "print(round($bytes / $1 / 1e6))"; }
mq=$(median "${q[@]}")
say "1. full backup of ${SIZE_MB} MiB random data over NBD (qemu-nbd TLS, 4 connections), $ROUNDS rounds interleaved:"
say "   local (/dev/shm): ${tl[*]} s; RGW: ${ts[*]} s; per-round throughput ratios RGW / local: ${q[*]}"
say "   peak RSS KiB: local ${rssl[*]}; RGW ${rsss[*]}"
row "full backup MB/s, RGW vs local" "$(thr "$(median "${ts[@]}")")" "$(thr "$(median "${tl[@]}")") (local)" "$mq" ">= 0.70" "$(verdict "$mq >= 0.7")" "$(( $(median "${rsss[@]}" | cut -d. -f1) / 1024 ))"
say "   aws s3 cp of the same image into RGW (the engine's ingest here): ${ta1[*]} s"
row "full backup MB/s, RGW vs aws s3 cp of image" "$(thr "$(median "${ts[@]}")")" "$(thr "$(median "${ta1[@]}")") (aws cp)" "$(ratio "$(median "${ta1[@]}")" "$(median "${ts[@]}")")" "-" "-" "-"
ppm=()
for ((i = 0; i < ${#puts[@]}; i++)); do ppm+=("$(py "print('%.3f' % (${puts[i]} / (${stored[i]} / 8388608)))")"); done
say "4. PUTs per backup: ${puts[*]}; stored bytes: ${stored[*]}; PUTs per 8 MiB stored: ${ppm[*]}"
mp=$(median "${ppm[@]}")
row "PUTs per 8 MiB stored (backup)" "$mp" "-" "-" "<= 1.00" "$(verdict "$mp <= 1")" "-"
}

############ 2 (and 4's GETs). cold sequential read through the mount, RGW vs local
bench_2() {
log "row 2: cold sequential reads through the mount, $ROUNDS rounds ..."
read_one() { # repo -> "MB/s VmHWM_KiB"
  local pt mbps mpid hwm
  rm -rf "$WORK/rcache"; mkdir -p "$WORK/rcache"
  CBTFS_CACHE_DIR=$WORK/rcache "$BIN" mount "$1" "$MNT"
  pt=$(find "$MNT" -type f -name '*Z.raw' -print -quit)
  drop
  mbps=$(seq_mbps "$pt")
  mpid=$(mount_pid "$MNT"); hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$mpid/status")
  umount "$MNT"
  echo "$mbps $hwm"
}
rl=(); rs=(); q=(); hl=(); hs=(); gets=()
for ((r = 1; r <= ROUNDS; r++)); do
  for side in $( [ $((r % 2)) = 1 ] && echo "l s" || echo "s l"); do
    if [ "$side" = l ]; then
      out=$(read_one "$LOCALREPO"); rl+=("${out% *}"); hl+=("${out#* }")
    else
      at=$(logpos)
      out=$(read_one "$S3REPO"); rs+=("${out% *}"); hs+=("${out#* }")
      sleep 1
      gets+=("$(requests GET "$at" "$B1")")
    fi
  done
  q+=("$(ratio "${rs[-1]}" "${rl[-1]}")")
  log "  round $r: local ${rl[-1]} MB/s, RGW ${rs[-1]} MB/s (${gets[-1]} GETs)"
done
mq=$(median "${q[@]}")
say "2. cold sequential read of the ${SIZE_MB} MiB point (dd bs=1M, drop_caches, empty cache), $ROUNDS rounds interleaved:"
say "   MB/s local ${rl[*]}; RGW ${rs[*]}; per-round ratios RGW / local ${q[*]}; mount VmHWM KiB local ${hl[*]}, RGW ${hs[*]}"
row "cold seq read MB/s, RGW vs local" "$(median "${rs[@]}")" "$(median "${rl[@]}") (local)" "$mq" ">= 0.50" "$(verdict "$mq >= 0.5")" "$(( $(median "${hs[@]}" | cut -d. -f1) / 1024 ))"
gpg=()
for g in "${gets[@]}"; do gpg+=("$(py "print('%.1f' % ($g / ($bytes / 1073741824)))")"); done
say "4. GETs per read (mount included): ${gets[*]}; GETs per GiB read: ${gpg[*]}"
row "GETs per GiB read (mount, cold)" "$(median "${gpg[@]}")" "-" "-" "stated" "-" "-"
}

############ 3. mount ready with POINTS points, empty and warm cache
bench_3() {
log "row 3: a chain of $POINTS points, copied into RGW ..."
local C=$WORK/chain-$POINTS V=e3e3e3e3-0000-4000-8000-000000000001 nb=1024
if [ ! -f "$C/done" ]; then
  rm -rf "$C"; mkdir -p "$C"
  python3 - "$C" "$nb" "$POINTS" <<EOF
import datetime, os, random, sys
$PYBITMAP
d, blocks, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]); random.seed(3)
with open(f'{d}/base.img', 'wb') as f:
    f.truncate(blocks * 65536); f.write(os.urandom(16 << 20))
t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
with open(f'{d}/inc.raw', 'wb') as f, open(f'{d}/times', 'w') as times:
    f.truncate(blocks * 65536)
    for i in range(2, n + 1):
        b = random.randrange(blocks)
        f.seek(b * 65536); f.write(os.urandom(65536))
        bitmap(f'{d}/{i}.b64', [b], blocks)
        times.write((t0 + datetime.timedelta(minutes=i)).strftime('%Y-%m-%dT%H:%M:%SZ') + '\n')
EOF
  touch "$C/done"
fi
# inc.raw holds every point's block (each written once, the last write of a block wins);
# a point reads only the block of its bitmap, so each increment is one new random block.
rm -rf "$SHM/chain"; "$BIN" init "$SHM/chain" > /dev/null
"$BIN" import "$SHM/chain" --vdi $V --name chain --raw "$C/base.img" --time 2026-01-01T00:00:00Z > /dev/null
local i=2 t0 t1
t0=$(date +%s.%N)
while read -r t; do
  "$BIN" import "$SHM/chain" --vdi $V --raw "$C/inc.raw" --bitmap "$C/$i.b64" --time "$t" > /dev/null
  i=$((i + 1))
done < "$C/times"
t1=$(date +%s.%N)
mkbucket bench-ready
local R=s3://bench-ready/chain
"$BIN" init "$R" > /dev/null
out=$(timed "$BIN" copy "$SHM/chain" "$R" --to-key-file "$CBTFS_KEY_FILE")
say "3. chain of $POINTS points of a 64 MiB disk: $((POINTS - 1)) local increments $(py "print('%.3f' % (($t1 - $t0) / max(1, $POINTS - 1)))") s each; copied into RGW in ${out% *} s (peak RSS ${out#* } KiB)"
ready() { # cache dir [list] -> seconds from `cbtfs mount` starting to its first `ls` answering;
  # with "list", also the seconds until `find` lists all POINTS points (a stat of each)
  local a b c n=0 deadline
  a=$(date +%s.%N)
  CBTFS_CACHE_DIR=$1 "$BIN" mount "$R" "$MNT"
  until ls "$MNT" > /dev/null 2>&1 && [ -n "$(ls "$MNT")" ]; do sleep 0.001; done
  b=$(date +%s.%N)
  if [ "${2:-}" = list ]; then
    deadline=$(($(date +%s) + LIST_TIMEOUT))
    while [ "$n" -lt "$POINTS" ] && [ "$(date +%s)" -lt "$deadline" ]; do
      n=$(find "$MNT" -type f -name '*Z.raw' 2>/dev/null | wc -l)
    done
    c=$(date +%s.%N)
    LISTED="$(py "print('%.3f' % ($c - $a))") s for $n of $POINTS points"
  fi
  # The daemon writes what it fetched into the cache on a thread of its own and finishes
  # after the unmount: wait for it, so the next mount finds its cache whole and the cache
  # directory is not removed under it.
  local pid; pid=$(mount_pid "$MNT")
  umount "$MNT"
  while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
  py "print('%.4f' % ($b - $a))"
}
ec=(); wc_=(); LISTED=
LIST_TIMEOUT=${LIST_TIMEOUT:-120}
rm -rf "$WORK/ecache"; mkdir -p "$WORK/ecache"
ready "$WORK/ecache" list > "$WORK/ready.out"; ec+=("$(cat "$WORK/ready.out")")
# Slow mounts (more than 5 s) are measured once each; fast ones 3 times empty, 5 times warm.
reps_e=3; reps_w=5
py "import sys; sys.exit(0 if ${ec[0]} > 5 else 1)" && { reps_e=1; reps_w=1; }
for ((k = 2; k <= reps_e; k++)); do rm -rf "$WORK/ecache"; mkdir -p "$WORK/ecache"; ec+=("$(ready "$WORK/ecache")"); done
rm -rf "$WORK/wcache"; cp -a "$WORK/ecache" "$WORK/wcache"   # warmed by the mounts above
[ "$reps_w" -gt 1 ] && ready "$WORK/wcache" > /dev/null
for ((k = 1; k <= reps_w; k++)); do wc_+=("$(ready "$WORK/wcache")"); done
me=$(median "${ec[@]}"); mw=$(median "${wc_[@]}")
say "   mount ready (its first ls answering), s: empty cache ${ec[*]}; warm cache ${wc_[*]}"
say "   listing every point (find -type f, a stat of each) after the first empty-cache mount: $LISTED"
row "mount ready, $POINTS points, empty cache, s" "$me" "-" "-" "<= 1.000" "$(verdict "$me <= 1")" "-"
row "mount ready, $POINTS points, warm cache, s" "$mw" "-" "-" "< 0.100" "$(verdict "$mw < 0.1")" "-"
rm -rf "$SHM/chain" "$WORK/ecache" "$WORK/wcache"
s3purge bench-ready/chain/
}

############ 5. cbtfs copy of COPY_POINTS incremental points local -> RGW vs aws s3 cp
bench_5() {
log "row 5: copy of $COPY_POINTS incremental points ($COPY_MB MiB each), $ROUNDS rounds ..."
local P=$WORK/copy-$COPY_POINTS-$COPY_MB V=c5c5c5c5-0000-4000-8000-000000000001 nb=16384
if [ ! -f "$P/done" ]; then
  rm -rf "$P"; mkdir -p "$P/chg"
  python3 - "$P" "$nb" "$COPY_POINTS" "$COPY_MB" <<EOF
import datetime, os, random, sys
$PYBITMAP
d, blocks, n, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]); random.seed(5)
with open(f'{d}/base.img', 'wb') as f:
    f.truncate(blocks * 65536); f.write(os.urandom(64 << 20))
t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
with open(f'{d}/times', 'w') as times:
    for i in range(1, n + 1):
        picks = sorted(random.sample(range(blocks), mb * 16))
        with open(f'{d}/{i}.raw', 'wb') as f, open(f'{d}/chg/{i:04}.bin', 'wb') as c:
            f.truncate(blocks * 65536)
            for b in picks:
                data = os.urandom(65536); f.seek(b * 65536); f.write(data); c.write(data)
        bitmap(f'{d}/{i}.b64', picks, blocks)
        times.write((t0 + datetime.timedelta(hours=i)).strftime('%Y-%m-%dT%H:%M:%SZ') + '\n')
EOF
  touch "$P/done"
fi
mkbucket bench-copy
rm -rf "$WORK/copysrc"; "$BIN" init "$WORK/copysrc" > /dev/null
"$BIN" import "$WORK/copysrc" --vdi $V --name copy --raw "$P/base.img" --time 2026-01-01T00:00:00Z > /dev/null
for ((r = 1; r <= ROUNDS; r++)); do
  "$BIN" init "s3://bench-copy/r$r" > /dev/null
  "$BIN" copy "$WORK/copysrc" "s3://bench-copy/r$r" --to-key-file "$CBTFS_KEY_FILE" > /dev/null
done
local i=1
while read -r t; do
  "$BIN" import "$WORK/copysrc" --vdi $V --raw "$P/$i.raw" --bitmap "$P/$i.b64" --time "$t" > /dev/null
  i=$((i + 1))
done < "$P/times"
tc=(); ta=(); q=(); rc=(); ra=(); cp_=()
one_cbtfs() {
  local at; at=$(logpos)
  out=$(timed "$BIN" copy "$WORK/copysrc" "s3://bench-copy/r$1" --to-key-file "$CBTFS_KEY_FILE" --json); tc+=("${out% *}"); rc+=("${out#* }")
  cp_+=("$(py "import json; print(json.load(open('$WORK/last.out')).get('points_copied', '?'))")")
}
one_aws() {
  out=$(timed "$AWS" --endpoint-url "$CBTFS_S3_ENDPOINT" s3 cp --recursive --quiet "$P/chg" "s3://bench-copy/aws$1/"); ta+=("${out% *}"); ra+=("${out#* }")
}
for ((r = 1; r <= ROUNDS; r++)); do
  if [ $((r % 2)) = 1 ]; then one_cbtfs "$r"; one_aws "$r"; else one_aws "$r"; one_cbtfs "$r"; fi
  q+=("$(ratio "${tc[-1]}" "${ta[-1]}")")
  log "  round $r: cbtfs copy ${tc[-1]} s (${cp_[-1]} points), aws s3 cp ${ta[-1]} s"
done
mq=$(median "${q[@]}")
changed=$((COPY_POINTS * COPY_MB))
say "5. copy of $COPY_POINTS points ($changed MiB of changed random blocks) local -> RGW, $ROUNDS rounds interleaved:"
say "   cbtfs copy ${tc[*]} s (points copied ${cp_[*]}); aws s3 cp --recursive of the changed bytes ${ta[*]} s; ratios ${q[*]}"
say "   peak RSS KiB: cbtfs ${rc[*]}; aws ${ra[*]}"
row "copy $COPY_POINTS points local->RGW, s" "$(median "${tc[@]}")" "$(median "${ta[@]}") (aws cp)" "$mq" "<= 1.20" "$(verdict "$mq <= 1.2")" "$(( $(median "${rc[@]}" | cut -d. -f1) / 1024 ))"
rm -rf "$WORK/copysrc"
s3purge bench-copy
}

for n in $ONLY; do "bench_$n"; done

say ""
say "sizes: SIZE_MB=$SIZE_MB ROUNDS=$ROUNDS POINTS=$POINTS COPY_POINTS=$COPY_POINTS COPY_MB=$COPY_MB QUICK=$QUICK; RGW $(ceph --version | cut -d' ' -f3) memstore; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
fmt="%-44s %12s %20s %7s %9s %6s %8s"
say "$(printf "$fmt" what cbtfs reference ratio target result "RSS MiB")"
for x in "${ROWS[@]}"; do
  IFS='|' read -r a b c d e f g <<< "$x"
  say "$(printf "$fmt" "$a" "$b" "$c" "$d" "$e" "$f" "$g")"
done
