"""Evaluating generated answers: rule accuracy and pass@1, win rate against a baseline, mean length; the report.

An answers file is a generation output (:mod:`rao_megatron.generation`): ``id``, ``prompt`` | ``messages``,
``responses`` (K >= 1 samples) and other fields such as ``answer``.

- accuracy is the reward function's mean over all samples, pass@1 its mean over each prompt's first
  sample; rows that all carry ``answer`` default to :data:`DEFAULT_REWARD_FN`. A sample the function
  cannot score counts as 0 and in ``unscored``; a bad row field is a :class:`DataError`.
- win rate: per prompt id shared with the baseline, the share of (sample, baseline sample) pairs the
  sample wins (ties half), averaged over the shared ids; judged by a reward model, else the reward function.
- mean length per sample, in tokens (an explicit tokenizer, else the one of ``sampling.model``, else the
  reward model's) and in characters.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rao_megatron.data.errors import DataError, row_label
from rao_megatron.data.formats import Example, iter_raw_rows
from rao_megatron.data.prompts import check_unique_prompts, parse_prompt_row
from rao_megatron.data.tokenizer import load_tokenizer

from .rows import ParsedRow
from .rule import load_reward_fn, wants_row
from .scorers import prompt_argument, start_model_scorer

DEFAULT_REWARD_FN = "rao_megatron.rewards.rule:exact_final_number"
RESPONSE_FIELDS = (None, "response", "responses")


@dataclass
class Answers:
    """One answers file: its raw rows and their normalised prompts and samples (keyed by prompt id)."""

    path: str
    rows: list[dict[str, Any]]
    examples: list[Example]
    keys: list[str]                  # data.prompts.id_key of each row's id
    _scores: dict[str, list[list[float]]] = field(default_factory=dict)  # judge scores, cached

    @property
    def samples(self) -> int:
        return sum(len(ex.responses) for ex in self.examples)


def read_answers(path: str | os.PathLike) -> Answers:
    """Read a generate output (JSONL / Parquet); a malformed row raises :class:`DataError` naming its field."""
    source = str(path)
    rows, examples, prompts = [], [], []
    for index, (row, one_based, raw) in enumerate(iter_raw_rows(source)):
        where = row_label(row, one_based_line=one_based)
        prompt = parse_prompt_row(raw, index=index, source=source, where=where)
        responses = raw.get("responses")
        if not isinstance(responses, list) or not responses:
            raise DataError(source, where, "responses", "expected a non-empty list of strings (the samples)")
        for j, y in enumerate(responses):
            if not isinstance(y, str):
                raise DataError(source, where, f"responses[{j}]", f"expected a string, got {type(y).__name__}")
        rows.append(dict(raw))
        prompts.append(prompt)
        examples.append(Example(row=row, where=where, prompt=prompt.messages, responses=list(responses),
                                rewards=None, reference_answer=None, kind="group"))
    if not rows:
        raise DataError(source, None, None, "no answers")
    check_unique_prompts(prompts, source)
    return Answers(path=source, rows=rows, examples=examples, keys=[p.key for p in prompts])


# ---------------------------------------------------------------- scoring


def rule_scores(ans: Answers, fn: Callable[..., Any], name: str) -> tuple[list[list[float]], int]:
    """The reward function's value for every sample, and how many samples it could not score (counted 0)."""
    if getattr(fn, "batched", False):
        flat = [(i, prompt_argument(ex), y) for i, ex in enumerate(ans.examples) for y in ex.responses]
        values = list(fn([p for _, p, _ in flat], [y for *_, y in flat], [ans.rows[i] for i, *_ in flat]))
        if len(values) != len(flat):
            raise ValueError(f"reward function {name} returned {len(values)} values for {len(flat)} responses")
        it = iter(values)
        values_per_row = [[next(it) for _ in ex.responses] for ex in ans.examples]
    else:
        with_row = wants_row(fn)
        values_per_row = []
        for ex, raw in zip(ans.examples, ans.rows):
            prompt, values = prompt_argument(ex), []
            for y in ex.responses:
                try:
                    values.append(fn(prompt, y, row=raw) if with_row else fn(prompt, y))
                except KeyError as e:
                    raise DataError(ans.path, ex.where, str(e.args[0]) if e.args else None,
                                    f"missing (reward function {name} needs it)") from None
                except ValueError as e:  # RowError included
                    where = getattr(e, "field", None)
                    if where not in RESPONSE_FIELDS:
                        raise DataError(ans.path, ex.where, where, f"reward function {name}: {e}") from None
                    values.append(None)
            values_per_row.append(values)
    unscored = 0
    scores = []
    for values in values_per_row:
        row = []
        for v in values:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
            unscored += not ok
            row.append(float(v) if ok else 0.0)
        scores.append(row)
    return scores, unscored


def model_scores(ans: Answers, scorer: Any) -> list[list[float]]:
    """Reward-model scores of every sample (a collective call: every rank runs it with the same rows)."""
    parsed = [ParsedRow(index=i, where=ex.where, raw=raw, example=ex)
              for i, (ex, raw) in enumerate(zip(ans.examples, ans.rows))]
    scores = []
    for row, res in zip(parsed, scorer.score(parsed)):
        if res.rejection is not None:
            raise DataError(ans.path, row.where, res.rejection.field, f"reward model: {res.rejection.reason}")
        scores.append(list(res.rewards))
    return scores


def win_rate(answers: dict[str, list[float]], baseline: dict[str, list[float]]) -> tuple[float, int]:
    """Mean over shared prompt ids of P(answer sample's reward > baseline sample's), ties half; and the id count."""
    shared = [k for k in answers if k in baseline]
    if not shared:
        raise ValueError("the answers and the baseline share no prompt id")
    total = 0.0
    for k in shared:
        a, b = answers[k], baseline[k]
        total += sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b) / (len(a) * len(b))
    return total / len(shared), len(shared)


def _check_same_prompts(ans: Answers, base: Answers) -> None:
    prompts = {k: ex.prompt for k, ex in zip(base.keys, base.examples)}
    for k, ex in zip(ans.keys, ans.examples):
        if k in prompts and prompts[k] != ex.prompt:
            raise DataError(ans.path, ex.where, "prompt", f"prompt id {json.loads(k)!r} has another prompt in the "
                            f"baseline {base.path}: a win rate compares answers to the same prompt")


# ---------------------------------------------------------------- lengths


def _length_tokenizer(ans: Answers, explicit: str | None, fallback: Any,
                      cache: dict[str, Any]) -> tuple[Any, str | None]:
    candidates = [explicit] if explicit else []
    sampling = ans.rows[0].get("sampling")
    if not explicit and isinstance(sampling, dict) and isinstance(sampling.get("model"), str):
        candidates.append(sampling["model"])
    for path in candidates:
        if path not in cache:
            try:
                cache[path] = load_tokenizer(path)
            except (OSError, ValueError):
                if path == explicit:
                    raise
                cache[path] = None
        if cache[path] is not None:
            return cache[path], path
    return (fallback, "the reward model's") if fallback is not None else (None, None)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ---------------------------------------------------------------- the evaluation


def evaluate_answers(answers: Sequence[str | os.PathLike], labels: Sequence[str] | None = None, *,
                     reward_fn: str | Callable[..., Any] | None = None, reward_model: str | os.PathLike | None = None,
                     baseline: str | os.PathLike | None = None, tokenizer: str | None = None, scorer: Any = None,
                     batch_size: int = 16, max_length: int = 2048, tp: int = 1, pp: int = 1) -> dict[str, Any]:
    """Figures for each answers file (see the module doc); ``scorer``: an already built reward-model scorer.

    Returns ``{"baseline", "judge", "results": [{label, answers, prompts, samples, reward_fn, accuracy,
    pass@1, unscored, win_rate, win_prompts, mean_reward, baseline_mean_reward, mean_tokens, mean_chars,
    tokenizer}]}``; figures that do not apply are None.
    """
    if not answers:
        raise ValueError("give at least one --answers file")
    labels = list(labels) if labels else [Path(a).stem for a in answers]
    if len(labels) != len(answers):
        raise ValueError(f"{len(answers)} --answers files but {len(labels)} --label values; give one label per file")
    files = [read_answers(a) for a in answers]
    base = read_answers(baseline) if baseline is not None else None
    if reward_model is not None and scorer is None:
        scorer = start_model_scorer(reward_model, tp=tp, pp=pp, batch_size=batch_size, max_length=max_length)
    explicit_fn = reward_fn if isinstance(reward_fn, str) else getattr(reward_fn, "__name__", None)
    fn = load_reward_fn(reward_fn) if isinstance(reward_fn, str) else reward_fn

    def rule_for(ans: Answers) -> tuple[Callable[..., Any] | None, str | None]:
        if fn is not None:
            return fn, explicit_fn
        lacking = [ex.where for ex, r in zip(ans.examples, ans.rows) if r.get("answer") is None]
        if not lacking:
            return load_reward_fn(DEFAULT_REWARD_FN), DEFAULT_REWARD_FN
        if len(lacking) < len(ans.rows):  # some rows carry one: accuracy was meant, never a silent n/a
            shown = ", ".join(lacking[:5]) + (", ..." if len(lacking) > 5 else "")
            raise DataError(ans.path, lacking[0], "answer",
                            f"missing in {len(lacking)} of {len(ans.rows)} rows ({shown}): accuracy with "
                            f"{DEFAULT_REWARD_FN} needs an 'answer' on every row; add them, or pass --reward-fn")
        return None, None

    judge = None
    if base is not None:
        if scorer is not None:
            judge = f"reward model {reward_model}" if reward_model is not None else "reward model"
        elif rule_for(base)[0] is not None:
            judge = f"reward function {rule_for(base)[1]}"
        else:
            raise ValueError("--baseline needs a judge: --reward-model, or --reward-fn (or an 'answer' field in "
                             "every row)")

    def judge_scores(ans: Answers) -> dict[str, list[float]]:
        if "judge" not in ans._scores:
            if scorer is not None:
                ans._scores["judge"] = model_scores(ans, scorer)
            else:
                rule, name = rule_for(ans)
                if rule is None:
                    raise ValueError(f"{ans.path}: no reward function to judge it by (its rows lack 'answer')")
                ans._scores["judge"] = rule_scores(ans, rule, name)[0]
        return dict(zip(ans.keys, ans._scores["judge"]))

    by_path = {os.path.realpath(f.path): f for f in files}
    if base is not None:
        base = by_path.get(os.path.realpath(base.path), base)  # score a file once when it is also an answers file
    tokenizers: dict[str, Any] = {}
    results = []
    for label, ans in zip(labels, files):
        res: dict[str, Any] = {"label": label, "answers": ans.path, "prompts": len(ans.rows), "samples": ans.samples,
                               "reward_fn": None, "accuracy": None, "pass@1": None, "unscored": None,
                               "win_rate": None, "win_prompts": None, "mean_reward": None,
                               "baseline_mean_reward": None}
        rule, name = rule_for(ans)
        if rule is not None:
            scores, unscored = rule_scores(ans, rule, name)
            res.update(reward_fn=name, accuracy=_mean([s for row in scores for s in row]),
                       **{"pass@1": _mean([row[0] for row in scores])}, unscored=unscored)
        else:
            res["note"] = (f"accuracy n/a for {label}: no row of {ans.path} carries an 'answer' and no --reward-fn "
                           "was given")
        if base is not None:
            _check_same_prompts(ans, base)
            mine, theirs = judge_scores(ans), judge_scores(base)
            res["win_rate"], res["win_prompts"] = win_rate(mine, theirs)
            shared = [k for k in mine if k in theirs]
            res["mean_reward"] = _mean([s for k in shared for s in mine[k]])
            res["baseline_mean_reward"] = _mean([s for k in shared for s in theirs[k]])
        tok, tok_name = _length_tokenizer(ans, tokenizer, getattr(scorer, "tokenizer", None), tokenizers)
        texts = [y for ex in ans.examples for y in ex.responses]
        res["mean_tokens"] = _mean([len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]) \
            if tok is not None else None
        res["mean_chars"] = _mean([len(y) for y in texts])
        res["tokenizer"] = tok_name
        results.append(res)
    baseline_label = None
    if base is not None:
        baseline_label = next((lab for lab, f in zip(labels, files) if f is base), Path(base.path).stem)
    return {"baseline": base.path if base is not None else None, "baseline_label": baseline_label, "judge": judge,
            "results": results}


def _fmt(x: Any, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """One row per answers file: label, prompts, samples, accuracy, pass@1, win rate, mean tokens, mean chars."""
    win = f"win rate vs {summary['baseline_label']}" if summary.get("baseline_label") else "win rate"
    lines = [f"| label | prompts | samples | accuracy | pass@1 | {win} | mean tokens | mean chars |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["results"]:
        lines.append(f"| {r['label']} | {r['prompts']} | {r['samples']} | {_fmt(r['accuracy'], 4)} | "
                     f"{_fmt(r['pass@1'], 4)} | {_fmt(r['win_rate'], 4)} | {_fmt(r['mean_tokens'], 1)} | "
                     f"{_fmt(r['mean_chars'], 1)} |")
    return "\n".join(lines)


def write_report(summary: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``eval.md`` (notes + table) and ``eval.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fns = sorted({r["reward_fn"] for r in summary["results"] if r["reward_fn"]})
    notes = ["# Evaluation", ""]
    if fns:
        notes.append(f"- accuracy: mean of {', '.join(f'`{f}`' for f in fns)} over all samples; pass@1: first "
                     "sample of each prompt")
    if summary["judge"]:
        notes.append(f"- win rate vs `{summary['baseline']}`: share of (answer, baseline answer) pairs of the same "
                     f"prompt where the answer scores higher (ties half), judged by {summary['judge']}")
    notes.append("- mean tokens / chars: per sample")
    md, js = out / "eval.md", out / "eval.json"
    md.write_text("\n".join(notes) + "\n\n" + markdown_table(summary) + "\n")
    js.write_text(json.dumps(summary, indent=1) + "\n")
    return md, js
