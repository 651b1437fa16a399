#!/usr/bin/env bash
# A real single-node Slurm on loopback for the Slurm executor's tests: Debian's slurmctld, slurmd
# and munge (installed idempotently with apt when missing), one private instance per directory —
# its own munge key and socket, ports, state and spool — so concurrent test runs never meet.
# No cgroups (proctrack/linuxproc, task/none); no slurmdbd: finished jobs go to a jobcomp/filetxt
# log, which `sacct --completion` reads. Two fake GPUs are gres on character devices in the dir.
#   slurm.sh start <dir> <port base>   # writes <dir>/slurm.conf; returns once the node is idle
#   slurm.sh stop <dir>
# Clients (sbatch, squeue, sacct, scancel, fuselab --executor slurm) need SLURM_CONF=<dir>/slurm.conf.
set -euo pipefail
case ${1:-} in
  start)
    dir=$(realpath -m "$2") base=$3
    if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
      cache=${FUSELAB_CACHE:-${HOME:-/tmp}/.cache/fuselab}
      mkdir -p "$cache"
      exec 9>"$cache/slurm-apt.lock"
      flock 9
      command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        || { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >&2 \
             || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >&2; }; }
      flock -u 9
    fi
    mkdir -p "$dir"/{state,spool,log,munge}
    chmod 700 "$dir/munge"
    [ -f "$dir/munge/munge.key" ] || { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none; chmod 400 "$dir/munge/munge.key"; }
    sock=$dir/munge/munge.socket
    munged --force --socket="$sock" --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
      --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
    for i in 0 1; do [ -e "$dir/gpu$i" ] || mknod "$dir/gpu$i" c 1 3; done
    node=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
    cat >"$dir/slurm.conf" <<CONF
ClusterName=fuselab
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$base
SlurmdPort=$((base + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
    cat >"$dir/gres.conf" <<CONF
NodeName=$node Name=gpu File=$dir/gpu[0-1]
CONF
    export SLURM_CONF=$dir/slurm.conf
    if ! [ -f "$dir/slurmctld.pid" ] || ! kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
      slurmctld -c -i
    fi
    if ! [ -f "$dir/slurmd.pid" ] || ! kill -0 "$(cat "$dir/slurmd.pid")" 2>/dev/null; then
      slurmd
    fi
    for _ in $(seq 120); do
      state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)
      case $state in idle|mix|alloc) exit 0 ;; esac
      sleep 0.5
    done
    echo "the Slurm node did not become idle within 60 s (state: ${state:-none})" >&2
    tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    exit 1
    ;;
  stop)
    dir=$(realpath -m "$2")
    for p in slurmd slurmctld; do
      [ -f "$dir/$p.pid" ] && kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
    done
    [ -f "$dir/munge/munged.pid" ] && kill "$(cat "$dir/munge/munged.pid")" 2>/dev/null || true
    ;;
  *) echo "usage: $0 start <dir> <port base> | stop <dir>" >&2; exit 2 ;;
esac
