"""Packed micro-batches give the same per-sequence log-probs, losses and gradients as padded ones.

Several sequences share each row, positions restart per sequence and attention never crosses one (the
local spec's block-diagonal mask on CPU), at TP1, TP2, PP2 and DP2, against the padded layout at TP1.
"""

from __future__ import annotations

import pytest
import torch

from rao_megatron.data import sequence_key
from rao_megatron.parallel.launch import run_distributed

from .engine_cases import SEQ, T0, VOCAB, run_logps, synthetic_groups
from .test_engine_parallel import _assert_same, _hf_sums, _run

pytestmark = pytest.mark.distributed

LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2)}


@pytest.fixture(scope="module")
def model():
    from .engine_cases import tiny_model

    return tiny_model(tied=True)


@pytest.mark.parametrize("loss", ["rao", "dpo", "sft", "bt"])
def test_packed_loss_and_grads_equal_padded(tmp_path, model, loss):
    groups = synthetic_groups(4, 3, seed=5, max_response=6)
    padded = _run(tmp_path, "tp1", 1, 1, 1, loss, groups, model)
    for name, (tp, pp, dp) in LAYOUTS.items():
        packed = _run(tmp_path, name, tp, pp, dp, loss, groups, model, packed=True)
        _assert_same(packed, padded, f"{loss}: packed {name} vs padded tp1")


def _edge_groups() -> list[dict]:
    """A sequence exactly filling a row, one-token responses, and a group whose sequences need two rows."""
    full = [T0, 5, 6, 7]
    return [
        {"id": 0, "prompt": full, "responses": [list(range(10, 10 + SEQ - len(full))), [42]],
         "rewards": [1.0, 0.0], "ref_logps": [-30.0, -4.0], "ref_prompt_logps": -9.0},
        {"id": 1, "prompt": [T0, 8], "responses": [[43], [44]],
         "rewards": [0.5, 0.2], "ref_logps": [-3.0, -3.5], "ref_prompt_logps": -2.0},
        {"id": 2, "prompt": [T0, 9, 11], "responses": [list(range(50, 60)), list(range(60, 70))],
         "rewards": [0.1, 0.9], "ref_logps": [-20.0, -21.0], "ref_prompt_logps": -5.0},
        {"id": 3, "prompt": [T0, 12], "responses": [[VOCAB - 1], list(range(80, 88))],
         "rewards": [0.3, 0.4], "ref_logps": [-5.0, -15.0], "ref_prompt_logps": -3.0},
    ]


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("case", ["synthetic", "edges"])
def test_packed_logps_equal_padded_and_hf(tmp_path, model, tp, pp, case):
    groups = synthetic_groups(4, 3, seed=6, max_response=6) if case == "synthetic" else _edge_groups()
    cfg, sd = model
    out = tmp_path / "packed.pt"
    run_distributed(run_logps, tp * pp, tp, pp, cfg, sd, groups, str(out), True)
    got = torch.load(out, weights_only=True)
    order = [sequence_key(g["prompt"], y) for g in groups for y in g["responses"]]
    index = {int(k): i for i, k in enumerate(got["keys"].tolist())}
    assert sorted(index) == sorted(order), "every sequence appears once"
    take = torch.tensor([index[k] for k in order])
    hf_prompt, hf_response = _hf_sums(model, groups)
    torch.testing.assert_close(got["prompt"][take], hf_prompt, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got["response"][take], hf_response, rtol=1e-5, atol=1e-4)


def test_edge_groups_really_pack():
    """The edge case holds what it claims: a row filled exactly, one-token responses, a group over two rows."""
    from .engine_cases import microbatches

    (mb,) = microbatches(_edge_groups(), 4, packed=True, rows=5)
    seg = mb["segment_ids"]
    assert (seg[:, -1] >= 0).any(), "some row ends exactly with a sequence's last token"
    assert int((mb["lengths"] == 1).sum()) >= 3
    rows_of = {}
    for n, gid in enumerate(mb["group_ids"].tolist()):
        rows_of.setdefault(gid, set()).update((seg == n).nonzero()[:, 0].tolist())
    assert any(len(r) > 1 for r in rows_of.values()), "a group spans more than one row"
    assert (seg >= 0).sum(dim=1).gt(0).all() and int((seg >= 0).sum()) == int(mb["seq_lengths"].sum())
