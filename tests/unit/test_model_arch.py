"""``ModelArch.from_hf``: one typed architecture from any form of an HF config, checked once."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from rao_megatron.models import ModelArch, tiny_hf_config
from rao_megatron.models.hf_config import MoeSpec, RopeSpec
from rao_megatron.models.hf_mappings import ModelDims


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_every_input_form_gives_the_same_arch(family: str, tmp_path: Path) -> None:
    hf = tiny_hf_config(family)
    (tmp_path / "config.json").write_text(json.dumps(hf.to_dict()))
    arch = ModelArch.from_hf(hf)
    for source in (hf.to_dict(), tmp_path / "config.json", str(tmp_path / "config.json"), str(tmp_path)):
        assert ModelArch.from_hf(source) == arch
    assert ModelArch.from_hf(arch) is arch  # idempotent
    assert arch.hf_dict == hf.to_dict() and arch.to_transformers() is hf
    assert pickle.loads(pickle.dumps(ModelArch.from_hf(hf.to_dict()))) == arch  # conversion jobs carry it


def test_fields() -> None:
    qwen3 = ModelArch.from_hf(tiny_hf_config("qwen3"))
    assert qwen3.family == "qwen3" and qwen3.qk_layernorm and not qwen3.qkv_bias and qwen3.moe is None
    assert qwen3.dims == ModelDims(num_heads=4, num_query_groups=2, head_dim=32, vocab_size=250)
    assert (qwen3.num_layers, qwen3.hidden_size, qwen3.ffn_hidden_size, qwen3.vocab_size) == (2, 64, 128, 250)
    assert qwen3.tie_word_embeddings and qwen3.rms_norm_eps == 1e-6 and qwen3.max_position_embeddings == 128
    assert qwen3.rope == RopeSpec(theta=1000000.0)
    moe = ModelArch.from_hf(tiny_hf_config("qwen3_moe"))
    assert moe.moe == MoeSpec(num_experts=4, top_k=2, ffn_hidden_size=32, norm_topk_prob=True,
                              router_aux_loss_coef=0.001)
    assert moe.dims.num_experts == 4 and not moe.tie_word_embeddings
    qwen2 = ModelArch.from_hf(tiny_hf_config("qwen2"))
    assert qwen2.qkv_bias and not qwen2.qk_layernorm and qwen2.dims.head_dim == 16
    placed = qwen2.dims.placed(2, 1)
    assert (placed.tp_size, placed.tp_rank, placed.etp_size, placed.etp_rank) == (2, 1, 2, 1)
    assert ModelDims.from_hf(tiny_hf_config("qwen2"), 2, 1) == placed
    # from a plain dict: the transformers config is rebuilt from it
    assert type(ModelArch.from_hf(tiny_hf_config("llama").to_dict()).to_transformers()).__name__ == "LlamaConfig"


@pytest.mark.parametrize("family, overrides, message", [
    ("llama", dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture GPT2LMHeadModel; supported: "),
    ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     "unsupported rope_type 'yarn'; supported: default, llama3, linear"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported (SwiGLU with silu only)"),
    ("qwen3", dict(attention_bias=True), "qwen3 configs with attention_bias/mlp_bias are not supported"),
    ("qwen3", dict(use_sliding_window=True),
     "qwen3 configs with use_sliding_window=true are not supported (full causal attention)"),
    ("qwen3_moe", dict(mlp_only_layers=[1]), "Qwen3-MoE configs with dense layers (decoder_sparse_step != 1 or "
                                             "mlp_only_layers) are not supported: every layer must be a MoE layer"),
    ("qwen3_moe", dict(num_experts_per_tok=5), "num_experts_per_tok=5 must be between 1 and num_experts=4"),
], ids=["arch", "rope", "activation", "bias", "sliding_window", "dense_layers", "top_k"])
def test_a_bad_config_is_one_line(family: str, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        ModelArch.from_hf(tiny_hf_config(family, **overrides).to_dict())
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_unknown_input_type() -> None:
    with pytest.raises(TypeError, match="expected a transformers config, dict or path, got int"):
        ModelArch.from_hf(3)


def test_hf_dict_is_what_checkpoints_recorded() -> None:
    """``hf_dict`` of a parsed ``transformers`` config is its ``to_dict()`` at the time of asking, as the
    trainer's ``rao_model.json`` recorded it before: HF's ``from_config`` (the random init) sets ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    arch = ModelArch.from_hf(tiny_hf_config("llama"))
    AutoModelForCausalLM.from_config(arch.to_transformers(), dtype=torch.float32)
    assert arch.hf_dict == arch.to_transformers().to_dict() and arch.hf_dict["dtype"] == "float32"
