"""Evaluate generated answers: rule accuracy and pass@1, reward-model win rate against a baseline, mean length.

    python -m rao_megatron.cli.evaluate --answers before.jsonl --label before --answers after.jsonl --label after \\
        --reward-fn rao_megatron.rewards.rule:exact_final_number \\
        --reward-model runs/rm/checkpoints --baseline before.jsonl --out-dir runs/eval

Answers files are ``python -m rao_megatron.cli.generate`` outputs (``id``, ``prompt`` | ``messages``,
``responses``: K >= 1 samples, other fields such as ``answer``); ``--answers`` may be repeated, each with
its ``--label``, for one table row per file.

- accuracy: the reward function's mean over all samples (``exact_final_number`` gives 1 for a correct
  GSM8K-style final answer: ``#### N``, ``\\boxed{N}``, "the answer is N", else the last number); pass@1:
  the same over each prompt's first sample. Without ``--reward-fn``, files whose rows all carry an
  ``answer`` are scored with ``exact_final_number``. A sample the function cannot score (it raises naming
  the response) counts as wrong and is counted in ``unscored``; a bad row field (a missing ``answer``) is
  an error naming file, row and field.
- win rate (an AlpacaEval-style proxy): for each prompt id in both the answers and ``--baseline``, the
  share of (answer sample, baseline sample) pairs in which the answer gets the higher reward (ties count
  half), averaged over prompts. The judge is ``--reward-model`` (a checkpoint trained with train.task=rm;
  launch with torchrun for TP / PP, as for annotate), else the reward function.
- mean length of the samples in tokens (``--tokenizer``, else the tokenizer of the model recorded in the
  rows' ``sampling.model``, else the reward model's) and in characters.

Writes OUT_DIR/eval.md (the table) and OUT_DIR/eval.json (all figures), and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch.distributed as dist

from rao_megatron.cli.common import path_option, refuse_overwrite, run_cli
from rao_megatron.config import check_writable, guarded_write
from rao_megatron.rewards.answers import DEFAULT_REWARD_FN, evaluate_answers, markdown_table, write_report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rao_megatron.cli.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    path_option(p, "--answers", action="append", required=True,
                   help="generate output to evaluate (repeat for several, one table row each)")
    p.add_argument("--label", action="append", help="name of each --answers file in the table (default: file name)")
    p.add_argument("--reward-fn", metavar="MODULE:FUNCTION",
                   help=f"rule reward for accuracy / pass@1 (default: {DEFAULT_REWARD_FN} when rows carry 'answer')")
    path_option(p, "--reward-model", metavar="DIR", help="reward-model checkpoint judging the win rate")
    path_option(p, "--baseline", help="generate output of another model to compute the win rate against")
    path_option(p, "--tokenizer", help="tokenizer directory for mean token length (default: the answers' model's)")
    path_option(p, "--out-dir", role="output", help="where eval.md and eval.json go (default: beside the first --answers file)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch (reward model)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per prompt + answer for the reward model")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (reward model)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (reward model)")
    return p


def main(args: argparse.Namespace) -> int:
    if args.reward_model and not args.baseline:
        raise ValueError("--reward-model judges the win rate against --baseline; give --baseline too")
    out_dir = args.out_dir or Path(args.answers[0]).parent
    refuse_overwrite({"--out-dir": [Path(out_dir) / "eval.md", Path(out_dir) / "eval.json"]},
                     {"--answers": args.answers, "--baseline": args.baseline})
    check_writable(out_dir, "--out-dir")  # before any answer is scored (every rank: all leave together)
    summary = evaluate_answers(args.answers, args.label, reward_fn=args.reward_fn, reward_model=args.reward_model,
                               baseline=args.baseline, tokenizer=args.tokenizer, batch_size=args.batch_size,
                               max_length=args.max_length, tp=args.tp, pp=args.pp)
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    with guarded_write(out_dir, "--out-dir"):
        md, js = write_report(summary, out_dir)
    for res in summary["results"]:
        if res.get("note"):
            print(f"note: {res['note']}", flush=True)
    print(markdown_table(summary), flush=True)
    print(f"wrote {md} and {js}", flush=True)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The ``rao-*`` entry point."""
    return run_cli(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
