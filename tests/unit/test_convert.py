"""Conversion without worker processes: safetensors I/O, the checks that run before any rank starts, CLI errors;
and, at the end, the ranks (forked) running on the CPU where the caller sees a GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from rao_megatron.cli.convert import cli
from rao_megatron.conversion.hf_io import (
    INDEX_FILE,
    ConversionError,
    LazyHFStateDict,
    ShardedSafetensorsWriter,
    parse_size,
)
from rao_megatron.conversion.validate import (
    check_layout,
    config_for_task,
    expected_hf_shapes,
    mapped_hf_names,
)
from rao_megatron.models import LLAMA3_TINY_ROPE, tiny_hf_config

# ---------------------------------------------------------------- safetensors I/O


def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5KiB") == 1536
    assert parse_size(123) == 123
    with pytest.raises(ConversionError, match="--max-shard-size"):
        parse_size("lots")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(10, 10, generator=g) for i in range(5)}  # 400 bytes each in fp32


def test_writer_shards_and_lazy_reader_reads_only_what_is_asked(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=900)
    for name, t in tensors.items():
        writer.add(name, t[:, :].T.T)  # a view: the writer must copy it
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 5 * 400
    assert index["weight_map"]["w4"] == "model-00003-of-00003.safetensors"
    assert not list(tmp_path.glob("*.partial"))

    lazy = LazyHFStateDict(tmp_path)
    assert set(lazy) == set(tensors) and "w3" in lazy and "nope" not in lazy
    assert lazy.shapes() == {k: (10, 10) for k in tensors}
    assert torch.equal(lazy["w3"], tensors["w3"])
    assert lazy.reads == ["w3"]  # shapes come from the headers; one lookup, one read


def test_writer_single_file_and_dtype(tmp_path: Path) -> None:
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=10**9)
    for name, t in _tensors().items():
        writer.add(name, t, dtype=torch.bfloat16)
    assert [f.name for f in writer.close()] == ["model.safetensors"]
    assert not (tmp_path / INDEX_FILE).exists()
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded["w0"].dtype == torch.bfloat16 and torch.equal(loaded["w0"], _tensors()["w0"].bfloat16())
    with pytest.raises(ConversionError, match="written twice"):
        w = ShardedSafetensorsWriter(tmp_path / "x", 10**9)
        w.add("a", torch.zeros(1))
        w.add("a", torch.zeros(1))


# ---------------------------------------------------------------- checks before conversion


@pytest.mark.parametrize("family, overrides, task", [
    ("llama", {}, "policy"), ("llama", {"tie_word_embeddings": True}, "policy"),
    ("qwen2", {}, "policy"), ("qwen2", {"tie_word_embeddings": True}, "policy"), ("llama", {}, "rm"),
])
def test_expected_shapes_cover_exactly_the_mapping_table(family: str, overrides: dict[str, Any], task: str) -> None:
    cfg = config_for_task(tiny_hf_config(family, **overrides).to_dict(), task)
    expected = expected_hf_shapes(cfg, task)
    assert set(expected) - {"score.weight"} == mapped_hf_names(cfg, task)
    assert ("lm_head.weight" in expected) == (task == "policy" and not overrides)
    assert expected["model.layers.1.self_attn.k_proj.weight"] == (2 * 16, 64)


def test_config_for_rm_is_a_one_label_classifier() -> None:
    cfg = config_for_task(tiny_hf_config("qwen2").to_dict(), "rm")
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"]
    assert cfg["id2label"] == {"0": "LABEL_0"}
    with pytest.raises(ConversionError, match="--task rm"):
        config_for_task(cfg, "policy")


def test_layout_errors_name_the_setting() -> None:
    smol = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 9, "num_key_value_heads": 3,
            "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "vocab_size": 49152}
    with pytest.raises(ConversionError) as e:
        check_layout(smol, tp=2, pp=1)
    assert "num_attention_heads=9" in str(e.value) and "num_key_value_heads=3" in str(e.value)
    assert "valid --tp values: 1, 3" in str(e.value)
    with pytest.raises(ConversionError, match="num_hidden_layers=30 .* valid --pp values: 1, 2, 3, 5, 6, 10, 15, 30"):
        check_layout(smol, tp=1, pp=4)
    check_layout(smol, tp=3, pp=2)


# ---------------------------------------------------------------- CLI errors: one line, exit 2, nothing written


@pytest.fixture
def tiny_hf(tmp_path: Path) -> Path:
    """A tiny Llama-3 (rope scaling) HF directory written with our own safetensors writer."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config("llama", rope_scaling=dict(LLAMA3_TINY_ROPE))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    d = tmp_path / "hf"
    model.save_pretrained(d)
    return d


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli(argv)
    return code, capsys.readouterr().err.strip()


def _edit_weights(hf: Path, edit: Any) -> None:
    sd = load_file(hf / "model.safetensors")
    edit(sd)
    save_file(sd, hf / "model.safetensors", metadata={"format": "pt"})


def _edit_config(hf: Path, **changes: Any) -> None:
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(changes)
    (hf / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case, expected", [
    ("unknown_arch", "unsupported architecture GPT2LMHeadModel"),
    ("tp_not_dividing", "--tp 3: num_attention_heads=4 and num_key_value_heads=2"),
    ("missing", "lacks tensor 'model.layers.1.mlp.up_proj.weight'"),
    ("extra", "unexpected tensor 'model.layers.0.self_attn.extra.weight'"),
    ("shape", "tensor 'model.layers.0.self_attn.q_proj.weight' has shape (64, 32)"),
    ("out_not_empty", "is not empty"),
])
def test_hf_to_megatron_bad_input(case: str, expected: str, tiny_hf: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    tp = "1"
    if case == "unknown_arch":
        _edit_config(tiny_hf, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    elif case == "tp_not_dividing":
        tp = "3"
    elif case == "missing":
        _edit_weights(tiny_hf, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "extra":
        _edit_weights(tiny_hf, lambda sd: sd.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    elif case == "shape":
        _edit_weights(tiny_hf, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 32)}))
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    code, err = _run(["hf-to-megatron", "--hf", str(tiny_hf), "--out", str(out), "--tp", tp], capsys)
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf"] + (["out"] if out.exists() else []))


def test_megatron_to_hf_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["megatron-to-hf", "--megatron", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "Megatron checkpoint directory not found" in err
    (tmp_path / "plain").mkdir()
    code, err = _run(["megatron-to-hf", "--megatron", str(tmp_path / "plain"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a rao_megatron model checkpoint" in err
    assert not (tmp_path / "o").exists()


def test_smollm2_tp2_is_refused(smollm2_hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(["hf-to-megatron", "--hf", str(smollm2_hf_dir), "--out", str(tmp_path / "o"), "--tp", "2"],
                     capsys)
    assert code == 2
    assert "--tp 2: num_attention_heads=9 and num_key_value_heads=3" in err and "valid --tp values: 1, 3" in err
    assert not (tmp_path / "o").exists()


def test_extracted_smollm2_is_an_ordinary_hf_checkpoint(smollm2_hf_dir: Path) -> None:
    cfg = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
    shapes = LazyHFStateDict(smollm2_hf_dir).shapes()
    assert len(shapes) == 272 and "lm_head.weight" not in shapes
    assert (smollm2_hf_dir / "tokenizer.json").is_file()


# ---------------------------------------------------------------- the ranks run on the CPU, GPUs or not
# (these two fork conversion ranks; the caller pretends to see a GPU, as under online GRAO or NeMo-Run)


def _record_device_view(out_dir: str) -> None:
    import torch.distributed as dist

    view = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "is_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(view))


@pytest.fixture
def caller_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_conversion_ranks_hide_the_callers_gpus(tmp_path: Path, caller_sees_a_gpu: None) -> None:
    from rao_megatron.conversion.convert import run_ranks

    run_ranks(_record_device_view, 2, str(tmp_path))
    for rank in (0, 1):
        view = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert view == {"CUDA_VISIBLE_DEVICES": "", "is_available": False, "device_count": 0}
    # the caller's own process is left as it was
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and torch.cuda.is_available()


def test_hf_to_megatron_runs_on_cpu_where_the_caller_sees_a_gpu(tiny_hf: Path, tmp_path: Path,
                                                                caller_sees_a_gpu: None) -> None:
    """Without hidden GPUs the ranks would build the model for CUDA (use_cpu_initialization=False)."""
    from rao_megatron.conversion.convert import hf_to_megatron

    out = hf_to_megatron(tiny_hf, tmp_path / "meg", tp=2, progress=False)
    meta = json.loads((out / "rao_model.json").read_text())
    assert meta["provenance"]["written_at_layout"] == {"tp": 2, "pp": 1}
