"""RAO: Reward Alignment Optimization (point-wise reward distillation with prefix consistency).

Paper Algorithm 1, with the choices of DESIGN §2:
    log Z_i = log_z0 + stopgrad(Δ_P(x_i))            prefix consistency (Eq. 6), Z_i detached
                                                     (prefix_consistency=False: log Z_i = log_z0, an ablation)
    r̂_ij    = β·Δ_R(y_ij) + β·log Z_i                  implicit reward
    L_i     = (1/K_i) Σ_j (r_ij − r̂_ij)²               point-wise MSE; batch loss = mean over groups
with Δ_R = R_θ(y) − R_ref(y), Δ_P = P_θ(x) − P_ref(x), and r = reward_scale·r_raw + reward_shift.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import checks
from .groups import Groups, best_index, group_max, group_mean, make_groups, masked_mean
from .registry import register
from .stats import SequenceStats

DEFAULT_LOG_Z0 = math.log(50.0)  # the paper's reported Z0 = 50 (with β = 0.1, lr 5e-7)


def resolve_log_z0(log_z0: float | None, z0: float | None) -> float:
    """``log_z0`` from either form; ``z0`` is the convenience spelling of ``exp(log_z0)``."""
    if z0 is not None and log_z0 is not None:
        raise ValueError("loss 'rao': give either z0 or log_z0, not both "
                         f"(got z0={z0!r}, log_z0={log_z0!r})")
    if z0 is not None:
        return math.log(checks.positive("rao", "z0", z0))
    if log_z0 is None:
        return DEFAULT_LOG_Z0
    return checks.finite("rao", "log_z0", log_z0)


def implicit_rewards(stats: SequenceStats, beta: float, log_z0: float,
                     prefix_consistency: bool = True, groups: Groups | None = None) -> tuple[Tensor, Tensor]:
    """``(r̂ [N], log Z [G])``: β·Δ_R + β·log Z_i, with Δ_P averaged once per group and detached
    (``prefix_consistency=False``: log Z_i = log_z0 for every group, Δ_P left out). ``groups``: the
    batch's :func:`make_groups`, where the caller has it (computing it reads the group count on the host)."""
    groups = make_groups(stats.group_ids) if groups is None else groups
    delta_r = stats.policy_logps - stats.ref_logps
    if prefix_consistency:
        # Δ_P is identical for every response of a prompt (causal attention); averaging over the group
        # computes it once per group and absorbs rounding differences between the copies.
        delta_p = group_mean((stats.policy_prompt_logps - stats.ref_prompt_logps).detach().to(delta_r.dtype),
                             groups.index, groups.count)
    else:
        delta_p = delta_r.new_zeros(groups.count)
    log_z = log_z0 + delta_p
    return beta * delta_r + beta * log_z[groups.index], log_z


@register("rao", formula="(1/K) Σ_j (r_j − β·Δ_R(y_j) − β·(log_z0 + sg(Δ_P(x))))²",
          needs_reference=True, needs_rewards=True, pairwise=False)
def rao_terms(stats: SequenceStats, beta: float = 0.1, log_z0: float | None = None, z0: float | None = None,
              reward_scale: float = 1.0, reward_shift: float = 0.0,
              prefix_consistency: bool = True) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-group RAO losses ``[G]``, unit weights ``[G]`` and the metrics of DESIGN §2. ``prefix_consistency``
    False drops sg(Δ_P) from log Z (a constant log_z0; not the paper's method, kept to measure its effect)."""
    beta = checks.positive("rao", "beta", beta)
    log_z0 = resolve_log_z0(log_z0, z0)
    reward_scale = checks.positive("rao", "reward_scale", reward_scale)
    reward_shift = checks.finite("rao", "reward_shift", reward_shift)
    stats.require("rao", "policy_logps", "ref_logps", "policy_prompt_logps", "ref_prompt_logps", "rewards")

    groups = make_groups(stats.group_ids)
    r_hat, log_z = implicit_rewards(stats, beta, log_z0, bool(prefix_consistency), groups)
    target = stats.rewards.to(r_hat.dtype) * reward_scale + reward_shift
    residual = target - r_hat
    per_group = group_mean(residual.square(), groups.index, groups.count)
    return per_group, torch.ones_like(per_group), _metrics(stats, groups, r_hat.detach(), target,
                                                             residual.detach(), log_z)


def _metrics(stats: SequenceStats, groups: Groups, r_hat: Tensor, target: Tensor, residual: Tensor,
             log_z: Tensor) -> dict[str, Tensor]:
    """DESIGN §2's metrics, as detached 0-d tensors (read on the host once per step, not here).

    "Best" and "worst" only mean something where a group's rewards differ: in an all-tied group (every
    answer wrong, or K = 1) the first response would be "best" by convention and its target is set by
    β·log Z alone, so it would count as displaced by construction. Tied groups are reported on their own:
    ``tied_share`` (of the groups) and ``tied/delta_r`` (their mean Δ_R). A metric with nothing to measure
    in this batch (no group whose rewards differ, no tied group, no ordered pair) is NaN, which the step's
    average skips."""
    idx = groups.index
    delta_r = (stats.policy_logps - stats.ref_logps).detach()
    differs = group_max(target, idx, groups.count) > -group_max(-target, idx, groups.count)  # [G]
    best = best_index(groups, target)  # meaningful where ``differs``; masked below
    worst = best_index(groups, -target)
    ordered = (idx[:, None] == idx[None, :]) & (target[:, None] > target[None, :])
    return {
        "log_z": log_z.detach().mean(),
        "residual": residual.mean(),
        "tied_share": (~differs).float().mean(),
        "rewards/best": masked_mean(r_hat[best], differs),
        "rewards/worst": masked_mean(r_hat[worst], differs),
        "rewards/gap": masked_mean(r_hat[best] - r_hat[worst], differs),
        # likelihood displacement: the best response became less likely than under the reference
        "displacement": masked_mean((delta_r[best] < 0).float(), differs),
        "tied/delta_r": masked_mean(delta_r, ~differs[idx]),
        "ranking_accuracy": masked_mean((r_hat[:, None] > r_hat[None, :]).float(), ordered),
    }
