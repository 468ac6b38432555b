"""Synthetic preference data for tiny reward-model runs: responses that hold a marker are preferred.

Each prompt asks for a few letters; the preferred response carries the marker character somewhere,
the other has the same length without it. A reward model must look at the whole response (not only
its last token) to tell them apart, yet a 2-layer model learns it in a few dozen steps on a CPU.

    python -m rao_megatron.rewards.synthetic examples/data/tiny_rm_pairs.jsonl --rows 256
    python -m rao_megatron.rewards.synthetic heldout.jsonl --rows 64 --seed 1 --groups 3
    python -m rao_megatron.rewards.synthetic examples/data/tiny_rm_ultrafeedback.jsonl --rows 256 --ultrafeedback 3
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path
from typing import Any

MARKER = "!"
LETTERS = string.ascii_lowercase[:8]


def _letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _with_markers(rng: random.Random, text: str, count: int) -> str:
    """``text`` with ``count`` of its characters replaced by the marker (at random positions)."""
    chars = list(text)
    for i in rng.sample(range(len(chars)), count):
        chars[i] = MARKER
    return "".join(chars)


def marker_pairs(rows: int, seed: int = 0, min_len: int = 4, max_len: int = 10) -> list[dict[str, Any]]:
    """Pair rows ``{prompt, chosen, rejected}``: ``chosen`` holds one marker, ``rejected`` none."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        n = rng.randint(min_len, max_len)
        out.append({"prompt": f"Write {n} letters.", "chosen": _with_markers(rng, _letters(rng, n), 1),
                    "rejected": _letters(rng, n)})
    return out


def marker_groups(rows: int, k: int = 3, seed: int = 0, min_len: int = 4,
                  max_len: int = 10) -> list[dict[str, Any]]:
    """Group rows ``{prompt, responses, rewards}``: K responses with 0..K-1 markers, reward = marker count."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        n = rng.randint(max(min_len, k), max_len)
        counts = list(range(k))
        rng.shuffle(counts)
        responses = [_with_markers(rng, _letters(rng, n), c) for c in counts]
        out.append({"prompt": f"Write {n} letters.", "responses": responses, "rewards": [float(c) for c in counts]})
    return out


ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def marker_ultrafeedback(rows: int, k: int = 3, seed: int = 0, min_len: int = 4,
                         max_len: int = 10) -> list[dict[str, Any]]:
    """Raw UltraFeedback rows ``{instruction, completions: [{response, overall_score, annotations}]}``.

    One of the K completions holds the marker and is rated highest (overall 8-10, aspect ratings 4-5);
    the others are rated lower (overall 1-7, ratings 1-3, sometimes "N/A") and never tie the best,
    so ``best_vs_rest`` pairs and the fine-grained mean agree with ``overall_score`` on the best one.
    """
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        n = rng.randint(min_len, max_len)
        best = rng.randrange(k)
        completions = []
        for j in range(k):
            text = _letters(rng, n)
            good = j == best
            ratings = [str(rng.randint(4, 5) if good else rng.randint(1, 3)) for _ in ASPECTS]
            if not good and rng.random() < 0.25:
                ratings[rng.randrange(len(ASPECTS))] = "N/A"
            completions.append({
                "model": f"model-{j}", "response": _with_markers(rng, text, 1) if good else text,
                "overall_score": float(rng.randint(16, 20)) / 2 if good else float(rng.randint(2, 14)) / 2,
                "annotations": {a: {"Rating": r} for a, r in zip(ASPECTS, ratings)}})
        out.append({"source": "synthetic", "prompt_id": f"tiny-{seed}-{i}", "instruction": f"Write {n} letters.",
                    "models": [c["model"] for c in completions], "completions": completions})
    return out


def write_jsonl(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` as JSONL (one object a line) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: write pairs (default) or groups of K responses."""
    p = argparse.ArgumentParser(prog="python -m rao_megatron.rewards.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output JSONL file")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--groups", type=int, default=0, metavar="K", help="write groups of K responses instead of pairs")
    shape.add_argument("--ultrafeedback", type=int, default=0, metavar="K",
                       help="write raw UltraFeedback rows with K rated completions instead of pairs")
    args = p.parse_args(argv)
    if args.ultrafeedback:
        rows = marker_ultrafeedback(args.rows, args.ultrafeedback, args.seed)
    elif args.groups:
        rows = marker_groups(args.rows, args.groups, args.seed)
    else:
        rows = marker_pairs(args.rows, args.seed)
    print(f"wrote {len(rows)} rows to {write_jsonl(rows, args.out)}")


if __name__ == "__main__":
    main()
