#!/usr/bin/env bash
# File-level recovery: `cbtfs browse` and `cbtfs diff` beside libguestfs and plain loop mounts.
#
# Method (run the same way every time; needs root):
#   * A 1 GiB GPT disk with one ext4 partition holding 10,000 small files (100 folders) and a
#     200 MiB file of random data: point A. Point B: 1% of the files changed (100 rewritten,
#     20 added, 20 removed = 140 changes), imported as an increment with the blocks that differ
#     as its CBT bitmap. Repository on /var/tmp.
#   * Open + list: time from the command's start until a file inside is readable, then
#     `find | wc -l` of the whole tree. Large read: `cat` of the 200 MiB file to /dev/null.
#     Page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`) before each tool's run.
#     Tools: `guestmount -a A.raw -m /dev/sda1 --ro` (libguestfs, TCG: this VM cannot run
#     KVM guests), a loop mount of a plain raw copy of A (`losetup -o`; the limit), and
#     `cbtfs browse` (kernel ext4 through the overlay) and `cbtfs browse --userspace` (fuse2fs).
#   * Diff: `cbtfs diff REPO A B`, beside `diff -r` of the two points browsed with cbtfs
#     (browse time not counted) and `virt-ls -lR --checksum` of both images (libguestfs has
#     no diff for data disks: virt-diff wants an operating system). Outputs compared.
# libguestfs: install `libguestfs-tools linux-image-amd64 qemu-system-x86` from
# bookworm-backports (see below); skipped with a message if absent.
# Usage: [RUNS=3] [GUESTFS=0] scripts/bench-flr.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/cbtfs-bench-flr}
RUNS=${RUNS:-3}
GUESTFS=${GUESTFS:-1}   # 0: skip libguestfs (its virt-ls pass takes minutes)
cargo build --release --quiet
CBTFS=$PWD/target/release/cbtfs
export LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg
mkdir -p "$WORK"; cd "$WORK"
V=f11e0000-0000-4000-8000-00000000f11e
PART_START=2048

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

if [ ! -f built ]; then
  rm -rf repo A.raw B.raw mnt
  truncate -s 1G A.raw
  sgdisk -n1:$PART_START:0 A.raw > /dev/null   # (-q makes sgdisk write nothing)
  PART_SECTORS=$(sgdisk -i1 A.raw | awk '/^Partition size/ {print $3}')
  echo "$PART_SECTORS" > part-sectors
  L=$(losetup -f --show -o $((PART_START * 512)) --sizelimit $((PART_SECTORS * 512)) A.raw)
  mkfs.ext4 -q "$L"
  mkdir -p mnt && mount "$L" mnt
  python3 - mnt <<'EOF'
import os, random, sys
root = sys.argv[1]; random.seed(1)
for d in range(100):
    os.makedirs(f"{root}/d{d:03}", exist_ok=True)
    for f in range(100):
        with open(f"{root}/d{d:03}/f{f:03}", "wb") as fh:
            fh.write(random.randbytes(random.randint(200, 12000)))
with open(f"{root}/big.bin", "wb") as fh:
    fh.write(os.urandom(200 << 20))
EOF
  umount mnt; losetup -d "$L"
  "$CBTFS" init repo > /dev/null
  "$CBTFS" import repo --vdi $V --name data --raw A.raw --time 2026-01-01T00:00:00Z > /dev/null
  cp --sparse=always A.raw B.raw
  L=$(losetup -f --show -o $((PART_START * 512)) --sizelimit $((PART_SECTORS * 512)) B.raw)
  mount "$L" mnt
  python3 - mnt <<'EOF'
import os, random, sys
root = sys.argv[1]; random.seed(2)
files = [f"{root}/d{d:03}/f{f:03}" for d in range(100) for f in range(100)]
random.shuffle(files)
for p in files[:100]:
    with open(p, "r+b") as fh:
        fh.seek(random.randint(0, 150)); fh.write(random.randbytes(40))
for p in files[100:120]:
    os.remove(p)
for i in range(20):
    with open(f"{root}/d{i:03}/new{i}", "wb") as fh:
        fh.write(random.randbytes(3000))
EOF
  umount mnt; losetup -d "$L"
  python3 - <<'EOF'
import base64
bs = 65536
with open("A.raw", "rb") as a, open("B.raw", "rb") as b:
    size = a.seek(0, 2); a.seek(0)
    blocks = (size + bs - 1) // bs
    bits = bytearray((blocks + 7) // 8)
    for i in range(blocks):
        if a.read(bs) != b.read(bs):
            bits[i // 8] |= 0x80 >> (i % 8)
open("B.b64", "w").write(base64.b64encode(bits).decode())
EOF
  "$CBTFS" import repo --vdi $V --raw B.raw --bitmap B.b64 --time 2026-01-02T00:00:00Z > /dev/null
  touch built
fi
PA="$V@2026-01-01T00:00:00Z"
PB="$V@2026-01-02T00:00:00Z"
mkdir -p m1 m2

# open_list NAME MOUNT_CMD DIR: time to first file + find, then large read, then UNMOUNT_CMD.
measure() {
  local name=$1 dir=$2 mountcmd=$3 umountcmd=$4
  drop
  local t0; t0=$(now)
  eval "$mountcmd" > /dev/null
  local waited=0
  while ! head -c1 "$dir/d000/f000" > /dev/null 2>&1; do
    sleep 0.01; waited=$((waited + 1))
    [ $waited -lt 60000 ] || { echo "$name: nothing readable after 600 s" >&2; exit 1; }
  done
  local t_open; t_open=$(since "$t0")
  local t1; t1=$(now)
  local n; n=$(find "$dir" | wc -l)
  local t_find; t_find=$(since "$t1")
  local t2; t2=$(now)
  cat "$dir/big.bin" > /dev/null
  local t_big; t_big=$(since "$t2")
  eval "$umountcmd" > /dev/null
  printf '%-26s first file %7.3f s  find (%d entries) %7.3f s  open+list %7.3f s  200 MiB read %7.3f s (%4.0f MB/s)\n' \
    "$name" "$t_open" "$n" "$t_find" "$(echo "$t_open + $t_find" | bc)" "$t_big" "$(echo "209.7152 / $t_big" | bc -l)"
}

echo "== open, list, read (page cache dropped before each; $RUNS rounds, tools interleaved) =="
for ((r = 1; r <= RUNS; r++)); do
  measure "loop mount of raw copy" m1 \
    "L=\$(losetup -f --show -r -o $((PART_START * 512)) --sizelimit $(($(cat part-sectors) * 512)) A.raw); mount -o ro,noload \$L m1" \
    "umount m1; losetup -d \$L"
  measure "cbtfs browse" m1/p1 \
    "$CBTFS browse repo $PA m1 | grep 'mounted  p1' > /dev/null" "$CBTFS browse --unmount m1"
  measure "cbtfs browse --userspace" m1/p1 \
    "$CBTFS browse --userspace repo $PA m1 | grep 'mounted  p1' > /dev/null" "$CBTFS browse --unmount m1"
done
if [ "$GUESTFS" = 1 ] && command -v guestmount > /dev/null; then
  measure "guestmount --ro" m1 \
    "guestmount -a A.raw -m /dev/sda1 --ro m1" "guestunmount m1"
else
  echo "guestmount: skipped (GUESTFS=0, or libguestfs-tools from bookworm-backports not installed)"
fi

echo "== diff A → B =="
drop
t0=$(now); "$CBTFS" diff repo "$PA" "$PB" > diff.cbtfs; t_cbtfs=$(since "$t0")
"$CBTFS" diff repo "$PA" "$PB" --json > diff.json
python3 - <<'EOF'
import json
j = json.load(open("diff.json"))
print("  cbtfs diff: %d changes, %d files proved unchanged by the map, %d compared by content"
      % (len(j["changes"]), j["unchanged_by_map"], j["compared_by_content"]))
EOF
"$CBTFS" browse repo "$PA" m1 > /dev/null; "$CBTFS" browse repo "$PB" m2 > /dev/null
drop
t0=$(now); (diff -r m1/p1 m2/p1 || true) > diff.r; t_r=$(since "$t0")
"$CBTFS" browse --unmount m1 > /dev/null; "$CBTFS" browse --unmount m2 > /dev/null
n_r=$(wc -l < diff.r)
printf '  cbtfs diff   %7.3f s  (%d lines)\n' "$t_cbtfs" "$(wc -l < diff.cbtfs)"
printf '  diff -r      %7.3f s  (%d lines; over the two browsed trees)  ratio %.1f×\n' "$t_r" "$n_r" "$(echo "$t_r / $t_cbtfs" | bc -l)"
if [ "$GUESTFS" = 1 ] && command -v virt-ls > /dev/null; then
  drop
  t0=$(now)
  virt-ls -a A.raw -m /dev/sda1 -lR --checksum / > ls.A
  virt-ls -a B.raw -m /dev/sda1 -lR --checksum / > ls.B
  t_g=$(since "$t0")
  n_g=$( (diff ls.A ls.B || true) | grep -c '^[<>]' || true)
  printf '  virt-ls -lR --checksum ×2 + diff  %7.3f s  (%d differing lines)  ratio %.1f×\n' "$t_g" "$n_g" "$(echo "$t_g / $t_cbtfs" | bc -l)"
fi
