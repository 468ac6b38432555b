"""Supervised fine-tuning: token-mean negative log-likelihood of the responses."""

from __future__ import annotations

from torch import Tensor

from .groups import group_sum, make_groups
from .registry import register
from .stats import SequenceStats


@register("sft", formula="−Σ_i R_θ(y_i) / Σ_i L(y_i)", needs_reference=False, needs_rewards=False,
          pairwise=False, normalizer_kind="tokens")
def sft_terms(stats: SequenceStats) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-group NLL sums ``[G]`` and token counts ``[G]``: their ratio is the token-mean NLL."""
    stats.require("sft", "policy_logps")
    groups = make_groups(stats.group_ids)
    nll = group_sum(-stats.policy_logps, groups.index, groups.count)
    tokens = group_sum(stats.lengths.to(nll.dtype), groups.index, groups.count)
    mean_nll = nll.detach().sum() / tokens.sum()
    # ppl in fp64 on the device: the number math.exp gives on the host (the exponent is capped at 50)
    return nll, tokens, {"nll": mean_nll, "ppl": mean_nll.double().clamp(max=50.0).exp(),
                         "tokens": tokens.sum()}

