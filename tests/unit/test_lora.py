"""LoRA adapters on one rank: a fresh adapter leaves the model as it was, adapters off is the base, a merged
adapter computes what the unmerged one did, the init does not depend on the layout, and the settings are checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rao_megatron.models.lora import TARGETS, LoraSpec
from rao_megatron.parallel.launch import run_distributed


def _forward_checks(out_path: str) -> None:
    """Worker (one rank): logits of the base, a fresh LoRA model, one with non-zero B (on, off, merged)."""
    from rao_megatron.models import lora
    from rao_megatron.models.hf_state import load_hf_state_dict_into_megatron
    from rao_megatron.models.provider import as_chunks, enable_hidden_state_output
    from rao_megatron.parallel.state import initialize_model_parallel
    from rao_megatron.training.engine import build_model_chunks
    from tests.distributed.engine_cases import schedule_forward, tiny_model

    initialize_model_parallel(tp=1, pp=1)
    cfg, sd = tiny_model()
    base = build_model_chunks(cfg, task="policy", wrap_ddp=False)
    model = build_model_chunks(cfg, task="policy", wrap_ddp=False, lora=LoraSpec(rank=4, alpha=8), lora_seed=3)
    for chunks in (base, model):
        load_hf_state_dict_into_megatron(chunks, sd, cfg)
        enable_hidden_state_output(chunks, False)  # logits
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {"base": schedule_forward(base, ids), "fresh": schedule_forward(model, ids)}
    bare = as_chunks(model)[0]
    out["trainable"] = sorted(n for n, p in bare.named_parameters() if p.requires_grad)
    out["A_stats"] = [(a.A.abs().max().item(), a.A.shape[1]) for _, a in lora.adapters(model)]
    gen = torch.Generator().manual_seed(1)
    for _, a in lora.adapters(model):
        a.B.data.normal_(0, 0.05, generator=gen)
    out["adapted"] = schedule_forward(model, ids)
    with lora.adapters_disabled(model):
        out["off"] = schedule_forward(model, ids)
    out["back_on"] = schedule_forward(model, ids)
    with lora.stashed_adapters(model):
        out["stashed"] = schedule_forward(model, ids)
        out["stashed_count"] = sum(1 for _ in lora.adapters(model))
    out["count_after_stash"] = sum(1 for _ in lora.adapters(model))
    out["merged_count"] = lora.merge_lora(model)
    out["merged"] = schedule_forward(model, ids)
    out["left"] = [n for n, _ in bare.named_parameters() if ".lora." in n]
    torch.save(out, out_path)


@pytest.fixture(scope="module")
def forwards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("lora") / "out.pt"
    run_distributed(_forward_checks, 1, str(path))
    return torch.load(path, weights_only=False)


def test_a_fresh_adapter_leaves_the_model_as_it_was(forwards: dict[str, Any]) -> None:
    assert torch.equal(forwards["fresh"], forwards["base"])  # B = 0: exactly the base model
    # only adapters train: 2 layers x 4 linears x (A, B)
    assert len(forwards["trainable"]) == 16 and all(".lora." in n for n in forwards["trainable"])
    for largest, fan_in in forwards["A_stats"]:  # A ~ U(±1/sqrt(in)), as nn.Linear and PEFT
        assert 0.5 / fan_in ** 0.5 < largest <= 1 / fan_in ** 0.5


def test_adapters_off_is_the_base_and_merging_keeps_the_output(forwards: dict[str, Any]) -> None:
    assert (forwards["adapted"] - forwards["base"]).abs().max() > 1e-2  # the adapters change the output
    assert torch.equal(forwards["off"], forwards["base"])
    assert torch.equal(forwards["back_on"], forwards["adapted"])
    assert torch.equal(forwards["stashed"], forwards["base"]) and forwards["stashed_count"] == 0
    assert forwards["count_after_stash"] == 8
    assert forwards["merged_count"] == 8 and forwards["left"] == []
    # W + s·BA in one matmul vs W x + s·B(A x): fp32 rounding of logits of size ~1 (seen 4e-7)
    torch.testing.assert_close(forwards["merged"], forwards["adapted"], rtol=0, atol=1e-5)


def test_lora_settings_are_checked() -> None:
    assert LoraSpec(rank=8, alpha=16).scale == 2.0
    with pytest.raises(ValueError, match="rank must be > 0"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="target modules"):
        LoraSpec(targets=("linear_qkv", "q_proj"))
    spec = LoraSpec(rank=4, alpha=8, targets=("linear_fc2", "linear_qkv", "linear_fc2"))
    assert spec.targets == ("linear_fc2", "linear_qkv")
    assert LoraSpec.from_dict(spec.to_dict()) == spec
    assert set(TARGETS) == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}


def test_peft_config_section(tmp_path: Path) -> None:
    from rao_megatron.config import ConfigError, describe, load_config

    cfg = load_config(None, ["peft.method=lora", "peft.target_modules=linear_qkv,linear_fc2", "peft.rank=8"])
    assert cfg.peft.target_modules == ["linear_qkv", "linear_fc2"] and cfg.peft.rank == 8
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("peft:\n  method: lora\n  target_modules: [linear_proj]\n")
    assert load_config(yaml_file).peft.target_modules == ["linear_proj"]
    with pytest.raises(ConfigError, match=r"'peft.target_modules'.*unknown 'o_proj'"):
        load_config(None, ["peft.method=lora", "peft.target_modules=o_proj"])
    with pytest.raises(ConfigError, match="'peft.dropout'"):
        load_config(None, ["peft.dropout=1.0"])
    with pytest.raises(ConfigError, match="'peft.method' .* must be one of none, lora"):
        load_config(None, ["peft.method=qlora"])
    assert "peft:" in describe() and "target_modules" in describe()
