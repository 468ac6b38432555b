"""The command spellings from before ``cli/`` (``python -m rao_megatron.<command>``) still run, with a note."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rao_megatron import MOVED_COMMANDS

REPO = Path(__file__).resolve().parents[2]


def test_every_moved_command_exists_under_cli():
    assert all((REPO / "rao_megatron" / "cli" / f"{name}.py").is_file() for name in MOVED_COMMANDS)


@pytest.mark.parametrize("name", ["convert", "annotate"])
def test_old_spelling_runs_the_command_and_names_the_new_module(name):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", f"rao_megatron.{name}", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"note: rao_megatron.{name} is now rao_megatron.cli.{name}" in proc.stderr
    new = subprocess.run([sys.executable, "-m", f"rao_megatron.cli.{name}", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("\n", 1)[1] == new.stdout.split("\n", 1)[1]  # the same parser (its prog line aside)
