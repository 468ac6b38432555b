"""Cluster settings that must hold before a GPU job starts: slurm/common.sh's interpreter check
(rao_check_torch: a CPU-only torch or no GPU with DEVICE=cuda, a torchrun that cannot forward SIGUSR1)
and the torch floor in pyproject.toml. No SLURM needed: the functions are sourced in bash."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = sys.executable


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("CONTAINER_IMAGE", "DRY_RUN", "RAO_TORCH_CHECK",
                                                      "CUDA_VISIBLE_DEVICES", "PYTHONPATH")}
    env.update(RAO_ROOT=str(REPO), OMP_NUM_THREADS="1", GPUS_PER_NODE="2")
    env.update(overrides)
    return env


def _check(launcher: str = "torchrun", script: str = "", **env: str) -> subprocess.CompletedProcess:
    """source common.sh; rao_setup; the launcher's command; rao_check_torch; then `script` (bash)."""
    cmd = "rao_torchrun_cmd rao_megatron.cli.train" if launcher == "torchrun" else "rao_python_cmd rao_megatron.cli.convert"
    body = f"set -euo pipefail; source slurm/common.sh; rao_setup; {cmd}; rao_check_torch; echo CHECK-PASSED; {script}"
    return subprocess.run(["bash", "-c", body], cwd=REPO, env=_env(**env), capture_output=True, text=True,
                          timeout=120)


def _fake_torch(root: Path, version: str, cuda: str | None, gpus: int, options: tuple[str, ...]) -> Path:
    """A stand-in `torch` package with just what the check reads (version, build, GPUs, torchrun's options)."""
    pkg = root / "torch"
    (pkg / "cuda").mkdir(parents=True)
    (pkg / "distributed").mkdir()
    (pkg / "__init__.py").write_text(f"__version__ = {version!r}\nfrom . import cuda, version\n")
    (pkg / "version.py").write_text(f"cuda = {cuda!r}\nhip = None\n")
    (pkg / "cuda" / "__init__.py").write_text(
        f"def is_available():\n    return {gpus} > 0\n\ndef device_count():\n    return {gpus}\n")
    (pkg / "distributed" / "__init__.py").write_text("")
    (pkg / "distributed" / "run.py").write_text(textwrap.dedent(f"""\
        import argparse

        def get_args_parser():
            p = argparse.ArgumentParser()
            for option in {list(options)!r}:
                p.add_argument(option)
            return p
        """))
    return root


OLD_TORCHRUN = ("--nnodes", "--nproc-per-node")                           # torch <= 2.9.x
TORCHRUN_2_10 = (*OLD_TORCHRUN, "--signals-to-handle")                    # 2.10, 2.11
TORCHRUN_2_12 = (*TORCHRUN_2_10, "--shutdown-timeout")                    # 2.12 and newer


def _one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if "error: " in ln]
    assert len(errors) == 1, stderr
    return errors[0]


# ---------------------------------------------------------------- DEVICE=cuda without CUDA stops


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a GPU: DEVICE=cuda is fine here")
def test_device_cuda_on_this_cpu_box_stops_the_job(tmp_path: Path) -> None:
    """The real interpreter, the real sbatch script, no DRY_RUN: exit 2 before anything is launched."""
    out = tmp_path / "run"
    p = subprocess.run(["bash", "slurm/rao_llama3.sbatch"], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=_env(DEVICE="cuda", PYTHON=VENV_PYTHON, CONFIG="examples/configs/rao_tiny.yaml",
                                OUTPUT_DIR=str(out)))
    assert p.returncode == 2, p.stdout + p.stderr
    line = _one_error_line(p.stderr)
    if torch.version.cuda is None:
        assert f"DEVICE=cuda but {VENV_PYTHON} has torch {torch.__version__} (CPU-only build)" in line
    else:
        assert f"DEVICE=cuda but {VENV_PYTHON} (torch {torch.__version__}, CUDA {torch.version.cuda}) sees no GPU" in line
    assert "or set DEVICE=cpu" in line
    assert "torch.distributed.run" not in p.stderr and not out.exists()  # nothing was launched


def test_device_cuda_with_a_cpu_only_torch_stops(tmp_path: Path) -> None:
    fake = _fake_torch(tmp_path, "2.13.0+cpu", None, 0, TORCHRUN_2_12)
    p = _check(DEVICE="cuda", PYTHON=VENV_PYTHON, PYTHONPATH=str(fake))
    assert p.returncode == 2 and "CHECK-PASSED" not in p.stdout
    assert (f"error: DEVICE=cuda but {VENV_PYTHON} has torch 2.13.0+cpu (CPU-only build); install the CUDA build "
            f"of torch there") in _one_error_line(p.stderr)


def test_device_cuda_with_a_cuda_torch_but_no_visible_gpu_stops(tmp_path: Path) -> None:
    fake = _fake_torch(tmp_path, "2.12.0+cu128", "12.8", 0, TORCHRUN_2_12)
    p = _check(DEVICE="cuda", PYTHON=VENV_PYTHON, PYTHONPATH=str(fake), CUDA_VISIBLE_DEVICES="")
    assert p.returncode == 2
    line = _one_error_line(p.stderr)
    assert f"DEVICE=cuda but {VENV_PYTHON} (torch 2.12.0+cu128, CUDA 12.8) sees no GPU" in line
    assert "CUDA_VISIBLE_DEVICES=)" in line and "--gres=gpu:N" in line


def test_device_cuda_with_gpus_passes_and_warns_about_too_few(tmp_path: Path) -> None:
    fake = _fake_torch(tmp_path, "2.12.0+cu128", "12.8", 4, TORCHRUN_2_12)
    p = _check(DEVICE="cuda", PYTHON=VENV_PYTHON, PYTHONPATH=str(fake), GPUS_PER_NODE="8")
    assert p.returncode == 0 and "CHECK-PASSED" in p.stdout, p.stderr
    assert "warning: 4 GPU(s) visible here but GPUS_PER_NODE=8" in p.stderr
    assert f"ok: {VENV_PYTHON}: torch 2.12.0+cu128, CUDA 12.8, 4 GPU(s)" in p.stderr


def test_device_cpu_with_this_torch_passes() -> None:
    p = _check(DEVICE="cpu", PYTHON=VENV_PYTHON)
    assert p.returncode == 0 and "CHECK-PASSED" in p.stdout, p.stderr
    assert f"ok: {VENV_PYTHON}: torch {torch.__version__}" in p.stderr


# ---------------------------------------------------------------- the torchrun floor (preemption)


def test_torchrun_without_signals_to_handle_stops(tmp_path: Path) -> None:
    """torch <= 2.9: torchrun would die of the SIGUSR1 that asks the workers to checkpoint."""
    fake = _fake_torch(tmp_path, "2.9.1", None, 0, OLD_TORCHRUN)
    p = _check(DEVICE="cpu", PYTHON=VENV_PYTHON, PYTHONPATH=str(fake))
    assert p.returncode == 2 and "CHECK-PASSED" not in p.stdout
    line = _one_error_line(p.stderr)
    assert f"{VENV_PYTHON} has torch 2.9.1, whose torchrun lacks --signals-to-handle (torch >= 2.10)" in line
    # a one-process step (the converter) does not use torchrun: the same interpreter is fine there
    p = _check("python", DEVICE="cpu", PYTHON=VENV_PYTHON, PYTHONPATH=str(fake))
    assert p.returncode == 0 and "CHECK-PASSED" in p.stdout, p.stderr


def test_torchrun_without_shutdown_timeout_warns(tmp_path: Path) -> None:
    fake = _fake_torch(tmp_path, "2.10.0", None, 0, TORCHRUN_2_10)
    p = _check(DEVICE="cpu", PYTHON=VENV_PYTHON, PYTHONPATH=str(fake))
    assert p.returncode == 0 and "CHECK-PASSED" in p.stdout, p.stderr
    assert "warning: torch 2.10.0: torchrun ignores TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torch >= 2.12)" in p.stderr


def test_missing_interpreter_and_missing_torch_are_one_line_errors(tmp_path: Path) -> None:
    p = _check(DEVICE="cpu", PYTHON=str(tmp_path / "nope" / "python"))
    assert p.returncode == 2 and "no such interpreter" in _one_error_line(p.stderr)
    empty = tmp_path / "site"
    empty.mkdir()
    (empty / "torch.py").write_text("raise ImportError('broken torch')\n")
    p = _check(DEVICE="cpu", PYTHON=VENV_PYTHON, PYTHONPATH=str(empty))
    assert p.returncode == 2 and "cannot import torch (ImportError: broken torch)" in _one_error_line(p.stderr)


def test_check_can_be_skipped_and_dry_run_skips_it(tmp_path: Path) -> None:
    fake = _fake_torch(tmp_path, "2.9.1", None, 0, OLD_TORCHRUN)
    for extra in ({"RAO_TORCH_CHECK": "0"}, {"DRY_RUN": "1"}):
        p = _check(DEVICE="cuda", PYTHON=VENV_PYTHON, PYTHONPATH=str(fake), **extra)
        assert p.returncode == 0 and "CHECK-PASSED" in p.stdout, p.stderr


# ---------------------------------------------------------------- in a container: each task checks


def test_container_tasks_check_their_interpreter_before_exec() -> None:
    """With CONTAINER_IMAGE inside Slurm the command is wrapped; run the wrapped command here (no srun)."""
    # the wrapper is `bash -c SCRIPT PYTHON -m MODULE ...`; swap `-m MODULE ...` for a print to see the exec
    run_it = 'RAO_CMD=("${RAO_CMD[@]:0:4}" -c "print(\'launched\')"); "${RAO_CMD[@]}"'
    body_env = dict(SLURM_JOB_ID="7", CONTAINER_IMAGE="img.sqsh", PYTHON=VENV_PYTHON)
    p = _check("python", script=run_it, DEVICE="cpu", **body_env)
    assert p.returncode == 0, p.stderr
    assert "launched" in p.stdout and f"ok: {VENV_PYTHON}: torch" in p.stderr
    if not torch.cuda.is_available():
        p = _check("python", script=run_it, DEVICE="cuda", **body_env)
        assert p.returncode == 2 and "launched" not in p.stdout
        assert "DEVICE=cuda but" in _one_error_line(p.stderr)


# ---------------------------------------------------------------- the torch floor in pyproject.toml


def _torch_requirement() -> Requirement:
    text = (REPO / "pyproject.toml").read_text()
    (line,) = re.findall(r'^\s*"(torch[<>=!~][^"]*)"', text, flags=re.M)
    return Requirement(line)


def test_pyproject_torch_floor() -> None:
    spec = _torch_requirement().specifier
    # torchrun --signals-to-handle: in the torch 2.10.0 wheels, not in 2.9.0 / 2.9.1
    assert not spec.contains("2.9.1") and spec.contains("2.10.0")
    # NGC containers ship pre-release builds (e.g. 25.12: 2.10.0a0+b4e4ee81d3): pip must keep them
    assert spec.contains("2.10.0a0+b4e4ee81d3", prereleases=True)
    # and it is no lower than megatron-core's own requirement
    (mcore,) = [Requirement(r) for r in metadata.requires("megatron-core") or []
                if Requirement(r).name == "torch" and not Requirement(r).marker]
    for s in mcore.specifier:
        if s.operator == ">=":
            assert all(Version(f.version) >= Version(s.version) for f in spec if f.operator == ">=")
    assert spec.contains(torch.__version__.split("+")[0])  # the installed one (CI's CPU build)
