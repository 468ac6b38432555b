"""Check ``train``: every task in bf16 with the distributed optimizer on CUDA; the log-prob kernels (triton vs
chunked) and the cached vs the on-the-fly reference compared on the first step's loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..harness import (
    DEPS,
    FAIL,
    MISSING,
    PASS,
    RAO_TINY,
    RM_TINY,
    Check,
    Context,
    Done,
    Row,
    module_cmd,
    rank0_env,
    read_metrics,
    train_args,
)
from ..judge import add_later_steps, compare_losses, finite, first_problem, judge_training

TRAIN_STEPS = 20

#: same bf16 model and data: the kernels differ only in fp32 summation order (bf16 operands are exact in
#: fp32 and TF32), so the first step's SFT loss agrees to ~1e-6; 1e-3 leaves a wide margin.
IMPL_RTOL = 1e-3
#: the cache and the on-the-fly reference run the same bf16 model on differently shaped micro-batches
#: (other GEMM tilings, other bf16 roundings); bf16's relative precision is 2^-8, hence 1e-2.
REFERENCE_RTOL = 1e-2


def train_runs(d: Path, *, triton: bool) -> dict[str, tuple[str, list[str]]]:
    """The first wave, run side by side: name -> (command, arguments)."""
    steps = f"train.steps={TRAIN_STEPS}"
    runs = {
        "rao": ("train", train_args(d / "rao", RAO_TINY, steps, "train.reference=on_the_fly")),
        "dpo": ("train", train_args(d / "dpo", RAO_TINY, steps, "loss.name=dpo", "train.reference=on_the_fly")),
        "bt": ("train", train_args(d / "bt", RM_TINY, steps)),
        "sft": ("train", train_args(d / "sft", RAO_TINY, steps, "train.task=sft", "loss.name=sft")),
        "precompute": ("precompute_reference", ["--config", str(RAO_TINY), "model.dtype=bf16", "parallel.device=cuda",
                                                f"data.reference_cache={d / 'ref_logps.safetensors'}"]),
    }
    # refused in one line before anything is built: TE's THD attention takes bf16/fp16 only
    runs["fp32_packed"] = ("train", train_args(d / "fp32_packed", RAO_TINY, "train.steps=1", "model.dtype=fp32",
                                               "data.packing=true"))
    # refused in one line too: the shared-prompt layout needs an attention mask, which TE's THD attention lacks
    runs["shared_prompt"] = ("train", train_args(d / "shared_prompt", RAO_TINY, "train.steps=1",
                                                 "data.packing=true", "data.shared_prompt=true"))
    if triton:
        runs["sft_triton"] = ("train", train_args(d / "sft_triton", RAO_TINY, "train.steps=3", "train.task=sft",
                                                  "loss.name=sft", "model.logprob_impl=triton"))
    return runs


def cached_run(d: Path) -> tuple[str, list[str]]:
    """The second wave: RAO on the reference cache the first wave wrote."""
    return "train", train_args(d / "rao_cached", RAO_TINY, "train.steps=3", "train.reference=cached",
                               f"data.reference_cache={d / 'ref_logps.safetensors'}")


def check_train(ctx: Context) -> list[Row]:
    d = ctx.dir
    runs = train_runs(d, triton=ctx.dep_ok("triton"))
    done = ctx.run_all({name: (module_cmd(cmd, *args), rank0_env()) for name, (cmd, args) in runs.items()})
    if done["precompute"].ok():
        cmd, args = cached_run(d)
        done["rao_cached"] = ctx.run("rao_cached", module_cmd(cmd, *args), rank0_env())

    rows = []
    for name in ("rao", "dpo", "bt", "sft"):
        if not done[name].ok():
            rows.append(Row(f"train/{name}", FAIL, done[name].why(), done[name].seconds))
        else:
            rows.append(judge_training(f"train/{name}", read_metrics(d / name), TRAIN_STEPS, done[name].seconds))
            rows[-1].figures["runs_sharing_the_gpu"] = len(runs)  # throughput figures are not benchmarks

    rows.append(judge_fp32_packed(done["fp32_packed"]))
    rows.append(judge_refused("train/shared_prompt_refused", done["shared_prompt"], SHARED_PROMPT_HINT,
                              "data.shared_prompt=true on CUDA with TE (THD attention takes no mask)"))

    if "sft_triton" not in done:
        rows.append(Row("train/triton_vs_chunked", MISSING, f"triton not importable: {DEPS['triton'].install}"))
    elif problem := first_problem(done["sft_triton"], "triton run") or first_problem(done["sft"], "chunked run"):
        rows.append(Row("train/triton_vs_chunked", FAIL, problem, done["sft_triton"].seconds))
    else:
        rows.append(compare_losses("train/triton_vs_chunked", read_metrics(d / "sft_triton"), read_metrics(d / "sft"),
                                   [1], rtol=IMPL_RTOL, what="SFT step-1 loss, model.logprob_impl triton vs chunked",
                                   seconds=done["sft_triton"].seconds))
        add_later_steps(rows[-1], read_metrics(d / "sft_triton"), read_metrics(d / "sft"), (2, 3))

    problem = (first_problem(done["precompute"], "precompute_reference")
               or first_problem(done.get("rao_cached"), "cached run") or first_problem(done["rao"], "on-the-fly run"))
    if problem:
        rows.append(Row("train/cached_vs_on_the_fly", FAIL, problem, done["precompute"].seconds))
    else:
        cached, otf = read_metrics(d / "rao_cached"), read_metrics(d / "rao")
        row = compare_losses("train/cached_vs_on_the_fly", cached, otf, [1], rtol=REFERENCE_RTOL,
                             what="RAO step-1 loss, train.reference=cached vs on_the_fly",
                             seconds=done["precompute"].seconds + done["rao_cached"].seconds)
        add_later_steps(row, cached, otf, (2, 3))
        # the loss's own metrics (implicit rewards, log Z, residual) at step 1: reference log-probs enter them directly
        row.figures["step1_metric_abs_diff"] = metric_diffs(cached[0], otf[0]) if cached and otf else {}
        rows.append(row)
    return rows


#: what the start-up check says for model.dtype=fp32 with data.packing=true on CUDA (parallel/startup.py)
FP32_PACKED_HINT = "set model.dtype=bf16 or data.packing=false"


#: what the start-up check says for data.shared_prompt=true under TE (training/run_data.py: shared_prompt)
SHARED_PROMPT_HINT = "config key 'data.shared_prompt'"


def judge_fp32_packed(done: Done) -> Row:
    """fp32 + packing on CUDA: exit 2 with the one-line start-up error, not a failure inside the attention."""
    return judge_refused("train/fp32_packed_refused", done, FP32_PACKED_HINT,
                         "model.dtype=fp32 + data.packing=true on CUDA")


def judge_refused(name: str, done: Done, hint: str, what: str) -> Row:
    """A setting the GPU cannot run: exit 2 with the one-line start-up error naming it, and no traceback."""
    log = done.log.read_text(errors="replace") if done.log.is_file() else ""
    if done.rc == 2 and hint in log and "Traceback" not in log:
        return Row(name, PASS, f"{what}: refused at start-up in one line (exit 2)", done.seconds)
    return Row(name, FAIL, f"expected exit 2 with {hint!r} and no traceback; "
               f"{done.why() if done.rc else 'it ran (exit 0)'}", done.seconds)


def metric_diffs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """|a[k] - b[k]| for the loss metrics two step records share (timings and memory left out)."""
    skip = {"step", "lr", "tokens_per_s", "step_time_s", "gpu_max_mem_gib", "grad_norm"}
    return {k: abs(a[k] - b[k]) for k in sorted(set(a) & set(b) - skip) if finite(a[k]) and finite(b[k])}


CHECK = Check("train", f"{TRAIN_STEPS} steps each of rao, dpo, bt, sft in bf16 with the distributed optimizer on "
              "CUDA (loss finite and falling, gpu_max_mem_gib); triton vs chunked and cached vs on-the-fly first-step "
              "loss; fp32 + packing and the shared-prompt layout refused in one line", check_train, 240, ("transformer_engine",))
