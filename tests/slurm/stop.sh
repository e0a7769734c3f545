#!/bin/bash
# Stop the daemons started by tests/slurm/start.sh by their PID files (never by name, so that
# nothing else on the machine is touched), and drop the /etc/hosts names it added.
#   SLURM_STATE_DIR  as for start.sh (default /tmp/slurm)
set -euo pipefail

state=${SLURM_STATE_DIR:-/tmp/slurm}
marker="# tests/slurm/start.sh"

for pidfile in "$state"/slurmd-*.pid "$state/slurmctld.pid" /run/munge/munged.pid; do
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
done

if grep -qF "$marker" /etc/hosts; then
  # rewritten in place: /etc/hosts is often a bind mount that cannot be replaced
  kept=$(grep -vF "$marker" /etc/hosts)
  printf '%s\n' "$kept" > /etc/hosts
fi
