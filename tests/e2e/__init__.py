"""End-to-end tests (SLURM, NeMo-Run) and their helpers: is SLURM / NeMo-Run here, submit-and-wait, job state."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: CI sets RAO_REQUIRE_SLURM=1 after starting the local cluster: then a missing SLURM (or NeMo-Run)
#: fails the tests instead of skipping them
REQUIRE = os.environ.get("RAO_REQUIRE_SLURM", "") not in ("", "0")


def unavailable(reason: str) -> None:
    """Skip, or fail when RAO_REQUIRE_SLURM is set."""
    if REQUIRE:
        pytest.fail(f"RAO_REQUIRE_SLURM is set but {reason}")
    pytest.skip(reason)


def require_slurm() -> None:
    missing = [c for c in ("sbatch", "scontrol", "squeue") if shutil.which(c) is None]
    if missing:
        unavailable(f"SLURM client commands not on PATH: {', '.join(missing)}")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        unavailable(f"slurmctld does not answer `scontrol ping`: {ping.stdout.strip()} {ping.stderr.strip()}")


def require_nemo_run() -> None:
    try:
        import nemo_run  # noqa: F401
    except ImportError as e:
        unavailable(f"nemo_run is not importable ({e}); pip install nemo-run 'leptonai<0.47'")


def job_env(**overrides: str) -> dict[str, str]:
    """The test's environment for a job: the venv's bin first on PATH (jobs inherit it), CPU settings."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHON=sys.executable)
    for key in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_CPUS_PER_TASK"):
        env.pop(key, None)  # when the tests themselves run inside an allocation
    env.update(overrides)
    return env


def submit_and_wait(script: str, env: dict[str, str], sbatch_args: list[str],
                    timeout_s: int = 240) -> tuple[str, bool]:
    """``slurm/ci/run_job_and_wait.sh``: submit, poll until the job ends; (job id, COMPLETED?)."""
    proc = subprocess.run([str(REPO / "slurm/ci/run_job_and_wait.sh"), *sbatch_args, script],
                          cwd=REPO, env={**env, "JOB_TIMEOUT": str(timeout_s)}, capture_output=True,
                          text=True, timeout=timeout_s + 30)
    jid = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    assert jid.isdigit(), f"sbatch did not print a job id: {proc.stdout!r} {proc.stderr!r}"
    return jid, proc.returncode == 0


def job_info(jid: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True,
                         check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def sacct_state(jid: str) -> str | None:
    """The job's state in the accounting database, or None without accounting (sacct)."""
    if shutil.which("sacct") is None:
        return None
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", jid, "-o", "State"], capture_output=True,
                         text=True)
    lines = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    return lines[0].split()[0] if out.returncode == 0 and lines else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
