"""The shared-prompt layout (#31): a group's prompt once, then its responses, changes no loss, gradient or log-prob.

For every policy loss (RAO in each ``log_z`` mode), one optimizer step's loss and gradients with each group
laid out as ``prompt ⊕ y_1 ⊕ … ⊕ y_K`` (each response attending to the prompt and itself, its positions
continuing from the prompt) equal those of the packed layout with one prompt per response, at TP1, TP2 and
PP2, with an all-padding micro-batch among the real ones; so do the forward-only ``LogprobStep`` sums (the
reference cache) and the reward model's per-sequence scores. The shared layout holds fewer tokens, which is
the point of it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rao_megatron.parallel.launch import run_distributed

from .engine_cases import SEQ, microbatches, synthetic_groups, tiny_model
from .test_loss_positions import CASES, LAYOUTS, _close, _with_reference_flags

pytestmark = pytest.mark.distributed


def _layout(groups: list[dict[str, Any]], shared: bool) -> list[dict[str, torch.Tensor]]:
    """Packed micro-batches (shared prompts or not) with an all-padding one second, as a DP rank under EP."""
    from rao_megatron.data.packing import empty_packed

    mbs = [_with_reference_flags(mb) for mb in microbatches(groups, 2, packed=True, rows=None if not shared else 2,
                                                             shared=shared)]
    rows, length = mbs[0]["tokens"].shape
    empty = empty_packed(rows, length, 0, rewards=[], ref_logps=[], ref_prompt_logps=[], seq_keys=[])
    return mbs[:1] + [_with_reference_flags(empty)] + mbs[1:]


def run_layouts(tp: int, pp: int, hf_cfg: Any, hf_sd: dict[str, torch.Tensor], groups: list[dict[str, Any]],
                out_prefix: str, break_rope: bool) -> None:
    """Worker: each case's step loss and gradients, the LogprobStep sums and the reward model's scores, with
    and without shared prompts. ``break_rope``: the shared layout keeps the row's positions for RoPE (what
    ``GPTModel`` does by itself), to see the comparison fail."""
    import contextlib

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rao_megatron.losses import get_loss
    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
    from rao_megatron.models.provider import as_chunks
    from rao_megatron.parallel.state import initialize_model_parallel
    from rao_megatron.training import forward_step as fs
    from rao_megatron.training.engine import build_model_chunks, forward_backward
    from rao_megatron.training.reductions import global_normalizer, step_loss

    if break_rope:
        fs.rope_at_positions = lambda model, positions: contextlib.nullcontext()  # this worker process only
    initialize_model_parallel(tp=tp, pp=pp)
    chunks = build_model_chunks(hf_cfg, task="policy")
    load_hf_state_dict_into_megatron(chunks, hf_sd, hf_cfg)
    rm = build_model_chunks(hf_cfg, task="rm")
    load_hf_state_dict_into_megatron(rm, hf_sd, hf_cfg)
    results: dict[Any, Any] = {}
    for shared in (False, True):
        mbs = _layout(groups, shared)
        results[shared, "tokens"] = sum(int((mb["segment_ids"] >= 0).sum()) for mb in mbs)
        results[shared, "shared_prompts"] = sum(mb["shared_prompts"] for mb in mbs)
        for case, (loss, hparams) in CASES.items():
            bound = get_loss(loss).bind(hparams)
            step = fs.PolicyStep(loss=bound, normalizer=global_normalizer(bound, mbs), vocab_size=hf_cfg.vocab_size)
            for c in chunks:
                c.zero_grad_buffer()
            value = step_loss(forward_backward(chunks, step, mbs))
            grads = {f"{i}.{name}": p.main_grad.detach().clone()
                     for i, c in enumerate(as_chunks(chunks)) for name, p in c.named_parameters()}
            results[shared, case] = {"loss": value, "grads": grads}
        outs = forward_backward(chunks, fs.LogprobStep(vocab_size=hf_cfg.vocab_size), mbs, forward_only=True)
        results[shared, "logprob_step"] = {k: torch.cat([o[k] for o in outs]) if outs else None
                                           for k in ("prompt_logps", "response_logps")}
        outs = forward_backward(rm, fs.ScoreStep(), mbs, forward_only=True)
        results[shared, "scores"] = torch.cat([o["scores"] for o in outs]) if outs else None
    results["last_stage"] = ps.is_pipeline_last_stage()
    torch.save(results, f"{out_prefix}.rank{dist.get_rank()}.pt")


@pytest.fixture(scope="module")
def model():
    return tiny_model(tied=True)


def _run(tmp_path, model, layout: str, break_rope: bool = False) -> list[dict[Any, Any]]:
    tp, pp = LAYOUTS[layout]
    cfg, sd = model
    groups = synthetic_groups(4, 3, seed=11, max_response=6)
    prefix = str(tmp_path / f"{layout}{'_broken' if break_rope else ''}")
    run_distributed(run_layouts, tp * pp, tp, pp, cfg, sd, groups, prefix, break_rope)
    return [torch.load(f"{prefix}.rank{r}.pt", weights_only=False) for r in range(tp * pp)]


def _compare(res: dict[Any, Any], what: str) -> None:
    for case in CASES:
        old, new = res[False, case], res[True, case]
        assert new["loss"] == pytest.approx(old["loss"], rel=1e-5, abs=1e-6), f"{what} {case}"
        scale = max(g.abs().max().item() for g in old["grads"].values())
        assert scale > 0, f"{what} {case}"
        for key in old["grads"]:
            # fp32: the attention runs over other rows and lengths and the kernel over other chunks, so the sums
            # run in another order; a token that sees the wrong context is off by O(1) of the gradient's scale
            torch.testing.assert_close(new["grads"][key], old["grads"][key], rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m, c=case, k=key: f"{what} {c}: gradient of {k}: {m}")
    if res["last_stage"]:
        for key in ("prompt_logps", "response_logps"):
            old, new = res[False, "logprob_step"][key], res[True, "logprob_step"][key]
            _close(new, old, f"{what} LogprobStep {key}", old.abs().max().item() * 10)
        old, new = res[False, "scores"], res[True, "scores"]
        _close(new, old, f"{what} reward-model scores", old.abs().max().item() * 10)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_shared_prompt_equals_one_prompt_per_response(tmp_path, model, layout):
    ranks = _run(tmp_path, model, layout)
    for rank, res in enumerate(ranks):
        assert res[True, "shared_prompts"] == 4  # every group shares its prompt
        # 4 groups of K = 3: each prompt (3 to 6 tokens) is held once instead of three times
        assert res[True, "tokens"] < res[False, "tokens"] - 2 * 4 * 3
        _compare(res, f"{layout} rank {rank}")


def test_row_positions_for_rope_break_the_shared_layout(tmp_path, model):
    """The comparison fails without the per-token RoPE positions (responses after the first sit further
    from their prompt in the row than in their own sequence)."""
    res = _run(tmp_path, model, "tp1", break_rope=True)[0]
    with pytest.raises(AssertionError):
        _compare(res, "tp1 with row positions")


def test_a_shared_prompt_row_is_what_collate_says():
    """The layout itself, by hand: one group of two responses after a 3-token prompt."""
    from rao_megatron.data.packing import collate_packed, packed_attention_mask

    x, y1, y2 = [1, 5, 6], [7, 8], [9]
    mb = collate_packed([x, x], [y1, y2], placement=[[(0, 1)]], seq_length=SEQ, pad_id=0, group_ids=[3, 3])
    assert mb["tokens"][0, :6].tolist() == [1, 5, 6, 7, 8, 9]
    assert mb["position_ids"][0, :6].tolist() == [0, 1, 2, 3, 4, 3]
    assert mb["segment_ids"][0, :7].tolist() == [2, 2, 2, 0, 0, 1, -1]
    # P(x) = log π(5|1) + log π(6|1,5), once; R(y1) = log π(7|x) + log π(8|x,7); R(y2) = log π(9|x)
    assert mb["prompt_positions"].tolist() == [0, 1] and mb["prompt_targets"].tolist() == [5, 6]
    assert mb["prompt_sequences"].tolist() == [0, 0] and mb["prompt_source"].tolist() == [0, 0]
    assert mb["response_positions"].tolist() == [2, 3, 2]
    assert mb["response_targets"].tolist() == [7, 8, 9]
    assert mb["response_sequences"].tolist() == [0, 0, 1]
    assert mb["lengths"].tolist() == [2, 1] and mb["seq_lengths"].tolist() == [5, 4]
    assert mb["last_index"].tolist() == [4, 5]
    allowed = ~packed_attention_mask(mb["segment_ids"], mb["prefix_ids"])[0, 0, :6, :6]
    assert allowed.int().tolist() == [[1, 0, 0, 0, 0, 0],
                                      [1, 1, 0, 0, 0, 0],
                                      [1, 1, 1, 0, 0, 0],
                                      [1, 1, 1, 1, 0, 0],
                                      [1, 1, 1, 1, 1, 0],
                                      [1, 1, 1, 0, 0, 1]]
