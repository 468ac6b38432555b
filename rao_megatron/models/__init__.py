"""GPTModel provider from HF configs (Llama family, Qwen2, Qwen3, Qwen3-MoE), final-hidden-state output, reward head."""

from rao_megatron.models.hf_config import (
    LLAMA3_TINY_ROPE,
    SUPPORTED_ARCHITECTURES,
    ModelArch,
    hf_config_to_dict,
    model_family,
    padded_vocab_size,
    tiny_hf_config,
    transformer_config_from_hf,
)
from rao_megatron.models.provider import (
    as_chunks,
    build_gpt_model,
    enable_hidden_state_output,
    hidden_state_output_enabled,
    output_weight,
    unwrap_model,
)
from rao_megatron.models.reward import ScalarHead, build_reward_model, last_token_index, reward_scores

__all__ = [
    "LLAMA3_TINY_ROPE",
    "SUPPORTED_ARCHITECTURES",
    "ModelArch",
    "ScalarHead",
    "as_chunks",
    "build_gpt_model",
    "build_reward_model",
    "enable_hidden_state_output",
    "hf_config_to_dict",
    "hidden_state_output_enabled",
    "last_token_index",
    "model_family",
    "output_weight",
    "padded_vocab_size",
    "reward_scores",
    "tiny_hf_config",
    "transformer_config_from_hf",
    "unwrap_model",
]
