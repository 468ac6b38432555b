"""Reductions of one step's results: over data-parallel ranks, then from the last pipeline stage to all.

Loss functions run on the last pipeline stage only, on each data-parallel rank's share of the batch.
What the trainer logs must be the same number on every rank, so every reduction is the same two moves:
sum (or gather) over the DP group, then broadcast from the last PP stage. Tensors handed to collectives
live on the compute device (NCCL needs CUDA tensors).

The forward steps hand back their step values (loss, metrics, group and pair counts) as 0-d device tensors;
:func:`read_on_host` reads all of a step's at once, in one device→host copy, the first time a reduction
of that step needs them (reading each where it was made cost one device sync per value per micro-batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from rao_megatron.data.collate import PAD_GROUP
from rao_megatron.models.provider import as_chunks
from rao_megatron.parallel.compat import moe_metric_entry
from rao_megatron.parallel.device import compute_device
from rao_megatron.parallel.state import is_last_stage
from rao_megatron.training.metrics import mean_metrics

T = TypeVar("T")


#: the entries of a forward step's reduced output that :func:`read_on_host` reads (0-d tensors or numbers)
_SCALARS = ("loss", "groups", "sequences")
#: entries holding a tuple of counts
_COUNTS = ("pair_counts",)


def _host_numbers(tensors: list[torch.Tensor]) -> list[float | int]:
    """The values of 0-d tensors, read in one device→host copy (integer tensors give ints).

    One stack per dtype, widened to fp64 (exact for fp32 / bf16 values and for counts below 2**53), then
    one ``tolist``: the same numbers as ``float(t)`` one at a time.
    """
    if not tensors:
        return []
    device = tensors[0].device
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    order = [i for idx in by_dtype.values() for i in idx]
    stacked = torch.cat([torch.stack([tensors[i].detach().reshape(()).to(device) for i in idx]).to(torch.float64)
                         for idx in by_dtype.values()])
    values: list[float | int] = [0] * len(tensors)
    for i, v in zip(order, stacked.tolist()):  # the one device sync
        values[i] = v if tensors[i].is_floating_point() else int(v)
    return values


def read_on_host(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``outputs`` (a step's reduced micro-batch outputs) with their 0-d tensors -- loss, groups, sequences,
    every metric, pair counts -- replaced by Python numbers, in place, read in one device→host copy.

    Idempotent: :func:`step_loss`, :func:`step_metrics` and :func:`summed_counts` each call it, and only the
    first call of a step has anything to read. Other entries (per-sequence tensors) are left as they are.
    """
    slots: list[tuple[Any, Any]] = []
    for o in outputs:
        slots += [(o, k) for k in _SCALARS if isinstance(o.get(k), torch.Tensor)]
        slots += [(o["metrics"], k) for k, v in o.get("metrics", {}).items() if isinstance(v, torch.Tensor)]
        for key in _COUNTS:
            if key in o and any(isinstance(v, torch.Tensor) for v in o[key]):
                o[key] = list(o[key])  # back to a tuple below
                slots += [(o[key], i) for i, v in enumerate(o[key]) if isinstance(v, torch.Tensor)]
    for (where, key), value in zip(slots, _host_numbers([where[key] for where, key in slots])):
        where[key] = value
    for o in outputs:
        for key in _COUNTS:
            if isinstance(o.get(key), list):
                o[key] = tuple(o[key])
    return outputs


def sum_over_data(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over the data-parallel group (fp64; no collective at DP1)."""
    if ps.get_data_parallel_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=compute_device())
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return [float(v) for v in t.tolist()]


def gather_over_data(obj: T) -> list[T]:
    """Every data-parallel rank's ``obj`` (picklable), in DP rank order."""
    if ps.get_data_parallel_world_size() == 1:
        return [obj]
    parts: list[Any] = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(parts, obj, group=ps.get_data_parallel_group())
    return parts


def from_last_stage(obj: T) -> T:
    """The last pipeline stage's ``obj`` on every stage (identity without pipeline parallelism)."""
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


def last_stage_sum(values: Sequence[float] | None, width: int) -> list[float]:
    """The sum over DP ranks of the last stage's ``values`` (``width`` numbers), on every rank.

    Other stages pass ``None`` (their DP groups still take part in the collective, with zeros).
    """
    local = list(values) if is_last_stage() and values is not None else [0.0] * width
    if len(local) != width:
        raise ValueError(f"expected {width} values to reduce, got {len(local)}")
    return from_last_stage(sum_over_data(local))


def global_normalizer(loss: Any, microbatches: Sequence[dict[str, torch.Tensor]]) -> float:
    """The loss normaliser of one optimizer step over all DP ranks (the loss's rule: groups or tokens).

    Call it on the host-side batches: the counts then cost no device sync.
    """
    local = 0.0
    for mb in microbatches:
        keep = mb["group_ids"] != PAD_GROUP
        local += loss.normalizer(mb["lengths"][keep], mb["group_ids"][keep])
    total = sum_over_data([local])[0]
    if total <= 0:
        raise ValueError("the batch holds no groups to train on")
    return total


def count_tokens(microbatches: Sequence[dict[str, torch.Tensor]]) -> tuple[int, int, int]:
    """``(sequence tokens, filled slots, token slots)`` of this step over all DP ranks (host-side batches: no
    device sync). Sequence tokens count each sequence's prompt and response (``tokens_per_s``); filled slots
    the micro-batches' places that hold a token, which a shared prompt fills once for its whole group.

    ``filled / slots`` is ``packing_efficiency``: the share of the micro-batches' ``rows x seq_length`` that
    holds data.
    """
    real = filled = slots = 0
    for mb in microbatches:
        tokens = int(mb["seq_lengths"][mb["group_ids"] != PAD_GROUP].sum())
        real += tokens
        filled += int((mb["segment_ids"] >= 0).sum()) if "segment_ids" in mb else tokens  # padded: one per token
        slots += int(mb["tokens"].numel())
    total_real, total_filled, total_slots = sum_over_data([real, filled, slots])
    return int(total_real), int(total_filled), int(total_slots)


def step_loss(outputs: list[dict[str, Any]]) -> float:
    """The optimizer step's loss (sum of normalised micro-batch contributions over DP), on every rank."""
    read_on_host(outputs)
    return last_stage_sum([sum(float(o["loss"]) for o in outputs)] if outputs else None, 1)[0]


def summed_counts(outputs: list[dict[str, Any]], key: str, width: int) -> list[int]:
    """Sum of the integer tuples ``o[key]`` over micro-batches and DP ranks, on every rank."""
    read_on_host(outputs)
    local = [sum(o[key][i] for o in outputs) for i in range(width)] if outputs else None
    return [int(round(v)) for v in last_stage_sum(local, width)]


def step_metrics(outputs: list[dict[str, Any]]) -> dict[str, float]:
    """Loss-function metrics averaged over micro-batches and DP ranks (group-weighted), on every rank.

    A metric's average skips the micro-batches where it is NaN (nothing to measure there); a metric NaN in
    every micro-batch is left out of the record."""
    read_on_host(outputs)
    local = None
    if is_last_stage() and outputs:
        local = (mean_metrics([o["metrics"] for o in outputs], [o["groups"] for o in outputs]),
                 sum(o["groups"] for o in outputs))
    parts = [p for p in gather_over_data(local) if p is not None]
    merged = mean_metrics([p[0] for p in parts], [p[1] for p in parts]) if parts else {}
    metrics = dict(from_last_stage(merged))
    metrics.pop("loss", None)  # the step loss is the normalised global sum, reported separately
    return metrics


def moe_aux_metrics(chunks: Sequence[torch.nn.Module], num_microbatches: int) -> dict[str, float]:
    """The router load-balancing loss of the step just run (MoE models), on every rank; resets Megatron's tracker.

    Every MoE router adds ``coeff × L_l`` per micro-batch to what its gradients see (Megatron's
    ``MoEAuxLossAutoScaler``, scaled by 1/M per micro-batch and averaged over DP like the main loss), with
    ``L_l = E · Σ_i f_i · P_i`` (f: share of routed tokens, P: mean router probability per expert; 1.0
    when perfectly balanced). Reported: ``moe/load_balancing_loss``, the mean of ``L_l`` over MoE layers,
    micro-batches and DP ranks, and ``moe/aux_loss``, the term added to the preference loss:
    ``coeff × Σ_layers`` of the per-micro-batch mean. Empty for dense models or with coefficient 0.
    """
    config = as_chunks(list(chunks))[0].config
    coeff = getattr(config, "moe_aux_loss_coeff", 0.0) or 0.0
    if not getattr(config, "num_moe_experts", None) or coeff <= 0:
        return {}
    values, reduce_group = moe_metric_entry("load_balancing_loss")
    local = values.detach().clone() if values is not None else torch.zeros(config.num_layers, device=compute_device())
    if values is not None:
        values.zero_()  # the next step starts from 0 (Megatron's own trainer clears it the same way)
    if ps.get_pipeline_model_parallel_world_size() > 1:  # each stage holds its own layers' entries
        dist.all_reduce(local, group=ps.get_pipeline_model_parallel_group())
    if reduce_group is not None and dist.get_world_size(reduce_group) > 1:
        dist.all_reduce(local, group=reduce_group)  # sequence parallelism: partial sums over the TP group
    dp = ps.get_data_parallel_world_size()
    if dp > 1:  # gloo has no AVG: sum, then divide
        dist.all_reduce(local, group=ps.get_data_parallel_group())
        local /= dp
    per_layer_sum = float(local.sum()) / num_microbatches  # Σ_layers L_l, mean over micro-batches
    return {"moe/load_balancing_loss": per_layer_sum / config.num_layers, "moe/aux_loss": coeff * per_layer_sum}
