"""Per-sequence statistics that every loss consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class SequenceStats:
    """Per-sequence 1-D tensors for N sequences (one entry per prompt ⊕ response).

    Attributes:
        policy_logps: R_θ(y) ``[N]``, sum of the response's token log-probs under the policy.
        ref_logps: R_ref(y) ``[N]`` under the frozen reference, or None.
        policy_prompt_logps: P_θ(x) ``[N]``, log π_θ(x − t0 | t0): the prompt after its first token.
        ref_prompt_logps: P_ref(x) ``[N]``, or None.
        lengths: ``[N]`` response token counts L(y) (> 0).
        rewards: ``[N]`` explicit rewards r, or None.
        group_ids: ``[N]`` int64; sequences of one prompt share an id (any values; order irrelevant).
        is_reference_answer: ``[N]`` bool marking GRAO's reference answer y, or None.
        scores: ``[N]`` reward-model outputs (for ``bt``), or None.
    """

    policy_logps: Tensor | None
    lengths: Tensor
    group_ids: Tensor
    ref_logps: Tensor | None = None
    policy_prompt_logps: Tensor | None = None
    ref_prompt_logps: Tensor | None = None
    rewards: Tensor | None = None
    is_reference_answer: Tensor | None = None
    scores: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.group_ids.shape[0] if self.group_ids.dim() == 1 else -1
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"SequenceStats.{f.name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dim() != 1 or value.shape[0] != n:
                raise ValueError(
                    f"SequenceStats.{f.name} must be 1-D with one entry per sequence "
                    f"(N={n} from group_ids), got shape {tuple(value.shape)}"
                )
        if n == 0:
            raise ValueError("SequenceStats holds no sequences")
        if self.group_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"SequenceStats.group_ids must be int64, got {self.group_ids.dtype}")
        if self.is_reference_answer is not None and self.is_reference_answer.dtype != torch.bool:
            raise TypeError("SequenceStats.is_reference_answer must be a bool tensor")

    @property
    def num_sequences(self) -> int:
        return int(self.group_ids.shape[0])

    def require(self, loss: str, *names: str) -> None:
        """Raise a clear error if any of the named fields is None."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"loss '{loss}' needs SequenceStats.{', SequenceStats.'.join(missing)}, "
                             f"which {'is' if len(missing) == 1 else 'are'} None")
