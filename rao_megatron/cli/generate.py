"""Sample K responses per prompt with vLLM (GPU) or HF transformers (CPU / GPU); one JSONL output format.

    python -m rao_megatron.cli.generate --model .cache/smollm2-hf --prompts prompts.jsonl --out samples.jsonl --n 4
    python -m rao_megatron.cli.annotate --data samples.jsonl --out scored.jsonl \\
        --reward-fn rao_megatron.rewards.rule:exact_final_number

Input (JSONL, Parquet or a saved `datasets` directory): rows with ``prompt`` (a string: one user turn
through the tokenizer's chat template; or a list of messages) or ``messages`` (a chat list; a final
assistant turn is dropped from the prompt and kept as ``reference``), an optional ``id`` (default: the
row index) and any other fields (``answer``, ...), which are passed through. Input ``responses`` /
``rewards`` are replaced.

Output: one JSON line per prompt, ``{id, prompt | messages (as input), responses: [K strings],
sampling: {n, temperature, top_p, max_new_tokens, seed, backend, model}, ...other fields}``: the
project's group format without rewards, ready for ``rao_megatron.cli.annotate``.

Interrupted? Rerun the same command: prompts whose id is already in --out are skipped (rows are
appended and flushed per batch). Sampling is seeded per prompt id (HF: per sample too), so a resumed
run writes what an uninterrupted one would have. ``--temperature 0`` is greedy: K copies of one answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rao_megatron.cli.common import path_option, run_cli
from rao_megatron.config import guarded_write
from rao_megatron.data.prompts import read_prompts
from rao_megatron.generation import (
    BACKENDS,
    DTYPES,
    SamplingConfig,
    iter_generated,
    load_done,
    make_backend,
    resolve_backend,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rao_megatron.cli.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    path_option(p, "--model", required=True, help="HF checkpoint directory (weights, config, tokenizer with a chat template)")
    path_option(p, "--prompts", required=True, help="input rows: JSONL / Parquet file or saved `datasets` directory")
    path_option(p, "--out", role="output", required=True, help="output JSONL (appended to: a rerun resumes)")
    p.add_argument("--n", type=int, default=4, help="responses per prompt (K)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length limit in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="seed; each prompt's samples are seeded from it and the prompt id")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="vllm (GPU), hf (transformers, CPU or GPU); auto: vllm if CUDA and vllm are available")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call (and per flush of --out)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model dtype (auto: float32 on CPU, bfloat16 on GPU for HF; the checkpoint's for vLLM)")
    p.add_argument("--limit", type=int, help="only the first N input rows")
    p.add_argument("--split", default="train", help="split of a saved `datasets` input")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (HF backend)")
    p.add_argument("--restart", action="store_true", help="overwrite --out instead of resuming it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise ValueError(f"--out must be a .jsonl file, got {out}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    cfg = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed)
    cfg.check()
    prompts = read_prompts(args.prompts, limit=args.limit, split=args.split)  # bad rows fail before the model loads
    backend = resolve_backend(args.backend)
    if args.restart:
        out.unlink(missing_ok=True)
    done = load_done(out, cfg.record(backend, args.model))
    todo = [p for p in prompts if p.key not in done]
    if done:
        print(f"resuming {out}: {len(prompts) - len(todo)} of {len(prompts)} prompts already there", flush=True)
    if todo:
        engine = make_backend(backend, args.model, seed=args.seed, dtype=args.dtype, threads=args.threads)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            for rows in iter_generated(engine, todo, cfg, model_name=args.model, batch_size=args.batch_size,
                                       progress=not args.no_progress, done=len(prompts) - len(todo)):
                with guarded_write(out, "--out"):  # a full disk: one line; a rerun resumes after the last batch
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                    f.flush()
                    os.fsync(f.fileno())
    print(f"{args.prompts} -> {out}: {len(prompts)} prompts × {cfg.n} responses ({len(todo)} generated now, "
          f"backend {backend})", flush=True)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The ``rao-*`` entry point."""
    return run_cli(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
