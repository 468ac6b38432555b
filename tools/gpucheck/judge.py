"""Judgements several checks share: pure functions of measured figures (tests/unit/test_gpu_check.py covers them).

A check's own judgements (one row's tolerances and wording) stay in its module under checks/.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .harness import FAIL, PASS, Done, Row


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def judge_training(name: str, records: list[dict[str, Any]], steps: int, seconds: float = 0.0) -> Row:
    """Loss finite at every step and falling (mean of the first 5 > mean of the last 5); GPU memory logged."""
    losses = [r.get("loss") for r in records]
    figures: dict[str, Any] = {"steps": len(records)}
    problems = []
    if len(records) != steps:
        problems.append(f"{len(records)} of {steps} steps in metrics.jsonl")
    bad = [r.get("step") for r in records if not finite(r.get("loss"))]
    if bad:
        problems.append(f"non-finite loss at steps {bad[:5]}")
    elif len(losses) >= 10:
        first, last = mean(losses[:5]), mean(losses[-5:])
        figures.update(first_loss=losses[0], last_loss=losses[-1], first5_mean=first, last5_mean=last)
        if not first > last:
            problems.append(f"loss did not fall: first 5 steps {first:.4g}, last 5 {last:.4g}")
    mem = [r["gpu_max_mem_gib"] for r in records if finite(r.get("gpu_max_mem_gib"))]
    if mem:
        figures["gpu_max_mem_gib"] = max(mem)
    elif records:
        problems.append("metrics.jsonl has no gpu_max_mem_gib (the trainer writes it on CUDA)")
    tps = sorted(r["tokens_per_s"] for r in records if finite(r.get("tokens_per_s")))
    if tps:
        figures["tokens_per_s_median"] = tps[len(tps) // 2]
    skipped = max((r.get("skipped_steps") or 0 for r in records), default=0)
    if skipped:
        problems.append(f"{skipped} skipped (non-finite) steps")
    if problems:
        return Row(name, FAIL, "; ".join(problems), seconds, figures)
    reason = f"loss {figures['first5_mean']:.4g} -> {figures['last5_mean']:.4g} (mean of first/last 5)"
    return Row(name, PASS, reason + f", gpu_max_mem {figures['gpu_max_mem_gib']:.2f} GiB", seconds, figures)


def compare_losses(name: str, got: list[dict[str, Any]], want: list[dict[str, Any]], steps: Iterable[int], *,
                   rtol: float, what: str, seconds: float = 0.0) -> Row:
    """The losses of ``got`` at ``steps`` equal those of ``want`` within ``rtol`` (relative)."""
    g = {r.get("step"): r.get("loss") for r in got}
    w = {r.get("step"): r.get("loss") for r in want}
    figures: dict[str, Any] = {"rtol": rtol, "steps": {}}
    worst = 0.0
    for s in steps:
        if not (finite(g.get(s)) and finite(w.get(s))):
            return Row(name, FAIL, f"no finite loss at step {s} in both runs ({what})", seconds, figures)
        d = rel_diff(g[s], w[s])
        figures["steps"][str(s)] = {"loss": g[s], "reference_loss": w[s], "rel_diff": d}
        worst = max(worst, d)
    figures["max_rel_diff"] = worst
    figures["bit_identical"] = all(v["loss"] == v["reference_loss"] for v in figures["steps"].values())
    verdict = PASS if worst <= rtol else FAIL
    return Row(name, verdict, f"{what}: max relative loss difference {worst:.2e} (tolerance {rtol:.0e})"
               + (", bit-identical" if figures["bit_identical"] else ""), seconds, figures)


def first_problem(done: Done | None, what: str) -> str | None:
    if done is None:
        return f"{what}: not run"
    return None if done.ok() else done.why()


def add_later_steps(row: Row, got: list[dict[str, Any]], want: list[dict[str, Any]], steps: tuple[int, ...]) -> None:
    """Report (not judge) later steps: they add the backward pass and one bf16 optimizer update."""
    g = {r.get("step"): r.get("loss") for r in got}
    w = {r.get("step"): r.get("loss") for r in want}
    row.figures["later_steps_rel_diff"] = {str(s): rel_diff(g[s], w[s]) for s in steps
                                           if finite(g.get(s)) and finite(w.get(s))}


def compare_safetensors(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    """Tensor-by-tensor comparison of two HF directories' safetensors: names, dtypes, shapes and bits."""
    import torch
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(a_dir), tensors(b_dir)
    res: dict[str, Any] = {"tensors": len(a), "only_in_original": sorted(set(a) - set(b))[:10],
                           "only_in_roundtrip": sorted(set(b) - set(a))[:10], "different": [], "bytes": 0}
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # NaN != NaN, -0.0 == 0.0 as values
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        res["bytes"] += x.numel() * x.element_size()
        same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(
            x.contiguous().view(-1).view(bits[x.element_size()]), y.contiguous().view(-1).view(bits[y.element_size()]))
        if not same:
            res["different"].append(f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
    res["identical"] = bool(a) and not (res["only_in_original"] or res["only_in_roundtrip"] or res["different"])
    return res
