#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (root; Debian's slurmctld, slurmd, munge).
# For testing distgen's launchers: one node named after this host, with all its CPUs,
# in a partition "debug". Idempotent: a running cluster is left as it is.
set -euo pipefail
host=$(hostname -s)
cpus=$(nproc)
conf=/etc/slurm/slurm.conf
if scontrol ping 2>/dev/null | grep -q UP && sinfo -h -o %T 2>/dev/null | grep -qv -e down -e drain; then
  echo "local SLURM already up"; exit 0
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat > "$conf" <<CONF
ClusterName=distgen-local
SlurmctldHost=$host
AuthType=auth/munge
# A requeued job waits this long before it starts again (default 120 s): short for a test cluster.
AuthInfo=cred_expire=10
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# Look at pending (e.g. requeued) jobs every few seconds rather than every minute.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
KillWait=30
MinJobAge=600
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
[ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" || /usr/sbin/munged --force
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -q -e idle -e mix -e alloc; then
    echo "local SLURM up: node $host ($cpus CPUs), partition debug"; exit 0
  fi
  scontrol update nodename="$host" state=resume 2>/dev/null || true
  sleep 1
done
echo "local SLURM did not come up; see /var/log/slurm/" >&2
exit 1
