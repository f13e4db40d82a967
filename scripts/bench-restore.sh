#!/usr/bin/env bash
# Restore and prune on a 4 GiB disk with 100 points.
#
# Method (run the same way every time):
#   * A chain of 100 points of a 4 GiB disk of random data: a full base, then 99 increments of
#     64 random blocks each (`cbtfs import --bitmap`), repository on /var/tmp.
#   * Restore: `cbtfs restore` of the newest point (depth 100) into a new VDI of a `cbtfs sim`
#     host, beside `curl -T` of the equivalent raw file (the same bytes, from the page cache) to
#     `/import_raw_vdi` of another new VDI of the same host. Both end in the same host handler;
#     the ratio is cbtfs throughput / curl throughput. Best of RUNS.
#   * Prune: `cbtfs prune --keep-last 10` of a copy of that repository (90 points removed, the
#     first kept one rewritten as a full base), time and peak RSS from /usr/bin/time.
# Usage: scripts/bench-restore.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/cbtfs-bench-restore}
SIZE_MB=${SIZE_MB:-4096}
DEPTH=${DEPTH:-100}
RUNS=${RUNS:-3}
cargo build --release --quiet
CBTFS=$PWD/target/release/cbtfs
mkdir -p "$WORK"; cd "$WORK"
V=c0ffee00-0000-4000-8000-00000000be57
blocks=$((SIZE_MB * 16))
if [ ! -f repo/.built ]; then
  rm -rf repo disk.img
  head -c $((SIZE_MB << 20)) /dev/urandom > disk.img
  "$CBTFS" init repo > /dev/null
  "$CBTFS" import repo --vdi $V --name root --raw disk.img --time 2026-01-01T00:00:00Z > /dev/null
  for ((i = 1; i < DEPTH; i++)); do
    python3 - "$blocks" "$i" <<'EOF'
import base64, os, random, sys
blocks, i = int(sys.argv[1]), int(sys.argv[2]); random.seed(i)
bits = bytearray((blocks + 7) // 8)
with open('disk.img', 'r+b') as f:
    for b in random.sample(range(blocks), 64):
        f.seek(b * 65536); f.write(os.urandom(65536)); bits[b // 8] |= 0x80 >> (b % 8)
open('bitmap', 'w').write(base64.b64encode(bits).decode())
EOF
    "$CBTFS" import repo --vdi $V --raw disk.img --bitmap bitmap \
      --time "$(date -u -d "2026-01-01 + $i hours" +%Y-%m-%dT%H:%M:%SZ)" > /dev/null
  done
  touch repo/.built
fi
cat disk.img > /dev/null

cleanup() { [ -n "${SIM_PID:-}" ] && kill "$SIM_PID" 2>/dev/null || true; }
trap cleanup EXIT
# A new simulated host each run, with a new certificate: forget the previous pin.
rm -rf sim empty.img repo/hosts; truncate -s 1M empty.img
"$CBTFS" sim --dir "$WORK/sim" --disk root="$WORK/empty.img" > sim.out &
SIM_PID=$!
for _ in $(seq 100); do grep -q Ctrl-C sim.out 2>/dev/null && break; sleep 0.1; done
URL=$(grep -o 'https://[0-9.:]*' sim.out | head -1)
# A session and a new VDI, as a script would make them (JSON-RPC).
api() { python3 - "$URL" "$(cat sim/password)" "$@" <<'EOF'
import json, ssl, sys, urllib.request
url, pw, what = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl._create_unverified_context()
def call(m, *p):
    r = urllib.request.urlopen(urllib.request.Request(url + "/jsonrpc", json.dumps(
        {"jsonrpc": "2.0", "method": m, "params": list(p), "id": 1}).encode(),
        {"content-type": "application/json"}), context=ctx)
    return json.load(r)["result"]
s = call("session.login_with_password", "root", pw, "2.21", "bench")
vm = call("VM.get_record", s, call("VM.get_by_name_label", s, "sim-vm")[0])
vdi = call("VBD.get_record", s, vm["VBDs"][0])["VDI"]
sr = call("VDI.get_record", s, vdi)["SR"]
if what == "sr":
    print(call("SR.get_uuid", s, sr))
elif what == "destroy":
    call("VDI.destroy", s, call("VDI.get_by_uuid", s, sys.argv[4]))
else:
    v = call("VDI.create", s, {"SR": sr, "virtual_size": str(int(sys.argv[4])), "type": "user",
        "sharable": False, "read_only": False, "other_config": {}, "name_label": "curl"})
    print(s, call("VDI.get_uuid", s, v))
EOF
}
SR=$(api sr)
secs() { local t0 t1; t0=$(date +%s.%N); "$@" > /dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }; t1=$(date +%s.%N); python3 -c "print($t1 - $t0)"; }
min() { python3 -c "import sys; print(min(float(x) for x in sys.argv[1:]))" "$@"; }
bytes=$((SIZE_MB << 20))
POINT="$V@latest"
curl_put() { curl -sfk -T disk.img "$URL/import_raw_vdi?session_id=$1&vdi=$2&format=raw"; }
restore() { "$CBTFS" restore repo "$POINT" --host "$URL" --password-file sim/password --new-vdi --sr "$SR" --json > restored.json; }
tc=(); tr=()
for ((r = 0; r < RUNS; r++)); do
  # Both sources warm in the page cache; each new VDI destroyed after its run (its layer file
  # would otherwise crowd the page cache).
  cat repo/disks/*/*/*.data > /dev/null
  tr+=("$(secs restore)")
  api destroy "$(python3 -c "import json; print(json.load(open('restored.json'))['vdi'])")"
  cat disk.img > /dev/null
  read -r S U < <(api create $bytes)
  tc+=("$(secs curl_put "$S" "$U")")
  api destroy "$U"
done
r=$(min "${tr[@]}"); c=$(min "${tc[@]}")
echo "restore of a ${SIZE_MB} MiB point at depth $DEPTH (best of $RUNS)"
printf "%-36s %8.2f s %8.0f MB/s\n" "cbtfs restore (incl. API, read-back)" "$r" "$(python3 -c "print($bytes / $r / 1e6)")"
printf "%-36s %8.2f s %8.0f MB/s\n" "curl -T raw file (page cache)" "$c" "$(python3 -c "print($bytes / $c / 1e6)")"
echo "ratio cbtfs/curl throughput: $(python3 -c "print('%.2f' % ($c / $r))")"
kill "$SIM_PID"; SIM_PID=
rm -rf sim

rm -rf prune-repo; cp -a repo prune-repo; sync
echo "prune --keep-last 10 of $DEPTH points:"
/usr/bin/time -f "  %e s elapsed, %M KiB peak RSS" "$CBTFS" prune prune-repo --keep-last 10
rm -rf prune-repo
