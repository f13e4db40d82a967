#!/usr/bin/env bash
# Install cbtfs and its mount(8) helper: /usr/local/bin/cbtfs and /sbin/mount.cbtfs.
# Then `mount -t cbtfs REPO DIR` and fstab lines work. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
install -m 0755 target/release/cbtfs /usr/local/bin/cbtfs
install -m 0755 mount-helper/mount.cbtfs /sbin/mount.cbtfs
echo "installed /usr/local/bin/cbtfs and /sbin/mount.cbtfs"
