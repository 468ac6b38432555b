"""Read preference / SFT rows from JSONL, Parquet or `datasets`, and normalise them into :class:`Example`.

Row formats (detected from the first row's fields, or forced with ``format=``):

- ``group``: ``{prompt: str | messages: [...], responses: [str], rewards?: [float], reference?: str,
  reference_reward?: float}`` — the project's own format; ``reference`` is GRAO's reference answer,
  appended after the responses.
- ``pair``: ``{prompt, chosen, rejected, score_chosen?, score_rejected?}``; chosen/rejected are strings
  or whole conversations (``ultrafeedback_binarized``), chosen first.
- ``ultrafeedback``: raw UltraFeedback ``{instruction, completions: [{response, overall_score,
  annotations: {aspect: {Rating}}}]}``.
- ``sft``: ``{messages: [...]}`` (UltraChat): the last assistant turn is the response.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import DataError, row_label

FORMATS = ("group", "pair", "ultrafeedback", "sft")
REWARD_FIELDS = ("overall", "fine_grained")
Kind = Literal["group", "pair", "sft"]
Message = dict[str, str]


@dataclass
class Example:
    """One normalised row: a chat prompt and its responses (with rewards, if the data has them)."""

    row: int                        # JSONL line number (1-based) or Parquet/`datasets` index (0-based)
    where: str                      # row_label(row): how error messages name this row
    prompt: list[Message]           # chat messages up to (excluding) the assistant turn
    responses: list[str]
    rewards: list[float] | None
    reference_answer: int | None    # index into responses of GRAO's reference answer
    kind: Kind
    unrated: int = 0                # responses left out for lack of a rating (counted in the DataReport)


class _Row:
    """Field access on one raw row that raises :class:`DataError` naming file, row and field."""

    def __init__(self, data: Any, source: str, where: str):
        self.source, self.where = source, where
        if not isinstance(data, Mapping):
            raise DataError(source, where, None, f"expected a JSON object, got {type(data).__name__}")
        self.data = data

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(self.source, self.where, field, message)

    def has(self, name: str) -> bool:
        # Parquet fills absent columns with None, so None counts as absent everywhere.
        return self.data.get(name) is not None

    def get(self, name: str) -> Any:
        if not self.has(name):
            raise self.error(name, "missing")
        return self.data[name]

    def text(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise self.error(field, "empty string")
        return value

    def number(self, value: Any, field: str) -> float:
        # bool is an int subclass; a True reward is almost certainly a data bug
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(field, f"expected a number, got {type(value).__name__} {value!r}")
        x = float(value)
        if not math.isfinite(x):
            raise self.error(field, f"expected a finite number, got {x}")
        return x

    def messages(self, value: Any, field: str) -> list[Message]:
        if not isinstance(value, list) or not value:
            raise self.error(field, "expected a non-empty list of {role, content} messages")
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise self.error(f"{field}[{i}]", "expected a {role: str, content: str} message")
            out.append({"role": m["role"], "content": self.text(m.get("content"), f"{field}[{i}].content")})
        return out

    def prompt(self, field: str) -> list[Message]:
        value = self.get(field)
        if isinstance(value, str):
            return [{"role": "user", "content": self.text(value, field)}]
        msgs = self.messages(value, field)
        if msgs[-1]["role"] == "assistant":
            raise self.error(field, "the prompt must end before the assistant turn (last message is 'assistant')")
        return msgs

    def split_conversation(self, field: str) -> tuple[list[Message], str]:
        """(messages before the last assistant turn, that turn's content) of a conversation field."""
        msgs = self.messages(self.get(field), field)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise self.error(field, "the conversation has no assistant turn")
        if last == 0:
            raise self.error(field, "empty prompt: the conversation starts with the assistant turn")
        return msgs[:last], msgs[last]["content"]


def detect_format(fields: Mapping[str, Any]) -> str:
    """Name of the row format implied by a row's (non-null) fields, or '' when none fits."""
    present = {k for k, v in fields.items() if v is not None}
    if {"instruction", "completions"} <= present:
        return "ultrafeedback"
    if {"chosen", "rejected"} <= present:
        return "pair"
    if "responses" in present or "reference" in present:
        return "group"
    if "messages" in present:
        return "sft"
    return ""


def _group(r: _Row) -> tuple[list[Message], list[str], list[float] | None, int | None]:
    prompt = r.prompt("prompt" if r.has("prompt") or not r.has("messages") else "messages")
    responses_raw = r.get("responses") if r.has("responses") or not r.has("reference") else []
    if not isinstance(responses_raw, list) or (not responses_raw and not r.has("reference")):
        raise r.error("responses", "expected a non-empty list of strings")
    responses = [r.text(v, f"responses[{i}]") for i, v in enumerate(responses_raw)]
    rewards = None
    if r.has("rewards"):
        raw = r.get("rewards")
        if not isinstance(raw, list) or len(raw) != len(responses):
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise r.error("rewards", f"expected {len(responses)} numbers (one per response), got {got}")
        rewards = [r.number(v, f"rewards[{i}]") for i, v in enumerate(raw)]
    reference = None
    if r.has("reference"):
        responses.append(r.text(r.get("reference"), "reference"))
        reference = len(responses) - 1
        if rewards is not None:
            # GRAO normalises advantages over the group including the reference, so it needs a reward
            rewards.append(r.number(r.get("reference_reward"), "reference_reward"))
    return prompt, responses, rewards, reference


def _pair(r: _Row) -> tuple[list[Message], list[str], list[float] | None]:
    prompt, responses = None, []
    for name in ("chosen", "rejected"):
        value = r.get(name)
        if isinstance(value, str):
            responses.append(r.text(value, name))
            continue
        context, answer = r.split_conversation(name)
        responses.append(answer)
        if prompt is None:
            prompt = context
        elif context != prompt:
            raise r.error(name, "its conversation before the last assistant turn differs from 'chosen'")
    if prompt is None:
        prompt = r.prompt("prompt")
    rewards = None
    if r.has("score_chosen") or r.has("score_rejected"):
        rewards = [r.number(r.get(f), f) for f in ("score_chosen", "score_rejected")]
    return prompt, responses, rewards


def _rating(value: Any) -> float | None:
    """A UltraFeedback rating ("4", 4.0) as a float; None for "N/A"/missing; raises ValueError otherwise."""
    if value is None or (isinstance(value, str) and value.strip().upper() in ("N/A", "NA", "")):
        return None
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"non-finite rating {value!r}")
    return x


def _ultrafeedback(r: _Row, reward_field: str) -> tuple[list[Message], list[str], list[float], int]:
    prompt = [{"role": "user", "content": r.text(r.get("instruction"), "instruction")}]
    completions = r.get("completions")
    if not isinstance(completions, list) or not completions:
        raise r.error("completions", "expected a non-empty list of {response, overall_score, annotations}")
    responses, rewards, unrated = [], [], 0
    for i, c in enumerate(completions):
        f = f"completions[{i}]"
        if not isinstance(c, Mapping):
            raise r.error(f, f"expected an object, got {type(c).__name__}")
        try:
            if reward_field == "overall":
                reward = _rating(c.get("overall_score"))
                field = f"{f}.overall_score"
            else:
                field = f"{f}.annotations"
                ann = c.get("annotations")
                if isinstance(ann, Mapping):
                    ratings = [_rating(a.get("Rating") if isinstance(a, Mapping) else None) for a in ann.values()]
                    ratings = [x for x in ratings if x is not None]
                    reward = sum(ratings) / len(ratings) if ratings else None
                else:  # some exports keep only the precomputed mean
                    field = f"{f}.fine-grained_score"
                    reward = _rating(c.get("fine-grained_score"))
        except (TypeError, ValueError) as e:
            raise r.error(field, f"non-numeric rating: {e}") from e
        if reward is None:
            unrated += 1
            continue
        responses.append(r.text(c.get("response"), f"{f}.response"))
        rewards.append(reward)
    return prompt, responses, rewards, unrated


def parse_row(data: Any, fmt: str, *, source: str, row: int, one_based_line: bool,
              reward_field: str = "overall") -> Example:
    """Normalise one raw row of format ``fmt`` (an UltraFeedback row may keep no rated response)."""
    where = row_label(row, one_based_line=one_based_line)
    r = _Row(data, source, where)
    reference, unrated = None, 0
    kind: Kind = "group"
    if fmt == "group":
        prompt, responses, rewards, reference = _group(r)
    elif fmt == "pair":
        prompt, responses, rewards = _pair(r)
        kind = "pair"
    elif fmt == "ultrafeedback":
        prompt, responses, rewards, unrated = _ultrafeedback(r, reward_field)
    elif fmt == "sft":
        prompt, response = r.split_conversation("messages")
        responses, rewards, kind = [response], None, "sft"
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return Example(row=row, where=where, prompt=prompt, responses=responses, rewards=rewards,
                   reference_answer=reference, kind=kind, unrated=unrated)


def iter_raw_rows(path: str, *, split: str = "train") -> Iterator[tuple[int, bool, Any]]:
    """Yield ``(row, one_based_line, raw)`` from a JSONL / JSON / Parquet file, a saved dataset, or a hub name."""
    p = Path(path)
    if p.suffix in (".jsonl", ".json", ".parquet") and not p.is_file():
        # a mistyped local path must not fall through to a hub download attempt
        raise DataError(path, None, None, "no such file")
    if p.suffix in (".jsonl", ".json"):
        with p.open(encoding="utf-8") as f:
            head = f.read(1 << 12).lstrip()
            f.seek(0)
            if p.suffix == ".json" and head.startswith("["):
                yield from ((i, False, raw) for i, raw in enumerate(json.load(f)))
                return
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # a blank line is not a row (trailing newlines are common)
                try:
                    raw = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise DataError(path, row_label(line_no, one_based_line=True), None,
                                    f"invalid JSON: {e.msg} at column {e.colno}") from e
                yield line_no, True, raw
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
            for raw in batch.to_pylist():
                yield index, False, raw
                index += 1
    else:
        import datasets

        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                           or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif p.is_dir() or not p.suffix:
            ds = datasets.load_dataset(path, split=split)  # a local data dir, or a hub name on a cluster
        else:
            raise DataError(path, None, None, "unsupported file type; use .jsonl, .json, .parquet, a saved "
                            "`datasets` directory or a `datasets` name")
        yield from ((i, False, raw) for i, raw in enumerate(ds))


def read_examples(path: str | Path, *, format: str | None = None, reward_field: str = "overall",
                  split: str = "train") -> list[Example]:
    """Read and normalise every row of ``path``; a malformed row raises :class:`DataError`.

    The format is detected from the first row (then enforced on all rows, so a row missing a field
    reports that field). ``reward_field`` picks UltraFeedback's ``overall`` score or the mean of its
    ``fine_grained`` ratings. Responses without a rating are left out and counted in ``Example.unrated``.
    """
    source = str(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None (detect), got {format!r}")
    if reward_field not in REWARD_FIELDS:
        raise ValueError(f"reward_field must be one of {REWARD_FIELDS}, got {reward_field!r}")
    examples: list[Example] = []
    fmt = format
    for row, one_based, raw in iter_raw_rows(source, split=split):
        if fmt is None:
            fmt = detect_format(raw) if isinstance(raw, Mapping) else ""
            if not fmt:
                fields = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
                raise DataError(source, row_label(row, one_based_line=one_based), None,
                                f"cannot tell the row format from its fields {fields}; expected "
                                "responses (group), chosen+rejected (pair), instruction+completions "
                                "(ultrafeedback) or messages (sft), or pass format=")
        examples.append(parse_row(raw, fmt, source=source, row=row, one_based_line=one_based,
                                  reward_field=reward_field))
    if not examples:
        raise DataError(source, None, None, "no rows to train on")
    return examples
