"""Check ``moe``: tiny Qwen3-MoE on the GPU-only paths -- TE grouped GEMM, the all-to-all dispatcher, MoE training
at TP > 1 (sequence parallelism); EP over NCCL. The CPU tests cover the rest."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from ..harness import (
    FAIL,
    PASS,
    RAO_TINY,
    SKIP,
    Check,
    Context,
    Results,
    Row,
    base_env,
    module_cmd,
    rank0_env,
    read_metrics,
    torchrun_cmd,
    train_args,
)
from ..judge import add_later_steps, compare_losses, judge_training
from ..workers import hf_next_token_logprobs, init_single_rank, megatron_next_token_logprobs, random_ids
from .multi_gpu import PARALLEL_RTOL
from .smollm2 import SMOLLM2_MEAN_TOL

MOE_STEPS = 20
#: per-token log-probs of the TE model (grouped GEMM, all-to-all) vs HF in fp32, mean |diff| in nats: bf16 as
#: the SmolLM2 check; fp32 leaves room for TF32 in TE's GEMMs (an exact match is ~1e-6)
MOE_MEAN_TOL = {"bf16": SMOLLM2_MEAN_TOL, "fp32": 1e-2}
MOE_LAYOUTS = {"ep2": ("parallel.ep=2",), "tp2_sp": ("parallel.tp=2", "parallel.sequence_parallel=true"),
               "tp2_sp_ep2": ("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2", "parallel.etp=1")}


def moe_args(out: Path, steps: int, *extra: str) -> list[str]:
    return train_args(out, RAO_TINY, "model.preset=tiny-qwen3-moe", "train.reference=on_the_fly",
                      "model.moe_aux_loss_coeff=0.01", f"train.steps={steps}", *extra)


def judge_moe_forward(info: dict[str, Any], seconds: float = 0.0) -> Row:
    if "error" in info:
        return Row("moe/forward", FAIL, info["error"], seconds, info)
    problems = []
    for k, tol in MOE_MEAN_TOL.items():
        section = info.get(k) or {"error": "not reached"}
        if "error" in section:
            problems.append(f"{k}: {section['error']}")
        elif not section["mean_abs_diff"] <= tol:
            problems.append(f"{k}: mean |log-prob diff| {section['mean_abs_diff']:.2e} > {tol}")
    built = info.get("bf16") or {}
    if not built.get("grouped_gemm"):
        problems.append("experts are not TE's grouped GEMM (TEGroupedMLP)")
    if built.get("dispatcher") != "MoEAlltoAllTokenDispatcher":
        problems.append(f"token dispatcher {built.get('dispatcher')}, not all-to-all")
    if problems:
        return Row("moe/forward", FAIL, "; ".join(problems), seconds, info)
    return Row("moe/forward", PASS, "tiny Qwen3-MoE, TE grouped GEMM + all-to-all: log-probs vs HF fp32, mean |diff| "
               + ", ".join(f"{k} {info[k]['mean_abs_diff']:.1e}" for k in MOE_MEAN_TOL), seconds, info)


def check_moe(ctx: Context) -> list[Row]:
    done, info = ctx.worker("moe")
    rows = [judge_moe_forward(info if done.ok() or info else {"error": done.why()}, done.seconds)]
    one = ctx.run("train_1gpu", module_cmd("train", *moe_args(ctx.dir / "train_1gpu", MOE_STEPS)), rank0_env())
    if not one.ok():
        return rows + [Row("moe/train", FAIL, one.why(), one.seconds)]
    records = read_metrics(ctx.dir / "train_1gpu")
    row = judge_training("moe/train", records, MOE_STEPS, one.seconds)
    if row.verdict == PASS and not all("moe/load_balancing_loss" in r and "moe/aux_loss" in r for r in records):
        row = Row("moe/train", FAIL, "moe/load_balancing_loss or moe/aux_loss missing from metrics.jsonl", one.seconds)
    rows.append(row)
    for name, extra in MOE_LAYOUTS.items():
        if ctx.probe.get("gpus", 0) < 2:
            rows.append(Row(f"moe/{name}", SKIP, f"needs 2 GPUs (found {ctx.probe.get('gpus', 0)})"))
            continue
        run = ctx.run(name, torchrun_cmd(2, "train", *moe_args(ctx.dir / name, 3, *extra)))
        if not run.ok():
            rows.append(Row(f"moe/{name}", FAIL, run.why(), run.seconds))
            continue
        # step 1 sees the same weights and data at every layout; later steps are reported
        row = compare_losses(f"moe/{name}", read_metrics(ctx.dir / name), records, [1], rtol=PARALLEL_RTOL,
                             what=f"RAO step-1 loss of tiny Qwen3-MoE, {name} vs 1 GPU", seconds=run.seconds)
        add_later_steps(row, read_metrics(ctx.dir / name), records, (2, 3))
        rows.append(row)
    if ctx.probe.get("gpus", 0) >= 2:
        rows.append(check_uneven_ep2(ctx))
    return rows


def write_uneven_groups(path: Path) -> None:
    """20 groups of 4 responses, ~40% long (a 4-row micro-batch each at 256 tokens) and the rest short (two to a
    micro-batch): the two DP ranks' shares pack into different numbers of micro-batches."""
    rng = random.Random(7)
    rows = []
    for i in range(20):
        size = 34 if rng.random() < 0.4 else 6
        rows.append({"prompt": f"Say {'abcdefgh'[i % 8]}.",
                     "responses": ["".join(rng.choice("abcdefgh") for _ in range(size + j)) for j in range(4)],
                     "rewards": [round(rng.random(), 3) for _ in range(4)]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def uneven_args(out: Path, data: Path, *extra: str) -> list[str]:
    return moe_args(out, 2, "parallel.ep=2", f"data.train_path={data}", "data.eval_fraction=0.25",
                    "data.micro_batch_tokens=256", "data.groups_per_micro_batch=1", "train.global_batch_groups=14",
                    "train.eval_every=1", "model.moe_aux_loss_coeff=0", *extra)


def check_uneven_ep2(ctx: Context) -> Row:
    """EP2 over NCCL with packed micro-batches whose counts differ between the DP ranks (the all-to-all inside
    every forward hangs a rank one forward short): it finishes, and its losses equal the padded layout's."""
    data = ctx.dir / "uneven.jsonl"
    write_uneven_groups(data)
    runs = {name: (torchrun_cmd(2, "train", *uneven_args(ctx.dir / name, data, *extra)), base_env())
            for name, extra in (("ep2_uneven_packed", ()), ("ep2_uneven_padded", ("data.packing=false",)))}
    done = ctx.run_all(runs)
    for run in done.values():
        if not run.ok():
            return Row("moe/ep2_uneven", FAIL, run.why(), run.seconds)
    packed, padded = (read_metrics(ctx.dir / name) for name in runs)
    row = compare_losses("moe/ep2_uneven", packed, padded, [1], rtol=PARALLEL_RTOL,
                         what="EP2, uneven packed micro-batches per rank: RAO step-1 loss vs the padded layout",
                         seconds=done["ep2_uneven_packed"].seconds)
    add_later_steps(row, packed, padded, (2,))
    return row


CHECK = Check("moe", "tiny Qwen3-MoE: TE grouped GEMM + all-to-all log-probs vs HF; RAO trains in bf16 with the "
              "load-balancing metrics; with 2 GPUs EP2, TP2 + SP and TP2 + SP + EP2 step-1 losses equal 1 GPU's, and EP2 "
              "with uneven packed micro-batches per rank finishes with the padded layout's loss", check_moe, 260, ("transformer_engine",))


# ---------------------------------------------------------------------------------------------------------
# Worker (a fresh process; torch and rao_megatron are imported inside the functions)
# ---------------------------------------------------------------------------------------------------------


def _moe_vs_hf(cfg: Any, state: dict[str, Any], ids: Any, hf_lp: Any, dtype: Any) -> dict[str, Any]:
    import torch

    from rao_megatron.models import unwrap_model
    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
    from rao_megatron.training.engine import build_model_chunks

    chunks = build_model_chunks(cfg, task="reference", params_dtype=dtype)
    load_hf_state_dict_into_megatron(chunks, state, cfg)
    model = unwrap_model(chunks[0])
    layers = [m for m in model.modules() if type(m).__name__ == "MoELayer"]
    lp = megatron_next_token_logprobs(chunks, model, ids, cfg.vocab_size)
    diff = (lp - hf_lp).abs()
    out = {"grouped_gemm": any(type(m).__name__ == "TEGroupedMLP" for m in model.modules()),
           "dispatcher": type(layers[0].token_dispatcher).__name__ if layers else None,
           "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max())}
    del chunks, model
    torch.cuda.empty_cache()
    return out


def worker_moe(a: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from rao_megatron.models import tiny_hf_config

    res = Results(a["result"])
    init_single_rank()
    cfg = tiny_hf_config("qwen3_moe")
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().cuda().eval()
    ids = random_ids(cfg.vocab_size)
    hf_lp = hf_next_token_logprobs(hf, ids)
    state = {k: v.detach() for k, v in hf.state_dict().items()}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        res.section(name, lambda dtype=dtype: _moe_vs_hf(cfg, state, ids, hf_lp, dtype))


WORKERS = {"moe": worker_moe}
