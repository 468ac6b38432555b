"""LoRA through the training CLI on the tiny configs: adapter-only checkpoints that resume at another layout,
the base model as the reference (adapters off) equal to a cache computed from it, the reward model and SFT
with adapters, and the refusals (another base, other adapter settings, bad peft settings)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from rao_megatron.models.checkpoint import read_checkpoint_meta, stored_keys
from rao_megatron.parallel.launch import run_distributed

from .test_train import CONFIG, DATA, ROOT, assert_same_losses, losses, records, train
from .train_workers import run_cli_worker

pytestmark = pytest.mark.distributed

LORA = ("peft.method=lora", "peft.rank=4", "peft.alpha=8", "train.lr=1e-2")
RM_CONFIG = str(ROOT / "examples/configs/rm_tiny.yaml")


def model_keys(checkpoint: Path) -> set[str]:
    """The model entries a dist checkpoint stores (not the optimizer's)."""
    return {k for k in stored_keys(checkpoint) if not k.startswith("optimizer.")}


def run_result(tmp_path: Path, name: str, *overrides: str, config: str = CONFIG) -> tuple[int, str]:
    result = tmp_path / f"{name}.result"
    argv = ["--config", config, f"train.output_dir={tmp_path / name}", *overrides]
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.train", argv, str(result))
    code, err = result.read_text().split("\n", 1)
    return int(code), err


def test_lora_checkpoint_holds_the_adapters_and_resumes_at_another_layout(tmp_path):
    tp2 = train(tmp_path, "tp2", *LORA, "train.steps=6", "checkpoint.save_every=2", "checkpoint.keep_last=3",
                "parallel.tp=2", world=2)
    got = losses(tp2)
    assert len(set(got)) > 3  # the adapters learn: B leaves 0 and the loss moves
    ckpt = tp2 / "checkpoints" / "step_0000004"
    keys = model_keys(ckpt)
    # 4 target linears x (A, B), each stacked over the layers (Megatron's global layer axis); nothing of the base
    assert len(keys) == 8 and all(".lora." in k for k in keys), sorted(keys)[:4]
    meta = read_checkpoint_meta(ckpt)
    assert meta["peft"]["rank"] == 4 and meta["base"]["checkpoint"] is None and meta["base"]["seed"] == 1234
    out = tmp_path / "reshard"
    shutil.copytree(tp2, out)
    shutil.rmtree(out / "checkpoints" / "step_0000006")  # as if the TP2 job had died after step 4
    train(tmp_path, "reshard", *LORA, "train.steps=6", "parallel.pp=2", world=2)
    assert [r["step"] for r in records(out)] == list(range(1, 7))
    resumed = losses(out)
    assert resumed[:4] == got[:4]
    # steps 5-6 at PP2 from the TP2 adapters and Adam state: fp32 rounding of another layout (as the full
    # model's resharding test); a wrongly resharded adapter (A's columns, B's rows) is far off
    assert resumed[4:] == pytest.approx(got[4:], rel=1e-4)


def test_adapters_off_reference_equals_a_cache_of_the_base_model(tmp_path):
    data = tmp_path / "groups.jsonl"
    data.write_text(Path(DATA).read_text())
    common = ["train.steps=3", "checkpoint.save_at_end=false", f"data.train_path={data}"]
    # the cache of the base (the initial model: the seeded random init) -- made without LoRA
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.precompute_reference", ["--config", CONFIG, *common])
    cached = train(tmp_path, "cached", *LORA, *common, "train.reference=cached", data=str(data))
    off = train(tmp_path, "off", *LORA, *common, data=str(data))  # auto under LoRA: adapters off
    # the reference enters every step's loss; after step 1 the adapters are non-zero, so only a reference
    # that stays the base model keeps the two runs together
    assert_same_losses(losses(off), losses(cached), "adapters off vs cache")


def test_reward_model_and_sft_train_with_lora(tmp_path):
    rm = tmp_path / "rm"
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.train",
                    ["--config", RM_CONFIG, f"train.output_dir={rm}", *LORA, "train.steps=3", "train.eval_every=0"])
    rm_keys = model_keys(rm / "checkpoints" / "step_0000003")
    # the scalar head trains in full, the body through its adapters
    assert "output_layer.weight" in rm_keys and len(rm_keys) == 9
    assert all(".lora." in k for k in rm_keys - {"output_layer.weight"})
    assert len(set(losses(rm))) == 3
    sft = train(tmp_path, "sft", *LORA, "train.steps=3", "train.task=sft", "loss.name=sft")
    assert len(set(losses(sft))) == 3


def test_lora_resume_refuses_another_base_or_other_adapters(tmp_path):
    base_a = train(tmp_path, "base_a", "train.steps=1")
    base_b = train(tmp_path, "base_b", "train.steps=2")
    a, b = base_a / "checkpoints" / "latest", base_b / "checkpoints" / "latest"
    run = ["train.steps=2", "checkpoint.save_every=1", "train.reference=on_the_fly"]
    train(tmp_path, "lora", *LORA, *run, f"model.init_checkpoint={a}")
    (tmp_path / "lora" / "checkpoints" / "step_0000002").rename(tmp_path / "lora" / "checkpoints" / "keep")
    (tmp_path / "lora" / "checkpoints" / "latest").write_text("step_0000001\n")
    code, err = run_result(tmp_path, "lora", *LORA, *run, f"model.init_checkpoint={b}",
                           "checkpoint.allow_changed_run=true")
    assert code == 2 and "cannot be resumed by this run: initial model" in err, err
    code, err = run_result(tmp_path, "lora", *LORA, *run, f"model.init_checkpoint={a}", "peft.rank=8")
    assert code == 2 and "peft: LoRA" in err and "rank=4" in err, err
    for bad, expected in (("peft.rank=0", "'peft.rank' (command-line override) must be > 0"),
                          ("peft.target_modules=linear_qkv,q_proj", "'peft.target_modules'"),
                          ("peft.method=none", "adapters_off is the base model of a LoRA run")):
        extra = ("train.reference=adapters_off",) if bad == "peft.method=none" else ()
        code, err = run_result(tmp_path, "bad", *LORA, bad, *extra)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    # the LoRA checkpoint as an initial model: its base with the adapters merged in, checked against the base
    meta = read_checkpoint_meta(tmp_path / "lora" / "checkpoints" / "step_0000001")
    assert meta["base"]["checkpoint"] == str(a.parent.joinpath(a.read_text().strip()).resolve())
    assert json.loads(json.dumps(meta["peft"]))["targets"] == ["linear_qkv", "linear_proj", "linear_fc1",
                                                                 "linear_fc2"]


def test_bf16_lora_adapters_train_and_resume_with_fp32_master_weights(tmp_path):
    # bf16 base and adapters; Megatron's mixed-precision optimizer keeps the adapters' fp32 master copies and
    # Adam state, which the adapter-only checkpoint holds and a longer run resumes from
    out = train(tmp_path, "bf16", *LORA, "model.dtype=bf16", "train.steps=2")
    ckpt = out / "checkpoints" / "step_0000002"
    optimizer = [k for k in stored_keys(ckpt) if k.startswith("optimizer.state.")]
    assert {k.split(".")[2] for k in optimizer} == {"fp32_param", "exp_avg", "exp_avg_sq"}
    assert all(".lora." in k for k in optimizer) and len(optimizer) == 3 * 8
    more = losses(train(tmp_path, "bf16", *LORA, "model.dtype=bf16", "train.steps=3"))
    assert len(more) == 3 and all(math.isfinite(x) for x in more)
