"""GPTModel from HF configs under TP / PP / TP x PP / VPP on CPU gloo workers: logits, conversion, RM, grads, optimizer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import (
    vocab_parallel_cross_entropy,
)
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from rao_megatron.conversion import load_hf_state_dict_into_megatron, megatron_to_hf_state_dict
from rao_megatron.models import (
    LLAMA3_TINY_ROPE,
    as_chunks,
    build_gpt_model,
    build_reward_model,
    enable_hidden_state_output,
    output_weight,
    reward_scores,
    tiny_hf_config,
)
from rao_megatron.parallel.launch import run_distributed
from rao_megatron.parallel.state import destroy_model_parallel, initialize_model_parallel

from .engine_cases import schedule_forward

pytestmark = pytest.mark.distributed

SEQ, BATCH = 24, 2


def _configs(num_layers: int = 2) -> dict[str, Any]:
    return {
        "llama_tied": tiny_hf_config("llama", num_hidden_layers=num_layers, tie_word_embeddings=True,
                                     rope_theta=500000.0, rope_scaling=dict(LLAMA3_TINY_ROPE)),
        "qwen2_untied": tiny_hf_config("qwen2", num_hidden_layers=num_layers),
    }


def _hf_model(cfg: Any, cls: Any = AutoModelForCausalLM) -> torch.nn.Module:
    """Same random weights on every rank (seeded), with non-zero q/k/v biases for Qwen2."""
    torch.manual_seed(0)
    model = (cls(cfg) if cls is not AutoModelForCausalLM else cls.from_config(cfg)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                p.normal_(0, 0.1)
    return model


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _build_chunks(cfg: Any, builder: Any = build_gpt_model) -> list[torch.nn.Module]:
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    return [builder(cfg, vp_stage=v) for v in ([None] if vpp is None else range(vpp))]


# ---------------------------------------------------------------- logits + round trip per layout


def _logits_worker(tp: int, pp: int, vpp: int | None) -> None:
    initialize_model_parallel(tp=tp, pp=pp, vpp=vpp)
    for name, cfg in _configs(num_layers=4 if vpp else 2).items():
        hf = _hf_model(cfg)
        hf_sd = hf.state_dict()
        chunks = _build_chunks(cfg)
        load_hf_state_dict_into_megatron(chunks, hf_sd, cfg)
        ids = _tokens(cfg.vocab_size)
        logits = schedule_forward(chunks, ids)
        if logits is not None:
            with torch.no_grad():
                ref = hf(ids).logits
            diff = (logits[..., : cfg.vocab_size] - ref).abs().max().item()
            assert diff <= 1e-5, f"{name} tp={tp} pp={pp} vpp={vpp}: max |logits - hf| = {diff:.2e}"
            if cfg.tie_word_embeddings and pp > 1:
                # the last stage's copy of the tied embedding holds this rank's vocab shard of it
                shard = output_weight(chunks[-1])
                rows = shard.shape[0]
                start = ps.get_tensor_model_parallel_rank() * rows
                full = hf_sd["model.embed_tokens.weight"]
                assert torch.equal(shard[: max(0, min(rows, full.shape[0] - start))], full[start: start + rows])
        back = megatron_to_hf_state_dict(chunks, cfg)
        expected = set(hf_sd) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
        assert set(back) == expected, sorted(set(back) ^ expected)
        for key, tensor in back.items():
            assert torch.equal(tensor, hf_sd[key]), f"{name}: {key} differs after the round trip"
    destroy_model_parallel()


@pytest.mark.parametrize("tp, pp, vpp", [(2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)],
                         ids=["tp2", "pp2", "tp2xpp2", "pp2xvpp2"])
def test_logits_and_round_trip_match_hf(tp: int, pp: int, vpp: int | None) -> None:
    run_distributed(_logits_worker, tp * pp, tp, pp, vpp)


# ---------------------------------------------------------------- reward model


def _reward_worker(tp: int, out_path: str) -> None:
    initialize_model_parallel(tp=tp)
    cfg = tiny_hf_config("llama", num_labels=1, architectures=["LlamaForSequenceClassification"])
    ids = _tokens(cfg.vocab_size)
    lengths = torch.tensor([SEQ, SEQ // 2])
    ids = torch.where(torch.arange(SEQ) < lengths[:, None], ids, cfg.pad_token_id)
    hf = _hf_model(cfg, LlamaForSequenceClassification)
    # 1) head left at its (seeded) init: a causal-LM state dict has no score.weight
    causal_sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("score.")}
    model = build_reward_model(cfg)
    assert load_hf_state_dict_into_megatron(model, causal_sd, cfg) == ["output_layer.weight"]
    scores_init = reward_scores(schedule_forward([model], ids), lengths=lengths)
    # 2) head from the HF sequence classifier
    load_hf_state_dict_into_megatron(model, hf.state_dict(), cfg)
    scores = reward_scores(schedule_forward([model], ids), lengths=lengths)
    with torch.no_grad():
        torch.testing.assert_close(scores, hf(ids).logits.squeeze(-1), rtol=0, atol=1e-5)
    if dist.get_rank() == 0:
        torch.save({"init": scores_init, "hf_head": scores, "head": model.output_layer.weight.detach()}, out_path)
    destroy_model_parallel()


def test_reward_model_scores_equal_at_tp2_and_tp1(tmp_path) -> None:
    run_distributed(_reward_worker, 1, 1, str(tmp_path / "tp1.pt"))
    run_distributed(_reward_worker, 2, 2, str(tmp_path / "tp2.pt"))
    tp1, tp2 = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    assert torch.equal(tp1["head"], tp2["head"])
    torch.testing.assert_close(tp2["init"], tp1["init"], rtol=0, atol=1e-5)
    torch.testing.assert_close(tp2["hf_head"], tp1["hf_head"], rtol=0, atol=1e-5)
    assert not torch.allclose(tp1["init"], tp1["hf_head"])  # the two heads really differ


# ---------------------------------------------------------------- backward at TP2


def _masked_vocab_parallel_ce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              vocab_size: int) -> torch.Tensor:
    """Mean token CE from hidden[B, S, H] and this rank's vocab shard weight[V_pad/tp, H]; padded rows masked."""
    logits = hidden @ weight.T
    start = ps.get_tensor_model_parallel_rank() * weight.shape[0]
    padded = torch.arange(start, start + weight.shape[0]) >= vocab_size
    logits = logits.masked_fill(padded, float("-inf"))
    return vocab_parallel_cross_entropy(logits, labels).mean()


def _backward_worker(tp: int) -> None:
    initialize_model_parallel(tp=tp)
    cfg = _configs()["qwen2_untied"]
    hf = _hf_model(cfg)
    model = build_gpt_model(cfg)
    load_hf_state_dict_into_megatron(model, hf.state_dict(), cfg)
    enable_hidden_state_output(model)  # grads of the hidden states are all-reduced over TP in backward
    ids = _tokens(cfg.vocab_size)
    hidden = model(ids[:, :-1], torch.arange(SEQ - 1).expand(BATCH, -1), None)
    _masked_vocab_parallel_ce(hidden, output_weight(model), ids[:, 1:], cfg.vocab_size).backward()

    hf_logits = hf(ids[:, :-1]).logits
    torch.nn.functional.cross_entropy(hf_logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1)).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)  # reuse the conversion to gather the gradients in HF layout
    grads = megatron_to_hf_state_dict(model, cfg)
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    assert set(grads) == set(hf_grads)
    for key in ("model.norm.weight", "model.layers.0.input_layernorm.weight", *grads):
        diff = (grads[key] - hf_grads[key]).abs().max().item()
        assert diff <= 1e-5, f"grad {key}: max diff {diff:.2e}"
    destroy_model_parallel()


def test_backward_at_tp2_matches_hf_grads() -> None:
    run_distributed(_backward_worker, 2, 2)


# ---------------------------------------------------------------- DDP + Megatron optimizer with clipping
#
# Every layout must produce the TP1 gradients (to fp32 rounding) and take the same optimizer step. The
# layouts sum in different orders (TP partial sums, DP reduction, per-stage backward), so nothing here
# may hinge on the exact bits: the gradients and the grad norm are compared with a tolerance scaled to
# each tensor, and the step is compared only where rounding cannot change it (see _STEP_MASK_FACTOR).

LR = 1e-2
_OPT_RUNS = {  # name: (world size, tp, pp, distributed optimizer)
    "tp1": (1, 1, 1, False),
    "tp2": (2, 2, 1, False),
    "pp2": (2, 1, 2, False),
    "dp2_distributed_optimizer": (2, 1, 1, True),
}
# A gradient entry may differ from TP1 by this much, relative to the tensor's largest |grad|: fp32
# rounding after a few hundred summands is ~1e-6 of that, a layout bug is O(1).
_GRAD_RTOL = 2e-5
# Adam's first step is lr * g / (|g| + eps), i.e. ~lr * sign(g): an entry whose TP1 gradient is within
# rounding of 0 may step the other way in another layout (seen: 1.3e-4 apart at TP2 on an Intel Xeon). The
# step is compared only where |g_tp1| > _STEP_MASK_FACTOR * (allowed grad error); there the relative
# grad error is < 1/_STEP_MASK_FACTOR, so the two steps differ by < lr / (4 * _STEP_MASK_FACTOR)
# (d/dg of lr * g / (|g| + eps) is lr * eps / (|g| + eps)^2 <= lr / (4 |g|)), and sign flips are impossible.
_STEP_MASK_FACTOR = 100.0
_STEP_ATOL = LR / (4 * _STEP_MASK_FACTOR) + 1e-6


def _gather_distributed_optimizer_grads(ddp: Any) -> None:
    """All-gather the reduce-scattered grad buffers: each rank reduced only its own shard of each bucket.

    The distributed optimizer reads only that shard, so filling in the rest changes nothing it sees.
    """
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
        pg = group.intra_distributed_optimizer_instance_group
        size, rank = dist.get_world_size(pg), dist.get_rank(pg)
        for bucket in group.buckets:
            shards = shard_buffer(bucket.grad_data, size)
            gathered = [torch.empty_like(s) for s in shards]
            dist.all_gather(gathered, shards[rank].clone(), group=pg)
            for shard, full in zip(shards, gathered, strict=True):
                shard.copy_(full)


@torch.no_grad()
def _hf_grads(chunks: list[torch.nn.Module], cfg: Any) -> dict[str, torch.Tensor]:
    """The reduced main_grads in HF layout: the weight conversion applied to them (params restored)."""
    params = [p for c in chunks for p in c.parameters()]
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.copy_(p.main_grad)
    grads = megatron_to_hf_state_dict(chunks, cfg)
    for p, s in zip(params, saved, strict=True):
        p.copy_(s)
    return grads


def _optimizer_worker(tp: int, pp: int, dist_opt: bool, out_path: str) -> None:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    initialize_model_parallel(tp=tp, pp=pp)
    cfg = _configs()["llama_tied"]
    model = build_gpt_model(cfg)
    load_hf_state_dict_into_megatron(model, _hf_model(cfg).state_dict(), cfg)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=dist_opt), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=LR, bf16=False, fp16=False, params_dtype=torch.float32, clip_grad=1.0,
        use_distributed_optimizer=dist_opt), [ddp])
    ids = torch.randint(3, cfg.vocab_size, (4, SEQ + 1), generator=torch.Generator().manual_seed(3))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    micro = list(ids.split(2))[dp_rank::dp]  # one DP rank: both micro-batches; DP2: one each

    def step(data_iterator: Any, m: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        t = next(data_iterator)
        logits = m(t[:, :-1], torch.arange(SEQ).expand(t.shape[0], -1), None)

        def loss(o: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            value = vocab_parallel_cross_entropy(o.float().clone(), t[:, 1:]).mean()
            return value, {"loss": value.detach()}

        return logits, loss

    ddp.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter(micro), model=[ddp],
                                num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=2,
                                forward_only=False)  # ends with finalize_model_grads (DP/PP reduction)
    if dist_opt:
        _gather_distributed_optimizer_grads(ddp)
    grads = _hf_grads(as_chunks(ddp), cfg)
    ok, grad_norm, _ = opt.step()
    assert ok
    weights = megatron_to_hf_state_dict(as_chunks(ddp), cfg)
    if dist.get_rank() == 0:
        torch.save({"grad_norm": grad_norm, "grads": grads, "weights": weights}, out_path)
    destroy_model_parallel()


def test_optimizer_step_with_grad_clipping_matches_tp1(tmp_path) -> None:
    cfg = _configs()["llama_tied"]
    initial = _hf_model(cfg).state_dict()
    results = {}
    for name, (world, tp, pp, dist_opt) in _OPT_RUNS.items():
        run_distributed(_optimizer_worker, world, tp, pp, dist_opt, str(tmp_path / f"{name}.pt"))
        results[name] = torch.load(tmp_path / f"{name}.pt")
    ref = results.pop("tp1")
    assert ref["grad_norm"] > 1.0  # clipping is active
    assert set(ref["grads"]) == set(ref["weights"]) == set(initial) - {"lm_head.weight"}
    assert max((ref["weights"][k] - initial[k]).abs().max().item() for k in ref["weights"]) > 0.5 * LR
    clear = {}  # entries whose step rounding cannot flip; most of every tensor, so the check has teeth
    for key, g_ref in ref["grads"].items():
        clear[key] = g_ref.abs() > _STEP_MASK_FACTOR * _GRAD_RTOL * g_ref.abs().max()
        assert clear[key].float().mean() >= 0.8, f"{key}: only {clear[key].float().mean():.2f} of |grad| clear of 0"
    for name, res in results.items():
        # a sum of squares over the same entries: rounding moves it by ~1e-7 relative
        assert res["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), \
            f"{name}: grad norm {res['grad_norm']:.7g} vs {ref['grad_norm']:.7g} at TP1"
        assert set(res["grads"]) == set(ref["grads"]) and set(res["weights"]) == set(ref["weights"]), name
        for key, g_ref in ref["grads"].items():
            grad_atol = _GRAD_RTOL * g_ref.abs().max().item()
            grad_diff = (res["grads"][key] - g_ref).abs().max().item()
            assert grad_diff <= grad_atol, f"{name}: grad of {key} differs by {grad_diff:.2e} (> {grad_atol:.2e})"
            step_diff = (res["weights"][key] - ref["weights"][key]).abs()
            # anywhere: a first Adam step moves an entry by at most lr (+ the same weight decay): never 2 lr apart
            assert step_diff.max().item() <= 2 * LR, f"{name}: {key} moved by {step_diff.max().item():.2e}"
            diff = step_diff[clear[key]].max().item()
            assert diff <= _STEP_ATOL, f"{name}: {key} (|grad| clear of 0) differs by {diff:.2e} after the step"
