"""The quick-start's task and its stage runner (online rounds: tests/e2e/test_online.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rao_megatron import demo
from rao_megatron.cli.chain import CommandError
from rao_megatron.rewards.rule import exact_final_number
from rao_megatron.tasks.arithmetic import all_problems, split

ROOT = Path(__file__).resolve().parents[2]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_arithmetic_task_is_right_and_split_disjoint():
    rows = all_problems()
    assert len(rows) == 81 + 64 and len({r["id"] for r in rows}) == len(rows)
    by_id = {r["id"]: r for r in rows}
    assert by_id["add-3-5"]["prompt"] == "What is 3 + 5? Answer with just the number." and by_id["add-3-5"]["answer"] == 8
    assert by_id["mul-7-8"]["answer"] == 56 and "7 times 8" in by_id["mul-7-8"]["prompt"]
    for r in rows:  # the reference answer earns the full rule reward; a wrong number earns none
        assert exact_final_number(r["prompt"], r["reference"], r) == 1.0
        assert exact_final_number(r["prompt"], f"{r['answer'] + 1}", r) == 0.0
    train, heldout = split(40, seed=0)
    assert len(heldout) == 40 and len(train) == len(rows) - 40
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    assert split(40, seed=0) == (train, heldout) and split(40, seed=1)[1] != heldout
    with pytest.raises(ValueError, match="n_heldout"):
        split(0)


@pytest.fixture
def fake_stages(monkeypatch):
    """Stages that record their runs; the one named in ``fail`` raises once."""
    calls: list[str] = []
    fail: set[str] = set()

    def make(name):
        def run(s):
            calls.append(name)
            if name in fail:
                fail.discard(name)
                raise CommandError(f"{name} broke")
        return run

    stages = [demo.Stage(n, n, make(n)) for n in ("a", "b", "c", "d")] + [demo.Stage("e", "e", make("e"), extra="online"),
                                                                         demo.Stage("f", "f", make("f"), extra="lora")]
    monkeypatch.setattr(demo, "STAGES", stages)
    return calls, fail


def test_demo_reruns_skip_finished_stages_and_resume_after_a_failure(fake_stages, tmp_path):
    calls, fail = fake_stages
    s = demo.Settings(out=tmp_path / "run", hf=tmp_path / "hf", config=tmp_path / "c.yaml")
    fail.add("c")
    with pytest.raises(CommandError, match="c broke"):
        demo.run_demo(s)
    assert calls == ["a", "b", "c"]
    demo.run_demo(s)  # a and b are done; c is retried, then d
    assert calls == ["a", "b", "c", "c", "d"]
    demo.run_demo(s)
    assert calls == ["a", "b", "c", "c", "d"]
    demo.run_demo(s, start_from="c")
    assert calls[-2:] == ["c", "d"]
    calls.clear()
    demo.run_demo(s, extras=["online"])  # an optional stage runs only when its flag asks for it
    assert calls == ["e"]
    calls.clear()
    demo.run_demo(s, extras=["online", "lora"])
    assert calls == ["f"]
    calls.clear()
    demo.run_demo(tmp_path_settings := demo.Settings(out=tmp_path / "r2", hf=s.hf, config=s.config), until="b")
    assert calls == ["a", "b"] and not (tmp_path_settings.out / ".stages" / "c.done").exists()
    with pytest.raises(CommandError, match="no such stage"):
        demo.run_demo(s, start_from="nope")


def test_demo_lora_flag_adds_the_lora_stages_and_the_table_row(tmp_path, monkeypatch):
    """--lora: a LoRA RAO run in its own directory (the command line's overrides last), its merged export, and the
    row "RAO (LoRA)" once its answers exist; without the flag none of it."""
    commands: list[list[str]] = []
    monkeypatch.setattr(demo, "run_command", lambda argv: commands.append([str(a) for a in argv]))
    ran: list[str] = []
    monkeypatch.setattr(demo, "STAGES", [demo.Stage(st.name, st.what, lambda s, st=st: ran.append(st.name), st.extra)
                                         for st in demo.STAGES])
    args = demo.parser().parse_args(["--out", str(tmp_path / "run"), "--lora", "train.steps=2"])
    assert demo.main(args) == 0
    assert ran[-3:] == ["lora_train", "lora_export", "lora_answer"] and "online" not in ran
    ran.clear()
    assert demo.main(demo.parser().parse_args(["--out", str(tmp_path / "other")])) == 0
    assert not [n for n in ran if n.startswith("lora")]

    s = demo.Settings(out=tmp_path / "run", hf=tmp_path / "hf", config=tmp_path / "c.yaml", overrides=("train.lr=3e-4",))
    demo.stage_lora_train(s)
    demo.stage_lora_export(s)
    train, export = commands
    assert f"train.output_dir={s.p('rao_lora')}" in train and "peft.method=lora" in train
    assert train.index("train.lr=1.0e-4") < train.index("train.lr=3e-4")  # the command line has the last word
    assert export[export.index("--out") + 1] == str(s.p("rao_lora_hf")) and "--merge-lora" in export
    s.p("answers").mkdir(parents=True)
    assert [label for label, _ in demo._answer_sets(s)] == ["start (SmolLM2-135M-Instruct)", "RAO"]
    s.p("answers", "rao_lora.jsonl").write_text("")
    assert [label for label, _ in demo._answer_sets(s)][-1] == "RAO (LoRA)"


def test_demo_online_stage_runs_short_rounds_over_the_worked_references(tmp_path, monkeypatch):
    """--online: rao-online from the start on the GRAO prompt file (worked reference answers), 4 rounds of the
    next 32 prompts by default (4 x 32 / 8 groups per step = RAO's 16 steps), the flags passed through."""
    commands: list[list[str]] = []
    monkeypatch.setattr(demo, "run_command", lambda argv: commands.append([str(a) for a in argv]))
    monkeypatch.setattr(demo, "_generate", lambda *a, **k: None)
    monkeypatch.setattr(demo, "_evaluate", lambda *a, **k: None)
    seen: list[demo.Settings] = []
    monkeypatch.setattr(demo, "run_demo", lambda s, **k: seen.append(s))
    for argv, rounds, per_round in (([], 4, 32), (["--rounds", "6", "--prompts-per-round", "16"], 6, 16)):
        assert demo.main(demo.parser().parse_args(["--out", str(tmp_path / "run"), "--online", *argv])) == 0
        demo.stage_online(seen[-1])
        cmd = commands[-1]
        assert cmd[cmd.index("-m") + 1] == "rao_megatron.cli.online"
        assert cmd[cmd.index("--rounds") + 1] == str(rounds) and cmd[cmd.index("--prompts-per-round") + 1] == str(per_round)
        assert cmd[cmd.index("--prompts") + 1].endswith("train_prompts_grao.jsonl")
