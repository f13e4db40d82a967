#!/usr/bin/env bash
# A pool's backup: `cbtfs job run` (disks in parallel, one login, one lock) against the same
# disks backed up one after another with `cbtfs backup --vm`, in the same run.
#
# Method (run the same way every time):
#   * `cbtfs sim` runs the host; VMS VMs (vm-01 ...) each get 2 disks of DISK_MB MiB of random
#     data (`/sim/add_vm`), every disk its own bytes.
#   * Two repositories, each with its own snapshots on the host (a repository's snapshots are
#     tagged with its id): JOB is written by `cbtfs job run bench` (concurrency CONCURRENCY,
#     4 NBD connections per disk, lowered to fit 16 in all), SEQ by `cbtfs backup --vm NAME`
#     for each VM in turn (4 connections).
#   * Both take their full bases first (not timed). Then each of ROUNDS rounds: the guests
#     write 5% of every disk's 64 KiB blocks (a sparse delta file per disk, new random data,
#     `/sim/write_file`), then the job runs (timed), then the sequential backups (timed).
#     Both read exactly the blocks CBT reports since their own last point: the same 5%.
#   * Times are wall clock of whole commands (login, snapshots, list_changed_blocks, NBD,
#     commits with fsync, data_destroy, logout). The ratio is job / sequential, per round;
#     the target is <= 0.4.
#   * Repositories in WORK (default /var/tmp; put it on /dev/shm to take the disk out).
# Usage: scripts/bench-jobs.sh [WORKDIR]       QUICK=1: 4 VMs x 2 disks of 16 MiB, 1 round.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/cbtfs-bench-jobs}
if [ -n "${QUICK:-}" ]; then VMS=${VMS:-4}; DISK_MB=${DISK_MB:-16}; ROUNDS=${ROUNDS:-1}; fi
VMS=${VMS:-20}
DISK_MB=${DISK_MB:-256}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-4}
cargo build --release --quiet
CBTFS=$PWD/target/release/cbtfs
mkdir -p "$WORK"; cd "$WORK"
export CBTFS_KEY_FILE=$WORK/key     # made by the first `cbtfs init`

blocks=$((DISK_MB * 16))
echo "making $((VMS * 2)) disks of $DISK_MB MiB ..."
for i in $(seq -f %02g "$VMS"); do
  for d in root data; do
    img=img-$i-$d.raw
    [ -f "$img" ] && [ "$(stat -c %s "$img")" = $((DISK_MB << 20)) ] || head -c $((DISK_MB << 20)) /dev/urandom > "$img"
  done
done
# delta-R-I-D.raw: 5% of the blocks, new random data, the rest a hole.
python3 - "$blocks" "$VMS" "$ROUNDS" <<'EOF'
import os, random, sys
blocks, vms, rounds = map(int, sys.argv[1:])
for r in range(1, rounds + 1):
    for i in range(1, vms + 1):
        for d in ("root", "data"):
            name = f"delta-{r}-{i:02d}-{d}.raw"
            if os.path.exists(name) and os.path.getsize(name) == blocks * 65536:
                continue
            random.seed(f"{r}-{i}-{d}")
            with open(name, "wb") as f:
                f.truncate(blocks * 65536)
                for b in sorted(random.sample(range(blocks), blocks // 20)):
                    f.seek(b * 65536); f.write(os.urandom(65536))
EOF

cleanup() { [ -n "${SIM_PID:-}" ] && kill "$SIM_PID" 2>/dev/null || true; }
trap cleanup EXIT
rm -rf sim job-repo seq-repo
"$CBTFS" sim --dir "$WORK/sim" --vm-name vm-01 --disk root="$WORK/img-01-root.raw" --disk data="$WORK/img-01-data.raw" > sim.out &
SIM_PID=$!
for _ in $(seq 300); do grep -q Ctrl-C sim.out 2>/dev/null && break; sleep 0.1; done
URL=$(grep -o 'https://[0-9.:]*' sim.out | head -1)
TOKEN=$(grep -o 'x-sim-token: [0-9a-f-]*' sim.out | cut -d' ' -f2)
ctl() { curl -sfk -H "x-sim-token: $TOKEN" -X POST "$URL/sim/$1"; }
# VDI uuids, "INDEX DISK UUID" per line (the root disk first, as added).
read -r r1 d1 <<< "$(sed -n 's/.*disks: //p' sim.out)"
printf '1 root %s\n1 data %s\n' "$r1" "$d1" > vdis.txt
for i in $(seq 2 "$VMS"); do
  ii=$(printf %02d "$i")
  ctl "add_vm?name=vm-$ii&disks=root=$WORK/img-$ii-root.raw,data=$WORK/img-$ii-data.raw" |
    python3 -c "import json, sys; v = json.load(sys.stdin)['vdis']; print(f'$i root {v[0]}'); print(f'$i data {v[1]}')" >> vdis.txt
done
vdi_of() { awk -v i="$1" -v d="$2" '$1 == i && $2 == d { print $3 }' vdis.txt; }

"$CBTFS" init "$WORK/job-repo" > /dev/null
"$CBTFS" init "$WORK/seq-repo" > /dev/null
cat > cbtfs.toml <<EOF
[host.sim]
url = "$URL"
user = "root"
password_file = "$WORK/sim/password"

[repository.job]
path = "$WORK/job-repo"
key_file = "$CBTFS_KEY_FILE"

[job.bench]
host = "sim"
repository = "job"
vms = ["vm-*"]
concurrency = $CONCURRENCY
connections = 4
report = "$WORK/report.json"
EOF

secs() { local t0 t1; t0=$(date +%s.%N); "$@" > "$WORK/last.out" 2>&1 || { echo "failed: $*" >&2; tail -5 "$WORK/last.out" >&2; exit 1; }; t1=$(date +%s.%N); python3 -c "print(round($t1 - $t0, 2))"; }
job() { "$CBTFS" job run bench --config "$WORK/cbtfs.toml"; }
sequential() {
  for i in $(seq -f %02g "$VMS"); do
    "$CBTFS" backup "$WORK/seq-repo" --host "$URL" --password-file "$WORK/sim/password" --vm "vm-$i" --connections 4
  done
}

echo "bases: job $(secs job) s, sequential $(secs sequential) s (not compared: first backups)"
printf '%-6s %10s %14s %7s\n' round "job s" "sequential s" ratio
for r in $(seq "$ROUNDS"); do
  for i in $(seq "$VMS"); do
    ii=$(printf %02d "$i")
    for d in root data; do
      ctl "write_file?vdi=$(vdi_of "$i" "$d")&path=$WORK/delta-$r-$ii-$d.raw" > /dev/null
    done
  done
  tj=$(secs job)
  python3 -c "import json; r = json.load(open('$WORK/report.json')); assert r['outcome'] == 'ok', r['errors']; assert all(d['kind'] == 'incremental' for d in r['disks'])"
  ts=$(secs sequential)
  printf '%-6s %10s %14s %7s\n' "$r" "$tj" "$ts" "$(python3 -c "print(round($tj / $ts, 2))")"
done
echo "(target: ratio <= 0.4; $((VMS * 2)) disks of $DISK_MB MiB, 5% changed, concurrency $CONCURRENCY)"
