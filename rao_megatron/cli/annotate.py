"""Annotate a data set with rewards from a trained reward model or a rule function; writes group-format data.

    python -m rao_megatron.cli.annotate --data in.jsonl --out scored.jsonl --reward-fn rao_megatron.rewards.rule:letter_share
    torchrun --nproc-per-node 2 -m rao_megatron.cli.annotate --data in.jsonl --out scored.parquet \\
        --reward-model runs/rm_tiny/checkpoints --tp 2

Input: project groups, every TRL preference form (pairs, ultrafeedback_binarized, unpaired
prompt/completion/label), raw UltraFeedback or UltraChat rows (JSONL, Parquet, a saved `datasets`
directory or name). Output: the group format with a `rewards` column (Parquet if --out ends in
.parquet). Rows that cannot be scored go to OUT.rejected.jsonl with file, row, field and reason; when
every row is rejected nothing is written to OUT and the command exits 2 with the first reason.
Interrupted? Rerun the same command: it resumes after the last finished chunk.
With a reward model, launch TP × PP × DP processes with torchrun (DP ranks split the sequences).
"""

from __future__ import annotations

import argparse
import sys

from rao_megatron.cli.common import path_option, refuse_overwrite, run_cli
from rao_megatron.config import check_writable
from rao_megatron.data.formats import FORMATS
from rao_megatron.rewards.annotate import annotate, state_paths
from rao_megatron.rewards.rule import load_reward_fn
from rao_megatron.rewards.scorers import RuleScorer, start_model_scorer


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rao_megatron.cli.annotate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    path_option(p, "--data", required=True, help="input rows: JSONL / Parquet file, saved dataset or `datasets` name")
    path_option(p, "--out", role="output", required=True, help="output group data (.jsonl, or .parquet)")
    scorer = p.add_mutually_exclusive_group(required=True)
    path_option(scorer, "--reward-model", metavar="DIR",
                        help="reward-model checkpoint (train.task=rm): a checkpoint, its checkpoints/ root or the run dir")
    scorer.add_argument("--reward-fn", metavar="MODULE:FUNCTION",
                        help="reward function fn(prompt, response[, row]) -> float, e.g. "
                             "rao_megatron.rewards.rule:letter_share or rao_megatron.rewards.rule:exact_final_number")
    p.add_argument("--format", choices=FORMATS, help="input row format (default: detected from the first row)")
    p.add_argument("--split", default="train", help="split of a `datasets` input")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per DP rank (reward model)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="tokens per prompt + response for the reward model; longer responses are truncated")
    path_option(p, "--tokenizer", help="tokenizer directory (default: the one recorded in the checkpoint)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (reward model)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (reward model)")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows scored between progress records")
    p.add_argument("--restart", action="store_true", help="discard a partial output instead of resuming it")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N rows, leaving a resumable partial output (time-boxed jobs, tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    # the output and its side files (partial, rejected, progress) never replace the input
    refuse_overwrite({"--out": list(state_paths(args.out).values())}, {"--data": args.data})
    check_writable(args.out, "--out", directory=False)  # before a reward model is loaded or a row scored

    if args.reward_model:
        scorer = start_model_scorer(args.reward_model, tp=args.tp, pp=args.pp, batch_size=args.batch_size,
                                    max_length=args.max_length, tokenizer=args.tokenizer)
    else:
        if args.tp != 1 or args.pp != 1:
            raise ValueError("--tp / --pp apply to --reward-model only")
        scorer = RuleScorer(load_reward_fn(args.reward_fn), args.reward_fn)
    summary = annotate(args.data, args.out, scorer, format=args.format, chunk_rows=args.chunk_rows,
                       stop_after=args.stop_after, restart=args.restart, progress=not args.no_progress,
                       split=args.split)
    if scorer.writes:
        print(f"{args.data} -> {args.out}: {summary.text()}", flush=True)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The ``rao-*`` entry point."""
    return run_cli(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
