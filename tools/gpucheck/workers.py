"""What several workers share: one rank's process groups, per-token log-probs of a Megatron model and of an
HF model, and whether a model is built from Transformer Engine layers.

Workers run in a fresh process (``python tools/gpu_check.py --worker NAME``); torch and rao_megatron are
imported inside the functions, so importing this module stays light (the dry run imports it).
"""

from __future__ import annotations

from typing import Any


def init_single_rank() -> None:
    """One NCCL rank and Megatron's TP1/PP1 groups (Context.worker sets RANK, MASTER_PORT, ...)."""
    from rao_megatron.parallel.startup import init_distributed
    from rao_megatron.parallel.state import initialize_model_parallel

    init_distributed(timeout_s=600)
    initialize_model_parallel(tp=1, pp=1)


def token_logprobs(model: Any, hidden: Any, labels: Any, vocab_size: int) -> Any:
    """Per-token log-probs ``[B, S]`` from final hidden states ``[B, S, H]`` and the output layer (TP1), as training does."""
    from rao_megatron.logprobs import vocab_parallel_logprobs
    from rao_megatron.models import output_weight

    b, s, h = hidden.shape
    return vocab_parallel_logprobs(hidden.reshape(b * s, h), output_weight(model), labels.reshape(b * s),
                                   vocab_size=vocab_size).view(b, s)


def te_layer_types(model: Any) -> set[str]:
    """The Transformer Engine classes among the model's modules' types (empty: the local layer spec)."""
    return {c.__name__ for m in model.modules() for c in type(m).__mro__ if c.__module__.startswith("transformer_engine")}


def random_ids(vocab_size: int) -> Any:
    """Two seeded random sequences of 64 token ids on CUDA (ids 0-2 left out: special tokens)."""
    import torch

    return torch.randint(3, vocab_size, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()


def hf_next_token_logprobs(hf: Any, ids: Any) -> Any:
    """Log-probs ``[B, S-1]`` an HF causal LM gives each next token of ``ids``, in fp32."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(hf(ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


def megatron_next_token_logprobs(chunks: list[Any], model: Any, ids: Any, vocab_size: int) -> Any:
    """The same ``[B, S-1]`` log-probs from a Megatron model (one chunk, TP1) through the training path."""
    import torch

    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    with torch.no_grad():
        return token_logprobs(model, chunks[0](ids, pos, None), labels, vocab_size).float()[:, :-1]
