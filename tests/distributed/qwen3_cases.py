"""Workers and fixtures for the Qwen3 / Qwen3-MoE tests: tiny HF models, one optimizer step's forward/backward
at a layout (every loss in one launch), and the load-balancing term computed from HF's router logits."""

from __future__ import annotations

from typing import Any

import torch

from .engine_cases import VOCAB, hf_layout_grads, microbatches, train_step_loss

#: every registry loss with the hyper-parameters of the Llama equivalence tests (and defaults for the rest)
LOSSES: dict[str, dict[str, Any]] = {
    "rao": {"beta": 0.1, "log_z0": 1.0}, "dpo": {"beta": 0.1}, "ipo": {"beta": 0.1}, "slic": {"beta": 0.1},
    "rpo": {"beta": 0.1}, "cal_dpo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma": 0.5}, "orpo": {"lam": 0.1},
    "sft": {}, "grao": {}, "bt": {"margin": 0.1},
}
AUX_COEFF = 0.05  # large enough that the load-balancing term moves the router gradients visibly


def tiny_config(family: str, **overrides: Any) -> Any:
    from rao_megatron.models.hf_config import tiny_hf_config

    return tiny_hf_config(family, vocab_size=VOCAB, **overrides)


def hf_model(cfg: Any) -> torch.nn.Module:
    """Seeded random HF causal LM; norms (q/k norms included) drawn around 1 so that a swapped or missing
    norm shows, routers with a spread large enough that routing is not a coin toss."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model


def model_and_state(family: str, **overrides: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The HF config and its state dict in checkpoint layout (experts per expert), plus a reward head."""
    from rao_megatron.models.hf_mappings import hf_checkpoint_layout

    cfg = tiny_config(family, **overrides)
    sd = {k: v.detach().clone() for k, v in hf_checkpoint_layout(hf_model(cfg).state_dict()).items()}
    sd["score.weight"] = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(2)) * 0.1
    return cfg, sd


def with_reference_answers(mbs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """GRAO: the first response of each group is its reference answer."""
    from rao_megatron.data.collate import PAD_GROUP

    out = []
    for mb in mbs:
        gids = mb["group_ids"]
        first = torch.zeros_like(gids, dtype=torch.bool)
        seen: set[int] = set()
        for i, g in enumerate(gids.tolist()):
            if g != PAD_GROUP and g not in seen:
                seen.add(g)
                first[i] = True
        out.append({**mb, "is_reference_answer": first})
    return out


def run_losses(tp: int, pp: int, ep: int, etp: int | None, losses: list[str], aux_coeff: float, hf_cfg: Any,
               hf_sd: dict[str, torch.Tensor], groups: list[dict[str, Any]], out_path: str) -> None:
    """Worker: for each loss, one forward/backward at this layout; rank 0 saves loss, MoE metrics, HF grads."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
    from rao_megatron.models.provider import set_moe_aux_loss_coeff
    from rao_megatron.parallel.state import initialize_model_parallel
    from rao_megatron.training.engine import build_model_chunks
    from rao_megatron.training.reductions import moe_aux_metrics

    initialize_model_parallel(tp=tp, pp=pp, ep=ep, etp=etp)
    mbs = with_reference_answers(microbatches(groups, 2))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = mbs[dp_rank::dp]
    results = {}
    for loss in losses:
        task = "rm" if loss == "bt" else "policy"
        chunks = build_model_chunks(hf_cfg, task=task)
        load_hf_state_dict_into_megatron(chunks, hf_sd, hf_cfg)
        set_moe_aux_loss_coeff(chunks, aux_coeff)
        value = train_step_loss(chunks, loss, LOSSES[loss], mine, hf_cfg.vocab_size)
        moe = moe_aux_metrics(chunks, len(mine))
        results[loss] = {"loss": value, "moe": moe, "grads": hf_layout_grads(chunks, hf_cfg)}
    if dist.get_rank() == 0:
        torch.save(results, out_path)


def hf_load_balancing_terms(hf_cfg: Any, groups: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_layers L_l averaged over the micro-batches, and its gradients (checkpoint names), from HF's router logits.

    ``L_l = E · Σ_i f_i · P_i`` per layer and micro-batch, over the micro-batch's real tokens (the forward
    step hands Megatron the padding mask): f_i = tokens routed to expert i / (T·k), P_i = mean softmax
    probability of expert i, T the number of real tokens. This is Megatron's switch loss written out, not
    HF's ``load_balancing_loss_func`` (which pools all layers into one f and one P and does not divide by k).
    """
    from rao_megatron.models.hf_mappings import hf_checkpoint_layout
    from rao_megatron.training.forward_step import padding_mask

    model = hf_model(hf_cfg).train()
    e, k = hf_cfg.num_experts, hf_cfg.num_experts_per_tok
    mbs = microbatches(groups, 2)
    total = torch.zeros(())
    for mb in mbs:
        out = model(mb["tokens"], position_ids=mb["position_ids"], output_router_logits=True)
        real = ~padding_mask(mb).reshape(-1)  # router logits are [rows * seq_length, E]
        for logits in out.router_logits:
            probs = torch.softmax(logits.float(), dim=-1)[real]  # [T, E]: real tokens only
            t = probs.shape[0]
            counts = torch.nn.functional.one_hot(probs.topk(k, dim=-1).indices, e).sum((0, 1)).float()
            total = total + e * ((counts / (t * k)) * (probs.sum(0) / t)).sum()
    total = total / len(mbs)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total.detach(), dict(hf_checkpoint_layout(grads))


__all__ = ["AUX_COEFF", "LOSSES", "hf_load_balancing_terms", "hf_model", "model_and_state", "run_losses"]
