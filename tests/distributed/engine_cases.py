"""Shared fixtures for the engine equivalence tests: a tiny HF model, synthetic groups, and a worker that
runs one optimizer step's forward/backward at a given layout and saves loss and HF-layout gradients."""

from __future__ import annotations

import random
from typing import Any

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


def synthetic_groups(num_groups: int, k: int, seed: int = 0) -> list[dict[str, Any]]:
    """Groups of K responses with random tokens, distinct rewards and reference log-probs."""
    rng = random.Random(seed)
    groups = []
    for g in range(num_groups):
        prompt = [T0] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 6))]
        responses, rewards = [], rng.sample(range(100), k)
        for _ in range(k):
            responses.append([rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, SEQ - len(prompt)))])
        groups.append({"id": g, "prompt": prompt, "responses": responses,
                       "rewards": [r / 10 for r in rewards],
                       "ref_logps": [-rng.uniform(10, 40) for _ in range(k)],
                       "ref_prompt_logps": -rng.uniform(5, 20)})
    return groups


def microbatches(groups: list[dict[str, Any]], groups_per_mb: int) -> list[dict[str, torch.Tensor]]:
    """Pack whole groups into fixed-shape micro-batches."""
    from rao_megatron.data import collate_sequences

    out = []
    for i in range(0, len(groups), groups_per_mb):
        chunk = groups[i:i + groups_per_mb]
        prompts, responses, gids, rewards, ref, ref_p = [], [], [], [], [], []
        for g in chunk:
            for y, r, lp in zip(g["responses"], g["rewards"], g["ref_logps"]):
                prompts.append(g["prompt"])
                responses.append(y)
                gids.append(g["id"])
                rewards.append(r)
                ref.append(lp)
                ref_p.append(g["ref_prompt_logps"])
        out.append(collate_sequences(prompts, responses, seq_length=SEQ, pad_id=0, group_ids=gids,
                                     rewards=rewards, ref_logps=ref, ref_prompt_logps=ref_p))
    return out


def run_step(tp: int, pp: int, loss: str, hparams: dict, groups_per_mb: int, hf_cfg: Any,
             hf_sd: dict[str, torch.Tensor], groups: list[dict[str, Any]], out_path: str) -> None:
    """Worker: one forward/backward at (tp, pp, dp = world / tp / pp); rank 0 saves loss and grads."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rao_megatron.losses import get_loss
    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron, megatron_to_hf_state_dict
    from rao_megatron.models.provider import as_chunks
    from rao_megatron.parallel.state import initialize_model_parallel
    from rao_megatron.training.engine import build_model_chunks, forward_backward
    from rao_megatron.training.forward_step import PolicyStep, RewardModelStep
    from rao_megatron.training.reductions import global_normalizer, step_loss

    initialize_model_parallel(tp=tp, pp=pp)
    task = "rm" if loss == "bt" else "policy"
    chunks = build_model_chunks(hf_cfg, task=task)
    load_hf_state_dict_into_megatron(chunks, hf_sd, hf_cfg)
    mbs = microbatches(groups, groups_per_mb)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = mbs[dp_rank::dp]
    bound = get_loss(loss).bind(hparams)
    norm = global_normalizer(bound, mine)
    if task == "rm":
        step = RewardModelStep(loss=bound, normalizer=norm)
    else:
        step = PolicyStep(loss=bound, normalizer=norm, vocab_size=hf_cfg.vocab_size)
    for c in chunks:
        c.zero_grad_buffer()
    outputs = forward_backward(chunks, step, mine)
    value = step_loss(outputs)
    bare = as_chunks(chunks)
    with torch.no_grad():
        for c in bare:
            for p in c.parameters():
                p.data.copy_(p.main_grad)
    grads = megatron_to_hf_state_dict(bare, hf_cfg)
    if dist.get_rank() == 0:
        torch.save({"loss": value, "grads": grads}, out_path)


def run_logps(tp: int, pp: int, hf_cfg: Any, hf_sd: dict[str, torch.Tensor], groups: list[dict[str, Any]],
              out_path: str) -> None:
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
    mbs = microbatches(groups, 2)
    sums = sequence_logps(chunks, mbs, vocab_size=hf_cfg.vocab_size)
    step = PolicyStep(loss=get_loss("rao").bind({}), normalizer=float(len(groups)), vocab_size=hf_cfg.vocab_size)
    outputs = forward_backward(chunks, step, mbs)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for (_, response), out in zip(sums, outputs):
            torch.testing.assert_close(response, out["policy_logps"], rtol=0, atol=1e-5)
        if ps.get_data_parallel_rank() == 0:
            torch.save({"prompt": torch.cat([p for p, _ in sums]), "response": torch.cat([r for _, r in sums])},
                       out_path)
