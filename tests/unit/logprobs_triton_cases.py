"""Triton log-prob kernels in Triton's interpreter (CPU) vs the fp64 reference.

Not collected on its own (the name lacks ``test_``): ``test_logprobs.py::test_triton_kernels_in_interpreter``
runs this file in a subprocess with ``TRITON_INTERPRET=1``, which must be set before triton is imported.
Sizes are tiny because the interpreter executes every program instance in Python.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported; run via test_logprobs.py",
                allow_module_level=True)

triton = pytest.importorskip("triton")

from rao_megatron.logprobs import vocab_parallel_logprobs  # noqa: E402
from rao_megatron.logprobs.common import check_inputs  # noqa: E402
from rao_megatron.logprobs.triton_kernel import TritonLogprobs  # noqa: E402

T, H, V, N_REAL = 37, 40, 70, 61  # none a multiple of the interpreter tiles (16, 32, 16)


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64) / H**0.25
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.25
    weight[N_REAL:] = 25.0  # would dominate the softmax if padding were not masked
    labels = torch.randint(0, N_REAL, (T,), generator=g)
    labels[[0, 11]] = N_REAL - 1  # last real id
    labels[16:32] = -100  # a whole 16-token tile ignored
    labels[3] = -100
    upstream = torch.randn(T, generator=g, dtype=torch.float64)
    return hidden, weight, labels, upstream


def grads(fn, hidden, weight, labels, upstream, dtype):
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    out = fn(h, w, labels)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach().double(), h.grad.double(), w.grad.double()


def check(got, want, atol):
    for name, a, b in zip(("logprobs", "grad_hidden", "grad_weight"), got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def reference(hidden, weight, labels, upstream):
    return grads(lambda h, w, lab: vocab_parallel_logprobs(h, w, lab, vocab_size=N_REAL, impl="reference"),
                 hidden, weight, labels, upstream, torch.float64)


def test_interpreter_is_active():
    assert triton.knobs.runtime.interpret


@pytest.mark.parametrize("num_splits", [None, 3])  # 3 vocab splits exercise the split merge
def test_triton_fp32_matches_reference(num_splits):
    data = make()

    def fn(h, w, lab):
        layout = check_inputs(h, w, lab, tp_group=None, vocab_size=N_REAL, ignore_index=-100,
                              sequence_parallel=False)
        return TritonLogprobs.apply(h, w, lab, layout, -100, "fp32", num_splits)

    got = grads(fn, *data, torch.float32)
    check(got, reference(*data), atol=1e-5)
    labels = data[2]
    assert torch.all(got[0][labels == -100] == 0) and torch.all(got[1][labels == -100] == 0)
    assert torch.all(got[2][N_REAL:] == 0)


def test_triton_bf16_within_tolerance():
    # Operands rounded to bf16 (relative 2^-9) with fp32 accumulation and fp32 statistics: logits of
    # O(3) move by <~0.01, log-probs by twice that; grads also see G rounded to bf16. Same 0.05 budget as
    # the chunked bf16 test.
    data = make(1)
    got = grads(lambda h, w, lab: vocab_parallel_logprobs(h, w, lab, vocab_size=N_REAL, impl="triton",
                                                          precision="bf16"), *data, torch.bfloat16)
    check(got, reference(*data), atol=0.05)


def test_triton_rejects_fp8():
    hidden, weight, labels, _ = make()
    with pytest.raises((ValueError, RuntimeError), match="fp8|FP8"):
        vocab_parallel_logprobs(hidden.float(), weight.float(), labels, impl="triton", precision="fp8")
