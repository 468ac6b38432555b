"""GPU acceptance run: everything the project promises on CUDA, checked in one command (<= 8 min on one H100/H200).

    python tools/gpu_check.py                        # every check; figures and logs in runs/gpu_check/
    python tools/gpu_check.py --dry-run              # list the checks (works without CUDA)
    python tools/gpu_check.py --only train,kernels --out runs/gpu_check_h200

Each row gets a verdict: PASS, FAIL, SKIP (with the reason: needs 2 GPUs, an optional package is not
installed, the GPU is not Hopper) or MISSING (a required package is not importable; the line says how to
install it -- nothing is installed for you). Every command runs as a subprocess under its check's time
limit, so a crash or a hang stays in its row and the other checks still run. ``--out`` keeps one
directory per check (its logs, metrics and checkpoints) and ``gpu_check.json``: every row's verdict,
seconds and measured figures, for docs/benchmarks.md.

Exit codes: 0 every row PASS or SKIP; 1 a row FAILed or is MISSING; 2 usage error or no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checks import (
    kernels,
    layer_specs,
    lora,
    models,
    moe,
    multi_gpu,
    preemption,
    pytest_gpu,
    smollm2,
    train,
    vllm,
)
from .harness import BUDGET_S, Check, Row, run_check, stop_all
from .probe import probe_environment, worker_probe
from .report import describe_environment, exit_code, print_row, print_summary, write_report

#: the checks in the order they run: a new check is a module under checks/ (its CHECK, its WORKERS) named here
CHECK_MODULES = (pytest_gpu, models, smollm2, layer_specs, lora, train, preemption, kernels, vllm, multi_gpu, moe)
CHECKS: tuple[Check, ...] = tuple(m.CHECK for m in CHECK_MODULES)
CHECK_NAMES = tuple(c.name for c in CHECKS)


def _workers() -> dict[str, Callable[[dict[str, Any]], None]]:
    """Every worker by the name ``Context.worker`` starts it under: the probe's and each check module's."""
    table: dict[str, Callable[[dict[str, Any]], None]] = {"probe": worker_probe}
    for module in CHECK_MODULES:
        for name, fn in getattr(module, "WORKERS", {}).items():
            if name in table:
                raise RuntimeError(f"worker {name!r} of {module.__name__} is already taken")
            table[name] = fn
    return table


WORKERS = _workers()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list every check with a one-line description and exit")
    p.add_argument("--only", metavar="NAME[,NAME]", help=f"run only these checks ({', '.join(CHECK_NAMES)})")
    p.add_argument("--out", default="runs/gpu_check", help="logs, run directories and gpu_check.json go here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    return p


def select(only: str | None) -> tuple[list[Check], str | None]:
    """The checks named by ``--only`` (all without it), or an error message naming the known ones."""
    if not only:
        return list(CHECKS), None
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECK_NAMES]
    if unknown or not names:
        return [], (f"unknown check(s) {', '.join(map(repr, unknown)) or repr(only)} in --only; "
                    f"known: {', '.join(CHECK_NAMES)}")
    return [c for c in CHECKS if c.name in names], None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.worker_args or "{}"))
        return 0
    checks, error = select(args.only)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{len(checks)} check(s); each runs its commands as subprocesses under its own time limit "
              f"(whole run <= {BUDGET_S // 60} min on one H100/H200):")
        for c in checks:
            needs = f"  [needs {', '.join(c.needs)}{', 2 GPUs' if c.gpus > 1 else ''}]" if c.needs or c.gpus > 1 else ""
            print(f"  {c.name:<11} {c.timeout_s:>4} s  {c.description}{needs}")
        return 0
    probe, why = probe_environment()
    if probe is None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if not probe.get("cuda"):
        print(f"error: no CUDA device: torch {probe.get('torch')} (CUDA build {probe.get('cuda_build')}) sees no GPU; "
              "the GPU acceptance run needs one (--dry-run lists the checks)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"gpu_check: {describe_environment(probe)}\n  results: {out / 'gpu_check.json'}", flush=True)
    rows: list[Row] = []
    try:
        for i, check in enumerate(checks, 1):
            print(f"[{i}/{len(checks)}] {check.name}: {check.description} (limit {check.timeout_s} s)", flush=True)
            t0 = time.monotonic()
            new = run_check(check, out, probe)
            for row in new:
                print_row(row)
            print(f"  ({check.name}: {time.monotonic() - t0:.1f} s)", flush=True)
            rows += new
            write_report(out, probe, rows, started, done=False)
    except KeyboardInterrupt:
        stop_all()
        write_report(out, probe, rows, started, done=False)
        print("interrupted", file=sys.stderr)
        return 130
    report = write_report(out, probe, rows, started, done=True)
    print_summary(rows, report, out)
    return exit_code(rows)
