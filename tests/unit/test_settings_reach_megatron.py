"""Every parallelism, dtype and optimizer key of the config reaches the Megatron object it names."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rao_megatron.config import ParallelConfig
from tests.unit.test_models import single_rank

CONFIG = "examples/configs/rao_tiny.yaml"
OVERRIDES = ["train.lr=2e-3", "train.min_lr=1e-4", "train.weight_decay=0.01", "train.adam_beta1=0.8",
             "train.adam_beta2=0.9", "train.clip_grad=0.5", "train.warmup_steps=3", "train.steps=7",
             "parallel.distributed_optimizer=true", "parallel.device=cpu", "parallel.backend=gloo"]

#: the parallel.* keys and how each shows up in the built trainer (a new key must be added here)
PARALLEL_CHECKS: dict[str, Any] = {
    "tp": lambda t, m: m.tensor_model_parallel_size == t.cfg.parallel.tp,
    "pp": lambda t, m: m.pipeline_model_parallel_size == t.cfg.parallel.pp,
    "vpp": lambda t, m: m.virtual_pipeline_model_parallel_size == t.cfg.parallel.vpp,
    "ep": lambda t, m: m.expert_model_parallel_size == t.cfg.parallel.ep,
    "etp": lambda t, m: m.expert_tensor_parallel_size == (t.cfg.parallel.etp or t.cfg.parallel.tp),
    "sequence_parallel": lambda t, m: m.sequence_parallel is t.cfg.parallel.sequence_parallel,
    "backend": lambda t, m: torch.distributed.get_backend() == t.cfg.parallel.backend,
    "device": lambda t, m: all(p.device.type == t.cfg.parallel.device for c in t.chunks for p in c.parameters()),
    "distributed_optimizer": lambda t, m: (t.optimizer.config.use_distributed_optimizer
                                           and t.chunks[0].ddp_config.use_distributed_optimizer),
}


@single_rank
def _trainer_settings(tmp: str) -> None:
    from rao_megatron.config import load_config
    from rao_megatron.training.loop import Trainer

    trainer = Trainer(load_config(CONFIG, [f"train.output_dir={tmp}", *OVERRIDES]))
    model_cfg = trainer.chunks[0].config
    failed = [key for key, check in PARALLEL_CHECKS.items() if not check(trainer, model_cfg)]
    assert not failed, f"parallel keys that did not reach Megatron: {failed}"
    assert model_cfg.params_dtype == torch.float32 and not model_cfg.bf16
    t, opt = trainer.cfg.train, trainer.optimizer.config
    for key in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "clip_grad"):
        assert getattr(opt, key) == getattr(t, key), key
    sched = trainer.scheduler
    # warm-up: the first update at lr / warmup_steps, reached through Megatron's init_lr (loop.build_optimizer)
    assert (sched.lr_warmup_steps + 1, sched.lr_decay_steps) == (t.warmup_steps, t.steps)
    assert trainer.optimizer.param_groups[0]["lr"] == t.lr / t.warmup_steps
    assert trainer.logprobs.impl == trainer.cfg.model.logprob_impl
    assert trainer.logprobs.chunk_size == trainer.cfg.model.logprob_chunk_size


def test_every_parallel_key_is_checked() -> None:
    assert {f.name for f in dataclasses.fields(ParallelConfig)} == set(PARALLEL_CHECKS)


def test_settings_reach_megatron(tmp_path) -> None:
    _trainer_settings(str(tmp_path))
