#!/usr/bin/env bash
# Submit a batch job and wait for it to finish, polling `scontrol show job` every second
# (`sbatch --wait` can take tens of seconds to notice the end). Prints the job id on stdout and
# JobState/ExitCode on stderr; exits 0 when the job COMPLETED, 1 otherwise.
#
#   slurm/ci/run_job_and_wait.sh [sbatch options] SCRIPT [script args]
#
# Environment:
#   JOB_TIMEOUT   seconds to wait before cancelling the job and failing (default 600)
set -euo pipefail

timeout=${JOB_TIMEOUT:-600}
jid=$(sbatch --parsable "$@")
jid=${jid%%;*}   # --parsable prints "id[;cluster]"
echo "$jid"
echo "submitted job $jid" >&2
deadline=$(( $(date +%s) + timeout ))
state=""
while :; do
  state=$(scontrol show job "$jid" -o 2>/dev/null | sed -nE 's/.*JobState=([A-Z_]+).*/\1/p')
  case "$state" in
    PENDING|RUNNING|CONFIGURING|COMPLETING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED|RESIZING|SUSPENDED|"") ;;
    *) break ;;
  esac
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "job $jid still $state after ${timeout}s: cancelling" >&2
    scancel "$jid" || true
    exit 1
  fi
  sleep 1
done
scontrol show job "$jid" -o | grep -oE '(JobState|ExitCode|RunTime|Restarts)=[^ ]+' | tr '\n' ' ' >&2
echo >&2
[ "$state" = COMPLETED ]
