"""Packed micro-batches under expert parallelism: with ``equal_micro_batches`` every DP rank gets the same
number of micro-batches per train step and eval pass (all-padding ones fill the short ranks), the real
micro-batches are those it gets without the setting, and the trainer and ``precompute_reference`` turn
it on exactly when ``parallel.ep > 1``."""

from __future__ import annotations

import pytest
import torch

from rao_megatron.data import PAD_GROUP, GroupBatcher, TokenizedGroup

SEQ, ROWS = 16, 2


def _groups(n: int = 24) -> list[TokenizedGroup]:
    """Long groups (two 14-token sequences: a whole micro-batch each) mixed with short ones (two 5-token
    sequences: two share a row), so that the ranks' shares of a step pack into different counts."""
    out = []
    for g in range(n):
        size = 12 if g % 3 == 0 else 3
        out.append(TokenizedGroup(group_id=g, prompt_ids=[1, 5 + g], responses=[[7] * size, [8] * size],
                                  rewards=[1.0, 0.0], is_reference=None, row=g))
    return out


class _Cache:
    """A reference lookup that knows every key (the padding micro-batch must carry its empty columns)."""

    path = "cache"

    def lookup(self, keys: list[int]) -> tuple[list[float], list[float]]:
        return [-float(k % 7) for k in keys], [-float(k % 5) for k in keys]


def _ranks(groups: list[TokenizedGroup], dp: int, equal: bool, **over) -> list[GroupBatcher]:
    kw = dict(seq_length=SEQ, pad_id=0, groups_per_micro_batch=2, global_batch_groups=4 * dp, seed=3,
              packing=True, packed_rows=ROWS, reference=_Cache(), equal_micro_batches=equal)
    return [GroupBatcher(groups, dp_rank=r, dp_size=dp, **{**kw, **over}) for r in range(dp)]


def _is_padding(mb: dict[str, torch.Tensor]) -> bool:
    return bool((mb["group_ids"] == PAD_GROUP).all()) and bool((mb["segment_ids"] < 0).all())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


@pytest.mark.parametrize("dp", [2, 4])
def test_every_rank_gets_the_same_number_of_train_micro_batches(dp: int) -> None:
    groups = _groups()
    plain, equal = _ranks(groups, dp, False), _ranks(groups, dp, True)
    uneven = 0
    for _ in range(2 * plain[0].steps_per_epoch):  # two epochs: two shuffles
        before = [b.next_step() for b in plain]
        after = [b.next_step() for b in equal]
        counts = [len(x) for x in before]
        uneven += len(set(counts)) > 1
        assert [len(x) for x in after] == [max(counts)] * dp
        for old, new in zip(before, after):
            assert all(_same(x, y) for x, y in zip(old, new))  # the real micro-batches are unchanged
            for mb in new[len(old):]:
                assert _is_padding(mb) and mb.keys() == new[0].keys() and mb["tokens"].shape == (ROWS, SEQ)
                assert mb["ref_logps"].numel() == mb["seq_keys"].numel() == 0
    assert uneven, "the data must pack into different counts on different ranks, or nothing is tested"
    assert equal[0].state_dict() == plain[0].state_dict()  # the stream position does not see the padding


@pytest.mark.parametrize("dp", [2, 4])
def test_every_rank_gets_the_same_number_of_eval_micro_batches(dp: int) -> None:
    groups = _groups(9 + dp)  # not a multiple of dp: the ranks' shares differ in size as well
    plain, equal = _ranks(groups, dp, False), _ranks(groups, dp, True)
    before = [list(b.iter_eval_microbatches()) for b in plain]
    after = [list(b.iter_eval_microbatches()) for b in equal]
    counts = [len(x) for x in before]
    assert len(set(counts)) > 1, "the held-out shares must pack into different counts"
    assert [len(x) for x in after] == [b.num_eval_microbatches for b in equal] == [max(counts)] * dp
    for old, new in zip(before, after):
        assert all(_same(x, y) for x, y in zip(old, new))
        assert all(_is_padding(mb) for mb in new[len(old):])
    ids = sorted(int(g) for mbs in after for mb in mbs for g in mb["group_ids"].unique().tolist() if g != PAD_GROUP)
    assert ids == [g.group_id for g in groups]  # every held-out group once
    assert [len(list(b.iter_eval_microbatches())) for b in equal] == [max(counts)] * dp  # a second pass too


def test_a_rank_with_an_empty_eval_share_gets_a_padding_batch_with_the_usual_keys() -> None:
    # three held-out groups over four ranks: rank 3 has none, but still runs (and reads seq_keys/ref_logps)
    for equal in (False, True):
        ranks = _ranks(_groups(3), 4, equal, global_batch_groups=4)
        (mb,) = list(ranks[3].iter_eval_microbatches())
        real = next(iter(ranks[0].iter_eval_microbatches()))
        assert _is_padding(mb) and mb.keys() == real.keys() and mb["seq_keys"].numel() == 0


def test_padded_layout_is_unchanged_by_the_setting() -> None:
    groups = _groups()
    plain, equal = (_ranks(groups, 2, e, packing=False, packed_rows=None) for e in (False, True))
    for _ in range(3):
        for a, b in zip(plain, equal):
            assert all(_same(x, y) for x, y in zip(a.next_step(), b.next_step()))


def test_trainer_and_precompute_equalise_exactly_under_expert_parallelism() -> None:
    from rao_megatron.config import load_config
    from rao_megatron.training.run_data import packing_settings

    moe = ["model.preset=tiny-qwen3-moe"]
    assert packing_settings(load_config(None, [*moe, "parallel.ep=2"]))["equal_micro_batches"] is True
    assert packing_settings(load_config(None, [*moe, "parallel.ep=1"]))["equal_micro_batches"] is False
    assert packing_settings(load_config(None, []))["equal_micro_batches"] is False


def _first_fit_decreasing(lengths: list[list[int]], rows: int, seq_length: int) -> list:
    """The plan by its definition: each group (most tokens first) tried on every micro-batch in order."""
    batches: list = []
    free: list[list[int]] = []
    for g in sorted(range(len(lengths)), key=lambda g: (-sum(lengths[g]), g)):
        for b in range(len(batches) + 1):
            if b == len(batches):
                batches.append([[] for _ in range(rows)])
                free.append([seq_length] * rows)
            trial, placed = list(free[b]), []
            for j in sorted(range(len(lengths[g])), key=lambda j: (-lengths[g][j], j)):
                row = next((r for r in range(rows) if trial[r] >= lengths[g][j]), None)
                if row is None:
                    break
                trial[row] -= lengths[g][j]
                placed.append((row, j))
            if len(placed) == len(lengths[g]):
                free[b] = trial
                for row, j in placed:
                    batches[b][row].append((g, j))
                break
    return batches


def test_planning_skips_only_micro_batches_that_cannot_take_the_group() -> None:
    # every rank plans every rank's share now, so planning skips full micro-batches; the plan must not change
    import random

    from rao_megatron.data.packing import GroupTooLargeError, plan_micro_batches

    rng = random.Random(0)
    for _ in range(300):
        rows, seq = rng.randint(1, 5), rng.choice([8, 16, 64])
        lengths = [[rng.randint(1, seq) for _ in range(rng.randint(1, rows))] for _ in range(rng.randint(0, 40))]
        assert plan_micro_batches(lengths, rows=rows, seq_length=seq) == _first_fit_decreasing(lengths, rows, seq)
    many = [[rng.randint(40, 64) for _ in range(2)] for _ in range(300)]  # > 64 micro-batches: the arrays grow
    assert plan_micro_batches(many, rows=2, seq_length=64) == _first_fit_decreasing(many, 2, 64)
    with pytest.raises(GroupTooLargeError, match="group 1: 3 sequences of 36 tokens"):
        plan_micro_batches([[4], [12, 12, 12]], rows=2, seq_length=16)
