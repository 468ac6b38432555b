"""Write the tiny group data set used by examples/configs/*_tiny.yaml (deterministic).

Task: "Repeat the letter X." Responses are short letter strings; the reward is the share of X in
the response, so a policy that learns the reward writes more X. Run:
    python tools/make_tiny_data.py examples/data/tiny_groups.jsonl
"""

from __future__ import annotations

import json
import random
import string
import sys


def make_rows(num_prompts: int = 64, k: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num_prompts):
        letter = rng.choice(string.ascii_lowercase[:8])
        responses, rewards = [], []
        while len(responses) < k:
            n = rng.randrange(3, 9)
            share = rng.random()
            text = "".join(letter if rng.random() < share else rng.choice(string.ascii_lowercase[:8])
                           for _ in range(n))
            if text in responses:
                continue
            responses.append(text)
            rewards.append(round(text.count(letter) / len(text), 4))
        if len(set(rewards)) == 1:  # a group without a preference teaches pairwise losses nothing
            continue
        rows.append({"prompt": f"Repeat the letter {letter}.", "responses": responses, "rewards": rewards})
    return rows


def make_grao_rows(num_prompts: int = 32, k: int = 4, seed: int = 1) -> list[dict]:
    """GRAO's format: sampled responses plus the reference answer (the letter repeated) and its reward."""
    rows = make_rows(num_prompts, k, seed)
    for row in rows:
        letter = row["prompt"].split()[-1].rstrip(".")
        row["reference"] = letter * 5
        row["reference_reward"] = 1.0
    return rows


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "examples/data/tiny_groups.jsonl"
    with open(out, "w") as f:
        for row in make_rows():
            f.write(json.dumps(row) + "\n")
    grao_out = out.replace("tiny_groups", "tiny_grao")
    with open(grao_out, "w") as f:
        for row in make_grao_rows():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out} and {grao_out}")
