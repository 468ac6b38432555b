"""A LoRA checkpoint exported to HF: the PEFT adapter folder (checked against the ``peft`` library, a test-only
dependency) and the merged model (``--merge-lora``), both against the Megatron LoRA model's own logits.

The checkpoints come from real short LoRA runs (``rao-train peft.method=lora``, 3 steps at TP2, so the adapters
are trained, B != 0, and resharded to TP1 on export): one on the tiny random init, one on a base checkpoint
converted from an HF directory, and a reward model (its trained head saved as PEFT's ``modules_to_save``) on
that base. Those tests fork gloo ranks (``distributed``); the whole file takes ~20 s on 2 cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from rao_megatron.cli.convert import cli
from rao_megatron.conversion.compare import hf_outputs, megatron_outputs
from rao_megatron.conversion.convert import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    build_chunks,
    hf_to_megatron,
    megatron_to_hf,
    peft_adapter_config,
    run_ranks,
)
from rao_megatron.conversion.hf_io import ConversionError, copy_tokenizer_files
from rao_megatron.data.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer
from rao_megatron.models.checkpoint import read_checkpoint_meta, resolve_checkpoint
from rao_megatron.models.hf_config import ModelArch, tiny_hf_config
from rao_megatron.models.lora import LoraSpec, apply_lora
from rao_megatron.parallel.launch import run_distributed
from rao_megatron.parallel.state import destroy_model_parallel, initialize_model_parallel
from rao_megatron.rewards.synthetic import marker_groups, write_jsonl
from rao_megatron.training.model_init import init_random_weights, load_adapters, load_weights
from tests.e2e.train_workers import run_cli_worker

ROOT = Path(__file__).resolve().parents[2]
CONFIG, RM_CONFIG = str(ROOT / "examples/configs/rao_tiny.yaml"), str(ROOT / "examples/configs/rm_tiny.yaml")
#: fp32 logits of the same model computed two ways (adapters applied vs merged, PEFT vs Megatron)
ATOL = 1e-4


def _train_lora(out: Path, *overrides: str, config: str = CONFIG) -> Path:
    """A 3-step LoRA run at TP2; its last checkpoint (adapters only, the base recorded in rao_model.json)."""
    argv = ["--config", config, f"train.output_dir={out}", "parallel.tp=2", "peft.method=lora", "peft.rank=4",
            "train.steps=3", "checkpoint.save_at_end=true", *overrides]
    run_distributed(run_cli_worker, 2, "rao_megatron.cli.train", argv)
    return resolve_checkpoint(out / "checkpoints")


@pytest.fixture(scope="module")
def base_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny Llama for the tiny tokenizer, as an HF directory with that tokenizer."""
    tok = load_tokenizer(None)
    cfg = tiny_hf_config("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(7)
    out = tmp_path_factory.mktemp("base") / "hf"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    copy_tokenizer_files(TINY_TOKENIZER_DIR, out)
    return out


@pytest.fixture(scope="module")
def loras(base_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``random``: a LoRA checkpoint on the tiny random init; ``checkpoint``: one on ``base_hf`` converted;
    ``rm``: a LoRA reward model on that base (a policy: the scalar head starts fresh and trains)."""
    tmp = tmp_path_factory.mktemp("loras")
    base_ckpt = hf_to_megatron(base_hf, tmp / "base_megatron", progress=False)
    return {"random": _train_lora(tmp / "random", "train.reference=on_the_fly"),
            "checkpoint": _train_lora(tmp / "on_checkpoint", f"model.init_checkpoint={base_ckpt}",
                                      "train.reference=on_the_fly"),
            "rm": _train_lora(tmp / "rm", f"model.init_checkpoint={base_ckpt}", config=RM_CONFIG)}


def _base_hf_model(lora_ckpt: Path, base_hf: Path) -> Any:
    """The HF model the adapters go on: the converted base's HF directory, or the random init drawn as
    ``model_init.init_random_weights`` draws it (an HF model seeded on the CPU)."""
    meta = read_checkpoint_meta(lora_ckpt)
    if meta["base"]["checkpoint"] is not None:
        return AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    torch.manual_seed(meta["base"]["seed"])
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**meta["hf_config"]), dtype=torch.float32)


def _ids(lora_ckpt: Path) -> torch.Tensor:
    vocab = read_checkpoint_meta(lora_ckpt)["hf_config"]["vocab_size"]
    return torch.randint(0, vocab, (3, 24), generator=torch.Generator().manual_seed(3))


def _megatron_lora_logits_worker(checkpoint: str, ids: torch.Tensor, out_file: str) -> None:
    """Forked rank, TP1: the base, then the checkpoint's adapters on it (applied, not merged): fp32 logits."""
    initialize_model_parallel(tp=1, pp=1)
    meta = read_checkpoint_meta(checkpoint)
    arch = ModelArch.from_hf(meta["hf_config"])
    chunks = build_chunks(arch, "policy", torch.float32)
    if meta["base"]["checkpoint"] is not None:
        load_weights(chunks, meta["base"]["checkpoint"], arch)
    else:
        init_random_weights(chunks, arch, meta["base"]["seed"])
    apply_lora(chunks[0], LoraSpec.from_dict(meta["peft"]))
    load_adapters(chunks, checkpoint)
    with torch.no_grad():
        logits = chunks[0].eval()(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)
    torch.save(logits[..., : arch.vocab_size], out_file)
    destroy_model_parallel()


def _megatron_lora_logits(checkpoint: Path, ids: torch.Tensor, tmp: Path) -> torch.Tensor:
    run_ranks(_megatron_lora_logits_worker, 1, str(checkpoint), ids, str(tmp / "logits.pt"))
    return torch.load(tmp / "logits.pt")


# ---------------------------------------------------------------- the adapter folder and the merged model


@pytest.mark.distributed
@pytest.mark.parametrize("base", ["random", "checkpoint"])
def test_peft_adapter_and_merged_export_give_the_lora_models_logits(base: str, loras: dict[str, Path],
                                                                    base_hf: Path, tmp_path: Path) -> None:
    ckpt = loras[base]
    ids = _ids(ckpt)
    adapter = megatron_to_hf(ckpt, tmp_path / "adapter", progress=False)
    assert sorted(p.name for p in adapter.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS] + (
        ["tokenizer.json", "tokenizer_config.json"] if base == "checkpoint" else [])
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == (str(base_hf.resolve()) if base == "checkpoint" else None)

    reference = _megatron_lora_logits(ckpt, ids, tmp_path)
    base_model = _base_hf_model(ckpt, base_hf).eval()
    with torch.no_grad():
        base_logits = base_model(ids).logits
        peft_logits = PeftModel.from_pretrained(base_model, adapter).eval()(ids).logits
    # trained adapters move the logits by far more than the tolerance: the comparison below means something
    assert (peft_logits - base_logits).abs().max() > 100 * ATOL
    torch.testing.assert_close(peft_logits, reference, rtol=0, atol=ATOL)

    merged = megatron_to_hf(ckpt, tmp_path / "merged", merge_lora=True, progress=False)
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(merged_logits, peft_logits, rtol=0, atol=ATOL)


@pytest.mark.distributed
def test_adapter_folder_has_the_layout_peft_saves(loras: dict[str, Path], base_hf: Path, tmp_path: Path) -> None:
    """Same keys, shapes and config as ``PeftModel.save_pretrained`` writes for the same LoRA on the HF model."""
    ours = megatron_to_hf(loras["checkpoint"], tmp_path / "ours", progress=False)
    config = json.loads((ours / ADAPTER_CONFIG).read_text())
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_hf),
                                LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                                           target_modules=config["target_modules"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / ADAPTER_CONFIG).read_text())
    theirs["target_modules"] = sorted(theirs["target_modules"])  # PEFT writes a set, in no fixed order
    assert {k: v for k, v in theirs.items() if k in config and k != "base_model_name_or_path"} == \
        {k: v for k, v in config.items() if k != "base_model_name_or_path"}
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    a, b = load_file(ours / ADAPTER_WEIGHTS), load_file(tmp_path / "theirs" / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in a


@pytest.mark.distributed
def test_reward_model_adapter_and_merged_export_give_the_megatron_scores(loras: dict[str, Path], base_hf: Path,
                                                                        tmp_path: Path) -> None:
    """PEFT's sequence classifier (adapters + the trained head as ``modules_to_save``) scores as the Megatron
    reward model does (``compare.megatron_outputs`` loads the LoRA checkpoint as base + merged adapters)."""
    ckpt = loras["rm"]
    ids = torch.randint(3, 270, (3, 24), generator=torch.Generator().manual_seed(3))  # no pad id: last token pooled
    adapter = megatron_to_hf(ckpt, tmp_path / "adapter", progress=False)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
    assert load_file(adapter / ADAPTER_WEIGHTS)["base_model.model.score.weight"].shape == (1, 64)
    reference = megatron_outputs(ckpt, ids, tp=2)  # [B, S, 1]
    base_model = AutoModelForSequenceClassification.from_pretrained(base_hf, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        peft_scores = PeftModel.from_pretrained(base_model, adapter).eval()(ids).logits  # [B, 1] at the last token
    torch.testing.assert_close(peft_scores, reference[:, -1], rtol=0, atol=ATOL)
    merged = megatron_to_hf(ckpt, tmp_path / "merged", merge_lora=True, progress=False)
    torch.testing.assert_close(hf_outputs(merged, ids), reference, rtol=0, atol=ATOL)


@pytest.mark.distributed
def test_a_lora_reward_model_scores_as_its_merged_model(loras: dict[str, Path], tmp_path: Path) -> None:
    """``rao-annotate --reward-model`` reads a LoRA checkpoint as base + merged adapters: the scores of the
    merged model converted back to a full Megatron checkpoint."""
    full = hf_to_megatron(megatron_to_hf(loras["rm"], tmp_path / "merged", merge_lora=True, progress=False),
                          tmp_path / "full", progress=False)
    groups = write_jsonl(marker_groups(6, k=3, seed=2), tmp_path / "groups.jsonl")
    scores = {}
    for name, model in (("lora", loras["rm"]), ("full", full)):
        run_distributed(run_cli_worker, 1, "rao_megatron.cli.annotate",
                        ["--data", str(groups), "--out", str(tmp_path / f"{name}.jsonl"), "--reward-model", str(model),
                         "--max-length", "48", "--no-progress"])
        scores[name] = [x for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()
                        for x in json.loads(line)["rewards"]]
    assert len(scores["lora"]) == 18 and scores["lora"] == pytest.approx(scores["full"], abs=1e-5)


def test_reward_model_adapter_config_saves_the_head() -> None:
    spec = LoraSpec(rank=8, alpha=16.0, dropout=0.05, targets=("linear_qkv",))
    keys = [f"base_model.model.model.layers.0.self_attn.{p}_proj.lora_{m}.weight" for p in "qkv" for m in "AB"]
    config = peft_adapter_config(spec, "rm", [*keys, "base_model.model.score.weight"], "/models/base")
    assert (config["task_type"], config["target_modules"], config["modules_to_save"]) == \
        ("SEQ_CLS", ["k_proj", "q_proj", "v_proj"], ["score"])
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (8, 16, 0.05, False)
    LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})  # PEFT takes every field as written
    policy = peft_adapter_config(spec, "policy", keys, None)
    assert policy["task_type"] == "CAUSAL_LM" and policy["modules_to_save"] is None


@pytest.mark.distributed
def test_online_rounds_export_lora_checkpoints_merged(loras: dict[str, Path]) -> None:
    """Online GRAO samples the next round from the export: a LoRA round's must be the merged model."""
    from rao_megatron.cli.online import merge_args

    assert merge_args(loras["random"].parent) == ["--merge-lora"]  # a run's checkpoints root, as online passes it
    assert merge_args(Path(read_checkpoint_meta(loras["checkpoint"])["base"]["checkpoint"])) == []


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.distributed
def test_a_changed_base_is_refused(loras: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The adapters fit only the base they were trained on: both exports refuse a base changed since."""
    ckpt = loras["checkpoint"]
    meta = read_checkpoint_meta(ckpt)
    base = tmp_path / "base"
    shutil.copytree(meta["base"]["checkpoint"], base)
    (base / "notes.txt").write_text("a file added to the base after training\n")
    moved = tmp_path / "lora"
    shutil.copytree(ckpt, moved)
    meta["base"]["checkpoint"] = str(base)
    (moved / "rao_model.json").write_text(json.dumps(meta))
    for extra in ([], ["--merge-lora"]):
        code, err = _run(["megatron-to-hf", "--megatron", str(moved), "--out", str(tmp_path / "out"), *extra],
                         capsys)
        assert code == 2 and err.startswith("error: ") and "\n" not in err, err
        assert f"its base model {base} holds other weights than the adapters were trained on" in err
        assert not (tmp_path / "out").exists()


def test_moe_expert_adapters_are_refused_without_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "moe_lora"
    ckpt.mkdir()
    meta = {"hf_config": tiny_hf_config("qwen3_moe").to_dict(), "task": "policy", "dtype": "fp32",
            "peft": {"method": "lora", **LoraSpec(rank=4).to_dict(), "seed": 0},
            "base": {"checkpoint": None, "id": "0", "source": "random init", "seed": 0}}
    (ckpt / "rao_model.json").write_text(json.dumps(meta))
    code, err = _run(["megatron-to-hf", "--megatron", str(ckpt), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "\n" not in err and "adapters on MoE experts have no HF PEFT form" in err, err
    assert err.endswith("export the merged model with --merge-lora") and not (tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="MoE experts"):
        megatron_to_hf(ckpt, tmp_path / "out")


@pytest.mark.distributed
def test_merge_lora_on_a_full_checkpoint_is_a_note(loras: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    full = read_checkpoint_meta(loras["checkpoint"])["base"]["checkpoint"]
    assert cli(["megatron-to-hf", "--megatron", full, "--out", str(tmp_path / "out"), "--merge-lora",
                "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "has no LoRA adapters (--merge-lora changes nothing)" in out and "wrote HF model" in out
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / ADAPTER_CONFIG).exists()


@pytest.mark.distributed
def test_a_lora_reward_model_on_a_tied_policy_base_loads_merged(tmp_path: Path) -> None:
    """A tied policy base has no ``output_layer.weight`` of its own: loading the LoRA reward model's base must
    skip the head there (the LoRA checkpoint brings the trained one), as a plain RM init does."""
    tok = load_tokenizer(None)
    cfg = tiny_hf_config("llama", vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(8)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    copy_tokenizer_files(TINY_TOKENIZER_DIR, tmp_path / "hf")
    base = hf_to_megatron(tmp_path / "hf", tmp_path / "base", progress=False)
    ckpt = _train_lora(tmp_path / "rm", f"model.init_checkpoint={base}", config=RM_CONFIG)
    ids = torch.randint(3, 270, (2, 16), generator=torch.Generator().manual_seed(4))
    merged = megatron_to_hf(ckpt, tmp_path / "merged", merge_lora=True, progress=False)
    torch.testing.assert_close(hf_outputs(merged, ids), megatron_outputs(ckpt, ids, tp=1), rtol=0, atol=ATOL)
