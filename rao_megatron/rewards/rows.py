"""Input rows for annotation: read one by one, normalise (a bad row is a rejection, never an abort), write groups."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rao_megatron.data.errors import DataError, row_label
from rao_megatron.data.formats import (
    Example,
    check_reward,
    iter_raw_rows,
    iter_text_lines,
    parse_json,
    parse_row,
)

#: fields of each input format that the group row replaces (everything else in the row is kept)
REPLACED_FIELDS = {
    "group": {"prompt", "messages", "responses", "rewards", "reference", "reference_reward"},
    "pair": {"prompt", "messages", "chosen", "rejected", "score_chosen", "score_rejected"},
    "unpaired": {"prompt", "completion", "label"},
    "prompt_completion": {"prompt", "completion"},
    "ultrafeedback": {"instruction", "completions"},
    "sft": {"prompt", "messages"},
}


@dataclass
class Rejection:
    """Why a row was not kept: the field at fault (None: the whole row) and what is wrong."""

    field: str | None
    reason: str


@dataclass
class ParsedRow:
    """One input row: its position, raw content and normalised example, or why it could not be parsed."""

    index: int                       # position in the input (rows consumed so far), the resume cursor
    where: str                       # "line 7" / "row 3 (0-based)"
    raw: Any
    example: Example | None = None
    rejection: Rejection | None = None


def iter_input(path: str, *, start: int = 0, split: str = "train") -> Iterator[tuple[int, int, bool, Any, str | None]]:
    """Yield ``(index, row, one_based_line, raw, error)`` from input position ``start``.

    A JSONL line that is not JSON yields its text with an error (the row is rejected, the file goes on);
    a file that is not UTF-8 text stops with a :class:`DataError` naming the line.
    """
    p = Path(path)
    if p.suffix != ".jsonl":
        for index, (row, one_based, raw) in enumerate(iter_raw_rows(path, split=split)):
            if index >= start:
                yield index, row, one_based, raw, None
        return
    if not p.is_file():
        raise DataError(path, None, None, "no such file")
    index = 0
    for line_no, line in iter_text_lines(p):
        if not line.strip():
            continue
        if index >= start:  # rows already done are not even parsed
            raw, error = parse_json(line)
            yield index, line_no, True, line.rstrip("\r\n") if error else raw, error
        index += 1


def count_input_rows(path: str) -> int | None:
    """Rows in a JSONL / Parquet file (for the progress bar); None when unknown without reading it all."""
    p = Path(path)
    if p.suffix == ".jsonl" and p.is_file():
        with p.open("rb") as f:
            return sum(1 for line in f if line.strip())
    if p.suffix == ".parquet" and p.is_file():
        import pyarrow.parquet as pq  # heavy: pyarrow, only for a Parquet file

        return pq.ParquetFile(p).metadata.num_rows
    return None


def _for_parsing(raw: Any, fmt: str) -> Any:
    # UltraFeedback leaves some completions unrated ("N/A"); the data layer would skip them, but here
    # every completion gets a new reward, so the old rating must not decide which ones are scored.
    if fmt != "ultrafeedback" or not isinstance(raw, dict) or not isinstance(raw.get("completions"), list):
        return raw
    return {**raw, "completions": [{**c, "overall_score": 0.0} if isinstance(c, dict) else c
                                   for c in raw["completions"]]}


def _message(e: DataError) -> str:
    """The part of a DataError's text after ``file: row: field 'x':`` (those go in their own columns)."""
    prefix = [e.source] + ([e.where] if e.where else []) + ([f"field '{e.field}'"] if e.field else [])
    return str(e)[len(": ".join(prefix)) + 2:]


def parse_input_row(index: int, row: int, one_based: bool, raw: Any, error: str | None, fmt: str,
                    source: str) -> ParsedRow:
    """Normalise one raw row; a malformed row becomes a rejection naming its field (never an abort)."""
    parsed = ParsedRow(index=index, where=row_label(row, one_based_line=one_based), raw=raw)
    if error is not None:
        parsed.rejection = Rejection(None, error)
        return parsed
    try:
        example = parse_row(_for_parsing(raw, fmt), fmt, source=source, row=row, one_based_line=one_based)
    except DataError as e:
        parsed.rejection = Rejection(e.field, _message(e))
        return parsed
    parsed.example = dataclasses.replace(example, rewards=None)  # the old scores are replaced
    return parsed


def output_row(row: ParsedRow, fmt: str, rewards: list[float]) -> dict[str, Any]:
    """The group-format row for a scored input row (kept fields of the input first)."""
    ex = row.example
    assert ex is not None
    out = {k: v for k, v in row.raw.items() if k not in REPLACED_FIELDS[fmt]} if isinstance(row.raw, dict) else {}
    if len(ex.prompt) == 1 and ex.prompt[0]["role"] == "user":
        out["prompt"] = ex.prompt[0]["content"]
    else:
        out["messages"] = ex.prompt
    ref = ex.reference_answer
    out["responses"] = [y for j, y in enumerate(ex.responses) if j != ref]
    out["rewards"] = [r for j, r in enumerate(rewards) if j != ref]
    if ref is not None:
        out["reference"], out["reference_reward"] = ex.responses[ref], rewards[ref]
    return out


def response_field(ex: Example, j: int) -> str:
    """The input field a normalised response came from (for rejection reasons)."""
    if ex.reference_answer == j:
        return "reference"
    return {"pair": ("chosen", "rejected")[j] if j < 2 else f"responses[{j}]",
            "sft": "messages"}.get(ex.kind, f"responses[{j}]")


def check_finite(ex: Example, rewards: list[float], what: str) -> Rejection | None:
    """A rejection for the first reward that is not a finite number within ±MAX_ABS_REWARD (a NaN or a
    1e300 reward must never reach training)."""
    for j, r in enumerate(rewards):
        try:
            check_reward(r)
        except ValueError as e:
            return Rejection(response_field(ex, j), f"{what} returned an unusable reward: {e}")
    return None
