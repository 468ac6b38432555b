"""GPU tests: skipped without CUDA. Model builds run in a child process with its own one-rank NCCL group, so
the pytest process never holds a process group or Megatron's parallel state."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

#: the marks of a test that builds Megatron models with Transformer Engine on CUDA
TE_ON_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                       reason="needs Transformer Engine (pip install -e .[gpu])"),
]


def run_child(script: str, out: Path, timeout: int = 300) -> None:
    """Run ``python script out`` as a one-rank job (RANK/WORLD_SIZE/MASTER_* set); fail with its stderr."""
    from rao_megatron.parallel.launch import free_port

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)}
    proc = subprocess.run([sys.executable, script, str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
