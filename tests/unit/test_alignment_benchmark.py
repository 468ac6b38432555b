"""The alignment benchmark's split, probe and statistics (benchmarks/alignment.py) on hand-made runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import alignment as bench


def _groups(n: int) -> list[dict]:
    # every third group is tied (all answers wrong): the split must keep those on both sides
    return [{"id": f"p{i}", "prompt": f"q{i}", "responses": ["a", "b", "c"],
             "rewards": [0.0, 0.0, 0.0] if i % 3 == 0 else [0.0, 1.0, 1.0]} for i in range(n)]


def test_split_is_by_prompt_before_filtering_and_seeded():
    groups = _groups(30)
    train, val = bench.split_groups(groups, 6, seed=0)
    assert len(train) == 24 and len(val) == 6
    assert {g["id"] for g in train}.isdisjoint({g["id"] for g in val})
    assert {g["id"] for g in train + val} == {g["id"] for g in groups}
    assert any(not bench.differs(g) for g in train) and any(bench.differs(g) for g in train)
    assert bench.split_groups(list(reversed(groups)), 6, seed=0) == (train, val)  # input order does not matter
    assert bench.split_groups(groups, 6, seed=1)[1] != val


def test_probe_is_the_first_best_answer_of_groups_whose_rewards_differ():
    probe = bench.preferred_probe(_groups(6))
    assert [p["id"] for p in probe] == ["p1", "p2", "p4", "p5"]
    assert all(p["responses"] == ["b"] and p["rewards"] == [1.0] for p in probe)


def _run(seed: int, scores: dict[str, list[int]], share: float) -> dict:
    flat = [x for v in scores.values() for x in v]
    return {"seed": seed, "scores": scores, "accuracy": sum(flat) / len(flat), "train_seconds": 10.0,
            "probe": {"share_lowered": share, "mean_delta_r": 0.5 - share}}


def test_paired_statistics_by_hand():
    ids = [f"p{i}" for i in range(8)]
    base = {i: [1, 0, 0, 0] if k % 2 else [1, 1, 0, 0] for k, i in enumerate(ids)}  # 0.375 on average
    better = {i: v[:2] + [1, 0] for i, v in base.items()}                            # +0.25 on every prompt
    finals = {"dpo": [_run(1, base, 0.2), _run(2, base, 0.4)], "rao": [_run(1, better, 0.1), _run(2, better, 0.3)]}
    tuned = {m: {"point": {"train.lr": 1e-5}, "validation": 0.5, "tuned_in": "rule"} for m in finals}
    s = bench.summarise("rule", finals, tuned, {"dpo": 6, "rao": 8}, reps=500)
    rao, dpo = s["methods"]["rao"], s["methods"]["dpo"]
    assert dpo["accuracy"] == pytest.approx(0.375) and rao["accuracy"] == pytest.approx(0.625)
    # paired over the same resampled prompts: a constant +0.25 per prompt has a zero-width interval
    assert dpo["rao_minus_this"]["mean"] == pytest.approx(0.25)
    assert dpo["rao_minus_this"]["ci"] == pytest.approx([0.25, 0.25])
    assert dpo["ci"][0] < 0.375 < dpo["ci"][1]
    # displacement share over seeds: mean 0.3, t(1) interval 12.706 * sd / sqrt(2)
    assert dpo["share_lowered"]["mean"] == pytest.approx(0.3)
    assert dpo["share_lowered"]["ci95"] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert dpo["groups_used"] == 6 and "rao_minus_this" not in rao
    assert "| rao |" in bench.table(s) and "+0.250 [+0.250, +0.250]" in bench.table(s)


class _FakeRunner:
    """Records every run asked for; validation accuracy depends on the point's lr, held-out on the seed."""

    start_ckpt = Path("start")

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict, int, str]] = []

    def run(self, *, setting, method, point, seed, data, eval_name, eval_prompts, probe):
        self.calls.append((setting, method, point, seed, eval_name))
        acc = 0.9 if point.get("train.lr") == 3e-6 else 0.5
        return _run(seed, {"p0": [1, 0], "p1": [int(seed % 2), 1]}, 0.1) | {"accuracy": acc}


@pytest.mark.parametrize("transfer", [False, True])
def test_rm_setting_keeps_the_rule_grid_point_or_tunes_its_own(tmp_path, monkeypatch, transfer):
    monkeypatch.setattr(bench, "forward_logps", lambda *a, **k: {0: -1.0})
    args = type("A", (), {"out": tmp_path, "methods": "dpo,rao", "rm_methods": None, "report": False,
                          "grid_points": 99, "seed_list": [1, 2], "bootstrap": 50})()
    data = bench.write_jsonl(_groups(6), tmp_path / "train.jsonl")
    rule_runner = _FakeRunner()
    rule, _ = bench.run_setting(args, rule_runner, "rule", data, tmp_path / "v", tmp_path / "h", {})
    assert {c[4] for c in rule_runner.calls} == {"validation", "heldout"}
    assert rule["grids"]["dpo"]["point"] == {"train.lr": 3e-6, "loss.beta": 0.1}  # the best validation point
    rm_runner = _FakeRunner()
    kept = rule["grids"] if transfer else None
    rm, _ = bench.run_setting(args, rm_runner, "rm", data, tmp_path / "v", tmp_path / "h", {}, kept)
    validation_runs = [c for c in rm_runner.calls if c[4] == "validation"]
    assert len(validation_runs) == (0 if transfer else len(bench.GRIDS["dpo"]) + len(bench.GRIDS["rao"]))
    heldout = [c for c in rm_runner.calls if c[4] == "heldout"]
    assert [(c[1], c[3]) for c in heldout] == [("dpo", 1), ("rao", 1), ("dpo", 2), ("rao", 2)]
    assert all(c[2] == rule["grids"][c[1]]["point"] for c in heldout)
    assert rm["methods"]["dpo"]["tuned_in"] == ("rule" if transfer else "rm")
    assert ("rule grid" in bench.table(rm)) == transfer


def test_a_variant_trains_at_its_base_methods_point_without_a_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "forward_logps", lambda *a, **k: {0: -1.0})
    args = type("A", (), {"out": tmp_path, "methods": None, "rm_methods": "rao,rao_fixed_logz", "report": False,
                          "grid_points": 99, "seed_list": [1], "bootstrap": 50})()
    data = bench.write_jsonl(_groups(6), tmp_path / "train.jsonl")
    rule_runner = _FakeRunner()
    rule, _ = bench.run_setting(args, rule_runner, "rule", data, tmp_path / "v", tmp_path / "h", {})
    assert set(rule["methods"]) == {"dpo", "simpo", "rpo", "rao"}  # --rm-methods leaves the rule setting alone
    rm_runner = _FakeRunner()
    rm, _ = bench.run_setting(args, rm_runner, "rm", data, tmp_path / "v", tmp_path / "h", {}, rule["grids"])
    assert [c[4] for c in rm_runner.calls] == ["heldout", "heldout"]  # no grid: the kept points
    base = rule["grids"]["rao"]["point"]
    assert rm_runner.calls[1][1:3] == ("rao_fixed_logz", {**base, "loss.prefix_consistency": False})
    assert rm["methods"]["rao_fixed_logz"]["tuned_in"] == "rule" and "rao_minus_this" in rm["methods"]["rao_fixed_logz"]
    assert "(rao's 0.900, rule grid)" in bench.table(rm)  # the validation figure is its base method's
    # in a setting that tunes its base: the base's grid, then the variant at the chosen point
    args.methods, own = "rao,rao_fixed_logz", _FakeRunner()
    rule, _ = bench.run_setting(args, own, "rule", data, tmp_path / "v", tmp_path / "h", {})
    assert [c[1] for c in own.calls if c[4] == "validation"] == ["rao"] * len(bench.GRIDS["rao"])
    assert rule["grids"]["rao_fixed_logz"]["point"] == {**rule["grids"]["rao"]["point"], "loss.prefix_consistency": False}
    args.methods = "rao_fixed_logz"  # without its base there is no point to train at
    with pytest.raises(SystemExit, match="add rao to the rule setting"):
        bench.run_setting(args, _FakeRunner(), "rule", data, tmp_path / "v", tmp_path / "h", {})


def test_a_variant_trains_its_base_loss_with_its_overrides(tmp_path, monkeypatch):
    commands = []

    def fake_command(cmd):
        commands.append([str(c) for c in cmd])
        raise SystemExit  # stop after the training command: only its overrides matter here

    monkeypatch.setattr(bench, "run_command", fake_command)
    args = type("A", (), {"out": tmp_path, "steps": 1, "global_batch_groups": 1, "start_id": "x", "k": 1,
                          "temperature": 1.0, "max_new_tokens": 1, "report": False, "reuse": None, "procs": 1})()
    data = bench.write_jsonl(_groups(2), tmp_path / "train.jsonl")
    runner = bench.Runner(args, tmp_path / "start", tmp_path / "ref.safetensors")
    with pytest.raises(SystemExit):
        runner.run(setting="rm", method="rao_fixed_logz", point={**bench.GRIDS["rao"][0], "loss.prefix_consistency": False}, seed=1, data=data,
                   eval_name="heldout", eval_prompts=data, probe=None)
    assert "loss.name=rao" in commands[0] and "loss.prefix_consistency=False" in commands[0]
