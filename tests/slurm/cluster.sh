#!/usr/bin/env bash
# A real one-node Slurm cluster on localhost, for the Slurm integration tests.
#
#   tests/slurm/cluster.sh start    write the configs, start munged, slurmctld, slurmd; wait for "idle"
#   tests/slurm/cluster.sh status   daemons, sinfo, squeue
#   tests/slurm/cluster.sh stop     cancel the cluster's jobs, stop the daemons this script started
#
# Installs nothing (tests/slurm/install.sh does). Needs root: the configuration must live at
# /etc/slurm/slurm.conf, because the Snakemake Slurm executor removes SLURM_CONF from the
# environment of the jobs it submits. The node is "localhost" with the machine's CPUs and memory
# and one fake GPU (gres.conf File=/dev/null), so that `--gpus=1` requests schedule; one
# partition, "debug". No slurmdbd: job status comes from squeue (see slurm/config.yaml).
#
# Environment: XRAI_SLURM_STATE  state, logs and pid files (default /tmp/xrai-slurm)
#              XRAI_SLURM_FORCE=1  overwrite an /etc/slurm/slurm.conf that this script did not write
set -euo pipefail

STATE="${XRAI_SLURM_STATE:-/tmp/xrai-slurm}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# written by xrai tests/slurm/cluster.sh"
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
PARTITION=debug
START_TIMEOUT=60

unset SLURM_CONF  # every command here must read $CONF, like the jobs do
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in /usr/sbin

die() { echo "cluster.sh: $*" >&2; exit 1; }

pid_alive() {  # pid_alive FILE: the pid in FILE is a running process
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

mark_started() { mkdir -p "$STATE"; grep -qx "$1" "$STATE/started" 2>/dev/null || echo "$1" >>"$STATE/started"; }
we_started() { grep -qx "$1" "$STATE/started" 2>/dev/null; }

write_configs() {
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF" && [ "${XRAI_SLURM_FORCE:-0}" != 1 ]; then
        die "$CONF exists and was not written by this script; set XRAI_SLURM_FORCE=1 to overwrite it"
    fi
    local cpus mem
    cpus=$(nproc)
    # RealMemory as slurmd measures it: a larger value would drain the node ("Low RealMemory").
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [ -n "$mem" ] || die "could not read RealMemory from 'slurmd -C'"
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/slurmd"
    cat >"$CONF" <<EOF
$MARKER (state in $STATE)
ClusterName=xrai-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# No cgroups in containers: track job processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
# No slurmdbd: sacct has nothing to report, so Snakemake asks squeue (slurm/config.yaml).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# Finished jobs stay visible to squeue for an hour: Snakemake's status checks must see them
# (3 x slurm-init-seconds-before-status-checks at least), and the tests check them afterwards.
MinJobAge=3600
# Time limit or scancel: SIGTERM, then SIGKILL after KillWait seconds (Slurm's default; training
# finishes its step and checkpoints meanwhile).
KillWait=30
GresTypes=gpu
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    # A fake GPU: enough for the scheduler to grant --gpus=1; the job sees no CUDA device.
    cat >"$CONF_DIR/gres.conf" <<EOF
$MARKER
NodeName=localhost Name=gpu File=/dev/null
EOF
    # slurm.conf holds no secrets; the daemons refuse a world-writable one.
    chmod 644 "$CONF" "$CONF_DIR/gres.conf"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already serving this machine: use it, leave it running
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chown munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chmod 755 "$MUNGE_RUN"
    runuser -u munge -- /usr/sbin/munged
    mark_started munged
    local i
    for i in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not answer (see /var/log/munge/munged.log)"
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mixed|allocated) return 0 ;;
            drain*|down*|fail*)
                sinfo -R >&2 || true
                tail -n 20 "$STATE/slurmd.log" >&2 || true
                die "node localhost is $state" ;;
        esac
        sleep 0.2
    done
    tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
    die "node localhost not idle after ${START_TIMEOUT}s (state: ${state:-none})"
}

start() {
    [ "$(id -u)" -eq 0 ] || die "start needs root (it writes $CONF and runs the daemons)"
    command -v slurmctld >/dev/null || die "Slurm is not installed; run tests/slurm/install.sh"
    if pid_alive "$STATE/slurmctld.pid" && pid_alive "$STATE/slurmd.pid"; then
        wait_idle
        echo "cluster.sh: already running (partition $PARTITION)"
        return 0
    fi
    write_configs
    start_munge
    if ! pid_alive "$STATE/slurmctld.pid"; then
        rm -rf "$STATE/ctld" && mkdir -p "$STATE/ctld"  # a fresh cluster: no jobs left from before
        slurmctld -i
        mark_started slurmctld
    fi
    if ! pid_alive "$STATE/slurmd.pid"; then
        slurmd -N localhost
        mark_started slurmd
    fi
    wait_idle
    echo "cluster.sh: running (partition $PARTITION, state in $STATE)"
}

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, wait, then SIGKILL
    local name=$1 file=$2 pid i
    if ! we_started "$name"; then return 0; fi
    if pid_alive "$file"; then
        pid=$(cat "$file")
        kill "$pid" 2>/dev/null || true
        for i in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    sed -i "/^$name\$/d" "$STATE/started"
}

stop() {
    if pid_alive "$STATE/slurmctld.pid"; then
        # Jobs left by a failed test would keep their processes (slurmstepd) alive.
        local jobs i
        jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ' || true)
        if [ -n "${jobs// /}" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for i in $(seq 450); do  # up to 45 s: KillWait (30 s) and some
                [ -z "$(squeue -h -t running,completing -o '%A' 2>/dev/null)" ] && break
                sleep 0.1
            done
        fi
    fi
    stop_pid slurmd "$STATE/slurmd.pid"
    stop_pid slurmctld "$STATE/slurmctld.pid"
    stop_pid munged "$MUNGE_PID"
    echo "cluster.sh: stopped"
}

status() {
    local name file
    for name in munged slurmctld slurmd; do
        case $name in
            munged) file=$MUNGE_PID ;;
            *) file="$STATE/$name.pid" ;;
        esac
        if pid_alive "$file"; then echo "$name: running (pid $(cat "$file"))"; else echo "$name: stopped"; fi
    done
    if pid_alive "$STATE/slurmctld.pid"; then
        sinfo
        squeue
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
