"""Check ``multi_gpu`` (two GPUs): TP2, DP2 and TP2 + sequence parallelism over NCCL give TP1's SFT losses."""

from __future__ import annotations

from pathlib import Path

from ..harness import (
    FAIL,
    RAO_TINY,
    Check,
    Context,
    Row,
    module_cmd,
    rank0_env,
    read_metrics,
    torchrun_cmd,
    train_args,
)
from ..judge import compare_losses

#: other reduction orders in bf16 (TP all-reduces, DP gradient averaging) over a few steps
PARALLEL_RTOL = 2e-2
PARALLEL_STEPS = 4


PARALLEL_LAYOUTS = {"tp2": ("parallel.tp=2",), "dp2": (), "tp2_sp": ("parallel.tp=2", "parallel.sequence_parallel=true")}


def parallel_args(out: Path, *extra: str) -> list[str]:
    return train_args(out, RAO_TINY, "train.task=sft", "loss.name=sft", f"train.steps={PARALLEL_STEPS}", *extra)


def check_multi_gpu(ctx: Context) -> list[Row]:
    tp1 = ctx.run("tp1", module_cmd("train", *parallel_args(ctx.dir / "tp1")), rank0_env())
    rows = []
    for name, extra in PARALLEL_LAYOUTS.items():
        if not tp1.ok():
            rows.append(Row(f"multi_gpu/{name}", FAIL, f"not compared: {tp1.why()}", tp1.seconds))
            continue
        done = ctx.run(name, torchrun_cmd(2, "train", *parallel_args(ctx.dir / name, *extra)))
        if not done.ok():
            rows.append(Row(f"multi_gpu/{name}", FAIL, done.why(), done.seconds))
            continue
        rows.append(compare_losses(f"multi_gpu/{name}", read_metrics(ctx.dir / name), read_metrics(ctx.dir / "tp1"),
                                   range(1, PARALLEL_STEPS + 1), rtol=PARALLEL_RTOL,
                                   what=f"SFT losses of {PARALLEL_STEPS} steps, {name} vs TP1", seconds=done.seconds))
    return rows


CHECK = Check("multi_gpu", f"TP2, DP2 and TP2 + sequence parallelism over NCCL: {PARALLEL_STEPS} SFT losses equal TP1 "
              f"(rtol {PARALLEL_RTOL})", check_multi_gpu, 240, ("transformer_engine",), gpus=2)
