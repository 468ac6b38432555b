"""Check ``smollm2``: SmolLM2-135M converted on CPU, per-token log-probs of the bf16 TE model on CUDA vs HF fp32,
converted back bit-identical."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..harness import FAIL, PASS, Check, Context, Results, Row, ensure_smollm2, module_cmd
from ..judge import compare_safetensors
from ..workers import init_single_rank, te_layer_types, token_logprobs

#: bf16 keeps 8 significant bits (unit roundoff 2^-9); SmolLM2's logits are O(10-30), so through 30 layers
#: each token's log-prob moves by a few hundredths of a nat: measured 0.063 nats/token mean for the bf16
#: model (local spec, CPU) vs 7e-6 for the same checkpoint in fp32. 0.1 leaves room for that rounding
#: noise and is still far below what a wrong tensor mapping, rope or norm gives (whole nats per token).
SMOLLM2_MEAN_TOL = 0.1


def check_smollm2(ctx: Context) -> list[Row]:
    hf, problem = ensure_smollm2(ctx)
    if problem is not None:
        return [problem]
    ckpt, back = ctx.dir / "megatron", ctx.dir / "hf_roundtrip"
    to_mcore = ctx.run("hf_to_megatron", module_cmd("convert", "hf-to-megatron", "--hf", hf, "--out", ckpt,
                                                    "--dtype", "fp32", "--no-progress"))
    rows = [Row("smollm2/convert", PASS if to_mcore.ok() else FAIL,
                "hf-to-megatron on CPU (fp32)" if to_mcore.ok() else to_mcore.why(), to_mcore.seconds)]
    if not to_mcore.ok():
        return rows + [Row("smollm2/logprobs", FAIL, "not run: hf-to-megatron failed"),
                       Row("smollm2/roundtrip", FAIL, "not run: hf-to-megatron failed")]
    done, res = ctx.worker("smollm2", hf=str(hf), ckpt=str(ckpt))
    bf16 = res.get("bf16", {"error": done.why() if not done.ok() else "no result"})
    figures = {k: res.get(k) for k in ("bf16", "fp32", "sequences", "hf")}
    if "error" in bf16:
        rows.append(Row("smollm2/logprobs", FAIL, f"bf16 TE model: {bf16['error']}", done.seconds, figures))
    else:
        ok = bf16["mean_abs_diff"] <= SMOLLM2_MEAN_TOL and bf16.get("te_layers")
        fp32 = res.get("fp32", {})
        fp32_note = (f"; fp32 TE model (reported, TE may use TF32): mean {fp32['mean_abs_diff']:.2e}"
                     if "mean_abs_diff" in fp32 else "")
        rows.append(Row("smollm2/logprobs", PASS if ok else FAIL,
                        ("" if bf16.get("te_layers") else "no Transformer Engine layers in the model; ")
                        + f"bf16 TE model vs HF fp32 over {bf16['tokens']} tokens: mean |Δ| {bf16['mean_abs_diff']:.4f} "
                        f"nats/token (tolerance {SMOLLM2_MEAN_TOL}), max {bf16['max_abs_diff']:.3f}, "
                        f"max |Δ R(y)| {bf16['max_abs_diff_response_sum']:.3f}{fp32_note}", done.seconds, figures))
    to_hf = ctx.run("megatron_to_hf", module_cmd("convert", "megatron-to-hf", "--megatron", ckpt, "--out", back,
                                                 "--no-progress"))
    if not to_hf.ok():
        rows.append(Row("smollm2/roundtrip", FAIL, to_hf.why(), to_hf.seconds))
        return rows
    cmp = compare_safetensors(hf, back)
    reason = (f"{cmp['tensors']} tensors ({cmp['bytes'] / 2**20:.0f} MiB) bit-identical to the original"
              if cmp["identical"] else
              f"differs: missing {cmp['only_in_original']}, extra {cmp['only_in_roundtrip']}, "
              f"changed {cmp['different'][:3]}")
    rows.append(Row("smollm2/roundtrip", PASS if cmp["identical"] else FAIL, reason, to_hf.seconds, cmp))
    return rows


CHECK = Check("smollm2", "SmolLM2-135M: convert on CPU, per-token log-probs of the bf16 TE model vs HF fp32 "
              f"(mean |Δ| <= {SMOLLM2_MEAN_TOL} nats), convert back bit-identical", check_smollm2, 240,
              ("transformer_engine", "smollm2"))


# ---------------------------------------------------------------------------------------------------------
# Worker (a fresh process; torch and rao_megatron are imported inside the functions)
# ---------------------------------------------------------------------------------------------------------

SMOLLM2_TEXTS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is 7 times 8? Answer with just the number.", "56"),
    ("Write a haiku about autumn leaves.", "Red leaves drift and fall,\nwhispering to the cold ground:\nthe year lets go."),
    ("Explain in one sentence why the sky is blue.",
     "Air molecules scatter the short blue wavelengths of sunlight much more than the long red ones."),
)


def _smollm2_batch(tok: Any, work: Path) -> dict[str, Any]:
    """The texts tokenized as training tokenizes data (chat template, response + end-of-turn), in one micro-batch."""
    from rao_megatron.data import collate_sequences, read_examples, tokenize_examples
    from rao_megatron.data.tokenizer import pad_id

    data = work / "smollm2_texts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "responses": [a]}) + "\n" for q, a in SMOLLM2_TEXTS))
    groups, _ = tokenize_examples(read_examples(data), tok, max_length=512)
    prompts, responses = [g.prompt_ids for g in groups], [g.responses[0] for g in groups]
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    return collate_sequences(prompts, responses, seq_length=-(-longest // 16) * 16, pad_id=pad_id(tok),
                             group_ids=list(range(len(prompts))))


def _hf_token_logprobs(hf_dir: str, batch: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).cuda().eval()
    labels = batch["labels"].cuda()
    with torch.no_grad():
        logits = model(batch["tokens"].cuda()).logits.float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    lp = torch.where(labels != -100, lp, torch.zeros_like(lp)).cpu()
    del model, logits
    torch.cuda.empty_cache()
    return lp


def _megatron_vs_hf(cfg: dict[str, Any], ckpt: str, batch: dict[str, Any], hf_lp: Any, dtype: Any) -> dict[str, Any]:
    import torch

    from rao_megatron.models import unwrap_model
    from rao_megatron.models.checkpoint import load_model_checkpoint
    from rao_megatron.training.engine import build_model_chunks

    chunks = build_model_chunks(cfg, task="reference", params_dtype=dtype)
    load_model_checkpoint(chunks, ckpt)
    model = unwrap_model(chunks[0])
    te = bool(te_layer_types(model))
    with torch.no_grad():
        hidden = chunks[0](batch["tokens"].cuda(), batch["position_ids"].cuda(), None)
        lp = token_logprobs(model, hidden, batch["labels"].cuda(), cfg["vocab_size"]).float().cpu()
    mask = batch["labels"] != -100
    diff = (lp - hf_lp).abs()[mask]
    prompt_m, response_m = batch["prompt_mask"].float(), batch["response_mask"].float()
    d_prompt = ((lp - hf_lp) * prompt_m).sum(1).abs()
    d_response = ((lp - hf_lp) * response_m).sum(1).abs()
    del chunks, model, hidden
    torch.cuda.empty_cache()
    return {"te_layers": te, "tokens": int(mask.sum()), "mean_abs_diff": float(diff.mean()),
            "max_abs_diff": float(diff.max()), "max_abs_diff_prompt_sum": float(d_prompt.max()),
            "max_abs_diff_response_sum": float(d_response.max()),
            "response_logps_megatron": (lp * response_m).sum(1).tolist(),
            "response_logps_hf": (hf_lp * response_m).sum(1).tolist()}


def worker_smollm2(a: dict[str, Any]) -> None:
    import torch
    from transformers import AutoTokenizer

    from rao_megatron.models.checkpoint import read_checkpoint_meta

    res = Results(a["result"])
    init_single_rank()
    tok = AutoTokenizer.from_pretrained(a["hf"], local_files_only=True)
    batch = _smollm2_batch(tok, Path(a["dir"]))
    res["sequences"] = {"count": len(SMOLLM2_TEXTS), "seq_length": int(batch["tokens"].shape[1])}
    hf_lp = _hf_token_logprobs(a["hf"], batch)
    res["hf"] = {"response_logps": (hf_lp * batch["response_mask"].float()).sum(1).tolist()}
    cfg = read_checkpoint_meta(a["ckpt"])["hf_config"]
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        res.section(name, lambda dtype=dtype: _megatron_vs_hf(cfg, a["ckpt"], batch, hf_lp, dtype))


WORKERS = {"smollm2": worker_smollm2}
