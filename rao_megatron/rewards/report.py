"""Reward-model evaluation report: held-out pair accuracy and loss as a small markdown table (cf. RAO Table 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: metrics.jsonl key -> table column, in the order the table shows them
COLUMNS = (("eval/accuracy", "accuracy"), ("eval/loss", "loss"), ("eval/rewards/chosen", "chosen score"),
           ("eval/rewards/rejected", "rejected score"), ("eval/rewards/margin", "margin"))


def count_pairs(rewards_per_group: Sequence[Sequence[float] | None], sizes: Sequence[int],
                pairing: str = "best_vs_rest") -> int:
    """Preference pairs the ``bt`` loss forms from groups (``rewards`` None: the first response is preferred)."""
    total = 0
    for rewards, k in zip(rewards_per_group, sizes):
        if rewards is None:
            total += k - 1
        elif pairing == "all_pairs":
            total += sum(a > b for a in rewards for b in rewards)
        else:
            total += sum(r < max(rewards) for r in rewards)
    return total


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def rm_report(records: list[dict[str, Any]], *, heldout_pairs: int | None = None,
              heldout_groups: int | None = None, title: str = "Reward model") -> str:
    """A markdown table of the held-out evaluations in ``records`` (metrics.jsonl rows): the last one, and the best.

    ``heldout_pairs`` / ``heldout_groups`` default to the records' ``eval/pairs`` / ``eval/groups`` when
    present. Accuracy is the share of held-out pairs whose preferred response scores higher; the
    score columns are mean scalar-head outputs. Returns a note instead of a table when no record was evaluated.
    """
    evals = [r for r in records if "eval/accuracy" in r]
    if not evals:
        return f"{title}: no held-out evaluation in the metrics (set data.eval_path or data.eval_fraction > 0)"
    last = evals[-1]
    pairs = heldout_pairs if heldout_pairs is not None else last.get("eval/pairs")
    groups = heldout_groups if heldout_groups is not None else last.get("eval/groups")
    header = ["evaluation", "step", "held-out pairs"] + [name for _, name in COLUMNS]
    rows = [["final", last.get("step"), pairs] + [last.get(k) for k, _ in COLUMNS]]
    best = max(evals, key=lambda r: (r["eval/accuracy"], -r.get("eval/loss", math.inf)))
    if best is not last:
        rows.append(["best", best.get("step"), pairs] + [best.get(k) for k, _ in COLUMNS])
    lines = [f"{title}: held-out preference pairs" + (f" ({groups} groups)" if groups is not None else ""), "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
