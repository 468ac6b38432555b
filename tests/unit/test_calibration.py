"""Reward calibration (losses/calibration.py, RAO's hooks in losses/rao.py through LossConfig.build, the start-up
lines and the watch over each step) against hand computations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rao_megatron.config import ConfigError, load_config
from rao_megatron.losses import SequenceStats, get_loss
from rao_megatron.losses.calibration import (
    RewardStats,
    auto_log_z0,
    normalization_affine,
    target_range,
)
from rao_megatron.training.preflight import calibration_lines, reward_calibration

#: three groups: rewards differ in the first two, the third is all tied (e.g. every answer wrong)
REWARDS = [[2.0, 6.0], [3.0, 4.0, 5.0], [2.0, 2.0]]


def test_reward_stats_by_hand():
    s = RewardStats.from_groups(REWARDS)
    flat = [2, 6, 3, 4, 5, 2, 2]
    mean = sum(flat) / 7  # 24 / 7
    assert (s.responses, s.groups, s.tied_groups) == (7, 3, 1)
    assert s.mean == pytest.approx(mean)
    assert s.std == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in flat) / 7))
    assert (s.min, s.max) == (2.0, 6.0)
    assert s.min_best == 5.0  # best of group 2; the tied group 3 (best 2) does not count
    assert RewardStats.from_dict(s.to_dict()) == s


def test_normalization_affines():
    s = RewardStats.from_groups(REWARDS)
    assert normalization_affine("none", s) == (1.0, 0.0)
    a, b = normalization_affine("minmax", s)
    assert (a * 2 + b, a * 6 + b) == pytest.approx((0.0, 1.0))
    a, b = normalization_affine("zscore", s)
    z = [a * r + b for g in REWARDS for r in g]
    assert sum(z) / 7 == pytest.approx(0.0, abs=1e-12)
    assert math.sqrt(sum(x * x for x in z) / 7) == pytest.approx(1.0)
    constant = RewardStats.from_groups([[3.0, 3.0]])
    assert normalization_affine("minmax", constant) == (1.0, -3.0)  # shifted to 0, never divided by 0
    with pytest.raises(ValueError, match="one of none, zscore, minmax"):
        normalization_affine("rank", s)


def test_auto_log_z0_rule():
    # rewards in {0, 1}, 3 of 8 right: log_z0 = p / β, so right answers aim up (+6.25) and wrong ones down
    binary = RewardStats.from_groups([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert auto_log_z0(binary, 0.1) == pytest.approx(3 / 12 / 0.1)
    # continuous rewards whose weakest differing group's best (5) ... is above the mean: the mean wins
    s = RewardStats.from_groups(REWARDS)
    assert auto_log_z0(s, 0.5) == pytest.approx(min(24 / 7, 5.0) / 0.5)
    # a group whose best is below the mean caps it, so its best keeps a target >= 0
    low = RewardStats.from_groups([[0.0, 1.0], [9.0, 10.0]])
    assert auto_log_z0(low, 1.0) == pytest.approx(1.0)
    # the affine map is applied first: minmax of REWARDS, β 0.1
    a, b = normalization_affine("minmax", s)
    assert auto_log_z0(s, 0.1, a, b) == pytest.approx(min(a * 24 / 7 + b, a * 5 + b) / 0.1)


def test_target_range_by_hand():
    t = target_range([[0.0, 1.0], [0.0]], beta=0.1, log_z0=math.log(50))
    assert (t.min, t.max, t.responses) == pytest.approx((-math.log(50), 10 - math.log(50), 3))
    assert t.mean == pytest.approx((10 - 3 * math.log(50)) / 3) and t.sane
    ratings = target_range([[1.0, 10.0]], beta=0.1, log_z0=math.log(50))  # raw 1-10 ratings: +96 nats
    assert ratings.max == pytest.approx(100 - math.log(50)) and not ratings.sane


def _stats(rewards: list[float], groups: list[int]) -> SequenceStats:
    n = len(rewards)
    g = torch.Generator().manual_seed(0)
    f = torch.float64
    return SequenceStats(policy_logps=-torch.rand(n, generator=g, dtype=f) * 5, lengths=torch.full((n,), 4),
                         group_ids=torch.tensor(groups), ref_logps=-torch.rand(n, generator=g, dtype=f) * 5,
                         policy_prompt_logps=torch.full((n,), -3.0, dtype=f),
                         ref_prompt_logps=torch.full((n,), -3.1, dtype=f), rewards=torch.tensor(rewards, dtype=f))


@pytest.mark.parametrize("kind", ["minmax", "zscore"])
def test_built_loss_normalises_the_rewards_once(kind):
    s = RewardStats.from_groups(REWARDS)
    cfg = load_config(None, ["loss.name=rao", "loss.beta=0.5", "loss.log_z0=1.0",
                             f"loss.reward_normalization={kind}"])
    cfg.loss.reward_stats = s.to_dict()
    loss = cfg.loss.build()
    a, b = normalization_affine(kind, s)
    raw = [r for g in REWARDS for r in g]
    groups = [0, 0, 1, 1, 1, 2, 2]
    got, _ = loss(_stats(raw, groups))
    once, _ = get_loss("rao")(_stats([a * r + b for r in raw], groups), beta=0.5, log_z0=1.0)
    twice, _ = get_loss("rao")(_stats([a * (a * r + b) + b for r in raw], groups), beta=0.5, log_z0=1.0)
    assert got.item() == pytest.approx(once.item(), rel=1e-12)
    assert abs(got.item() - twice.item()) > 1e-3
    # RPO sees the same normalised rewards (on the groups with a preference pair)
    rpo = load_config(None, ["loss.name=rpo", f"loss.reward_normalization={kind}"])
    rpo.loss.reward_stats = s.to_dict()
    got_rpo, _ = rpo.loss.build()(_stats(raw[:5], groups[:5]))
    want_rpo, _ = get_loss("rpo")(_stats([a * r + b for r in raw[:5]], groups[:5]))
    assert got_rpo.item() == pytest.approx(want_rpo.item(), rel=1e-12)


def test_rao_log_z0_default_comes_from_the_data_unless_set():
    s = RewardStats.from_groups(REWARDS)
    cfg = load_config(None, ["loss.name=rao", "loss.beta=0.1"])
    assert cfg.loss.reward_normalization == "minmax"
    assert "log_z0" not in cfg.loss.build().hparams  # no data yet: the loss's own default (ln 50)
    cfg.loss.reward_stats = s.to_dict()
    a, b = normalization_affine("minmax", s)
    assert cfg.loss.build().hparams["log_z0"] == pytest.approx(auto_log_z0(s, 0.1, a, b))
    pinned = load_config(None, ["loss.name=rao", "loss.z0=50"])
    pinned.loss.reward_stats = s.to_dict()
    assert "log_z0" not in pinned.loss.build().hparams and pinned.loss.build().hparams["z0"] == 50
    with pytest.raises(ConfigError, match="loss.reward_stats.*need the keys"):
        load_config(None, ["loss.reward_stats={mean: 1.0}"])


def test_startup_lines_match_a_hand_computation():
    groups = SimpleNamespace(train=[SimpleNamespace(rewards=r) for r in ([0.0, 1.0, 0.0], [1.0, 1.0], [0.0, 0.0])])
    cfg = load_config(None, ["loss.name=rao", "loss.beta=0.1"])
    reward_calibration(cfg, groups)
    lines = calibration_lines(cfg.loss.build(), groups)
    # minmax of {0, 1} is the identity; log_z0 = mean / β = (3/7) / 0.1; targets r/0.1 - log_z0
    log_z0 = 3 / 7 / 0.1
    assert "log_z0 4.286" in lines[1]
    assert f"min {-log_z0:+.2f} / mean {30 / 7 - log_z0:+.2f} / max {10 - log_z0:+.2f} nats over 7" in lines[1]
    assert not any(line.startswith("warning") for line in lines)
    raw = load_config(None, ["loss.name=rao", "loss.beta=0.1", "loss.reward_normalization=none", "loss.z0=50"])
    ratings = SimpleNamespace(train=[SimpleNamespace(rewards=[1.0, 10.0])])
    reward_calibration(raw, ratings)
    warned = calibration_lines(raw.loss.build(), ratings)
    assert f"max {100 - math.log(50):+.2f}" in warned[1] and warned[2].startswith("warning: RAO asks")
    rpo = load_config(None, ["loss.name=rpo"])
    assert len(calibration_lines(rpo.loss.build(), groups)) == 1  # the normalisation only: no targets
    assert calibration_lines(load_config(None, ["loss.name=dpo"]).loss.build(), groups) == []  # order only


def test_log_z_drift_warns_past_two_nats_and_only_with_prefix_consistency():
    def drift(loss, step, log_z):  # what the trainer asks the bound loss each step: its watch over the record
        return loss.watch(step, {"step": step, "loss": 1.0} if log_z is None else {"step": step, "log_z": log_z})

    rao = load_config(None, ["loss.name=rao", "loss.beta=0.1", "loss.log_z0=1.5"]).loss.build()
    assert drift(rao, 3, 1.5 + 1.99) is None and drift(rao, 3, 1.5 - 1.99) is None
    line = drift(rao, 7, 1.5 - 2.25)
    assert line.startswith("warning: step 7: RAO's log Z has moved -2.25 nats from log_z0 1.5 ")
    assert "loss.log_z=fixed" in line
    assert drift(rao, 7, 1.5 + 2.25).startswith("warning: step 7: RAO's log Z has moved +2.25 nats")
    assert drift(rao, 7, None) is None  # a step without metrics (skipped update)
    assert rao.watch(7, {"log_z": None}) is None
    z0 = load_config(None, ["loss.name=rao", "loss.z0=50"]).loss.build()  # log_z0 = ln 50 = 3.912
    assert drift(z0, 1, 3.912 + 2.5) is not None and drift(z0, 1, 3.912 + 1.5) is None
    fixed = load_config(None, ["loss.name=rao", "loss.log_z0=1.5", "loss.prefix_consistency=false"]).loss.build()
    assert drift(fixed, 7, -10.0) is None  # held at log_z0: nothing drifts
    for mode in ("fixed", "sampled", "sampled_prefix"):  # no log_z0 to drift from (sampled: the data's own)
        bound = load_config(None, ["loss.name=rao", "loss.log_z0=1.5", f"loss.log_z={mode}"]).loss.build()
        assert drift(bound, 7, -10.0) is None, mode
    assert drift(load_config(None, ["loss.name=dpo"]).loss.build(), 7, -10.0) is None
