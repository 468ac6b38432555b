"""Loss library: pure functions of per-sequence log-prob sums -> ``(loss, metrics)``. No Megatron here.

    from rao_megatron.losses import SequenceStats, get_loss
    loss, metrics = get_loss("rao")(stats, beta=0.1, z0=50.0)
"""

from . import grao, pairwise, rao, sft  # noqa: F401  (registration side effects)
from .groups import PAIRINGS, make_groups, preference_pairs
from .registry import LOSSES, BoundLoss, LossSpec, get_loss
from .stats import SequenceStats

__all__ = ["LOSSES", "PAIRINGS", "BoundLoss", "LossSpec", "SequenceStats", "get_loss", "make_groups", "preference_pairs"]
