"""Run the package's own commands as subprocesses (the quick-start and online GRAO chain them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class CommandError(RuntimeError):
    """A chained command failed; the message names it and its exit code."""


def command_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    return env


def run_command(args: list[object]) -> None:
    """Run a command with its output (progress bars) going straight to the terminal; raise on failure."""
    argv = [str(a) for a in args]
    print("  $ " + " ".join(argv), flush=True)
    proc = subprocess.run(argv, env=command_env(), cwd=REPO)
    if proc.returncode != 0:
        raise CommandError(f"command failed with exit code {proc.returncode}: {' '.join(argv)}")


def python_module(module: str, *args: object) -> list[object]:
    return [sys.executable, "-m", module, *args]


def torchrun_module(procs: int, module: str, *args: object) -> list[object]:
    """``torchrun --nproc-per-node procs -m module ...`` on a port derived from this process's id."""
    port = 29500 + (os.getpid() % 2000)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", procs, "--master-port", port,
            "-m", module, *args]


def fresh_dir(path: Path) -> Path:
    """Remove what an interrupted earlier attempt left behind (the converters want a new directory)."""
    if path.exists():
        shutil.rmtree(path)
    return path


def run_chain(fn: Callable[[], object]) -> int:
    """Run a chain of commands: 0, or 1 with one line naming the failed command (a rerun resumes the chain)."""
    try:
        fn()
    except CommandError as e:
        print(f"error: {e}\nfix it and run the same command again: finished steps are skipped", file=sys.stderr)
        return 1
    return 0
