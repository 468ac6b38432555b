"""Device→host syncs of a training step, counted on the CPU.

On CUDA a host read of a device value waits for the device: ``item`` / ``float`` / ``int`` / ``bool`` of a
tensor, ``tolist``, and every op whose output size depends on the data (``nonzero``, ``unique``, boolean-mask
indexing). On the CPU nothing waits, but the same calls show up: :class:`HostSyncs` counts them. The losses
return their metrics as 0-d tensors, a loss step adds one sync of its own per micro-batch (which sequences
are real), and a step's reductions read the whole step on the host at once.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from megatron.core import parallel_state as ps
from torch.utils._python_dispatch import TorchDispatchMode

from rao_megatron.data.collate import collate_sequences
from rao_megatron.data.packing import collate_packed
from rao_megatron.losses import LOSSES, SequenceStats, get_loss
from rao_megatron.training import forward_step as fs
from rao_megatron.training import reductions

#: ops whose output size the host must read first
_SHAPE_OPS = ("nonzero", "_unique2", "_unique", "unique_dim", "unique_consecutive", "masked_select")


class HostSyncs(TorchDispatchMode):
    """Counts ``reads`` (a scalar or a list read on the host) and ``shapes`` (data-dependent output sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.shapes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":  # item, float, int, bool
            self.reads += 1
        elif name in _SHAPE_OPS or (name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)):
            self.shapes += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncs:
        super().__enter__()
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t: torch.Tensor) -> Any:
            counter.reads += 1
            return counter._tolist(t)

        torch.Tensor.tolist = tolist  # not dispatched: counted here
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)


def _stats(name: str) -> SequenceStats:
    """Two groups of three with distinct rewards (every loss accepts them), policy log-probs with grad."""
    g = torch.Generator().manual_seed(0)
    n = 6
    return SequenceStats(
        policy_logps=None if name == "bt" else (-torch.rand(n, generator=g) - 0.5).requires_grad_(),
        ref_logps=-torch.rand(n, generator=g) - 0.5, policy_prompt_logps=-torch.rand(n, generator=g),
        ref_prompt_logps=-torch.rand(n, generator=g), lengths=torch.tensor([2, 3, 4, 2, 5, 1]),
        rewards=torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0, 1.0]), group_ids=torch.tensor([4, 4, 4, 9, 9, 9]),
        is_reference_answer=torch.tensor([False, False, True, True, False, False]),
        scores=torch.randn(n, generator=g).requires_grad_() if name == "bt" else None)


#: scalar reads a loss makes to check its input (a clear error for a group it cannot use), not for metrics
_CHECK_READS = {"grao": 2, "rao": 0, "sft": 0}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_return_their_metrics_as_detached_0d_tensors(name: str) -> None:
    with HostSyncs() as syncs:
        loss, metrics = get_loss(name)(_stats(name))
    assert metrics and loss.requires_grad
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor), f"{name}: metric {key} is a {type(value).__name__}"
        assert value.dim() == 0 and not value.requires_grad, f"{name}: metric {key}"
    # pairwise losses read two flags on the host to refuse groups without a preference pair
    assert syncs.reads <= _CHECK_READS.get(name, 2), f"{name}: {syncs.reads} host reads"


def test_rao_metric_with_nothing_to_measure_is_nan_and_skipped_by_the_step_average(monkeypatch) -> None:
    tied = SequenceStats(policy_logps=torch.tensor([-3.0, -4.0]), ref_logps=torch.tensor([-2.0, -2.0]),
                         policy_prompt_logps=torch.zeros(2), ref_prompt_logps=torch.zeros(2),
                         lengths=torch.tensor([1, 1]), rewards=torch.tensor([0.0, 0.0]), group_ids=torch.tensor([0, 0]))
    _, m_tied = get_loss("rao")(tied)
    _, m_full = get_loss("rao")(_stats("rao"))
    assert math.isnan(m_tied["displacement"]) and math.isnan(m_tied["ranking_accuracy"])
    _single_rank_layout(monkeypatch)
    outs = [{"loss": torch.tensor(0.0), "metrics": m_tied, "groups": torch.tensor(1)},
            {"loss": torch.tensor(0.0), "metrics": m_full, "groups": torch.tensor(2)}]
    step = reductions.step_metrics(outs)
    assert step["displacement"] == float(m_full["displacement"])  # the tied micro-batch does not count
    assert step["tied_share"] == pytest.approx((1 * 1.0 + 2 * float(m_full["tied_share"])) / 3)
    only_tied = reductions.step_metrics([{"loss": torch.tensor(0.0), "metrics": dict(m_tied), "groups": 1}])
    assert "displacement" not in only_tied and "rewards/best" not in only_tied  # as before: no such key


# ---------------------------------------------------------------- a whole step: loss steps, then reductions


def _single_rank_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ps, "get_data_parallel_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(ps, "is_pipeline_last_stage", lambda *a, **k: True)


def _groups(seed: int) -> tuple[list[list[int]], list[list[int]], list[int], list[float]]:
    g = torch.Generator().manual_seed(seed)
    prompts, responses, gids, rewards = [], [], [], []
    for group in range(2):
        prompt = torch.randint(3, 50, (3,), generator=g).tolist()
        for k in range(3):
            prompts.append(prompt)
            responses.append(torch.randint(3, 50, (2 + k,), generator=g).tolist())
            gids.append(seed * 10 + group)
            rewards.append(float((k + group + seed) % 3))
    return prompts, responses, gids, rewards


def _microbatch(seed: int, packed: bool) -> dict[str, Any]:
    prompts, responses, gids, rewards = _groups(seed)
    n = len(prompts)
    columns = dict(rewards=rewards, ref_logps=[-1.0 - 0.1 * i for i in range(n)],
                   ref_prompt_logps=[-0.5] * n)
    if packed:  # two rows of three sequences, with padding tails
        return collate_packed(prompts, responses, placement=[[0, 1, 2], [3, 4, 5]], seq_length=24, pad_id=0,
                              group_ids=gids, **columns)
    return collate_sequences(prompts, responses, seq_length=12, pad_id=0, group_ids=gids, num_rows=n + 2,
                             **columns)  # two padding rows


def _run_step(loss: Any, microbatches: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    step = fs.PolicyStep(loss=loss, normalizer=4.0 * len(microbatches), vocab_size=64)
    outputs, losses = [], []
    for mb in microbatches:
        hidden = -torch.rand(*mb["tokens"].shape, 1, generator=torch.Generator().manual_seed(len(outputs)))
        out, reduced = step.loss_func(mb, torch.nn.Identity(), hidden.requires_grad_())
        outputs.append(reduced)
        losses.append(out)
    return outputs, losses


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_step_reads_the_host_once_whatever_the_micro_batch_count(monkeypatch, packed: bool) -> None:
    _single_rank_layout(monkeypatch)
    # the hidden states [B, S, 1] stand in for the per-token log-probs: the gather of the loss positions (the
    # collate functions list them: no sync), their per-sequence sums and the loss run as in training
    monkeypatch.setattr(fs, "head_logprobs", lambda model, hidden, labels, **kw: hidden[:, 0])
    loss = get_loss("rao").bind({"beta": 0.5})
    per_step = {}
    for m in (1, 4):
        microbatches = [_microbatch(seed, packed) for seed in range(m)]
        with HostSyncs() as in_steps:
            outputs, losses = _run_step(loss, microbatches)
        for out in outputs:
            assert all(isinstance(v, torch.Tensor) for v in out["metrics"].values())
            assert isinstance(out["loss"], torch.Tensor) and isinstance(out["groups"], torch.Tensor)
        # what the loss itself costs (its groups: ``unique``), on the micro-batches' real sequences
        stats = []
        for mb, out in zip(microbatches, outputs):
            real = mb["group_ids"] >= 0
            stats.append(SequenceStats(policy_logps=out["policy_logps"], ref_logps=mb["ref_logps"][real],
                                       policy_prompt_logps=torch.zeros(int(real.sum())),
                                       ref_prompt_logps=mb["ref_prompt_logps"][real], lengths=mb["lengths"][real],
                                       rewards=mb["rewards"][real], group_ids=mb["group_ids"][real]))
        with HostSyncs() as in_losses:
            for s in stats:
                loss(s)
        assert in_steps.reads == 0, f"{m} micro-batches: {in_steps.reads} host reads in the loss steps"
        # one sync of the step's own per micro-batch: which sequences are real
        assert in_steps.shapes == in_losses.shapes + m, (in_steps.shapes, in_losses.shapes)

        expected_loss = sum(float(t.detach()) for t in losses)
        expected_metrics = _weighted_means(outputs)
        with HostSyncs() as in_reductions:
            step_loss = reductions.step_loss(outputs)
            metrics = reductions.step_metrics(outputs)
        per_step[m] = in_reductions.reads + in_reductions.shapes
        assert step_loss == pytest.approx(expected_loss, rel=1e-12)
        assert metrics.keys() == expected_metrics.keys()
        for key, value in expected_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert per_step == {1: 1, 4: 1}, per_step


def _weighted_means(outputs: list[dict[str, Any]]) -> dict[str, float]:
    """The group-weighted mean of each metric over the micro-batches where it is a number (read one by one)."""
    totals: dict[str, list[float]] = {}
    for out in outputs:
        w = float(out["groups"])
        for key, value in out["metrics"].items():
            v = float(value)
            if key != "loss" and not math.isnan(v):
                totals.setdefault(key, [0.0, 0.0])
                totals[key][0] += w * v
                totals[key][1] += w
    return {k: t / n for k, (t, n) in totals.items()}


def test_reward_model_step_counts_are_read_with_the_rest(monkeypatch) -> None:
    """Held-out pair accuracy: pair counts come back with the loss and metrics, in the same single read."""
    _single_rank_layout(monkeypatch)
    step = fs.RewardModelStep(loss=get_loss("bt").bind({}), normalizer=8.0)
    outputs = []
    for seed in range(4):
        mb = _microbatch(seed, packed=True)
        values = torch.randn(*mb["tokens"].shape, 1, generator=torch.Generator().manual_seed(seed))
        outputs.append(step.loss_func(mb, values)[1])
    assert isinstance(outputs[0]["pair_counts"][0], torch.Tensor)
    expected = [sum(int(o["pair_counts"][i]) for o in outputs) for i in range(2)]
    with HostSyncs() as syncs:
        reductions.step_loss(outputs)
        reductions.step_metrics(outputs)
        counts = reductions.summed_counts(outputs, "pair_counts", 2)
    assert counts == expected and syncs.reads == 1
    assert all(isinstance(o["pair_counts"], tuple) and isinstance(o["groups"], int) for o in outputs)


def test_packed_sequence_sums_match_a_loop_over_segments() -> None:
    mb = _microbatch(3, packed=True)
    logps = torch.randn(mb["tokens"].shape, generator=torch.Generator().manual_seed(1))
    with HostSyncs() as syncs:
        prompt, response = fs.sequence_sums(logps, mb)
    assert syncs.reads == 0 and syncs.shapes == 0
    for n in range(mb["lengths"].shape[0]):
        seg = mb["segment_ids"] == n
        assert prompt[n] == pytest.approx(float((logps * (mb["prompt_mask"] & seg)).sum()), abs=1e-6)
        assert response[n] == pytest.approx(float((logps * (mb["response_mask"] & seg)).sum()), abs=1e-6)
