"""`python -m rao_megatron.cli.evaluate`: accuracy / pass@1 with GSM8K extraction, win rate with ties, lengths, report."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from rao_megatron import evaluate
from rao_megatron.cli.common import run_cli
from rao_megatron.data.tokenizer import TINY_TOKENIZER_DIR
from rao_megatron.rewards import answers
from rao_megatron.rewards.rule import RowError, extract_final_number

THIS = "tests.unit.test_evaluate"


def length_reward(prompt, response: str) -> float:
    """Judge for the win-rate arithmetic: longer is better."""
    return float(len(response))


def picky_reward(prompt, response: str) -> float:
    """Cannot score a response that says "skip" (counts as wrong); 1 otherwise."""
    if response == "skip":
        raise RowError("responses", "cannot score this one")
    return 1.0


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(evaluate.main, evaluate.parser(), list(argv))
    return code, out.getvalue(), err.getvalue()


# gold answers 5, 72 (GSM8K solution), 9; two samples each
MATH = [
    {"id": 0, "prompt": "2 + 3?", "answer": 5, "responses": ["the 5", "#### 6"]},
    {"id": 1, "prompt": "8 * 9?", "answer": "8 * 9 = 72\n#### 72", "responses": ["so 8 and 9 make 72", "72.0 or 71"]},
    {"id": 2, "messages": [{"role": "user", "content": "3 * 3?"}], "answer": 9,
     "responses": ["\\boxed{9}", "The answer is 9, not 8."], "reference": "9"},
]


@pytest.mark.parametrize("text, value", [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", 72.0),
    ("#### 1,234", 1234.0),
    ("so \\boxed{3.5} it is; 7 was wrong", 3.5),
    ("The answer is -4, not 3", -4.0),
    ("Answer: 12 apples", 12.0),
    ("5 apples plus 2 pears give 7 fruits", 7.0),
    ("no number here", None),
    ("it costs $0.50.", 0.5),
])
def test_gsm8k_final_answer_extraction(text, value):
    assert extract_final_number(text) == value


def test_accuracy_pass1_and_lengths_on_hand_written_answers(tmp_path):
    path = write_jsonl(MATH, tmp_path / "math.jsonl")
    summary = answers.evaluate_answers([path], tokenizer=str(TINY_TOKENIZER_DIR))
    (r,) = summary["results"]
    # correct: "the 5", "so ... 72", "72.0 or 71" is wrong (last number 71), "\boxed{9}", "answer is 9"
    assert r["reward_fn"] == answers.DEFAULT_REWARD_FN  # rows carry `answer`: scored by final number
    assert (r["prompts"], r["samples"], r["unscored"]) == (3, 6, 0)
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["pass@1"] == pytest.approx(3 / 3)
    chars = [5, 6, 18, 10, 9, 23]
    assert r["mean_chars"] == pytest.approx(sum(chars) / 6)
    # tiny tokenizer: one token per byte except its merges ("he", "Ġa", "Ġs"/"Ġt"..., "is", "an" is none)
    from rao_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    assert len(tok("the 5", add_special_tokens=False)["input_ids"]) == 4  # t|he|Ġ|5
    want = sum(len(tok(y, add_special_tokens=False)["input_ids"]) for row in MATH for y in row["responses"]) / 6
    assert r["mean_tokens"] == pytest.approx(want) and r["mean_tokens"] < r["mean_chars"]
    assert r["win_rate"] is None and summary["judge"] is None


def test_unscorable_samples_count_as_wrong_and_bad_rows_name_their_field(tmp_path):
    rows = [{"id": "a", "prompt": "p", "responses": ["ok", "skip", "ok", "ok"]}]
    summary = answers.evaluate_answers([write_jsonl(rows, tmp_path / "a.jsonl")], reward_fn=f"{THIS}:picky_reward")
    r = summary["results"][0]
    assert (r["accuracy"], r["pass@1"], r["unscored"], r["mean_tokens"]) == (0.75, 1.0, 1, None)
    assert r["reward_fn"] == f"{THIS}:picky_reward"
    no_gold = write_jsonl([MATH[0], {"id": 5, "prompt": "q", "responses": ["1"]}], tmp_path / "no_gold.jsonl")
    code, _, err = eval_cli("--answers", str(no_gold), "--reward-fn", answers.DEFAULT_REWARD_FN)
    assert code == 2 and err.startswith(f"error: {no_gold}: line 2: field 'answer': reward function"), err
    # without --reward-fn, rows that lack `answer` beside rows that carry one are named: never a silent n/a
    code, _, err = eval_cli("--answers", str(no_gold))
    assert code == 2 and f"{no_gold}: line 2: field 'answer': missing in 1 of 2 rows (line 2)" in err, err
    # no row carries one: no accuracy (and no error), with a note saying why
    none = write_jsonl([{"id": 5, "prompt": "q", "responses": ["1", "22"]}], tmp_path / "none.jsonl")
    r = answers.evaluate_answers([none])["results"][0]
    assert r["accuracy"] is None and r["reward_fn"] is None and r["mean_chars"] == pytest.approx(3 / 2)
    assert "no row of" in r["note"] and "'answer'" in r["note"]
    bad = write_jsonl([{"id": 1, "prompt": "q", "responses": "one"}], tmp_path / "bad.jsonl")
    code, _, err = eval_cli("--answers", str(bad))
    assert code == 2 and f"{bad}: line 1: field 'responses'" in err


def test_win_rate_counts_ties_half_over_shared_prompts():
    assert answers.win_rate({"0": [2.0, 4.0], "1": [1.0], "2": [9.0]}, {"0": [3.0], "1": [1.0, 2.0]}) == (0.375, 2)
    assert answers.win_rate({"a": [1.0, 1.0]}, {"a": [1.0]}) == (0.5, 1)
    with pytest.raises(ValueError, match="share no prompt id"):
        answers.win_rate({"a": [1.0]}, {"b": [1.0]})


def test_cli_table_and_json_for_two_answer_files_against_a_baseline(tmp_path):
    before = write_jsonl([{"id": 0, "prompt": "p0", "responses": ["aaa"]},
                          {"id": 1, "prompt": "p1", "responses": ["y", "zz"]}], tmp_path / "before.jsonl")
    after = write_jsonl([{"id": 0, "prompt": "p0", "responses": ["aa", "bbbb"]},
                         {"id": 1, "prompt": "p1", "responses": ["x"]},
                         {"id": 2, "prompt": "p2", "responses": ["qqqqqqqqq"]}], tmp_path / "after.jsonl")
    out = tmp_path / "report"
    code, stdout, err = eval_cli("--answers", str(before), "--label", "before", "--answers", str(after), "--label",
                                 "after", "--baseline", str(before), "--reward-fn", f"{THIS}:length_reward",
                                 "--tokenizer", str(TINY_TOKENIZER_DIR), "--out-dir", str(out))
    assert code == 0, err
    table = ("| label | prompts | samples | accuracy | pass@1 | win rate vs before | mean tokens | mean chars |\n"
             "|---|---:|---:|---:|---:|---:|---:|---:|\n"
             "| before | 2 | 3 | 2.0000 | 2.0000 | 0.5000 | 2.0 | 2.0 |\n"
             "| after | 3 | 4 | 4.0000 | 4.0000 | 0.3750 | 4.0 | 4.0 |")
    assert table in stdout
    md = (out / "eval.md").read_text()
    assert md.startswith("# Evaluation") and table in md and "ties half" in md
    summary = json.loads((out / "eval.json").read_text())
    assert summary["judge"] == f"reward function {THIS}:length_reward" and summary["baseline"] == str(before)
    after_res = summary["results"][1]
    assert (after_res["win_rate"], after_res["win_prompts"]) == (0.375, 2)
    assert after_res["mean_reward"] == pytest.approx((2 + 4 + 1) / 3)
    assert after_res["baseline_mean_reward"] == pytest.approx((3 + 1 + 2) / 3)


def test_argument_and_pairing_errors(tmp_path):
    a = write_jsonl([{"id": 0, "prompt": "p0", "responses": ["a"]}], tmp_path / "a.jsonl")
    other = write_jsonl([{"id": 0, "prompt": "another", "responses": ["b"]}], tmp_path / "other.jsonl")
    cases = [
        (["--answers", str(a), "--label", "x", "--label", "y"], "1 --answers files but 2 --label"),
        (["--answers", str(a), "--baseline", str(a)], "--baseline needs a judge"),
        (["--answers", str(a), "--reward-model", str(tmp_path)], "give --baseline too"),
        (["--answers", str(a), "--baseline", str(other), "--reward-fn", f"{THIS}:length_reward"],
         f"{a}: line 1: field 'prompt': prompt id 0 has another prompt"),
        (["--answers", str(tmp_path / "missing.jsonl")], "no such file"),
    ]
    for argv, message in cases:
        code, _, err = eval_cli(*argv)
        assert code == 2 and message in err, (argv, err)


@pytest.mark.distributed
def test_reward_model_win_rate_end_to_end(tmp_path):
    """A tiny BT reward model that prefers answers holding "!" judges them the winners against plain ones."""
    from rao_megatron.parallel.launch import run_distributed
    from rao_megatron.rewards.synthetic import marker_pairs
    from rao_megatron.rewards.synthetic import write_jsonl as write_rows
    from tests.e2e.train_workers import run_cli_worker

    root = Path(__file__).resolve().parents[2]
    train = write_rows(marker_pairs(256, seed=0), tmp_path / "train.jsonl")
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.train",
                    ["--config", str(root / "examples/configs/rm_tiny.yaml"), f"train.output_dir={tmp_path / 'rm'}",
                     f"data.train_path={train}", "data.eval_path=null", "train.steps=12", "train.eval_every=0"])
    held = marker_pairs(16, seed=1)
    marked = write_jsonl([{"id": i, "prompt": r["prompt"], "responses": [r["chosen"]]} for i, r in enumerate(held)],
                         tmp_path / "marked.jsonl")
    plain = write_jsonl([{"id": i, "prompt": r["prompt"], "responses": [r["rejected"]]} for i, r in enumerate(held)],
                        tmp_path / "plain.jsonl")
    out = tmp_path / "eval"
    run_distributed(run_cli_worker, 1, "rao_megatron.cli.evaluate",
                    ["--answers", str(marked), "--label", "marked", "--answers", str(plain), "--label", "plain",
                     "--baseline", str(plain), "--reward-model", str(tmp_path / "rm"), "--max-length", "48",
                     "--out-dir", str(out)])
    summary = json.loads((out / "eval.json").read_text())
    assert summary["judge"].startswith("reward model")
    marked_res, plain_res = summary["results"]
    assert marked_res["win_rate"] >= 0.9 and plain_res["win_rate"] == 0.5
    assert marked_res["mean_reward"] > marked_res["baseline_mean_reward"]
    assert marked_res["mean_tokens"] is not None and plain_res["tokenizer"] == "the reward model's"
