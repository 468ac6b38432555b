"""Shared fixtures for the engine equivalence tests: a tiny HF model, synthetic groups, and a worker that
runs one optimizer step's forward/backward at a given layout and saves loss and HF-layout gradients; the
comparison of two layouts' steps (``assert_same_step``) and a forward-only pipeline run (``schedule_forward``)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

VOCAB = 250  # not a multiple of 128: padded vocab rows must be masked out
SEQ = 16
T0 = 1  # the shared first token


def tiny_model(tied: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """A tiny random Llama (HF) and its state dict, plus a reward head ``score.weight``."""
    from transformers import LlamaForCausalLM

    from rao_megatron.models.hf_config import tiny_hf_config

    cfg = tiny_hf_config("llama", tie_word_embeddings=tied, vocab_size=VOCAB)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["score.weight"] = torch.randn(1, cfg.hidden_size) * 0.1
    return cfg, sd


def synthetic_groups(num_groups: int, k: int, seed: int = 0, max_response: int | None = None) -> list[dict[str, Any]]:
    """Groups of K responses with random tokens, distinct rewards and reference log-probs (responses of at
    most ``max_response`` tokens: short ones pack several to a row)."""
    rng = random.Random(seed)
    groups = []
    for g in range(num_groups):
        prompt = [T0] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 6))]
        responses, rewards = [], rng.sample(range(100), k)
        for _ in range(k):
            longest = SEQ - len(prompt) if max_response is None else min(max_response + 1, SEQ - len(prompt))
            responses.append([rng.randrange(3, VOCAB) for _ in range(rng.randrange(1 if max_response else 2,
                                                                                   longest))])
        groups.append({"id": g, "prompt": prompt, "responses": responses,
                       "rewards": [r / 10 for r in rewards],
                       "ref_logps": [-rng.uniform(10, 40) for _ in range(k)],
                       "ref_prompt_logps": -rng.uniform(5, 20)})
    return groups


def microbatches(groups: list[dict[str, Any]], groups_per_mb: int, packed: bool = False,
                 rows: int | None = None, shared: bool = False) -> list[dict[str, torch.Tensor]]:
    """Whole groups in fixed-shape micro-batches: one sequence per row (padded), or packed into ``rows`` rows
    (default: one more row than the largest chunk's tokens need, so most rows hold several sequences);
    ``shared`` (packed): each group's prompt once and then its responses, in rows of 3 x SEQ tokens."""
    from rao_megatron.data import collate_sequences, sequence_key
    from rao_megatron.data.packing import collate_packed, plan_micro_batches

    chunks = [groups[i:i + groups_per_mb] for i in range(0, len(groups), groups_per_mb)]
    tokens = [sum(len(g["prompt"]) + len(y) for g in chunk for y in g["responses"]) for chunk in chunks]
    rows = rows or -(-max(tokens) // SEQ) + 1  # one shape for every micro-batch (pipeline parallelism)
    out = []
    for chunk in chunks:
        prompts, responses, gids, rewards, ref, ref_p, where = [], [], [], [], [], [], {}
        for c, g in enumerate(chunk):
            for j, (y, r, lp) in enumerate(zip(g["responses"], g["rewards"], g["ref_logps"])):
                where[c, j] = len(prompts)
                prompts.append(g["prompt"])
                responses.append(y)
                gids.append(g["id"])
                rewards.append(r)
                ref.append(lp)
                ref_p.append(g["ref_prompt_logps"])
        columns = dict(rewards=rewards, ref_logps=ref, ref_prompt_logps=ref_p,
                       seq_keys=[sequence_key(x, y) for x, y in zip(prompts, responses)])
        if not packed:
            out.append(collate_sequences(prompts, responses, seq_length=SEQ, pad_id=0, group_ids=gids, **columns))
            continue
        if shared:
            lengths = [[len(g["prompt"]) + sum(map(len, g["responses"]))] for g in chunk]
            for plan in plan_micro_batches(lengths, rows=2, seq_length=3 * SEQ):
                placement = [[tuple(where[c, j] for j in range(len(chunk[c]["responses"]))) for c, _ in row]
                             for row in plan]
                out.append(collate_packed(prompts, responses, placement=placement, seq_length=3 * SEQ, pad_id=0,
                                          group_ids=gids, **columns))
            continue
        lengths = [[len(g["prompt"]) + len(y) for y in g["responses"]] for g in chunk]
        for plan in plan_micro_batches(lengths, rows=rows, seq_length=SEQ):
            placement = [[where[c, j] for c, j in row] for row in plan]
            out.append(collate_packed(prompts, responses, placement=placement, seq_length=SEQ, pad_id=0,
                                      group_ids=gids, **columns))
    return out


def run_step(tp: int, pp: int, loss: str, hparams: dict, groups_per_mb: int, hf_cfg: Any,
             hf_sd: dict[str, torch.Tensor], groups: list[dict[str, Any]], out_path: str,
             packed: bool = False) -> None:
    """Worker: one forward/backward at (tp, pp, dp = world / tp / pp); rank 0 saves loss and grads."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
    from rao_megatron.parallel.state import initialize_model_parallel
    from rao_megatron.training.engine import build_model_chunks

    initialize_model_parallel(tp=tp, pp=pp)
    task = "rm" if loss == "bt" else "policy"
    chunks = build_model_chunks(hf_cfg, task=task)
    load_hf_state_dict_into_megatron(chunks, hf_sd, hf_cfg)
    mbs = microbatches(groups, groups_per_mb, packed=packed)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = mbs[dp_rank::dp]
    value = train_step_loss(chunks, loss, hparams, mine, hf_cfg.vocab_size)
    grads = hf_layout_grads(chunks, hf_cfg)
    if dist.get_rank() == 0:
        torch.save({"loss": value, "grads": grads}, out_path)


def train_step_loss(chunks: list, loss: str, hparams: dict, mine: list[dict[str, torch.Tensor]],
                    vocab_size: int) -> float:
    """One forward/backward of ``loss`` over this rank's micro-batches (bt: the reward model); the step loss."""
    from rao_megatron.losses import get_loss
    from rao_megatron.training.engine import forward_backward
    from rao_megatron.training.forward_step import PolicyStep, RewardModelStep
    from rao_megatron.training.reductions import global_normalizer, step_loss

    bound = get_loss(loss).bind(hparams)
    norm = global_normalizer(bound, mine)
    if loss == "bt":
        step = RewardModelStep(loss=bound, normalizer=norm)
    else:
        step = PolicyStep(loss=bound, normalizer=norm, vocab_size=vocab_size)
    for c in chunks:
        c.zero_grad_buffer()
    return step_loss(forward_backward(chunks, step, mine))


def hf_layout_grads(chunks: list, hf_cfg: Any) -> dict[str, torch.Tensor]:
    """The DDP gradients (``main_grad``) mapped to HF names (the parameters are overwritten with them)."""
    from rao_megatron.models.hf_state import megatron_to_hf_state_dict
    from rao_megatron.models.provider import as_chunks

    bare = as_chunks(chunks)
    with torch.no_grad():
        for c in bare:
            for p in c.parameters():
                p.data.copy_(p.main_grad)
    return megatron_to_hf_state_dict(bare, hf_cfg)


def run_logps(tp: int, pp: int, hf_cfg: Any, hf_sd: dict[str, torch.Tensor], groups: list[dict[str, Any]],
              out_path: str, packed: bool = False) -> None:
    """Worker: forward-only per-sequence sums, checked against the training forward's, saved by the last stage."""
    from megatron.core import parallel_state as ps

    from rao_megatron.losses import get_loss
    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
    from rao_megatron.parallel.state import initialize_model_parallel
    from rao_megatron.training.engine import build_model_chunks, forward_backward, sequence_logps
    from rao_megatron.training.forward_step import PolicyStep

    initialize_model_parallel(tp=tp, pp=pp)
    chunks = build_model_chunks(hf_cfg, task="policy")
    load_hf_state_dict_into_megatron(chunks, hf_sd, hf_cfg)
    mbs = microbatches(groups, 2, packed=packed)
    sums = sequence_logps(chunks, mbs, vocab_size=hf_cfg.vocab_size)
    step = PolicyStep(loss=get_loss("rao").bind({}), normalizer=float(len(groups)), vocab_size=hf_cfg.vocab_size)
    outputs = forward_backward(chunks, step, mbs)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for (_, response), out in zip(sums, outputs):
            torch.testing.assert_close(response, out["policy_logps"], rtol=0, atol=1e-5)
        if ps.get_data_parallel_rank() == 0:
            torch.save({"prompt": torch.cat([p for p, _ in sums]), "response": torch.cat([r for _, r in sums]),
                        "keys": torch.cat([mb["seq_keys"] for mb in mbs])}, out_path)


def assert_same_step(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    """Two layouts' results of one step (``run_step``, qwen3_cases.run_losses): the same loss, MoE metrics (when
    the results have them) and HF-layout gradients, up to fp32 summation order."""
    # The layouts sum in different orders, so only fp32 rounding may separate them: losses agree to ~1e-7
    # relative (seen <= 1.3e-7), gradient entries to ~2e-7 of the largest gradient (seen 2.2e-7 at TP2).
    # atol = 1e-5 of that scale leaves ~50x for other CPUs' kernels; a layout bug is O(scale).
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), what
    moe_a, moe_b = a.get("moe", {}), b.get("moe", {})
    assert moe_a.keys() == moe_b.keys(), what
    for key in moe_a:
        assert moe_a[key] == pytest.approx(moe_b[key], rel=1e-5), f"{what}: {key}"
    assert a["grads"].keys() == b["grads"].keys(), what
    scale = max(g.abs().max().item() for g in a["grads"].values())
    assert scale > 0
    for key in a["grads"]:
        torch.testing.assert_close(a["grads"][key], b["grads"][key], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, key=key: f"{what}: gradient of {key}: {m}")


def schedule_forward(chunks: list[torch.nn.Module], ids: torch.Tensor) -> torch.Tensor | None:
    """Forward-only pipeline run (virtual stages too), one sequence per micro-batch; TP-gathered outputs [B, S, *]
    on the last stage (logits gathered over the vocabulary shards; a reward head's [B, S, 1] as it is)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    micro = [ids[i: i + 1] for i in range(ids.shape[0])]
    pos = torch.arange(ids.shape[1]).unsqueeze(0)

    def step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        out = model(next(data_iterator), pos, None)

        def collect(o: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if o.shape[-1] > 1:  # vocab-parallel logits
                o = gather_from_tensor_model_parallel_region(o)
            return o.sum() * 0, {"out": o.detach()}

        return out, collect

    iters: Any = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
    for c in chunks:
        c.eval()
    with torch.no_grad():
        res = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters, model=chunks, num_microbatches=len(micro),
            seq_length=ids.shape[1], micro_batch_size=1, forward_only=True)
    return torch.cat([r["out"] for r in res]) if ps.is_pipeline_last_stage() else None
