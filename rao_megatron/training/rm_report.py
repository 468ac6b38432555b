"""Reward-model evaluation report: training loss, held-out pair loss and accuracy as a markdown table.

The layout follows the RAO paper's Table 1 (loss at the end of training, reward accuracy on the test
set), with the held-out loss and the mean scores of preferred / dispreferred responses beside them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: table column -> metrics.jsonl key, in the order the table shows them
COLUMNS = (("train loss", "loss"), ("held-out loss", "eval/loss"), ("held-out accuracy", "eval/accuracy"),
           ("chosen score", "eval/rewards/chosen"), ("rejected score", "eval/rewards/rejected"),
           ("margin", "eval/rewards/margin"))

REPORT_FILE = "rm_report.md"


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
    if isinstance(value, float):
        # small losses keep their significant digits (a well-separated toy task reaches 1e-5)
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def rm_report(records: list[dict[str, Any]], *, heldout_pairs: int | None = None,
              heldout_groups: int | None = None, title: str = "Reward model") -> str:
    """A markdown table of the held-out evaluations in ``records`` (metrics.jsonl rows): the last one, and the best.

    ``heldout_pairs`` / ``heldout_groups`` default to the records' ``eval/pairs`` / ``eval/groups``.
    Accuracy is the share of held-out pairs whose preferred response scores higher; train loss is the
    loss of the optimizer step evaluated; the score columns are mean scalar-head outputs. Returns a
    note instead of a table when no record was evaluated.
    """
    evals = [r for r in records if "eval/accuracy" in r]
    if not evals:
        return f"{title}: no held-out evaluation in the metrics (set data.eval_path or data.eval_fraction > 0)"
    last = evals[-1]
    pairs = heldout_pairs if heldout_pairs is not None else last.get("eval/pairs")
    groups = heldout_groups if heldout_groups is not None else last.get("eval/groups")
    size = ", ".join(f"{n} {what}" for n, what in ((pairs, "pairs"), (groups, "groups")) if n is not None)
    header = ["evaluation", "step"] + [name for name, _ in COLUMNS]
    rows = [["final", last.get("step")] + [last.get(k) for _, k in COLUMNS]]
    best = max(evals, key=lambda r: (r["eval/accuracy"], -r.get("eval/loss", math.inf)))
    if best is not last:
        rows.append(["best", best.get("step")] + [best.get(k) for _, k in COLUMNS])
    lines = [f"{title}: held-out preference pairs" + (f" ({size})" if size else ""), "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_rm_report(output_dir: str | Path, title: str | None = None) -> tuple[Path, str]:
    """Build the report from ``output_dir/metrics.jsonl`` and write it to ``output_dir/rm_report.md``."""
    output_dir = Path(output_dir)
    metrics = output_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    table = rm_report(records, title=title or f"Reward model {output_dir}")
    path = output_dir / REPORT_FILE
    path.write_text(table + "\n")
    return path, table
