"""Group bookkeeping shared by the losses: group indices, per-group reductions, preference pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PAIRINGS = ("best_vs_rest", "all_pairs")


@dataclass
class Groups:
    """Dense group index of each sequence.

    Attributes:
        ids: ``[G]`` the distinct group ids, sorted.
        index: ``[N]`` int64 in [0, G): the group of each sequence.
        sizes: ``[G]`` number of sequences per group (K).
    """

    ids: Tensor
    index: Tensor
    sizes: Tensor

    def describe(self, g: int) -> str:
        """``group_id=…`` of dense group ``g``, for error messages."""
        return f"group_id={int(self.ids[g])}"

    @property
    def count(self) -> int:
        return int(self.sizes.shape[0])


def make_groups(group_ids: Tensor) -> Groups:
    """Map arbitrary group ids ``[N]`` to dense indices ``[N]`` and group sizes ``[G]``."""
    ids, index, sizes = torch.unique(group_ids, sorted=True, return_inverse=True, return_counts=True)
    return Groups(ids=ids, index=index, sizes=sizes)


def group_sum(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Sum ``values [M]`` into ``[num_groups]`` bins given ``index [M]``."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add(0, index, values)


def group_mean(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Mean of ``values [M]`` per group ``[num_groups]`` (groups with no entry give NaN)."""
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    counts = counts.index_add(0, index, torch.ones_like(values))
    return group_sum(values, index, num_groups) / counts


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` holds, as a 0-d tensor: NaN where it never holds.

    The same number as ``values[mask].mean()`` without the boolean selection, whose size the host would
    have to read first (a device sync on CUDA); an empty selection gives NaN, which the step's metric
    average skips (as a metric that was not reported).
    """
    values = values if values.is_floating_point() else values.float()
    return torch.where(mask, values, 0).sum() / mask.sum()


def group_max(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Max of ``values [M]`` per group ``[num_groups]``."""
    out = torch.full((num_groups,), float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, index, values, reduce="amax", include_self=True)


def best_index(groups: Groups, rewards: Tensor | None) -> Tensor:
    """Index ``[G]`` of each group's best sequence: highest reward, first one on ties.

    Without rewards the first sequence of each group is the preferred one (pair data stores
    chosen before rejected).
    """
    n = groups.index.shape[0]
    positions = torch.arange(n, device=groups.index.device)
    if rewards is None:
        is_best = torch.ones(n, dtype=torch.bool, device=positions.device)
    else:
        is_best = rewards == group_max(rewards, groups.index, groups.count)[groups.index]
    big = torch.full_like(positions, n)
    candidates = torch.where(is_best, positions, big)
    first = torch.full((groups.count,), n, dtype=positions.dtype, device=positions.device)
    return first.scatter_reduce(0, groups.index, candidates, reduce="amin", include_self=True)


def preference_pairs(groups: Groups, rewards: Tensor | None, pairing: str = "best_vs_rest",
                     loss: str = "pairwise") -> tuple[Tensor, Tensor]:
    """Indices ``(chosen [P], rejected [P])`` of the preference pairs in a batch.

    ``best_vs_rest``: (best, j) for every other j of the group with a strictly lower reward.
    ``all_pairs``: (i, j) for every i, j of one group with r_i > r_j. Without rewards, the first
    sequence of a group is preferred to each other one (only ``best_vs_rest`` is defined then).
    Ties form no pair. A group of one response, or whose rewards are all equal, is an error: a
    pairwise loss has nothing to learn from it and dropping it silently would hide a data problem.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    single = groups.sizes < 2
    if bool(single.any()):
        g = int(torch.nonzero(single)[0])
        raise ValueError(f"loss '{loss}' needs at least 2 responses per group; {groups.describe(g)} has "
                         f"{int(groups.sizes[g])}")
    idx = groups.index
    n = idx.shape[0]
    if rewards is None:
        if pairing == "all_pairs":
            raise ValueError(f"loss '{loss}': pairing='all_pairs' needs rewards to order the responses")
        best = best_index(groups, None)
        rejected = torch.nonzero(torch.arange(n, device=idx.device) != best[idx]).squeeze(1)
        return best[idx[rejected]], rejected
    if pairing == "best_vs_rest":
        best = best_index(groups, rewards)
        rejected = torch.nonzero(rewards < rewards[best[idx]]).squeeze(1)
        chosen = best[idx[rejected]]
    else:
        ordered = (idx[:, None] == idx[None, :]) & (rewards[:, None] > rewards[None, :])
        chosen, rejected = torch.nonzero(ordered, as_tuple=True)
    has_pair = torch.zeros(groups.count, dtype=torch.bool, device=idx.device)
    has_pair[idx[chosen]] = True
    if not bool(has_pair.all()):
        g = int(torch.nonzero(~has_pair)[0])
        raise ValueError(f"loss '{loss}': all {int(groups.sizes[g])} rewards of {groups.describe(g)} are "
                         "equal, so it has no preference pair (filter tied groups in the data)")
    return chosen, rejected
