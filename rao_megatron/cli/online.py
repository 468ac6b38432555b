"""Online GRAO: rounds of (sample G answers with the current policy -> score them -> GRAO update).

    python -m rao_megatron.cli.online --config examples/configs/grao_smollm2_online.yaml \\
        --prompts runs/demo/data/train_prompts.jsonl --hf .cache/smollm2-hf --start runs/demo/start_megatron \\
        --out runs/demo/grao_online --rounds 2 --reward-fn rao_megatron.rewards.rule:exact_final_number

Each prompt row needs a ``reference`` answer (GRAO's reference term; arithmetic rows have one) and
whatever the reward needs (``answer`` for exact_final_number). Round r:

1. sample:  ``rao_megatron.cli.generate`` -- G answers per prompt from the round's policy (HF weights; round 1
            uses --hf, later rounds the previous round's export), seed + r
2. score:   ``rao_megatron.cli.annotate`` with --reward-fn or --reward-model; the reference answer is scored too
3. update:  ``rao_megatron.cli.train`` with the GRAO config, initialised from the previous round's checkpoint
            (round 1: --start), on this round's groups; a fresh optimizer and LR schedule each round
4. export:  ``rao_megatron.cli.convert megatron-to-hf`` -> the next round's sampler (a LoRA round's checkpoint
            with ``--merge-lora``: the sampler loads the merged model like any other)

``OUT/rounds.jsonl`` records each round's on-policy sample accuracy (mean reward of its samples) and the
training loss; ``OUT/final_hf`` is the last policy in HF format. A finished step of a round leaves a
marker, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from rao_megatron.cli.chain import fresh_dir, python_module, run_chain, run_command, torchrun_module
from rao_megatron.cli.common import path_option, run_cli


def _done(marker: Path) -> bool:
    return marker.is_file()


def _mark(marker: Path, payload: dict | None = None) -> None:
    marker.write_text(json.dumps(payload or {}) + "\n")


def _sample_rewards(groups: Path) -> float:
    """Mean reward of the policy's sampled answers (annotate keeps the reference answer's in ``reference_reward``)."""
    total, count = 0.0, 0
    for line in groups.read_text().splitlines():
        if line.strip():
            rewards = json.loads(line)["rewards"]
            total += sum(rewards)
            count += len(rewards)
    return total / count if count else float("nan")


def _last_loss(run_dir: Path) -> float | None:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in lines if "loss" in r and "eval/loss" not in r]
    return losses[-1] if losses else None


def merge_args(checkpoints: Path) -> list[str]:
    """``--merge-lora`` when a round's checkpoint is a LoRA checkpoint (it holds the adapters only), so that
    the next round samples from base + adapters; nothing for a full checkpoint."""
    from rao_megatron.models.checkpoint import read_checkpoint_meta  # heavy: megatron; --help loads none
    from rao_megatron.training.model_init import PEFT_KEY

    return ["--merge-lora"] if PEFT_KEY in read_checkpoint_meta(checkpoints) else []


def check_prompts(path: str) -> int:
    """Every prompt row needs a non-empty ``reference`` answer (GRAO's reference term): fail before any work."""
    from rao_megatron.data.errors import DataError  # heavy: torch, transformers; --help loads none
    from rao_megatron.data.prompts import read_prompts

    prompts = read_prompts(path)
    for i, p in enumerate(prompts):
        ref = p.row.get("reference")
        if not isinstance(ref, str) or not ref.strip():
            raise DataError(path, f"prompt {i + 1} (id {p.id!r})", "reference",
                            "GRAO needs a reference answer in every prompt row (a final assistant turn in "
                            f"'messages' also counts), got {ref!r}")
    return len(prompts)


def run_online(args: argparse.Namespace) -> Path:
    check_prompts(args.prompts)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scorer = ["--reward-fn", args.reward_fn] if args.reward_fn else ["--reward-model", args.reward_model]
    policy_hf, policy_ckpt = Path(args.hf).resolve(), Path(args.start).resolve()
    history = []
    for r in range(1, args.rounds + 1):
        rd = out / f"round_{r}"
        rd.mkdir(exist_ok=True)
        print(f"\n== GRAO online round {r}/{args.rounds}: sample with {policy_hf}", flush=True)
        if not _done(rd / "sampled.done"):
            run_command(python_module(
                "rao_megatron.cli.generate", "--model", policy_hf, "--prompts", args.prompts, "--out", rd / "samples.jsonl",
                "--n", args.n, "--max-new-tokens", args.max_new_tokens, "--temperature", args.temperature,
                "--seed", args.seed + r, "--backend", args.backend))
            _mark(rd / "sampled.done")
        if not _done(rd / "scored.done"):
            (rd / "groups.jsonl").unlink(missing_ok=True)
            run_command(python_module("rao_megatron.cli.annotate", "--data", rd / "samples.jsonl",
                                      "--out", rd / "groups.jsonl", *scorer))
            _mark(rd / "scored.done")
        accuracy = _sample_rewards(rd / "groups.jsonl")
        print(f"  round {r}: mean reward of the policy's samples {accuracy:.3f}", flush=True)
        if not _done(rd / "trained.done"):
            run_command(torchrun_module(
                args.procs, "rao_megatron.cli.train", "--config", args.config, f"model.init_checkpoint={policy_ckpt}",
                f"data.train_path={rd / 'groups.jsonl'}", f"train.output_dir={fresh_dir(rd / 'train')}",
                f"train.seed={args.train_seed + r}", "checkpoint.save_at_end=true", *args.overrides))
            _mark(rd / "trained.done")
        policy_ckpt = rd / "train" / "checkpoints"
        if not _done(rd / "exported.done"):
            run_command(python_module("rao_megatron.cli.convert", "megatron-to-hf", "--megatron", policy_ckpt,
                                      "--out", fresh_dir(rd / "hf"), "--no-progress", *merge_args(policy_ckpt)))
            _mark(rd / "exported.done")
        policy_hf = rd / "hf"
        history.append({"round": r, "sample_reward": accuracy, "train_loss": _last_loss(rd / "train"),
                        "groups": str(rd / "groups.jsonl"), "checkpoint": str(policy_ckpt)})
    (out / "rounds.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    final = out / "final_hf"
    if final.is_symlink():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    final.symlink_to(policy_hf.relative_to(out), target_is_directory=True)
    print("\nround  mean sample reward  final train loss")
    for h in history:
        loss = "n/a" if h["train_loss"] is None else f"{h['train_loss']:.4f}"
        print(f"{h['round']:>5}  {h['sample_reward']:>18.3f}  {loss:>16}")
    print(f"final policy (HF): {final}")
    return final


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rao_megatron.cli.online", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    path_option(p, "--config", required=True, help="GRAO training config (loss.name=grao)")
    path_option(p, "--prompts", required=True, help="prompt rows with a `reference` answer (JSONL / Parquet)")
    path_option(p, "--hf", required=True, help="the starting policy in HF format (the round-1 sampler)")
    path_option(p, "--start", required=True, help="the starting policy as a Megatron checkpoint (round-1 init)")
    path_option(p, "--out", role="output", required=True, help="run directory (round_N/ and final_hf go here)")
    p.add_argument("--rounds", type=int, default=2)
    scorer = p.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--reward-fn", metavar="MODULE:FUNCTION", help="rule reward, as for rao_megatron.cli.annotate")
    path_option(scorer, "--reward-model", metavar="DIR", help="reward-model checkpoint, as for rao_megatron.cli.annotate")
    p.add_argument("--n", type=int, default=4, help="G: answers sampled per prompt and round")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"), help="sampler backend")
    p.add_argument("--procs", type=int, default=1, help="torchrun processes of the update (TP x PP x DP)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (round r uses seed + r)")
    p.add_argument("--train-seed", type=int, default=1234, help="training seed (round r uses it + r)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the training config")
    return p


def main(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    return run_chain(lambda: run_online(args))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
