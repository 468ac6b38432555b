"""Check ``lora``: LoRA on the Transformer Engine layer spec computes what it computes on the local spec.

On CPU the adapters are tested on Megatron's local linears only (TP/PP/DP/EP equivalence, tests/distributed/
test_lora.py). On the GPU the TE spec adapts other classes: the fused ``TELayerNormColumnParallelLinear`` (the
adapter reads the normalised input, recomputed from the layer's own norm weight), ``TERowParallelLinear`` and
the experts' TE linears (LoRA asks for one MLP per expert instead of the grouped GEMM). Same base weights and
the same non-zero adapters in both specs, on one GPU: the per-token log-probs and every adapter gradient must
agree to TF32 rounding; a missed norm or a wrong layout is off by O(1).
"""

from __future__ import annotations

import math
from typing import Any

from ..harness import FAIL, PASS, Check, Context, Results, Row
from ..workers import init_single_rank, random_ids, te_layer_types, token_logprobs

LORA_FAMILIES = ("qwen3", "qwen3_moe")  # q/k norms and MoE's sequential experts with TE linears
#: TE vs local spec on one GPU, fp32 weights (TE's GEMMs may use TF32): max |log-prob diff| in nats, and the
#: largest adapter-gradient difference relative to that gradient's largest entry
LORA_LP_TOL = 2e-2
LORA_GRAD_TOL = 2e-2


def check_lora(ctx: Context) -> list[Row]:
    done, res = ctx.worker("lora_specs", families=list(LORA_FAMILIES))
    return [judge_lora(fam, res.get(fam) or {"error": done.why() if not done.ok() else "no result"}, done.seconds)
            for fam in LORA_FAMILIES]


def judge_lora(fam: str, info: dict[str, Any], seconds: float = 0.0) -> Row:
    name = f"lora/{fam}_te_spec"
    if "error" in info:
        return Row(name, FAIL, info["error"], seconds, info)
    problems = []
    if not info.get("te_layers"):
        problems.append("no Transformer Engine layers in the model (not the TE spec)")
    if info.get("adapters_te") != info.get("adapters_local") or not info.get("adapters_te"):
        problems.append(f"adapters: {info.get('adapters_te')} on the TE spec, {info.get('adapters_local')} local")
    if not info.get("max_lp_diff", math.inf) <= LORA_LP_TOL:
        problems.append(f"max |log-prob diff| {info.get('max_lp_diff')} > {LORA_LP_TOL}")
    if not info.get("max_grad_rel_diff", math.inf) <= LORA_GRAD_TOL:
        problems.append(f"adapter gradient {info.get('worst_grad')}: relative diff {info.get('max_grad_rel_diff')} "
                        f"> {LORA_GRAD_TOL}")
    if problems:
        return Row(name, FAIL, "; ".join(problems), seconds, info)
    return Row(name, PASS, f"{info['adapters_te']} adapters on TE linears: log-probs max |diff| "
               f"{info['max_lp_diff']:.1e}, adapter gradients within {info['max_grad_rel_diff']:.1e} of the local "
               "spec's", seconds, info)


CHECK = Check("lora", f"LoRA on the TE layer spec (tiny {' and '.join(LORA_FAMILIES)}): log-probs and adapter "
              "gradients equal the local spec's on the same weights and adapters", check_lora, 240,
              ("transformer_engine",))


# ---------------------------------------------------------------------------------------------------------
# Workers (a fresh process each; torch and rao_megatron are imported inside the functions)
# ---------------------------------------------------------------------------------------------------------


def compare_lora_specs(family: str) -> dict[str, Any]:
    """One forward/backward of a tiny ``family`` LoRA model on the TE spec and on the local spec (same GPU,
    weights and non-zero adapters): the largest log-prob and adapter-gradient differences. Needs CUDA, TE and
    an initialised single rank; also run by tests/gpu/test_lora_gpu.py."""
    import torch
    from transformers import AutoModelForCausalLM

    from rao_megatron.models import lora, tiny_hf_config, unwrap_model
    from rao_megatron.models.hf_mappings import hf_checkpoint_layout
    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
    from rao_megatron.training.engine import build_model_chunks

    cfg = tiny_hf_config(family)
    torch.manual_seed(0)
    state = hf_checkpoint_layout(AutoModelForCausalLM.from_config(cfg).float().state_dict())
    ids = random_ids(cfg.vocab_size)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    out: dict[str, Any] = {}
    for spec in ("local", "te"):
        chunks = build_model_chunks(cfg, task="policy", wrap_ddp=False, use_te=spec == "te",
                                    lora=lora.LoraSpec(rank=4, alpha=8))
        load_hf_state_dict_into_megatron(chunks, state, cfg)
        lora.set_full_adapter_tensors(chunks, lora.random_full_adapters(chunks))
        model = unwrap_model(chunks[0])
        lp = token_logprobs(model, chunks[0](ids, pos, None), labels, cfg.vocab_size).float()[:, :-1]
        lp.mean().backward()
        out[spec] = (lp.detach(), lora.full_adapter_tensors(chunks, of="grad"), te_layer_types(model))
    (lp_l, g_l, _), (lp_t, g_t, te) = out["local"], out["te"]
    worst, rel = None, 0.0
    for key in g_l:
        for which, a, b in zip("AB", g_l[key], g_t.get(key, (None, None))):
            if b is None:
                return {"error": f"the TE model has no adapter {key}"}
            r = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
            if r > rel:
                worst, rel = f"{key}.{which}", r
    return {"te_layers": sorted(te), "adapters_local": len(g_l), "adapters_te": len(g_t),
            "max_lp_diff": float((lp_l - lp_t).abs().max()), "max_grad_rel_diff": rel, "worst_grad": worst}


def worker_lora_specs(a: dict[str, Any]) -> None:
    res = Results(a["result"])
    init_single_rank()
    for fam in a["families"]:
        try:
            res[fam] = compare_lora_specs(fam)
        except Exception as e:  # a row per family: one failing spec must not hide the other's result
            res[fam] = {"error": f"{type(e).__name__}: {e}"}


WORKERS = {"lora_specs": worker_lora_specs}
