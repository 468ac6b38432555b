"""Workers for the training-workflow tests: run the real CLIs inside forked gloo ranks."""

from __future__ import annotations

import contextlib
import io


def run_cli_worker(module: str, argv: list[str], result_path: str | None = None) -> None:
    """Run ``python -m <module> argv`` in this (already initialised) rank; rank 0 records exit code and stderr."""
    import importlib

    import torch.distributed as dist

    from rao_megatron.cli.common import run_cli

    mod = importlib.import_module(module)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_cli(mod.main, mod.parser(), argv)
    if result_path and dist.get_rank() == 0:
        with open(result_path, "w") as f:
            f.write(f"{code}\n{err.getvalue()}")
    if code != 0 and not result_path:
        raise SystemExit(f"{module} exited {code}: {err.getvalue()[-2000:]}")
