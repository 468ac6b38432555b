"""Reference log-probs: materializes the ``[T, V_local]`` logits and lets autograd differentiate.

The oracle for the fused paths and the memory/time baseline in ``benchmarks/logprobs.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import all_reduce_, reduce_from_tp
from .common import ShardLayout, local_labels, stats_dtype
from .fp8 import E4M3, check_fp8_supported, quantize


def _logits(hidden: torch.Tensor, weight: torch.Tensor, precision: str, sdt: torch.dtype) -> torch.Tensor:
    if precision == "bf16":
        return (hidden.to(torch.bfloat16) @ weight.to(torch.bfloat16).t()).to(sdt)
    if precision == "fp8":
        # Straight-through fake quantization: FP8-rounded operands, fp32 math and exact autograd.
        check_fp8_supported(hidden.device)
        hq, hs = quantize(hidden, E4M3)
        wq, ws = quantize(weight, E4M3)
        h = hidden + (hq.to(sdt) * hs - hidden).detach()
        w = weight + (wq.to(sdt) * ws - weight).detach()
        return h.to(sdt) @ w.to(sdt).t()
    return hidden.to(sdt) @ weight.to(sdt).t()


def reference_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, layout: ShardLayout,
                       ignore_index: int, precision: str) -> torch.Tensor:
    """``[T, H]`` full hidden x ``[V_local, H]`` shard -> ``[T]`` log-probs (0 at ignored positions)."""
    sdt = stats_dtype(hidden)
    idx, owned, valid = local_labels(labels, layout, ignore_index)
    logits = _logits(hidden, weight, precision, sdt)  # [T, V_local]
    if layout.n_valid < layout.v_local:
        pad = torch.arange(layout.v_local, device=logits.device) >= layout.n_valid
        logits = logits.masked_fill(pad, float("-inf"))
    if layout.tp_size == 1:
        lp = torch.log_softmax(logits, dim=-1).gather(1, idx[:, None]).squeeze(1)
        return torch.where(valid, lp, torch.zeros_like(lp))
    # The max only stabilises exp(); logsumexp's gradient does not flow through it.
    gmax = all_reduce_(logits.detach().amax(1).contiguous(), layout.group, dist.ReduceOp.MAX)
    sumexp = reduce_from_tp(torch.exp(logits - gmax[:, None]).sum(1), layout.group)
    label_logit = logits.gather(1, idx[:, None]).squeeze(1)
    label_logit = reduce_from_tp(torch.where(owned, label_logit, torch.zeros_like(label_logit)), layout.group)
    lp = label_logit - gmax - torch.log(sumexp)
    return torch.where(valid, lp, torch.zeros_like(lp))
