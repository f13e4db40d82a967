#!/usr/bin/env bash
# Install cbtfs and its mount(8) helper: PREFIX/bin/cbtfs and /sbin/mount.cbtfs, the man pages
# (PREFIX/share/man/man1) and the bash, zsh and fish completions. Then `mount -t cbtfs REPO DIR`
# and fstab lines work. Needs root for the default places.
#
#   PREFIX=/usr/local   where cbtfs, its man pages and completions go
#   DESTDIR=            a staging root prepended to every path (packaging; no root needed)
#   CBTFS_BIN=          an already built cbtfs to install (default: build target/release/cbtfs)
#   CBTFS_CONFIG=       the backup jobs' configuration (default /etc/cbtfs/cbtfs.toml): when it
#                       exists, a systemd service and timer per scheduled job are written to
#                       DESTDIR/UNIT_DIR and, unless DESTDIR is set, the timers are enabled
#   UNIT_DIR=           where those units go (default /etc/systemd/system)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
if [[ -z ${CBTFS_BIN:-} ]]; then
  cargo build --release --quiet
  CBTFS_BIN=target/release/cbtfs
fi
root="$DESTDIR$PREFIX"
install -d "$root/bin" "$DESTDIR/sbin" "$root/share/man/man1" \
  "$root/share/bash-completion/completions" "$root/share/zsh/site-functions" \
  "$root/share/fish/vendor_completions.d"
install -m 0755 "$CBTFS_BIN" "$root/bin/cbtfs"
install -m 0755 mount-helper/mount.cbtfs "$DESTDIR/sbin/mount.cbtfs"
# Generated from the binary's own definitions, so they match the installed version.
man=$(mktemp -d)
trap 'rm -rf "$man"' EXIT
"$CBTFS_BIN" man "$man" >/dev/null
install -m 0644 "$man"/*.1 "$root/share/man/man1/"
"$CBTFS_BIN" completions bash >"$root/share/bash-completion/completions/cbtfs"
"$CBTFS_BIN" completions zsh >"$root/share/zsh/site-functions/_cbtfs"
"$CBTFS_BIN" completions fish >"$root/share/fish/vendor_completions.d/cbtfs.fish"
chmod 0644 "$root/share/bash-completion/completions/cbtfs" \
  "$root/share/zsh/site-functions/_cbtfs" "$root/share/fish/vendor_completions.d/cbtfs.fish"
echo "installed $root/bin/cbtfs, $DESTDIR/sbin/mount.cbtfs, man pages in $root/share/man/man1, completions for bash, zsh and fish"

# Backup jobs: a service and a timer per job with a schedule, running the installed cbtfs.
config=${CBTFS_CONFIG:-/etc/cbtfs/cbtfs.toml}
unitdir=$DESTDIR${UNIT_DIR:-/etc/systemd/system}
if [[ -f $config ]]; then
  install -d "$unitdir"
  written=$("$root/bin/cbtfs" job units --config "$config" --dir "$unitdir" --bin "$PREFIX/bin/cbtfs")
  timers=()
  while IFS= read -r f; do
    [[ $f == *.timer ]] && timers+=("$(basename "$f")")
  done <<<"$written"
  if ((${#timers[@]} == 0)); then
    echo "no job in $config has a schedule: no timers installed"
  elif [[ -z $DESTDIR && -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable --now "${timers[@]}"
    echo "enabled ${timers[*]} (systemctl list-timers 'cbtfs-job-*' shows the next runs)"
  else
    echo "wrote ${timers[*]} to $unitdir; enable them where systemd runs with:"
    echo "  systemctl daemon-reload && systemctl enable --now ${timers[*]}"
  fi
fi
