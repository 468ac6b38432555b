"""The learning rate: the warm-up's first update runs at train.lr / warmup_steps (never 0), and each metrics
record's ``lr`` is the one its optimizer step applied."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_models import single_rank

CONFIG = "examples/configs/rao_tiny.yaml"
LR = 1e-3


@single_rank
def _lr_per_update(tmp: str) -> None:
    from rao_megatron.config import load_config
    from rao_megatron.training.loop import Trainer

    trainer = Trainer(load_config(CONFIG, [f"train.output_dir={tmp}", f"data.token_cache={tmp}/tokens",
                                           f"train.lr={LR}", "train.min_lr=0", "train.warmup_steps=2",
                                           "train.steps=5", "train.reference=on_the_fly"]))
    applied: list[float] = []
    real_step = trainer.optimizer.step

    def step():  # the lr the update reads is the param groups' at the moment it runs
        applied.append(trainer.optimizer.param_groups[0]["lr"])
        return real_step()

    trainer.optimizer.step = step
    params = lambda: torch.cat([p.detach().reshape(-1).clone() for c in trainer.chunks for p in c.parameters()])  # noqa: E731
    before = params()
    records = [trainer.train_step()]
    assert not torch.equal(params(), before), "the first update changed nothing (it ran at lr 0)"
    records += [trainer.train_step() for _ in range(3)]
    assert all(r["update_ok"] for r in records)
    assert [r["lr"] for r in records] == applied, "a record's lr is not the one its update applied"
    # warm-up over 2 updates: k/2 of train.lr at update k; then the cosine decay towards min_lr
    assert applied[:2] == pytest.approx([LR / 2, LR])
    assert LR > applied[2] > applied[3] > 0


def test_the_first_update_runs_at_lr_over_warmup_and_each_record_logs_the_lr_applied(tmp_path) -> None:
    _lr_per_update(str(tmp_path))
