"""Shared pieces of every log-prob implementation: input checks, shard layout, TP statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .comm import all_reduce_, tp_world

#: Byte budget for one chunk of fp32 logits ``[chunk_tokens, V_local]`` when ``chunk_size`` is None.
#: 256 MiB keeps matmuls large enough to run at full speed (>= 512 tokens for V_local <= 128k) while
#: the whole workspace stays a small fraction of the ``[T, V_local]`` logits the reference builds.
DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's vocab rows sit in the (padded) vocabulary."""

    group: ProcessGroup | None
    tp_rank: int
    tp_size: int
    v_local: int  # rows of this rank's weight shard
    vocab_start: int  # global id of local row 0
    n_valid: int  # local rows < vocab_size (the rest are padding, masked to -inf)
    vocab_size: int  # unpadded global vocab

    @property
    def padded_vocab(self) -> int:
        return self.v_local * self.tp_size


def default_chunk_size(v_local: int) -> int:
    """Token chunk so one fp32 ``[chunk, V_local]`` logits block fits ``DEFAULT_CHUNK_BYTES``.

    Rounded down to a multiple of 64 (tensor-core / FP8 friendly), at least 64 and at most 8192.
    """
    tokens = DEFAULT_CHUNK_BYTES // (4 * max(v_local, 1))
    return int(min(8192, max(64, tokens // 64 * 64)))


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                 tp_group: ProcessGroup | None, vocab_size: int | None, ignore_index: int,
                 sequence_parallel: bool) -> ShardLayout:
    """Validate shapes/dtypes/label ids and return the shard layout; raises ``ValueError``.

    ``hidden``: ``[T, H]`` (``[T/tp, H]`` with sequence parallelism), ``weight``: ``[V_local, H]``,
    ``labels``: ``[T]`` global ids over the full sequence.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [tokens, hidden_size]; got shape {tuple(hidden.shape)} "
                         "(flatten [seq, batch, H] with .reshape(-1, H))")
    if weight.dim() != 2:
        raise ValueError(f"weight must be this rank's vocab shard [V_local, hidden_size]; "
                         f"got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden is {tuple(hidden.shape)} but weight is "
                         f"{tuple(weight.shape)} (last dims must agree)")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden and weight must be floating point; got {hidden.dtype} and {weight.dtype}")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor [T]; got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}")
    if hidden.device != weight.device or hidden.device != labels.device:
        raise ValueError(f"hidden, weight and labels must be on one device; got {hidden.device}, "
                         f"{weight.device}, {labels.device}")
    tp_rank, tp_size = tp_world(tp_group)
    tokens = hidden.shape[0] * (tp_size if sequence_parallel else 1)
    if labels.shape[0] != tokens:
        sp = f" (sequence parallel: {hidden.shape[0]} local tokens x tp {tp_size})" if sequence_parallel else ""
        raise ValueError(f"labels has {labels.shape[0]} tokens but hidden covers {tokens}{sp}; labels "
                         "must hold the full sequence")
    v_local = weight.shape[0]
    padded = v_local * tp_size
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded}] (= {v_local} rows per rank "
                         f"x tp {tp_size})")
    _check_labels(labels, vocab_size, padded, ignore_index)
    vocab_start = tp_rank * v_local
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    return ShardLayout(tp_group, tp_rank, tp_size, v_local, vocab_start, n_valid, vocab_size)


def _check_labels(labels: torch.Tensor, vocab_size: int, padded: int, ignore_index: int) -> None:
    # One fused reduction and one host sync on the happy path; details only when it fails.
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if not bool(bad.any()):
        return
    pos = int(bad.nonzero()[0, 0])
    value = int(labels[pos])
    n_bad = int(bad.sum())
    if value < 0:
        why = f"is negative (only ignore_index={ignore_index} may be negative)"
    elif value < padded:
        why = f"falls in the vocabulary padding: vocab_size is {vocab_size} (padded to {padded} rows)"
    else:
        why = f"is >= the padded vocabulary {padded} (vocab_size {vocab_size})"
    raise ValueError(f"labels[{pos}] = {value} {why}; {n_bad} bad label(s) in total. "
                     f"Mask positions with ignore_index={ignore_index}.")


def local_labels(labels: torch.Tensor, layout: ShardLayout, ignore_index: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split global labels ``[T]`` into this shard's view.

    Returns ``(idx, owned, valid)``: ``idx`` ``[T]`` int64 local row (0 where not owned, safe to gather),
    ``owned`` ``[T]`` bool (label row is on this rank), ``valid`` ``[T]`` bool (label != ignore_index).
    """
    valid = labels != ignore_index
    local = labels.long() - layout.vocab_start
    owned = valid & (local >= 0) & (local < layout.v_local)
    idx = torch.where(owned, local, torch.zeros_like(local))
    return idx, owned, valid


def combine_tp_stats(m: torch.Tensor, s: torch.Tensor, ll: torch.Tensor, layout: ShardLayout
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Global logsumexp and label logit from per-shard statistics (all ``[T]``, fp32 or fp64).

    ``m``: local max logit (-inf if the shard is all padding), ``s``: local sum of exp(logit - m),
    ``ll``: label logit on the owning rank, 0 elsewhere. Two collectives: MAX of ``m``, then one SUM of
    the stacked rescaled sum-exp and label logit. Returns ``(lse, label_logit)``.
    """
    gmax = all_reduce_(m.clone(), layout.group, dist.ReduceOp.MAX)
    # A token whose max is -inf everywhere cannot happen (vocab_size >= 1); guard the local -inf case.
    scale = torch.where(torch.isfinite(m), torch.exp(m - gmax), torch.zeros_like(m))
    both = torch.stack([s * scale, ll])
    all_reduce_(both, layout.group, dist.ReduceOp.SUM)
    return gmax + torch.log(both[0]), both[1]


def stats_dtype(hidden: torch.Tensor) -> torch.dtype:
    """fp32 statistics/output, fp64 only when the caller passes fp64 (used by the exactness tests)."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32
