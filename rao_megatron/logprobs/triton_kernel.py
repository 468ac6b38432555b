"""Triton vocab-parallel log-probs: fused matmul tiles + online logsumexp, no logits in memory.

Forward kernel (grid: token blocks x vocab splits): for a ``[BLOCK_T]`` token block it walks its share
of vocab tiles ``[BLOCK_V]``, forms the logits tile ``h @ W.T`` with ``tl.dot`` over ``BLOCK_H`` slices
(fp32 accumulator) and folds it into running max / sum-exp (online logsumexp) and the label logit.
Splits are merged, and then TP ranks, in torch (``combine_tp_stats``).

Backward kernel (grid: token blocks x vocab tiles): recomputes the logits tile, forms
``G = (onehot - exp(logit - lse)) * g`` in registers, and adds ``G @ W_tile`` into ``grad_h`` and
``G.T @ h_tile`` into ``grad_W`` with fp32 atomics (summation order is therefore not deterministic).

CUDA tensors run compiled. With ``TRITON_INTERPRET=1`` set before triton is imported, the kernels run in
Triton's interpreter on CPU tensors, so CI can check them without a GPU. ``triton.jit`` reads the variable
when it decorates, so the kernels are decorated lazily, at first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from .common import ShardLayout, combine_tp_stats, local_labels

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dev/GPU extra
    triton = None
    tl = None


def _fwd_kernel(H, W, LAB, M_OUT, S_OUT, LL_OUT, T, NV, HD, span,
                s_ht, s_hh, s_wv, s_wh,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    lab = tl.load(LAB + offs_t, mask=t_ok, other=-1)  # local row of the label, -1 if not on this rank
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    ll = tl.zeros([BLOCK_T], tl.float32)
    v_lo = pid_s * span
    v_hi = tl.minimum(v_lo + span, NV)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_hi
        acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        for k0 in range(0, HD, BLOCK_H):
            offs_h = k0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < HD
            h = tl.load(H + offs_t[:, None] * s_ht + offs_h[None, :] * s_hh,
                        mask=t_ok[:, None] & h_ok[None, :], other=0.0)
            w = tl.load(W + offs_v[:, None] * s_wv + offs_h[None, :] * s_wh,
                        mask=v_ok[:, None] & h_ok[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, tl.trans(w), acc)
        logits = tl.where(v_ok[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m = m_new
        ll += tl.sum(tl.where(offs_v[None, :] == lab[:, None], acc, 0.0), 1)
    out = pid_s * T + offs_t
    tl.store(M_OUT + out, m, mask=t_ok)
    tl.store(S_OUT + out, s, mask=t_ok)
    tl.store(LL_OUT + out, ll, mask=t_ok)


def _bwd_kernel(H, W, LAB, LSE, G, DH, DW, T, NV, HD,
                s_ht, s_hh, s_wv, s_wh,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    t_ok = offs_t < T
    v_ok = offs_v < NV
    acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
    for k0 in range(0, HD, BLOCK_H):
        offs_h = k0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < HD
        h = tl.load(H + offs_t[:, None] * s_ht + offs_h[None, :] * s_hh,
                    mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(W + offs_v[:, None] * s_wv + offs_h[None, :] * s_wh,
                    mask=v_ok[:, None] & h_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    lse = tl.load(LSE + offs_t, mask=t_ok, other=0.0)
    g = tl.load(G + offs_t, mask=t_ok, other=0.0)  # 0 at ignored tokens
    lab = tl.load(LAB + offs_t, mask=t_ok, other=-1)
    p = tl.where(v_ok[None, :], tl.exp(acc - lse[:, None]), 0.0)
    onehot = tl.where(offs_v[None, :] == lab[:, None], 1.0, 0.0)
    grad = ((onehot - p) * g[:, None]).to(H.dtype.element_ty)  # [BLOCK_T, BLOCK_V], rounded like h
    if UPCAST:
        grad = grad.to(tl.float32)
    for k0 in range(0, HD, BLOCK_H):
        offs_h = k0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < HD
        w = tl.load(W + offs_v[:, None] * s_wv + offs_h[None, :] * s_wh,
                    mask=v_ok[:, None] & h_ok[None, :], other=0.0)
        h = tl.load(H + offs_t[:, None] * s_ht + offs_h[None, :] * s_hh,
                    mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            dh = tl.dot(grad, w, input_precision="ieee")
            dw = tl.dot(tl.trans(grad), h, input_precision="ieee")
        else:
            dh = tl.dot(grad, w)
            dw = tl.dot(tl.trans(grad), h)
        tl.atomic_add(DH + offs_t[:, None] * HD + offs_h[None, :], dh, mask=t_ok[:, None] & h_ok[None, :])
        tl.atomic_add(DW + offs_v[:, None] * HD + offs_h[None, :], dw, mask=v_ok[:, None] & h_ok[None, :])


_KERNEL_FNS: dict[str, Callable[..., Any]] = {"fwd": _fwd_kernel, "bwd": _bwd_kernel}
_KERNELS: dict[tuple[str, bool], Any] = {}


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("impl='triton' needs the `triton` package (pip install triton); "
                           "use impl='chunked' otherwise")


def _kernel(name: str, device: torch.device) -> Any:
    """The ``triton.jit`` kernel: compiled for CUDA, Triton's interpreter under ``TRITON_INTERPRET=1``."""
    _require_triton()
    interpret = _interpreting()
    if device.type != "cuda" and not interpret:
        # triton.language's own helpers (tl.zeros, ...) are decorated when triton is imported, so the
        # interpreter only works if the variable was set before that import; we cannot switch it here.
        raise RuntimeError(
            f"impl='triton' on {device.type} tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before triton is first imported (megatron.core imports it), or use "
            "impl='chunked'")
    key = (name, interpret)
    if key not in _KERNELS:
        _KERNELS[key] = triton.jit(_KERNEL_FNS[name])  # reads TRITON_INTERPRET now, hence lazily
    return _KERNELS[key]


def _interpreting() -> bool:
    """Whether ``triton.jit`` builds interpreter kernels (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _upcast() -> bool:
    """Interpreter only: its ``tl.dot`` misreads bf16 operands, so tiles go to fp32 first. bf16 x bf16
    products are exact in fp32, so this matches bf16 tensor-core math with fp32 accumulation."""
    return _interpreting()


def _blocks(device: torch.device) -> dict[str, int]:
    """Tile sizes: GPU tiles sized for tensor cores; the interpreter prefers few, small programs."""
    if device.type == "cuda":
        return {"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8}
    return {"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_H": 16}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class TritonLogprobs(torch.autograd.Function):
    """Same contract as ``ChunkedLogprobs``, tiles in Triton kernels (``chunk_size`` is not used)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                layout: ShardLayout, ignore_index: int, precision: str,
                num_splits: int | None) -> torch.Tensor:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"impl='triton' supports precision 'fp32' and 'bf16', not {precision!r}; "
                             "use impl='chunked' for fp8")
        if hidden.dtype == torch.float64:
            raise ValueError("impl='triton' computes in fp32/bf16; fp64 inputs need impl='chunked'")
        cdt = torch.bfloat16 if precision == "bf16" else torch.float32
        idx, owned, valid = local_labels(labels, layout, ignore_index)
        lab = torch.where(owned, idx, torch.full_like(idx, -1)).to(torch.int32)
        h = hidden.to(cdt).contiguous()
        w = weight[: layout.n_valid].to(cdt).contiguous()  # padding rows never enter a tile
        t, hd = h.shape
        blk = _blocks(h.device)
        n_tb = _cdiv(t, blk["BLOCK_T"])
        n_vt = _cdiv(layout.n_valid, blk["BLOCK_V"])
        if num_splits is None:  # enough programs to fill the GPU; the interpreter runs serially
            sms = torch.cuda.get_device_properties(h.device).multi_processor_count if h.is_cuda else 1
            num_splits = min(max(n_vt, 1), max(1, _cdiv(2 * sms, max(n_tb, 1))))
        span = _cdiv(_cdiv(layout.n_valid, num_splits), blk["BLOCK_V"]) * blk["BLOCK_V"]
        stats = torch.empty((3, num_splits, t), dtype=torch.float32, device=h.device)
        if t > 0:
            _kernel("fwd", h.device)[(n_tb, num_splits)](
                h, w, lab, stats[0], stats[1], stats[2], t, layout.n_valid, hd, span,
                h.stride(0), h.stride(1), w.stride(0), w.stride(1),
                IEEE=precision == "fp32", UPCAST=_upcast(), **blk)
        m_split, s_split, ll_split = stats
        m = m_split.amax(0)
        fin = torch.isfinite(m_split)  # splits (or ranks) without rows report m = -inf, s = 0
        s = torch.where(fin, s_split * torch.exp(m_split - torch.where(fin, m, 0.0)), 0.0).sum(0)
        lse, label_logit = combine_tp_stats(m, s, ll_split.sum(0), layout)
        out = torch.where(valid, label_logit - lse, torch.zeros_like(lse))
        ctx.save_for_backward(h, w, lab, lse, valid)
        ctx.hidden_dtype, ctx.weight_shape, ctx.weight_dtype = hidden.dtype, weight.shape, weight.dtype
        ctx.precision = precision
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        h, w, lab, lse, valid = ctx.saved_tensors
        t, hd = h.shape
        g = torch.where(valid, grad_out.float(), 0.0).contiguous()
        dh = torch.zeros((t, hd), dtype=torch.float32, device=h.device)
        dw = torch.zeros(ctx.weight_shape, dtype=torch.float32, device=h.device)
        blk = _blocks(h.device)
        if t > 0 and w.shape[0] > 0:
            grid = (_cdiv(t, blk["BLOCK_T"]), _cdiv(w.shape[0], blk["BLOCK_V"]))
            _kernel("bwd", h.device)[grid](
                h, w, lab, lse, g, dh, dw, t, w.shape[0], hd,
                h.stride(0), h.stride(1), w.stride(0), w.stride(1),
                IEEE=ctx.precision == "fp32", UPCAST=_upcast(), **blk)
        return dh.to(ctx.hidden_dtype), dw.to(ctx.weight_dtype), None, None, None, None, None
