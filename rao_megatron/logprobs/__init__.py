"""Vocab-parallel per-token log-probs without materializing the ``[T, V/tp]`` logits (DESIGN.md §3)."""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from .chunked import ChunkedLogprobs
from .comm import hidden_to_full
from .common import check_inputs, default_chunk_size
from .fp8 import check_fp8_supported
from .reference import reference_logprobs

#: ``impl`` values: the materializing autograd oracle, the chunked PyTorch path, the Triton kernels.
LOGPROB_IMPLS: tuple[str, ...] = ("reference", "chunked", "triton")
#: ``precision`` values: matmul input precision (statistics and output are always fp32).
LOGPROB_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp8")

__all__ = ["LOGPROB_IMPLS", "LOGPROB_PRECISIONS", "default_chunk_size", "vocab_parallel_logprobs"]


def vocab_parallel_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                            tp_group: ProcessGroup | None = None, vocab_size: int | None = None,
                            ignore_index: int = -100, chunk_size: int | None = None, impl: str = "chunked",
                            precision: str = "fp32", sequence_parallel: bool = False) -> torch.Tensor:
    """Per-token ``log p(labels[t] | hidden[t])`` under a vocab-parallel output layer.

    Args:
        hidden: ``[T, H]`` final hidden states (``[T/tp, H]``, this rank's sequence shard, when
            ``sequence_parallel``; they are all-gathered along dim 0 and the grad reduce-scattered).
        weight: ``[V_local, H]`` this rank's output-layer shard: rank r owns padded-vocab rows
            ``r*V_local .. (r+1)*V_local - 1``. May be a tied embedding weight (grads accumulate).
        labels: ``[T]`` global token ids over the full sequence; ``ignore_index`` marks skipped positions.
        tp_group: tensor-parallel group; ``None`` means a single rank.
        vocab_size: unpadded vocab size; rows at or past it are excluded from the softmax (None: no padding).
        chunk_size: tokens per chunk for ``impl="chunked"``; None picks ``default_chunk_size(V_local)``
            (largest multiple of 64 whose fp32 ``[chunk, V_local]`` logits fit 256 MiB). Unused by others.
        impl: one of ``LOGPROB_IMPLS``.
        precision: ``"fp32"``, ``"bf16"`` (bf16 matmul inputs, fp32 accumulation and statistics) or
            ``"fp8"`` (Hopper/Ada only, chunked or reference; raises ``RuntimeError`` elsewhere).
        sequence_parallel: see ``hidden``.

    Returns:
        ``[T]`` fp32 log-probs (fp64 if the inputs are fp64), exactly 0 where ``labels == ignore_index``.
        Differentiable w.r.t. ``hidden`` and ``weight``.
    """
    if impl not in LOGPROB_IMPLS:
        raise ValueError(f"impl={impl!r}; expected one of {LOGPROB_IMPLS}")
    if precision not in LOGPROB_PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {LOGPROB_PRECISIONS}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    layout = check_inputs(hidden, weight, labels, tp_group=tp_group, vocab_size=vocab_size,
                          ignore_index=ignore_index, sequence_parallel=sequence_parallel)
    if precision == "fp8":
        check_fp8_supported(hidden.device)  # fail before any communication
    full = hidden_to_full(hidden, tp_group, sequence_parallel)
    if impl == "reference":
        return reference_logprobs(full, weight, labels, layout, ignore_index, precision)
    if impl == "triton":
        from .triton_kernel import TritonLogprobs  # triton is optional

        return TritonLogprobs.apply(full, weight, labels, layout, ignore_index, precision, None)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(weight.shape[0])
    return ChunkedLogprobs.apply(full, weight, labels, layout, ignore_index, chunk, precision)
