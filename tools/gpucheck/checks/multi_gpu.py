"""Check ``multi_gpu`` (two GPUs): TP2, DP2 and TP2 + sequence parallelism over NCCL give TP1's SFT losses; so does
LoRA at TP2 + sequence parallelism (the adapters' sequence gather / scatter, which the CPU cannot run) against
LoRA at TP1."""

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
#: LoRA adapters, with an lr at which they move the SFT loss within the few steps
LORA = ("peft.method=lora", "peft.rank=8", "train.lr=1e-2")

#: name -> (settings of the TP1 run it is compared with, the layout's own settings)
PARALLEL_LAYOUTS = {"tp2": ((), ("parallel.tp=2",)), "dp2": ((), ()),
                    "tp2_sp": ((), ("parallel.tp=2", "parallel.sequence_parallel=true")),
                    "tp2_sp_lora": (LORA, ("parallel.tp=2", "parallel.sequence_parallel=true"))}


def parallel_args(out: Path, *extra: str) -> list[str]:
    return train_args(out, RAO_TINY, "train.task=sft", "loss.name=sft", f"train.steps={PARALLEL_STEPS}", *extra)


def check_multi_gpu(ctx: Context) -> list[Row]:
    references = {}
    for settings in dict.fromkeys(ref for ref, _ in PARALLEL_LAYOUTS.values()):
        name = "tp1_lora" if settings else "tp1"
        references[settings] = name, ctx.run(name, module_cmd("train", *parallel_args(ctx.dir / name, *settings)),
                                             rank0_env())
    rows = []
    for name, (settings, extra) in PARALLEL_LAYOUTS.items():
        ref_name, ref = references[settings]
        if not ref.ok():
            rows.append(Row(f"multi_gpu/{name}", FAIL, f"not compared: {ref.why()}", ref.seconds))
            continue
        done = ctx.run(name, torchrun_cmd(2, "train", *parallel_args(ctx.dir / name, *settings, *extra)))
        if not done.ok():
            rows.append(Row(f"multi_gpu/{name}", FAIL, done.why(), done.seconds))
            continue
        rows.append(compare_losses(f"multi_gpu/{name}", read_metrics(ctx.dir / name), read_metrics(ctx.dir / ref_name),
                                   range(1, PARALLEL_STEPS + 1), rtol=PARALLEL_RTOL,
                                   what=f"SFT losses of {PARALLEL_STEPS} steps, {name} vs {ref_name}",
                                   seconds=done.seconds))
    return rows


CHECK = Check("multi_gpu", f"TP2, DP2 and TP2 + sequence parallelism over NCCL (and LoRA at TP2 + SP): {PARALLEL_STEPS} "
              f"SFT losses equal TP1 (rtol {PARALLEL_RTOL})", check_multi_gpu, 300, ("transformer_engine",), gpus=2)
