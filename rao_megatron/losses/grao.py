"""GRAO: Group Relative Alignment Optimization (arXiv 2508.07750), loss = −J.

A group holds G sampled responses o_i and the reference answer y of one prompt (marked by
``is_reference_answer``), each with a reward. With J(·) = R_θ(·)/L(·), the token-mean log-prob:
    J   = (1/G) Σ_i [ Â_i·J(o_i) + β·Â_y·J(y) + λ·Â_i·(J(o_i) − J(y)) ]
            exploration   imitation     alignment
with the advantages by ``advantage_norm``:
    group    Â = (r − mean(r)) / std(r) over the G + 1 members (y included), std unbiased: this project's
             first reading, kept as the default; a group whose G + 1 rewards all tie has Â = 0
    samples  the paper's Eq. 4: mean and population (1/G) std over the G samples only, Â_y = (r_y − mean)/std
             with the samples' statistics; where the G samples all tie (std 0) the std is taken as 1, so the
             samples' Â are 0 and y's is r_y − mean (imitation still acts when every sample is wrong)
The advantages are functions of the rewards only, so no gradient flows through them. β = 0 is the paper's
"w/o imitation" ablation. The metrics split J into its three terms (the paper's loss-decomposition figure).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import checks
from .groups import group_mean, group_sum, make_groups
from .registry import register
from .stats import SequenceStats

ADV_EPS = 1e-6  # keeps Â finite (and 0) when every reward of a group is equal


ADVANTAGE_NORMS = ("group", "samples")


def advantages(r: Tensor, is_ref: Tensor, groups: Any, norm: str) -> Tensor:
    """``Â [N]`` of every member (samples and reference answer) by ``norm`` (module docstring)."""
    idx = groups.index
    if norm == "group":
        mean = group_mean(r, idx, groups.count)
        var = group_sum((r - mean[idx]).square(), idx, groups.count) / (groups.sizes - 1).to(r.dtype)
        return (r - mean[idx]) / (var.sqrt()[idx] + ADV_EPS)
    sample = (~is_ref).to(r.dtype)
    g = group_sum(sample, idx, groups.count)
    mean = group_sum(r * sample, idx, groups.count) / g
    std = (group_sum((r - mean[idx]).square() * sample, idx, groups.count) / g).sqrt()
    std = torch.where(std > ADV_EPS, std, torch.ones_like(std))
    return (r - mean[idx]) / std[idx]


@register("grao", formula="−(1/G) Σ_i [Â_i·J(o_i) + β·Â_y·J(y) + λ·Â_i·(J(o_i) − J(y))]",
          needs_reference=False, needs_rewards=True, pairwise=False)
def grao_terms(stats: SequenceStats, beta: float = 0.5, lam: float = 0.6,
               advantage_norm: str = "group") -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-group −J ``[G]``, unit weights and metrics; each group needs one reference answer and ≥ 1 sample."""
    beta = checks.non_negative("grao", "beta", beta)
    lam = checks.non_negative("grao", "lam", lam)
    if advantage_norm not in ADVANTAGE_NORMS:
        raise ValueError(f"loss 'grao': advantage_norm must be one of {', '.join(ADVANTAGE_NORMS)}, "
                         f"got {advantage_norm!r}")
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
    adv = advantages(r, is_ref, groups, advantage_norm)

    ref_pos = torch.nonzero(is_ref).squeeze(1)
    j_y = torch.zeros(groups.count, dtype=j.dtype, device=j.device).index_put((idx[ref_pos],), j[ref_pos])
    adv_y = torch.zeros_like(j_y).index_put((idx[ref_pos],), adv[ref_pos])

    samples = torch.nonzero(~is_ref).squeeze(1)
    gi = idx[samples]
    exploration = adv[samples] * j[samples]
    imitation = beta * adv_y[gi] * j_y[gi]
    alignment = lam * adv[samples] * (j[samples] - j_y[gi])
    objective = group_mean(exploration + imitation + alignment, gi, groups.count)
    per_group = -objective

    def term(x: Tensor) -> Tensor:  # its share of the batch-mean objective
        return group_mean(x.detach(), gi, groups.count).mean()

    metrics = {
        "objective": objective.detach().mean(),
        "objective/exploration": term(exploration),
        "objective/imitation": term(imitation),
        "objective/alignment": term(alignment),
        "advantage/reference": adv_y.detach().mean(),
        "reward_mean": r[samples].mean(),
        "reference_reward": r[ref_pos].mean(),
        "logps_mean/samples": j[samples].detach().mean(),
        "logps_mean/reference": j_y.detach().mean(),
    }
    return per_group, torch.ones_like(per_group), metrics
