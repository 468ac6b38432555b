"""Log-probs on CUDA: compiled Triton kernels, bf16, FP8 on Hopper/Ada, and the FP8 hardware error."""

from __future__ import annotations

import pytest
import torch

from rao_megatron.logprobs import vocab_parallel_logprobs

CUDA = torch.cuda.is_available()
FP8 = CUDA and torch.cuda.get_device_capability() >= (8, 9)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

T, H, V, N_REAL = 1000, 256, 4224, 4100  # T and V not multiples of the GPU tiles (64, 128)


def make(device: str = "cuda", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64) / H**0.25
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.25
    weight[N_REAL:] = 25.0  # padding that would dominate if not masked
    labels = torch.randint(0, N_REAL, (T,), generator=g)
    labels[:70] = -100
    labels[100] = N_REAL - 1
    upstream = torch.randn(T, generator=g, dtype=torch.float64)
    return hidden.to(device), weight.to(device), labels.to(device), upstream.to(device)


def grads(hidden, weight, labels, upstream, dtype, **kw):
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    out = vocab_parallel_logprobs(h, w, labels, vocab_size=N_REAL, **kw)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach().double(), h.grad.double(), w.grad.double()


def check(got, want, atol):
    for name, a, b in zip(("logprobs", "grad_hidden", "grad_weight"), got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_fp8_on_cpu_raises_clear_error():
    hidden, weight, labels, _ = make("cpu")
    with pytest.raises(RuntimeError, match=r"Hopper.*8\.9.*A100.*precision='bf16'"):
        vocab_parallel_logprobs(hidden.float(), weight.float(), labels, vocab_size=N_REAL, precision="fp8")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_fp32_matches_reference(impl):
    data = make()
    want = grads(*data, torch.float64, impl="reference")
    got = grads(*data, torch.float32, impl=impl, chunk_size=256)
    assert got[0][data[2] == -100].abs().max() == 0
    check(got, want, atol=1e-4)  # fp32 (ieee dot in Triton; cuBLAS may use TF32 only if the user enabled it)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_bf16_within_tolerance(impl):
    # bf16 operands (relative 2^-9), fp32 accumulation and statistics: see tests/unit/test_logprobs.py.
    data = make(seed=1)
    want = grads(*data, torch.float64, impl="reference")
    got = grads(*data, torch.bfloat16, impl=impl, precision="bf16", chunk_size=256)
    check(got, want, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not FP8, reason="needs FP8 tensor cores (compute capability >= 8.9)")
def test_fp8_on_hopper():
    # E4M3 operands / E5M2 grads with per-tensor scales: a few 0.1 absolute on O(3) logits.
    data = make(seed=2)
    want = grads(*data, torch.float64, impl="reference")
    got = grads(*data, torch.bfloat16, impl="chunked", precision="fp8", chunk_size=256)
    check(got, want, atol=0.35)
    assert (got[0] - want[0]).abs().mean() < 0.15


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or FP8, reason="needs a CUDA device without FP8 (e.g. A100)")
def test_fp8_on_non_fp8_gpu_raises():
    hidden, weight, labels, _ = make()
    with pytest.raises(RuntimeError, match=r"compute capability.*A100.*precision='bf16'"):
        vocab_parallel_logprobs(hidden.bfloat16(), weight.bfloat16(), labels, precision="fp8")


@pytest.mark.gpu
@needs_cuda
def test_triton_memory_stays_small():
    # No [T, V] buffer: peak extra memory is the grads (fp32 accumulators) plus O(T) statistics.
    t, h, v = 4096, 512, 32768
    hidden = torch.randn(t, h, device="cuda", requires_grad=True)
    weight = torch.randn(v, h, device="cuda", requires_grad=True)
    labels = torch.randint(0, v, (t,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vocab_parallel_logprobs(hidden, weight, labels, impl="triton").sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < t * v * 4 / 4, f"peak extra {extra / 2**20:.0f} MiB; logits alone are {t * v * 4 / 2**20:.0f} MiB"
