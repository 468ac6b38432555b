"""Tokenize once: a store written and memory-mapped back gives the same groups, report and micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rao_megatron.data import GroupBatcher, load_tokenizer, read_examples, tokenize_examples
from rao_megatron.data.token_store import read_store, store_key, write_store

DATA = "examples/data/tiny_groups.jsonl"


@pytest.fixture(scope="module")
def tokenized():
    tok = load_tokenizer(None)
    groups, report = tokenize_examples(read_examples(DATA), tok, max_length=48, overlength="drop", source=DATA)
    return groups, report


def test_round_trip_is_exact_and_memory_mapped(tmp_path, tokenized):
    groups, report = tokenized
    path = write_store(tmp_path / "s", groups, report, where={3: "line 4"}, parts={"data": "x"})
    back, back_report, where = read_store(path)
    assert len(back) == len(groups) > 0
    for a, b in zip(groups, back):
        assert (a.group_id, a.row, a.rewards, a.is_reference) == (b.group_id, b.row, b.rewards, b.is_reference)
        assert list(a.prompt_ids) == b.prompt_ids.tolist()
        assert [list(y) for y in a.responses] == [y.tolist() for y in b.responses]
    assert back_report.summary() == report.summary() and back_report.t0 == report.t0
    assert where == {3: "line 4"}
    import mmap

    base = back[0].prompt_ids
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, mmap.mmap), "a view of the mapped file, not a copy"
    assert not back[0].prompt_ids.flags.writeable
    assert (tmp_path / "s" / "tokens.npy").stat().st_size <= 4 * sum(
        len(g.prompt_ids) + sum(map(len, g.responses)) for g in groups) + 256  # int32 + the .npy header


@pytest.mark.parametrize("packing", [False, True])
def test_batches_from_the_store_equal_batches_from_memory(tmp_path, tokenized, packing):
    groups, report = tokenized
    back, _, _ = read_store(write_store(tmp_path / "s", groups, report))
    kw = dict(seq_length=48, pad_id=0, groups_per_micro_batch=2, global_batch_groups=4, seed=3, packing=packing)
    a, b = GroupBatcher(groups, **kw), GroupBatcher(back, **kw)
    for _ in range(3):
        for x, y in zip(a.next_step(), b.next_step()):
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k], k
    assert a.state_dict() == b.state_dict()  # the data fingerprint (resume check) is the same


def test_store_key_changes_with_what_the_tokens_depend_on():
    base = {"data": "abc", "tokenizer": "t", "max_length": 48, "overlength": "drop"}
    assert store_key(base) == store_key(dict(base))
    for k, v in (("data", "abd"), ("tokenizer", "u"), ("max_length", 64), ("overlength", "truncate")):
        assert store_key({**base, k: v}) != store_key(base), k


def test_a_partial_store_is_refused(tmp_path, tokenized):
    path = write_store(tmp_path / "s", *tokenized)
    (path / "meta.json").unlink()
    with pytest.raises(ValueError, match="not a token store"):
        read_store(path)
