"""Qwen3 and Qwen3-MoE without worker processes: HF config -> Megatron settings (router semantics, q/k norm,
expert layout), the mapping tables against real HF checkpoint files, the fused in-memory expert view, and the
config keys ``parallel.ep`` / ``parallel.etp`` / ``model.moe_aux_loss_coeff`` with their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rao_megatron.config import ConfigError, ParallelConfig, load_config
from rao_megatron.conversion.hf_io import ConversionError, LazyHFStateDict
from rao_megatron.conversion.validate import (
    check_hf_tensors,
    check_layout,
    conversion_world_size,
    expected_hf_shapes,
    mapped_hf_names,
)
from rao_megatron.models.hf_config import (
    check_expert_layout,
    hf_config_to_dict,
    model_family,
    moe_spec,
    tiny_hf_config,
    transformer_config_from_hf,
)
from rao_megatron.models.hf_mappings import ModelDims, hf_checkpoint_layout, mappings_for
from rao_megatron.parallel.state import check_world

# ---------------------------------------------------------------- HF config -> TransformerConfig


def test_qwen3_dense_settings() -> None:
    cfg = tiny_hf_config("qwen3")
    tc = transformer_config_from_hf(cfg, tp=2)
    assert model_family(hf_config_to_dict(cfg)) == "qwen3"
    assert tc.qk_layernorm and not tc.add_qkv_bias and tc.num_moe_experts is None
    assert tc.kv_channels == 32 and tc.num_attention_heads * tc.kv_channels != tc.hidden_size  # as Qwen3-0.6B
    assert cfg.tie_word_embeddings  # the small Qwen3 sizes tie them
    with pytest.raises(ValueError, match="attention_bias"):
        transformer_config_from_hf(tiny_hf_config("qwen3", attention_bias=True))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_router_matches_hf_semantics(norm_topk_prob: bool) -> None:
    """HF: softmax(logits) in fp32, top k, renormalised iff norm_topk_prob. Megatron: top-k logits then softmax
    (the same numbers as renormalising) or, with pre-softmax, softmax then top-k (HF without renormalising)."""
    tc = transformer_config_from_hf(tiny_hf_config("qwen3_moe", norm_topk_prob=norm_topk_prob), ep=2, etp=1)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 32)
    assert tc.moe_router_pre_softmax is (not norm_topk_prob)
    assert tc.moe_router_score_function == "softmax" and tc.moe_router_dtype == "fp32"
    assert tc.moe_router_load_balancing_type == "aux_loss" and tc.moe_aux_loss_coeff == pytest.approx(0.001)
    assert tc.moe_expert_capacity_factor is None  # no token dropping, as HF
    assert tc.moe_shared_expert_intermediate_size is None and tc.qk_layernorm
    assert (tc.expert_model_parallel_size, tc.expert_tensor_parallel_size) == (2, 1)
    # CPU: the all-gather dispatcher (all-to-all needs CUDA streams) and one MLP per expert
    assert tc.moe_token_dispatcher_type == "allgather" and not tc.moe_grouped_gemm


def test_saved_config_json_with_num_local_experts(tmp_path: Path) -> None:
    """transformers 5 writes ``num_local_experts`` where Qwen's config.json has ``num_experts``: both read."""
    cfg = tiny_hf_config("qwen3_moe")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    qwen_style = {k: v for k, v in saved.items() if k != "num_local_experts"} | {"num_experts": 4}
    for d in (saved, qwen_style):
        assert moe_spec(d).num_experts == 4 and ModelDims.from_hf(d).num_experts == 4


def test_expert_layout_errors() -> None:
    moe = hf_config_to_dict(tiny_hf_config("qwen3_moe"))
    dense = hf_config_to_dict(tiny_hf_config("qwen3"))
    check_expert_layout(moe, tp=2, ep=4, etp=2)
    check_expert_layout(dense, tp=2, ep=1, etp=2)  # etp = tp: nothing to lay out differently
    with pytest.raises(ValueError, match=r"parallel.ep=3 must divide num_experts=4; valid: 1, 2, 4"):
        check_expert_layout(moe, ep=3)
    with pytest.raises(ValueError, match="parallel.etp=3 must divide moe_intermediate_size=32"):
        check_expert_layout(moe, etp=3)
    with pytest.raises(ValueError, match="qwen3 is dense"):
        check_expert_layout(dense, ep=2)
    with pytest.raises(ValueError, match="every layer must be a MoE layer"):
        moe_spec(hf_config_to_dict(tiny_hf_config("qwen3_moe", mlp_only_layers=[1])))
    with pytest.raises(ConversionError, match="--ep=8 must divide"):
        check_layout(moe, tp=1, pp=1, ep=8)
    check_layout(moe, tp=2, pp=2, ep=2, etp=1)


def test_world_sizes_for_expert_layouts() -> None:
    # the converter adds data-parallel ranks when EP x ETP does not fit in TP
    assert conversion_world_size(1, 1, ep=2) == 2
    assert conversion_world_size(2, 1, ep=2, etp=1) == 2
    assert conversion_world_size(1, 2, ep=2, etp=2) == 8
    assert conversion_world_size(2, 2) == 4
    check_world(4, tp=1, pp=2, ep=2)
    with pytest.raises(ValueError, match="parallel.etp × parallel.ep × parallel.pp = 1 × 4 × 1"):
        check_world(2, tp=1, pp=1, ep=4)


# ---------------------------------------------------------------- mapping tables vs real checkpoint files


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
@pytest.mark.parametrize("task", ["policy", "rm"])
def test_mapping_table_reads_exactly_the_checkpoint_tensors(family: str, task: str, tmp_path: Path) -> None:
    cfg = tiny_hf_config(family)
    d = hf_config_to_dict(cfg)
    assert mapped_hf_names(d, task) == set(expected_hf_shapes(d, task)) - {"score.weight"}  # a new RM head is optional
    if task == "policy":
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
        shapes = LazyHFStateDict(tmp_path).shapes()
        assert check_hf_tensors(shapes, d, task) == []
        assert {k: tuple(v) for k, v in shapes.items()} == expected_hf_shapes(d, task)


def test_mapping_table_of_qwen3_moe() -> None:
    table = {m.megatron: m for m in mappings_for(tiny_hf_config("qwen3_moe"))}
    assert not any(".mlp.linear_fc" in name for name in table)  # no dense MLP
    router = table["decoder.layers.{layer}.mlp.router.weight"]
    assert router.hf_names(3) == ["model.layers.3.mlp.gate.weight"] and not router.tp_sharded
    for fc1 in ("decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
                "decoder.layers.{layer}.mlp.experts.linear_fc1.weight{expert}"):  # local spec, TE grouped GEMM
        m = table[fc1]
        assert m.is_expert and m.hf_names(1, 7) == ["model.layers.1.mlp.experts.7.gate_proj.weight",
                                                     "model.layers.1.mlp.experts.7.up_proj.weight"]
        match = m.megatron_pattern().match(fc1.format(layer=1, expert=2))
        assert match and match.group("layer") == "1" and match.group("expert") == "2"
    q_norm = table["decoder.layers.{layer}.self_attention.q_layernorm.weight"]
    assert q_norm.hf_names(0) == ["model.layers.0.self_attn.q_norm.weight"]


def test_expert_shards_over_the_expert_tp_group() -> None:
    """fc1 of one expert at ETP2: each shard is [gate_shard; up_shard]; EP rank 1 of 2 holds experts 2, 3."""
    dims = ModelDims.from_hf(tiny_hf_config("qwen3_moe"), tp_size=1, ep_size=2, ep_rank=1, etp_size=2, etp_rank=1)
    assert dims.num_local_experts == 2 and dims.global_expert(0) == 2
    table = {m.megatron: m for m in mappings_for(tiny_hf_config("qwen3_moe"))}
    fc1 = table["decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight"]
    gate, up = torch.arange(32 * 4.0).view(32, 4), -torch.arange(32 * 4.0).view(32, 4)
    shard = fc1.to_megatron([gate, up], dims.for_experts())
    assert torch.equal(shard, torch.cat([gate[16:], up[16:]]))
    other = fc1.to_megatron([gate, up], dataclass_replace(dims.for_experts(), tp_rank=0))
    back = fc1.to_hf([other, shard], dims.for_experts())
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


def dataclass_replace(dims: ModelDims, **changes: int) -> ModelDims:
    import dataclasses

    return dataclasses.replace(dims, **changes)


def test_fused_in_memory_experts_read_as_the_checkpoint_files(tmp_path: Path) -> None:
    """transformers 5 fuses the experts in memory (gate_up_proj [E, 2I, H]); the view gives the file tensors."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("qwen3_moe"))
    model.save_pretrained(tmp_path)
    files = LazyHFStateDict(tmp_path)
    view = hf_checkpoint_layout(model.state_dict())
    assert set(view) == set(files)
    for name in files:
        assert torch.equal(view[name], files[name]), name
    dense = AutoModelForCausalLM.from_config(tiny_hf_config("qwen3")).state_dict()
    assert hf_checkpoint_layout(dense) is dense


# ---------------------------------------------------------------- config keys


def test_parallel_ep_etp_and_aux_coefficient_keys() -> None:
    cfg = load_config(None, ["model.preset=tiny-qwen3-moe", "parallel.ep=2", "parallel.etp=1",
                             "model.moe_aux_loss_coeff=0.01"])
    assert (cfg.parallel.ep, cfg.parallel.etp, cfg.model.moe_aux_loss_coeff) == (2, 1, 0.01)
    assert ParallelConfig().ep == 1 and ParallelConfig().etp is None
    load_config(None, ["model.preset=tiny-qwen3", "parallel.tp=2", "parallel.etp=2"])  # etp = tp: fine
    with pytest.raises(ConfigError, match=r"'parallel.ep'.*tiny-llama is dense"):
        load_config(None, ["parallel.ep=2"])
    with pytest.raises(ConfigError, match="'parallel.ep'.*must be >= 1"):
        load_config(None, ["model.preset=tiny-qwen3-moe", "parallel.ep=0"])
    with pytest.raises(ConfigError, match="'model.moe_aux_loss_coeff'.*must be >= 0"):
        load_config(None, ["model.preset=tiny-qwen3-moe", "model.moe_aux_loss_coeff=-1"])
    with pytest.raises(ConfigError, match="'model.preset' .*must be one of"):
        load_config(None, ["model.preset=tiny-qwen4"])


def test_model_dependent_layout_checks() -> None:
    from rao_megatron.training.model_init import check_model_layout, moe_aux_loss_coeff

    moe, dense = tiny_hf_config("qwen3_moe"), tiny_hf_config("qwen3")
    cfg = load_config(None, ["model.preset=tiny-qwen3-moe", "parallel.ep=4"])
    check_model_layout(cfg, moe)
    assert moe_aux_loss_coeff(cfg, moe) == pytest.approx(0.001) and moe_aux_loss_coeff(cfg, dense) is None
    cfg = load_config(None, ["model.preset=tiny-qwen3-moe", "model.moe_aux_loss_coeff=0"])
    assert moe_aux_loss_coeff(cfg, moe) == 0.0
    with pytest.raises(ConfigError, match=r"config key 'parallel.ep': parallel.ep=8 must divide num_experts=4"):
        check_model_layout(load_config(None, ["model.preset=tiny-qwen3-moe", "parallel.ep=8"]), moe)
    with pytest.raises(ConfigError, match="'parallel.ep'.*qwen3 is dense"):  # a dense model from a file
        check_model_layout(load_config(None, ["model.preset=tiny-qwen3-moe", "parallel.ep=2"]), dense)


# ---------------------------------------------------------------- the cluster configs and their arithmetic

REPO = Path(__file__).resolve().parents[2]
#: the released models' config.json values that docs/cluster.md's arithmetic uses
QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
                intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu")
QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                     hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, router_aux_loss_coef=0.001, decoder_sparse_step=1,
                     mlp_only_layers=[], tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     hidden_act="silu")


def _count(shapes: dict[str, tuple[int, ...]], where: str = "") -> int:
    return sum(int(torch.tensor(s).prod()) for name, s in shapes.items() if where in name)


def test_cluster_configs_fit_their_models_and_the_documented_sizes() -> None:
    for name, model, layout in (("rao_qwen3_8b", QWEN3_8B, dict(tp=2, pp=1, ep=1, etp=None)),
                                ("rao_qwen3_30b_a3b", QWEN3_30B_A3B, dict(tp=4, pp=1, ep=8, etp=1))):
        cfg = load_config(REPO / "examples/configs" / f"{name}.yaml")
        p = cfg.parallel
        assert (p.tp, p.pp, p.ep, p.etp) == tuple(layout.values()) and p.sequence_parallel
        assert cfg.model.dtype == "bf16" and cfg.train.reference == "cached" and cfg.checkpoint.resume == "auto"
        check_layout(model, **layout)
        transformer_config_from_hf(model, **layout, sequence_parallel=True)
    shapes = expected_hf_shapes(QWEN3_8B, "policy")
    assert _count(shapes) / 1e9 == pytest.approx(8.19, abs=0.005)
    shapes = expected_hf_shapes(QWEN3_30B_A3B, "policy")
    total, experts = _count(shapes), _count(shapes, ".mlp.experts.")
    assert (total / 1e9, experts / 1e9) == (pytest.approx(30.53, abs=0.005), pytest.approx(28.99, abs=0.005))
    assert (total - experts + experts * 8 / 128) / 1e9 == pytest.approx(3.35, abs=0.005)  # active per token
    assert 12 * experts / 8 / 1e9 == pytest.approx(43.5, abs=0.05)  # one node: the experts' Adam states per GPU


def test_nemo_run_pipeline_takes_the_qwen3_configs_and_ep(tmp_path: Path) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("rao_nemo_pipeline_q3", REPO / "examples/nemo_run/pipeline.py")
    p = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = p  # dataclasses resolve the module's annotations through sys.modules
    try:
        spec.loader.exec_module(p)
    finally:
        del sys.modules[spec.name]
    s = p.PipelineSettings(work_dir=tmp_path, steps=("reference", "rao"), hf_model=str(tmp_path / "hf"),
                           init_checkpoint=str(tmp_path / "ckpt"), policy_data=str(tmp_path / "ann.jsonl"),
                           rao_config=str(REPO / "examples/configs/rao_qwen3_30b_a3b.yaml"), ep=8, tp=4)
    for module, args in p.step_commands(s).values():
        assert args[0] == "--config" and "parallel.ep=8" in args
        assert load_config(args[1], args[2:]).parallel.ep == 8, module
    assert p.parser().parse_args(["--ep", "8"]).ep == 8
