"""HF <-> Megatron conversion end to end on forked CPU gloo ranks: round trips, layouts, reward model, SmolLM2.

The converters fork their own ranks (``run_distributed``); this process never joins a process group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from rao_megatron.cli.convert import cli
from rao_megatron.conversion.compare import (
    DEFAULT_PROMPTS,
    compare_checkpoints,
    compare_outputs,
    hf_outputs,
    load_prompt_tokenizer,
    megatron_outputs,
    prompt_token_ids,
)
from rao_megatron.conversion.convert import hf_to_megatron, megatron_to_hf
from rao_megatron.conversion.hf_io import INDEX_FILE, LazyHFStateDict
from rao_megatron.models import LLAMA3_TINY_ROPE, tiny_hf_config
from rao_megatron.models.checkpoint import read_checkpoint_meta

pytestmark = pytest.mark.distributed

TINY = {
    "qwen2_untied_bias": lambda: tiny_hf_config("qwen2"),
    "llama3_rope_scaling": lambda: tiny_hf_config("llama", rope_theta=500000.0, rope_scaling=dict(LLAMA3_TINY_ROPE)),
}


def _save_tiny(cfg: Any, out: Path, cls: Any = None) -> Path:
    """A seeded random tiny model as an HF directory; q/k/v biases made non-zero so they count."""
    torch.manual_seed(0)
    model = cls(cfg) if cls is not None else AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


def _assert_same_tensors(a_dir: Path, b_dir: Path) -> None:
    a, b = LazyHFStateDict(a_dir), LazyHFStateDict(b_dir)
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after the round trip"


def _assert_argmax_agrees(out: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor) -> None:
    """The top token agrees except at near ties, and near ties are rare.

    Where the reference's top-2 gap exceeds twice the largest logit difference no rounding can swap the top
    token (so agreement there follows from the max-diff bound); closer calls, or exact ties such as the
    all-zero logits after a zero embedding row, may go either way under another summation order and are not
    held to agreement. At most 10% of positions may be that close: the logits differ by far less than the
    typical gap between the two best tokens.
    """
    mask = torch.arange(ref.shape[1]) < lengths[:, None]
    a, b = out[mask].double(), ref[mask].double()
    top2 = b.topk(2, dim=-1).values
    diff = (a - b).abs().max().item()
    clear = top2[:, 0] - top2[:, 1] > 2 * diff
    assert clear.float().mean() >= 0.9, \
        f"only {int(clear.sum())}/{len(clear)} positions have a top-2 gap > 2 x max |diff| = {2 * diff:.2e}"
    agree = a.argmax(-1) == b.argmax(-1)
    assert agree[clear].all(), f"argmax differs at {int((~agree[clear]).sum())} positions with a clear top token"


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- tiny models: TP2 round trip, reload at TP1 / PP2


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_round_trip_and_layouts(name: str, tmp_path: Path) -> None:
    cfg = TINY[name]()
    hf = _save_tiny(cfg, tmp_path / "hf")
    ckpt = hf_to_megatron(hf, tmp_path / "mg", tp=2, progress=False)
    meta = read_checkpoint_meta(ckpt)
    assert meta["task"] == "policy" and meta["dtype"] == "fp32" and meta["provenance"]["written_at_layout"]["tp"] == 2
    # a small shard size forces the sharded layout (index + several files)
    back = megatron_to_hf(ckpt, tmp_path / "back", max_shard_size="30KB", progress=False)
    assert (back / INDEX_FILE).is_file() and len(list(back.glob("model-*-of-*.safetensors"))) > 1
    _assert_same_tensors(hf, back)
    assert json.loads((back / "config.json").read_text())["architectures"] == cfg.architectures
    reloaded = AutoModelForCausalLM.from_pretrained(back)
    ids = _ids(cfg.vocab_size)
    ref = hf_outputs(hf, ids)
    lengths = torch.full((3,), 20)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ref)
    outs = {}
    for tp, pp in ((1, 1), (1, 2)):  # written at TP2, read at other layouts
        outs[tp, pp] = megatron_outputs(ckpt, ids, tp=tp, pp=pp)
        result = compare_outputs(outs[tp, pp], ref, lengths)
        assert result.max_abs_diff <= 1e-5, (tp, pp, result)
        _assert_argmax_agrees(outs[tp, pp], ref, lengths)
    # PP2 runs the same micro-batches through the same per-layer ops as PP1: the same sums
    torch.testing.assert_close(outs[1, 1], outs[1, 2], rtol=0, atol=1e-6)


def test_compare_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = _save_tiny(TINY["llama3_rope_scaling"](), tmp_path / "hf")
    assert cli(["hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "mg"), "--pp", "2", "--no-progress"]) == 0
    base = ["compare", "--hf", str(hf), "--megatron", str(tmp_path / "mg"), "--tp", "2"]
    assert cli(base) == 0
    out = capsys.readouterr().out
    # all 128 argmaxes agree: the reference's smallest top-2 gap on these ids is 7e-5; TP2 moves logits by 2e-7
    assert "4 random sequences" in out and "argmax agreement    128/128" in out and out.rstrip().endswith("OK")
    # a model that really differs fails (not a tiny atol, whose verdict would hang on the last bits of fp32 sums)
    other = AutoModelForCausalLM.from_pretrained(hf)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.1)  # every logit scaled by 1.1: differences of ~0.07
    other.save_pretrained(tmp_path / "other")
    assert cli(["compare", "--hf", str(tmp_path / "other"), *base[3:]]) == 1
    assert "FAIL: max abs diff" in capsys.readouterr().out


# ---------------------------------------------------------------- reward model


def test_reward_model_round_trip(tmp_path: Path) -> None:
    cfg = tiny_hf_config("llama", num_labels=1, architectures=["LlamaForSequenceClassification"])
    hf = _save_tiny(cfg, tmp_path / "hf", LlamaForSequenceClassification)
    assert "score.weight" in LazyHFStateDict(hf)
    ckpt = hf_to_megatron(hf, tmp_path / "mg", tp=2, progress=False)  # task from the architecture
    assert read_checkpoint_meta(ckpt)["task"] == "rm"
    back = megatron_to_hf(ckpt, tmp_path / "back", progress=False)  # task from the metadata
    _assert_same_tensors(hf, back)
    out_cfg = json.loads((back / "config.json").read_text())
    assert out_cfg["architectures"] == ["LlamaForSequenceClassification"] and len(out_cfg["id2label"]) == 1
    assert not (back / "generation_config.json").exists()
    result = compare_checkpoints(hf, ckpt, pp=2, ids=_ids(cfg.vocab_size))
    assert result.max_abs_diff <= 1e-5, result


def test_reward_model_from_causal_lm_gets_a_new_head(tmp_path: Path) -> None:
    hf = _save_tiny(tiny_hf_config("llama"), tmp_path / "hf")  # has lm_head.weight, no score.weight
    ckpt = hf_to_megatron(hf, tmp_path / "mg", task="rm", progress=False)
    meta = read_checkpoint_meta(ckpt)
    assert meta["task"] == "rm" and meta["provenance"]["new_reward_head"]
    assert meta["hf_config"]["architectures"] == ["LlamaForSequenceClassification"]
    back = LazyHFStateDict(megatron_to_hf(ckpt, tmp_path / "back", progress=False))
    assert back.shapes()["score.weight"] == (1, 64) and "lm_head.weight" not in back


# ---------------------------------------------------------------- failures leave nothing behind


@pytest.mark.parametrize("where", ["parent", "worker"])
def test_failure_leaves_no_output(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rao_megatron.conversion.convert as convert_mod
    from rao_megatron.conversion.hf_io import ShardedSafetensorsWriter

    hf = _save_tiny(TINY["qwen2_untied_bias"](), tmp_path / "hf")
    ckpt = hf_to_megatron(hf, tmp_path / "mg", progress=False)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    if where == "parent":  # after the ranks have written everything
        monkeypatch.setattr(convert_mod, "copy_tokenizer_files", boom)
        with pytest.raises(RuntimeError, match="disk full"):
            hf_to_megatron(hf, tmp_path / "out", progress=False)
    else:  # inside the forked rank, after some shards are on disk
        monkeypatch.setattr(ShardedSafetensorsWriter, "close", boom)
        with pytest.raises(Exception, match="disk full"):
            megatron_to_hf(ckpt, tmp_path / "out", max_shard_size="30KB", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mg"]


# ---------------------------------------------------------------- SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2_tp3(smollm2_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted through the CLI at TP3 (3 ranks)."""
    out = tmp_path_factory.mktemp("smollm2") / "tp3"
    assert cli(["hf-to-megatron", "--hf", str(smollm2_hf_dir), "--out", str(out), "--tp", "3", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_hf_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The default chat prompts' ids, lengths and fp32 HF logits."""
    ids, lengths = prompt_token_ids(load_prompt_tokenizer(smollm2_hf_dir), DEFAULT_PROMPTS)
    return ids, lengths, hf_outputs(smollm2_hf_dir, ids)


@pytest.mark.parametrize("tp, pp", [(1, 1), (3, 1), (1, 2)], ids=["tp1", "tp3", "pp2"])
def test_smollm2_logits_match_hf(tp: int, pp: int, smollm2_tp3: Path, smollm2_reference: Any) -> None:
    ids, lengths, ref = smollm2_reference
    out = megatron_outputs(smollm2_tp3, ids, tp=tp, pp=pp)
    result = compare_outputs(out, ref, lengths)
    print(f"SmolLM2 TP{tp} PP{pp}: {result}")
    assert result.positions > 60
    assert result.max_abs_diff <= 1e-3, result
    _assert_argmax_agrees(out, ref, lengths)


def test_smollm2_round_trip_is_bit_identical(smollm2_tp3: Path, smollm2_hf_dir: Path, tmp_path: Path) -> None:
    meta = read_checkpoint_meta(smollm2_tp3)
    assert meta["tokenizer"] == str(smollm2_tp3 / "tokenizer")
    assert load_prompt_tokenizer(meta["tokenizer"]).chat_template  # training finds a working tokenizer here
    out = tmp_path / "hf"
    assert cli(["megatron-to-hf", "--megatron", str(smollm2_tp3), "--out", str(out), "--no-progress"]) == 0
    _assert_same_tensors(smollm2_hf_dir, out)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert torch.equal(model.lm_head.weight, LazyHFStateDict(smollm2_hf_dir)["model.embed_tokens.weight"])
