"""Reward-model pipeline through the CLIs: BT training learns a synthetic preference, TP/PP-invariant scores,
initialisation from an SFT policy checkpoint, annotation by model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rao_megatron.parallel.launch import run_distributed
from rao_megatron.rewards.report import rm_report
from rao_megatron.rewards.scorers import find_model_checkpoint
from rao_megatron.rewards.synthetic import marker_groups, marker_pairs, write_jsonl

from .rm_workers import head_vs_policy_worker
from .train_workers import run_cli_worker

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
RM_CONFIG = str(ROOT / "examples/configs/rm_tiny.yaml")
RAO_CONFIG = str(ROOT / "examples/configs/rao_tiny.yaml")


def records(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def train(out: Path, config: str, *overrides: str, world: int = 1) -> Path:
    run_distributed(run_cli_worker, world, "rao_megatron.train",
                    ["--config", config, f"train.output_dir={out}", *overrides])
    return out


def annotate(data: Path, out: Path, model: Path, *extra: str, world: int = 1) -> list[list[float]]:
    run_distributed(run_cli_worker, world, "rao_megatron.annotate",
                    ["--data", str(data), "--out", str(out), "--reward-model", str(model), "--max-length", "48",
                     "--batch-size", "8", "--no-progress", *extra])
    return [r["rewards"] for r in map(json.loads, out.read_text().splitlines())]


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BT reward model trained on marker pairs (random init), and its held-out file."""
    tmp = tmp_path_factory.mktemp("rm")
    train_data = write_jsonl(marker_pairs(256, seed=0), tmp / "train.jsonl")
    heldout = write_jsonl(marker_pairs(64, seed=1), tmp / "heldout.jsonl")
    out = train(tmp / "run", RM_CONFIG, f"data.train_path={train_data}", f"data.eval_path={heldout}",
                "train.steps=12", "train.eval_every=6")
    return out, heldout


def test_rm_learns_the_marker_preference(trained_rm):
    out, _ = trained_rm
    evals = [r for r in records(out) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [6, 12]
    final = evals[-1]
    assert final["eval/accuracy"] >= 0.95, final
    assert final["eval/rewards/margin"] > 0 and final["eval/loss"] < 0.3
    table = rm_report(records(out), heldout_pairs=64)
    assert f"| final | 12 | 64 | {final['eval/accuracy']:.4f} |" in table


def test_rm_scores_are_the_same_at_tp1_tp2_pp2(trained_rm, tmp_path):
    out, heldout = trained_rm
    tp1 = annotate(heldout, tmp_path / "tp1.jsonl", out)
    tp2 = annotate(heldout, tmp_path / "tp2.jsonl", out, "--tp", "2", world=2)
    pp2 = annotate(heldout, tmp_path / "pp2.jsonl", out, "--pp", "2", "--chunk-rows", "16", world=2)
    assert len(tp1) == 64
    for other in (tp2, pp2):
        assert [s for r in other for s in r] == pytest.approx([s for r in tp1 for s in r], abs=1e-5)
    # the annotated scores rank the held-out pairs as the training evaluation did
    assert sum(chosen > rejected for chosen, rejected in tp1) / len(tp1) >= 0.95


def test_annotating_groups_by_model_at_dp2(trained_rm, tmp_path):
    out, _ = trained_rm
    groups = write_jsonl(marker_groups(12, k=3, seed=2), tmp_path / "groups.jsonl")
    dp1 = annotate(groups, tmp_path / "dp1.jsonl", out)
    dp2 = annotate(groups, tmp_path / "dp2.jsonl", out, "--batch-size", "2", world=2)  # 2 DP ranks split sequences
    assert [len(r) for r in dp2] == [3] * 12
    assert [s for r in dp2 for s in r] == pytest.approx([s for r in dp1 for s in r], abs=1e-5)


def test_rm_from_an_sft_checkpoint_trains_at_tp2_and_pp2(tmp_path):
    sft = train(tmp_path / "sft", RAO_CONFIG, "train.task=sft", "loss.name=sft", "train.steps=2")
    init = find_model_checkpoint(sft)
    common = [f"model.init_checkpoint={init}", "train.steps=3", "loss.pairing=all_pairs", "loss.margin=0.5",
              "loss.centering=0.01", f"data.train_path={ROOT / 'examples/data/tiny_groups.jsonl'}",
              "data.eval_path=null", "data.eval_fraction=0.125", "data.max_length=64", "checkpoint.save_at_end=false"]
    tp2 = train(tmp_path / "tp2", RM_CONFIG, *common, "parallel.tp=2", world=2)
    pp2 = train(tmp_path / "pp2", RM_CONFIG, *common, "parallel.pp=2", world=2)
    losses = [r["loss"] for r in records(tp2)]
    assert len(losses) == 3 and all(x == x for x in losses)
    assert [r["loss"] for r in records(pp2)] == pytest.approx(losses, rel=1e-4, abs=1e-6)
    assert "eval/accuracy" in records(tp2)[-1]


@pytest.mark.xfail(strict=True, reason="setup.build_initial_model loads the policy's vocab output layer into the "
                   "RM head (dist_checkpointing reads row 0 of [V, H] into [1, H]); needs the head skipped on load")
def test_rm_head_is_fresh_when_initialised_from_a_policy(tmp_path):
    sft = train(tmp_path / "sft", RAO_CONFIG, "train.task=sft", "loss.name=sft", "train.steps=1")
    result = tmp_path / "head.txt"
    run_distributed(head_vs_policy_worker, 1, RM_CONFIG, str(find_model_checkpoint(sft)), str(result))
    assert result.read_text() == "fresh"
