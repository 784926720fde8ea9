#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests (make test-slurm)
# and for trying slurm/patchsweep*.sbatch before a real cluster.
#
#   slurm/local-cluster.sh start     munged, slurmctld and slurmd; waits until the node is idle
#   slurm/local-cluster.sh stop      cancels every job, stops the daemons, leaves none behind
#   slurm/local-cluster.sh status    daemons, node and queue (exit 0 up, 3 down, 1 partly up)
#   slurm/local-cluster.sh env       prints "export SLURM_CONF=..." (eval "$(... env)")
#
# Needs root and Debian's packages: apt-get install slurmctld slurmd slurm-client munge
#
# Everything lives in one state directory, $PATCHSWEEP_SLURM_DIR (default
# /tmp/patchsweep-slurm): slurm.conf, a private munge key and socket, daemon
# logs, pid files, spool and controller state.  Nothing is written to
# /etc/slurm or /etc/munge, so a machine's own Slurm or munge, if any, is left
# alone; the clients find this cluster through $SLURM_CONF.
# $PATCHSWEEP_SLURM_PORT (default 16817) is slurmctld's port, the next one
# slurmd's: not Slurm's 6817/6818, which a real installation may be using.
#
# Why it is started by hand: containers and build machines have no systemd,
# and Debian's service scripts are blocked there, so the daemons are run
# directly (munged as user munge, slurmctld -c to forget any old state).
# There are no cgroups to rely on, hence proctrack/linuxproc, task/none and
# jobacct_gather/none.  There is no accounting (slurmdbd): wait for a job with
# `squeue -j ID` and read its end with `scontrol show job ID` (kept for
# MinJobAge = 600 s after the end).
set -u

DIR=${PATCHSWEEP_SLURM_DIR:-/tmp/patchsweep-slurm}
PORT=${PATCHSWEEP_SLURM_PORT:-16817}
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
PROG=local-cluster.sh

die() {
    echo "$PROG: $*" >&2
    exit 1
}

# A start that fails half-way stops what it started: no daemon is left
# behind, and the next start begins clean.
start_failed() {
    echo "$PROG: $*" >&2
    cmd_stop >/dev/null 2>&1
    exit 1
}

# The pid in FILE when that process is alive and is NAME (a stale pid file
# after a reboot may name another process).
live_pid() {
    local file=$1 name=$2 pid
    [ -r "$file" ] || return 1
    pid=$(cat "$file" 2>/dev/null) || return 1
    case "$pid" in '' | *[!0-9]*) return 1 ;; esac
    [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ] || return 1
    echo "$pid"
}

munged_pid() { live_pid "$DIR/run/munged.pid" munged; }
slurmctld_pid() { live_pid "$DIR/run/slurmctld.pid" slurmctld; }
slurmd_pid() { live_pid "$DIR/run/slurmd.pid" slurmd; }

# slurmstepd processes of this cluster (slurmd hands them its environment,
# whose SLURM_CONF names our slurm.conf): they outlive slurmd when killed.
stepd_pids() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
        tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF" && echo "${p#/proc/}"
    done
}

running_count() {
    local n=0
    munged_pid >/dev/null && n=$((n + 1))
    slurmctld_pid >/dev/null && n=$((n + 1))
    slurmd_pid >/dev/null && n=$((n + 1))
    echo $n
}

require_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (it starts munged, slurmctld and slurmd)"
}

require_packages() {
    local missing="" c
    for c in munged munge slurmctld slurmd sbatch squeue scontrol sinfo; do
        command -v "$c" >/dev/null || missing="$missing $c"
    done
    [ -z "$missing" ] || die "missing commands:$missing (apt-get install slurmctld slurmd slurm-client munge)"
}

# Wait up to $1 seconds for the command "$2..." to succeed.
wait_for() {
    local secs=$1
    shift
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.2
    done
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

write_config() {
    local node
    # slurmd -C describes this machine as Slurm sees it (CPUs, sockets,
    # cores, threads, memory); its first line is the node definition.
    node=$(slurmd -C 2>/dev/null | head -n 1)
    case "$node" in NodeName=*) ;; *) die "slurmd -C did not describe this node: '$node'" ;; esac
    local name=${node%% *}
    name=${name#NodeName=}
    local host
    host=$(hostname -s)
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh: a one-node cluster for tests.
ClusterName=patchsweep-local
# 127.0.0.1: works without DNS for the host name (containers).
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start
# again: 120 s by default, far longer than a one-node launch needs.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here (containers, no systemd): track job processes through
# /proc, bind no tasks, gather no usage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# Look at the queue every 2 s, not every 30-60 s: a requeued job becomes
# eligible by time (cred_expire) and only a periodic pass starts it.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A request the partition can never satisfy (too many CPUs, too long) fails
# at submission instead of pending forever.
EnforcePartLimits=ALL
# A node that was down comes back by itself when slurmd registers.
ReturnToService=2
# Jobs stay visible to scontrol show job this long after they end (there is
# no accounting database to ask later).
MinJobAge=600
# Seconds between the SIGTERM of scancel or of the time limit and SIGKILL:
# time for a sweep to finish its chunk in flight.
KillWait=30
InactiveLimit=0
SlurmdTimeout=60
$(printf '%s NodeAddr=127.0.0.1 State=UNKNOWN' "$node")
PartitionName=debug Nodes=$name Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munged() {
    munged_pid >/dev/null && return 0
    install -d -m 0755 -o munge -g munge "$DIR/munge"
    runuser -u munge -- test -x "$DIR/munge" ||
        start_failed "user munge cannot reach $DIR/munge: every directory above it must be searchable (chmod o+x)"
    # A private key for this cluster (munged refuses keys others can read).
    if [ ! -s "$DIR/munge/munge.key" ]; then
        head -c 1024 /dev/urandom >"$DIR/munge/munge.key.tmp" && mv "$DIR/munge/munge.key.tmp" "$DIR/munge/munge.key" ||
            start_failed "cannot write $DIR/munge/munge.key"
    fi
    chown munge:munge "$DIR/munge/munge.key" && chmod 0400 "$DIR/munge/munge.key"
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" ||
        start_failed "munged did not start: see $DIR/munge/munged.log"
    wait_for 10 test -s "$DIR/munge/munged.pid" || start_failed "munged wrote no pid file: see $DIR/munge/munged.log"
    cp "$DIR/munge/munged.pid" "$DIR/run/munged.pid"
    wait_for 10 bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'" ||
        start_failed "munged does not answer on $MUNGE_SOCKET: see $DIR/munge/munged.log"
}

node_ready() {
    local state
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1)
    case "$state" in idle* | mix* | alloc*) return 0 ;; *) return 1 ;; esac
}

cmd_start() {
    require_root
    require_packages
    local n
    n=$(running_count)
    if [ "$n" = 3 ]; then
        echo "local Slurm cluster already running ($DIR)"
        return 0
    fi
    if [ "$n" != 0 ]; then
        echo "$PROG: found the cluster partly running: restarting it" >&2
        cmd_stop >/dev/null
    fi
    local p
    for p in "$PORT" $((PORT + 1)); do
        port_free "$p" || die "port $p is in use (another Slurm?): choose others with PATCHSWEEP_SLURM_PORT"
    done
    install -d -m 0755 "$DIR" "$DIR/etc" "$DIR/log" "$DIR/run" "$DIR/state" "$DIR/spool" ||
        die "cannot create the state directory $DIR"
    write_config
    export SLURM_CONF=$CONF
    start_munged
    # -c: start from an empty state (no jobs of an earlier run come back).
    slurmctld -c -f "$CONF" || start_failed "slurmctld did not start: see $DIR/log/slurmctld.log"
    wait_for 20 scontrol ping || start_failed "slurmctld does not answer: see $DIR/log/slurmctld.log"
    slurmd -f "$CONF" || start_failed "slurmd did not start: see $DIR/log/slurmd.log"
    if ! wait_for 30 node_ready; then
        start_failed "the node did not become idle in 30 s ($(sinfo -h -N -o '%t %E' 2>/dev/null)): see $DIR/log/slurmd.log"
    fi
    echo "local Slurm cluster up: $(sinfo -h -N -o '%N, %c CPUs, %m MB, partition %P' | head -n 1)"
    echo "use it with: export SLURM_CONF=$CONF"
}

# TERM the pid, KILL it after $2 seconds.
end_pid() {
    local pid=$1 secs=$2
    kill -TERM "$pid" 2>/dev/null || return 0
    wait_for "$secs" bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null
    wait_for 5 bash -c "! kill -0 $pid"
}

cmd_stop() {
    require_root
    export SLURM_CONF=$CONF
    local n
    n=$(running_count)
    if [ "$n" = 0 ] && [ -z "$(stepd_pids)" ]; then
        echo "local Slurm cluster not running ($DIR)"
        return 0
    fi
    # Jobs first, while slurmd can still end their steps cleanly.
    if slurmctld_pid >/dev/null && scontrol ping >/dev/null 2>&1; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null
            # KillWait (30 s) plus margin for the steps' own clean-up
            wait_for 45 bash -c '[ -z "$(squeue -h -o %A 2>/dev/null)" ]' ||
                echo "$PROG: jobs still listed after 45 s: $(squeue -h -o %A | tr '\n' ' ')" >&2
        fi
    fi
    local pid
    if pid=$(slurmd_pid); then end_pid "$pid" 10; fi
    if pid=$(slurmctld_pid); then end_pid "$pid" 10; fi
    for pid in $(stepd_pids); do end_pid "$pid" 5; done
    if pid=$(munged_pid); then end_pid "$pid" 5; fi
    rm -f "$DIR/run/munged.pid"
    if [ "$(running_count)" != 0 ] || [ -n "$(stepd_pids)" ]; then
        die "daemons still running after stop: $(cmd_status_line)"
    fi
    echo "local Slurm cluster stopped"
}

cmd_status_line() {
    local out="" pid
    if pid=$(munged_pid); then out="munged $pid"; else out="munged down"; fi
    if pid=$(slurmctld_pid); then out="$out, slurmctld $pid"; else out="$out, slurmctld down"; fi
    if pid=$(slurmd_pid); then out="$out, slurmd $pid"; else out="$out, slurmd down"; fi
    echo "$out"
}

cmd_status() {
    export SLURM_CONF=$CONF
    echo "state directory $DIR: $(cmd_status_line)"
    local n
    n=$(running_count)
    if [ "$n" = 3 ]; then
        sinfo -N -o '%N %t %c CPUs %m MB partition %P'
        squeue
        echo "use it with: export SLURM_CONF=$CONF"
        return 0
    fi
    [ "$n" = 0 ] && return 3
    return 1
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $PROG start|stop|status|env   (state in \$PATCHSWEEP_SLURM_DIR, default /tmp/patchsweep-slurm)" >&2
    exit 2
    ;;
esac
