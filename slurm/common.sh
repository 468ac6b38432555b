# shellcheck shell=bash
# Shared by every slurm/*.sbatch script: environment defaults, rendezvous address, NCCL settings,
# optional pyxis/enroot container, the torchrun launcher, signal forwarding and requeue.
# Source it, set RAO_DEFAULT_CONFIG (and friends) first, then call rao_setup and rao_launch.
# Works with Slurm 22.05 and newer; uses no option newer than 22.05.
#
# Environment (every variable is optional; "unset" means the config file's value is kept):
#   RAO_ROOT          repository checkout the job runs in (default: $SLURM_SUBMIT_DIR, i.e. submit
#                     from the repository root; outside Slurm: the parent of this file's directory)
#   PYTHON            interpreter (default: python inside a container, else $RAO_ROOT/.venv/bin/python
#                     when it exists, else python3)
#   CONFIG            YAML config (relative to RAO_ROOT or absolute; default: the script's own)
#   EXTRA_ARGS        more `section.key=value` overrides, space-separated, applied last
#   DEVICE            cuda (default) or cpu (-> parallel.device): cpu hides GPUs, uses gloo and skips the
#                     NCCL settings; cuda stops the job unless $PYTHON has a CUDA torch that sees a GPU
#   NNODES            nodes for torchrun (default: $SLURM_NNODES, else 1)
#   GPUS_PER_NODE     processes per node (default 8; with DEVICE=cpu: CPU processes per node)
#   MASTER_ADDR       rendezvous host (default: first host of $SLURM_JOB_NODELIST, else 127.0.0.1)
#   MASTER_PORT       rendezvous port (default: 20000 + SLURM_JOB_ID % 20000, else 29500)
#   TP PP VPP         -> parallel.tp / parallel.pp / parallel.vpp
#   SEQ_PARALLEL      -> parallel.sequence_parallel (true|false)
#   HF_MODEL          -> model.hf_config (HF directory: architecture and default tokenizer)
#   TOKENIZER         -> model.tokenizer
#   INIT_CHECKPOINT   -> model.init_checkpoint (Megatron checkpoint from rao_megatron.cli.convert)
#   DATA EVAL_DATA    -> data.train_path / data.eval_path
#   REF_CACHE         -> data.reference_cache (precomputed reference log-probs)
#   SEQ_LEN           -> data.max_length
#   MICRO_BATCH       -> data.groups_per_micro_batch (whole prompt groups per micro-batch)
#   GLOBAL_BATCH      -> train.global_batch_groups
#   STEPS LR SEED     -> train.steps / train.lr / train.seed
#   OUTPUT_DIR        -> train.output_dir (metrics.jsonl, checkpoints; a requeued job resumes here)
#   SAVE_EVERY        -> checkpoint.save_every
#   LOSS BETA         -> loss.name / loss.beta
#   CONTAINER_IMAGE   pyxis/enroot image with this project's dependencies installed (e.g. one built
#                     from nvcr.io#nvidia/pytorch:25.12-py3: torch 2.10.0a0, Python 3.12), or a .sqsh
#                     file; when set, srun gets --container-image/--container-mounts/--container-workdir
#   CONTAINER_MOUNTS  extra mounts, comma-separated src:dst[,...]; RAO_ROOT is always mounted at
#                     the same path (so relative paths and the checkout work inside the container)
#   REQUEUE_EXIT_CODE exit code meaning "preempted: checkpoint saved, requeue me" (default 75,
#                     EX_TEMPFAIL from sysexits.h)
#   MAX_REQUEUES      requeue at most this many times (default 20; compared with SLURM_RESTART_COUNT)
#   SHUTDOWN_TIMEOUT  seconds torchrun waits for workers to save and exit after a forwarded signal
#                     before it kills them (default 240; keep it below the --signal lead time, 300)
#   SRUN_ARGS         more srun options, space-separated (e.g. "--mpi=none")
#   DRY_RUN           1: print the command that would run and exit 0 (no srun, no training, no checks)
#   RAO_TORCH_CHECK   0: skip the interpreter check below (default 1)
#
# Interpreter check (rao_check_torch, before anything is launched; exit 2 with one `error:` line):
#   - torch must import in $PYTHON;
#   - DEVICE=cuda needs a CUDA build of torch that sees a GPU: a CPU-only build (what `make` installs
#     on a login node without nvidia-smi) or no visible GPU stops the job instead of training on CPU
#     (the training side also gets parallel.device=$DEVICE and refuses to run without CUDA);
#   - torchrun must know --signals-to-handle (torch >= 2.10; 2.9.x and older do not have it): without
#     it SIGUSR1 kills torchrun before the workers can checkpoint (see "Preemption" below).
#   It runs $PYTHON in the batch shell; with CONTAINER_IMAGE inside Slurm that interpreter lives in the
#   container, so every task runs the same check inside the container right before torchrun.
#
# NCCL / CUDA defaults (DEVICE=cuda only; each is exported only when not already set, so a site's
# own values win):
#   CUDA_DEVICE_MAX_CONNECTIONS=1          Megatron needs it to overlap TP communication with compute
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1      a failed or hung collective aborts the job instead of hanging
#   TORCH_NCCL_AVOID_RECORD_STREAMS=1      frees NCCL buffers promptly (less fragmentation)
#   NCCL_IB_TIMEOUT=22                     InfiniBand retry timeout 4.096 us * 2^22 ~ 17 s (transient
#                                          fabric hiccups do not kill a multi-node job)
#   NCCL_DEBUG=WARN                        set INFO to see rings/trees and the chosen transports
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True   less fragmentation with variable shapes
#   Site-specific ones (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_NET_GDR_LEVEL, ...) are left alone:
#   export them before sbatch (sbatch passes the submitting environment to the job).
#
# Preemption / time limit: the scripts carry `#SBATCH --signal=B:USR1@300` and `#SBATCH --requeue`.
# Slurm sends SIGUSR1 to this batch shell 300 s before the time limit; the trap forwards it (and
# SIGTERM) to srun, srun to torchrun on every node, and torchrun (told to handle SIGUSR1 through
# PET_SIGNALS_TO_HANDLE, torch >= 2.10) to its workers. The training process saves a checkpoint, writes
# the marker file $OUTPUT_DIR/PREEMPTED and exits with REQUEUE_EXIT_CODE (75). torchrun reports any worker exit
# as a plain failure (exit 1), so the job is requeued when the launcher did not exit 0 and
#   - it exited with REQUEUE_EXIT_CODE (a launcher that passes the code through), or
#   - the run directory holds the PREEMPTED marker (the run directory is OUTPUT_DIR, or the last
#     train.output_dir=... in EXTRA_ARGS; a stale marker is removed before the launch), or
#   - this shell received USR1/TERM (the workers may have been killed before writing the marker;
#     the requeued run then resumes from the last periodic checkpoint).
# `scontrol requeue` puts the job back in the queue under the same job id (the log is appended to);
# the next run resumes from the newest checkpoint in train.output_dir (checkpoint.resume=auto).
#
# Reading a failed job: a user error (config, data, paths, model layout) is printed once, by rank 0, as
# one `error: ...` line, and every worker exits 2. torchrun itself then exits 1 and prints a
# ChildFailedError traceback listing each rank's exit code; that traceback is torchrun's, not the
# cause. rao_launch logs a reminder after a failed torchrun launch: the first `error:` line is the cause.

# ---------------------------------------------------------------------------------------------------
rao_log() { printf '[rao %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
rao_die() { rao_log "error: $*"; exit 2; }

# rao_setup: resolve RAO_ROOT, defaults, rendezvous and device settings; cd to RAO_ROOT.
rao_setup() {
  if [ -z "${RAO_ROOT:-}" ]; then
    if [ -n "${SLURM_SUBMIT_DIR:-}" ]; then
      RAO_ROOT=$SLURM_SUBMIT_DIR
    else
      RAO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    fi
  fi
  [ -f "$RAO_ROOT/slurm/common.sh" ] \
    || rao_die "RAO_ROOT=$RAO_ROOT is not the rao_megatron checkout (submit from the repository root or set RAO_ROOT)"
  cd "$RAO_ROOT" || rao_die "cannot cd to RAO_ROOT=$RAO_ROOT"
  export RAO_ROOT
  export PYTHONPATH="$RAO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

  DEVICE=${DEVICE:-cuda}
  case "$DEVICE" in cuda|cpu) ;; *) rao_die "DEVICE must be cuda or cpu, got '$DEVICE'";; esac
  GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  NNODES=${NNODES:-${SLURM_NNODES:-1}}
  CONFIG=${CONFIG:-${RAO_DEFAULT_CONFIG:-}}
  REQUEUE_EXIT_CODE=${REQUEUE_EXIT_CODE:-75}
  MAX_REQUEUES=${MAX_REQUEUES:-20}
  SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
  if [ -z "${PYTHON:-}" ]; then
    if [ -n "${CONTAINER_IMAGE:-}" ]; then PYTHON=python
    elif [ -x "$RAO_ROOT/.venv/bin/python" ]; then PYTHON=$RAO_ROOT/.venv/bin/python
    else PYTHON=python3
    fi
  fi

  if [ -z "${MASTER_ADDR:-}" ]; then
    if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
      MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    else
      MASTER_ADDR=127.0.0.1
    fi
  fi
  if [ -z "${MASTER_PORT:-}" ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
    else MASTER_PORT=29500
    fi
  fi
  export MASTER_ADDR MASTER_PORT

  if [ "$DEVICE" = cuda ]; then
    : "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
    : "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
    : "${TORCH_NCCL_AVOID_RECORD_STREAMS:=1}"
    : "${NCCL_IB_TIMEOUT:=22}"
    : "${NCCL_DEBUG:=WARN}"
    : "${PYTORCH_CUDA_ALLOC_CONF:=expandable_segments:True}"
    export CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_AVOID_RECORD_STREAMS \
      NCCL_IB_TIMEOUT NCCL_DEBUG PYTORCH_CUDA_ALLOC_CONF
  else
    export CUDA_VISIBLE_DEVICES=""
    : "${OMP_NUM_THREADS:=1}"
    export OMP_NUM_THREADS
  fi
  export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}
  # torchrun's --signals-to-handle (PET_SIGNALS_TO_HANDLE) arrived in torch 2.10: it makes torchrun
  # forward SIGUSR1 to its workers. torch <= 2.9.x has no such option and torchrun dies of SIGUSR1
  # (its default action) before the workers checkpoint; rao_check_torch refuses those. torchrun reads
  # TORCH_ELASTIC_SHUTDOWN_TIMEOUT (how long the workers get before SIGKILL) from torch 2.12 on;
  # 2.10 and 2.11 give them a fixed 30 s (rao_check_torch warns).
  export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT
  RAO_OVERRIDES=()
  RAO_LAUNCHER=python
}

# Run by the job's interpreter (python -c PROBE DEVICE LAUNCHER NPROC): prints one `error: ...` line and
# exits 2 when that interpreter cannot run this job, else `warning: ...` lines and an `ok ...` summary.
read -r -d '' RAO_TORCH_PROBE <<'PY' || true
import os, sys
device, launcher, nproc = sys.argv[1], sys.argv[2], int(sys.argv[3])
py = sys.executable or "python"
def die(msg):
    print("error: " + msg)
    sys.exit(2)
try:
    import torch
except Exception as e:
    die(f"{py} cannot import torch ({type(e).__name__}: {e}); install this project's dependencies there")
v = torch.__version__
build = torch.version.cuda or getattr(torch.version, "hip", None)
if device == "cuda":
    if not build:
        die(f"DEVICE=cuda but {py} has torch {v} (CPU-only build); install the CUDA build of torch there "
            f"(the Linux x86_64 wheels on PyPI are CUDA builds: {py} -m pip install --force-reinstall torch) "
            f"or set DEVICE=cpu")
    if not torch.cuda.is_available():
        die(f"DEVICE=cuda but {py} (torch {v}, CUDA {build}) sees no GPU on {os.uname().nodename} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"request GPUs (--gres=gpu:N) or set DEVICE=cpu")
    if torch.cuda.device_count() < nproc:
        print(f"warning: {torch.cuda.device_count()} GPU(s) visible here but GPUS_PER_NODE={nproc}")
if launcher == "torchrun":
    from torch.distributed.run import get_args_parser
    options = get_args_parser().format_help()
    if "--signals-to-handle" not in options:
        die(f"{py} has torch {v}, whose torchrun lacks --signals-to-handle (torch >= 2.10): SIGUSR1 before the "
            f"time limit or a preemption would kill torchrun before the workers checkpoint; use torch >= 2.10")
    if "--shutdown-timeout" not in options:
        print(f"warning: torch {v}: torchrun ignores TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torch >= 2.12); "
              f"after a preemption signal the workers get 30 s to checkpoint before SIGKILL")
print(f"ok: {py}: torch {v}" + (f", CUDA {build}, {torch.cuda.device_count()} GPU(s)" if device == "cuda" else ""))
PY

# rao_check_torch: fail fast (exit 2, one `error:` line, before anything is launched) when $PYTHON cannot
# run this job: see "Interpreter check" at the top. Call it after rao_torchrun_cmd / rao_python_cmd (and
# after rao_srun_prefix): inside Slurm with CONTAINER_IMAGE it wraps RAO_CMD so that each task checks the
# container's interpreter before exec-ing the command.
rao_check_torch() {
  if [ "${RAO_TORCH_CHECK:-1}" = 0 ]; then return 0; fi
  if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${CONTAINER_IMAGE:-}" ]; then
    export RAO_TORCH_PROBE DEVICE RAO_LAUNCHER GPUS_PER_NODE
    # shellcheck disable=SC2016  # expanded by the task's shell inside the container, not here
    RAO_CMD=(bash -c '"$0" -c "$RAO_TORCH_PROBE" "$DEVICE" "$RAO_LAUNCHER" "$GPUS_PER_NODE" >&2 || exit 2; exec "$0" "$@"'
             "${RAO_CMD[@]}")
    return 0
  fi
  if [ "${DRY_RUN:-0}" = 1 ]; then return 0; fi
  command -v "$PYTHON" >/dev/null 2>&1 || rao_die "PYTHON=$PYTHON: no such interpreter (set PYTHON or create $RAO_ROOT/.venv)"
  local out rc=0 line
  out=$("$PYTHON" -c "$RAO_TORCH_PROBE" "$DEVICE" "$RAO_LAUNCHER" "$GPUS_PER_NODE" 2>&1) || rc=$?
  while IFS= read -r line; do
    case "$line" in
      "error: "*) rao_die "${line#error: }" ;;
      "warning: "*|"ok: "*) rao_log "$line" ;;
    esac
  done <<<"$out"
  if [ "$rc" -ne 0 ]; then
    rao_die "cannot run PYTHON=$PYTHON (exit $rc): $(printf '%s\n' "$out" | tail -n 1)"
  fi
}

# rao_check_config: fail fast (exit 2, before any process is launched) when CONFIG is missing.
rao_check_config() {
  [ -n "$CONFIG" ] || rao_die "CONFIG is not set"
  [ -f "$CONFIG" ] || rao_die "config file not found: $CONFIG (relative paths are read from $RAO_ROOT)"
}

# rao_override KEY VAR: append `KEY=$VAR` to the overrides when the variable VAR is set and non-empty.
rao_override() {
  local key=$1 var=$2
  if [ -n "${!var:-}" ]; then RAO_OVERRIDES+=("$key=${!var}"); fi
}

# rao_standard_overrides: the environment variables every training-type script maps to config keys.
rao_standard_overrides() {
  rao_override parallel.tp TP
  rao_override parallel.pp PP
  rao_override parallel.vpp VPP
  rao_override parallel.sequence_parallel SEQ_PARALLEL
  rao_override model.hf_config HF_MODEL
  rao_override model.tokenizer TOKENIZER
  rao_override model.init_checkpoint INIT_CHECKPOINT
  rao_override data.train_path DATA
  rao_override data.eval_path EVAL_DATA
  rao_override data.reference_cache REF_CACHE
  rao_override data.max_length SEQ_LEN
  rao_override data.groups_per_micro_batch MICRO_BATCH
  rao_override train.global_batch_groups GLOBAL_BATCH
  rao_override train.steps STEPS
  rao_override train.lr LR
  rao_override train.seed SEED
  rao_override train.output_dir OUTPUT_DIR
  rao_override checkpoint.save_every SAVE_EVERY
  rao_override loss.name LOSS
  rao_override loss.beta BETA
  # with cuda the training side also refuses to start without CUDA (rao_check_torch checks it first)
  RAO_OVERRIDES+=("parallel.device=$DEVICE")
  if [ "$DEVICE" = cpu ]; then RAO_OVERRIDES+=("parallel.backend=gloo"); fi
  local extra=()
  read -r -a extra <<<"${EXTRA_ARGS:-}"
  RAO_OVERRIDES+=("${extra[@]}")
}

# rao_srun_prefix: fills RAO_SRUN with `srun ...` (one task per node, container flags) inside a
# Slurm allocation; empty outside one (then the command runs directly on this machine).
rao_srun_prefix() {
  RAO_SRUN=()
  [ -n "${SLURM_JOB_ID:-}" ] || return 0
  RAO_SRUN=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
  # Since 22.05 srun no longer inherits --cpus-per-task from sbatch: pass it on explicitly,
  # otherwise torchrun and all its workers may be confined to one CPU.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then RAO_SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    RAO_SRUN+=(--container-image="$CONTAINER_IMAGE"
               --container-mounts="$RAO_ROOT:$RAO_ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
               --container-workdir="$RAO_ROOT")
  fi
  local extra=()
  read -r -a extra <<<"${SRUN_ARGS:-}"
  RAO_SRUN+=("${extra[@]}")
}

# rao_torchrun_cmd MODULE: fills RAO_CMD with the torchrun command for `python -m MODULE --config
# CONFIG overrides...` on NNODES x GPUS_PER_NODE processes (c10d rendezvous at MASTER_ADDR:PORT).
rao_torchrun_cmd() {
  local module=$1
  RAO_LAUNCHER=torchrun
  RAO_CMD=("$PYTHON" -m torch.distributed.run
           --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE"
           --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
           --rdzv-id="${SLURM_JOB_ID:-rao-local}" --max-restarts=0
           -m "$module" --config "$CONFIG" "${RAO_OVERRIDES[@]}")
}

# rao_python_cmd MODULE ARGS...: fills RAO_CMD with a single-process `python -m MODULE ARGS...`.
rao_python_cmd() {
  local module=$1
  shift
  RAO_LAUNCHER=python
  RAO_CMD=("$PYTHON" -m "$module" "$@")
}

_rao_forward_signal() {
  RAO_SIGNALLED=$1
  rao_log "received SIG$1: forwarding it to the training processes (they checkpoint and exit $REQUEUE_EXIT_CODE)"
  if [ -n "${RAO_CHILD_PID:-}" ]; then kill -s "$1" "$RAO_CHILD_PID" 2>/dev/null || true; fi
}

# rao_launch: run "${RAO_SRUN[@]}" "${RAO_CMD[@]}" with signal forwarding; requeue the job when it
# was preempted; exit with the launcher's exit code.
rao_launch() {
  rao_srun_prefix
  rao_check_torch
  local full=("${RAO_SRUN[@]}" "${RAO_CMD[@]}")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${full[@]}"
    printf '\n'
    exit 0
  fi
  rao_log "job ${SLURM_JOB_ID:-local} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
          "$NNODES node(s) x $GPUS_PER_NODE proc(s), DEVICE=$DEVICE, rendezvous $MASTER_ADDR:$MASTER_PORT"
  rao_log "command: ${full[*]}"
  local marker=""
  if [ -n "$(rao_run_dir)" ]; then
    marker=$(rao_run_dir)/PREEMPTED
    rm -f "$marker"  # a stale marker must not make a failure look like a preemption
  fi
  RAO_SIGNALLED=""
  trap '_rao_forward_signal USR1' USR1
  trap '_rao_forward_signal TERM' TERM
  # In the background, so that the traps run while it works (bash defers traps during a
  # foreground command); `wait` returns early on a trapped signal, hence the loop.
  "${full[@]}" &
  RAO_CHILD_PID=$!
  local rc=0
  while kill -0 "$RAO_CHILD_PID" 2>/dev/null; do
    wait "$RAO_CHILD_PID" || true
  done
  wait "$RAO_CHILD_PID" || rc=$?
  trap - USR1 TERM
  rao_log "launcher exited with $rc${RAO_SIGNALLED:+ after SIG$RAO_SIGNALLED}"
  local reason=""
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ]; then reason="exit $rc"
    elif [ -n "$marker" ] && [ -f "$marker" ]; then reason="exit $rc, $marker at step $(head -c 32 "$marker")"
    elif [ -n "$RAO_SIGNALLED" ]; then reason="exit $rc after SIG$RAO_SIGNALLED, no PREEMPTED marker"
    fi
  fi
  if [ -n "$reason" ]; then rao_requeue "$reason"
  elif [ "$rc" -ne 0 ] && [ "${RAO_LAUNCHER:-}" = torchrun ]; then
    # torchrun exits 1 whatever its workers did and prints a ChildFailedError traceback after their output
    rao_log "the cause is the first 'error:' line above: a user error (config, data, paths, layout) is printed" \
            "once, by rank 0, and every worker exits 2 (torchrun's ChildFailedError report lists 'exitcode: 2' per" \
            "rank; its traceback is torchrun's own); other exit codes: 3 = non-finite loss, 75 = preempted"
  fi
  exit "$rc"
}

# rao_run_dir: prints the run directory (train.output_dir) when the environment sets it: the last
# train.output_dir=... override (OUTPUT_DIR or EXTRA_ARGS); prints nothing when only the config does.
rao_run_dir() {
  local o dir=""
  for o in "${RAO_OVERRIDES[@]}"; do
    case "$o" in train.output_dir=*) dir=${o#train.output_dir=} ;; esac
  done
  printf '%s' "$dir"
}

# rao_requeue REASON: put this job back in the queue (it keeps its id; the log is appended to).
rao_requeue() {
  local reason=$1
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    rao_log "preempted ($reason) outside Slurm: nothing to requeue"
    return 0
  fi
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    rao_log "preempted ($reason) but already requeued ${SLURM_RESTART_COUNT:-0} times (MAX_REQUEUES=$MAX_REQUEUES): giving up"
    return 0
  fi
  rao_log "preempted ($reason): scontrol requeue $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" || rao_log "scontrol requeue failed (is the partition requeue-able?)"
}
