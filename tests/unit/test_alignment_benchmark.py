"""The alignment benchmark's split, probe and statistics (benchmarks/alignment.py) on hand-made runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import alignment as bench


def _groups(n: int) -> list[dict]:
    # every third group is tied (all answers wrong): the split must keep those on both sides
    return [{"id": f"p{i}", "prompt": f"q{i}", "answer": "1", "responses": ["a", "b", "c"],
             "rewards": [0.0, 0.0, 0.0] if i % 3 == 0 else [0.0, 1.0, 1.0]} for i in range(n)]


def _prompts(n: int) -> dict[str, dict]:
    """The prompt rows of ``_groups(n)``, each with a worked reference answer (GRAO's y)."""
    return {f"p{i}": {"id": f"p{i}", "prompt": f"q{i}", "answer": "1", "reference": "0 + 1 = 1"} for i in range(n)}


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
    # the same constant difference on every seed and prompt: every interval of it has zero width
    assert dpo["rao_minus_this"]["ci_two_level"] == pytest.approx([0.25, 0.25])
    assert dpo["rao_minus_this"]["ci_t"] == pytest.approx([0.25, 0.25])
    assert dpo["rao_minus_this"]["seeds_rao_ahead"] == 2 and "2 of 2" in bench.interval_table(s)
    assert "— (not kept)" in bench.table(s)  # runs stored without a metric summary


class _FakeRunner:
    """Records every run asked for; validation accuracy depends on the point's lr, held-out on the seed."""

    start_ckpt = Path("start")

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict, int, str]] = []
        self.schedules: list[dict | None] = []
        self.online: list[tuple[dict | None, Path]] = []

    def run(self, *, setting, method, point, seed, data, eval_name, eval_prompts, probe, schedule=None, online=None):
        self.calls.append((setting, method, point, seed, eval_name))
        self.schedules.append(schedule)
        self.online.append((online, data))
        acc = 0.9 if point.get("train.lr") == 3e-6 else 0.5
        r = _run(seed, {"p0": [1, 0], "p1": [int(seed % 2), 1]}, 0.1) | {"accuracy": acc}
        if online:  # two rounds of 4 groups, 3 and then 1 of them informative; answers getting longer
            r["rounds"] = [{"round": 1, "sample_reward": 0.25, "answer_length": 10.0, "steps": 2, "groups": 4,
                            "informative_groups": 3},
                           {"round": 2, "sample_reward": 0.5 + seed, "answer_length": 12.0, "steps": 2, "groups": 4,
                            "informative_groups": 1}]
            r["answer_length"] = 11.0 + seed
        if schedule:  # validation at each step: best at the second checkpoint for β 0.5
            best = schedule["eval_steps"][1] if point.get("loss.beta") == 0.5 and len(schedule["eval_steps"]) > 1 \
                else None
            r["by_step"] = {str(s): {"accuracy": acc + (0.05 if s == best else 0.0)} for s in schedule["eval_steps"]}
        return r


@pytest.mark.parametrize("transfer", [False, True])
def test_rm_setting_keeps_the_rule_grid_point_or_tunes_its_own(tmp_path, monkeypatch, transfer):
    monkeypatch.setattr(bench, "forward_logps", lambda *a, **k: {0: -1.0})
    args = type("A", (), {"out": tmp_path, "methods": "dpo,rao", "rm_methods": None, "report": False,
                          "grid_points": 99, "seed_list": [1, 2], "bootstrap": 50, "steps": 12,
                          "global_batch_groups": 8})()
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
                          "grid_points": 99, "seed_list": [1], "bootstrap": 50, "steps": 12,
                          "global_batch_groups": 8})()
    data = bench.write_jsonl(_groups(6), tmp_path / "train.jsonl")
    rule_runner = _FakeRunner()
    rule, _ = bench.run_setting(args, rule_runner, "rule", data, tmp_path / "v", tmp_path / "h", _prompts(6))
    assert set(rule["methods"]) == {"dpo", "simpo", "rpo", "rao", "grao"}  # --rm-methods leaves rule alone
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


# ------------------------------------------------------------------------------------------------------------
# seed-level intervals (#29)
# ------------------------------------------------------------------------------------------------------------

def test_two_level_bootstrap_is_wider_than_prompts_alone_when_seeds_disagree():
    # seed 1 answers every prompt right, seed 2 every prompt wrong: averaged over the seeds every prompt is at
    # 0.5, so resampling prompts alone gives [0.5, 0.5]; resampling the seeds first gives 0, 0.5 or 1 with
    # probabilities 1/4, 1/2, 1/4
    cells = {"m": {1: {"p0": 1.0, "p1": 1.0, "p2": 1.0}, 2: {"p0": 0.0, "p1": 0.0, "p2": 0.0}}}
    prompt_only = bench.bootstrap({"m": {"p0": 0.5, "p1": 0.5, "p2": 0.5}}, 400, seed=0)["m"]
    assert bench.interval(prompt_only) == pytest.approx((0.5, 0.5))
    for nested in (False, True):
        draws = bench.two_level_bootstrap(cells, 400, seed=0, nested=nested)["m"]
        assert set(draws) == {0.0, 0.5, 1.0}
        assert draws.count(0.5) / 400 == pytest.approx(0.5, abs=0.1)
        assert bench.interval(draws) == (0.0, 1.0)


def test_two_level_bootstrap_by_hand_two_seeds_three_prompts():
    a = {1: {"p0": 1.0, "p1": 0.0, "p2": 0.5}, 2: {"p0": 0.5, "p1": 0.0, "p2": 1.0}}
    b = {s: {i: x - 0.25 for i, x in v.items()} for s, v in a.items()}  # 0.25 behind on every seed and prompt
    draws = bench.two_level_bootstrap({"a": a, "b": b}, 50, seed=3)
    assert [x - y for x, y in zip(draws["a"], draws["b"])] == pytest.approx([0.25] * 50)  # paired: same draws
    # one replicate by hand, from the same random stream: two seeds drawn, then one resample of the three
    # prompts that every drawn seed shares (seeds and prompts are crossed here)
    rng = bench.random.Random(3)
    seeds = [[1, 2][rng.randrange(2)] for _ in range(2)]
    prompts = [["p0", "p1", "p2"][rng.randrange(3)] for _ in range(3)]
    assert draws["a"][0] == pytest.approx(sum(a[s][p] for s in seeds for p in prompts) / 6)
    # nested: a resample of the prompts for each drawn seed
    nested = bench.two_level_bootstrap({"a": a}, 1, seed=3, nested=True)["a"][0]
    rng = bench.random.Random(3)
    seeds = [[1, 2][rng.randrange(2)] for _ in range(2)]
    picks = [(s, [["p0", "p1", "p2"][rng.randrange(3)] for _ in range(3)]) for s in seeds]
    assert nested == pytest.approx(sum(a[s][p] for s, ps in picks for p in ps) / 6)
    with pytest.raises(ValueError, match="other seeds"):
        bench.two_level_bootstrap({"a": a, "b": {1: a[1]}}, 10, seed=0)


def test_paired_t_interval_over_seeds_by_hand():
    # three seeds, RAO − DPO per seed 0.00, +0.10, +0.20: mean 0.10, sd 0.10, t(2) = 4.303
    ids = ["p0", "p1", "p2"]
    dpo = {1: [0, 0], 2: [0, 0], 3: [0, 0]}          # every answer wrong
    rao = {1: [0, 0], 2: [1, 0], 3: [1, 1]}          # right on p0 only: seed accuracy 0, 1/6, 1/3
    finals = {"dpo": [_run(s, {i: v if i == "p0" else [0, 0] for i in ids}, 0.1) for s, v in dpo.items()],
              "rao": [_run(s, {i: v if i == "p0" else [0, 0] for i in ids}, 0.1) for s, v in rao.items()]}
    tuned = {m: {"point": {}, "validation": 0.5, "tuned_in": "rule"} for m in finals}
    s = bench.summarise("rule", finals, tuned, {"dpo": 1, "rao": 1}, reps=200)
    d = s["methods"]["dpo"]["rao_minus_this"]
    assert d["per_seed"] == pytest.approx([0.0, 1 / 6, 1 / 3])
    mean, sd = 1 / 6, 1 / 6                          # per-seed differences 0, 1/6, 1/3
    half = 4.303 * sd / math.sqrt(3)
    assert d["ci_t"] == pytest.approx([mean - half, mean + half])
    assert s["methods"]["rao"]["ci_t"] == pytest.approx([mean - half, mean + half])  # DPO is at 0 on every seed
    assert d["seeds_rao_ahead"] == 2 and d["seeds"] == [1, 2, 3]
    assert bench.t_interval([0.3])[0] != bench.t_interval([0.3])[0]  # one seed: no interval (NaN)


def test_metric_summary_keeps_log_z_trajectory_and_last_step():
    records = [{"step": 1, "loss": 1.0, "log_z": 2.7, "tied_share": 0.25, "ranking_accuracy": float("nan")},
               {"step": 2, "loss": 0.5, "log_z": 2.2, "tied_share": 0.5, "ranking_accuracy": 0.75},
               {"eval/loss": 0.4}]  # not a training step
    s = bench.metric_summary(records)
    assert s == {"steps": 2, "log_z": [2.7, 2.2], "tied_share": [0.25, 0.5],
                 "last": {"ranking_accuracy": 0.75, "tied_share": 0.5, "log_z": 2.2}}
    assert bench.metric_summary([{"step": 1, "loss": 1.0, "ranking_accuracy": float("nan")}]) == \
        {"steps": 1, "last": {"ranking_accuracy": None}}  # a pairwise loss: no log Z, NaN -> None


def test_informative_visits_measured_dropped_or_expected():
    kw = {"groups": 80, "differing": 54, "steps": 2, "batch": 8}
    measured = {"metrics_summary": {"tied_share": [0.25, 0.5]}}
    assert bench.informative_visits(measured, drops_tied=False, **kw) == (8 * 0.75 + 8 * 0.5, "measured")
    assert bench.informative_visits({}, drops_tied=True, **kw) == (16.0, "all")
    assert bench.informative_visits({}, drops_tied=False, **kw) == (pytest.approx(16 * 54 / 80), "expected")
    config = {"resolved_config": {"train": {"steps": 12, "global_batch_groups": 8}}}  # the run's own schedule
    assert bench.informative_visits(config, drops_tied=False, **kw)[0] == pytest.approx(96 * 54 / 80)
    assert bench.drops_tied("dpo", {}) and not bench.drops_tied("rao", {})
    assert bench.drops_tied("rao_drop_tied", bench.VARIANTS["rao_drop_tied"][1])


def test_every_method_has_a_grid_of_the_same_size_in_every_setting():
    for setting in bench.SETTING_METHODS:
        sizes = {m: len(g) for m, g in bench.grids_of(setting).items()}
        assert len(set(sizes.values())) == 1, (setting, sizes)
    assert all(p["train.min_lr"] <= p["train.lr"] for g in bench.RM_K2_GRIDS.values() for p in g)


def test_best_worst_keeps_two_answers_and_their_scores():
    groups = [{"id": "a", "prompt": "q", "responses": ["w", "x", "y", "z"], "rewards": [0.3, -1.5, 2.0, 2.0]},
              {"id": "b", "prompt": "q", "responses": ["w", "x"], "rewards": [1.0, 1.0]},
              {"id": "c", "prompt": "q", "responses": ["w"], "rewards": [1.0]}]
    out = bench.best_worst(groups)
    assert [(g["responses"], g["rewards"]) for g in out] == [(["y", "x"], [2.0, -1.5]), (["w", "x"], [1.0, 1.0])]
    assert bench.k2_schedule(80, 8, 3) == {"steps": 30, "save_every": 10}


def test_rm_k2_tunes_point_and_checkpoint_on_validation(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "forward_logps", lambda *a, **k: {0: -1.0})
    args = type("A", (), {"out": tmp_path, "methods": "dpo,rao,rao_drop_tied", "rm_methods": None, "report": False,
                          "grid_points": 99, "seed_list": [1, 2], "bootstrap": 50, "global_batch_groups": 2,
                          "k2_epochs": 3, "steps": 12})()
    data = bench.write_jsonl(bench.best_worst(_groups(6)), tmp_path / "k2.jsonl")
    runner = _FakeRunner()
    k2, _ = bench.run_setting(args, runner, "rm_k2", data, tmp_path / "v", tmp_path / "h", {})
    grid = [(c, sch) for c, sch in zip(runner.calls, runner.schedules) if c[4] == "validation"]
    assert len(grid) == 2 * len(bench.RM_K2_GRIDS["dpo"])  # its own grid, never the rule setting's
    assert all(sch == {"steps": 9, "save_every": 3, "eval_steps": [3, 6, 9]} for _, sch in grid)
    # dpo: β 0.5 at 3e-6 is best at its second checkpoint (0.55 > 0.5); the seeds are answered at that step
    assert k2["grids"]["dpo"]["point"] == bench.RM_K2_GRIDS["dpo"][1] and k2["grids"]["dpo"]["eval_step"] == 6
    heldout = [(c, sch) for c, sch in zip(runner.calls, runner.schedules) if c[4] == "heldout"]
    assert {(c[1], sch["eval_steps"][0]) for c, sch in heldout if c[1] == "dpo"} == {("dpo", 6)}
    assert k2["methods"]["dpo"]["eval_step"] == 6 and "step 6" in bench.table(k2)
    # the variant drops tied groups: 4 of the 6 groups differ (the K2 cut keeps the all-wrong ones tied)
    assert k2["methods"]["rao_drop_tied"]["groups_used"] == 4 and k2["methods"]["rao"]["groups_used"] == 6
    assert k2["methods"]["rao_drop_tied"]["informative_visits"] == (18.0) and \
        k2["methods"]["rao"]["informative_visits"] == pytest.approx(18 * 4 / 6)


def test_online_setting_keeps_rule_points_trains_on_prompts_and_counts_rounds(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "forward_logps", lambda *a, **k: {0: -1.0})
    args = type("A", (), {"out": tmp_path, "methods": None, "online_methods": "grao,dpo", "report": False,
                          "grid_points": 99, "seed_list": [1, 2], "bootstrap": 50, "steps": 12,
                          "global_batch_groups": 8, "online_rounds": 2, "online_prompts": 4})()
    groups = bench.write_jsonl(_groups(6), tmp_path / "train.jsonl")
    prompts = bench.write_jsonl(list(_prompts(6).values()), tmp_path / "prompts.jsonl")
    rule_runner = _FakeRunner()
    rule, _ = bench.run_setting(args, rule_runner, "rule", groups, tmp_path / "v", tmp_path / "h", _prompts(6))
    grao_data = {d for (o, d), c in zip(rule_runner.online, rule_runner.calls) if c[1] == "grao"}
    assert len(grao_data) == 1 and all(  # offline GRAO trains on the groups with the prompt's reference added
        r["reference"] == "0 + 1 = 1" and r["reference_reward"] == 1.0 for r in bench.read_jsonl(grao_data.pop()))
    assert rule["grids"]["grao"]["point"] == bench.GRIDS["grao"][2]  # GRAO tuned on its own grid (lr 3e-6 best)
    runner = _FakeRunner()
    online, _ = bench.run_setting(args, runner, "online", prompts, tmp_path / "v", tmp_path / "h", {},
                                  rule["grids"], groups_file=groups)
    assert [c[4] for c in runner.calls] == ["heldout"] * 4  # the rule grid's points: no grid of its own
    assert all(o == ({"rounds": 2, "prompts_per_round": 4}, prompts) for o in runner.online)  # prompts, not groups
    assert all(c[2] == rule["grids"][c[1]]["point"] for c in runner.calls)
    grao, dpo = online["methods"]["grao"], online["methods"]["dpo"]
    # trained on: GRAO every group of both rounds (8), DPO only the informative ones (3 + 1); visits: informative
    assert grao["groups_used"] == 8 and dpo["groups_used"] == 4
    assert grao["informative_visits"] == 4 and grao["informative_visits_how"] == "rounds"
    assert online["tied_groups"] == 2 and online["probe_answers"] == 4  # from the start model's groups
    # means over the seeds: round 2's reward is 0.5 + seed -> 2.0; the held-out answer length 11 + seed -> 12.5
    assert grao["rounds"][1]["sample_reward"] == pytest.approx(2.0) and grao["answer_length"] == pytest.approx(12.5)
    assert "| grao | 0.250, 10.0 | 2.000, 12.0 |" in bench.rounds_table(online)
    assert "| 12.5 |" in bench.table(online)


def test_a_method_with_fewer_seeds_is_compared_on_the_seeds_both_have():
    ids = ["p0", "p1"]
    rao = [_run(1, {i: [1, 0] for i in ids}, 0.1), _run(2, {i: [0, 0] for i in ids}, 0.1)]  # 0.5, then 0
    half = [_run(1, {i: [1, 1] for i in ids}, 0.1)]                                           # seed 1 only: 1.0
    finals = {"rao": rao, "rao_drop_tied": half}
    tuned = {m: {"point": {}, "validation": 0.5, "tuned_in": "rule"} for m in finals}
    s = bench.summarise("rule", finals, tuned, {"rao": 2, "rao_drop_tied": 1}, reps=100)
    d = s["methods"]["rao_drop_tied"]["rao_minus_this"]
    assert d["seeds"] == [1] and d["mean"] == pytest.approx(-0.5)  # seed 1: 0.5 − 1.0, not RAO's two-seed mean
    assert d["ci_two_level"] == pytest.approx([-0.5, -0.5]) and d["ci"] == pytest.approx([-0.5, -0.5])
    assert "(1 common seed)" in bench.table(s)


def test_task_prompts_take_the_tasks_worked_reference_answers(tmp_path, capsys):
    from rao_megatron.tasks.arithmetic import all_problems

    rows = all_problems()[:3]
    stale = [{**r, "reference": str(r["answer"])} for r in rows]  # a run directory made before #30
    prompts = bench.task_prompts(bench.write_jsonl(stale, tmp_path / "p.jsonl"))
    assert [prompts[r["id"]]["reference"] for r in rows] == [r["reference"] for r in rows]
    assert " = " in rows[0]["reference"] and "3 of 3 reference answers predate" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not the arithmetic task's"):
        bench.task_prompts(bench.write_jsonl([{**rows[0], "answer": -1}], tmp_path / "q.jsonl"))
