"""Model provider and HF <-> Megatron conversion at TP1/PP1 (config facts in-process, models on 1 rank)."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from rao_megatron.conversion import load_hf_state_dict_into_megatron, megatron_to_hf_state_dict
from rao_megatron.models import (
    LLAMA3_TINY_ROPE,
    build_gpt_model,
    build_reward_model,
    enable_hidden_state_output,
    output_weight,
    padded_vocab_size,
    reward_scores,
    tiny_hf_config,
    transformer_config_from_hf,
)
from rao_megatron.models.hf_config import llama3_inv_freq, rope_spec
from rao_megatron.parallel.launch import run_distributed
from rao_megatron.parallel.state import destroy_model_parallel, initialize_model_parallel

SEQ = 80  # > original_max_position_embeddings of LLAMA3_TINY_ROPE, so the scaled bands matter


def _run_initialised(test: Callable[..., None], args: tuple, kwargs: dict) -> None:
    initialize_model_parallel(tp=1, pp=1)
    try:
        test(*args, **kwargs)
    finally:
        destroy_model_parallel()


def single_rank(test: Callable[..., None]) -> Callable[..., None]:
    """Run the test body in a forked 1-rank gloo worker with Megatron's parallel state initialised.

    Not in-process: gloo groups created in the pytest process make later forked workers segfault.
    """

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        run_distributed(_run_initialised, 1, test, args, kwargs)

    return wrapper


def _hf_cases() -> dict[str, object]:
    return {
        "llama_llama3rope_tied": tiny_hf_config("llama", tie_word_embeddings=True, rope_theta=500000.0,
                                                rope_scaling=dict(LLAMA3_TINY_ROPE)),
        "llama_linear_rope": tiny_hf_config("llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "qwen2_bias_untied": tiny_hf_config("qwen2"),
    }


def _hf_model(cfg: object, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    if getattr(model.model.layers[0].self_attn.q_proj, "bias", None) is not None:
        with torch.no_grad():  # HF inits biases to zero; random ones test their mapping
            for layer in model.model.layers:
                for proj in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, proj).bias.normal_(0, 0.1)
    return model


def _tokens(vocab: int, batch: int = 2, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    return ids, torch.arange(seq).expand(batch, seq)


# ---------------------------------------------------------------- config mapping (no process group)


def test_padded_vocab_size() -> None:
    assert padded_vocab_size(250, 1) == 256
    assert padded_vocab_size(256, 2) == 256
    assert padded_vocab_size(257, 2) == 512
    assert padded_vocab_size(49152, 3) == 49152
    assert padded_vocab_size(128256, 8) == 128 * 8 * 126
    assert padded_vocab_size(100, 1, divisible_by=64) == 128


def test_llama_config_mapping(tmp_path) -> None:
    hf = tiny_hf_config("llama", num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                        intermediate_size=96, num_hidden_layers=4, initializer_range=0.01)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf.to_dict()))
    for source in (hf, hf.to_dict(), str(tmp_path), str(path)):
        c = transformer_config_from_hf(source, tp=2, pp=2)
        assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (4, 64, 96)
        assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (4, 2, 32)
        assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-5
        assert c.gated_linear_unit and c.activation_func is F.silu
        assert not c.add_bias_linear and not c.add_qkv_bias
        assert c.hidden_dropout == 0.0 and c.attention_dropout == 0.0
        assert c.init_method_std == 0.01
        assert c.tensor_model_parallel_size == 2 and c.pipeline_model_parallel_size == 2
        assert c.pipeline_dtype == torch.float32 and c.params_dtype == torch.float32


def test_qwen2_config_mapping_and_dtype() -> None:
    c = transformer_config_from_hf(tiny_hf_config("qwen2"), params_dtype=torch.bfloat16)
    assert c.add_qkv_bias and not c.add_bias_linear
    assert c.kv_channels == 16 and c.num_query_groups == 2
    assert c.bf16 and c.params_dtype == torch.bfloat16 and c.pipeline_dtype == torch.bfloat16


def test_rope_settings_from_transformers_4_and_5_layouts() -> None:
    v4 = {"architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}
    v5 = {"architectures": ["LlamaForCausalLM"], "rope_parameters": {"rope_theta": 500000.0, **v4["rope_scaling"]}}
    assert rope_spec(v4) == rope_spec(v5)
    assert rope_spec(v5).theta == 500000.0 and rope_spec(v5).factor == 32.0
    assert rope_spec({"rope_theta": 1e6}).rope_type == "default"


def test_llama3_inv_freq_matches_hf() -> None:
    cfg = tiny_hf_config("llama", rope_theta=500000.0, rope_scaling=dict(LLAMA3_TINY_ROPE))
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    spec = rope_spec(cfg.to_dict())
    base = 1.0 / (spec.theta ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    ours = llama3_inv_freq(base, spec)
    torch.testing.assert_close(ours, hf_inv_freq.float(), rtol=0, atol=0)
    ratio = ours / base  # all three bands occur: kept (1), interpolated, divided by factor (1/8)
    assert ratio[0] == 1 and ratio[-1] == 0.125 and 0.125 < ratio[1] < 1


@pytest.mark.parametrize("overrides, tp, pp, vpp, message", [
    (dict(architectures=["GPT2LMHeadModel"]), 1, 1, None, "GPT2LMHeadModel"),
    (dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72), 2, 1, None, "num_attention_heads=9"),
    (dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96), 2, 1, None, "num_key_value_heads"),
    (dict(num_hidden_layers=3), 1, 2, None, "num_hidden_layers=3"),
    (dict(num_hidden_layers=4), 1, 2, 4, "pp*vpp=8"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), 1, 1, None, "yarn"),
    (dict(hidden_act="gelu"), 1, 1, None, "gelu"),
], ids=["unknown_arch", "heads_tp", "groups_tp", "layers_pp", "layers_vpp", "rope_type", "activation"])
def test_config_errors_name_the_problem(overrides, tp, pp, vpp, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        transformer_config_from_hf(tiny_hf_config("llama", **overrides), tp=tp, pp=pp, vpp=vpp)
    if "GPT2" in message:
        assert "LlamaForCausalLM" in str(err.value) and "Qwen2ForCausalLM" in str(err.value)
    if "num_attention_heads=9" in message:
        assert "tp=2" in str(err.value)


# ---------------------------------------------------------------- models (1-rank process group)


@pytest.mark.parametrize("case", list(_hf_cases()))
@single_rank
def test_logits_match_hf_and_hidden_output(case: str) -> None:
    cfg = _hf_cases()[case]
    hf = _hf_model(cfg)
    ids, pos = _tokens(cfg.vocab_size)
    model = build_gpt_model(cfg).eval()
    assert model.share_embeddings_and_output_weights == cfg.tie_word_embeddings
    load_hf_state_dict_into_megatron(model, hf.state_dict(), cfg)
    with torch.no_grad():
        ref = hf(ids).logits
        logits = model(ids, pos, None)
    assert logits.shape == (2, SEQ, 256)  # vocab 250 padded to 256
    assert (logits[..., : cfg.vocab_size] - ref).abs().max() <= 1e-5
    assert torch.all(logits[..., cfg.vocab_size:] == 0)  # padded rows are zero

    enable_hidden_state_output(model)
    with torch.no_grad():
        hidden = model(ids, pos, None)
    assert hidden.shape == (2, SEQ, 64)
    torch.testing.assert_close(hidden @ output_weight(model).T, logits, rtol=0, atol=1e-6)
    enable_hidden_state_output(model, enabled=False)
    with torch.no_grad():
        assert torch.equal(model(ids, pos, None), logits)


@single_rank
def test_llama3_rope_scaling_is_applied() -> None:
    cfg = _hf_cases()["llama_llama3rope_tied"]
    hf = _hf_model(cfg)
    ids, pos = _tokens(cfg.vocab_size)
    model = build_gpt_model(cfg).eval()
    load_hf_state_dict_into_megatron(model, hf.state_dict(), cfg)
    spec = rope_spec(cfg.to_dict())
    model.rotary_pos_emb.inv_freq = 1.0 / (spec.theta ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    with torch.no_grad():
        unscaled = model(ids, pos, None)[..., : cfg.vocab_size]
        assert (unscaled - hf(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("case", list(_hf_cases()))
@single_rank
def test_round_trip_is_bit_exact(case: str) -> None:
    cfg = _hf_cases()[case]
    hf_sd = _hf_model(cfg).state_dict()
    model = build_gpt_model(cfg)
    load_hf_state_dict_into_megatron(model, hf_sd, cfg)
    back = megatron_to_hf_state_dict(model, cfg)
    expected = set(hf_sd) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert set(back) == expected
    for name, tensor in back.items():
        assert torch.equal(tensor, hf_sd[name]), name


@single_rank
def test_world_size_not_divisible_is_reported() -> None:
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by parallel.tp × parallel.pp = 2 × 1"):
        initialize_model_parallel(tp=2, pp=1)


@single_rank
def test_missing_hf_tensor_is_named() -> None:
    cfg = tiny_hf_config("qwen2")
    hf_sd = dict(_hf_model(cfg).state_dict())
    del hf_sd["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_proj.bias"):
        load_hf_state_dict_into_megatron(build_gpt_model(cfg), hf_sd, cfg)


@single_rank
def test_reward_model_matches_hf_sequence_classifier() -> None:
    cfg = tiny_hf_config("llama", num_labels=1, architectures=["LlamaForSequenceClassification"])
    torch.manual_seed(0)
    hf = LlamaForSequenceClassification(cfg).float().eval()
    ids, pos = _tokens(cfg.vocab_size, batch=3, seq=12)
    lengths = torch.tensor([12, 7, 3])
    ids = torch.where(torch.arange(12) < lengths[:, None], ids, cfg.pad_token_id)  # right padding
    model = build_reward_model(cfg).eval()
    assert not model.share_embeddings_and_output_weights
    assert load_hf_state_dict_into_megatron(model, hf.state_dict(), cfg) == []
    with torch.no_grad():
        values = model(ids, pos, None)
        ref = hf(ids).logits.squeeze(-1)
    assert values.shape == (3, 12, 1)
    mask = (ids != cfg.pad_token_id).long()
    torch.testing.assert_close(reward_scores(values, lengths=lengths), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(reward_scores(values, attention_mask=mask), ref, rtol=0, atol=1e-5)
    back = megatron_to_hf_state_dict(model, cfg)
    assert torch.equal(back["score.weight"], hf.state_dict()["score.weight"])


@single_rank
def test_reward_head_init_is_deterministic_and_kept_without_score() -> None:
    cfg = tiny_hf_config("llama")
    a, b = build_reward_model(cfg), build_reward_model(cfg)
    assert torch.equal(a.output_layer.weight, b.output_layer.weight)
    assert a.output_layer.weight.shape == (1, 64)
    assert abs(a.output_layer.weight.std().item() - 1 / 65 ** 0.5) < 0.05
    kept = load_hf_state_dict_into_megatron(a, _hf_model(cfg).state_dict(), cfg)  # a causal LM: no score
    assert kept == ["output_layer.weight"] and torch.equal(a.output_layer.weight, b.output_layer.weight)


def test_reward_scores_pick_last_real_token() -> None:
    values = torch.arange(12.0).reshape(2, 6, 1)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    assert reward_scores(values, attention_mask=right).tolist() == [2.0, 11.0]
    assert reward_scores(values, attention_mask=left).tolist() == [5.0, 10.0]
    assert reward_scores(values.squeeze(-1), lengths=torch.tensor([1, 4])).tolist() == [0.0, 9.0]
    with pytest.raises(ValueError, match="no tokens"):
        reward_scores(values, attention_mask=torch.zeros(2, 6))
