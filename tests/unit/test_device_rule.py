"""The device rule: models, batches and collective buffers live on the compute device.

On a CPU-only machine every tensor is on the CPU anyway, so these tests pin the compute device to
``meta``: anything that follows the rule is then visibly on ``meta``, anything built without it stays
on the CPU. Host syncs (``.item()``) are impossible on ``meta``, so the recorders stop a step at the
boundary they check (the model's input, a collective) by raising :class:`_Stop`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rao_megatron.parallel.device import force_compute_device
from tests.unit.test_models import single_rank

ROOT_CONFIG = "examples/configs/rao_tiny.yaml"
META = torch.device("meta")


class _Stop(Exception):
    """Raised by a recorder once it has seen what it checks."""


def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in _tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _tensors(v, f"{prefix}[{i}]")]
    return []


def _off_device(obj: Any, device: torch.device = META) -> list[str]:
    return [f"{name} on {t.device}" for name, t in _tensors(obj) if t.device != device]


@single_rank
def _models_on_the_compute_device() -> None:
    from rao_megatron.models import tiny_hf_config
    from rao_megatron.training.engine import build_model_chunks

    force_compute_device(META)
    try:
        for task in ("policy", "reference", "rm"):
            chunks = build_model_chunks(tiny_hf_config("llama"), task=task, wrap_ddp=False)
            state = [(n, t) for c in chunks for n, t in (*c.named_parameters(), *c.named_buffers())]
            wrong = [f"{n} on {t.device}" for n, t in state if t.device != META]
            assert not wrong, f"{task}: {wrong[:5]}"
            if task == "rm":
                assert chunks[0].output_layer.weight.device == META  # the scalar head too
    finally:
        force_compute_device(None)


def test_models_are_built_on_the_compute_device() -> None:
    _models_on_the_compute_device()


@single_rank
def _step_inputs_on_the_compute_device(tmp: str) -> None:
    """Everything a training step hands to the pipeline schedule is on the compute device."""
    from rao_megatron.config import load_config
    from rao_megatron.training import engine
    from rao_megatron.training.loop import Trainer

    cfg = load_config(ROOT_CONFIG, [f"train.output_dir={tmp}", "train.reference=on_the_fly"])
    trainer = Trainer(cfg)  # built on the CPU; from here on the compute device is "elsewhere"
    seen: list[Any] = []

    def recorder() -> Any:
        def schedule(*, data_iterator: Any, **kwargs: Any) -> Any:
            seen.extend(next(data_iterator) for _ in range(kwargs["num_microbatches"]))
            raise _Stop

        return schedule

    real = engine.get_forward_backward_func
    engine.get_forward_backward_func = recorder
    force_compute_device(META)
    try:
        with pytest.raises(_Stop):
            trainer.train_step()
    finally:
        engine.get_forward_backward_func = real
        force_compute_device(None)
    assert seen, "the schedule was never called"
    names = {name.split(".")[-1] for name, _ in _tensors(seen)}
    assert {"tokens", "labels", "position_ids", "rewards", "group_ids", "response_mask"} <= names, names
    wrong = _off_device(seen)
    assert not wrong, wrong[:8]


def test_training_step_moves_batches_to_the_compute_device(tmp_path) -> None:
    _step_inputs_on_the_compute_device(str(tmp_path))


@single_rank
def _collectives_get_compute_device_tensors() -> None:
    """Every tensor our reductions hand to torch.distributed is on the compute device (NCCL needs CUDA)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from rao_megatron.data import collate_sequences
    from rao_megatron.losses import get_loss
    from rao_megatron.training import reductions, reliability

    batch = collate_sequences([[1, 5, 6]], [[7, 8]], seq_length=8, pad_id=0, group_ids=[0])
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    handed: list[tuple[str, torch.device]] = []

    def record(name: str) -> Any:
        def collective(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            handed.append((name, tensor.device))
            raise _Stop

        return collective

    calls = {
        "global_normalizer": lambda: reductions.global_normalizer(get_loss("rao").bind({}), [batch]),
        "step_loss": lambda: reductions.step_loss([{"loss": torch.tensor(1.0)}]),
        "count_tokens": lambda: reductions.count_tokens([batch]),
        "summed_counts": lambda: reductions.summed_counts([{"pair_counts": (1, 2)}], "pair_counts", 2),
        "grads_finite": lambda: reliability.grads_finite([torch.nn.ParameterList([param])]),
        "preemption": lambda: reliability.PreemptionHandler().requested(),
    }
    saved = (dist.all_reduce, dist.broadcast, ps.get_data_parallel_world_size, dist.get_world_size)
    dist.all_reduce, dist.broadcast = record("all_reduce"), record("broadcast")
    ps.get_data_parallel_world_size = lambda *a, **k: 2  # as if DP2: the reductions must communicate
    dist.get_world_size = lambda *a, **k: 2
    force_compute_device(META)
    try:
        for name, call in calls.items():
            handed.clear()
            with pytest.raises(_Stop):
                call()
            assert handed and all(d == META for _, d in handed), f"{name}: {handed}"
    finally:
        dist.all_reduce, dist.broadcast, ps.get_data_parallel_world_size, dist.get_world_size = saved
        force_compute_device(None)


def test_collectives_get_tensors_on_the_compute_device() -> None:
    _collectives_get_compute_device_tensors()
