#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by scripts/slurm/start.sh.
#
#   scripts/slurm/stop.sh [DIR]         DIR: argument, else $SLURM_TMP
#
# Cancels the jobs still queued in THAT cluster, then stops exactly the daemons
# whose pid files start.sh left under DIR (slurmd, slurmctld, munged), checking
# each pid still belongs to the expected program. Nothing else is signalled.
# DIR itself (logs, conf) is kept; remove it yourself when done.
set -uo pipefail

log() { echo "stop.sh: $*" >&2; }

DIR="${1:-${SLURM_TMP:-}}"
[[ -n "$DIR" ]] || { log "ERROR: give the cluster dir (argument or \$SLURM_TMP)"; exit 2; }
[[ -d "$DIR" ]] || { log "ERROR: no such dir: $DIR"; exit 2; }

# A pid from a pid file is ours only if the process is alive and runs that program.
alive_pid() { # pidfile name
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc '0-9' <"$1")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] || return 1
    echo "$pid"
}

# Running jobs' slurmstepd processes outlive slurmd, so cancel jobs first.
if [[ -f "$DIR/etc/slurm.conf" ]] && alive_pid "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then
    export SLURM_CONF="$DIR/etc/slurm.conf"
    if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
        log "cancelling jobs still in the queue"
        scancel --full --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 20); do
            [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
fi

rc=0
stop_one() { # pidfile name
    local pid
    pid="$(alive_pid "$1" "$2")" || { rm -f "$1"; return 0; }
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
        sleep 0.25
    done
    log "$2 (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    sleep 0.5
    if kill -0 "$pid" 2>/dev/null; then
        log "ERROR: $2 (pid $pid) still alive"
        rc=1
    else
        rm -f "$1"
    fi
}

stop_one "$DIR/run/slurmd.pid" slurmd
stop_one "$DIR/run/slurmctld.pid" slurmctld
stop_one "$DIR/munge/munged.pid" munged
exit "$rc"
