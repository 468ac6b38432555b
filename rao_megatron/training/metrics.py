"""Step metrics: metrics.jsonl (one JSON object per optimizer step), TensorBoard, console, PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: curves drawn by :func:`plot_metrics` when present (others are ignored)
PLOTTED = ("loss", "eval/loss", "lr", "grad_norm", "tokens_per_s", "rewards/best", "rewards/worst",
           "rewards/gap", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
           "ranking_accuracy", "displacement", "residual", "log_z", "accuracy", "eval/accuracy", "nll")


def mean_metrics(parts: Sequence[dict[str, Any]], weights: Sequence[float]) -> dict[str, float]:
    """Weighted mean of per-micro-batch metric dicts (keys missing from a part, or None or NaN there, are
    skipped for it). Values are numbers; a tensor is read on the host here, one sync each
    (``training.reductions.read_on_host`` reads a whole step's first)."""
    totals: dict[str, float] = {}
    norms: dict[str, float] = {}
    for part, w in zip(parts, weights):
        for k, v in part.items():
            if v is None:
                continue
            v = float(v)
            if math.isnan(v):
                continue
            totals[k] = totals.get(k, 0.0) + w * v
            norms[k] = norms.get(k, 0.0) + w
    return {k: totals[k] / norms[k] for k in totals if norms[k] > 0}


class MetricsWriter:
    """Writes each step's metrics to ``output_dir/metrics.jsonl`` and TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, resume: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter  # heavy: torch; metrics.py itself loads none

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        except ImportError:  # tensorboard is a core dependency; tolerate its absence in odd envs
            self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites the steps it repeats)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw the main curves of a run as PNGs (one figure per metric family); returns the files."""
    import matplotlib  # heavy: only for the plots; the backend is set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use above

    records = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    families = {
        "loss.png": ("loss", "eval/loss"),
        "rewards.png": ("rewards/best", "rewards/worst", "rewards/gap", "rewards/chosen", "rewards/rejected",
                        "rewards/margin"),
        "accuracy.png": ("ranking_accuracy", "rewards/accuracy", "accuracy", "eval/accuracy", "displacement"),
        # GRAO: the objective and its three terms (the paper's loss-decomposition figure)
        "objective.png": ("objective", "objective/exploration", "objective/imitation", "objective/alignment"),
        "optimizer.png": ("lr", "grad_norm"),
        "throughput.png": ("tokens_per_s",),
    }
    written = []
    for filename, keys in families.items():
        present = [k for k in keys if any(k in r for r in records)]
        if not present:
            continue
        fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.4 * len(present)), squeeze=False)
        for ax, key in zip(axes[:, 0], present):
            pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
