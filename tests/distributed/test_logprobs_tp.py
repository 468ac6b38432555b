"""Vocab-parallel log-probs at TP=2 over gloo vs the single-rank reference on the full weight."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rao_megatron.logprobs import vocab_parallel_logprobs
from rao_megatron.parallel.launch import run_distributed

pytestmark = pytest.mark.distributed

TP = 2
T, H, V_LOCAL = 22, 16, 24  # padded vocab 48


def _data(vocab_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64) / H**0.25
    weight = torch.randn(TP * V_LOCAL, H, generator=g, dtype=torch.float64) / H**0.25
    weight[vocab_size:] = 25.0  # padding rows that would dominate if they leaked into the softmax
    labels = torch.randint(0, vocab_size, (T,), generator=g)
    labels[[1, 4]] = vocab_size - 1  # last real id (on rank 1 unless rank 1 is all padding)
    labels[[2, 5]] = 0  # first id, on rank 0
    labels[[7, 12, 13]] = -100
    upstream = torch.randn(T, generator=g, dtype=torch.float64)
    return hidden, weight, labels, upstream


def _grads(hidden, weight, labels, upstream, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = vocab_parallel_logprobs(h, w, labels, **kw)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


def _check(name, got, want):
    torch.testing.assert_close(got, want, atol=1e-11, rtol=0, msg=lambda m: f"rank {dist.get_rank()} {name}: {m}")


def _worker(cases) -> None:
    rank = dist.get_rank()
    group = dist.group.WORLD
    rows = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    seq = slice(rank * T // TP, (rank + 1) * T // TP)
    for seed, (impl, sp, vocab_size, chunk) in enumerate(cases):
        hidden, weight, labels, up = _data(vocab_size, seed)
        ref_out, ref_gh, ref_gw = _grads(hidden, weight, labels, up, vocab_size=vocab_size, impl="reference")
        h_in = hidden[seq] if sp else hidden
        out, gh, gw = _grads(h_in, weight[rows], labels, up, tp_group=group, vocab_size=vocab_size,
                             impl=impl, sequence_parallel=sp, chunk_size=chunk)
        tag = f"{impl} sp={sp} vocab={vocab_size}"
        _check(f"{tag} logprobs", out, ref_out)
        _check(f"{tag} grad_hidden", gh, ref_gh[seq] if sp else ref_gh)
        _check(f"{tag} grad_weight", gw, ref_gw[rows])


def test_tp2_matches_single_rank_reference():
    cases = [(impl, sp, vocab, chunk)
             for impl in ("chunked", "reference")
             for sp in (False, True)
             # 41: rank 1 partly padding; 20: rank 1 only padding; 48: no padding
             for vocab, chunk in ((41, 5), (20, 8), (48, None))]
    run_distributed(_worker, TP, cases)


def _bad_label_worker() -> None:
    hidden, weight, labels, _ = _data(41, 0)
    labels[3] = 44
    rows = slice(dist.get_rank() * V_LOCAL, (dist.get_rank() + 1) * V_LOCAL)
    with pytest.raises(ValueError, match=r"labels\[3\] = 44 falls in the vocabulary padding"):
        vocab_parallel_logprobs(hidden, weight[rows], labels, tp_group=dist.group.WORLD, vocab_size=41)
    labels[3] = 48
    with pytest.raises(ValueError, match=r"labels\[3\] = 48 is >= the padded vocabulary 48"):
        vocab_parallel_logprobs(hidden, weight[rows], labels, tp_group=dist.group.WORLD, vocab_size=41)
    with pytest.raises(ValueError, match=r"labels has 11 tokens but hidden covers 22 \(sequence parallel: 11 local"):
        vocab_parallel_logprobs(hidden[:11], weight[rows], labels[:11], tp_group=dist.group.WORLD,
                                sequence_parallel=True)


def test_tp2_bad_labels_and_shapes_raise():
    run_distributed(_bad_label_worker, TP)
