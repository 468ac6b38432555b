#!/usr/bin/env bash
# Stop the daemons local_slurm_up.sh started, by the PIDs it recorded (never by name). Cancels
# leftover jobs first so slurmd leaves no orphaned slurmstepd behind. Safe to run twice.
#
# Environment:
#   SLURM_LOCAL_DIR   as for local_slurm_up.sh (default /tmp/rao-local-slurm)
#   SLURM_LOCAL_PURGE 1: also delete SLURM_LOCAL_DIR (state, logs, accounting database)
set -uo pipefail

BASE=${SLURM_LOCAL_DIR:-/tmp/rao-local-slurm}
RUN=$BASE/run
log() { printf '[local-slurm] %s\n' "$*" >&2; }

if [ -s "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; then
  scancel --full --user="$(id -un)" >/dev/null 2>&1 || true
  for _ in $(seq 40); do
    [ -z "$(squeue -h 2>/dev/null)" ] && break
    sleep 0.25
  done
fi

for name in slurmd slurmctld slurmdbd mariadbd munged; do
  f=$RUN/$name.pid
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) ignored SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$f"
done

if [ "${SLURM_LOCAL_PURGE:-0}" = 1 ]; then
  rm -rf "$BASE"
  log "removed $BASE"
fi
exit 0
