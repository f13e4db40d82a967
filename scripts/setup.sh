#!/usr/bin/env bash
# Install the system packages cbtfs's demo and tests use (Debian/Ubuntu; needs root or sudo).
# Idempotent: installs only what is missing.
set -euo pipefail

pkgs=(e2fsprogs fuse3 util-linux fdisk gdisk lvm2 kmod fio nbdkit nbd-server libnbd-bin openssl curl strace
      xfsprogs btrfs-progs dosfstools ntfs-3g fusefat fuse2fs time)
# Ceph's S3 gateway for the object-storage tests (scripts/rgw.sh runs a throwaway cluster);
# installed without recommends (they pull in a whole storage admin toolbox).
ceph_pkgs=(ceph-mon ceph-osd radosgw ceph-common)
missing=()
missing_ceph=()
if command -v dpkg >/dev/null; then
  for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  for p in "${ceph_pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing_ceph+=("$p")
  done
fi
missing_all=("${missing[@]}" "${missing_ceph[@]}")
need_qemu=0
command -v qemu-img >/dev/null || need_qemu=1
sudo=""
if { [ ${#missing_all[@]} -gt 0 ] || [ $need_qemu = 1 ]; } && [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "setup: FAILED: not root and no sudo; install these as root: ${missing_all[*]} qemu-utils" >&2
    exit 1
  fi
fi
if { [ ${#missing_all[@]} -gt 0 ] || [ $need_qemu = 1 ]; } && ! command -v apt-get >/dev/null; then
  echo "setup: FAILED: no apt-get here; install: ${missing_all[*]} qemu-utils (or your system's names for them)" >&2
  exit 1
fi
if [ ${#missing_all[@]} -gt 0 ] || [ $need_qemu = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  if [ $need_qemu = 1 ] && grep -q bookworm /etc/os-release 2>/dev/null; then
    # qemu 10 comes from bookworm-backports.
    echo "deb http://deb.debian.org/debian bookworm-backports main" |
      $sudo tee /etc/apt/sources.list.d/cbtfs-backports.list >/dev/null
  fi
  $sudo apt-get update -qq
  [ ${#missing[@]} -gt 0 ] && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  [ ${#missing_ceph[@]} -gt 0 ] &&
    $sudo apt-get install -y -qq --no-install-recommends "${missing_ceph[@]}" >/dev/null
  if [ $need_qemu = 1 ]; then
    $sudo apt-get install -y -qq -t bookworm-backports qemu-utils >/dev/null 2>&1 ||
      $sudo apt-get install -y -qq qemu-utils >/dev/null
  fi
fi

# Whatever happened above, check that every tool the demo and tests run is really there: a
# machine that lost a package must fail here, loudly, not later as a skipped test.
tools=(mkfs.ext4 debugfs e2fsck xfs_repair ntfsfix fsck.vfat btrfs fuse2fs fusermount3 losetup sfdisk sgdisk pvcreate fio nbdkit nbd-server
       nbdcopy openssl curl strace mkfs.xfs mkfs.btrfs mkfs.vfat ntfs-3g mkntfs fusefat setpriv
       qemu-img qemu-nbd /usr/bin/time ceph-mon ceph-osd radosgw radosgw-admin ceph ceph-authtool monmaptool)
absent=()
for t in "${tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null 2>&1 ||
    absent+=("$t")
done
if [ ${#absent[@]} -gt 0 ]; then
  echo "setup: FAILED: still missing after installing: ${absent[*]}" >&2
  exit 1
fi
