"""Reward-model pipeline through the CLIs: BT training learns a synthetic preference, TP/PP-invariant scores,
initialisation from an SFT policy checkpoint, annotation by model."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest

from rao_megatron.parallel.launch import run_distributed
from rao_megatron.rewards.scorers import find_model_checkpoint
from rao_megatron.rewards.synthetic import marker_groups, marker_pairs, write_jsonl
from rao_megatron.training.rm_report import rm_report

from .rm_workers import rm_init_worker
from .train_workers import run_cli_worker

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
RM_CONFIG = str(ROOT / "examples/configs/rm_tiny.yaml")
RAO_CONFIG = str(ROOT / "examples/configs/rao_tiny.yaml")


def records(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def train(out: Path, config: str, *overrides: str, world: int = 1) -> Path:
    run_distributed(run_cli_worker, world, "rao_megatron.cli.train",
                    ["--config", config, f"train.output_dir={out}", *overrides])
    return out


def annotate(data: Path, out: Path, model: Path, *extra: str, world: int = 1) -> list[list[float]]:
    run_distributed(run_cli_worker, world, "rao_megatron.cli.annotate",
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
    assert final["eval/pairs"] == 64 and final["eval/groups"] == 64
    assert final["eval/rewards/margin"] > 0 and final["eval/loss"] < 0.3
    # the Table-1-style report the run wrote at its end
    table = (out / "rm_report.md").read_text()
    assert table == rm_report(records(out), title=f"Reward model {out}") + "\n"
    assert table.startswith(f"Reward model {out}: held-out preference pairs (64 pairs, 64 groups)")
    cells = [c.strip() for c in table.splitlines()[4].split("|")[1:-1]]
    assert cells[:2] == ["final", "12"]
    assert [float(c) for c in cells[2:5]] == pytest.approx([final["loss"], final["eval/loss"], final["eval/accuracy"]],
                                                           rel=1e-2)


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
    # interrupted after 4 rows, then rerun with the same command: the same file as one uninterrupted run
    resumed = tmp_path / "resumed.jsonl"
    args = ("--chunk-rows", "4")
    run_distributed(run_cli_worker, 2, "rao_megatron.cli.annotate",
                    ["--data", str(groups), "--out", str(resumed), "--reward-model", str(out), "--no-progress",
                     "--max-length", "48", "--batch-size", "2", *args, "--stop-after", "4"])
    assert not resumed.exists() and json.loads(Path(f"{resumed}.progress.json").read_text())["rows_done"] == 4
    annotate(groups, resumed, out, "--batch-size", "2", *args, world=2)
    assert resumed.read_text() == (tmp_path / "dp2.jsonl").read_text()


def test_rm_from_an_sft_checkpoint_trains_at_tp2_and_pp2(tmp_path):
    sft = train(tmp_path / "sft", RAO_CONFIG, "train.task=sft", "loss.name=sft", "train.steps=2")
    init = find_model_checkpoint(sft)
    common = [f"model.init_checkpoint={init}", "train.steps=3", "loss.pairing=all_pairs", "loss.margin=0.5",
              "loss.centering=0.01", f"data.train_path={ROOT / 'examples/data/tiny_groups.jsonl'}",
              "data.eval_path=null", "data.eval_fraction=0.125", "data.max_length=64", "checkpoint.save_at_end=false"]
    tp2 = train(tmp_path / "tp2", RM_CONFIG, *common, "parallel.tp=2", world=2)
    pp2 = train(tmp_path / "pp2", RM_CONFIG, *common, "parallel.pp=2", world=2)
    dp2 = train(tmp_path / "dp2", RM_CONFIG, *common, world=2)
    losses = [r["loss"] for r in records(tp2)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    for other in (pp2, dp2):
        assert [r["loss"] for r in records(other)] == pytest.approx(losses, rel=1e-4, abs=1e-6)
        # held-out accuracy pools every pair, whichever rank or stage scored it
        for key in ("eval/pairs", "eval/groups", "eval/loss"):
            assert records(other)[-1][key] == pytest.approx(records(tp2)[-1][key], rel=1e-4)
        # a pair whose two scores nearly tie may order differently in another summation order: one pair of slack
        pairs = records(tp2)[-1]["eval/pairs"]
        assert records(other)[-1]["eval/accuracy"] == pytest.approx(records(tp2)[-1]["eval/accuracy"],
                                                                    abs=1.0 / pairs + 1e-12)
    assert records(tp2)[-1]["eval/groups"] == 8 and records(tp2)[-1]["eval/pairs"] > 8  # all_pairs of K = 4


def test_rm_head_is_fresh_when_initialised_from_a_policy(tmp_path):
    """A policy's vocab output layer is not read into the scalar head (it would be vocab row 0)."""
    sft = train(tmp_path / "sft", RAO_CONFIG, "train.task=sft", "loss.name=sft", "train.steps=1")
    got = inspect_rm_init(find_model_checkpoint(sft), tmp_path / "head.json")
    assert got == {"head_shape": [1, 64], "head_is_fresh": True, "head_is_saved_row0": False,
                   "embedding_is_saved": True}


def test_rm_initialised_from_a_reward_model_keeps_its_head(trained_rm, tmp_path):
    out, _ = trained_rm
    got = inspect_rm_init(find_model_checkpoint(out), tmp_path / "head.json")
    assert got == {"head_shape": [1, 64], "head_is_fresh": False, "head_is_saved_row0": True,
                   "embedding_is_saved": True}


def inspect_rm_init(init_checkpoint: Path, result: Path) -> dict:
    run_distributed(rm_init_worker, 1, RM_CONFIG, str(init_checkpoint), str(result))
    return json.loads(result.read_text())


def readme_rm_walkthrough() -> list[list[str]]:
    """The commands of the README's "Reward model" code block, one argv each (``\\`` continuations joined)."""
    section = (ROOT / "README.md").read_text().split("\n## Reward model\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_walkthrough_ultrafeedback_to_rm_to_rao(tmp_path, monkeypatch):
    """UltraFeedback file -> RM (rm_tiny.yaml) -> accuracy table -> annotated groups -> RAO, as the README runs it."""
    monkeypatch.chdir(ROOT)  # the configs name their data relative to the repository root
    commands = readme_rm_walkthrough()
    assert [c[:3] for c in commands] == [["python", "-m", "rao_megatron.cli.train"], ["cat", "runs/rm_tiny/rm_report.md"],
                                         ["python", "-m", "rao_megatron.cli.annotate"], ["python", "-m", "rao_megatron.cli.train"]]

    def local(arg: str) -> str:  # the README runs from the repository root and writes under runs/
        for prefix, base in (("runs/", tmp_path / "runs"), ("examples/", ROOT / "examples")):
            arg = arg.replace(prefix, f"{base}/") if arg.startswith(prefix) or f"={prefix}" in arg else arg
        return arg

    train_rm, show, annotate_cmd, train_rao = [[local(a) for a in c] for c in commands]
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.train", train_rm[3:] + [f"train.output_dir={tmp_path}/runs/rm_tiny"])
    report = Path(show[1]).read_text()
    final = report.splitlines()[4].split("|")
    assert final[1].strip() == "final" and float(final[5]) >= 0.95, report
    assert "(128 pairs, 64 groups)" in report  # 64 held-out UltraFeedback rows of 3: best vs the 2 others

    run_distributed(run_cli_worker, 1, "rao_megatron.cli.annotate", annotate_cmd[3:] + ["--no-progress"])
    scored = [json.loads(x) for x in (tmp_path / "runs/tiny_rm_scored.jsonl").read_text().splitlines()]
    assert len(scored) == 256 and all(len(r["rewards"]) == len(r["responses"]) == 3 for r in scored)
    # the reward model agrees with the human ratings it was trained on: the "!" response scores highest
    agree = sum(max(range(3), key=r["rewards"].__getitem__) == next(j for j, y in enumerate(r["responses"]) if "!" in y)
                for r in scored)
    assert agree / len(scored) >= 0.95

    run_distributed(run_cli_worker, 1, "rao_megatron.cli.train", train_rao[3:] + ["train.steps=2"])
    rao = records(tmp_path / "runs/rao_tiny_rm")
    assert [r["step"] for r in rao] == [1, 2] and all(math.isfinite(r["loss"]) for r in rao)
    assert "rewards/gap" in rao[-1] and "eval/loss" in rao[-1]
