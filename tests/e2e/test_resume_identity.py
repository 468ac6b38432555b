"""Resuming checks what wrote the checkpoint: task, loss and its settings, initial model, global batch, data.

A checkpoint of another run in ``train.output_dir`` is refused in one line naming the checkpoint's value and
this run's, before anything is written; ``checkpoint.resume=fresh`` starts afresh there and
``checkpoint.allow_changed_run=true`` continues on purpose. Checkpoints written before the run was recorded
still resume. (The refusals for other task, loss settings, global batch and initial model are rows of
``test_bad_inputs``.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rao_megatron.parallel.launch import run_distributed

from .train_workers import run_cli_worker

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "examples/configs/rao_tiny.yaml")
DPO = ("loss.name=dpo", "loss.z0=null")  # rao_tiny.yaml sets RAO's z0, which DPO does not take


def train(out: Path, *overrides: str, result: Path | None = None) -> tuple[str, str]:
    """The tiny RAO config into ``out``; ``(exit code, stderr)`` when ``result`` is given."""
    argv = ["--config", CONFIG, f"train.output_dir={out}", "train.eval_every=0", *overrides]
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.train", argv, str(result) if result else None)
    if result is None:
        return "0", ""
    code, err = result.read_text().split("\n", 1)
    return code, err


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of the run directory but TensorBoard's, with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "tensorboard" not in p.parts}


def test_a_dpo_run_into_a_rao_runs_directory_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=2")
    before = snapshot(out)
    assert "config.yaml" in before and "metrics.jsonl" in before
    code, err = train(out, "train.steps=3", *DPO, result=tmp_path / "r.txt")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == "2", err
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith(f"error: train.output_dir {out} holds a checkpoint of another run (step_0000002)"), line
    assert "loss.name: rao in the checkpoint, dpo now" in line, line
    for way_out in ("a new train.output_dir", "checkpoint.resume=fresh", "checkpoint.allow_changed_run=true"):
        assert way_out in line, line
    assert snapshot(out) == before, "config.yaml, metrics.jsonl or a checkpoint changed"


def test_allow_changed_run_continues_from_the_checkpoint_on_purpose(tmp_path, capfd):
    out = tmp_path / "run"
    train(out, "train.steps=2")
    first = records(out)
    capfd.readouterr()
    train(out, "train.steps=3", *DPO, "checkpoint.allow_changed_run=true")
    said = capfd.readouterr().out
    assert f"note: continuing {out / 'checkpoints' / 'step_0000002'} on purpose" in said, said
    assert "loss.name: rao in the checkpoint, dpo now" in said, said
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[:2] == first  # steps 1-2 are RAO's, step 3 DPO's
    assert "log_z" in recs[1] and "log_z" not in recs[2] and "rewards/margin" in recs[2]
    state = json.loads((out / "checkpoints" / "step_0000003" / "train_state.json").read_text())
    assert state["run"]["loss"]["name"] == "dpo"  # the next resume checks against the run that wrote it
    code, err = train(out, "train.steps=4", *DPO, result=tmp_path / "r.txt")
    assert code == "0", err


def test_fresh_starts_afresh_in_the_directory(tmp_path, capfd):
    out = tmp_path / "run"
    train(out, "train.steps=3", "checkpoint.save_every=1", "checkpoint.keep_last=5")
    capfd.readouterr()
    train(out, "train.steps=2", *DPO, "checkpoint.resume=fresh")
    said = capfd.readouterr().out
    assert f"deleted 3 checkpoints of an earlier run in {out / 'checkpoints'}" in said, said
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2] and all("log_z" not in r for r in recs)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]
    assert "name: dpo" in (out / "config.yaml").read_text()


def test_a_checkpoint_written_before_runs_were_recorded_still_resumes(tmp_path, capfd):
    out = tmp_path / "run"
    train(out, "train.steps=2")
    step = out / "checkpoints" / "step_0000002"
    state = json.loads((step / "train_state.json").read_text())
    del state["run"]  # as written before this change; its manifest records the old size
    (step / "train_state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["train_state.json"] = (step / "train_state.json").stat().st_size
    (step / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    capfd.readouterr()
    train(out, "train.steps=3")
    said = capfd.readouterr().out
    assert f"note: {step} records no task, loss or initial model" in said, said
    assert f"resumed from {step} at step 2" in said
    assert [r["step"] for r in records(out)] == [1, 2, 3]
