"""The slurm/*.sbatch scripts against a real SLURM cluster (CI: slurm/ci/local_slurm_up.sh on localhost).

RAO on the tiny model with 2 gloo processes under srun + torchrun, a job that must come back FAILED,
a preempted job that requeues itself, and the NeMo-Run pipeline's RAO step through SlurmExecutor.
Without SLURM these skip; with RAO_REQUIRE_SLURM=1 (CI) they fail instead. The DRY_RUN tests at the
end need only bash.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.e2e import (
    REPO,
    job_env,
    job_info,
    read_metrics,
    require_nemo_run,
    require_slurm,
    sacct_state,
    submit_and_wait,
)

STEPS = 3
#: sbatch options that fit the 8-GPU scripts onto a 2-CPU node without GPUs
CPU_SBATCH = ["--nodes=1", "--gres=none", "--cpus-per-task=2", "--time=00:10:00"]
CPU_ENV = {"GPUS_PER_NODE": "2", "DEVICE": "cpu", "CONFIG": "examples/configs/rao_tiny.yaml", "TP": "2",
           "STEPS": str(STEPS), "EXTRA_ARGS": "train.eval_every=0"}


@pytest.fixture(scope="module")
def slurm() -> None:
    require_slurm()


@pytest.mark.slow
def test_rao_sbatch_runs_torchrun_on_cpu(slurm: None, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = job_env(**CPU_ENV, OUTPUT_DIR=str(out))
    jid, ok = submit_and_wait("slurm/rao_llama3.sbatch", env, [*CPU_SBATCH, f"--output={tmp_path}/%x-%j.out"])
    log = (tmp_path / f"rao-llama3-8b-{jid}.out").read_text()
    info = job_info(jid)
    assert ok and info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert sacct_state(jid) in (None, "COMPLETED")
    # one srun task running torchrun with 2 processes, gloo, the tiny config and the env overrides
    assert "srun --nodes=1 --ntasks-per-node=1" in log
    assert "--nproc-per-node=2" in log and "--rdzv-backend=c10d" in log
    assert "parallel.tp=2" in log and "parallel.backend=gloo" in log and f"train.steps={STEPS}" in log
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["update_ok"] for r in records)
    latest = (out / "checkpoints" / "latest").read_text().strip()  # the checkpoint a requeued job resumes from
    assert (out / "checkpoints" / latest).is_dir()


@pytest.mark.slow
def test_missing_config_job_is_failed(slurm: None, tmp_path: Path) -> None:
    env = job_env(**{**CPU_ENV, "CONFIG": "examples/configs/does_not_exist.yaml"}, OUTPUT_DIR=str(tmp_path / "r"))
    jid, ok = submit_and_wait("slurm/rao_llama3.sbatch", env, [*CPU_SBATCH, f"--output={tmp_path}/%x-%j.out"],
                              timeout_s=60)
    info = job_info(jid)
    assert not ok
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    for _ in range(10):  # the accounting record follows within a second or two
        if sacct_state(jid) in (None, "FAILED"):
            break
        time.sleep(0.5)
    assert sacct_state(jid) in (None, "FAILED")
    log = (tmp_path / f"rao-llama3-8b-{jid}.out").read_text()
    assert "config file not found: examples/configs/does_not_exist.yaml" in log
    assert not (tmp_path / "r").exists()


FAKE_TRAINER = """#!/bin/bash
# Stands in for `python -m torch.distributed.run ... rao_megatron.cli.train`: on the first run it waits for
# the preemption signal and exits 75 ("checkpoint saved, requeue me"); on the requeued run it finishes.
# `python -c PROBE ...` is common.sh's interpreter check (rao_check_torch): pass it
if [ "${1:-}" = -c ]; then echo "ok: fake interpreter"; exit 0; fi
echo "fake trainer: restart=${SLURM_RESTART_COUNT:-0} args: $*"
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then echo "fake trainer: resumed and finished"; exit 0; fi
trap 'echo "fake trainer: got SIGUSR1, saving"; exit 75' USR1
touch "$READY_FILE"
for _ in $(seq 600); do sleep 0.1; done
exit 1
"""


def _wait_for(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def _release_requeued(jid: str) -> None:
    """Make a requeued job eligible now instead of after Slurm's ~2 min requeue delay, once it is safe.

    The delay exists for a reason: slurmd revokes the old run's job credential with a one-second
    timestamp and rejects a new credential of the same job id created in that same second ("Job
    credential revoked"). So wait until the job is PENDING, the node has finished the old run, and
    two seconds have passed since the requeue (SubmitTime is reset to it)."""
    _wait_for(lambda: job_info(jid)["JobState"] == "PENDING", 30, "the requeued job to be pending")
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    _wait_for(lambda: subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True,
                                     text=True).stdout.strip() == "idle", 60, "the node to finish the old run")
    requeued_at = datetime.fromisoformat(job_info(jid)["SubmitTime"])
    _wait_for(lambda: datetime.now() >= requeued_at + timedelta(seconds=2), 10, "the credential's second to pass")
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=True)


@pytest.mark.slow
def test_preempted_job_forwards_signal_and_requeues(slurm: None, tmp_path: Path) -> None:
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    ready = tmp_path / "ready"
    env = job_env(**{**CPU_ENV, "GPUS_PER_NODE": "1"}, PYTHON=str(fake), READY_FILE=str(ready))
    jid = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gres=none", "--cpus-per-task=1",
                          "--job-name=preempt", f"--output={tmp_path}/%x-%j.out", "slurm/rao_llama3.sbatch"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        _wait_for(ready.exists, 60, "the fake trainer to start")
        # what `#SBATCH --signal=B:USR1@300` does 300 s before the time limit: SIGUSR1 to the batch shell
        subprocess.run(["scancel", "--batch", "--signal=USR1", jid], check=True)
        _wait_for(lambda: job_info(jid).get("Restarts") == "1", 60, "the job to requeue itself")
        _release_requeued(jid)
        _wait_for(lambda: job_info(jid)["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"),
                  90, "the requeued job to finish")
    finally:
        subprocess.run(["scancel", jid], capture_output=True)
    info = job_info(jid)
    log = (tmp_path / f"preempt-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "received SIGUSR1" in log
    assert "fake trainer: got SIGUSR1, saving" in log  # srun forwarded it to the task
    assert f"preempted (exit 75): scontrol requeue {jid}" in log
    assert "fake trainer: restart=1" in log and "resumed and finished" in log  # --open-mode=append


@pytest.mark.slow
def test_preempted_training_checkpoints_requeues_and_resumes(slurm: None, tmp_path: Path) -> None:
    """The real chain: SIGUSR1 to the batch shell -> srun -> torchrun -> both gloo workers, which save a
    checkpoint and write PREEMPTED; torchrun exits 1, the script requeues on the marker, the job runs
    again under the same id, resumes from the checkpoint and completes."""
    import yaml

    cfg = yaml.safe_load((REPO / "examples/configs/rao_tiny.yaml").read_text())
    cfg["train"]["steps"] = 100_000  # "forever": the run only ends by preemption
    config = tmp_path / "rao_tiny_long.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    env = job_env(**{**{k: v for k, v in CPU_ENV.items() if k != "STEPS"}, "CONFIG": str(config)},
                  OUTPUT_DIR=str(out))
    jid = subprocess.run(["sbatch", "--parsable", *CPU_SBATCH, "--job-name=rao-preempt",
                          f"--output={tmp_path}/%x-%j.out", "slurm/rao_llama3.sbatch"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    metrics = out / "metrics.jsonl"
    log_path = tmp_path / f"rao-preempt-{jid}.out"

    def log() -> str:
        return log_path.read_text() if log_path.exists() else ""

    try:
        _wait_for(lambda: metrics.exists() and metrics.read_text().strip() != "", 180, "the first training step")
        subprocess.run(["scancel", "--batch", "--signal=USR1", jid], check=True)
        _wait_for(lambda: job_info(jid).get("Restarts") == "1", 120, "the job to requeue itself")
        _wait_for(lambda: job_info(jid)["JobState"] == "PENDING", 30, "the requeued job to be pending")
        stopped_at = int((out / "PREEMPTED").read_text())
        latest = (out / "checkpoints" / "latest").read_text().strip()
        assert latest == f"step_{stopped_at:07d}", (latest, stopped_at)
        # the requeued run finishes two steps after the checkpoint it resumes from
        cfg["train"]["steps"] = stopped_at + 2
        config.write_text(yaml.safe_dump(cfg))
        _release_requeued(jid)
        _wait_for(lambda: job_info(jid)["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"),
                  180, "the requeued job to finish")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{log()[-4000:]}") from e
    finally:
        subprocess.run(["scancel", jid], capture_output=True)
    info = job_info(jid)
    text = log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0", text[-4000:]
    assert "received SIGUSR1" in text
    assert f"PREEMPTED at step {stopped_at}): scontrol requeue {jid}" in text
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:07d}'} at step {stopped_at}" in text
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, stopped_at + 3))
    assert not (out / "PREEMPTED").exists()  # removed by the run that resumed
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at + 2:07d}"


@pytest.mark.slow
def test_nemo_run_rao_step_through_slurm_executor(slurm: None, tmp_path: Path) -> None:
    require_nemo_run()
    work = tmp_path / "work"
    env = job_env(NEMORUN_HOME=str(tmp_path / "nemo_home"))
    cmd = [sys.executable, "examples/nemo_run/pipeline.py", "--executor", "slurm", "--tunnel", "local",
           "--steps", "rao", "--work-dir", str(work), "--rao-config", "examples/configs/rao_tiny.yaml",
           "--tp", "2", "--device", "cpu", "--gpus-per-node", "2", "--cpus-per-task", "2",
           "--account", "ci", "--time", "00:10:00",
           "--override", f"train.steps={STEPS}", "--override", "train.eval_every=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rao: SUCCEEDED" in proc.stdout
    records = read_metrics(work / "rao" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # it really went through sbatch: NeMo-Run wrote its batch script and a Slurm log
    job_dirs = list((tmp_path / "nemo_home" / "experiments").rglob("sbatch_*.out"))
    assert job_dirs, "no sbatch output under NEMORUN_HOME"


# ---- DRY_RUN: the exact commands, without SLURM -------------------------------------------------------

def _dry(script: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(DRY_RUN="1", **env)
    return subprocess.run(["bash", script], cwd=REPO, env=full, capture_output=True, text=True, timeout=30)


def test_dry_run_cpu_command() -> None:
    p = _dry("slurm/rao_llama3.sbatch", **CPU_ENV, PYTHON="python3", OUTPUT_DIR="/tmp/x")
    assert p.returncode == 0, p.stderr
    args = shlex.split(p.stdout)
    assert args[:3] == ["python3", "-m", "torch.distributed.run"]  # outside Slurm: no srun
    assert "--nproc-per-node=2" in args and "--nnodes=1" in args
    i = args.index("rao_megatron.cli.train")
    assert args[i + 1:] == ["--config", "examples/configs/rao_tiny.yaml", "parallel.tp=2",
                            f"train.steps={STEPS}", "train.output_dir=/tmp/x", "parallel.device=cpu",
                            "parallel.backend=gloo", "train.eval_every=0"]


def test_dry_run_multinode_container_and_baseline_loss() -> None:
    p = _dry("slurm/dpo_llama3.sbatch", SLURM_JOB_ID="1234", SLURM_NNODES="4", SLURM_CPUS_PER_TASK="32",
             MASTER_ADDR="node001", PYTHON="python", CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.12-py3",
             CONTAINER_MOUNTS="/data:/data", LOSS="ipo", TP="4", PP="2")
    assert p.returncode == 0, p.stderr
    args = shlex.split(p.stdout)
    assert args[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--cpus-per-task=32" in args
    assert "--container-image=nvcr.io#nvidia/pytorch:25.12-py3" in args
    assert f"--container-mounts={REPO}:{REPO},/data:/data" in args
    # the batch shell cannot see the container's interpreter: each task checks it, then execs torchrun
    i = args.index("bash")
    assert args[i + 1] == "-c" and "RAO_TORCH_PROBE" in args[i + 2] and 'exec "$0" "$@"' in args[i + 2]
    assert args[i + 3:i + 6] == ["python", "-m", "torch.distributed.run"]
    assert "--nnodes=4" in args and "--nproc-per-node=8" in args
    assert f"--rdzv-endpoint=node001:{20000 + 1234}" in args
    assert "examples/configs/dpo_llama3_8b.yaml" in args
    assert {"parallel.tp=4", "parallel.pp=2", "loss.name=ipo", "parallel.device=cuda"} <= set(args)
    assert "parallel.backend=gloo" not in args


def test_dry_run_no_container_flags_unless_set() -> None:
    p = _dry("slurm/precompute_reference.sbatch", SLURM_JOB_ID="7", SLURM_NNODES="1", MASTER_ADDR="n1",
             PYTHON="python")
    assert p.returncode == 0, p.stderr
    assert "--container" not in p.stdout
    assert "-m rao_megatron.cli.precompute_reference --config examples/configs/rao_llama3_8b.yaml" in p.stdout


def test_convert_script_checks_its_inputs() -> None:
    p = _dry("slurm/convert.sbatch", DIRECTION="hf-to-megatron", OUT="/tmp/o")
    assert p.returncode == 2 and "HF_MODEL is not set" in p.stderr
    p = _dry("slurm/convert.sbatch", DIRECTION="megatron-to-hf", MEGATRON_CKPT=str(REPO), OUT="/tmp/o",
             PYTHON="python")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["python", "-m", "rao_megatron.cli.convert", "megatron-to-hf", "--megatron", str(REPO),
                                "--out", "/tmp/o"]
