#!/usr/bin/env bash
# A throwaway single-node Ceph cluster serving S3 (radosgw) on loopback, for tests, the demo and
# benchmarks. Everything lives under DIR; nothing under /etc/ceph or /var/lib/ceph is touched.
#
#   scripts/rgw.sh start DIR   start it (or report the one already running there) and write
#                              DIR/env: CBTFS_S3_ENDPOINT, AWS_ACCESS_KEY_ID,
#                              AWS_SECRET_ACCESS_KEY, AWS_REGION (also printed, one per line)
#   scripts/rgw.sh stop DIR    stop the daemons by the pids in DIR/run/*.pid (never by name);
#                              DIR is left for inspection (logs in DIR/log)
#   scripts/rgw.sh status DIR  exit 0 if radosgw answers
#
# Monitor + one OSD on memstore (data in RAM, RGW_MEMSTORE_MB, default 2048) + radosgw; cephx
# on; one replica; small placement-group counts; tuned for 2 cores. Beast runs with
# tcp_nodelay=1: with Nagle's algorithm on (its default), a small response written in two parts
# waits for the client's delayed ACK, ~40 ms per request (a mount of 100 points' manifests took
# 5 s instead of 0.25 s; a copy of 100 small points 32 s instead of 9.5 s). Ports are chosen
# free on 127.0.0.1. The S3 user is `cbtfs` with random keys. Ceph >= 16 (Debian's packages:
# scripts/setup.sh installs ceph-mon ceph-osd radosgw ceph-common).
set -euo pipefail

PATH="$PATH:/usr/sbin:/sbin:/usr/bin"

die() { echo "rgw.sh: $*" >&2; exit 1; }

usage() { die "usage: rgw.sh start|stop|status DIR"; }

[ $# -eq 2 ] || usage
cmd=$1
dir=$2
[ -n "$dir" ] || usage

for t in ceph-mon ceph-osd radosgw ceph ceph-authtool monmaptool radosgw-admin; do
  command -v "$t" >/dev/null 2>&1 ||
    { [ "$cmd" = stop ] && continue; die "$t is not installed; run scripts/setup.sh (packages ceph-mon ceph-osd radosgw ceph-common)"; }
done

# A free TCP port on 127.0.0.1 (bound and released; the daemon binds it right after).
free_port() {
  python3 - <<'EOF' 2>/dev/null || shuf -i 20000-60000 -n 1
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

# Is the process of pid file $1 alive?
alive() {
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# Does radosgw answer on $1 (the endpoint URL)?
answers() {
  curl -s -o /dev/null --max-time 2 "$1" 2>/dev/null
}

stop() {
  [ -d "$dir" ] || return 0
  local pids=() p
  for f in "$dir"/run/rgw.pid "$dir"/run/osd.pid "$dir"/run/mon.pid; do
    if alive "$f"; then
      p=$(cat "$f")
      kill -TERM "$p" 2>/dev/null || true
      pids+=("$p")
    fi
  done
  # Wait for them to go (memstore needs no flush), then force.
  for _ in $(seq 1 50); do
    local left=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ $left = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -f "$dir"/run/*.pid
}

write_env() {
  local endpoint=$1 access=$2 secret=$3
  umask 077
  {
    echo "CBTFS_S3_ENDPOINT=$endpoint"
    echo "AWS_ACCESS_KEY_ID=$access"
    echo "AWS_SECRET_ACCESS_KEY=$secret"
    echo "AWS_REGION=us-east-1"
  } > "$dir/env.tmp"
  mv "$dir/env.tmp" "$dir/env"
}

start() {
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ -s "$dir/env" ] && alive "$dir/run/rgw.pid"; then
    local ep
    ep=$(sed -n 's/^CBTFS_S3_ENDPOINT=//p' "$dir/env")
    if answers "$ep"; then
      cat "$dir/env"
      return 0
    fi
  fi
  # Whatever ran here before is replaced by a fresh cluster.
  stop
  rm -rf "$dir"/{mon,osd,rgw,run,log,crash,ceph.conf,keyring,monmap,env}
  mkdir -p "$dir"/{mon,osd,rgw,run,log,crash}
  chmod 700 "$dir"

  local fsid mon_port rgw_port conf
  fsid=$(cat /proc/sys/kernel/random/uuid)
  mon_port=$(free_port)
  rgw_port=$(free_port)
  while [ "$rgw_port" = "$mon_port" ]; do rgw_port=$(free_port); done
  conf="$dir/ceph.conf"
  cat > "$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$mon_port]
mon initial members = a
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
run dir = $dir/run
crash dir = $dir/crash
log file = $dir/log/\$name.log
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd crush chooseleaf type = 0
ms bind ipv6 = false

[mon]
pid file = $dir/run/mon.pid
admin socket = $dir/run/\$name.asok
mon data = $dir/mon/\$cluster-\$id
mon cluster log file = $dir/log/cluster.log

[osd]
pid file = $dir/run/osd.pid
admin socket = $dir/run/\$name.asok
osd data = $dir/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = $(( ${RGW_MEMSTORE_MB:-2048} * 1024 * 1024 ))
osd op num shards = 2
osd op num threads per shard = 2
osd memory target = 939524096

[client.rgw.a]
pid file = $dir/run/rgw.pid
admin socket = $dir/run/\$name.asok
rgw data = $dir/rgw
rgw frontends = beast endpoint=127.0.0.1:$rgw_port tcp_nodelay=1
rgw enable apis = s3, admin
rgw dns name = 127.0.0.1
log file = $dir/log/rgw.log
EOF
  export CEPH_CONF="$conf"

  # One keyring with every entity: ceph-mon --mkfs imports them all.
  local kr="$dir/keyring"
  ceph-authtool --create-keyring "$kr" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$kr" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
    --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$kr" --gen-key -n osd.0 --cap mon 'allow profile osd' \
    --cap osd 'allow *' --cap mgr 'allow profile osd' >/dev/null
  ceph-authtool "$kr" --gen-key -n client.rgw.a --cap mon 'allow rw' --cap osd 'allow rwx' \
    --cap mgr 'allow rw' >/dev/null
  chmod 600 "$kr"

  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
  mkdir -p "$dir/mon/ceph-a"
  ceph-mon --mkfs -i a --monmap "$dir/monmap" --keyring "$kr" >"$dir/log/mkfs-mon.log" 2>&1 ||
    die "ceph-mon --mkfs failed; see $dir/log/mkfs-mon.log"
  ceph-mon -i a 2>>"$dir/log/start.log" || die "ceph-mon did not start; see $dir/log/mon.a.log"

  # The monitor answers (cephx, the admin key).
  local ok=0
  for _ in $(seq 1 100); do
    if timeout 5 ceph -s --connect-timeout 3 >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
  done
  [ $ok = 1 ] || die "the monitor does not answer on port $mon_port; see $dir/log/mon.a.log"

  local uuid
  uuid=$(cat /proc/sys/kernel/random/uuid)
  mkdir -p "$dir/osd/ceph-0"
  local id
  id=$(ceph osd new "$uuid" 0 2>"$dir/log/osd-new.log") ||
    die "ceph osd new failed; see $dir/log/osd-new.log"
  [ "$id" = 0 ] || die "ceph osd new gave id $id, expected 0"
  ceph-osd -i 0 --mkfs --osd-uuid "$uuid" >"$dir/log/mkfs-osd.log" 2>&1 ||
    die "ceph-osd --mkfs failed; see $dir/log/mkfs-osd.log"
  ceph-osd -i 0 2>>"$dir/log/start.log" || die "ceph-osd did not start; see $dir/log/osd.0.log"

  ok=0
  for _ in $(seq 1 150); do
    if ceph osd dump 2>/dev/null | grep -q '^osd\.0 up'; then ok=1; break; fi
    sleep 0.2
  done
  [ $ok = 1 ] || die "osd.0 did not come up; see $dir/log/osd.0.log"

  radosgw -n client.rgw.a 2>>"$dir/log/start.log" || die "radosgw did not start; see $dir/log/rgw.log"
  local endpoint="http://127.0.0.1:$rgw_port"
  ok=0
  for i in $(seq 1 300); do
    if answers "$endpoint"; then ok=1; break; fi
    alive "$dir/run/rgw.pid" || [ "$i" -lt 20 ] || die "radosgw exited; see $dir/log/rgw.log"
    sleep 0.2
  done
  [ $ok = 1 ] || die "radosgw does not answer at $endpoint; see $dir/log/rgw.log"

  local access secret
  access=$(head -c 15 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F)
  secret=$(head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n')
  radosgw-admin user create --uid cbtfs --display-name cbtfs --access-key "$access" \
    --secret-key "$secret" >"$dir/log/user.log" 2>&1 ||
    die "radosgw-admin user create failed; see $dir/log/user.log"
  write_env "$endpoint" "$access" "$secret"
  cat "$dir/env"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status)
    [ -s "$dir/env" ] || exit 1
    answers "$(sed -n 's/^CBTFS_S3_ENDPOINT=//p' "$dir/env")"
    ;;
  *) usage ;;
esac
