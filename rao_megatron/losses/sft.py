"""Supervised fine-tuning: token-mean negative log-likelihood of the responses."""

from __future__ import annotations

import math

from torch import Tensor

from .groups import group_sum, make_groups
from .registry import register
from .stats import SequenceStats


@register("sft", formula="−Σ_i R_θ(y_i) / Σ_i L(y_i)", needs_reference=False, needs_rewards=False,
          pairwise=False, normalizer_kind="tokens")
def sft_terms(stats: SequenceStats) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Per-group NLL sums ``[G]`` and token counts ``[G]``: their ratio is the token-mean NLL."""
    stats.require("sft", "policy_logps")
    groups = make_groups(stats.group_ids)
    nll = group_sum(-stats.policy_logps, groups.index, groups.count)
    tokens = group_sum(stats.lengths.to(nll.dtype), groups.index, groups.count)
    mean_nll = float(nll.detach().sum() / tokens.sum())
    return nll, tokens, {"nll": mean_nll, "ppl": math.exp(min(mean_nll, 50.0)),
                         "tokens": float(tokens.sum())}

