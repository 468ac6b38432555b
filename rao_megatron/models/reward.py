"""Reward model: the policy's ``GPTModel`` with its vocab output layer replaced by a scalar head."""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from rao_megatron.models.hf_config import ModelArch
from rao_megatron.models.provider import build_gpt_model
from rao_megatron.parallel.device import compute_device


class ScalarHead(torch.nn.Module):
    """``values[S, B, 1] = hidden[S, B, H] @ weight[1, H]^T (+ bias)``, replicated over TP ranks.

    Called like Megatron's output layer (``(hidden, weight=None, ...) -> (out, None)``), so
    ``GPTModel.forward`` returns ``values[B, S, 1]`` at the last pipeline stage. The key
    ``output_layer.weight`` maps to HF ``score.weight`` of ``*ForSequenceClassification``.
    """

    def __init__(self, hidden_size: int, *, bias: bool = False, init_std: float | None = None,
                 seed: int = 0, sequence_parallel: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        std = init_std if init_std is not None else 1.0 / math.sqrt(hidden_size + 1)
        # A dedicated generator: every TP/DP rank builds the same head without any communication.
        # Drawn on the CPU (a CUDA generator would give other numbers), then placed on the compute device.
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(1, hidden_size, generator=gen, dtype=torch.float32) * std
        device = compute_device()
        self.weight = torch.nn.Parameter(weight.to(device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device)) if bias else None

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """hidden[S(/tp), B, H] -> (values[S, B, 1], None)."""
        if self.sequence_parallel:
            # The head is replicated, so each rank's grad of the full sequence is already complete.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return torch.nn.functional.linear(hidden, self.weight, self.bias), None


def build_reward_model(arch: ModelArch, *, pre_process: bool | None = None, post_process: bool | None = None,
                       vp_stage: int | None = None, use_te: bool | None = None,
                       params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                       head_bias: bool = False,
                       head_init_std: float | None = None, head_seed: int = 0, **kwargs: Any) -> GPTModel:
    """A ``GPTModel`` whose last stage outputs one value per token, ``[B, S, 1]``, from a ``ScalarHead``."""
    model = build_gpt_model(arch, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                            use_te=use_te, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                            share_embeddings_and_output_weights=False, **kwargs)
    if model.post_process:
        model.output_layer = ScalarHead(
            model.config.hidden_size, bias=head_bias, init_std=head_init_std, seed=head_seed,
            sequence_parallel=model.config.sequence_parallel, dtype=params_dtype)
    return model


def last_token_index(attention_mask: torch.Tensor | None = None,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Index ``[B]`` of each row's last real token from a ``[B, S]`` mask (1 = token) or ``lengths[B]``."""
    if lengths is not None:
        return lengths.long() - 1
    if attention_mask is None:
        raise ValueError("pass attention_mask or lengths")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    # max over masked positions: also right for left padding
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


def reward_scores(values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence reward ``[B]``: ``values[B, S, 1]`` (or ``[B, S]``) at the last non-pad token."""
    if values.dim() == 3:
        values = values.squeeze(-1)
    index = last_token_index(attention_mask, lengths)
    if (index < 0).any():
        raise ValueError("a sequence has no tokens (empty mask or length 0)")
    return values.gather(1, index.unsqueeze(1)).squeeze(1)
