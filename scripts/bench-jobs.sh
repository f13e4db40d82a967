#!/usr/bin/env bash
# A pool's backup (issue 20's figures, one row each): `cbtfs job run` against the same disks
# backed up one after another; a VM deleted mid-run; a host that drops NBD connections; the
# health check of a job's points.
#
# Method (run the same way every time; every row has a simulated host of its own, `cbtfs sim`,
# holding VMS VMs vm-01 ... with 2 disks each, root and data, every disk its own DISK_MB MiB
# image (`/sim/add_vm`); each row its own repository, encrypted with one key file):
#   1. job vs one after another: the disks hold random data. Two repositories, each with its
#      own snapshots on the host (a repository's snapshots are tagged with its id): JOB is
#      written by `cbtfs job run bench` (concurrency CONCURRENCY, 4 NBD connections per disk,
#      lowered to fit 16 in all), SEQ by `cbtfs backup --vm NAME` for each VM in turn
#      (4 connections).
#      Both take their full bases first (not timed). Then each of ROUNDS rounds: the guests
#      write 5% of every disk's 64 KiB blocks (a sparse delta file per disk, new random data,
#      `/sim/write_file`), then the job runs (timed), then the sequential backups (timed).
#      Both read exactly the blocks CBT reports since their own last point: the same 5%.
#      Times are wall clock of whole commands (login, snapshots, list_changed_blocks, NBD,
#      commits with fsync, data_destroy, logout). The ratio is job / sequential, per round;
#      the table shows the median of the rounds; the target is <= 0.4.
#   2. a VM deleted mid-run: the disks of row 1 (random data), the same job (concurrency
#      CONCURRENCY). Its full bases first (not timed, all must commit); the guests write round
#      1's 5%; then the host is told to uninstall the middle VM (vm-MM, MM = VMS/2 + 1) with
#      its disks at the first `VDI.snapshot` of one of them (`/sim/faults?delete_vm=`), and the
#      job runs (timed). Checked: the exit status is 3 (some failed) and the report's outcome
#      `partial`; every disk of the other VMs committed an incremental point, and each of those
#      points is listed by `cbtfs ls --json` (the report's point, on that disk's VDI); every
#      failed disk belongs to vm-MM, its error names the VM and says it was deleted, and at
#      least one of its disks failed (the other may commit if its snapshot came first); the
#      terminal summary names vm-MM's disk and says FAILED.
#   3. NBD connections dropped: the disks of row 1, the same job (concurrency CONCURRENCY,
#      4 connections per disk), the host dropping every NBD connection after NBD_DROP_AFTER
#      requests (`/sim/faults?nbd_drop_after=`; the client reconnects). Two runs: the full
#      bases, then after the guests wrote round 1's 5%, the incrementals. After each run every
#      committed point is exported (`cbtfs export REPO POINT -`) and compared byte for byte
#      (`cmp`) with what the disk holds: its image, overlaid by round 1's written blocks for the
#      second run. Stated: the points committed and failed of each run, the connections the
#      host dropped (`/sim/stats`: connections closed with a read unanswered); the target is
#      every committed point exact (and the row fails if nothing committed, nothing was
#      dropped, or a run's exit status is neither 0 nor 3).
#   4. health check: each disk holds a whole-disk ext4 of DISK_MB MiB made by
#      `mkfs.ext4 -d` from a directory of a few files (a text file, 1 MiB of random bytes, a
#      nested directory, a symlink), no partition table. The job's full bases (not timed), then
#      `cbtfs job check health --json` (concurrency CONCURRENCY; each point's volume found as
#      `browse` finds it and served as a copy-on-write file by a private FUSE mount of the
#      browse overlay, `e2fsck -fn` run on that file) is timed and must find all clean. Then one filesystem is damaged by its guest: vm-MM's root disk
#      gets the blocks that differ after `debugfs -w -R 'set_inode_field <2> links_count 7'`
#      on a copy of its image (the root directory's link count, which e2fsck -n reports), the
#      job runs again (incrementals), and `job check` is timed again: it must report that disk
#      damaged and only it. Stated: seconds per point (the second check's wall time / points),
#      and the check's own `seconds`.
#   Repositories in WORK (default /var/tmp; put it on /dev/shm to take the disk out). Each
#   row's directory (its host's disks, its repositories) is removed when the row ends unless
#   KEEP=1; the source images stay for the next run.
# Results: one table at the end (standard output and WORK/results.txt); progress on stderr.
# Usage: scripts/bench-jobs.sh [WORKDIR]   (root: row 4 mounts FUSE; e2fsprogs, curl, python3)
#   QUICK=1: 4 VMs x 2 disks of 16 MiB, 1 round, NBD_DROP_AFTER=2 (a smoke run).
#   Also settable: VMS, DISK_MB, ROUNDS, CONCURRENCY, NBD_DROP_AFTER (default 8; 1 MiB requests for a base), ONLY (rows,
#   e.g. ONLY="2 3 4"), CBTFS (a prebuilt binary instead of building this tree).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/cbtfs-bench-jobs}
if [ -n "${QUICK:-}" ]; then VMS=${VMS:-4}; DISK_MB=${DISK_MB:-16}; ROUNDS=${ROUNDS:-1}; NBD_DROP_AFTER=${NBD_DROP_AFTER:-2}; fi
VMS=${VMS:-20}
DISK_MB=${DISK_MB:-256}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-4}
NBD_DROP_AFTER=${NBD_DROP_AFTER:-8}
ONLY=${ONLY:-1 2 3 4}
on() { [[ " $ONLY " == *" $1 "* ]]; }
if on 4; then
  [ "$(id -u)" = 0 ] || { echo "row 4 mounts guest filesystems: run as root (or ONLY=\"1 2 3\")" >&2; exit 1; }
  for t in mkfs.ext4 debugfs e2fsck; do command -v $t > /dev/null || { echo "row 4 needs $t (e2fsprogs)" >&2; exit 1; }; done
fi
if [ -n "${CBTFS:-}" ]; then CBTFS=$(realpath "$CBTFS"); else cargo build --release --quiet; CBTFS=$PWD/target/release/cbtfs; fi
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd); cd "$WORK"
export CBTFS_KEY_FILE=$WORK/key     # made by the first `cbtfs init`
RESULTS=$WORK/results.txt
log() { echo "[$(date +%T)] $*" >&2; }
ROWS=()
row() { ROWS+=("$1|$2|$3|$4|$5"); } # row what measured target result
verdict() { python3 -c "print('pass' if $1 else 'FAIL')"; }
MID=$(printf %02d $((VMS / 2 + 1)))   # the VM rows 2 and 4 pick on
DISKS=$((VMS * 2))

blocks=$((DISK_MB * 16))
# img-I-D.raw: random data (rows 1-3), kept between runs when the size fits.
make_random_images() {
  log "making $DISKS disks of $DISK_MB MiB of random data ..."
  for i in $(seq -f %02g "$VMS"); do
    for d in root data; do
      img=img-$i-$d.raw
      [ -f "$img" ] && [ "$(stat -c %s "$img")" = $((DISK_MB << 20)) ] || head -c $((DISK_MB << 20)) /dev/urandom > "$img"
    done
  done
}
# delta-R-I-D.raw: 5% of the blocks, new random data, the rest a hole.
make_deltas() {
  python3 - "$blocks" "$VMS" "$1" <<'EOF'
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
}

SIM_PID=
stop_sim() { [ -n "$SIM_PID" ] && { kill "$SIM_PID" 2>/dev/null || true; wait "$SIM_PID" 2>/dev/null || true; }; SIM_PID=; }
# end_row NAME: stop its host and remove WORK/NAME (the host's disks and the repositories, ~20 GiB
# a row at full size; a whole run kept them all and filled a 92 GB disk) unless KEEP=1.
end_row() { stop_sim; [ -n "${KEEP:-}" ] || rm -rf "${WORK:?}/$1"; }
trap stop_sim EXIT
# start_sim NAME PREFIX: a host in WORK/NAME with VMS VMs whose disks are PREFIX-I-D.raw;
# sets URL, TOKEN and NAME/vdis.txt ("INDEX DISK UUID" per line, the root disk first).
start_sim() {
  stop_sim
  local dir=$WORK/$1
  rm -rf "$dir"; mkdir -p "$dir"
  "$CBTFS" sim --dir "$dir/sim" --vm-name vm-01 --disk root="$WORK/$2-01-root.raw" --disk data="$WORK/$2-01-data.raw" > "$dir/sim.out" &
  SIM_PID=$!
  for _ in $(seq 300); do grep -q Ctrl-C "$dir/sim.out" 2>/dev/null && break; sleep 0.1; done
  URL=$(grep -o 'https://[0-9.:]*' "$dir/sim.out" | head -1)
  TOKEN=$(grep -o 'x-sim-token: [0-9a-f-]*' "$dir/sim.out" | cut -d' ' -f2)
  local r1 d1
  read -r r1 d1 <<< "$(sed -n 's/.*disks: //p' "$dir/sim.out")"
  printf '1 root %s\n1 data %s\n' "$r1" "$d1" > "$dir/vdis.txt"
  for i in $(seq 2 "$VMS"); do
    local ii; ii=$(printf %02d "$i")
    ctl "add_vm?name=vm-$ii&disks=root=$WORK/$2-$ii-root.raw,data=$WORK/$2-$ii-data.raw" |
      python3 -c "import json, sys; v = json.load(sys.stdin)['vdis']; print(f'$i root {v[0]}'); print(f'$i data {v[1]}')" >> "$dir/vdis.txt"
  done
}
ctl() { curl -sfk -H "x-sim-token: $TOKEN" -X POST "$URL/sim/$1"; }
vdi_of() { awk -v i="$((10#$2))" -v d="$3" '$1 == i && $2 == d { print $3 }' "$WORK/$1/vdis.txt"; }
# write_round ROW R: every guest writes round R's delta.
write_round() {
  for i in $(seq -f %02g "$VMS"); do
    for d in root data; do
      ctl "write_file?vdi=$(vdi_of "$1" "$i" "$d")&path=$WORK/delta-$2-$i-$d.raw" > /dev/null
    done
  done
}
# config ROW JOB: a repository WORK/ROW/repo (made now) and job JOB taking every VM.
config() {
  "$CBTFS" init "$WORK/$1/repo" > /dev/null
  cat > "$WORK/$1/cbtfs.toml" <<EOF
[host.sim]
url = "$URL"
user = "root"
password_file = "$WORK/$1/sim/password"

[repository.main]
path = "$WORK/$1/repo"
key_file = "$CBTFS_KEY_FILE"

[job.$2]
host = "sim"
repository = "main"
vms = ["vm-*"]
concurrency = $CONCURRENCY
connections = 4
report = "$WORK/$1/report.json"
EOF
}
# secs CMD...: its wall time; it must succeed (its output in WORK/last.out).
secs() { local t0 t1; t0=$(date +%s.%N); "$@" > "$WORK/last.out" 2>&1 || { echo "failed: $*" >&2; tail -5 "$WORK/last.out" >&2; exit 1; }; t1=$(date +%s.%N); python3 -c "print(round($t1 - $t0, 2))"; }
# secs_rc CMD...: "SECONDS EXIT_STATUS", any exit status (output in WORK/last.out).
secs_rc() { local t0 t1 rc=0; t0=$(date +%s.%N); "$@" > "$WORK/last.out" 2>&1 || rc=$?; t1=$(date +%s.%N); python3 -c "print(round($t1 - $t0, 2), $rc)"; }
job() { "$CBTFS" job run "$2" --config "$WORK/$1/cbtfs.toml"; }

############ 1. the job vs the same disks one after another
bench_1() {
  make_random_images; make_deltas "$ROUNDS"
  start_sim row1 img
  "$CBTFS" init "$WORK/row1/seq" > /dev/null
  config row1 bench
  sequential() {
    for i in $(seq -f %02g "$VMS"); do
      "$CBTFS" backup "$WORK/row1/seq" --host "$URL" --password-file "$WORK/row1/sim/password" --vm "vm-$i" --connections 4
    done
  }
  log "row 1: bases: job $(secs job row1 bench) s, sequential $(secs sequential) s (not compared: first backups)"
  local ratios=() r tj ts
  for r in $(seq "$ROUNDS"); do
    write_round row1 "$r"
    tj=$(secs job row1 bench)
    python3 -c "import json; r = json.load(open('$WORK/row1/report.json')); assert r['outcome'] == 'ok', r['errors']; assert all(d['kind'] == 'incremental' for d in r['disks'])"
    ts=$(secs sequential)
    ratios+=("$(python3 -c "print(round($tj / $ts, 2))")")
    log "row 1: round $r: job $tj s, sequential $ts s, ratio ${ratios[-1]}"
  done
  local med
  med=$(python3 -c "import statistics, sys; print(statistics.median(map(float, sys.argv[1:])))" "${ratios[@]}")
  row 1 "job / sequential wall time, $DISKS disks, 5% changed (rounds: ${ratios[*]})" "$med" "<= 0.4" "$(verdict "$med <= 0.4")"
  end_row row1
}

############ 2. one VM deleted mid-run
bench_2() {
  make_random_images; make_deltas 1
  start_sim row2 img
  config row2 deleted
  log "row 2: bases $(secs job row2 deleted) s"
  python3 -c "import json; r = json.load(open('$WORK/row2/report.json')); assert r['outcome'] == 'ok', r['errors']"
  write_round row2 1
  ctl "faults?delete_vm=vm-$MID&delete_at=${DELETE_AT:-VDI.snapshot}" > /dev/null
  local t rc
  read -r t rc <<< "$(secs_rc job row2 deleted)"
  cp "$WORK/last.out" "$WORK/row2/run.out"
  "$CBTFS" ls "$WORK/row2/repo" --json > "$WORK/row2/ls.json"
  local got
  got=$(python3 - "$WORK/row2" "vm-$MID" "$rc" "$DISKS" <<'EOF'
import json, sys
d, vm, rc, disks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
r = json.load(open(f"{d}/report.json"))
ls = json.load(open(f"{d}/ls.json"))
out = open(f"{d}/run.out").read()
points = {}  # vdi -> point paths listed
for v in ls["vms"]:
    for k in v["disks"]:
        points[k["vdi"]] = {p["path"] for s in k["sets"] for p in s["points"]}
bad = []
ok = [x for x in r["disks"] if x["ok"]]
failed = [x for x in r["disks"] if not x["ok"]]
if rc != 3: bad.append(f"exit status {rc}, not 3")
if r["outcome"] != "partial": bad.append(f"outcome {r['outcome']}")
if len(r["disks"]) != disks: bad.append(f"{len(r['disks'])} disks in the report, not {disks}")
for x in r["disks"]:
    name = f"{x['vm']}/{x['disk']}"
    if x["vm"] != vm and not x["ok"]: bad.append(f"{name} failed: {x['error']}")
    if x["ok"]:
        if x["vm"] != vm and x["kind"] != "incremental": bad.append(f"{name}: {x['kind']}")
        if x["point"] not in points.get(x["vdi"], ()): bad.append(f"{name}: ls does not list {x['point']}")
for x in failed:
    e = x["error"] or ""
    if x["vm"] != vm: continue
    if f"VM {vm}" not in e or "deleted" not in e: bad.append(f"{x['vm']}/{x['disk']}: error {e!r}")
    if f"{x['vm']}/{x['disk']}" not in out: bad.append(f"the summary does not name {x['vm']}/{x['disk']}")
if not failed: bad.append(f"no disk of {vm} failed")
if "FAILED" not in out: bad.append("the summary does not say FAILED")
others = sum(1 for x in ok if x["vm"] != vm)
print(f"{len(ok)}/{len(r['disks'])} committed ({others} of the other VMs' {disks - 2}), {len(failed)} failed, exit {rc}")
print("; ".join(bad))
EOF
)
  local what problems
  what=$(sed -n 1p <<< "$got"); problems=$(sed -n 2p <<< "$got")
  log "row 2: job $t s: $what${problems:+; PROBLEMS: $problems}"
  row 2 "vm-$MID deleted mid-run ($t s): others committed, named" "$what" "the other disks; exit 3" "$(verdict "'$problems' == ''")"
  end_row row2
}

############ 3. NBD connections dropped
# check_points ROW ROUND: every committed point of the last run equals its disk (image, and
# round 1's blocks when ROUND is 1); prints "COMMITTED FAILED MISMATCHED".
check_points() {
  local c=0 f=0 m=0 vm disk point ok
  while read -r vm disk ok point; do
    if [ "$ok" != True ]; then f=$((f + 1)); continue; fi
    c=$((c + 1))
    local i=${vm#vm-}
    if [ "$2" = 0 ]; then
      cmp -s <("$CBTFS" export "$WORK/$1/repo" "$point" -) "$WORK/img-$i-$disk.raw" || { m=$((m + 1)); log "row 3: $point differs from its disk"; }
    else
      cmp -s <("$CBTFS" export "$WORK/$1/repo" "$point" -) <(overlay "$WORK/img-$i-$disk.raw" "$WORK/delta-1-$i-$disk.raw") || { m=$((m + 1)); log "row 3: $point differs from its disk"; }
    fi
  done < <(python3 -c "
import json
for x in json.load(open('$WORK/$1/report.json'))['disks']: print(x['vm'], x['disk'], x['ok'], x['point'])")
  echo "$c $f $m"
}
# overlay IMAGE DELTA: the image with the delta's non-zero 64 KiB blocks written over it (what
# the guest's write_file did), on stdout.
overlay() {
  python3 - "$1" "$2" <<'EOF'
import sys
zero = bytes(65536)
with open(sys.argv[1], "rb") as a, open(sys.argv[2], "rb") as b:
    out = sys.stdout.buffer
    while True:
        x, y = a.read(65536), b.read(65536)
        if not x: break
        out.write(y if y and y != zero[:len(y)] else x)
EOF
}
bench_3() {
  make_random_images; make_deltas 1
  start_sim row3 img
  config row3 drops
  ctl "faults?nbd_drop_after=$NBD_DROP_AFTER" > /dev/null
  local t rc c f m res=() bad=""
  for r in 0 1; do
    [ "$r" = 1 ] && write_round row3 1
    read -r t rc <<< "$(secs_rc job row3 drops)"
    read -r c f m <<< "$(check_points row3 "$r")"
    log "row 3: run $((r + 1)) ($([ "$r" = 0 ] && echo bases || echo incrementals)): $t s, exit $rc, $c committed, $f failed, $m not exact"
    res+=("$c/$((c + f))")
    [ "$c" -gt 0 ] || bad="nothing committed"
    [ "$m" = 0 ] || bad="$m points not exact"
    [ "$rc" = 0 ] || [ "$rc" = 3 ] || bad="exit status $rc"
  done
  local dropped
  dropped=$(ctl stats | python3 -c "import json, sys; print(json.load(sys.stdin)['nbd_dropped'])")
  [ "$dropped" -gt 0 ] || bad="no connection was dropped"
  [ -z "$bad" ] || log "row 3: PROBLEM: $bad"
  row 3 "NBD drops every $NBD_DROP_AFTER requests: committed exact" "${res[0]} + ${res[1]} committed, $dropped drops" "every point exact" "$(verdict "'$bad' == ''")"
  end_row row3
}

############ 4. health check of the job's points
# fs-I-D.raw: a whole-disk ext4 holding a few files.
make_fs_images() {
  log "making $DISKS ext4 disks of $DISK_MB MiB ..."
  for i in $(seq -f %02g "$VMS"); do
    for d in root data; do
      local img=fs-$i-$d.raw files=$WORK/files-$i-$d
      [ -f "$img" ] && [ "$(stat -c %s "$img")" = $((DISK_MB << 20)) ] && [ -f "$img.done" ] && continue
      rm -rf "$files" "$img" "$img.done"; mkdir -p "$files/etc/nested"
      echo "vm-$i $d" > "$files/etc/hostname"
      head -c 1M /dev/urandom > "$files/data.bin"
      printf 'line %s\n' $(seq 100) > "$files/etc/nested/lines.txt"
      ln -s etc/hostname "$files/link"
      truncate -s $((DISK_MB << 20)) "$img"
      mkfs.ext4 -q -F -d "$files" "$img"
      rm -rf "$files"; touch "$img.done"
    done
  done
}
# check_health ROW JOB: "WALL_SECONDS POINTS CHECK_SECONDS CLEAN DAMAGED_NAMES|- OTHER" of
# `cbtfs job check JOB --json`.
check_health() {
  local t0 t1 t
  t0=$(date +%s.%N)
  "$CBTFS" job check "$2" --config "$WORK/$1/cbtfs.toml" --json > "$WORK/$1/check.json" 2> "$WORK/$1/check.err" || true
  t1=$(date +%s.%N); t=$(python3 -c "print(round($t1 - $t0, 2))")
  python3 - "$WORK/$1/check.json" "$t" <<'EOF'
import json, sys
try: c = json.load(open(sys.argv[1]))
except ValueError: print(sys.argv[2], 0, 0, 0, "-", "no-json"); sys.exit()
pts = c["points"]
state = lambda p: (p.get("health") or {}).get("state", "error")
damaged = sorted(f"{p['vm']}/{p['disk']}" for p in pts if state(p) == "damaged")
clean = sum(1 for p in pts if state(p) == "clean")
other = len(pts) - clean - len(damaged)
print(sys.argv[2], len(pts), c["seconds"], clean, ",".join(damaged) or "-", other)
EOF
}
bench_4() {
  make_fs_images
  start_sim row4 fs
  config row4 health
  log "row 4: bases $(secs job row4 health) s"
  local t n cs clean damaged other bad=""
  read -r t n cs clean damaged other <<< "$(check_health row4 health)"
  log "row 4: check of $n points, all should be clean: $t s ($cs s by its report), $clean clean, damaged: $damaged, other: $other"
  [ "$n" = "$DISKS" ] && [ "$clean" = "$DISKS" ] || bad="first check: $clean of $n clean (damaged: $damaged)"
  # Damage vm-MM/root: the blocks debugfs changes, written by its guest.
  cp "$WORK/fs-$MID-root.raw" "$WORK/row4/damaged.raw"
  debugfs -w -R 'set_inode_field <2> links_count 7' "$WORK/row4/damaged.raw" 2> /dev/null
  python3 - "$WORK/fs-$MID-root.raw" "$WORK/row4/damaged.raw" "$WORK/row4/damage-delta.raw" <<'EOF'
import sys
n = 0
with open(sys.argv[1], "rb") as a, open(sys.argv[2], "rb") as b, open(sys.argv[3], "wb") as out:
    size = b.seek(0, 2); b.seek(0); out.truncate(size)
    off = 0
    while True:
        x, y = a.read(65536), b.read(65536)
        if not y: break
        if x != y: out.seek(off); out.write(y); n += 1
        off += len(y)
assert n > 0, "debugfs changed nothing"
EOF
  ctl "write_file?vdi=$(vdi_of row4 "$MID" root)&path=$WORK/row4/damage-delta.raw" > /dev/null
  local tj rc
  read -r tj rc <<< "$(secs_rc job row4 health)"
  [ "$rc" = 0 ] || bad="$bad; the incremental run exited $rc"
  read -r t n cs clean damaged other <<< "$(check_health row4 health)"
  local per; per=$(python3 -c "print(round($t / max($n, 1), 3))")
  log "row 4: check of $n points after damaging vm-$MID/root: $t s ($cs s by its report, $per s per point), $clean clean, damaged: $damaged, other: $other"
  [ "$damaged" = "vm-$MID/root" ] && [ "$clean" = $((DISKS - 1)) ] || bad="$bad; second check: damaged $damaged, $clean clean, $other other"
  [ -z "$bad" ] || log "row 4: PROBLEM: $bad"
  row 4 "health check of $n points, s per point; damaged named" "$per s/point (${t} s), damaged: $damaged" "stated; only vm-$MID/root" "$(verdict "'$bad' == ''")"
  end_row row4
}

for n in $ONLY; do "bench_$n"; done

{
  echo ""
  echo "sizes: VMS=$VMS x 2 disks of DISK_MB=$DISK_MB MiB, ROUNDS=$ROUNDS, CONCURRENCY=$CONCURRENCY, NBD_DROP_AFTER=$NBD_DROP_AFTER; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
  fmt="%-3s %-66s %-58s %-26s %s"
  printf "$fmt\n" row what measured target result
  for x in "${ROWS[@]}"; do
    IFS='|' read -r a b c d e <<< "$x"
    printf "$fmt\n" "$a" "$b" "$c" "$d" "$e"
  done
} | tee "$RESULTS"
