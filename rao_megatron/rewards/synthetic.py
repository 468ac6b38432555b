"""Synthetic preference data for tiny reward-model runs: responses that hold a marker are preferred.

Each prompt asks for a few letters; the preferred response carries the marker character somewhere,
the other has the same length without it. A reward model must look at the whole response (not only
its last token) to tell them apart, yet a 2-layer model learns it in a few dozen steps on a CPU.

    python -m rao_megatron.rewards.synthetic examples/data/tiny_rm_pairs.jsonl --rows 512
    python -m rao_megatron.rewards.synthetic heldout.jsonl --rows 64 --seed 1 --groups 3
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
    p.add_argument("--groups", type=int, default=0, metavar="K", help="write groups of K responses instead of pairs")
    args = p.parse_args(argv)
    rows = marker_groups(args.rows, args.groups, args.seed) if args.groups else marker_pairs(args.rows, args.seed)
    print(f"wrote {len(rows)} rows to {write_jsonl(rows, args.out)}")


if __name__ == "__main__":
    main()
