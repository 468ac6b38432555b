"""MoE load balancing counts real tokens only: the forward step hands the model the batch's padding mask.

Megatron's ``GPTModel.forward(..., padding_mask=...)`` (True at padding) reaches every MoE router, which then
leaves padding tokens out of its load-balancing loss. The plumbing is checked with a stand-in model that
records what it is given; the effect on a tiny Qwen3-MoE on the CPU: padded and packed micro-batches give the
load-balancing loss of the same sequences without any padding.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel

from rao_megatron.data.collate import collate_sequences
from rao_megatron.data.packing import collate_packed, empty_packed
from rao_megatron.parallel import compat
from rao_megatron.training import forward_step as fs
from tests.unit.test_models import single_rank

PROMPTS = [[5, 6, 7], [8, 9, 10]]
RESPONSES = [[11, 12, 13, 14], [15, 16, 17, 18]]  # equal lengths: the unpadded batch is [2, 7]
LENGTH = 7


class RecordingModel(torch.nn.Module):
    """Stands in for a ``GPTModel``: records the keyword arguments of each forward."""

    def __init__(self, *, moe: bool = True, pre_process: bool = True, sequence_parallel: bool = False,
                 thd: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_moe_experts=4 if moe else None, sequence_parallel=sequence_parallel)
        self.pre_process, self.post_process, self.built_with_te = pre_process, True, thd
        self.calls: list[dict[str, Any]] = []

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return torch.zeros(*tokens.shape, 3)


def _padded(seq_length: int = LENGTH + 3, rows: int = 3) -> dict[str, torch.Tensor]:
    return collate_sequences(PROMPTS, RESPONSES, seq_length=seq_length, pad_id=0, group_ids=[0, 0], num_rows=rows)


def _packed(seq_length: int = 2 * LENGTH + 2) -> dict[str, Any]:
    """Both sequences in row 0 (a padding tail of 2), row 1 all padding."""
    return collate_packed(PROMPTS, RESPONSES, placement=[[0, 1], []], seq_length=seq_length, pad_id=0,
                          group_ids=[0, 0])


def test_the_installed_megatron_core_takes_the_padding_mask() -> None:
    """0.16.1 (the floor) and 0.19.x both have ``GPTModel.forward(..., *, padding_mask)``, True at padding."""
    param = inspect.signature(GPTModel.forward).parameters.get("padding_mask")
    assert compat.gpt_forward_takes_padding_mask() is (param is not None)
    assert param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY, compat.mcore_version()


def test_padded_rows_send_their_tails_and_padding_rows_as_padding() -> None:
    model = RecordingModel()
    fs._forward(model, _padded())
    mask = model.calls[-1]["padding_mask"]
    expected = torch.ones(3, LENGTH + 3, dtype=torch.bool)
    expected[:2, :LENGTH] = False  # the two sequences; row 2 is a padding row (group PAD_GROUP)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


def test_packed_rows_local_spec_and_thd() -> None:
    batch = _packed()
    expected = batch["segment_ids"] < 0
    assert expected[0, : 2 * LENGTH].logical_not().all() and expected[0, 2 * LENGTH:].all() and expected[1].all()
    local = RecordingModel()
    fs._forward(local, batch)
    assert torch.equal(local.calls[-1]["padding_mask"], expected)
    thd = RecordingModel(thd=True)  # the rows run as one THD sequence [1, rows * seq_length]
    fs._forward(thd, batch)
    assert torch.equal(thd.calls[-1]["padding_mask"], expected.reshape(1, -1))
    assert thd.calls[-1]["packed_seq_params"].qkv_format == "thd"


def test_no_mask_for_dense_models_or_a_megatron_core_without_it(monkeypatch) -> None:
    dense = RecordingModel(moe=False)
    fs._forward(dense, _padded())
    assert "padding_mask" not in dense.calls[-1]
    monkeypatch.setattr(fs, "gpt_forward_takes_padding_mask", lambda: False)
    moe = RecordingModel()
    fs._forward(moe, _padded())
    fs._forward(moe, _packed())
    assert all("padding_mask" not in call for call in moe.calls)  # such a release counts padding tokens


def test_an_all_padding_micro_batch_counts_every_token() -> None:
    """With every token excluded the router's load-balancing loss would be 0/0 (NaN gradients)."""
    model = RecordingModel()
    fs._forward(model, empty_packed(2, 8, 0))
    fs._forward(model, collate_sequences([], [], seq_length=8, pad_id=0, group_ids=[], num_rows=2))
    assert all(not call["padding_mask"].any() for call in model.calls) and len(model.calls) == 2


def test_later_pipeline_stage_with_sequence_parallelism_gets_its_part(monkeypatch) -> None:
    """Megatron splits the mask over the sequence-parallel ranks on the first stage only."""
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda *a, **k: 1)
    batch = _padded(seq_length=LENGTH + 3)
    full = fs.padding_mask(batch)
    first, later = RecordingModel(sequence_parallel=True), RecordingModel(pre_process=False, sequence_parallel=True)
    fs._forward(first, batch)
    fs._forward(later, batch)
    assert torch.equal(first.calls[-1]["padding_mask"], full)  # Megatron scatters it there
    assert torch.equal(later.calls[-1]["padding_mask"], full[:, (LENGTH + 3) // 2:])


# ---------------------------------------------------------------- a tiny Qwen3-MoE on the CPU


def _load_balancing_loss(model: torch.nn.Module, batch: dict[str, Any]) -> list[float]:
    """The routers' load-balancing loss per layer for one training forward (Megatron's MoE tracker)."""
    values, _ = compat.moe_metric_entry("load_balancing_loss")
    if values is not None:
        values.zero_()
    fs._forward(model, batch)
    values, _ = compat.moe_metric_entry("load_balancing_loss")
    return values.detach().clone().tolist()


@single_rank
def _padding_leaves_the_load_balancing_loss_unchanged() -> None:
    from rao_megatron.models import build_gpt_model, tiny_hf_config

    torch.manual_seed(0)
    model = build_gpt_model(tiny_hf_config("qwen3_moe")).train()
    assert model.config.num_moe_experts and model.config.moe_aux_loss_coeff > 0
    unpadded = _load_balancing_loss(model, _padded(seq_length=LENGTH, rows=2))
    assert len(unpadded) == model.config.num_layers and all(v > 0 for v in unpadded)
    padded = _load_balancing_loss(model, _padded())
    packed = _load_balancing_loss(model, _packed())
    assert padded == pytest.approx(unpadded, rel=1e-5), (padded, unpadded)
    assert packed == pytest.approx(unpadded, rel=1e-5), (packed, unpadded)
    fs.gpt_forward_takes_padding_mask = lambda: False  # as a release without the argument (this worker only)
    counted = _load_balancing_loss(model, _padded())
    assert counted != pytest.approx(unpadded, rel=1e-3), "padding tokens no longer count: the check sees nothing"


@pytest.mark.skipif(not compat.gpt_forward_takes_padding_mask(),
                    reason=f"megatron-core {compat.mcore_version()} has no GPTModel.forward(padding_mask=...)")
def test_padded_and_packed_batches_balance_experts_over_their_real_tokens_only() -> None:
    _padding_leaves_the_load_balancing_loss_unchanged()
