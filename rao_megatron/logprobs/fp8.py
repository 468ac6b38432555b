"""FP8 matmul plan (Hopper/Ada): ``torch._scaled_mm`` with per-tensor scales, fp32 output.

Forward operands (hidden, weight) are E4M3; the logits gradient is E5M2 (wider range, as in FP8
training recipes). Every product accumulates in fp32 and the softmax statistics stay fp32.
``_scaled_mm`` wants row-major ``a``, column-major ``b`` and dims that are multiples of 16, so chunks
are zero-padded (zeros add nothing to any product) and outputs sliced back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .matmul import GRAD_W_SLICE_ROWS

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def check_fp8_supported(device: torch.device) -> None:
    """Raise a clear ``RuntimeError`` unless ``device`` has FP8 tensor cores (compute capability >= 8.9)."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap >= (8, 9) and hasattr(torch, "_scaled_mm"):
            return
        where = f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
    else:
        where = f"a {device.type} tensor"
    raise RuntimeError(
        f"precision='fp8' needs FP8 tensor cores: an NVIDIA Hopper (H100/H200) or Ada GPU, compute "
        f"capability >= 8.9; got {where}. A100 (8.0) has no FP8. Use precision='bf16' instead.")


def _pad16(x: torch.Tensor) -> torch.Tensor:
    r, c = x.shape
    return F.pad(x, (0, -c % 16, 0, -r % 16))


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled cast: returns ``(q, scale)`` with ``x ~= q.float() * scale`` (scale fp32 scalar)."""
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp_min(1e-12)
    scale = amax / fmax
    q = (x.float() / scale).clamp_(-fmax, fmax).to(dtype)
    return q, scale


class Fp8Plan:
    """FP8 products for the chunked path; see the module docstring."""

    dtype = torch.float32

    def __init__(self, weight: torch.Tensor) -> None:
        check_fp8_supported(weight.device)
        self.v, self.h = weight.shape
        wq, self.w_scale = quantize(_pad16(weight), E4M3)
        self.wq = wq  # [Vp, Hp] row-major: wq.t() is the column-major b of h @ W.T
        self.wq_t = wq.t().contiguous()  # [Hp, Vp]: its .t() is the column-major b of G @ W

    def _mm(self, a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.float32)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        hq, hs = quantize(_pad16(h), E4M3)
        return self._mm(hq, self.wq.t(), hs, self.w_scale)[: h.shape[0], : self.v]

    def grad_hidden(self, grad_logits: torch.Tensor) -> torch.Tensor:
        gq, gs = quantize(_pad16(grad_logits), E5M2)
        return self._mm(gq, self.wq_t.t(), gs, self.w_scale)[: grad_logits.shape[0], : self.h]

    def accumulate_grad_weight(self, acc: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
        gq, gs = quantize(_pad16(grad_logits), E5M2)
        gq_t = gq.t().contiguous()  # [Vp, cp] row-major a of G.T @ h
        hq, hs = quantize(_pad16(h), E4M3)
        hq_col = hq.t().contiguous().t()  # [cp, Hp] column-major b
        for v0 in range(0, self.v, GRAD_W_SLICE_ROWS):
            v1 = min(v0 + GRAD_W_SLICE_ROWS, self.v)
            # Slice starts are multiples of 16 and the padded rows keep the slice length a multiple too.
            p1 = min(v0 + GRAD_W_SLICE_ROWS, gq_t.shape[0])
            acc[v0:v1].add_(self._mm(gq_t[v0:p1], hq_col, gs, hs)[: v1 - v0, : self.h])
