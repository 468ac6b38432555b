"""A synthetic, UltraFeedback-like ragged length mix for the packing and TRL benchmarks (no download).

    python benchmarks/ultrafeedback_mix.py --groups 64 --out /tmp/mix   # writes groups.jsonl, pairs.jsonl, prints stats

Source of the figures. We could not retrieve published per-field length statistics of UltraFeedback
(openbmb/UltraFeedback; its dataset cards give only split sizes and bytes), so the mix follows the figures
stated in issue #16, which measured "a synthetic UltraFeedback-like mix": prompts of 100-600 characters,
4 responses of 200-1,500 characters (uniform), SmolLM2 tokenizer, mean 255 real tokens per sequence at
max_length 1024 (75 % of a padded micro-batch is padding). Real preference data is right-skewed (many
short answers, a long tail), so instead of a uniform draw each field is log-normal with the same mean as
the issue's uniform range and the same spread (95th / 5th percentile = high / low of the range):

    field      issue's range   mean    log-sd sigma   median   5th-95th pct     clipped to
    prompt     100-600         350     0.545          302      123-739          [50, 1500] characters
    response   200-1500        850     0.612          705      257-1930         [100, 4000] characters

Text is random words from a fixed list of common English words (seeded), with sentence punctuation, so
the SmolLM2 tokenizer sees roughly one token per word, as on real English text. Rewards are UltraFeedback-
style overall scores drawn uniformly from {1.0, 1.5, ..., 10.0}. Everything is a pure function of the seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

#: (issue's range low, high, clip low, clip high) in characters: log-normal with the range's mean, and
#: 95th / 5th percentile = high / low
PROMPT_CHARS = (100, 600, 50, 1500)
RESPONSE_CHARS = (200, 1500, 100, 4000)
RESPONSES_PER_PROMPT = 4
_Z95 = 1.6448536269514722  # standard normal 95th percentile

WORDS = (
    "the of and to in is was that for on with as by at from this be are or an not it which have has had but "
    "were they their one all there can more also been time when other would into its only new some two may "
    "first after most such these over many years than where between used about during both through people "
    "system water under three made each world work state however while model data value number part found "
    "because known since well group city name later being under small large following often within called "
    "around same high long will against area based different history several life public early local using "
    "form order general example power result process given second important country light energy answer "
    "question simple reason explain describe step first next finally therefore because example consider "
    "problem solution language write story summary list table code function return variable loop string "
    "please help provide detailed short answer clear specific write compare contrast analyze evaluate"
).split()


def lognormal_params(low: float, high: float) -> tuple[float, float]:
    """``(mu, sigma)`` of the log-normal with the mean of uniform(low, high) and 95th / 5th percentile = high / low."""
    sigma = math.log(high / low) / (2 * _Z95)
    return math.log((low + high) / 2) - sigma**2 / 2, sigma


def draw_chars(rng: random.Random, spec: tuple[int, int, int, int]) -> int:
    mu, sigma = lognormal_params(spec[0], spec[1])
    return int(min(max(rng.lognormvariate(mu, sigma), spec[2]), spec[3]))


def text_of(rng: random.Random, chars: int) -> str:
    """Random words until ``chars`` characters, as sentences of 6-18 words."""
    out: list[str] = []
    n, sentence = 0, 0
    limit = rng.randint(6, 18)
    while n < chars:
        w = rng.choice(WORDS)
        if sentence == 0:
            w = w.capitalize()
        sentence += 1
        if sentence >= limit:
            w += rng.choice(".?!.")
            sentence, limit = 0, rng.randint(6, 18)
        out.append(w)
        n += len(w) + 1
    text = " ".join(out)
    return text if text[-1] in ".?!" else text + "."


def make_groups(n: int, seed: int = 0, k: int = RESPONSES_PER_PROMPT) -> list[dict]:
    """``n`` groups in our JSONL format: ``{"prompt", "responses": [k], "rewards": [k]}``."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n):
        prompt = text_of(rng, draw_chars(rng, PROMPT_CHARS))
        responses = [text_of(rng, draw_chars(rng, RESPONSE_CHARS)) for _ in range(k)]
        rewards = [rng.randint(2, 20) / 2 for _ in range(k)]
        groups.append({"prompt": prompt, "responses": responses, "rewards": rewards})
    return groups


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` preference pairs ``{"prompt", "chosen", "rejected"}``: responses 0 and 1 of each group."""
    return [{"prompt": g["prompt"], "chosen": g["responses"][0], "rejected": g["responses"][1]}
            for g in make_groups(n, seed, k=2)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def token_stats(groups: list[dict], tokenizer_dir: str, max_length: int) -> dict:
    """Real tokens per sequence (chat template + end-of-turn, as training tokenizes) and the padded share."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    lengths = []
    for g in groups:
        x = tok.apply_chat_template([{"role": "user", "content": g["prompt"]}], add_generation_prompt=True,
                                    tokenize=False)
        nx = len(tok(x, add_special_tokens=False)["input_ids"])
        for y in g["responses"]:
            lengths.append(min(max_length, nx + len(tok(y, add_special_tokens=False)["input_ids"]) + 1))
    lengths.sort()
    mean = sum(lengths) / len(lengths)
    return {"sequences": len(lengths), "mean_tokens": mean, "median_tokens": lengths[len(lengths) // 2],
            "p95_tokens": lengths[int(0.95 * (len(lengths) - 1))], "max_tokens": lengths[-1],
            "padding_share_at_max_length": 1 - mean / max_length}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for groups.jsonl and pairs.jsonl")
    p.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / ".cache/smollm2-hf"))
    p.add_argument("--max-length", type=int, default=1024)
    args = p.parse_args()
    groups = make_groups(args.groups, args.seed)
    if args.out:
        write_jsonl(groups, Path(args.out) / "groups.jsonl")
        write_jsonl(make_pairs(args.groups, args.seed), Path(args.out) / "pairs.jsonl")
    chars = [len(g["prompt"]) for g in groups], [len(y) for g in groups for y in g["responses"]]
    print(f"prompt chars: mean {sum(chars[0]) / len(chars[0]):.0f}; response chars: mean "
          f"{sum(chars[1]) / len(chars[1]):.0f}")
    if Path(args.tokenizer).is_dir():
        print(json.dumps(token_stats(groups, args.tokenizer, args.max_length)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
