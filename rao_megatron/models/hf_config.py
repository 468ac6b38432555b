"""Hugging Face config -> Megatron-Core ``TransformerConfig`` for the Llama and Qwen2 families."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

# HF architecture name -> model family (the conversion table and the attention-bias layout follow it).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",  # Llama-2/3/3.1, SmolLM2, EuroLLM
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",  # Qwen2 / Qwen2.5: qkv bias
    "LlamaForSequenceClassification": "llama",  # reward models
    "MistralForSequenceClassification": "llama",
    "Qwen2ForSequenceClassification": "qwen2",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def hf_config_to_dict(hf_config: Any) -> dict[str, Any]:
    """A plain dict from a ``PretrainedConfig``, a dict, a config.json path or a checkpoint dir."""
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if isinstance(hf_config, (str, os.PathLike)):
        path = os.fspath(hf_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return json.load(f)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"expected a transformers config, dict or path, got {type(hf_config).__name__}")


def model_family(cfg: dict[str, Any]) -> str:
    """'llama' or 'qwen2' from ``architectures`` (or ``model_type``); ValueError for anything else."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    if not archs and cfg.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[cfg["model_type"]]
    name = ", ".join(archs) if archs else f"model_type={cfg.get('model_type')!r}"
    raise ValueError(f"unsupported architecture {name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding settings: base, HF ``rope_type`` and its parameters."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_spec(cfg: dict[str, Any]) -> RopeSpec:
    """Read rope settings from transformers 4.x (``rope_theta`` + ``rope_scaling``) or 5.x (``rope_parameters``)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "llama3", "linear"):
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, llama3, linear")
    if rope_type == "default":
        return RopeSpec(theta=float(theta))
    return RopeSpec(
        theta=float(theta), rope_type=rope_type, factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def llama3_inv_freq(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    """Llama-3 frequency scaling of ``inv_freq[D/2]``, as HF ``_compute_llama3_parameters`` does."""
    low_freq_wavelen = spec.original_max_position_embeddings / spec.low_freq_factor
    high_freq_wavelen = spec.original_max_position_embeddings / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (spec.original_max_position_embeddings / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def padded_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Vocab rounded up to a multiple of ``divisible_by * tp``, as Megatron pads it."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def _check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if by < 1 or value % by != 0:
        raise ValueError(f"{name}={value} is not divisible by {by_name}={by}")


def transformer_config_from_hf(hf_config: Any, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                               params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                               **overrides: Any) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for an HF Llama/Mistral/Qwen2 config at the given TP/PP/VPP.

    ``overrides`` are passed to ``TransformerConfig`` last (e.g. ``recompute_granularity``).
    """
    cfg = hf_config_to_dict(hf_config)
    family = model_family(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if family == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ValueError("Llama configs with attention_bias/mlp_bias are not supported")
    rope_spec(cfg)  # rejects unsupported rope types early
    # Mistral v0.1's sliding_window (4096) is not mapped: attention is fully causal, which is the same
    # as long as sequences are no longer than the window.
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    groups = cfg.get("num_key_value_heads") or heads
    layers = cfg["num_hidden_layers"]
    _check_divisible("num_attention_heads", heads, "tp", tp)
    _check_divisible("num_key_value_heads (query groups)", groups, "tp", tp)
    _check_divisible("num_attention_heads", heads, "num_key_value_heads", groups)
    _check_divisible("num_hidden_layers", layers, "pp", pp)
    vpp = vpp if vpp and vpp > 1 else None
    if vpp is not None:
        if pp < 2:
            raise ValueError(f"virtual pipeline size vpp={vpp} needs pp > 1, got pp={pp}")
        _check_divisible("num_hidden_layers", layers, "pp*vpp", pp * vpp)
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tp > 1 (it splits the sequence over the TP group)")
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=cfg.get("head_dim") or hidden // heads,
        normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=family == "qwen2",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=not on_gpu,
        # Fused kernels need CUDA (and TE/apex); the unfused paths give the same numbers.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def tiny_hf_config(family: str = "llama", **overrides: Any) -> Any:
    """A tiny random-init ``transformers`` config for tests: 2 layers, hidden 64, 4 heads / 2 KV groups.

    llama: untied, plain rope (pass ``tie_word_embeddings=True`` or ``rope_scaling=LLAMA3_TINY_ROPE``);
    qwen2: untied, qkv bias.
    """
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if family == "llama":
        common.update(rope_theta=10000.0, architectures=["LlamaForCausalLM"])
        common.update(overrides)
        return LlamaConfig(**common)
    if family == "qwen2":
        common.update(rope_theta=1000000.0, architectures=["Qwen2ForCausalLM"])
        common.update(overrides)
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny family {family!r}; use 'llama' or 'qwen2'")


# Llama-3.1-style scaling squeezed to tiny context lengths, so that every frequency band
# (kept, interpolated, divided by factor) occurs with head_dim 16.
LLAMA3_TINY_ROPE: dict[str, Any] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
