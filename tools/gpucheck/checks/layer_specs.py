"""Check ``layer_specs``: checkpoints across layer specs. The converter builds the local spec on CPU, training the
TE spec on CUDA: a CPU-converted checkpoint must load into the TE model, and one saved from the TE model must
convert back on CPU bit-identical."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..harness import FAIL, PASS, Check, Context, Results, Row, base_env, module_cmd
from ..judge import compare_safetensors
from ..workers import (
    hf_next_token_logprobs,
    init_single_rank,
    megatron_next_token_logprobs,
    random_ids,
    te_layer_types,
)

SPEC_FAMILIES = ("qwen3", "qwen3_moe")  # q/k norms (TE norms with _extra_state); MoE's pre-MLP norm key
#: fp32 TE model vs HF fp32 on the same weights (TE's GEMMs may use TF32), mean |log-prob diff| in nats
SPEC_MEAN_TOL = 1e-2


def check_layer_specs(ctx: Context) -> list[Row]:
    cpu = base_env(CUDA_VISIBLE_DEVICES="")  # the converter as a user runs it: on CPU (the CPU venv's view)
    done, res = ctx.worker("spec_hf", families=list(SPEC_FAMILIES))
    rows: list[Row] = []
    for fam in SPEC_FAMILIES:
        d = ctx.dir / fam
        if not (d / "hf").is_dir():
            why = done.why() if not done.ok() else "no tiny HF checkpoint written"
            rows += [Row(f"layer_specs/{fam}_load", FAIL, why), Row(f"layer_specs/{fam}_export", FAIL, why)]
            continue
        conv = ctx.run(f"{fam}_hf_to_megatron", module_cmd("convert", "hf-to-megatron", "--hf", d / "hf", "--out",
                                                           d / "local_spec", "--dtype", "fp32", "--no-progress"), cpu)
        if not conv.ok():
            rows += [Row(f"layer_specs/{fam}_load", FAIL, conv.why(), conv.seconds),
                     Row(f"layer_specs/{fam}_export", FAIL, "not run: hf-to-megatron failed")]
            continue
        done, info = ctx.worker("spec_load", hf=str(d / "hf"), ckpt=str(d / "local_spec"), out=str(d / "te_spec"))
        rows.append(judge_spec_load(fam, info if info else {"error": done.why()}, done.seconds))
        if not (d / "te_spec").is_dir():
            rows.append(Row(f"layer_specs/{fam}_export", FAIL, "not run: the TE model wrote no checkpoint"))
            continue
        back = ctx.run(f"{fam}_megatron_to_hf", module_cmd("convert", "megatron-to-hf", "--megatron", d / "te_spec",
                                                          "--out", d / "hf_back", "--no-progress"), cpu)
        if not back.ok():
            rows.append(Row(f"layer_specs/{fam}_export", FAIL, back.why(), back.seconds))
            continue
        cmp = compare_safetensors(d / "hf", d / "hf_back")
        rows.append(Row(f"layer_specs/{fam}_export", PASS if cmp["identical"] else FAIL,
                        f"TE-spec checkpoint -> megatron-to-hf on CPU: {cmp['tensors']} tensors bit-identical"
                        if cmp["identical"] else f"differs: missing {cmp['only_in_original']}, extra "
                        f"{cmp['only_in_roundtrip']}, changed {cmp['different'][:3]}", back.seconds, cmp))
    return rows


def judge_spec_load(fam: str, info: dict[str, Any], seconds: float = 0.0) -> Row:
    name = f"layer_specs/{fam}_load"
    if "error" in info:
        return Row(name, FAIL, info["error"], seconds, info)
    problems = []
    if not info.get("te_layers"):
        problems.append("no Transformer Engine layers in the model (not the TE spec)")
    if not info.get("mean_abs_diff", math.inf) <= SPEC_MEAN_TOL:
        problems.append(f"mean |log-prob diff| vs HF {info.get('mean_abs_diff')} > {SPEC_MEAN_TOL}")
    if problems:
        return Row(name, FAIL, "; ".join(problems), seconds, info)
    return Row(name, PASS, f"CPU-converted (local spec) checkpoint loads into the fp32 TE model: log-probs vs HF mean "
               f"|diff| {info['mean_abs_diff']:.1e}", seconds, info)


CHECK = Check("layer_specs", f"tiny {' and '.join(SPEC_FAMILIES)}: converted on CPU (local spec), loaded into the fp32 "
              "TE model (log-probs vs HF); saved from the TE model, converted back on CPU bit-identical",
              check_layer_specs, 180, ("transformer_engine",))


# ---------------------------------------------------------------------------------------------------------
# Workers (a fresh process each; torch and rao_megatron are imported inside the functions)
# ---------------------------------------------------------------------------------------------------------


def worker_spec_hf(a: dict[str, Any]) -> None:
    """Tiny random HF checkpoints (fp32 safetensors) of the families whose keys differ between layer specs."""
    import torch
    from transformers import AutoModelForCausalLM

    from rao_megatron.models import tiny_hf_config

    res = Results(a["result"])
    for fam in a["families"]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_hf_config(fam)).float()
        model.save_pretrained(Path(a["dir"]) / fam / "hf")
        res[fam] = "written"


def worker_spec_load(a: dict[str, Any]) -> None:
    """The converter's (local-spec) checkpoint into the TE model: log-probs vs HF, then saved from the TE model."""
    import torch
    from transformers import AutoModelForCausalLM

    from rao_megatron.models import unwrap_model
    from rao_megatron.models.checkpoint import (
        load_model_checkpoint,
        read_checkpoint_meta,
        save_model_checkpoint,
    )
    from rao_megatron.training.engine import build_model_chunks

    res = Results(a["result"])
    init_single_rank()
    hf = AutoModelForCausalLM.from_pretrained(a["hf"], local_files_only=True, dtype=torch.float32).cuda().eval()
    cfg = hf.config
    ids = random_ids(cfg.vocab_size)
    hf_lp = hf_next_token_logprobs(hf, ids)
    del hf
    chunks = build_model_chunks(cfg, task="reference", params_dtype=torch.float32)
    load_model_checkpoint(chunks, a["ckpt"])
    model = unwrap_model(chunks[0])
    lp = megatron_next_token_logprobs(chunks, model, ids, cfg.vocab_size)
    diff = (lp - hf_lp).abs()
    res.data.update(te_layers=bool(te_layer_types(model)), mean_abs_diff=float(diff.mean()),
                    max_abs_diff=float(diff.max()))
    res.save()
    save_model_checkpoint(chunks, a["out"], read_checkpoint_meta(a["ckpt"]))
    res["saved"] = a["out"]


WORKERS = {"spec_hf": worker_spec_hf, "spec_load": worker_spec_load}
