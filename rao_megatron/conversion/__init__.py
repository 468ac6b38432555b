"""HF <-> Megatron-Core conversion: mapping tables per model family and their TP/PP application."""

from rao_megatron.models.hf_mappings import (
    FAMILY_MAPPINGS,
    QKV,
    ColumnParallel,
    GatedMLP,
    ModelDims,
    ParamMapping,
    RowParallel,
    VocabParallel,
    hf_checkpoint_layout,
    llama_mappings,
    mappings_for,
    qwen2_mappings,
    qwen3_mappings,
    qwen3_moe_mappings,
    replicated,
)
from rao_megatron.models.hf_state import (
    load_hf_state_dict_into_megatron,
    megatron_to_hf_shard,
    megatron_to_hf_state_dict,
)

__all__ = [
    "FAMILY_MAPPINGS",
    "QKV",
    "ColumnParallel",
    "GatedMLP",
    "ModelDims",
    "ParamMapping",
    "RowParallel",
    "VocabParallel",
    "hf_checkpoint_layout",
    "llama_mappings",
    "load_hf_state_dict_into_megatron",
    "mappings_for",
    "megatron_to_hf_shard",
    "megatron_to_hf_state_dict",
    "qwen2_mappings",
    "qwen3_mappings",
    "qwen3_moe_mappings",
    "replicated",
]
