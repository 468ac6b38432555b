"""A loss owns its own knowledge: a toy loss registered here, with its own hooks (hyper-parameters derived from the
training set's rewards, start-up lines, a watch over each step's record, exclusive hyper-parameters), is used by
the config and the trainer's calls with no edit outside this module; and nothing outside ``losses/`` names a
loss that has hooks (the trainer path must call them, not re-read a loss's settings by name)."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rao_megatron.config import ConfigError, load_config
from rao_megatron.losses import LOSSES, SequenceStats
from rao_megatron.losses.calibration import RewardStats, normalization_affine
from rao_megatron.losses.groups import group_mean, make_groups
from rao_megatron.losses.registry import register
from rao_megatron.training.loop import LossWatch
from rao_megatron.training.preflight import calibration_lines, reward_calibration

PACKAGE = Path(__file__).resolve().parents[2] / "rao_megatron"
TOY = "toy_hooked"


def toy_terms(stats: SequenceStats, beta: float = 1.0, gamma: float | None = None, margin: float | None = None):
    groups = make_groups(stats.group_ids)
    diff = beta * (stats.policy_logps - stats.ref_logps)
    per_group = group_mean(diff.square(), groups.index, groups.count)
    return per_group, torch.ones_like(per_group), {"toy/seen": diff.detach().abs().max()}


def toy_calibrate(stats: RewardStats, hparams: dict, affine: tuple[float, float]) -> dict:
    """margin = twice the highest normalised reward, unless gamma or margin is set."""
    if hparams.get("margin") is not None or hparams.get("gamma") is not None:
        return hparams
    return {**hparams, "margin": 2 * (affine[0] * stats.max + affine[1])}


def toy_startup_lines(loss, rewards) -> list[str]:
    if rewards is None:
        return ["toy: no rewards"]
    return [f"toy: margin {loss.settings['margin']:g} over {sum(len(g) for g in rewards)} rewards"]


def toy_watch(loss, step: int, record: dict) -> str | None:
    seen = record.get("toy/seen")
    if seen is None or seen <= loss.settings["margin"]:
        return None
    return f"warning: step {step}: toy saw {seen:g} > margin {loss.settings['margin']:g}"


@pytest.fixture
def toy():
    register(TOY, formula="(1/K) Σ_j (β·Δ_R(y_j))²", needs_reference=True, needs_rewards=True, pairwise=False,
             calibrate=toy_calibrate, startup_lines=toy_startup_lines, watch=toy_watch,
             exclusive=[("gamma", "margin")])(toy_terms)
    try:
        yield LOSSES[TOY]
    finally:
        del LOSSES[TOY]


def _groups(*rewards):
    return SimpleNamespace(train=[SimpleNamespace(rewards=r) for r in rewards])


def _trainer_watch(loss, records: list[dict]) -> list[str]:
    """What the trainer's step loop warns (training/loop.py: its ``LossWatch`` over each step's record)."""
    watch = LossWatch(loss)
    return [line for step, record in enumerate(records, 1) if (line := watch(step, record))]


def test_the_config_and_the_trainer_calls_use_a_new_loss_hooks(toy):
    groups = _groups([0.0, 4.0], [1.0, 3.0, 2.0])
    cfg = load_config(None, [f"loss.name={TOY}", "loss.beta=0.5", "loss.reward_normalization=none"])
    assert "margin" not in cfg.loss.build().hparams  # no data yet: the loss's own defaults
    reward_calibration(cfg, groups)  # the trainer's start-up: statistics, then the bound loss
    assert cfg.loss.reward_stats == RewardStats.from_groups([[0.0, 4.0], [1.0, 3.0, 2.0]]).to_dict()
    loss = cfg.loss.build()
    assert loss.hparams == {"beta": 0.5, "margin": 8.0}  # toy_calibrate: 2 × max raw reward
    assert calibration_lines(loss, groups) == ["rewards: normalised by 1·r +0 (loss.reward_normalization)",
                                               "toy: margin 8 over 5 rewards"]
    assert calibration_lines(loss, SimpleNamespace(train=[])) == ["toy: no rewards"]
    # the normalisation reaches the hook: minmax maps the max reward to 1
    mm = load_config(None, [f"loss.name={TOY}"])
    reward_calibration(mm, groups)
    a, b = normalization_affine("minmax", RewardStats.from_dict(mm.loss.reward_stats))
    assert mm.loss.build().hparams["margin"] == pytest.approx(2 * (4 * a + b)) == pytest.approx(2.0)
    # a set margin (or gamma) is kept as it is
    pinned = load_config(None, [f"loss.name={TOY}", "loss.margin=0.25"])
    reward_calibration(pinned, groups)
    assert pinned.loss.build().hparams == {"margin": 0.25}
    # the watch over each step's record: first warning of the run only, a record without the metric is quiet
    records = [{"step": 1, "loss": None}, {"toy/seen": 7.5}, {"toy/seen": 9.0}, {"toy/seen": 10.0}]
    assert _trainer_watch(loss, records) == ["warning: step 3: toy saw 9 > margin 8"]
    # the exclusive hyper-parameters are the config's check, with the loss's names
    with pytest.raises(ConfigError, match="config keys 'loss.gamma' and 'loss.margin'.*give one of the two"):
        load_config(None, [f"loss.name={TOY}", "loss.gamma=1", "loss.margin=2"])


def test_a_loss_without_hooks_is_quiet(toy):
    dpo = load_config(None, ["loss.name=dpo"]).loss.build()
    assert calibration_lines(dpo, _groups([0.0, 1.0])) == []
    assert dpo.watch(1, {"log_z": -100.0, "toy/seen": 1e9}) is None
    with pytest.raises(ValueError, match="exclusive names hyper-parameters it does not take: lam"):
        register("toy_bad", formula="", needs_reference=False, needs_rewards=False, pairwise=False,
                 exclusive=[("gamma", "lam")])(toy_terms)
    assert "toy_bad" not in LOSSES


def _loss_names_outside_losses(package: Path = PACKAGE) -> list[str]:
    """Where a module outside ``losses/`` compares with the name of a loss that has hooks, or imports its module."""
    hooked = {name: spec.terms.__module__ for name, spec in LOSSES.items()
              if name != TOY and (spec.calibrate or spec.startup_lines or spec.watch or spec.exclusive)}
    modules = set(hooked.values())
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] == "losses":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    for c in ast.walk(side):
                        if isinstance(c, ast.Constant) and c.value in hooked:
                            found.append(f"{path.relative_to(package)}:{node.lineno}: compares with '{c.value}'")
            elif isinstance(node, ast.ImportFrom) and node.module in modules:
                found.append(f"{path.relative_to(package)}:{node.lineno}: imports {node.module}")
            elif isinstance(node, ast.Import):
                found += [f"{path.relative_to(package)}:{node.lineno}: imports {a.name}"
                          for a in node.names if a.name in modules]
    return found


def test_nothing_outside_losses_names_a_loss_with_hooks():
    assert LOSSES["rao"].watch is not None  # RAO's knowledge is its hooks
    assert _loss_names_outside_losses() == []
