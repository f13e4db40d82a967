#!/usr/bin/env bash
# Repository format 2 (issue 18): the issue's figures, each against its reference, in one table.
#
# Method (run the same way every time; everything cbtfs writes is encrypted, XChaCha20-Poly1305
# with a key file, and compressed):
#   1. dedup: a template disk of SIZE_MB with 50% of its 64 KiB blocks allocated (random blocks,
#      random data). 4 clones: each imported as its own VDI, first the template as its base
#      (`import --raw template`), then its increment: 5% of the disk's blocks (a random sample,
#      different random data per clone) with their CBT bitmap (`import --raw clone --bitmap`).
#      Stored bytes vs template's allocated bytes + 4 x the changed bytes.
#   2. compression: an ext4 filesystem made from a copy of this machine's /usr (`mkfs.ext4 -d`;
#      QUICK: /usr/share), imported with `import --raw`. Reference: the image's non-zero 64 KiB
#      blocks concatenated and compressed as one stream by `zstd -1`.
#   3. random data: what the repository of row 4's (last) format-2 backup takes vs the disk.
#   4. full backup throughput: a SIZE_MB disk of random data (incompressible: every block is
#      hashed, looked up and sealed; zstd is skipped where a block's samples look random), served by qemu-nbd (TLS, 4 connections) to the simulated host
#      (`cbtfs sim`), as scripts/bench-backup.sh does; whole `cbtfs backup` runs into a fresh
#      repository on /dev/shm. In each of ROUNDS rounds: the format-1 binary (built from commit
#      396e47c, the last format-1 commit), the format-2 binary and `restic backup` of the same
#      image file (restic repository version 2: compressed, encrypted; on /dev/shm). Medians of
#      the per-round ratios.
#   5. cold sequential read (`dd bs=1M` after `echo 3 > drop_caches`) through `cbtfs mount` of a
#      compressible image (the first SIZE_MB of row 2's ext4 image), vs the raw image file; and
#      of the point at depth DEPTH vs depth 1 of the same chain (a base, then DEPTH-1 increments
#      of one new random block each, `import --bitmap`). Repository and raw file both on this
#      machine's disk. Per-round ratios, medians of ROUNDS rounds.
#   6. `prune --keep-last 10` of 100 points of a SIZE_MB disk (base: row 4's random disk; each
#      increment 16 blocks: 8 from a hot set of 256, 8 anywhere; new random data). The same
#      history in format 1 and 2, each copied afresh to /dev/shm before every run (the copy is
#      not timed). Bytes written = sizes of the repository files that are new after the prune
#      (by inode, so a rename is not a write), split into the prune's metadata and the garbage
#      collection's (cindex objects and packs); also the prune's JSON figures and the wchar of
#      the process (all it wrote, its local cache included).
#   7. memory at 2 TiB: a 2 TiB virtual disk with 5% allocated is 100 GiB of data, too much for
#      this machine's time. SCALED: 2 TiB virtual disks holding RSS_DATA_MB of data (two sizes,
#      in 1 MiB runs at random offsets), each backed up over NBD as in row 4, then mounted and
#      all its data read through the mount. Peak RSS: `/usr/bin/time` (backup), VmHWM of the
#      mount daemon (mount). Extrapolated linearly from the two sizes to 5% (100 GiB).
#      RSS_FULL=1 measures it directly instead (~30 min on 2 cores, ~10 GiB of repository in
#      WORKDIR, no space for the source): nbdkit's pattern plugin serves a 2 TiB disk (every
#      8-byte word is its own offset, big-endian: every block distinct, zstd ~10x) with
#      RSS_FULL_GIB GiB (default 100 = 5%) allocated in 1 MiB runs at random offsets, told by the
#      extentlist filter, so the backup (NBD block status) reads only those; nbdkit serves it over
#      TLS to the simulator as qemu-nbd does. Then the mount daemon's VmHWM after every run was
#      read through the point's raw file (4 MiB reads, in order within each run), 4 words of
#      each read checked against the pattern (any mismatch fails the row).
#      Mount ready: from `cbtfs mount` starting to the first `ls` of the mountpoint succeeding,
#      on row 5's repository (DEPTH points; median of 5, page cache warm).
#      Peak RSS counts mapped file pages too (the chunk index cache is an mmapped file).
#   8. `import --raw` of a sparse 2 TiB file holding 96 MiB of data (1 MiB runs at random
#      offsets): seconds (median of ROUNDS; IMPORT_TIMEOUT seconds at most).
# Results: the table on standard output and in WORKDIR/results.txt; progress on standard error.
# Usage: scripts/bench-format2.sh [WORKDIR]   (root; default /var/tmp/cbtfs-bench-fmt2; needs
#   ~20 GiB free there and ~5 GiB in /dev/shm; installs restic, zstd, qemu-utils if missing)
#   QUICK=1: SIZE_MB=1024, DEPTH=200, /usr/share, RSS_DATA_MB="256 1024", ROUNDS=2 (~5 min)
#   Also settable: ONLY (rows to run, e.g. ONLY="4 6"), SIZE_MB, ROUNDS, DEPTH, USR_DIR,
#   RSS_DATA_MB, RSS_FULL, RSS_FULL_GIB, IMPORT_TIMEOUT, CBTFS (a prebuilt format-2 binary instead of building this tree)
#   Inputs (images, increments) are kept in WORKDIR between runs; the format-1 binary too.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
WORK=${1:-/var/tmp/cbtfs-bench-fmt2}
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  SIZE_MB=${SIZE_MB:-1024}; ROUNDS=${ROUNDS:-2}; DEPTH=${DEPTH:-200}; USR_DIR=${USR_DIR:-/usr/share}
  RSS_DATA_MB=${RSS_DATA_MB:-"256 1024"}
else
  SIZE_MB=${SIZE_MB:-4096}; ROUNDS=${ROUNDS:-3}; DEPTH=${DEPTH:-1000}; USR_DIR=${USR_DIR:-/usr}
  RSS_DATA_MB=${RSS_DATA_MB:-"1024 4096"}
fi
IMPORT_TIMEOUT=${IMPORT_TIMEOUT:-300}
RSS_FULL=${RSS_FULL:-0}; RSS_FULL_GIB=${RSS_FULL_GIB:-100}
ONLY=${ONLY:-1 2 4 5 6 7 8}   # which rows to run (3 comes with 4; 7 runs the mount-ready part of 5)
F1_COMMIT=396e47c
PRUNE_POINTS=100
[ "$(id -u)" = 0 ] || { echo "run as root (drop_caches, mount)" >&2; exit 1; }

need() { # command package
  command -v "$1" > /dev/null || { echo "installing $2 ..." >&2; apt-get install -y -q "$2" > /dev/null; }
}
need restic restic; need zstd zstd; need qemu-nbd qemu-utils; need mkfs.ext4 e2fsprogs
need openssl openssl; need curl curl; need /usr/bin/time time

if [ -n "${CBTFS:-}" ]; then F2=$(realpath "$CBTFS"); else cargo build --release --quiet; F2=$SRC/target/release/cbtfs; fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
cd "$WORK"
SHM=/dev/shm/cbtfs-bench-fmt2
MNT=$WORK/mnt
RESULTS=$WORK/results.txt
: > "$RESULTS"
say() { echo "$*" | tee -a "$RESULTS"; }
log() { echo "[$(date +%T)] $*" >&2; }
py() { python3 -c "$1"; }

# The format-1 binary, built once from git and cached.
F1=$WORK/f1/cbtfs
if [ ! -x "$F1" ]; then
  log "building the format-1 binary from $F1_COMMIT (once) ..."
  [ -d "$WORK/f1src" ] || git -C "$SRC" worktree add --detach "$WORK/f1src" "$F1_COMMIT" > /dev/null
  if [ ! -d "$WORK/f1target/release" ] && [ -d "$SRC/target/release/deps" ]; then
    # Seed with this checkout's compiled dependencies: those shared by both are not rebuilt.
    mkdir -p "$WORK/f1target/release"
    cp -a "$SRC/target/release/deps" "$SRC/target/release/build" "$SRC/target/release/.fingerprint" "$WORK/f1target/release/"
  fi
  (cd "$WORK/f1src" && cargo build --release --quiet --bin cbtfs --target-dir "$WORK/f1target")
  mkdir -p "$WORK/f1"; cp "$WORK/f1target/release/cbtfs" "$F1"
fi

export CBTFS_KEY_FILE=$WORK/key          # made by the first `cbtfs init`; format 1 ignores it
export CBTFS_CACHE_DIR=$WORK/cache       # format 2's chunk index cache, out of $HOME
rm -rf "$CBTFS_CACHE_DIR"
export RESTIC_PASSWORD_FILE=$WORK/restic-password
[ -f "$RESTIC_PASSWORD_FILE" ] || head -c 24 /dev/urandom | base64 > "$RESTIC_PASSWORD_FILE"

SIM_PID=; QEMU_PID=
cleanup() {
  for m in "$MNT" "$MNT"2; do mountpoint -q "$m" 2>/dev/null && { umount "$m" 2>/dev/null || umount -l "$m"; }; done
  [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null || true
  [ -n "$SIM_PID" ] && kill "$SIM_PID" 2>/dev/null || true
  rm -rf "$SHM"
}
trap cleanup EXIT
cleanup
mkdir -p "$SHM" "$MNT"

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
mib() { py "print('%.1f' % ($1 / 1048576))"; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
seq_mbps() { # file -> MB/s of a dd bs=1M read
  dd if="$1" of=/dev/null bs=1M 2>&1 | awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+$/ && $(i+1) ~ /^s,?$/) secs = $i; bytes = $1 } END { printf "%.0f", bytes / secs / 1e6 }'
}
# Bytes a repository takes: `ls --json`'s repository.storage_bytes (every object, as stored)
# when it has it, else du.
stored() {
  local s
  s=$("$F2" ls "$1" --json 2> /dev/null | python3 -c "
import json, sys
j = json.load(sys.stdin)
for t in ('space', 'repository', 'totals'):
    r = j.get(t)
    if not isinstance(r, dict): continue
    for k in ('storage_bytes', 'stored_bytes'):
        if isinstance(r.get(k), int): print(r[k]); sys.exit()
" 2> /dev/null || true)
  if [ -n "$s" ]; then echo "$s"; else du -sb "$1" | cut -f1; fi
}
f2init() { rm -rf "$1"; "$F2" init "$1" > /dev/null; }
f1init() { rm -rf "$1"; "$F1" init "$1" > /dev/null; }
ROWS=()
row() { # what cbtfs reference ratio target pass rss
  ROWS+=("$1|$2|$3|$4|$5|$6|$7")
}
verdict() { py "print('pass' if $1 else 'FAIL')"; }
blocks=$((SIZE_MB * 16)); bytes=$((SIZE_MB << 20))
log "SIZE_MB=$SIZE_MB ROUNDS=$ROUNDS DEPTH=$DEPTH USR_DIR=$USR_DIR RSS_DATA_MB=($RSS_DATA_MB) QUICK=$QUICK"

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
# A simulated host with one VM whose disk is $1, read through qemu-nbd (TLS) on port 10821.
start_host() {
  stop_host
  rm -rf "$WORK/sim"; "$F2" sim --dir "$WORK/sim" --disk root="$1" > "$WORK/sim.out" &
  SIM_PID=$!
  for _ in $(seq 100); do grep -q Ctrl-C "$WORK/sim.out" 2>/dev/null && break; sleep 0.1; done
  URL=$(grep -o 'https://[0-9.:]*' "$WORK/sim.out" | head -1)
  VDI=$(sed -n 's/.*disks: //p' "$WORK/sim.out")
  TOKEN=$(grep -o 'x-sim-token: [0-9a-f-]*' "$WORK/sim.out" | cut -d' ' -f2)
  qemu-nbd -r -f raw -t -e 16 -x disk -b 127.0.0.1 -p 10821 \
    --object tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir="$WORK/pki" --tls-creds tls0 "$1" &
  QEMU_PID=$!
  # nbdkit reads the 102,400-line extent list first: seconds on a loaded machine.
for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/10821) 2>/dev/null && break; sleep 0.1; done
(exec 3<>/dev/tcp/127.0.0.1/10821) 2>/dev/null || { echo "nbdkit did not start listening within 60 s" >&2; exit 1; }
  curl -sfk -H "x-sim-token: $TOKEN" -X POST "$URL/sim/nbd?address=127.0.0.1&port=10821&export=disk&subject=localhost" \
    --data-binary @"$WORK/pki/server-cert.pem" > /dev/null
  bk_args
}
stop_host() {
  [ -n "$QEMU_PID" ] && { kill "$QEMU_PID" 2>/dev/null || true; wait "$QEMU_PID" 2>/dev/null || true; }
  [ -n "$SIM_PID" ] && { kill "$SIM_PID" 2>/dev/null || true; wait "$SIM_PID" 2>/dev/null || true; }
  QEMU_PID=; SIM_PID=
}
# `BIN backup REPO "${BK[@]}"` backs up the host's disk.
bk_args() { BK=(--host "$URL" --password-file "$WORK/sim/password" --vdi "$VDI" --connections 4); }

make_src() { # sets SRCIMG: SIZE_MB of random data (made once)
SRCIMG=$WORK/src-$SIZE_MB.img
[ -f "$SRCIMG" ] || head -c "$bytes" /dev/urandom > "$SRCIMG"
}

make_usr_img() { # sets UIMG: the ext4 image of USR_DIR (made once), with its zstd -1 reference
UIMG=$WORK/usr-$(echo "$USR_DIR" | tr / _).img
[ -f "$UIMG.done" ] && [ -f "$UIMG" ] && return
  log "  making $UIMG from $USR_DIR (once) ..."
  rm -f "$UIMG"
  kib=$(du -sk "$USR_DIR" | cut -f1)
  truncate -s $(( (kib * 5 / 4 + 262144) / 1024 ))M "$UIMG"
  mkfs.ext4 -q -F -d "$USR_DIR" "$UIMG"
  # Reference: the non-zero 64 KiB blocks (what cbtfs stores) as one zstd -1 stream.
  python3 - "$UIMG" 3> "$UIMG.nonzero" <<'EOF' | zstd -1 -c | wc -c > "$UIMG.zstd1"
import os, sys
zero = bytes(65536); n = 0
out = os.fdopen(1, 'wb')
with open(sys.argv[1], 'rb') as f:
    size = os.fstat(f.fileno()).st_size; pos = 0
    while pos < size:
        try: pos = os.lseek(f.fileno(), pos, os.SEEK_DATA)
        except OSError: break
        end = os.lseek(f.fileno(), pos, os.SEEK_HOLE)
        pos -= pos % 65536
        f.seek(pos)
        while pos < end:
            b = f.read(65536)
            if not b: break
            if b != zero[:len(b)]: out.write(b); n += len(b)
            pos += len(b)
out.flush()
os.write(3, str(n).encode())
EOF
  touch "$UIMG.done"
}

CHAIN_BUILT=0
make_chain() { # sets R (the repository) and CIMG: a chain of DEPTH points of a compressible image
[ "$CHAIN_BUILT" = 1 ] && return
make_usr_img
CIMG=$WORK/chain-$SIZE_MB.img
usr_mb=$(( $(stat -c %s "$UIMG") >> 20 ))
if [ ! -f "$CIMG" ]; then
  dd if="$UIMG" of="$CIMG.tmp" bs=1M count=$((usr_mb < SIZE_MB ? usr_mb : SIZE_MB)) conv=sparse status=none
  truncate -s "${SIZE_MB}M" "$CIMG.tmp"; mv "$CIMG.tmp" "$CIMG"
fi
C=$WORK/chain-inc-$SIZE_MB-$DEPTH
if [ ! -f "$C/done" ]; then
  rm -rf "$C"; mkdir -p "$C"
  python3 - "$C" "$blocks" "$DEPTH" <<EOF
import datetime, os, random, sys
$PYBITMAP
d, blocks, depth = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]); random.seed(1000)
picks = random.sample(range(blocks), depth - 1)
t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
with open(f'{d}/inc.raw', 'wb') as f, open(f'{d}/times', 'w') as times:
    f.truncate(blocks * 65536)
    for i, b in enumerate(picks, start=2):
        f.seek(b * 65536); f.write(os.urandom(65536))
        bitmap(f'{d}/{i}.b64', [b], blocks)
        times.write((t0 + datetime.timedelta(minutes=i)).strftime('%Y-%m-%dT%H:%M:%SZ') + '\n')
EOF
  touch "$C/done"
fi
R=$WORK/chain-repo; f2init "$R"
V=e0e0e0e0-0000-4000-8000-000000000001
out=$(timed "$F2" import "$R" --vdi $V --name chain --raw "$CIMG" --time 2026-01-01T00:00:00Z); cbase=${out% *}
t0=$(date +%s.%N); i=2
while read -r t; do
  "$F2" import "$R" --vdi $V --raw "$C/inc.raw" --bitmap "$C/$i.b64" --time "$t" > /dev/null
  i=$((i + 1))
done < "$C/times"
t1=$(date +%s.%N)
say "5. chain: image ${SIZE_MB} MiB ($(mib $(( $(stat -c %b "$CIMG") * 512 ))) MiB allocated in the file); base import ${cbase} s; $((DEPTH - 1)) one-block increments $(py "print('%.3f' % (($t1 - $t0) / max(1, $DEPTH - 1)))") s each"
CHAIN_BUILT=1
}

drop_chain() { rm -rf "$WORK/chain-repo" "$CIMG" "$C"; CHAIN_BUILT=0; }
on() { [[ " $ONLY " == *" $1 "* ]]; }

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

MOUNT_ROW=()
mount_ready() { # sets MOUNT_ROW (measured on make_chain's repository)
make_chain
# Mount ready at DEPTH points (page cache warm: a second mount right after the first).
mr=()
for k in 1 2 3 4 5 6; do
  t0=$(date +%s.%N)
  "$F2" mount "$R" "$MNT"
  until ls "$MNT" > /dev/null 2>&1 && [ -n "$(ls "$MNT")" ]; do sleep 0.001; done
  t1=$(date +%s.%N)
  umount "$MNT"
  [ $k = 1 ] || mr+=("$(py "print('%.4f' % ($t1 - $t0))")")
done
mmr=$(median "${mr[@]}")
say "7. mount ready at $DEPTH points (s, warm, after one unmeasured mount): ${mr[*]}"
MOUNT_ROW=("mount ready at $DEPTH points, s" "$mmr" "-" "-" "< 0.100" "$(verdict "$mmr < 0.1")" "-")
}

############ 1. dedup of 4 clones of one template
bench_1() {
log "row 1: dedup of 4 clones ..."
D=$WORK/dedup-$SIZE_MB
if [ ! -f "$D/done" ]; then
  rm -rf "$D"; mkdir -p "$D"
  python3 - "$D" "$blocks" <<EOF
import os, random, sys
$PYBITMAP
d, blocks = sys.argv[1], int(sys.argv[2]); random.seed(18)
with open(f'{d}/template.img', 'wb') as f:
    f.truncate(blocks * 65536)
    for b in sorted(random.sample(range(blocks), blocks // 2)):
        f.seek(b * 65536); f.write(os.urandom(65536))
for c in range(1, 5):
    picks = sorted(random.sample(range(blocks), blocks // 20))
    with open(f'{d}/clone{c}.raw', 'wb') as f:
        f.truncate(blocks * 65536)
        for b in picks: f.seek(b * 65536); f.write(os.urandom(65536))
    bitmap(f'{d}/clone{c}.b64', picks, blocks)
EOF
  touch "$D/done"
fi
alloc=$(( (blocks / 2) * 65536 )); changed=$(( (blocks / 20) * 65536 ))
R=$SHM/dedup; f2init "$R"
dt=(); drss=0
for c in 1 2 3 4; do
  V=d0d0d0d0-0000-4000-8000-00000000000$c
  out=$(timed "$F2" import "$R" --vdi $V --name clone$c --raw "$D/template.img" --time 2026-01-01T00:00:00Z); dt+=("${out% *}")
  drss=$(py "print(max($drss, ${out#* }))")
  out=$(timed "$F2" import "$R" --vdi $V --raw "$D/clone$c.raw" --bitmap "$D/clone$c.b64" --time 2026-01-02T00:00:00Z)
  drss=$(py "print(max($drss, ${out#* }))")
done
s1=$(stored "$R"); ref1=$((alloc + 4 * changed)); du1=$(du -sb "$R" | cut -f1)
say "1. dedup: template ${SIZE_MB} MiB, $(mib $alloc) MiB allocated; 4 x $(mib $changed) MiB changed; template imports ${dt[*]} s (first stores, later dedup); stored $(mib "$s1") MiB (du: $(mib "$du1") MiB)"
row "4 clones of a template (dedup), MiB" "$(mib "$s1")" "$(mib $ref1)" "$(py "print('%.3f' % ($s1 / $ref1))")" "<= 1.10" "$(verdict "$s1 <= 1.1 * $ref1")" "$((drss / 1024))"
rm -rf "$R" "$D"
}

############ 2. compression of an ext4 filesystem holding /usr
bench_2() {
log "row 2: compression (ext4 of $USR_DIR) ..."
make_usr_img
nonzero=$(cat "$UIMG.nonzero"); zref=$(cat "$UIMG.zstd1")
R=$SHM/comp; f2init "$R"
out=$(timed "$F2" import "$R" --vdi c0c0c0c0-0000-4000-8000-000000000001 --name usr --raw "$UIMG")
s2=$(stored "$R"); du2=$(du -sb "$R" | cut -f1)
say "2. compression: $USR_DIR in ext4, image $(mib "$(stat -c %s "$UIMG")") MiB, non-zero blocks $(mib "$nonzero") MiB, zstd -1 of them $(mib "$zref") MiB; cbtfs stored $(mib "$s2") MiB (du: $(mib "$du2") MiB; import ${out% *} s)"
row "ext4 of $USR_DIR (compression), MiB" "$(mib "$s2")" "$(mib "$zref") (zstd -1)" "$(py "print('%.3f' % ($s2 / $zref))")" "<= 1.10" "$(verdict "$s2 <= 1.1 * $zref")" "$((${out#* } / 1024))"
rm -rf "$R"
}

############ 3 and 4. full backup over NBD: format 1, format 2, restic; stored size of random data
bench_4() {
log "row 4: full backups of ${SIZE_MB} MiB random, $ROUNDS rounds ..."
make_src
start_host "$SRCIMG"
cat "$SRCIMG" > /dev/null
one_f1() { f1init "$SHM/r1"; out=$(timed "$F1" backup "$SHM/r1" "${BK[@]}"); t1+=("${out% *}"); rss1+=("${out#* }"); rm -rf "$SHM/r1"; }
one_f2() { f2init "$SHM/r2"; out=$(timed "$F2" backup "$SHM/r2" "${BK[@]}"); t2+=("${out% *}"); rss2+=("${out#* }"); s3=$(stored "$SHM/r2"); du3=$(du -sb "$SHM/r2" | cut -f1); rm -rf "$SHM/r2"; }
t1=(); t2=(); tr=(); r21=(); r2r=(); rss1=(); rss2=(); rssr=()
for ((r = 1; r <= ROUNDS; r++)); do
  if [ $((r % 2)) = 1 ]; then one_f1; one_f2; else one_f2; one_f1; fi
  rm -rf "$SHM/restic" "$SHM/restic-cache"
  restic init -q --repo "$SHM/restic" --repository-version 2 > /dev/null
  out=$(timed restic backup -q --repo "$SHM/restic" --cache-dir "$SHM/restic-cache" "$SRCIMG"); tr+=("${out% *}"); rssr+=("${out#* }")
  rm -rf "$SHM/restic" "$SHM/restic-cache"
  r21+=("$(py "print('%.3f' % (${t1[-1]} / ${t2[-1]}))")"); r2r+=("$(py "print('%.3f' % (${tr[-1]} / ${t2[-1]}))")")
  log "  round $r: format 1 ${t1[-1]} s, format 2 ${t2[-1]} s, restic ${tr[-1]} s"
done
stop_host
mt1=$(median "${t1[@]}"); mt2=$(median "${t2[@]}"); mtr=$(median "${tr[@]}")
m21=$(median "${r21[@]}"); m2r=$(median "${r2r[@]}")
thr() { py "print(round($bytes / $1 / 1e6))"; }
say "4. full backup of ${SIZE_MB} MiB random data over NBD (qemu-nbd TLS, 4 connections), repositories on /dev/shm, $ROUNDS rounds:"
say "   format 1: ${t1[*]} s; format 2: ${t2[*]} s; restic $(restic version | cut -d' ' -f2) backup of the file: ${tr[*]} s"
say "   per-round throughput ratios format 2 / format 1: ${r21[*]}; format 2 / restic: ${r2r[*]}"
say "   peak RSS KiB: format 1 ${rss1[*]}; format 2 ${rss2[*]}; restic ${rssr[*]}"
row "full backup MB/s vs format 1 (median ratio)" "$(thr "$mt2")" "$(thr "$mt1") (fmt 1)" "$m21" ">= 0.80" "$(verdict "$m21 >= 0.8")" "$(( $(median "${rss2[@]}" | cut -d. -f1) / 1024 ))"
row "full backup MB/s vs restic (median ratio)" "$(thr "$mt2")" "$(thr "$mtr") (restic)" "$m2r" ">= 3.00" "$(verdict "$m2r >= 3")" "$(( $(median "${rssr[@]}" | cut -d. -f1) / 1024 )) (restic)"
say "3. random data: ${SIZE_MB} MiB stored as $(mib "$s3") MiB (du: $(mib "$du3") MiB)"
row "random data stored, MiB" "$(mib "$s3")" "$(mib $bytes)" "$(py "print('%.4f' % ($s3 / $bytes))")" "<= 1.02" "$(verdict "$s3 <= 1.02 * $bytes")" "-"
}

############ 5. cold sequential reads through the mount, depth 1 and DEPTH
bench_5() {
log "row 5: chain of $DEPTH points of a compressible ${SIZE_MB} MiB image ..."
make_chain
"$F2" mount "$R" "$MNT"
mapfile -t P < <(find "$MNT" -type f -name '*Z.raw' | sort)
[ "${#P[@]}" = "$DEPTH" ] || { echo "expected $DEPTH points under $MNT, found ${#P[@]}" >&2; exit 1; }
raw=(); d1=(); dn=(); q1=(); qn=(); qd=()
for ((r = 1; r <= ROUNDS; r++)); do
  drop; a=$(seq_mbps "$CIMG"); drop; b=$(seq_mbps "${P[0]}"); drop; c=$(seq_mbps "${P[-1]}")
  raw+=("$a"); d1+=("$b"); dn+=("$c")
  q1+=("$(py "print('%.3f' % ($b / $a))")"); qn+=("$(py "print('%.3f' % ($c / $a))")"); qd+=("$(py "print('%.3f' % ($c / $b))")")
  log "  round $r: raw $a, depth 1 $b, depth $DEPTH $c MB/s"
done
mpid=$(mount_pid "$MNT"); mhwm=$(awk '/VmHWM/ { print $2 }' "/proc/$mpid/status")
umount "$MNT"
m1=$(median "${q1[@]}"); mn=$(median "${qn[@]}"); md=$(median "${qd[@]}")
say "   cold seq MB/s per round: raw ${raw[*]}; depth 1 ${d1[*]}; depth $DEPTH ${dn[*]}"
say "   per-round ratios depth 1/raw ${q1[*]}; depth $DEPTH/raw ${qn[*]}; depth $DEPTH/depth 1 ${qd[*]}"
row "cold seq read, depth 1, MB/s" "$(median "${d1[@]}")" "$(median "${raw[@]}") (raw)" "$m1" ">= 0.60" "$(verdict "$m1 >= 0.6")" "$((mhwm / 1024)) (mount)"
row "cold seq read, depth $DEPTH, MB/s" "$(median "${dn[@]}")" "$(median "${raw[@]}") (raw)" "$mn" ">= 0.60" "$(verdict "$mn >= 0.6")" "-"
row "cold seq read, depth $DEPTH vs depth 1" "$(median "${dn[@]}")" "$(median "${d1[@]}") (d1)" "$md" ">= 0.90" "$(verdict "$md >= 0.9")" "-"
on 7 && mount_ready
drop_chain
}

############ 6. prune --keep-last 10 of 100 points
bench_6() {
log "row 6: prune of $PRUNE_POINTS points ..."
make_src
PI=$WORK/prune-inc-$SIZE_MB
if [ ! -f "$PI/done" ]; then
  rm -rf "$PI"; mkdir -p "$PI"
  python3 - "$PI" "$blocks" "$PRUNE_POINTS" <<EOF
import datetime, os, random, sys
$PYBITMAP
d, blocks, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]); random.seed(6)
hot = random.sample(range(blocks), 256)
t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
with open(f'{d}/times', 'w') as times:
    for i in range(2, n + 1):
        picks = sorted(set(random.sample(hot, 8) + random.sample(range(blocks), 8)))
        with open(f'{d}/{i}.raw', 'wb') as f:
            f.truncate(blocks * 65536)
            for b in picks: f.seek(b * 65536); f.write(os.urandom(65536))
        bitmap(f'{d}/{i}.b64', picks, blocks)
        times.write((t0 + datetime.timedelta(hours=i)).strftime('%Y-%m-%dT%H:%M:%SZ') + '\n')
EOF
  touch "$PI/done"
fi
V=f0f0f0f0-0000-4000-8000-000000000001
build_history() { # binary repo: sets H_BASE (s) and H_INC (s per increment)
  local t0 t1 i=2 out
  out=$(timed "$1" import "$2" --vdi $V --name prune --raw "$SRCIMG" --time 2026-01-01T00:00:00Z); H_BASE=${out% *}
  t0=$(date +%s.%N)
  while read -r t; do "$1" import "$2" --vdi $V --raw "$PI/$i.raw" --bitmap "$PI/$i.b64" --time "$t" > /dev/null; i=$((i + 1)); done < "$PI/times"
  t1=$(date +%s.%N)
  H_INC=$(py "print('%.3f' % (($t1 - $t0) / ($PRUNE_POINTS - 1)))")
}
export CBTFS_CACHE_DIR=$WORK/prune-cache
rm -rf "$CBTFS_CACHE_DIR"; mkdir -p "$CBTFS_CACHE_DIR"
f1init "$WORK/p1-master"; build_history "$F1" "$WORK/p1-master"; b1=$H_BASE; i1=$H_INC
f2init "$WORK/p2-master"; build_history "$F2" "$WORK/p2-master"; b2=$H_BASE; i2=$H_INC
say "6. history of $PRUNE_POINTS points: import of the ${SIZE_MB} MiB base format 1 $b1 s, format 2 $b2 s; increments (16 blocks) format 1 $i1 s, format 2 $i2 s each"
# Files of a repository: inode size mtime path.
listing() { find "$1" -type f -printf '%i %s %T@ %P\n' | sort; }
# Bytes of the files in listing $2 that are not in listing $1 (new inode, or changed), by kind.
written() {
  python3 - "$1" "$2" <<'EOF'
import sys
def load(p):
    return {l.split(' ', 3)[0]: l.rstrip('\n').split(' ', 3) for l in open(p)}
a, b = load(sys.argv[1]), load(sys.argv[2])
meta = gc = 0
for ino, (_, size, mtime, path) in b.items():
    if ino in a and a[ino][1:3] == [size, mtime]: continue
    if path.startswith(('packs/', 'cindex/')): gc += int(size)
    else: meta += int(size)
print(meta, gc)
EOF
}
prune_run() { # binary master: sets P_S P_RSS P_META P_GC P_WCHAR; the command's stdout in $WORK/prune.json
  local json= out
  rm -rf "$SHM/p" "$SHM/pcache"; cp -a "$2" "$SHM/p"
  if [ "$1" = "$F2" ]; then cp -a "$WORK/prune-cache" "$SHM/pcache"; json=--json; fi
  export CBTFS_CACHE_DIR=$SHM/pcache
  listing "$SHM/p" > "$WORK/before"
  # bash's /proc/PID/io includes the children it has waited for.
  out=$(timed bash -c '"$@" > "$0.json"; grep ^wchar /proc/$$/io | cut -d" " -f2' "$WORK/prune" "$1" prune "$SHM/p" --keep-last 10 $json)
  P_S=${out% *}; P_RSS=${out#* }; P_WCHAR=$(cat "$WORK/last.out")
  listing "$SHM/p" > "$WORK/after"
  read -r P_META P_GC < <(written "$WORK/before" "$WORK/after")
  rm -rf "$SHM/p" "$SHM/pcache"
  export CBTFS_CACHE_DIR=$WORK/prune-cache
}
pt1=(); pt2=(); pq=(); pw1=(); pm=(); pg=(); pw2=(); pj=(); pjg=(); pwc=(); prss=()
for ((r = 1; r <= ROUNDS; r++)); do
  prune_run "$F1" "$WORK/p1-master"; pt1+=("$P_S"); pw1+=("$((P_META + P_GC))")
  prune_run "$F2" "$WORK/p2-master"; pt2+=("$P_S"); pm+=("$P_META"); pg+=("$P_GC"); pw2+=("$((P_META + P_GC))"); pwc+=("$P_WCHAR"); prss+=("$P_RSS")
  read -r j jg < <(python3 -c "
import json; j = json.load(open('$WORK/prune.json'))
print(j.get('bytes_written', -1), (j.get('gc') or {}).get('bytes_written', -1))")
  pj+=("$j"); pjg+=("$jg")
  pq+=("$(py "print('%.4f' % (${pt2[-1]} / ${pt1[-1]}))")")
  log "  round $r: format 1 ${pt1[-1]} s (wrote $(mib "${pw1[-1]}") MiB), format 2 ${pt2[-1]} s (wrote $P_META + $P_GC bytes)"
done
mq=$(median "${pq[@]}"); mw=$(median "${pw2[@]}")
say "   prune --keep-last 10 seconds: format 1 ${pt1[*]}; format 2 (with its gc) ${pt2[*]}; per-round ratios format 2/format 1 ${pq[*]}"
say "   bytes written (new repository files): format 1 ${pw1[*]}; format 2 prune metadata ${pm[*]}, gc (cindex, packs) ${pg[*]}"
say "   format 2 JSON: bytes_written ${pj[*]}, gc.bytes_written ${pjg[*]}; wchar of the process (local cache included) ${pwc[*]}"
row "prune --keep-last 10 of 100: bytes written" "$(mib "$mw") MiB" "$(mib $bytes) MiB (disk)" "$(py "print('%.5f' % ($mw / $bytes))")" "< 0.01" "$(verdict "$mw < 0.01 * $bytes")" "-"
row "prune --keep-last 10 of 100: seconds" "$(median "${pt2[@]}")" "$(median "${pt1[@]}") (fmt 1)" "$mq" "<= 0.10" "$(verdict "$mq <= 0.1")" "$(( $(median "${prss[@]}" | cut -d. -f1) / 1024 ))"
rm -rf "$WORK/p1-master" "$WORK/p2-master" "$WORK/prune-cache"
export CBTFS_CACHE_DIR=$WORK/cache
}

############ 7. memory at 2 TiB, measured (RSS_FULL=1)
bench_7_full() {
log "row 7 (RSS_FULL): backup and mount of a 2 TiB disk with $RSS_FULL_GIB GiB allocated (nbdkit pattern) ..."
need nbdkit nbdkit
local ext=$WORK/full.extents repo=$WORK/full-repo t0 pt frt fread fbad fmr fsplit
python3 - "$RSS_FULL_GIB" > "$ext" <<'EOF'
import random, sys
n = int(sys.argv[1]) << 10; random.seed(n)
for r in sorted(random.sample(range(2 << 20), n)): print(r << 20, 1 << 20)
EOF
df -h "$WORK" | tail -1 >&2
truncate -s 2T "$WORK/full-2t.img"   # only the simulated VDI's size; holds no data
stop_host
rm -rf "$WORK/sim"; "$F2" sim --dir "$WORK/sim" --disk root="$WORK/full-2t.img" > "$WORK/sim.out" &
SIM_PID=$!
for _ in $(seq 100); do grep -q Ctrl-C "$WORK/sim.out" 2>/dev/null && break; sleep 0.1; done
URL=$(grep -o 'https://[0-9.:]*' "$WORK/sim.out" | head -1)
VDI=$(sed -n 's/.*disks: //p' "$WORK/sim.out")
TOKEN=$(grep -o 'x-sim-token: [0-9a-f-]*' "$WORK/sim.out" | cut -d' ' -f2)
nbdkit -r -f -i 127.0.0.1 -p 10821 -e disk --tls=require --tls-certificates="$WORK/pki" \
  --filter=extentlist pattern size=2T extentlist="$ext" &
QEMU_PID=$!
# nbdkit reads the 102,400-line extent list first: seconds on a loaded machine.
for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/10821) 2>/dev/null && break; sleep 0.1; done
(exec 3<>/dev/tcp/127.0.0.1/10821) 2>/dev/null || { echo "nbdkit did not start listening within 60 s" >&2; exit 1; }
curl -sfk -H "x-sim-token: $TOKEN" -X POST "$URL/sim/nbd?address=127.0.0.1&port=10821&export=disk&subject=localhost" \
  --data-binary @"$WORK/pki/server-cert.pem" > /dev/null
bk_args
rm -rf "$repo"; "$F2" init "$repo" > /dev/null
out=$(timed "$F2" backup "$repo" "${BK[@]}"); fbt=${out% *}; fbr=${out#* }
stop_host
log "  backup: $fbt s, peak RSS $fbr KiB; repository $(du -sh "$repo" | cut -f1)"
t0=$(date +%s.%N)
"$F2" mount "$repo" "$MNT"
pt=$(find "$MNT" -type f -name '*Z.raw' -print -quit)
python3 - "$pt" "$ext" > "$WORK/full.read" <<'EOF'
import random, sys
random.seed(1); bad = total = 0
with open(sys.argv[1], 'rb', buffering=0) as f:
    for line in open(sys.argv[2]):
        off, ln = map(int, line.split()[:2]); f.seek(off); pos = off
        while pos < off + ln:
            n = min(4 << 20, off + ln - pos); b = f.read(n)
            if len(b) != n: print(total, "short-read"); sys.exit()
            for _ in range(4):
                i = random.randrange(n // 8) * 8
                bad += int.from_bytes(b[i:i + 8], 'big') != pos + i
            total += n; pos += n
print(total, bad)
EOF
frt=$(py "import time; print('%.1f' % (time.time() - $t0))")
read -r fread fbad < "$WORK/full.read" || true
fread=${fread:-0}; fbad=${fbad:-no-answer}
mpid=$(mount_pid "$MNT")
fmr=$(awk '/VmHWM/ { print $2 }' "/proc/$mpid/status")
fsplit=$(awk '/RssAnon/ { a = $2 } /RssFile/ { f = $2 } END { print a "/" f }' "/proc/$mpid/status")
umount "$MNT"; rm -rf "$repo" "$WORK/full-2t.img"
say "7. MEASURED: 2 TiB virtual disk with $RSS_FULL_GIB GiB allocated (nbdkit pattern, 1 MiB runs): backup over NBD $fbt s, peak RSS $fbr KiB"
say "   mount: read $fread bytes through the raw file in $frt s, $fbad words not the pattern; VmHWM $fmr KiB (now anonymous/file-backed KiB: $fsplit)"
row "2 TiB backup peak RSS MiB ($RSS_FULL_GIB GiB data)" "$((fbr / 1024))" "-" "-" "<= 256" "$(verdict "$fbr <= 256 * 1024")" "$((fbr / 1024))"
row "2 TiB mount peak RSS MiB (read all, pattern ok)" "$((fmr / 1024))" "$fbad bad words" "-" "<= 256" "$(verdict "$fmr <= 256 * 1024 and '$fbad' == '0' and $fread == $RSS_FULL_GIB << 30")" "$((fmr / 1024))"
}

############ 7. memory at 2 TiB (scaled; RSS_FULL=1: measured)
bench_7() {
if [ "$RSS_FULL" = 1 ]; then
  bench_7_full
  [ "${#MOUNT_ROW[@]}" = 0 ] && { mount_ready; drop_chain; }
  row "${MOUNT_ROW[@]}"
  return
fi
log "row 7: backup and mount of a 2 TiB disk, data ${RSS_DATA_MB} MiB ..."
sparse2t() { # file data_mib seed: 2 TiB holding data_mib MiB in 1 MiB runs at random offsets; offsets in file.runs
  [ -f "$1.runs" ] && return
  python3 - "$1" "$2" "$3" <<'EOF'
import os, random, sys
path, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]); random.seed(seed)
runs = sorted(random.sample(range(2 << 20), mib))
with open(path, 'wb') as f:
    f.truncate(2 << 40)
    for r in runs: f.seek(r << 20); f.write(os.urandom(1 << 20))
open(path + '.runs', 'w').write('\n'.join(str(r) for r in runs) + '\n')
EOF
}
bx=(); brss=(); mrss=(); manon=(); btime=()
for dm in $RSS_DATA_MB; do
  B=$WORK/big-$dm.img; sparse2t "$B" "$dm" "$dm"
  start_host "$B"
  f2init "$SHM/big"
  out=$(timed "$F2" backup "$SHM/big" "${BK[@]}"); btime+=("${out% *}"); brss+=("${out#* }")
  stop_host
  "$F2" mount "$SHM/big" "$MNT"
  pt=$(find "$MNT" -type f -name '*Z.raw' -print -quit)
  python3 - "$pt" "$B.runs" <<'EOF'
import sys
with open(sys.argv[1], 'rb', buffering=0) as f:
    for r in open(sys.argv[2]):
        f.seek(int(r) << 20); f.read(1 << 20)
EOF
  mpid=$(mount_pid "$MNT"); mrss+=("$(awk '/VmHWM/ { print $2 }' "/proc/$mpid/status")")
  manon+=("$(awk '/RssAnon/ { a = $2 } /RssFile/ { f = $2 } END { print a "/" f }' "/proc/$mpid/status")")
  umount "$MNT"; rm -rf "$SHM/big" "$B" "$B.runs"; bx+=("$dm")
  log "  $dm MiB: backup ${btime[-1]} s, RSS ${brss[-1]} KiB; mount VmHWM ${mrss[-1]} KiB"
done
# Linear through the smallest and largest size, evaluated at 5% of 2 TiB (at least the largest seen).
extra() { py "
x = [$(IFS=,; echo "${bx[*]}")]; y = [$(IFS=,; echo "$*")]
x0, x1, y0, y1 = x[0], x[-1], y[0], y[-1]
s = (y1 - y0) / (x1 - x0) if x1 != x0 else 0
print(round(max(y0 + s * (104857.6 - x0), max(y)) / 1024))"; }
eb=$(extra "${brss[@]}"); em=$(extra "${mrss[@]}")
say "7. SCALED: 2 TiB virtual disks holding ${bx[*]} MiB of data (not 5% = 100 GiB); backup over NBD ${btime[*]} s"
say "   peak RSS KiB: backup ${brss[*]}; mount (VmHWM after reading all the data) ${mrss[*]} (of which now anonymous/file-backed: ${manon[*]}); extrapolated linearly to 100 GiB of data: backup $eb MiB, mount $em MiB"
# No verdict from a scaled run: bounded caches fill up between the two sizes, so a straight
# line through them overstates 100 GiB (measured directly: see RSS_FULL=1).
row "2 TiB backup peak RSS MiB (scaled, extrapolated)" "$eb" "$(( ${brss[-1]} / 1024 )) at ${bx[-1]} MiB" "-" "<= 256" "RSS_FULL=1" "$(( ${brss[-1]} / 1024 ))"
row "2 TiB mount peak RSS MiB (scaled, extrapolated)" "$em" "$(( ${mrss[-1]} / 1024 )) at ${bx[-1]} MiB" "-" "<= 256" "RSS_FULL=1" "$(( ${mrss[-1]} / 1024 ))"
[ "${#MOUNT_ROW[@]}" = 0 ] && { mount_ready; drop_chain; }
row "${MOUNT_ROW[@]}"
}

############ 8. import --raw of a sparse 2 TiB file holding 96 MiB
bench_8() {
log "row 8: import --raw of 2 TiB sparse with 96 MiB ..."
B=$WORK/big-96.img; sparse2t "$B" 96 96
it=(); irss=0; itimeout=
for ((r = 1; r <= ROUNDS; r++)); do
  f2init "$SHM/imp"
  if out=$(timed timeout "$IMPORT_TIMEOUT" "$F2" import "$SHM/imp" --vdi a0a0a0a0-0000-4000-8000-000000000001 --raw "$B"); then
    it+=("${out% *}"); irss=$(py "print(max($irss, ${out#* }))")
  else
    it+=("$IMPORT_TIMEOUT"); itimeout=" (timed out or failed)"; log "  import failed or timed out after $IMPORT_TIMEOUT s"; rm -rf "$SHM/imp"; break
  fi
  rm -rf "$SHM/imp"
done
mi=$(median "${it[@]}")
say "8. import --raw of a 2 TiB sparse file with 96 MiB: ${it[*]} s$itimeout"
rm -f "$B" "$B.runs"
row "import --raw, 2 TiB sparse, 96 MiB data, s" "$mi${itimeout:+ (>)}" "-" "-" "<= 10" "$(verdict "$mi <= 10")" "$((irss / 1024))"
}

for n in $ONLY; do "bench_$n"; done

say ""
say "sizes: SIZE_MB=$SIZE_MB ROUNDS=$ROUNDS DEPTH=$DEPTH USR_DIR=$USR_DIR RSS_DATA_MB=($RSS_DATA_MB) QUICK=$QUICK; format 1 = $F1_COMMIT; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
fmt="%-48s %14s %22s %8s %9s %6s %16s"
say "$(printf "$fmt" what cbtfs reference ratio target result "RSS MiB")"
for x in "${ROWS[@]}"; do
  IFS='|' read -r a b c d e f g <<< "$x"
  say "$(printf "$fmt" "$a" "$b" "$c" "$d" "$e" "$f" "$g")"
done
