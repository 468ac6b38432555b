"""What the benchmark scripts share: a measurement in a fresh worker process that ends with one
``RESULT {json}`` line, the "median (min-max)" cell of the result tables and the verdict on a target.

Standard library only: peer_trl.py's TRL worker imports it under the TRL venv, where rao_megatron is absent.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

RESULT = "RESULT "


def print_result(**fields: Any) -> None:
    """A worker's last line: ``RESULT {json}`` of ``fields`` and the process's peak RSS (``ru_maxrss``) in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(RESULT + json.dumps({**fields, "peak_rss_gib": peak}), flush=True)


def run_result_worker(cmd: list[str], env: dict[str, str], failure: str) -> dict[str, Any]:
    """Run ``cmd`` and return the dict of its ``RESULT`` line plus ``wall_s``; if it fails, the tails of its output
    go to stderr and the benchmark stops with ``"<failure>, exit <code>"``."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{failure}, exit {proc.returncode}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith(RESULT))
    out = json.loads(line[len(RESULT):])
    out["wall_s"] = time.perf_counter() - t0
    return out


def spread(values: list[float], fmt: str) -> str:
    """The median of ``values``, and their min-max in parentheses when there is more than one."""
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def target_verdict(ratios: list[float], target: float, *, at_most: bool = False) -> str:
    """``met`` when every ratio reaches ``target`` (at least it; ``at_most``: at most it), ``met at the median``
    when their median does, else ``missed``."""
    def reaches(x: float) -> bool:
        return x <= target if at_most else x >= target

    if reaches(max(ratios) if at_most else min(ratios)):
        return "met"
    return "met at the median" if reaches(statistics.median(ratios)) else "missed"
