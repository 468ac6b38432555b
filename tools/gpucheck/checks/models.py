"""Check ``models``: policy, reference and reward model built on CUDA in bf16 with the TE layer spec (placement,
dtypes, sequence parallelism, a forward and a backward); the reward model scores two texts through ModelScorer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..harness import FAIL, PASS, Check, Context, Results, Row
from ..judge import finite
from ..workers import init_single_rank, te_layer_types, token_logprobs

if TYPE_CHECKING:
    from rao_megatron.models import ModelArch


def judge_placement(name: str, info: dict[str, Any], seconds: float = 0.0) -> Row:
    """Every parameter on CUDA and bf16, buffers on CUDA (fp32 ones are reported), TE layers, SP as configured."""
    if "error" in info:
        return Row(name, FAIL, f"build or forward failed: {info['error']}", seconds, info)
    problems = []
    if info.get("cpu_parameters"):
        problems.append(f"{len(info['cpu_parameters'])} parameters not on CUDA: {info['cpu_parameters'][:3]}")
    if info.get("non_bf16_parameters"):
        problems.append(f"parameters not bf16: {info['non_bf16_parameters'][:3]}")
    if info.get("cpu_buffers"):
        problems.append(f"buffers not on CUDA: {info['cpu_buffers'][:3]}")
    if not info.get("te_modules"):
        problems.append("no Transformer Engine layers in the model (local layer spec used)")
    if info.get("sequence_parallel") != info.get("sequence_parallel_expected"):
        problems.append(f"config.sequence_parallel={info.get('sequence_parallel')}, configured "
                        f"{info.get('sequence_parallel_expected')}")
    if not info.get("finite"):
        problems.append("forward output not finite")
    if info.get("grads_finite") is False or info.get("grads_nonzero") is False:
        problems.append("backward left non-finite or all-zero gradients")
    if info.get("output_device", "cuda").split(":")[0] != "cuda":
        problems.append(f"forward output on {info.get('output_device')}")
    if problems:
        return Row(name, FAIL, "; ".join(problems), seconds, info)
    attrs = {k: v for k, v in info.get("tensor_attributes", {}).items() if "bfloat16" not in v}
    fp32 = sorted({**info.get("non_bf16_buffers", {}), **attrs})
    note = f"; not bf16 (allowed, reported): {', '.join(fp32)[:160]}" if fp32 else ""
    return Row(name, PASS, f"{info.get('parameters')} parameters on CUDA in bf16, "
               f"{len(info['te_modules'])} TE layer types, sequence_parallel={info['sequence_parallel']}{note}",
               seconds, info)


def judge_scorer(info: dict[str, Any], seconds: float = 0.0) -> Row:
    if "error" in info:
        return Row("models/scorer", FAIL, f"scoring failed: {info['error']}", seconds, info)
    scores = info.get("scores") or []
    problems = []
    if len(scores) != 2 or not all(finite(s) for s in scores):
        problems.append(f"expected 2 finite scores, got {scores}")
    if info.get("param_devices") != ["cuda"]:
        problems.append(f"scorer parameters on {info.get('param_devices')}, not CUDA")
    if problems:
        return Row("models/scorer", FAIL, "; ".join(problems), seconds, info)
    return Row("models/scorer", PASS, f"ModelScorer on CUDA ({', '.join(info.get('param_dtypes', []))}): "
               f"scores {scores[0]:.4g}, {scores[1]:.4g}", seconds, info)


def check_models(ctx: Context) -> list[Row]:
    done, res = ctx.worker("models")
    rows = [judge_placement(f"models/{task}", res.get(task, {"error": "not reached"}), done.seconds)
            for task in ("policy", "reference", "rm")]
    rows.append(judge_scorer(res.get("scorer", {"error": "not reached"}), done.seconds))
    if not done.ok():
        for row in rows:
            if row.verdict == FAIL and "not reached" in row.reason:
                row.reason = done.why()
    return rows


CHECK = Check("models", "policy, reference and reward model built on CUDA in bf16 with the TE layer spec "
              "(placement, dtypes, sequence_parallel, forward); ModelScorer scores 2 texts on CUDA",
              check_models, 150, ("transformer_engine",))


# ---------------------------------------------------------------------------------------------------------
# Worker (a fresh process; torch and rao_megatron are imported inside the functions)
# ---------------------------------------------------------------------------------------------------------


def _placement(chunks: list[Any]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"parameters": 0, "cpu_parameters": [], "non_bf16_parameters": [], "cpu_buffers": [],
                            "non_bf16_buffers": {}, "tensor_attributes": {}}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            info["parameters"] += 1
            if p.device.type != "cuda":
                info["cpu_parameters"].append(name)
            if p.dtype != torch.bfloat16:
                info["non_bf16_parameters"].append(f"{name}: {p.dtype}")
        for name, b in chunk.named_buffers():
            if b.device.type != "cuda":
                info["cpu_buffers"].append(name)
            if b.dtype != torch.bfloat16:
                info["non_bf16_buffers"][name] = str(b.dtype)
        for mod_name, module in chunk.named_modules():  # plain tensor attributes, e.g. rotary inv_freq
            for attr, value in vars(module).items():
                if isinstance(value, torch.Tensor) and len(info["tensor_attributes"]) < 20:
                    info["tensor_attributes"][f"{mod_name}.{attr}"] = f"{value.dtype} on {value.device}"
    return info


def _build_and_probe(arch: ModelArch, task: str, built: dict[str, Any]) -> dict[str, Any]:
    """Build ``task``'s chunks in bf16 through the engine, report placement, run a forward (and backward)."""
    import torch

    from rao_megatron.models import unwrap_model
    from rao_megatron.training.engine import build_model_chunks

    configured_sp = False  # TP1: Megatron refuses sequence parallelism without TP (multi_gpu tests TP2 + SP)
    chunks = build_model_chunks(arch, task=task, params_dtype=torch.bfloat16, sequence_parallel=configured_sp,
                                distributed_optimizer=True if task != "reference" else None)
    built[task] = chunks
    model = unwrap_model(chunks[0])
    info = _placement(chunks)
    info.update(te_modules=sorted(te_layer_types(model)), sequence_parallel=bool(model.config.sequence_parallel),
                sequence_parallel_expected=configured_sp,
                distributed_optimizer=getattr(getattr(chunks[0], "ddp_config", None), "use_distributed_optimizer", None))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, arch.vocab_size, (2, 32), generator=gen).cuda()
    positions = torch.arange(32, device="cuda").expand(2, 32).contiguous()
    with torch.set_grad_enabled(task == "policy"):
        out = chunks[0](tokens, positions, None)
        info.update(output_shape=list(out.shape), output_dtype=str(out.dtype), output_device=str(out.device))
        if task == "rm":
            info["finite"] = bool(torch.isfinite(out.float()).all())
            return info
        labels = torch.roll(tokens, -1, dims=1)
        labels[:, -1] = -100
        lp = token_logprobs(model, out, labels, arch.vocab_size)
        info.update(finite=bool(torch.isfinite(lp).all()), mean_token_logprob=float(lp.detach()[:, :-1].mean()))
        if task == "policy":
            lp.sum().backward()
            grads = []
            for p in chunks[0].parameters():  # Megatron DDP accumulates into main_grad
                g = getattr(p, "main_grad", None)
                g = g if g is not None else p.grad
                if g is not None:
                    grads.append(g)
            info.update(grads_finite=all(bool(torch.isfinite(g).all()) for g in grads),
                        grads_nonzero=any(bool(g.abs().sum() > 0) for g in grads))
    return info


def _score_with_reward_model(rm_chunks: Any, arch: ModelArch, work: Path) -> dict[str, Any]:
    """Save the bf16 reward model, load it through ModelScorer and annotate one group of 2 responses."""
    from rao_megatron.models.checkpoint import save_model_checkpoint
    from rao_megatron.rewards.annotate import annotate
    from rao_megatron.rewards.scorers import ModelScorer

    if rm_chunks is None:
        raise RuntimeError("the reward model was not built")
    ckpt = work / "rm_checkpoint"
    meta = {"hf_config": arch.hf_dict, "task": "rm", "dtype": "bf16", "tokenizer": None}
    save_model_checkpoint(rm_chunks, ckpt, meta)
    scorer = ModelScorer(ckpt, batch_size=2, max_length=64)
    data, out = work / "to_score.jsonl", work / "scored.jsonl"
    data.write_text(json.dumps({"prompt": "Write 4 letters.", "responses": ["g!de", "dcae"]}) + "\n")
    annotate(str(data), out, scorer, progress=False, restart=True, log=lambda *_: None)
    row = json.loads(out.read_text().splitlines()[0])
    params = [p for c in scorer.chunks for p in c.parameters()]
    return {"param_devices": sorted({p.device.type for p in params}),
            "param_dtypes": sorted({str(p.dtype) for p in params}), "scores": row.get("rewards")}


def worker_models(a: dict[str, Any]) -> None:
    from rao_megatron.data import load_tokenizer
    from rao_megatron.models import ModelArch, tiny_hf_config

    res = Results(a["result"])
    init_single_rank()
    tok = load_tokenizer(None)  # the tiny tokenizer, as the tiny training runs use it
    arch = ModelArch.from_hf(tiny_hf_config("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    built: dict[str, Any] = {}
    for task in ("policy", "reference", "rm"):
        res.section(task, lambda task=task: _build_and_probe(arch, task, built))
    res.section("scorer", lambda: _score_with_reward_model(built.get("rm"), arch, Path(a["dir"])))


WORKERS = {"models": worker_models}
