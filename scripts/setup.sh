#!/usr/bin/env bash
# Install the system packages cbtfs's demo and tests use (Debian/Ubuntu; needs root or sudo).
# Idempotent: installs only what is missing.
set -euo pipefail

pkgs=(e2fsprogs fuse3 util-linux fdisk gdisk lvm2 kmod fio nbdkit nbd-server libnbd-bin openssl curl strace
      xfsprogs btrfs-progs dosfstools ntfs-3g fusefat fuse2fs)
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    echo "setup: not root and no sudo; install these yourself: ${pkgs[*]} qemu-utils" >&2
    exit 0
  fi
fi
command -v apt-get >/dev/null || { echo "setup: no apt-get; install: ${pkgs[*]} qemu-utils" >&2; exit 0; }

missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
need_qemu=0
command -v qemu-img >/dev/null || need_qemu=1
if [ ${#missing[@]} -gt 0 ] || [ $need_qemu = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  if [ $need_qemu = 1 ] && grep -q bookworm /etc/os-release 2>/dev/null; then
    # qemu 10 comes from bookworm-backports.
    echo "deb http://deb.debian.org/debian bookworm-backports main" |
      $sudo tee /etc/apt/sources.list.d/cbtfs-backports.list >/dev/null
  fi
  $sudo apt-get update -qq
  [ ${#missing[@]} -gt 0 ] && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  if [ $need_qemu = 1 ]; then
    $sudo apt-get install -y -qq -t bookworm-backports qemu-utils >/dev/null 2>&1 ||
      $sudo apt-get install -y -qq qemu-utils >/dev/null
  fi
fi
