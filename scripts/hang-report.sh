#!/usr/bin/env bash
# What a hung test run is doing: processes with their wait channels, the kernel stacks of those
# in uninterruptible sleep, FUSE and loop state, the kernel's last messages. For test.sh's
# watchdog; safe to run by hand at any time.
set -u
echo "== processes"
ps -eo pid,ppid,pgid,stat,wchan:28,etimes,args --forest | grep -v ' \[.*\]$' | cut -c1-220
echo "== kernel stacks of blocked (D) processes"
for d in /proc/[0-9]*; do
  st=$(awk '/^State:/ {print $2}' "$d/status" 2>/dev/null)
  [ "$st" = D ] || continue
  echo "-- ${d#/proc/}: $(tr '\0' ' ' < "$d/cmdline" 2>/dev/null | cut -c1-160)"
  cat "$d/stack" 2>/dev/null
done
echo "== user stacks of test and cbtfs processes (threads' wait channels)"
for p in $(pgrep -f 'suite-|cbtfs' 2>/dev/null); do
  echo "-- $p: $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-160)"
  for t in /proc/"$p"/task/*; do
    printf '   %s %s %s\n' "${t##*/}" "$(cat "$t/comm" 2>/dev/null)" "$(cat "$t/wchan" 2>/dev/null)"
  done
done
echo "== FUSE and loop mounts"
grep -E 'fuse|/dev/loop' /proc/self/mountinfo
echo "== loop devices"
losetup -a 2>/dev/null
echo "== FUSE connections (waiting requests)"
for c in /sys/fs/fuse/connections/*; do
  [ -e "$c/waiting" ] && echo "${c##*/}: waiting $(cat "$c/waiting")"
done
echo "== kernel messages"
dmesg 2>/dev/null | tail -40
