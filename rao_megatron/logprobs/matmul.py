"""Matmul "plans" for the chunked path: how the three products run at a given precision.

A plan is prepared once per call with this rank's valid weight rows ``W`` ``[V, H]`` (padding rows are
never multiplied) and then serves, per token chunk ``h`` ``[c, H]``:

- ``logits(h)``                 -> ``h @ W.T``  ``[c, V]`` in the statistics dtype (fp32; fp64 for fp64 inputs)
- ``grad_hidden(G)``            -> ``G @ W``    ``[c, H]`` same dtype
- ``accumulate_grad_weight(acc, G, h)``: ``acc += G.T @ h`` into an fp32 ``[V, H]`` accumulator.
"""

from __future__ import annotations

import warnings

import torch

#: Vocab rows per slice when a product's output must be cast before accumulating (bf16/fp8): bounds the
#: temporary to ``[slice, H]`` instead of a second full ``[V, H]`` buffer.
GRAD_W_SLICE_ROWS = 16384


class Fp32Plan:
    """Exact path: fp32 matmuls (fp64 when the inputs are fp64, for the oracle tests)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.w = weight.to(self.dtype)  # no copy for fp32 weights

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self.dtype) @ self.w.t()

    def grad_hidden(self, grad_logits: torch.Tensor) -> torch.Tensor:
        return grad_logits @ self.w

    def accumulate_grad_weight(self, acc: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
        acc.addmm_(grad_logits.t(), h.to(self.dtype))


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for bf16 operands with an fp32 result.

    On CUDA ``torch.mm(..., out_dtype=float32)`` keeps the fp32 accumulator un-rounded; a torch without it
    is refused there (bf16-rounded logits would quietly cost accuracy on the hot path). CPU has no such
    kernel: the product is rounded to bf16 first, with a warning (the bf16 test tolerance allows for it).
    """
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError as e:
            raise RuntimeError(f"torch {torch.__version__} has no torch.mm(..., out_dtype=): bf16 log-probs need "
                               "fp32 accumulation on CUDA; upgrade torch or set model.logprob_precision=fp32") from e
    warnings.warn("bf16 log-prob matmul on CPU: products are rounded to bf16 before the fp32 softmax "
                  "(no fp32-output bf16 matmul on CPU)", stacklevel=2)
    return (a @ b).float()


class Bf16Plan:
    """bf16 matmul inputs, fp32 accumulation and fp32 softmax statistics."""

    dtype = torch.float32

    def __init__(self, weight: torch.Tensor) -> None:
        self.w = weight.to(torch.bfloat16)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return mm_f32(h.to(torch.bfloat16), self.w.t())

    def grad_hidden(self, grad_logits: torch.Tensor) -> torch.Tensor:
        return mm_f32(grad_logits.to(torch.bfloat16), self.w)

    def accumulate_grad_weight(self, acc: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
        g = grad_logits.to(torch.bfloat16)
        hb = h.to(torch.bfloat16)
        for v0 in range(0, g.shape[1], GRAD_W_SLICE_ROWS):
            v1 = min(v0 + GRAD_W_SLICE_ROWS, g.shape[1])
            acc[v0:v1].add_(mm_f32(g[:, v0:v1].t(), hb))
