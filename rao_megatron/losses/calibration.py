"""Reward calibration: the training set's reward statistics, the normalisation they define, RAO's data-derived
``log_z0`` and the range of targets a run asks for (docs/rao.md explains the choices).

RAO regresses β·Δ_R(y) + β·log Z onto the explicit reward r, so at step 0 (Δ_P = 0) the response's target is
``Δ_R* = r/β − log_z0`` nats: the reward's scale, β and Z0 must be chosen together. This module turns the
training set's rewards into

- an affine map ``r̃ = scale·r + shift`` (``none``; ``zscore``: mean 0, std 1; ``minmax``: [0, 1]), applied to
  every reward a loss sees (order-preserving, so only the losses that use reward *values* -- RAO, RPO --
  change);
- RAO's default ``log_z0`` (:func:`auto_log_z0`);
- the step-0 target range (:func:`target_range`) printed at start-up, with a warning outside
  ``SANE_TARGET_NATS``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

NORMALIZATIONS = ("none", "zscore", "minmax")
#: |Δ_R*| above this many nats (a factor of e^20 ≈ 5e8 in probability) is no target a fine-tuning run reaches
SANE_TARGET_NATS = 20.0
#: how far RAO's log Z may move from log_z0 during training before the trainer warns: every target moves with
#: it (in the alignment benchmark it moved by at most 1.8 nats with 0/1 rewards and by 2.3-6.3 with a reward
#: model's scores, where RAO lost 5.5 points of accuracy to a fixed log Z; docs/rao.md)
LOG_Z_DRIFT_NATS = 2.0


@dataclass(frozen=True)
class RewardStats:
    """Statistics of the raw rewards of a training set (every response of every group counts once).

    ``min_best`` is the lowest best reward among the groups whose rewards differ (None when none differ):
    the group that limits how high ``log_z0`` may go while every group's best response keeps a target ≥ 0.
    """

    responses: int
    groups: int
    tied_groups: int
    mean: float
    std: float
    min: float
    max: float
    min_best: float | None

    @classmethod
    def from_groups(cls, rewards: Sequence[Sequence[float]]) -> RewardStats:
        flat = [float(r) for group in rewards for r in group]
        if not flat:
            raise ValueError("no rewards to compute statistics from")
        mean = math.fsum(flat) / len(flat)
        std = math.sqrt(math.fsum((r - mean) ** 2 for r in flat) / len(flat))
        differing = [max(g) for g in rewards if len(g) and max(g) > min(g)]
        return cls(responses=len(flat), groups=len(rewards), tied_groups=len(rewards) - len(differing),
                   mean=mean, std=std, min=min(flat), max=max(flat),
                   min_best=min(differing) if differing else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RewardStats:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as e:
            raise ValueError(f"reward statistics need the keys {', '.join(cls.__dataclass_fields__)}: {e}") from None


def normalization_affine(kind: str, stats: RewardStats | None) -> tuple[float, float]:
    """``(scale, shift)`` with ``r̃ = scale·r + shift``. A constant reward set (std 0) cannot be normalised:
    the rewards are only shifted to 0 (``zscore``) or to 0 at the minimum (``minmax``)."""
    if kind not in NORMALIZATIONS:
        raise ValueError(f"reward normalisation must be one of {', '.join(NORMALIZATIONS)}, got {kind!r}")
    if kind == "none" or stats is None:
        return 1.0, 0.0
    if kind == "zscore":
        scale = 1.0 / stats.std if stats.std > 0 else 1.0
        return scale, -stats.mean * scale
    spread = stats.max - stats.min
    scale = 1.0 / spread if spread > 0 else 1.0
    return scale, -stats.min * scale


def compose(affine: tuple[float, float], reward_scale: float = 1.0, reward_shift: float = 0.0) -> tuple[float, float]:
    """The whole map from raw reward to RAO's reward: the normalisation ``affine``, then RAO's own
    ``reward_scale`` / ``reward_shift``."""
    return reward_scale * affine[0], reward_scale * affine[1] + reward_shift


def auto_log_z0(stats: RewardStats, beta: float, scale: float = 1.0, shift: float = 0.0) -> float:
    """RAO's default ``log_z0`` for these (affinely mapped) rewards:

        log_z0 = min( mean(r̃)/β , min over groups whose rewards differ of max_j r̃_j / β )

    The first term is Jensen's lower bound on the true log-partition, log Z(x) = log E_ref[exp(r/β)] ≥
    E_ref[r]/β, with the training set's mean reward standing in for E_ref[r]: the paper's Sec. 4.5 notes that
    a smaller Z0 raises every target and keeps RAO from lowering all responses at once, and a Z0 below the
    partition function's lower bound errs on that side. The second term caps it so that every group's
    best-rewarded response has a target ≥ 0 (its probability is never asked to fall). Groups whose rewards
    all tie carry no ranking and do not cap it. Rewards in {0, 1} with a share p correct give p/β.
    """
    mean = scale * stats.mean + shift
    cands = [mean / beta]
    if stats.min_best is not None:
        cands.append((scale * stats.min_best + shift) / beta)
    return min(cands)


@dataclass(frozen=True)
class TargetRange:
    """Step-0 targets ``Δ_R* = (reward_scale·r̃ + reward_shift)/β − log_z0`` over every training response."""

    min: float
    mean: float
    max: float
    responses: int

    @property
    def sane(self) -> bool:
        return max(abs(self.min), abs(self.max)) <= SANE_TARGET_NATS


def log_mean_exp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values) / len(values))


def target_range(rewards: Sequence[Sequence[float]], *, beta: float, log_z0: float, scale: float = 1.0,
                 shift: float = 0.0, sampled: bool = False) -> TargetRange:
    """The range of RAO's step-0 targets (Δ_P = 0) that ``rewards`` (raw, per group) imply; ``scale`` and
    ``shift`` are the whole affine map from raw reward to the loss's reward. ``sampled``: each group's log Z
    is the log-mean-exp of its own r̃/β (``loss.log_z=sampled``), not ``log_z0``."""
    targets = []
    for group in rewards:
        mapped = [(scale * float(r) + shift) / beta for r in group]
        log_z = log_mean_exp(mapped) if sampled and mapped else log_z0
        targets += [m - log_z for m in mapped]
    if not targets:
        raise ValueError("no rewards to compute targets from")
    return TargetRange(min=min(targets), mean=math.fsum(targets) / len(targets), max=max(targets),
                       responses=len(targets))
