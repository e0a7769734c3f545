#!/bin/bash
# Start a Slurm on localhost (munged, slurmctld, and one slurmd per node) for the
# @pytest.mark.slurm tests, after /work/shared/docs/slurm-localhost.md. Needs root; installs
# Debian's slurm-wlm and munge when they are missing. Idempotent: daemons that already run (by
# their PID files) are left alone. Stop with tests/slurm/stop.sh.
#
#   SLURM_NODES=2 bash tests/slurm/start.sh
#
#   SLURM_NODES      nodes (default 1, named after this host). With more, every node is a slurmd
#                    of its own on this machine, named ci-node1, ci-node2, ... and added to
#                    /etc/hosts as 127.0.0.1, so that multi-node jobs run for real; each node
#                    offers all of this machine's CPUs.
#   SLURM_STATE_DIR  state, spool, PID and log files (default /tmp/slurm)
set -euo pipefail

state=${SLURM_STATE_DIR:-/tmp/slurm}
nodes=${SLURM_NODES:-1}
conf=/etc/slurm/slurm.conf

running() {  # running PIDFILE: the process named in PIDFILE is alive
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

if [ "$(id -u)" -ne 0 ]; then
  echo "error: $0 must run as root (it starts munged, slurmctld and slurmd)" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

if running "$state/slurmctld.pid"; then
  # keep the cluster that runs; stop.sh first to change its nodes
  mapfile -t names < <(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$conf")
  nodes=${#names[@]}
elif [ "$nodes" -eq 1 ]; then
  names=("$(hostname -s)")
else
  names=()
  for i in $(seq 1 "$nodes"); do
    names+=("ci-node$i")
  done
  # torchrun's rendezvous reaches the first node by its Slurm name.
  if ! getent hosts "${names[@]}" >/dev/null; then
    echo "127.0.0.1 ${names[*]}  # tests/slurm/start.sh" >> /etc/hosts
  fi
fi

mkdir -p "$state/ctld" "$state/log"

# Debian's munge package creates the key at install; make one only where it is missing.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
if ! running /run/munge/munged.pid; then
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
fi

if ! running "$state/slurmctld.pid"; then
  host=$(hostname -s)
  mem_mb=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
  mkdir -p "$(dirname "$conf")"
  # cred_expire=10: a requeued job starts again after ~10 s instead of ~2 min.
  cat > "$conf" <<CONF
ClusterName=ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d-%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/log/jobcomp.txt
SchedulerType=sched/backfill
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
PartitionName=debug Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP
CONF
  port=17000
  for name in "${names[@]}"; do
    port=$((port + 1))
    echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN" >> "$conf"
  done
  # -i: ignore state left by an earlier start that was not stopped cleanly
  /usr/sbin/slurmctld -i
fi
for name in "${names[@]}"; do
  mkdir -p "$state/d-$name"
  running "$state/slurmd-$name.pid" || /usr/sbin/slurmd -N "$name"
done

for _ in $(seq 1 120); do
  usable=$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated|completing)$' || true)
  if [ "$usable" -ge "$nodes" ]; then
    sinfo
    exit 0
  fi
  sleep 0.5
done
echo "error: the Slurm nodes did not come up within 60 s; see $state/log/" >&2
exit 1
