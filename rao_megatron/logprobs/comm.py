"""Tensor-parallel collectives with the autograd rules of a vocab-parallel output layer.

These mirror ``megatron.core.tensor_parallel.mappings`` but take the group explicitly and also work on
gloo (CPU tests), which lacks ``reduce_scatter_tensor``: there we all-reduce and keep our slice. The loss
downstream of the log-probs is replicated on every TP rank, which fixes the backward rules below.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def tp_world(group: ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) of this process in ``group``; (0, 1) for ``None`` (single rank)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _is_gloo(group: ProcessGroup) -> bool:
    return dist.get_backend(group) == "gloo"


def all_reduce_(t: torch.Tensor, group: ProcessGroup | None, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    """In-place all-reduce of a contiguous tensor; a no-op for a single rank."""
    if group is not None and dist.get_world_size(group) > 1:
        assert t.is_contiguous(), "all_reduce_ needs a contiguous tensor"
        dist.all_reduce(t, op=op, group=group)
    return t


def gather_first_dim(t: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, rank order."""
    t = t.contiguous()
    size = dist.get_world_size(group)
    if _is_gloo(group):
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts, 0)
    out = t.new_empty((t.shape[0] * size, *t.shape[1:]))
    dist.all_gather_into_tensor(out, t, group=group)
    return out


def reduce_scatter_first_dim(t: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum ``t`` over ranks and keep this rank's dim-0 slice."""
    t = t.contiguous()
    rank, size = tp_world(group)
    n = t.shape[0] // size
    if _is_gloo(group):
        dist.all_reduce(t, group=group)
        return t[rank * n:(rank + 1) * n].clone()
    out = t.new_empty((n, *t.shape[1:]))
    dist.reduce_scatter_tensor(out, t, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the partial input-grads of each rank's vocab shard."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return all_reduce_(g.contiguous().clone(), ctx.group, dist.ReduceOp.SUM), None


class _GatherSeq(torch.autograd.Function):
    """Sequence-parallel all-gather along dim 0; backward reduce-scatters the partial grads."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return gather_first_dim(x, group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return reduce_scatter_first_dim(g.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce SUM forward; identity backward (the consumer is replicated on every rank)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_(x.contiguous().clone(), group, dist.ReduceOp.SUM)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g, None


def hidden_to_full(hidden: torch.Tensor, group: ProcessGroup | None, sequence_parallel: bool) -> torch.Tensor:
    """The full-sequence hidden states ``[T, H]`` this rank's vocab shard is applied to.

    Without SP the input is already full and only the backward needs an all-reduce of the per-shard
    partial grads; with SP it is this rank's ``[T/tp, H]`` slice, gathered (backward: reduce-scatter).
    """
    _, size = tp_world(group)
    if size == 1:
        return hidden
    if sequence_parallel:
        return _GatherSeq.apply(hidden, group)
    return _CopyToTP.apply(hidden, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Differentiable all-reduce SUM (identity backward); a no-op for a single rank."""
    if tp_world(group)[1] == 1:
        return x
    return _ReduceFromTP.apply(x, group)
