"""Rule rewards, the RM report, and annotation by rule function: formats, rejected rows, resume, Parquet."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest

from rao_megatron.data import read_examples
from rao_megatron.rewards.rule import (
    RowError,
    exact_final_number,
    extract_final_number,
    letter_share,
    load_reward_fn,
)
from rao_megatron.training.rm_report import count_pairs, rm_report, write_rm_report

DATA = Path(__file__).resolve().parents[1] / "data"
ROOT = DATA.parents[1]
MIXED = DATA / "annotate_mixed.jsonl"
THIS = "tests.unit.test_rewards"


# -- reward functions used through --reward-fn (module-level so that they import by name) ---------------

def length_reward(prompt, response: str) -> float:
    """Length of the response; NaN for a response reading "NAN" (a broken reward function)."""
    return math.nan if response == "NAN" else float(len(response))


def counting_reward(prompt, response: str, row: dict) -> float:
    """Letter share, logging each call (RAO_TEST_CALLS) and crashing on call RAO_TEST_CRASH_AT."""
    log = Path(os.environ["RAO_TEST_CALLS"])
    with log.open("a") as f:
        f.write(json.dumps([row["prompt"], response]) + "\n")
    calls = sum(1 for _ in log.open())
    if calls == int(os.environ.get("RAO_TEST_CRASH_AT", "0")):
        raise RuntimeError("simulated crash")
    return letter_share(prompt, response)


def annotate_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``python -m rao_megatron.cli.annotate`` in-process (rule functions need no process group)."""
    from rao_megatron import annotate
    from rao_megatron.cli.common import run_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(annotate.main, annotate.parser(), [*argv, "--no-progress"])
    return code, out.getvalue(), err.getvalue()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- rule functions ------------------------------------------------------------------------------------

def test_letter_share_matches_the_tiny_data():
    assert letter_share("Repeat the letter g.", "cggfggg") == pytest.approx(5 / 7)
    assert letter_share([{"role": "user", "content": "Repeat the letter d."}], "dd d h") == 0.75
    for row in rows(ROOT / "examples/data/tiny_groups.jsonl")[:8]:
        got = [letter_share(row["prompt"], y) for y in row["responses"]]
        assert got == pytest.approx(row["rewards"], abs=1e-4)
    with pytest.raises(RowError) as e:
        letter_share("Say hi.", "hi")
    assert e.value.field == "prompt"


@pytest.mark.parametrize("text,number", [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", 72.0), ("so the answer is 1,250 dollars", 1250.0),
    ("The result is \\boxed{-3.5}.", -3.5), ("first 3 then 4", 4.0), ("no digits", None),
])
def test_extract_final_number(text, number):
    assert extract_final_number(text) == number


def test_exact_final_number_compares_with_the_gold_answer():
    row = {"answer": "Janet has 16 - 3 - 4 = 9 eggs.\n#### 9"}
    assert exact_final_number("q", "She sells 9 eggs.", row) == 1.0
    assert exact_final_number("q", "The answer is 10.", row) == 0.0
    assert exact_final_number("q", "#### 9.0", {"answer": 9}) == 1.0
    for bad, field in (({}, "answer"), ({"answer": "none"}, "answer")):
        with pytest.raises(RowError) as e:
            exact_final_number("q", "9", bad)
        assert e.value.field == field


def test_load_reward_fn():
    assert load_reward_fn("rao_megatron.rewards.rule:letter_share") is letter_share
    for spec, msg in (("nocolon", "module:function"), ("no.such.module:f", "cannot import"),
                      ("rao_megatron.rewards.rule:nope", "no function")):
        with pytest.raises(ValueError, match=msg):
            load_reward_fn(spec)


# -- report --------------------------------------------------------------------------------------------

def test_rm_report_table(tmp_path):
    records = [{"step": 1, "loss": 0.7}, {"step": 10, "loss": 0.6, "eval/accuracy": 0.75, "eval/loss": 0.5},
               {"step": 20, "loss": 0.0625, "eval/accuracy": 0.96875, "eval/loss": 0.125, "eval/rewards/chosen": 2.5,
                "eval/rewards/rejected": -2.0, "eval/rewards/margin": 4.5, "eval/pairs": 64, "eval/groups": 32}]
    table = rm_report(records, title="RM-SFT")
    lines = table.splitlines()
    assert lines[0] == "RM-SFT: held-out preference pairs (64 pairs, 32 groups)"
    assert lines[2].split("|")[1:-1] == [" evaluation ", " step ", " train loss ", " held-out loss ",
                                         " held-out accuracy ", " chosen score ", " rejected score ", " margin "]
    assert lines[4] == "| final | 20 | 0.0625 | 0.1250 | 0.9688 | 2.5000 | -2.0000 | 4.5000 |"
    assert len(lines) == 5  # the final evaluation is also the best: one row
    assert "no held-out evaluation" in rm_report([{"step": 1, "loss": 0.7}])
    worse_last = records + [{"step": 30, "loss": 0.05, "eval/accuracy": 0.9, "eval/loss": 0.3}]
    assert rm_report(worse_last).splitlines()[-1] == "| best | 20 | 0.0625 | 0.1250 | 0.9688 | 2.5000 | -2.0000 | 4.5000 |"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path, written = write_rm_report(run, title="RM-SFT")
    assert path == run / "rm_report.md" and path.read_text() == written + "\n" == table + "\n"


def test_count_pairs():
    assert count_pairs([None, [1.0, 0.0, 0.5], [2.0, 2.0, 1.0]], [2, 3, 3]) == 1 + 2 + 1
    assert count_pairs([[1.0, 0.0, 0.5], [2.0, 2.0, 1.0]], [3, 3], "all_pairs") == 3 + 2


# -- annotation by rule function -----------------------------------------------------------------------

@pytest.mark.parametrize("name,kept,responses", [
    ("groups.jsonl", 5, 15), ("pairs.jsonl", 3, 6), ("ultrafeedback_binarized.jsonl", 2, 4),
    ("ultrafeedback_raw.jsonl", 2, 5), ("ultrachat_sft.jsonl", 2, 2),
])
def test_every_input_format_becomes_scored_groups(tmp_path, name, kept, responses):
    out = tmp_path / "out.jsonl"
    code, stdout, err = annotate_cli("--data", str(DATA / name), "--out", str(out), "--reward-fn", f"{THIS}:length_reward")
    assert code == 0, err
    assert f"{kept} kept ({responses} responses scored)" in stdout and "0 rejected" in stdout
    got = rows(out)
    assert len(got) == kept and all(r["rewards"] == [float(len(y)) for y in r["responses"]] for r in got)
    examples = read_examples(out)  # the output is the group format training reads
    assert all(ex.kind == "group" and ex.rewards is not None for ex in examples)
    assert not Path(f"{out}.rejected.jsonl").exists() and not Path(f"{out}.progress.json").exists()


def test_group_output_keeps_prompt_reference_and_extra_fields(tmp_path):
    out = tmp_path / "out.jsonl"
    annotate_cli("--data", str(DATA / "groups.jsonl"), "--out", str(out), "--reward-fn", f"{THIS}:length_reward")
    first, second, _, fourth, _ = rows(out)
    assert first["prompt"] == "What is the capital of France?" and "messages" not in first
    assert second["messages"][0] == {"role": "system", "content": "You are terse."}
    assert fourth["reference"] == "Le chat." and fourth["reference_reward"] == float(len("Le chat."))
    assert fourth["responses"] == ["chien", "chat"] and fourth["rewards"] == [5.0, 4.0]
    uf = tmp_path / "uf.jsonl"
    annotate_cli("--data", str(DATA / "ultrafeedback_binarized.jsonl"), "--out", str(uf), "--reward-fn",
                 f"{THIS}:length_reward")
    row = rows(uf)[0]
    assert row["prompt_id"] == "a1" and "chosen" not in row and "score_chosen" not in row


def test_malformed_rows_are_rejected_with_file_row_field(tmp_path):
    out = tmp_path / "mixed.jsonl"
    code, stdout, err = annotate_cli("--data", str(MIXED), "--out", str(out), "--reward-fn", f"{THIS}:length_reward")
    assert code == 0, err
    assert "8 rows read: 2 kept (5 responses scored)" in stdout and "6 rejected" in stdout
    rejected = {r["row"]: r for r in rows(Path(f"{out}.rejected.jsonl"))}
    assert {k: (v["field"], v["source"]) for k, v in rejected.items()} == {
        "line 2": ("prompt", str(MIXED)), "line 3": ("rewards[0]", str(MIXED)), "line 4": ("responses[1]", str(MIXED)),
        "line 5": (None, str(MIXED)), "line 6": ("responses", str(MIXED)), "line 7": ("responses[1]", str(MIXED))}
    assert rejected["line 2"]["reason"] == "missing"
    assert "finite" in rejected["line 3"]["reason"] and rejected["line 4"]["reason"] == "empty string"
    assert "invalid JSON" in rejected["line 5"]["reason"] and "nan" in rejected["line 7"]["reason"]
    assert rejected["line 4"]["data"]["prompt"] == "Say something."  # the raw row, to fix and rerun
    # the format is detected once (group): a pair row in a group file is malformed, not re-detected
    assert rejected["line 6"]["reason"] == "missing"
    kept = rows(out)
    assert [r.get("prompt_id") for r in kept] == ["m1", None] and kept[1]["answer"].endswith("#### 4")


def test_exact_final_number_on_the_mixed_file(tmp_path):
    out = tmp_path / "gsm.jsonl"
    annotate_cli("--data", str(MIXED), "--out", str(out), "--reward-fn", "rao_megatron.rewards.rule:exact_final_number")
    by_answer = {json.dumps(r["answer"]): r for r in rows(out)}
    assert by_answer['"5"']["rewards"] == [1.0, 0.0] and by_answer['"5"']["reference_reward"] == 1.0
    assert by_answer['"He adds them.\\n#### 4"']["rewards"] == [1.0, 0.0]


def test_parquet_output(tmp_path):
    out = tmp_path / "scored.parquet"
    code, _, err = annotate_cli("--data", str(DATA / "groups.jsonl"), "--out", str(out), "--reward-fn",
                                f"{THIS}:length_reward")
    assert code == 0, err
    examples = read_examples(out)
    assert len(examples) == 5 and examples[3].reference_answer == 2 and examples[0].rewards == [31.0, 11.0, 38.0]


def _letter_data(tmp_path: Path) -> Path:
    data = tmp_path / "letters.jsonl"
    data.write_text((ROOT / "examples/data/tiny_groups.jsonl").read_text())
    return data


def test_resume_after_stop_equals_a_clean_run(tmp_path, monkeypatch):
    data = _letter_data(tmp_path)
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("RAO_TEST_CALLS", str(calls))
    clean = tmp_path / "clean.jsonl"
    annotate_cli("--data", str(data), "--out", str(clean), "--reward-fn", f"{THIS}:counting_reward")
    once = Counter(calls.read_text().splitlines())
    calls.unlink()
    out = tmp_path / "out.jsonl"
    args = ["--data", str(data), "--out", str(out), "--reward-fn", f"{THIS}:counting_reward", "--chunk-rows", "8"]
    code, stdout, _ = annotate_cli(*args, "--stop-after", "20")
    assert code == 0 and "stopped early" in stdout and not out.exists()
    assert json.loads(Path(f"{out}.progress.json").read_text())["rows_done"] == 20
    code, stdout, _ = annotate_cli(*args)
    assert code == 0 and "resumed after 20 rows" in stdout and "64 rows read: 64 kept" in stdout
    assert out.read_text() == clean.read_text()
    assert Counter(calls.read_text().splitlines()) == once  # every response scored exactly once


def test_resume_after_a_crash_rescores_only_the_unfinished_chunk(tmp_path, monkeypatch):
    data = _letter_data(tmp_path)
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("RAO_TEST_CALLS", str(calls))
    clean = tmp_path / "clean.jsonl"
    annotate_cli("--data", str(data), "--out", str(clean), "--reward-fn", f"{THIS}:counting_reward")
    calls.unlink()
    out = tmp_path / "out.jsonl"
    args = ["--data", str(data), "--out", str(out), "--reward-fn", f"{THIS}:counting_reward", "--chunk-rows", "8"]
    monkeypatch.setenv("RAO_TEST_CRASH_AT", "150")  # in the 5th chunk (rows 32-39, calls 129-160)
    with pytest.raises(RuntimeError, match="simulated crash"):
        annotate_cli(*args)
    assert json.loads(Path(f"{out}.progress.json").read_text())["rows_done"] == 32
    # a crash between writing rows and recording progress leaves extra bytes: the resume drops them
    with open(f"{out}.partial.jsonl", "a") as f:
        f.write('{"half": "a row"')
    monkeypatch.delenv("RAO_TEST_CRASH_AT")
    code, stdout, err = annotate_cli(*args)
    assert code == 0, err
    assert out.read_text() == clean.read_text()
    scored = calls.read_text().splitlines()
    assert len(scored) == 256 + 150 - 128  # only the calls of the unfinished chunk are repeated


def test_partial_output_of_other_input_is_refused(tmp_path, monkeypatch):
    data = _letter_data(tmp_path)
    out = tmp_path / "out.jsonl"
    args = ["--data", str(data), "--out", str(out), "--chunk-rows", "8", "--stop-after", "8"]
    annotate_cli(*args, "--reward-fn", "rao_megatron.rewards.rule:letter_share")
    code, _, err = annotate_cli(*args, "--reward-fn", f"{THIS}:length_reward")
    assert code == 2 and "another scorer" in err and "--restart" in err
    code, stdout, _ = annotate_cli(*args, "--reward-fn", f"{THIS}:length_reward", "--restart")
    assert code == 0 and "8 rows read" in stdout and "resumed" not in stdout


def test_cli_errors_are_one_line(tmp_path):
    code, _, err = annotate_cli("--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                                "--reward-fn", "rao_megatron.rewards.rule:letter_share")
    assert code == 2 and "no such file" in err and "Traceback" not in err
    code, _, err = annotate_cli("--data", str(MIXED), "--out", str(tmp_path / "o.jsonl"), "--reward-fn", "x")
    assert code == 2 and "module:function" in err


# -- malformed input files: each bad row is reported with file, row and field --------------------------

@pytest.mark.parametrize("name,kept,row,field,reason", [
    ("bad_missing_field.jsonl", 1, "line 2", "prompt", "missing"),
    ("bad_score_type.jsonl", 1, "line 2", "score_chosen", "expected a number, got str 'high'"),
    ("bad_nan_reward.jsonl", 2, "line 3", "rewards[0]", "expected a finite number, got nan"),
    ("bad_empty_response.jsonl", 0, "line 1", "responses[1]", "empty string"),
    ("bad_json.jsonl", 1, "line 2", None, "invalid JSON"),
])
def test_annotate_reports_each_malformed_row(tmp_path, name, kept, row, field, reason):
    out = tmp_path / "out.jsonl"
    code, stdout, err = annotate_cli("--data", str(DATA / name), "--out", str(out), "--reward-fn", f"{THIS}:length_reward")
    (bad,) = rows(Path(f"{out}.rejected.jsonl"))
    assert (bad["source"], bad["row"], bad["field"]) == (str(DATA / name), row, field)
    assert bad["reason"].startswith(reason)
    if kept == 0:  # every row rejected: exit 2 naming the first reason, and no (empty) output
        assert code == 2 and "all 1 rows" in err and f"{row}, field '{field}': {reason}" in err, err
        assert not out.exists()
        return
    assert code == 0, err
    assert f"{kept} kept" in stdout and "1 rejected -> " in stdout
    assert len(rows(out)) == kept


# -- UltraFeedback example data and the training-side options ------------------------------------------

def test_synthetic_ultrafeedback_reads_as_groups_of_three_with_the_marker_best():
    from rao_megatron.rewards.synthetic import MARKER, marker_ultrafeedback

    data = marker_ultrafeedback(16, k=3, seed=5)
    assert data == marker_ultrafeedback(16, k=3, seed=5)  # seeded
    for path in (ROOT / "examples/data/tiny_rm_ultrafeedback.jsonl", ROOT / "examples/data/tiny_rm_ultrafeedback_heldout.jsonl"):
        for reward_field in ("overall", "fine_grained"):
            for ex in read_examples(path, reward_field=reward_field):
                assert len(ex.responses) == 3 and ex.kind == "group"
                best = max(range(3), key=ex.rewards.__getitem__)
                assert [MARKER in y for y in ex.responses] == [j == best for j in range(3)]
                assert sorted(ex.rewards)[1] < ex.rewards[best]  # no tie with the best


def test_ultrafeedback_rating_option_reaches_training(tmp_path):
    from rao_megatron.config import load_config
    from rao_megatron.data.tokenizer import load_tokenizer
    from rao_megatron.losses import get_loss
    from rao_megatron.training.run_data import load_groups

    def rewards(rating: str) -> list[list[float]]:
        cfg = load_config(ROOT / "examples/configs/rm_tiny.yaml", [
            f"data.train_path={DATA / 'ultrafeedback_raw.jsonl'}", "data.eval_path=null", "data.eval_fraction=0",
            f"data.ultrafeedback_rating={rating}", "data.max_length=256"])
        return [g.rewards for g in load_groups(cfg, load_tokenizer(None), get_loss("bt")).train]

    # tests/data/ultrafeedback_raw.jsonl: overall_score, or the mean of the non-"N/A" aspect ratings
    assert sorted(map(sorted, rewards("overall"))) == [[2.0, 9.0], [4.0, 7.0, 8.5]]
    assert sorted(map(sorted, rewards("fine_grained"))) == [[2.0, 5.0], [2.5, 4.5]]


def test_rm_init_skips_the_policy_head_only(tmp_path):
    from rao_megatron.config import ConfigError
    from rao_megatron.training.model_init import init_skip_prefixes

    def checkpoint(task: str) -> str:
        d = tmp_path / task
        d.mkdir()
        (d / "rao_model.json").write_text(json.dumps({"task": task, "hf_config": {}}))
        return str(d)

    policy, sft, rm = checkpoint("policy"), checkpoint("sft"), checkpoint("rm")
    assert init_skip_prefixes(policy, "rm") == init_skip_prefixes(sft, "rm") == ("output_layer.",)
    assert init_skip_prefixes(rm, "rm") == () and init_skip_prefixes(sft, "policy") == ()
    with pytest.raises(ConfigError, match="is a reward model"):
        init_skip_prefixes(rm, "policy")


def test_annotate_reads_a_saved_datasets_directory_by_split(tmp_path):
    """ultrafeedback_binarized as `datasets` ships it (split ``train_prefs``), from a saved directory."""
    import datasets

    raw = rows(DATA / "ultrafeedback_binarized.jsonl")
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(raw)}).save_to_disk(str(tmp_path / "ufb"))
    out = tmp_path / "out.jsonl"
    code, stdout, err = annotate_cli("--data", str(tmp_path / "ufb"), "--split", "train_prefs", "--out", str(out),
                                     "--reward-fn", f"{THIS}:length_reward")
    assert code == 0, err
    assert f"{len(raw)} rows read: {len(raw)} kept" in stdout
    got = rows(out)
    assert [r["responses"] for r in got] == [[r["chosen"][-1]["content"], r["rejected"][-1]["content"]] for r in raw]
    assert all(r["rewards"] == [float(len(y)) for y in r["responses"]] for r in got)
