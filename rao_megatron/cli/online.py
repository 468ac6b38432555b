"""Online preference training: rounds of (sample G answers with the current policy -> score them -> update).

    python -m rao_megatron.cli.online --config examples/configs/grao_smollm2_online.yaml \\
        --prompts runs/demo/data/train_prompts.jsonl --hf .cache/smollm2-hf --start runs/demo/start_megatron \\
        --out runs/demo/grao_online --rounds 4 --reward-fn rao_megatron.rewards.rule:exact_final_number

Any loss that trains on groups with rewards: GRAO (the paper's online setting), RAO, DPO and the other pairwise
losses (iterative / online DPO). For GRAO each prompt row needs a ``reference`` answer (its imitation term;
arithmetic rows have a worked one) and whatever the reward needs (``answer`` for exact_final_number). Round r:

1. sample:  ``rao_megatron.cli.generate`` -- G answers per prompt (the round's --prompts-per-round of them, the
            next ones each round; default all) from the current policy (HF weights; round 1
            uses --hf, later rounds the previous round's export), seed + r; G, temperature and the longest
            answer from the config's ``online`` section (the flags override it)
2. score:   ``rao_megatron.cli.annotate`` with --reward-fn or --reward-model; the reference answer is scored
            too. GRAO's y is the row's reference, or with ``online.reference_answer=best_sample`` the group's
            best sample where it earns at least the reference's reward; the other losses train on the samples
            only (the reference answer is not a sample of the policy)
3. update:  ``rao_megatron.cli.train`` on this round's groups, every group once: the round adds
            ceil(groups / train.global_batch_groups) steps (pairwise losses: the groups whose rewards differ)
            to one run in OUT/train that every round continues -- weights, Adam state, step and LR schedule
            carry over (``checkpoint.allow_changed_run``: the new data's stream starts at its beginning), the
            schedule spans every round (``train.schedule_steps``), the reference model stays the start
            (--start: ``model.init_checkpoint``)
4. export:  ``rao_megatron.cli.convert megatron-to-hf`` -> the next round's sampler (a LoRA run's checkpoint
            with ``--merge-lora``: the sampler loads the merged model like any other)

``OUT/rounds.jsonl`` records each round's mean sample reward (on-policy accuracy with a 0/1 rule), mean answer
length (characters), its steps and its last training loss; ``OUT/final_hf`` is the last policy in HF format.
A finished step of a round leaves a marker, so an interrupted run continues where it stopped.
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


def _samples(groups: Path) -> tuple[float, float]:
    """Mean reward and mean length (characters) of the policy's sampled answers in an annotated groups file
    (annotate keeps the reference answer apart, in ``reference`` / ``reference_reward``)."""
    rewards, lengths = [], []
    for row in read_jsonl(groups):
        rewards += row["rewards"]
        lengths += [len(y) for y in row["responses"]]
    nan = float("nan")
    return (sum(rewards) / len(rewards) if rewards else nan), (sum(lengths) / len(lengths) if lengths else nan)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _last_loss(run_dir: Path, after: int, upto: int) -> float | None:
    """The last training loss of the steps ``after < step <= upto`` (one round's)."""
    records = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    losses = [r["loss"] for r in records if r.get("loss") is not None and after < r["step"] <= upto]
    return losses[-1] if losses else None


def training_groups(rows: list[dict], *, grao: bool, reference_answer: str) -> list[dict]:
    """This round's training rows from the annotated groups: GRAO keeps a reference answer per group (the
    row's, or with ``best_sample`` the best sample when its reward reaches the reference's); the other losses
    train on the policy's samples only."""
    out = []
    for row in rows:
        row = dict(row)
        if not grao:
            row.pop("reference", None)
            row.pop("reference_reward", None)
        elif reference_answer == "best_sample" and row["rewards"]:
            best = max(range(len(row["rewards"])), key=row["rewards"].__getitem__)
            if row["rewards"][best] >= row.get("reference_reward", float("inf")):
                row["reference"], row["reference_reward"] = row["responses"][best], row["rewards"][best]
        out.append(row)
    return out


def round_steps(rows: list[dict], global_batch: int, pairwise: bool) -> int:
    """Steps that train every group of a round once: the groups a loss keeps (a pairwise loss drops the ones
    whose rewards all tie) over the global batch, rounded up; 0 when it keeps none."""
    kept = sum(1 for r in rows if not pairwise or len(set(r["rewards"])) > 1)
    return -(-kept // global_batch)


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
    from rao_megatron.config import load_config  # light: no torch
    from rao_megatron.data.prompts import read_prompts  # heavy: transformers; --help loads none
    from rao_megatron.losses import get_loss

    out = Path(args.out).resolve()
    start = Path(args.start).resolve()
    train_dir = out / "train"
    # the settings the rounds run with (their data files come later: the prompts stand in for them here)
    cfg = load_config(args.config, [*args.overrides, f"model.init_checkpoint={start}", f"train.output_dir={train_dir}",
                                    f"data.train_path={Path(args.prompts).resolve()}"])
    grao = cfg.loss.name == "grao"
    if grao:
        check_prompts(args.prompts)
    pairwise = get_loss(cfg.loss.name).pairwise
    online = cfg.online
    n = args.n or online.samples
    temperature = args.temperature or online.temperature
    max_new_tokens = args.max_new_tokens or online.max_new_tokens
    out.mkdir(parents=True, exist_ok=True)
    scorer = ["--reward-fn", args.reward_fn] if args.reward_fn else ["--reward-model", args.reward_model]
    policy_hf = Path(args.hf).resolve()
    prompts = [p.row for p in read_prompts(args.prompts)]
    per_round = min(args.prompts_per_round or len(prompts), len(prompts))
    # the LR schedule spans the whole run: each round's prompts once (a pairwise loss may train fewer)
    horizon = args.rounds * max(1, -(-per_round // cfg.train.global_batch_groups))
    history, steps = [], 0
    for r in range(1, args.rounds + 1):
        rd = out / f"round_{r}"
        rd.mkdir(exist_ok=True)
        print(f"\n== online {cfg.loss.name} round {r}/{args.rounds}: sample with {policy_hf}", flush=True)
        if not _done(rd / "sampled.done"):
            # this round's prompts: the next ``per_round`` of them, cycling through the file
            chosen = [prompts[(per_round * (r - 1) + i) % len(prompts)] for i in range(per_round)]
            (rd / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in chosen))
            run_command(python_module(
                "rao_megatron.cli.generate", "--model", policy_hf, "--prompts", rd / "prompts.jsonl",
                "--out", rd / "samples.jsonl",
                "--n", n, "--max-new-tokens", max_new_tokens, "--temperature", temperature,
                "--seed", args.seed + r, "--backend", args.backend))
            _mark(rd / "sampled.done")
        if not _done(rd / "scored.done"):
            (rd / "groups.jsonl").unlink(missing_ok=True)
            run_command(python_module("rao_megatron.cli.annotate", "--data", rd / "samples.jsonl",
                                      "--out", rd / "groups.jsonl", *scorer))
            rows = training_groups(read_jsonl(rd / "groups.jsonl"), grao=grao,
                                   reference_answer=online.reference_answer)
            (rd / "train_groups.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
            _mark(rd / "scored.done")
        reward, length = _samples(rd / "groups.jsonl")
        print(f"  round {r}: mean reward of the policy's samples {reward:.3f}, mean length {length:.1f} characters",
              flush=True)
        rows = read_jsonl(rd / "train_groups.jsonl")
        before = steps
        if _done(rd / "trained.done"):
            steps = json.loads((rd / "trained.done").read_text())["steps"]
        elif (added := round_steps(rows, cfg.train.global_batch_groups, pairwise)) == 0:
            print(f"  round {r}: every group's rewards tie: loss {cfg.loss.name} finds no pair, no update this round",
                  flush=True)
            _mark(rd / "trained.done", {"steps": steps})
        else:
            steps = before + added
            first = before == 0
            run_command(torchrun_module(
                args.procs, "rao_megatron.cli.train", "--config", args.config, f"model.init_checkpoint={start}",
                f"data.train_path={rd / 'train_groups.jsonl'}", f"train.output_dir={train_dir}",
                f"train.steps={steps}", f"train.schedule_steps={max(horizon, steps)}", f"train.seed={args.train_seed}",
                f"checkpoint.resume={'fresh' if first else 'auto'}", f"checkpoint.allow_changed_run={not first}",
                "checkpoint.save_at_end=true", *args.overrides))
            _mark(rd / "trained.done", {"steps": steps})
        checkpoint = train_dir / "checkpoints" / f"step_{steps:07d}" if steps else start
        if steps > before:  # this round updated the policy: the next round samples from it
            if not _done(rd / "exported.done"):
                run_command(python_module("rao_megatron.cli.convert", "megatron-to-hf", "--megatron", checkpoint,
                                          "--out", fresh_dir(rd / "hf"), "--no-progress", *merge_args(checkpoint)))
                _mark(rd / "exported.done")
            policy_hf = rd / "hf"
        history.append({"round": r, "sample_reward": reward, "answer_length": length, "groups": len(rows),
                        "steps": steps - before, "train_loss": _last_loss(train_dir, before, steps),
                        "checkpoint": str(checkpoint)})
    (out / "rounds.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    final = out / "final_hf"
    if final.is_symlink():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    final.symlink_to(policy_hf.relative_to(out), target_is_directory=True)
    print("\nround  mean sample reward  mean length  steps  last train loss")
    for h in history:
        loss = "n/a" if h["train_loss"] is None else f"{h['train_loss']:.4f}"
        print(f"{h['round']:>5}  {h['sample_reward']:>18.3f}  {h['answer_length']:>11.1f}  {h['steps']:>5}  {loss:>15}")
    print(f"final policy (HF): {final}")
    return final


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rao_megatron.cli.online", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    path_option(p, "--config", required=True, help="training config (any loss on groups with rewards: grao, rao, "
                "dpo, ...; its `online` section: G, temperature, longest answer, GRAO's reference answer)")
    path_option(p, "--prompts", required=True, help="prompt rows with a `reference` answer (JSONL / Parquet)")
    path_option(p, "--hf", required=True, help="the starting policy in HF format (the round-1 sampler)")
    path_option(p, "--start", required=True, help="the starting policy as a Megatron checkpoint (round-1 init)")
    path_option(p, "--out", role="output", required=True, help="run directory (round_N/ and final_hf go here)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--prompts-per-round", type=int, default=None,
                   help="prompts sampled and trained per round, the next ones of the file each round (default: all): "
                        "shorter rounds keep the sampler closer to the policy it trains")
    scorer = p.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--reward-fn", metavar="MODULE:FUNCTION", help="rule reward, as for rao_megatron.cli.annotate")
    path_option(scorer, "--reward-model", metavar="DIR", help="reward-model checkpoint, as for rao_megatron.cli.annotate")
    p.add_argument("--n", type=int, default=None, help="G: answers sampled per prompt and round (default: online.samples)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: online.max_new_tokens")
    p.add_argument("--temperature", type=float, default=None, help="default: online.temperature")
    p.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"), help="sampler backend")
    p.add_argument("--procs", type=int, default=1, help="torchrun processes of the update (TP x PP x DP)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (round r uses seed + r)")
    p.add_argument("--train-seed", type=int, default=1234, help="training seed (train.seed of the run)")
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
