"""Vocab-parallel log-probs (single rank): chunked vs the materializing reference, errors, memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rao_megatron.logprobs as lp
from rao_megatron.logprobs import (
    LOGPROB_IMPLS,
    LOGPROB_PRECISIONS,
    default_chunk_size,
    vocab_parallel_logprobs,
)

T, H, V = 37, 24, 50


def make(t: int = T, h: int = H, v: int = V, dtype: torch.dtype = torch.float64, seed: int = 0,
         n_real: int | None = None):
    """Inputs with logits of O(1-3): hidden [t, h], weight [v, h], labels [t] in [0, n_real)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g, dtype=torch.float64) / h**0.25
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.25
    labels = torch.randint(0, n_real or v, (t,), generator=g)
    upstream = torch.randn(t, generator=g, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), labels, upstream


def run(impl: str, hidden, weight, labels, upstream, **kw):
    """Log-probs and grads of sum(out * upstream) w.r.t. hidden and weight."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = vocab_parallel_logprobs(h, w, labels, impl=impl, **kw)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), h.grad, w.grad


def assert_close(got, want, atol, rtol=0.0):
    for name, a, b in zip(("logprobs", "grad_hidden", "grad_weight"), got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def test_public_constants():
    assert LOGPROB_IMPLS == ("reference", "chunked", "triton")
    assert LOGPROB_PRECISIONS == ("fp32", "bf16", "fp8")


def test_reference_is_log_softmax():
    hidden, weight, labels, _ = make()
    want = torch.log_softmax(hidden @ weight.t(), -1).gather(1, labels[:, None]).squeeze(1)
    out = vocab_parallel_logprobs(hidden, weight, labels, impl="reference")
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 64])  # 5 and 16 do not divide T=37; 64 > T
def test_chunked_matches_reference_fp64(chunk):
    data = make()
    assert_close(run("chunked", *data, chunk_size=chunk), run("reference", *data), atol=1e-11)


def test_default_chunk_size():
    # 256 MiB of fp32 logits at V_local=128256 -> 523 tokens, rounded down to a multiple of 64.
    assert default_chunk_size(128256) == 512
    assert default_chunk_size(128256 // 8) == 4160 // 64 * 64
    assert default_chunk_size(10) == 8192 and default_chunk_size(10**9) == 64


def test_padding_rows_are_masked():
    n_real = 43
    hidden, weight, labels, up = make(n_real=n_real)
    labels[0] = labels[7] = n_real - 1  # the last real id
    weight[n_real:] = 25.0  # huge logits if the padding leaked into the softmax
    got = run("chunked", hidden, weight, labels, up, vocab_size=n_real, chunk_size=8)
    want = run("reference", hidden, weight, labels, up, vocab_size=n_real)
    assert_close(got, want, atol=1e-11)
    # The oracle itself equals a softmax over the real rows only, and padding gets no gradient.
    real = torch.log_softmax(hidden @ weight[:n_real].t(), -1).gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(want[0], real, atol=1e-12, rtol=0)
    assert torch.all(got[2][n_real:] == 0)
    # ... and the test can fail: without vocab_size the padded rows change the answer.
    leaked = vocab_parallel_logprobs(hidden, weight, labels, chunk_size=8)
    assert (leaked - real).abs().max() > 1.0


def test_ignored_positions_and_whole_ignored_chunks():
    hidden, weight, labels, up = make()
    labels[:16] = -100  # chunks 0 and 1 (chunk_size 8) hold no real label
    labels[[20, 29, 36]] = -100
    got = run("chunked", hidden, weight, labels, up, chunk_size=8)
    assert_close(got, run("reference", hidden, weight, labels, up), atol=1e-11)
    ignored = labels == -100
    assert torch.all(got[0][ignored] == 0) and torch.all(got[0][~ignored] < 0)
    assert torch.all(got[1][ignored] == 0)


def test_custom_ignore_index_and_all_ignored():
    hidden, weight, labels, up = make()
    labels[::3] = 7
    got = run("chunked", hidden, weight, labels, up, ignore_index=7, chunk_size=4)
    assert_close(got, run("reference", hidden, weight, labels, up, ignore_index=7), atol=1e-11)
    assert torch.all(got[0][labels == 7] == 0)
    out, gh, gw = run("chunked", hidden, weight, torch.full_like(labels, -100), up)
    assert torch.all(out == 0) and torch.all(gh == 0) and torch.all(gw == 0)


def test_empty_input():
    hidden, weight, _, _ = make(t=0)
    out = vocab_parallel_logprobs(hidden.requires_grad_(), weight, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)


def test_tied_embedding_weight_accumulates():
    hidden, weight, labels, up = make()
    tokens = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(1))

    def grads(impl):
        w = weight.detach().clone().requires_grad_()
        h0 = hidden.detach().clone().requires_grad_()
        emb = torch.nn.functional.embedding(tokens, w)  # the same weight, used as the input embedding
        h = torch.tanh(h0 + emb)
        out = vocab_parallel_logprobs(h, w, labels, impl=impl, chunk_size=6)
        ((out * up).sum() + (emb**2).sum() * 0.1).backward()
        return out.detach(), h0.grad, w.grad

    got, want = grads("chunked"), grads("reference")
    assert_close(got, want, atol=1e-11)
    # Both uses contribute: the grad differs from the output-layer grad alone.
    only_out = run("reference", torch.tanh(hidden + weight[tokens]), weight, labels, up)[2]
    assert (want[2] - only_out).abs().max() > 1e-3


def test_only_weight_or_only_hidden_requires_grad():
    hidden, weight, labels, up = make()
    ref = run("reference", hidden, weight, labels, up)
    w = weight.clone().requires_grad_()
    (vocab_parallel_logprobs(hidden, w, labels, chunk_size=8) * up).sum().backward()
    torch.testing.assert_close(w.grad, ref[2], atol=1e-11, rtol=0)
    h = hidden.clone().requires_grad_()
    (vocab_parallel_logprobs(h, weight, labels, chunk_size=8) * up).sum().backward()
    torch.testing.assert_close(h.grad, ref[1], atol=1e-11, rtol=0)


def test_fp32_inputs_give_fp32_and_match():
    hidden, weight, labels, up = make()
    want = run("reference", hidden, weight, labels, up)
    got = run("chunked", hidden.float(), weight.float(), labels, up, chunk_size=8)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    assert_close(got, want, atol=2e-5)


def test_bf16_precision_within_tolerance():
    # bf16 rounds each matmul operand to 8 mantissa bits (relative 2^-9 = 0.002); on CPU the product is
    # also rounded to bf16 (no fp32-output bf16 GEMM), so a logit of magnitude ~3 is off by up to ~0.02.
    # Log-probs inherit roughly twice that (label logit and logsumexp), gradients are O(1) here and get a
    # few 1e-2 from rounding G to bf16. 0.05 absolute is ~20x the fp32 error budget and fails if the
    # statistics were kept in bf16 (errors of 0.1+) or the padding leaked.
    hidden, weight, labels, up = make(n_real=45)
    weight[45:] = 25.0
    want = run("reference", hidden, weight, labels, up, vocab_size=45)
    for dt in (torch.float32, torch.bfloat16):
        got = run("chunked", hidden.to(dt), weight.to(dt), labels, up, vocab_size=45, chunk_size=8,
                  precision="bf16")
        assert got[0].dtype == torch.float32 and got[1].dtype == dt and got[2].dtype == dt
        assert_close(got, want, atol=0.05)
    ref_bf16 = run("reference", hidden.float(), weight.float(), labels, up, vocab_size=45, precision="bf16")
    assert_close(ref_bf16, want, atol=0.05)


def test_fp8_math_with_hardware_check_bypassed(monkeypatch):
    # CPU torch has _scaled_mm, so the FP8 plan's layout/scale/padding logic can be checked here; the
    # hardware gate is what stops users. E4M3 keeps 3 mantissa bits (relative 2^-4): log-probs of O(3)
    # are off by ~0.1-0.2 and the gradients (E5M2, 2 bits) by a similar absolute amount.
    for mod in (lp, lp.fp8, lp.reference):
        monkeypatch.setattr(mod, "check_fp8_supported", lambda device: None)
    hidden, weight, labels, up = make(t=40, h=32, v=48, n_real=45)  # none of T, V, vocab multiples of 16
    want = run("reference", hidden, weight, labels, up, vocab_size=45)
    got = run("chunked", hidden.float(), weight.float(), labels, up, vocab_size=45, chunk_size=24,
              precision="fp8")
    assert_close(got, want, atol=0.35)
    err = (got[0].double() - want[0]).abs().mean()
    assert 1e-4 < err < 0.15  # really quantized, and not garbage
    fake = run("reference", hidden.float(), weight.float(), labels, up, vocab_size=45, precision="fp8")
    assert_close(fake, want, atol=0.35)


def test_fp8_rejected_without_hardware():
    hidden, weight, labels, _ = make()
    with pytest.raises(RuntimeError, match=r"Hopper.*bf16|bf16"):
        vocab_parallel_logprobs(hidden, weight, labels, precision="fp8")


@pytest.mark.parametrize("bad, pattern", [
    (45, r"labels\[5\] = 45 falls in the vocabulary padding: vocab_size is 45 \(padded to 50"),
    (50, r"labels\[5\] = 50 is >= the padded vocabulary 50 \(vocab_size 45\)"),
    (-3, r"labels\[5\] = -3 is negative \(only ignore_index=-100"),
])
def test_bad_labels_raise_clear_error(bad, pattern):
    hidden, weight, labels, _ = make(n_real=45)
    labels[5] = labels[9] = bad
    with pytest.raises(ValueError, match=pattern) as e:
        vocab_parallel_logprobs(hidden, weight, labels, vocab_size=45)
    assert "2 bad label(s)" in str(e.value)


@pytest.mark.parametrize("kw, pattern", [
    (dict(hidden=torch.zeros(4, 3, 2)), r"hidden must be \[tokens, hidden_size\]"),
    (dict(weight=torch.zeros(V, H + 1)), r"hidden size mismatch"),
    (dict(labels=torch.zeros(T + 1, dtype=torch.long)), r"labels has 38 tokens but hidden covers 37"),
    (dict(labels=torch.zeros(T)), r"1-D integer tensor"),
    (dict(vocab_size=V + 1), r"vocab_size=51 must be in \[1, 50\]"),
    (dict(impl="fused"), r"impl='fused'"),
    (dict(precision="fp16"), r"precision='fp16'"),
    (dict(chunk_size=0), r"chunk_size must be a positive int"),
])
def test_bad_arguments_raise(kw, pattern):
    hidden, weight, labels, _ = make()
    args = dict(hidden=hidden, weight=weight, labels=labels)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    with pytest.raises(ValueError, match=pattern):
        vocab_parallel_logprobs(args["hidden"], args["weight"], args["labels"], **kw)


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


def test_chunked_never_materializes_full_logits():
    t, h, v, chunk = 96, 16, 60, 16  # T*V = 5760 > chunk*V = 960, V*H = 960, T*H = 1536
    hidden, weight, labels, up = make(t=t, h=h, v=v)

    def largest(impl):
        hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with _LargestTensor() as mode:
            (vocab_parallel_logprobs(hh, ww, labels, impl=impl, chunk_size=chunk) * up).sum().backward()
        return mode.max_numel

    assert largest("reference") >= t * v  # the detector sees the full logits when they exist
    assert largest("chunked") <= max(chunk * v, v * h, t * h)


def test_triton_kernels_in_interpreter():
    """Runs tests/unit/logprobs_triton_cases.py in a subprocess with TRITON_INTERPRET=1.

    Triton decorates its own library functions (tl.zeros, ...) when it is first imported, and
    megatron.core imports triton, so the variable cannot be switched on inside this process.
    """
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           str(Path(__file__).with_name("logprobs_triton_cases.py"))]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-2000:]


def test_bf16_matmul_without_fp32_output_warns_on_cpu():
    # CPU has no bf16 matmul with an fp32 result: the product is rounded to bf16 first, and says so
    from rao_megatron.logprobs.matmul import mm_f32

    a, b = torch.randn(4, 8).bfloat16(), torch.randn(8, 3).bfloat16()
    with pytest.warns(UserWarning, match="rounded to bf16"):
        out = mm_f32(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (a.float() @ b.float()), rtol=2e-2, atol=2e-2)
