#!/bin/bash
# A one-node SLURM cluster on this host, for the tests in tests/test_slurm.py.
#
#   bash scripts/slurm/local_cluster.sh up     # install if missing, start munged, slurmctld, slurmd
#   bash scripts/slurm/local_cluster.sh down   # stop the daemons this script started
#   bash scripts/slurm/local_cluster.sh env    # print the export line clients need (SLURM_CONF)
#
# Everything it writes (slurm.conf, munge key and socket, spool and state folders, pid files,
# daemon logs) lives in $UNET_SLURM_STATE (default /var/lib/unet-local-slurm), so it never
# touches /etc/slurm or a munged the machine already runs. `up` is idempotent: daemons whose pid
# file names a live process of the right program are left alone. `down` stops only the pids in
# those files. Needs root (apt-get, and SlurmUser=root keeps the daemons' permissions simple).
set -euo pipefail

STATE=${UNET_SLURM_STATE:-/var/lib/unet-local-slurm}
CONF=$STATE/slurm.conf
SOCKET=$STATE/munge/munge.socket.2
NODE=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "local_cluster: $*" >&2; }

install_missing() {
    local need=0
    for tool in slurmctld slurmd sbatch munged mungekey; do
        command -v "$tool" >/dev/null || need=1
    done
    [ "$need" = 0 ] && return
    log "installing ${PACKAGES[*]}"
    # Without systemd the packages' scripts would start their own daemons through invoke-rc.d;
    # a policy-rc.d that says "no" keeps every daemon ours (only added if the host has none).
    local policy=/usr/sbin/policy-rc.d added=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    [ "$added" = 1 ] && rm -f "$policy"
    return 0
}

# The live pid in pid file $1 if it is program $2, else nothing.
running() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}

write_conf() {
    local cpus mem
    cpus=$(nproc)
    # What slurmd itself detects, so that the node is not drained for having less than declared.
    mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mkdir -p "$STATE"/{ctld,spool,munge,log}
    chmod 0755 "$STATE" "$STATE/munge"
    cat >"$CONF" <<EOF
# Written by scripts/slurm/local_cluster.sh: one node, this host, for tests.
ClusterName=unetlocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only once its old credentials have expired (cred_expire, 120 s
# by default): SLURM's own default unless UNET_SLURM_CRED_EXPIRE asks for another (the tests
# release their requeued jobs themselves, see docs/cluster.md).
AuthInfo=socket=$SOCKET${UNET_SLURM_CRED_EXPIRE:+,cred_expire=$UNET_SLURM_CRED_EXPIRE}
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=${mem:-1000} State=UNKNOWN
# The jobs of the tests share the cores (a job waiting on a time limit barely computes).
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

start_munged() {
    [ -n "$(running "$STATE/munged.pid" munged)" ] && return
    [ -s "$STATE/munge.key" ] || mungekey --create --keyfile="$STATE/munge.key"
    chmod 0600 "$STATE/munge.key"
    munged --force --key-file="$STATE/munge.key" --socket="$SOCKET" --pid-file="$STATE/munged.pid" \
        --log-file="$STATE/log/munged.log" --seed-file="$STATE/munged.seed"
}

start_slurm() {
    if [ -z "$(running "$STATE/slurmctld.pid" slurmctld)" ]; then
        slurmctld -f "$CONF"
    fi
    if [ -z "$(running "$STATE/slurmd.pid" slurmd)" ]; then
        slurmd -f "$CONF" -N "$NODE"
    fi
}

wait_idle() {
    local state=""
    for _ in $(seq 120); do
        state=$(SLURM_CONF=$CONF sinfo -h -N -n "$NODE" -o %t 2>/dev/null || true)
        case "$state" in
            idle*|mix*|alloc*) log "node $NODE is $state (SLURM_CONF=$CONF)"; return 0 ;;
        esac
        sleep 0.5
    done
    log "node $NODE did not become idle (state: '${state:-no answer}'); logs in $STATE/log"
    return 1
}

up() {
    [ "$(id -u)" = 0 ] || { log "needs root"; exit 1; }
    install_missing
    # slurm.conf is rewritten only while slurmctld is down: a running controller keeps its file.
    [ -n "$(running "$STATE/slurmctld.pid" slurmctld)" ] || write_conf
    start_munged
    start_slurm
    wait_idle
}

down() {
    local file prog pid
    for file in slurmd slurmctld munged; do
        prog=$file
        pid=$(running "$STATE/$file.pid" "$prog") || { rm -f "$STATE/$file.pid"; continue; }
        kill -TERM "$pid"
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$prog ($pid) did not stop on SIGTERM; killing it"
            kill -KILL "$pid"
        fi
        rm -f "$STATE/$file.pid"
        log "stopped $prog ($pid)"
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
