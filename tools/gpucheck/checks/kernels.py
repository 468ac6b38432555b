"""Check ``kernels``: the log-prob kernels at T=8192, H=4096, V in {128256, 64128}: chunked and triton against an
fp32 slice, time and peak memory against the naive path (full logits + log_softmax) and Liger; FP8 on Hopper.

The inputs and the CUDA measurement are benchmarks/logprobs.py's (``make_inputs``, ``cuda_measure``,
``cuda_time_and_memory``): the benchmark and this check time kernels the same way.
"""

from __future__ import annotations

import importlib.util
import json
import math
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..harness import DEPS, FAIL, MISSING, PASS, SKIP, Check, Context, Row, error_line

KERNEL_T, KERNEL_H, KERNEL_VOCABS, KERNEL_SLICE = 8192, 4096, (128256, 64128), 512
#: against fp32 log-softmax of the same bf16 inputs on the first KERNEL_SLICE tokens. bf16: the operands are
#: exact, only rounding of the bf16 product and summation order differ (tests/gpu/test_logprobs_gpu.py uses
#: the same 0.05). fp8: E4M3 operands carry 2^-4 relative error, a few hundredths of a nat per logit.
KERNEL_TOL = {"bf16": {"max_abs_diff": 0.05, "mean_abs_diff": 0.01, "grad_hidden_rel_err": 0.02,
                       "grad_weight_rel_err": 0.02},
              "fp8": {"max_abs_diff": 0.5, "mean_abs_diff": 0.15}}  # fp8 gradients (E5M2) are reported only
#: the point of the fused kernels: far less than the naive [T, V] logits (+ their log_softmax and grads)
KERNEL_MEM_RATIO = 0.5


def _kernel_records(recs: list[dict[str, Any]], kind: str, precision: str) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["V"], r["impl"]): r for r in recs if r.get("kind") == kind and r.get("precision") == precision}


def kernel_rows(recs: list[dict[str, Any]], *, triton: bool, hopper: bool, liger: bool) -> list[Row]:
    """The kernel check's rows from the worker's records (accuracy and perf, one per V, precision, impl)."""
    impls = ["chunked", "triton"] if triton else ["chunked"]
    rows = []
    # accuracy, bf16
    acc = _kernel_records(recs, "accuracy", "bf16")
    problems, figures = [], {}
    for v in KERNEL_VOCABS:
        for impl in impls:
            r = acc.get((v, impl))
            figures[f"V{v}/{impl}"] = r
            if r is None or "error" in r:
                problems.append(f"{impl} V={v}: {r.get('error') if r else 'no result'}")
                continue
            problems += [f"{impl} V={v}: {k} {r[k]:.3g} > {tol}" for k, tol in KERNEL_TOL["bf16"].items()
                         if not r.get(k, math.inf) <= tol]
    note = "" if triton else f" (triton MISSING: {DEPS['triton'].install})"
    rows.append(Row("kernels/accuracy_bf16", FAIL if problems else PASS,
                    "; ".join(problems) if problems else
                    f"{' and '.join(impls)} vs fp32 on {KERNEL_SLICE} tokens at V={'/'.join(map(str, KERNEL_VOCABS))}: "
                    f"max |Δ| {max(f['max_abs_diff'] for f in figures.values()):.2e} nats" + note, 0.0, figures))
    # memory and time vs the naive path (full logits + log_softmax), bf16
    perf = _kernel_records(recs, "perf", "bf16")
    problems, figures = [], {}
    for v in KERNEL_VOCABS:
        naive = perf.get((v, "reference"))
        for impl in impls:
            r = perf.get((v, impl))
            if not naive or not r or "error" in naive or "error" in r:
                why = (r or {}).get("error") or (naive or {}).get("error") or "no result"
                problems.append(f"{impl} V={v}: no measurement ({why})")
                continue
            ratio = r["extra_bytes"] / naive["extra_bytes"]
            figures[f"V{v}/{impl}"] = {"time_s": r["time_s"], "peak_extra_gib": r["extra_bytes"] / 2**30,
                                       "time_vs_naive": r["time_s"] / naive["time_s"], "mem_vs_naive": ratio,
                                       "naive_time_s": naive["time_s"], "naive_peak_extra_gib": naive["extra_bytes"] / 2**30}
            if ratio > KERNEL_MEM_RATIO:
                problems.append(f"{impl} V={v}: peak extra memory {ratio:.2f}x the naive path's (limit {KERNEL_MEM_RATIO})")
    summary = ", ".join(f"{k} mem {f['mem_vs_naive']:.2f}x time {f['time_vs_naive']:.2f}x" for k, f in figures.items())
    rows.append(Row("kernels/vs_naive", FAIL if problems else PASS, "; ".join(problems) if problems else
                    f"vs full logits + log_softmax: {summary}", 0.0, figures))
    # triton vs chunked: which is faster (the Triton backward adds dW/dH with atomics)
    if not triton:
        rows.append(Row("kernels/triton_vs_chunked", MISSING, f"triton not importable: {DEPS['triton'].install}"))
    else:
        figures, parts = {}, []
        for v in KERNEL_VOCABS:
            c, t = perf.get((v, "chunked")), perf.get((v, "triton"))
            if c and t and "time_s" in c and "time_s" in t:
                ratio = t["time_s"] / c["time_s"]
                faster = "triton" if ratio < 1 else "chunked"
                figures[f"V{v}"] = {"triton_s": t["time_s"], "chunked_s": c["time_s"], "triton_over_chunked": ratio,
                                    "faster": faster}
                parts.append(f"V={v}: {faster} faster (triton {t['time_s'] * 1e3:.0f} ms, chunked "
                             f"{c['time_s'] * 1e3:.0f} ms)")
        rows.append(Row("kernels/triton_vs_chunked", PASS if parts else FAIL,
                        "; ".join(parts) or "no timing of both kernels", 0.0, figures))
    # fp8 (chunked) on Hopper
    if not hopper:
        rows.append(Row("kernels/fp8", SKIP, "FP8 runs on Hopper (sm_90+) only"))
    else:
        acc8, perf8 = _kernel_records(recs, "accuracy", "fp8"), _kernel_records(recs, "perf", "fp8")
        problems, figures = [], {}
        for v in KERNEL_VOCABS:
            r, p, b = acc8.get((v, "chunked")), perf8.get((v, "chunked")), perf.get((v, "chunked"))
            figures[f"V{v}"] = {"accuracy": r, "time_s": (p or {}).get("time_s"),
                                "time_vs_bf16_chunked": p["time_s"] / b["time_s"] if p and b and "time_s" in p
                                and "time_s" in b else None}
            if r is None or "error" in r:
                problems.append(f"V={v}: {r.get('error') if r else 'no result'}")
                continue
            problems += [f"V={v}: {k} {r[k]:.3g} > {tol}" for k, tol in KERNEL_TOL["fp8"].items()
                         if not r.get(k, math.inf) <= tol]
        rows.append(Row("kernels/fp8", FAIL if problems else PASS, "; ".join(problems) if problems else
                        "chunked fp8 within tolerance: " + ", ".join(
                            f"V={v} max |Δ| {figures[f'V{v}']['accuracy']['max_abs_diff']:.3f}" for v in KERNEL_VOCABS),
                        0.0, figures))
    # Liger's fused linear cross-entropy
    if not liger:
        rows.append(Row("kernels/liger", SKIP, f"liger_kernel not installed ({DEPS['liger_kernel'].install})"))
    else:
        figures, parts, errors = {}, [], []
        for v in KERNEL_VOCABS:
            lg = perf.get((v, "liger"))
            if not lg or "error" in lg:
                errors.append(f"V={v}: {(lg or {}).get('error', 'no result')}")
                continue
            for impl in impls:
                r = perf.get((v, impl))
                if r and "time_s" in r:
                    figures[f"V{v}/{impl}"] = {"time_vs_liger": r["time_s"] / lg["time_s"],
                                               "mem_vs_liger": r["extra_bytes"] / lg["extra_bytes"],
                                               "liger_time_s": lg["time_s"], "liger_peak_extra_gib": lg["extra_bytes"] / 2**30}
                    parts.append(f"{impl} V={v}: time {r['time_s'] / lg['time_s']:.2f}x, "
                                 f"mem {r['extra_bytes'] / lg['extra_bytes']:.2f}x")
        if errors and not parts:  # Liger's own trouble is not this project's failure
            rows.append(Row("kernels/liger", SKIP, "liger measurement failed: " + "; ".join(errors), 0.0, figures))
        else:
            rows.append(Row("kernels/liger", PASS, "vs Liger fused linear CE: " + "; ".join(parts), 0.0, figures))
    return rows


def check_kernels(ctx: Context) -> list[Row]:
    results = ctx.dir / "kernels.jsonl"
    done, _ = ctx.worker("kernels", records=str(results))
    recs = [json.loads(x) for x in results.read_text().splitlines() if x.strip()] if results.is_file() else []
    capability = tuple(ctx.probe.get("capability") or (0, 0))
    rows = kernel_rows(recs, triton=ctx.dep_ok("triton"), hopper=capability >= (9, 0), liger=ctx.dep_ok("liger_kernel"))
    for row in rows:
        row.seconds = done.seconds
        if row.verdict == FAIL and not done.ok():
            row.reason += f" [{done.why()}]"
    return rows


CHECK = Check("kernels", f"log-prob kernels at T={KERNEL_T} H={KERNEL_H} V={'/'.join(map(str, KERNEL_VOCABS))}: "
              "chunked and triton vs an fp32 slice, time and peak memory vs the naive path and Liger; FP8 on Hopper",
              check_kernels, 200)


# ---------------------------------------------------------------------------------------------------------
# Worker (a fresh process; torch, rao_megatron and benchmarks/logprobs.py are imported inside the functions)
# ---------------------------------------------------------------------------------------------------------


def _kernel_accuracy(v: int, precision: str, impl: str) -> dict[str, Any]:
    """Log-probs and gradients of the first KERNEL_SLICE tokens vs fp32 full logits + log_softmax of the same inputs."""
    import torch

    from benchmarks.logprobs import make_inputs
    from rao_megatron.logprobs import vocab_parallel_logprobs

    t, h, n = KERNEL_T, KERNEL_H, KERNEL_SLICE
    hidden, weight, labels = make_inputs(t, h, v, "cuda", torch.bfloat16)
    upstream = torch.zeros(t, device="cuda")
    upstream[:n] = 1.0  # the gradients then come from the slice alone
    out = vocab_parallel_logprobs(hidden, weight, labels, impl=impl, precision=precision)
    (out * upstream).sum().backward()
    got, g_h, g_w = out.detach()[:n].float(), hidden.grad[:n].float(), weight.grad.float()
    del out
    hidden.grad = weight.grad = None
    h32 = hidden.detach()[:n].float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = torch.log_softmax(h32 @ w32.t(), dim=-1).gather(1, labels[:n, None]).squeeze(1)
    ref.sum().backward()
    d = (got - ref.detach()).abs()

    def rel(a: Any, b: Any) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    return {"slice_tokens": n, "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "grad_hidden_rel_err": rel(g_h, h32.grad), "grad_weight_rel_err": rel(g_w, w32.grad)}


def _liger_measure(v: int) -> dict[str, Any]:
    """Time and peak extra memory of Liger's fused linear cross-entropy (sum over tokens), as cuda_measure does."""
    import torch
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    from benchmarks.logprobs import cuda_time_and_memory, make_inputs

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    hidden, weight, labels = make_inputs(KERNEL_T, KERNEL_H, v, "cuda", torch.bfloat16)

    def step() -> None:
        out = loss_fn(weight, hidden, labels)
        loss = getattr(out, "loss", out)
        (loss[0] if isinstance(loss, tuple) else loss).backward()

    def clear() -> None:
        hidden.grad = weight.grad = None

    return {"T": KERNEL_T, "H": KERNEL_H, "V": v, **cuda_time_and_memory(step, clear)}


def worker_kernels(a: dict[str, Any]) -> None:
    import torch

    from benchmarks.logprobs import cuda_measure

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference slice must be fp32
    records = Path(a["records"])
    records.write_text("")

    def emit(key: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> None:
        try:
            rec = {**key, **fn()}
        except Exception as e:  # noqa: BLE001 - an OOM or a kernel error is one record, the rest goes on
            traceback.print_exc()
            rec = {**key, "error": error_line(e, 300)}
        torch.cuda.empty_cache()
        print(json.dumps(rec), flush=True)
        with records.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    triton = importlib.util.find_spec("triton") is not None
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    liger = importlib.util.find_spec("liger_kernel") is not None
    for v in KERNEL_VOCABS:
        plans = [("bf16", ["chunked", "triton"] if triton else ["chunked"])] + ([("fp8", ["chunked"])] if hopper else [])
        for precision, impls in plans:
            for impl in impls:
                emit({"kind": "accuracy", "V": v, "precision": precision, "impl": impl},
                     lambda v=v, impl=impl, precision=precision: _kernel_accuracy(v, precision, impl))
            for impl in ["reference", *impls]:  # "reference" is the naive path: full logits + log_softmax
                emit({"kind": "perf", "V": v, "precision": precision, "impl": impl},
                     lambda v=v, impl=impl, precision=precision: cuda_measure(impl, KERNEL_T, KERNEL_H, v, precision))
        if liger:
            emit({"kind": "perf", "V": v, "precision": "bf16", "impl": "liger"}, lambda v=v: _liger_measure(v))


WORKERS = {"kernels": worker_kernels}
