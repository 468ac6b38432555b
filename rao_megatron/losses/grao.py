"""GRAO: Group Relative Alignment Optimization (arXiv 2508.07750), loss = −J.

A group holds G sampled responses o_i and the reference answer y of one prompt (marked by
``is_reference_answer``), each with a reward. With J(·) = R_θ(·)/L(·), the token-mean log-prob:
    Â   = (r − mean(r)) / std(r)   over the G + 1 members of the group (y included), std unbiased
    J   = (1/G) Σ_i [ Â_i·J(o_i) + β·Â_y·J(y) + λ·Â_i·(J(o_i) − J(y)) ]
The advantages are functions of the rewards only, so no gradient flows through them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .groups import group_mean, group_sum, make_groups
from .registry import register
from .stats import SequenceStats

ADV_EPS = 1e-6  # keeps Â finite (and 0) when every reward of a group is equal


@register("grao", formula="−(1/G) Σ_i [Â_i·J(o_i) + β·Â_y·J(y) + λ·Â_i·(J(o_i) − J(y))]",
          needs_reference=False, needs_rewards=True, pairwise=False)
def grao_terms(stats: SequenceStats, beta: float = 0.5, lam: float = 0.6) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-group −J ``[G]``, unit weights and metrics; each group needs one reference answer and ≥ 1 sample."""
    beta = checks.positive("grao", "beta", beta)
    lam = checks.non_negative("grao", "lam", lam)
    stats.require("grao", "policy_logps", "rewards", "is_reference_answer")
    groups = make_groups(stats.group_ids)
    idx, is_ref = groups.index, stats.is_reference_answer
    n_ref = group_sum(is_ref.to(torch.int64), idx, groups.count)
    if bool((n_ref != 1).any()):
        g = int(torch.nonzero(n_ref != 1)[0])
        raise ValueError(f"loss 'grao': {groups.describe(g)} has {int(n_ref[g])} reference answers; "
                         "each group needs exactly one (is_reference_answer)")
    if bool((groups.sizes < 2).any()):
        g = int(torch.nonzero(groups.sizes < 2)[0])
        raise ValueError(f"loss 'grao': {groups.describe(g)} has no sampled response besides the reference")

    j = stats.policy_logps / stats.lengths.to(stats.policy_logps.dtype)
    r = stats.rewards.to(j.dtype)
    mean = group_mean(r, idx, groups.count)
    var = group_sum((r - mean[idx]).square(), idx, groups.count) / (groups.sizes - 1).to(j.dtype)
    adv = (r - mean[idx]) / (var.sqrt()[idx] + ADV_EPS)

    ref_pos = torch.nonzero(is_ref).squeeze(1)
    j_y = torch.zeros(groups.count, dtype=j.dtype, device=j.device).index_put((idx[ref_pos],), j[ref_pos])
    adv_y = torch.zeros_like(j_y).index_put((idx[ref_pos],), adv[ref_pos])

    samples = torch.nonzero(~is_ref).squeeze(1)
    gi = idx[samples]
    term = (adv[samples] * j[samples] + beta * adv_y[gi] * j_y[gi]
            + lam * adv[samples] * (j[samples] - j_y[gi]))
    objective = group_mean(term, gi, groups.count)
    per_group = -objective
    metrics = {
        "objective": objective.detach().mean(),
        "reward_mean": r[samples].mean(),
        "reference_reward": r[ref_pos].mean(),
        "logps_mean/samples": j[samples].detach().mean(),
        "logps_mean/reference": j_y.detach().mean(),
    }
    return per_group, torch.ones_like(per_group), metrics
