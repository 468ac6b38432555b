"""Pairwise preference losses over (preferred w, dispreferred l) pairs, averaged per group.

Pairs come from :func:`groups.preference_pairs`: (best, each other) by default, or all ordered pairs.
Notation: Δ(y) = R_θ(y) − R_ref(y); L(y) response length; the loss of a group is the mean of its pairs'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks
from .groups import Groups, group_mean, make_groups, preference_pairs
from .registry import register
from .stats import SequenceStats

Terms = tuple[Tensor, Tensor, dict[str, Tensor]]  # metrics: detached 0-d tensors


def _per_group(losses: Tensor, groups: Groups, chosen: Tensor) -> tuple[Tensor, Tensor]:
    per_group = group_mean(losses, groups.index[chosen], groups.count)
    return per_group, torch.ones_like(per_group)


def _pairs(stats: SequenceStats, loss: str, pairing: str) -> tuple[Groups, Tensor, Tensor]:
    groups = make_groups(stats.group_ids)
    chosen, rejected = preference_pairs(groups, stats.rewards, pairing, loss)
    return groups, chosen, rejected


def _reward_metrics(chosen_r: Tensor, rejected_r: Tensor) -> dict[str, Tensor]:
    chosen_r, rejected_r = chosen_r.detach(), rejected_r.detach()
    return {
        "rewards/chosen": chosen_r.mean(),
        "rewards/rejected": rejected_r.mean(),
        "rewards/margin": (chosen_r - rejected_r).mean(),
        "rewards/accuracy": (chosen_r > rejected_r).float().mean(),
    }


def _ref_pairs(stats: SequenceStats, loss: str, pairing: str) -> tuple[Groups, Tensor, Tensor, Tensor, Tensor]:
    stats.require(loss, "policy_logps", "ref_logps")
    groups, w, l = _pairs(stats, loss, pairing)
    delta = stats.policy_logps - stats.ref_logps
    return groups, w, l, delta[w], delta[l]


@register("dpo", formula="−(1−ε)·log σ(β(Δ(w) − Δ(l))) − ε·log σ(−β(Δ(w) − Δ(l)))",
          needs_reference=True, needs_rewards=False, pairwise=True)
def dpo_terms(stats: SequenceStats, beta: float = 0.1, label_smoothing: float = 0.0,
              pairing: str = "best_vs_rest") -> Terms:
    """DPO (Rafailov et al. 2023); label_smoothing ε > 0 gives the conservative cDPO / robust form."""
    beta = checks.positive("dpo", "beta", beta)
    eps = checks.in_range("dpo", "label_smoothing", label_smoothing, 0.0, 0.5)
    groups, w, _, dw, dl = _ref_pairs(stats, "dpo", pairing)
    logits = beta * (dw - dl)
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return (*_per_group(losses, groups, w), _reward_metrics(beta * dw, beta * dl))


@register("ipo", formula="((Δ(w)/L(w) − Δ(l)/L(l)) − 1/(2β))²",
          needs_reference=True, needs_rewards=False, pairwise=True)
def ipo_terms(stats: SequenceStats, beta: float = 0.1, pairing: str = "best_vs_rest") -> Terms:
    """IPO (Azar et al. 2024), length-normalised log-ratios as TRL computes them."""
    beta = checks.positive("ipo", "beta", beta)
    groups, w, l, dw, dl = _ref_pairs(stats, "ipo", pairing)
    lengths = stats.lengths.to(dw.dtype)
    h = dw / lengths[w] - dl / lengths[l]
    losses = (h - 1 / (2 * beta)).square()
    return (*_per_group(losses, groups, w), _reward_metrics(beta * dw, beta * dl))


@register("slic", formula="max(0, 1 − β(Δ(w) − Δ(l)))",
          needs_reference=True, needs_rewards=False, pairwise=True)
def slic_terms(stats: SequenceStats, beta: float = 0.1, pairing: str = "best_vs_rest") -> Terms:
    """SLiC-HF hinge loss (Zhao et al. 2023) on the reference-relative log-ratio margin."""
    beta = checks.positive("slic", "beta", beta)
    groups, w, _, dw, dl = _ref_pairs(stats, "slic", pairing)
    losses = torch.relu(1 - beta * (dw - dl))
    return (*_per_group(losses, groups, w), _reward_metrics(beta * dw, beta * dl))


@register("rpo", formula="(β(Δ(w) − Δ(l)) − (r_w − r_l))²",
          needs_reference=True, needs_rewards=True, pairwise=True)
def rpo_terms(stats: SequenceStats, beta: float = 0.1, pairing: str = "best_vs_rest") -> Terms:
    """Reward distillation (Fisch et al. 2024): the implicit reward margin regresses on the explicit one."""
    beta = checks.positive("rpo", "beta", beta)
    stats.require("rpo", "rewards")
    groups, w, l, dw, dl = _ref_pairs(stats, "rpo", pairing)
    r = stats.rewards.to(dw.dtype)
    losses = (beta * (dw - dl) - (r[w] - r[l])).square()
    return (*_per_group(losses, groups, w), _reward_metrics(beta * dw, beta * dl))


@register("cal_dpo", formula="−log σ(Δ(w) − Δ(l)) + ½[(Δ(w) − 1/(2β))² + (Δ(l) + 1/(2β))²]",
          needs_reference=True, needs_rewards=False, pairwise=True)
def cal_dpo_terms(stats: SequenceStats, beta: float = 0.1, pairing: str = "best_vs_rest") -> Terms:
    """Cal-DPO (Xiao et al. 2024): DPO's contrast plus calibration of each log-ratio to ±1/(2β)."""
    beta = checks.positive("cal_dpo", "beta", beta)
    groups, w, _, dw, dl = _ref_pairs(stats, "cal_dpo", pairing)
    target = 1 / (2 * beta)
    losses = -F.logsigmoid(dw - dl) + 0.5 * ((dw - target).square() + (dl + target).square())
    return (*_per_group(losses, groups, w), _reward_metrics(beta * dw, beta * dl))


@register("simpo", formula="−log σ(β(R(w)/L(w) − R(l)/L(l)) − γ)",
          needs_reference=False, needs_rewards=False, pairwise=True)
def simpo_terms(stats: SequenceStats, beta: float = 2.0, gamma: float = 1.0,
                pairing: str = "best_vs_rest") -> Terms:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, target margin γ.

    Defaults follow the paper's Llama-3-8B base setting (β = 2.0, γ = 1.0).
    """
    beta = checks.positive("simpo", "beta", beta)
    gamma = checks.finite("simpo", "gamma", gamma)
    stats.require("simpo", "policy_logps")
    groups, w, l = _pairs(stats, "simpo", pairing)
    avg = stats.policy_logps / stats.lengths.to(stats.policy_logps.dtype)
    losses = -F.logsigmoid(beta * (avg[w] - avg[l]) - gamma)
    return (*_per_group(losses, groups, w), _reward_metrics(beta * avg[w], beta * avg[l]))


def log_odds(mean_logp: Tensor) -> Tensor:
    """log(p / (1 − p)) for p = exp(mean_logp) < 1; expm1 keeps precision when p is near 1."""
    mean_logp = mean_logp.clamp(max=-1e-6)  # p == 1 exactly has infinite odds
    return mean_logp - torch.log(-torch.expm1(mean_logp))


@register("orpo", formula="−R(w)/L(w) − λ·log σ(log-odds(w) − log-odds(l)), log-odds(y) = ℓ̄ − log(1 − e^ℓ̄)",
          needs_reference=False, needs_rewards=False, pairwise=True)
def orpo_terms(stats: SequenceStats, lam: float = 0.1, pairing: str = "best_vs_rest") -> Terms:
    """ORPO (Hong et al. 2024): NLL of the preferred response plus λ times the odds-ratio term."""
    lam = checks.non_negative("orpo", "lam", lam)
    stats.require("orpo", "policy_logps")
    groups, w, l = _pairs(stats, "orpo", pairing)
    avg = stats.policy_logps / stats.lengths.to(stats.policy_logps.dtype)
    ratio = log_odds(avg[w]) - log_odds(avg[l])
    nll = -avg[w]
    losses = nll - lam * F.logsigmoid(ratio)
    metrics = _reward_metrics(avg[w], avg[l])
    metrics.update({"nll": nll.detach().mean(), "log_odds_ratio": ratio.detach().mean()})
    return (*_per_group(losses, groups, w), metrics)


@register("bt", formula="−log σ(s_w − s_l − margin) + c·(s_w + s_l)²",
          needs_reference=False, needs_rewards=False, pairwise=True)
def bt_terms(stats: SequenceStats, margin: float = 0.0, centering: float = 0.0,
             pairing: str = "best_vs_rest") -> Terms:
    """Bradley–Terry reward-model loss on scalar scores; ``centering`` c pulls scores towards 0."""
    margin = checks.finite("bt", "margin", margin)
    centering = checks.non_negative("bt", "centering", centering)
    stats.require("bt", "scores")
    groups, w, l = _pairs(stats, "bt", pairing)
    s = stats.scores
    losses = -F.logsigmoid(s[w] - s[l] - margin) + centering * (s[w] + s[l]).square()
    metrics = _reward_metrics(s[w], s[l])
    metrics["accuracy"] = metrics.pop("rewards/accuracy")
    return (*_per_group(losses, groups, w), metrics)
