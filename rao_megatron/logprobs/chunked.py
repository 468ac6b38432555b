"""Chunked vocab-parallel log-probs in plain PyTorch (the default; CPU and GPU).

Walks the tokens in chunks of ``chunk_size``; only one ``[chunk, V_local]`` logits block exists at a
time, in forward and in backward. Forward keeps per-token max / sum-exp / label logit; backward
recomputes each chunk's logits from the saved hidden states, weight and per-token logsumexp and forms
``G = (onehot - softmax) * g`` for ``grad_h = G @ W`` and ``grad_W += G.T @ h``.
"""

from __future__ import annotations

import torch

from .common import ShardLayout, combine_tp_stats, local_labels, stats_dtype
from .fp8 import Fp8Plan
from .matmul import Bf16Plan, Fp32Plan

_PLANS = {"fp32": Fp32Plan, "bf16": Bf16Plan, "fp8": Fp8Plan}


def _chunks(valid: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """Token ranges that hold at least one non-ignored label (one host sync for all chunks)."""
    t = valid.shape[0]
    starts = list(range(0, t, chunk))
    if not starts:
        return []
    pad = starts[-1] + chunk - t
    any_valid = torch.nn.functional.pad(valid, (0, pad)).view(-1, chunk).any(1).tolist()
    return [(s, min(s + chunk, t)) for s, keep in zip(starts, any_valid) if keep]


class ChunkedLogprobs(torch.autograd.Function):
    """``[T, H]`` hidden x ``[V_local, H]`` shard -> ``[T]`` log-probs; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                layout: ShardLayout, ignore_index: int, chunk_size: int, precision: str) -> torch.Tensor:
        idx, owned, valid = local_labels(labels, layout, ignore_index)
        sdt = stats_dtype(hidden)
        t = hidden.shape[0]
        # Chunks with no real label keep neutral stats (m=0, s=1): their output is masked to 0 anyway.
        m = torch.zeros(t, dtype=sdt, device=hidden.device)
        s = torch.ones(t, dtype=sdt, device=hidden.device)
        ll = torch.zeros(t, dtype=sdt, device=hidden.device)
        chunks = _chunks(valid, chunk_size)
        if layout.n_valid == 0:  # this rank holds only padding rows: contributes exp(-inf) = 0
            m.fill_(float("-inf"))
            s.zero_()
        else:
            plan = _PLANS[precision](weight[: layout.n_valid])  # padding rows are never multiplied
            for c0, c1 in chunks:
                logits = plan.logits(hidden[c0:c1]).to(sdt)  # [c, n_valid]
                ll[c0:c1] = logits.gather(1, idx[c0:c1, None]).squeeze(1)
                mc = logits.amax(1)
                m[c0:c1] = mc
                s[c0:c1] = logits.sub_(mc[:, None]).exp_().sum(1)  # in place: no second [c, V] buffer
                del logits
        ll = torch.where(owned, ll, torch.zeros_like(ll))
        lse, label_logit = combine_tp_stats(m, s, ll, layout)
        out = torch.where(valid, label_logit - lse, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, idx, owned, valid, lse)
        ctx.layout, ctx.chunks, ctx.precision = layout, chunks, precision
        ctx.mark_non_differentiable(labels)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        hidden, weight, idx, owned, valid, lse = ctx.saved_tensors
        layout: ShardLayout = ctx.layout
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        sdt = lse.dtype
        g = torch.where(valid, grad_out.to(sdt), torch.zeros_like(lse))
        g_owned = torch.where(owned, g, torch.zeros_like(g))
        grad_h = torch.zeros(hidden.shape, dtype=sdt, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=sdt, device=weight.device) if need_w else None
        if layout.n_valid > 0 and (need_h or need_w):
            plan = _PLANS[ctx.precision](weight[: layout.n_valid])
            gw_valid = grad_w[: layout.n_valid] if grad_w is not None else None
            for c0, c1 in ctx.chunks:
                h = hidden[c0:c1]
                gl = plan.logits(h).to(sdt)  # recomputed [c, n_valid]
                gl.sub_(lse[c0:c1, None]).exp_().mul_(-g[c0:c1, None])  # -softmax * g, in place
                gl.scatter_add_(1, idx[c0:c1, None], g_owned[c0:c1, None])  # + onehot * g
                if grad_h is not None:
                    grad_h[c0:c1] = plan.grad_hidden(gl)
                if gw_valid is not None:
                    plan.accumulate_grad_weight(gw_valid, gl, h)
                del gl
        return (grad_h.to(hidden.dtype) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                None, None, None, None, None)
