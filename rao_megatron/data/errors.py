"""Data errors that name file, row and field, and the report that counts every dropped row or response."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def row_label(row: int, *, one_based_line: bool | str) -> str:
    """``line 17`` for a JSONL line (1-based), ``row 3 (0-based)`` for a Parquet / `datasets` row; a string
    ``one_based_line`` is the label itself (``part-1.jsonl line 3``: a row of a file in a data directory)."""
    if isinstance(one_based_line, str):
        return one_based_line
    return f"line {row}" if one_based_line else f"row {row} (0-based)"


class DataError(ValueError):
    """A malformed data row: the message names the file, the row and the field, then what is wrong.

    ``where`` is a :func:`row_label` (``line 17`` / ``row 3 (0-based)``) or ``None`` for file-level errors.
    """

    def __init__(self, source: str, where: str | None, field_name: str | None, message: str):
        self.source, self.where, self.field = source, where, field_name
        parts = [source]
        if where is not None:
            parts.append(where)
        if field_name is not None:
            parts.append(f"field '{field_name}'")
        super().__init__(": ".join(parts + [message]))


#: human-readable text of each drop reason, in the order the report prints them
DROP_REASONS: dict[str, str] = {
    "response_no_rating": "responses dropped: no usable rating (all 'N/A')",
    "response_overlength": "responses dropped: prompt + response longer than max_length",
    "response_over_max_responses": "responses dropped: beyond max_responses (kept best, worst, then by reward)",
    "group_prompt_overlength": "groups dropped: the prompt alone leaves no room for a response token",
    "group_lost_preferred": "groups dropped: the preferred (first) response of an unscored group was dropped",
    "group_lost_reference": "groups dropped: the reference answer was dropped",
    "group_too_few_responses": "groups dropped: fewer than min_responses responses left",
    "group_tied_rewards": "groups dropped: all rewards equal (no preference pair; drop_tied=True)",
}


@dataclass
class DataReport:
    """What became of the rows read: kept, dropped (per reason), truncated. Nothing is dropped uncounted."""

    source: str = "<data>"
    rows_read: int = 0
    groups_kept: int = 0
    responses_kept: int = 0
    responses_truncated: int = 0
    tied_groups_kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    t0: int | None = None
    max_length: int | None = None            # the length policy's limit (prompt + response tokens)
    shortest_prompt: int | None = None       # tokens of the shortest prompt read
    special_token_rows: int = 0              # rows whose text spells one of the tokenizer's special tokens
    special_token_first: list[str] | None = None  # [where, field, token] of the first such row

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` items dropped for ``reason`` (a key of :data:`DROP_REASONS`)."""
        if reason not in DROP_REASONS:
            raise KeyError(f"unknown drop reason {reason!r}")
        if count:
            self.dropped[reason] += count

    def summary(self) -> str:
        """One line for the totals, then one line per drop reason that occurred."""
        lines = [f"{self.source}: {self.rows_read} rows read, {self.groups_kept} groups kept with "
                 f"{self.responses_kept} responses, {self.responses_truncated} responses truncated"]
        lines += [f"  {DROP_REASONS[r]}: {self.dropped[r]}" for r in DROP_REASONS if self.dropped[r]]
        if self.tied_groups_kept:
            lines.append(f"  groups kept with all rewards equal: {self.tied_groups_kept}")
        length_drops = self.dropped["group_prompt_overlength"] + self.dropped["response_overlength"]
        if not self.groups_kept and length_drops and self.max_length is not None:
            shortest = (f"; the shortest prompt alone is {self.shortest_prompt} tokens"
                        if self.shortest_prompt is not None else "")
            lines.append(f"  no group fits data.max_length={self.max_length} (prompt + response tokens){shortest}: "
                         "raise data.max_length")
        if self.special_token_rows and self.special_token_first:
            where, field_name, token = self.special_token_first
            lines.append(f"  warning: {self.special_token_rows} rows spell a special token of the tokenizer in their "
                         f"text, which becomes that control token (the first: {where}, field '{field_name}', "
                         f"{token!r}); set data.special_tokens_in_text=refuse to stop on them")
        return "\n".join(lines)
